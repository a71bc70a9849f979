"""ZoomLDM's magnification-aware summariser: an SSL embedding grid of any size → a fixed set of cross-attention tokens.

A 256 px patch at magnification 20x / 2^k covers 2^k × 2^k base (20x) tiles, each embedded once by an SSL encoder:
its condition is a (2^k, 2^k, C) grid (1×1 at 20x ... 128×128 at 0.15625x). ZoomLDM (Sec. 3.1, Fig. 1) brings every
grid to one size by nearest-neighbour upsampling (128 × 128 × C) and compresses it with a CNN of four residual
blocks (conv, batch norm, max-pool), made magnification-aware by FiLM (scale and shift from a learned
magnification embedding, Perez et al. 2018), into 8 × 8 × 512 = 64 tokens the UNet cross-attends to. It is trained
jointly with the UNet.

Choices where the paper is silent (its supplementary is not in our text):
- A 1 × 1 convolution (``stem``) maps the C-dim embeddings to the first block width *before* the upsampling. A
  1 × 1 convolution commutes with nearest-neighbour upsampling, so this is the same function as applying it after,
  at the cost of the grid (≤ 128²) instead of the upsampled map: a 1280-d offline encoder stays cheap.
- A grid larger than ``input_size`` (only when a recipe chooses input_size < 128) is average-pooled down instead.
- Block: conv3×3 → BN → FiLM → SiLU → conv3×3 → BN, plus a 1 × 1 projection of the input, → SiLU → max-pool 2.
  FiLM scales by (1 + γ) so that a fresh summariser starts as the plain CNN.
- The null condition of classifier-free guidance is a learned set of tokens (``null_tokens``).
- ``architecture="vit"``: the public code's variant, a ViT over the (upsampled) grid cut into 8 × 8 patches, with a
  magnification token; the same tokens out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

__all__ = ["EmbeddingSummariser"]


class _FiLMBlock(nn.Module):
    """One residual block: conv → BN → FiLM(magnification) → SiLU → conv → BN, + 1×1 skip, SiLU, max-pool 2."""

    def __init__(self, cin: int, cout: int, mag_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Conv2d(cin, cout, 1, bias=False)
        self.film = nn.Linear(mag_dim, 2 * cout)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: torch.Tensor, mag: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(mag)[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.bn1(self.conv1(x)) * (1 + gamma) + beta)
        h = self.bn2(self.conv2(h))
        return F.max_pool2d(F.silu(h + self.skip(x)), 2)


class EmbeddingSummariser(ModelMixin, ConfigMixin):
    """(grids, magnification indices) → (B, num_tokens, token_dim) cross-attention tokens (ZoomLDM Sec. 3.1).

    Args:
        embed_dim: C, the SSL encoder's feature size (HIPT ViT-S/16: 384; offline EfficientNet-Lite0: 1280).
        magnifications: the model's levels, e.g. ["20x", "10x", ...]; inputs name a level by its index here.
        architecture: "cnn" (the paper's FiLM CNN) or "vit" (the public code's variant).
        input_size: the side every grid is brought to (paper 128); must be 16 × the token side (four halvings).
        block_channels: widths of the four residual blocks (paper: ending at 512).
        token_dim: width of the output tokens (= the UNet's cross_attention_dim); a linear map when it differs from
            the last block's width.
        mag_embed_dim: width of the learned magnification embedding that FiLM reads.
        vit_width, vit_depth, vit_heads: the ViT variant's size.
    """

    @register_to_config
    def __init__(self, embed_dim: int = 384, magnifications: tuple[str, ...] = ("20x",), architecture: str = "cnn",
                 input_size: int = 128, block_channels: tuple[int, ...] = (128, 256, 384, 512), token_dim: int = 512,
                 mag_embed_dim: int = 128, vit_width: int = 256, vit_depth: int = 4, vit_heads: int = 4):
        super().__init__()
        if architecture not in ("cnn", "vit"):
            raise ValueError(f"architecture must be 'cnn' or 'vit', got {architecture!r}")
        if len(block_channels) != 4:
            raise ValueError(f"block_channels must list four widths (four residual blocks), got {list(block_channels)}")
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16 (four halvings), got {input_size}")
        self.side = input_size // 16
        self.mag_embedding = nn.Embedding(len(magnifications), mag_embed_dim)
        if architecture == "cnn":
            widths = list(block_channels)
            self.stem = nn.Conv2d(embed_dim, widths[0], 1)
            self.blocks = nn.ModuleList(_FiLMBlock(cin, cout, mag_embed_dim)
                                        for cin, cout in zip([widths[0]] + widths[:-1], widths))
            out = widths[-1]
        else:
            patch = input_size // self.side
            self.stem = nn.Conv2d(embed_dim, vit_width, 1)
            self.patchify = nn.Conv2d(vit_width, vit_width, patch, stride=patch)
            self.mag_token = nn.Linear(mag_embed_dim, vit_width)
            self.positions = nn.Parameter(torch.zeros(1, self.side * self.side + 1, vit_width))
            nn.init.normal_(self.positions, std=0.02)
            layer = nn.TransformerEncoderLayer(vit_width, vit_heads, 4 * vit_width, dropout=0.0, activation="gelu",
                                               batch_first=True, norm_first=True)
            self.vit = nn.TransformerEncoder(layer, vit_depth, enable_nested_tensor=False)
            self.vit_norm = nn.LayerNorm(vit_width)
            out = vit_width
        self.proj = nn.Identity() if out == token_dim else nn.Linear(out, token_dim)
        self.null_tokens = nn.Parameter(torch.zeros(self.side * self.side, token_dim))

    @property
    def num_tokens(self) -> int:
        return self.side * self.side

    def level_index(self, magnification: str) -> int:
        """Index of a magnification ("5x") among the model's levels; ValueError naming the known ones."""
        names = list(self.config.magnifications)
        if magnification not in names:
            raise ValueError(f"magnification {magnification} is not one of the model's ({', '.join(names)})")
        return names.index(magnification)

    def resize_grids(self, grids) -> torch.Tensor:
        """(B, width, S, S): each (g, g, C) grid (a list, or one (B, g, g, C) tensor) through the stem, then to S × S
        (nearest up, average-pool down)."""
        size = self.config.input_size
        grids = list(grids)  # a (B, g, g, C) tensor or a list of (g, g, C) grids
        out: list[torch.Tensor | None] = [None] * len(grids)
        by_side: dict[int, list[int]] = {}  # one stem pass per grid size (a level's grids share it)
        for i, grid in enumerate(grids):
            by_side.setdefault(int(grid.shape[0]), []).append(i)
        for g, items in by_side.items():
            batch = torch.stack([torch.as_tensor(grids[i]) for i in items]).to(self.device, self.dtype)
            x = self.stem(batch.permute(0, 3, 1, 2))  # (n, width, g, g)
            x = F.interpolate(x, size=(size, size), mode="nearest") if g <= size else F.adaptive_avg_pool2d(x, size)
            for i, xi in zip(items, x):
                out[i] = xi
        return torch.stack(out)

    def forward(self, grids, levels: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens of each grid.

        Args:
            grids: B embedding grids, each (g, g, C) (g may differ per item: 2^k for level k), as a list of arrays /
                tensors or one (B, g, g, C) tensor.
            levels: int64 (B,), each grid's magnification as an index into ``config.magnifications``.
            drop: bool (B,) or None; True → the learned null tokens (classifier-free guidance's ∅).
        Returns:
            (B, num_tokens, token_dim) tokens in the model's dtype.
        """
        levels = torch.as_tensor(levels, device=self.device, dtype=torch.long)
        mag = self.mag_embedding(levels)
        x = self.resize_grids(grids)
        if self.config.architecture == "cnn":
            for block in self.blocks:
                x = block(x, mag)
            tokens = x.flatten(2).transpose(1, 2)  # (B, side², width), row-major over the 8×8 map
        else:
            x = self.patchify(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.mag_token(mag)[:, None], x], dim=1) + self.positions
            tokens = self.vit_norm(self.vit(x))[:, 1:]
        tokens = self.proj(tokens)
        if drop is not None:
            drop = torch.as_tensor(drop, device=self.device, dtype=torch.bool)
            tokens = torch.where(drop[:, None, None], self.null_condition(len(levels)).to(tokens.dtype), tokens)
        return tokens

    def null_condition(self, batch: int) -> torch.Tensor:
        """(batch, num_tokens, token_dim) learned null tokens."""
        return self.null_tokens[None].expand(batch, -1, -1)
