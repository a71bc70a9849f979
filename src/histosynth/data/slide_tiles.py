"""Base tiles of a whole-slide image: the ``patch`` px tiles of the slide at the base magnification (ZoomLDM Sec. 3).

ZoomLDM pairs every patch, at any magnification, with the 20x region under it, and embeds that region tile by
tile. A slide's base tile grid is the tiling of :func:`histosynth.data.slide_patches.plan_slide` at the base
magnification with no overlap: tile ``(ty, tx)`` covers base pixels ``[ty*patch, (ty+1)*patch) x [tx*patch,
(tx+1)*patch)`` from the slide's origin, i.e. the level-0 square at ``(tx, ty) * patch * d`` of side ``patch * d``
(d = level-0 px per base px), read from the best pyramid level and area-averaged to ``patch`` px by
:func:`histosynth.data.zoom_levels.read_area` -- the same geometry as the patches of every level, so a patch's
window is exactly the tiles under it even when ``patch * d`` is not a whole number. The grid has ``floor(H_base / patch)`` rows and ``floor(W_base / patch)`` columns (the
``tile_rows`` / ``tile_cols`` a multi-magnification store records per slide); a patch of zoom k covers base tiles
``[tile_y, tile_y + 2^k) x [tile_x, tile_x + 2^k)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from histosynth.data.slide_patches import SlidePlan, plan_slide
from histosynth.data.slides import open_slide
from histosynth.data.zoom_levels import read_area
from histosynth.errors import DataError, HistosynthError

__all__ = ["plan_base_tiles", "base_tile_origin", "read_base_tile", "iter_base_tiles"]


def plan_base_tiles(path, patch: int, magnification: str | float,
                    source_magnification: str | float | None = None) -> SlidePlan:
    """The slide's plan at the base magnification with no overlap (its grid is the base tile grid).

    Raises:
        DataError: missing / corrupt slide, no resolution metadata, base magnification above the slide's.
    """
    return plan_slide(path, patch, magnification=magnification, overlap=0.0, source_magnification=source_magnification)


def base_tile_origin(plan: SlidePlan, ty: int, tx: int) -> tuple[float, float]:
    """Level-0 ``(x0, y0)`` of base tile ``(ty, tx)`` (fractional when ``patch * d`` is not a whole number)."""
    side0 = plan.patch * plan.downsample
    return tx * side0, ty * side0


def read_base_tile(slide, plan: SlidePlan, ty: int, tx: int) -> np.ndarray:
    """uint8 ``(patch, patch, 3)`` RGB of base tile ``(ty, tx)`` of an open slide.

    Raises:
        DataError: the tile is outside the slide, or its pixels cannot be decoded (corrupt tile data); the
            message names the slide file and the tile position.
    """
    side0 = plan.patch * plan.downsample
    x0, y0 = base_tile_origin(plan, ty, tx)
    if ty < 0 or tx < 0 or x0 + side0 > plan.width + 1 or y0 + side0 > plan.height + 1:
        raise DataError(f"base tile (row {ty}, col {tx}) is outside the slide's grid of {plan.patch} px tiles at "
                        f"{plan.magnification:g}x", plan.path)
    try:
        return read_area(slide, (x0, y0), (side0, side0), (plan.patch, plan.patch), plan.level, plan.path)
    except HistosynthError as exc:
        raise DataError(f"base tile (row {ty}, col {tx}): {exc.message}", plan.path) from None


def iter_base_tiles(plan: SlidePlan, positions: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(ty, tx, uint8 (patch, patch, 3))`` for each position, in the given order; the slide is opened once, read
    lazily, and closed when the iterator is exhausted or closed.

    Raises:
        DataError: as :func:`open_slide` and :func:`read_base_tile`.
    """
    slide = open_slide(plan.path)
    try:
        for ty, tx in positions:
            yield int(ty), int(tx), read_base_tile(slide, plan, int(ty), int(tx))
    finally:
        slide.close()
