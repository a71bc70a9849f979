"""ZoomLDM's Table 1 at any scale: Fréchet distance of generated vs real patches, level by level.

Generated images are grouped by the ``magnification`` of their rows in ``samples.jsonl`` (what ``histosynth sample``
writes for a ZoomLDM); real patches by the ``magnification`` of their manifest rows in a multi-magnification store.
Features come from any extractor of evaluate/features.py (Inception for published numbers, the offline
EfficientNet-Lite0 here). With few images per level the Fréchet distance is dominated by its small-sample bias:
compare runs only at equal numbers of images (the counts are in the result).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from histosynth.data.images import load_image
from histosynth.data.store import PatchStore
from histosynth.data.tables import numbered_json_lines
from histosynth.errors import DataError
from histosynth.evaluate.distribution_metrics import feature_statistics, frechet_distance


def _features(extractor, images, batch_size: int = 32) -> np.ndarray:
    """(N, D) float64 features of uint8 (H, W, 3) images."""
    out = []
    device = next(iter(extractor.parameters()), torch.empty(0)).device
    for s in range(0, len(images), batch_size):
        batch = torch.from_numpy(np.stack(images[s:s + batch_size])).permute(0, 3, 1, 2).contiguous().to(device)
        with torch.inference_mode():
            f, _ = extractor.features_and_logits(batch)
        out.append(f.double().cpu().numpy())
    return np.concatenate(out)


def _fd(a: np.ndarray, b: np.ndarray) -> float:
    return frechet_distance(*feature_statistics(a), *feature_statistics(b))


def fd_per_magnification(generated: str | Path, real: str | Path, extractor, *, split: str | None = None,
                         max_real: int | None = None, seed: int = 0, batch_size: int = 32) -> dict[str, dict]:
    """{magnification: {"fd", "generated", "real"}} for every level that both sides have (at least 2 images each).

    Args:
        generated: a `histosynth sample` output folder of a ZoomLDM (images/, samples.jsonl with magnification).
        real: a multi-magnification store (`prepare slides --magnifications`); ``split`` None = all its patches.
        extractor: a FeatureExtractor (uint8 (B, 3, H, W) in, features out).
        max_real: at most this many real patches per level, drawn by ``seed`` (None: all).
    Raises:
        DataError naming the folder, store or manifest: no samples.jsonl, a line that is not a sample row, no level
        in common.
    """
    generated, manifest = Path(generated), Path(generated) / "samples.jsonl"
    if not manifest.is_file():
        raise DataError("no samples.jsonl: not a `histosynth sample` output", generated)
    by_level: dict[str, list[Path]] = {}
    for n, row in numbered_json_lines(manifest):
        if not isinstance(row, dict) or "image" not in row:
            raise DataError(f"line {n} is not a sample row (no 'image')", manifest)
        by_level.setdefault(row.get("magnification"), []).append(generated / row["image"])
    store = PatchStore(real)
    real_by_level = store.indices_by_magnification(split)
    common = [m for m in by_level if len(by_level[m]) >= 2 and len(real_by_level.get(m, [])) >= 2]
    if not common:
        raise DataError(f"no magnification with >= 2 images on both sides (generated: {sorted(by_level)}, real: "
                        f"{sorted(k for k in real_by_level if k)})", generated)
    out = {}
    rng = np.random.default_rng(seed)  # draws each level's real subsample, level after level
    for m in common:
        idx = real_by_level[m]
        if max_real is not None and len(idx) > max_real:
            idx = sorted(rng.choice(idx, size=max_real, replace=False).tolist())
        fake = _features(extractor, [load_image(p) for p in by_level[m]], batch_size)
        true = _features(extractor, [np.asarray(store[i]["image"]) for i in idx], batch_size)
        out[m] = {"fd": float(_fd(fake, true)), "generated": len(fake), "real": len(true)}
    return out
