"""Region adherence (DISC, "the right pattern in the right place"): does a generated tile show, where its conditioning
mask says label k, what a classifier trained on real tiles reads as k?

The pixel-level region classifier (:mod:`histosynth.evaluate.region_classifier`, trained on real tiles only, λ = 0)
labels every pixel of each generated tile of a ``histosynth sample --regions`` output; its map is compared with the
mask the tile was conditioned on:

* agreement of label k = (pixels of the masks with label k predicted k) / (pixels of the masks with label k), pooled
  over all tiles (the recall of k with the mask as truth); ``mean_agreement``: its mean over the labels present in
  the masks; ``pixel_agreement``: all pixels predicted as their mask says; the confusion matrix (rows: mask label,
  columns: predicted label, in pixels);
* the same on the real patches of those masks (``real/N.png``): the classifier's own accuracy on them, the ceiling a
  generator can reach under this instrument; ``relative`` = generated / real per label.

DISC (Sec. 3) judges its patterns qualitatively and by the grading model's gain; this is the measured counterpart.
"""

from __future__ import annotations

import json
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from histosynth.atomic import refuse_existing
from histosynth.errors import DataError
from histosynth.evaluate.region_classifier import confusion_matrix, read_region_tiles

__all__ = ["agreement", "region_adherence"]

PNG_ROWS = 8


def agreement(confusion: np.ndarray, label_names) -> dict:
    """From a (K, K) confusion matrix (rows: mask label, columns: predicted): ``agreement`` {label: fraction of its
    mask pixels predicted as it, None when the masks hold none}, ``mean_agreement`` over the labels present,
    ``pixel_agreement`` (trace / total), ``mask_pixels`` per label and the matrix itself."""
    cm = np.asarray(confusion, np.int64)
    support = cm.sum(1)
    per = {n: (float(cm[k, k] / support[k]) if support[k] else None) for k, n in enumerate(label_names)}
    present = [v for v in per.values() if v is not None]
    return {"agreement": per, "mean_agreement": float(np.mean(present)) if present else None,
            "pixel_agreement": float(np.trace(cm) / cm.sum()) if cm.sum() else None,
            "mask_pixels": {n: int(s) for n, s in zip(label_names, support)}, "confusion_matrix": cm.tolist()}


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def region_adherence(classifier, samples: str | Path, *, out: str | Path | None = None, overwrite: bool = False,
                     batch_size: int = 8, progress: bool = True) -> dict:
    """Score a ``sample --regions`` output with a region classifier (see the module docstring).

    Args:
        classifier: a :class:`~histosynth.evaluate.region_classifier.RegionClassifier` (or any object with
            ``label_names`` and ``predict(uint8 (B, H, W, 3)) → int (B, H, W)``; ``describe()`` if it has one).
        samples: the sample folder (images/, masks/, real/, classes.txt, samples.jsonl).
        out: also write this JSON and, beside it (same name, ``.png``), rows of generated tile | mask | predicted
            map (| real patch | predicted on it), labels coloured as :func:`histosynth.viz.colour_mask`.

    Returns:
        ``{"generated": agreement(...), "real": agreement(...) or None, "relative", "per_tile", "protocol", ...}``.

    Raises:
        DataError: naming the file: the folder's labels differ from the classifier's, a mask that does not fit.
        OutputExistsError: ``out`` or its PNG exists and ``overwrite`` is False.
    """
    from tqdm.auto import tqdm

    from histosynth.viz import colour_mask, save_grid

    out = None if out is None else Path(out)
    png = None if out is None else out.with_suffix(".png")
    for path in (out, png) if out is not None else ():
        refuse_existing(path, overwrite)
    tiles = read_region_tiles(samples)
    names = list(classifier.label_names)
    if list(tiles.label_names) != names:
        raise DataError(f"region labels {list(tiles.label_names)} differ from the classifier's {names}",
                        tiles.root / "classes.txt")
    k, cm_gen, cm_real, n_real, per_tile, panels = len(names), np.zeros((len(names),) * 2, np.int64), None, 0, [], []
    for s in tqdm(range(0, len(tiles), batch_size), desc="region adherence", disable=not progress, file=sys.stderr):
        items = [tiles[i] for i in range(s, min(s + batch_size, len(tiles)))]
        shapes = {it["image"].shape for it in items}
        groups = [items] if len(shapes) == 1 else [[it] for it in items]
        for group in groups:
            pred = np.asarray(classifier.predict(np.stack([it["image"] for it in group])))
            reals = [it for it in group if it["real"] is not None]
            pred_real = np.asarray(classifier.predict(np.stack([it["real"] for it in reals]))) if reals else []
            r = 0
            for it, p in zip(group, pred):
                one = confusion_matrix(it["region_map"], p, k)
                cm_gen += one
                row = {"name": tiles.rows[len(per_tile)].get("name", Path(tiles.pairs[len(per_tile)][0]).stem),
                       "pixel_agreement": float(np.trace(one) / max(1, one.sum())), "real_pixel_agreement": None}
                panel = [it["image"], colour_mask(it["region_map"]), colour_mask(p)]
                if it["real"] is not None:
                    one_real = confusion_matrix(it["region_map"], pred_real[r], k)
                    cm_real = one_real if cm_real is None else cm_real + one_real
                    row["real_pixel_agreement"] = float(np.trace(one_real) / max(1, one_real.sum()))
                    panel += [it["real"], colour_mask(pred_real[r])]
                    r, n_real = r + 1, n_real + 1
                per_tile.append(row)
                if len(panels) < PNG_ROWS and (not panels or panels[0][0].shape == it["image"].shape):
                    panels.append(panel)
    gen = agreement(cm_gen, names)
    real = None if cm_real is None else agreement(cm_real, names)
    relative = None if real is None else {
        n: (gen["agreement"][n] / real["agreement"][n] if gen["agreement"][n] is not None and real["agreement"][n]
            else None) for n in names}
    info = classifier.describe() if hasattr(classifier, "describe") else {"classifier_id": type(classifier).__name__}
    stores = sorted({str(r["store"]) for r in tiles.rows if r.get("store")})
    result = {
        "generated": gen, "real": real, "relative": relative,
        "protocol": {"classifier_id": info.get("classifier_id"), "classifier": info,
                     "samples": str(tiles.root), "store": stores[0] if len(stores) == 1 else stores or None,
                     "n_tiles": len(tiles), "n_real": n_real, "labels": names,
                     "agreement": "per label k: mask pixels of k predicted k / mask pixels of k, pooled over tiles; "
                                  "real = the same classifier on the real patches of the same masks (ceiling)"},
        "per_tile": per_tile, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if real is None:
        result["reference_note"] = "no real patches in the folder (e.g. tile sets): no ceiling to read against"
    if float(info.get("balance") or 0.0) > 0:
        result["warning"] = (f"the classifier was trained with synthetic tiles (λ = {info['balance']}); adherence "
                             "needs one trained on real tiles only (λ = 0)")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        width = max(len(p) for p in panels)
        blank = np.full_like(panels[0][0], 255)
        rows = [p + [blank] * (width - len(p)) for p in panels]
        size = rows[0][0].shape[0]
        _write_atomic(png, lambda tmp: save_grid(rows, tmp, scale=max(1, 128 // size)))
        text = json.dumps(result, indent=2, ensure_ascii=False)
        _write_atomic(out, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        result["png"] = str(png)
    return result
