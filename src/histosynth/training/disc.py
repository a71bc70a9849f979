"""DISC's training task: region-mask latent diffusion (SD, DISC eq. 1) and its self-distillation (SD-DISC, eq. 3).

SD: each training patch of a region store (``prepare regions``) is a VQ-f4 latent (cached once with its four flips)
and its region mask, flipped with it. The mask encoder τθ and the UNet are trained jointly on L_LDM = ‖ε − ε_θ(z_t, t,
τθ(m))‖² (T = 1000); with probability ``condition_dropout`` the condition is ∅ (classifier-free guidance).

SD-DISC (``distill`` in the recipe): first the teacher (an SD run) generates ``distill.num_samples`` fused latents
z0^mixed with separated conditions on masks of the store's train split (DISCPipeline, ``separated``) into
``RUN/distill/`` — resumable after a kill, with progress; then the model starts from the teacher's weights and
fine-tunes on L_DISC = ‖ε − ε_θ(√ᾱ_t z0^mixed + √(1−ᾱ_t) ε, t, τθ(m))‖². With ``distill.cotrain`` each step's loss is
the mean of L_DISC on the micro-batch and L_LDM on as many real patches (SD-DISC-CoTrain).

Everything random in step s (flip, dropout, t, ε, the real patches of CoTrain) comes from the engine's per-step
generator. Run directory: the engine's, ``cache/``, ``distill/`` and ``pipeline/`` (a DISCPipeline with the EMA weights).
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from numpy.lib.format import open_memmap
from tqdm.auto import tqdm

from histosynth.data.regions import open_region_store
from histosynth.data.store import PatchStore
from histosynth.diffusion import checkpoint as ckpt
from histosynth.diffusion import latent_cache as cache
from histosynth.diffusion.schedulers import ddpm_scheduler, use_scheduler
from histosynth.errors import DataError, HistosynthError
from histosynth.models.region_mask_encoder import RegionMaskEncoder, one_hot_masks
from histosynth.pipelines.disc import DISCPipeline, downsample_masks
from histosynth.recipes.disc import DISCRecipe
from histosynth.training.engine import ema_copy
from histosynth.training.latent_conditions import resolve_path
from histosynth.training.latent import cached_latents, export_scheduler, first_stage, ldm_warmup_factor, make_unet, shared_latent_cache
from histosynth.training.run_dir import PIPELINE
from histosynth.training.task import PositionDataset, TrainingTask

DISTILL = "distill"


def flip_masks(masks: np.ndarray, k: int) -> np.ndarray:
    """Flip variant k of (…, H, W) masks, as latent_cache.flip does to an image: 1 horizontal, 2 vertical, 3 both."""
    if k & 1:
        masks = masks[..., ::-1]
    if k & 2:
        masks = masks[..., ::-1, :]
    return np.ascontiguousarray(masks)


class DISCDenoiser(torch.nn.Module):
    """What is trained: the UNet and the mask encoder τθ (and, with concat injection, the mask one-hot as input)."""

    def __init__(self, unet, mask_encoder: RegionMaskEncoder, concat: bool):
        super().__init__()
        self.unet, self.mask_encoder, self.concat = unet, mask_encoder, concat

    def forward(self, latents, t, masks, drop):
        tokens = self.mask_encoder(masks, drop)
        if self.concat:
            onehot = one_hot_masks(downsample_masks(masks, latents.shape[-1]), self.mask_encoder.config.num_labels)
            latents = torch.cat([latents, onehot.to(latents) * (~drop).to(latents)[:, None, None, None]], dim=1)
        return self.unet(latents, t, encoder_hidden_states=tokens).sample


class DistillSet:
    """``RUN/distill/``: the fused latents (float32 (N, C, h, w)), their masks (uint8 (N, H, W)) and ``progress.json``
    (how many are done, and what made them). Generated in batches; a rerun continues from the count of finished
    samples (written after each batch's arrays are flushed), so a kill loses at most one batch."""

    def __init__(self, folder: Path):
        self.folder = folder

    def generate(self, teacher: DISCPipeline, masks_of, n: int, seeds: list[int], settings: dict, *,
                 progress: bool) -> None:
        """Generate the samples not done yet: ``masks_of(slice)`` gives uint8 (b, H, W) masks of samples ``slice``
        (made one batch at a time, so memory does not grow with N), ``seeds[i]`` sample i's noise seed."""
        self.folder.mkdir(parents=True, exist_ok=True)
        state_file = self.folder / "progress.json"
        c, s = teacher.unet.config.out_channels, teacher.unet.config.sample_size
        size = teacher.mask_encoder.config.mask_size
        done = 0
        if state_file.is_file():
            try:
                state = json.loads(state_file.read_text())
            except ValueError:
                raise HistosynthError("unreadable progress file of the distillation set: remove the folder to make "
                                      "it again", state_file) from None
            if state.get("settings") != settings:
                raise HistosynthError("the distillation set here was made with other settings "
                                      f"({state.get('settings')}); remove it or use another run directory", self.folder)
            done = int(state["done"])
        mode = "r+" if done else "w+"
        latents = open_memmap(self.folder / "latents.npy", mode=mode, dtype=np.float32, shape=(n, c, s, s))
        stored = open_memmap(self.folder / "masks.npy", mode=mode, dtype=np.uint8, shape=(n, size, size))
        use_scheduler(teacher, "ddim")  # the paper's sampler for the set, whatever the teacher's recipe chose
        batch = settings["batch_size"]
        with tqdm(total=n, initial=done, desc="distillation set (SC)", unit="tile", disable=not progress) as bar:
            for start in range(done, n, batch):
                chunk = slice(start, min(n, start + batch))
                generators = [torch.Generator(device=teacher.unet.device).manual_seed(sd) for sd in seeds[chunk]]
                masks = masks_of(chunk)
                out = teacher(masks, guidance_scale=settings["guidance_scale"],
                              num_inference_steps=settings["num_inference_steps"], separated=settings["separated"],
                              generator=generators, output_type="latent", progress=False)
                latents[chunk] = out.latents
                stored[chunk] = masks
                latents.flush()
                stored.flush()
                _write_json(state_file, {"done": chunk.stop, "total": n, "settings": settings})
                bar.update(chunk.stop - chunk.start)

    def open(self) -> tuple[np.ndarray, np.ndarray]:
        state = json.loads((self.folder / "progress.json").read_text())
        if state["done"] != state["total"]:
            raise HistosynthError(f"the distillation set is incomplete ({state['done']} of {state['total']})", self.folder)
        return (np.load(self.folder / "latents.npy", mmap_mode="r"), np.load(self.folder / "masks.npy", mmap_mode="r"))


def teacher_identity(path: Path) -> str:
    """sha256 of the teacher pipeline's UNet and mask-encoder weight files: a resumed distillation set refuses to mix
    samples of a teacher retrained at the same path."""
    import hashlib

    from histosynth.pipelines.loading import pipeline_directory

    folder = pipeline_directory(path, DISCPipeline)
    digest = hashlib.sha256()
    for part in ("unet", "mask_encoder"):
        for file in sorted((folder / part).glob("*.safetensors")):
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def check_teacher(teacher: DISCPipeline, store: PatchStore, recipe: DISCRecipe, path: Path) -> None:
    """DataError / HistosynthError naming the teacher when it cannot make this store's distillation set: other region
    labels, tile size or magnification, or another noise schedule than the recipe's ``diffusion`` (the student is
    trained and exported with the recipe's)."""
    if teacher.label_names != list(store.class_names):
        raise DataError(f"distill.teacher was trained on region labels {teacher.label_names}, the store has "
                        f"{list(store.class_names)}", path)
    if teacher.mask_encoder.config.mask_size != store.patch_size:
        raise DataError(f"distill.teacher makes {teacher.mask_encoder.config.mask_size} px tiles, the store holds "
                        f"{store.patch_size} px patches", path)
    made_at = teacher.config.magnification
    if made_at is not None and made_at != store.magnification:
        raise DataError(f"distill.teacher was trained at {made_at}, the store holds {store.magnification} patches", path)
    d, t = recipe.diffusion, teacher.scheduler.config
    ours = (d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end, d.prediction_type)
    theirs = (t["num_train_timesteps"], t["beta_schedule"], t["beta_start"], t["beta_end"], t["prediction_type"])
    if ours != theirs:
        raise HistosynthError(f"recipe {recipe.name}: diffusion {ours} differs from distill.teacher's schedule {theirs}; "
                              "the student must keep its teacher's", path)


def _write_json(path: Path, value: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


class DISCTask(TrainingTask):
    plot_columns = {"loss": "latent ε MSE", "l_ldm": "L_LDM (real)", "l_disc": "L_DISC (fused)"}
    recipe_type = DISCRecipe

    def __init__(self, recipe: DISCRecipe, data: Path, *, progress: bool = True):
        super().__init__(recipe, data, progress=progress)
        self.store = self.open_store(open_region_store(data), magnification=True)
        self.labels = tuple(self.store.class_names)
        self.teacher = None
        d = recipe.distill
        if d is not None:
            teacher_path = resolve_path(d.teacher, data)
            self.teacher = DISCPipeline.from_pretrained(teacher_path)
            self.teacher_id = teacher_identity(teacher_path)
            check_teacher(self.teacher, self.store, recipe, teacher_path)
            self.vae, self.scaling = self.teacher.vae, float(self.teacher.config.latent_scaling_factor)
        else:
            if recipe.autoencoder is None:
                raise HistosynthError(f"recipe {recipe.name}: autoencoder.path is required (or distill.teacher)")
            self.vae, self.scaling = first_stage(recipe.autoencoder, data)
        if not cache.is_vq(self.vae):
            raise HistosynthError(f"the autoencoder must be a VQ autoencoder (DISC's first stage is VQ-f4), found a "
                                  f"{type(self.vae).__name__}")
        self.indices = self.store.indices("train")
        if not self.indices:
            raise DataError("the region store has no train patches", data)
        self.noise_scheduler = ddpm_scheduler(recipe.diffusion)
        t_cfg = recipe.train
        self.init_from = resolve_path(t_cfg.init_unet, data) if t_cfg.init_unet else None
        self.cache_dir = resolve_path(t_cfg.cache_dir, data) if t_cfg.cache_dir else None
        self.injection = recipe.mask_encoder.injection if self.teacher is None else self.teacher.config.injection

    # ----------------------------------------------------------------------------------------------- setup
    def setup(self, accelerator, run, resuming):
        self.device, self.autocast = accelerator.device, accelerator.autocast
        self.vae.to(self.device)
        needs_real = self.teacher is None or self.recipe.distill.cotrain
        self.stats = None
        if needs_real:
            self.stats = shared_latent_cache(accelerator, self.cache_dir or run / cache.CACHE, self.vae, self.store,
                                             self.indices, flips=self.recipe.train.random_flips, progress=self.progress)
        self.distilled = None
        if self.teacher is not None:
            d = self.recipe.distill
            folder = resolve_path(d.set_dir, self.data) if d.set_dir else run / DISTILL
            if accelerator.is_main_process:
                picks, flips, seeds = self.distill_draws()
                settings = {"teacher": str(d.teacher), "teacher_weights": self.teacher_id, "num_samples": d.num_samples,
                            "separated": d.separated, "num_inference_steps": d.num_inference_steps,
                            "guidance_scale": d.guidance_scale, "batch_size": d.batch_size, "seed": d.seed}
                self.teacher.to(self.device)
                self.teacher.set_progress_bar_config(disable=True)
                DistillSet(folder).generate(self.teacher, lambda chunk: self.distill_masks(picks[chunk], flips[chunk]),
                                            d.num_samples, seeds, settings, progress=self.progress)
                self.teacher.to("cpu")  # the student is a copy: the teacher's weights are not needed on the device
            accelerator.wait_for_everyone()
            self.distilled = DistillSet(folder).open()

    def distill_draws(self) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """The distillation set's draws, by ``distill.seed``: for each of the N samples a train patch (drawn with
        replacement), its flip, and the seed of its noise."""
        d = self.recipe.distill
        rng = np.random.default_rng(d.seed)
        picks = rng.choice(len(self.indices), size=d.num_samples, replace=True)
        flips = rng.integers(0, cache.NUM_FLIPS, size=d.num_samples)
        return picks, flips, [int(s) for s in rng.integers(0, 2**31 - 1, size=d.num_samples)]

    def distill_masks(self, picks: np.ndarray, flips: np.ndarray) -> np.ndarray:
        """uint8 (n, H, W): the masks of train patches ``picks`` (positions), each in its flip."""
        return np.stack([flip_masks(self.store[self.indices[p]]["region_map"].astype(np.uint8), int(k))
                         for p, k in zip(picks, flips)])

    def build_model(self, accelerator, run, resuming):
        if self.teacher is not None:  # SD-DISC starts from the teacher's weights
            return DISCDenoiser(copy.deepcopy(self.teacher.unet), copy.deepcopy(self.teacher.mask_encoder),
                                self.injection == "cross-attention+concat")
        m, k = self.recipe.mask_encoder, len(self.labels)
        probe = np.asarray(self.stats[0, 0])  # (C, h, w): a cached VQ latent
        concat = m.injection == "cross-attention+concat"
        unet = make_unet_with_inputs(self.recipe, probe.shape[0], probe.shape[-1], extra=k if concat else 0)
        if self.init_from is not None and not resuming:
            from histosynth.diffusion.unet_init import init_unet_from, write_report

            report = init_unet_from(unet, self.init_from)
            accelerator.print(report.summary())
            if accelerator.is_main_process:
                write_report(report, run / "init_report.json")
        encoder = RegionMaskEncoder(num_labels=k, mask_size=self.store.patch_size, token_grid=m.token_grid,
                                    channels=tuple(m.channels), token_dim=self.recipe.unet.cross_attention_dim,
                                    norm_groups=self.recipe.unet.norm_num_groups, label_names=self.labels)
        return DISCDenoiser(unet, encoder, concat)

    def lr_factor(self, step: int) -> float:
        return ldm_warmup_factor(step, self.recipe.train.lr_warmup_steps)

    def dataset(self):
        n = len(self.distilled[0]) if self.distilled is not None else len(self.indices)
        return PositionDataset(np.arange(n))

    # ------------------------------------------------------------------------------------------------ loss
    def _real(self, pos: list[int], g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Scaled latents and masks of train patches at positions ``pos``, each in a flip drawn from ``g``."""
        z, k = cached_latents(self.stats, pos, self.scaling, self.recipe.train.random_flips, g)
        masks = np.stack([flip_masks(self.store[self.indices[p]]["region_map"], int(kk)) for p, kk in zip(pos, k)])
        return z, torch.from_numpy(masks).long()

    def _eps_loss(self, model, z: torch.Tensor, masks: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """‖ε − ε_θ(z_t, t, τθ(m))‖² with condition dropout, t ~ U{0..T−1}, ε ~ N(0, I), in that order from ``g``."""
        b = len(z)
        drop = torch.rand(b, generator=g) < self.recipe.train.condition_dropout
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=g)
        noise = torch.randn(z.shape, generator=g)
        z, t, noise, masks, drop = (v.to(self.device) for v in (z, t, noise, masks, drop))
        with self.autocast():
            eps = model(self.noise_scheduler.add_noise(z, noise, t), t, masks, drop)
        return torch.nn.functional.mse_loss(eps.float(), noise)

    def micro_loss(self, model, batch, g, step):
        pos = batch["position"].tolist()
        if self.distilled is None:  # SD: L_LDM (eq. 1)
            z, masks = self._real(pos, g)
            return self._eps_loss(model, z, masks, g), {}, len(pos)
        latents, masks = self.distilled  # SD-DISC: L_DISC (eq. 3) on the fused latents
        z = torch.from_numpy(np.stack([latents[p] for p in pos]))
        m = torch.from_numpy(np.stack([masks[p] for p in pos]).astype(np.int64))
        l_disc = self._eps_loss(model, z, m, g)
        if not self.recipe.distill.cotrain:
            return l_disc, {"l_disc": float(l_disc.detach())}, len(pos)
        real = torch.randint(0, len(self.indices), (len(pos),), generator=g).tolist()  # CoTrain: + L_LDM, averaged
        z_real, m_real = self._real(real, g)
        l_ldm = self._eps_loss(model, z_real, m_real, g)
        return 0.5 * (l_ldm + l_disc), {"l_ldm": float(l_ldm.detach()), "l_disc": float(l_disc.detach())}, len(pos)

    def export(self, model, ema, run):
        """``RUN/pipeline``: a DISCPipeline with the EMA weights."""
        denoiser = ema_copy(model, ema)
        pipe = DISCPipeline(
            unet=denoiser.unet, vae=copy.deepcopy(self.vae).cpu(), mask_encoder=denoiser.mask_encoder.eval(),
            scheduler=export_scheduler(self.recipe),
            latent_scaling_factor=self.scaling, magnification=self.store.magnification,
            patch_size=self.store.patch_size, injection=self.injection, sampling=asdict(self.recipe.sampling),
        )
        ckpt.write_atomically(run / PIPELINE, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))


def make_unet_with_inputs(recipe, latent_channels: int, latent_size: int, *, extra: int):
    """The recipe's UNet taking ``extra`` more input channels (the concatenated mask one-hot), predicting the latent."""
    from diffusers import UNet2DConditionModel

    base = make_unet(recipe, latent_channels, latent_size)
    if not extra:
        return base
    config = dict(base.config)
    config["in_channels"] = latent_channels + extra
    return UNet2DConditionModel.from_config(config)
