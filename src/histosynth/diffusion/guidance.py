"""Classifier-free guidance, in the one convention of this project: diffusers' g (Ho & Salimans 2022).

    ε̂ = ε(x_t|∅) + g · (ε(x_t|y) − ε(x_t|∅))          g = 1 → the plain conditional model, g = 0 → unconditional

Every ``guidance_scale`` / ``--guidance`` in histosynth is this g, for every method. NASDM (eq. 7) writes
ε̂ = ε(y) + s·(ε(y) − ε(∅)): the same combination with ``s = g − 1`` (NASDM's s = 1 is g = 2); PathLDM / LDM use
g directly (1.75).
"""

from __future__ import annotations

import torch

__all__ = ["classifier_free_guidance", "guided_model_output"]


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """``eps_uncond + g · (eps_cond − eps_uncond)``; tensors of one shape, g any float."""
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def guided_model_output(
    model_output_uncond: torch.Tensor, model_output_cond: torch.Tensor, guidance_scale: float, in_channels: int
) -> torch.Tensor:
    """Guide the ε channels (the first ``in_channels``) of a ``[ε, v]`` output (B, 2C, H, W) and keep the conditional
    learned-variance channels ``v`` unchanged (as in GLIDE / SDM). Works for ε-only outputs (B, C, H, W) too."""
    eps = classifier_free_guidance(model_output_uncond[:, :in_channels], model_output_cond[:, :in_channels],
                                   guidance_scale)
    return torch.cat([eps, model_output_cond[:, in_channels:]], dim=1)

