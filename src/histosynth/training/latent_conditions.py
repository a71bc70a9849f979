"""The training side of latent-diffusion conditioning: one interface, one class per kind of condition.

A :class:`TrainingConditioning` turns the captions rows of each training patch into condition values,
prepares what is computed once (caches), says what the denoiser trains with the UNet (``trainable()``), and
builds the denoiser's condition input of a micro-batch with condition dropout (dropped samples get the null
condition: classifier-free guidance, PathLDM Sec. 3.2). Its ``conditioner()`` is what the pipeline saves
and encodes prompts with at sampling time. Kinds are looked up in :data:`CONDITIONINGS` by the recipe's
``conditioner.kind``: a new kind (counts, embedding grids, region masks) is a new class and a new entry.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from histosynth.conditions.patch_captions import ClassRule
from histosynth.conditions.text import ClassConditioner, TextConditioner
from histosynth.diffusion import latent_cache as cache
from histosynth.errors import DataError, HistosynthError


def resolve_path(value: str, data: Path) -> Path:
    """A recipe path: ``{data}`` is the patch store; relative paths are relative to the working directory."""
    return Path(str(value).replace("{data}", str(data))).expanduser()


class TrainingConditioning:
    """Base: see the module docstring. ``cfg`` is the recipe's ``conditioner`` section."""

    def __init__(self, recipe, data: Path):
        self.recipe, self.cfg, self.data = recipe, recipe.conditioner, data

    def values(self, indices: list[int], rows: list[list[dict]], source: Path) -> list[list]:
        """Per training patch (store index, its captions rows), the condition values (one is drawn per step)."""
        raise NotImplementedError

    def setup(self, accelerator, cache_dir: Path, progress: bool) -> None:
        """Compute-once work (the main process writes, the others read)."""

    def trainable(self) -> torch.nn.Module | None:
        """A module trained with the UNet that maps the condition input to context (None: the input is context)."""
        return None

    def batch(self, values: list, drop: list[bool]) -> torch.Tensor:
        """The denoiser's condition input of a micro-batch, the null condition where ``drop``."""
        raise NotImplementedError

    def conditioner(self, trained: torch.nn.Module | None):
        """What the pipeline saves and encodes prompts with (``trained``: the EMA copy of :meth:`trainable`)."""
        raise NotImplementedError

    def pipeline_config(self) -> dict:
        return {}


class TextConditioning(TrainingConditioning):
    """PathLDM: a frozen text encoder; caption embeddings computed once (``RUN/cache``), dropout → the empty caption."""

    def __init__(self, recipe, data: Path):
        super().__init__(recipe, data)
        name = self.cfg.text_encoder
        local = resolve_path(name, data)
        self.text = TextConditioner.from_pretrained(str(local) if local.exists() else name, max_tokens=self.cfg.max_tokens)
        if self.text.hidden_size != recipe.unet.cross_attention_dim:
            raise HistosynthError(f"recipe {recipe.name!r}: unet.cross_attention_dim is {recipe.unet.cross_attention_dim} "
                                  f"but text encoder {name!r} gives {self.text.hidden_size}-d embeddings")

    def values(self, indices, rows, source):
        missing = [i for i, r in zip(indices, rows) if any(not isinstance(x.get("caption"), str) for x in r)]
        if missing:
            raise DataError(f"patch {missing[0]} has a row without a 'caption' string", source)
        self.distinct = sorted({x["caption"] for r in rows for x in r})
        position = {c: i for i, c in enumerate(self.distinct)}
        return [[position[x["caption"]] for x in r] for r in rows]  # per patch: caption ids

    def setup(self, accelerator, cache_dir, progress):
        if accelerator.is_main_process:
            cache.text_cache(cache_dir, self.text, self.distinct, progress=progress)
        accelerator.wait_for_everyone()
        self.embeddings = cache.text_cache(cache_dir, self.text, self.distinct, build=False)
        self.null_id = len(self.distinct)  # the cache's last row: the empty caption

    def batch(self, values, drop):
        return torch.from_numpy(np.stack([self.embeddings[self.null_id if d else v] for v, d in zip(values, drop)]))

    def conditioner(self, trained):
        return self.text


class ClassConditioning(TrainingConditioning):
    """PathLDM's class baseline: a class per row (ClassRule), a learned class token, dropout → the null class."""

    def __init__(self, recipe, data: Path):
        super().__init__(recipe, data)
        c = self.cfg
        self.rule = ClassRule(num_classes=c.num_classes, threshold=c.class_threshold, tumor_type=c.tumor_type,
                              til_type=c.til_type, count_threshold=c.count_threshold)

    def values(self, indices, rows, source):
        flat = [x for r in rows for x in r]
        self.class_names = self.rule.class_names(flat)
        it = iter(self.rule.labels(flat, source))
        return [[next(it) for _ in r] for r in rows]  # per patch: class labels

    def trainable(self):
        return ClassConditioner(self.cfg.num_classes, self.recipe.unet.cross_attention_dim, self.class_names)

    def batch(self, values, drop):
        return torch.tensor([self.cfg.num_classes if d else v for v, d in zip(values, drop)], dtype=torch.long)

    def conditioner(self, trained):
        return trained

    def pipeline_config(self):
        return {"class_rule": self.rule.to_dict()}


#: recipe ``conditioner.kind`` -> its training conditioning
CONDITIONINGS: dict[str, type[TrainingConditioning]] = {"text": TextConditioning, "class": ClassConditioning}
