"""Where a pipeline runs and who may run it: device and dtype moves, model CPU offload, the call
lock, the early stop, the progress bar and torch.compile. None of it is the method; the pipeline
(pipeline.py) inherits it so that its own class holds only the call and the loop."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from copy import deepcopy
from typing import Self

import torch

from .tgate import CACHE, CACHE_MEAN, COMPUTE, StepPlan


@contextmanager
def on_device(models: list, device):
    """Model CPU offload: the models on `device` for the block, back on the CPU after it.
    device None: leave them where they are."""
    if device is None:
        yield
        return
    for m in models:
        m.to(device)
    try:
        yield
    finally:
        for m in models:
            m.to("cpu")


@contextmanager
def timed(timings: dict, phase: str):
    """The seconds the block takes, as timings[phase]."""
    start = time.perf_counter()
    yield
    timings[phase] = time.perf_counter() - start


def progress_bar(total: int, config: dict):
    """A tqdm bar over the steps with the pipeline's options (set_progress_bar_config), or None."""
    if config.get("disable", False):
        return None
    from tqdm.auto import tqdm  # comes with huggingface-hub

    return tqdm(total=total, **{"unit": "step", **config})


def make_static_caches(denoiser, steps: list, x: torch.Tensor, t, kw: dict) -> None:
    """CUDA graphs replay into fixed memory, so a cache that a graph returns would be overwritten
    by the next replay. Compiled with them (compile(mode="reduce-overhead")), every cache the plan
    `steps` writes is a static buffer made here, before the first step: the denoiser runs once on
    the meta device (shapes only: no memory, no arithmetic, its compiled code bypassed) with every
    module caching, given the first step's inputs (the largest batch), and each cache that run
    made becomes a buffer of its shape on the real device, written in place from then on
    (attention.keep). The buffers are kept from call to call while the inputs' shapes and what
    is cached stay the same (the meta run, in Python, takes about a second for SDXL): the graphs
    recorded with their addresses replay on the next call."""
    writes = {CACHE, CACHE_MEAN}
    attention = CACHE if any({s.cross_attn, s.self_attn} & writes for s in steps) else COMPUTE
    deep = CACHE if any(s.deep == CACHE for s in steps) else COMPUTE
    key = (attention, deep, steps[0].branch, signature(x), signature(t), signature(kw))
    if denoiser.__dict__.get("static_key") == key:
        return
    denoiser.static_key = key
    modules = [m for m in denoiser.modules() if hasattr(m, "static") and hasattr(m, "cache")]
    kept = {m: m.cache if m.static else None for m in modules}
    for m in modules:
        m.static, m.cache = False, None
    if attention == COMPUTE and deep == COMPUTE:
        return  # nothing to cache: no TGATE, no DeepCache
    meta = {name: torch.empty_like(v, device="meta") for name, v in
            (*denoiser.named_parameters(), *denoiser.named_buffers())}
    denoiser.set_gate(StepPlan(attention, attention, True, steps[0].branch, deep, attention))
    with torch.compiler.set_stance("force_eager"):
        torch.func.functional_call(denoiser, meta, (x.to("meta"),), {"timestep": t.to("meta"), **to_meta(kw)})
    for m, old in kept.items():
        if m.cache is None:
            continue
        fits = old is not None and (old.shape, old.stride(), old.dtype) == (m.cache.shape, m.cache.stride(), m.cache.dtype)
        m.cache = old if fits else torch.empty_like(m.cache, device=x.device)
        torch._dynamo.mark_static_address(m.cache)
        m.static = True


def signature(value):
    """The shapes, dtypes and devices of a (nested dict of) tensor(s)."""
    if isinstance(value, dict):
        return tuple((k, signature(v)) for k, v in value.items())
    return (tuple(value.shape), value.dtype, value.device) if isinstance(value, torch.Tensor) else value


def to_meta(value):
    """A (nested dict of) tensor(s) on the meta device: its shapes, no memory."""
    if isinstance(value, dict):
        return {k: to_meta(v) for k, v in value.items()}
    return value.to("meta") if isinstance(value, torch.Tensor) else value


def offload_device(gpu_id: int | None, device) -> torch.device:
    """The device model CPU offload moves each part to: `device`, or this machine's accelerator;
    a RuntimeError now, not at the next call, where that device is missing."""
    if device is None:
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        if accelerator is None:
            raise RuntimeError("enable_model_cpu_offload() needs an accelerator (CUDA, ...) and this machine has "
                               "none; on the CPU the pipeline already keeps its weights there: leave offload off")
        device = accelerator.type
    device = torch.device(device)
    if gpu_id is not None:
        device = torch.device(device.type, gpu_id)
    count = device_count(device)
    if (device.index or 0) >= count:
        raise RuntimeError(f"enable_model_cpu_offload(device={str(device)!r}): this machine has no such "
                           f"device ({count} {device.type} device(s))")
    return device


def device_count(device: torch.device) -> int:
    """How many devices of this type this machine has (of the CPU: one); device i exists when i < that."""
    if device.type == "cpu":
        return 1
    backend = getattr(torch, device.type, None)
    return backend.device_count() if backend is not None and backend.is_available() else 0


class RuntimeMixin:
    """A pipeline's parts on their device and dtype, one call at a time. The class using it has
    `denoiser`, `vae` and `text_encoder` (SDXL: `text_encoders()` names both)."""

    def __init__(self):
        self.progress_bar_config = {}  # tqdm options; shown, as in diffusers, unless disable=True
        self.offload_device: torch.device | None = None  # see enable_model_cpu_offload
        # The lock of one generation at a time (see exclusive_call), and the thread holding it.
        self.call_lock, self.call_owner = threading.Lock(), None
        self._interrupt = False  # diffusers' early stop, set by a step callback
        self.static_caches = False  # caches in static buffers (compile's CUDA-graph modes; make_static_caches)
        # diffusers' attributes of the running (or last) call: its guidance scale, which a step
        # callback may change for the steps after it (see denoise), and its number of steps
        self._guidance_scale, self._num_timesteps = None, None

    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def num_timesteps(self) -> int | None:
        """The steps the running (or last) call runs (img2img: those its strength leaves)."""
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def text_encoders(self) -> list:
        return [self.text_encoder]

    def models(self) -> list:
        return [self.denoiser, self.vae, *self.text_encoders()]

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    def to(self, device=None, dtype: torch.dtype | None = None) -> Self:
        """Move every model (diffusers' `pipe.to("cuda")`, `pipe.to(torch.float16)`, or both).
        In float16 the VAE stays in float32 when its config says force_upcast, as load_pipeline
        does. Giving a device ends model CPU offload."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device if dtype is None else dtype
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        with self.exclusive_call():  # not under a running generation
            for m in self.models():
                m.to(device=device, dtype=dtype)
            if self.vae.needs_upcast:
                self.vae.float()
            if device is not None:
                self.offload_device = None
        return self

    def enable_model_cpu_offload(self, gpu_id: int | None = None, device=None) -> None:
        """Keep the weights on the CPU; each part (text encoders, UNet, VAE) moves to `device` only
        while it runs, then back: the accelerator holds one part at a time. Explicit moves in the
        call, not hooks (see on_device). device None: this machine's accelerator (gpu_id: which
        one); refused at once, with a RuntimeError, where there is none (device="cpu" is allowed:
        the moves then change nothing)."""
        device = offload_device(gpu_id, device)
        with self.exclusive_call():
            for m in self.models():
                m.to("cpu")
            self.offload_device = device

    def enable_attention_slicing(self, slice_size="auto") -> None:
        """Accepted for diffusers scripts; a no-op. diffusers slices attention over heads to save
        memory on its old attention kernels; attention here always runs torch's
        scaled_dot_product_attention (SDPA), which never materialises the (tokens x tokens) score
        matrix on its memory-efficient and flash kernels, so there is nothing to slice (diffusers
        itself warns against slicing on top of SDPA: it only slows it down)."""

    def disable_attention_slicing(self) -> None:
        """Accepted for diffusers scripts; a no-op (see enable_attention_slicing)."""

    def __deepcopy__(self, memo: dict):
        """copy.deepcopy(pipe): an independent pipeline with its own call lock (a lock cannot be
        copied), taken between calls so that no half-run call's caches are copied."""
        copy = object.__new__(type(self))
        memo[id(self)] = copy
        with self.exclusive_call():
            state = {k: v for k, v in vars(self).items() if k not in ("call_lock", "call_owner")}
            copy.__dict__.update(deepcopy(state, memo), call_lock=threading.Lock(), call_owner=None)
        return copy

    @contextmanager
    def exclusive_call(self):
        """Hold the call lock. The UNet's attention modules hold the TGATE gate and caches, and
        offloading moves the models: one call at a time may use them. A call from inside a call
        (a step callback calling the pipeline) would clear the caches of the call it interrupts:
        refused rather than deadlocked."""
        if self.call_owner == threading.get_ident():
            raise RuntimeError(f"{type(self).__name__} was called from inside one of its own calls (a step "
                               "callback?); that would overwrite the running call's attention caches")
        with self.call_lock:
            self.call_owner, self._interrupt = threading.get_ident(), False
            try:
                yield
            finally:
                self.call_owner = None

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options for the denoising loop's bar, as diffusers: shown unless disable=True; a
        call's `progress=True/False` overrides `disable`."""
        self.progress_bar_config = dict(kwargs)

    def compile(self, mode: str | None = None, regional: bool = False) -> Self:
        """torch.compile the hot path in place: the denoiser (fullgraph, channels_last) and the VAE
        decoder. The gate is a Python string per attention module, so a TGATE run compiles one
        graph per distinct (step plan, batch) pair, five for 25 steps of TGate(10, 5, 1, 2) (eight
        with DeepCache(3, 0): full and shallow steps differ), and none again on later calls
        (tests/core/test_compile.py counts them).

        regional=True (diffusers' compile_repeated_blocks): each of the denoiser's repeated blocks
        (its `repeated_blocks`: transformer blocks and resnets) is compiled on its own and the code
        around them runs eagerly. Blocks of one shape and gate share a graph, so there are more,
        smaller graphs and much less to compile: the real SD-1.5 UNet's five TGATE graphs took 234 s
        to compile on a 2-core CPU, its blocks' 83 s (docs/measurements.md); what that costs in
        speed is for a GPU to show (examples/benchmark_gpu.py).

        CUDA-graph modes ("reduce-overhead", "max-autotune") record each denoiser graph once and
        replay it into the same memory; the caches then live in static buffers (make_static_caches),
        so the gate and DeepCache work with them too. The VAE decoder, run once a call (or once a
        slice, whose outputs a replay would overwrite), is compiled without CUDA graphs."""
        if mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"mode must be None, 'default', 'reduce-overhead', 'max-autotune' or "
                             f"'max-autotune-no-cudagraphs' (torch.compile's modes), got {mode!r}")
        if not isinstance(regional, bool):
            raise TypeError(f"regional must be True or False, got {regional!r:.40}")
        # one graph per (step plan, shape), or per (block, shape, gate): dynamo's default limit of 8
        # per function would make a second image size a hard error under fullgraph
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        with self.exclusive_call():
            self.static_caches = mode in ("reduce-overhead", "max-autotune")
            for conv in [m for m in self.denoiser.modules() if isinstance(m, torch.nn.Conv2d)]:
                conv.to(memory_format=torch.channels_last)  # what cuDNN reads fastest (SVD's Conv3d: as they are)
            kinds = type(self.denoiser).repeated_blocks
            for part in [m for m in self.denoiser.modules() if isinstance(m, kinds)] if regional else [self.denoiser]:
                part.compile(fullgraph=True, dynamic=False, mode=mode)
            vae_mode = {"reduce-overhead": None, "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)
            self.vae.decoder.compile(fullgraph=True, dynamic=False, mode=vae_mode)
        return self
