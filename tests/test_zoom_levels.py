"""ZoomLDM data: patches at several magnifications on one base grid, each paired with its base region.

Geometry and pixels are checked against independent numpy computations on test-built slides (a pyramidal
TIFF with known content, PNG regions), and the patch counts of the real CMU-1 region when ../shared is there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

tiffslide = pytest.importorskip("tiffslide")
tifffile = pytest.importorskip("tifffile")

from histosynth.data import zoom_levels  # noqa: E402
from histosynth.data.patches import Patch  # noqa: E402
from histosynth.data.plain_image_slide import PlainImageSlide  # noqa: E402
from histosynth.data.slide_patches import plan_slide, prepare_slides  # noqa: E402
from histosynth.data.slides import open_slide, read_thumbnail, tissue_mask  # noqa: E402
from histosynth.data.store import PatchStore  # noqa: E402
from histosynth.data.store_writer import PatchStoreWriter  # noqa: E402
from histosynth.data.zoom_levels import (  # noqa: E402
    ZOOMLDM_MAGNIFICATIONS,
    parse_magnifications,
    plan_zoom_levels,
    read_area,
)
from histosynth.data.zoom_store import prepare_zoom_slides  # noqa: E402
from histosynth.errors import DataError, HistosynthError  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
WSI = SHARED / "data" / "wsi" / "cmu-1-small-region.svs"
LEVELS = ["20x", "10x", "5x", "2.5x", "1.25x", "0.625x", "0.3125x", "0.15625x"]
H, W, P = 260, 264, 2  # base (20x) size of the test pyramid; patch 2 px, so 0.15625x (128 tiles) fits


def box_mean(region: np.ndarray, f: int) -> np.ndarray:
    """Independent area downsampling by an integer factor (float)."""
    h, w = region.shape[0] // f, region.shape[1] // f
    return region[: h * f, : w * f].reshape(h, f, w, f, 3).astype(float).mean(axis=(1, 3))


def content(h: int, w: int, tile: int, seed: int = 0) -> np.ndarray:
    """Known pixels: red a gradient along x, green along y, blue a random value per base tile."""
    yy, xx = np.mgrid[0:h, 0:w]
    per_tile = np.random.default_rng(seed).integers(0, 256, (h // tile + 1, w // tile + 1))
    return np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1), per_tile[yy // tile, xx // tile]], -1).astype(np.uint8)


def write_pyramid(path: Path, base: np.ndarray, factors=(2, 4), compression=None) -> list[np.ndarray]:
    """A pyramidal TIFF (levels 1, *factors, each the rounded box mean of the base), 0.5 um/px = 20x."""
    levels = [base] + [box_mean(base, f).round().astype(np.uint8) for f in factors]
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], photometric="rgb", tile=(16, 16), subifds=len(factors), compression=compression,
                 resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
        for level in levels[1:]:
            tw.write(level, photometric="rgb", tile=(16, 16), subfiletype=1, compression=compression)
    return levels


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> tuple[Path, np.ndarray]:
    base = content(H, W, P)
    path = tmp_path_factory.mktemp("pyr") / "pyramid.tif"
    write_pyramid(path, base)
    return path, base


@pytest.fixture(scope="module")
def zoom_store(pyramid, tmp_path_factory) -> PatchStore:
    path, _ = pyramid
    out = tmp_path_factory.mktemp("stores") / "zoom"
    return prepare_zoom_slides([path], out, patch=P, magnifications=ZOOMLDM_MAGNIFICATIONS, tissue_threshold=0.0,
                               progress=False, command="pytest", report=lambda line: None)


# --- the list of levels ---------------------------------------------------------------------------


def test_parse_magnifications_rule():
    levels = parse_magnifications(ZOOMLDM_MAGNIFICATIONS)
    assert [lv.name for lv in levels] == LEVELS and [lv.zoom for lv in levels] == list(range(8))
    assert [lv.tiles for lv in levels] == [2**k for k in range(8)]
    assert [(lv.name, lv.zoom) for lv in parse_magnifications(" 20X, 5x ,1.25")] == [("20x", 0), ("5x", 2), ("1.25x", 4)]
    assert [(lv.name, lv.zoom) for lv in parse_magnifications(["40x", 10])] == [("40x", 0), ("10x", 2)]
    assert [lv.name for lv in parse_magnifications("10x")] == ["10x"]
    for bad, words in [("20x,7x", "not the base 20x"), ("20x,0.156x", "0.15625x"), ("20x,40x", "not the base"),
                       ("20x,5x,10x", "comes after"), ("20x,10x,10x", "repeats"), ("", "comma-separated"),
                       ("20x,,5x", "comma-separated"), ("20x,abc", "cannot read magnification")]:
        with pytest.raises(HistosynthError, match="--magnifications") as err:
            parse_magnifications(bad)
        assert words in str(err.value), (bad, str(err.value))


# --- geometry and pixels of every level on a pyramid ----------------------------------------------


def test_every_level_geometry_and_pixels(pyramid, zoom_store):
    path, base = pyramid
    store = zoom_store
    rows, cols = H // P, W // P  # the base grid, computed independently: 130 x 132 tiles of 2 px
    by_level: dict[str, list[int]] = {}
    for i, row in enumerate(store.records):
        by_level.setdefault(row["magnification"], []).append(i)
    assert list(by_level) == LEVELS
    for k, mag in enumerate(LEVELS):
        n = 2**k
        expected = {(i * n, j * n) for i in range(rows // n) for j in range(cols // n)}
        got = [(store.records[i]["tile_y"], store.records[i]["tile_x"]) for i in by_level[mag]]
        assert len(got) == len(expected) == (rows // n) * (cols // n) and set(got) == expected, mag
        # the pixels: the area mean of the base region, computed with numpy on the whole grid of the level
        means = box_mean(base[: (rows // n) * n * P, : (cols // n) * n * P], n)
        for i in by_level[mag]:
            row = store.records[i]
            ty, tx = row["tile_y"], row["tile_x"]
            assert (row["zoom"], row["y"], row["x"], row["crop"]) == (k, ty * P, tx * P, n * P)
            assert row["base_size"] == n * P and row["slide_index"] == 0 and row["split"] == "train"
            assert row["source"] == row["path"] == str(path) and row["slide"] == "pyramid.tif"
            # best level: 1, 2, 4 px per level pixel; the patch needs 2^k: levels 0, 1, 2, then 2 resized
            assert (row["level"], row["resized"]) == ((min(k, 2), k > 2)), mag
            assert row["mpp"] == pytest.approx(0.5 * n) and row["source_magnification"] == 20.0
            image = store[i]["image"]
            assert image.shape == (P, P, 3) and image.dtype == np.uint8
            want = means[ty // n * P : ty // n * P + P, tx // n * P : tx // n * P + P]
            # rounding: PIL's two passes (<= 1), plus 0.5 when read from a (rounded) lower pyramid level
            assert np.abs(image - want).max() <= (1.01 if row["level"] == 0 else 1.51), (mag, ty, tx)
    # store.json and meta
    raw = json.loads((store.path / "store.json").read_text())
    assert raw["magnification"] == ",".join(LEVELS) and raw["magnifications"] == LEVELS == store.magnifications
    assert raw["labels"] is False and raw["num_patches"] == len(store)
    meta = store.meta
    assert meta["kind"] == "slides" and meta["base_magnification"] == "20x" and meta["magnifications"] == LEVELS
    assert meta["skipped_levels"] == {} and meta["command"] == "pytest"
    counts = {m: (rows // 2**k) * (cols // 2**k) for k, m in enumerate(LEVELS)}
    assert meta["patches_per_level"] == counts and counts["0.15625x"] == 1
    [slide] = meta["slides"]
    assert (slide["path"], slide["source_magnification"], slide["mpp"], slide["magnification_from"]) == (
        str(path), 20.0, 0.5, "mpp")
    assert (slide["base_width"], slide["base_height"], slide["tile_rows"], slide["tile_cols"]) == (W, H, rows, cols)
    assert slide["patches_per_level"] == counts and slide["skipped_levels"] == {} and slide["patches"] == len(store)


def test_base_below_the_slide_and_chunked_reads(pyramid, monkeypatch):
    """A 40x slide (override) tiled from 20x: base tile = 2 level-0 px; big regions are read in small chunks."""
    path, base = pyramid
    for how, kw in (("override", {"source_magnification": "40x"}), ("mpp-override", {"mpp": 0.25})):
        plan = plan_zoom_levels(path, 4, "20x", **kw)  # either override beats the file's 0.5 um/px
        assert (plan.source_magnification, plan.magnification_from, plan.base_downsample) == (40.0, how, 2.0)
        single = plan_slide(path, 4, "10x", **kw)
        assert (single.source_magnification, single.magnification_from, single.crop0) == (40.0, how, 16)
    assert plan.mpp == single.mpp == 0.25
    plan = plan_zoom_levels(path, 4, "20x,10x,2.5x", source_magnification="40x")
    assert (plan.base_downsample, plan.base_width, plan.base_height) == (2.0, W // 2, H // 2)
    assert (plan.tile_rows, plan.tile_cols) == (H // 2 // 4, W // 2 // 4)
    assert [(lp.zoom, lp.level, lp.resized, lp.rows, lp.cols) for lp in plan.levels] == [
        (0, 1, False, 32, 33), (1, 2, False, 16, 16), (3, 2, True, 4, 4)]
    calls = []
    real_read = zoom_levels.read_region

    def spy(slide, location, level, size, name):
        calls.append(size)
        return real_read(slide, location, level, size, name)

    monkeypatch.setattr(zoom_levels, "READ_CHUNK", 8)
    monkeypatch.setattr(zoom_levels, "read_region", spy)
    slide = open_slide(path)
    try:
        image = read_area(slide, (8, 16), (128, 128), (16, 16), 0, path)  # 128 level-0 px -> 16 px, in 8 px reads
    finally:
        slide.close()
    assert len(calls) == 16 * 16 and max(max(c) for c in calls) <= 8
    assert np.abs(image - box_mean(base[16:144, 8:136], 8)).max() <= 1.01


# --- levels a slide does not reach ----------------------------------------------------------------


def test_level_no_slide_reaches_is_an_error_before_writing(tmp_path):
    small = tmp_path / "small.tif"
    write_pyramid(small, content(96, 80, 8))  # 12 x 10 tiles of 8 px: reaches 2.5x (8 tiles), not 1.25x (16)
    with pytest.raises(DataError, match="1.25x") as err:
        prepare_zoom_slides([small], tmp_path / "s", patch=8, magnifications="20x,10x,5x,2.5x,1.25x,0.625x",
                            tissue_threshold=0.0, progress=False)
    message = str(err.value)
    assert "1.25x, 0.625x" in message and "reach down to 2.5x" in message and "--magnifications" in message
    assert err.value.path == str(small)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.tif"]  # nothing written, no partial store


def test_slide_too_small_for_a_level_is_skipped_and_reported(tmp_path, pyramid):
    path, _ = pyramid
    small = tmp_path / "small.tif"
    write_pyramid(small, content(96, 80, 8))
    lines = []
    store = prepare_zoom_slides([path, small], tmp_path / "s", patch=8, magnifications="20x,10x,5x,2.5x,1.25x",
                                tissue_threshold=0.0, progress=False, report=lines.append)
    meta = store.meta
    big, little = meta["slides"]
    assert little["skipped_levels"] == {"1.25x": "slide too small: 12x10 base tiles of 8 px at 20x, the level needs 16x16"}
    assert big["skipped_levels"] == {}
    assert little["patches_per_level"] == {"20x": 120, "10x": 30, "5x": 6, "2.5x": 1, "1.25x": 0}
    assert big["patches_per_level"]["1.25x"] == (H // 8 // 16) * (W // 8 // 16) == 4
    assert set(meta["skipped_levels"]) == {"1.25x"} and "skipped in 1 of 2 slides" in meta["skipped_levels"]["1.25x"]
    assert "small.tif" in meta["skipped_levels"]["1.25x"] and meta["magnifications"] == LEVELS[:5]
    assert lines == [f"{small}: skipped 1.25x (slide too small: 12x10 base tiles of 8 px at 20x, the level needs 16x16)"]
    assert {r["slide_index"] for r in store.records if r["slide"] == "small.tif"} == {1}
    assert not any(r["magnification"] == "1.25x" and r["slide_index"] == 1 for r in store.records)


def test_level_without_tissue_is_skipped(tmp_path):
    """Tissue in one corner: the base level keeps patches there, the level covering the whole slide has none."""
    image = np.full((64, 64, 3), 235, np.uint8)
    image[:16, :16] = content(16, 16, 4)  # saturated colours on white glass
    png = tmp_path / "corner.png"
    Image.fromarray(image).save(png)
    lines = []
    store = prepare_zoom_slides([png], tmp_path / "s", patch=8, magnifications="20x,10x,5x,2.5x", mpp=0.5,
                                tissue_threshold=0.5, progress=False, report=lines.append)
    per_level = store.meta["patches_per_level"]
    assert per_level["20x"] > 0 and per_level["2.5x"] == 0
    assert "2.5x" in store.meta["skipped_levels"] and "2.5x" not in store.meta["magnifications"]
    assert all(r["y"] < 16 + 8 and r["x"] < 16 + 8 for r in store.records if r["zoom"] == 0)
    assert len(lines) == 1 and "2.5x (no patch with >= 50% tissue)" in lines[0]


# --- plain images with --mpp ----------------------------------------------------------------------


def test_png_with_mpp_is_a_20x_single_level_slide(tmp_path):
    base = content(96, 128, 8, seed=1)
    png = tmp_path / "region.png"
    Image.fromarray(base).save(png)
    slide = open_slide(png, mpp=0.5)
    try:
        assert isinstance(slide, PlainImageSlide) and slide.dimensions == (128, 96) and slide.level_count == 1
        assert slide.level_downsamples == (1.0,) and slide.properties["openslide.mpp-x"] == "0.5"
        assert np.array_equal(slide.read_region((120, 90), 0, (16, 16))[:6, :8], base[90:, 120:])
        assert (slide.read_region((120, 90), 0, (16, 16))[6:] == 255).all()  # outside: white glass
    finally:
        slide.close()
    jpeg = tmp_path / "region.jpg"
    Image.fromarray(base).save(jpeg, quality=95)
    slide = open_slide(jpeg)
    try:
        assert isinstance(slide, PlainImageSlide) and slide.dimensions == (128, 96) and "openslide.mpp-x" not in slide.properties
        assert np.abs(slide.read_region((0, 0), 0, (128, 96)).astype(int) - base).mean() < 8
    finally:
        slide.close()
    jpeg.unlink()
    # single-magnification mode
    store = prepare_slides([png], tmp_path / "one", patch=16, magnification="10x", mpp=0.5, tissue_threshold=0.0,
                           progress=False)
    [info] = store.meta["slides"]
    assert (info["source_magnification"], info["magnification_from"], info["mpp"]) == (20.0, "mpp-override", 0.5)
    assert len(store) == (96 // 32) * (128 // 32)
    for i, row in enumerate(store.records):
        assert row["magnification"] == "10x" and row["crop"] == 32
        assert np.abs(store[i]["image"] - box_mean(base[row["y"] : row["y"] + 32, row["x"] : row["x"] + 32], 2)).max() <= 1.01
    # several magnifications; and 0.25 um/px = 40x under a 20x base: base tiles of 2x2 level-0 px
    store = prepare_zoom_slides([png], tmp_path / "zoom", patch=8, magnifications="20x,10x,5x", mpp=0.25,
                                tissue_threshold=0.0, progress=False)
    [info] = store.meta["slides"]
    assert (info["source_magnification"], info["base_downsample"], info["tile_rows"], info["tile_cols"]) == (40.0, 2.0, 6, 8)
    assert store.meta["patches_per_level"] == {"20x": 48, "10x": 12, "5x": 2}
    for i, row in enumerate(store.records):
        f = 2 * 2 ** row["zoom"]
        assert (row["y"], row["x"], row["crop"]) == (row["tile_y"] * 16, row["tile_x"] * 16, 8 * f)
        want = box_mean(base[row["y"] : row["y"] + 8 * f, row["x"] : row["x"] + 8 * f], f)
        assert np.abs(store[i]["image"] - want).max() <= 1.01


def test_png_without_mpp_is_an_error_naming_mpp(tmp_path):
    png = tmp_path / "region.png"
    Image.fromarray(content(64, 64, 8)).save(png, dpi=(72, 72))  # a viewer's placeholder dpi is not a pixel size
    for run in (lambda: prepare_slides([png], tmp_path / "a", patch=16, magnification="10x", progress=False),
                lambda: prepare_zoom_slides([png], tmp_path / "b", patch=8, magnifications="20x,10x", progress=False)):
        with pytest.raises(DataError, match="--mpp") as err:
            run()
        assert err.value.path == str(png) and "--source-magnification" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["region.png"]
    # --source-magnification works too; the two overrides must agree
    store = prepare_zoom_slides([png], tmp_path / "c", patch=8, magnifications="20x,10x", source_magnification="20x",
                                tissue_threshold=0.0, progress=False)
    assert store.meta["slides"][0]["magnification_from"] == "override" and store.meta["slides"][0]["mpp"] is None
    with pytest.raises(HistosynthError, match="disagrees"):
        prepare_zoom_slides([png], tmp_path / "d", patch=8, magnifications="20x", mpp=0.25, source_magnification="20x",
                            progress=False)
    # a folder stands for its images only when an override says how to read them
    with pytest.raises(DataError, match="no slide files"):
        prepare_zoom_slides([tmp_path], tmp_path / "e", patch=8, magnifications="20x", progress=False)
    store = prepare_zoom_slides([tmp_path], tmp_path / "e", patch=8, magnifications="20x", mpp=0.5,
                                tissue_threshold=0.0, progress=False)
    assert [s["slide"] for s in store.meta["slides"]] == ["region.png"]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(DataError, match="cannot read") as err:
        plan_zoom_levels(broken, 8, "20x", mpp=0.5)
    assert err.value.path == str(broken)


# --- a corrupt tile -------------------------------------------------------------------------------


def test_corrupt_tile_names_the_file_and_position_and_writes_nothing(tmp_path):
    """Level 0 has a broken tile; the tissue thumbnail (2 px per base tile of 16 px) reads the intact level 1."""
    path = tmp_path / "corrupt.tif"
    write_pyramid(path, content(64, 1024, 8), factors=(2,), compression="zlib")
    with tifffile.TiffFile(path) as tif:  # zero the data of one tile of level 0 in the middle of the slide
        page = tif.pages[0]
        tile = (32 // 16) * (1024 // 16) + 512 // 16  # the 16 px tile at level-0 (x 512, y 32)
        offset, count = page.dataoffsets[tile], page.databytecounts[tile]
    data = bytearray(path.read_bytes())
    data[offset : offset + count] = bytes(count)
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="corrupt tile") as err:
        prepare_zoom_slides([path], tmp_path / "s", patch=16, magnifications="20x,10x", tissue_threshold=0.0,
                            progress=False, shard_size=4)
    assert err.value.path == str(path)
    message = str(err.value)  # the patch (base tile y 2, x 32 of 16 px) and the level-0 region read there
    assert "the 20x patch at base tile y 2, x 32" in message and "level 0, level-0 (512, 32), size 16x16" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.tif"]  # no store, no partial directory


def test_a_failed_group_read_falls_back_to_the_kept_patches_alone(tmp_path, monkeypatch):
    """Neighbouring patches are read as one block; when the block fails (a corrupt tile under glass no kept patch
    needs), the kept patches are read one by one and come out as from the block."""
    path = tmp_path / "s.tif"
    write_pyramid(path, content(64, 256, 8), factors=(2,))
    clean = prepare_zoom_slides([path], tmp_path / "a", patch=16, magnifications="20x,10x", tissue_threshold=0.0,
                                progress=False)
    real = zoom_levels.read_area
    calls = {"blocks": 0}

    def flaky(slide, origin0, size0, size, level, name):
        if size[0] > 16 or size[1] > 16:  # every multi-patch block fails
            calls["blocks"] += 1
            raise DataError("cannot read the region (corrupt tile data?)", name)
        return real(slide, origin0, size0, size, level, name)

    monkeypatch.setattr(zoom_levels, "read_area", flaky)
    again = prepare_zoom_slides([path], tmp_path / "b", patch=16, magnifications="20x,10x", tissue_threshold=0.0,
                                progress=False)
    assert calls["blocks"] > 0 and len(again) == len(clean)
    for i in range(len(clean)):
        assert np.array_equal(np.asarray(again[i]["image"]), np.asarray(clean[i]["image"]))


# --- the multi-magnification store ----------------------------------------------------------------


def test_store_of_several_magnifications(tmp_path):
    image = np.zeros((4, 4, 3), np.uint8)
    with pytest.raises(ValueError, match="own magnification"):
        with PatchStoreWriter(tmp_path / "a", (), 4, ["20x", "10x"], labels=False) as w:
            w.add(Patch(image, None, None, "train", 0, 0, 4, "s"))
    with pytest.raises(ValueError, match="own magnification"):
        with PatchStoreWriter(tmp_path / "a", (), 4, ["20x", "10x"], labels=False) as w:
            w.add(Patch(image, None, None, "train", 0, 0, 4, "s", magnification="5x"))
    with pytest.raises(ValueError, match="holds 20x patches"):
        with PatchStoreWriter(tmp_path / "a", (), 4, "20x", labels=False) as w:
            w.add(Patch(image, None, None, "train", 0, 0, 4, "s", magnification="10x"))
    assert not (tmp_path / "a").exists()
    with PatchStoreWriter(tmp_path / "b", (), 4, ["20x", "10x", "5x"], labels=False) as w:
        w.add(Patch(image, None, None, "train", 0, 0, 4, "s", magnification="5x"))
        w.add(Patch(image, None, None, "train", 0, 0, 8, "s", {"zoom": 0}, magnification="20X"))
    store = PatchStore(tmp_path / "b")
    assert [r["magnification"] for r in store.records] == ["5x", "20x"]
    assert store.magnifications == ["20x", "5x"] and store.magnification == "20x,5x"  # levels that hold patches
    with PatchStoreWriter(tmp_path / "c", (), 4, "10x", labels=False) as w:
        w.add(Patch(image, None, None, "train", 0, 0, 4, "s", magnification="10x"))
    assert PatchStore(tmp_path / "c").magnifications == ["10x"] and PatchStore(tmp_path / "c").magnification == "10x"


# --- CLI ------------------------------------------------------------------------------------------


def test_cli(tmp_path, pyramid):
    from click.testing import CliRunner

    from histosynth.cli.prepare import prepare as group

    path, _ = pyramid
    runner = CliRunner()
    out = tmp_path / "s"
    res = runner.invoke(group, ["slides", str(path), "--magnifications", "20x,10x,5x", "--patch", "8",
                                "--tissue-threshold", "0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "20x: 1056, 10x: 256, 5x: 64" in res.output
    store = PatchStore(out)
    fields = {"source", "y", "x", "crop", "split", "slide", "path", "tissue_fraction", "magnification", "zoom", "tile_y",
              "tile_x", "slide_index"}
    assert all(fields <= set(row) for row in store.records)
    assert {r["magnification"]: r["zoom"] for r in store.records} == {"20x": 0, "10x": 1, "5x": 2}
    assert all(isinstance(r[k], int) for r in store.records for k in ("zoom", "tile_y", "tile_x", "slide_index"))
    for args, words in [(["--magnification", "10x"], "not both"), (["--overlap", "0.5"], "--overlap"),
                        ([], "not the base")]:
        mags = "20x,7x" if not args else "20x,10x"
        res = runner.invoke(group, ["slides", str(path), "--magnifications", mags, "--patch", "8",
                                    "--out", str(tmp_path / "t"), *args])
        assert res.exit_code == 2 and words in res.output and "Traceback" not in res.output, res.output
        assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "t").exists()
    png = tmp_path / "region.png"
    Image.fromarray(content(64, 64, 8)).save(png)
    res = runner.invoke(group, ["slides", str(png), "--out", str(tmp_path / "p"), "--patch", "16",
                                "--magnification", "10x", "--mpp", "0.5", "--tissue-threshold", "0"])
    assert res.exit_code == 0, res.output
    assert PatchStore(tmp_path / "p").meta["slides"][0]["source_magnification"] == 20.0
    res = runner.invoke(group, ["slides", str(png), "--out", str(tmp_path / "q"), "--patch", "16"])
    assert res.exit_code == 2 and "--mpp" in res.output


# --- the real slide -------------------------------------------------------------------------------


@pytest.mark.skipif(not WSI.is_file(), reason="shared data (wsi/cmu-1-small-region.svs) not available")
def test_real_slide_counts_per_level(tmp_path):
    W0, H0 = 2220, 2967  # 20x, 0.499 um/px: 8 x 11 base tiles of 256 px
    lines = []
    store = prepare_zoom_slides([WSI], tmp_path / "s", patch=256, magnifications="20x,10x,5x,2.5x",
                                progress=False, report=lines.append)
    [info] = store.meta["slides"]
    assert (info["tile_rows"], info["tile_cols"], info["base_width"], info["base_height"]) == (11, 8, W0, H0)
    size = tuple(info["thumbnail_size"])
    slide = tiffslide.TiffSlide(str(WSI))
    try:
        mask = tissue_mask(read_thumbnail(slide, size))
        region = slide.read_region((0, 0), 0, (W0, H0), as_array=True)
    finally:
        slide.close()
    sx, sy = W0 / size[0], H0 / size[1]

    def fraction(x: int, y: int, crop: int) -> float:  # the documented footprint rule, independently
        c0, r0 = round(x / sx), round(y / sy)
        return float(mask[r0 : max(r0 + 1, round((y + crop) / sy)), c0 : max(c0 + 1, round((x + crop) / sx))].mean())

    expected = {}
    for k, mag in enumerate(["20x", "10x", "5x", "2.5x"]):
        n, crop = 2**k, 256 * 2**k
        expected[mag] = {(ty, tx) for ty in range(0, 11 - n + 1, n) for tx in range(0, 8 - n + 1, n)
                         if fraction(tx * 256, ty * 256, crop) >= 0.5}
    got = {mag: {(r["tile_y"], r["tile_x"]) for r in store.records if r["magnification"] == mag} for mag in expected}
    assert got == expected
    counts = {mag: len(v) for mag, v in expected.items()}
    assert counts == store.meta["patches_per_level"] == {"20x": 32, "10x": 6, "5x": 1, "2.5x": 0}
    assert store.meta["magnifications"] == ["20x", "10x", "5x"] and "2.5x" in store.meta["skipped_levels"]
    assert lines == [f"{WSI}: skipped 2.5x (no patch with >= 50% tissue)"]
    for i, row in enumerate(store.records):
        f = 2 ** row["zoom"]
        y, x = row["y"], row["x"]
        assert np.abs(store[i]["image"] - box_mean(region[y : y + 256 * f, x : x + 256 * f], f)).max() <= 1.01
