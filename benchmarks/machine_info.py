"""What every benchmark prints and records: the machine it ran on, and a phase's peak memory.

Imported by the scripts beside it (``python benchmarks/X.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import os
import platform


def machine() -> str:
    """CPU model, cores, torch threads, load average (timings under load are not comparable), GPU, torch."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, load avg {load}, "
            f"{dev}, torch {torch.__version__}")


def peak_memory(device: str) -> dict:
    """This process's peak memory: max allocated on the GPU, max RSS on the CPU (Linux reports KiB)."""
    import resource

    import torch

    if device == "cuda":
        return {"peak_mem_GiB": round(torch.cuda.max_memory_allocated() / 2**30, 2), "peak_mem_kind": "cuda max allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"peak_mem_GiB": round(rss, 2), "peak_mem_kind": "process max RSS"}


def timed(run, device: str, reps: int = 1, warm_up=None) -> float:
    """Seconds for ``reps`` calls of ``run`` after one untimed warm-up call (``warm_up``, default ``run``);
    on a GPU the clock stops only when the queued kernels have finished."""
    import time

    import torch

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    (warm_up or run)()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        run()
    sync()
    return time.perf_counter() - t0


def forward_flops(run) -> float:
    """FLOPs of one call of ``run`` as torch's FlopCounterMode counts them (matrix products, convolutions and
    attention; 2 per multiply-add; elementwise work not counted), for model FLOP utilisation."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        run()
    return float(counter.get_total_flops())


def utilisation(flops_per_image: float, images_per_s: float, peak_tflops: float | None) -> dict:
    """Achieved model TFLOP/s and, given the device's peak (TFLOP/s, the precision used), the model FLOP utilisation."""
    achieved = flops_per_image * images_per_s / 1e12
    out = {"model_TFLOP_per_s": round(achieved, 2)}
    if peak_tflops:
        out.update(peak_TFLOP_per_s=peak_tflops, mfu=round(achieved / peak_tflops, 3))
    return out


def throughput_options(ap) -> None:
    """The options the DISC and ZoomLDM throughput benchmarks share: --model, --batch, --train-steps, --sample-steps
    (None: 2 / 16 images, 2 / 20 training steps, 5 / 50 sampling steps on a CPU / GPU)."""
    ap.add_argument("--model", choices=["paper", "tiny", "both"], default="both")
    ap.add_argument("--batch", type=int, default=None, help="default: 2 on CPU, 16 on GPU")
    ap.add_argument("--train-steps", type=int, default=None, help="timed optimisation steps (default 2 CPU / 20 GPU)")
    ap.add_argument("--sample-steps", type=int, default=None, help="timed guided DDIM steps (default 5 CPU / 50 GPU)")
