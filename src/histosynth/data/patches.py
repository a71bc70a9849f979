"""Cut labelled regions into training patches, NASDM style (section 3.1).

NASDM holds out a random block of 7.5% of each region's area as the test set, then tiles both the
train remainder and the test block with 50% overlap. Tiles are cut at the *source* resolution and
resized to the patch size, so a 10x patch from a 20x region is a 2x larger crop scaled down.
The hold-out must be leak-free: no train patch may contain a single pixel of the test block.

When the block is smaller than one crop (e.g. 500x500 regions at 40x cut into 128 px patches at 20x: a
256 px crop, a 137 px block) no test tile fits in it. Such a region holds nothing out inside itself: all
its tiles are train, and :attr:`RegionPatches.whole_region` says so. The caller then holds out *whole*
regions instead (:func:`choose_whole_regions`: about the same fraction of those regions' patches, chosen
by the seed, at least one region when nothing else went to test, never all of them);
:func:`histosynth.data.prepare_labelled.write_regions` does it, prints a note and records it in store.json's meta
(``whole_region_holdout``). Train and test patches then come from different regions, so they never
overlap either. One such region alone cannot be split: that is an error asking for ``--holdout 0``
(no test split, on purpose) or more regions. A test split is never empty unless the hold-out is 0.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from histosynth.data.record import NucleiRecord, RegionRecord
from histosynth.errors import DataError

SPLITS = ("train", "test")


@dataclass
class Patch:
    """One patch; y, x and crop are in source-region pixels, so a patch can be re-projected onto its region.

    Image-only patches (e.g. tiles of a whole-slide image, for text- or class-conditioned models) have
    no labels: ``inst_map`` and ``type_map`` are None. ``extra`` holds further per-patch metadata (JSON
    values) that the store writes into the patch's manifest row, e.g. the slide level and tissue fraction.
    ``magnification`` is the patch's own ('5x') in a store of several magnifications (ZoomLDM, see
    :mod:`histosynth.data.zoom_levels`); None: the store's one magnification.
    """

    image: np.ndarray  # uint8 (P, P, 3)
    inst_map: np.ndarray | None  # int32 (P, P), instances relabelled 1..n; None for an image-only patch
    type_map: np.ndarray | None  # int32 (P, P); None for an image-only patch
    split: str
    y: int
    x: int
    crop: int
    source: str
    extra: dict = field(default_factory=dict)
    magnification: str | None = None
    region_map: np.ndarray | None = None  # int32 (P, P) region labels 0..K-1 (a region store, data/regions.py)


def parse_magnification(value: str | float | int, source: str | None = None) -> float:
    """'40x', '40X', '2.5x', 40 -> 40.0. Magnifications come from flags and file metadata, so be lenient."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        mag = float(value)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*[xX]?\s*", str(value))
        if match is None:
            raise DataError(f"cannot read magnification {value!r}; expected e.g. '20x'", source)
        mag = float(match.group(1))
    if mag <= 0:
        raise DataError(f"magnification must be positive, got {value!r}", source)
    return mag


def format_magnification(value: str | float | int) -> str:
    """Canonical spelling used in manifests: '20x', '2.5x'."""
    return f"{parse_magnification(value):g}x"


def holdout_shape(height: int, width: int, fraction: float) -> tuple[int, int]:
    """(h, w) of the hold-out block of a region: `fraction` of its area (see :func:`holdout_block`)."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"hold-out fraction must be in (0, 1), got {fraction}")
    if height < 1 or width < 1:
        raise ValueError(f"empty region {height}x{width}")
    area = fraction * height * width
    h = min(height, max(1, round(np.sqrt(area))))
    w = min(width, max(1, round(area / h)))  # rounding w against the rounded h keeps the area error < h/2
    if w == width:  # too wide for the region: use its full width, stretch the height instead
        h = min(height, max(1, round(area / w)))
    return int(h), int(w)


def holdout_block(height: int, width: int, fraction: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random block of `fraction` of the region's area: (y0, x0, h, w).

    Square when it fits (a square keeps the most test tiles for a given area); on a narrow region the
    short side is clipped to the region and the long side grows to keep the area.
    """
    h, w = holdout_shape(height, width, fraction)
    y0 = int(rng.integers(0, height - h + 1))
    x0 = int(rng.integers(0, width - w + 1))
    return y0, x0, h, w


def choose_whole_regions(sizes: list[int], fraction: float, rng: np.random.Generator, *, at_least_one: bool,
                         keep_one: bool) -> list[int]:
    """Indices of the regions (of ``sizes`` patches each) to hold out whole, when their blocks hold no test tile.

    The regions are taken in an order drawn from ``rng`` until their patches come nearest to ``fraction`` of
    all; ``at_least_one``: take one even when that overshoots (nothing else went to test); ``keep_one``: leave
    one region for train (nothing else did). Sorted; empty when there are no regions.
    """
    n = len(sizes)
    if n == 0:
        return []
    order = [int(i) for i in rng.permutation(n)]
    target = fraction * sum(sizes)
    totals = np.cumsum([0] + [sizes[i] for i in order])
    k = int(np.argmin(np.abs(totals - target)))  # the first of equally near counts: the fewer regions
    if at_least_one:
        k = max(k, 1)
    if keep_one:
        k = min(k, n - 1)
    return sorted(order[:k])


def tile_origins(length: int, crop: int, stride: int) -> list[int]:
    """Origins of tiles of size `crop` every `stride` px; the last tile sits flush with the border.

    The flush tile means no pixel at the far edge is ever skipped; an axis shorter than a crop has no tile.
    """
    if crop < 1 or stride < 1:
        raise ValueError(f"crop and stride must be >= 1, got crop={crop}, stride={stride}")
    if length < crop:
        return []
    origins = list(range(0, length - crop + 1, stride))
    if origins[-1] != length - crop:
        origins.append(length - crop)
    return origins


def relabel_contiguous(inst_map: np.ndarray) -> np.ndarray:
    """Renumber instances 1..n (0 stays background); cropping and resizing leave gaps in the ids."""
    if inst_map.size == 0:
        return inst_map.astype(np.int32)
    low, high = int(inst_map.min()), int(inst_map.max())
    if low < 0:
        raise ValueError(f"negative instance id {low}")
    if high <= 4 * inst_map.size + 1024:  # lookup table: linear time, unlike np.unique's sort
        present = np.bincount(inst_map.ravel(), minlength=high + 1) > 0
        present[0] = False
        lut = np.zeros(high + 1, np.int32)
        lut[present] = np.arange(1, int(present.sum()) + 1, dtype=np.int32)
        return lut[inst_map]
    ids, inverse = np.unique(inst_map, return_inverse=True)
    inverse = inverse.reshape(inst_map.shape)
    if ids[0] != 0:  # no background pixel: the first id must become 1, not 0
        inverse = inverse + 1
    return inverse.astype(np.int32)


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """Area (box) averaging when shrinking: anti-aliased, as a lower objective would see the tissue."""
    if image.shape[0] == size:
        return np.array(image, dtype=np.uint8)
    resample = Image.Resampling.BOX if image.shape[0] > size else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((size, size), resample))


def _resize_labels(labels: np.ndarray, size: int) -> np.ndarray:
    """Nearest neighbour at output pixel centres: labels must keep only ids that exist in the input."""
    crop = labels.shape[0]
    if crop == size:
        return np.array(labels, dtype=np.int32)
    idx = np.minimum(((np.arange(size) + 0.5) * crop / size).astype(np.int64), crop - 1)
    return labels[np.ix_(idx, idx)].astype(np.int32)


def _label_maps(record) -> dict[str, np.ndarray]:
    """The label maps a record carries: a NucleiRecord's inst_map and type_map, a RegionRecord's region_map."""
    names = ("inst_map", "type_map", "region_map")
    return {n: getattr(record, n) for n in names if getattr(record, n, None) is not None}


def _check_record(record) -> None:
    img, maps = record.image, _label_maps(record)
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise DataError(f"image must be uint8 HxWx3, got {img.dtype} {img.shape}", record.source)
    if any(m.shape != img.shape[:2] for m in maps.values()):
        sizes = " and ".join(f"{n} {m.shape}" for n, m in maps.items())
        raise DataError(f"image {img.shape[:2]}, {sizes} differ in size", record.source)
    if record.split is not None and record.split not in SPLITS:
        raise DataError(f"unknown split {record.split!r}; expected one of {SPLITS}", record.source)


def crop_size(
    patch: int, source_magnification: str | float, target_magnification: str | float, source: str | None = None
) -> int:
    """Source pixels one patch spans: patch * source/target (40x -> 20x doubles it)."""
    src = parse_magnification(source_magnification, source)
    dst = parse_magnification(target_magnification, source)
    if dst > src:
        raise DataError(
            f"target magnification {dst:g}x is higher than the source's {src:g}x; upsampling would invent detail",
            source,
        )
    return max(1, round(patch * src / dst))


def _cut(record, y: int, x: int, crop: int, patch: int, split: str) -> Patch:
    """The patch at (y, x): image area-averaged, every label map nearest-neighbour (a region record has no nuclei)."""
    window = (slice(y, y + crop), slice(x, x + crop))
    maps = {n: _resize_labels(m[window], patch) for n, m in _label_maps(record).items()}
    if "inst_map" in maps:
        maps["inst_map"] = relabel_contiguous(maps["inst_map"])
    return Patch(
        image=resize_image(record.image[window], patch),
        inst_map=maps.get("inst_map"),
        type_map=maps.get("type_map"),
        split=split,
        y=y,
        x=x,
        crop=crop,
        source=record.source,
        region_map=maps.get("region_map"),
    )


def _overlaps(y: int, x: int, crop: int, block: tuple[int, int, int, int]) -> bool:
    by, bx, bh, bw = block
    return y < by + bh and by < y + crop and x < bx + bw and bx < x + crop


class RegionPatches:
    """The patches of one region (see :func:`extract_patches`): iterate to cut them, train ones first.

    ``block`` is the hold-out block tiled as test, None when nothing is held out inside the region: the
    dataset's own split, no hold-out, or a block too small for one crop. ``whole_region`` is that last case
    (its block, ``small_block``, holds no test tile, so every tile is train): the caller may hold the region
    out whole. ``crop`` and ``stride`` are in source pixels.
    """

    def __init__(self, record: NucleiRecord | RegionRecord, patch: int, crop: int, stride: int,
                 block: tuple[int, int, int, int] | None):
        self.record, self.patch, self.crop, self.stride = record, patch, crop, stride
        self.small_block: tuple[int, int, int, int] | None = None
        if block is not None and not _holds_tile(block, crop, stride):
            block, self.small_block = None, block
        self.block = block

    @property
    def whole_region(self) -> bool:
        return self.small_block is not None

    def __iter__(self) -> Iterator[Patch]:
        return _iter_patches(self.record, self.patch, self.crop, self.stride, self.block)


def _holds_tile(block: tuple[int, int, int, int], crop: int, stride: int) -> bool:
    _, _, bh, bw = block
    return bool(tile_origins(bh, crop, stride)) and bool(tile_origins(bw, crop, stride))


def extract_patches(
    record: NucleiRecord | RegionRecord,
    patch: int = 128,
    overlap: float = 0.5,
    target_magnification: str | float = "20x",
    holdout_fraction: float = 0.075,
    rng: np.random.Generator | None = None,
) -> RegionPatches:
    """Patches of one region, train ones first (validated and hold-out drawn now, patches cut lazily).

    A dataset's own split (record.split) wins: all patches get it and no block is held out. Otherwise
    a hold-out block is drawn from `rng`; it is tiled on its own (test), and train tiles touching it are
    dropped, so train and test never share a pixel. A block smaller than one crop holds no test tile: then
    every tile is train and the result's ``whole_region`` is True (the caller holds out whole regions,
    see the module docstring).
    """
    _check_record(record)
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    if record.magnification is None:
        raise DataError(
            "the source magnification is unknown; pass it (e.g. source_magnification='40x')", record.source
        )
    crop = crop_size(patch, record.magnification, target_magnification, record.source)
    stride = max(1, round(crop * (1.0 - overlap)))
    height, width = record.image.shape[:2]
    block = None
    if record.split is None and holdout_fraction > 0:
        block = holdout_block(height, width, holdout_fraction, rng if rng is not None else np.random.default_rng())
    return RegionPatches(record, patch, crop, stride, block)


def _iter_patches(
    record: NucleiRecord | RegionRecord, patch: int, crop: int, stride: int, block: tuple[int, int, int, int] | None
) -> Iterator[Patch]:
    height, width = record.image.shape[:2]
    region_split = record.split or "train"  # the dataset's own split, else train
    for y in tile_origins(height, crop, stride):
        for x in tile_origins(width, crop, stride):
            if block is None or not _overlaps(y, x, crop, block):
                yield _cut(record, y, x, crop, patch, region_split)
    if block is not None:
        by, bx, bh, bw = block
        for dy in tile_origins(bh, crop, stride):
            for dx in tile_origins(bw, crop, stride):
                yield _cut(record, by + dy, bx + dx, crop, patch, "test")
