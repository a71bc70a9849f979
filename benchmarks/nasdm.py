"""NASDM throughput: training and sampling images/s at 128 px and peak memory, paper-size and tiny models.

    python benchmarks/nasdm.py                      # both models, CPU or the first GPU
    python benchmarks/nasdm.py --model tiny --train-steps 5 --sample-steps 5 --batch 8

Each (model, phase) runs in its own subprocess so peak memory (max RSS on CPU, max allocated on GPU)
belongs to that measurement alone. Synthetic tensors of the right shapes are fed: this measures the
model, the hybrid loss and the sampler, not data loading.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from machine_info import forward_flops, machine, peak_memory, timed, utilisation

MODELS = {"paper": "nasdm-lizard-20x", "tiny": "nasdm-tiny-cpu"}


def measure(model_key: str, phase: str, batch: int, steps: int, size: int, precision: str,
            peak_tflops: float | None) -> dict:
    import torch

    from histosynth.diffusion.hybrid_loss import hybrid_loss
    from histosynth.diffusion.runtime import denoiser_precision
    from histosynth.training.nasdm import make_model, make_noise_scheduler
    from histosynth.pipelines.nasdm import NASDMPipeline
    from histosynth.recipes import load_recipe

    recipe = load_recipe(MODELS[model_key])
    recipe.patch_size = size
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    num_classes = 6  # Lizard: 6 types (+1 edge channel)
    model = make_model(recipe, num_classes).to(dev)
    sched = make_noise_scheduler(recipe)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    cond = (torch.rand(batch, num_classes + 1, size, size, device=dev) > 0.8).float()
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.no_grad():  # one forward of one image
        flops = forward_flops(lambda: model(torch.randn(1, 3, size, size, device=dev), torch.tensor([500], device=dev),
                                            cond[:1]))
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if phase == "train":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        betas = sched.betas.to(dev)

        def one():
            x0 = torch.rand(batch, 3, size, size, device=dev) * 2 - 1
            t = torch.randint(0, 1000, (batch,), device=dev)
            noise = torch.randn_like(x0)
            xt = sched.add_noise(x0, noise, t)
            with amp:
                out = model(xt, t, cond)
            loss, _ = hybrid_loss(out.float(), x0, xt, t, noise, betas)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        dt = timed(one, dev, steps)
        ips = batch * steps / dt
        model_flops = 3 * flops  # forward + backward (2x forward) per image
    else:
        pipe = NASDMPipeline(unet=model.eval(), scheduler=sched, class_names=[str(i) for i in range(num_classes)])
        # the pipeline's own sampler (the trained DDPM; every swappable scheduler costs one UNet pass per step) with
        # guidance g = 2 (the paper's s = 1): one batched [∅; y] pass per step; the UNet in the precision as
        # `sample --precision` puts it
        denoiser_precision(pipe, precision)
        dt = timed(lambda: pipe(cond, guidance_scale=2.0, num_inference_steps=steps, progress=False),
                   dev, warm_up=lambda: pipe(cond, guidance_scale=2.0, num_inference_steps=2, progress=False))
        ips = batch / dt  # images per second for `steps` guided denoising steps
        model_flops = 2 * steps * flops  # two passes ([∅; y]) per step
    return {"model": model_key, "recipe": recipe.name, "params_M": round(params, 1), "phase": phase, "size": size,
            "batch": batch, "steps": steps, "precision": precision, "device": dev, "seconds": round(dt, 2),
            "images_per_s": round(ips, 3), "forward_GFLOP": round(flops / 1e9, 1),
            **utilisation(model_flops, ips, peak_tflops), **peak_memory(dev)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["paper", "tiny", "both"], default="both")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 40 (paper's per-GPU) on GPU")
    ap.add_argument("--train-steps", type=int, default=None, help="timed optimisation steps (default 3 CPU / 20 GPU)")
    ap.add_argument("--sample-steps", type=int, default=None, help="timed denoising steps with guidance (the trained DDPM; default 10 CPU / 50 GPU, NASDM's sampling default)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default fp32 on CPU, bf16 on GPU")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak TFLOP/s at this precision, for MFU (default on a GPU: 800, an H200's bf16 "
                         "dense rate; on a CPU: none)")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    batch = args.batch or (40 if gpu else 8)
    precision = args.precision or ("bf16" if gpu else "fp32")
    peak = args.peak_tflops or (800.0 if gpu else None)
    if args._child:
        model_key, phase = args._child
        steps = args.train_steps if phase == "train" else args.sample_steps
        print(json.dumps(measure(model_key, phase, batch, steps, args.size, precision, peak)))
        return
    train_steps = args.train_steps or (20 if gpu else 3)
    sample_steps = args.sample_steps or (50 if gpu else 10)
    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d')}  command: {' '.join(sys.argv)}")
    keys = ["paper", "tiny"] if args.model == "both" else [args.model]
    for key in keys:
        for phase in ("train", "sample"):
            cmd = [sys.executable, __file__, "--size", str(args.size), "--batch", str(batch), "--precision", precision,
                   "--train-steps", str(train_steps), "--sample-steps", str(sample_steps), "--_child", key, phase]
            if peak:
                cmd[-3:-3] = ["--peak-tflops", str(peak)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{key} {phase}: FAILED\n{res.stderr[-2000:]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            what = "train images/s" if phase == "train" else f"sample images/s ({r['steps']} guided steps)"
            print(f"{key:5s} ({r['params_M']} M params) {what}: {r['images_per_s']:.3f} at {r['size']} px, batch {r['batch']}, "
                  f"{r['precision']}, peak {r['peak_mem_GiB']} GiB ({r['peak_mem_kind']}); forward {r['forward_GFLOP']} "
                  f"GFLOP/image, {r['model_TFLOP_per_s']} model TFLOP/s"
                  + (f", MFU {r['mfu']:.1%} of {r['peak_TFLOP_per_s']:g}" if "mfu" in r else ""))
            print("  json:", json.dumps(r))


if __name__ == "__main__":
    main()
