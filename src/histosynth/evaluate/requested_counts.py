"""Count-conditioned (HistoSmith) sample directories: requested counts per type against what was realised in the
generated labels and what the segmenter finds on the generated images, inside and beyond the training range.

Rows of such a directory carry ``requested`` {type: count} (and ``realised``); :func:`requested_agreement` is what
:func:`~histosynth.evaluate.controllability.count_agreement` runs for them.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.errors import DataError, HistosynthError
from histosynth.evaluate.controllability import (
    MANIFEST, counting_protocol, file_safe, json_default, segment_samples, segmenter_name,
)
from histosynth.evaluate.instance_metrics import bland_altman, bland_altman_plot, counts_per_type, pearson_r

__all__ = ["requested_agreement", "requested_counts", "training_range"]

def requested_counts(rows: Sequence[dict], class_names: Sequence[str],
                     sample_dir: str | Path | None = None) -> np.ndarray:
    """(N, K) float64: each row's ``requested`` {type: count} in class order (a type a row does not name: 0).

    DataError (naming samples.jsonl) for a type that is not a class, or a count that is not a finite number ≥ 0.
    """
    where = None if sample_dir is None else Path(sample_dir) / MANIFEST
    names = list(class_names)
    table = np.zeros((len(rows), len(names)), np.float64)
    for n, row in enumerate(rows, start=1):
        req = row.get("requested")
        if not isinstance(req, Mapping):
            raise DataError(f"row {n}: `requested` must be an object {{type: count}}, got {req!r}", where)
        unknown = sorted(set(req) - set(names))
        if unknown:
            raise DataError(f"row {n}: requested type {unknown[0]!r} is not one of the classes {names}", where)
        for k, name in enumerate(names):
            value = req.get(name, 0)
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise DataError(f"row {n}: requested {name} is not a number: {value!r}", where) from None
            if not np.isfinite(value) or value < 0:
                raise DataError(f"row {n}: requested {name} must be finite and not negative, got {value}", where)
            table[n - 1, k] = value
    return table


def training_range(source: str | Path | Mapping, class_names: Sequence[str]) -> dict[str, Any]:
    """Per type [min, max] of the nuclei counts a model was trained on.

    ``source``: a labelled patch store (min..max of its manifest ``counts`` over the train split — the rule a
    HistoSmith model records), a HistoSmith training run or saved pipeline (the ``count_range`` in its
    ``conditioner/config.json``), or a mapping {type: (min, max)}. Its classes must be ``class_names``.
    Returns ``{"source", "from", "per_type": {type: [min, max]}}``.
    """
    names = list(class_names)
    if isinstance(source, Mapping):
        if sorted(source) != sorted(names):
            raise HistosynthError(f"training range: give [min, max] for each of {names}, got {sorted(source)}")
        per = {}
        for n in names:
            try:
                lo, hi = (float(v) for v in source[n])
            except (TypeError, ValueError):
                raise HistosynthError(f"training range of {n}: expected [min, max], got {source[n]!r}") from None
            if not lo <= hi:
                raise HistosynthError(f"training range of {n}: min {lo} is above max {hi}")
            per[n] = [_num(lo), _num(hi)]
        return {"source": "given", "from": "mapping", "per_type": per}
    path = Path(source)
    if (path / "store.json").is_file():
        from histosynth.data.store import PatchStore

        store = PatchStore(path)
        if not store.has_labels:
            raise DataError("training range: an image-only store has no nuclei counts", path)
        if list(store.class_names) != names:
            raise DataError(f"training range: the store's classes {list(store.class_names)} differ from the "
                            f"samples' {names}", path)
        train = store.indices("train")
        if not train:
            raise DataError("training range: the store has no train patches", path)
        counts = np.array([[(store.records[i].get("counts") or {}).get(n, 0) for n in names] for i in train], np.int64)
        per = {n: [int(lo), int(hi)] for n, lo, hi in zip(names, counts.min(0), counts.max(0))}
        return {"source": str(path), "from": f"store train split ({len(train)} patches)", "per_type": per}
    for config in (path / "pipeline" / "conditioner" / "config.json", path / "conditioner" / "config.json"):
        if not config.is_file():
            continue
        try:
            conf = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"training range: unreadable conditioner config: {exc}", config) from None
        ranges, model_names = conf.get("count_range"), conf.get("class_names")
        if not ranges or model_names is None or len(ranges) != len(model_names):
            raise DataError("training range: not a count conditioner (no count_range per class)", config)
        if list(model_names) != names:
            raise DataError(f"training range: the model's classes {list(model_names)} differ from the samples' "
                            f"{names}", config)
        per = {n: [_num(lo), _num(hi)] for n, (lo, hi) in zip(names, ranges)}
        return {"source": str(path), "from": "model conditioner count_range", "per_type": per}
    raise DataError("training range: neither a patch store (store.json) nor a HistoSmith run or pipeline "
                    "(conditioner/config.json)", path)


def _num(x) -> int | float:
    x = float(x)
    return int(x) if x.is_integer() else x


def _pair(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """Pearson r and Bland–Altman (b − a) of two count vectors, with totals and means; NaN where undefined."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size == 0:
        nan = float("nan")
        return dict(pearson_r=nan, mean_diff=nan, sd=nan, loa_low=nan, loa_high=nan, n=0, requested_total=0,
                    found_total=0, requested_mean=nan, found_mean=nan)
    return dict(pearson_r=pearson_r(a, b), **bland_altman(a, b), requested_total=_num(a.sum()),
                found_total=_num(b.sum()), requested_mean=float(a.mean()), found_mean=float(b.mean()))


def _agreement_of(a: np.ndarray, b: np.ndarray, names: Sequence[str], keep: np.ndarray | None = None,
                  keep_pooled: np.ndarray | None = None) -> dict:
    """Per type and pooled ("all nuclei"): :func:`_pair` of columns of (N, K + 1) tables (column 0: untyped).
    ``keep`` (N, K) bool selects each type's images, ``keep_pooled`` (N,) those of the pooled entry."""
    out = {}
    for t, name in enumerate(names, start=1):
        sel = slice(None) if keep is None else keep[:, t - 1]
        out[name] = _pair(a[sel, t], b[sel, t])
    sel = slice(None) if keep_pooled is None else keep_pooled
    out["all nuclei"] = _pair(a[sel].sum(1), b[sel].sum(1))
    return out


_MEASURES = (("labels", "generated labels"), ("segmenter", "segmenter on the generated image"))


def requested_agreement(root: Path, out: Path, rows, names, segmenter, batch_size, training_range_source):
    """Count-conditioned (HistoSmith) directory: requested counts vs realised, measured twice.

    Per type and pooled: requested vs realised in the generated labels (``per_type_labels``), requested vs found
    by the segmenter on the generated image (``per_type``), and generated labels vs segmenter
    (``labels_vs_segmenter``, difference segmenter − labels): Pearson r and Bland–Altman each. With a training
    range, ``by_range`` = {"inside": {"labels": ..., "segmenter": ...}, "beyond": {...}}: a request is inside
    for a type when min ≤ requested ≤ max of that type; pooled, inside when inside for every type, else beyond.

    Writes to ``out``: ``bland_altman_<type>.png`` (segmenter) and ``bland_altman_labels_<type>.png`` per type,
    ``counts_scatter.png`` (rows: labels, segmenter; one panel per type; requests beyond the training range in
    another colour, the range's bounds dotted), ``bland_altman_by_range.png`` (with a range: inside and beyond
    in two colours, each with its mean and limits), ``counts.csv`` and ``counts.json``.
    """
    k = len(names)
    requested = requested_counts(rows, names, root)
    rng = None if training_range_source is None else training_range(training_range_source, names)
    labels, found = [], []
    for _, ti, tt, pi, pt in segment_samples(root, segmenter, "image", batch_size, rows, k):
        labels.append(counts_per_type(ti, tt, k))  # type ids were checked against K as the maps were read
        try:
            found.append(counts_per_type(pi, pt, k))
        except ValueError as exc:
            raise HistosynthError(f"the segmenter {segmenter_name(segmenter)}: {exc}") from None
    labels, found = np.stack(labels), np.stack(found)
    _check_realised(root, rows, names, labels)
    req = np.concatenate([np.zeros((len(rows), 1)), requested], axis=1)  # no untyped nuclei are requested
    measured = {"labels": labels, "segmenter": found}
    stats = {m: _agreement_of(req, table, names) for m, table in measured.items()}
    by_range = inside = None
    if rng is not None:
        lo = np.array([rng["per_type"][n][0] for n in names], np.float64)
        hi = np.array([rng["per_type"][n][1] for n in names], np.float64)
        inside = (requested >= lo) & (requested <= hi)
        parts = (("inside", inside, inside.all(1)), ("beyond", ~inside, ~inside.all(1)))
        by_range = {part: {m: _agreement_of(req, table, names, keep, pooled) for m, table in measured.items()}
                    for part, keep, pooled in parts}

    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    for t, name in enumerate(names, start=1):
        plots[name] = str(bland_altman_plot(req[:, t], found[:, t], out / f"bland_altman_{file_safe(name)}.png",
                                            title=f"{name}: segmenter on generated image vs requested"))
        plots[f"labels: {name}"] = str(bland_altman_plot(
            req[:, t], labels[:, t], out / f"bland_altman_labels_{file_safe(name)}.png",
            title=f"{name}: generated labels vs requested"))
    plots["scatter"] = str(_requested_scatter(requested, measured, stats, names, rng, inside,
                                              out / "counts_scatter.png"))
    if rng is not None:
        plots["by_range"] = str(_bland_altman_by_range(requested, measured, by_range, names, inside,
                                                       out / "bland_altman_by_range.png"))

    with open(out / "counts.csv", "w", encoding="utf-8") as f:
        safe = [file_safe(n) for n in names]
        header = (["name", "tissue"] + [f"requested_{n}" for n in safe] + [f"realised_{n}" for n in safe]
                  + ["realised_untyped"] + [f"found_{n}" for n in safe] + ["found_untyped"]
                  + ([f"inside_{n}" for n in safe] if inside is not None else []))
        f.write(",".join(header) + "\n")
        for i, row in enumerate(rows):
            values = [str(row.get("name", i)), str(row.get("tissue") or "")]
            values += [str(_num(v)) for v in requested[i]] + [str(v) for v in labels[i, 1:]] + [str(labels[i, 0])]
            values += [str(v) for v in found[i, 1:]] + [str(found[i, 0])]
            values += [str(int(v)) for v in inside[i]] if inside is not None else []
            f.write(",".join(values) + "\n")

    tissues = sorted({str(r.get("tissue")) for r in rows if r.get("tissue")})
    protocol = {**counting_protocol(rows, segmenter), "tissues": tissues,
                "requested": "samples.jsonl `requested`: the counts asked of the model",
                "realised (labels)": "nuclei per type in the generated label maps (inst_map / type_map)",
                "found (segmenter)": "nuclei per type the segmenter finds in the generated image",
                "difference": "measured − requested, per image (labels_vs_segmenter: segmenter − labels)",
                "limits": "mean ± 1.96 SD (ddof=1)"}
    if rng is not None:
        protocol["training_range"] = (f"{rng['source']} ({rng['from']}); inside: min ≤ requested ≤ max of the "
                                      "type, 'all nuclei': inside for every type, else beyond")
    result = {"kind": "count_agreement", "conditioning": "counts", "sample_dir": str(root), "class_names": list(names),
              "n_images": len(rows), "segmenter": segmenter_name(segmenter),
              "per_type": stats["segmenter"], "per_type_labels": stats["labels"],
              "labels_vs_segmenter": _agreement_of(labels, found, names),
              "reference": None, "training_range": rng, "by_range": by_range, "plots": plots, "protocol": protocol}
    (out / "counts.json").write_text(json.dumps(result, indent=2, default=json_default) + "\n", encoding="utf-8")
    return result


def _check_realised(root: Path, rows, names, labels: np.ndarray) -> None:
    """Warn when rows' ``realised`` counts differ from their label maps (the maps are what is measured)."""
    bad = []
    for i, row in enumerate(rows):
        listed = row.get("realised")
        if not isinstance(listed, Mapping):
            continue
        try:
            same = [float(listed.get(n, 0)) for n in names] == [float(v) for v in labels[i, 1:]]
        except (TypeError, ValueError):
            same = False
        if not same:
            bad.append(i + 1)
    if bad:
        warnings.warn(f"{root / MANIFEST}: {len(bad)} row(s) list `realised` counts that differ from their label maps "
                      f"(first: row {bad[0]}); the counts of the label maps are used", stacklevel=3)


def _range_colours(inside: np.ndarray | None, t: int, n: int) -> list[str]:
    if inside is None:
        return ["C0"] * n
    return ["C0" if v else "C1" for v in inside[:, t]]


def _requested_scatter(requested, measured, stats, names, rng, inside, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    k, m = len(names), len(_MEASURES)
    fig = Figure(figsize=(3.2 * k, 3.2 * m + (0.4 if rng else 0)), dpi=100)
    FigureCanvasAgg(fig)
    for row, (key, label) in enumerate(_MEASURES):
        table = measured[key]
        for t, name in enumerate(names):
            ax = fig.add_subplot(m, k, row * k + t + 1)
            r, f = requested[:, t], table[:, t + 1]
            top = max(1.0, float(max(r.max(initial=0), f.max(initial=0))))
            ax.plot([0, top], [0, top], color="0.6", lw=1, ls="--")
            ax.scatter(r, f, s=12, alpha=0.7, c=_range_colours(inside, t, len(r)))
            if rng is not None:
                lo, hi = rng["per_type"][name]
                for bound in {lo, hi} - {0}:
                    ax.axvline(bound, color="0.3", lw=1, ls=":")
            ax.set_title(f"{name}: r = {stats[key][name]['pearson_r']:.3f}", fontsize=9)
            ax.set_xlim(-0.5, top + 0.5)
            ax.set_ylim(-0.5, top + 0.5)
            if row == m - 1:
                ax.set_xlabel("requested")
            if t == 0:
                ax.set_ylabel(f"realised: {label}", fontsize=8)
    if rng is not None:
        handles = [Line2D([], [], marker="o", ls="", color="C0", label="inside the training range"),
                   Line2D([], [], marker="o", ls="", color="C1", label="beyond it"),
                   Line2D([], [], ls=":", color="0.3", label="training min / max")]
        fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8)
        fig.tight_layout(rect=(0, 0.06, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _bland_altman_by_range(requested, measured, by_range, names, inside, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k, m = len(names), len(_MEASURES)
    fig = Figure(figsize=(3.6 * k, 3.4 * m), dpi=100)
    FigureCanvasAgg(fig)
    for row, (key, label) in enumerate(_MEASURES):
        table = measured[key]
        for t, name in enumerate(names):
            ax = fig.add_subplot(m, k, row * k + t + 1)
            a, b = requested[:, t], table[:, t + 1].astype(np.float64)
            for part, colour, sel in (("inside", "C0", inside[:, t]), ("beyond", "C1", ~inside[:, t])):
                s = by_range[part][key][name]
                if not s["n"]:
                    continue
                ax.scatter((a[sel] + b[sel]) / 2, b[sel] - a[sel], s=12, alpha=0.7, color=colour,
                           label=f"{part} (n={s['n']}): {s['mean_diff']:.2f} [{s['loa_low']:.2f}, {s['loa_high']:.2f}]")
                ax.axhline(s["mean_diff"], color=colour, lw=1)
                if np.isfinite(s["sd"]):
                    for lim in (s["loa_low"], s["loa_high"]):
                        ax.axhline(lim, color=colour, lw=1, ls="--")
            ax.axhline(0, color="0.6", lw=0.8, ls=":")
            ax.set_title(f"{name}: {label}", fontsize=9)
            ax.legend(fontsize=6, loc="best")
            if row == m - 1:
                ax.set_xlabel("mean of requested and realised")
            if t == 0:
                ax.set_ylabel("realised − requested")
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path
