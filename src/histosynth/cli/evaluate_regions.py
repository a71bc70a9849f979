"""`histosynth evaluate region-classifier | region-adherence`: DISC's pixel-level grading model and region adherence.

Thin calls into :mod:`histosynth.evaluate.region_classifier` (train the frozen-feature pixel classifier on a region
store, real or real + synthetic with DISC's balance weight λ, eq. 4; score it on the real test split) and
:mod:`histosynth.evaluate.region_adherence` (a real-trained classifier on generated tiles vs their masks). The
commands of :data:`COMMANDS` are attached to the ``evaluate`` group in :mod:`histosynth.cli`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from histosynth.cli.common import balance_option, device_option, overwrite_option, result_out_option, seed_option, torch_device, user_errors

__all__ = ["COMMANDS", "region_adherence_cmd", "region_classifier_cmd"]


@click.command("region-classifier")
@click.option("--store", required=True, type=click.Path(path_type=Path),
              help="Real region store (`prepare regions`): trained on its train split, scored on its test split.")
@click.option("--out", required=True, type=click.Path(path_type=Path),
              help="Folder: classifier/, metrics.json, losses.jsonl, loss.png (a sweep: lambda-<λ>/ each).")
@click.option("--synthetic", type=click.Path(path_type=Path), default=None,
              help="A `histosynth sample --regions` output (images + masks) to train on with weight λ.")
@balance_option()
@click.option("--steps", default=300, show_default=True, help="Training steps (per λ).")
@click.option("--batch-size", default=8, show_default=True, help="Tiles per batch (per side: real, synthetic).")
@click.option("--lr", default=1e-3, show_default=True)
@seed_option()
@device_option()
@overwrite_option()
@user_errors
def region_classifier_cmd(store, out, synthetic, balance, steps, batch_size, lr, seed, device, overwrite):
    """Train the pixel-level region classifier and report pixel F1 / precision / recall on the real test split."""
    from histosynth.evaluate.region_classifier_sweep import run_region_classifier

    result = run_region_classifier(store, out, synthetic=synthetic, balance=balance, steps=steps,
                                   batch_size=batch_size, lr=lr, seed=seed, device=torch_device(device),
                                   overwrite=overwrite)
    if "sweep" in result:
        summary = {"sweep": [{k: r[k] for k in ("balance", "mean_f1", "pixel_accuracy")} for r in result["sweep"]]}
        click.echo(json.dumps(summary, indent=2, ensure_ascii=False))
        click.echo(f"wrote {out}/metrics.json, {out}/f1_vs_balance.png and {out}/lambda-*/classifier/")
    else:
        test = result["test"]
        click.echo(json.dumps({"balance": result["balance"], "mean_f1": test["mean_f1"],
                               "pixel_accuracy": test["pixel_accuracy"],
                               "f1": {n: v["f1"] for n, v in test["per_label"].items()}}, indent=2))
        click.echo(f"wrote {out}/classifier/, {out}/metrics.json and {out}/loss.png")


@click.command("region-adherence")
@click.option("--classifier", required=True, type=click.Path(path_type=Path),
              help="A classifier trained on real tiles (`evaluate region-classifier` --out, or its classifier/).")
@click.option("--samples", required=True, type=click.Path(path_type=Path),
              help="A `histosynth sample --regions` output (images/, masks/, real/, classes.txt).")
@result_out_option("Also write the result to this JSON file, and tile | mask | prediction rows to the same name "
                   "with .png.")
@click.option("--batch-size", default=8, show_default=True)
@device_option()
@overwrite_option()
@user_errors
def region_adherence_cmd(classifier, samples, out, batch_size, device, overwrite):
    """Agreement per region label between the classifier's map of each generated tile and its mask (+ real ceiling)."""
    from histosynth.evaluate.region_adherence import region_adherence
    from histosynth.evaluate.region_classifier import load_region_classifier

    clf = load_region_classifier(classifier, device=torch_device(device))
    result = region_adherence(clf, samples, out=out, overwrite=overwrite, batch_size=batch_size)
    summary = {"generated": {k: result["generated"][k] for k in ("agreement", "mean_agreement", "pixel_agreement")},
               "real": None if result["real"] is None else
               {k: result["real"][k] for k in ("agreement", "mean_agreement", "pixel_agreement")},
               "n_tiles": result["protocol"]["n_tiles"], "classifier_id": result["protocol"]["classifier_id"]}
    if "warning" in result:
        summary["warning"] = result["warning"]
    click.echo(json.dumps(summary, indent=2, ensure_ascii=False))
    if out is not None:
        click.echo(f"wrote {out} and {result['png']}")


#: the commands of this module, attached to the ``evaluate`` group in :mod:`histosynth.cli`
COMMANDS = (region_classifier_cmd, region_adherence_cmd)
