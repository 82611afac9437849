"""The TGATE plan and the gated attention against the authors' `tgate` 1.0.0 package."""

import pytest
import torch
from test_unet import make_reference, unet_inputs
from tgate.tgate_utils import register_forward, tgate_scheduler

from mini_tgate.core.attention import Attention
from mini_tgate.core.tgate import CACHE, CACHE_MEAN, COMPUTE, REUSE, StepPlan, TGate, plan
from mini_tgate.core.unet import UNet2DConditionModel


def reference_action(kw: dict, keep_shape: bool, cfg: bool) -> str:
    if kw["reuse"]:
        return REUSE
    if kw["cache"]:
        return CACHE if keep_shape or not cfg else CACHE_MEAN
    return COMPUTE


PARAMS = [(10, 5, 1, 2), (5, 3, 2, 1), (1, 1, 1, 0), (2, 1, 1, 0), (10, 3, 1, 2), (5, 3, 1, 2),
          (7, 2, 3, 0), (3, 4, 2, 5), (25, 5, 1, 2), (30, 1, 1, 2)]


@pytest.mark.parametrize("params", PARAMS)
@pytest.mark.parametrize("cfg", [True, False])
def test_plan_is_the_reference_schedule(params, cfg):
    gate = TGate(*params)
    steps = plan(gate, 25, cfg)
    for i, step in enumerate(steps):
        ca, sa, keep_shape = tgate_scheduler(i, *params)
        assert step.cross_attn == reference_action(ca, keep_shape, cfg), (i, step)
        assert step.self_attn == reference_action(sa, keep_shape, cfg), (i, step)
        assert step.cfg == (cfg and i < gate.gate_step)  # the reference's `(i - warmup) < gate_step`


def test_no_gate_computes_everything():
    assert plan(None, 4, True) == [StepPlan(COMPUTE, COMPUTE, True)] * 4


@pytest.mark.parametrize("bad", [dict(gate_step=0), dict(sp_interval=0), dict(fi_interval=-1),
                                 dict(warm_up=-1), dict(gate_step=2.5), dict(gate_step=True)])
def test_rejects_bad_parameters(bad):
    with pytest.raises(ValueError):
        TGate(**bad)


def run_reference_step(ref, params, i, x, t, context, kw):
    ca, sa, keep_shape = tgate_scheduler(i, *params)
    register_forward(ref, "Attention", ca_kward=ca, sa_kward=sa, keep_shape=keep_shape)
    return ref(x, t, context, **kw).sample


@pytest.mark.parametrize("name", ["sd1", "sdxl"])
@pytest.mark.parametrize("params", [(4, 2, 2, 1), (3, 1, 1, 0)])
def test_gated_unet_steps_match_tgate_package(name, params, tmp_path):
    """A whole gated step sequence with CFG: doubled batch before the gate, halves averaged at it,
    one batch after it, each step's output against diffusers' UNet driven by tgate's processor."""
    ref = make_reference(name)
    ref.save_pretrained(tmp_path / "unet")
    unet = UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
    g = torch.Generator().manual_seed(0)
    x2, context2, kw2 = unet_inputs(name, 2, g)  # [unconditional, conditional]
    x1, context1 = x2[:1], context2[:1]
    kw1 = {k: ({kk: vv[:1] for kk, vv in v.items()} if isinstance(v, dict) else v[:1]) for k, v in kw2.items()}
    steps = plan(TGate(*params), 7, cfg=True)
    with torch.no_grad():
        for i, step in enumerate(steps):
            x, context, kw = (x2, context2, kw2) if step.cfg else (x1, context1, kw1)
            x = x + 0.1 * i  # a different input every step, so a reused cache shows
            t = 900 - 100 * i
            expected = run_reference_step(ref, params, i, x, t, context, kw)
            unet.set_gate(step)
            got = unet(x, t, context, **kw)
            assert (got - expected).abs().max() / expected.abs().max() <= 1e-4, (i, step)
    unet.clear_gate()
    assert all(m.cache is None and m.gate == COMPUTE for m in unet.attention_layers)


def test_attention_gate_states():
    attn = Attention(8, heads=2, dim_head=4)
    x, y = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    attn.gate = CACHE
    out = attn(x)
    assert attn.cache is out
    attn.gate = REUSE
    assert attn(y) is out  # exactly the cached tensor, whatever the input
    attn.gate = CACHE_MEAN
    out = attn(y)
    assert torch.equal(attn.cache, (out[:1] + out[1:]) / 2)
    attn.gate = COMPUTE
    assert torch.equal(attn(x), attn.attend(x, x))


def test_gate_touches_only_attention_modules():
    ref = make_reference("sd1")
    with torch.device("meta"):
        unet = UNet2DConditionModel(UNet2DConditionModel.config_class.from_dict(dict(ref.config)))
    before = {name: dict(vars(m)) for name, m in unet.named_modules() if not isinstance(m, Attention)}
    unet.set_gate(StepPlan(REUSE, CACHE, False))
    after = {name: dict(vars(m)) for name, m in unet.named_modules() if not isinstance(m, Attention)}
    assert before.keys() == after.keys()
    assert all(before[k].keys() == after[k].keys() for k in before)
    gates = {(m.is_cross, m.gate) for m in unet.attention_layers}
    assert gates == {(True, REUSE), (False, CACHE)}


def test_one_token_cross_attention_caches_one_row():
    """A one-token context (SVD's image token): softmax over one key is 1, every query's row is the
    same, so the cache keeps one row (not holding the full output alive) and REUSE expands it:
    the same bits as the computed output, alone and in a residual add."""
    torch.manual_seed(0)
    attn = Attention(8, heads=2, dim_head=4, context_dim=6)
    x, y, context = torch.randn(2, 5, 8), torch.randn(2, 5, 8), torch.randn(2, 1, 6)
    attn.gate = CACHE
    out = attn(x, context)
    assert torch.equal(out, attn.attend(x, context))  # the step that caches returns the full output
    assert attn.cache.shape == (2, 1, 8) and attn.cache.untyped_storage().nbytes() == 2 * 8 * 4
    assert torch.equal(attn.cache.expand_as(out), out)
    attn.gate = REUSE
    reused = attn(y, context)
    assert reused.shape == out.shape and reused.stride(1) == 0  # a view, no copy
    assert torch.equal(reused, out) and torch.equal(y + reused, y + out)
    attn.gate = CACHE_MEAN
    out = attn(x, context)
    mean = (out[:1] + out[1:]) / 2
    assert attn.cache.shape == (1, 1, 8)
    attn.gate = REUSE
    assert torch.equal(attn(y[:1], context[:1]), mean)


@pytest.mark.parametrize("case", ["tokens", "mask", "self"])
def test_other_attention_caches_every_row(case):
    """Several context tokens, a mask, or self-attention: the cache is the whole output, as before."""
    torch.manual_seed(0)
    attn = Attention(8, heads=2, dim_head=4, context_dim=None if case == "self" else 6)
    x = torch.randn(2, 5, 8)
    context = {"tokens": torch.randn(2, 3, 6), "mask": torch.randn(2, 1, 6), "self": None}[case]
    mask = torch.zeros(2, 1, 5, 1) if case == "mask" else None
    attn.gate = CACHE
    out = attn(x, context, mask)
    assert attn.cache is out and out.shape == (2, 5, 8)
    attn.gate = REUSE
    assert attn(torch.randn(2, 5, 8), context, mask) is out
    attn.gate = CACHE_MEAN
    out = attn(x, context, mask)
    assert attn.cache.shape == (1, 5, 8) and torch.equal(attn.cache, (out[:1] + out[1:]) / 2)


def test_svd_unet_one_row_cross_caches_reuse_bitwise():
    """A tiny SVD UNet: every cross-attention (spatial and temporal, one image token) caches one row;
    a step reusing them equals, bit for bit, the step that computed them and a plain step."""
    from mini_tgate.svd.config import UNetSpatioTemporalConfig
    from mini_tgate.svd.unet import UNetSpatioTemporalConditionModel
    tiny = dict(sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=(1, 2),
                transformer_layers_per_block=(1, 2), cross_attention_dim=32, num_attention_heads=(2, 4),
                num_frames=3, addition_time_embed_dim=8, projection_class_embeddings_input_dim=3 * 8,
                down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"))
    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(UNetSpatioTemporalConfig.from_dict(tiny))
    g = torch.Generator().manual_seed(0)
    frames, h, w = 3, 8, 10
    sample, embeds = torch.randn(1, frames, 8, h, w, generator=g), torch.randn(1, 1, 32, generator=g)
    time_ids = torch.tensor([[6.0, 127.0, 0.02]])
    with torch.no_grad():
        plain = unet(sample, 0.5, embeds, time_ids)
        unet.set_gate(StepPlan(CACHE, COMPUTE, False))
        cached = unet(sample, 0.5, embeds, time_ids)
        cross = [(name, m) for name, m in unet.named_modules() if isinstance(m, Attention) and m.is_cross]
        assert cross and all(m.cache.shape[1] == 1 for _, m in cross)
        # spatial: one row per frame; temporal: one per pixel (of the level's h*w)
        assert {m.cache.shape[0] for name, m in cross if "temporal" not in name} == {frames}
        assert {m.cache.shape[0] for name, m in cross if "temporal" in name} == {h * w, h * w // 4}
        unet.set_gate(StepPlan(REUSE, COMPUTE, False))
        reused = unet(sample, 0.5, embeds, time_ids)
    unet.clear_gate()
    assert torch.equal(cached, plain) and torch.equal(reused, plain)
