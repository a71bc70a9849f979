"""Issue 13, item 4: `histosynth sample` data-parallel through `accelerate launch` and resumable after a kill.

The unit of work is a batch; each process takes its share of the batches not done yet, a batch is done when its
manifest rows are written (after its files), and the main process merges the rows and the grid at the end. So two
processes, or a run killed and run again, write byte for byte what one uninterrupted process writes; a rerun with
other settings stops with one line naming the partial folder. The model is the micro NASDM on real HGSC patches.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from click.testing import CliRunner

from conftest import micro_recipe
from histosynth.cli import main
from histosynth.sampling import writer as writer_module
from histosynth.sampling.writer import RESUME, SampleWriter, partial_folder

pytestmark = pytest.mark.usefixtures("one_thread")
BATCHES = 4  # 7 masks in batches of 2: the last one short


@pytest.fixture(scope="module")
def nasdm_run(hgsc_store, tmp_path_factory) -> Path:
    from histosynth.training.nasdm import train

    run = tmp_path_factory.mktemp("sharded") / "run"
    train(micro_recipe(), hgsc_store, run, max_steps=2, progress=False)
    return run


def _args(run: Path, store: Path, out: Path, *extra: str) -> list[str]:
    return ["sample", "--model", str(run), "--masks", str(store), "--split", "all", "--num", "7", "--batch-size", "2",
            "--steps", "20", "--device", "cpu", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def one_process(nasdm_run, hgsc_store, tmp_path_factory) -> Path:
    """What one uninterrupted process writes."""
    out = tmp_path_factory.mktemp("one") / "s"
    r = CliRunner().invoke(main, _args(nasdm_run, hgsc_store, out))
    assert r.exit_code == 0, r.output
    return out


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "ACCELERATE_USE_CPU": "1"}


def _free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _launch_two(run: Path, store: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", _free_port(), "-m", "histosynth.cli", *_args(run, store, out)]


def test_two_processes_write_exactly_what_one_process_writes(nasdm_run, hgsc_store, one_process, tmp_path):
    out = tmp_path / "s"
    done = subprocess.run(_launch_two(nasdm_run, hgsc_store, out), env=_env(), capture_output=True, text=True,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1  # said by the main process only
    expected = _files(one_process)
    assert len([k for k in expected if k.startswith("images/")]) == 7 and "grid.png" in expected
    assert _files(out) == expected  # images, masks, labels, real patches, samples.jsonl and grid.png
    assert [p.name for p in tmp_path.iterdir()] == ["s"]  # no partial folder left


def test_a_killed_two_process_run_continues_without_redoing_finished_batches(nasdm_run, hgsc_store, one_process,
                                                                             tmp_path):
    """`accelerate launch` with 2 processes, killed (the launcher and both workers) after its first finished batch,
    then the same command again: the images of one process, no finished batch written twice, none lost."""
    out = tmp_path / "s"
    batches = partial_folder(out) / RESUME / "batches"
    victim = subprocess.Popen(_launch_two(nasdm_run, hgsc_store, out), env=_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (batches.is_dir() and list(batches.glob("*.jsonl"))):
        assert victim.poll() is None, victim.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    # the launcher and its workers (torchrun starts each in a session of its own), as a lost machine would
    tree = [victim, *(psutil.Process(victim.pid).children(recursive=True))]
    for process in tree:
        process.send_signal(signal.SIGKILL)
    victim.wait()
    psutil.wait_procs(tree[1:], timeout=30)
    done = sorted(batches.glob("*.jsonl"))
    assert 1 <= len(done) < BATCHES and not out.exists()
    kept = [row for f in done for row in map(json.loads, f.read_text().splitlines())]
    files = [partial_folder(out) / row[key] for row in kept for key in ("image", "mask", "inst_map", "real")]
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files]

    again = subprocess.run(_launch_two(nasdm_run, hgsc_store, out), env=_env(), capture_output=True, text=True,
                           timeout=300, check=False)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{len(done)} of {BATCHES} batches were done" in again.stderr
    assert _files(out) == _files(one_process)
    moved = [out / p.relative_to(partial_folder(out)) for p in files]
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in moved] == before  # not written again
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_a_killed_run_continues_without_redoing_finished_batches(nasdm_run, hgsc_store, one_process, tmp_path):
    out = tmp_path / "s"
    batches = partial_folder(out) / RESUME / "batches"
    victim = subprocess.Popen([sys.executable, "-m", "histosynth.cli", *_args(nasdm_run, hgsc_store, out)], env=_env(),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not (batches.is_dir() and list(batches.glob("*.jsonl"))):
        assert victim.poll() is None, victim.stderr.read().decode()[-3000:]
        assert time.time() < deadline
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    done = sorted(batches.glob("*.jsonl"))
    assert 1 <= len(done) < BATCHES and not out.exists()
    kept = [row for f in done for row in map(json.loads, f.read_text().splitlines())]
    files = [partial_folder(out) / row[key] for row in kept for key in ("image", "mask", "inst_map", "real")]
    before = [(p.stat().st_ino, p.stat().st_mtime_ns) for p in files]

    r = CliRunner().invoke(main, _args(nasdm_run, hgsc_store, out))  # the same command again
    assert r.exit_code == 0, r.output
    assert f"{len(done)} of {BATCHES} batches were done" in r.stderr
    assert _files(out) == _files(one_process)
    moved = [out / p.relative_to(partial_folder(out)) for p in files]
    assert [(p.stat().st_ino, p.stat().st_mtime_ns) for p in moved] == before  # not written again
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_a_rerun_with_other_settings_names_the_partial_run_and_overwrite_starts_again(nasdm_run, hgsc_store, tmp_path,
                                                                                     monkeypatch):
    from histosynth.pipelines.nasdm import NASDMPipeline

    calls, real_call = [], NASDMPipeline.__call__

    def crash_on(n):
        def call(self, *a, **k):
            calls.append(1)
            if len(calls) == n:
                raise RuntimeError("killed")
            return real_call(self, *a, **k)
        return call

    out = tmp_path / "s"
    monkeypatch.setattr(NASDMPipeline, "__call__", crash_on(1))
    r = CliRunner().invoke(main, _args(nasdm_run, hgsc_store, out))
    assert isinstance(r.exception, RuntimeError)
    assert list(tmp_path.iterdir()) == []  # nothing finished: nothing is left

    calls.clear()
    monkeypatch.setattr(NASDMPipeline, "__call__", crash_on(2))
    r = CliRunner().invoke(main, _args(nasdm_run, hgsc_store, out))
    assert isinstance(r.exception, RuntimeError)
    partial = partial_folder(out)
    assert len(list((partial / RESUME / "batches").glob("*.jsonl"))) == 1  # an error keeps the finished batch
    assert "1 finished batches are kept in" in r.stderr
    monkeypatch.setattr(NASDMPipeline, "__call__", real_call)

    r = CliRunner().invoke(main, _args(nasdm_run, hgsc_store, out, "--seed", "1"))
    assert r.exit_code == 2
    (line,) = [line for line in r.stderr.splitlines() if line.startswith("error: ")]  # one line, no traceback
    assert "Traceback" not in r.output and line.endswith("--overwrite to start again")
    assert line.startswith(f"error: {out}: a partial run with other settings (seed) is in {partial};")
    assert len(list((partial / RESUME / "batches").glob("*.jsonl"))) == 1 and not out.exists()  # untouched

    r = CliRunner().invoke(main, _args(nasdm_run, hgsc_store, out, "--seed", "1", "--overwrite"))
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and {row["seed"] for row in rows} == {1}
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


class _Rank:
    """One of two processes, as threads: accelerate's state, with a barrier for wait_for_everyone."""

    def __init__(self, index: int, barrier: threading.Barrier):
        self.process_index, self.num_processes, self.is_main_process = index, 2, index == 0
        self.barrier = barrier

    def wait_for_everyone(self):
        self.barrier.wait(timeout=60)


def _as_two_processes(monkeypatch, work) -> None:
    """``work(index)`` as processes 0 and 1 of 2: two threads, each with its accelerate state faked."""
    barrier, local, errors = threading.Barrier(2), threading.local(), []
    monkeypatch.setattr(writer_module, "process_state", lambda: local.rank)

    def process(index):
        local.rank = _Rank(index, barrier)
        try:
            work(index)
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


def _toy_sampler(out: Path, made: list, grid: tuple[int, int], shown: int | None):
    """Ten images of two levels in batches of 3, ``grid`` (rows, columns); with ``shown`` only the first ``shown`` of
    each level in the grid (ZoomLDM's shape), else every image until the grid is full (the other methods')."""
    jobs = ["5x"] * 5 + ["20x"] * 5
    with SampleWriter(out, grid_rows=grid[0], grid_columns=grid[1], settings={"seed": 0}) as w:
        for start in w.batches(range(0, len(jobs), 3), progress=False):
            for m in jobs[start:start + 3]:
                made.append(w.count)
                image = np.full((8, 8, 3), 10 * w.count, np.uint8)
                w.add(image, {"level": m}, files={f"other/{w.count:05d}.png": 255 - image}, grid=[255 - image, image],
                      in_grid=shown is None or jobs[:w.count].count(m) < shown)


@pytest.mark.parametrize("grid, shown", [((2, 4), 2), ((1, 4), None)])
def test_processes_share_the_batches_and_the_grid(tmp_path, monkeypatch, grid, shown):
    made_alone: list[int] = []
    _toy_sampler(tmp_path / "one", made_alone, grid, shown)
    assert made_alone == list(range(10))
    made = {0: [], 1: []}
    _as_two_processes(monkeypatch, lambda i: _toy_sampler(tmp_path / "two", made[i], grid, shown))
    assert made == {0: [0, 1, 2, 6, 7, 8], 1: [3, 4, 5, 9]}  # batches 0 and 2, 1 and 3
    assert _files(tmp_path / "two") == _files(tmp_path / "one")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]


def test_pathldm_prompts_over_two_processes_are_the_images_of_one(tmp_path, monkeypatch):
    """Per-image seeds by the global image number: the same images whichever process made them."""
    import torch
    from diffusers import UNet2DConditionModel, VQModel

    from histosynth.conditions.text import ClassConditioner
    from histosynth.pipelines.pathldm import PathLDMPipeline, ldm_ddim_scheduler
    from histosynth.sampling import sample_prompts

    torch.manual_seed(0)
    vae = VQModel(block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=3, num_vq_embeddings=64,
                  norm_num_groups=4, scaling_factor=1.0, sample_size=32)
    unet = UNet2DConditionModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                                layers_per_block=1, attention_head_dim=(2, 2), norm_num_groups=8, cross_attention_dim=32,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    PathLDMPipeline(unet=unet, vae=vae, scheduler=ldm_ddim_scheduler(1000, "scaled_linear", 0.0015, 0.0195),
                    conditioner=ClassConditioner(4, 32, ("a", "b", "c", "d"))).save_pretrained(tmp_path / "pipe")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\nb\nc\nd\n")

    pipes = [PathLDMPipeline.from_pretrained(tmp_path / "pipe") for _ in range(2)]  # loading is not thread-safe

    def run(pipe, out: Path) -> None:  # 7 prompts drawn by the seed, in batches of 3
        sample_prompts(pipe, prompts, out, num=7, num_inference_steps=2, seed=3, batch_size=3, progress=False)

    run(pipes[0], tmp_path / "one")
    _as_two_processes(monkeypatch, lambda i: run(pipes[i], tmp_path / "two"))
    rows = [json.loads(x) for x in (tmp_path / "two" / "samples.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in rows] == [3 * 1_000_003 + n for n in range(7)]
    assert _files(tmp_path / "two") == _files(tmp_path / "one")


def test_precision_and_deep_cache_are_recorded_and_part_of_the_settings(nasdm_run, hgsc_store, one_process, tmp_path,
                                                                        monkeypatch):
    """`--precision bf16 --deep-cache 2` on NASDM's SemanticUNet: every row says so, the images differ from float32's
    but not wildly; a killed plain run is not continued by a DeepCache rerun; --compile with --deep-cache is refused."""
    out = tmp_path / "fast"
    r = CliRunner().invoke(main, _args(nasdm_run, hgsc_store, out, "--precision", "bf16", "--deep-cache", "2"))
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (one_process / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and all(r["precision"] == "bf16" and r["deep_cache"] == 2 for r in rows)
    assert not any("precision" in r or "deep_cache" in r for r in plain)
    from PIL import Image

    a = np.stack([np.asarray(Image.open(out / r["image"]), np.float32) for r in rows])
    b = np.stack([np.asarray(Image.open(one_process / r["image"]), np.float32) for r in plain])
    assert 0 < np.abs(a - b).mean() < 40

    from histosynth.pipelines.nasdm import NASDMPipeline

    calls, real_call = [], NASDMPipeline.__call__

    def crash_on_second(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")
        return real_call(self, *a, **k)

    monkeypatch.setattr(NASDMPipeline, "__call__", crash_on_second)
    r = CliRunner().invoke(main, _args(nasdm_run, hgsc_store, tmp_path / "cut"))  # plain, one batch finished
    assert isinstance(r.exception, RuntimeError)
    monkeypatch.setattr(NASDMPipeline, "__call__", real_call)
    r = CliRunner().invoke(main, _args(nasdm_run, hgsc_store, tmp_path / "cut", "--deep-cache", "2"))
    assert r.exit_code == 2 and "other settings (deep_cache)" in r.output, r.output
    r = CliRunner().invoke(main, _args(nasdm_run, hgsc_store, tmp_path / "c", "--compile", "--deep-cache", "2"))
    assert r.exit_code != 0 and "use one" in r.output, r.output


def test_channels_last_runs_the_unet_nhwc_and_gives_the_default_images(nasdm_run, hgsc_store, one_process, tmp_path,
                                                                       monkeypatch):
    """`--channels-last`: every 4-d weight of the UNet is channels-last while it samples, its activations are too,
    and the images are the default's up to float rounding (not part of the settings: a plain rerun continues)."""
    from histosynth.pipelines.nasdm import NASDMPipeline

    seen, real_call = [], NASDMPipeline.__call__

    def record(self, *a, **k):
        weights = [p for p in self.unet.parameters() if p.ndim == 4]
        seen.append(bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) for p in weights))
        hook = self.unet.conv_in.register_forward_hook(
            lambda m, i, o: seen.append(o.is_contiguous(memory_format=torch.channels_last) and not o.is_contiguous()))
        try:
            return real_call(self, *a, **k)
        finally:
            hook.remove()

    monkeypatch.setattr(NASDMPipeline, "__call__", record)
    out = tmp_path / "nhwc"
    r = CliRunner().invoke(main, _args(nasdm_run, hgsc_store, out, "--channels-last"))
    assert r.exit_code == 0, r.output
    assert seen and all(seen), seen
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    plain = [json.loads(line) for line in (one_process / "samples.jsonl").read_text().splitlines()]
    assert rows == plain
    from PIL import Image

    a = np.stack([np.asarray(Image.open(out / r["image"]), np.int16) for r in rows])
    b = np.stack([np.asarray(Image.open(one_process / r["image"]), np.int16) for r in plain])
    assert np.abs(a - b).max() <= 2 and np.abs(a - b).mean() < 0.05
