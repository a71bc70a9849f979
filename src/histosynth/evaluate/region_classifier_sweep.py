"""``histosynth evaluate region-classifier``: train the pixel-level region classifier on real tiles, or on real +
synthetic ones with DISC's balance weight λ (eq. 4), and score it on the real test split; several λ make a sweep
(DISC Fig. 6's axis) with ``f1_vs_balance.png``. The classifier itself: :mod:`histosynth.evaluate.region_classifier`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from histosynth.data.regions import open_region_store
from histosynth.errors import DataError, HistosynthError
from histosynth.evaluate.balance import parse_balances
from histosynth.evaluate.region_classifier import evaluate_region_classifier, train_region_classifier

__all__ = ["run_region_classifier"]

LOSS_COLUMNS = {"loss": "total (DISC eq. 4)", "real": "L_real (CE)", "synth": "L_synth (CE)"}


def _train_and_score(store, folder: Path, balance: float, synthetic, settings: dict, device, progress) -> dict:
    from histosynth.viz import plot_loss_curves

    clf, rows = train_region_classifier(store, synthetic=synthetic, balance=balance, device=device,
                                        progress=progress, **settings)
    clf.save(folder / "classifier")
    with open(folder / "losses.jsonl", "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    plot_loss_curves(folder / "losses.jsonl", folder / "loss.png", LOSS_COLUMNS)
    metrics = {"balance": balance, "test": evaluate_region_classifier(clf, store, "test", progress=progress),
               "classifier": clf.describe()}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2, ensure_ascii=False), encoding="utf-8")
    return metrics


def _plot_sweep(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lams = [r["balance"] for r in results]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name in results[0]["test"]["per_label"]:
        f1 = [r["test"]["per_label"][name]["f1"] for r in results]
        ax.plot(lams, [np.nan if v is None else v for v in f1], "o--", lw=1, alpha=0.7, label=name)
    ax.plot(lams, [r["test"]["mean_f1"] for r in results], "ko-", lw=2, label="mean F1")
    ax.set_xlabel("balance weight λ (DISC eq. 4)")
    ax.set_ylabel("pixel F1 (Dice), real test")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_region_classifier(store: str | Path, out: str | Path, *, synthetic: str | Path | None = None,
                          balance: str | float | Sequence[float] = 0.0, steps: int = 300, batch_size: int = 8,
                          lr: float = 1e-3, hidden: int = 64, seed: int = 0, device: str | torch.device = "cpu",
                          overwrite: bool = False, progress: bool = True) -> dict:
    """``histosynth evaluate region-classifier``: train (real, or real + synthetic with λ) and score on real test.

    One λ writes ``out/classifier/``, ``out/metrics.json``, ``out/losses.jsonl``, ``out/loss.png``. Several λ (a
    sweep, DISC Fig. 6's axis) write that per λ in ``out/lambda-<λ>/`` and ``out/metrics.json`` (λ → mean F1, pixel
    accuracy, F1 per label) with ``out/f1_vs_balance.png``; every λ trains with the same seed and settings. The
    folder appears whole (``atomic_folder``). Returns what ``metrics.json`` holds.

    Raises:
        OutputExistsError: ``out`` exists and ``overwrite`` is False.
        DataError / HistosynthError: as :func:`~histosynth.evaluate.region_classifier.train_region_classifier`; a store without test patches (checked first).
    """
    from histosynth.atomic import atomic_folder, refuse_existing

    out = Path(out)
    refuse_existing(out, overwrite)
    balances = parse_balances(balance)
    if synthetic is None and any(b > 0 for b in balances):
        raise HistosynthError(f"--balance {balance}: λ > 0 weights synthetic tiles, give --synthetic FOLDER")
    real = open_region_store(store)
    if not real.indices("test"):
        raise DataError("the region store has no test patches to evaluate on (prepare it with a hold-out)", real.path)
    settings = {"steps": steps, "batch_size": batch_size, "lr": lr, "hidden": hidden, "seed": seed}
    with atomic_folder(out) as partial:
        if len(balances) == 1:
            return _train_and_score(store, partial, balances[0], synthetic, settings, device, progress)
        results = []
        for lam in balances:
            folder = partial / f"lambda-{lam:g}"
            folder.mkdir()
            results.append(_train_and_score(store, folder, lam, synthetic if lam > 0 else None, settings, device,
                                            progress))
        summary = {"sweep": [{"balance": r["balance"], "folder": f"lambda-{r['balance']:g}",
                              "mean_f1": r["test"]["mean_f1"], "pixel_accuracy": r["test"]["pixel_accuracy"],
                              "f1": {n: v["f1"] for n, v in r["test"]["per_label"].items()}} for r in results],
                   "store": str(real.path), "synthetic": None if synthetic is None else str(synthetic),
                   "settings": settings, "n_test_tiles": results[0]["test"]["n_tiles"]}
        (partial / "metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
        _plot_sweep(results, partial / "f1_vs_balance.png")
    return summary
