"""Writing a patch store (layout: :mod:`histosynth.data.store`): :class:`PatchStoreWriter`, one shard in memory, the
store renamed into place only when complete."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from histosynth.atomic import refuse_existing
from histosynth.data.patches import SPLITS, Patch, format_magnification
from histosynth.data.store import (
    ARRAYS,
    FORMAT,
    IMAGE_ARRAYS,
    MANIFEST,
    MAX_SHARD_PATCHES,
    REGION_ARRAYS,
    ROW_KEYS,
    SHARD_BYTES,
    SHARDS,
    STORE_JSON,
    VERSION,
    nuclei_per_type,
    region_fractions,
    shard_file,
)
from histosynth.errors import DataError, DiskFullError, is_disk_full

__all__ = ["PatchStoreWriter", "command_list", "default_shard_size", "patch_bytes"]


def command_list(command: str | Sequence[str] | None) -> str | list[str] | None:
    """The command line as store.json records it (a string as given, argv as a list)."""
    return command if command is None or isinstance(command, str) else list(command)


def patch_bytes(patch_size: int, labels: bool = True, regions: bool = False) -> int:
    """Bytes one patch takes in the shards (image 3 + inst 4 + type 1 byte per pixel; image only: 3; image and
    region mask: 4)."""
    return patch_size * patch_size * ((3 + 4 + 1) if labels else 4 if regions else 3)


def default_shard_size(patch_size: int, labels: bool = True, regions: bool = False) -> int:
    return max(1, min(MAX_SHARD_PATCHES, SHARD_BYTES // patch_bytes(patch_size, labels, regions)))


def _partial_dir(path: Path) -> Path:
    return path.parent / f".{path.name}.partial-{os.getpid()}"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


class PatchStoreWriter:
    """Append patches to a new store; the store appears at `path` only when the `with` block succeeds.

    Memory: one preallocated shard buffer, flushed to raw .npy files when full. With ``labels=False`` the
    store holds images only (patches must have ``inst_map``/``type_map`` None; ``class_names`` may be empty); with
    ``regions=True`` too (labels False) each patch brings its ``region_map`` with labels 0..len(class_names)-1.
    ``magnification``: one ('20x'), or a list or tuple of several for a multi-magnification store, whose
    patches must each carry one of them as ``Patch.magnification`` (ValueError otherwise).
    """

    def __init__(
        self,
        path: str | Path,
        class_names: Sequence[str],
        patch_size: int,
        magnification: str | Sequence[str],
        meta: dict | None = None,
        overwrite: bool = False,
        shard_size: int | None = None,
        labels: bool = True,
        regions: bool = False,
    ):
        self.path = Path(path)
        self.labels = bool(labels)
        self.regions = bool(regions)
        if self.labels and self.regions:
            raise ValueError("a store holds nuclei labels or region masks, not both (regions=True needs labels=False)")
        self.arrays = ARRAYS if self.labels else REGION_ARRAYS if self.regions else IMAGE_ARRAYS
        self.class_names = tuple(class_names)
        if len(self.class_names) > 255:
            raise ValueError("type maps are stored as uint8: at most 255 classes")
        self.patch_size = int(patch_size)
        self.magnifications: tuple[str, ...] | None = None  # None: a single-magnification store
        if isinstance(magnification, (list, tuple)):
            self.magnifications = tuple(dict.fromkeys(format_magnification(m) for m in magnification))
            if not self.magnifications:
                raise ValueError("a multi-magnification store needs at least one magnification")
            self.magnification = ",".join(self.magnifications)
        else:
            self.magnification = format_magnification(magnification)
        self._per_magnification: dict[str, int] = {}
        self.meta = dict(meta or {})
        self.overwrite = overwrite
        self.shard_size = int(shard_size or default_shard_size(self.patch_size, self.labels, self.regions))
        self._check_output()
        self._partial = _partial_dir(self.path)
        self._manifest = None
        self._buffers: dict[str, np.ndarray] | None = None
        self._buffered = 0
        self._count = 0
        self._shard = 0
        self._counts: dict[str, dict] = {}
        self._reassigned: list[tuple[int, int, str]] = []  # (first index, count, split) applied at commit
        self._write_error: BaseException | None = None  # an OSError of a shard write, judged by the space left

    def _check_output(self) -> None:
        refuse_existing(self.path, self.overwrite)

    @property
    def buffered_bytes(self) -> int:
        """Bytes of patches held in memory, waiting for the next shard flush (never more than one shard)."""
        return self._buffered * patch_bytes(self.patch_size, self.labels, self.regions)

    def __len__(self) -> int:
        return self._count

    def __enter__(self) -> "PatchStoreWriter":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            _remove(self._partial)  # stale leftover of a crashed process that had our pid
            (self._partial / SHARDS).mkdir(parents=True)
            self._manifest = open(self._partial / MANIFEST, "w", encoding="utf-8")
        except OSError as exc:
            full = is_disk_full(exc, self.path.parent)
            self._close_and_remove()
            if full:
                raise DiskFullError(self.path, "the patch store") from None
            raise
        return self

    def write_side_file(self, name: str, text: str) -> None:
        """Write ``name`` (a file that belongs with the store, e.g. its ``captions.jsonl``) into the store being
        built: it appears with the store, atomically, or not at all. Call inside the ``with`` block."""
        if Path(name).name != name or name in (STORE_JSON, MANIFEST, SHARDS) or self._manifest is None:
            raise ValueError(f"cannot write side file {name!r} here")
        (self._partial / name).write_text(text, encoding="utf-8")

    def reassign_split(self, first: int, count: int, split: str) -> None:
        """Give the ``count`` patches from index ``first`` on (already added) the split ``split`` instead; the
        manifest and store.json counts say it when the store is committed (whole-region hold-out)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if first < 0 or count < 0 or first + count > self._count:
            raise ValueError(f"patches {first}..{first + count - 1} are not all written yet ({self._count} are)")
        if count:
            self._reassigned.append((int(first), int(count), split))

    def add(self, patch: Patch) -> None:
        """Buffer one patch and write its manifest line; flushes a shard when the buffer is full."""
        if self._manifest is None:
            raise RuntimeError("use PatchStoreWriter as a context manager")
        self._check_patch(patch)
        magnification = self._patch_magnification(patch)
        if self._buffers is None:
            p, n = self.patch_size, self.shard_size
            shapes = {"image": ((n, p, p, 3), np.uint8), "inst": ((n, p, p), np.int32), "type": ((n, p, p), np.uint8),
                      "region": ((n, p, p), np.uint8)}
            self._buffers = {a: np.empty(*shapes[a]) for a in self.arrays}
        slot = self._buffered
        self._buffers["image"][slot] = patch.image
        counts = None
        if self.labels:
            self._buffers["inst"][slot] = patch.inst_map
            self._buffers["type"][slot] = patch.type_map
            counts = nuclei_per_type(patch.inst_map, patch.type_map, self.class_names)
        fractions = None
        if self.regions:
            self._buffers["region"][slot] = patch.region_map
            fractions = region_fractions(patch.region_map, self.class_names)
        row = {
            "index": self._count,
            "source": patch.source,
            "y": int(patch.y),
            "x": int(patch.x),
            "crop": int(patch.crop),
            "split": patch.split,
            "magnification": magnification,
        }
        if counts is not None:
            row["counts"] = counts
        if fractions is not None:
            row["regions"] = fractions
        row.update(patch.extra or {})
        self._manifest.write(json.dumps(row) + "\n")
        self._tally(patch.split, counts, fractions)
        self._per_magnification[magnification] = self._per_magnification.get(magnification, 0) + 1
        self._buffered += 1
        self._count += 1
        if self._buffered == self.shard_size:
            self._flush()

    def _patch_magnification(self, patch: Patch) -> str:
        own = getattr(patch, "magnification", None)
        if self.magnifications is None:
            if own is not None and format_magnification(own) != self.magnification:
                raise ValueError(f"patch from {patch.source} is at {own}, this store holds {self.magnification} patches")
            return self.magnification
        if own is None or format_magnification(own) not in self.magnifications:
            raise ValueError(f"patch from {patch.source} is at {own!r}; a store of magnifications "
                             f"{list(self.magnifications)} needs each patch's own magnification, one of them")
        return format_magnification(own)

    def _check_patch(self, patch: Patch) -> None:
        p = self.patch_size
        if self.labels:
            if patch.inst_map is None or patch.type_map is None:
                raise ValueError(f"patch from {patch.source} has no labels; use a labels=False store for image-only patches")
            shapes_ok = patch.inst_map.shape == (p, p) and patch.type_map.shape == (p, p)
        else:
            if patch.inst_map is not None or patch.type_map is not None:
                raise ValueError(f"patch from {patch.source} has labels, but this store holds images only (labels=False)")
            shapes_ok = True
        if not self.regions and patch.region_map is not None:
            raise ValueError(f"patch from {patch.source} has a region_map, but this store holds no region masks")
        if self.regions:
            if patch.region_map is None:
                raise ValueError(f"patch from {patch.source} has no region_map, which a region store needs")
            shapes_ok = patch.region_map.shape == (p, p)
            if patch.region_map.size and (patch.region_map.min() < 0 or patch.region_map.max() >= len(self.class_names)):
                raise DataError(f"region labels {int(patch.region_map.min())}..{int(patch.region_map.max())} outside "
                                f"0..{len(self.class_names) - 1} ({', '.join(self.class_names)})", patch.source)
        if patch.image.shape != (p, p, 3) or not shapes_ok:
            shapes = "/".join(str(getattr(a, "shape", None))
                              for a in (patch.image, patch.inst_map, patch.type_map, patch.region_map))
            raise ValueError(f"patch from {patch.source} has shapes {shapes}, store patch size is {p}")
        clash = ROW_KEYS.intersection(patch.extra or {})
        if clash:
            raise ValueError(f"patch extra metadata may not redefine manifest keys {sorted(clash)}")
        if patch.image.dtype != np.uint8:
            raise ValueError(f"patch image must be uint8, got {patch.image.dtype}")
        if patch.split not in SPLITS:
            raise ValueError(f"patch split must be one of {SPLITS}, got {patch.split!r}")
        if self.labels and patch.type_map.size and (patch.type_map.min() < 0 or patch.type_map.max() > len(self.class_names)):
            raise DataError(
                f"type ids {int(patch.type_map.min())}..{int(patch.type_map.max())} outside 0..{len(self.class_names)}",
                patch.source,
            )

    def _tally(self, split: str, counts: dict[str, int] | None, fractions: dict[str, float] | None = None) -> None:
        if fractions is not None:  # region store: patches per split, and patches holding each label
            entry = self._counts.setdefault(split, {"patches": 0, "patches_with": dict.fromkeys(self.class_names, 0)})
            entry["patches"] += 1
            for name, f in fractions.items():
                entry["patches_with"][name] += f > 0
            return
        if counts is None:  # image-only store: patches per split, no nuclei
            self._counts.setdefault(split, {"patches": 0})["patches"] += 1
            return
        entry = self._counts.setdefault(split, {"patches": 0, "nuclei": dict.fromkeys(self.class_names, 0)})
        entry["patches"] += 1
        for name, n in counts.items():
            entry["nuclei"][name] += n

    def _flush(self) -> None:
        if not self._buffered:
            return
        try:
            for array in self.arrays:
                np.save(shard_file(self._partial, self._shard, array), self._buffers[array][: self._buffered])
        except OSError as exc:  # np.save loses the errno of a full disk ("N requested and M written")
            self._write_error = exc
            raise
        self._shard += 1
        self._buffered = 0

    def _store_json(self) -> dict:
        magnification, several = self.magnification, None
        if self.magnifications is not None:  # the levels that hold patches, in the given order
            several = [m for m in self.magnifications if self._per_magnification.get(m)] or list(self.magnifications)
            magnification = ",".join(several)
        info = {
            "format": FORMAT,
            "version": VERSION,
            "patch_size": self.patch_size,
            "class_names": list(self.class_names),
            "labels": self.labels,
            "magnification": magnification,
        }
        if self.regions:
            info["regions"] = True
        if several is not None:
            info["magnifications"] = several
        return {
            **info,
            "num_patches": self._count,
            "shard_size": self.shard_size,
            "num_shards": self._shard,
            "counts": {split: self._counts[split] for split in SPLITS if split in self._counts},
            "meta": self.meta,
        }

    def _apply_reassigned(self) -> None:
        """Rewrite the closed manifest with the reassigned splits, and count the splits again from it."""
        if not self._reassigned:
            return
        split_of = {}
        for first, count, split in self._reassigned:
            split_of.update(dict.fromkeys(range(first, first + count), split))
        self._counts = {}
        src, dst = self._partial / MANIFEST, self._partial / f"{MANIFEST}.new"
        with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
            for line in fin:
                row = json.loads(line)
                row["split"] = split_of.get(row["index"], row["split"])
                self._tally(row["split"], row.get("counts") if self.labels else None, row.get("regions"))
                fout.write(json.dumps(row) + "\n")
        os.replace(dst, src)

    def _commit(self) -> None:
        """Finish files, write store.json last, then swap into place; an old store goes only after that."""
        self._flush()
        self._manifest.close()
        self._apply_reassigned()
        with open(self._partial / STORE_JSON, "w", encoding="utf-8") as f:
            json.dump(self._store_json(), f, indent=2)
        self._check_output()  # something may have appeared at path while we were writing
        old = None
        if self.path.exists() or self.path.is_symlink():
            old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
            _remove(old)
            os.replace(self.path, old)
        try:
            os.replace(self._partial, self.path)
        except OSError:
            if old is not None:  # put the previous store back rather than lose both
                os.replace(old, self.path)
            raise
        if old is not None:
            _remove(old)

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc_type is None:
                self._commit()
        except OSError as error:  # the final flush, manifest or store.json (anything else propagates as it is)
            exc = self._write_error = error
        finally:
            # judged before the partial store goes: a write that lost its errno by the space left; other errors
            # (a reader's, say) only by what they say
            where = self._partial if exc is not None and exc is self._write_error else None
            full = exc is not None and not isinstance(exc, DiskFullError) and is_disk_full(exc, where)
            needed = self._bytes_reached() if full else 0
            self._close_and_remove()
        if full:
            raise DiskFullError(self.path, f"the patch store ({self._count} patches cut before the disk filled)",
                                needed, at_least=True) from None
        if exc_type is None and exc is not None:
            raise exc
        return False

    def _bytes_reached(self) -> int:
        """Bytes the store takes with every patch added so far: the shards (the one being written whole), manifest."""
        try:
            manifest = (self._partial / MANIFEST).stat().st_size
        except OSError:
            manifest = 0
        return max(1, self._count) * patch_bytes(self.patch_size, self.labels, self.regions) + manifest

    def _close_and_remove(self) -> None:
        if self._manifest is not None and not self._manifest.closed:
            try:
                self._manifest.close()
            except OSError:  # its buffer could not be flushed (a full disk): the file goes anyway
                pass
        self._buffers = None
        if self._partial.exists():
            _remove(self._partial)
