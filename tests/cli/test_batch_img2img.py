"""img2img in `python -m mini_tgate batch`: --image for every line, or a JSONL "image" (and
"strength") per line. The images are checked against `generate --image` (itself checked against
diffusers in test_img2img.py) and against the pipeline called on a batch of two images; then the
refusals, before anything loads, and reruns under a changed image file."""

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

import mini_tgate
from mini_tgate.cli import main
from mini_tgate.formats.png import read_png_text, to_uint8

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "examples"))
import shapes  # noqa: E402

MODEL = ROOT / "weights" / "tiny-shapes"
PROMPTS = ["a yellow square on a green background", "a red circle on a blue background"]
OPTIONS = ["--steps", "4", "--gate-step", "2", "--sp-interval", "1", "--warm-up", "0", "--model", str(MODEL)]
pytestmark = pytest.mark.usefixtures("one_thread")


def pixels(path):
    return np.asarray(PILImage.open(path).convert("RGB"))


def params(path):
    return json.loads(read_png_text(path)["mini_tgate"])


def manifest(folder):
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def generate(tmp_path, prompt, image, seed, strength=None):
    """The image `generate --image` makes for one prompt and seed."""
    out = tmp_path / f"generate-{seed}.png"
    assert main(["generate", prompt, "--image", str(image), "--seed", str(seed), "--out", str(out), *OPTIONS,
                 *(["--strength", str(strength)] if strength is not None else [])]) == 0
    return pixels(out)


@pytest.fixture()
def files(tmp_path):
    """Two 64x64 starting images, a 128x128 one and a 60x64 one, beside the prompt files."""
    PILImage.fromarray(shapes.render("red", "circle", "blue", cx=20, cy=42, r=13)).save(tmp_path / "a.png")
    PILImage.fromarray(shapes.render("green", "square", "black", cx=40, cy=24, r=12)).save(tmp_path / "b.png")
    PILImage.new("RGB", (128, 128)).save(tmp_path / "big.png")
    PILImage.new("RGB", (60, 64)).save(tmp_path / "odd.png")
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    return tmp_path


def jsonl(folder, *entries, name="p.jsonl"):
    path = folder / name
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def test_image_option_makes_what_generate_makes(files, capsys):
    out = files / "out"
    assert main(["batch", str(files / "p.txt"), "--image", str(files / "a.png"), "--strength", "0.5", "--seed", "3",
                 "--out", str(out), *OPTIONS]) == 0
    for i, prompt in enumerate(PROMPTS):
        assert np.array_equal(pixels(out / f"{i:05d}.png"), generate(files, prompt, files / "a.png", 3 + i, 0.5))
        p = params(out / f"{i:05d}.png")
        assert p["image"] == "a.png" and p["strength"] == 0.5
        assert "Denoising strength: 0.5" in read_png_text(out / f"{i:05d}.png")["parameters"]
    records = manifest(out)
    assert records[0]["options"]["image"] == str((files / "a.png").resolve())
    assert records[0]["options"]["image_sha256"] == hashlib.sha256((files / "a.png").read_bytes()).hexdigest()
    # strength 0.5 of 4 steps runs the last 2
    gate = mini_tgate.TGate(2, 1, 1, 0)
    config = mini_tgate.load_pipeline(MODEL).unet.config
    assert records[0]["denoiser_macs"] == mini_tgate.count_macs(config, 64, 64, 2, 7.5, gate)["unet_macs"]

    # the same --image path holding other bytes: refused, before anything is made
    shutil.copy(files / "b.png", files / "a.png")
    capsys.readouterr()
    assert main(["batch", str(files / "p.txt"), "--image", str(files / "a.png"), "--strength", "0.5", "--seed", "3",
                 "--out", str(out), *OPTIONS]) == 1
    err = capsys.readouterr().err
    assert "holds images made with other options: --image-sha256" in err and err.count("\n") == 1, err


def test_per_line_images_make_what_generate_makes(files, capsys):
    # a.png relative to the prompt file's folder (not the working directory), b.png absolute
    prompts = jsonl(files, {"prompt": PROMPTS[0], "image": "a.png", "seed": 5},
                    {"prompt": PROMPTS[1], "image": str(files / "b.png"), "strength": 0.5, "seed": 9})
    out = files / "out"
    assert main(["batch", str(prompts), "--out", str(out), *OPTIONS]) == 0
    assert np.array_equal(pixels(out / "00000.png"), generate(files, PROMPTS[0], files / "a.png", 5))  # strength 0.8
    assert np.array_equal(pixels(out / "00001.png"), generate(files, PROMPTS[1], files / "b.png", 9, 0.5))
    assert [(params(out / f"0000{i}.png")["image"], params(out / f"0000{i}.png")["strength"]) for i in (0, 1)] == \
        [("a.png", 0.8), ("b.png", 0.5)]  # names only, never a local path
    records = manifest(out)
    assert [r["image_sha256"] for r in records] == [hashlib.sha256((files / n).read_bytes()).hexdigest()
                                                    for n in ("a.png", "b.png")]

    # a finished job: a changed image file under it, or another file named by the line, is refused
    capsys.readouterr()
    shutil.copy(files / "a.png", files / "saved.png")
    shutil.copy(files / "b.png", files / "a.png")
    assert main(["batch", str(prompts), "--out", str(out), *OPTIONS]) == 1
    assert "the image file" in (err := capsys.readouterr().err) and "a.png' of line 1 changed since" in err, err
    shutil.copy(files / "saved.png", files / "a.png")
    moved = jsonl(files, {"prompt": PROMPTS[0], "image": "saved.png", "seed": 5},
                  {"prompt": PROMPTS[1], "image": str(files / "b.png"), "strength": 0.5, "seed": 9}, name="moved.jsonl")
    assert main(["batch", str(moved), "--out", str(out), *OPTIONS]) == 1
    assert "line 1 of the prompt file changed since" in capsys.readouterr().err
    assert main(["batch", str(prompts), "--out", str(out), *OPTIONS]) == 0  # restored: nothing to do
    assert "0 made now, 2 there already" in capsys.readouterr().out


def test_a_batch_of_two_line_images_is_one_pipeline_call(files):
    """--batch-size 2: both lines' images go to the pipeline together, as one (2, 3, H, W) batch."""
    prompts = jsonl(files, {"prompt": PROMPTS[0], "image": "a.png"}, {"prompt": PROMPTS[1], "image": "b.png"})
    out = files / "out"
    assert main(["batch", str(prompts), "--out", str(out), "--batch-size", "2", "--seed", "4", *OPTIONS]) == 0
    pipe = mini_tgate.load_pipeline(MODEL)
    images = np.stack([pixels(files / "a.png"), pixels(files / "b.png")])
    want = pipe(PROMPTS, image=images, num_inference_steps=4, tgate=mini_tgate.TGate(2, 1, 1, 0),
                generator=[torch.Generator().manual_seed(s) for s in (4, 5)]).images
    for i in (0, 1):
        assert np.array_equal(pixels(out / f"0000{i}.png"), to_uint8(want[i]))
        assert params(out / f"0000{i}.png")["batch_size"] == 2


@pytest.mark.parametrize("entries, args, message", [
    (None, ["--image", "missing.png"], "image file missing.png: no such file"),
    (None, ["--image", "odd.png"], "the image is 60x64 pixels; img2img needs"),
    (None, ["--strength", "0.5"], "--strength is for img2img: give --image too"),
    (None, ["--image", "a.png", "--strength", "0.1"], "strength 0.1 of --steps 4 runs int(4 * 0.1) = 0 steps"),
    ([{"prompt": "x", "image": "a.png"}, {"prompt": "y"}], [], "line 1 has an \"image\" and line 2 has none"),
    ([{"prompt": "x"}, {"prompt": "y", "image": "a.png"}], [], "line 2 has an \"image\" and line 1 has none"),
    ([{"prompt": "x", "strength": 0.5}], [], "line 1: \"strength\" is for img2img"),
    ([{"prompt": "x", "image": "a.png"}, {"prompt": "y", "image": "nope.png"}], [],
     "line 2: cannot read the image file"),
    ([{"prompt": "x", "image": "."}], [], "line 1: the image file"),
    ([{"prompt": "x", "image": "p.txt"}], [], "line 1: cannot read the image file"),
    ([{"prompt": "x", "image": "odd.png"}], [], "line 1: the image"),
    ([{"prompt": "x", "image": "a.png"}], ["--height", "128"], "--height 128: line 1's image is 64x64"),
    ([{"prompt": "x", "image": "a.png"}, {"prompt": "y", "image": "big.png"}], ["--batch-size", "2"],
     "lines 1 (64x64, strength default) and 2 (128x128, strength default) fall in one batch of --batch-size 2"),
    ([{"prompt": "x", "image": "a.png"}, {"prompt": "y", "image": "b.png", "strength": 0.5}], ["--batch-size", "2"],
     "lines 1 (64x64, strength default) and 2 (64x64, strength 0.5) fall in one batch"),
    ([{"prompt": "x", "image": 5}], [], "line 1: \"image\" must be a file path"),
    ([{"prompt": "x", "image": "a.png", "strength": 1.5}], [], "line 1: \"strength\" must be a number in (0, 1]"),
    ([{"prompt": "x", "image": "a.png", "strength": True}], [], "line 1: \"strength\" must be a number in (0, 1]"),
])
def test_refused_before_loading(files, monkeypatch, capsys, entries, args, message):
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded")
    monkeypatch.setattr(mini_tgate.cli.batch, "load_from_options", fail)
    monkeypatch.chdir(files)
    prompts = files / "p.txt" if entries is None else jsonl(files, *entries)
    assert main(["batch", str(prompts), "--out", str(files / "out"), *args, *OPTIONS]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (files / "out").exists()


def test_mixed_sizes_run_with_batch_size_1(files):
    """Lines of other sizes and strengths are fine in batches of their own; --image fills the lines without one."""
    prompts = jsonl(files, {"prompt": PROMPTS[0]}, {"prompt": PROMPTS[1], "image": "big.png", "strength": 0.5})
    out = files / "out"
    assert main(["batch", str(prompts), "--image", str(files / "a.png"), "--out", str(out), "--seed", "2",
                 *OPTIONS]) == 0
    assert pixels(out / "00000.png").shape == (64, 64, 3) and pixels(out / "00001.png").shape == (128, 128, 3)
    assert np.array_equal(pixels(out / "00000.png"), generate(files, PROMPTS[0], files / "a.png", 2))
    assert params(out / "00000.png")["image"] == "a.png" and params(out / "00001.png")["image"] == "big.png"
