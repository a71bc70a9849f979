"""What every latent-diffusion conditioner shares at sampling time (PathLDM's text encoder and class token, and the
kinds to come: counts, embedding grids, region masks).

A conditioner is an ``nn.Module`` with
``encode_prompts(prompts) -> Conditioning`` (a batch of user conditions → cross-attention context),
``null_condition(batch) -> Conditioning`` (the ∅ of classifier-free guidance),
``prompt_for_row(entry, path)`` (a prompts-file entry → what ``encode_prompts`` takes),
``manifest_fields(prompt) -> dict`` (what the sample manifest records about it), and
``save_pretrained(DIR)`` writing ``DIR/conditioner.json`` with its ``type``; :func:`load_conditioner` reads
either kind back. Condition dropout in training is the task's (``training/latent_conditions.py``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import torch

from histosynth.errors import HistosynthError

CONFIG_NAME = "conditioner.json"
FORMAT_VERSION = 1
KINDS = ("text", "class")


class Conditioning(NamedTuple):
    """Cross-attention context: ``embeddings`` (B, T, D) and ``attention_mask`` (B, T), 1 = real token."""

    embeddings: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, *args, **kwargs) -> "Conditioning":
        """Move the embeddings (device/dtype) and the mask (device only)."""
        emb = self.embeddings.to(*args, **kwargs)
        return Conditioning(emb, self.attention_mask.to(emb.device))

    @staticmethod
    def cat(items: Sequence["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch (e.g. ``[cond, null]`` for one classifier-free guidance pass)."""
        return Conditioning(torch.cat([c.embeddings for c in items]), torch.cat([c.attention_mask for c in items]))


def read_config(path: Path) -> dict:
    file = path / CONFIG_NAME
    try:
        cfg = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise HistosynthError(f"unreadable conditioner config: {exc}", file) from None
    if not isinstance(cfg, dict) or cfg.get("type") not in KINDS:
        raise HistosynthError("not a histosynth conditioner config (expected type 'text' or 'class')", file)
    return cfg



def load_conditioner(path: str | os.PathLike, **kwargs) -> torch.nn.Module:
    """Load whichever conditioner ``save_pretrained`` wrote into ``path`` (kwargs go to the text loader)."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file():
        raise HistosynthError(f"not a saved conditioner: {CONFIG_NAME} is missing", path)
    from histosynth.conditions.class_token import ClassConditioner
    from histosynth.conditions.text import TextConditioner

    cfg = read_config(path)
    if cfg["type"] == "class":
        return ClassConditioner.from_pretrained(path)
    return TextConditioner.from_pretrained(path, **kwargs)
