#!/usr/bin/env bash
# The tiny models of the quality-vs-steps benchmark (benchmarks/steps_quality.py), on a CPU:
#  * NASDM: the quickstart's (nasdm-tiny-cpu on the bundled HGSC region, 32 px at 10x) -> OUT/quickstart/run
#  * PathLDM: pathldm-tiny-cpu at 64 px / 20x on CoNSeP with label captions, on a VQ-f4 tiny first stage
#    (AE: an autoencoder folder, e.g. the DISC benchmark's runs/disc-consep/ae/autoencoder, trained on 64 px CoNSeP
#    at 20x; or trained here from the store when AE is unset) -> OUT/pathldm/run,
#    and that model trained LONG_STEPS more steps at a lower learning rate -> OUT/pathldm/run-long
#  * HistoSmith, when BEYOND is set: see the end of this file -> OUT/histosmith/run
#  * ZoomLDM, when ZOOM is set: see the end of this file -> OUT/zoomldm/run
#   [BEYOND=runs/histosmith-beyond] [ZOOM=runs/zoomldm-cmu] bash benchmarks/steps_quality_models.sh [CONSEP_DIR] [OUT_DIR] [LDM_STEPS]
set -euo pipefail
SRC=${1:-../shared/data/consep}
OUT=${2:-runs/steps}
LDM_STEPS=${3:-1500}
mkdir -p "$OUT/pathldm"
source "$(dirname "$0")/stage.sh"  # stage NAME COMMAND...: logged, timed, peak memory
[ -d "$OUT/quickstart/run" ] || stage quickstart histosynth quickstart --out "$OUT/quickstart" --overwrite
S="$OUT/pathldm/consep-64"
[ -f "$S/store.json" ] || stage prepare histosynth prepare nuclei --format consep "$SRC" --out "$S" --patch 64 \
  --magnification 20x --overwrite
[ -f "$S/captions.jsonl" ] || stage captions histosynth captions build --from-labels "$S" --out "$S/captions.jsonl"
[ -f "$OUT/pathldm/train-captions.jsonl" ] || histosynth captions build --from-labels "$S" --split train \
  --out "$OUT/pathldm/train-captions.jsonl"
AE=${AE:-}
if [ -z "$AE" ]; then
  [ -d "$OUT/pathldm/ae/autoencoder" ] || stage autoencoder histosynth train autoencoder --recipe vq-f4-tiny-cpu \
    --data "$S" --out "$OUT/pathldm/ae"
  AE=$OUT/pathldm/ae/autoencoder
fi
RECIPES=$(python -c 'import histosynth.recipes as r; print(r.RECIPE_DIR)')
sed -e "s#path: runs/vq-f4-tiny/autoencoder#path: $AE#" -e "s#^patch_size: 256#patch_size: 64#" \
  -e "s#^magnification: 40x#magnification: 20x#" -e "s#^  steps: 400#  steps: $LDM_STEPS#" \
  -e "s#^  batch_size: 4#  batch_size: 16#" -e "s#^name: pathldm-tiny-cpu#name: pathldm-tiny-cpu-64#" \
  "$RECIPES/pathldm-tiny-cpu.yaml" > "$OUT/pathldm/recipe.yaml"
[ -d "$OUT/pathldm/run/pipeline" ] || stage pathldm histosynth train --recipe "$OUT/pathldm/recipe.yaml" --data "$S" \
  --out "$OUT/pathldm/run"
# longer SRC RECIPE RUN STAGE DATA STEPS LR [SED -e ...]: recipe SRC trained longer into RUN (unless it has a
# pipeline): STEPS steps at learning rate LR, EMA 0.999, a checkpoint every 500 steps, its name + "-long", plus the
# given sed edits; written to RECIPE.
longer() {
  local src=$1 recipe=$2 run=$3 name=$4 data=$5 steps=$6 lr=$7
  shift 7
  mkdir -p "$(dirname "$recipe")"
  sed -e "s#^  steps: [0-9]*#  steps: $steps#" -e "s#^  learning_rate: .*#  learning_rate: $lr#" \
    -e "s#^  ema_decay: 0.995#  ema_decay: 0.999#" -e "s#^  checkpoint_every: 100#  checkpoint_every: 500#" \
    -e "s#^name: \(.*\)#name: \1-long#" "$@" "$src" > "$recipe"
  [ -d "$run/pipeline" ] || stage "$name" histosynth train --recipe "$recipe" --data "$data" --out "$run"
}
# A longer-trained PathLDM (OUT/pathldm/run-long): LONG_STEPS more steps started from run's UNet, at 2e-4 (1e-3
# collapsed this model after ~3,700 steps): does the curve keep its shape on a better model?
longer "$OUT/pathldm/recipe.yaml" "$OUT/pathldm/recipe-long.yaml" "$OUT/pathldm/run-long" pathldm-long "$S" \
  "${LONG_STEPS:-6000}" 0.0002 -e "s#^  lr_warmup_steps: 20#  lr_warmup_steps: 100#" \
  -e "s#^  init_unet: null#  init_unet: $OUT/pathldm/run/pipeline/unet#" \
  -e "s#^  keep_checkpoints: 2#  keep_checkpoints: 12#"
# HistoSmith (optional): with BEYOND set to the output folder of benchmarks/histosmith_beyond.sh (its two-dataset
# 64 px store, joint autoencoder and 400-step model hs-64), a 10x longer model -> OUT/histosmith/run
if [ -n "${BEYOND:-}" ]; then
  longer "$BEYOND/histosmith-64.yaml" "$OUT/histosmith/recipe.yaml" "$OUT/histosmith/run" histosmith-long \
    "$BEYOND/store-64" 4000 0.0005 -e "s#^  batch_size: 4#  batch_size: 16#"
fi
# ZoomLDM (optional): with ZOOM set to the output folder of benchmarks/zoomldm_cmu.sh (its multi-magnification CMU
# store with embeddings, and its VQ-f4), the same recipe trained ZOOM_STEPS steps of batch 8 at 5e-4 (its 300 steps
# at 1e-3 draw texture only) -> OUT/zoomldm/run
if [ -n "${ZOOM:-}" ]; then
  longer "$ZOOM/zoomldm.yaml" "$OUT/zoomldm/recipe.yaml" "$OUT/zoomldm/run" zoomldm-long "$ZOOM/store" \
    "${ZOOM_STEPS:-2000}" 0.0005 -e "s#^  lr_warmup_steps: 20#  lr_warmup_steps: 100#" \
    -e "s#^  batch_size: 4#  batch_size: 8#"
fi
