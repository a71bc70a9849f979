"""SDM's semantic UNet, the denoiser of NASDM.

Architecture (Wang et al. 2022, "Semantic Image Synthesis via Diffusion Models", Fig. 3), on top of
the ADM / guided-diffusion UNet:

* **encoder** — plain ADM encoder: ``conv_in``, then per level ``layers_per_block`` ResnetBlock2D
  (timestep as scale-shift, AdaGN) with self-attention at ``attention_resolutions``, then a strided-conv
  downsample (not after the last level). The encoder never sees the condition.
* **middle** — SPADEResBlock → attention → SPADEResBlock.
* **decoder** — per level ``layers_per_block + 1`` SPADEResBlocks, each on the concatenation of the
  current features and one encoder skip, attention at ``attention_resolutions``, nearest+conv upsample.
  Every normalisation is a :class:`~histosynth.models.spade.SPADEGroupNorm` fed by the condition
  resized (nearest) to the feature-map size.
* **out** — GroupNorm → SiLU → zero-initialised conv3x3 to ``2·in_channels`` channels when
  ``learn_sigma`` (ε then the variance interpolation ``v`` of Improved DDPM) else ``in_channels``.

Default config (128 px NASDM patches): ``block_out_channels=(128, 128, 256, 256, 512)`` gives feature
maps 128, 64, 32, 16, 8 with self-attention at 32, 16 and 8 (ADM's 128 px attention setting), two blocks
per level, 64 channels per head: 113.3 M parameters (31.5 M of them in the SPADE γ/β convolutions).
NASDM does not state its model size; SDM's own 256 px models are several times larger. The default
``cond_channels=5`` is CoNSeP's 4 merged nucleus types + edge map; the paper's Lizard data (6 types)
needs ``cond_channels=7`` — set it from the recipe.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .semantic_blocks import SemanticDownBlock, SemanticMidBlock, SemanticUpBlock

__all__ = ["SemanticUNet"]


class SemanticUNet(ModelMixin, ConfigMixin):
    """SPADE-conditioned diffusion UNet (SDM / NASDM). ``forward(sample, timestep, condition) -> Tensor``."""

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 128,
        in_channels: int = 3,
        cond_channels: int = 5,
        learn_sigma: bool = True,
        block_out_channels: tuple[int, ...] = (128, 128, 256, 256, 512),
        layers_per_block: int = 2,
        attention_resolutions: tuple[int, ...] = (32, 16, 8),
        num_head_channels: int = 64,
        dropout: float = 0.0,
        norm_num_groups: int = 32,
        spade_hidden: int = 128,
    ):
        super().__init__()
        self.gradient_checkpointing = False
        channels = list(block_out_channels)
        levels = len(channels)
        if levels < 1:
            raise ValueError("block_out_channels must not be empty")
        if sample_size % 2 ** (levels - 1):
            raise ValueError(f"sample_size {sample_size} must be divisible by 2**{levels - 1}")
        time_dim = 4 * channels[0]
        groups, eps = norm_num_groups, 1e-5
        common = dict(num_head_channels=num_head_channels, dropout=dropout, groups=groups, eps=eps)

        # ADM timestep embedding: [cos, sin] sinusoids → Linear → SiLU → Linear
        self.time_proj = Timesteps(channels[0], flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(channels[0], time_dim)
        self.conv_in = nn.Conv2d(in_channels, channels[0], 3, padding=1)

        self.down_blocks = nn.ModuleList()
        prev = channels[0]
        for level, ch in enumerate(channels):
            self.down_blocks.append(SemanticDownBlock(
                prev, ch, time_dim, layers_per_block,
                add_attention=(sample_size >> level) in attention_resolutions,
                add_downsample=level < levels - 1, **common,
            ))
            prev = ch

        self.mid_block = SemanticMidBlock(channels[-1], time_dim, cond_channels, spade_hidden=spade_hidden, **common)

        self.up_blocks = nn.ModuleList()
        reversed_channels = channels[::-1]
        prev = channels[-1]
        for i, ch in enumerate(reversed_channels):
            level = levels - 1 - i
            self.up_blocks.append(SemanticUpBlock(
                in_channels=reversed_channels[min(i + 1, levels - 1)], prev_output_channels=prev, out_channels=ch,
                temb_channels=time_dim, cond_channels=cond_channels, num_layers=layers_per_block + 1,
                add_attention=(sample_size >> level) in attention_resolutions, add_upsample=level > 0,
                spade_hidden=spade_hidden, **common,
            ))
            prev = ch

        self.conv_norm_out = nn.GroupNorm(groups, channels[0], eps=eps)
        self.conv_out = nn.Conv2d(channels[0], 2 * in_channels if learn_sigma else in_channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int,
                condition: torch.Tensor) -> torch.Tensor:
        """Predict ``[ε, v]`` (or ``ε``) for noisy ``sample`` (B, C, H, W) at ``timestep`` (B,) or scalar.

        ``condition`` is (B, cond_channels, H', W'); it is resized (nearest) inside every SPADE norm, so
        its size need not match ``sample``. Pass zeros for the unconditional (null) prediction.
        """
        batch, _, height, width = sample.shape
        factor = 2 ** (len(self.config.block_out_channels) - 1)
        if height % factor or width % factor:
            raise ValueError(f"sample size {height}x{width} must be divisible by {factor}")
        if condition.ndim != 4 or condition.shape[0] != batch or condition.shape[1] != self.config.cond_channels:
            raise ValueError(f"condition must be (B={batch}, {self.config.cond_channels}, H, W), "
                             f"got {tuple(condition.shape)}")
        timesteps = torch.as_tensor(timestep, device=sample.device)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.expand(batch)
        temb = self.time_embedding(self.time_proj(timesteps).to(sample.dtype))
        condition = condition.to(sample.dtype)

        h = self.conv_in(sample)
        skips = (h,)
        for block in self.down_blocks:
            h, block_skips = self._run(block, h, temb)
            skips += block_skips
        h = self._run(self.mid_block, h, temb, condition)
        for block in self.up_blocks:
            n = len(block.resnets)
            h = self._run(block, h, skips[-n:], temb, condition)
            skips = skips[:-n]
        return self.conv_out(F.silu(self.conv_norm_out(h)))
