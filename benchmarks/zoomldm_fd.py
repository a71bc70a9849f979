"""FD per magnification of the runs of benchmarks/zoomldm_cmu.sh (offline EfficientNet-Lite0 features, real = every
patch of that level in the store): ZoomLDM with oracle conditions, with generated conditions, and the model trained
on 5x alone with the same budget. Prints a Markdown table.

    python benchmarks/zoomldm_fd.py runs/zoomldm-cmu
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from histosynth.evaluate.features import load_feature_extractor
from histosynth.evaluate.per_magnification import fd_per_magnification


def main(out: Path) -> None:
    extractor = load_feature_extractor("effnet-lite0")
    runs = {"ZoomLDM, oracle conditions": out / "oracle", "ZoomLDM, generated conditions": out / "generated",
            "5x alone, oracle conditions": out / "oracle-5x-alone"}
    results = {name: fd_per_magnification(folder, out / "store", extractor) for name, folder in runs.items()
               if folder.is_dir()}
    levels = sorted({m for r in results.values() for m in r}, key=lambda m: -float(m.rstrip("x")))
    print("| run | " + " | ".join(levels) + " |")
    print("|---|" + "---|" * len(levels))
    for name, r in results.items():
        cells = [f"{r[m]['fd']:.1f} ({r[m]['generated']} vs {r[m]['real']})" if m in r else "–" for m in levels]
        print(f"| {name} | " + " | ".join(cells) + " |")
    (out / "fd_per_magnification.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/zoomldm-cmu"))
