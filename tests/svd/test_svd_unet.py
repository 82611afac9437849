"""UNetSpatioTemporalConditionModel against diffusers: a tiny SVD UNet through the loader, the
TGATE gate against the authors' `tgate` package, SVD-XT's layout on the meta device."""

import copy

import pytest
import torch
from conftest import realign
from diffusers import UNetSpatioTemporalConditionModel as RefUNet
from tgate.tgate_utils import register_forward, tgate_scheduler
from tiny_models import perturb

from mini_tgate.core.attention import Attention
from mini_tgate.core.config import ConfigError
from mini_tgate.core.tgate import CACHE, COMPUTE, REUSE, DeepCache, StepPlan, TGate, plan
from mini_tgate.svd.config import UNetSpatioTemporalConfig
from mini_tgate.svd.unet import UNetSpatioTemporalConditionModel

# Every feature of the real UNet: both down and up kinds, a plain level, per-block lists of
# layers and transformer depths (the mid block takes 2), several heads, 3 added time ids.
TINY = dict(sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=(1, 2),
            transformer_layers_per_block=(1, 2), cross_attention_dim=32, num_attention_heads=(2, 4), num_frames=3,
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=3 * 8,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"))

SVD_XT = dict(sample_size=96, in_channels=8, out_channels=4, block_out_channels=[320, 640, 1280, 1280],
              layers_per_block=2, transformer_layers_per_block=1, cross_attention_dim=1024,
              num_attention_heads=[5, 10, 20, 20], addition_time_embed_dim=256,
              projection_class_embeddings_input_dim=768, num_frames=25,
              down_block_types=["CrossAttnDownBlockSpatioTemporal"] * 3 + ["DownBlockSpatioTemporal"],
              up_block_types=["UpBlockSpatioTemporal"] + ["CrossAttnUpBlockSpatioTemporal"] * 3)

# The same float32 operations in the same order are bitwise equal: measured 0.0 on every case
# below. The bound leaves room only for a CPU kernel taking another path on other memory
# alignment or layout, which moves last bits: ~1.5e-6 of the output's scale measured when one
# transformer output was channels-last. Mistakes that move outputs less than this (a norm's
# epsilon: ~4e-6 for one of them) are caught by name in test_norm_epsilons_equal.
RTOL = 1e-5


@pytest.fixture(scope="module")
def pair(one_thread, tmp_path_factory):
    torch.manual_seed(0)
    ref = perturb(RefUNet(**TINY), seed=1)
    folder = tmp_path_factory.mktemp("svd")
    ref.save_pretrained(folder / "unet")
    ours = UNetSpatioTemporalConditionModel.from_pretrained(folder, subfolder="unet")
    return realign(ref), ours  # reference weights freshly allocated, as ours are


def inputs(batch, frames, height, width, seed=0):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, frames, 8, height, width, generator=g)
    image_embeds = torch.randn(batch, 1, 32, generator=g)
    time_ids = torch.tensor([[6.0, 127.0, 0.02], [7.0, 60.0, 0.1]])[:batch]  # fps - 1, motion bucket, noise aug
    return sample, image_embeds, time_ids


def relative_error(got, expected):
    return ((got - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("frames,height,width", [(3, 8, 8), (1, 8, 8), (5, 8, 12), (2, 7, 10)])
def test_matches_diffusers(pair, frames, height, width):
    """Several frame counts (1: the temporal convolutions see only padding), H != W, and odd
    sizes (the upsamplers take the skips' sizes); batch 2; timesteps as SVD's scheduler gives them."""
    ref, ours = pair
    sample, image_embeds, time_ids = inputs(2, frames, height, width)
    for t in (0.5, torch.tensor(-1.25), torch.tensor([1.5, -0.75]), 3):
        with torch.no_grad():
            expected = ref(sample, t, image_embeds, time_ids).sample
            got = ours(sample, t, image_embeds, time_ids)
        assert got.shape == expected.shape == (2, frames, 4, height, width)
        assert relative_error(got, expected) <= RTOL, (frames, height, width, t)


def test_state_dict_keys_and_shapes_equal(pair):
    ref, ours = pair
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_norm_epsilons_equal(pair):
    """diffusers fixes each norm's epsilon in its block class (1e-6 or 1e-5), not in the config."""
    ref, ours = pair

    def epsilons(model):
        return {n: m.eps for n, m in model.named_modules() if isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm))}

    assert epsilons(ours) == epsilons(ref)


def test_saved_folder_loads_in_diffusers(pair, tmp_path):
    ref, ours = pair
    ours.save_pretrained(tmp_path)
    back = RefUNet.from_pretrained(tmp_path).eval()
    sample, image_embeds, time_ids = inputs(1, 2, 8, 8, seed=1)
    with torch.no_grad():
        expected, got = back(sample, 0.25, image_embeds, time_ids).sample, ours(sample, 0.25, image_embeds, time_ids)
    assert relative_error(got, expected) <= RTOL


@pytest.mark.parametrize("params", [(4, 2, 2, 1), (3, 1, 1, 0)])
def test_gated_steps_match_tgate_package(pair, params):
    """A gated sequence with CFG: the doubled batch [unconditional, conditional] before the gate,
    the halves' mean cached at it (for temporal attention too: its batch is video-major), one video
    after it reusing every cross-attention; each step against diffusers' UNet under tgate's processor."""
    ref, ours = pair
    ref = copy.deepcopy(ref)  # tgate replaces forward on every Attention for good
    sample2, embeds2, ids2 = inputs(2, 3, 8, 12, seed=2)
    embeds2[0] = 0  # SVD's unconditional image embedding
    steps = plan(TGate(*params), 6, cfg=True)
    assert {s.cross_attn for s in steps} >= {COMPUTE, REUSE}
    with torch.no_grad():
        for i, step in enumerate(steps):
            n = 2 if step.cfg else 1
            sample, embeds, ids, t = sample2[:n] + 0.1 * i, embeds2[:n], ids2[:n], 1.5 - 0.5 * i  # new input per step
            ca, sa, keep_shape = tgate_scheduler(i, *params)
            register_forward(ref, "Attention", ca_kward=ca, sa_kward=sa, keep_shape=keep_shape)
            expected = ref(sample, t, embeds, ids).sample
            ours.set_gate(step)
            got = ours(sample, t, embeds, ids)
            assert relative_error(got, expected) <= RTOL, (i, step)
            if step.cross_attn == REUSE:  # nothing was computed: each output is the cached tensor
                assert all(m.cache is not None for m in ours.attention_layers if m.is_cross)
    ours.clear_gate()
    assert all(m.cache is None and m.gate == COMPUTE for m in ours.attention_layers)


def test_svd_xt_layout_and_gate_on_meta():
    """SVD-XT at full size on the meta device: keys, shapes, parameter count, and set_gate /
    clear_gate reaching all 64 attention modules (spatial and temporal, self and cross)."""
    with torch.device("meta"):
        ref = RefUNet.from_config(SVD_XT)
        ours = UNetSpatioTemporalConditionModel(UNetSpatioTemporalConfig.from_dict(SVD_XT))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters()) == 1_524_623_082
    attention = [m for m in ours.modules() if isinstance(m, Attention)]
    assert len(attention) == sum(type(m).__name__ == "Attention" for m in ref.modules()) == 64
    ours.set_gate(StepPlan(REUSE, CACHE, False))
    assert sorted((m.is_cross, m.gate) for m in attention) == [(False, CACHE)] * 32 + [(True, REUSE)] * 32
    ours.clear_gate()
    assert all(m.gate == COMPUTE and m.cache is None for m in attention)
    with pytest.raises(ValueError, match="DeepCache"):
        ours.set_gate(plan(TGate(), 4, True, DeepCache())[0])


@pytest.mark.parametrize("bad,message", [
    (dict(down_block_types=["CrossAttnDownBlock2D", "DownBlockSpatioTemporal"]), "not supported"),
    (dict(up_block_types=["UpBlockSpatioTemporal"]), "as many"),
    (dict(num_attention_heads=[3, 4]), "attention heads"),
    (dict(block_out_channels=[32, 48]), "32 norm groups"),
    (dict(layers_per_block=[1, 1, 1]), "3 values for 2 blocks"),
    (dict(projection_class_embeddings_input_dim=20), "time ids"),
    (dict(transformer_layers_per_block=0), "transformer_layers_per_block"),
    (dict(cross_attention_dim="32"), "expected"),
])
def test_rejects_unsupported_configs(bad, message):
    with pytest.raises(ConfigError, match=message):
        UNetSpatioTemporalConfig.from_dict({**TINY, **bad})
