"""`histosynth evaluate mil`: DISC's slide-level grading model on real slides + generated tile sets, swept over λ.

A thin call into :func:`histosynth.evaluate.mil_run.evaluate_mil` (model: :mod:`histosynth.evaluate.mil`; bags and
the tile-set layout: :mod:`histosynth.evaluate.mil_bags`). The commands of :data:`COMMANDS` are attached to the
``evaluate`` group in :mod:`histosynth.cli`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from histosynth.cli.common import balance_option, device_option, overwrite_option, seed_option, user_errors

__all__ = ["COMMANDS", "mil_cmd"]


@click.command("mil")
@click.option("--real", required=True, type=click.Path(path_type=Path),
              help="Region store (`histosynth prepare regions`): one bag per slide (manifest source).")
@click.option("--synthetic", type=click.Path(path_type=Path), default=None,
              help="Folder of generated tile sets: sets.jsonl rows {set, primary, secondary, tiles: [paths]}.")
@balance_option()
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder: results.json, lambda_sweep.png, losses, cached features.")
@click.option("--encoder", default=None,
              help="Frozen tile encoder: efficientnet-lite0 (offline, default), a timm hub id, or a local path.")
@click.option("--architecture", type=click.Choice(["attention", "transmil"]), default="attention", show_default=True,
              help="Gated attention MIL (Ilse et al. 2018) or TransMIL-lite.")
@click.option("--steps", default=1000, show_default=True,
              help="Training steps per λ (one real + one synthetic bag each).")
@click.option("--lr", default=5e-4, show_default=True, help="AdamW learning rate.")
@click.option("--classes", default=None, help="Output labels, comma-separated (default: all the store's labels).")
@click.option("--min-share", default=0.05, show_default=True,
              help="A real slide has a label when the label covers at least this share of its pixels.")
@click.option("--max-labels", default=2, show_default=True, help="At most this many labels per real slide (primary + "
              "secondary: 2; 0 = no limit).")
@click.option("--negative-label", default=None,
              help="A label (e.g. non-cancer) given only when no other label reaches --min-share (default: the store's "
                   "label 0, the rule of the synthetic tile sets, so that real and synthetic targets mean the same).")
@click.option("--split", type=click.Choice(["auto", "store", "slides"]), default="auto", show_default=True,
              help="Real slides' train/test: the store's split, whole slides at random, or the store's when it can.")
@click.option("--test-fraction", default=0.3, show_default=True, help="For --split slides: share of slides held out.")
@click.option("--batch-size", default=32, show_default=True, help="Tiles per encoder batch.")
@seed_option()
@device_option()
@overwrite_option()
@user_errors
def mil_cmd(real, synthetic, balance, out, encoder, architecture, steps, lr, classes, min_share, max_labels,
            negative_label, split, test_fraction, batch_size, seed, device, overwrite):
    """DISC's slide-level model (attention MIL, sigmoid multi-label): AUROC per grade on real test slides per λ."""
    import torch

    from histosynth.evaluate.mil_run import evaluate_mil

    names = [c.strip() for c in classes.split(",") if c.strip()] if classes else None
    result = evaluate_mil(real, synthetic, out, balances=balance, encoder=encoder, architecture=architecture,
                          steps=steps, lr=lr, classes=names, min_share=min_share, max_labels=max_labels,
                          negative_label=negative_label, split=split, test_fraction=test_fraction, seed=seed,
                          batch_size=batch_size, device=device or ("cuda" if torch.cuda.is_available() else "cpu"),
                          overwrite=overwrite)
    table = [{"balance": r["balance"], "macro_auroc": r["macro_auroc"], **r["auroc"]} for r in result["sweep"]]
    click.echo(json.dumps({"auroc": table, "best": result["best"], "bags": {k: v for k, v in result["bags"].items()
                                                                          if k != "positives"}}, indent=2))
    click.echo(f"wrote {out}/results.json and {out}/lambda_sweep.png")


#: the commands of this module, attached to the ``evaluate`` group in :mod:`histosynth.cli`
COMMANDS = (mil_cmd,)
