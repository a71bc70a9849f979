"""Downstream usefulness: `evaluate augment` (segmenter on real vs real + synthetic) and `evaluate cas`.

A "sample directory" is built by the test from real CoNSeP patches in the layout `histosynth sample` writes
(images/, labels/N_inst.png, labels/N_type.png, samples.jsonl), i.e. a perfect generator whose outputs are
real tissue; that makes some results known in advance (CAS trained on those pairs equals the real-trained
classifier)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from histosynth.evaluate.cas import classification_accuracy_score, dominant_type


@pytest.fixture(scope="module")
def small_store(shared_data, tmp_path_factory):
    """24 real CoNSeP train and 12 test patches in CoNSeP's native layout, then a store at 40x."""
    from histosynth.data.formats import read_nuclei
    from histosynth.data.prepare_labelled import prepare_nuclei

    root = tmp_path_factory.mktemp("down") / "consep"
    for split, n in (("train", 24), ("test", 12)):
        for sub in ("images", "labels"):
            (root / split / sub).mkdir(parents=True)
        images = sorted((shared_data / "consep" / split / "images").glob("*.jpg"))
        for image in images[:: max(1, len(images) // n)][:n]:
            shutil.copy(image, root / split / "images")
            shutil.copy(shared_data / "consep" / split / "labels" / f"{image.stem}.mat", root / split / "labels")
    out = root.parent / "store"
    prepare_nuclei(read_nuclei("consep", root), out, patch=256, overlap=0.0, magnification="40x",
                   source_magnification="40x", seed=0, progress=False)
    return out


def write_sample_dir(store_path, out, indices, extra_row=None):
    """The layout of `histosynth sample`, with the store's own images standing in for generated ones."""
    from histosynth.data.store import PatchStore

    store = PatchStore(store_path)
    for sub in ("images", "labels"):
        (out / sub).mkdir(parents=True)
    with open(out / "samples.jsonl", "w") as f:
        for n, i in enumerate(indices):
            item, name = store[i], f"{n:05d}"
            Image.fromarray(np.asarray(item["image"])).save(out / "images" / f"{name}.png")
            Image.fromarray(np.asarray(item["inst_map"]).astype(np.uint16)).save(out / "labels" / f"{name}_inst.png")
            Image.fromarray(np.asarray(item["type_map"]).astype(np.uint8)).save(out / "labels" / f"{name}_type.png")
            row = {"name": name, "image": f"images/{name}.png", "inst_map": f"labels/{name}_inst.png",
                   "type_map": f"labels/{name}_type.png", "store": str(store_path), "store_index": int(i)}
            row.update((extra_row or (lambda i: {}))(i))
            f.write(json.dumps(row) + "\n")
    return out


# ------------------------------------------------------------------------------------------------- CAS
def test_dominant_type_against_hand_built_maps():
    inst = np.zeros((10, 10), np.int32)
    types = np.zeros_like(inst)
    for k, (y, t) in enumerate([(0, 2), (3, 2), (6, 1)], start=1):  # two nuclei of type 2, one of type 1
        inst[y : y + 2, 0:6 if t == 1 else 2] = k  # the type-1 nucleus is the largest: counting is per nucleus
        types[inst == k] = t
    assert dominant_type(inst, types, ["a", "b", "c"]) == "b"
    assert dominant_type(np.zeros_like(inst), types * 0, ["a", "b"]) == "none"
    inst[inst == 2] = 0  # a tie (one of each): the lower type id wins
    assert dominant_type(inst, np.where(inst > 0, types, 0), ["a", "b"]) == "a"


def test_cas_of_a_perfect_generator_equals_the_real_trained_classifier(small_store, tmp_path):
    from histosynth.data.store import PatchStore

    store = PatchStore(small_store)
    synthetic = write_sample_dir(small_store, tmp_path / "synthetic", store.indices("train"))
    result = classification_accuracy_score(small_store, synthetic, tmp_path / "cas.json")
    cas, real = result["cas (synthetic -> real test)"], result["real train -> real test"]
    # the "generated" pairs are the real train patches with their labels: the same classifier must result
    assert cas["accuracy"] == pytest.approx(real["accuracy"])
    assert cas["confusion"] == real["confusion"]
    assert cas["train_counts"] == real["train_counts"] and sum(cas["train_counts"].values()) == 24
    assert 0 <= cas["balanced_accuracy"] <= 1
    expected = [dominant_type(store[i]["inst_map"], store[i]["type_map"], store.class_names)
                for i in store.indices("test")]
    assert sum(sum(row) for row in cas["confusion"]["matrix"]) == len(expected) == result["n"]["real_test"]
    assert json.loads((tmp_path / "cas.json").read_text())["protocol"]["label"] == "dominant-type"
    with pytest.raises(Exception, match="overwrite"):
        classification_accuracy_score(small_store, synthetic, tmp_path / "cas.json")


def test_cas_field_labels_and_their_errors(small_store, tmp_path):
    from histosynth.cli import main
    from histosynth.data.store import PatchStore

    store = PatchStore(small_store)
    level = {i: ("high" if i % 2 else "low") for i in range(len(store))}
    synthetic = write_sample_dir(small_store, tmp_path / "s", store.indices("train"), lambda i: {"til": level[i]})
    labels = tmp_path / "real_labels.jsonl"
    labels.write_text("".join(json.dumps({"store_index": i, "til": v}) + "\n" for i, v in level.items()))
    runner = CliRunner()
    res = runner.invoke(main, ["evaluate", "cas", "--real", str(small_store), "--synthetic", str(synthetic),
                               "--label", "field:til", "--real-labels", str(labels)])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert set(out["cas (synthetic -> real test)"]["train_counts"]) == {"high", "low"}
    res = runner.invoke(main, ["evaluate", "cas", "--real", str(small_store), "--synthetic", str(synthetic),
                               "--label", "field:tumor", "--real-labels", str(labels)])
    assert res.exit_code == 2 and "tumor" in res.output and "samples.jsonl" in res.output
    res = runner.invoke(main, ["evaluate", "cas", "--real", str(small_store), "--synthetic", str(synthetic),
                               "--label", "field:til"])
    assert res.exit_code == 2 and "--real-labels" in res.output


# --------------------------------------------------------------------------------------------- augment
def test_augment_trains_both_arms_on_the_asked_ratio(small_store, tmp_path):
    from histosynth.cli import main
    from histosynth.data.store import PatchStore

    store = PatchStore(small_store)
    synthetic = write_sample_dir(small_store, tmp_path / "s", store.indices("train")[:18])
    out = tmp_path / "aug"
    runner = CliRunner()
    res = runner.invoke(main, ["evaluate", "augment", "--real", str(small_store), "--synthetic", str(synthetic),
                               "--ratio", "0.5", "--steps", "4", "--batch-size", "2", "--crop", "64", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads((out / "augment.json").read_text())
    assert result["synthetic_pairs"] == 12 and result["real_train_patches"] == 24
    real_info = json.loads((out / "real" / "segmenter" / "segmenter.json").read_text())
    mixed_info = json.loads((out / "real+synthetic" / "segmenter" / "segmenter.json").read_text())
    assert real_info["extra_train_items"] == 0 and mixed_info["extra_train_items"] == 12
    assert real_info["train"] == mixed_info["train"]  # the only difference between the arms is the pool
    for arm in ("real", "real+synthetic"):
        assert result[arm]["n_images"] == 12 and set(result[arm]["pq_per_type"]) == set(store.class_names)
    assert result["delta"]["mpq"] == pytest.approx(result["real+synthetic"]["mpq"] - result["real"]["mpq"])
    assert (out / "augment_pq_per_type.png").stat().st_size > 0

    # more synthetic pairs than the directory holds: an error, never silently fewer
    res = runner.invoke(main, ["evaluate", "augment", "--real", str(small_store), "--synthetic", str(synthetic),
                               "--ratio", "1", "--out", str(tmp_path / "aug2")])
    assert res.exit_code == 2 and "needs 24 synthetic pairs" in res.output and "holds 18" in res.output
    assert not (tmp_path / "aug2").exists()


def test_augment_refuses_masks_of_other_classes(small_store, hgsc_store, tmp_path):
    from histosynth.data.store import PatchStore
    from histosynth.errors import DataError
    from histosynth.evaluate.augment import augmentation_benefit

    other = write_sample_dir(hgsc_store, tmp_path / "hgsc", PatchStore(hgsc_store).indices("train")[:4])
    with pytest.raises(DataError, match="classes"):
        augmentation_benefit(small_store, other, tmp_path / "x", ratio=0.1)
