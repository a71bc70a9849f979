"""What the latent-diffusion tasks share (PathLDM, HistoSmith, ZoomLDM, DISC): the frozen first stage, its latent
cache, the UNet built from a recipe and LDM's LR warm-up. Method-specific pieces stay in each method's task.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from histosynth.diffusion import latent_cache as cache
from histosynth.diffusion.schedulers import ldm_ddim_scheduler, sampling_scheduler
from histosynth.errors import HistosynthError
from histosynth.recipes.latent import AutoencoderConfig
from histosynth.training.latent_conditions import resolve_path

LR_WARMUP_START = 1e-6  # LDM's LambdaLinearScheduler f_start


def ldm_warmup_factor(step: int, warmup: int) -> float:
    """LDM's LambdaLinearScheduler: linear from LR_WARMUP_START to 1 over ``warmup`` steps, then constant."""
    warmup = max(0, warmup)
    return 1.0 if step >= warmup else LR_WARMUP_START + (1.0 - LR_WARMUP_START) * step / warmup


def shared_latent_cache(accelerator, cache_dir: Path, vae, store, indices, *, progress: bool, **build) -> np.memmap:
    """The latent cache of store patches ``indices`` (diffusion/latent_cache.py): the main process builds it, then
    every process opens it memory-mapped. ``build``: latent_cache's flips= and inputs=."""
    if accelerator.is_main_process:
        cache.latent_cache(cache_dir, vae, store, indices, progress=progress, **build)
    accelerator.wait_for_everyone()
    return cache.latent_cache(cache_dir, vae, store, indices, build=False, **build)


def first_stage(config: AutoencoderConfig, data: Path, *, vq_for: str | None = None):
    """The recipe's frozen autoencoder (``config.path``, relative paths against the store ``data``) and its latent
    scaling factor (``config.scaling_factor``, else the autoencoder's own). ``vq_for``: the method whose first stage
    must be a VQ model (HistosynthError naming ``autoencoder.path`` otherwise)."""
    vae = cache.load_autoencoder(resolve_path(config.path, data))
    if vq_for is not None and not cache.is_vq(vae):
        raise HistosynthError(f"autoencoder.path must be a VQ autoencoder ({vq_for}'s first stage is VQ-f4), found a "
                              f"{type(vae).__name__}", config.path)
    scaling = config.scaling_factor
    return vae, float(vae.config.scaling_factor if scaling is None else scaling)


def cached_latents(stats: np.ndarray, positions: list[int], scaling: float, random_flips: bool,
                   g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled latents (B, C, h, w) float32 of cache ``positions`` (the cache holds each patch's NUM_FLIPS flips),
    each in a flip k drawn from ``g`` (all 0 without ``random_flips``); returns (latents, k)."""
    b = len(positions)
    k = torch.randint(0, cache.NUM_FLIPS, (b,), generator=g) if random_flips else torch.zeros(b, dtype=torch.long)
    z = torch.from_numpy(np.stack([stats[p, int(kk)] for p, kk in zip(positions, k)])) * scaling
    return z, k


def export_scheduler(recipe):
    """The scheduler a latent method's exported pipeline holds: the recipe's ``sampling.scheduler`` on the trained
    schedule (``diffusion``), derived from LDM's DDIM, so that ``pipe(...)`` in Python samples with the recipe's choice
    and swapping ``ddim`` back in by name gives LDM's sampler exactly (its settings stay in the saved config)."""
    d = recipe.diffusion
    ddim = ldm_ddim_scheduler(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end, d.prediction_type)
    name = recipe.sampling.scheduler
    return ddim if name == "ddim" else sampling_scheduler(name, ddim.config)


def make_unet(recipe, latent_channels: int, latent_size: int, **extra) -> UNet2DConditionModel:
    """The cross-attention UNet of a latent recipe's ``unet`` section (PathLDM, ZoomLDM, DISC, HistoSmith), for latents
    of ``latent_channels`` × ``latent_size``², with ``extra`` UNet2DConditionModel settings of the method (HistoSmith's
    class-embedding projection)."""
    u = recipe.unet
    return UNet2DConditionModel(
        sample_size=latent_size, in_channels=latent_channels, out_channels=latent_channels,
        down_block_types=tuple(u.down_block_types), up_block_types=tuple(u.up_block_types),
        block_out_channels=tuple(u.block_out_channels), layers_per_block=u.layers_per_block,
        attention_head_dim=tuple(u.attention_head_dim), cross_attention_dim=u.cross_attention_dim,
        transformer_layers_per_block=u.transformer_layers_per_block, norm_num_groups=u.norm_num_groups,
        mid_block_type=u.mid_block_type, **extra,
    )
