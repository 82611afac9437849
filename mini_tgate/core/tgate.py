"""TGATE: temporally gating the attention (Liu et al., "Faster Diffusion via Temporal Attention
Decomposition", arXiv 2404.02747), the whole schedule in one place.

Cross-attention (CA) outputs converge within the first few denoising steps; self-attention (SA)
matters little early and a lot later. So denoising is split at the gate step m:

- semantics-planning phase (i < m): CA is computed; SA is computed during `warm_up`, then
  computed and cached every `sp_interval` steps and the cache reused in between;
- at i == m-1 both are computed and cached; with classifier-free guidance (CFG) the cache is
  the mean of the unconditional and conditional halves of the doubled batch;
- fidelity-improving phase (i >= m): CA is never computed again, its cache is reused; SA is
  cached every `fi_interval` steps and reused in between; CFG is dropped: the batch is one
  branch alone and its noise prediction is used as it is (the unconditional one for text to
  image, the conditional one for SVD: each pipeline's `gated_branch`, as the reference does).

`plan()` below is a pure function from the parameters to what every attention layer does at
each step; it reproduces `tgate_scheduler` of the authors' `tgate` 1.0.0 package step for step.
The pipeline hands each step's `StepPlan` to the denoiser's `set_gate` (attention.set_gate for
PixArt's transformer; the UNet adds DeepCache's split), which sets the `gate` of every
`Attention` module (attention.py, the only place that acts on it).

With `DeepCache` (below) the plan also says which steps run the whole UNet and which only its
shallow branch; the UNet keeps the deep feature like an attention keeps its output. Together
they reproduce the authors' `TgateSDDeepCacheLoader` / `TgateSDXLDeepCacheLoader`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .bounds import is_int

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
            if not (is_int(value) and value >= low):
                raise ValueError(f"TGate {name} must be an integer >= {low}, got {value!r}")
            object.__setattr__(self, name, int(value))  # a numpy integer becomes a Python one


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
            if not (is_int(value) and value >= low):
                raise ValueError(f"DeepCache {name} must be an integer >= {low}, got {value!r}")
            object.__setattr__(self, name, int(value))


def check_gate_types(tgate, deepcache) -> None:
    """A TypeError unless `tgate` is a TGate or None and `deepcache` a DeepCache or None."""
    if tgate is not None and not isinstance(tgate, TGate):
        raise TypeError(f"tgate must be a mini_tgate.TGate or None, got {type(tgate).__name__}")
    if deepcache is not None and not isinstance(deepcache, DeepCache):
        raise TypeError(f"deepcache must be a mini_tgate.DeepCache or None, got {type(deepcache).__name__}")


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


def plan(tgate: TGate | None, num_steps: int, cfg: bool, deepcache: DeepCache | None = None) -> list[StepPlan]:
    """What every attention layer (and, with DeepCache, the UNet's deep part) does at each of
    `num_steps` steps (see the module docstring)."""
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
