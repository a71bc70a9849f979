"""Caption-paired image folders into an image store with its captions file, in one step (``prepare captioned``).

The common layout of text–image pathology datasets (ARCH, Quilt-1M, PathCap, OpenPath-style exports, a lab's own
atlas): a folder of images (any depth) and a table (CSV, TSV, JSON or JSONL) with one row per caption, an id column
naming the image and a caption column, and optional label columns. The result is what a text-conditioned model
trains on (``histosynth train --recipe pathldm-... --data STORE``): an image-only patch store and, inside it,
``captions.jsonl`` (the recipe's default ``{data}/captions.jsonl``), one row per caption with the patch's store
``index`` and the label columns asked for (e.g. ``class`` for the class-conditional baseline).

Our choices (the datasets' papers train on whole images):

* An id matches an image by its path relative to the folder, else its file name, else its stem; an id that
  matches several images, or an image no row names, or a row whose id names no image is an error listing
  how many and a few of them, unless ``skip_unmatched`` (then a note says how many were left out).
* Each image becomes one patch: its central square (the longer side trimmed equally on both ends), resized to
  ``patch`` px with area averaging. Images smaller than ``patch`` on the shorter side are refused rather than
  upsampled (``allow_upsampling`` to accept them: Lanczos). ``y``, ``x``, ``crop`` of the manifest row are the
  square in the image's pixels.
* Several rows may caption one image (its patch then has several captions; training draws one per step).
* ``holdout``: that fraction of the images (or of the values of ``group_column``, e.g. the slide or the
  source, so that one slide's images stay together) goes to the test split, drawn with ``seed``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from histosynth.atomic import refuse_existing
from histosynth.data.images import list_images, load_image
from histosynth.data.patches import Patch, format_magnification, resize_image
from histosynth.data.store import PatchStore
from histosynth.data.store_writer import PatchStoreWriter, command_list
from histosynth.data.tables import read_rows
from histosynth.errors import DataError, HistosynthError

__all__ = ["CAPTIONS_FILE", "prepare_captioned"]

CAPTIONS_FILE = "captions.jsonl"  # inside the store: what a latent recipe's conditioner.captions reads by default


def _shown(items: Sequence, n: int = 3) -> str:
    items = list(items)
    return ", ".join(repr(str(i)) for i in items[:n]) + (f" and {len(items) - n} more" if len(items) > n else "")


def _image_index(folder: Path, images: list[Path]) -> dict[str, list[Path]]:
    """Every name an id may use for an image (relative path, file name, stem) → the images it names."""
    names: dict[str, list[Path]] = {}
    for path in images:
        rel = path.relative_to(folder).as_posix()
        for key in dict.fromkeys((rel, path.name, path.stem)):
            names.setdefault(key, []).append(path)
    return names


def match_rows(folder: Path, table: Path, rows: list[dict], images: list[Path], *, id_column: str,
               caption_column: str, skip_unmatched: bool) -> tuple[dict[Path, list[dict]], dict[str, int]]:
    """Rows grouped by the image they caption (images in folder order), and what was left out.

    Raises:
        DataError: a missing column, an empty caption, an ambiguous id, or unmatched ids / images (unless
            ``skip_unmatched``), naming the table or the folder.
    """
    for column in (id_column, caption_column):
        if column not in rows[0]:
            raise DataError(f"no column {column!r}; the table has {sorted(rows[0])} (choose with --id-column / "
                            "--caption-column)", table)
    names = _image_index(folder, images)
    by_image: dict[Path, list[dict]] = {}
    unknown: list[str] = []
    for number, row in enumerate(rows, start=1):
        key, caption = str(row.get(id_column, "")).strip(), row.get(caption_column)
        if not isinstance(caption, str) or not caption.strip():
            raise DataError(f"row {number} ({id_column} {key!r}) has no caption in column {caption_column!r}", table)
        found = names.get(key) or names.get(Path(key).as_posix())
        if not found:
            unknown.append(key)
            continue
        if len(found) > 1:
            raise DataError(f"row {number}: {id_column} {key!r} names {len(found)} images "
                            f"({_shown(p.relative_to(folder).as_posix() for p in found)}); use paths relative to "
                            "the folder as ids", table)
        by_image.setdefault(found[0], []).append(row)
    uncaptioned = [p.relative_to(folder).as_posix() for p in images if p not in by_image]
    if (unknown or uncaptioned) and not skip_unmatched:
        problems = []
        if unknown:
            problems.append(f"{len(unknown)} rows name no image of {folder} ({_shown(unknown)})")
        if uncaptioned:
            problems.append(f"{len(uncaptioned)} images have no caption ({_shown(uncaptioned)})")
        raise DataError("; ".join(problems) + "; fix the ids (relative path, file name or stem) or pass "
                        "--skip-unmatched to leave them out", table)
    ordered = {p: by_image[p] for p in images if p in by_image}
    return ordered, {"rows_without_image": len(unknown), "images_without_caption": len(uncaptioned)}


def central_square(image: np.ndarray, patch: int, allow_upsampling: bool, path: Path) -> tuple[np.ndarray, int, int, int]:
    """(patch px square, y, x, side): the image's central square resized to ``patch`` (area averaging)."""
    h, w = image.shape[:2]
    side = min(h, w)
    if side < patch and not allow_upsampling:
        raise DataError(f"image is {h}x{w} px, smaller than --patch {patch} on its shorter side; lower --patch or "
                        "pass --allow-upsampling", path)
    y, x = (h - side) // 2, (w - side) // 2
    return resize_image(image[y : y + side, x : x + side], patch), y, x, side


def held_out_groups(keys: list[str], holdout: float, seed: int) -> set[str]:
    """The group keys held out: ``round(holdout · groups)`` of them, drawn with ``seed`` (an error if that is none)."""
    groups = sorted(set(keys))
    n = int(round(holdout * len(groups)))
    if holdout > 0 and n == 0:
        raise HistosynthError(f"--holdout {holdout} of {len(groups)} images/groups holds out none; pass a larger "
                              "fraction or --holdout 0")
    chosen = np.random.default_rng(seed).choice(len(groups), size=n, replace=False) if n else []
    return {groups[i] for i in chosen}


def prepare_captioned(
    folder: str | Path,
    table: str | Path,
    out: str | Path,
    *,
    patch: int = 256,
    magnification: str = "20x",
    id_column: str = "id",
    caption_column: str = "caption",
    label_columns: Sequence[str] = (),
    group_column: str | None = None,
    holdout: float = 0.0,
    seed: int = 0,
    skip_unmatched: bool = False,
    allow_upsampling: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    command: str | Sequence[str] | None = None,
) -> PatchStore:
    """Write the images of ``folder`` captioned by ``table`` into an image store at ``out`` with ``out/captions.jsonl``.

    ``magnification``: what the images are (e.g. '20x'; a caption dataset of mixed magnifications is one store
    per magnification, or the one most of it has). ``label_columns``: columns copied into each caption row
    (``class`` is what the class-conditional recipe reads). Manifest rows carry ``file`` (the relative path) and
    the image's ``height`` / ``width``.

    Raises:
        OutputExistsError: ``out`` exists and not ``overwrite``.
        DataError: a missing folder, table, column or caption, unmatched ids or images, an image too small,
            unreadable images (each naming the file).
        HistosynthError: bad ``patch`` / ``holdout``.
    """
    folder, table, out = Path(folder), Path(table), Path(out)
    refuse_existing(out, overwrite)
    if patch < 8 or not 0.0 <= holdout < 1.0:
        raise HistosynthError(f"--patch must be at least 8 (got {patch}) and --holdout in [0, 1) (got {holdout})")
    format_magnification(magnification)
    if not folder.is_dir():
        raise DataError("image folder not found", folder)
    images = list_images(folder)
    if not images:
        raise DataError("no images in this folder", folder)
    rows = read_rows(table, "caption table", columns=(*label_columns, *([group_column] if group_column else [])),
                     allow_empty=False)
    by_image, left_out = match_rows(folder, table, rows, images, id_column=id_column, caption_column=caption_column,
                                    skip_unmatched=skip_unmatched)
    if not by_image:
        raise DataError("no image of the folder has a caption", table)
    if any(left_out.values()):
        print(f"note: left out {left_out['rows_without_image']} rows naming no image and "
              f"{left_out['images_without_caption']} images without a caption (--skip-unmatched)", file=sys.stderr)
    group = {p: str(r[0][group_column]) if group_column else p.relative_to(folder).as_posix()
             for p, r in by_image.items()}
    held = held_out_groups(list(group.values()), holdout, seed)
    meta = {"kind": "captioned", "folder": str(folder), "table": str(table), "holdout": holdout, "seed": seed,
            "group_column": group_column, "label_columns": list(label_columns), **left_out,
            "command": command_list(command)}
    from tqdm.auto import tqdm

    captions: list[str] = []
    with (tqdm(total=len(by_image), unit="image", desc="prepare captioned", file=sys.stderr, disable=not progress) as bar,
          PatchStoreWriter(out, (), patch, magnification, meta, overwrite, labels=False) as writer):
        for path, image_rows in by_image.items():
            image = load_image(path)
            square, y, x, side = central_square(image, patch, allow_upsampling, path)
            rel = path.relative_to(folder).as_posix()
            split = "test" if group[path] in held else "train"
            index = len(writer)
            writer.add(Patch(square, None, None, split, y, x, side, str(path),
                             {"file": rel, "height": int(image.shape[0]), "width": int(image.shape[1])}))
            for row in image_rows:
                caption = {"index": index, "source": str(path), "y": y, "x": x, "file": rel,
                           "caption": row[caption_column].strip(), **{c: row[c] for c in label_columns}}
                captions.append(json.dumps(caption))
            bar.update(1)
        writer.write_side_file(CAPTIONS_FILE, "".join(line + "\n" for line in captions))
    return PatchStore(out)
