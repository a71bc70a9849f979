"""The training engine shared by the diffusion methods, run through accelerate, and NASDM's loop on it.

The engine (first half of this file) owns what every method's loop shares: the run directory (refusing
to clobber, checking a resumed run is the same recipe and store), the accelerator, the per-step seeded
generator, the optimisation step (gradient accumulation, clipping, LR schedule, EMA), the loss log and
its NaN stop, and atomic checkpoints with the EMA weights. A method supplies its model, optimizer and a
``micro_loss(generator, step)`` function; the latent-diffusion loop (``latent_training.py``) is the
second user.

Exact resume: every random draw of optimisation step s (timesteps, noise, condition dropout, flips)
comes from a generator seeded by (seed, micro-batch number), and the data order is a pure function of
(seed, epoch). Together with the checkpointed model/optimizer/scheduler/EMA state, a run killed at
any moment and resumed from its last checkpoint reproduces the losses of an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from histosynth.conditions.nuclei_mask import drop_condition
from histosynth.data.dataset import NucleiPatchDataset
from histosynth.data.store import PatchStore
from histosynth.diffusion import checkpoint as ckpt
from histosynth.diffusion.hybrid_loss import hybrid_loss
from histosynth.errors import HistosynthError, OutputExistsError, TrainingError
from histosynth.models import SemanticUNet
from histosynth.recipes import NASDMRecipe, recipe_from_dict

LOSSES = "losses.jsonl"
RECIPE = "recipe.yaml"
PIPELINE = "pipeline"


@dataclass
class TrainResult:
    run: Path
    step: int
    last_loss: float
    images_per_second: float


# ================================================================================== the shared engine
class StreamBatchSampler(Sampler):
    """Micro-batches j = start, start+stride, ... of an endless stream of per-epoch permutations.

    Micro-batch j holds stream positions [j*B, (j+1)*B); epoch e is permutation(seed, e) of the
    dataset. A process of a multi-GPU run takes every `stride`-th micro-batch from its own offset.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int, stride: int = 1):
        self.n, self.b, self.seed, self.start, self.stride = num_items, batch_size, seed, start, stride
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perm_cache[epoch]

    def batch(self, j: int) -> list[int]:
        out = []
        for pos in range(j * self.b, (j + 1) * self.b):
            epoch, k = divmod(pos, self.n)
            out.append(int(self._perm(epoch)[k]))
        return out

    def __iter__(self):
        j = self.start
        while True:
            yield self.batch(j)
            j += self.stride

    def __len__(self):  # endless; DataLoader only needs this for len(), which we never call
        return 2**62


def step_generator(seed: int, micro_batch: int) -> torch.Generator:
    """The generator of every random draw of one micro-batch (CPU, so runs on any device draw the same)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(micro_batch))


def prepare_run_dir(run: Path, recipe, data: Path, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to clobber a run; on resume check it is the same recipe and return the checkpoint to load."""
    if resume:
        if not (run / RECIPE).is_file():
            raise HistosynthError("cannot resume: no run here (recipe.yaml missing)", run)
        saved = yaml.safe_load((run / RECIPE).read_text())
        if saved["recipe"] != recipe.to_dict() and saved["recipe"] != json.loads(json.dumps(recipe.to_dict())):
            raise HistosynthError("cannot resume: the recipe differs from the one this run was started with", run)
        if Path(saved["data"]).resolve() != data.resolve():
            raise HistosynthError(f"cannot resume: this run was trained on {saved['data']}, not {data}", run)
        return ckpt.latest_checkpoint(run)
    if run.exists() and any(run.iterdir()):
        if not overwrite:
            raise OutputExistsError("run directory exists and is not empty; pass --resume or --overwrite", run)
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    (run / RECIPE).write_text(yaml.safe_dump({"recipe": json.loads(json.dumps(recipe.to_dict())), "data": str(data)}))
    return None


def truncate_losses(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (they will be recomputed)."""
    if path.exists():
        rows = [r for r in path.read_text().splitlines() if r and json.loads(r)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


def start_run(run: Path, recipe, data: Path, train_cfg, *, resume: bool, overwrite: bool) -> tuple[Accelerator, Path | None]:
    """The accelerator of a run and the checkpoint to resume from (the main process prepares the directory)."""
    accelerator = Accelerator(
        mixed_precision=train_cfg.mixed_precision,
        gradient_accumulation_steps=train_cfg.gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,  # our LR lambdas are indexed by optimisation step
    )
    resume_from = None
    if accelerator.is_main_process:
        resume_from = prepare_run_dir(run, recipe, data, resume, overwrite)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process and resume:
        resume_from = ckpt.latest_checkpoint(run)
    return accelerator, resume_from


@dataclass
class Engine:
    """What the shared loop needs: the prepared model/optimizer/scheduler, the EMA and the run's train config
    (fields seed, gradient_accumulation_steps, max_grad_norm, log_every, checkpoint_every, keep_checkpoints)."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    ema: EMAModel
    run: Path
    cfg: Any

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)


def build_engine(accelerator: Accelerator, model, optimizer, lr_scheduler, *, ema_decay: float, run: Path,
                 resume_from: Path | None, cfg) -> tuple[Engine, int]:
    """Prepare model/optimizer/scheduler, create the EMA, and restore all of them from `resume_from`.

    Returns the engine and the optimisation step to continue from (0 for a new run)."""
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=ema_decay)
    ema.to(accelerator.device)
    engine = Engine(accelerator, model, optimizer, lr_scheduler, ema, run, cfg)
    step = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        load_ema(ema, resume_from, engine.unwrapped)
        step = ckpt.read_trainer_state(resume_from)["step"]
        if accelerator.is_main_process:
            truncate_losses(run / LOSSES, step)
            accelerator.print(f"resumed {run} from {resume_from.name} (step {step})")
    return engine, step


# micro_loss(generator, step) -> (loss with graph, {term: detached scalar}, number of samples in the micro-batch);
# it is called inside accelerator.accumulate(model), so the forward pass belongs there.
MicroLoss = Callable[[torch.Generator, int], tuple[torch.Tensor, dict[str, torch.Tensor], int]]


def run_steps(engine: Engine, *, step: int, total: int, micro_loss: MicroLoss, export: Callable, recipe_name: str,
              stage_of: Callable[[int], str] | None = None, plot: Callable[[Path, Path], None] | None = None,
              progress: bool = True) -> TrainResult:
    """Optimise from `step` to `total`: one row per step in RUN/losses.jsonl, a checkpoint every
    `checkpoint_every` steps and at the end (`export(unwrapped_model, ema)` writes the ready-to-sample pipeline),
    a TrainingError at the first non-finite loss, the curves through `plot(losses.jsonl, loss.png)`."""
    acc, cfg, run, model, optimizer = engine.accelerator, engine.cfg, engine.run, engine.model, engine.optimizer
    ga, nproc, rank = cfg.gradient_accumulation_steps, acc.num_processes, acc.process_index
    bar = tqdm(total=total, initial=step, disable=not (progress and acc.is_local_main_process), desc="train", unit="step")
    log = open(run / LOSSES, "a") if acc.is_main_process else None
    t0, seen, loss_value = time.perf_counter(), 0, float("nan")
    try:
        while step < total:
            stage = stage_of(step) if stage_of is not None else None
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (logged before the scheduler moves it)
            sums: dict[str, float] = {}
            for a in range(ga):
                micro = (step * ga + a) * nproc + rank
                g = step_generator(cfg.seed, micro)
                with acc.accumulate(model):
                    loss, terms, n = micro_loss(g, step)
                    if not torch.isfinite(loss):
                        last = ckpt.latest_checkpoint(run)
                        shown = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
                        raise TrainingError(
                            f"loss is {loss.item()} at step {step + 1}{f' ({shown})' if shown else ''}; "
                            f"last good checkpoint: {last or 'none'}. "
                            "Lower the learning rate or train in fp32 (mixed_precision: no).",
                            run,
                        )
                    acc.backward(loss)
                    if acc.sync_gradients and cfg.max_grad_norm > 0:
                        # each parameter group (network) on its own; accelerate's call also unscales fp16 grads, once
                        for i, group in enumerate(optimizer.param_groups):
                            clip = acc.clip_grad_norm_ if i == 0 else torch.nn.utils.clip_grad_norm_
                            clip(group["params"], cfg.max_grad_norm)
                    optimizer.step()
                    engine.lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                logged = torch.stack([loss.detach().float(), *(v.detach().float() for v in terms.values())])
                if nproc > 1:  # log the mean over all processes, not rank 0's share
                    logged = acc.reduce(logged, reduction="mean")
                for key, value in zip(("loss", *terms), logged.tolist()):
                    sums[key] = sums.get(key, 0.0) + value / ga
                seen += n * nproc
            engine.ema.step(engine.unwrapped.parameters())
            step += 1
            loss_value = sums["loss"]
            if log is not None:
                row = {"step": step, **{k: round(v, 7) for k, v in sums.items()}, "lr": lr}
                if stage is not None:
                    row["stage"] = stage
                log.write(json.dumps(row) + "\n")
                log.flush()
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                shown = {"loss": f"{loss_value:.4f}", **({"stage": stage} if stage else {})}
                bar.set_postfix(**shown, img_s=f"{seen / (time.perf_counter() - t0):.1f}")
            if step % cfg.checkpoint_every == 0 or step == total:
                save_training_checkpoint(engine, step, recipe_name, export)
    finally:
        bar.close()
        if log is not None:
            log.close()
    ips = seen / max(time.perf_counter() - t0, 1e-9)
    if acc.is_main_process and plot is not None and (run / LOSSES).exists():
        plot(run / LOSSES, run / "loss.png")
    acc.wait_for_everyone()
    return TrainResult(run=run, step=step, last_loss=loss_value, images_per_second=ips)


def save_training_checkpoint(engine: Engine, step: int, recipe_name: str, export: Callable) -> Path:
    """Write checkpoint `step` atomically (accelerate state + EMA weights), then `export(unwrapped, ema)`."""
    acc, run = engine.accelerator, engine.run
    final = ckpt.checkpoint_dir(run, step)
    tmp = ckpt.temporary_dir(final)
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp), safe_serialization=True)
    if acc.is_main_process:
        model = engine.unwrapped
        names = [n for n, _ in model.named_parameters()]
        state = engine.ema.state_dict()
        shadow = state.pop("shadow_params")
        save_file({n: p.detach().cpu().contiguous() for n, p in zip(names, shadow)}, str(tmp / "ema.safetensors"))
        (tmp / "ema_state.json").write_text(json.dumps(state))
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "recipe": recipe_name, "time": time.time()}))
        ckpt.finalize(tmp, final)
        ckpt.prune_checkpoints(run, engine.cfg.keep_checkpoints)
        export(model, engine.ema)
    acc.wait_for_everyone()
    return final


def load_ema(ema: EMAModel, ckpt_dir: Path, model) -> None:
    weights = load_file(str(ckpt_dir / "ema.safetensors"))
    state = json.loads((ckpt_dir / "ema_state.json").read_text())
    names = [n for n, _ in model.named_parameters()]
    state["shadow_params"] = [weights[n].to(next(model.parameters()).device) for n in names]
    ema.load_state_dict(state)


def ema_copy(model: torch.nn.Module, ema: EMAModel) -> torch.nn.Module:
    """A CPU copy of `model` (a diffusers ModelMixin, or any module) holding the EMA weights."""
    import copy

    twin = type(model).from_config(model.config) if hasattr(model, "from_config") else copy.deepcopy(model)
    ema.copy_to(twin.parameters())
    return twin.cpu()


# the names of the first version of this module
_prepare_run_dir, _step_generator, _truncate_losses, _load_ema = prepare_run_dir, step_generator, truncate_losses, load_ema


def load_run_recipe(run: str | Path):
    path = Path(run) / RECIPE
    if not path.is_file():
        raise HistosynthError("not a training run (recipe.yaml missing)", run)
    return recipe_from_dict(yaml.safe_load(path.read_text())["recipe"], source=path)


# ================================================================================== NASDM
def make_noise_scheduler(recipe: NASDMRecipe) -> DDPMScheduler:
    d = recipe.diffusion
    return DDPMScheduler(
        num_train_timesteps=d.num_train_timesteps,
        beta_schedule=d.beta_schedule,
        beta_start=d.beta_start,
        beta_end=d.beta_end,
        variance_type="learned_range" if d.learn_sigma else "fixed_small",
        clip_sample=True,
    )


def make_model(recipe: NASDMRecipe, num_classes: int) -> SemanticUNet:
    m = recipe.model
    return SemanticUNet(
        sample_size=recipe.patch_size,
        in_channels=3,
        cond_channels=num_classes + 1,  # one channel per type + the instance-edge channel
        learn_sigma=recipe.diffusion.learn_sigma,
        block_out_channels=tuple(m.block_out_channels),
        layers_per_block=m.layers_per_block,
        attention_resolutions=tuple(m.attention_resolutions),
        num_head_channels=m.num_head_channels,
        dropout=m.dropout,
        norm_num_groups=m.norm_num_groups,
        spade_hidden=m.spade_hidden,
    )


def _random_dihedral(x: torch.Tensor, c: torch.Tensor, g: torch.Generator):
    """Apply one of the 8 flips/rotations per sample, the same to image and condition."""
    k = torch.randint(0, 8, (x.shape[0],), generator=g)
    xs, cs = [], []
    for i in range(x.shape[0]):
        xi, ci = torch.rot90(x[i], int(k[i]) % 4, dims=(1, 2)), torch.rot90(c[i], int(k[i]) % 4, dims=(1, 2))
        if k[i] >= 4:
            xi, ci = xi.flip(-1), ci.flip(-1)
        xs.append(xi)
        cs.append(ci)
    return torch.stack(xs), torch.stack(cs)


def train(
    recipe: NASDMRecipe,
    data: str | Path,
    run: str | Path,
    *,
    max_steps: int | None = None,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> TrainResult:
    run, data = Path(run), Path(data)
    t_cfg = recipe.train
    store = PatchStore(data)
    if store.patch_size != recipe.patch_size:
        raise HistosynthError(
            f"the store holds {store.patch_size} px patches but recipe {recipe.name} trains at {recipe.patch_size} px", data
        )
    accelerator, resume_from = start_run(run, recipe, data, t_cfg, resume=resume, overwrite=overwrite)

    dataset = NucleiPatchDataset(store, "train")
    set_seed(t_cfg.seed)  # the initial weights (a resumed run overwrites them from the checkpoint)
    model = make_model(recipe, dataset.num_classes)
    noise_scheduler = make_noise_scheduler(recipe)
    base_lr = recipe.stages[0].learning_rate
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=base_lr, betas=(t_cfg.adam_beta1, t_cfg.adam_beta2), weight_decay=t_cfg.weight_decay
    )
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: recipe.stage_at(s).learning_rate / base_lr)
    engine, step = build_engine(accelerator, model, optimizer, lr_scheduler, ema_decay=t_cfg.ema_decay, run=run,
                                resume_from=resume_from, cfg=t_cfg)

    total = recipe.total_steps if max_steps is None else max_steps
    ga, nproc, rank = t_cfg.gradient_accumulation_steps, accelerator.num_processes, accelerator.process_index
    sampler = StreamBatchSampler(len(dataset), t_cfg.batch_size, t_cfg.seed, start=step * ga * nproc + rank, stride=nproc)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=t_cfg.num_workers, pin_memory=accelerator.device.type == "cuda")
    batches = iter(loader)
    betas = noise_scheduler.betas.to(accelerator.device)
    device = accelerator.device

    def micro_loss(g: torch.Generator, step: int):
        stage = recipe.stage_at(step)
        batch = next(batches)
        x0, cond = batch["image"], batch["condition"]
        if t_cfg.random_flips:
            x0, cond = _random_dihedral(x0, cond, g)
        cond, _ = drop_condition(cond, stage.condition_dropout, g)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x0, cond, t, noise = (v.to(device) for v in (x0, cond, t, noise))
        xt = noise_scheduler.add_noise(x0, noise, t)
        with accelerator.autocast():
            out = engine.model(xt, t, cond)
        out = out.float()
        if recipe.diffusion.learn_sigma:
            loss, terms = hybrid_loss(out, x0, xt, t, noise, betas, lambda_vlb=recipe.diffusion.lambda_vlb)
        else:
            loss = torch.nn.functional.mse_loss(out, noise)
            terms = {"simple": loss.detach(), "vlb": torch.zeros((), device=loss.device)}
        return loss, {"simple": terms["simple"], "vlb": terms["vlb"]}, x0.shape[0]

    def export(unet, ema) -> None:
        export_pipeline(unet, ema, run / PIPELINE, recipe, store)

    from histosynth.viz import plot_losses

    return run_steps(engine, step=step, total=total, micro_loss=micro_loss, export=export, recipe_name=recipe.name,
                     stage_of=lambda s: recipe.stage_at(s).name, plot=plot_losses, progress=progress)


def save_checkpoint(accelerator, model, ema, run: Path, step: int, recipe: NASDMRecipe, store: PatchStore) -> Path:
    """Write NASDM checkpoint `step` atomically, then re-export the EMA pipeline to RUN/pipeline."""
    engine = Engine(accelerator, model, None, None, ema, run, recipe.train)
    return save_training_checkpoint(engine, step, recipe.name,
                                    lambda unet, ema_: export_pipeline(unet, ema_, run / PIPELINE, recipe, store))


def export_pipeline(unet, ema: EMAModel, where: Path, recipe: NASDMRecipe, store: PatchStore) -> None:
    """Save a ready-to-sample NASDMPipeline with the EMA weights (what NASDM samples with)."""
    from histosynth.pipelines.nasdm import NASDMPipeline

    pipe = NASDMPipeline(
        unet=ema_copy(unet, ema),
        scheduler=make_noise_scheduler(recipe),
        class_names=list(store.class_names),
        magnification=store.magnification,
    )
    ckpt.write_atomically(where, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))
