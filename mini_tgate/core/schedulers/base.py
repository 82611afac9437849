"""What every scheduler shares: the `Scheduler` base (config, abar_t, step lookup, noising), the
training noise schedule, timestep spacing, Karras sigmas, sigma <-> timestep interpolation,
diffusers-compatible noise, and the checks of a scheduler config and of custom schedules.

See the package docstring (`__init__.py`) for how a scheduler is used and the notation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

from ..bounds import MAX_TRAIN_TIMESTEPS, PREDICTION_TYPES, int_in, is_number
from ..config import ConfigError


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


def multistep_timesteps(config, n: int) -> np.ndarray:
    """The timesteps of diffusers' multistep solvers (DPM-Solver, UniPC), float64 integers: n of
    the n + 1 spaced ones with the last (t = 0 or steps_offset) dropped; "trailing": n of them."""
    if config["timestep_spacing"] == "trailing":
        return spaced_timesteps(config, n).round()
    return spaced_timesteps(config, n + 1)[:-1].round()


def sigma_schedule(timesteps: np.ndarray, train: np.ndarray, karras: bool, n: int, lo=None, hi=None):
    """(sigmas, timesteps) of the sigma-space schedulers (Euler, Heun, LMS): sigma_t interpolated
    at the timesteps, or with `karras` Karras' n sigmas from `lo` to `hi` (by default the
    interpolated ends) and their fractional timesteps. float64 sigmas, without the final one."""
    sigmas = np.interp(timesteps, np.arange(len(train)), train)
    if karras:
        lo = sigmas[-1].item() if lo is None else lo
        hi = sigmas[0].item() if hi is None else hi
        sigmas = karras_sigmas(lo, hi, n)
        timesteps = np.array([sigma_to_t(s, np.log(train)) for s in sigmas])
    return sigmas, timesteps


def sigma_x0(kind: str, model_output, x, sigma):
    """x_0 estimated from the model output at noise level sigma, in the variable
    x = x_vp sqrt(1 + sigma^2) of the sigma-space schedulers (as diffusers computes it)."""
    if kind == "epsilon":
        return x - sigma * model_output
    if kind == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
    return model_output  # "sample"


def vp_alpha_sigma_lambda(sigma):
    """The VP variables of noise level sigma: alpha = 1 / sqrt(1 + sigma^2), sigma_vp = sigma alpha
    (so x_vp = alpha x_0 + sigma_vp eps) and the half log-SNR lambda = log(alpha / sigma_vp)."""
    alpha = 1 / ((sigma**2 + 1) ** 0.5)
    sigma_vp = sigma * alpha
    return alpha, sigma_vp, torch.log(alpha) - torch.log(sigma_vp)


def vp_x0(kind: str, model_output, x, alpha, sigma_vp):
    """x_0 estimated from the model output at a VP sample x = alpha x_0 + sigma_vp eps."""
    if kind == "epsilon":
        return (x - sigma_vp * model_output) / alpha
    if kind == "v_prediction":
        return alpha * x - sigma_vp * model_output
    return model_output  # "sample"


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


def check_config_values(name: str, config: dict):
    """ConfigError for a value no schedule can be built from (diffusers crashes on most of them
    later, or silently makes NaN: negative betas)."""
    T = config["num_train_timesteps"]
    if not int_in(T, 2, MAX_TRAIN_TIMESTEPS):
        raise ConfigError(f"{name}: num_train_timesteps must be an integer from 2 to {MAX_TRAIN_TIMESTEPS}, got {T!r}")
    for key in ("beta_start", "beta_end"):
        if not is_number(config[key]) or not 0 < config[key] < 1:
            raise ConfigError(f"{name}: {key} must be a number in (0, 1), got {config[key]!r}")
    betas = config.get("trained_betas")
    if betas is not None:
        if not isinstance(betas, (list, tuple, np.ndarray, torch.Tensor)) or len(betas) != T:
            length = len(betas) if isinstance(betas, (list, tuple, np.ndarray, torch.Tensor)) else type(betas).__name__
            raise ConfigError(f"{name}: trained_betas must be a list of num_train_timesteps={T} numbers, got {length}")
        values = np.asarray(betas, dtype=object).reshape(-1)
        if len(values) != T or not all(is_number(b) and 0 < b < 1 for b in values.tolist()):
            raise ConfigError(f"{name}: trained_betas must all be numbers in (0, 1)")
    offset = config.get("steps_offset", 0)
    if not int_in(offset, 0, T - 1):
        raise ConfigError(f"{name}: steps_offset must be an integer in [0, num_train_timesteps={T}), got {offset!r}")
    positive = {"clip_sample_range", "timestep_scaling", "sigma_min", "sigma_max"}
    for key in positive & config.keys():
        if config[key] is not None and (not is_number(config[key]) or config[key] <= 0):
            raise ConfigError(f"{name}: {key} must be a positive number, got {config[key]!r}")
    steps = config.get("original_inference_steps", 1)
    if not int_in(steps, 1, T):
        raise ConfigError(f"{name}: original_inference_steps must be an integer from 1 to num_train_timesteps={T}, "
                          f"got {steps!r}")
    for key in ("beta_schedule", "timestep_spacing"):
        if key in config and not isinstance(config[key], str):
            raise ConfigError(f"{name}: {key} must be a string, got {config[key]!r}")


def number_list(key: str, values, most: int) -> np.ndarray:
    """A custom timesteps/sigmas argument as float64: 1-D, 1 to `most` finite numbers."""
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple, np.ndarray)) or not 1 <= len(values) <= most:
        raise ValueError(f"custom {key} must be a list of 1 to {most} numbers, got {values!r}")
    if not all(is_number(v) for v in (values.tolist() if isinstance(values, np.ndarray) else values)):
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
        self.timesteps, self.num_inference_steps, self.schedule, self.begin_index = None, None, [], 0
        self.step_index = 0  # the schedulers that count their steps: the next step's index in .timesteps
        self._reset_state()

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
        if n is not None and not int_in(n, 1, T):
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
        values = number_list("timesteps", timesteps, T)
        if not np.all((0 <= values) & (values <= T - 1)) or (integers and not np.all(values == np.round(values))):
            kind = "integers" if integers else "numbers"
            raise ValueError(f"custom timesteps must be {kind} in [0, {T - 1}] (num_train_timesteps - 1), "
                             f"got {timesteps!r}")
        if np.any(np.diff(values) >= 0):
            raise ValueError(f"custom timesteps must be strictly decreasing, got {timesteps!r}")
        return values

    def _set(self, timesteps: torch.Tensor, device, num_inference_steps: int):
        self.timesteps, self.num_inference_steps = timesteps.to(device), num_inference_steps
        self.schedule = timesteps.tolist()
        self.set_begin_index(0)

    def set_begin_index(self, begin_index: int) -> None:
        """Start at step `begin_index` of the schedule set (img2img runs only the last steps;
        diffusers' name): add_noise noises to that step's level, counting schedulers count from
        it, and a multistep scheduler's history starts empty (as in diffusers, whose counters start
        at the begin index and whose history is empty on a scheduler's first step)."""
        self.begin_index = self.step_index = begin_index
        self._reset_state()

    def _reset_state(self) -> None:
        """Forget what earlier steps left (a multistep scheduler's history): a new run starts."""

    def _check_set(self):
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps first")

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps: the training process's noising, at a
        timestep per sample (or one for all), as diffusers' DDPM-family add_noise."""
        abar = self.alphas_cumprod.to(original_samples.dtype)[torch.as_tensor(timesteps, device="cpu").long()]
        abar = abar.to(original_samples.device).reshape(-1, *[1] * (original_samples.ndim - 1))
        return abar**0.5 * original_samples + (1 - abar) ** 0.5 * noise

    def index_of(self, timestep) -> int:
        """The step index: where `timestep` stands in `.timesteps` (its first occurrence)."""
        try:
            return self.schedule.index(float(timestep))
        except ValueError:
            raise ValueError(f"timestep {float(timestep)} is not in .timesteps; call set_timesteps first") from None

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """The UNet's input at `timestep` (the sample itself, except for Euler)."""
        return sample

    def _x0_and_eps(self, model_output, sample, abar_t):
        """x_0 and eps estimated from the model output at a step with abar_t (clipped x_0 if asked)."""
        a, b = abar_t**0.5, (1 - abar_t) ** 0.5  # the VP sample's alpha and sigma
        kind = self.config.prediction_type
        x0 = vp_x0(kind, model_output, sample, a, b)
        if kind == "epsilon":
            eps = model_output
        elif kind == "sample":
            eps = (sample - a * x0) / b
        else:  # v_prediction
            eps = a * model_output + b * sample
        if self.config.clip_sample:  # eps stays the unclipped one, as in diffusers
            x0 = x0.clamp(-self.config.clip_sample_range, self.config.clip_sample_range)
        return x0, eps

    def _train_sigmas(self) -> np.ndarray:
        """sigma_t = sqrt((1 - abar_t) / abar_t) for t = 0..T-1, float32, ascending."""
        abar = self.alphas_cumprod.clone()
        if self.config.get("rescale_betas_zero_snr"):
            abar[-1] = 2**-24  # zero SNR would make sigma_{T-1} infinite; diffusers caps it so
        return (((1 - abar) / abar) ** 0.5).numpy()


# diffusers' default training schedule (DDPM's linear betas), the defaults every scheduler starts from
BETA_DEFAULTS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear", trained_betas=None)


class VPScheduler(Scheduler):
    """What the multistep solvers (DPM-Solver++, UniPC) share: they step the VP sample through
    `.sigmas` (one per timestep, then the final one), counting their steps, and noise an image
    to the level of their first step."""

    def add_noise(self, original_samples, noise, timesteps=None):
        """x = alpha x_0 + sigma_vp eps at the noise level of step `begin_index` (as diffusers)."""
        sigma = self.sigmas[self.begin_index].to(original_samples.device, original_samples.dtype)
        alpha, sigma_vp, _ = vp_alpha_sigma_lambda(sigma)
        return alpha * original_samples + sigma_vp * noise
