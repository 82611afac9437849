"""img2img (pipe(prompt, image=..., strength=...)) against diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionXLImg2ImgPipeline on tiny random-weight checkpoints, against the `tgate` package with a
gate inside the run, and on the tiny trained shapes model: the layout of the input survives."""

import copy
import json
import runpy
import sys
import warnings
from pathlib import Path

import diffusers
import numpy as np
import pytest
import torch
from DeepCache import DeepCacheSDHelper
from PIL import Image
from tgate import TgateSDLoader
from tiny_models import save_sd, save_sdxl

import mini_tgate
from mini_tgate import count_macs
from mini_tgate.core.tgate import REUSE, DeepCache
from mini_tgate.formats.png import read_png_text, to_uint8
from mini_tgate.loading import load_pipeline

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import shapes  # noqa: E402

PROMPT = "a red circle on a blue background"
SCHEDULERS = ["DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
              "DPMSolverMultistepScheduler", "LCMScheduler"]


def picture(n=None, seed=0):
    """A 64x64 RGB float32 image (or n of them) in [0, 1] with structure the VAE sees: a shapes image
    plus a little noise."""
    rng = np.random.default_rng(seed)
    images = [shapes.sample(rng)[0] / 255 * 0.8 + rng.random((64, 64, 3)) * 0.2 for _ in range(n or 1)]
    images = np.stack(images).astype(np.float32)
    return images if n else images[0]


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pipes(request, tmp_path_factory, one_thread):
    folder = tmp_path_factory.mktemp(request.param)
    (save_sdxl if request.param == "sdxl" else save_sd)(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if request.param == "sdxl":
            ref = diffusers.StableDiffusionXLImg2ImgPipeline.from_pretrained(folder)
        else:
            ref = diffusers.StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None,
                                                                           requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    return request.param, ref, load_pipeline(folder)


def use_scheduler(ref, ours, name, **overrides):
    overrides = {"use_karras_sigmas": False, **overrides}  # not carried over from an earlier test's scheduler
    ref.scheduler = getattr(diffusers, name).from_config({**ref.scheduler.config, **overrides})
    ours.scheduler = getattr(mini_tgate, name).from_config({**ours.scheduler.config, **overrides})


def max_diff(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


def both(ref, ours, seed=1, **kw):
    """(diffusers' images, ours) for the same arguments, each with a fresh generator of `seed`."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' deprecation of one image for several prompts
        expected = ref(output_type="np", generator=torch.Generator().manual_seed(seed), **kw).images
    return expected, ours(generator=torch.Generator().manual_seed(seed), **kw).images


# (scheduler, steps, strength): every scheduler; strengths whose step count int(N * strength)
# truncates (0.35 -> 3 of 10, 0.7 -> 7.000000000000001 -> 7, 0.29 -> 28.999999999999996 -> 28 of 100)
CASES = [("DDIMScheduler", 10, 0.35), ("EulerDiscreteScheduler", 10, 0.7), ("EulerAncestralDiscreteScheduler", 10, 0.5),
         ("DPMSolverMultistepScheduler", 10, 1.0), ("DPMSolverMultistepScheduler", 12, 0.6), ("LCMScheduler", 6, 0.5)]


@pytest.mark.parametrize("scheduler, steps, strength", CASES)
def test_matches_diffusers(pipes, scheduler, steps, strength):
    name, ref, ours = pipes
    use_scheduler(ref, ours, scheduler)
    expected, got = both(ref, ours, prompt=PROMPT, image=picture(), strength=strength, num_inference_steps=steps)
    assert got.shape == (1, 64, 64, 3)
    assert max_diff(expected, got) <= 1e-3


@pytest.mark.parametrize("pipes", ["sd"], indirect=True)  # the step count is code SD and SDXL share
def test_strength_truncates_as_diffusers(pipes):
    name, ref, ours = pipes
    use_scheduler(ref, ours, "DDIMScheduler")
    kw = dict(prompt=PROMPT, image=picture(), strength=0.29, num_inference_steps=100, guidance_scale=1.0)
    expected, got = both(ref, ours, **kw)
    assert max_diff(expected, got) <= 1e-3
    assert len(ours(**kw).steps) == 28


def test_karras_sigmas_and_batches(pipes):
    """DPM-Solver++ with Karras sigmas (rounded timesteps: the noise level is the begin index's), two
    prompts with two images each from one image, then one image per output with a generator each."""
    name, ref, ours = pipes
    use_scheduler(ref, ours, "DPMSolverMultistepScheduler", use_karras_sigmas=True)
    kw = dict(prompt=["a cat", "two dogs"], negative_prompt=["blurry", "dark"], strength=0.6, num_inference_steps=10)
    expected, got = both(ref, ours, image=picture(), num_images_per_prompt=2, **kw)
    assert got.shape == (4, 64, 64, 3)
    assert max_diff(expected, got) <= 1e-3
    images = picture(2, seed=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = ref(image=images, generator=[torch.Generator().manual_seed(s) for s in (4, 5)], output_type="np",
                       **kw).images
    got = ours(image=images, generator=[torch.Generator().manual_seed(s) for s in (4, 5)], **kw).images
    assert max_diff(expected, got) <= 1e-3


@pytest.mark.parametrize("pipes", ["sd"], indirect=True)  # reading the image is code SD and SDXL share
def test_every_input_kind(pipes, tmp_path):
    """float HWC / NHWC arrays, uint8 arrays, NCHW tensors, PIL images and PNG files give diffusers'
    image for the same pixels (diffusers reads uint8 arrays as they are, so its reference is the PIL image)."""
    name, ref, ours = pipes
    use_scheduler(ref, ours, "EulerDiscreteScheduler")
    pixels = (picture() * 255).round().astype(np.uint8)
    pil = Image.fromarray(pixels)
    pil.save(tmp_path / "input.png")
    kw = dict(prompt=PROMPT, strength=0.5, num_inference_steps=4)
    expected, _ = both(ref, ours, image=pil, **kw)
    floats = pixels.astype(np.float32) / 255
    for image in (floats, floats[None], pixels, torch.from_numpy(floats).permute(2, 0, 1)[None], pil,
                  str(tmp_path / "input.png"), tmp_path / "input.png", pil.convert("RGBA")):
        got = ours(image=image, generator=torch.Generator().manual_seed(1), **kw).images
        assert max_diff(expected, got) <= 1e-3, type(image)


def test_tgate_past_the_run_is_plain_img2img(pipes):
    """20 steps at strength 0.4 run the last 8: a gate at step 8 or later never reuses anything, so
    the images are plain img2img's and every step runs the CFG batch. (A plan indexed by the step's
    place among all 20 would be past its gate at the first step run.)"""
    name, ref, ours = pipes
    use_scheduler(ref, ours, "EulerDiscreteScheduler")
    kw = dict(prompt=PROMPT, image=picture(), strength=0.4, num_inference_steps=20, guidance_scale=7.5)
    plain, _ = both(ref, ours, **kw)
    for gate_step in (8, 25):
        out = ours(generator=torch.Generator().manual_seed(1), tgate=mini_tgate.TGate(gate_step, 1, 1, 0), **kw)
        assert max_diff(plain, out.images) <= 1e-3
        assert [s["batch"] for s in out.steps] == [2] * 8


@pytest.mark.parametrize("pipes", ["sd"], indirect=True)  # the gate is code SD and SDXL share (test_pipeline.py)
@pytest.mark.parametrize("gate", [(3, 2, 1, 1), (1, 1, 1, 0)])
def test_gated_img2img_matches_the_tgate_package(pipes, gate):
    """tgate cannot run img2img (diffusers#12505), but its text-to-image pipeline runs the same
    denoising when given the steps img2img runs (custom timesteps; Euler's sigmas are interpolated
    at them either way) and diffusers' img2img starting latents (prepare_latents)."""
    name, ref, ours = pipes
    use_scheduler(ref, ours, "EulerDiscreteScheduler")
    steps, strength, g = 10, 0.6, torch.Generator().manual_seed(1)
    ref.scheduler.set_timesteps(steps)
    timesteps, run = ref.get_timesteps(steps, strength, "cpu")
    pixels = ref.image_processor.preprocess(picture())
    latents = ref.prepare_latents(pixels, timesteps[:1], 1, 1, torch.float32, "cpu", g)
    components = copy.deepcopy({k: v for k, v in ref.components.items() if k != "image_encoder"})  # tgate patches them
    t2i = diffusers.StableDiffusionPipeline(**components, requires_safety_checker=False)
    t2i.set_progress_bar_config(disable=True)
    t2i.scheduler = diffusers.EulerDiscreteScheduler.from_config(ref.scheduler.config)
    t2i.scheduler.set_timesteps(timesteps=timesteps.tolist())
    expected = TgateSDLoader(t2i).tgate(PROMPT, timesteps=timesteps.tolist(), output_type="np",
                                        latents=latents / t2i.scheduler.init_noise_sigma, **dict(zip(
                                            ["gate_step", "sp_interval", "fi_interval", "warm_up"], gate))).images
    out = ours(PROMPT, image=picture(), strength=strength, num_inference_steps=steps, tgate=mini_tgate.TGate(*gate),
               generator=torch.Generator().manual_seed(1))
    assert run == 6 and len(out.steps) == 6
    assert [s["batch"] for s in out.steps] == [2 if i < gate[0] else 1 for i in range(6)]
    assert max_diff(expected, out.images) <= 1e-3


@pytest.mark.parametrize("pipes", ["sd"], indirect=True)  # DeepCache is code SD and SDXL share (test_deepcache.py)
def test_deepcache_img2img_matches_the_deepcache_helper(pipes):
    """DeepCache's helper counts the UNet calls of the run: its full steps are every interval-th step
    run, as the plan made over the steps run has them (12 steps at strength 0.7 run the last 8: full at
    their 0, 3 and 6, not at the 6 and 9 of all 12)."""
    name, base, ours = pipes
    use_scheduler(base, ours, "DPMSolverMultistepScheduler")
    ref = copy.deepcopy(base)  # the helper patches forwards in place
    helper = DeepCacheSDHelper(pipe=ref)
    helper.set_params(cache_interval=3, cache_branch_id=0)
    helper.enable()
    kw = dict(prompt=PROMPT, image=picture(), strength=0.7, num_inference_steps=12)
    expected, _ = both(ref, ours, **kw)
    out = ours(generator=torch.Generator().manual_seed(1), deepcache=DeepCache(3, 0), **kw)
    assert max_diff(expected, out.images) <= 1e-3
    assert [i for i, s in enumerate(out.steps) if s["deep"] != REUSE] == [0, 3, 6]
    assert max_diff(out.images, ours(generator=torch.Generator().manual_seed(1), **kw).images) > 1e-2  # not plain


def test_scheduler_add_noise_matches_diffusers():
    """add_noise at the first step run of 10 (begin index 4), for each scheduler, vs diffusers'."""
    config = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                  steps_offset=1)
    x, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    for name, extra in [(n, {}) for n in SCHEDULERS] + [("DPMSolverMultistepScheduler", {"use_karras_sigmas": True})]:
        ref, ours = getattr(diffusers, name)(**config, **extra), getattr(mini_tgate, name)(**config, **extra)
        for s in (ref, ours):
            s.set_timesteps(10)
            if hasattr(s, "set_begin_index"):  # diffusers' DDIM and LCM look the timestep up instead
                s.set_begin_index(4)
        t = ref.timesteps[4:5].repeat(2)
        assert torch.allclose(ref.add_noise(x, noise, t), ours.add_noise(x, noise, t), atol=1e-6), name


# ----------------------------------------------------------------------------- errors


@pytest.fixture(scope="module")
def shapes_model(one_thread):
    """The shipped tiny trained model (weights/tiny-shapes, 64x64): nothing to build."""
    return load_pipeline(ROOT / "weights" / "tiny-shapes")


@pytest.mark.parametrize("kw, error, match", [
    (dict(image=np.zeros((60, 64, 3), np.float32)), ValueError, "64x60 pixels.*multiples of 8"),
    (dict(image=np.zeros((64, 4, 3), np.float32)), ValueError, "4x64 pixels.*multiples of 8"),
    (dict(strength=0.0), ValueError, r"strength must be a number in \(0, 1\]"),
    (dict(strength=1.5), ValueError, r"strength must be a number in \(0, 1\]"),
    (dict(strength=-0.2), ValueError, r"strength must be a number in \(0, 1\]"),
    (dict(strength=float("nan")), ValueError, r"strength must be a number in \(0, 1\]"),
    (dict(strength="0.5"), ValueError, r"strength must be a number in \(0, 1\]"),
    (dict(strength=True), ValueError, r"strength must be a number in \(0, 1\]"),
    (dict(strength=0.1, num_inference_steps=5), ValueError, r"int\(5 \* 0.1\) = 0 steps"),
    (dict(latents=torch.zeros(1, 4, 8, 8)), ValueError, "image= or latents=, not both"),
    (dict(height=128), ValueError, "height and width from the image"),
    (dict(image=np.zeros((3, 64, 64, 3), np.float32), num_images_per_prompt=2), ValueError, "3 images for 2 outputs"),
    (dict(image=np.full((64, 64, 3), 1.5, np.float32)), ValueError, r"must lie in \[0, 1\]"),
    (dict(image=np.full((64, 64, 3), np.nan, np.float32)), ValueError, r"must lie in \[0, 1\]"),
    (dict(image=np.zeros((64, 64, 3), np.int32)), TypeError, "uint8"),
    (dict(image=np.zeros((64, 64), np.float32)), ValueError, r"\(H, W, 3\)"),
    (dict(image=torch.zeros(1, 64, 64, 3)), ValueError, r"\(N, 3, H, W\)"),
    (dict(image=[np.zeros((64, 64, 3))]), TypeError, "numpy array, a torch tensor, a PIL image or a file path"),
    (dict(image="no/such/file.png"), FileNotFoundError, "no such file"),
    (dict(image=Path(__file__).parent), ValueError, "not a regular file"),
    (dict(image=__file__), ValueError, "not an image Pillow can read"),
    (dict(image=None, strength=0.5), ValueError, "strength is for img2img"),
])
def test_errors(shapes_model, kw, error, match):
    kw = {"image": np.zeros((64, 64, 3), np.float32), "num_inference_steps": 10, **kw}
    with pytest.raises(error, match=match):
        shapes_model(PROMPT, **kw)


def test_big_file_refused_before_decoding(shapes_model, tmp_path):
    Image.new("L", (8200, 8), 0).save(tmp_path / "wide.png")
    with pytest.raises(ValueError, match="8200x8 pixels; at most 8192"):
        shapes_model(PROMPT, image=tmp_path / "wide.png")


def test_path_without_pillow(shapes_model, tmp_path, monkeypatch):
    """Pillow is optional: without it a path is refused with what to do, and arrays still work."""
    Image.new("RGB", (64, 64)).save(tmp_path / "input.png")
    for name in [m for m in sys.modules if m == "PIL" or m.startswith("PIL.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "PIL", None)  # `import PIL` now raises ImportError
    with pytest.raises(ImportError, match=r"needs Pillow \(pip install pillow\); or pass the image as a numpy array"):
        shapes_model(PROMPT, image=tmp_path / "input.png")
    out = shapes_model(PROMPT, image=np.zeros((64, 64, 3), np.float32), num_inference_steps=2, strength=0.5)
    assert out.images.shape == (1, 64, 64, 3)


# ----------------------------------------------------------------------------- the trained shapes model


def test_gated_img2img_keeps_the_layout(shapes_model):
    pipe = shapes_model
    """On the tiny trained model (weights/tiny-shapes), a gated img2img at strength 0.5 with a new
    prompt draws the new prompt's colours and shape where the input's shape was; at strength 1.0
    (nothing of the input is kept) the same seeds put the shape elsewhere, so the check can fail."""
    source = shapes.render("red", "circle", "blue", cx=20, cy=42, r=13)  # off-centre: lower left

    def foreground(image):  # pixels not of the background colour, and their centroid (x, y)
        seen = shapes.describe(image)
        mask = shapes.nearest_color(np.clip(image * 255, 0, 255)) != shapes.NAMES.index(seen["background"])
        ys, xs = np.nonzero(mask)
        return mask, np.array([xs.mean(), ys.mean()]), seen

    source_mask, source_centre, _ = foreground(source / 255)
    prompt = "a yellow square on a green background"

    def run(strength):
        return pipe(prompt, image=source, strength=strength, num_inference_steps=20, num_images_per_prompt=4,
                    tgate=mini_tgate.TGate(gate_step=4, sp_interval=3, fi_interval=1, warm_up=1),
                    generator=[torch.Generator().manual_seed(s) for s in range(4)])

    out = run(0.5)
    assert [s["batch"] for s in out.steps] == [8] * 4 + [4] * 6  # 10 steps run, gated at the 4th
    for image in out.images:
        mask, centre, seen = foreground(image)
        assert (seen["background"], seen["color"]) == ("green", "yellow")
        assert np.linalg.norm(centre - source_centre) < 4  # where the input's shape was
        assert (mask & source_mask).sum() / (mask | source_mask).sum() > 0.4
    moved = [np.linalg.norm(foreground(image)[1] - source_centre) for image in run(1.0).images]
    assert max(moved) > 10


# ----------------------------------------------------------------------------- command line


def test_cli_image_and_strength(shapes_model, tmp_path, monkeypatch, capsys):
    """`examples/sample.py` (generate with a default prompt) `--image PATH --strength S` saves what the
    Python API makes from the same file and seed."""
    from mini_tgate.cli.generate import si

    pipe = shapes_model
    monkeypatch.chdir(tmp_path)
    Image.fromarray(shapes.render("red", "circle", "blue", cx=20, cy=42, r=13)).save("input.png")
    prompt = "a yellow square on a green background"
    monkeypatch.setattr(sys, "argv", ["sample.py", prompt, "--image", "input.png", "--strength", "0.5", "--steps", "8",
                                      "--seed", "3", "--out", "out.png"])
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(ROOT / "examples" / "sample.py"), run_name="__main__")
    assert exit.value.code == 0
    out, err = capsys.readouterr()
    assert "saved out.png" in out and "4/4" in err  # the last int(8 * 0.5) steps ran
    assert f"instead of {si(count_macs(pipe.unet.config, 64, 64, 4, 7.5, None)['denoiser_macs'])}" in out
    params = json.loads(read_png_text(tmp_path / "out.png")["mini_tgate"])
    assert params["strength"] == 0.5 and params["image"] == "input.png"
    want = pipe(prompt, image="input.png", strength=0.5, num_inference_steps=8, tgate=mini_tgate.TGate(),
                generator=[torch.Generator().manual_seed(3)]).images[0]
    got = np.asarray(Image.open(tmp_path / "out.png").convert("RGB"))
    assert np.abs(got.astype(int) - to_uint8(want)).max() <= 1


@pytest.mark.parametrize("args, message", [
    (["--strength", "0.5"], "--strength is for img2img: give --image too"),
    (["--image", "input.png", "--strength", "0"], "--strength 0.0: must be in (0, 1]"),
    (["--image", "input.png", "--strength", "1.5"], "--strength 1.5: must be in (0, 1]"),
    (["--image", "input.png", "--strength", "nan"], "--strength nan: must be in (0, 1]"),
    (["--image", "missing.png"], "image file missing.png: no such file"),
    (["--image", "odd.png"], "the image is 60x64 pixels; img2img needs"),
    (["--image", "input.png", "--height", "128"], "--height 128: img2img makes images of the --image's size (64x64)"),
])
def test_cli_img2img_errors_before_loading(args, message, tmp_path, monkeypatch, capsys):
    from mini_tgate.cli import main

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64)).save("input.png")
    Image.new("RGB", (60, 64)).save("odd.png")
    rc = main(["generate", "a cat", *args, "--model", "no/such/folder/here"])
    out, err = capsys.readouterr()
    assert rc == 1 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.png", "odd.png"]  # nothing written


def test_cli_image_without_pillow(tmp_path, monkeypatch, capsys):
    from mini_tgate.cli import main

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64)).save("input.png")
    for name in [m for m in sys.modules if m == "PIL" or m.startswith("PIL.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "PIL", None)  # `import PIL` now raises ImportError
    assert main(["generate", "a cat", "--image", "input.png", "--model", "no/such/folder/here"]) == 1
    out, err = capsys.readouterr()
    assert err == ("error: reading the image file input.png needs Pillow (pip install pillow); or pass the image "
                   "as a numpy array or torch tensor\n")


def test_pixart_has_no_img2img():
    """diffusers has no PixArt img2img pipeline to match, so image= is refused there, before any work."""
    from mini_tgate.core.config import VAEConfig

    transformer = mini_tgate.PixArtTransformer2DModel(mini_tgate.PixArtTransformerConfig(
        sample_size=8, num_attention_heads=2, attention_head_dim=8, num_layers=1, cross_attention_dim=16,
        caption_channels=32))
    vae = mini_tgate.AutoencoderKL(VAEConfig(block_out_channels=(8, 8), norm_num_groups=8, layers_per_block=1,
                                             down_block_types=("DownEncoderBlock2D",) * 2,
                                             up_block_types=("UpDecoderBlock2D",) * 2))
    pipe = mini_tgate.PixArtSigmaPipeline(transformer, vae, text_encoder=None, tokenizer=None,
                                          scheduler=mini_tgate.DPMSolverMultistepScheduler())
    with pytest.raises(ValueError, match="PixArtSigmaPipeline has no img2img"):
        pipe("a cat", image=np.zeros((16, 16, 3), np.float32))
