"""StableVideoDiffusionPipeline end to end against diffusers' StableVideoDiffusionPipeline and, with
a TGate, the `tgate` package's TgateSVDLoader, on a tiny random SVD checkpoint saved by diffusers."""

import copy
import warnings

import diffusers
import numpy as np
import pytest
import torch
import transformers
from conftest import realign
from PIL import Image
from test_schedulers import SVD
from tgate import TgateSVDLoader
from tiny_models import perturb

import tgate.SVD
from mini_tgate import DeepCache, StableVideoDiffusionPipeline, TGate
from mini_tgate.core.attention import Attention
from mini_tgate.loading import load_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")

UNET = dict(sample_size=8, in_channels=8, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
            transformer_layers_per_block=1, cross_attention_dim=32, num_attention_heads=(2, 4), num_frames=3,
            addition_time_embed_dim=8, projection_class_embeddings_input_dim=3 * 8,
            down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
            up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"))
VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2, layers_per_block=1,
           latent_channels=4)
# diffusers resizes the image to 224 x 224 for CLIP whatever the encoder's size: image_size must be 224
CLIP = dict(image_size=224, patch_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, projection_dim=32, hidden_act="gelu")
MEAN, STD = [0.5, 0.45, 0.4], [0.25, 0.3, 0.27]  # not CLIP's: proves feature_extractor/ is read
H, W = 16, 24  # non-square; the VAE's factor is 2: latents (B, F, 4, 8, 12)
RUN = dict(height=H, width=W, num_frames=3, num_inference_steps=5, max_guidance_scale=2.5, min_guidance_scale=1.5,
           output_type="np")

# Float32 on one thread, the same operations in the same order, on the same memory layouts: every
# run below measured bit for bit (0.0) but those without CFG (1.1e-6 of frames in [0, 1]): there
# a Linear reads a broadcast (stride-0) context, and the BLAS path it takes depends on where the
# weight lies (diffusers' own result moves by that last bit when its weight is cloned). The bound
# allows such last-bit changes (~1e-7 relative per layer, over 5 steps of ~40 layers), far below
# what a wrong draw, guidance scale, time id or branch moves (measured: > 1e-3).
TOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("svd")
    torch.manual_seed(0)
    encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(**CLIP))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extractor = transformers.CLIPImageProcessor(image_mean=MEAN, image_std=STD)
    pipe = diffusers.StableVideoDiffusionPipeline(
        vae=perturb(diffusers.AutoencoderKLTemporalDecoder(**VAE), 1), image_encoder=perturb(encoder, 2),
        unet=perturb(diffusers.UNetSpatioTemporalConditionModel(**UNET), 3),
        scheduler=diffusers.EulerDiscreteScheduler.from_config(SVD), feature_extractor=extractor)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def ref(folder):
    """diffusers' pipeline as it loads the folder; never given to tgate (its loader patches for good)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pipe = diffusers.StableVideoDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    realign(pipe.unet, pipe.vae, pipe.image_encoder)
    return pipe


@pytest.fixture(scope="module")
def ours(folder):
    return load_pipeline(folder)


def picture(h=H, w=W, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def error(got, expected) -> float:
    got, expected = (torch.as_tensor(np.asarray(x)) for x in (got, expected))
    assert got.shape == expected.shape
    return (got - expected).abs().max().item()


def both(ours, ref, image, gate=None, seed=0, **kw):
    """Our frames and the reference's for the same image, arguments and seed; each generator
    must end where the other does (the same draws)."""
    mine, theirs = gen(seed), gen(seed)
    kw = {**RUN, **kw}
    got = ours(image, generator=mine, tgate=gate, **kw)
    if gate is None:
        expected = ref(image, generator=theirs, **kw).frames
    else:
        gated = TgateSVDLoader(copy.deepcopy(ref))
        expected = gated.tgate(image, generator=theirs, gate_step=gate.gate_step, sp_interval=gate.sp_interval,
                               fi_interval=gate.fi_interval, warm_up=gate.warm_up, **kw).frames
    assert torch.equal(mine.get_state(), theirs.get_state())
    assert all(m.cache is None for m in ours.unet.modules() if isinstance(m, Attention))  # nothing outlives a call
    return got, expected


def test_load_pipeline_returns_ours(ours):
    assert type(ours) is StableVideoDiffusionPipeline
    assert (ours.image_mean, ours.image_std) == (tuple(MEAN), tuple(STD))
    assert ours.vae_scale_factor == 2 and ours.unet.config.num_frames == 3
    assert type(ours.vae).__name__ == "AutoencoderKLTemporalDecoder"


@pytest.mark.parametrize("output_type", ["np", "pt", "latent"])
def test_plain_matches_diffusers(ours, ref, output_type):
    got, expected = both(ours, ref, Image.fromarray(picture()), output_type=output_type)
    shape = {"np": (1, 3, H, W, 3), "pt": (1, 3, 3, H, W), "latent": (1, 3, 4, H // 2, W // 2)}[output_type]
    assert got.frames.shape == shape and got.images is got.frames
    assert got.frames.dtype in (np.float32, torch.float32)
    assert error(got.frames, expected) <= TOL, error(got.frames, expected)
    assert [s["batch"] for s in got.steps] == [2] * 5


@pytest.mark.parametrize("gate, steps", [
    (TGate(5, 2, 2, 0), 7),   # self-attention reused before the gate (1, 3) and after it (5)
    (TGate(2, 1, 1, 1), 5),   # an early gate: the image branch alone for 3 steps
    (TGate(1, 1, 3, 0), 4),   # gate at the first step: it caches the CFG mean at once
    (TGate(9, 2, 1, 1), 5),   # a gate past the run: CFG throughout, self-attention reuse only
])
def test_gated_matches_tgate(ours, ref, gate, steps):
    got, expected = both(ours, ref, Image.fromarray(picture(seed=1)), gate, num_inference_steps=steps)
    assert error(got.frames, expected) <= TOL, error(got.frames, expected)
    assert [s["batch"] for s in got.steps] == [2 if i < gate.gate_step else 1 for i in range(steps)]
    if gate == TGate(5, 2, 2, 0):
        assert "".join(s["self_attn"][0] for s in got.steps) == "crcrcrc"  # cache, reuse, ..., cache_mean at 4
    plain = ours(Image.fromarray(picture(seed=1)), generator=gen(), **{**RUN, "num_inference_steps": steps})
    assert error(plain.frames, got.frames) > 1e-4  # the gate changed something


@pytest.mark.parametrize("chunk", [1, 2, None])
def test_decode_chunks_and_batch(ours, ref, chunk):
    """Two videos (a batch of images, a generator each); chunks of 2 of 3 frames run across the videos."""
    images = [picture(seed=2), picture(seed=3)]
    mine, theirs = [gen(5), gen(6)], [gen(5), gen(6)]
    got = ours(np.stack(images), generator=mine, decode_chunk_size=chunk, **RUN)
    expected = ref([Image.fromarray(x) for x in images], generator=theirs, decode_chunk_size=chunk, **RUN).frames
    assert got.frames.shape == (2, 3, H, W, 3)
    assert error(got.frames, expected) <= TOL, error(got.frames, expected)
    assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(mine, theirs))


def test_non_square_sizes_and_resize(ours, ref):
    """A portrait video (diffusers wants multiples of 8), and an image of another size than the
    video's, resized as diffusers resizes a PIL image (Lanczos)."""
    got, expected = both(ours, ref, Image.fromarray(picture(24, 16)), height=24, width=16)
    assert got.frames.shape == (1, 3, 24, 16, 3) and error(got.frames, expected) <= TOL
    got, expected = both(ours, ref, Image.fromarray(picture(21, 30)), decode_chunk_size=2)
    assert got.frames.shape == (1, 3, H, W, 3) and error(got.frames, expected) <= TOL


def test_no_cfg(ours, ref, monkeypatch):
    """max_guidance_scale <= 1: no CFG, equal to diffusers. Gated, the gate step caches without a
    mean (nothing to average); tgate's loader would average the batch's two halves of frames
    (crashing on an odd count), so its scheduler is made to keep the shape there."""
    image = Image.fromarray(picture(seed=4))
    got, expected = both(ours, ref, image, max_guidance_scale=1.0, min_guidance_scale=1.0)
    assert error(got.frames, expected) <= TOL and [s["batch"] for s in got.steps] == [1] * 5
    schedule = tgate.SVD.tgate_scheduler
    monkeypatch.setattr(tgate.SVD, "tgate_scheduler", lambda *a, **k: (*schedule(*a, **k)[:2], True))
    got, expected = both(ours, ref, image, TGate(3, 1, 1, 1), max_guidance_scale=1.0, min_guidance_scale=0.5)
    assert error(got.frames, expected) <= TOL, error(got.frames, expected)


def test_step_callback_matches_diffusers(ours, ref):
    def halve(pipe, i, t, tensors):  # what a step callback returns replaces the loop's latents
        return {"latents": tensors["latents"] * 0.5} if i == 1 else {}

    got, expected = both(ours, ref, Image.fromarray(picture(seed=7)), callback_on_step_end=halve)
    assert error(got.frames, expected) <= TOL
    assert error(got.frames, ours(picture(seed=7), generator=gen(), **RUN).frames) > 1e-3


def test_plain_after_gated_equals_fresh(ours, folder):
    """tgate's loader leaves its forwards and caches on the UNet; here a plain call after gated
    ones is a fresh pipeline's."""
    image = picture(seed=5)
    for gate in (TGate(2, 1, 1, 0), TGate(3, 2, 2, 1)):
        ours(image, generator=gen(1), tgate=gate, **RUN)
    again = ours(image, generator=gen(), **RUN).frames
    assert np.array_equal(again, load_pipeline(folder)(image, generator=gen(), **RUN).frames)


def test_image_kinds_agree(ours, tmp_path):
    """A PIL image, a uint8 array, a float tensor in [0, 1] and a file: the same video."""
    pixels = picture(seed=6)
    Image.fromarray(pixels).save(tmp_path / "in.png")
    tensor = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    videos = [ours(x, generator=gen(), **RUN).frames
              for x in (Image.fromarray(pixels), pixels, tensor, tmp_path / "in.png")]
    assert all(np.array_equal(videos[0], v) for v in videos[1:])


def test_refusals(ours):
    image = picture()
    with pytest.raises(ValueError, match="DeepCache"):
        ours(image, deepcache=DeepCache(2, 0), **RUN)
    for bad, match in ((dict(num_frames=0), "num_frames"), (dict(decode_chunk_size=1.5), "decode_chunk_size"),
                       (dict(fps=float("nan")), "fps"), (dict(height=13), "multiples of 2"),
                       (dict(callback_on_step_end_tensor_inputs=["prompt_embeds"]), "'latents' only"),
                       (dict(latents=torch.zeros(1, 3, 4, 4, 4)), "latents must have shape")):
        with pytest.raises(ValueError, match=match):
            ours(image, **{**RUN, **bad})


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_bfloat16_matches_diffusers(folder, dtype):
    """Both loaded in bfloat16 or float16 from the same folder: the same operations in the same
    order, bit for bit, latents (and, in bfloat16, frames).

    float16: the reference's parameters are made not to require grad, as ours do not. On the CPU,
    torch's float16 Linear (on some shapes) takes another kernel path when its weight requires grad
    (even under no_grad: measured, the first transformer's proj_in moves by 4.9e-4 with equal
    input and weights, and the denoised latents by 2e-2 at a scale of 2); bfloat16 is unaffected.
    The frames then differ by decoding alone: diffusers casts its force_upcast VAE back to float16
    to decode, ours stays float32 (measured 9.4e-4 of frames in [0, 1]). The bound, 4e-3 = 8 float16
    ulps at 1.0 (2^-11 each), covers the rounding of a float16 decoder over its ~20 layers; the
    latents, compared exactly, already catch any difference of draw, guidance or time ids."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = diffusers.StableVideoDiffusionPipeline.from_pretrained(folder, torch_dtype=dtype)
    ref.set_progress_bar_config(disable=True)
    realign(ref.unet, ref.vae, ref.image_encoder)
    for model in (ref.unet, ref.vae, ref.image_encoder):
        model.requires_grad_(False)  # as ours: float16 Linear kernels on the CPU depend on it
    ours = load_pipeline(folder, dtype=dtype)
    image = Image.fromarray(picture(seed=8))
    for output_type in ("latent", "np"):
        got, expected = both(ours, ref, image, output_type=output_type)
        if output_type == "latent":  # (B, F, 4, h, w) in bfloat16 or float16: compared as float32
            assert got.frames.dtype == expected.dtype == dtype
            got, expected = got.frames.float(), expected.float()
        else:
            got = got.frames
        bound = 4e-3 if dtype == torch.float16 and output_type == "np" else 0.0
        assert error(got, expected) <= bound, error(got, expected)


def test_static_caches_match_tgate(ours, ref):
    """The caches CUDA graphs need (compile(mode="reduce-overhead") sets `static_caches`): buffers
    written in place, the one-token cross-attention's one row included; tgate's frames, and the
    usual caches' bit for bit."""
    gate, image = TGate(5, 2, 2, 0), Image.fromarray(picture(seed=1))
    usual, expected = both(ours, ref, image, gate, num_inference_steps=7)
    ours.static_caches = True
    try:
        got = ours(image, generator=gen(), tgate=gate, **{**RUN, "num_inference_steps": 7})
        layers = ours.unet.attention_layers
        assert all(m.static for m in layers) and any(m.cache.shape[1] == 1 for m in layers)
    finally:
        ours.static_caches = False
    assert error(got.frames, expected) <= TOL, error(got.frames, expected)
    assert np.array_equal(got.frames, usual.frames)


def test_regional_compile(ours, ref, quick_inductor):
    """compile(regional=True) on SVD: its spatial and temporal blocks and resnets compiled each on
    its own (inductor, as a user calls it; its 3-D convolutions are left out of channels_last,
    which refused them before), giving the eager frames and diffusers'. Plain: the gates are the UNet's and
    PixArt's regional tests' (each gate is one more graph per block, seconds each here)."""
    from mini_tgate.core.unet import BasicTransformerBlock, ResnetBlock2D
    from mini_tgate.svd.unet import TemporalResnetBlock

    pipe = copy.deepcopy(ours).compile(regional=True)
    kinds = (BasicTransformerBlock, ResnetBlock2D, TemporalResnetBlock)
    blocks = [m for m in pipe.unet.modules() if isinstance(m, kinds)]
    assert {type(m).__name__ for m in blocks} == {"BasicTransformerBlock", "TemporalBasicTransformerBlock",
                                                   "ResnetBlock2D", "TemporalResnetBlock"}
    assert all(m._compiled_call_impl is not None for m in blocks) and pipe.unet._compiled_call_impl is None
    image = Image.fromarray(picture(seed=3))  # diffusers takes PIL images, not arrays
    got = pipe(image, generator=gen(), **RUN).frames
    assert error(got, ours(image, generator=gen(), **RUN).frames) <= 1e-5
    assert error(got, ref(image, generator=gen(), **RUN).frames) <= TOL  # test_plain_matches_diffusers' tolerance
