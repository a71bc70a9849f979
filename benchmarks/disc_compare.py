"""Compare the DISC variants of benchmarks/disc_consep.sh: FD (offline EfficientNet-Lite0) of each sample folder
against the store's real test patches, the region classifier's agreement with the conditioning masks (adherence,
trained on the real train split: `evaluate region-classifier`), the real patches' ceiling, UNet passes and wall time
per tile. Prints a Markdown table and writes OUT/compare.json.

    python benchmarks/disc_compare.py runs/disc-consep [--classifier-steps 300]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

VARIANTS = {"sd": "SD", "sd-sc": "SD-SC (final)", "sd-sc-every": "SD-SC (every step)", "sd-disc": "SD-DISC",
            "sd-disc-cotrain": "SD-DISC-CoTrain"}


def wall_seconds(out: Path, name: str) -> float | None:
    f = out / f"sample-{name}.time"
    m = re.search(r": ([\d.]+) s wall", f.read_text()) if f.is_file() else None
    return float(m.group(1)) if m else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path, nargs="?", default=Path("runs/disc-consep"))
    ap.add_argument("--classifier-steps", type=int, default=300)
    args = ap.parse_args()
    from histosynth.evaluate.fid import evaluate_distribution
    from histosynth.evaluate.region_adherence import region_adherence
    from histosynth.evaluate.region_classifier import load_region_classifier
    from histosynth.evaluate.region_classifier_sweep import run_region_classifier

    out, store = args.out, args.out / "store"
    clf_dir = out / "region-classifier"
    if not (clf_dir / "classifier").is_dir():
        run_region_classifier(store, clf_dir, steps=args.classifier_steps, progress=False)
    classifier = load_region_classifier(clf_dir)
    test_metrics = json.loads((clf_dir / "metrics.json").read_text())
    rows = {}
    for key, title in VARIANTS.items():
        folder = out / "samples" / key
        if not folder.is_dir():
            continue
        adherence = region_adherence(classifier, folder, out=out / f"adherence-{key}.json", overwrite=True,
                                     progress=False)
        stats = out / "real-test-effnet.npz"  # the real test patches' statistics, computed once
        fd = evaluate_distribution(None if stats.is_file() else store, folder, "effnet-lite0", split="test",
                                   metrics=["fid"], progress=False, real_stats=stats if stats.is_file() else None,
                                   save_stats=None if stats.is_file() else stats)
        samples = [json.loads(x) for x in (folder / "samples.jsonl").read_text().splitlines()]
        wall = wall_seconds(out, key)
        rows[key] = {"title": title, "fd": fd["fid"], "n": fd["n_generated"], "n_real": fd["n_real"],
                     "agreement": adherence["generated"]["agreement"],
                     "mean_agreement": adherence["generated"]["mean_agreement"],
                     "real_mean_agreement": (adherence["real"] or {}).get("mean_agreement"),
                     "unet_passes_per_tile": sum(s["unet_passes"] for s in samples) / len(samples),
                     "seconds_per_tile": None if wall is None else wall / len(samples)}
    labels = list(classifier.label_names)
    print(f"region classifier on the real test split: {json.dumps(test_metrics.get('test', test_metrics))[:300]}")
    print("| model | FD | mean agreement | " + " | ".join(labels) + " | UNet passes / tile | s / tile (wall) |")
    print("|---|---|---|" + "---|" * len(labels) + "---|---|")
    for r in rows.values():
        per = " | ".join("–" if r["agreement"][n] is None else f"{r['agreement'][n]:.2f}" for n in labels)
        sec = "–" if r["seconds_per_tile"] is None else f"{r['seconds_per_tile']:.2f}"
        print(f"| {r['title']} | {r['fd']:.1f} ({r['n']} vs {r['n_real']}) | {r['mean_agreement']:.3f} | {per} | "
              f"{r['unet_passes_per_tile']:.0f} | {sec} |")
    real = next((r["real_mean_agreement"] for r in rows.values() if r["real_mean_agreement"] is not None), None)
    print(f"real patches of the same masks (the ceiling): mean agreement {real}")
    (out / "compare.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
