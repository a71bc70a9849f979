"""A nuclei segmenter as an evaluation instrument: train it on real data, then measure images with it.

HistoSmith judges its generated image–label pairs with a downstream nuclei instance + type segmenter
(CISCA); we do the same with a small one. It is trained on real patches of a store
(:func:`train_segmenter`), and the *same* :func:`evaluate_segmenter` then scores it on real test patches
(the ceiling: how well the instrument itself reads real tissue) and, later, on generated images against
the masks they were generated from (mask adherence), or a segmenter trained on real + generated data
(augmentation benefit).

Pieces, in the order data flows through them:

* :func:`distance_targets` — the distance-map target: inside each nucleus, Euclidean distance to the
  nucleus border divided by that nucleus' maximum (so 1 at its centre, 1/max at its border, 0 outside).
* :class:`~histosynth.models.nuclei_segmenter.NucleiSegmenter` — the network (type logits + distance map).
* :func:`postprocess` — marker-controlled watershed: foreground from the type logits (background
  probability < 0.5), markers from the distance map thresholded at ``marker_threshold`` (the "peaks":
  nucleus cores, which stay apart where nuclei touch), watershed of −distance from the markers inside
  the foreground; foreground pieces no marker reached become their own instances; instances smaller than
  ``min_area`` are dropped. Each instance's type is the majority vote of its pixels' most likely type.
* :class:`Segmenter` — model + post-processing; ``predict(uint8 (B,H,W,3))`` pads to multiples of 32 and
  tiles images larger than ``tile`` (overlapping windows, probabilities averaged).
* :func:`evaluate_segmenter` — Dice, AJI (means over images, HoVer-Net's DICE1 and AJI), PQ+ and mPQ+
  (TP/FP/FN/IoU summed over all images before PQ, CoNIC's convention) and PQ per type.

Training (:func:`train_segmenter`): random crops of the store's train patches, random rot90 + flips and a
mild per-channel colour jitter; loss = cross-entropy on the K+1 types + ``distance_weight`` · MSE on the
distance map; AdamW with linear warm-up then cosine decay. All randomness comes from ``seed``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage as ndi

from histosynth.data.nuclei_maps import distance_targets
from histosynth.errors import DataError, HistosynthError, OutputExistsError

__all__ = [
    "PostprocessConfig", "Segmenter", "distance_targets", "postprocess", "train_segmenter", "load_segmenter",
    "evaluate_segmenter", "score_segmentation", "otsu_baseline", "SEGMENTER_JSON",
]

SEGMENTER_JSON = "segmenter.json"  # post-processing settings + how the model was trained
LOSSES = "losses.jsonl"
LOSS_PNG = "loss.png"
MODEL_CONFIG = "config.json"


# ------------------------------------------------------------------------------------ post-processing
@dataclass
class PostprocessConfig:
    """Settings of :func:`postprocess` (stored in ``segmenter.json`` next to the model).

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


def _as_numpy(a) -> np.ndarray:
    if torch.is_tensor(a):
        return a.detach().float().cpu().numpy()
    return np.asarray(a, dtype=np.float32)


def postprocess(
    type_logits, distance, config: PostprocessConfig | None = None, *, probabilities: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Instances and types of one image from the network's outputs, by marker-controlled watershed.

    Args:
        type_logits: ``(K+1, H, W)`` logits (or probabilities with ``probabilities=True``), channel 0 background.
        distance: ``(H, W)`` or ``(1, H, W)`` distance map in [0, 1].
        config: thresholds; defaults of :class:`PostprocessConfig` when None.

    Returns:
        ``(inst_map int32 (H, W), type_map int32 (H, W))``: instances 1..N, 0 background; every pixel of an
        instance carries the instance's type (majority vote of its pixels' most likely type among 1..K).
    """
    from skimage.segmentation import watershed

    cfg = config or PostprocessConfig()
    scores = _as_numpy(type_logits)
    dist = _as_numpy(distance)
    if dist.ndim == 3 and dist.shape[0] == 1:
        dist = dist[0]
    if scores.ndim != 3 or scores.shape[0] < 2 or dist.shape != scores.shape[1:]:
        raise ValueError(f"expected type_logits (K+1, H, W) and distance (H, W), got {scores.shape} and {dist.shape}")
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
    inst = _drop_small_and_relabel(inst, cfg.min_area)

    # majority vote of the per-pixel most likely nucleus type (1..K) inside each instance
    pixel_type = probs[1:].argmax(0) + 1
    n_inst = int(inst.max())
    k = probs.shape[0] - 1
    votes = np.bincount((inst * (k + 1) + pixel_type).ravel(), minlength=(n_inst + 1) * (k + 1))
    votes = votes.reshape(n_inst + 1, k + 1)
    inst_type = votes[:, 1:].argmax(1) + 1
    inst_type[0] = 0
    return inst.astype(np.int32), inst_type[inst].astype(np.int32)


def _drop_small_and_relabel(inst: np.ndarray, min_area: int) -> np.ndarray:
    sizes = np.bincount(inst.ravel())
    keep = sizes >= max(min_area, 1)
    keep[0] = False
    lut = np.zeros(sizes.size, np.int64)
    lut[keep] = np.arange(1, int(keep.sum()) + 1)
    return lut[inst]


# -------------------------------------------------------------------------------------- segmenter
class Segmenter:
    """A trained :class:`NucleiSegmenter` plus its post-processing: uint8 images in, instance/type maps out.

    Args:
        model: the network (put in eval mode on ``device``).
        postprocess_config: watershed settings.
        tile: images larger than this (either side) are cut into overlapping ``tile`` windows.
        overlap: overlap of the windows in px; probabilities and distances are averaged where they overlap.
        batch_size: windows per forward pass.
    """

    def __init__(self, model, postprocess_config: PostprocessConfig | None = None, *, device: str | torch.device = "cpu",
                 tile: int = 512, overlap: int = 64, batch_size: int = 8, path: str | Path | None = None):
        if tile % 32 or tile <= overlap:
            raise ValueError(f"tile ({tile}) must be a multiple of 32 and larger than overlap ({overlap})")
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        if self.device.type == "cpu":  # ~2x faster depthwise convolutions on CPU
            self.model = self.model.to(memory_format=torch.channels_last)
        self.postprocess_config = postprocess_config or PostprocessConfig()
        self.tile, self.overlap, self.batch_size = int(tile), int(overlap), int(batch_size)
        self.path = None if path is None else Path(path)

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.model.config.class_names)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def __repr__(self) -> str:
        return f"Segmenter({str(self.path) if self.path else 'in memory'!r}, classes={list(self.class_names)})"

    @staticmethod
    def _check_images(images) -> np.ndarray:
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected uint8 images of shape (B, H, W, 3), got {images.dtype} {images.shape}")
        return images

    def _windows(self, height: int, width: int) -> list[tuple[int, int, int, int]]:
        """(y, x, h, w) windows covering the image: one window when it fits in a tile, else a tiling."""

        def starts(length: int) -> list[int]:
            if length <= self.tile:
                return [0]
            stride = self.tile - self.overlap
            s = list(range(0, length - self.tile, stride)) + [length - self.tile]
            return sorted(set(s))

        return [(y, x, min(self.tile, height), min(self.tile, width)) for y in starts(height) for x in starts(width)]

    @torch.inference_mode()
    def predict_maps(self, images) -> tuple[np.ndarray, np.ndarray]:
        """Network outputs at full size: (type probabilities float32 (B, K+1, H, W), distance (B, H, W))."""
        images = self._check_images(images)
        batch, height, width = images.shape[:3]
        k1 = self.num_classes + 1
        probs = np.zeros((batch, k1, height, width), np.float32)
        dist = np.zeros((batch, height, width), np.float32)
        weight = np.zeros((height, width), np.float32)
        windows = self._windows(height, width)
        for y, x, h, w in windows:
            weight[y : y + h, x : x + w] += 1
        jobs = [(b, win) for b in range(batch) for win in windows]
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start : start + self.batch_size]
            h, w = chunk[0][1][2], chunk[0][1][3]  # every window has the same size
            ph, pw = -h % 32, -w % 32
            crops = [images[b, y : y + h, x : x + w] for b, (y, x, _, _) in chunk]
            crops = [np.pad(c, ((0, ph), (0, pw), (0, 0)), mode="reflect" if min(h, w) > 1 else "edge") for c in crops]
            tensor = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).to(self.device)
            tensor = tensor.contiguous(memory_format=torch.channels_last)
            logits, distance = self.model(tensor, return_dict=False)
            p = torch.softmax(logits.float(), dim=1)[:, :, :h, :w].cpu().numpy()
            d = distance.float()[:, 0, :h, :w].cpu().numpy()
            for (b, (y, x, _, _)), pi, di in zip(chunk, p, d):
                probs[b, :, y : y + h, x : x + w] += pi
                dist[b, y : y + h, x : x + w] += di
        probs /= weight
        dist /= weight
        return probs, dist

    def predict(self, images) -> tuple[np.ndarray, np.ndarray]:
        """``uint8 (B, H, W, 3)`` → (instance maps int32 (B, H, W), type maps int32 (B, H, W)); any H, W."""
        images = self._check_images(images)
        insts, types = [], []
        for start in range(0, len(images), self.batch_size):
            probs, dist = self.predict_maps(images[start : start + self.batch_size])
            for p, d in zip(probs, dist):
                inst, typ = postprocess(p, d, self.postprocess_config, probabilities=True)
                insts.append(inst)
                types.append(typ)
        shape = images.shape[:3]
        if not insts:
            return np.zeros(shape, np.int32), np.zeros(shape, np.int32)
        return np.stack(insts), np.stack(types)


def load_segmenter(path: str | Path, device: str | torch.device = "cpu", **options) -> Segmenter:
    """Load a segmenter folder written by :func:`train_segmenter` (or ``NucleiSegmenter.save_pretrained``).

    ``options`` go to :class:`Segmenter` (tile, overlap, batch_size). Raises DataError naming the folder or
    file when it is missing or is not a nuclei segmenter.
    """
    from histosynth.models.nuclei_segmenter import NucleiSegmenter

    path = Path(path).expanduser()
    if not path.exists():
        raise DataError("segmenter model folder not found", path)
    if not path.is_dir():
        raise DataError("segmenter model must be a folder (the --out of `seg train`)", path)
    config_file = path / MODEL_CONFIG
    if not config_file.is_file():
        raise DataError(f"not a segmenter folder: {MODEL_CONFIG} is missing", path)
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"unreadable model config: {exc}", config_file) from None
    if config.get("_class_name") != NucleiSegmenter.__name__:
        raise DataError(f"not a nuclei segmenter (model class {config.get('_class_name')!r})", config_file)
    try:
        model = NucleiSegmenter.from_pretrained(str(path), low_cpu_mem_usage=False)
    except Exception as exc:  # missing / truncated safetensors, shape mismatch
        raise DataError(f"cannot load the segmenter weights: {exc}", path) from None
    post = PostprocessConfig()
    info_file = path / SEGMENTER_JSON
    if info_file.is_file():
        try:
            info = json.loads(info_file.read_text(encoding="utf-8"))
            post = PostprocessConfig(**info.get("postprocess", {}))
        except (OSError, ValueError, TypeError) as exc:
            raise DataError(f"unreadable segmenter settings: {exc}", info_file) from None
    return Segmenter(model, post, device=device, path=path, **options)


# ------------------------------------------------------------------------------------------- scoring
def score_segmentation(true_insts, true_types, pred_insts, pred_types, class_names: Sequence[str]) -> dict:
    """Dice, AJI, PQ+, mPQ+ and per-type PQ of predicted vs. true maps (sequences of 2-D maps, one per image).

    dice, aji: means over images of HoVer-Net's DICE1 and AJI (an image empty on both sides counts 1.0).
    pq, dq, sq, mpq, pq_per_type: TP/FP/FN/ΣIoU summed over all images first (PQ+ / mPQ+, CoNIC);
    pq_image_mean: the mean of per-image PQ. pq_per_type is keyed by class name (NaN: type absent from both).
    """
    from histosynth.evaluate.instance_metrics import PQAccumulator, aggregated_jaccard_index, dice

    acc = PQAccumulator(len(class_names))
    dices, ajis = [], []
    for ti, tt, pi, pt in zip(true_insts, true_types, pred_insts, pred_types):
        dices.append(dice(pi, ti))
        ajis.append(aggregated_jaccard_index(ti, pi))
        acc.update(ti, tt, pi, pt)
    res = acc.compute()
    names = list(class_names)
    return {
        "dice": float(np.mean(dices)) if dices else float("nan"),
        "aji": float(np.mean(ajis)) if ajis else float("nan"),
        "pq": res["pq"], "dq": res["dq"], "sq": res["sq"], "mpq": res["mpq"],
        "pq_per_type": {names[k - 1]: v for k, v in res["pq_per_type"].items()},
        "pq_image_mean": res["pq_image_mean"],
        "n_images": res["n_images"],
    }


def _open_store(store_path):
    from histosynth.data.store import PatchStore

    return store_path if isinstance(store_path, PatchStore) else PatchStore(store_path)


def evaluate_segmenter(seg, store_path, split: str | None = "test", *, indices: Sequence[int] | None = None,
                       progress: bool = False) -> dict:
    """Segment the patches of one split of a store and score them against the store's labels.

    ``seg``: a :class:`Segmenter` (or anything with ``class_names`` and ``predict``); ``store_path``: a store
    folder or an open PatchStore; ``indices``: a subset of store indices instead of the whole split.
    Returns :func:`score_segmentation`'s dict (dice, aji, pq, mpq, pq_per_type, n_images, ...) plus the split.
    The same function scores generated images against the masks they were generated from, when those are
    put into a store.
    """
    from tqdm.auto import tqdm

    store = _open_store(store_path)
    if tuple(seg.class_names) != tuple(store.class_names):
        raise DataError(
            f"the store's classes {list(store.class_names)} differ from the segmenter's {list(seg.class_names)}",
            store.path,
        )
    chosen = list(indices) if indices is not None else store.indices(split)
    if not chosen:
        raise DataError(f"the store has no {split!r} patches", store.path)
    true_i, true_t, pred_i, pred_t = [], [], [], []
    step = max(1, getattr(seg, "batch_size", 8))
    for start in tqdm(range(0, len(chosen), step), desc="segment", unit="batch", disable=not progress, file=sys.stderr):
        items = [store[i] for i in chosen[start : start + step]]
        inst, typ = seg.predict(np.stack([it["image"] for it in items]))
        for it, pi, pt in zip(items, inst, typ):
            true_i.append(it["inst_map"])
            true_t.append(it["type_map"])
            pred_i.append(pi)
            pred_t.append(pt)
    scores = score_segmentation(true_i, true_t, pred_i, pred_t, store.class_names)
    scores["split"] = split if indices is None else "indices"
    return scores


def otsu_baseline(images, type_id: int, min_area: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """A trivial reference segmenter: Otsu threshold of the haematoxylin channel (colour deconvolution),
    connected components (holes filled, < ``min_area`` px dropped), every nucleus typed ``type_id``."""
    from skimage.color import rgb2hed
    from skimage.filters import threshold_otsu

    images = Segmenter._check_images(images)
    insts, types = [], []
    for image in images:
        hema = rgb2hed(image)[..., 0]
        fg = hema > threshold_otsu(hema) if np.ptp(hema) > 0 else np.zeros(hema.shape, bool)
        inst, _ = ndi.label(ndi.binary_fill_holes(fg))
        inst = _drop_small_and_relabel(inst, min_area).astype(np.int32)
        insts.append(inst)
        types.append(np.where(inst > 0, type_id, 0).astype(np.int32))
    return np.stack(insts), np.stack(types)


# ------------------------------------------------------------------------------------------ training
@dataclass
class TrainConfig:
    """Everything that determines a training run (written to ``segmenter.json``)."""

    steps: int = 1500
    batch_size: int = 8
    lr: float = 1e-3
    seed: int = 0
    crop: int = 128
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    distance_weight: float = 1.0
    dice_weight: float = 1.0
    color_jitter: float = 0.08
    imagenet_encoder: bool = True
    decoder_channels: tuple = (128, 64, 48, 32, 16)
    stem_channels: int = 16


def _augment(image, inst, types, rng: np.random.Generator, crop: int, jitter: float):
    """Random crop, rot90 and flip (labels follow), then a per-channel gain/offset colour jitter."""
    h, w = inst.shape
    y = int(rng.integers(0, h - crop + 1))
    x = int(rng.integers(0, w - crop + 1))
    image, inst, types = image[y : y + crop, x : x + crop], inst[y : y + crop, x : x + crop], types[y : y + crop, x : x + crop]
    k = int(rng.integers(0, 4))
    flip = bool(rng.integers(0, 2))
    image, inst, types = (np.rot90(a, k) for a in (image, inst, types))
    if flip:
        image, inst, types = (a[:, ::-1] for a in (image, inst, types))
    if jitter > 0:
        gain = 1.0 + rng.uniform(-jitter, jitter, size=3)
        offset = rng.uniform(-jitter, jitter, size=3) * 128.0
        image = np.clip(image.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image), np.ascontiguousarray(inst), np.ascontiguousarray(types)


class _TrainItems:
    """The training pool: the store's train patches, then any extra labelled items (e.g. synthetic pairs)."""

    def __init__(self, store, pool: Sequence[int], extra: Sequence | None = None):
        self.store, self.pool, self.extra = store, list(pool), extra if extra is not None else []

    def __len__(self) -> int:
        return len(self.pool) + len(self.extra)

    def __getitem__(self, i: int) -> dict:
        return self.store[self.pool[i]] if i < len(self.pool) else self.extra[i - len(self.pool)]


def _batch(items: _TrainItems, rng: np.random.Generator, cfg: TrainConfig):
    images, type_targets, dist_targets = [], [], []
    for i in rng.choice(len(items), size=cfg.batch_size, replace=len(items) < cfg.batch_size):
        item = items[int(i)]
        image, inst, types = _augment(item["image"], item["inst_map"], item["type_map"], rng, cfg.crop,
                                      cfg.color_jitter)
        target = types.astype(np.int64)
        target[(inst > 0) & (types == 0)] = -100  # a nucleus with no type: no type loss on its pixels
        images.append(image)
        type_targets.append(target)
        dist_targets.append(distance_targets(inst))
    images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    return images, torch.from_numpy(np.stack(type_targets)), torch.from_numpy(np.stack(dist_targets))[:, None]


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − mean over the K+1 classes of the soft Dice between softmax(logits) and one-hot target (HoVer-Net's
    NP/NC branches add it to the cross-entropy; it keeps rare types from being ignored). Pixels with target
    -100 are left out."""
    valid = (target >= 0).unsqueeze(1).float()
    probs = torch.softmax(logits.float(), dim=1) * valid
    onehot = F.one_hot(target.clamp(min=0), logits.shape[1]).permute(0, 3, 1, 2).float() * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2 * inter + eps) / (total + eps)).mean()


def _lr_factor(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over ``warmup_steps`` (at most a tenth of the run), then cosine decay to 0 at ``steps``."""
    warmup = min(cfg.warmup_steps, cfg.steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, cfg.steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _plot_losses(losses_jsonl: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(r) for r in losses_jsonl.read_text().splitlines() if r]
    if not rows:
        return
    steps = np.array([r["step"] for r in rows])
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.5))
    for ax, key, title in zip(axes, ("loss", "ce", "mse"), ("total", "type cross-entropy", "distance MSE")):
        vals = np.array([r[key] for r in rows])
        ax.plot(steps, vals, lw=0.5, alpha=0.4)
        k = max(1, len(vals) // 50)
        if len(vals) >= k:
            ax.plot(steps[k - 1 :], np.convolve(vals, np.ones(k) / k, mode="valid"), lw=1.5)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def train_segmenter(
    store_path: str | Path,
    out: str | Path,
    *,
    steps: int = 1500,
    batch_size: int = 8,
    lr: float = 1e-3,
    seed: int = 0,
    crop: int = 128,
    postprocess_config: PostprocessConfig | None = None,
    overwrite: bool = False,
    progress: bool = True,
    device: str | torch.device = "cpu",
    extra_train: Sequence | None = None,
    **options,
) -> Path:
    """Train a nuclei segmenter on the train split of a patch store and write a loadable folder at ``out``.

    Writes ``out/config.json`` + ``out/diffusion_pytorch_model.safetensors`` (the model, diffusers style),
    ``out/segmenter.json`` (post-processing settings, training settings, store, time), ``out/losses.jsonl``
    (one row per step) and ``out/loss.png``. The folder is built under a hidden name and renamed into place
    when complete. ``options``: other :class:`TrainConfig` fields (weight_decay, warmup_steps,
    distance_weight, color_jitter, imagenet_encoder, decoder_channels, stem_channels). ``extra_train``: more
    labelled items (mappings with ``image`` uint8 (H, W, 3), ``inst_map``, ``type_map``; indexable, e.g. generated
    image–mask pairs) drawn uniformly together with the store's train patches.

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is False.
        DataError: the store is missing/incomplete or has no train patches.
        HistosynthError: a crop that does not fit the store's patches or is not a multiple of 32.
    """
    from tqdm.auto import tqdm

    from histosynth.models.nuclei_segmenter import NucleiSegmenter

    out = Path(out)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise OutputExistsError("output already exists; pass --overwrite (overwrite=True) to replace it", out)
    unknown = set(options) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise TypeError(f"unknown training options: {sorted(unknown)}")
    cfg = TrainConfig(steps=int(steps), batch_size=int(batch_size), lr=float(lr), seed=int(seed), crop=int(crop),
                      **options)
    store = _open_store(store_path)
    if cfg.steps < 1 or cfg.batch_size < 1 or not cfg.lr > 0:
        raise HistosynthError(f"steps ({cfg.steps}), batch size ({cfg.batch_size}) and lr ({cfg.lr}) must be positive")
    if cfg.crop % 32 or not 32 <= cfg.crop <= store.patch_size:
        raise HistosynthError(
            f"crop {cfg.crop} must be a multiple of 32 between 32 and the store's patch size {store.patch_size}",
            store.path,
        )
    pool = store.indices("train")
    if not pool:
        raise DataError("the store has no train patches to train a segmenter on", store.path)
    items = _TrainItems(store, pool, extra_train)

    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = NucleiSegmenter(class_names=tuple(store.class_names), decoder_channels=tuple(cfg.decoder_channels),
                            stem_channels=cfg.stem_channels)
    if cfg.imagenet_encoder:
        model.load_imagenet_encoder()
    device = torch.device(device)
    model = model.to(device).train()
    if device.type == "cpu":
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, cfg))

    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    started = time.time()
    try:
        with open(partial / LOSSES, "w", encoding="utf-8") as log:
            bar = tqdm(range(cfg.steps), desc="seg train", unit="step", disable=not progress, file=sys.stderr)
            for step in bar:
                images, type_target, dist_target = _batch(items, rng, cfg)
                images, type_target, dist_target = images.to(device), type_target.to(device), dist_target.to(device)
                type_logits, distance = model(images, return_dict=False)
                ce = F.cross_entropy(type_logits, type_target, ignore_index=-100)
                mse = F.mse_loss(distance, dist_target)
                dice = soft_dice_loss(type_logits, type_target) if cfg.dice_weight else torch.zeros(())
                loss = ce + cfg.distance_weight * mse + cfg.dice_weight * dice
                if not torch.isfinite(loss):
                    raise HistosynthError(f"the loss became {loss.item()} at step {step}; try a lower --lr", store.path)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                lr_now = scheduler.get_last_lr()[0]
                scheduler.step()
                row = {"step": step + 1, "loss": loss.item(), "ce": ce.item(), "mse": mse.item(), "dice": dice.item(),
                       "lr": lr_now,
                       "elapsed_s": round(time.time() - started, 2)}
                log.write(json.dumps(row) + "\n")
                if progress:
                    bar.set_postfix(loss=f"{row['loss']:.3f}", ce=f"{row['ce']:.3f}", mse=f"{row['mse']:.4f}")
        train_seconds = time.time() - started
        model.eval().to(memory_format=torch.contiguous_format).to("cpu").save_pretrained(partial)
        info = {
            "postprocess": asdict(postprocess_config or PostprocessConfig()),
            "train": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
            "store": str(store.path),
            "store_patch_size": store.patch_size,
            "store_magnification": store.magnification,
            "train_patches": len(pool),
            "extra_train_items": len(items) - len(pool),
            "class_names": list(store.class_names),
            "encoder_weights": model.config.encoder_weights,
            "train_seconds": round(train_seconds, 1),
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__} "
                       f"threads {torch.get_num_threads()}".strip(),
        }
        (partial / SEGMENTER_JSON).write_text(json.dumps(info, indent=2), encoding="utf-8")
        _plot_losses(partial / LOSSES, partial / LOSS_PNG)
        if out.exists() or out.is_symlink():
            if not overwrite:
                raise OutputExistsError("output appeared while training; pass overwrite=True to replace it", out)
            shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
        os.replace(partial, out)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
    return out
