"""PathLDM sampling pipeline: captions (or classes) in, H&E images out.

    pipe = PathLDMPipeline.from_pretrained("RUN")           # a training run, or its pipeline/ folder
    images = pipe(["many epithelial nuclei; few inflammatory nuclei"], guidance_scale=1.75,
                  num_inference_steps=20, generator=torch.Generator().manual_seed(0)).images

Reads top to bottom: encode the prompts with the frozen conditioner (text: the 154-token caption
embeddings; class baseline: the learned class token) and the null condition (the empty caption / the null
class), start from Gaussian latents, run exactly `num_inference_steps` DDIM steps, each one UNet pass on
the batched [null, cond] pair combined by classifier-free guidance, and decode the latents with the
frozen autoencoder (a VQ model quantizes them first, as LDM's VQ first stage does).

Guidance follows diffusers and LDM: ε̂ = ε(∅) + g·(ε(y) − ε(∅)); g = 1 is the plain conditional model
(one pass per step), g = 0 the unconditional one. NASDM's scale s (ε̂ = ε(y) + s·(ε(y) − ε(∅))) is the
same combination with g = s + 1: PathLDM's g = 1.75 is s = 0.75.

DDIM as in LDM's sampler: timesteps 1 + k·⌊1000/n⌋ ("leading" spacing, steps_offset 1), the last step
going to ᾱ of t = 0 (set_alpha_to_one false), η = 0 by default.

The config also records the latent scaling factor, the class rule of a class model (how a captions row
becomes a class), the patch size and magnification trained on, and the recipe's sampling defaults
(``histosynth sample`` uses them).

Saved layout: diffusers' (model_index.json, unet/, vae/, scheduler/) plus conditioner/ written by the
conditioner's own save_pretrained (conditions/text.py), loaded back by ``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.utils import BaseOutput

from histosynth.conditions.text import ClassConditioner, TextConditioner, load_conditioner
from histosynth.diffusion.latent_sampling import denoise_latents
from histosynth.diffusion.schedulers import ldm_ddim_scheduler  # noqa: F401  (re-exported: LDM's sampler of this pipeline)
from histosynth.errors import HistosynthError
from histosynth.pipelines.loading import RunPipeline, latent_scaling, pipeline_directory

CONDITIONER_DIR = "conditioner"
# what a setting left unset becomes when the saved recipe has no sampling section (the paper: DDIM 50, g 1.75, η 0;
# DDIM 20 matched its 50 within noise, recipes/latent.py)
DEFAULT_SAMPLING = {"guidance_scale": 1.75, "num_inference_steps": 20, "eta": 0.0}


@dataclass
class PathLDMPipelineOutput(BaseOutput):
    images: np.ndarray | torch.Tensor  # (B, H, W, 3) uint8 for "np", (B, 3, H, W) in [-1, 1] for "pt"
    prompts: list  # the prompts (captions or class indices) actually used
    num_steps_run: int  # denoising steps executed (always the number asked)


class PathLDMPipeline(RunPipeline):
    model_cpu_offload_seq = "unet->vae"

    def __init__(self, unet: UNet2DConditionModel, vae, scheduler: DDIMScheduler,
                 conditioner: TextConditioner | ClassConditioner | None = None,
                 latent_scaling_factor: float | None = None, class_rule: dict | None = None,
                 magnification: str | None = None, patch_size: int | None = None, sampling: dict | None = None):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler)
        self.register_to_config(latent_scaling_factor=latent_scaling(vae, latent_scaling_factor), class_rule=class_rule,
                                magnification=magnification, patch_size=patch_size, sampling=sampling)
        self.conditioner = conditioner
        if class_rule is not None and isinstance(conditioner, ClassConditioner):
            conditioner.class_rule = dict(class_rule)  # how a captions row becomes a class, for sampling from rows

    # ------------------------------------------------------------------------------------ saving / loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Also accepts a training run directory (its EMA pipeline lives in RUN/pipeline)."""
        path = pipeline_directory(pretrained_model_name_or_path, cls)
        if kwargs.get("conditioner") is None:
            if not (path / CONDITIONER_DIR).is_dir():
                raise HistosynthError(f"the pipeline has no {CONDITIONER_DIR}/ (its text encoder or class embedding)", path)
            kwargs["conditioner"] = load_conditioner(path / CONDITIONER_DIR)
        return super().from_pretrained(path, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        super().save_pretrained(save_directory, **kwargs)
        if self.conditioner is not None:
            self.conditioner.save_pretrained(Path(save_directory) / CONDITIONER_DIR)

    def to(self, *args, **kwargs):
        super().to(*args, **kwargs)
        if self.conditioner is not None:
            self.conditioner.to(self.device)
        return self

    # ------------------------------------------------------------------------------------ conditions
    def encode_prompts(self, prompts: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
        """(condition, null condition) as cross-attention context (B, T, D), float32 on the UNet's device, through
        the conditioner's ``encode_prompts`` (captions for a text model, class indices or names for a class model)."""
        if self.conditioner is None:
            raise HistosynthError("this pipeline has no conditioner (pass conditioner=... or load a saved pipeline)")
        cond = self.conditioner.encode_prompts(list(prompts)).embeddings
        null = self.conditioner.null_condition(len(prompts)).embeddings
        return cond.to(self.unet.device), null.to(self.unet.device)  # denoise_latents casts to the UNet's dtype

    # ------------------------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(self, prompts: str | Sequence, guidance_scale: float | None = None,
                 num_inference_steps: int | None = None, eta: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None, output_type: str = "np",
                 progress: bool = True) -> PathLDMPipelineOutput:
        """Generate one image per prompt. ``guidance_scale`` (g), ``num_inference_steps`` (DDIM steps, exactly this
        many run) and ``eta``: default the saved recipe's ``sampling`` (:data:`DEFAULT_SAMPLING` without one).

        Raises:
            HistosynthError: no prompts, a prompt the conditioner cannot take, a step count outside 1..T."""
        guidance_scale, num_inference_steps, eta = self.sampling_settings(
            DEFAULT_SAMPLING, guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, eta=eta)
        # 1. conditions: captions (text model) or class indices / names (class baseline), and the null condition
        prompts = [prompts] if isinstance(prompts, (str, int)) else list(prompts)
        if not prompts:
            raise HistosynthError("no prompts given")
        cond, null = self.encode_prompts(prompts)
        do_guidance = guidance_scale != 1.0  # g = 1 is the conditional model alone
        context = torch.cat([null, cond]) if do_guidance else cond

        # 2.-3. Gaussian latents denoised by exactly the number of DDIM steps asked (batched [∅; y] guidance)
        latents = denoise_latents(self.unet, self.scheduler, num_inference_steps, len(prompts), guidance_scale,
                                  eta=eta, generator=generator, progress_bar=self.progress_bar if progress else None,
                                  encoder_hidden_states=context)
        steps_run = num_inference_steps

        # 4. decode with the frozen autoencoder (VQ: quantize, then decode)
        latents = latents / self.config.latent_scaling_factor
        x = self.vae.decode(latents.to(self.vae.dtype)).sample.float().clamp(-1, 1)
        if output_type == "pt":
            images = x
        else:
            images = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        return PathLDMPipelineOutput(images=images, prompts=prompts, num_steps_run=steps_run)
