"""NASDMPipeline: save/load round trip, exact step counts, guidance wiring, loading from a run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from histosynth.diffusion.schedulers import SCHEDULERS, use_scheduler
from histosynth.errors import HistosynthError
from histosynth.models import SemanticUNet
from histosynth.pipelines.nasdm import NASDMPipeline


def _pipe(seed=0) -> NASDMPipeline:
    from diffusers import DDPMScheduler

    torch.manual_seed(seed)
    unet = SemanticUNet(sample_size=16, in_channels=3, cond_channels=4, learn_sigma=True, block_out_channels=(16, 32),
                        layers_per_block=1, attention_resolutions=(8,), num_head_channels=16, norm_num_groups=8,
                        spade_hidden=16)
    with torch.no_grad():  # zero-initialised output layers would make every model identical: randomise them
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range")
    return NASDMPipeline(unet=unet.eval(), scheduler=sched, class_names=["a", "b", "c"], magnification="20x")


def _cond(b=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    types = torch.randint(0, 4, (b, 16, 16), generator=g)
    cond = torch.zeros(b, 4, 16, 16)
    for k in range(1, 4):
        cond[:, k - 1] = (types == k).float()
    return cond


def test_save_load_round_trip_gives_identical_samples(tmp_path):
    pipe = _pipe()
    pipe.save_pretrained(tmp_path / "p")
    loaded = NASDMPipeline.from_pretrained(tmp_path / "p")
    assert loaded.config.class_names == ["a", "b", "c"] and loaded.config.magnification == "20x"
    for name in ("ddpm", "ddim"):
        use_scheduler(pipe, name), use_scheduler(loaded, name)
        a = pipe(_cond(), num_inference_steps=5, generator=torch.Generator().manual_seed(7), progress=False)
        b = loaded(_cond(), num_inference_steps=5, generator=torch.Generator().manual_seed(7), progress=False)
        assert a.images.dtype == np.uint8 and a.images.shape == (2, 16, 16, 3)
        assert np.array_equal(a.images, b.images)


@pytest.mark.parametrize("name,steps", [("ddpm", 7), ("ddim", 13), ("ddpm", 250),
                                        *[(n, s) for n in SCHEDULERS if n not in ("ddpm", "ddim") for s in (3, 8)]])
def test_every_scheduler_runs_the_number_of_steps_asked_and_gives_finite_images(name, steps):
    pipe = _pipe()
    use_scheduler(pipe, name)
    calls = []
    pipe.unet.register_forward_hook(lambda m, i, o: calls.append(i[1]))
    out = pipe(_cond(1), guidance_scale=1.5, num_inference_steps=steps, output_type="pt",
               generator=torch.Generator().manual_seed(0), progress=False)
    assert out.num_steps_run == steps and len(calls) == steps  # one batched (cond + null) forward per step
    assert calls[0].shape[0] == 2 and torch.isfinite(out.images).all()
    ts = [float(t[0]) for t in calls]
    assert ts == sorted(ts, reverse=True) and len(set(ts)) == steps


def test_schedulers_are_swapped_through_the_config_keeping_the_trained_schedule():
    """A swapped scheduler keeps T, the β schedule and the learned variance of the trained DDPM; only the solver
    changes (DPM-Solver++ 2M), and DDIM keeps NASDM's clipping. Unknown names list the known ones."""
    pipe = _pipe()
    trained = dict(pipe.scheduler.config)
    assert use_scheduler(pipe, None) == "ddpm"
    assert use_scheduler(pipe, "dpm-solver++") == "dpm-solver++"
    cfg = pipe.scheduler.config
    assert (cfg.algorithm_type, cfg.solver_order) == ("dpmsolver++", 2)
    assert all(cfg[k] == trained[k] for k in ("num_train_timesteps", "beta_schedule", "beta_start", "beta_end",
                                              "variance_type"))
    use_scheduler(pipe, "ddim")
    assert pipe.scheduler.config.clip_sample is True and use_scheduler(pipe, "ddpm") == "ddpm"
    assert pipe.scheduler.config.variance_type == "learned_range"  # round trip through other solvers
    with pytest.raises(HistosynthError, match="unknown scheduler 'heun'; choose one of ddpm, ddim, dpm-solver"):
        use_scheduler(pipe, "heun")


def test_eta_is_refused_by_schedulers_without_it():
    pipe = _pipe()
    use_scheduler(pipe, "unipc")
    with pytest.raises(HistosynthError, match="eta = 0.5 is DDIM's; the unipc scheduler has no eta"):
        pipe(_cond(1), num_inference_steps=2, eta=0.5, progress=False)


def test_guidance_runs_the_null_condition_and_changes_only_when_asked():
    pipe = _pipe()
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[2].clone()))
    use_scheduler(pipe, "ddim")
    cond = _cond(2)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    s0 = pipe(cond, guidance_scale=1.0, num_inference_steps=4, generator=g(), output_type="pt", progress=False)
    assert seen[0].shape[0] == 2  # g = 1 (NASDM's s = 0): conditional pass only
    seen.clear()
    s2 = pipe(cond, guidance_scale=3.0, num_inference_steps=4, generator=g(), output_type="pt", progress=False)
    assert seen[0].shape[0] == 4 and torch.equal(seen[0][:2], cond) and not seen[0][2:].any()  # y then ∅ = zeros
    assert not torch.allclose(s0.images, s2.images)


def test_batched_guidance_equals_two_separate_passes_in_one_buffer():
    """NASDM's one pass on the stacked [y; ∅] pair per step gives the images of two passes combined by
    guided_model_output (learned variance, DDPM with its step noise), and every step's input is the same buffer."""
    from diffusers.utils.torch_utils import randn_tensor

    from histosynth.diffusion.guidance import guided_model_output

    pipe, cond = _pipe(), _cond(2)
    ptrs = []
    pipe.unet.register_forward_pre_hook(lambda m, args: ptrs.append(args[0].data_ptr()))
    batched = pipe(cond, guidance_scale=2.5, num_inference_steps=4, generator=torch.Generator().manual_seed(3),
                   output_type="pt", progress=False).images
    assert len(ptrs) == 4 and len(set(ptrs)) == 1

    generator = torch.Generator().manual_seed(3)
    x = randn_tensor((2, 3, 16, 16), generator=generator)
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    scheduler.set_timesteps(4)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out_c = pipe.unet(x, t.expand(2), cond)
            out_u = pipe.unet(x, t.expand(2), torch.zeros_like(cond))
            x = scheduler.step(guided_model_output(out_u, out_c, 2.5, 3), t, x, generator=generator).prev_sample
    torch.testing.assert_close(batched, x.clamp(-1, 1), rtol=1e-4, atol=1e-5)


def test_unset_settings_are_nasdm_defaults_g2_ddpm20(monkeypatch):
    """A NASDM pipeline (its recipe saves no sampling section) samples with g = 2 (the paper's s = 1), 20 steps, η 0."""
    import histosynth.pipelines.nasdm as module

    used, denoise, guided = {}, module.denoise, module.guided_model_output

    def recording_denoise(predict, scheduler, steps, noise, eta, **kw):
        used.update(steps=steps, eta=eta)
        return denoise(predict, scheduler, steps, noise, eta=eta, **kw)

    def recording_guidance(out_u, out_c, scale, channels):
        used["g"] = scale
        return guided(out_u, out_c, scale, channels)

    monkeypatch.setattr(module, "denoise", recording_denoise)
    monkeypatch.setattr(module, "guided_model_output", recording_guidance)
    out = _pipe()(_cond(1), progress=False)
    assert out.num_steps_run == 20 and used == {"steps": 20, "eta": 0.0, "g": 2.0}


def test_bad_condition_shape_and_steps_are_clear_errors():
    pipe = _pipe()
    with pytest.raises(HistosynthError, match="expects"):
        pipe(torch.zeros(1, 7, 16, 16), num_inference_steps=2, progress=False)
    with pytest.raises(HistosynthError, match="num_inference_steps"):
        pipe(_cond(1), num_inference_steps=1001, progress=False)
    with pytest.raises(HistosynthError, match="not a NASDM pipeline"):
        NASDMPipeline.from_pretrained(__file__.rsplit("/", 1)[0])
