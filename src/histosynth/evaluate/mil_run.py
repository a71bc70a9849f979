"""``histosynth evaluate mil``: DISC's slide-level grading model trained on real slides + generated tile sets for each
balance weight λ (DISC Sec. 2.4, eq. 4; Sec. 3 / Fig. 6), scored by AUROC per grade on real test slides.

Output folder (written atomically: complete or absent; an existing one is replaced only with ``overwrite``)::

    OUT/results.json        the λ table (AUROC per class, macro, notes), bag counts and positives, split, protocol
    OUT/lambda_sweep.png    AUROC per class and macro against λ
    OUT/losses.jsonl        per λ and step: L_total, L_real_slide, L_synthesized_slide
    OUT/loss.png            the loss curves, one line per λ
    OUT/bags.jsonl          per bag: source, synthetic, split, tiles, target labels
    OUT/features/           cached tile features (:func:`histosynth.evaluate.mil_bags.cached_features`)

Model, loss and metric: :mod:`histosynth.evaluate.mil`; bags, split and features: :mod:`histosynth.evaluate.mil_bags`.
"""

from __future__ import annotations

import json
import math
import platform
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.data.regions import open_region_store
from histosynth.errors import HistosynthError
from histosynth.evaluate.balance import parse_balances

__all__ = ["evaluate_mil", "plot_lambda_sweep", "plot_mil_losses"]

_MODELS = {"attention": "gated attention MIL (Ilse et al. 2018)",
           "transmil": "TransMIL-lite (class token + 2 transformer layers)"}


def _positives(bags, classes) -> dict[str, int]:
    return {n: int(sum(b.labels[k] for b in bags)) for k, n in enumerate(classes)}


def evaluate_mil(
    real_store: str | Path,
    synthetic: str | Path | None,
    out: str | Path,
    *,
    balances: str | Sequence[float] = (0.0,),
    encoder=None,
    architecture: str = "attention",
    steps: int = 1000,
    lr: float = 5e-4,
    classes: Sequence[str] | None = None,
    min_share: float = 0.05,
    max_labels: int = 2,
    negative_label: str | None = None,
    split: str = "auto",
    test_fraction: float = 0.3,
    seed: int = 0,
    batch_size: int = 32,
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """The λ sweep of DISC's slide-level model (module docstring); returns results.json's content.

    Args:
        real_store: a region store (``histosynth prepare regions``): its slides are the real bags.
        synthetic: a folder of tile sets (:mod:`histosynth.evaluate.mil_bags` layout), or None (only λ = 0).
        encoder: the frozen tile encoder (``load_tile_encoder``: None = offline EfficientNet-Lite0, a hub id, a local
            path, or an ``nn.Module``).
        classes: the output labels (default: all the store's region labels); min_share, max_labels, negative_label:
            the real slides' target rule (negative_label default: the store's label 0, when among ``classes``); split, test_fraction: the real slides' train/test split.

    Raises:
        OutputExistsError: ``out`` exists and not ``overwrite``.
        HistosynthError / DataError: naming the option or file: bad λ, architecture or classes, not a region store,
            a bad sets.jsonl, λ > 0 without synthetic sets, no test slides.
    """
    from histosynth.atomic import atomic_folder, refuse_existing
    from histosynth.data.io import read_rgb
    from histosynth.evaluate.mil import ARCHITECTURES, build_mil_model, lambda_sweep
    from histosynth.evaluate.mil_bags import (cached_features, encode_tiles, read_tile_sets, region_store_bags,
                                              split_real_bags, store_key, tile_set_bags, tiles_key)
    from histosynth.models.ssl_encoder import load_tile_encoder

    out = Path(out)
    refuse_existing(out, overwrite)
    lams = parse_balances(balances)
    if architecture not in ARCHITECTURES:
        raise HistosynthError(f"unknown --architecture {architecture!r}: one of {', '.join(ARCHITECTURES)}")
    if steps < 1:
        raise HistosynthError(f"--steps must be at least 1, got {steps}")
    store = open_region_store(real_store, "--real")
    names = list(store.class_names)
    classes = list(classes) if classes else names
    unknown = [c for c in classes if c not in names]
    if unknown or len(set(classes)) != len(classes):
        raise HistosynthError(f"--classes {','.join(classes)}: each once, among the store's labels {', '.join(names)}")
    if negative_label is None and names[0] in classes:
        negative_label = names[0]  # label 0 (non-cancer, background): as the tile sets' rule (Sec. 2.2), real and synthetic alike
    if negative_label is not None and negative_label not in classes:
        raise HistosynthError(f"--negative-label {negative_label!r} is not among the classes {', '.join(classes)}")
    if max(lams) > 0 and synthetic is None:
        raise HistosynthError(f"--balance {max(lams):g} weights synthetic bags: give --synthetic FOLDER (or λ = 0)")
    use_synthetic = synthetic is not None and max(lams) > 0
    sets = read_tile_sets(synthetic, names) if use_synthetic else []
    tile_enc = load_tile_encoder(encoder, device)
    previous = out if out.is_dir() else None

    with atomic_folder(out) as tmp:
        real_f, real_reused = cached_features(
            tmp, "real", store_key(store, tile_enc), lambda: encode_tiles(
                tile_enc, (store[i]["image"] for i in range(len(store))), len(store), batch_size=batch_size,
                progress=progress, desc="real tile features"), previous)
        real = region_store_bags(store, real_f, classes, min_share=min_share, max_labels=max_labels,
                                 negative_label=negative_label)
        train, test, split_info = split_real_bags(real, split, test_fraction=test_fraction, seed=seed)
        synth, synth_reused = [], None
        if sets:
            paths = list(dict.fromkeys(p for s in sets for p in s.tiles))
            synth_f, synth_reused = cached_features(
                tmp, "synthetic", tiles_key(paths, tile_enc), lambda: encode_tiles(
                    tile_enc, (read_rgb(p) for p in paths), len(paths), batch_size=batch_size, progress=progress,
                    desc="synthetic tile features"), previous)
            synth = tile_set_bags(sets, synth_f, {p: i for i, p in enumerate(paths)}, classes,
                                  negative_label=negative_label)
        rows, logs = lambda_sweep(train, synth, test, lams, classes, architecture=architecture, steps=steps, lr=lr,
                                  seed=seed, device=device, progress=progress)
        n_params = sum(p.numel() for p in build_mil_model(architecture, tile_enc.dim, len(classes)).parameters())
        with open(tmp / "bags.jsonl", "w", encoding="utf-8") as f:
            for b, part in [*((b, "train") for b in [*train, *synth]), *((b, "test") for b in test)]:
                f.write(json.dumps({"source": b.source, "synthetic": b.synthetic, "split": part,
                                    "tiles": len(b.features), "labels": [c for c, v in zip(classes, b.labels) if v]})
                        + "\n")
        with open(tmp / "losses.jsonl", "w", encoding="utf-8") as f:
            for lam, log in logs.items():
                for r in log:
                    f.write(json.dumps({"balance": lam, **{k: (None if v != v else v) for k, v in r.items()}}) + "\n")
        defined = [r for r in rows if r["macro_auroc"] is not None]
        best = max(defined, key=lambda r: r["macro_auroc"]) if defined else None
        result = {
            "classes": classes,
            "sweep": rows,
            "best": None if best is None else {"balance": best["balance"], "macro_auroc": best["macro_auroc"]},
            "bags": {"real_train": len(train), "real_test": len(test), "synthetic": len(synth),
                     "positives": {"real_train": _positives(train, classes), "real_test": _positives(test, classes),
                                   "synthetic": _positives(synth, classes)}},
            "split": split_info,
            "features": {"real": "reused" if real_reused else "computed",
                         "synthetic": ("not used (every λ is 0)" if synthetic is not None and not use_synthetic
                                       else None if synth_reused is None else
                                       "reused" if synth_reused else "computed")},
            "protocol": {
                "model": f"{_MODELS[architecture]}, sigmoid multi-label head (DISC Sec. 2.4)",
                "parameter_count": n_params, "encoder": tile_enc.protocol, "steps": steps,
                "optimiser": f"AdamW lr {lr:g}, weight decay 1e-4", "seed": seed,
                "loss": "(1 - λ)·BCE(real bag) + λ·BCE(synthetic bag), one bag of each per step (DISC eq. 4)",
                "metric": "AUROC per class on real test slides (scikit-learn roc_auc_score), macro = mean of the "
                          "defined ones",
                "real_target": {"min_share": min_share, "max_labels": max_labels, "negative_label": negative_label,
                                "rule": "labels covering at least min_share of the slide's patch pixels, largest "
                                        "first, at most max_labels; negative_label only when alone"},
                "real_store": str(Path(store.path).resolve()),
                "synthetic": None if synthetic is None else str(Path(synthetic).resolve())},
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {platform.processor()}".strip(),
        }
        (tmp / "results.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
        plot_lambda_sweep(rows, classes, tmp / "lambda_sweep.png",
                          title=f"{architecture} MIL, {len(test)} real test slides, {tile_enc.encoder_id[:60]}")
        plot_mil_losses(logs, tmp / "loss.png")
    return result


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_lambda_sweep(rows: Sequence[dict], class_names: Sequence[str], out_png: str | Path, title: str = "") -> None:
    """AUROC per class and macro AUROC against λ (undefined values left out)."""
    plt = _pyplot()
    lams = [r["balance"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in class_names:
        ax.plot(lams, [math.nan if r["auroc"][name] is None else r["auroc"][name] for r in rows], "o-", lw=1,
                label=name)
    ax.plot(lams, [math.nan if r["macro_auroc"] is None else r["macro_auroc"] for r in rows], "s-", lw=2.5,
            color="black", label="macro")
    ax.set_xlabel("balance weight λ (DISC eq. 4)")
    ax.set_ylabel("AUROC (real test bags)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


def plot_mil_losses(logs: dict[float, list[dict]], out_png: str | Path) -> None:
    """L_total, L_real and L_synthesized per step, one line per λ (moving average over ~1/50 of the run; log scale,
    values floored at 1e-8)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.5))
    for ax, key, title in zip(axes, ("loss", "real", "synthetic"),
                              ("L_total (eq. 4)", "L_real_slide", "L_synthesized_slide")):
        positive = True
        for lam, log in logs.items():
            vals = np.array([r[key] for r in log], dtype=float)
            if not len(vals) or np.isnan(vals).all():
                continue
            k = max(1, len(vals) // 50)
            smooth = np.convolve(vals, np.ones(k) / k, mode="valid")
            ax.plot(np.arange(k, len(vals) + 1), np.maximum(smooth, 1e-8), label=f"λ={lam:g}")
            positive = positive and bool((vals[~np.isnan(vals)] >= 0).all())
        if positive and ax.lines:
            ax.set_yscale("log")  # BCE >= 0; an exact 0 (saturated float) drawn at 1e-8
        ax.set_xlabel("step")
        ax.set_title(title)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
