"""The latent core's recipe sections, shared by every latent-diffusion method (PathLDM, HistoSmith, ZoomLDM, DISC):
the frozen first stage, the UNet, the forward process, the sampler defaults, the training fields, and the rules
they share. Each method's recipe module adds its own condition section and defaults.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from histosynth.recipes.base import EngineConfig, ForwardProcessConfig, SchedulerName

__all__ = ["AutoencoderConfig", "LatentDiffusionConfig", "LatentTrainConfig", "SamplingConfig", "UNetConfig",
           "latent_diffusion_problems"]


@dataclass
class AutoencoderConfig:
    """The frozen first stage: a diffusers ``VQModel`` / ``AutoencoderKL`` folder (``save_pretrained``), or a
    run of ``histosynth train autoencoder`` (its ``RUN/autoencoder``)."""

    path: str
    # latents = encoder output × scaling_factor; null: the autoencoder config's ``scaling_factor``.
    # LDM / PathLDM's VQ-f4 uses 1.0 (its config sets no scale_factor).
    scaling_factor: float | None = None


@dataclass
class UNetConfig:
    """diffusers ``UNet2DConditionModel`` (in/out channels and sample size come from the autoencoder)."""

    block_out_channels: tuple[int, ...] = (192, 384, 576, 960)
    layers_per_block: int = 2
    # diffusers' (legacy-named) attention_head_dim is the number of heads per block, as in Stable
    # Diffusion's configs; LDM's num_heads: 1 is (1, 1, 1, 1)
    attention_head_dim: tuple[int, ...] = (1, 1, 1, 1)
    cross_attention_dim: int = 512  # = the text encoder's width (CLIP ViT-B/PLIP 512, MiniLM 384)
    down_block_types: tuple[str, ...] = ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D")
    up_block_types: tuple[str, ...] = ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")
    # diffusers' default; HistoSmith's count embedding without tokens needs the plain UNetMidBlock2D
    mid_block_type: Literal["UNetMidBlock2DCrossAttn", "UNetMidBlock2D"] = "UNetMidBlock2DCrossAttn"
    transformer_layers_per_block: int = 1
    norm_num_groups: int = 32


@dataclass
class LatentDiffusionConfig(ForwardProcessConfig):
    """Forward process and objective (LDM: make_beta_schedule "linear" is sqrt-spaced = diffusers' scaled_linear)."""

    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    prediction_type: Literal["epsilon"] = "epsilon"  # what PathLDM / LDM train; others are not implemented


@dataclass
class SamplingConfig:
    """Defaults of `histosynth sample` for this model (PathLDM Sec. 4, 5.1: DDIM 50 steps, guidance 1.75). DDIM 20: the
    smallest count that matched the paper's 50 within noise in FD and blur on both tiny PathLDMs (docs/benchmarks.md,
    "Quality vs sampling steps"); the other latent methods set their own."""

    num_inference_steps: int = 20
    guidance_scale: float = 1.75  # diffusers / LDM convention: uncond + g·(cond − uncond); NASDM's s = g − 1
    eta: float = 0.0  # DDIM's η (0 for the other schedulers)
    scheduler: SchedulerName = "ddim"  # any one-evaluation-per-step diffusers scheduler on the trained schedule


@dataclass(kw_only=True)
class LatentTrainConfig(EngineConfig):
    steps: int
    learning_rate: float = 2e-5
    lr_warmup_steps: int = 10000  # linear warm-up from 1e-6·lr (LDM's LambdaLinearScheduler), then constant
    batch_size: int = 48  # per device
    condition_dropout: float = 0.1  # caption → "" (text) or class → null class, for classifier-free guidance
    weight_decay: float = 0.01  # LDM: torch.optim.AdamW's default
    ema_decay: float | None = 0.9999  # 0 or null = no averaging (the exported weights are the trained ones)
    max_grad_norm: float = 0.0  # 0 = no clipping (LDM)
    random_flips: bool = True  # PathLDM: random horizontal and vertical flips (4 variants)
    # encode every patch (and its flips) once into RUN/cache; off for stores too large to cache on disk
    cache_latents: bool = True
    # where the caches live; null: RUN/cache. Files are named by content keys, so runs can share a directory
    # (e.g. "{data}/../latent-cache" for a text and a class model on the same latents)
    cache_dir: str | None = None
    init_unet: str | None = None  # a diffusers UNet folder or a CompVis LDM .ckpt (shape-matching tensors)


def latent_diffusion_problems(u: UNetConfig, t: LatentTrainConfig) -> list[str]:
    """The rules every latent-diffusion recipe shares: the UNet's per-block lists, its group norm, dropout, steps."""
    problems = t.problems()
    n = len(u.block_out_channels)
    for name in ("down_block_types", "up_block_types", "attention_head_dim"):
        if len(getattr(u, name)) != n:
            problems.append(f"unet.{name} has {len(getattr(u, name))} entries for {n} blocks (block_out_channels)")
    if any(ch % u.norm_num_groups for ch in u.block_out_channels):
        problems.append(f"unet.block_out_channels {u.block_out_channels} must be multiples of norm_num_groups {u.norm_num_groups}")
    if not 0.0 <= t.condition_dropout <= 1.0:
        problems.append(f"train.condition_dropout must be in [0, 1], got {t.condition_dropout}")
    if t.steps < 1:
        problems.append(f"train.steps must be at least 1, got {t.steps}")
    return problems

