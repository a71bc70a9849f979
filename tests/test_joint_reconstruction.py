"""`evaluate recon` on HistoSmith's joint first stage: image metrics on head A's image, and the `labels` section
(distance-map MAE, per-type Dice of the decoded mask, PQ / mPQ of the instances recovered from the decoded labels,
and the ceiling of the recovery rule on the true maps).

Real tissue: a 256 px corner of the bundled HGSC region as 16 patches of 32 px at 10x (3 classes), as in
tests/test_histosmith.py. Every number of the labels section is checked against an independent computation.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from histosynth.data.nuclei_maps import distance_targets, instances_from_maps
from histosynth.data.store import PatchStore
from histosynth.errors import DataError

CLASSES = ("connective", "inflammatory", "neoplastic")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(hgsc_corner_store) -> Path:
    return hgsc_corner_store


@pytest.fixture(scope="module")
def ae_recipe(joint_ae_recipe):
    return joint_ae_recipe


@pytest.fixture(scope="module")
def trained_run(store, ae_recipe, tmp_path_factory) -> Path:
    """A joint autoencoder run trained briefly (250 steps, no perceptual loss) on the real patches."""
    from histosynth.training import fit
    from histosynth.training.histosmith_autoencoder import JointAutoencoderTask

    run = tmp_path_factory.mktemp("joint-recon-run") / "ae"
    fit(JointAutoencoderTask(ae_recipe(steps=250, checkpoint_every=250), store, progress=False), run, progress=False)
    return run


@pytest.fixture(scope="module")
def untrained_model(ae_recipe):
    """A factory of untrained joint models (seed 0) for the given class names."""
    from histosynth.training.histosmith_autoencoder import make_joint_model

    def make(class_names=CLASSES):
        torch.manual_seed(0)
        return make_joint_model(ae_recipe(), class_names).eval()

    return make


def independent_labels(model, store: PatchStore, indices) -> dict:
    """The labels section recomputed from scratch: decode each patch, then numpy Dice / MAE and score_segmentation."""
    from histosynth.evaluate.segmenter import score_segmentation
    from histosynth.models.joint_autoencoder import joint_batch

    x = joint_batch(store, indices)
    with torch.no_grad():
        out = model.decode_heads(model.encode(x).latents)
    items = [store[i] for i in indices]
    true_inst = np.stack([it["inst_map"] for it in items])
    true_type = np.stack([it["type_map"] for it in items]).astype(np.int64)
    true_dist = np.stack([distance_targets(t) for t in true_inst])
    dist = out.distance[:, 0].numpy().astype(np.float64)
    pred = out.mask_logits.argmax(1).numpy()
    dice = {}
    for k, name in enumerate(CLASSES, start=1):
        p, t = pred == k, true_type == k
        dice[name] = 2 * (p & t).sum() / (p.sum() + t.sum()) if p.sum() + t.sum() else float("nan")
    fg = 2 * ((pred > 0) & (true_type > 0)).sum() / ((pred > 0).sum() + (true_type > 0).sum())
    probs = torch.softmax(out.mask_logits, 1).numpy()
    decoded = [instances_from_maps(p, d, probabilities=True) for p, d in zip(probs, dist)]
    onehot = [(np.arange(len(CLASSES) + 1)[:, None, None] == t).astype(np.float32) for t in true_type]
    ceiling = [instances_from_maps(o, d, probabilities=True) for o, d in zip(onehot, true_dist)]
    score = lambda maps: score_segmentation(true_inst, true_type, [m[0] for m in maps], [m[1] for m in maps],  # noqa: E731
                                            CLASSES)
    return {"distance_mae": float(np.abs(dist - true_dist).mean()), "dice": dice, "foreground": float(fg),
            "instances": score(decoded), "ceiling": score(ceiling), "image": (out.image.clamp(-1, 1) + 1) / 2}


def assert_scores_equal(got: dict, expected: dict):
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, dict):
            assert got[key].keys() == value.keys()
            np.testing.assert_allclose([got[key][n] for n in value], list(value.values()), rtol=1e-9, atol=1e-12)
        else:
            assert got[key] == pytest.approx(value, rel=1e-9, nan_ok=True), key


# ----------------------------------------------------------------------------------------------------------------
def test_labels_section_matches_an_independent_computation(store, trained_run, untrained_model):
    """Untrained and briefly trained model: every labels number equals a from-scratch recomputation, the image
    metrics are those of head A's image, and training improves the decoded labels (foreground Dice, PQ)."""
    from histosynth.evaluate.reconstruction import ReconstructionMetrics, evaluate_reconstruction
    from histosynth.models.autoencoders import load_autoencoder

    s = PatchStore(store)
    idx = s.indices("train")
    images = torch.stack([torch.from_numpy(s[i]["image"]).permute(2, 0, 1) for i in idx]).float() / 255
    trained, _ = load_autoencoder(trained_run)
    results = {}
    for name, model in (("untrained", untrained_model()), ("trained", trained)):
        evaluation = evaluate_reconstruction(model, s, split="train", batch_size=5)  # 5: batches of unequal size
        result, originals, recons = evaluation  # unpacks as before
        labels, ref = result["labels"], independent_labels(model, s, idx)
        assert labels["distance_mae"] == pytest.approx(ref["distance_mae"], rel=1e-6)
        assert labels["mask_dice"]["foreground"] == pytest.approx(ref["foreground"], rel=1e-12)
        for cls in CLASSES:
            assert labels["mask_dice"]["per_type"][cls] == pytest.approx(ref["dice"][cls], rel=1e-12, nan_ok=True)
        defined = [v for v in ref["dice"].values() if not np.isnan(v)]
        assert labels["mask_dice"]["mean_over_types"] == pytest.approx(np.mean(defined))
        assert_scores_equal(labels["instances"], ref["instances"])
        assert_scores_equal(labels["instances_from_true_maps"], ref["ceiling"])
        metrics = ReconstructionMetrics()
        metrics.update(images, ref["image"])
        for key, value in metrics.compute().items():
            assert result["metrics"][key] == pytest.approx(value, rel=1e-5), key
        assert result["autoencoder"]["class"] == "JointVQModel"
        assert "pack_joint_input" in result["protocol"]["input"] and result["protocol"]["class_names"] == list(CLASSES)
        rows = evaluation.grid_rows()  # original | reconstruction | true labels | decoded labels, one row per patch
        assert len(rows) == 8 and all(len(r) == 4 and all(t.shape == (32, 32, 3) for t in r) for r in rows)
        assert np.array_equal(rows[0][0], originals[0]) and np.array_equal(rows[0][1], recons[0])
        results[name] = labels
    before, after = results["untrained"], results["trained"]
    assert after["mask_dice"]["foreground"] > 0.85 and after["mask_dice"]["foreground"] > \
        before["mask_dice"]["foreground"] + 0.3, (before["mask_dice"], after["mask_dice"])
    assert after["distance_mae"] < 0.5 * before["distance_mae"]
    assert after["instances"]["pq"] > before["instances"]["pq"] + 0.3
    # the recovery ceiling depends on the true maps only, and is high on real nuclei
    assert json.dumps(after["instances_from_true_maps"]) == json.dumps(before["instances_from_true_maps"])  # NaN too
    assert before["instances_from_true_maps"]["pq"] > 0.8 and before["instances_from_true_maps"]["mpq"] > 0.8
    assert after["instances"]["pq"] <= after["instances_from_true_maps"]["pq"]


def test_a_perfect_stand_in_scores_the_ceiling(store, monkeypatch, untrained_model):
    """Heads that return the true maps (image, distance map and ±20 logits from the joint input itself): image
    metrics perfect, MAE 0, Dice 1 for the present types, and the decoded instances are the ceiling's."""
    import histosynth.evaluate.reconstruction as recon
    from histosynth.models.joint_autoencoder import JointDecoderOutput

    def perfect(_ae, inputs):
        x = inputs.float()
        return JointDecoderOutput(image=(x[:, :3] + 1) / 2, distance=(x[:, 3:4] + 1) / 2, mask_logits=20 * x[:, 4:])

    monkeypatch.setattr(recon, "reconstruct_joint", perfect)
    result, _, _ = recon.evaluate_reconstruction(untrained_model(), store, split="train")
    m, labels = result["metrics"], result["labels"]
    assert m["ssim"] == pytest.approx(1.0, abs=1e-6) and m["mse"] == pytest.approx(0.0, abs=1e-12)
    assert labels["distance_mae"] < 1e-7
    s = PatchStore(store)
    present = {name for k, name in enumerate(CLASSES, 1) if any((s[i]["type_map"] == k).any() for i in range(len(s)))}
    for name, value in labels["mask_dice"]["per_type"].items():
        assert value == 1.0 if name in present else np.isnan(value), name
    assert labels["mask_dice"]["foreground"] == 1.0
    ceiling = labels["instances_from_true_maps"]
    for key in ("pq", "dq", "sq", "mpq", "dice", "aji", "pq_image_mean"):
        assert labels["instances"][key] == pytest.approx(ceiling[key], abs=1e-6), key


def test_cli_writes_the_labels_section_and_the_four_column_grid(store, trained_run, tmp_path):
    from PIL import Image

    from histosynth.cli import main

    out = tmp_path / "recon.json"
    res = CliRunner().invoke(main, ["evaluate", "recon", "--autoencoder", str(trained_run), "--data", str(store),
                                    "--split", "train", "--num", "6", "--device", "cpu", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    labels = result["labels"]
    assert set(labels) == {"distance_mae", "mask_dice", "instances", "instances_from_true_maps"}
    assert set(labels["mask_dice"]["per_type"]) == set(CLASSES) and labels["instances"]["n_images"] == 6
    assert {"pq", "mpq", "pq_per_type", "aji"} <= set(labels["instances"])
    assert result["protocol"]["num_patches"] == 6 and "instances_from_true_maps" in result["protocol"]
    grid = Image.open(out.with_suffix(".png"))
    assert grid.size == (4 * 34 + 2, 6 * 34 + 2)  # 6 rows of original | reconstruction | true | decoded labels


def test_wrong_store_is_a_one_line_error_naming_the_store(store, tmp_path, untrained_model):
    from histosynth.cli import main
    from histosynth.data.patches import Patch
    from histosynth.data.store_writer import PatchStoreWriter
    from histosynth.evaluate.reconstruction import evaluate_reconstruction

    other = untrained_model(("stroma", "lymphocyte", "tumour"))
    with pytest.raises(DataError, match=r"hgsc-corner: the store's classes \['connective'.*differ from the joint "
                                        r"autoencoder's \['stroma', 'lymphocyte', 'tumour'\]"):
        evaluate_reconstruction(other, store, split="train")
    other.save_pretrained(tmp_path / "other")
    res = CliRunner().invoke(main, ["evaluate", "recon", "--autoencoder", str(tmp_path / "other"), "--data",
                                    str(store), "--split", "train", "--device", "cpu", "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    (line,) = [r for r in res.output.splitlines() if r.startswith("error:")]
    assert str(store) in line and "differ from the joint autoencoder's" in line
    assert not (tmp_path / "r.json").exists()

    images_only = tmp_path / "images-only"
    with PatchStoreWriter(images_only, (), 32, "10x", labels=False) as w:
        for i in range(2):
            w.add(Patch(PatchStore(store)[i]["image"], None, None, "test", 0, 32 * i, 32, "corner"))
    with pytest.raises(DataError, match=r"images-only: the joint autoencoder .* needs a labelled store"):
        evaluate_reconstruction(untrained_model(), images_only, split="test")


def test_an_image_autoencoder_on_a_labelled_store_is_scored_as_before(store):
    """No labels section, two-row grid, same numbers as reconstruct() + ReconstructionMetrics."""
    from histosynth.evaluate.reconstruction import ReconstructionMetrics, evaluate_reconstruction, reconstruct
    from histosynth.models.autoencoders import make_autoencoder

    torch.manual_seed(0)
    ae = make_autoencoder("vq", (16, 32), 1, 3, num_vq_embeddings=32, vq_embed_dim=3, norm_num_groups=8).eval()
    evaluation = evaluate_reconstruction(ae, store, split="train", num=4)
    result, originals, recons = evaluation
    assert "labels" not in result and not evaluation.joint and len(evaluation) == 3
    assert evaluation.grid_rows() == [originals, recons]
    s = PatchStore(store)
    chosen = sorted(np.random.default_rng(0).choice(16, size=4, replace=False))
    images = torch.stack([torch.from_numpy(s[int(i)]["image"]).permute(2, 0, 1) for i in chosen])
    metrics = ReconstructionMetrics()
    metrics.update(images.float() / 255, reconstruct(ae, images))
    assert result["metrics"] == pytest.approx(metrics.compute(), rel=1e-6)
