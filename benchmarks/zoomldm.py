"""ZoomLDM throughput: training images/s (the UNet and the magnification-aware summariser, trained jointly) and
sampling images/s (condition sampler, then DDIM with guidance, then decoding) with peak memory, through the real
ZoomDenoiser and ZoomLDMPipeline, paper-size and tiny models.

    python benchmarks/zoomldm.py                                   # both models, CPU or the first GPU
    python benchmarks/zoomldm.py --model tiny --batch 4 --sample-steps 50 --train-steps 5

Models (random weights: cost, not quality):
  paper  zoomldm-256 (PathLDM's 400.9 M UNet on 64x64x3 latents, 64 tokens of 512) + vq-f4; summariser on
         HIPT-size grids (384-d) at the paper's eight magnifications 20x .. 0.15625x; condition sampler
         zoomldm-conditions (width 512, depth 6)
  tiny   zoomldm-tiny-cpu (128 px, 32x32x3 latents, 16 tokens of 128) + vq-f4-tiny-cpu; EfficientNet-Lite0-size
         grids (1280-d) at 20x, 10x, 5x, 2.5x; condition sampler zoomldm-conditions-tiny-cpu
A batch's grids cycle through the levels, each of its own side (2^k at base / 2^k); the summariser brings each to
its input size, so its cost hardly depends on the levels. Sampling draws the conditions with the sampler's DDIM
(``--condition-steps``, default the recipe's 50), at the levels cycled likewise. A sampling phase with
``--sample-steps 1`` gives the fixed cost (conditions, one step, decoding) that a longer one's per-step cost
excludes. Each phase runs in its own subprocess so that peak memory (max RSS on CPU, max allocated on GPU) is its
own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from machine_info import machine, peak_memory, throughput_options, timed

MODELS = {"paper": ("zoomldm-256", "vq-f4", "zoomldm-conditions", 384,
                    ("20x", "10x", "5x", "2.5x", "1.25x", "0.625x", "0.3125x", "0.15625x")),
          "tiny": ("zoomldm-tiny-cpu", "vq-f4-tiny-cpu", "zoomldm-conditions-tiny-cpu", 1280,
                   ("20x", "10x", "5x", "2.5x"))}


def build(model_key: str, dev: str):
    """(recipe, pipeline, ZoomDenoiser, magnifications, UNet parameters in M, latent factor) with random weights."""
    import torch

    from histosynth.diffusion.schedulers import ldm_ddim_scheduler
    from histosynth.models.condition_sampler import ConditionTransformer
    from histosynth.pipelines.zoomldm import ZoomLDMPipeline
    from histosynth.recipes import load_recipe
    from histosynth.training.autoencoder import make_model as make_autoencoder
    from histosynth.training.latent import make_unet
    from histosynth.training.zoomldm import ZoomDenoiser, make_summariser
    from histosynth.training.zoomldm_conditions import condition_ddim

    name, ae_name, cond_name, dim, levels = MODELS[model_key]
    recipe, ae_recipe, cond = load_recipe(name), load_recipe(ae_name), load_recipe(cond_name)
    torch.manual_seed(0)
    ae = make_autoencoder(ae_recipe).eval().requires_grad_(False)
    f = 2 ** (len(ae.config.block_out_channels) - 1)
    unet = make_unet(recipe, ae_recipe.model.diffusion_channels, recipe.patch_size // f)
    summariser = make_summariser(recipe, dim, levels)
    m = cond.model
    sampler = ConditionTransformer(num_tokens=summariser.num_tokens, token_dim=recipe.unet.cross_attention_dim,
                                   num_magnifications=len(levels), width=m.width, depth=m.depth, heads=m.heads,
                                   data_std=1.0)
    r = recipe.diffusion
    pipe = ZoomLDMPipeline(
        unet=unet, vae=ae,
        scheduler=ldm_ddim_scheduler(r.num_train_timesteps, r.beta_schedule, r.beta_start, r.beta_end),
        summariser=summariser.eval(), condition_sampler=sampler.eval(), condition_scheduler=condition_ddim(cond),
        base_magnification=levels[0], patch_size=recipe.patch_size,
        embeddings={"name": "benchmark", "encoder": "random", "dim": dim},
        sampling={**vars(recipe.sampling), "condition_steps": cond.sampling.num_inference_steps}).to(dev)
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    return recipe, pipe, ZoomDenoiser(unet, summariser), levels, params, f


def measure(model_key: str, phase: str, batch: int, steps: int, condition_steps: int | None) -> dict:
    import torch

    from histosynth.diffusion.schedulers import ddpm_scheduler

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    recipe, pipe, denoiser, levels, params, f = build(model_key, dev)
    dim, size = MODELS[model_key][3], recipe.patch_size
    picks = [i % len(levels) for i in range(batch)]  # a level-balanced batch
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if phase == "train":
        denoiser.train().requires_grad_(True)
        sched = ddpm_scheduler(recipe.diffusion)
        opt = torch.optim.AdamW(denoiser.parameters(), lr=1e-4)
        c = pipe.unet.config.in_channels
        grids = [torch.randn(2 ** k, 2 ** k, dim) for k in picks]  # level k: side 2^k
        levels_t = torch.tensor(picks, device=dev)

        def one():
            z = torch.randn(batch, c, size // f, size // f, device=dev)
            t = torch.randint(0, 1000, (batch,), device=dev)
            noise = torch.randn_like(z)
            drop = torch.zeros(batch, dtype=torch.bool, device=dev)
            eps = denoiser(sched.add_noise(z, noise, t), t, grids, levels_t, drop)
            torch.nn.functional.mse_loss(eps, noise).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        dt = timed(one, dev, steps)
        ips = batch * steps / dt
    else:
        names = [levels[k] for k in picks]

        def run(n):
            return pipe(names, num_inference_steps=n, condition_steps=condition_steps,
                        generator=torch.Generator(dev).manual_seed(0), progress=False)

        dt = timed(lambda: run(steps), dev, warm_up=lambda: run(1))
        ips = batch / dt
    return {"model": model_key, "recipe": MODELS[model_key][0], "unet_params_M": round(params, 1), "phase": phase,
            "size": size, "batch": batch, "steps": steps,
            "condition_steps": condition_steps or pipe.config.sampling["condition_steps"], "device": dev,
            "seconds": round(dt, 3), "images_per_s": round(ips, 4), **peak_memory(dev)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    throughput_options(ap)
    ap.add_argument("--condition-steps", type=int, default=None, help="condition sampler steps (default the recipe's)")
    ap.add_argument("--phases", default="train,sample")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    batch = args.batch or (16 if gpu else 2)
    train_steps = args.train_steps or (20 if gpu else 2)
    sample_steps = args.sample_steps or (50 if gpu else 5)
    if args._child:
        key, phase = args._child
        print(json.dumps(measure(key, phase, batch, train_steps if phase == "train" else sample_steps,
                                 args.condition_steps)))
        return
    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d')}  command: {' '.join(sys.argv)}")
    for key in (["paper", "tiny"] if args.model == "both" else [args.model]):
        for phase in args.phases.split(","):
            cmd = [sys.executable, __file__, "--batch", str(batch), "--train-steps", str(train_steps),
                   "--sample-steps", str(sample_steps), "--_child", key, phase]
            if args.condition_steps:
                cmd[2:2] = ["--condition-steps", str(args.condition_steps)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{key} {phase}: FAILED\n{res.stderr[-2000:]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            what = ("train (UNet + summariser, grids cycling through the levels)" if phase == "train" else
                    f"sample (conditions DDIM {r['condition_steps']}, DDIM {r['steps']} + CFG, decode)")
            print(f"{key:5s} (UNet {r['unet_params_M']} M) {what}: {r['images_per_s']:.4f} images/s at {r['size']} px, "
                  f"batch {r['batch']}, {r['seconds']} s, peak {r['peak_mem_GiB']} GiB ({r['peak_mem_kind']})")
            print("  json:", json.dumps(r))


if __name__ == "__main__":
    main()
