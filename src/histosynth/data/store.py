"""The streaming patch store: a directory of raw .npy shards, a JSON-lines manifest and store.json.

Layout::

    STORE/store.json          format version, patch size, classes, magnification, counts, how it was made
    STORE/manifest.jsonl      one line per patch: index, source, y, x, crop, split, magnification, counts
                              (+ "tissue" when its source has a tissue name, see data/sources.py)
    STORE/shards/NNNNN_image.npy  uint8 (n, P, P, 3)
    STORE/shards/NNNNN_inst.npy   int32 (n, P, P)
    STORE/shards/NNNNN_type.npy   uint8 (n, P, P)

An image-only store (``labels=False``, e.g. whole-slide tiles for text/class-conditioned models) has no
inst/type shards and no nuclei counts; store.json says ``"labels": false`` and each manifest row carries
the patch's ``extra`` metadata (slide, level, coordinates, tissue fraction, ...).

A region store (``regions=True``, DISC's data, :mod:`histosynth.data.regions`) holds an image and a region mask
per patch: ``NNNNN_region.npy`` uint8 (n, P, P), labels 0..K-1 named by ``class_names``; store.json says
``"regions": true`` (and ``"labels": false``: no nuclei); each manifest row has ``regions``, the fraction of the
patch's pixels per label.

A store of several magnifications (ZoomLDM's levels, :mod:`histosynth.data.zoom_store`) is written with a
list of magnifications: every patch carries its own (``Patch.magnification``), its manifest row says it,
store.json's ``magnifications`` lists the levels that hold patches (in the given order) and its
``magnification`` is those levels joined by commas ('20x,10x,5x', the ``--magnifications`` spelling), so
code that expects one magnification compares unequal and refuses such a store rather than reading it as
the base's; ``PatchStore.magnifications`` is the list (one item for a single-magnification store).

Raw .npy (not .npz) so readers memory-map shards with no decompression and no memory growth; the writer
holds at most one shard, so a Lizard-size build (~55k patches) runs in constant memory. A store is built
in a hidden partial directory and renamed into place only when complete: an interrupted prepare never
leaves something that opens as a store. A full disk (or quota) ends the build with a ``DiskFullError`` naming
the store and the space it needs; the partial directory is removed and a store already at the path is kept.

Written by :class:`~histosynth.data.store_writer.PatchStoreWriter`, read by :class:`PatchStore`. Labelled regions
(nuclei or region masks) become a store through :mod:`histosynth.data.prepare_labelled` (``prepare_nuclei``,
``write_regions``: patching, hold-out, stain normalisation).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from histosynth.errors import DataError

FORMAT = "histosynth-patch-store"
VERSION = 1
STORE_JSON = "store.json"
MANIFEST = "manifest.jsonl"
SHARDS = "shards"
SHARD_BYTES = 64 << 20  # default shard size: bounds the writer's memory whatever the patch size
MAX_SHARD_PATCHES = 1024
ARRAYS = ("image", "inst", "type")
IMAGE_ARRAYS = ("image",)
REGION_ARRAYS = ("image", "region")
# keys the writer and PatchStore.__getitem__ own: a patch's `extra` may not redefine them
ROW_KEYS = frozenset({"index", "source", "y", "x", "crop", "split", "magnification", "counts",
                      "image", "inst_map", "type_map", "regions", "region_map"})


def region_fractions(region_map: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """{label: fraction of the pixels} of a region map (labels 0..K-1), rounded to 4 decimals."""
    counts = np.bincount(np.asarray(region_map, dtype=np.int64).ravel(), minlength=len(class_names))
    return {name: round(float(c) / max(1, region_map.size), 4) for name, c in zip(class_names, counts)}


def shard_file(root: Path, shard: int, array: str) -> Path:
    return root / SHARDS / f"{shard:05d}_{array}.npy"


def nuclei_per_type(inst_map: np.ndarray, type_map: np.ndarray, class_names: Sequence[str]) -> dict[str, int]:
    """Nuclei per class, each instance typed by the majority of its typed pixels (untyped ones are not counted)."""
    k = len(class_names)
    inst = inst_map.ravel().astype(np.int64)
    typ = type_map.ravel().astype(np.int64)
    n = int(inst.max(initial=0))
    table = np.bincount(inst * (k + 1) + typ, minlength=(n + 1) * (k + 1)).reshape(n + 1, k + 1)[1:, 1:]
    typed = table.sum(axis=1) > 0
    majority = np.argmax(table, axis=1)[typed]
    per_type = np.bincount(majority, minlength=k)
    return {name: int(c) for name, c in zip(class_names, per_type)}


class PatchStore:
    """Read-only view of a complete store; shards are memory-mapped lazily, one patch copied per access."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        info = self._read_info()
        self.info = info
        self.patch_size = int(info["patch_size"])
        self.class_names = tuple(info["class_names"])
        self.magnification = info["magnification"]
        # the magnifications of the patches: several in a multi-magnification store (each row says its own)
        self.magnifications = list(info.get("magnifications") or [self.magnification])
        self.shard_size = int(info["shard_size"])
        self.meta = info.get("meta", {})
        self.has_labels = bool(info.get("labels", True))  # stores written before image-only ones had labels
        self.has_regions = bool(info.get("regions", False))  # a region store (DISC): image + region_map
        self.records = self._read_manifest(int(info["num_patches"]))
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def _read_info(self) -> dict:
        file = self.path / STORE_JSON
        if not file.is_file():
            raise DataError(
                f"not a complete patch store: {STORE_JSON} is missing "
                "(an interrupted prepare leaves none; run it again)",
                self.path,
            )
        try:
            info = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DataError(f"unreadable store description: {exc}", file) from None
        if info.get("format") != FORMAT or info.get("version") != VERSION:
            raise DataError(
                f"unknown store format {info.get('format')!r} version {info.get('version')!r}; "
                f"this histosynth reads {FORMAT} version {VERSION} (re-run prepare)",
                file,
            )
        return info

    def _read_manifest(self, expected: int) -> list[dict]:
        file = self.path / MANIFEST
        try:
            with open(file, encoding="utf-8") as f:
                rows = [json.loads(line) for line in f if line.strip()]
        except (OSError, ValueError) as exc:
            raise DataError(f"unreadable manifest: {exc}", file) from None
        if len(rows) != expected:
            raise DataError(f"manifest has {len(rows)} patches, {STORE_JSON} says {expected}", file)
        return rows

    def __len__(self) -> int:
        return len(self.records)

    @property
    def counts(self) -> dict:
        """Patches and nuclei per type (labelled stores only), per split, as recorded at build time."""
        return self.info["counts"]

    def indices(self, split: str | None = None) -> list[int]:
        """Patch indices of one split ("train"/"test"), or all when split is None."""
        if split is None:
            return list(range(len(self.records)))
        return [row["index"] for row in self.records if row["split"] == split]

    def indices_by_magnification(self, split: str | None = None) -> dict[str, list[int]]:
        """{magnification: patch indices} of one split (all when None), from each row's own magnification
        (a multi-magnification store has several)."""
        out: dict[str, list[int]] = {}
        for i in self.indices(split):
            out.setdefault(self.records[i].get("magnification"), []).append(i)
        return out

    def _array(self, shard: int, array: str) -> np.ndarray:
        key = (shard, array)
        if key not in self._maps:
            file = shard_file(self.path, shard, array)
            try:
                self._maps[key] = np.load(file, mmap_mode="r")
            except (OSError, ValueError) as exc:
                raise DataError(f"missing or corrupt shard: {exc}", file) from None
        return self._maps[key]

    def __getitem__(self, i: int) -> dict:
        n = len(self.records)
        if not -n <= i < n:
            raise IndexError(f"patch {i} out of range for a store of {n}")
        i %= n
        shard, offset = divmod(i, self.shard_size)
        item = {"image": np.array(self._array(shard, "image")[offset])}
        if self.has_labels:  # an image-only store's items have no inst_map / type_map
            item["inst_map"] = np.array(self._array(shard, "inst")[offset], dtype=np.int32)
            item["type_map"] = np.array(self._array(shard, "type")[offset], dtype=np.int32)
        if self.has_regions:
            item["region_map"] = np.array(self._array(shard, "region")[offset], dtype=np.int32)
        return {**item, **self.records[i]}

    def __getstate__(self) -> dict:
        """Pickle without the memory maps (DataLoader workers re-open shards themselves)."""
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def __repr__(self) -> str:
        return f"PatchStore({str(self.path)!r}, {len(self)} patches of {self.patch_size} px at {self.magnification})"
