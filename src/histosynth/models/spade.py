"""Spatially-adaptive normalisation (SPADE) blocks of the Semantic Diffusion Model (SDM).

SDM (Wang et al. 2022) injects the semantic layout into the UNet decoder by replacing the affine part of
every GroupNorm with a per-pixel scale and shift predicted from the layout (Park et al. 2019, SPADE).
NASDM uses this network unchanged with its nuclei condition (type channels + edge map).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SPADEGroupNorm", "SPADEResBlock"]


class SPADEGroupNorm(nn.Module):
    """``GroupNorm(x)`` without affine, modulated by the condition: ``x̂ · (1 + γ(seg)) + β(seg)``.

    ``seg`` is the condition resized (nearest) to the spatial size of ``x``; γ and β come from a shared
    conv3x3-ReLU trunk with ``hidden`` channels followed by one conv3x3 head each, as in SPADE / SDM.
    """

    def __init__(self, num_channels: int, cond_channels: int, groups: int = 32, hidden: int = 128, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.GroupNorm(groups, num_channels, eps=eps, affine=False)
        self.mlp_shared = nn.Sequential(nn.Conv2d(cond_channels, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, num_channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, num_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        seg = F.interpolate(cond.to(x.dtype), size=x.shape[-2:], mode="nearest")
        actv = self.mlp_shared(seg)
        return self.norm(x) * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResBlock(nn.Module):
    """SDM's decoder residual block (``SDMResBlock`` with ``use_scale_shift_norm=True``)::

        h = conv3x3(SiLU(SPADE(x, c)))
        scale, shift = Linear(SiLU(temb)).chunk(2)            # AdaGN
        h = SPADE(h, c) · (1 + scale) + shift
        h = zero_conv3x3(Dropout(SiLU(h)))
        out = skip(x) + h                                       # skip = 1x1 conv iff channels change

    The last conv is zero-initialised, so a fresh block is the identity on its (projected) input.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        temb_channels: int,
        cond_channels: int,
        dropout: float = 0.0,
        groups: int = 32,
        spade_hidden: int = 128,
        eps: float = 1e-5,
    ):
        super().__init__()
        self.in_norm = SPADEGroupNorm(in_channels, cond_channels, groups, spade_hidden, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, 2 * out_channels)
        self.out_norm = SPADEGroupNorm(out_channels, cond_channels, groups, spade_hidden, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.in_norm(x, cond)))
        scale, shift = self.time_emb_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
        h = self.out_norm(h, cond) * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h
