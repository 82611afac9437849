"""The denoising loop never waits for the device: no tensor value is read on the host inside it
(shown by running it whole on the meta device, where any read is an error), and its NaN/inf
checks are flags on the device, read after the loop (on the CPU after every step), naming the
first step and stage that failed."""

import types

import pytest
import torch
from test_unet import TINY
from tiny_models import save_sd

from mini_tgate import DDIMScheduler, DeepCache, DPMSolverMultistepScheduler, EulerDiscreteScheduler, TGate
from mini_tgate.core import pipeline
from mini_tgate.core.config import UNetConfig
from mini_tgate.core.pipeline import FiniteChecks, LoopState, denoising_loop
from mini_tgate.core.tgate import plan
from mini_tgate.core.unet import UNet2DConditionModel
from mini_tgate.loading import load_pipeline

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.mark.parametrize("scheduler", [EulerDiscreteScheduler, DDIMScheduler, DPMSolverMultistepScheduler])
def test_the_loop_reads_nothing_on_the_host(scheduler):
    """A meta tensor has no values: .item(), bool(), float() or .tolist() on one raise. The whole
    loop (TGATE + DeepCache, CFG, the scheduler's steps, the checks) runs on meta tensors."""
    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel(UNetConfig.from_dict(dict(sample_size=16, norm_num_groups=8, **TINY["sd1"])))
    sched = scheduler(**SD_BETAS)
    sched.set_timesteps(10, device=meta)
    steps = plan(TGate(5, 2, 1, 1), 10, cfg=True, deepcache=DeepCache(2, 0))
    text = torch.empty(1, 7, unet.config.cross_attention_dim, device=meta)
    state = LoopState(torch.empty(1, 4, 16, 16, device=meta), {"encoder_hidden_states": text},
                      {"encoder_hidden_states": text})
    c = types.SimpleNamespace(denoiser=unet, scheduler=sched, guidance_scale=7.5, guidance_rescale=0.7, eta=0.0,
                              generator=None, static_caches=False, device=meta)
    checks = FiniteChecks(c, len(steps))
    assert not checks.each_step
    with torch.inference_mode():
        report = [entry for _, _, entry in denoising_loop(c, state, steps, checks)]
    assert [e["batch"] for e in report] == [2] * 5 + [1] * 5
    assert state.latents.device == meta and checks.flags.device == meta


@pytest.fixture(scope="module")
def pipe(tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp("sd")
    save_sd(folder)
    return load_pipeline(folder)


@pytest.mark.parametrize("each_step", [True, False])
def test_checks_name_the_first_bad_step_and_stage(pipe, monkeypatch, each_step):
    """A callback that poisons the latents after step 2: the noise prediction of step 3 is the
    first bad value. On the CPU the run stops there; read once after the loop (as on a GPU), the
    loop runs on and the error names the same step and stage."""
    class Checks(FiniteChecks):
        def __init__(self, c, num_steps):
            super().__init__(c, num_steps)
            self.each_step = each_step

    monkeypatch.setattr(pipeline, "FiniteChecks", Checks)
    calls = []

    def poison(p, i, t, tensors):
        calls.append(i)
        return {"latents": tensors["latents"] * float("nan")} if i == 2 else {}

    with pytest.raises(FloatingPointError, match="UNet2DConditionModel's noise prediction at step 3 contains NaN"):
        pipe("a red circle", num_inference_steps=6, height=64, width=64, callback_on_step_end=poison)
    assert calls == ([0, 1, 2] if each_step else [0, 1, 2, 3, 4, 5])
    assert all(m.cache is None for m in pipe.unet.attention_layers)  # cleared all the same


def test_the_first_failed_check_names_its_stage(pipe):
    c = types.SimpleNamespace(denoiser=pipe.unet, scheduler=EulerDiscreteScheduler(), guidance_scale=7.5,
                              guidance_rescale=0.0, eta=0.0, dtype=torch.float16, device=torch.device("cpu"))
    checks = FiniteChecks(c, 4)
    checks.each_step = False  # as on a GPU: read after the loop
    checks.check(1, "step", torch.tensor([1.0, float("inf")]))
    checks.check(2, "noise", torch.tensor([float("nan")]))
    with pytest.raises(FloatingPointError, match=r"the EulerDiscreteScheduler step 1 produced NaN or inf; float16"):
        checks.raise_first()
