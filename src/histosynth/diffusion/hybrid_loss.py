"""Improved-DDPM hybrid objective ``L_hybrid = L_simple + λ·L_vlb`` (NASDM eq. 5; Nichol & Dhariwal 2021).

The model predicts ``[ε, v]`` (channels split in half). ``ε`` gives the mean, ``v`` the *learned range*
variance, interpolated in log space between the two DDPM extremes::

    frac  = (v + 1) / 2
    log Σ = frac · log β_t + (1 − frac) · log β̃_t,      β̃_t = β_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t)

(``log β̃_t`` is "clipped": β̃_0 = 0, so index 0 uses β̃_1, as in IDDPM.)

* ``L_simple`` = mean over pixels of ``(ε − ε_θ)²`` — the only signal for ε.
* ``L_t`` (bits/dim) uses the mean built from **ε_θ.detach()** (stop-gradient), so it only trains Σ:
  ``KL(q(x_{t−1}|x_t,x_0) ‖ p_θ(x_{t−1}|x_t))`` for t > 0 and the discretised decoder NLL
  ``−log p_θ(x_0|x_1)`` for t = 0 (data in [−1, 1], 256 bins).

**λ convention.** ``L_vlb = Σ_t L_t`` over T terms. With t drawn uniformly from {0..T−1}, ``T·L_t`` is an
unbiased estimate of ``L_vlb``, so this module computes ``loss = L_simple + λ·T·L_t``. With T = 1000 and
λ = 0.001 (NASDM/IDDPM) the weight on ``L_t`` is exactly 1, i.e. IDDPM's / SDM's ``loss = mse + vb``
(IDDPM's RESCALED_MSE ``vb *= T/1000`` is the same formula for other T). The returned ``"vlb"`` is the
unweighted ``L_t`` in bits/dim.

The prior term ``L_T`` has no parameters and is not included. ``t`` is the 0-based diffusers index:
``x_t`` is the noisy sample after ``t + 1`` noising steps, as produced by ``DDPMScheduler.add_noise``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "GaussianDiffusionTerms",
    "vlb_terms",
    "hybrid_loss",
]


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """Elementwise ``KL(N(mean1, exp(logvar1)) ‖ N(mean2, exp(logvar2)))`` in nats (broadcasting)."""
    mean1, logvar1, mean2, logvar2 = (torch.as_tensor(a) for a in (mean1, logvar1, mean2, logvar2))
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """Fast tanh approximation of the standard normal CDF (as in IDDPM / PixelCNN++)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Elementwise log-probability (nats) of 8-bit data ``x`` ∈ [−1, 1] under a Gaussian discretised into
    256 bins of width 2/255; the two outer bins extend to ±∞. ``log_scales`` is log σ."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


def _mean_flat(x: torch.Tensor) -> torch.Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


@dataclass
class GaussianDiffusionTerms:
    """Per-timestep constants of a DDPM forward process, computed in float64 from ``betas`` (length T)."""

    betas: torch.Tensor
    alphas_cumprod: torch.Tensor
    alphas_cumprod_prev: torch.Tensor
    posterior_log_variance_clipped: torch.Tensor
    posterior_mean_coef1: torch.Tensor  # multiplies x_0
    posterior_mean_coef2: torch.Tensor  # multiplies x_t

    @classmethod
    def from_betas(cls, betas) -> "GaussianDiffusionTerms":
        betas = torch.as_tensor(betas).detach().to(torch.float64).cpu()
        if betas.ndim != 1 or len(betas) < 2 or (betas <= 0).any() or (betas > 1).any():
            raise ValueError("betas must be a 1-D tensor of at least 2 values in (0, 1]")
        alphas = 1.0 - betas
        acp = torch.cumprod(alphas, 0)
        acp_prev = torch.cat([acp.new_ones(1), acp[:-1]])
        post_var = betas * (1.0 - acp_prev) / (1.0 - acp)
        return cls(
            betas=betas,
            alphas_cumprod=acp,
            alphas_cumprod_prev=acp_prev,
            posterior_log_variance_clipped=torch.log(torch.cat([post_var[1:2], post_var[1:]])),
            posterior_mean_coef1=betas * acp_prev.sqrt() / (1.0 - acp),
            posterior_mean_coef2=(1.0 - acp_prev) * alphas.sqrt() / (1.0 - acp),
        )

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    @staticmethod
    def _at(arr: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``arr[t]`` as ``like``'s dtype/device, shaped (B, 1, 1, ...) for broadcasting."""
        out = arr.to(like.device)[t.to(like.device).long()].to(like.dtype)
        return out.view(-1, *([1] * (like.ndim - 1)))

    def q_posterior(self, x_start, x_t, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of ``q(x_{t−1} | x_t, x_0)``."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x_start + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_log_variance_clipped, t, x_t).expand_as(x_t)

    def predict_xstart_from_eps(self, x_t, t, eps) -> torch.Tensor:
        acp = self._at(self.alphas_cumprod, t, x_t)
        return (x_t - (1.0 - acp).sqrt() * eps) / acp.sqrt()

    def learned_range_log_variance(self, v, t) -> torch.Tensor:
        """``frac·log β_t + (1−frac)·log β̃_t`` with ``frac = (v + 1)/2``."""
        frac = (v + 1.0) / 2.0
        max_log = self._at(torch.log(self.betas), t, v)
        min_log = self._at(self.posterior_log_variance_clipped, t, v)
        return frac * max_log + (1.0 - frac) * min_log

    def p_mean_log_variance(self, eps, v, x_t, t) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of ``p_θ(x_{t−1} | x_t)`` (no clipping of the predicted x_0)."""
        mean, _ = self.q_posterior(self.predict_xstart_from_eps(x_t, t, eps), x_t, t)
        return mean, self.learned_range_log_variance(v, t)


def _terms(betas) -> GaussianDiffusionTerms:
    return betas if isinstance(betas, GaussianDiffusionTerms) else GaussianDiffusionTerms.from_betas(betas)


def vlb_terms(eps, v, x_start, x_t, t, betas) -> torch.Tensor:
    """Per-sample ``L_t`` in bits/dim: KL for t > 0, discretised decoder NLL for t = 0.

    No stop-gradient here; :func:`hybrid_loss` passes ``eps.detach()``."""
    terms = _terms(betas)
    t = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
    true_mean, true_log_var = terms.q_posterior(x_start, x_t, t)
    model_mean, model_log_var = terms.p_mean_log_variance(eps, v, x_t, t)
    kl = _mean_flat(normal_kl(true_mean, true_log_var, model_mean, model_log_var)) / math.log(2.0)
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x_start, model_mean, 0.5 * model_log_var)) / math.log(2.0)
    return torch.where(t == 0, nll, kl)


def hybrid_loss(model_output, x_start, x_t, t, noise, betas, lambda_vlb: float = 0.001):
    """IDDPM hybrid loss ``L_simple + λ·T·L_t`` (see the module docstring for the λ convention).

    Args:
        model_output: (B, 2C, H, W) = ``[ε_θ, v]``.
        x_start, x_t, noise: (B, C, H, W); ``x_t = √ᾱ_t x_start + √(1−ᾱ_t) noise``.
        t: (B,) 0-based timestep indices (or a scalar).
        betas: the schedule (e.g. ``DDPMScheduler.betas``) or a prepared :class:`GaussianDiffusionTerms`.
        lambda_vlb: λ; 0.001 in NASDM.

    Returns:
        ``(loss, logs)``: scalar batch-mean loss and a dict with batch means ``"simple"`` and ``"vlb"``
        (unweighted L_t, bits/dim) and their per-sample tensors ``"simple_per_sample"``,
        ``"vlb_per_sample"`` (all detached).
    """
    terms = _terms(betas)
    channels = x_start.shape[1]
    if model_output.shape[1] != 2 * channels:
        raise ValueError(f"model_output needs 2*{channels} channels [eps, v], got {model_output.shape[1]}")
    eps, v = model_output[:, :channels], model_output[:, channels:]
    simple = _mean_flat((noise - eps) ** 2)
    vlb = vlb_terms(eps.detach(), v, x_start, x_t, t, terms)  # stop-gradient: L_vlb trains only Σ
    per_sample = simple + lambda_vlb * terms.num_timesteps * vlb
    logs = {
        "simple": simple.mean().detach(),
        "vlb": vlb.mean().detach(),
        "simple_per_sample": simple.detach(),
        "vlb_per_sample": vlb.detach(),
    }
    return per_sample.mean(), logs
