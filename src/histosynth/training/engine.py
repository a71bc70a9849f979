"""The one training engine: every method trains through :func:`fit` with its :class:`TrainingTask`.

The engine owns what every loop shares: the run directory (refusing to clobber, checking a resumed run is the
same recipe and store), the accelerator (``accelerate launch`` for several GPUs / nodes), seeding, AdamW with
the task's parameter groups and LR factor, the data order, gradient accumulation, clipping per parameter
group, EMA (diffusers' ``EMAModel``), the loss log and its NaN stop, the divergence watch (a finite loss that jumps
far above its best is reported, and the newest checkpoint from before it is held back from the rotation;
``divergence.py``), atomic checkpoints with the EMA weights, exact resume, the loss plot and the export at every
checkpoint.

Exact resume: every random draw of optimisation step s comes from a generator seeded by (seed, micro-batch
number) and the data order is a pure function of (seed, epoch) (``data_order.py``). Together with the
checkpointed model/optimizer/scheduler/EMA state, a run killed at any moment and resumed from its last
checkpoint reproduces the losses of an uninterrupted run bit for bit. On the CPU that needs torch's thread count too
(its reductions split by thread): a checkpoint records it and a resume trains on it (``cpu_threads.resume_threads``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from histosynth.cpu_threads import resume_threads
from histosynth.diffusion import checkpoint as ckpt
from histosynth.errors import DiskFullError, HistosynthError, TrainingError, is_disk_full, tree_bytes
from histosynth.training.data_order import StreamBatchSampler, step_generator
from histosynth.training.divergence import DivergenceWatch
from histosynth.training.run_dir import LOSS_PNG, LOSSES, prepare_run_dir, truncate_losses
from histosynth.training.task import TrainingTask
from histosynth.viz import plot_loss_curves


@dataclass
class TrainResult:
    run: Path
    step: int
    last_loss: float
    images_per_second: float
    data_wait_fraction: float = 0.0  # of the wall time, spent waiting for the next batch (> a few % = loader-bound)
    data_wait_seconds: float = 0.0


@dataclass
class Engine:
    """The prepared model/optimizer/scheduler, the EMA, the run and its engine config."""

    accelerator: Accelerator
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    ema: EMAModel
    run: Path
    cfg: Any
    watch: DivergenceWatch | None = None  # the loss's divergence watch (main process): which checkpoint is safe

    @property
    def unwrapped(self) -> torch.nn.Module:
        return self.accelerator.unwrap_model(self.model)


def adamw(groups, **kwargs) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) where torch has it for these parameters' devices and dtypes
    (CUDA; CPU since torch 2.4), else torch's default (foreach) implementation."""
    groups = list(groups)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(groups, **kwargs)


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Turn on diffusers' gradient checkpointing in every network of ``model`` that supports it (``train.
    gradient_checkpointing``).

    Raises:
        HistosynthError: none of the task's networks supports it.
    """
    from diffusers import ModelMixin

    networks = [m for m in model.modules() if isinstance(m, ModelMixin) and m._supports_gradient_checkpointing]
    if not networks:
        raise HistosynthError(f"train.gradient_checkpointing: {type(model).__name__} has no network that supports "
                              "gradient checkpointing")
    for network in networks:
        network.enable_gradient_checkpointing()


def fit(task: TrainingTask, out: str | Path, *, max_steps: int | None = None, resume: bool = False,
        overwrite: bool = False, progress: bool = True, cpu: bool = False) -> TrainResult:
    """Train ``task`` into run directory ``out`` up to ``max_steps`` (default: the recipe's) optimisation steps. A
    resume on the CPU sets torch's thread count to the one the run was checkpointed with (``resume_threads``).

    Raises:
        OutputExistsError: ``out`` holds a run and neither ``resume`` nor ``overwrite`` is set.
        HistosynthError: resuming with another recipe or store, or no run to resume.
        TrainingError: a non-finite loss (the last good checkpoint is kept and named).
    """
    run, cfg = Path(out), task.train_config
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, cpu=cpu,
                              gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              step_scheduler_with_optimizer=False)  # LR factors are indexed by optimisation step
    resume_from = prepare_run_dir(run, task.recipe, task.data, resume, overwrite) if accelerator.is_main_process else None
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process and resume:
        resume_from = ckpt.latest_checkpoint(run)
    resuming = resume_from is not None
    task.setup(accelerator, run, resuming)
    set_seed(cfg.seed)  # the initial weights (a resumed run overwrites them from the checkpoint)
    model = task.build_model(accelerator, run, resuming)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    optimizer = adamw(task.parameter_groups(model), lr=task.learning_rate(), betas=(cfg.adam_beta1, cfg.adam_beta2),
                      weight_decay=cfg.weight_decay)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, task.lr_factor)
    engine, step = _build_engine(accelerator, model, optimizer, lr_scheduler, run=run, resume_from=resume_from, cfg=cfg)

    dataset = task.dataset()
    ga, nproc, rank = cfg.gradient_accumulation_steps, accelerator.num_processes, accelerator.process_index
    sampler = StreamBatchSampler(len(dataset), cfg.batch_size, cfg.seed, start=step * ga * nproc + rank, stride=nproc)
    batches = iter(DataLoader(dataset, batch_sampler=sampler, num_workers=cfg.num_workers, collate_fn=task.collate_fn,
                              pin_memory=accelerator.device.type == "cuda"))
    total = task.total_steps if max_steps is None else max_steps
    if resume and step >= total and accelerator.is_main_process:
        export(engine, task)  # nothing left to train: the export a full disk may have stopped after the checkpoint
    result = _run_steps(engine, task, batches, step=step, total=total, progress=progress)
    if accelerator.is_main_process and (run / LOSSES).exists():
        plot_loss_curves(run / LOSSES, run / LOSS_PNG, task.plot_columns)
    accelerator.wait_for_everyone()
    return result


def _build_engine(accelerator, model, optimizer, lr_scheduler, *, run: Path, resume_from: Path | None, cfg):
    """Prepare model/optimizer/scheduler, create the EMA, and restore all of them from `resume_from`."""
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    # without averaging in the recipe the EMA runs at decay 0 (checkpoints keep one format) and exports ignore it
    ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=cfg.ema_decay or 0.0)
    ema.to(accelerator.device)
    engine = Engine(accelerator, model, optimizer, lr_scheduler, ema, run, cfg)
    step = 0
    if resume_from is None and accelerator.is_main_process:  # a resumed run that never completed a checkpoint
        truncate_losses(run / LOSSES, 0)  # (a new run has no log yet)
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        _load_ema(ema, resume_from, engine.unwrapped)
        state = ckpt.read_trainer_state(resume_from)
        step = state["step"]
        if accelerator.device.type == "cpu" and state.get("device", "cpu") == "cpu":  # a GPU run's bits differ anyway
            resume_threads(state.get("torch_threads"), accelerator.print)
        if accelerator.is_main_process:
            truncate_losses(run / LOSSES, step)
            accelerator.print(f"resumed {run} from {resume_from.name} (step {step})")
    return engine, step


def _check_finite(loss: torch.Tensor, terms: dict, step: int, run: Path) -> None:
    if not torch.isfinite(loss):
        shown = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
        raise TrainingError(f"loss is {loss.item()} at step {step + 1}{f' ({shown})' if shown else ''}; "
                            f"last good checkpoint: {ckpt.latest_checkpoint(run) or 'none'}. "
                            "Lower the learning rate or train in fp32 (mixed_precision: no).", run)


def _optimise(engine: Engine, loss: torch.Tensor) -> None:
    """Backward, clip each parameter group (network) on its own, step the optimizer and the LR schedule."""
    acc, optimizer = engine.accelerator, engine.optimizer
    acc.backward(loss)
    if acc.sync_gradients and engine.cfg.max_grad_norm > 0:
        for i, group in enumerate(optimizer.param_groups):  # accelerate's call also unscales fp16 grads, once
            clip = acc.clip_grad_norm_ if i == 0 else torch.nn.utils.clip_grad_norm_
            clip(group["params"], engine.cfg.max_grad_norm)
    optimizer.step()
    engine.lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def _one_step(engine: Engine, task: TrainingTask, batches, step: int) -> tuple[dict[str, float], int, float]:
    """One optimisation step over its micro-batches: the mean of each logged term over them (and processes), the
    images seen, and the seconds spent waiting for batches (the loader starving the step)."""
    acc, cfg = engine.accelerator, engine.cfg
    ga, nproc, rank = cfg.gradient_accumulation_steps, acc.num_processes, acc.process_index
    sums: dict[str, float] = {}
    seen, waited = 0, 0.0
    for a in range(ga):
        g = step_generator(cfg.seed, (step * ga + a) * nproc + rank)
        with acc.accumulate(engine.model):
            start = time.perf_counter()
            batch = next(batches)
            waited += time.perf_counter() - start
            loss, terms, n = task.micro_loss(engine.model, batch, g, step)
            _check_finite(loss, terms, step, engine.run)
            _optimise(engine, loss)
        logged = torch.stack([loss.detach().float(), *(torch.as_tensor(v).detach().float().to(loss.device)
                                                       for v in terms.values())])
        if nproc > 1:  # log the mean over all processes, not rank 0's share
            logged = acc.reduce(logged, reduction="mean")
        for key, value in zip(("loss", *terms), logged.tolist()):
            sums[key] = sums.get(key, 0.0) + value / ga
        seen += n * nproc
    engine.ema.step(engine.unwrapped.parameters())
    return sums, seen, waited


def _run_steps(engine: Engine, task: TrainingTask, batches, *, step: int, total: int, progress: bool) -> TrainResult:
    """Optimise from `step` to `total`: a row per step in RUN/losses.jsonl, a checkpoint (and export) every
    `checkpoint_every` steps and at the end."""
    acc, cfg, run = engine.accelerator, engine.cfg, engine.run
    bar = tqdm(total=total, initial=step, disable=not (progress and acc.is_local_main_process), desc="train", unit="step")
    log = open(run / LOSSES, "a") if acc.is_main_process else None
    t0, seen, waited, loss_value = time.perf_counter(), 0, 0.0, float("nan")
    engine.watch = _divergence_watch(task, run, step) if acc.is_main_process else None
    try:
        while step < total:
            stage = task.stage_of(step)
            lr = engine.optimizer.param_groups[0]["lr"]  # the rate this step uses (logged before the scheduler moves it)
            sums, n, wait = _one_step(engine, task, batches, step)
            step, seen, waited, loss_value = step + 1, seen + n, waited + wait, sums["loss"]
            row = {"step": step, **{k: round(v, 7) for k, v in sums.items()}, "lr": lr}
            if log is not None:
                _log_row(log, engine, json.dumps({**row, "stage": stage} if stage is not None else row))
            # the watch reads the logged (rounded) values, as a resumed run's replay of the log does
            jump = engine.watch.update(step, task.watched_loss(row), stage) if engine.watch is not None else None
            if jump is not None:
                tqdm.write(f"warning: {jump.message()}. {_recovery_advice(engine)}")
            bar.update(1)
            if step % cfg.log_every == 0 or step == total:
                elapsed = time.perf_counter() - t0
                bar.set_postfix(loss=f"{loss_value:.4f}", **({"stage": stage} if stage else {}),
                                img_s=f"{seen / elapsed:.1f}", data=f"{waited / elapsed:.0%}")
            if step % cfg.checkpoint_every == 0 or step == total:
                save_checkpoint(engine, task, step)
    finally:
        bar.close()
        if log is not None:
            log.close()
    elapsed = max(time.perf_counter() - t0, 1e-9)
    return TrainResult(run=run, step=step, last_loss=loss_value, images_per_second=seen / elapsed,
                       data_wait_fraction=waited / elapsed, data_wait_seconds=waited)


# steps per median; a window median > 3x the best is a jump, one <= 1.5x the best is healthy
DIVERGENCE_WINDOW, DIVERGENCE_FACTOR, DIVERGENCE_HEALTHY = 100, 3.0, 1.5


def _divergence_watch(task: TrainingTask, run: Path, step: int) -> DivergenceWatch:
    """A watch that has seen the run's logged losses up to ``step`` (a resumed run's watch is an uninterrupted
    run's: the same windows, best and safe point; jumps from before were reported then)."""
    watch = DivergenceWatch(DIVERGENCE_WINDOW, DIVERGENCE_FACTOR, DIVERGENCE_HEALTHY)
    if step > 0 and (run / LOSSES).is_file():
        with open(run / LOSSES) as log:
            for row in map(json.loads, filter(str.strip, log)):
                if row["step"] <= step:
                    watch.update(row["step"], task.watched_loss(row), row.get("stage"))
    return watch


def _recovery_advice(engine: Engine) -> str:
    """What to do about a jump: the held checkpoint and how to export it (a resume would repeat the jump)."""
    safe = _newest_safe(engine)
    if safe is None:
        return "No checkpoint from before it is left; a new run at a lower learning rate is the way back"
    return (f"Held back from the checkpoint rotation: {safe}. A resume would repeat the jump (it is exact); to "
            f"export that checkpoint's weights, move the later ones out of {engine.run / ckpt.CHECKPOINTS} and run "
            f"`train --resume --max-steps {ckpt.checkpoint_step(safe)}`; or start a new run at a lower learning rate")


def _newest_safe(engine: Engine) -> Path | None:
    """The newest checkpoint that predates any loss jump (the watch's safe_until), if one is on disk: what
    keep_checkpoints must not rotate away (one at most beyond it), so that a diverged run keeps a good one. A window
    that closes healthy at step E makes the checkpoints up to E - window safe; the newest of them is still on disk then
    when checkpoint_every x (keep_checkpoints - 1) >= the window (100 steps: true of the recipes' defaults), and once
    held it stays until a newer one is safe."""
    safe = engine.watch.safe_until if engine.watch is not None else None
    before = [c for c in ckpt.list_checkpoints(engine.run) if safe is not None and ckpt.checkpoint_step(c) <= safe]
    return before[-1] if before else None


def _log_row(log, engine: Engine, line: str) -> None:
    """Append one row to RUN/losses.jsonl; a full disk cuts the file back to its last whole row (a resume reads it)
    and is a DiskFullError asking for the room of the next checkpoint."""
    run = engine.run
    good = log.tell()
    try:
        log.write(line + "\n")
        log.flush()
    except OSError as exc:
        if not is_disk_full(exc, run):
            raise
        try:
            log.close()  # retries the flush; the file is closed even when that fails again
        except OSError:
            pass
        os.truncate(run / LOSSES, good)
        need = ckpt.checkpoint_bytes(run, lambda: _state_bytes(engine))
        raise DiskFullError(run / LOSSES, "the loss log and the next checkpoint", need,
                            then=_resume_advice(run)) from None


def save_checkpoint(engine: Engine, task: TrainingTask, step: int) -> Path:
    """Write checkpoint `step` atomically (accelerate state + EMA weights), then the task's export.

    A failed write leaves no temporary directory and the earlier checkpoints as they were; a full disk is a
    DiskFullError naming the checkpoint (or the export), the space it needs and the checkpoint to resume from."""
    acc, run = engine.accelerator, engine.run
    final = ckpt.checkpoint_dir(run, step)
    tmp = ckpt.temporary_dir(final)
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    with ckpt.writing(tmp, final, "a checkpoint", needed=lambda: ckpt.checkpoint_bytes(run, lambda: _state_bytes(engine)),
                      then=_resume_advice(run)):
        acc.save_state(str(tmp), safe_serialization=True)
        if acc.is_main_process:
            model = engine.unwrapped
            names = [n for n, _ in model.named_parameters()]
            state = engine.ema.state_dict()
            shadow = state.pop("shadow_params")
            save_file({n: p.detach().cpu().contiguous() for n, p in zip(names, shadow)}, str(tmp / "ema.safetensors"))
            (tmp / "ema_state.json").write_text(json.dumps(state))
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "recipe": task.recipe.name,
                                                                "time": time.time(), "device": acc.device.type,
                                                                "torch_threads": torch.get_num_threads()}))
            ckpt.finalize(tmp, final)
    if acc.is_main_process:
        safe = _newest_safe(engine)
        ckpt.prune_checkpoints(run, engine.cfg.keep_checkpoints, also_keep=[safe] if safe is not None else [])
        export(engine, task)
    acc.wait_for_everyone()
    return final


def export(engine: Engine, task: TrainingTask) -> None:
    """The task's export of the current weights (EMA ones when the recipe averages); a full disk is a DiskFullError
    asking for at least the weights' size and naming the checkpoint a resume exports again from."""
    run = engine.run
    try:
        task.export(engine.unwrapped, engine.ema if engine.cfg.ema_decay is not None else None, run)
    except DiskFullError as exc:
        need = exc.needed
        if need is None or exc.at_least:  # no earlier export to go by: the weights at least
            last = ckpt.latest_checkpoint(run)
            weights = tree_bytes(last / "ema.safetensors") if last is not None else 0
            need = max(need or 0, weights) or None
        raise DiskFullError(exc.path, f"the export ({exc.what})", need, at_least=exc.at_least or exc.needed is None,
                            then=_resume_advice(run)) from None


def _resume_advice(run: Path) -> str:
    last = ckpt.latest_checkpoint(run)
    since = f"from {last.name}" if last is not None else "from the start (no checkpoint is complete)"
    return f"free some space there, then resume the run (--resume) {since}"


def _state_bytes(engine: Engine) -> int:
    """Bytes of the tensors a checkpoint holds: the model, its EMA copy and the optimizer's state."""
    def size(t) -> int:
        return t.numel() * t.element_size() if torch.is_tensor(t) else 0

    total = sum(size(t) for t in engine.unwrapped.state_dict().values())
    total += sum(size(p) for p in engine.unwrapped.parameters())  # the EMA's shadow parameters
    for per_param in engine.optimizer.state.values():
        total += sum(size(v) for v in per_param.values())
    return total


def _load_ema(ema: EMAModel, ckpt_dir: Path, model) -> None:
    weights = load_file(str(ckpt_dir / "ema.safetensors"))
    state = json.loads((ckpt_dir / "ema_state.json").read_text())
    names = [n for n, _ in model.named_parameters()]
    state["shadow_params"] = [weights[n].to(next(model.parameters()).device) for n in names]
    ema.load_state_dict(state)


def ema_copy(model: torch.nn.Module, ema: EMAModel | None) -> torch.nn.Module:
    """A CPU copy of `model` (a diffusers ModelMixin, or any module) holding the EMA weights (the model's own
    weights when ``ema`` is None)."""
    import copy

    if hasattr(model, "from_config"):
        # without diffusers' list of defaulted arguments, which from_config would reset to their defaults even
        # when set after __init__ (e.g. NucleiSegmenter.load_imagenet_encoder records config.encoder_weights)
        twin = type(model).from_config({k: v for k, v in model.config.items() if k != "_use_default_values"})
        twin.load_state_dict(model.state_dict())
    else:
        twin = copy.deepcopy(model)
    if ema is not None:
        ema.copy_to(twin.parameters())
    return twin.cpu()
