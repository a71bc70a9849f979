"""One Markdown report of everything measured: tables of every metric found, the figures, and how each
number was obtained.

:func:`build_report` takes any mix of

* training runs (``losses.jsonl``, ``loss.png``, ``recipe.yaml``),
* ``histosynth sample`` outputs (``samples.jsonl``, ``grid.png`` and any metric JSON beside them),
* sweep directories (``sweep.json``, ``sweep.png``),
* metric JSON files (``evaluate fid --out``, ``evaluate mask-adherence --out``, ``counts.json``, the quickstart's
  ``metrics.json``, or any JSON of numbers),
* other directories (their JSON files, PNGs and recognised sub-directories, e.g. a quickstart output),

and writes one report. Figures are copied into ``<report>_files/`` beside the report and linked relatively,
so the report and that folder can be moved together. Under every table: the protocol of its numbers (features
and their weights, image counts, segmenter) as recorded in the JSON. Missing pieces are noted, not fatal;
only an input path that does not exist is an error.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from histosynth.errors import DataError, HistosynthError

__all__ = ["build_report"]

_PROTOCOL_KEYS = ("features", "protocol", "n_real", "n_generated", "n_images", "n_real_test_patches",
                  "kid_subset_size", "kid_subsets", "segmenter", "machine", "notes")


class _Report:
    def __init__(self, out_md: Path):
        self.out_md = out_md
        self.assets = out_md.parent / f"{out_md.stem}_files"
        self.lines: list[str] = []
        self.n_assets = 0
        self.seen: set[Path] = set()

    # -- output helpers
    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def heading(self, text: str, level: int = 2) -> None:
        self.add("", "#" * level + " " + text, "")

    def image(self, png: Path, caption: str) -> None:
        png = Path(png)
        if not png.is_file():
            self.add(f"_(figure {png.name} not found)_", "")
            return
        self.assets.mkdir(parents=True, exist_ok=True)
        self.n_assets += 1
        name = f"{self.n_assets:02d}-{_slug(png.parent.name)}-{_slug(png.name)}"
        shutil.copy2(png, self.assets / name)
        rel = f"{self.assets.name}/{name}"
        self.add(f"![{_esc(caption)}]({rel})", "", f"_{_esc(caption)}_ (from `{png}`)", "")

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        if not rows:
            return
        self.add("| " + " | ".join(_esc(str(h)) for h in header) + " |",
                 "|" + "|".join("---" for _ in header) + "|")
        for r in rows:
            self.add("| " + " | ".join(_fmt(v) for v in r) + " |")
        self.add("")

    def protocol(self, data: dict, extra: dict | None = None) -> None:
        items = {k: data[k] for k in _PROTOCOL_KEYS if k in data and data[k] not in (None, "", {})}
        items.update({k: v for k, v in (extra or {}).items() if v not in (None, "", {})})
        if not items:
            self.add("_Protocol: not recorded._", "")
            return
        self.add("Protocol:", "")
        for k, v in items.items():
            if isinstance(v, dict):
                v = "; ".join(f"{a}={_fmt(b)}" for a, b in v.items() if b not in (None, ""))
            self.add(f"- {k}: {_esc(_fmt(v))}")
        self.add("")


# ---------------------------------------------------------------------------------------------- formatting
def _esc(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return "n/a"
        return f"{v:.0f}" if abs(v) >= 1e4 else f"{v:.4g}"
    if isinstance(v, (list, tuple)):
        if len(v) <= 8 and all(not isinstance(x, (dict, list)) for x in v):
            return ", ".join(_fmt(x) for x in v)
        return f"[{len(v)} items]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {_fmt(x)}" for k, x in v.items()) + "}"
    return _esc(str(v))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", name).strip("_") or "x"


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.extend(_flatten(v, key + "."))
        elif isinstance(v, (int, float, str, bool)) or v is None or isinstance(v, list):
            out.append((key, v))
    return out


def _load_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    try:
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:
                    continue
    except OSError:
        pass
    return rows


# --------------------------------------------------------------------------------------------- sections
def _json_section(rep: _Report, path: Path, data: dict | None = None, level: int = 2) -> None:
    data = _load_json(path) if data is None else data
    if data is None:
        rep.heading(f"{path.name}", level)
        rep.add(f"_`{path}` is not a readable JSON object; skipped._", "")
        return
    kind = data.get("kind")
    if kind == "sweep" or ("rows" in data and "param" in data):
        _sweep_section(rep, path.parent, data, level)
    elif kind == "mask_adherence":
        _adherence_section(rep, path, data, level)
    elif kind == "count_agreement":
        _counts_section(rep, path, data, level)
    else:
        _generic_section(rep, path, data, level)


def _without_protocol(data: dict) -> dict:
    return {k: v for k, v in data.items() if k != "protocol"}


def _generic_section(rep: _Report, path: Path, data: dict, level: int) -> None:
    rep.heading(f"Metrics: `{path}`", level)
    skip = {"protocol", "machine", "notes"}
    rows = [(k, v) for k, v in _flatten({k: v for k, v in data.items() if k not in skip})]
    if rows:
        rep.table(["metric", "value"], rows)
    else:
        rep.add("_No metrics in this file._", "")
    rep.protocol(data)


def _adherence_section(rep: _Report, path: Path, data: dict, level: int) -> None:
    rep.heading(f"Mask adherence: `{path}`", level)
    sides = [(s, data.get(s)) for s in ("generated", "real") if isinstance(data.get(s), dict)]
    keys = ["dice", "aji", "pq", "dq", "sq", "mpq", "pq_image_mean", "nuclei_requested", "nuclei_found"]
    rep.table(["images", *keys], [[f"{s} (n={d.get('n_images')})", *[d.get(k) for k in keys]] for s, d in sides])
    names = data.get("class_names") or []
    if names and sides:
        header = ["type"]
        for s, _ in sides:
            header += [f"PQ {s}", f"TP {s}", f"FP {s}", f"FN {s}", f"found {s}"]
        header.insert(1, "requested")
        rows = []
        for name in names:
            per = [d.get("per_type", {}).get(name, {}) for _, d in sides]
            row = [name, per[0].get("requested")]
            for p in per:
                row += [p.get("pq"), p.get("tp"), p.get("fp"), p.get("fn"), p.get("found")]
            rows.append(row)
        rep.table(header, rows)
    ceiling = data.get("real_test")
    if isinstance(ceiling, dict):  # the segmenter's own scores on real test patches: what the rows above are read against
        keys = ["dice", "aji", "pq", "mpq"]
        rep.add(f"**The segmenter's ceiling on real patches** (`{ceiling.get('store', '')}`, split "
                f"{ceiling.get('split')}, n={ceiling.get('n_images')})", "")
        rep.table(keys + [f"PQ {n}" for n in names], [[ceiling.get(k) for k in keys]
                                                      + [(ceiling.get("pq_per_type") or {}).get(n) for n in names]])
    rep.protocol(_without_protocol(data), {"n_images": data.get("n_images"), **(data.get("protocol") or {})})


_AGREEMENT = ["Pearson r", "mean diff", "SD", "LoA low", "LoA high", "n"]


def _agreement_row(s: dict) -> list:
    return [s.get("pearson_r"), s.get("mean_diff"), s.get("sd"), s.get("loa_low"), s.get("loa_high"), s.get("n")]


def _counts_section(rep: _Report, path: Path, data: dict, level: int) -> None:
    rep.heading(f"Requested vs generated nuclei counts: `{path}`", level)
    per, ref = data.get("per_type") or {}, data.get("reference") or {}
    header = ["type", *_AGREEMENT, "requested", "found"]
    if ref:
        header += ["real: r", "real: mean diff"]
    rows = []
    for name, s in per.items():
        row = [name, *_agreement_row(s), s.get("requested_total"), s.get("found_total")]
        if ref:
            r = ref.get(name, {})
            row += [r.get("pearson_r"), r.get("mean_diff")]
        rows.append(row)
    rep.table(header, rows)
    rep.add("Differences are found − requested per image; limits of agreement mean ± 1.96 SD."
            + (" `real:` the same segmenter on the real patches of the masks." if ref else ""), "")
    # count-conditioned samples (HistoSmith): realised twice, in the generated labels and by the segmenter
    for key, title in (("per_type_labels", "Requested vs realised in the generated labels (realised − requested)"),
                       ("labels_vs_segmenter", "Generated labels vs the segmenter on the generated image "
                                               "(segmenter − labels)")):
        if isinstance(data.get(key), dict):
            rep.add(f"**{title}**", "")
            rep.table(["type", *_AGREEMENT], [[name, *_agreement_row(s)] for name, s in data[key].items()])
    by_range = data.get("by_range")
    if isinstance(by_range, dict):
        rep.add("**Inside and beyond the training range** (a request is inside for a type when it lies within that "
                "type's training min..max; 'all nuclei': inside for every type)", "")
        rows = [[part, measure, name, *_agreement_row(s)]
                for part, measures in by_range.items() for measure, stats in (measures or {}).items()
                for name, s in (stats or {}).items()]
        rep.table(["range", "measured in", "type", *_AGREEMENT], rows)
    for name, p in (data.get("plots") or {}).items():
        png = Path(p)
        if not png.is_file():
            png = path.parent / png.name
        caption = "requested vs found, per type" if name == "scatter" else f"{name}: Bland–Altman (found − requested)"
        rep.image(png, caption)
    rep.protocol(_without_protocol(data), {"n_images": data.get("n_images"), **(data.get("protocol") or {})})


_SWEEP_COLUMNS = ["fid", "kid_mean", "kid_std", "is_mean", "nuclei_contrast_generated", "nuclei_contrast_real",
                  "dice", "aji", "pq", "mpq", "real_dice", "real_aji", "real_pq", "real_mpq", "n_generated", "n_real",
                  "seconds"]


def _sweep_section(rep: _Report, root: Path, data: dict, level: int) -> None:
    param = data.get("param", "value")
    rep.heading(f"Sweep over {param}: `{root}`", level)
    rows = [r for r in data.get("rows") or [] if isinstance(r, dict)]
    cols = [c for c in _SWEEP_COLUMNS if any(c in r for r in rows)]
    rep.table([param, *cols], [[r.get(param), *[r.get(c) for c in cols]] for r in rows])
    missing = [v for v in data.get("values") or [] if v not in [r.get(param) for r in rows]]
    if missing:
        rep.add(f"_Not measured (sweep stopped?): {param} = {_fmt(missing)}._", "")
    if (root / "sweep.png").is_file():
        rep.image(root / "sweep.png", f"metrics against {param}")
    extra = {k: data.get(k) for k in ("model", "masks", "split", "num", "scheduler", "sampler", "seed", "fixed", "date")}
    rep.protocol(data, extra)


def _run_section(rep: _Report, root: Path, level: int) -> None:
    rep.heading(f"Training run: `{root}`", level)
    recipe = {}
    if (root / "recipe.yaml").is_file():
        try:
            import yaml

            recipe = yaml.safe_load((root / "recipe.yaml").read_text(encoding="utf-8")) or {}
        except Exception:  # a report must not fail on a damaged recipe
            recipe = {}
    rows = _read_jsonl(root / "losses.jsonl")
    table: list[tuple[str, Any]] = []
    inner = recipe.get("recipe", recipe) if isinstance(recipe, dict) else {}
    if isinstance(inner, dict) and inner.get("name"):
        table.append(("recipe", inner.get("name")))
    if isinstance(recipe, dict) and recipe.get("data"):
        table.append(("data", recipe.get("data")))
    if rows:
        losses = [r["loss"] for r in rows if isinstance(r.get("loss"), (int, float))]
        tail = losses[-max(1, len(losses) // 10):]
        table += [("steps logged", len(rows)), ("last step", rows[-1].get("step")), ("last loss", rows[-1].get("loss")),
                  ("mean loss, last 10 %", sum(tail) / len(tail) if tail else None),
                  ("min loss", min(losses) if losses else None)]
        for key in ("simple", "vlb", "lr", "stage"):
            if key in rows[-1]:
                table.append((f"last {key}", rows[-1][key]))
    else:
        rep.add("_No losses.jsonl (or it is empty)._", "")
    ckpts = sorted(p.name for p in (root / "checkpoints").glob("step-*")) if (root / "checkpoints").is_dir() else []
    if ckpts:
        table.append(("checkpoints", f"{len(ckpts)} (latest {ckpts[-1]})"))
    table.append(("pipeline", "yes" if (root / "pipeline" / "model_index.json").is_file() else "no"))
    rep.table(["", "value"], table)
    if (root / "loss.png").is_file():
        rep.image(root / "loss.png", "training losses")


def _samples_section(rep: _Report, root: Path, level: int) -> None:
    rep.heading(f"Samples: `{root}`", level)
    rows = _read_jsonl(root / "samples.jsonl")
    settings: list[tuple[str, Any]] = [("images", len(rows))]
    for key in ("guidance_scale", "num_inference_steps", "scheduler", "sampler", "seed", "store", "split"):
        vals = sorted({json.dumps(r.get(key)) for r in rows if key in r})
        if vals:
            settings.append((key, ", ".join(_fmt(json.loads(v)) for v in vals)))
    rep.table(["setting", "value"], settings)
    if (root / "grid.png").is_file():
        rep.image(root / "grid.png", "rows: condition mask | generated | real")
    for js in sorted(root.glob("*.json")):
        _json_section(rep, js, level=level + 1)
    for sub in sorted(p for p in root.iterdir() if p.is_dir() and (p / "counts.json").is_file()):
        _json_section(rep, sub / "counts.json", level=level + 1)


def _dir_section(rep: _Report, root: Path, level: int = 2, depth: int = 0) -> None:
    root = root.resolve()
    if root in rep.seen:
        return
    rep.seen.add(root)
    if (root / "sweep.json").is_file():
        _json_section(rep, root / "sweep.json", level=level)
    elif (root / "samples.jsonl").is_file():
        _samples_section(rep, root, level)
    elif (root / "losses.jsonl").is_file() or (root / "recipe.yaml").is_file():
        _run_section(rep, root, level)
    elif (root / "counts.json").is_file():
        _json_section(rep, root / "counts.json", level=level)
    else:
        rep.heading(f"`{root}`", level)
        found = False
        for js in sorted(root.glob("*.json")):
            _json_section(rep, js, level=level + 1)
            found = True
        for png in sorted(root.glob("*.png")):
            rep.image(png, png.stem)
            found = True
        if depth < 2:
            for sub in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
                if _recognised(sub) or any(_recognised(s) for s in sub.iterdir() if s.is_dir()):
                    _dir_section(rep, sub, level + 1, depth + 1)
                    found = True
        if not found:
            rep.add("_Nothing measured here (no JSON, PNG, run, sample or sweep directory)._", "")


def _recognised(p: Path) -> bool:
    return any((p / f).is_file() for f in ("sweep.json", "samples.jsonl", "losses.jsonl", "counts.json"))


def _machine() -> str:
    parts = [platform.node(), platform.platform(), f"Python {platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
        parts.append(torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
    except Exception:  # noqa: BLE001 — the report works without torch
        pass
    return ", ".join(p for p in parts if p)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("histosynth")
    except Exception:  # noqa: BLE001
        return "unknown"


def build_report(inputs: Sequence[str | Path], out_md: str | Path, title: str = "histosynth evaluation report") -> Path:
    """Write one Markdown report of every metric, figure and training curve found in ``inputs``.

    Figures are copied into ``<out_md stem>_files/`` beside ``out_md``. Returns the report path.
    Raises DataError when an input does not exist or no input is given.
    """
    if not inputs:
        raise HistosynthError("no inputs for the report: give training runs, sample or sweep directories, JSON files")
    paths = [Path(p) for p in inputs]
    for p in paths:
        if not p.exists():
            raise DataError("report input does not exist", p)
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    rep = _Report(out_md)
    rep.add(f"# {title}", "",
            f"- date: {_dt.datetime.now().astimezone().isoformat(timespec='seconds')}",
            f"- machine: {_esc(_machine())}",
            f"- histosynth {_version()}",
            "- inputs: " + ", ".join(f"`{p}`" for p in paths), "")
    for p in paths:
        if p.is_dir():
            _dir_section(rep, p)
        elif p.suffix.lower() == ".json":
            _json_section(rep, p)
        elif p.name == "losses.jsonl":
            _run_section(rep, p.parent, 2)
        elif p.name == "samples.jsonl":
            _samples_section(rep, p.parent, 2)
        elif p.suffix.lower() == ".png":
            rep.heading(f"Figure: `{p}`")
            rep.image(p, p.stem)
        else:
            rep.heading(f"`{p}`")
            rep.add("_Not a recognised input (directory, .json, losses.jsonl, samples.jsonl or .png); skipped._", "")
    out_md.write_text("\n".join(rep.lines).rstrip() + "\n", encoding="utf-8")
    return out_md
