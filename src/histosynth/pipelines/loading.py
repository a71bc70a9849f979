"""What every histosynth pipeline shares: loading from a saved pipeline folder, a training run (its ``RUN/pipeline``)
or a Hugging Face Hub id (:class:`RunPipeline`), and the latent scaling factor default."""

from __future__ import annotations

import json
import re
from pathlib import Path

from diffusers import DiffusionPipeline

from histosynth.errors import HistosynthError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # "owner/name", as the Hub spells repository ids


def pipeline_directory(path, cls) -> Path:
    """The folder holding ``cls``'s saved pipeline: ``path`` itself or ``path/pipeline`` (a training run); a path
    that does not exist here but reads as ``owner/name`` is downloaded from the Hugging Face Hub first.

    Raises HistosynthError naming the file: no model_index.json, a pipeline of another class, a Hub id that cannot
    be downloaded."""
    path = Path(path)
    if not path.exists() and _HUB_ID.fullmatch(str(path)):
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(str(path)))
        except Exception as exc:  # offline, unknown repository, no access: one line naming what was asked for
            raise HistosynthError(f"not found here, and not downloadable from the Hugging Face Hub "
                                  f"({type(exc).__name__})", path) from exc
    if (path / "pipeline" / "model_index.json").is_file():
        path = path / "pipeline"
    index = path / "model_index.json"
    if not index.is_file():
        method = cls.__name__.removesuffix("Pipeline")
        raise HistosynthError(f"not a {method} pipeline or a training run that made one (no model_index.json)", path)
    name = json.loads(index.read_text()).get("_class_name")
    if name != cls.__name__:
        raise HistosynthError(f"this is a {name}, not a {cls.__name__}", index)
    return path


def latent_scaling(vae, value: float | None) -> float:
    """The latent scaling factor a latent pipeline records: ``value``, else the autoencoder's (1 if it has none)."""
    return float(getattr(vae.config, "scaling_factor", 1.0) if value is None else value)


class RunPipeline(DiffusionPipeline):
    """A diffusers pipeline whose ``from_pretrained`` also takes a training run directory (its EMA pipeline lives in
    ``RUN/pipeline``) and checks that the folder holds this class (:func:`pipeline_directory`)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        return super().from_pretrained(str(pipeline_directory(pretrained_model_name_or_path, cls)), **kwargs)
