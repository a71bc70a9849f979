"""The distribution metrics' maths on feature arrays (numpy / scipy, float64), as torch-fidelity defines them:
Fréchet distance, kernel (Inception) distance and Inception score. See :mod:`histosynth.evaluate.fid` for the
protocol around them and ``docs/evaluation.md``."""

from __future__ import annotations

import math
import warnings

import numpy as np
import scipy.linalg
import scipy.special

from histosynth.errors import HistosynthError


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` (float64) of features ``(N, D)``, N >= 2."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features of shape (N >= 2, D), got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrtm(a: np.ndarray) -> np.ndarray:
    out = scipy.linalg.sqrtm(a)
    return out[0] if isinstance(out, tuple) else out  # scipy < 1.16 may return (sqrt, errest)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (the FID formula), float64.

    ``sqrtm(sigma1 @ sigma2)`` by scipy; if it is not finite or has a noticeable imaginary part (singular
    covariances, e.g. fewer samples than dimensions), ``eps * I`` is added to both covariances and it is
    recomputed (as pytorch-fid / torch-fidelity do); the remaining imaginary round-off is dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} {mu2.shape}, sigma {s1.shape} {s2.shape}")
    diff = mu1 - mu2

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # scipy's "singular matrix" notes; handled below
        covmean = _sqrtm(s1 @ s2)
        bad = not np.isfinite(covmean).all() or (
            np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        )
        if bad:
            offset = np.eye(s1.shape[0]) * eps
            covmean = _sqrtm((s1 + offset) @ (s2 + offset))
    if not np.isfinite(covmean).all():
        raise ValueError("Fréchet distance: matrix square root is not finite even with the eps offset")
    if np.iscomplexobj(covmean):
        imag = float(np.max(np.abs(np.diagonal(covmean).imag)))
        if imag > 1e-3:
            warnings.warn(f"Fréchet distance: dropping an imaginary component of {imag:.3g} in sqrtm", stacklevel=2)
        covmean = covmean.real
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * np.trace(covmean))


def _poly_kernel(x: np.ndarray, y: np.ndarray, degree: int, gamma: float | None, coef: float) -> np.ndarray:
    g = 1.0 / x.shape[1] if gamma is None else gamma
    return (x @ y.T * g + coef) ** degree


def _mmd2_unbiased(kxx: np.ndarray, kxy: np.ndarray, kyy: np.ndarray) -> float:
    m = kxx.shape[0]
    sum_xx = kxx.sum() - np.trace(kxx)
    sum_yy = kyy.sum() - np.trace(kyy)
    return float((sum_xx + sum_yy) / (m * (m - 1)) - 2.0 * kxy.sum() / (m * m))


def kernel_inception_distance(
    f1: np.ndarray,
    f2: np.ndarray,
    subsets: int = 100,
    subset_size: int = 1000,
    degree: int = 3,
    gamma: float | None = None,
    coef: float = 1.0,
    seed: int = 2020,
) -> tuple[float, float]:
    """KID: mean and population std over ``subsets`` of the unbiased MMD^2 between random subsets.

    Kernel ``k(x, y) = (gamma x.y + coef)^degree`` with ``gamma = 1/D`` by default (cubic polynomial, as
    torch-fidelity and torchmetrics). Subsets of ``subset_size`` rows are drawn without replacement from each set.
    """
    x, y = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {x.shape} and {y.shape}")
    if subset_size < 2 or subset_size > min(len(x), len(y)):
        raise HistosynthError(
            f"KID subset size {subset_size} must be between 2 and the number of images "
            f"({len(x)} real, {len(y)} generated)"
        )
    if subsets < 1:
        raise HistosynthError(f"KID needs at least one subset, got {subsets}")
    rng = np.random.RandomState(seed)
    mmds = np.empty(subsets)
    for i in range(subsets):
        a = x[rng.choice(len(x), subset_size, replace=False)]
        b = y[rng.choice(len(y), subset_size, replace=False)]
        mmds[i] = _mmd2_unbiased(
            _poly_kernel(a, a, degree, gamma, coef),
            _poly_kernel(a, b, degree, gamma, coef),
            _poly_kernel(b, b, degree, gamma, coef),
        )
    return float(mmds.mean()), float(mmds.std())


def inception_score(logits: np.ndarray, splits: int = 10, shuffle: bool = True, seed: int = 2020) -> tuple[float, float]:
    """Inception Score from classifier logits ``(N, K)``: mean and population std of ``exp(E KL(p(y|x)||p(y)))``.

    The (shuffled) rows are cut into ``splits`` consecutive groups, as torch-fidelity does.
    """
    z = np.asarray(logits, np.float64)
    if z.ndim != 2 or z.shape[0] < splits or splits < 1:
        raise ValueError(f"need logits (N >= splits, K) with splits >= 1, got {z.shape}, splits={splits}")
    if shuffle:
        z = z[np.random.RandomState(seed).permutation(len(z))]
    log_p = z - scipy.special.logsumexp(z, axis=1, keepdims=True)
    p = np.exp(log_p)
    n = len(z)
    scores = []
    for i in range(splits):
        lo, hi = i * n // splits, (i + 1) * n // splits
        p_c, log_p_c = p[lo:hi], log_p[lo:hi]
        log_py = np.log(p_c.mean(axis=0, keepdims=True))
        kl = (p_c * (log_p_c - log_py)).sum(axis=1).mean()
        scores.append(math.exp(kl))
    return float(np.mean(scores)), float(np.std(scores))
