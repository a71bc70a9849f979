"""Controllability: do the generated images contain the nuclei their conditions asked for?

Both functions read a ``histosynth sample`` output directory (``samples.jsonl`` plus the files it lists, paths
relative to the directory) and segment images with a nuclei segmenter: any object with ``class_names`` (names of
types 1..K, as a store's) and ``predict(images uint8 (B, H, W, 3)) -> (inst (B, H, W), type (B, H, W))``, e.g.
:func:`histosynth.evaluate.segmenter.load_segmenter`. Two kinds of sample directory are understood:

* **mask-conditioned** (NASDM): per row the generated ``image``, the conditioning ``inst_map`` / ``type_map`` and
  the ``real`` patch of that mask;
* **count-conditioned** (HistoSmith, rows with ``requested``): the generated ``image`` is generated *together
  with* its labels, so ``inst_map`` / ``type_map`` are the generated labels (``folder/N_inst.png``,
  ``folder/N_type.png``), ``requested`` the counts per type asked of the model (numbers), ``realised`` the nuclei
  per type in the generated labels; there is no real patch, and the class names are in ``folder/classes.txt``.

* :func:`mask_adherence` — the segmentation of the generated images scored against the rows' label maps (Dice,
  AJI, PQ, mPQ+, per-type PQ, per-type counts). Mask-conditioned: against the masks the images were conditioned
  on, with the SAME segmenter on the real images of those masks as the reference row (the generated numbers can
  only be read relative to what the segmenter achieves on real tissue). Count-conditioned: against the labels
  generated with the image — HistoSmith's label↔image consistency; no reference row (the result says so).
  Optionally (``real=STORE``) the segmenter's ceiling on the real test patches of a labelled store
  (:func:`histosynth.evaluate.segmenter.evaluate_segmenter`) next to the generated numbers.
* :func:`count_agreement` — per type, Pearson r and Bland–Altman agreement (HistoSmith's controllability
  analysis), PNGs and a CSV. Mask-conditioned: nuclei requested (conditioning masks) vs found (segmenter on the
  generated image). Count-conditioned: requested counts vs realised measured twice, in the generated labels and
  by the segmenter on the generated image, plus labels vs segmenter; with a training range (a store's train
  split, or a HistoSmith model's recorded range) the requests are also split into inside vs beyond the range
  (HistoSmith reports saturation beyond it).

Counting and typing follow :mod:`histosynth.evaluate.instance_metrics` (an instance's type is the majority
type of its pixels). The class names of a sample directory come from its rows (``class_names``), the
``store.json`` of the store the masks were drawn from, or a ``classes.txt`` beside the label maps (line k names
type id k); they must equal the segmenter's.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from histosynth.data.io import to_rgb_uint8
from histosynth.data.tables import numbered_json_lines
from histosynth.errors import DataError, HistosynthError
from histosynth.evaluate.instance_metrics import (
    PQAccumulator, aggregated_jaccard_index, bland_altman, bland_altman_plot, counts_per_type, dice, pearson_r,
)

__all__ = ["read_samples", "sample_class_names", "segmenter_class_names", "read_listed", "read_labels",
           "check_segmenter_classes", "segment_samples", "mask_adherence",
           "count_agreement", "is_count_conditioned", "segmenter_ceiling", "segmenter_name", "counting_protocol",
           "file_safe", "json_default"]

MANIFEST = "samples.jsonl"
MATCH_IOU = 0.5
CLASSES_FILE = "classes.txt"  # beside the label maps of a count-conditioned sample directory (folder format)


# ------------------------------------------------------------------------------------------- the sample dir
def read_samples(sample_dir: str | Path) -> list[dict]:
    """The rows of ``sample_dir/samples.jsonl``; DataError naming the file when it is missing or malformed."""
    root = Path(sample_dir)
    manifest = root / MANIFEST
    if not root.is_dir():
        raise DataError("not a directory (expected a `histosynth sample` output)", root)
    if not manifest.is_file():
        raise DataError(f"no {MANIFEST}: not a `histosynth sample` output directory", root)
    rows = []
    for n, row in numbered_json_lines(manifest):
        missing = [k for k in ("image", "inst_map", "type_map") if not (isinstance(row, dict) and row.get(k))]
        if missing:
            raise DataError(f"line {n} lacks {', '.join(missing)}", manifest)
        rows.append(row)
    if not rows:
        raise DataError("no samples listed", manifest)
    return rows


def _store_class_names(store: str, root: Path) -> tuple[str, ...] | None:
    for candidate in (Path(store), root / store):
        info = candidate / "store.json"
        if info.is_file():
            try:
                return tuple(json.loads(info.read_text(encoding="utf-8"))["class_names"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise DataError(f"cannot read the class names of the masks' store: {exc}", info) from None
    return None


def sample_class_names(sample_dir: str | Path, rows: Sequence[dict] | None = None) -> tuple[str, ...] | None:
    """Class names (types 1..K) of the label maps of a sample directory: a row's ``class_names``, else the
    ``store.json`` of its ``store`` (absolute, or relative to the directory), else a ``classes.txt`` beside the
    first row's ``inst_map`` (HistoSmith's ``folder/classes.txt``); None when none is there."""
    root = Path(sample_dir)
    rows = read_samples(root) if rows is None else rows
    row = rows[0]
    if row.get("class_names"):
        return tuple(row["class_names"])
    if row.get("store"):
        names = _store_class_names(str(row["store"]), root)
        if names is not None:
            return names
    classes = (root / row["inst_map"]).parent / CLASSES_FILE
    if classes.is_file():
        from histosynth.data.formats.folder import read_class_names

        return read_class_names(classes)
    return None


def segmenter_class_names(segmenter) -> tuple[str, ...]:
    """The nucleus type names of a segmenter (its ``class_names``, type 1 first; a leading background name dropped).

    Raises:
        HistosynthError: the segmenter names no classes.
    """
    names = getattr(segmenter, "class_names", None)
    if names is None:
        raise HistosynthError(f"the segmenter {segmenter_name(segmenter)} has no class_names")
    names = tuple(str(n) for n in names)
    if names and names[0].lower() in ("background", "bg"):  # a list that also names type 0
        names = names[1:]
    return names


def segmenter_name(segmenter) -> str:
    """How results and messages name a segmenter: its ``path`` (a loaded checkpoint), else its ``name``, else its
    class name."""
    for attr in ("path", "name"):
        value = getattr(segmenter, attr, None)
        if value:
            return str(value)
    return type(segmenter).__name__


def check_segmenter_classes(sample_dir: str | Path, rows: Sequence[dict], segmenter) -> tuple[str, ...]:
    """The class names both sides agree on; HistosynthError when the masks' classes differ from the segmenter's.

    When the directory does not say its classes, the segmenter's are used (with a warning) and the label maps
    are checked against their number as they are read.
    """
    seg_names = segmenter_class_names(segmenter)
    names = sample_class_names(sample_dir, rows)
    if names is None:
        warnings.warn(f"{sample_dir}: the samples do not name their classes (no class_names, store.json or "
                      f"{CLASSES_FILE}); assuming the segmenter's {list(seg_names)}", stacklevel=3)
        return seg_names
    if list(names) != list(seg_names):
        raise HistosynthError(
            f"the samples' classes {list(names)} differ from the segmenter's {list(seg_names)} "
            f"({segmenter_name(segmenter)}); use a segmenter trained on the same classes",
            Path(sample_dir) / MANIFEST,
        )
    return names


def read_listed(path: Path, kind: str) -> np.ndarray:
    """A file a sample manifest lists: ``kind`` "image" → uint8 (H, W, 3) RGB; a label map → int64 (H, W).

    Raises:
        DataError naming the file: missing, or unreadable.
    """
    if not path.is_file():
        raise DataError(f"missing {kind} listed in {MANIFEST}", path)
    try:
        with Image.open(path) as im:
            if kind == "image":
                return to_rgb_uint8(im, path)
            return np.asarray(im).astype(np.int64)
    except OSError as exc:
        raise DataError(f"cannot read {kind}: {exc}", path) from None


def read_labels(root: Path, row: dict, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(instance map, type map), int64 (H, W) each, of a manifest row (its ``inst_map`` / ``type_map`` under ``root``).

    Raises:
        DataError naming the file: missing or unreadable, the two maps' shapes differ, a type id above ``num_classes``.
    """
    inst = read_listed(root / row["inst_map"], "instance map")
    types = read_listed(root / row["type_map"], "type map")
    if inst.shape != types.shape or inst.ndim != 2:
        raise DataError(f"instance map {inst.shape} and type map {types.shape} differ", root / row["type_map"])
    if types.size and types.max() > num_classes:
        raise DataError(f"type id {int(types.max())} is above the {num_classes} classes", root / row["type_map"])
    return inst, types


def segment_samples(sample_dir: str | Path, segmenter, which: str = "image", batch_size: int = 16,
                    rows: Sequence[dict] | None = None, num_classes: int | None = None
                    ) -> Iterator[tuple[dict, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Yield ``(row, true_inst, true_type, pred_inst, pred_type)`` per sample: the conditioning label maps and
    the segmentation of the ``which`` image of the row (``"image"``: generated, ``"real"``: its real patch).

    Images go to the segmenter in batches of up to ``batch_size`` images of one size.
    """
    if batch_size < 1:
        raise HistosynthError(f"batch size must be >= 1, got {batch_size}")
    root = Path(sample_dir)
    rows = read_samples(root) if rows is None else rows
    k = len(segmenter_class_names(segmenter)) if num_classes is None else num_classes
    batch: list[tuple[dict, np.ndarray]] = []

    def flush():
        images = np.stack([img for _, img in batch])
        pred_inst, pred_type = _predict(segmenter, images)
        for (row, _), pi, pt in zip(batch, pred_inst, pred_type):
            ti, tt = read_labels(root, row, k)
            if ti.shape != pi.shape:
                raise DataError(f"label maps {ti.shape} differ in size from the image {pi.shape}", root / row[which])
            yield row, ti, tt, pi, pt

    for n, row in enumerate(rows, start=1):
        if not row.get(which):
            raise DataError(f"line {n} lists no {which!r} image", root / MANIFEST)
        img = read_listed(root / row[which], "image")
        if batch and (len(batch) == batch_size or img.shape != batch[0][1].shape):
            yield from flush()
            batch = []
        batch.append((row, img))
    if batch:
        yield from flush()


def _predict(segmenter, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out = segmenter.predict(images)
    try:
        inst, types = out
    except (TypeError, ValueError):
        raise HistosynthError(f"the segmenter {segmenter_name(segmenter)} must return (inst, type) maps") from None
    inst, types = np.asarray(inst), np.asarray(types)
    expected = images.shape[:3]
    if inst.shape != expected or types.shape != expected:
        raise HistosynthError(f"the segmenter {segmenter_name(segmenter)} returned maps of shape {inst.shape} "
                              f"and {types.shape} for images {images.shape}; expected {expected}")
    return inst.astype(np.int64), types.astype(np.int64)


# -------------------------------------------------------------------------------------------- adherence
def _score(sample_dir, segmenter, which, names, rows, batch_size) -> dict[str, Any]:
    k = len(names)
    acc = PQAccumulator(k, MATCH_IOU)
    dices, ajis = [], []
    requested = np.zeros(k + 1, np.int64)
    found = np.zeros(k + 1, np.int64)
    abs_diff = np.zeros(k + 1, np.float64)
    for _, ti, tt, pi, pt in segment_samples(sample_dir, segmenter, which, batch_size, rows, k):
        acc.update(ti, tt, pi, pt)
        dices.append(dice(pi, ti))
        ajis.append(aggregated_jaccard_index(ti, pi))
        try:
            r, f = counts_per_type(ti, tt, k), counts_per_type(pi, pt, k)
        except ValueError as exc:
            raise HistosynthError(f"the segmenter {segmenter_name(segmenter)}: {exc}") from None
        requested += r
        found += f
        abs_diff += np.abs(f - r)
    pq = acc.compute()
    n = pq["n_images"]
    per_type = {}
    for t, name in enumerate(names, start=1):
        c = pq["counts_per_type"][t]
        per_type[name] = dict(pq=pq["pq_per_type"][t], dq=pq["dq_per_type"][t], sq=pq["sq_per_type"][t],
                              tp=c["tp"], fp=c["fp"], fn=c["fn"], requested=int(requested[t]), found=int(found[t]),
                              mean_abs_count_error=float(abs_diff[t] / n))
    return dict(
        n_images=n, dice=float(np.mean(dices)), aji=float(np.mean(ajis)), pq=pq["pq"], dq=pq["dq"], sq=pq["sq"],
        mpq=pq["mpq"], pq_image_mean=pq["pq_image_mean"], per_type=per_type,
        nuclei_requested=int(requested[1:].sum() + requested[0]), nuclei_found=int(found.sum()),
        found_untyped=int(found[0]),
    )


def mask_adherence(sample_dir: str | Path, segmenter, batch_size: int = 16, *, real: str | Path | None = None,
                   real_split: str = "test") -> dict[str, Any]:
    """Segment the generated images of a sample directory and score them against the rows' label maps, with
    the same segmenter on the real patches of those masks (``real/``) as the reference when the rows have them.

    Mask-conditioned directories (NASDM): the label maps are the conditioning masks. Count-conditioned ones
    (HistoSmith, rows with ``requested``): they are the labels generated with the image, so ``generated`` is the
    label↔image consistency (segmenter on the generated image vs the generated labels) and there is no
    reference row. ``real``: a labelled store; the segmenter's ceiling on its ``real_split`` patches
    (:func:`segmenter_ceiling`) is added as ``real_test``.

    Returns ``dict(generated=..., real=... or None, real_test=... or None, class_names, n_images, segmenter,
    conditioning ("masks" / "counts"), compares, protocol)`` (+ ``reference_note`` when ``real`` is None) where
    ``generated`` / ``real`` hold ``dice`` and ``aji`` (means over images; HoVer-Net's DICE1 / AJI), ``pq, dq,
    sq`` (PQ+: matches summed over all images, IoU > 0.5), ``mpq`` (CoNIC's mPQ+), ``pq_image_mean``, and
    ``per_type`` {class name: pq, dq, sq, tp, fp, fn, requested (nuclei in the rows' label maps), found,
    mean_abs_count_error}; ``real_test`` is :func:`evaluate_segmenter`'s dict (dice, aji, pq, mpq,
    pq_per_type, n_images, split) plus ``store``.
    """
    root = Path(sample_dir)
    rows = read_samples(root)
    names = check_segmenter_classes(root, rows, segmenter)
    counts = is_count_conditioned(rows, root)
    real_store = None if real is None else _real_store(real, real_split, names)  # checked before any work
    result: dict[str, Any] = {"kind": "mask_adherence", "sample_dir": str(root), "class_names": list(names),
                              "n_images": len(rows), "segmenter": segmenter_name(segmenter),
                              "conditioning": "counts" if counts else "masks",
                              "compares": ("segmenter on the generated images vs the labels generated with them "
                                           "(label-image consistency)" if counts else
                                           "segmenter on the generated images vs the masks they were conditioned on")}
    result["generated"] = _score(root, segmenter, "image", names, rows, batch_size)
    has_real = all(r.get("real") for r in rows)
    result["real"] = _score(root, segmenter, "real", names, rows, batch_size) if has_real else None
    result["real_test"] = segmenter_ceiling(segmenter, real_store, real_split) if real is not None else None
    result["protocol"] = counting_protocol(rows, segmenter)
    if not has_real:
        note = ("no reference row: the rows have no `real` patch"
                + (" (count-conditioned samples have none)" if counts else ""))
        result["reference_note"] = note
        result["protocol"]["reference"] = note + ("; real_test: the segmenter on real test patches" if real else "")
    if real is not None:
        result["protocol"]["real_test"] = f"{real} ({real_split} split): the segmenter's own ceiling on real patches"
    return result


def _real_store(store, split: str, names: Sequence[str] | None = None):
    """The labelled store of the segmenter's ceiling, opened and checked (labels, classes, a non-empty split)."""
    from histosynth.data.store import PatchStore

    opened = store if isinstance(store, PatchStore) else PatchStore(store)
    if not opened.has_labels:
        raise DataError("an image-only store has no nuclei labels to score the segmenter against", opened.path)
    if names is not None and list(opened.class_names) != list(names):
        raise DataError(f"the real store's classes {list(opened.class_names)} differ from the samples' {list(names)}",
                        opened.path)
    if not opened.indices(split):
        raise DataError(f"the real store has no {split!r} patches", opened.path)
    return opened


def segmenter_ceiling(segmenter, store, split: str = "test") -> dict[str, Any]:
    """The segmenter on the real ``split`` patches of a labelled store (a path or an open PatchStore): what it
    achieves on real tissue, the ceiling of every number measured with it on generated images
    (:func:`evaluate_segmenter`'s dict + ``store``)."""
    from histosynth.evaluate.segmenter import evaluate_segmenter

    opened = _real_store(store, split)
    scores = evaluate_segmenter(segmenter, opened, split)
    return {**scores, "store": str(opened.path)}


def counting_protocol(rows: Sequence[dict], segmenter) -> dict[str, Any]:
    """The "protocol" block of a counts / adherence result: the segmenter, matching IoU and metric definitions, and the
    sampling settings of the first manifest row (so results from different settings are not compared unknowingly)."""
    first = rows[0]
    return {
        "segmenter": segmenter_name(segmenter),
        "match_iou": MATCH_IOU,
        "instance_type": "majority pixel type",
        "dice": "binary foreground Dice per image, mean over images (HoVer-Net DICE1)",
        "aji": "per image, mean over images (Kumar et al. 2017)",
        "pq": "TP/FP/FN/IoU summed over images (PQ+, CoNIC mPQ+ per type)",
        "store": first.get("store"), "split": first.get("split"),
        "guidance_scale": first.get("guidance_scale"), "num_inference_steps": first.get("num_inference_steps"),
        "scheduler": first.get("scheduler", first.get("sampler")), "seed": first.get("seed"),
    }


# ------------------------------------------------------------------------------------------------ counts
def file_safe(name: str) -> str:
    """A class name as a file-name part (runs of other characters → ``_``; ``type`` when nothing is left)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "type"


def _per_image_counts(sample_dir, segmenter, which, names, rows, batch_size) -> tuple[np.ndarray, np.ndarray]:
    """(requested, found): (N, K + 1) nuclei per type (column 0: untyped) per image."""
    k = len(names)
    req, found = [], []
    for _, ti, tt, pi, pt in segment_samples(sample_dir, segmenter, which, batch_size, rows, k):
        req.append(counts_per_type(ti, tt, k))
        try:
            found.append(counts_per_type(pi, pt, k))
        except ValueError as exc:
            raise HistosynthError(f"the segmenter {segmenter_name(segmenter)}: {exc}") from None
    return np.stack(req), np.stack(found)


def _agreement(req: np.ndarray, found: np.ndarray, names: Sequence[str]) -> dict[str, dict]:
    out = {}
    columns = [(name, t) for t, name in enumerate(names, start=1)] + [("all nuclei", None)]
    for name, t in columns:
        r = req[:, 1:].sum(1) + req[:, 0] if t is None else req[:, t]
        f = found.sum(1) if t is None else found[:, t]
        out[name] = dict(pearson_r=pearson_r(r, f), **bland_altman(r, f), requested_total=int(r.sum()),
                         found_total=int(f.sum()), requested_mean=float(r.mean()), found_mean=float(f.mean()))
    return out


def _scatter(req: np.ndarray, found: np.ndarray, names: Sequence[str], stats: dict, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    k = len(names)
    fig = Figure(figsize=(3.2 * k, 3.3), dpi=100)
    FigureCanvasAgg(fig)
    for t, name in enumerate(names, start=1):
        ax = fig.add_subplot(1, k, t)
        r, f = req[:, t], found[:, t]
        top = max(1, int(max(r.max(initial=0), f.max(initial=0))))
        ax.plot([0, top], [0, top], color="0.6", lw=1, ls="--")
        ax.scatter(r, f, s=12, alpha=0.7)
        ax.set_xlabel("requested")
        if t == 1:
            ax.set_ylabel("found in generated image")
        ax.set_title(f"{name}: r = {stats[name]['pearson_r']:.3f}", fontsize=9)
        ax.set_xlim(-0.5, top + 0.5)
        ax.set_ylim(-0.5, top + 0.5)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def is_count_conditioned(rows: Sequence[dict], sample_dir: str | Path | None = None) -> bool:
    """True when the rows carry ``requested`` counts (a HistoSmith sample directory); DataError when only some do."""
    have = [r.get("requested") is not None for r in rows]
    if any(have) and not all(have):
        where = None if sample_dir is None else Path(sample_dir) / MANIFEST
        raise DataError(f"row {have.index(False) + 1} has no `requested` counts but row {have.index(True) + 1} has: "
                        "one sample directory holds one kind of samples", where)
    return bool(have) and all(have)


def count_agreement(sample_dir: str | Path, segmenter, out_dir: str | Path, batch_size: int = 16,
                    reference: bool = True, training_range: str | Path | Mapping | None = None) -> dict[str, Any]:
    """Per type: nuclei requested (conditioning label maps) vs found (segmenter on the generated images).

    A count-conditioned (HistoSmith) directory is measured as :func:`~histosynth.evaluate.requested_counts.requested_agreement` describes (requested
    counts vs realised in the generated labels and by the segmenter; ``training_range`` splits the requests into
    inside vs beyond it). What follows is the mask-conditioned case (``training_range`` must be None there).

    Writes to ``out_dir``: ``bland_altman_<type>.png`` per type, ``counts_scatter.png`` (requested vs found, one
    panel per type, identity dashed), ``counts.csv`` (per image and type) and ``counts.json`` (the result).
    Returns ``dict(per_type={name: pearson_r, mean_diff, sd, loa_low, loa_high, n, requested_total,
    found_total, ...}, reference=..., plots=..., ...)``; the ``"all nuclei"`` entry pools the types.
    Differences are found − requested. ``reference`` (when ``real/`` exists): the same agreement for the
    segmenter on the real patches, i.e. the counting error of the segmenter itself.
    """
    root, out = Path(sample_dir), Path(out_dir)
    rows = read_samples(root)
    names = check_segmenter_classes(root, rows, segmenter)
    from histosynth.evaluate.requested_counts import requested_agreement

    if is_count_conditioned(rows, root):
        return requested_agreement(root, out, rows, names, segmenter, batch_size, training_range)
    if training_range is not None:
        raise HistosynthError("a training range applies to count-conditioned (HistoSmith) sample directories, whose "
                              "rows have `requested` counts", root / MANIFEST)
    req, found = _per_image_counts(root, segmenter, "image", names, rows, batch_size)
    stats = _agreement(req, found, names)
    out.mkdir(parents=True, exist_ok=True)
    plots = {}
    for t, name in enumerate(names, start=1):
        plots[name] = str(bland_altman_plot(req[:, t], found[:, t], out / f"bland_altman_{file_safe(name)}.png",
                                            title=f"{name}: generated vs requested nuclei"))
    plots["scatter"] = str(_scatter(req, found, names, stats, out / "counts_scatter.png"))
    ref = None
    real_found = None
    if reference and all(r.get("real") for r in rows):
        _, real_found = _per_image_counts(root, segmenter, "real", names, rows, batch_size)
        ref = _agreement(req, real_found, names)
    with open(out / "counts.csv", "w", encoding="utf-8") as f:
        header = ["name"] + [f"requested_{file_safe(n)}" for n in names] + [f"found_{file_safe(n)}" for n in names]
        header += ["found_untyped"] + ([f"real_found_{file_safe(n)}" for n in names] if real_found is not None else [])
        f.write(",".join(header) + "\n")
        for i, row in enumerate(rows):
            values = [str(row.get("name", i))] + [str(v) for v in req[i, 1:]] + [str(v) for v in found[i, 1:]]
            values += [str(found[i, 0])] + ([str(v) for v in real_found[i, 1:]] if real_found is not None else [])
            f.write(",".join(values) + "\n")
    result = {"kind": "count_agreement", "sample_dir": str(root), "class_names": list(names), "n_images": len(rows),
              "segmenter": segmenter_name(segmenter), "per_type": stats, "reference": ref, "plots": plots,
              "protocol": {**counting_protocol(rows, segmenter), "difference": "found − requested, per image",
                           "limits": "mean ± 1.96 SD (ddof=1)"}}
    (out / "counts.json").write_text(json.dumps(result, indent=2, default=json_default) + "\n", encoding="utf-8")
    return result


def json_default(o):
    """``json.dumps(default=...)`` for results: numpy scalars as Python numbers, anything else as its ``str``."""
    if isinstance(o, np.generic):
        return o.item()
    return str(o)
