"""The command line on bad input: exit code 2, one line naming the file, no traceback; no silent overwrite."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from click.testing import CliRunner
from PIL import Image

from histosynth.cli import main


def _folder(tmp_path: Path, size=(64, 64), label_size=None, max_type=2) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(src / "r1.png")
    inst = np.zeros(label_size or size, np.uint16)
    inst[10:20, 10:20], inst[30:40, 30:40] = 1, 2
    typ = np.zeros(label_size or size, np.uint8)
    typ[inst == 1], typ[inst == 2] = 1, max_type
    Image.fromarray(inst).save(src / "r1_inst.png")
    Image.fromarray(typ).save(src / "r1_type.png")
    (src / "classes.txt").write_text("tumour\nimmune\n")
    return src


def _prepare(src: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["prepare", "nuclei", "--format", "folder", str(src), "--out", str(out), "--patch", "32",
                                     "--magnification", "20x", "--source-magnification", "20x", *extra])


def _assert_user_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error:" in result.output
    for needle in needles:
        assert needle in result.output, result.output


def test_prepare_good_folder_then_refuses_to_overwrite(tmp_path):
    src = _folder(tmp_path)
    ok = _prepare(src, tmp_path / "store", "--holdout", "0")  # one small region: a hold-out would be refused
    assert ok.exit_code == 0, ok.output
    assert (tmp_path / "store" / "store.json").is_file()
    _assert_user_error(_prepare(src, tmp_path / "store", "--holdout", "0"), "store", "--overwrite")
    assert _prepare(src, tmp_path / "store", "--overwrite", "--holdout", "0").exit_code == 0


def test_corrupt_image(tmp_path):
    src = _folder(tmp_path)
    data = (src / "r1.png").read_bytes()
    (src / "r1.png").write_bytes(data[: len(data) // 2])
    _assert_user_error(_prepare(src, tmp_path / "store"), "r1.png")
    assert not (tmp_path / "store").exists()  # no partial store that looks complete


def test_empty_image_file(tmp_path):
    src = _folder(tmp_path)
    (src / "r1.png").write_bytes(b"")
    _assert_user_error(_prepare(src, tmp_path / "store"), "r1.png")


def test_image_label_size_mismatch(tmp_path):
    _assert_user_error(_prepare(_folder(tmp_path, label_size=(60, 64)), tmp_path / "store"), "r1")


def test_type_id_outside_declared_classes(tmp_path):
    _assert_user_error(_prepare(_folder(tmp_path, max_type=5), tmp_path / "store"), "r1_type.png", "5")


def test_missing_label_file(tmp_path):
    src = _folder(tmp_path)
    (src / "r1_inst.png").unlink()
    _assert_user_error(_prepare(src, tmp_path / "store"), "r1")


def test_empty_source(tmp_path):
    (tmp_path / "empty").mkdir()
    _assert_user_error(_prepare(tmp_path / "empty", tmp_path / "store"), "empty")


def test_missing_source(tmp_path):
    _assert_user_error(_prepare(tmp_path / "nope", tmp_path / "store"), "nope")


def test_train_on_partial_store_and_unknown_recipe(tmp_path):
    (tmp_path / "partial").mkdir()
    r = CliRunner().invoke(main, ["train", "--recipe", "nasdm-tiny-cpu", "--data", str(tmp_path / "partial"), "--out", str(tmp_path / "run")])
    _assert_user_error(r, "partial")
    r = CliRunner().invoke(main, ["train", "--recipe", "nasdm-nope", "--data", str(tmp_path / "partial"), "--out", str(tmp_path / "run")])
    _assert_user_error(r, "nasdm-nope", "nasdm-tiny-cpu")


def test_recipe_typo_names_file_and_key(tmp_path):
    bad = tmp_path / "r.yaml"
    from histosynth.recipes import RECIPE_DIR

    bad.write_text((RECIPE_DIR / "nasdm-tiny-cpu.yaml").read_text().replace("lambda_vlb", "lamda_vlb"))
    r = CliRunner().invoke(main, ["train", "--recipe", str(bad), "--data", str(tmp_path), "--out", str(tmp_path / "run")])
    _assert_user_error(r, "r.yaml", "diffusion.lamda_vlb")


def test_sample_refuses_existing_output(tmp_path, hgsc_store):
    from conftest import micro_recipe
    from histosynth.training.nasdm import train

    train(micro_recipe(), hgsc_store, tmp_path / "run", max_steps=2, progress=False)
    args = ["sample", "--model", str(tmp_path / "run"), "--masks", str(hgsc_store), "--num", "3", "--steps", "3",
            "--sampler", "ddim", "--out", str(tmp_path / "s")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    names = sorted(p.name for p in (tmp_path / "s" / "images").iterdir())
    assert names == ["00000.png", "00001.png", "00002.png"]
    assert sorted(p.name for p in (tmp_path / "s" / "masks").iterdir()) == names
    import json

    rows = [json.loads(x) for x in (tmp_path / "s" / "samples.jsonl").read_text().splitlines()]
    assert all(r_["num_inference_steps"] == 3 and r_["split"] == "test" and r_["seed"] == 0 for r_ in rows)
    _assert_user_error(CliRunner().invoke(main, args), "--overwrite")

    # evaluate fid takes the sample output directory itself (its images/, not its masks or real patches)
    r = CliRunner().invoke(main, ["evaluate", "fid", "--real", str(hgsc_store), "--split", "test", "--generated",
                                  str(tmp_path / "s"), "--features", "effnet-lite0", "--out", str(tmp_path / "m.json")])
    assert r.exit_code == 0, r.output
    metrics = json.loads((tmp_path / "m.json").read_text())
    from histosynth.data.store import PatchStore

    assert metrics["n_generated"] == 3 and metrics["n_real"] == len(PatchStore(hgsc_store).indices("test"))
    assert metrics["fid"] > 0 and metrics["protocol"]["extractor"] == "effnet-lite0"
