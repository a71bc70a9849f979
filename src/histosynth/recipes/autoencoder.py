"""Typed recipes for the first stage of latent diffusion: the autoencoder (``method: autoencoder``).

One named field per hyperparameter. The architecture fields are diffusers' ``VQModel`` / ``AutoencoderKL``
arguments under the names of the CompVis configs they come from (ch * ch_mult = block_out_channels,
num_res_blocks = layers_per_block, z_channels = latent_channels, n_embed = num_vq_embeddings, embed_dim =
vq_embed_dim). Loss weights follow CompVis ``VQLPIPSWithDiscriminator`` / ``LPIPSWithDiscriminator``
(see :mod:`histosynth.diffusion.autoencoder_loss`); the patch-GAN term is off unless ``disc_weight > 0``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from histosynth.recipes.base import EngineConfig, Recipe, register_recipe_type


@dataclass
class AutoencoderModelConfig:
    """Architecture. The downsampling factor is 2 ** (len(block_out_channels) - 1)."""

    kind: Literal["vq", "kl"] = "vq"  # "vq": diffusers VQModel (PathLDM's choice) | "kl": AutoencoderKL (Stable Diffusion's)
    block_out_channels: tuple[int, ...] = (128, 256, 512)  # CompVis ch=128, ch_mult=(1, 2, 4)
    layers_per_block: int = 2  # residual blocks per level in the encoder (the decoder has one more)
    latent_channels: int = 3  # z channels
    num_vq_embeddings: int = 8192  # codebook size (vq)
    vq_embed_dim: int = 3  # codebook vector width (vq); the latent the diffusion model sees has this many channels
    norm_num_groups: int = 32
    attention_levels: tuple[int, ...] = ()  # levels (0 = full resolution) with self-attention after each block
    mid_block_attention: bool = True  # the CompVis encoder/decoder always have one in the middle

    @property
    def downsampling_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @property
    def diffusion_channels(self) -> int:
        """Channels of the latent the diffusion model works on (vq: the codebook width, kl: z channels)."""
        return self.vq_embed_dim if self.kind == "vq" else self.latent_channels


@dataclass
class AutoencoderLossConfig:
    """loss = l1·|x−x̂| + l2·(x−x̂)² + perceptual·d(x, x̂) + (codebook·L_vq | kl·KL/pixels) [+ λ_adv·(−D(x̂))], all means;
    the discriminator D minimises the hinge loss on the same batch (one optimiser step for both, see the trainer)."""

    l1_weight: float = 1.0
    l2_weight: float = 0.0
    perceptual: Literal["effnet-lite0", "lpips", "none"] = "effnet-lite0"  # "effnet-lite0" (offline) | "lpips" (needs `pip install lpips`) | "none"
    perceptual_weight: float = 1.0
    codebook_weight: float = 1.0  # weight of diffusers' VQ loss (commitment + β·codebook; see below)
    commitment_beta: float = 0.25  # β of the VQ loss (VQ-VAE / CompVis, legacy placement)
    kl_weight: float = 1.0e-6  # times KL summed over the latent / number of pixel values = CompVis kl_weight
    # patch-GAN (taming NLayerDiscriminator, hinge loss, adaptive weight); CompVis: vq-f4 0.75, kl-f8 0.5
    disc_weight: float = 0.0  # 0: no discriminator at all
    disc_start: int = 0  # optimisation step from which D trains and the adversarial term counts (CompVis kl-f8: 50001)
    disc_num_layers: int = 3  # strided conv layers of D (3: 70 px receptive field per logit)
    disc_channels: int = 64  # width of D's first layer (doubles per layer, at most 8x)


@dataclass(kw_only=True)
class AutoencoderTrainConfig(EngineConfig):
    learning_rate: float = 4.5e-6
    warmup_steps: int = 0  # linear warm-up, then constant (CompVis autoencoders train at a constant rate)
    adam_beta1: float = 0.5  # CompVis / taming autoencoders
    adam_beta2: float = 0.9
    steps: int = 100_000
    ema_decay: float | None = None  # None: no EMA (CompVis first stages have none); e.g. 0.999
    random_flips: bool = True  # random flips and 90° rotations (H&E has no orientation)
    scaling_factor_images: int = 256  # training patches whose latent std sets scaling_factor = 1/std
    # vq, fresh runs without `init`: "uniform" (diffusers/CompVis: tiny random codes) or "data" (codes drawn from
    # encoder outputs on training patches before the first step: keeps a short run from collapsing onto few codes)
    codebook_init: Literal["uniform", "data"] = "uniform"


@dataclass(kw_only=True)
class AutoencoderRecipe(Recipe):
    METHOD = "autoencoder"
    patch_size: int  # training crop size; stores with larger patches are randomly cropped (the model is convolutional)
    method: str = "autoencoder"
    magnification: str | None = None  # None: any store; else the store's magnification must match
    model: AutoencoderModelConfig = field(default_factory=AutoencoderModelConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    train: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)
    init: str | None = None  # start from: a diffusers folder, a training run, or a CompVis / LDM .ckpt

    def problems(self) -> list[str]:
        m, loss, t = self.model, self.loss, self.train
        problems = t.problems()
        if not loss.disc_weight >= 0 or loss.disc_start < 0 or loss.disc_num_layers < 1 or loss.disc_channels < 1:
            problems.append(f"loss.disc_weight must be >= 0 (got {loss.disc_weight}), disc_start >= 0 (got {loss.disc_start}), "
                            f"disc_num_layers and disc_channels >= 1 (got {loss.disc_num_layers}, {loss.disc_channels})")
        if not m.block_out_channels:
            problems.append("model.block_out_channels must not be empty")
        elif any(c % m.norm_num_groups for c in m.block_out_channels):
            problems.append(f"model.block_out_channels {m.block_out_channels} must be multiples of norm_num_groups {m.norm_num_groups}")
        elif self.patch_size % m.downsampling_factor:
            problems.append(f"patch_size {self.patch_size} is not a multiple of the downsampling factor {m.downsampling_factor}")
        bad_levels = [lv for lv in m.attention_levels if not 0 <= lv < len(m.block_out_channels)]
        if bad_levels:
            problems.append(f"model.attention_levels {bad_levels} out of range 0..{len(m.block_out_channels) - 1}")
        if t.ema_decay is not None and not 0.0 < t.ema_decay < 1.0:
            problems.append(f"train.ema_decay must be null or in (0, 1), got {t.ema_decay!r}")
        for name, value in (("patch_size", self.patch_size), ("train.steps", t.steps),
                            ("train.scaling_factor_images", t.scaling_factor_images)):
            if value < 1:
                problems.append(f"{name} must be at least 1, got {value}")
        return problems


register_recipe_type(AutoencoderRecipe)
