"""DISC's tile annotation mask sampling (Sec. 2.2): frequency relabelling, label assignment by random weights, tile
sets for MIL, the shape bank of a region store and the writer."""

from __future__ import annotations

import json

import numpy as np
import pytest

from histosynth.data.io import read_label_png
from histosynth.data.patches import Patch
from histosynth.data.store import PatchStore
from histosynth.data.store_writer import PatchStoreWriter
from histosynth.errors import DataError, HistosynthError, OutputExistsError
from histosynth.sampling.shape_bank import ShapeBank, frequency_relabel, shape_bank
from histosynth.sampling.tile_masks import assign_labels, sample_tile_masks, sample_tile_sets, write_tile_sets

GRADES = ("non-cancer", "GG3", "GG4", "GG5")
P = 8


def _masks() -> list[np.ndarray]:
    """Hand-drawn 8x8 masks: one-label, two-label, three-label, four-label."""
    one = np.full((P, P), 2, np.int32)
    two = np.zeros((P, P), np.int32)
    two[:, :3] = 1  # 24 px of 1, 40 px of 0
    three = np.zeros((P, P), np.int32)
    three[:4] = 3  # 32 px
    three[4:, :6] = 1  # 24 px
    three[4:, 6:] = 2  # 8 px
    four = np.zeros((P, P), np.int32)
    four[:, :3] = 0  # 24
    four[:, 3:5] = 1  # 16
    four[:, 5:7] = 2  # 16
    four[:, 7] = 3  # 8
    return [one, two, three, four]


@pytest.fixture()
def bank() -> ShapeBank:
    return ShapeBank.from_masks(_masks(), class_names=GRADES)


# ------------------------------------------------------------------------------------------ frequency_relabel
def test_frequency_relabel_ranks_by_pixel_count_ties_by_label_value():
    mask = np.array([[5, 5, 5, 9],
                     [2, 2, 9, 9],
                     [5, 7, 7, -1],
                     [5, 2, 9, -1]])
    # counts: 5 -> 5, 9 -> 4, 2 -> 3, 7 -> 2, -1 -> 2 (tie: -1 < 7 ranks first)
    m_freq, n = frequency_relabel(mask)
    expected = np.array([[0, 0, 0, 1],
                         [2, 2, 1, 1],
                         [0, 4, 4, 3],
                         [0, 2, 1, 3]])
    np.testing.assert_array_equal(m_freq, expected)
    assert m_freq.dtype == np.int32 and m_freq.shape == mask.shape and n == 5


def test_frequency_relabel_one_label_and_exact_ties():
    m_freq, n = frequency_relabel(np.full((3, 3), 4, np.uint8))
    np.testing.assert_array_equal(m_freq, np.zeros((3, 3), np.int32))
    assert n == 1
    m_freq, n = frequency_relabel(np.array([[7, 2], [2, 7]]))
    np.testing.assert_array_equal(m_freq, [[1, 0], [0, 1]])  # equal counts: 2 before 7
    assert n == 2
    with pytest.raises(HistosynthError, match="empty"):
        frequency_relabel(np.zeros((0, 4), np.int32))
    with pytest.raises(HistosynthError, match="integer"):
        frequency_relabel(np.zeros((2, 2), np.float32))


# ------------------------------------------------------------------------------------------ assign_labels
def test_assign_labels_rank_r_takes_rth_label_by_decreasing_weight():
    m_freq = np.array([[0, 0, 1],
                       [0, 2, 1],
                       [0, 0, 2]])
    # weights: label 1 (0.5) > label 0 (0.3) > label 3 (0.2)
    labelled = assign_labels(m_freq, [3, 1, 0], [0.2, 0.5, 0.3])
    np.testing.assert_array_equal(labelled, [[1, 1, 0],
                                             [1, 3, 0],
                                             [1, 1, 3]])
    assert labelled.dtype == np.int32
    # equal weights keep the order of the labels
    np.testing.assert_array_equal(assign_labels(m_freq, [2, 3, 0], [1.0, 1.0, 1.0]),
                                  [[2, 2, 3], [2, 0, 3], [2, 2, 0]])
    # fewer shapes than labels: the lowest-weight labels are simply absent
    np.testing.assert_array_equal(assign_labels(np.zeros((2, 2), np.int32), [1, 2], [0.1, 0.9]), np.full((2, 2), 2))


def test_assign_labels_extra_shapes_merge_into_the_largest_weight_label():
    m_freq = np.array([[0, 0, 0, 1],
                       [0, 0, 1, 1],
                       [0, 2, 2, 3],
                       [0, 1, 2, 3]])  # ranks 0..3: 7, 4, 3, 2 px
    labelled = assign_labels(m_freq, [0, 3], [0.25, 0.75])
    np.testing.assert_array_equal(labelled, [[3, 3, 3, 0],
                                             [3, 3, 0, 0],
                                             [3, 3, 3, 3],
                                             [3, 0, 3, 3]])
    # label areas keep the order of the weights (the documented reason for merging into the first label)
    shapes = np.array([30, 25, 24, 21])
    m = np.repeat(np.arange(4), shapes)
    areas = np.bincount(assign_labels(m, [5, 6], [0.9, 0.1]), minlength=7)
    assert areas[5] == 30 + 24 + 21 and areas[6] == 25


def test_assign_labels_errors():
    m = np.zeros((2, 2), np.int32)
    with pytest.raises(HistosynthError, match="repeat"):
        assign_labels(m, [1, 1], [0.5, 0.5])
    with pytest.raises(HistosynthError, match="one weight per label"):
        assign_labels(m, [1, 2], [0.5])
    with pytest.raises(HistosynthError, match="non-empty"):
        assign_labels(m, [], [])


# ------------------------------------------------------------------------------------------ sampling
def _shares_ok(tile_set) -> None:
    """Each tile is its bank shape, labelled shape by shape with the pair's labels; fractions match the masks."""
    p, s = tile_set.primary, tile_set.secondary
    allowed = {p, s, 0}
    masks = tile_set.masks
    assert masks.shape == (tile_set.size, P, P) and masks.dtype == np.int32
    for t, mask in enumerate(masks):
        assert set(np.unique(mask).tolist()) <= allowed
        m_freq = tile_set.bank.shape(int(tile_set.shape_ids[t]))
        for r in np.unique(m_freq):  # every shape carries one label (non-overlapping labels on whole shapes)
            assert np.unique(mask[m_freq == r]).size == 1
        np.testing.assert_allclose(tile_set.fractions[t], np.bincount(mask.ravel(), minlength=4) / mask.size)


def test_non_cancer_primary_gives_only_non_cancer(bank):
    tile_set = sample_tile_masks(bank, "non-cancer", "non-cancer", 30, np.random.default_rng(0), labels=GRADES)
    assert not tile_set.masks.any()
    np.testing.assert_allclose(tile_set.shares, [1, 0, 0, 0])
    assert tile_set.weights.tolist() == [1, 0, 0, 0]
    # any non-cancer value or name
    other = ShapeBank.from_masks(_masks(), class_names=("GG3", "benign", "GG4", "GG5"))
    assert (sample_tile_masks(other, "benign", 1, 10, 3, non_cancer="benign").masks == 1).all()
    with pytest.raises(HistosynthError, match="non-cancer"):
        sample_tile_masks(bank, "non-cancer", "GG4", 5, 0)


def test_primary_is_the_majority_of_every_set(bank):
    swapped = 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        for pair in (("GG3", "GG4"), ("GG5", "GG3"), ("GG4", "GG4"), ("GG3", "non-cancer")):
            tile_set = sample_tile_masks(bank, *pair, int(rng.integers(1, 25)), rng)
            shares = tile_set.shares
            grades = [k for k in range(len(shares)) if k != 0]  # Gleason ranks grades, not non-cancer (label 0)
            assert shares[tile_set.primary] >= shares[grades].max() - 1e-12, (seed, pair, shares)
            assert shares[tile_set.primary] > 0
            swapped += tile_set.swapped
            _shares_ok(tile_set)
    assert 0 < swapped < 60 * 4  # the swap that keeps the primary the majority is exercised, not the rule


def test_random_weights_decide_the_majority_shape(bank):
    """Per-tile random weights are a Plackett-Luce draw with the set's weights pi: the primary takes the most
    frequent shape in a share pi_primary of the tiles, each candidate in its share."""
    multi = ShapeBank.from_masks([_masks()[3]], class_names=GRADES)  # 4 shapes: the rank-0 label is visible
    tile_set = sample_tile_masks(multi, "GG4", "GG5", 6000, np.random.default_rng(7))
    assert not tile_set.swapped
    first = tile_set.rank_labels[:, 0]
    for label in (2, 3, 0):
        assert abs(np.mean(first == label) - tile_set.weights[label]) < 0.03
    assert tile_set.weights[2] == tile_set.weights.max()  # the primary's weight is the largest
    assert np.isclose(tile_set.weights.sum(), 1.0) and tile_set.weights[1] == 0
    # label areas per tile follow the weight order: the rank-0 label always covers the most pixels
    for t in range(50):
        fractions = tile_set.fractions[t]
        assert fractions[first[t]] == fractions.max()


def test_grade_names_and_values_are_checked(bank):
    with pytest.raises(HistosynthError, match="'GG6' is not one of the labels"):
        sample_tile_masks(bank, "GG6", "GG3", 5, 0)
    with pytest.raises(HistosynthError, match="secondary grade 9"):
        sample_tile_masks(bank, 1, 9, 5, 0)
    with pytest.raises(HistosynthError, match="number of tiles"):
        sample_tile_masks(bank, 1, 2, 0, 0)
    nameless = ShapeBank.from_masks(_masks())
    with pytest.raises(HistosynthError, match="label set"):
        sample_tile_masks(nameless, 1, 2, 5, 0)
    assert sample_tile_masks(nameless, "GG3", "GG5", 5, 0, labels=GRADES).size == 5


def test_tile_sets_sizes_pairs_and_determinism(bank):
    pairs = [("GG3", "GG3"), ("GG4", "GG3"), ("GG5", "GG4"), ("non-cancer", "non-cancer")]
    sets = sample_tile_sets(bank, pairs, 120, np.random.default_rng(11))
    sizes = [s.size for s in sets]
    assert min(sizes) >= 20 and max(sizes) <= 100 and len(set(sizes)) > 30
    assert [(GRADES[s.primary], GRADES[s.secondary]) for s in sets[:4]] == pairs  # round robin
    for tile_set in sets:
        assert tile_set.shares[tile_set.primary] >= tile_set.shares[1:].max() - 1e-12  # the most extensive grade
        assert tile_set.fractions.shape == (tile_set.size, 4)
    assert {s.size for s in sample_tile_sets(bank, pairs, 200, 1, size=(1, 2))} == {1, 2}  # inclusive
    assert {s.size for s in sample_tile_sets(bank, pairs, 5, 1, size=(3, 3))} == {3}

    a = sample_tile_sets(bank, pairs, 6, np.random.default_rng(5))
    b = sample_tile_sets(bank, pairs, 6, 5)  # an int seed is np.random.default_rng(seed)
    c = sample_tile_sets(bank, pairs, 6, np.random.default_rng(6))
    assert [s.size for s in a] == [s.size for s in b]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.shape_ids, y.shape_ids)
        np.testing.assert_array_equal(x.masks, y.masks)
        np.testing.assert_array_equal(x.weights, y.weights)
    assert [s.size for s in a] != [s.size for s in c] or any(
        not np.array_equal(x.masks, y.masks) for x, y in zip(a, c))


def test_tile_sets_errors(bank):
    with pytest.raises(HistosynthError, match="pair"):
        sample_tile_sets(bank, [], 3, 0)
    with pytest.raises(HistosynthError, match="not a"):
        sample_tile_sets(bank, [("GG3",)], 3, 0)
    with pytest.raises(HistosynthError, match="size"):
        sample_tile_sets(bank, [("GG3", "GG4")], 3, 0, size=(50, 20))
    with pytest.raises(HistosynthError, match="'GG7'"):  # every pair checked before drawing
        sample_tile_sets(bank, [("GG3", "GG4"), ("GG7", "GG3")], 1, 0)


# ------------------------------------------------------------------------------------------ writer
def test_writer_files(tmp_path, bank):
    sets = sample_tile_sets(bank, [("GG4", "GG3"), ("non-cancer", "non-cancer")], 2, 3, size=(2, 4))
    out = write_tile_sets(tmp_path / "sets", sets, GRADES)
    assert (out / "classes.txt").read_text(encoding="utf-8") == "non-cancer\nGG3\nGG4\nGG5\n"
    rows = [json.loads(line) for line in (out / "sets.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["set"] for r in rows] == [0, 1]
    assert (rows[0]["primary"], rows[0]["secondary"], rows[1]["primary"]) == ("GG4", "GG3", "non-cancer")
    names = sorted(p.name for p in (out / "masks").iterdir())
    expected = [f"{s:04d}_{t:03d}.png" for s, ts in enumerate(sets) for t in range(ts.size)]
    assert names == sorted(expected)
    for s, (row, tile_set) in enumerate(zip(rows, sets)):
        assert row["size"] == tile_set.size == len(row["tiles"])
        assert row["shares"] == {n: round(float(v), 4) for n, v in zip(GRADES, tile_set.shares)}
        for t, tile in enumerate(row["tiles"]):
            assert tile["mask"] == f"masks/{s:04d}_{t:03d}.png"
            written = read_label_png(out / tile["mask"])
            np.testing.assert_array_equal(written, tile_set.mask(t))
            assert tile["shares"] == {n: round(float(v), 4) for n, v in zip(GRADES, tile_set.fractions[t])}
            assert tile["shape"] == int(tile_set.shape_ids[t])
    assert rows[1]["shares"]["non-cancer"] == 1.0

    with pytest.raises(OutputExistsError):
        write_tile_sets(out, sets[:1], GRADES)
    write_tile_sets(out, sets[:1], GRADES, overwrite=True)
    assert len(list((out / "masks").iterdir())) == sets[0].size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sets"]  # no partial folder left beside it
    (tmp_path / "empty").mkdir()
    write_tile_sets(tmp_path / "empty", sets, GRADES)  # an empty folder is no output to protect
    with pytest.raises(HistosynthError, match="sampled with labels"):
        write_tile_sets(tmp_path / "other", sets, ("a", "b", "c", "d"))


# ------------------------------------------------------------------------------------------ bank of a store
def _region_store(path, masks_by_split) -> PatchStore:
    rng = np.random.default_rng(0)
    with PatchStoreWriter(path, GRADES, P, "20x", labels=False, regions=True) as writer:
        for k, (split, mask) in enumerate(masks_by_split):
            image = rng.integers(0, 256, (P, P, 3), dtype=np.uint8)
            writer.add(Patch(image=image, inst_map=None, type_map=None, split=split, y=0, x=8 * k, crop=P,
                             source="s", region_map=mask.astype(np.int32)))
    return PatchStore(path)


def test_shape_bank_of_a_region_store(tmp_path):
    masks = _masks()
    store = _region_store(tmp_path / "store", [("train", masks[0]), ("test", masks[1]), ("train", masks[2]),
                                               ("train", masks[3])])
    bank = shape_bank(store, "train")
    assert len(bank) == 3 and bank.class_names == GRADES and bank.patch_size == P
    assert bank.indices.tolist() == [0, 2, 3] and bank.num_shapes.tolist() == [1, 3, 4]  # one-label mask kept
    for row, mask in zip(range(3), (masks[0], masks[2], masks[3])):
        np.testing.assert_array_equal(bank.shape(row), frequency_relabel(mask)[0])
    assert bank.shape_pixels.tolist() == [[64, 0, 0, 0], [32, 24, 8, 0], [24, 16, 16, 8]]
    assert len(shape_bank(tmp_path / "store", None)) == 4  # a path, every split

    tile_set = sample_tile_masks(bank, "GG3", "GG5", 40, 2)
    _shares_ok(tile_set)
    out = write_tile_sets(tmp_path / "out", [tile_set], GRADES)
    row = json.loads((out / "sets.jsonl").read_text(encoding="utf-8"))
    assert {t["shape"] for t in row["tiles"]} <= {0, 2, 3}  # store indices
    assert row["shape_source"] == str(tmp_path / "store")


def test_shape_bank_errors_name_the_store(tmp_path):
    store = _region_store(tmp_path / "train-only", [("train", _masks()[1])])
    with pytest.raises(DataError, match="no patches in the 'test' split") as err:
        shape_bank(store, "test")
    assert str(tmp_path / "train-only") in str(err.value)
    with pytest.raises(DataError, match="unknown split"):
        shape_bank(store, "val")
    with PatchStoreWriter(tmp_path / "images", (), P, "20x", labels=False) as writer:
        writer.add(Patch(image=np.zeros((P, P, 3), np.uint8), inst_map=None, type_map=None, split="train", y=0, x=0,
                         crop=P, source="s"))
    with pytest.raises(DataError, match="not a region store") as err:
        shape_bank(tmp_path / "images")
    assert str(tmp_path / "images") in str(err.value)
    with pytest.raises(DataError, match="no masks"):
        ShapeBank.from_masks([], source="nothing")
