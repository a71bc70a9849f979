"""Downstream usefulness of generated image–label pairs: does adding them help a nuclei segmenter?

HistoSmith's protocol: train the same segmenter on real data only and on real + synthetic pairs, test both on
the same real test split, compare mPQ and per-type PQ (rare types are the point). Here the segmenter is
:func:`histosynth.evaluate.segmenter.train_segmenter` with identical settings and seed for both arms; the only
difference is the training pool.

``ratio`` R: the synthetic set added has round(R × number of real train patches) pairs, drawn (by ``seed``)
from the sample directory; asking for more pairs than the directory holds is an error, never silently fewer.
The synthetic pairs are the generated images with the label maps they were conditioned on
(``histosynth sample`` writes both).
"""

from __future__ import annotations

import json
import platform
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.atomic import atomic_folder, refuse_existing
from histosynth.diffusion.checkpoint import CHECKPOINTS
from histosynth.errors import DataError, HistosynthError

__all__ = ["SyntheticPairs", "augmentation_benefit"]

RESULT = "augment.json"
PLOT = "augment_pq_per_type.png"


class SyntheticPairs:
    """Generated images with their conditioning label maps, read lazily from a ``histosynth sample`` output.

    Indexing gives ``{"image", "inst_map", "type_map"}`` like a store item.
    """

    def __init__(self, sample_dir: str | Path, rows: list[dict] | None = None, num_classes: int | None = None):
        from histosynth.evaluate.controllability import read_samples, sample_class_names

        self.root = Path(sample_dir)
        self.rows = rows if rows is not None else read_samples(self.root)
        self.class_names = sample_class_names(self.root, self.rows)
        self.num_classes = num_classes or (len(self.class_names) if self.class_names else None)

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices) -> "SyntheticPairs":
        return SyntheticPairs(self.root, [self.rows[int(i)] for i in indices], self.num_classes)

    def __getitem__(self, i: int) -> dict:
        from histosynth.evaluate.controllability import read_labels, read_listed

        row = self.rows[i]
        image = read_listed(self.root / row["image"], "image")
        inst, types = read_labels(self.root, row, self.num_classes or 255)
        if image.shape[:2] != inst.shape:
            raise DataError(f"generated image {image.shape[:2]} and its label map {inst.shape} differ in size",
                            self.root / row["image"])
        return {"image": image, "inst_map": inst, "type_map": types}


def _masks_magnification(pairs: SyntheticPairs) -> str | None:
    """Magnification of the store whose masks conditioned the samples (None when it cannot be found)."""
    store = pairs.rows[0].get("store")
    for candidate in ([Path(store), pairs.root / store] if store else []):
        info = candidate / "store.json"
        if info.is_file():
            try:
                return json.loads(info.read_text(encoding="utf-8")).get("magnification")
            except (OSError, ValueError):
                return None
    return None


def _plot(results: dict, names, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = np.arange(len(names) + 1)
    fig, ax = plt.subplots(figsize=(1.4 * len(x) + 2, 3.5))
    for j, (arm, label) in enumerate((("real", "real only"), ("real+synthetic", "real + synthetic"))):
        scores = results[arm]
        vals = [scores["pq_per_type"].get(n, np.nan) for n in names] + [scores["mpq"]]
        ax.bar(x + (j - 0.5) * 0.38, np.nan_to_num(vals), width=0.38, label=label)
    ax.set_xticks(x, [*names, "mPQ"])
    ax.set_ylabel("PQ on real test")
    ax.legend()
    ax.set_title(f"segmenter trained on real vs real + synthetic (ratio {results['ratio']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def augmentation_benefit(
    real_store: str | Path,
    synthetic: str | Path,
    out: str | Path,
    *,
    ratio: float = 1.0,
    steps: int = 1500,
    batch_size: int = 8,
    crop: int = 128,
    seed: int = 0,
    test_split: str = "test",
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Train the segmenter on real train vs real train + synthetic pairs; score both on real ``test_split``.

    Writes ``out/real/`` and ``out/real+synthetic/`` (the two segmenters), ``out/augment.json`` (scores of both,
    their difference, the protocol) and ``out/augment_pq_per_type.png``. Returns the JSON's content.
    """
    from histosynth.data.store import PatchStore
    from histosynth.evaluate.segmenter import evaluate_segmenter, load_segmenter, train_segmenter

    out = Path(out)
    refuse_existing(out, overwrite)
    if not ratio > 0:
        raise HistosynthError(f"--ratio must be > 0 (synthetic pairs per real train patch), got {ratio}")
    store = PatchStore(real_store)
    if not store.has_labels:
        raise DataError("the real store has no nuclei labels to train a segmenter on", store.path)
    pairs = SyntheticPairs(synthetic, num_classes=len(store.class_names))
    if pairs.class_names is not None and tuple(pairs.class_names) != tuple(store.class_names):
        raise DataError(f"the synthetic masks' classes {list(pairs.class_names)} differ from the real store's "
                        f"{list(store.class_names)}", pairs.root)
    mag = _masks_magnification(pairs)
    if mag is not None and store.magnification is not None and mag != store.magnification:
        raise DataError(f"the synthetic images are at {mag} but the real store is at {store.magnification}; "
                        "a segmenter must see one magnification", pairs.root)
    n_real = len(store.indices("train"))
    wanted = int(round(ratio * n_real))
    if wanted < 1:
        raise HistosynthError(f"ratio {ratio} of {n_real} real train patches adds no synthetic pair")
    if wanted > len(pairs):
        raise DataError(f"ratio {ratio} needs {wanted} synthetic pairs ({ratio} x {n_real} real train patches) "
                        f"but the directory holds {len(pairs)}; sample more or lower --ratio", pairs.root)
    chosen = np.sort(np.random.default_rng(seed).choice(len(pairs), size=wanted, replace=False))
    extra = pairs.subset(chosen)
    size = min(extra[0]["image"].shape[:2])
    if crop > size:
        raise HistosynthError(f"crop {crop} is larger than the synthetic images ({size} px); pass --crop <= {size}")

    with atomic_folder(out) as work:
        settings = dict(steps=steps, batch_size=batch_size, crop=crop, seed=seed, device=device, progress=progress)
        results: dict[str, Any] = {}
        for arm, more in (("real", None), ("real+synthetic", extra)):
            folder = work / arm
            train_segmenter(store, folder, extra_train=more, **settings)
            shutil.rmtree(folder / CHECKPOINTS)  # ~60 MiB of optimiser state: augment never resumes an arm
            seg = load_segmenter(folder, device=device)
            results[arm] = evaluate_segmenter(seg, store, test_split, progress=progress)
        names = list(store.class_names)
        results.update({
            "ratio": ratio,
            "real_train_patches": n_real,
            "synthetic_pairs": wanted,
            "synthetic_dir": str(pairs.root),
            "real_store": str(store.path),
            "test_split": test_split,
            "delta": {
                "mpq": results["real+synthetic"]["mpq"] - results["real"]["mpq"],
                "pq": results["real+synthetic"]["pq"] - results["real"]["pq"],
                "pq_per_type": {n: results["real+synthetic"]["pq_per_type"][n] - results["real"]["pq_per_type"][n]
                                for n in names},
            },
            "protocol": {"segmenter": "histosynth NucleiSegmenter (EfficientNet-Lite0 U-Net, distance map + watershed)",
                         **{k: v for k, v in settings.items() if k != "progress"},
                         "metrics": "PQ+/mPQ+ (CoNIC: TP/FP/FN summed over images), IoU > 0.5 matching"},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.processor()}".strip(),
        })
        (work / RESULT).write_text(json.dumps(results, indent=2, default=float), encoding="utf-8")
        _plot(results, names, work / PLOT)
    return results
