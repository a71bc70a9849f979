"""Bags for DISC's slide-level model (:mod:`histosynth.evaluate.mil`): real slides from a region store, synthetic
tile sets from a folder, tile features computed once and cached.

Real bags (:func:`region_store_bags`): the patches of a region store (``histosynth prepare regions``) grouped by their
manifest ``source`` (one region image / slide). A slide's label shares are the mean of its patches' ``regions``
fractions; its target (:func:`shares_target`) is the labels whose share reaches ``min_share``, the largest first, at
most ``max_labels`` (2: DISC's primary and secondary grade, Sec. 2.4). ``negative_label`` (e.g. ``non-cancer``) is the
target only when no other label reaches ``min_share``, as DISC's tile sets apply Non-Cancer only when it is the primary
grade (Sec. 2.2). Only ``classes`` (default: all the store's labels) are outputs; the others are ignored.

Synthetic bags (:func:`read_tile_sets`, :func:`tile_set_bags`) from a folder of generated tile sets, the minimal
layout read here::

    FOLDER/sets.jsonl    one JSON object per line (blank lines skipped):
                           "tiles"      a non-empty list of image paths, relative to FOLDER or absolute ("images" too),
                                        or of objects with such a path as "image" (the tile-set sampler's rows)
                           "primary"    a region label of the real store: its name (any case) or its index
                                        (in FOLDER/classes.txt when there is one, else in the store's labels)
                           "secondary"  the same; optional or null (= primary)
                           "set"        a name (optional; default "set-<line>")
                         other keys are ignored
    FOLDER/...           the tile images (PNG / JPEG / TIFF, any size the encoder takes)

A set's target is {primary, secondary} among ``classes``, ``negative_label`` only when it is the primary.

Split of the real slides (:func:`split_real_bags`): ``store`` keeps the store's split when every slide's patches
lie in one split (a dataset's own train/test, or whole-region hold-out); ``slides`` holds out ``test_fraction`` of
the slides at random (seeded) and ignores the store's patch split, whose hold-out blocks lie inside the slides;
``auto`` is ``store`` when it applies, else ``slides``.

Features (:func:`cached_features`): ``OUT/features/{real,synthetic}.npy`` float32 ``(tiles, C)`` with a ``.json``
key (encoder protocol, the store's manifest hash / the tiles' paths, sizes and times); a later run with
``--overwrite`` into the same folder reuses them when the key is equal.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histosynth.data.tables import numbered_json_lines
from histosynth.errors import DataError, HistosynthError
from histosynth.evaluate.mil import Bag

__all__ = ["SETS_FILE", "SPLIT_RULES", "TileSet", "shares_target", "region_store_bags", "read_tile_sets",
           "tile_set_bags", "split_real_bags", "encode_tiles", "cached_features", "store_key", "tiles_key"]

SETS_FILE = "sets.jsonl"
SPLIT_RULES = ("auto", "store", "slides")


def shares_target(shares: dict[str, float], classes: Sequence[str], *, min_share: float = 0.05, max_labels: int = 2,
                  negative_label: str | None = None) -> np.ndarray:
    """Multi-hot float32 ``(len(classes),)`` of a slide's label shares (fractions of its pixels; rule in the module
    docstring)."""
    chosen = sorted((n for n in classes if shares.get(n, 0.0) >= min_share),
                    key=lambda n: (-shares.get(n, 0.0), classes.index(n)))
    if negative_label is not None and any(n != negative_label for n in chosen):
        chosen = [n for n in chosen if n != negative_label]
    target = np.zeros(len(classes), np.float32)
    for name in chosen[:max_labels] if max_labels else chosen:
        target[classes.index(name)] = 1.0
    return target


def _slides(store) -> dict[str, list[int]]:
    groups: dict[str, list[int]] = {}
    for row in store.records:
        # a slide: the rows of one "slide" (Gleason readers: the slide several regions were cut from), else of one source
        groups.setdefault(str(row.get("slide") or row["source"]), []).append(int(row["index"]))
    return groups


def region_store_bags(store, features: np.ndarray, classes: Sequence[str], *, min_share: float = 0.05,
                      max_labels: int = 2, negative_label: str | None = None) -> list[Bag]:
    """One real bag per slide (manifest ``slide``, else ``source``) of an open region store
    (:class:`~histosynth.data.store.PatchStore`); features float32 ``(len(store), C)`` in store order. Raises DataError naming the manifest: a row without ``regions``."""
    bags = []
    for source, idx in _slides(store).items():
        rows = [store.records[i] for i in idx]
        if any(not isinstance(r.get("regions"), dict) for r in rows):
            raise DataError(f"patches of {source} have no 'regions' fractions: not a region store's manifest",
                            Path(store.path) / "manifest.jsonl")
        shares = {n: float(np.mean([r["regions"].get(n, 0.0) for r in rows])) for n in store.class_names}
        splits = {r.get("split") for r in rows}
        bags.append(Bag(features[idx], shares_target(shares, classes, min_share=min_share, max_labels=max_labels,
                                                      negative_label=negative_label),
                        source, synthetic=False, split=splits.pop() if len(splits) == 1 else None))
    return bags


@dataclass
class TileSet:
    """One generated tile set: its name, (primary, secondary) label names and tile image paths."""

    name: str
    primary: str
    secondary: str
    tiles: list[Path]


def _label(value, names: Sequence[str], indexed: Sequence[str], where: str, file: Path) -> str:
    lower = {n.lower(): n for n in names}
    if isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit()):
        if 0 <= int(value) < len(indexed):
            value = indexed[int(value)]
    if isinstance(value, str) and value.strip().lower() in lower:
        return lower[value.strip().lower()]
    raise DataError(f"{where}: label {value!r} is neither a region label of the real store ({', '.join(names)}) "
                    "nor its index", file)


def _tile_path(entry, root: Path, where: str, file: Path) -> Path:
    if isinstance(entry, dict):  # the tile-set sampler's rows: {"mask": ..., "image": ...}
        entry = entry.get("image", entry.get("path"))
        if entry is None:
            raise DataError(f"{where} has no 'image' path (a set of masks only: generate its tiles first)", file)
    if not isinstance(entry, str) or not entry.strip():
        raise DataError(f"{where}: a tile is an image path (or an object with 'image'), got {entry!r}", file)
    path = Path(entry) if Path(entry).is_absolute() else root / entry
    if not path.is_file():
        raise DataError(f"tile image not found ({file.name} {where}; paths are relative to {root})", path)
    return path


def read_tile_sets(folder: str | Path, label_names: Sequence[str]) -> list[TileSet]:
    """The tile sets of ``folder`` (layout in the module docstring; ``folder`` may also be its sets.jsonl), labels
    resolved against ``label_names`` (the real store's). Raises DataError naming the file (and line): no sets.jsonl,
    bad JSON, no tiles, an unknown label, a missing tile image."""
    path = Path(folder)
    file = path if path.is_file() else path / SETS_FILE
    root = file.parent
    if not file.is_file():
        raise DataError(f"no {SETS_FILE}: a folder of tile sets lists them there, one JSON object per line "
                        "with 'tiles', 'primary' and 'secondary' (--synthetic)", path)
    classes_file = root / "classes.txt"  # the sampler's: integer labels index it
    indexed = [n.strip() for n in classes_file.read_text(encoding="utf-8").splitlines() if n.strip()] \
        if classes_file.is_file() else list(label_names)
    sets = []
    for n, row in numbered_json_lines(file):
        tiles = row.get("tiles", row.get("images")) if isinstance(row, dict) else None
        if not isinstance(tiles, list) or not tiles:
            raise DataError(f"line {n}: 'tiles' must be a non-empty list of image paths", file)
        if "primary" not in row:
            raise DataError(f"line {n}: no 'primary' label", file)
        primary = _label(row["primary"], label_names, indexed, f"line {n} 'primary'", file)
        second = row.get("secondary")
        secondary = primary if second is None else _label(second, label_names, indexed, f"line {n} 'secondary'", file)
        paths = [_tile_path(t, root, f"line {n} tile {k}", file) for k, t in enumerate(tiles)]
        sets.append(TileSet(str(row.get("set", f"set-{n}")), primary, secondary, paths))
    if not sets:
        raise DataError("no tile sets in it", file)
    return sets


def tile_set_bags(sets: Sequence[TileSet], features: np.ndarray, tile_index: dict[Path, int], classes: Sequence[str],
                  *, negative_label: str | None = None) -> list[Bag]:
    """One synthetic bag per set; ``features`` float32 ``(T, C)`` of the distinct tiles, row ``tile_index[path]``."""
    bags = []
    for s in sets:
        labels = [s.primary] if s.primary == negative_label else [s.primary, s.secondary]
        labels = [n for n in labels if n in classes and (n != negative_label or s.primary == negative_label)]
        target = np.zeros(len(classes), np.float32)
        target[[classes.index(n) for n in labels]] = 1.0
        bags.append(Bag(features[[tile_index[p] for p in s.tiles]], target, s.name, synthetic=True))
    return bags


def split_real_bags(bags: Sequence[Bag], rule: str = "auto", *, test_fraction: float = 0.3, seed: int = 0
                    ) -> tuple[list[Bag], list[Bag], dict]:
    """(train, test, description) of the real slides by ``rule`` (module docstring). Raises HistosynthError naming
    --split / --test-fraction: an unknown rule, ``store`` where slides span both splits or a split is empty, fewer
    than two slides."""
    if rule not in SPLIT_RULES:
        raise HistosynthError(f"unknown --split {rule!r}: one of {', '.join(SPLIT_RULES)}")
    by_store = [b for b in bags if b.split == "train"], [b for b in bags if b.split == "test"]
    store_ok = all(b.split in ("train", "test") for b in bags) and all(by_store)
    if rule == "store" or (rule == "auto" and store_ok):
        if not store_ok:
            mixed = sum(b.split not in ("train", "test") for b in bags)
            raise HistosynthError(f"--split store: {mixed} slides have patches in both splits and the store's test "
                                  f"slides number {len(by_store[1])}; use --split slides")
        return *by_store, {"rule": "store", "note": "the store's split: each slide's patches all lie in one split"}
    if not 0 < test_fraction < 1:
        raise HistosynthError(f"--test-fraction must lie in (0, 1), got {test_fraction}")
    if len(bags) < 2:
        raise HistosynthError(f"{len(bags)} slide(s) in the real store: a slide-level split needs at least two")
    n_test = min(len(bags) - 1, max(1, round(test_fraction * len(bags))))
    test_idx = set(np.random.default_rng(seed).permutation(len(bags))[:n_test].tolist())
    return ([b for i, b in enumerate(bags) if i not in test_idx], [b for i, b in enumerate(bags) if i in test_idx],
            {"rule": "slides", "test_fraction": test_fraction, "seed": seed,
             "note": "whole slides held out at random; the store's patch split (blocks inside slides) ignored"})


def encode_tiles(encoder, images: Iterable[np.ndarray], count: int, *, batch_size: int = 32, progress: bool = True,
                 desc: str = "features") -> np.ndarray:
    """float32 ``(count, C)`` features of uint8 ``(H, W, 3)`` tiles by a :class:`~histosynth.models.ssl_encoder.
    TileEncoder`, in batches of ``batch_size`` (tiles of different sizes encoded apart)."""
    from tqdm.auto import tqdm

    out = np.zeros((count, encoder.dim), np.float32)
    done, batch = 0, []

    def flush():
        nonlocal done, batch
        while batch:
            k = next((i for i, t in enumerate(batch) if t.shape != batch[0].shape), len(batch))
            out[done:done + k] = encoder.encode(np.stack(batch[:k]))
            done, batch = done + k, batch[k:]
            bar.update(k)

    with tqdm(total=count, desc=desc, unit="tile", disable=not progress) as bar:
        for image in images:
            batch.append(np.asarray(image, dtype=np.uint8))
            if len(batch) == batch_size:
                flush()
        flush()
    if done != count:
        raise ValueError(f"{done} tiles encoded, {count} expected")
    return out


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def store_key(store, encoder) -> dict:
    """Cache key of a region store's features: the encoder's protocol, the store and its manifest's hash."""
    manifest = (Path(store.path) / "manifest.jsonl").read_bytes()
    return {"kind": "region-store", "store": str(Path(store.path).resolve()), "patches": len(store),
            "manifest_sha256": _sha256(manifest), "encoder": encoder.protocol}


def tiles_key(paths: Sequence[Path], encoder) -> dict:
    """Cache key of tile files' features: the encoder's protocol and each file's path, size and time."""
    text = "".join(f"{p.resolve()}\t{p.stat().st_size}\t{p.stat().st_mtime_ns}\n" for p in paths)
    return {"kind": "tiles", "tiles": len(paths), "tiles_sha256": _sha256(text.encode()), "encoder": encoder.protocol}


def cached_features(folder: Path, name: str, key: dict, compute: Callable[[], np.ndarray],
                    previous: Path | None = None) -> tuple[np.ndarray, bool]:
    """Features saved as ``folder/features/<name>.npy`` + ``.json`` (the key); copied from ``previous/features``
    when that holds the same key (then ``reused`` is True), else computed. Returns ``(features, reused)``."""
    target = Path(folder) / "features"
    target.mkdir(parents=True, exist_ok=True)
    key = json.loads(json.dumps(key, default=str))
    if previous is not None:
        old = Path(previous) / "features"
        try:
            same = json.loads((old / f"{name}.json").read_text(encoding="utf-8")) == key
            cached = np.load(old / f"{name}.npy") if same else None
        except (OSError, ValueError):
            cached = None
        if cached is not None and cached.ndim == 2 and cached.dtype == np.float32:
            shutil.copy2(old / f"{name}.npy", target / f"{name}.npy")
            shutil.copy2(old / f"{name}.json", target / f"{name}.json")
            return cached, True
    features = np.ascontiguousarray(compute(), dtype=np.float32)
    np.save(target / f"{name}.npy", features)
    (target / f"{name}.json").write_text(json.dumps(key, indent=2), encoding="utf-8")
    return features, False
