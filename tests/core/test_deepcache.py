"""DeepCache, alone and with TGATE: the plan against hand-computed schedules, images against the
`DeepCache` package's `DeepCacheSDHelper` on diffusers and against tgate's `TgateSDDeepCacheLoader`
/ `TgateSDXLDeepCacheLoader`, which steps run the whole UNet (a hook in the reference's mid
block), no state across calls, the compiled UNet, and the authors' SDXL MAC figures."""

import copy
import warnings

import diffusers
import numpy as np
import pytest
import torch
from DeepCache import DeepCacheSDHelper
from tgate import TgateSDDeepCacheLoader, TgateSDXLDeepCacheLoader
from tiny_models import save_sd, save_sdxl

import mini_tgate
from mini_tgate.cli import main
from mini_tgate.core.tgate import CACHE, CACHE_MEAN, COMPUTE, REUSE, DeepCache, StepPlan, TGate, plan
from mini_tgate.loading import load_pipeline
from mini_tgate.macs import count_macs

DeepCache = getattr(mini_tgate, "DeepCache", DeepCache)  # the public name, once exported
PROMPT = "a red circle on a blue background"
C, K, M, R = COMPUTE, CACHE, CACHE_MEAN, REUSE


def full_steps(steps: list[StepPlan]) -> list[int]:
    return [i for i, s in enumerate(steps) if s.deep != REUSE]


# ----------------------------------------------------------------------------- the plan

def test_plan_alone_is_a_full_step_every_interval():
    steps = plan(None, 10, True, DeepCache(interval=3, branch=4))
    assert full_steps(steps) == [0, 3, 6, 9]
    # a full step keeps the deep feature when a shallow step follows; the last one has none to feed
    assert [s.deep for s in steps] == [K, R, R, K, R, R, K, R, R, C]
    assert all(s.branch == 4 and s.cross_attn == s.self_attn == s.deep_self_attn == C and s.cfg for s in steps)
    assert full_steps(plan(None, 5, True, DeepCache(interval=1))) == [0, 1, 2, 3, 4]
    assert {s.deep for s in plan(None, 5, True, DeepCache(interval=1))} == {C}


def test_plan_with_tgate_forces_full_steps_at_the_gate():
    """tgate's loaders restart DeepCache at m-1 and at m: 8 steps, gate 4, interval 3 -> 0, 3, 4, 7."""
    steps = plan(TGate(4, 1, 1, 0), 8, True, DeepCache(3, 0))
    assert full_steps(steps) == [0, 3, 4, 7]
    assert [s.deep for s in steps] == [K, R, R, C, K, R, R, C]
    assert [(s.cross_attn, s.self_attn, s.cfg) for s in steps] == \
        [(C, K, True)] * 3 + [(M, M, True)] + [(R, K, False)] * 4
    assert full_steps(plan(TGate(10, 5, 1, 2), 25, True, DeepCache(3, 0))) == [0, 3, 6, 9, 10, 13, 16, 19, 22]
    assert full_steps(plan(TGate(1, 1, 1, 0), 6, False, DeepCache(2, 0))) == [0, 1, 3, 5]
    assert full_steps(plan(TGate(30, 5, 1, 2), 7, True, DeepCache(3, 0))) == [0, 3, 6]  # gate past the run


def test_plan_deep_self_attention_where_its_cache_step_was_shallow():
    """Hand-computed: TGate(6, 2, 1, 1), 9 steps, interval 3 (full at 0, 3, 5, 6). Self-attention
    is cached at steps 1, 2 (shallow: only the shallow branch writes), 4 (shallow), 5 (the mean).
    At step 3 it reuses: the shallow branch has step 2's cache, the deep part none, so it computes."""
    steps = plan(TGate(6, 2, 1, 1), 9, True, DeepCache(3, 0))
    assert full_steps(steps) == [0, 3, 5, 6]
    assert [s.self_attn for s in steps] == [C, K, K, R, K, M, K, K, K]
    assert [s.deep_self_attn for s in steps][0:6:3] == [C, C]
    assert steps[5].deep_self_attn == M and steps[6].deep_self_attn == K
    # A full step's cache is there to reuse: TGate(10, 2, 1, 0), interval 3: cached at 0 (full),
    # reused at 3 (full) from step 0, although step 2 (shallow) cached the shallow branch since.
    steps = plan(TGate(10, 2, 1, 0), 9, True, DeepCache(3, 0))
    assert [s.self_attn for s in steps][:4] == [K, R, K, R]
    assert steps[3].deep_self_attn == R and steps[3].deep == K


def test_plan_without_deepcache_is_unchanged():
    for gate in (None, TGate(10, 5, 1, 2), TGate(3, 2, 2, 1)):
        steps = plan(gate, 12, True)
        assert steps == plan(gate, 12, True, None)
        assert all(s.branch is None and s.deep == COMPUTE and s.deep_self_attn is None for s in steps)


@pytest.mark.parametrize("bad", [dict(interval=0), dict(interval=1.5), dict(branch=-1), dict(branch=True)])
def test_rejects_bad_parameters(bad):
    with pytest.raises(ValueError, match="DeepCache"):
        DeepCache(**bad)


# ----------------------------------------------------------------------------- against the references

@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipes(request, tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp(request.param)
    (save_sdxl if request.param == "sdxl" else save_sd)(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.DiffusionPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    return request.param, ref, load_pipeline(folder)


def noise(seed=0):
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def mid_block_hook(unet, steps_full: list):
    """Marks the current step as full when the mid block computes (DeepCache's helper wraps the
    mid block's forward and returns its cache on shallow steps: its first resnet does not run)."""
    return unet.mid_block.resnets[0].register_forward_hook(lambda *_: steps_full.__setitem__(-1, True))


def step_marker(steps_full: list):
    def on_step_end(pipe, i, t, tensors):
        steps_full.append(False)  # the next step, until its mid block runs
        return {}
    return on_step_end


# The tiny UNets have two blocks of one layer each: branches 0, 1 (block 0), 3, 4 (block 1), and
# 2 and 5 name a layer past the block's last, which DeepCache splits like the last one.
@pytest.mark.parametrize("interval,branch", [(3, 0), (2, 1), (3, 2), (2, 3), (3, 5)])
def test_deepcache_matches_the_deepcache_helper(pipes, interval, branch):
    name, base, ours = pipes
    ref = copy.deepcopy(base)  # the helper patches forwards in place
    helper = DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=interval, cache_branch_id=branch)
    helper.enable()
    ref_full, our_full = [False], [False]
    hooks = mid_block_hook(ref.unet, ref_full), mid_block_hook(ours.unet, our_full)
    try:
        kw = dict(num_inference_steps=8, guidance_scale=7.5, latents=noise())
        expected = ref(PROMPT, output_type="np", callback_on_step_end=step_marker(ref_full), **kw).images
        out = ours(PROMPT, deepcache=DeepCache(interval, branch), callback_on_step_end=step_marker(our_full), **kw)
    finally:
        for h in hooks:
            h.remove()
    assert max_diff(expected, out.images) <= 1e-3
    full = [i for i, f in enumerate(ref_full[:8]) if f]
    assert full == list(range(0, 8, interval))
    assert [i for i, f in enumerate(our_full[:8]) if f] == full
    assert [i for i, s in enumerate(out.steps) if s["deep"] != REUSE] == full
    # and it is not plain sampling
    assert max_diff(out.images, ours(PROMPT, **kw).images) > 1e-2


# (gate_step, sp_interval, fi_interval, warm_up), interval, branch. (6, 2, 1, 1) with interval 3
# reuses self-attention at step 3 (full) whose cache step 2 was shallow; (10, 2, 1, 0) with
# interval 3 reuses at step 3 (full) the deep part's step-0 cache, the shallow branch's step-2 one;
# (5, 3, 2, 1) reuses after the gate (fi_interval 2); (10, 5, 1, 2) has its gate past the 9 steps.
TGATE_CASES = [((4, 1, 1, 0), 3, 0), ((6, 2, 1, 1), 3, 0), ((6, 2, 1, 1), 3, 4), ((10, 2, 1, 0), 3, 1),
               ((5, 3, 2, 1), 2, 3), ((10, 5, 1, 2), 3, 1)]


@pytest.mark.parametrize("gate,interval,branch", TGATE_CASES)
def test_deepcache_with_tgate_matches_the_tgate_loaders(pipes, gate, interval, branch):
    name, base, ours = pipes
    loader = TgateSDXLDeepCacheLoader if name == "sdxl" else TgateSDDeepCacheLoader
    ref = loader(copy.deepcopy(base), cache_interval=interval, cache_branch_id=branch)
    ref_full = [False]
    hook = mid_block_hook(ref.unet, ref_full)
    kw = dict(num_inference_steps=9, guidance_scale=7.5, latents=noise())
    expected = ref.tgate(PROMPT, output_type="np", callback_on_step_end=step_marker(ref_full), **kw,
                         **dict(zip(["gate_step", "sp_interval", "fi_interval", "warm_up"], gate))).images
    hook.remove()
    out = ours(PROMPT, tgate=TGate(*gate), deepcache=DeepCache(interval, branch), **kw)
    assert max_diff(expected, out.images) <= 1e-3
    full = [i for i, f in enumerate(ref_full[:9]) if f]
    assert [i for i, s in enumerate(out.steps) if s["deep"] != REUSE] == full
    assert full == full_steps(plan(TGate(*gate), 9, True, DeepCache(interval, branch)))


def test_no_state_survives_a_call(pipes):
    """The same image on every call; a plain call after DeepCache calls is a fresh pipeline's.
    The plan has a full step (3) whose deep self-attention was due to be reused from a shallow
    step's cache and so computes: the case where tgate's loaders reuse the previous call's cache."""
    name, _, ours = pipes
    kw = dict(num_inference_steps=7, guidance_scale=7.5, latents=noise(3))
    plain = ours(PROMPT, **kw).images
    dc, gate = DeepCache(3, 1), TGate(5, 2, 1, 1)
    assert [i for i, s in enumerate(plan(gate, 7, True, dc)) if s.deep != REUSE and s.deep_self_attn != s.self_attn] == [3]
    first = ours(PROMPT, deepcache=dc, tgate=gate, **kw).images
    second = ours(PROMPT, deepcache=dc, tgate=gate, **kw).images
    assert np.array_equal(first, second)
    other = ours(PROMPT, deepcache=DeepCache(3, 4), **dict(kw, latents=noise(4))).images
    assert np.array_equal(ours(PROMPT, **kw).images, plain)
    assert np.array_equal(ours(PROMPT, deepcache=dc, tgate=gate, **kw).images, first)
    assert max_diff(other, plain) > 0
    unet = ours.unet
    assert unet.cache is None and unet.deep == COMPUTE and unet.branch is None
    assert all(m.cache is None and m.gate == COMPUTE for m in unet.attention_layers)


def test_bad_deepcache_arguments(pipes):
    name, _, ours = pipes
    with pytest.raises(ValueError, match="branch must be an integer from 0 to 5"):
        ours(PROMPT, num_inference_steps=2, deepcache=DeepCache(2, 6))
    with pytest.raises(TypeError, match="deepcache must be a mini_tgate.DeepCache"):
        ours(PROMPT, num_inference_steps=2, deepcache=3)
    with pytest.raises(ValueError, match="branch must be an integer from 0 to 11"):
        count_macs("sd15", deepcache=DeepCache(3, 12))
    with pytest.raises(ValueError, match="no shallow branch"):
        count_macs("pixart-alpha", deepcache=DeepCache(3, 0))


# ----------------------------------------------------------------------------- MACs, CLI, compile

def test_macs_reproduce_the_authors_sdxl_figures():
    """DeepCache 57.888T and DeepCache + TGATE 43.868T (SDXL, 1024 px, 25 steps, CFG): the first is
    interval 3, branch 1 (57.888T); the second adds gate step 13 with tgate's DeepCache defaults
    (sp_interval 1, fi_interval 1, warm_up 0): 43.866T. The package README's example settings
    (interval 3, branch 0, gate step 10) count 55.365T and 38.626T."""
    base = count_macs("sdxl", 1024, 1024, 25, 7.5)["unet_macs"]
    alone = count_macs("sdxl", 1024, 1024, 25, 7.5, deepcache=DeepCache(3, 1))
    gated = count_macs("sdxl", 1024, 1024, 25, 7.5, TGate(13, 1, 1, 0), deepcache=DeepCache(3, 1))
    assert abs(alone["unet_macs"] / 57.888e12 - 1) < 0.005
    assert abs(gated["unet_macs"] / 43.868e12 - 1) < 0.005
    # full steps cost the whole UNet, shallow ones a small part of it
    per_step = alone["per_step"]
    assert per_step[0] == per_step[3] == base / 25
    assert per_step[1] == per_step[2] < base / 25 / 10


def test_macs_command_takes_deepcache_options(capsys):
    assert main(["macs", "--arch", "sdxl", "--height", "1024", "--width", "1024", "--deepcache-interval", "3",
                 "--deepcache-branch", "1", "--json"]) == 0
    import json
    result = json.loads(capsys.readouterr().out)
    assert result["deepcache"] == {"interval": 3, "branch": 1}
    assert abs(result["unet_macs"] / 57.888e12 - 1) < 0.005
    assert main(["macs", "--deepcache-branch", "1"]) == 1
    assert capsys.readouterr().err.strip() == "error: --deepcache-branch needs --deepcache-interval"
