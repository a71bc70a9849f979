"""ZoomLDM: the magnification-aware summariser, the condition sampler (EDM), the training task on the engine, the
pipeline and `histosynth sample` with reference or generated conditions.

Real tissue: a 256 px corner of the bundled HGSC region read as a 20x single-level slide (plain PNG with --mpp 0.5),
tiled by `prepare slides --magnifications 20x,10x,5x --patch 32` and embedded by the offline EfficientNet-Lite0
(`histosynth embed`). Models are tiny; the checks are on behaviour, against independent computations.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DConditionModel, VQModel
from PIL import Image

from histosynth.diffusion.schedulers import sampling_scheduler
from histosynth.errors import HistosynthError
from histosynth.models.condition_sampler import ConditionTransformer
from histosynth.models.zoom_summariser import EmbeddingSummariser
from histosynth.recipes import recipe_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")

LEVELS = ("20x", "10x", "5x")
TINY_UNET = {"block_out_channels": [16, 32], "layers_per_block": 1, "attention_head_dim": [2, 2],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "cross_attention_dim": 16}
TINY_SUMMARISER = {"input_size": 16, "block_channels": [8, 8, 16, 16], "mag_embed_dim": 8, "vit_width": 16,
                   "vit_depth": 1, "vit_heads": 2}


def _summariser(arch="cnn", dim=12, **kw) -> EmbeddingSummariser:
    torch.manual_seed(0)
    args = dict(embed_dim=dim, magnifications=LEVELS, architecture=arch, input_size=32, block_channels=(8, 8, 16, 16),
                token_dim=24, mag_embed_dim=8, vit_width=16, vit_depth=1, vit_heads=2)
    args.update(kw)
    return EmbeddingSummariser(**args)


# ---------------------------------------------------------------------------------------------------- summariser
@pytest.mark.parametrize("arch", ["cnn", "vit"])
def test_summariser_shapes_and_magnification_changes_the_tokens(arch):
    s = _summariser(arch).eval()
    for block in getattr(s, "blocks", []):  # FiLM starts as the identity: give it weights, as training would
        torch.nn.init.normal_(block.film.weight, std=0.5)
    rng = np.random.default_rng(0)
    grids = [rng.random((2 ** k, 2 ** k, 12), dtype=np.float32) for k in range(3)]
    tokens = s(grids, torch.tensor([0, 1, 2]))
    assert tokens.shape == (3, (32 // 16) ** 2, 24) and s.num_tokens == 4
    same = [grids[1]] * 3
    by_level = s(same, torch.tensor([0, 1, 2]))
    assert not torch.allclose(by_level[0], by_level[1], atol=1e-4) and not torch.allclose(by_level[1], by_level[2], atol=1e-4)
    dropped = s(grids, torch.tensor([0, 1, 2]), drop=torch.tensor([False, True, False]))
    assert torch.equal(dropped[1], s.null_tokens) and torch.allclose(dropped[0], tokens[0])


def test_summariser_brings_every_grid_to_one_size_by_nearest_upsampling():
    """The stem (1x1 conv) applied before the nearest upsampling = applied after it (the paper's order)."""
    s = _summariser().eval()
    grid = np.random.default_rng(1).random((4, 4, 12), dtype=np.float32)
    ours = s.resize_grids([grid])[0]
    up = np.repeat(np.repeat(grid, 8, axis=0), 8, axis=1)  # 4 -> 32, independently
    paper = s.stem(torch.from_numpy(up).permute(2, 0, 1)[None])[0]
    assert ours.shape == (8, 32, 32) and torch.allclose(ours, paper, atol=1e-5)
    with pytest.raises(ValueError, match="magnification 2.5x is not one of the model's"):
        s.level_index("2.5x")


# ---------------------------------------------------------------------------------------------- condition sampler
def test_condition_sampler_overfits_a_few_real_summaries():
    """Trained (x0 on the linear DDPM schedule) on 3 summaries, DDIM samples land on them, at their magnification."""
    from histosynth.pipelines.zoomldm import sample_condition_tokens

    s = _summariser().eval()
    rng = np.random.default_rng(2)
    with torch.no_grad():
        targets = s([rng.random((2 ** k, 2 ** k, 12), dtype=np.float32) for k in (0, 1, 2)], torch.tensor([0, 1, 2]))
    mean = targets.mean(0)
    torch.manual_seed(0)
    model = ConditionTransformer(num_tokens=4, token_dim=24, num_magnifications=3, width=64, depth=2, heads=4,
                                 data_std=float((targets - mean).pow(2).mean().sqrt()))
    model.data_mean.copy_(mean)
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="sample")
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    x0 = model.standardise(targets)
    g = torch.Generator().manual_seed(0)
    for _ in range(400):
        i = torch.randint(0, 3, (16,), generator=g)
        t = torch.randint(0, 1000, (16,), generator=g)
        noisy = sched.add_noise(x0[i], torch.randn(16, 4, 24, generator=g), t)
        loss = torch.nn.functional.mse_loss(model(noisy, t, i), x0[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    ddim = DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type="sample", clip_sample=False)
    model.eval()
    levels = torch.tensor([0, 1, 2, 0, 1, 2])
    drawn = sample_condition_tokens(model, ddim, levels, 50, torch.Generator().manual_seed(3))
    err = (drawn - targets[levels]).pow(2).mean(dim=(1, 2)).sqrt()
    spread = (targets[:, None] - targets[None]).pow(2).mean(dim=(2, 3)).sqrt()
    assert float(err.max()) < 0.2 * float(spread[spread > 0].min()), (err, spread)
    # fewer steps with a multistep solver swapped in on the same schedule land there too
    dpm = sampling_scheduler("dpm-solver++", ddim.config)
    drawn = sample_condition_tokens(model, dpm, levels, 10, torch.Generator().manual_seed(3))
    err = (drawn - targets[levels]).pow(2).mean(dim=(1, 2)).sqrt()
    assert float(err.max()) < 0.2 * float(spread[spread > 0].min()), (err, spread)


def test_condition_sampler_runs_any_x0_scheduler_by_name_for_exactly_the_steps_asked():
    """Every scheduler of the recipes' ConditionSchedulerName runs N model calls and gives finite tokens; DDIM equals a
    hand-written DDIM η = 0 loop on x0 predictions; euler-ancestral (no x0 stepping in diffusers) is refused by name."""
    import typing

    from histosynth.diffusion.schedulers import SCHEDULERS
    from histosynth.pipelines.zoomldm import sample_condition_tokens
    from histosynth.recipes.zoomldm import ConditionSchedulerName

    torch.manual_seed(0)
    model = ConditionTransformer(num_tokens=4, token_dim=8, num_magnifications=2, width=32, depth=1, heads=4,
                                 data_std=0.7).eval()
    calls = []
    forward = model.forward
    model.forward = lambda x, t, levels: (calls.append(float(t)), forward(x, t, levels))[1]
    trained = DDIMScheduler(beta_schedule="linear", prediction_type="sample", clip_sample=False)
    levels = torch.tensor([0, 1, 1])
    names = typing.get_args(ConditionSchedulerName)
    assert set(SCHEDULERS) - set(names) == {"euler-ancestral"}
    for name in names:
        calls.clear()
        tokens = sample_condition_tokens(model, sampling_scheduler(name, trained.config), levels, 7,
                                         torch.Generator().manual_seed(1))
        assert len(calls) == 7 and tokens.shape == (3, 4, 8) and torch.isfinite(tokens).all(), name
    with pytest.raises(HistosynthError, match="euler-ancestral scheduler cannot step a model that predicts 'sample'"):
        sampling_scheduler("euler-ancestral", trained.config)

    # DDIM, η = 0, by hand: x0 = f(x_t); x_prev = sqrt(ᾱ_prev)·x0 + sqrt(1 − ᾱ_prev)·(x_t − sqrt(ᾱ_t)·x0)/sqrt(1 − ᾱ_t)
    x = torch.randn((3, 4, 8), generator=torch.Generator().manual_seed(1))
    abar = trained.alphas_cumprod.double()
    step = 1000 // 7
    with torch.no_grad():
        for t in range(6 * step, -1, -step):
            x0 = forward(x, torch.tensor(t), levels).double()
            prev = abar[t - step] if t - step >= 0 else torch.tensor(1.0, dtype=torch.float64)
            eps = (x.double() - abar[t].sqrt() * x0) / (1 - abar[t]).sqrt()
            x = (prev.sqrt() * x0 + (1 - prev).sqrt() * eps).float()
    ddim = sample_condition_tokens(model, trained, levels, 7, torch.Generator().manual_seed(1))
    assert torch.allclose(ddim, model.unstandardise(x), atol=1e-4)
    with pytest.raises(HistosynthError, match=r"condition_steps \(--condition-steps\) must be within 1\.\.1000"):
        sample_condition_tokens(model, trained, levels, 0)


# ------------------------------------------------------------------------------------------------------ pipeline
def _tiny_pipeline(with_sampler: bool):
    from histosynth.pipelines.zoomldm import ZoomLDMPipeline

    torch.manual_seed(0)
    vae = VQModel(block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=3,
                  num_vq_embeddings=64, norm_num_groups=4, scaling_factor=1.0, sample_size=32)
    u = TINY_UNET
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=u["block_out_channels"],
                                layers_per_block=1, attention_head_dim=u["attention_head_dim"], cross_attention_dim=24,
                                down_block_types=u["down_block_types"], up_block_types=u["up_block_types"],
                                norm_num_groups=8)
    sampler = scheduler = None
    if with_sampler:
        sampler = ConditionTransformer(num_tokens=4, token_dim=24, num_magnifications=3, width=32, depth=1, heads=4,
                                       data_std=0.5)
        sampler.data_mean.normal_()
        scheduler = DDIMScheduler(beta_schedule="linear", prediction_type="sample", clip_sample=False)
    from histosynth.diffusion.schedulers import ldm_ddim_scheduler

    return ZoomLDMPipeline(unet=unet, vae=vae, scheduler=ldm_ddim_scheduler(1000, "scaled_linear", 0.0015, 0.0195),
                           summariser=_summariser().eval(), condition_sampler=sampler, condition_scheduler=scheduler,
                           base_magnification="20x", patch_size=32, embeddings={"name": "t", "encoder": "t", "dim": 12},
                           sampling={"num_inference_steps": 3, "guidance_scale": 1.75, "eta": 0.0, "condition_steps": 4})


@pytest.mark.parametrize("with_sampler", [True, False])
def test_pipeline_save_load_gives_the_same_images(tmp_path, with_sampler):
    from histosynth.pipelines.zoomldm import ZoomLDMPipeline

    pipe = _tiny_pipeline(with_sampler)
    pipe.save_pretrained(tmp_path / "p")
    again = ZoomLDMPipeline.from_pretrained(tmp_path / "p")
    grid = np.random.default_rng(0).random((2, 2, 12), dtype=np.float32)
    for p in (pipe, again):
        p.set_progress_bar_config(disable=True)
    a = pipe(grids=[grid], generator=torch.Generator().manual_seed(1))
    b = again(grids=[grid], generator=torch.Generator().manual_seed(1))
    assert a.magnifications == ["10x"] and a.condition_source == "reference"  # 2x2 grid = 10x
    assert a.images.shape == (1, 32, 32, 3) and a.images.dtype == np.uint8 and np.array_equal(a.images, b.images)
    if with_sampler:
        assert torch.equal(again.condition_sampler.data_mean, pipe.condition_sampler.data_mean)
        c = pipe(magnification="5x", num_images=2, generator=[torch.Generator().manual_seed(s) for s in (4, 5)])
        d = again(magnification="5x", num_images=2, generator=[torch.Generator().manual_seed(s) for s in (4, 5)])
        assert c.condition_source == "sampled" and np.array_equal(c.images, d.images)
        assert np.allclose(c.conditions, d.conditions, atol=1e-4) and c.conditions.shape == (2, 4, 24)
        # `sample --precision bf16` casts the image UNet only: the condition sampler draws the same tokens in fp32
        from histosynth.diffusion.runtime import denoiser_precision

        denoiser_precision(pipe, "bf16")
        low = pipe(magnification="5x", num_images=2, generator=[torch.Generator().manual_seed(s) for s in (4, 5)])
        assert pipe.unet.dtype == torch.bfloat16 and pipe.condition_sampler.dtype == torch.float32
        assert np.array_equal(low.conditions, c.conditions) and np.abs(low.images.astype(int) - c.images).mean() < 8
    else:
        assert again.condition_sampler is None
        with pytest.raises(HistosynthError, match="no condition sampler"):
            again(magnification="5x", num_images=1)
    with pytest.raises(HistosynthError, match=r"grid 0 has shape \(2, 2, 7\); at 10x the model takes \(2, 2, 12\)"):
        pipe(grids=[grid[..., :7]], magnification="10x")
    with pytest.raises(HistosynthError, match="2.5x is not one of the model's"):
        pipe(grids=[np.zeros((8, 8, 12), np.float32)])


def test_ddim_step_range_is_checked_before_sampling():
    """LDM's DDIM ("leading", steps_offset 1, T = 1000) runs 1..999 steps; the check names --steps and the range."""
    from histosynth.diffusion.sampling_loop import check_num_steps, max_num_steps
    from histosynth.diffusion.schedulers import ldm_ddim_scheduler

    scheduler = ldm_ddim_scheduler(1000, "scaled_linear", 0.0015, 0.0195)
    assert max_num_steps(scheduler) == 999
    for ok in (1, 50, 500, 999):
        check_num_steps(scheduler, ok)
    for bad in (0, 1000, 2000):
        with pytest.raises(HistosynthError, match=rf"--steps\) must be within 1\.\.999 .* got {bad}"):
            check_num_steps(scheduler, bad)
    pipe = _tiny_pipeline(False)
    with pytest.raises(HistosynthError, match="within 1..999"):
        pipe(grids=[np.zeros((1, 1, 12), np.float32)], num_inference_steps=1000)


# ------------------------------------------------------------------------------------------ store, embed, train
@pytest.fixture(scope="module")
def zoom_store(tmp_path_factory) -> Path:
    """The bundled HGSC region's 256 px corner as a 20x slide (PNG + --mpp 0.5), 32 px patches at 20x, 10x, 5x
    (64 + 16 + 4), embedded by the offline EfficientNet-Lite0."""
    from histosynth.cli import main
    from histosynth.quickstart import bundled_sample

    root = tmp_path_factory.mktemp("zoom")
    image = next(p for p in Path(bundled_sample()).rglob("*.jpg"))
    Image.open(image).convert("RGB").crop((0, 0, 256, 256)).save(root / "corner.png")
    runner = CliRunner()
    r = runner.invoke(main, ["prepare", "slides", str(root / "corner.png"), "--out", str(root / "store"), "--patch", "32",
                             "--magnifications", "20x,10x,5x", "--mpp", "0.5", "--tissue-threshold", "0"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["embed", str(root / "store"), "--batch-size", "32"])
    assert r.exit_code == 0, r.output
    return root / "store"


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ae") / "vq"
    _tiny_pipeline(False).vae.save_pretrained(out)
    return out


def zoom_recipe(autoencoder: Path, **train):
    t = {"steps": 4, "learning_rate": 1e-3, "lr_warmup_steps": 2, "batch_size": 4, "checkpoint_every": 2,
         "keep_checkpoints": 10, "log_every": 1, "num_workers": 0, "ema_decay": 0.9, "seed": 5, "condition_dropout": 0.3}
    t.update(train)
    return recipe_from_dict({"name": "zoom-test", "method": "zoomldm", "patch_size": 32,
                             "autoencoder": {"path": str(autoencoder)}, "unet": TINY_UNET, "summariser": TINY_SUMMARISER,
                             "train": t, "sampling": {"num_inference_steps": 3, "guidance_scale": 1.75}})


def _losses(run: Path) -> list[dict]:
    return [json.loads(r) for r in (run / "losses.jsonl").read_text().splitlines() if r]


@pytest.fixture(scope="module")
def zoom_run(zoom_store, vq_dir, tmp_path_factory) -> Path:
    from histosynth.training import fit
    from histosynth.training.zoomldm import ZoomLDMTask

    run = tmp_path_factory.mktemp("runs") / "zoom"
    fit(ZoomLDMTask(zoom_recipe(vq_dir), zoom_store, progress=False), run, progress=False)
    return run


def test_zoomldm_resumes_exactly(zoom_store, vq_dir, zoom_run, tmp_path):
    from histosynth.training import fit
    from histosynth.training.zoomldm import ZoomLDMTask

    recipe = zoom_recipe(vq_dir)
    fit(ZoomLDMTask(recipe, zoom_store, progress=False), tmp_path / "run", max_steps=2, progress=False)
    fit(ZoomLDMTask(recipe, zoom_store, progress=False), tmp_path / "run", resume=True, progress=False)
    assert [r["loss"] for r in _losses(tmp_path / "run")] == [r["loss"] for r in _losses(zoom_run)]
    assert [r["step"] for r in _losses(zoom_run)] == [1, 2, 3, 4]


def test_training_grids_are_the_patches_windows_flipped_with_them(zoom_store, vq_dir):
    from histosynth.conditions.slide_embeddings import SlideEmbeddings
    from histosynth.data.store import PatchStore
    from histosynth.training.zoomldm import ZoomLDMTask, balanced_positions, flip_grid

    task = ZoomLDMTask(zoom_recipe(vq_dir), zoom_store, progress=False)
    store, emb = PatchStore(zoom_store), SlideEmbeddings.open(zoom_store)
    assert sorted(set(task.levels.tolist())) == [0, 1, 2]
    assert np.bincount(task.levels).tolist() == [64, 16, 4]
    row = next(r for r in store.records if r["magnification"] == "5x")
    grid = np.asarray(emb.grid(row))
    assert grid.shape == (4, 4, emb.dim)
    assert np.array_equal(flip_grid(grid, 3), grid[::-1, ::-1]) and np.array_equal(flip_grid(grid, 1), grid[:, ::-1])
    # level balance: weights 1:1:2 → about a quarter of an epoch at 20x, a quarter at 10x, half at 5x
    pos = balanced_positions(task.levels, [1, 1, 2], seed=0)
    share = np.bincount(task.levels[pos], minlength=3) / len(pos)
    assert len(pos) == 84 and np.allclose(share, [0.25, 0.25, 0.5], atol=0.02)
    assert np.array_equal(balanced_positions(task.levels, None, 0), np.arange(84))


def test_sample_cli_with_reference_and_with_the_condition_sampler(zoom_store, zoom_run, tmp_path):
    from histosynth.cli import main
    from histosynth.training import fit
    from histosynth.training.zoomldm_conditions import ZoomConditionsTask

    runner = CliRunner()
    out = tmp_path / "ref"
    r = runner.invoke(main, ["sample", "--model", str(zoom_run), "--reference", str(zoom_store), "--num", "2",
                             "--steps", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [x["magnification"] for x in rows] == ["20x", "20x", "10x", "10x", "5x", "5x"]
    assert all(x["condition"] == "reference" and (out / "reference" / f"{x['name']}.png").is_file() for x in rows)
    assert Image.open(out / "grid.png").size[1] > Image.open(out / "grid.png").size[0] / 4 * 2  # one row per level
    r = runner.invoke(main, ["sample", "--model", str(zoom_run), "--reference", str(zoom_store), "--steps", "1000",
                             "--out", str(tmp_path / "too-many")])  # LDM's DDIM: 1000 steps would start at t = 1000
    assert r.exit_code == 2 and "--steps must be within 1..999" in r.output and not (tmp_path / "too-many").exists()
    r = runner.invoke(main, ["sample", "--model", str(zoom_run), "--magnification", "5x", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "no condition sampler" in r.output
    r = runner.invoke(main, ["sample", "--model", str(zoom_run), "--magnification", "40x", "--reference",
                             str(zoom_store), "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "--magnification: 40x is not one of the model's magnifications" in r.output

    recipe = recipe_from_dict({"name": "cond-test", "method": "zoomldm-conditions", "zoomldm": str(zoom_run),
                               "model": {"width": 32, "depth": 1, "heads": 4},
                               "sampling": {"num_inference_steps": 3, "scheduler": "unipc"},
                               "train": {"steps": 3, "batch_size": 8, "checkpoint_every": 3, "log_every": 1,
                                         "num_workers": 0, "lr_warmup_steps": 1}})
    cond_run = tmp_path / "cond"
    fit(ZoomConditionsTask(recipe, zoom_store, progress=False), cond_run, progress=False)
    from histosynth.diffusion.schedulers import scheduler_name
    from histosynth.pipelines.zoomldm import ZoomLDMPipeline

    saved = ZoomLDMPipeline.from_pretrained(cond_run).condition_scheduler
    assert scheduler_name(saved) == "unipc"  # the recipe's, saved: pipe(...) in Python samples with it too
    back = sampling_scheduler("ddim", saved.config)  # --condition-scheduler ddim on that saved pipeline
    back.set_timesteps(7)
    assert back.timesteps.tolist() == [k * (1000 // 7) for k in reversed(range(7))]  # the paper's DDIM: leading, +0
    assert float(back.final_alpha_cumprod) == 1.0  # ᾱ₀ = 1: its last step returns the predicted x0
    out = tmp_path / "gen"
    r = runner.invoke(main, ["sample", "--model", str(cond_run), "--magnification", "20x,5x", "--num", "2",
                             "--steps", "2", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert [x["magnification"] for x in rows] == ["20x", "20x", "5x", "5x"]
    assert {x["condition"] for x in rows} == {"sampled"} and len(list((out / "images").glob("*.png"))) == 4
    assert {(x["condition_scheduler"], x["condition_steps"]) for x in rows} == {("unipc", 3)}  # the recipe's
    out = tmp_path / "gen-dpm"
    r = runner.invoke(main, ["sample", "--model", str(cond_run), "--magnification", "10x", "--num", "2", "--steps", "2",
                             "--condition-scheduler", "dpm-solver++", "--condition-steps", "5", "--out", str(out)])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert {(x["condition_scheduler"], x["condition_steps"]) for x in rows} == {("dpm-solver++", 5)}
    r = runner.invoke(main, ["sample", "--model", str(cond_run), "--reference", str(zoom_store), "--condition-steps", "5",
                             "--out", str(tmp_path / "z")])
    assert r.exit_code == 2 and "--condition-steps: only without a reference store (--reference)" in r.output
    r = runner.invoke(main, ["sample", "--model", str(cond_run), "--magnification", "5x", "--condition-steps", "1001",
                             "--out", str(tmp_path / "z")])
    assert r.exit_code == 2 and "--condition-steps must be within 1..999 for this model's unipc" in r.output, r.output
    assert not (tmp_path / "z").exists()


def test_a_killed_reference_run_saved_the_settings_of_earlier_versions_and_continues(zoom_store, zoom_run, tmp_path,
                                                                                     monkeypatch):
    """The condition-sampler options are saved only when given, so a partial run written before they existed (source
    = magnification + reference) is continued by the same command, not refused as "other settings"."""
    from histosynth.cli import main
    from histosynth.pipelines.zoomldm import ZoomLDMPipeline
    from histosynth.sampling.writer import RESUME, partial_folder

    real_call, calls = ZoomLDMPipeline.__call__, []

    def crash_on_second(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real_call(self, *a, **k)

    out = tmp_path / "ref"
    args = ["sample", "--model", str(zoom_run), "--reference", str(zoom_store), "--num", "2", "--steps", "2",
            "--batch-size", "2", "--out", str(out)]
    monkeypatch.setattr(ZoomLDMPipeline, "__call__", crash_on_second)
    assert isinstance(CliRunner().invoke(main, args).exception, RuntimeError)
    saved = json.loads((partial_folder(out) / RESUME / "settings.json").read_text())
    assert sorted(saved["source"]) == ["magnification", "reference"]
    calls.clear()
    monkeypatch.setattr(ZoomLDMPipeline, "__call__", lambda self, *a, **k: (calls.append(1), real_call(self, *a, **k))[1])
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    assert len((out / "samples.jsonl").read_text().splitlines()) == 6
    assert len(calls) == 2  # the finished first batch (of 3) is kept, not drawn again


def test_fid_per_magnification_is_zero_on_the_real_patches_and_counts_each_level(zoom_store, tmp_path):
    """A 'generated' folder holding exactly the store's 10x and 5x patches: FD 0 at both levels (the real side is all
    of that level), the image counts per level as stored; a level only one side has is left out."""
    from histosynth.cli import main
    from histosynth.data.store import PatchStore

    store = PatchStore(zoom_store)
    (tmp_path / "gen" / "images").mkdir(parents=True)
    rows = []
    for i, row in enumerate(store.records):
        if row["magnification"] in ("10x", "5x"):
            Image.fromarray(np.asarray(store[i]["image"])).save(tmp_path / "gen" / "images" / f"{i:05d}.png")
            rows.append(json.dumps({"image": f"images/{i:05d}.png", "magnification": row["magnification"]}))
    (tmp_path / "gen" / "samples.jsonl").write_text("\n".join(rows) + "\n")
    r = CliRunner().invoke(main, ["evaluate", "fid-per-magnification", "--real", str(zoom_store), "--generated",
                                  str(tmp_path / "gen"), "--features", "effnet-lite0", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    result = json.loads(r.output[r.output.index("{"):])["per_magnification"]
    assert sorted(result) == ["10x", "5x"]
    assert (result["10x"]["generated"], result["10x"]["real"], result["5x"]["real"]) == (16, 16, 4)
    # a manifest cut off mid-line (a copy interrupted, say): one line naming the file and the line, no traceback
    (tmp_path / "gen" / "samples.jsonl").write_text(rows[0] + "\n" + rows[1][:20] + "\n")
    r = CliRunner().invoke(main, ["evaluate", "fid-per-magnification", "--real", str(zoom_store), "--generated",
                                  str(tmp_path / "gen"), "--features", "effnet-lite0", "--device", "cpu"])
    assert r.exit_code == 2 and "samples.jsonl" in r.stderr and "line 2 is not JSON" in r.stderr, r.output
    assert abs(result["10x"]["fd"]) < 1e-3 and abs(result["5x"]["fd"]) < 1e-3
