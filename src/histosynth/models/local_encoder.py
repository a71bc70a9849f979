"""Local image encoders read from files, e.g. a pathology self-supervised encoder (UNI, Virchow, CTransPath, HIPT).

Shared by the FID / KID feature extractor (:mod:`histosynth.evaluate.local_encoder`, ``--features PATH``) and the
slide-tile encoder of ZoomLDM's conditioning (:mod:`histosynth.models.ssl_encoder`, ``histosynth embed --encoder``).
Three layouts are read, all from local files (nothing is downloaded):

a) **TorchScript** file (``torch.jit.save``; any suffix, usually ``.pt`` / ``.torchscript``): the module is called
   on the normalised image batch and must return ``(B, D)`` features (a tuple/list: its first element).
b) **timm folder**, the way UNI / Virchow-style encoders are distributed: ``config.json`` plus ``model.safetensors``
   (preferred) or ``pytorch_model.bin``. The weights go into ``timm.create_model(architecture, pretrained=False,
   num_classes=0, **model_args)`` and the pooled (pre-classifier) features are used. ``config.json`` is either our
   flat form ``{"architecture": "resnet50", "input_size": 224, "mean": [..], "std": [..], "pool": "avg",
   "interpolation": "bilinear", "model_args": {..}}`` (only ``architecture`` required) or timm's hub form
   (``architecture``, ``model_args``, ``pretrained_cfg: {input_size: [3, H, W], mean, std, interpolation}``).
c) a **weight file** (``.safetensors`` or a ``torch.save`` state dict) plus an explicit timm ``architecture``
   (an argument, or ``"architecture"`` in a ``<file>.json`` beside it).

Preprocessing (all layouts): ``uint8/255``, the whole image resized to ``input_size`` (no crop) with
``F.interpolate(mode=interpolation, antialias=True)`` (bicubic results clamped to [0, 1], as a uint8 resize would),
then ``(x - mean) / std``. Its values come from ``config.json`` (b) or a ``<file>.json`` beside the file (a, c: same
keys, ``architecture`` included), else the defaults: timm's ``pretrained_cfg`` of the architecture
(b, c) or 224 px, bilinear, ImageNet mean/std (a); for a file, explicit arguments override its ``<file>.json``.
Everything that changes the numbers goes into the protocol.

Weights are loaded strictly: a missing key, an unexpected key or a shape mismatch is a :class:`HistosynthError`
naming the file and listing the keys (up to 10 of each kind). The only keys allowed to be left over are those of
the trained classifier head (``num_classes=0`` removes it); they are reported as ``ignored``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histosynth.errors import HistosynthError
from histosynth.models.efficientnet_lite0 import file_sha256

__all__ = [
    "LoadedEncoder",
    "LoadReport",
    "Preprocessing",
    "load_encoder_files",
    "read_state_dict",
    "WEIGHT_FILES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "INTERPOLATIONS",
]

#: weight file names looked for in a timm folder, in this order
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
INTERPOLATIONS = ("bilinear", "bicubic")
MAX_LISTED_KEYS = 10


def _list_keys(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown + (f", ... ({len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else "")


# --------------------------------------------------------------------------------------------- preprocessing
@dataclass(frozen=True)
class Preprocessing:
    """How uint8 images become the encoder's input: resize (whole image, no crop), then normalise."""

    input_size: tuple[int, int] = (224, 224)
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"

    @classmethod
    def from_values(cls, input_size=None, mean=None, std=None, interpolation=None, *, default: "Preprocessing",
                    where: str | Path) -> "Preprocessing":
        """Validated values (``None``: the default's); ``where`` names the file they came from, for errors."""
        try:
            size = default.input_size if input_size is None else _parse_size(input_size)
            mean = default.mean if mean is None else tuple(float(v) for v in mean)
            std = default.std if std is None else tuple(float(v) for v in std)
        except (TypeError, ValueError) as e:
            raise HistosynthError(f"invalid input_size / mean / std ({e})", where) from e
        interp = default.interpolation if interpolation is None else str(interpolation).lower()
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise HistosynthError(f"mean and std need 3 values each (std > 0), got mean={mean} std={std}", where)
        if interp not in INTERPOLATIONS:
            raise HistosynthError(f"interpolation {interp!r} is not supported (use one of {INTERPOLATIONS})", where)
        return cls(size, mean, std, interp)

    def apply(self, images: torch.Tensor, mean: torch.Tensor | None = None,
              std: torch.Tensor | None = None) -> torch.Tensor:
        """``uint8 (B, 3, H, W)`` -> float32 ``(B, 3, *input_size)``: /255, resize (antialiased), (x - mean) / std.

        ``mean`` / ``std``: ``(1, 3, 1, 1)`` tensors on the images' device (built from the fields when None).
        """
        x = images.to(torch.float32) / 255.0
        if tuple(x.shape[-2:]) != tuple(self.input_size):
            x = F.interpolate(x, size=self.input_size, mode=self.interpolation, align_corners=False, antialias=True)
            if self.interpolation == "bicubic":
                x = x.clamp(0.0, 1.0)
        if mean is None:
            mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        if std is None:
            std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def protocol(self) -> dict[str, Any]:
        h, w = self.input_size
        return {
            "input_size": [h, w],
            "resize": f"{self.interpolation}, antialias, whole image to {h}x{w} (no crop)"
            + (", clamped to [0, 1]" if self.interpolation == "bicubic" else ""),
            "normalization": {"scale": "uint8/255", "mean": list(self.mean), "std": list(self.std)},
        }


def _parse_size(value) -> tuple[int, int]:
    """224, [224, 224] or timm's [3, 224, 224] -> (224, 224)."""
    if isinstance(value, (int, float)):
        h = w = int(value)
    else:
        v = [int(x) for x in value]
        if len(v) == 3:
            v = v[1:]
        if len(v) != 2:
            raise ValueError(f"input_size must be N, [H, W] or [3, H, W], got {value!r}")
        h, w = v
    if h < 1 or w < 1:
        raise ValueError(f"input_size must be positive, got {value!r}")
    return h, w


def timm_preprocessing(model: nn.Module, where: str | Path = "timm pretrained_cfg") -> Preprocessing:
    """The preprocessing of a timm model's ``pretrained_cfg`` (input size, mean, std, interpolation), else defaults."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return Preprocessing.from_values(cfg.get("input_size"), cfg.get("mean"), cfg.get("std"), cfg.get("interpolation"),
                                     default=Preprocessing(), where=where)


# ------------------------------------------------------------------------------------------------- loading
@dataclass
class LoadReport:
    """What was loaded, from where, and which weight keys did not fit (``ignored``: the dropped classifier)."""

    kind: str  # "torchscript" | "timm-folder" | "timm-weights"
    path: str
    weights_file: str
    architecture: str
    tensors_loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    preprocessing_from: str = ""

    def summary(self) -> str:
        parts = [f"loaded {self.kind} encoder {self.architecture} from {self.weights_file}"]
        if self.kind != "torchscript":
            parts.append(f"{self.tensors_loaded} tensors, {len(self.missing)} missing, {len(self.unexpected)} unexpected")
        if self.ignored:
            parts.append(f"ignored classifier keys: {_list_keys(self.ignored)}")
        parts.append(f"preprocessing from {self.preprocessing_from}")
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class LoadedEncoder:
    """A local encoder read from its files: the network (frozen by the caller), its preprocessing, the protocol
    (everything that changes the numbers; ``weights`` is ``sha256:...`` of the weight file) and the load report."""

    model: nn.Module
    preprocessing: Preprocessing
    protocol: dict[str, Any]
    report: LoadReport

    @property
    def weights_sha256(self) -> str:
        return str(self.protocol["weights"]).removeprefix("sha256:")


def load_encoder_files(
    path: str | Path,
    architecture: str | None = None,
    *,
    input_size: int | tuple[int, int] | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
    interpolation: str | None = None,
    pool: str | None = None,
    option: str = "--features",
    arch_option: str = "--features-arch",
) -> LoadedEncoder:
    """Read a local encoder (see the module docstring for the layouts); nothing is run yet.

    Args:
        path: a TorchScript file, a timm folder (``config.json`` + weights), or a weight file (with ``architecture``).
        architecture: timm model name for a bare weight file; refused for the other layouts.
        input_size, mean, std, interpolation: preprocessing for a file (override its ``<file>.json``).
        pool: timm ``global_pool`` for a bare weight file (default: the architecture's).
        option, arch_option: the command-line options named in error messages.

    Raises:
        HistosynthError: missing path, unreadable file, unknown architecture, weights that do not fit (strict).
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise HistosynthError(f"local encoder not found ({option})", p)
    if p.name == "config.json" and p.is_file():  # the config of a timm folder: the folder
        p = p.parent
    explicit = dict(input_size=input_size, mean=mean, std=std, interpolation=interpolation)
    if p.is_dir():
        if architecture is not None or pool is not None or any(v is not None for v in explicit.values()):
            raise HistosynthError("a timm folder takes its architecture and preprocessing from its config.json "
                                  f"({arch_option} is for a bare weight file)", p)
        return _load_timm_folder(p)
    sidecar = p.with_suffix(".json") if p.suffix != ".json" else None
    side = _read_json(sidecar) if sidecar is not None and sidecar.is_file() else {}
    if architecture is None and "architecture" not in side:
        if p.suffix in (".safetensors", ".bin"):
            raise HistosynthError(f"a bare weight file needs its timm architecture ({arch_option} NAME)", p)
        return _load_torchscript(p, side, sidecar, explicit, arch_option)
    arch = architecture or side.get("architecture")
    return _load_timm_weights(p, str(arch), side, sidecar, explicit, pool)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HistosynthError(f"cannot read the encoder configuration: {e}", path) from e
    if not isinstance(cfg, dict):
        raise HistosynthError("the encoder configuration must be a JSON object", path)
    return cfg


def _file_preprocessing(side: dict, sidecar: Path | None, explicit: dict, default: Preprocessing, what: str,
                        path: Path) -> tuple[Preprocessing, str]:
    """Preprocessing of a file: explicit arguments, else its ``<file>.json``, else ``default`` (named ``what``)."""
    keys = ("input_size", "mean", "std", "interpolation")
    if side:
        default = Preprocessing.from_values(*(side.get(k) for k in keys), default=default, where=sidecar)
    prep = Preprocessing.from_values(**explicit, default=default, where=path)
    given = [k for k in keys if explicit.get(k) is not None]
    from_side = [k for k in keys if k not in given and side.get(k) is not None]
    rest = [k for k in keys if k not in given and k not in from_side]
    sources = ([f"arguments ({', '.join(given)})"] if given else []) + ([sidecar.name] if from_side else [])
    if rest:
        sources.append(what if len(rest) == len(keys) else f"{what} for {', '.join(rest)}")
    return prep, ", ".join(sources)


def _load_torchscript(path: Path, side: dict, sidecar: Path | None, explicit: dict, arch_option: str) -> LoadedEncoder:
    try:
        with warnings.catch_warnings():  # torch >= 2.10 marks TorchScript deprecated; it is still how encoders ship
            warnings.simplefilter("ignore", FutureWarning)
            model = torch.jit.load(str(path), map_location="cpu")
    except Exception as e:  # RuntimeError for a non-TorchScript zip / garbage, ValueError, OSError ...
        raise HistosynthError(
            f"cannot load a TorchScript encoder ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            f"a state dict needs its timm architecture ({arch_option} NAME)", path
        ) from e
    prep, source = _file_preprocessing(side, sidecar, explicit, Preprocessing(), "defaults (224 px, bilinear, "
                                       "ImageNet mean/std)", path)
    report = LoadReport("torchscript", str(path), path.name, "TorchScript module", preprocessing_from=source)
    protocol = {
        "extractor": "local-torchscript",
        "architecture": f"TorchScript module ({getattr(model, 'original_name', 'unknown')})",
        "weights": f"sha256:{file_sha256(path)}",
        "weights_file": path.name,
        **prep.protocol(),
        "layer": "output of the TorchScript module",
    }
    return LoadedEncoder(model, prep, protocol, report)


def _load_timm_folder(folder: Path) -> LoadedEncoder:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise HistosynthError("a local encoder folder needs config.json (timm architecture + preprocessing)", folder)
    cfg = _read_json(cfg_path)
    pre = cfg.get("pretrained_cfg") if isinstance(cfg.get("pretrained_cfg"), dict) else cfg  # timm hub or flat form
    arch = cfg.get("architecture") or pre.get("architecture")
    if not isinstance(arch, str) or not arch:
        raise HistosynthError("config.json has no \"architecture\" (a timm model name)", cfg_path)
    model_args = cfg.get("model_args", {})
    if not isinstance(model_args, dict):
        raise HistosynthError("\"model_args\" in config.json must be an object", cfg_path)
    weights = next((folder / n for n in WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise HistosynthError(f"no weights in the encoder folder (expected {' or '.join(WEIGHT_FILES)})", folder)
    model = create_timm(arch, model_args, cfg.get("pool"), cfg_path)
    default = timm_preprocessing(model)
    prep = Preprocessing.from_values(pre.get("input_size"), pre.get("mean"), pre.get("std"), pre.get("interpolation"),
                                     default=default, where=cfg_path)
    missing = [k for k in ("input_size", "mean", "std", "interpolation") if pre.get(k) is None]
    source = "config.json" + (f" (timm defaults for {', '.join(missing)})" if missing else "")
    return _timm_loaded("timm-folder", folder, weights, arch, model, model_args, cfg.get("pool"), prep, source)


def _load_timm_weights(path: Path, arch: str, side: dict, sidecar: Path | None, explicit: dict,
                       pool: str | None) -> LoadedEncoder:
    model_args = side.get("model_args", {}) if side else {}
    pool = pool if pool is not None else side.get("pool")
    model = create_timm(arch, model_args, pool, sidecar or path)
    prep, source = _file_preprocessing(side, sidecar, explicit, timm_preprocessing(model),
                                       f"timm's defaults for {arch}", path)
    return _timm_loaded("timm-weights", path, path, arch, model, model_args, pool, prep, source)


def create_timm(arch: str, model_args: dict, pool: str | None, where: str | Path, pretrained: bool = False) -> nn.Module:
    """``timm.create_model(arch, pretrained=pretrained, num_classes=0, **model_args)``; errors name ``where``."""
    import timm

    kwargs = dict(model_args, pretrained=pretrained, num_classes=0)
    if pool is not None:
        kwargs["global_pool"] = pool
    try:
        return timm.create_model(arch, **kwargs)
    except RuntimeError as e:  # "Unknown model (...)"
        raise HistosynthError(f"cannot build timm model {arch!r}: {e}", where) from e
    except (TypeError, ValueError, AssertionError, KeyError) as e:  # bad model_args / pool
        raise HistosynthError(f"cannot build timm model {arch!r} with {kwargs}: {e!r}", where) from e


def _timm_loaded(kind: str, src: Path, weights: Path, arch: str, model: nn.Module, model_args: dict,
                 pool: str | None, prep: Preprocessing, source: str) -> LoadedEncoder:
    report = LoadReport(kind, str(src), weights.name, f"timm {arch}", preprocessing_from=source)
    _load_strict(model, read_state_dict(weights), weights, arch, report)
    layer = "timm pooled features before the classifier (num_classes=0"
    layer += f", global_pool={pool!r})" if pool is not None else ", the architecture's global_pool)"
    protocol = {
        "extractor": "local-timm",
        "architecture": f"timm {arch}",
        "model_args": json.loads(json.dumps(dict(model_args, **({"global_pool": pool} if pool is not None else {})))),
        "weights": f"sha256:{file_sha256(weights)}",
        "weights_file": weights.name,
        **prep.protocol(),
        "layer": layer,
    }
    return LoadedEncoder(model, prep, protocol, report)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from a ``.safetensors`` file or a ``torch.save`` checkpoint (``weights_only``).

    Weights nested under ``state_dict`` / ``model`` / ``ema`` / ... are found and a ``module.`` / ``_orig_mod.``
    prefix on every key is removed (:func:`histosynth.models.checkpoint_layout.checkpoint_tensors`).
    """
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd = load_file(str(path), device="cpu")
        else:
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # safetensors / pickle / zip errors of many kinds
        raise HistosynthError(f"cannot read the encoder weights: {str(e).splitlines()[0] if str(e) else e!r}",
                              path) from e
    from histosynth.models.checkpoint_layout import checkpoint_tensors

    return checkpoint_tensors(sd, path)


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names)


def _load_strict(model: nn.Module, sd: dict[str, torch.Tensor], path: Path, arch: str, report: LoadReport) -> None:
    target = model.state_dict()
    head = _classifier_prefixes(model)
    missing = [k for k in target if k not in sd]
    extra = [k for k in sd if k not in target]
    ignored = [k for k in extra if k.startswith(head)] if head else []
    unexpected = [k for k in extra if k not in ignored]
    shapes = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    report.missing, report.unexpected, report.ignored = missing, unexpected, ignored
    if missing or unexpected or shapes:
        problems = [f"{name} ({len(keys)}): {_list_keys(keys)}"
                    for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                       ("shape mismatches (file vs model)", shapes)) if keys]
        raise HistosynthError(f"the weights do not fit timm {arch} (num_classes=0): " + "; ".join(problems), path)
    model.load_state_dict({k: sd[k] for k in target}, strict=True)
    report.tensors_loaded = len(target)
