"""A plain folder of images with instance and type label PNGs: the format for users' own data.

Flat: ``NAME.jpg`` + ``NAME_inst.png`` + ``NAME_type.png``; or split into ``images/NAME.jpg``,
``instances/NAME.png``, ``types/NAME.png``. ``classes.txt`` gives one class name per line
(line k is type id k). Nothing here states the magnification, so it is an option.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

from histosynth.data.io import child_dir, list_images, read_label_png, read_rgb, validate_record
from histosynth.data.record import NucleiRecord
from histosynth.errors import DataError

LABEL_EXTS = (".png", ".tif", ".tiff")


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
    src: str | Path, class_names: Sequence[str] | None = None, magnification: str | None = None
) -> Iterator[NucleiRecord]:
    """Stream labelled images from a folder; ``class_names`` overrides classes.txt (one is required)."""
    src = Path(src)
    if not src.is_dir():
        raise DataError("source folder not found", src)
    names = _checked(list(class_names), src) if class_names is not None else read_class_names(src / "classes.txt")
    items = _pairs(src)
    if not items:
        raise DataError("no images (.png/.jpg/.jpeg/.tif/.tiff) found in this folder or its images/ folder", src)
    flat = child_dir(src, "images") is None
    for img, inst, typ, stem in items:
        for label, kind, sub in ((inst, "inst", "instances"), (typ, "type", "types")):
            if label is None:
                expected = src / f"{stem}_{kind}.png" if flat else src / sub / f"{stem}.png"
                raise DataError(f"label file missing for image {img.name}", expected)
    return _records(items, names, magnification)


def _records(items: list, names: tuple[str, ...], magnification: str | None) -> Iterator[NucleiRecord]:
    for img, inst, typ, _ in items:
        record = NucleiRecord(
            image=read_rgb(img), inst_map=read_label_png(inst), type_map=read_label_png(typ), class_names=names,
            source=str(img), split=None, magnification=magnification,
        )
        # validate_record checks inst_map first: name the instance file if it is the culprit, else the type file
        culprit = inst if record.inst_map.shape != record.image.shape[:2] else typ
        yield validate_record(record, label_path=culprit)
