"""Does data loading keep up with the training step? (issue 13, item 3)

    python benchmarks/loader.py --recipe nasdm-tiny-cpu --data runs/steps/quickstart/store --steps 30
    python benchmarks/loader.py --recipe runs/steps/pathldm/recipe.yaml --data runs/steps/pathldm/consep-64 --steps 20

For one recipe on one real store, in this order:
1. the loader alone: the task's dataset through the engine's own DataLoader set-up (its batch sampler, the recipe's
   batch size, ``--workers`` worker processes), ``--steps`` batches after one warm-up batch: loader images/s;
2. the real training step: ``fit`` for ``--steps`` steps (data included): step images/s and the fraction of the
   wall time the engine waited for a batch (``TrainResult.data_wait_fraction``, also in `train`'s progress bar).
The loader keeps up when its images/s exceed the step's and the wait is a few percent. Latent methods load cached
latents (encoded once in the task's set-up, outside both timings).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from machine_info import machine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--recipe", required=True, help="a built-in recipe name or a recipe YAML")
    ap.add_argument("--data", required=True, type=Path, help="the store to train on")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: the recipe's)")
    ap.add_argument("--loader-only", action="store_true", help="skip the training steps (a paper-size model on a CPU)")
    args = ap.parse_args()

    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    from histosynth.methods import get_method
    from histosynth.recipes import load_recipe
    from histosynth.training.data_order import StreamBatchSampler
    from histosynth.training.engine import fit

    print("machine:", machine())
    print("command:", " ".join(sys.argv))
    recipe = load_recipe(args.recipe)
    with tempfile.TemporaryDirectory() as tmp:
        task = get_method(recipe.method).task(recipe, args.data, progress=False)
        cfg = task.train_config
        if args.workers is not None:
            cfg.num_workers = args.workers
        task.setup(Accelerator(cpu=True), Path(tmp) / "probe", False)
        dataset = task.dataset()
        loader = iter(DataLoader(dataset, batch_sampler=StreamBatchSampler(len(dataset), cfg.batch_size, cfg.seed, start=0),
                                 num_workers=cfg.num_workers, collate_fn=task.collate_fn))
        next(loader)  # warm-up: worker start, first memory-map reads
        start = time.perf_counter()
        for _ in range(args.steps):
            next(loader)
        loader_rate = args.steps * cfg.batch_size / (time.perf_counter() - start)

        result = None
        if not args.loader_only:
            task = get_method(recipe.method).task(recipe, args.data, progress=False)
            result = fit(task, Path(tmp) / "run", max_steps=args.steps, progress=False)
    print("\n| recipe | batch | workers | loader images/s | step images/s (data included) | waiting for data |")
    print("|---|---|---|---|---|---|")
    step = f"{result.images_per_second:.1f} | {result.data_wait_fraction:.1%}" if result else "— | —"
    print(f"| {recipe.name} | {cfg.batch_size} | {cfg.num_workers} | {loader_rate:.1f} | {step} |")


if __name__ == "__main__":
    main()
