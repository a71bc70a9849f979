"""User-facing errors.

A ``HistosynthError`` is a problem with what the user gave us (a file, a flag, a recipe), not a bug:
the CLI prints its message and exits with status 2, without a traceback. Always name the file.
"""

from __future__ import annotations

from pathlib import Path


class HistosynthError(Exception):
    """An error caused by user input; the message must say which file or option and what is wrong."""

    def __init__(self, message: str, path: str | Path | None = None):
        self.path = None if path is None else str(path)
        super().__init__(f"{self.path}: {message}" if self.path else message)


class DataError(HistosynthError):
    """A dataset file is missing, unreadable, corrupt or inconsistent."""


class OutputExistsError(HistosynthError):
    """An output already exists and --overwrite was not given."""


class TrainingError(HistosynthError):
    """Training cannot go on (e.g. a NaN loss); the last good checkpoint is kept."""
