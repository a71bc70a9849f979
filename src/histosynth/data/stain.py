"""Stain normalization of H&E regions (NASDM section 3.2 uses Vahadane's structure-preserving method).

Both methods work in optical density (OD = -ln(I/255)), where stains mix linearly: OD = C @ S with S
the (2 stains x 3 channels) stain vectors and C per-pixel concentrations. A region is decomposed with
its own stain vectors, its concentrations are rescaled so their 99th percentiles match the target's,
and it is recomposed with the target's stain vectors. Normalise once per source region, before
patching: per-patch estimates are noisy and would make neighbouring patches disagree.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from histosynth.errors import DataError, HistosynthError

OD_THRESHOLD = 0.15  # below this in any channel a pixel is background/white glass (Macenko et al.)
MIN_TISSUE_PIXELS = 100
MIN_TISSUE_FRACTION = 0.01
MAX_FIT_PIXELS = 20_000  # stain estimation on a subsample: enough for 2x3 parameters, keeps fitting fast
CHUNK_PIXELS = 1 << 20  # transform in chunks so large regions do not need several float copies at once

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
        """Learn the target's stain vectors and concentration scale; `source` names it in errors."""
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
        """Recolour `rgb` to the target's stains. A region with (almost) no tissue is returned unchanged."""
        if self.stain_matrix_ is None:
            raise RuntimeError(f"{type(self).__name__}.fit() must be called before transform()")
        rgb = np.asarray(rgb)
        result = self._analyse(rgb)
        if result is None:
            return np.array(rgb, dtype=np.uint8)
        stains, max_conc = result
        scale = self.max_concentrations_ / max_conc
        flat = rgb.reshape(-1, 3)
        out = np.empty_like(flat, dtype=np.uint8)
        for start in range(0, len(flat), CHUNK_PIXELS):
            od = rgb_to_od(flat[start : start + CHUNK_PIXELS])
            conc = self._concentrations(od, stains) * scale
            out[start : start + CHUNK_PIXELS] = od_to_rgb(conc @ self.stain_matrix_.T)
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
            return np.asarray(img.convert("RGB"))
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
