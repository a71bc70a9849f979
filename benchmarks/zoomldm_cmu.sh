#!/usr/bin/env bash
# ZoomLDM end to end on the real CMU slide with the tiny CPU recipes: multi-magnification store -> embeddings ->
# VQ-f4 -> ZoomLDM over all levels -> condition sampler -> a single-level model at 5x with the same budget ->
# samples per level with oracle (reference) and generated conditions -> FD per level (benchmarks/zoomldm_fd.py).
# Each stage timed (wall seconds, peak RSS), for docs/benchmarks.md.
#   bash benchmarks/zoomldm_cmu.sh [SLIDE] [OUT_DIR] [LDM_STEPS]
# Needs an idle machine for comparable times (two torch jobs on 2 cores slow each other tenfold).
set -euo pipefail
SLIDE=${1:-../shared/data/wsi/cmu-1-small-region.svs}
OUT=${2:-runs/zoomldm-cmu}
STEPS=${3:-300}
LEVELS=20x,10x,5x,2.5x
mkdir -p "$OUT"
source "$(dirname "$0")/stage.sh"  # stage NAME COMMAND...: logged, timed, peak memory
RECIPES=$(python -c 'import histosynth.recipes as r; print(r.RECIPE_DIR)')
sed -e "s#path: runs/vq-f4-tiny/autoencoder#path: $OUT/ae/autoencoder#" -e "s#steps: 300#steps: $STEPS#" \
  "$RECIPES/zoomldm-tiny-cpu.yaml" > "$OUT/zoomldm.yaml"
sed -e "s#magnifications: null#magnifications: [5x]#" -e "s#name: zoomldm-tiny-cpu#name: zoomldm-tiny-cpu-5x-alone#" \
  "$OUT/zoomldm.yaml" > "$OUT/zoomldm-5x.yaml"
sed "s#zoomldm: runs/zoomldm-tiny#zoomldm: $OUT/zoom#" "$RECIPES/zoomldm-conditions-tiny-cpu.yaml" > "$OUT/conditions.yaml"
python -c "import sys; sys.path.insert(0, 'benchmarks'); from machine_info import machine; print('machine:', machine())"
stage prepare histosynth prepare slides "$SLIDE" --out "$OUT/store" --patch 128 --magnifications $LEVELS --tissue-threshold 0.25 --overwrite
stage embed histosynth embed "$OUT/store" --overwrite
stage autoencoder histosynth train autoencoder --recipe vq-f4-tiny-cpu --data "$OUT/store" --out "$OUT/ae" --max-steps 300 --overwrite
stage zoomldm histosynth train --recipe "$OUT/zoomldm.yaml" --data "$OUT/store" --out "$OUT/zoom" --overwrite
stage conditions histosynth train --recipe "$OUT/conditions.yaml" --data "$OUT/store" --out "$OUT/cond" --overwrite
stage single-5x histosynth train --recipe "$OUT/zoomldm-5x.yaml" --data "$OUT/store" --out "$OUT/zoom-5x" --overwrite
stage sample-oracle histosynth sample --model "$OUT/cond" --reference "$OUT/store" --num 16 --out "$OUT/oracle" --overwrite
stage sample-generated histosynth sample --model "$OUT/cond" --magnification $LEVELS --num 16 --out "$OUT/generated" --overwrite
stage sample-5x-alone histosynth sample --model "$OUT/zoom-5x" --reference "$OUT/store" --num 16 --out "$OUT/oracle-5x-alone" --overwrite
awk '{s += $2} END {printf "all stages: %.0f s (%.1f min)\n", s, s / 60}' "$OUT"/*.time
python benchmarks/zoomldm_fd.py "$OUT"
