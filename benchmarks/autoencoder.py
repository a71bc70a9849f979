"""First-stage autoencoder throughput: encode and decode images/s at 256 px, and peak memory.

    python benchmarks/autoencoder.py                          # vq-f4 (PathLDM) and kl-f8, CPU or the first GPU
    python benchmarks/autoencoder.py --model vq-f4,vq-f8,kl-f8,vq-f4-tiny-cpu --batch 4 --reps 3

Models are built from the recipes (randomly initialised: speed and memory do not depend on the weights).
"encode" is image -> latent the diffusion model sees (VQ: before quantisation; KL: the posterior mode);
"decode" is latent -> image (VQ: quantise + decode), what every generated image goes through. Each (model,
phase) runs in its own subprocess so the peak memory (max RSS on CPU, max allocated on GPU) is its own.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from machine_info import machine, peak_memory, timed


def measure(recipe_name: str, phase: str, batch: int, reps: int, size: int, precision: str) -> dict:
    import torch
    from diffusers import VQModel

    from histosynth.training.autoencoder import make_model
    from histosynth.recipes import load_recipe

    recipe = load_recipe(recipe_name)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    ae = make_model(recipe).eval().to(dev)
    params = sum(p.numel() for p in ae.parameters()) / 1e6
    x = torch.rand(batch, 3, size, size, device=dev) * 2 - 1
    amp = torch.autocast(dev, dtype=torch.bfloat16, enabled=precision == "bf16")
    with torch.no_grad(), amp:
        if isinstance(ae, VQModel):
            latents = ae.encode(x).latents
            encode = lambda: ae.encode(x).latents  # noqa: E731
            decode = lambda: ae.decode(latents).sample  # noqa: E731  (quantise + decode)
        else:
            latents = ae.encode(x).latent_dist.mode()
            encode = lambda: ae.encode(x).latent_dist.mode()  # noqa: E731
            decode = lambda: ae.decode(latents).sample  # noqa: E731
        fn = encode if phase == "encode" else decode
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        dt = timed(fn, dev, reps)
    return {"model": recipe_name, "kind": recipe.model.kind, "params_M": round(params, 1), "phase": phase, "size": size,
            "latent": list(latents.shape[1:]), "batch": batch, "reps": reps, "precision": precision, "device": dev,
            "seconds": round(dt, 2), "images_per_s": round(batch * reps / dt, 3), **peak_memory(dev)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vq-f4,kl-f8", help="comma-separated autoencoder recipes")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 32 on GPU")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions (default 2 CPU / 20 GPU)")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = torch.cuda.is_available()
    batch = args.batch or (32 if gpu else 2)
    reps = args.reps or (20 if gpu else 2)
    if args._child:
        print(json.dumps(measure(*args._child, batch, reps, args.size, args.precision)))
        return
    print(f"# {machine()}", flush=True)
    for name in args.model.split(","):
        for phase in ("encode", "decode"):
            cmd = [sys.executable, __file__, "--_child", name, phase, "--size", str(args.size), "--batch", str(batch),
                   "--reps", str(reps), "--precision", args.precision]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(json.dumps({"model": name, "phase": phase, "error": out.stderr.strip().splitlines()[-1:]}))
                continue
            print(out.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
