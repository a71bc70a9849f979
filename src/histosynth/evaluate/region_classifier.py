"""The pixel-level region classifier: DISC's pixel-level grading model (Carcino-Net's role, Sec. 2.4 and 3) and the
instrument of region adherence (:mod:`histosynth.evaluate.region_adherence`).

Network: the frozen ImageNet EfficientNet-Lite0 (:func:`histosynth.models.efficientnet_lite0.build_effnet_lite0`,
eval mode, no gradients) read at strides 4, 8 and 16 (timm ``blocks.1``, ``blocks.2``, ``blocks.4``: 24 + 40 + 112
channels), the two coarser maps bilinearly upsampled to stride 4 and concatenated, a small trained head
(1×1 conv → GroupNorm → SiLU → 1×1 conv to K logits), the logits bilinearly upsampled to the tile. Input: uint8 RGB
tiles scaled to [-1, 1] (the range of these weights). Any tile size (TF "same" padding).

Training (:func:`train_region_classifier`): per-pixel cross-entropy on the real region store's train split, random
horizontal / vertical flips, AdamW, all randomness from ``seed``. With synthetic tiles (a ``histosynth sample
--regions`` output: images + the masks they were conditioned on) each step draws a real and a synthetic batch and
minimises DISC eq. 4, L = (1 − λ)·L_real + λ·L_synth (:func:`balanced_loss`; λ = 0 is the real-only baseline).

Saved as a folder (:meth:`RegionClassifier.save` / :func:`load_region_classifier`): ``head.safetensors`` and
``region_classifier.json`` (label names, encoder id with the weights' SHA-256, λ, training settings, store).
:func:`evaluate_region_classifier`: pixel precision / recall / F1 (= Dice) per label and pixel accuracy on a split.
:func:`~histosynth.evaluate.region_classifier_sweep.run_region_classifier` is ``histosynth evaluate
region-classifier`` (one λ, or a λ sweep).
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histosynth.data.regions import CLASSES_FILE, open_region_store, read_classes
from histosynth.errors import DataError, HistosynthError

__all__ = [
    "RegionClassifier",
    "RegionTiles",
    "balanced_loss",
    "confusion_matrix",
    "evaluate_region_classifier",
    "load_region_classifier",
    "pixel_metrics",
    "read_region_tiles",
    "to_input",
    "train_region_classifier",
]

FORMAT = "histosynth-region-classifier"
CONFIG = "region_classifier.json"
WEIGHTS = "head.safetensors"
STRIDES = (4, 8, 16)


def _encoder_id(path: Path) -> str:
    from histosynth.models.efficientnet_lite0 import file_sha256
    from histosynth.models.ssl_encoder import OFFLINE_ENCODER

    return f"{OFFLINE_ENCODER}@sha256:{file_sha256(path)}"


class RegionClassifier(nn.Module):
    """Frozen EfficientNet-Lite0 features at strides 4/8/16 + a trained 1×1 head → K region logits per pixel.

    Args:
        label_names: the K region labels (logit k = label k, the region store's class names).
        hidden: channels of the head's hidden layer (GroupNorm with min(8, hidden) groups dividing it).
        info: what the config records about training (``balance`` λ, store, settings).
    """

    def __init__(self, label_names: Sequence[str], hidden: int = 64, info: dict | None = None):
        from histosynth.models.efficientnet_lite0 import build_effnet_lite0

        super().__init__()
        if len(label_names) < 2:
            raise HistosynthError(f"a region classifier needs at least 2 labels, got {list(label_names)}")
        self.label_names = [str(n) for n in label_names]
        self.hidden, self.info = int(hidden), dict(info or {})
        self.encoder, weights = build_effnet_lite0()
        self.encoder_id = _encoder_id(weights)
        by_stride = {f["reduction"]: int(f["module"].split(".")[1]) for f in self.encoder.feature_info}
        self.taps = [by_stride[s] for s in STRIDES]  # block indices read (1, 2, 4)
        channels = sum(self.encoder.feature_info[i]["num_chs"] for i in range(len(self.encoder.feature_info))
                       if self.encoder.feature_info[i]["reduction"] in STRIDES)
        groups = next(g for g in (8, 4, 2, 1) if self.hidden % g == 0)
        self.head = nn.Sequential(nn.Conv2d(channels, self.hidden, 1), nn.GroupNorm(groups, self.hidden), nn.SiLU(),
                                  nn.Conv2d(self.hidden, len(self.label_names), 1))

    def train(self, mode: bool = True) -> RegionClassifier:
        """Train mode for the head only: the encoder stays frozen in eval mode (its BatchNorm statistics kept)."""
        super().train(mode)
        self.encoder.eval()
        return self

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) in [-1, 1] → float (B, 176, ⌈H/4⌉, ⌈W/4⌉): strides 4, 8, 16 concatenated."""
        enc = self.encoder
        h = enc.bn1(enc.conv_stem(x.contiguous(memory_format=torch.channels_last)))
        maps = []
        for i, block in enumerate(enc.blocks[: max(self.taps) + 1]):
            h = block(h)
            if i in self.taps:
                maps.append(h)
        size = maps[0].shape[-2:]
        return torch.cat([maps[0]] + [F.interpolate(m, size=size, mode="bilinear", align_corners=False)
                                      for m in maps[1:]], dim=1).contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """float (B, 3, H, W) in [-1, 1] → logits float (B, K, H, W)."""
        return F.interpolate(self.head(self.features(x)), size=x.shape[-2:], mode="bilinear", align_corners=False)

    @property
    def device(self) -> torch.device:
        return next(self.head.parameters()).device

    @torch.inference_mode()
    def predict(self, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
        """uint8 (B, H, W, 3) RGB tiles (or one (H, W, 3)) → int64 label maps (B, H, W) (or (H, W)), 0..K-1."""
        images = np.asarray(images)
        single = images.ndim == 3
        images = images[None] if single else images
        was = self.training
        self.eval()
        out = [self(to_input(images[s:s + batch_size], self.device)).argmax(1).cpu().numpy()
               for s in range(0, len(images), batch_size)]
        self.train(was)
        maps = np.concatenate(out) if out else np.zeros((0, *images.shape[1:3]), np.int64)
        return maps[0] if single else maps

    def identity(self) -> str:
        """``region-classifier@sha256:…``: a hash of the head's tensors (names, shapes, values) and the labels; the
        same after save / load."""
        h = hashlib.sha256(json.dumps([self.encoder_id, self.label_names]).encode())
        for name, t in self.head.state_dict().items():
            h.update(f"{name}{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return f"region-classifier@sha256:{h.hexdigest()[:16]}"

    def describe(self) -> dict:
        """What a result records about the classifier: id, encoder, labels, λ and what it was trained on."""
        return {"classifier_id": self.identity(), "encoder": self.encoder_id,
                "encoder_layers": [f"blocks.{i}" for i in self.taps], "strides": list(STRIDES),
                "label_names": self.label_names, "hidden": self.hidden, **self.info}

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/head.safetensors`` and ``folder/region_classifier.json`` (folder created if needed)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.head.state_dict().items()}, folder / WEIGHTS)
        config = {"format": FORMAT, "version": 1, **self.describe()}
        (folder / CONFIG).write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
        return folder


def load_region_classifier(path: str | Path, device: str | torch.device = "cpu") -> RegionClassifier:
    """A saved classifier: its folder, or a ``evaluate region-classifier`` output holding ``classifier/``.

    Raises:
        DataError: naming the folder / file: no classifier there, a sweep output (several), an unreadable config,
            other encoder weights than the installed ones, head tensors that do not fit.
    """
    from safetensors.torch import load_file

    folder = Path(path)
    if not (folder / CONFIG).is_file() and (folder / "classifier" / CONFIG).is_file():
        folder = folder / "classifier"
    if not (folder / CONFIG).is_file():
        sweep = sorted(p.name for p in folder.glob(f"lambda-*/classifier/{CONFIG}")) if folder.is_dir() else []
        hint = f" (a balance sweep: pass {folder}/lambda-0/classifier)" if sweep else ""
        raise DataError(f"no region classifier here: {CONFIG} is missing{hint}", folder)
    try:
        config = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
        if config.get("format") != FORMAT:
            raise ValueError(f"format {config.get('format')!r}, expected {FORMAT!r}")
        keys = {"classifier_id", "encoder", "encoder_layers", "strides", "label_names", "hidden", "format", "version"}
        clf = RegionClassifier(config["label_names"], int(config["hidden"]),
                               info={k: v for k, v in config.items() if k not in keys})
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"unreadable region classifier config: {exc}", folder / CONFIG) from None
    if config["encoder"] != clf.encoder_id:
        raise DataError(f"trained on encoder {config['encoder']}, the installed one is {clf.encoder_id}",
                        folder / CONFIG)
    try:
        clf.head.load_state_dict(load_file(folder / WEIGHTS))
    except Exception as exc:  # missing / corrupt file, other shapes
        raise DataError(f"cannot load the classifier head: {exc}", folder / WEIGHTS) from None
    clf.info["path"] = str(folder)
    return clf.to(device).eval()


def to_input(images: np.ndarray, device: str | torch.device = "cpu") -> torch.Tensor:
    """uint8 (B, H, W, 3) → float32 (B, 3, H, W) in [-1, 1] on ``device``."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def balanced_loss(real_logits: torch.Tensor | None, real_target: torch.Tensor | None,
                  synth_logits: torch.Tensor | None, synth_target: torch.Tensor | None,
                  balance: float) -> tuple[torch.Tensor, dict[str, float]]:
    """DISC eq. 4 (Sec. 2.4): L = (1 − λ)·L_real + λ·L_synth, each the per-pixel cross-entropy averaged over its batch.

    Args:
        real_logits, synth_logits: float (B, K, H, W); a side may be None when its weight is 0 (λ = 1 or 0).
        real_target, synth_target: int64 (B, H, W), labels 0..K-1.
        balance: λ in [0, 1]; higher puts more weight on the synthetic tiles.

    Returns:
        ``(L, {"loss": L, "real": L_real, "synth": L_synth})`` (the floats only for the sides computed).

    Raises:
        HistosynthError: λ outside [0, 1], or a side with non-zero weight missing.
    """
    lam = float(balance)
    if not 0.0 <= lam <= 1.0:
        raise HistosynthError(f"--balance {balance}: λ must be in [0, 1] (DISC eq. 4)")
    total, parts = 0.0, {}
    for name, weight, logits, target in (("real", 1.0 - lam, real_logits, real_target),
                                         ("synth", lam, synth_logits, synth_target)):
        if weight == 0.0 and logits is None:
            continue
        if logits is None:
            raise HistosynthError(f"λ = {lam} weights the {name} tiles by {weight}, but none were given")
        term = F.cross_entropy(logits.float(), target)
        total = total + weight * term
        parts[name] = term.item()
    parts = {"loss": float(total.detach()) if torch.is_tensor(total) else float(total), **parts}
    return total, parts


class RegionTiles:
    """Tiles with region masks, read lazily: a region store's split, or a folder of ``images/N.png`` + ``masks/N.png``
    + ``classes.txt`` (a ``sample --regions`` output: its ``samples.jsonl`` rows, else the images with a same-named
    mask). Items: ``{"image": uint8 (H, W, 3), "region_map": int32 (H, W)}``; also ``real`` (uint8 or None) for a
    sample folder row with a real patch."""

    def __init__(self, pairs: list[tuple[Path, Path, Path | None]], label_names: Sequence[str], root: Path,
                 rows: list[dict] | None = None):
        self.pairs, self.label_names, self.root, self.rows = pairs, tuple(label_names), root, rows or [{}] * len(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        from histosynth.data.io import read_label_png, read_rgb

        image_file, mask_file, real_file = self.pairs[i]
        image, mask = read_rgb(image_file), read_label_png(mask_file)
        if mask.shape != image.shape[:2]:
            raise DataError(f"mask {mask.shape[1]}×{mask.shape[0]} px, its image {image_file.name} "
                            f"{image.shape[1]}×{image.shape[0]} px", mask_file)
        if mask.size and mask.max() >= len(self.label_names):
            raise DataError(f"mask value {int(mask.max())} outside the {len(self.label_names)} labels of classes.txt",
                            mask_file)
        real = read_rgb(real_file) if real_file is not None and real_file.is_file() else None
        if real is not None and real.shape != image.shape:
            raise DataError(f"real patch {real.shape[:2]} differs from its generated tile {image.shape[:2]}", real_file)
        return {"image": image, "region_map": mask, "real": real}


def read_region_tiles(folder: str | Path) -> RegionTiles:
    """The tiles of a ``sample --regions`` output (or a region folder with images/, masks/, classes.txt).

    Raises:
        DataError: naming the folder or file: not a folder, no classes.txt, a malformed samples.jsonl row, an image
            without its mask, no tiles.
    """
    root = Path(folder)
    if not root.is_dir():
        raise DataError("not a folder (expected a `histosynth sample --regions` output)", root)
    names = read_classes(root / CLASSES_FILE)
    manifest, pairs, rows = root / "samples.jsonl", [], []
    if manifest.is_file():
        for n, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                pairs.append((root / row["image"], root / row["mask"], root / row["real"] if row.get("real") else None))
            except (ValueError, KeyError, TypeError) as exc:
                raise DataError(f"line {n} needs image and mask: {exc}", manifest) from None
            rows.append(row)
    else:
        for image in sorted((root / "images").glob("*.png")):
            real = root / "real" / image.name
            pairs.append((image, root / "masks" / image.name, real if real.is_file() else None))
    if not pairs:
        raise DataError("no tiles (images/*.png with masks/*.png)", root)
    for image, mask, _ in pairs:
        if not image.is_file() or not mask.is_file():
            missing = image if not image.is_file() else mask
            raise DataError("missing: the tile needs both its image and its mask", missing)
    return RegionTiles(pairs, names, root, rows or None)


def _batch(source, indices, rng: np.random.Generator, device) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = [], []
    for i in indices:
        item = source[int(i)]
        image, mask = item["image"], item["region_map"]
        if rng.random() < 0.5:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if rng.random() < 0.5:
            image, mask = image[::-1], mask[::-1]
        images.append(image)
        masks.append(mask)
    return to_input(np.stack(images), device), torch.from_numpy(np.stack(masks).astype(np.int64)).to(device)


def train_region_classifier(store: str | Path, *, synthetic: str | Path | None = None, balance: float = 0.0,
                            steps: int = 300, batch_size: int = 8, lr: float = 1e-3, weight_decay: float = 1e-4,
                            hidden: int = 64, seed: int = 0, device: str | torch.device = "cpu",
                            progress: bool = True) -> tuple[RegionClassifier, list[dict]]:
    """Train the head on a region store's train split (+ synthetic tiles with weight λ = ``balance``, DISC eq. 4).

    Each step: ``batch_size`` real tiles (and, for 0 < λ, ``batch_size`` synthetic ones) drawn by ``seed``, each
    flipped horizontally / vertically with probability 1/2; AdamW at ``lr`` with cosine decay to 0.

    Returns:
        ``(classifier in eval mode, one loss row per step: step, loss, real and/or synth, lr)``.

    Raises:
        DataError: naming the store / folder: not a region store, no train patches, synthetic labels or tile size
            other than the store's.
        HistosynthError: λ outside [0, 1], λ > 0 without synthetic tiles, non-positive steps / batch size / lr.
    """
    from tqdm.auto import tqdm

    lam = float(balance)
    if not 0.0 <= lam <= 1.0:
        raise HistosynthError(f"--balance {balance}: λ must be in [0, 1] (DISC eq. 4)")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise HistosynthError(f"--steps ({steps}), --batch-size ({batch_size}) and lr ({lr}) must be positive")
    real = open_region_store(store)
    pool = real.indices("train")
    if not pool and lam < 1.0:
        raise DataError("the region store has no train patches", real.path)
    synth = None
    if lam > 0.0:
        if synthetic is None:
            raise HistosynthError(f"--balance {lam} weights synthetic tiles: give --synthetic FOLDER")
        synth = read_region_tiles(synthetic)
        if list(synth.label_names) != list(real.class_names):
            raise DataError(f"region labels {list(synth.label_names)} differ from the store's "
                            f"{list(real.class_names)}", synth.root / "classes.txt")
        first = synth[0]["image"]
        if first.shape[:2] != (real.patch_size, real.patch_size):
            raise DataError(f"synthetic tiles of {first.shape[1]}×{first.shape[0]} px, the store holds "
                            f"{real.patch_size} px patches", synth.pairs[0][0])
    info = {"balance": lam, "trained_on": {"store": str(real.path), "train_patches": len(pool),
                                           "synthetic": None if synth is None else str(synth.root),
                                           "synthetic_tiles": 0 if synth is None else len(synth)},
            "train": {"steps": int(steps), "batch_size": int(batch_size), "lr": float(lr),
                      "weight_decay": float(weight_decay), "seed": int(seed), "augment": "random h/v flips",
                      "optimizer": "AdamW, cosine decay", "loss": "(1-λ)·CE_real + λ·CE_synth (DISC eq. 4)"}}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        clf = RegionClassifier(real.class_names, hidden, info=info)
    clf = clf.to(device).train()
    optimizer = torch.optim.AdamW(clf.head.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + np.cos(np.pi * s / steps)))
    rng, rows = np.random.default_rng(seed), []
    real_items = _StoreSplit(real, pool)
    for step in tqdm(range(steps), desc="region classifier", unit="step", disable=not progress, file=sys.stderr):
        sides = {}
        for name, source, weight in (("real", real_items, 1.0 - lam), ("synth", synth, lam)):
            if weight > 0.0:
                idx = rng.choice(len(source), size=batch_size, replace=len(source) < batch_size)
                x, y = _batch(source, idx, rng, device)
                sides[name] = (clf(x), y)
        loss, row = balanced_loss(*sides.get("real", (None, None)), *sides.get("synth", (None, None)), lam)
        if not torch.isfinite(loss):
            raise HistosynthError(f"the loss became {loss.item()} at step {step + 1}; try a lower lr", real.path)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        rows.append({"step": step + 1, **row, "lr": scheduler.get_last_lr()[0]})
        scheduler.step()
    return clf.eval(), rows


class _StoreSplit:
    def __init__(self, store, indices):
        self.store, self.indices = store, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.store[self.indices[i]]


def confusion_matrix(target: np.ndarray, predicted: np.ndarray, k: int) -> np.ndarray:
    """int64 (K, K) pixel counts: row = true (mask) label, column = predicted label; both int arrays of one shape."""
    t, p = np.asarray(target, np.int64).ravel(), np.asarray(predicted, np.int64).ravel()
    return np.bincount(t * k + p, minlength=k * k).reshape(k, k)


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None


def pixel_metrics(confusion: np.ndarray, label_names: Sequence[str]) -> dict:
    """Per-label pixel precision TP/(TP+FP), recall TP/(TP+FN), F1 = Dice = 2TP/(2TP+FP+FN) (None where undefined:
    nothing predicted / no such pixel / neither), pixel accuracy, and the mean F1 over labels present in the truth."""
    cm = np.asarray(confusion, np.int64)
    tp, support, predicted = np.diag(cm), cm.sum(1), cm.sum(0)
    per = {name: {"precision": _ratio(tp[k], predicted[k]), "recall": _ratio(tp[k], support[k]),
                  "f1": _ratio(2 * tp[k], support[k] + predicted[k]), "pixels": int(support[k]),
                  "predicted_pixels": int(predicted[k])} for k, name in enumerate(label_names)}
    present = [per[n]["f1"] for k, n in enumerate(label_names) if support[k] > 0]
    return {"per_label": per, "mean_f1": float(np.mean(present)) if present else None,
            "pixel_accuracy": _ratio(tp.sum(), cm.sum()), "confusion_matrix": cm.tolist(),
            "confusion_axes": "rows: true label, columns: predicted label (pixels)"}


def evaluate_region_classifier(clf: RegionClassifier, store: str | Path, split: str = "test", batch_size: int = 8,
                               progress: bool = True) -> dict:
    """:func:`pixel_metrics` of ``clf`` on a region store's split (every pixel of every patch), with ``n_tiles``.

    Raises:
        DataError: naming the store: not a region store, other labels than the classifier's, an empty split.
    """
    from tqdm.auto import tqdm

    real = open_region_store(store)
    if list(real.class_names) != clf.label_names:
        raise DataError(f"region labels {list(real.class_names)} differ from the classifier's {clf.label_names}",
                        real.path)
    idx = real.indices(split)
    if not idx:
        raise DataError(f"the region store has no {split} patches to evaluate on", real.path)
    k, cm = len(clf.label_names), 0
    for s in tqdm(range(0, len(idx), batch_size), desc=f"evaluate {split}", disable=not progress, file=sys.stderr):
        items = [real[i] for i in idx[s:s + batch_size]]
        pred = clf.predict(np.stack([it["image"] for it in items]), batch_size)
        cm = cm + confusion_matrix(np.stack([it["region_map"] for it in items]), pred, k)
    return {**pixel_metrics(cm, clf.label_names), "split": split, "n_tiles": len(idx), "store": str(real.path),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
