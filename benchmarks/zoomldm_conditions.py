"""Condition sampler (EDM) sampling speed of a ZoomLDM pipeline with one: conditions/s at DDIM 50, and the same
number of images/s of the full pipeline for comparison. Prints the machine.

    python benchmarks/zoomldm_conditions.py runs/zoomldm-cmu/cond [--num 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from machine_info import machine  # noqa: E402

from histosynth.pipelines.zoomldm import ZoomLDMPipeline  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--steps", type=int, default=50)
    args = ap.parse_args()
    print("machine:", machine())
    pipe = ZoomLDMPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    levels = torch.arange(args.num) % len(pipe.magnifications)
    g = torch.Generator().manual_seed(0)
    pipe.sample_conditions(levels[:2], args.steps, g)  # warm-up
    t0 = time.perf_counter()
    pipe.sample_conditions(levels, args.steps, g)
    cond = time.perf_counter() - t0
    n_img = min(args.num, 16)
    t0 = time.perf_counter()
    pipe(magnification=[pipe.magnifications[int(i)] for i in levels[:n_img]], generator=g, progress=False)
    full = time.perf_counter() - t0
    print(f"condition sampler: {args.num / cond:.1f} conditions/s (DDIM {args.steps}, batch {args.num})")
    print(f"conditions + images: {n_img / full:.2f} images/s (batch {n_img}, the recipe's steps and guidance)")


if __name__ == "__main__":
    main()
