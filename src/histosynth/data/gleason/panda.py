"""PANDA (Kaggle prostate-cancer-grade-assessment; Bulten et al., Nat. Med. 2022) in its native layout::

    SRC/train.csv                               image_id, data_provider, isup_grade, gleason_score
    SRC/train_images/<image_id>.tiff            pyramidal RGB slides (level 0 ≈ 0.5 µm/px = 20x)
    SRC/train_label_masks/<image_id>_mask.tiff  label masks with the slide's size and pyramid; labels in the R channel

Mask coding (verified with the ``search`` tool: clementapa/Prostate-Cancer-Image-Classification utils/constant.py,
and a PANDA dataset class mapping radboud → karolinska, as on the challenge's data page):
- Radboud: 0 background / unknown, 1 stroma, 2 healthy (benign) epithelium, 3 / 4 / 5 Gleason pattern 3 / 4 / 5.
  Default: 0, 1, 2 → non-cancer; 3 → GG3; 4 → GG4; 5 → GG5.
- Karolinska: 0 background / unknown, 1 benign tissue (stroma and epithelium), 2 cancerous tissue — without a
  Gleason pattern. Default: 0, 1 → non-cancer, and 2 is NOT placed: a grade for it would be invented. A Karolinska
  slide with cancer (train.csv: isup_grade > 0) is refused before anything is read, naming the two ways out:
  ``--label-map karolinska:2=GG3`` (a label of your choice, e.g. for slides you know to be pure pattern 3) or
  ``--panda-providers radboud`` (Karolinska left out). Refusing rather than silently skipping: Karolinska is half of
  PANDA, and leaving it out, or grading its cancer, changes what the store means; the user should choose it.
  Slides with ``negative`` / ``0+0`` scores hold no value 2 and are read as they are.
A ``--label-map`` key may name a provider (``radboud:2=...``, ``karolinska:2=...``); a bare key applies to both.

Resolution. The slide's level-0 magnification is ``source_magnification`` when given, else its metadata
(:func:`histosynth.data.slides.slide_magnification`: objective power or µm/px snapped to 20x), else 20x (PANDA's
scanners: 0.48 µm/px Radboud, 0.45 / 0.50 µm/px Karolinska). Image and mask are read at the same pyramid level
(the image's best level for the target, :func:`~histosynth.data.slides.best_level_for`) and the same level-0
coordinates; the mask's level of the same size is used (PANDA masks share their slide's pyramid; a mask without
one is read from its own best level and resized to the block, nearest neighbour). When the level is not at the
target the image is area-averaged (PIL box) and the mask resized nearest-neighbour (output pixel centres).

Blocks. The level is cut into blocks of ``block`` px at the target magnification (default 2048; the right / bottom
ones narrower), one record each, so at most one block of image and mask is in memory. Blocks narrower than
``min_side`` target px, and blocks whose footprint on the slide's tissue thumbnail
(:func:`~histosynth.data.slides.tissue_mask`, as ``prepare slides`` builds it) holds no tissue, are skipped.
Slides in train_images/ must have a train.csv row; slides without a mask are left out (PANDA's training set has some,
the data page says so), counted through ``report``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from histosynth.data.gleason.labels import LabelMapping, build_mapping, parse_labels
from histosynth.data.io import child_dir
from histosynth.data.patches import format_magnification, parse_magnification
from histosynth.data.record import RegionRecord
from histosynth.data.slides import (
    LEVEL_TOLERANCE,
    best_level_for,
    open_slide,
    read_region,
    read_thumbnail,
    slide_magnification,
    slide_size,
    thumbnail_geometry,
    tissue_mask,
    to_level0,
)
from histosynth.errors import DataError, HistosynthError

__all__ = ["DEFAULT_BLOCK", "KAROLINSKA_DEFAULT_MAP", "PANDA_MAGNIFICATION", "PROVIDERS", "RADBOUD_DEFAULT_MAP",
           "parse_providers", "read_panda"]

PANDA_MAGNIFICATION = "20x"
RADBOUD_DEFAULT_MAP = {0: "non-cancer", 1: "non-cancer", 2: "non-cancer", 3: "GG3", 4: "GG4", 5: "GG5"}
KAROLINSKA_DEFAULT_MAP = {0: "non-cancer", 1: "non-cancer"}  # 2 = cancer without a grade: no default
KAROLINSKA_CANCER = 2
PROVIDERS = ("radboud", "karolinska")
DEFAULT_BLOCK = 2048
NEGATIVE_SCORES = ("negative", "0+0")
KAROLINSKA_WAYS_OUT = ("map it explicitly with --label-map karolinska:2=GG3 (or another label; label_map=), or leave "
                       "Karolinska out with --panda-providers radboud (providers=)")


def parse_providers(value) -> tuple[str, ...]:
    """``"radboud,karolinska"`` (or a sequence) → the provider names; HistosynthError naming --panda-providers."""
    items = value.split(",") if isinstance(value, str) else list(value)
    names = tuple(dict.fromkeys(str(p).strip().lower() for p in items if str(p).strip()))
    bad = [p for p in names if p not in PROVIDERS]
    if bad or not names:
        raise HistosynthError(f"--panda-providers: {', '.join(bad) or 'none given'}; choose from {', '.join(PROVIDERS)}")
    return names


def _read_csv(path: Path) -> dict[str, dict]:
    """{image_id: row} of train.csv (headers lower-cased); DataError naming it."""
    if not path.is_file():
        raise DataError("no train.csv (PANDA: train.csv, train_images/, train_label_masks/)", path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = [{(k or "").strip().lower(): (v or "").strip() for k, v in r.items()} for r in csv.DictReader(f)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"cannot read it as CSV: {exc}", path) from None
    if not rows or not {"image_id", "data_provider"} <= set(rows[0]):
        have = ", ".join(rows[0]) if rows else "no rows"
        raise DataError(f"needs columns image_id and data_provider (it has: {have})", path)
    return {r["image_id"]: r for r in rows if r["image_id"]}


def _has_cancer(row: dict) -> bool:
    isup, score = row.get("isup_grade", ""), row.get("gleason_score", "").lower()
    if isup.isdigit():
        return int(isup) > 0
    return bool(score) and score not in NEGATIVE_SCORES


def read_panda(src: str | Path, *, magnification: str = PANDA_MAGNIFICATION, labels: tuple[str, ...] | None = None,
               label_map: dict | None = None, providers=PROVIDERS, block: int = DEFAULT_BLOCK, min_side: int = 1,
               source_magnification: str | None = None, report: Callable[[str], None] | None = None
               ) -> Iterator[RegionRecord]:
    """Aligned image / region blocks of PANDA's training slides (conventions in the module docstring), slide by slide
    in image_id order, blocks in raster order.

    Each record: image uint8 (h, w, 3) and region_map int32 (h, w) at ``magnification`` (h, w <= ``block``), values
    0..K-1 of ``labels`` (default non-cancer, GG3, GG4, GG5); split None; ``magnification`` the target; source
    ``SLIDE.tiff[x=..,y=..]`` (level-0 origin); meta: slide, provider, isup_grade, gleason_score, level,
    level_downsample, level-0 x, y, width, height, source_magnification and where it came from.

    Checked now (nothing read but train.csv and the folders): options, a slide without a train.csv row, an unknown
    provider, a Karolinska slide with cancer that the mapping cannot place. While iterating, DataError naming the
    file: unreadable slide or mask, a mask whose size differs from its slide, a target above the slide's
    magnification, a mask value the mapping does not place.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError("PANDA folder not found" if not src.exists() else "not a folder", src)
    if int(block) != block or block < 1:
        raise HistosynthError(f"--panda-block must be a positive number of pixels, got {block!r}")
    if block < min_side:
        raise HistosynthError(f"--panda-block {block} is smaller than a patch ({min_side} px, --patch): no block "
                              "would hold one")
    target = parse_magnification(magnification)
    chosen = parse_providers(providers)
    names = parse_labels(None) if labels is None else tuple(labels)
    mappings = {
        "radboud": build_mapping(RADBOUD_DEFAULT_MAP, label_map, names, scope="radboud", scopes=PROVIDERS),
        "karolinska": build_mapping(KAROLINSKA_DEFAULT_MAP, label_map, names, scope="karolinska", scopes=PROVIDERS,
                                    hint="Karolinska masks mark cancer as 2 without a Gleason pattern: "
                                         + KAROLINSKA_WAYS_OUT),
    }
    csv_path = src / "train.csv"
    rows = _read_csv(csv_path)
    images_dir, masks_dir = child_dir(src, "train_images"), child_dir(src, "train_label_masks")
    if images_dir is None or masks_dir is None:
        raise DataError("a PANDA folder holds train_images/ and train_label_masks/ (and train.csv)", src)
    slides = sorted(p for p in images_dir.iterdir() if p.is_file() and p.suffix.lower() in (".tiff", ".tif"))
    if not slides:
        raise DataError("no slides in it (<image_id>.tiff)", images_dir)
    entries, other_provider, no_mask = [], 0, []
    for path in slides:
        row = rows.get(path.stem)
        if row is None:
            raise DataError(f"no row for this slide in {csv_path} (image_id {path.stem})", path)
        provider = row["data_provider"].lower()
        if provider not in PROVIDERS:
            raise DataError(f"data_provider {row['data_provider']!r} of {path.stem} is neither radboud nor karolinska",
                            csv_path)
        if provider not in chosen:
            other_provider += 1
            continue
        mask = masks_dir / f"{path.stem}_mask.tiff"
        if not mask.is_file():
            no_mask.append(path.stem)
            continue
        entries.append((path, mask, row, provider))
    cancer = [e[2]["image_id"] for e in entries
              if e[3] == "karolinska" and KAROLINSKA_CANCER not in mappings["karolinska"].names and _has_cancer(e[2])]
    if cancer:
        raise DataError(f"{len(cancer)} Karolinska slides have cancer (isup_grade > 0, e.g. {', '.join(cancer[:3])}); "
                        "Karolinska masks mark it as value 2 without a Gleason pattern, which no label can take without "
                        f"inventing a grade: {KAROLINSKA_WAYS_OUT}", csv_path)
    if no_mask and report is not None:
        report(f"panda: {len(no_mask)} slides have no label mask in {masks_dir} (e.g. {', '.join(no_mask[:3])}); "
               "they are left out")
    if not entries:
        why = f"{len(no_mask)} without a mask, {other_provider} of other providers"
        raise DataError(f"no slide to read ({why}; --panda-providers {','.join(chosen)})", images_dir)
    return _records(entries, mappings, target, int(block), int(min_side), source_magnification)


def _records(entries, mappings: dict[str, LabelMapping], target: float, block: int, min_side: int,
             override) -> Iterator[RegionRecord]:
    for path, mask_path, row, provider in entries:
        yield from _slide_blocks(path, mask_path, row, provider, mappings[provider], target, block, min_side, override)


def _source_magnification(slide, path: Path, override) -> tuple[float, str]:
    try:
        return slide_magnification(slide, path, override)
    except DataError:
        if override is not None:
            raise
        return parse_magnification(PANDA_MAGNIFICATION), "panda-default"


def _same_level(mask, size: tuple[int, int]) -> int | None:
    for i, dims in enumerate(mask.level_dimensions):
        if tuple(int(v) for v in dims) == tuple(size):
            return i
    return None


def _slide_blocks(path: Path, mask_path: Path, row: dict, provider: str, mapping: LabelMapping, target: float,
                  block: int, min_side: int, override) -> Iterator[RegionRecord]:
    slide, mask = open_slide(path), None
    try:
        mask = open_slide(mask_path)
        w0, h0 = slide_size(slide, str(path))
        if slide_size(mask, str(mask_path)) != (w0, h0):
            mw, mh = slide_size(mask, str(mask_path))
            raise DataError(f"mask is {mw}x{mh} px at level 0, its slide {w0}x{h0} px: a label mask must cover its "
                            "slide pixel for pixel", mask_path)
        source, how = _source_magnification(slide, path, override)
        if target > source * (1 + 1e-3):
            raise DataError(f"target magnification {target:g}x is above the slide's {source:g}x (from its {how}); "
                            "upsampling would invent detail", path)
        needed = max(1.0, source / target)
        level = best_level_for(slide, needed)
        ds = float(slide.level_downsamples[level])
        level_w, level_h = (int(v) for v in slide.level_dimensions[level])
        exact = abs(ds - needed) <= LEVEL_TOLERANCE * needed
        level_crop = block if exact else max(1, round(block * needed / ds))
        mask_level = _same_level(mask, (level_w, level_h))
        thumb, thumb_level = thumbnail_geometry(slide, level_crop * ds)
        tissue = tissue_mask(read_thumbnail(slide, thumb, thumb_level, str(path)))
        sx, sy = w0 / thumb[0], h0 / thumb[1]
        base = {"slide": path.stem, "provider": provider, "isup_grade": row.get("isup_grade"),
                "gleason_score": row.get("gleason_score"), "level": level, "level_downsample": ds,
                "source_magnification": format_magnification(source), "magnification_from": how}
        for ly in range(0, level_h, level_crop):
            for lx in range(0, level_w, level_crop):
                lw, lh = min(level_crop, level_w - lx), min(level_crop, level_h - ly)
                out_w, out_h = (lw, lh) if exact else (max(1, round(lw * ds / needed)), max(1, round(lh * ds / needed)))
                if min(out_w, out_h) < min_side:
                    continue
                x0, y0 = to_level0(lx, ds), to_level0(ly, ds)
                r0, c0 = min(thumb[1] - 1, int(y0 / sy)), min(thumb[0] - 1, int(x0 / sx))
                r1 = max(r0 + 1, min(thumb[1], math.ceil((y0 + lh * ds) / sy)))
                c1 = max(c0 + 1, min(thumb[0], math.ceil((x0 + lw * ds) / sx)))
                if not tissue[r0:r1, c0:c1].any():
                    continue
                image = read_region(slide, (x0, y0), level, (lw, lh), str(path))
                native = _mask_block(mask, mask_level, (x0, y0), ds, (lw, lh), mask_path)
                if (out_w, out_h) != (lw, lh):
                    image = _resize_area(image, out_w, out_h)
                if native.shape != (out_h, out_w):
                    native = _resize_nearest(native, out_w, out_h)
                region = mapping.apply(native, mask_path)
                yield RegionRecord(
                    image=image, region_map=region, class_names=mapping.labels, source=f"{path}[x={x0},y={y0}]",
                    split=None, magnification=format_magnification(target),
                    meta={**base, "x": x0, "y": y0, "width": round(lw * ds), "height": round(lh * ds)},
                )
    finally:
        slide.close()
        if mask is not None:
            mask.close()


def _mask_block(mask, level: int | None, loc: tuple[int, int], ds: float, size: tuple[int, int], path: Path) -> np.ndarray:
    """The R channel of the mask over the image block: the same level and coordinates when the mask has the image's
    level, else the same level-0 rectangle from the mask's own best level."""
    if level is not None:
        return read_region(mask, loc, level, size, str(path))[..., 0]
    own = best_level_for(mask, ds)
    mds = float(mask.level_downsamples[own])
    mw, mh = (int(v) for v in mask.level_dimensions[own])
    lx, ly = int(loc[0] / mds), int(loc[1] / mds)
    w = max(1, min(mw - lx, math.ceil(size[0] * ds / mds)))
    h = max(1, min(mh - ly, math.ceil(size[1] * ds / mds)))
    return read_region(mask, loc, own, (w, h), str(path))[..., 0]


def _resize_area(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area (box) averaging of a uint8 RGB block to (height, width, 3)."""
    return np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((width, height), Image.Resampling.BOX))


def _resize_nearest(labels: np.ndarray, width: int, height: int) -> np.ndarray:
    """Nearest neighbour at output pixel centres (only values present in the input come out)."""
    h, w = labels.shape
    rows = np.minimum(((np.arange(height) + 0.5) * h / height).astype(np.int64), h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * w / width).astype(np.int64), w - 1)
    return labels[np.ix_(rows, cols)]
