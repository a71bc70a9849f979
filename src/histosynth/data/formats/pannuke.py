"""PanNuke: three folds of 256 px patches at 40x, each fold a set of .npy arrays.

``images.npy`` (N,256,256,3, often float64 in 0..255), ``masks.npy`` (N,256,256,6): channels 0..4
hold the instance ids of each nucleus type, channel 5 is background; optional ``types.npy`` (N,)
names the tissue. The release nests them as ``Fold 1/images/fold1/images.npy`` and
``Fold 1/masks/fold1/masks.npy``; flatter copies exist, so files are found by searching and their
fold is read from the folder names. The standard split trains on folds 1 and 2 and tests on fold 3.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from histosynth.data.io import as_int_labels, as_uint8_image, read_npy, validate_record
from histosynth.data.record import NucleiRecord
from histosynth.errors import DataError

CLASSES = ("neoplastic", "inflammatory", "connective", "dead", "epithelial")
_FOLD = re.compile(r"fold[\s_-]*(\d+)", re.IGNORECASE)
_FILES = ("images.npy", "masks.npy", "types.npy")


def _fold_of(path: Path, src: Path) -> int | None:
    """Fold number from the innermost folder named like "Fold 1" / "fold1", at or below SRC."""
    for part in reversed((src.name, *path.relative_to(src).parts[:-1])):
        if m := _FOLD.fullmatch(part):
            return int(m.group(1))
    return None


def _find_folds(src: Path) -> dict[int | None, dict[str, Path]]:
    folds: dict[int | None, dict[str, Path]] = {}
    for root, dirs, files in os.walk(src):
        dirs.sort()
        for f in files:
            if f.lower() in _FILES:
                path = Path(root) / f
                entry = folds.setdefault(_fold_of(path, src), {})
                if f.lower() in entry:
                    raise DataError(f"two {f} files for one fold (also {entry[f.lower()]}); point at one fold", path)
                entry[f.lower()] = path
    return folds


def read_pannuke(
    src: str | Path, train_folds: tuple[int, ...] = (1, 2), test_folds: tuple[int, ...] = (3,)
) -> Iterator[NucleiRecord]:
    """Stream PanNuke patches (40x); a fold in neither ``train_folds`` nor ``test_folds`` is skipped.

    Files outside any "fold N" folder have no fold and get split None.
    """
    src = Path(src)
    if both := set(train_folds) & set(test_folds):
        raise DataError(f"folds {sorted(both)} are in both train_folds and test_folds", src)
    folds = _find_folds(src)
    if not any("images.npy" in f for f in folds.values()):
        raise DataError("no PanNuke images.npy found below this folder", src)
    parts = []
    for fold in sorted(folds, key=lambda f: (f is None, f)):
        files = folds[fold]
        if "images.npy" not in files:
            continue
        split = None if fold is None else "train" if fold in train_folds else "test" if fold in test_folds else "skip"
        if split == "skip":
            continue
        if "masks.npy" not in files:
            raise DataError(f"label file masks.npy missing for fold {fold}", files["images.npy"])
        parts.append(_open_fold(fold, split, files))
    if not parts:
        raise DataError(f"no PanNuke fold found among train_folds {train_folds} / test_folds {test_folds} "
                        f"(found folds {sorted(f for f in folds if f is not None)})", src)
    return (r for part in parts for r in _records(*part))


def _open_fold(fold: int | None, split: str | None, files: dict[str, Path]) -> tuple:
    img_path, mask_path = files["images.npy"], files["masks.npy"]
    images, masks = read_npy(img_path), read_npy(mask_path)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"expected shape (N, H, W, 3), got {images.shape}", img_path)
    if masks.ndim != 4 or masks.shape[-1] not in (5, 6) or masks.shape[:3] != images.shape[:3]:
        raise DataError(f"expected shape {images.shape[:3] + (6,)} to match images.npy, got {masks.shape}", mask_path)
    if images.shape[0] == 0:
        raise DataError("holds no patches (N = 0)", img_path)
    tissue = None
    if "types.npy" in files:
        tissue = read_npy(files["types.npy"], mmap=False)
        if tissue.shape[:1] != images.shape[:1]:
            raise DataError(f"has {tissue.shape[:1]} entries but images.npy has {images.shape[0]}", files["types.npy"])
    return fold, split, images, masks, tissue, img_path, mask_path


def merge_channels(mask: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """One instance map (ids contiguous 1..N, unique across channels) and a type map (channel + 1)."""
    inst = np.zeros(mask.shape[:2], dtype=np.int64)
    typ = np.zeros(mask.shape[:2], dtype=np.int32)
    offset = 0
    for c in range(len(CLASSES)):
        chan = as_int_labels(mask[..., c], f"mask channel {c}", where)
        on = chan > 0
        if not on.any():
            continue
        ids, local = np.unique(chan[on], return_inverse=True)
        inst[on] = offset + 1 + local.ravel()
        typ[on] = c + 1
        offset += ids.size
    out = np.zeros(typ.shape, dtype=np.int32)  # overlapping channels may have erased ids: make them contiguous
    on = inst > 0
    out[on] = np.unique(inst[on], return_inverse=True)[1].ravel() + 1
    return out, typ


def _records(fold, split, images, masks, tissue, img_path: Path, mask_path: Path) -> Iterator[NucleiRecord]:
    for i in range(images.shape[0]):
        where = f"{mask_path}[{i}]"
        inst, typ = merge_channels(masks[i], where)
        meta = {"fold": fold, "index": i}
        if tissue is not None:
            meta["tissue"] = str(tissue[i])
        record = NucleiRecord(
            image=as_uint8_image(images[i], f"{img_path}[{i}]"), inst_map=inst, type_map=typ, class_names=CLASSES,
            source=f"{img_path}[{i}]", split=split, magnification="40x", meta=meta,
        )
        yield validate_record(record, label_path=where)
