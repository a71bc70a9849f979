"""Maps derived from a nuclei instance map (targets of the segmenter; HistoSmith's generated distance map)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi


def distance_targets(inst_map: np.ndarray) -> np.ndarray:
    """Per-instance normalised distance to the nucleus border, float32 (H, W) in [0, 1].

    For each nucleus, the Euclidean distance transform of its own mask (distance to the nearest pixel that
    is not this nucleus: background, a touching nucleus or the image edge) divided by its maximum, so the
    innermost pixel is 1 and a border pixel is 1/max; background is 0. Touching nuclei thus get a valley
    of low values between their two peaks.
    """
    inst = np.asarray(inst_map)
    if inst.ndim != 2:
        raise ValueError(f"inst_map must be a 2-D map, got shape {inst.shape}")
    out = np.zeros(inst.shape, np.float32)
    for label, box in enumerate(ndi.find_objects(inst.astype(np.int64, copy=False)), start=1):
        if box is None:
            continue
        # one pixel of margin so the box edge counts as outside, unless it is the image edge (then also outside)
        ys = slice(max(box[0].start - 1, 0), box[0].stop + 1)
        xs = slice(max(box[1].start - 1, 0), box[1].stop + 1)
        mask = inst[ys, xs] == label
        dist = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        peak = dist.max()
        if peak > 0:
            out[ys, xs][mask] = (dist[mask] / peak).astype(np.float32)
    return out


