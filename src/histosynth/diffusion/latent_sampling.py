"""The sampling loop of the latent pipelines (PathLDM-style DDIM with classifier-free guidance), written once."""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

from histosynth.diffusion.guidance import classifier_free_guidance
from histosynth.errors import HistosynthError


def max_ddim_steps(scheduler_config) -> int:
    """The most DDIM steps whose timesteps all lie in 0..T-1 under this config's spacing and offset (LDM's "leading"
    spacing with steps_offset 1 at T = 1000: 999, as 1000 steps would start at t = 1000)."""
    total_t = int(scheduler_config["num_train_timesteps"])
    scheduler = DDIMScheduler.from_config(scheduler_config)
    for n in range(total_t, 0, -1):
        scheduler.set_timesteps(n)
        if int(scheduler.timesteps.max()) < total_t and len(scheduler.timesteps) == n:
            return n
    return 0


def check_ddim_steps(scheduler_config, num_inference_steps: int) -> None:
    """HistosynthError unless exactly ``num_inference_steps`` DDIM steps can run on this schedule (checked before
    any sampling, so a command fails before writing anything)."""
    total_t = int(scheduler_config["num_train_timesteps"])
    scheduler = DDIMScheduler.from_config(scheduler_config)
    if num_inference_steps >= 1 and num_inference_steps <= total_t:
        scheduler.set_timesteps(num_inference_steps)
        if int(scheduler.timesteps.max()) < total_t and len(scheduler.timesteps) == num_inference_steps:
            return
    raise HistosynthError(f"num_inference_steps (--steps) must be within 1..{max_ddim_steps(scheduler_config)} for "
                          f"this model's DDIM schedule (T = {total_t}), got {num_inference_steps}")


def ddim_latents(unet, scheduler_config, num_inference_steps: int, batch: int, guidance_scale: float, *,
                 eta: float = 0.0, generator=None, progress_bar=None, latents: torch.Tensor | None = None,
                 concat: torch.Tensor | None = None, after_step=None, **conditions) -> torch.Tensor:
    """Latents (batch, C, s, s) denoised from Gaussian noise by exactly ``num_inference_steps`` DDIM steps.

    Each step is one UNet pass on the batched [∅; y] pair combined by :func:`classifier_free_guidance` (diffusers'
    g; one pass on y alone when g = 1), then ``DDIMScheduler.step`` with ``eta``. ``conditions``: the UNet's
    condition inputs (``encoder_hidden_states``, ``class_labels``), already stacked null-first when g != 1.
    ``latents``: the starting noise (batch, C, s, s) (default drawn from ``generator``); ``concat``: channels
    concatenated to the UNet's input at every step (stacked like the conditions; C = the UNet's out_channels);
    ``after_step(latents) -> latents``: applied after every step (e.g. DISC's fusion). ``progress_bar``: wraps the
    timesteps (a pipeline's ``self.progress_bar``), or None.

    Raises:
        HistosynthError: a step count the schedule cannot run (see :func:`check_ddim_steps`).
    """
    check_ddim_steps(scheduler_config, num_inference_steps)
    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_inference_steps, device=unet.device)
    size = unet.config.sample_size
    shape = (batch, unet.config.out_channels, size, size)
    if latents is None:
        latents = randn_tensor(shape, generator=generator, device=unet.device, dtype=unet.dtype)
    latents = latents * scheduler.init_noise_sigma
    do_guidance = guidance_scale != 1.0
    for t in progress_bar(scheduler.timesteps) if progress_bar is not None else scheduler.timesteps:
        x_in = torch.cat([latents, latents]) if do_guidance else latents
        if concat is not None:
            x_in = torch.cat([x_in, concat], dim=1)
        eps = unet(x_in, t, **conditions).sample
        if do_guidance:
            eps = classifier_free_guidance(*eps.chunk(2), guidance_scale)
        latents = scheduler.step(eps, t, latents, eta=eta, generator=generator).prev_sample
        if after_step is not None:
            latents = after_step(latents)
    return latents
