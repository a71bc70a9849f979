"""HistoSmith throughput: the joint autoencoder (train step, encode, decode of both heads) and the count-conditioned
LDM (train step on cached latents, DDIM sampling with CFG), images/s at 256 px and peak memory, paper-size and tiny.

    python benchmarks/histosmith.py                                 # both sizes, every phase, CPU or the first GPU
    python benchmarks/histosmith.py --model tiny --phases sample --sample-steps 50
    python benchmarks/histosmith.py --pipeline runs/histosmith-tiny --num 16   # a trained run: where sampling time goes

Models: "paper" is histosmith-256 with histosmith-vq (VQ-f4 size), "tiny" histosmith-tiny-cpu with
histosmith-vq-tiny-cpu; K = 4 nucleus types, T = 1 tissue (CoNSeP). Each phase runs in its own subprocess (peak
memory is its own), on synthetic tensors of the right shapes. ``--pipeline`` times a trained pipeline on real
requests and splits a batch's time into denoising, decoding, instance recovery and writing the two label layouts
(the "export" the issue bounds at < 10 % of sampling).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine_info import machine, peak_memory, timed

MODELS = {"paper": ("histosmith-256", "histosmith-vq"), "tiny": ("histosmith-tiny-cpu", "histosmith-vq-tiny-cpu")}
CLASSES = ("other", "inflammatory", "epithelial", "spindle-shaped")


def measure(model_key: str, phase: str, batch: int, steps: int) -> dict:
    import torch

    from histosynth.diffusion.guidance import classifier_free_guidance
    from histosynth.diffusion.joint_autoencoder_loss import joint_autoencoder_loss
    from histosynth.diffusion.schedulers import ddpm_scheduler, ldm_ddim_scheduler
    from histosynth.recipes import load_recipe
    from histosynth.training.histosmith import make_count_unet
    from histosynth.training.histosmith_autoencoder import make_joint_model

    ldm_name, ae_name = MODELS[model_key]
    recipe, ae_recipe = load_recipe(ldm_name), load_recipe(ae_name)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    size, k = recipe.patch_size, len(CLASSES)
    ae = make_joint_model(ae_recipe, CLASSES).to(dev)
    f, c = 2 ** (len(ae.config.block_out_channels) - 1), ae_recipe.model.diffusion_channels
    width = k + 1
    unet = make_count_unet(recipe, c, size // f, width).to(dev)
    params = {"unet_params_M": round(sum(p.numel() for p in unet.parameters()) / 1e6, 1),
              "ae_params_M": round(sum(p.numel() for p in ae.parameters()) / 1e6, 1)}
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    x = torch.rand(batch, 5 + k, size, size, device=dev) * 2 - 1
    if phase == "ae-train":
        crop = ae_recipe.patch_size
        opt = torch.optim.AdamW(ae.parameters(), lr=1e-4)
        xc = x[..., :crop, :crop]

        def one():
            a, logits, vq, _ = ae.reconstruct(xc)
            loss, _ = joint_autoencoder_loss(xc, a, logits, vq, cfg=ae_recipe.loss, perceptual=None)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        dt, n = timed(one, dev, steps), batch * steps
        size = crop
    elif phase == "ae-encode":
        ae.eval().requires_grad_(False)
        dt, n = timed(lambda: ae.encode(x).latents, dev, steps), batch * steps
    elif phase == "ae-decode":
        ae.eval().requires_grad_(False)
        z = torch.randn(batch, c, size // f, size // f, device=dev)
        dt, n = timed(lambda: ae.decode_heads(z), dev, steps), batch * steps
    elif phase == "train":
        sched, opt = ddpm_scheduler(recipe.diffusion), torch.optim.AdamW(unet.parameters(), lr=1e-4)
        labels = torch.rand(batch, width, device=dev)

        def one():
            z = torch.randn(batch, c, size // f, size // f, device=dev)
            t = torch.randint(0, 1000, (batch,), device=dev)
            noise = torch.randn_like(z)
            eps = unet(sched.add_noise(z, noise, t), t, encoder_hidden_states=None, class_labels=labels).sample
            torch.nn.functional.mse_loss(eps, noise).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        dt, n = timed(one, dev, steps), batch * steps
    else:  # sample: guided DDIM + decoding both heads
        unet.eval().requires_grad_(False)
        ae.eval().requires_grad_(False)
        labels = torch.rand(2 * batch, width, device=dev)

        @torch.no_grad()
        def generate(n_steps: int):
            d = recipe.diffusion
            sched = ldm_ddim_scheduler(d.num_train_timesteps, d.beta_schedule, d.beta_start, d.beta_end)
            sched.set_timesteps(n_steps)
            z = torch.randn(batch, c, size // f, size // f, device=dev)
            for t in sched.timesteps:
                eps_u, eps_c = unet(torch.cat([z, z]), t, encoder_hidden_states=None, class_labels=labels).sample.chunk(2)
                z = sched.step(classifier_free_guidance(eps_u, eps_c, 2.0), t, z).prev_sample
            return ae.decode_heads(z)

        dt, n = timed(lambda: generate(steps), dev, warm_up=lambda: generate(2)), batch
    return {"model": model_key, "recipe": ldm_name, "autoencoder": ae_name, **params, "phase": phase, "size": size,
            "batch": batch, "steps": steps, "device": dev, "seconds": round(dt, 2), "images_per_s": round(n / dt, 3),
            **peak_memory(dev)}


def profile_pipeline(run: str, num: int, steps: int | None) -> None:
    """Split the sampling time of a trained pipeline: denoise + decode (the pipeline call without labels) vs
    instance recovery vs writing both layouts."""
    import numpy as np
    import torch

    from histosynth.data.formats.writers import write_folder_item, write_hovernet_item
    from histosynth.data.nuclei_maps import PostprocessConfig, instances_from_maps
    from histosynth.pipelines.histosmith import HistoSmithPipeline

    pipe = HistoSmithPipeline.from_pretrained(run)
    counts = [2, 10, 10, 10] + [10] * max(0, len(pipe.class_names) - 4)  # CoNSeP's K = 4: few "other" nuclei
    requests = [dict(zip(pipe.class_names, counts))] * num
    t0 = time.perf_counter()
    out = pipe(requests, tissue=pipe.tissues[0], generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
               progress=False)  # a model of several tissues needs one named
    total = time.perf_counter() - t0
    # recovery again on the same decoded maps is not available from the output; time it from the output maps
    probs = [np.stack([t == 0] + [t == k for k in range(1, len(pipe.class_names) + 1)]).astype(np.float32)
             for t in out.type_maps]
    t1 = time.perf_counter()
    for p, d in zip(probs, out.distance_maps):
        instances_from_maps(p, d, PostprocessConfig(**pipe.config.postprocess), probabilities=True)
    recovery = time.perf_counter() - t1
    with tempfile.TemporaryDirectory() as tmp:
        t2 = time.perf_counter()
        for i, (img, inst, typ) in enumerate(zip(out.images, out.inst_maps, out.type_maps)):
            write_folder_item(Path(tmp) / "folder", f"{i:05d}", img, inst, typ)
            write_hovernet_item(Path(tmp) / "hovernet", f"{i:05d}", img, inst, typ)
        writing = time.perf_counter() - t2
    print(f"machine: {machine()}")
    print(f"pipeline {run}: {num} images, {out.num_steps_run} DDIM steps: {total:.1f} s in the pipeline call "
          f"({num / total:.3f} images/s), of which instance recovery ~{recovery:.2f} s; writing both label layouts "
          f"{writing:.2f} s; export (recovery + writing) = {100 * (recovery + writing) / (total + writing):.1f} % of sampling")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=["paper", "tiny", "both"], default="both")
    ap.add_argument("--phases", default="ae-train,ae-encode,ae-decode,train,sample")
    ap.add_argument("--batch", type=int, default=None, help="default: 4 on CPU, 32 on GPU")
    ap.add_argument("--train-steps", type=int, default=None, help="timed steps (default 2 CPU / 20 GPU)")
    ap.add_argument("--sample-steps", type=int, default=None, help="timed guided DDIM steps (default 5 CPU / 50 GPU)")
    ap.add_argument("--pipeline", default=None, help="a trained HistoSmith run: profile its sampling instead")
    ap.add_argument("--num", type=int, default=8, help="with --pipeline: images")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pipeline:
        profile_pipeline(args.pipeline, args.num, args.sample_steps)
        return
    import torch

    gpu = torch.cuda.is_available()
    batch = args.batch or (32 if gpu else 4)
    train_steps, sample_steps = args.train_steps or (20 if gpu else 2), args.sample_steps or (50 if gpu else 5)
    if args._child:
        key, phase = args._child
        print(json.dumps(measure(key, phase, batch, sample_steps if phase == "sample" else train_steps)))
        return
    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d')}  command: {' '.join(sys.argv)}")
    for key in (["paper", "tiny"] if args.model == "both" else [args.model]):
        for phase in args.phases.split(","):
            cmd = [sys.executable, __file__, "--batch", str(batch), "--train-steps", str(train_steps), "--sample-steps",
                   str(sample_steps), "--_child", key, phase]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                print(f"{key} {phase}: FAILED\n{res.stderr[-2000:]}")
                continue
            r = json.loads(res.stdout.strip().splitlines()[-1])
            print(f"{key:5s} {phase:9s} {r['images_per_s']:8.3f} images/s at {r['size']} px, batch {r['batch']}, "
                  f"{r['steps']} steps, peak {r['peak_mem_GiB']} GiB ({r['peak_mem_kind']}); UNet {r['unet_params_M']} M, "
                  f"AE {r['ae_params_M']} M")
            print("  json:", json.dumps(r))


if __name__ == "__main__":
    main()
