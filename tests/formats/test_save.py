"""Saving: a folder mini_tgate writes is a diffusers checkpoint. diffusers and transformers load it
and compute the same images, embeddings and token ids; load_pipeline reads it back exactly."""

import json
import sys
import warnings

import diffusers
import numpy as np
import pytest
import torch
import transformers
from conftest import ROOT
from huggingface_hub.utils import filter_repo_objects
from tiny_models import save_sdxl

import mini_tgate
from mini_tgate.core.weights import hub_patterns
from mini_tgate.formats.save import save_pipeline

DEFAULT = ROOT / "weights" / "tiny-random"
pytestmark = pytest.mark.usefixtures("one_thread")
PROMPTS = ["a red circle on a blue background", "Two DOGS, sketch!"]


@pytest.fixture(scope="module", params=["tiny-random", "sdxl"])
def saved(request, tmp_path_factory):
    """(mini_tgate pipeline, the folder it saved): the embedded default, and an SDXL pipeline
    (two text encoders, one with a projection; a tokenizer that pads with "!")."""
    source = DEFAULT if request.param == "tiny-random" else save_sdxl(tmp_path_factory.mktemp("sdxl-ref"))
    pipe = mini_tgate.load_pipeline(source)
    folder = tmp_path_factory.mktemp("saved")
    save_pipeline(pipe, folder)
    return pipe, folder


def noise(pipe):
    size = pipe.unet.config.sample_size
    return torch.randn(1, 4, size, size, generator=torch.Generator().manual_seed(0))


def test_layout_is_diffusers(saved):
    pipe, folder = saved
    index = json.loads((folder / "model_index.json").read_text())
    sdxl = isinstance(pipe, mini_tgate.StableDiffusionXLPipeline)
    assert index["_class_name"] == ("StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline")
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", type(pipe.scheduler).__name__]
    assert index["feature_extractor"] == [None, None]
    if sdxl:
        assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
        assert index["force_zeros_for_empty_prompt"] is True
    else:
        assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    for name, weights in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                          ("text_encoder", "model")):
        config = json.loads((folder / name / "config.json").read_text())
        assert config["_class_name"] == index[name][1]
        assert (folder / name / f"{weights}.safetensors").is_file()
    for f in ("vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"):
        assert (folder / "tokenizer" / f).is_file()
    assert json.loads((folder / "tokenizer" / "tokenizer_config.json").read_text())["model_max_length"] == 77
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["_class_name"] == type(pipe.scheduler).__name__ and "_use_default_values" not in scheduler


def test_diffusers_loads_it_and_draws_the_same_images(saved):
    pipe, folder = saved
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.DiffusionPipeline.from_pretrained(folder)
    ref.set_progress_bar_config(disable=True)
    assert type(ref).__name__ == type(pipe).__name__
    assert type(ref.scheduler).__name__ == type(pipe.scheduler).__name__
    kw = dict(num_inference_steps=8, guidance_scale=7.5, latents=noise(pipe), negative_prompt="blurry")
    expected = ref(PROMPTS[0], output_type="np", **kw).images
    got = pipe(PROMPTS[0], **kw).images
    assert float(np.abs(expected - got).max()) <= 1e-3


def test_transformers_loads_the_text_encoders_and_tokenizers(saved):
    pipe, folder = saved
    parts = [("text_encoder", "tokenizer", transformers.CLIPTextModel)]
    if isinstance(pipe, mini_tgate.StableDiffusionXLPipeline):
        parts.append(("text_encoder_2", "tokenizer_2", transformers.CLIPTextModelWithProjection))
    for encoder, tokenizer, cls in parts:
        ref_tok = transformers.CLIPTokenizer.from_pretrained(folder / tokenizer)
        ids = ref_tok(PROMPTS, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        assert torch.equal(ids, getattr(pipe, tokenizer)(PROMPTS))
        assert ref_tok.pad_token == getattr(pipe, tokenizer).tokenizer.id_to_token(getattr(pipe, tokenizer).pad_token_id)
        ref = cls.from_pretrained(folder / encoder, dtype=torch.float32).eval()
        with torch.no_grad():
            expected = ref(ids, output_hidden_states=True)
        ours = getattr(pipe, encoder)(ids, output_hidden_states=True)
        assert torch.allclose(expected.last_hidden_state, ours.last_hidden_state, atol=1e-5)
        if cls is transformers.CLIPTextModelWithProjection:
            assert torch.allclose(expected.text_embeds, ours.text_embeds, atol=1e-5)


def test_round_trip_through_load_pipeline(saved):
    pipe, folder = saved
    again = mini_tgate.load_pipeline(folder)
    assert type(again) is type(pipe) and type(again.scheduler) is type(pipe.scheduler)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if hasattr(pipe, name):
            a, b = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
            assert getattr(pipe, name).config == getattr(again, name).config
    assert torch.equal(again.tokenizer(PROMPTS), pipe.tokenizer(PROMPTS))
    kw = dict(num_inference_steps=4, latents=noise(pipe), tgate=mini_tgate.TGate(2, 1, 1, 0))
    assert np.array_equal(pipe(PROMPTS[1], **kw).images, again(PROMPTS[1], **kw).images)


def test_make_default_rebuilds_the_embedded_checkpoint():
    """weights/tiny-random is exactly what examples/make_default.py makes (fixed seed, float16)."""
    sys.path.insert(0, str(ROOT / "examples"))
    import make_default

    built = make_default.build()
    stored = mini_tgate.load_pipeline(DEFAULT, dtype=torch.float16)
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(built, name).half().state_dict(), getattr(stored, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    def settings(scheduler):
        return {k: v for k, v in scheduler.config.items() if k != "_use_default_values"}

    assert settings(built.scheduler) == settings(stored.scheduler)
    size = sum(f.stat().st_size for f in DEFAULT.rglob("*") if f.is_file())
    assert size < 8e6


def test_a_model_at_the_top_of_a_hub_repo_loads_by_repo_id(tmp_path, monkeypatch):
    """Like latent-consistency/lcm-sdxl: a repo holding one UNet, its config and weights at the top."""
    files = ["README.md", "config.json", "diffusion_pytorch_model.safetensors",
             "diffusion_pytorch_model.fp16.safetensors", "image.png"]
    for variant, weights in ((None, "diffusion_pytorch_model.safetensors"),
                             ("fp16", "diffusion_pytorch_model.fp16.safetensors")):
        wanted = set(filter_repo_objects(files, allow_patterns=hub_patterns(variant, folders=[""])))
        assert wanted == {"config.json", weights}
    unet = mini_tgate.load_pipeline(DEFAULT).unet
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny-unet"
    unet.save_pretrained(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    again = mini_tgate.UNet2DConditionModel.from_pretrained("org/tiny-unet", cache_dir=tmp_path / "hub")
    a, b = unet.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
