"""DDIM (Song et al. 2020), diffusers' DDIMScheduler."""

from __future__ import annotations

import numpy as np
import torch

from .base import BETA_DEFAULTS, Scheduler, StepOutput, randn_tensor, spaced_timesteps


class DDIMScheduler(Scheduler):
    """DDIM, Song et al. 2020 (arXiv 2010.02502) eq. 12; diffusers' scheduling_ddim.py.

        x_{t'} = sqrt(abar_t') x0 + sqrt(1 - abar_t' - s_t^2) eps + s_t z,   z ~ N(0, I)
        s_t    = eta sqrt((1 - abar_t') / (1 - abar_t)) sqrt(1 - abar_t / abar_t')

    with x0, eps estimated from the model output, t' = t - T // n (as diffusers, for every
    spacing) and abar_{t'} = 1 (`set_alpha_to_one`) or abar_0 below t = 0. eta = 0 is the
    deterministic DDIM; eta = 1 is DDPM's ancestral sampling.
    """

    defaults = dict(
        **BETA_DEFAULTS, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
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
