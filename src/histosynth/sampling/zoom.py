"""Sample a ZoomLDM at chosen magnifications, from generated conditions or from the real ones of a reference store.

``source`` (from ``histosynth sample``): ``magnification`` "5x" or "20x,5x" (the levels to draw; with a reference
store default every level of the model the store has) and ``reference`` (a ``prepare slides --magnifications``
store with its ``histosynth embed`` maps: the paper's "oracle" conditions, each image made from a real patch's
embedding grid). Without a reference the model's condition sampler draws the conditions, with ``condition_scheduler``
and ``condition_steps`` (default the recipe's: DDIM 50). ``num`` images per magnification (default 16).

Output (written atomically by the shared writer)::

    OUT/images/N.png     the generated patch
    OUT/reference/N.png  the real patch whose grid conditioned it (reference only)
    OUT/samples.jsonl    per image: magnification, condition source, reference patch (index, slide, tile) or the
                         condition sampler's scheduler and steps, seed
    OUT/grid.png         reference | generated (reference), else the generated images, one row per level
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from histosynth.conditions.slide_embeddings import SlideEmbeddings
from histosynth.data.patches import format_magnification
from histosynth.data.store import PatchStore
from histosynth.diffusion.sampling_loop import check_num_steps
from histosynth.diffusion.schedulers import use_scheduler
from histosynth.errors import DataError, HistosynthError
from histosynth.pipelines.zoomldm import DEFAULT_SAMPLING
from histosynth.sampling.prompts import image_seed
from histosynth.sampling.writer import SampleWriter, run_settings

DEFAULT_NUM = 16
GRID_PER_LEVEL = 4


def parse_levels(text: str | None, known: list[str], option: str = "--magnification") -> list[str] | None:
    """["20x", "5x"] from "20x,5x" (None from None); errors name ``option`` and the model's levels."""
    if text is None:
        return None
    out = []
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        try:
            name = format_magnification(part)
        except Exception:  # noqa: BLE001 - any parse error is the same user error
            raise HistosynthError(f"{option}: {part!r} is not a magnification (e.g. 5x)") from None
        if name not in known:
            raise HistosynthError(f"{option}: {name} is not one of the model's magnifications ({', '.join(known)})")
        out.append(name)
    if not out:
        raise HistosynthError(f"{option}: no magnification given")
    return out


def reference_patches(pipe, store_path: Path, levels: list[str] | None, num: int, seed: int, split: str | None):
    """(store, embeddings, {level: [store index, ...]}): ``num`` patches per level drawn by ``seed`` (without
    replacement while the level has enough). The store's embeddings must be the model's (encoder and width)."""
    store = PatchStore(store_path)
    info = pipe.config.embeddings or {}
    embeddings = SlideEmbeddings.open(store_path, info.get("name"))
    if (embeddings.encoder, embeddings.dim) != (info.get("encoder"), info.get("dim")):
        raise DataError(f"--reference: its embeddings come from {embeddings.encoder} ({embeddings.dim}-d), the model "
                        f"was trained on {info.get('encoder')} ({info.get('dim')}-d)", embeddings.path)
    by_level = store.indices_by_magnification(split)
    wanted = levels or [m for m in pipe.magnifications if m in by_level]
    empty = [m for m in wanted if not by_level.get(m)]
    if empty or not wanted:
        raise DataError(f"--reference: no {split or 'stored'} patches at {', '.join(empty or pipe.magnifications)} (the "
                        f"store has {', '.join(sorted(k for k in by_level if k))})", store_path)
    rng = np.random.default_rng(seed)
    picks = {}
    for m in wanted:
        have = by_level[m]
        picks[m] = [have[j] for j in rng.choice(len(have), size=num, replace=num > len(have))]
    return store, embeddings, picks


def sample_zoom(pipe, source: dict, out: str | Path, *, num: int | None = None, guidance_scale: float | None = None,
                num_inference_steps: int | None = None, scheduler: str | None = None, seed: int = 0, batch_size: int = 8,
                overwrite: bool = False, progress: bool = True, split: str | None = None) -> Path:
    """Write ``num`` images per magnification (see the module docstring). Unset settings: the recipe's (DDIM 10,
    g 1.75; the condition sampler's DDIM 50). Raises HistosynthError / DataError naming the option or file: an unknown
    level, a reference store without the model's embeddings, no reference and no condition sampler, condition sampler
    settings with a reference, a solver that cannot step the condition sampler's x0 predictions."""
    arguments = dict(locals())  # the run's settings (a rerun continues a run with the same)
    scheduler = use_scheduler(pipe, scheduler)
    num = DEFAULT_NUM if num is None else num
    levels = parse_levels(source.get("magnification"), pipe.magnifications)
    reference = source.get("reference")
    condition = {}  # the condition sampler's settings, recorded per image
    if reference is None:
        if levels is None:
            raise HistosynthError(f"give --magnification (one or more of {', '.join(pipe.magnifications)}) or "
                                  "--reference STORE")
        if pipe.condition_sampler is None:
            raise HistosynthError("this ZoomLDM has no condition sampler: give --reference STORE (real conditions), or "
                                  "train one with `histosynth train --recipe zoomldm-conditions...`")
        name = use_scheduler(pipe, source.get("condition_scheduler"), "condition_scheduler")
        (steps,) = pipe.sampling_settings(DEFAULT_SAMPLING, condition_steps=source.get("condition_steps"))
        check_num_steps(pipe.condition_scheduler, steps, option="condition_steps (--condition-steps)")
        condition = {"condition_scheduler": name, "condition_steps": steps}
        jobs = [(m, None) for m in levels for _ in range(num)]
        store = embeddings = None
    else:
        given = [f"{k} (--{k.replace('_', '-')})" for k in ("condition_scheduler", "condition_steps")
                 if source.get(k) is not None]
        if given:
            raise HistosynthError(f"{' and '.join(given)}: only without a reference store (--reference): its "
                                  "conditions are the store's real embedding grids, nothing is sampled for them")
        store, embeddings, picks = reference_patches(pipe, Path(reference), levels, num, seed, split)
        jobs = [(m, i) for m, chosen in picks.items() for i in chosen]
    rows = store.records if store is not None else None
    # grid.png: one row per level, its first GRID_PER_LEVEL images (each beside its reference)
    shown = min(num, GRID_PER_LEVEL)
    per_image = 1 if reference is None else 2
    seen: dict[str, int] = {}
    in_grid = []  # per job: among the first `shown` of its level
    for m, _ in jobs:
        seen[m] = seen.get(m, 0) + 1
        in_grid.append(seen[m] <= shown)
    with SampleWriter(out, overwrite, grid_rows=len({m for m, _ in jobs}), grid_columns=shown * per_image,
                      settings=run_settings(pipe, arguments)) as writer:
        for start in writer.batches(range(0, len(jobs), batch_size), progress=progress):
            chunk = jobs[start:start + batch_size]
            seeds = [image_seed(seed, writer.count + j) for j in range(len(chunk))]
            generators = [torch.Generator().manual_seed(s) for s in seeds]
            kwargs = dict(magnification=[m for m, _ in chunk], guidance_scale=guidance_scale,
                          num_inference_steps=num_inference_steps, generator=generators, progress=False)
            if reference is None:
                result = pipe(condition_steps=condition["condition_steps"], **kwargs)
            else:
                result = pipe(grids=[np.asarray(embeddings.grid(rows[i]), dtype=np.float32) for _, i in chunk], **kwargs)
            for (m, i), image, s in zip(chunk, result.images, seeds):
                row = {"magnification": m, "condition": result.condition_source, "seed": s, "base_seed": seed,
                       "num_inference_steps": result.num_steps_run, "scheduler": scheduler, **condition}
                files, panels = None, None
                if i is not None:
                    real = np.asarray(store[i]["image"])
                    ref = rows[i]
                    row["reference"] = {"store": str(reference), "index": int(i), "slide": ref.get("slide"),
                                        "tile_y": ref.get("tile_y"), "tile_x": ref.get("tile_x")}
                    files = {f"reference/{writer.count:05d}.png": real}
                    panels = [real, image]
                writer.add(image, row, files=files, grid=panels, in_grid=in_grid[writer.count])
    return Path(out)
