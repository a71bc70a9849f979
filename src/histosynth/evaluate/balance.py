"""DISC's balance weight λ between real and synthetic training data (eq. 4: L = (1 − λ)·L_real + λ·L_synth), as
``--balance`` reads it for the grading models (the region classifier and the slide-level MIL)."""

from __future__ import annotations

import math
from collections.abc import Sequence

from histosynth.errors import HistosynthError

__all__ = ["parse_balances"]


def parse_balances(values: str | float | Sequence[float]) -> list[float]:
    """λ values from ``"0.3"``, ``"0,0.3,0.6"`` or numbers, in the given order: each in [0, 1], distinct, at least one.

    Raises:
        HistosynthError: naming --balance: not a number, outside [0, 1] (or NaN), repeated, none given.
    """
    items = values.split(",") if isinstance(values, str) else list(values) if isinstance(values, Sequence) else [values]
    try:
        out = [float(v) for v in items if str(v).strip()]
    except ValueError:
        raise HistosynthError(f"--balance {values!r}: give λ values separated by commas, e.g. 0,0.3,0.6") from None
    if not out:
        raise HistosynthError("--balance: no λ value given (e.g. 0,0.3,0.6)")
    bad = [v for v in out if not 0.0 <= v <= 1.0 or math.isnan(v)]
    if bad:
        raise HistosynthError(f"--balance: λ must lie in [0, 1] (DISC eq. 4), got {bad}")
    if len(set(out)) != len(out):
        raise HistosynthError(f"--balance: repeated λ values in {out}")
    return out
