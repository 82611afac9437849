"""UniPC (Zhao et al. 2023), diffusers' UniPCMultistepScheduler."""

from __future__ import annotations

import numpy as np
import torch

from ..bounds import is_int
from ..config import ConfigError
from .base import (BETA_DEFAULTS, StepOutput, VPScheduler, karras_sigmas, multistep_timesteps, sigma_to_t,
                   vp_alpha_sigma_lambda, vp_x0)


class UniPCMultistepScheduler(VPScheduler):
    """UniPC, Zhao et al. 2023 (arXiv 2302.04867): the multistep predictor UniP-p (Algorithm 2)
    and, from the second step on, the corrector UniC (Algorithm 1), which re-solves the last step
    with this step's model output at no extra evaluation; diffusers' scheduling_unipc_multistep.py.
    In the VP variables (alpha, sigma_vp, lambda = log(alpha / sigma_vp)) with h = lambda_t -
    lambda_s and data prediction (`predict_x0`, the default) m = x0:

        x_t = (sigma_vp_t / sigma_vp_s) x_s - alpha_t (e^-h - 1) m_s - alpha_t B(h) sum_k rho_k D_k
        D_k = (m_{s_k} - m_s) / r_k,   r_k = (lambda_{s_k} - lambda_s) / h

    with B(h) = e^-h - 1 ("bh2", diffusers' default) or -h ("bh1"), and rho solving the order
    conditions R rho = b (order 2: rho = 1/2). Order `solver_order` (2), lower at the start, and
    at the end with `lower_order_final`. Sigmas and timesteps as DPM-Solver's.
    """

    defaults = dict(
        **BETA_DEFAULTS, solver_order=2, prediction_type="epsilon", thresholding=False,
        dynamic_thresholding_ratio=0.995, sample_max_value=1.0, predict_x0=True, solver_type="bh2",
        lower_order_final=True, disable_corrector=[], solver_p=None, use_karras_sigmas=False,
        use_exponential_sigmas=False, use_beta_sigmas=False, use_flow_sigmas=False, flow_shift=1.0,
        timestep_spacing="linspace", steps_offset=0, final_sigmas_type="zero", rescale_betas_zero_snr=False,
        use_dynamic_shifting=False, time_shift_type="exponential", sigma_min=None, sigma_max=None,
        shift_terminal=None,
    )

    def __init__(self, **config):
        super().__init__(**config)
        c = self.config
        if c.solver_type in ("midpoint", "heun", "logrho"):  # as diffusers: another solver's config
            c["solver_type"] = "bh2"
        self._require(
            solver_type=("bh1", "bh2"), solver_order=(1, 2, 3), predict_x0=(True, False), thresholding=(False,),
            solver_p=(None,), use_exponential_sigmas=(False, None), use_beta_sigmas=(False, None),
            use_flow_sigmas=(False, None), use_dynamic_shifting=(False, None), final_sigmas_type=("zero", "sigma_min"),
        )
        corrector = c.disable_corrector
        if not isinstance(corrector, (list, tuple)) or not all(is_int(i) for i in corrector):
            raise ConfigError(f"UniPCMultistepScheduler: disable_corrector must be a list of step indices, "
                              f"got {corrector!r}")
        self.sigmas = None

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        self._check_steps(num_inference_steps, timesteps, sigmas)
        c, n, train = self.config, num_inference_steps, self._train_sigmas()
        timesteps = multistep_timesteps(c, n)
        if c.use_karras_sigmas:
            lo = c.sigma_min if c.sigma_min is not None else train[0].item()
            hi = c.sigma_max if c.sigma_max is not None else train[-1].item()
            sigmas = karras_sigmas(lo, hi, n)
            timesteps = np.array([sigma_to_t(s, np.log(train)) for s in sigmas]).round()
            last = sigmas[-1]
        else:
            sigmas, last = np.interp(timesteps, np.arange(len(train)), train), train[0]
        last = 0.0 if c.final_sigmas_type == "zero" else last
        self.sigmas = torch.from_numpy(np.append(sigmas, last).astype(np.float32))
        self._set(torch.from_numpy(timesteps.astype(np.int64)), device, len(timesteps))

    def _reset_state(self) -> None:
        self.model_outputs = [None] * self.config.solver_order  # the last converted outputs, oldest first
        self.lower_order_nums, self.last_sample, self.this_order = 0, None, 1

    def _convert(self, model_output, sample):
        """The model output as UniPC uses it: x0 (predict_x0) or eps, at this step's sigma."""
        alpha, sigma_vp, _ = vp_alpha_sigma_lambda(self.sigmas[self.step_index])
        kind = self.config.prediction_type
        if self.config.predict_x0:
            return vp_x0(kind, model_output, sample, alpha, sigma_vp)
        if kind == "epsilon":
            return model_output
        if kind == "sample":
            return (sample - alpha * model_output) / sigma_vp
        return alpha * model_output + sigma_vp * sample

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        """One step: correct this step's input with its model output (UniC), then predict the
        next (UniP); `timestep` must be `.timesteps[step_index]` (steps are counted, in order)."""
        self._check_set()
        c, i = self.config, self.step_index
        converted = self._convert(model_output, sample)
        if i > 0 and i - 1 not in c.disable_corrector and self.last_sample is not None:
            sample = self._update(self.last_sample, i - 1, self.this_order, model_t=converted)
        self.model_outputs = [*self.model_outputs[1:], converted]
        order = min(c.solver_order, len(self.timesteps) - i) if c.lower_order_final else c.solver_order
        self.this_order = min(order, self.lower_order_nums + 1)  # warm-up: the history there is
        self.last_sample = sample
        prev = self._update(sample, i, self.this_order)
        self.lower_order_nums = min(self.lower_order_nums + 1, c.solver_order)
        self.step_index = i + 1
        return StepOutput(prev, converted)

    def _update(self, x, s: int, order: int, model_t=None):
        """UniP from sigmas[s] to sigmas[s + 1] with the last `order` converted outputs, or with
        `model_t` (the output at sigmas[s + 1]) UniC; each number as diffusers computes it."""
        ms, predict_x0 = self.model_outputs, self.config.predict_x0
        m0 = ms[-1]
        alpha_t, sigma_t, lambda_t = vp_alpha_sigma_lambda(self.sigmas[s + 1])
        alpha_s0, sigma_s0, lambda_s0 = vp_alpha_sigma_lambda(self.sigmas[s])
        h = lambda_t - lambda_s0
        rks, D1s = [], []
        for k in range(1, order):
            rk = (vp_alpha_sigma_lambda(self.sigmas[s - k])[2] - lambda_s0) / h
            rks.append(rk)
            D1s.append((ms[-(k + 1)] - m0) / rk)
        hh = -h if predict_x0 else h
        h_phi_1 = torch.expm1(hh)
        B_h = hh if self.config.solver_type == "bh1" else torch.expm1(hh)
        R, b = self._order_conditions(torch.stack([*rks, torch.ones(())]), hh, h_phi_1, B_h, order)
        if predict_x0:
            x_t, scale = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0, alpha_t
        else:
            x_t, scale = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0, sigma_t
        if model_t is None:
            if not D1s:
                return x_t
            rhos = torch.ones(1, dtype=x.dtype) * 0.5 if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
            res = self._combine(rhos.to(x.dtype), D1s)
        else:
            rhos = torch.ones(1, dtype=x.dtype) * 0.5 if order == 1 else torch.linalg.solve(R, b).to(x.dtype)
            res = rhos[-1] * (model_t - m0) if not D1s else self._combine(rhos[:-1], D1s) + rhos[-1] * (model_t - m0)
        return (x_t - scale * B_h * res).to(x.dtype)

    @staticmethod
    def _order_conditions(rks, hh, h_phi_1, B_h, order: int):
        """UniPC's linear system R rho = b: R_ik = r_k^(i-1), b_i = h phi_(i+1)(h) i! / B(h)."""
        R, b, factorial, h_phi_k = [], [], 1, h_phi_1 / hh - 1
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial / B_h)
            factorial *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial
        return torch.stack(R), torch.stack(b)

    @staticmethod
    def _combine(rhos, D1s):
        """sum_k rho_k D_k: diffusers' einsum, written with the host's scalars (no host-device copy)."""
        total = rhos[0] * D1s[0]
        for rho, D in zip(rhos[1:], D1s[1:]):
            total = total + rho * D
        return total
