"""CoNSeP in the HoVer-Net layout: ``{train,test}/images/NAME.png|jpg`` + ``labels/NAME.mat``.

The .mat files hold ``inst_map``, ``type_map`` and ``inst_type``. Published CoNSeP labels use 7 types;
HoVer-Net (and most later work) merges them into 4, which is what the patches in shared/data hold.
Both label sets use small integers, so the ``classes`` option must say which one the files are in.
A ``classes.txt`` (one class name per line, line k names type id k, as in the folder format) in the folder
that holds ``images/`` and ``labels/``, or in SRC above ``train/`` and ``test/``, declares the classes instead:
sets written by :func:`histosynth.data.formats.writers.write_hovernet_item` with any class names read back.

Layout check (every file, when ``inst_type`` is present): row k-1 of ``inst_type`` is the type of instance k, so it
has one row per instance up to the largest id of ``inst_map`` (ids are 1..N in HoVer-Net's files; gaps are accepted
as long as the largest id matches the rows), and for at most :data:`DISAGREE_TOLERANCE` (10 %) of the typed
instances may ``inst_type`` differ from the majority type of the instance's pixels in ``type_map`` (on the real
CoNSeP patches none does): more means the arrays do not belong together.
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
DISAGREE_TOLERANCE = 0.10


def _split_dirs(src: Path) -> list[tuple[Path, str | None]]:
    """(split folder, split) pairs: SRC/{train,test}/ or SRC itself when it is one split folder."""
    pairs = [(d, s) for s in SPLITS if (d := child_dir(src, s)) is not None and child_dir(d, "images")]
    if pairs:
        return pairs
    if child_dir(src, "images"):
        return [(src, src.name.lower() if src.name.lower() in SPLITS else None)]
    raise DataError("no CoNSeP images found: expected train/images/, test/images/ or images/ in this folder", src)


def read_consep(src: str | Path, classes: str = "merged", relabel_components: bool = False) -> Iterator[NucleiRecord]:
    """Stream CoNSeP records (40x). ``classes``: "merged" (4 types), "original" (7) or "merge-original".

    With a ``classes.txt`` beside the labels (see the module docstring), "merged" — the default — reads the
    classes it declares; "original" and "merge-original" then require it to name the 7 original CoNSeP types.
    ``relabel_components``: see :func:`histosynth.data.io.validate_record`.
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
    return _records(items, classes, declared, relabel_components)


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


def _records(items: list, classes: str, declared: tuple[tuple[str, ...], Path] | None,
             relabel_components: bool = False) -> Iterator[NucleiRecord]:
    names = MERGED if classes == "merged" else ORIGINAL if classes == "original" else MERGED
    file_types = len(MERGED) if classes == "merged" else len(ORIGINAL)
    if declared is not None and classes == "merged":
        names = declared[0]
        file_types = len(names)
    for img_path, label_path, split in items:
        mat = read_mat(label_path, ("inst_map", "type_map"))
        inst = as_int_labels(mat["inst_map"], "inst_map", label_path)
        typ = as_int_labels(mat["type_map"], "type_map", label_path)
        has_inst_type = "inst_type" in mat
        inst_type = as_int_labels(mat.get("inst_type", np.zeros(0)), "inst_type", label_path).ravel()
        ids = np.concatenate([typ.ravel(), inst_type])
        if declared is not None and classes == "merged":
            _check_declared_ids(ids, names, declared[1], label_path)
        else:
            _check_type_ids(ids, file_types, classes, label_path)
        if has_inst_type and inst.ndim == 2 and typ.shape == inst.shape:
            check_inst_type(inst, typ, inst_type, label_path)
        if classes == "merge-original":
            typ = MERGE_LUT[typ]
        record = NucleiRecord(
            image=read_rgb(img_path), inst_map=inst, type_map=typ, class_names=names, source=str(img_path),
            split=split, magnification="40x",
        )
        yield validate_record(record, label_path=label_path, relabel_components=relabel_components)


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


def check_inst_type(inst: np.ndarray, typ: np.ndarray, inst_type: np.ndarray, path: Path) -> None:
    """Refuse an ``inst_type`` that does not belong to ``inst_map`` / ``type_map`` (see the module docstring)."""
    if inst.size and inst.min() < 0:
        return  # validate_record names negative ids
    top = int(inst.max(initial=0))
    if inst_type.size != top:
        n_ids = int(np.unique(inst[inst > 0]).size)
        gaps = f" ({n_ids} distinct ids)" if n_ids != top else ""
        raise DataError(f"inst_type has {inst_type.size} rows but inst_map's largest instance id is {top}{gaps}: "
                        "row k-1 of inst_type is the type of instance k, so they must match", path)
    on = (inst > 0) & (typ > 0)
    if top == 0 or not on.any():
        return
    k1 = int(max(typ.max(), inst_type.max(initial=0))) + 1
    votes = np.bincount(inst[on] * k1 + typ[on], minlength=(top + 1) * k1).reshape(top + 1, k1)[1:]
    typed = votes.max(1) > 0
    agree = votes[np.arange(top), inst_type] == votes.max(1)  # ties: any of the most frequent types agrees
    wrong = np.flatnonzero(typed & ~agree)
    if wrong.size > DISAGREE_TOLERANCE * np.count_nonzero(typed):
        k = int(wrong[0])
        raise DataError(f"inst_type disagrees with type_map for {wrong.size} of {int(np.count_nonzero(typed))} typed "
                        f"instances (e.g. instance {k + 1}: inst_type {int(inst_type[k])}, type_map mostly "
                        f"{int(votes[k].argmax())}); up to {100 * DISAGREE_TOLERANCE:g} % is accepted", path)
