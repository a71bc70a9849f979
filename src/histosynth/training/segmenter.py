"""The nuclei segmenter's training task (the evaluation instrument of ``evaluate/segmenter.py``).

Per micro-batch: for each drawn item a random crop, rot90 + flip (labels follow) and a mild per-channel colour
jitter, all from the engine's per-step generator; loss = cross-entropy on the K+1 types + ``distance_weight`` ·
MSE on the distance map (:func:`~histosynth.data.nuclei_maps.distance_targets`) + ``dice_weight`` · soft Dice;
AdamW with linear warm-up then cosine decay. The export writes the model (``config.json`` + safetensors,
diffusers style) and ``segmenter.json`` at the run directory's root, so the run loads as a segmenter.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from histosynth.data.nuclei_maps import distance_targets
from histosynth.data.store import PatchStore
from histosynth.errors import DataError, HistosynthError
from histosynth.models.nuclei_segmenter import NucleiSegmenter
from histosynth.recipes import recipe_from_dict
from histosynth.recipes.segmenter import SegmenterRecipe
from histosynth.training.data_order import numpy_rng
from histosynth.training.task import TrainingTask

SEGMENTER_JSON = "segmenter.json"  # post-processing settings + how the model was trained
_SECTIONS = {"model": ("imagenet_encoder", "decoder_channels", "stem_channels"), "loss": ("distance_weight", "dice_weight")}


def segmenter_recipe(**fields) -> SegmenterRecipe:
    """A segmenter recipe from flat keyword fields (``seg train``'s options), each put in its section."""
    raw = {"name": "segmenter", "method": "segmenter", "model": {}, "loss": {}, "train": {}}
    for key, value in fields.items():
        section = next((s for s, keys in _SECTIONS.items() if key in keys), "train")
        raw[section][key] = list(value) if isinstance(value, tuple) else value
    return recipe_from_dict(raw)


def augment(image, inst, types, rng: np.random.Generator, crop: int, jitter: float):
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


class _TrainItems(torch.utils.data.Dataset):
    """The training pool: the store's train patches, then any extra labelled items (e.g. synthetic pairs)."""

    def __init__(self, store, pool: Sequence[int], extra: Sequence | None = None):
        self.store, self.pool, self.extra = store, list(pool), extra if extra is not None else []

    def __len__(self) -> int:
        return len(self.pool) + len(self.extra)

    def __getitem__(self, i: int) -> dict:
        item = self.store[self.pool[i]] if i < len(self.pool) else self.extra[i - len(self.pool)]
        return {k: item[k] for k in ("image", "inst_map", "type_map")}


class SegmenterTask(TrainingTask):
    plot_columns = {"loss": "total", "ce": "type cross-entropy", "mse": "distance MSE", "dice": "soft Dice"}

    @staticmethod
    def collate_fn(items):  # items may differ in size (synthetic pairs); they are cropped in micro_loss
        return items

    def __init__(self, recipe: SegmenterRecipe, data: Path, *, extra_train: Sequence | None = None,
                 info: dict | None = None, progress: bool = True):
        super().__init__(recipe, data, progress=progress)
        self.store, crop = PatchStore(data), recipe.train.crop
        if crop > self.store.patch_size:
            raise HistosynthError(f"crop {crop} must be a multiple of 32 between 32 and the store's patch size "
                                  f"{self.store.patch_size}", self.store.path)
        self.pool = self.store.indices("train")
        if not self.pool:
            raise DataError("the store has no train patches to train a segmenter on", self.store.path)
        self.items = _TrainItems(self.store, self.pool, extra_train)
        self.info = info or {}

    def setup(self, accelerator, run, resuming):
        self.device = accelerator.device

    def build_model(self, accelerator, run, resuming):
        m = self.recipe.model
        model = NucleiSegmenter(class_names=tuple(self.store.class_names), decoder_channels=tuple(m.decoder_channels),
                                stem_channels=m.stem_channels)
        if m.imagenet_encoder:
            model.load_imagenet_encoder()
        return model.to(memory_format=torch.channels_last) if self.device.type == "cpu" else model

    def lr_factor(self, step: int) -> float:
        """Linear warm-up over ``warmup_steps`` (at most a tenth of the run), then cosine decay to 0 at ``steps``."""
        t = self.recipe.train
        warmup = min(t.warmup_steps, t.steps // 10)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, t.steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def dataset(self):
        return self.items

    def micro_loss(self, model, batch, g, step):
        t, loss_cfg, rng = self.recipe.train, self.recipe.loss, numpy_rng(g)
        images, type_targets, dist_targets = [], [], []
        for item in batch:
            image, inst, types = augment(item["image"], item["inst_map"], item["type_map"], rng, t.crop, t.color_jitter)
            target = types.astype(np.int64)
            target[(inst > 0) & (types == 0)] = -100  # a nucleus with no type: no type loss on its pixels
            images.append(image)
            type_targets.append(target)
            dist_targets.append(distance_targets(inst))
        images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
        type_target = torch.from_numpy(np.stack(type_targets)).to(self.device)
        dist_target = torch.from_numpy(np.stack(dist_targets))[:, None].to(self.device)
        type_logits, distance = model(images.to(self.device), return_dict=False)
        ce = F.cross_entropy(type_logits, type_target, ignore_index=-100)
        mse = F.mse_loss(distance, dist_target)
        dice = soft_dice_loss(type_logits, type_target) if loss_cfg.dice_weight else torch.zeros((), device=ce.device)
        loss = ce + loss_cfg.distance_weight * mse + loss_cfg.dice_weight * dice
        return loss, {"ce": ce.detach(), "mse": mse.detach(), "dice": dice.detach()}, len(batch)

    def export(self, model, ema, run):
        """The model files and ``segmenter.json`` at the run's root, each renamed into place when written."""
        tmp = run / f".export-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        twin = NucleiSegmenter.from_config(model.config)
        twin.load_state_dict(model.state_dict())
        if ema is not None:
            ema.copy_to(twin.parameters())
        twin.eval().to("cpu").save_pretrained(tmp)
        info = {**self.info, "train": asdict(self.recipe.train), "loss": asdict(self.recipe.loss),
                "model": asdict(self.recipe.model), "store": str(self.store.path),
                "store_patch_size": self.store.patch_size, "store_magnification": self.store.magnification,
                "train_patches": len(self.pool), "extra_train_items": len(self.items) - len(self.pool),
                "class_names": list(self.store.class_names), "encoder_weights": model.config.encoder_weights,
                "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__} "
                           f"threads {torch.get_num_threads()}".strip()}
        (tmp / SEGMENTER_JSON).write_text(json.dumps(info, indent=2, default=list), encoding="utf-8")
        for f in tmp.iterdir():
            os.replace(f, run / f.name)
        tmp.rmdir()
