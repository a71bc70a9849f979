"""Sample a DISC model on region masks: each tile written with its mask, ready to train on.

``source`` (from ``histosynth sample``): ``store`` — a ``prepare regions`` store whose masks condition the tiles (its
``split``, default test), or a tile-set folder of ``prepare tile-sets`` (DISC Sec. 2.2: ``masks/``, ``classes.txt``,
``sets.jsonl``; every tile of the first ``num`` sets, default all) — and ``separated`` (none = SD, final = SD-SC
(eq. 2 at the end), every-step; default the model's recipe's).

Output (written atomically by the shared writer; a region folder that ``prepare regions --format folder`` reads back)::

    OUT/images/N.png      the generated tile
    OUT/masks/N.png       its region mask (uint8 labels 0..K-1)
    OUT/real/N.png        the real patch of that mask
    OUT/classes.txt       the region labels, one per line (line i = mask value i)
    OUT/samples.jsonl     per image: store index (or set and tile), seed, separated, UNet passes, region fractions
    OUT/sets.jsonl        tile sets only: the input's rows, each tile with its generated "image" (MIL bags)
    OUT/grid.png          coloured mask | generated | real (tile sets: mask | generated)
"""

from __future__ import annotations

from pathlib import Path

import json

import numpy as np
import torch

from histosynth.data.io import read_label_png
from histosynth.data.regions import open_region_store, read_classes
from histosynth.data.store import STORE_JSON, region_fractions
from histosynth.diffusion.sampling_loop import check_num_steps
from histosynth.diffusion.schedulers import scheduler_name, use_scheduler
from histosynth.errors import DataError, HistosynthError
from histosynth.pipelines.disc import DEFAULT_SAMPLING
from histosynth.sampling.masks import choose_patches
from histosynth.sampling.prompts import image_seed
from histosynth.sampling.writer import SampleWriter, run_settings
from histosynth.viz import colour_mask

DEFAULT_NUM = 16


def sample_regions(pipe, source: dict, out: str | Path, *, split: str | None = "test", num: int | None = None,
                   guidance_scale: float | None = None, num_inference_steps: int | None = None,
                   scheduler: str | None = None, seed: int = 0, batch_size: int = 8, overwrite: bool = False,
                   progress: bool = True) -> Path:
    """Write one tile per chosen mask (see the module docstring). ``num``: masks of a store (default 16), or sets of a
    tile-set folder (default all). Unset settings: the recipe's (DDIM 50, g 1.75; paper DDIM 200).

    Raises:
        DataError: naming the store: not a region store, other region labels or patch size than the model's, no
            patches in the split.
        HistosynthError: an unknown scheduler or ``separated``.
    """
    settings = run_settings(pipe, locals())  # the run's settings (a rerun continues a run with the same)
    use_scheduler(pipe, scheduler)
    check_num_steps(pipe.scheduler, *pipe.sampling_settings(DEFAULT_SAMPLING, num_inference_steps=num_inference_steps))
    if source.get("store") is None:
        raise HistosynthError("a DISC model samples tiles on region masks: give --regions STORE")
    store_path = Path(source["store"])
    if not (store_path / STORE_JSON).is_file() and (store_path / "sets.jsonl").is_file():
        return _sample_tile_sets(pipe, store_path, source.get("separated"), out, num=num, guidance_scale=guidance_scale,
                                 num_inference_steps=num_inference_steps, seed=seed, batch_size=batch_size,
                                 overwrite=overwrite, progress=progress, settings=settings)
    store = open_region_store(store_path, "--regions")
    if list(store.class_names) != pipe.label_names:
        raise DataError(f"--regions: the store's region labels {list(store.class_names)} differ from the model's "
                        f"{pipe.label_names}", store_path)
    if store.patch_size != pipe.mask_encoder.config.mask_size:
        raise DataError(f"--regions: the store holds {store.patch_size} px patches, the model makes "
                        f"{pipe.mask_encoder.config.mask_size} px tiles", store_path)
    chosen = choose_patches(store, split, DEFAULT_NUM if num is None else num, seed)
    names = list(store.class_names)
    with SampleWriter(out, overwrite, grid_columns=3, grid_rows=8, settings=settings) as writer:
        (writer.root / "classes.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
        for start in writer.batches(range(0, len(chosen), batch_size), progress=progress):
            idx = chosen[start:start + batch_size]
            items = [store[i] for i in idx]
            masks = np.stack([it["region_map"] for it in items])
            seeds = [image_seed(seed, writer.count + j) for j in range(len(idx))]
            result = pipe(masks, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                          separated=source.get("separated"), generator=[torch.Generator().manual_seed(s) for s in seeds],
                          progress=False)
            for it, image, mask, s, passes, i in zip(items, result.images, masks, seeds, result.unet_passes, idx):
                name = f"{writer.count:05d}"
                real = np.asarray(it["image"])
                row = {"mask": f"masks/{name}.png", "real": f"real/{name}.png", "store": str(store_path),
                       "index": int(i), "source": it.get("source"), "seed": s, "base_seed": seed,
                       "separated": result.separated, "num_inference_steps": result.num_steps_run,
                       "scheduler": scheduler_name(pipe.scheduler), "unet_passes": int(passes), "regions": region_fractions(mask, names)}
                files = {f"masks/{name}.png": mask.astype(np.uint8), f"real/{name}.png": real}
                writer.add(image, row, files=files, grid=[colour_mask(mask), image, real])
    return Path(out)


def _sample_tile_sets(pipe, folder: Path, separated, out, *, num, guidance_scale, num_inference_steps, seed,
                      batch_size, overwrite, progress, settings) -> Path:
    """Every tile of the first ``num`` sets of a tile-set folder (all when None), written with its mask; OUT/sets.jsonl
    repeats the input's rows with each tile's generated ``image`` (the MIL bags of DISC Sec. 2.4)."""
    names = list(read_classes(folder / "classes.txt"))
    if names != pipe.label_names:
        raise DataError(f"--regions: the tile sets' labels {names} differ from the model's {pipe.label_names}",
                        folder / "classes.txt")
    sets_file = folder / "sets.jsonl"
    try:
        rows = [json.loads(line) for line in sets_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        rows = rows[:num] if num is not None else rows
        jobs = [(r, t) for r in range(len(rows)) for t in range(len(rows[r]["tiles"]))]
        paths = [folder / rows[r]["tiles"][t]["mask"] for r, t in jobs]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"--regions: not a tile-set file (rows with tiles: [{{mask: ...}}]): {exc!r}", sets_file) from None
    if not jobs:
        raise DataError("--regions: no tiles in the tile sets", sets_file)
    size = pipe.mask_encoder.config.mask_size
    with SampleWriter(out, overwrite, grid_columns=2, grid_rows=8, settings=settings) as writer:
        (writer.root / "classes.txt").write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
        for start in writer.batches(range(0, len(jobs), batch_size), progress=progress):
            chunk = jobs[start:start + batch_size]
            masks = np.stack([_tile_mask(paths[start + j], size) for j in range(len(chunk))])
            seeds = [image_seed(seed, writer.count + j) for j in range(len(chunk))]
            result = pipe(masks, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps,
                          separated=separated, generator=[torch.Generator().manual_seed(s) for s in seeds],
                          progress=False)
            for (r, t), image, mask, s, passes in zip(chunk, result.images, masks, seeds, result.unet_passes):
                name = f"{writer.count:05d}"
                row = {"mask": f"masks/{name}.png", "set": rows[r].get("set", r), "tile": t, "seed": s,
                       "base_seed": seed, "separated": result.separated, "num_inference_steps": result.num_steps_run,
                       "scheduler": scheduler_name(pipe.scheduler), "unet_passes": int(passes), "regions": region_fractions(mask, names)}
                writer.add(image, row, files={f"masks/{name}.png": mask.astype(np.uint8)},
                           grid=[colour_mask(mask), image])
        for n, (r, t) in enumerate(jobs):  # every tile's names, whichever process or run made it
            rows[r]["tiles"][t].update(image=f"images/{n:05d}.png", mask=f"masks/{n:05d}.png")
        (writer.root / "sets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return Path(out)


def _tile_mask(path: Path, size: int) -> np.ndarray:
    mask = read_label_png(path)
    if mask.shape != (size, size):
        raise DataError(f"--regions: mask is {mask.shape[0]}x{mask.shape[1]} px, the model makes {size} x {size} tiles", path)
    return mask
