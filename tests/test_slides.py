"""Whole-slide tiling (PathLDM data: 256 px patches at 10x) on the real CMU-1 SVS region, and the image-only store."""

from __future__ import annotations

import json
import os
import tracemalloc
from itertools import islice
from pathlib import Path

import numpy as np
import pytest

tiffslide = pytest.importorskip("tiffslide")
tifffile = pytest.importorskip("tifffile")

from histosynth.data.patches import Patch  # noqa: E402
from histosynth.data.slide_patches import plan_slide, prepare_slides, tile_slide  # noqa: E402
from histosynth.data.slides import (  # noqa: E402
    best_level_for,
    open_slide,
    read_thumbnail,
    slide_magnification,
    tissue_mask,
)
from histosynth.data.store import PatchStore  # noqa: E402
from histosynth.data.store_writer import PatchStoreWriter  # noqa: E402
from histosynth.errors import DataError, OutputExistsError  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
WSI = SHARED / "data" / "wsi" / "cmu-1-small-region.svs"
needs_wsi = pytest.mark.skipif(not WSI.is_file(), reason="shared data (wsi/cmu-1-small-region.svs) not available")
W0, H0 = 2220, 2967  # the region's level 0, 20x, 0.499 um/px (shared/data/README.md)


def box_mean(region: np.ndarray, f: int) -> np.ndarray:
    """Independent area downsampling by an integer factor."""
    h, w = region.shape[0] // f, region.shape[1] // f
    return region[: h * f, : w * f].reshape(h, f, w, f, 3).astype(float).mean(axis=(1, 3))


def footprint_fraction(mask: np.ndarray, x: int, y: int, crop: int, size: tuple[int, int]) -> float:
    """Tissue fraction of a level-0 square on a thumbnail of `size` (w, h): the documented footprint rule."""
    sx, sy = W0 / size[0], H0 / size[1]
    c0, r0 = round(x / sx), round(y / sy)
    c1, r1 = max(c0 + 1, round((x + crop) / sx)), max(r0 + 1, round((y + crop) / sy))
    return float(mask[r0:r1, c0:c1].mean())


@pytest.fixture(scope="module")
def region() -> np.ndarray:
    """Level 0 of the real slide, read once, directly with tiffslide (the reference for tile contents)."""
    if not WSI.is_file():
        pytest.skip("shared data not available")
    slide = tiffslide.TiffSlide(str(WSI))
    try:
        assert slide.dimensions == (W0, H0) and slide.level_count == 1
        return slide.read_region((0, 0), 0, (W0, H0), as_array=True)
    finally:
        slide.close()


# --- resolution, levels ---------------------------------------------------------------------------


@needs_wsi
def test_resolution_from_metadata_and_plan():
    slide = open_slide(WSI)
    try:
        assert slide_magnification(slide, WSI) == (20.0, "objective-power")
        assert slide_magnification(slide, WSI, "40x") == (40.0, "override")
        assert best_level_for(slide, 2.0) == 0
    finally:
        slide.close()
    plan = plan_slide(WSI, 256, "10x")
    assert (plan.width, plan.height, plan.source_magnification, plan.mpp) == (W0, H0, 20.0, 0.499)
    assert (plan.level, plan.level_crop, plan.level_stride, plan.crop0, plan.resized) == (0, 512, 512, 512, True)
    assert plan.num_tiles == (W0 // 512) * (H0 // 512) == 20


# --- 10x on the real slide: geometry, tissue, content, manifest -----------------------------------


@needs_wsi
def test_10x_patches_match_independent_grid_tissue_and_pixels(tmp_path, region):
    store = prepare_slides([WSI], tmp_path / "s", patch=256, magnification="10x", progress=False, command="pytest")
    # independent grid: 10x from 20x is a 512 px level-0 crop on a 512 px stride, partial edge tiles dropped
    grid = [(y, x) for y in range(0, H0 - 512 + 1, 512) for x in range(0, W0 - 512 + 1, 512)]
    assert len(grid) == 20
    [info] = store.meta["slides"]
    size = tuple(info["thumbnail_size"])
    slide = tiffslide.TiffSlide(str(WSI))
    try:
        mask = tissue_mask(read_thumbnail(slide, size))
    finally:
        slide.close()
    assert mask.shape == (size[1], size[0]) and 0.2 < mask.mean() < 0.6  # the region is part tissue, part glass
    fractions = {(y, x): footprint_fraction(mask, x, y, 512, size) for y, x in grid}
    expected = {yx for yx, f in fractions.items() if f >= 0.5}
    got = {(r["y"], r["x"]) for r in store.records}
    assert got == expected and 0 < len(got) < len(grid)
    assert len(store) == len(got) == info["patches"]
    # the detector keeps tissue, not glass: judged on the pixels themselves
    means = {(y, x): region[y : y + 512, x : x + 512].mean() for y, x in grid}
    assert all(means[yx] < 200 for yx in got)
    assert all(yx not in got for yx, m in means.items() if m > 240)
    assert (0, 0) not in got
    for i, row in enumerate(store.records):
        y, x = row["y"], row["x"]
        assert (row["level"], row["level_x"], row["level_y"], row["level_crop"], row["crop"]) == (0, x, y, 512, 512)
        assert row["slide"] == WSI.name and row["source"] == str(WSI) and row["split"] == "train"
        assert row["magnification"] == "10x" and row["source_magnification"] == 20.0
        assert row["mpp"] == pytest.approx(2 * 0.499) and row["resized"] is True
        assert row["tissue_fraction"] == pytest.approx(fractions[(y, x)], abs=1e-4)
        item = store[i]
        assert item["image"].shape == (256, 256, 3) and item["image"].dtype == np.uint8
        assert "inst_map" not in item and "type_map" not in item
        assert np.abs(item["image"] - box_mean(region[y : y + 512, x : x + 512], 2)).max() <= 1
    raw = json.loads((store.path / "store.json").read_text())
    assert raw["labels"] is False and raw["class_names"] == [] and raw["counts"] == {"train": {"patches": len(store)}}
    assert raw["magnification"] == "10x" and raw["meta"]["command"] == "pytest"
    assert not store.has_labels
    assert sorted(p.name.split("_")[1] for p in (store.path / "shards").iterdir()) == ["image.npy"]
    with pytest.raises(OutputExistsError):
        prepare_slides([WSI], tmp_path / "s", progress=False)


@needs_wsi
def test_20x_is_not_resized_and_overlap_halves_the_stride(region):
    tiles = list(islice(tile_slide(WSI, 128, "20x", tissue_threshold=0.0, overlap=0.5), 40))
    assert [t[1]["x"] for t in tiles[:4]] == [0, 64, 128, 192]
    for image, meta in tiles:
        assert meta["resized"] is False and meta["crop"] == meta["level_crop"] == 128
        y, x = meta["y"], meta["x"]
        assert np.array_equal(image, region[y : y + 128, x : x + 128])


@needs_wsi
def test_tissue_threshold_bounds():
    every = list(tile_slide(WSI, 256, "10x", tissue_threshold=0.0))
    assert len(every) == 20 and {m["tissue_fraction"] for _, m in every} >= {0.0}
    full = [m for _, m in tile_slide(WSI, 256, "10x", tissue_threshold=1.0)]
    assert all(m["tissue_fraction"] == 1.0 for m in full)


# --- errors ---------------------------------------------------------------------------------------


@needs_wsi
def test_target_above_the_slide_is_an_error(tmp_path):
    with pytest.raises(DataError, match="40x is above the slide's 20x") as err:
        tile_slide(WSI, 256, "40x")
    assert err.value.path == str(WSI)
    with pytest.raises(DataError, match="above"):
        prepare_slides([WSI], tmp_path / "s", magnification="40x", progress=False)
    assert not (tmp_path / "s").exists()


def test_missing_and_corrupt_slides_are_errors_naming_the_file(tmp_path):
    missing = tmp_path / "nowhere.svs"
    with pytest.raises(DataError, match="not found") as err:
        tile_slide(missing)
    assert err.value.path == str(missing) and str(missing) in str(err.value)
    corrupt = tmp_path / "corrupt.svs"
    corrupt.write_bytes(np.random.default_rng(0).integers(0, 256, 20_000, dtype=np.uint8).tobytes())
    with pytest.raises(DataError, match="cannot read as a whole-slide image") as err:
        tile_slide(corrupt)
    assert err.value.path == str(corrupt)
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, np.full((512, 512, 3), 200, np.uint8), photometric="rgb", tile=(256, 256))
    # every slide is checked before anything is written: a bad one after a good one leaves no store
    with pytest.raises(DataError) as err:
        prepare_slides([good, corrupt], tmp_path / "s", source_magnification="20x", progress=False)
    assert err.value.path == str(corrupt)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.svs", "good.tif"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no slide files") as err:
        prepare_slides([empty], tmp_path / "t", progress=False)
    assert err.value.path == str(empty)


@needs_wsi
def test_tiff_without_resolution_needs_source_magnification(tmp_path, region):
    crop = region[1000:2024, 800:1824]  # real tissue, written as a plain tiled TIFF with no resolution tags
    plain = tmp_path / "plain.tif"
    tifffile.imwrite(plain, crop, photometric="rgb", tile=(256, 256))
    with pytest.raises(DataError, match="magnification") as err:
        tile_slide(plain, 128, "10x")
    assert err.value.path == str(plain) and "--source-magnification" in str(err.value)
    tiles = list(tile_slide(plain, 128, "10x", tissue_threshold=0.0, source_magnification="20x"))
    assert len(tiles) == 16
    for image, meta in tiles:
        assert meta["source_magnification"] == 20.0 and meta["mpp"] is None and meta["crop"] == 256
        y, x = meta["y"], meta["x"]
        assert np.abs(image - box_mean(crop[y : y + 256, x : x + 256], 2)).max() <= 1
    store = prepare_slides([tmp_path], tmp_path / "out", patch=128, source_magnification="20x", progress=False)
    assert len(store) > 0 and {r["slide"] for r in store.records} == {"plain.tif"}
    assert store.meta["slides"][0]["magnification_from"] == "override"


@pytest.mark.parametrize("dpi", [72, 96, 300])
def test_an_image_editors_dpi_placeholder_is_no_resolution(tmp_path, dpi):
    """cases/slide-72dpi: a plain TIFF whose resolution tags hold 72 dpi (352.8 µm/px) is not a 0.03x slide; its
    magnification is unknown, the error says why and names --source-magnification, which then works."""
    from click.testing import CliRunner

    from histosynth.cli import main

    rng = np.random.default_rng(0)
    image = (200 - rng.integers(0, 120, (600, 600, 3))).astype(np.uint8)  # saturated enough to count as tissue
    path = tmp_path / "region.tif"
    tifffile.imwrite(path, image, photometric="rgb", resolution=(dpi, dpi), resolutionunit="INCH")
    with pytest.raises(DataError, match=f"{25400 / dpi:.4g} µm/px .* cannot come from a microscope") as err:
        tile_slide(path, 128, "10x")
    assert err.value.path == str(path) and "--source-magnification" in str(err.value)
    r = CliRunner().invoke(main, ["prepare", "slides", str(path), "--out", str(tmp_path / "s"), "--patch", "128",
                                  "--magnification", "10x"])
    assert r.exit_code == 2 and "cannot come from a microscope" in r.output and "Traceback" not in r.output
    assert "--source-magnification (e.g. 20x)" in r.output and "source_magnification=" not in r.output  # CLI words
    r = CliRunner().invoke(main, ["prepare", "slides", str(path), "--out", str(tmp_path / "s"), "--patch", "128",
                                  "--magnification", "10x", "--source-magnification", "20x", "--tissue-threshold", "0"])
    assert r.exit_code == 0, r.output
    assert PatchStore(tmp_path / "s").meta["slides"][0]["mpp"] is None


@needs_wsi
def test_pyramid_level_choice_and_mpp(tmp_path, region):
    """A real-tissue pyramid (levels 1, 2, 4) with only MPP (0.5 um/px = 20x): each target reads its best level."""
    base = region[:1024, :1200]
    levels = [base, box_mean(base, 2).round().astype(np.uint8), box_mean(base, 4).round().astype(np.uint8)]
    path = tmp_path / "pyramid.tif"
    with tifffile.TiffWriter(path) as tw:
        tw.write(levels[0], photometric="rgb", tile=(256, 256), subifds=2, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
        for lev in levels[1:]:
            tw.write(lev, photometric="rgb", tile=(256, 256), subfiletype=1)
    slide = open_slide(path)
    try:
        assert tuple(slide.level_downsamples) == (1.0, 2.0, 4.0)
        assert slide_magnification(slide, path) == (20.0, "mpp")
        assert [best_level_for(slide, d) for d in (1, 1.5, 1.99, 2, 3, 4, 8)] == [0, 0, 1, 1, 1, 2, 2]
    finally:
        slide.close()
    cases = {"20x": (0, 64, False), "10x": (1, 64, False), "5x": (2, 64, False), "2.5x": (2, 128, True),
             "6x": (1, round(64 * (20 / 6) / 2), True)}
    for mag, (level, level_crop, resized) in cases.items():
        plan = plan_slide(path, 64, mag)
        assert (plan.level, plan.level_crop, plan.resized) == (level, level_crop, resized), mag
    for image, meta in tile_slide(path, 64, "5x", tissue_threshold=0.0):
        ly, lx = meta["level_y"], meta["level_x"]
        assert meta["level"] == 2 and (meta["y"], meta["x"], meta["crop"]) == (4 * ly, 4 * lx, 256)
        assert np.array_equal(image, levels[2][ly : ly + 64, lx : lx + 64])
        assert meta["mpp"] == pytest.approx(2.0)
    image, meta = next(iter(tile_slide(path, 64, "2.5x", tissue_threshold=0.0)))
    assert meta["level"] == 2 and meta["level_crop"] == 128 and meta["crop"] == 512
    assert np.abs(image - box_mean(levels[2][:128, :128], 2)).max() <= 1


# --- memory ---------------------------------------------------------------------------------------


@needs_wsi
def test_memory_stays_flat_over_the_slide(tmp_path):
    kw = dict(patch=128, magnification="20x", overlap=0.5, tissue_threshold=0.0, progress=False, shard_size=16)
    prepare_slides([WSI], tmp_path / "warmup", **{**kw, "overlap": 0.0})  # imports and caches out of the measurement
    tracemalloc.start()
    try:
        store = prepare_slides([WSI], tmp_path / "s", **kw)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = len(store) * 128 * 128 * 3
    assert len(store) == len(range(0, W0 - 127, 64)) * len(range(0, H0 - 127, 64)) > 1000
    assert total > 60e6 and peak < total / 8, (peak, total)


# --- the image-only store -------------------------------------------------------------------------


def test_image_only_store_round_trip_and_checks(tmp_path):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for _ in range(5)]
    with PatchStoreWriter(tmp_path / "s", (), 16, "10x", {"k": 1}, shard_size=2, labels=False) as w:
        for i, im in enumerate(images):
            w.add(Patch(im, None, None, "train" if i < 4 else "test", i, 2 * i, 32, "a.svs", {"tissue": 0.5, "level": 1}))
        assert w.buffered_bytes == 16 * 16 * 3  # one patch waiting (shards of 2), image bytes only
    store = PatchStore(tmp_path / "s")
    assert len(store) == 5 and not store.has_labels and store.indices("test") == [4]
    assert store.counts == {"train": {"patches": 4}, "test": {"patches": 1}}
    for i, im in enumerate(images):
        item = store[i]
        assert np.array_equal(item["image"], im) and item["tissue"] == 0.5 and item["level"] == 1
        assert (item["y"], item["x"], item["crop"]) == (i, 2 * i, 32) and "counts" not in item
    assert os.listdir(tmp_path / "s" / "shards") and all("_image" in f for f in os.listdir(tmp_path / "s" / "shards"))
    label = np.zeros((16, 16), np.int32)
    with pytest.raises(ValueError, match="images only"):
        with PatchStoreWriter(tmp_path / "x", (), 16, "10x", labels=False) as w:
            w.add(Patch(images[0], label, label, "train", 0, 0, 16, "a"))
    with pytest.raises(ValueError, match="no labels"):
        with PatchStoreWriter(tmp_path / "x", ("a",), 16, "10x") as w:
            w.add(Patch(images[0], None, None, "train", 0, 0, 16, "a"))
    with pytest.raises(ValueError, match="redefine"):
        with PatchStoreWriter(tmp_path / "x", (), 16, "10x", labels=False) as w:
            w.add(Patch(images[0], None, None, "train", 0, 0, 16, "a", {"split": "test"}))
    assert not (tmp_path / "x").exists()


# --- CLI ------------------------------------------------------------------------------------------


@needs_wsi
def test_cli(tmp_path):
    from click.testing import CliRunner

    from histosynth.cli.prepare import prepare as group

    runner = CliRunner()
    res = runner.invoke(group, ["slides", str(WSI), "--out", str(tmp_path / "s"), "--patch", "256", "--magnification", "10x"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and len(PatchStore(tmp_path / "s")) > 0
    missing = tmp_path / "missing.svs"
    res = runner.invoke(group, ["slides", str(missing), "--out", str(tmp_path / "t")])
    assert res.exit_code == 2 and str(missing) in res.output and "Traceback" not in res.output
    res = runner.invoke(group, ["slides", str(WSI), "--out", str(tmp_path / "t"), "--magnification", "40x"])
    assert res.exit_code == 2 and "above" in res.output
    res = runner.invoke(group, ["slides", str(WSI), "--out", str(tmp_path / "t"), "--overlap", "1.0"])
    assert res.exit_code == 2
