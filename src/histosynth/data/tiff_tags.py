"""What a TIFF slide's own tags say that the tiffslide backend does not act on: the colour space of its tiles and the
pixel size in its OME-XML.

Colour space. tiffslide hands back decoded tiles as they come out of the codec. For JPEG tiles (compression 6, 7,
33007, 34892) the codec converts YCbCr to RGB; for Aperio's JPEG 2000 without a colour transform (compression
33003) and for any other tile whose PhotometricInterpretation is YCbCr (6), it does not, and the YCbCr values
would be stored as if they were RGB (glass turns salmon, tissue green-grey). :func:`ycbcr_levels` finds those
levels from the tags and :func:`ycbcr_to_rgb` converts their pixels as OpenSlide does (JFIF / ITU-R BT.601 full
range, through PIL; within 1 level of OpenSlide's output on the same file, tested). :func:`looks_like_ycbcr` is the
check on the first tile of every slide: a tile whose brightest part is uniform (R high, G and B at 128 ± 10, the
chroma-neutral glass of YCbCr data) was stored in a colour space its tags do not declare.

OME-TIFF. The pixel size is ``PhysicalSizeX`` (with ``PhysicalSizeXUnit``, µm when absent) of the first image's
``Pixels`` in the OME-XML (:func:`ome_mpp`).
"""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree

import numpy as np
from PIL import Image

__all__ = ["APERIO_JP2K_YCBCR", "looks_like_ycbcr", "ome_mpp", "tiles_are_ycbcr", "ycbcr_levels", "ycbcr_to_rgb"]

APERIO_JP2K_YCBCR = 33003  # Aperio JPEG 2000, YCbCr components without a colour transform (33005: RGB)
JPEG_COMPRESSIONS = frozenset({6, 7, 33007, 34892})  # their decoders return RGB whatever the photometric tag says
PHOTOMETRIC_YCBCR = 6
_MICROMETRES = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4, "pm": 1e-6}


def tiles_are_ycbcr(compression: int, photometric: int) -> bool:
    """Whether tiles of this compression and photometric decode to YCbCr that the backend leaves unconverted."""
    return compression == APERIO_JP2K_YCBCR or (photometric == PHOTOMETRIC_YCBCR and compression not in JPEG_COMPRESSIONS)


def _tifffile(slide):
    return getattr(slide, "ts_tifffile", None)  # tiffslide's TiffFile; None for openslide and plain images


def ycbcr_levels(slide) -> frozenset[int]:
    """Pyramid levels of a tiffslide slide whose tiles decode to unconverted YCbCr (empty for other backends)."""
    tif = _tifffile(slide)
    if tif is None:
        return frozenset()
    keyframes: dict[tuple[int, int], object] = {}
    for series in tif.series:  # the first series that has a level of a size wins (the pyramid is series 0)
        for level in series.levels:
            frame = level.keyframe
            keyframes.setdefault((int(frame.imagelength), int(frame.imagewidth)), frame)
    found = []
    for i, (width, height) in enumerate(slide.level_dimensions):
        frame = keyframes.get((int(height), int(width)))
        if frame is not None and tiles_are_ycbcr(int(frame.compression), int(frame.photometric)):
            found.append(i)
    return frozenset(found)


def ycbcr_to_rgb(region: np.ndarray) -> np.ndarray:
    """uint8 (h, w, 3) YCbCr (JFIF full range) → uint8 (h, w, 3) RGB, as OpenSlide converts Aperio's 33003 tiles."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(region), "YCbCr").convert("RGB"))


def looks_like_ycbcr(rgb: np.ndarray, min_fraction: float = 0.5) -> bool:
    """Whether a tile read as RGB is really YCbCr: at least ``min_fraction`` of its pixels are chroma-neutral glass
    in YCbCr (R >= 215, G and B within 128 ± 10, which RGB glass, near-equal channels, never is)."""
    r, g, b = (rgb[..., c].astype(np.int16) for c in range(3))
    glass = (r >= 215) & (np.abs(g - 128) <= 10) & (np.abs(b - 128) <= 10)
    return bool(glass.mean() >= min_fraction)


def ome_mpp(slide) -> float | None:
    """Micrometres per pixel along x from an OME-TIFF's OME-XML (PhysicalSizeX and its unit), or None."""
    tif = _tifffile(slide)
    xml = getattr(tif, "ome_metadata", None) if tif is not None else None
    if not xml:
        return None
    try:
        root = ElementTree.fromstring(xml)
    except ElementTree.ParseError:
        return None
    for element in root.iter():
        if element.tag.rsplit("}", 1)[-1] == "Pixels" and element.get("PhysicalSizeX"):
            try:
                size = float(element.get("PhysicalSizeX"))
            except ValueError:
                return None
            scale = _MICROMETRES.get(element.get("PhysicalSizeXUnit", "µm"))
            return size * scale if scale is not None and size > 0 else None
    return None
