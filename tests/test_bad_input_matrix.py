"""Every bad input the product knows, at the command line, in one table (issue 14, "one bad-input matrix").

Each case builds its input under a temporary folder (from the bundled real HGSC region or a few synthetic pixels),
runs the command a user would type, and checks: the exit status (2 for bad input); one line on stderr that names
the file and says what to do in the command line's words (``--option``, never a Python ``keyword=``); no output
that looks complete (the output path absent, no hidden partial folder beside it); and nothing earlier lost (an
output that was already there is unchanged). ``docs/bad-inputs.md`` is the same table for users; a test keeps the
two in step. Deeper checks of each kind (right values, recovery, resume) live in the tests named in that table.
"""

from __future__ import annotations

import errno
import io
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from PIL import Image

from histosynth.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
RNG = np.random.default_rng(0)


@dataclass
class Case:
    """``build(tmp, ctx)`` writes the inputs and returns the command's arguments; ``out`` (relative to tmp) must not
    exist afterwards, or, with ``earlier``, must still hold exactly what was there before."""

    id: str
    build: Callable[[Path, dict], list[str]]
    words: tuple[str, ...]
    out: str = "out"
    earlier: bool = False
    patch: Callable | None = None  # patch(monkeypatch): e.g. a disk that fills up
    code: int = 2
    extra: Callable[[Path], None] | None = field(default=None)  # more checks after the command


# ------------------------------------------------------------------------------------------------ inputs
def _hgsc():
    from histosynth.data.formats import read_nuclei
    from histosynth.quickstart import bundled_sample

    (region,) = read_nuclei("folder", bundled_sample(), magnification="20x")
    return region


def _folder(root: Path, image=None, inst=None, types=None, classes=("a", "b"), image_name="r.png",
            inst_bits: int = 16) -> Path:
    """A folder-format dataset of one region: r.png, r_inst.png, r_type.png, classes.txt."""
    root.mkdir(parents=True, exist_ok=True)
    if inst is None:
        inst = np.zeros((64, 64), np.int32)
        inst[10:20, 10:20], inst[30:40, 30:44] = 1, 2
    if types is None:
        types = np.where(inst > 0, 1, 0)
    image = RNG.integers(0, 256, inst.shape + (3,), dtype=np.uint8) if image is None else image
    if image_name.endswith(".jpg"):
        buf = io.BytesIO()
        Image.fromarray(image).save(buf, "JPEG")
        (root / image_name).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated
    else:
        Image.fromarray(image).save(root / image_name)
    if inst is not False:
        Image.fromarray(inst.astype(np.uint8 if inst_bits == 8 else np.uint16)).save(root / "r_inst.png")
    Image.fromarray(types.astype(np.uint8)).save(root / "r_type.png")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def _prepare(src: Path, tmp: Path, *more: str) -> list[str]:
    return ["prepare", "nuclei", "--format", "folder", str(src), "--out", str(tmp / "out"), "--patch", "32",
            "--source-magnification", "20x", *more]


def corrupt_image(tmp, ctx):
    return _prepare(_folder(tmp / "src", image_name="r.jpg"), tmp)


def size_mismatch(tmp, ctx):
    inst = np.zeros((64, 64), np.int32)
    inst[5:15, 5:15] = 1
    return _prepare(_folder(tmp / "src", inst=inst, types=np.zeros((60, 64), np.int32)), tmp)


def unknown_type_id(tmp, ctx):
    inst = np.zeros((64, 64), np.int32)
    inst[5:15, 5:15] = 1
    return _prepare(_folder(tmp / "src", inst=inst, types=np.where(inst > 0, 5, 0)), tmp)


def missing_label(tmp, ctx):
    image = RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    return _prepare(_folder(tmp / "src", image=image, inst=False, types=np.zeros((64, 64), np.int32)), tmp)


def empty_source(tmp, ctx):
    (tmp / "src").mkdir()
    (tmp / "src" / "classes.txt").write_text("a\n")
    return _prepare(tmp / "src", tmp)


def output_exists(tmp, ctx):
    (tmp / "out").mkdir()
    (tmp / "out" / "store.json").write_text("{}")  # an earlier store
    return _prepare(_folder(tmp / "src"), tmp)


def output_dangling_link(tmp, ctx):
    (tmp / "out").symlink_to(tmp / "gone")  # a link to a folder that is not there (an unmounted disk, say)
    return ["convert", "autoencoder", str(tmp / "model.ckpt"), "--out", str(tmp / "out")]


def _link_kept(tmp):
    assert (tmp / "out").is_symlink() and not (tmp / "gone").exists()


def wrapped_8bit_instances(tmp, ctx):
    hgsc = ctx["hgsc"]
    src = _folder(tmp / "src", hgsc.image, hgsc.inst_map % 256, hgsc.type_map,
                  classes=("connective", "inflammatory", "neoplastic"), inst_bits=8)
    return _prepare(src, tmp)


def pannuke_background_first(tmp, ctx):
    hgsc = ctx["hgsc"]
    inst, typ = hgsc.inst_map[600:856, 600:856], hgsc.type_map[600:856, 600:856]
    masks = np.zeros((1, 256, 256, 6))
    for t, c in {3: 0, 2: 1, 1: 2}.items():  # neoplastic, inflammatory, connective
        masks[0, ..., c] = np.where(typ == t, inst, 0)
    masks[0, ..., 5] = (masks[0, ..., :5] > 0).sum(-1) == 0
    fold = tmp / "pannuke" / "fold1"
    fold.mkdir(parents=True)
    np.save(fold / "images.npy", hgsc.image[None, :256, :256].astype(np.float64))
    np.save(fold / "masks.npy", np.concatenate([masks[..., 5:], masks[..., :5]], axis=-1))  # background first
    return ["prepare", "nuclei", "--format", "pannuke", str(tmp / "pannuke"), "--out", str(tmp / "out"),
            "--patch", "64", "--magnification", "40x"]


def stain_single_target(tmp, ctx):
    target = np.zeros((64, 64, 3), np.uint8)
    target[...] = (235, 150, 200)  # eosin only: no second stain to estimate
    target[::2, ::2] = (215, 120, 180)
    Image.fromarray(target).save(tmp / "target.png")
    return _prepare(_folder(tmp / "src", image=ctx["hgsc"].image[:64, :64].copy()), tmp, "--stain-normalize",
                    "macenko", "--stain-target", str(tmp / "target.png"))


def holdout_holds_nothing(tmp, ctx):
    return _prepare(_folder(tmp / "src", image=ctx["hgsc"].image[:96, :96].copy(),
                            inst=np.zeros((96, 96), np.int32), types=np.zeros((96, 96), np.int32)), tmp)


def slide_72dpi(tmp, ctx):
    import tifffile

    tifffile.imwrite(tmp / "region.tif", ctx["hgsc"].image[:512, :512], resolution=(72, 72), resolutionunit="INCH")
    return ["prepare", "slides", str(tmp / "region.tif"), "--out", str(tmp / "out"), "--patch", "128",
            "--magnification", "10x"]


def slide_ycbcr_under_rgb_tags(tmp, ctx):
    import tifffile

    canvas = np.full((512, 512, 3), 244, np.uint8)
    canvas[256:, 256:] = ctx["hgsc"].image[:256, :256]
    ycbcr = np.asarray(Image.fromarray(canvas).convert("YCbCr"))
    tifffile.imwrite(tmp / "slide.tif", ycbcr, tile=(256, 256), photometric="rgb", compression="zlib")
    return ["prepare", "slides", str(tmp / "slide.tif"), "--out", str(tmp / "out"), "--source-magnification", "20x"]


def fluorescence_ome(tmp, ctx):
    import tifffile

    tifffile.imwrite(tmp / "if.ome.tif", np.zeros((2, 512, 512), np.uint16), tile=(256, 256), photometric="minisblack",
                     ome=True, metadata={"axes": "CYX", "PhysicalSizeX": 0.5})
    return ["prepare", "slides", str(tmp / "if.ome.tif"), "--out", str(tmp / "out"), "--patch", "128"]


def plain_image_without_resolution(tmp, ctx):
    Image.fromarray(ctx["hgsc"].image[:512, :512]).save(tmp / "region.png")
    return ["prepare", "slides", str(tmp / "region.png"), "--out", str(tmp / "out"), "--patch", "128",
            "--magnification", "10x"]


def checkpoint_without_weights(tmp, ctx):
    import torch

    torch.save({"state_dict": {"optimizer.step": torch.zeros(1), "epoch": 3}}, tmp / "model.ckpt")
    return ["convert", "autoencoder", str(tmp / "model.ckpt"), "--out", str(tmp / "out")]


def _tiny_nasdm(tmp: Path, ctx: dict) -> Path:
    from histosynth.data.store import PatchStore
    from histosynth.diffusion.schedulers import ddpm_scheduler
    from histosynth.models import SemanticUNet
    from histosynth.pipelines.nasdm import NASDMPipeline
    from histosynth.recipes import load_recipe

    store = PatchStore(ctx["hgsc_store"])
    recipe = load_recipe("nasdm-tiny-cpu")
    unet = SemanticUNet(sample_size=store.patch_size, in_channels=3, cond_channels=len(store.class_names) + 1,
                        learn_sigma=True, block_out_channels=(16, 32), layers_per_block=1, attention_resolutions=(),
                        num_head_channels=8, norm_num_groups=8, spade_hidden=16)
    pipe = NASDMPipeline(unet=unet, scheduler=ddpm_scheduler(recipe.diffusion, variance_type="learned_range",
                                                             clip_sample=True),
                         class_names=list(store.class_names), magnification=store.magnification)
    pipe.save_pretrained(tmp / "pipe")
    return tmp / "pipe"


def sampler_steps_out_of_range(tmp, ctx):
    return ["sample", "--model", str(_tiny_nasdm(tmp, ctx)), "--masks", str(ctx["hgsc_store"]), "--num", "1",
            "--steps", "5000", "--out", str(tmp / "out")]


def sampler_steps_zero(tmp, ctx):
    return ["sample", "--model", str(_tiny_nasdm(tmp, ctx)), "--masks", str(ctx["hgsc_store"]), "--num", "1",
            "--steps", "0", "--out", str(tmp / "out")]


def recipe_typo(tmp, ctx):
    raw = yaml.safe_load((Path(__file__).resolve().parents[1] / "src/histosynth/recipes/nasdm-tiny-cpu.yaml").read_text())
    raw["train"]["learning_rte"] = 1e-4
    (tmp / "typo.yaml").write_text(yaml.safe_dump(raw))
    return ["train", "--recipe", str(tmp / "typo.yaml"), "--data", str(ctx["hgsc_store"]), "--out", str(tmp / "out")]


def nan_loss(tmp, ctx):
    recipe = {"name": "nan", "method": "segmenter", "train": {"steps": 3, "learning_rate": 1e30, "crop": 32,
                                                               "batch_size": 2, "checkpoint_every": 100},
              "model": {"imagenet_encoder": False}}
    (tmp / "nan.yaml").write_text(yaml.safe_dump(recipe))
    return ["train", "--recipe", str(tmp / "nan.yaml"), "--data", str(ctx["consep_store"]), "--out", str(tmp / "run")]


def disk_full(tmp, ctx):
    return _prepare(_folder(tmp / "src"), tmp, "--holdout", "0")


def _enospc(monkeypatch):
    def save(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "save", save)


def seg_crop(tmp, ctx):
    return ["seg", "train", "--data", str(ctx["consep_store"]), "--out", str(tmp / "out"), "--crop", "48"]


def sample_into_existing(tmp, ctx):
    (tmp / "out").mkdir()
    (tmp / "out" / "samples.jsonl").write_text('{"earlier": true}\n')
    return ["sample", "--model", str(_tiny_nasdm(tmp, ctx)), "--masks", str(ctx["hgsc_store"]), "--num", "1",
            "--steps", "2", "--out", str(tmp / "out")]


def no_segmenter_export_yet(tmp, ctx):
    (tmp / "run").mkdir()
    (tmp / "run" / "recipe.yaml").write_text("recipe: {method: segmenter}\n")  # killed before its first checkpoint
    return ["seg", "evaluate", "--model", str(tmp / "run"), "--data", str(ctx["consep_store"]), "--out",
            str(tmp / "out")]


def captions_unmatched(tmp, ctx):
    (tmp / "patches").mkdir()
    for name in ("a", "b"):
        Image.fromarray(ctx["hgsc"].image[:64, :64]).save(tmp / "patches" / f"{name}.png")
    (tmp / "captions.csv").write_text("id,caption\na,some tissue\nc,a patch that is not there\n")
    return ["prepare", "captioned", str(tmp / "patches"), "--captions", str(tmp / "captions.csv"), "--out",
            str(tmp / "out"), "--patch", "32"]


def unfinished_segmenter(tmp, ctx):
    from histosynth.evaluate.segmenter import train_segmenter

    train_segmenter(ctx["consep_store"], tmp / "run", max_steps=1, steps=3, batch_size=2, crop=32,
                    imagenet_encoder=False, checkpoint_every=1, progress=False)
    return ["seg", "evaluate", "--model", str(tmp / "run"), "--data", str(ctx["consep_store"]), "--out",
            str(tmp / "out")]


def _no_export(tmp: Path) -> None:
    assert not (tmp / "run" / "segmenter").exists()


CASES = [
    Case("corrupt-image", corrupt_image, ("r.jpg", "truncated")),
    Case("size-mismatch", size_mismatch, ("r.png", "r_type.png", "64x64", "60x64")),
    Case("unknown-type-id", unknown_type_id, ("r_type.png", "type id 5", "1=a, 2=b")),
    Case("missing-label", missing_label, ("r_inst.png", "label file missing", "r.png")),
    Case("empty-source", empty_source, ("src", "no images")),
    Case("output-exists", output_exists, ("out", "--overwrite"), earlier=True),
    Case("output-dangling-link", output_dangling_link, ("out", "already exists", "--overwrite"), earlier=True,
         extra=_link_kept),
    Case("wrapped-8bit-instances", wrapped_8bit_instances, ("r_inst.png", "disconnected", "--relabel-components")),
    Case("pannuke-background-first", pannuke_background_first, ("masks.npy", "channel 0 looks like the background")),
    Case("stain-single-target", stain_single_target, ("target.png", "single stain")),
    Case("holdout-holds-nothing", holdout_holds_nothing, ("r.png", "--holdout 0")),
    Case("slide-72dpi", slide_72dpi, ("region.tif", "72 dpi", "cannot come from a microscope", "--source-magnification",
                                     "--mpp")),
    Case("slide-ycbcr-under-rgb-tags", slide_ycbcr_under_rgb_tags, ("slide.tif", "look like YCbCr stored as RGB")),
    Case("fluorescence-ome", fluorescence_ome, ("if.ome.tif", "expected 8-bit RGB")),
    Case("plain-image-without-resolution", plain_image_without_resolution, ("region.png", "no resolution metadata",
                                                                           "--mpp")),
    Case("checkpoint-without-weights", checkpoint_without_weights, ("model.ckpt", "no first-stage autoencoder weights", "keys start with")),
    Case("sampler-steps-out-of-range", sampler_steps_out_of_range, ("--steps", "5000")),
    Case("sampler-steps-zero", sampler_steps_zero, ("--steps must be within 1..1000", "got 0")),
    Case("sample-into-existing", sample_into_existing, ("out", "--overwrite"), earlier=True),
    Case("recipe-typo", recipe_typo, ("typo.yaml", "train.learning_rte")),
    Case("nan-loss", nan_loss, ("run", "loss is nan", "last good checkpoint"), out="run/segmenter", extra=_no_export),
    Case("disk-full", disk_full, ("out", "no space left", "needs at least", "free"), patch=_enospc),
    Case("seg-train-crop", seg_crop, ("--crop", "multiple of 32")),
    Case("run-without-export", no_segmenter_export_yet, ("run", "--resume")),
    Case("segmenter-unfinished", unfinished_segmenter, ("run", "exported at step 1 of 3", "seg train --resume")),
    Case("captions-unmatched", captions_unmatched, ("captions.csv", "1 rows name no image", "'c'",
                                                    "1 images have no caption", "'b.png'", "--skip-unmatched")),
]


@pytest.fixture(scope="module")
def ctx(hgsc_store, tmp_path_factory) -> dict:
    from histosynth.data.prepare_labelled import prepare_nuclei

    hgsc = _hgsc()
    consep = tmp_path_factory.mktemp("matrix") / "labelled"
    src = _folder(tmp_path_factory.mktemp("matrix") / "src", image=hgsc.image[:256, :256].copy(),
                  inst=hgsc.inst_map[:256, :256], types=hgsc.type_map[:256, :256],
                  classes=("connective", "inflammatory", "neoplastic"))
    prepare_nuclei(__import__("histosynth.data.formats", fromlist=["read_nuclei"]).read_nuclei(
        "folder", src, magnification="20x"), consep, patch=64, overlap=0.0, magnification="20x", holdout=0.0,
        progress=False)
    return {"hgsc": hgsc, "hgsc_store": hgsc_store, "consep_store": consep}


def _python_keyword(message: str) -> str | None:
    """A Python keyword argument a CLI user cannot type (``source_magnification=``, ``num_inference_steps (--steps)``),
    or None."""
    found = re.search(r"\b[a-z]+_[a-z_]+(=| \(--)", message)
    return found.group(0) if found else None


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, ctx, tmp_path, monkeypatch):
    argv = case.build(tmp_path, ctx)
    out = tmp_path / case.out
    before = sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file()) if case.earlier else None
    if case.patch is not None:
        case.patch(monkeypatch)
    result = CliRunner().invoke(main, argv)
    message = result.stderr  # click >= 8.2 keeps stderr apart: the one line must be there
    assert result.exit_code == case.code, f"{argv}\n{result.output}"
    lines = [line for line in message.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in message, message
    for word in case.words:
        assert word in lines[0], f"{word!r} not in: {lines[0]}"
    assert _python_keyword(lines[0]) is None, lines[0]
    if case.earlier:  # nothing earlier lost
        assert sorted((p.relative_to(out), p.read_bytes()) for p in out.rglob("*") if p.is_file()) == before
    else:  # nothing complete-looking left
        assert not out.exists(), sorted(out.rglob("*"))
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(".") and out.name in p.name]
    assert not leftovers, leftovers
    if case.extra is not None:
        case.extra(tmp_path)


def test_the_docs_table_lists_every_case():
    rows = [line for line in DOC.read_text().splitlines() if line.startswith("| `")]
    documented = {line.split("`")[1] for line in rows}
    assert documented == {c.id for c in CASES}


KILL_IN_CHECKPOINT = """
import os, signal, sys
from histosynth.training import engine

real = engine.save_file


def save_then_die(tensors, path, *args, **kwargs):  # the kill lands inside checkpoint 4, after its EMA file
    real(tensors, path, *args, **kwargs)
    if ".tmp-step-0000004" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)


engine.save_file = save_then_die
from histosynth.cli import main

main(sys.argv[1:])
"""


def test_sigkill_during_a_checkpoint_then_resume(hgsc_store, tmp_path):
    """SIGKILL inside a checkpoint's write leaves its hidden temporary folder and no step-4 checkpoint; `train --resume`
    removes the leftover, continues from step 2 and logs what an uninterrupted run logs."""
    import json
    import os
    import signal
    import subprocess
    import sys

    from conftest import micro_recipe

    from histosynth.diffusion import checkpoint as ckpt

    recipe = tmp_path / "micro.yaml"
    recipe.write_text(yaml.safe_dump(json.loads(json.dumps(micro_recipe().to_dict()))))
    args = ["train", "--recipe", str(recipe), "--data", str(hgsc_store)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


    def train(*more: str, script: tuple[str, ...] = ("-m", "histosynth.cli")):  # every run alike: own process, 1 thread
        return subprocess.run([sys.executable, *script, *args, *more], env=env, capture_output=True, timeout=300)

    ref = train("--out", str(tmp_path / "ref"), "--max-steps", "6")
    assert ref.returncode == 0, ref.stderr.decode()[-2000:]
    run = tmp_path / "run"
    killed = train("--out", str(run), "--max-steps", "6", script=("-c", KILL_IN_CHECKPOINT))
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    assert ckpt.temporary_dir(ckpt.checkpoint_dir(run, 4)).is_dir() and ckpt.latest_checkpoint(run).name.endswith("2")
    resumed = train("--out", str(run), "--resume", "--max-steps", "6")
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert not list((run / ckpt.CHECKPOINTS).glob(".tmp-*"))
    rows = [json.loads(r) for r in (run / "losses.jsonl").read_text().splitlines()]
    assert rows == [json.loads(r) for r in (tmp_path / "ref" / "losses.jsonl").read_text().splitlines()]
