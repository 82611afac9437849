"""The adaptive gate step (AdaptiveTGate): its statistic and rule on hand-made tensors, and its
runs against fixed TGate runs on the tiny shapes model (weights/tiny-shapes) and a tiny PixArt,
which the `tgate` package checks elsewhere (test_tgate.py, test_pipeline.py, test_pixart_pipeline.py)."""

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch._dynamo.utils import counters

import mini_tgate
from mini_tgate import AdaptiveTGate, TGate
from mini_tgate.__main__ import main
from mini_tgate.png import read_png_text, to_uint8
from mini_tgate.tgate import DeepCache, cross_attention_change
from tiny_models import save_sd
from test_pixart_pipeline import PROMPTS as PIXART_PROMPTS, checkpoints, noise as pixart_noise, ours  # noqa: F401 (fixtures)

MODEL = Path(__file__).resolve().parent.parent / "weights" / "tiny-shapes"
pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle on a blue background", "a white triangle on a green background"]


def outputs(means, spread=3.0):
    """One cross-attention output with CFG: per image a constant tensor whose two CFG halves are
    mean - spread and mean + spread, so only their mean is `mean`; shape (2 x images, 2, 3)."""
    m = torch.tensor(means, dtype=torch.float32)[:, None, None].expand(-1, 2, 3)
    return torch.cat([m - spread, m + spread])


# Two layers, two images, four steps: the mean of the CFG halves of layer l for image b at step i.
LAYER0 = [[1.0, 1.0], [2.0, 1.0], [2.5, 1.0], [2.5, 1.0]]  # [step][image]
LAYER1 = [[4.0, 2.0], [4.0, 2.0], [4.0, 2.5], [5.0, 2.5]]
# By hand, ||A_i - A_{i-1}|| / ||A_i|| of a constant tensor is |a_i - a_{i-1}| / |a_i|; averaged over layers:
#   step 1: image 0 (1/2 + 0) / 2 = 0.25,   image 1 (0 + 0) / 2 = 0
#   step 2: image 0 (0.5/2.5 + 0) / 2 = 0.1, image 1 (0 + 0.5/2.5) / 2 = 0.1
#   step 3: image 0 (0 + 1/5) / 2 = 0.1,     image 1 0
CHANGES = [None, [0.25, 0.0], [0.1, 0.1], [0.1, 0.0]]


def run_rule(gate):
    """The pipeline's use of the rule on the steps above: the gate step decided, or None."""
    previous = None
    for i in range(4):
        current = [outputs(LAYER0[i]), outputs(LAYER1[i])]
        if previous is not None:
            change = cross_attention_change(previous, current, cfg=True)
            assert change.tolist() == pytest.approx(CHANGES[i], abs=1e-6)
            m = gate.decide(i, change)
            if m is not None:
                return m
        previous = current
    return None


def test_statistic_and_decision_by_hand():
    # tolerance 0.15: image 1 settles at step 1 but image 0 only at step 2; one decision for the
    # batch, when both have settled: step 3 caches, m = 2 + 2
    assert run_rule(AdaptiveTGate(tolerance=0.15, min_gate_step=3, max_gate_step=10)) == 4
    # image 1 alone would have been decided at step 1 (m = 3)
    assert AdaptiveTGate(tolerance=0.15, min_gate_step=3).decide(1, torch.tensor([0.0])) == 3
    assert run_rule(AdaptiveTGate(tolerance=0.3, min_gate_step=3)) == 3  # both under 0.3 at step 1
    assert run_rule(AdaptiveTGate(tolerance=0.15, min_gate_step=5)) == 5  # not before m = 5: step 3
    assert run_rule(AdaptiveTGate(tolerance=0.05)) is None               # image 0 never under 0.05
    assert run_rule(AdaptiveTGate(tolerance=0.15, max_gate_step=4)) is None  # m = 4 is the plan's anyway
    # without CFG the output itself is compared, not the mean of two halves: here the rows
    # are four images with constant values 1-3=-2, 1-3, 1+3=4, 1+3 (step 0) and 2-3, 1-3, 5, 4
    change = cross_attention_change([outputs(LAYER0[0])], [outputs(LAYER0[1])], cfg=False)
    assert change.tolist() == pytest.approx([1 / 1, 0, 1 / 5, 0], abs=1e-6)


@pytest.mark.parametrize("bad", [dict(tolerance=-0.1), dict(tolerance=float("nan")), dict(tolerance=float("inf")),
                                 dict(tolerance=True), dict(tolerance="0.1"), dict(min_gate_step=0),
                                 dict(max_gate_step=2.5), dict(min_gate_step=6, max_gate_step=5),
                                 dict(sp_interval=0), dict(warm_up=-1)])
def test_rejects_bad_parameters(bad):
    with pytest.raises(ValueError, match="AdaptiveTGate|TGate"):
        AdaptiveTGate(**bad)


@pytest.fixture(scope="module")
def pipe():
    return mini_tgate.load_pipeline(MODEL)


def noise(n=2, seed=3):
    return torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def decision(out):
    (m,) = {s["gate_step"] for s in out.steps}
    return m


@pytest.mark.parametrize("guidance", [7.5, 1.0])  # with CFG, and without (one batch throughout)
@pytest.mark.parametrize("m,sp,warm_up", [(6, 5, 2), (4, 1, 0), (12, 1, 0)])
def test_unmeetable_tolerance_is_the_fixed_gate(pipe, guidance, m, sp, warm_up):
    """Tolerance 0 is never met: the gate closes at max_gate_step, bit for bit TGate(max_gate_step)
    (m=12 > 10 steps: no gate at all, like the fixed one)."""
    kw = dict(num_inference_steps=10, guidance_scale=guidance, latents=noise())
    adaptive = pipe(PROMPTS, tgate=AdaptiveTGate(tolerance=0, min_gate_step=3, max_gate_step=m,
                                                 sp_interval=sp, warm_up=warm_up), **kw)
    fixed = pipe(PROMPTS, tgate=TGate(gate_step=m, sp_interval=sp, warm_up=warm_up), **kw)
    assert np.array_equal(adaptive.images, fixed.images)
    assert decision(adaptive) == m
    assert [s["batch"] for s in adaptive.steps] == [s["batch"] for s in fixed.steps]


@pytest.mark.parametrize("guidance,tolerance", [(7.5, 0.05), (1.0, 0.025)])  # with CFG and without
def test_replaying_the_decision_with_a_fixed_gate(pipe, guidance, tolerance):
    gate = AdaptiveTGate(tolerance=tolerance, min_gate_step=3, max_gate_step=15)
    kw = dict(num_inference_steps=25, guidance_scale=guidance, latents=noise())
    out = pipe(PROMPTS, tgate=gate, **kw)
    m = decision(out)
    assert 3 < m < 15  # decided by the rule, not by a bound
    steps = out.steps
    assert [s["cross_attn"] for s in steps[m - 1:]] == ["cache_mean" if guidance > 1 else "cache"] + ["reuse"] * (25 - m)
    changes = [s.get("cross_attn_change") for s in steps]
    assert max(changes[m - 2]) < tolerance <= max(changes[m - 3])  # settled at step m-2, not before
    replay = pipe(PROMPTS, tgate=gate.fixed(m), **kw)
    assert np.array_equal(out.images, replay.images)
    assert [s["batch"] for s in out.steps] == [s["batch"] for s in replay.steps]


def test_one_decision_per_batch_waits_for_every_image(pipe):
    gate = AdaptiveTGate(tolerance=0.05, min_gate_step=3, max_gate_step=15)
    kw = dict(num_inference_steps=25, latents=noise())
    alone = [decision(pipe(p, tgate=gate, num_inference_steps=25, latents=noise()[i:i + 1]))
             for i, p in enumerate(PROMPTS)]
    assert decision(pipe(PROMPTS, tgate=gate, **kw)) >= max(alone)


def test_refused_with_deepcache(pipe):
    with pytest.raises(ValueError, match="DeepCache"):
        pipe(PROMPTS[0], tgate=AdaptiveTGate(), deepcache=DeepCache(), num_inference_steps=4)


def test_compiled_unet_compiles_per_phase_not_per_step(pipe):
    """The statistic reads the cross-attention caches, which are graph outputs: a compiled UNet
    runs an adaptive generation with one graph per distinct step plan, and none again when a
    second generation decides another gate step. dynamo alone (backend "eager"): the graphs and
    guards are inductor's, without its compile time."""
    gate = AdaptiveTGate(tolerance=0.05, min_gate_step=3, max_gate_step=15, sp_interval=1, warm_up=0)
    kw = dict(num_inference_steps=25, latents=noise(), output_type="latent")
    eager = pipe(PROMPTS, tgate=gate, **kw)
    unet = pipe.unet
    try:
        torch._dynamo.reset()
        counters.clear()
        pipe.unet = copy.deepcopy(unet)
        pipe.unet.compile(fullgraph=True, dynamic=False, backend="eager")  # in place, as pipe.compile() does
        compiled = pipe(PROMPTS, tgate=gate, **kw)
        # (cache, cache, cfg) while measuring, (compute, cache, cfg) once past the steps that could
        # still move the gate earlier... here the gate closes while measuring: the gate's
        # (cache_mean, cache_mean, cfg) and (reuse, cache, one batch)
        plans = {(s["cross_attn"], s["self_attn"], s["batch"]) for s in compiled.steps}
        assert counters["stats"]["unique_graphs"] == len(plans) <= 4
        other = pipe(PROMPTS, tgate=AdaptiveTGate(tolerance=0.04, max_gate_step=15, sp_interval=1, warm_up=0), **kw)
        assert decision(other) != decision(compiled)
        assert counters["stats"]["unique_graphs"] == len(plans)
    finally:
        pipe.unet = unet
    assert decision(compiled) == decision(eager)
    torch.testing.assert_close(compiled.images, eager.images)


def test_cli_gate_step_auto_records_the_decision_and_replays(pipe, tmp_path, capsys, monkeypatch):
    """`generate --gate-step auto`: the PNG records the gate step chosen (with the rule's
    parameters beside it), and a fixed gate with that step and the same seed draws the same pixels."""
    monkeypatch.chdir(tmp_path)
    args = ["generate", PROMPTS[1], "--steps", 12, "--seed", 3, "--sp-interval", 1, "--warm-up", 0,
            "--gate-step", "auto", "--gate-tolerance", 0.05, "--out", "auto.png"]
    assert main([str(a) for a in args]) == 0
    capsys.readouterr()
    text = read_png_text(tmp_path / "auto.png")
    params = json.loads(text["mini_tgate"])
    m = params["tgate"]["gate_step"]
    assert params["tgate"] == {"gate_step": m, "sp_interval": 1, "fi_interval": 1, "warm_up": 0, "tolerance": 0.05,
                               "min_gate_step": 3, "max_gate_step": AdaptiveTGate().max_gate_step}
    assert 3 <= m < AdaptiveTGate().max_gate_step  # decided by the rule
    assert f"TGATE gate step: {m}, " in text["parameters"]
    replay = pipe(PROMPTS[1], num_inference_steps=12, generator=torch.Generator().manual_seed(3),
                  tgate=TGate(gate_step=m, sp_interval=1, warm_up=0)).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "auto.png")), to_uint8(replay))


@pytest.mark.parametrize("args,message", [
    (["generate", "x", "--gate-tolerance", "0.1"], "--gate-tolerance goes with --gate-step auto"),
    (["generate", "x", "--gate-step", "auto", "--gate-tolerance", "-1"], "tolerance must be a finite number >= 0"),
    (["generate", "x", "--gate-step", "auto", "--deepcache-interval", "3"], "does not combine with DeepCache"),
    (["macs", "--arch", "sd15", "--gate-step", "auto"], "decides the gate step while generating"),
    (["generate", "x", "--gate-step", "often"], "invalid int_or_auto value: 'often'"),
])
def test_cli_refuses_in_one_line(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        rc = main(args + (["--out", "x.png"] if args[0] == "generate" else []))
    except SystemExit as e:  # argparse's own errors
        rc = e.code
    err = capsys.readouterr().err
    assert rc != 0 and message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_pixart(ours, guidance):
    """PixArt-Sigma (tiny random checkpoint of test_pixart_pipeline.py), with CFG and without: a
    tolerance never met is TGate(max_gate_step); one always met closes the gate at the first
    chance, m = 3, and replays as TGate(3)."""
    pipe = ours["sigma"]
    kw = dict(prompt=PIXART_PROMPTS, num_inference_steps=8, guidance_scale=guidance, height=128, width=128,
              use_resolution_binning=False, latents=pixart_noise(2, 128, 128))
    never = pipe(**kw, tgate=AdaptiveTGate(tolerance=0, max_gate_step=5, sp_interval=2, warm_up=1))
    assert np.array_equal(never.images, pipe(**kw, tgate=TGate(5, sp_interval=2, warm_up=1)).images)
    first = pipe(**kw, tgate=AdaptiveTGate(tolerance=1e9, max_gate_step=7, sp_interval=1, warm_up=0))
    assert decision(first) == 3
    assert np.array_equal(first.images, pipe(**kw, tgate=TGate(3, sp_interval=1, warm_up=0)).images)


def test_lcm(tmp_path):
    """An LCM UNet (guidance as an embedding, no CFG; tiny random checkpoint) with the LCM
    scheduler: a tolerance never met is TGate(max_gate_step), one always met gives m = 3."""
    pipe = mini_tgate.load_pipeline(save_sd(tmp_path / "lcm", lcm=True))
    pipe.scheduler = mini_tgate.LCMScheduler.from_config(pipe.scheduler.config)

    def run(gate):  # the LCM step draws fresh noise: from a generator seeded alike in every run
        return pipe(PROMPTS, num_inference_steps=6, guidance_scale=8.0, latents=noise(), tgate=gate,
                    generator=torch.Generator().manual_seed(0))

    never = run(AdaptiveTGate(tolerance=0, max_gate_step=4, sp_interval=1, warm_up=0))
    assert np.array_equal(never.images, run(TGate(4, sp_interval=1, warm_up=0)).images)
    first = run(AdaptiveTGate(tolerance=1e9, max_gate_step=5, sp_interval=1, warm_up=0))
    assert decision(first) == 3 and [s["batch"] for s in first.steps] == [2] * 6  # one batch: no CFG
    assert np.array_equal(first.images, run(TGate(3, sp_interval=1, warm_up=0)).images)
