"""Gleason2019 (MICCAI 2019 challenge, gleason2019.grand-challenge.org; Nir et al., MedIA 2018) in its native layout::

    SRC/Train Imgs/slideNNN_coreNNN.jpg                      TMA core images (about 5120x5120 px, 40x)
    SRC/Maps1_T/slideNNN_coreNNN_classimg_nonconvex.png      pathologist 1's map (single-channel, the core's size)
    ...
    SRC/Maps6_T/...                                          pathologist 6's; each annotated a subset of the cores

Map values: 0 and 1 benign / no cancer, 3 / 4 / 5 Gleason pattern 3 / 4 / 5, 6 also benign. Verified with the
``search`` tool in public code that reads the release: a conversion script's docstring ("Labels 0, 1, and 6: benign
(no cancer); Label 3/4/5: Gleason grade 3/4/5", mapping 1, 6 → 0); Foucart et al. (SIPAIM 2021, research.adfoucart.be
and their dataset.py: "grade > 5 are mistakes and should be = 1", i.e. 6 is benign); another pipeline's README
treats 6 as an abstention. So 6 is never a grade: by default it is non-cancer, like 0 and 1. 40x: the challenge data
paper (Nir et al. 2018; TMA cores scanned at 40x) — the search corpus held no page stating it, so it is
``--source-magnification``-overridable. Map files are found in each ``Maps<n>_T`` folder (and its sub-folders, as
some archives unpack into a nested folder) by the slide and core numbers of their name, so a different zero-padding
(one script notes ``core00M`` names in Maps6_T) still matches.

Default mapping: 0, 1, 6 → non-cancer; 3 → GG3; 4 → GG4; 5 → GG5.

Which map. ``pathologist`` 1..6 reads that pathologist's maps (cores they did not annotate are skipped, counted in the
meta); ``majority`` (default) votes pixel by pixel among the maps a core has, after mapping each onto the label set
(so benign codes 0 / 1 / 6 do not split the vote); a tie goes to the label earlier in the label list, i.e. the lower
grade with the default labels (non-cancer < GG3 < GG4 < GG5). A core with no map at all is an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from histosynth.data.gleason.labels import LabelMapping, build_mapping, parse_labels
from histosynth.data.io import child_dir, list_images, read_label_png, read_rgb
from histosynth.data.record import RegionRecord
from histosynth.errors import DataError, HistosynthError

__all__ = ["GLEASON2019_DEFAULT_MAP", "GLEASON2019_MAGNIFICATION", "PATHOLOGISTS", "read_gleason2019"]

GLEASON2019_MAGNIFICATION = "40x"
GLEASON2019_DEFAULT_MAP = {0: "non-cancer", 1: "non-cancer", 6: "non-cancer", 3: "GG3", 4: "GG4", 5: "GG5"}
PATHOLOGISTS = (1, 2, 3, 4, 5, 6)
IMAGE_FOLDERS = ("Train Imgs", "Train_Imgs", "TrainImgs", "Train_imgs")
MAP_SUFFIX = "_classimg_nonconvex"
_CORE = re.compile(r"slide0*(\d+)_core0*(\d+)", re.IGNORECASE)


def _core_key(stem: str) -> str:
    """``slide1_core3`` for slide001_core003 (padding-free), else the stem itself."""
    m = _CORE.search(stem)
    return f"slide{int(m.group(1))}_core{int(m.group(2))}" if m else stem


def parse_pathologist(value) -> int | None:
    """``majority`` → None, ``1``..``6`` → int; HistosynthError naming ``--gleason-pathologist`` otherwise."""
    text = str(value).strip().lower()
    if text in ("majority", "vote", "none"):
        return None
    if text.isdigit() and int(text) in PATHOLOGISTS:
        return int(text)
    raise HistosynthError(f"--gleason-pathologist must be majority or one of 1..6, got {value!r}")


def _map_index(src: Path) -> dict[int, dict[str, Path]]:
    """{pathologist: {core key: map file}} of the Maps<n>_T folders present."""
    out: dict[int, dict[str, Path]] = {}
    for n in PATHOLOGISTS:
        folder = child_dir(src, f"Maps{n}_T")
        if folder is None:
            continue
        index: dict[str, Path] = {}
        for path in sorted(folder.rglob(f"*{MAP_SUFFIX}.png")):
            key = _core_key(path.name[: -len(f"{MAP_SUFFIX}.png")])
            if key in index:
                raise DataError(f"two maps of the same core in {folder}: {index[key].name} and {path.name}", path)
            index[key] = path
        out[n] = index
    return out


def read_gleason2019(src: str | Path, *, pathologist: int | str | None = None, labels: tuple[str, ...] | None = None,
                     label_map: dict | None = None, source_magnification: str | None = None,
                     report: Callable[[str], None] | None = None) -> Iterator[RegionRecord]:
    """Records of the Gleason2019 training cores (layout, coding and vote in the module docstring), in name order.

    Each record: image uint8 (H, W, 3); region_map int32 (H, W), values 0..K-1 of ``labels`` (default non-cancer,
    GG3, GG4, GG5); split None (the challenge released no test maps, so the hold-out decides); magnification
    ``source_magnification`` or 40x; meta ``pathologists`` (whose maps made it) and ``vote``. With one
    ``pathologist``, the number of cores left out for want of their map goes to ``report`` (one line) at the end.

    Checked now: the folders, the option, the map index. While iterating, DataError naming the file: a core without
    any map (majority), a map whose size differs from its image, a map value the mapping does not place.
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError("Gleason2019 folder not found" if not src.exists() else "not a folder", src)
    who = pathologist if isinstance(pathologist, int) or pathologist is None else parse_pathologist(pathologist)
    if who is not None and who not in PATHOLOGISTS:
        raise HistosynthError(f"--gleason-pathologist must be majority or one of 1..6, got {pathologist!r}")
    names = parse_labels(None) if labels is None else tuple(labels)
    mapping = build_mapping(GLEASON2019_DEFAULT_MAP, label_map, names)
    images_dir = next((d for d in (child_dir(src, n) for n in IMAGE_FOLDERS) if d is not None), None)
    if images_dir is None:
        raise DataError("no 'Train Imgs' folder (Gleason2019: Train Imgs/slideNNN_coreNNN.jpg, Maps1_T..Maps6_T/)", src)
    images = list_images(images_dir)
    if not images:
        raise DataError("no core images in it (slideNNN_coreNNN.jpg)", images_dir)
    index = _map_index(src)
    if not index:
        raise DataError("no Maps1_T..Maps6_T folder (the pathologists' maps)", src)
    if who is not None and who not in index:
        raise DataError(f"no Maps{who}_T folder for --gleason-pathologist {who} (folders here: "
                        f"{', '.join(f'Maps{n}_T' for n in sorted(index))})", src)
    magnification = source_magnification or GLEASON2019_MAGNIFICATION
    return _records(images, index, who, mapping, magnification, report)


def _records(images: list[Path], index, who: int | None, mapping: LabelMapping, magnification: str,
             report: Callable[[str], None] | None) -> Iterator[RegionRecord]:
    skipped = 0
    for image_path in images:
        key = _core_key(image_path.stem)
        maps = {n: idx[key] for n, idx in sorted(index.items()) if key in idx and (who is None or n == who)}
        if not maps:
            if who is not None:
                skipped += 1  # this pathologist did not annotate the core
                continue
            raise DataError(f"no map of any pathologist for this core (Maps1_T..Maps6_T/{image_path.stem}"
                            f"{MAP_SUFFIX}.png)", image_path)
        image = read_rgb(image_path)
        region = _vote(image.shape[:2], maps, mapping)
        yield RegionRecord(image=image, region_map=region, class_names=mapping.labels, source=str(image_path),
                           split=None, magnification=magnification,
                           meta={"pathologists": sorted(maps), "vote": "majority" if who is None else f"pathologist {who}",
                                 "slide": image_path.stem.split("_core")[0]})
    if skipped and report is not None:
        report(f"gleason2019: {skipped} cores have no map of pathologist {who}; they are left out")


def _vote(shape: tuple[int, int], maps: dict[int, Path], mapping: LabelMapping) -> np.ndarray:
    """Label ids (int32 (H, W)) of one map, or the pixel-wise majority of several (ties to the lower label id)."""
    counts = None
    for path in maps.values():
        native = read_label_png(path)
        if native.shape != tuple(shape):
            raise DataError(f"map is {native.shape[0]}x{native.shape[1]} px, its core image {shape[0]}x{shape[1]} px: "
                            "a map must cover its image pixel for pixel", path)
        ids = mapping.apply(native, path)
        if len(maps) == 1:
            return ids
        if counts is None:
            counts = np.zeros((len(mapping.labels),) + tuple(shape), np.uint8)
        for k in range(len(mapping.labels)):
            counts[k] += ids == k
    return counts.argmax(0).astype(np.int32)  # argmax takes the first maximum: the lower label on a tie
