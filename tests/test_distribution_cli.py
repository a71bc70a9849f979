"""`evaluate fid | kid | is` (histosynth.cli.evaluate_distribution), run through click's CliRunner on the command
objects. Real CoNSeP tiles (../shared/data/consep) with the offline EfficientNet-Lite0; nothing is downloaded.
1280-d Fréchet distances (slow scipy sqrtm) are avoided: the effnet FID test checks what is handed to
frechet_distance, and a tiny TorchScript encoder runs FID end to end."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from histosynth.errors import DataError, HistosynthError, OutputExistsError
from histosynth.evaluate import features as features_mod
from histosynth.evaluate import fid as fid_mod
from histosynth.cli import evaluate_distribution as cli_distribution
from histosynth.cli.evaluate_distribution import COMMANDS
from histosynth.evaluate.features import FeatureExtractor, load_feature_extractor
from histosynth.evaluate.fid import (
    extract_features,
    feature_statistics,
    frechet_distance,
    inception_score,
    iter_image_batches,
    kernel_inception_distance,
    list_images,
    load_statistics,
    save_statistics,
)


def _unwrapped(command):
    """The command with its user-error wrapper removed, so these tests can inspect the exception itself
    (the wrapper's exit status 2 + one-line message is checked in test_user_errors_exit_2)."""
    import copy

    bare = copy.copy(command)
    bare.callback = command.callback.__wrapped__
    return bare


fid, kid, is_ = (_unwrapped(c) for c in (cli_distribution.fid, cli_distribution.kid, cli_distribution.is_))

SHARED = Path(__file__).resolve().parents[2] / "shared"
CONSEP = SHARED / "data" / "consep"
N = 12


def _no_download(*args, **kwargs):
    raise AssertionError("a test tried to download something")


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    monkeypatch.setattr(tfi, "load_state_dict_from_url", _no_download)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """real/: 12 CoNSeP train tiles; sample/: a `histosynth sample`-like output whose images/ are 12 CoNSeP test
    tiles (its real/ and masks/ hold other images, which must not be read as generated ones)."""
    if not CONSEP.is_dir():
        pytest.skip("shared CoNSeP data not present")
    root = tmp_path_factory.mktemp("distribution")
    real, sample = root / "real", root / "sample"
    for sub in ("images", "real", "masks"):
        (sample / sub).mkdir(parents=True)
    real.mkdir()
    train, test = list_images(CONSEP, "train"), list_images(CONSEP, "test")
    for i, f in enumerate(train[:: len(train) // N][:N]):
        shutil.copy(f, real / f"real_{i:02d}{f.suffix}")
    rows = []
    for i, f in enumerate(test[:: len(test) // N][:N]):
        shutil.copy(f, sample / "images" / f"{i:05d}{f.suffix}")
        Image.fromarray(np.full((64, 64, 3), 255, np.uint8)).save(sample / "real" / f"{i:05d}.png")
        Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(sample / "masks" / f"{i:05d}.png")
        rows.append({"image": f"images/{i:05d}{f.suffix}", "real": f"real/{i:05d}.png"})
    (sample / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "real": real, "sample": sample, "images": sample / "images"}


@pytest.fixture(scope="module")
def effnet():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "download_url_to_file", _no_download)
        return load_feature_extractor("effnet-lite0")


@pytest.fixture(scope="module")
def effnet_features(data, effnet):
    """Independently extracted effnet features of the real tiles and of the sample's images."""
    real, _ = extract_features(data["real"], effnet, progress=False)
    gen, _ = extract_features(data["images"], effnet, progress=False)
    return real, gen


@pytest.fixture(scope="module")
def effnet_stats(data, effnet_features, effnet):
    path = data["root"] / "real_effnet.npz"
    save_statistics(path, effnet_features[0], effnet.protocol, "12 CoNSeP train tiles")
    return path


class _TinyEncoder(torch.nn.Module):
    """An 8-d image encoder (fixed random convolution + average pool), saved as TorchScript for --features PATH."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 5, stride=4)
        torch.nn.init.normal_(self.conv.weight, std=0.3, generator=torch.Generator().manual_seed(0))

    def forward(self, x):
        return torch.relu(self.conv(x)).mean((2, 3))


@pytest.fixture(scope="module")
def tiny_encoder(data):
    path = data["root"] / "tiny_encoder.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch >= 2.10: "torch.jit.script is deprecated"
        torch.jit.script(_TinyEncoder().eval()).save(str(path))
    (data["root"] / "tiny_encoder.json").write_text(json.dumps({"input_size": 64, "mean": [0.5] * 3, "std": [0.2] * 3}))
    return path


class _TinyInceptionLike(FeatureExtractor):
    """Cheap stand-in with logits that claims an Inception Score."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 5)
        torch.nn.init.normal_(self.head.weight, std=4.0, generator=torch.Generator().manual_seed(0))
        self.name, self.num_features, self.num_logits = "tiny-inception", 3, 5
        self.provides_inception_score = True
        self.protocol = {"extractor": "tiny-inception"}

    def features_and_logits(self, images):
        self._check_images(images)
        f = images.float().mean((2, 3)) / 255
        return f, self.head(f)


def _invoke(command, args, expect_ok=True):
    result = CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=True)
    if expect_ok:
        assert result.exit_code == 0, (result.output, result.exception)
        return result, json.loads(result.stdout)
    return result, None


def _spy_reads(monkeypatch) -> list[Path]:
    """Record the sources extract_features reads."""
    read: list[Path] = []
    original = fid_mod.extract_features
    monkeypatch.setattr(fid_mod, "extract_features", lambda src, *a, **k: read.append(Path(src)) or original(src, *a, **k))
    return read


# ------------------------------------------------------------------------------------------------------ commands
def test_commands_register_in_a_click_group():
    import click

    group = click.Group("evaluate", commands=COMMANDS)
    assert set(group.commands) == {"fid", "kid", "is", "fid-per-magnification"}
    assert COMMANDS == (cli_distribution.fid, cli_distribution.kid, cli_distribution.is_,
                        cli_distribution.fid_per_magnification)
    assert is_.name == "is"
    opts = {o for p in fid.params for o in p.opts}
    assert {"--real", "--split", "--generated", "--generated-split", "--features", "--inception-weights",
            "--features-weights", "--features-arch", "--save-stats", "--real-stats", "--batch-size", "--device",
            "--out"} <= opts
    assert {o for p in is_.params for o in p.opts}.isdisjoint({"--real", "--real-stats", "--save-stats"})


def test_kid_saves_real_statistics_and_reuses_them_without_reading_real_images(data, effnet_features, tmp_path,
                                                                                monkeypatch):
    stats, out = tmp_path / "stats" / "consep12.npz", tmp_path / "kid.json"
    args = ["--generated", data["sample"], "--features", "effnet-lite0", "--kid-subsets", 20, "--device", "cpu"]
    _, first = _invoke(kid, ["--real", data["real"], "--save-stats", stats, "--out", out, *args])
    assert json.loads(out.read_text()) == first
    assert first["n_real"] == N and first["n_generated"] == N  # the sample's images/ only, not its real/ or masks/
    assert first["generated"] == str(data["images"]) and first["saved_stats"] == str(stats)
    assert first["features"] == "effnet-lite0" and first["kid_subset_size"] == N and first["kid_subsets"] == 20
    assert "fid" not in first and "is_mean" not in first and first["protocol"]["extractor"] == "effnet-lite0"
    f_real, f_gen = effnet_features
    saved = load_statistics(stats)
    assert saved.n == N and np.allclose(saved.features, f_real, rtol=1e-5, atol=1e-6)
    expected = kernel_inception_distance(f_real, f_gen, subsets=20, subset_size=N)
    assert (first["kid_mean"], first["kid_std"]) == pytest.approx(expected, rel=1e-4, abs=1e-7)

    read = _spy_reads(monkeypatch)
    _, again = _invoke(kid, ["--real-stats", stats, *args])
    assert read == [data["images"]]  # the real images were not read
    assert (again["kid_mean"], again["kid_std"], again["n_real"]) == (first["kid_mean"], first["kid_std"], N)
    assert again["real_stats"] == str(stats) and again["real"] == first["real"]

    read.clear()  # nothing is overwritten without --overwrite, and that is checked before any work
    for extra in (["--save-stats", stats], ["--out", out]):
        result, _ = _invoke(kid, ["--real", data["real"], *extra, *args], expect_ok=False)
        assert isinstance(result.exception, OutputExistsError) and "--overwrite" in str(result.exception)
    assert read == []


def test_fid_with_effnet_from_saved_statistics(data, effnet_features, effnet_stats, monkeypatch):
    calls = []
    monkeypatch.setattr(fid_mod, "frechet_distance", lambda *a: calls.append(a) or 12.5)  # no 1280-d sqrtm here
    read = _spy_reads(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 12 images for 1280-d features: the singular-covariance warning
        result, out = _invoke(fid, ["--real-stats", effnet_stats, "--generated", data["sample"],
                                    "--features", "effnet-lite0", "--batch-size", 5])
    assert out["fid"] == 12.5 and out["n_real"] == N and out["n_generated"] == N and "kid_mean" not in out
    assert read == [data["images"]] and len(calls) == 1
    mu_r, sig_r, mu_g, sig_g = calls[0]
    saved = load_statistics(effnet_stats)
    assert np.array_equal(mu_r, saved.mu) and np.array_equal(sig_r, saved.sigma)
    ref_mu, ref_sig = feature_statistics(effnet_features[1])
    assert np.allclose(mu_g, ref_mu, rtol=1e-5, atol=1e-6) and np.allclose(sig_g, ref_sig, rtol=1e-4, atol=1e-6)


def test_fid_with_a_local_torchscript_encoder_end_to_end(data, tiny_encoder, effnet_stats, tmp_path, monkeypatch):
    stats = tmp_path / "tiny_stats.npz"
    only, summary = _invoke(fid, ["--real", data["real"], "--save-stats", stats, "--features", tiny_encoder])
    assert summary["saved_stats"] == str(stats) and summary["n_real"] == N and "fid" not in summary  # stats only
    assert "loaded torchscript encoder" in only.stderr and "tiny_encoder.json" in only.stderr
    loaded = summary["features_loaded"]
    assert loaded["kind"] == "torchscript" and loaded["weights_file"] == "tiny_encoder.pt"

    result, out = _invoke(fid, ["--real", data["real"], "--generated", data["sample"], "--features", tiny_encoder])
    enc = load_feature_extractor(tiny_encoder)
    f_real, _ = extract_features(data["real"], enc, progress=False)
    f_gen, _ = extract_features(data["images"], enc, progress=False)
    assert f_real.shape == (N, 8)
    expected = frechet_distance(*feature_statistics(f_real), *feature_statistics(f_gen))
    assert out["fid"] == pytest.approx(expected, rel=1e-6) and out["fid"] > 0
    p = out["protocol"]
    assert p["extractor"] == "local-torchscript" and p["input_size"] == [64, 64] and p["num_features"] == 8
    assert p["weights"].startswith("sha256:") and p["normalization"]["mean"] == [0.5] * 3
    _, cached = _invoke(fid, ["--real-stats", stats, "--generated", data["sample"], "--features", tiny_encoder])
    assert cached["fid"] == out["fid"]

    read = _spy_reads(monkeypatch)  # effnet statistics with the tiny encoder: refused before reading anything
    result, _ = _invoke(fid, ["--real-stats", effnet_stats, "--generated", data["sample"], "--features", tiny_encoder],
                        expect_ok=False)
    err = result.exception
    assert isinstance(err, HistosynthError) and str(effnet_stats) in str(err)
    assert "different protocol" in str(err) and "extractor: 'effnet-lite0' != 'local-torchscript'" in str(err)
    assert read == []


def test_is_needs_inception_logits(data, monkeypatch, tmp_path):
    result, _ = _invoke(is_, ["--generated", data["sample"], "--features", "effnet-lite0"], expect_ok=False)
    assert isinstance(result.exception, HistosynthError) and "Inception logits" in str(result.exception)

    tiny = _TinyInceptionLike()
    monkeypatch.setattr(features_mod, "load_feature_extractor", lambda *a, **k: tiny)
    out_file = tmp_path / "is.json"
    _, out = _invoke(is_, ["--generated", data["sample"], "--splits", 3, "--out", out_file])
    images = torch.cat(list(iter_image_batches(data["images"], batch_size=8)))
    with torch.inference_mode():
        logits = tiny.features_and_logits(images)[1].double().numpy()
    assert (out["is_mean"], out["is_std"]) == pytest.approx(inception_score(logits, splits=3), rel=1e-6)
    assert out["n_generated"] == N and out["is_splits"] == 3 and "n_real" not in out and "fid" not in out
    assert out["is_mean"] > 1.0 and json.loads(out_file.read_text()) == out


def test_user_errors(data, tiny_encoder, tmp_path, monkeypatch):
    def error(command, args) -> HistosynthError:
        result, _ = _invoke(command, args, expect_ok=False)
        assert isinstance(result.exception, HistosynthError), (result.output, result.exception)
        return result.exception

    gen = ["--generated", data["sample"]]
    stats = tmp_path / "s.npz"
    stats.write_bytes(b"not an npz")
    assert "not both" in str(error(fid, ["--real", data["real"], "--real-stats", stats, *gen]))
    assert "missing --real" in str(error(kid, gen))
    assert "needs --real" in str(error(fid, ["--real-stats", stats, "--save-stats", tmp_path / "n.npz", *gen]))
    assert "missing --generated" in str(error(fid, ["--real", data["real"]]))
    features = ["--features", tiny_encoder]
    err = error(fid, ["--real-stats", stats, *gen, *features])
    assert isinstance(err, DataError) and str(stats) in str(err)
    missing = tmp_path / "no-such-folder"
    err = error(fid, ["--real", missing, *gen, *features])
    assert isinstance(err, DataError) and str(missing) in str(err)
    no_encoder = tmp_path / "encoders" / "uni.pt"
    err = error(kid, ["--real", data["real"], *gen, "--features", no_encoder])
    assert "not found" in str(err) and str(no_encoder) in str(err)
    assert "unknown feature extractor" in str(error(kid, ["--real", data["real"], *gen, "--features", "resnet-9000"]))
    assert "--features-arch" in str(error(kid, ["--real", data["real"], *gen, "--features", "effnet-lite0",
                                                "--features-arch", "resnet50"]))


def test_user_errors_exit_2(tmp_path):
    result = CliRunner().invoke(cli_distribution.fid, ["--real", str(tmp_path / "missing"), "--generated", str(tmp_path),
                                                         "--features", "effnet-lite0"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "error:" in result.output and "missing" in result.output
