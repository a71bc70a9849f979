"""CoNSeP in the HoVer-Net layout: ``{train,test}/images/NAME.png|jpg`` + ``labels/NAME.mat``.

The .mat files hold ``inst_map``, ``type_map`` and ``inst_type``. Published CoNSeP labels use 7 types;
HoVer-Net (and most later work) merges them into 4, which is what the patches in shared/data hold.
Both label sets use small integers, so the ``classes`` option must say which one the files are in.
A ``classes.txt`` (one class name per line, line k names type id k, as in the folder format) in the folder
that holds ``images/`` and ``labels/``, or in SRC above ``train/`` and ``test/``, declares the classes instead:
sets written by :func:`histosynth.data.formats.writers.write_hovernet_item` with any class names read back.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from histosynth.data.formats.folder import read_class_names
from histosynth.data.io import as_int_labels, child_dir, list_images, read_mat, read_rgb, validate_record
from histosynth.data.record import NucleiRecord
from histosynth.errors import DataError

MERGED = ("other", "inflammatory", "epithelial", "spindle-shaped")
ORIGINAL = (
    "other", "inflammatory", "healthy epithelial", "dysplastic/malignant epithelial",
    "fibroblast", "muscle", "endothelial",
)
# HoVer-Net's merge of the 7 original types: 3,4 -> epithelial; 5,6,7 -> spindle-shaped.
MERGE_LUT = np.array([0, 1, 2, 3, 3, 4, 4, 4], dtype=np.int32)
CLASS_OPTIONS = ("merged", "original", "merge-original")
SPLITS = ("train", "test")


def _split_dirs(src: Path) -> list[tuple[Path, str | None]]:
    """(split folder, split) pairs: SRC/{train,test}/ or SRC itself when it is one split folder."""
    pairs = [(d, s) for s in SPLITS if (d := child_dir(src, s)) is not None and child_dir(d, "images")]
    if pairs:
        return pairs
    if child_dir(src, "images"):
        return [(src, src.name.lower() if src.name.lower() in SPLITS else None)]
    raise DataError("no CoNSeP images found: expected train/images/, test/images/ or images/ in this folder", src)


def read_consep(src: str | Path, classes: str = "merged") -> Iterator[NucleiRecord]:
    """Stream CoNSeP records (40x). ``classes``: "merged" (4 types), "original" (7) or "merge-original".

    With a ``classes.txt`` beside the labels (see the module docstring), "merged" — the default — reads the
    classes it declares; "original" and "merge-original" then require it to name the 7 original CoNSeP types.
    """
    src = Path(src)
    if classes not in CLASS_OPTIONS:
        raise DataError(f"unknown CoNSeP classes option {classes!r}; expected one of {CLASS_OPTIONS}", src)
    split_dirs = _split_dirs(src)
    declared = _declared_classes(src, [folder for folder, _ in split_dirs])
    if declared is not None and classes != "merged" and declared[0] != ORIGINAL:
        raise DataError(
            f"classes.txt declares {list(declared[0])}, but classes={classes!r} reads the 7 original CoNSeP types; "
            "use the default classes='merged' to read the declared classes", declared[1],
        )
    items = []
    for folder, split in split_dirs:
        images = list_images(child_dir(folder, "images"))
        labels = child_dir(folder, "labels")
        for img in images:
            label = (labels or folder / "labels") / f"{img.stem}.mat"
            if not label.is_file():
                raise DataError(f"label file missing for image {img.name}", label)
            items.append((img, label, split))
    if not items:
        raise DataError("no CoNSeP images (.png/.jpg) found in the images/ folder(s)", src)
    return _records(items, classes, declared)


def _declared_classes(src: Path, folders: list[Path]) -> tuple[tuple[str, ...], Path] | None:
    """(class names, file) of the classes.txt in the split folders or SRC, or None; split folders must agree."""
    found = {}
    for folder in dict.fromkeys([*folders, src]):
        path = folder / "classes.txt"
        if path.is_file():
            found[path] = read_class_names(path)
    if not found:
        return None
    (first, names), *rest = found.items()
    for path, other in rest:
        if other != names:
            raise DataError(f"classes.txt files disagree: {list(names)} in {first} but {list(other)} here", path)
    return names, first


def _records(items: list, classes: str, declared: tuple[tuple[str, ...], Path] | None) -> Iterator[NucleiRecord]:
    names = MERGED if classes == "merged" else ORIGINAL if classes == "original" else MERGED
    file_types = len(MERGED) if classes == "merged" else len(ORIGINAL)
    if declared is not None and classes == "merged":
        names = declared[0]
        file_types = len(names)
    for img_path, label_path, split in items:
        mat = read_mat(label_path, ("inst_map", "type_map"))
        inst = as_int_labels(mat["inst_map"], "inst_map", label_path)
        typ = as_int_labels(mat["type_map"], "type_map", label_path)
        inst_type = as_int_labels(mat.get("inst_type", np.zeros(0)), "inst_type", label_path).ravel()
        ids = np.concatenate([typ.ravel(), inst_type])
        if declared is not None and classes == "merged":
            _check_declared_ids(ids, names, declared[1], label_path)
        else:
            _check_type_ids(ids, file_types, classes, label_path)
        if classes == "merge-original":
            typ = MERGE_LUT[typ]
        record = NucleiRecord(
            image=read_rgb(img_path), inst_map=inst, type_map=typ, class_names=names, source=str(img_path),
            split=split, magnification="40x",
        )
        yield validate_record(record, label_path=label_path)


def _check_declared_ids(ids: np.ndarray, names: tuple[str, ...], classes_file: Path, path: Path) -> None:
    bad = np.unique(ids[(ids < 0) | (ids > len(names))])
    if bad.size:
        shown = int(bad[0]) if bad.size == 1 else bad.tolist()
        raise DataError(f"type id {shown} is outside the classes 0..{len(names)} declared in {classes_file}", path)


def _check_type_ids(ids: np.ndarray, file_types: int, classes: str, path: Path) -> None:
    """Out-of-range ids usually mean the wrong ``classes`` option, so say which one fits."""
    bad = np.unique(ids[(ids < 0) | (ids > file_types)])
    if bad.size == 0:
        return
    hint = (
        "these look like the original 7-type CoNSeP labels: use classes='merge-original' (or 'original')"
        if classes == "merged" and bad.min() > 0 and bad.max() <= len(ORIGINAL) else
        f"CoNSeP has at most {len(ORIGINAL)} types; check that this is a CoNSeP label file"
    )
    shown = int(bad[0]) if bad.size == 1 else bad.tolist()
    raise DataError(f"type id {shown} is outside the {classes!r} CoNSeP classes 0..{file_types}; {hint}", path)
