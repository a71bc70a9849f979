"""`histosynth convert autoencoder CKPT --out DIR`: an official CompVis / LDM checkpoint as a diffusers folder.

The group :data:`convert` is attached to the ``histosynth`` command in :mod:`histosynth.cli`; a thin call into
:func:`histosynth.models.compvis_autoencoder.convert_compvis_first_stage`.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from histosynth.atomic import refuse_existing
from histosynth.cli.common import overwrite_option, user_errors

__all__ = ["convert"]

REPORT = "conversion_report.json"


@click.group()
def convert():
    """Convert checkpoints of other code bases to diffusers folders."""


@convert.command("autoencoder")
@click.argument("ckpt", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="diffusers folder to write.")
@click.option("--kind", type=click.Choice(["vq", "kl"]), default=None, help="Insist on a VQ or KL autoencoder.")
@click.option("--norm-num-groups", type=int, default=32, show_default=True, help="GroupNorm groups (CompVis: 32).")
@click.option("--scaling-factor", type=float, default=None,
              help="Latent scaling factor to store (default: the LDM checkpoint's scale_factor, else 1.0).")
@overwrite_option("Replace an existing --out folder.")
@user_errors
def convert_autoencoder(ckpt, out, kind, norm_num_groups, scaling_factor, overwrite):
    """Convert a CompVis first-stage model.ckpt or a full LDM .ckpt (PathLDM, ZoomLDM) to a diffusers folder.

    The folder loads with VQModel.from_pretrained / AutoencoderKL.from_pretrained; it also holds
    conversion_report.json (loaded / skipped / missing keys).
    """
    from histosynth.diffusion.checkpoint import write_atomically
    from histosynth.models.compvis_autoencoder import convert_compvis_first_stage

    refuse_existing(out, overwrite)
    config = {"norm_num_groups": norm_num_groups}
    if scaling_factor is not None:
        config["scaling_factor"] = scaling_factor
    model, report = convert_compvis_first_stage(ckpt, kind=kind, config=config)
    if scaling_factor is not None and report.scaling_factor != scaling_factor:  # --scaling-factor wins
        model.register_to_config(scaling_factor=scaling_factor)
        report.scaling_factor, report.scaling_factor_source = scaling_factor, "given (--scaling-factor)"
    for line in report.summary():
        click.echo(line)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        (tmp / REPORT).write_text(json.dumps(report.to_dict(), indent=2))

    if out.exists() and not out.is_dir():
        out.unlink()
    write_atomically(out, write)  # replaces an existing folder only once the new one is complete
    click.echo(f"wrote {out} ({type(model).__name__}; {REPORT} lists every key)")
