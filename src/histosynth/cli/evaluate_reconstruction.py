"""`histosynth evaluate recon`: reconstruction SSIM / PSNR / MSE of an autoencoder on held-out patches; for
HistoSmith's joint first stage also distance-map MAE, per-type Dice of the decoded mask and PQ / mPQ of the
instances recovered from the decoded labels (the ``labels`` section).

Attached to the ``evaluate`` group in :mod:`histosynth.cli` (:data:`COMMANDS`). Writes the metrics with their
protocol as JSON (``--out``) and a PNG of originals (top row) over reconstructions (bottom row) — for a joint
model one row per patch: original | reconstruction | true labels | decoded labels.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from histosynth.atomic import refuse_existing
from histosynth.cli.common import device_option, overwrite_option, seed_option, torch_device, user_errors
from histosynth.errors import HistosynthError

__all__ = ["COMMANDS", "recon"]


@click.command("recon")
@click.option("--autoencoder", "autoencoder", required=True, type=click.Path(path_type=Path),
              help="A diffusers VQModel/AutoencoderKL folder, a `train autoencoder` run (also HistoSmith's joint "
                   "first stage: then the store must be labelled and the labels are scored too), or a CompVis/LDM "
                   ".ckpt.")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Patch store with the held-out patches.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test", "all"]))
@click.option("--num", type=click.IntRange(min=1), default=None, help="Number of patches (default: all of the split).")
@seed_option("Draws the --num patches.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(min=1))
@device_option("torch device (default: cuda if available).")
@click.option("--features", default="none", show_default=True,
              help="Also report rFD, the Fréchet distance of reconstructions to originals, on these features: "
                   "inception (LDM's rFID; downloads unless --features-weights), effnet-lite0 (offline) or a local "
                   "encoder's PATH (as `evaluate fid`); none: pixel metrics only.")
@click.option("--features-weights", default=None, type=click.Path(path_type=Path),
              help="Local weight file for inception / effnet-lite0.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="JSON file for the metrics.")
@click.option("--grid", type=click.Path(path_type=Path), default=None,
              help="PNG of originals over reconstructions; joint model: rows of original | reconstruction | true "
                   "labels | decoded labels (default: --out with .png).")
@overwrite_option("Replace existing --out / --grid files.")
@user_errors
def recon(autoencoder, data, split, num, seed, batch_size, device, features, features_weights, out, grid, overwrite):
    """Reconstruction quality (SSIM, PSNR, MSE; PathLDM Table 2; optionally rFD) of an autoencoder on a store's
    patches; for a joint (image + labels) first stage also distance-map MAE, mask Dice and PQ / mPQ."""
    from histosynth.evaluate.reconstruction import evaluate_reconstruction
    from histosynth.models.autoencoders import load_autoencoder
    from histosynth.viz import save_grid

    grid = grid or out.with_suffix(".png")
    for path in (out, grid):
        refuse_existing(path, overwrite, "file")
    ae, report = load_autoencoder(autoencoder)
    if report is not None:
        for line in report.summary():
            click.echo(line, err=True)
    device = torch_device(device)
    ae.to(device)
    extractor = None
    if features.strip().lower() != "none":
        from histosynth.evaluate.features import load_feature_extractor

        extractor = load_feature_extractor(features, features_weights, device)
    elif features_weights is not None:
        raise HistosynthError("--features-weights needs --features inception or effnet-lite0", features_weights)
    evaluation = evaluate_reconstruction(
        ae, data, split=None if split == "all" else split, num=num, seed=seed, batch_size=batch_size,
        extractor=extractor)
    result = evaluation.result
    result["autoencoder"]["source"] = str(autoencoder)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    save_grid(evaluation.grid_rows(), grid)
    shown = {"metrics": result["metrics"], "labels": result["labels"]} if "labels" in result else result["metrics"]
    click.echo(json.dumps(shown, indent=2))
    layout = ("rows: original | reconstruction | true labels | decoded labels" if evaluation.joint
              else "top: originals, bottom: reconstructions")
    click.echo(f"wrote {out} and {grid} ({layout})", err=True)


#: the commands of this module, attached to the ``evaluate`` group in :mod:`histosynth.cli`
COMMANDS = (recon,)
