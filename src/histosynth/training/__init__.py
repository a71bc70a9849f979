"""Training: one engine (``engine.py``) and each method's task on it (``nasdm``, ``pathldm``, ``autoencoder``). A task supplies its model, parameter groups, per-step loss and export; the engine does the rest."""

from histosynth.training.engine import TrainResult, fit
from histosynth.training.task import TrainingTask

__all__ = ["TrainResult", "TrainingTask", "fit"]
