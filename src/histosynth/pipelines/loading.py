"""What every histosynth pipeline shares: loading from a saved pipeline folder or a training run (its ``RUN/pipeline``)
(:class:`RunPipeline`), the sampling defaults read from the saved recipe, and the latent scaling factor default."""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import DiffusionPipeline

from histosynth.errors import HistosynthError

def find_pipeline(path) -> Path | None:
    """The saved pipeline at ``path``: ``path/pipeline`` (a training run) or ``path`` itself, whichever holds a
    ``model_index.json``; None when neither does."""
    path = Path(path)
    return next((f for f in (path / "pipeline", path) if (f / "model_index.json").is_file()), None)


def pipeline_directory(path, cls) -> Path:
    """The folder holding ``cls``'s saved pipeline: ``path`` itself or ``path/pipeline`` (a training run). Local only:
    a pipeline on the Hugging Face Hub is downloaded first (``huggingface_hub.snapshot_download``), so that a
    mistyped local path never reaches the network.

    Raises HistosynthError naming the file: no such folder, no model_index.json, a pipeline of another class."""
    path = Path(path)
    if not path.exists():
        raise HistosynthError("no such folder (a saved pipeline or a training run; a Hugging Face Hub pipeline: "
                              "download it with huggingface_hub.snapshot_download and pass the folder)", path)
    folder = find_pipeline(path)
    if folder is None:
        method = cls.__name__.removesuffix("Pipeline")
        raise HistosynthError(f"not a {method} pipeline or a training run that made one (no model_index.json)", path)
    index = folder / "model_index.json"
    name = json.loads(index.read_text()).get("_class_name")
    if name != cls.__name__:
        raise HistosynthError(f"this is a {name}, not a {cls.__name__}", index)
    return folder


def latent_scaling(vae, value: float | None) -> float:
    """The latent scaling factor a latent pipeline records: ``value``, else the autoencoder's (1 if it has none)."""
    return float(getattr(vae.config, "scaling_factor", 1.0) if value is None else value)


class RunPipeline(DiffusionPipeline):
    """A diffusers pipeline whose ``from_pretrained`` also takes a training run directory (its EMA pipeline lives in
    ``RUN/pipeline``) and checks that the folder holds this class (:func:`pipeline_directory`)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """``pretrained_model_name_or_path``: a folder written by ``save_pretrained`` or a training run directory (its
        EMA pipeline in ``RUN/pipeline``); ``kwargs`` as diffusers' (e.g. ``torch_dtype``)."""
        if cls is RunPipeline:
            raise HistosynthError("load with a method's pipeline class (e.g. NASDMPipeline.from_pretrained), or "
                                  "histosynth.methods.load_pipeline, which reads the class from the folder")
        return super().from_pretrained(str(pipeline_directory(pretrained_model_name_or_path, cls)), **kwargs)

    def sampling_settings(self, fallback: dict, **given) -> tuple:
        """The values of ``given`` (keyword order) with each None replaced by the saved recipe's ``sampling`` section,
        else by ``fallback`` (the method's published setting; also what a pipeline saved without that section uses).
        The one place a pipeline's ``__call__`` reads its defaults, so ``pipe(...)`` in Python samples as the recipe
        says, like ``histosynth sample``: guidance, steps and η from here, and the scheduler is the one the export saved
        (a latent method's: its recipe's ``sampling.scheduler`` on the trained schedule; NASDM's: its trained DDPM)."""
        saved = self.config.get("sampling") or {}
        return tuple(saved.get(k, fallback[k]) if v is None else v for k, v in given.items())
