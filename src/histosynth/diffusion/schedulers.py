"""The noise schedulers of the methods (diffusers schedulers), and the sampling schedulers a pipeline can swap in by
name.

Training builds each method's forward process from its recipe's named fields (:func:`ddpm_scheduler`,
:func:`ldm_ddim_scheduler`). Sampling takes any scheduler of :data:`SCHEDULERS` the way diffusers does: the new one is
made from the pipeline's scheduler *config* (``cls.from_config(pipe.scheduler.config)``), so the schedule it was
trained with (T, β range, β schedule, prediction type, timestep spacing and offset) carries over and only the solver
changes. Every scheduler here makes exactly one model evaluation per step (Heun, KDPM2 and PNDM's Runge-Kutta warm-up
make several and are left out, so ``--steps N`` is always N UNet passes, 2N with guidance).
"""

from __future__ import annotations

import typing

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DEISMultistepScheduler, DPMSolverMultistepScheduler,
                       EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, LMSDiscreteScheduler,
                       UniPCMultistepScheduler)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from histosynth.errors import HistosynthError
from histosynth.recipes.base import SchedulerName

# name → (diffusers class, the settings that make it that solver); everything else comes from the model's config
SCHEDULERS: dict[str, tuple[type, dict]] = {
    "ddpm": (DDPMScheduler, {}),  # ancestral sampling (Ho et al. 2020); NASDM's paper sampler (250 steps)
    "ddim": (DDIMScheduler, {}),  # Song et al. 2021; LDM's, PathLDM's, ZoomLDM's and DISC's paper sampler
    "dpm-solver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),  # 2M
    "sde-dpm-solver++": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {"solver_order": 2}),  # UniPC (Zhao et al. 2023), bh2
    "deis": (DEISMultistepScheduler, {"solver_order": 2, "algorithm_type": "deis"}),  # not a DPM config's type
    "euler": (EulerDiscreteScheduler, {}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
}

if set(SCHEDULERS) != set(typing.get_args(SchedulerName)):  # the recipes' choices are these names
    raise RuntimeError("SCHEDULERS and recipes.base.SchedulerName name different schedulers")


def sampling_scheduler(name: str, config) -> SchedulerMixin:
    """The scheduler ``name`` (a key of :data:`SCHEDULERS`) on the schedule of ``config`` (a scheduler's config: the
    model's). ``ddim`` on NASDM's DDPM config keeps its clipping to [-1, 1] (``clip_sample`` carries over).

    Raises:
        HistosynthError: an unknown name (the message lists the known ones).
    """
    if name not in SCHEDULERS:
        raise HistosynthError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    cls, settings = SCHEDULERS[name]
    scheduler = cls.from_config(config, **settings)
    _check_prediction_type(scheduler, name)
    return scheduler


def _check_prediction_type(scheduler: SchedulerMixin, name: str) -> None:
    """HistosynthError when this solver cannot step the model's kind of output (diffusers says so only at the first
    step: Euler-ancestral has no x0 ("sample") prediction, e.g. for ZoomLDM's condition sampler). ε is every
    solver's, so only other prediction types are probed, with one step on a zero tensor."""
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction == "epsilon":
        return
    probe = type(scheduler).from_config(scheduler.config)
    probe.set_timesteps(2)
    x, t = torch.zeros(1, 1, 2, 2), probe.timesteps[0]
    try:
        probe.step(x, t, probe.scale_model_input(x, t))
    except (NotImplementedError, ValueError) as exc:
        raise HistosynthError(f"the {name} scheduler cannot step a model that predicts {prediction!r} "
                              f"({str(exc).splitlines()[0]}); choose another") from None


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """The :data:`SCHEDULERS` name of a scheduler object (its class and solver settings), or its class name."""
    for name, (cls, settings) in SCHEDULERS.items():
        if type(scheduler) is cls and all(scheduler.config.get(k) == v for k, v in settings.items()):
            return name
    return type(scheduler).__name__


def ddpm_scheduler(diffusion, *, variance_type: str = "fixed_small", clip_sample: bool = False) -> DDPMScheduler:
    """The forward process of a recipe's ``diffusion`` section (num_train_timesteps, beta_schedule, beta_start,
    beta_end, and prediction_type when it has one). NASDM: learned-range variance and clipping to [-1, 1]."""
    return DDPMScheduler(num_train_timesteps=diffusion.num_train_timesteps, beta_schedule=diffusion.beta_schedule,
                         beta_start=diffusion.beta_start, beta_end=diffusion.beta_end, variance_type=variance_type,
                         clip_sample=clip_sample, prediction_type=getattr(diffusion, "prediction_type", "epsilon"))


def ldm_ddim_scheduler(num_train_timesteps: int, beta_schedule: str, beta_start: float, beta_end: float,
                       prediction_type: str = "epsilon") -> DDIMScheduler:
    """DDIM as LDM's sampler: timesteps 1 + k·⌊T/n⌋ ("leading" spacing, steps_offset 1), the last step going to
    ᾱ of t = 0 (set_alpha_to_one false), no clipping."""
    return DDIMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start,
                         beta_end=beta_end, prediction_type=prediction_type, clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")


def use_scheduler(pipe, name: str | None, component: str = "scheduler") -> str:
    """Swap the pipeline's scheduler ``component`` (``pipe.scheduler``; ZoomLDM's ``condition_scheduler`` too) for the
    scheduler ``name`` on the same schedule; return the name of the one in use (for manifests). None: the one the
    saved recipe names (``sampling.<component>``, for pipelines exported before the export saved it), else keep the
    pipeline's own (NASDM's trained DDPM; a latent model's recipe choice, DDIM by default).

    Raises:
        HistosynthError: an unknown name, or a solver that cannot step that model's prediction type.
    """
    name = name or (pipe.config.get("sampling") or {}).get(component)
    if name is not None:
        setattr(pipe, component, sampling_scheduler(name, getattr(pipe, component).config))
    return scheduler_name(getattr(pipe, component))
