"""The divergence watch: a finite loss jump is reported once, a healthy run never, and the engine holds the newest
checkpoint from before the jump back from the rotation, the same after a resume."""

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
    assert watch.safe_until == 290  # the last healthy window was 291-300


def test_a_diverged_loss_near_the_limit_neither_re_arms_nor_moves_the_safe_point():
    # best about 0.085, then a noisy diverged level about 3.1x that: some windows fall under 3x, none under 1.5x
    rng = np.random.default_rng(0)
    losses = np.concatenate([0.085 * rng.lognormal(0, 0.3, 1000), 0.26 * rng.lognormal(0, 0.3, 3000)])
    watch = DivergenceWatch(window=100, factor=3.0, healthy=1.5)
    jumps = _feed(watch, losses)
    assert len(jumps) == 1 and watch.jumped
    assert watch.safe_until is not None and watch.safe_until < 1001


def test_a_new_stage_starts_a_new_best_and_keeps_an_open_jump():
    watch = DivergenceWatch(window=10, factor=3.0)
    assert _feed(watch, np.full(50, 0.1), stage="train") == []
    assert _feed(watch, np.full(50, 1.0), 51, stage="finetune") == []  # another loss, not a jump
    assert [j.last_step for j in _feed(watch, np.full(20, 5.0), 101, stage="finetune")] == [110]
    safe = watch.safe_until
    assert safe == 90
    # a stage change while the jump is open: its first window has nothing to compare with, so no verdict
    assert _feed(watch, np.full(10, 0.2), 121, stage="third") == []
    assert watch.jumped and watch.safe_until == safe
    assert _feed(watch, np.full(10, 0.2), 131, stage="third") == []  # a healthy window: re-armed, safe moves
    assert not watch.jumped and watch.safe_until == 130


def test_a_loss_at_or_below_zero_gets_no_verdict():
    watch = DivergenceWatch(window=10, factor=3.0)
    assert _feed(watch, np.r_[np.full(20, -0.1), np.full(20, -0.09), np.full(20, 0.5)]) == []
    assert watch.safe_until is None


def test_bad_settings_are_errors():
    with pytest.raises(ValueError, match="window"):
        DivergenceWatch(window=0)
    with pytest.raises(ValueError, match="factor"):
        DivergenceWatch(factor=1.0)


# one stage of 12 steps, a checkpoint every step, 2 kept; the watch's windows shrunk to 2 steps
def _train(monkeypatch, hgsc_store, run, schedule, calls, **kw):
    """Train the micro NASDM with its logged loss replaced by ``schedule`` (call n: schedule[n - 1]; the gradient is
    zero), so that the windows are exact."""
    import histosynth.training.engine as engine
    import histosynth.training.nasdm as training
    from histosynth.diffusion.hybrid_loss import hybrid_loss as real_loss  # not an earlier call's patch
    from histosynth.training.nasdm import train

    def scheduled_loss(*args, **kwargs):
        loss, terms = real_loss(*args, **kwargs)
        calls["n"] += 1
        return loss * 0 + schedule[calls["n"] - 1], terms

    monkeypatch.setattr(engine, "DIVERGENCE_WINDOW", 2)
    monkeypatch.setattr(training, "hybrid_loss", scheduled_loss)
    recipe = micro_recipe([{"name": "train", "steps": 12, "learning_rate": 2e-3, "condition_dropout": 0.0}],
                          checkpoint_every=1, keep_checkpoints=2)
    return train(recipe, hgsc_store, run, progress=False, **kw)


JUMP = [1.0, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 5.0, 5.0, 5.0, 5.0]  # jumps at step 9: window 9-10 reports it


def _names(run):
    return [p.name for p in ckpt.list_checkpoints(run)]


def test_the_engine_reports_a_jump_and_holds_the_checkpoint_before_it(hgsc_store, tmp_path, monkeypatch, capsys):
    _train(monkeypatch, hgsc_store, tmp_path / "run", JUMP, {"n": 0})
    out = capsys.readouterr().out
    assert "the loss jumped: median 5 over steps 9-10" in out and "step-0000006" in out, out
    assert "--max-steps 6" in out  # how to export the held checkpoint
    # window 7-8 closed healthy at step 8: checkpoints up to 6 predate any jump; 6 is held, 11 and 12 are the 2 kept
    assert _names(tmp_path / "run") == ["step-0000006", "step-0000011", "step-0000012"]

    # stopped after step 9 and resumed: the watch replays the log and ends with the same checkpoints
    calls = {"n": 0}
    _train(monkeypatch, hgsc_store, tmp_path / "resumed", JUMP, calls, max_steps=9)
    assert _names(tmp_path / "resumed") == ["step-0000006", "step-0000008", "step-0000009"]
    _train(monkeypatch, hgsc_store, tmp_path / "resumed", JUMP, calls, resume=True)
    assert _names(tmp_path / "resumed") == ["step-0000006", "step-0000011", "step-0000012"]


def test_a_healthy_run_holds_at_most_one_checkpoint_more(hgsc_store, tmp_path, monkeypatch, capsys):
    _train(monkeypatch, hgsc_store, tmp_path / "run", [1.0, 0.9] + [0.8] * 10, {"n": 0})
    assert "jumped" not in capsys.readouterr().out
    # window 11-12 closed healthy: checkpoints up to 10 are safe; 10 is held besides the 2 kept (11, 12)
    assert _names(tmp_path / "run") == ["step-0000010", "step-0000011", "step-0000012"]
