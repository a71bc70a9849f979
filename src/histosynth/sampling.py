"""Sample a trained model on the masks of a patch store and write images next to their masks."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from histosynth.conditions.nuclei_mask import nuclei_condition
from histosynth.data.store import PatchStore
from histosynth.errors import DataError, OutputExistsError
from histosynth.viz import colour_mask, save_grid

MANIFEST = "samples.jsonl"


def prepare_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise OutputExistsError("output directory exists and is not empty; pass --overwrite to replace it", out)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def choose_patches(store: PatchStore, split: str | None, num: int | None, seed: int) -> list[int]:
    """`num` patches of the split drawn without replacement by `seed` (all of them, in order, if num is None)."""
    pool = store.indices(split)
    if not pool:
        raise DataError(f"the store has no {split!r} patches", store.path)
    if num is None or num >= len(pool):
        return list(pool)
    picked = np.random.default_rng(seed).choice(len(pool), size=num, replace=False)
    return [pool[i] for i in sorted(picked)]


def sample_store(
    pipe,
    store_path: str | Path,
    out: str | Path,
    *,
    split: str | None = "test",
    num: int | None = 16,
    guidance_scale: float = 1.0,
    num_inference_steps: int = 250,
    sampler: str = "ddpm",
    seed: int = 0,
    batch_size: int = 16,
    overwrite: bool = False,
    progress: bool = True,
    grid_rows: int = 8,
) -> Path:
    """Writes OUT/images/N.png (generated), OUT/masks/N.png (the condition, coloured), OUT/labels/N_{inst,type}.png
    (the label maps given), OUT/real/N.png (the real patch of that mask), OUT/samples.jsonl and OUT/grid.png."""
    out, store = Path(out), PatchStore(store_path)
    if not store.has_labels:
        raise DataError("this store has no nuclei masks to condition on (it was made by `prepare slides`)", store_path)
    if list(store.class_names) != list(pipe.config.class_names):
        raise DataError(
            f"the store's classes {list(store.class_names)} differ from the model's {list(pipe.config.class_names)}", store_path
        )
    prepare_output_dir(out, overwrite)
    for sub in ("images", "masks", "labels", "real"):
        (out / sub).mkdir()
    chosen = choose_patches(store, split, num, seed)
    k = len(store.class_names)
    grid, n = [], 0
    with open(out / MANIFEST, "w") as manifest:
        for start in tqdm(range(0, len(chosen), batch_size), desc="sample", unit="batch", disable=not progress):
            idx = chosen[start : start + batch_size]
            items = [store[i] for i in idx]
            cond = torch.from_numpy(np.stack([nuclei_condition(it["inst_map"], it["type_map"], k) for it in items]))
            # one generator per batch, seeded from (seed, first sample number): re-runnable per batch
            g = torch.Generator(device=pipe.device).manual_seed(seed * 1_000_003 + start)
            result = pipe(cond, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                          sampler=sampler, generator=g, progress=False)
            for it, image, store_index in zip(items, result.images, idx):
                name = f"{n:05d}"
                mask_rgb = colour_mask(it["type_map"], nuclei_condition(it["inst_map"], it["type_map"], k)[-1])
                Image.fromarray(image).save(out / "images" / f"{name}.png")
                Image.fromarray(mask_rgb).save(out / "masks" / f"{name}.png")
                Image.fromarray(np.asarray(it["inst_map"]).astype(np.uint16)).save(out / "labels" / f"{name}_inst.png")
                Image.fromarray(np.asarray(it["type_map"]).astype(np.uint8)).save(out / "labels" / f"{name}_type.png")
                Image.fromarray(np.asarray(it["image"])).save(out / "real" / f"{name}.png")
                row = {
                    "name": name, "image": f"images/{name}.png", "mask": f"masks/{name}.png",
                    "inst_map": f"labels/{name}_inst.png", "type_map": f"labels/{name}_type.png",
                    "real": f"real/{name}.png", "store": str(store_path), "store_index": int(store_index),
                    "source": it.get("source"), "y": it.get("y"), "x": it.get("x"), "split": it.get("split"),
                    "seed": seed, "batch_seed": seed * 1_000_003 + start, "guidance_scale": guidance_scale,
                    "num_inference_steps": result.num_steps_run, "sampler": sampler,
                }
                manifest.write(json.dumps(row) + "\n")
                if len(grid) < grid_rows:
                    grid.append([mask_rgb, image, np.asarray(it["image"])])
                n += 1
    save_grid(grid, out / "grid.png", scale=max(1, 128 // store.patch_size))
    return out
