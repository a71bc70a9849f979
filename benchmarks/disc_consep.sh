#!/usr/bin/env bash
# DISC end to end on real tissue with the tiny CPU recipes: CoNSeP regions from nuclei density (64 px at 20x) ->
# VQ-f4 -> SD (disc-tiny-cpu) -> SD-DISC (SC set + L_DISC) and SD-DISC-CoTrain -> tiles on the test masks with SD,
# SD-SC (final and every-step), SD-DISC, CoTrain -> FD against the real test patches; the region classifier and the
# adherence of each are measured by benchmarks/disc_compare.py. Each stage timed (wall seconds, peak RSS).
#   bash benchmarks/disc_consep.sh [CONSEP_DIR] [OUT_DIR] [SD_STEPS] [NUM_SAMPLES] [DISTILL_STEPS]
# Needs an idle machine for comparable times (two torch jobs on 2 cores slow each other tenfold).
set -euo pipefail
SRC=${1:-../shared/data/consep}
OUT=${2:-runs/disc-consep}
STEPS=${3:-2000}
NUM=${4:-64}
DSTEPS=${5:-300}
mkdir -p "$OUT"
source "$(dirname "$0")/stage.sh"  # stage NAME COMMAND...: logged, timed, peak memory
RECIPES=$(python -c 'import histosynth.recipes as r; print(r.RECIPE_DIR)')
sed -e "s#path: runs/vq-f4-tiny/autoencoder#path: $OUT/ae/autoencoder#" -e "s#^  steps: 600#  steps: $STEPS#" \
  "$RECIPES/disc-tiny-cpu.yaml" > "$OUT/sd.yaml"
sed -e "s#teacher: runs/disc-tiny#teacher: $OUT/sd#" -e "s#^  steps: 200#  steps: $DSTEPS#" \
  "$RECIPES/disc-distill-tiny-cpu.yaml" > "$OUT/distill.yaml"
# CoTrain reuses SD-DISC's set (same teacher and settings: checked)
sed -e "s#cotrain: false#cotrain: true#" -e "s#name: disc-distill-tiny-cpu#name: disc-distill-cotrain-tiny-cpu#" \
  -e "s#set_dir: null#set_dir: $OUT/sd-disc/distill#" "$OUT/distill.yaml" > "$OUT/cotrain.yaml"
python -c "import sys; sys.path.insert(0, 'benchmarks'); from machine_info import machine; print('machine:', machine())"
stage prepare histosynth prepare regions "$SRC" --format nuclei-density --nuclei-format consep --patch 64 \
  --magnification 20x --out "$OUT/store" --overwrite
stage autoencoder histosynth train autoencoder --recipe vq-f4-tiny-cpu --data "$OUT/store" --out "$OUT/ae" --max-steps 300 --overwrite
stage sd histosynth train --recipe "$OUT/sd.yaml" --data "$OUT/store" --out "$OUT/sd" --overwrite
stage sd-disc histosynth train --recipe "$OUT/distill.yaml" --data "$OUT/store" --out "$OUT/sd-disc" --overwrite
stage sd-disc-cotrain histosynth train --recipe "$OUT/cotrain.yaml" --data "$OUT/store" --out "$OUT/sd-disc-cotrain" --overwrite
for v in "sd none" "sd-sc final" "sd-sc-every every-step"; do
  set -- $v
  stage "sample-$1" histosynth sample --model "$OUT/sd" --regions "$OUT/store" --num "$NUM" --separated "$2" \
    --out "$OUT/samples/$1" --overwrite
done
stage sample-sd-disc histosynth sample --model "$OUT/sd-disc" --regions "$OUT/store" --num "$NUM" --separated none \
  --out "$OUT/samples/sd-disc" --overwrite
stage sample-sd-disc-cotrain histosynth sample --model "$OUT/sd-disc-cotrain" --regions "$OUT/store" --num "$NUM" \
  --separated none --out "$OUT/samples/sd-disc-cotrain" --overwrite
stage compare python benchmarks/disc_compare.py "$OUT"
cat "$OUT/compare.log"
awk '{s += $2} END {printf "the method (prepare .. compare): %.0f s (%.1f min)\n", s, s / 60}' "$OUT"/*.time
[ "${DOWNSTREAM:-1}" = 0 ] && exit 0  # DOWNSTREAM=0: the method only
# downstream (DISC Sec. 2.4): pixel-level grading on real + SD-DISC tiles (lambda sweep), slide-level MIL on real
# slides + SD-DISC tile sets (Sec. 2.2 masks)
stage tile-sets histosynth prepare tile-sets "$OUT/store" --pairs epithelial+stroma,stroma+epithelial,epithelial+inflammatory,stroma+inflammatory \
  --sets 16 --size 20-30 --out "$OUT/tile-sets" --overwrite
stage sample-tile-sets histosynth sample --model "$OUT/sd-disc" --regions "$OUT/tile-sets" --out "$OUT/samples/tile-sets" --overwrite
stage pixel-grading histosynth evaluate region-classifier --store "$OUT/store" --synthetic "$OUT/samples/sd-disc" \
  --balance 0,0.3,0.6 --out "$OUT/pixel-grading" --overwrite
stage mil histosynth evaluate mil --real "$OUT/store" --synthetic "$OUT/samples/tile-sets" --balance 0,0.3,0.6 \
  --out "$OUT/mil" --overwrite
awk '{s += $2} END {printf "all stages: %.0f s (%.1f min)\n", s, s / 60}' "$OUT"/*.time
