"""The nuclei segmenter's recipe (``method: segmenter``): the evaluation instrument, trained on the one engine.

An EfficientNet-Lite0 U-Net with a type head (K + 1 classes) and a distance-map head, trained on random crops of
a labelled store's train patches (see :mod:`histosynth.training.segmenter`), then read with the marker-controlled
watershed of :class:`~histosynth.data.nuclei_maps.PostprocessConfig`. The built-in ``segmenter.yaml`` holds
these defaults; ``histosynth seg train`` builds the same recipe from its options.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from histosynth.data.nuclei_maps import PostprocessConfig
from histosynth.recipes.base import EngineConfig, Recipe, register_recipe_type


@dataclass
class SegmenterModelConfig:
    """:class:`~histosynth.models.nuclei_segmenter.NucleiSegmenter` architecture."""

    imagenet_encoder: bool = True  # start the encoder from ImageNet EfficientNet-Lite0 (offline weights)
    decoder_channels: tuple[int, ...] = (128, 64, 48, 32, 16)  # U-Net decoder widths, coarse to fine
    stem_channels: int = 16


@dataclass
class SegmenterLossConfig:
    """loss = cross-entropy(types) + distance_weight · MSE(distance map) + dice_weight · soft Dice(types) (the
    HoVer-Net NP/NC recipe; the Dice term keeps rare types from being ignored)."""

    distance_weight: float = 1.0
    dice_weight: float = 1.0


@dataclass(kw_only=True)
class SegmenterTrainConfig(EngineConfig):
    steps: int = 1500
    learning_rate: float = 1e-3  # peak; linear warm-up, then cosine decay to 0 at `steps`
    warmup_steps: int = 50  # at most a tenth of the run
    weight_decay: float = 1e-4
    ema_decay: float | None = None  # the instrument is read at its last weights
    max_grad_norm: float = 0.0  # no clipping (the rate above was tuned without it)
    checkpoint_every: int = 500
    keep_checkpoints: int = 1  # ~60 MiB each (weights, AdamW state); the export is what is used
    num_workers: int = 0  # items are memory-mapped reads; the crops and targets are made in the step
    crop: int = 128  # random crop side in px: a multiple of 32 (the encoder's stride), at most the patch size
    color_jitter: float = 0.08  # per-channel gain 1 ± j and offset ± 128·j


@dataclass(kw_only=True)
class SegmenterRecipe(Recipe):
    METHOD = "segmenter"
    name: str = "segmenter"
    method: str = "segmenter"
    model: SegmenterModelConfig = field(default_factory=SegmenterModelConfig)
    loss: SegmenterLossConfig = field(default_factory=SegmenterLossConfig)
    train: SegmenterTrainConfig = field(default_factory=SegmenterTrainConfig)
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)  # written with the model

    def problems(self) -> list[str]:
        t, problems = self.train, self.train.problems()
        if t.steps < 1 or not t.learning_rate > 0:
            problems.append(f"train.steps ({t.steps}) and train.learning_rate ({t.learning_rate}) must be positive")
        if t.crop < 32 or t.crop % 32:
            problems.append(f"train.crop must be a positive multiple of 32, got {t.crop}")
        if t.warmup_steps < 0 or t.color_jitter < 0 or self.loss.distance_weight < 0 or self.loss.dice_weight < 0:
            problems.append("train.warmup_steps, train.color_jitter and the loss weights must not be negative")
        if len(self.model.decoder_channels) != 5 or self.model.stem_channels < 1:
            problems.append(f"model.decoder_channels needs 5 widths (strides 16, 8, 4, 2, 1), got "
                            f"{list(self.model.decoder_channels)}, and model.stem_channels must be at least 1")
        return problems


register_recipe_type(SegmenterRecipe)
