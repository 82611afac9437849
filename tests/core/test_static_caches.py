"""Static caches, what CUDA graphs need of TGATE and DeepCache (compile(mode="reduce-overhead")):
every cache is a buffer made before the first step and written in place, so its address never
changes within a call or from one call to the next. Tested here on the CPU without compiling
(`pipe.static_caches`, what the CUDA-graph modes set): images against the `tgate` package's loaders
and bit for bit against the usual caches; the addresses; the buffers remade only when the shapes
change. The CUDA-graph run itself is the last test, on a GPU only."""

import copy

import numpy as np
import pytest
import torch
from tgate import TgateSDDeepCacheLoader, TgateSDLoader, TgateSDXLDeepCacheLoader, TgateSDXLLoader
from test_deepcache import max_diff, noise, pipes  # noqa: F401  (pipes: the module's fixture)

from mini_tgate import DeepCache, TGate
from mini_tgate.core import runtime

PROMPT = "a red circle on a blue background"
GATE = (4, 2, 1, 1)  # gate_step, sp_interval, fi_interval, warm_up


def caching_modules(pipe):
    return [m for m in pipe.unet.modules() if hasattr(m, "static")]


def addresses(seen: list):
    """A step callback recording the address of every cache after each step."""
    def on_step_end(pipe, i, t, tensors):
        seen.append(tuple(m.cache.data_ptr() if m.cache is not None else 0 for m in caching_modules(pipe)))
        return {}
    return on_step_end


@pytest.mark.parametrize("deepcache", [None, (3, 1)])
def test_static_caches_match_tgate_and_the_usual_caches(pipes, deepcache):
    name, base, ours = pipes
    kw = dict(num_inference_steps=9, guidance_scale=7.5, latents=noise())
    gate = dict(zip(["gate_step", "sp_interval", "fi_interval", "warm_up"], GATE))
    if deepcache is None:
        ref = (TgateSDXLLoader if name == "sdxl" else TgateSDLoader)(copy.deepcopy(base))
    else:
        loader = TgateSDXLDeepCacheLoader if name == "sdxl" else TgateSDDeepCacheLoader
        ref = loader(copy.deepcopy(base), cache_interval=deepcache[0], cache_branch_id=deepcache[1])
    expected = ref.tgate(PROMPT, output_type="np", **kw, **gate).images
    dc = None if deepcache is None else DeepCache(*deepcache)
    usual = ours(PROMPT, tgate=TGate(*GATE), deepcache=dc, **kw).images
    ours.static_caches = True
    try:
        seen = []
        static = [ours(PROMPT, tgate=TGate(*GATE), deepcache=dc, callback_on_step_end=addresses(seen), **kw).images
                  for _ in range(2)]
        modules = caching_modules(ours)
        assert all(m.static for m in modules if m is not ours.unet or dc is not None)
        assert sum(map(bool, seen[0])) == sum(m.static for m in modules)  # every static cache written
        assert all(m.cache is not None and not m.cache.any() for m in modules if m.static)  # zeroed after a call
    finally:
        ours.static_caches = False
    assert max_diff(expected, static[0]) <= 1e-3
    assert np.array_equal(static[0], usual) and np.array_equal(static[1], usual)
    # every cache at one address through both calls: 18 steps, one set of addresses
    assert len(seen) == 18 and len(set(seen)) == 1


def test_buffers_are_made_once_per_shape_and_dropped_for_a_plain_call(pipes, monkeypatch):
    """The meta-device run that sizes the buffers happens on the first call and again only when
    the shapes or what is cached change; a call that caches nothing leaves no buffer behind."""
    _, _, ours = pipes
    runs = []
    real = torch.func.functional_call
    monkeypatch.setattr(runtime.torch.func, "functional_call", lambda *a, **k: runs.append(1) or real(*a, **k))
    kw = dict(num_inference_steps=6, guidance_scale=7.5, tgate=TGate(*GATE))
    ours.static_caches = True
    try:
        ours(PROMPT, latents=noise(), **kw)
        first = [m.cache for m in caching_modules(ours)]
        ours(PROMPT, latents=noise(1), **kw)  # same shapes: the same buffers, no meta run
        assert len(runs) == 1 and all(a is b for a, b in zip(first, (m.cache for m in caching_modules(ours))))
        ours([PROMPT, "a tree"], latents=torch.cat([noise(2), noise(3)]), **kw)  # another batch: new buffers
        assert len(runs) == 2
        assert all(m.cache.shape[0] == 4 for m in ours.unet.attention_layers)  # CFG's doubled batch of 2
        ours(PROMPT, latents=noise(), num_inference_steps=6)  # plain: nothing cached, nothing kept
        assert all(m.cache is None and not m.static for m in caching_modules(ours))
    finally:
        ours.static_caches = False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("regional", [False, True])
def test_cuda_graphs_with_tgate_and_deepcache(pipes, regional):
    """compile(mode="reduce-overhead") on a GPU, of the whole denoiser or of its repeated blocks:
    TGATE + DeepCache images equal the eager ones within half-precision tolerance, and a second
    call compiles nothing."""
    from torch._dynamo.utils import counters

    _, _, base = pipes
    eager = copy.deepcopy(base).to("cuda", torch.float16)
    compiled = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compiled.compile(mode="reduce-overhead", regional=regional)
    kw = dict(num_inference_steps=12, guidance_scale=7.5, latents=noise().cuda().half(), tgate=TGate(5, 2, 1, 1),
              deepcache=DeepCache(3, 0))
    expected = eager(PROMPT, **kw).images
    got = compiled(PROMPT, **kw).images
    graphs = counters["stats"]["unique_graphs"]
    again = compiled(PROMPT, **kw).images
    assert counters["stats"]["unique_graphs"] == graphs
    assert max_diff(got, expected) <= 2e-2 and np.array_equal(got, again)
