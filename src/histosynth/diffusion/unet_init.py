"""Start a latent-diffusion UNet from a pretrained one (PathLDM fine-tunes the ImageNet LDM's UNet, Sec. 4.4).

Sources: a diffusers UNet folder (``config.json`` + weights, or a pipeline folder with ``unet/``), or a
CompVis / LDM checkpoint (``.ckpt`` / ``.pt`` / ``.pth`` / ``.safetensors``) whose ``model.diffusion_model.*``
tensors (or a bare UNet state dict such as LDM's ``cin256-v2/unet.ckpt``) are converted with diffusers'
own ``convert_ldm_unet_checkpoint``. Everything else of a full LDM checkpoint (the class embedder /
``cond_stage_model``, the first stage) is dropped. Only tensors whose name and shape match are loaded;
the report lists loaded, skipped (shape differs), missing (not in the source) and dropped ones.

A source whose UNet takes a different number of latent channels than the recipe's autoencoder gives is
an error naming the file: its weights cannot describe these latents.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from histosynth.errors import HistosynthError

LDM_PREFIX = "model.diffusion_model."
_LDM_UNET_ROOTS = ("input_blocks.", "middle_block.", "output_blocks.", "time_embed.", "out.")


@dataclass
class InitReport:
    source: str
    loaded: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "name: source shape -> model shape"
    missing: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # source tensors this UNet has no place for

    def summary(self) -> str:
        lines = [f"init UNet from {self.source}: {len(self.loaded)} tensors loaded, {len(self.skipped)} skipped "
                 f"(shape differs), {len(self.missing)} missing (kept at random init), {len(self.dropped)} dropped"]
        for title, names in (("loaded", _grouped(self.loaded)), ("skipped", self.skipped), ("missing", self.missing),
                             ("dropped", _grouped(self.dropped))):
            if names:
                lines.append(f"  {title}: " + ", ".join(names))
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"source": self.source, "loaded": self.loaded, "skipped": self.skipped, "missing": self.missing,
                "dropped": self.dropped}


def _grouped(names: list[str]) -> list[str]:
    """Collapse tensor names to their module (``down_blocks.1.attentions.0 (16)``) so long lists stay readable."""
    groups: dict[str, int] = {}
    for n in names:
        parts = n.split(".")
        key = ".".join(parts[:4] if parts[0] in ("down_blocks", "up_blocks") else parts[:3] if parts[0] == "mid_block"
                       else parts[:-1] or parts)
        groups[key] = groups.get(key, 0) + 1
    return [f"{k} ({v})" if v > 1 else k for k, v in groups.items()]


def read_unet_state(path: str | Path, unet_config: dict) -> dict[str, torch.Tensor]:
    """The UNet tensors of `path` under diffusers' names (see the module docstring for what `path` may be)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "unet" if (path / "unet" / "config.json").is_file() else path
        files = [folder / n for n in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")]
        found = [f for f in files if f.is_file()]
        if not (folder / "config.json").is_file() or not found:
            raise HistosynthError("not a diffusers UNet folder (config.json + diffusion_pytorch_model.safetensors)", path)
        return _load_tensors(found[0])
    if not path.is_file():
        raise HistosynthError("UNet checkpoint not found", path)
    state = _load_tensors(path)
    if any(k.startswith(("conv_in.", "down_blocks.")) for k in state):  # already diffusers-named
        return state
    if not any(k.startswith(LDM_PREFIX) for k in state):
        if any(k.startswith(_LDM_UNET_ROOTS) for k in state):  # a bare LDM UNet (e.g. cin256-v2/unet.ckpt)
            state = {LDM_PREFIX + k: v for k, v in state.items()}
        else:
            raise HistosynthError("no UNet tensors found (expected model.diffusion_model.* as in CompVis LDM "
                                  "checkpoints, a bare LDM UNet state dict, or diffusers names)", path)
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    unet_part = {k: v for k, v in state.items() if k.startswith(LDM_PREFIX)}
    try:
        converted = convert_ldm_unet_checkpoint(unet_part, dict(unet_config))
    except (KeyError, ValueError, IndexError) as exc:
        raise HistosynthError(f"cannot convert the LDM UNet tensors to diffusers names: {exc!r}", path) from None
    converted = {k: v for k, v in converted.items() if v is not None}
    # the rest of a full LDM checkpoint (cond_stage_model = class embedder / text encoder, first_stage_model)
    dropped = sorted(k for k in state if not k.startswith(LDM_PREFIX))
    converted.update({f"<dropped>{k}": state[k] for k in dropped})
    return converted


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a state dict / checkpoint file; pickled Lightning objects of a full LDM .ckpt are read as inert
    placeholders, never run (the autoencoder converter's reader)."""
    from histosynth.models.compvis_autoencoder import read_checkpoint

    return read_checkpoint(path)[0]


def init_unet_from(unet: torch.nn.Module, path: str | Path) -> InitReport:
    """Copy the shape-matching tensors of the UNet at `path` into `unet` (in place) and report what happened."""
    source = read_unet_state(path, unet.config)
    own = unet.state_dict()
    c_model = int(unet.config.in_channels)
    w_in = source.get("conv_in.weight")
    if w_in is not None and w_in.ndim == 4 and int(w_in.shape[1]) != c_model:
        raise HistosynthError(
            f"this UNet takes {int(w_in.shape[1])} latent channels but the recipe's autoencoder gives {c_model}: "
            "its weights cannot start a model of these latents (use an autoencoder with as many latent channels, "
            "or set train.init_unet: null to train from scratch)",
            path,
        )
    report = InitReport(source=str(path))
    matched = {}
    for name, tensor in source.items():
        if name.startswith("<dropped>"):
            report.dropped.append(name[len("<dropped>"):])
        elif name not in own:
            report.dropped.append(name)
        elif tuple(tensor.shape) != tuple(own[name].shape):
            report.skipped.append(f"{name}: {tuple(tensor.shape)} -> {tuple(own[name].shape)}")
        else:
            matched[name] = tensor.to(own[name].dtype)
            report.loaded.append(name)
    report.missing = [n for n in own if n not in source]
    if not matched:
        raise HistosynthError("no tensor of this checkpoint fits the recipe's UNet (names or shapes all differ)", path)
    unet.load_state_dict(matched, strict=False)
    return report


def write_report(report: InitReport, where: Path) -> None:
    where.write_text(json.dumps(report.to_dict(), indent=1) + "\n")
