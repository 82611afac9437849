"""mini_tgate.vae.AutoencoderKL against diffusers' AutoencoderKL on random weights (float32).

Each reference model is built with diffusers at a tiny config that keeps one feature of the
real ones, its weights perturbed with a seeded generator (so group norms are not identity),
saved with `save_pretrained` in the real layout and loaded with mini_tgate's from_pretrained.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

diffusers = pytest.importorskip("diffusers")

from tiny_models import save_sd
from tiny_models import vae as tiny_vae  # noqa: E402

from mini_tgate.core.vae import AutoencoderKL  # noqa: E402
from mini_tgate.loading import load_pipeline  # noqa: E402

TOL = 1e-4
pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
            latent_channels=4, sample_size=32)
CONFIGS = {
    "two_levels": dict(TINY),
    # factor 8, as in the real VAEs, and 3 resnets per decoder level
    "four_levels": dict(TINY, block_out_channels=(16, 32, 64, 64), layers_per_block=2),
    "no_quant_conv": dict(TINY, use_quant_conv=False, use_post_quant_conv=False),
    "no_mid_attention": dict(TINY, mid_block_add_attention=False),
    # SD3/Flux-style: 16 latent channels, a shift factor
    "shift_factor": dict(TINY, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159),
}

SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32,
              latent_channels=4, sample_size=512, scaling_factor=0.18215)
SDXL_VAE = dict(SD_VAE, sample_size=1024, scaling_factor=0.13025, force_upcast=True)


def reference_vae(config: dict, seed: int = 0):
    levels = len(config["block_out_channels"])
    ref = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                                  up_block_types=("UpDecoderBlock2D",) * levels, **config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            noise = torch.randn(p.shape, generator=g)
            # norm scales/biases and conv biases: +-0.1 around their init; weights: +20% of spread
            p.add_(0.1 * noise if p.ndim == 1 else 0.2 * p.std() * noise)
    return ref.eval()


def save_and_load(ref, tmp_path, **kw):
    ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
    return AutoencoderKL.from_pretrained(tmp_path, subfolder="vae", **kw)


def images(n: int, size: int = 32, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, size, size, generator=g) * 2 - 1


def max_diff(a, b):
    return (a.float() - b.float()).abs().max().item()


@pytest.mark.parametrize("name", CONFIGS)
def test_matches_diffusers(name, tmp_path):
    ref = reference_vae(CONFIGS[name])
    vae = save_and_load(ref, tmp_path)
    x = images(2)
    with torch.no_grad():
        want, got = ref.encode(x).latent_dist, vae.encode(x)
        for field in ("mean", "logvar", "std"):
            assert max_diff(getattr(got, field), getattr(want, field)) <= TOL, field
        assert got.mode() is got.mean
        # the same generator state gives the same noise, for one generator and for a list
        z_want = want.sample(torch.Generator().manual_seed(7))
        z_got = got.sample(torch.Generator().manual_seed(7))
        assert max_diff(z_got, z_want) <= TOL
        gens = lambda: [torch.Generator().manual_seed(s) for s in (3, 4)]  # noqa: E731
        assert max_diff(got.sample(gens()), want.sample(gens())) <= TOL

        img_want, img_got = ref.decode(z_want).sample, vae.decode(z_want)
        assert img_got.shape == x.shape and img_got.dtype == torch.float32
        assert max_diff(img_got, img_want) <= TOL
        assert max_diff(vae(x), ref(x).sample) <= TOL


def test_sliced_equals_unsliced(tmp_path):
    ref = reference_vae(CONFIGS["four_levels"])
    vae = save_and_load(ref, tmp_path)
    x = images(3)
    with torch.no_grad():
        z = ref.encode(x).latent_dist.sample(torch.Generator().manual_seed(5))
        whole_mean, whole_img = vae.encode(x).mean, vae.decode(z)
        vae.enable_slicing()
        sliced_mean, sliced_img = vae.encode(x).mean, vae.decode(z)
        ref.enable_slicing()
        ref_mean, ref_img = ref.encode(x).latent_dist.mean, ref.decode(z).sample
    # One image at a time vs the batch: equal up to rounding, since PyTorch's CPU convolution
    # and group norm kernels can sum in another order for another batch size or memory layout.
    assert max_diff(sliced_img, whole_img) <= TOL and max_diff(sliced_mean, whole_mean) <= TOL
    assert max_diff(sliced_img, ref_img) <= TOL and max_diff(sliced_mean, ref_mean) <= TOL
    vae.disable_slicing()
    assert not vae.use_slicing


def test_scaling_helpers(tmp_path):
    ref = reference_vae(CONFIGS["shift_factor"])
    vae = save_and_load(ref, tmp_path)
    c = ref.config
    z = torch.randn(1, 16, 4, 4)
    latents = vae.scale_latents(z)
    # diffusers' SD3/Flux pipelines: (z - shift) * scale after encode, latents / scale + shift
    # before decode
    assert torch.equal(latents, (z - c.shift_factor) * c.scaling_factor)
    assert torch.equal(vae.unscale_latents(latents), latents / c.scaling_factor + c.shift_factor)
    # without a shift factor (SD, SDXL) it is just the scaling diffusers' SD pipelines apply
    sd = AutoencoderKL.config_class.from_dict(dict(CONFIGS["two_levels"]))
    with torch.device("meta"):
        sd_vae = AutoencoderKL(sd)
    assert torch.equal(sd_vae.unscale_latents(latents), latents / 0.18215)
    assert torch.equal(sd_vae.scale_latents(z), 0.18215 * z)


def test_legacy_attention_keys(tmp_path):
    ref = reference_vae(CONFIGS["two_levels"])
    ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
    path = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    renames = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.",
               ".to_out.0.": ".proj_attn."}
    legacy = {}
    for k, v in state.items():
        if ".attentions." in k:
            for new, old in renames.items():
                k = k.replace(new, old)
        legacy[k] = v
    assert sum(".proj_attn." in k for k in legacy) == 4  # encoder and decoder, weight and bias
    save_file(legacy, path)
    vae = AutoencoderKL.from_pretrained(tmp_path, subfolder="vae")
    z = torch.randn(2, 4, 16, 16)
    with torch.no_grad():
        assert max_diff(vae.decode(z), ref.decode(z).sample) <= TOL


@pytest.mark.parametrize("config", [SD_VAE, SDXL_VAE], ids=["sd", "sdxl"])
def test_real_scale_keys_and_shapes(config):
    levels = len(config["block_out_channels"])
    with torch.device("meta"):
        ref = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * levels,
                                      up_block_types=("UpDecoderBlock2D",) * levels, **config)
        vae = AutoencoderKL(AutoencoderKL.config_class.from_dict(dict(ref.config)))
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in vae.state_dict().items()}
    assert got == want
    assert list(vae.buffers()) == []  # built on meta, filled with assign=True: no buffers allowed
    n = sum(p.numel() for p in vae.parameters())
    assert n == sum(p.numel() for p in ref.parameters()) == 83_653_863
    assert vae.config.force_upcast == config.get("force_upcast", True)


def test_float16_force_upcast(tmp_path):
    config = dict(CONFIGS["two_levels"], force_upcast=True)
    ref = reference_vae(config)
    vae = save_and_load(ref, tmp_path, dtype=torch.float16)  # CPU has float16 conv kernels
    assert vae.dtype == torch.float16 and vae.needs_upcast
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    # Latents large enough that conv_in overflows float16's range (65504), as the SDXL VAE's
    # activations do on real images: without the upcast the decode is inf/NaN.
    huge = 3e4 * z
    with torch.no_grad():
        assert vae.decode(z).dtype == torch.float16
        assert not vae.decode(huge).isfinite().all()
        vae.float()  # what a float16 pipeline does when vae.needs_upcast
        assert not vae.needs_upcast
        img, img_huge = vae.decode(z), vae.decode(huge)
        assert img.dtype == torch.float32 and img_huge.isfinite().all()
        # diffusers' SDXL pipeline on the same float16 weights: vae.to(torch.float32), then decode
        ref16 = diffusers.AutoencoderKL.from_pretrained(tmp_path, subfolder="vae",
                                                        torch_dtype=torch.float16)
        want = ref16.to(torch.float32).decode(z).sample
    assert max_diff(img, want) <= TOL


def test_needs_upcast_only_for_float16(tmp_path):
    ref = reference_vae(dict(CONFIGS["two_levels"], force_upcast=False))
    ref.save_pretrained(tmp_path / "vae", safe_serialization=True)
    fp16 = AutoencoderKL.from_pretrained(tmp_path, subfolder="vae", dtype=torch.float16)
    assert not fp16.needs_upcast  # the config says float16 is fine
    cfg = json.loads((tmp_path / "vae" / "config.json").read_text())
    (tmp_path / "vae" / "config.json").write_text(json.dumps(dict(cfg, force_upcast=True)))
    bf16 = AutoencoderKL.from_pretrained(tmp_path, subfolder="vae", dtype=torch.bfloat16)
    assert not bf16.needs_upcast  # bfloat16 has float32's exponent range
    with torch.no_grad():  # and without an upcast the VAE simply runs in its own dtype
        out = bf16.decode(torch.randn(1, 4, 16, 16))
    assert out.dtype == torch.bfloat16 and out.isfinite().all()


# Tiling, against diffusers' enable_tiling() on the same weights. tests/tiny_models.py's VAE has
# factor 8 and sample_size 64: tiles of 8x8 latents (64x64 pixels) starting every 6 latents,
# cross-faded over 16 pixels. Latents of 22x27 make 4 rows of 5 tiles, the last ones partial.
TILED = (2, 4, 22, 27)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-vae")
    tiny_vae().save_pretrained(folder / "vae", safe_serialization=True)
    return folder


@pytest.fixture
def pair(tiny_folder, one_thread):
    """(diffusers' VAE, mini_tgate's VAE) on the same weights, switches off."""
    ref = diffusers.AutoencoderKL.from_pretrained(tiny_folder, subfolder="vae").eval()
    return ref, AutoencoderKL.from_pretrained(tiny_folder, subfolder="vae")


def latents(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("slicing", [False, True], ids=["batch", "sliced"])
def test_tiled_decode_matches_diffusers(pair, slicing):
    ref, vae = pair
    z = latents(TILED)
    with torch.no_grad():
        untiled = vae.decode(z)
        ref.enable_tiling()
        vae.enable_tiling()
        if slicing:
            ref.enable_slicing()
            vae.enable_slicing()
        want, got = ref.decode(z).sample, vae.decode(z)
    assert got.shape == want.shape == (2, 3, 22 * 8, 27 * 8)
    assert max_diff(got, want) <= 1e-5
    # the tiles see only their own latents (attention, group norms): not the untiled image
    assert max_diff(got, untiled) > 1e-2


def test_tiled_decode_rectangular_and_one_tile_high(pair):
    ref, vae = pair
    ref.enable_tiling()
    vae.enable_tiling()
    with torch.no_grad():
        for shape in [(1, 4, 5, 20), (1, 4, 19, 8), (1, 4, 9, 9)]:  # one dimension within a tile
            z = latents(shape, seed=shape[2])
            assert max_diff(vae.decode(z), ref.decode(z).sample) <= 1e-5, shape


def test_tiling_leaves_inputs_within_a_tile_untiled(pair):
    ref, vae = pair
    z, x = latents((2, 4, 8, 5)), images(2, size=64)  # a tile: 8 latents, 64 pixels
    with torch.no_grad():
        untiled_img, untiled_mean = vae.decode(z), vae.encode(x).mean
        vae.enable_tiling()
        ref.enable_tiling()
        img, mean = vae.decode(z), vae.encode(x).mean
        assert torch.equal(img, untiled_img) and torch.equal(mean, untiled_mean)
        assert max_diff(img, ref.decode(z).sample) <= TOL


def test_tiled_encode_matches_diffusers(pair):
    ref, vae = pair
    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 3, 176, 216, generator=g) * 2 - 1  # 4 x 5 tiles of 64 pixels every 48
    with torch.no_grad():
        untiled = vae.encode(x).mean
        ref.enable_tiling()
        vae.enable_tiling()
        want, got = ref.encode(x).latent_dist, vae.encode(x)
    assert got.mean.shape == want.mean.shape == (2, 4, 22, 27)
    for field in ("mean", "logvar", "std"):
        assert max_diff(getattr(got, field), getattr(want, field)) <= 1e-5, field
    s = torch.Generator().manual_seed(9)
    assert max_diff(got.sample(torch.Generator().manual_seed(9)), want.sample(s)) <= 1e-5
    assert max_diff(got.mean, untiled) > 1e-2
    with pytest.raises(ValueError, match="multiples of 8, got 176x210"):
        vae.encode(x[..., :210])  # diffusers: a convolution error, or a wrong size


def test_tile_attributes_as_diffusers(pair):
    ref, vae = pair
    z = latents((1, 4, 13, 10))
    with torch.no_grad():
        for model in (ref, vae):  # what diffusers users set by hand: 32-pixel tiles
            model.tile_sample_min_size, model.tile_latent_min_size = 32, 4
            model.enable_tiling()
        assert max_diff(vae.decode(z), ref.decode(z).sample) <= 1e-5
    vae.tile_latent_min_size = 8  # 8 latents decode to 64 pixels, not 32
    with pytest.raises(ValueError, match="tile_sample_min_size must be tile_latent_min_size"):
        vae.decode(z)
    vae.disable_tiling()
    assert vae.decode(z).shape == (1, 3, 104, 80)  # the attributes matter only when tiling


def test_misaligned_tiles_are_refused():
    # sample_size 40 at factor 8: tiles of 5 latents every 3 (24 pixels), keeping 30 pixels of
    # each; diffusers decodes 12x12 latents to 114x114 pixels instead of 96x96.
    config = AutoencoderKL.config_class.from_dict(dict(TINY, block_out_channels=(16, 16, 32, 32),
                                                       sample_size=40))
    with torch.device("meta"):
        vae = AutoencoderKL(config)
    with pytest.raises(ValueError, match="do not line up.*a multiple of 32"):
        vae.enable_tiling()
    assert not vae.use_tiling


def test_switches_are_read_once_per_call(pair):
    """A switch flipped while a decode runs (by another thread) acts on the next call only."""
    ref, vae = pair
    z = latents(TILED)
    vae.enable_tiling()
    vae.enable_slicing()
    with torch.no_grad():
        want = vae.decode(z)

        def flip(module, args):  # runs before the first tile's decoder
            vae.disable_tiling()
            vae.disable_slicing()
            vae.tile_latent_min_size = 4

        handle = vae.decoder.register_forward_pre_hook(flip)
        try:
            got = vae.decode(z)
        finally:
            handle.remove()
    assert torch.equal(got, want)


def test_pipeline_decodes_in_tiles(tmp_path, one_thread):
    """pipe.vae.enable_tiling() acts inside the pipeline's own decode, as in diffusers."""
    folder = save_sd(tmp_path / "sd")
    pipe = load_pipeline(folder)
    pipe.vae.enable_tiling()
    kw = dict(height=96, width=136, num_inference_steps=2, latents=latents((1, 4, 12, 17)))
    final = pipe("a red circle", output_type="latent", **kw).images
    image = pipe("a red circle", output_type="pt", **kw).images
    ref = diffusers.AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    ref.enable_tiling()
    with torch.no_grad():
        want = ref.decode(final / ref.config.scaling_factor).sample
        ref.disable_tiling()
        untiled = ref.decode(final / ref.config.scaling_factor).sample
    assert max_diff(image, (want / 2 + 0.5).clamp(0, 1)) <= 1e-5
    assert max_diff(image, (untiled / 2 + 0.5).clamp(0, 1)) > 1e-2


@pytest.mark.parametrize("call, bad, error, message", [
    ("decode", torch.zeros(4, 8, 8), ValueError, r"latents must have shape \(batch, 4, height, width\)"),
    ("decode", torch.zeros(1, 3, 8, 8), ValueError, r"\(batch, 4, height, width\).*got \(1, 3, 8, 8\)"),
    ("decode", torch.zeros(1, 4, 0, 8), ValueError, "no empty axis"),
    ("decode", torch.zeros(1, 4, 8, 8, dtype=torch.int64), ValueError, "floating-point tensor, got torch.int64"),
    ("decode", torch.zeros(1, 4, 8, 8).numpy(), TypeError, "latents must be a torch.Tensor, got ndarray"),
    ("encode", torch.zeros(1, 4, 16, 16), ValueError, r"image must have shape \(batch, 3, height, width\)"),
    ("encode", torch.zeros(1, 3, 16, 16, dtype=torch.uint8), ValueError, "floating-point tensor, got torch.uint8"),
])
def test_bad_inputs(pair, call, bad, error, message):
    with pytest.raises(error, match=message):
        getattr(pair[1], call)(bad)
