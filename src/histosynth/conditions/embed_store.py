"""``histosynth embed``: compute a store's per-slide maps of SSL tile embeddings, resumably (layout and guarantees:
:mod:`histosynth.conditions.slide_embeddings`)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

from histosynth.conditions.slide_embeddings import (
    EMBEDDINGS_DIR,
    FORMAT,
    INFO_FILE,
    LOCK_FILE,
    ROW_FIELDS,
    VERSION,
    SlideEmbeddings,
    read_info,
)
from histosynth.errors import DataError, OutputExistsError

__all__ = ["EmbeddingsExistError", "embed_store"]


class EmbeddingsExistError(OutputExistsError, DataError):
    """Complete embeddings of that name exist and ``overwrite`` was not given."""


def _slide_file(index: int) -> str:
    return f"slide-{index:05d}.npy"


def _progress_file(index: int) -> str:
    return f"slide-{index:05d}.progress.json"


def _write_json(path: Path, data: dict) -> None:
    """Atomic: a temporary file, fsynced, renamed over ``path``."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------- the store
def _slide_store(store) -> tuple[str, list[dict], np.ndarray, np.ndarray]:
    """Check a multi-magnification slide store; ``(base magnification, slides, per-patch (slide, k, ty, tx), order)``.

    ``order`` sorts the patches by slide (a stable argsort of the slide indices).
    """
    meta = store.meta if isinstance(store.meta, dict) else {}
    manifest = store.path / "manifest.jsonl"
    hint = ("not a multi-magnification slide store ({}): `histosynth embed` needs a ZoomLDM store of whole-slide "
            "patches at several magnifications, whose manifest rows carry slide_index, zoom, tile_y, tile_x")
    slides = meta.get("slides")
    if meta.get("kind") != "slides" or not meta.get("base_magnification") or not isinstance(slides, list):
        raise DataError(hint.format("store.json meta has no kind 'slides' with base_magnification and slides"),
                        store.path)
    for i, s in enumerate(slides):
        if not isinstance(s, dict) or any(k not in s for k in ("path", "tile_rows", "tile_cols")):
            raise DataError(hint.format(f"slide {i} of store.json has no path / tile_rows / tile_cols"), store.path)
    if store.records and any(f not in store.records[0] for f in ROW_FIELDS):
        raise DataError(hint.format("no tile_y / tile_x / zoom / slide_index in its rows"), manifest)
    table = np.empty((len(store.records), 4), np.int64)
    for i, row in enumerate(store.records):
        try:
            table[i] = [int(row[f]) for f in ROW_FIELDS]
        except (KeyError, TypeError, ValueError):
            raise DataError(hint.format(f"patch {i} has no integer {'/'.join(ROW_FIELDS)}"), manifest) from None
    s, k, ty, tx = table.T
    bad_slide = (s < 0) | (s >= len(slides))
    if bad_slide.any():
        i = int(np.flatnonzero(bad_slide)[0])
        raise DataError(f"patch {i}: slide_index {int(s[i])} is not one of the {len(slides)} slides of store.json",
                        manifest)
    rows = np.array([int(x["tile_rows"]) for x in slides], np.int64)[s]
    cols = np.array([int(x["tile_cols"]) for x in slides], np.int64)[s]
    n = np.left_shift(1, np.clip(k, 0, 40))
    outside = (k < 0) | (k > 40) | (ty < 0) | (tx < 0) | (ty + n > rows) | (tx + n > cols)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise DataError(f"patch {i}: base tiles [{ty[i]}, {ty[i] + n[i]}) x [{tx[i]}, {tx[i] + n[i]}) (zoom {k[i]}) "
                        f"are outside slide {s[i]}'s {rows[i]} x {cols[i]} tile grid", manifest)
    return str(meta["base_magnification"]), slides, table, np.argsort(s, kind="stable")


def _needed(table: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """bool ``(rows, cols)``: the union of the patches' windows (``table``: this slide's (slide, k, ty, tx))."""
    diff = np.zeros((rows + 1, cols + 1), np.int64)
    if len(table):
        _, k, ty, tx = table.T
        n = np.left_shift(1, k)
        np.add.at(diff, (ty, tx), 1)
        np.add.at(diff, (ty, tx + n), -1)
        np.add.at(diff, (ty + n, tx), -1)
        np.add.at(diff, (ty + n, tx + n), 1)
    return diff.cumsum(0).cumsum(1)[:rows, :cols] > 0


def _mask_digest(mask: np.ndarray) -> str:
    h = hashlib.sha256(f"{mask.shape[0]}x{mask.shape[1]}:".encode())
    h.update(np.packbits(mask, axis=None).tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------------- writing
class _Lock:
    """An exclusive flock on ``folder/.lock`` (released by the kernel if the process dies)."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.file = None

    def __enter__(self) -> "_Lock":
        self.file = open(self.folder / LOCK_FILE, "a+")
        try:
            import fcntl
        except ImportError:  # not POSIX: no protection against two writers
            return self
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self.file.close()
            raise DataError("another `histosynth embed` is writing these embeddings now", self.folder) from None
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()


def embed_store(
    store_path: str | Path,
    encoder: Any = None,
    *,
    name: str | None = None,
    batch_size: int = 64,
    device: str = "cpu",
    progress: bool = True,
    overwrite: bool = False,
) -> SlideEmbeddings:
    """Embed the base tiles under a multi-magnification slide store's patches, once per slide (ZoomLDM Sec. 3).

    Writes ``STORE/embeddings/<name>/`` (see the module docstring), resuming an interrupted run of the same name
    where it stopped (finished tiles are not recomputed; the result equals an uninterrupted run's).

    Args:
        store_path: a ZoomLDM store (rows with ``slide_index``, ``zoom``, ``tile_y``, ``tile_x``; ``meta`` with
            ``kind: slides``, ``base_magnification`` and the ``slides`` with their ``tile_rows`` / ``tile_cols``).
        encoder: ``None`` (offline EfficientNet-Lite0), an id string (timm hub id or local path), or an encoder
            object (:class:`~histosynth.models.ssl_encoder.TileEncoder` or any ``nn.Module``); see
            :func:`~histosynth.models.ssl_encoder.load_tile_encoder`.
        name: folder name under ``STORE/embeddings`` (default: from the encoder).
        batch_size: tiles per encoder call (the tiles of one batch are the only ones in memory).
        device: torch device of the encoder.
        progress: show a tqdm bar (tiles) on stderr.
        overwrite: recompute complete (or partial) embeddings of that name from scratch.

    Returns:
        The complete :class:`SlideEmbeddings`.

    Raises:
        DataError: not a multi-magnification slide store; a patch outside its slide's grid; a missing or corrupt
            slide, or a corrupt tile (naming the slide file and the tile position); an encoder whose C or id differs
            from partial embeddings of that name (resume with the same encoder, or ``overwrite``); a store changed
            since the partial embeddings were started; features that overflow float16.
        EmbeddingsExistError: complete embeddings of that name exist and ``overwrite`` is False.
    """
    from histosynth.data.store import PatchStore
    from histosynth.models.ssl_encoder import load_tile_encoder

    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    store_path = Path(store_path)
    store = PatchStore(store_path)
    base, slides, table, order = _slide_store(store)
    root = store_path / EMBEDDINGS_DIR
    if name is not None:
        _check_name(name)
        _refuse_complete(root / name, overwrite, store_path)
    tile_encoder = load_tile_encoder(encoder, device)
    if name is None:
        name = tile_encoder.default_name
        _check_name(name)
        _refuse_complete(root / name, overwrite, store_path)
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)

    # per slide: its patches' rows of `table` (sorted by slide), the needed tiles' count and digest
    bounds = np.searchsorted(table[order, 0], np.arange(len(slides) + 1))
    per_slide = [table[order[bounds[i]:bounds[i + 1]]] for i in range(len(slides))]
    entries = []
    for i, s in enumerate(slides):
        mask = _needed(per_slide[i], int(s["tile_rows"]), int(s["tile_cols"]))
        entries.append({"file": _slide_file(i), "path": str(s["path"]), "slide_index": i,
                        "tile_rows": int(s["tile_rows"]), "tile_cols": int(s["tile_cols"]),
                        "tiles_needed": int(mask.sum()), "needed_sha256": _mask_digest(mask), "complete": False})
        del mask
    protocol = tile_encoder.protocol
    fresh = {
        "format": FORMAT, "version": VERSION, "name": name, "encoder": tile_encoder.encoder_id,
        "dim": tile_encoder.dim, "dtype": "float16", "tile_px": store.patch_size, "base_magnification": base,
        "preprocessing": {k: protocol[k] for k in ("input_size", "resize", "normalization") if k in protocol},
        "encoder_protocol": protocol,
        "order": "the base tiles under at least one patch, raster (row-major) order per slide",
        "store": {"path": str(store_path.resolve()), "num_patches": len(store)},
        "complete": False, "slides": entries,
    }
    with _Lock(folder):
        info_path = folder / INFO_FILE
        if overwrite:
            for p in folder.iterdir():
                if p.name != LOCK_FILE and p.is_file():
                    p.unlink()
        info = _resume_info(info_path, fresh, store_path) if info_path.is_file() else fresh
        _write_json(info_path, info)
        total = sum(e["tiles_needed"] for e in info["slides"])
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=total, unit="tile", desc=f"embed {name}", file=sys.stderr)
        try:
            for i, entry in enumerate(info["slides"]):
                if entry["complete"]:
                    if bar is not None:
                        bar.update(entry["tiles_needed"])
                    continue
                _embed_slide(folder, entry, slides[i], per_slide[i], tile_encoder, store, base, int(batch_size), bar)
                entry["complete"] = True
                _write_json(info_path, info)
                (folder / _progress_file(i)).unlink(missing_ok=True)
            info["complete"] = True
            _write_json(info_path, info)
        finally:
            if bar is not None:
                bar.close()
    return SlideEmbeddings.open(store_path, name)


def _check_name(name: str) -> None:
    if not name or name != Path(name).name or name.startswith(".") or "/" in name or "\\" in name:
        raise DataError(f"embeddings name {name!r} must be a plain folder name (--name)")


def _refuse_complete(folder: Path, overwrite: bool, store_path: Path) -> None:
    info_path = folder / INFO_FILE
    if overwrite or not info_path.is_file():
        return
    info = read_info(info_path)
    if info.get("complete"):
        raise EmbeddingsExistError(
            f"complete slide embeddings exist (encoder {info.get('encoder')}, C = {info.get('dim')}); pass "
            "--overwrite (overwrite=True) to recompute them, or --name for another map", folder)


def _resume_info(info_path: Path, fresh: dict, store_path: Path) -> dict:
    """The existing description, checked against this run (same encoder and C, same store); partial only here."""
    old = read_info(info_path)
    done = sum(bool(s.get("complete")) for s in old.get("slides", []))
    state = f"{'complete' if old.get('complete') else 'partial'} ({done} of {len(old.get('slides', []))} slides done)"
    again = "resume with that encoder, or pass --overwrite (overwrite=True) / another --name"
    if int(old.get("dim", -1)) != fresh["dim"]:
        raise DataError(f"these {state} embeddings have C = {old.get('dim')} features per tile (encoder "
                        f"{old.get('encoder')}); encoder {fresh['encoder']} gives C = {fresh['dim']}: {again}", info_path)
    if old.get("encoder") != fresh["encoder"]:
        raise DataError(f"these {state} embeddings were computed with encoder {old.get('encoder')}, not "
                        f"{fresh['encoder']}: {again}", info_path)
    keys = ("file", "tile_rows", "tile_cols", "tiles_needed", "needed_sha256")
    same = (old.get("tile_px") == fresh["tile_px"] and old.get("base_magnification") == fresh["base_magnification"]
            and len(old.get("slides", [])) == len(fresh["slides"])
            and all({k: a.get(k) for k in keys} == {k: b[k] for k in keys}
                    for a, b in zip(old["slides"], fresh["slides"])))
    if not same:
        raise DataError(f"the store {store_path} changed (slides, tile grid or patches) since these {state} "
                        "embeddings were started: pass --overwrite (overwrite=True) to recompute them", info_path)
    old["name"] = fresh["name"]
    return old


def _read_progress(folder: Path, entry: dict, dim: int) -> int:
    """Finished tiles of a slide from its progress file; -1 (start afresh) when there is none, or when it or the map
    file does not match this run."""
    index = int(entry["slide_index"])
    prog, npy = folder / _progress_file(index), folder / entry["file"]
    if not prog.is_file() or not npy.is_file():
        return -1
    try:
        p = json.loads(prog.read_text(encoding="utf-8"))
        mm = np.lib.format.open_memmap(npy, mode="r")
        ok = (mm.dtype == np.float16 and mm.shape == (entry["tile_rows"], entry["tile_cols"], dim)
              and p.get("needed_sha256") == entry["needed_sha256"] and 0 <= int(p["done"]) <= entry["tiles_needed"])
        del mm
    except (OSError, ValueError, KeyError, TypeError):
        return -1
    return int(p["done"]) if ok else -1


def _write_progress(folder: Path, entry: dict, done: int) -> None:
    _write_json(folder / _progress_file(int(entry["slide_index"])),
                {"done": int(done), "tiles_needed": entry["tiles_needed"], "needed_sha256": entry["needed_sha256"]})


def _embed_slide(folder: Path, entry: dict, slide: dict, table: np.ndarray, encoder, store, base: str,
                 batch_size: int, bar) -> None:
    from histosynth.data.slide_tiles import iter_base_tiles, plan_base_tiles

    rows, cols, dim = entry["tile_rows"], entry["tile_cols"], encoder.dim
    npy = folder / entry["file"]
    done = _read_progress(folder, entry, dim)
    if done < 0:  # a fresh map: zeros (sparse), then a progress record saying 0 tiles are done
        mm = np.lib.format.open_memmap(npy, mode="w+", dtype=np.float16, shape=(rows, cols, dim))
        mm.flush()
        del mm
        done = 0
        _write_progress(folder, entry, done)
    if bar is not None:
        bar.update(done)
    if done == entry["tiles_needed"]:
        return
    positions = np.argwhere(_needed(table, rows, cols))  # row-major: the fixed raster order
    plan = plan_base_tiles(slide["path"], store.patch_size, base, slide.get("source_magnification"))
    if len(plan.grid_y) + 1 < rows or len(plan.grid_x) + 1 < cols:  # (one: a level's rounded size at the edge)
        raise DataError(f"the store's {rows} x {cols} base tile grid does not fit this slide ({len(plan.grid_y)} x "
                        f"{len(plan.grid_x)} tiles of {store.patch_size} px at {base}): was the slide replaced?",
                        slide["path"])
    p = store.patch_size
    tiles = np.empty((min(batch_size, len(positions) - done), p, p, 3), np.uint8)
    filled = 0

    def flush(n: int) -> None:
        nonlocal done
        feats = encoder.encode(tiles[:n])
        with np.errstate(over="ignore", invalid="ignore"):
            half = feats.astype(np.float16)
        if not np.isfinite(half).all():
            ty, tx = positions[done]
            raise DataError(f"the encoder's features for the {n} tiles from base tile (row {ty}, col {tx}) are not "
                            "finite in float16 (NaN, or |x| > 65504)", slide["path"])
        where = positions[done:done + n]
        mm = np.lib.format.open_memmap(npy, mode="r+")
        mm[where[:, 0], where[:, 1]] = half
        mm.flush()
        del mm
        done += n
        _write_progress(folder, entry, done)
        if bar is not None:
            bar.update(n)

    with contextlib.closing(iter_base_tiles(plan, positions[done:])) as reader:  # the slide is closed on errors too
        for _, _, image in reader:
            tiles[filled] = image
            filled += 1
            if filled == len(tiles):
                flush(filled)
                filled = 0
    if filled:
        flush(filled)
