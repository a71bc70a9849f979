"""ZoomLDM's recipes: the multi-magnification latent model (``method: zoomldm``) and its condition sampler, the
embedding diffusion model (``method: zoomldm-conditions``).

One named field per hyperparameter. The YAML files: ``zoomldm-256`` / ``zoomldm-conditions`` (the paper's settings,
for GPUs) and ``zoomldm-tiny-cpu`` / ``zoomldm-conditions-tiny-cpu`` (CPU runs in minutes). Paths are relative to
the working directory; ``{data}`` is the store given with ``--data``. Choices where the paper is silent are in
docs/zoomldm.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from histosynth.data.patches import format_magnification
from histosynth.recipes import latent
from histosynth.recipes.base import EngineConfig, ForwardProcessConfig, Recipe, register_recipe_type


@dataclass
class SummariserConfig:
    """The magnification-aware summariser (models/zoom_summariser.py), trained jointly with the UNet.
    Paper: grids nearest-upsampled to 128 × 128 × C, four FiLM residual blocks → 8 × 8 × 512 = 64 tokens."""

    architecture: Literal["cnn", "vit"] = "cnn"  # cnn: the paper's; vit: the public code's variant
    input_size: int = 128  # tokens = (input_size / 16)²
    block_channels: tuple[int, ...] = (128, 256, 384, 512)
    mag_embed_dim: int = 128
    vit_width: int = 256
    vit_depth: int = 4
    vit_heads: int = 4


@dataclass(kw_only=True)
class ZoomTrainConfig(latent.LatentTrainConfig):
    """latent.LatentTrainConfig with ZoomLDM's defaults (lr 1e-4, 1,000 warm-up steps) and the balance of levels."""

    learning_rate: float = 1e-4
    lr_warmup_steps: int = 1000
    # natural: every patch once per epoch (levels as frequent as the data has them, paper: 12 M at 20x to 2.5 k at
    # 0.15625x); weights: each level's share of an epoch ∝ level_weights (in the order of `magnifications`), its
    # patches drawn with replacement by the seed
    level_balance: Literal["natural", "weights"] = "natural"
    level_weights: list[float] | None = None


@dataclass(kw_only=True)
class ZoomLDMRecipe(Recipe):
    METHOD = "zoomldm"
    patch_size: int
    # the levels trained, highest first (null: every level of the store); a sub-list trains e.g. one level alone
    magnifications: list[str] | None = None
    embeddings: str | None = None  # the store's embeddings name (`histosynth embed --name`); null: its only one
    autoencoder: latent.AutoencoderConfig
    train: ZoomTrainConfig
    summariser: SummariserConfig = field(default_factory=SummariserConfig)
    unet: latent.UNetConfig = field(default_factory=latent.UNetConfig)
    diffusion: latent.LatentDiffusionConfig = field(default_factory=latent.LatentDiffusionConfig)
    # DDIM 10: the smallest count that matched the paper's DDIM 50 within noise in FD and blur on both tiny ZoomLDMs
    # (docs/benchmarks.md, "Quality vs sampling steps")
    sampling: latent.SamplingConfig = field(default_factory=lambda: latent.SamplingConfig(num_inference_steps=10, guidance_scale=1.75))

    def problems(self) -> list[str]:
        problems = latent.latent_diffusion_problems(self.unet, self.train)
        s, t = self.summariser, self.train
        if s.input_size < 16 or s.input_size % 16:
            problems.append(f"summariser.input_size must be a positive multiple of 16, got {s.input_size}")
        if len(s.block_channels) != 4:
            problems.append(f"summariser.block_channels must list four widths, got {list(s.block_channels)}")
        if s.architecture == "vit" and s.vit_width % s.vit_heads:
            problems.append(f"summariser.vit_width {s.vit_width} must be a multiple of vit_heads {s.vit_heads}")
        if self.magnifications is not None:
            try:
                self.magnifications = [format_magnification(m) for m in self.magnifications]
            except Exception as exc:  # noqa: BLE001 - parse errors of any kind become a recipe problem
                problems.append(f"magnifications: {exc}")
        if t.level_balance == "weights":
            if self.magnifications is None or t.level_weights is None:
                problems.append("train.level_balance weights needs magnifications and train.level_weights")
            elif len(t.level_weights) != len(self.magnifications) or min(t.level_weights) < 0 or not sum(t.level_weights):
                problems.append(f"train.level_weights must give one weight >= 0 per magnification "
                                f"({len(self.magnifications)}), not all 0; got {t.level_weights}")
        elif t.level_weights is not None:
            problems.append("train.level_weights is only read with train.level_balance: weights")
        if not t.cache_latents:
            problems.append("train.cache_latents must be true: ZoomLDM trains on cached latents")
        return problems


@dataclass
class ConditionModelConfig:
    """The embedding diffusion model's transformer (models/condition_sampler.py)."""

    width: int = 512
    depth: int = 6
    heads: int = 8


@dataclass
class ConditionDiffusionConfig(ForwardProcessConfig):
    """The paper: "the standard linear DDPM schedule", predicting the final conditions (x0)."""

    prediction_type: Literal["sample"] = "sample"


@dataclass(kw_only=True)
class ConditionTrainConfig(EngineConfig):
    steps: int
    learning_rate: float = 1e-4
    lr_warmup_steps: int = 1000
    ema_decay: float | None = 0.999


# the schedulers that can step an x0 ("sample") prediction: all of SchedulerName but euler-ancestral (diffusers 0.42
# raises NotImplementedError for it; a test keeps this list and histosynth.diffusion.schedulers in step)
ConditionSchedulerName = Literal["ddpm", "ddim", "dpm-solver++", "sde-dpm-solver++", "unipc", "deis", "euler", "lms"]


@dataclass
class ConditionSamplingConfig:
    num_inference_steps: int = 50  # the paper: DDIM 50
    scheduler: ConditionSchedulerName = "ddim"  # swapped in on the trained schedule, like the image model's


@dataclass(kw_only=True)
class ZoomConditionsRecipe(Recipe):
    METHOD = "zoomldm-conditions"
    zoomldm: str  # the ZoomLDM run (or pipeline folder) whose frozen summariser makes the training conditions
    train: ConditionTrainConfig
    model: ConditionModelConfig = field(default_factory=ConditionModelConfig)
    diffusion: ConditionDiffusionConfig = field(default_factory=ConditionDiffusionConfig)
    sampling: ConditionSamplingConfig = field(default_factory=ConditionSamplingConfig)

    def problems(self) -> list[str]:
        problems = self.train.problems()
        m = self.model
        if m.width % m.heads:
            problems.append(f"model.width {m.width} must be a multiple of model.heads {m.heads}")
        if self.train.steps < 1:
            problems.append(f"train.steps must be at least 1, got {self.train.steps}")
        if self.sampling.num_inference_steps < 1:
            problems.append("sampling.num_inference_steps must be at least 1")
        return problems


register_recipe_type(ZoomLDMRecipe)
register_recipe_type(ZoomConditionsRecipe)
