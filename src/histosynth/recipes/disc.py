"""DISC's recipe (``method: disc``): a region-mask-conditioned latent diffusion model (SD), and, with ``distill``, its
self-distillation from separated conditions (SD-DISC, and SD-DISC-CoTrain with ``distill.cotrain``).

One named field per hyperparameter. The YAML files: ``disc-256`` (the paper's setting, for GPUs), ``disc-tiny-cpu``
(a CPU run in minutes) and ``disc-distill-tiny-cpu`` (its distillation). Paths are relative to the working
directory; ``{data}`` is the region store given with ``--data``. Choices where the paper is silent: docs/disc.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from histosynth.recipes import latent
from histosynth.recipes.base import Recipe, SchedulerName, register_recipe_type

SEPARATED = ("none", "final", "every-step")


@dataclass
class MaskEncoderConfig:
    """τθ (models/region_mask_encoder.py), trained jointly with the UNet (DISC eq. 1)."""

    token_grid: int = 8  # tokens per side: 8 × 8 = 64 cross-attention tokens
    channels: tuple[int, ...] = (32, 64, 128, 256)
    # cross-attention: the paper's (tokens only); cross-attention+concat: the mask's one-hot, nearest-downsampled to the
    # latent, is also concatenated to the UNet input (LDM's semantic-synthesis conditioning), which ties a region to
    # its place directly
    injection: Literal["cross-attention", "cross-attention+concat"] = "cross-attention"


@dataclass
class DISCSamplingConfig:
    """Defaults of `histosynth sample` (DISC Sec. 2.2: DDIM, 200 steps; classifier-free guidance in diffusers' g).
    DDIM 50: the smallest count that matched the paper's DDIM 200 within noise in FD and blur on both tiny DISC models
    (docs/benchmarks.md, "Quality vs sampling steps"); 200 is the paper's. Measured on SD; SD-SC and SD-DISC sample
    with the same count, not measured apart."""

    num_inference_steps: int = 50
    guidance_scale: float = 1.75
    eta: float = 0.0  # DDIM's η (0 for the other schedulers)
    scheduler: SchedulerName = "ddim"
    # separated conditions (SD-SC, Sec. 2.3): none (SD: the whole mask), final (each present label's uniform mask
    # denoised from one shared noise, fused by the mask at the end, eq. 2: the paper's) or every-step (fused after
    # every DDIM step, each branch continuing from the fused latent)
    separated: Literal["none", "final", "every-step"] = "none"


@dataclass
class DistillConfig:
    """Self-distillation from separated conditions (DISC Sec. 2.3, eq. 3): the SD run ``teacher`` generates
    ``num_samples`` fused latents z0^mixed with separated conditions on masks of the store's train split (each with
    a random flip); the model starts from the teacher's weights and fine-tunes on L_DISC (ε-MSE on the noised fused
    latents); with ``cotrain`` each step averages L_DISC with L_LDM on real patches (SD-DISC-CoTrain)."""

    teacher: str  # the SD run (or pipeline folder) to distil
    num_samples: int = 20000  # paper: 20,000
    separated: Literal["final", "every-step"] = "final"
    num_inference_steps: int = 200  # DDIM steps of the set's generation (paper 200; the training data of SD-DISC,
    # and separated sampling at fewer steps is not measured, so the set keeps the paper's count)
    guidance_scale: float = 1.75
    batch_size: int = 16  # images generated at once (each runs one branch per present label)
    cotrain: bool = False
    seed: int = 0
    # where the set lives; null: RUN/distill. Give SD-DISC's set to an SD-DISC-CoTrain run of the same teacher and
    # settings to reuse it (the settings are checked: another teacher's weights or settings are refused)
    set_dir: str | None = None


@dataclass(kw_only=True)
class DISCTrainConfig(latent.LatentTrainConfig):
    """latent.LatentTrainConfig with DISC's defaults (the paper is silent; ZoomLDM's LDM settings: lr 1e-4, 1,000 warm-up)."""

    learning_rate: float = 1e-4
    lr_warmup_steps: int = 1000


@dataclass(kw_only=True)
class DISCRecipe(Recipe):
    METHOD = "disc"
    patch_size: int
    magnification: str | None = None  # the store's must match when given
    autoencoder: latent.AutoencoderConfig | None = None  # required without distill (with it, the teacher's is used)
    train: DISCTrainConfig
    mask_encoder: MaskEncoderConfig = field(default_factory=MaskEncoderConfig)
    unet: latent.UNetConfig = field(default_factory=latent.UNetConfig)
    diffusion: latent.LatentDiffusionConfig = field(default_factory=latent.LatentDiffusionConfig)
    sampling: DISCSamplingConfig = field(default_factory=DISCSamplingConfig)
    distill: DistillConfig | None = None

    def problems(self) -> list[str]:
        problems = latent.latent_diffusion_problems(self.unet, self.train)
        m, d = self.mask_encoder, self.distill
        if m.token_grid < 1 or self.patch_size % m.token_grid or (self.patch_size // m.token_grid) & (self.patch_size // m.token_grid - 1):
            problems.append(f"mask_encoder.token_grid {m.token_grid} must divide patch_size {self.patch_size} by a "
                            "power of two")
        if not m.channels:
            problems.append("mask_encoder.channels must list at least one width")
        if self.unet.cross_attention_dim <= 0:
            problems.append("unet.cross_attention_dim must be positive (the mask tokens are cross-attended)")
        if not self.train.cache_latents:
            problems.append("train.cache_latents must be true: DISC trains on cached latents")
        if self.sampling.num_inference_steps < 1:
            problems.append("sampling.num_inference_steps must be at least 1")
        if d is None and self.autoencoder is None:
            problems.append("autoencoder.path is required (the frozen VQ-f4 first stage)")
        if d is not None:
            if d.num_samples < 1 or d.batch_size < 1 or d.num_inference_steps < 1:
                problems.append("distill.num_samples, distill.batch_size and distill.num_inference_steps must be at least 1")
            if self.train.init_unet:
                problems.append("train.init_unet is not read with distill: the model starts from distill.teacher")
        return problems


register_recipe_type(DISCRecipe)
