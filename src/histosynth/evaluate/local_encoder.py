"""Local image encoders as feature extractors (``--features PATH``), e.g. a pathology self-supervised encoder.

The files are read by :mod:`histosynth.models.local_encoder` (shared with the slide-tile encoder of
``histosynth embed``): a **TorchScript** file, a **timm folder** (``config.json`` + ``model.safetensors`` /
``pytorch_model.bin``), or a **weight file** plus an explicit timm architecture (``--features-arch``); see that module
for the layouts, the preprocessing (whole image resized to ``input_size``, no crop, then ``(x - mean) / std``) and
the strict weight loading (a missing / unexpected key or a shape mismatch is a :class:`HistosynthError` naming the
file; only the dropped classifier's keys are ``ignored``). This module wraps the network as a
:class:`~histosynth.evaluate.features.FeatureExtractor` (no logits, no Inception Score).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from histosynth.errors import HistosynthError
from histosynth.evaluate.features import FeatureExtractor
from histosynth.models.local_encoder import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    WEIGHT_FILES,
    LoadReport,
    Preprocessing,
    load_encoder_files,
    read_state_dict,
)

__all__ = [
    "LocalEncoderFeatureExtractor",
    "LoadReport",
    "Preprocessing",
    "load_local_encoder",
    "read_state_dict",
    "WEIGHT_FILES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]


# --------------------------------------------------------------------------------------------- the extractor
class LocalEncoderFeatureExtractor(FeatureExtractor):
    """A local encoder behind the :class:`~histosynth.evaluate.features.FeatureExtractor` interface (no logits)."""

    def __init__(self, model: nn.Module, preprocessing: Preprocessing, protocol: dict[str, Any], report: LoadReport):
        super().__init__()
        self.model = model.eval()
        for param in model.parameters():  # (ScriptModules have no requires_grad_)
            param.requires_grad_(False)
        self.preprocessing = preprocessing
        self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)
        self.load_report = report
        self.name = f"local:{Path(report.path).name}"
        self.num_logits = 0
        self.provides_inception_score = False
        self.num_features = int(self._features(torch.zeros(1, 3, *preprocessing.input_size, dtype=torch.uint8),
                                               where=report.path).shape[1])
        self.protocol = dict(protocol, num_features=self.num_features)
        self.eval()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8 (B,3,H,W)`` -> the normalised float input of the encoder."""
        x = self.preprocessing.apply(images.to(self.mean.device), self.mean, self.std)
        param = next((t for t in self.model.parameters() if t.is_floating_point()), None)
        return x if param is None else x.to(param.dtype)

    def _features(self, images: torch.Tensor, where: str | None = None) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(self.preprocess(images))
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        if not torch.is_tensor(out) or out.dim() != 2:
            shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise HistosynthError(
                f"the encoder must return (B, D) features, it returned {shape} "
                "(token outputs need pooling: set \"pool\" in config.json, e.g. \"token\" or \"avg\")",
                where or self.load_report.path,
            )
        return out

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, None]:
        self._check_images(images)
        return self._features(images).float(), None


# ------------------------------------------------------------------------------------------------- loading
def load_local_encoder(path: str | Path, architecture: str | None = None, **overrides) -> LocalEncoderFeatureExtractor:
    """Build a frozen feature extractor from a local encoder (layouts: :mod:`histosynth.models.local_encoder`).

    Args:
        path: a TorchScript file, a timm folder (``config.json`` + weights), or a weight file (with ``architecture``).
        architecture: timm model name for a bare weight file (``--features-arch``); refused for the other layouts.
        overrides: keyword arguments of :func:`~histosynth.models.local_encoder.load_encoder_files`: ``input_size``,
            ``mean``, ``std``, ``interpolation`` (preprocessing for a file, overriding its ``<file>.json``) and
            ``pool`` (timm ``global_pool`` for a bare weight file; default: the architecture's).

    The returned extractor's ``load_report`` (:class:`LoadReport`) says what was loaded.

    Raises:
        HistosynthError: missing path, unreadable file, unknown architecture, weights that do not fit (strict).
    """
    loaded = load_encoder_files(path, architecture, **overrides)
    return LocalEncoderFeatureExtractor(loaded.model, loaded.preprocessing, loaded.protocol, loaded.report)
