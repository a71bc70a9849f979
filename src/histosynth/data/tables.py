"""Tables users bring (CSV, TSV, JSON, JSONL) as rows of dicts: report tables, patch probabilities, captions."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

from histosynth.errors import DataError

__all__ = ["numbered_json_lines", "read_rows"]


def read_rows(path: str | os.PathLike, what: str = "table", *, columns: Sequence[str] = (),
              allow_empty: bool = True) -> list[dict]:
    """Rows of a CSV or TSV (header row; values are strings), a JSON list (or ``{"rows"/"patches": [...]}``) or a
    JSONL file, as dicts. ``what`` names the file in errors ("caption table"); ``columns`` must be in the first row.

    Raises:
        DataError: the file is missing, unreadable or not one of these shapes, has no rows (unless ``allow_empty``)
            or lacks one of ``columns`` (naming the file).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{what} not found", path)
    rows = _rows(path)
    if not rows and not allow_empty:
        raise DataError(f"the {what} has no rows", path)
    missing = [c for c in columns if rows and c not in rows[0]]
    if missing:
        raise DataError(f"the {what} has no column(s) {missing}; it has {sorted(rows[0])}", path)
    return rows


def _rows(path: Path) -> list[dict]:
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv"):
            with open(path, newline="", encoding="utf-8-sig") as f:
                return [dict(r) for r in csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")]
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"unreadable table: {exc}", path) from None
    try:
        data = [json.loads(line) for line in text.splitlines() if line.strip()] if suffix == ".jsonl" else json.loads(text)
    except ValueError as exc:
        raise DataError(f"invalid JSON: {exc}", path) from None
    if isinstance(data, dict):
        for key in ("rows", "patches"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError("expected a list of objects (one per row)", path)
    return data


def numbered_json_lines(path: str | os.PathLike) -> list[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line of a JSON-lines file.

    Raises:
        DataError: a line that is not JSON (naming the file and the line).
    """
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((n, json.loads(line)))
        except ValueError as exc:
            raise DataError(f"line {n} is not JSON: {exc}", path) from None
    return out
