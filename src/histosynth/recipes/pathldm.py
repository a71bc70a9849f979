"""PathLDM's recipe (``method: pathldm``; ``ldm`` is read as an alias): frozen autoencoder + cross-attention UNet + conditioner.

One named field per hyperparameter; the YAML files ``pathldm-256.yaml`` (the paper's setting) and
``pathldm-tiny-cpu.yaml`` / ``pathldm-tiny-cpu-class.yaml`` (CPU runs) fill them in.

Paths in a recipe (``autoencoder.path``, ``conditioner.captions``, ``train.init_unet``, ``train.cache_dir``) are
relative to the directory you run from; ``{data}`` in them stands for the patch store given with ``--data``
(so ``{data}/captions.jsonl`` is a captions file written next to the store).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from histosynth.recipes.base import Recipe, register_recipe_type
from histosynth.recipes.latent import (
    AutoencoderConfig,
    LatentDiffusionConfig,
    LatentTrainConfig,
    SamplingConfig,
    UNetConfig,
    latent_diffusion_problems,
)

#: PathLDM's class baseline (Sec. 4.2), in class-index order (as conditions.captions.PATHLDM_CLASSES).
PATHLDM_CLASS_NAMES = ("low tumor; low til", "low tumor; high til", "high tumor; low til", "high tumor; high til")


@dataclass
class ConditionerConfig:
    """What the UNet cross-attends to: a frozen text encoder (PathLDM) or a learned class embedding (baseline)."""

    kind: Literal["text", "class"] = "text"
    # text: hub id (openai/clip-vit-base-patch32, vinid/plip), a local folder, or "minilm" (offline)
    text_encoder: str = "minilm"
    max_tokens: int = 154  # PathLDM: two 77-token CLIP halves (see conditions/text.py)
    # one caption (or several) per patch: the JSONL of `histosynth captions build`
    captions: str = "{data}/captions.jsonl"
    # class: the class of a captions row is its "class" field, else tumor/TIL probabilities thresholded
    # at `class_threshold` (PathLDM's 4 classes), else nuclei counts: "high" when counts[tumor_type]
    # (resp. counts[til_type]) >= count_threshold (the analogue for label-captioned stores such as CoNSeP)
    num_classes: int = 4
    class_threshold: float = 0.5
    tumor_type: str = "epithelial"
    til_type: str = "inflammatory"
    count_threshold: int = 10


@dataclass(kw_only=True)
class LatentDiffusionRecipe(Recipe):
    METHOD = "pathldm"
    patch_size: int  # image pixels; the latent size is patch_size / the autoencoder's downsampling factor
    magnification: str
    autoencoder: AutoencoderConfig
    train: LatentTrainConfig
    conditioner: ConditionerConfig = field(default_factory=ConditionerConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    diffusion: LatentDiffusionConfig = field(default_factory=LatentDiffusionConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def problems(self) -> list[str]:
        return latent_diffusion_problems(self.unet, self.train)


register_recipe_type(LatentDiffusionRecipe)
