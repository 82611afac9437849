"""Schedulers against diffusers 0.42.1, step by step on random model outputs (float32).

Both sides get the same initial noise and the same model-output sequence; each then steps its
own previous sample, so differences would accumulate. Generators for the stochastic steps
(DDIM with eta > 0, LCM's re-noising) are seeded identically on both sides.
"""

import warnings

import diffusers
import pytest
import torch

from mini_tgate.core import schedulers as S

TOL = 1e-6
SHAPE = (2, 4, 8, 8)
STEPS = (1, 4, 10, 25)

# The scheduler_config.json files real checkpoints ship.
SD15 = {  # runwayml/stable-diffusion-v1-5: a PNDM config
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
SD21 = {  # stabilityai/stable-diffusion-2-1 (768 px, v-prediction)
    **SD15, "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "prediction_type": "v_prediction",
}
SDXL = {  # stabilityai/stable-diffusion-xl-base-1.0
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
    "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "timestep_spacing": "leading", "trained_betas": None, "use_karras_sigmas": False,
}
LCM = {  # SimianLuo/LCM_Dreamshaper_v7 (the LCM-SDXL configs differ only in _diffusers_version)
    "_class_name": "LCMScheduler", "_diffusers_version": "0.22.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
    "clip_sample_range": 1.0, "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000,
    "original_inference_steps": 50, "prediction_type": "epsilon", "rescale_betas_zero_snr": False,
    "sample_max_value": 1.0, "set_alpha_to_one": True, "steps_offset": 1, "thresholding": False,
    "timestep_scaling": 10.0, "timestep_spacing": "leading", "trained_betas": None,
}
LINEAR = {"beta_schedule": "linear", "beta_start": 0.0001, "beta_end": 0.02}
ZERO_SNR = {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"}

# (id, class name, config, step kwargs)
CASES = [
    ("ddim-sd15", "DDIMScheduler", SD15, {}),
    ("ddim-sd21-v", "DDIMScheduler", SD21, {}),
    ("ddim-linspace", "DDIMScheduler", {**SD15, "timestep_spacing": "linspace"}, {}),
    ("ddim-trailing", "DDIMScheduler", {**SD15, "timestep_spacing": "trailing"}, {}),
    ("ddim-eta1", "DDIMScheduler", SD15, {"eta": 1.0}),
    ("ddim-eta0.3-v", "DDIMScheduler", {**SD21, "timestep_spacing": "trailing"}, {"eta": 0.3}),
    ("ddim-defaults-clip", "DDIMScheduler", {}, {}),  # linear betas, clip_sample, set_alpha_to_one
    ("ddim-clip-sample-pred", "DDIMScheduler", {"prediction_type": "sample", "clip_sample_range": 0.5}, {}),
    ("ddim-zero-snr", "DDIMScheduler", {**SD15, **ZERO_SNR}, {}),
    ("ddim-cosine", "DDIMScheduler", {"beta_schedule": "squaredcos_cap_v2", "clip_sample": False}, {}),
    ("ddim-trained-betas", "DDIMScheduler", {"trained_betas": torch.linspace(1e-4, 0.03, 1000).tolist()}, {}),
    ("lcm", "LCMScheduler", LCM, {}),
    ("lcm-v-clip", "LCMScheduler", {**LCM, "prediction_type": "v_prediction", "clip_sample": True}, {}),
    ("lcm-sample-orig100-zero-snr", "LCMScheduler",
     {**LCM, "prediction_type": "sample", "original_inference_steps": 100, "rescale_betas_zero_snr": True}, {}),
    ("euler-sdxl", "EulerDiscreteScheduler", SDXL, {}),
    ("euler-linspace", "EulerDiscreteScheduler", {**SDXL, "timestep_spacing": "linspace"}, {}),
    ("euler-trailing", "EulerDiscreteScheduler", {**SDXL, "timestep_spacing": "trailing", "steps_offset": 0}, {}),
    ("euler-sd21-v", "EulerDiscreteScheduler", SD21, {}),
    ("euler-karras", "EulerDiscreteScheduler", {**SDXL, "use_karras_sigmas": True}, {}),
    ("euler-sigma-min-linear", "EulerDiscreteScheduler", {**LINEAR, "final_sigmas_type": "sigma_min"}, {}),
    ("euler-zero-snr", "EulerDiscreteScheduler", {**SDXL, **ZERO_SNR}, {}),
    ("dpm-sd15", "DPMSolverMultistepScheduler", SD15, {}),
    ("dpm-sdxl-leading", "DPMSolverMultistepScheduler", SDXL, {}),
    ("dpm-trailing-v", "DPMSolverMultistepScheduler", {**SD21, "timestep_spacing": "trailing"}, {}),
    ("dpm-no-lower-order-final", "DPMSolverMultistepScheduler", {**SD15, "lower_order_final": False}, {}),
    ("dpm-sigma-min", "DPMSolverMultistepScheduler",
     {**SD15, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, {}),
    ("dpm-sigma-min-lof", "DPMSolverMultistepScheduler", {**SD15, "final_sigmas_type": "sigma_min"}, {}),
    ("dpm-euler-at-final", "DPMSolverMultistepScheduler",
     {**SD15, "final_sigmas_type": "sigma_min", "euler_at_final": True, "lower_order_final": False}, {}),
    ("dpm-karras", "DPMSolverMultistepScheduler", {**SD15, "use_karras_sigmas": True}, {}),
    ("dpm-heun-sample", "DPMSolverMultistepScheduler", {**LINEAR, "solver_type": "heun", "prediction_type": "sample"}, {}),
    ("dpm-order1", "DPMSolverMultistepScheduler", {**SD15, "solver_order": 1}, {}),
    ("dpm-zero-snr", "DPMSolverMultistepScheduler", {**SD15, **ZERO_SNR}, {}),
    ("euler-a-sdxl", "EulerAncestralDiscreteScheduler", SDXL, {}),
    ("euler-a-linspace", "EulerAncestralDiscreteScheduler", {**SD15, "timestep_spacing": "linspace"}, {}),
    ("euler-a-trailing-v", "EulerAncestralDiscreteScheduler", {**SD21, "timestep_spacing": "trailing"}, {}),
    ("euler-a-defaults", "EulerAncestralDiscreteScheduler", {}, {}),
    ("euler-a-zero-snr", "EulerAncestralDiscreteScheduler", {**SDXL, **ZERO_SNR}, {}),
]


def reference(class_name, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return getattr(diffusers, class_name).from_config(config)


def reference_x0(theirs, out):
    if hasattr(out, "denoised"):  # LCM
        return out.denoised
    if hasattr(out, "pred_original_sample"):  # DDIM, Euler
        return out.pred_original_sample
    return theirs.model_outputs[-1]  # DPM-Solver keeps its converted model output (x0) there


def run(ours, theirs, n, schedule=None, **step_kwargs):
    """Sample n steps with both (or the custom `schedule`, set_timesteps' keyword arguments);
    check timesteps, init_noise_sigma; return the max abs differences."""
    ours.set_timesteps(**(schedule or {"num_inference_steps": n}))
    theirs.set_timesteps(**(schedule or {"num_inference_steps": n}))
    assert ours.num_inference_steps == theirs.num_inference_steps
    assert schedule is None or ours.num_inference_steps == len(ours.timesteps)
    assert torch.equal(ours.sigmas, theirs.sigmas) if hasattr(theirs, "sigmas") else True
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert ours.timesteps.dtype == theirs.timesteps.dtype
    assert torch.equal(torch.as_tensor(ours.init_noise_sigma), torch.as_tensor(theirs.init_noise_sigma))
    g = torch.Generator().manual_seed(len(ours.timesteps))
    x_ours = x_theirs = torch.randn(SHAPE, generator=g) * theirs.init_noise_sigma
    gen_ours, gen_theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    err = {"scale_model_input": 0.0, "prev_sample": 0.0, "denoised": 0.0}
    for t_ours, t in zip(ours.timesteps, theirs.timesteps):
        a, b = ours.scale_model_input(x_ours, t_ours), theirs.scale_model_input(x_theirs, t)
        model_output = torch.randn(SHAPE, generator=g)
        mine = ours.step(model_output, t_ours, x_ours, generator=gen_ours, **step_kwargs)
        out = theirs.step(model_output, t, x_theirs, generator=gen_theirs, **step_kwargs)
        for key, (u, v) in {
            "scale_model_input": (a, b),
            "prev_sample": (mine.prev_sample, out.prev_sample),
            "denoised": (mine.denoised, reference_x0(theirs, out)),
        }.items():
            assert u.dtype == v.dtype and u.shape == v.shape and u.isfinite().all() and v.isfinite().all()
            err[key] = max(err[key], (u - v).abs().max().item())
        x_ours, x_theirs = mine.prev_sample, out.prev_sample
    return err


@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_matches_diffusers(case, n):
    _, class_name, config, step_kwargs = case
    if class_name == "LCMScheduler" and n > config.get("original_inference_steps", 50):
        pytest.skip("LCM needs num_inference_steps <= original_inference_steps")
    config = {**config, "_class_name": class_name}
    ours = getattr(S, class_name).from_config(config)
    err = run(ours, reference(class_name, config), n, **step_kwargs)
    assert max(err.values()) <= TOL, err


@pytest.mark.parametrize("n", (14, 15))
def test_dpm_lower_order_final_below_15_steps(n):
    """With a nonzero final sigma, the last step is first order only below 15 steps."""
    config = {**SD15, "final_sigmas_type": "sigma_min"}
    ours = S.DPMSolverMultistepScheduler.from_config(config)
    assert max(run(ours, reference("DPMSolverMultistepScheduler", config), n).values()) <= TOL


@pytest.mark.parametrize("class_name", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_trailing_quirk(class_name):
    """For n = 61 "trailing" float strides give 62 timesteps, the last -1, in diffusers too."""
    config = {**SD15, "timestep_spacing": "trailing"}
    ours = getattr(S, class_name).from_config(config)
    assert max(run(ours, reference(class_name, config), 61).values()) <= TOL
    assert len(ours.timesteps) == 62 and ours.timesteps[-1] == -1


def test_unknown_class_falls_back_to_ddim_with_a_warning():
    config = {**SD15, "_class_name": "KDPM2DiscreteScheduler"}
    with pytest.warns(UserWarning, match="KDPM2DiscreteScheduler"):
        ours = S.scheduler_from_config(config)
    assert type(ours) is S.DDIMScheduler
    assert (ours.config.steps_offset, ours.config.set_alpha_to_one, ours.config.beta_schedule) == (1, False, "scaled_linear")
    assert max(run(ours, reference("DDIMScheduler", config), 25).values()) <= TOL


@pytest.mark.parametrize("config", [SD21, SDXL, LCM, SD15], ids=["ddim", "euler", "lcm", "pndm"])
def test_scheduler_from_config_picks_the_named_class(config):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert type(S.scheduler_from_config(config)).__name__ == config["_class_name"]


@pytest.mark.parametrize("source", [SD15, SD21, SDXL, LCM], ids=["pndm", "ddim", "euler", "lcm"])
@pytest.mark.parametrize("target", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler",
                                    "LCMScheduler", "EulerAncestralDiscreteScheduler"])
def test_from_another_schedulers_config(source, target):
    """`Target.from_config(pipe.scheduler.config)` as in diffusers: keys the source config took
    as defaults (not in its json) take the target's defaults instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours_source = S.scheduler_from_config(source)
    theirs_source = reference(source["_class_name"], source)
    ours, theirs = getattr(S, target).from_config(ours_source.config), reference(target, theirs_source.config)
    for key in ours.defaults:
        assert ours.config[key] == theirs.config[key], key
    assert max(run(ours, theirs, 4).values()) <= TOL
    # and a diffusers scheduler's own config
    assert getattr(S, target).from_config(theirs_source.config).config == ours.config


def test_from_config_overrides_and_attribute_access():
    ours = S.EulerDiscreteScheduler.from_config(SDXL, timestep_spacing="trailing")
    theirs = reference("EulerDiscreteScheduler", SDXL)
    theirs = diffusers.EulerDiscreteScheduler.from_config(theirs.config, timestep_spacing="trailing")
    assert ours.config.timestep_spacing == ours.config["timestep_spacing"] == "trailing"
    assert max(run(ours, theirs, 4).values()) <= TOL


def test_dpm_state_is_reset_by_set_timesteps():
    sched = S.DPMSolverMultistepScheduler.from_config(SD15)
    x, eps = torch.randn(SHAPE), torch.randn(SHAPE)

    def sample():
        sched.set_timesteps(10)
        y = x
        for t in sched.timesteps:
            y = sched.step(eps, t, y).prev_sample
        return y

    assert torch.equal(sample(), sample())


def test_randn_tensor_draws_like_diffusers():
    from diffusers.utils.torch_utils import randn_tensor

    for gens in (lambda: torch.Generator().manual_seed(3), lambda: [torch.Generator().manual_seed(i) for i in (3, 4)]):
        assert torch.equal(S.randn_tensor(SHAPE, gens()), randn_tensor(SHAPE, generator=gens()))


def test_names():
    assert S.SCHEDULERS == {
        "ddim": S.DDIMScheduler, "euler": S.EulerDiscreteScheduler,
        "dpm++": S.DPMSolverMultistepScheduler, "lcm": S.LCMScheduler,
    }


@pytest.mark.parametrize("cls", [*S.SCHEDULERS.values(), S.EulerAncestralDiscreteScheduler],
                         ids=[*S.SCHEDULERS, "euler-a"])
def test_bad_arguments(cls):
    sched = cls.from_config(SD15)
    for n in (0, -1, 1001, True, 4.0, "4", None):
        with pytest.raises(ValueError, match="num_inference_steps"):
            sched.set_timesteps(n)
    with pytest.raises(ValueError, match="beta_schedule"):
        cls.from_config({**SD15, "beta_schedule": "quadratic"})
    with pytest.raises(ValueError, match="prediction_type"):
        cls.from_config({**SD15, "prediction_type": "flow"})
    if cls is not S.LCMScheduler:  # LCM's timesteps do not depend on timestep_spacing
        with pytest.raises(ValueError, match="timestep_spacing"):
            cls.from_config({**SD15, "timestep_spacing": "uniform"}).set_timesteps(4)


@pytest.mark.parametrize(
    "cls, config, match",
    [
        (S.DDIMScheduler, {"thresholding": True}, "thresholding"),
        (S.LCMScheduler, {"thresholding": True}, "thresholding"),
        (S.DPMSolverMultistepScheduler, {"thresholding": True}, "thresholding"),
        (S.DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver"}, "algorithm_type"),
        (S.DPMSolverMultistepScheduler, {"solver_order": 3}, "solver_order"),
        (S.DPMSolverMultistepScheduler, {"use_lu_lambdas": True}, "use_lu_lambdas"),
        (S.EulerDiscreteScheduler, {"interpolation_type": "log_linear"}, "interpolation_type"),
        (S.EulerDiscreteScheduler, {"use_exponential_sigmas": True}, "use_exponential_sigmas"),
        (S.EulerDiscreteScheduler, {"final_sigmas_type": "sigma_max"}, "final_sigmas_type"),
    ],
)
def test_unsupported_options_are_rejected(cls, config, match):
    with pytest.raises(ValueError, match=match):
        cls.from_config(config)


def test_lcm_step_count_limits():
    sched = S.LCMScheduler.from_config(LCM)
    with pytest.raises(ValueError, match="original_inference_steps"):
        sched.set_timesteps(51)
    sched.set_timesteps(8, original_inference_steps=8)
    theirs = reference("LCMScheduler", LCM)
    theirs.set_timesteps(8, original_inference_steps=8)
    assert torch.equal(sched.timesteps, theirs.timesteps)


# ----------------------------------------------------------------------------- custom schedules

CUSTOM = [  # (class, config, set_timesteps keywords): each as diffusers 0.42.1 takes them
    ("EulerDiscreteScheduler", SDXL, {"timesteps": [999, 850, 700.5, 500, 300, 120, 10]}),
    ("EulerDiscreteScheduler", {**SD21, "final_sigmas_type": "sigma_min"}, {"timesteps": [900, 400, 0]}),
    ("EulerDiscreteScheduler", SDXL, {"sigmas": [14.6, 6.0, 2.5, 1.0, 0.3, 0.0]}),
    ("EulerDiscreteScheduler", {**SDXL, "use_karras_sigmas": True}, {"sigmas": [10.0, 3.0, 0.7, 0.03]}),
    ("DPMSolverMultistepScheduler", SD15, {"timesteps": [999, 845, 692, 538, 385, 231, 77]}),
    ("DPMSolverMultistepScheduler", {**SD15, "final_sigmas_type": "sigma_min"}, {"timesteps": [981, 500, 20]}),
    ("LCMScheduler", LCM, {"timesteps": [999, 759, 499, 259]}),
    ("LCMScheduler", LCM, {"timesteps": [980, 555, 300, 1]}),  # off the distillation schedule: diffusers warns
]


@pytest.mark.parametrize("case", CUSTOM, ids=lambda c: f"{c[0]}-{next(iter(c[2]))}")
def test_custom_schedules_match_diffusers(case):
    class_name, config, schedule = case
    ours = getattr(S, class_name).from_config(config)
    err = run(ours, reference(class_name, config), None, schedule=schedule)
    assert max(err.values()) <= TOL, err
    key, values = next(iter(schedule.items()))
    n = len(values) - (key == "sigmas")  # sigmas: the final one too
    assert ours.num_inference_steps == len(ours.timesteps) == n
    # the count may be given too where it agrees (diffusers refuses it; the pipeline passes it)
    again = getattr(S, class_name).from_config(config)
    again.set_timesteps(n, **schedule)
    assert torch.equal(again.timesteps, ours.timesteps)


@pytest.mark.parametrize("class_name, key", [
    ("DDIMScheduler", "timesteps"), ("DDIMScheduler", "sigmas"),
    ("EulerAncestralDiscreteScheduler", "timesteps"), ("EulerAncestralDiscreteScheduler", "sigmas"),
    ("DPMSolverMultistepScheduler", "sigmas"), ("LCMScheduler", "sigmas"),
])
def test_unsupported_custom_schedules_are_refused(class_name, key):
    """diffusers' classes have no such argument (TypeError there); here a ValueError saying so."""
    with pytest.raises(TypeError):
        reference(class_name, SD15).set_timesteps(**{key: [999.0, 500.0, 0.0]})
    with pytest.raises(ValueError, match=f"^{class_name} does not support custom {key}; "):
        getattr(S, class_name).from_config(SD15).set_timesteps(**{key: [999.0, 500.0, 0.0]})


@pytest.mark.parametrize("kwargs, match", [
    ({}, "needs num_inference_steps"),
    ({"timesteps": [999, 500], "sigmas": [10.0, 1.0, 0.0]}, "not both"),
    ({"num_inference_steps": 3, "timesteps": [999, 500]}, "num_inference_steps=3 disagrees with the custom list"),
    ({"num_inference_steps": 3, "sigmas": [10.0, 1.0, 0.0]}, "num_inference_steps=3 disagrees"),
    ({"timesteps": [500, 500, 100]}, "strictly decreasing"),
    ({"timesteps": [100, 500]}, "strictly decreasing"),
    ({"timesteps": [1000, 500]}, r"in \[0, 999\]"),
    ({"timesteps": [999, -1]}, r"in \[0, 999\]"),
    ({"timesteps": [999, float("nan")]}, "finite numbers"),
    ({"timesteps": []}, "1 to 1000"),
    ({"timesteps": list(range(1000, -1, -1))}, "1 to 1000"),
    ({"timesteps": [[999, 500]]}, "finite numbers"),
    ({"timesteps": "999"}, "list"),
    ({"sigmas": [10.0, 10.0, 0.0]}, "strictly decreasing"),
    ({"sigmas": [10.0, 1.0, -0.5]}, ">= 0"),
    ({"sigmas": [10.0]}, "2 or more"),
    ({"sigmas": [10.0, float("inf"), 0.0]}, "finite"),
])
def test_bad_custom_schedules(kwargs, match):
    with pytest.raises(ValueError, match=match):
        S.EulerDiscreteScheduler.from_config(SDXL).set_timesteps(**kwargs)


@pytest.mark.parametrize("class_name", ["DPMSolverMultistepScheduler", "LCMScheduler"])
def test_custom_timesteps_must_be_integers_where_they_index_the_table(class_name):
    with pytest.raises(ValueError, match=r"integers in \[0, 999\]"):
        getattr(S, class_name).from_config(LCM).set_timesteps(timesteps=[999, 500.5])


@pytest.mark.parametrize("class_name", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_custom_timesteps_with_karras_sigmas_are_refused_as_in_diffusers(class_name):
    config = {**SD15, "use_karras_sigmas": True}
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        reference(class_name, config).set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        getattr(S, class_name).from_config(config).set_timesteps(timesteps=[999, 500])


# ----------------------------------------------------------------------------- config values


ALL_CLASSES = ["DDIMScheduler", "EulerDiscreteScheduler", "LCMScheduler", "DPMSolverMultistepScheduler",
               "EulerAncestralDiscreteScheduler"]
BAD_CONFIGS = [(name, config, match) for name in ALL_CLASSES for config, match in [
    ({"num_train_timesteps": 0}, "num_train_timesteps must be an integer from 2 to 100000"),
    ({"num_train_timesteps": 1}, "num_train_timesteps"),
    ({"num_train_timesteps": 10**9}, "100000"),
    ({"num_train_timesteps": "1000"}, "num_train_timesteps"),
    ({"num_train_timesteps": 1000.0}, "num_train_timesteps"),
    ({"num_train_timesteps": True}, "num_train_timesteps"),
    ({"steps_offset": 1000}, r"steps_offset must be an integer in \[0, num_train_timesteps=1000\)"),
    ({"steps_offset": -1}, "steps_offset"),
    ({"steps_offset": "1"}, "steps_offset"),
    ({"trained_betas": [0.01]}, "trained_betas must be a list of num_train_timesteps=1000 numbers, got 1"),
    ({"trained_betas": "0.01"}, "trained_betas"),
    ({"trained_betas": [0.01] * 999 + [1.5]}, r"trained_betas must all be numbers in \(0, 1\)"),
    ({"trained_betas": [0.01] * 999 + ["x"]}, "trained_betas"),
    ({"beta_start": -0.001}, r"beta_start must be a number in \(0, 1\)"),
    ({"beta_end": float("nan")}, "beta_end"),
    ({"beta_end": 1.0}, "beta_end"),
    ({"beta_start": "0.001"}, "beta_start"),
    ({"beta_schedule": ["linear"]}, "beta_schedule"),
    ({"timestep_spacing": None}, "timestep_spacing"),
]] + [
    ("DDIMScheduler", {"clip_sample_range": -1.0}, "clip_sample_range must be a positive number"),
    ("LCMScheduler", {"timestep_scaling": "10"}, "timestep_scaling"),
    ("LCMScheduler", {"original_inference_steps": 0}, "original_inference_steps"),
    ("LCMScheduler", {"original_inference_steps": 2000}, "original_inference_steps"),
    ("EulerDiscreteScheduler", {"sigma_min": 0.0, "use_karras_sigmas": True}, "sigma_min"),
]


@pytest.mark.parametrize("class_name, config, match", BAD_CONFIGS)
def test_bad_config_values(class_name, config, match):
    """One ConfigError naming the key, at construction (diffusers crashes later, or makes NaN)."""
    with pytest.raises(S.ConfigError, match=match):
        getattr(S, class_name).from_config({**SD15, **config})


@pytest.mark.parametrize("config", [[1, 2], "DDIMScheduler", None, {"_class_name": ["DDIMScheduler"]}, {1: 2}])
def test_scheduler_config_of_the_wrong_shape(config):
    with pytest.raises(S.ConfigError, match="scheduler config"):
        S.scheduler_from_config(config)


def test_ddim_leading_steps_past_the_last_timestep():
    """SD-1.5's config ("leading", steps_offset 1) with 1000 steps would reach t = 1000: an
    IndexError in diffusers; here a ValueError naming the most steps it allows (999, which
    works, as in diffusers)."""
    sched = S.DDIMScheduler.from_config(SD15)
    theirs = reference("DDIMScheduler", SD15)
    theirs.set_timesteps(1000)
    with pytest.raises(IndexError):
        theirs.step(torch.zeros(SHAPE), theirs.timesteps[0], torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="allows at most 999 steps"):
        sched.set_timesteps(1000)
    with pytest.raises(ValueError, match=r"allows at most 996 steps$"):  # 995 * 1 + 4 = 999
        S.DDIMScheduler.from_config({**SD15, "steps_offset": 4}).set_timesteps(997)
    # 499 * 2 + 2 = 1000 is past the end, 500 * 1 + 2 and 498 * 2 + 2 are not
    offset2 = S.DDIMScheduler.from_config({**SD15, "steps_offset": 2})
    with pytest.raises(ValueError, match=r"allows at most 998 steps \(and 499 is the most below 500\)$"):
        offset2.set_timesteps(500)
    offset2.set_timesteps(501)
    assert max(run(sched, theirs, 999).values()) <= TOL


# ----------------------------------------------------------------------------- A1111 names


@pytest.mark.parametrize("name, class_name, karras", [
    ("DDIM", "DDIMScheduler", None), ("ddim", "DDIMScheduler", None),
    ("Euler", "EulerDiscreteScheduler", False), ("euler", "EulerDiscreteScheduler", False),
    ("Euler a", "EulerAncestralDiscreteScheduler", None), ("euler_a", "EulerAncestralDiscreteScheduler", None),
    ("EULER-A", "EulerAncestralDiscreteScheduler", None),
    ("DPM++ 2M", "DPMSolverMultistepScheduler", False), ("dpm++ 2m", "DPMSolverMultistepScheduler", False),
    ("DPM++ 2M Karras", "DPMSolverMultistepScheduler", True), ("dpm++", "DPMSolverMultistepScheduler", False),
    ("LCM", "LCMScheduler", None), ("lcm", "LCMScheduler", None),
])
def test_scheduler_by_name(name, class_name, karras):
    """Built as a diffusers user builds it: Class.from_config(config, use_karras_sigmas=...)."""
    ours = S.scheduler_by_name(name, SD15)
    assert type(ours).__name__ == class_name
    overrides = {} if karras is None or name.lower() in ("euler", "dpm++") else {"use_karras_sigmas": karras}
    theirs = getattr(diffusers, class_name).from_config(reference("DDIMScheduler", SD15).config, **overrides)
    if karras is not None:
        assert ours.config.use_karras_sigmas is theirs.config.use_karras_sigmas is karras
    if class_name != "LCMScheduler":
        assert max(run(ours, theirs, 10).values()) <= TOL


def test_dpm_2m_without_karras_overrides_the_checkpoint():
    karras_config = {**SD15, "_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    assert S.scheduler_by_name("DPM++ 2M", karras_config).config.use_karras_sigmas is False
    assert S.scheduler_by_name("dpm++", karras_config).config.use_karras_sigmas is True
    assert S.a1111_names(S.scheduler_by_name("dpm++", karras_config)) == ("DPM++ 2M", "Karras")


def test_unknown_scheduler_name():
    with pytest.raises(ValueError, match="unknown scheduler 'dpm2'; choose one of: DDIM, Euler, Euler a, DPM"):
        S.scheduler_by_name("dpm2", SD15)
    with pytest.raises(TypeError):
        S.scheduler_by_name(None, SD15)


def test_every_listed_name_is_accepted_and_a1111_names_round_trip():
    assert S.SCHEDULER_NAMES[:6] == ["DDIM", "Euler", "Euler a", "DPM++ 2M", "DPM++ 2M Karras", "LCM"]
    expected = {"DDIM": ("DDIM", "Automatic"), "Euler": ("Euler", "Automatic"), "Euler a": ("Euler a", "Automatic"),
                "DPM++ 2M": ("DPM++ 2M", "Automatic"), "DPM++ 2M Karras": ("DPM++ 2M", "Karras"),
                "LCM": ("LCM", "Automatic")}
    for name in S.SCHEDULER_NAMES:
        sched = S.scheduler_by_name(name, SD15)
        if name in expected:
            assert S.a1111_names(sched) == expected[name]
    karras_euler = S.EulerDiscreteScheduler.from_config({**SDXL, "use_karras_sigmas": True})
    assert S.a1111_names(karras_euler) == ("Euler", "Karras")
    with pytest.raises(TypeError):
        S.a1111_names(reference("DDIMScheduler", SD15))


# ----------------------------------------------------------------------------- Euler a, whole pipeline


def test_euler_ancestral_pipeline_matches_diffusers(tmp_path, one_thread):
    """A tiny SD checkpoint through diffusers' StableDiffusionPipeline and load_pipeline, both with
    Euler a from the checkpoint's scheduler config: same latents, same generator for the noise
    each step adds."""
    from tiny_models import save_sd

    import mini_tgate

    save_sd(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path)
    ref.set_progress_bar_config(disable=True)
    ours = mini_tgate.load_pipeline(tmp_path)
    ref.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(ref.scheduler.config)
    ours.scheduler = S.scheduler_by_name("Euler a", ours.scheduler.config)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=8, guidance_scale=7.5, latents=latents)
    expected = ref("a red circle", output_type="np", generator=torch.Generator().manual_seed(1), **kw).images
    got = ours("a red circle", generator=torch.Generator().manual_seed(1), **kw).images
    assert abs(torch.as_tensor(expected) - torch.as_tensor(got)).max().item() <= 1e-5
    # and the noise matters: another generator gives another image
    other = ours("a red circle", generator=torch.Generator().manual_seed(2), **kw).images
    assert abs(torch.as_tensor(other) - torch.as_tensor(got)).max().item() > 1e-3


# ----------------------------------------------------------------------------- SVD: continuous timesteps

SVD = {  # stabilityai/stable-video-diffusion-img2vid-xt: EDM's Karras sigmas, v-prediction (diffusers' SVD tests too)
    "_class_name": "EulerDiscreteScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "beta_start": 0.00085, "interpolation_type": "linear", "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "sigma_max": 700.0, "sigma_min": 0.002,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "timestep_type": "continuous",
    "trained_betas": None, "use_karras_sigmas": True,
}


@pytest.mark.parametrize("n", (1, 4, 14, 25))
def test_svd_continuous_timesteps_match_diffusers_bit_for_bit(n):
    """SVD's scheduler for a whole run on seeded random model outputs (`run` asserts sigmas,
    timesteps and init_noise_sigma equal). Bit-exact, not within a tolerance: the timesteps are
    the same float32 ln of the same float32 sigmas (torch's log kernel, vectorized or not, gives
    the same bits), and scale_model_input and step are the same float32 operations in the same
    order."""
    ours, theirs = S.EulerDiscreteScheduler.from_config(SVD), reference("EulerDiscreteScheduler", SVD)
    err = run(ours, theirs, n)
    assert err == {"scale_model_input": 0.0, "prev_sample": 0.0, "denoised": 0.0}, err
    assert ours.timesteps.dtype == torch.float32 and len(ours.timesteps) == n
    assert torch.equal(ours.timesteps, 0.25 * ours.sigmas[:-1].log())  # EDM's c_noise = ln(sigma) / 4
    assert ours.sigmas[0] == torch.tensor(700.0) and ours.sigmas[-1] == 0  # Karras from sigma_max ...
    assert n == 1 or ours.sigmas[-2] == torch.tensor(0.002)  # ... down to sigma_min
    assert torch.equal(ours.init_noise_sigma, (torch.tensor(700.0) ** 2 + 1) ** 0.5)  # "leading": sqrt(max^2 + 1)
    # add_noise at the start step (img2img's rule: the pipeline sets the begin index first)
    x0, noise = torch.randn(SHAPE), torch.randn(SHAPE)
    for sched in (ours, theirs):
        sched.set_timesteps(n)
        sched.set_begin_index(min(2, n - 1))
    t = theirs.timesteps[min(2, n - 1): min(2, n - 1) + 1]
    assert torch.equal(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t))


def test_svd_video_latents_and_custom_sigmas_match_diffusers(monkeypatch):
    """Video latents (batch, frames, channels, h, w) step as any tensor; custom sigmas get
    continuous timesteps too; custom timesteps are refused, as in diffusers."""
    monkeypatch.setitem(globals(), "SHAPE", (1, 3, 4, 4, 6))  # what `run` draws
    ours, theirs = S.EulerDiscreteScheduler.from_config(SVD), reference("EulerDiscreteScheduler", SVD)
    assert max(run(ours, theirs, 25).values()) == 0.0
    assert max(run(ours, theirs, None, schedule={"sigmas": [700.0, 30.0, 1.5, 0.1, 0.002, 0.0]}).values()) == 0.0
    assert torch.equal(ours.timesteps, 0.25 * torch.tensor([700.0, 30.0, 1.5, 0.1, 0.002]).log())
    no_karras = {**SVD, "use_karras_sigmas": False}  # (with Karras sigmas, both refuse custom timesteps for that)
    with pytest.raises(ValueError, match="continuous"):
        reference("EulerDiscreteScheduler", no_karras).set_timesteps(timesteps=[999, 500])
    with pytest.raises(ValueError, match="timestep_type='continuous'"):
        S.EulerDiscreteScheduler.from_config(no_karras).set_timesteps(timesteps=[999, 500])


@pytest.mark.parametrize("config", [
    # diffusers keeps the training-step timesteps then (sigmas past the training range would all
    # map to t = 999, where diffusers' lookup of a repeated first timestep takes the second one)
    {**SVD, "prediction_type": "epsilon", "sigma_min": None, "sigma_max": None},
    {**SVD, "use_karras_sigmas": False, "sigma_min": None, "sigma_max": None},  # sigma_t at "leading" steps
    {**SD21, "timestep_type": "continuous", "timestep_spacing": "trailing"},
], ids=["epsilon-ignores-continuous", "continuous-without-karras", "continuous-sd21-trailing"])
def test_continuous_timestep_variants_match_diffusers(config):
    ours, theirs = S.EulerDiscreteScheduler.from_config(config), reference("EulerDiscreteScheduler", config)
    for n in (4, 14):
        assert max(run(ours, theirs, n).values()) == 0.0  # bit-exact, as for SVD's own config above


@pytest.mark.parametrize("config, match", [
    ({"timestep_type": "edm"}, r"timestep_type='edm' is not supported here \(supported: \('discrete', 'continuous'\)\)"),
    ({"timestep_type": None}, "timestep_type"),
    ({"sigma_min": 700.0, "sigma_max": 0.002}, "sigma_min=700.0 must be below sigma_max=0.002"),
    ({"sigma_min": 1.0, "sigma_max": 1.0}, "must be below"),
    ({"sigma_max": 1e30}, r"sigma_max must be below 2\*\*63"),
    ({"sigma_max": float("inf")}, "sigma_max must be a positive number"),
])
def test_svd_config_values_refused(config, match):
    with pytest.raises(S.ConfigError, match=match):
        S.EulerDiscreteScheduler.from_config({**SVD, **config})
