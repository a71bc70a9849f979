"""Sample a text- or class-conditioned latent diffusion model (PathLDM) on the prompts of a file.

Prompts: a text file with one prompt per line, or a captions JSONL (`histosynth captions build`); the model's
conditioner turns each entry into its prompt (``prompt_for_row``: a caption, or a class by the rule the model
was trained with, or a class name / index). Without ``num`` every prompt is sampled once, in file order; with
``num`` that many prompts are drawn at random (with replacement, by ``seed``): PathLDM's protocol for FID, which
conditions on captions drawn from the training set.

Each image has its own generator, seeded ``seed · 1_000_003 + n`` for the n-th image (CPU, so a row of
the manifest re-creates its image on any device and with any batch size).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from histosynth.conditions.patch_captions import read_prompts
from histosynth.diffusion.sampling_loop import check_num_steps
from histosynth.diffusion.schedulers import use_scheduler
from histosynth.pipelines.pathldm import DEFAULT_SAMPLING
from histosynth.sampling.writer import SampleWriter, run_settings


def image_seed(seed: int, n: int) -> int:
    return int(seed) * 1_000_003 + int(n)


def sample_prompts(pipe, prompts_file: str | Path, out: str | Path, *, num: int | None = None,
                   guidance_scale: float | None = None, num_inference_steps: int | None = None,
                   scheduler: str | None = None, eta: float | None = None, seed: int = 0, batch_size: int = 8,
                   overwrite: bool = False, progress: bool = True, grid_size: tuple[int, int] = (4, 8),
                   split: str | None = None) -> Path:
    """Writes OUT/images/N.png, OUT/samples.jsonl (prompt, class, seed, scheduler settings per image) and OUT/grid.png.
    Unset settings come from the pipeline's recipe defaults (PathLDM: DDIM 20 steps, g 1.75, η 0; paper 50).
    ``split`` is accepted for the common sampling signature and unused (a prompts file has no split).

    Raises:
        HistosynthError: an unknown scheduler; DataError: an entry the model cannot take (names the line).
    """
    arguments = dict(locals())  # the run's settings (a rerun continues a run with the same)
    guidance_scale, num_inference_steps, eta = pipe.sampling_settings(
        DEFAULT_SAMPLING, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, eta=eta)
    scheduler = use_scheduler(pipe, scheduler)
    check_num_steps(pipe.scheduler, num_inference_steps)  # before anything is written
    out, prompts_file = Path(out), Path(prompts_file)
    entries = read_prompts(prompts_file)
    model_prompts = [pipe.conditioner.prompt_for_row(e, prompts_file) for e in entries]
    order = list(range(len(entries))) if num is None else np.random.default_rng(seed).integers(0, len(entries), size=num).tolist()
    rows_max, cols = grid_size
    with SampleWriter(out, overwrite, grid_rows=rows_max, grid_columns=cols,
                      settings=run_settings(pipe, arguments)) as writer:
        for start in writer.batches(range(0, len(order), batch_size), progress=progress):
            chunk = order[start:start + batch_size]
            seeds = [image_seed(seed, writer.count + j) for j in range(len(chunk))]
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            result = pipe([model_prompts[i] for i in chunk], guidance_scale=guidance_scale,
                          num_inference_steps=num_inference_steps, eta=eta, generator=generators, progress=False)
            for i, image, s in zip(chunk, result.images, seeds):
                row = {"prompt": entries[i]["prompt"], "prompts_file": str(prompts_file), "line": entries[i]["line"],
                       "seed": s, "base_seed": seed, "guidance_scale": guidance_scale,
                       "num_inference_steps": result.num_steps_run, "scheduler": scheduler, "eta": eta,
                       **pipe.conditioner.manifest_fields(model_prompts[i])}
                writer.add(image, row)
    return out
