"""Region data (DISC): H&E images with a region mask, read or derived, for a region store (``prepare regions``).

Two sources of :class:`~histosynth.data.record.RegionRecord`:

- ``folder``: a plain folder anyone can export (QuPath, an annotation tool, a Gleason dataset converted by hand)::

      SRC/classes.txt          one region label per line; line i (from 0) names mask value i
      SRC/images/NAME.png|jpg|tif
      SRC/masks/NAME.png       single-channel, the image's size, values 0..K-1
      (or SRC/train/... and SRC/test/... with the same layout: the dataset's own split)

- ``nuclei-density``: regions made from nuclei labels (any ``prepare nuclei`` format), so DISC runs end to end on the
  CoNSeP / HGSC tissue here, where no Gleason annotation is reachable. Each region label is a group of nucleus
  types (``region_map``: ``epithelial=epithelial,neoplastic=epithelial,spindle-shaped=stroma,...``); a pixel's
  label is the group whose nuclei cover the largest share of its neighbourhood (the nuclei pixels of the group,
  Gaussian-smoothed with σ = ``sigma_um`` µm at the record's pixel size), or ``background`` (label 0) where no group
  covers ``min_fraction`` of it. Deterministic; documented in docs/disc.md with the label shares it gives.

Every problem is a DataError naming the file: a mask value outside the label set, a mask whose size differs from its
image (a mask at another magnification), an empty folder, a nucleus class the region map does not place.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from histosynth.data.io import child_dir, list_images, read_label_png, read_rgb
from histosynth.data.patches import parse_magnification
from histosynth.data.record import NucleiRecord, RegionRecord
from histosynth.errors import DataError

CLASSES_FILE = "classes.txt"
BACKGROUND = "background"
# nucleus types (the names of the readers here: CoNSeP merged, HGSC, PanNuke, Lizard / CoNIC) → region label
DEFAULT_REGION_MAP = {
    "epithelial": "epithelial", "neoplastic": "epithelial", "neoplastic cells": "epithelial",
    "spindle-shaped": "stroma", "connective": "stroma", "connective tissue": "stroma",
    "inflammatory": "inflammatory", "lymphocyte": "inflammatory", "plasma": "inflammatory",
    "neutrophil": "inflammatory", "eosinophil": "inflammatory",
    "other": "drop", "dead": "drop", "dead cells": "drop", "nucleus": "drop",
}
DEFAULT_SIGMA_UM = 16.0  # a few nuclei across: the scale at which a pathologist calls a region epithelial or stroma
DEFAULT_MIN_FRACTION = 0.1  # of the neighbourhood covered by one group's nuclei, else background


def read_classes(path: Path) -> tuple[str, ...]:
    """Region labels of a classes.txt (one per line, blank lines ignored); DataError naming it when absent, empty or
    with a repeated name."""
    if not path.is_file():
        raise DataError(f"no {CLASSES_FILE}: a region folder names its mask values in {CLASSES_FILE}, one label per "
                        "line (line 0 = value 0)", path)
    names = tuple(line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not names:
        raise DataError("no region labels in it", path)
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise DataError(f"repeated region labels {repeated}", path)
    if len(names) > 255:
        raise DataError(f"{len(names)} region labels; masks are stored as uint8, at most 255", path)
    return names


def check_region_mask(mask: np.ndarray, image_shape: tuple[int, ...], class_names: tuple[str, ...], path) -> None:
    """DataError naming ``path`` when the mask's size differs from the image's or a value lies outside 0..K-1."""
    if mask.shape != tuple(image_shape[:2]):
        h, w = image_shape[:2]
        ratio = mask.shape[0] / h if h else 0
        hint = (f" (1/{1 / ratio:g} of it: a mask at another magnification; export it at the image's)"
                if 0 < ratio < 1 else "")
        raise DataError(f"mask is {mask.shape[0]}x{mask.shape[1]} px, its image {h}x{w} px{hint}: a region mask "
                        "must cover its image pixel for pixel", path)
    if mask.size and (mask.min() < 0 or mask.max() >= len(class_names)):
        bad = sorted(int(v) for v in np.unique(mask) if v < 0 or v >= len(class_names))
        raise DataError(f"mask values {bad[:10]} outside the label set 0..{len(class_names) - 1} "
                        f"({', '.join(class_names)})", path)


def read_region_folder(src: str | Path, *, source_magnification: str | None = None) -> Iterator[RegionRecord]:
    """Records of a region folder (layout in the module docstring), in name order, train before test.

    Raises:
        DataError: naming the file or folder: no classes.txt, no images, an image without a mask, a bad mask.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError("region folder not found" if not src.exists() else "not a folder", src)
    names = read_classes(src / CLASSES_FILE)
    splits = [(s, child_dir(src, s)) for s in ("train", "test")]
    parts = [(s, d) for s, d in splits if d is not None] or [(None, src)]
    found = 0
    for split, root in parts:
        images, masks = child_dir(root, "images"), child_dir(root, "masks")
        if images is None or masks is None:
            raise DataError("a region folder holds images/ and masks/ (with classes.txt beside them)", root)
        for image_path in list_images(images):
            mask_path = next((p for p in list_images(masks) if p.stem == image_path.stem), None)
            if mask_path is None:
                raise DataError(f"no mask for this image in {masks} (masks/{image_path.stem}.png)", image_path)
            image = read_rgb(image_path)
            mask = read_label_png(mask_path)
            check_region_mask(mask, image.shape, names, mask_path)
            found += 1
            yield RegionRecord(image=image, region_map=mask, class_names=names, source=str(image_path), split=split,
                               magnification=source_magnification)
    if not found:
        raise DataError("no images in the region folder (images/*.png|jpg|tif)", src)


def parse_region_map(text: str | None) -> dict[str, str]:
    """{nucleus type: region label or "drop"} from "epithelial=epithelial,spindle-shaped=stroma" (None: the default)."""
    if text is None:
        return dict(DEFAULT_REGION_MAP)
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, label = part.partition("=")
        if not sep or not name.strip() or not label.strip():
            raise DataError(f"--region-map: {part!r} is not TYPE=REGION (or TYPE=drop)")
        out[name.strip()] = label.strip()
    if not out:
        raise DataError("--region-map: no TYPE=REGION pair given")
    return out


def region_labels(region_map: dict[str, str]) -> tuple[str, ...]:
    """``background`` then the map's region labels in order of first appearance ("drop" is not one)."""
    labels = [BACKGROUND]
    for label in region_map.values():
        if label != "drop" and label not in labels:
            labels.append(label)
    return tuple(labels)


def density_regions(record: NucleiRecord, region_map: dict[str, str], labels: tuple[str, ...], *,
                    sigma_um: float = DEFAULT_SIGMA_UM, min_fraction: float = DEFAULT_MIN_FRACTION) -> RegionRecord:
    """The region record of a nuclei record (rule in the module docstring); its pixel size from its magnification
    (10 / magnification µm/px). DataError naming the record: unknown magnification, a nucleus class the map does not
    place."""
    from scipy.ndimage import gaussian_filter

    if record.magnification is None:
        raise DataError("the source magnification is unknown; pass --source-magnification", record.source)
    unplaced = [n for n in record.class_names if n not in region_map]
    if unplaced:
        raise DataError(f"nucleus classes {unplaced} have no region in --region-map (give TYPE=REGION or TYPE=drop)",
                        record.source)
    sigma_px = sigma_um * parse_magnification(record.magnification) / 10.0
    cover = np.zeros((len(labels),) + record.type_map.shape, dtype=np.float32)
    for type_id, name in enumerate(record.class_names, start=1):
        target = region_map[name]
        if target != "drop":
            cover[labels.index(target)] += (record.type_map == type_id)
    for k in range(1, len(labels)):
        cover[k] = gaussian_filter(cover[k], sigma_px, mode="reflect")
    cover[0] = min_fraction  # background wins where no group reaches min_fraction
    region = cover.argmax(0).astype(np.int32)
    return RegionRecord(image=record.image, region_map=region, class_names=labels, source=record.source,
                        split=record.split, magnification=record.magnification, meta=dict(record.meta or {}))


def open_region_store(path, option: str | None = None):
    """The region store at ``path`` (a :class:`~histosynth.data.store.PatchStore` made by ``prepare regions``: image
    + region map per patch), or ``path`` itself when it is one already opened.

    Raises:
        DataError: naming the store (and ``option``, e.g. "--real", as the user typed it): any other store.
    """
    from histosynth.data.store import PatchStore

    store = path if isinstance(path, PatchStore) else PatchStore(path)
    if not store.has_regions:
        raise DataError(f"{option + ': ' if option else ''}not a region store (no region masks): make one with "
                        "`histosynth prepare regions`", store.path)
    return store
