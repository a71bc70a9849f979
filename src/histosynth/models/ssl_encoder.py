"""A frozen image encoder for slide tiles: uint8 tiles -> ``(N, C)`` features (ZoomLDM Sec. 3 / Fig. 1).

ZoomLDM conditions every patch on the self-supervised embeddings of the 20x region under it: the region is cut
into 256 px base tiles, each tile is embedded by an SSL encoder (HIPT, 384-d, in the paper), and the patch's
condition is the ``2^k x 2^k x C`` matrix of those embeddings (k = zoom level). :class:`TileEncoder` is that
encoder; which network it runs is a stable id recorded with the embeddings:

``efficientnet-lite0`` (default, offline)
    the ImageNet EfficientNet-Lite0 of :mod:`histosynth.models.efficientnet_lite0` (timm ``tf_efficientnet_lite0``),
    1280-d global-average-pooled features before the classifier; input: the whole tile resized to 224 px
    (bilinear, antialiased), scaled to [-1, 1] (mean = std = 0.5: the TF configuration its weights were trained in).
    Id: ``efficientnet-lite0@sha256:<weight file>``. Not a pathology encoder: a stand-in that runs anywhere.
a timm hub id, e.g. ``hf-hub:MahmoodLab/UNI``
    ``timm.create_model(id, pretrained=True, num_classes=0)`` (downloaded once into the Hugging Face cache; gated
    models need ``huggingface-cli login``), pooled features; preprocessing from the model's timm data config
    (``resolve_model_data_config``: input size, mean, std, interpolation), the whole tile resized (no crop). Id: the
    hub id.
a local path
    a TorchScript file, a timm folder (``config.json`` + weights) or a weight file with a ``<file>.json`` naming its
    architecture, read by :mod:`histosynth.models.local_encoder`. Id: ``<absolute path>@sha256:<weight file>``.
an ``nn.Module`` object
    wrapped as is (tests, custom code): called on float ``(B, 3, H, W)`` input, either preprocessed by its timm
    ``pretrained_cfg`` when it has one, or the tile as it is scaled to [0, 1] (no resize, no normalisation); its
    width C from ``num_features`` / ``dim`` when it has one, else measured on one blank tile. Id: its
    ``encoder_id`` attribute, else ``module:<module>.<class>``.

Input: uint8 tiles ``(B, H, W, 3)`` (numpy, channels last, as read from a slide). Output: float32 ``(B, C)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histosynth.errors import HistosynthError
from histosynth.models.local_encoder import Preprocessing

__all__ = ["OFFLINE_ENCODER", "TileEncoder", "load_tile_encoder", "parse_device"]

#: the default encoder: offline ImageNet EfficientNet-Lite0 (also accepted: "effnet-lite0")
OFFLINE_ENCODER = "efficientnet-lite0"
_OFFLINE_ALIASES = (OFFLINE_ENCODER, "effnet-lite0", "tf_efficientnet_lite0")
_PROBE_SIZE = 224  # a plain module without a declared width is measured on one blank tile of this size


class TileEncoder(nn.Module):
    """A frozen encoder of uint8 tiles: :meth:`encode` ``(B, H, W, 3)`` uint8 -> ``(B, C)`` float32.

    Attributes:
        encoder_id: the stable id recorded with the embeddings (hub id, ``path@sha256:...``, ...).
        dim: C, the width of the features.
        preprocessing: the resize + normalisation applied to the tiles, or None (tile / 255 as it is).
        protocol: JSON-serialisable description of everything that changes the numbers.
        default_name: a folder name derived from the id (``STORE/embeddings/<name>``).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        encoder_id: str,
        preprocessing: Preprocessing | None,
        protocol: dict[str, Any] | None = None,
        dim: int | None = None,
        features: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
        default_name: str | None = None,
        channels_last: bool = False,
    ):
        super().__init__()
        self.model = model.eval()
        for param in model.parameters():
            param.requires_grad_(False)
        self.encoder_id = str(encoder_id)
        self.preprocessing = preprocessing
        self._features = features
        self._channels_last = channels_last
        self.default_name = default_name or _slug(self.encoder_id)
        if preprocessing is not None:
            self.register_buffer("mean", torch.tensor(preprocessing.mean).view(1, 3, 1, 1), persistent=False)
            self.register_buffer("std", torch.tensor(preprocessing.std).view(1, 3, 1, 1), persistent=False)
        else:
            self.register_buffer("mean", torch.zeros(1, 3, 1, 1), persistent=False)  # only marks the device
            self.std = None
        self.dim = int(dim) if dim is not None else self._measure_dim()
        prep = preprocessing.protocol() if preprocessing is not None else {
            "input_size": "the tile's own", "resize": "none", "normalization": {"scale": "uint8/255"}}
        self.protocol = {"encoder": self.encoder_id, **(protocol or {}), **prep, "dim": self.dim}

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def train(self, mode: bool = True) -> "TileEncoder":
        """Frozen: always stays in evaluation mode."""
        return super().train(False)

    def _measure_dim(self) -> int:
        size = self.preprocessing.input_size if self.preprocessing is not None else (_PROBE_SIZE, _PROBE_SIZE)
        return int(self(torch.zeros(1, 3, *size, dtype=torch.uint8)).shape[1])

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` -> the float input of the network (on its device)."""
        images = images.to(self.device)
        if self.preprocessing is None:
            x = images.to(torch.float32) / 255.0
        else:
            x = self.preprocessing.apply(images, self.mean, self.std)
        if self._channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        param = next((t for t in self.model.parameters() if t.is_floating_point()), None)
        return x if param is None else x.to(param.dtype)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` -> float32 ``(B, C)``.

        Raises:
            HistosynthError: the network does not return ``(B, C)`` features (naming the encoder id).
        """
        with torch.inference_mode():
            x = self.preprocess(images)
            out = self._features(self.model, x) if self._features is not None else self.model(x)
        if isinstance(out, (tuple, list)) and out:
            out = out[0]
        if not torch.is_tensor(out) or out.dim() != 2 or out.shape[0] != images.shape[0]:
            shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise HistosynthError(f"the encoder must return (B, C) features for B = {images.shape[0]} tiles, it "
                                  f"returned {shape} (token outputs need pooling)", self.encoder_id)
        return out.float()

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        """uint8 tiles ``(B, H, W, 3)`` (channels last) -> float32 ``(B, C)`` on the CPU.

        Raises:
            HistosynthError: the output is not ``(B, dim)``.
        """
        tiles = np.asarray(tiles)
        if tiles.dtype != np.uint8 or tiles.ndim != 4 or tiles.shape[3] != 3:
            raise ValueError(f"expected uint8 tiles (B, H, W, 3), got {tiles.dtype} {tiles.shape}")
        images = torch.from_numpy(tiles).permute(0, 3, 1, 2)
        out = self(images)
        if out.shape[1] != self.dim:
            raise HistosynthError(f"the encoder returned {out.shape[1]} features per tile, it declared "
                                  f"{self.dim}", self.encoder_id)
        return out.cpu().numpy()


def _slug(text: str) -> str:
    """A folder name from an encoder id: 'hf-hub:MahmoodLab/UNI' -> 'MahmoodLab-UNI'."""
    text = text.split("@sha256:")[0].removeprefix("hf-hub:").removeprefix("module:")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return name or "encoder"


def parse_device(device: str | torch.device) -> torch.device:
    """``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"`` -> a usable torch device.

    Raises:
        HistosynthError: an unknown device, or one this machine does not have (names ``--device``).
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise HistosynthError(f"unknown device {device!r} (--device): {e}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HistosynthError(f"--device {device}: CUDA is not available on this machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise HistosynthError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise HistosynthError(f"--device {device}: MPS is not available on this machine")
    return dev


def load_tile_encoder(encoder: str | Path | nn.Module | None = None, device: str | torch.device = "cpu") -> TileEncoder:
    """The tile encoder named by ``encoder`` (see the module docstring), frozen, on ``device``.

    Args:
        encoder: ``None`` / ``"efficientnet-lite0"`` (offline default), a timm hub id, a local path, a
            :class:`TileEncoder` (used as is) or any ``nn.Module`` (wrapped).
        device: torch device for the network and the tiles.

    Raises:
        HistosynthError: unknown model or failed download (naming the id), unreadable local files (naming the
            file), an output that is not ``(B, C)``, an unavailable device.
    """
    dev = parse_device(device)
    if isinstance(encoder, TileEncoder):
        return encoder.to(dev)
    if isinstance(encoder, nn.Module):
        return _wrap_module(encoder).to(dev)
    if encoder is None or str(encoder).strip().lower() in _OFFLINE_ALIASES:
        return _offline_encoder().to(dev)
    if not isinstance(encoder, (str, Path)):
        raise TypeError(f"encoder must be an id, a path or an nn.Module, got {type(encoder).__name__}")
    text = str(encoder).strip()
    path = Path(text).expanduser()
    if path.exists():
        return _local_encoder(path).to(dev)
    if isinstance(encoder, Path) or text.startswith((".", "/", "~")) or (
            "/" in text and not text.startswith("hf-hub:") and len(text.split("/")) > 2):
        raise HistosynthError("encoder not found: neither a local file / folder nor a timm hub id (--encoder)", text)
    return _hub_encoder(text).to(dev)


def _wrap_module(module: nn.Module) -> TileEncoder:
    encoder_id = getattr(module, "encoder_id", None) or f"module:{type(module).__module__}.{type(module).__qualname__}"
    prep = None
    cfg = getattr(module, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size") is not None:
        from histosynth.models.local_encoder import timm_preprocessing

        prep = timm_preprocessing(module, where=encoder_id)
    dim = next((getattr(module, a) for a in ("num_features", "dim", "out_dim")
                if isinstance(getattr(module, a, None), int)), None)
    return TileEncoder(module, encoder_id=str(encoder_id), preprocessing=prep, dim=dim,
                       protocol={"extractor": "module", "architecture": type(module).__qualname__})


def _offline_encoder() -> TileEncoder:
    from histosynth.models.efficientnet_lite0 import TIMM_ARCHITECTURE, build_effnet_lite0, file_sha256

    model, path = build_effnet_lite0()
    sha = file_sha256(path)
    prep = Preprocessing((224, 224), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear")
    protocol = {"extractor": "effnet-lite0",
                "architecture": f"timm {TIMM_ARCHITECTURE} (TF 'same' padding, BatchNorm eps 1e-3), ImageNet",
                "weights": f"sha256:{sha}", "weights_file": path.name,
                "layer": "global average pool before the classifier"}
    return TileEncoder(model, encoder_id=f"{OFFLINE_ENCODER}@sha256:{sha}", preprocessing=prep, protocol=protocol,
                       dim=int(model.num_features), default_name=OFFLINE_ENCODER, channels_last=True,
                       features=lambda m, x: m.forward_head(m.forward_features(x), pre_logits=True))


def _local_encoder(path: Path) -> TileEncoder:
    from histosynth.models.local_encoder import load_encoder_files

    loaded = load_encoder_files(path, option="--encoder", arch_option="\"architecture\" in a <file>.json beside it")
    resolved = path.resolve()
    name = resolved.name if resolved.is_dir() else resolved.stem
    return TileEncoder(loaded.model, encoder_id=f"{resolved}@sha256:{loaded.weights_sha256}",
                       preprocessing=loaded.preprocessing, protocol=loaded.protocol, default_name=_slug(name))


def _hub_encoder(model_id: str) -> TileEncoder:
    import timm

    try:
        model = timm.create_model(model_id, pretrained=True, num_classes=0)
    except Exception as e:  # unknown model, no network, gated repository, ...
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise HistosynthError(f"cannot load the timm model (--encoder; a hub id such as hf-hub:MahmoodLab/UNI "
                              f"needs the network once, gated ones a Hugging Face login): {type(e).__name__}: {first}",
                              model_id) from None
    cfg = timm.data.resolve_model_data_config(model)
    interp = str(cfg.get("interpolation", "bilinear")).lower()
    prep = Preprocessing.from_values(cfg.get("input_size"), cfg.get("mean"), cfg.get("std"),
                                     interp if interp in ("bilinear", "bicubic") else "bilinear",
                                     default=Preprocessing(), where=model_id)
    protocol = {"extractor": "timm-hub", "architecture": f"timm {model_id}",
                "layer": "timm pooled features before the classifier (num_classes=0)",
                "data_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items()}}
    return TileEncoder(model, encoder_id=model_id, preprocessing=prep, protocol=protocol)
