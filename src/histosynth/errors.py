"""User-facing errors.

A ``HistosynthError`` is a problem with what the user gave us (a file, a flag, a recipe) or with where they asked
us to write (a full disk: ``DiskFullError``), not a bug: the CLI prints its message and exits with status 2, without
a traceback. Always name the file.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path


class HistosynthError(Exception):
    """An error caused by user input; the message must say which file or option and what is wrong."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        self.message = message  # without the path, for callers that re-raise it with more context
        super().__init__(f"{self.path}: {message}" if self.path else message)


class DataError(HistosynthError):
    """A dataset file is missing, unreadable, corrupt or inconsistent."""


class OutputExistsError(HistosynthError):
    """An output already exists and --overwrite was not given."""


class TrainingError(HistosynthError):
    """Training cannot go on (e.g. a NaN loss); the last good checkpoint is kept."""


class DiskFullError(HistosynthError):
    """The disk (or the user's quota) filled up while writing an output. The message names the output, the space
    it needs and the space free there; the writer has removed its temporary files and left earlier outputs as
    they were, so the same command can be run again (``train --resume``: from the last complete checkpoint) once
    space is free."""

    def __init__(self, path: str | Path, what: str, needed: int | None = None, *, at_least: bool = False,
                 free: int | None = None, then: str = "free some space there (or write elsewhere) and run it again"):
        self.what, self.needed, self.at_least = what, needed, at_least
        if free is None:
            free = free_bytes(path)
        if needed is None:
            need = ""
        else:
            need = f": it needs {'at least ' if at_least else 'about '}{format_bytes(needed)}"
        room = "" if free is None else f" ({format_bytes(free)} free)"
        super().__init__(f"no space left on the device for {what}{need}{room}; {then}", path)


# errno values meaning "no room to write": ENOSPC and EDQUOT (disk quota exceeded)
_FULL_ERRNOS = frozenset(n for n in (getattr(errno, "ENOSPC", None), getattr(errno, "EDQUOT", None)) if n)
# how writers that lose the errno say it: the OS's text (numpy/Python), Rust's "os error 28" (safetensors)
_FULL_WORDS = ("no space left on device", "disk quota exceeded", "os error 28", "os error 122", "storagefull")
_SMALL_FREE = 4 << 20  # a failed write with less than this free is a full disk whatever the writer said


def is_disk_full(exc: BaseException, where: str | Path | None = None, needed: int | None = None) -> bool:
    """Whether ``exc`` raised by a writer means the disk is full.

    An ``OSError`` with errno ENOSPC / EDQUOT, or a message that says so (safetensors' Rust error). Writers that
    lose the cause (``np.save``'s "N requested and M written", ``torch.save``'s "unexpected pos") count when
    ``where`` has less than 4 MiB free, or less than ``needed`` bytes.
    """
    if isinstance(exc, HistosynthError):
        return isinstance(exc, DiskFullError)
    for e in _causes(exc):
        if isinstance(e, OSError) and e.errno in _FULL_ERRNOS:
            return True
        if any(word in str(e).lower() for word in _FULL_WORDS):
            return True
    if where is None:
        return False
    if not isinstance(exc, (OSError, RuntimeError)) and type(exc).__name__ != "SafetensorError":
        return False
    free = free_bytes(where)
    return free is not None and (free < _SMALL_FREE or (needed is not None and free < needed))


def _causes(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ if exc.__cause__ is not None or exc.__suppress_context__ else exc.__context__


def free_bytes(path: str | Path) -> int | None:
    """Bytes free to this user on the file system of ``path`` (its nearest existing parent); None if unknown."""
    p = Path(path).absolute()
    for candidate in (p, *p.parents):
        if candidate.exists():
            try:
                return shutil.disk_usage(candidate).free
            except OSError:
                return None
    return None


def tree_bytes(path: str | Path) -> int:
    """Bytes of the files under ``path`` (a file: its size; missing: 0)."""
    p = Path(path)
    try:
        if p.is_file():
            return p.stat().st_size
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    except OSError:
        return 0


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
