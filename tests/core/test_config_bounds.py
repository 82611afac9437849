"""What a config implies is bounded before anything is built (issue 24, items 1 and 9): parameters,
layers and the MACs of one step, estimated from the config alone; weights that do not fit the
config are refused from their headers, before any tensor is read."""

import json
import shutil
import tracemalloc

import pytest
import torch
from conftest import ROOT

from mini_tgate import CheckpointError, ConfigError, load_pipeline
from mini_tgate.core import weights
from mini_tgate.core.bounds import MAX_MODEL_LAYERS, MAX_PARAMS, MAX_STEP_MACS
from mini_tgate.core.clip import CLIPTextModel
from mini_tgate.core.config import CLIPTextConfig, UNetConfig, VAEConfig, _FromDict
from mini_tgate.core.unet import UNet2DConditionModel
from mini_tgate.core.vae import AutoencoderKL
from mini_tgate.macs import MODELS, count_macs, denoiser_config
from mini_tgate.pixart.config import PixArtTransformerConfig, T5Config
from mini_tgate.pixart.t5 import T5EncoderModel
from mini_tgate.pixart.transformer import PixArtTransformer2DModel
from mini_tgate.svd.config import TemporalVAEConfig
from mini_tgate.svd.unet import UNetSpatioTemporalConditionModel

TINY = ROOT / "weights" / "tiny-random"
# each number within its own cap; together 33,000 transformer blocks (683,710 keys)
HOSTILE_UNET = dict(down_block_types=["CrossAttnDownBlock2D"] * 16, up_block_types=["CrossAttnUpBlock2D"] * 16,
                    block_out_channels=[32] * 16, layers_per_block=32, transformer_layers_per_block=32,
                    norm_num_groups=8, attention_head_dim=4, cross_attention_dim=32, sample_size=16)
HOSTILE_PIXART = dict(num_layers=1_048_576, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
                      sample_size=8, caption_channels=None)


@pytest.fixture
def never_built(monkeypatch):
    """Building any denoiser fails the test: the config must be refused before."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} was built")
    for cls in (UNet2DConditionModel, PixArtTransformer2DModel, UNetSpatioTemporalConditionModel):
        monkeypatch.setattr(cls, "__init__", refuse)


def test_the_hostile_unet_config_is_refused_before_anything_is_built(tmp_path, never_built):
    message = f"unet config implies 3.44e\\+04 layers, more than any real model \\(limit {MAX_MODEL_LAYERS}\\)"
    with pytest.raises(ConfigError, match=message):
        UNetConfig.from_dict(HOSTILE_UNET)
    with pytest.raises(ConfigError, match="layers"):
        count_macs(HOSTILE_UNET)  # `macs --arch`
    (tmp_path / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel", **HOSTILE_UNET}))
    with pytest.raises(ConfigError, match="layers"):
        count_macs(str(tmp_path))


def test_generate_on_the_hostile_unet_is_refused_with_no_large_allocation(tmp_path, never_built):
    folder = shutil.copytree(TINY, tmp_path / "ckpt")
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **HOSTILE_UNET}))
    with pytest.raises(ConfigError, match=f"{config}: unet config implies .* layers"):
        load_pipeline(folder)
    tracemalloc.start()
    try:
        with pytest.raises(ConfigError, match=f"{config}: unet config implies .* layers"):
            UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 50 * 2**20  # the old code took 3.1 GB


def test_pixart_num_layers_is_bounded(never_built):
    with pytest.raises(ConfigError, match="num_layers=1048576"):
        PixArtTransformerConfig.from_dict(HOSTILE_PIXART)
    with pytest.raises(ConfigError, match="num_layers"):
        count_macs({"_class_name": "PixArtTransformer2DModel", **HOSTILE_PIXART})


@pytest.mark.parametrize("cls, changes, what", [
    (UNetConfig, dict(block_out_channels=[2**20, 2**20], down_block_types=["DownBlock2D"] * 2,
                      up_block_types=["UpBlock2D"] * 2), "parameters"),
    (UNetConfig, dict(sample_size=2**20), "MACs in one step"),
    (PixArtTransformerConfig, dict(sample_size=2**16), "MACs in one step"),
    (PixArtTransformerConfig, dict(num_attention_heads=3 * 2**10, attention_head_dim=2**8, caption_channels=None,
                                   cross_attention_dim=2**10), "parameters"),
    (VAEConfig, dict(block_out_channels=[32] * 16, layers_per_block=64), "layers"),
    (TemporalVAEConfig, dict(block_out_channels=[2**20], down_block_types=["DownEncoderBlock2D"]), "parameters"),
    (CLIPTextConfig, dict(vocab_size=2**20, hidden_size=2**20, num_attention_heads=1), "parameters"),
    (T5Config, dict(vocab_size=2**20, d_model=2**20), "parameters"),
])
def test_what_a_config_implies_is_bounded(cls, changes, what, never_built):
    with pytest.raises(ConfigError, match=f"config implies .* {what}, more than any real model"):
        cls.from_dict(changes)


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl", "lcm-sdxl", "pixart-alpha", "pixart-sigma", "svd-xt"])
def test_the_estimates_of_real_models_are_close_and_far_within_the_bounds(name, monkeypatch):
    sizes = []
    check_size = _FromDict.check_size
    monkeypatch.setattr(_FromDict, "check_size", lambda self, size: sizes.append(size) or check_size(self, size))
    cfg = denoiser_config(name)
    size = sizes[-1]
    with torch.device("meta"):
        params = sum(p.numel() for p in MODELS[type(cfg)](cfg).parameters())
    assert 0.9 < size.params / params < 1.1
    assert size.params * 5 < MAX_PARAMS and size.layers * 2.5 < MAX_MODEL_LAYERS and size.macs * 20 < MAX_STEP_MACS


@pytest.mark.parametrize("cls, model, config", [
    (T5Config, T5EncoderModel, {}),  # T5-XXL's encoder, the largest model of any pipeline here: 4.8 B
    (CLIPTextConfig, CLIPTextModel, dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
                                         num_attention_heads=20, projection_dim=1280)),  # SDXL's bigG
    (VAEConfig, AutoencoderKL, {}),
])
def test_the_largest_encoders_pass(cls, model, config, monkeypatch):
    sizes = []
    check_size = cls.check_size
    monkeypatch.setattr(cls, "check_size", lambda self, size: sizes.append(size) or check_size(self, size))
    cfg = cls.from_dict(config)
    with torch.device("meta"):
        params = sum(p.numel() for p in model(cfg).parameters())
    assert 0.9 < sizes[-1].params / params < 1.1 and sizes[-1].params * 4 < MAX_PARAMS


def test_weights_that_do_not_fit_the_config_are_refused_from_their_headers(tmp_path, monkeypatch):
    folder = shutil.copytree(TINY, tmp_path / "ckpt")
    config = folder / "unet" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "layers_per_block": 3,
                                  "block_out_channels": [64, 64, 64, 64]}))

    def never_read(*args, **kwargs):
        raise AssertionError("a tensor was read")
    monkeypatch.setattr(weights, "read_tensors", never_read)
    unet = folder / "unet" / "diffusion_pytorch_model.safetensors"
    with pytest.raises(CheckpointError, match=f"{unet} does not match UNet2DConditionModel: \\d+ missing keys: "
                                              f".*\\(\\+\\d+ more\\); .* shape mismatches: conv_in.weight: "
                                              f"file \\(32, 4, 3, 3\\) vs model \\(64, 4, 3, 3\\)"):
        UNet2DConditionModel.from_pretrained(folder, subfolder="unet")


@pytest.mark.parametrize("changes, message", [
    (dict(norm_eps=-1.0), "norm_eps=-1.0 must be a positive number"),
    (dict(scaling_factor=-1e-30), "scaling_factor=-1e-30 must not be 0, nor of magnitude under 1e-06"),
    (dict(scaling_factor=1e30), "scaling_factor=1e\\+30 must not be 0, nor of magnitude under 1e-06 or over 1e\\+06"),
])
def test_norm_eps_and_scaling_factor_that_make_nan_are_refused(tmp_path, changes, message):
    folder = shutil.copytree(TINY, tmp_path / "ckpt")
    config = folder / ("unet" if "norm_eps" in changes else "vae") / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), **changes}))
    with pytest.raises(ConfigError, match=f"{config}: .*{message}"):
        load_pipeline(folder)


@pytest.mark.parametrize("preset", ["sd15", "sd21", "sdxl", "lcm-sdxl", "svd-xt"])
def test_the_presets_pass_the_new_checks(preset):
    assert count_macs(preset, steps=1)["denoiser_macs"] > 0
