"""Euler (Karras et al. 2022), diffusers' EulerDiscreteScheduler, and `SigmaScheduler`: what it
shares with Euler ancestral (euler_ancestral.py)."""

from __future__ import annotations

import numpy as np
import torch

from ..bounds import MAX_SIGMA
from ..config import ConfigError
from .base import (BETA_DEFAULTS, Scheduler, StepOutput, number_list, sigma_schedule, sigma_to_t, sigma_x0,
                   spaced_timesteps)


class SigmaScheduler(Scheduler):
    """What the sigma-space schedulers (Euler, Euler ancestral, Heun, LMS) share: they step
    x = x_vp * sqrt(1 + sigma^2), whose noise level is sigma, through `.sigmas` (one per
    timestep, then the final one). Euler's find a step's sigma by its timestep; `counted`
    ones (Heun, whose timesteps repeat, and LMS, as diffusers) count their steps instead."""

    counted = False

    def __init__(self, **config):
        super().__init__(**config)
        self.sigmas = torch.from_numpy(np.append(self._train_sigmas()[::-1], 0.0).astype(np.float32))

    @property
    def init_noise_sigma(self) -> torch.Tensor:
        # diffusers' rule: sigma_max for "linspace"/"trailing", sqrt(sigma_max^2 + 1) for "leading"
        sigma_max = self.sigmas.max()
        return sigma_max if self.config.timestep_spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5

    def _index(self, timestep) -> int:
        return self.step_index if self.counted else self.index_of(timestep)

    def scale_model_input(self, sample, timestep):
        sigma = self.sigmas[self._index(timestep)]
        return sample / ((sigma**2 + 1) ** 0.5)

    def add_noise(self, original_samples, noise, timesteps=None):
        """x = x_0 + sigma eps at the noise level of step `begin_index` (diffusers' rule for
        img2img: the timesteps are not looked up)."""
        sigma = self.sigmas[self.begin_index].to(original_samples.device, original_samples.dtype)
        return original_samples + noise * sigma

    def _start_step(self, model_output, timestep, sample):
        """What a step starts from: this step's sigma and the next, x in float32, and x_0
        estimated from the model output at noise level sigma."""
        i = self.index_of(timestep)
        sigma, sigma_next = self.sigmas[i], self.sigmas[i + 1]
        x = sample.to(torch.float32)
        return sigma, sigma_next, x, sigma_x0(self.config.prediction_type, model_output, x, sigma)


class EulerDiscreteScheduler(SigmaScheduler):
    """Euler's method on the probability-flow ODE, Karras et al. 2022 (arXiv 2206.00364)
    Algorithm 2 with S_churn = 0 and no second-order correction; diffusers'
    scheduling_euler_discrete.py. In the variable x = x_vp * sqrt(1 + sigma^2), whose noise
    level is sigma:

        d = (x - x0) / sigma,   x_{next} = x + d (sigma_next - sigma),   x0 from the model output

    The UNet, trained on x_vp, sees x / sqrt(sigma^2 + 1) (`scale_model_input`). Sigmas are
    sigma_t interpolated linearly at the (fractional) timesteps, or Karras' schedule, then 0.

    timestep_type="continuous" with v_prediction (SVD; EDM's c_noise, Karras et al. 2022
    Table 1): the UNet's timestep is 0.25 ln(sigma), a float, not the training step. diffusers
    ignores "continuous" for the other prediction types (its TODO); so does this class.
    """

    defaults = dict(
        **BETA_DEFAULTS, prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, sigma_min=None, sigma_max=None,
        timestep_spacing="linspace", timestep_type="discrete", steps_offset=0, rescale_betas_zero_snr=False,
        final_sigmas_type="zero",
    )

    def __init__(self, **config):
        super().__init__(**config)
        self._require(
            interpolation_type=("linear",), use_exponential_sigmas=(False, None), use_beta_sigmas=(False, None),
            timestep_type=("discrete", "continuous"), final_sigmas_type=("zero", "sigma_min"),
        )
        c = self.config
        # (check_config_values has made both None or positive numbers) Karras' schedule runs from
        # sigma_max down to sigma_min; init_noise_sigma = sqrt(sigma_max^2 + 1) must fit a float32
        if c.sigma_min is not None and c.sigma_max is not None and not c.sigma_min < c.sigma_max:
            raise ConfigError(f"EulerDiscreteScheduler: sigma_min={c.sigma_min!r} must be below "
                              f"sigma_max={c.sigma_max!r}")
        if c.sigma_max is not None and not c.sigma_max < MAX_SIGMA:
            raise ConfigError(f"EulerDiscreteScheduler: sigma_max must be below 2**63, got {c.sigma_max!r}")
        self._continuous = c.timestep_type == "continuous" and c.prediction_type == "v_prediction"

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        """`timesteps`: strictly decreasing (fractional) timesteps in [0, T-1], sigmas
        interpolated at them, then the final sigma. `sigmas`: the whole schedule, final sigma
        included (n + 1 values for n steps), strictly decreasing and >= 0; the timesteps are
        interpolated from them, as diffusers does. Continuous timesteps (SVD) are 0.25 ln(sigma)
        instead, and custom timesteps are refused then, as in diffusers."""
        self._check_steps(num_inference_steps, timesteps, sigmas, supports=("timesteps", "sigmas"))
        c, train = self.config, self._train_sigmas()
        if sigmas is not None:
            sigmas = number_list("sigmas", sigmas, c.num_train_timesteps + 1).astype(np.float32)
            if len(sigmas) < 2 or np.any(np.diff(sigmas) >= 0) or sigmas[-1] < 0:
                raise ValueError("custom sigmas must be 2 or more strictly decreasing numbers >= 0, the last being "
                                 f"the final noise level (n + 1 values for n steps), got {sigmas.tolist()!r}")
            timesteps = np.array([sigma_to_t(s, np.log(train)) for s in sigmas[:-1]])
            return self._set_schedule(sigmas, timesteps, device, len(timesteps))
        if timesteps is not None:
            if c.use_karras_sigmas:
                raise ValueError("custom timesteps cannot be used with use_karras_sigmas=True (Karras' schedule "
                                 "sets its own timesteps); give custom sigmas instead")
            if self._continuous:
                raise ValueError("custom timesteps cannot be used with timestep_type='continuous' and v_prediction "
                                 "(the timesteps are 0.25 ln sigma); give custom sigmas instead")
            timesteps = self._custom_timesteps(timesteps, integers=False).astype(np.float32)
        else:
            timesteps = spaced_timesteps(c, num_inference_steps).astype(np.float32)
        n = num_inference_steps or len(timesteps)  # "trailing" can give n + 1 timesteps (see spaced_timesteps)
        sigmas, timesteps = sigma_schedule(timesteps, train, c.use_karras_sigmas, n, c.sigma_min, c.sigma_max)
        last = 0.0 if c.final_sigmas_type == "zero" else train[0]
        self._set_schedule(np.append(sigmas, last).astype(np.float32), timesteps, device, n)

    def _set_schedule(self, sigmas: np.ndarray, timesteps: np.ndarray, device, n: int):
        """Keep `sigmas` (float32, the final one included) and set `timesteps`, or with continuous
        timesteps 0.25 ln(sigma) of the float32 sigmas, computed on `device` as diffusers does."""
        self.sigmas = torch.from_numpy(sigmas)
        if self._continuous:
            self._set(0.25 * self.sigmas[:-1].to(device=device).log(), device, n)
        else:
            self._set(torch.from_numpy(timesteps.astype(np.float32)), device, n)

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        sigma, sigma_next, x, x0 = self._start_step(model_output, timestep, sample)
        d = (x - x0) / sigma
        return StepOutput((x + d * (sigma_next - sigma)).to(model_output.dtype), x0)
