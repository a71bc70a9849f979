"""Native-format readers of the public Gleason datasets (histosynth.data.gleason): SICAPv2, Gleason2019, PANDA.

Every fixture is written here in its dataset's own layout (tiny images, .xlsx partitions written with openpyxl,
pyramidal TIFFs with tifffile); expected labels are computed independently (lookup tables by hand, a hand-built
vote table, plain numpy slicing of the pyramid levels).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histosynth.data.gleason import parse_label_map, parse_labels, read_gleason2019, read_panda, read_sicapv2
from histosynth.data.gleason.labels import snap_to_values
from histosynth.errors import DataError, HistosynthError

openpyxl = pytest.importorskip("openpyxl")

H, W = 40, 48  # not square: a transposed map would fail


def rgb_noise(seed: int, h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def lut(native: np.ndarray, table: dict[int, int]) -> np.ndarray:
    """The expected label ids, by a plain lookup (independent of the readers' LabelMapping)."""
    out = np.full(native.shape, -1, np.int64)
    for v, k in table.items():
        out[native == v] = k
    assert (out >= 0).all()
    return out


# ------------------------------------------------------------------------------------------------ SICAPv2
SICAP_TABLE = {0: 0, 3: 1, 4: 2, 5: 3}  # 0 NC, 3/4/5 Gleason 3/4/5 → non-cancer, GG3, GG4, GG5


def sicap_mask(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(np.array([0, 3, 4, 5], np.uint8), size=(H, W))


def write_xlsx(path: Path, names: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append([None, "image_name", "NC", "G3", "G4", "G5", "G4C"])  # pandas' to_excel: an unnamed index first
    for i, name in enumerate(names):
        sheet.append([i, name, 0, 1, 0, 0, 0])
    book.save(path)


def write_sicap(root: Path, masks: dict[str, np.ndarray], *, mask_suffix: str = ".png") -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i, (name, mask) in enumerate(masks.items()):
        Image.fromarray(rgb_noise(i, *mask.shape)).save(root / "images" / f"{name}.jpg", quality=95)
        if mask_suffix == ".png":
            Image.fromarray(mask).save(root / "masks" / f"{name}.png")
        else:
            Image.fromarray(mask).save(root / "masks" / f"{name}{mask_suffix}", quality=75)
    write_xlsx(root / "partition" / "Test" / "Train.xlsx", ["p_a.jpg", "p_b.jpg"])
    write_xlsx(root / "partition" / "Test" / "Test.xlsx", ["p_c.jpg"])
    write_xlsx(root / "partition" / "Validation" / "Val1" / "Train.xlsx", ["p_a.jpg"])
    write_xlsx(root / "partition" / "Validation" / "Val1" / "Test.xlsx", ["p_b.jpg"])
    return root


@pytest.fixture
def sicap(tmp_path):
    masks = {n: sicap_mask(i) for i, n in enumerate(["p_a", "p_b", "p_c", "p_d"])}  # p_d: in no partition
    return write_sicap(tmp_path / "SICAPv2", masks), masks


def test_sicap_labels_split_and_partition(sicap):
    src, masks = sicap
    records = list(read_sicapv2(src))
    assert [(Path(r.source).stem, r.split) for r in records] == [("p_a", "train"), ("p_b", "train"), ("p_c", "test")]
    for r in records:
        stem = Path(r.source).stem
        assert r.class_names == ("non-cancer", "GG3", "GG4", "GG5") and r.magnification == "10x"
        assert r.region_map.dtype == np.int32 and r.image.dtype == np.uint8 and r.image.shape == (H, W, 3)
        assert np.array_equal(r.region_map, lut(masks[stem], SICAP_TABLE))
        assert np.array_equal(r.image, np.asarray(Image.open(src / "images" / f"{stem}.jpg").convert("RGB")))
        assert r.meta["unlisted"] == 1 and r.meta["labels"]["G3"] == 1
    val1 = list(read_sicapv2(src, partition="val1"))
    assert [(Path(r.source).stem, r.split) for r in val1] == [("p_a", "train"), ("p_b", "test")]


def test_sicap_user_labels_and_map(sicap):
    src, masks = sicap
    labels = parse_labels("benign,low,high")
    records = list(read_sicapv2(src, labels=labels, label_map=parse_label_map("0=benign,3=low,4=high,5=high")))
    assert records[0].class_names == labels
    assert np.array_equal(records[0].region_map, lut(masks["p_a"], {0: 0, 3: 1, 4: 2, 5: 2}))
    with pytest.raises(HistosynthError, match=r"default mapping puts native value 0 on 'non-cancer'.*--label-map 0="):
        read_sicapv2(src, labels=labels)
    with pytest.raises(HistosynthError, match=r"--label-map: value 3 goes to 'GG9'"):
        read_sicapv2(src, label_map=parse_label_map("3=GG9"))
    with pytest.raises(HistosynthError, match=r"prefixes are only for --format panda"):
        read_sicapv2(src, label_map=parse_label_map("karolinska:2=GG3"))


def test_sicap_jpeg_masks_snap_to_codes(tmp_path):
    blocks = np.zeros((64, 64), np.uint8)  # constant areas, and 2 px stripes whose edges JPEG blurs
    blocks[:32, 32:], blocks[32:, :32], blocks[32:, 32:] = 3, 4, 5
    blocks[40:56, 8:24] = np.where((np.arange(16) // 2) % 2, 5, 0)[None, :]
    src = write_sicap(tmp_path / "S", {"p_a": blocks, "p_b": blocks, "p_c": blocks}, mask_suffix=".jpg")
    decoded = np.asarray(Image.open(src / "masks" / "p_a.jpg"))
    assert not np.isin(decoded, [0, 3, 4, 5]).all()  # the fixture really is lossy
    record = next(iter(read_sicapv2(src)))
    expected = lut(blocks, SICAP_TABLE)
    exact = np.isin(decoded, [0, 3, 4, 5]) & (decoded == blocks)
    assert np.array_equal(record.region_map[exact], expected[exact])
    assert (record.region_map == expected).mean() > 0.985  # 0.972 by nearest code alone; the rest: the 2 px stripes
    # the snap itself, no exact neighbour: within the tolerance to the nearest code (ties to the lower), farther kept
    grey = np.array([[1, 2, 6, 8, 9, 200]], np.uint8)
    assert snap_to_values(grey, [0, 3, 4, 5], 3).tolist() == [[0, 3, 5, 5, 9, 200]]
    assert snap_to_values(np.array([[4]], np.uint8), [3, 5], 3).tolist() == [[3]]
    # with exact neighbours they vote: ±1 noise inside a GG4 area stays GG4 (nearest would give GG3 / GG5)
    area = np.full((7, 7), 4, np.uint8)
    area[3, 3], area[1, 5], area[5, 1] = 3, 5, 6
    assert (snap_to_values(area, [0, 3, 4, 5], 3) == 4).all()


def test_sicap_errors(sicap, tmp_path):
    src, masks = sicap
    bad = masks["p_a"].copy()
    bad[0, 0] = 2  # a PNG mask is exact: 2 is no SICAPv2 code
    Image.fromarray(bad).save(src / "masks" / "p_a.png")
    with pytest.raises(DataError, match=r"masks/p_a\.png: mask values \[2\] \(1 px\) are not placed"):
        list(read_sicapv2(src))
    Image.fromarray(masks["p_a"][:, :-1]).save(src / "masks" / "p_a.png")
    with pytest.raises(DataError, match=r"masks/p_a\.png: mask is 40x47 px, its image 40x48 px"):
        list(read_sicapv2(src))
    (src / "masks" / "p_a.png").unlink()
    with pytest.raises(DataError, match=r"images/p_a\.jpg: no mask for this image"):
        read_sicapv2(src)
    Image.fromarray(masks["p_a"]).save(src / "masks" / "p_a.png")
    write_xlsx(src / "partition" / "Test" / "Test.xlsx", ["p_b.jpg"])
    with pytest.raises(DataError, match=r"Test\.xlsx: image p_b is listed also in .*Train\.xlsx"):
        read_sicapv2(src)
    with pytest.raises(DataError, match=r"no partition/Validation/Val2/ folder"):
        read_sicapv2(src, partition="val2")


# --------------------------------------------------------------------------------------------- Gleason2019
G_TABLE = {0: 0, 1: 0, 6: 0, 3: 1, 4: 2, 5: 3}
# three pathologists' values at one pixel → the majority label, worked out by hand (ties → the lower label)
VOTES = [
    ((3, 3, 3), 1),  # unanimous GG3
    ((4, 4, 5), 2),  # 2 : 1
    ((3, 4, 5), 1),  # three-way tie → GG3
    ((1, 6, 3), 0),  # benign codes 1 and 6 are one label: non-cancer 2 : 1
    ((0, 5, 5), 3),
    ((5, 4, 1), 0),  # three-way tie → non-cancer
    ((6, 4, 4), 2),
    ((0, 1, 6), 0),
]


def write_gleason(root: Path) -> tuple[Path, dict]:
    """Core slide001_core001: pathologists 1, 2, 3 (columns = VOTES cases); core slide001_core002: only 2."""
    (root / "Train Imgs").mkdir(parents=True)
    h, w = 6, 2 * len(VOTES)
    maps = {n: np.zeros((h, w), np.uint8) for n in (1, 2, 3)}
    for j, (values, _) in enumerate(VOTES):
        for n, v in zip((1, 2, 3), values):
            maps[n][:, 2 * j : 2 * j + 2] = v
    single = np.random.default_rng(5).choice(np.array([0, 1, 3, 4, 5, 6], np.uint8), size=(h, w))
    for i, core in enumerate(["slide001_core001", "slide001_core002"]):
        Image.fromarray(rgb_noise(i, h, w)).save(root / "Train Imgs" / f"{core}.jpg", quality=95)
    for n, m in maps.items():
        (root / f"Maps{n}_T").mkdir()
        Image.fromarray(m).save(root / f"Maps{n}_T" / "slide001_core001_classimg_nonconvex.png")
    Image.fromarray(single).save(root / "Maps2_T" / "slide001_core002_classimg_nonconvex.png")
    return root, {"maps": maps, "single": single}


def test_gleason2019_majority_vote_by_hand(tmp_path):
    src, fx = write_gleason(tmp_path / "Gleason2019")
    first, second = list(read_gleason2019(src))
    expected = np.repeat(np.array([label for _, label in VOTES]), 2)[None, :].repeat(6, 0)
    assert np.array_equal(first.region_map, expected)
    assert first.meta["pathologists"] == [1, 2, 3] and first.magnification == "40x" and first.split is None
    assert second.meta["pathologists"] == [2]
    assert np.array_equal(second.region_map, lut(fx["single"], G_TABLE))


def test_gleason2019_one_pathologist(tmp_path):
    src, fx = write_gleason(tmp_path / "G")
    (only,) = list(read_gleason2019(src, pathologist=3))
    assert np.array_equal(only.region_map, lut(fx["maps"][3], G_TABLE))
    notes = []
    assert len(list(read_gleason2019(src, pathologist="1", report=notes.append))) == 1
    assert notes == ["gleason2019: 1 cores have no map of pathologist 1; they are left out"]
    with pytest.raises(HistosynthError, match="--gleason-pathologist must be majority or one of 1..6"):
        read_gleason2019(src, pathologist="7")
    with pytest.raises(DataError, match=r"no Maps5_T folder for --gleason-pathologist 5"):
        read_gleason2019(src, pathologist=5)


def test_gleason2019_errors(tmp_path):
    src, fx = write_gleason(tmp_path / "G")
    bad = fx["maps"][2].copy()
    bad[0, 0] = 2
    path = src / "Maps2_T" / "slide001_core001_classimg_nonconvex.png"
    Image.fromarray(bad).save(path)
    with pytest.raises(DataError, match=r"Maps2_T/slide001_core001_classimg_nonconvex\.png: mask values \[2\]"):
        list(read_gleason2019(src))
    Image.fromarray(fx["maps"][2][:, :-1]).save(path)
    with pytest.raises(DataError, match=r"Maps2_T/slide001_core001_classimg_nonconvex\.png: map is 6x15 px, its core "
                                        r"image 6x16 px"):
        list(read_gleason2019(src))
    Image.fromarray(fx["maps"][2]).save(path)
    (src / "Maps2_T" / "slide001_core002_classimg_nonconvex.png").unlink()
    with pytest.raises(DataError, match=r"slide001_core002\.jpg: no map of any pathologist"):
        list(read_gleason2019(src))


# ---------------------------------------------------------------------------------------------------- PANDA
tifffile = pytest.importorskip("tifffile")
pytest.importorskip("tiffslide")

PW, PH = 512, 384  # level 0 at 20x (0.5 µm/px); level 1 = level 0 / 4, as PANDA's pyramids
COLOURS = np.array([[230, 170, 200], [200, 90, 150], [150, 60, 170], [120, 40, 130], [90, 30, 110], [60, 20, 90]],
                   np.uint8)  # saturated H&E-like colour per native value 0..5
GLASS = np.array([245, 245, 245], np.uint8)


def panda_native(seed: int) -> np.ndarray:
    """Native labels on an 8x8 px grid (blocks keep colours apart at lower levels); the right quarter is glass (0)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 6, (PH // 8, PW // 8)).astype(np.uint8)
    native = small.repeat(8, 0).repeat(8, 1)
    native[:, 3 * PW // 4 :] = 0
    return native


def panda_image(native: np.ndarray) -> np.ndarray:
    image = COLOURS[native].copy()
    image[:, 3 * PW // 4 :] = GLASS
    return image


def write_pyramid(path: Path, level0: np.ndarray, levels: list[np.ndarray]) -> None:
    with tifffile.TiffWriter(path) as tw:
        tw.write(level0, photometric="rgb", tile=(64, 64), subifds=len(levels), resolution=(2e4, 2e4),
                 resolutionunit="CENTIMETER")
        for lev in levels:
            tw.write(lev, photometric="rgb", tile=(64, 64), subfiletype=1)


def box4(a: np.ndarray) -> np.ndarray:
    h, w = a.shape[0] // 4, a.shape[1] // 4
    return a.reshape(h, 4, w, 4, 3).astype(float).mean(axis=(1, 3)).round().astype(np.uint8)


def write_panda(root: Path, slides: dict[str, tuple[str, np.ndarray, str, str]], masks=True) -> Path:
    """slides: {image_id: (provider, native, isup, gleason)}."""
    (root / "train_images").mkdir(parents=True)
    (root / "train_label_masks").mkdir()
    for image_id, (provider, native, isup, score) in slides.items():
        image = panda_image(native)
        write_pyramid(root / "train_images" / f"{image_id}.tiff", image, [box4(image)])
        if masks:
            mask = np.zeros((PH, PW, 3), np.uint8)
            mask[..., 0] = native
            write_pyramid(root / "train_label_masks" / f"{image_id}_mask.tiff", mask, [mask[2::4, 2::4]])
    with (root / "train.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image_id", "data_provider", "isup_grade", "gleason_score"])
        for image_id, (provider, _, isup, score) in slides.items():
            w.writerow([image_id, provider, isup, score])
    return root


RADBOUD = {0: 0, 1: 0, 2: 0, 3: 1, 4: 2, 5: 3}


@pytest.fixture
def panda(tmp_path):
    natives = {"r1": panda_native(1), "k1": np.minimum(panda_native(2), 2), "k2": np.minimum(panda_native(3), 1)}
    slides = {"r1": ("radboud", natives["r1"], "3", "4+3"), "k1": ("karolinska", natives["k1"], "1", "3+3"),
              "k2": ("karolinska", natives["k2"], "0", "negative")}
    return write_panda(tmp_path / "PANDA", slides), natives


def assemble(records, slide: str, shape: tuple[int, int], scale: int):
    """The blocks of one slide put back on a canvas at the target magnification (-1 where no block was kept)."""
    region = np.full(shape, -1, np.int64)
    image = np.zeros(shape + (3,), np.int64)
    for r in records:
        if r.meta["slide"] != slide:
            continue
        y, x = r.meta["y"] // scale, r.meta["x"] // scale
        h, w = r.region_map.shape
        region[y : y + h, x : x + w] = r.region_map
        image[y : y + h, x : x + w] = r.image
    return region, image


def test_panda_radboud_at_level_zero_and_provider_maps(panda):
    src, natives = panda
    records = list(read_panda(src, magnification="20x", providers="radboud", block=128))
    assert {r.meta["slide"] for r in records} == {"r1"}
    assert all(r.magnification == "20x" and r.meta["source_magnification"] == "20x" and r.meta["level"] == 0
               for r in records)
    region, image = assemble(records, "r1", (PH, PW), 1)
    kept = region >= 0
    # tissue blocks are all there; blocks wholly on the glass quarter are skipped (tissue detector)
    assert kept[:, : 3 * PW // 4].all() and not kept[:, 3 * PW // 4 :].any()  # the glass quarter: 3 whole blocks
    assert np.array_equal(region[kept], lut(natives["r1"], RADBOUD)[kept])
    assert np.array_equal(image[kept], panda_image(natives["r1"])[kept])


def test_panda_alignment_at_lower_magnifications(panda):
    src, natives = panda
    level1_native = natives["r1"][2::4, 2::4]
    level1_image = box4(panda_image(natives["r1"]))
    # 5x: PANDA's level 1 (downsample 4) is at the target: image and mask are its own pixels
    five = list(read_panda(src, magnification="5x", providers=["radboud"], block=32))
    assert all(r.meta["level"] == 1 and r.meta["level_downsample"] == 4.0 for r in five)
    region, image = assemble(five, "r1", (PH // 4, PW // 4), 4)
    kept = region >= 0
    assert kept[:, : PW // 4 * 3 // 4].all()
    assert np.array_equal(region[kept], lut(level1_native, RADBOUD)[kept])
    assert np.array_equal(image[kept], level1_image[kept])
    # 10x: read from level 0 with a scale factor 2: image area-averaged, mask nearest at output pixel centres
    ten = list(read_panda(src, magnification="10x", providers=["radboud"], block=64))
    assert all(r.meta["level"] == 0 and r.meta["width"] == 128 for r in ten if r.region_map.shape[1] == 64)
    region, image = assemble(ten, "r1", (PH // 2, PW // 2), 2)
    kept = region >= 0
    native0, image0 = natives["r1"], panda_image(natives["r1"]).astype(float)
    assert np.array_equal(region[kept], lut(native0[1::2, 1::2], RADBOUD)[kept])
    box2 = image0.reshape(PH // 2, 2, PW // 2, 2, 3).mean(axis=(1, 3))
    assert np.abs(image[kept] - box2[kept]).max() <= 1
    # alignment seen in the pixels: each label's pixels show that label's colour (8 px label cells, 2 px at 10x)
    for k, values in ((1, [3]), (2, [4]), (3, [5])):
        assert (image[region == k] == COLOURS[values[0]]).all()


def test_panda_karolinska_refused_by_default_then_mapped(panda):
    src, natives = panda
    with pytest.raises(DataError, match=r"train\.csv: 1 Karolinska slides have cancer \(isup_grade > 0, e\.g\. k1\).*"
                                        r"--label-map karolinska:2=GG3.*--panda-providers radboud"):
        read_panda(src, block=256)
    records = list(read_panda(src, block=256, label_map=parse_label_map("karolinska:2=GG3")))
    assert [r.meta["slide"] for r in records][0] == "k1" and {r.meta["slide"] for r in records} == {"k1", "k2", "r1"}
    k1, _ = assemble(records, "k1", (PH, PW), 1)
    r1, _ = assemble(records, "r1", (PH, PW), 1)
    kept = k1 >= 0
    assert np.array_equal(k1[kept], lut(natives["k1"], {0: 0, 1: 0, 2: 1})[kept])  # Karolinska's 2 → GG3
    assert np.array_equal(r1[r1 >= 0], lut(natives["r1"], RADBOUD)[r1 >= 0])  # Radboud's 2 stays non-cancer
    only = list(read_panda(src, block=256, providers="karolinska,radboud", label_map=parse_label_map("radboud:2=GG4,"
                                                                                                     "karolinska:2=GG5")))
    r1, _ = assemble(only, "r1", (PH, PW), 1)
    assert np.array_equal(r1[r1 >= 0], lut(natives["r1"], {**RADBOUD, 2: 2})[r1 >= 0])


def test_panda_errors(tmp_path):
    native = panda_native(4)
    src = write_panda(tmp_path / "P", {"r1": ("radboud", native, "2", "3+4"), "r2": ("radboud", native, "0", "0+0")})
    (src / "train_label_masks" / "r2_mask.tiff").unlink()
    notes = []
    assert {r.meta["slide"] for r in read_panda(src, block=256, report=notes.append)} == {"r1"}
    assert notes and "1 slides have no label mask" in notes[0] and "r2" in notes[0]
    bad = native.copy()
    bad[0, 0] = 7
    mask = np.zeros((PH, PW, 3), np.uint8)
    mask[..., 0] = bad
    write_pyramid(src / "train_label_masks" / "r1_mask.tiff", mask, [mask[2::4, 2::4]])
    with pytest.raises(DataError, match=r"r1_mask\.tiff: mask values \[7\] \(1 px\) are not placed"):
        list(read_panda(src, block=256))
    small = mask[:, :-64]
    write_pyramid(src / "train_label_masks" / "r1_mask.tiff", small, [small[2::4, 2::4]])
    with pytest.raises(DataError, match=r"r1_mask\.tiff: mask is 448x384 px at level 0, its slide 512x384 px"):
        list(read_panda(src, block=256))
    write_pyramid(src / "train_label_masks" / "r1_mask.tiff", mask, [mask[2::4, 2::4]])
    with pytest.raises(DataError, match=r"target magnification 40x is above the slide's 20x"):
        list(read_panda(src, magnification="40x"))
    with pytest.raises(HistosynthError, match=r"--panda-providers: aperio"):
        read_panda(src, providers="aperio")
    (src / "train.csv").write_text("image_id,data_provider\nr2,radboud\n")
    with pytest.raises(DataError, match=r"r1\.tiff: no row for this slide in .*train\.csv"):
        read_panda(src)


# ------------------------------------------------------------------------------------------------------ CLI
def test_cli_prepare_regions_sicapv2(sicap, tmp_path):
    from click.testing import CliRunner

    from histosynth.cli import main
    from histosynth.data.store import PatchStore

    src, masks = sicap
    out = tmp_path / "store"
    r = CliRunner().invoke(main, ["prepare", "regions", str(src), "--format", "sicapv2", "--magnification", "10x",
                                  "--patch", "16", "--overlap", "0", "--out", str(out)])
    assert r.exit_code == 0, r.output
    store = PatchStore(out)
    assert store.has_regions and store.class_names == ("non-cancer", "GG3", "GG4", "GG5")
    # the partition's split, no hold-out block: 40x48 px → 3x3 crops of 16 px (the last flush with the border)
    assert len(store.indices("test")) == 9 and len(store.indices("train")) == 2 * 9
    for i in range(len(store)):
        item = store[i]
        stem = Path(item["source"]).stem
        y, x = item["y"], item["x"]
        assert np.array_equal(item["region_map"], lut(masks[stem], SICAP_TABLE)[y : y + 16, x : x + 16])
    bad = CliRunner().invoke(main, ["prepare", "regions", str(src), "--format", "sicapv2", "--gleason-pathologist", "2",
                                    "--out", str(tmp_path / "s2")])
    assert bad.exit_code == 2 and "--gleason-pathologist: only with --format gleason2019" in bad.output
    bad = CliRunner().invoke(main, ["prepare", "regions", str(src), "--format", "sicapv2", "--label-map", "3",
                                    "--out", str(tmp_path / "s3")])
    assert bad.exit_code == 2 and "--label-map: '3' is not VALUE=LABEL" in bad.output
