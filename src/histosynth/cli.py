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
def _pipeline_class(model: Path) -> str:
    """The pipeline class a run or pipeline folder holds (its model_index.json's _class_name)."""
    for index in (model / "pipeline" / "model_index.json", model / "model_index.json"):
        if index.is_file():
            try:
                return json.loads(index.read_text())["_class_name"]
            except (OSError, ValueError, KeyError) as exc:
                raise HistosynthError(f"unreadable pipeline description: {exc}", index) from None
    raise HistosynthError("not a training run or saved pipeline (no model_index.json)", model)


@main.command()
@click.option("--model", required=True, type=click.Path(path_type=Path), help="A training run or a saved pipeline.")
@click.option("--masks", type=click.Path(path_type=Path), default=None,
              help="NASDM: patch store whose masks condition the samples.")
@click.option("--prompts", type=click.Path(path_type=Path), default=None,
              help="PathLDM: one prompt per line (captions; class names or indices for a class model), or a "
                   "captions JSONL of `histosynth captions build`.")
@click.option("--split", default="test", show_default=True, type=click.Choice(["train", "test", "all"]),
              help="With --masks: the split whose masks are drawn.")
@click.option("--num", type=int, default=None,
              help="Masks: how many to draw (default 16). Prompts: draw this many at random with replacement "
                   "(default: each prompt once, in order).")
@click.option("--guidance", type=float, default=None,
              help="NASDM: its scale s (0 = conditional only; default 1.0). PathLDM: diffusers/LDM scale g "
                   "(1 = conditional only; default the recipe's, 1.75 as the paper); g = s + 1.")
@click.option("--steps", type=int, default=None,
              help="Denoising steps, exactly this many are run (default NASDM 250, PathLDM the recipe's: 50).")
@click.option("--sampler", default=None, type=click.Choice(["ddpm", "ddim"]),
              help="NASDM: ddpm (default) or ddim. PathLDM: ddim only.")
@click.option("--seed", default=0, show_default=True)
@click.option("--batch-size", default=16, show_default=True)
@click.option("--device", default=None, help="torch device (default: cuda if available).")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True)
@user_errors
def sample(model, masks, prompts, split, num, guidance, steps, sampler, seed, batch_size, device, out, overwrite):
    """Generate images: NASDM on the masks of a store (each image next to its mask), PathLDM on prompts."""
    import torch

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if _pipeline_class(model) == "PathLDMPipeline":
        from histosynth.pipelines.pathldm import PathLDMPipeline
        from histosynth.sampling_prompts import sample_prompts

        if prompts is None or masks is not None:
            raise HistosynthError("a PathLDM model samples prompts: give --prompts FILE (and no --masks)", model)
        if sampler == "ddpm":
            raise HistosynthError("PathLDM samples with DDIM (--sampler ddim)")
        pipe = PathLDMPipeline.from_pretrained(model).to(device)
        defaults = pipe.config.get("sampling") or {}
        sample_prompts(pipe, prompts, out, num=num, guidance_scale=defaults.get("guidance_scale", 1.75) if guidance is None
                       else guidance, num_inference_steps=steps or defaults.get("num_inference_steps", 50),
                       eta=defaults.get("eta", 0.0), seed=seed, batch_size=batch_size, overwrite=overwrite)
        click.echo(f"wrote {out}: images/, samples.jsonl (prompt and seed of each image), grid.png")
        return
    from histosynth.pipelines.nasdm import NASDMPipeline
    from histosynth.sampling import sample_store

    if masks is None or prompts is not None:
        raise HistosynthError("a NASDM model samples the masks of a store: give --masks STORE (and no --prompts)", model)
    pipe = NASDMPipeline.from_pretrained(model).to(device)
    sample_store(pipe, masks, out, split=None if split == "all" else split, num=16 if num is None else num,
                 guidance_scale=1.0 if guidance is None else guidance, num_inference_steps=steps or 250,
                 sampler=sampler or "ddpm", seed=seed, batch_size=batch_size, overwrite=overwrite)
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
    from histosynth.evaluate.cli_downstream import register as register_downstream
    from histosynth.evaluate.cli_reconstruction import register as register_reconstruction
    from histosynth.evaluate.cli_segmenter import seg
    from histosynth.models.cli_convert import convert

    register_slides(prepare)
    register_distribution(evaluate)
    register_controllability(evaluate)
    register_downstream(evaluate)
    register_reconstruction(evaluate)
    main.add_command(captions)
    main.add_command(seg)
    main.add_command(convert)


_register_extensions()

if __name__ == "__main__":
    main()
