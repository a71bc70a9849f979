"""The records dataset readers produce: :class:`NucleiRecord` (nuclei labels) and :class:`RegionRecord` (a region
mask); both carry the same provenance (:class:`LabelledImage`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(kw_only=True)
class LabelledImage:
    """Provenance shared by every record (keyword-only, after each record's own fields).

    split:         "train" / "test" when the dataset defines its own split, else None (then the hold-out block decides).
    magnification: objective magnification of the pixels as read ("20x", "40x", ...), if known.
    meta:          extra per-record values carried into the store's manifest (e.g. ``tissue``).
    """

    split: str | None = None
    magnification: str | None = None
    meta: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass
class NucleiRecord(LabelledImage):
    """One labelled H&E image (a tile, a patch or a whole region).

    image:       uint8 (H, W, 3) RGB.
    inst_map:    int32 (H, W); 0 background, 1..N nucleus instances.
    type_map:    int32 (H, W); 0 background, 1..len(class_names) nucleus type of each pixel.
    class_names: names of types 1..K (index 0 of this tuple is type id 1).
    source:      where it came from (file path, or "file.npy[index]"); used in errors and manifests.
    split, magnification, meta: see :class:`LabelledImage` (keyword-only).
    """

    image: np.ndarray
    inst_map: np.ndarray
    type_map: np.ndarray
    class_names: tuple[str, ...]
    source: str


@dataclass
class RegionRecord(LabelledImage):
    """One H&E image with a region mask (DISC's condition: Gleason patterns, or regions derived from nuclei).

    image:        uint8 (H, W, 3) RGB.
    region_map:   int32 (H, W); every pixel one label 0..len(class_names)-1 (no "unlabelled" value: label 0 is the
                  label set's first, e.g. non-cancer or background).
    class_names:  the region labels, index = label id.
    source, split, magnification, meta: as :class:`NucleiRecord`'s (the last three keyword-only).
    """

    image: np.ndarray
    region_map: np.ndarray
    class_names: tuple[str, ...]
    source: str
