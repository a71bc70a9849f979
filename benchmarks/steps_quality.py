"""Quality vs sampling steps per scheduler (issue 13, item 1): offline FD and the labels' adherence where there is a
measure of it: NASDM (``--masks``) the nuclei contrast (grey level outside − inside the conditioned nuclei, generated
vs real), HistoSmith (``--counts-from``) the count error of its generated instance maps. PathLDM takes ``--prompts``,
DISC ``--regions`` and ZoomLDM ``--zoom STORE --magnification M`` (FD only; ZoomLDM: the store's real embedding grids
at level M condition, the paper's "oracle" conditions, and FD is against that level's patches).

    python benchmarks/steps_quality.py --model runs/steps/quickstart/run --masks runs/steps/quickstart/store \
        --schedulers ddpm,ddim,dpm-solver++,unipc --steps 5,10,20,50,100,250 --reference ddpm:250 --out runs/steps/nasdm
    python benchmarks/steps_quality.py --model runs/steps/pathldm/run --prompts runs/steps/pathldm/train-captions.jsonl \
        --real runs/steps/pathldm/consep-64 --schedulers ddim,dpm-solver++,unipc --steps 5,10,20,50,100 \
        --reference ddim:50 --out runs/steps/pathldm-steps

Every point samples the same conditions with the same seed (paired: the same masks or prompts, the same starting
noise), so differences between points are the scheduler's and the step count's. The noise of the measure is the spread
of the reference sampler (the paper's) over ``--noise-seeds`` other seeds; a point "matches" the reference when its FD
is within reference mean + 2 sd, its blur (scikit-image's ``blur_effect``; where the real set is a store or a ZoomLDM
level) no farther from the real patches' than the reference mean's distance + 2 sd, and also its contrast (masks) or
count error (``--counts-from``: ≤ reference mean + 2 sd). Blur is there because FD at 64 images did not see the
blurred, paler tiles of a latent model sampled in too few steps. ``--deep-cache N,..`` (seed 0) and ``--precisions
bf16,..`` (every reference seed, paired with the float32 ones; a pipeline loaded again and cast as `sample
--precision` does) are speed settings measured at the reference sampler. Every point also gets its mean grey level and
share of dark tiles, and with ``--limit ddim:250`` its mean abs pixel difference to a converged sampler's images from
the same noise (how far a deterministic solver stops from the ODE's solution; paired, so it sees changes FD at 64
images cannot). When the paper's scheduler beats its own step count's FD with fewer steps beyond the noise, the curve
is flagged: its long trajectories follow the model's error, so FD alone places no default (blur and labels can). Writes
OUT/results.json, OUT/steps_quality.png, OUT/steps_tiles.png (real patches, then the paper's scheduler at each step
count from the same noise) and markdown tables on stdout. OUT caches its points for one curve: OUT/curve.json records
the settings they depend on (model, conditions, real set, split, magnification, --num, --batch), and other settings
need another OUT.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from machine_info import machine


def _measure(method, pipe, source, sub: Path, real, stats: Path, *, scheduler, steps, seed, num, batch, split,
             real_split, has_masks, has_counts) -> dict:
    from histosynth.evaluate.fid import evaluate_distribution
    from histosynth.evaluate.sweep import sample_contrast

    t0 = time.perf_counter()
    if not (sub / "samples.jsonl").is_file():
        method.sample(pipe, source, sub, num=num, num_inference_steps=steps, scheduler=scheduler, seed=seed,
                      batch_size=batch, progress=False, split=split)  # every method's signature (prompts: unused)
    seconds = time.perf_counter() - t0
    fd = evaluate_distribution(None if stats.is_file() else real, sub, "effnet-lite0", split=real_split, metrics=["fid"],
                               progress=False, real_stats=stats if stats.is_file() else None,
                               save_stats=None if stats.is_file() else stats)
    row = {"scheduler": scheduler, "steps": steps, "seed": seed, "fd": fd["fid"], "n": fd["n_generated"],
           "seconds_sampling": round(seconds, 1), **_image_stats(_folder_images(sub))}
    if has_masks:
        row["contrast"], row["contrast_real"] = sample_contrast(sub)
    if has_counts:
        row["count_error"] = _count_error(sub)
    return row


# what OUT's cached points (sample folders, results.json, real-stats.npz) depend on: one curve per OUT
CURVE_SETTINGS = ("model", "masks", "prompts", "counts_from", "regions", "zoom", "magnification", "real", "split",
                  "num", "batch")


def _claim_out(args, ap) -> dict:
    """The settings OUT's cached points depend on (OUT/curve.json, written with the first point); an OUT holding a
    curve of other settings is an error (its points and real statistics would be reused silently)."""
    mine = {k: str(getattr(args, k).resolve()) if isinstance(getattr(args, k), Path) else getattr(args, k)
            for k in CURVE_SETTINGS}
    record = args.out / "curve.json"
    if record.is_file():
        theirs = json.loads(record.read_text())
        differ = [f"--{k.replace('_', '-')} {theirs.get(k)!r} there, {mine[k]!r} now" for k in CURVE_SETTINGS
                  if theirs.get(k) != mine[k]]
        if differ:
            ap.error(f"--out {args.out} holds a curve of other settings ({'; '.join(differ)}): its points were made "
                     "with those; give another --out")
    args.out.mkdir(parents=True, exist_ok=True)
    return mine


def _count_error(folder: Path) -> float:
    """HistoSmith's label adherence: mean over images of sum over types |nuclei realised in the generated instance
    map - nuclei requested| (nuclei per patch)."""
    return round(float(np.mean([sum(abs(r["realised"][k] - r["requested"][k]) for k in r["requested"])
                                for r in _rows(folder)])), 3)


def _rows(folder: Path) -> list[dict]:
    """The rows of a sample folder's samples.jsonl (the shared writer's manifest)."""
    return [json.loads(line) for line in (folder / "samples.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--masks", type=Path, help="NASDM: the store whose test masks condition (and are the real set)")
    ap.add_argument("--prompts", type=Path, help="PathLDM: a prompts/captions file (drawn --num times by the seed)")
    ap.add_argument("--counts-from", type=Path,
                    help="HistoSmith: the store whose patches' nuclei counts per type (and tissues) are requested")
    ap.add_argument("--regions", type=Path, help="DISC: the region store whose --split masks condition the tiles")
    ap.add_argument("--zoom", type=Path, help="ZoomLDM: a multi-magnification store with embeddings whose patches at "
                    "--magnification condition (their real grids) and are the real set")
    ap.add_argument("--magnification", help="ZoomLDM: the one level measured (e.g. 20x)")
    ap.add_argument("--real", type=Path,
                    help="the real store (default: --masks, --counts-from or --regions); its --split is FD's reference")
    ap.add_argument("--split", help="the real store's split (default test; --zoom: all its patches)")
    ap.add_argument("--schedulers", default="ddim,dpm-solver++,unipc")
    ap.add_argument("--steps", default="5,10,20,50,100,250")
    ap.add_argument("--reference", required=True, help="the paper's sampler as SCHEDULER:STEPS (e.g. ddpm:250)")
    ap.add_argument("--noise-seeds", default="1,2", help="other seeds of the reference sampler: the measure's noise")
    ap.add_argument("--deep-cache", default="", help="DeepCache intervals (e.g. 2,3,5) measured at the reference sampler")
    ap.add_argument("--precisions", default="",
                    help="denoiser precisions (e.g. bf16) measured at the reference sampler on the reference's seeds")
    ap.add_argument("--limit", default="",
                    help="a converged deterministic sampler as SCHEDULER:STEPS (e.g. dpm-solver++:250): each seed-0 "
                         "point's mean abs pixel difference to its images (same noise) is how far it stops from the "
                         "probability-flow ODE's solution")
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--out", required=True, type=Path)
    args = ap.parse_args()
    if sum(x is not None for x in (args.masks, args.prompts, args.counts_from, args.regions, args.zoom)) != 1:
        ap.error("give one of --masks (NASDM), --prompts (PathLDM), --counts-from (HistoSmith), --regions (DISC), "
                 "--zoom (ZoomLDM)")
    if args.prompts is not None and args.real is None:
        ap.error("--prompts: give --real STORE, the real patches FD compares with")
    if (args.zoom is None) != (args.magnification is None):
        ap.error("--zoom and --magnification go together (ZoomLDM: one level per curve)")
    if args.zoom is not None and args.real is not None:
        ap.error("--zoom: the real set is that store's patches at --magnification; drop --real")
    if args.split is None:
        args.split = None if args.zoom else "test"
    if args.zoom is not None:
        from histosynth.data.patches import format_magnification
        from histosynth.errors import HistosynthError

        try:
            args.magnification = format_magnification(args.magnification)
        except (ValueError, HistosynthError):
            ap.error(f"--magnification: {args.magnification!r} is not one magnification (e.g. 20x)")

    import torch

    from histosynth.methods import load_pipeline

    print("machine:", machine())
    print("command:", " ".join(sys.argv))
    curve = _claim_out(args, ap)
    method, pipe = load_pipeline(args.model, "cpu")
    has_masks = args.masks is not None
    has_counts = args.counts_from is not None
    source = (args.masks if has_masks else {"counts_from": args.counts_from} if has_counts
              else {"store": args.regions} if args.regions
              else {"reference": args.zoom, "magnification": args.magnification} if args.zoom else args.prompts)
    real = args.real or args.masks or args.counts_from or args.regions
    real_split = args.split
    if args.zoom:  # FD's real set: the store's patches at that level (and split), as an image folder
        real = _level_folder(args.zoom, args.magnification, args.split,
                             args.out / f"real-{args.magnification}-{args.split or 'all'}")
        real_split = None
    stats = args.out / "real-stats.npz"
    ref_name, ref_steps = args.reference.split(":")
    ref_steps = int(ref_steps)
    todo = [(s, int(k), 0) for s in args.schedulers.split(",") for k in args.steps.split(",")]
    todo += [(ref_name, ref_steps, 0)] + [(ref_name, ref_steps, int(x)) for x in args.noise_seeds.split(",") if x]
    limit = (args.limit.split(":")[0], int(args.limit.split(":")[1])) if args.limit else None
    todo += [(*limit, 0)] if limit else []
    rows, results = [], args.out / "results.json"

    def key(r):
        return r["scheduler"], r["steps"], r["seed"], r.get("deep_cache", 1), r.get("precision", "fp32")

    done = {key(r): r for r in json.loads(results.read_text())["rows"]} if results.is_file() else {}

    def save():  # this run's rows, then the earlier runs' other points (kept, not reported here)
        (args.out / "curve.json").write_text(json.dumps(curve, indent=2) + "\n")
        mine = {key(r) for r in rows}
        results.write_text(json.dumps({"machine": machine(), "torch": torch.__version__, "command": " ".join(sys.argv),
                                       "rows": rows + [r for k, r in done.items() if k not in mine]}, indent=2) + "\n")
    ref_seeds = [0] + [int(x) for x in args.noise_seeds.split(",") if x]
    todo = ([(*point, 1, "fp32") for point in todo]
            + [(ref_name, ref_steps, 0, int(n), "fp32") for n in args.deep_cache.split(",") if n]
            + [(ref_name, ref_steps, seed, 1, p) for p in args.precisions.split(",") if p for seed in ref_seeds])
    pipes = {"fp32": pipe}
    for scheduler, steps, seed, interval, precision in dict.fromkeys(todo):
        row = done.get((scheduler, steps, seed, interval, precision))
        sub = args.out / (f"{scheduler}-{steps}-seed{seed}" + (f"-deepcache{interval}" if interval > 1 else "")
                          + (f"-{precision}" if precision != "fp32" else ""))
        if row is not None and "blur" not in row:  # results.json of an earlier version of this script
            row.update(_image_stats(_folder_images(sub)))
        if row is None:
            from histosynth.diffusion.runtime import deep_cache, denoiser_precision

            if precision not in pipes:  # a cast is not undone: a pipeline of its own
                pipes[precision] = denoiser_precision(load_pipeline(args.model, "cpu")[1], precision)
            run = pipes[precision]
            cache = deep_cache(run.unet, interval) if interval > 1 else contextlib.nullcontext()
            with cache:
                row = _measure(method, run, source, sub, real, stats, scheduler=scheduler, steps=steps, seed=seed,
                               num=args.num, batch=args.batch, split=args.split, real_split=real_split,
                               has_masks=has_masks, has_counts=has_counts)
            if interval > 1:
                row["deep_cache"] = interval
            if precision != "fp32":
                row["precision"] = precision
                name = f"{scheduler}-{steps}-seed{seed}"
                row["mean_abs_diff_to_fp32"] = _paired_difference(args.out / name, args.out / f"{name}-{precision}")
        rows.append(row)
        print(json.dumps(row), flush=True)
        save()

    plain = [r for r in rows if "deep_cache" not in r and "precision" not in r]
    if limit:  # paired with the converged sampler's images: the solver's own error, free of FD's sampling noise
        for r in plain:
            if r["seed"] == 0:
                r["diff_to_limit"] = round(_paired_difference(args.out / f"{limit[0]}-{limit[1]}-seed0",
                                                              args.out / f"{r['scheduler']}-{r['steps']}-seed0"), 3)
                r["limit"] = args.limit
        save()
    ref = [r for r in plain if r["scheduler"] == ref_name and r["steps"] == ref_steps]
    fd_ref = np.array([r["fd"] for r in ref])
    fd_limit = fd_ref.mean() + 2 * fd_ref.std(ddof=1)
    c_ref = np.array([r["contrast"] for r in ref]) if has_masks else None
    # adherence matches when the contrast is no farther from the real patches' (same masks, seed 0) than the
    # reference's band: a sampler closer to the real contrast than the paper's is not worse
    c_real = next(r["contrast_real"] for r in ref if r["seed"] == 0) if has_masks else None
    c_limit = abs(c_ref.mean() - c_real) + 2 * c_ref.std(ddof=1) if has_masks else None
    e_ref = np.array([r["count_error"] for r in ref]) if has_counts else None
    e_limit = e_ref.mean() + 2 * e_ref.std(ddof=1) if has_counts else None

    def real_images():  # the real set's images, where it is a store (or a ZoomLDM level); else None
        return (_store_images(real, args.split) if (real / "store.json").is_file()
                else _level_patches(args.zoom, args.magnification, args.split) if args.zoom else None)

    reals = real_images()
    real_stats = _image_stats(reals) if reals is not None else None
    # sharpness matches as the contrast does: blur no farther from the real patches' than the reference's band
    b_ref = np.array([r["blur"] for r in ref])
    b_limit = abs(b_ref.mean() - real_stats["blur"]) + 2 * b_ref.std(ddof=1) if real_stats else None

    def adherent(r) -> bool:  # the labels' measure matches too: mask contrast (NASDM), count error (HistoSmith)
        return ((not has_masks or abs(r["contrast"] - c_real) <= c_limit)
                and (not has_counts or r["count_error"] <= e_limit))

    def sharp(blur: float) -> bool:  # as sharp as the paper's sampler (within the noise), where the real set is known
        return b_limit is None or abs(blur - real_stats["blur"]) <= b_limit

    print(f"\nreference {ref_name} {ref_steps} over seeds {[r['seed'] for r in ref]}: FD {fd_ref.mean():.1f} ± "
          f"{fd_ref.std(ddof=1):.1f} (match: FD ≤ {fd_limit:.1f})" + (
              f"; contrast {c_ref.mean():.1f} ± {c_ref.std(ddof=1):.1f}, real {c_real:.1f} (match: |contrast − real| ≤ "
              f"{c_limit:.1f})" if has_masks else "") + (
              f"; count error {e_ref.mean():.2f} ± {e_ref.std(ddof=1):.2f} nuclei per patch (match: ≤ {e_limit:.2f})"
              if has_counts else "") + (
              f"; blur {b_ref.mean():.4f} ± {b_ref.std(ddof=1):.4f}, real {real_stats['blur']:.4f} (match: |blur − "
              f"real| ≤ {b_limit:.4f})" if real_stats else "; blur not matched (--real is not a store)"))
    steps_list = [int(k) for k in args.steps.split(",")]
    head = "| scheduler | " + " | ".join(f"{k}" for k in steps_list) + " | smallest matching |"
    print(head + "\n|" + "---|" * (len(steps_list) + 2))
    for s in args.schedulers.split(","):
        cells, first = [], None
        for k in steps_list:
            r = next(r for r in rows if r["scheduler"] == s and r["steps"] == k and r["seed"] == 0)
            ok = r["fd"] <= fd_limit and adherent(r) and sharp(r["blur"])
            first = first or (k if ok else None)
            cells.append(f"{r['fd']:.1f}" + (f" / {r['contrast']:.1f}" if has_masks else "")
                         + (f" / {r['count_error']:.2f}" if has_counts else "") + f" / {r['blur']:.3f}"
                         + (" ✓" if ok else ""))
        print(f"| {s} | " + " | ".join(cells) + f" | {first or '—'} |")
    # the rule needs a curve that worsens at the low end; where the paper's own scheduler is better with fewer steps
    # beyond the noise, its long trajectories follow the model's error and "smallest matching" places no default
    fewer_better = [r["steps"] for r in plain if r["scheduler"] == ref_name and r["seed"] == 0
                    and r["steps"] < ref_steps and r["fd"] < fd_ref.mean() - 2 * fd_ref.std(ddof=1)]
    if fewer_better:
        print(f"\nnote: {ref_name} at {fewer_better} steps beats its own {ref_steps}-step FD beyond the noise (FD < "
              f"{fd_ref.mean() - 2 * fd_ref.std(ddof=1):.1f}): longer trajectories follow this model's error, so FD "
              "alone does not show where quality drops" + (
                  "; only the blur (and label) columns can place a default here" if b_limit is not None
                  else "; without blur (give --real as a store) place no default"))

    print(f"\nmean grey level (0-255) / tiles with mean grey < {DARK} (%)" + (
        f"; real {args.split or 'stored'} patches{' at ' + args.magnification if args.zoom else ''}: "
        f"{real_stats['mean_grey']} / {100 * real_stats['dark_fraction']:.0f} %"
        if real_stats else ""))
    print(head.replace(" smallest matching |", "").rstrip() + "\n|" + "---|" * (len(steps_list) + 1))
    for s in args.schedulers.split(","):
        cells = [next((f"{r['mean_grey']} / {100 * r['dark_fraction']:.0f}" for r in rows if r["scheduler"] == s
                       and r["steps"] == k and r["seed"] == 0 and "mean_grey" in r), "—") for k in steps_list]
        print(f"| {s} | " + " | ".join(cells) + " |")
    if limit:
        d_ref = next(r["diff_to_limit"] for r in ref if r["seed"] == 0)
        print(f"\nmean abs pixel difference (0-255) to {args.limit}, same noise and prompts; the paper's "
              f"{args.reference}: {d_ref:.2f}. ✓: the first table's match and no farther from the ODE's solution than "
              "the paper's sampler (deterministic solvers only: the stochastic ones do not follow the ODE)")
        print(head + "\n|" + "---|" * (len(steps_list) + 2))
        for s in args.schedulers.split(","):
            cells, first = [], None
            for k in steps_list:
                r = next(r for r in rows if r["scheduler"] == s and r["steps"] == k and r["seed"] == 0)
                ok = (s not in STOCHASTIC and r["fd"] <= fd_limit and r["diff_to_limit"] <= d_ref
                      and adherent(r) and sharp(r["blur"]))
                first = first or (k if ok else None)
                cells.append(f"{r['diff_to_limit']:.2f}" + (" ✓" if ok else ""))
            print(f"| {s} | " + " | ".join(cells) + f" | {first or '—'} |")
    cached = [r for r in rows if "deep_cache" in r]
    if cached:
        uncached = next(r for r in ref if r["seed"] == 0)
        print(f"\n| {args.reference}, seed 0 | FD | " + ("contrast | " if has_masks else "")
              + "blur | sampling s | matches |")
        print("|---|---|" + ("---|" if has_masks else "") + "---|---|---|")
        for r in [uncached, *cached]:
            ok = r["fd"] <= fd_limit and adherent(r) and sharp(r["blur"])
            print(f"| DeepCache {r.get('deep_cache', 1)} | {r['fd']:.1f} | " + (f"{r['contrast']:.1f} | " if has_masks
                  else "") + f"{r['blur']:.3f} | {r['seconds_sampling']} | {'✓' if ok else '—'} |")
    for p in [p for p in args.precisions.split(",") if p]:
        low = sorted((r for r in rows if r.get("precision") == p), key=lambda r: r["seed"])
        fd_low = np.array([r["fd"] for r in low])
        print(f"\n| {args.reference} | seeds | FD fp32 | FD {p} | " + ("contrast fp32 | contrast " + p + " | "
              if has_masks else "") + f"mean abs pixel difference {p} − fp32 (0–255) | sampling s fp32 | "
              f"sampling s {p} |")
        print("|---|---|---|---|" + ("---|---|" if has_masks else "") + "---|---|---|")
        for r, q in zip(sorted(ref, key=lambda r: r["seed"]), low):
            print(f"| | {r['seed']} | {r['fd']:.1f} | {q['fd']:.1f} | " + (
                f"{r['contrast']:.1f} | {q['contrast']:.1f} | " if has_masks else "")
                + f"{q['mean_abs_diff_to_fp32']:.2f} | {r['seconds_sampling']} | {q['seconds_sampling']} |")
        ok = fd_low.mean() <= fd_limit and sharp(float(np.mean([r["blur"] for r in low])))
        print(f"| mean ± sd | | {fd_ref.mean():.1f} ± {fd_ref.std(ddof=1):.1f} | {fd_low.mean():.1f} ± "
              f"{fd_low.std(ddof=1):.1f} | " + ("| | " if has_masks else "")
              + f"{'matches' if ok else 'outside'} | | |")
    _plot(plain, args, steps_list, fd_ref, c_ref, has_masks, b_ref, real_stats["blur"] if real_stats else None)
    shown = sorted({*steps_list, ref_steps, *([limit[1]] if limit and limit[0] == ref_name else [])})
    shown = [k for k in shown if (args.out / f"{ref_name}-{k}-seed0" / "samples.jsonl").is_file()]
    with_real = _tiles(args.out, real_images(), [args.out / f"{ref_name}-{k}-seed0" for k in shown])
    print(f"\n{args.out / 'steps_tiles.png'}: " + ("the first real patches, then " if with_real else "")
          + f"{ref_name} at {shown} steps, the same first images (same noise) in each row")


STOCHASTIC = {"ddpm", "sde-dpm-solver++", "euler-ancestral"}  # samplers that add fresh noise at each step
DARK = 100  # a tile whose mean grey level (0-255) is below this is dark: H&E tiles are mostly bright


def _image_stats(images) -> dict:
    """Mean grey level (0-255) of the images, the fraction of dark tiles (mean grey < DARK): what an undertrained
    model's long trajectories drift to (dark, saturated tiles), which FD alone does not name; and the mean blur
    (scikit-image's ``blur_effect`` of the grey image, 0 sharp to 1 blurred; Crete et al. 2007): what too few steps
    do to a latent model's tiles, which FD at 64 images did not see."""
    from skimage.color import rgb2gray
    from skimage.measure import blur_effect

    arrays = [np.asarray(im) for im in images]
    means = np.array([a.astype(np.float64).mean() for a in arrays])
    blur = [blur_effect(rgb2gray(a[..., :3]) if a.ndim == 3 else a / 255.0) for a in arrays]
    return {"mean_grey": round(float(means.mean()), 1), "dark_fraction": round(float((means < DARK).mean()), 3),
            "blur": round(float(np.mean(blur)), 4)}


def _folder_images(folder: Path):
    """A sample folder's images in manifest order, RGB uint8 (H, W, 3) by the project's one reader."""
    from histosynth.data.images import load_image

    for r in _rows(folder):
        yield load_image(folder / r["image"])


def _store_images(store: Path, split: str):
    from histosynth.data.store import PatchStore

    patches = PatchStore(store)
    return (patches[i]["image"] for i in patches.indices(split))


def _tiles(out: Path, reals, folders: list[Path], per_row: int = 8) -> bool:
    """OUT/steps_tiles.png: a row of real patches (when there are, of the generated size), then one row per sample
    folder: its first ``per_row`` images, the same noise in every row, so what the step count changes is seen tile by
    tile. True when the real row is there."""
    from itertools import islice

    from PIL import Image

    from histosynth.viz import save_grid

    rows = [[np.asarray(im) for im in islice(_folder_images(f), per_row)] for f in folders]
    rows = [r for r in rows if r]
    if not rows:
        return False
    h, w = rows[0][0].shape[:2]
    real = [np.asarray(Image.fromarray(np.asarray(im)).convert("RGB")) for im in islice(reals or [], per_row)]
    with_real = bool(real) and all(im.shape[:2] == (h, w) for im in real)
    save_grid([real, *rows] if with_real else rows, out / "steps_tiles.png", scale=max(1, 128 // h))  # >= 128 px shown
    return with_real


def _level_patches(store: Path, magnification: str, split: str | None):
    """The uint8 (H, W, 3) images of a multi-magnification store's patches at one level (canonical spelling, e.g.
    20x), one by one."""
    from histosynth.data.store import PatchStore

    patches = PatchStore(store)
    level = patches.indices_by_magnification(split).get(magnification, [])
    if len(level) < 2:
        sys.exit(f"--zoom {store}: {len(level)} {split or 'stored'} patches at {magnification} (FD needs at least 2)")
    return (np.asarray(patches[i]["image"]) for i in level)


def _level_folder(store: Path, magnification: str, split: str | None, folder: Path) -> Path:
    """The level's patches written once as PNGs (the real set evaluate_distribution reads as a folder)."""
    from PIL import Image

    if not folder.is_dir():
        images = _level_patches(store, magnification, split)  # (exits on a level without patches)
        part = folder.with_name(folder.name + ".partial")
        shutil.rmtree(part, ignore_errors=True)  # a killed run's part
        part.mkdir(parents=True)
        for n, image in enumerate(images):
            Image.fromarray(image).save(part / f"{n:05d}.png")
        part.rename(folder)
    return folder


def _paired_difference(a: Path, b: Path) -> float:
    """Mean absolute difference (0-255) between the images of two sample folders, paired by name (same seed, same
    conditions: what another precision changes in the very images)."""
    from PIL import Image

    diffs = [np.abs(np.asarray(Image.open(a / r["image"]), dtype=np.float64)
                    - np.asarray(Image.open(b / r["image"]), dtype=np.float64)).mean() for r in _rows(a)]
    return float(np.mean(diffs))


def _plot(rows, args, steps_list, fd_ref, c_ref, has_masks, b_ref, b_real) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("fd", fd_ref, "FD (EfficientNet-Lite0) ↓", None)]
    if has_masks:
        panels.append(("contrast", c_ref, "nuclei contrast (mask adherence; nearer the real is better)",
                       rows[0].get("contrast_real")))
    panels.append(("blur", b_ref, "blur effect (0 sharp, 1 blurred; nearer the real)", b_real))
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (key, ref, label, real_value) in zip(axes[0], panels):
        for s in args.schedulers.split(","):
            pts = [(k, r[key]) for k in steps_list for r in rows if r["scheduler"] == s and r["steps"] == k
                   and r["seed"] == 0]
            ax.plot(*zip(*pts), marker="o", label=s)
        m, sd = ref.mean(), ref.std(ddof=1)
        ax.axhspan(m - 2 * sd, m + 2 * sd, color="grey", alpha=0.2, label=f"{args.reference} ± 2 sd (seeds)")
        if real_value is not None:
            ax.axhline(real_value, color="k", ls=":", label="real patches")
        ax.set_xscale("log")
        ax.set_xlabel("steps (UNet passes ×2 with guidance)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.suptitle(f"{args.model}: {args.num} images per point, same conditions and seed", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "steps_quality.png", dpi=120)


if __name__ == "__main__":
    main()
