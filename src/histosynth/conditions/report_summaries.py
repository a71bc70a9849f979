"""PathLDM's report summaries (Sec. 3.1, 4.2): each slide's pathology report summarised by a chat LLM.

Two steps in one conversation (chain of thought): first the key points of the report, then a summary "using 75
words", the answer capped at 154 tokens (``max_tokens``). :func:`summarize_reports` does this against any
OpenAI-compatible ``/chat/completions`` endpoint (OpenAI, vLLM, llama.cpp, Ollama, ...), with a resumable JSONL
cache; several independent summaries per report (the paper's "5 summaries per WSI" ablation, FID 7.64 → 7.34) come
from ``summaries_per_report=5``, each its own conversation. :mod:`histosynth.conditions.captions` turns them into
patch captions.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from histosynth.errors import DataError, HistosynthError

__all__ = ["ENV_API_KEY", "ENV_BASE_URL", "ENV_MODEL", "KEY_POINTS_PROMPT", "LLMEndpoint", "LLMError", "SUMMARY_PROMPT",
           "SYSTEM_PROMPT", "chat_completion", "read_summary_cache", "resolve_endpoint", "summarize_reports"]


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
