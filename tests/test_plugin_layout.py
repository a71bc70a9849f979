"""The plug-in layout: imports run one way, and a toy method registered in a few lines trains, resumes exactly and
samples through the command line (the recipe of docs/architecture.md, "Adding a method")."""

from __future__ import annotations

import ast
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DModel

from histosynth.cli import main
from histosynth.data.dataset import NucleiPatchDataset
from histosynth.data.store import PatchStore
from histosynth.diffusion import checkpoint as ckpt
from histosynth.methods import Method, get_method, register_method
from histosynth.recipes import EngineConfig, Recipe
from histosynth.sampling import SampleWriter
from histosynth.training import TrainingTask
from histosynth.training.engine import ema_copy

SRC = Path(__file__).resolve().parents[1] / "src" / "histosynth"
LOWER = ("data", "conditions", "models", "diffusion")
UPPER = ("pipelines", "sampling", "training", "methods", "evaluate", "cli", "quickstart")


def _imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("histosynth"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("histosynth"))
    return out


def test_lower_layers_never_import_upper_ones():
    bad = []
    for path in SRC.rglob("*.py"):
        package = path.relative_to(SRC).parts[0]
        if package not in LOWER:
            continue
        for module in _imports(path):
            top = module.split(".")[1] if "." in module else ""
            if top in UPPER:
                bad.append(f"{path.relative_to(SRC)} imports {module}")
    assert not bad, bad


def test_no_module_imports_another_modules_private_names():
    """What one module uses of another is public (named in its docs and ``__all__``), benchmarks included."""
    bad = []
    for path in [*SRC.rglob("*.py"), *(SRC.parents[1] / "benchmarks").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("histosynth"):
                bad += [f"{path.relative_to(SRC.parents[1])}:{node.lineno} {node.module}.{a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
    assert not bad, bad


# ------------------------------------------------------------------------------------------------ a toy method
@dataclass(kw_only=True)
class ToyTrain(EngineConfig):
    steps: int = 4
    learning_rate: float = 1e-3


@dataclass(kw_only=True)
class ToyRecipe(Recipe):
    METHOD = "toy"
    patch_size: int = 32
    train: ToyTrain = field(default_factory=ToyTrain)

    @property
    def total_steps(self) -> int:
        return self.train.steps


class ToyPipeline(DiffusionPipeline):
    def __init__(self, unet: UNet2DModel, scheduler: DDPMScheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    @torch.no_grad()
    def __call__(self, n: int, num_inference_steps: int = 2, generator=None) -> np.ndarray:
        x = torch.randn((n, 3, 32, 32), generator=generator)
        self.scheduler.set_timesteps(num_inference_steps)
        for t in self.scheduler.timesteps:
            x = self.scheduler.step(self.unet(x, t).sample, t, x, generator=generator).prev_sample
        return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


class ToyTask(TrainingTask):
    def __init__(self, recipe, data, *, progress=True):
        super().__init__(recipe, data, progress=progress)
        self.store = PatchStore(data)
        self.scheduler = DDPMScheduler(num_train_timesteps=100)

    def build_model(self, accelerator, run, resuming):
        return UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                           down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                           norm_num_groups=4)

    def dataset(self):
        return NucleiPatchDataset(self.store, "train")

    def micro_loss(self, model, batch, g, step):
        x0 = batch["image"]
        t = torch.randint(0, 100, (x0.shape[0],), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = torch.nn.functional.mse_loss(model(self.scheduler.add_noise(x0, noise, t), t).sample, noise)
        return loss, {}, x0.shape[0]

    def export(self, model, ema, run):
        pipe = ToyPipeline(unet=ema_copy(model, ema), scheduler=self.scheduler)
        ckpt.write_atomically(run / "pipeline", lambda tmp: pipe.save_pretrained(tmp))


def toy_sample(pipe, prompts_file, out, *, num_inference_steps=2, seed=0, overwrite=False, **_):
    lines = [line for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    with SampleWriter(out, overwrite) as writer:
        for i, line in enumerate(lines):
            image = pipe(1, num_inference_steps, torch.Generator().manual_seed(seed + i))[0]
            writer.add(image, {"prompt": line, "seed": seed + i})
    return out


def test_a_toy_method_trains_resumes_and_samples_through_the_cli(hgsc_store, tmp_path):
    register_method(Method("toy", ToyRecipe, ToyTask, "toy", ToyPipeline, toy_sample, "prompts", "prompts"))
    assert get_method("toy").pipeline is ToyPipeline
    recipe = tmp_path / "toy.yaml"
    recipe.write_text("name: toy\nmethod: toy\ntrain: {steps: 4, batch_size: 2, checkpoint_every: 2, num_workers: 0}\n")
    cli = CliRunner()

    def train(out, *extra):
        res = cli.invoke(main, ["train", "--recipe", str(recipe), "--data", str(hgsc_store), "--out", str(out), *extra])
        assert res.exit_code == 0, res.output
        return [json.loads(r)["loss"] for r in (out / "losses.jsonl").read_text().splitlines()]

    whole = train(tmp_path / "whole")
    train(tmp_path / "cut", "--max-steps", "2")
    resumed = train(tmp_path / "cut", "--resume")
    assert len(whole) == 4 and resumed == whole  # exact resume, bit for bit

    (tmp_path / "prompts.txt").write_text("a\nb\nc\n")
    res = cli.invoke(main, ["sample", "--model", str(tmp_path / "whole"), "--prompts", str(tmp_path / "prompts.txt"),
                            "--steps", "2", "--out", str(tmp_path / "s")])
    assert res.exit_code == 0, res.output
    rows = [json.loads(r) for r in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a", "b", "c"] and len(list((tmp_path / "s" / "images").iterdir())) == 3
    res = cli.invoke(main, ["sample", "--model", str(tmp_path / "whole"), "--masks", str(hgsc_store), "--out",
                            str(tmp_path / "s2")])
    assert res.exit_code == 2 and "give --prompts FILE, not --masks" in res.output


class _SlowItems(torch.utils.data.Dataset):
    """A dataset that takes 100 ms per item: a loader slower than the toy's step."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        time.sleep(0.1)
        return self.inner[i]


def test_the_engine_reports_the_time_it_waits_for_data(hgsc_store, tmp_path):
    """TrainResult.data_wait_fraction: the share of the wall time spent in next(batches) (issue 13, item 3) — most of
    it when each batch of 2 takes 200 ms to load, far less with the store's own loader."""
    from histosynth.training.engine import fit

    train = ToyTrain(steps=6, batch_size=2, checkpoint_every=6, num_workers=0)
    recipe = ToyRecipe(name="toy", method="toy", train=train)

    class SlowToyTask(ToyTask):
        def dataset(self):
            return _SlowItems(super().dataset())

    fast = fit(ToyTask(recipe, hgsc_store, progress=False), tmp_path / "fast", progress=False)
    slow = fit(SlowToyTask(recipe, hgsc_store, progress=False), tmp_path / "slow", progress=False)
    assert slow.data_wait_seconds >= 6 * 0.2 and fast.data_wait_seconds < 0.5  # 6 batches of 2 items of 100 ms
    assert slow.data_wait_fraction > 0.3 and fast.data_wait_fraction < slow.data_wait_fraction - 0.2
    assert slow.images_per_second < fast.images_per_second


def test_the_engine_optimiser_is_fused_adamw_where_torch_has_it_and_steps_as_adamw(monkeypatch):
    """engine.adamw: torch's fused AdamW (CPU since torch 2.4, CUDA) with the recipe's settings, whose update equals
    the default implementation's; where torch refuses fused=True, the default one, not an error."""
    from histosynth.training.engine import adamw

    torch.manual_seed(0)
    fused_net, plain_net = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    plain_net.load_state_dict(fused_net.state_dict())
    settings = dict(lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    fused, plain = adamw(fused_net.parameters(), **settings), torch.optim.AdamW(plain_net.parameters(), **settings)
    assert fused.defaults["fused"] is True and not plain.defaults["fused"]
    x = torch.randn(8, 4)
    for _ in range(3):
        for net, opt in ((fused_net, fused), (plain_net, plain)):
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
    for a, b in zip(fused_net.parameters(), plain_net.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    class NoFused(torch.optim.AdamW):  # a torch or device without the fused kernel refuses fused=True
        def __init__(self, params, fused=None, **kwargs):
            if fused:
                raise RuntimeError("`fused=True` requires all the params to be floating point Tensors of supported "
                                   "devices")
            super().__init__(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", NoFused)
    fallback = adamw(plain_net.parameters(), **settings)
    assert isinstance(fallback, NoFused) and not fallback.defaults["fused"] and fallback.defaults["lr"] == 1e-2
