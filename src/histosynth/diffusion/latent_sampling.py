"""The sampling loop of the latent pipelines (PathLDM, HistoSmith, ZoomLDM, DISC): a conditional UNet with
classifier-free guidance on any scheduler (default each pipeline's DDIM, LDM's sampler), written once."""

from __future__ import annotations

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from histosynth.diffusion.guidance import classifier_free_guidance
from histosynth.diffusion.sampling_loop import ModelInput, denoise

__all__ = ["denoise_latents"]


def denoise_latents(unet, scheduler: SchedulerMixin, num_inference_steps: int, batch: int, guidance_scale: float, *,
                    eta: float = 0.0, generator=None, progress_bar=None, latents: torch.Tensor | None = None,
                    concat: torch.Tensor | None = None, after_step=None, **conditions) -> torch.Tensor:
    """Latents (batch, C, s, s) denoised from Gaussian noise by exactly ``num_inference_steps`` steps of ``scheduler``.

    Each step is one UNet pass on the batched [∅; y] pair combined by :func:`classifier_free_guidance` (diffusers'
    g; one pass on y alone when g = 1). ``conditions``: the UNet's condition inputs (``encoder_hidden_states``,
    ``class_labels``), already stacked null-first when g != 1. ``latents``: the starting unit noise (batch, C, s, s)
    (default drawn from ``generator``); ``concat``: channels concatenated to the UNet's input at every step (stacked
    like the conditions; C = the UNet's out_channels); ``after_step(latents) -> latents``: applied after every step
    (e.g. DISC's fusion). ``eta``: DDIM's η (0 for the other schedulers). The latents stay float32 whatever the UNet's
    dtype; the UNet's float inputs (sample, conditions, ``concat``) are cast to its dtype and its output back.

    Raises:
        HistosynthError: a step count the schedule cannot run (see :func:`check_num_steps`); η ≠ 0 without DDIM.
    """
    size = unet.config.sample_size
    if latents is None:
        latents = randn_tensor((batch, unet.config.out_channels, size, size), generator=generator, device=unet.device,
                               dtype=torch.float32)
    latents = latents.float()  # the scheduler steps in float32 whatever the UNet's precision
    do_guidance = guidance_scale != 1.0
    # the UNet's precision (`sample --precision`): its float inputs in its dtype, the latents float32
    conditions = {k: v.to(unet.dtype) if torch.is_tensor(v) and v.is_floating_point() else v
                  for k, v in conditions.items()}
    model_input = ModelInput(latents.shape, 2 if do_guidance else 1, unet.dtype, latents.device, concat)

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps = unet(model_input(x), t, **conditions).sample.to(x.dtype)  # guidance and the step in float32
        return classifier_free_guidance(*eps.chunk(2), guidance_scale) if do_guidance else eps

    return denoise(predict, scheduler, num_inference_steps, latents, eta=eta, generator=generator,
                   progress_bar=progress_bar, after_step=after_step)
