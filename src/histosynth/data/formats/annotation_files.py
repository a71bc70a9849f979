"""Reading the annotation files of the polygon reader (:mod:`histosynth.data.formats.polygons`): GeoJSON (QuPath
exports: Feature / FeatureCollection / bare geometries, the class in ``properties.classification``) and HoVer-Net
JSON (``nuc`` → ``contour`` + ``type``), told apart by content, into one list of :class:`AnnotatedObject`."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histosynth.errors import DataError

__all__ = ["AnnotatedObject", "Annotation", "load_json", "parse_annotation"]


@dataclass
class AnnotatedObject:
    """One annotated object: its class (a name, a HoVer-Net type id, or None: unclassified), its geometry as a
    GeoJSON-like mapping in the pixel-corner convention, and how to name it in errors."""

    label: str | int | None
    geometry: Mapping | None
    where: str


@dataclass
class Annotation:
    kind: str  # "geojson" or "hovernet"
    objects: list[AnnotatedObject]
    magnification: str | None = None


def load_json(path: Path):
    """A JSON file's content; DataError naming the file when it cannot be read or parsed."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"cannot read JSON: {err}", path) from None


def parse_annotation(path: str | Path) -> Annotation:
    """The objects of a GeoJSON or HoVer-Net JSON file (told apart by content); DataError naming the file."""
    path = Path(path)
    data = load_json(path)
    if isinstance(data, dict) and isinstance(data.get("nuc"), dict):
        return _hovernet(data, path)
    if isinstance(data, dict) and (data.get("type") == "FeatureCollection" or isinstance(data.get("features"), list)):
        features = data.get("features")
        if not isinstance(features, list):
            raise DataError("FeatureCollection without a 'features' list", path)
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        raise DataError("neither GeoJSON (a FeatureCollection, a list of Features or a Feature) nor HoVer-Net "
                        "JSON (a 'nuc' mapping of nucleus id to contour and type)", path)
    objects: list[AnnotatedObject] = []
    _features(features, path, "feature ", objects)
    return Annotation("geojson", objects)


def _features(features: list, path: Path, prefix: str, out: list[AnnotatedObject]) -> None:
    for i, feature in enumerate(features):
        where = f"{prefix}{i}"
        if not isinstance(feature, dict) or ("geometry" not in feature and "nucleusGeometry" not in feature):
            raise DataError(f"{where} is not a GeoJSON Feature (no 'geometry')", path)
        if feature.get("id") is not None:
            where += f" (id {feature['id']})"
        props = feature.get("properties") or {}
        if not isinstance(props, dict):
            raise DataError(f"{where}: 'properties' is not an object", path)
        geometry = feature.get("nucleusGeometry") or feature.get("geometry")
        out.append(AnnotatedObject(_geojson_label(props, path, where), geometry, where))
        children = props.get("childObjects")
        if isinstance(children, list) and children:
            _features(children, path, f"{where} child ", out)


def _geojson_label(props: dict, path: Path, where: str) -> str | None:
    """QuPath's ``classification.name`` (``names`` joined by ': '), or ``classification`` / ``class`` / ``label``."""
    cls = props.get("classification")
    if isinstance(cls, dict):
        if isinstance(cls.get("name"), str):
            return cls["name"]
        names = cls.get("names")
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            return ": ".join(names)
        raise DataError(f"{where}: properties.classification has no 'name' (nor 'names')", path)
    if isinstance(cls, str):
        return cls
    for key in ("class", "label"):
        value = props.get(key)
        if isinstance(value, (str, int)) and not isinstance(value, bool):
            return str(value)
    return None


def _hovernet(data: dict, path: Path) -> Annotation:
    objects = []
    for nid, nucleus in data["nuc"].items():
        where = f"nucleus {nid}"
        if not isinstance(nucleus, dict) or "contour" not in nucleus:
            raise DataError(f"{where} has no 'contour'", path)
        label = nucleus.get("type")
        if label is not None and (isinstance(label, bool) or not isinstance(label, (int, float))
                                  or label != int(label)):
            raise DataError(f"{where}: 'type' must be an integer type id, got {label!r}", path)
        contour = _coords(nucleus["contour"], path, where)
        if contour.ndim != 2 or contour.shape[1] != 2:
            raise DataError(f"{where}: 'contour' must be a list of [x, y] points", path)
        ring = (contour + 0.5).tolist()  # OpenCV contour = pixel indices of the edge pixels → pixel corners
        geometry = {"type": "Polygon", "coordinates": [ring + ring[:1]]} if len(ring) >= 3 else None
        objects.append(AnnotatedObject(None if label is None else int(label), geometry, where))
    return Annotation("hovernet", objects, _magnification(data.get("mag"), path))


def _magnification(mag, path: Path) -> str | None:
    if mag is None:
        return None
    if isinstance(mag, (int, float)) and not isinstance(mag, bool) and math.isfinite(mag) and mag > 0:
        return f"{mag:g}x"
    raise DataError(f"'mag' must be the objective magnification (e.g. 40), got {mag!r}", path)


def _coords(value, path: Path, where: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{where}: coordinates are not numbers", path) from None
    if not np.isfinite(arr).all():
        raise DataError(f"{where}: coordinates are not finite", path)
    return arr
