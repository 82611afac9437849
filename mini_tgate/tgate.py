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

With `DeepCache` (below) the plan also says which steps run the whole UNet and which only its
shallow branch; the UNet keeps the deep feature like an attention keeps its output. Together
they reproduce the authors' `TgateSDDeepCacheLoader` / `TgateSDXLDeepCacheLoader`.

`AdaptiveTGate` (beyond the paper) chooses m at run time, when this generation's cross-attention
has settled; the pipeline then hands that m to the same `plan()` for the remaining steps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

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
class DeepCache:
    """DeepCache (Ma et al., "DeepCache: Accelerating Diffusion Models for Free", arXiv 2312.00858):
    the UNet's high-level features change little from one step to the next, so only every
    `interval`-th step runs the whole UNet; the steps between run its shallow branch alone (the
    time embedding, `conv_in`, the outermost layers of the down and up paths, `conv_out`), fed
    with the deep feature the last full step handed to it.

    interval: a full step every `interval` steps (1: every step is full).
    branch: where the deep part begins, in the DeepCache package's numbering: up/down block
        `branch // 3` (0 is the outermost), layer `branch % 3` in it. 0 is the shallowest branch
        (the cheapest steps); the largest, 3 x blocks - 1, skips only the mid block.
    """

    interval: int = 3
    branch: int = 0

    def __post_init__(self):
        for name, low in (("interval", 1), ("branch", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"DeepCache {name} must be an integer >= {low}, got {value!r}")


@dataclass(frozen=True)
class StepPlan:
    cross_attn: str  # what cross-attention layers do: COMPUTE / CACHE / CACHE_MEAN / REUSE
    self_attn: str   # what self-attention layers do (those in the deep part: deep_self_attn)
    cfg: bool        # whether the UNet runs the doubled [unconditional, conditional] batch
    # DeepCache only (defaults: no DeepCache, the UNet runs whole)
    branch: int | None = None  # DeepCache's branch: where the UNet's deep part begins
    deep: str = COMPUTE        # the deep part, like an attention: COMPUTE; CACHE (compute, keep the feature
    #                            it hands the shallow branch); REUSE (a shallow step: skip it, use the kept feature)
    deep_self_attn: str | None = None  # what self-attention inside the deep part does on a full step


def plan(tgate: TGate | AdaptiveTGate | None, num_steps: int, cfg: bool,
         deepcache: DeepCache | None = None) -> list[StepPlan]:
    """What every attention layer (and, with DeepCache, the UNet's deep part) does at each of
    `num_steps` steps (see the module docstring)."""
    if isinstance(tgate, AdaptiveTGate):
        # Undecided: the plan of its latest gate, with cross-attention kept (CACHE) at the steps
        # whose change could still move the gate earlier, for the pipeline to measure. Once it
        # decides m, it re-plans the remaining steps with plan(tgate.fixed(m), ...).
        steps = plan(tgate.fixed(tgate.max_gate_step), num_steps, cfg, deepcache)
        return [replace(s, cross_attn=CACHE) if i < tgate.max_gate_step - 2 else s for i, s in enumerate(steps)]
    m = tgate.gate_step if tgate is not None else None
    # DeepCache: a full step when (i - anchor) % interval == 0. The anchor is step 0, and with TGATE
    # also m-1 (every attention must run to cache its CFG mean) and m (the batch halves): tgate's
    # loaders force those two full and restart the interval from m.
    full, anchor = [], 0
    for i in range(num_steps):
        anchor = i if tgate is not None and i in (m - 1, m) else anchor
        full.append(deepcache is None or (i - anchor) % deepcache.interval == 0)
    mean = CACHE_MEAN if cfg else CACHE  # without CFG there is nothing to average
    steps, deep_sa_cached = [], False  # deep_sa_cached: has a full step cached the deep part's self-attention?
    for i in range(num_steps):
        if tgate is None:
            ca, sa, doubled = COMPUTE, COMPUTE, cfg
        elif i < m - 1:    # semantics planning
            k, warm_up = tgate.sp_interval, tgate.warm_up
            ca, sa, doubled = COMPUTE, COMPUTE if i < warm_up else CACHE if i == warm_up or i % k == 0 else REUSE, cfg
        elif i == m - 1:  # the gate
            ca, sa, doubled = mean, mean, cfg
        else:             # fidelity improving: CFG dropped
            ca, sa, doubled = REUSE, CACHE if i % tgate.fi_interval == 0 else REUSE, False
        if deepcache is None:
            steps.append(StepPlan(ca, sa, doubled))
            continue
        # Attention in the deep part runs on full steps only, so a cache step that was shallow
        # wrote nothing there: it reuses the last full step's cache, or, with none yet, computes
        # (tgate's `reuse and cache != None`). Cross-attention never meets this: its only cache
        # step, m-1, is always full.
        deep_sa = COMPUTE if sa == REUSE and not deep_sa_cached else sa
        deep_sa_cached |= full[i] and sa in (CACHE, CACHE_MEAN)
        next_shallow = i + 1 < num_steps and not full[i + 1]
        deep = (CACHE if next_shallow else COMPUTE) if full[i] else REUSE
        steps.append(StepPlan(ca, sa, doubled, deepcache.branch, deep, deep_sa))
    return steps


@dataclass(frozen=True)
class AdaptiveTGate:
    """A gate step chosen per generation from its own cross-attention convergence (beyond the
    paper; examples/adaptive_gate.py measures whether it pays). Accepted wherever a TGate is.

    During the semantics-planning phase the pipeline measures after each step i >= 1 how much the
    cross-attention outputs changed since step i-1 (`cross_attention_change`). The first time every
    image of the batch changed by less than `tolerance`, step i+1 becomes the caching step, so the
    gate step is m = i + 2 (a change is known only once its step has run, and the caching step
    must compute): one decision per batch, made when its slowest image has settled. No m below
    `min_gate_step` is taken (nor below 3: the first change is known after step 1); without a
    decision the gate step is `max_gate_step`. Until the decision the run is step for step that
    of TGate(max_gate_step, ...), after it that of TGate(m, ...): the pipeline re-plans the
    remaining steps with `plan(gate.fixed(m), ...)` and records m in `out.steps`, so replaying the
    run with `gate.fixed(m)` draws the same images.

    tolerance: the largest relative change (per image, mean over cross-attention layers) that
        counts as settled; 0 never settles.
    min_gate_step, max_gate_step: the range of m.
    sp_interval, fi_interval, warm_up: as TGate's (the paper's SD defaults).
    """

    tolerance: float = 0.03
    min_gate_step: int = 3
    max_gate_step: int = 10
    sp_interval: int = 5
    fi_interval: int = 1
    warm_up: int = 2

    def __post_init__(self):
        t = self.tolerance
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 <= t < float("inf"):
            raise ValueError(f"AdaptiveTGate tolerance must be a finite number >= 0, got {t!r}")
        self.fixed(self.min_gate_step)  # TGate's checks of the shared parameters
        self.fixed(self.max_gate_step)
        if self.min_gate_step > self.max_gate_step:
            raise ValueError(f"AdaptiveTGate min_gate_step ({self.min_gate_step}) must not exceed "
                             f"max_gate_step ({self.max_gate_step})")

    def fixed(self, gate_step: int) -> TGate:
        """The fixed gate with this gate step and the same self-attention parameters."""
        return TGate(gate_step, self.sp_interval, self.fi_interval, self.warm_up)

    def decide(self, i: int, change: torch.Tensor) -> int | None:
        """The gate step, once step i's change (one value per image) is known; None: not yet."""
        m = i + 2
        if self.min_gate_step <= m < self.max_gate_step and bool((change < self.tolerance).all()):
            return m
        return None


def cross_attention_change(previous: list[torch.Tensor], current: list[torch.Tensor], cfg: bool) -> torch.Tensor:
    """Per image: the mean over cross-attention layers of ||A_i - A_{i-1}|| / ||A_i||, where A is
    what the gate would cache, the mean of the two CFG halves (without CFG the output itself).
    Reusing the cache at later steps makes an error of exactly this kind; the outputs are computed
    anyway, so it costs a few elementwise passes over them (float32)."""
    total = 0
    for before, now in zip(previous, current):
        if cfg:  # the batch is [unconditional, conditional]
            before, now = (sum(before.chunk(2)) / 2, sum(now.chunk(2)) / 2)
        before, now = before.flatten(1).float(), now.flatten(1).float()
        total = total + (now - before).norm(dim=1) / now.norm(dim=1)
    return total / len(current)
