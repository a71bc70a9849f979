"""ZoomLDM's training task: one latent diffusion model over every magnification, conditioned on slide embeddings.

Each training patch (a ``prepare slides --magnifications`` store) is a 256 px patch at level k (base / 2^k) whose
condition is the (2^k, 2^k, C) grid of SSL embeddings of the base tiles under it (``histosynth embed``; a window
of its slide's map, never a copy). The magnification-aware summariser (models/zoom_summariser.py) turns the grid
into cross-attention tokens and is trained jointly with the UNet (ZoomLDM Sec. 3.1); with probability
``condition_dropout`` the tokens are the summariser's learned null ones (classifier-free guidance). Latents come
from a frozen VQ-f4 autoencoder, cached once with the patch's four flips; a flipped patch gets its grid flipped the
same way (the layout of the tiles; each tile's embedding is of the unflipped tile).

Levels are balanced as the recipe says (``train.level_balance``): natural (every patch once per epoch) or weights
(each level's share of an epoch ∝ its weight, its patches drawn with replacement by the seed).
Everything random in step s (flip, dropout, t, ε) comes from the engine's per-step generator, in that order.
Run directory: the engine's, ``cache/`` and ``pipeline/`` (a ZoomLDMPipeline with the EMA weights, without a
condition sampler: train one with a ``zoomldm-conditions`` recipe).
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from histosynth.conditions.slide_embeddings import SlideEmbeddings
from histosynth.data.store import PatchStore
from histosynth.diffusion import checkpoint as ckpt
from histosynth.diffusion import latent_cache as cache
from histosynth.diffusion.schedulers import ddpm_scheduler
from histosynth.errors import DataError, HistosynthError
from histosynth.models.zoom_summariser import EmbeddingSummariser
from histosynth.pipelines.zoomldm import ZoomLDMPipeline
from histosynth.recipes.zoomldm import ZoomLDMRecipe
from histosynth.training.engine import ema_copy
from histosynth.training.latent_conditions import resolve_path
from histosynth.training.latent import cached_latents, export_scheduler, first_stage, ldm_warmup_factor, make_unet, shared_latent_cache
from histosynth.training.run_dir import PIPELINE
from histosynth.training.task import PositionDataset, TrainingTask


BN_CALIBRATION_PATCHES = 512  # training grids over which the exported summariser's batch-norm statistics are taken


def store_levels(store: PatchStore) -> list[str]:
    """The magnifications of a multi-magnification slide store, highest first; DataError for another store."""
    levels = store.meta.get("magnifications")
    if store.meta.get("kind") != "slides" or not levels:
        raise DataError("not a multi-magnification slide store: make one with `histosynth prepare slides ... "
                        "--magnifications 20x,10x,...`", store.path)
    return list(levels)


def train_patches(store: PatchStore, magnifications: list[str]) -> tuple[list[int], np.ndarray]:
    """(store indices of the train patches at ``magnifications``, their level index into that list (int64));
    DataError naming the store when there are none."""
    by_level = store.indices_by_magnification("train")
    indices = sorted(i for m in magnifications for i in by_level.get(m, []))
    if not indices:
        raise DataError(f"the store has no train patches at {', '.join(magnifications)}", store.path)
    rows = store.records
    return indices, np.array([magnifications.index(rows[i]["magnification"]) for i in indices])


def balanced_positions(levels: np.ndarray, weights: list[float] | None, seed: int, total: int | None = None) -> np.ndarray:
    """Positions of one pass: all of them (weights None), or for each level l about T·w_l/Σw positions drawn with
    replacement from its patches by ``seed`` (a level without patches gets none), T = max(N, ``total``). Give
    ``total`` = the samples of the whole run, so that the draw covers it and no level is seen through one small
    fixed subset."""
    n = len(levels)
    if weights is None:
        return np.arange(n)
    n = max(n, int(total or 0))
    rng = np.random.default_rng(seed)
    w = np.asarray(weights, dtype=np.float64)
    present = np.array([np.any(levels == i) for i in range(len(w))])
    share = np.where(present, w, 0.0)
    share = share / share.sum()
    out = [rng.choice(np.flatnonzero(levels == i), size=int(round(n * s)), replace=True)
           for i, s in enumerate(share) if s > 0]
    return np.concatenate(out) if out else np.arange(n)


def flip_grid(grid: np.ndarray, k: int) -> np.ndarray:
    """Flip variant k of a (g, g, C) grid, as latent_cache.flip does to an image: 1 horizontal, 2 vertical, 3 both."""
    if k & 1:
        grid = grid[:, ::-1]
    if k & 2:
        grid = grid[::-1]
    return grid


def make_summariser(recipe: ZoomLDMRecipe, embed_dim: int, magnifications) -> EmbeddingSummariser:
    """The recipe's magnification-aware summariser (``summariser`` fields) for ``embed_dim``-d grids at
    ``magnifications`` (highest first), its tokens of the UNet's ``cross_attention_dim``; fresh weights."""
    s = recipe.summariser
    return EmbeddingSummariser(
        embed_dim=embed_dim, magnifications=tuple(magnifications), architecture=s.architecture, input_size=s.input_size,
        block_channels=tuple(s.block_channels), token_dim=recipe.unet.cross_attention_dim,
        mag_embed_dim=s.mag_embed_dim, vit_width=s.vit_width, vit_depth=s.vit_depth, vit_heads=s.vit_heads)


class ZoomDenoiser(torch.nn.Module):
    """What is trained: the UNet and the summariser that makes its cross-attention tokens."""

    def __init__(self, unet, summariser: EmbeddingSummariser):
        super().__init__()
        self.unet, self.summariser = unet, summariser

    def forward(self, latents, t, grids, levels, drop):
        return self.unet(latents, t, encoder_hidden_states=self.summariser(grids, levels, drop)).sample


class ZoomLDMTask(TrainingTask):
    plot_columns = {"loss": "latent ε MSE"}
    recipe_type = ZoomLDMRecipe

    def __init__(self, recipe: ZoomLDMRecipe, data: Path, *, progress: bool = True):
        super().__init__(recipe, data, progress=progress)
        self.store = self.open_store(data)
        have = store_levels(self.store)
        self.magnifications = list(recipe.magnifications or have)
        missing = [m for m in self.magnifications if m not in have]
        if missing:
            raise DataError(f"recipe {recipe.name} trains {', '.join(missing)}, which the store does not have "
                            f"(it has {', '.join(have)})", data)
        self.embeddings = SlideEmbeddings.open(data, recipe.embeddings)
        self.vae, self.scaling = first_stage(recipe.autoencoder, data, vq_for="ZoomLDM")
        self.indices, self.levels = train_patches(self.store, self.magnifications)
        self.noise_scheduler = ddpm_scheduler(recipe.diffusion)
        t_cfg = recipe.train
        self.init_from = resolve_path(t_cfg.init_unet, data) if t_cfg.init_unet else None
        self.cache_dir = resolve_path(t_cfg.cache_dir, data) if t_cfg.cache_dir else None
        if recipe.unet.cross_attention_dim <= 0:
            raise HistosynthError(f"recipe {recipe.name}: unet.cross_attention_dim must be positive")

    def setup(self, accelerator, run, resuming):
        self.device, self.autocast = accelerator.device, accelerator.autocast
        self.vae.to(self.device)
        self.stats = shared_latent_cache(accelerator, self.cache_dir or run / cache.CACHE, self.vae, self.store,
                                         self.indices, flips=self.recipe.train.random_flips, progress=self.progress)

    def build_model(self, accelerator, run, resuming):
        shape = self.stats.shape
        unet = make_unet(self.recipe, shape[2], shape[-1])
        if self.init_from is not None and not resuming:
            from histosynth.diffusion.unet_init import init_unet_from, write_report

            report = init_unet_from(unet, self.init_from)
            accelerator.print(report.summary())
            if accelerator.is_main_process:
                write_report(report, run / "init_report.json")
        return ZoomDenoiser(unet, make_summariser(self.recipe, self.embeddings.dim, self.magnifications))

    def lr_factor(self, step: int) -> float:
        return ldm_warmup_factor(step, self.recipe.train.lr_warmup_steps)

    def dataset(self):
        t_cfg = self.recipe.train
        weights = t_cfg.level_weights if t_cfg.level_balance == "weights" else None
        run = self.total_steps * t_cfg.batch_size * t_cfg.gradient_accumulation_steps
        return PositionDataset(balanced_positions(self.levels, weights, t_cfg.seed, total=run))

    def micro_loss(self, model, batch, g, step):
        t_cfg = self.recipe.train
        pos = batch["position"].tolist()
        b = len(pos)
        z, k = cached_latents(self.stats, pos, self.scaling, t_cfg.random_flips, g)
        rows = self.store.records
        grids = [torch.from_numpy(np.ascontiguousarray(flip_grid(self.embeddings.grid(rows[self.indices[p]]), int(kk)),
                                                       dtype=np.float32)) for p, kk in zip(pos, k)]
        drop = torch.rand(b, generator=g) < t_cfg.condition_dropout
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        levels = torch.from_numpy(self.levels[pos])
        z, t, noise, levels, drop = (v.to(self.device) for v in (z, t, noise, levels, drop))
        with self.autocast():
            eps = model(self.noise_scheduler.add_noise(z, noise, t), t, grids, levels, drop)
        return torch.nn.functional.mse_loss(eps.float(), noise), {}, b

    @torch.no_grad()
    def recalibrate_batch_norm(self, summariser: EmbeddingSummariser, num: int = BN_CALIBRATION_PATCHES) -> None:
        """Batch-norm statistics of the EMA weights: the running statistics were gathered with the live weights, so
        they are re-estimated (cumulative averages, in train mode, no gradient) over ``num`` training grids taken
        evenly across the patches, in batches of the recipe's size. Deterministic; draws nothing random."""
        norms = [m for m in summariser.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        if not norms:
            return
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        summariser.train()
        picks = np.linspace(0, len(self.indices) - 1, num=min(num, len(self.indices))).round().astype(int)
        rows, size = self.store.records, max(2, self.recipe.train.batch_size)
        for s in range(0, len(picks), size):
            chunk = picks[s:s + size]
            if len(chunk) < 2:  # batch norm needs two samples
                continue
            grids = [np.asarray(self.embeddings.grid(rows[self.indices[p]]), dtype=np.float32) for p in chunk]
            summariser(grids, torch.from_numpy(self.levels[chunk]))
        for m in norms:
            m.momentum = 0.1
        summariser.eval()

    def export(self, model, ema, run):
        """``RUN/pipeline``: a ZoomLDMPipeline with the EMA weights (no condition sampler yet)."""
        denoiser = ema_copy(model, ema)
        self.recalibrate_batch_norm(denoiser.summariser)
        pipe = ZoomLDMPipeline(
            unet=denoiser.unet, vae=copy.deepcopy(self.vae).cpu(), summariser=denoiser.summariser.eval(),
            scheduler=export_scheduler(self.recipe),
            latent_scaling_factor=self.scaling, base_magnification=self.store.meta.get("base_magnification"),
            patch_size=self.store.patch_size, sampling=asdict(self.recipe.sampling),
            embeddings={"name": self.embeddings.name, "encoder": self.embeddings.encoder, "dim": self.embeddings.dim},
        )
        ckpt.write_atomically(run / PIPELINE, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
