"""HistoSmith: the joint first stage, the count condition, the pipeline, generation as a dataset and its read-back.

Real tissue: a 256 px corner of the bundled HGSC region as 16 patches of 32 px at 10x (3 classes). The models
are tiny; the checks are on behaviour (losses against closed forms, counts against independent counting,
labels read back exactly, errors naming what is wrong), not on image quality.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from histosynth.conditions.counts import CountConditioner
from histosynth.data.store import PatchStore, nuclei_per_type
from histosynth.diffusion.joint_autoencoder_loss import tversky_loss
from histosynth.errors import HistosynthError
from histosynth.recipes import recipe_from_dict

CLASSES = ("connective", "inflammatory", "neoplastic")
TINY_UNET = {"block_out_channels": [32, 64], "layers_per_block": 1, "attention_head_dim": [8, 8],
             "down_block_types": ["DownBlock2D", "AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D", "UpBlock2D"],
             "mid_block_type": "UNetMidBlock2D", "norm_num_groups": 8, "cross_attention_dim": 32}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def store(hgsc_corner_store) -> Path:
    return hgsc_corner_store


@pytest.fixture(scope="module")
def ae_recipe(joint_ae_recipe):
    return joint_ae_recipe


def ldm_recipe(autoencoder: Path, **train):
    t = {"steps": 4, "learning_rate": 1e-3, "lr_warmup_steps": 2, "batch_size": 4, "checkpoint_every": 2,
         "keep_checkpoints": 10, "log_every": 1, "num_workers": 0, "ema_decay": 0.9, "seed": 5, "condition_dropout": 0.3}
    t.update(train)
    return recipe_from_dict({"name": "hs-test", "method": "histosmith", "patch_size": 32,
                             "autoencoder": {"path": str(autoencoder)}, "unet": TINY_UNET, "train": t,
                             "sampling": {"num_inference_steps": 4, "guidance_scale": 2.0}})


@pytest.fixture(scope="module")
def trained(store, ae_recipe, tmp_path_factory):
    """(joint autoencoder run, HistoSmith run), each a few steps on the real patches."""
    from histosynth.training import fit
    from histosynth.training.histosmith import HistoSmithTask
    from histosynth.training.histosmith_autoencoder import JointAutoencoderTask

    root = tmp_path_factory.mktemp("runs")
    fit(JointAutoencoderTask(ae_recipe(), store, progress=False), root / "ae", progress=False)
    fit(HistoSmithTask(ldm_recipe(root / "ae"), store, progress=False), root / "hs", progress=False)
    return root / "ae", root / "hs"


def _losses(run: Path) -> list[dict]:
    return [json.loads(r) for r in (run / "losses.jsonl").read_text().splitlines() if r]


def _conditioner(**kw) -> CountConditioner:
    args = dict(class_names=list(CLASSES), tissues=["colon", "ovary"], count_scale=[4.0, 2.0, 1.0],
                count_range=[[0, 4], [0, 2], [0, 1]])
    args.update(kw)
    return CountConditioner(**args)


# ------------------------------------------------------------------------------------------------ losses, counts
def test_tversky_loss_against_its_closed_form():
    # one image, 2 classes, 4 pixels: target class ids [1, 1, 0, 0]; P(class 1) = [0.9, 0.4, 0.2, 0.0]
    p1 = torch.tensor([0.9, 0.4, 0.2, 0.0]).view(1, 1, 2, 2)
    probs = torch.cat([1 - p1, p1], dim=1)
    target = torch.tensor([1, 1, 0, 0]).view(1, 2, 2)
    a, b = 0.3, 0.7
    # class 1: TP = 1.3, FP = 0.2, FN = 0.7; class 0: TP = 0.8 + 1.0 = 1.8, FP = 0.1 + 0.6 = 0.7, FN = 0.2
    ti1 = (1.3 + 1) / (1.3 + a * 0.2 + b * 0.7 + 1)
    ti0 = (1.8 + 1) / (1.8 + a * 0.7 + b * 0.2 + 1)
    assert tversky_loss(probs, target, a, b).item() == pytest.approx(1 - (ti0 + ti1) / 2, abs=1e-6)
    perfect = torch.nn.functional.one_hot(target, 2).permute(0, 3, 1, 2).float()
    assert tversky_loss(perfect, target, a, b).item() == pytest.approx(0.0, abs=1e-7)
    # false negatives cost more than false positives when β > α
    miss = probs.clone()
    miss[0, 1, 0, 0], miss[0, 0, 0, 0] = 0.0, 1.0  # the confident true pixel missed
    extra = probs.clone()
    extra[0, 1, 1, 1], extra[0, 0, 1, 1] = 0.9, 0.1  # a background pixel called class 1 instead
    assert tversky_loss(miss, target, a, b) > tversky_loss(extra, target, a, b)


def test_class_weighted_cross_entropy_matches_an_independent_computation():
    from types import SimpleNamespace

    from histosynth.diffusion.joint_autoencoder_loss import class_weights_from_frequency, joint_autoencoder_loss

    w = class_weights_from_frequency([900, 90, 9, 1])
    expected = 1 / np.sqrt(np.array([900, 90, 9, 1]) / 1000)
    np.testing.assert_allclose(w.numpy(), expected / expected.mean(), rtol=1e-6)
    assert class_weights_from_frequency([10, 0, 5])[1] == class_weights_from_frequency([10, 0, 5]).max()  # unseen class
    torch.manual_seed(0)
    x = torch.cat([torch.rand(2, 4, 4, 4) * 2 - 1, torch.nn.functional.one_hot(torch.randint(0, 4, (2, 4, 4)), 4)
                   .permute(0, 3, 1, 2).float() * 2 - 1], dim=1)  # K = 3 types
    logits = torch.randn(2, 4, 4, 4)
    cfg = SimpleNamespace(l1_weight=0.0, l2_weight=0.0, perceptual_weight=0.0, codebook_weight=0.0, distance_l1_weight=0.0,
                          distance_l2_weight=0.0, cross_entropy_weight=1.0, tversky_weight=0.0, tversky_alpha=0.3,
                          tversky_beta=0.7)
    _, terms = joint_autoencoder_loss(x, x[:, :4], logits, torch.zeros(()), cfg=cfg, perceptual=None, class_weights=w)
    target = x[:, 4:].argmax(1)
    logp = torch.log_softmax(logits, 1).gather(1, target[:, None])[:, 0]
    manual = -(w[target] * logp).sum() / w[target].sum()  # weighted mean, as torch's cross_entropy defines it
    assert terms["cross_entropy"].item() == pytest.approx(manual.item(), rel=1e-5)


def test_count_vector_from_a_hand_built_map_is_normalised_by_the_training_maximum():
    inst = np.zeros((12, 12), np.int32)
    types = np.zeros((12, 12), np.int32)
    for k, (y, x, t) in enumerate([(1, 1, 1), (1, 7, 1), (7, 1, 2)], start=1):
        inst[y:y + 3, x:x + 3], types[y:y + 3, x:x + 3] = k, t
    types[2, 2] = 2  # one stray pixel: the instance is still of its majority type 1
    counts = nuclei_per_type(inst, types, CLASSES)
    assert counts == {"connective": 2, "inflammatory": 1, "neoplastic": 0}
    vec = _conditioner().vectors([counts], ["ovary"])
    assert vec.shape == (1, 5) and vec.dtype == torch.float32
    np.testing.assert_allclose(vec[0].numpy(), [2 / 4, 1 / 2, 0.0, 0.0, 1.0])
    # the same request as an array in class order, and named types in any order, give the same vector
    assert torch.equal(_conditioner().vectors(np.array([[2, 1, 0]]), ["ovary"]), vec)
    assert torch.equal(_conditioner().vectors([{"inflammatory": 1, "connective": 2}], ["ovary"]), vec)


def test_training_conditions_come_from_the_store_labels(store):
    from histosynth.recipes.histosmith import HistoSmithRecipe
    from histosynth.training.histosmith import make_conditioner, patch_conditions

    s = PatchStore(store)
    idx = s.indices("train")
    counts, tissues = patch_conditions(s, idx, "unknown")
    assert set(tissues) == {"ovary"}
    for row, i in zip(counts, idx):  # independent count: distinct instance ids, each by its majority type
        item = s[i]
        expected = np.zeros(len(CLASSES))
        for label in np.unique(item["inst_map"])[1:]:
            votes = np.bincount(item["type_map"][item["inst_map"] == label], minlength=len(CLASSES) + 1)[1:]
            if votes.any():
                expected[votes.argmax()] += 1
        np.testing.assert_array_equal(row, expected)
    recipe = ldm_recipe(Path("unused"))
    assert isinstance(recipe, HistoSmithRecipe)
    cond = make_conditioner(recipe, s.class_names, counts, tissues)
    assert cond.config.count_scale == [max(1.0, m) for m in counts.max(0)]
    assert cond.config.count_range == [[int(a), int(b)] for a, b in zip(counts.min(0), counts.max(0))]
    assert cond.vectors(counts, tissues)[:, :3].max() == 1.0  # the training range maps into [0, 1]


def test_bad_requests_are_clear_errors_and_out_of_range_warns():
    c = _conditioner()
    with pytest.raises(HistosynthError, match="3 entries .*connective, inflammatory, neoplastic.*shape \\(1, 2\\)"):
        c.vectors([[1, 2]], ["ovary"])
    with pytest.raises(HistosynthError, match="not negative"):
        c.vectors([[1, -2, 0]], ["ovary"])
    with pytest.raises(HistosynthError, match="unknown nucleus type 'neutrophil'; the model knows connective"):
        c.vectors([{"neutrophil": 3}], ["ovary"])
    with pytest.raises(HistosynthError, match="unknown tissue 'lung'; the model knows colon, ovary"):
        c.vectors([[1, 1, 0]], ["lung"])
    with pytest.warns(UserWarning, match="inflammatory counts outside the training range 0..2 \\(up to 9\\)"):
        c.vectors([[1, 9, 0]], ["colon"])


def test_dropped_conditions_get_the_learned_null_and_both_injections_work():
    torch.manual_seed(0)
    c = _conditioner(injection="both", num_tokens=3, token_dim=8)
    with torch.no_grad():
        c.null.copy_(torch.randn(5))
    values = c.vectors([[1, 1, 0], [4, 0, 1]], ["colon", "ovary"])
    out = c(values, torch.tensor([False, True]))
    assert torch.equal(out.class_labels[0], values[0]) and torch.equal(out.class_labels[1], c.null)
    null = c.null_condition(2)
    assert torch.allclose(out.tokens[1], null.tokens[0], atol=1e-6) and out.tokens.shape == (2, 3, 8)
    assert not torch.allclose(out.tokens[0], null.tokens[0], atol=1e-3)
    emb = _conditioner(injection="embedding")
    assert emb(values).tokens is None and emb.to_tokens is None
    with pytest.raises(HistosynthError, match="injection 'embedding' has no tokens for the CrossAttn"):
        recipe_from_dict({"name": "x", "method": "histosmith", "patch_size": 32, "autoencoder": {"path": "ae"},
                          "train": {"steps": 1}})  # default UNet blocks cross-attend


# ------------------------------------------------------------------------------------------------ training
def test_tiny_joint_autoencoder_overfits_real_patches_on_both_heads(store, ae_recipe, tmp_path):
    from histosynth.models.joint_autoencoder import joint_batch
    from histosynth.training import fit
    from histosynth.training.histosmith_autoencoder import JointAutoencoderTask, make_joint_model

    s = PatchStore(store)
    idx = s.indices("train")
    x = joint_batch(s, idx)

    def scores(model):
        with torch.no_grad():
            out = model.decode_heads(model.encode(x).latents)
        image_l1 = (out.image - x[:, :3]).abs().mean().item()
        dist_mae = (out.distance - (x[:, 3:4] + 1) / 2).abs().mean().item()
        fg_true, fg_pred = x[:, 4] < 0, out.mask_logits.argmax(1) > 0  # channel 4 = background (2·onehot − 1)
        dice = (2 * (fg_true & fg_pred).sum() / (fg_true.sum() + fg_pred.sum())).item()
        return image_l1, dist_mae, dice

    torch.manual_seed(0)
    before = scores(make_joint_model(ae_recipe(), s.class_names).eval())
    result = fit(JointAutoencoderTask(ae_recipe(steps=300, checkpoint_every=300), store, progress=False),
                 tmp_path / "ae", progress=False)
    from histosynth.models.autoencoders import load_autoencoder

    model, _ = load_autoencoder(result.run)
    after = scores(model)
    assert after[0] < 0.5 * before[0], (before, after)  # image reconstructed
    assert after[1] < 0.5 * before[1], (before, after)  # distance map reconstructed
    assert after[2] > 0.75 and after[2] > before[2] + 0.2, (before, after)  # foreground of the mask head
    rows = _losses(tmp_path / "ae")
    for term in ("cross_entropy", "tversky", "distance_l1", "l1"):
        assert np.mean([r[term] for r in rows[-20:]]) < 0.6 * np.mean([r[term] for r in rows[:5]]), term
    assert model.config.class_names == list(CLASSES) and (tmp_path / "ae" / "loss.png").is_file()


def test_histosmith_resumes_exactly(store, trained, tmp_path):
    from histosynth.training import fit
    from histosynth.training.histosmith import HistoSmithTask

    ae, full = trained
    recipe = ldm_recipe(ae)
    fit(HistoSmithTask(recipe, store, progress=False), tmp_path / "run", max_steps=2, progress=False)
    fit(HistoSmithTask(recipe, store, progress=False), tmp_path / "run", resume=True, progress=False)
    assert [r["loss"] for r in _losses(tmp_path / "run")] == [r["loss"] for r in _losses(full)]
    assert [r["step"] for r in _losses(full)] == [1, 2, 3, 4]


# ------------------------------------------------------------------------------------------------ pipeline
def test_pipeline_save_load_and_outputs(trained, tmp_path):
    from histosynth.methods import load_pipeline
    from histosynth.pipelines.histosmith import HistoSmithPipeline

    _, run = trained
    method, pipe = load_pipeline(run)
    assert method.name == "histosmith" and isinstance(pipe, HistoSmithPipeline)
    assert pipe.class_names == list(CLASSES) and pipe.tissues == ["ovary"]
    request = [{"inflammatory": 3, "neoplastic": 1}, {"connective": 2}]
    a = pipe(request, generator=torch.Generator().manual_seed(7), progress=False)
    pipe.save_pretrained(tmp_path / "saved")
    b = HistoSmithPipeline.from_pretrained(tmp_path / "saved")(request, generator=torch.Generator().manual_seed(7),
                                                               progress=False)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.inst_maps, b.inst_maps)
    assert a.images.shape == (2, 32, 32, 3) and a.images.dtype == np.uint8 and a.inst_maps.dtype == np.int32
    np.testing.assert_array_equal(a.requested_counts, [[0, 3, 1], [2, 0, 0]])
    for inst, types, realised in zip(a.inst_maps, a.type_maps, a.realised_counts):
        assert list(nuclei_per_type(inst, types, CLASSES).values()) == list(realised)
        assert ((types > 0) <= (inst > 0)).all()  # every typed pixel belongs to an instance
    assert a.num_steps_run == 4 and a.tissues == ["ovary", "ovary"]
    with pytest.raises(HistosynthError, match="unknown tissue 'colon'"):
        pipe(request, tissue="colon", progress=False)


def test_guidance_zero_ignores_the_request_and_one_follows_it(trained):
    from histosynth.methods import load_pipeline

    _, run = trained
    _, pipe = load_pipeline(run)

    def images(request, g):
        return pipe([request], guidance_scale=g, generator=torch.Generator().manual_seed(3), progress=False,
                    warn_out_of_range=False).images

    a, b = {"neoplastic": 9}, {"connective": 5, "inflammatory": 5}
    assert np.array_equal(images(a, 0.0), images(b, 0.0))  # g = 0: the null condition alone
    assert not np.array_equal(images(a, 1.0), images(b, 1.0))  # g = 1: the request alone


def test_pipelines_import_from_the_package_in_a_fresh_interpreter():
    code = "from histosynth import HistoSmithPipeline, NASDMPipeline; print(HistoSmithPipeline.__name__)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "HistoSmithPipeline", done.stderr[-2000:]


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "histosynth.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def test_generated_dataset_reads_back_through_prepare_nuclei(store, trained, tmp_path):
    from histosynth.data.formats import read_nuclei

    _, run = trained
    requests = tmp_path / "requests.csv"
    requests.write_text("connective,inflammatory,neoplastic,tissue\n1,4,0,ovary\n0,0,2,\n")
    out = tmp_path / "samples"
    done = _cli("sample", "--model", str(run), "--requests", str(requests), "--num", "3", "--boost", "inflammatory=2",
                "--batch-size", "2", "--out", str(out))
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(r) for r in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["requested"]["inflammatory"] for r in rows] == [8.0, 0.0, 8.0]  # cycled, boosted ×2
    assert (out / "grid.png").stat().st_size > 1000
    for fmt, folder, opts in (("folder", out / "folder", {"magnification": "10x"}), ("consep", out / "hovernet", {})):
        records = list(read_nuclei(fmt, folder, **opts))
        assert len(records) == 3 and all(r.class_names == CLASSES for r in records), fmt
        for rec, row in zip(sorted(records, key=lambda r: Path(r.source).stem), rows):
            from PIL import Image

            inst = np.asarray(Image.open(out / row["inst_map"]))
            types = np.asarray(Image.open(out / row["type_map"]))
            assert np.array_equal(rec.image, np.asarray(Image.open(out / row["image"]))), fmt
            assert np.array_equal(rec.type_map, types), fmt
            # the same partition into nuclei (ids may be renumbered)
            pairs = set(zip(rec.inst_map.ravel().tolist(), inst.ravel().tolist()))
            assert len(pairs) == len(np.unique(inst)) == len(np.unique(rec.inst_map)), fmt
            assert nuclei_per_type(rec.inst_map, rec.type_map, CLASSES) == row["realised"], fmt
    again = _cli("sample", "--model", str(run), "--counts", "inflammatory=1", "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr


@pytest.mark.parametrize("args, words", [
    (["--counts", "inflammatory=2,neutrophil=1"], "unknown nucleus type 'neutrophil'"),
    (["--counts", "inflammatory=-1"], "not negative"),
    (["--counts", "inflammatory"], "--counts: expected TYPE=NUMBER"),
    (["--counts", "inflammatory=1", "--tissue", "lung"], "unknown tissue 'lung'; the model knows ovary"),
    (["--prompts", "x.txt"], "give --counts-from STORE, --requests FILE or --counts"),
])
def test_bad_sample_requests_fail_with_one_line_and_leave_nothing(trained, tmp_path, args, words):
    _, run = trained
    done = _cli("sample", "--model", str(run), *args, "--out", str(tmp_path / "out"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert words in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()


def test_recipes_load_and_the_cli_trains_the_joint_autoencoder_as_an_autoencoder(store, ae_recipe, tmp_path):
    from histosynth.recipes import load_recipe

    assert load_recipe("histosmith-vq").method == "histosmith-autoencoder"
    paper = load_recipe("histosmith-256")
    assert paper.condition.injection == "embedding" and paper.patch_size == 256
    assert load_recipe("histosmith-tiny-cpu").autoencoder.path.endswith("histosmith-vq-tiny")
    recipe_file = tmp_path / "ae.yaml"
    recipe_file.write_text(yaml.safe_dump(json.loads(json.dumps(ae_recipe(steps=2, checkpoint_every=2).to_dict()))))
    wrong = _cli("train", "diffusion", "--recipe", str(recipe_file), "--data", str(store), "--out", str(tmp_path / "r"))
    assert wrong.returncode == 2 and "trains an autoencoder" in wrong.stderr
    ok = _cli("train", "autoencoder", "--recipe", str(recipe_file), "--data", str(store), "--out", str(tmp_path / "r"))
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert json.loads((tmp_path / "r" / "autoencoder" / "config.json").read_text())["_class_name"] == "JointVQModel"
