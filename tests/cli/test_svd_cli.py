"""`generate` with a Stable Video Diffusion checkpoint (a tiny random one saved by diffusers, as in
tests/svd/test_svd_pipeline.py): --image to an animated PNG or to --frames-dir, read back with
Pillow and compared with the Python API's frames; bad input refused in one line before loading."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image
from test_svd_pipeline import folder  # noqa: F401 (the tiny SVD checkpoint diffusers saves, one per module)

import mini_tgate.cli.options
from mini_tgate import TGate, load_pipeline
from mini_tgate.cli import main
from mini_tgate.formats.png import read_png_text, to_uint8

pytestmark = pytest.mark.usefixtures("one_thread")

H, W = 16, 24


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    path = tmp_path_factory.mktemp("input") / "in.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(path)
    return path  # not 16x24: the pipeline resizes it


@pytest.fixture(scope="module")
def ours(folder):
    return load_pipeline(folder)


def run(*args, capsys):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def expected(pipe, image, seed, tgate=None, **kw):
    out = pipe(str(image), generator=torch.Generator().manual_seed(seed), tgate=tgate, output_type="np", progress=False,
               **kw)
    return [to_uint8(f) for f in out.frames[0]]


def apng_frames(path):
    with Image.open(path) as im:
        n, duration = im.n_frames, im.info.get("duration")
        frames = []
        for i in range(n):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
    return frames, duration


OPTIONS = ["--frames", 3, "--steps", 3, "--seed", 5, "--fps", 4, "--height", H, "--width", W,
           "--motion-bucket-id", 60, "--noise-aug-strength", 0.05, "--decode-chunk-size", 2,
           "--min-guidance-scale", 1.5, "--max-guidance-scale", 2.5]
CALL = dict(num_frames=3, num_inference_steps=3, fps=4, height=H, width=W, motion_bucket_id=60, noise_aug_strength=0.05,
            decode_chunk_size=2, min_guidance_scale=1.5, max_guidance_scale=2.5)
GATE = ["--gate-step", 2, "--sp-interval", 1, "--fi-interval", 1, "--warm-up", 0]


def test_apng_equals_the_pipelines_frames(folder, image, ours, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    rc, out, err = run("generate", "--model", folder, "--image", image, *OPTIONS, *GATE, "--out", "clip.png",
                       capsys=capsys)
    assert rc == 0, err
    assert "saved clip.png (3 frames, 4 fps)" in out and "MACs per video" in out
    frames, duration = apng_frames(tmp_path / "clip.png")
    want = expected(ours, image, 5, TGate(2, 1, 1, 0), **CALL)
    assert len(frames) == 3 and duration == 250  # ms: 1/4 s
    for got, w in zip(frames, want):
        assert got.shape == (H, W, 3) and np.array_equal(got, w)
    assert not np.array_equal(frames[0], frames[-1])
    text = read_png_text(tmp_path / "clip.png")
    p = json.loads(text["mini_tgate"])
    assert p["seed"] == 5 and p["steps"] == 3 and p["frames"] == 3 and p["fps"] == 4
    assert p["model"] == folder.name and p["image"] == "in.png" and p["width"] == W and p["height"] == H
    assert p["tgate"] == {"gate_step": 2, "sp_interval": 1, "fi_interval": 1, "warm_up": 0}
    assert p["motion_bucket_id"] == 60 and p["noise_aug_strength"] == 0.05 and p["decode_chunk_size"] == 2
    assert p["min_guidance_scale"] == 1.5 and p["max_guidance_scale"] == 2.5
    assert "Steps: 3" in text["parameters"] and "Seed: 5" in text["parameters"]
    assert "TGATE gate step: 2" in text["parameters"] and f"Size: {W}x{H}" in text["parameters"]


def test_frames_dir_and_defaults(folder, image, ours, tmp_path, monkeypatch, capsys):
    """--frames-dir: one PNG per frame; with the pipeline's defaults (frames: the UNet's 3; sizes:
    its sample size x 2; guidance 1 to 3; fps 7, bucket 127, noise 0.02) and no gate."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = run("generate", "--model", folder, "--image", image, "--steps", 2, "--seed", 1, "--no-tgate",
                       "--frames-dir", "frames", capsys=capsys)
    assert rc == 0, err
    files = sorted(p.name for p in (tmp_path / "frames").iterdir())
    assert files == ["00000.png", "00001.png", "00002.png"]
    want = expected(ours, image, 1, num_inference_steps=2, height=None, width=None)
    for name, w in zip(files, want):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "frames" / name).convert("RGB")), w)
    p = json.loads(read_png_text(tmp_path / "frames" / "00001.png")["mini_tgate"])
    assert p["frame"] == 1 and p["fps"] == 7 and p["frames"] == 3 and p["tgate"] is None and p["seed"] == 1
    assert list(tmp_path.iterdir()) == [tmp_path / "frames"]  # no APNG besides
    # the folder's frames are not replaced without --overwrite
    before = (tmp_path / "frames" / "00000.png").read_bytes()
    rc, out, err = run("generate", "--model", folder, "--image", image, "--steps", 1, "--frames-dir", "frames",
                       capsys=capsys)
    assert rc == 1 and len(err.splitlines()) == 1 and "holds 00000.png already; pass --overwrite" in err
    assert (tmp_path / "frames" / "00000.png").read_bytes() == before


def test_existing_out_is_kept_without_overwrite(folder, image, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "clip.png").write_bytes(b"mine")
    args = ["generate", "--model", folder, "--image", image, "--frames", 2, "--steps", 1, "--seed", 0,
            "--out", "clip.png"]
    rc, out, err = run(*args, capsys=capsys)
    assert rc == 1 and out == "" and len(err.splitlines()) == 1
    assert "'clip.png' exists; pass --overwrite" in err
    assert (tmp_path / "clip.png").read_bytes() == b"mine"
    rc, out, err = run(*args, "--overwrite", capsys=capsys)
    assert rc == 0, err
    assert apng_frames(tmp_path / "clip.png")[0][0].shape == (16, 16, 3)  # the UNet's sample size x 2
    # into a folder (the default out/): numbered, never replacing
    for expected_name in ("00000.png", "00001.png"):
        rc, out, err = run(*args[:-2], capsys=capsys)
        assert rc == 0 and f"saved out/{expected_name}" in out, err
    assert len(apng_frames(tmp_path / "out" / "00001.png")[0]) == 2


EARLY = {  # arguments after `generate --model SVD_FOLDER`, what the one-line error says
    "missing --image": ([], "give the input image with --image PATH"),
    "a prompt": (["a cat", "--image", "IMAGE"], "takes no prompt"),
    "image file missing": (["--image", "nope.png"], "nope.png"),
    "frames 0": (["--image", "IMAGE", "--frames", 0], "--frames 0: must be from 1 to 256"),
    "fps 0": (["--image", "IMAGE", "--fps", 0], "--fps 0: must be from 1 to 65535"),
    "motion bucket -1": (["--image", "IMAGE", "--motion-bucket-id", -1], "--motion-bucket-id -1: must be from 0"),
    "noise nan": (["--image", "IMAGE", "--noise-aug-strength", "nan"], "--noise-aug-strength nan"),
    "chunk 0": (["--image", "IMAGE", "--decode-chunk-size", 0], "--decode-chunk-size 0: must be from 1"),
    "guidance inf": (["--image", "IMAGE", "--min-guidance-scale", "inf"], "--min-guidance-scale must be a finite"),
    "guidance twice": (["--image", "IMAGE", "--guidance-scale", 2, "--max-guidance-scale", 3], "give one"),
    "deepcache": (["--image", "IMAGE", "--deepcache-interval", 2], "DeepCache has no form for SVD"),
    "num images": (["--image", "IMAGE", "--num-images", 2], "--num-images 2: an image-to-video run makes one video"),
    "lora": (["--image", "IMAGE", "--lora", "x.safetensors"], "--lora: text-to-image only"),
    "scheduler": (["--image", "IMAGE", "--scheduler", "Euler"], "--scheduler: text-to-image only"),
    "compare": (["--image", "IMAGE", "--compare"], "--compare: text-to-image only"),
    "strength": (["--image", "IMAGE", "--strength", 0.5], "--strength: text-to-image only"),
    "height": (["--image", "IMAGE", "--height", 100], "--height 100: must be a multiple of 8"),
    "steps": (["--image", "IMAGE", "--steps", 0], "--steps 0: must be from 1 to 1000"),
    "gate step 0": (["--image", "IMAGE", "--gate-step", 0], "gate_step must be an integer >= 1"),
    "out not png": (["--image", "IMAGE", "--out", "x.gif"], "name a .png file"),
    "out and frames dir": (["--image", "IMAGE", "--out", "x.png", "--frames-dir", "d"], "drop --out"),
    "device": (["--image", "IMAGE", "--device", "mps"], "--device mps: supported devices"),
}


@pytest.mark.parametrize("case", EARLY)
def test_refused_before_loading_in_one_line(case, folder, image, tmp_path, monkeypatch, capsys):
    def no_loading(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(mini_tgate.cli.options, "load_pipeline", no_loading)
    monkeypatch.chdir(tmp_path)
    args, message = EARLY[case]
    args = [image if a == "IMAGE" else a for a in args]
    rc, out, err = run("generate", "--model", folder, *args, capsys=capsys)
    assert rc == 1 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert list(tmp_path.iterdir()) == []


def test_text_to_image_models_refuse_video_options(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    default = ROOT / "weights" / "tiny-shapes"
    rc, out, err = run("generate", "a cat", "--model", default, "--frames", 3, capsys=capsys)
    assert rc == 1 and len(err.splitlines()) == 1 and "--frames: for image-to-video models" in err
    rc, out, err = run("generate", "--model", default, capsys=capsys)  # a prompt is still required
    assert rc == 1 and len(err.splitlines()) == 1 and "required: prompt" in err
    assert list(tmp_path.iterdir()) == []


def test_bad_option_value_as_a_user_sees_it(folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for args, message in ((["--image", "in.png", "--frames", "many"], "invalid int value: 'many'"),
                          ([], "give the input image with --image PATH")):
        r = subprocess.run([sys.executable, "-m", "mini_tgate", "generate", "--model", str(folder), *args],
                           cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode != 0 and "Traceback" not in r.stderr
        assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: ") and message in r.stderr
    assert list(tmp_path.iterdir()) == []
