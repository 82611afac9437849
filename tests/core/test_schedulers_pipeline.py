"""PNDM/PLMS, UniPC, Heun, LMS and DPM++ 2M SDE over whole pipeline runs against diffusers 0.42.1:
a tiny SD checkpoint through diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline
and through load_pipeline, each with the scheduler an A1111 name means, built as a diffusers
user builds it (Class.from_config(pipe.scheduler.config, **overrides)); same latents, same
generators. And SD-1.5's own PNDM config, and a TGATE run against the `tgate` package."""

import json
import shutil
import warnings

import diffusers
import numpy as np
import pytest
import torch
from tgate import TgateSDLoader
from tiny_models import save_sd

import mini_tgate
from mini_tgate.core import schedulers as S

PROMPT = "a red circle on a blue background"
TOL = 1e-5
SDE = dict(solver_order=2, algorithm_type="sde-dpmsolver++")
NAMES = {  # A1111 name -> (diffusers class, the overrides a diffusers user gives for it)
    "PLMS": ("PNDMScheduler", dict(skip_prk_steps=True)), "UniPC": ("UniPCMultistepScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}), "LMS": ("LMSDiscreteScheduler", {}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {**SDE, "use_karras_sigmas": False}),
    "DPM++ 2M SDE Karras": ("DPMSolverMultistepScheduler", {**SDE, "use_karras_sigmas": True}),
}
NEW = list(NAMES)


@pytest.fixture(scope="module")
def pipes(tmp_path_factory, one_thread):
    folder = save_sd(tmp_path_factory.mktemp("sd"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    ref_i2i = diffusers.StableDiffusionImg2ImgPipeline(**ref.components)
    ref_i2i.set_progress_bar_config(disable=True)
    ref.folder = folder
    return ref, ref_i2i, mini_tgate.load_pipeline(folder)


def use(name, ref, ref_i2i, ours):
    class_name, overrides = NAMES[name]
    ref.scheduler = ref_i2i.scheduler = getattr(diffusers, class_name).from_config(ref.scheduler.config, **overrides)
    ours.scheduler = S.scheduler_by_name(name, ours.scheduler.config)
    assert type(ours.scheduler).__name__ == class_name


def latents(seed=0):
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def picture():
    rng = np.random.default_rng(0)
    return rng.random((64, 64, 3)).astype(np.float32)


def max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def both(ref, ours, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref(PROMPT, output_type="np", generator=torch.Generator().manual_seed(1), **kw).images
    return expected, ours(PROMPT, generator=torch.Generator().manual_seed(1), **kw).images


@pytest.mark.parametrize("name", NEW)
def test_text_to_image_matches_diffusers(pipes, name):
    ref, ref_i2i, ours = pipes
    use(name, ref, ref_i2i, ours)
    expected, got = both(ref, ours, num_inference_steps=8, guidance_scale=7.5, latents=latents())
    assert max_diff(expected, got) <= TOL


@pytest.mark.parametrize("name", NEW)
def test_img2img_matches_diffusers(pipes, name):
    """Half the steps: the counting schedulers start at diffusers' begin index (Heun's counts its
    2 calls a step), PNDM's counter at 0 (diffusers' PNDM has no begin index)."""
    ref, ref_i2i, ours = pipes
    use(name, ref, ref_i2i, ours)
    expected, got = both(ref_i2i, ours, image=picture(), strength=0.5, num_inference_steps=8, guidance_scale=7.5)
    assert max_diff(expected, got) <= TOL


def test_noise_matters_for_the_sde_solver(pipes):
    ref, ref_i2i, ours = pipes
    use("DPM++ 2M SDE", ref, ref_i2i, ours)
    kw = dict(num_inference_steps=8, latents=latents())
    a = ours(PROMPT, generator=torch.Generator().manual_seed(1), **kw).images
    b = ours(PROMPT, generator=torch.Generator().manual_seed(2), **kw).images
    assert max_diff(a, b) > 1e-3


@pytest.mark.parametrize("skip_prk_steps", [True, False])
def test_sd15_hub_config_loads_as_pndm(pipes, tmp_path, skip_prk_steps):
    """A hub SD-1.5 folder (its scheduler_config.json names PNDMScheduler) gives diffusers' image
    with no warning: PNDM, not the DDIM fallback (0.87 apart before). Without skip_prk_steps
    (diffusers' PNDM default), the 12 Runge-Kutta calls start the run."""
    ref, _, _ = pipes
    folder = tmp_path / "sd15"
    shutil.copytree(ref.folder, folder)
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    config = {**{k: v for k, v in config.items() if not k.startswith("_")}, "_class_name": "PNDMScheduler",
              "skip_prk_steps": skip_prk_steps, "set_alpha_to_one": False}
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "scheduler": ["diffusers", "PNDMScheduler"]}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hub = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    hub.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours = mini_tgate.load_pipeline(folder)
    assert type(ours.scheduler) is S.PNDMScheduler and type(hub.scheduler) is diffusers.PNDMScheduler
    expected, got = both(hub, ours, num_inference_steps=10, latents=latents(3))
    assert max_diff(expected, got) <= TOL


def test_tgate_with_unipc_matches_the_tgate_package(pipes):
    ref, ref_i2i, ours = pipes
    use("UniPC", ref, ref_i2i, ours)
    gate = (6, 3, 1, 2)  # gate_step, sp_interval, fi_interval, warm_up
    kw = dict(num_inference_steps=12, guidance_scale=7.5, latents=latents(4))
    expected = TgateSDLoader(ref).tgate(PROMPT, output_type="np", **kw, **dict(zip(
        ["gate_step", "sp_interval", "fi_interval", "warm_up"], gate))).images
    out = ours(PROMPT, tgate=mini_tgate.TGate(*gate), **kw)
    assert max_diff(expected, out.images) <= TOL
    assert [s["batch"] for s in out.steps] == [2 if i < gate[0] else 1 for i in range(12)]
