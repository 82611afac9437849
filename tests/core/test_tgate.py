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
    assert all(m.cache is None and m.gate == COMPUTE for m in unet.attention_modules())


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
    gates = {(m.is_cross, m.gate) for m in unet.attention_modules()}
    assert gates == {(True, REUSE), (False, CACHE)}
