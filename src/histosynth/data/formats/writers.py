"""Writers of labelled images in the two formats the product reads back (generated image–label pairs, exports).

* the **folder** format (read by :func:`~histosynth.data.formats.folder.read_folder`), flat layout:
  ``ROOT/NAME.png`` (RGB) + ``ROOT/NAME_inst.png`` (uint16 instance ids) + ``ROOT/NAME_type.png`` (uint8 type ids)
  + ``ROOT/classes.txt`` (:func:`write_class_names`: line k names type id k);
* the **HoVer-Net / CoNSeP** layout (read by :func:`~histosynth.data.formats.consep.read_consep`):
  ``ROOT/images/NAME.png`` + ``ROOT/labels/NAME.mat`` (MATLAB v5, ``scipy.io.savemat``) holding ``inst_map``
  int32 (H, W) with instances renumbered 1..N, ``type_map`` int32 (H, W), ``inst_type`` int32 (N, 1) (row k−1:
  the type of instance k) and ``inst_centroid`` float64 (N, 2) as (x, y). ``ROOT`` is one split folder; for a
  train/test set write into ``ROOT/train`` and ``ROOT/test``. The .mat files do not name their classes:
  :func:`write_class_names` into the same ``ROOT`` writes ``classes.txt``, which ``read_consep`` uses (with its
  default ``classes="merged"``) instead of HoVer-Net's fixed merged CoNSeP names, so any class names round-trip.

Images and labels are written as PNG (lossless), so what is read back is exactly what was written; instance ids
may be renumbered (HoVer-Net layout always, folder format only past 65535) but never merged or split. Nothing here
is atomic: the caller writes into a hidden folder and renames it when complete (:func:`histosynth.atomic.atomic_folder`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from histosynth.errors import DataError

__all__ = [
    "CLASSES_FILE", "hovernet_labels", "write_class_names", "write_folder_item", "write_hovernet_item",
]

CLASSES_FILE = "classes.txt"
MAX_PNG_INSTANCES = 65535  # uint16 instance PNG
MAX_PNG_TYPE = 255  # uint8 type PNG


# ------------------------------------------------------------------------------------------------- checks
def _checked_name(name: str) -> str:
    name = str(name)
    if not name or name in (".", "..") or name.startswith(".") or any(c in name for c in "/\\\0\n"):
        raise ValueError(f"item name {name!r} must be a plain, non-hidden file name without a path or extension")
    return name


def _checked_arrays(image, inst_map, type_map) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    image, inst, typ = np.asarray(image), np.asarray(inst_map), np.asarray(type_map)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    for what, lab in (("inst_map", inst), ("type_map", typ)):
        if lab.shape != image.shape[:2]:
            raise ValueError(f"{what} must be (H, W) = {image.shape[:2]}, got {lab.shape}")
        if lab.dtype.kind not in "iu":
            raise ValueError(f"{what} must hold integers, got {lab.dtype}")
        if lab.size and lab.min() < 0:
            raise ValueError(f"{what} has negative ids (min {lab.min()})")
    return image, inst.astype(np.int64), typ.astype(np.int64)


def _relabel_sequential(inst: np.ndarray) -> tuple[np.ndarray, int]:
    """Instance ids renumbered 1..N in increasing order of the old ids (0 stays 0); returns (map, N)."""
    ids = np.unique(inst)
    ids = ids[ids > 0]
    out = np.zeros(inst.shape, np.int64)
    if ids.size:
        out = np.searchsorted(ids, inst) + 1
        out[inst == 0] = 0
    return out, int(ids.size)


def _save_png(array: np.ndarray, path: Path) -> None:
    try:
        Image.fromarray(array).save(path, format="PNG")
    except OSError as err:
        raise DataError(f"cannot write image: {err}", path) from None


# ------------------------------------------------------------------------------------------- class names
def write_class_names(root: str | Path, class_names: Sequence[str]) -> Path:
    """Write ``ROOT/classes.txt``: one class name per line, line k naming type id k. Returns its path.

    The names must be non-empty, unique and single-line (what ``read_folder`` / ``read_consep`` accept).
    """
    names = [str(n).strip() for n in class_names]
    if not names:
        raise ValueError("no class names given")
    if any(not n or "\n" in n or "\r" in n for n in names):
        raise ValueError(f"class names must be non-empty single lines, got {list(class_names)}")
    if len(set(names)) != len(names):
        raise ValueError(f"class names repeat: {names}")
    path = Path(root) / CLASSES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------ folder format
def write_folder_item(root: str | Path, name: str, image, inst_map, type_map) -> tuple[Path, Path, Path]:
    """Write one item of the folder format (flat layout): ``NAME.png``, ``NAME_inst.png``, ``NAME_type.png``.

    Args:
        root: the dataset folder (created if missing). It must not hold an ``images/`` folder: ``read_folder``
            would then read the sub-folder layout and miss these files.
        name: file stem; must not end in ``_inst`` or ``_type`` (the reader takes those for labels).
        image: uint8 (H, W, 3) RGB.
        inst_map: integer (H, W), 0 background, instance ids > 0 — written as uint16 with the ids kept, or
            renumbered 1..N when an id exceeds 65535 (more than 65535 instances is refused).
        type_map: integer (H, W), 0 background, type ids 1..K ≤ 255 — written as uint8.

    Returns:
        the paths of the image, instance and type PNGs.
    """
    name = _checked_name(name)
    if name.endswith(("_inst", "_type")):
        raise ValueError(f"item name {name!r} ends in _inst/_type: read_folder would take the image for a label")
    image, inst, typ = _checked_arrays(image, inst_map, type_map)
    root = Path(root)
    inst_path, type_path = root / f"{name}_inst.png", root / f"{name}_type.png"
    if inst.size and inst.max() > MAX_PNG_INSTANCES:
        inst, n = _relabel_sequential(inst)
        if n > MAX_PNG_INSTANCES:
            raise DataError(
                f"{n} instances do not fit a uint16 instance PNG (at most {MAX_PNG_INSTANCES}); "
                "write the HoVer-Net layout (int32 .mat) instead", inst_path,
            )
    if typ.size and typ.max() > MAX_PNG_TYPE:
        raise DataError(f"type id {int(typ.max())} does not fit a uint8 type PNG (at most {MAX_PNG_TYPE})", type_path)
    if (root / "images").is_dir():
        raise ValueError(f"{root} holds an images/ folder: read_folder would read that layout, not NAME_inst.png")
    root.mkdir(parents=True, exist_ok=True)
    image_path = root / f"{name}.png"
    _save_png(np.ascontiguousarray(image), image_path)
    _save_png(inst.astype(np.uint16), inst_path)
    _save_png(typ.astype(np.uint8), type_path)
    return image_path, inst_path, type_path


# ------------------------------------------------------------------------------------ HoVer-Net / CoNSeP
def hovernet_labels(inst_map, type_map) -> dict[str, np.ndarray]:
    """The HoVer-Net / CoNSeP label arrays of one image.

    Returns a dict of ``inst_map`` int32 (H, W) (ids renumbered 1..N in increasing order of the given ids),
    ``type_map`` int32 (H, W) (as given), ``inst_type`` int32 (N, 1) (the majority type of instance k's non-zero
    type pixels, ties → the smaller id; 0 when all its pixels are type 0) and ``inst_centroid`` float64 (N, 2):
    the mean (x, y) = (column, row) of its pixels.
    """
    inst, typ = np.asarray(inst_map), np.asarray(type_map)
    if inst.ndim != 2 or typ.shape != inst.shape:
        raise ValueError(f"inst_map and type_map must be (H, W) maps of one shape, got {inst.shape} and {typ.shape}")
    inst, n = _relabel_sequential(inst.astype(np.int64))
    typ = typ.astype(np.int64)
    inst_type = np.zeros(n, np.int32)
    labelled = (inst > 0) & (typ > 0)
    if labelled.any():
        k1 = int(typ.max()) + 1
        votes = np.bincount(inst[labelled] * k1 + typ[labelled], minlength=(n + 1) * k1).reshape(n + 1, k1)[1:]
        inst_type = np.where(votes.max(1) > 0, votes.argmax(1), 0).astype(np.int32)
    rows, cols = np.indices(inst.shape)
    area = np.bincount(inst.ravel(), minlength=n + 1)[1:].astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        cx = np.bincount(inst.ravel(), weights=cols.ravel(), minlength=n + 1)[1:] / area
        cy = np.bincount(inst.ravel(), weights=rows.ravel(), minlength=n + 1)[1:] / area
    return {
        "inst_map": inst.astype(np.int32),
        "type_map": typ.astype(np.int32),
        "inst_type": inst_type.reshape(n, 1),
        "inst_centroid": np.stack([cx, cy], axis=1).reshape(n, 2).astype(np.float64),
    }


def write_hovernet_item(root: str | Path, name: str, image, inst_map, type_map) -> tuple[Path, Path]:
    """Write one item of the HoVer-Net / CoNSeP layout: ``ROOT/images/NAME.png`` and ``ROOT/labels/NAME.mat``.

    Args:
        root: one split folder (created if missing); ``read_consep(ROOT)`` reads it, ``read_consep(PARENT)`` reads
            ``PARENT/train`` and ``PARENT/test``. Put :func:`write_class_names` there too unless the types are
            HoVer-Net's merged CoNSeP classes.
        name: file stem.
        image: uint8 (H, W, 3) RGB.
        inst_map, type_map: integer (H, W) maps, 0 background (see :func:`hovernet_labels` for what is stored).

    Returns:
        the paths of the image and of the .mat file.
    """
    from scipy.io import savemat

    name = _checked_name(name)
    image, inst, typ = _checked_arrays(image, inst_map, type_map)
    if typ.size and typ.max() > np.iinfo(np.int32).max:
        raise ValueError(f"type ids must fit int32, got {int(typ.max())}")
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    image_path, mat_path = root / "images" / f"{name}.png", root / "labels" / f"{name}.mat"
    _save_png(np.ascontiguousarray(image), image_path)
    try:
        savemat(str(mat_path), hovernet_labels(inst, typ), do_compression=True)
    except OSError as err:
        raise DataError(f"cannot write .mat file: {err}", mat_path) from None
    return image_path, mat_path
