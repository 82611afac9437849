"""Heun (Karras et al. 2022), diffusers' HeunDiscreteScheduler."""

from __future__ import annotations

import numpy as np
import torch

from .base import BETA_DEFAULTS, StepOutput, sigma_schedule, sigma_x0, spaced_timesteps
from .euler import SigmaScheduler


class HeunDiscreteScheduler(SigmaScheduler):
    """Heun's second-order method on the probability-flow ODE, Karras et al. 2022 (arXiv
    2206.00364) Algorithm 1 with S_churn = 0; diffusers' scheduling_heun_discrete.py. In the
    variable x of noise level sigma (see `SigmaScheduler`), each step from sigma to sigma_next
    takes two model evaluations:

        d   = (x - x0(x, sigma)) / sigma,               x' = x + d (sigma_next - sigma)  (Euler)
        d'  = (x' - x0(x', sigma_next)) / sigma_next,   x_next = x + (d + d') / 2 (sigma_next - sigma)

    except the last step (sigma_next = 0), an Euler step alone. So n steps make 2n - 1 entries
    of `.timesteps` (t_0, t_1, t_1, ..., t_{n-1}, t_{n-1}), each one call of `step`, and
    `order = 2` (img2img starts at an even `begin_index`). The steps are counted, not looked up.
    """

    order = 2
    counted = True
    defaults = dict(
        **{**BETA_DEFAULTS, "beta_start": 0.00085, "beta_end": 0.012}, prediction_type="epsilon",
        use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False, clip_sample=False,
        clip_sample_range=1.0, timestep_spacing="linspace", steps_offset=0,
    )

    def __init__(self, **config):
        super().__init__(**config)
        self._require(use_exponential_sigmas=(False, None), use_beta_sigmas=(False, None))

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        """`timesteps`: n strictly decreasing (fractional) timesteps in [0, T-1], not with Karras
        sigmas (as diffusers). No custom sigmas (diffusers' class takes none)."""
        self._check_steps(num_inference_steps, timesteps, sigmas, supports=("timesteps",))
        c = self.config
        if timesteps is not None:
            if c.use_karras_sigmas:
                raise ValueError("custom timesteps cannot be used with use_karras_sigmas=True (Karras' schedule "
                                 "sets its own timesteps)")
            timesteps = self._custom_timesteps(timesteps, integers=False)
        else:
            timesteps = spaced_timesteps(c, num_inference_steps)
        n = num_inference_steps or len(timesteps)
        sigmas, timesteps = sigma_schedule(timesteps.astype(np.float32), self._train_sigmas(), c.use_karras_sigmas, n)
        sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
        self.sigmas = torch.cat([sigmas[:1], sigmas[1:-1].repeat_interleave(2), sigmas[-1:]])
        timesteps = torch.from_numpy(timesteps)
        self._set(torch.cat([timesteps[:1], timesteps[1:].repeat_interleave(2)]).to(torch.float32), device, n)

    def _reset_state(self) -> None:
        self.prev_derivative = self.dt = self.prev_sample = None  # dt set: the next call is a correction

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        """One call: the Euler step of a step (`dt` None), or its correction; in order."""
        self._check_set()
        c, i, first = self.config, self.step_index, self.dt is None
        sigma, sigma_next = (self.sigmas[i], self.sigmas[i + 1]) if first else (self.sigmas[i - 1], self.sigmas[i])
        x0 = sigma_x0(c.prediction_type, model_output, sample, sigma if first else sigma_next)
        if c.clip_sample:
            x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)
        if first:
            derivative, dt = (sample - x0) / sigma, sigma_next - sigma
            self.prev_derivative, self.dt, self.prev_sample = derivative, dt, sample
        else:
            derivative = (self.prev_derivative + (sample - x0) / sigma_next) / 2
            dt, sample = self.dt, self.prev_sample
            self._reset_state()
        self.step_index = i + 1
        return StepOutput(sample + derivative * dt, x0)
