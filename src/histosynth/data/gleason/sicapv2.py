"""SICAPv2 (Silva-Rodríguez et al., CMPB 2020; Mendeley Data 9xxm58dvs3) in its native layout::

    SRC/images/NAME.jpg                     512x512 RGB patches at 10x (the paper; 18,783 patches of 155 biopsies)
    SRC/masks/NAME.jpg|png                  pixel masks, same stem, grey levels: 0 non-cancerous, 3 / 4 / 5 Gleason
                                            pattern 3 / 4 / 5
    SRC/partition/Test/{Train,Test}.xlsx    the patient-wise train / test partition
    SRC/partition/Validation/Val1..Val4/{Train,Test}.xlsx   the four cross-validation folds of the train part
    SRC/wsi_labels.xlsx                     slide-level Gleason scores (not read)

The spreadsheets have columns ``image_name`` (the patch's file name, with ``.jpg``) and NC, G3, G4, G5, G4C (patch
level labels, kept in the record's meta). ``partition`` (``test``, default, or ``val1``..``val4``) chooses the folder;
Train.xlsx gives split ``train``, Test.xlsx ``test``; images that the partition does not list are left out (the
Validation folds hold only the Test partition's train part), their count kept in each record's meta.

Verified with the ``search`` tool (public code reading SICAPv2), since the Mendeley page itself was not reachable:
- layout, partition files and ``image_name``: rkakooza/CP8321-sicapv2-gleason-segmentation (src/dataset.py,
  README.md: ``images/``, ``masks/``, ``partition/Test``, ``partition/Validation/Val1..4``, ``wsi_labels.xlsx``,
  ``pd.read_excel(.../Train.xlsx)``, columns NC / G3 / G4 / G4C / G5, masks named like their image);
- mask coding 0 / 3 / 4 / 5 (non-cancerous, Gleason 3, 4, 5): histocartography/seg-gini bin/create_sicap_data.py
  (``ID_TO_LABELS = {0: 0, 3: 1, 4: 2, 5: 3, 255: 4}``, 255 being its own canvas fill, "unlabelled"),
  CielAl/pytorch-carcino-net data/pixel_collate.json (the grey levels covering >= 10 % of any mask: 0, 3, 4, 5)
  and data/gleason.json;
- masks are JPEG in the copies most code reads (``masks/NAME.jpg``, cv2.imread; rkakooza's notebook finds the
  lossy grey levels around the codes), PNG in seg-gini's: any image suffix is accepted. A JPEG mask's grey levels
  within ``mask_tolerance`` (default 3) of a value the mapping places are snapped to it
  (:func:`~histosynth.data.gleason.labels.snap_to_values`); levels farther from every placed value are an error
  naming the mask and the values (``--label-map`` places them; ``--sicap-mask-tolerance`` widens the snap).
  An RGB mask must be grey (channels equal within the tolerance).
- 10x: the SICAPv2 paper (patches of 512x512 px from slides downsampled to 10x), as the readers above say.

Default mapping: 0 → non-cancer, 3 → GG3, 4 → GG4, 5 → GG5 (DISC's labels come from these masks).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from histosynth.data.gleason.labels import LabelMapping, build_mapping, parse_labels, snap_to_values
from histosynth.data.io import IMAGE_EXTS, child_dir, list_images, open_decoded, read_rgb
from histosynth.data.record import RegionRecord
from histosynth.errors import DataError, HistosynthError

__all__ = ["PARTITIONS", "SICAP_DEFAULT_MAP", "SICAP_MAGNIFICATION", "read_sicapv2", "read_xlsx_rows"]

SICAP_MAGNIFICATION = "10x"
SICAP_DEFAULT_MAP = {0: "non-cancer", 3: "GG3", 4: "GG4", 5: "GG5"}
PARTITIONS = ("test", "val1", "val2", "val3", "val4")
LOSSY_SUFFIXES = (".jpg", ".jpeg")
DEFAULT_MASK_TOLERANCE = 3  # grey levels of JPEG noise; the codes 3, 4, 5 are 1 apart: neighbours vote (labels.snap_to_values)
GRADE_COLUMNS = ("NC", "G3", "G4", "G5", "G4C")


def read_xlsx_rows(path: Path, required: str) -> list[dict]:
    """The rows of an .xlsx file's first sheet as {header: value} (openpyxl, read-only), headers compared
    case-insensitively; DataError naming the file when unreadable or without the ``required`` column."""
    try:
        import openpyxl
    except ImportError:
        raise HistosynthError("reading SICAPv2's partition spreadsheets needs openpyxl (pip install openpyxl)") from None
    if not path.is_file():
        raise DataError("partition spreadsheet not found", path)
    try:
        book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    except Exception as exc:  # zipfile / XML errors of a corrupt file
        raise DataError(f"cannot read the spreadsheet (corrupt or not .xlsx): {type(exc).__name__}: {exc}", path) from None
    try:
        rows = book.worksheets[0].iter_rows(values_only=True)
        header = [str(h).strip() if h is not None else "" for h in next(rows, ())]
        if required.lower() not in (h.lower() for h in header):
            raise DataError(f"no {required!r} column (it has: {', '.join(h for h in header if h) or 'none'})", path)
        out = []
        for row in rows:
            item = {h: v for h, v in zip(header, row) if h}
            out.append({k if k.lower() != required.lower() else required: v for k, v in item.items()})
        return out
    finally:
        book.close()


def _partition_files(src: Path, partition: str) -> dict[str, Path]:
    """{split: spreadsheet} of a partition name (``test``, ``val1``..``val4``)."""
    name = str(partition).strip().lower()
    if name not in PARTITIONS:
        raise HistosynthError(f"--sicap-partition must be one of {', '.join(PARTITIONS)}, got {partition!r}")
    root = child_dir(src, "partition")
    if root is None:
        raise DataError("no partition/ folder (SICAPv2 ships partition/Test/ and partition/Validation/Val1..Val4/)", src)
    folder = child_dir(root, "Test") if name == "test" else child_dir(child_dir(root, "Validation") or root, name)
    if folder is None:
        sub = "Test" if name == "test" else f"Validation/Val{name[-1]}"
        raise DataError(f"no partition/{sub}/ folder with Train.xlsx and Test.xlsx", src)
    return {split: folder / f"{split.capitalize()}.xlsx" for split in ("train", "test")}


def _stem(name) -> str:
    text = str(name).strip()
    return Path(text).stem if Path(text).suffix.lower() in IMAGE_EXTS else text


def _read_mask(path: Path, tolerance: int) -> np.ndarray:
    """The grey levels of a mask (uint8 or wider, (H, W)); an RGB mask must be grey."""
    im = open_decoded(path)
    arr = np.asarray(im)
    if arr.ndim == 3:
        if im.mode not in ("RGB", "RGBA") or arr.dtype != np.uint8:
            raise DataError(f"mask must be a grey image, got PIL mode {im.mode!r}", path)
        rgb = arr[..., :3].astype(np.int16)
        spread = int((rgb.max(2) - rgb.min(2)).max()) if rgb.size else 0
        if spread > max(0, tolerance):
            raise DataError(f"mask is a colour image (channels differ by up to {spread} grey levels); SICAPv2 masks "
                            "are grey levels 0 / 3 / 4 / 5", path)
        arr = np.rint(rgb.mean(2)).astype(np.uint8)
    elif im.mode == "P":
        arr = np.asarray(im)  # palette indices are the labels
    if arr.ndim != 2:
        raise DataError(f"mask must be 2-D, got shape {arr.shape}", path)
    return arr


def read_sicapv2(src: str | Path, *, partition: str = "test", labels: tuple[str, ...] | None = None,
                 label_map: dict | None = None, mask_tolerance: int = DEFAULT_MASK_TOLERANCE,
                 source_magnification: str | None = None) -> Iterator[RegionRecord]:
    """Records of SICAPv2 (layout and conventions in the module docstring), in spreadsheet-name order, train first.

    Each record: image uint8 (512, 512, 3); region_map int32 (512, 512) with values 0..K-1 of ``labels`` (default
    non-cancer, GG3, GG4, GG5); split from the partition; magnification ``source_magnification`` or 10x; meta: the
    patch's spreadsheet labels (NC, G3, G4, G5, G4C), ``partition``, ``unlisted`` (images the partition leaves out).
    ``label_map``: :func:`~histosynth.data.gleason.labels.parse_label_map`'s result (overrides value by value).

    Checked now (before any pixel is read): folders, both spreadsheets, an image listed twice, a listed image or its
    mask missing. Raised while iterating: a mask whose size differs from its image, a value the mapping does not
    place. All are DataErrors naming the file (HistosynthError for a bad option).
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError("SICAPv2 folder not found" if not src.exists() else "not a folder", src)
    names = parse_labels(None) if labels is None else tuple(labels)
    mapping = build_mapping(SICAP_DEFAULT_MAP, label_map, names)
    images_dir, masks_dir = child_dir(src, "images"), child_dir(src, "masks")
    if images_dir is None or masks_dir is None:
        raise DataError("a SICAPv2 folder holds images/ and masks/ (and partition/)", src)
    images = {p.stem: p for p in list_images(images_dir)}
    masks = {p.stem: p for p in list_images(masks_dir)}
    listed: dict[str, tuple[str, dict, Path]] = {}
    for split, sheet in _partition_files(src, partition).items():
        for row in read_xlsx_rows(sheet, "image_name"):
            if row.get("image_name") is None or not str(row["image_name"]).strip():
                continue
            stem = _stem(row["image_name"])
            if stem in listed:
                other = listed[stem][2]
                where = "twice in it" if other == sheet else f"also in {other}"
                raise DataError(f"image {stem} is listed {where}: a partition puts each patch in one split", sheet)
            if stem not in images:
                raise DataError(f"lists {row['image_name']}, which is not in {images_dir}", sheet)
            if stem not in masks:
                raise DataError(f"no mask for this image in {masks_dir} ({masks_dir.name}/{stem}.jpg)", images[stem])
            grades = {c: row[c] for c in GRADE_COLUMNS if c in row and row[c] is not None}
            listed[stem] = (split, grades, sheet)
    if not listed:
        raise DataError(f"the {partition} partition lists no image", src)
    order = sorted(listed, key=lambda s: (listed[s][0] != "train", s))
    unlisted = len(set(images) - set(listed))
    magnification = source_magnification or SICAP_MAGNIFICATION
    return _records(order, listed, images, masks, mapping, int(mask_tolerance), magnification,
                    str(partition).lower(), unlisted)


def slide_of(stem: str) -> str:
    """The slide of a SICAPv2 patch from its file name ("16B0001851_Block_Region_1_..." → "16B0001851")."""
    return stem.split("_Block")[0] if "_Block" in stem else stem.split("_")[0]


def _records(order, listed, images, masks, mapping: LabelMapping, tolerance: int, magnification: str,
             partition: str, unlisted: int) -> Iterator[RegionRecord]:
    for stem in order:
        split, grades, _ = listed[stem]
        image = read_rgb(images[stem])
        mask_path = masks[stem]
        native = _read_mask(mask_path, tolerance)
        if native.shape != image.shape[:2]:
            raise DataError(f"mask is {native.shape[0]}x{native.shape[1]} px, its image {image.shape[0]}x"
                            f"{image.shape[1]} px: a region mask must cover its image pixel for pixel", mask_path)
        if mask_path.suffix.lower() in LOSSY_SUFFIXES:
            native = snap_to_values(native, mapping.names, tolerance)
        region = mapping.apply(native, mask_path)
        yield RegionRecord(image=image, region_map=region, class_names=mapping.labels, source=str(images[stem]),
                           split=split, magnification=magnification,
                           meta={"partition": partition, "labels": grades, "unlisted": unlisted,
                                 "slide": slide_of(stem)})
