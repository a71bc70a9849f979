"""DISC's tile annotation mask sampling (DISC paper, Sec. 2.2): new labelled masks from the shapes annotators drew.

Sec. 2.2 turns every human-annotated mask ``m`` into a *tile shape mask* ``m_freq``: its labels renumbered by pixel
frequency, the most frequent 0, the next 1, ... ("labels are reclassified according to their frequency
distribution, from the most to the least frequent"). ``m_freq`` keeps the annotator's drawing and forgets which
grade each region was. To sample, a shape mask is drawn at random and *non-overlapping* grade labels are put on its
shapes "based on the random weights, which determines the label majority for a large number of m_freq"; a tile
set for slide-level (MIL) training is 20-100 such masks for a designated primary and secondary grade, and "when
the primary GG is Non-Cancer, the Non-Cancer label is exclusively applied".

The pieces, each usable alone:

- :func:`~histosynth.sampling.shape_bank.frequency_relabel` — ``m`` → ``m_freq`` (ties between equally frequent
  labels: the smaller original label value gets the smaller rank), and the number of shapes (distinct labels) in it;
- :class:`~histosynth.sampling.shape_bank.ShapeBank` / :func:`~histosynth.sampling.shape_bank.shape_bank` — the
  ``m_freq`` of every mask of a region store's split (or of masks in memory: ``ShapeBank.from_masks``). One-label
  masks are kept: they are one-shape tiles. A store-backed bank keeps only each mask's rank table and pixel counts
  and reads the mask from the (memory-mapped) store when a tile needs it, so a bank of SICAPv2's thousands of 512 px
  masks costs kilobytes, not gigabytes;
- :func:`assign_labels` — labels on the shapes of one ``m_freq`` by a weight per label: shape rank r takes the r-th
  label in order of decreasing weight. A mask with more shapes than labels gives its extra (least frequent) shapes
  to the *first* label, the one of largest weight (see the function for why not the last);
- :func:`sample_tile_masks` — one tile set for a (primary, secondary) pair (the "random weights", below);
- :func:`sample_tile_sets` — MIL tile sets: sizes uniform in 20..100 (inclusive), pairs given by the caller;
- :func:`write_tile_sets` — ``OUT/classes.txt``, ``OUT/masks/SSSS_TTT.png``, ``OUT/sets.jsonl``, atomically.

**Random weights** (our reading of Sec. 2.2; the paper defers the details to its supplement). Two levels:

1. *Per set*, label weights ``pi ~ Dirichlet(1, ..., 1)`` over the candidate labels {primary, secondary,
   non-cancer} (duplicates removed: a 3+3 set has two), the largest given to the primary, the others shuffled over
   the remaining labels. These are the weights that "determine the label majority for a large number of
   m_freq": a label takes a tile's most frequent shape in a share ``pi_k`` of the tiles.
2. *Per tile*, random weights ``w_k = u_k ** (1 / pi_k)``, ``u_k ~ U(0, 1]`` (Efraimidis-Spirakis keys), handed to
   :func:`assign_labels`: their decreasing order is a draw of the Plackett-Luce ranking with parameters ``pi``
   (the first label is k with probability ``pi_k``, the next one among the rest in proportion to theirs, ...).

So every tile mixes the set's grades in the annotators' shapes, and the primary is the majority of most tiles. The
Gleason definition (the primary is the most extensive grade of the slide) is then made exact over the set: when,
by chance, the secondary grade covers more pixels of the set than the primary, those two labels are swapped in
every tile of the set (each tile keeps its shapes and stays non-overlapping; ``TileSet.swapped`` says it
happened; a primary that got no pixel at all takes the place of the label covering most). Non-cancer is not ranked (Gleason grades only the cancer; benign tissue may cover more of a slide than
its primary). A non-cancer primary makes every pixel non-cancer (the secondary must be non-cancer too).

Everything random comes from one ``numpy.random.Generator`` (or an int seed for ``np.random.default_rng``): the same
seed gives the same sets, shapes, labels and masks.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histosynth.atomic import atomic_folder
from histosynth.errors import HistosynthError, OutputExistsError
from histosynth.sampling.shape_bank import MAX_LABELS, ShapeBank

__all__ = ["DEFAULT_SET_SIZE", "TileSet", "assign_labels", "sample_tile_masks", "sample_tile_sets", "write_tile_sets"]

DEFAULT_SET_SIZE = (20, 100)  # Sec. 2.2 / Sec. 3: "20-100 annotation shape masks" per simulated slide
CLASSES_FILE = "classes.txt"
SETS_FILE = "sets.jsonl"
MASKS_DIR = "masks"


# ------------------------------------------------------------------------------------------ label assignment
def _rank_labels(n_shapes: int, labels: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n_shapes,) label of each shape rank: rank r → r-th label by decreasing weight; ranks past the labels →
    the first (largest-weight) label."""
    order = labels[np.argsort(-weights, kind="stable")]
    ranks = np.arange(n_shapes)
    return np.where(ranks < order.size, order[np.minimum(ranks, order.size - 1)], order[0]).astype(np.int32)


def _checked_labels(labels, weights) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    weights = np.asarray(weights, dtype=np.float64)
    if labels.ndim != 1 or labels.size == 0 or labels.dtype.kind not in "iu":
        raise HistosynthError(f"labels: a non-empty list of integer label values, got {labels.tolist()!r}")
    if weights.shape != labels.shape:
        raise HistosynthError(f"{labels.size} labels but {weights.size} weights: one weight per label")
    if np.unique(labels).size != labels.size:
        raise HistosynthError(f"labels {labels.tolist()} repeat one: the labels put on shapes do not overlap")
    if not np.all(np.isfinite(weights)):
        raise HistosynthError(f"weights {weights.tolist()} are not all finite numbers")
    return labels.astype(np.int64), weights


def assign_labels(m_freq: np.ndarray, labels: Sequence[int], weights: Sequence[float]) -> np.ndarray:
    """Non-overlapping labels on the shapes of a tile shape mask by random weights (DISC Sec. 2.2).

    Shape rank r (the r-th most frequent shape of ``m_freq``) takes the r-th label in order of decreasing weight:
    the label with the largest weight takes the most frequent shape and is the tile's majority. Equal weights keep
    the order of ``labels``.

    A mask with more shapes than labels gives its extra, least frequent shapes (ranks ``len(labels)`` and up) to the
    *first* label, the one of largest weight. Why not the last label: merged shapes can outgrow the larger ones
    (shapes of 30/25/24/21 % with two labels would give the second label 70 %), so the weights would no longer
    decide the majority; merged into the first label, the label areas keep the order of the weights. Why not skip
    such masks: the bank's shapes would then depend on the grade pair (a 3+3 set has two labels, and three-label
    annotations are common), and the most intricate drawings would be lost.

    Args:
        m_freq: shape ranks 0..S-1 (:func:`~histosynth.sampling.shape_bank.frequency_relabel`), any shape.
        labels: label values to put on the shapes, distinct (e.g. ``[1, 3, 0]``: GG3, GG5, non-cancer).
        weights: one weight per label.

    Returns:
        int32 array of ``m_freq``'s shape holding the label of every pixel.

    Raises:
        HistosynthError: no labels, repeated labels, a weight count different from the label count, negative ranks.
    """
    m_freq = np.asarray(m_freq)
    labels_arr, weights_arr = _checked_labels(labels, weights)
    if m_freq.dtype.kind not in "iu" or (m_freq.size and m_freq.min() < 0):
        raise HistosynthError("m_freq holds shape ranks 0..S-1 (see frequency_relabel)")
    n_shapes = int(m_freq.max()) + 1 if m_freq.size else 0
    return _rank_labels(n_shapes, labels_arr, weights_arr)[m_freq]


# ------------------------------------------------------------------------------------------ tile sets
@dataclass(frozen=True, eq=False)
class TileSet:
    """One simulated slide: ``size`` tile masks for a (primary, secondary) grade pair (Sec. 2.2).

    The masks are made from the bank when asked for (:meth:`mask`, :attr:`masks`), so a list of sets holds only
    which shape each tile took and which label each of its shapes got.

    Attributes:
        bank: the shape bank the tiles come from.
        class_names: the label set (mask value i = ``class_names[i]``).
        primary, secondary: the grade pair, as label values.
        shape_ids: (size,) the bank row of each tile's shape (``bank.indices[shape_ids]``: store indices).
        rank_labels: (size, bank.max_shapes) int32: the label of shape rank r of tile t.
        weights: (K,) the set's label weights ``pi`` over the label set, as the tiles' labels follow them (0 off
            the candidates; a non-cancer set: 1 on non-cancer; after a swap, the primary's and the other label's
            exchanged with them).
        fractions: (size, K) the share of each label in each tile.
        swapped: the primary and the secondary were swapped to make the primary the set's most extensive grade.
    """

    bank: ShapeBank
    class_names: tuple[str, ...]
    primary: int
    secondary: int
    shape_ids: np.ndarray
    rank_labels: np.ndarray
    weights: np.ndarray
    fractions: np.ndarray
    swapped: bool = False

    @property
    def size(self) -> int:
        return len(self.shape_ids)

    def __len__(self) -> int:
        return self.size

    @property
    def shares(self) -> np.ndarray:
        """(K,) the share of each label over the whole set (its tiles have one size: the mean of ``fractions``)."""
        return self.fractions.mean(axis=0)

    def mask(self, t: int) -> np.ndarray:
        """Tile ``t``'s mask: int32 (P, P), labels 0..K-1 (the dtype of a region store's ``region_map``)."""
        return self.bank.labelled(int(self.shape_ids[t]), self.rank_labels[t])

    @property
    def masks(self) -> np.ndarray:
        """All tile masks: int32 (size, P, P)."""
        return np.stack([self.mask(t) for t in range(self.size)])

    def __iter__(self):
        return (self.mask(t) for t in range(self.size))


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise HistosynthError(f"rng: a numpy Generator or an int seed, got {type(rng).__name__}")


def _label_value(grade: int | str, names: tuple[str, ...], what: str) -> int:
    """A grade given by name or label value → its value; HistosynthError naming the label set otherwise."""
    if isinstance(grade, str):
        if grade not in names:
            raise HistosynthError(f"{what} grade {grade!r} is not one of the labels {list(names)}")
        return names.index(grade)
    if isinstance(grade, (int, np.integer)) and not isinstance(grade, bool) and 0 <= grade < len(names):
        return int(grade)
    raise HistosynthError(f"{what} grade {grade!r} is neither a label name nor a value 0..{len(names) - 1} of "
                          f"{list(names)}")


def _label_set(bank: ShapeBank, labels: Sequence[str] | None) -> tuple[str, ...]:
    names = bank.class_names if labels is None else tuple(str(n) for n in labels)
    if names is None:
        raise HistosynthError(f"labels: the label set (names, line i = value i) is needed: {bank.source} names none")
    if not names or len(set(names)) != len(names) or len(names) > MAX_LABELS:
        raise HistosynthError(f"labels {list(names)}: 1..{MAX_LABELS} distinct names")
    return names  # shapes carry no labels: any label set goes with any bank


def sample_tile_masks(bank: ShapeBank, primary: int | str, secondary: int | str, n: int,
                      rng: np.random.Generator | int, *, labels: Sequence[str] | None = None,
                      non_cancer: int | str = 0) -> TileSet:
    """``n`` tile masks for one (primary, secondary) grade pair: one simulated slide (DISC Sec. 2.2).

    Each tile draws a shape mask uniformly from ``bank`` and puts the candidate labels {primary, secondary,
    non-cancer} on its shapes by random weights (module docstring: the set's weights ``pi`` ~ Dirichlet(1, ..., 1)
    with the largest on the primary, per-tile Plackett-Luce weights, :func:`assign_labels`). Over the set the
    primary covers at least as many pixels as any other label (a swap fixes the occasional set where, by chance,
    it would not: about one in ten of 20-100 tiles on the tests' small bank).
    When the primary is non-cancer, every pixel of every tile is non-cancer (Sec. 2.2: "the Non-Cancer label is
    exclusively applied").

    Args:
        bank: the shape bank.
        primary, secondary: grades by name (``"GG4"``) or label value; equal grades (3+3) are allowed.
        n: number of tiles (>= 1).
        rng: a ``numpy.random.Generator`` (advanced) or an int seed.
        labels: the label set, names in value order; default the bank's (a store bank knows its region labels).
        non_cancer: the non-cancer label, by value (default 0, the first label) or name.

    Raises:
        HistosynthError: a grade not in the label set, a non-cancer primary with a cancer secondary, n < 1.
    """
    names = _label_set(bank, labels)
    p = _label_value(primary, names, "primary")
    s = _label_value(secondary, names, "secondary")
    nc = _label_value(non_cancer, names, "non-cancer")
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise HistosynthError(f"n: the number of tiles is a whole number >= 1, got {n!r}")
    if p == nc and s != nc:
        raise HistosynthError(f"primary {names[p]!r} is non-cancer but secondary {names[s]!r} is not: a non-cancer "
                              f"set is non-cancer only (give {names[nc]!r} as the secondary too)")
    rng = _as_rng(rng)
    shape_ids = rng.integers(0, len(bank), size=int(n))
    width, k = bank.max_shapes, len(names)
    pi = np.zeros(k)
    swapped = False
    if p == nc:  # Sec. 2.2: the non-cancer label exclusively
        rank_labels = np.full((int(n), width), nc, dtype=np.int32)
        pi[nc] = 1.0
    else:
        candidates = np.array(list(dict.fromkeys((p, s, nc))), dtype=np.int64)  # primary first, no repeats
        weights = np.sort(rng.dirichlet(np.ones(candidates.size)))[::-1]  # largest first → the primary
        weights[1:] = weights[1:][rng.permutation(candidates.size - 1)]
        pi[candidates] = weights
        # per-tile weights u ** (1 / pi), u in (0, 1]; their logarithm log(u) / pi orders the same, without underflow
        keys = np.log1p(-rng.random((int(n), candidates.size))) / weights
        rank_labels = np.stack([_rank_labels(width, candidates, keys[t]) for t in range(int(n))])
        totals = np.zeros(k, dtype=np.int64)
        for t, i in enumerate(shape_ids):
            np.add.at(totals, rank_labels[t], bank.shape_pixels[i])
        grades = candidates[candidates != nc]  # Gleason ranks grades only: benign tissue may cover more
        top = int(grades[np.argmax(totals[grades])])
        if totals[p] == 0:  # the primary must be in the slide: it takes the shapes of the label covering most
            top = int(candidates[np.argmax(totals[candidates])])
        if totals[top] > totals[p]:  # Gleason: the primary is the most extensive grade of the slide
            swap = rank_labels.copy()
            swap[rank_labels == p], swap[rank_labels == top] = top, p
            rank_labels, swapped = swap, True
            pi[[p, top]] = pi[[top, p]]  # the weights the labels now follow
    fractions = np.zeros((int(n), k))
    area = float(bank.patch_size * bank.patch_size)
    for t, i in enumerate(shape_ids):
        np.add.at(fractions[t], rank_labels[t], bank.shape_pixels[i] / area)
    return TileSet(bank=bank, class_names=names, primary=p, secondary=s, shape_ids=shape_ids,
                   rank_labels=rank_labels, weights=pi, fractions=fractions, swapped=swapped)


def sample_tile_sets(bank: ShapeBank, pairs: Sequence[tuple[int | str, int | str]], num_sets: int,
                     rng: np.random.Generator | int, size: tuple[int, int] = DEFAULT_SET_SIZE, *,
                     labels: Sequence[str] | None = None, non_cancer: int | str = 0) -> list[TileSet]:
    """MIL tile sets (DISC Sec. 2.2): ``num_sets`` simulated slides, each a (primary, secondary) pair, a size drawn
    uniformly in ``size`` (inclusive; default 20..100) and that many tile masks (:func:`sample_tile_masks`).

    Set s takes ``pairs[s % len(pairs)]``: list the pairs in the proportions wanted (the paper balances its
    grades: 100 slides per primary grade) or draw them yourself. Reproducible: an int seed (or a fresh
    ``np.random.default_rng(seed)``) gives identical sets; another seed, other sets.

    Returns:
        the sets, in order; each carries its pair, size, per-tile label fractions and set shares.

    Raises:
        HistosynthError: no pairs, a pair that is not two grades, a bad size range or set count, a grade not in
            the label set (checked for every pair before anything is drawn).
    """
    pairs = [tuple(pair) if isinstance(pair, (tuple, list)) else (pair,) for pair in pairs]
    if not pairs:
        raise HistosynthError("pairs: give at least one (primary, secondary) grade pair")
    bad = [pair for pair in pairs if len(pair) != 2]
    if bad:
        raise HistosynthError(f"pairs: {bad[0]!r} is not a (primary, secondary) grade pair")
    if isinstance(num_sets, bool) or not isinstance(num_sets, (int, np.integer)) or num_sets < 1:
        raise HistosynthError(f"num_sets: a whole number >= 1, got {num_sets!r}")
    lo, hi = _size_range(size)
    names = _label_set(bank, labels)
    nc = _label_value(non_cancer, names, "non-cancer")
    for primary, secondary in pairs:  # every pair's names checked before drawing
        p, s = _label_value(primary, names, "primary"), _label_value(secondary, names, "secondary")
        if p == nc and s != nc:
            raise HistosynthError(f"pair ({names[p]!r}, {names[s]!r}): a non-cancer primary needs a non-cancer "
                                  "secondary")
    rng = _as_rng(rng)
    sets = []
    for index in range(int(num_sets)):
        primary, secondary = pairs[index % len(pairs)]
        n = int(rng.integers(lo, hi + 1))
        sets.append(sample_tile_masks(bank, primary, secondary, n, rng, labels=names, non_cancer=nc))
    return sets


def _size_range(size) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in size)
        ok = all(float(v) == int(v) for v in size)
    except (TypeError, ValueError):
        ok = False
    if not ok or not 1 <= lo <= hi:
        raise HistosynthError(f"size: (smallest, largest) number of tiles per set, 1 <= smallest <= largest, "
                              f"got {size!r}")
    return lo, hi


# ------------------------------------------------------------------------------------------ writer
def _shares(values: np.ndarray, names: tuple[str, ...]) -> dict[str, float]:
    return {name: round(float(v), 4) for name, v in zip(names, values)}


def write_tile_sets(out: str | Path, sets: Sequence[TileSet], class_names: Sequence[str],
                    overwrite: bool = False) -> Path:
    """Write tile sets (:func:`sample_tile_sets`) as a folder, atomically::

        OUT/classes.txt            one label per line, line i = mask value i
        OUT/masks/SSSS_TTT.png     tile TTT of set SSSS: uint8 labels 0..K-1
        OUT/sets.jsonl             per set: set, primary, secondary, size, shares (of the set), weights (pi),
                                   swapped, tiles (per tile: mask, shape (store index), shares)

    The folder is built under a hidden sibling name and renamed into place when complete
    (:func:`histosynth.atomic.atomic_folder`): a failed write leaves ``out`` as it was.

    Raises:
        OutputExistsError: ``out`` exists and is not empty, without ``overwrite``.
        HistosynthError: class names empty, repeated, multi-line or over 255, or other than the sets' labels.
    """
    out, sets = Path(out), list(sets)
    names = tuple(str(n) for n in class_names)
    if (not names or len(set(names)) != len(names) or len(names) > MAX_LABELS
            or any(not n.strip() or n != n.strip() or "\n" in n or "\r" in n for n in names)):
        raise HistosynthError(f"class_names {list(names)}: 1..{MAX_LABELS} distinct, non-empty single-line names")
    for index, tile_set in enumerate(sets):
        if tuple(tile_set.class_names) != names:
            raise HistosynthError(f"set {index} was sampled with labels {list(tile_set.class_names)}, not "
                                  f"{list(names)}")
    occupied = out.exists() or out.is_symlink()
    if occupied and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise OutputExistsError("output exists and is not empty; pass --overwrite (overwrite=True) to replace it",
                                out)
    from PIL import Image

    with atomic_folder(out) as root:
        (root / CLASSES_FILE).write_text("".join(f"{n}\n" for n in names), encoding="utf-8")
        (root / MASKS_DIR).mkdir()
        with open(root / SETS_FILE, "w", encoding="utf-8") as rows:
            for s, tile_set in enumerate(sets):
                tiles = []
                for t in range(tile_set.size):
                    rel = f"{MASKS_DIR}/{s:04d}_{t:03d}.png"
                    Image.fromarray(tile_set.mask(t).astype(np.uint8)).save(root / rel, format="PNG")
                    tiles.append({"mask": rel, "shape": int(tile_set.bank.indices[tile_set.shape_ids[t]]),
                                  "shares": _shares(tile_set.fractions[t], names)})
                row = {"set": s, "primary": names[tile_set.primary], "secondary": names[tile_set.secondary],
                       "size": tile_set.size, "shares": _shares(tile_set.shares, names),
                       "weights": _shares(tile_set.weights, names), "swapped": tile_set.swapped,
                       "shape_source": tile_set.bank.source, "tiles": tiles}
                rows.write(json.dumps(row) + "\n")
    return out
