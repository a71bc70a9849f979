"""The divergence watch: a finite loss that jumps far above its best and stays there.

Why: the tiny PathLDM trained on at lr 1e-3 jumped at step 3,719 from a loss of about 0.16 to 1.0, the loss of a
model that predicts no noise, and never came back (docs/benchmarks.md, "A third tiny PathLDM"). Nothing failed, and
with ``keep_checkpoints: 2`` the last good checkpoints rotated away within 200 steps. A NaN or infinite loss stops
the run already (the engine's NaN stop); this watch covers the finite case. It only reads the logged loss (the
task's ``watched_loss`` of each losses.jsonl row): it changes no draw, so an exact resume stays exact.

The loss is summarised by its median over consecutive windows of ``window`` optimisation steps (robust to the
single-step noise of diffusion losses, which vary with the drawn timesteps), compared with the lowest window median
of the same training stage ("best"):
- over ``factor`` x best: a jump, reported once, until a window comes back under ``healthy`` x best;
- at most ``healthy`` x best: a healthy window; checkpoints up to the step before it predate any jump;
- between the two, a stage's first window (nothing to compare with) or a best <= 0: no verdict.
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
    safe_until: int | None  # checkpoints at or before this step predate the jump (None: no healthy window yet)

    def message(self) -> str:
        return (f"the loss jumped: median {self.median:.4g} over steps {self.first_step}-{self.last_step}, "
                f"{self.median / self.best:.1f}x its best ({self.best:.4g} over steps {self.best_steps[0]}-"
                f"{self.best_steps[1]}); the run may have diverged (a learning rate too high?)")


class DivergenceWatch:
    """Feed it every step's loss; it reports a :class:`Jump` once per episode. A new training ``stage`` (NASDM's
    fine-tuning) starts a new best; an open episode stays open across it.

    ``safe_until``: checkpoints at or before this step predate every jump so far (None until a healthy window).
    When a window [F, E] closes healthy, a jump can only have begun in its second half or later (one earlier would
    have put its median far over), so checkpoints up to F - 1 are safe. ``jumped``: an episode is open.

    Args:
        window: steps per median (>= 1).
        factor: a window median above ``factor`` x the stage's best is a jump (> healthy).
        healthy: a window median at most ``healthy`` x best is healthy (>= 1).
    Raises:
        ValueError: window < 1, healthy < 1 or factor <= healthy.
    """

    def __init__(self, window: int = 100, factor: float = 3.0, healthy: float = 1.5):
        if window < 1 or not 1 <= healthy < factor:
            raise ValueError(f"need window >= 1 and 1 <= healthy < factor (got {window}, {healthy}, {factor})")
        self.window, self.factor, self.healthy = window, factor, healthy
        self._stage: object = None
        self._losses: list[float] = []
        self._best, self._best_steps = math.inf, (0, 0)
        self.jumped = False
        self.safe_until: int | None = None

    def update(self, step: int, loss: float, stage: str | None = None) -> Jump | None:
        """Add the loss of optimisation step ``step``; a Jump when this step closes a window that jumped."""
        if stage != self._stage:  # a new stage, another loss: a new best (an unfinished window is not judged)
            self._stage, self._losses, self._best = stage, [], math.inf
        self._losses.append(loss)
        if len(self._losses) < self.window:
            return None
        median, self._losses = statistics.median(self._losses), []
        first, best = step - self.window + 1, self._best
        if median < best:
            self._best, self._best_steps = median, (first, step)
        if math.isinf(best) or best <= 0:  # no verdict: nothing to compare with, or a ratio without meaning
            return None
        if median > self.factor * best:
            if self.jumped:
                return None
            self.jumped = True
            return Jump(first, step, median, best, self._best_steps, self.safe_until)
        if median <= self.healthy * best:
            self.jumped, self.safe_until = False, first - 1
        return None
