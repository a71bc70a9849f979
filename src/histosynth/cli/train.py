"""`histosynth train`: train what a recipe describes, through the method registry and the one engine.

Multi-GPU / multi-node through accelerate: ``accelerate launch -m histosynth.cli train ...``.
"""

from __future__ import annotations

from pathlib import Path

import click

from histosynth.cli.common import overwrite_option, user_errors
from histosynth.errors import HistosynthError

__all__ = ["train"]

_WHAT = {"diffusion": "a diffusion model", "autoencoder": "an autoencoder", "segmenter": "a nuclei segmenter"}


@click.command()
@click.argument("what", required=False, type=click.Choice(["diffusion", "autoencoder", "segmenter"]))
@click.option("--recipe", required=True, help="Built-in recipe name (nasdm-tiny-cpu, vq-f4, ...) or a YAML path.")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Patch store made by `prepare`.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimisation steps (default: the recipe's).")
@click.option("--resume", is_flag=True, help="Continue from the run's latest checkpoint.")
@overwrite_option("Delete an existing run directory first.")
@user_errors
def train(what, recipe, data, out, max_steps, resume, overwrite):
    """Train what RECIPE describes (WHAT, optional: diffusion | autoencoder | segmenter, checked against the recipe).

    Multi-GPU / multi-node: `accelerate launch -m histosynth.cli train ...`.
    """
    from histosynth.methods import get_method
    from histosynth.recipes import load_recipe
    from histosynth.cpu_threads import configure_cpu_threads
    from histosynth.training import fit

    loaded = load_recipe(recipe)
    configure_cpu_threads(lambda line: click.echo(f"note: {line}", err=True))
    method = get_method(loaded.method)
    if what is not None and what != method.trains:
        raise HistosynthError(f"recipe {recipe!r} trains {_WHAT[method.trains]} (method {loaded.method!r}), not {_WHAT[what]}")
    task = method.task(loaded, data)
    result = fit(task, out, max_steps=max_steps, resume=resume, overwrite=overwrite)
    click.echo(f"trained {result.run} to step {result.step}: last loss {result.last_loss:.4f}, {result.images_per_second:.1f} images/s, "
               f"{result.data_wait_fraction:.0%} of the time waiting for data")
