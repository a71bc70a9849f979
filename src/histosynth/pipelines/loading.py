"""Where a pipeline of a given class lives: a saved pipeline folder, or a training run (its ``RUN/pipeline``)."""

from __future__ import annotations

import json
from pathlib import Path

from histosynth.errors import HistosynthError


def pipeline_directory(path, cls) -> Path:
    """The folder holding ``cls``'s saved pipeline: ``path`` itself or ``path/pipeline`` (a training run).

    Raises HistosynthError naming the file: no model_index.json, or a pipeline of another class."""
    path = Path(path)
    if (path / "pipeline" / "model_index.json").is_file():
        path = path / "pipeline"
    index = path / "model_index.json"
    if not index.is_file():
        raise HistosynthError(f"not a {cls.__name__} or a training run that made one (no model_index.json)", path)
    name = json.loads(index.read_text()).get("_class_name")
    if name != cls.__name__:
        raise HistosynthError(f"this is a {name}, not a {cls.__name__}", index)
    return path
