"""PanNuke: three folds of 256 px patches at 40x, each fold a set of .npy arrays.

``images.npy`` (N,256,256,3, often float64 in 0..255), ``masks.npy`` (N,256,256,6): channels 0..4
hold the instance ids of each nucleus type, channel 5 is background; optional ``types.npy`` (N,)
names the tissue. The release nests them as ``Fold 1/images/fold1/images.npy`` and
``Fold 1/masks/fold1/masks.npy``; flatter copies exist, so files are found by searching and their
fold is read from the folder names. The standard split trains on folds 1 and 2 and tests on fold 3.

Layout check (:func:`check_layout`, every patch): with 6 channels, channel 5 is the background — only 0/1 values,
1 exactly where no class channel 0-4 has a nucleus, and 1 somewhere (no patch is all nuclei). Some public copies
store the background *first* (channels 1-5 the classes): read as native, every patch would get one giant
"neoplastic" nucleus and every class would shift by one. Such a copy is refused, naming the channel that looks like
the background (0/1, 1 exactly where every other channel is 0, and 1 somewhere). A 5-channel copy (no background)
is read as the five classes, unless one of its channels looks like a background.
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
    src: str | Path, train_folds: tuple[int, ...] = (1, 2), test_folds: tuple[int, ...] = (3,),
    relabel_components: bool = False,
) -> Iterator[NucleiRecord]:
    """Stream PanNuke patches (40x); a fold in neither ``train_folds`` nor ``test_folds`` is skipped.

    Files outside any "fold N" folder have no fold and get split None. Each patch's masks are checked against the
    native layout (see the module docstring); ``relabel_components``: see
    :func:`histosynth.data.io.validate_record`.
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
    return (r for part in parts for r in _records(*part, relabel_components=relabel_components))


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


def _background_like(mask: np.ndarray, c: int, nuclei: np.ndarray) -> str | None:
    """None when channel ``c`` is a background channel (0/1, 1 exactly where no other channel is non-zero, and 1
    somewhere), else what is wrong with it. ``nuclei``: (H, W, C) bool, channel values > 0."""
    chan = mask[..., c]
    odd = chan[(chan != 0) & (chan != 1)]
    if odd.size:
        return f"it holds values other than 0 and 1 (e.g. {odd.flat[0]:g}), like instance ids"
    on = chan == 1
    if not on.any():
        return "it is 0 everywhere: no pixel of the patch would be background"
    others = np.delete(nuclei, c, axis=-1).any(-1)
    wrong_on, wrong_off = int(np.count_nonzero(on & others)), int(np.count_nonzero(~on & ~others))
    if wrong_on or wrong_off:
        return (f"it is 1 on {wrong_on} pixels where another channel has a nucleus and 0 on {wrong_off} pixels "
                "where none has")
    return None


def check_layout(mask: np.ndarray, where: str) -> None:
    """Refuse masks (H, W, 5 or 6) of one patch that are not in PanNuke's layout (see the module docstring)."""
    mask = np.asarray(mask)
    nuclei = mask > 0
    n = mask.shape[-1]
    problem = None
    if n == 6:
        wrong = _background_like(mask, 5, nuclei)
        if wrong is None:
            return
        problem = ("channel 5 should be the background (1 exactly where no class channel 0-4 has a nucleus), "
                   f"but {wrong}")
    looks = [c for c in range(n) if (c != 5 or n != 6) and _background_like(mask, c, nuclei) is None]
    if problem is None and not looks:
        return  # 5 class channels, none of them a background
    said = [problem] if problem else []
    if looks:
        said.append(f"channel {looks[0]} looks like the background "
                    "(0/1, 1 exactly where no other channel has a nucleus)")
        if looks[0] == 0 and n == 6:
            said.append("this copy stores the background first: move it last (np.roll(masks, -1, axis=-1))")
    else:
        said.append("no channel looks like the background")
    said.append("PanNuke masks hold the classes in channels 0-4 and the background in channel 5")
    raise DataError(f"not PanNuke's mask layout: {'; '.join(said)}", where)


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


def _records(fold, split, images, masks, tissue, img_path: Path, mask_path: Path,
             relabel_components: bool = False) -> Iterator[NucleiRecord]:
    for i in range(images.shape[0]):
        where = f"{mask_path}[{i}]"
        mask = np.asarray(masks[i])
        check_layout(mask, where)
        inst, typ = merge_channels(mask, where)
        meta = {"fold": fold, "index": i}
        if tissue is not None:
            meta["tissue"] = str(tissue[i])
        record = NucleiRecord(
            image=as_uint8_image(images[i], f"{img_path}[{i}]"), inst_map=inst, type_map=typ, class_names=CLASSES,
            source=f"{img_path}[{i}]", split=split, magnification="40x", meta=meta,
        )
        yield validate_record(record, label_path=where, relabel_components=relabel_components)
