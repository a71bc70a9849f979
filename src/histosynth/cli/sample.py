"""`histosynth sample`: generate images with a trained model (NASDM on the masks of a store, PathLDM on prompts,
HistoSmith on counts, ZoomLDM at magnifications, DISC on region masks)."""

from __future__ import annotations

import contextlib
import typing
from pathlib import Path

import click

from histosynth.cli.common import SCHEDULER_NAMES, device_option, overwrite_option, seed_option, user_errors
from histosynth.errors import HistosynthError
from histosynth.recipes.zoomldm import ConditionSchedulerName

__all__ = ["sample"]


@click.command()
@click.option("--model", required=True, type=click.Path(path_type=Path), help="A training run or a saved pipeline.")
@click.option("--masks", type=click.Path(path_type=Path), default=None,
              help="NASDM: patch store whose masks condition the samples.")
@click.option("--prompts", type=click.Path(path_type=Path), default=None,
              help="PathLDM: one prompt per line (captions; class names or indices for a class model), or a "
                   "captions JSONL of `histosynth captions build`.")
@click.option("--counts-from", type=click.Path(path_type=Path), default=None,
              help="HistoSmith: draw counts per type and tissue from the patches of this store (its --split).")
@click.option("--requests", "requests_file", type=click.Path(path_type=Path), default=None,
              help="HistoSmith: a CSV (one column per type, optional tissue) or JSONL file of count requests.")
@click.option("--counts", default=None, help="HistoSmith: one request, e.g. inflammatory=20,epithelial=5 (others 0).")
@click.option("--tissue", default=None, help="HistoSmith: the tissue of requests that name none.")
@click.option("--boost", default=None, help="HistoSmith: multiply types' requested counts, e.g. other=3.")
@click.option("--magnification", default=None,
              help="ZoomLDM: the magnification(s) to draw, e.g. 5x or 20x,5x (with --reference default: every level "
                   "of the model the store has).")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="ZoomLDM: condition on the real embedding grids of this store's patches (`prepare slides "
                   "--magnifications` + `embed`) instead of conditions drawn by the model's condition sampler.")
@click.option("--condition-scheduler", default=None, type=click.Choice(typing.get_args(ConditionSchedulerName)),
              help="ZoomLDM without --reference: the condition sampler's scheduler, swapped in on its trained schedule "
                   "(default the recipe's, ddim; euler-ancestral cannot step its x0 predictions).")
@click.option("--condition-steps", type=click.IntRange(min=1), default=None,
              help="ZoomLDM without --reference: the condition sampler's steps (default the recipe's, paper 50).")
@click.option("--regions", type=click.Path(path_type=Path), default=None,
              help="DISC: a region store (`prepare regions`) whose masks condition the tiles (its --split), or a "
                   "tile-set folder (`prepare tile-sets`: every tile of its first --num sets).")
@click.option("--separated", default=None, type=click.Choice(["none", "final", "every-step"]),
              help="DISC: separated conditions: none (SD, the whole mask), final (SD-SC: each present label denoised "
                   "alone from one noise, fused by the mask at the end; costs × labels present) or every-step (fused "
                   "after every step). Default: the recipe's.")
@click.option("--split", default=None, type=click.Choice(["train", "test", "all"]),
              help="The split drawn from: --masks and --regions (default test), --counts-from (default train), --reference "
                   "(default all).")
@click.option("--num", type=click.IntRange(min=1), default=None,
              help="Masks: how many to draw (default 16). Prompts: draw this many at random with replacement "
                   "(default: each prompt once, in order). Counts: images (default 16; --requests: each row once, "
                   "or cycled to this many). ZoomLDM: images per magnification (default 16). Regions: masks (default 16), or sets of a "
                   "tile-set folder (default all).")
@click.option("--guidance", type=float, default=None,
              help="Classifier-free guidance scale g, the same for every model: ε(∅) + g·(ε(y) − ε(∅)); 1 = conditional "
                   "only. Default: the method's (NASDM 2.0 = the paper's s = 1, as s = g − 1; PathLDM, HistoSmith, ZoomLDM "
                   "and DISC the recipe's: 1.75, 2.0, 1.75, 1.75).")
@click.option("--steps", type=int, default=None,
              help="Denoising steps, exactly this many are run (default NASDM 20 (paper 250); PathLDM and HistoSmith "
                   "the recipe's: 20 (paper 50); ZoomLDM the recipe's: 10 (paper 50); DISC the recipe's: 50 (paper "
                   "200); docs/benchmarks.md, \"The defaults\").")
@click.option("--scheduler", "--sampler", "scheduler", default=None, type=click.Choice(list(SCHEDULER_NAMES)),
              help="Sampling scheduler, any model: swapped in on the model's trained noise schedule (one UNet pass per "
                   "step, two with guidance). Default: the model's own (NASDM: ddpm; the latent models: their "
                   "recipe's, ddim). dpm-solver++ is DPM-Solver++(2M); see docs/benchmarks.md for quality vs steps.")
@click.option("--precision", default="fp32", show_default=True, type=click.Choice(["fp32", "bf16", "fp16"]),
              help="The denoiser (UNet) in bf16/fp16, weights and activations (a GPU's tensor cores; on a CPU with "
                   "AVX-512 BF16, bf16 ran the paper-size UNet's forward 1.8x faster, a whole tiny run 1.5x); the "
                   "noise, the scheduler's steps, guidance, the VAE's decoding and the conditioners stay fp32. "
                   "Recorded in the manifest. On a CPU without native bf16 it is slower.")
@click.option("--channels-last", is_flag=True,
              help="The denoiser in channels-last (NHWC) memory format, diffusers' recipe for GPUs (unmeasured there); "
                   "off by default: on CPUs it was within ±5 %% of the default, slower on some (docs/benchmarks.md). "
                   "The images are the default's up to rounding.")
@click.option("--compile", "compile_unet", is_flag=True,
              help="torch.compile the denoiser (the first batch pays the compilation, minutes at paper size; worth "
                   "it for long runs). On a CPU with inductor's freezing (weights pre-packed).")
@click.option("--deep-cache", "deep_cache_interval", type=click.IntRange(min=1), default=1, show_default=True,
              help="DeepCache: run the whole UNet every N-th step only, reusing its deep features in between "
                   "(1 = off; quality cost in docs/benchmarks.md). Recorded in the manifest.")
@seed_option()
@click.option("--batch-size", default=16, show_default=True)
@device_option("torch device (default: cuda if available).")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@overwrite_option()
@user_errors
def sample(model, masks, prompts, counts_from, requests_file, counts, tissue, boost, magnification, reference,
           condition_scheduler, condition_steps, regions, separated, split, num, guidance, steps, scheduler, precision,
           channels_last, compile_unet, deep_cache_interval, seed, batch_size, device, out, overwrite):
    """Generate images with the method of MODEL: NASDM on the masks of a store (each image next to its mask),
    PathLDM on prompts, HistoSmith on counts per nucleus type (images with their labels, ready to train on),
    ZoomLDM at magnifications (conditions drawn by its condition sampler, or a reference store's real ones), DISC on
    the region masks of a region store (each tile with its mask). Unset options take the method's defaults.

    Data-parallel: `accelerate launch -m histosynth.cli sample ...` shares the batches among the processes and writes one
    OUT, the same as one process writes. A killed run continues from its finished batches when the same command is run
    again (they wait in .OUT.partial; a rerun with other settings stops, or with --overwrite starts again)."""
    import torch

    from histosynth.cpu_threads import configure_cpu_threads
    from histosynth.methods import load_pipeline, method_of_model
    from histosynth.diffusion.runtime import compile_denoiser, deep_cache, denoiser_channels_last, denoiser_precision
    from histosynth.sampling.writer import process_state

    state = process_state()  # under `accelerate launch`: this process's share of the batches, on its device
    if device is None:
        device = str(state.device) if state.num_processes > 1 else "cuda" if torch.cuda.is_available() else "cpu"
    method = method_of_model(model)
    count_options = {"counts_from": counts_from, "requests": requests_file, "counts": counts, "tissue": tissue,
                     "boost": boost}
    zoom_options = {"magnification": magnification, "reference": reference}
    # only when given: a partial run from before these options continues (its saved settings lack the keys)
    zoom_options.update({k: v for k, v in (("condition_scheduler", condition_scheduler),
                                           ("condition_steps", condition_steps)) if v is not None})
    region_options = {"store": regions, "separated": separated}
    given = {"masks": masks, "prompts": prompts,
             "regions": region_options if any(v is not None for v in region_options.values()) else None,
             "counts": count_options if any(v is not None for v in count_options.values()) else None,
             "magnifications": zoom_options if any(v is not None for v in zoom_options.values()) else None}
    wanted = method.sample_input
    foreign = [_flag(name) for k, v in given.items() if k != wanted and v is not None
               for name, value in (v.items() if isinstance(v, dict) else [(k, v)]) if value is not None]
    if given[wanted] is None or foreign:
        raise HistosynthError(f"a {method.label} model samples {method.sample_input_help}: give {_HOW[wanted]}"
                              + (f", not {', '.join(foreign)}" if foreign else ""), model)
    if device == "cpu":
        configure_cpu_threads(lambda line: click.echo(f"note: {line}", err=True))
    if compile_unet and deep_cache_interval > 1:
        raise HistosynthError("--compile and --deep-cache change the UNet's forward each in their own way: use one")
    _, pipe = load_pipeline(model, device)
    denoiser_precision(pipe, precision)  # before compiling: a frozen graph keeps the weights it was compiled with
    if channels_last:
        denoiser_channels_last(pipe)
    if compile_unet:
        compile_denoiser(pipe)
    settings = {"num": num, "guidance_scale": guidance, "num_inference_steps": steps, "scheduler": scheduler}
    settings = {k: v for k, v in settings.items() if v is not None}
    if split is not None:
        settings["split"] = None if split == "all" else split
    cache = deep_cache(pipe.unet, deep_cache_interval) if deep_cache_interval > 1 else contextlib.nullcontext()
    with cache:
        method.sample(pipe, given[wanted], out, seed=seed, batch_size=batch_size, overwrite=overwrite, **settings)
    if state.is_main_process:
        click.echo(f"wrote {out}: " + ", ".join(sorted(p.name + ("/" if p.is_dir() else "") for p in Path(out).iterdir())))


def _flag(name: str) -> str:
    """The option that filled ``name`` of a sample input (``given`` above), for messages."""
    return {"masks": "--masks", "prompts": "--prompts", "store": "--regions"}.get(name, "--" + name.replace("_", "-"))


_HOW = {"masks": "--masks STORE", "prompts": "--prompts FILE",
        "counts": "--counts-from STORE, --requests FILE or --counts TYPE=N,... [--tissue NAME]",
        "magnifications": "--magnification LEVELS [--condition-scheduler NAME --condition-steps N] and/or "
                          "--reference STORE",
        "regions": "--regions STORE [--separated none|final|every-step]"}
