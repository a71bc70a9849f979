"""Readers check the invariants of their format (issue 14, items 1, 2 and 11).

Inputs are built here from the bundled real HGSC region (1,294 nuclei, BSD-3, in the package): a PanNuke copy with
the background channel first, CoNIC labels with swapped channels, CoNSeP / Lizard .mat files that do not belong
together, the instance map saved 8-bit (ids wrap past 255), instance-only folders. The real CoNSeP / HGSC data in
../shared/data must read cleanly by default (skipped when it is not beside this checkout).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from click.testing import CliRunner
from PIL import Image
from scipy import ndimage as ndi

from histosynth.data.formats import read_nuclei
from histosynth.data.formats.pannuke import CLASSES as PANNUKE
from histosynth.data.instance_check import check_instances, relabel_components
from histosynth.data.io import validate_record
from histosynth.data.record import NucleiRecord
from histosynth.errors import DataError
from histosynth.quickstart import bundled_sample

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def hgsc() -> NucleiRecord:
    (region,) = read_nuclei("folder", bundled_sample(), magnification="20x")
    return region


def _raises(path, *needles):
    """pytest.raises(DataError) whose one-line message names ``path`` and holds every needle."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(DataError)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            msg = str(self.info.value)
            assert "\n" not in msg, msg
            assert str(path) in msg, msg
            for needle in needles:
                assert needle in msg, msg
            return handled

    return _Check()


def _reference_split_ids(inst: np.ndarray) -> set[int]:
    """Ids made of several 8-connected parts with a part away from the image border, id by id (slow, plain)."""
    out = set()
    h, w = inst.shape
    for k, box in enumerate(ndi.find_objects(inst), 1):
        if box is None:
            continue
        lab, n = ndi.label(inst[box] == k, structure=np.ones((3, 3), bool))
        if n < 2:
            continue
        sizes = np.bincount(lab.ravel())[1:]
        parts = [i + 1 for i in range(n) if sizes[i] > 2 or sizes[i] == sizes.max()]
        if len(parts) < 2:
            continue
        for p in parts:
            ys, xs = np.nonzero(lab == p)
            ys, xs = ys + box[0].start, xs + box[1].start
            if not (ys.min() == 0 or xs.min() == 0 or ys.max() == h - 1 or xs.max() == w - 1):
                out.add(k)
                break
    return out


# ------------------------------------------------------------------------------- item 2: wrapped 8-bit instance maps
def _flat(root: Path, image, inst, typ, classes=("connective", "inflammatory", "neoplastic"), bits=16) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(root / "r.png")
    Image.fromarray(inst.astype(np.uint8 if bits == 8 else np.uint16)).save(root / "r_inst.png")
    Image.fromarray(typ.astype(np.uint8)).save(root / "r_type.png")
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    return root


def test_wrapped_8bit_instance_png_is_refused_with_counts(hgsc, tmp_path):
    wrapped = hgsc.inst_map % 256  # what an 8-bit save of 1,294 ids does
    expected_split = _reference_split_ids(wrapped)
    orphans = int(np.count_nonzero((hgsc.type_map > 0) & (wrapped == 0)))
    assert len(expected_split) > 200 and orphans > 1000  # the case is real: most ids are shared by ~5 nuclei
    src = _flat(tmp_path / "w", hgsc.image, wrapped, hgsc.type_map, bits=8)
    assert Image.open(src / "r_inst.png").mode == "L"
    with _raises(src / "r_inst.png", f"{len(expected_split)} instance ids are made of several disconnected parts",
                 f"{orphans} typed pixels lie in no instance", "8-bit", "--relabel-components"):
        list(read_nuclei("folder", src, magnification="20x"))


def test_relabel_components_recovers_every_nucleus_of_a_wrapped_map(hgsc, tmp_path):
    src = _flat(tmp_path / "w", hgsc.image, hgsc.inst_map % 256, hgsc.type_map, bits=8)
    (rec,) = read_nuclei("folder", src, magnification="20x", relabel_components=True)
    truth, got = hgsc.inst_map, rec.inst_map
    on = truth > 0
    pairs = np.unique(np.stack([truth[on], got[on]]), axis=1)
    # one new instance per real nucleus, never shared: the same partition into nuclei
    assert pairs.shape[1] == len(np.unique(truth[on])) == len(np.unique(pairs[1])) == 1294
    assert np.all(got[on] > 0)
    # the only other instance is the real region's typed blob without an instance (43 px at its top edge)
    extra = np.setdiff1d(np.unique(got[got > 0]), pairs[1])
    assert extra.size == 1 and np.count_nonzero(got == extra[0]) == 43
    # every instance carries one type: the majority type of its pixels in the original map
    for new in pairs[1][:: 37]:
        types = np.unique(rec.type_map[got == new])
        assert types.size == 1
        assert types[0] == np.bincount(hgsc.type_map[got == new]).argmax()
    assert check_instances(got, rec.type_map).ok


def test_check_is_vectorised(hgsc):
    inst, typ = hgsc.inst_map[:1000, :1000] % 256, hgsc.type_map[:1000, :1000]
    check_instances(inst, typ)  # imports
    start = time.perf_counter()
    report = check_instances(inst, typ)
    assert time.perf_counter() - start < 1.0
    assert set(report.split_ids.tolist()) == _reference_split_ids(inst)


def _record(inst, typ, k=3):
    h, w = inst.shape
    return NucleiRecord(np.zeros((h, w, 3), np.uint8), inst.astype(np.int32), typ.astype(np.int32),
                        tuple("abcdefg"[:k]), source="x/r.png")


def test_tolerances_border_cuts_specks_and_few_untyped_pixels():
    inst = np.zeros((40, 40), np.int32)
    inst[0:6, 5:8] = 1
    inst[0:6, 12:15] = 1  # a U-shaped nucleus cut by the top edge: two parts, both on the border
    inst[20:26, 20:26] = 2
    inst[28, 28] = 2  # a 1-px speck of nucleus 2
    typ = (inst > 0).astype(np.int32)
    typ[38, 0] = 1  # one typed pixel in no instance: 1 of 74 typed pixels > 1 % → refused
    with _raises("x/r.png", "no instance id is made of several", "1 typed pixel lies in no instance"):
        validate_record(_record(inst, typ))
    typ[38, 0] = 0
    rec = validate_record(_record(inst, typ))
    assert np.array_equal(rec.inst_map, inst)  # accepted as it is
    moved = np.zeros_like(inst)
    moved[10:16, 5:8] = 1
    moved[10:16, 12:15] = 1  # the same two parts away from the border: two nuclei sharing an id
    with _raises("x/r.png", "1 instance id is made of several disconnected parts (e.g. id 1: 2 parts)"):
        validate_record(_record(moved, (moved > 0).astype(np.int32)))
    diagonal = np.eye(5, dtype=np.int32) * 4  # touching only by corners: one 8-connected nucleus
    big = np.zeros((20, 20), np.int32)
    big[5:10, 5:10] = diagonal
    assert check_instances(big, big > 0).ok


def test_relabel_splits_parts_with_majority_types_and_drops_specks():
    inst = np.zeros((30, 30), np.int32)
    inst[5:10, 5:10] = 7
    inst[15:20, 15:22] = 7  # a second nucleus with the same id (larger: it keeps id 7)
    inst[25, 2] = 7  # a speck
    inst[2:5, 20:24] = 3
    typ = np.zeros_like(inst)
    typ[5:10, 5:10] = 2
    typ[5, 5] = 1  # minority pixel: the part's majority (2) wins
    typ[15:20, 15:22] = 1
    typ[25, 2] = 2
    typ[2:5, 20:24] = 1
    typ[26:29, 26:29] = 3  # typed, in no instance: becomes its own nucleus
    out, out_typ, counts = relabel_components(inst, typ)
    assert counts == {"split_ids": 1, "new_instances": 1, "orphan_instances": 1}
    assert np.all(out[15:20, 15:22] == 7) and np.all(out[2:5, 20:24] == 3)
    assert len(np.unique(out[5:10, 5:10])) == 1 and out[5, 5] not in (0, 3, 7)
    assert np.all(out_typ[5:10, 5:10] == 2) and np.all(out_typ[15:20, 15:22] == 1)
    assert out[25, 2] == 0 and out_typ[25, 2] == 0
    orphan_id = out[27, 27]
    assert orphan_id not in (0, 3, 7, out[5, 5]) and np.all(out[26:29, 26:29] == orphan_id)
    assert np.all(out_typ[26:29, 26:29] == 3)
    assert check_instances(out, out_typ).ok
    same, same_typ, none = relabel_components(out, out_typ)  # nothing left to do: unchanged
    assert np.array_equal(same, out) and np.array_equal(same_typ, out_typ) and sum(none.values()) == 0


# ------------------------------------------------------------------------------------ item 1: PanNuke's layout
def _pannuke_patch(hgsc, y=600, x=600, epithelial=False) -> np.ndarray:
    """(256, 256, 6) masks in PanNuke's native layout from the real region: ids as found, float64 like PanNuke."""
    inst = hgsc.inst_map[y:y + 256, x:x + 256]
    typ = hgsc.type_map[y:y + 256, x:x + 256]
    m = np.zeros((256, 256, 6))
    channel = {3: 0, 2: 1, 1: 2}  # neoplastic, inflammatory, connective
    for t, c in channel.items():
        m[..., c] = np.where(typ == t, inst, 0)
    if epithelial:  # move the neoplastic nuclei of the left half into the epithelial channel
        m[:, :128, 4], m[:, :128, 0] = m[:, :128, 0], 0
    m[..., 5] = (m[..., :5] > 0).sum(-1) == 0
    return m


def _pannuke(root: Path, masks: np.ndarray, hgsc) -> Path:
    fold = root / "fold1"
    fold.mkdir(parents=True)
    np.save(fold / "images.npy", np.repeat(hgsc.image[None, :256, :256].astype(np.float64), len(masks), axis=0))
    np.save(fold / "masks.npy", masks)
    return fold / "masks.npy"


@pytest.mark.parametrize("epithelial", [False, True])
def test_pannuke_background_first_is_refused_naming_the_channel(hgsc, tmp_path, epithelial):
    native = _pannuke_patch(hgsc, epithelial=epithelial)
    _pannuke(tmp_path / "native", native[None], hgsc)
    ok = list(read_nuclei("pannuke", tmp_path / "native"))
    assert len(ok) == 1 and ok[0].type_map.max() <= len(PANNUKE)
    assert np.count_nonzero(ok[0].inst_map == np.bincount(ok[0].inst_map.ravel())[1:].argmax() + 1) < 0.1 * 256 ** 2
    first = np.concatenate([native[..., 5:], native[..., :5]], axis=-1)  # the public copies' layout
    path = _pannuke(tmp_path / "first", first[None], hgsc)
    wrong = "values other than 0 and 1" if epithelial else "0 everywhere"
    with _raises(f"{path}[0]", "not PanNuke's mask layout", wrong, "channel 0 looks like the background",
                 "np.roll(masks, -1, axis=-1)"):
        list(read_nuclei("pannuke", tmp_path / "first"))
    fixed = np.roll(first, -1, axis=-1)
    path = _pannuke(tmp_path / "fixed", fixed[None], hgsc)
    (rec,) = read_nuclei("pannuke", tmp_path / "fixed")
    assert np.array_equal(rec.inst_map, ok[0].inst_map) and np.array_equal(rec.type_map, ok[0].type_map)


def test_pannuke_background_not_complementary_and_five_channel_copies(hgsc, tmp_path):
    m = _pannuke_patch(hgsc)
    ys, xs = np.nonzero(m[..., 5] == 1)
    m[ys[:10], xs[:10], 5] = 0  # background missing on 10 pixels where there is no nucleus
    path = _pannuke(tmp_path / "a", m[None], hgsc)
    with _raises(f"{path}[0]", "channel 5 should be the background", "0 on 10 pixels where none has"):
        list(read_nuclei("pannuke", tmp_path / "a"))
    five = _pannuke_patch(hgsc)[..., :5]
    _pannuke(tmp_path / "b", five[None], hgsc)
    assert len(list(read_nuclei("pannuke", tmp_path / "b"))) == 1  # 5 class channels, no background: fine
    bg_first5 = np.concatenate([_pannuke_patch(hgsc)[..., 5:], _pannuke_patch(hgsc)[..., :4]], axis=-1)
    path = _pannuke(tmp_path / "c", bg_first5[None], hgsc)
    with _raises(f"{path}[0]", "channel 0 looks like the background"):
        list(read_nuclei("pannuke", tmp_path / "c"))


# --------------------------------------------------------------------------------------- item 1: CoNIC's layout
def _conic(root: Path, hgsc, labels: np.ndarray) -> Path:
    root.mkdir(parents=True)
    np.save(root / "images.npy", np.repeat(hgsc.image[None, :256, :256], len(labels), axis=0))
    np.save(root / "labels.npy", labels)
    return root / "labels.npy"


def test_conic_swapped_channels_are_refused(hgsc, tmp_path):
    inst = hgsc.inst_map[600:856, 600:856]
    ids = np.unique(inst[inst > 0])
    inst = np.searchsorted(ids, inst) * (inst > 0)  # CoNIC numbers a patch's nuclei 1..N
    typ = hgsc.type_map[600:856, 600:856] * (inst > 0)
    good = np.stack([inst, typ], -1)[None].astype(np.int32)
    _conic(tmp_path / "ok", hgsc, good)
    assert len(list(read_nuclei("conic", tmp_path / "ok"))) == 1
    path = _conic(tmp_path / "swapped", hgsc, good[..., ::-1].copy())
    with _raises(f"{path}[0]", "channel 1 (types) holds values up to", "outside the types 0..6",
                 "channels swapped"):
        list(read_nuclei("conic", tmp_path / "swapped"))
    few = np.zeros((1, 256, 256, 2), np.int32)  # two nuclei of one type: swapped, the ids still look like types
    few[0, 10:20, 10:20], few[0, 50:60, 50:60] = (1, 2), (2, 2)
    path = _conic(tmp_path / "few", hgsc, few[..., ::-1].copy())
    with _raises(f"{path}[0]", "1 instance id is made of several disconnected parts", "not swapped"):
        list(read_nuclei("conic", tmp_path / "few"))


# ------------------------------------------------------------------------------ item 1: CoNSeP / Lizard .mat files
def _consep(root: Path, hgsc, inst, typ, inst_type) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir(parents=True)
    Image.fromarray(hgsc.image[: inst.shape[0], : inst.shape[1]]).save(root / "images" / "a.png")
    sio.savemat(str(root / "labels" / "a.mat"), {"inst_map": inst, "type_map": typ,
                                                 "inst_type": np.asarray(inst_type).reshape(-1, 1)})
    return root / "labels" / "a.mat"


def _hovernet_crop(hgsc):
    from histosynth.data.formats.writers import hovernet_labels

    arrays = hovernet_labels(hgsc.inst_map[600:856, 600:856], hgsc.type_map[600:856, 600:856] + 0)
    return arrays["inst_map"], arrays["type_map"], arrays["inst_type"].ravel()


def test_consep_inst_type_must_belong_to_the_maps(hgsc, tmp_path):
    inst, typ, inst_type = _hovernet_crop(hgsc)
    _consep(tmp_path / "ok", hgsc, inst, typ, inst_type)
    assert len(list(read_nuclei("consep", tmp_path / "ok"))) == 1
    path = _consep(tmp_path / "short", hgsc, inst, typ, inst_type[:-3])
    with _raises(path, f"inst_type has {inst_type.size - 3} rows but inst_map's largest instance id is "
                       f"{inst_type.size}"):
        list(read_nuclei("consep", tmp_path / "short"))
    shifted = inst_type % 3 + 1  # another numbering of the types: every instance disagrees with its pixels
    path = _consep(tmp_path / "shifted", hgsc, inst, typ, shifted)
    with _raises(path, "inst_type disagrees with type_map for"):
        list(read_nuclei("consep", tmp_path / "shifted"))
    gap = inst.copy()
    gap[gap == 2] = 0  # an id missing in between: accepted while the largest id matches the rows
    _consep(tmp_path / "gap", hgsc, gap, typ * (gap > 0), inst_type)
    assert len(list(read_nuclei("consep", tmp_path / "gap"))) == 1


def test_lizard_class_and_id_lists_are_checked(hgsc, tmp_path):
    inst, _, inst_type = _hovernet_crop(hgsc)
    ids = np.arange(1, inst_type.size + 1)

    def lizard(name, ids, classes):
        root = tmp_path / name
        (root / "images").mkdir(parents=True)
        Image.fromarray(hgsc.image[:256, :256]).save(root / "images" / "a.png")
        (root / "Labels").mkdir()
        sio.savemat(str(root / "Labels" / "a.mat"), {"inst_map": inst, "id": ids.reshape(-1, 1),
                                                     "class": np.asarray(classes).reshape(-1, 1)})
        return root, root / "Labels" / "a.mat"

    root, _ = lizard("ok", ids, inst_type)
    assert len(list(read_nuclei("lizard", root))) == 1
    root, path = lizard("zero", ids, np.zeros_like(inst_type))  # class 0: not one of Lizard's 1..6
    with _raises(path, "'class' holds [0], outside Lizard's classes 1..6"):
        list(read_nuclei("lizard", root))
    root, path = lizard("swapped", inst_type, ids)  # id and class lists exchanged
    with _raises(path, "'class' holds", "outside Lizard's classes 1..6"):
        list(read_nuclei("lizard", root))
    twice = np.concatenate([ids, [1]])
    root, path = lizard("twice", twice, np.concatenate([inst_type, [inst_type[0] % 6 + 1]]))
    with _raises(path, "'id' lists instance 1 more than once with different classes"):
        list(read_nuclei("lizard", root))


# ------------------------------------------------------------------------------- item 11: instance-only folders
def test_instance_only_folders_read_as_one_class(hgsc, tmp_path):
    inst = hgsc.inst_map[:300, :300]
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(hgsc.image[:300, :300]).save(flat / "img1.png")
    Image.fromarray(inst.astype(np.uint16)).save(flat / "img1_inst.png")
    (rec,) = read_nuclei("folder", flat, magnification="40x")
    assert rec.class_names == ("nucleus",)
    assert np.array_equal(rec.inst_map, inst) and np.array_equal(rec.type_map, (inst > 0).astype(np.int32))
    sub = tmp_path / "sub"  # images/ + instances/, no types/ (MoNuSeg / TNBC style), one class named
    (sub / "images").mkdir(parents=True)
    (sub / "instances").mkdir()
    Image.fromarray(hgsc.image[:300, :300]).save(sub / "images" / "a.png")
    Image.fromarray(inst.astype(np.uint16)).save(sub / "instances" / "a.png")
    (sub / "classes.txt").write_text("nucleus_monuseg\n")
    (rec,) = read_nuclei("folder", sub)
    assert rec.class_names == ("nucleus_monuseg",) and set(np.unique(rec.type_map)) == {0, 1}
    (sub / "classes.txt").write_text("tumour\nimmune\n")
    with _raises(sub / "classes.txt", "no type maps found", "2 classes are declared"):
        read_nuclei("folder", sub)
    # some images typed, others not: the missing type file is named, as before
    Image.fromarray(hgsc.image[:300, :300]).save(flat / "img2.png")
    Image.fromarray(inst.astype(np.uint16)).save(flat / "img2_inst.png")
    Image.fromarray(hgsc.type_map[:300, :300].astype(np.uint8)).save(flat / "img2_type.png")
    (flat / "classes.txt").write_text("connective\ninflammatory\nneoplastic\n")
    with _raises(flat / "img1_type.png", "label file missing"):
        read_nuclei("folder", flat)


# ------------------------------------------------------------------------------------------- the command line
def test_prepare_nuclei_refuses_then_relabels_a_wrapped_folder(hgsc, tmp_path):
    from histosynth.cli import main
    from histosynth.data.sources import read_sources_file
    from histosynth.data.store import PatchStore

    win = (slice(0, 512), slice(0, 512))
    wrapped = hgsc.inst_map[win] % 256  # the region's own ids (up to 1294) saved in 8 bits
    assert not check_instances(wrapped, hgsc.type_map[win]).ok
    src = _flat(tmp_path / "src", hgsc.image[win], wrapped, hgsc.type_map[win], bits=8)
    args = ["prepare", "nuclei", "--format", "folder", str(src), "--patch", "128", "--overlap", "0",
            "--magnification", "20x", "--source-magnification", "20x"]
    bad = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "s1")])
    assert bad.exit_code == 2, bad.output
    assert "Traceback" not in bad.output and "instance ids are made of several disconnected parts" in bad.output
    assert "--relabel-components" in bad.output and not (tmp_path / "s1").exists()
    good = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "s2"), "--relabel-components"])
    assert good.exit_code == 0, good.output
    store = PatchStore(tmp_path / "s2")
    assert store.meta["sources"][0]["options"]["relabel_components"] is True
    yaml_file = tmp_path / "sources.yaml"
    yaml_file.write_text(f"classes: [connective, inflammatory, neoplastic]\nsources:\n"
                         f"  - {{path: {src}, format: folder, source_magnification: 20x, relabel_components: true}}\n")
    _, (source,) = read_sources_file(yaml_file)
    assert source.options["relabel_components"] is True
    yaml_file.write_text(yaml_file.read_text().replace("relabel_components: true", "relabel_components: sure"))
    with _raises(yaml_file, "sources[0].relabel_components: expected true or false"):
        read_sources_file(yaml_file)


# -------------------------------------------------------------------------------------------- the real data
@pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data is not beside this checkout")
def test_real_consep_and_hgsc_read_cleanly(tmp_path):
    records = list(read_nuclei("consep", SHARED / "consep"))
    assert len(records) == 656
    # with --relabel-components the clean patches come back unchanged (their two-part ids are cut by the edge)
    for rec in records[:40]:
        again, _, counts = relabel_components(rec.inst_map, rec.type_map)
        assert sum(counts.values()) == 0 and np.array_equal(again, rec.inst_map)
    src = tmp_path / "hgsc"
    src.mkdir()
    for name in ("hgsc_nest.jpg", "hgsc_nest_inst.png", "hgsc_nest_type.png"):
        (src / name).symlink_to(SHARED / "hgsc" / name)
    (src / "classes.txt").write_text("connective\ninflammatory\nneoplastic\n")
    (rec,) = read_nuclei("folder", src, magnification="20x")
    assert len(np.unique(rec.inst_map)) - 1 == 1294
    report = check_instances(rec.inst_map, rec.type_map)
    assert report.split_ids.size == 0 and report.orphan_pixels == 43
