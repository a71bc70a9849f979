"""HistoSmith's recipes: the joint first stage (``method: histosmith-autoencoder``) and the count-conditioned latent
diffusion model (``method: histosmith``).

One named field per hyperparameter. The YAML files: ``histosmith-vq`` / ``histosmith-256`` (the paper's setting
at 256 px for a GPU) and ``histosmith-vq-tiny-cpu`` / ``histosmith-tiny-cpu`` (CPU runs on CoNSeP in minutes).
Where the paper is silent (loss weights, Tversky α/β, sampler settings) the choice and its reason are in
docs/histosmith.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from histosynth.recipes import latent
from histosynth.recipes.autoencoder import AutoencoderLossConfig, AutoencoderRecipe
from histosynth.recipes.base import Recipe, register_recipe_type


@dataclass
class JointAutoencoderLossConfig(AutoencoderLossConfig):
    """Head A: the image terms of the image autoencoder (l1, l2, perceptual) and L1/L2 on the distance map;
    head B: categorical cross-entropy + Tversky on the semantic mask (background + K types); + codebook."""

    distance_l1_weight: float = 1.0
    distance_l2_weight: float = 0.0
    cross_entropy_weight: float = 1.0
    tversky_weight: float = 1.0
    tversky_alpha: float = 0.3  # weight of false positives (α = β = 0.5 is Dice)
    tversky_beta: float = 0.7  # weight of false negatives: favours recall of small nuclei
    # cross-entropy class weights: "none" (the paper's plain CE) or ∝ 1/sqrt(pixel frequency of the class over the
    # training patches), normalised to mean 1, so that rare types (e.g. CoNSeP's "other") are decoded at all
    mask_class_weighting: Literal["none", "inverse-sqrt-frequency"] = "none"


@dataclass(kw_only=True)
class JointAutoencoderRecipe(AutoencoderRecipe):
    """The image autoencoder's recipe (``model``, ``train``) with the joint loss; the number of mask channels comes
    from the store's classes. VQ only (HistoSmith: "a VQ-VAE"); no patch-GAN and no ``init`` (a pretrained image
    autoencoder has 3 input channels, this one 5 + K)."""

    METHOD = "histosmith-autoencoder"
    method: str = "histosmith-autoencoder"
    loss: JointAutoencoderLossConfig = field(default_factory=JointAutoencoderLossConfig)

    def problems(self) -> list[str]:
        problems = super().problems()
        loss = self.loss
        if self.model.kind != "vq":
            problems.append(f"model.kind must be 'vq' for the joint autoencoder, got {self.model.kind!r}")
        if loss.disc_weight:
            problems.append("loss.disc_weight must be 0: the joint autoencoder has no patch-GAN")
        if self.init is not None:
            problems.append("init must be null: the joint autoencoder starts from scratch")
        if not (0 <= loss.tversky_alpha and 0 <= loss.tversky_beta and loss.tversky_alpha + loss.tversky_beta > 0):
            problems.append(f"loss.tversky_alpha and tversky_beta must be >= 0 and not both 0, got "
                            f"{loss.tversky_alpha}, {loss.tversky_beta}")
        return problems


@dataclass
class CountConditionConfig:
    """How counts per type + tissue enter the UNet (conditions/counts.py). "embedding" (default): the (K+T)-vector
    goes through diffusers' projection class embedding, added to the timestep embedding, so every residual block
    sees it; cheap, and right for a global condition with no spatial layout. "cross-attention": a linear map to
    ``num_tokens`` tokens the attention layers attend to (needs CrossAttn blocks); "both"."""

    injection: Literal["embedding", "cross-attention", "both"] = "embedding"
    num_tokens: int = 8
    # tissue of a patch: its manifest row's "tissue" (prepare nuclei --tissue), else this name for every patch
    default_tissue: str = "tissue"


@dataclass(kw_only=True)
class HistoSmithRecipe(Recipe):
    METHOD = "histosmith"
    patch_size: int
    magnification: str | None = None  # None: any store; else the store's magnification must match
    autoencoder: latent.AutoencoderConfig  # a run of `train autoencoder --recipe histosmith-vq...` (its JointVQModel)
    train: latent.LatentTrainConfig
    condition: CountConditionConfig = field(default_factory=CountConditionConfig)
    unet: latent.UNetConfig = field(default_factory=latent.UNetConfig)  # injection "embedding": no CrossAttn blocks
    diffusion: latent.LatentDiffusionConfig = field(default_factory=latent.LatentDiffusionConfig)
    # DDIM 20: the smallest count that matched DDIM 50 within noise in FD, blur and count error on both tiny
    # HistoSmiths (docs/benchmarks.md, "Quality vs sampling steps"; the paper gives DDIM without a count)
    sampling: latent.SamplingConfig = field(default_factory=lambda: latent.SamplingConfig(num_inference_steps=20, guidance_scale=2.0))

    def problems(self) -> list[str]:
        u, t, c = self.unet, self.train, self.condition
        problems = latent.latent_diffusion_problems(u, t)
        cross = any("CrossAttn" in b for b in (*u.down_block_types, *u.up_block_types, u.mid_block_type))
        if cross != (c.injection != "embedding"):
            problems.append(f"condition.injection {c.injection!r} " + (
                "has no tokens for the CrossAttn blocks of unet (use DownBlock2D/UpBlock2D and UNetMidBlock2D, or "
                "injection cross-attention/both)" if cross else "needs CrossAttn blocks in unet"))
        if c.num_tokens < 1:
            problems.append(f"condition.num_tokens must be at least 1, got {c.num_tokens}")
        if t.init_unet is not None:
            problems.append("train.init_unet must be null: HistoSmith's UNet starts from scratch (its input is the joint "
                            "latent and its condition a count vector, which no released LDM shares)")
        if not t.cache_latents:
            problems.append("train.cache_latents must be true: HistoSmith trains on cached joint latents")
        return problems


register_recipe_type(JointAutoencoderRecipe)
register_recipe_type(HistoSmithRecipe)
