"""The nuclei segmenter's training task (recipe ``method: segmenter``) on the one engine.

Per micro-batch, for each item (a train patch of the store, or an extra labelled item such as a generated
image–mask pair): a random ``crop`` window, one of the 8 rotations/flips (labels follow), a per-channel gain/offset
colour jitter, then the targets: the type map (K + 1 classes; pixels of a nucleus without a type are left out of
the type losses) and the distance map (:func:`~histosynth.data.nuclei_maps.distance_targets`, of the crop).
loss = cross-entropy + ``distance_weight`` · MSE + ``dice_weight`` · soft Dice (HoVer-Net's NP/NC branches).
The rate warms up linearly, then decays to 0 on a cosine. Every draw comes from the engine's per-step generator,
so a resumed run repeats an uninterrupted one. Export: ``RUN/segmenter`` (what
:func:`histosynth.evaluate.segmenter.load_segmenter` reads; it also accepts RUN).
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
from collections.abc import Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from histosynth.data.nuclei_maps import distance_targets
from histosynth.data.store import PatchStore
from histosynth.diffusion import checkpoint as ckpt
from histosynth.errors import DataError, HistosynthError
from histosynth.models.nuclei_segmenter import SEGMENTER, SEGMENTER_JSON, NucleiSegmenter
from histosynth.recipes.segmenter import SegmenterRecipe
from histosynth.training.engine import ema_copy, fit
from histosynth.training.task import TrainingTask

EXTRA_TRAIN = "extra_train.json"  # RUN/: how many extra items the run trains with, and their fingerprint
IGNORE = -100  # type target of a nucleus pixel without a type (left out of the type losses)


class TrainItems(Dataset):
    """The training pool: the store's train patches, then any extra labelled items (mappings with ``image`` uint8
    (H, W, 3), ``inst_map`` and ``type_map`` (H, W) ints; e.g. generated image–mask pairs)."""

    def __init__(self, store: PatchStore, pool: Sequence[int], extra: Sequence | None = None):
        self.store, self.pool, self.extra = store, list(pool), extra if extra is not None else []

    def __len__(self) -> int:
        return len(self.pool) + len(self.extra)

    def __getitem__(self, i: int) -> dict:
        item = self.store[self.pool[i]] if i < len(self.pool) else self.extra[i - len(self.pool)]
        return {"image": item["image"], "inst_map": item["inst_map"], "type_map": item["type_map"]}


def _extra_identity(items: Sequence) -> tuple[dict, int | None]:
    """({items, sha256 over every item's image and maps}, the smallest side of their images or None), in one read
    of the items: a resumed run must see the same pool, and every crop must fit."""
    digest, smallest = hashlib.sha256(), None
    for item in items:
        side = min(np.shape(item["image"])[:2])
        smallest = side if smallest is None else min(smallest, side)
        for key in ("image", "inst_map", "type_map"):
            digest.update(np.ascontiguousarray(item[key]).tobytes())
    return {"items": len(items), "sha256": digest.hexdigest()}, smallest


def keep_items(items: list) -> list:
    """Collate function that keeps a micro-batch as its list of items (crops are cut in the step, and extra items
    may be larger than the store's patches)."""
    return items


def augment(image: np.ndarray, inst: np.ndarray, types: np.ndarray, g: torch.Generator, crop: int, jitter: float):
    """A random ``crop`` × ``crop`` window, one of the 8 rotations/flips (maps follow the image), then the colour
    jitter: per channel, gain 1 ± ``jitter`` and offset ± 128·``jitter`` (uint8 clipped). Draws come from ``g``."""

    def draw(high: int) -> int:
        return int(torch.randint(0, high, (1,), generator=g))

    h, w = inst.shape
    y, x, k, flip = draw(h - crop + 1), draw(w - crop + 1), draw(4), draw(2)
    maps = [np.rot90(a[y : y + crop, x : x + crop], k) for a in (image, inst, types)]
    if flip:
        maps = [a[:, ::-1] for a in maps]
    image, inst, types = (np.ascontiguousarray(a) for a in maps)
    if jitter > 0:
        gain = 1.0 + (torch.rand(3, generator=g).numpy() * 2 - 1) * jitter
        offset = (torch.rand(3, generator=g).numpy() * 2 - 1) * jitter * 128.0
        image = np.clip(image.astype(np.float32) * gain + offset, 0, 255).astype(np.uint8)
    return image, inst, types


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 − mean over the K+1 classes of the soft Dice between softmax(logits) (B, K+1, H, W) and the one-hot of
    ``target`` (B, H, W) int64 (HoVer-Net's NP/NC loss; keeps rare types from being ignored). Pixels with target
    -100 are left out."""
    valid = (target >= 0).unsqueeze(1).float()
    probs = torch.softmax(logits.float(), dim=1) * valid
    onehot = F.one_hot(target.clamp(min=0), logits.shape[1]).permute(0, 3, 1, 2).float() * valid
    dims = (0, 2, 3)
    inter = (probs * onehot).sum(dims)
    total = probs.sum(dims) + onehot.sum(dims)
    return 1.0 - ((2 * inter + eps) / (total + eps)).mean()


def warmup_cosine(step: int, steps: int, warmup_steps: int) -> float:
    """LR factor: linear warm-up over ``warmup_steps`` (at most a tenth of the run), then cosine decay to 0."""
    warmup = min(warmup_steps, steps // 10)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class SegmenterTask(TrainingTask):
    """``data``: a labelled patch store (its path or an open PatchStore); ``extra_train``: more labelled items drawn
    together with its train patches.

    Raises:
        DataError: the store has no nuclei labels or no train patches.
        HistosynthError: ``train.crop`` larger than the store's patches or an extra item.
    """

    plot_columns = {"loss": "total", "ce": "type cross-entropy", "mse": "distance MSE", "dice": "soft Dice"}
    collate_fn = staticmethod(keep_items)
    recipe_type = SegmenterRecipe

    def __init__(self, recipe: SegmenterRecipe, data, *, progress: bool = True, extra_train: Sequence | None = None):
        self.store = data if isinstance(data, PatchStore) else PatchStore(data)
        super().__init__(recipe, self.store.path, progress=progress)
        if not self.store.has_labels:
            raise DataError("the store has no nuclei labels to train a segmenter on", self.store.path)
        pool = self.store.indices("train")
        if not pool:
            raise DataError("the store has no train patches to train a segmenter on", self.store.path)
        self.items = TrainItems(self.store, pool, extra_train)
        crop = recipe.train.crop
        self.extra_identity, extra_smallest = _extra_identity(self.items.extra)
        smallest = min(self.store.patch_size, extra_smallest or self.store.patch_size)
        if crop > smallest:
            raise HistosynthError(f"crop {crop} is larger than the smallest training image ({smallest} px)", self.store.path)

    def setup(self, accelerator, run, resuming):
        self.device, self.autocast = accelerator.device, accelerator.autocast
        identity = self.extra_identity
        path = run / EXTRA_TRAIN
        saved = json.loads(path.read_text()) if resuming and path.is_file() else identity
        if saved != identity:
            raise HistosynthError(f"cannot resume: this run was trained with other extra items ({path.name}: "
                                  f"{saved['items']} items, now {identity['items']})", run)
        if accelerator.is_main_process and not resuming:
            path.write_text(json.dumps(identity))

    def build_model(self, accelerator, run, resuming):
        m = self.recipe.model
        model = NucleiSegmenter(class_names=tuple(self.store.class_names), decoder_channels=tuple(m.decoder_channels),
                                stem_channels=m.stem_channels)
        if m.imagenet_encoder:  # also when resuming: the config records where the encoder started
            model.load_imagenet_encoder()
        if accelerator.device.type == "cpu":  # ~2x faster depthwise convolutions on CPU
            model = model.to(memory_format=torch.channels_last)
        return model

    def lr_factor(self, step: int) -> float:
        return warmup_cosine(step, self.recipe.train.steps, self.recipe.train.warmup_steps)

    def dataset(self):
        return self.items

    def micro_loss(self, model, batch, g, step):
        t, loss_cfg = self.recipe.train, self.recipe.loss
        images, type_targets, distances = [], [], []
        for item in batch:
            image, inst, types = augment(np.asarray(item["image"]), np.asarray(item["inst_map"]),
                                         np.asarray(item["type_map"]), g, t.crop, t.color_jitter)
            target = types.astype(np.int64)
            target[(inst > 0) & (types == 0)] = IGNORE
            images.append(image)
            type_targets.append(target)
            distances.append(distance_targets(inst))
        images = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).to(self.device)
        if self.device.type == "cpu":
            images = images.contiguous(memory_format=torch.channels_last)
        type_target = torch.from_numpy(np.stack(type_targets)).to(self.device)
        distance_target = torch.from_numpy(np.stack(distances))[:, None].to(self.device)
        with self.autocast():
            type_logits, distance = model(images, return_dict=False)
        type_logits, distance = type_logits.float(), distance.float()
        ce = F.cross_entropy(type_logits, type_target, ignore_index=IGNORE)
        mse = F.mse_loss(distance, distance_target)
        dice = soft_dice_loss(type_logits, type_target) if loss_cfg.dice_weight else torch.zeros((), device=ce.device)
        loss = ce + loss_cfg.distance_weight * mse + loss_cfg.dice_weight * dice
        return loss, {"ce": ce.detach(), "mse": mse.detach(), "dice": dice.detach()}, len(batch)

    def export(self, model, ema, run):
        """``RUN/segmenter``: the model (diffusers layout) and ``segmenter.json`` (post-processing settings, the
        recipe, the store and its classes, where the encoder started, and ``step`` of ``total_steps``: the engine
        exports at every checkpoint, and an export from before the end is not the instrument)."""
        twin = ema_copy(model, ema).eval()
        last = ckpt.latest_checkpoint(run)  # export follows the checkpoint it exports
        step = ckpt.read_trainer_state(last)["step"] if last is not None else 0
        info = {
            "step": step,
            "total_steps": self.total_steps,  # load_segmenter refuses an export from before the end
            "postprocess": asdict(self.recipe.postprocess),
            "train": self.recipe.to_dict(),
            "store": str(self.store.path),
            "store_patch_size": self.store.patch_size,
            "store_magnification": self.store.magnification,
            "train_patches": len(self.items.pool),
            "extra_train_items": len(self.items.extra),
            "class_names": list(self.store.class_names),
            "encoder_weights": twin.config.encoder_weights,
            "exported": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.processor() or ''} torch {torch.__version__} "
                       f"threads {torch.get_num_threads()}".strip(),
        }

        def write(folder: Path) -> None:
            twin.save_pretrained(folder)
            (folder / SEGMENTER_JSON).write_text(json.dumps(info, indent=2), encoding="utf-8")

        ckpt.write_atomically(run / SEGMENTER, write)


def segmenter_recipe(*, steps: int = 1500, batch_size: int = 8, lr: float | None = None, seed: int = 0, crop: int = 128,
                     **options) -> SegmenterRecipe:
    """The built-in segmenter recipe with these settings (``lr``: ``train.learning_rate``, default 1e-3). ``options``:
    any other field of its ``train``, ``model``,
    ``loss`` or ``postprocess`` section by its name (e.g. ``warmup_steps``, ``imagenet_encoder``, ``dice_weight``,
    ``min_area``), or ``postprocess_config`` (a whole :class:`PostprocessConfig`).

    Raises:
        TypeError: an option no section has.
        HistosynthError: a value the recipe's rules refuse (e.g. a crop that is not a multiple of 32).
    """
    from histosynth.recipes import load_recipe, recipe_from_dict

    raw = load_recipe("segmenter").to_dict()
    post = options.pop("postprocess_config", None)
    if post is not None:
        raw["postprocess"] = asdict(post)
    if lr is not None and "learning_rate" in options:
        raise TypeError("give lr or learning_rate, not both")
    if lr is not None:
        options["learning_rate"] = lr
    options.update(steps=steps, batch_size=batch_size, seed=seed, crop=crop)
    for key, value in options.items():
        section = next((s for s in ("train", "model", "loss", "postprocess") if key in raw[s]), None)
        if section is None:
            raise TypeError(f"unknown segmenter training option {key!r}")
        raw[section][key] = list(value) if isinstance(value, tuple) else value
    return recipe_from_dict(raw, source="segmenter options")


def train_segmenter(store_path, out: str | Path, *, max_steps: int | None = None, resume: bool = False, overwrite: bool = False,
                    progress: bool = True, device: str | torch.device | None = None, extra_train: Sequence | None = None,
                    recipe: SegmenterRecipe | None = None, **settings) -> Path:
    """Train a nuclei segmenter on the train split of a labelled patch store into run directory ``out``.

    ``out`` becomes a training run (``recipe.yaml``, ``losses.jsonl``, ``loss.png``, checkpoints) whose
    ``segmenter/`` folder holds the model and ``segmenter.json``; :func:`~histosynth.evaluate.segmenter.load_segmenter`
    reads ``out`` or ``out/segmenter``. ``settings``: :func:`segmenter_recipe`'s (steps, batch_size, lr, seed, crop,
    any recipe field), or ``recipe`` itself. ``max_steps``: stop there (a later ``resume`` goes on to
    ``steps``). ``device``: ``"cpu"`` forces the CPU; None or anything else lets
    accelerate choose (the GPU when there is one; accelerate keeps one device per process, so a process that trained
    on the GPU cannot then force the CPU). ``extra_train``: more labelled items (see :class:`TrainItems`).

    Raises:
        OutputExistsError: ``out`` holds files and neither ``resume`` nor ``overwrite`` is set.
        DataError: the store is missing/incomplete, unlabelled or has no train patches.
        HistosynthError: a crop that does not fit, or resuming with other settings.
        TrainingError: the loss became non-finite.
    """
    if recipe is None:
        recipe = segmenter_recipe(**settings)
    elif settings:
        raise TypeError("pass either a recipe or its settings, not both")
    task = SegmenterTask(recipe, store_path, progress=progress, extra_train=extra_train)
    fit(task, out, max_steps=max_steps, resume=resume, overwrite=overwrite, progress=progress, cpu=device is not None and torch.device(device).type == "cpu")
    return Path(out)
