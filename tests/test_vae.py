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

from mini_tgate.vae import AutoencoderKL  # noqa: E402

TOL = 1e-4

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
        vae.use_slicing = True
        sliced_mean, sliced_img = vae.encode(x).mean, vae.decode(z)
        ref.enable_slicing()
        ref_mean, ref_img = ref.encode(x).latent_dist.mean, ref.decode(z).sample
    # One image at a time vs the batch: equal up to rounding, since PyTorch's CPU convolution
    # and group norm kernels can sum in another order for another batch size or memory layout.
    assert max_diff(sliced_img, whole_img) <= TOL and max_diff(sliced_mean, whole_mean) <= TOL
    assert max_diff(sliced_img, ref_img) <= TOL and max_diff(sliced_mean, ref_mean) <= TOL


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
