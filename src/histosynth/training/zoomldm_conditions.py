"""ZoomLDM's condition sampler (the embedding diffusion model, EDM, Sec. 3.2): learn the distribution of conditions.

The frozen summariser of a trained ZoomLDM (``zoomldm`` in the recipe) turns the embedding grid of every training
patch of the store into its tokens once (``RUN/cache/conditions-<key>.npy``, float32 (N, T, D), memory-mapped);
a transformer (models/condition_sampler.py) learns to predict those tokens x0 from noisy versions on the linear
DDPM schedule, told the magnification (x0-prediction, as the paper). Tokens are standardised by their mean
token and the standard deviation around it (kept with the model).

Everything random in step s (t, ε) comes from the engine's per-step generator. ``RUN/pipeline`` is the ZoomLDM's
pipeline with this sampler added: ``sample --model RUN --magnification 5x`` then needs no reference slide.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from histosynth.conditions.slide_embeddings import SlideEmbeddings
from histosynth.data.store import PatchStore
from histosynth.diffusion import checkpoint as ckpt
from histosynth.diffusion import latent_cache as cache
from histosynth.diffusion.schedulers import ddpm_scheduler, sampling_scheduler
from histosynth.errors import DataError
from histosynth.models.condition_sampler import ConditionTransformer
from histosynth.pipelines.zoomldm import ZoomLDMPipeline
from histosynth.recipes.zoomldm import ZoomConditionsRecipe
from histosynth.training.engine import ema_copy
from histosynth.training.latent_conditions import resolve_path
from histosynth.training.latent import ldm_warmup_factor
from histosynth.training.run_dir import PIPELINE
from histosynth.training.task import PositionDataset, TrainingTask
from histosynth.training.zoomldm import train_patches


def summarise_patches(summariser, embeddings: SlideEmbeddings, store: PatchStore, indices: list[int], levels: np.ndarray,
                      out: Path, *, batch_size: int = 32, progress: bool = True) -> np.memmap:
    """(N, T, D) float32 tokens of the frozen (eval-mode) summariser for store patches ``indices``, written to ``out``
    atomically (a hidden temporary renamed into place) and returned memory-mapped; reused when ``out`` exists."""
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".tmp-{os.getpid()}-{out.name}")
        shape = (len(indices), summariser.num_tokens, summariser.config.token_dim)
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        summariser.eval()
        rows = store.records
        starts = range(0, len(indices), batch_size)
        with torch.no_grad():
            for s in tqdm(starts, desc="summarise conditions", unit="batch", disable=not progress):
                chunk = indices[s:s + batch_size]
                grids = [np.asarray(embeddings.grid(rows[i]), dtype=np.float32) for i in chunk]
                arr[s:s + len(chunk)] = summariser(grids, torch.from_numpy(levels[s:s + len(chunk)])).float().cpu().numpy()
        arr.flush()
        del arr
        os.replace(tmp, out)
    return np.load(out, mmap_mode="r")


def token_statistics(tokens: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, float]:
    """(mean token float32 (T, D), standard deviation around it) of (N, T, D) tokens, in chunks (memory flat in N)."""
    n = len(tokens)
    total = np.zeros(tokens.shape[1:], np.float64)
    for s in range(0, n, chunk):
        total += np.asarray(tokens[s:s + chunk], np.float64).sum(0)
    mean = total / n
    sq = sum(float(((np.asarray(tokens[s:s + chunk], np.float64) - mean) ** 2).sum()) for s in range(0, n, chunk))
    return mean.astype(np.float32), float(np.sqrt(sq / tokens[0].size / n)) or 1.0


def condition_ddim(recipe: ZoomConditionsRecipe) -> DDIMScheduler:
    """The condition sampler's DDIM (the paper's, η = 0) on the recipe's schedule and ``prediction_type``. Every
    setting is spelled out, not left to DDIM's defaults: a scheduler derived from this config and saved keeps them
    (diffusers drops the "default" mark on save, and would give the derived class its own defaults)."""
    d = recipe.diffusion
    return DDIMScheduler(num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule,
                         beta_start=d.beta_start, beta_end=d.beta_end, prediction_type=d.prediction_type,
                         clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")


class ZoomConditionsTask(TrainingTask):
    plot_columns = {"loss": "condition x0 MSE"}
    recipe_type = ZoomConditionsRecipe

    def __init__(self, recipe: ZoomConditionsRecipe, data: Path, *, progress: bool = True):
        super().__init__(recipe, data, progress=progress)
        self.pipe = ZoomLDMPipeline.from_pretrained(resolve_path(recipe.zoomldm, data))
        self.store = PatchStore(data)
        info = self.pipe.config.embeddings or {}
        self.embeddings = SlideEmbeddings.open(data, info.get("name"))
        if (self.embeddings.encoder, self.embeddings.dim) != (info.get("encoder"), info.get("dim")):
            raise DataError(f"the store's embeddings come from {self.embeddings.encoder} ({self.embeddings.dim}-d); the "
                            f"ZoomLDM was trained on {info.get('encoder')} ({info.get('dim')}-d)", self.embeddings.path)
        self.magnifications = self.pipe.magnifications
        self.indices, self.levels = train_patches(self.store, self.magnifications)
        self.noise_scheduler = ddpm_scheduler(recipe.diffusion)

    def setup(self, accelerator, run, resuming):
        self.device = accelerator.device
        key = [cache.store_key(self.store), self.embeddings.name, self.indices, cache.module_key(self.pipe.summariser)]
        out = run / cache.CACHE / f"conditions-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:20]}.npy"
        self.pipe.summariser.to(self.device)
        if accelerator.is_main_process:
            summarise_patches(self.pipe.summariser, self.embeddings, self.store, self.indices, self.levels, out,
                              progress=self.progress)
        accelerator.wait_for_everyone()
        self.tokens = np.load(out, mmap_mode="r")
        self.mean, self.std = token_statistics(self.tokens)

    def build_model(self, accelerator, run, resuming):
        m = self.recipe.model
        model = ConditionTransformer(num_tokens=self.tokens.shape[1], token_dim=self.tokens.shape[2],
                                     num_magnifications=len(self.magnifications), width=m.width, depth=m.depth,
                                     heads=m.heads, data_std=self.std)
        model.data_mean.copy_(torch.from_numpy(self.mean))
        return model

    def lr_factor(self, step: int) -> float:
        return ldm_warmup_factor(step, self.recipe.train.lr_warmup_steps)

    def dataset(self):
        return PositionDataset(range(len(self.indices)))

    def micro_loss(self, model, batch, g, step):
        pos = batch["position"].tolist()
        x0 = (torch.from_numpy(np.stack([self.tokens[p] for p in pos]) - self.mean)) / self.std
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (len(pos),), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        levels = torch.from_numpy(self.levels[pos])
        x0, t, noise, levels = (v.to(self.device) for v in (x0, t, noise, levels))
        pred = model(self.noise_scheduler.add_noise(x0, noise, t), t, levels)
        return torch.nn.functional.mse_loss(pred.float(), x0), {}, len(pos)

    def export(self, model, ema, run):
        """``RUN/pipeline``: the ZoomLDM pipeline with this condition sampler (EMA weights) and the recipe's
        ``sampling.scheduler`` on its schedule (the paper's DDIM by default; derived from that DDIM, so that ``ddim``
        swapped back in by name is it exactly)."""
        scheduler = condition_ddim(self.recipe)
        if self.recipe.sampling.scheduler != "ddim":
            scheduler = sampling_scheduler(self.recipe.sampling.scheduler, scheduler.config)
        components = dict(self.pipe.components)
        components.update(condition_sampler=ema_copy(model, ema), condition_scheduler=scheduler)
        config = {k: self.pipe.config[k] for k in ("latent_scaling_factor", "base_magnification", "patch_size",
                                                    "embeddings")}
        sampling = dict(self.pipe.config.sampling or {})
        sampling["condition_steps"] = self.recipe.sampling.num_inference_steps
        sampling["condition_scheduler"] = self.recipe.sampling.scheduler
        pipe = ZoomLDMPipeline(**components, **config, sampling=sampling)
        ckpt.write_atomically(run / PIPELINE, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
