"""The nuclei segmenter's recipe (``method: segmenter``): the evaluation instrument, trained on the one engine.

``histosynth seg train`` builds it from its options; a YAML with these fields also trains through
``histosynth train --recipe``. Defaults are those of the instrument measured in ``docs/benchmarks.md``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from histosynth.recipes.base import EngineConfig, Recipe, register_recipe_type


@dataclass
class SegmenterModelConfig:
    """EfficientNet-Lite0 U-Net (models/nuclei_segmenter.py)."""

    imagenet_encoder: bool = True  # start the encoder from the offline ImageNet weights
    decoder_channels: tuple[int, ...] = (128, 64, 48, 32, 16)
    stem_channels: int = 16


@dataclass
class SegmenterLossConfig:
    """loss = type cross-entropy + distance_weight·distance MSE + dice_weight·soft Dice (HoVer-Net's NP/NC terms)."""

    distance_weight: float = 1.0
    dice_weight: float = 1.0


@dataclass(kw_only=True)
class SegmenterTrainConfig(EngineConfig):
    steps: int = 1500
    learning_rate: float = 1e-3  # peak: linear warm-up, then cosine decay to 0 at `steps`
    warmup_steps: int = 50  # at most a tenth of the run
    weight_decay: float = 1e-4
    ema_decay: float | None = None
    max_grad_norm: float = 0.0
    crop: int = 128  # random crop (multiple of 32, at most the store's patch size)
    color_jitter: float = 0.08  # per-channel gain/offset amplitude
    checkpoint_every: int = 500
    log_every: int = 10
    num_workers: int = 0


@dataclass(kw_only=True)
class SegmenterRecipe(Recipe):
    METHOD = "segmenter"
    method: str = "segmenter"
    model: SegmenterModelConfig = field(default_factory=SegmenterModelConfig)
    loss: SegmenterLossConfig = field(default_factory=SegmenterLossConfig)
    train: SegmenterTrainConfig = field(default_factory=SegmenterTrainConfig)

    def problems(self) -> list[str]:
        t = self.train
        out = t.problems()
        if t.steps < 1 or not t.learning_rate > 0:
            out.append(f"train.steps ({t.steps}) and train.learning_rate ({t.learning_rate}) must be positive")
        if t.crop % 32 or t.crop < 32:
            out.append(f"train.crop {t.crop} must be a multiple of 32, at least 32")
        return out


register_recipe_type(SegmenterRecipe)
