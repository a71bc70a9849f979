"""Patch extraction (NASDM hold-out), stain normalization and the streaming patch store."""

from __future__ import annotations

import json
import pickle
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histosynth.data.patches import extract_patches, holdout_block, relabel_contiguous, tile_origins
from histosynth.data.record import NucleiRecord
from histosynth.data.stain import MacenkoNormalizer, VahadaneNormalizer, make_stain_normalizer
from histosynth.data.prepare_labelled import prepare_nuclei
from histosynth.data.store import PatchStore, shard_file
from histosynth.data.store_writer import PatchStoreWriter, patch_bytes
from histosynth.errors import DataError, OutputExistsError

SHARED = Path(__file__).resolve().parents[2] / "shared"
HGSC = SHARED / "data" / "hgsc"
CLASSES = ("a", "b", "c")


def synthetic_record(h=300, w=260, seed=0, magnification="20x", split=None, n_nuclei=120) -> NucleiRecord:
    """Random image with rectangular 'nuclei'; a few carry a minority of wrongly typed pixels."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    inst = np.zeros((h, w), np.int32)
    typ = np.zeros((h, w), np.int32)
    for k in range(1, n_nuclei + 1):
        y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
        sy, sx = rng.integers(2, 12, size=2)
        inst[y : y + sy, x : x + sx] = k
        typ[y : y + sy, x : x + sx] = rng.integers(1, len(CLASSES) + 1)
        if k % 7 == 0:  # minority pixels of another type: the count must follow the majority
            typ[y, x] = (typ[y, x] % len(CLASSES)) + 1
    typ[inst == 0] = 0
    return NucleiRecord(image, inst, typ, CLASSES, f"synthetic{seed}", split=split, magnification=magnification)


def majority_counts(inst_map, type_map, class_names) -> dict[str, int]:
    """Independent (slow, obvious) instance-majority count."""
    counts = dict.fromkeys(class_names, 0)
    for i in np.unique(inst_map):
        if i == 0:
            continue
        types = type_map[inst_map == i]
        types = types[types > 0]
        if types.size:
            counts[class_names[np.bincount(types).argmax() - 1]] += 1
    return counts


# --- hold-out and tiling -------------------------------------------------------------------------


@pytest.mark.parametrize("h,w", [(1055, 934), (256, 256), (120, 3000), (3000, 90), (37, 41)])
def test_holdout_block_area_and_bounds(h, w):
    rng = np.random.default_rng(1)
    for _ in range(20):
        y0, x0, bh, bw = holdout_block(h, w, 0.075, rng)
        assert 0 <= y0 and y0 + bh <= h and 0 <= x0 and x0 + bw <= w
        # 7.5% of the area, up to rounding one side by half a pixel
        assert abs(bh * bw - 0.075 * h * w) <= max(bh, bw) / 2 + 1


def test_holdout_block_is_reproducible_and_random():
    blocks = [holdout_block(1000, 900, 0.075, np.random.default_rng(s)) for s in (3, 3, 4)]
    assert blocks[0] == blocks[1] != blocks[2]


def test_tile_origins_cover_with_half_stride():
    assert tile_origins(300, 64, 32) == [0, 32, 64, 96, 128, 160, 192, 224, 236]
    for length, crop in [(300, 64), (256, 128), (1055, 256), (64, 64)]:
        stride = crop // 2
        origins = tile_origins(length, crop, stride)
        covered = np.zeros(length, bool)
        for o in origins:
            covered[o : o + crop] = True
        assert covered.all()
        assert origins[-1] == length - crop
        assert all(b - a == stride for a, b in zip(origins[:-2], origins[1:-1]))
        assert 0 < origins[-1] - origins[-2] <= stride if len(origins) > 1 else True
    assert tile_origins(63, 64, 32) == []


def test_holdout_train_patches_never_touch_the_test_block():
    record = synthetic_record(700, 600, seed=5)
    patches = list(extract_patches(record, 64, 0.5, "20x", 0.075, np.random.default_rng(11)))
    y0, x0, bh, bw = holdout_block(700, 600, 0.075, np.random.default_rng(11))  # same draw
    block = np.zeros((700, 600), bool)
    block[y0 : y0 + bh, x0 : x0 + bw] = True
    train = [p for p in patches if p.split == "train"]
    test = [p for p in patches if p.split == "test"]
    assert train and test
    for p in train:
        assert not block[p.y : p.y + p.crop, p.x : p.x + p.crop].any()
    for p in test:
        assert block[p.y : p.y + p.crop, p.x : p.x + p.crop].all()
    # test block used exhaustively, tiled with the same stride inside the block
    covered = np.zeros_like(block)
    for p in test:
        covered[p.y : p.y + p.crop, p.x : p.x + p.crop] = True
    assert (covered == block).all()
    assert len(test) == len(tile_origins(bh, 64, 32)) * len(tile_origins(bw, 64, 32))
    # every grid tile clear of the block is a train patch; stride is 50% of the crop
    grid = {(y, x) for y in tile_origins(700, 64, 32) for x in tile_origins(600, 64, 32)}
    clear = {(y, x) for (y, x) in grid if not block[y : y + 64, x : x + 64].any()}
    assert {(p.y, p.x) for p in train} == clear
    # same magnification: pixels are the region's own
    p = train[0]
    assert np.array_equal(p.image, record.image[p.y : p.y + 64, p.x : p.x + 64])


def test_10x_is_a_2x_crop_resized_with_nearest_labels():
    record = synthetic_record(260, 200, seed=2)
    patches = list(extract_patches(record, 32, 0.5, "10x", 0.0, None))
    assert patches and all(p.crop == 64 for p in patches)
    assert {p.y for p in patches} == set(tile_origins(260, 64, 32))
    for p in patches:
        assert p.image.shape == (32, 32, 3) and p.image.dtype == np.uint8
        assert p.inst_map.shape == p.type_map.shape == (32, 32) and p.inst_map.dtype == np.int32
        window = (slice(p.y, p.y + 64), slice(p.x, p.x + 64))
        src_inst, src_type = record.inst_map[window], record.type_map[window]
        assert set(np.unique(p.type_map)) <= set(np.unique(src_type))
        # nearest: each patch pixel carries the label of one source pixel of its 2x2 block
        sampled = src_inst[1::2, 1::2]
        assert np.array_equal(relabel_contiguous(sampled), p.inst_map)
        assert np.array_equal(src_type[1::2, 1::2], p.type_map)
        ids = np.unique(p.inst_map)
        assert np.array_equal(ids, np.arange(len(ids)))  # contiguous 0..n
        # area resampling: a 2x2 box mean of the crop
        box = record.image[window].reshape(32, 2, 32, 2, 3).astype(float).mean(axis=(1, 3))
        assert np.abs(p.image - box).max() <= 1


def test_dataset_split_is_respected_and_no_block_drawn():
    record = synthetic_record(200, 200, seed=3, split="test")
    rng = np.random.default_rng(0)
    patches = list(extract_patches(record, 64, 0.5, "20x", 0.075, rng))
    assert {p.split for p in patches} == {"test"}
    assert len(patches) == len(tile_origins(200, 64, 32)) ** 2
    assert rng.integers(1 << 30) == np.random.default_rng(0).integers(1 << 30)  # rng untouched


def test_unknown_or_upsampling_magnification_is_an_error():
    record = synthetic_record(100, 100, magnification=None)
    with pytest.raises(DataError, match="source magnification"):
        extract_patches(record, 32, 0.5, "20x", 0.075, np.random.default_rng(0))
    with pytest.raises(DataError, match="higher"):
        extract_patches(synthetic_record(100, 100), 32, 0.5, "40x", 0.075, np.random.default_rng(0))


# --- store ---------------------------------------------------------------------------------------


def write_store(path, patches, shard_size=7, **kw):
    size = patches[0].image.shape[0]
    with PatchStoreWriter(path, CLASSES, size, "20x", {"seed": 0}, shard_size=shard_size, **kw) as w:
        for p in patches:
            w.add(p)
    return PatchStore(path)


def test_store_round_trip(tmp_path):
    patches = list(extract_patches(synthetic_record(300, 260, seed=7), 32, 0.5, "20x", 0.075, np.random.default_rng(0)))
    store = write_store(tmp_path / "store", patches)
    assert len(store) == len(patches) and store.patch_size == 32 and store.class_names == CLASSES
    assert store.magnification == "20x" and store.meta == {"seed": 0}
    assert len(list((tmp_path / "store" / "shards").glob("*_image.npy"))) == -(-len(patches) // 7)
    totals: dict = {}
    for i, p in enumerate(patches):
        item = store[i]
        assert np.array_equal(item["image"], p.image) and item["image"].dtype == np.uint8
        assert np.array_equal(item["inst_map"], p.inst_map) and item["inst_map"].dtype == np.int32
        assert np.array_equal(item["type_map"], p.type_map) and item["type_map"].dtype == np.int32
        assert (item["index"], item["source"], item["y"], item["x"], item["crop"], item["split"]) == (
            i, p.source, p.y, p.x, p.crop, p.split,
        )
        expected = majority_counts(p.inst_map, p.type_map, CLASSES)
        assert item["counts"] == expected
        split = totals.setdefault(p.split, {"patches": 0, "nuclei": dict.fromkeys(CLASSES, 0)})
        split["patches"] += 1
        for k, v in expected.items():
            split["nuclei"][k] += v
    info = json.loads((tmp_path / "store" / "store.json").read_text())
    assert info["counts"] == totals
    assert store.indices("test") == [i for i, p in enumerate(patches) if p.split == "test"]
    assert store.indices() == list(range(len(patches)))
    with pytest.raises(IndexError):
        store[len(patches)]
    clone = pickle.loads(pickle.dumps(store))  # DataLoader workers: no memory maps in the pickle
    assert len(pickle.dumps(store)) < 100_000 and np.array_equal(clone[3]["image"], patches[3].image)


def test_failed_writer_leaves_no_store(tmp_path):
    patches = list(extract_patches(synthetic_record(200, 200), 32, 0.5, "20x", 0.0, None))
    out = tmp_path / "store"
    with pytest.raises(RuntimeError, match="boom"):
        with PatchStoreWriter(out, CLASSES, 32, "20x", shard_size=4) as w:
            for p in patches[:10]:  # two shards already on disk
                w.add(p)
            raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # partial directory cleaned up

    # with overwrite, the old store survives a failed rebuild and is replaced by a good one
    old = write_store(out, patches[:5])
    with pytest.raises(RuntimeError):
        with PatchStoreWriter(out, CLASSES, 32, "20x", overwrite=True) as w:
            w.add(patches[0])
            raise RuntimeError("boom")
    assert len(PatchStore(out)) == len(old) == 5
    assert len(write_store(out, patches[:9], overwrite=True)) == 9
    assert sorted(x.name for x in tmp_path.iterdir()) == ["store"]


def test_existing_output_needs_overwrite(tmp_path):
    out = tmp_path / "store"
    out.mkdir()
    with pytest.raises(OutputExistsError, match="store"):
        PatchStoreWriter(out, CLASSES, 32, "20x")
    with pytest.raises(OutputExistsError):
        prepare_nuclei([synthetic_record()], out, patch=32, progress=False)


def test_incomplete_or_unknown_store_is_a_data_error(tmp_path):
    partial = tmp_path / ".store.partial-123"
    (partial / "shards").mkdir(parents=True)
    with pytest.raises(DataError, match="store.json") as err:
        PatchStore(partial)
    assert err.value.path == str(partial)
    patches = list(extract_patches(synthetic_record(100, 100), 32, 0.5, "20x", 0.0, None))
    out = tmp_path / "store"
    write_store(out, patches)
    info = json.loads((out / "store.json").read_text())
    info["version"] = 99
    (out / "store.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="version"):
        PatchStore(out)


def test_writer_streams_one_shard_at_a_time(tmp_path):
    shard_size = 128
    one_shard = shard_size * patch_bytes(16)
    store = prepare_nuclei(
        (synthetic_record(150, 150, seed=s, n_nuclei=40) for s in range(12)),
        tmp_path / "s", patch=16, progress=False, shard_size=shard_size,
    )
    assert len(store) > 3000
    n_shards = -(-len(store) // shard_size)
    for s in range(n_shards):
        assert np.load(shard_file(store.path, s, "image"), mmap_mode="r").shape[0] <= shard_size
        assert shard_file(store.path, s, "inst").stat().st_size <= one_shard
    assert not shard_file(store.path, n_shards, "image").exists()

    # memory while writing: about one shard, not all patches (records and patches are streamed)
    def stream_into(out):
        seen = []
        with PatchStoreWriter(out, CLASSES, 16, "20x", shard_size=shard_size) as w:
            for s in range(12):
                record = synthetic_record(150, 150, seed=s, n_nuclei=40)
                for p in extract_patches(record, 16, 0.5, "20x", 0.075, np.random.default_rng(s)):
                    w.add(p)
                    seen.append(w.buffered_bytes)
        return seen

    stream_into(tmp_path / "warmup")  # imports and caches out of the measurement
    tracemalloc.start()
    try:
        seen = stream_into(tmp_path / "w")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = len(seen) * patch_bytes(16)
    assert max(seen) < one_shard  # flushed as soon as a shard is full
    assert peak < total / 4, (peak, total)


def test_prepare_is_reproducible_and_empty_input_is_an_error(tmp_path):
    recs = lambda: [synthetic_record(200, 180, seed=s, magnification=None) for s in range(3)]  # noqa: E731
    a = prepare_nuclei(recs(), tmp_path / "a", patch=32, source_magnification="20x", seed=4, progress=False)
    b = prepare_nuclei(recs(), tmp_path / "b", patch=32, source_magnification="20x", seed=4, progress=False)
    assert a.records == b.records and a.indices("test")
    assert a.meta["seed"] == 4 and a.meta["args"]["source_magnification"] == "20x"
    tiny = [synthetic_record(20, 20, seed=1, n_nuclei=2)]
    with pytest.raises(DataError, match="synthetic1"):
        prepare_nuclei(tiny, tmp_path / "c", patch=32, progress=False)
    assert not (tmp_path / "c").exists()


# --- real data: stain normalization and the HGSC region ------------------------------------------

needs_shared = pytest.mark.skipif(not HGSC.is_dir(), reason="shared data not available")


def _recolour(rgb: np.ndarray) -> np.ndarray:
    """A different 'lab': stronger, bluer hematoxylin and paler eosin, applied in optical density."""
    od = -np.log(np.maximum(rgb.astype(float), 1) / 255)
    mix = np.array([[1.25, 0.10, 0.0], [0.05, 0.75, 0.10], [0.0, 0.10, 1.30]])
    return np.clip(255 * np.exp(-od @ mix), 0, 255).astype(np.uint8)


@needs_shared
@pytest.mark.parametrize("method", [MacenkoNormalizer, VahadaneNormalizer])
def test_stain_normalization_restores_colour(method):
    crop = np.asarray(Image.open(HGSC / "hgsc_nest.jpg").convert("RGB"))[300:812, 300:812]
    recoloured = _recolour(crop)
    normalizer = method().fit(crop)
    out = normalizer.transform(recoloured)
    assert out.shape == crop.shape and out.dtype == np.uint8
    mean = lambda im: im.reshape(-1, 3).mean(axis=0)  # noqa: E731
    before = np.linalg.norm(mean(recoloured) - mean(crop))
    after = np.linalg.norm(mean(out) - mean(crop))
    assert before > 10 and after < 0.35 * before
    stains = normalizer.stain_matrix_
    assert stains.shape == (3, 2)
    assert np.allclose(np.linalg.norm(stains, axis=0), 1)
    if method is VahadaneNormalizer:
        assert (stains >= 0).all()


def test_make_stain_normalizer(tmp_path):
    assert make_stain_normalizer("none", None) is None
    white = tmp_path / "white.png"
    Image.fromarray(np.full((64, 64, 3), 250, np.uint8)).save(white)
    with pytest.raises(DataError, match="tissue") as err:
        make_stain_normalizer("vahadane", white)
    assert err.value.path == str(white)
    with pytest.raises(DataError, match="not found"):
        make_stain_normalizer("macenko", tmp_path / "missing.png")
    with pytest.raises(Exception, match="unknown stain"):
        make_stain_normalizer("reinhard", white)


@needs_shared
def test_prepare_nuclei_on_real_hgsc_region(tmp_path):
    image = np.asarray(Image.open(HGSC / "hgsc_nest.jpg").convert("RGB"))
    inst = np.asarray(Image.open(HGSC / "hgsc_nest_inst.png")).astype(np.int32)
    typ = np.asarray(Image.open(HGSC / "hgsc_nest_type.png")).astype(np.int32)
    classes = ("connective", "inflammatory", "neoplastic")
    record = NucleiRecord(image, inst, typ, classes, str(HGSC / "hgsc_nest.jpg"))  # magnification unknown
    normalizer = make_stain_normalizer("vahadane", HGSC / "hgsc_nest.jpg")
    store = prepare_nuclei(
        [record], tmp_path / "hgsc", patch=64, magnification="20x", source_magnification="40x",
        stain_normalizer=normalizer, seed=0, progress=False, command="pytest",
    )
    train, test = store.indices("train"), store.indices("test")
    assert train and test and len(train) + len(test) == len(store)
    assert {r["crop"] for r in store.records} == {128} and store.patch_size == 64
    info = json.loads((store.path / "store.json").read_text())
    assert info["meta"]["stain_normalization"] == "vahadane" and info["meta"]["command"] == "pytest"
    assert info["magnification"] == "20x" and info["meta"]["holdout"] == 0.075
    for split, idx in (("train", train), ("test", test)):
        assert info["counts"][split]["patches"] == len(idx)
        summed = {c: sum(store.records[i]["counts"][c] for i in idx) for c in classes}
        assert info["counts"][split]["nuclei"] == summed
    assert all(v > 0 for v in info["counts"]["train"]["nuclei"].values())
    item = store[test[0]]
    assert item["image"].shape == (64, 64, 3) and item["split"] == "test"
    assert item["counts"] == majority_counts(item["inst_map"], item["type_map"], classes)
