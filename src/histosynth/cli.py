"""The `histosynth` command line: each command is a thin call into the library.

User errors (HistosynthError) print one line naming the file and exit with status 2, no traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from histosynth.cli_common import user_errors
from histosynth.errors import HistosynthError

MAGNIFICATIONS = ["40x", "20x", "10x", "5x"]



@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="histosynth")
def main():
    """Labelled H&E image synthesis with diffusion models."""


# ---------------------------------------------------------------------------------------- quickstart
@main.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option("--max-steps", type=int, default=None, help="Training steps (default: the nasdm-tiny-cpu recipe's).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output directory.")
@user_errors
def quickstart(out, max_steps, overwrite):
    """Prepare the bundled HGSC sample, train a tiny NASDM, sample held-out masks, write grid.png + metrics.json."""
    from histosynth.quickstart import run_quickstart

    metrics = run_quickstart(out, max_steps=max_steps, overwrite=overwrite)
    click.echo(json.dumps(metrics, indent=2))
    click.echo(f"wrote {out / 'grid.png'} (rows: condition mask | generated | real) and {out / 'metrics.json'}")


# ------------------------------------------------------------------------------------------- prepare
@main.group()
def prepare():
    """Build a patch store from a dataset in its native format."""


@prepare.command("nuclei")
@click.argument("src", type=click.Path(path_type=Path))
@click.option("--format", "fmt", required=True, type=click.Choice(["lizard", "conic", "pannuke", "consep", "folder"]))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="The patch store to create.")
@click.option("--patch", default=128, show_default=True, help="Patch size in pixels.")
@click.option("--overlap", default=0.5, show_default=True, help="Overlap of neighbouring patches (NASDM: 0.5).")
@click.option("--magnification", default="20x", show_default=True, type=click.Choice(MAGNIFICATIONS))
@click.option("--source-magnification", type=click.Choice(MAGNIFICATIONS), default=None,
              help="Magnification of the source images (required for --format folder unless known).")
@click.option("--holdout", default=0.075, show_default=True,
              help="Area fraction of each region held out as test, for datasets without their own split (NASDM: 7.5%).")
@click.option("--stain-normalize", type=click.Choice(["none", "vahadane", "macenko"]), default="none", show_default=True)
@click.option("--stain-target", type=click.Path(path_type=Path), default=None, help="Target image for stain normalization.")
@click.option("--class-names", default=None, help="Comma-separated class names for type ids 1..K (folder format).")
@click.option("--consep-classes", type=click.Choice(["merged", "original", "merge-original"]), default="merged", show_default=True)
@click.option("--pannuke-test-folds", default="3", show_default=True, help="Comma-separated PanNuke folds used as test.")
@click.option("--seed", default=0, show_default=True)
@click.option("--overwrite", is_flag=True)
@user_errors
def prepare_nuclei_cmd(src, fmt, out, patch, overlap, magnification, source_magnification, holdout, stain_normalize,
                       stain_target, class_names, consep_classes, pannuke_test_folds, seed, overwrite):
    """Tile SRC (a dataset in its native FORMAT) into a streaming patch store with a manifest."""
    from histosynth.data.formats import read_nuclei
    from histosynth.data.stain import make_stain_normalizer
    from histosynth.data.store import prepare_nuclei

    options = {}
    if fmt == "consep":
        options["classes"] = consep_classes
    elif fmt == "pannuke":
        test = tuple(int(f) for f in pannuke_test_folds.split(","))
        options.update(test_folds=test, train_folds=tuple(f for f in (1, 2, 3) if f not in test))
    elif fmt == "folder":
        if class_names:
            options["class_names"] = tuple(c.strip() for c in class_names.split(","))
        options["magnification"] = source_magnification
    if stain_normalize != "none" and stain_target is None:
        raise HistosynthError(f"--stain-normalize {stain_normalize} needs --stain-target IMAGE")
    normalizer = make_stain_normalizer(stain_normalize, stain_target)
    store = prepare_nuclei(
        read_nuclei(fmt, src, **options), out, patch=patch, overlap=overlap, magnification=magnification,
        holdout=holdout, source_magnification=source_magnification, stain_normalizer=normalizer, seed=seed,
        overwrite=overwrite, command=" ".join(sys.argv),
    )
    counts = {s: len(store.indices(s)) for s in ("train", "test")}
    click.echo(f"wrote {out}: {len(store)} patches ({counts['train']} train, {counts['test']} test), classes {list(store.class_names)}")


# --------------------------------------------------------------------------------------------- train
# recipe method -> the function that trains it: f(recipe, data, out, max_steps=, resume=, overwrite=) -> result
# with .run, .step, .last_loss, .images_per_second. Methods add theirs here.
TRAINERS = {
    "nasdm": "histosynth.diffusion.training:train",
    "autoencoder": "histosynth.diffusion.autoencoder_training:train_autoencoder",
}
TRAINERS["ldm"] = "histosynth.diffusion.latent_training:train_latent"


def _trainer(method: str):
    import importlib

    if method not in TRAINERS:
        raise HistosynthError(f"no trainer for recipe method {method!r}; known: {', '.join(sorted(TRAINERS))}")
    module, name = TRAINERS[method].split(":")
    return getattr(importlib.import_module(module), name)


@main.command()
@click.argument("what", required=False, type=click.Choice(["diffusion", "autoencoder"]))
@click.option("--recipe", required=True, help="Built-in recipe name (nasdm-tiny-cpu, vq-f4, ...) or a YAML path.")
@click.option("--data", required=True, type=click.Path(path_type=Path), help="Patch store made by `prepare`.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Run directory.")
@click.option("--max-steps", type=int, default=None, help="Stop after this many optimisation steps (default: the recipe's).")
@click.option("--resume", is_flag=True, help="Continue from the run's latest checkpoint.")
@click.option("--overwrite", is_flag=True, help="Delete an existing run directory first.")
@user_errors
def train(what, recipe, data, out, max_steps, resume, overwrite):
    """Train what RECIPE describes (WHAT, optional: diffusion | autoencoder, checked against the recipe).

    Multi-GPU / multi-node: `accelerate launch -m histosynth.cli train ...`.
    """
    from histosynth.recipes import load_recipe

    loaded = load_recipe(recipe)
    is_autoencoder = loaded.method == "autoencoder"
    if what is not None and (what == "autoencoder") != is_autoencoder:
        raise HistosynthError(f"recipe {recipe!r} trains {'an autoencoder' if is_autoencoder else 'a diffusion model'}"
                              f" (method {loaded.method!r}), not {'an autoencoder' if what == 'autoencoder' else 'a diffusion model'}")
    result = _trainer(loaded.method)(loaded, data, out, max_steps=max_steps, resume=resume, overwrite=overwrite)
    click.echo(f"trained {result.run} to step {result.step}: last loss {result.last_loss:.4f}, {result.images_per_second:.1f} images/s")


# -------------------------------------------------------------------------------------------- sample
@main.command()
@click.option("--model", required=True, type=click.Path(path_type=Path), help="A training run or a saved pipeline.")
@click.option("--masks", required=True, type=click.Path(path_type=Path), help="Patch store whose masks condition the samples.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test", "all"]))
@click.option("--num", default=16, show_default=True, help="Number of masks to sample (drawn by --seed).")
@click.option("--guidance", default=1.0, show_default=True, help="NASDM guidance scale s (0 = conditional only).")
@click.option("--steps", default=250, show_default=True, help="Denoising steps (exactly this many are run).")
@click.option("--sampler", default="ddpm", show_default=True, type=click.Choice(["ddpm", "ddim"]))
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--device", default=None, help="torch device (default: cuda if available).")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True)
@user_errors
def sample(model, masks, split, num, guidance, steps, sampler, seed, batch_size, device, out, overwrite):
    """Generate images conditioned on the masks of a store; each image is written next to its mask."""
    import torch

    from histosynth.pipelines.nasdm import NASDMPipeline
    from histosynth.sampling import sample_store

    pipe = NASDMPipeline.from_pretrained(model).to(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    sample_store(pipe, masks, out, split=None if split == "all" else split, num=num, guidance_scale=guidance,
                 num_inference_steps=steps, sampler=sampler, seed=seed, batch_size=batch_size, overwrite=overwrite)
    click.echo(f"wrote {out}: images/, masks/, labels/, real/, samples.jsonl, grid.png")


# ------------------------------------------------------------------------------------------ evaluate
@main.group()
def evaluate():
    """Evaluate generated images."""


def _register_extensions() -> None:
    """Command modules that live next to the library code they call."""
    from histosynth.conditions.cli_captions import captions
    from histosynth.data.cli_slides import register as register_slides
    from histosynth.evaluate.cli_controllability import register as register_controllability
    from histosynth.evaluate.cli_distribution import register as register_distribution
    from histosynth.evaluate.cli_reconstruction import register as register_reconstruction
    from histosynth.evaluate.cli_segmenter import seg
    from histosynth.models.cli_convert import convert

    register_slides(prepare)
    register_distribution(evaluate)
    register_controllability(evaluate)
    register_reconstruction(evaluate)
    main.add_command(captions)
    main.add_command(seg)
    main.add_command(convert)


_register_extensions()

if __name__ == "__main__":
    main()
