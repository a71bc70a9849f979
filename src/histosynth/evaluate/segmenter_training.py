"""Training of the nuclei segmenter (the evaluation instrument of :mod:`histosynth.evaluate.segmenter`).

Random crops of the store's train patches (and of any extra labelled items), random rot90 + flips and a mild
per-channel colour jitter; loss = cross-entropy on the K+1 types + ``distance_weight`` · MSE on the distance map
(:func:`~histosynth.data.nuclei_maps.distance_targets`) + ``dice_weight`` · soft Dice; AdamW with linear warm-up,
then cosine decay. All randomness comes from ``seed``. The output folder is built under a hidden name and
renamed into place when complete.

This loop is not yet on the one training engine (``histosynth.training``): see docs/benchmarks.md, "Nuclei
segmenter", for why (its short-run test is seed-sensitive).
"""

from __future__ import annotations

import json
import math
import platform
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from histosynth.data.nuclei_maps import distance_targets
from histosynth.atomic import atomic_folder
from histosynth.errors import DataError, HistosynthError, OutputExistsError
from histosynth.evaluate.segmenter import LOSS_PNG, LOSSES, SEGMENTER_JSON, PostprocessConfig, as_store
from histosynth.viz import plot_loss_curves

LOSS_COLUMNS = {"loss": "total", "ce": "type cross-entropy", "mse": "distance MSE"}


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
    store = as_store(store_path)
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

    started = time.time()
    with atomic_folder(out) as partial:
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
        plot_loss_curves(partial / LOSSES, partial / LOSS_PNG, LOSS_COLUMNS)
        if (out.exists() or out.is_symlink()) and not overwrite:
            raise OutputExistsError("output appeared while training; pass overwrite=True to replace it", out)
    return out
