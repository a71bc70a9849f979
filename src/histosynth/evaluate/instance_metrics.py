"""Nuclei instance-segmentation metrics with their standard definitions (pure numpy/scipy).

Inputs are instance maps: 2-D integer arrays where 0 is background and every other value labels one
nucleus (labels need not be contiguous). Type maps are per-pixel integer maps of the same shape with
0 = background and 1..num_classes = nucleus types; an instance's type is the majority type of its pixels.

Definitions follow HoVer-Net's `compute_stats.py` (Graham et al. 2019: `get_dice_1`, `get_fast_aji`,
`get_fast_pq`) and the CoNIC challenge's mPQ+ (Graham et al. 2021, `compute_stats.py`), with two
deliberate differences, both documented where they apply:

* no ``+1e-6`` in denominators, so values are exact (HoVer-Net's SQ of a perfect match is 0.999999);
* empty inputs: prediction and truth both empty count as perfect agreement (1.0) for Dice, AJI and PQ,
  where HoVer-Net returns 0 (from 0/1e-6) or NaN (0/0). One side empty and the other not gives 0.0.
  In the per-type aggregation a type absent from both truth and prediction has PQ NaN and is left out
  of mPQ (CoNIC would count it as 0; with all types present, as in CoNIC, the two agree).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment

__all__ = [
    "dice", "aggregated_jaccard_index", "panoptic_quality", "per_type_pq", "multiclass_pq", "PQAccumulator",
    "instance_types", "counts_per_type", "pearson_r", "bland_altman", "bland_altman_plot",
]


# ----------------------------------------------------------------------------------------------- helpers
def _as_label_map(a, name: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim != 2:
        raise ValueError(f"{name} must be a 2-D map, got shape {a.shape}")
    if not (np.issubdtype(a.dtype, np.integer) or a.dtype == bool):
        if not np.all(np.mod(a, 1) == 0):
            raise ValueError(f"{name} must hold integer labels")
    a = a.astype(np.int64)
    if a.size and a.min() < 0:
        raise ValueError(f"{name} must hold non-negative labels (0 = background)")
    return a


def _relabel(inst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(original ids of the instances, map relabelled to 0 = background and 1..n in id order)."""
    ids, inverse = np.unique(inst, return_inverse=True)
    inverse = inverse.reshape(inst.shape)
    if ids.size and ids[0] == 0:
        return ids[1:], inverse
    return ids, inverse + 1


def _overlaps(true_inst, pred_inst):
    """Pairwise intersection/union matrices (true × pred) from one joint histogram of the two maps.

    Returns (true_ids, pred_ids, inter, union, true_area, pred_area); dense (n_true × n_pred), which is
    small for patches (a 1000 px CoNSeP tile with ~800 nuclei each side is a 640k-entry matrix).
    """
    t = _as_label_map(true_inst, "true_inst")
    p = _as_label_map(pred_inst, "pred_inst")
    if t.shape != p.shape:
        raise ValueError(f"true_inst {t.shape} and pred_inst {p.shape} differ in shape")
    t_ids, t_lab = _relabel(t)
    p_ids, p_lab = _relabel(p)
    nt, npr = t_ids.size, p_ids.size
    joint = np.bincount((t_lab * (npr + 1) + p_lab).ravel(), minlength=(nt + 1) * (npr + 1))
    joint = joint.reshape(nt + 1, npr + 1)
    inter = joint[1:, 1:].astype(np.float64)
    t_area = joint[1:, :].sum(1).astype(np.float64)
    p_area = joint[:, 1:].sum(0).astype(np.float64)
    union = t_area[:, None] + p_area[None, :] - inter
    return t_ids, p_ids, inter, union, t_area, p_area


def _match(iou: np.ndarray, match_iou: float) -> tuple[np.ndarray, np.ndarray]:
    """Row/column indices of matched pairs: IoU strictly above `match_iou`, each instance used once.

    As HoVer-Net's `get_fast_pq`: for match_iou >= 0.5 the pairs with IoU > match_iou are unique by
    construction (Kirillov et al. 2019, Theorem 1); below 0.5 a maximal-IoU one-to-one assignment
    (Hungarian) is made first and then thresholded.
    """
    if match_iou < 0:
        raise ValueError("match_iou must be >= 0")
    if iou.size == 0:
        return np.zeros(0, int), np.zeros(0, int)
    if match_iou >= 0.5:
        rows, cols = np.nonzero(iou > match_iou)
    else:
        rows, cols = linear_sum_assignment(-iou)
        keep = iou[rows, cols] > match_iou
        rows, cols = rows[keep], cols[keep]
    return rows, cols


def _pq_from_counts(tp: float, fp: float, fn: float, sum_iou: float) -> tuple[float, float, float]:
    """(DQ, SQ, PQ) from matched counts: DQ = TP/(TP + FP/2 + FN/2), SQ = ΣIoU/TP, PQ = DQ·SQ."""
    if tp + fp + fn == 0:
        return float("nan"), float("nan"), float("nan")
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = sum_iou / tp if tp > 0 else 0.0
    return float(dq), float(sq), float(dq * sq)


# --------------------------------------------------------------------------------------------- metrics
def dice(pred_inst, true_inst) -> float:
    """Binary Dice of the foreground, 2|P∩T| / (|P| + |T|) — HoVer-Net's DICE1 (`get_dice_1`).

    Both maps empty → 1.0 (HoVer-Net: 0/0 = NaN).
    """
    p = np.asarray(pred_inst) > 0
    t = np.asarray(true_inst) > 0
    if p.shape != t.shape:
        raise ValueError(f"pred_inst {p.shape} and true_inst {t.shape} differ in shape")
    denom = int(p.sum()) + int(t.sum())
    if denom == 0:
        return 1.0
    return 2.0 * int(np.logical_and(p, t).sum()) / denom


def aggregated_jaccard_index(true_inst, pred_inst) -> float:
    """Aggregated Jaccard Index (Kumar et al. 2017, IEEE TMI), as HoVer-Net's `get_fast_aji`.

    Each true instance G_i is paired with the predicted instance S_j of maximal IoU (a prediction may
    serve several true instances; ties go to the lowest predicted label; only pairs that overlap count).
    AJI = Σ|G_i ∩ S_j| / (Σ|G_i ∪ S_j| + Σ|unpaired true| + Σ|unpaired predicted|), where "unpaired"
    means not chosen by any pair. Both maps empty → 1.0 (HoVer-Net: 0/0); one side empty → 0.0.
    """
    _, _, inter, union, t_area, p_area = _overlaps(true_inst, pred_inst)
    if t_area.size == 0 and p_area.size == 0:
        return 1.0
    overall_inter = overall_union = 0.0
    paired_true = np.zeros(t_area.size, bool)
    paired_pred = np.zeros(p_area.size, bool)
    if inter.size:
        iou = inter / union
        best = np.argmax(iou, axis=1)
        rows = np.nonzero(iou[np.arange(t_area.size), best] > 0)[0]
        cols = best[rows]
        overall_inter = inter[rows, cols].sum()
        overall_union = union[rows, cols].sum()
        paired_true[rows] = True
        paired_pred[cols] = True
    overall_union += t_area[~paired_true].sum() + p_area[~paired_pred].sum()
    return float(overall_inter / overall_union)


def panoptic_quality(true_inst, pred_inst, match_iou: float = 0.5) -> dict:
    """Panoptic Quality (Kirillov et al. 2019, CVPR) for one class, as HoVer-Net's `get_fast_pq`.

    True and predicted instances are matched when IoU > `match_iou` (unique for match_iou >= 0.5).
    DQ = TP / (TP + FP/2 + FN/2), SQ = Σ IoU(matched) / TP, PQ = DQ·SQ.
    Returns dict(dq, sq, pq, tp, fp, fn, sum_iou, pairs) with pairs = [(true_id, pred_id, iou), ...].
    Both maps empty → dq = sq = pq = 1.0 (HoVer-Net: 0); no match → sq = 0.
    """
    t_ids, p_ids, inter, union, _, _ = _overlaps(true_inst, pred_inst)
    iou = inter / np.maximum(union, 1.0)
    rows, cols = _match(iou, match_iou)
    tp, fp, fn = rows.size, p_ids.size - rows.size, t_ids.size - rows.size
    sum_iou = float(iou[rows, cols].sum())
    if tp + fp + fn == 0:
        dq = sq = pq = 1.0
    else:
        dq, sq, pq = _pq_from_counts(tp, fp, fn, sum_iou)
    pairs = [(int(t_ids[r]), int(p_ids[c]), float(iou[r, c])) for r, c in zip(rows, cols)]
    return dict(dq=dq, sq=sq, pq=pq, tp=int(tp), fp=int(fp), fn=int(fn), sum_iou=sum_iou, pairs=pairs)


# ------------------------------------------------------------------------------------------- with types
def instance_types(inst_map, type_map) -> tuple[np.ndarray, np.ndarray]:
    """(instance ids, their types): each instance's type is the majority type among its pixels.

    Background (0) pixels of the type map are ignored unless the instance has no typed pixel at all
    (type 0); ties go to the lowest type — HoVer-Net's convention for its per-instance type.
    """
    inst = _as_label_map(inst_map, "inst_map")
    types = _as_label_map(type_map, "type_map")
    if inst.shape != types.shape:
        raise ValueError(f"inst_map {inst.shape} and type_map {types.shape} differ in shape (type_map is per pixel)")
    ids, lab = _relabel(inst)
    n_types = int(types.max()) + 1 if types.size else 1
    hist = np.bincount((lab * n_types + types).ravel(), minlength=(ids.size + 1) * n_types)
    hist = hist.reshape(ids.size + 1, n_types)[1:]
    typed = hist[:, 1:]
    major = np.where(typed.sum(1) > 0, typed.argmax(1) + 1, 0) if n_types > 1 else np.zeros(ids.size, int)
    return ids, major.astype(np.int64)


def _check_types(types: np.ndarray, num_classes: int, name: str) -> None:
    if types.size and types.max() > num_classes:
        raise ValueError(f"{name} has type {int(types.max())} above num_classes={num_classes}")


def _per_type_stats(true_inst, true_type, pred_inst, pred_type, num_classes, match_iou):
    """Per type k = 1..num_classes: [TP, FP, FN, ΣIoU] of PQ between the type-k instances of each side.

    Instances keep their whole masks when restricted to one type, so IoUs come from one overlap matrix.
    """
    t_ids, p_ids, inter, union, _, _ = _overlaps(true_inst, pred_inst)
    t_ids2, t_types = instance_types(true_inst, true_type)
    p_ids2, p_types = instance_types(pred_inst, pred_type)
    assert np.array_equal(t_ids, t_ids2) and np.array_equal(p_ids, p_ids2)
    _check_types(t_types, num_classes, "true_type")
    _check_types(p_types, num_classes, "pred_type")
    iou = inter / np.maximum(union, 1.0)
    stats = np.zeros((num_classes, 4))
    for k in range(1, num_classes + 1):
        tk, pk = np.nonzero(t_types == k)[0], np.nonzero(p_types == k)[0]
        sub = iou[np.ix_(tk, pk)]
        rows, cols = _match(sub, match_iou)
        stats[k - 1] = rows.size, pk.size - rows.size, tk.size - rows.size, sub[rows, cols].sum()
    return stats


def per_type_pq(true_inst, true_type, pred_inst, pred_type, num_classes: int, match_iou: float = 0.5) -> dict:
    """PQ per nucleus type on one image: {k: dict(dq, sq, pq, tp, fp, fn, sum_iou)} for k = 1..num_classes.

    As CoNIC's `get_multi_pq_info`: for type k, PQ between the true instances of type k and the predicted
    instances of type k (a well segmented nucleus of the wrong type is an FN of its true type and an FP
    of its predicted type). CoNIC selects pixels of type k; here whole instances of majority type k,
    which is the same for type maps constant per instance. A type absent from both sides → NaN.
    """
    stats = _per_type_stats(true_inst, true_type, pred_inst, pred_type, num_classes, match_iou)
    out = {}
    for k, (tp, fp, fn, s) in enumerate(stats, start=1):
        dq, sq, pq = _pq_from_counts(tp, fp, fn, s)
        out[k] = dict(dq=dq, sq=sq, pq=pq, tp=int(tp), fp=int(fp), fn=int(fn), sum_iou=float(s))
    return out


class PQAccumulator:
    """Accumulates PQ statistics over a set of images; `compute()` gives CoNIC's mPQ+ and more.

    mPQ+ (CoNIC, Graham et al. 2021): TP, FP, FN and ΣIoU of each type are summed over all images
    before PQ_k is computed; mPQ+ is the mean of PQ_k over types (types absent from the whole set, in
    truth and prediction, are NaN and left out of the mean). The class-agnostic `pq`, `dq`, `sq` are
    accumulated the same way over all instances ("PQ+"); `pq_image_mean` is the mean of per-image
    class-agnostic PQ (CoNIC's reported "pq"; images empty on both sides count 1.0).
    """

    def __init__(self, num_classes: int, match_iou: float = 0.5):
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        self.num_classes = int(num_classes)
        self.match_iou = float(match_iou)
        self.type_stats = np.zeros((self.num_classes, 4))  # rows: types 1..K; cols: TP, FP, FN, ΣIoU
        self.binary_stats = np.zeros(4)
        self.image_pq: list[float] = []

    def update(self, true_inst, true_type, pred_inst, pred_type) -> "PQAccumulator":
        """Add one image (instance maps and per-pixel type maps of truth and prediction)."""
        self.type_stats += _per_type_stats(true_inst, true_type, pred_inst, pred_type, self.num_classes,
                                           self.match_iou)
        single = panoptic_quality(true_inst, pred_inst, self.match_iou)
        self.binary_stats += [single["tp"], single["fp"], single["fn"], single["sum_iou"]]
        self.image_pq.append(single["pq"])
        return self

    def compute(self) -> dict:
        """dict(pq_per_type, dq_per_type, sq_per_type, counts_per_type, mpq, pq, dq, sq, pq_image_mean, n_images)."""
        pq_t, dq_t, sq_t, counts = {}, {}, {}, {}
        for k, (tp, fp, fn, s) in enumerate(self.type_stats, start=1):
            dq_t[k], sq_t[k], pq_t[k] = _pq_from_counts(tp, fp, fn, s)
            counts[k] = dict(tp=int(tp), fp=int(fp), fn=int(fn), sum_iou=float(s))
        present = [v for v in pq_t.values() if not np.isnan(v)]
        mpq = float(np.mean(present)) if present else float("nan")
        dq, sq, pq = _pq_from_counts(*self.binary_stats)
        return dict(pq_per_type=pq_t, dq_per_type=dq_t, sq_per_type=sq_t, counts_per_type=counts, mpq=mpq,
                    pq=pq, dq=dq, sq=sq,
                    pq_image_mean=float(np.mean(self.image_pq)) if self.image_pq else float("nan"),
                    n_images=len(self.image_pq))


def multiclass_pq(true_inst, true_type, pred_inst, pred_type, num_classes: int, match_iou: float = 0.5) -> dict:
    """mPQ+ of a single image: `PQAccumulator(num_classes).update(...).compute()` (same keys)."""
    return PQAccumulator(num_classes, match_iou).update(true_inst, true_type, pred_inst, pred_type).compute()


def counts_per_type(inst_map, type_map, num_classes: int) -> np.ndarray:
    """Number of instances of each type, by majority pixel type; shape (num_classes + 1,), indexed by type.

    counts[k] is the number of nuclei of type k (1..num_classes); counts[0] the instances with no typed
    pixel. Types above num_classes raise ValueError.
    """
    _, types = instance_types(inst_map, type_map)
    _check_types(types, num_classes, "type_map")
    return np.bincount(types, minlength=num_classes + 1).astype(np.int64)


# ----------------------------------------------------------------------------------------- agreement
def pearson_r(x, y) -> float:
    """Pearson correlation r = cov(x, y) / (σx σy); NaN with fewer than 2 pairs or a constant input."""
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError("x and y must have the same number of values")
    if x.size < 2:
        return float("nan")
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt((dx * dx).sum() * (dy * dy).sum())
    return float((dx * dy).sum() / denom) if denom > 0 else float("nan")


def bland_altman(requested, generated) -> dict:
    """Bland–Altman agreement (Bland & Altman 1986, Lancet) of generated vs requested values.

    d = generated − requested; mean_diff = mean(d), sd = SD(d) with ddof=1, limits of agreement
    mean_diff ± 1.96·sd. Returns dict(mean_diff, sd, loa_low, loa_high, n).
    """
    a = np.asarray(requested, dtype=np.float64).ravel()
    b = np.asarray(generated, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError("requested and generated must have the same number of values")
    d = b - a
    mean_diff = float(d.mean()) if d.size else float("nan")
    sd = float(d.std(ddof=1)) if d.size > 1 else float("nan")
    return dict(mean_diff=mean_diff, sd=sd, loa_low=mean_diff - 1.96 * sd, loa_high=mean_diff + 1.96 * sd,
                n=int(d.size))


def bland_altman_plot(requested, generated, path, title: str = "Bland–Altman") -> Path:
    """Write a Bland–Altman PNG: difference (generated − requested) against the pair mean, with the mean
    difference and the 95% limits of agreement as horizontal lines. Returns the path."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    a = np.asarray(requested, dtype=np.float64).ravel()
    b = np.asarray(generated, dtype=np.float64).ravel()
    stats = bland_altman(a, b)
    fig = Figure(figsize=(5, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.scatter((a + b) / 2, b - a, s=12, alpha=0.7)
    ax.axhline(stats["mean_diff"], color="k", lw=1, label=f"mean {stats['mean_diff']:.2f}")
    for key in ("loa_low", "loa_high"):
        ax.axhline(stats[key], color="r", ls="--", lw=1)
    ax.plot([], [], "r--", lw=1, label=f"±1.96 SD [{stats['loa_low']:.2f}, {stats['loa_high']:.2f}]")
    ax.set_xlabel("mean of requested and generated")
    ax.set_ylabel("generated − requested")
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path
