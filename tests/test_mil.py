"""DISC's slide-level model (evaluate/mil*.py): sigmoid multi-label BCE and eq. 4 by hand, gated attention, learning a
planted tile, λ = 0 ignoring synthetic bags, AUROC per class against scikit-learn, bag rules and the CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from torch import nn

from histosynth.evaluate.mil import (Bag, GatedAttentionMIL, auroc_per_class, balanced_loss, predict, slide_loss,
                                     train_mil)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_slide_loss_and_eq4_match_a_hand_computation():
    z = torch.tensor([2.0, -1.0, 0.5])
    y = torch.tensor([1.0, 0.0, 1.0])

    def bce(z, y):  # -mean_k [y log σ(z) + (1 - y) log(1 - σ(z))], written out
        sig = [1 / (1 + math.exp(-v)) for v in z.tolist()]
        return -sum(t * math.log(s) + (1 - t) * math.log(1 - s) for s, t in zip(sig, y.tolist())) / len(sig)

    real = slide_loss(z, y)
    assert real.item() == pytest.approx(bce(z, y), rel=1e-6)
    z2, y2 = torch.tensor([-0.3, 1.2, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    synth = slide_loss(z2, y2)
    assert balanced_loss(real, synth, 0.3).item() == pytest.approx(0.7 * bce(z, y) + 0.3 * bce(z2, y2), rel=1e-6)
    assert balanced_loss(real, None, 0.0).item() == pytest.approx(bce(z, y), rel=1e-6)  # λ = 0: real only
    assert balanced_loss(None, synth, 1.0).item() == pytest.approx(bce(z2, y2), rel=1e-6)
    with pytest.raises(ValueError, match=r"not computed"):
        balanced_loss(real, None, 0.5)


@pytest.mark.parametrize("per_class", [True, False])
def test_attention_weights_sum_to_one_per_bag_and_ignore_padding(per_class):
    torch.manual_seed(0)
    model = GatedAttentionMIL(6, 3, per_class=per_class).eval()
    branches = 3 if per_class else 1
    logits, weights = model(torch.randn(5, 6))
    assert logits.shape == (3,) and weights.shape == (5, branches)
    assert torch.allclose(weights.sum(0), torch.ones(branches)) and (weights >= 0).all()
    x, mask = torch.randn(2, 7, 6), torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    logits, weights = model(x, mask)
    assert torch.allclose(weights.sum(1), torch.ones(2, branches)) and (weights[1, 4:] == 0).all()
    single, _ = model(x[1, :4])  # a padded bag is the same bag unpadded
    assert torch.allclose(logits[1], single, atol=1e-6)


def _planted_bags(n: int, rng: np.random.Generator, dim: int = 16) -> list[Bag]:
    """Bags of 8-16 noise tiles N(0, 1); a bag of class k holds one tile with +6 on feature k (each class in about
    half of the bags, independently)."""
    bags = []
    for i in range(n):
        labels = rng.integers(0, 2, 2).astype(np.float32)
        x = rng.normal(size=(int(rng.integers(8, 17)), dim)).astype(np.float32)
        for k in np.flatnonzero(labels):
            x[rng.integers(len(x)), k] += 6.0
        bags.append(Bag(x, labels, f"bag-{i}"))
    return bags


def test_attention_mil_learns_a_distinctive_tile_among_noise():
    rng = np.random.default_rng(0)
    train, test = _planted_bags(64, rng), _planted_bags(32, rng)
    model, log = train_mil(train, steps=200, lr=2e-3, seed=0, progress=False)
    result = auroc_per_class(np.stack([b.labels for b in test]), predict(model, test), ["a", "b"])
    assert min(result["per_class"].values()) > 0.97, result
    assert np.mean([r["loss"] for r in log[-30:]]) < 0.5 * np.mean([r["loss"] for r in log[:30]])
    for k in (0, 1):  # each class's branch attends to its planted tile
        bag = next(b for b in test if b.labels[k] == 1)
        _, weights = model(torch.from_numpy(bag.features))
        assert int(weights[:, k].argmax()) == int(bag.features[:, k].argmax())


def test_transmil_lite_handles_padding_and_trains():
    from histosynth.evaluate.mil import TransMILLite

    torch.manual_seed(0)
    model = TransMILLite(6, 3).eval()
    x, mask = torch.randn(2, 7, 6), torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    logits, attention = model(x, mask)
    assert logits.shape == (2, 3) and attention is None
    assert torch.allclose(logits[1], model(x[1, :4])[0], atol=1e-5)
    rng = np.random.default_rng(0)
    _, log = train_mil(_planted_bags(16, rng), architecture="transmil", steps=60, lr=2e-3, progress=False)
    assert np.mean([r["loss"] for r in log[-15:]]) < np.mean([r["loss"] for r in log[:15]])


def test_lambda_zero_ignores_synthetic_bags_and_lambda_above_uses_them():
    rng = np.random.default_rng(1)
    real, synthetic = _planted_bags(12, rng), [Bag(b.features, b.labels, b.source, True) for b in _planted_bags(9, rng)]

    def weights(model):
        return {k: v.clone() for k, v in model.state_dict().items()}

    alone = weights(train_mil(real, (), balance=0.0, steps=25, seed=4, progress=False)[0])
    with_synth, log = train_mil(real, synthetic, balance=0.0, steps=25, seed=4, progress=False)
    assert all(torch.equal(alone[k], v) for k, v in weights(with_synth).items())
    assert all(math.isnan(r["synthetic"]) for r in log)
    mixed, log = train_mil(real, synthetic, balance=0.5, steps=25, seed=4, progress=False)
    assert not all(torch.equal(alone[k], v) for k, v in weights(mixed).items())
    r = log[0]
    assert r["loss"] == pytest.approx(0.5 * r["real"] + 0.5 * r["synthetic"], rel=1e-5)
    from histosynth.errors import HistosynthError

    with pytest.raises(HistosynthError, match=r"--synthetic"):
        train_mil(real, (), balance=0.3, steps=1, progress=False)


def test_auroc_per_class_against_sklearn_with_a_single_valued_class():
    from sklearn.metrics import roc_auc_score

    targets = np.array([[1, 0, 1], [0, 0, 1], [1, 0, 1], [0, 0, 1], [1, 0, 1]])
    scores = np.array([[0.9, 0.1, 0.3], [0.2, 0.4, 0.6], [0.4, 0.2, 0.5], [0.5, 0.3, 0.2], [0.8, 0.9, 0.1]])
    result = auroc_per_class(targets, scores, ["GG3", "GG4", "GG5"])
    # GG3 by hand: positives {0.9, 0.4, 0.8} vs negatives {0.2, 0.5}: 5 of 6 pairs ordered → 5/6
    assert result["per_class"]["GG3"] == pytest.approx(5 / 6)
    assert result["per_class"]["GG3"] == pytest.approx(roc_auc_score(targets[:, 0], scores[:, 0]))
    assert result["per_class"]["GG4"] is None and result["per_class"]["GG5"] is None  # all negative / all positive
    assert result["macro"] == pytest.approx(5 / 6)
    assert result["positives"] == {"GG3": 3, "GG4": 0, "GG5": 5}
    assert any("GG4: all 5 test bags are negative" in n for n in result["notes"])
    assert any("GG5: all 5 test bags are positive" in n for n in result["notes"])


def test_slide_targets_primary_secondary_and_the_negative_label():
    from histosynth.evaluate.mil_bags import shares_target

    classes = ["non-cancer", "GG3", "GG4", "GG5"]
    shares = {"non-cancer": 0.6, "GG3": 0.1, "GG4": 0.25, "GG5": 0.05}
    assert shares_target(shares, classes, min_share=0.05).tolist() == [1, 0, 1, 0]  # the two largest
    assert shares_target(shares, classes, min_share=0.05, negative_label="non-cancer").tolist() == [0, 1, 1, 0]
    assert shares_target(shares, classes, min_share=0.05, max_labels=0, negative_label="non-cancer").tolist() == \
        [0, 1, 1, 1]
    assert shares_target({"non-cancer": 0.97, "GG3": 0.03}, classes, negative_label="non-cancer").tolist() == \
        [1, 0, 0, 0]


# --------------------------------------------------------------------------------------------------- CLI
class ChannelStats(nn.Module):
    """A fake tile encoder: per-channel mean and std of the tile (6 features)."""

    num_features = 6
    encoder_id = "test:channel-stats"

    def forward(self, x):
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)


CLASSES = ("non-cancer", "GG3", "GG4")
COLOURS = np.array([[230, 200, 220], [200, 60, 120], [90, 40, 160]], np.uint8)  # one colour per label


@pytest.fixture(scope="module")
def mil_fixtures(tmp_path_factory):
    """8 slides of 32 px (4 tiles of 16 px each), two labels per slide, and a folder of 3 generated tile sets."""
    from histosynth.data.record import RegionRecord
    from histosynth.data.prepare_labelled import prepare_nuclei

    root = tmp_path_factory.mktemp("mil")
    rng = np.random.default_rng(0)
    records = []
    for i in range(8):
        mask = np.zeros((32, 32), np.int32)
        mask[:, 16:] = 1 + i % 2  # GG3 or GG4 on the right half
        image = np.clip(COLOURS[mask] + rng.integers(-20, 20, (32, 32, 3)), 0, 255).astype(np.uint8)
        records.append(RegionRecord(image=image, region_map=mask, class_names=CLASSES, source=f"slide-{i}",
                                    magnification="20x"))
    prepare_nuclei(records, root / "store", patch=16, overlap=0.0, magnification="20x", holdout=0.0, progress=False)
    sets = root / "sets"
    (sets / "images").mkdir(parents=True)
    for k, label in enumerate((1, 2, 1, 2, 0)):
        Image.fromarray(np.full((16, 16, 3), COLOURS[label])).save(sets / "images" / f"t{k}.png")
    rows = [{"set": "a", "primary": "GG3", "secondary": "GG4", "tiles": ["images/t0.png", "images/t1.png"]},
            {"set": "b", "primary": 2, "secondary": None,
             "tiles": [{"mask": "masks/x.png", "image": "images/t3.png"}, {"image": "images/t1.png"}]},
            {"primary": "Non-Cancer", "secondary": "GG3", "tiles": ["images/t4.png", str(sets / "images/t2.png")]}]
    (sets / "sets.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root / "store", sets


@pytest.fixture
def fake_encoder(monkeypatch):
    from histosynth.models import ssl_encoder

    real = ssl_encoder.load_tile_encoder
    monkeypatch.setattr(ssl_encoder, "load_tile_encoder",
                        lambda encoder=None, device="cpu": real(ChannelStats(), device))


def _run(*args):
    from histosynth.cli import main

    return CliRunner().invoke(main, ["evaluate", "mil", *map(str, args)])


def test_cli_sweeps_lambda_writes_results_and_reuses_features(mil_fixtures, fake_encoder, tmp_path):
    store, sets = mil_fixtures
    out = tmp_path / "mil"
    args = ["--real", store, "--synthetic", sets, "--balance", "0,0.5", "--out", out, "--steps", "20",
            "--negative-label", "non-cancer"]
    r = _run(*args)
    assert r.exit_code == 0, r.output
    result = json.loads((out / "results.json").read_text())
    assert result["classes"] == list(CLASSES) and [row["balance"] for row in result["sweep"]] == [0.0, 0.5]
    assert result["bags"]["real_train"] + result["bags"]["real_test"] == 8 and result["bags"]["synthetic"] == 3
    assert result["split"]["rule"] == "slides"  # every patch is train in the store: whole slides held out
    assert result["features"] == {"real": "computed", "synthetic": "computed"}
    assert result["protocol"]["encoder"]["encoder"] == "test:channel-stats"
    for row in result["sweep"]:
        assert set(row["auroc"]) == set(CLASSES)
        assert all(v is None or 0 <= v <= 1 for v in row["auroc"].values())
        assert len(row["notes"]) == sum(v is None for v in row["auroc"].values())
    bags = [json.loads(x) for x in (out / "bags.jsonl").read_text().splitlines()]
    real_labels = {b["source"]: b["labels"] for b in bags if not b["synthetic"]}
    assert real_labels["slide-0"] == ["GG3"] and real_labels["slide-1"] == ["GG4"]  # non-cancer only when alone
    synth = {b["source"]: b["labels"] for b in bags if b["synthetic"]}
    assert synth == {"a": ["GG3", "GG4"], "b": ["GG4"], "set-3": ["non-cancer"]}
    assert np.load(out / "features" / "synthetic.npy").shape == (5, 6)  # t1 used twice, encoded once
    assert np.load(out / "features" / "real.npy").shape == (32, 6)
    losses = [json.loads(x) for x in (out / "losses.jsonl").read_text().splitlines()]
    assert len(losses) == 40 and all(x["synthetic"] is None for x in losses if x["balance"] == 0)
    assert (out / "lambda_sweep.png").stat().st_size > 0 and (out / "loss.png").stat().st_size > 0

    r = _run(*args)  # no overwrite
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1 and "--overwrite" in r.output, r.output
    r = _run(*args, "--overwrite")
    assert r.exit_code == 0, r.output
    again = json.loads((out / "results.json").read_text())
    assert again["features"] == {"real": "reused", "synthetic": "reused"}
    assert again["sweep"] == result["sweep"]  # seeded: the same models
    assert [p.name for p in tmp_path.iterdir()] == ["mil"]  # no partial folder left


@pytest.mark.parametrize("case, message", [
    ("no-synthetic", r"--balance 0\.5 weights synthetic bags: give --synthetic FOLDER"),
    ("label", r"sets\.jsonl: line 1 'primary': label 'GG9' is neither a region label"),
    ("missing", r"nope\.png: tile image not found \(sets\.jsonl line 1 tile 0; paths are relative to"),
    ("masks-only", r"sets\.jsonl: line 1 tile 0 has no 'image' path"),
    ("balance", r"--balance: λ must lie in \[0, 1\]"),
    ("classes", r"--negative-label 'GG5' is not among the classes"),
])
def test_cli_errors_are_one_line_naming_the_file_or_option(mil_fixtures, fake_encoder, tmp_path, case, message):
    import re

    store, _ = mil_fixtures
    sets = tmp_path / "sets"
    sets.mkdir()
    tile = {"label": "images/t.png", "missing": "nope.png", "masks-only": {"mask": "m.png"}}.get(case, "images/t.png")
    (sets / "images").mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(sets / "images" / "t.png")
    primary = "GG9" if case == "label" else "GG3"
    (sets / "sets.jsonl").write_text(json.dumps({"primary": primary, "tiles": [tile]}) + "\n")
    balance = "0,1.5" if case == "balance" else "0,0.5"
    args = ["--real", store, "--out", tmp_path / "out", "--steps", "2", "--balance", balance]
    if case != "no-synthetic":
        args += ["--synthetic", sets]
    if case == "classes":
        args += ["--negative-label", "GG5"]
    r = _run(*args)
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    assert re.search(message, r.output), r.output
    assert not (tmp_path / "out").exists()


def test_regions_cut_from_one_slide_make_one_bag(tmp_path):
    """Records carrying meta["slide"] (PANDA blocks, SICAPv2 patches of one slide) give one bag per slide, not one
    per region: the store keeps the slide in every manifest row."""
    from histosynth.data.record import RegionRecord
    from histosynth.data.prepare_labelled import prepare_nuclei
    from histosynth.data.store import PatchStore
    from histosynth.evaluate.mil_bags import region_store_bags

    rng = np.random.default_rng(0)
    records = [RegionRecord(image=rng.integers(0, 255, (32, 32, 3), dtype=np.uint8),
                            region_map=np.full((32, 32), k % 2, np.int32), class_names=("non-cancer", "GG3"),
                            source=f"block{k}", split="train", magnification="20x", meta={"slide": f"S{k // 2}"})
               for k in range(4)]
    store = PatchStore(prepare_nuclei(records, tmp_path / "s", patch=16, overlap=0.0, magnification="20x",
                                      progress=False).path)
    assert [r["slide"] for r in store.records] == ["S0"] * 8 + ["S1"] * 8
    bags = region_store_bags(store, np.zeros((len(store), 3), np.float32), ["non-cancer", "GG3"],
                             negative_label="non-cancer")
    assert [b.source for b in bags] == ["S0", "S1"] and all(len(b.features) == 8 for b in bags)
    assert all(b.labels.tolist() == [0.0, 1.0] for b in bags)  # GG3 on half of each slide: non-cancer dropped
