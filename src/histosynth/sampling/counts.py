"""Sample a count-conditioned model (HistoSmith) into a ready-to-train labelled dataset.

Requests (counts per type + tissue) come from one of: the training distribution of a store (``counts_from``:
patches drawn with replacement by the seed, their counts and tissue), a file (``requests``: CSV with one
column per type and an optional ``tissue`` column, or JSONL rows ``{"counts": {type: n}, "tissue": ...}`` or
flat ``{type: n, "tissue": ...}``), or one inline request (``counts`` "inflammatory=20,epithelial=5" with
``tissue``) repeated. ``boost`` "other=3" multiplies a type's requested count in every request (a patch drawn
with no nucleus of that type stays at 0).

Output (written atomically by the shared writer)::

    OUT/images/N.png                      the generated image
    OUT/folder/N.png, N_inst.png, N_type.png, classes.txt   the folder format (`prepare nuclei --format folder`)
    OUT/hovernet/images/N.png, labels/N.mat, classes.txt    HoVer-Net / CoNSeP layout (`--format consep`)
    OUT/samples.jsonl                     per image: tissue, requested and realised counts per type, seeds
    OUT/grid.png                          rows: image | labels outlined on it | requested vs realised counts
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from histosynth.data.formats.writers import write_class_names, write_folder_item, write_hovernet_item
from histosynth.data.store import PatchStore
from histosynth.diffusion.sampling_loop import check_num_steps
from histosynth.diffusion.schedulers import scheduler_name, use_scheduler
from histosynth.errors import DataError, HistosynthError
from histosynth.pipelines.histosmith import DEFAULT_SAMPLING
from histosynth.sampling.writer import SampleWriter, run_settings
from histosynth.viz import counts_panel, label_overlay

DEFAULT_NUM = 16
FOLDER, HOVERNET = "folder", "hovernet"


def parse_assignments(text: str, option: str) -> dict[str, float]:
    """{"a": 1.0, "b": 2.0} from "a=1,b=2"; errors name ``option``."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(value)
        except ValueError:
            raise HistosynthError(f"{option}: expected TYPE=NUMBER[,TYPE=NUMBER...], got {part!r}") from None
    if not out:
        raise HistosynthError(f"{option}: no TYPE=NUMBER given")
    return out


def requests_from_store(store_path, pipe, num: int, seed: int, split: str | None) -> tuple[list[dict], list[str]]:
    """``num`` (counts, tissue) requests: patches of the store's split (None: all) drawn with replacement by ``seed``.
    The store must have the model's classes, patch size and magnification (counts per patch mean nothing else)."""
    store = PatchStore(store_path)
    if not store.has_labels:
        raise DataError("--counts-from: this store has no nuclei labels to take counts from", store_path)
    if list(store.class_names) != pipe.class_names:
        raise DataError(f"--counts-from: the store's classes {list(store.class_names)} differ from the model's "
                        f"{pipe.class_names}", store_path)
    model = (pipe.config.patch_size, pipe.config.magnification)
    if None not in model and (store.patch_size, str(store.magnification)) != (model[0], str(model[1])):
        raise DataError(f"--counts-from: the store holds {store.patch_size} px patches at {store.magnification}, the "
                        f"model makes {model[0]} px at {model[1]}: counts per patch would be on another scale", store_path)
    pool = store.indices(split)
    if not pool:
        raise DataError(f"--counts-from: the store has no {split!r} patches", store_path)
    picks = np.random.default_rng(seed).integers(0, len(pool), size=num)
    rows = [store.records[pool[i]] for i in picks]
    only = pipe.tissues[0] if len(pipe.tissues) == 1 else None
    tissues = [row.get("tissue") or only for row in rows]
    if None in tissues:
        raise DataError(f"--counts-from: patches without a tissue, and the model knows several ({', '.join(pipe.tissues)})",
                        store_path)
    return [dict(row["counts"]) for row in rows], tissues


def requests_from_file(path: Path, pipe) -> tuple[list[dict], list]:
    """(counts, tissues) of a CSV (columns: types, optional tissue) or JSONL file of requests."""
    path = Path(path)
    if not path.is_file():
        raise HistosynthError("--requests: file not found", path)
    text = path.read_text(encoding="utf-8-sig")  # a CSV saved by a spreadsheet may start with a BOM
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(text.splitlines()))
    else:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except ValueError as exc:
            raise HistosynthError(f"--requests: not JSON lines ({exc}); use .csv for a CSV file", path) from None
    if not rows:
        raise HistosynthError("--requests: no requests in the file", path)
    counts, tissues = [], []
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise HistosynthError(f"--requests: row {i} is not an object", path)
        row = dict(row)
        tissues.append(row.pop("tissue", None) or None)
        wanted = row.pop("counts", row)
        try:
            counts.append({k: float(v) for k, v in wanted.items() if v not in ("", None)})
        except (TypeError, ValueError, AttributeError):
            raise HistosynthError(f"--requests: row {i}: counts must be numbers", path) from None
    return counts, tissues


def build_requests(pipe, source: dict, num: int | None, seed: int, split: str | None):
    """(counts (B, K) float64, tissues) of the sampling requests (see the module docstring)."""
    given = [k for k in ("counts_from", "requests", "counts") if source.get(k) is not None]
    if len(given) != 1:
        raise HistosynthError("give one of --counts-from STORE, --requests FILE or --counts TYPE=N,... (with --tissue)")
    if source.get("counts_from") is not None:
        counts, tissues = requests_from_store(source["counts_from"], pipe, num or DEFAULT_NUM, seed, split)
    elif source.get("requests") is not None:
        counts, tissues = requests_from_file(source["requests"], pipe)
        if num is not None:  # cycle through the file's requests
            counts, tissues = [counts[i % len(counts)] for i in range(num)], [tissues[i % len(tissues)] for i in range(num)]
    else:
        n = num or DEFAULT_NUM
        counts, tissues = [parse_assignments(source["counts"], "--counts")] * n, [None] * n
    if source.get("tissue") is not None:
        tissues = [t or source["tissue"] for t in tissues]
    if None in tissues:
        if len(pipe.tissues) != 1:
            raise HistosynthError(f"--tissue: give a tissue; the model knows {', '.join(pipe.tissues)}")
        tissues = [t or pipe.tissues[0] for t in tissues]
    where = source.get("requests") or source.get("counts_from") or "--counts"
    table = pipe.conditioner.count_table(counts, source=where)
    if source.get("boost"):
        boost = parse_assignments(source["boost"], "--boost")
        unknown = sorted(set(boost) - set(pipe.class_names))
        if unknown:
            raise HistosynthError(f"--boost: unknown nucleus type {unknown[0]!r}; the model knows {', '.join(pipe.class_names)}")
        if any(f < 0 for f in boost.values()):
            raise HistosynthError("--boost: factors must not be negative")
        for name, factor in boost.items():
            table[:, pipe.class_names.index(name)] *= factor
    pipe.conditioner.vectors(table, tissues, source=where)  # every request checked (and range warned) before any work
    return table, tissues


def sample_counts(pipe, source: dict, out: str | Path, *, split: str | None = "train", num: int | None = None,
                  guidance_scale: float | None = None, num_inference_steps: int | None = None, scheduler: str | None = None,
                  seed: int = 0, batch_size: int = 16, overwrite: bool = False, progress: bool = True,
                  grid_rows: int = 8) -> Path:
    """Generate one labelled image per request into ``out`` (layout in the module docstring)."""
    arguments = dict(locals())  # the run's settings (a rerun continues a run with the same)
    use_scheduler(pipe, scheduler)
    guidance_scale, num_inference_steps = pipe.sampling_settings(DEFAULT_SAMPLING, guidance_scale=guidance_scale,
                                                                 num_inference_steps=num_inference_steps)
    check_num_steps(pipe.scheduler, num_inference_steps)  # before anything is written
    table, tissues = build_requests(pipe, source, num, seed, split)
    names = pipe.class_names
    with SampleWriter(out, overwrite, grid_rows=grid_rows, settings=run_settings(pipe, arguments)) as writer:
        write_class_names(writer.root / FOLDER, names)
        write_class_names(writer.root / HOVERNET, names)
        for start in writer.batches(range(0, len(table), batch_size), progress=progress):
            batch_seed = seed * 1_000_003 + start
            g = torch.Generator(device=pipe.device).manual_seed(batch_seed)
            result = pipe(table[start:start + batch_size], tissues[start:start + batch_size],
                          guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, generator=g,
                          progress=False, warn_out_of_range=False)
            for i, image in enumerate(result.images):
                name = f"{writer.count:05d}"
                inst, types = result.inst_maps[i], result.type_maps[i]
                write_folder_item(writer.root / FOLDER, name, image, inst, types)
                write_hovernet_item(writer.root / HOVERNET, name, image, inst, types)
                requested, realised = result.requested_counts[i], result.realised_counts[i]
                row = {"tissue": result.tissues[i],
                       "requested": {n: float(v) for n, v in zip(names, requested)},
                       "realised": {n: int(v) for n, v in zip(names, realised)},
                       "inst_map": f"{FOLDER}/{name}_inst.png", "type_map": f"{FOLDER}/{name}_type.png",
                       "magnification": pipe.config.magnification, "seed": seed, "batch_seed": batch_seed,
                       "num_inference_steps": result.num_steps_run, "scheduler": scheduler_name(pipe.scheduler),
                       "guidance_scale": guidance_scale}
                grid = None
                if writer.count < grid_rows:  # the writer keeps the first grid_rows panels only
                    grid = [image, label_overlay(image, inst, types), counts_panel(requested, realised, names, image.shape[0])]
                writer.add(image, row, grid=grid)
    return Path(out)
