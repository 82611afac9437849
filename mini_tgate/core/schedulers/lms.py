"""Linear multistep (LMS, k-diffusion's sample_lms), diffusers' LMSDiscreteScheduler."""

from __future__ import annotations

import numpy as np
import torch
from numpy.polynomial import polynomial as P

from .base import BETA_DEFAULTS, StepOutput, sigma_schedule, sigma_x0, spaced_timesteps
from .euler import SigmaScheduler


def lms_coefficient(sigmas: np.ndarray, order: int, i: int, j: int) -> float:
    """The integral from sigmas[i] to sigmas[i + 1] of the Lagrange basis polynomial of node
    sigmas[i - j] over the nodes sigmas[i], ..., sigmas[i - order + 1]: the weight of the
    derivative j steps back. Exact (numpy polynomial product and antiderivative, float64) where
    diffusers integrates numerically with scipy.integrate.quad."""
    nodes = [float(sigmas[i - k]) for k in range(order) if k != j]
    basis = P.polyfromroots(nodes) / np.prod([float(sigmas[i - j]) - s for s in nodes])
    antiderivative = P.polyint(basis)
    return float(P.polyval(float(sigmas[i + 1]), antiderivative) - P.polyval(float(sigmas[i]), antiderivative))


class LMSDiscreteScheduler(SigmaScheduler):
    """Linear multistep sampling in sigma (k-diffusion's sample_lms, after Karras et al. 2022,
    arXiv 2206.00364); diffusers' scheduling_lms_discrete.py. In the variable x of noise level
    sigma (see `SigmaScheduler`), with the derivatives d_k = (x_k - x0_k) / sigma_k of the last
    `order` (4) steps:

        x_{i+1} = x_i + sum_j c_j d_{i-j},   c_j = integral from sigma_i to sigma_{i+1} of l_j

    where l_j is the Lagrange basis polynomial through sigma_i, ..., sigma_{i-order+1} that is 1
    at sigma_{i-j}. The order is min(step index + 1, order): as in diffusers, an img2img run
    that starts at step k > 0 uses the order-(k + 1) weights with its one derivative at first.
    The steps are counted (from `begin_index`), as in diffusers.
    """

    counted = True
    defaults = dict(
        **BETA_DEFAULTS, use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False,
        prediction_type="epsilon", timestep_spacing="linspace", steps_offset=0,
    )

    def __init__(self, **config):
        super().__init__(**config)
        self._require(use_exponential_sigmas=(False, None), use_beta_sigmas=(False, None))

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        self._check_steps(num_inference_steps, timesteps, sigmas)
        n, train = num_inference_steps, self._train_sigmas()
        timesteps = spaced_timesteps(self.config, n).astype(np.float32)
        sigmas, timesteps = sigma_schedule(timesteps, train, self.config.use_karras_sigmas, n)
        self.sigmas = torch.from_numpy(np.append(sigmas, 0.0).astype(np.float32))
        self._set(torch.from_numpy(timesteps).to(torch.float32), device, n)

    def _reset_state(self) -> None:
        self.derivatives = []  # the last `order` steps' d, oldest first

    def step(self, model_output, timestep, sample, order: int = 4, generator=None) -> StepOutput:
        self._check_set()
        i, sigmas = self.step_index, self.sigmas.numpy()
        sigma = self.sigmas[i]
        x0 = sigma_x0(self.config.prediction_type, model_output, sample, sigma)
        self.derivatives = [*self.derivatives, (sample - x0) / sigma][-order:]
        weights = [lms_coefficient(sigmas, min(i + 1, order), i, j) for j in range(min(i + 1, order))]
        self.step_index = i + 1
        return StepOutput(sample + sum(c * d for c, d in zip(weights, reversed(self.derivatives))), x0)
