"""The denoising loop of every pipeline, written once for any scheduler of :mod:`histosynth.diffusion.schedulers`.

    x_T ~ N(0, I)·σ_init;  for t in the scheduler's N timesteps:  x ← scheduler.step(predict(scale(x, t), t), t, x)

``predict`` is the method's model call (its conditioning and classifier-free guidance); the scheduler object decides
everything else, so a pipeline never branches on the scheduler's name (diffusers' convention).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from histosynth.diffusion.schedulers import scheduler_name
from histosynth.errors import HistosynthError


def _runs_exactly(scheduler: SchedulerMixin, num_inference_steps: int) -> bool:
    total_t = int(scheduler.config.num_train_timesteps)
    if not 1 <= num_inference_steps <= total_t:
        return False
    probe = type(scheduler).from_config(scheduler.config)
    try:
        probe.set_timesteps(num_inference_steps)
    except ValueError:
        return False
    timesteps = probe.timesteps
    return (len(timesteps) == num_inference_steps and len(set(timesteps.tolist())) == num_inference_steps
            and float(timesteps.max()) < total_t)


def max_num_steps(scheduler: SchedulerMixin) -> int:
    """The most steps whose timesteps are all distinct and within 0..T-1 under this scheduler's spacing and offset (LDM's
    "leading" spacing with steps_offset 1 at T = 1000: 999 for DDIM, as 1000 steps would start at t = 1000)."""
    for n in range(int(scheduler.config.num_train_timesteps), 0, -1):
        if _runs_exactly(scheduler, n):
            return n
    return 0


def check_num_steps(scheduler: SchedulerMixin, num_inference_steps: int,
                    option: str = "num_inference_steps (--steps)") -> None:
    """HistosynthError unless exactly ``num_inference_steps`` distinct timesteps can run on this scheduler (checked
    before anything is sampled, so a command fails before writing); ``option`` names the setting in the message."""
    if not _runs_exactly(scheduler, num_inference_steps):
        raise HistosynthError(f"{option} must be within 1..{max_num_steps(scheduler)} for this "
                              f"model's {scheduler_name(scheduler)} schedule (T = {scheduler.config.num_train_timesteps}), "
                              f"got {num_inference_steps}")


def uses_learned_variance(scheduler: SchedulerMixin) -> bool:
    """Whether this scheduler steps with a model's [ε, v] output (a DDPM or DPM-Solver with a learned variance
    type) rather than ε alone. The config alone cannot say: diffusers keeps a swapped-out scheduler's keys in it."""
    takes = "variance_type" in inspect.signature(type(scheduler).__init__).parameters
    return takes and scheduler.config.get("variance_type") in ("learned", "learned_range")


def step_kwargs(scheduler: SchedulerMixin, eta: float, generator) -> dict:
    """The keyword arguments this scheduler's ``step`` takes of (eta, generator) (as diffusers' pipelines do).

    Raises:
        HistosynthError: η ≠ 0 for a scheduler without η (only DDIM has one): never silently ignored.
    """
    accepted = inspect.signature(scheduler.step).parameters
    kwargs = {"generator": generator} if "generator" in accepted else {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    elif eta:
        raise HistosynthError(f"eta = {eta} is DDIM's; the {scheduler_name(scheduler)} scheduler has no eta (use 0)")
    return kwargs


class ModelInput:
    """The denoiser's input of every step in one buffer allocated once, so that the loop re-allocates nothing of its
    own (issue 13, item 2): ``copies`` stacked copies of the sample (2 for classifier-free guidance's batched [∅; y]
    pass, 1 without), cast to the model's ``dtype`` (``sample --precision``), then the fixed ``concat`` channels
    (DISC's one-hot mask, stacked like the copies: (copies·B, C', h, w)), written once.

    ``model_input(x)`` with x (B, C, h, w) returns the buffer (copies·B, C + C', h, w) holding this step's sample.
    The buffer is overwritten at the next call: the model must not keep it (no UNet here does).
    """

    def __init__(self, sample_shape: tuple[int, ...], copies: int, dtype: torch.dtype, device,
                 concat: torch.Tensor | None = None):
        batch, channels, *size = sample_shape
        extra = 0 if concat is None else concat.shape[1]
        self.buffer = torch.empty((copies * batch, channels + extra, *size), dtype=dtype, device=device)
        if concat is not None:
            self.buffer[:, channels:] = concat
        self.copies = self.buffer[:, :channels].unflatten(0, (copies, batch))  # views into the buffer

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.copies.copy_(x.expand_as(self.copies))  # one copy (and cast) into the buffer, no new tensor
        return self.buffer


def denoise(predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler: SchedulerMixin,
            num_inference_steps: int, noise: torch.Tensor, *, eta: float = 0.0, generator=None, progress_bar=None,
            after_step: Callable[[torch.Tensor], torch.Tensor] | None = None,
            steps_option: str = "num_inference_steps (--steps)") -> torch.Tensor:
    """``noise`` (unit Gaussian, any shape) denoised by exactly ``num_inference_steps`` steps of ``scheduler``.

    ``predict(x, t)``: the model output the scheduler steps with (ε, or [ε, v] for a learned-variance DDPM); ``x`` is
    already ``scheduler.scale_model_input``-ed. ``after_step(x) -> x`` runs after every step (DISC's fusion).
    ``progress_bar`` wraps the timesteps (a pipeline's ``self.progress_bar``), or None. The scheduler itself is not
    changed: the loop steps a fresh copy (multistep solvers keep per-run state). ``predict`` may run the model in
    another dtype (``sample --precision``): its output is cast to the sample's dtype before the step.
    ``steps_option`` names the step count in the error.

    Raises:
        HistosynthError: a step count the schedule cannot run (:func:`check_num_steps`), η ≠ 0 without DDIM.
    """
    check_num_steps(scheduler, num_inference_steps, steps_option)
    scheduler = type(scheduler).from_config(scheduler.config)
    scheduler.set_timesteps(num_inference_steps, device=noise.device)
    extra = step_kwargs(scheduler, eta, generator)
    x = noise * scheduler.init_noise_sigma
    for t in progress_bar(scheduler.timesteps) if progress_bar is not None else scheduler.timesteps:
        out = predict(scheduler.scale_model_input(x, t), t)
        # the step in the sample's dtype: several schedulers cast their result to the model output's dtype
        x = scheduler.step(out.to(x.dtype), t, x, **extra).prev_sample
        if after_step is not None:
            x = after_step(x)
    return x
