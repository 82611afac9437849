"""Schedulers (samplers): DDIM, LCM, Euler, Euler ancestral and DPM-Solver++ 2M, step for step as
diffusers 0.42.1.

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
timestep's place in `.timesteps`. DPM-Solver++ 2M needs the previous step's x_0 estimate, kept in `prev_x0`
beside a step counter; both are reset by `set_timesteps`.

Every number is computed the way diffusers computes it (numpy float64 timesteps, float32
alphas, the same order of operations), so on the same inputs the outputs agree bit for bit.
"""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import torch

from .bounds import MAX_TRAIN_TIMESTEPS, PREDICTION_TYPES
from .config import ConfigError


class StepOutput(NamedTuple):
    prev_sample: torch.Tensor  # the sample at the next (less noisy) timestep: the loop's new x
    denoised: torch.Tensor  # this step's estimate of the clean x_0 (LCM: the consistency output)


class SchedulerConfig(dict):
    """A dict whose keys also read as attributes (`sched.config.steps_offset`), like diffusers'."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


# ----------------------------------------------------------------------------- shared pieces


def betas_for(config) -> torch.Tensor:
    """The training noise schedule beta_0..beta_{T-1} (float32) named by a scheduler config."""
    T, start, end = config["num_train_timesteps"], config["beta_start"], config["beta_end"]
    schedule = config["beta_schedule"]
    if config.get("trained_betas") is not None:
        betas = torch.tensor(config["trained_betas"], dtype=torch.float32)
    elif schedule == "linear":
        betas = torch.linspace(start, end, T, dtype=torch.float32)
    elif schedule == "scaled_linear":  # Stable Diffusion: linear in sqrt(beta)
        betas = torch.linspace(start**0.5, end**0.5, T, dtype=torch.float32) ** 2
    elif schedule == "squaredcos_cap_v2":  # Nichol & Dhariwal 2021 eq. 17: abar(t) = cos^2(..)
        abar = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
        betas = [min(1 - abar((i + 1) / T) / abar(i / T), 0.999) for i in range(T)]
        betas = torch.tensor(betas, dtype=torch.float32)
    else:
        raise ConfigError(
            f"beta_schedule={schedule!r} is not supported "
            "(supported: 'linear', 'scaled_linear', 'squaredcos_cap_v2', or trained_betas)"
        )
    if config.get("rescale_betas_zero_snr"):
        # Lin et al. 2023 (arXiv 2305.08891) Algorithm 1: shift and scale sqrt(abar) so that
        # it ends at exactly 0 (zero SNR at t = T-1) while keeping its first value.
        sqrt_abar = torch.cumprod(1.0 - betas, dim=0).sqrt()
        first, last = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
        abar = ((sqrt_abar - last) * (first / (first - last))) ** 2
        betas = 1 - torch.cat([abar[0:1], abar[1:] / abar[:-1]])
    return betas


def spaced_timesteps(config, n: int) -> np.ndarray:
    """n of the T training timesteps, descending, spaced as in Table 2 of arXiv 2305.08891.

    float64; "linspace" values are not rounded yet (DDIM and DPM-Solver round them, Euler not).
    """
    T, spacing = config["num_train_timesteps"], config["timestep_spacing"]
    if spacing == "linspace":  # from T-1 to 0, both included
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":  # multiples of T // n counted up from 0, then + steps_offset
        return (np.arange(n) * (T // n))[::-1].astype(np.float64) + config["steps_offset"]
    if spacing == "trailing":  # from T-1 down in strides of T / n (for some n, such as 61, the
        # float strides give n + 1 steps ending at t = -1; diffusers does the same)
        return np.round(np.arange(T, 0, -T / n)) - 1
    raise ConfigError(f"timestep_spacing={spacing!r} is not supported (use 'linspace', 'leading' or 'trailing')")


def karras_sigmas(sigma_min: float, sigma_max: float, n: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 (arXiv 2206.00364) eq. 5: n noise levels evenly spaced in sigma^(1/rho)."""
    ramp = np.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep with noise level `sigma`, interpolating linearly in log sigma."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    # the last training step whose sigma is <= sigma (log_sigmas ascend with t)
    low = np.cumsum(log_sigma - log_sigmas[:, None] >= 0, axis=0).argmax(axis=0).clip(max=len(log_sigmas) - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


def randn_tensor(shape, generator=None, device=None, dtype=None) -> torch.Tensor:
    """torch.randn drawn as diffusers' `randn_tensor` draws it, so the same generator gives the
    same noise: on the generator's device (a CPU generator serves any device), then moved; a
    list of generators draws one batch row each."""
    device = torch.device(device or "cpu")
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    if isinstance(generator, (list, tuple)):
        rows = [randn_tensor((1, *shape[1:]), g, device, dtype) for g in generator[: shape[0]]]
        return torch.cat(rows).to(device)
    draw_on = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_on, dtype=dtype).to(device)




def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def check_config_values(name: str, config: dict):
    """ConfigError for a value no schedule can be built from (diffusers crashes on most of them
    later, or silently makes NaN: negative betas)."""
    T = config["num_train_timesteps"]
    if not _is_int(T) or not 2 <= T <= MAX_TRAIN_TIMESTEPS:
        raise ConfigError(f"{name}: num_train_timesteps must be an integer from 2 to {MAX_TRAIN_TIMESTEPS}, got {T!r}")
    for key in ("beta_start", "beta_end"):
        if not _is_number(config[key]) or not 0 < config[key] < 1:
            raise ConfigError(f"{name}: {key} must be a number in (0, 1), got {config[key]!r}")
    betas = config.get("trained_betas")
    if betas is not None:
        if not isinstance(betas, (list, tuple, np.ndarray, torch.Tensor)) or len(betas) != T:
            length = len(betas) if isinstance(betas, (list, tuple, np.ndarray, torch.Tensor)) else type(betas).__name__
            raise ConfigError(f"{name}: trained_betas must be a list of num_train_timesteps={T} numbers, got {length}")
        values = np.asarray(betas, dtype=object).reshape(-1)
        if len(values) != T or not all(_is_number(b) and 0 < b < 1 for b in values.tolist()):
            raise ConfigError(f"{name}: trained_betas must all be numbers in (0, 1)")
    offset = config.get("steps_offset", 0)
    if not _is_int(offset) or not 0 <= offset < T:
        raise ConfigError(f"{name}: steps_offset must be an integer in [0, num_train_timesteps={T}), got {offset!r}")
    positive = {"clip_sample_range", "timestep_scaling", "sigma_min", "sigma_max"}
    for key in positive & config.keys():
        if config[key] is not None and (not _is_number(config[key]) or config[key] <= 0):
            raise ConfigError(f"{name}: {key} must be a positive number, got {config[key]!r}")
    steps = config.get("original_inference_steps", 1)
    if not _is_int(steps) or not 1 <= steps <= T:
        raise ConfigError(f"{name}: original_inference_steps must be an integer from 1 to num_train_timesteps={T}, "
                          f"got {steps!r}")
    for key in ("beta_schedule", "timestep_spacing"):
        if key in config and not isinstance(config[key], str):
            raise ConfigError(f"{name}: {key} must be a string, got {config[key]!r}")


def _number_list(key: str, values, most: int) -> np.ndarray:
    """A custom timesteps/sigmas argument as float64: 1-D, 1 to `most` finite numbers."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple, np.ndarray)) or not 1 <= len(values) <= most:
        raise ValueError(f"custom {key} must be a list of 1 to {most} numbers, got {values!r}")
    if not all(_is_number(v) for v in (values.tolist() if isinstance(values, np.ndarray) else values)):
        raise ValueError(f"custom {key} must be a flat list of finite numbers, got {values!r}")
    return np.asarray(values, dtype=np.float64)


class Scheduler:
    """What all schedulers share: the config, abar_t, and finding a timestep's step index.

    `defaults` holds the config keys a class reads, with diffusers' defaults. A config may carry
    more keys (another scheduler's); they are kept in `.config` and otherwise ignored.
    """

    defaults: dict = {}
    order = 1  # model evaluations per step (diffusers pipelines read it)
    init_noise_sigma = 1.0  # std of the initial noise x_T

    def __init__(self, **config):
        given = {k: v for k, v in config.items() if k != "_use_default_values"}
        self.config = SchedulerConfig({**self.defaults, **given, "_class_name": type(self).__name__})
        # like diffusers: keys that took a default are not passed on by from_config(self.config)
        self.config["_use_default_values"] = sorted(self.defaults.keys() - given.keys())
        self._require(prediction_type=PREDICTION_TYPES)
        check_config_values(type(self).__name__, self.config)
        self.alphas_cumprod = torch.cumprod(1.0 - betas_for(self.config), dim=0)  # abar_t, float32
        self.timesteps, self.num_inference_steps, self._schedule, self.begin_index = None, None, [], 0

    @classmethod
    def from_config(cls, config: dict, **overrides):
        """Build from a scheduler_config.json dict or another scheduler's `.config`."""
        if not isinstance(config, dict) or not all(isinstance(k, str) for k in config):
            raise ConfigError(f"a scheduler config must be a JSON object (a dict with string keys), "
                              f"got {type(config).__name__}")
        took_default = config.get("_use_default_values", ())
        took_default = set(took_default) if isinstance(took_default, (list, tuple)) else set()
        return cls(**{**{k: v for k, v in config.items() if k not in took_default}, **overrides})

    def _require(self, **supported):
        for key, values in supported.items():
            if self.config[key] not in values:
                raise ConfigError(
                    f"{type(self).__name__}: {key}={self.config[key]!r} is not supported here (supported: {values})"
                )

    def _check_steps(self, n, timesteps=None, sigmas=None, supports=()):
        """Check set_timesteps' arguments the way diffusers reads them: a step count, or else one
        custom list (`timesteps` or `sigmas`) for the classes that take one (named in `supports`)."""
        name, T = type(self).__name__, self.config.num_train_timesteps
        for key, values in (("timesteps", timesteps), ("sigmas", sigmas)):
            if values is not None and key not in supports:
                takes = f"it takes custom {' or '.join(supports)}" if supports else "it takes only num_inference_steps"
                raise ValueError(f"{name} does not support custom {key}; {takes}")
        if timesteps is not None and sigmas is not None:
            raise ValueError("give custom timesteps or custom sigmas, not both")
        if n is None and timesteps is None and sigmas is None:
            raise ValueError("set_timesteps needs num_inference_steps (or a custom timesteps/sigmas list)")
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= T):
            raise ValueError(f"num_inference_steps must be an integer between 1 and num_train_timesteps={T}, got {n!r}")
        custom = timesteps if timesteps is not None else sigmas
        if n is not None and custom is not None:
            # diffusers refuses both; a count that agrees with the list is accepted here
            steps = len(custom) - (sigmas is not None) if hasattr(custom, "__len__") else None
            if n != steps:
                raise ValueError(f"num_inference_steps={n} disagrees with the custom list, which sets the number "
                                 "of steps (timesteps: one per step; sigmas: n + 1 values for n steps); "
                                 "give one or the other")

    def _custom_timesteps(self, timesteps, integers: bool) -> np.ndarray:
        """A custom timestep list, checked: 1 to T numbers, strictly decreasing, in [0, T-1]
        (whole numbers when the scheduler indexes abar_t with them)."""
        T = self.config.num_train_timesteps
        values = _number_list("timesteps", timesteps, T)
        if not np.all((0 <= values) & (values <= T - 1)) or (integers and not np.all(values == np.round(values))):
            kind = "integers" if integers else "numbers"
            raise ValueError(f"custom timesteps must be {kind} in [0, {T - 1}] (num_train_timesteps - 1), "
                             f"got {timesteps!r}")
        if np.any(np.diff(values) >= 0):
            raise ValueError(f"custom timesteps must be strictly decreasing, got {timesteps!r}")
        return values

    def _set(self, timesteps: torch.Tensor, device, num_inference_steps: int):
        self.timesteps, self.num_inference_steps = timesteps.to(device), num_inference_steps
        self._schedule = timesteps.tolist()
        self.begin_index = 0

    def set_begin_index(self, begin_index: int) -> None:
        """Start at step `begin_index` of the schedule set (img2img runs only the last steps;
        diffusers' name): add_noise noises to that step's level, counting schedulers count from it."""
        self.begin_index = begin_index

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: the training process's noising, at a
        timestep per sample (or one for all), as diffusers' DDPM-family add_noise."""
        abar = self.alphas_cumprod.to(original_samples.dtype)[torch.as_tensor(timesteps, device="cpu").long()]
        abar = abar.to(original_samples.device).reshape(-1, *[1] * (original_samples.ndim - 1))
        return abar**0.5 * original_samples + (1 - abar) ** 0.5 * noise

    def index_of(self, timestep) -> int:
        """The step index: where `timestep` stands in `.timesteps` (its first occurrence)."""
        try:
            return self._schedule.index(float(timestep))
        except ValueError:
            raise ValueError(f"timestep {float(timestep)} is not in .timesteps; call set_timesteps first") from None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The UNet's input at `timestep` (the sample itself, except for Euler)."""
        return sample

    def _x0_and_eps(self, model_output, sample, abar_t):
        """x_0 and eps estimated from the model output at a step with abar_t (clipped x_0 if asked)."""
        a, b = abar_t**0.5, (1 - abar_t) ** 0.5
        kind = self.config.prediction_type
        if kind == "epsilon":
            x0, eps = (sample - b * model_output) / a, model_output
        elif kind == "sample":
            x0 = model_output
            eps = (sample - a * x0) / b
        else:  # v_prediction
            x0, eps = a * sample - b * model_output, a * model_output + b * sample
        if self.config.clip_sample:  # eps stays the unclipped one, as in diffusers
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0, eps

    def _train_sigmas(self) -> np.ndarray:
        """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0..T-1, float32, ascending."""
        abar = self.alphas_cumprod.clone()
        if self.config.rescale_betas_zero_snr:
            abar[-1] = 2**-24  # zero SNR would make sigma_{T-1} infinite; diffusers caps it so
        return (((1 - abar) / abar) ** 0.5).numpy()


_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None)
_SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")  # LCM's defaults

# ----------------------------------------------------------------------------- the schedulers


class DDIMScheduler(Scheduler):
    """DDIM, Song et al. 2020 (arXiv 2010.02502) eq. 12; diffusers' scheduling_ddim.py.

        x_{t'} = sqrt(abar_t') x0 + sqrt(1 - abar_t' - s_t^2) eps + s_t z,   z ~ N(0, I)
        s_t    = eta sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t')

    with x0, eps estimated from the model output, t' = t - T // n (as diffusers, for every
    spacing) and abar_{t'} = 1 (`set_alpha_to_one`) or abar_0 below t = 0. eta = 0 is the
    deterministic DDIM; eta = 1 is DDPM's ancestral sampling.
    """

    defaults = dict(
        **_BETAS, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
        prediction_type="epsilon", thresholding=False, timestep_spacing="leading", rescale_betas_zero_snr=False,
    )

    def __init__(self, **config):
        super().__init__(**config)
        self._require(thresholding=(False,))  # dynamic thresholding is for pixel-space models
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        self._check_steps(num_inference_steps, timesteps, sigmas)
        c, n = self.config, num_inference_steps
        T = c.num_train_timesteps
        fits = lambda m: (m - 1) * (T // m) + c.steps_offset < T  # noqa: E731  (first timestep <= T - 1)
        if c.timestep_spacing == "leading" and not fits(n):
            # diffusers fails with an IndexError in step. T // m makes the step counts that fit
            # no range (T=1000, steps_offset=2: 500 does not, 501 does), so name two of them.
            largest = next(m for m in range(T, 0, -1) if fits(m))
            below = next(m for m in range(n, 0, -1) if fits(m))
            raise ValueError(f"num_inference_steps={n} with timestep_spacing='leading' and steps_offset="
                             f"{c.steps_offset} would start past timestep {T - 1}; this scheduler config allows "
                             f"at most {largest} steps" + (f" (and {below} is the most below {n})" * (below != largest)))
        timesteps = spaced_timesteps(c, n).round().astype(np.int64)
        self._set(torch.from_numpy(timesteps), device, n)

    def step(self, model_output, timestep, sample, generator=None, eta: float = 0.0) -> StepOutput:
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps first")
        t = int(timestep)
        prev_t = t - self.config.num_train_timesteps // self.num_inference_steps
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        x0, eps = self._x0_and_eps(model_output, sample, abar_t)
        variance = ((1 - abar_prev) / (1 - abar_t)) * (1 - abar_t / abar_prev)
        std = eta * variance**0.5
        prev = abar_prev**0.5 * x0 + (1 - abar_prev - std**2) ** 0.5 * eps
        if eta > 0:
            prev = prev + std * randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        return StepOutput(prev, x0)


class LCMScheduler(Scheduler):
    """Latent Consistency Model sampling, Luo et al. 2023 (arXiv 2310.04378) Algorithm 1;
    diffusers' scheduling_lcm.py. Each step denoises completely, then re-noises to the next
    timestep (not after the last step):

        denoised = c_out(t) x0 + c_skip(t) x_t,   c_skip = sd^2 / ((k t)^2 + sd^2),
                                                   c_out  = k t / sqrt((k t)^2 + sd^2)
        x_{t'}   = sqrt(abar_t') denoised + sqrt(1 - abar_t') z,   z ~ N(0, I)

    (the consistency-model parameterization of Song et al. 2023, arXiv 2303.01469, as LCM uses
    it: sd = 0.5, k = `timestep_scaling`; c_skip -> 1 and c_out -> 0 as t -> 0). The n timesteps are taken from the `original_inference_steps`
    evenly spaced ones the model was distilled on: T//N - 1, 2 T//N - 1, ..., T - 1.
    """

    defaults = dict(
        **{**_BETAS, **_SD}, original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
        set_alpha_to_one=True, steps_offset=0, prediction_type="epsilon", thresholding=False,
        timestep_spacing="leading", timestep_scaling=10.0, rescale_betas_zero_snr=False,
    )

    def __init__(self, **config):
        super().__init__(**config)
        self._require(thresholding=(False,))

    def set_timesteps(self, num_inference_steps: int | None = None, device=None,
                      original_inference_steps: int | None = None, timesteps=None, sigmas=None):
        """`timesteps`: any strictly decreasing integers in [0, T-1], as diffusers (which warns
        when they are not on the distillation schedule; they still run)."""
        self._check_steps(num_inference_steps, timesteps, sigmas, supports=("timesteps",))
        if timesteps is not None:
            custom = self._custom_timesteps(timesteps, integers=True).astype(np.int64)
            self._set(torch.from_numpy(custom), device, len(custom))
            return
        N = original_inference_steps or self.config.original_inference_steps
        T = self.config.num_train_timesteps
        if not _is_int(N) or not 1 <= num_inference_steps <= N <= T:
            raise ValueError(
                f"LCM needs 1 <= num_inference_steps ({num_inference_steps}) <= original_inference_steps "
                f"({N}) <= num_train_timesteps ({T})"
            )
        distilled = (np.arange(1, N + 1) * (T // N) - 1)[::-1]  # the teacher's schedule, descending
        picks = np.floor(np.linspace(0, N, num_inference_steps, endpoint=False)).astype(np.int64)
        self._set(torch.from_numpy(distilled[picks].copy()), device, num_inference_steps)

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        i = self.index_of(timestep)
        last = i == len(self._schedule) - 1
        t, t_next = int(timestep), self._schedule[i if last else i + 1]
        abar_t, abar_next = self.alphas_cumprod[t], self.alphas_cumprod[t_next]
        kt = torch.tensor(t, dtype=torch.float32) * self.config.timestep_scaling  # float32, as diffusers
        c_skip = 0.5**2 / (kt**2 + 0.5**2)
        c_out = kt / (kt**2 + 0.5**2) ** 0.5
        x0, _ = self._x0_and_eps(model_output, sample, abar_t)
        denoised = c_out * x0 + c_skip * sample
        if last:
            return StepOutput(denoised, denoised)
        noise = randn_tensor(model_output.shape, generator, model_output.device, denoised.dtype)
        return StepOutput(abar_next.sqrt() * denoised + (1 - abar_next).sqrt() * noise, denoised)


class SigmaScheduler(Scheduler):
    """What Euler and Euler ancestral share: they step x = x_vp * sqrt(1 + sigma^2), whose noise
    level is sigma, through `.sigmas` (one per timestep, then the final one)."""

    def __init__(self, **config):
        super().__init__(**config)
        self.sigmas = torch.from_numpy(np.append(self._train_sigmas()[::-1], 0.0).astype(np.float32))

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        # diffusers' rule: sigma_max for "linspace"/"trailing", sqrt(sigma_max^2 + 1) for "leading"
        sigma_max = self.sigmas.max()
        return sigma_max if self.config.timestep_spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5

    def scale_model_input(self, sample, timestep):
        sigma = self.sigmas[self.index_of(timestep)]
        return sample / ((sigma**2 + 1) ** 0.5)

    def add_noise(self, original_samples, noise, timesteps=None):
        """x = x_0 + sigma eps at the noise level of step `begin_index` (diffusers' rule for
        img2img: the timesteps are not looked up)."""
        sigma = self.sigmas[self.begin_index].to(original_samples.device, original_samples.dtype)
        return original_samples + noise * sigma

    def _x0(self, model_output, x, sigma):
        """x_0 estimated from the model output at noise level sigma (x in float32)."""
        kind = self.config.prediction_type
        if kind == "epsilon":
            return x - sigma * model_output
        if kind == "v_prediction":
            return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
        return model_output


class EulerDiscreteScheduler(SigmaScheduler):
    """Euler's method on the probability-flow ODE, Karras et al. 2022 (arXiv 2206.00364)
    Algorithm 2 with S_churn = 0 and no second-order correction; diffusers'
    scheduling_euler_discrete.py. In the variable x = x_vp * sqrt(1 + sigma^2), whose noise
    level is sigma:

        d = (x - x0) / sigma,   x_{next} = x + d (sigma_next - sigma),   x0 from the model output

    The UNet, trained on x_vp, sees x / sqrt(sigma^2 + 1) (`scale_model_input`). Sigmas are
    sigma_t interpolated linearly at the (fractional) timesteps, or Karras' schedule, then 0.
    """

    defaults = dict(
        **_BETAS, prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None, sigma_max=None,
        timestep_spacing="linspace", timestep_type="discrete", steps_offset=0, rescale_betas_zero_snr=False,
        final_sigmas_type="zero",
    )

    def __init__(self, **config):
        super().__init__(**config)
        self._require(
            interpolation_type=("linear",), use_exponential_sigmas=(False, None), use_beta_sigmas=(False, None),
            timestep_type=("discrete",), final_sigmas_type=("zero", "sigma_min"),
        )

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        """`timesteps`: strictly decreasing (fractional) timesteps in [0, T-1], sigmas
        interpolated at them, then the final sigma. `sigmas`: the whole schedule, final sigma
        included (n + 1 values for n steps), strictly decreasing and >= 0; the timesteps are
        interpolated from them, as diffusers does."""
        self._check_steps(num_inference_steps, timesteps, sigmas, supports=("timesteps", "sigmas"))
        c, train = self.config, self._train_sigmas()
        if sigmas is not None:
            sigmas = _number_list("sigmas", sigmas, c.num_train_timesteps + 1).astype(np.float32)
            if len(sigmas) < 2 or np.any(np.diff(sigmas) >= 0) or sigmas[-1] < 0:
                raise ValueError("custom sigmas must be 2 or more strictly decreasing numbers >= 0, the last being "
                                 f"the final noise level (n + 1 values for n steps), got {sigmas.tolist()!r}")
            timesteps = np.array([sigma_to_t(s, np.log(train)) for s in sigmas[:-1]])
            self.sigmas = torch.from_numpy(sigmas)
            self._set(torch.from_numpy(timesteps.astype(np.float32)), device, len(timesteps))
            return
        if timesteps is not None:
            if c.use_karras_sigmas:
                raise ValueError("custom timesteps cannot be used with use_karras_sigmas=True (Karras' schedule "
                                 "sets its own timesteps); give custom sigmas instead")
            timesteps = self._custom_timesteps(timesteps, integers=False).astype(np.float32)
        else:
            timesteps = spaced_timesteps(c, num_inference_steps).astype(np.float32)
        n = num_inference_steps or len(timesteps)  # "trailing" can give n + 1 timesteps (see spaced_timesteps)
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
        if c.use_karras_sigmas:
            lo = c.sigma_min if c.sigma_min is not None else sigmas[-1].item()
            hi = c.sigma_max if c.sigma_max is not None else sigmas[0].item()
            sigmas = karras_sigmas(lo, hi, n)
            timesteps = np.array([sigma_to_t(s, np.log(train)) for s in sigmas])
        last = 0.0 if c.final_sigmas_type == "zero" else train[0]
        self.sigmas = torch.from_numpy(np.append(sigmas, last).astype(np.float32))
        self._set(torch.from_numpy(timesteps.astype(np.float32)), device, n)

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        i = self.index_of(timestep)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = sample.to(torch.float32)
        x0 = self._x0(model_output, x, sigma)
        d = (x - x0) / sigma
        return StepOutput((x + d * (sigma_next - sigma)).to(model_output.dtype), x0)


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """Euler ancestral ("Euler a"): k-diffusion's sample_euler_ancestral (Karras et al. 2022,
    arXiv 2206.00364, with eta = 1); diffusers' scheduling_euler_ancestral_discrete.py. Each step
    goes from sigma down to sigma_down by Euler's method, then adds fresh noise of std sigma_up,
    split so that the variances add up to the next noise level:

        sigma_up   = sqrt(sigma_next^2 (sigma^2 - sigma_next^2) / sigma^2)
        sigma_down = sqrt(sigma_next^2 - sigma_up^2)
        x_next     = x + (x - x0) / sigma * (sigma_down - sigma) + sigma_up z,   z ~ N(0, I)

    The noise is drawn at every step (the last one too, with sigma_up = 0), as diffusers draws it,
    so one generator gives the same images in both. Timesteps as Euler's (no Karras sigmas, no
    custom schedules: diffusers' class takes neither).
    """

    defaults = dict(
        **_BETAS, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0,
        rescale_betas_zero_snr=False,
    )

    def __init__(self, **config):
        super().__init__(**config)
        self._require(prediction_type=("epsilon", "v_prediction"))  # diffusers: "sample" is not implemented

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        self._check_steps(num_inference_steps, timesteps, sigmas)
        train = self._train_sigmas()
        timesteps = spaced_timesteps(self.config, num_inference_steps).astype(np.float32)
        sigmas = np.interp(timesteps, np.arange(len(train)), train)
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
        self._set(torch.from_numpy(timesteps), device, num_inference_steps)

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        i = self.index_of(timestep)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = sample.to(torch.float32)
        x0 = self._x0(model_output, x, sigma)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x_next = x + (x - x0) / sigma * (sigma_down - sigma)
        noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        return StepOutput((x_next + noise * sigma_up).to(model_output.dtype), x0)


class DPMSolverMultistepScheduler(Scheduler):
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv 2211.01095) Algorithm 2 (multistep, data
    prediction); diffusers' scheduling_dpmsolver_multistep.py. With alpha = 1/sqrt(1 + sigma^2),
    sigma_vp = sigma alpha, lambda = log(alpha / sigma_vp) and h = lambda_t - lambda_s:

        x_t = (sigma_vp_t / sigma_vp_s) x_s - alpha_t (e^-h - 1) (D0 + D1 / 2)     ("midpoint")
        D0  = x0_s,   D1 = (x0_s - x0_prev) / r,   r = (lambda_s - lambda_prev) / h

    The first step, and the last when `lower_order_final` and fewer than 15 steps (always when
    the final sigma is 0), drop D1: that first-order step is DDIM. `solver_type="heun"` replaces
    the D1 term by + alpha_t ((e^-h - 1) / h + 1) D1.
    """

    defaults = dict(
        **_BETAS, solver_order=2, prediction_type="epsilon", thresholding=False, algorithm_type="dpmsolver++",
        solver_type="midpoint", lower_order_final=True, euler_at_final=False, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, use_lu_lambdas=False, use_flow_sigmas=False,
        final_sigmas_type="zero", lambda_min_clipped=-float("inf"), variance_type=None,
        timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False,
    )

    def __init__(self, **config):
        super().__init__(**config)
        # as diffusers: a DEIS or UniPC config's solver names fall back to DPM-Solver++ midpoint
        if self.config.algorithm_type == "deis":
            self.config["algorithm_type"] = "dpmsolver++"
        if self.config.solver_type in ("logrho", "bh1", "bh2"):
            self.config["solver_type"] = "midpoint"
        self._require(
            algorithm_type=("dpmsolver++",), solver_order=(1, 2), solver_type=("midpoint", "heun"),
            thresholding=(False,), use_exponential_sigmas=(False, None), use_beta_sigmas=(False, None),
            use_lu_lambdas=(False, None), use_flow_sigmas=(False, None), final_sigmas_type=("zero", "sigma_min"),
            lambda_min_clipped=(-float("inf"),), variance_type=(None,),
        )
        self.sigmas, self.step_index, self.prev_x0 = None, 0, None

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        """`timesteps`: strictly decreasing integers in [0, T-1] (not with Karras sigmas); sigmas
        interpolated at them, then the final sigma, as diffusers does. No custom sigmas (diffusers'
        class takes none)."""
        self._check_steps(num_inference_steps, timesteps, sigmas, supports=("timesteps",))
        c, n, train = self.config, num_inference_steps, self._train_sigmas()
        if timesteps is not None:
            if c.use_karras_sigmas:
                raise ValueError("custom timesteps cannot be used with use_karras_sigmas=True (Karras' schedule "
                                 "sets its own timesteps)")
            timesteps = self._custom_timesteps(timesteps, integers=True)
            n = len(timesteps)
        elif c.timestep_spacing == "trailing":
            timesteps = spaced_timesteps(c, n).round()
        else:  # n + 1 points with the last (t = 0 or steps_offset) dropped
            timesteps = spaced_timesteps(c, n + 1)[:-1].round()
        if c.use_karras_sigmas:
            sigmas = karras_sigmas(train[0].item(), train[-1].item(), n)
            timesteps = np.array([sigma_to_t(s, np.log(train)) for s in sigmas])
            if c.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = np.interp(timesteps, np.arange(len(train)), train)
        last = 0.0 if c.final_sigmas_type == "zero" else train[0]
        self.sigmas = torch.from_numpy(np.append(sigmas, last).astype(np.float32))
        self._set(torch.from_numpy(timesteps.astype(np.int64)), device, len(timesteps))
        self.step_index, self.prev_x0 = 0, None

    @staticmethod
    def _alpha_sigma_lambda(sigma):
        alpha = 1 / ((sigma**2 + 1) ** 0.5)
        sigma_vp = sigma * alpha
        return alpha, sigma_vp, torch.log(alpha) - torch.log(sigma_vp)

    def set_begin_index(self, begin_index: int) -> None:
        super().set_begin_index(begin_index)
        self.step_index, self.prev_x0 = begin_index, None  # no history yet: a first-order step first

    def add_noise(self, original_samples, noise, timesteps=None):
        """x = alpha x_0 + sigma_vp eps at the noise level of step `begin_index` (as diffusers)."""
        sigma = self.sigmas[self.begin_index].to(original_samples.device, original_samples.dtype)
        alpha, sigma_vp, _ = self._alpha_sigma_lambda(sigma)
        return alpha * original_samples + sigma_vp * noise

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        """One step; `timestep` must be `.timesteps[step_index]` (steps are counted, in order)."""
        if self.sigmas is None:
            raise ValueError("call set_timesteps first")
        c, i, n = self.config, self.step_index, self.num_inference_steps
        alpha_s, sigma_s, lambda_s = self._alpha_sigma_lambda(self.sigmas[i])
        alpha_t, sigma_t, lambda_t = self._alpha_sigma_lambda(self.sigmas[i + 1])
        if c.prediction_type == "epsilon":
            x0 = (sample - sigma_s * model_output) / alpha_s
        elif c.prediction_type == "v_prediction":
            x0 = alpha_s * sample - sigma_s * model_output
        else:
            x0 = model_output
        final_first_order = i == n - 1 and (
            c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero"
        )
        x = sample.to(torch.float32)
        h = lambda_t - lambda_s
        prev = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0  # first order (DDIM)
        if c.solver_order == 2 and self.prev_x0 is not None and not final_first_order:
            lambda_prev = self._alpha_sigma_lambda(self.sigmas[i - 1])[2]
            r = (lambda_s - lambda_prev) / h
            D1 = (1.0 / r) * (x0 - self.prev_x0)
            if c.solver_type == "midpoint":
                prev = prev - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
            else:  # heun
                prev = prev + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
        self.step_index, self.prev_x0 = i + 1, x0
        return StepOutput(prev.to(model_output.dtype), x0)


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
}
SCHEDULER_NAMES = ["DDIM", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "LCM", "euler_a", "euler-a", "dpm++"]


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
    for cls, sampler in ((DDIMScheduler, "DDIM"), (EulerAncestralDiscreteScheduler, "Euler a"),
                         (EulerDiscreteScheduler, "Euler"), (DPMSolverMultistepScheduler, "DPM++ 2M"),
                         (LCMScheduler, "LCM")):
        if isinstance(scheduler, cls):
            return sampler, karras
    raise TypeError(f"a1111_names takes a mini_tgate scheduler, got {type(scheduler).__name__}")


def scheduler_from_config(config: dict) -> Scheduler:
    """The scheduler a checkpoint's scheduler_config.json names; DDIM on the same beta schedule
    (with a warning) for a class not implemented here, such as SD-1.5's PNDMScheduler."""
    if not isinstance(config, dict):
        raise ConfigError(f"a scheduler config must be a JSON object, got {type(config).__name__}")
    name = config.get("_class_name", "DDIMScheduler")
    if not isinstance(name, str):
        raise ConfigError(f"the scheduler config's _class_name must be a string, got {name!r}")
    classes = [*SCHEDULERS.values(), EulerAncestralDiscreteScheduler]
    cls = {c.__name__: c for c in classes}.get(name)
    if cls is None:
        warnings.warn(f"{name} is not implemented in mini_tgate; using DDIMScheduler with its beta schedule")
        cls = DDIMScheduler
    return cls.from_config(config)
