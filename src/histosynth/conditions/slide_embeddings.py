"""Per-slide maps of SSL tile embeddings, computed once, memory-mapped: ZoomLDM's conditioning input (Sec. 3, Fig. 1).

ZoomLDM pairs each 256 px patch at magnification ``base / 2^k`` with the base-magnification (20x) region under it
and embeds that region tile by tile with a self-supervised encoder (HIPT in the paper), giving a
``2^k x 2^k x C`` matrix per patch. Patches of one slide overlap (a 1.25x patch covers 256 base tiles, shared with
the 5x patches inside it), so each base tile is embedded once per slide, into a map of the slide's whole base grid,
and a patch's matrix is a window of that map.

Layout (``STORE/embeddings/<name>/``; ``name`` defaults from the encoder, e.g. ``efficientnet-lite0``)::

    embeddings.json            format, encoder id + protocol, dim C, tile px, base magnification, preprocessing,
                               complete flag; per slide: file, path, tile_rows, tile_cols, tiles_needed,
                               needed_sha256, complete
    slide-NNNNN.npy            float16 (tile_rows, tile_cols, C), written through np.lib.format.open_memmap;
                               tiles under no stored patch stay zero (a sparse file on most file systems)
    slide-NNNNN.progress.json  while a slide is being embedded: how many of its needed tiles are done
    .lock                      held (flock) by the process writing the folder

Only the base tiles under at least one stored patch are embedded, in raster (row-major) order. After each batch
the map's pages are flushed and the count of finished tiles is written to the progress file (atomically: a
temporary file renamed over it), so a killed run resumes at the first unfinished tile without recomputing any
finished one; per-slide disk use is the ``.npy`` header (128 bytes) + 2 C bytes per base tile. A slide is marked
complete in ``embeddings.json`` only when all its needed tiles are written, the map only when every slide is, and
:meth:`SlideEmbeddings.open` refuses an incomplete map. One slide is open at a time, one batch of tiles is in
memory, and each batch's map is mapped, written, flushed and unmapped, so memory stays flat however many and however
large the slides are. Written by :func:`histosynth.conditions.embed_store.embed_store`; read by :class:`SlideEmbeddings`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from histosynth.errors import DataError

__all__ = [
    "EMBEDDINGS_DIR",
    "INFO_FILE",
    "SlideEmbeddings",
    "available_embeddings",
    "read_info",
]

FORMAT = "histosynth-slide-embeddings"
VERSION = 1
EMBEDDINGS_DIR = "embeddings"
INFO_FILE = "embeddings.json"
LOCK_FILE = ".lock"
ROW_FIELDS = ("slide_index", "zoom", "tile_y", "tile_x")
RERUN = "rerun `histosynth embed {store}{name}` to finish it"


def read_info(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"unreadable slide embeddings description: {exc}", path) from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise DataError(f"not a slide embeddings description (format {FORMAT!r} expected)", path)
    if data.get("version") != VERSION:
        raise DataError(f"slide embeddings version {data.get('version')!r}; this histosynth reads version {VERSION} "
                        "(recompute with `histosynth embed --overwrite`)", path)
    return data


def available_embeddings(store_path: str | Path) -> list[str]:
    """Names of the embedding maps (complete or not) under ``STORE/embeddings/``, sorted."""
    root = Path(store_path) / EMBEDDINGS_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / INFO_FILE).is_file())


# ---------------------------------------------------------------------------------------------------- reading
class SlideEmbeddings:
    """A complete map of tile embeddings of a store's slides (see the module docstring); read-only, memory-mapped.

    Attributes:
        path: the folder ``STORE/embeddings/<name>``.
        name: its name.
        encoder: the encoder's stable id (hub id, ``path@sha256:...``, ``efficientnet-lite0@sha256:...``).
        dim: C, features per tile.
        tile_px: base tile size in pixels (the store's patch size).
        base_magnification: e.g. ``"20x"``.
        slides: per-slide entries of ``embeddings.json`` (``file``, ``path``, ``tile_rows``, ``tile_cols``, ...).
        info: the whole ``embeddings.json``.
    """

    def __init__(self, path: Path, info: dict):
        self.path = Path(path)
        self.info = info
        self.name = self.path.name
        self.encoder = str(info["encoder"])
        self.dim = int(info["dim"])
        self.tile_px = int(info["tile_px"])
        self.base_magnification = str(info["base_magnification"])
        self.slides: list[dict] = list(info["slides"])
        self._maps: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, store_path: str | Path, name: str | None = None) -> "SlideEmbeddings":
        """The complete embeddings ``name`` of the store (``None``: the only ones there).

        Raises:
            DataError: (naming the folder) none there, several and no ``name``, ``name`` missing, or incomplete (an
                interrupted ``histosynth embed``: rerun it to finish).
        """
        root = Path(store_path) / EMBEDDINGS_DIR
        names = available_embeddings(store_path)
        if name is None:
            if not names:
                raise DataError(f"no slide embeddings here: compute them with `histosynth embed {store_path}`", root)
            if len(names) > 1:
                raise DataError(f"several slide embeddings ({', '.join(names)}): choose one by name (--name / "
                                "name=)", root)
            name = names[0]
        folder = root / name
        if not (folder / INFO_FILE).is_file():
            have = f" (there are: {', '.join(names)})" if names else ""
            raise DataError(f"no slide embeddings named {name!r}{have}: compute them with `histosynth embed "
                            f"{store_path} --name {name}`", folder)
        info = read_info(folder / INFO_FILE)
        if not info.get("complete"):
            done = sum(bool(s.get("complete")) for s in info.get("slides", []))
            raise DataError(f"incomplete slide embeddings ({done} of {len(info.get('slides', []))} slides done; an "
                            f"interrupted run?): {RERUN.format(store=store_path, name=f' --name {name}')} "
                            f"(same --encoder {info.get('encoder')})", folder)
        return cls(folder, info)

    def __getstate__(self) -> dict:  # picklable for DataLoader workers: each process maps the files itself
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state

    def slide_map(self, slide_index: int) -> np.ndarray:
        """The read-only memory map of one slide: float16 ``(tile_rows, tile_cols, C)``.

        Raises:
            DataError: an unknown slide index, or a missing / truncated / mismatched file (naming it).
        """
        slide_index = int(slide_index)
        cached = self._maps.get(slide_index)
        if cached is not None:
            return cached
        if not 0 <= slide_index < len(self.slides):
            raise DataError(f"slide index {slide_index} is not one of the {len(self.slides)} slides of these "
                            "embeddings (another store's row?)", self.path / INFO_FILE)
        entry = self.slides[slide_index]
        file = self.path / entry["file"]
        try:
            mm = np.load(file, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot map the slide embeddings: {exc}", file) from None
        expected = (int(entry["tile_rows"]), int(entry["tile_cols"]), self.dim)
        if mm.dtype != np.float16 or mm.shape != expected:
            raise DataError(f"slide embeddings are {mm.dtype} {mm.shape}, expected float16 {expected}", file)
        self._maps[slide_index] = mm
        return mm

    def grid(self, row: dict) -> np.ndarray:
        """The embeddings of the base tiles under one patch: float16 ``(2^k, 2^k, C)``, a view of the slide's memory
        map (no copy), rows ``tile_y .. tile_y + 2^k``, columns ``tile_x .. tile_x + 2^k`` (ZoomLDM's per-patch
        embedding matrix, before its resize to a fixed size).

        Args:
            row: a manifest row of the store (``slide_index``, ``zoom`` k, ``tile_y``, ``tile_x``).

        Raises:
            DataError: a row without those fields, or whose window lies outside its slide's grid.
        """
        try:
            slide, k, ty, tx = (int(row[f]) for f in ROW_FIELDS)
        except (KeyError, TypeError, ValueError):
            raise DataError(f"patch row {row.get('index', '?')} has no integer {'/'.join(ROW_FIELDS)}: not a row of "
                            "a multi-magnification slide store", self.path) from None
        mm = self.slide_map(slide)
        n = 1 << k if k >= 0 else 0
        if k < 0 or ty < 0 or tx < 0 or ty + n > mm.shape[0] or tx + n > mm.shape[1]:
            raise DataError(f"patch row {row.get('index', '?')}: base tiles [{ty}, {ty + n}) x [{tx}, {tx + n}) (zoom "
                            f"{k}) are outside slide {slide}'s {mm.shape[0]} x {mm.shape[1]} grid",
                            self.path / self.slides[slide]["file"])
        return mm[ty:ty + n, tx:tx + n]

    def grid_of(self, store, index: int) -> np.ndarray:
        """:meth:`grid` of patch ``index`` of ``store`` (a :class:`~histosynth.data.store.PatchStore`)."""
        return self.grid(store.records[int(index)])
