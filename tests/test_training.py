"""Training loop: exact resume after SIGKILL, a tiny model overfitting real patches, NaN handling, no clobbering."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import micro_recipe
from histosynth.diffusion import checkpoint as ckpt
from histosynth.training.nasdm import train
from histosynth.errors import HistosynthError, OutputExistsError, TrainingError


def _losses(run: Path) -> list[dict]:
    return [json.loads(r) for r in (run / "losses.jsonl").read_text().splitlines() if r]


def _cli_train(recipe_file: Path, store: Path, run: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-m", "histosynth.cli", "train", "--recipe", str(recipe_file), "--data",
                             str(store), "--out", str(run), *extra], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_resume_after_sigkill_reproduces_uninterrupted_losses(hgsc_store, tmp_path):
    recipe = micro_recipe()
    recipe.stages[1].steps = 400  # long enough that the kill lands mid-run
    recipe_file = tmp_path / "micro.yaml"
    recipe_file.write_text(yaml.safe_dump(json.loads(json.dumps(recipe.to_dict()))))

    # uninterrupted reference: 8 steps, crossing the stage boundary (lr and condition dropout change at step 4)
    ref = _cli_train(recipe_file, hgsc_store, tmp_path / "ref", "--max-steps", "8")
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-3000:]

    # the same run, killed with SIGKILL once its step-4 checkpoint is on disk
    victim = _cli_train(recipe_file, hgsc_store, tmp_path / "run")
    deadline = time.time() + 300
    while not ckpt.checkpoint_dir(tmp_path / "run", 4).exists():
        assert victim.poll() is None, victim.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert ckpt.latest_checkpoint(tmp_path / "run") is not None

    resumed = _cli_train(recipe_file, hgsc_store, tmp_path / "run", "--resume", "--max-steps", "8")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-3000:]

    ref_rows, run_rows = _losses(tmp_path / "ref"), _losses(tmp_path / "run")
    assert [r["step"] for r in run_rows] == list(range(1, 9))
    assert [r["loss"] for r in run_rows] == [r["loss"] for r in ref_rows]
    assert [r["lr"] for r in run_rows] == [r["lr"] for r in ref_rows]
    a = load_file(str(ckpt.checkpoint_dir(tmp_path / "ref", 8) / "ema.safetensors"))
    b = load_file(str(ckpt.checkpoint_dir(tmp_path / "run", 8) / "ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two usable cores")
def test_a_cpu_resume_on_another_thread_count_trains_on_the_run_s_own(hgsc_store, tmp_path, monkeypatch, capsys):
    """torch splits its reductions among threads, so another thread count gives other weights; a checkpoint records
    the count and a resume started on another one trains on the recorded count: the same losses and weights as an
    uninterrupted run."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)

    def weights(run):
        return load_file(str(ckpt.latest_checkpoint(run) / "ema.safetensors"))

    def same(a, b):
        return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    for threads, run in ((2, "ref"), (1, "one")):
        torch.set_num_threads(threads)
        train(micro_recipe(), hgsc_store, tmp_path / run, max_steps=8, progress=False)
    if same(weights(tmp_path / "ref"), weights(tmp_path / "one")):  # the premise: other threads, other bits
        pytest.skip("1 and 2 torch threads give the same weights on this machine: nothing to show")

    torch.set_num_threads(2)
    train(micro_recipe(), hgsc_store, tmp_path / "run", max_steps=4, progress=False)
    assert ckpt.read_trainer_state(ckpt.latest_checkpoint(tmp_path / "run"))["torch_threads"] == 2
    torch.set_num_threads(1)  # as the CLI would choose with one core busy
    capsys.readouterr()
    train(micro_recipe(), hgsc_store, tmp_path / "run", max_steps=8, resume=True, progress=False)
    assert "torch CPU threads: 2, the run's own, so that the resume is exact" in capsys.readouterr().out
    assert _losses(tmp_path / "run") == _losses(tmp_path / "ref")
    assert same(weights(tmp_path / "run"), weights(tmp_path / "ref"))


def test_tiny_model_overfits_a_few_real_patches(tmp_path):
    from dataclasses import replace

    from histosynth.data.formats import read_nuclei
    from histosynth.data.prepare_labelled import prepare_nuclei
    from histosynth.quickstart import bundled_sample

    # 4 real 32 px patches: a 64x64 corner of the tumour nest, marked "train" (a dataset-defined split: no hold-out)
    (region,) = read_nuclei("folder", bundled_sample(), magnification="20x")
    crop = (slice(700, 764), slice(700, 764))
    few = replace(region, image=region.image[crop], inst_map=region.inst_map[crop], type_map=region.type_map[crop],
                  split="train")
    prepare_nuclei([few], tmp_path / "few", patch=32, overlap=0.0, magnification="20x", progress=False)
    recipe = micro_recipe(batch_size=4, random_flips=False, checkpoint_every=1000)
    recipe.stages[0].steps, recipe.stages[0].learning_rate = 300, 3e-3
    recipe.stages[1].steps = 0
    train(recipe, tmp_path / "few", tmp_path / "run", progress=False)
    rows = _losses(tmp_path / "run")
    first = sum(r["simple"] for r in rows[:10]) / 10
    last = sum(r["simple"] for r in rows[-30:]) / 30
    assert last < 0.3 * first, (first, last)


def test_nan_loss_is_a_clear_error_and_keeps_checkpoints(hgsc_store, tmp_path, monkeypatch):
    import histosynth.training.nasdm as training

    calls = {"n": 0}
    real_loss = training.hybrid_loss

    def loss_that_diverges_at_step_3(*args, **kwargs):
        loss, terms = real_loss(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] == 3 else loss), terms

    monkeypatch.setattr(training, "hybrid_loss", loss_that_diverges_at_step_3)
    with pytest.raises(TrainingError, match=r"loss is nan at step 3 .*step-0000002"):
        train(micro_recipe(checkpoint_every=2), hgsc_store, tmp_path / "run", progress=False)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-0000002"]


def test_run_directory_is_never_overwritten_silently(hgsc_store, tmp_path):
    recipe = micro_recipe()
    train(recipe, hgsc_store, tmp_path / "run", max_steps=1, progress=False)
    with pytest.raises(OutputExistsError, match="--resume or --overwrite"):
        train(recipe, hgsc_store, tmp_path / "run", max_steps=1, progress=False)
    other = micro_recipe(seed=99)
    with pytest.raises(HistosynthError, match="recipe differs"):
        train(other, hgsc_store, tmp_path / "run", max_steps=2, resume=True, progress=False)
    train(recipe, hgsc_store, tmp_path / "run", max_steps=1, overwrite=True, progress=False)
    assert len(_losses(tmp_path / "run")) == 1


def test_checkpoint_layout_is_safetensors_and_atomic(hgsc_store, tmp_path):
    train(micro_recipe(), hgsc_store, tmp_path / "run", max_steps=6, progress=False)
    rows = _losses(tmp_path / "run")  # the micro recipe: 4 steps at 2e-3, then the fine-tune stage at 5e-4
    assert [(r["stage"], r["lr"]) for r in rows] == [("train", 2e-3)] * 4 + [("finetune", 5e-4)] * 2
    ckpts = ckpt.list_checkpoints(tmp_path / "run")
    assert [p.name for p in ckpts] == ["step-0000002", "step-0000004", "step-0000006"]
    files = {p.name for p in ckpts[-1].iterdir()}
    assert {"model.safetensors", "ema.safetensors", "trainer_state.json"} <= files
    assert any(f.startswith("optimizer") for f in files) and any(f.startswith("scheduler") for f in files)
    assert any(f.startswith("random_states") for f in files)
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))
    assert (tmp_path / "run" / "pipeline" / "model_index.json").is_file()
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000


def test_two_process_data_parallel_training(hgsc_store, tmp_path):
    """The distributed path (what `accelerate launch --multi_gpu` runs), on 2 CPU processes with gloo."""
    import shutil

    recipe_file = tmp_path / "micro.yaml"
    recipe_file.write_text(yaml.safe_dump(json.loads(json.dumps(micro_recipe().to_dict()))))
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    res = subprocess.run([torchrun, "--nproc_per_node", "2", "-m", "histosynth.cli", "train", "--recipe", str(recipe_file),
                          "--data", str(hgsc_store), "--out", str(tmp_path / "ddp"), "--max-steps", "4"],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    last = ckpt.latest_checkpoint(tmp_path / "ddp")
    assert last.name == "step-0000004"
    assert {p.name for p in last.glob("random_states_*")} == {"random_states_0.pkl", "random_states_1.pkl"}
    assert [r["step"] for r in _losses(tmp_path / "ddp")] == [1, 2, 3, 4]  # one log, written by rank 0 only
