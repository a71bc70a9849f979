"""The recipe loader and what every recipe shares.

A recipe is a typed dataclass, one named field per hyperparameter, read from YAML: the name of a built-in
(a YAML file next to this module) or a path. Unknown or missing keys, values of the wrong type, a choice
outside its ``Literal`` and every method-specific rule (``Recipe.problems``) are errors that name the file
and the field, raised when the recipe is loaded. ``method:`` says which recipe type reads the rest; the
method registry (:mod:`histosynth.methods`) adds a plug-in's type with :func:`register_recipe_type`.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar, Literal

import yaml

from histosynth.errors import HistosynthError

RECIPE_DIR = Path(__file__).parent
MixedPrecision = Literal["no", "fp16", "bf16"]  # accelerate's names

#: method name -> its recipe type (built-ins are added by ``histosynth.recipes``; plug-ins by the registry)
RECIPE_TYPES: dict[str, type] = {}
#: earlier method names still read from user YAML files and saved runs
METHOD_ALIASES = {"ldm": "pathldm"}


@dataclass(kw_only=True)
class EngineConfig:
    """The training engine's fields, the same for every method (each method's ``train:`` section extends it
    and may change the defaults). AdamW, accelerate, EMA through diffusers' ``EMAModel``."""

    batch_size: int = 8  # per device
    gradient_accumulation_steps: int = 1
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    ema_decay: float | None = 0.999  # null: no averaging (the exported weights are the trained ones)
    max_grad_norm: float = 1.0  # 0 = no clipping; each parameter group (network) is clipped on its own
    mixed_precision: MixedPrecision = "no"
    checkpoint_every: int = 5000
    keep_checkpoints: int = 2  # the newest N, plus any the divergence watch holds (training/divergence.py)
    log_every: int = 50
    seed: int = 0
    num_workers: int = 2  # DataLoader workers
    # recompute activations in the backward pass (diffusers' enable_gradient_checkpointing): less memory (the
    # paper-size UNets on a 24 GiB GPU), about a third more compute per step; same gradients
    gradient_checkpointing: bool = False

    def problems(self, where: str = "train.") -> list[str]:
        out = [f"{where}{name} must be at least 1, got {getattr(self, name)}"
               for name in ("batch_size", "gradient_accumulation_steps", "checkpoint_every", "keep_checkpoints", "log_every")
               if getattr(self, name) < 1]
        if self.ema_decay is not None and not 0.0 <= self.ema_decay < 1.0:
            out.append(f"{where}ema_decay must be null or in [0, 1), got {self.ema_decay}")
        if self.max_grad_norm < 0 or self.weight_decay < 0 or self.num_workers < 0:
            out.append(f"{where}max_grad_norm, weight_decay and num_workers must not be negative")
        return out


# the sampling schedulers a recipe or `sample --scheduler` may name (histosynth.diffusion.schedulers.SCHEDULERS)
SchedulerName = Literal["ddpm", "ddim", "dpm-solver++", "sde-dpm-solver++", "unipc", "deis", "euler", "euler-ancestral",
                        "lms"]


@dataclass
class ForwardProcessConfig:
    """The diffusion forward process: T steps of a β schedule (diffusers' names)."""

    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = 1e-4
    beta_end: float = 0.02


@dataclass(kw_only=True)
class Recipe:
    """Base of every method's recipe: its name, method and description; ``problems()`` lists broken rules."""

    METHOD: ClassVar[str] = ""
    name: str
    method: str
    description: str = ""

    def __post_init__(self) -> None:
        problems = ([] if self.method == self.METHOD else [f"method must be {self.METHOD!r}, got {self.method!r}"])
        problems += self.problems()
        if problems:
            raise HistosynthError(f"recipe {self.name!r}: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """What is wrong with the values (each a phrase naming the field); empty when the recipe is usable."""
        return []

    @property
    def total_steps(self) -> int:
        """Optimisation steps of a full run (default: ``train.steps``)."""
        return self.train.steps

    def to_dict(self) -> dict:
        return asdict(self)


def register_recipe_type(cls: type) -> type:
    """Make recipes with ``method: cls.METHOD`` load as ``cls`` (a :class:`Recipe` dataclass)."""
    if not (isinstance(cls, type) and issubclass(cls, Recipe) and cls.METHOD):
        raise TypeError(f"{cls!r} is not a Recipe dataclass with a METHOD")
    RECIPE_TYPES[cls.METHOD] = cls
    return cls


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | Path):
    """A built-in recipe by name, or a recipe YAML file; every error names the file and the field."""
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
    """Build and check the typed recipe named by ``raw['method']`` (NASDM when absent)."""
    if not isinstance(raw, dict):
        raise HistosynthError("a recipe must be a mapping of fields", source)
    method = raw.get("method", "nasdm")
    if method in METHOD_ALIASES:
        raw = {**raw, "method": METHOD_ALIASES[method]}
        method = raw["method"]
    if method not in RECIPE_TYPES:
        raise HistosynthError(f"unknown recipe method {method!r}; known: {', '.join(sorted(RECIPE_TYPES))}", source)
    try:
        return _build(RECIPE_TYPES[method], raw, source, "")
    except HistosynthError as exc:
        if exc.path is None:  # a rule broken in __post_init__: say which file
            raise HistosynthError(str(exc), source) from None
        raise


def _build(cls, raw, source, where):
    """Build dataclass `cls` from a mapping, refusing unknown and missing keys (typos must not pass silently)."""
    if not isinstance(raw, dict):
        raise HistosynthError(f"{where.rstrip('.') or 'recipe'} must be a mapping", source)
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
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, where + ".")
    if origin is Literal:
        if value not in args:
            raise HistosynthError(f"{where} must be one of {args}, got {value!r}", source)
        return value
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None and type(None) in args:
            return None
        (arm,) = [a for a in args if a is not type(None)]
        return _convert(arm, value, source, where)
    if origin is list:
        if not isinstance(value, list):
            raise HistosynthError(f"{where} must be a list", source)
        return [_convert(args[0], v, source, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise HistosynthError(f"{where} must be a list", source)
        item = args[0] if args else int
        return tuple(_convert(item, v, source, f"{where}[{i}]") for i, v in enumerate(value))
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint in (int, str, bool, float) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise HistosynthError(f"{where} must be {hint.__name__}, got {value!r}", source)
    return value
