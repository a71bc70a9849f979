"""Tile whole-slide images at several magnifications, each patch paired with its base region (ZoomLDM).

ZoomLDM (section 3.2) extracts 256 px patches at eight magnifications, 20x, 10x, ..., 0.15625x, and pairs
each with its 20x region (a 5x patch with a 1024 px region at 20x), whose HIPT embeddings condition it.
This module writes those patches into one image-only store; everything below the paper's one sentence is
our choice, and is a contract the conditioning code relies on.

Levels. ``--magnifications`` lists the base magnification B first (the highest; normally 20x), then
lower ones, each B / 2^k for an integer k >= 1 ("zoom" k), strictly decreasing; k need not be consecutive
(20x,5x,1.25x is fine). Anything else (a level that is not B / 2^k within 0.01 %, a level above the base,
a repeated or out-of-order one) is refused by :func:`parse_magnifications`.

Base grid. The slide's level 0 (magnification M0, see :mod:`histosynth.data.slides`; B <= M0, no
upsampling) is d = M0 / B level-0 px per base px; the slide at B is ``base_width`` = floor(W0 / d) by
``base_height`` = floor(H0 / d) px, cut from (0, 0) into tiles of ``patch`` base px:
``tile_rows`` = floor(base_height / patch), ``tile_cols`` = floor(base_width / patch).

Patches. A level-k patch sits on that grid at (``tile_y``, ``tile_x``), both multiples of 2^k, and covers
base tiles [tile_y, tile_y + 2^k) x [tile_x, tile_x + 2^k): the base region of patch * 2^k base px per
side, level-0 square (x, y, crop) = (tile_x * patch * d, tile_y * patch * d, patch * 2^k * d), rounded
to integers in the manifest. Patches of one level do not overlap; a remainder narrower than 2^k tiles
at the right / bottom is not tiled. Pixels: that region, read from the best pyramid level for the
patch's downsample d * 2^k (:func:`histosynth.data.slides.best_level_for`: the lowest-resolution level
still at least as sharp) and area-averaged to ``patch`` px, chunk by chunk (at most READ_CHUNK level px
per side of one read), so a 0.15625x region of a single-level slide (32768 px at 20x) never sits in
memory. When the level is within 1 % of the patch's downsample the pixels are the slide's own, a
``patch`` px square at the nearest level pixel (``resized`` false), as in single-magnification tiling.
Neighbouring patches whose regions fit in one READ_CHUNK read are read and resized together, which gives
the same pixels (regions are whole level pixels then) with one backend call instead of one per patch.

Tissue. One thumbnail per slide (about 8 px per base tile side) and the same detector and footprint rule
as single-magnification tiling: a patch is kept when the tissue fraction of its level-0 square on the
thumbnail is >= ``tissue_threshold``.

Resolution and files: as :mod:`histosynth.data.slides` (``source_magnification`` / ``mpp`` overrides,
PNG / JPEG regions as one-level slides); store.json's meta keeps both overrides (``source_magnification``,
``mpp``), which code that re-opens the slides on the same grid must pass again.

Store: :mod:`histosynth.data.zoom_store` (:func:`~histosynth.data.zoom_store.prepare_zoom_slides`).

Memory. One slide open at a time, one thumbnail, one READ_CHUNK read and one store shard.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from histosynth.data.patches import format_magnification, parse_magnification
from histosynth.data.slide_patches import check_tiling_args, slide_resolution
from histosynth.data.slides import (
    LEVEL_TOLERANCE,
    READ_CHUNK,
    best_level_for,
    footprint,
    open_slide,
    read_region,
    read_thumbnail,
    thumbnail_geometry,
    tissue_mask,
    to_level0,
)
from histosynth.errors import DataError, HistosynthError

__all__ = [
    "ZOOMLDM_MAGNIFICATIONS",
    "ZoomLevel",
    "ZoomLevelPlan",
    "ZoomSlidePlan",
    "iter_zoom_patches",
    "parse_magnifications",
    "plan_zoom_levels",
    "read_area",
]

ZOOMLDM_MAGNIFICATIONS = "20x,10x,5x,2.5x,1.25x,0.625x,0.3125x,0.15625x"
ZOOM_TOLERANCE = 1e-4  # a level must be base / 2^k to 0.01 %: '0.15625x', not '0.156x'


# ------------------------------------------------------------------------------------------- levels
@dataclass(frozen=True)
class ZoomLevel:
    """One requested level: magnification (float, e.g. 5.0) = base / 2^zoom."""

    magnification: float
    zoom: int

    @property
    def name(self) -> str:
        """Canonical spelling, '5x', '0.15625x' (the manifest's ``magnification``)."""
        return format_magnification(self.magnification)

    @property
    def tiles(self) -> int:
        """Base tiles per side of a patch's region: 2^zoom."""
        return 1 << self.zoom


def parse_magnifications(value: str | Sequence[str | float]) -> list[ZoomLevel]:
    """'20x,10x,5x' (or a list) -> levels with their zoom k; the first is the base (k = 0).

    Rule: the base is the first and highest; every other entry is base / 2^k for an integer k >= 1
    (within ZOOM_TOLERANCE), listed from high to low without repeats; k need not be consecutive.
    Raises HistosynthError naming --magnifications and the offending entry.
    """
    items = [s.strip() for s in value.split(",")] if isinstance(value, str) else list(value)
    if not items or any(item == "" for item in items):
        raise HistosynthError(f"--magnifications {value!r}: give a comma-separated list such as {ZOOMLDM_MAGNIFICATIONS}")
    try:
        mags = [parse_magnification(item) for item in items]
    except DataError as exc:
        raise HistosynthError(f"--magnifications: {exc}") from None
    base = mags[0]
    levels = [ZoomLevel(base, 0)]
    for item, mag in zip(items[1:], mags[1:]):
        ratio = base / mag
        k = round(math.log2(ratio)) if ratio > 0 else 0
        if k < 1 or abs(ratio - 2**k) > ZOOM_TOLERANCE * 2**k:
            halves = ", ".join(format_magnification(base / 2**j) for j in range(1, 5))
            nearest = f"; nearest: {format_magnification(base / 2**k)}" if k >= 1 else ""
            raise HistosynthError(
                f"--magnifications: {item} is not the base {format_magnification(base)} (the first, highest entry) "
                f"halved k >= 1 times ({halves}, ...){nearest}"
            )
        if k <= levels[-1].zoom:
            raise HistosynthError(
                f"--magnifications: {item} repeats or comes after a lower magnification; list the levels "
                "from the base down, each once (e.g. 20x,10x,5x)"
            )
        levels.append(ZoomLevel(base / 2**k, k))
    return levels


# --------------------------------------------------------------------------------------------- plan
@dataclass(frozen=True)
class ZoomLevelPlan:
    """How one slide is tiled at one level: positions on the base grid and the pyramid level read."""

    magnification: str  # '5x'
    zoom: int
    rows: int  # positions along y: tile_rows // 2^zoom
    cols: int
    region0: float  # level-0 px per side of a patch's region: patch * 2^zoom * base_downsample
    downsample: float  # level-0 px per patch pixel: base_downsample * 2^zoom
    level: int  # pyramid level read
    level_downsample: float
    resized: bool  # False: the level is at the patch's downsample, pixels are the slide's own
    skipped: str | None  # why the slide is not tiled at this level (too small), None when it is

    @property
    def positions(self) -> int:
        return 0 if self.skipped else self.rows * self.cols


@dataclass(frozen=True)
class ZoomSlidePlan:
    """One slide's base grid, thumbnail and per-level plans (decided up front, no pixels read)."""

    path: str
    width: int  # level 0
    height: int
    source_magnification: float  # level 0
    magnification_from: str
    mpp: float | None  # level-0 um/px when known
    base_magnification: float
    patch: int
    base_downsample: float  # level-0 px per base px, M0 / B
    base_width: int
    base_height: int
    tile_rows: int
    tile_cols: int
    thumbnail_size: tuple[int, int]  # (w, h)
    thumbnail_level: int
    levels: tuple[ZoomLevelPlan, ...]

    @property
    def thumbnail_scale(self) -> tuple[float, float]:
        """Level-0 pixels per thumbnail pixel along x and y."""
        return self.width / self.thumbnail_size[0], self.height / self.thumbnail_size[1]

    @property
    def num_positions(self) -> int:
        """Grid positions of all levels tiled, before the tissue filter."""
        return sum(lp.positions for lp in self.levels)

    def summary(self) -> dict:
        info = {k: v for k, v in asdict(self).items() if k != "levels"}
        info.update(base_magnification=format_magnification(self.base_magnification),
                    thumbnail_size=list(self.thumbnail_size))
        info["levels"] = {lp.magnification: {**asdict(lp), "positions": lp.positions} for lp in self.levels}
        return info


def plan_zoom_levels(
    path: str | Path,
    patch: int = 256,
    magnifications: str | Sequence[str | float] | Sequence[ZoomLevel] = ZOOMLDM_MAGNIFICATIONS,
    source_magnification: str | float | None = None,
    *,
    mpp: float | None = None,
) -> ZoomSlidePlan:
    """Open the slide, check it and its resolution, and plan its base grid and every level (no pixels read).

    Raises DataError naming the file: missing / corrupt slide, no resolution metadata (pass ``mpp`` or
    ``source_magnification``), base magnification above the slide's level 0.
    """
    check_tiling_args(patch, 0.0, 0.0)
    levels = _levels(magnifications)
    path = Path(path).resolve()  # stored in the store's meta: `embed` reopens it from any directory
    slide = open_slide(path, mpp=mpp)
    try:
        return _plan_zoom(slide, str(path), int(patch), levels, source_magnification, mpp)
    finally:
        slide.close()


def _levels(magnifications) -> list[ZoomLevel]:
    if not isinstance(magnifications, str) and magnifications and all(isinstance(m, ZoomLevel) for m in magnifications):
        return list(magnifications)
    return parse_magnifications(magnifications)


def _plan_zoom(slide, path: str, patch: int, levels: list[ZoomLevel], source_magnification, mpp) -> ZoomSlidePlan:
    width0, height0, source, how, mpp = slide_resolution(slide, path, source_magnification, mpp)
    base = levels[0].magnification
    if base > source * (1 + 1e-3):
        raise DataError(
            f"base magnification {base:g}x (the first of --magnifications) is above the slide's {source:g}x "
            f"(from its {how}); upsampling would invent detail: start --magnifications at or below {source:g}x",
            path,
        )
    d = max(1.0, source / base)
    base_w, base_h = math.floor(width0 / d + 1e-9), math.floor(height0 / d + 1e-9)
    rows, cols = base_h // patch, base_w // patch
    plans = []
    for lev in levels:
        n = lev.tiles
        needed = d * n
        level = best_level_for(slide, needed)
        ds = float(slide.level_downsamples[level])
        skipped = None
        if n > rows or n > cols:
            skipped = (f"slide too small: {rows}x{cols} base tiles of {patch} px at {format_magnification(base)}, "
                       f"the level needs {n}x{n}")
        plans.append(ZoomLevelPlan(
            magnification=lev.name, zoom=lev.zoom, rows=rows // n, cols=cols // n, region0=patch * n * d,
            downsample=needed, level=level, level_downsample=ds,
            resized=abs(ds - needed) > LEVEL_TOLERANCE * needed, skipped=skipped,
        ))
    thumb, thumb_level = thumbnail_geometry(slide, patch * d)
    return ZoomSlidePlan(
        path=path, width=width0, height=height0, source_magnification=source, magnification_from=how,
        mpp=mpp, base_magnification=base, patch=patch,
        base_downsample=d, base_width=base_w, base_height=base_h, tile_rows=rows, tile_cols=cols,
        thumbnail_size=thumb, thumbnail_level=thumb_level, levels=tuple(plans),
    )


# ------------------------------------------------------------------------------------------ reading
def read_area(
    slide, origin0: tuple[float, float], size0: tuple[float, float], size: tuple[int, int], level: int, path: str | Path
) -> np.ndarray:
    """uint8 (h, w, 3): the level-0 rectangle at ``origin0`` (x, y) of ``size0`` (w, h) px, area-averaged
    to ``size`` (w, h) px.

    Read from pyramid ``level`` in blocks of at most READ_CHUNK x READ_CHUNK level pixels, each resized
    with PIL's box filter onto its part of the output, so memory stays at one block whatever ``size0``.
    Level pixels outside the slide are clipped (the last block stretches over what exists). When the
    level is at the output's scale (within LEVEL_TOLERANCE) the ``size`` px rectangle at the nearest level
    pixel is read as it is, as single-magnification tiling does. Raises DataError naming the file and the
    block's position when the slide cannot be read there (corrupt tile data).
    """
    name = str(path)
    out_w, out_h = (int(v) for v in size)
    ds = float(slide.level_downsamples[level])
    level_w, level_h = (int(v) for v in slide.level_dimensions[level])
    ox, oy = origin0[0] / ds, origin0[1] / ds
    fx, fy = size0[0] / ds / out_w, size0[1] / ds / out_h  # level pixels per output pixel
    if abs(fx - 1.0) <= LEVEL_TOLERANCE and abs(fy - 1.0) <= LEVEL_TOLERANCE:
        return read_region(slide, (to_level0(round(ox), ds), to_level0(round(oy), ds)), level, (out_w, out_h), name)
    block = max(1, int(READ_CHUNK / max(fx, fy, 1.0)))
    out = np.empty((out_h, out_w, 3), np.uint8)

    def span(t0: int, t1: int, origin: float, f: float, limit: int) -> tuple[float, float, int, int]:
        b0, b1 = min(origin + t0 * f, limit - 1e-6), min(origin + t1 * f, limit)
        i0 = min(int(math.floor(b0)), limit - 1)
        i1 = max(i0 + 1, min(limit, int(math.ceil(b1))))
        return b0, max(b1, b0 + 1e-6), i0, i1

    for ty in range(0, out_h, block):
        ty1 = min(out_h, ty + block)
        by0, by1, iy0, iy1 = span(ty, ty1, oy, fy, level_h)
        for tx in range(0, out_w, block):
            tx1 = min(out_w, tx + block)
            bx0, bx1, ix0, ix1 = span(tx, tx1, ox, fx, level_w)
            region = read_region(slide, (to_level0(ix0, ds), to_level0(iy0, ds)), level, (ix1 - ix0, iy1 - iy0), name)
            small = Image.fromarray(region).resize(
                (tx1 - tx, ty1 - ty), Image.Resampling.BOX, box=(bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0)
            )
            out[ty:ty1, tx:tx1] = np.asarray(small)
    return out


def _group(lp: ZoomLevelPlan, patch: int) -> int:
    """Positions per side of one read: neighbours whose regions fit in READ_CHUNK level px are read (and
    resized) together, one call instead of one per patch. That gives the same pixels as one read per
    patch when a region is a whole number of level pixels (box averaging then never mixes two regions);
    otherwise, and for a level within LEVEL_TOLERANCE of the patch's scale but not on it, each patch is
    read alone."""
    side = lp.region0 / lp.level_downsample  # level px per region side
    if abs(side - round(side)) > 1e-9 * side or (not lp.resized and round(side) != patch):
        return 1
    return max(1, int(READ_CHUNK // side))


def _read_one_by_one(slide, plan: ZoomSlidePlan, lp: ZoomLevelPlan, kept: list) -> list[np.ndarray]:
    """A group read failed: read the kept patches one by one. A corrupt tile under glass only (no kept patch needs
    it) costs nothing; one under a kept patch is a DataError naming that patch (level, base-grid tile, level-0
    position)."""
    step0 = (1 << lp.zoom) * plan.patch * plan.base_downsample
    images = []
    for row, col, _ in kept:
        try:
            images.append(read_area(slide, (col * step0, row * step0), (lp.region0, lp.region0),
                                    (plan.patch, plan.patch), lp.level, plan.path))
        except DataError as error:
            message = getattr(error, "message", str(error))
            raise DataError(f"the {lp.magnification} patch at base tile y {row << lp.zoom}, x {col << lp.zoom}: "
                            + message, plan.path) from None
    return images


def iter_zoom_patches(
    plan: ZoomSlidePlan,
    tissue_threshold: float = 0.5,
    on_position: Callable[[], None] | None = None,
    slide_index: int = 0,
) -> Iterator[tuple[np.ndarray, dict]]:
    """The tissue patches of a planned slide, level by level (in the plan's order).

    Yields (uint8 (patch, patch, 3) image, metadata): level-0 ``y``, ``x``, ``crop`` and the manifest
    fields of the module docstring (``magnification``, ``zoom``, ``tile_y``, ``tile_x``, ``base_size``,
    ``slide_index``, ...). Within a level, positions come in square groups read together (see ``_group``),
    row by row inside a group. Levels the plan skips yield nothing. `on_position` is called at every
    grid position (before the tissue filter).
    """
    slide = open_slide(plan.path, mpp=plan.mpp)
    try:
        mask = tissue_mask(read_thumbnail(slide, plan.thumbnail_size, plan.thumbnail_level, plan.path))
        name = Path(plan.path).name
        d, p = plan.base_downsample, plan.patch
        for lp in plan.levels:
            if lp.skipped:
                continue
            n, g = 1 << lp.zoom, _group(lp, p)
            step0 = n * p * d  # level-0 px between neighbouring positions
            mpp = None if plan.mpp is None else plan.mpp * lp.downsample
            for gy in range(0, lp.rows, g):
                for gx in range(0, lp.cols, g):
                    kept = []
                    for row in range(gy, min(lp.rows, gy + g)):
                        for col in range(gx, min(lp.cols, gx + g)):
                            if on_position is not None:
                                on_position()
                            rows, cols = footprint(plan.thumbnail_size, plan.thumbnail_scale, col * step0, row * step0,
                                                   lp.region0)
                            fraction = float(mask[rows, cols].mean())
                            if fraction >= tissue_threshold:
                                kept.append((row, col, fraction))
                    if not kept:
                        continue
                    h, w = min(lp.rows, gy + g) - gy, min(lp.cols, gx + g) - gx
                    try:
                        block = read_area(slide, (gx * step0, gy * step0), (w * lp.region0, h * lp.region0),
                                          (w * p, h * p), lp.level, plan.path)
                        images = [np.ascontiguousarray(block[(r - gy) * p:(r - gy + 1) * p, (c - gx) * p:(c - gx + 1) * p])
                                  for r, c, _ in kept]
                    except DataError:
                        images = _read_one_by_one(slide, plan, lp, kept)
                    for (row, col, fraction), image in zip(kept, images):
                        yield image, {
                            "y": round(row * step0), "x": round(col * step0), "crop": round(lp.region0),
                            "magnification": lp.magnification, "zoom": lp.zoom, "tile_y": row * n, "tile_x": col * n,
                            "base_size": p * n, "slide_index": slide_index, "slide": name, "path": plan.path,
                            "level": lp.level, "level_downsample": lp.level_downsample,
                            "source_magnification": plan.source_magnification, "mpp": mpp,
                            "tissue_fraction": round(fraction, 4), "resized": lp.resized,
                        }
    finally:
        slide.close()
