"""PathLDM's training task: latent diffusion on a frozen autoencoder, conditioned on captions (or classes).

A frozen autoencoder maps each patch to latents (× the scaling factor); the condition of each patch goes through
the recipe's conditioning (``latent_conditions.py``: a frozen text encoder with embeddings cached per distinct
caption, or the class baseline's learned token); a diffusers ``UNet2DConditionModel`` learns ε-prediction with
the MSE loss; with probability ``condition_dropout`` the condition is the null one (classifier-free guidance).

Everything random in step s (flip variant, the caption drawn among a patch's captions, dropout, t, ε, a KL
posterior sample) comes from the engine's per-step generator, in that order; latents are computed once into
``RUN/cache`` or ``train.cache_dir`` (``diffusion/latent_cache.py``).

Run directory: the engine's (recipe.yaml, losses.jsonl, loss.png, checkpoints/), plus ``cache/``,
``init_report.json`` when the UNet started from a checkpoint, and ``pipeline/`` (a PathLDMPipeline with the EMA
weights, the autoencoder, the DDIM scheduler and the conditioner).
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel
from torch.utils.data import Dataset

from histosynth.conditions.patch_captions import match_captions, read_caption_rows
from histosynth.data.store import PatchStore
from histosynth.diffusion import checkpoint as ckpt
from histosynth.diffusion import latent_cache as cache
from histosynth.diffusion.schedulers import ddpm_scheduler
from histosynth.errors import DataError
from histosynth.pipelines.pathldm import PathLDMPipeline
from histosynth.recipes.pathldm import LatentDiffusionRecipe
from histosynth.training.engine import ema_copy
from histosynth.training.latent import export_scheduler, first_stage, ldm_warmup_factor, make_unet, shared_latent_cache
from histosynth.training.run_dir import PIPELINE
from histosynth.training.latent_conditions import CONDITIONINGS, resolve_path
from histosynth.training.task import TrainingTask

class LatentDenoiser(torch.nn.Module):
    """What is trained: the UNet, and the conditioning's trainable part (e.g. the class embedding) if it has one."""

    def __init__(self, unet: UNet2DConditionModel, condition_encoder: torch.nn.Module | None = None):
        super().__init__()
        self.unet = unet
        self.condition_encoder = condition_encoder

    def forward(self, latents: torch.Tensor, t: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """ε prediction; ``condition`` is (B, T, D) context, or the input of ``condition_encoder`` (class labels)."""
        if self.condition_encoder is not None:
            condition = self.condition_encoder(condition).embeddings
        return self.unet(latents, t, encoder_hidden_states=condition).sample


def training_patches(store: PatchStore, captions: Path):
    """Train-split store indices that have captions, and their caption rows (several per patch allowed)."""
    matched = match_captions(read_caption_rows(captions), store, captions)
    train = store.indices("train")
    if not train:
        raise DataError("the store has no train patches", store.path)
    indices = [i for i in train if i in matched]
    if not indices:
        raise DataError(f"none of the {len(train)} train patches of {store.path} has a caption here", captions)
    if len(indices) < len(train):
        print(f"note: {len(train) - len(indices)} of {len(train)} train patches have no caption in {captions}; "
              f"training on the {len(indices)} that do")
    return indices, [matched[i] for i in indices]


class _Positions(Dataset):
    """Positions into the training patches; with ``store`` (no latent cache) also the patch as a [-1, 1] image."""

    def __init__(self, indices: list[int], store: PatchStore | None):
        self.indices, self.store = indices, store

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        item = {"position": i}
        if self.store is not None:
            item["image"] = cache.image_batch(self.store, [self.indices[i]])[0]
        return item


class PathLDMTask(TrainingTask):
    plot_columns = {"loss": "latent ε MSE"}
    recipe_type = LatentDiffusionRecipe

    def __init__(self, recipe: LatentDiffusionRecipe, data: Path, *, progress: bool = True):
        super().__init__(recipe, data, progress=progress)
        t_cfg = recipe.train
        self.store = self.open_store(data)
        # inputs are loaded and checked before the run directory is touched
        self.vae, self.scaling = first_stage(recipe.autoencoder, data)
        captions = resolve_path(recipe.conditioner.captions, data)
        self.indices, rows = training_patches(self.store, captions)
        self.conditioning = CONDITIONINGS[recipe.conditioner.kind](recipe, data)
        self.options = self.conditioning.values(self.indices, rows, captions)
        self.init_from = resolve_path(t_cfg.init_unet, data) if t_cfg.init_unet else None
        self.cache_dir = resolve_path(t_cfg.cache_dir, data) if t_cfg.cache_dir else None
        self.noise_scheduler = ddpm_scheduler(recipe.diffusion)

    def setup(self, accelerator, run, resuming):
        t_cfg, device = self.recipe.train, accelerator.device
        self.device, self.autocast = device, accelerator.autocast
        cache_dir = self.cache_dir or run / cache.CACHE
        self.vae.to(device)
        self.stats = None
        if t_cfg.cache_latents:  # frozen-model outputs, computed once (the main process writes them, the others read)
            self.stats = shared_latent_cache(accelerator, cache_dir, self.vae, self.store, self.indices,
                                             flips=t_cfg.random_flips, progress=self.progress)
            probe = torch.from_numpy(np.array(self.stats[0, 0]))[None]
        else:
            probe = cache.encode_stats(self.vae, cache.image_batch(self.store, self.indices[:1])).cpu()
        self.vq = cache.is_vq(self.vae)
        self.latent_shape = (probe.shape[1] // (1 if self.vq else 2), probe.shape[-1])
        self.conditioning.setup(accelerator, cache_dir, self.progress)

    def build_model(self, accelerator, run, resuming):
        unet = make_unet(self.recipe, *self.latent_shape)
        encoder = self.conditioning.trainable()
        if self.init_from is not None and not resuming:
            from histosynth.diffusion.unet_init import init_unet_from, write_report

            report = init_unet_from(unet, self.init_from)
            accelerator.print(report.summary())
            if accelerator.is_main_process:
                write_report(report, run / "init_report.json")
        return LatentDenoiser(unet, encoder)

    def lr_factor(self, step: int) -> float:
        return ldm_warmup_factor(step, self.recipe.train.lr_warmup_steps)

    def dataset(self):
        return _Positions(self.indices, None if self.stats is not None else self.store)

    def micro_loss(self, model, batch, g, step):
        t_cfg = self.recipe.train
        # 1. latents of the batch's patches, in the flip variant drawn for each
        pos = batch["position"].tolist()
        k = torch.randint(0, cache.NUM_FLIPS, (len(pos),), generator=g) if t_cfg.random_flips else torch.zeros(len(pos), dtype=torch.long)
        if self.stats is not None:
            z = torch.from_numpy(np.stack([self.stats[p, int(kk)] for p, kk in zip(pos, k)]))
        else:
            z = cache.encode_stats(self.vae, cache.flip(batch["image"], k)).cpu()
        z = cache.latents_from_stats(z, self.vq, g) * self.scaling
        b = z.shape[0]
        # 2. the condition: one of the patch's captions (or classes), the null one with probability p
        pick = torch.rand(b, generator=g)
        drop = torch.rand(b, generator=g) < t_cfg.condition_dropout
        chosen = [self.options[p][min(int(u * len(self.options[p])), len(self.options[p]) - 1)]
                  for p, u in zip(pos, pick.tolist())]
        # 3. forward process
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        condition = self.conditioning.batch(chosen, drop.tolist())
        z, t, noise, condition = (v.to(self.device) for v in (z, t, noise, condition))
        xt = self.noise_scheduler.add_noise(z, noise, t)
        with self.autocast():
            eps = model(xt, t, condition)
        return torch.nn.functional.mse_loss(eps.float(), noise), {}, b

    def export(self, model, ema, run):
        """``RUN/pipeline``: a ready-to-sample PathLDMPipeline with the EMA weights."""
        denoiser = ema_copy(model, ema)
        pipe = PathLDMPipeline(
            unet=denoiser.unet, vae=copy.deepcopy(self.vae).cpu(),
            scheduler=export_scheduler(self.recipe),
            conditioner=self.conditioning.conditioner(denoiser.condition_encoder), latent_scaling_factor=self.scaling,
            magnification=self.store.magnification, patch_size=self.store.patch_size, sampling=asdict(self.recipe.sampling),
            **self.conditioning.pipeline_config(),
        )
        ckpt.write_atomically(run / PIPELINE, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))


def train_latent(recipe: LatentDiffusionRecipe, data: str | Path, out: str | Path, *, max_steps: int | None = None,
                 resume: bool = False, overwrite: bool = False, progress: bool = True):
    """Train the PathLDM ``recipe`` on the train split of patch store ``data`` into run directory ``out``."""
    from histosynth.training.engine import fit

    return fit(PathLDMTask(recipe, data, progress=progress), out, max_steps=max_steps, resume=resume,
               overwrite=overwrite, progress=progress)
