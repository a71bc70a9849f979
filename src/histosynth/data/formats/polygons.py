"""Polygon annotations: QuPath / GeoJSON exports and HoVer-Net's JSON output, rasterised into label maps.

Layout: a folder of images (``NAME.png|jpg|tif``, flat or in ``images/``), each with one annotation file
``NAME.geojson`` or ``NAME.json`` beside it or in ``annotations/``, ``geojson/`` or ``json/`` (HoVer-Net writes
``json/``). The class list (type ids 1..K in order) is ``classes.txt`` (one name per line) or the ``class_names``
option. Which file kind an annotation is follows from its content, not its extension:

- **GeoJSON** (QuPath's *Export objects as GeoJSON*, or any tool's): a ``FeatureCollection``, a list of ``Feature``s
  or one ``Feature``. A feature's geometry is its ``nucleusGeometry`` when it has one (a QuPath cell: the nucleus,
  not the cell boundary), else its ``geometry``; ``Polygon`` (holes allowed), ``MultiPolygon`` or a
  ``GeometryCollection`` of them. QuPath's nested ``properties.childObjects`` are read too. The class is
  ``properties.classification.name`` (QuPath; a derived class ``classification.names`` is joined as QuPath
  writes it, ``"Tumor: Positive"``), else ``properties.classification`` when it is a string, else
  ``properties.class``, else ``properties.label``; a feature with none of them is *unclassified*.
- **HoVer-Net** (``{"mag": 40, "nuc": {"1": {"contour": [[x, y], ...], "type": 2, ...}, ...}}``): one nucleus per
  entry of ``nuc``; its class is its integer ``type`` (``null`` when HoVer-Net ran without types: unclassified).
  ``mag`` gives the magnification when the ``magnification`` option does not.

**Classes.** Every annotation class must end up as one of the classes or be dropped, else reading stops (before any
image is rasterised) with an error naming the annotation file, the object and the class. A name is looked up in
``class_map`` first (``{annotation name: class or "drop"}``, an inline ``"Tumor=neoplastic,Region*=drop"``-style
string or a YAML/JSON file, as ``prepare --class-map``), then among the classes by its own name. Unclassified
objects go through the name ``unclassified`` (``class_map={"unclassified": "nucleus"}``). A HoVer-Net type ``k`` is
looked up as the name ``"k"`` in ``class_map``, then through HoVer-Net's ``type_info.json`` when the folder has one
(``{"1": ["neopla", [255, 0, 0]], ...}``: ``k`` → its name, then looked up as a name), else type ``k`` is class
``k`` (line ``k`` of classes.txt, as in the folder format); HoVer-Net's type 0 ("no label") must be mapped.
Dropped objects are skipped before their geometry is looked at; a kept object whose geometry outlines no area (a
``Point``, a ``LineString``, no geometry) is an error (map its class to ``drop`` if it is not a nucleus).

**Pixel convention.** GeoJSON coordinates are pixel-corner based, QuPath's convention: x to the right, y down,
in pixels of the full-resolution image it annotates, origin at the top-left *corner* of the top-left pixel; pixel
(row r, column c) is the unit square [c, c+1] x [r, r+1], its centre (c + 0.5, r + 0.5). A pixel belongs to a
polygon when its centre lies inside it; a centre exactly on an outer outline counts as inside, one exactly on a
hole's outline as in the hole (``skimage.draw.polygon`` on each ring). So the unit square (0,0)-(1,1) is exactly
pixel (0, 0). HoVer-Net's contours are OpenCV contours, i.e. the *pixel indices* of the nucleus' own edge pixels;
they are shifted by +0.5 into the corner convention, so that those edge pixels (centres on the outline) are in,
which reproduces HoVer-Net's own filled-contour masks.

**Objects → nuclei.** Each polygon is one nucleus: a ``MultiPolygon``'s parts are separate nuclei of the same class
(an instance map holds connected nuclei). An invalid polygon (self-intersecting, a hole touching its shell) is
repaired with ``shapely.make_valid`` and stays one nucleus. Polygons of (near) zero area and those lying wholly
outside the image are skipped and counted (``record.meta``); when at least half of a file's polygons lie outside
its image, the coordinates are in another frame (the whole slide, another resolution) and reading stops.

**Overlaps: the smaller polygon wins.** Where polygons overlap, a pixel goes to the polygon of smallest area (equal
areas: the one later in the file). Why this rule and not file order: neither QuPath's export order (hierarchy
order) nor HoVer-Net's ids mean a drawing order, so "later wins" would depend on an accident of the export; and
giving the shared pixels to the smaller nucleus keeps both nuclei as whole as possible relative to their size (the
larger one loses the smaller share of its area), and a large outline left in by mistake cannot swallow the nuclei
drawn inside it. A nucleus whose remaining pixels fall into several 8-connected pieces (cut through by a smaller
one, or a neck thinner than a pixel) keeps its largest piece; a nucleus left with no pixel (inside a smaller one,
or smaller than a pixel) disappears. Instance ids are then 1..n in file order of the surviving polygons.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from histosynth.data.class_mapping import DROP, parse_class_list, parse_class_map
from histosynth.data.formats.annotation_files import AnnotatedObject, Annotation, load_json, parse_annotation
from histosynth.data.io import child_dir, list_images, read_rgb, validate_record
from histosynth.data.record import NucleiRecord
from histosynth.errors import DataError

__all__ = ["ANNOTATION_DIRS", "UNCLASSIFIED", "ClassResolver", "parse_annotation", "rasterize_polygons", "read_polygons"]

ANNOTATION_EXTS = (".geojson", ".json")
ANNOTATION_DIRS = ("annotations", "geojson", "json")  # searched after the image's own folder
UNCLASSIFIED = "unclassified"  # the name an object without a class is looked up by
MIN_AREA = 1e-9  # polygons of smaller area (px²) are degenerate: skipped
_POLYGONAL = ("Polygon", "MultiPolygon", "GeometryCollection")


# ---------------------------------------------------------------- the reader


def read_polygons(
    src: str | Path, class_names: Sequence[str] | None = None, class_map: Mapping | str | None = None,
    magnification: str | None = None, relabel_components: bool = False,
) -> Iterator[NucleiRecord]:
    """Stream images with instance and type maps rasterised from their polygon annotations (see the module).

    ``class_names`` overrides classes.txt (one of them is required); ``class_map`` maps annotation class names (and
    HoVer-Net type ids as strings) onto them or to ``drop``: a mapping, inline ``"a=b,c=drop"`` or a YAML/JSON file
    (a relative path is relative to the working directory); ``magnification`` of the images (else HoVer-Net's
    ``mag``, else unknown). Every annotation file is found and its classes checked when called, so a dataset with
    a missing file or an unknown class fails before any work. ``relabel_components``: see
    :func:`histosynth.data.io.validate_record` (the maps made here have no split ids).
    """
    src = Path(src)
    if not src.is_dir():
        raise DataError("source folder not found", src)
    classes = _class_list(src, class_names)
    mapping = parse_class_map(class_map, "class_map", src) if class_map is not None else {}
    for name, target in mapping.items():
        if target is not None and target not in classes:
            raise DataError(f"class_map: {name!r} maps to {target!r}, which is not one of the classes "
                            f"({', '.join(classes)}) nor '{DROP}'", src)
    resolver = ClassResolver(classes, mapping, _type_info(src))
    items = _pairs(src)
    for _, annotation in items:
        parsed = parse_annotation(annotation)
        for obj in parsed.objects:  # every class and geometry kind checked before any image is read
            if resolver.type_of(obj.label, annotation, obj.where) and not _short_contour(parsed, obj):
                check_geometry_kind(obj, annotation)
    return _records(items, resolver, magnification, relabel_components)


def _records(items, resolver, magnification, relabel_components) -> Iterator[NucleiRecord]:
    for image_path, annotation in items:
        image = read_rgb(image_path)
        parsed = parse_annotation(annotation)
        inst, typ, counts = rasterize_polygons(parsed, image.shape[:2], resolver, annotation)
        mag = magnification if magnification is not None else parsed.magnification
        record = NucleiRecord(
            image=image, inst_map=inst, type_map=typ, class_names=resolver.classes, source=str(image_path),
            split=None, magnification=mag, meta={"annotation": str(annotation), **counts},
        )
        yield validate_record(record, label_path=annotation, relabel_components=relabel_components)


def _class_list(src: Path, class_names: Sequence[str] | None) -> tuple[str, ...]:
    if class_names is not None:
        names = class_names if isinstance(class_names, str) else list(class_names)  # "a,b,c" or a list
        return parse_class_list(names, "class_names", src)
    path = src / "classes.txt"
    if not path.is_file():
        raise DataError("classes.txt missing: add it (one class name per line, line k is type id k) "
                        "or pass class_names", path)
    try:
        names = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"cannot read class names: {err}", path) from None
    while names and not names[-1]:
        names.pop()
    return parse_class_list(names, "classes.txt", path)


def _type_info(src: Path) -> dict[int, str] | None:
    """HoVer-Net's ``type_info.json`` (``{"k": [name, colour]}``) as ``{k: name}``, if the folder has one."""
    path = src / "type_info.json"
    if not path.is_file():
        return None
    data = load_json(path)
    try:
        return {int(k): str(v[0] if isinstance(v, (list, tuple)) else v) for k, v in data.items()}
    except (AttributeError, ValueError, TypeError, IndexError):
        raise DataError('type_info.json must map type ids to [name, colour] ({"1": ["neopla", [255, 0, 0]]})',
                        path) from None


def _pairs(src: Path) -> list[tuple[Path, Path]]:
    """(image, its annotation file), flat or with images/; an image without one is an error naming the file."""
    images_dir = child_dir(src, "images")
    images = list_images(images_dir if images_dir is not None else src)
    if not images:
        raise DataError("no images (.png/.jpg/.jpeg/.tif/.tiff) found in this folder or its images/ folder", src)
    folders = [images_dir or src, *(d for d in (child_dir(src, n) for n in ANNOTATION_DIRS) if d is not None)]
    if images_dir is not None:
        folders.insert(1, src)
    pairs = []
    for image in images:
        found = [f / f"{image.stem}{ext}" for f in folders for ext in ANNOTATION_EXTS
                 if (f / f"{image.stem}{ext}").is_file()]
        if not found:
            raise DataError(f"annotation file missing for image {image.name} (looked for {image.stem}.geojson "
                            f"and {image.stem}.json here and in {'/, '.join(ANNOTATION_DIRS)}/)",
                            folders[0] / f"{image.stem}.geojson")
        if len(found) > 1:
            raise DataError(f"several annotation files for image {image.name}: "
                            f"{', '.join(str(p) for p in found)}; keep one", found[0])
        pairs.append((image, found[0]))
    return pairs


# ---------------------------------------------------------------- classes


class ClassResolver:
    """Annotation classes → type ids 1..K of ``classes`` or 0 (dropped); the rules are the module docstring's."""

    def __init__(self, classes: Sequence[str], class_map: Mapping[str, str | None] | None = None,
                 type_info: Mapping[int, str] | None = None):
        self.classes = tuple(classes)
        self.class_map = dict(class_map or {})
        self.type_info = dict(type_info) if type_info else None

    def type_of(self, label: str | int | None, path: Path, where: str) -> int:
        """Type id of ``label`` (0: dropped); DataError naming ``path``, ``where`` and the class otherwise."""
        if label is None:
            return self._name(UNCLASSIFIED, path, where, unclassified=True)
        if isinstance(label, int):
            key = str(label)
            if key in self.class_map:
                return self._name(key, path, where)
            if self.type_info is not None and label in self.type_info:
                return self._name(self.type_info[label], path, where, hovernet=label)
            if 1 <= label <= len(self.classes):
                return label
            listed = ", ".join(f"{i}={n}" for i, n in enumerate(self.classes, 1))
            raise DataError(
                f"{where}: HoVer-Net type {label} is not a class (type k is class k: {listed}"
                f"{'; not in type_info.json either' if self.type_info is not None else ''}); "
                f"map it with class_map ('{label}=CLASS' or '{label}={DROP}')", path,
            )
        return self._name(label, path, where)

    def _name(self, name: str, path: Path, where: str, unclassified: bool = False, hovernet: int | None = None) -> int:
        if name in self.class_map:
            target = self.class_map[name]
            return 0 if target is None else self.classes.index(target) + 1
        if name in self.classes:
            return self.classes.index(name) + 1
        if unclassified:
            what = ("has no class (HoVer-Net type null)" if where.startswith("nucleus") else
                    "has no class (no properties.classification.name, classification, class or label)")
        elif hovernet is not None:
            what = f"has HoVer-Net type {hovernet}, {name!r} in type_info.json,"
        else:
            what = f"has class {name!r},"
        raise DataError(f"{where} {what} which is neither one of the classes ({', '.join(self.classes)}) nor in "
                        f"class_map; map it ('{name}=CLASS') or drop it ('{name}={DROP}')", path)


def _short_contour(annotation: Annotation, obj: AnnotatedObject) -> bool:
    """A HoVer-Net contour of fewer than 3 points (HoVer-Net itself skips these): degenerate, not an error."""
    return annotation.kind == "hovernet" and obj.geometry is None


def check_geometry_kind(obj: AnnotatedObject, path: Path) -> None:
    """DataError naming the object unless its geometry can outline a nucleus (Polygon, MultiPolygon, a collection)."""
    geometry = obj.geometry
    if not isinstance(geometry, Mapping) or not geometry.get("type"):
        raise DataError(f"{obj.where} has no geometry; only polygons outline nuclei (map its class to '{DROP}' "
                        "if it is not one)", path)
    if geometry["type"] not in _POLYGONAL:
        raise DataError(f"{obj.where} is a {geometry['type']}, which outlines no pixels; only Polygon / "
                        f"MultiPolygon outline nuclei (remove it, or map its class to '{DROP}')", path)


# ---------------------------------------------------------------- rasterisation


def _polygons(geometry: Mapping, path: Path, where: str) -> list[list]:
    """The nuclei of one object's (polygonal) geometry, each a group of shapely Polygons: a MultiPolygon's parts
    are separate groups; an invalid polygon is repaired (``shapely.make_valid``) into one group."""
    import shapely
    from shapely.errors import ShapelyError
    from shapely.geometry import shape

    kind = geometry["type"]
    try:
        geom = shape(geometry)
    except (ValueError, TypeError, KeyError, IndexError, ShapelyError) as err:  # malformed coordinates
        raise DataError(f"{where}: malformed {kind} coordinates: {err}", path) from None
    if not geom.is_empty and not all(math.isfinite(b) for b in geom.bounds):
        raise DataError(f"{where}: coordinates are not finite", path)
    groups = []
    for part in getattr(geom, "geoms", [geom]):
        if part.geom_type == "GeometryCollection" or part.geom_type == "MultiPolygon":
            groups.extend(_polygons(part.__geo_interface__, path, where))
            continue
        if part.geom_type != "Polygon":
            raise DataError(f"{where} holds a {part.geom_type}, which outlines no pixels", path)
        if part.is_empty:
            continue
        if not part.is_valid:
            fixed = shapely.make_valid(part)
            parts = [g for g in getattr(fixed, "geoms", [fixed]) if g.geom_type in ("Polygon", "MultiPolygon")]
            part = [p for g in parts for p in getattr(g, "geoms", [g])]
        else:
            part = [part]
        groups.append(part)
    return groups


def _ring_pixels(coords, r0: int, c0: int, shape: tuple[int, int]):
    from skimage.draw import polygon

    xy = np.asarray(coords, dtype=np.float64)[:, :2]
    # pixel (r, c) has its centre at (c + 0.5, r + 0.5); skimage puts centres at integer (r, c)
    return polygon(xy[:, 1] - 0.5 - r0, xy[:, 0] - 0.5 - c0, shape)


def _raster(group: list, height: int, width: int):
    """(r0, c0, mask) of the pixels whose centre is in the group's polygons, clipped to the image; None if none."""
    minx = min(p.bounds[0] for p in group)
    miny = min(p.bounds[1] for p in group)
    maxx = max(p.bounds[2] for p in group)
    maxy = max(p.bounds[3] for p in group)
    r0, r1 = max(math.floor(miny - 0.5), 0), min(math.ceil(maxy - 0.5) + 1, height)
    c0, c1 = max(math.floor(minx - 0.5), 0), min(math.ceil(maxx - 0.5) + 1, width)
    if r0 >= r1 or c0 >= c1:
        return None
    shape = (r1 - r0, c1 - c0)
    mask = np.zeros(shape, dtype=bool)
    for poly in group:
        own = np.zeros(shape, dtype=bool)
        rr, cc = _ring_pixels(poly.exterior.coords, r0, c0, shape)
        own[rr, cc] = True
        for hole in poly.interiors:
            rr, cc = _ring_pixels(hole.coords, r0, c0, shape)
            own[rr, cc] = False
        mask |= own
    return (r0, c0, mask) if mask.any() else None


def rasterize_polygons(annotation: Annotation, shape: tuple[int, int], resolver: ClassResolver,
                       path: str | Path) -> tuple[np.ndarray, np.ndarray, dict]:
    """(instance map, type map, counts) of ``annotation`` on an image of ``shape`` (H, W); see the module docstring
    for the pixel convention, the overlap rule (smaller polygon wins) and what is skipped.

    counts: ``polygons`` (kept polygons), ``nuclei`` (instances in the maps), ``dropped`` (objects of a dropped
    class), ``degenerate`` (zero-area polygons), ``outside`` (wholly outside the image), ``no_pixels`` (inside the
    image but covering no pixel centre), ``covered`` (every pixel taken by smaller polygons), ``cut_off_pixels``
    (pixels of pieces cut off a nucleus, see the module).
    """
    from scipy import ndimage

    path = Path(path)
    height, width = shape
    counts = dict.fromkeys(("polygons", "nuclei", "dropped", "degenerate", "outside", "no_pixels", "covered",
                            "cut_off_pixels"), 0)
    polys = []  # (area, order, type id, group)
    for obj in annotation.objects:
        type_id = resolver.type_of(obj.label, path, obj.where)
        if type_id == 0:
            counts["dropped"] += 1
            continue
        if _short_contour(annotation, obj):
            counts["degenerate"] += 1
            continue
        check_geometry_kind(obj, path)
        for group in _polygons(obj.geometry, path, obj.where):
            area = sum(p.area for p in group)
            if area <= MIN_AREA:
                counts["degenerate"] += 1
                continue
            polys.append((area, len(polys), type_id, group))
    counts["polygons"] = len(polys)
    outside = [p for p in polys if not _overlaps_image(p[3], height, width)]
    counts["outside"] = len(outside)
    if outside and 2 * len(outside) >= len(polys):
        b = np.array([g.bounds for p in polys for g in p[3]])
        bounds = (*b[:, :2].min(0), *b[:, 2:].max(0))
        raise DataError(
            f"{len(outside)} of {len(polys)} polygons lie wholly outside the {width}x{height} (WxH) image: the "
            f"annotations span x {bounds[0]:g}..{bounds[2]:g}, y {bounds[1]:g}..{bounds[3]:g}; their coordinates "
            "are in another frame than this image (the whole slide, or another resolution): export them for this "
            "image, in its pixels", path,
        )
    inst = np.zeros(shape, dtype=np.int32)
    type_of = np.zeros(len(polys) + 1, dtype=np.int32)
    painted = np.zeros(len(polys) + 1, dtype=bool)
    # paint the largest first, so that smaller polygons overwrite it; equal areas: later in the file on top
    for area, order, type_id, group in sorted(polys, key=lambda p: (-p[0], p[1])):
        raster = _raster(group, height, width)
        if raster is None:
            continue
        r0, c0, mask = raster
        inst[r0:r0 + mask.shape[0], c0:c0 + mask.shape[1]][mask] = order + 1
        type_of[order + 1] = type_id
        painted[order + 1] = True
    eight = np.ones((3, 3), dtype=bool)
    for i, box in enumerate(ndimage.find_objects(inst), 1):
        if box is None:
            continue
        own = inst[box] == i
        pieces, n = ndimage.label(own, structure=eight)
        if n > 1:
            sizes = np.bincount(pieces.ravel())
            sizes[0] = 0
            cut = own & (pieces != int(np.argmax(sizes)))
            counts["cut_off_pixels"] += int(cut.sum())
            inst[box][cut] = 0
    present = np.zeros(len(polys) + 1, dtype=bool)
    present[np.unique(inst)] = True
    present[0] = False
    counts["no_pixels"] = int((~painted[1:]).sum()) - len(outside)
    counts["covered"] = int((painted & ~present).sum())
    counts["nuclei"] = int(present.sum())
    renumber = np.zeros(len(polys) + 1, dtype=np.int32)
    renumber[present] = np.arange(1, counts["nuclei"] + 1, dtype=np.int32)
    type_map = type_of[inst]
    return renumber[inst], type_map, counts


def _overlaps_image(group: list, height: int, width: int) -> bool:
    return any(p.bounds[0] < width and p.bounds[2] > 0 and p.bounds[1] < height and p.bounds[3] > 0 for p in group)
