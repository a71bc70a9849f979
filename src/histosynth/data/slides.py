"""Whole-slide images (Aperio SVS, pyramidal or plain TIFF, ...): open, resolution, pyramid reads, tissue.

Tiling a slide into patches and a store of them: :mod:`histosynth.data.slide_patches`.

Resolution. The slide's level-0 magnification M0 is, in order: ``source_magnification`` when given
(an override), 10 / ``mpp`` when a pixel size is given (an override, ``--mpp``), the slide's objective power
(``tiffslide.objective-power`` / ``openslide.objective-power``), else 10 / MPP from the file (0.25 um/px =
40x, 0.5 um/px = 20x); a value from a pixel size is snapped to the nominal magnification when within 10 %.
A slide with none of these is an error when a magnification is asked (pass ``--mpp`` or
``--source-magnification``). Both overrides together must agree within 10 %.

Files. Slide formats (SLIDE_SUFFIXES) open with tiffslide, else openslide; PNG / JPEG images (a region
exported from a viewer) open as single-level slides (:mod:`histosynth.data.plain_image_slide`), whose own
dpi tags are ignored: they need ``--mpp`` or ``--source-magnification``. A folder given as a slide stands
for its slide files, and for its PNG / JPEG files too when one of those overrides is given (without one
they could not be read, and folders of slides often hold PNG thumbnails or labels).

Level. A patch at target magnification M spans d = M0 / M level-0 pixels per patch pixel. It is read from
the pyramid level with the largest downsample <= d, i.e. the lowest-resolution level whose magnification
is still >= M (OpenSlide's ``get_best_level_for_downsample``), as a crop of round(patch * d / ds) level
pixels resized to the patch with area (box) averaging. When a level is at the target (|ds - d| <= 1 %)
the crop is the patch and its pixels are the slide's own. A target above M0 is an error (no upsampling).

Tissue. One thumbnail per slide (longest side 512..4096 px, aiming at 8 thumbnail pixels per tile side)
is built chunk by chunk from the best level and thresholded by :func:`tissue_mask`. A tile is kept when
the fraction of tissue pixels in its footprint on the thumbnail is >= ``tissue_threshold``.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

from histosynth.data.patches import format_magnification, parse_magnification
from histosynth.data.dicom_slide import DICOM_SUFFIX, DicomSlide, dicom_folder
from histosynth.data.plain_image_slide import PLAIN_IMAGE_SUFFIXES, PlainImageSlide
from histosynth.data.tiff_tags import looks_like_ycbcr, ome_mpp, ycbcr_levels, ycbcr_to_rgb
from histosynth.errors import DataError, HistosynthError

__all__ = [
    "PLAIN_IMAGE_SUFFIXES",
    "SLIDE_SUFFIXES",
    "best_level_for",
    "check_resolution_overrides",
    "expand_slides",
    "open_slide",
    "read_region",
    "read_thumbnail",
    "slide_magnification",
    "slide_mpp",
    "tissue_mask",
    "to_level0",
]

SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".qptiff", ".mrxs", ".vms", ".vmu", ".svslide")
# formats only OpenSlide reads (a MIRAX slide is an index file beside a folder of data files; Hamamatsu VMS/VMU)
OPENSLIDE_ONLY_SUFFIXES = (".mrxs", ".vms", ".vmu", ".svslide")
NOMINAL_MAGNIFICATIONS = (1.25, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0)
LEVEL_TOLERANCE = 0.01  # a level within 1 % of the needed downsample is "at the target": no resize
THUMB_MIN_SIDE, THUMB_MAX_SIDE, THUMB_PIXELS_PER_TILE = 512, 4096, 8
READ_CHUNK = 512  # level pixels per side of one read while building the thumbnail (0.75 MB)


# ------------------------------------------------------------------------------------------ opening
def open_slide(path: str | Path, *, mpp: float | None = None):
    """Open a whole-slide image with tiffslide, else openslide when importable (the only reader of MIRAX, VMS/VMU
    and Sakura slides); errors name the file. Tiles that tiffslide returns as YCbCr are converted on every read
    (:mod:`histosynth.data.tiff_tags`), and the first tile of the slide is checked (:func:`check_first_tile`).

    A DICOM slide (a folder of its .dcm instances, or one of them) opens through wsidicom, else OpenSlide
    (:mod:`histosynth.data.dicom_slide`). A .png / .jpg / .jpeg file opens as a :class:`PlainImageSlide` (one
    level; ``mpp``, micrometres per level-0 pixel, becomes its ``openslide.mpp-x`` property). ``mpp`` is not applied to other slides here:
    :func:`slide_magnification` takes it as an override.
    """
    path = Path(path)
    if not path.exists():
        raise DataError("slide not found", path)
    dicom = dicom_folder(path)
    if dicom is not None:
        return _open_dicom(dicom)
    if not path.is_file():
        raise DataError("not a slide file", path)
    if path.suffix.lower() in PLAIN_IMAGE_SUFFIXES:
        return PlainImageSlide(path, mpp=mpp)
    errors, backends = [], 0
    try:
        import tiffslide
    except ImportError:
        tiffslide = None
    if tiffslide is not None and path.suffix.lower() not in OPENSLIDE_ONLY_SUFFIXES:
        backends += 1
        try:
            slide = tiffslide.TiffSlide(str(path))
        except Exception as exc:  # tifffile raises many types for a corrupt file
            errors.append(f"tiffslide: {type(exc).__name__}: {exc}")
        else:
            try:
                check_first_tile(slide, path)
            except DataError:
                slide.close()
                raise
            return slide
    try:
        import openslide
    except (ImportError, OSError):  # OSError: the python package without the C library
        openslide = None
    if openslide is not None:
        backends += 1
        try:
            return openslide.OpenSlide(str(path))
        except Exception as exc:
            errors.append(f"openslide: {type(exc).__name__}: {exc}")
    if not backends:
        need = ("openslide (pip install 'histosynth[openslide]')" if path.suffix.lower() in OPENSLIDE_ONLY_SUFFIXES
                else "tiffslide (pip install tiffslide) or openslide (pip install 'histosynth[openslide]')")
        raise HistosynthError(f"reading this slide needs {need}", path)
    raise DataError("cannot read as a whole-slide image (corrupt or unsupported file): " + "; ".join(errors), path)


def _open_dicom(folder: Path):
    """A DICOM WSI folder through wsidicom, else OpenSlide 4 (which opens it from one of its files)."""
    try:
        import wsidicom  # noqa: F401
    except ImportError:
        pass
    else:
        return DicomSlide(folder)
    try:
        import openslide
    except (ImportError, OSError):
        raise HistosynthError("reading DICOM slides needs wsidicom (pip install 'histosynth[dicom]') or openslide "
                              "(pip install 'histosynth[openslide]')", folder) from None
    first = min(p for p in folder.iterdir() if p.suffix.lower() == DICOM_SUFFIX)
    try:
        return openslide.OpenSlide(str(first))
    except Exception as exc:
        raise DataError(f"cannot read as a DICOM whole-slide image: openslide: {type(exc).__name__}: {exc}",
                        folder) from None


def _property(slide, name: str) -> float | None:
    """A positive number from the slide's properties (tiffslide.* or openslide.* spelling), else None."""
    props = slide.properties
    for prefix in ("tiffslide", "openslide"):
        value = props.get(f"{prefix}.{name}")
        if value is None or value == "":
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(number) and number > 0:
            return number
    return None


# level-0 pixel sizes a microscope scanner writes (100x oil ≈ 0.07 µm, a 1.25x overview ≈ 8 µm); outside this a
# file's value is a placeholder (72 / 96 / 300 dpi = 352.8 / 264.6 / 84.7 µm from an image editor), not a resolution
MICROSCOPE_MPP_RANGE = (0.05, 20.0)


def slide_mpp(slide) -> float | None:
    """Level-0 pixel size in micrometres (mpp-x), or None when the file does not record one a microscope could give
    (see :func:`recorded_mpp` for the raw value)."""
    mpp = recorded_mpp(slide)
    return mpp if mpp is not None and MICROSCOPE_MPP_RANGE[0] <= mpp <= MICROSCOPE_MPP_RANGE[1] else None


def recorded_mpp(slide) -> float | None:
    """The level-0 pixel size the file records (mpp-x, micrometres; an OME-TIFF's PhysicalSizeX), plausible or not;
    None when absent."""
    mpp = _property(slide, "mpp-x")
    return mpp if mpp is not None else ome_mpp(slide)


def magnification_from_mpp(mpp: float) -> float:
    """10 / mpp (0.25 um/px = 40x, 0.5 um/px = 20x), snapped to a nominal magnification within 10 %."""
    mag = 10.0 / float(mpp)
    nominal = min(NOMINAL_MAGNIFICATIONS, key=lambda m: abs(m - mag) / m)
    return nominal if abs(nominal - mag) <= 0.1 * nominal else mag


def slide_magnification(
    slide, path: str | Path | None = None, override: str | float | None = None, *, mpp: float | None = None
) -> tuple[float, str]:
    """Level-0 magnification and where it came from: 'override', 'mpp-override', 'objective-power' or 'mpp'.

    ``override`` (a magnification) wins, then ``mpp`` (micrometres per level-0 pixel, given by the user),
    then the file's objective power, then the file's MPP; pixel sizes go through :func:`magnification_from_mpp`.
    Raises DataError naming the file when none is known.
    """
    if override is not None:
        return parse_magnification(override), "override"  # a flag's value, not the file's: no path
    if mpp is not None:
        check_resolution_overrides(None, mpp)  # a flag's value: HistosynthError naming --mpp
        return magnification_from_mpp(mpp), "mpp-override"
    objective = _property(slide, "objective-power")
    if objective is not None:
        return objective, "objective-power"
    file_mpp = slide_mpp(slide)
    if file_mpp is not None:
        return magnification_from_mpp(file_mpp), "mpp"
    recorded = recorded_mpp(slide)
    what = ("no resolution metadata (neither objective power nor microns per pixel)" if recorded is None else
            f"its recorded pixel size, {recorded:.4g} µm/px ({25400 / recorded:.4g} dpi), cannot come from a "
            f"microscope (outside {MICROSCOPE_MPP_RANGE[0]:g}–{MICROSCOPE_MPP_RANGE[1]:g} µm/px: an image editor's "
            "placeholder)")
    raise DataError(
        f"{what}, so the magnification of the slide is unknown; pass its magnification with --source-magnification "
        "(e.g. 20x; source_magnification=) or its level-0 pixel size with --mpp (e.g. 0.5 for 20x; mpp=)",
        path,
    )


def check_resolution_overrides(source_magnification: str | float | None, mpp: float | None) -> None:
    """Check the flags --source-magnification and --mpp (HistosynthError naming them), before any slide is opened.

    Each is optional; given together, 10 / mpp must be within 10 % of the magnification.
    """
    if source_magnification is not None:
        format_magnification(source_magnification)
    if mpp is None:
        return
    try:
        value = float(mpp)
    except (TypeError, ValueError):
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise HistosynthError(f"--mpp must be a positive number of micrometres per pixel, got {mpp!r}")
    if source_magnification is not None:
        mag = parse_magnification(source_magnification)
        if abs(10.0 / value - mag) > 0.1 * mag:
            raise HistosynthError(
                f"--mpp {value:g} (= {10.0 / value:g}x) disagrees with --source-magnification {mag:g}x; give one of them"
            )


def best_level_for(slide, target_downsample: float) -> int:
    """The level with the largest downsample <= target_downsample (1 % tolerance); level 0 when none is.

    That is the lowest-resolution level still at least as sharp as the target, so reading it never
    upsamples and reads the fewest pixels.
    """
    limit = float(target_downsample) * (1 + LEVEL_TOLERANCE)
    downsamples = [float(d) for d in slide.level_downsamples]
    best = 0
    for level, ds in enumerate(downsamples):
        if ds <= limit and ds > downsamples[best]:
            best = level
    return best


def to_level0(coord: int, downsample: float) -> int:
    """Smallest level-0 coordinate that read_region maps onto level coordinate `coord` (int(c0 / ds) == coord)."""
    c0 = math.ceil(coord * downsample)
    while c0 > 0 and int((c0 - 1) / downsample) >= coord:
        c0 -= 1
    while int(c0 / downsample) < coord:
        c0 += 1
    return c0


def read_region(slide, location: tuple[int, int], level: int, size: tuple[int, int], path: str) -> np.ndarray:
    """uint8 (h, w, 3) RGB of a region (location in level-0 pixels, size in level pixels)."""
    try:
        if type(slide).__module__.startswith("tiffslide"):
            region = slide.read_region(location, level, size, as_array=True)
        else:
            region = np.asarray(slide.read_region(location, level, size))
    except Exception as exc:
        raise DataError(
            f"cannot read the region at level {level}, level-0 ({location[0]}, {location[1]}), size {size[0]}x{size[1]} "
            f"(corrupt tile data?): {type(exc).__name__}: {exc}",
            path,
        ) from None
    region = np.asarray(region)
    if region.dtype != np.uint8:
        raise DataError(f"unsupported pixel type {region.dtype}; expected 8-bit RGB", path)
    if region.ndim == 2:
        region = np.repeat(region[..., None], 3, axis=2)
    elif region.shape[2] == 4:  # openslide: RGBA, transparent outside the scanned area -> white glass
        rgb = np.array(region[..., :3])
        rgb[region[..., 3] == 0] = 255
        region = rgb
    elif region.shape[2] == 1:
        region = np.repeat(region, 3, axis=2)
    elif region.shape[2] != 3:
        raise DataError(f"unsupported number of channels {region.shape[2]}; expected RGB", path)
    if level in _ycbcr_levels(slide):
        return ycbcr_to_rgb(region)
    return np.ascontiguousarray(region)


_YCBCR_LEVELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # slide -> its levels of YCbCr tiles


def _ycbcr_levels(slide) -> frozenset[int]:
    """Levels whose tiles the backend returns as YCbCr (:mod:`histosynth.data.tiff_tags`), read once per slide."""
    try:
        return _YCBCR_LEVELS[slide]
    except (KeyError, TypeError):  # TypeError: a slide object that takes no weak reference
        levels = ycbcr_levels(slide)
        try:
            _YCBCR_LEVELS[slide] = levels
        except TypeError:
            pass
        return levels


def check_first_tile(slide, path: str | Path) -> None:
    """The colour-space check of every slide: the top-left tile (up to 256 px) of its smallest level, read and
    converted as every tile is, must not look like YCbCr stored as RGB (:func:`~histosynth.data.tiff_tags.
    looks_like_ycbcr`). DataError naming the file otherwise."""
    level = int(slide.level_count) - 1
    width, height = (int(v) for v in slide.level_dimensions[level])
    try:
        tile = read_region(slide, (0, 0), level, (min(256, width), min(256, height)), str(path))
    except DataError:  # corrupt tile data is reported where that tile is needed (with what was done before it)
        return
    if looks_like_ycbcr(tile):
        raise DataError("its tiles look like YCbCr stored as RGB (the glass of the first tile reads as chroma-neutral "
                        "YCbCr: R high, G and B near 128) although its TIFF tags do not say YCbCr; re-export the slide "
                        "with RGB tiles, or install openslide (pip install 'histosynth[openslide]') if the scanner's "
                        "own reader handles it", path)


# ------------------------------------------------------------------------------------------- tissue
def otsu_threshold(values: np.ndarray) -> int:
    """Otsu's threshold of uint8 values: the t maximising the between-class variance of (<= t, > t)."""
    hist = np.bincount(np.asarray(values, dtype=np.uint8).ravel(), minlength=256).astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 0
    p = hist / total
    omega = np.cumsum(p)
    mu = np.cumsum(p * np.arange(256))
    with np.errstate(divide="ignore", invalid="ignore"):
        between = (mu[-1] * omega - mu) ** 2 / (omega * (1.0 - omega))
    between[~np.isfinite(between)] = 0.0
    return int(np.argmax(between))


def _disk(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None] ** 2 + r[None, :] ** 2) <= radius * radius


def tissue_mask(
    thumbnail: np.ndarray, *, min_saturation: float = 0.05, max_saturation: float = 0.25, radius: int = 2
) -> np.ndarray:
    """Tissue (True) versus glass on an RGB uint8 thumbnail.

    1. Saturation of HSV, (max - min) / max per pixel: H&E-stained tissue is coloured (pink / purple), glass
       is white to grey whatever its brightness; black pixels (max = 0) count as unsaturated.
    2. Otsu's threshold on the saturation histogram, clamped to [min_saturation, max_saturation] (fractions
       of full saturation): the floor keeps a blank slide empty (Otsu would split its noise), the ceiling
       keeps pale stroma in a field that is nearly all tissue (Otsu would split tissue into two classes).
    3. Morphology with a disk of `radius` thumbnail pixels: closing bridges the gaps between nuclei and
       fibres, then opening removes dust and debris specks. The mask is padded by edge replication first,
       so tissue touching the border is not eroded.
    """
    image = np.asarray(thumbnail)
    if image.ndim != 3 or image.shape[2] < 3 or image.dtype != np.uint8:
        raise ValueError(f"thumbnail must be uint8 (H, W, 3), got {image.dtype} {image.shape}")
    rgb = image[..., :3]
    high = rgb.max(axis=2)
    low = rgb.min(axis=2)
    saturation = ((high - low).astype(np.uint16) * 255 // np.maximum(high, 1)).astype(np.uint8)
    del high, low
    lo, hi = round(min_saturation * 255), round(max_saturation * 255)
    threshold = min(max(otsu_threshold(saturation), lo), hi)
    mask = saturation > threshold
    del saturation
    if radius > 0 and mask.any():
        from scipy import ndimage

        disk = _disk(int(radius))
        pad = 2 * int(radius)
        padded = np.pad(mask, pad, mode="edge")
        padded = ndimage.binary_closing(padded, structure=disk)
        padded = ndimage.binary_opening(padded, structure=disk)
        mask = padded[pad:-pad, pad:-pad]
    return mask


def read_thumbnail(slide, size: tuple[int, int], level: int | None = None, path: str | Path | None = None) -> np.ndarray:
    """uint8 (h, w, 3) thumbnail of the whole slide at `size` (w, h), area-averaged, built chunk by chunk.

    Reads `level` (default: the best level for the thumbnail's downsample) in blocks of at most
    READ_CHUNK x READ_CHUNK level pixels, so a single-level slide never has to fit in memory.
    """
    tw, th = int(size[0]), int(size[1])
    width0, height0 = slide.dimensions
    if level is None:
        level = best_level_for(slide, min(width0 / tw, height0 / th))
    ds = float(slide.level_downsamples[level])
    level_w, level_h = slide.level_dimensions[level]
    fx, fy = width0 / tw / ds, height0 / th / ds  # level pixels per thumbnail pixel
    block = max(1, int(READ_CHUNK / max(fx, fy, 1.0)))
    out = np.empty((th, tw, 3), np.uint8)
    name = str(path) if path is not None else "slide"
    for ty in range(0, th, block):
        ty1 = min(th, ty + block)
        by0, by1 = ty * fy, min(ty1 * fy, level_h)
        iy0, iy1 = int(math.floor(by0)), min(level_h, int(math.ceil(by1)))
        for tx in range(0, tw, block):
            tx1 = min(tw, tx + block)
            bx0, bx1 = tx * fx, min(tx1 * fx, level_w)
            ix0, ix1 = int(math.floor(bx0)), min(level_w, int(math.ceil(bx1)))
            loc = (to_level0(ix0, ds), to_level0(iy0, ds))
            region = read_region(slide, loc, level, (ix1 - ix0, iy1 - iy0), name)
            small = Image.fromarray(region).resize(
                (tx1 - tx, ty1 - ty), Image.Resampling.BOX, box=(bx0 - ix0, by0 - iy0, bx1 - ix0, by1 - iy0)
            )
            out[ty:ty1, tx:tx1] = np.asarray(small)
    return out


# ------------------------------------------------------------------------------------------ geometry
def slide_size(slide, path: str) -> tuple[int, int]:
    """Level-0 (width, height) of an opened slide; DataError naming the file when unreadable or empty."""
    try:
        width0, height0 = (int(v) for v in slide.dimensions)
        level_count = int(slide.level_count)
    except Exception as exc:
        raise DataError(f"cannot read the slide's dimensions: {type(exc).__name__}: {exc}", path) from None
    if width0 < 1 or height0 < 1 or level_count < 1:
        raise DataError(f"empty slide ({width0}x{height0} px, {level_count} levels)", path)
    return width0, height0


def thumbnail_geometry(slide, tile0: float) -> tuple[tuple[int, int], int]:
    """Tissue thumbnail (w, h) and the level it is read from, for tiles of ``tile0`` level-0 px per side.

    About THUMB_PIXELS_PER_TILE thumbnail pixels per tile side, longest side within [THUMB_MIN_SIDE,
    THUMB_MAX_SIDE], never above level 0's resolution.
    """
    width0, height0 = (int(v) for v in slide.dimensions)
    longest = max(width0, height0)
    scale = tile0 / THUMB_PIXELS_PER_TILE
    scale = max(1.0, min(max(scale, longest / THUMB_MAX_SIDE), longest / THUMB_MIN_SIDE))
    thumb = (max(1, round(width0 / scale)), max(1, round(height0 / scale)))
    return thumb, best_level_for(slide, min(width0 / thumb[0], height0 / thumb[1]))


def footprint(size: tuple[int, int], scale: tuple[float, float], x0: float, y0: float, crop0: float) -> tuple[slice, slice]:
    """Rows and columns of a thumbnail of ``size`` (w, h), ``scale`` (level-0 px per thumbnail px along x, y),
    that the level-0 square (x0, y0, crop0) covers: rounded edges, at least one pixel."""
    sx, sy = scale
    tw, th = size
    c0 = min(tw - 1, round(x0 / sx))
    r0 = min(th - 1, round(y0 / sy))
    c1 = min(tw, max(c0 + 1, round((x0 + crop0) / sx)))
    r1 = min(th, max(r0 + 1, round((y0 + crop0) / sy)))
    return slice(r0, r1), slice(c0, c1)

# ------------------------------------------------------------------------------------------- files
def expand_slides(slides: Iterable[str | Path], plain_images: bool = False) -> list[Path]:
    """Slide files; a DICOM slide's folder (or one of its .dcm files) is one slide; another directory stands for the
    slide files and DICOM slide folders directly inside it (SLIDE_SUFFIXES, sorted), and with ``plain_images`` (given when --mpp or --source-magnification is) its PLAIN_IMAGE_SUFFIXES files too."""
    suffixes = SLIDE_SUFFIXES + (PLAIN_IMAGE_SUFFIXES if plain_images else ())
    out: list[Path] = []
    for item in slides:
        item = Path(item)
        if item.is_dir() and dicom_folder(item) is None:
            found = sorted(p for p in item.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
            found += sorted(p for p in item.iterdir() if p.is_dir() and dicom_folder(p) is not None)
            if not found:
                raise DataError(f"no slide files ({', '.join(suffixes)}) or DICOM slide folders in this folder", item)
            out.extend(found)
        else:  # a slide file, or a DICOM slide (its folder)
            out.append(item)
    return out
