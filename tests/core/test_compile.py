"""torch.compile on the hot path: a compiled UNet runs a whole TGATE schedule with one graph per
gate phase, never one per step, and gives the eager UNet's numbers.

What a compiled UNet specializes on, so what makes it compile a new graph (dynamo guards):
- the `gate` string of every attention module: one graph per distinct step plan, which is what
  TGATE wants, since each plan is a different computation;
- the shapes and strides of the inputs (`dynamic=False`): one graph per batch size, so CFG's
  doubled batch before the gate and the single batch after it are two graphs anyway;
- a timestep given as a Python number (a constant baked into the graph: one graph per step!),
  not as the scheduler's 0-d tensor, which is an input like any other.
The cached attention outputs are graph inputs (REUSE) and outputs (CACHE), guarded on their
shape and strides only, so a new cache tensor every few steps recompiles nothing.

Compiling costs 5-40 s per graph on a CPU, so these tests use the smallest UNets that still have
every part the graph goes through.
"""

import copy

import numpy as np
import pytest
import torch
from test_deepcache import max_diff, noise, pipes  # noqa: F401  (pipes: the module's fixture)
from test_unet import TINY, unet_inputs
from tgate import TgateSDDeepCacheLoader, TgateSDXLDeepCacheLoader
from torch._dynamo.utils import counters

from mini_tgate.core.config import UNetConfig, VAEConfig
from mini_tgate.core.runtime import make_static_caches
from mini_tgate.core.schedulers import EulerDiscreteScheduler
from mini_tgate.core.tgate import DeepCache, TGate, plan
from mini_tgate.core.unet import BasicTransformerBlock, ResnetBlock2D, UNet2DConditionModel
from mini_tgate.core.vae import AutoencoderKL

# test_unet's tiny configs with one resnet per block: still a downsample, an upsample, skips of
# two sizes and cross-attention in the down, mid and up blocks (SDXL: two transformer layers in
# the deepest block and the text_time embedding).
SMALL = {
    "sd1": dict(TINY["sd1"], layers_per_block=1),
    "sdxl": dict(TINY["sdxl"], layers_per_block=1, transformer_layers_per_block=[1, 1, 2]),
}
SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
TOL = 1e-4


@pytest.fixture(autouse=True)
def small_and_quick(quick_inductor):
    """Every test here compiles: conftest's quick_inductor settings."""
    yield


def small_unet(name):
    g = torch.Generator().manual_seed(0)
    unet = UNet2DConditionModel(UNetConfig.from_dict(dict(sample_size=16, norm_num_groups=8, **SMALL[name])))
    with torch.no_grad():  # move every weight off its initial value (norms are 1 and 0 there)
        for p in unet.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return unet.eval()


def graphs() -> int:
    """Graphs dynamo has compiled since the last counters.clear() (with fullgraph=True each
    compile of the UNet's forward is exactly one graph)."""
    return counters["stats"]["unique_graphs"]


def denoise(unet, steps, inputs, eager=None, static=False) -> float:
    """The pipeline's denoising loop (pipeline.py) around `unet`: Euler steps, so float32 0-d
    timestep tensors; CFG's doubled batch [unconditional, conditional] while the plan says so,
    the unconditional branch alone after the gate; the UNet's output fed back into the latents.
    With `eager`, an uncompiled copy runs the same plan on the same input at every step; returns
    the largest error of `unet` against it, relative to the output's largest value."""
    x2, context2, kw2 = inputs
    kw1 = {k: ({kk: vv[:1] for kk, vv in v.items()} if isinstance(v, dict) else v[:1]) for k, v in kw2.items()}
    scheduler = EulerDiscreteScheduler(**SD_BETAS)
    scheduler.set_timesteps(len(steps))
    latents, worst = x2[:1] * scheduler.init_noise_sigma, 0.0
    for t, step in zip(scheduler.timesteps, steps):
        x, context, kw = (torch.cat([latents, latents]), context2, kw2) if step.cfg else (latents, context2[:1], kw1)
        x = scheduler.scale_model_input(x, t)
        if static and step is steps[0]:  # as the pipeline does under CUDA graphs
            make_static_caches(unet, steps, x, t, {"encoder_hidden_states": context, **kw})
        unet.set_gate(step)
        noise = unet(x, t, context, **kw)
        if eager is not None:
            eager.set_gate(step)
            expected = eager(x, t, context, **kw)
            worst = max(worst, ((noise - expected).abs().max() / expected.abs().max()).item())
        if step.cfg:
            noise_uncond, noise_text = noise.chunk(2)
            noise = noise_uncond + 7.5 * (noise_text - noise_uncond)
        latents = scheduler.step(noise, t, latents).prev_sample
    unet.clear_gate()
    if eager is not None:
        eager.clear_gate()
    return worst


# SD-1 through inductor, as the pipeline compiles it; SDXL (its extra embedding, deeper blocks)
# through dynamo alone: the same graphs and guards, without inductor's 15-30 s a graph
@pytest.mark.parametrize("name,backend", [("sd1", "inductor"), ("sdxl", "eager")])
def test_tgate_run_compiles_one_graph_per_phase(name, backend):
    eager = small_unet(name)
    unet = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    counters.clear()
    unet.compile(fullgraph=True, dynamic=False, backend=backend)  # in place: set_gate and the state-dict keys stay
    inputs = unet_inputs(name, 2, torch.Generator().manual_seed(1))
    gated = plan(TGate(10, 5, 1, 2), 25, cfg=True)
    with torch.inference_mode():  # as the pipeline runs it
        err = denoise(unet, plan(None, 25, cfg=True), inputs, eager)
        assert graphs() == 1

        # 25 steps of TGate(10, 5, 1, 2) with CFG: five distinct step plans (the batch size
        # follows `cfg`), one of them (compute, compute, cfg), compiled above
        assert len(set(gated)) == 5
        err = max(err, denoise(unet, gated, inputs, eager))
        assert graphs() == 5

        denoise(unet, gated, inputs)  # the same generation again
        denoise(unet, plan(TGate(10, 5, 1, 2), 16, cfg=True), inputs)  # fewer steps, the same phases
        assert graphs() == 5

        # fi_interval 2 adds one phase, (reuse, reuse, no cfg), whose self-attention caches come
        # from two different graphs: the gate's mean, then (reuse, cache)
        other = plan(TGate(5, 3, 2, 1), 25, cfg=True)
        assert len(set(gated) | set(other)) == 6
        err = max(err, denoise(unet, other, inputs, eager))
        assert graphs() == 6
    assert err <= TOL, err


def test_deepcache_tgate_run_compiles_one_graph_per_distinct_step():
    """DeepCache + TGATE: full and shallow steps are different graphs, one per distinct step plan
    (8 for 25 steps of TGate(10, 5, 1, 2) with DeepCache(3, 0)), none on a rerun; the deep feature
    a full step keeps is a graph output like an attention cache, read back by the shallow steps."""
    eager = small_unet("sd1")
    unet = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    counters.clear()
    unet.compile(fullgraph=True, dynamic=False)  # inductor, as pipe.compile() does
    inputs = unet_inputs("sd1", 2, torch.Generator().manual_seed(1))
    steps = plan(TGate(10, 5, 1, 2), 25, cfg=True, deepcache=DeepCache(3, 0))
    assert len(set(steps)) == 8 and sum(s.deep == "reuse" for s in steps) == 16
    with torch.inference_mode():
        err = denoise(unet, steps, inputs, eager)
        assert graphs() == 8
        denoise(unet, steps, inputs)  # the same generation again: nothing to compile
        denoise(unet, plan(TGate(10, 5, 1, 2), 16, cfg=True, deepcache=DeepCache(3, 0)), inputs)
        assert graphs() == 8
    assert err <= TOL, err


def test_static_caches_compile_one_graph_per_distinct_step():
    """The caches CUDA graphs need (compile(mode="reduce-overhead")): static buffers written in
    place. Through AOTAutograd (which turns those writes into the graph's input mutations, as
    inductor sees them): the same 8 graphs for TGATE + DeepCache, none on a rerun, the buffers at
    the same addresses throughout, and the eager UNet's numbers."""
    eager = small_unet("sd1")
    unet = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    counters.clear()
    unet.compile(fullgraph=True, dynamic=False, backend="aot_eager")
    inputs = unet_inputs("sd1", 2, torch.Generator().manual_seed(1))
    steps = plan(TGate(10, 5, 1, 2), 25, cfg=True, deepcache=DeepCache(3, 0))
    with torch.inference_mode():
        err = denoise(unet, steps, inputs, eager, static=True)
        assert graphs() == 8
        buffers = [(m, m.cache.data_ptr()) for m in unet.modules() if getattr(m, "static", False)]
        assert len(buffers) == len(unet.attention_layers) + 1  # and the deep feature's
        denoise(unet, steps, inputs, static=True)  # the same generation again: nothing to compile
        assert graphs() == 8
        assert all(m.static and m.cache.data_ptr() == ptr for m, ptr in buffers)
    assert err <= TOL, err


def test_vae_decoder_compiles_one_graph_per_batch_size():
    g = torch.Generator().manual_seed(0)
    levels = ("DownEncoderBlock2D",) * 2, ("UpDecoderBlock2D",) * 2
    eager = AutoencoderKL(VAEConfig.from_dict(dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                                                    down_block_types=levels[0], up_block_types=levels[1])))
    with torch.no_grad():
        for p in eager.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    vae = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    torch._dynamo.reset()
    counters.clear()
    vae.decoder.compile(fullgraph=True, dynamic=False)
    z = torch.randn(2, 4, 8, 8, generator=g)
    with torch.inference_mode():
        got, expected = vae.decode(z), eager.decode(z)
        vae.use_slicing = True  # one image at a time: batch 1, a second graph
        sliced = vae.decode(z + 1)
        vae.decode(z - 1)  # a new input of a compiled shape: nothing to compile
        expected_sliced = eager.decode(z + 1)
    assert graphs() == 2
    assert (got - expected).abs().max() / expected.abs().max() <= TOL
    assert (sliced - expected_sliced).abs().max() / expected_sliced.abs().max() <= TOL


def test_regional_compile_compiles_the_repeated_blocks(pipes):
    """pipe.compile(mode="reduce-overhead", regional=True), as a user calls it (on the CPU inductor
    leaves out the CUDA graphs, not the static caches): each transformer block and resnet compiled
    on its own, the UNet around them eager. A TGATE + DeepCache run gives the eager images, and a
    rerun compiles nothing; the image is tgate's TGATE + DeepCache loader's."""
    name, base, ours = pipes
    pipe = copy.deepcopy(ours)
    torch._dynamo.reset()
    counters.clear()
    pipe.compile(mode="reduce-overhead", regional=True)
    blocks = [m for m in pipe.unet.modules() if isinstance(m, (BasicTransformerBlock, ResnetBlock2D))]
    assert blocks and all(m._compiled_call_impl is not None for m in blocks)
    assert pipe.unet._compiled_call_impl is None and pipe.static_caches
    assert not ours.static_caches and all(m._compiled_call_impl is None for m in ours.unet.modules())  # a copy
    kw = dict(prompt="a red circle", num_inference_steps=8, guidance_scale=7.5, latents=noise(),
              tgate=TGate(4, 2, 1, 1), deepcache=DeepCache(3, 0))
    expected = ours(**kw).images
    loader = TgateSDXLDeepCacheLoader if name == "sdxl" else TgateSDDeepCacheLoader
    reference = loader(copy.deepcopy(base), cache_interval=3, cache_branch_id=0).tgate(
        output_type="np", gate_step=4, sp_interval=2, fi_interval=1, warm_up=1,
        **{k: v for k, v in kw.items() if k not in ("tgate", "deepcache")}).images
    got = pipe(**kw).images
    compiled = graphs()
    assert compiled > 1
    assert np.array_equal(pipe(**kw).images, got) and graphs() == compiled  # nothing compiled again
    assert max_diff(got, expected) <= 1e-5 and max_diff(got, reference) <= 1e-3  # the tolerance of test_static_caches
    with pytest.raises(TypeError, match="regional must be True or False"):
        pipe.compile(regional=1)
