"""``prepare slides --magnifications``: tile slides at every level of ZoomLDM into one image-only store, each patch
paired with its base region. Levels, base grid, patches, tissue and resolution: :mod:`histosynth.data.zoom_levels`.

Skipped levels. A slide too small for a level (2^k > tile_rows or tile_cols) or without a single tissue
patch at it is skipped at that level, with one printed line per slide and the reason in store.json's meta:
per slide (``meta["slides"][i]["skipped_levels"]``) and store-wide (``meta["skipped_levels"]``: every level
skipped by at least one slide, its reason saying by how many and why). A requested level that no slide is
large enough for is an error before anything is written, naming the level and the lowest magnification
the slides do reach; a level that only the tissue filter empties is skipped (it is known only after
reading), and is then missing from ``meta["magnifications"]``.

Store. ``manifest.jsonl`` rows: ``source`` (slide path), level-0 ``y``, ``x``, ``crop``, ``split`` "train",
``magnification`` (this patch's level, '5x'), ``zoom`` (k), ``tile_y``, ``tile_x`` (base grid),
``base_size`` (patch * 2^k, base px per side of the paired region), ``slide_index`` (into
meta["slides"]), ``slide`` (file name), ``path``, ``level`` and ``level_downsample`` (pyramid level read),
``source_magnification`` (M0), ``mpp`` (um per patch pixel, None when unknown), ``tissue_fraction``, ``resized``.
store.json: ``magnification`` = the levels kept joined by commas and ``magnifications`` = their list (see
:mod:`histosynth.data.store`); meta: ``kind`` "slides", ``base_magnification``, ``magnifications`` (kept),
``requested_magnifications``, ``skipped_levels`` {level: reason}, ``patches_per_level`` {level: n}, and per
slide (meta["slides"]): ``path``, ``slide``, ``source_magnification``, ``magnification_from``, ``mpp``
(level 0, may be null), ``width``, ``height`` (level 0), ``base_downsample``, ``base_width``,
``base_height``, ``tile_rows``, ``tile_cols``, ``thumbnail_size``, ``patches``, ``patches_per_level``,
``skipped_levels`` and ``levels`` (per requested level: zoom, pyramid level, downsamples, positions).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from histosynth.data.patches import Patch, format_magnification
from histosynth.data.slide_patches import (
    check_tiling_args,
    shown_slides,
    slides_to_store,
    tile_progress,
)
from histosynth.data.slides import check_resolution_overrides
from histosynth.data.zoom_levels import (
    ZOOMLDM_MAGNIFICATIONS,
    ZoomLevel,
    ZoomSlidePlan,
    iter_zoom_patches,
    parse_magnifications,
    plan_zoom_levels,
)
from histosynth.errors import DataError

__all__ = ["prepare_zoom_slides"]


# ------------------------------------------------------------------------------------------ prepare
_PATCH_FIELDS = ("y", "x", "crop", "magnification")  # tile metadata that become the Patch's own fields


def _reached(levels: list[ZoomLevel], plans: list[ZoomSlidePlan], patch: int) -> None:
    """Every requested level must fit at least one slide: else an error naming the level (nothing written)."""
    missing = [lev for i, lev in enumerate(levels) if all(p.levels[i].skipped for p in plans)]
    if not missing:
        return
    largest = max(plans, key=lambda p: min(p.tile_rows, p.tile_cols))
    fit = min(largest.tile_rows, largest.tile_cols)
    base = levels[0].name
    names = ", ".join(lev.name for lev in missing)
    if fit < 1:
        reach = f"every slide is smaller than one {patch} px patch at {base}"
    else:
        lowest = format_magnification(levels[0].magnification / 2 ** int(math.log2(fit)))
        reach = (f"the slides reach down to {lowest} (the largest, {Path(largest.path).name}, has "
                 f"{largest.tile_rows}x{largest.tile_cols} base tiles)")
    n = missing[0].tiles
    raise DataError(
        f"--magnifications: no slide is large enough for {names} ({missing[0].name} needs {n}x{n} base tiles of "
        f"{patch} px at {base}, a {patch * n} px square); {reach}: drop the lower levels or lower --patch",
        plans[0].path if len(plans) == 1 else None,
    )


def _skip_summary(level: str, plans: list[ZoomSlidePlan], per_slide: list[dict]) -> str | None:
    """One store-wide reason for a level skipped by some slides (None when no slide skipped it)."""
    hits = [(Path(p.path).name, s["skipped_levels"][level]) for p, s in zip(plans, per_slide) if level in s["skipped_levels"]]
    if not hits:
        return None
    shown = "; ".join(f"{name}: {why}" for name, why in hits[:5]) + (f"; and {len(hits) - 5} more" if len(hits) > 5 else "")
    scope = "no slide has a patch at this level" if len(hits) == len(plans) else f"skipped in {len(hits)} of {len(plans)} slides"
    return f"{scope}: {shown}"


def prepare_zoom_slides(
    slides: Sequence[str | Path] | Iterable[str | Path],
    out: str | Path,
    *,
    patch: int = 256,
    magnifications: str | Sequence[str | float] = ZOOMLDM_MAGNIFICATIONS,
    tissue_threshold: float = 0.5,
    source_magnification: str | float | None = None,
    mpp: float | None = None,
    overwrite: bool = False,
    progress: bool = True,
    command: str | Sequence[str] | None = None,
    shard_size: int | None = None,
    report: Callable[[str], None] | None = None,
):
    """Tile slides at every level of ``magnifications`` into one image-only store (ZoomLDM) and open it.

    Flags are checked, then every slide is opened and planned, and a level no slide reaches is an error,
    all before anything is written; a slide that cannot be read later (a corrupt tile) fails the run
    with a DataError naming the file and the position, and leaves no store. ``mpp`` / ``source_magnification``
    override the slides' resolution (PNG / JPEG files need one). Skipped levels are reported through
    ``report`` (one line per slide; default: printed to stderr) and in store.json's meta. Layout of rows
    and meta: the module docstring. Raises HistosynthError (bad flags), OutputExistsError, DataError.
    """
    from histosynth.data.store import PatchStore
    from histosynth.data.store_writer import PatchStoreWriter, command_list

    check_tiling_args(patch, 0.0, tissue_threshold)
    patch = int(patch)
    levels = parse_magnifications(magnifications)
    check_resolution_overrides(source_magnification, mpp)
    say = report if report is not None else (lambda line: print(line, file=sys.stderr))
    out = Path(out)
    paths = slides_to_store(slides, out, overwrite, source_magnification, mpp)
    plans = [plan_zoom_levels(p, patch, levels, source_magnification, mpp=mpp) for p in paths]
    _reached(levels, plans, patch)
    names = [lev.name for lev in levels]
    meta = {"kind": "slides", "base_magnification": names[0], "magnifications": names,
            "requested_magnifications": names, "skipped_levels": {}, "patches_per_level": dict.fromkeys(names, 0),
            "tissue_threshold": tissue_threshold, "overlap": 0.0, "source_magnification": source_magnification,
            "mpp": mpp, "command": command_list(command),
            "args": {"patch": patch, "magnifications": ",".join(names), "tissue_threshold": tissue_threshold,
                     "source_magnification": source_magnification, "mpp": mpp},
            "slides": []}
    bar = tile_progress(sum(p.num_positions for p in plans), "position", progress)
    with bar, PatchStoreWriter(out, (), patch, names, meta, overwrite, shard_size, labels=False) as writer:
        for index, plan in enumerate(plans):
            counts = dict.fromkeys(names, 0)
            for image, tile in iter_zoom_patches(plan, tissue_threshold, lambda: bar.update(1), index):
                extra = {k: v for k, v in tile.items() if k not in _PATCH_FIELDS}
                writer.add(Patch(image, None, None, "train", tile["y"], tile["x"], tile["crop"], plan.path, extra,
                                 magnification=tile["magnification"]))
                counts[tile["magnification"]] += 1
                bar.set_postfix(patches=len(writer), refresh=False)
            skipped = {lp.magnification: lp.skipped or f"no patch with >= {tissue_threshold:.0%} tissue"
                       for lp in plan.levels if lp.skipped or counts[lp.magnification] == 0}
            if skipped:
                say(f"{plan.path}: skipped " + "; ".join(f"{m} ({why})" for m, why in skipped.items()))
            writer.meta["slides"].append({**plan.summary(), "slide": Path(plan.path).name,
                                          "patches": sum(counts.values()), "patches_per_level": counts,
                                          "skipped_levels": skipped})
        per_level = {m: sum(s["patches_per_level"].get(m, 0) for s in writer.meta["slides"]) for m in names}
        writer.meta["patches_per_level"] = per_level
        writer.meta["magnifications"] = [m for m in names if per_level[m]]
        writer.meta["skipped_levels"] = {
            m: why for m in names if (why := _skip_summary(m, plans, writer.meta["slides"])) is not None
        }
        if len(writer) == 0:
            raise DataError(f"no {patch} px patch at any of {', '.join(names)} with >= {tissue_threshold:.0%} tissue "
                            f"in {shown_slides(plans)}: are the slides mostly glass (lower --tissue-threshold)?",
                            plans[0].path if len(plans) == 1 else None)
    return PatchStore(out)
