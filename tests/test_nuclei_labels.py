"""Labels of generated images (HistoSmith): the distance map, instances recovered from a semantic mask + distance map
(the one watershed shared with the segmenter), and the label writers, read back by the project's own readers."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio

from histosynth.data.formats import read_consep, read_folder
from histosynth.data.formats.consep import MERGED
from histosynth.data.formats.writers import (
    hovernet_labels,
    write_class_names,
    write_folder_item,
    write_hovernet_item,
)
from histosynth.data.nuclei_maps import PostprocessConfig, distance_targets, instances_from_maps
from histosynth.errors import DataError


# ------------------------------------------------------------------------------------------ helpers
def _disk(shape, cy, cx, r):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r**2


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def assert_same_partition(a: np.ndarray, b: np.ndarray) -> None:
    """Same background and a 1:1 mapping between instance ids with identical pixel sets (ids may differ)."""
    assert a.shape == b.shape
    assert np.array_equal(a == 0, b == 0)
    pairs = np.unique(np.stack([a[a > 0], b[b > 0]]), axis=1)  # distinct (id in a, id in b) pairs
    n_a, n_b = np.unique(a[a > 0]).size, np.unique(b[b > 0]).size
    assert pairs.shape[1] == n_a == n_b  # no id of either side pairs with two ids of the other


# ------------------------------------------------------------------------------------------ distance map
def test_distance_map_of_two_touching_nuclei_matches_hand_computed_values():
    # nucleus 1: a 5x5 square; nucleus 2: a 3x3 square touching nucleus 1 on its left and the image edge on its right
    inst = np.zeros((7, 9), np.int32)
    inst[1:6, 1:6] = 1
    inst[2:5, 6:9] = 2
    # Euclidean distance to the nearest pixel that is not this nucleus (background, the other nucleus or beyond the
    # image edge), divided by the nucleus' maximum: 5x5 → border 1, next ring 2, centre 3 (max 3);
    # 3x3 → border 1, centre 2 (max 2). Had the image edge not counted as outside, (3, 8) would be 2/2 = 1;
    # had the other nucleus not counted, (3, 6) would be far from 1/2.
    t, s, h = 1 / 3, 2 / 3, 1 / 2
    expected = np.array([
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
        [0, t, t, t, t, t, 0, 0, 0],
        [0, t, s, s, s, t, h, h, h],
        [0, t, s, 1, s, t, h, 1, h],
        [0, t, s, s, s, t, h, h, h],
        [0, t, t, t, t, t, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 0, 0, 0],
    ])
    d = distance_targets(inst)
    assert d.dtype == np.float32 and d.shape == inst.shape
    np.testing.assert_allclose(d, expected, atol=1e-6)


# ------------------------------------------------------------------------------------------ watershed recovery
@pytest.mark.parametrize("types", [(1, 2), (2, 2)], ids=["different-types", "same-type"])
def test_instances_from_maps_splits_two_touching_nuclei(types):
    shape = (48, 64)
    a, b = _disk(shape, 24, 24, 10), _disk(shape, 24, 40, 10)  # overlapping discs: one touching blob
    inst = np.zeros(shape, np.int32)
    inst[a] = 1
    inst[b & ~a] = 2
    assert len(np.unique(inst)) == 3 and (a & b).any()
    type_map = np.select([inst == 1, inst == 2], list(types), 0)
    semantic = np.eye(3, dtype=np.float32)[type_map].transpose(2, 0, 1)  # one-hot (K+1, H, W), channel 0 background
    pred_inst, pred_type = instances_from_maps(semantic, distance_targets(inst), probabilities=True)

    assert pred_inst.dtype == np.int32 and pred_type.dtype == np.int32 and pred_inst.shape == shape
    assert sorted(np.unique(pred_inst)) == [0, 1, 2]  # exactly two instances
    matched = set()
    for label, want in zip((1, 2), types):
        true = inst == label
        hit = np.bincount(pred_inst[true]).argmax()
        matched.add(hit)
        assert hit > 0 and _iou(true, pred_inst == hit) > 0.8
        assert set(np.unique(pred_type[pred_inst == hit])) == {want}
    assert matched == {1, 2}
    assert np.array_equal(pred_type > 0, pred_inst > 0)

    # the segmenter's post-processing is the same function: logits of the same mask give the same instances
    from histosynth.evaluate.segmenter import PostprocessConfig as SegConfig
    from histosynth.evaluate.segmenter import postprocess

    assert SegConfig is PostprocessConfig
    seg_inst, seg_type = postprocess((semantic * 2 - 1) * 8, distance_targets(inst), PostprocessConfig())
    assert np.array_equal(seg_inst, pred_inst) and np.array_equal(seg_type, pred_type)


def test_instances_from_maps_checks_shapes():
    with pytest.raises(ValueError, match="expected semantic"):
        instances_from_maps(np.zeros((3, 8, 8)), np.zeros((8, 9)))


# ------------------------------------------------------------------------------------------ writers, round trips
@pytest.fixture(scope="module")
def consep_record(shared_data):
    """A real CoNSeP train patch (the project's reader), with many nuclei, some touching."""
    recs = list(islice(read_consep(shared_data / "consep" / "train"), 4))
    rec = max(recs, key=lambda r: int(r.inst_map.max()))
    assert rec.inst_map.max() > 20 and rec.class_names == MERGED
    return rec


def _scrambled_ids(inst: np.ndarray) -> np.ndarray:
    """The same partition with non-contiguous, shuffled ids (what a generator's labels may look like)."""
    ids = np.unique(inst[inst > 0])
    new = np.random.default_rng(1).permutation(ids.size) * 7 + 5
    lut = np.zeros(int(inst.max()) + 1, np.int64)
    lut[ids] = new
    return lut[inst].astype(np.int32)


def test_folder_round_trip_on_real_consep(consep_record, tmp_path):
    rec = consep_record
    inst = _scrambled_ids(rec.inst_map)
    root = tmp_path / "set"
    write_class_names(root, rec.class_names)
    paths = write_folder_item(root, "patch_a", rec.image, inst, rec.type_map)
    assert [p.name for p in paths] == ["patch_a.png", "patch_a_inst.png", "patch_a_type.png"]
    (back,) = read_folder(root)
    assert back.class_names == rec.class_names
    assert np.array_equal(back.image, rec.image)
    assert np.array_equal(back.inst_map, inst)  # ids fit uint16: kept as they were
    assert_same_partition(back.inst_map, rec.inst_map)
    assert np.array_equal(back.type_map, rec.type_map)


def test_hovernet_round_trip_on_real_consep(consep_record, shared_data, tmp_path):
    rec = consep_record
    root = tmp_path / "set"
    image_path, mat_path = write_hovernet_item(root / "train", "patch_a", rec.image, _scrambled_ids(rec.inst_map),
                                               rec.type_map)
    write_hovernet_item(root / "test", "patch_b", rec.image[:, ::-1], rec.inst_map[:, ::-1], rec.type_map[:, ::-1])
    assert image_path == root / "train" / "images" / "patch_a.png"
    assert mat_path == root / "train" / "labels" / "patch_a.mat"

    # the .mat holds what HoVer-Net's CoNSeP files hold: compare with the dataset's own file for this patch
    ours = sio.loadmat(str(mat_path))
    src = Path(rec.source)
    theirs = sio.loadmat(str(src.parent.parent / "labels" / f"{src.stem}.mat"))
    for key, dtype in (("inst_map", np.int32), ("type_map", np.int32), ("inst_type", np.int32),
                       ("inst_centroid", np.float64)):
        assert ours[key].dtype == dtype and ours[key].shape == theirs[key].shape, key
    assert_same_partition(ours["inst_map"], theirs["inst_map"])
    assert sorted(np.unique(ours["inst_map"])) == list(range(int(theirs["inst_map"].max()) + 1))  # renumbered 1..N
    # row k-1 belongs to instance k: match our ids to theirs through one pixel of each instance
    first = {int(o): int(t) for o, t in zip(ours["inst_map"].ravel(), theirs["inst_map"].ravel()) if o}
    order = np.array([first[k] for k in range(1, len(first) + 1)]) - 1
    assert np.array_equal(ours["inst_type"], theirs["inst_type"][order])
    np.testing.assert_allclose(ours["inst_centroid"], theirs["inst_centroid"][order], rtol=0, atol=1e-9)

    by_split = {r.split: r for r in read_consep(root)}  # merged CoNSeP classes, no classes.txt needed
    assert set(by_split) == {"train", "test"}
    back = by_split["train"]
    assert back.class_names == MERGED
    assert np.array_equal(back.image, rec.image)
    assert_same_partition(back.inst_map, rec.inst_map)
    assert np.array_equal(back.type_map, rec.type_map)
    assert_same_partition(by_split["test"].inst_map, rec.inst_map[:, ::-1])


def test_hovernet_export_of_a_generated_set_keeps_its_own_class_names(tmp_path):
    names = ("connective", "immune", "neoplastic", "dead", "epithelial", "other")
    inst = np.zeros((16, 16), np.int32)
    inst[1:5, 1:5], inst[8:14, 2:7], inst[9:15, 9:15] = 3, 9, 4
    types = np.select([inst == 3, inst == 9, inst == 4], [6, 5, 1], 0)
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    write_hovernet_item(tmp_path, "gen_0", image, inst, types)
    with pytest.raises(DataError, match="outside the 'merged' CoNSeP classes"):
        list(read_consep(tmp_path))  # without classes.txt, types 5 and 6 are not CoNSeP's
    write_class_names(tmp_path, names)
    assert (tmp_path / "classes.txt").read_text() == "".join(f"{n}\n" for n in names)
    (back,) = read_consep(tmp_path)
    assert back.class_names == names
    assert_same_partition(back.inst_map, inst)
    assert np.array_equal(back.type_map, types)
    with pytest.raises(DataError, match="reads the 7 original CoNSeP types"):
        read_consep(tmp_path, classes="original")


def test_hovernet_labels_types_and_centroids():
    inst = np.zeros((6, 8), np.int32)
    inst[0:2, 0:3] = 5  # pixels (0..1, 0..2): centroid x = 1, y = 0.5
    inst[3:6, 6:8] = 2  # pixels (3..5, 6..7): centroid x = 6.5, y = 4
    types = np.where(inst > 0, 3, 0)
    types[0, 0] = 1  # one stray pixel: the majority (3) wins
    types[3:6, 6] = 0  # untyped pixels are not votes: instance 2 is type 3
    labels = hovernet_labels(inst, types)
    assert labels["inst_map"][0, 0] == 2 and labels["inst_map"][3, 6] == 1  # renumbered in order of the old ids
    assert labels["inst_type"].tolist() == [[3], [3]]
    np.testing.assert_allclose(labels["inst_centroid"], [[6.5, 4.0], [1.0, 0.5]])
    empty = hovernet_labels(np.zeros((4, 4), np.int32), np.zeros((4, 4), np.int32))
    assert empty["inst_type"].shape == (0, 1) and empty["inst_centroid"].shape == (0, 2)


def test_folder_writer_limits(tmp_path):
    image = np.zeros((300, 300, 3), np.uint8)
    many = np.arange(1, 300 * 300 + 1, dtype=np.int32).reshape(300, 300)  # 90,000 one-pixel instances
    with pytest.raises(DataError, match="do not fit a uint16"):
        write_folder_item(tmp_path / "a", "x", image, many, np.zeros_like(many))
    sparse = np.zeros((300, 300), np.int32)
    sparse[:10, :10], sparse[50:60, 50:60] = 70_000, 3  # few instances, one id past uint16: renumbered, not refused
    write_class_names(tmp_path / "b", ["a"])
    write_folder_item(tmp_path / "b", "x", image, sparse, (sparse > 0).astype(np.int32))
    (back,) = read_folder(tmp_path / "b")
    assert_same_partition(back.inst_map, sparse)
    with pytest.raises(DataError, match="uint8 type PNG"):
        write_folder_item(tmp_path / "c", "x", image, sparse, np.where(sparse > 0, 300, 0))
    with pytest.raises(ValueError, match="_inst"):
        write_folder_item(tmp_path / "d", "x_inst", image, sparse, sparse)
    with pytest.raises(ValueError, match="plain"):
        write_folder_item(tmp_path / "d", "../x", image, sparse, sparse)
