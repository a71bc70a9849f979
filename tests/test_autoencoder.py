"""The first stage of latent diffusion: CompVis checkpoint conversion, reconstruction metrics, autoencoder
training on real CoNSeP patches (loss falls, exact resume), recipes and CLI errors."""

from __future__ import annotations

import json
import re
import sys
import types
from itertools import chain, islice
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from diffusers import AutoencoderKL, VQModel

from histosynth.cli import main
from histosynth.errors import HistosynthError
from histosynth.models.autoencoders import make_autoencoder
from histosynth.models.compvis_autoencoder import convert_compvis_first_stage

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions: one thread is faster, and far faster when other processes share the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


ATTN_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


# ------------------------------------------------------------------------------------------------ helpers
def to_compvis_names(sd: dict, levels: int) -> dict:
    """diffusers VQModel/AutoencoderKL names -> CompVis ldm.modules.diffusionmodules.model names, written out
    independently of the converter (decoder up_blocks.i is CompVis up.{levels-1-i}; attention q/k/v/proj_out
    are 1x1 convolutions there)."""
    out = {}
    for key, value in sd.items():
        name = key
        if m := re.match(r"(encoder|decoder)\.(?:down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers|attentions)\.(\d+)\.(.*)", key):
            side, i, part, j, rest = m.groups()
            level = int(i) if side == "encoder" else levels - 1 - int(i)
            stem = f"{side}.{'down' if side == 'encoder' else 'up'}.{level}"
            if part == "resnets":
                name = f"{stem}.block.{j}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
            elif part == "downsamplers":
                name = f"{stem}.downsample.{rest}"
            elif part == "upsamplers":
                name = f"{stem}.upsample.{rest}"
            else:
                name = f"{stem}.attn.{j}.{_attn(rest)}"
        elif m := re.match(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
            side, part, j, rest = m.groups()
            name = f"{side}.mid.block_{int(j) + 1}.{rest}" if part == "resnets" else f"{side}.mid.attn_1.{_attn(rest)}"
        name = name.replace("conv_norm_out", "norm_out")
        if re.search(r"\.(attn\.\d+|attn_1)\.(q|k|v|proj_out)\.weight$", name):
            value = value[:, :, None, None]
        out[name] = value.clone()
    return out


def _attn(rest: str) -> str:
    for diffusers_name, compvis_name in ATTN_NAMES.items():
        if rest.startswith(diffusers_name + "."):
            return compvis_name + rest[len(diffusers_name):]
    raise AssertionError(rest)


def tiny(kind: str, attention_levels=(), latent_channels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    return make_autoencoder(kind, (16, 32), 1, latent_channels, num_vq_embeddings=32, vq_embed_dim=latent_channels,
                            norm_num_groups=8, attention_levels=attention_levels).eval()


LOSS_KEYS = {"loss.logvar": torch.zeros(()), "loss.discriminator.main.0.weight": torch.randn(8, 3, 4, 4),
             "loss.perceptual_loss.net.slice1.0.weight": torch.randn(8, 3, 3, 3)}


def compvis_ckpt(path: Path, model, extra: dict | None = None) -> Path:
    """A Lightning-style CompVis autoencoder checkpoint: {'state_dict': CompVis names + loss.*, 'global_step': ...}."""
    sd = to_compvis_names(model.state_dict(), len(model.config.block_out_channels))
    torch.save({"state_dict": {**sd, **LOSS_KEYS, **(extra or {})}, "global_step": 7, "epoch": 1}, path)
    return path


def encode_decode(model, x):
    with torch.no_grad():
        if isinstance(model, VQModel):
            h = model.encode(x).latents
            return h, model.decode(h).sample
        z = model.encode(x).latent_dist.mode()
        return z, model.decode(z).sample


# --------------------------------------------------------------------------------------------- conversion
@pytest.mark.parametrize("kind,attention", [("vq", ()), ("vq", (1,)), ("kl", ())])
def test_compvis_checkpoint_round_trip(tmp_path, kind, attention):
    ref = tiny(kind, attention)
    path = compvis_ckpt(tmp_path / "model.ckpt", ref)
    model, report = convert_compvis_first_stage(path, config={"norm_num_groups": 8})
    assert type(model) is type(ref)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for a, b in zip(encode_decode(ref, x), encode_decode(model, x)):
        assert torch.equal(a, b)
    assert report.kind == kind and report.architecture["attention_levels"] == list(attention)
    assert sorted(report.skipped) == sorted(LOSS_KEYS)  # the training loss is listed, not loaded
    assert len(report.loaded) == len(ref.state_dict()) and not report.missing
    assert any("loss.discriminator." in line for line in report.summary())


def test_full_ldm_checkpoint_takes_first_stage_and_scale_factor(tmp_path):
    ref = tiny("vq")
    sd = to_compvis_names(ref.state_dict(), 2)
    ldm = {f"first_stage_model.{k}": v for k, v in sd.items()}
    ldm.update({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(8, 3, 3, 3),
                "cond_stage_model.transformer.x": torch.randn(2), "scale_factor": torch.tensor(0.75)})
    torch.save({"state_dict": ldm}, tmp_path / "pathldm.ckpt")
    model, report = convert_compvis_first_stage(tmp_path / "pathldm.ckpt", kind="vq", config={"norm_num_groups": 8})
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(encode_decode(ref, x)[1], encode_decode(model, x)[1])
    assert model.config.scaling_factor == pytest.approx(0.75) and "scale_factor" in report.scaling_factor_source
    assert "model.diffusion_model.input_blocks.0.0.weight" in report.skipped
    assert all(k.startswith("first_stage_model.") for k in report.loaded)


def test_lightning_objects_are_read_as_inert_placeholders(tmp_path, monkeypatch):
    # a checkpoint that pickles a class of a package this environment does not have (like pytorch_lightning)
    pkg = types.ModuleType("fake_lightning")
    mod = types.ModuleType("fake_lightning.callbacks")

    ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": "fake_lightning.callbacks"})
    mod.ModelCheckpoint = ModelCheckpoint
    for name, m in (("fake_lightning", pkg), ("fake_lightning.callbacks", mod)):
        monkeypatch.setitem(sys.modules, name, m)
    sd = to_compvis_names(tiny("vq").state_dict(), 2)
    torch.save({"state_dict": sd, "callbacks": {ModelCheckpoint: {"monitor": "val/rec_loss"}},
                "trainer_object": ModelCheckpoint(), "best": "epoch=3.ckpt"}, tmp_path / "lightning.ckpt")
    for name in ("fake_lightning", "fake_lightning.callbacks"):
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(Exception):  # the plain weights-only load refuses it
        torch.load(tmp_path / "lightning.ckpt", weights_only=True)
    with pytest.warns(UserWarning, match="placeholders"):
        _, report = convert_compvis_first_stage(tmp_path / "lightning.ckpt", config={"norm_num_groups": 8})
    assert report.placeholders == ["fake_lightning.callbacks.ModelCheckpoint"]
    assert "fake_lightning" not in sys.modules  # nothing was imported


@pytest.mark.parametrize("layout", ["ddp-prefix", "model-key", "nested", "compiled-ddp", "ema-key"])
def test_checkpoints_saved_by_other_trainers_convert(tmp_path, layout):
    """cases/ckpt-layouts: DDP's "module." prefix, weights under "model" / "ema" or nested twice, torch.compile's
    "_orig_mod." — all hold the same first stage and convert to the same model."""
    ref = tiny("vq")
    sd = {**to_compvis_names(ref.state_dict(), 2), **LOSS_KEYS}
    wrapped = {
        "ddp-prefix": {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "global_step": 3},
        "model-key": {"model": sd, "epoch": 2},
        "nested": {"checkpoint": {"model": {"state_dict": sd}}, "optimizer": {"lr": 1.0}},
        "compiled-ddp": {"state_dict": {f"_orig_mod.module.{k}": v for k, v in sd.items()}},
        "ema-key": {"ema": sd, "step": 10},
    }[layout]
    torch.save(wrapped, tmp_path / "w.ckpt")
    model, report = convert_compvis_first_stage(tmp_path / "w.ckpt", config={"norm_num_groups": 8})
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for a, b in zip(encode_decode(ref, x), encode_decode(model, x)):
        assert torch.equal(a, b)
    assert len(report.loaded) == len(ref.state_dict()) and not report.missing


def test_a_checkpoint_without_a_first_stage_lists_what_it_holds(tmp_path):
    torch.save({"weights_of_something": {"backbone.layer1.conv.weight": torch.zeros(2),
                                         "backbone.layer2.conv.weight": torch.zeros(2), "head.fc.bias": torch.zeros(1)}},
               tmp_path / "other.ckpt")
    with pytest.raises(HistosynthError, match=r"other\.ckpt.*keys start with: backbone\.layer1 \(1\), backbone\.layer2 "
                                              r"\(1\), head\.fc \(1\)"):
        convert_compvis_first_stage(tmp_path / "other.ckpt")
    torch.save({"epoch": 3, "notes": {"a": 1}}, tmp_path / "empty.ckpt")
    with pytest.raises(HistosynthError, match=r"empty\.ckpt.*no tensors .*top-level keys: epoch, notes"):
        convert_compvis_first_stage(tmp_path / "empty.ckpt")


def test_conversion_errors_name_the_file(tmp_path):
    junk = tmp_path / "notes.ckpt"
    junk.write_bytes(b"this is not a checkpoint")
    with pytest.raises(HistosynthError, match=re.escape(str(junk))):
        convert_compvis_first_stage(junk)
    ref = tiny("vq")
    sd = to_compvis_names(ref.state_dict(), 2)
    del sd["decoder.conv_out.bias"]
    torch.save({"state_dict": sd}, tmp_path / "partial.ckpt")
    with pytest.raises(HistosynthError, match=r"partial\.ckpt.*lacks 1 weights.*decoder\.conv_out\.bias"):
        convert_compvis_first_stage(tmp_path / "partial.ckpt", config={"norm_num_groups": 8})
    path = compvis_ckpt(tmp_path / "vq.ckpt", ref)
    with pytest.raises(HistosynthError, match=r"vq\.ckpt.*expected a 'kl'"):
        convert_compvis_first_stage(path, kind="kl")
    with pytest.raises(HistosynthError, match=r"vq\.ckpt.*latent_channels: checkpoint 3, asked for 4"):
        convert_compvis_first_stage(path, config={"latent_channels": 4, "norm_num_groups": 8})
    torch.save({"state_dict": {"model.diffusion_model.w": torch.zeros(2)}}, tmp_path / "unet.ckpt")
    with pytest.raises(HistosynthError, match=r"unet\.ckpt.*no first-stage"):
        convert_compvis_first_stage(tmp_path / "unet.ckpt")


def test_cli_convert_writes_a_diffusers_folder(tmp_path):
    ref = tiny("kl")
    path = compvis_ckpt(tmp_path / "kl.ckpt", ref)
    runner = CliRunner()
    res = runner.invoke(main, ["convert", "autoencoder", str(path), "--out", str(tmp_path / "kl"), "--norm-num-groups", "8",
                               "--scaling-factor", "0.5"])
    assert res.exit_code == 0, res.output
    assert "skipped 3 keys" in res.output and "loss.discriminator.*" in res.output
    model = AutoencoderKL.from_pretrained(tmp_path / "kl")
    assert model.config.scaling_factor == 0.5
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(encode_decode(ref, x)[1], encode_decode(model, x)[1])
    assert json.loads((tmp_path / "kl" / "conversion_report.json").read_text())["kind"] == "kl"
    again = runner.invoke(main, ["convert", "autoencoder", str(path), "--out", str(tmp_path / "kl")])
    assert again.exit_code == 2 and "already exists" in again.output
    bad = runner.invoke(main, ["convert", "autoencoder", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "missing.ckpt" in bad.output


# ---------------------------------------------------------------------------------------------- metrics
def test_reconstruction_metrics_match_numpy_and_skimage(consep_store):
    from skimage.metrics import structural_similarity

    from histosynth.data.store import PatchStore
    from histosynth.evaluate.reconstruction import ReconstructionMetrics

    store = PatchStore(consep_store)
    x = np.stack([store[i]["image"] for i in store.indices("train")[:4]]).astype(np.float64) / 255.0
    rng = np.random.default_rng(0)
    noise = rng.normal(0, [[[[0.02]]], [[[0.05]]], [[[0.1]]], [[[0.2]]]], size=x.shape)
    y = np.clip(x + noise, 0, 1)
    metrics = ReconstructionMetrics()
    as_t = lambda a: torch.from_numpy(a).permute(0, 3, 1, 2).float()  # noqa: E731
    metrics.update(as_t(x[:3]), as_t(y[:3]))  # two batches: accumulation across updates
    metrics.update(as_t(x[3:]), as_t(y[3:]))
    got = metrics.compute()
    x32, y32 = x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64)
    per_image_mse = ((x32 - y32) ** 2).mean(axis=(1, 2, 3))
    assert got["images"] == 4
    assert got["mse"] == pytest.approx(per_image_mse.mean(), rel=1e-5)
    assert got["mse_255"] == pytest.approx(per_image_mse.mean() * 255**2, rel=1e-5)
    assert got["psnr"] == pytest.approx(np.mean(10 * np.log10(1.0 / per_image_mse)), abs=1e-3)
    ssim = np.mean([structural_similarity(a, b, data_range=1.0, channel_axis=2, gaussian_weights=True, sigma=1.5,
                                          use_sample_covariance=False) for a, b in zip(x32, y32)])
    assert got["ssim"] == pytest.approx(ssim, abs=1e-5)


# --------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def consep_store(shared_data, tmp_path_factory) -> Path:
    """48 real CoNSeP patches of 64 px at 40x: 2 train images (32 patches) and 1 test image (16), own split."""
    from histosynth.data.formats import read_nuclei
    from histosynth.data.prepare_labelled import prepare_nuclei

    src = shared_data / "consep"
    records = chain(islice(read_nuclei("consep", src / "train"), 2), islice(read_nuclei("consep", src / "test"), 1))
    out = tmp_path_factory.mktemp("ae") / "consep-64"
    prepare_nuclei(records, out, patch=64, overlap=0.0, magnification="40x", progress=False)
    return out


def micro_recipe(kind: str = "vq", loss: dict | None = None, **train):
    from histosynth.recipes import recipe_from_dict

    raw = {"name": "ae-micro-test", "method": "autoencoder", "description": "tests", "patch_size": 32,
           "model": {"kind": kind, "block_out_channels": [16, 16, 32], "layers_per_block": 1, "latent_channels": 3,
                     "num_vq_embeddings": 128, "vq_embed_dim": 3, "norm_num_groups": 8, "mid_block_attention": False},
           "loss": {"perceptual": "effnet-lite0", "perceptual_weight": 0.5, **(loss or {})},
           "train": {"learning_rate": 3e-3, "batch_size": 4, "steps": 4, "checkpoint_every": 2, "keep_checkpoints": 5,
                     "log_every": 1, "num_workers": 0, "seed": 1, "scaling_factor_images": 8, "codebook_init": "data",
                     **train}}
    return recipe_from_dict(raw)


def _rows(run: Path) -> list[dict]:
    return [json.loads(r) for r in (run / "losses.jsonl").read_text().splitlines() if r]


def test_tiny_autoencoder_learns_real_patches(consep_store, tmp_path):
    from histosynth.training.autoencoder import train_autoencoder

    recipe = micro_recipe(steps=30, random_flips=False, checkpoint_every=1000)
    result = train_autoencoder(recipe, consep_store, tmp_path / "run", progress=False)
    rows = _rows(tmp_path / "run")
    first, last = np.mean([r["l1"] for r in rows[:3]]), np.mean([r["l1"] for r in rows[-5:]])
    assert result.step == 30 and last < 0.5 * first, (first, last)
    assert min(r["codes"] for r in rows) > 10  # the data-initialised codebook does not collapse
    model = VQModel.from_pretrained(tmp_path / "run" / "autoencoder")  # what LDM training will load
    info = json.loads((tmp_path / "run" / "autoencoder" / "histosynth.json").read_text())
    assert model.config.scaling_factor == pytest.approx(info["scaling_factor"]["value"]) != 0.18215
    assert (tmp_path / "run" / "loss.png").is_file()


# the patch-GAN case switches the discriminator on at step 3, after the checkpoint the resumed run starts from
GAN = {"disc_weight": 0.75, "disc_start": 2, "disc_num_layers": 2, "disc_channels": 8}


@pytest.mark.parametrize("kind,loss", [("vq", None), ("kl", None), ("vq", GAN)], ids=["vq", "kl", "vq-gan"])
def test_resume_reproduces_uninterrupted_run(consep_store, tmp_path, kind, loss):
    from histosynth.training.autoencoder import train_autoencoder

    recipe = micro_recipe(kind, loss)
    train_autoencoder(recipe, consep_store, tmp_path / "ref", progress=False)  # 4 steps, checkpoints at 2 and 4
    train_autoencoder(recipe, consep_store, tmp_path / "run", max_steps=2, progress=False)
    (tmp_path / "run" / "losses.jsonl").open("a").write(json.dumps({"step": 3, "loss": 99.0}) + "\n")  # lost work
    train_autoencoder(recipe, consep_store, tmp_path / "run", resume=True, progress=False)
    ref, run = _rows(tmp_path / "ref"), _rows(tmp_path / "run")
    assert [r["step"] for r in run] == [1, 2, 3, 4]
    assert run == ref  # every logged loss term, bit for bit
    if loss:  # the GAN term is off (weight 0) until disc_start, then on with a positive adaptive weight
        assert [r["adv_weight"] > 0 for r in run] == [False, False, True, True] and all(r["disc"] > 0 for r in run[2:])
    a = (tmp_path / "ref" / "autoencoder" / "diffusion_pytorch_model.safetensors").read_bytes()
    b = (tmp_path / "run" / "autoencoder" / "diffusion_pytorch_model.safetensors").read_bytes()
    assert a == b


def test_diverging_training_stops_with_an_error_naming_the_run(consep_store, tmp_path):
    from histosynth.training.autoencoder import train_autoencoder
    from histosynth.errors import TrainingError

    recipe = micro_recipe(learning_rate=1e30, max_grad_norm=0.0, steps=5, checkpoint_every=1000)
    with pytest.raises(TrainingError, match=r"run.*loss is (nan|inf).*last good checkpoint"):
        train_autoencoder(recipe, consep_store, tmp_path / "run", progress=False)
    recipe.train.checkpoint_every = 1  # the weights are already broken when step 1 is exported
    with pytest.raises(TrainingError, match=r"run2: after step 1 the latents .* have std (nan|inf): training diverged"):
        train_autoencoder(recipe, consep_store, tmp_path / "run2", progress=False)


def test_init_from_checkpoint_with_other_latent_channels_is_refused(consep_store, tmp_path):
    from histosynth.training.autoencoder import train_autoencoder

    other = make_autoencoder("vq", (16, 16, 32), 1, 4, num_vq_embeddings=128, vq_embed_dim=4, norm_num_groups=8,
                             mid_block_attention=False)
    path = compvis_ckpt(tmp_path / "vq-4ch.ckpt", other)
    recipe = micro_recipe()
    recipe.init = str(path)
    with pytest.raises(HistosynthError, match=r"vq-4ch\.ckpt.*latent has 4 channels.*has 3"):
        train_autoencoder(recipe, consep_store, tmp_path / "run", progress=False)
    # the same architecture with 3 channels loads, as a CompVis .ckpt and as a diffusers folder
    same = make_autoencoder("vq", (16, 16, 32), 1, 3, num_vq_embeddings=128, vq_embed_dim=3, norm_num_groups=8,
                            mid_block_attention=False)
    from histosynth.training.autoencoder import load_init_weights, make_model

    same.save_pretrained(tmp_path / "folder")
    for source in (compvis_ckpt(tmp_path / "vq-3ch.ckpt", same), tmp_path / "folder"):
        recipe.init = str(source)
        model = make_model(recipe)
        load_init_weights(model, recipe)
        assert all(torch.equal(v, same.state_dict()[k]) for k, v in model.state_dict().items())


# ------------------------------------------------------------------------------------------ recipes + CLI
def test_builtin_recipes_load_and_typos_are_errors(tmp_path):
    from histosynth.recipes import load_recipe
    from histosynth.recipes.autoencoder import AutoencoderRecipe

    vq4, vq8, kl8 = load_recipe("vq-f4"), load_recipe("vq-f8"), load_recipe("kl-f8")
    assert isinstance(vq4, AutoencoderRecipe) and vq4.model.downsampling_factor == 4
    assert (vq4.model.block_out_channels, vq4.model.num_vq_embeddings, vq4.model.diffusion_channels) == ((128, 256, 512), 8192, 3)
    assert (vq8.model.downsampling_factor, vq8.model.attention_levels, kl8.model.kind) == (8, (3,), "kl")
    assert load_recipe("vq-f4-tiny-cpu").model.downsampling_factor == 4
    raw = yaml.safe_load((Path(__import__("histosynth.recipes").recipes.__file__).parent / "vq-f4.yaml").read_text())
    raw["model"]["latent_chanels"] = 4
    (tmp_path / "typo.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(HistosynthError, match=r"typo\.yaml.*unknown recipe key\(s\) model\.latent_chanels"):
        load_recipe(tmp_path / "typo.yaml")
    raw["model"].pop("latent_chanels")
    raw["model"]["kind"] = "vae"
    (tmp_path / "kind.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(HistosynthError, match="model.kind must be one of"):
        load_recipe(tmp_path / "kind.yaml")


def test_cli_train_evaluate_and_error_exit_codes(consep_store, tmp_path):
    recipe_file = tmp_path / "micro.yaml"
    recipe_file.write_text(yaml.safe_dump(json.loads(json.dumps(micro_recipe(checkpoint_every=1000).to_dict()))))
    runner = CliRunner()
    run = tmp_path / "run"
    res = runner.invoke(main, ["train", "autoencoder", "--recipe", str(recipe_file), "--data", str(consep_store),
                               "--out", str(run), "--max-steps", "2"])
    assert res.exit_code == 0, res.output
    out = tmp_path / "recon.json"
    res = runner.invoke(main, ["evaluate", "recon", "--autoencoder", str(run), "--data", str(consep_store),
                               "--num", "5", "--features", "effnet-lite0", "--out", str(out)])
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert result["metrics"]["images"] == 5 and result["protocol"]["split"] == "test"
    assert result["metrics"]["rfd"] > 0 and result["protocol"]["rfd"]["features"]["extractor"] == "effnet-lite0"
    assert result["autoencoder"]["latent_shape"] == [16, 16, 3] and out.with_suffix(".png").is_file()
    # user errors: one line, exit status 2
    again = runner.invoke(main, ["evaluate", "recon", "--autoencoder", str(run), "--data", str(consep_store), "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.output
    nostore = runner.invoke(main, ["evaluate", "recon", "--autoencoder", str(run), "--data", str(tmp_path / "nope"),
                                   "--out", str(tmp_path / "x.json")])
    assert nostore.exit_code == 2 and "nope" in nostore.output
    nomodel = runner.invoke(main, ["evaluate", "recon", "--autoencoder", str(tmp_path / "none"), "--data",
                                   str(consep_store), "--out", str(tmp_path / "y.json")])
    assert nomodel.exit_code == 2 and "none" in nomodel.output
    nofeat = runner.invoke(main, ["evaluate", "recon", "--autoencoder", str(run), "--data", str(consep_store),
                                  "--features", "vgg-typo", "--out", str(tmp_path / "z.json")])
    assert nofeat.exit_code == 2 and "vgg-typo" in nofeat.output and not (tmp_path / "z.json").exists()
    clobber = runner.invoke(main, ["train", "autoencoder", "--recipe", str(recipe_file), "--data", str(consep_store),
                                   "--out", str(run), "--max-steps", "2"])
    assert clobber.exit_code == 2 and "--resume or --overwrite" in clobber.output
    wrong = runner.invoke(main, ["train", "diffusion", "--recipe", str(recipe_file), "--data", str(consep_store),
                                 "--out", str(tmp_path / "r2")])
    assert wrong.exit_code == 2 and "autoencoder" in wrong.output


def test_patch_gan_terms_reach_only_their_own_network_and_match_hand_computations():
    """The adversarial term trains the decoder only, the hinge loss the discriminator only; the adaptive weight
    equals the ratio of gradient norms computed independently with .backward()."""
    from histosynth.diffusion.autoencoder_loss import adaptive_adversarial_weight, hinge_discriminator_loss
    from histosynth.training.autoencoder import ReconstructionStep
    from histosynth.models.patch_discriminator import PatchDiscriminator

    torch.manual_seed(0)
    d = PatchDiscriminator(3, 8, 2)
    assert d(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 14, 14)  # 64 -> 32 -> 16 -> 15 -> 14 (pix2pix layout)
    step = ReconstructionStep(tiny("vq"), d)
    x = torch.rand(2, 3, 32, 32) * 2 - 1

    def grads(term_of) -> tuple[float, float]:
        step.zero_grad(set_to_none=True)
        term_of(step(x)).backward()
        norm = lambda ps: sum(float(p.grad.abs().sum()) for p in ps if p.grad is not None)  # noqa: E731
        return norm(step.ae.parameters()), norm(step.discriminator.parameters())

    ae_g, d_g = grads(lambda out: -out[3][0].mean())  # the autoencoder's adversarial term
    assert ae_g > 0 and d_g == 0
    ae_g, d_g = grads(lambda out: hinge_discriminator_loss(out[3][1], out[3][2]))  # D's loss
    assert ae_g == 0 and d_g > 0

    real, fake = torch.tensor([[0.5, 2.0]]), torch.tensor([[-3.0, 0.0]])
    assert float(hinge_discriminator_loss(real, fake)) == pytest.approx(0.5 * ((0.5 + 0.0) / 2 + (0.0 + 1.0) / 2))

    recon, _, _, (fake_for_ae, _, _) = step(x)
    rec, adv = (recon - x).abs().mean(), -fake_for_ae.mean()
    last = step.ae.decoder.conv_out.weight
    w = adaptive_adversarial_weight(rec, adv, last, 0.75)
    step.zero_grad(set_to_none=True)
    rec.backward(retain_graph=True)
    g_rec = last.grad.clone()
    last.grad = None
    adv.backward()
    expected = 0.75 * g_rec.norm() / (last.grad.norm() + 1e-4)
    assert float(w) == pytest.approx(float(expected), rel=1e-5) and not w.requires_grad


def test_rfd_is_zero_for_a_perfect_autoencoder_and_grows_with_blur(consep_store, monkeypatch):
    """rFD compares reconstructions with their originals: an exact copy scores ~0, a blurred copy more, a
    blurrier one more still (what PSNR/SSIM-trained decoders lose and a patch-GAN is for)."""
    import histosynth.evaluate.reconstruction as recon_mod
    from histosynth.evaluate.features import load_feature_extractor

    extractor = load_feature_extractor("effnet-lite0")
    ae = tiny("vq")  # only its config (factor 2) and device are used: reconstruct() is replaced below

    def blurred(sigma):
        from torchvision.transforms.functional import gaussian_blur

        def fake(_ae, images):
            x = images.float() / 255.0
            return x if sigma == 0 else gaussian_blur(x, kernel_size=9, sigma=sigma)
        return fake

    scores = []
    for sigma in (0, 1.0, 2.5):
        monkeypatch.setattr(recon_mod, "reconstruct", blurred(sigma))
        result, _, _ = recon_mod.evaluate_reconstruction(ae, consep_store, split="train", extractor=extractor)
        scores.append(result["metrics"]["rfd"])
        assert result["protocol"]["rfd"]["features"]["extractor"] == "effnet-lite0"
    assert abs(scores[0]) < 0.01 * scores[1] and scores[1] < scores[2], scores


def test_lpips_perceptual_needs_the_package_and_adapts_its_output(monkeypatch):
    """Without the lpips package the recipe's choice fails with what to install; with it (a stand-in module
    here: the real one downloads VGG) the distance is per image, shape (B,), from LPIPS-VGG."""
    import sys
    import types

    from histosynth.diffusion.autoencoder_loss import make_perceptual
    from histosynth.errors import HistosynthError

    monkeypatch.setitem(sys.modules, "lpips", None)  # import lpips -> ImportError
    with pytest.raises(HistosynthError, match=r"pip install lpips.*effnet-lite0"):
        make_perceptual("lpips")

    built = {}

    class FakeLPIPS(torch.nn.Module):
        def __init__(self, net, verbose):
            super().__init__()
            built.update(net=net, verbose=verbose)

        def forward(self, x, y):  # LPIPS returns (B, 1, 1, 1)
            return (x - y).abs().mean(dim=(1, 2, 3), keepdim=True)

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLPIPS))
    dist = make_perceptual("lpips")
    x = torch.zeros(3, 3, 8, 8)
    y = torch.stack([torch.full((3, 8, 8), v) for v in (0.0, 0.5, 1.0)])
    assert built == {"net": "vgg", "verbose": False}
    assert torch.allclose(dist(x, y), torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(HistosynthError, match="unknown perceptual distance 'vgg'"):
        make_perceptual("vgg")
