"""Outputs that appear whole or not at all: a folder is built under a hidden sibling name and renamed into place."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from histosynth.errors import DiskFullError, OutputExistsError, is_disk_full, tree_bytes


def refuse_existing(path: str | Path, overwrite: bool, what: str = "output") -> None:
    """Before any work: OutputExistsError naming ``path`` when something is there — a file, a folder or a link,
    a dangling one too (writing would replace it) — and ``overwrite`` is false. ``what`` starts the message."""
    path = Path(path)
    if not overwrite and (path.exists() or path.is_symlink()):
        raise OutputExistsError(f"{what} already exists; pass --overwrite (overwrite=True) to replace it", path)


@contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``out`` to write into; when the block ends without an error it replaces
    ``out`` (a folder, file or link already there is removed: check ``--overwrite`` before entering), and on an
    error it is deleted, so ``out`` is either the complete new output or untouched. A full disk (or quota) is a
    ``DiskFullError`` naming ``out`` and at least the space the output had reached."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.parent / f".{out.name}.partial-{os.getpid()}"
    if partial.exists():
        shutil.rmtree(partial)
    try:
        partial.mkdir()
        yield partial
        if out.exists() or out.is_symlink():
            shutil.rmtree(out) if out.is_dir() and not out.is_symlink() else out.unlink()
        os.replace(partial, out)
    except DiskFullError:  # said already, by an inner writer
        raise
    except Exception as exc:
        if not is_disk_full(exc):  # the block runs more than writers (a model, say): only what says ENOSPC
            raise
        reached = tree_bytes(partial)
        shutil.rmtree(partial, ignore_errors=True)
        raise DiskFullError(out, "this output", reached or None, at_least=True) from None
    finally:
        if partial.exists():
            shutil.rmtree(partial)
