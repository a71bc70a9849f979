#!/usr/bin/env bash
# HistoSmith beyond the CoNSeP demo (issue 10, item 7), with the tiny CPU recipes, each stage timed:
#  1. one store of two datasets: CoNSeP (colon) + the HGSC region (ovary) mapped into one class list, at 20x;
#     a joint autoencoder + HistoSmith trained on it; a segmenter trained on its train split;
#  2. saturation: requests drawn from the training distribution vs requests 1.5-2x beyond the training maximum
#     per type, split by `evaluate counts --training-range`;
#  3. single-stage vs two-stage at an equal training budget: HistoSmith's image (joint model) against NASDM's image
#     drawn for HistoSmith's labels, both at 64 px; FD against real test patches, label<->image consistency
#     (`evaluate mask-adherence`: for the two-stage output its reference row is the segmenter on HistoSmith's own
#     images of the same labels), and downstream: `evaluate augment` with each set's 64 pairs added to the real train
#     patches.
#   bash benchmarks/histosmith_beyond.sh [SHARED_DATA_DIR] [OUT_DIR] [NASDM_STEPS]
# Needs an idle machine (two torch jobs on 2 cores slow each other tenfold). About an hour on 2 cores.
set -euo pipefail
DATA=${1:-../shared/data}
OUT=${2:-runs/histosmith-beyond}
NASDM_STEPS=${3:-500}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
DATA=$(cd "$DATA" && pwd)
source "$(dirname "$0")/stage.sh"  # stage NAME COMMAND...: logged, timed, peak memory
RECIPES=$(python -c 'import histosynth.recipes as r; print(r.RECIPE_DIR)')
python -c "import sys; sys.path.insert(0, 'benchmarks'); from machine_info import machine; print('machine:', machine())"

# --- 1. the combined store (README "Several datasets into one store"), the models, the segmenter
cat > "$OUT/sources.yaml" <<EOF
classes: [epithelial, spindle-shaped, inflammatory, other]
sources:
  - {path: $DATA/consep, format: consep, tissue: colon}
  - path: $DATA/hgsc
    format: folder
    tissue: ovary
    source_magnification: 20x
    class_names: [connective, inflammatory, neoplastic]
    class_map: {neoplastic: epithelial, connective: spindle-shaped}
EOF
for p in 128 64; do
  stage "prepare-$p" histosynth prepare nuclei --sources "$OUT/sources.yaml" --out "$OUT/store-$p" --patch "$p" \
    --magnification 20x --overwrite
done
stage autoencoder histosynth train autoencoder --recipe histosmith-vq-tiny-cpu --data "$OUT/store-128" --out "$OUT/ae" \
  --overwrite
for p in 128 64; do
  sed -e "s#path: runs/histosmith-vq-tiny#path: $OUT/ae#" -e "s#^patch_size: 256#patch_size: $p#" \
    -e "s#^name: histosmith-tiny-cpu#name: histosmith-tiny-cpu-$p#" "$RECIPES/histosmith-tiny-cpu.yaml" > "$OUT/histosmith-$p.yaml"
  stage "histosmith-$p" histosynth train --recipe "$OUT/histosmith-$p.yaml" --data "$OUT/store-$p" --out "$OUT/hs-$p" \
    --overwrite
done
stage segmenter histosynth seg train --data "$OUT/store-128" --out "$OUT/seg" --steps 800 --overwrite

# --- 2. saturation: inside vs beyond the training range (requests 1.5x..2x the training maximum of each type)
python - "$OUT/store-128" "$OUT/beyond.csv" <<'EOF'
import csv, sys
import numpy as np
from histosynth.data.store import PatchStore
store = PatchStore(sys.argv[1])
names = list(store.class_names)
rows = [store.records[i] for i in store.indices("train")]
top = {n: max(int(r["counts"].get(n, 0)) for r in rows) for n in names}
tissues = sorted({r.get("tissue") for r in rows})
rng = np.random.default_rng(0)
with open(sys.argv[2], "w", newline="") as f:
    w = csv.DictWriter(f, fieldnames=[*names, "tissue"])
    w.writeheader()
    for i in range(32):
        n = names[i % len(names)]  # one type pushed beyond its maximum per request, the others drawn inside
        req = {m: int(rng.integers(0, top[m] // 2 + 1)) for m in names}
        req[n] = int(round(top[n] * rng.uniform(1.5, 2.0))) or 1
        w.writerow({**req, "tissue": tissues[i % len(tissues)]})
print("training maximum per type:", top, "tissues:", tissues)
EOF
stage sample-inside histosynth sample --model "$OUT/hs-128" --counts-from "$OUT/store-128" --num 32 \
  --out "$OUT/inside" --overwrite
stage sample-beyond histosynth sample --model "$OUT/hs-128" --requests "$OUT/beyond.csv" --out "$OUT/beyond" --overwrite
for s in inside beyond; do
  stage "counts-$s" histosynth evaluate counts --generated "$OUT/$s" --segmenter "$OUT/seg" --out "$OUT/counts-$s" \
    --training-range "$OUT/store-128"
done

# --- 3. single-stage (HistoSmith image) vs two-stage (HistoSmith labels -> NASDM image), 64 px at 20x
sed -e "s#^patch_size: 32#patch_size: 64#" -e "s#^magnification: 10x#magnification: 20x#" \
  -e "s#^name: nasdm-tiny-cpu#name: nasdm-tiny-cpu-64#" \
  -e "s#{name: train, steps: 700,#{name: train, steps: $((NASDM_STEPS * 7 / 9)),#" \
  -e "s#{name: finetune, steps: 200,#{name: finetune, steps: $((NASDM_STEPS - NASDM_STEPS * 7 / 9)),#" \
  "$RECIPES/nasdm-tiny-cpu.yaml" > "$OUT/nasdm-64.yaml"
stage nasdm-64 histosynth train --recipe "$OUT/nasdm-64.yaml" --data "$OUT/store-64" --out "$OUT/nasdm-64" --overwrite
stage sample-single histosynth sample --model "$OUT/hs-64" --counts-from "$OUT/store-64" --num 64 --out "$OUT/single" \
  --overwrite
stage labels-store histosynth prepare nuclei "$OUT/single/folder" --format folder --source-magnification 20x \
  --patch 64 --magnification 20x --overlap 0 --holdout 0 --out "$OUT/single-labels" --overwrite
stage sample-two histosynth sample --model "$OUT/nasdm-64" --masks "$OUT/single-labels" --split train --num 64 \
  --out "$OUT/two" --overwrite
for s in single two; do
  stage "fd-$s" histosynth evaluate fid --features effnet-lite0 --real "$OUT/store-64" --split test \
    --generated "$OUT/$s" --out "$OUT/fd-$s.json" --overwrite
  stage "adherence-$s" histosynth evaluate mask-adherence --generated "$OUT/$s" --segmenter "$OUT/seg" \
    --real "$OUT/store-64" --out "$OUT/adherence-$s.json"
done
# downstream: the segmenter trained on real (128 px store) vs real + the 64 generated pairs of each set, 64 px crops
RATIO=$(python -c "import json; print(64 / json.load(open('$OUT/store-128/store.json'))['counts']['train']['patches'])")
for s in single two; do
  stage "augment-$s" histosynth evaluate augment --real "$OUT/store-128" --synthetic "$OUT/$s" --ratio "$RATIO" \
    --steps 800 --crop 64 --out "$OUT/augment-$s" --overwrite
done
grep -h "wall" "$OUT"/*.time
