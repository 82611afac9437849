"""UNet2DConditionModel against diffusers: tiny configs through the loader, real configs on meta."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import UNet2DConditionModel as RefUNet

from mini_tgate.core.unet import UNet2DConditionModel

PRESETS = Path(__file__).resolve().parents[2] / "mini_tgate" / "presets"

TINY = {
    # SD-1: conv projections, one head count for every block
    "sd1": dict(block_out_channels=(32, 64), layers_per_block=2, cross_attention_dim=24, attention_head_dim=4,
                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    # SD-2: linear projections, per-block head counts, upcast_attention
    "sd2": dict(block_out_channels=(32, 64, 64), layers_per_block=1, cross_attention_dim=24,
                attention_head_dim=[2, 4, 4], use_linear_projection=True, upcast_attention=True,
                down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")),
    # SDXL: several transformer layers per block, text_time addition embedding
    "sdxl": dict(block_out_channels=(32, 64, 64), layers_per_block=2, cross_attention_dim=48,
                 attention_head_dim=[2, 4, 4], transformer_layers_per_block=[1, 2, 3], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=32 + 6 * 8,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")),
    # LCM: guidance-scale embedding through time_cond_proj_dim
    "lcm": dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=24, attention_head_dim=4,
                time_cond_proj_dim=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
}


def make_reference(name):
    torch.manual_seed(0)
    ref = RefUNet(sample_size=16, norm_num_groups=8, **TINY[name]).eval()
    with torch.no_grad():  # move every weight off its initial value so nothing matches by accident
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return ref


def unet_inputs(name, batch, generator):
    cfg = TINY[name]
    x = torch.randn(batch, 4, 16, 16, generator=generator)
    context = torch.randn(batch, 7, cfg["cross_attention_dim"], generator=generator)
    kw = {}
    if name == "sdxl":
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, 32, generator=generator),
                                   "time_ids": torch.tensor([[64.0, 48, 0, 8, 64, 48]]).repeat(batch, 1)}
    if name == "lcm":
        kw["timestep_cond"] = torch.randn(batch, 16, generator=generator)
    return x, context, kw


@pytest.fixture(scope="module", params=list(TINY))
def pair(request, tmp_path_factory):
    name = request.param
    ref = make_reference(name)
    folder = tmp_path_factory.mktemp(name)
    ref.save_pretrained(folder / "unet")
    return name, ref, UNet2DConditionModel.from_pretrained(folder, subfolder="unet")


@pytest.mark.parametrize("batch", [1, 2])
def test_matches_diffusers(pair, batch):
    name, ref, unet = pair
    g = torch.Generator().manual_seed(batch)
    x, context, kw = unet_inputs(name, batch, g)
    for t in (0, 1, 500, 999, torch.tensor([981.0])):
        with torch.no_grad():
            expected = ref(x, t, context, **kw).sample
            got = unet(x, t, context, **kw)
        err = (got - expected).abs().max() / expected.abs().max()
        assert err <= 1e-4, (name, batch, t, err.item())


def test_odd_latent_size_upsamples_to_skip_size(pair):
    name, ref, unet = pair
    g = torch.Generator().manual_seed(3)
    x, context, kw = unet_inputs(name, 1, g)
    x = x[:, :, :13, :11]  # not a multiple of 2**downsamplers: diffusers forwards the skip sizes
    with torch.no_grad():
        expected, got = ref(x, 10, context, **kw).sample, unet(x, 10, context, **kw)
    assert got.shape == expected.shape
    assert (got - expected).abs().max() / expected.abs().max() <= 1e-4


@pytest.mark.parametrize("preset,params", [("sd15", 859_520_964), ("sd21", 865_910_724),
                                           ("sdxl", 2_567_463_684), ("lcm-sdxl", 2_567_463_684 + 256 * 320)])
def test_real_scale_keys_shapes_and_size(preset, params):
    config = json.loads((PRESETS / f"{preset}.json").read_text())
    with torch.device("meta"):
        ref = RefUNet.from_config(config)
        ours = UNet2DConditionModel(UNet2DConditionModel.config_class.from_dict(config))
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == params


def test_full_sd15_unet_matches_diffusers_at_16x16():
    config = json.loads((PRESETS / "sd15.json").read_text())
    torch.manual_seed(0)
    ref = RefUNet.from_config(config).eval()
    with torch.device("meta"):
        ours = UNet2DConditionModel(UNet2DConditionModel.config_class.from_dict(config))
    ours.load_state_dict(ref.state_dict(), strict=True, assign=True)
    g = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 768, generator=g)
    with torch.no_grad():
        expected = ref(x, 500, context).sample
        got = ours(x, 500, context)
    assert (got - expected).abs().max() / expected.abs().max() <= 1e-4
