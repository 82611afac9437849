"""PNDM / PLMS (Liu et al. 2022), diffusers' PNDMScheduler: Stable Diffusion 1.x's own."""

from __future__ import annotations

import numpy as np
import torch

from .base import BETA_DEFAULTS, Scheduler, StepOutput, spaced_timesteps


class PNDMScheduler(Scheduler):
    """Pseudo numerical methods, Liu et al. 2022 (arXiv 2202.09778); diffusers' scheduling_pndm.py.
    Every step moves x_t to x_{t'} by the transfer of eq. 9 (DDIM's step, written with abar),

        x_{t'} = sqrt(abar_t' / abar_t) x_t - (abar_t' - abar_t) e / (abar_t sqrt(1 - abar_t')
                 + sqrt(abar_t (1 - abar_t) abar_t'))

    with e a combination of model outputs. PLMS (eq. 12, linear multistep): e = (55 e_0 - 59 e_1
    + 37 e_2 - 9 e_3) / 24 of this and the 3 previous outputs (fewer at first: 2nd and 3rd order
    Adams-Bashforth). Its start, as diffusers: with `skip_prk_steps` (SD's configs, A1111's PLMS)
    the first step is taken twice, Euler then the average of both ends' outputs, so n steps make
    n + 1 timesteps with one repeated; without it, 3 pseudo Runge-Kutta steps (4 evaluations
    each, eq. 13) start it. The calls are counted (`counter`) from the first run, as diffusers'.
    """

    defaults = dict(
        **BETA_DEFAULTS, skip_prk_steps=False, set_alpha_to_one=False, prediction_type="epsilon",
        timestep_spacing="leading", steps_offset=0,
    )

    def __init__(self, **config):
        super().__init__(**config)
        self._require(prediction_type=("epsilon", "v_prediction"))  # diffusers: no "sample"
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self.prk_timesteps = np.array([], dtype=np.int64)

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        self._check_steps(num_inference_steps, timesteps, sigmas)
        c, n, T = self.config, num_inference_steps, self.config.num_train_timesteps
        ts = spaced_timesteps(c, n)[::-1].round().astype(np.int64)  # ascending
        if c.skip_prk_steps:
            self.prk_timesteps = np.array([], dtype=np.int64)
            plms = np.concatenate([ts[:-1], ts[-2:-1], ts[-1:]])[::-1]
        else:
            if n < 4:
                raise ValueError(f"PNDMScheduler without skip_prk_steps needs num_inference_steps >= 4 (its "
                                 f"Runge-Kutta start takes 4 timesteps), got {n}")
            prk = ts[-4:].repeat(2) + np.tile(np.array([0, T // n // 2]), 4)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1].copy()
            plms = ts[:-3][::-1]
        timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64)
        if timesteps.max() > T - 1:
            raise ValueError(f"num_inference_steps={n} with timestep_spacing={c.timestep_spacing!r} and steps_offset="
                             f"{c.steps_offset} would start past timestep {T - 1}; give fewer steps")
        self._set(torch.from_numpy(timesteps), device, n)

    def _reset_state(self) -> None:
        self.counter, self.ets, self.cur_model_output, self.cur_sample = 0, [], 0, None

    def step(self, model_output, timestep, sample, generator=None) -> StepOutput:
        """One call, in order; `timestep` is the entry of `.timesteps` it is at (a Python number)."""
        self._check_set()
        if self.counter < len(self.prk_timesteps) and not self.config.skip_prk_steps:
            out = self._step_prk(model_output, int(timestep), sample)
        else:
            out = self._step_plms(model_output, int(timestep), sample)
        self.counter += 1
        return out

    def _step_prk(self, model_output, timestep: int, sample) -> StepOutput:
        """Pseudo Runge-Kutta: 4 calls per step, outputs weighted 1/6, 1/3, 1/3, 1/6."""
        k = self.counter
        prev_t = timestep - (0 if k % 2 else self.config.num_train_timesteps // self.num_inference_steps // 2)
        if k % 4 == 0:
            self.cur_model_output += 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif k % 4 in (1, 2):
            self.cur_model_output += 1 / 3 * model_output
        else:
            model_output = self.cur_model_output + 1 / 6 * model_output
            self.cur_model_output = 0
        cur_sample = self.cur_sample if self.cur_sample is not None else sample
        return self._transfer(cur_sample, int(self.prk_timesteps[k // 4 * 4]), prev_t, model_output)

    def _step_plms(self, model_output, timestep: int, sample) -> StepOutput:
        if not self.config.skip_prk_steps and len(self.ets) < 3:
            raise ValueError("PNDMScheduler: the PLMS steps need the 12 Runge-Kutta calls first (run the "
                             "timesteps in order from the first)")
        stride = self.config.num_train_timesteps // self.num_inference_steps
        t, prev_t, ets = timestep, timestep - stride, self.ets
        if self.counter != 1:
            ets = self.ets = [*ets[-3:], model_output]
        else:  # the first step again, from its start, with the average of both ends' outputs
            t, prev_t = timestep + stride, timestep
        if len(ets) == 1 and self.counter == 0:
            self.cur_sample = sample
        elif len(ets) == 1 and self.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample, self.cur_sample = self.cur_sample, None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])
        return self._transfer(sample, t, prev_t, model_output)

    def _transfer(self, sample, t: int, prev_t: int, model_output) -> StepOutput:
        """Eq. 9 from t to prev_t (abar = 1 or abar_0 below 0); the x_0 its output implies."""
        abar_t = self.alphas_cumprod[t]
        abar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_t, beta_prev = 1 - abar_t, 1 - abar_prev
        if self.config.prediction_type == "v_prediction":
            model_output = (abar_t**0.5) * model_output + (beta_t**0.5) * sample
        sample_coeff = (abar_prev / abar_t) ** 0.5
        denom = abar_t * beta_prev ** (0.5) + (abar_t * beta_t * abar_prev) ** (0.5)
        prev = sample_coeff * sample - (abar_prev - abar_t) * model_output / denom
        return StepOutput(prev, (sample - beta_t**0.5 * model_output) / abar_t**0.5)
