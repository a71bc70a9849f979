"""Slide embeddings (`histosynth embed`): tiles/s against the encoder's own images/s, disk per tile, peak memory.

    python benchmarks/embed.py                          # offline EfficientNet-Lite0, batch 16, CPU or the first GPU
    python benchmarks/embed.py --encoder hf-hub:MahmoodLab/UNI --batch 64 --slides 4

Slides are copies of the CMU-1 small region (../shared/data/wsi/cmu-1-small-region.svs, 20x, 2967 x 2220 px:
11 x 8 base tiles of 256 px); the store is built directly with one 20x patch per base tile (every tile is
embedded). Printed, one JSON line each:

* ``encoder``: the encoder alone on a batch of 256 px uint8 tiles already in memory (preprocessing included),
  images/s;
* ``embed``: ``embed_store`` end to end on 1 and on N slides (reading and decoding the tiles, the encoder, the
  float16 memory-mapped writes and progress records), tiles/s, its ratio to the encoder's images/s (target >= 0.8),
  disk bytes per base tile (allocated blocks and file size; the float16 features are 2 C bytes), and the process's
  peak RSS (target: the same for 1 and N slides). Each measurement runs in its own subprocess.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import machine, peak_memory

SLIDE = Path(__file__).resolve().parents[2] / "shared" / "data" / "wsi" / "cmu-1-small-region.svs"


def build_store(root: Path, slides: int) -> Path:
    import numpy as np

    from histosynth.data.patches import Patch
    from histosynth.data.slide_tiles import plan_base_tiles
    from histosynth.data.store_writer import PatchStoreWriter

    entries, patches = [], []
    for i in range(slides):
        path = root / f"slide-{i}.svs"
        shutil.copyfile(SLIDE, path)
        plan = plan_base_tiles(path, 256, "20x")
        rows, cols = len(plan.grid_y), len(plan.grid_x)
        entries.append({"path": str(path), "source_magnification": plan.source_magnification, "tile_rows": rows,
                        "tile_cols": cols})
        patches += [(i, ty, tx) for ty in range(rows) for tx in range(cols)]
    store = root / "store"
    meta = {"kind": "slides", "base_magnification": "20x", "slides": entries}
    blank = np.zeros((256, 256, 3), np.uint8)
    with PatchStoreWriter(store, (), 256, "20x", meta, labels=False) as writer:
        for s, ty, tx in patches:
            writer.add(Patch(blank, None, None, "train", ty * 256, tx * 256, 256, entries[s]["path"],
                             {"path": entries[s]["path"], "slide_index": s, "zoom": 0, "tile_y": ty, "tile_x": tx}))
    return store


def measure_encoder(encoder_id: str, batch: int, reps: int, device: str) -> dict:
    import numpy as np
    import torch

    from histosynth.models.ssl_encoder import load_tile_encoder

    enc = load_tile_encoder(encoder_id, device)
    tiles = np.random.default_rng(0).integers(0, 256, (batch, 256, 256, 3), dtype=np.uint8)
    enc.encode(tiles)  # warm-up
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        enc.encode(tiles)  # returns on the CPU: synchronised
    dt = time.perf_counter() - t0
    return {"phase": "encoder", "encoder": enc.encoder_id, "dim": enc.dim, "batch": batch, "reps": reps,
            "images_per_s": round(batch * reps / dt, 2), "peak_rss_MiB": _rss_mib(), **peak_memory(device)}


def measure_embed(encoder_id: str, batch: int, slides: int, device: str) -> dict:
    import numpy as np

    from histosynth.conditions.embed_store import embed_store
    from histosynth.models.ssl_encoder import load_tile_encoder

    enc = load_tile_encoder(encoder_id, device)
    enc.encode(np.zeros((1, 256, 256, 3), np.uint8))  # warm-up, as for the encoder alone
    with tempfile.TemporaryDirectory() as tmp:
        store = build_store(Path(tmp), slides)
        t0 = time.perf_counter()
        emb = embed_store(store, enc, batch_size=batch, device=device, progress=False)
        dt = time.perf_counter() - t0
        tiles = sum(int(s["tile_rows"]) * int(s["tile_cols"]) for s in emb.slides)
        files = [emb.path / s["file"] for s in emb.slides]
        allocated = sum(f.stat().st_blocks * 512 for f in files)
        size = sum(f.stat().st_size for f in files)
    return {"phase": "embed", "slides": slides, "tiles": tiles, "batch": batch, "seconds": round(dt, 2),
            "tiles_per_s": round(tiles / dt, 2), "dim": emb.dim, "feature_bytes_per_tile": 2 * emb.dim,
            "disk_bytes_per_tile": round(allocated / tiles, 1), "file_bytes_per_tile": round(size / tiles, 1),
            "peak_rss_MiB": _rss_mib(), **peak_memory(device)}


def _rss_mib() -> float:
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--encoder", default="efficientnet-lite0")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--reps", type=int, default=4, help="timed encoder batches")
    ap.add_argument("--slides", type=int, default=2, help="the larger run's slides (the smaller has 1)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args._child:
        phase, n = args._child
        out = (measure_encoder(args.encoder, args.batch, args.reps, device) if phase == "encoder"
               else measure_embed(args.encoder, args.batch, int(n), device))
        print(json.dumps(out))
        return
    if not SLIDE.is_file():
        print(f"skipped: {SLIDE} is absent (the benchmark tiles copies of it)")
        return
    print(f"# {machine()}", flush=True)
    results = {}
    for phase, n in (("encoder", 0), ("embed", 1), ("embed", args.slides)):
        cmd = [sys.executable, __file__, "--_child", phase, str(n), "--encoder", args.encoder, "--batch",
               str(args.batch), "--reps", str(args.reps)] + (["--threads", str(args.threads)] if args.threads else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(json.dumps({"phase": phase, "slides": n, "error": out.stderr.strip().splitlines()[-1:]}))
            return
        line = out.stdout.strip().splitlines()[-1]
        results[(phase, n)] = json.loads(line)
        print(line, flush=True)
    own = results[("encoder", 0)]["images_per_s"]
    one, many = results[("embed", 1)], results[("embed", args.slides)]
    print(json.dumps({"summary": True, "embed_over_encoder": round(many["tiles_per_s"] / own, 3),
                      "target": ">= 0.8", "peak_rss_1_slide_MiB": one["peak_rss_MiB"],
                      f"peak_rss_{args.slides}_slides_MiB": many["peak_rss_MiB"],
                      "disk_bytes_per_tile": many["disk_bytes_per_tile"],
                      "feature_bytes_per_tile": many["feature_bytes_per_tile"]}))


if __name__ == "__main__":
    main()
