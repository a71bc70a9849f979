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
* :func:`postprocess` (= :func:`histosynth.data.nuclei_maps.instances_from_maps`, the one instance-recovery
  rule, also used for generated maps) — marker-controlled watershed: foreground from the type logits (background
  probability < 0.5), markers from the distance map thresholded at ``marker_threshold`` (the "peaks":
  nucleus cores, which stay apart where nuclei touch), watershed of −distance from the markers inside
  the foreground; foreground pieces no marker reached become their own instances; instances smaller than
  ``min_area`` are dropped. Each instance's type is the majority vote of its pixels' most likely type.
* :class:`Segmenter` — model + post-processing; ``predict(uint8 (B,H,W,3))`` pads to multiples of 32 and
  tiles images larger than ``tile`` (overlapping windows, probabilities averaged).
* :func:`evaluate_segmenter` — Dice, AJI (means over images, HoVer-Net's DICE1 and AJI), PQ+ and mPQ+
  (TP/FP/FN/IoU summed over all images before PQ, CoNIC's convention) and PQ per type.

Training (:func:`train_segmenter`) is a task on the one training engine, in :mod:`histosynth.training.segmenter`
(re-exported here): ``seg train --out RUN`` makes a run directory whose ``segmenter/`` folder is the model.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from histosynth.data.nuclei_maps import (
    PostprocessConfig,
    distance_targets,
    drop_small_and_relabel,
    instances_from_maps,
)
from histosynth.errors import DataError
from histosynth.models.nuclei_segmenter import SEGMENTER, SEGMENTER_JSON

__all__ = [  # noqa: F822 (train_segmenter, segmenter_recipe, soft_dice_loss: the module __getattr__ below)
    "PostprocessConfig", "Segmenter", "distance_targets", "instances_from_maps", "postprocess", "train_segmenter",
    "load_segmenter", "evaluate_segmenter", "score_segmentation", "otsu_baseline", "SEGMENTER_JSON", "segmenter_recipe",
    "soft_dice_loss",
]

MODEL_CONFIG = "config.json"
_TRAINING = ("segmenter_recipe", "soft_dice_loss", "train_segmenter")  # re-exported, imported on first use


def __getattr__(name: str):
    """The training names, from :mod:`histosynth.training.segmenter` when first asked for: measuring with a
    segmenter does not import the training engine (accelerate, the recipes)."""
    if name in _TRAINING:
        from histosynth.training import segmenter as training

        return getattr(training, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------ post-processing
def postprocess(
    type_logits, distance, config: PostprocessConfig | None = None, *, probabilities: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Instances and types of one image from the network's outputs (:func:`.nuclei_maps.instances_from_maps`).

    The watershed lives in the data layer, so that the segmenter's outputs and generated maps go through one
    instance-recovery rule; this is its name here (``type_logits`` is its ``semantic``).
    """
    return instances_from_maps(type_logits, distance, config, probabilities=probabilities)


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


def load_segmenter(path: str | Path, device: str | torch.device = "cpu", *, allow_unfinished: bool = False,
                   **options) -> Segmenter:
    """Load a segmenter: the run directory of :func:`train_segmenter` (the --out of ``seg train``), its
    ``segmenter/`` folder, or any ``NucleiSegmenter.save_pretrained`` folder (with an optional ``segmenter.json``).

    A run exports at every checkpoint; an export from before its last step (a run killed or stopped early) is
    refused unless ``allow_unfinished``. ``options`` go to :class:`Segmenter` (tile, overlap, batch_size).

    Raises:
        DataError: the folder or file is missing, is not a nuclei segmenter, or is an unfinished run's export
            (naming it).
    """
    from histosynth.models.nuclei_segmenter import NucleiSegmenter

    path = Path(path).expanduser()
    if not path.exists():
        raise DataError("segmenter model folder not found", path)
    if not path.is_dir():
        raise DataError("segmenter model must be a folder (the --out of `seg train`)", path)
    if (path / SEGMENTER / MODEL_CONFIG).is_file():  # a training run: its export
        path = path / SEGMENTER
    config_file = path / MODEL_CONFIG
    if not config_file.is_file():
        if (path / "recipe.yaml").is_file():
            method = _run_method(path)
            if method != "segmenter":
                raise DataError(f"a training run of method {method!r}, not a nuclei segmenter (give the --out of "
                                "`seg train`)", path)
            raise DataError(f"this training run has no {SEGMENTER}/ yet (it writes one at every checkpoint); "
                            "resume it (seg train --resume)", path)
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
        step, total = info.get("step"), info.get("total_steps")
        if step is not None and total is not None and step < total and not allow_unfinished:
            raise DataError(f"this segmenter was exported at step {step} of {total}: its run stopped early; finish "
                            "it (seg train --resume with the same options) before measuring with it", path)
    return Segmenter(model, post, device=device, path=path, **options)


def _run_method(run: Path) -> str | None:
    try:
        import yaml

        return (yaml.safe_load((run / "recipe.yaml").read_text()) or {}).get("recipe", {}).get("method")
    except Exception:  # an unreadable recipe.yaml: say what we can
        return None


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


def as_store(store_path):
    """A PatchStore given as itself or as its path."""
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

    store = as_store(store_path)
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
        inst = drop_small_and_relabel(inst, min_area).astype(np.int32)
        insts.append(inst)
        types.append(np.where(inst > 0, type_id, 0).astype(np.int32))
    return np.stack(insts), np.stack(types)

