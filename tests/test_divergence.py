"""The divergence watch: a finite loss jump is reported once, a healthy run never, and the engine keeps the last
checkpoint from before the jump out of the rotation, the same after a resume."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import micro_recipe
from histosynth.diffusion import checkpoint as ckpt
from histosynth.training.divergence import DivergenceWatch


def _diffusion_like_loss(n: int, seed: int) -> np.ndarray:
    """A falling loss with the heavy per-step noise of a diffusion loss (log-normal, the drawn timesteps)."""
    rng = np.random.default_rng(seed)
    t = np.arange(1, n + 1)
    return (0.15 + 0.85 / np.sqrt(t)) * rng.lognormal(0.0, 0.6, n)


def _feed(watch: DivergenceWatch, losses, start: int = 1, stage=None) -> list:
    return [j for s, v in enumerate(losses, start) if (j := watch.update(s, float(v), stage)) is not None]


@pytest.mark.parametrize("seed", range(5))
def test_a_healthy_noisy_run_never_fires(seed):
    assert _feed(DivergenceWatch(), _diffusion_like_loss(6000, seed)) == []


@pytest.mark.parametrize("seed", range(5))
def test_a_jump_is_reported_once_and_the_safe_point_predates_it(seed):
    rng = np.random.default_rng(100 + seed)
    j = int(rng.integers(500, 4000))  # the first step of the diverged loss
    losses = _diffusion_like_loss(6000, seed)
    losses[j - 1:] = rng.lognormal(0.0, 0.05, 6000 - j + 1)  # 1.0: the loss of a model predicting no noise
    watch = DivergenceWatch(window=100, factor=3.0)
    (jump,) = _feed(watch, losses)
    assert j <= jump.last_step < j + 200  # seen within two windows
    assert jump.safe_until < j  # a checkpoint at or before it holds no step of the diverged run
    assert jump.median > 3 * jump.best
    assert jump.best == pytest.approx(min(np.median(losses[a:a + 100]) for a in range(0, jump.first_step - 1, 100)))
    assert "jumped" in jump.message() and f"{jump.first_step}-{jump.last_step}" in jump.message()


def test_it_fires_again_only_after_the_loss_came_back():
    watch = DivergenceWatch(window=10, factor=3.0)
    healthy, high = np.full(100, 0.1), np.full(100, 1.0)
    assert _feed(watch, healthy) == []
    first = _feed(watch, high, 101)
    assert [j.last_step for j in first] == [110]  # once, though every window after it is high
    assert _feed(watch, healthy, 201) == []  # came back: re-armed
    assert [j.last_step for j in _feed(watch, high, 301)] == [310]
    assert watch.safe_until == 290  # the last window under the limit was 291-300


def test_a_new_stage_starts_a_new_best():
    watch = DivergenceWatch(window=10, factor=3.0)
    assert _feed(watch, np.full(50, 0.1), stage="train") == []
    assert _feed(watch, np.full(50, 1.0), 51, stage="distill") == []  # another loss, not a jump
    assert [j.last_step for j in _feed(watch, np.full(20, 5.0), 101, stage="distill")] == [110]


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="window"):
        DivergenceWatch(window=0)
    with pytest.raises(ValueError, match="factor"):
        DivergenceWatch(factor=1.0)


def _train_with_a_jump(monkeypatch, hgsc_store, run, calls, **kw):
    import histosynth.training.engine as engine
    import histosynth.training.nasdm as training
    from histosynth.training.nasdm import train

    real_loss = training.hybrid_loss

    def loss_that_jumps_at_step_7(*args, **kwargs):
        loss, terms = real_loss(*args, **kwargs)
        calls["n"] += 1
        return (loss * 100 if calls["n"] >= 7 else loss), terms

    monkeypatch.setattr(engine, "DIVERGENCE_WINDOW", 2)
    monkeypatch.setattr(training, "hybrid_loss", loss_that_jumps_at_step_7)
    return train(micro_recipe(checkpoint_every=1, keep_checkpoints=1), hgsc_store, run, progress=False, **kw)


def test_the_engine_reports_a_jump_and_keeps_the_checkpoint_before_it(hgsc_store, tmp_path, monkeypatch, capsys):
    # the micro recipe: stage "train" steps 1-4, "finetune" 5-8; windows of 2: the jump (from step 7) closes 7-8
    _train_with_a_jump(monkeypatch, hgsc_store, tmp_path / "run", {"n": 0})
    out = capsys.readouterr().out
    assert "the loss jumped" in out and "steps 7-8" in out and "step-0000004" in out, out
    # keep_checkpoints 1 keeps the last; step 4, from before the window ahead of the jump, is kept too
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-0000004", "step-0000008"]

    # stopped after step 6 (window 5-6 closed: safe up to step 4), the checkpoints not yet known safe are kept too;
    # resumed, the run ends with the uninterrupted run's checkpoints (the watch replays the logged losses)
    calls = {"n": 0}
    _train_with_a_jump(monkeypatch, hgsc_store, tmp_path / "resumed", calls, max_steps=6)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "resumed")] == [f"step-000000{k}" for k in (4, 5, 6)]
    _train_with_a_jump(monkeypatch, hgsc_store, tmp_path / "resumed", calls, resume=True)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "resumed")] == ["step-0000004", "step-0000008"]


def test_without_a_jump_the_newest_safe_checkpoint_and_newer_ones_are_kept(hgsc_store, tmp_path, monkeypatch, capsys):
    import histosynth.training.engine as engine
    from histosynth.training.nasdm import train

    monkeypatch.setattr(engine, "DIVERGENCE_WINDOW", 2)
    train(micro_recipe(checkpoint_every=1, keep_checkpoints=1), hgsc_store, tmp_path / "run", progress=False)
    assert "jumped" not in capsys.readouterr().out
    # the last window (7-8) closed under the limit: checkpoints up to step 6 predate any jump; 6 is the newest of
    # them, 7 and 8 are not known safe yet (keep_checkpoints 1 alone would keep only 8)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == [f"step-000000{k}" for k in (6, 7, 8)]
