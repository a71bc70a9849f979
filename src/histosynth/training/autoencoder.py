"""Train the first stage of latent diffusion: a VQ (PathLDM's VQ-f4) or KL autoencoder on a patch store.

The task runs on the one engine (:mod:`histosynth.training.engine`: accelerate, atomic checkpoints,
exact resume) with an autoencoder micro-loss: every random draw of optimisation step s (crop offsets,
flips/rotations, the KL posterior sample) comes from the engine's generator seeded by (seed, micro-batch
number) and the data order is a pure function of (seed, epoch), so a resumed run reproduces the losses of
an uninterrupted one. Any store works, labelled or
image-only (``prepare slides``); patches larger than the recipe's ``patch_size`` are randomly cropped.

Run directory::

    RUN/recipe.yaml          the recipe and the store it was started with (resume refuses another)
    RUN/losses.jsonl         one row per step: loss (everything optimised, D's hinge loss included), l1, l2,
                             perceptual, vq (codebook loss) or kl, codes used, lr; with a patch-GAN also
                             adversarial (−mean D(x̂)), adv_weight (its adaptive weight), disc (D's hinge loss),
                             logits_real / logits_fake (mean D outputs)
    RUN/loss.png             the curves
    RUN/checkpoints/step-N/  accelerate state (autoencoder, discriminator, optimiser), ema.safetensors (decay 0 when the recipe has no EMA), trainer_state.json
    RUN/autoencoder/         the model (EMA weights if any) via save_pretrained, with scaling_factor = 1/std
                             of its latents on training patches (as LDM's scale_by_std), + histosynth.json
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, VQModel
from torch import nn

from histosynth.data.dataset import ImagePatchDataset
from histosynth.data.store import PatchStore
from histosynth.diffusion import checkpoint as ckpt
from histosynth.diffusion.autoencoder_loss import (
    adaptive_adversarial_weight,
    autoencoder_loss,
    hinge_discriminator_loss,
    make_perceptual,
)
from histosynth.diffusion.latent_cache import image_batch
from histosynth.errors import HistosynthError, TrainingError
from histosynth.models.autoencoders import latent_channels_of, load_autoencoder, make_autoencoder
from histosynth.models.patch_discriminator import PatchDiscriminator
from histosynth.recipes.autoencoder import AutoencoderRecipe
from histosynth.training.task import TrainingTask

AUTOENCODER = "autoencoder"
INFO = "histosynth.json"


def make_model(recipe: AutoencoderRecipe) -> VQModel | AutoencoderKL:
    m = recipe.model
    return make_autoencoder(
        m.kind, m.block_out_channels, m.layers_per_block, m.latent_channels, num_vq_embeddings=m.num_vq_embeddings,
        vq_embed_dim=m.vq_embed_dim, norm_num_groups=m.norm_num_groups, attention_levels=m.attention_levels,
        mid_block_attention=m.mid_block_attention, sample_size=recipe.patch_size,
    )


class ReconstructionStep(nn.Module):
    """One training forward as one module (so DDP sees a single forward): encode, quantise or sample, decode,
    and with a discriminator its three looks at the batch.

    Returns (reconstruction, regulariser, codebook indices or None, logits or None). VQ: diffusers' VQ loss
    (commitment + β·codebook, CompVis's legacy placement of β). KL: KL(q(z|x) || N(0, I)) summed over the
    latent, divided by the number of pixel values (so kl_weight means what CompVis's does). Logits:
    D(x̂) through D's weights detached (the autoencoder's adversarial term: gradient to the decoder only), and
    D(x), D(x̂ detached) (the discriminator's hinge loss: gradient to D only). One backward and one optimiser
    step then update both, where taming alternates two optimisers on the same batch.
    """

    def __init__(self, autoencoder: VQModel | AutoencoderKL, discriminator: nn.Module | None = None):
        super().__init__()
        self.ae = autoencoder
        self.discriminator = discriminator

    def reconstruct(self, x: torch.Tensor, generator: torch.Generator | None = None):
        ae = self.ae
        if isinstance(ae, VQModel):
            h = ae.encode(x).latents
            quant, vq_loss, (_, _, indices) = ae.quantize(h)
            spatial = quant if ae.config.norm_type == "spatial" else None
            return ae.decoder(ae.post_quant_conv(quant), spatial), vq_loss, indices
        posterior = ae.encode(x).latent_dist
        z = posterior.sample(generator=generator)
        return ae.decode(z).sample, posterior.kl() / x[0].numel(), None

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None):
        recon, regulariser, indices = self.reconstruct(x, generator)
        d = self.discriminator
        if d is None:
            return recon, regulariser, indices, None
        frozen = {name: p.detach() for name, p in d.named_parameters()}
        fake_for_ae = torch.func.functional_call(d, frozen, (recon,))
        return recon, regulariser, indices, (fake_for_ae, d(x), d(recon.detach()))


def crop_and_turn(x: torch.Tensor, size: int, flips: bool, g: torch.Generator) -> torch.Tensor:
    """(B, C, P, P) -> (B, C, size, size): a random crop, then one of the 8 flips/rotations, the same for all C
    channels of an item (so label channels stay aligned with the image)."""
    b, _, h, w = x.shape
    ys = torch.randint(0, h - size + 1, (b,), generator=g)
    xs = torch.randint(0, w - size + 1, (b,), generator=g)
    ks = torch.randint(0, 8, (b,), generator=g) if flips else torch.zeros(b, dtype=torch.long)
    out = []
    for i in range(b):
        t = x[i, :, ys[i] : ys[i] + size, xs[i] : xs[i] + size]
        t = torch.rot90(t, int(ks[i]) % 4, dims=(1, 2))
        out.append(t.flip(-1) if ks[i] >= 4 else t)
    return torch.stack(out)


def _augment(images: torch.Tensor, size: int, flips: bool, g: torch.Generator) -> torch.Tensor:
    """uint8 (B, 3, P, P) -> float [-1, 1] (B, 3, size, size), augmented by :func:`crop_and_turn`."""
    return crop_and_turn(images, size, flips, g).float() / 127.5 - 1.0


def load_init_weights(model: VQModel | AutoencoderKL, recipe: AutoencoderRecipe) -> None:
    """Copy the weights of ``recipe.init`` (diffusers folder, training run or CompVis/LDM .ckpt) into ``model``."""
    source = Path(recipe.init)
    src, _ = load_autoencoder(source, kind=recipe.model.kind, config={"norm_num_groups": recipe.model.norm_num_groups})
    want, have = recipe.model, src.config
    if int(have.latent_channels) != want.latent_channels or latent_channels_of(src) != want.diffusion_channels:
        raise HistosynthError(
            f"the checkpoint's latent has {latent_channels_of(src)} channels (z: {have.latent_channels}), recipe "
            f"{recipe.name} has {want.diffusion_channels} (z: {want.latent_channels})", source)
    theirs, ours = src.state_dict(), model.state_dict()
    diff = sorted(set(theirs) ^ set(ours))
    diff += [f"{k} {tuple(theirs[k].shape)} vs recipe {tuple(ours[k].shape)}" for k in sorted(set(theirs) & set(ours))
             if theirs[k].shape != ours[k].shape]
    if diff:
        raise HistosynthError(f"the checkpoint's architecture differs from recipe {recipe.name}: "
                              + ", ".join(diff[:6]) + (" ..." if len(diff) > 6 else ""), source)
    model.load_state_dict(theirs)


def _evenly_spaced_train_patches(store: PatchStore, n: int) -> list[int]:
    train = store.indices("train") or store.indices(None)
    return [train[int(i)] for i in np.linspace(0, len(train) - 1, min(n, len(train))).round()]


@torch.no_grad()
def init_codebook_from_data(model: VQModel, store: PatchStore, seed: int, num_patches: int = 8,
                            inputs: Callable = image_batch) -> None:
    """Set the codebook to distinct encoder outputs (before quantisation) of evenly spaced training patches.

    diffusers/CompVis start from codes uniform in ±1/K, far smaller than the encoder outputs, so early on
    nearly every vector maps to the same few codes; a small model trained briefly never leaves them.
    """
    h = model.encode(inputs(store, _evenly_spaced_train_patches(store, num_patches))).latents
    vectors = h.permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    k = model.quantize.embedding.weight.shape[0]
    g = torch.Generator().manual_seed(int(seed) + 7919)
    picks = torch.randperm(len(vectors), generator=g)[:k] if len(vectors) >= k else torch.randint(0, len(vectors), (k,), generator=g)
    model.quantize.embedding.weight.copy_(vectors[picks])


@torch.no_grad()
def latent_scaling_factor(ae: VQModel | AutoencoderKL, store: PatchStore, num_images: int, batch_size: int,
                          seed: int, device: torch.device | str = "cpu",
                          inputs: Callable = image_batch) -> tuple[float, int]:
    """1 / std of the latents the diffusion model will see, over up to ``num_images`` evenly spaced training
    patches (LDM's scale_by_std; VQ: the encoder output before quantisation, KL: a posterior sample).
    NaN or inf when the latents are not finite or constant."""
    picks = _evenly_spaced_train_patches(store, num_images)
    g = torch.Generator().manual_seed(int(seed))
    latents = []
    ae.eval()
    for i in range(0, len(picks), batch_size):
        x = inputs(store, picks[i : i + batch_size]).to(device)
        if isinstance(ae, VQModel):
            z = ae.encode(x).latents
        else:
            z = ae.encode(x).latent_dist.sample(generator=g)
        latents.append(z.float().flatten().cpu())
    std = torch.cat(latents).double().std().item()
    return (1.0 / std if std != 0 else float("inf")), len(picks)


class AutoencoderTask(TrainingTask):
    plot_columns = {"loss": "loss", "l1": "l1", "perceptual": "perceptual", "vq": "vq", "kl": "kl",
                    "codes": "codebook entries used / batch", "adversarial": "adversarial −D(x̂)",
                    "disc": "discriminator hinge"}
    #: the model's input batch of store patches (its latents set the exported scaling factor)
    inputs = staticmethod(image_batch)
    recipe_type = AutoencoderRecipe

    def __init__(self, recipe: AutoencoderRecipe, data: Path, *, progress: bool = True):
        super().__init__(recipe, data, progress=progress)
        self.store = self.open_store(data, magnification=True)

    def check_patch_size(self, store) -> None:
        """Training crops patches: the store's may be larger than the recipe's ``patch_size``, not smaller."""
        if store.patch_size < self.recipe.patch_size:
            raise HistosynthError(f"the store holds {store.patch_size} px patches, smaller than the "
                                  f"{self.recipe.patch_size} px crops recipe {self.recipe.name} trains on", store.path)

    def setup(self, accelerator, run, resuming):
        self.device, self.autocast = accelerator.device, accelerator.autocast
        self._dataset = ImagePatchDataset(self.store, "train")

    def build_model(self, accelerator, run, resuming):
        recipe, l_cfg, t_cfg = self.recipe, self.recipe.loss, self.recipe.train
        model = make_model(recipe)
        if recipe.init is not None and not resuming:
            load_init_weights(model, recipe)
        elif isinstance(model, VQModel) and t_cfg.codebook_init == "data" and not resuming:
            init_codebook_from_data(model, self.store, t_cfg.seed)
        if isinstance(model, VQModel):
            model.quantize.beta = l_cfg.commitment_beta  # diffusers fixes 0.25 in the constructor
        self.perceptual = make_perceptual(l_cfg.perceptual)
        if self.perceptual is not None:
            self.perceptual.to(self.device)
        discriminator = None
        if l_cfg.disc_weight > 0:
            discriminator = PatchDiscriminator(3, l_cfg.disc_channels, l_cfg.disc_num_layers)
            if l_cfg.disc_start >= recipe.total_steps and accelerator.is_main_process:
                print(f"warning: recipe {recipe.name}: loss.disc_start {l_cfg.disc_start} >= train.steps "
                      f"{recipe.total_steps}: the patch-GAN term never starts", flush=True)
        return ReconstructionStep(model, discriminator)

    def parameter_groups(self, model):
        # one parameter group per network (each clipped on its own); CompVis: same rate and betas for D
        groups = [{"params": list(model.ae.parameters())}]
        if model.discriminator is not None:
            groups.append({"params": list(model.discriminator.parameters())})
        return groups

    def lr_factor(self, step: int) -> float:
        warmup = self.recipe.train.warmup_steps
        return min(1.0, (step + 1) / warmup) if warmup else 1.0

    def dataset(self):
        return self._dataset

    def micro_loss(self, model, batch, g, step):
        recipe, l_cfg = self.recipe, self.recipe.loss
        x = _augment(batch["image"], recipe.patch_size, recipe.train.random_flips, g).to(self.device)
        with self.autocast():
            recon, regulariser, indices, logits = model(x, g)
            loss, terms = autoencoder_loss(
                x, recon, regulariser, kind=recipe.model.kind, l1_weight=l_cfg.l1_weight, l2_weight=l_cfg.l2_weight,
                perceptual=self.perceptual, perceptual_weight=l_cfg.perceptual_weight,
                codebook_weight=l_cfg.codebook_weight, kl_weight=l_cfg.kl_weight)
        if logits is not None:
            loss = self._adversarial(model, loss, logits, terms, step)
        if indices is not None:  # distinct codebook entries this micro-batch used (a collapse shows here first)
            terms["codes"] = torch.tensor(float(torch.unique(indices).numel()), device=loss.device)
        return loss, terms, x.shape[0]

    def watched_loss(self, row: dict) -> float:
        """The reconstruction loss (weighted L1 + L2 + perceptual): the GAN terms swing by design and switch on at
        ``loss.disc_start``, which would read as a jump."""
        l_cfg = self.recipe.loss
        return l_cfg.l1_weight * row["l1"] + l_cfg.l2_weight * row["l2"] + l_cfg.perceptual_weight * row["perceptual"]

    def _adversarial(self, model, loss, logits, terms, step):
        """Add the patch-GAN terms: the autoencoder's adaptively weighted −D(x̂), and D's hinge loss."""
        l_cfg = self.recipe.loss
        fake_for_ae, real, fake = logits
        adversarial = -fake_for_ae.float().mean()
        if step >= l_cfg.disc_start:
            unwrapped = model.module if hasattr(model, "module") else model
            last_layer = unwrapped.ae.decoder.conv_out.weight
            weight = adaptive_adversarial_weight(loss, adversarial, last_layer, l_cfg.disc_weight)
            d_loss = hinge_discriminator_loss(real, fake)
        else:  # CompVis's adopt_weight: D sees the batch but neither network learns from it yet
            weight = adversarial.new_zeros(())
            d_loss = 0.0 * hinge_discriminator_loss(real, fake)
        terms.update(adversarial=adversarial.detach(), adv_weight=weight, disc=d_loss.detach(),
                     logits_real=real.detach().float().mean(), logits_fake=fake.detach().float().mean())
        return loss + weight * adversarial + d_loss

    def export(self, wrapper, ema, run):
        weights = None
        if ema is not None:  # the EMA tracks the wrapper; the autoencoder's shadows are those named ae.*
            weights = [w for (name, _), w in zip(wrapper.named_parameters(), ema.shadow_params) if name.startswith("ae.")]
        export_autoencoder(wrapper.ae, weights, run / AUTOENCODER, self.recipe, self.store,
                           ckpt.read_trainer_state(ckpt.latest_checkpoint(run))["step"], self.device, self.inputs)


def train_autoencoder(recipe: AutoencoderRecipe, data: str | Path, out: str | Path, *, max_steps: int | None = None,
                      resume: bool = False, overwrite: bool = False, progress: bool = True):
    """Train the autoencoder ``recipe`` on the train split of patch store ``data`` into run directory ``out``."""
    from histosynth.training.engine import fit

    return fit(AutoencoderTask(recipe, data, progress=progress), out, max_steps=max_steps, resume=resume,
               overwrite=overwrite, progress=progress)


def export_autoencoder(ae, ema_weights: list[torch.Tensor] | None, where: Path, recipe: AutoencoderRecipe,
                       store: PatchStore, step: int, device, inputs: Callable = image_batch) -> None:
    """save_pretrained a copy (EMA weights, in ``ae.parameters()`` order, if any) whose config carries
    scaling_factor = 1/std of its latents."""
    copy = type(ae).from_config(ae.config)
    copy.load_state_dict(ae.state_dict())
    if ema_weights is not None:
        params = list(copy.parameters())
        if len(params) != len(ema_weights):
            raise TrainingError(f"EMA holds {len(ema_weights)} tensors for {len(params)} autoencoder parameters", where.parent)
        with torch.no_grad():
            for p, w in zip(params, ema_weights):
                p.copy_(w)
    copy.to(device)
    t = recipe.train
    scaling, n = latent_scaling_factor(copy, store, t.scaling_factor_images, t.batch_size, t.seed, device, inputs)
    if not np.isfinite(scaling) or scaling <= 0:
        raise TrainingError(f"after step {step} the latents of the training patches have std {1 / scaling:.4g}: training "
                            "diverged or collapsed. Lower the learning rate or train in fp32 (mixed_precision: no).",
                            where.parent)
    copy.register_to_config(scaling_factor=scaling)
    info = {
        "recipe": recipe.name, "step": step, "store": str(store.path), "ema": ema_weights is not None,
        "scaling_factor": {"value": scaling, "images": n, "split": "train",
                           "latents": "encoder output before quantisation" if recipe.model.kind == "vq" else "posterior sample"},
    }

    def write(tmp: Path) -> None:
        copy.cpu().save_pretrained(tmp, safe_serialization=True)
        (tmp / INFO).write_text(json.dumps(info, indent=2))

    ckpt.write_atomically(where, write)
