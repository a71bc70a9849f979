"""The method registry: each method is registered once, and everything that dispatches on a method asks here.

A :class:`Method` names a method's recipe type, its training task, its pipeline class and how it samples
(``sample_input``: which ``histosynth sample`` option carries its conditions, and the function that samples
them). ``histosynth train`` finds the task by the recipe's ``method:``; ``histosynth sample``,
``evaluate sweep`` and :func:`load_pipeline` find the method of a run or pipeline folder by the pipeline class
its ``model_index.json`` names. A method without a pipeline (the autoencoders, the nuclei segmenter) only trains.
Adding a method: ``register_method(Method(...))`` (see docs/architecture.md, "Adding a method").
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from histosynth.errors import HistosynthError
from histosynth.recipes import register_recipe_type


@dataclass(frozen=True)
class Method:
    """One method. ``task(recipe, data, progress=...)`` builds its :class:`~histosynth.training.TrainingTask`;
    ``sample(pipe, source, out, *, split, num, guidance_scale, num_inference_steps, scheduler, seed, batch_size,
    overwrite, progress)`` writes samples (unset settings: the method's defaults) with the shared writer."""

    name: str
    recipe: type
    task: Callable
    title: str = ""  # how messages name it ("NASDM")
    pipeline: type | None = None
    sample: Callable | None = None
    sample_input: Literal["masks", "prompts", "counts", "magnifications", "regions"] | None = None
    sample_input_help: str = ""  # what the sample input is, for messages
    trains: Literal["diffusion", "autoencoder", "segmenter"] = "diffusion"  # what `histosynth train WHAT` it answers to

    @property
    def label(self) -> str:
        return self.title or self.name


_METHODS: dict[str, Method] = {}


def register_method(method: Method) -> Method:
    """Register (or replace) a method; its recipe type becomes loadable as ``method: <name>``."""
    if method.recipe.METHOD != method.name:
        raise ValueError(f"recipe type {method.recipe.__name__} is for method {method.recipe.METHOD!r}, not {method.name!r}")
    if (method.pipeline is None) != (method.sample is None) or (method.sample is None) != (method.sample_input is None):
        raise ValueError(f"method {method.name!r}: give pipeline, sample and sample_input together, or none of them")
    register_recipe_type(method.recipe)
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in _METHODS:
        raise HistosynthError(f"unknown method {name!r}; known: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def methods() -> list[Method]:
    return list(_METHODS.values())


def pipeline_folder(model: str | Path) -> Path:
    """The pipeline folder of a training run (RUN/pipeline) or a saved pipeline."""
    from histosynth.pipelines.loading import find_pipeline

    folder = find_pipeline(model)
    if folder is None:
        raise HistosynthError("not a training run or saved pipeline (no model_index.json)", model)
    return folder


def method_of_model(model: str | Path) -> Method:
    """The method whose pipeline a run or pipeline folder holds (by the class its model_index.json names)."""
    index = pipeline_folder(model) / "model_index.json"
    try:
        name = json.loads(index.read_text())["_class_name"]
    except (OSError, ValueError, KeyError) as exc:
        raise HistosynthError(f"unreadable pipeline description: {exc}", index) from None
    for method in _METHODS.values():
        if method.pipeline is not None and method.pipeline.__name__ == name:
            return method
    raise HistosynthError(f"no registered method samples a {name}", index)


def load_pipeline(model: str | Path, device: str | None = None):
    """(method, pipeline) of a training run or saved pipeline folder, on ``device`` when given."""
    method = method_of_model(model)
    pipe = method.pipeline.from_pretrained(pipeline_folder(model))
    return method, (pipe.to(device) if device else pipe)


def _register_builtins() -> None:
    from histosynth.pipelines.nasdm import NASDMPipeline
    from histosynth.pipelines.pathldm import PathLDMPipeline
    from histosynth.recipes import AutoencoderRecipe, LatentDiffusionRecipe, NASDMRecipe
    from histosynth.sampling import sample_prompts, sample_store
    from histosynth.pipelines.histosmith import HistoSmithPipeline
    from histosynth.recipes.histosmith import HistoSmithRecipe, JointAutoencoderRecipe
    from histosynth.sampling.counts import sample_counts
    from histosynth.training.histosmith import HistoSmithTask
    from histosynth.training.autoencoder import AutoencoderTask
    from histosynth.training.histosmith_autoencoder import JointAutoencoderTask
    from histosynth.training.nasdm import NASDMTask
    from histosynth.training.pathldm import PathLDMTask
    from histosynth.pipelines.zoomldm import ZoomLDMPipeline
    from histosynth.recipes.zoomldm import ZoomConditionsRecipe, ZoomLDMRecipe
    from histosynth.sampling.zoom import sample_zoom
    from histosynth.training.zoomldm import ZoomLDMTask
    from histosynth.training.zoomldm_conditions import ZoomConditionsTask
    from histosynth.recipes.segmenter import SegmenterRecipe
    from histosynth.training.segmenter import SegmenterTask
    from histosynth.pipelines.disc import DISCPipeline
    from histosynth.recipes.disc import DISCRecipe
    from histosynth.sampling.regions import sample_regions
    from histosynth.training.disc import DISCTask

    register_method(Method("nasdm", NASDMRecipe, NASDMTask, "NASDM", NASDMPipeline, sample_store, "masks",
                           "the masks of a store"))
    register_method(Method("pathldm", LatentDiffusionRecipe, PathLDMTask, "PathLDM", PathLDMPipeline, sample_prompts,
                           "prompts"))
    register_method(Method("histosmith", HistoSmithRecipe, HistoSmithTask, "HistoSmith", HistoSmithPipeline, sample_counts,
                           "counts", "counts per nucleus type and a tissue"))
    register_method(Method("zoomldm", ZoomLDMRecipe, ZoomLDMTask, "ZoomLDM", ZoomLDMPipeline, sample_zoom,
                           "magnifications", "patches at magnifications, from generated or reference conditions"))
    register_method(Method("disc", DISCRecipe, DISCTask, "DISC", DISCPipeline, sample_regions, "regions",
                           "tiles on the region masks of a region store"))
    register_method(Method("zoomldm-conditions", ZoomConditionsRecipe, ZoomConditionsTask, "ZoomLDM condition sampler"))
    register_method(Method("autoencoder", AutoencoderRecipe, AutoencoderTask, "autoencoder", trains="autoencoder"))
    register_method(Method("histosmith-autoencoder", JointAutoencoderRecipe, JointAutoencoderTask,
                           "HistoSmith joint autoencoder", trains="autoencoder"))
    register_method(Method("segmenter", SegmenterRecipe, SegmenterTask, "nuclei segmenter", trains="segmenter"))


_register_builtins()
