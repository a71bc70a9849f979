"""`histosynth evaluate augment | cas`: is the synthetic data useful downstream?

Thin calls into :mod:`histosynth.evaluate.augment` (segmenter trained on real vs real + synthetic, HistoSmith)
and :mod:`histosynth.evaluate.cas` (Classification Accuracy Score, PathLDM). Results are printed as JSON. The
commands of :data:`COMMANDS` are attached to the ``evaluate`` group in :mod:`histosynth.cli`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from histosynth.cli.common import device_option, overwrite_option, result_out_option, seed_option, torch_device, user_errors

__all__ = ["COMMANDS", "augment_cmd", "cas_cmd"]


@click.command("augment")
@click.option("--real", required=True, type=click.Path(path_type=Path), help="Labelled real store (train + test).")
@click.option("--synthetic", required=True, type=click.Path(path_type=Path), help="A `histosynth sample` output.")
@click.option("--ratio", default=1.0, show_default=True, help="Synthetic pairs added per real train patch.")
@click.option("--steps", default=1500, show_default=True, help="Segmenter training steps (both arms).")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--crop", default=128, show_default=True)
@seed_option()
@device_option()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder: both segmenters, augment.json, PNG.")
@overwrite_option()
@user_errors
def augment_cmd(real, synthetic, ratio, steps, batch_size, crop, seed, device, out, overwrite):
    """Train the segmenter on real only vs real + synthetic; report mPQ and per-type PQ on real test."""
    from histosynth.evaluate.augment import augmentation_benefit

    result = augmentation_benefit(real, synthetic, out, ratio=ratio, steps=steps, batch_size=batch_size, crop=crop,
                                  seed=seed, device=torch_device(device), overwrite=overwrite)
    click.echo(json.dumps({k: result[k] for k in ("ratio", "synthetic_pairs", "delta")}, indent=2, default=float))
    click.echo(f"wrote {out}/augment.json and {out}/augment_pq_per_type.png")


@click.command("cas")
@click.option("--real", required=True, type=click.Path(path_type=Path), help="Labelled real store (train + test).")
@click.option("--synthetic", required=True, type=click.Path(path_type=Path), help="A `histosynth sample` output.")
@click.option("--label", default="dominant-type", show_default=True,
              help="'dominant-type' (commonest nucleus type of the mask) or 'field:NAME' (a samples.jsonl field).")
@click.option("--real-labels", type=click.Path(path_type=Path), default=None,
              help="For field:NAME: JSONL of {store_index, NAME} for the real patches.")
@click.option("--features", default="effnet-lite0", show_default=True,
              help="Frozen encoder: effnet-lite0 (offline), inception, or a local encoder path.")
@click.option("--batch-size", default=32, show_default=True)
@seed_option()
@device_option()
@result_out_option()
@overwrite_option()
@user_errors
def cas_cmd(real, synthetic, label, real_labels, features, batch_size, seed, device, out, overwrite):
    """Classification Accuracy Score: a classifier trained on synthetic images, tested on real (+ references)."""
    from histosynth.evaluate.cas import classification_accuracy_score

    result = classification_accuracy_score(real, synthetic, out, label=label, real_labels=real_labels,
                                           features=features, batch_size=batch_size, device=torch_device(device),
                                           seed=seed, overwrite=overwrite)
    click.echo(json.dumps(result, indent=2, default=str))


#: the commands of this module, attached to the ``evaluate`` group in :mod:`histosynth.cli`
COMMANDS = (augment_cmd, cas_cmd)
