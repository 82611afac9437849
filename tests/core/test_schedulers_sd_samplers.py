"""PNDM/PLMS, UniPC, Heun, LMS and DPM++ 2M SDE against diffusers 0.42.1, step by step on seeded
random model outputs (as test_schedulers.py), from the first step and from a begin index (img2img);
LMS's exact coefficients against diffusers' numerical ones; the A1111 names. Whole pipeline runs:
test_schedulers_pipeline.py."""

import diffusers
import pytest
import torch
from test_schedulers import LINEAR, SD15, SD21, SDXL, SHAPE, ZERO_SNR, reference

from mini_tgate.core import schedulers as S
from mini_tgate.core.schedulers.lms import lms_coefficient

TOL = 1e-6
SDE = {"algorithm_type": "sde-dpmsolver++"}
CASES = [  # (id, class name, config)
    ("pndm-sd15", "PNDMScheduler", SD15),
    ("pndm-prk-v", "PNDMScheduler", {**SD21, "skip_prk_steps": False}),
    ("pndm-prk-defaults", "PNDMScheduler", {}),
    ("pndm-linspace", "PNDMScheduler", {**SD15, "timestep_spacing": "linspace"}),
    ("pndm-trailing-alpha1", "PNDMScheduler", {**SD15, "timestep_spacing": "trailing", "set_alpha_to_one": True}),
    ("heun-sd15", "HeunDiscreteScheduler", SD15),
    ("heun-karras", "HeunDiscreteScheduler", {**SDXL, "use_karras_sigmas": True}),
    ("heun-v-clip", "HeunDiscreteScheduler", {**SD21, "clip_sample": True}),
    ("heun-sample-defaults", "HeunDiscreteScheduler", {"prediction_type": "sample"}),
    ("lms-sd15", "LMSDiscreteScheduler", SD15),
    ("lms-karras", "LMSDiscreteScheduler", {**SDXL, "use_karras_sigmas": True}),
    ("lms-v-linear", "LMSDiscreteScheduler", {**SD21, **LINEAR}),
    ("unipc-sd15", "UniPCMultistepScheduler", SD15),
    ("unipc-bh1", "UniPCMultistepScheduler", {**SD15, "solver_type": "bh1"}),
    ("unipc-order3", "UniPCMultistepScheduler", {**SD15, "solver_order": 3}),
    ("unipc-karras-v", "UniPCMultistepScheduler", {**SD21, "use_karras_sigmas": True}),
    ("unipc-predict-eps", "UniPCMultistepScheduler", {**SD15, "predict_x0": False, "final_sigmas_type": "sigma_min"}),
    ("unipc-sigma-min", "UniPCMultistepScheduler", {**SD15, "final_sigmas_type": "sigma_min", "lower_order_final": False}),
    ("unipc-no-corrector", "UniPCMultistepScheduler", {**SD15, "disable_corrector": [0, 2]}),
    ("unipc-zero-snr", "UniPCMultistepScheduler", {**SD15, **ZERO_SNR}),
    ("dpm-sde", "DPMSolverMultistepScheduler", {**SD15, **SDE}),
    ("dpm-sde-karras", "DPMSolverMultistepScheduler", {**SD15, **SDE, "use_karras_sigmas": True}),
    ("dpm-sde-heun-sigma-min", "DPMSolverMultistepScheduler",
     {**SD15, **SDE, "solver_type": "heun", "final_sigmas_type": "sigma_min"}),
]


def run(ours, theirs, n, begin=0):
    """n steps with both from `begin` (set_begin_index on both where diffusers has it); the max
    abs difference of scale_model_input, prev_sample and the x_0 estimate, relative to the
    sample's size (LMS's coefficients differ in the last float32 bits from diffusers')."""
    for s in (ours, theirs):
        s.set_timesteps(n)
    assert torch.equal(ours.timesteps, theirs.timesteps) and ours.timesteps.dtype == theirs.timesteps.dtype
    assert torch.equal(ours.sigmas, theirs.sigmas) if hasattr(theirs, "sigmas") else True
    assert torch.equal(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(theirs.init_noise_sigma))
    assert ours.order == theirs.order and ours.num_inference_steps == theirs.num_inference_steps
    if begin:
        ours.set_begin_index(begin)
        if hasattr(theirs, "set_begin_index"):  # diffusers' PNDM has none: its counter starts at 0
            theirs.set_begin_index(begin)
    g = torch.Generator().manual_seed(len(ours.timesteps))
    x = y = torch.randn(SHAPE, generator=g) * theirs.init_noise_sigma
    gen_ours, gen_theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    err = 0.0
    for t_ours, t in zip(ours.schedule[begin:], theirs.timesteps[begin:]):
        assert isinstance(t_ours, (int, float))  # the loop's host numbers
        a, b = ours.scale_model_input(x, t_ours), theirs.scale_model_input(y, t)
        model_output = torch.randn(SHAPE, generator=g)
        mine = ours.step(model_output, t_ours, x, generator=gen_ours)
        kw = {"generator": gen_theirs} if isinstance(theirs, diffusers.DPMSolverMultistepScheduler) else {}
        out = theirs.step(model_output, t, y, **kw)
        pairs = [(a, b), (mine.prev_sample, out.prev_sample)]
        if getattr(out, "pred_original_sample", None) is not None:
            pairs.append((mine.denoised, out.pred_original_sample))
        elif hasattr(theirs, "model_outputs"):
            pairs.append((mine.denoised, theirs.model_outputs[-1]))
        for u, v in pairs:
            assert u.dtype == v.dtype and u.shape == v.shape and u.isfinite().all()
            err = max(err, ((u - v).abs().max() / max(1.0, v.abs().max().item())).item())
        x, y = mine.prev_sample, out.prev_sample
    return err


@pytest.mark.parametrize("n", (1, 4, 10, 25))
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_diffusers(case, n):
    _, class_name, config = case
    if class_name == "PNDMScheduler" and not config.get("skip_prk_steps", False) and n < 4:
        with pytest.raises(ValueError, match="num_inference_steps >= 4"):
            S.PNDMScheduler.from_config(config).set_timesteps(n)
        return
    config = {**config, "_class_name": class_name}
    assert run(getattr(S, class_name).from_config(config), reference(class_name, config), n) <= TOL


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_from_a_begin_index_matches_diffusers(case):
    """img2img's start: 10 steps from the 5th (Heun: its 2 calls a step, so entry 10)."""
    _, class_name, config = case
    config = {**config, "_class_name": class_name}
    ours, theirs = getattr(S, class_name).from_config(config), reference(class_name, config)
    assert run(ours, theirs, 10, begin=5 * ours.order) <= TOL


def test_lms_coefficients_match_diffusers_quadrature():
    theirs = diffusers.LMSDiscreteScheduler.from_config(SD15)
    theirs.set_timesteps(25)
    sigmas = theirs.sigmas.numpy()
    for i in range(25):
        order = min(i + 1, 4)
        for j in range(order):
            expected = theirs.get_lms_coefficient(order, i, j)  # quad of a float32 integrand
            assert abs(lms_coefficient(sigmas, order, i, j) - expected) <= 1e-6 * max(abs(expected), 1e-3)


def test_schedules_and_state():
    heun, pndm = S.HeunDiscreteScheduler.from_config(SD15), S.PNDMScheduler.from_config(SD15)
    heun.set_timesteps(10)
    pndm.set_timesteps(10)
    assert (heun.order, len(heun.timesteps), pndm.order, len(pndm.timesteps)) == (2, 19, 1, 11)
    assert pndm.schedule[1] == pndm.schedule[2]  # PLMS's first step is taken twice
    for name in ("PNDMScheduler", "UniPCMultistepScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler"):
        sched = getattr(S, name).from_config(SD15)
        x, eps = torch.randn(SHAPE), torch.randn(SHAPE)

        def sample():
            sched.set_timesteps(6)
            y = x
            for t in sched.schedule:
                y = sched.step(eps, t, sched.scale_model_input(y, t)).prev_sample
            return y

        assert torch.equal(sample(), sample()), name  # set_timesteps starts afresh


@pytest.mark.parametrize("name, class_name, karras, sde", [
    ("PLMS", "PNDMScheduler", False, False), ("plms", "PNDMScheduler", False, False),
    ("UniPC", "UniPCMultistepScheduler", False, False), ("Heun", "HeunDiscreteScheduler", False, False),
    ("LMS", "LMSDiscreteScheduler", False, False), ("DPM++ 2M SDE", "DPMSolverMultistepScheduler", False, True),
    ("DPM++ 2M SDE Karras", "DPMSolverMultistepScheduler", True, True),
])
def test_a1111_names(name, class_name, karras, sde):
    ours = S.scheduler_by_name(name, SD15)
    assert type(ours).__name__ == class_name and name.lower() in {n.lower() for n in S.SCHEDULER_NAMES}
    assert (ours.config.get("algorithm_type") == "sde-dpmsolver++") is sde
    assert S.a1111_names(ours) == ({"plms": "PLMS"}.get(name, name).replace(" Karras", ""),
                                   "Karras" if karras else "Automatic")
    if class_name == "PNDMScheduler":
        assert ours.config.skip_prk_steps is True  # A1111's PLMS has no Runge-Kutta start


@pytest.mark.parametrize("target", ["PNDMScheduler", "UniPCMultistepScheduler", "HeunDiscreteScheduler",
                                    "LMSDiscreteScheduler"])
@pytest.mark.parametrize("source", [SD15, SD21, SDXL], ids=["pndm", "ddim", "euler"])
def test_from_another_schedulers_config(source, target):
    theirs_source = reference(source["_class_name"], source)
    ours = getattr(S, target).from_config(S.scheduler_from_config(source).config)
    theirs = reference(target, theirs_source.config)
    for key in ours.defaults:
        assert ours.config[key] == theirs.config[key], key
    assert run(ours, theirs, 4) <= TOL


@pytest.mark.parametrize("cls, config, match", [
    (S.UniPCMultistepScheduler, {"thresholding": True}, "thresholding"),
    (S.UniPCMultistepScheduler, {"use_flow_sigmas": True}, "use_flow_sigmas"),
    (S.UniPCMultistepScheduler, {"solver_order": 4}, "solver_order"),
    (S.UniPCMultistepScheduler, {"disable_corrector": "all"}, "disable_corrector"),
    (S.HeunDiscreteScheduler, {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
    (S.LMSDiscreteScheduler, {"use_beta_sigmas": True}, "use_beta_sigmas"),
    (S.PNDMScheduler, {"prediction_type": "sample"}, "prediction_type"),
])
def test_unsupported_options_are_rejected(cls, config, match):
    with pytest.raises(ValueError, match=match):
        cls.from_config(config)


def test_heun_custom_timesteps_match_diffusers():
    ours, theirs = S.HeunDiscreteScheduler.from_config(SD15), reference("HeunDiscreteScheduler", SD15)
    ours.set_timesteps(timesteps=[900, 700.5, 300, 10])
    theirs.set_timesteps(timesteps=[900, 700.5, 300, 10])
    assert torch.equal(ours.timesteps, theirs.timesteps) and torch.equal(ours.sigmas, theirs.sigmas)
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        S.HeunDiscreteScheduler.from_config({**SD15, "use_karras_sigmas": True}).set_timesteps(timesteps=[900, 10])
