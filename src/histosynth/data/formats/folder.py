"""A plain folder of images with instance and type label PNGs: the format for users' own data.

Flat: ``NAME.jpg`` + ``NAME_inst.png`` + ``NAME_type.png``; or split into ``images/NAME.jpg``,
``instances/NAME.png``, ``types/NAME.png``. ``classes.txt`` gives one class name per line
(line k is type id k). Nothing here states the magnification, so it is an option.

Instance-only datasets (MoNuSeg, CPM-15/17, Kumar, TNBC: an instance mask per image, no types) have no type file
for any image (no ``NAME_type.png``, no ``types/`` folder): they are read as one class, ``nucleus`` (every instance
typed 1), or the one name that ``classes.txt`` / ``class_names`` gives; declaring several classes for them is an
error. When some images have a type file, every image needs one.

Label files are checked as they are read: maps the size of the image (``validate_record``), and instance maps that
cannot be right (ids of several disconnected parts, typed pixels in no instance:
:mod:`histosynth.data.instance_check`); an 8-bit instance file refused that way is named as the likely cause
(more than 255 nuclei wrap around its ids).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from histosynth.data.io import child_dir, list_images, read_label_png, read_rgb, validate_record
from histosynth.data.record import NucleiRecord
from histosynth.errors import DataError

LABEL_EXTS = (".png", ".tif", ".tiff")
INSTANCE_ONLY_CLASS = "nucleus"
_EIGHT_BIT = {"1", "L", "P"}


def read_class_names(path: Path) -> tuple[str, ...]:
    """Class names from classes.txt; blank lines may only trail, since line numbers are type ids."""
    if not path.is_file():
        raise DataError("classes.txt missing: add it (one class name per line) or pass class_names", path)
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read class names: {err}", path) from None
    names = [line.strip() for line in lines]
    while names and not names[-1]:
        names.pop()
    return _checked(names, path)


def _checked(names: Sequence[str], path: Path) -> tuple[str, ...]:
    if not names:
        raise DataError("no class names given", path)
    if "" in names:
        raise DataError(f"class name on line {list(names).index('') + 1} is empty (line k names type id k)", path)
    if len(set(names)) != len(names):
        raise DataError(f"class names repeat: {list(names)}", path)
    return tuple(names)


def _label(folder: Path, stem: str) -> Path | None:
    return next((folder / f"{stem}{ext}" for ext in LABEL_EXTS if (folder / f"{stem}{ext}").is_file()), None)


def _pairs(src: Path) -> list[tuple[Path, Path | None, Path | None, str]]:
    """(image, instance label, type label, stem of the expected label) for the flat or sub-folder layout."""
    images_dir = child_dir(src, "images")
    if images_dir is not None:
        inst_dir, type_dir = src / "instances", src / "types"
        return [(p, _label(inst_dir, p.stem), _label(type_dir, p.stem), p.stem) for p in list_images(images_dir)]
    return [
        (p, _label(src, f"{p.stem}_inst"), _label(src, f"{p.stem}_type"), p.stem)
        for p in list_images(src, exclude_suffixes=("_inst", "_type"))
    ]


def read_folder(
    src: str | Path, class_names: Sequence[str] | None = None, magnification: str | None = None,
    relabel_components: bool = False,
) -> Iterator[NucleiRecord]:
    """Stream labelled images from a folder; ``class_names`` overrides classes.txt (one is required, except for an
    instance-only folder: see the module docstring). ``relabel_components``: see
    :func:`histosynth.data.io.validate_record`."""
    src = Path(src)
    if not src.is_dir():
        raise DataError("source folder not found", src)
    items = _pairs(src)
    if not items:
        raise DataError("no images (.png/.jpg/.jpeg/.tif/.tiff) found in this folder or its images/ folder", src)
    instance_only = all(typ is None for _, _, typ, _ in items)
    if instance_only:
        names = _instance_only_names(src, class_names)
    else:
        names = _checked(list(class_names), src) if class_names is not None else read_class_names(src / "classes.txt")
    flat = child_dir(src, "images") is None
    for img, inst, typ, stem in items:
        for label, kind, sub in ((inst, "inst", "instances"), (typ, "type", "types")):
            if label is None and not (kind == "type" and instance_only):
                expected = src / f"{stem}_{kind}.png" if flat else src / sub / f"{stem}.png"
                raise DataError(f"label file missing for image {img.name}", expected)
    return _records(items, names, magnification, relabel_components)


def _instance_only_names(src: Path, class_names: Sequence[str] | None) -> tuple[str, ...]:
    """The one class of an instance-only folder: ``nucleus`` unless class_names / classes.txt name one."""
    if class_names is not None:
        names, where = _checked(list(class_names), src), src
    elif (src / "classes.txt").is_file():
        names, where = read_class_names(src / "classes.txt"), src / "classes.txt"
    else:
        return (INSTANCE_ONLY_CLASS,)
    if len(names) != 1:
        raise DataError(f"no type maps found (no NAME_type.png or types/ folder), so every nucleus has one class, but "
                        f"{len(names)} classes are declared ({', '.join(names)}): declare one class or add the type "
                        "maps", where)
    return names


def _eight_bit_hint(path: Path) -> str:
    """Why an instance file may be wrong: an 8-bit file holds ids up to 255 only."""
    try:
        with Image.open(path) as im:
            mode = im.mode
    except OSError:
        return ""
    if mode not in _EIGHT_BIT:
        return ""
    return (f"{path.name} is an 8-bit image: if it held more than 255 nuclei, their ids wrapped around past 255 "
            "when it was saved (save instance maps as 16-bit PNG)")


def _records(items: list, names: tuple[str, ...], magnification: str | None,
             relabel_components: bool = False) -> Iterator[NucleiRecord]:
    for img, inst, typ, _ in items:
        inst_map = read_label_png(inst)
        type_map = read_label_png(typ) if typ is not None else (inst_map > 0).astype(np.int32)
        record = NucleiRecord(
            image=read_rgb(img), inst_map=inst_map, type_map=type_map, class_names=names,
            source=str(img), split=None, magnification=magnification,
        )
        # validate_record checks inst_map first: name the instance file if it is the culprit, else the type file
        culprit = inst if typ is None or record.inst_map.shape != record.image.shape[:2] else typ
        yield validate_record(record, label_path=culprit, relabel_components=relabel_components,
                              hint=_eight_bit_hint(inst), instance_path=inst)
