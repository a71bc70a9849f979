"""The nuclei segmenter used as an evaluation instrument: targets, post-processing, save/load, CLI, and a brief
training on real CoNSeP that must beat a trivial (Otsu on haematoxylin) baseline on real test patches."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from histosynth.evaluate.segmenter import (
    PostprocessConfig,
    distance_targets,
    evaluate_segmenter,
    load_segmenter,
    otsu_baseline,
    postprocess,
    score_segmentation,
    train_segmenter,
)


def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


# --------------------------------------------------------------------------------------------- targets
def test_distance_target_of_a_square_and_two_touching_nuclei():
    inst = np.zeros((12, 20), np.int32)
    inst[1:6, 1:6] = 1  # 5x5 square: EDT to outside is 1 on the border ring, 2 next, 3 at the centre
    inst[6:11, 8:13] = 2
    inst[6:11, 13:18] = 3  # touches nucleus 2 along a column
    d = distance_targets(inst)
    assert d[inst == 0].max() == 0
    assert d[3, 3] == pytest.approx(1.0)  # centre of the square
    assert d[1, 3] == pytest.approx(1 / 3)  # border of the square: distance 1 of a maximum 3
    assert d[2, 3] == pytest.approx(2 / 3)
    # each of the touching nuclei has its own peak of 1 and a valley (its border value) where they meet
    assert d[8, 10] == pytest.approx(1.0) and d[8, 15] == pytest.approx(1.0)
    assert d[8, 12] == pytest.approx(1 / 3) and d[8, 13] == pytest.approx(1 / 3)


def test_distance_target_at_the_image_edge_counts_the_edge_as_border():
    inst = np.zeros((6, 6), np.int32)
    inst[0:3, 0:6] = 1  # a band touching the top edge: row 0 is its border
    d = distance_targets(inst)
    assert d[0, 3] == pytest.approx(0.5) and d[1, 3] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------ post-processing
def _maps_for(inst, types, k=2, sharp=8.0):
    """Logits that put each pixel in its true class and the true distance map: postprocess must recover inst."""
    onehot = np.eye(k + 1, dtype=np.float32)[types]  # (H, W, K+1)
    return (onehot.transpose(2, 0, 1) * 2 - 1) * sharp, distance_targets(inst)


def test_postprocess_splits_touching_nuclei_and_votes_types():
    shape = (40, 60)
    inst = np.zeros(shape, np.int32)
    inst[_disk(shape, 20, 18, 8)] = 1
    inst[_disk(shape, 20, 32, 8) & (inst == 0)] = 2  # overlaps disk 1's rim: the two touch
    inst[_disk(shape, 8, 50, 4)] = 3
    types = np.select([inst == 1, inst == 2, inst == 3], [1, 2, 2], 0)
    noisy = types.copy()
    noisy[18:20, 30:32] = 1  # a few wrong-type pixels inside nucleus 2: the majority vote keeps it type 2
    logits, dist = _maps_for(inst, noisy)
    pred_inst, pred_type = postprocess(logits, dist)
    assert pred_inst.max() == 3
    # every predicted instance corresponds to one true one (IoU > 0.8) and carries its type
    for label in range(1, 4):
        true = inst == label
        hit = np.bincount(pred_inst[true]).argmax()
        iou = (true & (pred_inst == hit)).sum() / (true | (pred_inst == hit)).sum()
        assert iou > 0.8
        assert set(np.unique(pred_type[pred_inst == hit])) == {types[true][0]}


def test_postprocess_drops_specks_smaller_than_min_area():
    inst = np.zeros((20, 20), np.int32)
    inst[2:4, 2:4] = 1  # 4 px
    inst[8:16, 8:16] = 2
    types = (inst > 0).astype(np.int64)
    logits, dist = _maps_for(inst, types, k=1)
    pred, _ = postprocess(logits, dist, PostprocessConfig(min_area=10))
    assert pred.max() == 1 and (pred[8:16, 8:16] == 1).all() and pred[2:4, 2:4].max() == 0


def test_score_segmentation_perfect_and_empty():
    inst = np.zeros((32, 32), np.int32)
    inst[_disk(inst.shape, 10, 10, 5)] = 1
    inst[_disk(inst.shape, 22, 22, 5)] = 2
    types = np.where(inst == 1, 1, np.where(inst == 2, 2, 0))
    perfect = score_segmentation([inst], [types], [inst], [types], ["a", "b"])
    assert perfect["dice"] == pytest.approx(1) and perfect["aji"] == pytest.approx(1)
    assert perfect["pq"] == pytest.approx(1) and perfect["mpq"] == pytest.approx(1)
    empty = score_segmentation([inst], [types], [np.zeros_like(inst)], [np.zeros_like(types)], ["a", "b"])
    assert empty["pq"] == 0 and empty["dice"] == 0


# ----------------------------------------------------------------------------------- real CoNSeP run
@pytest.fixture(scope="module")
def consep_store(shared_data, tmp_path_factory):
    from histosynth.data.formats import read_nuclei
    from histosynth.data.prepare_labelled import prepare_nuclei

    out = tmp_path_factory.mktemp("seg") / "consep-256"
    prepare_nuclei(read_nuclei("consep", shared_data / "consep"), out, patch=256, overlap=0.0, magnification="40x",
                   source_magnification="40x", seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def trained(consep_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("seg") / "seg200"
    train_segmenter(consep_store, out, steps=200, batch_size=8, crop=128, seed=0, progress=False)
    return out


def test_brief_training_on_real_consep_beats_the_otsu_baseline(consep_store, trained):
    from histosynth.data.store import PatchStore

    store = PatchStore(consep_store)
    idx = store.indices("test")[::8]  # 28 real test patches, from tiles never seen in training
    seg = load_segmenter(trained)
    assert seg.class_names == tuple(store.class_names)
    ours = evaluate_segmenter(seg, store, indices=idx)

    class Otsu:  # every nucleus typed as the commonest type; no learning at all
        class_names = store.class_names
        batch_size = 8

        def predict(self, images):
            return otsu_baseline(images, type_id=4)

    base = evaluate_segmenter(Otsu(), store, indices=idx)
    assert ours["dice"] > base["dice"] + 0.05
    assert ours["pq"] > base["pq"] + 0.03
    # It tells lymphocytes apart, which Otsu cannot: on the true nuclei's pixels its inflammatory probability ranks
    # inflammatory above every other type (ROC AUC; Otsu's constant type is 0.5). Not mPQ or PQ per type: after 200
    # steps the argmax type flips between runs that differ only in thread count or seed (inflammatory PQ 0.00-0.32,
    # mPQ 0.014-0.106 over four runs, Otsu 0.011), while this AUC stayed within 0.88-0.94.
    from sklearn.metrics import roc_auc_score

    items = [store[int(i)] for i in idx]
    probs, _ = seg.predict_maps(np.stack([it["image"] for it in items]))
    types = np.stack([it["type_map"] for it in items])
    nuclei = types > 0
    inflammatory = 1 + list(store.class_names).index("inflammatory")
    assert roc_auc_score(types[nuclei] == inflammatory, probs[:, inflammatory][nuclei]) > 0.8
    # the run's record: losses fell, settings and classes kept for later readers
    rows = [json.loads(r) for r in (trained / "losses.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and np.mean([r["loss"] for r in rows[-20:]]) < 0.6 * np.mean([r["loss"] for r in rows[:20]])
    info = json.loads((trained / "segmenter" / "segmenter.json").read_text())
    assert info["class_names"] == list(store.class_names) and info["encoder_weights"].startswith("imagenet")
    assert (trained / "loss.png").stat().st_size > 0


@pytest.fixture(scope="module")
def small_consep_store(shared_data, tmp_path_factory):
    """Four real CoNSeP test patches, as a CoNSeP folder in its native layout and then a store."""
    import shutil

    from histosynth.data.formats import read_nuclei
    from histosynth.data.prepare_labelled import prepare_nuclei

    root = tmp_path_factory.mktemp("seg") / "consep4"
    for sub in ("images", "labels"):
        (root / "test" / sub).mkdir(parents=True)
    for image in sorted((shared_data / "consep" / "test" / "images").glob("*.jpg"))[:4]:
        shutil.copy(image, root / "test" / "images")
        shutil.copy(shared_data / "consep" / "test" / "labels" / f"{image.stem}.mat", root / "test" / "labels")
    out = root.parent / "consep4-store"
    prepare_nuclei(read_nuclei("consep", root), out, patch=256, overlap=0.0, magnification="40x",
                   source_magnification="40x", seed=0, progress=False)
    return out


def test_cli_predict_and_evaluate(small_consep_store, trained, tmp_path):
    from histosynth.cli import main

    consep_store = small_consep_store
    runner = CliRunner()
    out = tmp_path / "pred"
    res = runner.invoke(main, ["seg", "predict", "--model", str(trained), "--images", str(consep_store),
                               "--split", "test", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(r) for r in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and (out / "overview.png").is_file()
    from PIL import Image

    inst = np.asarray(Image.open(out / "instances" / f"{rows[0]['name']}.png"))
    assert inst.shape == (256, 256) and len(np.unique(inst)) - 1 == rows[0]["nuclei"]
    # the same folder again without --overwrite: refused, nothing changed
    res = runner.invoke(main, ["seg", "predict", "--model", str(trained), "--images", str(consep_store),
                               "--split", "test", "--out", str(out)])
    assert res.exit_code == 2 and "--overwrite" in res.output

    scores = tmp_path / "scores.json"
    res = runner.invoke(main, ["seg", "evaluate", "--model", str(trained), "--data", str(consep_store),
                               "--split", "test", "--out", str(scores)])
    assert res.exit_code == 0, res.output
    s = json.loads(scores.read_text())
    assert s["n_images"] == 4 and 0 < s["pq"] <= 1 and set(s["pq_per_type"]) == set(
        ["other", "inflammatory", "epithelial", "spindle-shaped"])


def test_bad_segmenter_folders(tmp_path, hgsc_store):
    from histosynth.cli import main
    from histosynth.errors import DataError

    with pytest.raises(DataError, match="not found"):
        load_segmenter(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="config.json"):
        load_segmenter(tmp_path / "empty")
    res = CliRunner().invoke(main, ["seg", "evaluate", "--model", str(tmp_path / "empty"), "--data", str(hgsc_store)])
    assert res.exit_code == 2 and "empty" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(main, ["seg", "train", "--data", str(hgsc_store), "--out", str(tmp_path / "s"),
                                    "--crop", "48"])
    assert res.exit_code == 2 and "multiple of 32" in res.output


def test_segmenter_training_resumes_exactly_on_the_engine(consep_store, tmp_path, monkeypatch):
    """The segmenter trains on the one engine: a run stopped after its first checkpoint and resumed (through the
    engine's `train` command, from the recipe it saved) logs the same losses and exports the same weights as an
    uninterrupted one; other settings on resume are refused."""
    import yaml

    from histosynth.cli import main
    from histosynth.errors import OutputExistsError

    # the CLI picks torch's threads from the cores free at that moment; the resume trains on the run's own count
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    settings = dict(steps=4, batch_size=2, crop=64, seed=3, imagenet_encoder=False, checkpoint_every=2, log_every=1)
    train_segmenter(consep_store, tmp_path / "ref", progress=False, **settings)
    run = tmp_path / "run"
    train_segmenter(consep_store, run, max_steps=2, progress=False, **settings)
    from histosynth.errors import DataError

    with pytest.raises(DataError, match=r"exported at step 2 of 4: its run stopped early"):
        load_segmenter(run)  # a half-trained export is not the instrument
    assert load_segmenter(run, allow_unfinished=True).class_names
    with (run / "losses.jsonl").open("a") as log:  # a step logged after the checkpoint, then lost with the process
        log.write(json.dumps({"step": 3, "loss": 99.0}) + "\n")
    with pytest.raises(OutputExistsError):
        train_segmenter(consep_store, run, progress=False, **settings)
    res = CliRunner().invoke(main, ["seg", "train", "--data", str(consep_store), "--out", str(run), "--resume",
                                    "--steps", "5", "--batch-size", "2", "--crop", "64", "--seed", "3", "--no-imagenet"])
    assert res.exit_code == 2 and "recipe differs" in res.output
    recipe = tmp_path / "seg.yaml"
    recipe.write_text(yaml.safe_dump(yaml.safe_load((run / "recipe.yaml").read_text())["recipe"]))
    res = CliRunner().invoke(main, ["train", "segmenter", "--recipe", str(recipe), "--data", str(consep_store),
                                    "--out", str(run), "--resume"])
    assert res.exit_code == 0, res.output

    def rows(folder):
        return [json.loads(r) for r in (folder / "losses.jsonl").read_text().splitlines()]

    assert [r["step"] for r in rows(run)] == [1, 2, 3, 4] and rows(run) == rows(tmp_path / "ref")
    weights = "segmenter/diffusion_pytorch_model.safetensors"
    assert (run / weights).read_bytes() == (tmp_path / "ref" / weights).read_bytes()
    assert load_segmenter(run).class_names == load_segmenter(run / "segmenter").class_names
    info = json.loads((run / "segmenter" / "segmenter.json").read_text())
    assert info["train"]["train"]["crop"] == 64 and info["encoder_weights"] == "random"
    res = CliRunner().invoke(main, ["train", "diffusion", "--recipe", str(recipe), "--data", str(consep_store),
                                    "--out", str(tmp_path / "x")])
    assert res.exit_code == 2 and "trains a nuclei segmenter" in res.output


def test_segmenter_settings_and_resume_identity(consep_store, tmp_path):
    from histosynth.errors import DataError, HistosynthError
    from histosynth.evaluate.segmenter import segmenter_recipe

    assert segmenter_recipe(learning_rate=5e-4).train.learning_rate == 5e-4 == segmenter_recipe(lr=5e-4).train.learning_rate
    with pytest.raises(TypeError, match="not both"):
        segmenter_recipe(lr=1e-3, learning_rate=5e-4)
    with pytest.raises(HistosynthError, match="decoder_channels needs 5 widths"):
        segmenter_recipe(decoder_channels=(64, 32))
    # a run trained with extra items does not resume without them (its data order would change silently)
    from histosynth.data.store import PatchStore

    store = PatchStore(consep_store)
    extra = [store[i] for i in store.indices("test")[:3]]
    settings = dict(steps=4, batch_size=2, crop=64, imagenet_encoder=False, checkpoint_every=2, progress=False)
    train_segmenter(consep_store, tmp_path / "run", max_steps=2, extra_train=extra, **settings)
    with pytest.raises(HistosynthError, match=r"cannot resume: this run was trained with other extra items .*3 items, now 0"):
        train_segmenter(consep_store, tmp_path / "run", resume=True, **settings)
    train_segmenter(consep_store, tmp_path / "run", resume=True, extra_train=extra, **settings)
    assert json.loads((tmp_path / "run" / "segmenter" / "segmenter.json").read_text())["step"] == 4
    # another method's run given as a segmenter says so
    (tmp_path / "nasdm").mkdir()
    (tmp_path / "nasdm" / "recipe.yaml").write_text("recipe: {method: nasdm}\ndata: x\n")
    with pytest.raises(DataError, match="a training run of method 'nasdm', not a nuclei segmenter"):
        load_segmenter(tmp_path / "nasdm")
