"""Stain normalisation on real tissue (the bundled HGSC region): glass stays glass, single-stain targets are refused.

The inputs of ../shared/cases (stain-nearly-blank, stain-single-target) are rebuilt here from the bundled region:
glass at 244.5 grey with a few % of faint tissue, and eosin-only / hematoxylin-only targets made by colour
deconvolution (skimage's rgb2hed / hed2rgb) or, as in the case files, a flat stain colour with pixel noise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.color import hed2rgb, rgb2hed

import histosynth
from histosynth.data.record import NucleiRecord
from histosynth.data.stain import (
    MIN_STAIN_SPREAD,
    MacenkoNormalizer,
    VahadaneNormalizer,
    glass_level,
    make_stain_normalizer,
    rgb_to_od,
    stain_spread,
    tissue_weight,
)
from histosynth.data.prepare_labelled import prepare_nuclei
from histosynth.errors import DataError

HGSC = Path(histosynth.__file__).parent / "assets" / "hgsc" / "hgsc_nest.jpg"
METHODS = [MacenkoNormalizer, VahadaneNormalizer]
GLASS = 244.5


@pytest.fixture(scope="module")
def hgsc() -> np.ndarray:
    with Image.open(HGSC) as im:
        return np.asarray(im.convert("RGB"))


@pytest.fixture(scope="module")
def target(hgsc) -> np.ndarray:
    return hgsc[300:812, 300:812]


def nearly_blank(tissue: np.ndarray, size: int = 256, fraction: float = 0.03, seed: int = 0):
    """Glass at 244.5 grey (noise sigma 1.5, as scanned) with a disc of faint real tissue (OD halved) covering
    `fraction` of the region: (image, glass mask)."""
    rng = np.random.default_rng(seed)
    glass = np.clip(np.rint(GLASS + rng.normal(0, 1.5, (size, size, 3))), 0, 255)
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= fraction * size * size / np.pi
    od = -np.log(np.maximum(tissue[:size, :size].astype(float), 1) / 255) * 0.5
    image = np.where(disc[..., None], glass * np.exp(-od), glass)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), ~disc


def single_stain(rgb: np.ndarray, keep: int) -> np.ndarray:
    """Colour deconvolution keeping one stain: 0 hematoxylin-only, 1 eosin-only."""
    hed = rgb2hed(rgb)
    only = np.zeros_like(hed)
    only[..., keep] = hed[..., keep]
    return np.clip(np.rint(hed2rgb(only) * 255), 0, 255).astype(np.uint8)


def flat_stain(vector, density: float, noise: float = 12.0, size: int = 256, seed: int = 0) -> np.ndarray:
    """One stain at one density with pixel noise (the case files: sigma 12 levels on a flat colour)."""
    colour = 255 * np.exp(-density * np.asarray(vector) / np.linalg.norm(vector))
    image = colour + np.random.default_rng(seed).normal(0, noise, (size, size, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# --- background (glass) stays as it is ---------------------------------------------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_glass_of_a_nearly_blank_region_stays_grey(method, hgsc, target):
    image, glass = nearly_blank(hgsc[900:1156, 200:456])
    assert abs(image[glass].mean() - GLASS) < 0.1 and 0.02 < (~glass).mean() < 0.04
    out = method().fit(target).transform(image)
    assert out.shape == image.shape and out.dtype == np.uint8
    change = np.abs(out.astype(int) - image)
    assert np.allclose(out[glass].mean(axis=0), GLASS, atol=1.0)  # was tinted, e.g. (208, 213, 237) with Macenko
    assert change[glass].max() <= 2
    # the tissue is normalised: the faint disc is recoloured to the target's stain intensities
    assert change[~glass].mean() > 10
    assert out[~glass].mean() < image[~glass].mean() - 10


@pytest.mark.parametrize("method", METHODS)
def test_blank_region_and_tissue_edges(method, target):
    normalizer = method().fit(target)
    blank = np.clip(np.rint(GLASS + np.random.default_rng(1).normal(0, 1.5, (128, 128, 3))), 0, 255).astype(np.uint8)
    assert np.array_equal(normalizer.transform(blank), blank)
    # real tissue with its own glass: the glass pixels (well below the tissue ramp) are copied exactly
    out = normalizer.transform(target)
    od = rgb_to_od(target)
    level, start = glass_level(target)
    untouched = tissue_weight(od, level, start) == 0
    assert untouched.any() and np.array_equal(out.reshape(-1, 3)[untouched], target.reshape(-1, 3)[untouched])


def test_tissue_weight_ramp():
    glass = np.full(3, 0.04)
    od = np.array([[0.04, 0.04, 0.04], [0.05, 0.08, 0.04], [0.04, 0.14, 0.06], [0.1, 0.3, 0.1], [1.0, 1.2, 0.5]])
    w = tissue_weight(od, glass)
    assert w[0] == 0 and w[1] == 0 and 0 < w[2] < 1 and w[3] == 1 and w[4] == 1
    # the ramp starts above the glass's own pixel noise: noisy glass (sigma 3 levels) is not taken for tissue
    rng = np.random.default_rng(0)
    noisy = np.clip(np.rint(GLASS + rng.normal(0, 3, (200, 250, 3))), 0, 255).astype(np.uint8)
    level, start = glass_level(noisy)
    assert np.allclose(level, -np.log(GLASS / 255), atol=0.005) and 0.05 < start <= 0.1
    assert tissue_weight(rgb_to_od(noisy), level, start).max() == 0
    # clean glass: the ramp starts at 0.05; a region without glass is measured against white
    assert glass_level(np.full((64, 64, 3), 240, np.uint8))[1] == 0.05
    assert glass_level(np.full((64, 64, 3), 100, np.uint8))[0].tolist() == [0, 0, 0]


def test_prepare_nuclei_keeps_the_glass_of_a_sparse_region(tmp_path, hgsc, target):
    """The case command: regions normalised once each into a store; the sparse region's glass stays 244.5."""
    target_path = tmp_path / "r1_tissue.png"
    Image.fromarray(target[:256, :256]).save(target_path)
    sparse, glass = nearly_blank(hgsc[900:1156, 200:456])
    blank = np.full((256, 256, 3), 245, np.uint8)
    empty = np.zeros((256, 256), np.int32)
    records = [NucleiRecord(image, empty, empty, ("nucleus",), name)
               for image, name in ((target[:256, :256], "r1_tissue.png"), (blank, "r2_blank.png"),
                                   (sparse, "r3_sparse.png"))]
    normalizer = make_stain_normalizer("macenko", target_path)
    store = prepare_nuclei(records, tmp_path / "store", patch=256, magnification="40x", source_magnification="40x",
                           holdout=0, stain_normalizer=normalizer, seed=0, progress=False)
    images = {store[i]["source"]: store[i]["image"] for i in range(len(store))}
    assert np.array_equal(images["r2_blank.png"], blank)
    out = np.asarray(images["r3_sparse.png"])
    assert np.allclose(out[glass].mean(axis=0), GLASS, atol=1.0)
    assert np.abs(out[glass].astype(int) - sparse[glass]).max() <= 2


# --- a target must show two distinct stains ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["macenko", "vahadane"])
@pytest.mark.parametrize("stain", ["hematoxylin", "eosin"])
def test_single_stain_target_is_refused(tmp_path, hgsc, method, stain):
    path = tmp_path / f"target_{stain}_only.png"
    Image.fromarray(single_stain(hgsc[300:812, 300:812], 0 if stain == "hematoxylin" else 1)).save(path)
    with pytest.raises(DataError, match="single stain") as err:
        make_stain_normalizer(method, path)
    assert err.value.path == str(path) and str(path) in str(err.value)
    assert "two distinct stains" in str(err.value) and "degrees" in str(err.value)


@pytest.mark.parametrize("vector, density", [((0.07, 0.99, 0.11), 0.6), ((0.65, 0.70, 0.29), 1.7)],
                         ids=["eosin", "hematoxylin"])
def test_flat_noisy_single_stain_target_is_refused(tmp_path, vector, density):
    """As the case files: one stain colour plus noise, whose raw hue spread (~25 degrees) looks like two stains."""
    path = tmp_path / "target.png"
    Image.fromarray(flat_stain(vector, density)).save(path)
    for method in ("macenko", "vahadane"):
        with pytest.raises(DataError, match="single stain") as err:
            make_stain_normalizer(method, path)
        assert err.value.path == str(path)


def test_stain_spread_separates_real_he_from_one_stain(hgsc, target):
    real = [hgsc, target] + [hgsc[500 * k: 500 * k + 500, 1000:] for k in range(3)]
    spreads = [stain_spread(x) for x in real]
    assert min(spreads) > MIN_STAIN_SPREAD + 1.5, spreads
    singles = [single_stain(target, 0), single_stain(target, 1), flat_stain((0.07, 0.99, 0.11), 0.6)]
    assert max(stain_spread(x) for x in singles) < MIN_STAIN_SPREAD / 2
    assert stain_spread(np.full((64, 64, 3), 250, np.uint8)) is None  # no stained pixels: nothing to measure


@pytest.mark.parametrize("method", METHODS)
def test_real_targets_are_accepted(method, hgsc, target):
    for image in (target, hgsc[:500, 1000:]):
        normalizer = method().fit(image)
        stains = normalizer.stain_matrix_
        assert stains.shape == (3, 2) and np.allclose(np.linalg.norm(stains, axis=0), 1)
