"""ZoomLDM's embedding diffusion model (EDM, Sec. 3.2 and 4): a transformer that denoises summariser tokens.

So that no reference slide is needed at sampling time, a second diffusion model learns the distribution of the
conditions the latent model consumes: the (frozen) summariser's output tokens. The paper: "a Transformer decoder
on the outputs of the summarization CNN that also takes in the magnification and timestep as input tokens",
trained to "directly predict the final conditions from their noisy versions using the standard linear DDPM
schedule" (x0-prediction), sampled with DDIM 50.

Choices where the paper is silent: pre-norm transformer blocks with full (bidirectional) self-attention over the
N + 2 tokens (a "decoder" without cross-attention is this); the timestep token is diffusers' sinusoidal embedding
through an MLP, the magnification token a learned embedding; learned positions; tokens are standardised by the
training set's mean token (``data_mean``, a (N, D) buffer saved with the weights: summaries share a large
constant part) and the global standard deviation around it (``data_std`` in the config), so that the schedule's
unit-variance noise matches the scale of what varies between conditions.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

__all__ = ["ConditionTransformer"]


class ConditionTransformer(ModelMixin, ConfigMixin):
    """x0-prediction over (B, num_tokens, token_dim) standardised condition tokens.

    Args:
        num_tokens: N, tokens per condition (the summariser's, paper 64).
        token_dim: D, their width (paper 512).
        num_magnifications: how many levels the magnification token tells apart.
        width, depth, heads: the transformer's size.
        data_std: the standard deviation of the training conditions around their mean token (set by the training
            task, which also fills the ``data_mean`` buffer).
    """

    @register_to_config
    def __init__(self, num_tokens: int = 64, token_dim: int = 512, num_magnifications: int = 8, width: int = 512,
                 depth: int = 6, heads: int = 8, data_std: float = 1.0):
        super().__init__()
        self.register_buffer("data_mean", torch.zeros(num_tokens, token_dim))
        self.inp = nn.Linear(token_dim, width)
        self.time_proj = Timesteps(width, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embed = TimestepEmbedding(width, width)
        self.mag_embed = nn.Embedding(num_magnifications, width)
        self.positions = nn.Parameter(torch.zeros(1, num_tokens + 2, width))
        nn.init.normal_(self.positions, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, token_dim)

    def forward(self, sample: torch.Tensor, timesteps: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        """Predicted clean tokens x0 (B, N, D) from noisy ``sample`` (B, N, D) at ``timesteps`` (B,) or a scalar,
        for magnification indices ``levels`` (B,) int64."""
        b = sample.shape[0]
        timesteps = torch.as_tensor(timesteps, device=sample.device).reshape(-1).expand(b)
        t_token = self.time_embed(self.time_proj(timesteps).to(sample.dtype))[:, None]
        m_token = self.mag_embed(torch.as_tensor(levels, device=sample.device, dtype=torch.long))[:, None]
        x = torch.cat([t_token, m_token, self.inp(sample)], dim=1) + self.positions
        return self.out(self.norm(self.blocks(x))[:, 2:])

    def standardise(self, tokens: torch.Tensor) -> torch.Tensor:
        return (tokens - self.data_mean.to(tokens.dtype)) / self.config.data_std

    def unstandardise(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens * self.config.data_std + self.data_mean.to(tokens.dtype)
