"""CoNIC challenge data: Lizard cut into 256 px patches, stored as two big .npy arrays.

``images.npy`` (N,256,256,3) uint8 and ``labels.npy`` (N,256,256,2) with the instance map in
channel 0 and the type map in channel 1 (Lizard's 6 classes). Both are memory-mapped, so only
one patch is in memory at a time. ``patch_info.csv`` names the Lizard region each patch came from.

Layout check (every patch): channel 1 must hold types 0..6, else the patch is refused, saying when the channels
look swapped (types first). A swapped patch whose ids all happen to be ≤ 6 passes that check, but its "instances"
(types) are made of several disconnected parts: the instance check of ``validate_record`` refuses it, naming the
possible swap.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from histosynth.data.formats.lizard import CLASSES
from histosynth.data.io import as_int_labels, as_uint8_image, read_npy, validate_record
from histosynth.data.record import NucleiRecord
from histosynth.errors import DataError


def _patch_names(path: Path, n: int) -> list[str] | None:
    """One name per patch; a header row (CoNIC's file starts with "patch_info") is dropped."""
    if not path.is_file():
        return None
    try:
        rows = [r.strip().split(",")[0] for r in path.read_text().splitlines() if r.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read patch info: {err}", path) from None
    if len(rows) == n + 1:
        rows = rows[1:]
    if len(rows) != n:
        raise DataError(f"has {len(rows)} rows but images.npy has {n} patches", path)
    return rows


def read_conic(src: str | Path, relabel_components: bool = False) -> Iterator[NucleiRecord]:
    """Stream CoNIC patches (20x, no split of their own); ``relabel_components``: see
    :func:`histosynth.data.io.validate_record`."""
    src = Path(src)
    img_path, lab_path = src / "images.npy", src / "labels.npy"
    for p in (img_path, lab_path):
        if not p.is_file():
            raise DataError("CoNIC file missing (expected images.npy and labels.npy in the source folder)", p)
    images, labels = read_npy(img_path), read_npy(lab_path)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise DataError(f"expected shape (N, H, W, 3), got {images.shape}", img_path)
    if labels.ndim != 4 or labels.shape[-1] != 2:
        raise DataError(f"expected shape (N, H, W, 2) (instance, type), got {labels.shape}", lab_path)
    if images.shape[0] != labels.shape[0]:
        raise DataError(f"has {labels.shape[0]} patches but {img_path.name} has {images.shape[0]}", lab_path)
    if images.shape[1:3] != labels.shape[1:3]:
        raise DataError(f"patches are {labels.shape[1]}x{labels.shape[2]} but images are "
                        f"{images.shape[1]}x{images.shape[2]}", lab_path)
    if images.shape[0] == 0:
        raise DataError("holds no patches (N = 0)", img_path)
    names = _patch_names(src / "patch_info.csv", images.shape[0])
    return _records(images, labels, img_path, lab_path, names, relabel_components)


LAYOUT = f"CoNIC labels hold the instance ids in channel 0 and the types 0..{len(CLASSES)} in channel 1"
SWAPPED = "channel 0 looks like the types: this copy stores the channels swapped"


def check_layout(inst: np.ndarray, typ: np.ndarray, where: str) -> str:
    """Refuse a patch whose channel 1 holds values outside the types 0..6 (saying when the channels look swapped);
    return the hint for :func:`validate_record`'s instance check (the swap, when channel 0 could be types)."""
    k = len(CLASSES)
    top_inst = int(inst.max(initial=0))
    could_be_types = 0 < top_inst <= k
    if typ.size and (typ.min() < 0 or typ.max() > k):
        swapped = f"; {SWAPPED}" if could_be_types else ""
        raise DataError(f"channel 1 (types) holds values up to {int(typ.max())}, outside the types 0..{k}{swapped}; "
                        f"{LAYOUT}", where)
    if not could_be_types:
        return ""
    return f"channel 0 holds only values 0..{k}: check that the channels are not swapped ({LAYOUT})"


def _records(images, labels, img_path: Path, lab_path: Path, names: list[str] | None,
             relabel_components: bool = False) -> Iterator[NucleiRecord]:
    for i in range(images.shape[0]):
        where = f"{lab_path}[{i}]"
        source = f"{img_path}[{i}]" + (f" ({names[i]})" if names else "")
        inst = as_int_labels(labels[i, ..., 0], "instance map", where)
        typ = as_int_labels(labels[i, ..., 1], "type map", where)
        hint = check_layout(inst, typ, where)
        record = NucleiRecord(
            image=as_uint8_image(images[i], f"{img_path}[{i}]"),
            inst_map=inst,
            type_map=typ,
            class_names=CLASSES, source=source, split=None, magnification="20x",
            meta={"index": i, **({"patch_info": names[i]} if names else {})},
        )
        yield validate_record(record, label_path=where, relabel_components=relabel_components, hint=hint)
