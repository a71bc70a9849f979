"""ZoomLDM's slide embeddings (`histosynth embed`): a patch's grid is the embeddings of exactly the base tiles under it,
a memory-mapped float16 view; a killed run resumes without recomputing finished tiles and ends bit for bit equal to a
clean run; bad input is one clear error naming the file."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from click.testing import CliRunner
from torch import nn

from histosynth.cli import main
from histosynth.conditions.embed_store import EmbeddingsExistError, embed_store
from histosynth.conditions.slide_embeddings import SlideEmbeddings
from histosynth.data.patches import Patch
from histosynth.data.store import PatchStore
from histosynth.data.store_writer import PatchStoreWriter
from histosynth.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")

PX = 32  # base tile size of the test stores (the store's patch size)


def colour(slide: int, ty: int, tx: int) -> tuple[int, int, int]:
    """A distinct colour per (slide, tile): a window shifted by one tile would see other colours."""
    return (20 + 29 * ty + 3 * slide) % 256, (40 + 23 * tx + 50 * slide) % 256, (7 * ty + 13 * tx + 90) % 256


def write_slide(path: Path, slide: int, rows: int, cols: int, scale: int = 1, texture: bool = False) -> np.ndarray:
    """A tiled, deflate-compressed RGB TIFF whose base tile (ty, tx) is uniformly colour(slide, ty, tx); ``scale`` level-0
    pixels per base pixel (1: a 20x slide, 2: 40x); a remainder strip narrower than one tile on the right and bottom."""
    t = PX * scale
    image = np.full((rows * t + t // 2, cols * t + t // 2, 3), 255, np.uint8)
    for ty in range(rows):
        for tx in range(cols):
            image[ty * t:(ty + 1) * t, tx * t:(tx + 1) * t] = colour(slide, ty, tx)
    if texture:
        image = (image.astype(np.int16) + np.random.default_rng(slide).integers(-60, 60, image.shape)).clip(0, 255)
        image = image.astype(np.uint8)
    tifffile.imwrite(path, image, tile=(16, 16), compression="zlib", photometric="rgb")
    return image


def write_store(path: Path, slides: list[dict], patches: list[tuple[int, int, int, int]], zoom_fields=True) -> Path:
    """A multi-magnification slide store built without `prepare`: ``patches`` are (slide, zoom, tile_y, tile_x)."""
    meta = {"kind": "slides", "base_magnification": "20x", "slides": slides}
    with PatchStoreWriter(path, (), PX, "20x", meta, labels=False) as writer:
        for s, k, ty, tx in patches:
            scale = round(slides[s]["source_magnification"] / 20)
            extra = {"path": slides[s]["path"], "slide_index": s}
            if zoom_fields:
                extra.update(zoom=k, tile_y=ty, tile_x=tx)
            writer.add(Patch(np.zeros((PX, PX, 3), np.uint8), None, None, "train", ty * PX * scale, tx * PX * scale,
                             (PX << k) * scale, slides[s]["path"], extra))
    return path


def slide_entry(path: Path, rows: int, cols: int, source: float = 20.0) -> dict:
    return {"path": str(path), "source_magnification": source, "tile_rows": rows, "tile_cols": cols}


class MeanColour(nn.Module):
    """A tiny deterministic tile encoder (C = 5): mean colour, the product of the red and green means, the maximum."""

    encoder_id = "test:mean-colour-v1"
    num_features = 5

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # float (B, 3, H, W) in [0, 1]
        m = x.mean((2, 3))
        return torch.cat([m, m[:, :1] * m[:, 1:2], x.amax((1, 2, 3))[:, None]], 1)


class Wider(MeanColour):
    encoder_id = "test:wider-v1"
    num_features = 6

    def forward(self, x):
        return torch.cat([super().forward(x), x.amin((1, 2, 3))[:, None]], 1)


class FailsAfter(MeanColour):
    """MeanColour that raises on its n-th call (a crash in the middle of a run)."""

    def __init__(self, calls: int):
        super().__init__()
        self.left = calls

    def forward(self, x):
        self.left -= 1
        if self.left < 0:
            raise RuntimeError("crash")
        return super().forward(x)


def expected_features(encoder: nn.Module, rgb: tuple[int, int, int]) -> np.ndarray:
    """The encoder on an independently built uniform tile, as float16."""
    tile = torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, PX, PX) / 255.0
    with torch.inference_mode():
        return encoder(tile)[0].numpy().astype(np.float16)


@pytest.fixture()
def two_slides(tmp_path):
    """Slide 0: 20x, 6 x 8 base tiles; slide 1: 40x (base tiles are resized 64 px crops), 5 x 4 base tiles."""
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    write_slide(a, 0, 6, 8)
    write_slide(b, 1, 5, 4, scale=2)
    slides = [slide_entry(a, 6, 8), slide_entry(b, 5, 4, source=40.0)]
    patches = [(0, 0, 1, 2), (0, 1, 2, 4), (0, 2, 2, 0), (0, 1, 0, 6), (1, 1, 0, 0), (1, 0, 4, 3), (1, 2, 1, 0)]
    return write_store(tmp_path / "store", slides, patches)


# ------------------------------------------------------------------------------------------------ correctness
def test_patch_grid_is_the_embeddings_of_exactly_the_base_tiles_under_it(two_slides):
    enc = MeanColour()
    emb = embed_store(two_slides, enc, batch_size=3, progress=False)
    store = PatchStore(two_slides)
    assert emb.name == "test-mean-colour-v1" and emb.dim == 5 and emb.encoder == "test:mean-colour-v1"
    info = json.loads((emb.path / "embeddings.json").read_text())
    assert info["complete"] and all(s["complete"] for s in info["slides"])
    assert info["tile_px"] == PX and info["base_magnification"] == "20x" and info["dtype"] == "float16"
    assert not list(emb.path.glob("*.progress.json"))

    needed = [np.zeros((6, 8), bool), np.zeros((5, 4), bool)]
    for i, row in enumerate(store.records):
        s, k, ty, tx = row["slide_index"], row["zoom"], row["tile_y"], row["tile_x"]
        n = 1 << k
        grid = emb.grid(row)
        assert grid.shape == (n, n, 5) and grid.dtype == np.float16
        assert np.shares_memory(grid, emb.slide_map(s)), "a view of the memory map, not a copy"
        assert np.array_equal(emb.grid_of(store, i), grid)
        want = np.stack([np.stack([expected_features(enc, colour(s, ty + dy, tx + dx)) for dx in range(n)])
                         for dy in range(n)])
        np.testing.assert_array_equal(grid, want)
        analytic = np.array([[[*(c / 255 for c in colour(s, ty + dy, tx + dx)),
                               colour(s, ty + dy, tx + dx)[0] * colour(s, ty + dy, tx + dx)[1] / 255**2,
                               max(colour(s, ty + dy, tx + dx)) / 255] for dx in range(n)] for dy in range(n)])
        np.testing.assert_allclose(grid.astype(np.float32), analytic, atol=1e-3)
        needed[s][ty:ty + n, tx:tx + n] = True
    for s, mask in enumerate(needed):  # tiles under no patch stay zero
        whole = np.asarray(emb.slide_map(s))
        assert not whole[~mask].any() and (whole[mask][:, 3:] != 0).all()
        assert info["slides"][s]["tiles_needed"] == mask.sum()
        file = emb.path / f"slide-{s:05d}.npy"
        assert file.stat().st_size <= 2 * 5 * mask.size + 256
    assert SlideEmbeddings.open(two_slides).path == emb.path  # the only map: no name needed


# ------------------------------------------------------------------------------------------------ resume after a kill
ENCODER_MODULE = '''
import time, torch
from torch import nn

class Counting(nn.Module):
    """Per-tile deterministic features; logs each call's batch size, sleeps to be killable mid-run."""
    encoder_id = "test:counting-v1"
    num_features = 4

    def __init__(self, log, sleep=0.0):
        super().__init__()
        self.log, self.sleep = log, sleep

    def forward(self, x):
        with open(self.log, "a") as f:
            f.write(f"{x.shape[0]}\\n")
        time.sleep(self.sleep)
        m = x.mean((2, 3))
        return torch.cat([m, m[:, :1] - m[:, 2:3]], 1)
'''
RUNNER = '''
import sys
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from counting_encoder import Counting
from histosynth.conditions.embed_store import embed_store
embed_store(sys.argv[2], Counting(sys.argv[3], float(sys.argv[4])), name=sys.argv[5], batch_size=4, progress=False)
'''


def _logged(log: Path) -> list[int]:
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def test_killed_run_resumes_without_recomputing_and_equals_a_clean_run(tmp_path):
    a, b = tmp_path / "a.tif", tmp_path / "b.tif"
    write_slide(a, 0, 6, 8, texture=True)
    write_slide(b, 1, 4, 4, texture=True)
    store = write_store(tmp_path / "store", [slide_entry(a, 6, 8), slide_entry(b, 4, 4)],
                        [(0, 2, 0, 0), (0, 0, 5, 7), (0, 1, 4, 4), (1, 2, 0, 0)])  # 21 + 16 tiles, batches of 4
    (tmp_path / "counting_encoder.py").write_text(ENCODER_MODULE)
    (tmp_path / "runner.py").write_text(RUNNER)
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def run(log: Path, sleep: float, name: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(tmp_path / "runner.py"), str(tmp_path), str(store), str(log),
                                 str(sleep), name], env=env, stderr=subprocess.PIPE)

    killed_log = tmp_path / "killed.log"
    victim = run(killed_log, 0.25, "resumed")
    deadline = time.monotonic() + 60
    while len(_logged(killed_log)) < 8 and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # slide 0 needs 6 calls: kill in slide 1
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL, victim.stderr.read().decode()
    folder = store / "embeddings" / "resumed"

    with pytest.raises(DataError, match="incomplete.*histosynth embed") as err:
        SlideEmbeddings.open(store, "resumed")
    assert str(folder) in str(err.value)
    info = json.loads((folder / "embeddings.json").read_text())
    assert not info["complete"] and info["slides"][0]["complete"] and not info["slides"][1]["complete"]
    recorded = info["slides"][0]["tiles_needed"] + json.loads((folder / "slide-00001.progress.json").read_text())["done"]
    total = sum(s["tiles_needed"] for s in info["slides"])
    assert info["slides"][0]["tiles_needed"] < recorded < total
    assert 0 <= sum(_logged(killed_log)) - recorded <= 4  # at most the batch in flight was lost

    resumed_log, clean_log = tmp_path / "resumed.log", tmp_path / "clean.log"
    proc = run(resumed_log, 0.0, "resumed")
    assert proc.wait(timeout=120) == 0, proc.stderr.read().decode()
    spec = importlib.util.spec_from_file_location("counting_encoder", tmp_path / "counting_encoder.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    embed_store(store, module.Counting(str(clean_log)), name="clean", batch_size=4, progress=False)  # uninterrupted
    assert sum(_logged(resumed_log)) == total - recorded, "finished tiles were computed again"
    assert sum(_logged(clean_log)) == total
    resumed, clean = SlideEmbeddings.open(store, "resumed"), SlideEmbeddings.open(store, "clean")
    for s in range(2):
        assert np.asarray(resumed.slide_map(s)).tobytes() == np.asarray(clean.slide_map(s)).tobytes()
    assert np.asarray(clean.slide_map(1)).any()


# ------------------------------------------------------------------------------------------------ bad input
def test_encoder_mismatch_existing_maps_and_missing_embeddings_are_clear_errors(two_slides):
    with pytest.raises(DataError, match="no slide embeddings") as err:
        SlideEmbeddings.open(two_slides)
    assert str(two_slides / "embeddings") in str(err.value)

    with pytest.raises(RuntimeError, match="crash"):  # a crash after two batches leaves a partial map
        embed_store(two_slides, FailsAfter(2), name="m", batch_size=3, progress=False)
    info_file = two_slides / "embeddings" / "m" / "embeddings.json"
    with pytest.raises(DataError, match="incomplete") as err:
        SlideEmbeddings.open(two_slides, "m")
    assert str(two_slides / "embeddings" / "m") in str(err.value)
    with pytest.raises(DataError, match="C = 5.*C = 6") as err:  # resumed with an encoder of another width
        embed_store(two_slides, Wider(), name="m", progress=False)
    assert str(info_file) in str(err.value) and len(str(err.value).splitlines()) == 1

    class Other(MeanColour):
        encoder_id = "test:other-v1"

    with pytest.raises(DataError, match="computed with encoder test:mean-colour-v1"):
        embed_store(two_slides, Other(), name="m", progress=False)

    emb = embed_store(two_slides, MeanColour(), name="m", batch_size=3, progress=False)  # resumes and completes
    with pytest.raises(EmbeddingsExistError, match="--overwrite") as err:
        embed_store(two_slides, MeanColour(), name="m", progress=False)
    assert isinstance(err.value, DataError) and str(emb.path) in str(err.value)
    wide = embed_store(two_slides, Wider(), name="m", overwrite=True, progress=False)
    assert wide.dim == 6 and wide.grid(PatchStore(two_slides).records[0]).shape == (1, 1, 6)

    embed_store(two_slides, MeanColour(), name="second", progress=False)
    with pytest.raises(DataError, match="several slide embeddings"):
        SlideEmbeddings.open(two_slides)
    with pytest.raises(DataError, match="no slide embeddings named 'nope'") as err:
        SlideEmbeddings.open(two_slides, "nope")
    assert str(two_slides / "embeddings" / "nope") in str(err.value)


def test_not_a_zoom_store_and_a_corrupt_tile_are_errors_naming_the_file(tmp_path):
    path = tmp_path / "s.tif"
    write_slide(path, 0, 4, 4)
    plain = write_store(tmp_path / "plain", [slide_entry(path, 4, 4)], [(0, 0, 0, 0)], zoom_fields=False)
    with pytest.raises(DataError, match="not a multi-magnification slide store") as err:
        embed_store(plain, MeanColour(), progress=False)
    assert str(plain) in str(err.value)

    outside = write_store(tmp_path / "outside", [slide_entry(path, 4, 4)], [(0, 0, 0, 0), (0, 1, 3, 0)])
    with pytest.raises(DataError, match="patch 1: base tiles .3, 5. x .0, 2. .zoom 1. are outside") as err:
        embed_store(outside, MeanColour(), progress=False)
    assert "manifest.jsonl" in str(err.value)

    # damage the deflate stream of the TIFF tile inside base tile (row 2, col 3): 16 px TIFF tiles, 9 per TIFF row
    store = write_store(tmp_path / "store", [slide_entry(path, 4, 4)], [(0, 2, 0, 0)])
    with tifffile.TiffFile(path) as tif:
        page = tif.pages[0]
        index = (2 * 2) * 9 + 3 * 2
        offset, size = page.dataoffsets[index], page.databytecounts[index]
    data = bytearray(path.read_bytes())
    data[offset:offset + size] = b"\x17" * size
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"base tile \(row 2, col 3\)") as err:
        embed_store(store, MeanColour(), batch_size=2, progress=False)
    assert str(path) in str(err.value) and len(str(err.value).splitlines()) == 1
    progress = json.loads((store / "embeddings" / "test-mean-colour-v1" / "slide-00000.progress.json").read_text())
    assert progress["done"] == 10  # the batches before the bad tile are kept for the rerun

    result = CliRunner().invoke(main, ["embed", str(plain), "--no-progress"])
    assert result.exit_code == 2 and "not a multi-magnification slide store" in result.output


# ------------------------------------------------------------------------------------------------ the offline encoder
def test_offline_efficientnet_lite0_through_the_cli_matches_the_network(tmp_path):
    from histosynth.models.efficientnet_lite0 import build_effnet_lite0

    path = tmp_path / "s.tif"
    image = write_slide(path, 0, 2, 3, texture=True)
    store = write_store(tmp_path / "store", [slide_entry(path, 2, 3)], [(0, 0, 1, 2), (0, 1, 0, 0)])  # 5 tiles
    result = CliRunner().invoke(main, ["embed", str(store), "--batch-size", "2", "--no-progress"])
    assert result.exit_code == 0, result.output
    emb = SlideEmbeddings.open(store)
    assert emb.name == "efficientnet-lite0" and emb.dim == 1280 and emb.encoder.startswith("efficientnet-lite0@sha256:")

    net, _ = build_effnet_lite0()
    tiles = torch.from_numpy(np.stack([image[ty * PX:(ty + 1) * PX, tx * PX:(tx + 1) * PX]
                                       for ty, tx in ((1, 2), (0, 0), (1, 1))])).permute(0, 3, 1, 2)
    x = torch.nn.functional.interpolate(tiles.float() / 255, size=(224, 224), mode="bilinear", antialias=True)
    with torch.inference_mode():
        ref = net.forward_head(net.forward_features((x - 0.5) / 0.5), pre_logits=True).numpy()
    rows = PatchStore(store).records
    got = np.stack([emb.grid(rows[0])[0, 0], emb.grid(rows[1])[0, 0], emb.grid(rows[1])[1, 1]]).astype(np.float32)
    np.testing.assert_allclose(got, ref, rtol=2e-3, atol=2e-3)
    assert not np.asarray(emb.slide_map(0))[0, 2].any()  # under no patch


def test_local_timm_folder_encoder_is_named_by_path_and_weights(tmp_path):
    import timm
    from safetensors.torch import save_file

    from histosynth.errors import HistosynthError
    from histosynth.models.efficientnet_lite0 import file_sha256
    from histosynth.models.ssl_encoder import load_tile_encoder

    torch.manual_seed(0)
    net = timm.create_model("resnet10t", pretrained=False, num_classes=0).eval()
    folder = tmp_path / "my-encoder"
    folder.mkdir()
    save_file(net.state_dict(), folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"architecture": "resnet10t", "input_size": 64,
                                                    "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25],
                                                    "interpolation": "bilinear"}))
    enc = load_tile_encoder(str(folder))
    sha = file_sha256(folder / "model.safetensors")
    assert enc.encoder_id == f"{folder.resolve()}@sha256:{sha}" and enc.default_name == "my-encoder"
    assert enc.dim == net.num_features and enc.protocol["input_size"] == [64, 64]
    tiles = np.random.default_rng(0).integers(0, 256, (2, PX, PX, 3), dtype=np.uint8)
    x = torch.nn.functional.interpolate(torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255, size=(64, 64),
                                        mode="bilinear", antialias=True)
    with torch.inference_mode():
        np.testing.assert_allclose(enc.encode(tiles), net((x - 0.5) / 0.25).numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(HistosynthError, match="encoder not found") as err:
        load_tile_encoder(str(tmp_path / "nowhere" / "encoder.pt"))
    assert str(tmp_path / "nowhere") in str(err.value)
