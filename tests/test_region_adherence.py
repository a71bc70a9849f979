"""The pixel-level region classifier (DISC's grading model, eq. 4) and region adherence, on tiny red/blue tiles."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from histosynth.data.patches import Patch
from histosynth.data.store_writer import PatchStoreWriter
from histosynth.errors import HistosynthError, OutputExistsError
from histosynth.evaluate.region_adherence import region_adherence
from histosynth.evaluate.region_classifier import (
    balanced_loss,
    confusion_matrix,
    evaluate_region_classifier,
    load_region_classifier,
    pixel_metrics,
    to_input,
    train_region_classifier,
)

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ("red", "blue")
P = 32
RED, BLUE = np.array([200, 40, 40]), np.array([40, 40, 200])


def red_blue_tile(rng: np.random.Generator, size: int = P) -> tuple[np.ndarray, np.ndarray]:
    """A tile split at a random row or column into a red part (label 0) and a blue part (label 1), with noise."""
    mask = np.zeros((size, size), np.int32)
    cut = int(rng.integers(size // 4, 3 * size // 4))
    if rng.random() < 0.5:
        mask[:, cut:] = 1
    else:
        mask[cut:] = 1
    if rng.random() < 0.5:
        mask = 1 - mask
    image = np.where(mask[..., None] == 0, RED, BLUE) + rng.normal(0, 12, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8), mask


def write_store(path, n_train=16, n_test=6, seed=0):
    rng = np.random.default_rng(seed)
    with PatchStoreWriter(path, NAMES, P, "20x", labels=False, regions=True) as w:
        for i in range(n_train + n_test):
            image, mask = red_blue_tile(rng)
            w.add(Patch(image=image, inst_map=None, type_map=None, split="train" if i < n_train else "test",
                        y=0, x=i * P, crop=P, source="s", region_map=mask))
    return path


def write_samples(root, tiles, names=NAMES):
    """A `sample --regions`-like folder: tiles = [(generated, mask, real)]."""
    for sub in ("images", "masks", "real"):
        (root / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("".join(f"{n}\n" for n in names))
    with open(root / "samples.jsonl", "w") as f:
        for i, (image, mask, real) in enumerate(tiles):
            name = f"{i:05d}"
            Image.fromarray(image).save(root / "images" / f"{name}.png")
            Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{name}.png")
            Image.fromarray(real).save(root / "real" / f"{name}.png")
            f.write(json.dumps({"name": name, "image": f"images/{name}.png", "mask": f"masks/{name}.png",
                                "real": f"real/{name}.png", "store": "tiny", "index": i}) + "\n")
    return root


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return write_store(tmp_path_factory.mktemp("regions") / "store")


@pytest.fixture(scope="module")
def trained(store):
    clf, rows = train_region_classifier(store, steps=40, batch_size=8, lr=1e-2, seed=0, progress=False)
    return clf, rows


def test_balanced_loss_is_eq4_by_hand():
    g = torch.Generator().manual_seed(0)
    lr, ls = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    tr, ts = torch.randint(0, 3, (2, 4, 4), generator=g), torch.randint(0, 3, (2, 4, 4), generator=g)

    def ce(logits, target):  # mean over pixels of -log softmax at the true label
        logp = logits - logits.exp().sum(1, keepdim=True).log()
        return -logp.gather(1, target[:, None]).mean().item()

    for lam in (0.0, 0.3, 1.0):
        total, parts = balanced_loss(lr, tr, ls, ts, lam)
        assert total.item() == pytest.approx((1 - lam) * ce(lr, tr) + lam * ce(ls, ts), rel=1e-6)
        assert parts["real"] == pytest.approx(ce(lr, tr), rel=1e-6)
        assert parts["synth"] == pytest.approx(ce(ls, ts), rel=1e-6)
    only_real, parts = balanced_loss(lr, tr, None, None, 0.0)
    assert only_real.item() == pytest.approx(ce(lr, tr), rel=1e-6) and "synth" not in parts
    only_synth, _ = balanced_loss(None, None, ls, ts, 1.0)
    assert only_synth.item() == pytest.approx(ce(ls, ts), rel=1e-6)
    with pytest.raises(HistosynthError, match="none were given"):
        balanced_loss(lr, tr, None, None, 0.5)
    with pytest.raises(HistosynthError, match=r"\[0, 1\]"):
        balanced_loss(lr, tr, ls, ts, 1.5)


class ColourClassifier:
    """A fake classifier: a pixel is 'red' (0) where its red channel exceeds its blue one, else 'blue' (1)."""

    label_names = NAMES

    def predict(self, images):
        images = np.asarray(images, np.int32)
        return (images[..., 0] <= images[..., 2]).astype(np.int64)


def test_agreement_equals_hand_count_with_a_fake_classifier(tmp_path):
    mask = np.zeros((8, 8), np.int32)
    mask[:, 4:] = 1  # 32 red, 32 blue mask pixels
    painted = np.zeros((8, 8), np.int32)
    painted[:, 6:] = 1  # the generated tile paints columns 4-5 red: 16 blue mask pixels read as red
    gen = np.where(painted[..., None] == 0, RED, BLUE).astype(np.uint8)
    real = np.where(mask[..., None] == 0, RED, BLUE).astype(np.uint8)
    mask2 = np.ones((8, 8), np.int32)  # an all-blue mask whose tile is all red: 64 blue pixels missed
    gen2 = np.broadcast_to(RED, (8, 8, 3)).astype(np.uint8)
    samples = write_samples(tmp_path / "samples", [(gen, mask, real), (gen2, mask2, gen2)])

    result = region_adherence(ColourClassifier(), samples, out=tmp_path / "adherence.json", progress=False)
    gen_r = result["generated"]
    assert gen_r["agreement"]["red"] == 1.0  # 32 of 32
    assert gen_r["agreement"]["blue"] == pytest.approx(16 / 96)  # 16 of 32 + 0 of 64
    assert gen_r["mean_agreement"] == pytest.approx((1 + 16 / 96) / 2)
    assert gen_r["pixel_agreement"] == pytest.approx(48 / 128)
    assert gen_r["confusion_matrix"] == [[32, 0], [80, 16]]
    # the real patch of the first mask is read perfectly; of the second (a red patch, blue mask) not at all
    assert result["real"]["agreement"] == {"red": 1.0, "blue": pytest.approx(32 / 96)}
    assert result["relative"]["blue"] == pytest.approx((16 / 96) / (32 / 96))
    assert [t["pixel_agreement"] for t in result["per_tile"]] == [pytest.approx(48 / 64), 0.0]
    assert result["protocol"]["n_tiles"] == 2 and result["protocol"]["store"] == "tiny"
    saved = json.loads((tmp_path / "adherence.json").read_text())
    assert saved["generated"]["confusion_matrix"] == [[32, 0], [80, 16]]
    assert Image.open(tmp_path / "adherence.png").size[0] > 5 * 8  # 5 panels per row
    with pytest.raises(OutputExistsError):
        region_adherence(ColourClassifier(), samples, out=tmp_path / "adherence.json", progress=False)


def test_pixel_metrics_match_scikit_learn():
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    rng = np.random.default_rng(1)
    t, p = rng.integers(0, 3, 500), rng.integers(0, 3, 500)
    p[t == 2] = 2  # some structure
    m = pixel_metrics(confusion_matrix(t, p, 3), ["a", "b", "c"])
    prec, rec, f1, support = precision_recall_fscore_support(t, p, labels=[0, 1, 2], zero_division=0)
    for k, n in enumerate("abc"):
        assert m["per_label"][n]["precision"] == pytest.approx(prec[k])
        assert m["per_label"][n]["recall"] == pytest.approx(rec[k])
        assert m["per_label"][n]["f1"] == pytest.approx(f1[k])
        assert m["per_label"][n]["pixels"] == support[k]
    assert m["pixel_accuracy"] == pytest.approx(accuracy_score(t, p))
    assert m["mean_f1"] == pytest.approx(f1.mean())


def test_classifier_learns_red_vs_blue_and_reloads(trained, store, tmp_path):
    clf, rows = trained
    assert len(rows) == 40 and "synth" not in rows[0] and rows[-1]["loss"] < rows[0]["loss"]
    metrics = evaluate_region_classifier(clf, store, progress=False)
    assert metrics["n_tiles"] == 6
    assert metrics["pixel_accuracy"] > 0.9 and metrics["mean_f1"] > 0.9, metrics
    folder = clf.save(tmp_path / "classifier")
    again = load_region_classifier(tmp_path)  # a folder holding classifier/ is read too
    again_direct = load_region_classifier(folder)
    assert again.identity() == clf.identity() == again_direct.identity()
    assert again.info["balance"] == 0.0 and again.label_names == list(NAMES)
    images = np.stack([red_blue_tile(np.random.default_rng(9))[0] for _ in range(3)])
    with torch.inference_mode():
        assert torch.equal(clf(to_input(images)), again(to_input(images)))
    assert np.array_equal(clf.predict(images), again.predict(images))


def test_training_with_synthetic_tiles_and_balance(store, tmp_path):
    rng = np.random.default_rng(5)
    tiles = [red_blue_tile(rng) for _ in range(4)]
    samples = write_samples(tmp_path / "synth", [(im, m, im) for im, m in tiles])
    clf, rows = train_region_classifier(store, synthetic=samples, balance=0.5, steps=2, batch_size=2, progress=False)
    assert {"loss", "real", "synth"} <= set(rows[0])
    assert rows[0]["loss"] == pytest.approx(0.5 * rows[0]["real"] + 0.5 * rows[0]["synth"], rel=1e-5)
    assert clf.describe()["balance"] == 0.5
    with pytest.raises(HistosynthError, match="--synthetic"):
        train_region_classifier(store, balance=0.5, steps=1, progress=False)
    (tmp_path / "other").mkdir()
    other = write_samples(tmp_path / "other" / "s", [(tiles[0][0], tiles[0][1], tiles[0][0])], names=("a", "b"))
    with pytest.raises(HistosynthError, match="classes.txt"):
        train_region_classifier(store, synthetic=other, balance=0.5, steps=1, progress=False)


def test_cli_trains_sweeps_and_measures_adherence(store, tmp_path):
    from histosynth.cli import main

    rng = np.random.default_rng(7)
    tiles = [red_blue_tile(rng) for _ in range(3)]
    samples = write_samples(tmp_path / "samples", [(im, m, im) for im, m in tiles])
    runner = CliRunner()
    out = tmp_path / "rc"
    args = ["evaluate", "region-classifier", "--store", str(store), "--out", str(out), "--steps", "3",
            "--batch-size", "2", "--device", "cpu"]
    res = runner.invoke(main, args)
    assert res.exit_code == 0, res.output
    assert {"classifier", "metrics.json", "loss.png", "losses.jsonl"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "metrics.json").read_text())["test"]["n_tiles"] == 6

    res = runner.invoke(main, args)  # exists, no --overwrite
    assert res.exit_code == 2 and res.output.startswith("error:") and str(out) in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(main, args + ["--balance", "0.5", "--overwrite"])  # λ > 0 without --synthetic
    assert res.exit_code == 2 and "--balance" in res.output and "--synthetic" in res.output

    sweep = tmp_path / "sweep"
    res = runner.invoke(main, ["evaluate", "region-classifier", "--store", str(store), "--out", str(sweep),
                               "--synthetic", str(samples), "--balance", "0,0.5", "--steps", "2", "--batch-size", "2",
                               "--device", "cpu"])
    assert res.exit_code == 0, res.output
    summary = json.loads((sweep / "metrics.json").read_text())
    assert [r["balance"] for r in summary["sweep"]] == [0.0, 0.5]
    assert (sweep / "f1_vs_balance.png").is_file() and (sweep / "lambda-0.5" / "classifier").is_dir()

    result_file = tmp_path / "adherence.json"
    res = runner.invoke(main, ["evaluate", "region-adherence", "--classifier", str(out), "--samples", str(samples),
                               "--out", str(result_file), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    result = json.loads(result_file.read_text())
    assert result["protocol"]["n_tiles"] == 3 and result["protocol"]["n_real"] == 3
    assert result["protocol"]["classifier_id"].startswith("region-classifier@sha256:")
    assert (tmp_path / "adherence.png").is_file()
    # a real == generated folder: the generated numbers are the ceiling's
    assert result["generated"]["agreement"] == result["real"]["agreement"]

    res = runner.invoke(main, ["evaluate", "region-adherence", "--classifier", str(sweep), "--samples", str(samples)])
    assert res.exit_code == 2 and "lambda-0" in res.output
