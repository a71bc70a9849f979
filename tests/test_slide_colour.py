"""Slide tiles in YCbCr and OME-TIFF metadata (issue 14, items 4 and 6), on files written here from the bundled real
HGSC region (20x) with a margin of glass, as a scanner would: an Aperio SVS whose JPEG 2000 tiles hold YCbCr
without a colour transform (compression 33003, which tiffslide returns unconverted), the same data under tags that
do not say YCbCr, and OME-TIFFs (interleaved and planar) with their pixel size only in the OME-XML.
"""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from PIL import Image

from histosynth.cli import main
from histosynth.data.slide_patches import prepare_slides
from histosynth.data.slides import open_slide, read_region, slide_magnification
from histosynth.data.tiff_tags import ycbcr_levels
from histosynth.errors import DataError

APERIO = "Aperio Image Library v12.0.15 \r\n768x768 [0,0 768x768] (256x256) J2K/YCbCr Q=70|AppMag = 20|MPP = 0.5"


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    """768 px: real tissue at (256, 256) on a 256 px margin of glass."""
    from histosynth.data.formats import read_nuclei
    from histosynth.quickstart import bundled_sample

    (region,) = read_nuclei("folder", bundled_sample(), magnification="20x")
    canvas = np.full((768, 768, 3), 244, np.uint8)
    canvas[256:, 256:] = region.image[:512, :512]
    return canvas


def _ycbcr(rgb: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb).convert("YCbCr"))


@pytest.fixture(scope="module")
def svs_33003(rgb, tmp_path_factory):
    path = tmp_path_factory.mktemp("ycbcr") / "jp2k-ycbcr.svs"
    tifffile.imwrite(path, _ycbcr(rgb), tile=(256, 256), compression=33003, photometric="rgb", description=APERIO,
                     metadata=None)
    return path


def test_aperio_jp2k_ycbcr_tiles_are_converted_as_openslide_does(rgb, svs_33003):
    import tiffslide

    raw = tiffslide.TiffSlide(str(svs_33003)).read_region((0, 0), 0, (768, 768), as_array=True)
    assert np.abs(raw.astype(int) - rgb).mean() > 20  # what tiffslide alone stores: YCbCr as RGB (salmon glass)
    slide = open_slide(svs_33003)
    assert ycbcr_levels(slide) == {0}
    ours = read_region(slide, (0, 0), 0, (768, 768), str(svs_33003))
    assert np.abs(ours.astype(int) - rgb).max() <= 4  # only the 8-bit YCbCr rounding is lost
    openslide = pytest.importorskip("openslide")
    theirs = np.asarray(openslide.OpenSlide(str(svs_33003)).read_region((0, 0), 0, (768, 768)))[..., :3]
    assert np.abs(ours.astype(int) - theirs).max() <= 1  # OpenSlide's own conversion of the same file


def test_prepared_patches_of_a_ycbcr_slide_are_rgb(rgb, svs_33003, tmp_path):
    store = prepare_slides([svs_33003], tmp_path / "store", patch=256, magnification="20x", tissue_threshold=0.5,
                           progress=False)
    assert len(store) == 4  # the tissue quadrant's four tiles; the glass margin is skipped
    for i in range(len(store)):
        rec = store.records[i]
        y, x = rec["y"], rec["x"]
        assert np.abs(store[i]["image"].astype(int) - rgb[y:y + 256, x:x + 256]).max() <= 4


def test_ycbcr_data_under_rgb_tags_is_refused_at_the_first_tile(rgb, tmp_path):
    path = tmp_path / "mislabelled.tif"
    tifffile.imwrite(path, _ycbcr(rgb), tile=(256, 256), photometric="rgb", compression="zlib",
                     resolution=(1e4 / 0.5, 1e4 / 0.5), resolutionunit="CENTIMETER")
    with pytest.raises(DataError, match=r"mislabelled\.tif: its tiles look like YCbCr stored as RGB"):
        open_slide(path)
    result = CliRunner().invoke(main, ["prepare", "slides", str(path), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "YCbCr" in result.output and not (tmp_path / "out").exists()
    plain = tmp_path / "plain.tif"  # the same tissue in RGB opens
    tifffile.imwrite(plain, rgb, tile=(256, 256), photometric="rgb", compression="zlib")
    assert not ycbcr_levels(open_slide(plain))


@pytest.mark.parametrize("unit,size", [("µm", 0.25), ("nm", 250.0)])
def test_ome_tiff_pixel_size_is_read_from_its_ome_xml(rgb, tmp_path, unit, size):
    path = tmp_path / "slide.ome.tif"
    tifffile.imwrite(path, rgb, tile=(256, 256), photometric="rgb", ome=True,
                     metadata={"axes": "YXS", "PhysicalSizeX": size, "PhysicalSizeXUnit": unit,
                               "PhysicalSizeY": size, "PhysicalSizeYUnit": unit})
    slide = open_slide(path)
    assert slide.properties.get("tiffslide.mpp-x") is None  # the backend alone would call it unknown
    assert slide_magnification(slide, path) == (40.0, "mpp")


def test_planar_ome_tiff_reads_the_same_pixels(rgb, tmp_path):
    path = tmp_path / "planar.ome.tif"
    tifffile.imwrite(path, np.moveaxis(rgb, -1, 0), tile=(256, 256), photometric="minisblack", ome=True,
                     metadata={"axes": "CYX", "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    slide = open_slide(path)
    assert np.array_equal(read_region(slide, (0, 0), 0, (768, 768), str(path)), rgb)
    assert slide_magnification(slide, path) == (20.0, "mpp")


def test_a_fluorescence_ome_tiff_is_refused_with_our_message(tmp_path):
    path = tmp_path / "if.ome.tif"
    tifffile.imwrite(path, np.zeros((2, 512, 512), np.uint16), tile=(256, 256), photometric="minisblack", ome=True,
                     metadata={"axes": "CYX", "PhysicalSizeX": 0.5})
    result = CliRunner().invoke(main, ["prepare", "slides", str(path), "--out", str(tmp_path / "out"), "--patch", "128"])
    assert result.exit_code == 2 and "if.ome.tif" in result.output and "expected 8-bit RGB" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_the_real_svs_reads_the_same_through_both_backends(shared_data):
    openslide = pytest.importorskip("openslide")
    path = shared_data / "wsi" / "cmu-1-small-region.svs"
    ours = read_region(open_slide(path), (800, 1000), 0, (512, 512), str(path))
    theirs = np.asarray(openslide.OpenSlide(str(path)).read_region((800, 1000), 0, (512, 512)))[..., :3]
    diff = np.abs(ours.astype(int) - theirs)
    assert diff.max() <= 2, (diff.mean(), diff.max())  # 0 here: both decode the JPEG tiles with libjpeg-turbo
    assert slide_magnification(open_slide(path), path) == (20.0, "objective-power")
