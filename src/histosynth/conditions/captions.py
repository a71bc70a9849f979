"""Captions for text-conditioned models: PathLDM's report captions and label-derived captions.

PathLDM (Sec. 3.1, 3.2.2, 4.2, 5.2):

* each slide's pathology report is summarised by a chat LLM (:mod:`histosynth.conditions.report_summaries`);
  :func:`load_summaries` reads those summaries (or a plain mapping of slide to summary).
* each patch's caption is ``"{low|high} tumor; {low|high} til; {summary}"`` (:func:`pathldm_caption`),
  the two levels from the patch's tumour and TIL probabilities with a 0.5 threshold (probability
  >= threshold is "high", as ``int(p * 2)`` in the authors' code). A missing probability leaves its part
  out, as in that code. With several summaries per slide, one is drawn per patch (:func:`build_captions`;
  seeded, and a pure function of (seed, patch id), so adding patches does not change the others).
* the class-conditional baseline uses 4 classes from the same two levels (:func:`tumor_til_class`).

Datasets without reports (CoNSeP, Lizard, PanNuke, ...): :func:`label_caption` describes the nuclei of a
patch from its label maps, one clause per nucleus type in class order, e.g.
``"many epithelial nuclei; few inflammatory nuclei; no spindle-shaped nuclei"``. Levels are counts of
nuclei (instances, each typed by the majority of its pixels, as in the patch store's manifest) with
the thresholds of :data:`LABEL_LEVELS`: 0 → "no", 1–9 → "few", >= 10 → "many". They were chosen for
256 px patches at 40x: CoNSeP holds 43.5 nuclei per patch on average (28,546 in 656 patches), about 11
per type, so "many" is "above a typical type's share". For other patch sizes or magnifications pass
your own ``levels``.
"""

from __future__ import annotations

import json
import math
import os
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from histosynth.atomic import refuse_existing
from histosynth.conditions.report_summaries import read_summary_cache
from histosynth.data.tables import read_rows
from histosynth.errors import DataError, HistosynthError

__all__ = [
    "LABEL_LEVELS",
    "PATHLDM_CLASSES",
    "build_captions",
    "check_levels",
    "choose_summary",
    "label_caption",
    "label_captions_from_store",
    "level",
    "load_summaries",
    "nuclei_counts",
    "pathldm_caption",
    "read_patch_table",
    "read_reports",
    "tumor_til_class",
    "write_jsonl",
]

# ------------------------------------------------------------------------------------------ PathLDM captions

#: PathLDM's class-conditional baseline (Sec. 4.2), in class-index order.
PATHLDM_CLASSES = ("low tumor; low til", "low tumor; high til", "high tumor; low til", "high tumor; high til")


def _probability(value, what: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}") from None
    if math.isnan(p):
        return None
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {p}")
    return p


def level(prob: float, threshold: float = 0.5) -> str:
    """PathLDM's ordinal scale: ``"high"`` when ``prob >= threshold``, else ``"low"``."""
    p = _probability(prob, "probability")
    if p is None:
        raise ValueError("probability is missing")
    return "high" if p >= threshold else "low"


def pathldm_caption(tumor_prob: float | None, til_prob: float | None, summary: str | None,
                    threshold: float = 0.5) -> str:
    """``"{low|high} tumor; {low|high} til; {summary}"``; a missing probability or summary is left out."""
    parts = []
    tumor = _probability(tumor_prob, "tumor probability")
    til = _probability(til_prob, "TIL probability")
    if tumor is not None:
        parts.append(f"{level(tumor, threshold)} tumor")
    if til is not None:
        parts.append(f"{level(til, threshold)} til")
    if summary is not None and str(summary).strip():
        parts.append(" ".join(str(summary).split()))
    return "; ".join(parts)


def tumor_til_class(tumor_prob: float, til_prob: float, threshold: float = 0.5) -> int:
    """PathLDM's 4 classes: 0 low tumor + low TIL, 1 low tumor + high TIL, 2 high tumor + low TIL, 3 high + high."""
    return 2 * (level(tumor_prob, threshold) == "high") + (level(til_prob, threshold) == "high")


def choose_summary(options: Sequence[str], key: str, seed: int) -> int:
    """Index of the summary drawn for sample ``key``: seeded, independent of the other samples and of order."""
    if not options:
        raise ValueError("no summaries to choose from")
    return random.Random(f"{int(seed)}\x00{key}").randrange(len(options))


def build_captions(patch_table: Iterable[Mapping], summaries: Mapping[str, str | Sequence[str]], seed: int = 0,
                   *, threshold: float = 0.5, on_missing: str = "error") -> list[dict]:
    """One PathLDM caption per patch.

    Args:
        patch_table: rows with ``patch`` (id), ``slide``, ``tumor_prob`` and ``til_prob`` (either may be
            empty/None: that part of the caption is left out). Other keys are copied to the output.
        summaries: slide → summary or list of summaries (one is drawn per patch, see :func:`choose_summary`).
        seed: seed of the draws.
        threshold: low/high threshold of the probabilities.
        on_missing: a slide without summary: ``"error"``, ``"levels-only"`` (caption without summary) or ``"skip"``.

    Returns:
        rows ``{patch, slide, tumor_prob, til_prob, summary_index, caption, ...}`` in table order
        (``summary_index`` is None when no summary was used).

    Raises:
        HistosynthError: a missing column or slide summary, a probability outside [0, 1] (naming the patch).
    """
    if on_missing not in ("error", "levels-only", "skip"):
        raise ValueError(f"on_missing must be 'error', 'levels-only' or 'skip', got {on_missing!r}")
    table = {str(k): ([v] if isinstance(v, str) else list(v)) for k, v in summaries.items()}
    out, seen = [], set()
    for n, row in enumerate(patch_table):
        missing = [c for c in ("patch", "slide") if row.get(c) in (None, "")]
        if missing:
            raise HistosynthError(f"patch table row {n}: missing {', '.join(missing)}")
        patch, slide = str(row["patch"]), str(row["slide"])
        if patch in seen:
            raise HistosynthError(f"patch table: duplicate patch id {patch!r}")
        seen.add(patch)
        options = [s for s in table.get(slide, []) if s and str(s).strip()]
        index = None
        if options:
            index = choose_summary(options, patch, seed)
        elif on_missing == "error":
            raise HistosynthError(f"patch {patch!r}: no summary for slide {slide!r}")
        elif on_missing == "skip":
            continue
        try:
            caption = pathldm_caption(row.get("tumor_prob"), row.get("til_prob"),
                                      options[index] if index is not None else None, threshold)
        except ValueError as exc:
            raise HistosynthError(f"patch {patch!r}: {exc}") from None
        if not caption:
            raise HistosynthError(f"patch {patch!r}: empty caption (no probabilities and no summary)")
        out.append({**row, "patch": patch, "slide": slide,
                    "tumor_prob": _probability(row.get("tumor_prob"), "tumor probability"),
                    "til_prob": _probability(row.get("til_prob"), "TIL probability"),
                    "summary_index": index, "caption": caption})
    return out


# ------------------------------------------------------------------------------------------ label captions

#: (minimum count, word) in increasing order: a count gets the word of the largest minimum it reaches.
LABEL_LEVELS: tuple[tuple[int, str], ...] = ((0, "no"), (1, "few"), (10, "many"))


def nuclei_counts(inst_map: np.ndarray, type_map: np.ndarray, class_names: Sequence[str]) -> dict[str, int]:
    """Nuclei per type, each instance typed by the majority of its typed pixels (as the patch store counts)."""
    from histosynth.data.store import nuclei_per_type

    inst, types = np.asarray(inst_map), np.asarray(type_map)
    if inst.ndim != 2 or inst.shape != types.shape:
        raise ValueError(f"inst_map and type_map must be 2-D of the same shape, got {inst.shape} and {types.shape}")
    if types.size and (types.min() < 0 or types.max() > len(class_names)):
        raise ValueError(f"type ids must lie in 0..{len(class_names)}, got {int(types.min())}..{int(types.max())}")
    if inst.size and inst.min() < 0:
        raise ValueError("instance ids must be >= 0")
    return nuclei_per_type(inst, types, class_names)


def check_levels(levels: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
    """Caption count levels as [(minimum count, word), ...]: the first at 0, minimums strictly increasing.

    Raises:
        ValueError: levels that do not start at 0 or do not increase.
    """
    out = [(int(m), str(w)) for m, w in levels]
    if not out or out[0][0] != 0 or any(a[0] >= b[0] for a, b in zip(out, out[1:])):
        raise ValueError(f"levels must start at 0 and increase strictly, got {levels}")
    return out


def label_caption(counts, class_names: Sequence[str], *, levels: Sequence[tuple[int, str]] = LABEL_LEVELS,
                  exclude: Sequence[str] = ()) -> str:
    """Describe the nuclei of a patch: ``"{level} {type} nuclei"`` per type, in class order, joined by ``"; "``.

    Args:
        counts: nuclei per type — a mapping name → count, a sequence aligned with ``class_names``, or an
            ``(inst_map, type_map)`` pair of 2-D arrays (counted with :func:`nuclei_counts`).
        class_names: type names; type id k is ``class_names[k-1]``.
        levels: (minimum count, word) pairs, see :data:`LABEL_LEVELS`.
        exclude: type names to leave out (e.g. ``("other",)``).
    """
    names = [str(n) for n in class_names]
    if (isinstance(counts, tuple) and len(counts) == 2 and all(isinstance(a, np.ndarray) for a in counts)
            and counts[0].ndim == 2):
        counts = nuclei_counts(counts[0], counts[1], names)
    if isinstance(counts, Mapping):
        unknown = sorted(set(map(str, counts)) - set(names))
        if unknown:
            raise ValueError(f"counts name unknown types {unknown}; class names are {names}")
        values = {n: int(counts.get(n, 0)) for n in names}
    else:
        seq = list(counts)
        if len(seq) != len(names):
            raise ValueError(f"{len(seq)} counts for {len(names)} class names")
        values = dict(zip(names, (int(c) for c in seq)))
    unknown = sorted(set(exclude) - set(names))
    if unknown:
        raise ValueError(f"cannot exclude unknown types {unknown}; class names are {names}")
    table = check_levels(levels)
    clauses = []
    for name in names:
        if name in exclude:
            continue
        n = values[name]
        if n < 0:
            raise ValueError(f"negative count {n} for {name!r}")
        word = [w for m, w in table if n >= m][-1]
        clauses.append(f"{word} {name} nuclei")
    return "; ".join(clauses)


def label_captions_from_store(store: str | os.PathLike, *, split: str | None = None,
                              levels: Sequence[tuple[int, str]] = LABEL_LEVELS,
                              exclude: Sequence[str] = ()) -> list[dict]:
    """Label captions of the patches of a patch store (from its manifest counts; no shard is read)."""
    from histosynth.data.store import PatchStore

    ps = PatchStore(store)
    out = []
    for i in ps.indices(split):
        row = ps.records[i]
        counts = row.get("counts")
        if counts is None:
            raise DataError(f"manifest row {i} has no nuclei counts", Path(store) / "manifest.jsonl")
        out.append({"index": row["index"], "source": row.get("source"), "split": row.get("split"),
                    "y": row.get("y"), "x": row.get("x"), "counts": counts,
                    "caption": label_caption(counts, ps.class_names, levels=levels, exclude=exclude)})
    return out


# ------------------------------------------------------------------------------------------ file helpers

def read_patch_table(path: str | os.PathLike) -> list[dict]:
    """Per-patch probabilities: CSV/JSON/JSONL with columns ``patch``, ``slide``, ``tumor_prob``, ``til_prob``."""
    rows = read_rows(path, "patch table", allow_empty=False)
    missing = [c for c in ("patch", "slide") if c not in rows[0]]
    if missing or not ({"tumor_prob", "til_prob"} & set(rows[0])):
        raise DataError(f"patch table needs columns patch, slide and tumor_prob and/or til_prob; "
                        f"found {sorted(rows[0])}", path)
    return rows


def load_summaries(path: str | os.PathLike) -> dict[str, list[str]]:
    """Slide summaries: a JSON object slide → summary or list of summaries, or the JSONL cache of
    :func:`~histosynth.conditions.report_summaries.summarize_reports` (rows ``{"id", "n", "summary"}``, ordered by ``n``)."""
    path = Path(path)
    if not path.is_file():
        raise DataError("summaries file not found", path)
    if path.suffix.lower() == ".jsonl":
        return {k: [s for _, s in sorted(v.items())] for k, v in read_summary_cache(path).items()}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"unreadable summaries: {exc}", path) from None
    if not isinstance(data, dict):
        raise DataError("summaries must be a JSON object: slide id -> summary or list of summaries", path)
    out = {}
    for k, v in data.items():
        v = [v] if isinstance(v, str) else v
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise DataError(f"summaries of slide {k!r} must be a string or a list of strings", path)
        out[str(k)] = v
    return out


def read_reports(path: str | os.PathLike, *, id_column: str = "id", text_column: str = "text") -> dict[str, str]:
    """Reports: a folder of ``.txt`` files (id = file stem), a JSON object id → text, or a CSV / JSON list /
    JSONL with ``id_column`` and ``text_column``."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() == ".txt" and p.is_file())
        if not files:
            raise DataError("no .txt reports in folder", path)
        out = {}
        for p in files:
            try:
                out[p.stem] = p.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise DataError(f"unreadable report: {exc}", p) from None
        return out
    if not path.is_file():
        raise DataError("reports not found", path)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise DataError(f"unreadable reports: {exc}", path) from None
        if isinstance(data, dict) and all(isinstance(v, str) for v in data.values()):
            return {str(k): v for k, v in data.items()}
    rows = read_rows(path)
    if rows and (id_column not in rows[0] or text_column not in rows[0]):
        raise DataError(f"reports need columns {id_column!r} and {text_column!r}; found {sorted(rows[0])}", path)
    out = {}
    for r in rows:
        key = str(r[id_column])
        if key in out:
            raise DataError(f"duplicate report id {key!r}", path)
        out[key] = str(r[text_column] or "")
    return out


def write_jsonl(rows: Iterable[Mapping], path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write rows as JSON lines, atomically (temporary file renamed into place)."""

    path = Path(path)
    refuse_existing(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
