"""NASDM's training task: SemanticUNet on (image, nuclei-mask condition) pairs with the hybrid loss (NASDM Sec. 3).

Per micro-batch: one of the 8 flips/rotations per patch (image and condition alike), condition dropout of the
stage (NASDM: 0 then 0.2) to the null condition ∅ = zeros, t ~ U{0..T−1}, ε ~ N(0, I), and
L_hybrid = L_simple + λ·L_vlb with the learned-range variance (Improved DDPM). The learning rate follows the
recipe's stages. Export: ``RUN/pipeline`` (a NASDMPipeline with the EMA weights).
"""

from __future__ import annotations

from pathlib import Path

import torch

from histosynth.conditions.nuclei_mask import drop_condition
from histosynth.data.dataset import NucleiPatchDataset
from histosynth.diffusion import checkpoint as ckpt
from histosynth.diffusion.hybrid_loss import hybrid_loss
from histosynth.diffusion.schedulers import ddpm_scheduler
from histosynth.models import SemanticUNet
from histosynth.pipelines.nasdm import NASDMPipeline
from histosynth.recipes.nasdm import NASDMRecipe
from histosynth.training.engine import ema_copy
from histosynth.training.run_dir import PIPELINE
from histosynth.training.task import TrainingTask
from histosynth.viz import NASDM_LOSS_COLUMNS



def make_noise_scheduler(recipe: NASDMRecipe):
    return ddpm_scheduler(recipe.diffusion, variance_type="learned_range" if recipe.diffusion.learn_sigma else "fixed_small",
                          clip_sample=True)


def make_model(recipe: NASDMRecipe, num_classes: int) -> SemanticUNet:
    m = recipe.model
    return SemanticUNet(
        sample_size=recipe.patch_size, in_channels=3,
        cond_channels=num_classes + 1,  # one channel per type + the instance-edge channel
        learn_sigma=recipe.diffusion.learn_sigma, block_out_channels=tuple(m.block_out_channels),
        layers_per_block=m.layers_per_block, attention_resolutions=tuple(m.attention_resolutions),
        num_head_channels=m.num_head_channels, dropout=m.dropout, norm_num_groups=m.norm_num_groups,
        spade_hidden=m.spade_hidden,
    )


def random_dihedral(x: torch.Tensor, c: torch.Tensor, g: torch.Generator):
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


class NASDMTask(TrainingTask):
    plot_columns = NASDM_LOSS_COLUMNS
    recipe_type = NASDMRecipe

    def __init__(self, recipe: NASDMRecipe, data: Path, *, progress: bool = True):
        super().__init__(recipe, data, progress=progress)
        self.store = self.open_store(data)
        self.noise_scheduler = make_noise_scheduler(recipe)

    def setup(self, accelerator, run, resuming):
        self.device = accelerator.device
        self.autocast = accelerator.autocast
        self._dataset = NucleiPatchDataset(self.store, "train")
        self.betas = self.noise_scheduler.betas.to(self.device)

    def build_model(self, accelerator, run, resuming):
        return make_model(self.recipe, self._dataset.num_classes)

    def learning_rate(self) -> float:
        return self.recipe.stages[0].learning_rate

    def lr_factor(self, step: int) -> float:
        return self.recipe.stage_at(step).learning_rate / self.recipe.stages[0].learning_rate

    def stage_of(self, step: int) -> str:
        return self.recipe.stage_at(step).name

    def dataset(self):
        return self._dataset

    def micro_loss(self, model, batch, g, step):
        recipe, sched = self.recipe, self.noise_scheduler
        x0, cond = batch["image"], batch["condition"]
        if recipe.train.random_flips:
            x0, cond = random_dihedral(x0, cond, g)
        cond, _ = drop_condition(cond, recipe.stage_at(step).condition_dropout, g)
        t = torch.randint(0, sched.config.num_train_timesteps, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        x0, cond, t, noise = (v.to(self.device) for v in (x0, cond, t, noise))
        xt = sched.add_noise(x0, noise, t)
        with self.autocast():
            out = model(xt, t, cond)
        out = out.float()
        if recipe.diffusion.learn_sigma:
            loss, terms = hybrid_loss(out, x0, xt, t, noise, self.betas, lambda_vlb=recipe.diffusion.lambda_vlb)
        else:
            loss = torch.nn.functional.mse_loss(out, noise)
            terms = {"simple": loss.detach(), "vlb": torch.zeros((), device=loss.device)}
        return loss, {"simple": terms["simple"], "vlb": terms["vlb"]}, x0.shape[0]

    def export(self, model, ema, run):
        """``RUN/pipeline``: a ready-to-sample NASDMPipeline with the EMA weights (what NASDM samples with)."""
        pipe = NASDMPipeline(unet=ema_copy(model, ema), scheduler=self.noise_scheduler,
                             class_names=list(self.store.class_names), magnification=self.store.magnification)
        ckpt.write_atomically(run / PIPELINE, lambda tmp: pipe.save_pretrained(tmp, safe_serialization=True))


def train(recipe: NASDMRecipe, data: str | Path, run: str | Path, *, max_steps: int | None = None,
          resume: bool = False, overwrite: bool = False, progress: bool = True):
    """Train NASDM ``recipe`` on the train split of patch store ``data`` into run directory ``run``."""
    from histosynth.training.engine import fit

    return fit(NASDMTask(recipe, data, progress=progress), run, max_steps=max_steps, resume=resume,
               overwrite=overwrite, progress=progress)
