"""Where the weights are inside checkpoints saved by other trainers: nested under a key, behind a wrapper prefix.

Lightning saves ``{"state_dict": ...}``, many loops ``{"model": ...}`` or ``{"ema": ...}``, DDP prefixes every key
with ``module.``, ``torch.compile`` with ``_orig_mod.``. :func:`checkpoint_tensors` finds the tensors whatever the
layout, and when there are none says what the file holds.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import torch

from histosynth.errors import HistosynthError

__all__ = ["STATE_KEYS", "WRAPPER_PREFIXES", "checkpoint_tensors", "key_prefixes", "strip_wrapper_prefixes"]

#: keys under which trainers nest the weights (Lightning, DDP / timm / custom loops, EMA copies), in preference order
STATE_KEYS = ("state_dict", "model", "model_state_dict", "module", "net", "network", "ema", "model_ema", "state",
              "params", "weights")
#: prefixes wrappers put before every key: DDP / DataParallel ("module."), torch.compile ("_orig_mod.")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _tensors(obj) -> dict[str, torch.Tensor]:
    return {k: v for k, v in obj.items() if isinstance(k, str) and torch.is_tensor(v)} if isinstance(obj, dict) else {}


def _unwrap(obj, depth: int = 0):
    """The dict of tensors inside a checkpoint: the top level when it holds tensors, else the first of STATE_KEYS
    (then any dict value) that does, looked for two levels down."""
    if _tensors(obj) or not isinstance(obj, dict) or depth > 2:
        return obj
    keys = [k for k in STATE_KEYS if isinstance(obj.get(k), dict)] + [
        k for k, v in obj.items() if isinstance(v, dict) and k not in STATE_KEYS]
    for key in keys:
        inner = _unwrap(obj[key], depth + 1)
        if _tensors(inner):
            return inner
    return obj


def strip_wrapper_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without a wrapper prefix that *every* key carries ("module." of DDP, "_orig_mod." of torch.compile)."""
    changed = True
    while changed and sd:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd, changed = {k[len(prefix):]: v for k, v in sd.items()}, True
    return sd


def key_prefixes(sd: dict, most: int = 8) -> str:
    """'encoder (120), decoder (140), ...': the first two dotted parts of the keys and how many keys each has."""
    counts = Counter(".".join(str(k).split(".")[:2]) for k in sd)
    shown = ", ".join(f"{p} ({n})" for p, n in counts.most_common(most))
    return shown + (f" and {len(counts) - most} more" if len(counts) > most else "")


def checkpoint_tensors(obj, path: str | Path) -> dict[str, torch.Tensor]:
    """``{name: tensor}`` of a loaded checkpoint: its top level when that holds tensors, else the first of
    STATE_KEYS (then any other dict value, two levels down) that does; a wrapper prefix every key carries removed.

    Raises:
        HistosynthError naming ``path``: not a mapping, or no tensors anywhere looked (the top-level keys listed).
    """
    inner = _unwrap(obj)
    if not isinstance(inner, dict):
        raise HistosynthError(f"not a checkpoint with a state dict (holds a {type(inner).__name__})", path)
    tensors = _tensors(inner)
    if not tensors:
        top = ", ".join(map(str, list(obj)[:12])) if isinstance(obj, dict) else type(obj).__name__
        raise HistosynthError(f"the checkpoint holds no tensors at its top level or under {', '.join(STATE_KEYS)} "
                              f"(its top-level keys: {top})", path)
    return strip_wrapper_prefixes(tensors)
