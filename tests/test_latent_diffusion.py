"""Latent diffusion (PathLDM): the training loop on the shared engine, exact resume, the pipeline, UNet init.

The autoencoders are tiny random diffusers models built here (save_pretrained), the data real HGSC tissue
(a 256 px corner of the bundled region as 16 patches of 32 px at 10x) with label-derived captions, the
text encoder the offline MiniLM.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import AutoencoderKL, UNet2DConditionModel, VQModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

from histosynth.conditions.text import ClassConditioner, TextConditioner
from histosynth.diffusion import checkpoint as ckpt
from histosynth.training.pathldm import train_latent
from histosynth.diffusion.unet_init import init_unet_from
from histosynth.errors import DataError, HistosynthError
from histosynth.diffusion.guidance import classifier_free_guidance
from histosynth.pipelines.pathldm import PathLDMPipeline, ldm_ddim_scheduler
from histosynth.recipes import load_recipe, recipe_from_dict

TINY_UNET = {"block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": [2, 2],
             "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
             "norm_num_groups": 8}


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These models are tiny: one thread is faster, and far faster on a shared, oversubscribed CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """16 real 32 px patches at 10x (a 256 px corner of the HGSC region at 20x), all train, + label captions."""
    from histosynth.conditions.captions import label_captions_from_store, write_jsonl
    from histosynth.data.formats import read_nuclei
    from histosynth.data.prepare_labelled import prepare_nuclei
    from histosynth.quickstart import bundled_sample

    (region,) = read_nuclei("folder", bundled_sample(), magnification="20x")
    crop = (slice(600, 856), slice(600, 856))
    part = replace(region, image=region.image[crop], inst_map=region.inst_map[crop], type_map=region.type_map[crop],
                   split="train")
    out = tmp_path_factory.mktemp("ldm") / "hgsc-corner"
    prepare_nuclei([part], out, patch=32, overlap=0.0, magnification="10x", progress=False)
    write_jsonl(label_captions_from_store(out), out / "captions.jsonl")
    return out


def _vq(channels: int = 3) -> VQModel:
    torch.manual_seed(0)
    return VQModel(block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                   up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=channels,
                   num_vq_embeddings=64, norm_num_groups=4, scaling_factor=1.0, sample_size=32)


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ae") / "vq"
    _vq().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def minilm() -> TextConditioner:
    return TextConditioner.from_pretrained("minilm", max_tokens=16)


def ldm_recipe(autoencoder: Path, kind: str = "text", **train):
    t = {"steps": 8, "learning_rate": 1e-3, "lr_warmup_steps": 3, "batch_size": 4, "checkpoint_every": 2,
         "keep_checkpoints": 10, "log_every": 1, "num_workers": 0, "ema_decay": 0.9, "seed": 5}
    t.update(train)
    return recipe_from_dict({
        "name": "ldm-micro-test", "method": "ldm", "description": "tests", "patch_size": 32, "magnification": "10x",
        "autoencoder": {"path": str(autoencoder)},
        "conditioner": {"kind": kind, "text_encoder": "minilm", "max_tokens": 16, "tumor_type": "neoplastic",
                        "count_threshold": 3},
        "unet": {**TINY_UNET, "cross_attention_dim": 384 if kind == "text" else 32},
        "train": t,
    })


def _losses(run: Path) -> list[dict]:
    return [json.loads(r) for r in (run / "losses.jsonl").read_text().splitlines() if r]


def _tiny_unet(in_channels: int = 3, cross_attention_dim: int = 32) -> UNet2DConditionModel:
    torch.manual_seed(1)
    u = TINY_UNET
    return UNet2DConditionModel(sample_size=8, in_channels=in_channels, out_channels=in_channels,
                                block_out_channels=tuple(u["block_out_channels"]), layers_per_block=u["layers_per_block"],
                                attention_head_dim=tuple(u["attention_head_dim"]), down_block_types=tuple(u["down_block_types"]),
                                up_block_types=tuple(u["up_block_types"]), norm_num_groups=u["norm_num_groups"],
                                cross_attention_dim=cross_attention_dim)


def _class_pipeline() -> PathLDMPipeline:
    torch.manual_seed(2)
    conditioner = ClassConditioner(4, 32, ("a", "b", "c", "d"))
    return PathLDMPipeline(unet=_tiny_unet(), vae=_vq(), scheduler=ldm_ddim_scheduler(1000, "scaled_linear", 0.0015, 0.0195),
                           conditioner=conditioner)


# ------------------------------------------------------------------------------------------------ recipes
def test_builtin_ldm_recipes_load_and_unknown_keys_are_refused(tmp_path):
    paper = load_recipe("pathldm-256")
    assert paper.method == "pathldm" and paper.unet.block_out_channels == (192, 384, 576, 960)
    assert (paper.diffusion.beta_schedule, paper.diffusion.beta_start, paper.diffusion.beta_end) == ("scaled_linear", 0.0015, 0.0195)
    assert (paper.sampling.guidance_scale, paper.sampling.num_inference_steps) == (1.75, 20)  # paper 50
    assert paper.conditioner.max_tokens == 154 and paper.train.condition_dropout == 0.1
    assert load_recipe("pathldm-tiny-cpu").conditioner.text_encoder == "minilm"
    assert load_recipe("pathldm-tiny-cpu-class").conditioner.kind == "class"
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmethod: ldm\ndescription: d\npatch_size: 32\nmagnification: 10x\n"
                   "autoencoder: {path: ae}\ntrain: {steps: 1, learning_rat: 0.1}\n")
    with pytest.raises(HistosynthError, match=r"bad.yaml.*unknown recipe key\(s\) train.learning_rat"):
        load_recipe(bad)


# ------------------------------------------------------------------------------------------------ training
def test_tiny_ldm_overfits_a_few_latents(store, vq_dir, tmp_path):
    recipe = ldm_recipe(vq_dir, steps=250, learning_rate=3e-3, lr_warmup_steps=0, condition_dropout=0.0,
                        random_flips=False, checkpoint_every=1000, ema_decay=0.0)
    train_latent(recipe, store, tmp_path / "run", progress=False)
    rows = _losses(tmp_path / "run")
    first = sum(r["loss"] for r in rows[:10]) / 10
    last = sum(r["loss"] for r in rows[-30:]) / 30
    assert last < 0.3 * first, (first, last)
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert len(list((tmp_path / "run" / "cache").glob("latents-*.npy"))) == 1
    assert len(list((tmp_path / "run" / "cache").glob("text-*.npy"))) == 1


def _cli_train(recipe_file: Path, store: Path, run: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "histosynth.cli", "train", "--recipe", str(recipe_file), "--data",
                             str(store), "--out", str(run), *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_gradient_checkpointing_recomputes_and_gives_the_same_training(store, vq_dir, tmp_path, monkeypatch):
    """train.gradient_checkpointing: the UNet's blocks run under torch's checkpoint (recomputed in the backward pass)
    and three steps end at the same weights as without it (fused AdamW in both)."""
    from safetensors.torch import load_file

    import torch.utils.checkpoint as tc

    calls = []
    original = tc.checkpoint
    monkeypatch.setattr(tc, "checkpoint", lambda *a, **k: calls.append(1) or original(*a, **k))
    weights = {}
    for on in (False, True):
        recipe = ldm_recipe(vq_dir, kind="class", steps=3, checkpoint_every=3, ema_decay=0.0, gradient_checkpointing=on)
        train_latent(recipe, store, tmp_path / str(on), progress=False)
        weights[on] = load_file(next((tmp_path / str(on) / "pipeline" / "unet").glob("*.safetensors")))
        assert bool(calls) == on
    assert weights[True].keys() == weights[False].keys()
    for key, value in weights[False].items():
        torch.testing.assert_close(weights[True][key], value, rtol=1e-4, atol=1e-5)


def test_latent_loop_resumes_exactly_after_sigkill(store, vq_dir, tmp_path):
    recipe = ldm_recipe(vq_dir, steps=400, checkpoint_every=4, condition_dropout=0.5)  # long: the kill lands mid-run
    recipe_file = tmp_path / "ldm.yaml"
    recipe_file.write_text(yaml.safe_dump(json.loads(json.dumps(recipe.to_dict()))))

    ref = _cli_train(recipe_file, store, tmp_path / "ref", "--max-steps", "8")  # through `histosynth train`
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-3000:]

    victim = _cli_train(recipe_file, store, tmp_path / "run")
    deadline = time.time() + 300
    while not ckpt.checkpoint_dir(tmp_path / "run", 4).exists():
        assert victim.poll() is None, victim.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    resumed = _cli_train(recipe_file, store, tmp_path / "run", "--resume", "--max-steps", "8")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-3000:]

    ref_rows, run_rows = _losses(tmp_path / "ref"), _losses(tmp_path / "run")
    assert [r["step"] for r in run_rows] == list(range(1, 9))
    assert [r["loss"] for r in run_rows] == [r["loss"] for r in ref_rows]
    assert [r["lr"] for r in run_rows] == [r["lr"] for r in ref_rows]
    assert ref_rows[0]["lr"] < ref_rows[3]["lr"] == 1e-3  # the warm-up is part of what is reproduced
    from safetensors.torch import load_file

    a = load_file(str(ckpt.checkpoint_dir(tmp_path / "ref", 8) / "ema.safetensors"))
    b = load_file(str(ckpt.checkpoint_dir(tmp_path / "run", 8) / "ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = replace(recipe, train=replace(recipe.train, seed=9))
    with pytest.raises(HistosynthError, match="recipe differs"):
        train_latent(other, store, tmp_path / "run", resume=True, progress=False)


def test_cached_and_on_the_fly_encoding_agree_with_a_kl_autoencoder(store, tmp_path):
    torch.manual_seed(0)
    kl = AutoencoderKL(block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                       up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=4,
                       norm_num_groups=4, sample_size=32, scaling_factor=0.5)
    kl.save_pretrained(tmp_path / "kl")
    cached = ldm_recipe(tmp_path / "kl", kind="class", steps=3, cache_dir=str(tmp_path / "shared"))
    fly = replace(cached, train=replace(cached.train, cache_latents=False))
    train_latent(cached, store, tmp_path / "a", progress=False)
    train_latent(fly, store, tmp_path / "b", progress=False)
    a, b = [r["loss"] for r in _losses(tmp_path / "a")], [r["loss"] for r in _losses(tmp_path / "b")]
    assert np.allclose(a, b, rtol=1e-4), (a, b)
    (latents,) = (tmp_path / "shared").glob("latents-*.npy")  # cache_dir: outside the run, shared by content key
    stamp = latents.stat().st_mtime_ns
    train_latent(replace(cached, train=replace(cached.train, seed=1)), store, tmp_path / "c", progress=False)
    assert list((tmp_path / "shared").glob("latents-*.npy")) == [latents] and latents.stat().st_mtime_ns == stamp
    pipe = PathLDMPipeline.from_pretrained(tmp_path / "a")
    assert pipe.unet.config.in_channels == 4 and pipe.config.latent_scaling_factor == 0.5
    assert pipe.conditioner.class_names[3] == "high neoplastic; high inflammatory"
    out = pipe(["high neoplastic; low inflammatory", 0], num_inference_steps=2, progress=False)
    assert out.images.shape == (2, 32, 32, 3) and out.images.dtype == np.uint8


def test_captions_of_another_store_are_refused(store, vq_dir, tmp_path):
    rows = [json.loads(r) for r in (store / "captions.jsonl").read_text().splitlines()]
    rows[3]["x"] += 1  # the row names another patch than the store's patch 3
    bad = tmp_path / "captions.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = ldm_recipe(vq_dir)
    recipe.conditioner.captions = str(bad)
    with pytest.raises(DataError, match=r"captions.jsonl: row 4: index 3 is .*another store"):
        train_latent(recipe, store, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # inputs are checked before the run directory is made


# ------------------------------------------------------------------------------------------------ pipeline
def test_pipeline_save_load_round_trip_gives_the_same_images(vq_dir, minilm, tmp_path):
    torch.manual_seed(3)
    pipe = PathLDMPipeline(unet=_tiny_unet(cross_attention_dim=384), vae=VQModel.from_pretrained(vq_dir),
                           scheduler=ldm_ddim_scheduler(1000, "scaled_linear", 0.0015, 0.0195), conditioner=minilm,
                           magnification="10x", patch_size=32)
    prompts = ["many neoplastic nuclei; few inflammatory nuclei", "no neoplastic nuclei"]
    before = pipe(prompts, num_inference_steps=4, generator=torch.Generator().manual_seed(7), progress=False).images
    pipe.save_pretrained(tmp_path / "pipe")
    assert (tmp_path / "pipe" / "conditioner" / "conditioner.json").is_file()
    loaded = PathLDMPipeline.from_pretrained(tmp_path / "pipe")
    after = loaded(prompts, num_inference_steps=4, generator=torch.Generator().manual_seed(7), progress=False).images
    assert np.array_equal(before, after)
    assert loaded.config.magnification == "10x" and loaded.conditioner.max_tokens == 16


def test_the_export_saves_the_recipes_scheduler_and_ddim_comes_back_exactly(store, vq_dir, tmp_path):
    """A recipe's ``sampling.scheduler`` is what the exported pipeline holds (so ``pipe(...)`` in Python samples with
    it); derived from LDM's DDIM, so ``ddim`` swapped back in by name is LDM's sampler again, after a save and load."""
    from diffusers import DPMSolverMultistepScheduler

    from histosynth.diffusion.schedulers import sampling_scheduler, scheduler_name
    from histosynth.training.latent import export_scheduler

    recipe = ldm_recipe(vq_dir, kind="class", steps=2, checkpoint_every=2)
    recipe.sampling = replace(recipe.sampling, scheduler="dpm-solver++")
    train_latent(recipe, store, tmp_path / "run", progress=False)
    pipe = PathLDMPipeline.from_pretrained(tmp_path / "run")
    assert isinstance(pipe.scheduler, DPMSolverMultistepScheduler) and scheduler_name(pipe.scheduler) == "dpm-solver++"
    assert pipe([0, 1], num_inference_steps=3, progress=False).images.shape == (2, 32, 32, 3)

    d = recipe.diffusion
    ldm = ldm_ddim_scheduler(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end, d.prediction_type)
    back = sampling_scheduler("ddim", pipe.scheduler.config)
    for s in (ldm, back):
        s.set_timesteps(7)
    assert back.timesteps.tolist() == ldm.timesteps.tolist()  # 1 + k·⌊1000/7⌋, "leading", steps_offset 1
    assert float(back.final_alpha_cumprod) == float(ldm.final_alpha_cumprod)  # set_alpha_to_one false survives
    assert not back.config.clip_sample
    recipe.sampling = replace(recipe.sampling, scheduler="ddim")
    assert dict(export_scheduler(recipe).config) == dict(ldm.config)  # the default export is LDM's DDIM itself


def test_unset_scheduler_is_the_one_the_saved_recipe_names():
    """A pipeline exported before the export saved the recipe's scheduler holds DDIM; `use_scheduler(pipe, None)` (every
    sampler's default) then swaps in the scheduler its saved recipe names; a given name wins."""
    from histosynth.diffusion.schedulers import use_scheduler

    pipe = _class_pipeline()
    assert use_scheduler(pipe, None) == "ddim"  # no sampling section: the pipeline's own
    pipe.register_to_config(sampling={"scheduler": "dpm-solver++"})
    assert use_scheduler(pipe, None) == "dpm-solver++"
    assert use_scheduler(pipe, "unipc") == "unipc"


def test_any_saved_scheduler_swaps_to_any_other_as_if_from_the_trained_ddim(tmp_path):
    """What a pipeline saved with the recipe's scheduler gives for every ``--scheduler`` name is what the same name gives
    on LDM's DDIM (the old saved scheduler): same timesteps, same final ᾱ, and no solver refuses another's config."""
    from histosynth.diffusion.schedulers import SCHEDULERS, sampling_scheduler

    ldm = ldm_ddim_scheduler(1000, "scaled_linear", 0.0015, 0.0195)
    wrong = []
    for saved_name in SCHEDULERS:
        saved = sampling_scheduler(saved_name, ldm.config)
        saved.save_pretrained(tmp_path / saved_name)
        loaded = type(saved).from_pretrained(tmp_path / saved_name)
        for name in SCHEDULERS:
            a, b = sampling_scheduler(name, loaded.config), sampling_scheduler(name, ldm.config)
            a.set_timesteps(7)
            b.set_timesteps(7)
            if a.timesteps.tolist() != b.timesteps.tolist() or \
                    float(getattr(a, "final_alpha_cumprod", 0)) != float(getattr(b, "final_alpha_cumprod", 0)):
                wrong.append(f"{saved_name} → {name}")
    assert not wrong, wrong


@pytest.mark.parametrize("steps", [1, 7, 50])
def test_ddim_runs_exactly_the_steps_asked(steps):
    pipe = _class_pipeline()
    calls = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda x, t, **kw: calls.append((x.shape[0], int(t))) or forward(x, t, **kw)
    out = pipe([0, 1, 2], num_inference_steps=steps, progress=False)
    assert out.num_steps_run == steps and len(calls) == steps
    assert all(b == 6 for b, _ in calls)  # one pass per step on the batched [null, cond] pair
    ts = [t for _, t in calls]
    assert ts == sorted(ts, reverse=True) and len(set(ts)) == steps and ts[-1] == 1  # LDM's DDIM: ..., 1 + ⌊1000/n⌋, 1
    with pytest.raises(HistosynthError, match="num_inference_steps"):
        pipe([0], num_inference_steps=0, progress=False)


def test_unset_settings_come_from_the_saved_recipe_and_given_ones_win(monkeypatch):
    """pipe(...) in Python samples as the recipe says (the saved ``sampling`` section), like `histosynth sample`;
    without that section the method's defaults (DDIM 20, g 1.75, η 0) run; given settings win over both."""
    import histosynth.pipelines.pathldm as module

    used, real = [], module.denoise_latents

    def recording(unet, scheduler, steps, batch, guidance_scale, **kw):
        used.append((steps, guidance_scale, kw["eta"], kw["encoder_hidden_states"].shape[0]))
        return real(unet, scheduler, steps, batch, guidance_scale, **kw)

    monkeypatch.setattr(module, "denoise_latents", recording)
    pipe = _class_pipeline()
    assert pipe([0, 1], progress=False).num_steps_run == 20
    pipe.register_to_config(sampling={"num_inference_steps": 3, "guidance_scale": 1.0, "eta": 0.5})
    assert pipe([0, 1], progress=False).num_steps_run == 3
    pipe([0, 1], num_inference_steps=4, guidance_scale=2.5, eta=0.0, progress=False)
    # (steps, g, η, context rows): guided runs batch [∅; y]; g = 1 runs the conditional model alone
    assert used == [(20, 1.75, 0.0, 4), (3, 1.0, 0.5, 2), (4, 2.5, 0.0, 4)]


def test_batched_guidance_equals_two_separate_passes():
    """One UNet pass on the stacked [∅; y] pair per step gives the latents of two passes (∅, then y) combined by
    ε(∅) + g·(ε(y) − ε(∅)), stepped by a DDIM of the same config (4 steps, g = 2.5)."""
    from diffusers import DDIMScheduler

    from histosynth.diffusion.latent_sampling import denoise_latents

    pipe = _class_pipeline()
    cond, null = pipe.encode_prompts([0, 3])
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    batched = denoise_latents(pipe.unet, pipe.scheduler, 4, 2, 2.5, latents=noise,
                              encoder_hidden_states=torch.cat([null, cond]))
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    x = noise.clone()
    with torch.no_grad():
        for t in scheduler.timesteps:
            e_null = pipe.unet(x, t, encoder_hidden_states=null).sample
            e_cond = pipe.unet(x, t, encoder_hidden_states=cond).sample
            x = scheduler.step(e_null + 2.5 * (e_cond - e_null), t, x).prev_sample
    torch.testing.assert_close(batched, x, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(x, noise)


def test_the_loop_feeds_the_unet_one_buffer_allocated_once():
    """No per-step re-allocation of the loop's own tensors: every step's UNet input is the same buffer, holding
    [x_t; x_t] (guidance) and DISC-style concat channels written once, in the UNet's dtype."""
    from histosynth.diffusion.latent_sampling import denoise_latents
    from histosynth.diffusion.sampling_loop import ModelInput

    pipe = _class_pipeline()
    seen = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda x, t, **kw: seen.append((x.data_ptr(), x.clone())) or forward(x, t, **kw)
    cond, null = pipe.encode_prompts([0, 3])
    denoise_latents(pipe.unet, pipe.scheduler, 4, 2, 2.5, encoder_hidden_states=torch.cat([null, cond]),
                    generator=torch.Generator().manual_seed(0))
    assert len(seen) == 4 and len({ptr for ptr, _ in seen}) == 1
    assert all(torch.equal(x[:2], x[2:]) for _, x in seen) and not torch.equal(seen[0][1], seen[-1][1])

    concat = torch.arange(2 * 2 * 3 * 3, dtype=torch.float32).reshape(4, 1, 3, 3)
    model_input = ModelInput((2, 3, 3, 3), 2, torch.bfloat16, "cpu", concat)
    for x in (torch.randn(2, 3, 3, 3), torch.randn(2, 3, 3, 3)):
        out = model_input(x)
        expected = torch.cat([torch.cat([x, x]), concat], dim=1).bfloat16()
        assert out.data_ptr() == model_input.buffer.data_ptr() and torch.equal(out, expected)


@pytest.mark.parametrize("name", ["ddpm", "dpm-solver++", "sde-dpm-solver++", "unipc", "deis", "euler",
                                  "euler-ancestral", "lms"])
def test_every_scheduler_runs_the_steps_asked_on_the_latent_loop(name):
    """Swapped in through the config (LDM's schedule and leading spacing kept): exactly n batched passes, finite
    images, the trained DDIM back unchanged afterwards."""
    from histosynth.diffusion.schedulers import use_scheduler

    pipe = _class_pipeline()
    trained = dict(pipe.scheduler.config)
    use_scheduler(pipe, name)
    assert pipe.scheduler.config.beta_end == trained["beta_end"] and pipe.scheduler.config.steps_offset == 1
    calls = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda x, t, **kw: calls.append((x.shape[0], float(t))) or forward(x, t, **kw)
    out = pipe([0, 1], num_inference_steps=6, output_type="pt", generator=torch.Generator().manual_seed(0),
               progress=False)
    assert out.num_steps_run == 6 and len(calls) == 6 and all(b == 4 for b, _ in calls)
    assert torch.isfinite(out.images).all() and out.images.shape == (2, 3, 32, 32)
    use_scheduler(pipe, "ddim")
    assert {k: v for k, v in pipe.scheduler.config.items() if k in trained} == trained


def test_guidance_formula_and_how_the_pipeline_uses_it():
    from histosynth.diffusion.guidance import guided_model_output

    eps_u, eps_c = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    g = 1.75
    assert torch.allclose(classifier_free_guidance(eps_u, eps_c, g), eps_u + g * (eps_c - eps_u))
    # NASDM's scale s is the same combination with g = s + 1
    assert torch.allclose(classifier_free_guidance(eps_u, eps_c, g), guided_model_output(eps_u, eps_c, g, 3), atol=1e-6)

    pipe = _class_pipeline()

    def run(prompts, g):
        return pipe(prompts, guidance_scale=g, num_inference_steps=3, generator=torch.Generator().manual_seed(0),
                    output_type="pt", progress=False).images

    # g = 0 is the unconditional model: the prompt does not matter; g = 1 and 1.75 follow the prompt
    assert torch.equal(run([0], 0.0), run([3], 0.0))
    assert not torch.equal(run([0], 1.0), run([3], 1.0))
    assert not torch.equal(run([0], 1.75), run([0], 1.0))
    calls = []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda x, t, **kw: calls.append(x.shape[0]) or forward(x, t, **kw)
    run([0, 1], 1.0)
    assert calls == [2, 2, 2]  # g = 1: the conditional pass alone


# ------------------------------------------------------------------------------------------------ UNet init
def test_init_from_a_checkpoint_with_other_latent_channels_names_the_file(tmp_path):
    _tiny_unet(in_channels=4).save_pretrained(tmp_path / "unet4")
    with pytest.raises(HistosynthError, match=r"unet4: this UNet takes 4 latent channels but the recipe's autoencoder gives 3"):
        init_unet_from(_tiny_unet(in_channels=3), tmp_path / "unet4")


def test_shape_matching_partial_init_reports_skipped_keys(tmp_path):
    source = _tiny_unet(cross_attention_dim=64)  # another text width: only the cross-attention K/V projections differ
    source.save_pretrained(tmp_path / "src")
    target = _tiny_unet(cross_attention_dim=32)
    initial = {k: v.clone() for k, v in target.state_dict().items()}
    report = init_unet_from(target, tmp_path / "src")
    skipped = {s.split(":")[0] for s in report.skipped}
    assert skipped and all(k.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for k in skipped)
    assert not report.missing and not report.dropped
    own, src = target.state_dict(), source.state_dict()
    assert all(torch.equal(own[k], src[k]) for k in report.loaded)
    assert all(torch.equal(own[k], initial[k]) for k in skipped)  # a skipped tensor keeps its initialisation
    assert "skipped" in report.summary() and "attn2.to_k.weight" in report.summary()


def _to_compvis(state: dict, layers: int) -> dict:
    """diffusers UNet tensors → CompVis LDM `model.diffusion_model.*` names (the inverse of diffusers' converter)."""
    top = DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"]
    res = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"), ("conv2", "out_layers.3"),
           ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection")]

    def resnet(rest):
        for a, b in res:
            if rest.startswith(a + "."):
                return b + rest[len(a):]
        raise KeyError(rest)

    up_attn = {int(k.split(".")[1]) for k in state if k.startswith("up_blocks.") and ".attentions." in k}
    out = {}
    for k, v in state.items():
        p = k.split(".")
        if k in top:
            name = top[k]
        elif p[0] == "down_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "downsamplers":
                name = f"input_blocks.{1 + b * (layers + 1) + layers}.0.op.{p[-1]}"
            else:
                i, rest = 1 + b * (layers + 1) + int(p[3]), ".".join(p[4:])
                name = f"input_blocks.{i}.0.{resnet(rest)}" if kind == "resnets" else f"input_blocks.{i}.1.{rest}"
        elif p[0] == "mid_block":
            rest = ".".join(p[3:])
            name = (f"middle_block.{2 * int(p[2])}.{resnet(rest)}" if p[1] == "resnets" else f"middle_block.1.{rest}")
        elif p[0] == "up_blocks":
            b, kind = int(p[1]), p[2]
            if kind == "upsamplers":
                name = f"output_blocks.{b * (layers + 1) + layers}.{2 if b in up_attn else 1}.conv.{p[-1]}"
            else:
                i, rest = b * (layers + 1) + int(p[3]), ".".join(p[4:])
                name = f"output_blocks.{i}.0.{resnet(rest)}" if kind == "resnets" else f"output_blocks.{i}.1.{rest}"
        else:
            raise KeyError(k)
        out["model.diffusion_model." + name] = v
    return out


class _LightningObject:
    """Stands for the callback objects a Lightning checkpoint pickles."""


def test_init_from_a_compvis_ldm_checkpoint_converts_and_drops_the_class_embedder(tmp_path):
    source = _tiny_unet()
    state = _to_compvis(source.state_dict(), layers=1)
    state["cond_stage_model.embedding.weight"] = torch.randn(5, 32)  # PathLDM's class embedder (4 classes + null)
    state["first_stage_model.encoder.conv_in.weight"] = torch.randn(8, 3, 3, 3)
    torch.save({"state_dict": state, "global_step": 10, "callbacks": {"ModelCheckpoint": _LightningObject()}},
               tmp_path / "ldm.ckpt")  # Lightning pickles objects next to the weights: read as placeholders
    target = _tiny_unet()
    torch.nn.init.zeros_(target.conv_in.weight)
    with pytest.warns(UserWarning, match="placeholders"):
        report = init_unet_from(target, tmp_path / "ldm.ckpt")
    assert not report.skipped and not report.missing
    assert set(report.dropped) == {"cond_stage_model.embedding.weight", "first_stage_model.encoder.conv_in.weight"}
    assert all(torch.equal(target.state_dict()[k], v) for k, v in source.state_dict().items())
    # a checkpoint of 4-channel latents is refused, naming it
    state4 = _to_compvis(_tiny_unet(in_channels=4).state_dict(), layers=1)
    torch.save({"state_dict": state4}, tmp_path / "four.ckpt")
    with pytest.raises(HistosynthError, match=r"four.ckpt: this UNet takes 4 latent channels"):
        init_unet_from(_tiny_unet(), tmp_path / "four.ckpt")


def test_training_starts_from_init_unet_and_writes_the_report(store, vq_dir, tmp_path):
    source = _tiny_unet(cross_attention_dim=64)
    source.save_pretrained(tmp_path / "src")
    recipe = ldm_recipe(vq_dir, kind="class", steps=1, init_unet=str(tmp_path / "src"))
    train_latent(recipe, store, tmp_path / "run", progress=False)
    report = json.loads((tmp_path / "run" / "init_report.json").read_text())
    assert report["source"] == str(tmp_path / "src") and report["loaded"] and report["skipped"]


# ------------------------------------------------------------------------------------------------ CLI
def test_sample_cli_writes_prompts_and_seeds_and_never_overwrites(store, vq_dir, tmp_path):
    from click.testing import CliRunner

    from histosynth.cli import main

    train_latent(ldm_recipe(vq_dir, steps=1), store, tmp_path / "run", progress=False)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("many neoplastic nuclei\n\nno nuclei\n")
    args = ["sample", "--model", str(tmp_path / "run"), "--prompts", str(prompts), "--steps", "2", "--out", str(tmp_path / "s")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()]
    assert [(r["prompt"], r["line"], r["seed"], r["num_inference_steps"], r["guidance_scale"]) for r in rows] == [
        ("many neoplastic nuclei", 1, 0, 2, 1.75), ("no nuclei", 3, 1, 2, 1.75)]
    assert (tmp_path / "s" / "grid.png").is_file() and (tmp_path / "s" / rows[1]["image"]).is_file()
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 2 and "--overwrite" in again.output
    unipc = CliRunner().invoke(main, [*args[:-1], str(tmp_path / "u"), "--scheduler", "unipc"])
    assert unipc.exit_code == 0, unipc.output
    assert {json.loads(x)["scheduler"] for x in (tmp_path / "u" / "samples.jsonl").read_text().splitlines()} == {"unipc"}
    assert {r["scheduler"] for r in rows} == {"ddim"}
    bad = CliRunner().invoke(main, [*args[:-1], str(tmp_path / "h"), "--scheduler", "heun"])
    assert bad.exit_code == 2 and "'heun' is not one of" in bad.output and "dpm-solver++" in bad.output
    masks = CliRunner().invoke(main, ["sample", "--model", str(tmp_path / "run"), "--masks", str(store), "--out", str(tmp_path / "m")])
    assert masks.exit_code == 2 and "--prompts" in masks.output


def test_bf16_denoiser_runs_the_unet_in_bf16_and_keeps_the_images(monkeypatch):
    """`sample --precision bf16`: the UNet's weights, input and output are bf16, the noise and the scheduler's sample
    stay float32, the VAE decodes float32, and the images are those of float32 up to bf16 rounding (mean |Δ| < 0.03
    on [0, 1]), not garbage."""
    from histosynth.diffusion.runtime import denoiser_precision, precision_of

    import histosynth.diffusion.latent_sampling as latent_sampling

    pipe = _class_pipeline()
    seen, guided, steps = [], [], []
    forward = pipe.unet.forward
    pipe.unet.forward = lambda x, t, **kw: (lambda out: seen.append(
        (x.dtype, kw["encoder_hidden_states"].dtype, out.sample.dtype)) or out)(forward(x, t, **kw))
    combine = latent_sampling.classifier_free_guidance
    monkeypatch.setattr(latent_sampling, "classifier_free_guidance",
                        lambda u, c, g: guided.append((u.dtype, c.dtype)) or combine(u, c, g))
    cls = type(pipe.scheduler)  # the loop steps a copy made from the config: spy on the class

    def images():
        return pipe([0, 3], num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(0),
                    progress=False).images

    full = images()
    assert set(seen) == {(torch.float32,) * 3} and precision_of(pipe.unet) == "fp32"
    seen.clear()
    decoded = []
    decode = pipe.vae.decode
    pipe.vae.decode = lambda z, **kw: decoded.append(z.dtype) or decode(z, **kw)
    casts = []
    cast = pipe.unet.to
    pipe.unet.to = lambda *a, **kw: casts.append(a) or cast(*a, **kw)
    assert denoiser_precision(pipe, "fp32") is pipe and casts == []  # already fp32: no cast (and no diffusers warning)
    assert denoiser_precision(pipe, "bf16") is pipe and precision_of(pipe.unet) == "bf16"
    assert casts == [(torch.bfloat16,)]
    del pipe.unet.to
    original = cls.step
    cls.step = lambda self, out, t, x, **kw: steps.append((out.dtype, x.dtype)) or original(self, out, t, x, **kw)
    try:
        low = images()
    finally:
        cls.step = original
    assert len(seen) == 4 and set(seen) == {(torch.bfloat16,) * 3} and low.dtype == torch.float32
    assert set(guided) == {(torch.float32, torch.float32)}  # guidance combines in float32
    assert len(steps) == 4 and set(steps) == {(torch.float32, torch.float32)}  # no bf16 rounding between steps
    assert decoded == [torch.float32] and pipe.vae.dtype == torch.float32  # fp16 decoding overflows
    assert torch.isfinite(low).all() and 0 < (low - full).abs().mean() < 0.03
    with pytest.raises(ValueError, match="precision must be one of"):
        denoiser_precision(pipe, "int8")


def test_precision_of_names_the_denoiser_dtype():
    from histosynth.diffusion.runtime import precision_of

    layer = torch.nn.Linear(2, 2)
    assert [precision_of(layer.to(d)) for d in (torch.float16, torch.float64, torch.float32)] == ["fp16", "float64",
                                                                                                     "fp32"]


def test_compile_module_freezes_on_a_cpu_only_for_inductor(monkeypatch):
    """On a CPU inductor compiles the denoiser with freezing in force while dynamo traces it (pre-packed weights:
    without it the compiled paper-size UNet was no faster than the eager one, docs/benchmarks.md), through the module's
    own call, and only then; a given mode compiles as asked. Inductor itself is replaced by a recorder (its C++ build
    takes minutes on 2 cores)."""
    import torch._inductor.compile_fx as compile_fx
    import torch._inductor.config as inductor_config
    from torch._dynamo.utils import is_parameter_freezing

    from histosynth.diffusion.runtime import compile_module

    frozen_while_compiling = []

    def recorder(gm, example_inputs, **kwargs):
        frozen_while_compiling.append(is_parameter_freezing())
        return gm.forward

    monkeypatch.setattr(compile_fx, "compile_fx", recorder)
    torch._dynamo.reset()
    layer, x = torch.nn.Linear(2, 2), torch.randn(3, 2)
    with torch.no_grad():
        for mode in (None, "max-autotune"):
            out = compile_module(layer, mode=mode)(x)
            torch.testing.assert_close(out, layer(x))
            torch._dynamo.reset()
    assert frozen_while_compiling == [True, False] and inductor_config.freezing is False
    assert compile_module(torch.nn.ReLU()) is not None  # a module without parameters compiles too


@pytest.mark.parametrize("name", ["dpm-solver++", "euler", "ddim"])
def test_the_sample_stays_float32_under_bf16_for_every_scheduler(name):
    """Several diffusers schedulers cast their step to the model output's dtype: the loop hands them float32, so a
    bf16 denoiser never rounds the sample itself to bf16 between steps."""
    from histosynth.diffusion.sampling_loop import denoise
    from histosynth.diffusion.schedulers import sampling_scheduler

    pipe = _class_pipeline()
    scheduler = sampling_scheduler(name, pipe.scheduler.config)
    dtypes = []

    def predict(x, t):
        dtypes.append(x.dtype)
        return (x * 0.5).bfloat16()  # a bf16 denoiser's output

    x = denoise(predict, scheduler, 5, torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)))
    assert x.dtype == torch.float32 and set(dtypes) == {torch.float32}


def test_compiled_denoiser_gives_the_eager_images():
    """`sample --compile`: pipe.unet becomes torch.compile's module (once), and the images are the eager ones."""
    from histosynth.diffusion.runtime import compile_denoiser

    pipe = _class_pipeline()

    def images():
        return pipe([1, 2], num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(5),
                    progress=False).images

    eager = images()
    compiled_unet = compile_denoiser(pipe, backend="aot_eager").unet  # inductor needs minutes of C++ on 2 cores
    assert isinstance(compiled_unet, torch._dynamo.eval_frame.OptimizedModule)
    assert compile_denoiser(pipe, backend="aot_eager").unet is compiled_unet
    torch.testing.assert_close(images(), eager, rtol=1e-4, atol=1e-4)


def test_deep_cache_runs_the_deep_blocks_every_nth_step_and_starts_each_batch_afresh():
    """DeepCache (`sample --deep-cache N`): interval 1 is the model itself; with N = 3 over 7 steps the deep blocks run
    at steps 1, 4, 7 (3 of 7 UNet calls), the images stay near the uncached ones, a second call (the next batch)
    starts with a full step (its images are those of a fresh run), and the UNet is restored afterwards."""
    from histosynth.diffusion.runtime import active_deep_cache, deep_cache

    pipe = _class_pipeline()
    deep_calls = []
    block = pipe.unet.up_blocks[0]
    block_forward = block.forward
    block.forward = lambda *a, **k: deep_calls.append(1) or block_forward(*a, **k)

    def images(labels=(0, 3), seed=0):
        return pipe(list(labels), num_inference_steps=7, output_type="pt", generator=torch.Generator().manual_seed(seed),
                    progress=False).images

    plain = images()
    assert len(deep_calls) == 7
    with deep_cache(pipe.unet, 1):
        torch.testing.assert_close(images(), plain, rtol=0, atol=0)
    deep_calls.clear()
    with deep_cache(pipe.unet, 3) as cache:
        assert active_deep_cache(pipe.unet) == 3
        cached = images()
        assert len(deep_calls) == 3 and cache.full_calls == 3
        other = images((1, 2), seed=9)  # the next batch: its first step is full again
        assert len(deep_calls) == 6
    deep_calls.clear()
    with deep_cache(pipe.unet, 3):
        torch.testing.assert_close(images((1, 2), seed=9), other)  # = a fresh run: nothing kept from the batch before
    assert 0 < (cached - plain).abs().mean() < 0.1
    assert active_deep_cache(pipe.unet) == 1 and "forward" not in pipe.unet.__dict__
    deep_calls.clear()
    torch.testing.assert_close(images(), plain)
    assert len(deep_calls) == 7
    with pytest.raises(ValueError, match="interval must be at least 1"):
        deep_cache(pipe.unet, 0)
    with pytest.raises(ValueError, match="torch.compile"):
        deep_cache(torch.compile(pipe.unet), 2)
    with deep_cache(pipe.unet, 2), pytest.raises(ValueError, match="already under deep_cache"):
        deep_cache(pipe.unet, 3)
