"""The divergence watch: a finite loss that jumps far above its best and stays there.

Why: the tiny PathLDM trained on at lr 1e-3 jumped at step 3,719 from a loss of about 0.16 to 1.0, the loss of a
model that predicts no noise, and never came back (docs/benchmarks.md, "A third tiny PathLDM"). Nothing failed, and
with ``keep_checkpoints: 2`` the last good checkpoints rotated away within 200 steps. A NaN or infinite loss stops
the run already (the engine's NaN stop); this watch covers the finite case. It only reads the logged loss: it
changes no draw, so an exact resume stays exact.

The loss is summarised by its median over consecutive windows of ``window`` optimisation steps (robust to the
single-step noise of diffusion losses, which vary with the drawn timesteps). A window whose median is more than
``factor`` times the lowest window median of the same training stage is a jump. Training losses fall or plateau;
they do not triple, so the first window (random weights, the highest) never fires and a healthy run never does.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass


@dataclass(frozen=True)
class Jump:
    """A window whose median loss jumped. Steps are optimisation steps (1-based, as in losses.jsonl)."""

    first_step: int  # the window's first and last steps
    last_step: int
    median: float
    best: float  # the lowest window median of the stage before it
    best_steps: tuple[int, int]  # that window's first and last steps
    safe_until: int  # checkpoints at or before this step predate the jump (see DivergenceWatch.safe_until)

    def message(self) -> str:
        return (f"the loss jumped: median {self.median:.4g} over steps {self.first_step}-{self.last_step}, "
                f"{self.median / self.best:.1f}x its best ({self.best:.4g} over steps {self.best_steps[0]}-"
                f"{self.best_steps[1]}); the run may have diverged (a learning rate too high?)")


class DivergenceWatch:
    """Feed it every step's loss; it reports a :class:`Jump` once per episode (again only after a window has come
    back under the limit). A new training stage (``stage``, e.g. DISC's self-distillation) starts a new best.

    ``safe_until``: a step such that checkpoints at or before it predate any jump (None before the first window
    closes). When a window [F, E] closes under the limit, a jump can only have begun in its second half or later
    (one earlier would have put its median over), so every checkpoint up to F - 1 is safe. ``jumped``: a jump was
    reported and no window has come back under the limit since.

    Args:
        window: steps per median (>= 1).
        factor: a window median above ``factor`` x the stage's best window median is a jump (> 1).
    Raises:
        ValueError: window < 1 or factor <= 1.
    """

    def __init__(self, window: int = 100, factor: float = 3.0):
        if window < 1 or not factor > 1:
            raise ValueError(f"window must be >= 1 and factor > 1 (got {window}, {factor})")
        self.window, self.factor = window, factor
        self._stage: object = None
        self._losses: list[float] = []
        self._best, self._best_steps = math.inf, (0, 0)
        self.jumped = False
        self.safe_until: int | None = None

    def update(self, step: int, loss: float, stage: str | None = None) -> Jump | None:
        """Add the loss of optimisation step ``step``; a Jump when this step closes a window that jumped."""
        if stage != self._stage:
            self._stage, self._losses, self._best, self.jumped = stage, [], math.inf, False
        self._losses.append(loss)
        if len(self._losses) < self.window:
            return None
        median, self._losses = statistics.median(self._losses), []
        first = step - self.window + 1
        if median > self.factor * self._best:
            if self.jumped:
                return None
            self.jumped = True
            return Jump(first, step, median, self._best, self._best_steps, self.safe_until or 0)
        self.jumped, self.safe_until = False, first - 1
        if median < self._best:
            self._best, self._best_steps = median, (first, step)
        return None
