"""NASDMPipeline: save/load round trip, exact step counts, guidance wiring, loading from a run."""

from __future__ import annotations

import numpy as np
import pytest
import torch

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
    for sampler in ("ddpm", "ddim"):
        a = pipe(_cond(), num_inference_steps=5, sampler=sampler, generator=torch.Generator().manual_seed(7), progress=False)
        b = loaded(_cond(), num_inference_steps=5, sampler=sampler, generator=torch.Generator().manual_seed(7), progress=False)
        assert a.images.dtype == np.uint8 and a.images.shape == (2, 16, 16, 3)
        assert np.array_equal(a.images, b.images)


@pytest.mark.parametrize("sampler,steps", [("ddpm", 7), ("ddim", 13), ("ddpm", 250)])
def test_the_number_of_steps_asked_is_the_number_run(sampler, steps):
    pipe = _pipe()
    calls = []
    pipe.unet.register_forward_hook(lambda m, i, o: calls.append(i[1]))
    out = pipe(_cond(1), guidance_scale=1.5, num_inference_steps=steps, sampler=sampler, progress=False)
    assert out.num_steps_run == steps and len(calls) == steps  # one batched (cond + null) forward per step
    ts = [int(t[0]) for t in calls]
    assert ts == sorted(ts, reverse=True) and len(set(ts)) == steps


def test_guidance_runs_the_null_condition_and_changes_only_when_asked():
    pipe = _pipe()
    seen = []
    pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[2].clone()))
    cond = _cond(2)
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    s0 = pipe(cond, guidance_scale=1.0, num_inference_steps=4, sampler="ddim", generator=g(), output_type="pt", progress=False)
    assert seen[0].shape[0] == 2  # g = 1 (NASDM's s = 0): conditional pass only
    seen.clear()
    s2 = pipe(cond, guidance_scale=3.0, num_inference_steps=4, sampler="ddim", generator=g(), output_type="pt", progress=False)
    assert seen[0].shape[0] == 4 and torch.equal(seen[0][:2], cond) and not seen[0][2:].any()  # y then ∅ = zeros
    assert not torch.allclose(s0.images, s2.images)


def test_bad_condition_shape_and_steps_are_clear_errors():
    pipe = _pipe()
    with pytest.raises(HistosynthError, match="expects"):
        pipe(torch.zeros(1, 7, 16, 16), num_inference_steps=2, progress=False)
    with pytest.raises(HistosynthError, match="num_inference_steps"):
        pipe(_cond(1), num_inference_steps=1001, progress=False)
    with pytest.raises(HistosynthError, match="not a NASDM pipeline"):
        NASDMPipeline.from_pretrained(__file__.rsplit("/", 1)[0])
