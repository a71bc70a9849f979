"""Image sources: a folder of image files, or a histosynth patch store.

A *folder* is searched recursively (hidden folders skipped) and its files are sorted by relative path. By
default the files matching ``*.png, *.jpg, *.jpeg, *.tif, *.tiff`` (case-insensitive) whose name does **not**
contain ``mask`` are images (so ``x_mask.png`` label images next to the tiles are left out); ``patterns`` /
``exclude`` change that. ``split`` selects the sub-folder ``source/split`` (e.g. ``consep`` + ``train``).

A *patch store* is a folder holding ``store.json`` (:data:`STORE_MARKER`); ``split`` selects the store's split.

Used by the distribution metrics (:mod:`histosynth.evaluate.fid`) and ``histosynth seg predict``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from histosynth.errors import DataError, HistosynthError

__all__ = [
    "STORE_MARKER",
    "DEFAULT_PATTERNS",
    "DEFAULT_EXCLUDE",
    "image_patterns",
    "is_store",
    "resolve_image_folder",
    "list_images",
    "open_store_split",
    "count_images",
    "load_image",
]

#: glob patterns (lower case) of the files of a folder that are images
DEFAULT_PATTERNS: tuple[str, ...] = ("*.png", "*.jpg", "*.jpeg", "*.tif", "*.tiff")
#: files whose lower-case name contains one of these are not images (label masks next to the tiles)
DEFAULT_EXCLUDE: tuple[str, ...] = ("mask",)
#: the file that makes a folder a patch store
STORE_MARKER = "store.json"


def image_patterns(patterns: str | Sequence[str] | None) -> tuple[str, ...]:
    """Lower-case glob patterns from a comma-separated string or a sequence; ``None`` gives :data:`DEFAULT_PATTERNS`.

    Raises:
        HistosynthError: no pattern left after stripping blanks.
    """
    if patterns is None:
        return DEFAULT_PATTERNS
    if isinstance(patterns, str):
        patterns = patterns.split(",")
    out = tuple(p.strip().lower() for p in patterns if p.strip())
    if not out:
        raise HistosynthError(f"no image pattern given ({patterns!r})")
    return out


def is_store(path: str | Path) -> bool:
    """True when ``path`` is a patch store (a folder holding :data:`STORE_MARKER`)."""
    return (Path(path) / STORE_MARKER).is_file()


def resolve_image_folder(source: str | Path, split: str | None) -> Path:
    """The folder to read: ``source`` itself (a store, or a folder without ``split``) or its ``split`` sub-folder.

    Raises:
        DataError: ``source`` does not exist or is not a folder, or an image folder has no sub-folder ``split``.
    """
    root = Path(source).expanduser()
    if not root.exists():
        raise DataError("image source does not exist", root)
    if not root.is_dir():
        raise DataError("image source must be a folder of images or a patch store (a folder with store.json)", root)
    if split is not None and not is_store(root):
        sub = root / split
        if not sub.is_dir():
            raise DataError(f"no split sub-folder {split!r} in this image folder", root)
        return sub
    return root


def list_images(
    source: str | Path,
    split: str | None = None,
    patterns: str | Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> list[Path]:
    """Image files of a folder (recursive, sorted by relative path); see the module docstring for the selection.

    Raises:
        DataError: as :func:`resolve_image_folder`.
        HistosynthError: ``patterns`` holds no pattern.
    """
    folder = resolve_image_folder(source, split)
    pats = image_patterns(patterns)
    excl = tuple(e.lower() for e in exclude)
    files = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file():
            continue
        name = p.name.lower()
        if any(fnmatch.fnmatchcase(name, pat) for pat in pats) and not any(e in name for e in excl):
            files.append(p)
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def open_store_split(root: str | Path, split: str | None):
    """A patch store and the indices of its ``split`` (all patches for ``None``): ``(PatchStore, list[int])``.

    ``store[i]["image"]`` is the uint8 ``(H, W, 3)`` image of patch ``i``.
    """
    from histosynth.data.store import PatchStore  # lazily: the store module is optional for folder sources

    store = PatchStore(root)
    return store, list(store.indices(split))


def count_images(
    source: str | Path,
    split: str | None = None,
    patterns: str | Sequence[str] | None = None,
    exclude: Sequence[str] = DEFAULT_EXCLUDE,
) -> int:
    """Number of images of a source: the patches of a store's split, or the files :func:`list_images` finds."""
    root = resolve_image_folder(source, split)
    if is_store(root):
        return len(open_store_split(root, split)[1])
    return len(list_images(root, None, patterns, exclude))


def load_image(path: str | Path) -> np.ndarray:
    """One image file as RGB ``uint8 (H, W, 3)``, by the project's one rule (:func:`histosynth.data.io.to_rgb_uint8`:
    16-bit scaled, grey / palette replicated, alpha over white).

    Raises:
        DataError: the file cannot be read as an image (the message names the file).
    """
    from histosynth.data.io import read_rgb

    return read_rgb(path)