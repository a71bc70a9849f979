"""The run directory: created once, never clobbered, and checked on resume (same recipe, same store)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from histosynth.diffusion import checkpoint as ckpt
from histosynth.errors import HistosynthError, OutputExistsError
from histosynth.recipes import recipe_from_dict

LOSSES = "losses.jsonl"
RECIPE = "recipe.yaml"
LOSS_PNG = "loss.png"
PIPELINE = "pipeline"  # RUN/pipeline: the ready-to-sample export of a generative method


def _plain(recipe) -> dict:
    return json.loads(json.dumps(recipe.to_dict()))


def prepare_run_dir(run: Path, recipe, data: Path, resume: bool, overwrite: bool) -> Path | None:
    """Refuse to clobber a run; on resume check it is the same recipe and store and return the checkpoint to load."""
    if resume:
        if not (run / RECIPE).is_file():
            raise HistosynthError("cannot resume: no run here (recipe.yaml missing)", run)
        saved = yaml.safe_load((run / RECIPE).read_text())
        try:  # read through today's recipe type, so that renamed methods and new defaulted fields compare equal
            saved_recipe = _plain(recipe_from_dict(saved["recipe"], source=run / RECIPE))
        except HistosynthError:
            saved_recipe = saved["recipe"]
        if saved_recipe != _plain(recipe):
            raise HistosynthError("cannot resume: the recipe differs from the one this run was started with", run)
        if Path(saved["data"]).resolve() != data.resolve():
            raise HistosynthError(f"cannot resume: this run was trained on {saved['data']}, not {data}", run)
        return ckpt.latest_checkpoint(run)
    if run.exists() and any(run.iterdir()):
        if not overwrite:
            raise OutputExistsError("run directory exists and is not empty; pass --resume or --overwrite", run)
        shutil.rmtree(run)
    run.mkdir(parents=True, exist_ok=True)
    (run / RECIPE).write_text(yaml.safe_dump({"recipe": _plain(recipe), "data": str(data)}))
    return None


def truncate_losses(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (they will be recomputed)."""
    if path.exists():
        rows = [r for r in path.read_text().splitlines() if r and json.loads(r)["step"] <= step]
        path.write_text("".join(r + "\n" for r in rows))
