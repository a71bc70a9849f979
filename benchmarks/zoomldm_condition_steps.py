"""ZoomLDM's condition sampler (the EDM): quality against steps per scheduler, in the summariser's token space (speed
issue, item 1, for what `sample --condition-scheduler / --condition-steps` choose). Prints the machine and a table.

    python benchmarks/zoomldm_condition_steps.py runs/zoomldm-cmu/cond --store runs/zoomldm-cmu/store \
        --schedulers ddim,dpm-solver++,unipc,ddpm --steps 5,10,20,50,100 --reference ddim:50

Real: the tokens the EDM was trained to sample, read from the run's own cache (the summariser's output for every
training patch), with their levels. Generated: ``--per-real`` draws per real patch at the same levels, one seed for
every point (paired: the same starting noise). Distance: the Fréchet distance between mean-pooled tokens (D-dim) of
generated and real, pooled over levels (so it mostly reflects the most numerous level); beside it, for information,
the mean over draws of the RMS distance to the nearest real summary of the same level (it falls with too few steps,
whose blurred x0 predictions sit near the data's dense middle, so it does not decide). The measure's noise is the
spread of the reference sampler (the paper's DDIM 50) over ``--noise-seeds``; a point "matches" when its FD is within
the reference mean + 2 sd (one seed per point). The last column: the smallest count from which every larger one
matches too.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from machine_info import machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", type=Path, help="a zoomldm-conditions run (its cache holds the training tokens)")
    ap.add_argument("--store", required=True, type=Path, help="the store it was trained on")
    ap.add_argument("--schedulers", default="ddim,dpm-solver++,unipc,ddpm")
    ap.add_argument("--steps", default="5,10,20,50,100")
    ap.add_argument("--reference", default="ddim:50")
    ap.add_argument("--noise-seeds", default="1,2,3")
    ap.add_argument("--per-real", type=int, default=4)
    args = ap.parse_args()
    import torch

    from histosynth.data.store import PatchStore
    from histosynth.diffusion.schedulers import sampling_scheduler
    from histosynth.evaluate.distribution_metrics import feature_statistics, frechet_distance
    from histosynth.pipelines.zoomldm import ZoomLDMPipeline, sample_condition_tokens
    from histosynth.training.zoomldm import train_patches

    print("machine:", machine())
    print("command:", " ".join(sys.argv), "| date:", time.strftime("%Y-%m-%d"))
    pipe = ZoomLDMPipeline.from_pretrained(args.run)
    caches = sorted((args.run / "cache").glob("conditions-*.npy"))
    if len(caches) != 1:
        sys.exit(f"{args.run}/cache: expected one conditions-*.npy (the training tokens), found {len(caches)}")
    real = np.load(caches[0]).astype(np.float64)  # (N, T, D)
    _, levels = train_patches(PatchStore(args.store), pipe.magnifications)
    levels = np.asarray(levels)
    if len(levels) != len(real):
        sys.exit(f"--store {args.store} has {len(levels)} training patches, the run's cache {len(real)}: not the store "
                 "this run was trained on")
    real_stats = feature_statistics(real.mean(1))
    draw_levels = torch.from_numpy(np.repeat(levels, args.per_real))
    trained = pipe.condition_scheduler

    def measure(name: str, steps: int, seed: int) -> tuple[float, float, float]:
        scheduler = sampling_scheduler(name, trained.config)
        t0 = time.perf_counter()
        tokens = sample_condition_tokens(pipe.condition_sampler, scheduler, draw_levels, steps,
                                         torch.Generator().manual_seed(seed)).double().numpy()
        seconds = time.perf_counter() - t0
        fd = frechet_distance(*feature_statistics(tokens.mean(1)), *real_stats)
        flat_real, flat = real.reshape(len(real), -1), tokens.reshape(len(tokens), -1)
        nearest = []
        for lv in np.unique(levels):
            r, g = flat_real[levels == lv], flat[draw_levels.numpy() == lv]
            # squared distances from the norms (no (draws, reals, T·D) array), RMS per token entry to the nearest real
            sq = (g ** 2).sum(1)[:, None] + (r ** 2).sum(1)[None] - 2 * g @ r.T
            nearest.append(np.sqrt(np.maximum(sq.min(1), 0) / r.shape[1]))
        return fd, float(np.concatenate(nearest).mean()), len(tokens) / seconds

    ref_name, ref_steps = args.reference.split(":")
    ref = [measure(ref_name, int(ref_steps), s) for s in [0, *map(int, args.noise_seeds.split(","))]]
    fd_ref, nn_ref = np.array([r[0] for r in ref]), np.array([r[1] for r in ref])
    fd_lim = fd_ref.mean() + 2 * fd_ref.std(ddof=1)
    per_level = ", ".join(f"{m} {int((levels == i).sum())}" for i, m in enumerate(pipe.magnifications))
    print(f"real: {len(real)} training summaries ({real.shape[1]} tokens of {real.shape[2]}; {per_level}); "
          f"{len(draw_levels)} draws per point")
    print(f"reference {args.reference}: FD {fd_ref.mean():.3f} ± {fd_ref.std(ddof=1):.3f}, nearest-real "
          f"{nn_ref.mean():.4f} ± {nn_ref.std(ddof=1):.4f} (seeds 0,{args.noise_seeds}); matches: FD ≤ {fd_lim:.3f}\n")
    print("cells: FD / nearest-real (conditions/s)")
    steps = [int(s) for s in args.steps.split(",")]
    print("| scheduler | " + " | ".join(str(s) for s in steps) + " | matches from (and at every count above) |")
    print("|---|" + "---|" * (len(steps) + 1))
    for name in args.schedulers.split(","):
        cells, ok = [], []
        for n in steps:
            fd, nn, rate = measure(name, n, 0)
            ok.append(fd <= fd_lim)
            cells.append(f"{fd:.3f} / {nn:.4f}{' ✓' if ok[-1] else ''} ({rate:.0f}/s)")
        # the smallest count from which every larger one matches too (a curve that drifts away again has none)
        stable = next((n for i, n in enumerate(steps) if all(ok[i:])), None)
        print(f"| {name} | " + " | ".join(cells) + f" | {stable or '—'} |")


if __name__ == "__main__":
    main()
