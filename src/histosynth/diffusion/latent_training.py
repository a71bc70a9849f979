"""Latent diffusion training (PathLDM), on the shared engine of ``training.py``.

A frozen autoencoder maps each patch to latents (× the scaling factor), a frozen text encoder maps each
caption to cross-attention context (or, for the class baseline, a class embedding trained with the UNet
gives one token), and a diffusers ``UNet2DConditionModel`` learns ε-prediction with the MSE loss. With
probability ``condition_dropout`` the condition is replaced by the null one (the empty caption's
embedding / the null class) so that classifier-free guidance works.

Everything random in step s (flip variant, the caption drawn among a patch's captions, dropout, t, ε, a
KL posterior sample) comes from the engine's per-step generator, in that order; latents and caption
embeddings are computed once into ``RUN/cache`` or ``train.cache_dir`` (``latent_cache.py``). A killed run
resumed with ``--resume`` reproduces the losses of an uninterrupted one exactly.

Run directory: as NASDM's (recipe.yaml, losses.jsonl, loss.png, checkpoints/), plus ``cache/``,
``init_report.json`` when the UNet started from a checkpoint, and ``pipeline/`` (a PathLDMPipeline with
the EMA weights, the autoencoder, the DDIM scheduler and the conditioner).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch.utils.data import DataLoader, Dataset

from histosynth.conditions.patch_captions import ClassRule, match_captions, read_caption_rows
from histosynth.conditions.text import ClassConditioner, TextConditioner
from histosynth.data.store import PatchStore
from histosynth.diffusion import checkpoint as ckpt
from histosynth.diffusion import latent_cache as cache
from histosynth.diffusion.training import (
    PIPELINE,
    StreamBatchSampler,
    TrainResult,
    build_engine,
    ema_copy,
    run_steps,
    start_run,
)
from histosynth.errors import DataError, HistosynthError
from histosynth.recipes.latent import LatentDiffusionRecipe

LR_WARMUP_START = 1e-6  # LDM's LambdaLinearScheduler f_start


class LatentDenoiser(torch.nn.Module):
    """What is trained: the UNet, and for the class baseline the class embedding that feeds its cross-attention."""

    def __init__(self, unet: UNet2DConditionModel, class_embedder: ClassConditioner | None = None):
        super().__init__()
        self.unet = unet
        self.class_embedder = class_embedder

    def forward(self, latents: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """ε prediction; `context` is (B, T, D) caption embeddings, or (B,) class labels for the class baseline."""
        if self.class_embedder is not None:
            context = self.class_embedder(context).embeddings
        return self.unet(latents, t, encoder_hidden_states=context).sample


# ---------------------------------------------------------------------------------------------- builders
def resolve_path(value: str, data: Path) -> Path:
    """A recipe path: ``{data}`` is the patch store; relative paths are relative to the working directory."""
    return Path(str(value).replace("{data}", str(data))).expanduser()


def check_recipe(recipe: LatentDiffusionRecipe) -> None:
    c, u, t = recipe.conditioner, recipe.unet, recipe.train
    problems = []
    if recipe.method != "ldm":
        problems.append(f"method must be 'ldm', got {recipe.method!r}")
    if c.kind not in ("text", "class"):
        problems.append(f"conditioner.kind must be 'text' or 'class', got {c.kind!r}")
    n = len(u.block_out_channels)
    for name in ("down_block_types", "up_block_types", "attention_head_dim"):
        if len(getattr(u, name)) != n:
            problems.append(f"unet.{name} has {len(getattr(u, name))} entries for {n} blocks (block_out_channels)")
    if any(ch % u.norm_num_groups for ch in u.block_out_channels):
        problems.append(f"unet.block_out_channels {u.block_out_channels} must be multiples of norm_num_groups {u.norm_num_groups}")
    if not 0.0 <= t.condition_dropout <= 1.0:
        problems.append(f"train.condition_dropout must be in [0, 1], got {t.condition_dropout}")
    if t.mixed_precision not in ("no", "fp16", "bf16"):
        problems.append(f"train.mixed_precision must be no, fp16 or bf16, got {t.mixed_precision!r}")
    if recipe.diffusion.prediction_type != "epsilon":
        problems.append("diffusion.prediction_type: only 'epsilon' (PathLDM / LDM) is implemented")
    for name in ("steps", "batch_size", "checkpoint_every", "log_every", "gradient_accumulation_steps"):
        if getattr(t, name) < 1:
            problems.append(f"train.{name} must be at least 1, got {getattr(t, name)}")
    if problems:
        raise HistosynthError(f"recipe {recipe.name!r}: " + "; ".join(problems))


def make_unet(recipe: LatentDiffusionRecipe, latent_channels: int, latent_size: int) -> UNet2DConditionModel:
    u = recipe.unet
    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=tuple(u.down_block_types),
        up_block_types=tuple(u.up_block_types),
        block_out_channels=tuple(u.block_out_channels),
        layers_per_block=u.layers_per_block,
        attention_head_dim=tuple(u.attention_head_dim),
        cross_attention_dim=u.cross_attention_dim,
        transformer_layers_per_block=u.transformer_layers_per_block,
        norm_num_groups=u.norm_num_groups,
    )


def make_noise_scheduler(recipe: LatentDiffusionRecipe) -> DDPMScheduler:
    d = recipe.diffusion
    return DDPMScheduler(num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule, beta_start=d.beta_start,
                         beta_end=d.beta_end, prediction_type=d.prediction_type, clip_sample=False)


def make_sampling_scheduler(recipe: LatentDiffusionRecipe):
    from histosynth.pipelines.pathldm import ldm_ddim_scheduler

    d = recipe.diffusion
    return ldm_ddim_scheduler(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end, d.prediction_type)


def class_rule(recipe: LatentDiffusionRecipe) -> ClassRule:
    c = recipe.conditioner
    return ClassRule(num_classes=c.num_classes, threshold=c.class_threshold, tumor_type=c.tumor_type,
                     til_type=c.til_type, count_threshold=c.count_threshold)


def load_text_conditioner(recipe: LatentDiffusionRecipe, data: Path) -> TextConditioner:
    name = recipe.conditioner.text_encoder
    local = resolve_path(name, data)
    conditioner = TextConditioner.from_pretrained(str(local) if local.exists() else name,
                                                  max_tokens=recipe.conditioner.max_tokens)
    if conditioner.hidden_size != recipe.unet.cross_attention_dim:
        raise HistosynthError(f"recipe {recipe.name!r}: unet.cross_attention_dim is {recipe.unet.cross_attention_dim} "
                              f"but text encoder {name!r} gives {conditioner.hidden_size}-d embeddings")
    return conditioner


# ---------------------------------------------------------------------------------------------- data
class _StoreImages(Dataset):
    """Training patches as [-1, 1] images, for runs that encode on the fly (train.cache_latents: false)."""

    def __init__(self, store: PatchStore, indices: list[int]):
        self.store, self.indices = store, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> torch.Tensor:
        return cache.image_batch(self.store, [self.indices[i]])[0]


def _training_patches(store: PatchStore, captions: Path):
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


def plot_eps_loss(losses_jsonl: Path, out_png: Path) -> None:
    """The ε-MSE curve (raw and smoothed, log scale)."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(r) for r in Path(losses_jsonl).read_text().splitlines() if r]
    if not rows:
        return
    steps, vals = np.array([r["step"] for r in rows]), np.array([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, vals, lw=0.5, alpha=0.4)
    k = max(1, len(vals) // 50)
    ax.plot(steps[k - 1:], np.convolve(vals, np.ones(k) / k, mode="valid"), lw=1.5)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title("latent ε MSE")
    fig.tight_layout()
    fig.savefig(out_png, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- training
def train_latent(
    recipe: LatentDiffusionRecipe,
    data: str | Path,
    out: str | Path,
    *,
    max_steps: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train the latent diffusion model `recipe` on the train split of patch store `data` into run directory `out`."""
    run, data = Path(out), Path(data)
    check_recipe(recipe)
    t_cfg, c_cfg = recipe.train, recipe.conditioner
    store = PatchStore(data)
    if store.patch_size != recipe.patch_size:
        raise HistosynthError(
            f"the store holds {store.patch_size} px patches but recipe {recipe.name} trains at {recipe.patch_size} px", data
        )
    # inputs are loaded and checked before the run directory is touched
    vae = cache.load_autoencoder(resolve_path(recipe.autoencoder.path, data))
    scaling = recipe.autoencoder.scaling_factor
    scaling = float(vae.config.scaling_factor if scaling is None else scaling)
    captions_path = resolve_path(c_cfg.captions, data)
    indices, rows = _training_patches(store, captions_path)
    rule = class_rule(recipe)
    text = load_text_conditioner(recipe, data) if c_cfg.kind == "text" else None
    if c_cfg.kind == "text":
        missing = [i for i, r in zip(indices, rows) if any(not isinstance(x.get("caption"), str) for x in r)]
        if missing:
            raise DataError(f"patch {missing[0]} has a row without a 'caption' string", captions_path)
        distinct = sorted({x["caption"] for r in rows for x in r})
        options = [[distinct.index(x["caption"]) for x in r] for r in rows]  # per patch: caption ids
    else:
        flat = rule.labels([x for r in rows for x in r], captions_path)
        it = iter(flat)
        options = [[next(it) for _ in r] for r in rows]  # per patch: class labels
    init_from = resolve_path(t_cfg.init_unet, data) if t_cfg.init_unet else None
    cache_dir = resolve_path(t_cfg.cache_dir, data) if t_cfg.cache_dir else run / cache.CACHE

    accelerator, resume_from = start_run(run, recipe, data, t_cfg, resume=resume, overwrite=overwrite)
    device, main = accelerator.device, accelerator.is_main_process
    vae.to(device)

    # frozen-model outputs, computed once (the main process writes them, the others read)
    stats = None
    if t_cfg.cache_latents:
        if main:
            cache.latent_cache(cache_dir, vae, store, indices, flips=t_cfg.random_flips, progress=progress)
        accelerator.wait_for_everyone()
        stats = cache.latent_cache(cache_dir, vae, store, indices, flips=t_cfg.random_flips, build=False)
        probe = torch.from_numpy(np.array(stats[0, 0]))[None]
    else:
        probe = cache.encode_stats(vae, cache.image_batch(store, indices[:1])).cpu()
    vq = cache.is_vq(vae)
    latent_channels, latent_size = probe.shape[1] // (1 if vq else 2), probe.shape[-1]
    embeddings = null_id = None
    if text is not None:
        if main:
            cache.text_cache(cache_dir, text, distinct, progress=progress)
        accelerator.wait_for_everyone()
        embeddings = cache.text_cache(cache_dir, text, distinct, build=False)
        null_id = len(distinct)

    set_seed(t_cfg.seed)  # the initial weights (a resumed run overwrites them from the checkpoint)
    unet = make_unet(recipe, latent_channels, latent_size)
    class_embedder = None
    if c_cfg.kind == "class":
        class_embedder = ClassConditioner(c_cfg.num_classes, recipe.unet.cross_attention_dim,
                                          rule.class_names([x for r in rows for x in r]))
    if init_from is not None and resume_from is None:
        from histosynth.diffusion.unet_init import init_unet_from, write_report

        report = init_unet_from(unet, init_from)
        accelerator.print(report.summary())
        if main:
            write_report(report, run / "init_report.json")
    model = LatentDenoiser(unet, class_embedder)
    noise_scheduler = make_noise_scheduler(recipe)
    optimizer = torch.optim.AdamW(model.parameters(), lr=t_cfg.learning_rate, betas=(t_cfg.adam_beta1, t_cfg.adam_beta2),
                                  weight_decay=t_cfg.weight_decay)
    warmup = max(0, t_cfg.lr_warmup_steps)

    def lr_factor(s: int) -> float:  # linear warm-up from LR_WARMUP_START·lr, then constant
        return 1.0 if s >= warmup else LR_WARMUP_START + (1.0 - LR_WARMUP_START) * s / warmup

    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    engine, step = build_engine(accelerator, model, optimizer, lr_scheduler, ema_decay=t_cfg.ema_decay, run=run,
                                resume_from=resume_from, cfg=t_cfg)

    total = recipe.total_steps if max_steps is None else max_steps
    ga, nproc, rank = t_cfg.gradient_accumulation_steps, accelerator.num_processes, accelerator.process_index
    sampler = StreamBatchSampler(len(indices), t_cfg.batch_size, t_cfg.seed, start=step * ga * nproc + rank, stride=nproc)
    positions = iter(sampler)  # micro-batch after micro-batch: positions into `indices`
    if stats is None:  # the same stream of patches as images, loaded ahead by the DataLoader
        images = iter(DataLoader(_StoreImages(store, indices), batch_sampler=sampler, num_workers=t_cfg.num_workers,
                                 pin_memory=device.type == "cuda"))
    n_train_t = noise_scheduler.config.num_train_timesteps

    def micro_loss(g: torch.Generator, step: int):
        # 1. latents of the batch's patches, in the flip variant drawn for each
        pos = next(positions)
        k = torch.randint(0, cache.NUM_FLIPS, (len(pos),), generator=g) if t_cfg.random_flips else torch.zeros(len(pos), dtype=torch.long)
        if stats is not None:
            z = torch.from_numpy(np.stack([stats[p, int(kk)] for p, kk in zip(pos, k)]))
        else:
            z = cache.encode_stats(vae, cache.flip(next(images), k)).cpu()
        z = cache.latents_from_stats(z, vq, g) * scaling
        b = z.shape[0]
        # 2. the condition: one of the patch's captions (or classes), the null one with probability p
        pick = torch.rand(b, generator=g)
        drop = torch.rand(b, generator=g) < t_cfg.condition_dropout
        chosen = [options[p][min(int(u * len(options[p])), len(options[p]) - 1)] for p, u in zip(pos, pick.tolist())]
        # 3. forward process
        t = torch.randint(0, n_train_t, (b,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        if embeddings is not None:
            ids = [null_id if d else c for c, d in zip(chosen, drop.tolist())]
            context = torch.from_numpy(np.stack([embeddings[i] for i in ids]))
        else:
            context = torch.tensor([c_cfg.num_classes if d else c for c, d in zip(chosen, drop.tolist())], dtype=torch.long)
        z, t, noise, context = (v.to(device) for v in (z, t, noise, context))
        xt = noise_scheduler.add_noise(z, noise, t)
        with accelerator.autocast():
            eps = engine.model(xt, t, context)
        loss = torch.nn.functional.mse_loss(eps.float(), noise)
        return loss, {}, b

    def export(denoiser: LatentDenoiser, ema) -> None:
        export_pipeline(ema_copy(denoiser, ema), vae, text, recipe, store, scaling, run / PIPELINE)

    return run_steps(engine, step=step, total=total, micro_loss=micro_loss, export=export, recipe_name=recipe.name,
                     plot=plot_eps_loss, progress=progress)


def export_pipeline(denoiser: LatentDenoiser, vae, text: TextConditioner | None, recipe: LatentDiffusionRecipe,
                    store: PatchStore, scaling: float, where: Path) -> None:
    """Save a ready-to-sample PathLDMPipeline (the EMA weights in `denoiser`)."""
    import copy

    from histosynth.pipelines.pathldm import PathLDMPipeline

    conditioner = text if text is not None else denoiser.class_embedder
    pipe = PathLDMPipeline(
        unet=denoiser.unet, vae=copy.deepcopy(vae).cpu(), scheduler=make_sampling_scheduler(recipe),
        conditioner=conditioner, latent_scaling_factor=scaling,
        class_rule=class_rule(recipe).to_dict() if recipe.conditioner.kind == "class" else None,
        magnification=store.magnification, patch_size=store.patch_size, sampling=asdict(recipe.sampling),
    )
    ckpt.write_atomically(where, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
