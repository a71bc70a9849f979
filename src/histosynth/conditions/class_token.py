"""PathLDM's class-conditional baseline (Sec. 4.2): a learned token per class, trained with the U-Net.

4 classes from the patch's tumour and TIL probabilities (0 low tumor + low TIL, 1 low tumor + high TIL, 2 high
tumor + low TIL, 3 high tumor + high TIL; see :func:`histosynth.conditions.captions.tumor_til_class`), embedded
as one cross-attention token, as in the LDM ``ClassEmbedder``; the null condition is an extra learned row.
Saved as ``DIR/conditioner.json`` (type ``class``) + ``DIR/class_embedding.safetensors``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from histosynth.conditions.conditioning import CONFIG_NAME, FORMAT_VERSION, Conditioning, read_config
from histosynth.errors import DataError, HistosynthError

CLASS_WEIGHTS = "class_embedding.safetensors"


class ClassConditioner(nn.Module):
    """PathLDM's class-conditional baseline: a learned embedding per class plus a null class for CFG.

    ``forward(labels)`` gives one cross-attention token per sample, ``Conditioning((B, 1, dim), ones (B, 1))``.
    Label ``num_classes`` (:attr:`null_index`) is the null class; :meth:`drop_labels` replaces labels by it
    for condition dropout in training. Trained together with the U-Net (it is not frozen).
    """

    def __init__(self, num_classes: int, dim: int, class_names: Sequence[str] | None = None):
        super().__init__()
        if num_classes < 1 or dim < 1:
            raise ValueError(f"num_classes and dim must be >= 1, got {num_classes} and {dim}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.class_names = tuple(class_names) if class_names is not None else None
        self.embedding = nn.Embedding(self.num_classes + 1, self.dim)
        self.class_rule: dict | None = None  # ClassRule fields: how a captions row becomes a class (set by the pipeline)

    @property
    def null_index(self) -> int:
        return self.num_classes

    def forward(self, labels: torch.Tensor | Sequence[int]) -> Conditioning:
        labels = torch.as_tensor(labels, dtype=torch.long, device=self.embedding.weight.device)
        if labels.ndim != 1:
            raise ValueError(f"labels must be 1-D (B,), got shape {tuple(labels.shape)}")
        if labels.numel() and (labels.min() < 0 or labels.max() > self.num_classes):
            raise ValueError(f"labels must lie in 0..{self.num_classes} ({self.num_classes} = null class), "
                             f"got {labels.min().item()}..{labels.max().item()}")
        emb = self.embedding(labels)[:, None, :]
        return Conditioning(emb, torch.ones(labels.shape[0], 1, dtype=torch.long, device=emb.device))

    def class_index(self, prompt) -> int:
        """A class given as its index (3, "3") or its name ("high tumor; high til")."""
        names = list(self.class_names or [])
        if isinstance(prompt, (int, np.integer)) or (isinstance(prompt, str) and prompt.strip().isdigit()):
            c = int(prompt)
        elif isinstance(prompt, str) and prompt.strip() in names:
            c = names.index(prompt.strip())
        else:
            raise HistosynthError(f"unknown class {prompt!r}; this model's classes: "
                                  + ", ".join(f"{i} {n!r}" for i, n in enumerate(names)) if names else
                                  f"unknown class {prompt!r}; give an index 0..{self.num_classes - 1}")
        if not 0 <= c < self.num_classes:
            raise HistosynthError(f"class {c} is outside 0..{self.num_classes - 1}")
        return c

    def encode_prompts(self, prompts: Sequence) -> Conditioning:
        """Class indices or names → (B, 1, dim) context."""
        return self(torch.tensor([self.class_index(p) for p in prompts], dtype=torch.long))

    def prompt_for_row(self, entry: dict, path) -> int:
        """The class of a prompts-file entry: by the rule the model was trained with when the row carries a
        class, tumor/TIL probabilities or counts, else its text as a class name or index."""
        from histosynth.conditions.patch_captions import ClassRule

        rule = ClassRule(**self.class_rule) if self.class_rule else ClassRule()
        try:
            if any(entry.get(k) is not None for k in ("class", "tumor_prob", "counts")):
                return rule.label(entry)
            return self.class_index(entry["prompt"])
        except (TypeError, ValueError) as exc:
            raise DataError(f"line {entry.get('line')}: {exc}", path) from None

    def manifest_fields(self, prompt) -> dict:
        names = list(self.class_names or [])
        c = int(prompt)
        return {"class": c, "class_name": names[c] if c < len(names) else None}

    def null_condition(self, batch: int) -> Conditioning:
        return self(torch.full((batch,), self.null_index, dtype=torch.long))

    def drop_labels(self, labels: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each label by the null class with probability ``p`` (condition dropout for CFG training)."""
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        drop = torch.rand(labels.shape, generator=generator, device=labels.device if generator is None
                          else generator.device) < p
        return torch.where(drop.to(labels.device), torch.full_like(labels, self.null_index), labels)

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        cfg = {"type": "class", "format_version": FORMAT_VERSION, "num_classes": self.num_classes, "dim": self.dim,
               "class_names": list(self.class_names) if self.class_names else None, "null_index": self.null_index}
        save_file({"embedding.weight": self.embedding.weight.detach().cpu().contiguous()}, str(path / CLASS_WEIGHTS))
        (path / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ClassConditioner":
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise HistosynthError(f"not a saved conditioner: {CONFIG_NAME} is missing", path)
        cfg = read_config(path)
        if cfg["type"] != "class":
            raise HistosynthError(f"conditioner is of type {cfg['type']!r}, not 'class'", path / CONFIG_NAME)
        out = cls(int(cfg["num_classes"]), int(cfg["dim"]), cfg.get("class_names"))
        try:
            state = load_file(str(path / CLASS_WEIGHTS))
            out.load_state_dict(state)
        except (OSError, RuntimeError, KeyError) as exc:
            raise HistosynthError(f"missing or corrupt class embedding: {exc}", path / CLASS_WEIGHTS) from None
        return out
