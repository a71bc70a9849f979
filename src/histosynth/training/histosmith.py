"""HistoSmith's training task: count-conditioned latent diffusion on the joint (image, distance map, mask) latent.

The frozen joint autoencoder (a ``histosmith-autoencoder`` run) maps each training patch with its labels to one
latent (cached once with its flips: counts do not change under a flip); the condition of a patch is its nuclei
counts per type (the store's manifest counts) over the training maximum per type, and its tissue one-hot
(conditions/counts.py); a diffusers ``UNet2DConditionModel`` learns ε-prediction with the MSE loss; with
probability ``condition_dropout`` the condition is the learned null one (classifier-free guidance).

Everything random in step s (flip variant, dropout, t, ε) comes from the engine's per-step generator.
Run directory: the engine's (recipe.yaml, losses.jsonl, loss.png, checkpoints/), ``cache/`` and ``pipeline/``
(a HistoSmithPipeline with the EMA weights).
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from histosynth.conditions.counts import CountConditioner
from histosynth.data.store import PatchStore
from histosynth.diffusion import checkpoint as ckpt
from histosynth.diffusion import latent_cache as cache
from histosynth.diffusion.schedulers import ddpm_scheduler
from histosynth.errors import DataError, HistosynthError
from histosynth.models.joint_autoencoder import JointVQModel, joint_batch
from histosynth.pipelines.histosmith import HistoSmithPipeline
from histosynth.recipes.histosmith import HistoSmithRecipe
from histosynth.training.engine import ema_copy
from histosynth.training.latent_conditions import resolve_path
from histosynth.training.latent import cached_latents, export_scheduler, first_stage, ldm_warmup_factor, make_unet, shared_latent_cache
from histosynth.training.run_dir import PIPELINE
from histosynth.training.task import PositionDataset, TrainingTask


def patch_conditions(store: PatchStore, indices: list[int], default_tissue: str):
    """(counts float64 (N, K) in class order, tissue names (N,)) of store patches, from the manifest rows."""
    names = list(store.class_names)
    rows = [store.records[i] for i in indices]
    counts = np.array([[row["counts"].get(n, 0) for n in names] for row in rows], dtype=np.float64)
    # a tissue *name* (prepare nuclei --tissue); slide stores written before 2026-12-04 used "tissue" for the
    # tissue fraction (a number; now "tissue_fraction"), which is not a name
    return counts, [row["tissue"] if isinstance(row.get("tissue"), str) else default_tissue for row in rows]


def make_conditioner(recipe: HistoSmithRecipe, class_names, counts: np.ndarray, tissues) -> CountConditioner:
    """The count rule from the training patches: scale = the per-type maximum (at least 1), range = [min, max]."""
    c = recipe.condition
    return CountConditioner(
        class_names=list(class_names), tissues=sorted(set(tissues)),
        count_scale=[float(max(1.0, v)) for v in counts.max(0)],
        count_range=[[int(lo), int(hi)] for lo, hi in zip(counts.min(0), counts.max(0))],
        injection=c.injection, num_tokens=c.num_tokens, token_dim=recipe.unet.cross_attention_dim)


def make_count_unet(recipe: HistoSmithRecipe, latent_channels: int, latent_size: int, width: int) -> UNet2DConditionModel:
    """The recipe's latent UNet; with counts injected as an embedding, a projection of the count vector (``width``)
    added to the timestep embedding."""
    embedding = recipe.condition.injection != "cross-attention"
    return make_unet(recipe, latent_channels, latent_size, class_embed_type="projection" if embedding else None,
                     projection_class_embeddings_input_dim=width if embedding else None)


class CountDenoiser(torch.nn.Module):
    """What is trained: the UNet and the count conditioner (its null vector and token map)."""

    def __init__(self, unet: UNet2DConditionModel, conditioner: CountConditioner):
        super().__init__()
        self.unet, self.conditioner = unet, conditioner

    def forward(self, latents, t, values, drop):
        cond = self.conditioner(values, drop)
        return self.unet(latents, t, encoder_hidden_states=cond.tokens, class_labels=cond.class_labels).sample


class HistoSmithTask(TrainingTask):
    plot_columns = {"loss": "latent ε MSE"}
    recipe_type = HistoSmithRecipe

    def __init__(self, recipe: HistoSmithRecipe, data: Path, *, progress: bool = True):
        super().__init__(recipe, data, progress=progress)
        self.store = self.open_store(data, magnification=True)
        if not self.store.has_labels:
            raise DataError("HistoSmith needs nuclei labels; this store has images only (use `prepare nuclei`)", data)
        self.vae, self.scaling = first_stage(recipe.autoencoder, data)
        if not isinstance(self.vae, JointVQModel):
            raise HistosynthError(f"autoencoder.path must be a joint autoencoder (train autoencoder --recipe "
                                  f"histosmith-vq...), found a {type(self.vae).__name__}", recipe.autoencoder.path)
        if list(self.vae.config.class_names or []) != list(self.store.class_names):
            raise DataError(f"the store's classes {list(self.store.class_names)} differ from the autoencoder's "
                            f"{list(self.vae.config.class_names or [])}", data)
        self.indices = self.store.indices("train")
        if not self.indices:
            raise DataError("the store has no train patches", data)
        counts, tissues = patch_conditions(self.store, self.indices, recipe.condition.default_tissue)
        self.conditioner_template = make_conditioner(recipe, self.store.class_names, counts, tissues)
        self.values = self.conditioner_template.vectors(counts, tissues, warn=False)  # (N, K+T)
        self.noise_scheduler = ddpm_scheduler(recipe.diffusion)
        self.cache_dir = resolve_path(recipe.train.cache_dir, data) if recipe.train.cache_dir else None

    def setup(self, accelerator, run, resuming):
        t_cfg = self.recipe.train
        self.device, self.autocast = accelerator.device, accelerator.autocast
        cache_dir = self.cache_dir or run / cache.CACHE
        self.vae.to(self.device)
        self.stats = shared_latent_cache(accelerator, cache_dir, self.vae, self.store, self.indices,
                                         flips=t_cfg.random_flips, inputs=joint_batch, progress=self.progress)

    def build_model(self, accelerator, run, resuming):
        shape = self.stats.shape
        unet = make_count_unet(self.recipe, shape[2], shape[-1], self.conditioner_template.width)
        return CountDenoiser(unet, copy.deepcopy(self.conditioner_template))

    def lr_factor(self, step: int) -> float:
        return ldm_warmup_factor(step, self.recipe.train.lr_warmup_steps)

    def dataset(self):
        return PositionDataset(range(len(self.indices)))

    def micro_loss(self, model, batch, g, step):
        t_cfg = self.recipe.train
        pos = batch["position"].tolist()
        b = len(pos)
        z, k = cached_latents(self.stats, pos, self.scaling, t_cfg.random_flips, g)
        drop = torch.rand(b, generator=g) < t_cfg.condition_dropout
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        values = self.values[pos]
        z, t, noise, values, drop = (v.to(self.device) for v in (z, t, noise, values, drop))
        with self.autocast():
            eps = model(self.noise_scheduler.add_noise(z, noise, t), t, values, drop)
        return torch.nn.functional.mse_loss(eps.float(), noise), {}, b

    def export(self, model, ema, run):
        """``RUN/pipeline``: a ready-to-sample HistoSmithPipeline with the EMA weights."""
        denoiser = ema_copy(model, ema)
        pipe = HistoSmithPipeline(
            unet=denoiser.unet, vae=copy.deepcopy(self.vae).cpu(), conditioner=denoiser.conditioner,
            scheduler=export_scheduler(self.recipe),
            latent_scaling_factor=self.scaling, magnification=self.store.magnification,
            patch_size=self.store.patch_size, sampling=asdict(self.recipe.sampling),
        )
        ckpt.write_atomically(run / PIPELINE, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
