"""DPM-Solver++ 2M and its SDE variant (Lu et al. 2022), diffusers' DPMSolverMultistepScheduler."""

from __future__ import annotations

import numpy as np
import torch

from .base import (BETA_DEFAULTS, StepOutput, VPScheduler, karras_sigmas, multistep_timesteps, randn_tensor,
                   sigma_to_t, vp_alpha_sigma_lambda, vp_x0)


class DPMSolverMultistepScheduler(VPScheduler):
    """DPM-Solver++(2M), Lu et al. 2022 (arXiv 2211.01095) Algorithm 2 (multistep, data
    prediction); diffusers' scheduling_dpmsolver_multistep.py. With alpha = 1/sqrt(1 + sigma^2),
    sigma_vp = sigma alpha, lambda = log(alpha / sigma_vp) and h = lambda_t - lambda_s:

        x_t = (sigma_vp_t / sigma_vp_s) x_s - alpha_t (e^-h - 1) (D0 + D1 / 2)     ("midpoint")
        D0  = x0_s,   D1 = (x0_s - x0_prev) / r,   r = (lambda_s - lambda_prev) / h

    The first step, and the last when `lower_order_final` and fewer than 15 steps (always when
    the final sigma is 0), drop D1: that first-order step is DDIM. `solver_type="heun"` replaces
    the D1 term by + alpha_t ((e^-h - 1) / h + 1) D1.

    algorithm_type="sde-dpmsolver++" (A1111's "DPM++ 2M SDE"; Lu et al. 2022 sec. 5, the SDE
    counterpart of the same data-prediction solver) adds fresh noise z ~ N(0, I) each step,
    drawn as diffusers draws it (float32, from the step's generator):

        x_t = (sigma_vp_t / sigma_vp_s) e^-h x_s + alpha_t (1 - e^-2h) (D0 + D1 / 2)
              + sigma_vp_t sqrt(1 - e^-2h) z

    ("heun": the D1 term is alpha_t ((1 - e^-2h) / (-2h) + 1) D1).
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
            algorithm_type=("dpmsolver++", "sde-dpmsolver++"), solver_order=(1, 2), solver_type=("midpoint", "heun"),
            thresholding=(False,), use_exponential_sigmas=(False, None), use_beta_sigmas=(False, None),
            use_lu_lambdas=(False, None), use_flow_sigmas=(False, None), final_sigmas_type=("zero", "sigma_min"),
            lambda_min_clipped=(-float("inf"),), variance_type=(None,),
        )
        self.sigmas = None

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
        else:
            timesteps = multistep_timesteps(c, n)
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

    def _reset_state(self) -> None:
        self.prev_x0 = None  # no history yet: a first-order step first

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        """One step; `timestep` must be `.timesteps[step_index]` (steps are counted, in order)."""
        if self.sigmas is None:
            raise ValueError("call set_timesteps first")
        c, i, n = self.config, self.step_index, self.num_inference_steps
        alpha_s, sigma_s, lambda_s = vp_alpha_sigma_lambda(self.sigmas[i])
        alpha_t, sigma_t, lambda_t = vp_alpha_sigma_lambda(self.sigmas[i + 1])
        x0 = vp_x0(c.prediction_type, model_output, sample, alpha_s, sigma_s)
        final_first_order = i == n - 1 and (
            c.euler_at_final or (c.lower_order_final and n < 15) or c.final_sigmas_type == "zero"
        )
        x, sde = sample.to(torch.float32), c.algorithm_type == "sde-dpmsolver++"
        h = lambda_t - lambda_s
        if sde:  # the same float32 draw as diffusers', at every step
            z = randn_tensor(model_output.shape, generator, model_output.device, torch.float32)
            prev = (sigma_t / sigma_s * torch.exp(-h)) * x + (alpha_t * (1 - torch.exp(-2.0 * h))) * x0
        else:
            prev = (sigma_t / sigma_s) * x - (alpha_t * (torch.exp(-h) - 1.0)) * x0  # first order (DDIM)
        if c.solver_order == 2 and self.prev_x0 is not None and not final_first_order:
            prev = prev + self._second_order_term(x0, h, lambda_s, alpha_t, sde)
        if sde:
            prev = prev + sigma_t * torch.sqrt(1.0 - torch.exp(-2 * h)) * z
        self.step_index, self.prev_x0 = i + 1, x0
        return StepOutput(prev.to(model_output.dtype), x0)

    def _second_order_term(self, x0, h, lambda_s, alpha_t, sde: bool):
        """What the second-order step adds to the first-order one: a multiple of
        D1 = (x0 - x0_prev) / r, as diffusers computes it."""
        lambda_prev = vp_alpha_sigma_lambda(self.sigmas[self.step_index - 1])[2]
        r = (lambda_s - lambda_prev) / h
        D1 = (1.0 / r) * (x0 - self.prev_x0)
        midpoint = self.config.solver_type == "midpoint"
        if sde:
            if midpoint:
                return 0.5 * (alpha_t * (1 - torch.exp(-2.0 * h))) * D1
            return (alpha_t * ((1.0 - torch.exp(-2.0 * h)) / (-2.0 * h) + 1.0)) * D1
        if midpoint:
            return -(0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1)
        return (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)) * D1
