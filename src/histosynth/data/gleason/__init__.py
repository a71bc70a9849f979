"""Native-format readers of the public Gleason datasets, for DISC's region stores (``prepare regions --format F``).

Each reader yields :class:`~histosynth.data.record.RegionRecord`s whose ``region_map`` holds, for every pixel, a label
0..K-1 of one label set (default DISC's K = 4: non-cancer, GG3, GG4, GG5, :mod:`.labels`), from the dataset's own
files, with a documented default mapping of its native mask values that ``--label-map`` overrides:

- ``sicapv2`` (:mod:`.sicapv2`): 512 px patches at 10x, JPEG / PNG masks 0 / 3 / 4 / 5, split from the partition
  spreadsheets (``partition``: test, val1..val4);
- ``gleason2019`` (:mod:`.gleason2019`): TMA cores at 40x, six pathologists' maps, one of them or their majority;
- ``panda`` (:mod:`.panda`): pyramidal slides and label masks, read as aligned blocks at the target magnification;
  Karolinska's ungraded cancer needs an explicit mapping.

Data layer only: imports from :mod:`histosynth.data` and :mod:`histosynth.errors`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from histosynth.data.gleason.gleason2019 import read_gleason2019
from histosynth.data.gleason.labels import DEFAULT_LABELS, parse_label_map, parse_labels
from histosynth.data.gleason.panda import read_panda
from histosynth.data.gleason.sicapv2 import read_sicapv2
from histosynth.data.record import RegionRecord

__all__ = ["DEFAULT_LABELS", "GLEASON_FORMATS", "parse_label_map", "parse_labels", "read_gleason2019",
           "read_gleason_regions", "read_panda", "read_sicapv2"]

GLEASON_FORMATS = ("sicapv2", "gleason2019", "panda")
_READERS = {"sicapv2": read_sicapv2, "gleason2019": read_gleason2019, "panda": read_panda}


def read_gleason_regions(fmt: str, src: str | Path, **options) -> Iterator[RegionRecord]:
    """The records of ``src`` in format ``fmt`` (one of :data:`GLEASON_FORMATS`), ``options`` passed to its reader."""
    if fmt not in _READERS:
        raise ValueError(f"unknown Gleason format {fmt!r}; expected one of {GLEASON_FORMATS}")
    return _READERS[fmt](src, **options)
