"""HistoSmith's condition: nuclei counts per type and the tissue type (HistoSmith, Sec. 2: "a vector of
normalised cell counts per type and the tissue type"; the paper's is 10 numbers).

The vector c ∈ R^(K+T) of one patch is ``[n_1/s_1, …, n_K/s_K, onehot(tissue)]``: n_k nuclei of type k (each
instance typed by the majority of its pixels, as the store's manifest counts them), s_k the largest count of
type k over the training patches (so the training range maps to [0, 1]; requests beyond it give values > 1),
and the tissue one-hot over the T tissues seen in training. The paper says "normalised" without the rule;
dividing by the training maximum keeps counts linear (a request of twice as many nuclei is twice the value).

:class:`CountConditioner` holds that rule (class names, tissues, scales and the training range, in its config)
and the two trained pieces: a learned null vector that replaces the condition of dropped samples
(classifier-free guidance) and, when the condition enters the UNet by cross-attention, a linear map of c to
``num_tokens`` tokens. With ``injection = "embedding"`` the vector itself is the UNet's ``class_labels`` (diffusers'
``class_embed_type="projection"``: an MLP whose output is added to the timestep embedding).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

from histosynth.errors import HistosynthError

INJECTIONS = ("embedding", "cross-attention", "both")


@dataclass
class CountCondition:
    """What the UNet receives: ``class_labels`` (B, K+T) for the embedding path, ``tokens`` (B, N, D) for
    cross-attention (each None when that path is off)."""

    class_labels: torch.Tensor | None
    tokens: torch.Tensor | None


class CountConditioner(ModelMixin, ConfigMixin):
    """Counts per type + tissue → the UNet's condition, with a learned null condition.

    Args:
        class_names: the K nucleus types, in type-id order (1..K).
        tissues: the T tissue names seen in training.
        count_scale: s_k per type (≥ 1): counts are divided by it.
        count_range: [min, max] per type over the training patches (requests outside it get a warning).
        injection: "embedding" (added to the timestep embedding), "cross-attention" (tokens) or "both".
        num_tokens, token_dim: the cross-attention tokens (token_dim = the UNet's cross_attention_dim).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, class_names: Sequence[str] = (), tissues: Sequence[str] = (), count_scale: Sequence[float] = (),
                 count_range: Sequence[Sequence[int]] = (), injection: str = "embedding", num_tokens: int = 8,
                 token_dim: int = 64):
        super().__init__()
        if injection not in INJECTIONS:
            raise ValueError(f"injection must be one of {INJECTIONS}, got {injection!r}")
        if len(count_scale) != len(class_names) or len(count_range) != len(class_names) or not tissues:
            raise ValueError("count_scale and count_range need one entry per class, and tissues at least one name")
        width = len(class_names) + len(tissues)
        self.null = nn.Parameter(torch.zeros(width))
        self.to_tokens = nn.Linear(width, num_tokens * token_dim) if injection != "embedding" else None

    @property
    def width(self) -> int:
        return len(self.config.class_names) + len(self.config.tissues)

    # ------------------------------------------------------------------------------------ requests → vectors
    def vectors(self, counts, tissues: Sequence[str], *, source: str | Path | None = None,
                warn: bool = True) -> torch.Tensor:
        """(B, K+T) float32 condition vectors.

        Args:
            counts: (B, K) non-negative numbers per type in type-id order, or a list of {type name: count}
                (types not named count 0).
            tissues: B tissue names (each one of ``config.tissues``).
        Raises:
            HistosynthError: a vector of the wrong length, a negative or non-finite count, an unknown type or
                tissue (named, with the known ones).
        Warns when a count lies outside the training range (the range is stated).
        """
        known = list(self.config.tissues)
        table = self.count_table(counts, source=source)
        if len(tissues) != len(table):
            raise HistosynthError(f"{len(tissues)} tissue names for {len(table)} count vectors", source)
        for i, t in enumerate(tissues):
            if t not in known:
                raise HistosynthError(f"{_request(i, len(table))}unknown tissue {t!r}; the model knows {', '.join(known)}",
                                      source)
        if warn:
            self.warn_out_of_range(table)
        onehot = np.zeros((len(table), len(known)), np.float32)
        onehot[np.arange(len(table)), [known.index(t) for t in tissues]] = 1.0
        scaled = table / np.asarray(self.config.count_scale, np.float64)
        return torch.from_numpy(np.concatenate([scaled.astype(np.float32), onehot], axis=1))

    def count_table(self, counts, *, source=None) -> np.ndarray:
        """(B, K) float64 counts from a (B, K) array or a list of {type name: count} (checked, see :meth:`vectors`)."""
        names = list(self.config.class_names)
        if len(counts) and isinstance(counts[0], Mapping):
            rows = []
            for i, request in enumerate(counts):
                bad = sorted(set(request) - set(names))
                if bad:
                    raise HistosynthError(f"{_request(i, len(counts))}unknown nucleus type {bad[0]!r}; the model knows "
                                          f"{', '.join(names)}", source)
                rows.append([request.get(n, 0) for n in names])
            counts = rows
        try:
            table = np.asarray(counts, dtype=np.float64)
        except (TypeError, ValueError):
            raise HistosynthError("counts must be numbers", source) from None
        if table.ndim != 2 or table.shape[1] != len(names):
            raise HistosynthError(f"a count vector has {len(names)} entries ({', '.join(names)}), got shape "
                                  f"{tuple(table.shape)}", source)
        bad = ~np.isfinite(table) | (table < 0)
        if bad.any():
            i, k = (int(v) for v in np.argwhere(bad)[0])
            raise HistosynthError(f"{_request(i, len(table))}{names[k]} count {table[i, k]:g}: counts must be finite and "
                                  "not negative", source)
        return table

    def warn_out_of_range(self, table: np.ndarray) -> None:
        for k, name in enumerate(self.config.class_names):
            lo, hi = self.config.count_range[k]
            outside = (table[:, k] < lo) | (table[:, k] > hi)
            if outside.any():
                warnings.warn(f"{int(outside.sum())} request(s) ask for {name} counts outside the training range "
                              f"{lo}..{hi} (up to {table[:, k].max():g}); the model extrapolates there "
                              "(HistoSmith reports saturation beyond the range)", stacklevel=3)

    # ------------------------------------------------------------------------------------ vectors → UNet
    def forward(self, values: torch.Tensor, drop: torch.Tensor | None = None) -> CountCondition:
        """The UNet's condition for (B, K+T) vectors; rows where ``drop`` (B,) bool is True get the learned null."""
        values = values.to(self.null.dtype)
        if drop is not None:
            values = torch.where(drop[:, None].to(values.device), self.null.expand_as(values), values)
        injection = self.config.injection
        tokens = None
        if injection != "embedding":
            tokens = self.to_tokens(values).view(len(values), self.config.num_tokens, self.config.token_dim)
        return CountCondition(class_labels=values if injection != "cross-attention" else None, tokens=tokens)

    def null_condition(self, batch_size: int) -> CountCondition:
        return self(self.null.detach().expand(batch_size, -1), None)


def _request(i: int, n: int) -> str:
    """'request 3: ' (1-based) when there are several, else ''."""
    return f"request {i + 1}: " if n > 1 else ""
