"""Tile whole-slide images into image-only patches and a patch store of them.

PathLDM (section 4.1) cuts TCGA-BRCA slides into 256x256 patches at 10x and conditions each patch on its
slide's report plus patch-level statistics. This module produces those patches, streaming, with the
metadata a later conditioning step needs. The paper only says "256x256 patches at 10x magnification";
everything below is our choice where it is silent.

Grid. Tiles lie on the chosen level every round(crop * (1 - overlap)) level pixels from (0, 0); a
remainder narrower than one crop at the right / bottom edge is not tiled (slide borders are glass).
Each tile's level-0 origin is the smallest level-0 coordinate that maps onto its level origin (what
``read_region`` expects); ``y``, ``x``, ``crop`` of a stored patch are level-0 pixels.

Memory. Slides are opened one at a time; tiles are read, resized and handed to the store one by one, and
the store holds at most one shard. Peak memory is the thumbnail plus one shard, whatever the number or
size of the slides.

Opening, resolution, level choice and the tissue mask: :mod:`histosynth.data.slides`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from histosynth.atomic import refuse_existing
from histosynth.data.patches import Patch, format_magnification, parse_magnification, resize_image
from histosynth.data.slides import (
    LEVEL_TOLERANCE,
    best_level_for,
    check_resolution_overrides,
    expand_slides,
    footprint,
    open_slide,
    read_region,
    read_thumbnail,
    slide_magnification,
    slide_mpp,
    slide_size,
    thumbnail_geometry,
    tissue_mask,
    to_level0,
)
from histosynth.errors import DataError

__all__ = ["SlidePlan", "check_tiling_args", "iter_plan", "plan_slide", "prepare_slides", "tile_slide"]


# --------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class SlidePlan:
    """How one slide is tiled: resolution, level, crop and grid, tissue thumbnail (all decided up front)."""

    path: str
    width: int  # level 0
    height: int
    source_magnification: float  # level 0
    magnification_from: str  # 'override', 'objective-power' or 'mpp'
    mpp: float | None  # level-0 um/px when recorded
    magnification: float  # target
    patch: int
    downsample: float  # level-0 pixels per patch pixel, M0 / M
    level: int
    level_downsample: float
    level_width: int
    level_height: int
    level_crop: int  # level pixels per tile side
    level_stride: int
    resized: bool  # False: the level is at the target, patch pixels are the slide's own
    thumbnail_size: tuple[int, int]  # (w, h)
    thumbnail_level: int

    @property
    def grid_x(self) -> range:
        return range(0, self.level_width - self.level_crop + 1, self.level_stride)

    @property
    def grid_y(self) -> range:
        return range(0, self.level_height - self.level_crop + 1, self.level_stride)

    @property
    def num_tiles(self) -> int:
        """Grid positions before the tissue filter."""
        return len(self.grid_x) * len(self.grid_y)

    @property
    def crop0(self) -> int:
        """Level-0 pixels per tile side."""
        return round(self.level_crop * self.level_downsample)

    @property
    def thumbnail_scale(self) -> tuple[float, float]:
        """Level-0 pixels per thumbnail pixel along x and y."""
        return self.width / self.thumbnail_size[0], self.height / self.thumbnail_size[1]

    def summary(self) -> dict:
        info = asdict(self)
        info.update(thumbnail_size=list(self.thumbnail_size), thumbnail_scale=list(self.thumbnail_scale),
                    crop0=self.crop0, num_tiles=self.num_tiles, magnification=format_magnification(self.magnification))
        return info


def check_tiling_args(patch: int, overlap: float, tissue_threshold: float) -> None:
    if int(patch) != patch or patch < 1:
        raise ValueError(f"patch must be a positive integer, got {patch!r}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if not 0.0 <= tissue_threshold <= 1.0:
        raise ValueError(f"tissue_threshold must be in [0, 1], got {tissue_threshold}")


def plan_slide(
    path: str | Path,
    patch: int = 256,
    magnification: str | float = "10x",
    overlap: float = 0.0,
    source_magnification: str | float | None = None,
    *,
    mpp: float | None = None,
) -> SlidePlan:
    """Open the slide, check it and its resolution, and decide level, crop, grid and thumbnail (no pixels read).

    ``mpp`` (micrometres per level-0 pixel) overrides the file's resolution like ``source_magnification``.
    """
    check_tiling_args(patch, overlap, 0.0)
    path = Path(path)
    slide = open_slide(path, mpp=mpp)
    try:
        return _plan(slide, str(path), int(patch), magnification, overlap, source_magnification, mpp)
    finally:
        slide.close()


def slide_resolution(slide, path: str, source_magnification, mpp: float | None):
    """(level-0 width, height in px, source magnification, where it came from, µm per level-0 pixel) of an open
    slide; ``source_magnification`` / ``mpp`` override the file's. DataError naming ``path`` when neither says."""
    width0, height0 = slide_size(slide, path)
    source, how = slide_magnification(slide, path, source_magnification, mpp=mpp)
    return width0, height0, source, how, slide_mpp(slide) if mpp is None else float(mpp)


def _plan(slide, path: str, patch: int, magnification, overlap: float, source_magnification,
          mpp: float | None = None) -> SlidePlan:
    target = parse_magnification(magnification)  # a flag's value: an error names no file
    width0, height0, source, how, mpp = slide_resolution(slide, path, source_magnification, mpp)
    if target > source * (1 + 1e-3):
        raise DataError(
            f"target magnification {target:g}x is above the slide's {source:g}x (from its {how}); "
            "upsampling would invent detail: ask for a magnification <= the slide's",
            path,
        )
    needed = max(1.0, source / target)
    level = best_level_for(slide, needed)
    ds = float(slide.level_downsamples[level])
    level_w, level_h = (int(v) for v in slide.level_dimensions[level])
    exact = abs(ds - needed) <= LEVEL_TOLERANCE * needed
    level_crop = patch if exact else max(patch, round(patch * needed / ds))
    stride = max(1, round(level_crop * (1.0 - overlap)))
    # thumbnail: ~THUMB_PIXELS_PER_TILE pixels per tile side, longest side within [THUMB_MIN_SIDE, THUMB_MAX_SIDE]
    thumb, thumb_level = thumbnail_geometry(slide, level_crop * ds)
    return SlidePlan(
        path=path, width=width0, height=height0, source_magnification=source, magnification_from=how,
        mpp=mpp, magnification=target, patch=patch, downsample=needed, level=level,
        level_downsample=ds, level_width=level_w, level_height=level_h, level_crop=level_crop,
        level_stride=stride, resized=not exact, thumbnail_size=thumb, thumbnail_level=thumb_level,
    )



# ------------------------------------------------------------------------------------------- tiling
def tile_footprint(plan: SlidePlan, x0: int, y0: int) -> tuple[slice, slice]:
    """Rows and columns of the thumbnail that a tile at level-0 (x0, y0) covers (at least one pixel)."""
    return footprint(plan.thumbnail_size, plan.thumbnail_scale, x0, y0, plan.crop0)


def tile_slide(path: str | Path, patch: int = 256, magnification: str | float = "10x", tissue_threshold: float = 0.5,
               overlap: float = 0.0, *, source_magnification: str | float | None = None,
               mpp: float | None = None) -> Iterator[tuple[np.ndarray, dict]]:
    """Tissue tiles of one slide, one at a time: (uint8 (patch, patch, 3) image, metadata dict).

    The slide is opened and checked now (missing, corrupt, no resolution, target above the slide's: a
    DataError naming the file); pixels are read lazily as the iterator is consumed. Metadata: ``slide``
    (file name), ``path``, ``level``, ``level_x``, ``level_y``, ``level_crop``, ``level_downsample``,
    level-0 ``x``, ``y``, ``crop``, ``magnification`` (target, '10x'), ``source_magnification`` (level 0),
    ``mpp`` (micrometres per patch pixel, None when unknown), ``tissue_fraction`` (in [0, 1]), ``resized``.
    ``mpp=`` (micrometres per level-0 pixel) overrides the file's resolution, like ``source_magnification``.
    """
    check_tiling_args(patch, overlap, tissue_threshold)
    check_resolution_overrides(source_magnification, mpp)
    plan = plan_slide(path, patch, magnification, overlap, source_magnification, mpp=mpp)
    return iter_plan(plan, tissue_threshold)


def iter_plan(
    plan: SlidePlan, tissue_threshold: float = 0.5, on_position: Callable[[], None] | None = None
) -> Iterator[tuple[np.ndarray, dict]]:
    """The tiles of a planned slide (see tile_slide); `on_position` is called for every grid position."""
    slide = open_slide(plan.path)
    try:
        thumbnail = read_thumbnail(slide, plan.thumbnail_size, plan.thumbnail_level, plan.path)
        mask = tissue_mask(thumbnail)
        del thumbnail
        name = Path(plan.path).name
        target = format_magnification(plan.magnification)
        mpp = None if plan.mpp is None else plan.mpp * plan.downsample
        ds, lc, crop0 = plan.level_downsample, plan.level_crop, plan.crop0
        for ly in plan.grid_y:
            y0 = to_level0(ly, ds)
            for lx in plan.grid_x:
                if on_position is not None:
                    on_position()
                x0 = to_level0(lx, ds)
                rows, cols = tile_footprint(plan, x0, y0)
                fraction = float(mask[rows, cols].mean())
                if fraction < tissue_threshold:
                    continue
                region = read_region(slide, (x0, y0), plan.level, (lc, lc), plan.path)
                image = resize_image(region, plan.patch) if plan.resized else region
                yield image, {
                    "slide": name, "path": plan.path, "level": plan.level, "level_x": lx, "level_y": ly,
                    "level_crop": lc, "level_downsample": ds, "x": x0, "y": y0, "crop": crop0,
                    "magnification": target, "source_magnification": plan.source_magnification,
                    "mpp": mpp, "tissue_fraction": round(fraction, 4), "resized": plan.resized,
                }
    finally:
        slide.close()



# manifest row of a stored patch: these tile metadata keys become the Patch's own fields
_PATCH_FIELDS = ("path", "x", "y", "crop", "magnification")


def prepare_slides(slides: Sequence[str | Path] | Iterable[str | Path], out: str | Path, *, patch: int = 256,
                   magnification: str | float = "10x", overlap: float = 0.0, tissue_threshold: float = 0.5,
                   source_magnification: str | float | None = None, overwrite: bool = False, progress: bool = True,
                   command: str | Sequence[str] | None = None, shard_size: int | None = None, mpp: float | None = None):
    """Tile whole-slide images into an image-only patch store (PathLDM: 256 px at 10x) and open it.

    Every slide is opened and checked before any tile is written, so a bad file fails the run at once.
    All patches are in the "train" split (split by slide, e.g. one store per split, as PathLDM does).
    Manifest rows: ``source`` (slide path), level-0 ``y``, ``x``, ``crop``, ``magnification`` and the
    tile metadata of :func:`tile_slide` (slide, level, level_x, level_y, level_crop, level_downsample,
    source_magnification, mpp, tissue_fraction, resized). store.json's meta lists each slide's plan. ``mpp``
    (micrometres per level-0 pixel) overrides the slides' resolution; PNG / JPEG files need it or
    ``source_magnification``. Several magnifications per slide (ZoomLDM):
    :func:`histosynth.data.zoom_store.prepare_zoom_slides`.
    """
    from histosynth.data.store import PatchStore
    from histosynth.data.store_writer import PatchStoreWriter, command_list

    check_tiling_args(patch, overlap, tissue_threshold)
    format_magnification(magnification)  # bad flags fail before any slide is opened
    check_resolution_overrides(source_magnification, mpp)
    out = Path(out)
    paths = slides_to_store(slides, out, overwrite, source_magnification, mpp)
    plans = [plan_slide(p, patch, magnification, overlap, source_magnification, mpp=mpp) for p in paths]
    args = {"patch": patch, "magnification": format_magnification(magnification), "overlap": overlap,
            "tissue_threshold": tissue_threshold, "source_magnification": source_magnification, "mpp": mpp}
    meta = {"kind": "slides", "overlap": overlap, "tissue_threshold": tissue_threshold,
            "source_magnification": source_magnification, "mpp": mpp, "command": command_list(command),
            "args": args, "slides": []}
    bar = tile_progress(sum(p.num_tiles for p in plans), "tile", progress)
    with bar, PatchStoreWriter(out, (), patch, magnification, meta, overwrite, shard_size, labels=False) as writer:
        for plan in plans:
            kept = 0
            for image, tile in iter_plan(plan, tissue_threshold, lambda: bar.update(1)):
                extra = {k: v for k, v in tile.items() if k not in _PATCH_FIELDS}
                writer.add(Patch(image, None, None, "train", tile["y"], tile["x"], tile["crop"], plan.path, extra))
                kept += 1
                bar.set_postfix(patches=len(writer), refresh=False)
            writer.meta["slides"].append({**plan.summary(), "patches": kept})
        if len(writer) == 0:
            raise DataError(f"no {patch} px patch at {format_magnification(magnification)} with >= "
                            f"{tissue_threshold:.0%} tissue in {shown_slides(plans)}: is the slide smaller than one "
                            "crop, or mostly glass (lower --tissue-threshold)?", plans[0].path if len(plans) == 1 else None)
    return PatchStore(out)


# ------------------------------------------------------------------------ shared by the slide stores
def slides_to_store(slides, out: Path, overwrite: bool, source_magnification, mpp) -> list[str]:
    """The slide paths to tile into ``out``. An existing ``out`` without ``overwrite`` is refused before any slide is
    read (OutputExistsError); no slide at all is a DataError. PNG / JPEG files count only with a resolution override."""
    refuse_existing(out, overwrite)
    paths = expand_slides(slides, plain_images=source_magnification is not None or mpp is not None)
    if not paths:
        raise DataError("no slides to prepare", out)
    return paths


def tile_progress(total: int, unit: str, progress: bool):
    """A tqdm bar on stderr over ``total`` tiles or positions (disabled, but still callable, without ``progress``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc="prepare slides", file=sys.stderr, disable=not progress)


def shown_slides(plans) -> str:
    """The first five slides' paths, for an error message."""
    return ", ".join(p.path for p in plans[:5]) + (f" and {len(plans) - 5} more" if len(plans) > 5 else "")
