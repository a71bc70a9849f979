#!/usr/bin/env bash
# HistoSmith end to end on real CoNSeP with the tiny CPU recipes: store -> joint autoencoder -> count-conditioned
# LDM -> a 64-image labelled set, each stage timed (wall seconds, peak RSS), for docs/benchmarks.md.
#   bash benchmarks/histosmith_consep.sh [CONSEP_DIR] [OUT_DIR]
# Needs an idle machine for comparable times (two torch jobs on 2 cores slow each other tenfold).
set -euo pipefail
CONSEP=${1:-../shared/data/consep}
OUT=${2:-runs/histosmith-consep}
mkdir -p "$OUT"
source "$(dirname "$0")/stage.sh"  # stage NAME COMMAND...: logged, timed, peak memory
sed "s#path: runs/histosmith-vq-tiny#path: $OUT/ae#" "$(python -c 'import histosynth.recipes as r; print(r.RECIPE_DIR)')/histosmith-tiny-cpu.yaml" > "$OUT/histosmith-tiny-cpu.yaml"
python -c "import sys; sys.path.insert(0, 'benchmarks'); from machine_info import machine; print('machine:', machine())"
stage prepare histosynth prepare nuclei "$CONSEP" --format consep --out "$OUT/consep-256" --patch 256 --magnification 40x --overwrite
stage autoencoder histosynth train autoencoder --recipe histosmith-vq-tiny-cpu --data "$OUT/consep-256" --out "$OUT/ae" --overwrite
stage ldm histosynth train --recipe "$OUT/histosmith-tiny-cpu.yaml" --data "$OUT/consep-256" --out "$OUT/ldm" --overwrite
stage sample histosynth sample --model "$OUT/ldm" --counts-from "$OUT/consep-256" --num 64 --out "$OUT/synth-64" --overwrite
awk '{s += $2} END {printf "all stages: %.0f s (%.1f min)\n", s, s / 60}' "$OUT"/*.time
