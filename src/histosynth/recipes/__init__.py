"""Typed training recipes: one named field per hyperparameter, loaded from YAML, no `target:` strings.

A recipe is either the name of a built-in (a YAML file next to this module) or a path to a YAML file
with the same fields. Unknown or missing keys are errors that name the file and the key.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from histosynth.errors import HistosynthError

RECIPE_DIR = Path(__file__).parent


@dataclass
class ModelConfig:
    """SemanticUNet architecture (SDM-style: plain encoder, SPADE middle and decoder)."""

    block_out_channels: tuple[int, ...] = (128, 128, 256, 256, 512)
    layers_per_block: int = 2
    attention_resolutions: tuple[int, ...] = (32, 16, 8)
    num_head_channels: int = 64
    dropout: float = 0.0
    norm_num_groups: int = 32
    spade_hidden: int = 128


@dataclass
class DiffusionConfig:
    """DDPM forward process and objective (NASDM Sec. 3.3 / 4.1)."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02
    learn_sigma: bool = True  # "learned range" variance, trained by the L_vlb term
    lambda_vlb: float = 0.001  # λ in L_hybrid = L_simple + λ·L_vlb


@dataclass
class Stage:
    """A phase of training with its own learning rate and condition dropout (NASDM: 1e-4, then 2e-5 @ 0.2)."""

    name: str
    steps: int
    learning_rate: float
    condition_dropout: float


@dataclass
class TrainConfig:
    batch_size: int = 40  # per device (NASDM: 40 per GPU on 4 A100)
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    ema_decay: float = 0.999
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16" (accelerate)
    random_flips: bool = True  # H&E has no canonical orientation: random flips and 90° rotations
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2
    log_every: int = 50
    seed: int = 0
    num_workers: int = 2


@dataclass
class NASDMRecipe:
    name: str
    method: str
    description: str
    patch_size: int
    magnification: str
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    stages: list[Stage] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def total_steps(self) -> int:
        return sum(s.steps for s in self.stages)

    def stage_at(self, step: int) -> Stage:
        """The stage that optimisation step `step` (0-based) belongs to; the last stage continues past the end."""
        end = 0
        for stage in self.stages:
            end += stage.steps
            if step < end:
                return stage
        return self.stages[-1]

    def to_dict(self) -> dict:
        return asdict(self)


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


# method name (the `method:` key of a recipe) -> its typed recipe class; other methods register theirs
RECIPE_TYPES: dict[str, type] = {"nasdm": NASDMRecipe}


def register_recipe_type(method: str, cls: type) -> None:
    """Make recipes with ``method: <method>`` load as dataclass ``cls`` (which must have a ``method`` field)."""
    RECIPE_TYPES[method] = cls


def load_recipe(name_or_path: str | Path):
    path = Path(name_or_path)
    if not path.suffix:  # a built-in name
        path = RECIPE_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise HistosynthError(
                f"unknown recipe {name_or_path!r}; built-in recipes: {', '.join(builtin_recipes())} "
                "(or pass the path of a recipe YAML file)"
            )
    if not path.exists():
        raise HistosynthError("recipe file not found", path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise HistosynthError(f"not valid YAML: {exc}", path) from None
    if not isinstance(raw, dict):
        raise HistosynthError("a recipe must be a mapping of fields", path)
    return recipe_from_dict(raw, source=path)


def recipe_from_dict(raw: dict, source: str | Path = "<recipe>"):
    """Build the typed recipe named by ``raw['method']`` (NASDM when absent)."""
    method = raw.get("method", "nasdm") if isinstance(raw, dict) else "nasdm"
    if method not in RECIPE_TYPES:
        raise HistosynthError(f"unknown recipe method {method!r}; known: {', '.join(sorted(RECIPE_TYPES))}", source)
    return _build(RECIPE_TYPES[method], raw, source, "")


def _build(cls, raw, source, where):
    """Build dataclass `cls` from a mapping, refusing unknown and missing keys (typos must not pass silently)."""
    if not isinstance(raw, dict):
        raise HistosynthError(f"{where or 'recipe'} must be a mapping", source)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(raw) - set(fields)
    if unknown:
        raise HistosynthError(
            f"unknown recipe key(s) {', '.join(sorted(where + k for k in unknown))}; "
            f"known: {', '.join(sorted(where + k for k in fields))}",
            source,
        )
    values = {}
    for name, f in fields.items():
        if name not in raw:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise HistosynthError(f"missing recipe key {where + name}", source)
            continue
        values[name] = _convert(hints[name], raw[name], source, where + name)
    return cls(**values)


def _convert(hint, value, source, where):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, where + ".")
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise HistosynthError(f"{where} must be a list", source)
        return [_convert(item, v, source, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise HistosynthError(f"{where} must be a list", source)
        args = typing.get_args(hint)
        item = args[0] if args else int
        if item not in (int, float, str):
            item = int
        return tuple(_convert(item, v, source, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise HistosynthError(f"{where} must be {hint.__name__}, got {value!r}", source)
    return value

# recipe types of other methods register themselves on import (after everything above is defined)
from histosynth.recipes import autoencoder as _autoencoder  # noqa: E402,F401
from histosynth.recipes import latent as _latent  # noqa: E402,F401  (method "ldm": LatentDiffusionRecipe)
