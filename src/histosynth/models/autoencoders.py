"""The first-stage autoencoders of latent diffusion, as diffusers models: build one from named hyperparameters,
or load one from wherever it lives (a diffusers folder, a training run, a CompVis / LDM checkpoint).

``vq``: diffusers ``VQModel`` (CompVis VQ-f4 / VQ-f8, PathLDM's first stage); ``kl``: ``AutoencoderKL`` (kl-f8,
Stable Diffusion's). The CompVis encoder/decoder are exactly diffusers' ``Encoder`` / ``Decoder`` with
``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` levels, or their ``Attn*`` variants at the levels listed in
``attention_levels`` (CompVis ``attn_resolutions``), and one attention block in the middle.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import AutoencoderKL, VQModel

from histosynth.errors import HistosynthError

__all__ = ["block_types", "make_autoencoder", "load_autoencoder", "autoencoder_kind", "latent_channels_of", "Autoencoder"]

def _classes() -> dict:
    from histosynth.models.joint_autoencoder import JointVQModel  # HistoSmith's (image, distance, mask) VQ model

    return {"VQModel": VQModel, "AutoencoderKL": AutoencoderKL, "JointVQModel": JointVQModel}

Autoencoder = VQModel | AutoencoderKL


def block_types(levels: int, attention_levels: Sequence[int] = ()) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(encoder down blocks, decoder up blocks) of a CompVis first stage with self-attention at ``attention_levels``
    (0 = full resolution)."""
    down = tuple("AttnDownEncoderBlock2D" if i in attention_levels else "DownEncoderBlock2D" for i in range(levels))
    # diffusers' decoder runs its up blocks from the lowest resolution: up block i is level (levels - 1 - i)
    up = tuple("AttnUpDecoderBlock2D" if levels - 1 - i in attention_levels else "UpDecoderBlock2D" for i in range(levels))
    return down, up


def make_autoencoder(
    kind: str,
    block_out_channels: Sequence[int],
    layers_per_block: int,
    latent_channels: int,
    *,
    num_vq_embeddings: int = 8192,
    vq_embed_dim: int | None = None,
    norm_num_groups: int = 32,
    attention_levels: Sequence[int] = (),
    mid_block_attention: bool = True,
    sample_size: int = 256,
    scaling_factor: float = 1.0,
    in_channels: int = 3,
    out_channels: int = 3,
) -> VQModel | AutoencoderKL:
    """A freshly initialised ``VQModel`` (kind "vq") or ``AutoencoderKL`` (kind "kl")."""
    down, up = block_types(len(block_out_channels), attention_levels)
    common = dict(
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=tuple(int(c) for c in block_out_channels),
        layers_per_block=int(layers_per_block),
        latent_channels=int(latent_channels),
        norm_num_groups=int(norm_num_groups),
        sample_size=int(sample_size),
        scaling_factor=float(scaling_factor),
        mid_block_add_attention=bool(mid_block_attention),
    )
    if kind == "vq":
        return VQModel(**common, num_vq_embeddings=int(num_vq_embeddings),
                       vq_embed_dim=int(vq_embed_dim if vq_embed_dim is not None else latent_channels))
    if kind == "kl":
        return AutoencoderKL(**common)
    raise ValueError(f"unknown autoencoder kind {kind!r}; expected 'vq' or 'kl'")


def autoencoder_kind(model: torch.nn.Module) -> str:
    if isinstance(model, VQModel):
        return "vq"
    if isinstance(model, AutoencoderKL):
        return "kl"
    raise TypeError(f"not a VQModel or AutoencoderKL: {type(model).__name__}")


def latent_channels_of(model: VQModel | AutoencoderKL) -> int:
    """Channels of the latent the diffusion model works on (VQ: the codebook width; KL: z channels)."""
    cfg = model.config
    if isinstance(model, VQModel):
        return int(cfg.vq_embed_dim or cfg.latent_channels)
    return int(cfg.latent_channels)


def load_autoencoder(source: str | Path, kind: str | None = None, config: dict | None = None):
    """(model, conversion report or None) from a diffusers folder (``save_pretrained``), a training run (its
    ``autoencoder/``) or a CompVis / LDM checkpoint file (converted with ``config``, see
    :func:`~histosynth.models.compvis_autoencoder.convert_compvis_first_stage`; the report says what was loaded)."""
    path = Path(source)
    if not path.exists():
        raise HistosynthError("autoencoder not found (expected a diffusers folder, a training run or a .ckpt)", path)
    if path.is_file():
        from histosynth.models.compvis_autoencoder import convert_compvis_first_stage

        return convert_compvis_first_stage(path, kind=kind, config=config)
    if (path / "autoencoder" / "config.json").is_file():  # a training run
        path = path / "autoencoder"
    config_file = path / "config.json"
    if not config_file.is_file():
        raise HistosynthError("not an autoencoder folder (no config.json) nor a training run (no autoencoder/)", path)
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except ValueError as exc:
        raise HistosynthError(f"unreadable config: {exc}", config_file) from None
    classes = _classes()
    if class_name not in classes:
        raise HistosynthError(f"holds a {class_name!r}, not a {', '.join(classes)}", config_file)
    model = classes[class_name]
    if kind is not None and not issubclass(model, {"vq": VQModel, "kl": AutoencoderKL}[kind]):
        raise HistosynthError(f"expected a {kind!r} autoencoder, found a {class_name}", path)
    try:
        return model.from_pretrained(path).eval(), None
    except (OSError, ValueError, RuntimeError) as exc:
        raise HistosynthError(f"cannot load the {class_name}: {exc}", path) from None
