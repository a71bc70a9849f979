"""Several real datasets into one store: CoNSeP (colon, 40x) + the HGSC region (ovary, 20x) under one class scheme.

Small real subsets (4 CoNSeP patches, a 512x512 crop of the HGSC region) so the whole file runs in seconds. The
expected nuclei counts are computed here straight from the source label files, not through histosynth.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from click.testing import CliRunner
from PIL import Image

from histosynth.cli import main
from histosynth.data.class_mapping import ClassMapping, parse_class_map
from histosynth.data.record import NucleiRecord
from histosynth.data.prepare_labelled import prepare_nuclei
from histosynth.data.store import PatchStore
from histosynth.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
pytestmark = pytest.mark.skipif(not (SHARED / "consep").is_dir() or not (SHARED / "hgsc").is_dir(),
                                reason="../shared/data (consep, hgsc) is not beside this checkout")

TARGET = ["epithelial", "spindle-shaped", "inflammatory", "other"]
CONSEP_CLASSES = ["other", "inflammatory", "epithelial", "spindle-shaped"]  # type ids 1..4 of the .mat files
HGSC_CLASSES = ["connective", "inflammatory", "neoplastic"]  # type ids 1..3 of hgsc_nest_type.png
HGSC_MAP = {"neoplastic": "epithelial", "connective": "spindle-shaped"}
STORE_ARGS = ["--patch", "64", "--overlap", "0", "--magnification", "20x"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """consep/{train,test}/{images,labels} with 3 + 1 real patches; hgsc/ a 512x512 crop in the folder layout."""
    root = tmp_path_factory.mktemp("sources")
    for split, n in (("train", 3), ("test", 1)):
        for sub in ("images", "labels"):
            (root / "consep" / split / sub).mkdir(parents=True)
        for image in sorted((SHARED / "consep" / split / "images").iterdir())[:n]:
            shutil.copy(image, root / "consep" / split / "images")
            shutil.copy(SHARED / "consep" / split / "labels" / f"{image.stem}.mat", root / "consep" / split / "labels")
    (root / "hgsc").mkdir()
    for name in ("hgsc_nest.jpg", "hgsc_nest_inst.png", "hgsc_nest_type.png"):
        crop = np.asarray(Image.open(SHARED / "hgsc" / name))[300:812, 300:812]
        Image.fromarray(crop).save(root / "hgsc" / name.replace(".jpg", ".png"))  # PNG: the crop stays exact
    return root


def write_sources(root: Path, name="sources.yaml", hgsc_map=HGSC_MAP, extra="") -> Path:
    file = root / name
    lines = [
        f"classes: [{', '.join(TARGET)}]",
        "sources:",
        "  - {path: consep, format: consep, tissue: colon}",
        "  - path: hgsc",
        "    format: folder",
        "    tissue: ovary",
        "    source_magnification: 20x",
        f"    class_names: [{', '.join(HGSC_CLASSES)}]",
    ]
    if hgsc_map is not None:
        lines.append(f"    class_map: {json.dumps(hgsc_map)}")
    file.write_text("\n".join(lines) + "\n" + extra)
    return file


def prepare(*args: str):
    return CliRunner().invoke(main, ["prepare", "nuclei", *args])


def assert_user_error(result, *needles):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "error:" in result.output
    for needle in needles:
        assert needle in result.output, result.output


# ------------------------------------------------------------------------ the expected, from the raw labels
def raw_labels(source: str) -> tuple[np.ndarray, np.ndarray, list[str], dict[str, str]]:
    """(inst, type, source class names, map to TARGET) of a source image, read without histosynth."""
    path = Path(source)
    if path.parent.name == "images":  # CoNSeP: the .mat beside images/
        mat = scipy.io.loadmat(path.parent.parent / "labels" / f"{path.stem}.mat")
        return mat["inst_map"].astype(np.int64), mat["type_map"].astype(np.int64), CONSEP_CLASSES, {}
    inst = np.asarray(Image.open(path.parent / "hgsc_nest_inst.png")).astype(np.int64)
    typ = np.asarray(Image.open(path.parent / "hgsc_nest_type.png")).astype(np.int64)
    return inst, typ, HGSC_CLASSES, HGSC_MAP


def expected_patch(row: dict, patch: int) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """The patch's raw labels (nearest pixel centres of the crop), its type map in TARGET ids, nuclei per class."""
    inst, typ, names, mapping = raw_labels(row["source"])
    step = row["crop"] // patch  # 2 for CoNSeP (40x -> 20x), 1 for HGSC (20x)
    window = (slice(row["y"], row["y"] + row["crop"]), slice(row["x"], row["x"] + row["crop"]))
    centre = step // 2
    inst, typ = inst[window][centre::step, centre::step], typ[window][centre::step, centre::step]
    target_of = {i: TARGET.index(mapping.get(n, n)) + 1 for i, n in enumerate(names, 1)}
    mapped = np.vectorize(lambda t: target_of.get(int(t), 0))(typ)
    counts = dict.fromkeys(TARGET, 0)
    for nucleus in np.unique(inst[inst > 0]):
        types = typ[(inst == nucleus) & (typ > 0)]
        if types.size:
            majority = int(np.bincount(types).argmax())
            counts[mapping.get(names[majority - 1], names[majority - 1])] += 1
    return inst, mapped, counts


# ----------------------------------------------------------------------------------------------- the tests
@pytest.fixture(scope="module")
def combined(data) -> PatchStore:
    out = data / "combined"
    result = prepare("--sources", str(write_sources(data)), "--out", str(out), *STORE_ARGS)
    assert result.exit_code == 0, result.output
    assert "tissues: colon, ovary" in result.output
    return PatchStore(out)


def test_combined_store_has_the_target_classes_and_a_tissue_per_source(combined, data):
    assert list(combined.class_names) == TARGET
    assert combined.meta["tissues"] == ["colon", "ovary"]
    sources = combined.meta["sources"]
    assert [(s["format"], s["tissue"]) for s in sources] == [("consep", "colon"), ("folder", "ovary")]
    assert sources[1]["class_map"] == {"connective": "spindle-shaped", "inflammatory": "inflammatory",
                                       "neoplastic": "epithelial"}
    assert sources[0]["class_map"] == {c: c for c in CONSEP_CLASSES}
    rows = combined.records
    for row in rows:
        assert row["tissue"] == ("colon" if "/consep/" in row["source"] else "ovary"), row
    consep_rows = [r for r in rows if r["tissue"] == "colon"]
    assert sources[0]["patches"] == len(consep_rows) == 16 and sources[0]["regions"] == 4  # 4 crops of 128 px each
    assert sources[1]["patches"] == len(rows) - 16 and sources[1]["regions"] == 1
    assert {r["split"] for r in consep_rows} == {"train", "test"}  # CoNSeP keeps its own split
    assert {r["split"] for r in rows if r["tissue"] == "ovary"} == {"train", "test"}  # HGSC: hold-out block


def test_each_patch_equals_the_source_labels_under_the_mapping(combined):
    totals = {t: dict.fromkeys(TARGET, 0) for t in ("colon", "ovary")}
    for i, row in enumerate(combined.records):
        inst, mapped, counts = expected_patch(row, combined.patch_size)
        item = combined[i]
        assert np.array_equal(item["type_map"], mapped), row["source"]
        assert np.array_equal(item["inst_map"] > 0, inst > 0)
        assert row["counts"] == counts, (row, counts)
        for name, n in counts.items():
            totals[row["tissue"]][name] += n
    assert totals["ovary"]["epithelial"] > 0 and totals["ovary"]["spindle-shaped"] > 0  # neoplastic, connective
    assert totals["ovary"]["other"] == 0  # HGSC has no "other" class
    assert totals["colon"]["epithelial"] > 0
    recorded = combined.counts
    for name in TARGET:
        assert sum(recorded[s]["nuclei"][name] for s in recorded) == totals["colon"][name] + totals["ovary"][name]


def test_append_gives_the_store_a_one_command_build_gives(combined, data):
    out = data / "appended"
    first = prepare(str(data / "consep"), "--format", "consep", "--tissue", "colon", "--classes", ",".join(TARGET),
                    "--out", str(out), *STORE_ARGS)
    assert first.exit_code == 0, first.output
    before = PatchStore(out).records
    second = prepare(str(data / "hgsc"), "--format", "folder", "--class-names", ",".join(HGSC_CLASSES),
                     "--source-magnification", "20x", "--tissue", "ovary",
                     "--class-map", "neoplastic=epithelial,connective=spindle-shaped", "--out", str(out), "--append")
    assert second.exit_code == 0, second.output
    store = PatchStore(out)
    assert store.records[: len(before)] == before  # old patches unchanged, same splits
    assert store.records == combined.records  # same rows, splits (hold-out draws), counts and tissues
    for i in range(len(store)):
        a, b = store[i], combined[i]
        assert all(np.array_equal(a[k], b[k]) for k in ("image", "inst_map", "type_map"))
    assert store.meta["tissues"] == ["colon", "ovary"] and len(store.meta["sources"]) == 2
    assert store.meta["appended"][0]["first_source"] == 1
    again = prepare(str(data / "hgsc"), "--format", "folder", "--class-names", ",".join(HGSC_CLASSES),
                    "--source-magnification", "20x", "--out", str(out), "--append", "--patch", "32")
    assert_user_error(again, "--append", "--patch 32", "64")


def test_a_class_map_naming_an_unknown_class_is_an_error(data):
    yaml_file = write_sources(data, "unknown.yaml", hgsc_map={"tumor": "epithelial", **HGSC_MAP})
    result = prepare("--sources", str(yaml_file), "--out", str(data / "bad1"), *STORE_ARGS)
    assert_user_error(result, "sources[1].class_map", "'tumor'", "hgsc_nest.png", "connective, inflammatory, neoplastic")
    assert not (data / "bad1").exists()
    result = prepare(str(data / "hgsc"), "--format", "folder", "--class-names", ",".join(HGSC_CLASSES),
                     "--source-magnification", "20x", "--classes", ",".join(TARGET),
                     "--class-map", "neoplastic=tumour,connective=spindle-shaped", "--out", str(data / "bad2"))
    assert_user_error(result, "--class-map", "'tumour'", "not a target class")


def test_a_class_missing_from_the_target_is_an_error(data):
    result = prepare("--sources", str(write_sources(data, "unmapped.yaml", hgsc_map=None)), "--out",
                     str(data / "bad3"), *STORE_ARGS)
    assert_user_error(result, "'connective'", "hgsc_nest.png", "connective=drop")
    result = prepare(str(data / "hgsc"), "--format", "folder", "--class-names", ",".join(HGSC_CLASSES),
                     "--source-magnification", "20x", "--classes", "epithelial,inflammatory",
                     "--class-map", "neoplastic=epithelial", "--out", str(data / "bad4"))
    assert_user_error(result, "'connective'", "--class-map")
    assert not (data / "bad3").exists() and not (data / "bad4").exists()


def test_sources_file_and_option_mistakes_are_one_line_errors(data):
    typo = write_sources(data, "typo.yaml", extra="  - {path: consep, format: consep, tisue: colon}\n")
    assert_user_error(prepare("--sources", str(typo), "--out", str(data / "bad5")), "typo.yaml", "sources[2]",
                      "'tisue'")
    both = prepare("--sources", str(write_sources(data)), "--tissue", "colon", "--out", str(data / "bad6"))
    assert_user_error(both, "--tissue", "SOURCES.yaml")
    assert_user_error(prepare(str(data / "hgsc"), "--format", "folder", "--class-map", "a=b", "--out",
                              str(data / "bad7")), "--class-map", "--classes")


def test_drop_removes_the_nuclei_of_a_class(data):
    inst = np.asarray(Image.open(data / "hgsc" / "hgsc_nest_inst.png")).astype(np.int32)
    typ = np.asarray(Image.open(data / "hgsc" / "hgsc_nest_type.png")).astype(np.int32)
    image = np.asarray(Image.open(data / "hgsc" / "hgsc_nest.png"))
    record = NucleiRecord(image, inst, typ, tuple(HGSC_CLASSES), "hgsc_nest.png", magnification="20x")
    mapping = ClassMapping(("epithelial", "spindle-shaped"), parse_class_map(
        "neoplastic=epithelial, connective=spindle-shaped, inflammatory=drop"))
    out = mapping.apply(record)
    kept = [n for n in np.unique(inst[inst > 0])
            if not ((t := typ[(inst == n) & (typ > 0)]).size and np.bincount(t).argmax() == 2)]
    assert 0 < len(kept) < len(np.unique(inst[inst > 0]))  # some nuclei were inflammatory
    assert out.class_names == ("epithelial", "spindle-shaped")
    assert out.inst_map.max() == len(kept) and set(np.unique(out.inst_map)) == set(range(len(kept) + 1))
    assert np.array_equal(out.inst_map > 0, np.isin(inst, kept))
    assert set(np.unique(out.type_map)) <= {0, 1, 2}
    assert np.array_equal(out.type_map == 1, np.isin(inst, kept) & (typ == 3))  # neoplastic pixels of kept nuclei


def test_class_maps_inline_yaml_and_json(tmp_path):
    inline = parse_class_map("neoplastic = epithelial, dead=drop")
    (tmp_path / "m.yaml").write_text("neoplastic: epithelial\ndead: null\n")
    (tmp_path / "m.json").write_text('{"neoplastic": "epithelial", "dead": "drop"}')
    assert inline == parse_class_map(str(tmp_path / "m.yaml")) == parse_class_map(str(tmp_path / "m.json")) \
        == {"neoplastic": "epithelial", "dead": None}
    with pytest.raises(DataError, match="mapped twice"):
        parse_class_map("a=b,a=c")
    with pytest.raises(DataError, match="not SOURCE=TARGET"):
        parse_class_map("a=b,c")
    with pytest.raises(DataError, match="'drop' is reserved"):
        ClassMapping(("epithelial", "drop"))
    with pytest.raises(DataError, match="'x'"):
        ClassMapping(("a", "b"), {"c": "x"})


def test_a_record_tissue_reaches_the_rows_without_sources(data, tmp_path):
    inst = np.asarray(Image.open(data / "hgsc" / "hgsc_nest_inst.png")).astype(np.int32)
    typ = np.asarray(Image.open(data / "hgsc" / "hgsc_nest_type.png")).astype(np.int32)
    image = np.asarray(Image.open(data / "hgsc" / "hgsc_nest.png"))
    record = NucleiRecord(image, inst, typ, tuple(HGSC_CLASSES), "hgsc", magnification="20x", meta={"tissue": "ovary"})
    store = prepare_nuclei([record], tmp_path / "s", patch=128, overlap=0.0, progress=False)
    assert {r["tissue"] for r in store.records} == {"ovary"} and store.meta["tissues"] == ["ovary"]
