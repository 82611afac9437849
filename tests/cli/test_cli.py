"""The command line, run as a user runs it (a subprocess): `python -m mini_tgate generate / info`
and `python examples/sample.py` on the embedded checkpoint; the images are read back with Pillow
and compared with the Python API's. Bad input: exit code != 0, one line on stderr, no traceback,
nothing written."""

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from conftest import ROOT
from PIL import Image

from mini_tgate import DPMSolverMultistepScheduler, EulerDiscreteScheduler, TGate, load_pipeline
from mini_tgate.cli import main, save_numbered
from mini_tgate.formats.png import read_png_text, to_uint8
from mini_tgate.stable_diffusion.pipeline import StableDiffusionPipeline

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


def expected(pipe, prompt, steps, tgate=TGate(), seed=0, **kw):
    """What the Python API draws for `--seed seed` (image i: seed + i, its own CPU generator), as uint8."""
    n = len(prompt) if isinstance(prompt, list) else 1
    generators = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    out = pipe(prompt, num_inference_steps=steps, generator=generators, tgate=tgate, **kw)
    return [to_uint8(im) for im in out.images]


def in_process(*args, capsys):
    """`python -m mini_tgate ARGS` in this process (no interpreter start-up): (rc, stdout, stderr)."""
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def progress_bars(stderr, steps):
    """What each progress bar drew. tqdm draws a bar once as it starts (at 0/steps), then as often
    as the machine's speed makes it: never count the drawings."""
    return stderr.split(f"| 0/{steps} [")[1:]


def params_of(path):
    return json.loads(read_png_text(path)["mini_tgate"])


def unet_sha256_10():  # A1111's short model hash of the UNet weights, computed here independently
    return hashlib.sha256((DEFAULT / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()).hexdigest()[:10]


# ----------------------------------------------------------------------------- what works

def test_generate_writes_a_png_with_its_parameters(pipe, tmp_path):
    r = cli("generate", "a red cat", "--steps", 3, "--negative", "blurry", "--seed", 0, "--out", "cat.png",
            cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "saved cat.png" in r.stdout and "denoise" in r.stdout and "fewer" in r.stdout
    assert "3/3" in r.stderr  # the progress bar
    text = read_png_text(tmp_path / "cat.png")
    params = json.loads(text["mini_tgate"])
    assert params["prompt"] == "a red cat" and params["negative_prompt"] == "blurry"
    assert params["steps"] == 3 and params["seed"] == 0 and params["guidance_scale"] == 7.5
    assert params["tgate"] == {"gate_step": 10, "sp_interval": 5, "fi_interval": 1, "warm_up": 2}
    # A1111's habits: the model's name (not a local path), its short hash, the sampler's names
    assert params["model"] == "tiny-shapes" and params["model_hash"] == unet_sha256_10()
    assert params["sampler"] == "DDIM" and params["batch_size"] == 1 and params["batch_pos"] == 0
    assert params["width"] == params["height"] == 64
    assert text["parameters"].startswith("a red cat\nNegative prompt: blurry\nSteps: 3, Sampler: DDIM")
    assert Image.open(tmp_path / "cat.png").info["parameters"] == text["parameters"]  # Pillow reads it too
    want = expected(pipe, "a red cat", 3, negative_prompt="blurry")[0]
    assert same_image(pixels(tmp_path / "cat.png"), want)


def test_compare_saves_both_runs_and_their_difference(pipe, tmp_path):
    # TQDM_MININTERVAL=0: a bar redrawn at every step, as on a loaded machine; the count holds either way
    r = cli("generate", "a red cat", "--steps", 6, "--gate-step", 3, "--scheduler", "euler", "--compare",
            "--seed", 0, "--out", "cmp.png", cwd=tmp_path, env={"TQDM_MININTERVAL": "0"})
    assert r.returncode == 0, r.stderr
    assert "no gate:" in r.stdout and re.search(r"^TGATE: [\d.]+x (faster|slower) \(", r.stdout, re.M)
    # one bar for the whole run: the saved pair, then COMPARE_TIMED_RUNS (2) timed pairs after that warm-up
    bars = progress_bars(r.stderr, 6 * 6)
    assert "after a warm-up" in r.stdout and len(bars) == 1 and "| 36/36 [" in bars[0]
    image = pixels(tmp_path / "cmp.png")
    strip = image.shape[0] - 64  # the panels' labels, above them
    assert image.shape[1:] == (3 * 64, 3) and 8 <= strip <= 32
    params = params_of(tmp_path / "cmp.png")
    assert (params["width"], params["height"]) == (3 * 64, 64 + strip)  # the real size of the saved image
    pipe.scheduler, ddim = EulerDiscreteScheduler.from_config(pipe.scheduler.config), pipe.scheduler
    try:
        plain = expected(pipe, "a red cat", 6, tgate=None)[0]
        gated = expected(pipe, "a red cat", 6, tgate=TGate(3, 5, 1, 2))[0]
    finally:
        pipe.scheduler = ddim
    panels = image[strip:]
    assert same_image(panels[:, :64], plain) and same_image(panels[:, 64:128], gated)
    assert not np.array_equal(plain, gated) and panels[:, 128:].max() > 0


def test_several_images_numbered_files_and_a_grid(pipe, tmp_path):
    r = cli("generate", "a cat", "a dog", "--num-images", 2, "--steps", 2, "--no-tgate", "--seed", 5,
            "--batch-size", 3, "--out", "g.png", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    want = expected(pipe, ["a cat", "a cat", "a dog", "a dog"], 2, tgate=None, seed=5)
    for i in range(4):
        assert same_image(pixels(tmp_path / f"g-{i}.png"), want[i])
        params = params_of(tmp_path / f"g-{i}.png")
        assert params["prompt"] == ["a cat", "a dog"][i // 2] and params["seed"] == 5 + i
        assert (params["batch_size"], params["batch_pos"]) == ([3, 3, 3, 1][i], [0, 1, 2, 0][i])
    grid = pixels(tmp_path / "g.png")
    assert grid.shape == (128, 128, 3) and same_image(grid[64:, :64], want[2])
    assert (params_of(tmp_path / "g.png")["width"], params_of(tmp_path / "g.png")["height"]) == (128, 128)
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
    assert params["steps"] == 25 and params["model"] == "tiny-shapes"
    assert params["prompt"] == "a red circle on a blue background"
    # and it draws what it says: the shapes checker of examples/ finds the colours and the shape
    sys.path.insert(0, str(ROOT / "examples"))
    import shapes

    image = pixels(tmp_path / "out" / "00000.png") / 255.0
    assert shapes.adherence(image[None], [params["prompt"]])["all"] == 1.0


# ----------------------------------------------------------------------------- no lost files, seeds

def test_out_never_replaces_a_file_unless_overwrite(tmp_path, monkeypatch, capsys):
    """A named file, NAME-i.png and the grid NAME.png: checked before generating, never replaced."""
    monkeypatch.chdir(tmp_path)
    for name in ("a.png", "b-1.png", "c.png"):
        (tmp_path / name).write_bytes(b"keep")
    for out, n, taken in (("a.png", 1, "a.png"), ("b.png", 2, "b-1.png"), ("c.png", 2, "c.png")):
        rc, stdout, err = in_process("generate", "a cat", "--steps", 1, "--num-images", n, "--out", out, capsys=capsys)
        assert rc == 1 and err == f"error: --out {out}: {taken!r} exists; pass --overwrite to replace it, or name another file\n"
        assert "loaded" not in stdout  # refused before loading the model
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b-1.png", "c.png"]
    assert all((tmp_path / n).read_bytes() == b"keep" for n in ("a.png", "b-1.png", "c.png"))
    rc, _, err = in_process("generate", "a cat", "--steps", 1, "--out", "a.png", "--overwrite", capsys=capsys)
    assert rc == 0, err
    assert pixels(tmp_path / "a.png").shape == (64, 64, 3)


def test_numbered_files_follow_the_highest_number_of_any_width(tmp_path, monkeypatch, capsys):
    """`stem[:5]` read 99999x.png as 99999 and 123456.png as 12345: every later run then wrote
    100000.png over the previous one."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "99999x.png").write_bytes(b"keep 1")
    (tmp_path / "runs" / "123456.png").write_bytes(b"keep 2")
    for _ in range(2):
        rc, _, err = in_process("generate", "a cat", "--steps", 1, "--num-images", 2, "--out", "runs", capsys=capsys)
        assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == \
        ["123456.png", "123457.png", "123458.png", "123459.png", "123460.png", "99999x.png"]
    assert (tmp_path / "runs" / "99999x.png").read_bytes() == b"keep 1"
    assert (tmp_path / "runs" / "123456.png").read_bytes() == b"keep 2"


def test_two_runs_that_pick_the_same_number_both_keep_their_image(tmp_path):
    """Two runs into one folder scan it at the same time and both start at 00000: the file is
    claimed by creating it exclusively, so the second takes 00001 (and a file another process
    created meanwhile is skipped, not replaced)."""
    image = np.zeros((8, 8, 3), np.uint8)
    (tmp_path / "00000.png").write_bytes(b"another process")
    first, _ = save_numbered(tmp_path, image, {"run": "1"}, 0)
    second, _ = save_numbered(tmp_path, image + 255, {"run": "2"}, 0)
    assert (first.name, second.name) == ("00001.png", "00002.png")
    assert (tmp_path / "00000.png").read_bytes() == b"another process"
    assert read_png_text(first) == {"run": "1"} and read_png_text(second) == {"run": "2"}
    assert pixels(second).min() == 255


def test_random_seed_per_image_and_any_image_reproduced_alone(pipe, tmp_path, monkeypatch, capsys):
    """No --seed (or -1, A1111's "random"): a random seed, printed and recorded; image i gets
    seed + i with its own generator, so one image is remade alone from the seed in its PNG."""
    monkeypatch.chdir(tmp_path)
    rc, out, err = in_process("generate", "a cat", "--steps", 2, "--num-images", 3, "--out", "r.png", capsys=capsys)
    assert rc == 0, err
    seed = int(re.search(r"seed (\d+)", out)[1])
    assert [params_of(tmp_path / f"r-{i}.png")["seed"] for i in range(3)] == [seed, seed + 1, seed + 2]
    rc, _, err = in_process("generate", "a cat", "--steps", 2, "--seed", seed + 2, "--out", "alone.png", capsys=capsys)
    assert rc == 0, err
    assert np.array_equal(pixels(tmp_path / "alone.png"), pixels(tmp_path / "r-2.png"))
    assert same_image(pixels(tmp_path / "alone.png"), expected(pipe, "a cat", 2, seed=seed + 2)[0])
    rc, out, err = in_process("generate", "a cat", "--steps", 1, "--seed", -1, "--out", "again.png", capsys=capsys)
    assert rc == 0, err
    assert params_of(tmp_path / "again.png")["seed"] == int(re.search(r"seed (\d+)", out)[1]) != seed


def test_out_of_memory_is_one_line(tmp_path, monkeypatch, capsys):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.50 GiB.\nGPU 0 has 80 GiB")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(StableDiffusionPipeline, "__call__", out_of_memory)
    rc, _, err = in_process("generate", "a cat", "--steps", 1, "--out", "x.png", capsys=capsys)
    # the run's progress bar had started (at 0/1): one line besides it
    err = "".join(line + "\n" for line in err.splitlines() if line.strip() and not re.search(r"\| *\d+/\d+ \[", line))
    assert rc == 1 and len(err.splitlines()) == 1
    assert err.startswith("error: out of memory on this device: CUDA out of memory. Tried to allocate 12.50 GiB.")
    assert "--batch-size" in err and not (tmp_path / "x.png").exists()


def test_help_lists_the_scheduler_names(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for name in ("DPM++ 2M Karras", "Euler a", "DDIM", "LCM", "--overwrite", "--batch-size", "--revision"):
        assert name in text


def test_a1111_scheduler_names(pipe, tmp_path, monkeypatch, capsys):
    """`--scheduler "DPM++ 2M Karras"` (any case) is diffusers' DPMSolverMultistepScheduler with
    use_karras_sigmas, and the PNG says so as A1111 does."""
    monkeypatch.chdir(tmp_path)
    rc, _, err = in_process("generate", "a cat", "--steps", 3, "--seed", 1, "--scheduler", "dpm++ 2m KARRAS",
                            "--out", "k.png", capsys=capsys)
    assert rc == 0, err
    params = params_of(tmp_path / "k.png")
    assert (params["scheduler"], params["sampler"], params["schedule_type"]) == \
        ("DPMSolverMultistepScheduler", "DPM++ 2M", "Karras")
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in read_png_text(tmp_path / "k.png")["parameters"]
    pipe.scheduler, ddim = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True), \
        pipe.scheduler
    try:
        want = expected(pipe, "a cat", 3, seed=1)[0]
    finally:
        pipe.scheduler = ddim
    assert same_image(pixels(tmp_path / "k.png"), want)


def test_revision_picks_the_snapshot_and_is_recorded(tmp_path):
    """A hub repo cached at two commits (offline): --revision loads the one named, and the PNG
    records the repo id and that commit, not a local path."""
    repo = tmp_path / "cache" / "models--org--tiny"
    main_commit, other_commit = "a" * 40, "b" * 40
    for commit in (main_commit, other_commit):
        shutil.copytree(DEFAULT, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(main_commit)
    (tmp_path / "cwd").mkdir()
    r = cli("generate", "a cat", "--steps", 1, "--model", "org/tiny", "--revision", other_commit, "--out", "x.png",
            cwd=tmp_path / "cwd", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    params = params_of(tmp_path / "cwd" / "x.png")
    assert (params["model"], params["model_revision"]) == ("org/tiny", other_commit)


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
    "bad option value": (["--steps", "many"], "invalid int value: 'many'"),
    # bytes that are not UTF-8 in argv arrive as lone surrogates: refused before loading
    "non-UTF-8 prompt": ([os.fsdecode(b"a \xff dog"), "--model", "no/such/folder/here"],
                         "the prompt 'a '... is not UTF-8 text (byte 0xff at character 2)"),
}
ENVIRONMENTS = {  # name: (arguments, environment, what the error says)
    # torch.compile on the CPU builds C++ at the first call (after loading): no compiler, one line
    "compile without a C++ compiler": (["--compile", "--device", "cpu", "--steps", 1],
                                       {"CXX": "/nonexistent"}, "needs a working C++ compiler"),
}
EARLY = {  # name: (arguments after `generate "a cat" --model no/such/folder/here`, what the error says)
    # all refused before the model loads (else the error would be the missing folder), so before
    # anything is allocated: the bounds are in the messages
    "height not a multiple of 8": (["--height", 100], "--height 100: must be a multiple of 8 from 8 to 4096"),
    "height 0 is not the default": (["--height", 0], "--height 0: must be a multiple of 8"),
    "size too small": (["--width", 4], "--width 4: must be a multiple of 8"),
    "size too large": (["--height", 100000, "--width", 100000], "--height 100000: must be a multiple of 8 from 8 to 4096"),
    "no steps": (["--steps", 0], "--steps 0: must be from 1 to 1000"),
    "too many steps": (["--steps", 200000000], "--steps 200000000: must be from 1 to 1000"),
    "too many images": (["--num-images", 100000000], "--num-images 100000000: from 1 to 1000 for 1 prompt(s)"),
    "no images": (["--num-images", 0], "--num-images 0: from 1 to 1000"),
    "batch size 0": (["--batch-size", 0], "--batch-size 0: must be from 1 to 64"),
    "batch size huge": (["--batch-size", 10**6], "--batch-size 1000000: must be from 1 to 64"),
    "seed past 2**63": (["--seed", 2**63], "must be -1 (random) or from 0 to 2**63 - 1"),
    "seed -2": (["--seed", -2], "--seed -2: must be -1 (random)"),
    "guidance nan": (["--guidance-scale", "nan"], "--guidance-scale must be a finite number, got nan"),
    "guidance inf": (["--guidance-scale", "inf"], "finite number, got inf"),
    "gate step 0": (["--gate-step", 0], "gate_step must be an integer >= 1"),
    "sp interval 0": (["--sp-interval", 0], "sp_interval must be an integer >= 1"),
    "warm-up -1": (["--warm-up", -1], "warm_up must be an integer >= 0"),
    "more negatives than prompts": (["a dog", "--negative", "x", "--negative", "y", "--negative", "z"],
                                    "3 negative prompts for 2 prompts"),
    "output folder missing": (["--out", "/nonexistent/x.png"], "'/nonexistent' does not exist"),
    "output not png": (["--out", "x.jpg"], "name a .png file"),
    "compare without gate": (["--compare", "--no-tgate"], "drop --no-tgate"),
    "unknown scheduler": (["--scheduler", "Heun++"], "--scheduler 'Heun++': not one of"),
    "device mps": (["--device", "mps"], "--device mps: supported devices are cpu, cuda and cuda:N"),
    "device xpu": (["--device", "xpu"], "--device xpu: supported devices are cpu, cuda and cuda:N"),
    "device meta": (["--device", "meta"], "--device meta: supported devices are cpu, cuda and cuda:N"),
    "device gibberish": (["--device", "gpu0"], "--device gpu0: supported devices are cpu, cuda and cuda:N"),
    "device cpu:5": (["--device", "cpu:5"], "--device cpu:5: the CPU is one device, cpu (or cpu:0)"),
    "device cuda:99": (["--device", "cuda:99"], "--device cuda:99: "),  # no CUDA here, or not 100 devices
    "lora scale 1e30": (["--lora", "x.safetensors:1e30"], "the scale must be a finite number from -100 to 100"),
    "lora tag 1e30": (["a dog <lora:x:1e30>"], "<lora:x:1e30>: the multiplier must be a finite number from -100"),
}


@pytest.mark.parametrize("case", EARLY)
def test_refused_before_loading_in_one_line(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args, message = EARLY[case]
    rc, out, err = in_process("generate", "a cat", *args, "--model", "no/such/folder/here", capsys=capsys)
    assert rc == 1 and out == ""
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and message in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """Every bad-input case, run four at a time (each is mostly Python and torch starting up)."""
    tmp = tmp_path_factory.mktemp("bad")
    cases = {}
    for name, (edit, message) in CHECKPOINTS.items():
        cases[name] = (["generate", "a cat", "--model", broken(tmp, name, edit)], message)
    for name, (args, message) in ARGUMENTS.items():
        cases[name] = (["generate", "a cat", *args], message)
    envs = {}
    for name, (args, env, message) in ENVIRONMENTS.items():
        cases[name] = (["generate", "a cat", *args], message)
        envs[name] = {**env, "TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor-cache")}  # no kernels built before
    cases["info: not a png"] = (["info", DEFAULT / "model_index.json"], "is not a PNG file")
    cases["info: no file"] = (["info", "missing.png"], "No such file")
    if not torch.cuda.is_available():
        cases["no cuda"] = (["generate", "a cat", "--device", "cuda"], "CUDA is not available")
    (tmp / "empty-cache").mkdir()
    offline = {"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp / "empty-cache")}

    def run(name):
        cwd = tmp / f"cwd-{name}"
        cwd.mkdir()
        return name, (cli(*cases[name][0], cwd=cwd, env={**offline, **envs.get(name, {})}), cases[name][1], cwd)

    with ThreadPoolExecutor(4) as pool:
        return dict(pool.map(run, cases))


CASES = list(CHECKPOINTS) + list(ARGUMENTS) + list(ENVIRONMENTS) + ["info: not a png", "info: no file", "no cuda"]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_ends_in_one_line_on_stderr(bad_runs, case):
    if case not in bad_runs:
        pytest.skip("CUDA is available here")
    r, message, cwd = bad_runs[case]
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    stderr = r.stderr
    if case in ENVIRONMENTS:  # these fail while generating: the progress bar had started (drawn as
        # "| 1/2 [00:00<00:00, 9.5step/s]", or "s/step]" on a slow machine: match its count, not its speed)
        stderr = "".join(line + "\n" for line in r.stderr.splitlines()
                         if line.strip() and not re.search(r"\| *\d+/\d+ \[", line))
    assert len(stderr.splitlines()) == 1 and stderr.startswith("error: "), r.stderr
    assert message in stderr
    assert list(cwd.iterdir()) == []  # nothing written (the default output folder is out/)
