"""Saving SVD: save_pipeline writes a StableVideoDiffusionPipeline as a diffusers folder that
diffusers and load_pipeline both read back, to the same weights and the same frames."""

import json
import warnings

import diffusers
import numpy as np
import pytest
import torch
import transformers
from conftest import realign
from PIL import Image
from test_svd_pipeline import MEAN, RUN, STD, TOL, both, error, folder, picture  # noqa: F401 (folder: a fixture)

from mini_tgate import StableVideoDiffusionPipeline
from mini_tgate.formats.save import save_pipeline
from mini_tgate.loading import load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ours(folder):
    return load_pipeline(folder)


@pytest.fixture(scope="module")
def saved(ours, tmp_path_factory):
    out = tmp_path_factory.mktemp("svd-saved")
    save_pipeline(ours, out)
    return out


@pytest.fixture(scope="module")
def ref(saved):
    """diffusers' pipeline as it loads our folder."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableVideoDiffusionPipeline.from_pretrained(saved)
    pipe.set_progress_bar_config(disable=True)
    realign(pipe.unet, pipe.vae, pipe.image_encoder)
    return pipe


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    x, y = a.state_dict(), b.state_dict()
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_layout_is_diffusers(ours, saved):
    index = json.loads((saved / "model_index.json").read_text())
    assert index == {"_class_name": "StableVideoDiffusionPipeline",
                     "unet": ["diffusers", "UNetSpatioTemporalConditionModel"],
                     "vae": ["diffusers", "AutoencoderKLTemporalDecoder"],
                     "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
                     "feature_extractor": ["transformers", "CLIPImageProcessor"],
                     "scheduler": ["diffusers", type(ours.scheduler).__name__]}
    for name, weights in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                          ("image_encoder", "model")):
        assert json.loads((saved / name / "config.json").read_text())["_class_name"] == index[name][1]
        assert (saved / name / f"{weights}.safetensors").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = transformers.CLIPImageProcessor.from_pretrained(saved / "feature_extractor")
    assert list(extractor.image_mean) == MEAN and list(extractor.image_std) == STD
    assert extractor.crop_size == {"height": 224, "width": 224} and extractor.size == {"shortest_edge": 224}
    assert extractor.do_normalize and extractor.do_rescale and extractor.rescale_factor == pytest.approx(1 / 255)


def test_diffusers_reads_the_same_weights(ours, ref):
    assert type(ref.scheduler).__name__ == type(ours.scheduler).__name__
    skip = ("_use_default_values", "_diffusers_version")  # diffusers' bookkeeping
    assert ({k: v for k, v in ref.scheduler.config.items() if k not in skip}
            == {k: v for k, v in ours.scheduler.config.items() if k not in skip})
    assert type(ref.image_encoder) is transformers.CLIPVisionModelWithProjection
    for name in ("unet", "vae", "image_encoder"):
        assert states_equal(getattr(ref, name), getattr(ours, name)), name
    assert list(ref.feature_extractor.image_mean) == MEAN and list(ref.feature_extractor.image_std) == STD


def test_load_pipeline_reads_it_back_exactly(ours, saved):
    back = load_pipeline(saved)
    assert isinstance(back, StableVideoDiffusionPipeline)
    assert back.image_mean == ours.image_mean and back.image_std == ours.image_std
    for name in ("unet", "vae", "image_encoder"):
        assert states_equal(getattr(back, name), getattr(ours, name)), name
        assert getattr(back, name).config.to_dict() == getattr(ours, name).config.to_dict()
    kw = {**RUN, "num_inference_steps": 3}
    got = back(picture(), generator=torch.Generator().manual_seed(0), **kw).frames
    expected = ours(picture(), generator=torch.Generator().manual_seed(0), **kw).frames
    assert np.array_equal(got, expected)


def test_diffusers_draws_the_same_frames(ours, ref):
    got, expected = both(ours, ref, Image.fromarray(picture()), num_inference_steps=3)
    assert error(got.frames, expected) <= TOL, error(got.frames, expected)


def test_saving_twice_gives_the_same_bytes(ours, saved, tmp_path):
    save_pipeline(load_pipeline(saved), tmp_path)
    files = sorted(p.relative_to(saved) for p in saved.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert all((saved / f).read_bytes() == (tmp_path / f).read_bytes() for f in files)
