"""Config values from config.json: wrong types, impossible numbers and sizes past the bounds are a
ConfigError naming the key, the component and what was expected; real configs still load."""

import json
import shutil

import pytest
from conftest import ROOT

from mini_tgate import ConfigError
from mini_tgate.core.config import MAX_INT, MAX_LAYERS, CLIPTextConfig, UNetConfig, VAEConfig
from mini_tgate.core.unet import UNet2DConditionModel
from mini_tgate.pixart.config import PixArtTransformerConfig

PRESETS = ROOT / "mini_tgate" / "presets"
TINY = ROOT / "weights" / "tiny-random"


def real_unet():  # SD-1.5's UNet config, as the hub ships it
    return json.loads((PRESETS / "sd15.json").read_text())


@pytest.mark.parametrize("name", ["sd15", "sd21", "sdxl", "lcm-sdxl", "pixart-alpha", "pixart-sigma"])
def test_real_configs_load(name):
    cls = PixArtTransformerConfig if name.startswith("pixart") else UNetConfig
    cls.from_dict(json.loads((PRESETS / f"{name}.json").read_text()))


def test_real_vae_and_text_encoder_configs_load():
    # SDXL's VAE and its second text encoder (OpenCLIP bigG), the largest of their kinds.
    VAEConfig.from_dict({"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
                         "norm_num_groups": 32, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True})
    CLIPTextConfig.from_dict({"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                              "num_hidden_layers": 32, "projection_dim": 1280, "hidden_act": "gelu",
                              "architectures": ["CLIPTextModelWithProjection"]})


@pytest.mark.parametrize("cls, changes, message", [
    # wrong types
    (UNetConfig, dict(block_out_channels="320,640"), "unet config block_out_channels='320,640': expected a list"),
    (UNetConfig, dict(layers_per_block="2"), "unet config layers_per_block='2': expected an integer"),
    (UNetConfig, dict(layers_per_block=2.0), "unet config layers_per_block=2.0: expected an integer"),
    (UNetConfig, dict(layers_per_block=True), "unet config layers_per_block=True: expected an integer"),
    (UNetConfig, dict(norm_eps=True), "unet config norm_eps=True: expected a number"),
    (UNetConfig, dict(upcast_attention="yes"), "upcast_attention='yes': expected true or false"),
    (UNetConfig, dict(attention_head_dim="8"), "attention_head_dim='8': expected an integer or a list"),
    (UNetConfig, dict(block_out_channels=[320, "640", 1280, 1280]), r"block_out_channels=\[320, '640'.*expected integers"),
    (VAEConfig, dict(scaling_factor="0.18"), "vae config scaling_factor='0.18': expected a number"),
    (CLIPTextConfig, dict(hidden_size=None), "text encoder config hidden_size=None: expected an integer"),
    (CLIPTextConfig, dict(hidden_act=3), "hidden_act=3: expected a string"),
    # zero, negative, not dividing
    (UNetConfig, dict(norm_num_groups=0), "unet config norm_num_groups=0: expected an integer from 1"),
    (UNetConfig, dict(attention_head_dim=0), "unet config attention_head_dim=0: expected an integer from 1"),
    (UNetConfig, dict(attention_head_dim=[8, 0, 8, 8]), "attention_head_dim=.*expected integers from 1"),
    (UNetConfig, dict(attention_head_dim=[8, 8]), "unet attention_head_dim lists 2 values for 4 blocks"),
    (UNetConfig, dict(layers_per_block=0), "unet config layers_per_block=0: expected an integer from 1"),
    (UNetConfig, dict(block_out_channels=[320, 0, 1280, 1280]), "block_out_channels=.*expected integers from 1"),
    (UNetConfig, dict(block_out_channels=[]), "block_out_channels=.*expected"),
    (UNetConfig, dict(cross_attention_dim=-768), "cross_attention_dim=-768"),
    (UNetConfig, dict(norm_num_groups=48), "block_out_channels 320 is not divisible by norm_num_groups=48"),
    (UNetConfig, dict(attention_head_dim=7), "block 0: 320 channels do not split into 7 attention heads"),
    (UNetConfig, dict(conv_in_kernel=2), "conv_in_kernel=2 must be odd"),
    (UNetConfig, dict(up_block_types=["UpBlock2D"]), "differ in length"),
    (VAEConfig, dict(norm_num_groups=0), "vae config norm_num_groups=0"),
    (VAEConfig, dict(latent_channels=-4), "vae config latent_channels=-4"),
    (VAEConfig, dict(scaling_factor=0), "scaling_factor=0 must not be 0, nor of magnitude under 1e-06"),
    (VAEConfig, dict(scaling_factor=-1e-30), "scaling_factor=-1e-30 must not be 0, nor of magnitude under 1e-06"),
    (UNetConfig, dict(norm_eps=-1.0), "norm_eps=-1.0 must be a positive number"),
    (UNetConfig, dict(norm_eps=0), "norm_eps=0 must be a positive number"),
    (UNetConfig, dict(reverse_transformer_layers_per_block=[[1048576]] * 4), "reverse_transformer_layers_per_block="),
    (CLIPTextConfig, dict(num_attention_heads=0), "text encoder config num_attention_heads=0"),
    (CLIPTextConfig, dict(num_attention_heads=5), "hidden_size=768 must be divisible by num_attention_heads=5"),
    (CLIPTextConfig, dict(max_position_embeddings=0), "max_position_embeddings=0"),
    (PixArtTransformerConfig, dict(num_layers="28"), "transformer config num_layers='28': expected an integer"),
    # sizes that drive allocations and building time
    (CLIPTextConfig, dict(vocab_size=10**12), f"vocab_size=1000000000000: numbers must be finite and integers at most {MAX_INT}"),
    (UNetConfig, dict(block_out_channels=[320, 640, 1280, 2**40]), f"integers at most {MAX_INT}"),
    (CLIPTextConfig, dict(num_hidden_layers=10**6), f"num_hidden_layers=1000000: expected an integer from 1 to {MAX_LAYERS}"),
    (UNetConfig, dict(transformer_layers_per_block=[1, 1, 100000, 1]), f"transformer_layers_per_block=.*to {MAX_LAYERS}"),
    (UNetConfig, dict(norm_eps=float("nan")), "norm_eps=nan: numbers must be finite"),
])
def test_bad_values_name_the_key(cls, changes, message):
    base = real_unet() if cls is UNetConfig else {}
    with pytest.raises(ConfigError, match=message):
        cls.from_dict({**base, **changes})


@pytest.mark.parametrize("value", [[], "unet", 3, None])
def test_config_must_be_an_object(value):
    with pytest.raises(ConfigError, match="unet config must be a JSON object"):
        UNetConfig.from_dict(value)


def test_from_pretrained_names_the_file(tmp_path):
    shutil.copytree(TINY / "unet", tmp_path / "unet")
    path = tmp_path / "unet" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "layers_per_block": "1"}))
    with pytest.raises(ConfigError, match=f"{path}: unet config layers_per_block='1': expected an integer"):
        UNet2DConditionModel.from_pretrained(tmp_path, subfolder="unet")
