"""Instance-segmentation metrics on hand-drawn toy maps (expected values worked out by hand) and on CoNSeP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from histosynth.evaluate.instance_metrics import (
    PQAccumulator, aggregated_jaccard_index, bland_altman, bland_altman_plot, counts_per_type, dice,
    multiclass_pq, panoptic_quality, pearson_r, per_type_pq,
)

SHARED = Path(__file__).resolve().parents[2] / "shared"

A = np.array  # short for the drawings below


# ------------------------------------------------------------------------------------ binary metrics
def test_perfect_match_with_other_labels():
    true = A([[0, 0, 0, 0, 0, 0],
              [0, 1, 1, 0, 2, 2],
              [0, 1, 1, 0, 2, 2],
              [0, 0, 0, 0, 0, 0]])
    pred = A([[0, 0, 0, 0, 0, 0],
              [0, 7, 7, 0, 3, 3],
              [0, 7, 7, 0, 3, 3],
              [0, 0, 0, 0, 0, 0]])
    pq = panoptic_quality(true, pred)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (2, 0, 0)
    assert pq["dq"] == pq["sq"] == pq["pq"] == 1.0
    assert sorted(pq["pairs"]) == [(1, 7, 1.0), (2, 3, 1.0)]
    assert aggregated_jaccard_index(true, pred) == 1.0
    assert dice(pred, true) == 1.0


def test_missed_and_spurious_nucleus():
    true = A([[0, 0, 0, 0, 0, 0, 0],
              [0, 1, 1, 0, 2, 2, 0],
              [0, 1, 1, 0, 2, 2, 0],
              [0, 0, 0, 0, 0, 0, 0],
              [0, 0, 0, 0, 0, 0, 0]])
    pred = A([[0, 0, 0, 0, 0, 0, 0],
              [0, 1, 1, 0, 0, 0, 0],
              [0, 1, 1, 0, 0, 0, 0],
              [0, 0, 0, 0, 0, 0, 0],
              [0, 0, 0, 5, 5, 0, 0]])
    # true 1 = pred 1 (IoU 4/4); true 2 (4 px) unmatched -> FN; pred 5 (2 px) unmatched -> FP
    pq = panoptic_quality(true, pred)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (1, 1, 1)
    assert pq["dq"] == pytest.approx(1 / (1 + 0.5 + 0.5))  # 0.5
    assert pq["sq"] == 1.0
    assert pq["pq"] == pytest.approx(0.5)
    # AJI = inter(1,1) / (union(1,1) + |true 2| + |pred 5|) = 4 / (4 + 4 + 2)
    assert aggregated_jaccard_index(true, pred) == pytest.approx(0.4)
    # Dice: |T| = 8, |P| = 6, |T∩P| = 4 -> 8/14
    assert dice(pred, true) == pytest.approx(4 / 7)


SPLIT_TRUE = A([[0, 0, 0, 0, 0, 0],
                [0, 1, 1, 1, 1, 0],
                [0, 1, 1, 1, 1, 0],
                [0, 0, 0, 0, 0, 0]])
SPLIT_PRED = A([[0, 0, 0, 0, 0, 0],
                [0, 1, 1, 2, 2, 0],
                [0, 1, 1, 2, 2, 0],
                [0, 0, 0, 0, 0, 0]])


def test_split_nucleus():
    # true 1 has 8 px; each half has 4 px inside it: IoU = 4/8 = 0.5, not > 0.5 -> no match
    pq = panoptic_quality(SPLIT_TRUE, SPLIT_PRED)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (0, 2, 1)
    assert pq["dq"] == pq["sq"] == pq["pq"] == 0.0
    # AJI: true 1 takes pred 1 (tie at 0.5, lowest label): inter 4, union 8; pred 2 unpaired adds 4
    # -> 4 / (8 + 4) = 1/3
    assert aggregated_jaccard_index(SPLIT_TRUE, SPLIT_PRED) == pytest.approx(1 / 3)
    assert dice(SPLIT_PRED, SPLIT_TRUE) == 1.0  # same foreground


def test_split_nucleus_lower_threshold_uses_one_to_one_assignment():
    # at IoU > 0.3 one half (0.5) is matched: TP 1, FP 1, FN 0 -> DQ = 1/1.5, SQ = 0.5, PQ = 1/3
    pq = panoptic_quality(SPLIT_TRUE, SPLIT_PRED, match_iou=0.3)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (1, 1, 0)
    assert pq["dq"] == pytest.approx(2 / 3)
    assert pq["sq"] == pytest.approx(0.5)
    assert pq["pq"] == pytest.approx(1 / 3)


def test_shifted_nucleus_above_half_iou():
    true = A([[0, 0, 0, 0, 0, 0, 0],
              [0, 1, 1, 1, 1, 0, 0],
              [0, 1, 1, 1, 1, 0, 0],
              [0, 1, 1, 1, 1, 0, 0],
              [0, 1, 1, 1, 1, 0, 0],
              [0, 0, 0, 0, 0, 0, 0]])
    pred = np.roll(true, 1, axis=1)  # one column right
    # 16 px each, overlap 4x3 = 12, union 16 + 16 - 12 = 20 -> IoU 0.6
    pq = panoptic_quality(true, pred)
    assert (pq["tp"], pq["fp"], pq["fn"]) == (1, 0, 0)
    assert pq["dq"] == 1.0
    assert pq["sq"] == pytest.approx(0.6)
    assert pq["pq"] == pytest.approx(0.6)
    assert aggregated_jaccard_index(true, pred) == pytest.approx(12 / 20)
    assert dice(pred, true) == pytest.approx(2 * 12 / 32)  # 0.75


def test_empty_conventions():
    empty = np.zeros((4, 4), int)
    one = empty.copy()
    one[1:3, 1:3] = 1
    assert dice(empty, empty) == 1.0
    assert aggregated_jaccard_index(empty, empty) == 1.0
    assert panoptic_quality(empty, empty)["pq"] == 1.0
    assert dice(empty, one) == 0.0
    assert aggregated_jaccard_index(one, empty) == 0.0
    assert aggregated_jaccard_index(empty, one) == 0.0
    assert panoptic_quality(one, empty)["pq"] == 0.0
    assert panoptic_quality(empty, one)["fp"] == 1


# ---------------------------------------------------------------------------------------- with types
# Image 1: nuclei A (label 1) and B (label 2), both segmented exactly; B is predicted with the wrong type.
IMG1_TRUE_INST = A([[0, 0, 0, 0, 0, 0],
                    [0, 1, 1, 0, 2, 2],
                    [0, 1, 1, 0, 2, 2],
                    [0, 0, 0, 0, 0, 0]])
IMG1_TRUE_TYPE = A([[0, 0, 0, 0, 0, 0],
                    [0, 1, 1, 0, 2, 2],
                    [0, 1, 1, 0, 2, 2],
                    [0, 0, 0, 0, 0, 0]])
IMG1_PRED_INST = IMG1_TRUE_INST.copy()
IMG1_PRED_TYPE = A([[0, 0, 0, 0, 0, 0],
                    [0, 1, 1, 0, 1, 1],
                    [0, 1, 1, 0, 2, 1],   # B: pixel types 1,1,2,1 -> majority type 1 (wrong)
                    [0, 0, 0, 0, 0, 0]])
# Image 2: a type-1 nucleus predicted shifted (IoU 12/20 = 0.6) and a type-2 nucleus predicted exactly.
IMG2_TRUE_INST = A([[0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                    [0, 1, 1, 1, 1, 0, 0, 0, 0, 0],
                    [0, 1, 1, 1, 1, 0, 0, 2, 2, 0],
                    [0, 1, 1, 1, 1, 0, 0, 2, 2, 0],
                    [0, 1, 1, 1, 1, 0, 0, 0, 0, 0],
                    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
IMG2_PRED_INST = A([[0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                    [0, 0, 4, 4, 4, 4, 0, 0, 0, 0],
                    [0, 0, 4, 4, 4, 4, 0, 9, 9, 0],
                    [0, 0, 4, 4, 4, 4, 0, 9, 9, 0],
                    [0, 0, 4, 4, 4, 4, 0, 0, 0, 0],
                    [0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
IMG2_TRUE_TYPE = np.where(IMG2_TRUE_INST == 1, 1, 0) + np.where(IMG2_TRUE_INST == 2, 2, 0)
IMG2_PRED_TYPE = np.where(IMG2_PRED_INST == 4, 1, 0) + np.where(IMG2_PRED_INST == 9, 2, 0)


def test_per_type_pq_wrong_type_is_fn_and_fp():
    res = per_type_pq(IMG1_TRUE_INST, IMG1_TRUE_TYPE, IMG1_PRED_INST, IMG1_PRED_TYPE, num_classes=3)
    # type 1: true {A}, pred {A, B} -> TP 1 (IoU 1), FP 1 -> DQ = 1/1.5, SQ 1
    assert (res[1]["tp"], res[1]["fp"], res[1]["fn"]) == (1, 1, 0)
    assert res[1]["pq"] == pytest.approx(2 / 3)
    # type 2: true {B}, pred {} -> FN 1 -> PQ 0
    assert (res[2]["tp"], res[2]["fp"], res[2]["fn"]) == (0, 0, 1)
    assert res[2]["pq"] == 0.0
    # type 3: in neither -> NaN, left out of mPQ
    assert np.isnan(res[3]["pq"])
    m = multiclass_pq(IMG1_TRUE_INST, IMG1_TRUE_TYPE, IMG1_PRED_INST, IMG1_PRED_TYPE, num_classes=3)
    assert m["mpq"] == pytest.approx((2 / 3 + 0.0) / 2)
    assert m["pq"] == 1.0  # class-agnostic segmentation is perfect


def test_accumulator_equals_hand_aggregation_over_two_images():
    acc = PQAccumulator(num_classes=2)
    acc.update(IMG1_TRUE_INST, IMG1_TRUE_TYPE, IMG1_PRED_INST, IMG1_PRED_TYPE)
    acc.update(IMG2_TRUE_INST, IMG2_TRUE_TYPE, IMG2_PRED_INST, IMG2_PRED_TYPE)
    out = acc.compute()
    # type 1: image 1 TP 1 FP 1 ΣIoU 1.0; image 2 TP 1 ΣIoU 0.6 -> TP 2, FP 1, FN 0, ΣIoU 1.6
    #   DQ = 2 / (2 + 0.5) = 0.8, SQ = 1.6 / 2 = 0.8, PQ = 0.64
    assert out["counts_per_type"][1] == dict(tp=2, fp=1, fn=0, sum_iou=pytest.approx(1.6))
    assert out["dq_per_type"][1] == pytest.approx(0.8)
    assert out["sq_per_type"][1] == pytest.approx(0.8)
    assert out["pq_per_type"][1] == pytest.approx(0.64)
    # type 2: image 1 FN 1; image 2 TP 1 ΣIoU 1.0 -> DQ = 1 / 1.5, SQ 1, PQ 2/3
    assert out["pq_per_type"][2] == pytest.approx(2 / 3)
    assert out["mpq"] == pytest.approx((0.64 + 2 / 3) / 2)
    # not the mean of per-image mPQ: image 1 (2/3 + 0)/2, image 2 (0.6 + 1)/2 -> 0.5667
    assert out["mpq"] != pytest.approx(((2 / 3) / 2 + 1.6 / 2) / 2)
    # class-agnostic: TP 4 (IoUs 1, 1, 0.6, 1) -> DQ 1, SQ 0.9, PQ 0.9; per-image PQ 1.0 and 0.8
    assert (out["dq"], out["sq"], out["pq"]) == (1.0, pytest.approx(0.9), pytest.approx(0.9))
    assert out["pq_image_mean"] == pytest.approx((1.0 + 0.8) / 2)
    assert out["n_images"] == 2


def test_counts_per_type_by_majority():
    counts = counts_per_type(IMG1_PRED_INST, IMG1_PRED_TYPE, num_classes=3)
    np.testing.assert_array_equal(counts, [0, 2, 0, 0])  # both instances are type 1 by majority
    np.testing.assert_array_equal(counts_per_type(IMG2_TRUE_INST, IMG2_TRUE_TYPE, 2), [0, 1, 1])
    with pytest.raises(ValueError):
        counts_per_type(IMG2_TRUE_INST, IMG2_TRUE_TYPE, 1)


# ------------------------------------------------------------------------------------------ agreement
REQUESTED = A([12, 30, 7, 45, 22, 18, 3])
GENERATED = A([10, 33, 9, 40, 25, 18, 5])


def test_pearson_and_bland_altman_against_numpy():
    assert pearson_r(REQUESTED, GENERATED) == pytest.approx(np.corrcoef(REQUESTED, GENERATED)[0, 1])
    assert np.isnan(pearson_r([1, 1, 1], [1, 2, 3]))
    d = GENERATED - REQUESTED  # [-2, 3, 2, -5, 3, 0, 2]: mean 3/7
    sd = np.std(d, ddof=1)
    ba = bland_altman(REQUESTED, GENERATED)
    assert ba["mean_diff"] == pytest.approx(np.mean(d))
    assert ba["mean_diff"] == pytest.approx(3 / 7)
    assert ba["sd"] == pytest.approx(sd)
    assert ba["loa_low"] == pytest.approx(np.mean(d) - 1.96 * sd)
    assert ba["loa_high"] == pytest.approx(np.mean(d) + 1.96 * sd)


def test_bland_altman_plot_writes_png(tmp_path):
    path = bland_altman_plot(REQUESTED, GENERATED, tmp_path / "ba" / "counts.png", title="counts")
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------------------------------ real data
def test_consep_label_against_itself_and_eroded():
    files = sorted((SHARED / "data" / "consep" / "test" / "labels").glob("*.mat"))
    if not files:
        pytest.skip("CoNSeP labels are not in ../shared/data")
    from scipy.io import loadmat

    mat = loadmat(str(files[0]))
    inst, types = mat["inst_map"].astype(np.int64), mat["type_map"].astype(np.int64)
    num_classes = 4  # merged CoNSeP types 1..4
    assert panoptic_quality(inst, inst)["pq"] == 1.0
    assert multiclass_pq(inst, types, inst, types, num_classes)["mpq"] == 1.0

    # erode every instance by 2 px (a pixel survives if its whole radius-2 diamond has its label)
    foot = ndimage.iterate_structure(ndimage.generate_binary_structure(2, 1), 2)
    same = (ndimage.grey_erosion(inst, footprint=foot) == inst) & (ndimage.grey_dilation(inst, footprint=foot) == inst)
    eroded = np.where(same, inst, 0)
    pq = panoptic_quality(inst, eroded)
    assert 0 < pq["pq"] < 1
    assert pq["tp"] > 0
    assert dice(eroded, inst) < 1
    assert 0 < aggregated_jaccard_index(inst, eroded) < 1
