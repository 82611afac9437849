"""TGATE: temporally gating the attention (Liu et al., "Faster Diffusion via Temporal Attention
Decomposition", arXiv 2404.02747), the whole schedule in one place.

Cross-attention (CA) outputs converge within the first few denoising steps; self-attention (SA)
matters little early and a lot later. So denoising is split at the gate step m:

- semantics-planning phase (i < m): CA is computed; SA is computed during `warm_up`, then
  computed and cached every `sp_interval` steps and the cache reused in between;
- at i == m-1 both are computed and cached; with classifier-free guidance (CFG) the cache is
  the mean of the unconditional and conditional halves of the doubled batch;
- fidelity-improving phase (i >= m): CA is never computed again, its cache is reused; SA is
  cached every `fi_interval` steps and reused in between; CFG is dropped: the batch is the
  unconditional branch alone and its noise prediction is used as it is.

`plan()` below is a pure function from the parameters to what every attention layer does at
each step; it reproduces `tgate_scheduler` of the authors' `tgate` 1.0.0 package step for step.
The pipeline hands each step's `StepPlan` to `UNet2DConditionModel.set_gate`, which sets the
`gate` of every `Attention` module (attention.py, the only place that acts on it).
"""

from __future__ import annotations

from dataclasses import dataclass

# What one attention module does at one step (attention.py acts on these).
COMPUTE = "compute"        # compute, keep nothing
CACHE = "cache"            # compute and cache the output
CACHE_MEAN = "cache_mean"  # compute; cache the mean of the batch's two CFG halves
REUSE = "reuse"            # skip the computation, return the cached output


@dataclass(frozen=True)
class TGate:
    """Gate parameters: the paper's defaults for SD/SDXL at 25 steps.

    gate_step (m): first step at which cross-attention is reused and CFG dropped (>= 1; a gate
        step >= the number of steps means no fidelity-improving phase at all).
    sp_interval (k): self-attention cache interval before the gate (1: never reused).
    fi_interval: self-attention cache interval after the gate (1: never reused).
    warm_up: steps at the start whose self-attention is always computed (>= 0).
    """

    gate_step: int = 10
    sp_interval: int = 5
    fi_interval: int = 1
    warm_up: int = 2

    def __post_init__(self):
        for name, low in (("gate_step", 1), ("sp_interval", 1), ("fi_interval", 1), ("warm_up", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"TGate {name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class StepPlan:
    cross_attn: str  # what cross-attention layers do: COMPUTE / CACHE / CACHE_MEAN / REUSE
    self_attn: str   # what self-attention layers do
    cfg: bool        # whether the UNet runs the doubled [unconditional, conditional] batch


def plan(tgate: TGate | None, num_steps: int, cfg: bool) -> list[StepPlan]:
    """What every attention layer does at each of `num_steps` steps (see the module docstring)."""
    if tgate is None:
        return [StepPlan(COMPUTE, COMPUTE, cfg)] * num_steps
    m, k, fi, warm_up = tgate.gate_step, tgate.sp_interval, tgate.fi_interval, tgate.warm_up
    mean = CACHE_MEAN if cfg else CACHE  # without CFG there is nothing to average
    steps = []
    for i in range(num_steps):
        if i < m - 1:    # semantics planning
            sa = COMPUTE if i < warm_up else CACHE if i == warm_up or i % k == 0 else REUSE
            steps.append(StepPlan(COMPUTE, sa, cfg))
        elif i == m - 1:  # the gate
            steps.append(StepPlan(mean, mean, cfg))
        else:            # fidelity improving: CFG dropped
            steps.append(StepPlan(REUSE, CACHE if i % fi == 0 else REUSE, False))
    return steps
