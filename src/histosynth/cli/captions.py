"""`histosynth captions` commands: build caption files, summarise pathology reports with an LLM.

The group :data:`captions` is attached to the ``histosynth`` command in :mod:`histosynth.cli`. Each
command is a thin call into :mod:`histosynth.conditions.captions`; user errors print one line naming the
file and exit with status 2.
"""

from __future__ import annotations

from pathlib import Path

import click

from histosynth.cli.common import overwrite_option, seed_option, user_errors
from histosynth.errors import HistosynthError

__all__ = ["captions", "build_cmd", "summarize_cmd", "parse_levels"]


def parse_levels(text: str) -> tuple[tuple[int, str], ...]:
    """``"0:no,1:few,10:many"`` → ((0, "no"), (1, "few"), (10, "many"))."""
    out = []
    for part in text.split(","):
        count, sep, word = part.partition(":")
        try:
            if not sep or not word.strip():
                raise ValueError
            out.append((int(count), word.strip()))
        except ValueError:
            raise HistosynthError(f"--levels must look like '0:no,1:few,10:many', got {text!r}") from None
    from histosynth.conditions.captions import check_levels

    try:
        return tuple(check_levels(out))
    except ValueError as exc:
        raise HistosynthError(f"--levels: {exc}") from None


@click.group("captions", context_settings={"help_option_names": ["-h", "--help"]})
def captions():
    """Captions for text-conditioned models (PathLDM): build caption files, summarise reports with an LLM."""


@captions.command("build")
@click.argument("patch_table", required=False, type=click.Path(path_type=Path))
@click.option("--summaries", type=click.Path(path_type=Path), default=None,
              help="Slide summaries: JSON object slide -> summary or list, or the JSONL of `captions summarize`.")
@click.option("--from-labels", "store", type=click.Path(path_type=Path), default=None,
              help="Instead: describe each patch of this patch store by its nuclei (no reports needed).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Captions JSONL to write.")
@click.option("--threshold", default=0.5, show_default=True, help="Probability at and above which a level is 'high'.")
@seed_option("Seed of the per-patch draw among a slide's summaries.")
@click.option("--on-missing", type=click.Choice(["error", "levels-only", "skip"]), default="error", show_default=True,
              help="A slide without summary: fail, caption with the levels only, or skip its patches.")
@click.option("--split", type=click.Choice(["train", "test", "all"]), default="all", show_default=True,
              help="With --from-labels: patches of this split.")
@click.option("--levels", default="0:no,1:few,10:many", show_default=True,
              help="With --from-labels: minimum nuclei count:word pairs.")
@click.option("--exclude", multiple=True, help="With --from-labels: a nucleus type to leave out (repeatable).")
@overwrite_option("Replace an existing output file.")
@user_errors
def build_cmd(patch_table, summaries, store, out, threshold, seed, on_missing, split, levels, exclude, overwrite):
    """Write one caption per patch to a JSONL file.

    PathLDM captions from PATCH_TABLE (CSV/JSON/JSONL with columns patch, slide, tumor_prob, til_prob) and
    --summaries: "{low|high} tumor; {low|high} til; {summary}". Or, with --from-labels STORE, captions like
    "many epithelial nuclei; few inflammatory nuclei; no spindle-shaped nuclei".
    """
    from histosynth.conditions import captions as cap

    if store is not None:
        if patch_table is not None or summaries is not None:
            raise HistosynthError("--from-labels takes no PATCH_TABLE and no --summaries")
        rows = cap.label_captions_from_store(store, split=None if split == "all" else split,
                                             levels=parse_levels(levels), exclude=tuple(exclude))
    else:
        if patch_table is None or summaries is None:
            raise HistosynthError("give PATCH_TABLE and --summaries, or --from-labels STORE")
        rows = cap.build_captions(cap.read_patch_table(patch_table), cap.load_summaries(summaries), seed,
                                  threshold=threshold, on_missing=on_missing)
    if not rows:
        raise HistosynthError("no captions to write (no patch matched)", store or patch_table)
    cap.write_jsonl(rows, out, overwrite=overwrite)
    click.echo(f"wrote {len(rows)} captions to {out}")


@captions.command("summarize")
@click.argument("reports", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Summaries JSONL; an existing file is resumed (reports already in it are not requested again).")
@click.option("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. https://api.openai.com/v1 "
              "(default: $HISTOSYNTH_LLM_BASE_URL).")
@click.option("--model", default=None, help="Chat model, e.g. gpt-3.5-turbo (default: $HISTOSYNTH_LLM_MODEL).")
@click.option("--api-key", default=None, help="API key (default: $HISTOSYNTH_LLM_API_KEY; prefer the variable).")
@click.option("--per-report", "per_report", default=1, show_default=True,
              help="Independent summaries per report (PathLDM's ablation used 5).")
@click.option("--max-words", default=75, show_default=True, help="Words asked for in the summary.")
@click.option("--max-tokens", default=154, show_default=True, help="Hard cap on the summary's tokens.")
@click.option("--temperature", type=float, default=None, help="Sampling temperature (default: the server's).")
@click.option("--timeout", default=60.0, show_default=True, help="Seconds per request.")
@click.option("--retries", default=5, show_default=True, help="Retries on 429/5xx/timeouts, exponential backoff.")
@click.option("--id-column", default="id", show_default=True, help="CSV/JSON list reports: the id column.")
@click.option("--text-column", default="text", show_default=True, help="CSV/JSON list reports: the text column.")
@user_errors
def summarize_cmd(reports, out, base_url, model, api_key, per_report, max_words, max_tokens, temperature, timeout,
                  retries, id_column, text_column):
    """Summarise REPORTS (a folder of .txt, a JSON object id -> text, or a CSV/JSON/JSONL table) with
    PathLDM's two prompts (key points, then a short summary)."""
    from histosynth.conditions.captions import read_reports
    from histosynth.conditions.report_summaries import read_summary_cache, summarize_reports

    texts = read_reports(reports, id_column=id_column, text_column=text_column)
    before = sum(n < per_report for k, v in read_summary_cache(out).items() if k in texts for n in v)
    result = summarize_reports(texts, out, base_url=base_url, model=model, api_key=api_key,
                               summaries_per_report=per_report, max_words=max_words, max_tokens=max_tokens,
                               temperature=temperature, timeout=timeout, retries=retries, progress=True)
    total = sum(len(v) for v in result.values())
    click.echo(f"{len(result)} reports, {total} summaries ({total - before} new) in {out}")

