"""Controllability of count-conditioned (HistoSmith) samples: requested vs realised counts, measured in the
generated labels and by the segmenter, inside and beyond the training range; label↔image consistency (PQ of the
segmenter on the generated image against the generated labels) next to the segmenter's ceiling on real test.

The sample directory is built by hand in the layout `histosynth sample` writes for a HistoSmith model (images/,
folder/N_inst.png, folder/N_type.png, folder/classes.txt, samples.jsonl with requested/realised counts) from crops
of the bundled real HGSC region: the "generated" image is a real crop and its "generated labels" are that crop's
labels. Segmenters are stand-ins with the segmenter interface: an oracle returning the labels of the image it is
shown (looked up by content), and one that relabels connective nuclei as inflammatory. Every expected number is
computed here from the label maps and the requests with numpy, not by the code under test.
"""

from __future__ import annotations

import hashlib
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from histosynth.errors import DataError, HistosynthError

CLASSES = ("connective", "inflammatory", "neoplastic")  # the bundled region's classes
CROP = 96
CORNERS = [(0, 0), (0, 600), (300, 300), (300, 900), (600, 300), (900, 300), (1200, 600), (1200, 900),
           (600, 900), (900, 1200)]
# requested = realised + OFFSETS[i % len] per type: known, varied differences (fractional ones as --boost makes)
OFFSETS = [(0, 1, -1), (2, 0, 0), (0.5, -1, 3), (1, 2, 1), (0, 0, -2), (3, 1, 0)]


# ------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def region():
    from histosynth.data.formats import read_nuclei
    from histosynth.quickstart import bundled_sample

    return next(iter(read_nuclei("folder", bundled_sample(), magnification="20x")))


@pytest.fixture(scope="module")
def store(tmp_path_factory, region):
    """The bundled region as 32 px patches at 10x (64 px at 20x): a train split for the training range and a
    real test split for the segmenter's ceiling."""
    from histosynth.data.prepare_labelled import prepare_nuclei

    out = tmp_path_factory.mktemp("stores") / "hgsc-32"
    prepare_nuclei(iter([region]), out, patch=32, overlap=0.0, magnification="10x", holdout=0.075, seed=0,
                   progress=False)
    return out


def _key(image) -> str:
    return hashlib.sha1(np.ascontiguousarray(image, dtype=np.uint8).tobytes()).hexdigest()


def _relabel(inst):
    ids, inv = np.unique(inst, return_inverse=True)
    inv = inv.reshape(inst.shape)
    return inv if ids[0] == 0 else inv + 1


def _count(inst, typ, k) -> int:
    """Nuclei of type k, each typed by the majority of its typed pixels (ties: lowest type)."""
    n = 0
    for i in np.unique(inst[inst > 0]):
        votes = np.bincount(typ[inst == i], minlength=len(CLASSES) + 1)[1:]
        n += int(votes.sum() > 0 and votes.argmax() + 1 == k)
    return n


def _counts(inst, typ) -> list[int]:
    return [_count(inst, typ, k) for k in range(1, len(CLASSES) + 1)]


def make_histosmith_dir(root: Path, region, classes_file: bool = True):
    """A HistoSmith `histosynth sample` directory; returns it, the (inst, type) maps, the requested table (N, K)
    and {image hash: (inst, type)}."""
    from histosynth.data.formats.writers import write_class_names, write_folder_item

    (root / "images").mkdir(parents=True)
    labels, requested, lookup = [], [], {}
    if classes_file:
        write_class_names(root / "folder", CLASSES)
    with open(root / "samples.jsonl", "w") as f:
        for n, (y, x) in enumerate(CORNERS):
            name = f"{n:05d}"
            image = np.ascontiguousarray(region.image[y : y + CROP, x : x + CROP])
            inst = _relabel(region.inst_map[y : y + CROP, x : x + CROP]).astype(np.int64)
            typ = region.type_map[y : y + CROP, x : x + CROP].astype(np.int64)
            Image.fromarray(image).save(root / "images" / f"{name}.png")
            write_folder_item(root / "folder", name, image, inst, typ)
            realised = _counts(inst, typ)
            req = [max(0.0, r + d) for r, d in zip(realised, OFFSETS[n % len(OFFSETS)])]
            row = {"name": name, "image": f"images/{name}.png", "tissue": "ovary",
                   "requested": {c: float(v) for c, v in zip(CLASSES, req)},
                   "realised": dict(zip(CLASSES, realised)),
                   "inst_map": f"folder/{name}_inst.png", "type_map": f"folder/{name}_type.png",
                   "seed": 0, "batch_seed": n, "num_inference_steps": 2, "guidance_scale": 1.5}
            f.write(json.dumps(row) + "\n")
            labels.append((inst, typ))
            requested.append(req)
            lookup[_key(image)] = (inst, typ)
    return root, labels, np.array(requested, np.float64), lookup


class Oracle:
    """Returns the label maps an image was made from: the segmenter agrees with the generated labels exactly."""

    def __init__(self, lookup, class_names=CLASSES):
        self.lookup, self.class_names, self.path = lookup, tuple(class_names), "oracle-segmenter"

    def segment_one(self, image):
        inst, typ = self.lookup[_key(image)]
        return inst.copy(), typ.copy()

    def predict(self, images):
        assert images.dtype == np.uint8 and images.ndim == 4 and images.shape[-1] == 3
        pairs = [self.segment_one(im) for im in images]
        return np.stack([p[0] for p in pairs]).astype(np.int32), np.stack([p[1] for p in pairs]).astype(np.int32)


class ConnectiveAsInflammatory(Oracle):
    """The oracle's instances, with every connective (1) pixel typed inflammatory (2)."""

    def segment_one(self, image):
        inst, typ = super().segment_one(image)
        typ[typ == 1] = 2
        return inst, typ


def _relabelled(typ):
    typ = typ.copy()
    typ[typ == 1] = 2
    return typ


def _ba(a, b) -> dict:
    d = np.asarray(b, float) - np.asarray(a, float)
    sd = d.std(ddof=1)
    return {"mean_diff": d.mean(), "sd": sd, "loa_low": d.mean() - 1.96 * sd, "loa_high": d.mean() + 1.96 * sd,
            "n": d.size}


def _assert_pair(stats: dict, a, b) -> None:
    a, b = np.asarray(a, float), np.asarray(b, float)
    want = _ba(a, b)
    for key in ("mean_diff", "sd", "loa_low", "loa_high"):
        assert stats[key] == pytest.approx(want[key], abs=1e-12), key
    assert stats["n"] == want["n"]
    if a.std() > 0 and b.std() > 0:
        assert stats["pearson_r"] == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)
    else:
        assert np.isnan(stats["pearson_r"])
    assert stats["requested_total"] == pytest.approx(a.sum()) and stats["found_total"] == pytest.approx(b.sum())


def _store_train_range(store: Path) -> dict:
    rows = [json.loads(x) for x in (store / "manifest.jsonl").read_text().splitlines() if x.strip()]
    train = np.array([[r["counts"].get(c, 0) for c in CLASSES] for r in rows if r["split"] == "train"])
    return {c: [int(lo), int(hi)] for c, lo, hi in zip(CLASSES, train.min(0), train.max(0))}


@pytest.fixture(scope="module")
def hs(tmp_path_factory, region):
    return make_histosmith_dir(tmp_path_factory.mktemp("hs") / "samples", region)


# ------------------------------------------------------------------------------------------- counts
def test_oracle_counts_labels_and_segmenter_agree(hs, tmp_path):
    from histosynth.evaluate.controllability import count_agreement

    root, labels, requested, lookup = hs
    realised = np.array([_counts(i, t) for i, t in labels], float)
    assert (realised.sum(0) > 0).all() and (realised.std(0) > 0).all()  # every type present and varying
    res = count_agreement(root, Oracle(lookup), tmp_path / "c")
    assert res["conditioning"] == "counts" and res["class_names"] == list(CLASSES) and res["n_images"] == len(CORNERS)
    assert res["reference"] is None and res["training_range"] is None and res["by_range"] is None
    for k, name in enumerate(CLASSES):
        _assert_pair(res["per_type_labels"][name], requested[:, k], realised[:, k])
        _assert_pair(res["per_type"][name], requested[:, k], realised[:, k])  # the segmenter reads the labels
        s = res["labels_vs_segmenter"][name]
        assert s["pearson_r"] == pytest.approx(1.0, abs=1e-12) and s["mean_diff"] == 0.0 and s["sd"] == 0.0
    _assert_pair(res["per_type"]["all nuclei"], requested.sum(1), realised.sum(1))
    out = tmp_path / "c"
    for png in ["counts_scatter.png", *(f"bland_altman_{n}.png" for n in CLASSES),
                *(f"bland_altman_labels_{n}.png" for n in CLASSES)]:
        assert Image.open(out / png).size[0] > 100, png
    assert not (out / "bland_altman_by_range.png").exists()
    saved = json.loads((out / "counts.json").read_text())
    assert saved["per_type_labels"]["neoplastic"]["mean_diff"] == pytest.approx(
        res["per_type_labels"]["neoplastic"]["mean_diff"])
    csv = (out / "counts.csv").read_text().splitlines()
    assert len(csv) == len(CORNERS) + 1 and csv[0].startswith("name,tissue,requested_connective")
    assert csv[3].split(",")[2:5] == [str(int(v)) if float(v).is_integer() else str(v) for v in requested[2]]


def test_a_segmenter_typing_connective_as_inflammatory(hs, tmp_path):
    from histosynth.evaluate.controllability import count_agreement

    root, labels, requested, lookup = hs
    realised = np.array([_counts(i, t) for i, t in labels], float)
    found = np.array([_counts(i, _relabelled(t)) for i, t in labels], float)
    assert (found[:, 0] == 0).all() and (found[:, 1] > realised[:, 1]).any()
    res = count_agreement(root, ConnectiveAsInflammatory(lookup), tmp_path / "c")
    for k, name in enumerate(CLASSES):
        _assert_pair(res["per_type_labels"][name], requested[:, k], realised[:, k])  # the labels are unchanged
        _assert_pair(res["per_type"][name], requested[:, k], found[:, k])
        _assert_pair(res["labels_vs_segmenter"][name], realised[:, k], found[:, k])
    assert np.isnan(res["per_type"]["connective"]["pearson_r"])  # nothing found: constant
    assert res["labels_vs_segmenter"]["connective"]["mean_diff"] == pytest.approx(-realised[:, 0].mean())
    assert res["labels_vs_segmenter"]["all nuclei"]["mean_diff"] == 0.0  # the same nuclei, other types


def test_inside_and_beyond_the_training_range_of_a_store(hs, store, tmp_path):
    from histosynth.evaluate.controllability import count_agreement
    from histosynth.evaluate.requested_counts import training_range

    root, labels, requested, lookup = hs
    realised = np.array([_counts(i, t) for i, t in labels], float)
    found = np.array([_counts(i, _relabelled(t)) for i, t in labels], float)
    rng = _store_train_range(store)
    assert training_range(store, CLASSES)["per_type"] == rng
    lo, hi = (np.array([rng[c][j] for c in CLASSES], float) for j in (0, 1))
    inside = (requested >= lo) & (requested <= hi)
    assert inside.any() and (~inside).any()  # 96 px crops at 20x vs 64 px training patches: both kinds

    res = count_agreement(root, ConnectiveAsInflammatory(lookup), tmp_path / "c", training_range=store)
    assert res["training_range"]["per_type"] == rng and res["training_range"]["source"] == str(store)
    for part, keep in (("inside", inside), ("beyond", ~inside)):
        for k, name in enumerate(CLASSES):
            sel = keep[:, k]
            for measure, table in (("labels", realised), ("segmenter", found)):
                s = res["by_range"][part][measure][name]
                assert s["n"] == int(sel.sum())
                if sel.sum() >= 2:
                    _assert_pair(s, requested[sel, k], table[sel, k])
                elif sel.sum() == 0:
                    assert np.isnan(s["mean_diff"]) and np.isnan(s["pearson_r"])
        pooled = inside.all(1) if part == "inside" else ~inside.all(1)  # beyond: some type beyond
        s = res["by_range"][part]["labels"]["all nuclei"]
        assert s["n"] == int(pooled.sum())
        if pooled.sum() >= 2:
            _assert_pair(s, requested[pooled].sum(1), realised[pooled].sum(1))
    assert sum(res["by_range"][p]["segmenter"]["all nuclei"]["n"] for p in ("inside", "beyond")) == len(CORNERS)
    assert Image.open(tmp_path / "c" / "bland_altman_by_range.png").size[0] > 300
    assert "by_range" in res["plots"]
    header = (tmp_path / "c" / "counts.csv").read_text().splitlines()[0].split(",")
    assert header[-3:] == [f"inside_{c}" for c in CLASSES]


def test_training_range_of_a_histosmith_model_and_of_a_mapping(hs, tmp_path):
    from histosynth.evaluate.controllability import count_agreement
    from histosynth.evaluate.requested_counts import training_range

    root, labels, requested, lookup = hs
    run = tmp_path / "run"
    (run / "pipeline" / "conditioner").mkdir(parents=True)
    ranges = [[0, 2], [0, 6], [1, 9]]
    (run / "pipeline" / "conditioner" / "config.json").write_text(json.dumps(
        {"_class_name": "CountConditioner", "class_names": list(CLASSES), "tissues": ["ovary"],
         "count_scale": [2.0, 6.0, 9.0], "count_range": ranges, "injection": "embedding"}))
    got = training_range(run, CLASSES)
    assert got["per_type"] == dict(zip(CLASSES, ranges)) and "count_range" in got["from"]
    assert training_range(run / "pipeline", CLASSES)["per_type"] == got["per_type"]
    res = count_agreement(root, Oracle(lookup), tmp_path / "c", training_range=dict(zip(CLASSES, ranges)))
    inside = (requested >= np.array([r[0] for r in ranges])) & (requested <= np.array([r[1] for r in ranges]))
    realised = np.array([_counts(i, t) for i, t in labels], float)
    assert (~inside).sum(0).min() >= 2 and inside.sum(0).min() >= 2
    for k, name in enumerate(CLASSES):
        for part, sel in (("inside", inside[:, k]), ("beyond", ~inside[:, k])):
            for measure in ("labels", "segmenter"):  # the oracle: the segmenter reads the labels
                _assert_pair(res["by_range"][part][measure][name], requested[sel, k], realised[sel, k])
    with pytest.raises(DataError, match="differ from the samples'"):
        training_range(run, ("a", "b", "c"))
    with pytest.raises(DataError, match="neither a patch store"):
        training_range(tmp_path, CLASSES)
    with pytest.raises(HistosynthError, match=r"give \[min, max\] for each"):
        training_range({"connective": (0, 1)}, CLASSES)


# ------------------------------------------------------------------------------------ label↔image consistency
def test_mask_adherence_is_label_image_consistency_with_the_real_ceiling(hs, store):
    from histosynth.data.store import PatchStore
    from histosynth.evaluate.controllability import mask_adherence

    root, labels, _, lookup = hs
    real = PatchStore(store)
    test_idx = real.indices("test")
    assert test_idx
    lookup = dict(lookup)
    for i in test_idx:
        item = real[i]
        lookup[_key(item["image"])] = (item["inst_map"].astype(np.int64), item["type_map"].astype(np.int64))

    res = mask_adherence(root, Oracle(lookup), batch_size=4, real=store)
    assert res["conditioning"] == "counts" and "label-image consistency" in res["compares"]
    assert res["real"] is None and "no reference row" in res["reference_note"]
    assert "no reference row" in res["protocol"]["reference"]
    g = res["generated"]
    assert g["dice"] == g["aji"] == g["pq"] == g["mpq"] == 1.0
    for k, name in enumerate(CLASSES, start=1):
        want = sum(_count(i, t, k) for i, t in labels)
        assert g["per_type"][name]["requested"] == g["per_type"][name]["found"] == want > 0
    ceiling = res["real_test"]
    assert ceiling["n_images"] == len(test_idx) and ceiling["split"] == "test" and ceiling["store"] == str(store)
    assert ceiling["pq"] == ceiling["dice"] == 1.0

    # relabelled types: every nucleus still matches (PQ 1), per type connective is all FN, inflammatory gains FP
    res = mask_adherence(root, ConnectiveAsInflammatory(lookup), real=store)
    g = res["generated"]
    n1 = sum(_count(i, t, 1) for i, t in labels)
    n2 = sum(_count(i, t, 2) for i, t in labels)
    n3 = sum(_count(i, t, 3) for i, t in labels)
    assert g["pq"] == 1.0
    c, f, ne = (g["per_type"][n] for n in CLASSES)
    assert (c["tp"], c["fp"], c["fn"], c["pq"]) == (0, 0, n1, 0.0)
    assert (f["tp"], f["fp"], f["fn"]) == (n2, n1, 0) and f["pq"] == pytest.approx(n2 / (n2 + n1 / 2), abs=1e-12)
    assert (ne["tp"], ne["fp"], ne["fn"], ne["pq"]) == (n3, 0, 0, 1.0)
    assert g["mpq"] == pytest.approx(np.mean([0.0, n2 / (n2 + n1 / 2), 1.0]), abs=1e-12)
    real_counts = [real.records[i]["counts"] for i in test_idx]
    if sum(r.get("connective", 0) for r in real_counts):
        assert res["real_test"]["pq_per_type"]["connective"] == 0.0
    assert res["real_test"]["pq"] == 1.0


def test_mask_adherence_without_real_option_has_no_ceiling(hs):
    from histosynth.evaluate.controllability import mask_adherence

    root, _, _, lookup = hs
    res = mask_adherence(root, Oracle(lookup))
    assert res["real_test"] is None and res["real"] is None and res["generated"]["pq"] == 1.0


class Untouchable(Oracle):
    def predict(self, images):
        raise AssertionError("the segmenter ran before the inputs were checked")


def test_a_real_store_of_other_classes_is_refused_before_any_work(hs, region, tmp_path):
    import dataclasses

    from histosynth.data.prepare_labelled import prepare_nuclei
    from histosynth.evaluate.controllability import mask_adherence

    root, _, _, lookup = hs
    other = tmp_path / "other"
    prepare_nuclei(iter([dataclasses.replace(region, class_names=("a", "b", "c"))]), other, patch=32, overlap=0.0,
                   magnification="10x", holdout=0.075, seed=0, progress=False)
    with pytest.raises(DataError, match=r"real store's classes \['a', 'b', 'c'\] differ from the samples'"):
        mask_adherence(root, Untouchable(lookup), real=other)
    with pytest.raises(DataError, match="store.json is missing"):
        mask_adherence(root, Untouchable(lookup), real=tmp_path)


# ---------------------------------------------------------------------------------------- problems
def test_class_names_come_from_classes_txt(hs, tmp_path, region):
    from histosynth.evaluate.controllability import count_agreement, mask_adherence, sample_class_names

    root, _, _, lookup = hs
    assert sample_class_names(root) == CLASSES
    with pytest.raises(HistosynthError, match="differ from the segmenter's"):
        count_agreement(root, Oracle(lookup, class_names=("a", "b", "c")), tmp_path / "c")
    bare, _, _, lookup2 = make_histosmith_dir(tmp_path / "bare", region, classes_file=False)
    with pytest.warns(UserWarning, match="do not name their classes"):
        assert mask_adherence(bare, Oracle(lookup2))["generated"]["pq"] == 1.0


def _rewrite(root: Path, dest: Path, edit) -> Path:
    """A copy of the sample directory's manifest in ``dest`` with absolute file paths, rows changed by ``edit``."""
    dest.mkdir()
    rows = [json.loads(x) for x in (root / "samples.jsonl").read_text().splitlines()]
    for row in rows:
        for key in ("image", "inst_map", "type_map"):
            row[key] = str(root / row[key])
    rows = edit(rows)
    (dest / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (dest / "folder").mkdir()
    (dest / "folder" / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    return dest


def test_bad_requests_are_errors_naming_the_manifest(hs, tmp_path):
    from histosynth.evaluate.controllability import count_agreement

    root, _, _, lookup = hs
    seg = Oracle(lookup)

    def mixed(rows):
        del rows[3]["requested"]
        return rows

    d = _rewrite(root, tmp_path / "mixed", mixed)
    with pytest.raises(DataError, match=r"samples\.jsonl: row 4 has no `requested` counts"):
        count_agreement(d, seg, tmp_path / "o1")

    def unknown(rows):
        rows[1]["requested"]["mitotic"] = 2.0
        return rows

    d = _rewrite(root, tmp_path / "unknown", unknown)
    with pytest.raises(DataError, match=r"samples\.jsonl: row 2: requested type 'mitotic'"):
        count_agreement(d, seg, tmp_path / "o2")

    def negative(rows):
        rows[0]["requested"]["neoplastic"] = -1
        return rows

    d = _rewrite(root, tmp_path / "negative", negative)
    with pytest.raises(DataError, match="not negative"):
        count_agreement(d, seg, tmp_path / "o3")

    def wrong_realised(rows):
        rows[2]["realised"]["neoplastic"] += 5
        return rows

    d = _rewrite(root, tmp_path / "realised", wrong_realised)
    with pytest.warns(UserWarning, match=r"row\(s\) list `realised` counts that differ .*first: row 3"):
        count_agreement(d, seg, tmp_path / "o4")

    def nasdm_like(rows):  # no requested counts: a mask-conditioned directory, where a range means nothing
        for r in rows:
            del r["requested"], r["realised"]
        return rows

    d = _rewrite(root, tmp_path / "masks", nasdm_like)
    with pytest.raises(HistosynthError, match="applies to count-conditioned"):
        count_agreement(d, seg, tmp_path / "o5", training_range={c: (0, 1) for c in CLASSES})
    assert count_agreement(d, seg, tmp_path / "o6")["per_type"]["neoplastic"]["mean_diff"] == 0.0


# ---------------------------------------------------------------------------------------- report + CLI
def test_report_reads_histosmith_results(hs, store, tmp_path):
    from histosynth.evaluate.controllability import count_agreement, mask_adherence
    from histosynth.evaluate.report import _fmt, build_report

    root, _, _, lookup = hs
    adherence = mask_adherence(root, Oracle(lookup))
    adherence["real_test"] = {"dice": 0.81, "aji": 0.52, "pq": 0.43, "mpq": 0.37, "n_images": 7, "split": "test",
                              "store": "real-store", "pq_per_type": dict(zip(CLASSES, (0.1, 0.2, 0.3)))}
    (tmp_path / "adh.json").write_text(json.dumps(adherence, default=str))
    count_agreement(root, ConnectiveAsInflammatory(lookup), tmp_path / "counts", training_range=store)
    report = build_report([tmp_path / "adh.json", tmp_path / "counts"], tmp_path / "rep" / "report.md")
    md = report.read_text()
    assert "Mask adherence" in md and "Requested vs generated" in md and "no reference row" in md
    assert "bland_altman_by_range.png" in md and "bland_altman_labels_connective.png" in md
    # the segmenter's ceiling, and the counts measured twice and by training range, as tables
    assert "| 0.81 | 0.52 | 0.43 | 0.37 | 0.1 | 0.2 | 0.3 |" in md and "`real-store`, split test, n=7" in md
    counts = json.loads((tmp_path / "counts" / "counts.json").read_text())
    for key in ("per_type_labels", "labels_vs_segmenter"):
        s = counts[key]["connective"]
        assert f"| connective | {_fmt(s['pearson_r'])} | {_fmt(s['mean_diff'])} | {_fmt(s['sd'])} |" in md, key
    s = counts["by_range"]["inside"]["segmenter"]["all nuclei"]
    assert f"| inside | segmenter | all nuclei | {_fmt(s['pearson_r'])} | {_fmt(s['mean_diff'])} |" in md


@pytest.fixture
def cli(monkeypatch, hs, store):
    """The `evaluate` commands with load_segmenter faked to give the stand-ins (evaluate_segmenter is real)."""
    import click

    from histosynth.cli.evaluate_controllability import COMMANDS
    from histosynth.data.store import PatchStore
    from histosynth.evaluate import segmenter as real_module

    lookup = dict(hs[3])
    real = PatchStore(store)
    for i in real.indices("test"):
        item = real[i]
        lookup[_key(item["image"])] = (item["inst_map"].astype(np.int64), item["type_map"].astype(np.int64))
    fake = types.ModuleType("histosynth.evaluate.segmenter")
    fake.load_segmenter = lambda path, device="cpu": (
        ConnectiveAsInflammatory if "relabel" in str(path) else Oracle)(lookup)
    fake.evaluate_segmenter = real_module.evaluate_segmenter
    monkeypatch.setitem(sys.modules, "histosynth.evaluate.segmenter", fake)
    return click.Group("evaluate", commands=COMMANDS)


def test_cli_counts_and_mask_adherence(cli, hs, store, tmp_path):
    root, labels, requested, _ = hs
    runner = CliRunner()
    res = runner.invoke(cli, ["counts", "--generated", str(root), "--segmenter", "seg-relabel", "--out",
                              str(tmp_path / "c"), "--training-range", str(store)])
    assert res.exit_code == 0, res.output
    assert "bland_altman_by_range.png" in res.output
    saved = json.loads((tmp_path / "c" / "counts.json").read_text())
    assert saved["conditioning"] == "counts" and saved["training_range"]["per_type"] == _store_train_range(store)
    found = np.array([_counts(i, _relabelled(t)) for i, t in labels], float)
    assert saved["per_type"]["inflammatory"]["mean_diff"] == pytest.approx((found[:, 1] - requested[:, 1]).mean())

    res = runner.invoke(cli, ["mask-adherence", "--generated", str(root), "--segmenter", "seg-oracle",
                              "--real", str(store), "--out", str(tmp_path / "a.json")])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["generated"]["pq"] == 1.0 and saved["real"] is None and saved["real_test"]["pq"] == 1.0

    # user errors: one line naming the file, exit status 2
    res = runner.invoke(cli, ["counts", "--generated", str(root), "--segmenter", "seg", "--out", str(tmp_path / "d"),
                              "--training-range", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and str(tmp_path / "nowhere") in res.output
    res = runner.invoke(cli, ["mask-adherence", "--generated", str(root), "--segmenter", "seg",
                              "--real", str(tmp_path / "nostore")])
    assert res.exit_code == 2 and str(tmp_path / "nostore") in res.output
