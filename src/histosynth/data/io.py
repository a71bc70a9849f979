"""Low-level readers shared by the dataset formats, and the one record check they all apply.

Every problem with a user's file becomes a ``DataError`` that names the file, so a bad patch in a
dataset of thousands can be found and fixed without a traceback.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from histosynth.data.record import NucleiRecord
from histosynth.errors import DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
# PIL modes that hold one integer value per pixel ("P" keeps its palette indices, which are the labels).
_LABEL_MODES = {"1", "L", "P", "I", "I;16", "I;16L", "I;16B", "I;16N"}


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise DataError("file not found" if not path.exists() else "not a file", path)
    if path.stat().st_size == 0:
        raise DataError("file is empty (0 bytes)", path)


def open_decoded(path: Path) -> Image.Image:
    """The PIL image of ``path``, opened and fully decoded: PIL decodes lazily, so a truncated file would otherwise
    pass ``open``. Raises DataError naming the file: missing, empty, corrupt or not an image."""
    _check_file(path)
    try:
        im = Image.open(path)
        im.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"cannot read image (corrupt, truncated or not an image): {err}", path) from None
    return im


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as uint8 (H, W, 3) RGB, by the project's one rule (:func:`to_rgb_uint8`).

    Every place that reads a user's image (prepare, evaluate, the segmenter, stain targets) reads it through here.
    Raises DataError naming the file: missing, empty, corrupt, or a pixel type the rule refuses."""
    path = Path(path)
    return to_rgb_uint8(open_decoded(path), path)


# integer modes of one 16/32-bit channel: scaled by their bit depth, not clipped at 255
_WIDE_GREY = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}


def to_rgb_uint8(im: Image.Image, path: str | Path | None = None) -> np.ndarray:
    """uint8 (H, W, 3) RGB of a decoded PIL image, by one documented rule:

    - 8-bit RGB as it is; grey (L), 1-bit and palette (P) images replicated / looked up to RGB;
    - 16-bit grey (I;16*) scaled as value · 255 / 65535, rounded (not clipped at 255); 32-bit integer grey (I) the
      same when its values fit 16 bits, 8-bit values (max ≤ 255) kept, wider values refused; float grey (F) in
      [0, 1] scaled by 255, other floats refused;
    - 16-bit RGB (48-bit PNG) by PIL's own reduction to 8 bits per channel;
    - alpha (RGBA, LA, PA, palette transparency) composited over white: transparent pixels are glass;
    - CMYK and YCbCr converted to RGB.

    Raises DataError naming ``path`` for a pixel type outside these rules.
    """
    mode = im.mode
    if mode in _WIDE_GREY or mode == "I" or mode == "F":
        arr = np.asarray(im)
        top = float(arr.max()) if arr.size else 0.0
        if mode == "F":
            if arr.size and (np.nanmin(arr) < 0 or top > 1 or not np.isfinite(arr).all()):
                raise DataError("float image with values outside [0, 1]: no rule maps it to 8 bits", path)
            grey = np.rint(np.nan_to_num(arr) * 255.0)
        elif mode == "I" and top <= 255:
            grey = arr
        elif top <= 65535 and (arr.min() if arr.size else 0) >= 0:
            grey = np.rint(arr.astype(np.float64) * (255.0 / 65535.0))
        else:
            raise DataError(f"{mode} image with values up to {top:g}: more than 16 bits per pixel", path)
        return np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
    try:
        if mode == "P" and "transparency" in im.info or mode in ("PA", "LA", "RGBA", "La", "RGBa"):
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, rgba)
        if im.mode != "RGB":
            im = im.convert("RGB")
    except (OSError, ValueError) as err:
        raise DataError(f"cannot convert a {mode} image to RGB: {err}", path) from None
    return np.asarray(im, dtype=np.uint8).copy()


def read_label_png(path: str | Path) -> np.ndarray:
    """Read a single-channel 8/16/32-bit label image as int32 (H, W).

    A multi-channel (RGB) label is refused rather than guessed at: colour-coded masks would need a palette.
    """
    path = Path(path)
    im = open_decoded(path)
    if im.mode not in _LABEL_MODES:
        raise DataError(
            f"label image must be single-channel 8/16-bit integers, got PIL mode {im.mode!r} "
            f"({len(im.getbands())} channels)", path,
        )
    arr = np.asarray(im)
    if arr.ndim != 2:
        raise DataError(f"label image must be 2-D, got shape {arr.shape}", path)
    if arr.size and arr.min() < 0:
        raise DataError(f"label image has negative ids (min {arr.min()})", path)
    return arr.astype(np.int32)


def read_mat(path: str | Path, required_keys: Iterable[str] = ()) -> dict:
    """Load a MATLAB v5 .mat file (scipy.io.loadmat) and check that ``required_keys`` are present."""
    from scipy.io import loadmat

    path = Path(path)
    _check_file(path)
    try:
        data = loadmat(str(path))
    except NotImplementedError:
        raise DataError("MATLAB v7.3 (HDF5) .mat files are not supported; re-save them with -v7", path) from None
    except Exception as err:  # scipy raises many types (ValueError, TypeError, MatReadError, ...) on bad bytes
        raise DataError(f"cannot read .mat file (corrupt or not a MATLAB file): {err}", path) from None
    present = sorted(k for k in data if not k.startswith("__"))
    for key in required_keys:
        if key not in data:
            raise DataError(f"missing key {key!r} in .mat file (it has: {', '.join(present) or 'none'})", path)
    return data


def read_npy(path: str | Path, mmap: bool = True) -> np.ndarray:
    """Open a .npy array, memory-mapped by default so a dataset-sized array is never read whole."""
    path = Path(path)
    _check_file(path)
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except Exception as err:  # ValueError (bad header, object dtype), OSError, EOFError...
        raise DataError(f"cannot read .npy file (corrupt, truncated or holds Python objects): {err}", path) from None


def as_int_labels(arr: np.ndarray, what: str, path: str | Path) -> np.ndarray:
    """int32 copy of a label array; float labels are accepted only when they hold whole numbers."""
    arr = np.asarray(arr)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.array_equal(arr, np.round(arr)):
            raise DataError(f"{what} holds non-integer values", path)
    elif arr.dtype.kind not in "iub":
        raise DataError(f"{what} must hold integers, got dtype {arr.dtype}", path)
    return arr.astype(np.int32)


def as_uint8_image(arr: np.ndarray, path: str | Path) -> np.ndarray:
    """uint8 copy of an RGB array stored as another dtype (PanNuke keeps float64 in 0..255)."""
    arr = np.asarray(arr)
    if arr.dtype == np.uint8:
        return np.array(arr)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise DataError(f"image values {arr.min()}..{arr.max()} are outside 0..255", path)
    return np.rint(arr).astype(np.uint8)


def list_images(folder: Path, exclude_suffixes: tuple[str, ...] = ()) -> list[Path]:
    """Image files directly in ``folder`` (any case of extension), sorted by name for a stable order."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTS
        and not (exclude_suffixes and p.stem.endswith(exclude_suffixes))
    )


def child_dir(parent: Path, name: str) -> Path | None:
    """The sub-folder of ``parent`` called ``name`` in any letter case (CoNSeP ships Train/Images)."""
    exact = parent / name
    if exact.is_dir():
        return exact
    for p in sorted(parent.iterdir()) if parent.is_dir() else ():
        if p.is_dir() and p.name.lower() == name.lower():
            return p
    return None


def _hw(a: np.ndarray) -> str:
    return "x".join(str(s) for s in a.shape[:2])


def validate_record(record: NucleiRecord, *, label_path: str | Path | None = None, relabel_components: bool = False,
                    hint: str = "", instance_path: str | Path | None = None) -> NucleiRecord:
    """Check shapes, dtypes, type-id range and the instance map of a record before it enters the pipeline; return it.

    Integer label maps of another dtype are converted to int32 in place. Errors name ``record.source`` and, for label
    problems, ``label_path`` when given. Whether every instance pixel has a type is deliberately not checked: datasets
    disagree on that and it is harmless. An instance map that cannot be right (an id made of several disconnected
    parts, or more typed pixels in no instance than tolerated: :mod:`histosynth.data.instance_check`) is refused with
    the counts found, the instance file (``instance_path``, else ``label_path``) and ``hint`` (a reader's guess at the
    cause); with ``relabel_components`` split ids and typed pixels in no instance are repaired instead
    (:func:`histosynth.data.instance_check.relabel_components`).
    """
    src = record.source
    where = f" (label file {label_path})" if label_path is not None else ""
    img = record.image
    if not isinstance(img, np.ndarray) or img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        desc = f"{img.dtype} {img.shape}" if isinstance(img, np.ndarray) else type(img).__name__
        raise DataError(f"image must be uint8 HxWx3, got {desc}", src)
    for name in ("inst_map", "type_map"):
        lab = np.asarray(getattr(record, name))
        if lab.ndim != 2 or lab.shape != img.shape[:2]:
            raise DataError(f"image is {_hw(img)} (HxW) but {name} is {'x'.join(map(str, lab.shape))}{where}", src)
        if lab.dtype.kind not in "iu":
            raise DataError(f"{name} must hold integers, got dtype {lab.dtype}{where}", src)
        if lab.size and lab.min() < 0:
            raise DataError(f"{name} has negative ids (min {lab.min()}){where}", src)
        setattr(record, name, lab.astype(np.int32, copy=False))
    k = len(record.class_names)
    typ = record.type_map
    if typ.size and typ.max() > k:
        bad = [int(t) for t in np.unique(typ[typ > k])]
        names = ", ".join(f"{i}={n}" for i, n in enumerate(record.class_names, 1)) or "none"
        raise DataError(
            f"type id {bad[0] if len(bad) == 1 else bad} is outside 0..{k}; declared classes: {names}{where}", src
        )
    inst_where = f" (label file {instance_path})" if instance_path is not None else where
    _check_instance_map(record, inst_where, relabel_components, hint)
    return record


def _check_instance_map(record: NucleiRecord, where: str, relabel: bool, hint: str) -> None:
    """Refuse (or, with ``relabel``, repair in place) an instance map with split ids or untyped-instance pixels."""
    from histosynth.data.instance_check import check_instances, relabel_components

    report = check_instances(record.inst_map, record.type_map)
    if relabel and (report.split_ids.size or report.orphan_pixels):
        record.inst_map, record.type_map, _ = relabel_components(record.inst_map, record.type_map)
        return
    if report.ok:
        return
    raise DataError(
        f"instance map cannot be right: {report.summary()}{where}; {hint + '; ' if hint else ''}"
        "pass --relabel-components to split such ids into one nucleus per connected part "
        "(and give typed pixels without an instance their own)", record.source,
    )
