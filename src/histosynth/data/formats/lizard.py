"""Lizard: whole colon tissue regions at 20x, ``Lizard_Images*/NAME.png`` + ``Labels/NAME.mat``.

A Lizard .mat file has ``inst_map`` and, per nucleus, its instance ``id`` and its ``class``: the type
map is not stored, so it is built by mapping each instance id to its class. The release spreads
images over several folders (Lizard_Images1, Lizard_Images2), so image and label folders are searched.

Layout check (every file): ``id`` and ``class`` have one entry per nucleus, ids are positive and listed once (or
repeated with the same class), every instance of ``inst_map`` is listed, and classes are Lizard's 1..6.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from histosynth.data.io import as_int_labels, list_images, read_mat, read_rgb, validate_record
from histosynth.data.record import NucleiRecord
from histosynth.errors import DataError

CLASSES = ("neutrophil", "epithelial", "lymphocyte", "plasma", "eosinophil", "connective")


def _is_image_dir(name: str) -> bool:
    name = name.lower()
    return name == "images" or name.startswith("lizard_images")


def _walk(src: Path) -> tuple[list[Path], dict[str, Path]]:
    """All images in image folders, and every .mat file below SRC by stem."""
    images, labels = [], {}
    for root, dirs, files in os.walk(src):
        dirs.sort()
        root = Path(root)
        if _is_image_dir(root.name):
            images += list_images(root)
        for f in sorted(files):
            if f.lower().endswith(".mat"):
                stem = f[:-4]
                if stem in labels:
                    raise DataError(f"two label files for {stem!r}: {labels[stem]} and this one", root / f)
                labels[stem] = root / f
    return images, labels


def read_lizard(src: str | Path, relabel_components: bool = False) -> Iterator[NucleiRecord]:
    """Stream Lizard regions (20x, no split of their own); ``relabel_components``: see
    :func:`histosynth.data.io.validate_record`."""
    src = Path(src)
    images, labels = _walk(src)
    if not images:
        raise DataError("no Lizard images found: expected images/ or Lizard_Images*/ folders of .png files", src)
    items = []
    for img in images:
        if img.stem not in labels:
            raise DataError(f"label file missing for image {img}: no {img.stem}.mat below the source folder", src)
        items.append((img, labels[img.stem]))
    return _records(items, relabel_components)


def type_map_from_ids(inst: np.ndarray, ids: np.ndarray, classes: np.ndarray, path: Path) -> np.ndarray:
    """Per-pixel types from Lizard's per-instance (id, class) lists."""
    if ids.size != classes.size:
        raise DataError(f"'id' has {ids.size} entries but 'class' has {classes.size}", path)
    if ids.size and ids.min() < 1:
        raise DataError(f"'id' holds instance id {int(ids.min())}; ids start at 1", path)
    bad = np.unique(classes[(classes < 1) | (classes > len(CLASSES))])
    if bad.size:
        raise DataError(f"'class' holds {bad[:10].tolist()}, outside Lizard's classes 1..{len(CLASSES)} "
                        f"({', '.join(f'{i}={n}' for i, n in enumerate(CLASSES, 1))})", path)
    order = np.argsort(ids, kind="stable")
    same = ids[order][1:] == ids[order][:-1]
    clash = same & (classes[order][1:] != classes[order][:-1])
    if clash.any():
        k = int(ids[order][1:][clash][0])
        raise DataError(f"'id' lists instance {k} more than once with different classes "
                        f"({sorted(set(classes[ids == k].tolist()))})", path)
    missing = np.setdiff1d(np.unique(inst[inst > 0]), ids)
    if missing.size:
        raise DataError(f"instances {missing[:10].tolist()} of inst_map have no entry in 'id'/'class'", path)
    lut = np.zeros(max(int(inst.max(initial=0)), int(ids.max(initial=0))) + 1, dtype=np.int32)
    lut[ids] = classes
    return lut[inst]


def _records(items: list, relabel_components: bool = False) -> Iterator[NucleiRecord]:
    for img_path, label_path in items:
        mat = read_mat(label_path, ("inst_map", "id", "class"))
        inst = as_int_labels(mat["inst_map"], "inst_map", label_path)
        ids = as_int_labels(mat["id"], "id", label_path).ravel()
        cls = as_int_labels(mat["class"], "class", label_path).ravel()
        if inst.ndim == 2 and inst.size and inst.min() < 0:
            raise DataError("inst_map has negative ids", label_path)
        typ = type_map_from_ids(inst, ids, cls, label_path)
        record = NucleiRecord(
            image=read_rgb(img_path), inst_map=inst, type_map=typ, class_names=CLASSES, source=str(img_path),
            split=None, magnification="20x",
        )
        yield validate_record(record, label_path=label_path, relabel_components=relabel_components)
