"""Stain normalization of H&E regions (NASDM section 3.2 uses Vahadane's structure-preserving method).

Both methods work in optical density (OD = -ln(I/255)), where stains mix linearly: OD = C @ S with S
the (2 stains x 3 channels) stain vectors and C per-pixel concentrations. A region is decomposed with
its own stain vectors, its concentrations are rescaled so their 99th percentiles match the target's,
and it is recomposed with the target's stain vectors. Normalise once per source region, before
patching: per-patch estimates are noisy and would make neighbouring patches disagree.

Background (glass) is left as it is: a pixel's weight goes from 0 to 1 as its darkest channel rises from
BACKGROUND_RAMP[0] to BACKGROUND_RAMP[1] OD above the region's own glass level (`glass_level`; the ramp starts
later on noisier glass), and the pixel moves that far towards its normalised colour, in OD. Without it, the
glass of nearly blank regions (OD ~0.04, grey) was decomposed into the region's stains, scaled by the faint
tissue's large concentration ratio and recomposed with the target's stains: tinted pink / purple.

A target must show two distinct stains: `stain_spread` measures the hue range of its stained pixels after
smoothing out pixel noise, and `fit` refuses a target under MIN_STAIN_SPREAD degrees (an eosin-only or
hematoxylin-only image), whose two fitted "stains" would be noise extremes of one colour.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

from histosynth.data.io import to_rgb_uint8
from histosynth.errors import DataError, HistosynthError

OD_THRESHOLD = 0.15  # below this in any channel a pixel is background/white glass (Macenko et al.)
MIN_TISSUE_PIXELS = 100
MIN_TISSUE_FRACTION = 0.01
MAX_FIT_PIXELS = 20_000  # stain estimation on a subsample: enough for 2x3 parameters, keeps fitting fast
CHUNK_PIXELS = 1 << 20  # transform in chunks so large regions do not need several float copies at once

BACKGROUND_RAMP = (0.05, 0.15)  # OD above the glass: left as it is below the first, fully normalised above the second
GLASS_NOISE_SIGMAS = 6.0  # the ramp starts no lower than this many sigmas of the glass's own noise
MAX_RAMP_START = 0.10  # ... nor higher than this (a glass 10 % darker in some channel is no longer taken for glass)
SPREAD_SMOOTHING_PX = 4.0  # Gaussian sigma averaging out pixel (and JPEG block) noise before measuring the hue range
MIN_STAIN_SPREAD = 6.5  # degrees; measured (docs/benchmarks.md): real H&E 7.9-53, single-stain images 0.1-5.0
SATURATED = 2  # a channel at or below this value has a clipped OD: left out of the hue range

# Reference H&E vectors (Ruifrok & Johnston), rows = hematoxylin, eosin; used to start dictionary learning.
_REFERENCE_HE = np.array([[0.650, 0.704, 0.286], [0.072, 0.990, 0.105]])


def rgb_to_od(rgb: np.ndarray) -> np.ndarray:
    """uint8 (..., 3) -> float (N, 3) optical density; 0 is clipped to 1 so the log stays finite."""
    flat = np.asarray(rgb).reshape(-1, 3).astype(np.float64)
    return -np.log(np.maximum(flat, 1.0) / 255.0)


def od_to_rgb(od: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(255.0 * np.exp(-od)), 0, 255).astype(np.uint8)


def tissue_pixels(od: np.ndarray) -> np.ndarray:
    """OD rows of stained pixels: every channel above the threshold (white glass is ~0 OD)."""
    return od[np.all(od >= OD_THRESHOLD, axis=1)]


def _subsample(rows: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Deterministic subsample: the same region always gives the same stain estimate."""
    if len(rows) <= n:
        return rows
    return rows[np.random.default_rng(seed).choice(len(rows), n, replace=False)]


def _enough_tissue(tissue: np.ndarray, total: int) -> bool:
    return len(tissue) >= max(MIN_TISSUE_PIXELS, MIN_TISSUE_FRACTION * total)


def stain_spread(rgb: np.ndarray) -> float | None:
    """Hue range (degrees) of the stained pixels' optical density, or None if too few pixels are stained.

    The OD of a stained pixel is a non-negative mix of the stain vectors, so with two stains the directions of
    the pixels' OD fan out between them; with one stain they all point the same way. Pixel noise fans them out
    too (up to ~25 degrees in a flat, noisy single-stain image), so the OD image is first smoothed (Gaussian,
    SPREAD_SMOOTHING_PX), which keeps the fan of real H&E, whose stains sit in structures (nuclei, stroma)
    larger than a few pixels. The range is Macenko's: the 1st to 99th percentile of the angle in the plane of
    the two strongest directions. Stained = some channel at OD >= OD_THRESHOLD, none saturated.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image HxWx3, got shape {rgb.shape}")
    od = -np.log(np.maximum(rgb.astype(np.float32), 1.0) / 255.0)
    smooth = ndimage.gaussian_filter(od, (SPREAD_SMOOTHING_PX, SPREAD_SMOOTHING_PX, 0))
    stained = (smooth.max(axis=-1) >= OD_THRESHOLD) & (rgb.min(axis=-1) > SATURATED)
    rows = smooth[stained].astype(np.float64)
    if not _enough_tissue(rows, stained.size):
        return None
    rows = _subsample(rows, 5 * MAX_FIT_PIXELS)
    _, _, vt = np.linalg.svd(rows, full_matrices=False)
    plane = vt[:2].copy()
    plane[0] *= np.sign(plane[0].sum()) or 1.0  # the main direction towards positive OD: angles stay near 0
    proj = rows @ plane.T
    phi = np.degrees(np.arctan2(proj[:, 1], proj[:, 0]))
    lo, hi = np.percentile(phi, [1, 99])
    return float(hi - lo)


def glass_level(rgb: np.ndarray) -> tuple[np.ndarray, float]:
    """The region's background (glass): its OD per channel and where the tissue ramp starts above it.

    Glass = the unstained pixels (every channel below OD_THRESHOLD), when they are at least MIN_TISSUE_FRACTION
    of the region: their median OD. The ramp starts at BACKGROUND_RAMP[0] or GLASS_NOISE_SIGMAS times the glass's
    pixel noise, whichever is larger (at most MAX_RAMP_START), so that no noisy glass pixel is taken for tissue;
    the noise is measured on horizontally adjacent unstained pixels (robust sigma of their difference / sqrt 2,
    largest channel), which pale but smooth tissue among them does not inflate. Without glass: white (OD 0).
    """
    rgb = np.asarray(rgb)
    rgb = rgb.reshape(1, -1, 3) if rgb.ndim == 2 else rgb
    rows = rgb[:: max(1, rgb.shape[0] * rgb.shape[1] // CHUNK_PIXELS)]  # whole rows: neighbours stay neighbours
    od = -np.log(np.maximum(rows.astype(np.float64), 1.0) / 255.0)
    unstained = od.max(axis=-1) < OD_THRESHOLD
    if unstained.sum() < max(MIN_TISSUE_PIXELS, MIN_TISSUE_FRACTION * unstained.size):
        return np.zeros(3), BACKGROUND_RAMP[0]
    level = np.median(od[unstained], axis=0)
    pairs = unstained[:, 1:] & unstained[:, :-1]
    noise = 0.0
    if pairs.sum() >= MIN_TISSUE_PIXELS:
        diff = (od[:, 1:] - od[:, :-1])[pairs]
        noise = float((1.4826 * np.median(np.abs(diff - np.median(diff, axis=0)), axis=0)).max() / np.sqrt(2))
    return level, float(np.clip(GLASS_NOISE_SIGMAS * noise, BACKGROUND_RAMP[0], MAX_RAMP_START))


def tissue_weight(od: np.ndarray, glass: np.ndarray, start: float = BACKGROUND_RAMP[0]) -> np.ndarray:
    """(N,) in [0, 1]: how much of each pixel to normalise. 0 up to `start` OD above the glass in the pixel's
    darkest channel, rising linearly to 1 over the next BACKGROUND_RAMP[1] - BACKGROUND_RAMP[0]."""
    excess = np.max(od - glass, axis=1)
    return np.clip((excess - start) / (BACKGROUND_RAMP[1] - BACKGROUND_RAMP[0]), 0.0, 1.0)


def _order_he(stains: np.ndarray) -> np.ndarray:
    """Hematoxylin first: it absorbs more red than eosin, so its red OD component is larger."""
    return stains if stains[0, 0] >= stains[1, 0] else stains[::-1]


def _unit_rows(stains: np.ndarray) -> np.ndarray:
    return stains / np.linalg.norm(stains, axis=1, keepdims=True)


def nonneg_lasso_2(od: np.ndarray, stains: np.ndarray, lam: float) -> np.ndarray:
    """Exact per-pixel argmin_{c>=0} 0.5*||x - c @ S||^2 + lam*sum(c) for two stains, vectorised.

    With two unknowns the convex problem has four candidate supports ({}, {H}, {E}, {H,E}); take the
    best feasible one. Iterative lasso solvers (sklearn, one fit per pixel) are orders of magnitude slower.
    """
    gram = stains @ stains.T  # (2, 2)
    corr = od @ stains.T  # (N, 2)
    candidates = [np.zeros_like(corr)]
    for k in range(2):
        single = np.zeros_like(corr)
        single[:, k] = np.maximum(0.0, (corr[:, k] - lam) / gram[k, k])
        candidates.append(single)
    if abs(np.linalg.det(gram)) > 1e-12:
        both = np.linalg.solve(gram, (corr - lam).T).T
        candidates.append(np.where(np.all(both >= 0, axis=1, keepdims=True), both, 0.0))
    # objective up to the constant 0.5*||x||^2: 0.5 c'Gc - c'(corr - lam)
    costs = [0.5 * np.einsum("ni,ij,nj->n", c, gram, c) - np.sum(c * (corr - lam), axis=1) for c in candidates]
    best = np.argmin(np.stack(costs), axis=0)
    return np.stack(candidates)[best, np.arange(len(od))]


class _StainNormalizer:
    """Shared fit/transform; subclasses estimate stain vectors and concentrations their own way."""

    name = ""

    def __init__(self) -> None:
        self.stain_matrix_: np.ndarray | None = None  # (3, 2): unit columns hematoxylin, eosin
        self.max_concentrations_: np.ndarray | None = None  # (2,) 99th percentiles of the target
        self.target: str | None = None  # where the target came from, for manifests

    def _stains(self, tissue: np.ndarray) -> np.ndarray:  # (2, 3) unit rows, H first
        raise NotImplementedError

    def _concentrations(self, od: np.ndarray, stains: np.ndarray) -> np.ndarray:  # (N, 2)
        raise NotImplementedError

    def _analyse(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(stains, 99th-percentile concentrations over tissue), or None if too little tissue.

        Percentiles over tissue only, so a region that is half empty glass is not scaled differently.
        """
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected an RGB image HxWx3, got shape {rgb.shape}")
        od = rgb_to_od(rgb)
        tissue = tissue_pixels(od)
        if not _enough_tissue(tissue, len(od)):
            return None
        tissue = _subsample(tissue, MAX_FIT_PIXELS)
        stains = self._stains(tissue)
        conc = self._concentrations(tissue, stains)
        max_conc = np.percentile(conc, 99, axis=0)
        if np.any(max_conc <= 1e-6):
            return None
        return stains, max_conc

    def fit(self, target_rgb: np.ndarray, source: str | Path | None = None) -> "_StainNormalizer":
        """Learn the target's stain vectors and concentration scale; `source` names it in errors.

        Refused: a target with too little tissue, and one showing a single stain (`stain_spread` under
        MIN_STAIN_SPREAD degrees), from which two distinct stains cannot be estimated.
        """
        spread = stain_spread(target_rgb)
        if spread is not None and spread < MIN_STAIN_SPREAD:
            raise DataError(
                f"stain target shows a single stain, so two distinct stains (hematoxylin and eosin) cannot be "
                f"estimated from it: the colours of its stained pixels span {spread:.1f} degrees of hue in optical "
                f"density, under the {MIN_STAIN_SPREAD} that H&E tissue spans (nuclei purple, stroma pink); "
                "choose a target region with both nuclei and stroma",
                source,
            )
        result = self._analyse(target_rgb)
        if result is None:
            raise DataError(
                f"stain target has too little tissue to estimate stains (need {MIN_TISSUE_FRACTION:.0%} of pixels "
                f"with OD >= {OD_THRESHOLD} in every channel); choose a target region with tissue",
                source,
            )
        stains, self.max_concentrations_ = result
        self.stain_matrix_ = stains.T
        return self

    def transform(self, rgb: np.ndarray) -> np.ndarray:
        """Recolour `rgb` to the target's stains; background (glass) stays as it is (see `tissue_weight`).

        A region with (almost) no tissue is returned unchanged.
        """
        if self.stain_matrix_ is None:
            raise RuntimeError(f"{type(self).__name__}.fit() must be called before transform()")
        rgb = np.asarray(rgb)
        result = self._analyse(rgb)
        if result is None:
            return np.array(rgb, dtype=np.uint8)
        stains, max_conc = result
        scale = self.max_concentrations_ / max_conc
        flat = rgb.reshape(-1, 3)
        glass, ramp_start = glass_level(rgb)
        out = np.array(flat, dtype=np.uint8)  # background pixels (weight 0) are copied exactly
        for begin in range(0, len(flat), CHUNK_PIXELS):
            od = rgb_to_od(flat[begin : begin + CHUNK_PIXELS])
            weight = tissue_weight(od, glass, ramp_start)
            moved = weight > 0
            if not moved.any():
                continue
            od, weight = od[moved], weight[moved, None]
            normalised = (self._concentrations(od, stains) * scale) @ self.stain_matrix_.T
            out[begin : begin + CHUNK_PIXELS][moved] = od_to_rgb(od + weight * (normalised - od))
        return out.reshape(rgb.shape)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        return self.transform(rgb)


class MacenkoNormalizer(_StainNormalizer):
    """Macenko et al. 2009: stain vectors at the extreme angles of tissue OD in its top-2 PCA plane."""

    name = "macenko"

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = alpha  # percentile of angles taken as the extremes (robust to outliers)

    def _stains(self, tissue: np.ndarray) -> np.ndarray:
        _, vecs = np.linalg.eigh(np.cov(tissue.T))
        plane = vecs[:, [2, 1]]  # largest eigenvalue first
        plane *= np.where(plane.sum(axis=0) < 0, -1.0, 1.0)  # orient towards positive OD
        proj = tissue @ plane
        phi = np.arctan2(proj[:, 1], proj[:, 0])
        lo, hi = np.percentile(phi, [self.alpha, 100 - self.alpha])
        v1 = plane @ np.array([np.cos(lo), np.sin(lo)])
        v2 = plane @ np.array([np.cos(hi), np.sin(hi)])
        stains = np.stack([v1, v2])
        stains *= np.where(stains.sum(axis=1, keepdims=True) < 0, -1.0, 1.0)
        return _order_he(_unit_rows(stains))

    def _concentrations(self, od: np.ndarray, stains: np.ndarray) -> np.ndarray:
        return np.linalg.lstsq(stains.T, od.T, rcond=None)[0].T


class VahadaneNormalizer(_StainNormalizer):
    """Vahadane et al. 2016 (used by NASDM): sparse non-negative dictionary learning of the stain vectors.

    Non-negativity keeps stains physical (OD cannot be negative) and sparsity reflects that most pixels
    are dominated by one stain; both preserve tissue structure better than unconstrained PCA.
    """

    name = "vahadane"

    def __init__(self, lambda1: float = 0.1, lambda_transform: float = 0.01, max_iter: int = 200, tol: float = 1e-6):
        super().__init__()
        self.lambda1 = lambda1  # sparsity while learning the dictionary (as in Vahadane/staintools)
        self.lambda_transform = lambda_transform  # sparsity of per-pixel concentrations
        self.max_iter = max_iter
        self.tol = tol

    def _stains(self, tissue: np.ndarray) -> np.ndarray:
        """Alternate exact non-negative sparse coding and a projected dictionary update (atoms >= 0, norm <= 1).

        Started from reference H&E vectors so it converges quickly and keeps H and E apart.
        """
        stains = _REFERENCE_HE.copy()
        for _ in range(self.max_iter):
            code = nonneg_lasso_2(tissue, stains, self.lambda1)
            previous = stains.copy()
            for k in range(2):
                ck = code[:, k]
                energy = ck @ ck
                if energy <= 1e-12:
                    continue
                residual = tissue - code @ stains + np.outer(ck, stains[k])
                atom = np.maximum(0.0, ck @ residual / energy)
                norm = np.linalg.norm(atom)
                if norm > 1.0:
                    atom /= norm
                if norm > 1e-12:
                    stains[k] = atom
            if np.max(np.abs(stains - previous)) < self.tol:
                break
        if np.any(np.linalg.norm(stains, axis=1) <= 1e-8):
            raise DataError("could not separate two stains (is this H&E?)")
        return _order_he(_unit_rows(stains))

    def _concentrations(self, od: np.ndarray, stains: np.ndarray) -> np.ndarray:
        return nonneg_lasso_2(od, stains, self.lambda_transform)


NORMALIZERS = {"macenko": MacenkoNormalizer, "vahadane": VahadaneNormalizer}


def read_rgb(path: str | Path) -> np.ndarray:
    path = Path(path)
    try:
        with Image.open(path) as img:
            return to_rgb_uint8(img, path)
    except FileNotFoundError:
        raise DataError("stain target image not found", path) from None
    except OSError as exc:
        raise DataError(f"cannot read stain target image: {exc}", path) from None


def make_stain_normalizer(name: str | None, target_image_path: str | Path | None = None) -> _StainNormalizer | None:
    """'none' -> None; 'macenko' / 'vahadane' -> a normalizer fitted to the target image."""
    key = (name or "none").strip().lower()
    if key == "none":
        return None
    if key not in NORMALIZERS:
        raise HistosynthError(f"unknown stain normalization {name!r}; choose one of none, {', '.join(NORMALIZERS)}")
    if target_image_path is None:
        raise HistosynthError(f"stain normalization {key!r} needs a target image (a representative training region)")
    normalizer = NORMALIZERS[key]().fit(read_rgb(target_image_path), source=target_image_path)
    normalizer.target = str(target_image_path)
    return normalizer
