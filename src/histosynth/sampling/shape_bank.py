"""The tile shape masks of DISC (Sec. 2.2): every annotated mask ``m`` relabelled by pixel frequency into ``m_freq``
(:func:`frequency_relabel`), and the bank of a region store's ``m_freq`` that tiles are drawn from
(:class:`ShapeBank`, :func:`shape_bank`). Labels are put on the shapes, and tile sets drawn, by
:mod:`histosynth.sampling.tile_masks`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from histosynth.data.regions import open_region_store
from histosynth.data.store import PatchStore
from histosynth.errors import DataError, HistosynthError

__all__ = ["MAX_LABELS", "ShapeBank", "frequency_relabel", "shape_bank"]

MAX_LABELS = 255  # masks are written as uint8 PNGs (as region stores keep them)


def _rank_order(values: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """``values`` reordered most frequent first; equal counts: smaller value first."""
    return values[np.lexsort((values, -counts))]


def frequency_relabel(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """A mask's tile shape mask ``m_freq`` (DISC Sec. 2.2) and its number of shapes.

    The labels of ``mask`` are renumbered by pixel frequency: the most frequent label becomes 0, the next 1, and so
    on ("from the most to the least frequent (0-to-3)"). Labels covering the same number of pixels are ranked by
    their original value, ascending (``[[7, 2]]`` → ``[[1, 0]]``), so the result depends on the mask alone.

    Args:
        mask: integer labels, any shape (a region store's ``region_map`` is (P, P)); any values, negative included.

    Returns:
        ``(m_freq, n_shapes)``: int32 array of ``mask``'s shape with values 0..n_shapes-1, and the number of
        distinct labels of ``mask``.

    Raises:
        HistosynthError: an empty mask or one of non-integer values.
    """
    mask = np.asarray(mask)
    if mask.dtype.kind not in "iub":
        raise HistosynthError(f"a region mask holds integer labels, got {mask.dtype}")
    if mask.size == 0:
        raise HistosynthError(f"an empty mask (shape {mask.shape}) has no shapes")
    values, inverse, counts = np.unique(mask, return_inverse=True, return_counts=True)
    order = np.lexsort((values, -counts))  # positions into ``values``, most frequent first
    rank = np.empty(values.size, dtype=np.int32)
    rank[order] = np.arange(values.size, dtype=np.int32)
    return rank[inverse.reshape(mask.shape)], int(values.size)


class ShapeBank:
    """The tile shape masks ``m_freq`` (Sec. 2.2) that tiles are drawn from: :func:`shape_bank` (a region store's
    split) or :meth:`from_masks` (masks in memory).

    Attributes:
        source: where the masks come from (the store's path), named by errors.
        split: the store split (None: every patch, or masks in memory).
        class_names: the label set of the masks (the store's region labels), or None.
        patch_size: side of the (square) masks, in pixels.
        indices: (N,) the store index of each shape (masks in memory: 0..N-1).
        num_shapes: (N,) the number of shapes of each mask (1 for a one-label mask).
        shape_pixels: (N, S) pixels of shape rank r in mask i (0 past its ``num_shapes``); S = the most shapes.
    """

    def __init__(self, *, source: str, split: str | None, class_names: Sequence[str] | None, patch_size: int,
                 indices: np.ndarray, rank_tables: np.ndarray, shape_pixels: np.ndarray, read):
        if len(indices) == 0:
            raise DataError("no masks to take tile shapes from", source)
        self.source, self.split, self.patch_size = str(source), split, int(patch_size)
        self.class_names = None if class_names is None else tuple(class_names)
        self.indices = np.asarray(indices, dtype=np.int64)
        self.shape_pixels = np.asarray(shape_pixels, dtype=np.int64)
        self.num_shapes = (self.shape_pixels > 0).sum(axis=1).astype(np.int64)
        self._rank_tables = rank_tables  # (N, V): stored value -> shape rank
        self._read = read  # i -> the stored mask i (values indexing its rank table)

    @classmethod
    def from_masks(cls, masks: Sequence[np.ndarray] | np.ndarray, *, class_names: Sequence[str] | None = None,
                   source: str = "masks in memory") -> ShapeBank:
        """A bank of masks in memory (any integer labels; each is relabelled by :func:`frequency_relabel`).

        Raises:
            HistosynthError: no masks, masks of different or non-square sizes, more than 255 labels in one.
        """
        shapes, counts = [], []
        for i, mask in enumerate(masks):
            m_freq, n = frequency_relabel(mask)
            if m_freq.ndim != 2 or m_freq.shape[0] != m_freq.shape[1]:
                raise HistosynthError(f"mask {i} of {source} is {m_freq.shape}, tile masks are square (P, P)")
            if shapes and m_freq.shape != shapes[0].shape:
                raise HistosynthError(f"mask {i} of {source} is {m_freq.shape}, mask 0 {shapes[0].shape}: "
                                      "a bank holds masks of one size")
            if n > MAX_LABELS:
                raise HistosynthError(f"mask {i} of {source} has {n} labels; at most {MAX_LABELS}")
            shapes.append(m_freq.astype(np.uint8))
            counts.append(np.bincount(m_freq.ravel(), minlength=n))
        if not shapes:
            raise DataError("no masks to take tile shapes from", source)
        width = max(len(c) for c in counts)
        pixels = np.zeros((len(counts), width), dtype=np.int64)
        for i, c in enumerate(counts):
            pixels[i, :len(c)] = c
        identity = np.broadcast_to(np.arange(width, dtype=np.int64), (len(shapes), width))
        stacked = np.stack(shapes)
        return cls(source=source, split=None, class_names=class_names, patch_size=stacked.shape[1],
                   indices=np.arange(len(shapes)), rank_tables=identity, shape_pixels=pixels,
                   read=lambda i: stacked[i])

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def max_shapes(self) -> int:
        """The most shapes any mask of the bank has."""
        return self.shape_pixels.shape[1]

    def rank_table(self, i: int) -> np.ndarray:
        """Stored label value → shape rank of bank mask ``i``."""
        return self._rank_tables[i]

    def shape(self, i: int) -> np.ndarray:
        """``m_freq`` of bank mask ``i``: int32 (P, P), shape ranks 0..num_shapes[i]-1."""
        return self._rank_tables[i][self._read(i)].astype(np.int32)

    def labelled(self, i: int, rank_labels: np.ndarray) -> np.ndarray:
        """Bank mask ``i`` with shape rank r labelled ``rank_labels[r]``: int32 (P, P)."""
        return np.asarray(rank_labels, dtype=np.int32)[self._rank_tables[i]][self._read(i)]

    def __repr__(self) -> str:
        split = "" if self.split is None else f", split {self.split!r}"
        return f"ShapeBank({len(self)} masks of {self.patch_size} px from {self.source}{split})"


def shape_bank(store: PatchStore | str | Path, split: str | None = "train") -> ShapeBank:
    """The shape bank of a region store's split: the ``m_freq`` of every one of its masks (Sec. 2.2).

    Duplicates are kept (a shape drawn by annotators twice is drawn twice as often), and so are one-label masks
    (one-shape tiles: the whole tile gets one label). The masks stay in the memory-mapped store; the bank keeps
    each one's rank table and pixel counts.

    Args:
        store: a region store (``histosynth prepare regions``) or its path.
        split: "train" (the default: the annotations the model was trained on), "test", or None for every patch.

    Raises:
        DataError: naming the store: not a region store, an unknown split, no patches in the split.
    """
    store = open_region_store(store)
    if split not in ("train", "test", None):
        raise DataError(f"unknown split {split!r}: a store's splits are 'train' and 'test'", store.path)
    indices = store.indices(split)
    if not indices:
        raise DataError(f"no patches in the {split!r} split: no tile shapes to sample from"
                        if split else "no patches: no tile shapes to sample from", store.path)
    k = len(store.class_names)
    tables = np.zeros((len(indices), k), dtype=np.int64)
    pixels = np.zeros((len(indices), k), dtype=np.int64)
    for row, index in enumerate(indices):
        counts = np.bincount(store[index]["region_map"].ravel(), minlength=k)[:k]
        present = np.flatnonzero(counts)
        ordered = _rank_order(present, counts[present])
        tables[row, ordered] = np.arange(ordered.size)
        pixels[row, :ordered.size] = counts[ordered]
    width = max(1, int((pixels > 0).sum(axis=1).max()))
    return ShapeBank(source=str(store.path), split=split, class_names=store.class_names, patch_size=store.patch_size,
                     indices=np.asarray(indices), rank_tables=tables, shape_pixels=pixels[:, :width],
                     read=lambda i: store[int(indices[i])]["region_map"])
