"""How the denoiser runs, for every method alike: precision, compilation and DeepCache (issue 13, item 2).

* ``with precision("bf16"): ...``: every denoiser (UNet) call of :func:`~histosynth.diffusion.sampling_loop.denoise`
  in the block runs under torch autocast on its device (:func:`denoiser_autocast`); its output is cast back to the
  sample's float32 before guidance and the scheduler's step, and everything else (the VAE's decoding, conditioners,
  ZoomLDM's condition sampler) stays float32, where fp16 would overflow. ``"fp32"`` is no autocast. On a CPU without
  native bf16 (AVX2 only) bf16 is emulated and slower: it exists there for checking, not for speed.
* ``active_precision()``: the precision in force (recorded by the sample writer in a run's settings and rows).
* ``compile_denoiser(pipe)``: ``pipe.unet = torch.compile(pipe.unet)`` (diffusers' recipe); the first batch pays the
  compilation, later ones run the compiled graph. The images are those of the eager model up to float rounding.
* ``deep_cache(unet, interval)``: DeepCache (Ma et al., CVPR 2024, Sec. 3.2-3.3, uniform 1:N strategy with the skip
  branch at the shallowest level): the whole UNet runs every ``interval``-th step; in between only its first down
  block and last up block run and the deeper blocks' outputs are those of the last full step. Works on any UNet
  with ``down_blocks`` / ``mid_block`` / ``up_blocks`` (diffusers' and NASDM's SemanticUNet); its quality cost is
  measured in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_PRECISION = contextvars.ContextVar("histosynth_precision", default="fp32")


@contextlib.contextmanager
def precision(name: str = "fp32"):
    """A block whose denoiser calls run at precision ``name`` (``"fp32"``, ``"bf16"`` or ``"fp16"``).

    Raises:
        ValueError: ``name`` is not one of ``PRECISIONS``.
    """
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {name!r}")
    token = _PRECISION.set(name)
    try:
        yield
    finally:
        _PRECISION.reset(token)


def active_precision() -> str:
    """The precision of the enclosing :func:`precision` block (``"fp32"`` outside any)."""
    return _PRECISION.get()


def denoiser_autocast(device) -> contextlib.AbstractContextManager:
    """torch autocast on ``device``'s type at the active precision, or nothing at fp32."""
    dtype = PRECISIONS[_PRECISION.get()]
    return contextlib.nullcontext() if dtype is None else torch.autocast(torch.device(device).type, dtype=dtype)


def compile_denoiser(pipe, *, mode: str | None = None, dynamic: bool | None = None, backend: str = "inductor"):
    """Replace ``pipe.unet`` by ``torch.compile(pipe.unet, mode=mode, dynamic=dynamic, backend=backend)``; return
    ``pipe``. ``mode``: torch.compile's (None = "default"; "max-autotune" on a GPU for long runs). A pipeline whose
    denoiser is already compiled is left as it is.
    """
    if not isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule):
        pipe.unet = torch.compile(pipe.unet, mode=mode, dynamic=dynamic, backend=backend)
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
