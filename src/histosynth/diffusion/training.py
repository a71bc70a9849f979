"""The training loop shared by the pixel-space methods (NASDM now), run through accelerate.

Exact resume: every random draw of optimisation step s (timesteps, noise, condition dropout, flips)
comes from a generator seeded by (seed, micro-batch number), and the data order is a pure function of
(seed, epoch). Together with the checkpointed model/optimizer/scheduler/EMA state, a run killed at
any moment and resumed from its last checkpoint reproduces the losses of an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

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


def _step_generator(seed: int, micro_batch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(micro_batch))


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


def _prepare_run_dir(run: Path, recipe: NASDMRecipe, data: Path, resume: bool, overwrite: bool) -> Path | None:
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


def _truncate_losses(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (they will be recomputed)."""
    if path.exists():
        rows = [r for r in path.read_text().splitlines() if r and json.loads(r)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))


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
    accelerator = Accelerator(
        mixed_precision=t_cfg.mixed_precision,
        gradient_accumulation_steps=t_cfg.gradient_accumulation_steps,
        step_scheduler_with_optimizer=False,  # our LR lambda is indexed by optimisation step
    )
    store = PatchStore(data)
    if store.patch_size != recipe.patch_size:
        raise HistosynthError(
            f"the store holds {store.patch_size} px patches but recipe {recipe.name} trains at {recipe.patch_size} px", data
        )
    resume_from = None
    if accelerator.is_main_process:
        resume_from = _prepare_run_dir(run, recipe, data, resume, overwrite)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process and resume:
        resume_from = ckpt.latest_checkpoint(run)

    dataset = NucleiPatchDataset(store, "train")
    set_seed(t_cfg.seed)  # the initial weights (a resumed run overwrites them from the checkpoint)
    model = make_model(recipe, dataset.num_classes)
    noise_scheduler = make_noise_scheduler(recipe)
    base_lr = recipe.stages[0].learning_rate
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=base_lr, betas=(t_cfg.adam_beta1, t_cfg.adam_beta2), weight_decay=t_cfg.weight_decay
    )
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: recipe.stage_at(s).learning_rate / base_lr)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=t_cfg.ema_decay)
    ema.to(accelerator.device)

    step = 0
    if resume_from is not None:
        accelerator.load_state(str(resume_from))
        _load_ema(ema, resume_from, accelerator.unwrap_model(model))
        step = ckpt.read_trainer_state(resume_from)["step"]
        if accelerator.is_main_process:
            _truncate_losses(run / LOSSES, step)
            accelerator.print(f"resumed {run} from {resume_from.name} (step {step})")

    total = recipe.total_steps if max_steps is None else max_steps
    ga, nproc, rank = t_cfg.gradient_accumulation_steps, accelerator.num_processes, accelerator.process_index
    sampler = StreamBatchSampler(len(dataset), t_cfg.batch_size, t_cfg.seed, start=step * ga * nproc + rank, stride=nproc)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=t_cfg.num_workers, pin_memory=accelerator.device.type == "cuda")
    batches = iter(loader)
    betas = noise_scheduler.betas.to(accelerator.device)

    bar = tqdm(total=total, initial=step, disable=not (progress and accelerator.is_local_main_process), desc="train", unit="step")
    log = open(run / LOSSES, "a") if accelerator.is_main_process else None
    t0, seen, loss_value = time.perf_counter(), 0, float("nan")
    try:
        while step < total:
            stage = recipe.stage_at(step)
            lr = optimizer.param_groups[0]["lr"]  # the rate this step uses (logged before the scheduler moves it)
            terms_sum = {"loss": 0.0, "simple": 0.0, "vlb": 0.0}
            for a in range(ga):
                micro = (step * ga + a) * nproc + rank
                batch = next(batches)
                g = _step_generator(t_cfg.seed, micro)
                x0, cond = batch["image"], batch["condition"]
                if t_cfg.random_flips:
                    x0, cond = _random_dihedral(x0, cond, g)
                cond, _ = drop_condition(cond, stage.condition_dropout, g)
                t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g)
                noise = torch.randn(x0.shape, generator=g)
                x0, cond, t, noise = (v.to(accelerator.device) for v in (x0, cond, t, noise))
                xt = noise_scheduler.add_noise(x0, noise, t)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        out = model(xt, t, cond)
                    out = out.float()
                    if recipe.diffusion.learn_sigma:
                        loss, terms = hybrid_loss(out, x0, xt, t, noise, betas, lambda_vlb=recipe.diffusion.lambda_vlb)
                    else:
                        loss = torch.nn.functional.mse_loss(out, noise)
                        terms = {"simple": loss.detach(), "vlb": torch.zeros((), device=loss.device)}
                    if not torch.isfinite(loss):
                        last = ckpt.latest_checkpoint(run)
                        raise TrainingError(
                            f"loss is {loss.item()} at step {step + 1} (simple={float(terms['simple']):.4g}, "
                            f"vlb={float(terms['vlb']):.4g}); last good checkpoint: {last or 'none'}. "
                            "Lower the learning rate or train in fp32 (mixed_precision: no).",
                            run,
                        )
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and t_cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(model.parameters(), t_cfg.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                logged = torch.stack([loss.detach(), terms["simple"].detach().float(), terms["vlb"].detach().float()])
                if nproc > 1:  # log the mean over all processes, not rank 0's share
                    logged = accelerator.reduce(logged, reduction="mean")
                for key, value in zip(("loss", "simple", "vlb"), logged.tolist()):
                    terms_sum[key] += value / ga
                seen += x0.shape[0] * nproc
            ema.step(accelerator.unwrap_model(model).parameters())
            step += 1
            loss_value = terms_sum["loss"]
            if log is not None:
                row = {"step": step, **{k: round(v, 7) for k, v in terms_sum.items()}, "lr": lr, "stage": stage.name}
                log.write(json.dumps(row) + "\n")
                log.flush()
            bar.update(1)
            if step % t_cfg.log_every == 0 or step == total:
                bar.set_postfix(loss=f"{loss_value:.4f}", stage=stage.name, img_s=f"{seen / (time.perf_counter() - t0):.1f}")
            if step % t_cfg.checkpoint_every == 0 or step == total:
                save_checkpoint(accelerator, model, ema, run, step, recipe, store)
    finally:
        bar.close()
        if log is not None:
            log.close()
    ips = seen / max(time.perf_counter() - t0, 1e-9)
    if accelerator.is_main_process and (run / LOSSES).exists():
        from histosynth.viz import plot_losses

        plot_losses(run / LOSSES, run / "loss.png")
    accelerator.wait_for_everyone()
    return TrainResult(run=run, step=step, last_loss=loss_value, images_per_second=ips)


def save_checkpoint(accelerator, model, ema, run: Path, step: int, recipe: NASDMRecipe, store: PatchStore) -> Path:
    """Write checkpoint `step` atomically, then re-export the EMA pipeline to RUN/pipeline."""
    final = ckpt.checkpoint_dir(run, step)
    tmp = ckpt.temporary_dir(final)
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        unet = accelerator.unwrap_model(model)
        names = [n for n, _ in unet.named_parameters()]
        state = ema.state_dict()
        shadow = state.pop("shadow_params")
        save_file({n: p.detach().cpu().contiguous() for n, p in zip(names, shadow)}, str(tmp / "ema.safetensors"))
        (tmp / "ema_state.json").write_text(json.dumps(state))
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "recipe": recipe.name, "time": time.time()}))
        ckpt.finalize(tmp, final)
        ckpt.prune_checkpoints(run, recipe.train.keep_checkpoints)
        export_pipeline(unet, ema, run / PIPELINE, recipe, store)
    accelerator.wait_for_everyone()
    return final


def _load_ema(ema: EMAModel, ckpt_dir: Path, unet) -> None:
    weights = load_file(str(ckpt_dir / "ema.safetensors"))
    state = json.loads((ckpt_dir / "ema_state.json").read_text())
    names = [n for n, _ in unet.named_parameters()]
    state["shadow_params"] = [weights[n].to(next(unet.parameters()).device) for n in names]
    ema.load_state_dict(state)


def export_pipeline(unet, ema: EMAModel, where: Path, recipe: NASDMRecipe, store: PatchStore) -> None:
    """Save a ready-to-sample NASDMPipeline with the EMA weights (what NASDM samples with)."""
    from histosynth.pipelines.nasdm import NASDMPipeline

    ema_unet = SemanticUNet.from_config(unet.config)
    ema.copy_to(ema_unet.parameters())
    pipe = NASDMPipeline(
        unet=ema_unet.cpu(),
        scheduler=make_noise_scheduler(recipe),
        class_names=list(store.class_names),
        magnification=store.magnification,
    )
    ckpt.write_atomically(where, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))


def load_run_recipe(run: str | Path) -> NASDMRecipe:
    path = Path(run) / RECIPE
    if not path.is_file():
        raise HistosynthError("not a training run (recipe.yaml missing)", run)
    return recipe_from_dict(yaml.safe_load(path.read_text())["recipe"], source=path)
