"""Schedulers (samplers): DDIM, LCM, Euler, Euler ancestral, DPM-Solver++ 2M (and its SDE variant),
PNDM/PLMS, UniPC, Heun and LMS, step for step as diffusers 0.42.1.

Every scheduler is built from a checkpoint's `scheduler/scheduler_config.json` (or another
scheduler's `.config`) and is used the same way:

    scheduler.set_timesteps(25, device)     # or timesteps=[...] / sigmas=[...] where diffusers takes them
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_output = unet(scheduler.scale_model_input(x, t), t, ...)
        x = scheduler.step(model_output, t, x, generator=g).prev_sample

Notation (DDPM): the training process makes x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps with
abar_t = prod_{s<=t} (1 - beta_s), t = 0..T-1. Euler and DPM-Solver work with the noise level
sigma_t = sqrt((1 - abar_t) / abar_t) instead. The UNet predicts eps ("epsilon"),
v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_0 ("v_prediction", SD-2.x 768 px) or x_0 ("sample").

DDIM, LCM, Euler and Euler ancestral steps are stateless: a step reads the step index off the
timestep's place in `.timesteps`. The others count their steps (`step_index`; PNDM's `counter`) and
keep a history (DPM-Solver's previous x_0, UniPC's and LMS's last outputs, PNDM's, Heun's first
half-step), both reset by `set_timesteps` and `set_begin_index`: their `step` must be called once
per entry of `.timesteps` from `begin_index` on, in order (Heun's and PNDM's timesteps repeat a
value, so a timestep could not be looked up). `order` is diffusers' (Heun: 2 calls per step).

Every number is computed the way diffusers computes it (numpy float64 timesteps, float32
alphas, the same order of operations), so on the same inputs the outputs agree bit for bit.

One file a sampler: ddim.py, lcm.py, euler.py (with what the sigma-space samplers share),
euler_ancestral.py, heun.py, lms.py, dpm_solver.py, unipc.py, pndm.py; base.py holds the `Scheduler` base and the noise-schedule helpers they share. This
file has the names: the class table, A1111's sampler names, and building a scheduler from a config.
"""

from __future__ import annotations

import warnings

from ..config import ConfigError
from .base import (BETA_DEFAULTS, Scheduler, SchedulerConfig, StepOutput, betas_for, karras_sigmas, randn_tensor,
                   sigma_to_t, spaced_timesteps)
from .ddim import DDIMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler, SigmaScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .lcm import LCMScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PNDMScheduler
from .unipc import UniPCMultistepScheduler

__all__ = [
    "BETA_DEFAULTS", "ConfigError", "DDIMScheduler", "DPMSolverMultistepScheduler", "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler", "HeunDiscreteScheduler", "LCMScheduler", "LMSDiscreteScheduler", "PNDMScheduler",
    "SCHEDULERS", "SCHEDULER_NAMES", "Scheduler", "SchedulerConfig",
    "SigmaScheduler", "StepOutput", "a1111_names", "betas_for", "karras_sigmas", "randn_tensor", "scheduler_by_name",
    "scheduler_from_config", "sigma_to_t", "spaced_timesteps", "UniPCMultistepScheduler",
]

SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "lcm": LCMScheduler,
}

# Sampler names, lower-cased, as AUTOMATIC1111's web UI and this project's CLI write them: the
# class and the config overrides each means. A1111's "Karras" schedule is diffusers'
# use_karras_sigmas=True, and "DPM++ 2M" without it means the uniform one even when the
# checkpoint's config turned Karras on. "euler" and "dpm++" keep the config's own sigma schedule.
# A1111's PLMS starts without Runge-Kutta steps (diffusers' skip_prk_steps, SD's own configs);
# its "UniPC", "Heun" and "LMS" are diffusers' classes with their defaults (UniPC: bh2).
_BY_NAME = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler a": (EulerAncestralDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "dpm++": (DPMSolverMultistepScheduler, {}),
    "dpm++ 2m": (DPMSolverMultistepScheduler, dict(solver_order=2, use_karras_sigmas=False)),
    "dpm++ 2m karras": (DPMSolverMultistepScheduler, dict(solver_order=2, use_karras_sigmas=True)),
    "lcm": (LCMScheduler, {}),
    "plms": (PNDMScheduler, dict(skip_prk_steps=True)),
    "unipc": (UniPCMultistepScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "dpm++ 2m sde": (DPMSolverMultistepScheduler,
                     dict(solver_order=2, algorithm_type="sde-dpmsolver++", use_karras_sigmas=False)),
    "dpm++ 2m sde karras": (DPMSolverMultistepScheduler,
                            dict(solver_order=2, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)),
}
SCHEDULER_NAMES = ["DDIM", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "LCM", "PLMS", "UniPC", "Heun", "LMS",
                   "DPM++ 2M SDE", "DPM++ 2M SDE Karras", "euler_a", "euler-a", "dpm++"]


def scheduler_by_name(name: str, config: dict) -> Scheduler:
    """The scheduler a sampler name (case-insensitive, A1111 spellings included) means, built
    from `config` (a checkpoint's scheduler config or `pipe.scheduler.config`) as
    `Class.from_config(config, **overrides)`."""
    if not isinstance(name, str):
        raise TypeError(f"a scheduler name must be a string, got {type(name).__name__}")
    if name.strip().lower() not in _BY_NAME:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULER_NAMES)} (any case)")
    cls, overrides = _BY_NAME[name.strip().lower()]
    return cls.from_config(config, **overrides)


def a1111_names(scheduler: Scheduler) -> tuple[str, str]:
    """(sampler, schedule type) as AUTOMATIC1111 writes them in a PNG's parameters, such as
    ("DPM++ 2M", "Karras") or ("Euler a", "Automatic")."""
    karras = "Karras" if scheduler.config.get("use_karras_sigmas") else "Automatic"
    if isinstance(scheduler, DPMSolverMultistepScheduler) and scheduler.config.algorithm_type == "sde-dpmsolver++":
        return "DPM++ 2M SDE", karras
    for cls, sampler in ((DDIMScheduler, "DDIM"), (EulerAncestralDiscreteScheduler, "Euler a"),
                         (EulerDiscreteScheduler, "Euler"), (DPMSolverMultistepScheduler, "DPM++ 2M"),
                         (LCMScheduler, "LCM"), (PNDMScheduler, "PLMS"), (UniPCMultistepScheduler, "UniPC"),
                         (HeunDiscreteScheduler, "Heun"), (LMSDiscreteScheduler, "LMS")):
        if isinstance(scheduler, cls):
            return sampler, karras
    raise TypeError(f"a1111_names takes a mini_tgate scheduler, got {type(scheduler).__name__}")


def scheduler_from_config(config: dict) -> Scheduler:
    """The scheduler a checkpoint's scheduler_config.json names (SD-1.5's PNDMScheduler included);
    DDIM on the same beta schedule (with a warning) for a class not implemented here."""
    if not isinstance(config, dict):
        raise ConfigError(f"a scheduler config must be a JSON object, got {type(config).__name__}")
    name = config.get("_class_name", "DDIMScheduler")
    if not isinstance(name, str):
        raise ConfigError(f"the scheduler config's _class_name must be a string, got {name!r}")
    classes = [*SCHEDULERS.values(), EulerAncestralDiscreteScheduler, PNDMScheduler, UniPCMultistepScheduler,
               HeunDiscreteScheduler, LMSDiscreteScheduler]
    cls = {c.__name__: c for c in classes}.get(name)
    if cls is None:
        warnings.warn(f"{name} is not implemented in mini_tgate; using DDIMScheduler with its beta schedule")
        cls = DDIMScheduler
    return cls.from_config(config)
