"""Latent diffusion (PathLDM) throughput: training and DDIM sampling images/s at 256 px and peak memory,
paper-size and tiny models.

    python benchmarks/latent_diffusion.py                      # both models, CPU or the first GPU
    python benchmarks/latent_diffusion.py --model tiny --train-steps 5 --sample-steps 50 --batch 8

Models: "paper" is pathldm-256 (the cin256-v2 LDM UNet on 64x64x3 latents, 512-d context of 154 tokens)
with the vq-f4 autoencoder; "tiny" is pathldm-tiny-cpu (384-d MiniLM context) with vq-f4-tiny-cpu.
Phases, each in its own subprocess so that peak memory (max RSS on CPU, max allocated on GPU) belongs to
it alone, on synthetic tensors of the right shapes (the model, not data loading or the text encoder):

* train: one optimisation step of the UNet on cached latents (what a run with cache_latents does);
* train+encode: the same plus encoding the 256 px images with the autoencoder (cache_latents: false,
  the paper recipe's setting for a 3.2-million-patch store);
* sample: DDIM with classifier-free guidance (one batched [null, cond] UNet pass per step) and the
  autoencoder's decoder, 256 px images out.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from machine_info import forward_flops, machine, peak_memory, timed, utilisation

MODELS = {"paper": ("pathldm-256", "vq-f4"), "tiny": ("pathldm-tiny-cpu", "vq-f4-tiny-cpu")}


def measure(model_key: str, phase: str, batch: int, steps: int, precision: str, peak_tflops: float | None,
            compile_unet: bool = False, checkpointing: bool = False) -> dict:
    import torch

    from histosynth.training.autoencoder import make_model as make_autoencoder
    from histosynth.diffusion.schedulers import ddpm_scheduler, ldm_ddim_scheduler
    from histosynth.diffusion.runtime import PRECISIONS, compile_module
    from histosynth.training.latent import make_unet
    from histosynth.diffusion.guidance import classifier_free_guidance
    from histosynth.recipes import load_recipe

    ldm_name, ae_name = MODELS[model_key]
    recipe, ae_recipe = load_recipe(ldm_name), load_recipe(ae_name)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    size = recipe.patch_size
    ae = make_autoencoder(ae_recipe).to(dev).eval().requires_grad_(False)
    f = 2 ** (len(ae.config.block_out_channels) - 1)
    channels = ae_recipe.model.diffusion_channels
    unet = make_unet(recipe, channels, size // f).to(dev)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    context = torch.randn(batch, recipe.conditioner.max_tokens, recipe.unet.cross_attention_dim, device=dev)
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.no_grad():  # one UNet forward of one image (the reference: 213.6 GFLOP for pathldm-256)
        flops = forward_flops(lambda: unet(torch.randn(1, channels, size // f, size // f, device=dev),
                                           torch.tensor([500], device=dev), encoder_hidden_states=context[:1]))
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if phase in ("train", "train+encode"):
        if checkpointing:  # the recipe option train.gradient_checkpointing (engine.enable_gradient_checkpointing)
            unet.enable_gradient_checkpointing()
        sched = ddpm_scheduler(recipe.diffusion)
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)

        def one():
            if phase == "train+encode":
                with torch.no_grad(), amp:
                    z = ae.encode(torch.rand(batch, 3, size, size, device=dev) * 2 - 1).latents.float()
            else:
                z = torch.randn(batch, channels, size // f, size // f, device=dev)
            t = torch.randint(0, 1000, (batch,), device=dev)
            noise = torch.randn_like(z)
            with amp:
                eps = unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=context).sample
            torch.nn.functional.mse_loss(eps.float(), noise).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        dt = timed(one, dev, steps)
        ips = batch * steps / dt
        model_flops = 3 * flops  # forward + backward (2x forward) per image; the VQ encode not counted
    else:  # as `sample --precision P [--compile]`: the UNet in P (weights too), noise and steps in fp32
        unet.eval().requires_grad_(False).to(PRECISIONS[precision])
        if compile_unet:  # the untimed warm-up call pays the compilation
            unet = compile_module(unet)
        context = context.to(PRECISIONS[precision])
        null = torch.randn_like(context)

        @torch.no_grad()
        def generate(n_steps: int):
            d = recipe.diffusion
            sched = ldm_ddim_scheduler(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end)
            sched.set_timesteps(n_steps)
            x = torch.randn(batch, channels, size // f, size // f, device=dev)
            ctx = torch.cat([null, context])
            for t in sched.timesteps:
                x_in = torch.cat([x, x]).to(ctx.dtype)
                eps_u, eps_c = unet(x_in, t, encoder_hidden_states=ctx).sample.float().chunk(2)
                x = sched.step(classifier_free_guidance(eps_u, eps_c, 1.75), t, x).prev_sample
            return ae.decode(x).sample

        dt = timed(lambda: generate(steps), dev, warm_up=lambda: generate(2))
        ips = batch / dt  # images per second for `steps` guided DDIM steps + decoding
        model_flops = 2 * steps * flops  # two UNet passes ([∅; y]) per step; the decoder not counted
    return {"model": model_key, "recipe": ldm_name, "autoencoder": ae_name, "unet_params_M": round(params, 1),
            "phase": phase, "size": size, "latent": f"{size // f}x{size // f}x{channels}", "batch": batch, "steps": steps,
            "precision": precision, "compiled": compile_unet and phase == "sample",
            "gradient_checkpointing": checkpointing and phase != "sample", "device": dev, "seconds": round(dt, 2),
            "images_per_s": round(ips, 3),
            "unet_forward_GFLOP": round(flops / 1e9, 1), **utilisation(model_flops, ips, peak_tflops), **peak_memory(dev)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["paper", "tiny", "both"], default="both")
    ap.add_argument("--phases", default="train,train+encode,sample", help="comma-separated: train, train+encode, sample")
    ap.add_argument("--batch", type=int, default=None, help="default: 4 on CPU, 48 (the paper's per-GPU) on GPU")
    ap.add_argument("--train-steps", type=int, default=None, help="timed optimisation steps (default 2 CPU / 20 GPU)")
    ap.add_argument("--sample-steps", type=int, default=None, help="timed guided DDIM steps (default 5 CPU / 50 GPU)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default=None, help="default fp32 on CPU, bf16 on GPU")
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="the device's peak TFLOP/s at this precision, for MFU (default on a GPU: 800, an H200's bf16 "
                         "dense rate as the speed issue takes it; on a CPU: none)")
    ap.add_argument("--compile", action="store_true",
                    help="sample phase: torch.compile the UNet as `sample --compile` does (compilation in the warm-up)")
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="train phases: the recipe option train.gradient_checkpointing (memory for recomputation)")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    gpu = torch.cuda.is_available()
    batch = args.batch or (48 if gpu else 4)
    precision = args.precision or ("bf16" if gpu else "fp32")
    peak = args.peak_tflops or (800.0 if gpu else None)
    if args._child:
        model_key, phase = args._child
        steps = args.train_steps if phase.startswith("train") else args.sample_steps
        print(json.dumps(measure(model_key, phase, batch, steps, precision, peak, args.compile,
                                 args.gradient_checkpointing)))
        return
    train_steps = args.train_steps or (20 if gpu else 2)
    sample_steps = args.sample_steps or (50 if gpu else 5)
    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d')}  command: {' '.join(sys.argv)}")
    keys = ["paper", "tiny"] if args.model == "both" else [args.model]
    for key in keys:
        for phase in args.phases.split(","):
            cmd = [sys.executable, __file__, "--batch", str(batch), "--precision", precision, "--train-steps",
                   str(train_steps), "--sample-steps", str(sample_steps), "--_child", key, phase]
            if peak:
                cmd[-3:-3] = ["--peak-tflops", str(peak)]
            if args.compile:
                cmd[-3:-3] = ["--compile"]
            if args.gradient_checkpointing:
                cmd[-3:-3] = ["--gradient-checkpointing"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{key} {phase}: FAILED\n{res.stderr[-2000:]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            what = {"train": "train images/s (cached latents)", "train+encode": "train images/s (+ VQ encode)",
                    "sample": f"sample images/s (DDIM {r['steps']} steps, CFG, + decode)"}[phase]
            print(f"{key:5s} (UNet {r['unet_params_M']} M params, latents {r['latent']}) {what}: {r['images_per_s']:.3f} "
                  f"at {r['size']} px, batch {r['batch']}, {r['precision']}{', compiled' if r['compiled'] else ''}"
                  f"{', gradient checkpointing' if r['gradient_checkpointing'] else ''}, peak {r['peak_mem_GiB']} GiB ({r['peak_mem_kind']}); "
                  f"UNet forward {r['unet_forward_GFLOP']} GFLOP/image, {r['model_TFLOP_per_s']} model TFLOP/s"
                  + (f", MFU {r['mfu']:.1%} of {r['peak_TFLOP_per_s']:g}" if "mfu" in r else ""))
            print("  json:", json.dumps(r))


if __name__ == "__main__":
    main()
