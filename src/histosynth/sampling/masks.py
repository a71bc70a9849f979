"""Sample a mask-conditioned model (NASDM) on the masks of a patch store; each image is written next to its mask,
its label maps and the real patch of that mask."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from histosynth.conditions.nuclei_mask import nuclei_condition
from histosynth.data.store import PatchStore
from histosynth.diffusion.sampling_loop import check_num_steps
from histosynth.diffusion.schedulers import use_scheduler
from histosynth.errors import DataError
from histosynth.pipelines.nasdm import DEFAULT_SAMPLING
from histosynth.sampling.writer import SampleWriter, run_settings
from histosynth.viz import colour_mask

DEFAULT_NUM = 16  # masks sampled when --num is not given


def choose_patches(store: PatchStore, split: str | None, num: int | None, seed: int) -> list[int]:
    """`num` patches of the split drawn without replacement by `seed` (all of them, in order, if num is None)."""
    pool = store.indices(split)
    if not pool:
        raise DataError(f"the store has no {split!r} patches", store.path)
    if num is None or num >= len(pool):
        return list(pool)
    picked = np.random.default_rng(seed).choice(len(pool), size=num, replace=False)
    return [pool[i] for i in sorted(picked)]


def sample_store(pipe, store_path: str | Path, out: str | Path, *, split: str | None = "test",
                 num: int | None = DEFAULT_NUM, guidance_scale: float | None = None,
                 num_inference_steps: int | None = None, scheduler: str | None = None, seed: int = 0,
                 batch_size: int = 16, overwrite: bool = False, progress: bool = True, grid_rows: int = 8) -> Path:
    """Writes OUT/images/N.png (generated), OUT/masks/N.png (the condition, coloured), OUT/labels/N_{inst,type}.png
    (the label maps given), OUT/real/N.png (the real patch of that mask), OUT/samples.jsonl and OUT/grid.png
    (rows: mask | generated | real). ``guidance_scale`` is g (default 2.0 = NASDM's s = 1), steps default 20 (paper 250);
    ``scheduler``: a name of histosynth.diffusion.schedulers.SCHEDULERS swapped into ``pipe`` (default its trained DDPM)."""
    arguments = dict(locals())  # the run's settings (a rerun continues a run with the same)
    out, store = Path(out), PatchStore(store_path)
    g_scale, steps = pipe.sampling_settings(DEFAULT_SAMPLING, guidance_scale=guidance_scale,
                                            num_inference_steps=num_inference_steps)
    if not store.has_labels:
        raise DataError("this store has no nuclei masks to condition on (it was made by `prepare slides`)", store_path)
    if list(store.class_names) != list(pipe.config.class_names):
        raise DataError(
            f"the store's classes {list(store.class_names)} differ from the model's {list(pipe.config.class_names)}", store_path
        )
    scheduler = use_scheduler(pipe, scheduler)
    check_num_steps(pipe.scheduler, steps)  # before anything is written
    chosen = choose_patches(store, split, num, seed)
    k = len(store.class_names)
    with SampleWriter(out, overwrite, grid_rows=grid_rows, settings=run_settings(pipe, arguments)) as writer:
        for start in writer.batches(range(0, len(chosen), batch_size), progress=progress):
            idx = chosen[start : start + batch_size]
            items = [store[i] for i in idx]
            cond = torch.from_numpy(np.stack([nuclei_condition(it["inst_map"], it["type_map"], k) for it in items]))
            # one generator per batch, seeded from (seed, first sample number): re-runnable per batch
            g = torch.Generator(device=pipe.device).manual_seed(seed * 1_000_003 + start)
            result = pipe(cond, guidance_scale=g_scale, num_inference_steps=steps, generator=g,
                          progress=False)
            for it, image, store_index in zip(items, result.images, idx):
                name = f"{writer.count:05d}"
                mask_rgb = colour_mask(it["type_map"], nuclei_condition(it["inst_map"], it["type_map"], k)[-1])
                real = np.asarray(it["image"])
                files = {f"masks/{name}.png": mask_rgb, f"real/{name}.png": real,
                         f"labels/{name}_inst.png": np.asarray(it["inst_map"]).astype(np.uint16),
                         f"labels/{name}_type.png": np.asarray(it["type_map"]).astype(np.uint8)}
                row = {
                    "mask": f"masks/{name}.png", "inst_map": f"labels/{name}_inst.png",
                    "type_map": f"labels/{name}_type.png", "real": f"real/{name}.png", "store": str(store_path),
                    "store_index": int(store_index), "source": it.get("source"), "y": it.get("y"), "x": it.get("x"),
                    "split": it.get("split"), "seed": seed, "batch_seed": seed * 1_000_003 + start,
                    "guidance_scale": g_scale, "num_inference_steps": result.num_steps_run, "scheduler": scheduler,
                }
                writer.add(image, row, files=files, grid=[mask_rgb, image, real])
    return out
