"""DPM-Solver++ 2M (Lu et al. 2022), diffusers' DPMSolverMultistepScheduler."""

from __future__ import annotations

import numpy as np
import torch

from .base import BETA_DEFAULTS, Scheduler, StepOutput, karras_sigmas, sigma_to_t, spaced_timesteps


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
        **BETA_DEFAULTS, solver_order=2, prediction_type="epsilon", thresholding=False, algorithm_type="dpmsolver++",
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
