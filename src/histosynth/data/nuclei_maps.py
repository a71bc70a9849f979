"""Maps derived from a nuclei instance map, and the way back from maps to instances.

* :func:`distance_targets` — instance map → HistoSmith's distance map (the segmenter's target, and the channel a
  generator produces next to the semantic mask).
* :func:`instances_from_maps` — semantic mask + distance map → instance and type maps, by marker-controlled
  watershed. The one instance-recovery rule of the project: the segmenter's post-processing
  (:func:`histosynth.evaluate.segmenter.postprocess` is this function) and the labels of generated images use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

__all__ = ["PostprocessConfig", "distance_targets", "drop_small_and_relabel", "instances_from_maps"]


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


# ------------------------------------------------------------------------------------ instance recovery
@dataclass
class PostprocessConfig:
    """Settings of :func:`instances_from_maps` (stored in a segmenter's ``segmenter.json`` next to the model).

    Attributes:
        foreground_threshold: a pixel is nucleus when 1 − P(background) exceeds this.
        marker_threshold: distance-map level above which pixels are nucleus cores (watershed markers).
        min_marker_area: cores smaller than this (px) are noise and dropped.
        min_area: instances smaller than this (px) are dropped.
    """

    foreground_threshold: float = 0.5
    marker_threshold: float = 0.5
    min_marker_area: int = 4
    min_area: int = 10


def _as_float_array(a) -> np.ndarray:
    """float32 numpy copy of an array or a torch tensor (without importing torch here)."""
    if hasattr(a, "detach"):  # a torch tensor, on any device
        a = a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float32)


def instances_from_maps(
    semantic, distance, config: PostprocessConfig | None = None, *, probabilities: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Instance and type maps of one image from a semantic mask and a distance map (marker-controlled watershed).

    HistoSmith generates a semantic (type) mask and a distance map and recovers the instances "from the generated
    distance map and semantic mask"; the rule is HoVer-Net-style marker-controlled watershed, the same one that
    turns a segmenter's outputs into instances:

    1. foreground: 1 − P(background) > ``foreground_threshold``, holes filled;
    2. markers: connected pieces of (distance > ``marker_threshold``) inside the foreground — nucleus cores,
       which stay apart where nuclei touch — of at least ``min_marker_area`` px;
    3. watershed of −distance from the markers, restricted to the foreground; foreground pieces no marker
       reached (small or flat nuclei) become instances of their own;
    4. instances smaller than ``min_area`` px are dropped, the rest renumbered 1..N (order kept);
    5. each instance's type: the majority vote of its pixels' most likely nucleus type among 1..K
       (ties → the smallest type id); every pixel of the instance carries it.

    Args:
        semantic: ``(K+1, H, W)`` float logits (softmax over axis 0 is applied) or, with ``probabilities=True``,
            probabilities / a one-hot mask in [0, 1]; channel 0 is background, channel k type id k (K ≥ 1).
            A numpy array or a torch tensor.
        distance: ``(H, W)`` or ``(1, H, W)`` distance map in [0, 1] (as :func:`distance_targets`: 1 at each
            nucleus' centre, falling towards its border, 0 outside).
        config: thresholds; the defaults of :class:`PostprocessConfig` when None.
        probabilities: ``semantic`` already holds probabilities.

    Returns:
        ``(inst_map, type_map)``, both int32 (H, W): instances 1..N with 0 background; types 1..K on instance
        pixels, 0 elsewhere.
    """
    from skimage.segmentation import watershed

    cfg = config or PostprocessConfig()
    scores = _as_float_array(semantic)
    dist = _as_float_array(distance)
    if dist.ndim == 3 and dist.shape[0] == 1:
        dist = dist[0]
    if scores.ndim != 3 or scores.shape[0] < 2 or dist.shape != scores.shape[1:]:
        raise ValueError(f"expected semantic (K+1, H, W) and distance (H, W), got {scores.shape} and {dist.shape}")
    if probabilities:
        probs = scores
    else:
        shifted = np.exp(scores - scores.max(0, keepdims=True))
        probs = shifted / shifted.sum(0, keepdims=True)
    foreground = (1.0 - probs[0]) > cfg.foreground_threshold
    foreground = ndi.binary_fill_holes(foreground)

    markers, n = ndi.label((dist > cfg.marker_threshold) & foreground)
    if n:
        sizes = np.bincount(markers.ravel(), minlength=n + 1)
        small = sizes < cfg.min_marker_area
        small[0] = False
        markers[small[markers]] = 0
    inst = watershed(-dist, markers, mask=foreground) if markers.any() else np.zeros(dist.shape, np.int64)
    # foreground pieces that no marker reached (small or flat nuclei) become instances of their own
    leftover, n_left = ndi.label(foreground & (inst == 0))
    if n_left:
        inst = np.where(leftover > 0, leftover + inst.max(), inst)
    inst = drop_small_and_relabel(inst, cfg.min_area)

    # majority vote of the per-pixel most likely nucleus type (1..K) inside each instance
    pixel_type = probs[1:].argmax(0) + 1
    n_inst = int(inst.max())
    k = probs.shape[0] - 1
    votes = np.bincount((inst * (k + 1) + pixel_type).ravel(), minlength=(n_inst + 1) * (k + 1))
    votes = votes.reshape(n_inst + 1, k + 1)
    inst_type = votes[:, 1:].argmax(1) + 1
    inst_type[0] = 0
    return inst.astype(np.int32), inst_type[inst].astype(np.int32)


def drop_small_and_relabel(inst: np.ndarray, min_area: int) -> np.ndarray:
    """Instances of fewer than ``min_area`` px set to 0, the others renumbered 1..N keeping their order."""
    sizes = np.bincount(inst.ravel())
    keep = sizes >= max(min_area, 1)
    keep[0] = False
    lut = np.zeros(sizes.size, np.int64)
    lut[keep] = np.arange(1, int(keep.sum()) + 1)
    return lut[inst]
