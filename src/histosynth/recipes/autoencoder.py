"""Typed recipes for the first stage of latent diffusion: the autoencoder (``method: autoencoder``).

One named field per hyperparameter. The architecture fields are diffusers' ``VQModel`` / ``AutoencoderKL``
arguments under the names of the CompVis configs they come from (ch * ch_mult = block_out_channels,
num_res_blocks = layers_per_block, z_channels = latent_channels, n_embed = num_vq_embeddings, embed_dim =
vq_embed_dim). Loss weights follow CompVis ``VQLPIPSWithDiscriminator`` / ``LPIPSWithDiscriminator``
(see :mod:`histosynth.diffusion.autoencoder_loss`); the patch-GAN term is off unless ``disc_weight > 0``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from histosynth.errors import HistosynthError
from histosynth.recipes import register_recipe_type

KINDS = ("vq", "kl")
PERCEPTUAL = ("effnet-lite0", "lpips", "none")
CODEBOOK_INIT = ("uniform", "data")
MIXED_PRECISION = ("no", "fp16", "bf16")


@dataclass
class AutoencoderModelConfig:
    """Architecture. The downsampling factor is 2 ** (len(block_out_channels) - 1)."""

    kind: str = "vq"  # "vq": diffusers VQModel (PathLDM's choice) | "kl": AutoencoderKL (Stable Diffusion's)
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
    perceptual: str = "effnet-lite0"  # "effnet-lite0" (offline) | "lpips" (needs `pip install lpips`) | "none"
    perceptual_weight: float = 1.0
    codebook_weight: float = 1.0  # weight of diffusers' VQ loss (commitment + β·codebook; see below)
    commitment_beta: float = 0.25  # β of the VQ loss (VQ-VAE / CompVis, legacy placement)
    kl_weight: float = 1.0e-6  # times KL summed over the latent / number of pixel values = CompVis kl_weight
    # patch-GAN (taming NLayerDiscriminator, hinge loss, adaptive weight); CompVis: vq-f4 0.75, kl-f8 0.5
    disc_weight: float = 0.0  # 0: no discriminator at all
    disc_start: int = 0  # optimisation step from which D trains and the adversarial term counts (CompVis kl-f8: 50001)
    disc_num_layers: int = 3  # strided conv layers of D (3: 70 px receptive field per logit)
    disc_channels: int = 64  # width of D's first layer (doubles per layer, at most 8x)


@dataclass
class AutoencoderTrainConfig:
    learning_rate: float = 4.5e-6
    warmup_steps: int = 0  # linear warm-up, then constant (CompVis autoencoders train at a constant rate)
    adam_beta1: float = 0.5  # CompVis / taming autoencoders
    adam_beta2: float = 0.9
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    batch_size: int = 8  # per device
    gradient_accumulation_steps: int = 1
    steps: int = 100_000
    ema_decay: float | None = None  # None: no EMA (CompVis first stages have none); e.g. 0.999
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (accelerate)
    random_flips: bool = True  # random flips and 90° rotations (H&E has no orientation)
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2
    log_every: int = 50
    seed: int = 0
    num_workers: int = 2
    scaling_factor_images: int = 256  # training patches whose latent std sets scaling_factor = 1/std
    # vq, fresh runs without `init`: "uniform" (diffusers/CompVis: tiny random codes) or "data" (codes drawn from
    # encoder outputs on training patches before the first step: keeps a short run from collapsing onto few codes)
    codebook_init: str = "uniform"


@dataclass
class AutoencoderRecipe:
    name: str
    description: str
    patch_size: int  # training crop size; stores with larger patches are randomly cropped (the model is convolutional)
    method: str = "autoencoder"
    magnification: str | None = None  # None: any store; else the store's magnification must match
    model: AutoencoderModelConfig = field(default_factory=AutoencoderModelConfig)
    loss: AutoencoderLossConfig = field(default_factory=AutoencoderLossConfig)
    train: AutoencoderTrainConfig = field(default_factory=AutoencoderTrainConfig)
    init: str | None = None  # start from: a diffusers folder, a training run, or a CompVis / LDM .ckpt

    def __post_init__(self) -> None:
        m, loss, t = self.model, self.loss, self.train
        problems = []
        if self.method != "autoencoder":
            problems.append(f"method must be 'autoencoder', got {self.method!r}")
        if m.kind not in KINDS:
            problems.append(f"model.kind must be one of {KINDS}, got {m.kind!r}")
        if loss.perceptual not in PERCEPTUAL:
            problems.append(f"loss.perceptual must be one of {PERCEPTUAL}, got {loss.perceptual!r}")
        if t.codebook_init not in CODEBOOK_INIT:
            problems.append(f"train.codebook_init must be one of {CODEBOOK_INIT}, got {t.codebook_init!r}")
        if not loss.disc_weight >= 0 or loss.disc_start < 0 or loss.disc_num_layers < 1 or loss.disc_channels < 1:
            problems.append(f"loss.disc_weight must be >= 0 (got {loss.disc_weight}), disc_start >= 0 (got {loss.disc_start}), "
                            f"disc_num_layers and disc_channels >= 1 (got {loss.disc_num_layers}, {loss.disc_channels})")
        if t.mixed_precision not in MIXED_PRECISION:
            problems.append(f"train.mixed_precision must be one of {MIXED_PRECISION}, got {t.mixed_precision!r}")
        if not m.block_out_channels:
            problems.append("model.block_out_channels must not be empty")
        elif any(c % m.norm_num_groups for c in m.block_out_channels):
            problems.append(f"model.block_out_channels {m.block_out_channels} must be multiples of norm_num_groups {m.norm_num_groups}")
        elif self.patch_size % m.downsampling_factor:
            problems.append(f"patch_size {self.patch_size} is not a multiple of the downsampling factor {m.downsampling_factor}")
        bad_levels = [lv for lv in m.attention_levels if not 0 <= lv < len(m.block_out_channels)]
        if bad_levels:
            problems.append(f"model.attention_levels {bad_levels} out of range 0..{len(m.block_out_channels) - 1}")
        if t.ema_decay is not None and not (isinstance(t.ema_decay, (int, float)) and 0.0 < t.ema_decay < 1.0):
            problems.append(f"train.ema_decay must be null or in (0, 1), got {t.ema_decay!r}")
        if self.init is not None and not isinstance(self.init, str):
            problems.append(f"init must be a path or null, got {self.init!r}")
        if self.magnification is not None and not isinstance(self.magnification, str):
            problems.append(f"magnification must be a string like 10x or null, got {self.magnification!r}")
        for name, value in (("patch_size", self.patch_size), ("train.batch_size", t.batch_size), ("train.steps", t.steps),
                            ("train.checkpoint_every", t.checkpoint_every), ("train.log_every", t.log_every),
                            ("train.gradient_accumulation_steps", t.gradient_accumulation_steps),
                            ("train.scaling_factor_images", t.scaling_factor_images)):
            if value < 1:
                problems.append(f"{name} must be at least 1, got {value}")
        if problems:
            raise HistosynthError(f"recipe {self.name!r}: " + "; ".join(problems))

    @property
    def total_steps(self) -> int:
        return self.train.steps

    def to_dict(self) -> dict:
        return asdict(self)


register_recipe_type("autoencoder", AutoencoderRecipe)
