"""`histosynth quickstart`: the whole path on the bundled HGSC sample (a thin call into
:func:`histosynth.quickstart.run_quickstart`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from histosynth.cli.common import overwrite_option, user_errors

__all__ = ["quickstart"]


@click.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--max-steps", type=int, default=None, help="Training steps (default: the nasdm-tiny-cpu recipe's).")
@overwrite_option("Replace an existing output directory.")
@user_errors
def quickstart(out, max_steps, overwrite):
    """Prepare the bundled HGSC sample, train a tiny NASDM, sample held-out masks, write grid.png + metrics.json."""
    from histosynth.cpu_threads import configure_cpu_threads
    from histosynth.quickstart import run_quickstart

    configure_cpu_threads(lambda line: click.echo(f"note: {line}", err=True))

    metrics = run_quickstart(out, max_steps=max_steps, overwrite=overwrite)
    click.echo(json.dumps(metrics, indent=2))
    click.echo(f"wrote {out / 'grid.png'} (rows: condition mask | generated | real) and {out / 'metrics.json'}")
