"""How the denoiser runs, for every method alike: precision, compilation and DeepCache (issue 13, item 2).

* ``denoiser_precision(pipe, "bf16")``: the denoiser (``pipe.unet``) in bf16 (or fp16), weights and activations, as
  diffusers' ``torch_dtype``; the pipelines draw their noise and step the scheduler in float32, cast the UNet's input
  to its dtype and its output back to float32 before guidance, and everything else (the VAE's decoding,
  conditioners, ZoomLDM's condition sampler) stays float32, where fp16 would overflow. On a CPU with AVX-512 BF16,
  bf16 ran the paper-size UNet's forward 1.8x faster than float32 (docs/benchmarks.md); on one without (AVX2 only)
  bf16 is emulated and slower: it exists there for checking, not for speed.
* ``denoiser_channels_last(pipe)``: the denoiser's convolution weights in channels-last (NHWC) memory format, as
  diffusers' ``pipe.unet.to(memory_format=torch.channels_last)``; a convolution with channels-last weights writes
  channels-last activations, so the whole UNet runs NHWC (cuDNN's tensor-core layout). On 2-core CPUs it was within
  ±5 % of the default, slower on the Zen 4 host (docs/benchmarks.md), and no GPU has measured it: hence an option.
  The images are the default's up to float rounding.
* ``precision_of(unet)``: the name of a denoiser's precision (recorded by the sample writer in a run's settings).
* ``compile_denoiser(pipe)``: ``pipe.unet = torch.compile(pipe.unet)`` (diffusers' recipe); on a CPU with inductor's
  freezing, which folds the weights into the graph as constants and pre-packs them for oneDNN (without it the
  compiled UNet is no faster than the eager one there). The first batch pays the compilation, later ones run the
  compiled graph. The images are those of the eager model up to float rounding.
* ``deep_cache(unet, interval)``: DeepCache (Ma et al., CVPR 2024, Sec. 3.2-3.3, uniform 1:N strategy with the skip
  branch at the shallowest level): the whole UNet runs every ``interval``-th step; in between only its first down
  block and last up block run and the deeper blocks' outputs are those of the last full step. Works on any UNet
  with ``down_blocks`` / ``mid_block`` / ``up_blocks`` (diffusers' and NASDM's SemanticUNet); its quality cost is
  measured in docs/benchmarks.md.
"""

from __future__ import annotations

import functools

import torch

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def denoiser_precision(pipe, name: str = "fp32"):
    """Cast ``pipe.unet`` (weights and buffers) to precision ``name`` (``"fp32"``, ``"bf16"`` or ``"fp16"``); return
    ``pipe``. Only the denoiser: the VAE, conditioners and ZoomLDM's condition sampler keep their dtype. Cast before
    :func:`compile_denoiser` (a frozen graph keeps the weights it was compiled with). The cast is not undone: load the
    pipeline again for float32 weights.

    Raises:
        ValueError: ``name`` is not one of ``PRECISIONS``.
    """
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {name!r}")
    if precision_of(pipe.unet) != name:  # diffusers 0.42 warns of fp32 modules at every dtype cast, a no-op one too
        pipe.unet.to(PRECISIONS[name])
    return pipe


def denoiser_channels_last(pipe):
    """Put ``pipe.unet``'s 4-d weights (convolutions) in channels-last memory format; return ``pipe``. Values, dtype
    and device are unchanged; apply before :func:`compile_denoiser`."""
    pipe.unet.to(memory_format=torch.channels_last)
    return pipe


def precision_of(unet) -> str:
    """The name (``PRECISIONS``' key) of ``unet``'s floating-point dtype: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (another
    dtype by its torch name, e.g. ``"float64"``)."""
    dtype = next((p.dtype for p in unet.parameters() if p.is_floating_point()), torch.float32)
    return next((name for name, d in PRECISIONS.items() if d == dtype), str(dtype).removeprefix("torch."))


def compile_module(module, *, mode: str | None = None, dynamic: bool | None = None, backend: str = "inductor"):
    """``torch.compile(module, mode=mode, dynamic=dynamic, backend=backend)`` for inference; with inductor on a CPU
    (and the default mode) its compilations also run with inductor's ``freezing``: the weights are folded into the
    graph as constants and pre-packed for oneDNN. So the compiled module must not be trained, nor its weights changed,
    afterwards, and every recompilation (another batch size) keeps its own copy of the weights. ``mode``:
    torch.compile's (None = "default"; "max-autotune" on a GPU for long runs)."""
    compiled = torch.compile(module, mode=mode, dynamic=dynamic, backend=backend)
    device = next((p.device for p in module.parameters()), None)
    if backend == "inductor" and mode in (None, "default") and device is not None and device.type == "cpu":
        import torch._inductor.config as inductor_config

        # set while dynamo traces and compiles (the first call, any recompilation), not process-wide; passed as
        # torch.compile(options={"freezing": True}) the paper-size UNet kept its eager speed (docs/benchmarks.md)
        traced = compiled.forward

        @functools.wraps(traced)
        def forward(*args, **kwargs):
            with inductor_config.patch(freezing=True):
                return traced(*args, **kwargs)

        compiled.forward = forward
    return compiled


def compile_denoiser(pipe, *, mode: str | None = None, dynamic: bool | None = None, backend: str = "inductor"):
    """Replace ``pipe.unet`` by :func:`compile_module` of it (``mode``, ``dynamic``, ``backend`` passed on); return
    ``pipe``. A pipeline whose denoiser is already compiled is left as it is.
    """
    if not isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule):
        pipe.unet = compile_module(pipe.unet, mode=mode, dynamic=dynamic, backend=backend)
    return pipe


class deep_cache:  # noqa: N801 (a context manager, used as a function)
    """``with deep_cache(pipe.unet, interval=3): ...`` — reuse the deep UNet features across steps (DeepCache).

    A step is full (every block runs and the deep blocks' outputs are kept) when ``interval`` calls have passed since
    the last full one, when the timestep does not decrease (a new trajectory, i.e. the next batch, begins) or when the
    input's shape changes; otherwise the blocks below the first level return their kept outputs. ``interval`` 1 is the
    model itself. The UNet is restored on exit. ``unet.deep_cache_interval`` says the interval in force (the sample
    writer records it).

    The step decision reads the timestep, so it assumes what every pipeline here does: one UNet call per step (guidance
    batched), timesteps decreasing within a trajectory.

    Raises:
        ValueError: interval < 1, a UNet without ``down_blocks`` / ``up_blocks`` of at least two levels, a compiled
            UNet (torch.compile traced the forward this replaces), or one already under ``deep_cache``.
    """

    def __init__(self, unet, interval: int):
        if interval < 1:
            raise ValueError(f"the DeepCache interval must be at least 1, got {interval}")
        if len(getattr(unet, "down_blocks", ())) < 2 or len(getattr(unet, "up_blocks", ())) < 2:
            raise ValueError(f"DeepCache needs a UNet with down_blocks and up_blocks of two levels or more, got "
                             f"{type(unet).__name__}")
        if isinstance(unet, torch._dynamo.eval_frame.OptimizedModule):
            raise ValueError("DeepCache cannot patch a torch.compile'd UNet: use one or the other")
        if hasattr(unet, "deep_cache_interval"):
            raise ValueError("this UNet is already under deep_cache")
        self.unet, self.interval = unet, interval
        self.deep = [*unet.down_blocks[1:], *([unet.mid_block] if getattr(unet, "mid_block", None) else []),
                     *unet.up_blocks[:-1]]
        self.full_calls = 0  # how many steps ran the whole UNet (for tests and benchmarks)

    def __enter__(self):
        kept: dict[int, object] = {}
        state = {"since_full": None, "timestep": None, "shape": None, "reuse": False}
        forward = self.unet.forward

        def top(sample, timestep, *args, **kwargs):
            t = float(torch.as_tensor(timestep).flatten()[0])
            new_trajectory = state["timestep"] is None or t >= state["timestep"] or state["shape"] != sample.shape
            state["reuse"] = not new_trajectory and state["since_full"] < self.interval
            state["since_full"] = 1 if not state["reuse"] else state["since_full"] + 1
            state["timestep"], state["shape"] = t, sample.shape
            self.full_calls += not state["reuse"]
            return forward(sample, timestep, *args, **kwargs)

        def cached(i, block_forward):
            def run(*args, **kwargs):
                if state["reuse"]:
                    return kept[i]
                kept[i] = block_forward(*args, **kwargs)
                return kept[i]
            return run

        self._saved = [(self.unet, self.unet.__dict__.get("forward"))] + [(b, b.__dict__.get("forward"))
                                                                          for b in self.deep]
        self.unet.forward = top
        for i, block in enumerate(self.deep):
            block.forward = cached(i, block.forward)
        self.unet.deep_cache_interval = self.interval
        return self

    def __exit__(self, *exc) -> None:
        for module, own in self._saved:
            if own is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = own
        del self.unet.deep_cache_interval


def active_deep_cache(unet) -> int:
    """The DeepCache interval in force on ``unet`` (1 = none)."""
    return int(getattr(unet, "deep_cache_interval", 1))
