"""A plain image (PNG / JPEG exported from a slide viewer) read as a one-level whole-slide image.

:class:`PlainImageSlide` has the part of the tiffslide / OpenSlide interface that :mod:`histosynth.data.slides`
and :mod:`histosynth.data.zoom_levels` use: ``dimensions``, ``level_count`` (1), ``level_dimensions``,
``level_downsamples``, ``properties`` and ``read_region``, ``close``.

Resolution. A PNG / JPEG's own resolution tags (dpi) are ignored: viewers and editors write placeholders
(72 / 96 / 300 dpi) there, never the microscope's pixel size. The pixel size comes from the caller
(``mpp=``, the ``--mpp`` flag), and is then in ``properties`` as ``openslide.mpp-x`` / ``openslide.mpp-y``;
without it the slide has no resolution metadata and the caller must give ``--mpp`` or
``--source-magnification``.

Memory. PNG and JPEG cannot be decoded region by region: the whole image is decoded once, on the first
``read_region`` (not on opening, so planning a slide reads only its header), and held as uint8 (H, W, 3)
until ``close``. 16-bit, grey, palette and RGBA files are converted to 8-bit RGB by
:func:`histosynth.data.io.read_rgb`. Large TIFFs go through tiffslide instead, which reads tiles.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from histosynth.errors import DataError

__all__ = ["PLAIN_IMAGE_SUFFIXES", "PlainImageSlide"]

PLAIN_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# PIL refuses images above ~179 Mpx as "decompression bombs"; a slide region exported at 20x is often
# larger, and the user named the file, so allow up to 2^31 pixels (6 GiB of RGB).
MAX_PIXELS = 1 << 31


class _PixelLimit:
    """Raise PIL's decompression-bomb limit to MAX_PIXELS while a slide's header or pixels are read."""

    def __enter__(self):
        self._old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = MAX_PIXELS
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return self

    def __exit__(self, *exc):
        self._warnings.__exit__(*exc)
        Image.MAX_IMAGE_PIXELS = self._old
        return False


class PlainImageSlide:
    """A PNG / JPEG file as a single-level slide; ``mpp`` (um per pixel) is its level-0 pixel size when known.

    Raises DataError naming the file when it is missing, not an image, or larger than MAX_PIXELS.
    """

    def __init__(self, path: str | Path, mpp: float | None = None):
        self.path = Path(path)
        if mpp is not None and not (math.isfinite(float(mpp)) and float(mpp) > 0):
            raise DataError(f"mpp must be a positive number of micrometres per pixel, got {mpp!r}", self.path)
        if not self.path.is_file():
            raise DataError("slide not found" if not self.path.exists() else "not a slide file", self.path)
        try:
            with _PixelLimit(), Image.open(self.path) as im:  # header only: size, no pixels decoded
                width, height = im.size
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            raise DataError(f"cannot read as an image (corrupt or unsupported file): {exc}", self.path) from None
        if width < 1 or height < 1:
            raise DataError(f"empty image ({width}x{height} px)", self.path)
        self.dimensions = (int(width), int(height))
        self.level_count = 1
        self.level_dimensions = (self.dimensions,)
        self.level_downsamples = (1.0,)
        self.properties: dict[str, str] = {"histosynth.plain-image": self.path.suffix.lower().lstrip(".")}
        if mpp is not None:
            self.properties["openslide.mpp-x"] = self.properties["openslide.mpp-y"] = repr(float(mpp))
        self._pixels: np.ndarray | None = None

    def _decoded(self) -> np.ndarray:
        if self._pixels is None:
            from histosynth.data.io import read_rgb

            with _PixelLimit():
                pixels = read_rgb(self.path)
            if pixels.shape[:2] != self.dimensions[::-1]:
                raise DataError(f"decoded {pixels.shape[1]}x{pixels.shape[0]} px, header says "
                                f"{self.dimensions[0]}x{self.dimensions[1]}", self.path)
            self._pixels = pixels
        return self._pixels

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """uint8 (h, w, 3) RGB of the region at level-0 ``location`` (x, y) of ``size`` (w, h) pixels.

        Only level 0 exists (ValueError otherwise). Pixels outside the image are white (glass), as
        OpenSlide's transparent outside turns white in :func:`histosynth.data.slides.read_region`.
        """
        if int(level) != 0:
            raise ValueError(f"a plain image has only level 0, asked for level {level}")
        x, y = (int(v) for v in location)
        w, h = (int(v) for v in size)
        if w < 0 or h < 0:
            raise ValueError(f"negative region size {w}x{h}")
        pixels = self._decoded()
        out = np.full((h, w, 3), 255, np.uint8)
        width, height = self.dimensions
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, width), min(y + h, height)
        if x1 > x0 and y1 > y0:
            out[y0 - y : y1 - y, x0 - x : x1 - x] = pixels[y0:y1, x0:x1]
        return out

    def close(self) -> None:
        self._pixels = None

    def __enter__(self) -> "PlainImageSlide":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def __repr__(self) -> str:
        return f"PlainImageSlide({str(self.path)!r}, {self.dimensions[0]}x{self.dimensions[1]})"
