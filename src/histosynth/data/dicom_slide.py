"""A DICOM whole-slide image (VL Whole Slide Microscopy Image instances, one per pyramid level) read through wsidicom.

:class:`DicomSlide` has the part of the tiffslide / OpenSlide interface that :mod:`histosynth.data.slides` uses:
``dimensions``, ``level_count``, ``level_dimensions``, ``level_downsamples`` (level-0 pixels per level pixel),
``properties`` (``openslide.mpp-x`` / ``-y`` from the instances' pixel spacing, ``openslide.objective-power`` when an
optical path records its objective lens power) and ``read_region`` with OpenSlide's convention (location in level-0
pixels, size in level pixels, RGB), ``close``.

A DICOM slide is the folder of its instances; a path to one of its ``.dcm`` files stands for that folder. wsidicom
(``pip install 'histosynth[dicom]'``) is the reader; without it, OpenSlide 4 reads DICOM too (``[openslide]``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from histosynth.errors import DataError

__all__ = ["DICOM_SUFFIX", "DicomSlide", "dicom_folder"]

DICOM_SUFFIX = ".dcm"


def dicom_folder(path: Path) -> Path | None:
    """The folder of the DICOM slide ``path`` names (a folder holding .dcm files, or one of them), else None."""
    if path.is_dir():
        return path if any(p.suffix.lower() == DICOM_SUFFIX for p in path.iterdir() if p.is_file()) else None
    return path.parent if path.suffix.lower() == DICOM_SUFFIX else None


class DicomSlide:
    """The DICOM WSI in ``folder`` (wsidicom's first pyramid). Raises DataError naming the folder when wsidicom
    finds no whole-slide image there."""

    def __init__(self, folder: str | Path):
        from wsidicom import WsiDicom

        self.path = Path(folder)
        try:
            self._wsi = WsiDicom.open(self.path)
            levels = list(self._wsi.levels)
        except Exception as exc:  # pydicom / wsidicom raise many types for files that are not a WSI
            raise DataError(f"cannot read as a DICOM whole-slide image: {type(exc).__name__}: {exc}", self.path) from None
        if not levels:
            raise DataError("no whole-slide image levels among these DICOM files", self.path)
        self._levels = levels
        base = levels[0].size
        self.dimensions = (int(base.width), int(base.height))
        self.level_count = len(levels)
        self.level_dimensions = tuple((int(lv.size.width), int(lv.size.height)) for lv in levels)
        self.level_downsamples = tuple(base.width / lv.size.width for lv in levels)
        mpp = self._wsi.mpp  # micrometres per level-0 pixel
        self.properties = {"openslide.vendor": "dicom", "openslide.mpp-x": str(float(mpp.width)),
                           "openslide.mpp-y": str(float(mpp.height))}
        power = self._objective_power()
        if power is not None:
            self.properties["openslide.objective-power"] = str(power)

    def _objective_power(self) -> float | None:
        try:
            paths = self._wsi.metadata.optical_paths
        except Exception:  # metadata the file does not have
            return None
        for optical_path in paths or []:
            power = getattr(getattr(optical_path, "objective", None), "objective_power", None)
            if power:
                return float(power)
        return None

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """uint8 (h, w, 3) of the region at level-0 ``location`` and ``level`` of ``size`` level pixels."""
        ds = self.level_downsamples[level]
        x, y = (int(math.floor(v / ds + 1e-9)) for v in location)
        region = self._wsi.read_region((x, y), self._levels[level].level, tuple(int(v) for v in size))
        return np.asarray(region.convert("RGB"))

    def close(self) -> None:
        self._wsi.close()
