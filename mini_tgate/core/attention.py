"""Attention for the UNet: one class for self- and cross-attention, with the TGATE gate built in.

Reimplements diffusers' `Attention` + `AttnProcessor2_0` (diffusers/models/attention_processor.py)
as the UNet's transformer blocks use it: `to_q`, `to_k`, `to_v` without bias, `to_out.0` with
bias, no norms inside. Key names match the checkpoint's. The PixArt transformer (pixart.py) uses
the same class with two options: `bias=True` (biases on `to_q/k/v`, its `attention_bias`) and an
additive `mask` on the scores (its text padding mask as a bias of 0 or -10000).

The gate (see tgate.py for the schedule): each module holds `gate`, a plain string set by
`set_gate` (below; the UNet adds DeepCache's split to it) before each step, and `cache`, the output it keeps:

    COMPUTE     compute the output                      (every step without TGATE)
    CACHE       compute it and keep it
    CACHE_MEAN  compute it and keep the mean of the two CFG halves of the batch
    REUSE       return the kept output, computing nothing

The gate is a Python value, not a tensor, so a compiled UNet sees it as a constant: one graph
per distinct (cross, self, batch) combination, never one per step. Under torch.compile,
`self.cache = out` is a side effect that dynamo replays after the graph has run (the tensor is one
more output of the graph), and REUSE reads the cache as a graph input, guarded on its shape and
strides but not its identity: a new cache tensor every few steps recompiles nothing.

CUDA graphs (compile(mode="reduce-overhead")) replay into fixed memory, so a cache that is a
graph's output would be overwritten by the next replay. There the caches are static: buffers
made before the first step (runtime.make_static_caches), `static` set, written in place (`keep`)
and read as slices of the batch's rows; their addresses never change, so one graph per step plan
replays them all.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .tgate import CACHE, CACHE_MEAN, COMPUTE, REUSE


class Attention(nn.Module):
    def __init__(self, query_dim: int, heads: int, dim_head: int, context_dim: int | None = None,
                 upcast: bool = False, bias: bool = False):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.is_cross = context_dim is not None
        self.upcast = upcast  # SD-2.1's `upcast_attention`: scores in float32 when running in half
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim)])
        self.gate = COMPUTE
        self.cache: torch.Tensor | None = None
        self.static = False  # the cache is a static buffer, written in place (CUDA graphs; see keep)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask`: None, or an additive bias on the scores that broadcasts to (B, heads, T, S)."""
        if self.gate == REUSE:
            cache = rows(self.cache, x.shape[0])
            return cache.expand(-1, x.shape[1], -1) if cache.shape[1] == 1 else cache
        out = self.attend(x, x if context is None else context, mask)
        # One key (SVD's image token): its softmax weight is exactly 1, so every query's row is the
        # same to_out(v), bit for bit. The cache keeps that one row, (B, 1, C) instead of (B, N, C),
        # and REUSE hands back a view of it expanded to N rows: no copy, the same bits in the sum.
        kept = out[:, :1] if context is not None and context.shape[1] == 1 and mask is None else out
        if self.gate == CACHE:
            kept = kept if kept is out or self.static else kept.clone()  # a slice would keep all of `out` alive
            self.cache = keep(self, kept)
        elif self.gate == CACHE_MEAN:
            uncond, cond = kept.chunk(2)  # the batch is [unconditional, conditional]
            self.cache = keep(self, (uncond + cond) / 2)
        return out

    def attend(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.to_q(x).view(B, T, self.heads, -1).transpose(1, 2)  # (B, heads, T, head_dim)
        k = self.to_k(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)  # (B, heads, S, head_dim)
        v = self.to_v(context).view(B, context.shape[1], self.heads, -1).transpose(1, 2)
        dtype = q.dtype
        if self.upcast and dtype in (torch.float16, torch.bfloat16):
            q, k, v = q.float(), k.float(), v.float()
        if mask is not None:
            mask = mask.to(q.dtype)  # SDPA wants a float mask in the scores' dtype
        # softmax(q @ k^T / sqrt(head_dim) + mask) @ v, fused
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).to(dtype)  # (B, heads, T, head_dim)
        y = y.transpose(1, 2).reshape(B, T, -1)                 # (B, T, heads * head_dim)
        return self.to_out[0](y)


def keep(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What `module` (an Attention, or the UNet's deep feature) caches: `x` itself, or, when its
    cache is a static buffer, the buffer with x written into its first rows (a CUDA graph replays
    reads and writes at the buffer's address). The old cache is read only then: under
    torch.compile, reading it would guard on it, None before the first cache step and a tensor
    after, and recompile the same step plan."""
    if not module.static:
        return x
    module.cache[:x.shape[0]].copy_(x)
    return module.cache


def rows(cache: torch.Tensor, n: int) -> torch.Tensor:
    """A cache's first n rows, this step's batch (a static buffer may have more: CFG's 2B)."""
    return cache if cache.shape[0] == n else cache[:n]


def attention_modules(model: nn.Module) -> list[Attention]:
    """The attention layers of `model`. A denoiser lists them once, when it is built, as
    `attention_layers`: set_gate runs every step, and walking a UNet's two thousand modules each
    time costs milliseconds, longer than a GPU's cheapest steps."""
    return [m for m in model.modules() if isinstance(m, Attention)]


def set_gate(model: nn.Module, step) -> None:
    """Tell every attention layer of `model` what to do at this step (a tgate.StepPlan): cross-
    attention layers follow `step.cross_attn`, self-attention layers `step.self_attn`."""
    for m in model.attention_layers:
        m.gate = step.cross_attn if m.is_cross else step.self_attn


def clear_gate(model: nn.Module) -> None:
    """Every attention layer of `model` back to plain computation, its cache freed (a static one
    zeroed, kept for the next call's graphs): a generation ends."""
    for m in model.attention_layers:
        m.gate, m.cache = COMPUTE, m.cache.zero_() if m.static else None
