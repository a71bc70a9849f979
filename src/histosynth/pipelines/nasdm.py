"""NASDM sampling pipeline: nuclei masks in, H&E images out.

    pipe = NASDMPipeline.from_pretrained("RUN")            # a training run, or its pipeline/ folder
    images = pipe(conditions, guidance_scale=2.0, num_inference_steps=20).images      # DDPM (paper: 250)
    pipe.scheduler = sampling_scheduler("dpm-solver++", pipe.scheduler.config)         # any scheduler, by name

Reads top to bottom: build the condition tensor (one channel per type + instance edges), start from
Gaussian noise, and at each of exactly `num_inference_steps` steps predict ε with and without the
condition, combine them with classifier-free guidance ε̂ = ε(∅) + g·(ε(y) − ε(∅)) (noise channels only; the
learned variance comes from the conditional pass), and step the scheduler (the loop of
histosynth.diffusion.sampling_loop; a learned-variance DDPM steps with [ε, v], any other scheduler with ε).

Guidance: ``guidance_scale`` is diffusers' g, as everywhere in histosynth (g = 1: the conditional model
alone, one pass per step). NASDM's eq. 7 writes the same combination with s = g − 1: the paper's s = 1
is ``guidance_scale=2.0``, the default.

Defaults (:data:`DEFAULT_SAMPLING`): g = 2 and the trained DDPM at 20 steps, the smallest count that matched the
paper's 250 within noise in FD, mask contrast and blur on two tiny models (docs/benchmarks.md "Quality vs sampling
steps"): 12.5x fewer UNet passes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDPMScheduler
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from histosynth.conditions.nuclei_mask import null_condition_like, nuclei_condition
from histosynth.diffusion.guidance import guided_model_output
from histosynth.diffusion.sampling_loop import ModelInput, denoise, uses_learned_variance
from histosynth.errors import HistosynthError
from histosynth.models import SemanticUNet
from histosynth.pipelines.loading import RunPipeline

DEFAULT_SAMPLING = {"guidance_scale": 2.0, "num_inference_steps": 20, "eta": 0.0}


@dataclass
class NASDMPipelineOutput(BaseOutput):
    images: np.ndarray | torch.Tensor  # (B, H, W, 3) uint8 for "np", (B, 3, H, W) in [-1, 1] for "pt"
    conditions: torch.Tensor  # the condition tensors actually used
    num_steps_run: int  # denoising steps executed (always the number asked)


class NASDMPipeline(RunPipeline):
    model_cpu_offload_seq = "unet"

    def __init__(self, unet: SemanticUNet, scheduler: DDPMScheduler, class_names=None, magnification=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(class_names=list(class_names or []), magnification=magnification)

    @property
    def num_classes(self) -> int:
        return self.unet.config.cond_channels - 1

    def conditions_from_masks(self, masks) -> torch.Tensor:
        """[(inst_map, type_map), ...] → (B, K+1, H, W) condition tensor."""
        return torch.from_numpy(np.stack([nuclei_condition(np.asarray(i), np.asarray(t), self.num_classes) for i, t in masks]))

    @torch.no_grad()
    def __call__(self, masks, guidance_scale: float | None = None, num_inference_steps: int | None = None,
                 eta: float | None = None, generator: torch.Generator | list[torch.Generator] | None = None,
                 output_type: str = "np", progress: bool = True) -> NASDMPipelineOutput:
        """Generate one image per condition with ``self.scheduler`` (the trained DDPM; swap another in by its config,
        e.g. ``pipe.scheduler = sampling_scheduler("dpm-solver++", pipe.scheduler.config)``).

        Args:
            masks: a (B, K+1, H, W) condition tensor, or (inst_map, type_map) pairs of int arrays (H, W).
            guidance_scale: g (NASDM's s = g − 1); default 2.0, the paper's s = 1.
            num_inference_steps: exactly this many steps run; default 20 (paper: DDPM 250; 20 matched it within noise,
                docs/benchmarks.md).
            eta: DDIM's η (0 with any other scheduler); default 0.
        Raises:
            HistosynthError: a condition of the wrong shape, a step count the schedule cannot run, η ≠ 0 without DDIM.
        """
        guidance_scale, num_inference_steps, eta = self.sampling_settings(
            DEFAULT_SAMPLING, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, eta=eta)
        # 1. conditions: either ready tensors (B, K+1, H, W) or (inst_map, type_map) pairs
        cond = masks if isinstance(masks, torch.Tensor) else self.conditions_from_masks(masks)
        if cond.ndim != 4 or cond.shape[1] != self.unet.config.cond_channels:
            raise HistosynthError(
                f"condition tensor has shape {tuple(cond.shape)}; this model expects (B, {self.unet.config.cond_channels}, H, W)"
            )
        device, dtype = self.unet.device, self.unet.dtype
        cond = cond.to(device=device, dtype=torch.float32)
        do_guidance = guidance_scale != 1.0  # g = 1 is the conditional model alone
        model_cond = (torch.cat([cond, null_condition_like(cond)]) if do_guidance else cond).to(dtype)  # [y, ∅]
        in_ch = self.unet.config.in_channels
        model_input = ModelInput((cond.shape[0], in_ch, *cond.shape[2:]), 2 if do_guidance else 1, dtype, device)
        with_variance = uses_learned_variance(self.scheduler)  # DDPM steps with [ε, v]; the others with ε

        def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            x_in = model_input(x)  # [x; x] in the UNet's precision (`sample --precision`), one buffer for all steps
            out = self.unet(x_in, t.expand(x_in.shape[0]), model_cond).to(x.dtype)  # guidance, step: float32
            if do_guidance:
                out_c, out_u = out.chunk(2)
                out = guided_model_output(out_u, out_c, guidance_scale, in_ch)
            return out if with_variance else out[:, :in_ch]

        # 2.-3. from pure noise, exactly the number of steps asked
        noise = randn_tensor((cond.shape[0], in_ch, *cond.shape[2:]), generator=generator, device=device,
                             dtype=torch.float32)
        x = denoise(predict, self.scheduler, num_inference_steps, noise, eta=eta, generator=generator,
                    progress_bar=self.progress_bar if progress else None)
        steps_run = num_inference_steps

        # 4. images
        x = x.clamp(-1, 1)
        if output_type == "pt":
            images = x
        else:
            images = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return NASDMPipelineOutput(images=images, conditions=cond.cpu(), num_steps_run=steps_run)
