"""The noise schedulers of the methods, built from their recipes' named fields (diffusers schedulers)."""

from __future__ import annotations

from diffusers import DDIMScheduler, DDPMScheduler


def ddpm_scheduler(diffusion, *, variance_type: str = "fixed_small", clip_sample: bool = False) -> DDPMScheduler:
    """The forward process of a recipe's ``diffusion`` section (num_train_timesteps, beta_schedule, beta_start,
    beta_end, and prediction_type when it has one). NASDM: learned-range variance and clipping to [-1, 1]."""
    return DDPMScheduler(num_train_timesteps=diffusion.num_train_timesteps, beta_schedule=diffusion.beta_schedule,
                         beta_start=diffusion.beta_start, beta_end=diffusion.beta_end, variance_type=variance_type,
                         clip_sample=clip_sample, prediction_type=getattr(diffusion, "prediction_type", "epsilon"))


def ldm_ddim_scheduler(num_train_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float,
                       prediction_type: str = "epsilon") -> DDIMScheduler:
    """DDIM as LDM's sampler: timesteps 1 + k·⌊T/n⌋ ("leading" spacing, steps_offset 1), the last step going to
    ᾱ of t = 0 (set_alpha_to_one false), no clipping."""
    return DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start,
                         beta_end=beta_end, prediction_type=prediction_type, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
