"""Classifier-free guidance in NASDM's convention (NASDM eq. 7, Ho & Salimans 2022).

NASDM:      ε̂ = ε(x_t|y) + s · (ε(x_t|y) − ε(x_t|∅))          s = 0 → plain conditional model
diffusers:  ε̂ = ε(x_t|∅) + w · (ε(x_t|y) − ε(x_t|∅))          w = 1 → plain conditional model

The two are the same formula with ``w = s + 1``. Every ``scale`` in this project is NASDM's ``s``;
convert with ``w = s + 1`` before handing it to a diffusers pipeline's ``guidance_scale``.
"""

from __future__ import annotations

import torch

__all__ = ["classifier_free_guidance", "guided_model_output"]


def classifier_free_guidance(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """``eps_cond + scale · (eps_cond − eps_uncond)`` (NASDM eq. 7)."""
    return eps_cond + scale * (eps_cond - eps_uncond)


def guided_model_output(
    model_output_cond: torch.Tensor, model_output_uncond: torch.Tensor, scale: float, in_channels: int
) -> torch.Tensor:
    """Guide the ε channels (the first ``in_channels``) of a ``[ε, v]`` output; keep the conditional
    learned-variance channels ``v`` unchanged (as in GLIDE / SDM). Works for ε-only outputs too."""
    eps = classifier_free_guidance(model_output_cond[:, :in_channels], model_output_uncond[:, :in_channels], scale)
    return torch.cat([eps, model_output_cond[:, in_channels:]], dim=1)
