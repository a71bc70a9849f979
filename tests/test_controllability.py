"""Controllability (mask adherence, count agreement), guidance sweeps and the report.

Sample directories are built by hand from crops of the bundled real HGSC region, laid out as `histosynth sample`
writes them. Segmenters are test doubles with the interface of histosynth.evaluate.segmenter: an oracle that
returns the label maps of the image it is shown (looked up by content), and one that drops a nucleus per image.
Every expected number is computed here from the label maps, not by the code under test.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from histosynth.errors import HistosynthError

CLASSES = ("connective", "inflammatory", "neoplastic")  # the bundled region's classes.txt
CROP = 96
# top-left corners of 96 px crops of the 1500 px region: 2-15 nuclei each, every type's count varies
CORNERS = [(0, 0), (0, 600), (300, 300), (300, 900), (600, 300), (900, 300), (1200, 600), (1200, 900)]


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def region():
    from histosynth.data.formats import read_nuclei
    from histosynth.quickstart import bundled_sample

    return next(iter(read_nuclei("folder", bundled_sample(), magnification="20x")))


@pytest.fixture(scope="module")
def store16(tmp_path_factory):
    """The bundled region as 16 px patches at 10x; a small hold-out block keeps the real test split small."""
    from histosynth.data.formats import read_nuclei
    from histosynth.data.prepare_labelled import prepare_nuclei
    from histosynth.quickstart import bundled_sample

    out = tmp_path_factory.mktemp("stores") / "hgsc-16"
    prepare_nuclei(read_nuclei("folder", bundled_sample(), magnification="20x"), out, patch=16, overlap=0.0,
                   magnification="10x", holdout=0.01, seed=0, progress=False)
    return out


def _relabel(inst):
    ids, inv = np.unique(inst, return_inverse=True)
    inv = inv.reshape(inst.shape)
    return inv if ids[0] == 0 else inv + 1


def _key(image) -> str:
    return hashlib.sha1(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()


def make_sample_dir(root: Path, region, store: Path | None) -> tuple[Path, list[tuple[np.ndarray, np.ndarray]], dict]:
    """A `histosynth sample`-like directory; returns it, the label maps per image, and {image hash: labels}."""
    for sub in ("images", "masks", "labels", "real"):
        (root / sub).mkdir(parents=True)
    labels, lookup = [], {}
    with open(root / "samples.jsonl", "w") as f:
        for n, (y, x) in enumerate(CORNERS):
            name = f"{n:05d}"
            real = np.ascontiguousarray(region.image[y : y + CROP, x : x + CROP])
            gen = np.ascontiguousarray(real[..., ::-1])  # a "generated" image that differs from the real one
            inst = _relabel(region.inst_map[y : y + CROP, x : x + CROP]).astype(np.int64)
            typ = region.type_map[y : y + CROP, x : x + CROP].astype(np.int64)
            Image.fromarray(gen).save(root / "images" / f"{name}.png")
            Image.fromarray(real).save(root / "real" / f"{name}.png")
            Image.fromarray((typ * 60).astype(np.uint8)).save(root / "masks" / f"{name}.png")
            Image.fromarray(inst.astype(np.uint16)).save(root / "labels" / f"{name}_inst.png")
            Image.fromarray(typ.astype(np.uint8)).save(root / "labels" / f"{name}_type.png")
            row = {"name": name, "image": f"images/{name}.png", "mask": f"masks/{name}.png",
                   "inst_map": f"labels/{name}_inst.png", "type_map": f"labels/{name}_type.png",
                   "real": f"real/{name}.png", "store_index": n, "seed": 0, "guidance_scale": 1.0,
                   "num_inference_steps": 2, "scheduler": "ddpm", "split": "test"}
            if store is not None:
                row["store"] = str(store)
            f.write(json.dumps(row) + "\n")
            labels.append((inst, typ))
            lookup[_key(gen)] = lookup[_key(real)] = (inst, typ)
    return root, labels, lookup


class Oracle:
    """Returns the label maps an image was made from (a perfect segmenter)."""

    def __init__(self, lookup, class_names=CLASSES):
        self.lookup, self.class_names, self.path = lookup, list(class_names), "oracle-segmenter"

    def segment_one(self, image):
        inst, typ = self.lookup[_key(image)]
        return inst.copy(), typ.copy()

    def predict(self, images):
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3
        pairs = [self.segment_one(im) for im in images]
        return (np.stack([p[0] for p in pairs]).astype(np.int32), np.stack([p[1] for p in pairs]).astype(np.int32))


class DropOne(Oracle):
    """The oracle, but the nucleus with the highest instance id of every image is missed."""

    def segment_one(self, image):
        inst, typ = super().segment_one(image)
        gone = inst == inst.max()
        inst[gone], typ[gone] = 0, 0
        return inst, typ


def _dropped_type(inst, typ) -> int:
    return int(np.bincount(typ[inst == inst.max()], minlength=4)[1:].argmax() + 1)


def _count(inst, typ, k) -> int:
    return sum(1 for i in np.unique(inst[inst > 0]) if np.bincount(typ[inst == i], minlength=4)[1:].argmax() + 1 == k)


@pytest.fixture(scope="module")
def sample_dir(tmp_path_factory, region, store16):
    return make_sample_dir(tmp_path_factory.mktemp("samples") / "s", region, store16)


# ------------------------------------------------------------------------------------ mask adherence
def test_oracle_segmenter_gives_perfect_adherence(sample_dir):
    from histosynth.evaluate.controllability import mask_adherence

    root, labels, lookup = sample_dir
    res = mask_adherence(root, Oracle(lookup), batch_size=3)
    assert res["n_images"] == len(CORNERS) and res["class_names"] == list(CLASSES)
    for side in ("generated", "real"):
        m = res[side]
        assert m["dice"] == m["aji"] == m["pq"] == m["mpq"] == 1.0
        for k, name in enumerate(CLASSES, start=1):
            want = sum(_count(i, t, k) for i, t in labels)
            assert m["per_type"][name]["requested"] == m["per_type"][name]["found"] == want > 0
            assert m["per_type"][name]["fn"] == m["per_type"][name]["fp"] == 0
            assert m["per_type"][name]["pq"] == 1.0


def test_a_segmenter_missing_one_nucleus_per_image(sample_dir):
    from histosynth.evaluate.controllability import mask_adherence

    root, labels, lookup = sample_dir
    res = mask_adherence(root, DropOne(lookup), batch_size=5)
    n = len(labels)
    dropped = [_dropped_type(i, t) for i, t in labels]
    total = sum(len(np.unique(i[i > 0])) for i, _ in labels)
    dices = []
    for inst, _ in labels:
        area, lost = (inst > 0).sum(), (inst == inst.max()).sum()
        dices.append(2 * (area - lost) / (2 * area - lost))
    for side in ("generated", "real"):  # the same segmenter on both image sets
        m = res[side]
        assert m["dice"] == pytest.approx(np.mean(dices), abs=1e-12)
        assert m["pq"] == pytest.approx((total - n) / (total - n + n / 2), abs=1e-12)  # every match has IoU 1
        pq_types = []
        for k, name in enumerate(CLASSES, start=1):
            fn = dropped.count(k)
            tp = sum(_count(i, t, k) for i, t in labels) - fn
            assert (m["per_type"][name]["fn"], m["per_type"][name]["fp"], m["per_type"][name]["tp"]) == (fn, 0, tp)
            assert m["per_type"][name]["found"] == m["per_type"][name]["requested"] - fn
            pq_types.append(tp / (tp + fn / 2))
            assert m["per_type"][name]["pq"] == pytest.approx(pq_types[-1], abs=1e-12)
        assert m["mpq"] == pytest.approx(np.mean(pq_types), abs=1e-12)


def test_class_names_must_match_the_segmenter(sample_dir, tmp_path, region):
    from histosynth.evaluate.controllability import count_agreement, mask_adherence

    root, _, lookup = sample_dir
    wrong = Oracle(lookup, class_names=("epithelial", "lymphocyte", "other"))
    with pytest.raises(HistosynthError, match=r"samples\.jsonl: .*differ from the segmenter's"):
        mask_adherence(root, wrong)
    with pytest.raises(HistosynthError, match="differ from the segmenter's"):
        count_agreement(root, wrong, tmp_path / "counts")
    # rows that do not name their classes (no store): the segmenter's are assumed, with a warning
    bare, _, lookup2 = make_sample_dir(tmp_path / "bare", region, store=None)
    with pytest.warns(UserWarning, match="do not name their classes"):
        assert mask_adherence(bare, Oracle(lookup2))["generated"]["pq"] == 1.0
    with pytest.raises(HistosynthError, match="type id 3 is above"):  # ... but type ids must fit them
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mask_adherence(bare, Oracle(lookup2, class_names=("a", "b")))


def test_missing_pieces_are_errors_naming_the_file(sample_dir, tmp_path):
    from histosynth.errors import DataError
    from histosynth.evaluate.controllability import mask_adherence

    root, _, lookup = sample_dir
    with pytest.raises(DataError, match="samples.jsonl"):
        mask_adherence(tmp_path, Oracle(lookup))
    broken = tmp_path / "broken"
    broken.mkdir()
    rows = (root / "samples.jsonl").read_text().splitlines()
    row = json.loads(rows[0])
    row = {**row, **{k: str(root / row[k]) for k in ("inst_map", "type_map", "real")}, "image": "images/gone.png"}
    (broken / "samples.jsonl").write_text(json.dumps(row) + "\n")
    with pytest.raises(DataError, match=re.escape(str(broken / "images" / "gone.png"))):
        mask_adherence(broken, Oracle(lookup))


# ------------------------------------------------------------------------------------------- counts
def test_count_agreement_oracle_and_drop_one(sample_dir, tmp_path):
    from histosynth.evaluate.controllability import count_agreement

    root, labels, lookup = sample_dir
    res = count_agreement(root, Oracle(lookup), tmp_path / "oracle")
    for name in CLASSES:
        s = res["per_type"][name]
        assert s["pearson_r"] == pytest.approx(1.0, abs=1e-12)
        assert s["mean_diff"] == 0.0 and s["sd"] == 0.0 and s["n"] == len(labels)
    for png in [*(f"bland_altman_{n}.png" for n in CLASSES), "counts_scatter.png"]:
        assert Image.open(tmp_path / "oracle" / png).size[0] > 100

    res = count_agreement(root, DropOne(lookup), tmp_path / "drop")
    dropped = [_dropped_type(i, t) for i, t in labels]
    for k, name in enumerate(CLASSES, start=1):
        req = np.array([_count(i, t, k) for i, t in labels], float)
        diff = -np.array([d == k for d in dropped], float)  # found − requested
        s = res["per_type"][name]
        assert s["mean_diff"] == pytest.approx(diff.mean(), abs=1e-12)
        assert s["sd"] == pytest.approx(diff.std(ddof=1), abs=1e-12)
        assert s["loa_high"] == pytest.approx(diff.mean() + 1.96 * diff.std(ddof=1), abs=1e-12)
        assert s["pearson_r"] == pytest.approx(np.corrcoef(req, req + diff)[0, 1], abs=1e-12)
        assert res["reference"][name]["mean_diff"] == pytest.approx(diff.mean(), abs=1e-12)  # real patches alike
    assert res["per_type"]["all nuclei"]["mean_diff"] == -1.0
    saved = json.loads((tmp_path / "drop" / "counts.json").read_text())
    assert saved["per_type"]["neoplastic"]["mean_diff"] == pytest.approx(res["per_type"]["neoplastic"]["mean_diff"])
    assert len((tmp_path / "drop" / "counts.csv").read_text().splitlines()) == len(labels) + 1


# -------------------------------------------------------------------------------------------- sweep
def _tiny_pipeline():
    from diffusers import DDPMScheduler

    from histosynth.models import SemanticUNet
    from histosynth.pipelines.nasdm import NASDMPipeline

    torch.manual_seed(0)
    unet = SemanticUNet(sample_size=16, in_channels=3, cond_channels=4, learn_sigma=True, block_out_channels=(16, 32),
                        layers_per_block=1, attention_resolutions=(8,), num_head_channels=16, norm_num_groups=8,
                        spade_hidden=16)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", variance_type="learned_range")
    return NASDMPipeline(unet=unet.eval(), scheduler=sched, class_names=list(CLASSES), magnification="10x")


@pytest.fixture(scope="module")
def sweep_run(tmp_path_factory, store16):
    from histosynth.evaluate.sweep import guidance_sweep

    root = tmp_path_factory.mktemp("sweep")
    _tiny_pipeline().save_pretrained(root / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 2 images: singular covariance warnings
        rows = guidance_sweep(root / "model", store16, root / "out", "0,1.5", num=2, steps=2, scheduler="ddpm",
                              seed=0, progress=False, device="cpu")
    return root, rows


def test_guidance_sweep_writes_json_and_png(sweep_run, store16):
    from histosynth.evaluate.fid import evaluate_distribution

    root, rows = sweep_run
    out = root / "out"
    saved = json.loads((out / "sweep.json").read_text())
    assert saved["param"] == "guidance" and saved["values"] == [0.0, 1.5]
    assert [r["guidance"] for r in saved["rows"]] == [0.0, 1.5] == [r["guidance_scale"] for r in rows]
    assert saved["features"] == "effnet-lite0" and saved["protocol"]
    for r in saved["rows"]:
        assert r["n_generated"] == 2 and r["num_inference_steps"] == 2 and np.isfinite(r["fid"])
        assert np.isfinite(r["nuclei_contrast_generated"]) and np.isfinite(r["nuclei_contrast_real"])
        sub = out / r["dir"]
        manifest = [json.loads(x) for x in (sub / "samples.jsonl").read_text().splitlines()]
        assert len(manifest) == 2 and {m["guidance_scale"] for m in manifest} == {r["guidance"]}
    assert [r["dir"] for r in rows] == ["guidance=0", "guidance=1.5"]
    # the same masks for every value, and different images (guidance changes the samples)
    a, b = (out / "guidance=0" / "samples.jsonl").read_text(), (out / "guidance=1.5" / "samples.jsonl").read_text()
    assert [json.loads(x)["store_index"] for x in a.splitlines()] == [
        json.loads(x)["store_index"] for x in b.splitlines()]
    assert not np.array_equal(np.asarray(Image.open(out / "guidance=0/images/00000.png")),
                              np.asarray(Image.open(out / "guidance=1.5/images/00000.png")))
    assert Image.open(out / "sweep.png").size[0] > 300
    # the numbers are evaluate_distribution's on the same image sets
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = evaluate_distribution(store16, out / "guidance=1.5" / "images", split="test", progress=False)
    assert rows[1]["fid"] == pytest.approx(ref["fid"], rel=1e-9)
    assert rows[1]["kid_mean"] == pytest.approx(ref["kid_mean"], rel=1e-9)
    assert rows[1]["n_real"] == ref["n_real"]


def test_a_sweep_s_unset_setting_is_the_model_s_own(tmp_path, store16, monkeypatch):
    """Steps not given to a guidance sweep are the model's default, as `histosynth sample` reads it (NASDM saves no
    sampling section: its pipeline's DEFAULT_SAMPLING, made 3 here to be quick), recorded in every row and in the
    header's fixed setting."""
    import histosynth.pipelines.nasdm as nasdm
    from histosynth.evaluate.sweep import guidance_sweep

    monkeypatch.setitem(nasdm.DEFAULT_SAMPLING, "num_inference_steps", 3)
    _tiny_pipeline().save_pretrained(tmp_path / "model")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 2 images: singular covariance warnings
        rows = guidance_sweep(tmp_path / "model", store16, tmp_path / "out", "1.5", num=2, progress=False, device="cpu")
    saved = json.loads((tmp_path / "out" / "sweep.json").read_text())
    assert [r["num_inference_steps"] for r in rows] == [3] and saved["fixed"] == {"num_inference_steps": 3}
    manifest = [json.loads(x) for x in (tmp_path / "out" / rows[0]["dir"] / "samples.jsonl").read_text().splitlines()]
    assert {m["num_inference_steps"] for m in manifest} == {3}


def test_sweep_rejects_unknown_parameters_and_bad_values(tmp_path, store16):
    from histosynth.evaluate.sweep import guidance_sweep, parse_values

    with pytest.raises(HistosynthError, match="valid parameters are guidance, steps"):
        guidance_sweep(tmp_path / "no-model", store16, tmp_path / "out", [1.0], param="eta", num=2, steps=2)
    assert not (tmp_path / "out").exists()
    with pytest.raises(HistosynthError, match="whole numbers"):
        parse_values("10,2.5", "steps")
    with pytest.raises(HistosynthError, match="not a number"):
        parse_values("0,x", "guidance")
    assert parse_values("50, 100", "steps") == [50, 100]


# ------------------------------------------------------------------------------------------- report
def _links(md: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)


def test_report_has_tables_and_links_existing_pngs(sample_dir, sweep_run, tmp_path):
    from histosynth.evaluate.controllability import count_agreement, mask_adherence
    from histosynth.evaluate.report import build_report
    from histosynth.viz import plot_losses

    root, labels, lookup = sample_dir
    adh = tmp_path / "adherence.json"
    adh.write_text(json.dumps(mask_adherence(root, DropOne(lookup)), default=str))
    count_agreement(root, DropOne(lookup), tmp_path / "counts")
    run = tmp_path / "run"
    run.mkdir()
    (run / "losses.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0 / s, "simple": 1.0 / s, "vlb": 0.01,
                                                          "lr": 1e-3, "stage": "train"}) + "\n" for s in range(1, 21)))
    plot_losses(run / "losses.jsonl", run / "loss.png")
    fid_json = tmp_path / "fid.json"
    fid_json.write_text(json.dumps({"fid": 12.5, "kid_mean": 0.01, "n_real": 100, "n_generated": 50,
                                    "features": "effnet-lite0", "protocol": {"weights_sha256": "abc123"}}))

    report = build_report([run, root, sweep_run[0] / "out", adh, tmp_path / "counts", fid_json],
                          tmp_path / "rep" / "report.md")
    md = report.read_text()
    for heading in ("Training run", "Samples", "Sweep over guidance", "Mask adherence", "Requested vs generated",
                    "Metrics: "):
        assert heading in md, heading
    assert "| guidance | fid | kid_mean |" in md and "| images | dice | aji | pq |" in md
    assert re.search(r"\| generated \(n=8\) \| [0-9.]+ \|", md)
    assert "weights_sha256=abc123" in md and "segmenter: oracle-segmenter" in md and "machine:" in md
    assert "| last step | 20 |" in md
    links = _links(md)
    names = {Path(x).name.split("-", 2)[-1] for x in links}
    assert {"loss.png", "sweep.png", "counts_scatter.png", "bland_altman_neoplastic.png"} <= names
    for link in links:
        assert not Path(link).is_absolute() and (report.parent / link).is_file(), link
    with pytest.raises(HistosynthError, match="does not exist"):
        build_report([tmp_path / "nope"], tmp_path / "r2.md")


# ---------------------------------------------------------------------------------------------- CLI
@pytest.fixture
def cli(monkeypatch, sample_dir):
    """An `evaluate` group with these commands, and load_segmenter faked to give the oracle."""
    import click

    from histosynth.cli.evaluate_controllability import COMMANDS

    lookup = sample_dir[2]
    fake = types.ModuleType("histosynth.evaluate.segmenter")
    fake.load_segmenter = lambda path, device="cpu": (DropOne if "drop" in str(path) else Oracle)(lookup)
    monkeypatch.setitem(sys.modules, "histosynth.evaluate.segmenter", fake)
    return click.Group("evaluate", commands=COMMANDS)


def test_cli_commands(cli, sample_dir, tmp_path):
    root = sample_dir[0]
    runner = CliRunner()
    res = runner.invoke(cli, ["mask-adherence", "--generated", str(root), "--segmenter", "seg-oracle",
                              "--out", str(tmp_path / "a.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "a.json").read_text())["generated"]["pq"] == 1.0
    res = runner.invoke(cli, ["counts", "--generated", str(root), "--segmenter", "seg-drop",
                              "--out", str(tmp_path / "c")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "c" / "counts_scatter.png").is_file()
    res = runner.invoke(cli, ["report", str(tmp_path / "a.json"), str(tmp_path / "c"), "--out", str(tmp_path / "r.md")])
    assert res.exit_code == 0, res.output
    assert "Mask adherence" in (tmp_path / "r.md").read_text()
    # user errors: one line naming the file / option, exit status 2
    res = runner.invoke(cli, ["mask-adherence", "--generated", str(tmp_path / "none"), "--segmenter", "seg"])
    assert res.exit_code == 2 and str(tmp_path / "none") in res.output
    res = runner.invoke(cli, ["sweep", "--model", "m", "--masks", "s", "--param", "eta", "--out", str(tmp_path / "w")])
    assert res.exit_code == 2 and "valid parameters are guidance, steps" in res.output
    res = runner.invoke(cli, ["report", str(tmp_path / "missing"), "--out", str(tmp_path / "r3.md")])
    assert res.exit_code == 2 and "does not exist" in res.output
