"""NASDM sampling pipeline: nuclei masks in, H&E images out.

    pipe = NASDMPipeline.from_pretrained("RUN")            # a training run, or its pipeline/ folder
    images = pipe(conditions, guidance_scale=2.0, num_inference_steps=250, sampler="ddpm").images

Reads top to bottom: build the condition tensor (one channel per type + instance edges), start from
Gaussian noise, and at each of exactly `num_inference_steps` steps predict ε with and without the
condition, combine them with classifier-free guidance ε̂ = ε(∅) + g·(ε(y) − ε(∅)) (noise channels only; the
learned variance comes from the conditional pass), and step the scheduler.

Guidance: ``guidance_scale`` is diffusers' g, as everywhere in histosynth (g = 1: the conditional model
alone, one pass per step). NASDM's eq. 7 writes the same combination with s = g − 1: the paper's s = 1
is ``guidance_scale=2.0``, the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from histosynth.conditions.nuclei_mask import null_condition_like, nuclei_condition
from histosynth.diffusion.guidance import guided_model_output
from histosynth.errors import HistosynthError
from histosynth.models import SemanticUNet

SAMPLERS = ("ddpm", "ddim")


@dataclass
class NASDMPipelineOutput(BaseOutput):
    images: np.ndarray | torch.Tensor  # (B, H, W, 3) uint8 for "np", (B, 3, H, W) in [-1, 1] for "pt"
    conditions: torch.Tensor  # the condition tensors actually used
    num_steps_run: int  # denoising steps executed (always the number asked)


class NASDMPipeline(DiffusionPipeline):
    model_cpu_offload_seq = "unet"

    def __init__(self, unet: SemanticUNet, scheduler: DDPMScheduler, class_names=None, magnification=None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(class_names=list(class_names or []), magnification=magnification)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Also accepts a training run directory (its EMA pipeline lives in RUN/pipeline)."""
        path = Path(pretrained_model_name_or_path)
        if (path / "pipeline" / "model_index.json").is_file():
            path = path / "pipeline"
        elif path.exists() and not (path / "model_index.json").is_file():
            raise HistosynthError("not a NASDM pipeline or training run (no model_index.json)", path)
        return super().from_pretrained(str(path) if path.exists() else pretrained_model_name_or_path, **kwargs)

    @property
    def num_classes(self) -> int:
        return self.unet.config.cond_channels - 1

    def conditions_from_masks(self, masks) -> torch.Tensor:
        """[(inst_map, type_map), ...] → (B, K+1, H, W) condition tensor."""
        return torch.from_numpy(np.stack([nuclei_condition(np.asarray(i), np.asarray(t), self.num_classes) for i, t in masks]))

    def _scheduler(self, sampler: str):
        if sampler == "ddpm":
            return DDPMScheduler.from_config(self.scheduler.config)
        if sampler == "ddim":
            return DDIMScheduler.from_config(self.scheduler.config, clip_sample=True, set_alpha_to_one=True)
        raise HistosynthError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")

    @torch.no_grad()
    def __call__(
        self,
        masks,
        guidance_scale: float = 2.0,
        num_inference_steps: int = 250,
        sampler: str = "ddpm",
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "np",
        progress: bool = True,
    ) -> NASDMPipelineOutput:
        # 1. conditions: either ready tensors (B, K+1, H, W) or (inst_map, type_map) pairs
        cond = masks if isinstance(masks, torch.Tensor) else self.conditions_from_masks(masks)
        if cond.ndim != 4 or cond.shape[1] != self.unet.config.cond_channels:
            raise HistosynthError(
                f"condition tensor has shape {tuple(cond.shape)}; this model expects (B, {self.unet.config.cond_channels}, H, W)"
            )
        device, dtype = self.unet.device, self.unet.dtype
        cond = cond.to(device=device, dtype=dtype)
        do_guidance = guidance_scale != 1.0  # g = 1 is the conditional model alone
        model_cond = torch.cat([cond, null_condition_like(cond)]) if do_guidance else cond  # [y, ∅]

        # 2. exactly the number of steps asked
        total_t = self.scheduler.config.num_train_timesteps
        if not 1 <= num_inference_steps <= total_t:
            raise HistosynthError(f"num_inference_steps must be within 1..{total_t}, got {num_inference_steps}")
        scheduler = self._scheduler(sampler)
        scheduler.set_timesteps(num_inference_steps, device=device)
        if len(scheduler.timesteps) != num_inference_steps:  # never silently run another number of steps
            raise RuntimeError(f"scheduler made {len(scheduler.timesteps)} steps, asked {num_inference_steps}")

        # 3. denoise from pure noise
        in_ch = self.unet.config.in_channels
        x = randn_tensor((cond.shape[0], in_ch, *cond.shape[2:]), generator=generator, device=device, dtype=dtype)
        steps_run = 0
        for t in self.progress_bar(scheduler.timesteps) if progress else scheduler.timesteps:
            x_in = torch.cat([x, x]) if do_guidance else x
            out = self.unet(x_in, t.expand(x_in.shape[0]), model_cond)
            if do_guidance:
                out_c, out_u = out.chunk(2)
                out = guided_model_output(out_u, out_c, guidance_scale, in_ch)
            if sampler == "ddim" and out.shape[1] == 2 * in_ch:  # DDIM uses the mean only
                out = out[:, :in_ch]
            kwargs = {"eta": eta} if sampler == "ddim" else {}
            x = scheduler.step(out, t, x, generator=generator, **kwargs).prev_sample
            steps_run += 1

        # 4. images
        x = x.clamp(-1, 1)
        if output_type == "pt":
            images = x
        else:
            images = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return NASDMPipelineOutput(images=images, conditions=cond.cpu(), num_steps_run=steps_run)
