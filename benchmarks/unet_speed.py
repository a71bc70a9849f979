"""The paper-size PathLDM UNet's forward and forward + backward time on this machine, ours against the released
reference code (CompVis latent-diffusion's openaimodel.UNetModel, cin256-v2 configuration with a 512-d context),
alternating in one process (issue 13, item 5).

    pip install einops omegaconf   # the reference code needs them (not histosynth)
    git clone https://github.com/CompVis/latent-diffusion /tmp/ldm-ref
    python benchmarks/unet_speed.py --reference /tmp/ldm-ref --variants fp32,channels-last,compile

Batch 2 of 64×64×3 latents, a 154×512 context (PathLDM's), fp32 unless a variant says otherwise; medians of
``--repeats`` timings after one warm-up each; every variant of ours and the reference take turns in each repeat.
Variants of ours: fp32 (as trained), channels-last (model and input in torch.channels_last), compile
(torch.compile, inductor), bf16 (autocast: only where the CPU has native bf16, else emulated and slower).

Also printed: the FLOPs of one forward (torch.utils.flop_counter; a multiply-add is 2 FLOPs) and the rate of this
machine's fp32 matrix products (a 4096² matmul, the best the CPU's BLAS does), so each time reads as a fraction of what
the cores can do: a time that would need more than that rate is out of reach without computing less.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from machine_info import machine

REFERENCE_PARAMS = dict(image_size=64, in_channels=3, out_channels=3, model_channels=192, attention_resolutions=[8, 4, 2],
                        num_res_blocks=2, channel_mult=[1, 2, 3, 5], num_heads=1, use_spatial_transformer=True,
                        transformer_depth=1, context_dim=512)  # configs/latent-diffusion/cin256-v2.yaml, context 512


def ours(variant: str):
    from histosynth.recipes import load_recipe
    from histosynth.training.latent import make_unet

    torch.manual_seed(0)
    unet = make_unet(load_recipe("pathldm-256"), 3, 64)
    if variant == "channels-last":
        unet = unet.to(memory_format=torch.channels_last)
    call = lambda x, t, c: unet(x, t, encoder_hidden_states=c).sample  # noqa: E731
    if variant == "compile":
        call = torch.compile(call)
    return unet, call


def reference(path: str):
    sys.path.insert(0, path)
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    torch.manual_seed(0)
    unet = UNetModel(**REFERENCE_PARAMS)
    return unet, lambda x, t, c: unet(x, t, context=c)


def timings(call, params, batch: int, variant: str, backward: bool) -> float:
    x = torch.randn(batch, 3, 64, 64)
    if variant == "channels-last":
        x = x.contiguous(memory_format=torch.channels_last)
    t = torch.randint(0, 1000, (batch,))
    c = torch.randn(batch, 154, 512)
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=variant == "bf16"):
        if backward:
            call(x, t, c).float().square().mean().backward()
        else:
            with torch.no_grad():
                call(x, t, c)
    seconds = time.perf_counter() - start
    for p in params:
        p.grad = None
    return seconds


def forward_flops(call, batch: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        call(torch.randn(batch, 3, 64, 64), torch.randint(0, 1000, (batch,)), torch.randn(batch, 154, 512))
    return counter.get_total_flops()


def matmul_rate(size: int = 4096, repeats: int = 5) -> float:
    """fp32 FLOP/s of the best of ``repeats`` size² matrix products (the machine's attainable peak for dense work)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
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
    ap.add_argument("--variants", default="fp32,channels-last")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print("machine:", machine())
    print("command:", " ".join(sys.argv))
    models = {f"ours {v}": (ours(v), v) for v in args.variants.split(",")}
    if args.reference:
        models["reference (CompVis openaimodel)"] = (reference(args.reference), "fp32")
    for name, ((unet, _), _) in models.items():
        print(f"{name}: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters")
    results = {name: {"forward": [], "forward+backward": []} for name in models}
    for name, ((unet, call), variant) in models.items():  # warm-up (and compile) once each
        timings(call, list(unet.parameters()), args.batch, variant, False)
        timings(call, list(unet.parameters()), args.batch, variant, True)
    for _ in range(args.repeats):
        for name, ((unet, call), variant) in models.items():
            for phase, backward in (("forward", False), ("forward+backward", True)):
                results[name][phase].append(timings(call, list(unet.parameters()), args.batch, variant, backward))
    peak = matmul_rate()
    flops = {name: forward_flops(call, args.batch) for name, ((_, call), variant) in models.items() if variant != "compile"}
    print(f"\nfp32 matmul (4096²): {peak / 1e9:.0f} GFLOP/s")
    print(f"\n| model (batch {args.batch}, 64×64×3, 154×512 context) | forward GFLOP | forward s | GFLOP/s "
          "| of matmul rate | forward + backward s |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        fwd = statistics.median(r["forward"])
        f = flops.get(name, next(iter(flops.values())))
        print(f"| {name} | {f / 1e9:.1f} | {fwd:.2f} | {f / fwd / 1e9:.0f} | {f / fwd / peak:.0%} "
              f"| {statistics.median(r['forward+backward']):.2f} |")
    fastest = next(iter(flops.values())) / peak
    print(f"\nat the matmul rate, our forward's FLOPs take at least {fastest:.2f} s (forward + backward ≈ 3×: "
          f"{3 * fastest:.2f} s)")


if __name__ == "__main__":
    main()
