"""DISC's mask encoder τθ (DISC Sec. 2.1, Fig. 3): a region mask → cross-attention tokens for the latent UNet.

The paper names a convolutional τθ trained jointly with the UNet and gives no layers; ours: the mask as one-hot
(K channels, 0/1) at the image's size → a 3×3 convolution → stride-2 3×3 convolutions with GroupNorm + SiLU until the
token grid (``token_grid`` × ``token_grid``) → a 1×1 projection to the UNet's cross-attention width, plus a learned
position embedding per token (cross-attention alone does not know where a token came from; the position embedding
tells the UNet which part of the tile a region covers). The null condition of classifier-free guidance is a learned
token set (``null_tokens``), as ZoomLDM's summariser has.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


def one_hot_masks(masks: torch.Tensor, num_labels: int) -> torch.Tensor:
    """float (B, K, H, W) one-hot of int (B, H, W) region labels 0..K-1; ValueError for a label outside them."""
    if masks.numel() and (int(masks.min()) < 0 or int(masks.max()) >= num_labels):
        raise ValueError(f"region labels {int(masks.min())}..{int(masks.max())} outside 0..{num_labels - 1}")
    return nn.functional.one_hot(masks.long(), num_labels).permute(0, 3, 1, 2).float()


class RegionMaskEncoder(ModelMixin, ConfigMixin):
    """int64 (B, H, W) region masks (labels 0..K-1, H = W = ``mask_size``) → float (B, token_grid², token_dim).

    Args:
        num_labels: K, the region labels (DISC: 4, non-cancer, GG3, GG4, GG5).
        mask_size: the masks' side in pixels (the image's); a power-of-two multiple of ``token_grid``.
        token_grid: tokens per side (the paper's LDM: an 8 × 8 grid of 64 tokens for 256 px masks).
        channels: widths of the downsampling convolutions (the last is repeated until the token grid is reached).
        token_dim: the UNet's ``cross_attention_dim``.
    """

    @register_to_config
    def __init__(self, num_labels: int, mask_size: int, token_grid: int = 8, channels: tuple[int, ...] = (32, 64, 128),
                 token_dim: int = 512, norm_groups: int = 8, label_names: tuple[str, ...] | None = None):
        super().__init__()
        steps = math.log2(mask_size / token_grid)
        if steps < 0 or steps != int(steps):
            raise ValueError(f"mask_size {mask_size} must be token_grid {token_grid} times a power of two")
        widths = [channels[min(i, len(channels) - 1)] for i in range(int(steps) + 1)]
        self.stem = nn.Conv2d(num_labels, widths[0], 3, padding=1)
        self.down = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(min(norm_groups, w_in), w_in), nn.SiLU(), nn.Conv2d(w_in, w_out, 3, stride=2, padding=1))
            for w_in, w_out in zip(widths[:-1], widths[1:]))
        self.out = nn.Sequential(nn.GroupNorm(min(norm_groups, widths[-1]), widths[-1]), nn.SiLU(),
                                 nn.Conv2d(widths[-1], token_dim, 1))
        self.position = nn.Parameter(torch.randn(token_grid * token_grid, token_dim) * 0.02)
        self.null_tokens = nn.Parameter(torch.randn(token_grid * token_grid, token_dim) * 0.02)

    @property
    def num_tokens(self) -> int:
        return self.config.token_grid ** 2

    def null_condition(self, batch: int) -> torch.Tensor:
        """(batch, N, D): the learned null condition ∅."""
        return self.null_tokens[None].expand(batch, -1, -1)

    def forward(self, masks: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens of ``masks`` (int (B, H, W)); rows where bool ``drop`` (B,) is True get the null tokens instead."""
        size = self.config.mask_size
        if masks.shape[-2:] != (size, size):
            raise ValueError(f"masks are {tuple(masks.shape[-2:])} px, this encoder takes {size} x {size}")
        h = self.stem(one_hot_masks(masks.to(self.device), self.config.num_labels).to(self.dtype))
        for block in self.down:
            h = block(h)
        tokens = self.out(h).flatten(2).transpose(1, 2) + self.position
        if drop is not None:
            tokens = torch.where(drop.to(tokens.device)[:, None, None], self.null_condition(len(tokens)), tokens)
        return tokens
