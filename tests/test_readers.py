"""Native dataset readers: tiny fixtures written in each format, the real CoNSeP/HGSC data, and bad inputs."""

from __future__ import annotations

import io
import json
import shutil
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import scipy.io as sio
from PIL import Image

from histosynth.data.formats import READERS, read_nuclei
from histosynth.data.formats.consep import MERGED, ORIGINAL
from histosynth.data.formats.lizard import CLASSES as LIZARD
from histosynth.data.formats.pannuke import CLASSES as PANNUKE
from histosynth.data.io import read_label_png, read_mat, read_rgb, validate_record
from histosynth.data.record import NucleiRecord
from histosynth.errors import DataError

SHARED = Path(__file__).resolve().parents[2] / "shared"
RNG = np.random.default_rng(0)


@pytest.fixture
def real_data() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared/data is not beside this checkout")
    return SHARED / "data"

# A 6x8 label pair used by every fixture: three nuclei, types 1, 2, 2.
INST = np.array([
    [0, 1, 1, 0, 0, 0, 0, 0],
    [0, 1, 1, 0, 0, 2, 2, 0],
    [0, 0, 0, 0, 0, 2, 2, 0],
    [0, 0, 0, 0, 0, 0, 0, 0],
    [3, 3, 0, 0, 0, 0, 0, 0],
    [3, 3, 0, 0, 0, 0, 0, 0],
], dtype=np.int32)
INST_TYPES = np.array([1, 2, 2], dtype=np.int32)
TYPE = np.concatenate([[0], INST_TYPES])[INST]


def rgb(h=6, w=8) -> np.ndarray:
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def save_png(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return path


def save_mat(path: Path, **arrays) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    sio.savemat(str(path), arrays)
    return path


def raises_naming(path, match: str | None = None):
    """pytest.raises(DataError) that also checks the message names ``path``."""

    class _Check:
        def __enter__(self):
            self.ctx = pytest.raises(DataError, match=match)
            self.info = self.ctx.__enter__()
            return self.info

        def __exit__(self, *exc):
            handled = self.ctx.__exit__(*exc)
            assert str(Path(path)) in str(self.info.value) or Path(path).name in str(self.info.value), self.info.value
            return handled

    return _Check()


# ------------------------------------------------------------------------------------------------ io
def test_read_rgb_converts_modes(tmp_path):
    img = rgb()
    rgba = np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])  # opaque: the colour as it is
    assert np.array_equal(read_rgb(save_png(tmp_path / "a.png", rgba)), img)
    rgba[..., 3] = 128  # half transparent: over white glass, (c·128 + 255·127) / 255 (PIL's alpha_composite)
    over_white = (img.astype(np.float64) * 128 + 255 * 127) / 255
    assert np.abs(read_rgb(save_png(tmp_path / "h.png", rgba)).astype(np.float64) - over_white).max() <= 1
    grey = read_rgb(save_png(tmp_path / "g.png", img[..., 0]))
    assert grey.shape == (6, 8, 3) and grey.dtype == np.uint8 and np.array_equal(grey[..., 2], img[..., 0])
    Image.fromarray(img).save(tmp_path / "t.tif")
    assert np.array_equal(read_rgb(tmp_path / "t.tif"), img)


def test_read_label_png_bit_depths(tmp_path):
    big = INST * 1000
    Image.fromarray(big.astype(np.uint16)).save(tmp_path / "l16.png")
    out = read_label_png(tmp_path / "l16.png")
    assert out.dtype == np.int32 and np.array_equal(out, big)
    assert np.array_equal(read_label_png(save_png(tmp_path / "l8.png", INST.astype(np.uint8))), INST)
    with raises_naming(tmp_path / "rgb.png", "single-channel"):
        read_label_png(save_png(tmp_path / "rgb.png", rgb()))


def test_read_mat_names_missing_key(tmp_path):
    path = save_mat(tmp_path / "x.mat", inst_map=INST)
    assert np.array_equal(read_mat(path, ["inst_map"])["inst_map"], INST)
    with raises_naming(path, "'type_map'"):
        read_mat(path, ["inst_map", "type_map"])
    (tmp_path / "bad.mat").write_bytes(b"not a mat file at all" * 10)
    with raises_naming(tmp_path / "bad.mat"):
        read_mat(tmp_path / "bad.mat")


def test_validate_record_messages():
    rec = NucleiRecord(rgb(), INST[:5], TYPE, ("a", "b"), source="x/img.png")
    with raises_naming("x/img.png", "image is 6x8 .* inst_map is 5x8"):
        validate_record(rec)
    rec = NucleiRecord(rgb(), INST, TYPE * 2, ("a", "b"), source="x/img.png")
    with raises_naming("x/img.png", r"type id 4 is outside 0..2; declared classes: 1=a, 2=b"):
        validate_record(rec)
    ok = NucleiRecord(rgb(), INST.astype(np.uint16), TYPE, ("a", "b"), source="x/img.png")
    assert validate_record(ok) is ok and ok.inst_map.dtype == np.int32


# -------------------------------------------------------------------------------------------- consep
def write_consep(root: Path, types=TYPE, inst_types=INST_TYPES, name="a", split_dir="train", ext="png"):
    img = rgb()
    save_png(root / split_dir / "images" / f"{name}.{ext}", img)
    save_mat(root / split_dir / "labels" / f"{name}.mat", inst_map=INST, type_map=types,
             inst_type=inst_types[:, None], inst_centroid=np.zeros((3, 2)))
    return img


def test_consep_splits_and_classes(tmp_path):
    a = write_consep(tmp_path, name="a", split_dir="train")
    b = write_consep(tmp_path, name="b", split_dir="Test")  # CoNSeP's own release capitalizes
    recs = list(read_nuclei("consep", tmp_path))
    assert [r.split for r in recs] == ["train", "test"]
    assert [Path(r.source).name for r in recs] == ["a.png", "b.png"]
    assert np.array_equal(recs[0].image, a) and np.array_equal(recs[1].image, b)
    for r in recs:
        assert np.array_equal(r.inst_map, INST) and np.array_equal(r.type_map, TYPE)
        assert r.class_names == MERGED and r.magnification == "40x"
        assert r.inst_map.dtype == np.int32 and r.type_map.dtype == np.int32
    # SRC pointing at one split folder: split from its name, else None
    assert [r.split for r in read_nuclei("consep", tmp_path / "train")] == ["train"]
    shutil.copytree(tmp_path / "train", tmp_path / "patches")
    assert [r.split for r in read_nuclei("consep", tmp_path / "patches")] == [None]


def test_consep_original_and_merge(tmp_path):
    inst_types = np.array([4, 5, 7], dtype=np.int32)
    types = np.concatenate([[0], inst_types])[INST]
    write_consep(tmp_path, types=types, inst_types=inst_types)
    label = tmp_path / "train" / "labels" / "a.mat"
    with raises_naming(label, "merge-original"):
        list(read_nuclei("consep", tmp_path))  # default "merged": 7-type ids are refused, with a hint
    (orig,) = read_nuclei("consep", tmp_path, classes="original")
    assert orig.class_names == ORIGINAL and np.array_equal(orig.type_map, types)
    (merged,) = read_nuclei("consep", tmp_path, classes="merge-original")
    assert merged.class_names == MERGED
    assert np.array_equal(merged.type_map, np.array([0, 3, 4, 4])[INST])
    assert np.array_equal(merged.inst_map, INST)


def test_consep_real_patches(real_data):
    from histosynth.data.formats import read_consep

    recs = list(islice(read_consep(real_data / "consep"), 3))
    assert len(recs) == 3
    for r in recs:
        assert r.image.shape == (256, 256, 3) and r.image.dtype == np.uint8 and r.split == "train"
        assert r.class_names == ("other", "inflammatory", "epithelial", "spindle-shaped")
        assert set(np.unique(r.type_map)) <= {0, 1, 2, 3, 4}
        src = Path(r.source)
        mat = read_mat(src.parent.parent / "labels" / f"{src.stem}.mat", ["inst_type"])
        inst_type = mat["inst_type"].ravel()
        ids = np.unique(r.inst_map[r.inst_map > 0])
        assert np.array_equal(ids, np.arange(1, len(inst_type) + 1))  # contiguous 1..N
        for k in ids:
            majority = np.bincount(r.type_map[r.inst_map == k]).argmax()
            assert majority == inst_type[k - 1]


# -------------------------------------------------------------------------------------------- lizard
def test_lizard(tmp_path):
    img = rgb()
    inst = INST * 10  # Lizard ids need not be contiguous: the 'id' list maps them
    save_png(tmp_path / "Lizard_Images1" / "consep_1.png", img)
    save_mat(tmp_path / "Lizard_Labels" / "Labels" / "consep_1.mat", inst_map=inst,
             id=np.array([[30], [10], [20]]), **{"class": np.array([[6], [3], [1]])})
    (rec,) = read_nuclei("lizard", tmp_path)
    assert np.array_equal(rec.image, img) and np.array_equal(rec.inst_map, inst)
    assert np.array_equal(rec.type_map, np.array([0, 3, 1, 6])[INST])
    assert rec.class_names == LIZARD == ("neutrophil", "epithelial", "lymphocyte", "plasma", "eosinophil", "connective")
    assert rec.split is None and rec.magnification == "20x" and rec.source.endswith("consep_1.png")


# --------------------------------------------------------------------------------------------- conic
def test_conic(tmp_path):
    images = RNG.integers(0, 256, (2, 6, 8, 3), dtype=np.uint8)
    labels = np.stack([np.stack([INST, TYPE], -1), np.stack([INST[::-1], TYPE[::-1]], -1)]).astype(np.int32)
    np.save(tmp_path / "images.npy", images)
    np.save(tmp_path / "labels.npy", labels)
    (tmp_path / "patch_info.csv").write_text("patch_info\nconsep_1-0000\ncrag_2-0003\n")
    recs = list(read_nuclei("conic", tmp_path))
    assert len(recs) == 2
    for i, r in enumerate(recs):
        assert np.array_equal(r.image, images[i])
        assert np.array_equal(r.inst_map, labels[i, ..., 0]) and np.array_equal(r.type_map, labels[i, ..., 1])
        assert r.class_names == LIZARD and r.split is None and r.magnification == "20x"
    assert recs[0].source == f"{tmp_path / 'images.npy'}[0] (consep_1-0000)"
    assert recs[1].meta["patch_info"] == "crag_2-0003"
    np.save(tmp_path / "labels.npy", labels[:1])
    with raises_naming(tmp_path / "labels.npy", "1 patches but images.npy has 2"):
        read_nuclei("conic", tmp_path)


# ------------------------------------------------------------------------------------------- pannuke
def pannuke_masks() -> np.ndarray:
    """One patch: neoplastic id 5, connective ids 5 and 9 (ids repeat across channels, as in PanNuke)."""
    m = np.zeros((1, 6, 8, 6))
    m[0, :2, 1:3, 0] = 5
    m[0, 1:3, 5:7, 2] = 5
    m[0, 4:, :2, 2] = 9
    m[0, ..., 5] = (m[0, ..., :5].sum(-1) == 0)
    return m


def test_pannuke_folds(tmp_path):
    img1 = RNG.integers(0, 256, (1, 6, 8, 3)).astype(np.float64)  # PanNuke stores float64 0..255
    (tmp_path / "Fold 1" / "images" / "fold1").mkdir(parents=True)
    (tmp_path / "Fold 1" / "masks" / "fold1").mkdir(parents=True)
    np.save(tmp_path / "Fold 1" / "images" / "fold1" / "images.npy", img1)
    np.save(tmp_path / "Fold 1" / "images" / "fold1" / "types.npy", np.array(["Colon"]))
    np.save(tmp_path / "Fold 1" / "masks" / "fold1" / "masks.npy", pannuke_masks())
    (tmp_path / "fold3").mkdir()  # the flatter layout
    img3 = RNG.integers(0, 256, (1, 6, 8, 3), dtype=np.uint8)
    np.save(tmp_path / "fold3" / "images.npy", img3)
    np.save(tmp_path / "fold3" / "masks.npy", pannuke_masks())

    recs = list(read_nuclei("pannuke", tmp_path))
    assert [r.split for r in recs] == ["train", "test"]
    assert recs[0].meta == {"fold": 1, "index": 0, "tissue": "Colon"} and "tissue" not in recs[1].meta
    assert np.array_equal(recs[0].image, img1[0].astype(np.uint8)) and np.array_equal(recs[1].image, img3[0])
    for r in recs:
        assert np.array_equal(r.inst_map, INST) and np.array_equal(r.type_map, np.array([0, 1, 3, 3])[INST])
        assert r.class_names == PANNUKE == ("neoplastic", "inflammatory", "connective", "dead", "epithelial")
        assert r.magnification == "40x"
    assert recs[0].source.endswith("images.npy[0]")
    # a fold in neither list is skipped
    only = list(read_nuclei("pannuke", tmp_path, train_folds=(2,), test_folds=(1,)))
    assert [(r.split, r.meta["fold"]) for r in only] == [("test", 1)]


# -------------------------------------------------------------------------------------------- folder
def test_folder_flat_and_subfolders(tmp_path):
    img = rgb()
    flat = tmp_path / "flat"
    save_png(flat / "r1.png", img)
    Image.fromarray(INST.astype(np.uint16)).save(flat / "r1_inst.png")
    save_png(flat / "r1_type.png", TYPE.astype(np.uint8))
    (flat / "classes.txt").write_text("tumour\nlymphocyte\n\n")
    (rec,) = read_nuclei("folder", flat, magnification="20x")
    assert np.array_equal(rec.image, img) and np.array_equal(rec.inst_map, INST) and np.array_equal(rec.type_map, TYPE)
    assert rec.class_names == ("tumour", "lymphocyte") and rec.split is None and rec.magnification == "20x"
    assert rec.source == str(flat / "r1.png")

    sub = tmp_path / "sub"
    save_png(sub / "images" / "r1.png", img)
    save_png(sub / "instances" / "r1.png", INST.astype(np.uint8))
    save_png(sub / "types" / "r1.png", TYPE.astype(np.uint8))
    (rec,) = read_nuclei("folder", sub, class_names=("a", "b"))  # class_names replaces classes.txt
    assert rec.class_names == ("a", "b") and rec.magnification is None and np.array_equal(rec.type_map, TYPE)
    with raises_naming(sub / "classes.txt", "classes.txt missing"):
        read_nuclei("folder", sub)


def test_folder_real_hgsc(real_data, tmp_path):
    shutil.copytree(real_data / "hgsc", tmp_path / "hgsc")
    (tmp_path / "hgsc" / "classes.txt").write_text("connective\ninflammatory\nneoplastic\n")
    (rec,) = read_nuclei("folder", tmp_path / "hgsc", magnification="20x")
    assert rec.image.shape == (1500, 1500, 3)
    assert rec.class_names == ("connective", "inflammatory", "neoplastic")
    assert len(np.unique(rec.inst_map[rec.inst_map > 0])) == 1294
    assert set(np.unique(rec.type_map)) <= {0, 1, 2, 3}


# ---------------------------------------------------------------------------------------- bad inputs
def flat_folder(root: Path, inst=INST, types=TYPE, image=None) -> Path:
    save_png(root / "r.png", rgb() if image is None else image)
    save_png(root / "r_inst.png", inst.astype(np.uint8))
    save_png(root / "r_type.png", types.astype(np.uint8))
    (root / "classes.txt").write_text("a\nb\n")
    return root


def test_corrupt_truncated_jpeg(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, "JPEG")
    bad = tmp_path / "r.jpg"
    bad.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with raises_naming(bad, "truncated"):
        read_rgb(bad)
    save_png(tmp_path / "r_inst.png", np.zeros((64, 64), np.uint8))
    save_png(tmp_path / "r_type.png", np.zeros((64, 64), np.uint8))
    with raises_naming(bad):
        list(read_nuclei("folder", tmp_path, class_names=("a",)))


def test_empty_files(tmp_path):
    root = flat_folder(tmp_path / "f")
    (root / "r_type.png").write_bytes(b"")
    with raises_naming(root / "r_type.png", "empty"):
        list(read_nuclei("folder", root))
    write_consep(tmp_path / "c")
    label = tmp_path / "c" / "train" / "labels" / "a.mat"
    label.write_bytes(b"")
    with raises_naming(label, "empty"):
        list(read_nuclei("consep", tmp_path / "c"))


def test_size_mismatch(tmp_path):
    root = flat_folder(tmp_path, types=np.zeros((5, 8), np.int32))
    with raises_naming(root / "r_type.png", "image is 6x8 .* type_map is 5x8"):
        list(read_nuclei("folder", root))


def test_type_id_outside_classes(tmp_path):
    root = flat_folder(tmp_path, types=TYPE * 2)  # ids up to 4, but classes.txt declares 2
    with raises_naming(root / "r_type.png", "type id 4 is outside 0..2"):
        list(read_nuclei("folder", root))


def test_missing_label_file(tmp_path):
    root = flat_folder(tmp_path / "f")
    (root / "r_inst.png").unlink()
    with raises_naming(root / "r_inst.png", "label file missing"):
        read_nuclei("folder", root)
    write_consep(tmp_path / "c")
    (tmp_path / "c" / "train" / "labels" / "a.mat").unlink()
    with raises_naming(tmp_path / "c" / "train" / "labels" / "a.mat", "label file missing"):
        read_nuclei("consep", tmp_path / "c")
    save_png(tmp_path / "z" / "images" / "x.png", rgb())
    with raises_naming("x.png", "label file missing"):
        read_nuclei("lizard", tmp_path / "z")
    (tmp_path / "p" / "fold1").mkdir(parents=True)
    np.save(tmp_path / "p" / "fold1" / "images.npy", np.zeros((1, 6, 8, 3), np.uint8))
    with raises_naming(tmp_path / "p" / "fold1" / "images.npy", "masks.npy missing"):
        read_nuclei("pannuke", tmp_path / "p")


@pytest.mark.parametrize("fmt", sorted(READERS))
def test_empty_source(tmp_path, fmt):
    src = tmp_path / "empty"
    src.mkdir()
    (src / "classes.txt").write_text("a\n")
    (src / "images").mkdir()
    with raises_naming(src if fmt != "conic" else src / "images.npy"):
        list(read_nuclei(fmt, src))


def test_unknown_format_and_missing_source(tmp_path):
    with raises_naming(tmp_path, "unknown dataset format 'monuseg'; known formats: consep, lizard, conic"):
        read_nuclei("monuseg", tmp_path)
    with raises_naming(tmp_path / "nope", "not found"):
        read_nuclei("consep", tmp_path / "nope")


# ------------------------------------------------------------------------------------- one image reader, one rule
def _grey_region() -> np.ndarray:
    from histosynth.quickstart import bundled_sample

    jpg = next(Path(bundled_sample()).rglob("*.jpg"))
    return np.asarray(Image.open(jpg).convert("L"))[:64, :64]


def test_16bit_grey_palette_and_alpha_images_follow_one_rule(tmp_path):
    """cases/fid-16bit: a 16-bit image is scaled (v · 255 / 65535), not clipped to 255 — in every reader."""
    from histosynth.data.images import load_image
    from histosynth.data.io import read_rgb

    grey8 = _grey_region()
    grey16 = (grey8.astype(np.uint32) * 257).astype(np.uint16)  # 255 · 257 = 65535: exact round trip
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    Image.fromarray(grey8).save(tmp_path / "g8.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    for reader in (read_rgb, load_image):
        a, b = reader(tmp_path / "g16.png"), reader(tmp_path / "g8.png")
        assert a.dtype == np.uint8 and a.shape == (64, 64, 3) and np.array_equal(a, b)
        assert np.array_equal(a[..., 0], grey8)
    odd = np.array([[0, 1000, 30000, 65535]], np.uint16)  # values that are not multiples of 257
    Image.fromarray(odd).save(tmp_path / "odd.png")
    assert read_rgb(tmp_path / "odd.png")[0, :, 1].tolist() == [0, 4, 117, 255]  # rint(v · 255 / 65535)
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (200, 10, 20, 255)  # opaque pixel kept; transparent ones are glass (white)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = read_rgb(tmp_path / "a.png")
    assert out[0, 0].tolist() == [200, 10, 20] and out[1, 1].tolist() == [255, 255, 255]
    pal = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    pal.putpalette([10, 20, 30, 40, 50, 60])
    pal.save(tmp_path / "p.png")
    assert read_rgb(tmp_path / "p.png")[0].tolist() == [[10, 20, 30], [40, 50, 60]]


def test_fid_of_16bit_images_equals_that_of_their_8bit_copies(tmp_path):
    """evaluate fid reads a 16-bit folder as its 8-bit copy would read (the case's 302.6 vs 188.5 came from
    clipping)."""
    from click.testing import CliRunner

    from histosynth.cli import main

    region = _grey_region()
    for name in ("real", "g8", "g16"):
        (tmp_path / name).mkdir()
    for i in range(4):
        tile = np.ascontiguousarray(np.rot90(region, i))
        Image.fromarray(np.repeat(np.roll(tile, 7 * i, axis=1)[..., None], 3, axis=2)).save(tmp_path / "real" / f"{i}.png")
        Image.fromarray(tile).save(tmp_path / "g8" / f"{i}.png")
        Image.fromarray((tile.astype(np.uint32) * 257).astype(np.uint16)).save(tmp_path / "g16" / f"{i}.png")
    fd = {}
    for name in ("g8", "g16"):
        r = CliRunner().invoke(main, ["evaluate", "fid", "--real", str(tmp_path / "real"), "--generated",
                                      str(tmp_path / name), "--features", "effnet-lite0", "--device", "cpu"])
        assert r.exit_code == 0, r.output
        fd[name] = json.loads(r.output[r.output.index("{"):])["fid"]
    assert fd["g16"] == pytest.approx(fd["g8"], abs=1e-6) and fd["g8"] > 0
