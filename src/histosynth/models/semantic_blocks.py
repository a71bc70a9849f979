"""Down / middle / up blocks of the SDM-style :class:`~histosynth.models.SemanticUNet`.

The encoder is a plain ADM (guided-diffusion) encoder built from diffusers' ``ResnetBlock2D`` with
scale-shift timestep conditioning; the middle and decoder use :class:`SPADEResBlock`, which also sees the
semantic condition. Self-attention is diffusers' ``Attention`` (GroupNorm + residual, like ADM's
``AttentionBlock``). As in ADM, the output projections of residual branches and attention are
zero-initialised, so every block starts as the identity.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from .spade import SPADEResBlock

__all__ = ["SemanticDownBlock", "SemanticMidBlock", "SemanticUpBlock", "make_attention"]


def _zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def make_attention(channels: int, num_head_channels: int, groups: int, eps: float = 1e-5) -> Attention:
    """ADM-style spatial self-attention: ``channels // num_head_channels`` heads (at least one)."""
    heads = max(1, channels // num_head_channels)
    if channels % heads:
        raise ValueError(f"{channels} channels cannot be split into {heads} attention heads")
    attn = Attention(
        channels,
        heads=heads,
        dim_head=channels // heads,
        eps=eps,
        norm_num_groups=groups,
        residual_connection=True,
        bias=True,
        upcast_softmax=True,
        _from_deprecated_attn_block=True,
    )
    _zero_(attn.to_out[0])
    return attn


class SemanticDownBlock(nn.Module):
    """``num_layers`` × (ResnetBlock2D [+ attention]) then an optional strided-conv downsample.

    ``forward`` returns the output and the tuple of states the decoder concatenates as skips.
    """

    def __init__(self, in_channels, out_channels, temb_channels, num_layers, add_attention, add_downsample,
                 num_head_channels=64, dropout=0.0, groups=32, eps=1e-5):
        super().__init__()
        self.resnets = nn.ModuleList()
        self.attentions = nn.ModuleList()
        for i in range(num_layers):
            block = ResnetBlock2D(
                in_channels=in_channels if i == 0 else out_channels, out_channels=out_channels,
                temb_channels=temb_channels, dropout=dropout, groups=groups, eps=eps,
                time_embedding_norm="scale_shift",
            )
            _zero_(block.conv2)
            self.resnets.append(block)
            self.attentions.append(make_attention(out_channels, num_head_channels, groups, eps) if add_attention
                                   else nn.Identity())
        self.downsample = Downsample2D(out_channels, use_conv=True, padding=1, name="op") if add_downsample else None

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        skips = ()
        for resnet, attn in zip(self.resnets, self.attentions):
            h = attn(resnet(h, temb))
            skips += (h,)
        if self.downsample is not None:
            h = self.downsample(h)
            skips += (h,)
        return h, skips


class SemanticMidBlock(nn.Module):
    """SDM's middle: SPADEResBlock → attention → SPADEResBlock."""

    def __init__(self, channels, temb_channels, cond_channels, num_head_channels=64, dropout=0.0, groups=32,
                 spade_hidden=128, eps=1e-5):
        super().__init__()
        spade = dict(temb_channels=temb_channels, cond_channels=cond_channels, dropout=dropout, groups=groups,
                     spade_hidden=spade_hidden, eps=eps)
        self.resnet1 = SPADEResBlock(channels, channels, **spade)
        self.attention = make_attention(channels, num_head_channels, groups, eps)
        self.resnet2 = SPADEResBlock(channels, channels, **spade)

    def forward(self, h: torch.Tensor, temb: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return self.resnet2(self.attention(self.resnet1(h, temb, cond)), temb, cond)


class SemanticUpBlock(nn.Module):
    """``num_layers`` × (concat skip → SPADEResBlock [+ attention]) then an optional nearest+conv upsample.

    Channel bookkeeping follows diffusers' ``UpBlock2D``: the first block receives ``prev_output_channels``,
    the last skip of the block comes from the encoder level below (``in_channels``).
    """

    def __init__(self, in_channels, prev_output_channels, out_channels, temb_channels, cond_channels, num_layers,
                 add_attention, add_upsample, num_head_channels=64, dropout=0.0, groups=32, spade_hidden=128,
                 eps=1e-5):
        super().__init__()
        self.resnets = nn.ModuleList()
        self.attentions = nn.ModuleList()
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            block_in = prev_output_channels if i == 0 else out_channels
            self.resnets.append(SPADEResBlock(
                block_in + skip_channels, out_channels, temb_channels, cond_channels, dropout, groups,
                spade_hidden, eps,
            ))
            self.attentions.append(make_attention(out_channels, num_head_channels, groups, eps) if add_attention
                                   else nn.Identity())
        self.upsample = Upsample2D(out_channels, use_conv=True) if add_upsample else None

    def forward(self, h: torch.Tensor, skips: tuple[torch.Tensor, ...], temb: torch.Tensor,
                cond: torch.Tensor) -> torch.Tensor:
        for resnet, attn in zip(self.resnets, self.attentions):
            h = torch.cat([h, skips[-1]], dim=1)
            skips = skips[:-1]
            h = attn(resnet(h, temb, cond))
        if self.upsample is not None:
            h = self.upsample(h)
        return h
