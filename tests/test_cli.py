"""The command line, run as a user runs it (a subprocess): `python -m mini_tgate generate / info`
and `python examples/sample.py` on the embedded checkpoint; the images are read back with Pillow
and compared with the Python API's. Bad input: exit code != 0, one line on stderr, no traceback,
nothing written."""

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from mini_tgate import EulerDiscreteScheduler, TGate, load_pipeline
from mini_tgate.png import read_png_text, to_uint8

DEFAULT = ROOT / "weights" / "tiny-shapes"  # the default of both commands, 64x64
pytestmark = pytest.mark.usefixtures("one_thread")


def cli(*args, cwd, env=None, script=None):
    command = [sys.executable, str(script)] if script else [sys.executable, "-m", "mini_tgate"]
    # one thread: these models are tiny, and on a busy machine idle OpenMP threads waiting for each
    # other can make a step 100x slower
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(command + [str(a) for a in args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def same_image(a, b):  # uint8 images; one level apart at most (float sums in another order round otherwise)
    return a.shape == b.shape and np.abs(a.astype(int) - b).max() <= 1


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(DEFAULT)


def expected(pipe, prompt, steps, tgate=TGate(), **kw):
    """What the Python API draws for the CLI's defaults (seed 0, CPU generator), as uint8."""
    out = pipe(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), tgate=tgate, **kw)
    return [to_uint8(im) for im in out.images]


# ----------------------------------------------------------------------------- what works

def test_generate_writes_a_png_with_its_parameters(pipe, tmp_path):
    r = cli("generate", "a red cat", "--steps", 3, "--negative", "blurry", "--out", "cat.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "saved cat.png" in r.stdout and "denoise" in r.stdout and "fewer" in r.stdout
    assert "3/3" in r.stderr  # the progress bar
    text = read_png_text(tmp_path / "cat.png")
    params = json.loads(text["mini_tgate"])
    assert params["prompt"] == "a red cat" and params["negative_prompt"] == "blurry"
    assert params["steps"] == 3 and params["seed"] == 0 and params["guidance_scale"] == 7.5
    assert params["tgate"] == {"gate_step": 10, "sp_interval": 5, "fi_interval": 1, "warm_up": 2}
    assert text["parameters"].startswith("a red cat\nNegative prompt: blurry\nSteps: 3, Sampler: DDIM")
    assert Image.open(tmp_path / "cat.png").info["parameters"] == text["parameters"]  # Pillow reads it too
    want = expected(pipe, "a red cat", 3, negative_prompt="blurry")[0]
    assert same_image(pixels(tmp_path / "cat.png"), want)


def test_compare_saves_both_runs_and_their_difference(pipe, tmp_path):
    r = cli("generate", "a red cat", "--steps", 6, "--gate-step", 3, "--scheduler", "euler", "--compare",
            "--out", "cmp.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "no gate:" in r.stdout and "TGATE:" in r.stdout
    image = pixels(tmp_path / "cmp.png")
    assert image.shape == (64, 3 * 64, 3)
    pipe.scheduler, ddim = EulerDiscreteScheduler.from_config(pipe.scheduler.config), pipe.scheduler
    try:
        plain = expected(pipe, "a red cat", 6, tgate=None)[0]
        gated = expected(pipe, "a red cat", 6, tgate=TGate(3, 5, 1, 2))[0]
    finally:
        pipe.scheduler = ddim
    assert same_image(image[:, :64], plain) and same_image(image[:, 64:128], gated)
    assert not np.array_equal(plain, gated) and image[:, 128:].max() > 0


def test_several_images_numbered_files_and_a_grid(pipe, tmp_path):
    r = cli("generate", "a cat", "a dog", "--num-images", 2, "--steps", 2, "--no-tgate", "--out", "g.png",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want = expected(pipe, ["a cat", "a dog"], 2, tgate=None, num_images_per_prompt=2)
    for i in range(4):
        assert same_image(pixels(tmp_path / f"g-{i}.png"), want[i])
        assert json.loads(read_png_text(tmp_path / f"g-{i}.png")["mini_tgate"])["prompt"] == ["a cat", "a dog"][i // 2]
    grid = pixels(tmp_path / "g.png")
    assert grid.shape == (128, 128, 3) and same_image(grid[64:, :64], want[2])
    # a folder (created) gets numbered files, after the ones already there
    for _ in range(2):
        assert cli("generate", "a cat", "--steps", 1, "--out", "runs/new/", cwd=tmp_path).returncode == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "new").iterdir()) == ["00000.png", "00001.png"]


def test_info_describes_a_png(tmp_path):
    assert cli("generate", "a blue bird", "--steps", 1, "--seed", 7, "--out", "b.png", cwd=tmp_path).returncode == 0
    r = cli("info", "b.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("b.png: 64x64 (width x height), RGB, 8-bit")
    assert "  prompt: a blue bird" in r.stdout and "  seed: 7" in r.stdout


def test_sample_py_with_no_arguments(tmp_path):
    """The README's main command: the embedded model, a default prompt, 25 steps, in seconds."""
    r = cli(cwd=tmp_path, script=ROOT / "examples" / "sample.py")
    assert r.returncode == 0, r.stderr
    assert "25/25" in r.stderr and "saved out/00000.png" in r.stdout
    params = json.loads(read_png_text(tmp_path / "out" / "00000.png")["mini_tgate"])
    assert params["steps"] == 25 and params["model"] == str(DEFAULT)
    assert params["prompt"] == "a red circle on a blue background"
    # and it draws what it says: the shapes checker of examples/ finds the colours and the shape
    sys.path.insert(0, str(ROOT / "examples"))
    import shapes

    image = pixels(tmp_path / "out" / "00000.png") / 255.0
    assert shapes.adherence(image[None], [params["prompt"]])["all"] == 1.0


# ----------------------------------------------------------------------------- bad input

def broken(tmp, name, edit):
    """A copy of the embedded checkpoint, damaged by edit(folder)."""
    folder = shutil.copytree(DEFAULT, tmp / name)
    edit(folder)
    return folder


def truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


def set_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def pickle_only(folder):
    (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (folder / "unet" / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04K\x01.")  # pickle.dumps(1)


CHECKPOINTS = {  # name: (how to break the checkpoint, what the error says)
    "unsupported pipeline": (lambda f: set_json(f / "model_index.json", _class_name="KandinskyPipeline"),
                             "'KandinskyPipeline' is not supported"),
    "missing component": (lambda f: shutil.rmtree(f / "vae"), "vae: missing component folder"),
    "missing config": (lambda f: (f / "unet" / "config.json").unlink(), "config.json: missing"),
    "truncated weights": (lambda f: truncate(f / "unet" / "diffusion_pytorch_model.safetensors"),
                          "not a readable safetensors file"),
    "shape mismatch": (lambda f: set_json(f / "unet" / "config.json", cross_attention_dim=48), "shape mismatches"),
    "pickle only": (pickle_only, "only pickle-based weights"),
    "unsupported config": (lambda f: set_json(f / "unet" / "config.json", attention_type="gated"),
                           "attention_type='gated' is not supported"),
}
ARGUMENTS = {  # name: (arguments after `generate "a cat"`, what the error says)
    "missing folder": (["--model", "no/such/folder/here"], "no such folder"),
    "not in the hub cache": (["--model", "org/not-cached"], "not in the local hub cache"),
    "height not a multiple of 8": (["--height", 100], "multiples of 8, got 100x64"),
    "size too small": (["--width", 4], "multiples of 8"),
    "no steps": (["--steps", 0], "num_inference_steps must be an integer >= 1"),
    "guidance nan": (["--guidance-scale", "nan"], "guidance_scale must be a finite number, got nan"),
    "guidance inf": (["--guidance-scale", "inf"], "finite number, got inf"),
    "gate step 0": (["--gate-step", 0], "gate_step must be an integer >= 1"),
    "sp interval 0": (["--sp-interval", 0], "sp_interval must be an integer >= 1"),
    "warm-up -1": (["--warm-up", -1], "warm_up must be an integer >= 0"),
    "more negatives than prompts": (["a dog", "--negative", "x", "--negative", "y", "--negative", "z"],
                                    "3 negative prompts for 2 prompts"),
    "output folder missing": (["--out", "/nonexistent/x.png"], "'/nonexistent' does not exist"),
    "output not png": (["--out", "x.jpg"], "name a .png file"),
    "compare without gate": (["--compare", "--no-tgate"], "drop --no-tgate"),
    "bad option value": (["--steps", "many"], "invalid int value: 'many'"),
}


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad-input case, run four at a time (each is mostly Python and torch starting up)."""
    tmp = tmp_path_factory.mktemp("bad")
    cases = {}
    for name, (edit, message) in CHECKPOINTS.items():
        cases[name] = (["generate", "a cat", "--model", broken(tmp, name, edit)], message)
    for name, (args, message) in ARGUMENTS.items():
        cases[name] = (["generate", "a cat", *args], message)
    cases["info: not a png"] = (["info", DEFAULT / "model_index.json"], "is not a PNG file")
    cases["info: no file"] = (["info", "missing.png"], "No such file")
    if not torch.cuda.is_available():
        cases["no cuda"] = (["generate", "a cat", "--device", "cuda"], "CUDA is not available")
    (tmp / "empty-cache").mkdir()
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp / "empty-cache")}

    def run(name):
        cwd = tmp / f"cwd-{name}"
        cwd.mkdir()
        return name, (cli(*cases[name][0], cwd=cwd, env=offline), cases[name][1], cwd)

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(run, cases))


CASES = list(CHECKPOINTS) + list(ARGUMENTS) + ["info: not a png", "info: no file", "no cuda"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_in_one_line_on_stderr(bad_runs, case):
    if case not in bad_runs:
        pytest.skip("CUDA is available here")
    r, message, cwd = bad_runs[case]
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("error: "), r.stderr
    assert message in r.stderr
    assert list(cwd.iterdir()) == []  # nothing written (the default output folder is out/)
