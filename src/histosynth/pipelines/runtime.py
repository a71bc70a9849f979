"""How a pipeline runs, for every method alike: numeric precision and a compiled denoiser (issue 13, item 2).

* ``precision("cuda", "bf16")``: a context in which the matrix products and convolutions run under torch autocast
  (weights stay float32; the scheduler's arithmetic stays float32, as the model output is promoted when it meets the
  float32 sample). ``"fp32"`` is no autocast at all. On a CPU without native bf16 (AVX2 only) bf16 is emulated and
  slower: it exists there for checking, not for speed (docs/benchmarks.md).
* ``compile_denoiser(pipe)``: ``pipe.unet = torch.compile(pipe.unet)`` (diffusers' recipe); the first batch pays the
  compilation, later ones run the compiled graph. The images are those of the eager model up to float rounding.
* ``active_precision(device)``: the precision in force now (``"bf16"``, ``"fp16"`` or ``"fp32"``), which the sample
  writer records in a run's settings and manifest.
* ``deep_cache(unet, interval)``: DeepCache (Ma et al., CVPR 2024, Sec. 3.2-3.3, uniform 1:N strategy with the skip
  branch at the shallowest level): the whole UNet runs every ``interval``-th step; in between only its first down
  block and last up block run and the deeper blocks' outputs are those of the last full step. Works on any UNet
  with ``down_blocks`` / ``mid_block`` / ``up_blocks`` (diffusers' and NASDM's SemanticUNet); its quality cost is
  measured in docs/benchmarks.md.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16"}


def _device_type(device) -> str:
    return torch.device(device).type


def precision(device, name: str = "fp32") -> contextlib.AbstractContextManager:
    """A context running the work on ``device`` (``torch.device`` or its string) at precision ``name``.

    Raises:
        ValueError: ``name`` is not one of ``PRECISIONS``.
    """
    if name not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {name!r}")
    dtype = PRECISIONS[name]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(_device_type(device), dtype=dtype)


def active_precision(device) -> str:
    """``"bf16"`` / ``"fp16"`` inside :func:`precision`'s autocast for this device's type, else ``"fp32"``."""
    kind = _device_type(device)
    if not torch.is_autocast_enabled(kind):
        return "fp32"
    return _NAMES.get(torch.get_autocast_dtype(kind), str(torch.get_autocast_dtype(kind)))


def compile_denoiser(pipe, *, mode: str | None = None, dynamic: bool | None = None):
    """Replace ``pipe.unet`` by ``torch.compile(pipe.unet, mode=mode, dynamic=dynamic)`` and return ``pipe``.

    ``mode``: torch.compile's (None = "default"; "max-autotune" on a GPU for long runs). A pipeline whose denoiser is
    already compiled is left as it is.
    """
    if not isinstance(pipe.unet, torch._dynamo.eval_frame.OptimizedModule):
        pipe.unet = torch.compile(pipe.unet, mode=mode, dynamic=dynamic)
    return pipe


class deep_cache:  # noqa: N801 (a context manager, used as a function)
    """``with deep_cache(pipe.unet, interval=3): ...`` — reuse the deep UNet features across steps (DeepCache).

    A step is full (every block runs and the deep blocks' outputs are kept) when ``interval`` calls have passed since
    the last full one, when the timestep does not decrease (a new trajectory, i.e. the next batch, begins) or when the
    input's shape changes; otherwise the blocks below the first level return their kept outputs. ``interval`` 1 is the
    model itself. The UNet is restored on exit. ``unet.deep_cache_interval`` says the interval in force (the sample
    writer records it).

    Raises:
        ValueError: interval < 1, or a UNet without ``down_blocks`` / ``up_blocks`` of at least two levels.
    """

    def __init__(self, unet, interval: int):
        if interval < 1:
            raise ValueError(f"the DeepCache interval must be at least 1, got {interval}")
        if len(getattr(unet, "down_blocks", ())) < 2 or len(getattr(unet, "up_blocks", ())) < 2:
            raise ValueError(f"DeepCache needs a UNet with down_blocks and up_blocks of two levels or more, got "
                             f"{type(unet).__name__}")
        self.unet, self.interval = getattr(unet, "_orig_mod", unet), interval
        deep = [*unet.down_blocks[1:], *([unet.mid_block] if getattr(unet, "mid_block", None) else []),
                *unet.up_blocks[:-1]]
        self.deep = [getattr(b, "_orig_mod", b) for b in deep]
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
    return int(getattr(getattr(unet, "_orig_mod", unet), "deep_cache_interval", 1))
