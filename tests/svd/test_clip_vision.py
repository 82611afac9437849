"""CLIPVisionModelWithProjection against transformers' class; SVD's image preprocessing against
diffusers' own `_resize_with_antialiasing` and transformers' CLIPImageProcessor."""

import json

import pytest
import torch
from conftest import realign
from safetensors import safe_open

from mini_tgate.core.config import ConfigError
from mini_tgate.svd.clip_vision import CLIPVisionModelWithProjection, preprocess_image, resize_with_antialiasing
from mini_tgate.svd.config import CLIPVisionConfig

transformers = pytest.importorskip("transformers")
svd = pytest.importorskip("diffusers.pipelines.stable_video_diffusion.pipeline_stable_video_diffusion")

TINY = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, projection_dim=16)
# Float32 throughout: the same operations in the same order (patch conv, layer norms, linears, SDPA)
# over widths of at most 64 give the same values up to a few float32 ulps of results of size ~1-10
# (ulp 1.2e-7 to 1e-6); 1e-5 allows that rounding and nothing a wrong layer, order or mask would give.
TOL = 1e-5


def reference(hidden_act: str):
    torch.manual_seed(0)
    model = transformers.CLIPVisionModelWithProjection(
        transformers.CLIPVisionConfig(**TINY, hidden_act=hidden_act)).eval()
    with torch.no_grad():  # every weight random, class token, layer norms and biases included
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def errors(ours, ref, pixel_values) -> dict[str, float]:
    with torch.no_grad():
        theirs = ref(pixel_values)
    a = ours(pixel_values)
    assert a.image_embeds.shape == (len(pixel_values), TINY["projection_dim"])
    return {name: (getattr(a, name) - getattr(theirs, name)).abs().max().item()
            for name in ("image_embeds", "last_hidden_state")}


@pytest.mark.parametrize("hidden_act", ["gelu", "quick_gelu"])  # SVD's OpenCLIP tower; OpenAI's
def test_loads_transformers_save_and_matches(tmp_path, hidden_act):
    ref = reference(hidden_act)
    ref.save_pretrained(tmp_path)  # transformers 5: every key under vision_model. or visual_projection.
    ours = CLIPVisionModelWithProjection.from_pretrained(tmp_path)
    realign(ref)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert set(f.keys()) == set(ours.state_dict()) == set(ref.state_dict())
    assert ours.config.hidden_act == hidden_act and ours.config.projection_dim == 16
    pixel_values = torch.randn(3, 3, 32, 32)
    measured = errors(ours, ref, pixel_values)  # measured: 0.0 (bit for bit, after realign)
    assert max(measured.values()) <= TOL, measured


def test_transformers_loads_our_save(tmp_path):
    ours = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY, hidden_act="gelu"))
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.3)
    ours.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "clip_vision_model"
    assert config["architectures"] == ["CLIPVisionModelWithProjection"]
    ref = realign(transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path).eval())
    measured = errors(ours, ref, torch.randn(2, 3, 32, 32))
    assert max(measured.values()) <= TOL, measured


def test_bad_config_and_input():
    with pytest.raises(ConfigError, match="hidden_act"):
        CLIPVisionConfig.from_dict({**TINY, "hidden_act": "relu"})
    with pytest.raises(ConfigError, match="patch_size"):
        CLIPVisionConfig.from_dict({**TINY, "patch_size": 33})
    with pytest.raises(ConfigError, match="divisible"):
        CLIPVisionConfig.from_dict({**TINY, "num_attention_heads": 5})
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY))
    with pytest.raises(ValueError, match=r"\(B, 3, 32, 32\)"):
        model(torch.randn(1, 3, 32, 48))


# SVD's input size and odd ones: shrinking by non-integer factors (blur kernels of 3 to 9),
# enlarging along one axis (sigma 0.001: no blur), the identity; small ones in a batch of two.
SIZES = [(576, 1024), (37, 53), (1000, 300), (300, 20), (224, 224), (8, 9)]


def image(h: int, w: int, dtype=torch.float32) -> torch.Tensor:
    return torch.rand(1 if h * w > 100_000 else 2, 3, h, w, dtype=dtype) * 2 - 1  # in [-1, 1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resize_equals_diffusers(one_thread, dtype):
    for h, w in SIZES if dtype == torch.float32 else SIZES[1:4]:
        x = image(h, w, dtype)
        theirs = svd._resize_with_antialiasing(x, (224, 224))
        ours = resize_with_antialiasing(x, (224, 224))
        assert torch.equal(ours, theirs), (h, w, (ours - theirs).abs().max().item())  # the same ops: exact


def test_preprocess_equals_diffusers(one_thread):
    """diffusers' `_encode_image` for an image in [-1, 1]: resize, (x + 1) / 2, then the
    feature_extractor (CLIPImageProcessor) with the arguments the pipeline gives it."""
    feature_extractor = transformers.CLIPImageProcessor()
    for h, w in SIZES[:2]:
        x = image(h, w)
        resized = (svd._resize_with_antialiasing(x, (224, 224)) + 1.0) / 2.0
        theirs = feature_extractor(images=resized, do_normalize=True, do_center_crop=False, do_resize=False,
                                   do_rescale=False, return_tensors="pt").pixel_values
        assert torch.equal(preprocess_image(x), theirs), (h, w)
    with pytest.raises(ValueError, match="float tensor"):
        preprocess_image(torch.zeros(1, 3, 64, 64, dtype=torch.uint8))
