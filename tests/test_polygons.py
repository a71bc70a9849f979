"""Polygon annotations (QuPath / GeoJSON, HoVer-Net JSON) rasterised into instance and type maps.

Hand-made polygons are checked against masks computed another way (numpy slices by hand, GEOS point-in-polygon at
the pixel centres); the bundled HGSC region goes instance map → contours → GeoJSON → reader → instance map.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import MultiPolygon, Polygon, mapping

from histosynth.data.formats.polygons import read_polygons
from histosynth.data.io import read_label_png
from histosynth.errors import DataError

HGSC = Path(__file__).resolve().parents[1] / "src" / "histosynth" / "assets" / "hgsc"
CLASSES = ("neoplastic", "inflammatory", "connective")


def square(x0, y0, x1, y1) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(geometry, cls: str | None = "neoplastic", **extra) -> dict:
    props = {"objectType": "annotation"}
    if cls is not None:
        props["classification"] = {"name": cls, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": props, **extra}


def poly(*rings) -> dict:
    return {"type": "Polygon", "coordinates": [list(r) for r in rings]}


def dataset(tmp_path: Path, annotation, h=12, w=12, name="img", ext=".geojson", classes=CLASSES) -> Path:
    """A folder with one random RGB image, its annotation file and classes.txt."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / f"{name}{ext}").write_text(json.dumps(annotation))
    if classes is not None:
        (tmp_path / "classes.txt").write_text("\n".join(classes) + "\n")
    return tmp_path


def read_one(src: Path, **options):
    records = list(read_polygons(src, **options))
    assert len(records) == 1
    return records[0]


def collection(*features) -> dict:
    return {"type": "FeatureCollection", "features": list(features)}


# ---------------------------------------------------------------- the pixel convention


def test_unit_square_is_exactly_one_pixel_corner_based(tmp_path):
    """(0,0)-(1,1) is pixel (row 0, col 0); x is the column (right), y the row (down)."""
    rec = read_one(dataset(tmp_path, collection(
        feature(poly(square(0, 0, 1, 1))),
        feature(poly(square(5, 2, 6, 3)), "connective"),  # x 5..6, y 2..3: row 2, column 5
        feature(poly(square(1, 7, 4, 9)), "inflammatory"),  # a 3-wide, 2-high rectangle: rows 7-8, columns 1-3
    )))
    expected = np.zeros((12, 12), np.int32)
    expected[0, 0] = 1
    expected[2, 5] = 2
    expected[7:9, 1:4] = 3
    np.testing.assert_array_equal(rec.inst_map, expected)
    np.testing.assert_array_equal(rec.type_map, np.array([0, 1, 3, 2])[expected])
    assert rec.class_names == CLASSES and rec.source.endswith("img.png")
    assert rec.meta["nuclei"] == 3 and rec.meta["annotation"].endswith("img.geojson")


def test_polygon_with_a_hole(tmp_path):
    rec = read_one(dataset(tmp_path, [feature(poly(square(1, 1, 11, 10), square(4, 3, 8, 7)))]))
    expected = np.zeros((12, 12), np.int32)
    expected[1:10, 1:11] = 1
    expected[3:7, 4:8] = 0
    np.testing.assert_array_equal(rec.inst_map, expected)


def test_star_with_a_hole_matches_point_in_polygon_at_pixel_centres(tmp_path):
    """An irregular polygon with a hole (coordinates off the half-pixel grid): the mask is exactly the pixels whose
    centre (c + 0.5, r + 0.5) GEOS finds inside, an independent point-in-polygon."""
    t = np.linspace(0, 2 * np.pi, 15, endpoint=False)
    radius = np.where(np.arange(15) % 2 == 0, 17.3, 8.1)
    outer = np.c_[20.13 + radius * np.cos(t), 19.71 + radius * np.sin(t)]
    hole = np.c_[20.13 + 3.37 * np.cos(t[::-1]), 19.71 + 3.37 * np.sin(t[::-1])]
    star = Polygon(outer, [hole])
    assert star.is_valid
    rec = read_one(dataset(tmp_path, [feature(mapping(star))], h=40, w=40))
    rows, cols = np.mgrid[0:40, 0:40]
    expected = shapely.contains_xy(star, cols + 0.5, rows + 0.5)
    np.testing.assert_array_equal(rec.inst_map > 0, expected)
    assert expected.sum() > 300 and not expected[19, 20]  # the hole is empty


def test_multipolygon_parts_are_separate_nuclei_of_one_class(tmp_path):
    mp = MultiPolygon([Polygon(square(0, 0, 3, 3)), Polygon(square(6, 6, 9, 8))])
    rec = read_one(dataset(tmp_path, [feature(mapping(mp), "inflammatory")]))
    expected = np.zeros((12, 12), np.int32)
    expected[0:3, 0:3] = 1
    expected[6:8, 6:9] = 2
    np.testing.assert_array_equal(rec.inst_map, expected)
    np.testing.assert_array_equal(rec.type_map, np.where(expected > 0, 2, 0))


def test_overlap_smaller_polygon_wins_whatever_the_file_order(tmp_path):
    big = feature(poly(square(0, 0, 7, 7)), "connective")
    small = feature(poly(square(5, 5, 9, 9)), "inflammatory")
    expected = np.zeros((12, 12), np.int32)
    expected[0:7, 0:7] = 1
    expected[5:9, 5:9] = 2
    for i, order in enumerate(([big, small], [small, big])):
        rec = read_one(dataset(tmp_path / str(i), order))
        typ = np.where(expected == 2, 2, np.where(expected == 1, 3, 0))
        np.testing.assert_array_equal(rec.type_map, typ)
        # ids are file order of the surviving polygons
        ids = expected if i == 0 else np.array([0, 2, 1])[expected]
        np.testing.assert_array_equal(rec.inst_map, ids)


def test_overlap_equal_areas_later_wins_and_covered_nuclei_disappear(tmp_path):
    first = feature(poly(square(0, 0, 4, 4)), "connective")
    second = feature(poly(square(2, 0, 6, 4)), "inflammatory")  # same area, later: takes columns 2-3
    inner = feature(poly(square(8, 8, 9, 9)), "neoplastic")  # one pixel, inside a smaller ring's footprint...
    tiny = feature(poly(square(8.2, 8.2, 8.4, 8.4)), "neoplastic")  # ...covered by nothing but covers no centre
    rec = read_one(dataset(tmp_path, [first, second, inner, tiny]))
    expected = np.zeros((12, 12), np.int32)
    expected[0:4, 0:2] = 1
    expected[0:4, 2:6] = 2
    expected[8, 8] = 3
    np.testing.assert_array_equal(rec.inst_map, expected)
    assert rec.meta["no_pixels"] == 1 and rec.meta["nuclei"] == 3

    over = [feature(poly(square(0, 0, 2, 2))), feature(poly(square(0, 0, 6, 6)), "connective"),
            feature(poly(square(0, 0, 2, 2)), "inflammatory")]  # the first is covered by its equal, later twin
    rec = read_one(dataset(tmp_path / "b", over))
    assert rec.meta["covered"] == 1 and rec.meta["nuclei"] == 2
    assert set(np.unique(rec.type_map[0:2, 0:2])) == {2}


def test_a_nucleus_cut_in_two_keeps_its_largest_piece(tmp_path):
    long = feature(poly(square(0, 0, 10, 3)), "connective")
    bar = feature(poly(square(3, 0, 4, 3)), "inflammatory")  # smaller: cuts the long one into 3 + 6 columns
    rec = read_one(dataset(tmp_path, [long, bar]))
    expected = np.zeros((12, 12), np.int32)
    expected[0:3, 4:10] = 1
    expected[0:3, 3] = 2
    np.testing.assert_array_equal(rec.inst_map, expected)
    assert rec.meta["cut_off_pixels"] == 9


def test_polygons_partly_outside_are_clipped(tmp_path):
    rec = read_one(dataset(tmp_path, [feature(poly(square(-3, -2, 2, 3))), feature(poly(square(10, 10, 15, 15))),
                                      feature(poly(square(4, 4, 6, 6)))]))
    expected = np.zeros((12, 12), np.int32)
    expected[0:3, 0:2] = 1
    expected[10:12, 10:12] = 2
    expected[4:6, 4:6] = 3
    np.testing.assert_array_equal(rec.inst_map, expected)


def test_self_intersecting_polygon_is_repaired_into_one_nucleus(tmp_path):
    """A bow-tie (the outline crosses itself at (3, 3)): shapely.make_valid makes two triangles of one nucleus; its
    pixels are those whose centre lies in the repaired polygon or on its outline (here the diagonals)."""
    bowtie = poly([[0, 0], [6, 6], [6, 0], [0, 6], [0, 0]])
    rec = read_one(dataset(tmp_path, [feature(bowtie)]))
    assert rec.meta["nuclei"] == 1 and rec.meta["cut_off_pixels"] == 0
    fixed = shapely.make_valid(Polygon(bowtie["coordinates"][0]))
    rows, cols = np.mgrid[0:12, 0:12]
    np.testing.assert_array_equal(rec.inst_map, shapely.intersects_xy(fixed, cols + 0.5, rows + 0.5))


# ---------------------------------------------------------------- QuPath and other GeoJSON dialects


def test_qupath_export_cells_derived_classes_children_and_other_class_keys(tmp_path):
    cell = {  # a QuPath cell: the nucleus is nucleusGeometry, the geometry is the whole cell
        "type": "Feature", "id": "c1", "geometry": poly(square(0, 0, 6, 6)),
        "nucleusGeometry": poly(square(1, 1, 3, 3)),
        "properties": {"objectType": "cell", "classification": {"names": ["Tumor", "Positive"], "color": [1, 2, 3]}},
    }
    region = {  # a region annotation with a nested child: the region is dropped, the child kept
        "type": "Feature", "geometry": poly(square(0, 0, 12, 12)),
        "properties": {"objectType": "annotation", "classification": {"name": "Region*"},
                       "childObjects": [feature(poly(square(8, 8, 10, 10)), "Immune cells")]},
    }
    plain = [
        {"type": "Feature", "geometry": poly(square(5, 0, 7, 2)), "properties": {"classification": "Stroma"}},
        {"type": "Feature", "geometry": poly(square(9, 0, 11, 2)), "properties": {"class": "Stroma"}},
        {"type": "Feature", "geometry": poly(square(0, 9, 2, 11)), "properties": {"label": "Immune cells"}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [4, 4]},
         "properties": {"classification": {"name": "Region*"}}},  # dropped: its geometry is never looked at
    ]
    class_map = "Tumor: Positive=neoplastic,Immune cells=inflammatory,Stroma=connective,Region*=drop"
    rec = read_one(dataset(tmp_path, [cell, region, *plain]), class_map=class_map)
    expected = np.zeros((12, 12), np.int32)
    expected[1:3, 1:3] = 1
    expected[8:10, 8:10] = 2
    expected[0:2, 5:7] = 3
    expected[0:2, 9:11] = 4
    expected[9:11, 0:2] = 5
    np.testing.assert_array_equal(rec.inst_map, expected)
    np.testing.assert_array_equal(rec.type_map, np.array([0, 1, 2, 3, 3, 2])[expected])
    assert rec.meta["dropped"] == 2


def test_class_names_option_and_map_file(tmp_path):
    src = dataset(tmp_path, collection(feature(poly(square(0, 0, 2, 2)), "Tumour"),
                                       feature(poly(square(3, 3, 5, 5)), None)), classes=None)
    (tmp_path / "map.yaml").write_text("Tumour: epithelial\nunclassified: other\n")
    rec = read_one(src, class_names=["epithelial", "other"], class_map=str(tmp_path / "map.yaml"))
    assert rec.class_names == ("epithelial", "other")
    assert read_one(src, class_names="epithelial,other", class_map={"Tumour": "epithelial", "unclassified": "drop"}).meta["nuclei"] == 1
    assert rec.type_map[0, 0] == 1 and rec.type_map[4, 4] == 2


def test_sub_folder_layout(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "annotations").mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "images" / "a.png")
    (tmp_path / "annotations" / "a.geojson").write_text(json.dumps([feature(poly(square(0, 0, 2, 2)))]))
    (tmp_path / "classes.txt").write_text("neoplastic\n")
    rec = read_one(tmp_path, magnification="20x")
    assert rec.inst_map.sum() == 4 and rec.magnification == "20x"


# ---------------------------------------------------------------- HoVer-Net


def test_hovernet_contours_are_pixel_indices_of_the_edge_pixels(tmp_path):
    """HoVer-Net's OpenCV contours run through the centres of the nucleus' own edge pixels, which are in."""
    disk = np.zeros((30, 30), bool)
    rr, cc = np.mgrid[0:30, 0:30]
    disk[(rr - 20) ** 2 + (cc - 19) ** 2 <= 5.3 ** 2] = True
    hull = shapely.MultiPoint(np.c_[cc[disk], rr[disk]]).convex_hull  # (x, y) = (column, row) of edge pixels
    data = {"mag": 40, "nuc": {
        "1": {"bbox": [[2, 3], [7, 8]], "centroid": [5, 4], "contour": [[3, 2], [7, 2], [7, 6], [3, 6]],
              "type_prob": 0.9, "type": 2},
        "2": {"contour": [[10, 1], [12, 3], [10, 5], [8, 3]], "type": 3},  # a diamond: |dr| + |dc| <= 2
        "3": {"contour": np.asarray(hull.exterior.coords)[:-1].tolist(), "type": 1},
        "4": {"contour": [[25, 25], [26, 25]], "type": 1},  # fewer than 3 points: skipped, as HoVer-Net does
    }}
    rec = read_one(dataset(tmp_path, data, h=30, w=30, ext=".json"))
    expected = np.zeros((30, 30), np.int32)
    expected[2:7, 3:8] = 1
    expected[(np.abs(rr - 3) + np.abs(cc - 10)) <= 2] = 2
    expected[disk] = 3
    np.testing.assert_array_equal(rec.inst_map, expected)
    np.testing.assert_array_equal(rec.type_map, np.array([0, 2, 3, 1])[expected])
    assert rec.magnification == "40x" and rec.meta["degenerate"] == 1


def test_hovernet_type_info_and_type_map(tmp_path):
    data = {"mag": None, "nuc": {"1": {"contour": [[0, 0], [2, 0], [2, 2], [0, 2]], "type": 1},
                                 "2": {"contour": [[5, 5], [7, 5], [7, 7], [5, 7]], "type": 0},
                                 "3": {"contour": [[9, 9], [10, 9], [10, 10]], "type": 4}}}
    src = dataset(tmp_path, data, ext=".json")
    (src / "type_info.json").write_text(json.dumps(
        {"0": ["nolabe", [0, 0, 0]], "1": ["neopla", [255, 0, 0]], "4": ["necros", [255, 255, 0]]}))
    rec = read_one(src, class_map={"neopla": "neoplastic", "0": "drop", "necros": "drop"})
    assert rec.magnification is None and rec.meta["dropped"] == 2
    assert set(np.unique(rec.inst_map)) == {0, 1} and rec.type_map[1, 1] == 1
    with pytest.raises(DataError, match=r"img\.json.*nucleus 2.*'nolabe'.*nolabe=drop"):
        list(read_polygons(src, class_map={"neopla": "neoplastic"}))


def test_hovernet_without_type_info_type_k_is_class_k_and_zero_must_be_mapped(tmp_path):
    data = {"nuc": {"1": {"contour": [[0, 0], [2, 0], [2, 2], [0, 2]], "type": 3},
                    "2": {"contour": [[5, 5], [7, 5], [7, 7], [5, 7]], "type": 0}}}
    src = dataset(tmp_path, data, ext=".json")
    with pytest.raises(DataError, match=r"img\.json.*HoVer-Net type 0.*'0=drop'"):
        read_polygons(src)  # fails when called, before any image is read
    rec = read_one(src, class_map={"0": "inflammatory"})
    assert rec.type_map[1, 1] == 3 and rec.type_map[6, 6] == 2


# ---------------------------------------------------------------- errors name the file and what to do


def test_unknown_class_names_the_file_and_the_name(tmp_path):
    src = dataset(tmp_path, [feature(poly(square(0, 0, 2, 2))), feature(poly(square(3, 3, 5, 5)), "Necrosis")])
    with pytest.raises(DataError, match=r"img\.geojson: feature 1 has class 'Necrosis'.*'Necrosis=drop'"):
        read_polygons(src)
    rec = read_one(src, class_map={"Necrosis": "drop"})
    assert rec.meta["nuclei"] == 1 and rec.meta["dropped"] == 1


def test_unclassified_objects_must_be_mapped(tmp_path):
    src = dataset(tmp_path, [feature(poly(square(0, 0, 2, 2)), None)])
    with pytest.raises(DataError, match=r"feature 0 has no class.*'unclassified=CLASS'"):
        read_polygons(src)
    assert read_one(src, class_map="unclassified=connective").type_map[0, 0] == 3


def test_bad_inputs(tmp_path):
    point = dataset(tmp_path / "point", [feature({"type": "Point", "coordinates": [1, 1]})])
    with pytest.raises(DataError, match=r"img\.geojson: feature 0 is a Point.*drop"):
        read_polygons(point)
    with pytest.raises(DataError, match=r"classes\.txt missing"):
        read_polygons(dataset(tmp_path / "nocls", [feature(poly(square(0, 0, 2, 2)))], classes=None))
    with pytest.raises(DataError, match="not one of the classes"):
        read_polygons(point, class_map="Tumor=epithelial")
    missing = dataset(tmp_path / "missing", [])
    (missing / "img.geojson").unlink()
    with pytest.raises(DataError, match=r"img\.geojson: annotation file missing for image img\.png"):
        read_polygons(missing)
    both = dataset(tmp_path / "both", [])
    (both / "img.json").write_text("[]")
    with pytest.raises(DataError, match="several annotation files"):
        read_polygons(both)
    broken = dataset(tmp_path / "broken", [])
    (broken / "img.geojson").write_text("{not json")
    with pytest.raises(DataError, match=r"img\.geojson: cannot read JSON"):
        read_polygons(broken)
    with pytest.raises(DataError, match="neither GeoJSON"):
        read_polygons(dataset(tmp_path / "other", {"shapes": []}))
    bad = dataset(tmp_path / "bad", [feature(poly([[0, 0], [1, "x"], [1, 1], [0, 0]]))])
    with pytest.raises(DataError, match=r"feature 0: malformed Polygon"):
        list(read_polygons(bad))
    # coordinates of the whole slide on an image of one region: refused, not rasterised into nothing
    slide = dataset(tmp_path / "slide", [feature(poly(square(5000 + i, 8000, 5003 + i, 8003))) for i in range(3)])
    with pytest.raises(DataError, match=r"3 of 3 polygons lie wholly outside the 12x12.*x 5000\.\.5005"):
        list(read_polygons(slide))


# ---------------------------------------------------------------- round trip on real tissue


def _nucleus_geometry(mask: np.ndarray, r0: int, c0: int):
    """Outline of a binary mask (crop at row r0, column c0) as a shapely geometry in pixel-corner coordinates:
    marching squares at level 0.5, contours combined even-odd so that holes stay holes."""
    from skimage.measure import find_contours

    padded = np.pad(mask, 1).astype(float)
    rings = [Polygon(np.c_[c[:, 1] + c0 - 1 + 0.5, c[:, 0] + r0 - 1 + 0.5])
             for c in find_contours(padded, 0.5, fully_connected="high") if len(c) >= 4]
    geom = rings[0]
    for ring in rings[1:]:
        geom = geom.symmetric_difference(ring)
    return geom


def test_hgsc_round_trip_through_geojson(tmp_path):
    from scipy import ndimage

    inst = read_label_png(HGSC / "hgsc_nest_inst.png")
    typ = read_label_png(HGSC / "hgsc_nest_type.png")
    names = (HGSC / "classes.txt").read_text().split()
    features = []
    ids = []
    for i, box in enumerate(ndimage.find_objects(inst), 1):
        if box is None:
            continue
        mask = inst[box] == i
        t = np.bincount(typ[box][mask], minlength=len(names) + 1)
        t[0] = 0
        cls = names[int(t.argmax()) - 1] if t.any() else None
        geom = _nucleus_geometry(mask, box[0].start, box[1].start)
        features.append(feature(mapping(geom), cls))
        ids.append(i)
    src = tmp_path / "hgsc"
    src.mkdir()
    shutil.copy(HGSC / "hgsc_nest.jpg", src / "hgsc_nest.jpg")
    shutil.copy(HGSC / "classes.txt", src / "classes.txt")
    (src / "hgsc_nest.geojson").write_text(json.dumps(collection(*features)))
    rec = read_one(src, class_map={"unclassified": "drop"})

    back = rec.inst_map
    # per original nucleus: IoU with the read-back nucleus that overlaps it most
    pairs = np.c_[inst.ravel(), back.ravel()]
    pairs = pairs[(pairs[:, 0] > 0) & (pairs[:, 1] > 0)]
    keys, inter = np.unique(pairs, axis=0, return_counts=True)
    area_a = np.bincount(inst.ravel(), minlength=inst.max() + 1)
    area_b = np.bincount(back.ravel(), minlength=back.max() + 1)
    best = np.zeros(inst.max() + 1)
    iou = inter / (area_a[keys[:, 0]] + area_b[keys[:, 1]] - inter)
    np.maximum.at(best, keys[:, 0], iou)
    best = best[ids]
    assert len(ids) == 1294 and rec.meta["nuclei"] == 1294
    assert best.min() >= 0.9, f"{(best < 0.9).sum()} nuclei below IoU 0.9"
    # contours at level 0.5 run between pixel centres: with the pixel-corner convention the round trip is exact
    assert (best == 1.0).mean() >= 0.99
    # types: every read-back nucleus has its original nucleus' majority type
    agree = (rec.type_map == typ) | (back == 0) | (inst == 0)
    assert agree.mean() > 0.999


def test_prepare_nuclei_reads_qupath_exports_with_polygon_classes(tmp_path):
    """`prepare nuclei --format polygons` with QuPath's own class names mapped by --polygon-classes: the store's
    nuclei counts are the polygons of each class (independent count), an unmapped class is a one-line error."""
    from click.testing import CliRunner

    from histosynth.cli import main
    from histosynth.data.store import PatchStore

    feats = [feature(poly(square(4 + 12 * i, 4, 12 + 12 * i, 12)), "Tumor") for i in range(5)]
    feats += [feature(poly(square(4 + 12 * i, 40, 10 + 12 * i, 46)), "Immune cells") for i in range(3)]
    feats.append(feature(poly(square(0, 60, 64, 64)), "Region*"))
    src = dataset(tmp_path / "qp", collection(*feats), h=64, w=64, classes=None)
    args = ["prepare", "nuclei", str(src), "--format", "polygons", "--class-names", "neoplastic,inflammatory",
            "--source-magnification", "20x", "--magnification", "20x", "--patch", "64", "--holdout", "0",
            "--out", str(tmp_path / "s")]
    r = CliRunner().invoke(main, args + ["--polygon-classes", "Tumor=neoplastic,Immune cells=inflammatory"])
    assert r.exit_code == 2 and "Region*" in r.output and "Traceback" not in r.output
    r = CliRunner().invoke(main, args + ["--polygon-classes", "Tumor=neoplastic,Immune cells=inflammatory,Region*=drop"])
    assert r.exit_code == 0, r.output
    store = PatchStore(tmp_path / "s")
    assert store.counts["train"]["nuclei"] == {"neoplastic": 5, "inflammatory": 3}
    r = CliRunner().invoke(main, ["prepare", "nuclei", str(src), "--format", "folder", "--polygon-classes", "a=b",
                                  "--out", str(tmp_path / "t")])
    assert r.exit_code == 2 and "--polygon-classes is an option of format polygons, not folder" in r.output
