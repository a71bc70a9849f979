"""Captions as training conditions: match the rows of a captions file to the patches of a store, and give
each row its class for PathLDM's class-conditional baseline.

A captions file is what ``histosynth captions build`` writes (JSONL, one row per caption): label captions
carry the store ``index`` (plus ``source``, ``y``, ``x`` and the nuclei ``counts``), PathLDM captions carry
``patch`` / ``slide`` and the ``tumor_prob`` / ``til_prob`` they were made from. A row finds its patch by

1. ``index``: the store index (checked against the row's ``source``/``y``/``x`` when it has them, so a
   captions file of another store is refused);
2. else ``slide`` (or ``source``) with ``x`` and ``y``: the patch of that slide (path, file name or stem,
   or the manifest's ``slide`` field) at those level-0 coordinates;
3. else ``patch`` holding a store index ("17").

Several rows may name the same patch (e.g. PathLDM's 5 summaries per slide): the trainer draws one per step.

Classes (:class:`ClassRule`): a row's ``class`` field when it has one; else PathLDM's 4 classes from
``tumor_prob`` / ``til_prob`` (0.5 threshold; :func:`~histosynth.conditions.captions.tumor_til_class`);
else, for label-captioned stores without probabilities (CoNSeP, Lizard, ...), the same 2 × 2 classes from
nuclei counts: "high tumor" is ``counts[tumor_type] >= count_threshold`` (default: 10 or more epithelial
nuclei, the label captions' "many"), "high til" is ``counts[til_type] >= count_threshold`` (inflammatory).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from histosynth.errors import DataError, HistosynthError

__all__ = ["ClassRule", "match_captions", "read_caption_rows", "read_prompts"]


def read_caption_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a captions JSONL (or a JSON list of objects)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("captions file not found (make one with `histosynth captions build`)", path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"unreadable captions file: {exc}", path) from None
    rows = []
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
            rows = data if isinstance(data, list) else []
        else:
            for line in text.splitlines():
                if line.strip():
                    rows.append(json.loads(line))
    except ValueError as exc:
        raise DataError(f"invalid JSON: {exc}", path) from None
    if not rows or not all(isinstance(r, dict) for r in rows):
        raise DataError("expected one JSON object per line (the output of `histosynth captions build`)", path)
    return rows


def _coordinate_index(store) -> dict[tuple[str, int, int], int]:
    """(slide key, y, x) -> store index, under every name a slide may be given by (path, file name, stem, slide)."""
    table = {}
    for row in store.records:
        names = {str(row.get("source"))}
        src = Path(str(row.get("source")))
        names |= {src.name, src.stem}
        if row.get("slide") is not None:
            names.add(str(row["slide"]))
        for name in names:
            table[(name, int(row["y"]), int(row["x"]))] = int(row["index"])
    return table


def match_captions(rows: Iterable[Mapping], store, path: str | os.PathLike = "<captions>") -> dict[int, list[dict]]:
    """Store index -> the caption rows of that patch (in file order).

    Raises:
        DataError: a row that names no patch, a patch the store does not have, or a row that disagrees with
            the store about which patch an index is (naming the file and row).
    """
    coords = None
    out: dict[int, list[dict]] = {}
    n = len(store)
    for k, row in enumerate(rows, 1):
        where = f"row {k}"
        if row.get("index") is not None:
            try:
                i = int(row["index"])
            except (TypeError, ValueError):
                raise DataError(f"{where}: index must be an integer, got {row['index']!r}", path) from None
            if not 0 <= i < n:
                raise DataError(f"{where}: index {i} is outside the store ({n} patches): a captions file of another store?",
                                path)
            rec = store.records[i]
            if all(row.get(key) is not None for key in ("source", "y", "x")) and (
                    str(row["source"]) != str(rec.get("source")) or int(row["y"]) != int(rec["y"])
                    or int(row["x"]) != int(rec["x"])):
                raise DataError(f"{where}: index {i} is {rec.get('source')} at y={rec['y']}, x={rec['x']} in {store.path}, "
                                f"not {row['source']} at y={row['y']}, x={row['x']}: a captions file of another store?",
                                path)
        elif (row.get("slide") is not None or row.get("source") is not None) and row.get("x") is not None \
                and row.get("y") is not None:
            coords = coords if coords is not None else _coordinate_index(store)
            slide = str(row.get("slide") if row.get("slide") is not None else row.get("source"))
            key = (slide, int(row["y"]), int(row["x"]))
            if key not in coords:
                raise DataError(f"{where}: no patch of {slide!r} at y={row['y']}, x={row['x']} in {store.path}", path)
            i = coords[key]
        elif str(row.get("patch", "")).strip().isdigit() and int(row["patch"]) < n:
            i = int(row["patch"])
        else:
            raise DataError(f"{where}: cannot tell which patch of {store.path} it captions: give 'index' (store "
                            "index), 'slide' (or 'source') with 'x' and 'y', or a numeric 'patch'", path)
        out.setdefault(i, []).append({**row, "_row": k})  # _row: its line in the file, for errors
    return out


@dataclass(frozen=True)
class ClassRule:
    """How a caption row becomes one of the 2 × 2 classes of PathLDM's baseline (see the module docstring)."""

    num_classes: int = 4
    threshold: float = 0.5
    tumor_type: str = "epithelial"
    til_type: str = "inflammatory"
    count_threshold: int = 10

    def class_names(self, rows: Sequence[Mapping] = ()) -> tuple[str, ...] | None:
        """Names of the classes: PathLDM's, or the count analogue when the rows carry only nuclei counts."""
        from histosynth.conditions.captions import PATHLDM_CLASSES

        if self.num_classes != 4:
            return None
        if rows and all(self._source(r) == "counts" for r in rows):
            return tuple(f"{t} {self.tumor_type}; {i} {self.til_type}" for t in ("low", "high") for i in ("low", "high"))
        return tuple(PATHLDM_CLASSES)

    @staticmethod
    def _source(row: Mapping) -> str | None:
        if row.get("class") is not None:
            return "class"
        if row.get("tumor_prob") is not None and row.get("til_prob") is not None:
            return "probabilities"
        if isinstance(row.get("counts"), Mapping):
            return "counts"
        return None

    def label(self, row: Mapping) -> int:
        """The class of one row (ValueError when it has neither class, probabilities nor counts)."""
        from histosynth.conditions.captions import tumor_til_class

        source = self._source(row)
        if source == "class":
            c = int(row["class"])
        elif source == "probabilities":
            c = tumor_til_class(float(row["tumor_prob"]), float(row["til_prob"]), self.threshold)
        elif source == "counts":
            counts = row["counts"]
            for name in (self.tumor_type, self.til_type):
                if name not in counts:
                    raise ValueError(f"nuclei counts have no type {name!r} (types: {', '.join(map(str, counts))}); "
                                     "set conditioner.tumor_type / til_type")
            c = 2 * (int(counts[self.tumor_type]) >= self.count_threshold) + (int(counts[self.til_type]) >= self.count_threshold)
        else:
            raise ValueError("the row has no 'class', no tumor_prob/til_prob and no nuclei 'counts'")
        if not 0 <= c < self.num_classes:
            raise ValueError(f"class {c} is outside 0..{self.num_classes - 1}")
        return c

    def labels(self, rows: Sequence[Mapping], path: str | os.PathLike = "<captions>") -> list[int]:
        out = []
        for k, row in enumerate(rows, 1):
            try:
                out.append(self.label(row))
            except (TypeError, ValueError) as exc:
                raise DataError(f"row {row.get('_row', k)}: {exc}", path) from None
        return out

    def to_dict(self) -> dict:
        return asdict(self)


def read_prompts(path: str | os.PathLike) -> list[dict]:
    """Prompts for sampling: a captions JSONL (rows with ``caption``; the rows are kept, e.g. for their class) or a
    text file with one prompt per line (blank lines skipped). Each result has ``prompt`` and ``line``."""
    path = Path(path)
    if not path.is_file():
        raise DataError("prompts file not found", path)
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = read_caption_rows(path)
        out = []
        for k, row in enumerate(rows, 1):
            if "caption" not in row and row.get("class") is None:
                raise DataError(f"row {k} has no 'caption' (nor 'class')", path)
            out.append({**row, "prompt": row.get("caption"), "line": k})
        return out
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"unreadable prompts file: {exc}", path) from None
    out = [{"prompt": line.strip(), "line": k} for k, line in enumerate(lines, 1) if line.strip()]
    if not out:
        raise HistosynthError("no prompt in the file (one prompt per line)", path)
    return out
