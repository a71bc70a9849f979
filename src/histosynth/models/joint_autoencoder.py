"""HistoSmith's first stage: one VQ latent for an H&E image, its distance map and its semantic mask, decoded by
two heads (HistoSmith, Sec. 2, "Our decoder has two heads: one predicts the input image and distance map, the
other the semantic mask").

Input, (B, 3 + 1 + K + 1, H, W) float, every channel in [-1, 1] (:func:`pack_joint_input`):
  0..2  the RGB image, uint8 / 127.5 - 1;
  3     the distance map d ∈ [0, 1] (per nucleus, distance to its border over its maximum: 1 at the centre,
        0 outside; :func:`~histosynth.data.nuclei_maps.distance_targets`) as 2d - 1;
  4..   the semantic mask one-hot over background + K nucleus types, as 2·onehot - 1.

The model is a diffusers ``VQModel`` (encoder → quant_conv → codebook → post_quant_conv → decoder) whose decoder
is head A (4 channels: image and distance map) plus a second decoder of the same shape, ``mask_decoder``, head B
(K + 1 logits). Both heads read the same quantised latent. The paper does not say how deep the heads are; we
give each a full decoder (a shared trunk with two output convolutions would be cheaper, but the semantic head
would then compete with the image for the same features, which the two-head design exists to avoid).
Being a ``VQModel``, it saves / loads with ``save_pretrained`` / ``from_pretrained``, and the latent cache,
codebook initialisation and scaling-factor code of the image autoencoder work on it, given its input batch
(:func:`joint_batch`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import ModelMixin, VQModel  # noqa: F401  (diffusers' pipeline loader looks ModelMixin up in this module)
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.vae import Decoder
from diffusers.utils import BaseOutput

from histosynth.data.nuclei_maps import distance_targets

IMAGE_CHANNELS, DISTANCE_CHANNELS = 3, 1


def joint_channels(num_classes: int) -> int:
    """Channels of the joint input: image 3 + distance 1 + background and ``num_classes`` types."""
    return IMAGE_CHANNELS + DISTANCE_CHANNELS + num_classes + 1


def pack_joint_input(image: np.ndarray, inst_map: np.ndarray, type_map: np.ndarray, num_classes: int) -> np.ndarray:
    """float32 (3 + 1 + K + 1, H, W) in [-1, 1] from uint8 (H, W, 3), int (H, W) instance and type maps (0 = background,
    1..K types). Pixels whose type is outside 0..K raise ValueError."""
    types = np.asarray(type_map).astype(np.int64)
    if types.min(initial=0) < 0 or types.max(initial=0) > num_classes:
        raise ValueError(f"type ids {types.min()}..{types.max()} outside 0..{num_classes}")
    img = np.asarray(image, np.float32).transpose(2, 0, 1) / 127.5 - 1.0
    dist = distance_targets(inst_map)[None] * 2.0 - 1.0
    onehot = (np.arange(num_classes + 1)[:, None, None] == types[None]).astype(np.float32) * 2.0 - 1.0
    return np.concatenate([img, dist, onehot]).astype(np.float32)


@dataclass
class JointDecoderOutput(BaseOutput):
    """image (B, 3, H, W) in [-1, 1]; distance (B, 1, H, W) in [0, 1]; mask_logits (B, K + 1, H, W) (channel 0 =
    background); commit_loss: the VQ loss of the quantisation (zeros when decoding codebook vectors)."""

    image: torch.Tensor
    distance: torch.Tensor
    mask_logits: torch.Tensor
    commit_loss: torch.Tensor | None = None


class JointVQModel(VQModel):
    """A VQ autoencoder of (image, distance map, semantic mask) with two decoder heads (see the module docstring).

    ``num_classes`` K nucleus types (their names in ``class_names``); the other arguments are ``VQModel``'s.
    ``encode`` / ``quantize`` are VQModel's; :meth:`decode_heads` decodes both heads; ``decode`` (VQModel's) gives
    head A's raw 4 channels.
    """

    @register_to_config
    def __init__(
        self,
        num_classes: int = 4,
        class_names: tuple[str, ...] | None = None,
        in_channels: int | None = None,
        out_channels: int = IMAGE_CHANNELS + DISTANCE_CHANNELS,
        down_block_types: tuple[str, ...] = ("DownEncoderBlock2D",),
        up_block_types: tuple[str, ...] = ("UpDecoderBlock2D",),
        block_out_channels: tuple[int, ...] = (64,),
        layers_per_block: int = 1,
        act_fn: str = "silu",
        latent_channels: int = 3,
        sample_size: int = 32,
        num_vq_embeddings: int = 256,
        norm_num_groups: int = 32,
        vq_embed_dim: int | None = None,
        scaling_factor: float = 1.0,
        norm_type: str = "group",
        mid_block_add_attention: bool = True,
        lookup_from_codebook: bool = False,
        force_upcast: bool = False,
    ):
        expected = joint_channels(num_classes)
        if in_channels not in (None, expected) or out_channels != IMAGE_CHANNELS + DISTANCE_CHANNELS:
            raise ValueError(f"a joint model of {num_classes} types takes {expected} channels in and gives 4 + "
                             f"{num_classes + 1}; got in_channels={in_channels}, out_channels={out_channels}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} types")
        super().__init__(
            in_channels=expected, out_channels=out_channels, down_block_types=down_block_types,
            up_block_types=up_block_types, block_out_channels=block_out_channels, layers_per_block=layers_per_block,
            act_fn=act_fn, latent_channels=latent_channels, sample_size=sample_size,
            num_vq_embeddings=num_vq_embeddings, norm_num_groups=norm_num_groups, vq_embed_dim=vq_embed_dim,
            scaling_factor=scaling_factor, norm_type=norm_type, mid_block_add_attention=mid_block_add_attention,
            lookup_from_codebook=lookup_from_codebook, force_upcast=force_upcast,
        )
        self.mask_decoder = Decoder(
            in_channels=latent_channels, out_channels=num_classes + 1, up_block_types=up_block_types,
            block_out_channels=block_out_channels, layers_per_block=layers_per_block, act_fn=act_fn,
            norm_num_groups=norm_num_groups, norm_type=norm_type, mid_block_add_attention=mid_block_add_attention,
        )

    def _raw_heads(self, quant: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(head A's 4 channels in [-1, 1]-space, head B's K + 1 logits) of quantised latents."""
        post = self.post_quant_conv(quant)
        spatial = quant if self.config.norm_type == "spatial" else None
        return self.decoder(post, spatial), self.mask_decoder(post, spatial)

    def decode_quantized(self, quant: torch.Tensor, commit_loss: torch.Tensor | None = None) -> JointDecoderOutput:
        """Both heads from quantised latents (B, vq_embed_dim, h, w)."""
        a, b = self._raw_heads(quant)
        return JointDecoderOutput(image=a[:, :IMAGE_CHANNELS], distance=((a[:, IMAGE_CHANNELS:] + 1) / 2).clamp(0, 1),
                                  mask_logits=b, commit_loss=commit_loss)

    def decode_heads(self, latents: torch.Tensor, force_not_quantize: bool = False) -> JointDecoderOutput:
        """Both heads from unscaled latents (B, vq_embed_dim, h, w) (quantised first unless ``force_not_quantize``)."""
        if force_not_quantize:
            return self.decode_quantized(latents)
        quant, commit_loss, _ = self.quantize(latents)
        return self.decode_quantized(quant, commit_loss)

    def reconstruct(self, x: torch.Tensor):
        """Training forward: (head A's raw 4 channels in [-1, 1]-space, head B's logits, VQ loss, code indices)."""
        quant, vq_loss, (_, _, indices) = self.quantize(self.encode(x).latents)
        return (*self._raw_heads(quant), vq_loss, indices)


def joint_batch(store, indices) -> torch.Tensor:
    """float32 (B, 5 + K, P, P) joint inputs (:func:`pack_joint_input`) of labelled store patches ``indices``."""
    k = len(store.class_names)
    items = (store[int(i)] for i in indices)
    return torch.from_numpy(np.stack([pack_joint_input(it["image"], it["inst_map"], it["type_map"], k) for it in items]))
