"""The pipeline refuses bad input with one clear error, before encoding or allocating anything
(issue 11 B5/B6, C); where diffusers refuses the same input, it raises the same exception type."""

import json
import math
import warnings

import diffusers
import pytest
import torch
from tiny_models import save_sd

import mini_tgate
from mini_tgate import CheckpointError
from mini_tgate.core.bounds import MAX_IMAGES_PER_CALL as MAX_BATCH
from mini_tgate.core.bounds import MAX_SIDE
from mini_tgate.loading import load_pipeline

LATENTS = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return save_sd(tmp_path_factory.mktemp("sd"))


@pytest.fixture(scope="module")
def pipe(folder, one_thread):
    return load_pipeline(folder)


@pytest.fixture
def nothing_encoded(pipe, monkeypatch):
    """Fails the test if the call gets as far as encoding the prompt."""
    def fail(*args, **kwargs):
        raise AssertionError("the prompt was encoded before the arguments were checked")

    monkeypatch.setattr(pipe, "encode_prompt", fail)


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(height=0), ValueError, "height and width must be positive multiples of 8, got 0x64"),
    (dict(width=0), ValueError, "positive multiples of 8, got 64x0"),
    (dict(height=100000, width=100000), ValueError, f"at most {MAX_SIDE} pixels"),
    (dict(prompt=["a", "b"], num_images_per_prompt=MAX_BATCH), ValueError,
     f"prompts x num_images_per_prompt must be at most {MAX_BATCH} images per call"),
    (dict(generator=[torch.Generator()] * 3), ValueError, "generator is a list of 3 generators for a batch of 1"),
    (dict(generator="0"), TypeError, "generator must be a torch.Generator"),
    (dict(latents=LATENTS.numpy()), TypeError, "latents must be a torch.Tensor"),
    (dict(guidance_rescale="0.7"), ValueError, "guidance_rescale must be a number in \\[0, 1\\], got '0.7'"),
    (dict(guidance_rescale=1.5), ValueError, "guidance_rescale must be a number in \\[0, 1\\]"),
    (dict(eta="x"), ValueError, "eta must be a finite number >= 0"),
    (dict(eta=-1.0), ValueError, "eta must be a finite number >= 0, got -1.0"),
    (dict(eta=math.inf), ValueError, "eta must be"),
    (dict(clip_skip=-1), ValueError, "clip_skip must be None or an integer in \\[0, 2\\]"),
    (dict(callback_on_step_end_tensor_inputs=["latents", "noise"]), ValueError,
     "callback_on_step_end_tensor_inputs may name .*got 'noise'"),
    (dict(prompt_embeds=torch.zeros(1, 77, 32)), ValueError, "prompt must be given, or prompt_embeds instead"),
    (dict(prompt=None), ValueError, "prompt must be given, or prompt_embeds instead"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 16)), ValueError,
     r"prompt_embeds must have shape \(1, tokens, 32\)"),
    (dict(prompt=None, prompt_embeds=torch.zeros(1, 77, 32), negative_prompt_embeds=torch.zeros(1, 70, 32)),
     ValueError, "must have the same shape"),
    (dict(x=1), TypeError, r"StableDiffusionPipeline.__call__\(\) got an unexpected keyword argument 'x'"),
    (dict(original_size=(64, 64)), TypeError, "StableDiffusionPipeline.__call__.. got an unexpected keyword"),
    (dict(sigmas=[14.6, 1.0, 0.0]), ValueError, "DDIMScheduler does not support custom sigmas"),
])
def test_refused_before_encoding(pipe, nothing_encoded, kwargs, error, message):
    kwargs = {"prompt": "a cat", "num_inference_steps": 2, **kwargs}
    with pytest.raises(error, match=message):
        pipe(**kwargs)


def test_diffusers_refuses_a_generator_list_of_the_wrong_length_too(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError):
        ref("a cat", num_inference_steps=2, generator=[torch.Generator()] * 3)


def test_a_prompt_that_is_not_text(pipe):
    with pytest.raises(ValueError, match="prompt is not valid text"):
        pipe("a \udcff cat", num_inference_steps=2, latents=LATENTS)  # what Python makes of non-UTF-8 argv


@pytest.fixture
def broken(pipe):
    """Set a weight to NaN for one test, then put it back."""
    changed = []

    def breaks(param):
        changed.append((param, param.detach().clone()))
        with torch.no_grad():
            param.view(-1)[0] = math.nan

    yield breaks
    with torch.no_grad():
        for param, value in changed:
            param.copy_(value)


def test_nan_messages_say_what_produced_them(pipe, broken):
    kw = dict(num_inference_steps=2, latents=LATENTS)
    with pytest.raises(FloatingPointError, match="the latents you passed contain NaN") as e:
        pipe("a cat", **{**kw, "latents": LATENTS.clone().fill_(math.nan)})
    with pytest.raises(FloatingPointError, match="prompt contain NaN or inf: the embeddings you passed"):
        pipe(prompt_embeds=torch.full((1, 77, 32), math.nan), **kw)
    # DDIM with a huge eta: its variance outgrows 1 - abar and the square root turns NaN (diffusers too)
    with pytest.raises(FloatingPointError, match=r"the DDIMScheduler step 0 produced NaN or inf \(eta=1e\+30\)") as e:
        pipe("a cat", eta=1e30, **kw)
    assert "float16" not in str(e.value)
    broken(pipe.unet.conv_out.bias)
    with pytest.raises(FloatingPointError, match="noise prediction at step 0 contains NaN or inf: its weights") as e:
        pipe("a cat", **kw)
    assert "float16" not in str(e.value)  # a float32 run: not a precision problem
    broken(pipe.text_encoder.text_model.final_layer_norm.weight)
    with pytest.raises(FloatingPointError, match="prompt contain NaN or inf: the text encoder's weights produce"):
        pipe("a cat", **kw)


def test_the_pipeline_works_after_the_errors(pipe, folder):
    fresh = load_pipeline(folder)
    kw = dict(num_inference_steps=3, latents=LATENTS, output_type="latent")
    assert torch.equal(pipe("a cat", **kw).images, fresh("a cat", **kw).images)


def test_a_tokenizer_longer_than_the_text_encoder(folder, tmp_path):
    import shutil

    copy = tmp_path / "sd"
    shutil.copytree(folder, copy)
    config = copy / "tokenizer" / "tokenizer_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "model_max_length": 100}))
    with pytest.raises(CheckpointError, match=r"tokenizer: model_max_length 100 is more than the 77 positions"):
        load_pipeline(copy)

