"""Shared fixtures: real tissue (the bundled HGSC region, and ../shared/data when present) and tiny recipes."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED / "data"


def micro_recipe(stages: list[dict] | None = None, **stage_overrides):
    """A NASDM recipe small enough for a CPU test: 32 px, a 2-level UNet without attention (``stages``: other
    stages than its 4 + 4 steps of train and finetune; ``stage_overrides``: its ``train:`` fields)."""
    from histosynth.recipes import recipe_from_dict

    raw = {
        "name": "nasdm-micro-test", "method": "nasdm", "description": "tests", "patch_size": 32, "magnification": "10x",
        "model": {"block_out_channels": [16, 32], "layers_per_block": 1, "attention_resolutions": [8],
                  "num_head_channels": 16, "dropout": 0.0, "norm_num_groups": 8, "spade_hidden": 16},
        "stages": [{"name": "train", "steps": 4, "learning_rate": 2e-3, "condition_dropout": 0.0},
                   {"name": "finetune", "steps": 4, "learning_rate": 5e-4, "condition_dropout": 0.5}],
        "train": {"batch_size": 4, "checkpoint_every": 2, "keep_checkpoints": 10, "log_every": 1, "num_workers": 0, "seed": 3},
    }
    raw["train"].update(stage_overrides)
    if stages is not None:
        raw["stages"] = stages
    return recipe_from_dict(raw)


@pytest.fixture(scope="session")
def hgsc_store(tmp_path_factory) -> Path:
    """The bundled real HGSC region as a store of 32 px patches at 10x (64 px crops of the 20x region)."""
    from histosynth.data.formats import read_nuclei
    from histosynth.data.prepare_labelled import prepare_nuclei
    from histosynth.quickstart import bundled_sample

    out = tmp_path_factory.mktemp("stores") / "hgsc-32"
    prepare_nuclei(read_nuclei("folder", bundled_sample(), magnification="20x"), out, patch=32, overlap=0.0,
                   magnification="10x", holdout=0.075, seed=0, progress=False)
    return out


@pytest.fixture(autouse=True)
def torch_threads_restored():
    """Commands run in-process (CliRunner) set torch's thread count for the work they start (cpu_threads); put it
    back so that no later test trains with another count, and so other numerics, than it would alone."""
    import torch

    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and far faster on a shared, oversubscribed CPU
    (``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def hgsc_corner_store(tmp_path_factory) -> Path:
    """16 real 32 px patches at 10x (a 256 px corner of the bundled HGSC region at 20x), all train, tissue 'ovary'."""
    from dataclasses import replace

    from histosynth.data.formats import read_nuclei
    from histosynth.data.prepare_labelled import prepare_nuclei
    from histosynth.quickstart import bundled_sample

    (region,) = read_nuclei("folder", bundled_sample(), magnification="20x")
    crop = (slice(600, 856), slice(600, 856))
    part = replace(region, image=region.image[crop], inst_map=region.inst_map[crop], type_map=region.type_map[crop],
                   split="train", meta={**region.meta, "tissue": "ovary"})
    out = tmp_path_factory.mktemp("stores") / "hgsc-corner"
    prepare_nuclei([part], out, patch=32, overlap=0.0, magnification="10x", progress=False)
    return out


JOINT_AE_MODEL = {"kind": "vq", "block_out_channels": [16, 16, 16], "layers_per_block": 1, "latent_channels": 3,
                  "num_vq_embeddings": 64, "vq_embed_dim": 3, "norm_num_groups": 8, "attention_levels": [],
                  "mid_block_attention": False}


@pytest.fixture(scope="session")
def joint_ae_recipe():
    """A factory of tiny HistoSmith joint-autoencoder recipes (32 px, no perceptual loss): ``joint_ae_recipe(steps=...)``."""
    from histosynth.recipes import recipe_from_dict

    def make(**train):
        t = {"learning_rate": 3e-3, "batch_size": 4, "steps": 6, "checkpoint_every": 3, "keep_checkpoints": 5,
             "log_every": 1, "num_workers": 0, "seed": 1, "scaling_factor_images": 16, "codebook_init": "data"}
        t.update(train)
        return recipe_from_dict({"name": "hs-ae-test", "method": "histosmith-autoencoder", "patch_size": 32,
                                 "model": JOINT_AE_MODEL, "loss": {"perceptual": "none"}, "train": t})

    return make
