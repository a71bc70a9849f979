"""NASDM's recipe (``method: nasdm``): SemanticUNet, the DDPM hybrid objective, stage-wise training.

The YAML files ``nasdm-lizard-20x.yaml`` (the paper's setting) and ``nasdm-tiny-cpu.yaml`` (quickstart,
tests) fill it in. Guidance follows the project's one convention (diffusers' g, ``g = 1`` plain
conditional); NASDM's published scale s is ``g − 1``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from histosynth.recipes.base import EngineConfig, ForwardProcessConfig, Recipe, register_recipe_type


@dataclass
class ModelConfig:
    """SemanticUNet architecture (SDM-style: plain encoder, SPADE middle and decoder)."""

    block_out_channels: tuple[int, ...] = (128, 128, 256, 256, 512)
    layers_per_block: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_head_channels: int = 64
    dropout: float = 0.0
    norm_num_groups: int = 32
    spade_hidden: int = 128


@dataclass
class DiffusionConfig(ForwardProcessConfig):
    """DDPM forward process (linear 1e-4 → 0.02, T = 1000) and objective (NASDM Sec. 3.3 / 4.1)."""

    learn_sigma: bool = True  # "learned range" variance, trained by the L_vlb term
    lambda_vlb: float = 0.001  # λ in L_hybrid = L_simple + λ·L_vlb


@dataclass
class Stage:
    """A phase of training with its own learning rate and condition dropout (NASDM: 1e-4, then 2e-5 @ 0.2)."""

    name: str
    steps: int
    learning_rate: float
    condition_dropout: float


@dataclass(kw_only=True)
class TrainConfig(EngineConfig):
    batch_size: int = 40  # per device (NASDM: 40 per GPU on 4 A100)
    random_flips: bool = True  # H&E has no canonical orientation: random flips and 90° rotations


@dataclass(kw_only=True)
class NASDMRecipe(Recipe):
    METHOD = "nasdm"
    patch_size: int
    magnification: str
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    stages: list[Stage] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)

    def problems(self) -> list[str]:
        out = self.train.problems()
        if not self.stages:
            out.append("stages must list at least one stage")
        for i, s in enumerate(self.stages):
            if s.steps < 1 or not s.learning_rate > 0 or not 0.0 <= s.condition_dropout <= 1.0:
                out.append(f"stages[{i}] needs steps >= 1, learning_rate > 0 and condition_dropout in [0, 1]")
        if any(c % self.model.norm_num_groups for c in self.model.block_out_channels):
            out.append(f"model.block_out_channels {self.model.block_out_channels} must be multiples of "
                       f"norm_num_groups {self.model.norm_num_groups}")
        if self.patch_size % 2 ** (len(self.model.block_out_channels) - 1):
            out.append(f"patch_size {self.patch_size} must be divisible by 2^(levels - 1)")
        return out

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_at(self, step: int) -> Stage:
        """The stage that optimisation step `step` (0-based) belongs to; the last stage continues past the end."""
        end = 0
        for stage in self.stages:
            end += stage.steps
            if step < end:
                return stage
        return self.stages[-1]


register_recipe_type(NASDMRecipe)
