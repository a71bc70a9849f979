"""Issue 14, items 5 and 9: a hold-out that would hold out nothing, and a full disk.

Hold-out: 500x500 regions at 40x cut into 128 px patches at 20x (256 px crops) have a 7.5 % block of 137 px,
which holds no test tile; whole regions are held out instead (chosen by the seed, said on stderr and in
store.json), or, with a single such region, prepare stops and names ``--holdout 0``.

Disk full: every writer made to fail with ENOSPC (or as the real writers fail: numpy's errno-less OSError,
safetensors' Rust error, torch's "unexpected pos") ends with one line naming the output and the space needed,
exit 2 through the command line, no temporary file left, earlier outputs untouched, and a run resumed after a
failed checkpoint continues exactly from the last complete one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from conftest import micro_recipe
from histosynth.cli import main
from histosynth.data.formats import read_nuclei
from histosynth.data.formats.writers import write_class_names, write_folder_item
from histosynth.data.patches import choose_whole_regions, extract_patches
from histosynth.data.prepare_labelled import prepare_nuclei
from histosynth.data.store import PatchStore
from histosynth.diffusion import checkpoint as ckpt
from histosynth.errors import DataError, DiskFullError, is_disk_full
from histosynth.quickstart import bundled_sample

pytestmark = pytest.mark.usefixtures("one_thread")


def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def hgsc_region():
    (region,) = read_nuclei("folder", bundled_sample(), magnification="20x")
    return region


@pytest.fixture(scope="module")
def small_regions(tmp_path_factory, hgsc_region) -> Path:
    """The bundled 1500x1500 HGSC region cut into nine 500x500 regions (declared 40x: the issue's case)."""
    src = tmp_path_factory.mktemp("regions") / "src"
    for i in range(3):
        for j in range(3):
            win = (slice(500 * i, 500 * i + 500), slice(500 * j, 500 * j + 500))
            write_folder_item(src, f"r{i}{j}", hgsc_region.image[win], hgsc_region.inst_map[win],
                              hgsc_region.type_map[win])
    write_class_names(src, hgsc_region.class_names)
    return src


def _prepare(src: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["prepare", "nuclei", "--format", "folder", str(src), "--out", str(out),
                                     "--source-magnification", "40x", "--magnification", "20x", "--patch", "128",
                                     *extra])


_PROGRESS = re.compile(r"^(prepare|train|encode \w+): ")


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    # besides the progress bars (tqdm's lines, ended by carriage returns) and notes, one line
    lines = [line.rsplit("\r", 1)[-1].strip() for line in result.stderr.strip().splitlines()]
    lines = [line for line in lines if line and not _PROGRESS.match(line) and not line.startswith("note: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _no_debris(parent: Path) -> None:
    left = [p.name for p in parent.iterdir() if p.name.startswith(".")]
    assert not left, left


def _digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _assert_train_test_disjoint(store: PatchStore) -> None:
    """No train crop shares a source pixel with a test crop of the same region."""
    by_source: dict[str, dict[str, list]] = {}
    for row in store.records:
        by_source.setdefault(row["source"], {"train": [], "test": []})[row["split"]].append(row)
    for rows in by_source.values():
        for a in rows["train"]:
            for b in rows["test"]:
                apart = (a["y"] + a["crop"] <= b["y"] or b["y"] + b["crop"] <= a["y"]
                         or a["x"] + a["crop"] <= b["x"] or b["x"] + b["crop"] <= a["x"])
                assert apart, (a, b)


# ---------------------------------------------------------------------------------------------- hold-out
def test_choose_whole_regions_fraction_seed_and_bounds():
    sizes = [9] * 40
    picked = choose_whole_regions(sizes, 0.075, np.random.default_rng(0), at_least_one=True, keep_one=True)
    assert len(picked) == 3  # 27 of 360 patches: the nearest to 7.5 % (27)
    assert picked == choose_whole_regions(sizes, 0.075, np.random.default_rng(0), at_least_one=True, keep_one=True)
    assert picked != choose_whole_regions(sizes, 0.075, np.random.default_rng(1), at_least_one=True, keep_one=True)
    # few regions: 7.5 % of 2 rounds to none, but an empty test split is never the answer, nor an empty train one
    assert len(choose_whole_regions([9, 9], 0.075, np.random.default_rng(0), at_least_one=True, keep_one=True)) == 1
    assert choose_whole_regions([9, 9], 0.075, np.random.default_rng(0), at_least_one=False, keep_one=False) == []
    assert choose_whole_regions([9], 0.9, np.random.default_rng(0), at_least_one=True, keep_one=True) == []
    assert choose_whole_regions([], 0.5, np.random.default_rng(0), at_least_one=True, keep_one=True) == []


def test_a_block_smaller_than_a_crop_holds_nothing_out_inside_the_region(hgsc_region):
    from dataclasses import replace

    win = (slice(0, 500), slice(0, 500))
    region = replace(hgsc_region, image=hgsc_region.image[win], inst_map=hgsc_region.inst_map[win],
                     type_map=hgsc_region.type_map[win], magnification="40x")
    patches = extract_patches(region, 128, 0.5, "20x", 0.075, np.random.default_rng(0))
    assert patches.whole_region and patches.block is None and patches.crop == 256
    assert patches.small_block[2:] == (137, 137)
    cut = list(patches)
    assert len(cut) == 9 and {p.split for p in cut} == {"train"}  # no train tile dropped for an empty block
    big = extract_patches(hgsc_region, 128, 0.5, "20x", 0.075, np.random.default_rng(0))
    assert not big.whole_region and big.block is not None


def test_small_regions_hold_out_whole_regions_said_and_recorded(small_regions, tmp_path):
    res = _prepare(small_regions, tmp_path / "store")
    assert res.exit_code == 0, res.output
    assert "note:" in res.stderr and "smaller than one crop (256 px)" in res.stderr and "whole region" in res.stderr
    store = PatchStore(tmp_path / "store")
    train, test = store.indices("train"), store.indices("test")
    assert len(train) + len(test) == 81 and len(test) == 9  # one region of nine patches: 11 %, nearest to 7.5 %
    assert store.counts["test"]["patches"] == 9 and store.counts["train"]["patches"] == 72
    assert sum(store.counts["test"]["nuclei"].values()) > 0
    (entry,) = store.meta["whole_region_holdout"]
    assert entry["regions"] == 9 and entry["test_patches"] == 9 and entry["patches"] == 81
    test_sources = {store.records[i]["source"] for i in test}
    assert test_sources == set(entry["test_regions"]) and len(test_sources) == 1
    assert not test_sources & {store.records[i]["source"] for i in train}  # whole regions: nothing shared
    _assert_train_test_disjoint(store)
    # the seed chooses: the same seed, the same region
    again = _prepare(small_regions, tmp_path / "again")
    assert again.exit_code == 0
    assert PatchStore(tmp_path / "again").meta["whole_region_holdout"] == store.meta["whole_region_holdout"]


def test_one_small_region_stops_and_names_the_option(small_regions, tmp_path):
    src = tmp_path / "one"
    src.mkdir()
    for name in ("r11.png", "r11_inst.png", "r11_type.png", "classes.txt"):
        (src / name).write_bytes((small_regions / name).read_bytes())
    line = _one_line_error(_prepare(src, tmp_path / "store"), "r11.png", "7.5 % hold-out block (137x137 px)",
                           "256 px", "--holdout 0")
    assert "holdout=" not in line
    assert not (tmp_path / "store").exists()
    _no_debris(tmp_path)
    ok = _prepare(src, tmp_path / "store", "--holdout", "0")  # asked for: no test split, no note
    assert ok.exit_code == 0, ok.output
    assert "note:" not in ok.stderr
    assert PatchStore(tmp_path / "store").indices("test") == []


def test_regions_large_enough_keep_their_blocks(hgsc_region, tmp_path):
    store = prepare_nuclei([hgsc_region], tmp_path / "s", patch=64, overlap=0.5, magnification="20x", seed=0,
                           progress=False)
    assert "whole_region_holdout" not in store.meta and store.indices("test")
    _assert_train_test_disjoint(store)


# ---------------------------------------------------------------------------------------------- disk full: prepare
def test_prepare_into_a_full_disk_is_one_line_and_keeps_the_old_store(small_regions, tmp_path, monkeypatch):
    assert _prepare(small_regions, tmp_path / "store").exit_code == 0
    before = _digest(tmp_path / "store")
    monkeypatch.setattr(np, "save", _enospc)
    line = _one_line_error(_prepare(small_regions, tmp_path / "store", "--overwrite"),
                           str(tmp_path / "store"), "no space left", "needs at least", "MiB", "free")
    assert "--overwrite" not in line
    assert _digest(tmp_path / "store") == before  # the store that was there is untouched
    _no_debris(tmp_path)
    res = _prepare(small_regions, tmp_path / "new")
    _one_line_error(res, str(tmp_path / "new"), "no space left")
    assert not (tmp_path / "new").exists()
    _no_debris(tmp_path)


def test_full_disk_mid_store_and_writers_that_lose_the_errno(hgsc_region, tmp_path, monkeypatch):
    import histosynth.errors as errors_module

    real_save, calls = np.save, {"n": 0}

    def save_then_fill(file, arr, *args, **kwargs):  # numpy's own failure on a full disk has no errno
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(f"{arr.size} requested and 8176 written")
        return real_save(file, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", save_then_fill)
    monkeypatch.setattr(errors_module, "free_bytes", lambda path: 12_000)  # what a full disk leaves
    with pytest.raises(DiskFullError, match=r"s: no space left on the device for the patch store \(16 patches cut "
                                            r"before the disk filled\): it needs at least 5\d\d\.\d KiB \(11\.7 KiB free\)"):
        prepare_nuclei([hgsc_region], tmp_path / "s", patch=64, magnification="20x", shard_size=8, progress=False)
    assert calls["n"] == 4  # one whole shard (3 arrays) was written before the disk filled
    assert not (tmp_path / "s").exists()
    _no_debris(tmp_path)
    # with room on the disk the same errno-less error is not called a full disk
    monkeypatch.setattr(errors_module, "free_bytes", lambda path: 10 << 30)
    calls["n"] = 0
    with pytest.raises(OSError, match="requested and 8176 written") as info:
        prepare_nuclei([hgsc_region], tmp_path / "s", patch=64, magnification="20x", shard_size=8, progress=False)
    assert not isinstance(info.value, DiskFullError)
    _no_debris(tmp_path)


def test_is_disk_full_reads_the_writers_errors(tmp_path):
    from safetensors import SafetensorError

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    assert is_disk_full(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"), tmp_path)
    assert not is_disk_full(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),
                            tmp_path)  # plenty of room here
    assert is_disk_full(RuntimeError("unexpected pos 576 vs 534"), tmp_path, needed=1 << 60)
    assert not is_disk_full(DataError("corrupt"), tmp_path, needed=1 << 60)
    assert not is_disk_full(ValueError("x"), tmp_path, needed=1 << 60)


# ---------------------------------------------------------------------------------------------- other writers
def test_atomic_folder_and_exports_on_a_full_disk(tmp_path):
    from histosynth.atomic import atomic_folder

    out = tmp_path / "samples"
    out.mkdir()
    (out / "old.txt").write_text("kept")
    with pytest.raises(DiskFullError, match=r"samples: no space left on the device for this output: it needs at least"):
        with atomic_folder(out) as partial:
            (partial / "a.png").write_bytes(b"x" * 5000)
            _enospc()
    assert (out / "old.txt").read_text() == "kept" and [p.name for p in out.iterdir()] == ["old.txt"]
    _no_debris(tmp_path)
    with pytest.raises(RuntimeError, match="CUDA out of memory"):  # other errors pass as they are
        with atomic_folder(out):
            raise RuntimeError("CUDA out of memory")
    _no_debris(tmp_path)

    pipe = tmp_path / "run" / "pipeline"
    ckpt.write_atomically(pipe, lambda tmp: (tmp.mkdir(), (tmp / "w.bin").write_bytes(b"0" * 4096)))

    def half_written(tmp):
        tmp.mkdir()
        (tmp / "w.bin").write_bytes(b"1" * 100)
        _enospc()

    with pytest.raises(DiskFullError, match=r"pipeline: no space left on the device for pipeline: it needs about 4\.0 KiB"):
        ckpt.write_atomically(pipe, half_written)
    assert (pipe / "w.bin").read_bytes() == b"0" * 4096
    assert not list(pipe.parent.glob(".tmp-*"))


def test_latent_cache_reserves_its_file_and_cleans_up(tmp_path, monkeypatch):
    import os

    from histosynth.diffusion.latent_cache import _write_npy_atomically

    final = tmp_path / "cache" / "latents-k.npy"
    filled = []
    monkeypatch.setattr(os, "posix_fallocate", _enospc, raising=False)
    with pytest.raises(DiskFullError, match=r"latents-k\.npy: no space left on the device for the latent cache: "
                                            r"it needs about 3\.1 MiB"):
        _write_npy_atomically(final, (200, 4, 1024), filled.append, {"what": "test"})
    assert filled == [] and list(final.parent.iterdir()) == []  # nothing memory-mapped into a full disk
    monkeypatch.undo()

    def encoder_fails(arr):
        raise RuntimeError("the encoder failed")

    with pytest.raises(RuntimeError, match="the encoder failed"):
        _write_npy_atomically(final, (2, 3), encoder_fails, {})
    assert list(final.parent.iterdir()) == []
    _write_npy_atomically(final, (2, 3), lambda a: a.fill(1.5), {"what": "ok"})
    assert np.load(final).sum() == 9.0 and not [p for p in final.parent.iterdir() if p.name.startswith(".")]


# ---------------------------------------------------------------------------------------------- disk full: training
def _losses(run: Path) -> list[dict]:
    return [json.loads(r) for r in (run / "losses.jsonl").read_text().splitlines() if r]


def _train(recipe_file: Path, store: Path, run: Path, *extra: str):
    return CliRunner().invoke(main, ["train", "--recipe", str(recipe_file), "--data", str(store), "--out", str(run),
                                     "--max-steps", "6", *extra])


@pytest.mark.parametrize("how", ["safetensors", "torch"])
def test_checkpoint_on_a_full_disk_then_resume_exactly(hgsc_store, tmp_path, monkeypatch, how):
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    import histosynth.errors as errors_module
    import histosynth.training.engine as engine

    recipe_file = tmp_path / "micro.yaml"
    recipe_file.write_text(yaml.safe_dump(json.loads(json.dumps(micro_recipe(checkpoint_every=2).to_dict()))))
    ref = _train(recipe_file, hgsc_store, tmp_path / "ref")
    assert ref.exit_code == 0, ref.output

    run = tmp_path / "run"
    kept: dict = {}
    if how == "safetensors":  # the EMA weights of step 4: safetensors' own error on a full disk
        real = engine.save_file

        def save_file(tensors, filename, *args, **kwargs):
            if "step-0000004" in str(filename):
                kept.update(_digest(ckpt.checkpoint_dir(run, 2)))
                raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
            return real(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(engine, "save_file", save_file)
    else:  # accelerate's torch.save of the optimizer: an error that names no cause, on a disk with no room left
        real = torch.save

        def save(obj, f, *args, **kwargs):
            if "step-0000004" in str(f):
                kept.update(_digest(ckpt.checkpoint_dir(run, 2)))
                monkeypatch.setattr(errors_module, "free_bytes", lambda path: 4096)
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
            return real(obj, f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", save)
    failed = _train(recipe_file, hgsc_store, run)
    _one_line_error(failed, str(ckpt.checkpoint_dir(run, 4)), "no space left on the device for a checkpoint",
                    "needs about", "--resume", "step-0000002")
    monkeypatch.undo()  # space is free again
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-0000002"]
    assert _digest(ckpt.checkpoint_dir(run, 2)) == kept  # the complete checkpoint is untouched
    assert not list((run / "checkpoints").glob(".tmp-*"))

    resumed = _train(recipe_file, hgsc_store, run, "--resume")
    assert resumed.exit_code == 0, resumed.output
    ref_rows, run_rows = _losses(tmp_path / "ref"), _losses(run)
    assert [r["step"] for r in run_rows] == list(range(1, 7))
    assert [r["loss"] for r in run_rows] == [r["loss"] for r in ref_rows]
    a = load_file(str(ckpt.checkpoint_dir(tmp_path / "ref", 6) / "ema.safetensors"))
    b = load_file(str(ckpt.checkpoint_dir(run, 6) / "ema.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_export_on_a_full_disk_after_the_last_checkpoint_is_redone_by_resume(hgsc_store, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    recipe_file = tmp_path / "micro.yaml"
    recipe_file.write_text(yaml.safe_dump(json.loads(json.dumps(micro_recipe(checkpoint_every=3).to_dict()))))
    ref = _train(recipe_file, hgsc_store, tmp_path / "ref")
    assert ref.exit_code == 0, ref.output

    run, real, calls = tmp_path / "run", ckpt.write_atomically, {"n": 0}

    def write_atomically(final, write, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the export of step 6, the last: the disk fills half-way
            def write(tmp):
                tmp.mkdir()
                (tmp / "model_index.json").write_text("{}")
                _enospc()
        return real(final, write, *args, **kwargs)

    monkeypatch.setattr(ckpt, "write_atomically", write_atomically)
    failed = _train(recipe_file, hgsc_store, run)
    _one_line_error(failed, str(run / "pipeline"), "for the export", "needs about", "--resume", "step-0000006")
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-0000003", "step-0000006"]
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    step3 = load_file(str(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))  # still step 3's

    resumed = _train(recipe_file, hgsc_store, run, "--resume")
    assert resumed.exit_code == 0, resumed.output
    a = load_file(str(tmp_path / "ref" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert any(not (step3[k] == b[k]).all() for k in b)
    assert [r["step"] for r in _losses(run)] == list(range(1, 7))


def test_loss_log_on_a_full_disk_keeps_whole_rows(tmp_path):
    from types import SimpleNamespace

    from histosynth.training.engine import _log_row

    step2 = ckpt.checkpoint_dir(tmp_path, 2)
    step2.mkdir(parents=True)
    (step2 / "trainer_state.json").write_text('{"step": 2}')
    (step2 / "model.safetensors").write_bytes(b"0" * 3000)
    (tmp_path / "losses.jsonl").write_text('{"step": 1}\n')

    class FullLog:  # the disk fills in the middle of a row
        def __init__(self, f):
            self.f = f

        def tell(self):
            return self.f.tell()

        def write(self, text):
            self.f.write(text[:4])
            self.f.flush()
            _enospc()

        def flush(self):
            self.f.flush()

        def close(self):
            self.f.close()

    with open(tmp_path / "losses.jsonl", "a") as f:
        with pytest.raises(DiskFullError, match=r"losses\.jsonl: no space left on the device for the loss log and the "
                                                r"next checkpoint: it needs about 2\.9 KiB .*--resume\) from step-0000002"):
            _log_row(FullLog(f), SimpleNamespace(run=tmp_path), '{"step": 2}')
    assert (tmp_path / "losses.jsonl").read_text() == '{"step": 1}\n'
