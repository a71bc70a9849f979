"""DISC: region data (the region folder, regions from nuclei density, the region store and its errors), the mask
encoder, separated-condition sampling (eq. 2) against independent computations, the training task (SD, L_DISC and
CoTrain against hand-written losses, exact resume, the resumable distillation set), and `histosynth sample --regions`.

Real tissue: the bundled HGSC region (nuclei labels → `prepare regions --format nuclei-density`, 32 px patches at 5x).
Models are tiny; the checks are on behaviour.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from diffusers import VQModel
from PIL import Image

from histosynth.data.record import NucleiRecord
from histosynth.errors import DataError, HistosynthError
from histosynth.recipes import recipe_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_UNET = {"block_out_channels": [16, 32], "layers_per_block": 1, "attention_head_dim": [2, 2],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "norm_num_groups": 8, "cross_attention_dim": 16}


# ------------------------------------------------------------------------------------------- fusion (eq. 2)
def test_fusion_and_mask_downsampling_match_a_hand_computation():
    from histosynth.pipelines.disc import downsample_masks, fuse_latents, separated_branches

    mask = torch.tensor([[0, 0, 0, 0, 2, 2, 2, 2]] * 4 + [[1, 1, 1, 1, 1, 1, 2, 2]] * 4)[None]  # (1, 8, 8)
    small = downsample_masks(mask, 2)  # pixel centres 2 and 6 of each axis
    assert small.tolist() == [[[0, 2], [1, 2]]]
    two = torch.stack([mask[0], torch.zeros(8, 8, dtype=torch.long)])  # a second image, label 0 only
    images, labels = separated_branches(two)
    assert images.tolist() == [0, 0, 0, 1] and labels.tolist() == [0, 1, 2, 0]  # present labels only
    z = torch.arange(4 * 1 * 2 * 2, dtype=torch.float32).reshape(4, 1, 2, 2) + 1  # branch r holds 4r+1..4r+4
    fused = fuse_latents(z, images, labels, downsample_masks(two, 2))
    # image 0: top-left from branch 0 (label 0), bottom-left from branch 1 (label 1), right column from branch 2
    assert fused[0, 0].tolist() == [[z[0, 0, 0, 0].item(), z[2, 0, 0, 1].item()],
                                    [z[1, 0, 1, 0].item(), z[2, 0, 1, 1].item()]]
    assert torch.equal(fused[1], z[3])  # a uniform mask: its one branch whole


def _vae():
    torch.manual_seed(0)
    return VQModel(block_out_channels=(8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 3,
                   up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, latent_channels=3,
                   num_vq_embeddings=64, norm_num_groups=4, scaling_factor=1.0, sample_size=32)


def _tiny_pipeline(injection="cross-attention", steps=3):
    from diffusers import UNet2DConditionModel

    from histosynth.diffusion.schedulers import ldm_ddim_scheduler
    from histosynth.models.region_mask_encoder import RegionMaskEncoder
    from histosynth.pipelines.disc import DISCPipeline

    vae = _vae()
    u = TINY_UNET
    extra = 3 if injection == "cross-attention+concat" else 0
    unet = UNet2DConditionModel(sample_size=8, in_channels=3 + extra, out_channels=3,
                                block_out_channels=u["block_out_channels"], layers_per_block=1,
                                attention_head_dim=u["attention_head_dim"], cross_attention_dim=16,
                                down_block_types=u["down_block_types"], up_block_types=u["up_block_types"],
                                norm_num_groups=8)
    encoder = RegionMaskEncoder(num_labels=3, mask_size=32, token_grid=2, channels=(8, 16), token_dim=16,
                                label_names=("background", "epithelial", "stroma"))
    pipe = DISCPipeline(unet=unet, vae=vae, mask_encoder=encoder.eval(),
                        scheduler=ldm_ddim_scheduler(1000, "scaled_linear", 0.0015, 0.0195), patch_size=32,
                        injection=injection, sampling={"num_inference_steps": steps, "guidance_scale": 1.75,
                                                       "eta": 0.0, "separated": "none"})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _two_region_mask() -> np.ndarray:
    mask = np.zeros((32, 32), np.int64)
    mask[:, 16:] = 2  # background left, stroma right; label 1 absent
    return mask


@pytest.mark.parametrize("injection", ["cross-attention", "cross-attention+concat"])
def test_separated_conditions_equal_each_label_sampled_alone_then_fused(injection):
    """SD-SC "final" = SD on each present label's uniform mask from the same noise, fused by eq. 2 — computed here
    from three independent SD calls; only present labels run (UNet batch sizes counted)."""
    from histosynth.pipelines.disc import downsample_masks

    pipe = _tiny_pipeline(injection)
    mask = _two_region_mask()
    batches = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: batches.append(args[0].shape[0]))
    sc = pipe(mask[None], separated="final", generator=torch.Generator().manual_seed(7))
    hook.remove()
    assert batches == [4] * 3 and sc.unet_passes == [12]  # 2 present labels × [∅; c], 3 steps
    alone = {k: pipe(np.full((1, 32, 32), k), separated="none", generator=torch.Generator().manual_seed(7)).latents
             for k in (0, 2)}
    small = downsample_masks(torch.from_numpy(mask)[None], 8)[0].numpy()
    expected = np.where(small == 0, alone[0][0], alone[2][0])
    assert np.allclose(sc.latents[0], expected, rtol=1e-4, atol=1e-4)
    assert sc.images.shape == (1, 32, 32, 3) and sc.images.dtype == np.uint8
    # a uniform mask: every mode is SD
    uniform = np.full((1, 32, 32), 1)
    runs = [pipe(uniform, separated=s, generator=torch.Generator().manual_seed(3)).latents
            for s in ("none", "final", "every-step")]
    assert np.allclose(runs[0], runs[1], rtol=1e-4, atol=1e-4) and np.allclose(runs[0], runs[2], rtol=1e-4, atol=1e-4)
    every = pipe(mask[None], separated="every-step", generator=torch.Generator().manual_seed(7))
    assert not np.allclose(every.latents, sc.latents, atol=1e-3)  # fusing along the way changes the result


def test_pipeline_save_load_and_mask_errors(tmp_path):
    from histosynth.pipelines.disc import DISCPipeline

    pipe = _tiny_pipeline("cross-attention+concat")
    pipe.save_pretrained(tmp_path / "p")
    again = DISCPipeline.from_pretrained(tmp_path / "p")
    again.set_progress_bar_config(disable=True)
    mask = _two_region_mask()[None]
    a = pipe(mask, separated="final", generator=torch.Generator().manual_seed(1))
    b = again(mask, separated="final", generator=torch.Generator().manual_seed(1))
    assert np.array_equal(a.images, b.images) and again.label_names == ["background", "epithelial", "stroma"]
    assert again.config.injection == "cross-attention+concat"
    # output_type="latent" (the distillation set's): the same latents, not decoded
    c = again(mask, separated="final", generator=torch.Generator().manual_seed(1), output_type="latent")
    assert c.images is None and np.array_equal(c.latents, b.latents)
    with pytest.raises(HistosynthError, match="output_type must be 'np' or 'latent', got 'pil'"):
        pipe(mask, output_type="pil")
    with pytest.raises(HistosynthError, match=r"mask labels 0\.\.3 outside this model's 0\.\.2 \(background, "):
        pipe(np.full((1, 32, 32), 3) * (np.arange(32) % 2))
    with pytest.raises(HistosynthError, match=r"masks must be \(B, 32, 32\)"):
        pipe(np.zeros((1, 16, 16), np.int64))
    with pytest.raises(HistosynthError, match="separated must be one of"):
        pipe(mask, separated="always")
    with pytest.raises(HistosynthError, match="integer region labels, got torch.float"):
        pipe(mask.astype(np.float32))


@pytest.mark.parametrize("injection", ["cross-attention", "cross-attention+concat"])
def test_guidance_zero_is_the_null_condition_alone(injection):
    """g = 0 leaves ε(∅) only: the tiles no longer depend on the mask (checks the [∅; c] order of tokens and concat);
    g = 1 (conditional only) does depend on it."""
    pipe = _tiny_pipeline(injection)
    with torch.no_grad():
        pipe.mask_encoder.position.normal_()  # make the conditional tokens clearly differ from the null ones
    a, b = (pipe(np.full((1, 32, 32), k), guidance_scale=g, generator=torch.Generator().manual_seed(4)).latents
            for k in (0, 2) for g in (0.0,))
    assert np.allclose(a, b, atol=1e-6)
    c, d = (pipe(np.full((1, 32, 32), k), guidance_scale=1.0, generator=torch.Generator().manual_seed(4)).latents
            for k in (0, 2))
    assert not np.allclose(c, d, atol=1e-3)


# ------------------------------------------------------------------------------------------------ region data
def _write_region_folder(root: Path, masks: dict[str, np.ndarray], size=(64, 64), classes=("non-cancer", "GG3", "GG4")):
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    rng = np.random.default_rng(0)
    for name, mask in masks.items():
        Image.fromarray(rng.integers(0, 255, size + (3,), dtype=np.uint8)).save(root / "images" / f"{name}.png")
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{name}.png")
    return root


def test_region_folder_to_store_keeps_masks_aligned_with_their_images(tmp_path):
    from histosynth.cli import main
    from histosynth.data.store import PatchStore

    mask = np.zeros((64, 64), np.uint8)
    mask[:, 32:] = 2
    mask[48:, :16] = 1
    src = _write_region_folder(tmp_path / "src", {"a": mask, "b": np.full((64, 64), 1, np.uint8)})
    r = CliRunner().invoke(main, ["prepare", "regions", str(src), "--format", "folder", "--source-magnification", "40x",
                                  "--magnification", "20x", "--patch", "16", "--overlap", "0", "--holdout", "0",
                                  "--out", str(tmp_path / "store")])
    assert r.exit_code == 0, r.output
    store = PatchStore(tmp_path / "store")
    assert store.has_regions and not store.has_labels and store.class_names == ("non-cancer", "GG3", "GG4")
    assert len(store) == 2 * 2 * 2  # 64 px at 40x: 32 px crops, 2 x 2 per image
    for i in range(len(store)):
        item = store[i]
        y, x = item["y"], item["x"]
        assert item["crop"] == 32
        source = mask if item["source"].endswith("a.png") else np.full((64, 64), 1)
        centres = np.arange(16) * 2 + 1  # 32 px crop → 16 px: nearest at output pixel centres
        assert np.array_equal(item["region_map"], source[y + centres][:, x + centres]), i
        counts = np.bincount(item["region_map"].ravel(), minlength=3) / 256
        assert item["regions"] == {n: round(float(c), 4) for n, c in zip(store.class_names, counts)}


@pytest.mark.parametrize("case, message", [
    ("label", r"masks/a\.png: mask values \[3, 7\] outside the label set 0\.\.2 \(non-cancer, GG3, GG4\)"),
    ("size", r"masks/a\.png: mask is 32x32 px, its image 64x64 px \(1/2 of it: a mask at another magnification"),
    ("empty", r"src: no images in the region folder"),
    ("classes", r"classes\.txt: no classes\.txt"),
    ("no labels", r"classes\.txt: no region labels in it"),
    ("repeated", r"classes\.txt: repeated region labels \['GG3'\]"),
])
def test_bad_region_input_is_one_line_naming_the_file(tmp_path, case, message):
    from histosynth.cli import main

    good = np.zeros((64, 64), np.uint8)
    masks = {"label": {"a": np.where(np.eye(64, dtype=bool), 7, 3 * (np.arange(64) % 2 == 0)).astype(np.uint8)},
             "size": {"a": np.zeros((32, 32), np.uint8)}, "empty": {}, "classes": {"a": good}, "no labels": {"a": good},
             "repeated": {"a": good}}[case]
    src = _write_region_folder(tmp_path / "src", masks)
    if case == "classes":
        (src / "classes.txt").unlink()
    elif case in ("no labels", "repeated"):
        (src / "classes.txt").write_text({"no labels": "\n  \n", "repeated": "non-cancer\nGG3\nGG3\n"}[case])
    r = CliRunner().invoke(main, ["prepare", "regions", str(src), "--format", "folder", "--source-magnification", "20x",
                                  "--patch", "16", "--out", str(tmp_path / "store")])
    assert r.exit_code == 2 and len(r.output.strip().splitlines()) == 1, r.output
    import re

    assert re.search(message, r.output), r.output
    assert not (tmp_path / "store").exists()


def test_density_regions_label_each_neighbourhood_by_its_dominant_nucleus_group():
    from histosynth.data.regions import density_regions, parse_region_map, region_labels

    type_map = np.zeros((80, 80), np.int32)
    type_map[10:70:6, 2:30:6] = 1  # epithelial dots on the left
    type_map[10:70:6, 50:78:6] = 2  # spindle-shaped dots on the right
    type_map = np.maximum(type_map, np.roll(type_map, 1, 0))  # 2-px nuclei
    record = NucleiRecord(image=np.zeros((80, 80, 3), np.uint8), inst_map=(type_map > 0).astype(np.int32),
                          type_map=type_map, class_names=("epithelial", "spindle-shaped"), source="hand",
                          magnification="40x")
    mapping = parse_region_map("epithelial=epithelial,spindle-shaped=stroma")
    labels = region_labels(mapping)
    assert labels == ("background", "epithelial", "stroma")
    regions = density_regions(record, mapping, labels, sigma_um=1.0, min_fraction=0.05)  # σ = 4 px at 40x
    assert regions.region_map[40, 15] == 1 and regions.region_map[40, 64] == 2 and regions.region_map[40, 40] == 0
    assert regions.region_map[0:3, 40].max() == 0  # far from every nucleus: background
    with pytest.raises(DataError, match=r"hand: nucleus classes \['spindle-shaped'\] have no region in --region-map"):
        density_regions(record, {"epithelial": "epithelial"}, ("background", "epithelial"))


# ---------------------------------------------------------------------------------------------- training
@pytest.fixture(scope="module")
def region_store(tmp_path_factory) -> Path:
    from histosynth.cli import main
    from histosynth.quickstart import bundled_sample

    out = tmp_path_factory.mktemp("disc") / "store"
    r = CliRunner().invoke(main, ["prepare", "regions", str(bundled_sample()), "--format", "nuclei-density",
                                  "--nuclei-format", "folder", "--source-magnification", "20x", "--patch", "32",
                                  "--magnification", "5x", "--overlap", "0", "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "region labels background" in r.output and "epithelial" in r.output
    return out


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ae") / "vq"
    _vae().save_pretrained(out)
    return out


def disc_recipe(autoencoder, injection="cross-attention", **extra):
    t = {"steps": 4, "learning_rate": 1e-3, "lr_warmup_steps": 2, "batch_size": 4, "checkpoint_every": 2,
         "keep_checkpoints": 10, "log_every": 1, "num_workers": 0, "ema_decay": 0.9, "seed": 5, "condition_dropout": 0.3}
    t.update(extra.pop("train", {}))
    d = {"name": "disc-test", "method": "disc", "patch_size": 32,
         "autoencoder": None if autoencoder is None else {"path": str(autoencoder)}, "unet": TINY_UNET,
         "mask_encoder": {"token_grid": 2, "channels": [8, 16], "injection": injection}, "train": t,
         "sampling": {"num_inference_steps": 3, "guidance_scale": 1.75}}
    d.update(extra)
    return recipe_from_dict(d)


def _losses(run: Path) -> list[dict]:
    return [json.loads(r) for r in (run / "losses.jsonl").read_text().splitlines() if r]


@pytest.fixture(scope="module")
def sd_run(region_store, vq_dir, tmp_path_factory) -> Path:
    from histosynth.training import fit
    from histosynth.training.disc import DISCTask

    run = tmp_path_factory.mktemp("runs") / "sd"
    fit(DISCTask(disc_recipe(vq_dir, "cross-attention+concat"), region_store, progress=False), run, progress=False)
    return run


def test_sd_resumes_exactly_and_trains_the_mask_encoder(region_store, vq_dir, sd_run, tmp_path):
    from histosynth.pipelines.disc import DISCPipeline
    from histosynth.training import fit
    from histosynth.training.disc import DISCTask

    recipe = disc_recipe(vq_dir, "cross-attention+concat")
    fit(DISCTask(recipe, region_store, progress=False), tmp_path / "run", max_steps=2, progress=False)
    fit(DISCTask(recipe, region_store, progress=False), tmp_path / "run", resume=True, progress=False)
    assert [r["loss"] for r in _losses(tmp_path / "run")] == [r["loss"] for r in _losses(sd_run)]
    pipe = DISCPipeline.from_pretrained(sd_run)
    assert pipe.label_names == ["background", "epithelial", "stroma", "inflammatory"]
    # τθ is trained with the UNet: the exported encoder differs from the initial one (same seed as the engine's)
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    task = DISCTask(recipe, region_store, progress=False)
    task.setup(Accelerator(cpu=True), tmp_path / "init", resuming=False)
    set_seed(recipe.train.seed)
    initial = task.build_model(None, tmp_path / "init", resuming=False).mask_encoder
    for name, value in initial.state_dict().items():
        assert value.shape == pipe.mask_encoder.state_dict()[name].shape
    assert not torch.allclose(initial.null_tokens, pipe.mask_encoder.null_tokens)
    assert not torch.allclose(initial.stem.weight, pipe.mask_encoder.stem.weight)


def test_training_masks_are_flipped_with_their_latents(region_store, vq_dir):
    """The flip drawn for a patch applies to its cached latent and to its mask alike."""
    from histosynth.diffusion import latent_cache as cache
    from histosynth.training.disc import DISCTask, flip_masks

    task = DISCTask(disc_recipe(vq_dir), region_store, progress=False)
    store = task.store
    mask = store[task.indices[0]]["region_map"]
    for k in range(4):
        flipped = cache.flip(torch.from_numpy(mask)[None, None].float(), [k])[0, 0].long().numpy()
        assert np.array_equal(flip_masks(mask, k), flipped)


def _hand_eps_loss(model, task, z, masks, g):
    """‖ε − ε_θ(√ᾱ_t z0 + √(1−ᾱ_t) ε, t, τθ(m))‖², written out from the scheduler's ᾱ (not add_noise)."""
    b = len(z)
    drop = torch.rand(b, generator=g) < task.recipe.train.condition_dropout
    t = torch.randint(0, 1000, (b,), generator=g)
    eps = torch.randn(z.shape, generator=g)
    abar = task.noise_scheduler.alphas_cumprod[t].float()[:, None, None, None]
    zt = abar.sqrt() * z + (1 - abar).sqrt() * eps
    return ((model(zt, t, masks, drop) - eps) ** 2).mean()


@pytest.mark.parametrize("cotrain", [False, True])
def test_distillation_losses_and_the_resumable_sc_set(region_store, sd_run, tmp_path, cotrain):
    """L_DISC (eq. 3) on the fused latents, and CoTrain's mean with L_LDM on real patches, equal hand-written
    losses; the set is the teacher's SC output, and a killed generation resumes to the same set."""
    from histosynth.pipelines.disc import DISCPipeline
    from histosynth.training import fit
    from histosynth.training.disc import DISTILL, DISCTask, DistillSet

    recipe = disc_recipe(None, distill={"teacher": str(sd_run), "num_samples": 5, "batch_size": 2,
                                        "num_inference_steps": 3, "cotrain": cotrain, "seed": 2})
    run = tmp_path / "distill"
    fit(DISCTask(recipe, region_store, progress=False), run, progress=False)
    rows = _losses(run)
    assert len(rows) == 4 and all("l_disc" in r for r in rows) and (("l_ldm" in rows[0]) == cotrain)
    # the fine-tune resumes exactly: stopped at its step-2 checkpoint and resumed, it logs the straight run's losses
    # (L_DISC and, for CoTrain, L_LDM) and exports the same weights
    split = tmp_path / "split"
    fit(DISCTask(recipe, region_store, progress=False), split, max_steps=2, progress=False)
    assert len(_losses(split)) == 2
    fit(DISCTask(recipe, region_store, progress=False), split, resume=True, progress=False)
    assert _losses(split) == rows
    straight, resumed_pipe = DISCPipeline.from_pretrained(run), DISCPipeline.from_pretrained(split)
    for part in ("unet", "mask_encoder"):  # both are fine-tuned
        resumed_state = getattr(resumed_pipe, part).state_dict()
        for name, value in getattr(straight, part).state_dict().items():
            assert torch.equal(value, resumed_state[name]), (part, name)
    latents, masks = DistillSet(run / DISTILL).open()
    assert latents.shape == (5, 3, 8, 8) and masks.shape == (5, 32, 32)
    # the set is the teacher's SC output for those masks and seeds
    task = DISCTask(recipe, region_store, progress=False)
    picks, flips, seeds = task.distill_draws()
    want_masks = task.distill_masks(picks, flips)
    assert np.array_equal(masks, want_masks)
    teacher = DISCPipeline.from_pretrained(sd_run)
    teacher.set_progress_bar_config(disable=True)
    again = teacher(want_masks[3:4], num_inference_steps=3, separated="final",
                    generator=[torch.Generator().manual_seed(seeds[3])]).latents
    assert np.allclose(latents[3], again[0], atol=1e-5)
    # a generation killed after its first batch resumes to the same set
    state = json.loads((run / DISTILL / "progress.json").read_text())
    first = np.array(latents)
    state["done"] = 2
    (run / DISTILL / "progress.json").write_text(json.dumps(state))
    arr = np.load(run / DISTILL / "latents.npy", mmap_mode="r+")
    arr[2:] = 0
    arr.flush()
    del arr
    resumed = DISCTask(recipe, region_store, progress=False)
    picks, flips, seeds = resumed.distill_draws()
    made = []
    from histosynth.diffusion.schedulers import use_scheduler

    use_scheduler(teacher, "dpm-solver++")  # a teacher whose recipe chose another scheduler: the set is DDIM's still
    DistillSet(run / DISTILL).generate(teacher, lambda chunk: made.append(chunk) or resumed.distill_masks(
        picks[chunk], flips[chunk]), 5, seeds, state["settings"], progress=False)
    assert [(c.start, c.stop) for c in made] == [(2, 4), (4, 5)]  # only the unfinished batches
    assert np.allclose(DistillSet(run / DISTILL).open()[0], first, atol=1e-5)
    # the losses against hand-written ones, from the same generator state
    from accelerate import Accelerator

    task.setup(Accelerator(cpu=True), run, resuming=True)
    model = task.build_model(None, run, resuming=True)
    batch = {"position": torch.tensor([0, 3])}
    loss, terms, n = task.micro_loss(model, batch, torch.Generator().manual_seed(11), 0)
    g = torch.Generator().manual_seed(11)
    z = torch.from_numpy(np.array(latents[[0, 3]]))
    m = torch.from_numpy(np.array(masks[[0, 3]]).astype(np.int64))
    with torch.no_grad():
        l_disc = _hand_eps_loss(model, task, z, m, g)
        expected = l_disc
        if cotrain:
            real = torch.randint(0, len(task.indices), (2,), generator=g).tolist()
            k = torch.randint(0, 4, (2,), generator=g)
            z_real = torch.from_numpy(np.stack([task.stats[p, int(kk)] for p, kk in zip(real, k)])) * task.scaling
            m_real = torch.from_numpy(np.stack([np.ascontiguousarray(np.flip(task.store[task.indices[p]]["region_map"],
                                                axis=tuple(a for a, bit in ((1, 1), (0, 2)) if int(kk) & bit)))
                                                for p, kk in zip(real, k)])).long()
            expected = 0.5 * (l_disc + _hand_eps_loss(model, task, z_real, m_real, g))
    assert n == 2 and abs(float(loss.detach()) - float(expected)) < 1e-5 and abs(terms["l_disc"] - float(l_disc)) < 1e-5


# ------------------------------------------------------------------------------------------------------ CLI
def test_sample_cli_writes_tiles_with_their_masks_as_a_region_folder(region_store, sd_run, tmp_path):
    from histosynth.cli import main
    from histosynth.data.regions import read_region_folder
    from histosynth.data.store import PatchStore

    out = tmp_path / "samples"
    r = CliRunner().invoke(main, ["sample", "--model", str(sd_run), "--regions", str(region_store), "--num", "3",
                                  "--separated", "final", "--steps", "2", "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "samples.jsonl").read_text().splitlines()]
    store = PatchStore(region_store)
    for row in rows:
        mask = np.asarray(Image.open(out / row["mask"]))
        assert np.array_equal(mask, store[row["index"]]["region_map"])
        small = mask[2::4, 2::4]  # the latent's mask: pixel centres of 4 x 4 blocks
        assert row["separated"] == "final" and row["unet_passes"] == 2 * 2 * len(np.unique(small))
    assert (out / "grid.png").is_file()
    again = list(read_region_folder(out, source_magnification="5x"))  # the output is a region folder
    assert len(again) == 3 and again[0].class_names == store.class_names
    r = CliRunner().invoke(main, ["sample", "--model", str(sd_run), "--masks", str(region_store), "--out",
                                  str(tmp_path / "x")])
    assert r.exit_code == 2 and "--regions STORE" in r.output


def test_tile_sets_cli_and_sampling_them_gives_mil_bags_of_tiles(region_store, sd_run, tmp_path):
    """`prepare tile-sets` (Sec. 2.2) → `sample --regions SETS`: every tile generated on its mask, sets.jsonl names
    each tile's image; a non-cancer primary set is all label 0."""
    from histosynth.cli import main

    sets = tmp_path / "sets"
    r = CliRunner().invoke(main, ["prepare", "tile-sets", str(region_store), "--pairs",
                                  "epithelial+stroma,background+background", "--sets", "17", "--size", "1-2",
                                  "--seed", "1", "--out", str(sets)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "tiles"
    r = CliRunner().invoke(main, ["sample", "--model", str(sd_run), "--regions", str(sets), "--steps", "2",
                                  "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rows = [json.loads(x) for x in (out / "sets.jsonl").read_text().splitlines()]
    assert len(rows) == 17  # every set (more than the 16 masks drawn from a store by default)
    assert [row["primary"] for row in rows] == ["epithelial", "background"] * 8 + ["epithelial"]
    assert all(1 <= row["size"] <= 2 for row in rows)
    for row in rows:
        for tile in row["tiles"]:
            mask = np.asarray(Image.open(out / tile["mask"]))
            assert (out / tile["image"]).is_file() and mask.shape == (32, 32)
            if row["primary"] == "background":
                assert mask.max() == 0
    assert sum(len(row["tiles"]) for row in rows) == len((out / "samples.jsonl").read_text().splitlines())
    r = CliRunner().invoke(main, ["prepare", "tile-sets", str(region_store), "--pairs", "GG9+GG3", "--out",
                                  str(tmp_path / "bad")])
    assert r.exit_code == 2 and "GG9" in r.output, r.output


def test_distillation_teacher_is_checked_against_the_store_and_the_recipe(region_store, sd_run, tmp_path):
    """A teacher of another schedule, or a set made by another teacher's weights, is refused naming the teacher."""
    from histosynth.pipelines.disc import DISCPipeline
    from histosynth.training.disc import DISCTask, DistillSet, teacher_identity

    distill = {"teacher": str(sd_run), "num_samples": 2, "batch_size": 2, "num_inference_steps": 2}
    with pytest.raises(HistosynthError, match=r"diffusion .* differs from distill.teacher's schedule"):
        DISCTask(disc_recipe(None, distill=distill, diffusion={"beta_end": 0.012}), region_store, progress=False)
    task = DISCTask(disc_recipe(None, distill=distill), region_store, progress=False)
    assert task.teacher_id == teacher_identity(sd_run) and len(task.teacher_id) == 16
    teacher = DISCPipeline.from_pretrained(sd_run)
    teacher.set_progress_bar_config(disable=True)
    picks, flips, seeds = task.distill_draws()
    settings = {"teacher_weights": "a", "num_inference_steps": 2, "guidance_scale": 1.75, "separated": "final",
                "batch_size": 1}
    DistillSet(tmp_path / "d").generate(teacher, lambda c: task.distill_masks(picks[c], flips[c]), 1, seeds, settings,
                                        progress=False)
    with pytest.raises(HistosynthError, match="made with other settings"):
        DistillSet(tmp_path / "d").generate(teacher, lambda c: task.distill_masks(picks[c], flips[c]), 1, seeds,
                                            {**settings, "teacher_weights": "b"}, progress=False)
