"""The data order and per-step randomness of every run: pure functions of (seed, position), so resume is exact.

Micro-batch j of a run holds positions [j·B, (j+1)·B) of an endless stream in which epoch e is
``permutation(seed, e)`` of the training items, and every random draw of micro-batch j (timesteps, noise,
condition dropout, flips, crops) comes from ``step_generator(seed, j)``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Sampler


class StreamBatchSampler(Sampler):
    """Micro-batches j = start, start+stride, ... of an endless stream of per-epoch permutations.

    A process of a multi-GPU run takes every `stride`-th micro-batch from its own offset.
    """

    def __init__(self, num_items: int, batch_size: int, seed: int, start: int, stride: int = 1):
        self.n, self.b, self.seed, self.start, self.stride = num_items, batch_size, seed, start, stride
        self._perm_cache: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            self._perm_cache = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.n)}
        return self._perm_cache[epoch]

    def batch(self, j: int) -> list[int]:
        out = []
        for pos in range(j * self.b, (j + 1) * self.b):
            epoch, k = divmod(pos, self.n)
            out.append(int(self._perm(epoch)[k]))
        return out

    def __iter__(self):
        j = self.start
        while True:
            yield self.batch(j)
            j += self.stride

    def __len__(self):  # endless; DataLoader only needs this for len(), which we never call
        return 2**62


def step_generator(seed: int, micro_batch: int) -> torch.Generator:
    """The generator of every random draw of one micro-batch (CPU, so runs on any device draw the same)."""
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(micro_batch))

