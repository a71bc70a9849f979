"""Readers for nuclei datasets in their native formats, all yielding validated ``NucleiRecord``s.

Each reader finds its files and checks that every image has its labels when called (so a broken
dataset fails before any work), then streams records one image at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from histosynth.data.formats.conic import read_conic
from histosynth.data.formats.consep import read_consep
from histosynth.data.formats.folder import read_folder
from histosynth.data.formats.lizard import read_lizard
from histosynth.data.formats.pannuke import read_pannuke
from histosynth.data.formats.polygons import read_polygons
from histosynth.data.record import NucleiRecord
from histosynth.errors import DataError

READERS = {
    "consep": read_consep,
    "lizard": read_lizard,
    "conic": read_conic,
    "pannuke": read_pannuke,
    "folder": read_folder,
    "polygons": read_polygons,
}

__all__ = ["READERS", "read_nuclei", "read_conic", "read_consep", "read_folder", "read_lizard", "read_pannuke",
           "read_polygons"]


def read_nuclei(fmt: str, src: str | Path, **options) -> Iterator[NucleiRecord]:
    """Records of the dataset at ``src`` in format ``fmt`` (a key of ``READERS``)."""
    if fmt not in READERS:
        raise DataError(f"unknown dataset format {fmt!r}; known formats: {', '.join(READERS)}", src)
    src = Path(src)
    if not src.exists():
        raise DataError(f"{fmt} dataset source not found", src)
    if not src.is_dir():
        raise DataError(f"{fmt} dataset source must be a folder", src)
    return READERS[fmt](src, **options)
