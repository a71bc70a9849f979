"""How much does a short segmenter run depend on its seed and thread count? (the assertions of
``tests/test_segmenter.py::test_brief_training_on_real_consep_beats_the_otsu_baseline``, over several runs)

    histosynth prepare nuclei --format consep ../shared/data/consep --out consep-256 --patch 256 --overlap 0 \\
        --magnification 40x --source-magnification 40x
    python benchmarks/segmenter_short_runs.py --data consep-256 --runs 1:0 2:0 2:1 2:2

Each run (THREADS:SEED) trains ``--steps`` steps of the default recipe (batch 8, 128 px crops) in a temporary run
directory and scores it and the Otsu baseline on every 8th test patch: Dice, PQ, mPQ, the ROC AUC of the
inflammatory probability on the true nuclei's pixels, and the ratio of the last to the first 20 steps' loss.
One JSON line per run, then the machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from machine_info import machine


def one_run(store_path: Path, steps: int, threads: int, seed: int) -> dict:
    from sklearn.metrics import roc_auc_score

    from histosynth.data.store import PatchStore
    from histosynth.evaluate.segmenter import evaluate_segmenter, load_segmenter, otsu_baseline, train_segmenter

    torch.set_num_threads(threads)
    store = PatchStore(store_path)
    idx = store.indices("test")[::8]
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        train_segmenter(store, run, steps=steps, batch_size=8, crop=128, seed=seed, progress=False)
        seg = load_segmenter(run)
        rows = [json.loads(r) for r in (run / "losses.jsonl").read_text().splitlines()]
    ours = evaluate_segmenter(seg, store, indices=idx)

    class Otsu:
        class_names, batch_size = store.class_names, 8

        def predict(self, images):
            return otsu_baseline(images, type_id=4)

    base = evaluate_segmenter(Otsu(), store, indices=idx)
    items = [store[int(i)] for i in idx]
    probs, _ = seg.predict_maps(np.stack([it["image"] for it in items]))
    types = np.stack([it["type_map"] for it in items])
    nuclei = types > 0
    inflammatory = 1 + list(store.class_names).index("inflammatory")
    auc = roc_auc_score(types[nuclei] == inflammatory, probs[:, inflammatory][nuclei])
    ratio = np.mean([r["loss"] for r in rows[-20:]]) / np.mean([r["loss"] for r in rows[:20]])
    return {"threads": threads, "seed": seed, "dice": ours["dice"], "dice_otsu": base["dice"], "pq": ours["pq"],
            "pq_otsu": base["pq"], "mpq": ours["mpq"], "auc_inflammatory": float(auc), "loss_ratio": float(ratio)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", required=True, type=Path, help="a labelled CoNSeP store (train and test splits)")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--runs", nargs="+", default=["1:0", "2:0", "2:1", "2:2"], help="THREADS:SEED of each run")
    args = ap.parse_args()
    for spec in args.runs:
        threads, seed = (int(v) for v in spec.split(":"))
        result = one_run(args.data, args.steps, threads, seed)
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in result.items()}), flush=True)
    print(machine())


if __name__ == "__main__":
    main()
