"""Sample a text- or class-conditioned latent diffusion model (PathLDM) on the prompts of a file.

Prompts: a text file with one prompt per line, or a captions JSONL (`histosynth captions build`; its
``caption`` is the prompt, and a class model takes the row's class by the rule it was trained with).
A class model's text lines are class names or indices. Without ``num`` every prompt is sampled once, in
file order; with ``num`` that many prompts are drawn at random (with replacement, by ``seed``): PathLDM's
protocol for FID, which conditions on captions drawn from the training set.

Each image has its own generator, seeded ``seed · 1_000_003 + n`` for the n-th image (CPU, so a row of
the manifest re-creates its image on any device and with any batch size).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from histosynth.conditions.patch_captions import ClassRule, read_prompts
from histosynth.errors import DataError
from histosynth.sampling import MANIFEST, prepare_output_dir
from histosynth.viz import save_grid


def image_seed(seed: int, n: int) -> int:
    return int(seed) * 1_000_003 + int(n)


def _model_prompts(pipe, entries: list[dict], path: Path) -> list:
    """What the pipeline is called with for each entry: the caption, or the class index of a class model."""
    if not pipe.is_class_conditional:
        bad = [e["line"] for e in entries if not isinstance(e.get("prompt"), str)]
        if bad:
            raise DataError(f"line {bad[0]} has no caption (a text model needs captions)", path)
        return [e["prompt"] for e in entries]
    rule = ClassRule(**pipe.config.class_rule) if pipe.config.class_rule else ClassRule()
    out = []
    for e in entries:
        row_has_class = any(e.get(k) is not None for k in ("class", "tumor_prob", "counts"))
        try:
            out.append(rule.label(e) if row_has_class else pipe.class_index(e["prompt"]))
        except (TypeError, ValueError) as exc:
            raise DataError(f"line {e['line']}: {exc}", path) from None
    return out


def sample_prompts(
    pipe,
    prompts_file: str | Path,
    out: str | Path,
    *,
    num: int | None = None,
    guidance_scale: float = 1.75,
    num_inference_steps: int = 50,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 8,
    overwrite: bool = False,
    progress: bool = True,
    grid_size: tuple[int, int] = (4, 8),
) -> Path:
    """Writes OUT/images/N.png, OUT/samples.jsonl (prompt, class, seed, sampler settings per image) and OUT/grid.png."""
    out, prompts_file = Path(out), Path(prompts_file)
    entries = read_prompts(prompts_file)
    model_prompts = _model_prompts(pipe, entries, prompts_file)
    if num is None:
        order = list(range(len(entries)))
    else:
        order = np.random.default_rng(seed).integers(0, len(entries), size=num).tolist()
    prepare_output_dir(out, overwrite)
    (out / "images").mkdir()
    names = list(getattr(pipe.conditioner, "class_names", None) or [])
    grid, n = [], 0
    rows_max, cols = grid_size
    with open(out / MANIFEST, "w") as manifest:
        for start in tqdm(range(0, len(order), batch_size), desc="sample", unit="batch", disable=not progress):
            chunk = order[start:start + batch_size]
            seeds = [image_seed(seed, n + j) for j in range(len(chunk))]
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            result = pipe([model_prompts[i] for i in chunk], guidance_scale=guidance_scale,
                          num_inference_steps=num_inference_steps, eta=eta, generator=generators, progress=False)
            for i, image, s in zip(chunk, result.images, seeds):
                name = f"{n:05d}"
                Image.fromarray(image).save(out / "images" / f"{name}.png")
                row = {"name": name, "image": f"images/{name}.png", "prompt": entries[i]["prompt"],
                       "prompts_file": str(prompts_file), "line": entries[i]["line"], "seed": s, "base_seed": seed,
                       "guidance_scale": guidance_scale, "num_inference_steps": result.num_steps_run,
                       "sampler": "ddim", "eta": eta}
                if pipe.is_class_conditional:
                    c = int(model_prompts[i])
                    row.update({"class": c, "class_name": names[c] if c < len(names) else None})
                manifest.write(json.dumps(row) + "\n")
                if len(grid) < rows_max * cols:
                    grid.append(image)
                n += 1
    rows = [grid[r:r + cols] for r in range(0, len(grid), cols)]
    save_grid(rows, out / "grid.png", scale=max(1, 128 // grid[0].shape[0]))
    return out
