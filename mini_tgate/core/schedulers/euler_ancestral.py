"""Euler ancestral ("Euler a"), diffusers' EulerAncestralDiscreteScheduler."""

from __future__ import annotations

import numpy as np
import torch

from .base import BETA_DEFAULTS, StepOutput, randn_tensor, spaced_timesteps
from .euler import SigmaScheduler


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
        **BETA_DEFAULTS, prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0,
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
        sigma, sigma_next, x, x0 = self._start_step(model_output, timestep, sample)
        sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
        sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
        x_next = x + (x - x0) / sigma * (sigma_down - sigma)
        noise = randn_tensor(model_output.shape, generator, model_output.device, model_output.dtype)
        return StepOutput((x_next + noise * sigma_up).to(model_output.dtype), x0)
