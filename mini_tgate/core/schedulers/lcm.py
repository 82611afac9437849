"""Latent Consistency Model sampling (Luo et al. 2023), diffusers' LCMScheduler."""

from __future__ import annotations

import numpy as np
import torch

from ..bounds import is_int
from .base import BETA_DEFAULTS, Scheduler, StepOutput, randn_tensor

# Stable Diffusion's training schedule: LCM's defaults (diffusers')
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


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
        **{**BETA_DEFAULTS, **SD_BETAS}, original_inference_steps=50, clip_sample=False, clip_sample_range=1.0,
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
        if not is_int(N) or not 1 <= num_inference_steps <= N <= T:
            raise ValueError(
                f"LCM needs 1 <= num_inference_steps ({num_inference_steps}) <= original_inference_steps "
                f"({N}) <= num_train_timesteps ({T})"
            )
        distilled = (np.arange(1, N + 1) * (T // N) - 1)[::-1]  # the teacher's schedule, descending
        picks = np.floor(np.linspace(0, N, num_inference_steps, endpoint=False)).astype(np.int64)
        self._set(torch.from_numpy(distilled[picks].copy()), device, num_inference_steps)

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        i = self.index_of(timestep)
        last = i == len(self.schedule) - 1
        t, t_next = int(timestep), self.schedule[i if last else i + 1]
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
