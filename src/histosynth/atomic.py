"""Outputs that appear whole or not at all: a folder is built under a hidden sibling name and renamed into place."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``out`` to write into; when the block ends without an error it replaces
    ``out`` (a folder, file or link already there is removed: check ``--overwrite`` before entering), and on an
    error it is deleted, so ``out`` is either the complete new output or untouched."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()
    try:
        yield partial
        if out.exists() or out.is_symlink():
            shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
        os.replace(partial, out)
    finally:
        if partial.exists():
            shutil.rmtree(partial)
