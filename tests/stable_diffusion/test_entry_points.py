"""What a diffusers script types, run through diffusers and through mini_tgate on the same tiny
checkpoints (issue 25 items 1, 2 and 5): the defaults (steps, progress bar), DiffusionPipeline /
AutoPipeline / img2img classes, the harmless loading arguments, return_dict=False, components,
save_pretrained, num_timesteps and the dynamic-CFG callback, attention slicing and offload."""

import inspect
import warnings

import diffusers
import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import save_sd, save_sdxl

import mini_tgate
from mini_tgate import (AutoPipelineForImage2Image, AutoPipelineForText2Image, DiffusionPipeline,
                        StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
                        StableDiffusionXLPipeline)

PROMPT = "a red circle on a blue background"
TOL = 1e-3  # the tolerance of the pipeline tests (test_pipeline_habits.py): float32, independent code


def noise(seed=0):
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).max())


def quiet(make):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = make()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def tiny(request, tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp(request.param)
    (save_sdxl if request.param == "sdxl" else save_sd)(folder)
    return request.param, folder


def picture():
    rng = np.random.default_rng(0)
    return Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))


# ----------------------------------------------------------------------------- 1. defaults

@pytest.mark.parametrize("ours, theirs", [
    (StableDiffusionPipeline, diffusers.StableDiffusionPipeline),
    (StableDiffusionXLPipeline, diffusers.StableDiffusionXLPipeline),
    (StableDiffusionImg2ImgPipeline, diffusers.StableDiffusionImg2ImgPipeline),
    (StableDiffusionXLImg2ImgPipeline, diffusers.StableDiffusionXLImg2ImgPipeline),
    (mini_tgate.PixArtAlphaPipeline, diffusers.PixArtAlphaPipeline),
    (mini_tgate.PixArtSigmaPipeline, diffusers.PixArtSigmaPipeline),
    (mini_tgate.StableVideoDiffusionPipeline, diffusers.StableVideoDiffusionPipeline)])
def test_default_steps_are_diffusers(ours, theirs):
    default = inspect.signature(theirs.__call__).parameters["num_inference_steps"].default
    assert ours.default_steps == default
    if ours is mini_tgate.StableVideoDiffusionPipeline:  # its own call signature
        assert inspect.signature(ours.__call__).parameters["num_inference_steps"].default == default


def test_defaults_give_diffusers_image_and_bar(tiny, capsys):
    """No steps, no guidance given: diffusers' 50 steps and its guidance; its progress bar too."""
    name, folder = tiny
    ref = quiet(lambda: diffusers.DiffusionPipeline.from_pretrained(folder))
    ours = mini_tgate.DiffusionPipeline.from_pretrained(folder)
    expected = ref(PROMPT, latents=noise(), output_type="np").images
    capsys.readouterr()
    out = ours(PROMPT, latents=noise())
    assert "50/50" in capsys.readouterr().err  # shown by default, as diffusers
    assert len(out.steps) == 50 == ours.num_timesteps
    assert max_diff(expected, out.images) <= TOL
    ours(PROMPT, latents=noise(), num_inference_steps=2, progress=False)
    assert "2/2" not in capsys.readouterr().err
    ours.set_progress_bar_config(disable=True)
    ours(PROMPT, latents=noise(), num_inference_steps=2)
    assert "2/2" not in capsys.readouterr().err


# ----------------------------------------------------------------------------- 2. entry points

def test_diffusion_pipeline_and_auto_pipelines_pick_the_class(tiny, tmp_path):
    name, folder = tiny
    t2i, i2i = ((StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline) if name == "sdxl"
                else (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline))
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe) is t2i and pipe.model_info["name"] == folder.name
    assert type(AutoPipelineForText2Image.from_pretrained(folder)) is t2i
    assert type(AutoPipelineForImage2Image.from_pretrained(folder)) is i2i
    img = AutoPipelineForImage2Image.from_pipe(pipe)
    assert type(img) is i2i and img.unet is pipe.unet and img.vae is pipe.vae  # shared, as diffusers
    assert type(AutoPipelineForText2Image.from_pipe(img)) is t2i
    # an img2img folder (as diffusers saves one) loads as such, and into the text-to-image class
    img.save_pretrained(tmp_path / "img2img")
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "img2img")) is i2i
    assert type(t2i.from_pretrained(tmp_path / "img2img")) is t2i
    assert type(AutoPipelineForText2Image.from_pretrained(tmp_path / "img2img")) is t2i
    assert type(quiet(lambda: diffusers.DiffusionPipeline.from_pretrained(tmp_path / "img2img"))).__name__ == i2i.__name__
    assert type(mini_tgate.load_pipeline(tmp_path / "img2img")) is i2i


def test_img2img_classes_match_diffusers(tiny):
    name, folder = tiny
    cls = StableDiffusionXLImg2ImgPipeline if name == "sdxl" else StableDiffusionImg2ImgPipeline
    ref = quiet(lambda: getattr(diffusers, cls.__name__).from_pretrained(folder))  # from a text-to-image folder
    ours = cls.from_pretrained(folder, use_safetensors=True)
    kw = dict(prompt=PROMPT, image=picture(), strength=0.6, num_inference_steps=10)
    expected = ref(output_type="np", generator=torch.Generator().manual_seed(1), **kw).images
    out = ours(generator=torch.Generator().manual_seed(1), **kw)
    assert max_diff(expected, out.images) <= TOL
    assert ours.num_timesteps == ref.num_timesteps == 6
    t2i = StableDiffusionXLPipeline if name == "sdxl" else StableDiffusionPipeline
    with pytest.raises(ValueError, match=f"needs image=.*for text to image use {t2i.__name__}$"):
        ours(PROMPT)


def test_harmless_loading_arguments(tiny):
    name, folder = tiny
    harmless = dict(use_safetensors=True, safety_checker=None, requires_safety_checker=False, low_cpu_mem_usage=True,
                    feature_extractor=None)
    for load in (DiffusionPipeline.from_pretrained, mini_tgate.load_pipeline, AutoPipelineForText2Image.from_pretrained):
        assert isinstance(load(folder, **harmless), DiffusionPipeline)
    with pytest.raises(TypeError, match="unexpected keyword argument 'device_map'"):
        DiffusionPipeline.from_pretrained(folder, device_map="auto")
    with pytest.raises(TypeError, match="unexpected keyword argument 'custom_pipeline'"):
        mini_tgate.load_pipeline(folder, custom_pipeline="lpw")
    with pytest.raises(TypeError, match="safety_checker="):
        StableDiffusionPipeline.from_pretrained(folder, safety_checker=object())


def test_return_dict_components_and_save_pretrained(tiny, tmp_path):
    name, folder = tiny
    ref = quiet(lambda: diffusers.DiffusionPipeline.from_pretrained(folder))
    ours = DiffusionPipeline.from_pretrained(folder)
    kw = dict(prompt=PROMPT, latents=noise(), num_inference_steps=4)
    expected = ref(output_type="np", return_dict=False, **kw)
    got = ours(return_dict=False, **kw)
    assert type(got) is tuple and len(got) == len(expected)  # SD: (images, None); SDXL: (images,)
    assert got[1:] == expected[1:]
    assert max_diff(expected[0], got[0]) <= TOL
    # components: diffusers' parts by the same names (less its empty safety checker and extractors)
    assert set(ours.components) == {k for k, v in ref.components.items() if v is not None}
    again = type(ours)(**ours.components)
    assert np.array_equal(again(**kw).images, got[0])
    # save_pretrained: a folder diffusers loads, giving the same image
    ours.save_pretrained(tmp_path / "saved")
    back = quiet(lambda: diffusers.DiffusionPipeline.from_pretrained(tmp_path / "saved"))
    assert max_diff(back(output_type="np", **kw).images, got[0]) <= TOL


def dynamic_cfg(pipe, step_index, timestep, callback_kwargs):
    """diffusers' docs recipe (using_callbacks.md): no CFG after 40% of the steps."""
    if step_index == int(pipe.num_timesteps * 0.4):
        prompt_embeds = callback_kwargs["prompt_embeds"]
        prompt_embeds = prompt_embeds.chunk(2)[-1]
        pipe._guidance_scale = 0.0
        callback_kwargs["prompt_embeds"] = prompt_embeds
    return callback_kwargs


def sdxl_dynamic_cfg(pipe, step_index, timestep, callback_kwargs):
    """The same for SDXL (its pooled embeddings and time ids batched too)."""
    if step_index == int(pipe.num_timesteps * 0.4):
        for k in ("prompt_embeds", "add_text_embeds", "add_time_ids"):
            callback_kwargs[k] = callback_kwargs[k].chunk(2)[-1]
        pipe._guidance_scale = 0.0
    return callback_kwargs


def lower_guidance(pipe, step_index, timestep, callback_kwargs):
    if step_index == 2:
        pipe._guidance_scale = 2.0
    return callback_kwargs


def test_dynamic_guidance_from_a_step_callback(tiny):
    name, folder = tiny
    ref = quiet(lambda: diffusers.DiffusionPipeline.from_pretrained(folder))
    ours = DiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPT, latents=noise(), num_inference_steps=10, guidance_scale=7.5)
    recipe, inputs = ((sdxl_dynamic_cfg, ["prompt_embeds", "add_text_embeds", "add_time_ids"]) if name == "sdxl"
                      else (dynamic_cfg, ["prompt_embeds"]))
    expected = ref(output_type="np", callback_on_step_end=recipe, callback_on_step_end_tensor_inputs=inputs, **kw).images
    out = ours(callback_on_step_end=recipe, callback_on_step_end_tensor_inputs=inputs, **kw)  # the script unchanged
    assert max_diff(expected, out.images) <= TOL
    assert [s["batch"] for s in out.steps] == [2] * 5 + [1] * 5  # the CFG batch dropped after step 4
    assert ours.guidance_scale == 0.0
    plain = ours(**kw).images
    assert max_diff(plain, out.images) > TOL
    expected = ref(output_type="np", callback_on_step_end=lower_guidance, **kw).images
    assert max_diff(expected, ours(callback_on_step_end=lower_guidance, **kw).images) <= TOL


def test_step_callback_sees_diffusers_cfg_batch(tiny):
    """With CFG on, a callback's prompt_embeds (SDXL's pooled embeddings and time ids too) are
    diffusers' [negative, prompt] batch, so the docs' recipe chunks them right with several prompts."""
    name, folder = tiny
    ref = quiet(lambda: diffusers.DiffusionPipeline.from_pretrained(folder))
    ours = DiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    kw = dict(prompt=[PROMPT, "a green square"], negative_prompt=["blurry", "dark"], num_inference_steps=6,
              latents=torch.cat([noise(0), noise(1)]), guidance_scale=7.5)
    recipe, inputs = ((sdxl_dynamic_cfg, ["prompt_embeds", "add_text_embeds", "add_time_ids"]) if name == "sdxl"
                      else (dynamic_cfg, ["prompt_embeds"]))
    seen = {}

    def record(where):
        def callback(pipe, i, t, tensors):
            seen.setdefault(where, []).append({k: v.clone() for k, v in tensors.items()})
            return recipe(pipe, i, t, tensors)
        return callback

    expected = ref(output_type="np", callback_on_step_end=record("ref"), callback_on_step_end_tensor_inputs=inputs,
                   **kw).images
    got = ours(callback_on_step_end=record("ours"), callback_on_step_end_tensor_inputs=inputs, **kw)
    assert max_diff(expected, got.images) <= TOL
    assert [s["batch"] for s in got.steps] == [4] * 3 + [2] * 3
    assert len(seen["ours"]) == len(seen["ref"]) == 6
    for theirs, mine in zip(seen["ref"], seen["ours"]):
        assert {k: v.shape for k, v in theirs.items()} == {k: v.shape for k, v in mine.items()}
        assert all(max_diff(theirs[k], mine[k]) <= 1e-5 for k in inputs)

    def wrong_batch(pipe, i, t, tensors):
        return {"prompt_embeds": tensors["prompt_embeds"][:3]}
    with pytest.raises(ValueError, match="returned prompt_embeds of batch 3: expected 2 .* or 4"):
        ours(callback_on_step_end=wrong_batch, callback_on_step_end_tensor_inputs=["prompt_embeds"], **kw)


def test_dynamic_guidance_with_a_gate(tiny):
    """After the TGATE gate CFG is already dropped: turning it off there changes nothing. Before
    it, the doubled batch still runs (the gate's caches need both halves) and the conditional
    prediction is used alone."""
    _, folder = tiny
    ours = DiffusionPipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    kw = dict(prompt=PROMPT, latents=noise(), num_inference_steps=10, tgate=mini_tgate.TGate(4, 1, 1, 0))

    def off_at(step):
        def cb(pipe, i, t, tensors):
            if i == step:
                pipe._guidance_scale = 0.0
            return tensors
        return cb

    gated = ours(**kw)
    assert np.array_equal(ours(callback_on_step_end=off_at(5), **kw).images, gated.images)
    early = ours(callback_on_step_end=off_at(1), **kw)
    assert [s["batch"] for s in early.steps] == [s["batch"] for s in gated.steps] == [2] * 4 + [1] * 6
    assert max_diff(early.images, gated.images) > TOL


def test_single_file_on_the_classes(tmp_path, one_thread):
    from formats.test_single_file import ldm_state_dict
    from safetensors.torch import save_file

    folder = tmp_path / "sd"
    save_sd(folder)
    ref = quiet(lambda: diffusers.StableDiffusionPipeline.from_pretrained(folder))
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in ldm_state_dict(ref, "sd1").items()}, path)
    ref_img = quiet(lambda: diffusers.StableDiffusionImg2ImgPipeline.from_single_file(
        str(path), config=str(folder), local_files_only=True))
    ours = StableDiffusionImg2ImgPipeline.from_single_file(path, config=folder, use_safetensors=True)
    assert type(ours) is StableDiffusionImg2ImgPipeline
    kw = dict(prompt=PROMPT, image=picture(), strength=0.5, num_inference_steps=6)
    expected = ref_img(output_type="np", generator=torch.Generator().manual_seed(2), **kw).images
    assert max_diff(expected, ours(generator=torch.Generator().manual_seed(2), **kw).images) <= TOL
    assert type(StableDiffusionPipeline.from_single_file(path, config=folder)) is StableDiffusionPipeline
    with pytest.raises(mini_tgate.CheckpointError, match="the sd1 preset"):  # config=None: the presets, real-scale
        StableDiffusionPipeline.from_single_file(path, config=None)
    with pytest.raises(TypeError, match="original_config"):
        StableDiffusionPipeline.from_single_file(path, original_config="v1-inference.yaml")
    with pytest.raises(mini_tgate.CheckpointError, match="not a StableDiffusionXL"):
        StableDiffusionXLImg2ImgPipeline.from_single_file(path)


# ----------------------------------------------------------------------------- 5. memory habits

def test_attention_slicing_is_a_no_op_and_offload_needs_an_accelerator(tiny):
    _, folder = tiny
    ours = DiffusionPipeline.from_pretrained(folder)
    kw = dict(prompt=PROMPT, latents=noise(), num_inference_steps=3, progress=False)
    before = ours(**kw).images
    ours.enable_attention_slicing()
    ours.enable_attention_slicing("max")
    assert np.array_equal(ours(**kw).images, before)
    ours.disable_attention_slicing()
    if torch.accelerator.is_available():
        pytest.skip("this machine has an accelerator")
    with pytest.raises(RuntimeError, match="needs an accelerator"):
        ours.enable_model_cpu_offload()
    with pytest.raises(RuntimeError, match="no such device"):
        ours.enable_model_cpu_offload(device="cuda")
    assert ours.offload_device is None
