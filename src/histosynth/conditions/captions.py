"""Captions for text-conditioned models: PathLDM's report captions, label-derived captions, LLM summaries.

PathLDM (Sec. 3.1, 3.2.2, 4.2, 5.2):

* each slide's pathology report is summarised by a chat LLM in two steps (chain of thought): first the
  key points of the report, then — in the same conversation — a summary "using 75 words", with the
  answer capped at 154 tokens (``max_tokens``). :func:`summarize_reports` does this against any
  OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, llama.cpp, Ollama, ...), with a
  resumable JSONL cache. Several independent summaries per report (the paper's "5 summaries per WSI"
  ablation, FID 7.64 → 7.34) come from ``summaries_per_report=5``; each is its own conversation.
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

import csv
import http.client
import json
import math
import os
import random
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histosynth.errors import DataError, HistosynthError

__all__ = [
    "ENV_API_KEY",
    "ENV_BASE_URL",
    "ENV_MODEL",
    "KEY_POINTS_PROMPT",
    "LABEL_LEVELS",
    "LLMEndpoint",
    "LLMError",
    "PATHLDM_CLASSES",
    "SUMMARY_PROMPT",
    "SYSTEM_PROMPT",
    "build_captions",
    "chat_completion",
    "choose_summary",
    "label_caption",
    "label_captions_from_store",
    "level",
    "load_summaries",
    "nuclei_counts",
    "pathldm_caption",
    "read_patch_table",
    "read_reports",
    "read_summary_cache",
    "resolve_endpoint",
    "summarize_reports",
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


def _check_levels(levels: Sequence[tuple[int, str]]) -> list[tuple[int, str]]:
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
    table = _check_levels(levels)
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

def _read_rows(path: Path) -> list[dict]:
    """Rows of a CSV, a JSON list (or {"rows"/"patches": [...]}) or a JSONL file."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                return [dict(r) for r in csv.DictReader(f)]
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"unreadable table: {exc}", path) from None
    try:
        if suffix == ".jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        data = json.loads(text)
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


def read_patch_table(path: str | os.PathLike) -> list[dict]:
    """Per-patch probabilities: CSV/JSON/JSONL with columns ``patch``, ``slide``, ``tumor_prob``, ``til_prob``."""
    path = Path(path)
    if not path.is_file():
        raise DataError("patch table not found", path)
    rows = _read_rows(path)
    if not rows:
        raise DataError("patch table is empty", path)
    missing = [c for c in ("patch", "slide") if c not in rows[0]]
    if missing or not ({"tumor_prob", "til_prob"} & set(rows[0])):
        raise DataError(f"patch table needs columns patch, slide and tumor_prob and/or til_prob; "
                        f"found {sorted(rows[0])}", path)
    return rows


def load_summaries(path: str | os.PathLike) -> dict[str, list[str]]:
    """Slide summaries: a JSON object slide → summary or list of summaries, or the JSONL cache of
    :func:`summarize_reports` (rows ``{"id", "n", "summary"}``, ordered by ``n``)."""
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
    rows = _read_rows(path)
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
    from histosynth.errors import OutputExistsError

    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError("output already exists; pass --overwrite (overwrite=True) to replace it", path)
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


# ------------------------------------------------------------------------------------------ LLM summaries

ENV_BASE_URL = "HISTOSYNTH_LLM_BASE_URL"
ENV_MODEL = "HISTOSYNTH_LLM_MODEL"
ENV_API_KEY = "HISTOSYNTH_LLM_API_KEY"

SYSTEM_PROMPT = "You are an expert pathologist who summarises pathology reports faithfully and concisely."
KEY_POINTS_PROMPT = (
    "Here is a pathology report:\n\n\"\"\"\n{report}\n\"\"\"\n\n"
    "List the main points of this report as short bullet points: diagnosis and histologic type, grade and "
    "differentiation, tumour size, margins, lymphovascular invasion, lymph node status, receptor status and any "
    "other relevant finding. Use only what the report says."
)
SUMMARY_PROMPT = (
    "Using these main points, write a summary of the report in at most {max_words} words, "
    "as one paragraph of plain text without a heading."
)
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504}) | frozenset(range(520, 530))


class LLMError(HistosynthError):
    """A chat-completion request failed for good (after its retries, or refused by the server)."""


@dataclass(frozen=True)
class LLMEndpoint:
    """An OpenAI-compatible chat endpoint. ``base_url`` is e.g. ``https://api.openai.com/v1`` or
    ``http://127.0.0.1:8000/v1``; requests go to ``{base_url}/chat/completions``."""

    base_url: str
    model: str
    api_key: str | None = None
    timeout: float = 60.0

    @property
    def url(self) -> str:
        base = self.base_url.rstrip("/")
        return base if base.endswith("/chat/completions") else base + "/chat/completions"

    def __repr__(self) -> str:  # never print the key
        return f"LLMEndpoint(base_url={self.base_url!r}, model={self.model!r}, timeout={self.timeout})"


def resolve_endpoint(base_url: str | None = None, model: str | None = None, api_key: str | None = None,
                     timeout: float = 60.0) -> LLMEndpoint:
    """Arguments first, then ``HISTOSYNTH_LLM_BASE_URL`` / ``_MODEL`` / ``_API_KEY``. The key may be absent
    (local servers); base URL and model may not."""
    base_url = base_url or os.environ.get(ENV_BASE_URL) or None
    model = model or os.environ.get(ENV_MODEL) or None
    api_key = api_key or os.environ.get(ENV_API_KEY) or None
    if not base_url:
        raise HistosynthError(f"no LLM endpoint: pass --base-url (base_url=) or set {ENV_BASE_URL}")
    if not base_url.startswith(("http://", "https://")):
        raise HistosynthError(f"LLM base URL must start with http:// or https://, got {base_url!r}")
    if not model:
        raise HistosynthError(f"no LLM model: pass --model (model=) or set {ENV_MODEL}")
    if timeout <= 0:
        raise HistosynthError(f"timeout must be positive, got {timeout}")
    return LLMEndpoint(base_url, model, api_key, float(timeout))


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def chat_completion(endpoint: LLMEndpoint, messages: list[dict], *, max_tokens: int | None = None,
                    temperature: float | None = None, retries: int = 5, backoff: float = 1.0,
                    max_backoff: float = 30.0, report_id: str | None = None, token_param: str = "max_tokens",
                    sleep=time.sleep) -> str:
    """POST one chat completion and return the assistant's text.

    Retries ``retries`` times with exponential backoff (``backoff * 2**attempt`` seconds, at most
    ``max_backoff``; a ``Retry-After`` header is honoured up to ``max_backoff``) on HTTP 408/409/425/429/5xx,
    timeouts, dropped connections and unparsable answers. Any other HTTP error fails at once.

    Raises:
        LLMError: naming ``report_id``, the URL and the last error.
    """
    body: dict = {"model": endpoint.model, "messages": messages}
    if max_tokens is not None:
        body[token_param] = int(max_tokens)
    if temperature is not None:
        body["temperature"] = float(temperature)
    data = json.dumps(body).encode("utf-8")
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if endpoint.api_key:
        headers["Authorization"] = f"Bearer {endpoint.api_key}"
    who = f"report {report_id!r}: " if report_id is not None else ""
    attempts = max(0, int(retries)) + 1
    last = "no attempt"
    for attempt in range(attempts):
        wait = None
        try:
            req = urllib.request.Request(endpoint.url, data=data, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=endpoint.timeout) as resp:
                raw = resp.read()
            try:
                answer = json.loads(raw.decode("utf-8"))
                content = answer["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError, UnicodeDecodeError):
                last = f"unparsable answer: {raw[:200]!r}"
            else:
                if isinstance(content, str) and content.strip():
                    return content.strip()
                last = "empty answer"
        except urllib.error.HTTPError as exc:
            try:
                detail = exc.read()[:300].decode("utf-8", "replace").strip()
            except Exception:  # noqa: BLE001 - the body is only for the message
                detail = ""
            last = f"HTTP {exc.code} {exc.reason}" + (f": {detail}" if detail else "")
            if exc.code not in RETRY_STATUS:
                raise LLMError(f"{who}chat completion at {endpoint.url} refused: {last}") from None
            wait = _retry_after(exc.headers)
        except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError,
                http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            last = f"{type(reason).__name__}: {reason}"
        if attempt + 1 < attempts:
            delay = min(max_backoff, backoff * (2 ** attempt))
            sleep(min(max_backoff, wait) if wait is not None else delay)
    raise LLMError(f"{who}chat completion at {endpoint.url} failed after {attempts} attempt(s): {last}")


def read_summary_cache(path: str | os.PathLike) -> dict[str, dict[int, str]]:
    """Summaries already in a JSONL cache: id → {n: summary}. A torn last line (a crash mid-write) is cut off."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(f"unreadable summary cache: {exc}", path) from None
    *complete, tail = raw.split(b"\n")  # tail: b"" if the file ends with a newline, else an unterminated line
    out: dict[str, dict[int, str]] = {}

    def parse(line: bytes) -> bool:
        try:
            row = json.loads(line.decode("utf-8"))
            out.setdefault(str(row["id"]), {})[int(row.get("n", 0))] = str(row["summary"])
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            return False
        return True

    for number, line in enumerate(complete, 1):
        if line.strip() and not parse(line):
            raise DataError(f"line {number} is not a summary row {{id, n, summary}}", path)
    if tail.strip() and not parse(tail):  # torn last line of an interrupted write: cut it off
        with open(path, "r+b") as f:
            f.truncate(len(raw) - len(tail))
    return out


def summarize_reports(reports: Mapping[str, str], cache_path: str | os.PathLike, *, base_url: str | None = None,
                      model: str | None = None, api_key: str | None = None, summaries_per_report: int = 1,
                      max_words: int = 75, max_tokens: int = 154, key_points_max_tokens: int | None = None,
                      temperature: float | None = None, timeout: float = 60.0, retries: int = 5,
                      backoff: float = 1.0, max_backoff: float = 30.0, token_param: str = "max_tokens",
                      progress: bool = False) -> dict[str, list[str]]:
    """Summarise pathology reports with PathLDM's two-step prompting, resumably.

    For each report (and each of ``summaries_per_report`` independent conversations): ask for the key
    points of the report, then, in the same conversation, for a summary of at most ``max_words`` words
    with the answer capped at ``max_tokens`` tokens. Each finished summary is appended to the JSONL cache
    at ``cache_path`` (``{"id", "n", "summary", "key_points", "model"}``, flushed and fsynced); ids (and
    conversation numbers) already there are not requested again, so an interrupted run resumes.

    Endpoint: ``base_url``, ``model`` and ``api_key`` or the ``HISTOSYNTH_LLM_*`` environment variables.
    See :func:`chat_completion` for the retry policy.

    Returns:
        id → list of ``summaries_per_report`` summaries, for every id of ``reports``.

    Raises:
        LLMError: a request that failed for good, naming its report id (earlier summaries stay cached).
        HistosynthError: no endpoint/model, an empty report.
    """
    endpoint = resolve_endpoint(base_url, model, api_key, timeout)
    if summaries_per_report < 1 or max_words < 1 or max_tokens < 1:
        raise HistosynthError("summaries_per_report, max_words and max_tokens must be >= 1")
    cache_path = Path(cache_path)
    done = read_summary_cache(cache_path)
    todo = [(rid, n) for rid in reports for n in range(summaries_per_report) if n not in done.get(str(rid), {})]
    for rid, _ in todo:
        if not str(reports[rid]).strip():
            raise HistosynthError(f"report {rid!r} is empty")
    bar = None
    if progress and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="summaries", unit="summary")
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        for rid, n in todo:
            messages = [{"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": KEY_POINTS_PROMPT.format(report=str(reports[rid]).strip())}]
            common = dict(temperature=temperature, retries=retries, backoff=backoff, max_backoff=max_backoff,
                          report_id=str(rid), token_param=token_param)
            key_points = chat_completion(endpoint, messages, max_tokens=key_points_max_tokens, **common)
            messages += [{"role": "assistant", "content": key_points},
                         {"role": "user", "content": SUMMARY_PROMPT.format(max_words=max_words)}]
            summary = " ".join(chat_completion(endpoint, messages, max_tokens=max_tokens, **common).split())
            row = {"id": str(rid), "n": n, "summary": summary, "key_points": key_points, "model": endpoint.model}
            _append_line(cache_path, json.dumps(row, ensure_ascii=False))
            done.setdefault(str(rid), {})[n] = summary
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return {str(rid): [done[str(rid)][n] for n in range(summaries_per_report)] for rid in reports}


def _append_line(path: Path, line: str) -> None:
    with open(path, "a+b") as f:
        f.seek(0, os.SEEK_END)
        if f.tell():
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
        f.write(line.encode("utf-8") + b"\n")
        f.flush()
        os.fsync(f.fileno())
