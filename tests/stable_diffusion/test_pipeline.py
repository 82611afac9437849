"""End-to-end: mini_tgate's pipelines against diffusers' pipelines and the `tgate` package's gated ones,
on tiny random-weight checkpoints saved in the real diffusers layout."""

import json
import warnings

import diffusers
import numpy as np
import pytest
import torch
from conftest import realign
from tgate import TgateSDLoader, TgateSDXLLoader
from tiny_models import save_sd, save_sdxl

import mini_tgate
from mini_tgate.loading import load_pipeline
from mini_tgate.stable_diffusion.pipeline import StableDiffusionXLPipeline

PROMPT = "a red circle on a blue background"
SCHEDULERS = ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "LCMScheduler"]


@pytest.fixture(scope="module", params=["sd", "sd-v", "sdxl"])
def pipes(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    if request.param == "sdxl":
        save_sdxl(folder)
    else:
        save_sd(folder, "v_prediction" if request.param == "sd-v" else "epsilon")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.DiffusionPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    return request.param, ref, load_pipeline(folder), folder


def noise(batch=1, seed=0):
    return torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def use_scheduler(ref, ours, name):
    ref.scheduler = getattr(diffusers, name).from_config(ref.scheduler.config)
    ours.scheduler = getattr(mini_tgate, name).from_config(ours.scheduler.config)


def max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_matches_diffusers(pipes, scheduler):
    name, ref, ours, _ = pipes
    use_scheduler(ref, ours, scheduler)
    kw = dict(num_inference_steps=12, guidance_scale=7.5, latents=noise())
    expected = ref(PROMPT, output_type="np", generator=torch.Generator().manual_seed(1), **kw).images
    got = ours(PROMPT, generator=torch.Generator().manual_seed(1), **kw).images  # LCM re-noises with it
    assert max_diff(expected, got) <= 1e-3


def test_batches_negatives_and_generator(pipes):
    name, ref, ours, _ = pipes
    use_scheduler(ref, ours, "EulerDiscreteScheduler")
    kw = dict(prompt=["a cat", "two dogs, sketch"], negative_prompt=["blurry", "low quality"], num_inference_steps=10,
              guidance_scale=6.0, num_images_per_prompt=2, guidance_rescale=0.7)
    expected = ref(generator=torch.Generator().manual_seed(7), output_type="np", **kw).images
    got = ours(generator=torch.Generator().manual_seed(7), **kw).images
    assert got.shape == (4, 64, 64, 3)
    assert max_diff(expected, got) <= 1e-3


def test_latent_output_and_sdxl_sizes(pipes):
    name, ref, ours, _ = pipes
    use_scheduler(ref, ours, "DDIMScheduler")
    kw = dict(num_inference_steps=10, latents=noise(), guidance_scale=7.5)
    if name == "sdxl":
        kw.update(original_size=(128, 96), target_size=(64, 64), crops_coords_top_left=(8, 4))
    realign(ref.unet, ref.text_encoder, *([ref.text_encoder_2] if name == "sdxl" else []))  # fresh memory, as ours
    expected = ref(PROMPT, output_type="latent", **kw).images
    # float32 latents, bit for bit: the same operations on the same memory layouts (the
    # transformer's output made contiguous before proj_out, as diffusers does; a channels-last
    # view took another convolution kernel and cost ~1e-4 here before), on AVX2 and AVX-512 alike
    assert torch.equal(expected, ours(PROMPT, output_type="latent", **kw).images)


GATES = [(10, 5, 1, 2), (5, 3, 2, 1), (3, 1, 1, 0), (20, 5, 1, 2)]


@pytest.mark.parametrize("gate", GATES)
def test_tgate_matches_the_tgate_package(pipes, gate):
    name, ref, ours, _ = pipes
    use_scheduler(ref, ours, "DPMSolverMultistepScheduler")
    reference = (TgateSDXLLoader if name == "sdxl" else TgateSDLoader)(ref)
    kw = dict(num_inference_steps=15, guidance_scale=7.5, latents=noise())
    expected = reference.tgate(PROMPT, output_type="np", **kw, **dict(zip(
        ["gate_step", "sp_interval", "fi_interval", "warm_up"], gate))).images
    out = ours(PROMPT, tgate=mini_tgate.TGate(*gate), **kw)
    assert max_diff(expected, out.images) <= 1e-3
    # the report: doubled batch before the gate, one branch after it
    assert [s["batch"] for s in out.steps] == [2 if i < gate[0] else 1 for i in range(15)]


@pytest.fixture(scope="module")
def lcm_pipes(tmp_path_factory):
    folder = save_sdxl(tmp_path_factory.mktemp("lcm-sdxl"), lcm=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.DiffusionPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ours = load_pipeline(folder)
    use_scheduler(ref, ours, "LCMScheduler")
    return ref, ours


@pytest.mark.parametrize("gate", [None, (1, 1, 1, 0), (2, 1, 1, 0)])
def test_lcm_sdxl_with_and_without_gate(lcm_pipes, gate):
    ref, ours = lcm_pipes
    kw = dict(num_inference_steps=4, guidance_scale=8.0, latents=noise())
    g = [torch.Generator().manual_seed(1) for _ in range(2)]  # LCM re-noises with it
    if gate is None:
        expected = ref(PROMPT, output_type="np", generator=g[0], **kw).images
    else:
        expected = TgateSDXLLoader(ref).tgate(PROMPT, output_type="np", lcm=True, generator=g[0], **kw, **dict(zip(
            ["gate_step", "sp_interval", "fi_interval", "warm_up"], gate))).images
    out = ours(PROMPT, tgate=gate and mini_tgate.TGate(*gate), generator=g[1], **kw)
    assert max_diff(expected, out.images) <= 1e-3
    assert {s["batch"] for s in out.steps} == {1}  # no CFG: guidance is an embedding


def test_no_state_leaks_between_calls(pipes):
    name, _, ours, folder = pipes
    gate = mini_tgate.TGate(5, 3, 2, 1)
    kw = dict(num_inference_steps=10, latents=noise(), tgate=gate, guidance_scale=7.5)
    first = ours(PROMPT, **kw).images
    ours(["a green square", "a yellow star"], num_inference_steps=7, latents=noise(2, 1), tgate=mini_tgate.TGate(3, 2, 1, 0))
    assert all(m.cache is None for m in ours.unet.attention_layers)
    again = ours(PROMPT, **kw).images
    fresh = load_pipeline(folder)
    fresh.scheduler = type(ours.scheduler).from_config(ours.scheduler.config)
    assert np.array_equal(first, again)
    assert np.array_equal(again, fresh(PROMPT, **kw).images)


def test_long_prompt_warns_with_the_dropped_words(pipes):
    _, _, ours, _ = pipes
    prompt = "a red circle " * 30 + "and finally a purple elephant"
    with pytest.warns(UserWarning, match="purple elephant"):
        ours(prompt, num_inference_steps=1, latents=noise(), output_type="latent")


def test_pipeline_class_and_scheduler_fallback(pipes, tmp_path):
    name, _, ours, folder = pipes
    assert isinstance(ours, StableDiffusionXLPipeline) == (name == "sdxl")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config["_class_name"] = "KDPM2DiscreteScheduler"  # a class not implemented here
    with pytest.warns(UserWarning, match="KDPM2DiscreteScheduler"):
        scheduler = mini_tgate.scheduler_from_config(config)
    assert isinstance(scheduler, mini_tgate.DDIMScheduler)
    config["_class_name"] = "PNDMScheduler"  # what SD-1.5 ships: its own, no fallback
    assert type(mini_tgate.scheduler_from_config(config)).__name__ == "PNDMScheduler"
