"""ZoomLDMPipeline: H&E patches at any of the model's magnifications, from real or generated slide-embedding conditions.

    pipe = ZoomLDMPipeline.from_pretrained("RUN")            # a zoomldm or zoomldm-conditions run, or a pipeline folder
    out = pipe(magnification="5x", num_images=4)             # conditions drawn by the embedding diffusion model
    out = pipe(grids=[grid], magnification="5x")             # the "oracle": a real patch's (2^k, 2^k, C) grid

Reads top to bottom (ZoomLDM Sec. 3):
1. The condition of each image: either the summariser's tokens of a real embedding grid (its 20x tiles' SSL
   embeddings, see conditions/slide_embeddings.py), or tokens drawn by the embedding diffusion model (EDM, Sec. 3.2):
   a transformer that predicts clean tokens x0 from noisy ones, given the magnification, run for
   ``condition_steps`` steps of ``condition_scheduler`` (paper DDIM 50; any solver that steps x0) on the linear DDPM
   schedule, then un-standardised.
2. DDIM (LDM's sampler, paper 50 steps; default 10, which matched it within noise) on the latent UNet with
   classifier-free guidance in the project's convention, ε̂ = ε(∅) + g·(ε(c) − ε(∅)) (paper g = 1.75, LDM's
   convention, which is this one), ∅ the summariser's learned null tokens; one batched pass for both.
3. The frozen VQ-f4 autoencoder decodes (quantising first, as LDM's VQ first stage does).

A ``zoomldm`` run's pipeline has no condition sampler (``condition_sampler`` None): it samples from real grids
only. The ``zoomldm-conditions`` run exports the same pipeline with its sampler added.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler, UNet2DConditionModel
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from histosynth.data.patches import format_magnification, parse_magnification
from histosynth.diffusion.latent_sampling import denoise_latents
from histosynth.diffusion.sampling_loop import denoise
from histosynth.errors import HistosynthError
from histosynth.models.condition_sampler import ConditionTransformer
from histosynth.models.zoom_summariser import EmbeddingSummariser
from histosynth.pipelines.loading import RunPipeline, latent_scaling

# what a setting left unset becomes when the saved recipe has no sampling section (the paper: DDIM 50 for both
# models; the image model's 10 matched its 50 within noise, recipes/zoomldm.py)
DEFAULT_SAMPLING = {"guidance_scale": 1.75, "num_inference_steps": 10, "eta": 0.0, "condition_steps": 50}


@dataclass
class ZoomLDMPipelineOutput(BaseOutput):
    """images uint8 (B, H, W, 3); magnifications: the B levels ("5x"); conditions float32 (B, N, D): the tokens the
    UNet attended to; condition_source "reference" (real grids) or "sampled" (the EDM)."""

    images: np.ndarray
    magnifications: list
    conditions: np.ndarray
    condition_source: str
    num_steps_run: int


@torch.no_grad()
def sample_condition_tokens(model: ConditionTransformer, scheduler: SchedulerMixin, levels: torch.Tensor, steps: int,
                            generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
    """(B, N, D) condition tokens drawn by the EDM (ZoomLDM Sec. 3.2) for level indices ``levels`` (int64 (B,)):
    Gaussian noise, exactly ``steps`` steps of ``scheduler`` on the model's x0 ("sample") predictions (the paper: DDIM
    50, η = 0; any scheduler of :data:`~histosynth.diffusion.schedulers.SCHEDULERS` that steps x0), then the training
    standardisation undone. It runs in the model's dtype: ``--precision`` casts the image UNet only.

    Raises:
        HistosynthError: a step count the schedule cannot run.
    """
    shape = (len(levels), model.config.num_tokens, model.config.token_dim)
    noise = randn_tensor(shape, generator=generator, device=model.device, dtype=model.dtype)
    levels = levels.to(model.device)
    x = denoise(lambda x, t: model(x, t, levels), scheduler, steps, noise, generator=generator,
                steps_option="condition_steps (--condition-steps)")
    return model.unstandardise(x)


class ZoomLDMPipeline(RunPipeline):
    model_cpu_offload_seq = "summariser->condition_sampler->unet->vae"
    _optional_components = ["condition_sampler", "condition_scheduler"]

    def __init__(self, unet: UNet2DConditionModel, vae, scheduler: DDIMScheduler, summariser: EmbeddingSummariser,
                 condition_sampler: ConditionTransformer | None = None, condition_scheduler: SchedulerMixin | None = None,
                 latent_scaling_factor: float | None = None, base_magnification: str | None = None,
                 patch_size: int | None = None, embeddings: dict | None = None, sampling: dict | None = None):
        super().__init__()
        self.register_modules(unet=unet, vae=vae, scheduler=scheduler, summariser=summariser,
                              condition_sampler=condition_sampler, condition_scheduler=condition_scheduler)
        self.register_to_config(latent_scaling_factor=latent_scaling(vae, latent_scaling_factor), base_magnification=base_magnification,
                                patch_size=patch_size, embeddings=embeddings, sampling=sampling)

    @property
    def magnifications(self) -> list[str]:
        return list(self.summariser.config.magnifications)

    def level_indices(self, magnification, n: int) -> torch.Tensor:
        """int64 (n,) level indices of a magnification (for all) or of one per image; errors name the known levels."""
        names = [magnification] * n if isinstance(magnification, (str, int, float)) else list(magnification)
        if len(names) != n:
            raise HistosynthError(f"{len(names)} magnifications for {n} images")
        try:
            return torch.tensor([self.summariser.level_index(format_magnification(m)) for m in names])
        except ValueError as exc:
            raise HistosynthError(str(exc)) from None

    @torch.no_grad()
    def sample_conditions(self, levels: torch.Tensor, num_inference_steps: int | None = None,
                          generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        """(B, N, D) summariser-space tokens drawn by the EDM for level indices ``levels`` (ZoomLDM Sec. 3.2) with
        ``self.condition_scheduler`` for ``num_inference_steps`` steps (default the recipe's ``condition_steps``, paper
        50). The saved pipeline holds the zoomldm-conditions recipe's ``sampling.scheduler`` (the paper's DDIM by default);
        ``--condition-scheduler`` swaps another in, and in Python so does its config, e.g.
        ``pipe.condition_scheduler = sampling_scheduler("dpm-solver++", pipe.condition_scheduler.config)``."""
        if self.condition_sampler is None:
            raise HistosynthError("this ZoomLDM has no condition sampler: give reference grids (sample --reference "
                                  "STORE), or train one with `histosynth train --recipe zoomldm-conditions...`")
        (steps,) = self.sampling_settings(DEFAULT_SAMPLING, condition_steps=num_inference_steps)
        return sample_condition_tokens(self.condition_sampler, self.condition_scheduler, levels, steps, generator)

    @torch.no_grad()
    def __call__(self, magnification: str | list[str] | None = None, num_images: int | None = None,
                 grids: list | None = None, guidance_scale: float | None = None, num_inference_steps: int | None = None,
                 condition_steps: int | None = None, eta: float | None = None,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 progress: bool = True) -> ZoomLDMPipelineOutput:
        """Generate patches.

        Args:
            magnification: the level of every image ("5x") or one per image; default: with ``grids`` each grid's side
                tells its level (2^k → base / 2^k), without them required.
            num_images: images to draw from the condition sampler (ignored with ``grids``: one image per grid).
            grids: real embedding grids, each float (2^k, 2^k, C) (the oracle condition of the paper's Table 1).
            guidance_scale: g (1 = conditional only); default the recipe's (paper 1.75).
            num_inference_steps: DDIM steps of the image model, exactly this many run; default the recipe's (10; paper
                50).
            condition_steps: steps of the condition sampler's ``condition_scheduler`` (default the recipe's, paper
                DDIM 50).
            eta: DDIM's η for the image model (default the recipe's, 0).
        Raises:
            HistosynthError: an unknown magnification, a grid of the wrong width or of a side that is not 2^k of a known
                level, no condition sampler and no grids, a step count outside 1..T.
        """
        g_scale, steps, eta = self.sampling_settings(DEFAULT_SAMPLING, guidance_scale=guidance_scale,
                                                     num_inference_steps=num_inference_steps, eta=eta)
        # 1. the condition tokens: from real grids, or drawn by the condition sampler
        if grids is not None:
            grids = [np.asarray(g) for g in grids]
            if magnification is None:
                magnification = [self._level_of_grid(g) for g in grids]
            levels = self.level_indices(magnification, len(grids))
            self._check_grids(grids, levels)
            cond = self.summariser(grids, levels)
            source = "reference"
        else:
            single = isinstance(magnification, str)
            if magnification is None or (single and not num_images):
                raise HistosynthError("give a magnification and num_images (or reference grids)")
            n = num_images if single else len(magnification)
            levels = self.level_indices(magnification, n)
            cond = self.sample_conditions(levels, condition_steps, generator)  # float32: denoise_latents casts
            source = "sampled"
        do_guidance = g_scale != 1.0
        tokens = torch.cat([self.summariser.null_condition(len(cond)).to(cond.dtype), cond]) if do_guidance else cond

        # 2. exactly the number of DDIM steps asked, with classifier-free guidance
        latents = denoise_latents(self.unet, self.scheduler, steps, len(cond), g_scale, eta=eta, generator=generator,
                                  progress_bar=self.progress_bar if progress else None, encoder_hidden_states=tokens)

        # 3. decode with the frozen first stage
        decoded = self.vae.decode((latents / self.config.latent_scaling_factor).to(self.vae.dtype)).sample
        images = ((decoded.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        names = [self.magnifications[i] for i in levels.tolist()]
        return ZoomLDMPipelineOutput(images=images, magnifications=names, conditions=cond.float().cpu().numpy(),
                                     condition_source=source, num_steps_run=steps)

    def _level_of_grid(self, grid: np.ndarray) -> str:
        side = grid.shape[0]
        k = int(round(np.log2(max(side, 1))))
        base = self.config.base_magnification or self.magnifications[0]
        return format_magnification(parse_magnification(base) / 2 ** k)

    def _check_grids(self, grids: list[np.ndarray], levels: torch.Tensor) -> None:
        width = self.summariser.config.embed_dim
        base = self.config.base_magnification or self.magnifications[0]
        for i, (grid, level) in enumerate(zip(grids, levels.tolist())):
            name = self.magnifications[level]
            side = int(round(parse_magnification(base) / parse_magnification(name)))
            if grid.ndim != 3 or grid.shape != (side, side, width):
                raise HistosynthError(f"grid {i} has shape {tuple(grid.shape)}; at {name} the model takes ({side}, "
                                      f"{side}, {width}): {side}×{side} {base} tiles of {width}-d embeddings")
