"""Official CompVis first-stage checkpoints (VQ-f4, VQ-f8, KL-f8, ...) as diffusers ``VQModel`` / ``AutoencoderKL``.

Reads a CompVis autoencoder ``model.ckpt`` (keys ``encoder.*``, ``decoder.*``, ``quant_conv.*``,
``post_quant_conv.*``, ``quantize.embedding.weight`` for VQ, and the training loss ``loss.*``, skipped) or a
full latent-diffusion checkpoint (PathLDM, ZoomLDM: the first stage under ``first_stage_model.``), infers the
architecture from the tensor shapes, and maps the names with diffusers' own single-file converter
(``convert_ldm_vae_checkpoint``: encoder/decoder blocks, middle attention, quant convs). What that converter
does not know is written here: the VQ codebook and the attention blocks inside resolution levels (CompVis
``attn_resolutions``, e.g. VQ-f8 at 32 px).

Checkpoints are read with ``torch.load(weights_only=True)``. Lightning checkpoints also pickle Python objects
(``ModelCheckpoint`` callbacks, hyperparameter dicts); those are loaded as inert placeholders registered
with torch's weights-only unpickler, so no code from the file runs, and a warning names them.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections import Counter, OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from histosynth.errors import HistosynthError
from histosynth.models.checkpoint_layout import checkpoint_tensors, key_prefixes
from histosynth.models.autoencoders import make_autoencoder

__all__ = ["convert_compvis_first_stage", "read_checkpoint", "infer_architecture", "ConversionReport"]

LDM_PREFIX = "first_stage_model."
FIRST_STAGE_PREFIXES = ("encoder.", "decoder.", "quant_conv.", "post_quant_conv.", "quantize.")
_LEVEL_ATTENTION = re.compile(r"^(encoder\.down|decoder\.up)\.(\d+)\.attn\.(\d+)\.")
# architecture fields the shapes determine; the others (norm_num_groups, sample_size, scaling_factor) are given
INFERRED = ("kind", "in_channels", "out_channels", "block_out_channels", "layers_per_block", "latent_channels",
            "num_vq_embeddings", "vq_embed_dim", "attention_levels", "mid_block_attention")


@dataclass
class ConversionReport:
    source: str
    kind: str
    architecture: dict
    loaded: list[str] = field(default_factory=list)  # checkpoint keys that went into the model
    skipped: list[str] = field(default_factory=list)  # checkpoint keys that are not the first stage (loss.*, unet, ...)
    missing: list[str] = field(default_factory=list)  # model weights the checkpoint lacks (only with strict=False)
    placeholders: list[str] = field(default_factory=list)  # pickled Python objects read as inert placeholders
    scaling_factor: float = 1.0
    scaling_factor_source: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> list[str]:
        """Lines for a terminal: counts, skipped keys grouped by prefix, missing keys in full."""
        arch = ", ".join(f"{k}={v}" for k, v in self.architecture.items() if k != "kind")
        lines = [f"{self.source}: {self.kind} first stage ({arch})",
                 f"loaded {len(self.loaded)} tensors",
                 f"scaling_factor {self.scaling_factor:g} ({self.scaling_factor_source})"]
        if self.skipped:
            groups = Counter(_group(k) for k in self.skipped)
            lines.append(f"skipped {len(self.skipped)} keys (not the first stage): "
                         + ", ".join(f"{g}* ({n})" for g, n in sorted(groups.items())))
        if self.missing:
            lines.append(f"missing {len(self.missing)} weights (left at their initial values): " + ", ".join(self.missing))
        if self.placeholders:
            lines.append("pickled objects read as inert placeholders: " + ", ".join(self.placeholders))
        return lines


def _group(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2]) + "." if len(parts) > 2 else parts[0] + ("." if len(parts) > 1 else "")


# -------------------------------------------------------------------------------------------- reading
def _placeholder(full_name: str) -> type:
    """A stand-in for a pickled class; building one gives an OrderedDict (which the weights-only unpickler fills)."""
    module, _, name = full_name.rpartition(".")

    def __new__(cls, *args, **kwargs):
        return OrderedDict(__placeholder__=full_name)

    return type(name, (), {"__new__": __new__, "__module__": module or "placeholder", "__qualname__": name})


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The tensors of a checkpoint's state dict, and the pickled globals read as placeholders (if any)."""
    path = Path(path)
    if not path.exists():
        raise HistosynthError("checkpoint not found", path)
    if path.is_dir():
        raise HistosynthError("is a directory, not a checkpoint file (a diffusers folder loads as it is)", path)
    placeholders: list[str] = []
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj = load_file(str(path))
        except Exception as exc:
            raise HistosynthError(f"not a readable safetensors file: {exc}", path) from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            obj, placeholders = _load_with_placeholders(path)
        except Exception as exc:  # not a zip/pickle, truncated, ...
            raise HistosynthError(f"not a PyTorch checkpoint: {exc}", path) from None
    return _state_dict_of(obj, path), placeholders


def _load_with_placeholders(path: Path):
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as exc:
        raise HistosynthError(f"not a PyTorch checkpoint: {exc}", path) from None
    if any(n.split(".")[0] in ("os", "sys", "posix", "nt", "subprocess", "builtins") for n in names):
        raise HistosynthError(f"refusing to read a checkpoint that references {', '.join(names)}", path)
    warnings.warn(f"{path}: the checkpoint pickles Python objects ({', '.join(names)}); read them as inert "
                  "placeholders (no code from the file runs) and kept only the tensors", stacklevel=3)
    try:
        with torch.serialization.safe_globals([(_placeholder(n), n) for n in names]):
            return torch.load(path, map_location="cpu", weights_only=True), list(names)
    except Exception as exc:
        raise HistosynthError(
            f"cannot read this checkpoint safely ({exc}); save its state_dict alone with torch.save in a trusted "
            "environment and convert that", path) from None


def _state_dict_of(obj, path: Path) -> dict[str, torch.Tensor]:
    return checkpoint_tensors(obj, path)


# --------------------------------------------------------------------------------------- architecture
def split_first_stage(sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(first-stage tensors under CompVis autoencoder names, keys of everything else)."""
    if any(k.startswith(LDM_PREFIX) for k in sd):  # a full latent-diffusion checkpoint
        first = {k[len(LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(LDM_PREFIX)}
        return first, [k for k in sd if not k.startswith(LDM_PREFIX)]
    first = {k: v for k, v in sd.items() if k.startswith(FIRST_STAGE_PREFIXES)}
    return first, [k for k in sd if k not in first]


def infer_architecture(fs: dict[str, torch.Tensor], source: str | Path = "<state dict>") -> dict:
    """make_autoencoder arguments from the shapes of a CompVis first stage (raises naming `source`)."""
    def need(key):
        if key not in fs:
            raise HistosynthError(f"not a CompVis autoencoder checkpoint: {key} is missing", source)
        return fs[key]

    conv_in, enc_out = need("encoder.conv_in.weight"), need("encoder.conv_out.weight")
    levels = sorted({int(k.split(".")[2]) for k in fs if k.startswith("encoder.down.")})
    if not levels or levels != list(range(len(levels))):
        raise HistosynthError(f"not a CompVis autoencoder checkpoint: encoder levels {levels}", source)
    blocks = {int(k.split(".")[4]) for k in fs if k.startswith("encoder.down.0.block.")}
    enc_attn = {int(m.group(2)) for k in fs if (m := _LEVEL_ATTENTION.match(k)) and m.group(1) == "encoder.down"}
    dec_attn = {int(m.group(2)) for k in fs if (m := _LEVEL_ATTENTION.match(k)) and m.group(1) == "decoder.up"}
    if enc_attn != dec_attn:
        raise HistosynthError(f"attention levels differ between encoder {sorted(enc_attn)} and decoder "
                              f"{sorted(dec_attn)}; diffusers' VQModel/AutoencoderKL cannot hold that", source)
    arch = {
        "in_channels": int(conv_in.shape[1]),
        "out_channels": int(need("decoder.conv_out.weight").shape[0]),
        "block_out_channels": tuple(int(need(f"encoder.down.{i}.block.0.conv1.weight").shape[0]) for i in levels),
        "layers_per_block": len(blocks),
        "attention_levels": tuple(sorted(enc_attn)),
        "mid_block_attention": "encoder.mid.attn_1.q.weight" in fs,
    }
    if "quantize.embedding.weight" in fs:
        emb = fs["quantize.embedding.weight"]
        arch.update(kind="vq", latent_channels=int(enc_out.shape[0]), num_vq_embeddings=int(emb.shape[0]),
                    vq_embed_dim=int(emb.shape[1]))
    else:  # KL: the encoder outputs mean and log-variance ("double_z")
        z = int(enc_out.shape[0]) // 2
        embed = int(need("quant_conv.weight").shape[0]) // 2
        if embed != z:
            raise HistosynthError(f"KL autoencoder with embed_dim {embed} != z_channels {z}: diffusers' "
                                  "AutoencoderKL needs them equal", source)
        arch.update(kind="kl", latent_channels=z)
    return arch


# ------------------------------------------------------------------------------------------ conversion
def _diffusers_state_dict(fs: dict[str, torch.Tensor], arch: dict) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import (
        convert_ldm_vae_checkpoint,
        update_vae_attentions_ldm_to_diffusers,
    )

    levels = len(arch["block_out_channels"])
    level_attn = [k for k in fs if _LEVEL_ATTENTION.match(k)]
    plain = {k: v for k, v in fs.items() if k not in level_attn and not k.startswith("quantize.")}
    # diffusers' converter: encoder/decoder levels, middle blocks + attention, norms, quant convs
    layout = {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    new = convert_ldm_vae_checkpoint(plain, layout)
    # attention inside levels, which that converter leaves out; decoder up.{b} is diffusers' up_blocks.{levels-1-b}
    for k in level_attn:
        side, level, j = _LEVEL_ATTENTION.match(k).groups()
        target = (f"encoder.down_blocks.{level}.attentions.{j}" if side == "encoder.down"
                  else f"decoder.up_blocks.{levels - 1 - int(level)}.attentions.{j}")
        update_vae_attentions_ldm_to_diffusers([k], new, fs, mapping={"old": f"{side}.{level}.attn.{j}", "new": target})
    if "quantize.embedding.weight" in fs:
        new["quantize.embedding.weight"] = fs["quantize.embedding.weight"]
    return new


def convert_compvis_first_stage(
    ckpt_path_or_state_dict: str | Path | dict,
    kind: str | None = None,
    config: dict | None = None,
    strict: bool = True,
):
    """Build a diffusers ``VQModel`` / ``AutoencoderKL`` holding a CompVis first stage.

    Args:
        ckpt_path_or_state_dict: a ``.ckpt`` / ``.pt`` / ``.safetensors`` file, or a state dict, of a CompVis
            autoencoder or of a full LDM (first stage under ``first_stage_model.``).
        kind: "vq" or "kl" to insist on one (an error if the checkpoint is the other); None: inferred.
        config: architecture to take instead of inferring (any ``make_autoencoder`` argument). Fields the
            shapes determine must agree with them; ``norm_num_groups`` (32), ``sample_size`` (256) and
            ``scaling_factor`` are taken as given.
        strict: False leaves weights the checkpoint lacks at their initial values (listed in the report).

    Returns:
        (model, ConversionReport). ``scaling_factor`` is an LDM checkpoint's ``scale_factor`` when it has one,
        else ``config['scaling_factor']``, else 1.0 (the LDM default).
    """
    if isinstance(ckpt_path_or_state_dict, dict):
        source, sd, placeholders = "<state dict>", _state_dict_of(ckpt_path_or_state_dict, Path("<state dict>")), []
    else:
        source = str(ckpt_path_or_state_dict)
        sd, placeholders = read_checkpoint(ckpt_path_or_state_dict)
    fs, skipped = split_first_stage(sd)
    if not fs:
        raise HistosynthError("no first-stage autoencoder weights (encoder.*, decoder.*, or first_stage_model.*); the "
                              f"checkpoint's keys start with: {key_prefixes(sd)}", source)
    arch = infer_architecture(fs, source)
    if kind is not None and kind != arch["kind"]:
        raise HistosynthError(f"expected a {kind!r} autoencoder, the checkpoint holds a {arch['kind']!r} one", source)
    config = dict(config or {})
    conflicts = [f"{k}: checkpoint {arch[k]!r}, asked for {_norm(config[k])!r}"
                 for k in INFERRED if k in config and k in arch and _norm(config[k]) != arch[k]]
    if conflicts:
        raise HistosynthError("checkpoint does not fit the given architecture: " + "; ".join(conflicts), source)
    if "scale_factor" in sd and sd["scale_factor"].numel() == 1:
        scaling, scaling_source = float(sd["scale_factor"]), "the LDM checkpoint's scale_factor"
    elif "scaling_factor" in config:
        scaling, scaling_source = float(config["scaling_factor"]), "given"
    else:
        scaling, scaling_source = 1.0, "LDM default 1.0; recompute on your data before training a diffusion model"
    build = {**{k: v for k, v in config.items() if k not in ("scaling_factor",)}, **arch, "scaling_factor": scaling}
    model = make_autoencoder(**build)

    new = _diffusers_state_dict(fs, arch)
    expected = model.state_dict()
    unexpected = sorted(set(new) - set(expected))
    used = {t.data_ptr() for t in new.values()}
    unused = sorted(k for k, t in fs.items() if t.data_ptr() not in used)
    if unexpected or unused:
        raise HistosynthError(f"checkpoint weights that do not fit the inferred {arch['kind']} architecture: "
                              + ", ".join((unused + unexpected)[:8]) + (" ..." if len(unused + unexpected) > 8 else ""), source)
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}" for k, v in new.items() if v.shape != expected[k].shape]
    if wrong:
        raise HistosynthError("weights with the wrong shape: " + ", ".join(wrong[:8]), source)
    missing = sorted(set(expected) - set(new))
    if missing and strict:
        raise HistosynthError(f"checkpoint lacks {len(missing)} weights of the {arch['kind']} autoencoder: "
                              + ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else ""), source)
    model.load_state_dict(new, strict=False)
    model.eval()
    prefix = LDM_PREFIX if any(k.startswith(LDM_PREFIX) for k in sd) else ""
    report = ConversionReport(
        source=source, kind=arch["kind"], architecture={k: _plain(v) for k, v in arch.items()},
        loaded=sorted(prefix + k for k in fs), skipped=sorted(skipped), missing=missing, placeholders=placeholders,
        scaling_factor=scaling, scaling_factor_source=scaling_source,
    )
    return model, report


def _norm(value):
    return tuple(value) if isinstance(value, list) else value


def _plain(value):
    return list(value) if isinstance(value, tuple) else value
