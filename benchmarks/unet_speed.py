"""The paper-size PathLDM UNet's forward and forward + backward time on this machine, ours against the released
reference code (CompVis latent-diffusion's openaimodel.UNetModel, cin256-v2 configuration with a 512-d context),
alternating in one process (issue 13, item 5).

    pip install einops omegaconf   # the reference code needs them (not histosynth)
    git clone https://github.com/CompVis/latent-diffusion /tmp/ldm-ref
    python benchmarks/unet_speed.py --reference /tmp/ldm-ref --variants fp32,bf16-autocast,bf16,bf16-compile \
        --reference-variants fp32,bf16-autocast

Batch 2 of 64×64×3 latents, a 154×512 context (PathLDM's), fp32 unless a variant says otherwise; medians of
``--repeats`` timings after one warm-up each; every variant of ours and the reference take turns in each repeat.
Variants of ours, each the path a command takes:
  fp32            as trained and sampled by default (forward and forward + backward)
  channels-last   ``sample --channels-last`` (runtime.denoiser_channels_last: the weights NHWC, the input as the
                  pipelines give it, NCHW; the first convolution's output is NHWC); forward and forward + backward
  bf16-autocast   training's ``mixed_precision: bf16`` (torch autocast; fp32 weights): forward and forward + backward
  bf16            ``sample --precision bf16``: weights and activations in bf16 (forward only: sampling)
  compile         ``sample --compile`` (runtime.compile_module: inductor, with freezing on a CPU; forward only)
  bf16-compile    ``sample --precision bf16 --compile`` (forward only)
  bf16-channels-last  ``sample --precision bf16 --channels-last`` (forward only)
bf16 is fast only where the CPU has native bf16 (AVX-512 BF16, AMX); elsewhere it is emulated and slower.

Also printed: the FLOPs of one forward (torch.utils.flop_counter; a multiply-add is 2 FLOPs) and the rate of this
machine's fp32 and bf16 matrix products (a 4096² matmul, the best the CPU's BLAS does), so each time reads as a
fraction of what the cores can do at its precision: a time that would need more than that rate is out of reach
without computing less.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from types import SimpleNamespace

import torch

from machine_info import machine

REFERENCE_PARAMS = dict(image_size=64, in_channels=3, out_channels=3, model_channels=192, attention_resolutions=[8, 4, 2],
                        num_res_blocks=2, channel_mult=[1, 2, 3, 5], num_heads=1, use_spatial_transformer=True,
                        transformer_depth=1, context_dim=512)  # configs/latent-diffusion/cin256-v2.yaml, context 512


# weights frozen or in bf16: no training step to time
SAMPLING_ONLY = {"bf16", "compile", "bf16-compile", "bf16-channels-last"}


def ours(variant: str):
    from histosynth.diffusion.runtime import PRECISIONS, compile_module, denoiser_channels_last
    from histosynth.recipes import load_recipe
    from histosynth.training.latent import make_unet

    torch.manual_seed(0)
    unet = make_unet(load_recipe("pathldm-256"), 3, 64)
    if variant.endswith("channels-last"):
        denoiser_channels_last(SimpleNamespace(unet=unet))  # what `sample --channels-last` does to pipe.unet
    if variant in SAMPLING_ONLY:
        unet.eval().requires_grad_(False)
    if variant.startswith("bf16") and variant != "bf16-autocast":
        unet.to(PRECISIONS["bf16"])  # what `sample --precision bf16` does (runtime.denoiser_precision)
    model = compile_module(unet) if variant.endswith("compile") else unet
    return unet, lambda x, t, c: model(x, t, encoder_hidden_states=c).sample


def reference(path: str):
    sys.path.insert(0, path)
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(**REFERENCE_PARAMS)
    return unet, lambda x, t, c: unet(x, t, context=c)


def inputs(batch: int, variant: str):
    x, t, c = torch.randn(batch, 3, 64, 64), torch.randint(0, 1000, (batch,)), torch.randn(batch, 154, 512)
    if variant.startswith("bf16") and variant != "bf16-autocast":
        x, c = x.bfloat16(), c.bfloat16()  # as the pipelines cast the UNet's input to its dtype
    return x, t, c


def timings(call, params, batch: int, variant: str, backward: bool) -> float:
    x, t, c = inputs(batch, variant)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16-autocast"):
        if backward:
            call(x, t, c).float().square().mean().backward()
        else:
            with torch.no_grad():
                call(x, t, c)
    seconds = time.perf_counter() - start
    for p in params:
        p.grad = None
    return seconds


def forward_flops(call, batch: int, variant: str) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        call(*inputs(batch, variant))
    return counter.get_total_flops()


def matmul_rate(dtype=torch.float32, size: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of the best of ``repeats`` size² matrix products in ``dtype`` (the machine's attainable peak for dense
    work at that precision)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", help="a checkout of CompVis/latent-diffusion (omit: ours only)")
    ap.add_argument("--reference-variants", default="fp32",
                    help="the reference as released (fp32) and/or under bf16-autocast (the speed-ups are against fp32)")
    ap.add_argument("--variants", default="fp32,channels-last")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print("machine:", machine())
    print("command:", " ".join(sys.argv))
    models = {f"ours {v}": (ours(v), v) for v in args.variants.split(",")}
    if args.reference:
        released = reference(args.reference)
        for v in args.reference_variants.split(","):
            models["reference (CompVis openaimodel)" + ("" if v == "fp32" else f" {v}")] = (released, v)
    for name, ((unet, _), _) in models.items():
        print(f"{name}: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters")
    results = {name: {"forward": [], "forward+backward": []} for name in models}
    both = (("forward", False), ("forward+backward", True))
    phases = {name: both[:1] if variant in SAMPLING_ONLY else both for name, (_, variant) in models.items()}
    for name, ((unet, call), variant) in models.items():  # warm-up (and compile) once each
        for _, backward in phases[name]:
            timings(call, list(unet.parameters()), args.batch, variant, backward)
    for _ in range(args.repeats):
        for name, ((unet, call), variant) in models.items():
            for phase, backward in phases[name]:
                results[name][phase].append(timings(call, list(unet.parameters()), args.batch, variant, backward))
    peak = {"fp32": matmul_rate(), "bf16": matmul_rate(torch.bfloat16)}
    flops = {name: forward_flops(call, args.batch, variant) for name, ((_, call), variant) in models.items()
             if not variant.endswith("compile")}
    print(f"\nmatmul (4096²): fp32 {peak['fp32'] / 1e9:.0f} GFLOP/s, bf16 {peak['bf16'] / 1e9:.0f} GFLOP/s")
    print(f"\n| model (batch {args.batch}, 64×64×3, 154×512 context) | forward GFLOP | forward s | GFLOP/s "
          "| of the matmul rate at its precision | forward + backward s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        fwd = statistics.median(r["forward"])
        f = flops.get(name, next(iter(flops.values())))
        rate = peak["bf16" if models[name][1].startswith("bf16") else "fp32"]
        both = f"{statistics.median(r['forward+backward']):.2f}" if r["forward+backward"] else "—"
        print(f"| {name} | {f / 1e9:.1f} | {fwd:.2f} | {f / fwd / 1e9:.0f} | {f / fwd / rate:.0%} | {both} |")
    ref = results.get("reference (CompVis openaimodel)")
    if ref:  # the goal: forward >= 2x and training step >= 1.5x faster than the reference
        for name, r in results.items():
            if r is not ref:
                gain = {k: statistics.median(ref[k]) / statistics.median(v) for k, v in r.items() if v}
                print(f"{name} against the reference: " + ", ".join(f"{k} {g:.2f}x" for k, g in gain.items()))
    fastest = next(iter(flops.values())) / peak["fp32"]
    print(f"\nat the fp32 matmul rate, our forward's FLOPs take at least {fastest:.2f} s (forward + backward ≈ 3×: "
          f"{3 * fastest:.2f} s)")


if __name__ == "__main__":
    main()
