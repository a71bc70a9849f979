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


def micro_recipe(**stage_overrides):
    """A NASDM recipe small enough for a CPU test: 32 px, a 2-level UNet without attention."""
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
    return recipe_from_dict(raw)


@pytest.fixture(scope="session")
def hgsc_store(tmp_path_factory) -> Path:
    """The bundled real HGSC region as a store of 32 px patches at 10x (64 px crops of the 20x region)."""
    from histosynth.data.formats import read_nuclei
    from histosynth.data.store import prepare_nuclei
    from histosynth.quickstart import bundled_sample

    out = tmp_path_factory.mktemp("stores") / "hgsc-32"
    prepare_nuclei(read_nuclei("folder", bundled_sample(), magnification="20x"), out, patch=32, overlap=0.0,
                   magnification="10x", holdout=0.075, seed=0, progress=False)
    return out
