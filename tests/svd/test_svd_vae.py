"""mini_tgate.svd.vae.AutoencoderKLTemporalDecoder against diffusers' on random weights (float32).

The reference is built with diffusers at a tiny config (its group norms have 32 groups, so every
width is a multiple of 32), every parameter moved off its init (the blenders' mix_factor starts
at 0, the norms at identity), saved with `save_pretrained` and loaded with our from_pretrained.
"""

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from tiny_models import perturb  # noqa: E402

from mini_tgate.core.config import ConfigError  # noqa: E402
from mini_tgate.svd.config import TemporalVAEConfig  # noqa: E402
from mini_tgate.svd.vae import AutoencoderKLTemporalDecoder  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# The same float32 operations in the same order on the same memory layouts give the same bits on
# CPU; what could still differ is a kernel choice (a convolution or group norm summing in another
# order), which moves a result by a few ulps (~1e-7 relative) per layer. Over the ~30 layers of
# these models that stays under 1e-5 of the output's scale, which is ~1: the bound below.
# Measured on one CPU thread: every encode and decode here is bit-equal (error 0).
TOL = 1e-5

TINY = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, latent_channels=4,
            sample_size=32)


def reference(layers_per_block: int, seed: int = 0):
    torch.manual_seed(seed)
    return perturb(diffusers.AutoencoderKLTemporalDecoder(layers_per_block=layers_per_block, **TINY), seed)


@pytest.fixture(scope="module", params=[1, 2], ids=["layers1", "layers2"])
def pair(request, tmp_path_factory):
    """(diffusers' model, ours) on the same weights. layers_per_block 2 is SVD's: the mid block
    runs resnet, attention, resnet; with 1 diffusers never runs its (loaded) attention."""
    ref = reference(request.param)
    folder = tmp_path_factory.mktemp("svd-vae")
    ref.save_pretrained(folder, safe_serialization=True)
    return ref, AutoencoderKLTemporalDecoder.from_pretrained(folder)


def rel_err(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


def test_state_dict_matches(pair):
    ref, ours = pair
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.config.scaling_factor == ref.config.scaling_factor == 0.18215


@pytest.mark.parametrize("size", [(32, 48), (40, 24)])
def test_encode_matches(pair, size):
    ref, ours = pair
    x = torch.rand(3, 3, *size, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        want, got = ref.encode(x).latent_dist, ours.encode(x)
    assert got.mean.shape == (3, 4, size[0] // 2, size[1] // 2)
    for field in ("mean", "logvar", "std"):
        assert rel_err(getattr(got, field), getattr(want, field)) <= TOL, field
    assert got.mode() is got.mean
    s = torch.Generator().manual_seed(7)
    assert rel_err(got.sample(torch.Generator().manual_seed(7)), want.sample(s)) <= TOL


@pytest.mark.parametrize("frames, videos, size", [(1, 1, (8, 12)), (3, 2, (12, 8)), (5, 1, (6, 10))])
def test_decode_matches(pair, frames, videos, size):
    ref, ours = pair
    z = torch.randn(videos * frames, 4, *size, generator=torch.Generator().manual_seed(frames))
    with torch.no_grad():
        want, got = ref.decode(z, num_frames=frames).sample, ours.decode(z, frames)
    assert got.shape == want.shape == (videos * frames, 3, 2 * size[0], 2 * size[1])
    assert rel_err(got, want) <= TOL
    if frames > 1:  # the frames really are mixed: decoding them one by one differs
        with torch.no_grad():
            assert rel_err(ours.decode(z, 1), got) > 1e-3


def test_reconstruct_and_scaling(pair):
    ref, ours = pair
    x = torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        assert rel_err(ours(x, num_frames=3), ref(x, num_frames=3).sample) <= TOL
    latents = torch.randn(2, 4, 4, 4)
    assert torch.equal(ours.unscale_latents(latents), 1 / ref.config.scaling_factor * latents)  # SVD's decode_latents


def test_bad_inputs(pair):
    ours = pair[1]
    z = torch.zeros(6, 4, 4, 4)
    for bad in (4, 0, 2.0, None):
        with pytest.raises(ValueError, match="num_frames must be an integer >= 1 dividing the 6 latents"):
            ours.decode(z, bad)
    with pytest.raises(ValueError, match=r"latents must have shape \(batch, 4, height, width\)"):
        ours.decode(torch.zeros(6, 3, 4, 4), 6)


@pytest.mark.parametrize("change, message", [
    (dict(block_out_channels=[32, 48]), "48 is not divisible by the 32 norm groups"),
    (dict(block_out_channels=[32]), "expected as many levels"),
    (dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]), "only DownEncoderBlock2D"),
    (dict(scaling_factor=0), "must not be 0"),
    (dict(layers_per_block="2"), "expected an integer"),
])
def test_config_refuses(change, message):
    good = dict(TINY, block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2)
    assert TemporalVAEConfig.from_dict(good).block_out_channels == [32, 64]
    with pytest.raises(ConfigError, match=message):
        TemporalVAEConfig.from_dict(dict(good, **change))


def test_real_svd_keys_and_shapes():
    """SVD's own config (stabilityai/stable-video-diffusion-img2vid-xt vae/config.json, the
    defaults here) builds diffusers' layout, counted on the meta device."""
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLTemporalDecoder(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                                                     down_block_types=("DownEncoderBlock2D",) * 4)
        ours = AutoencoderKLTemporalDecoder(TemporalVAEConfig.from_dict(dict(ref.config)))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert list(ours.buffers()) == []


def test_float16_needs_upcast(tmp_path):
    reference(1).save_pretrained(tmp_path, safe_serialization=True)  # force_upcast: true, as SVD's
    vae = AutoencoderKLTemporalDecoder.from_pretrained(tmp_path, dtype=torch.float16)
    assert vae.dtype == torch.float16 and vae.needs_upcast  # diffusers' SVD pipeline: vae.to(float32)
    assert not vae.float().needs_upcast
