"""The command line as a person meets it (issue 25): --help says what TGATE is, that it is on and
how to turn it off; --num-images shows one progress bar over the whole run and the summary covers
it; --compare labels its panels and states the speed-up plainly, warning when the timed runs were
too noisy; PNGs carry A1111's RNG, Emphasis and Lora hashes; --emphasis/--no-emphasis. Nothing
here depends on timing or on how often a bar is redrawn: timings are set where a test reads them."""

import hashlib
import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image
from safetensors.torch import save_file

from mini_tgate.cli import compare, generate, main
from mini_tgate.cli.options import emphasis_option, takes_emphasis
from mini_tgate.formats.hub import lora_hash
from mini_tgate.formats.png import read_png_text

DEFAULT = ROOT / "weights" / "tiny-shapes"
PROMPT = "a red circle on a blue background"
pytestmark = pytest.mark.usefixtures("one_thread")


def run(*args, capsys):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def bars(err: str, total: int) -> list[str]:
    """What each bar whose total is `total` drew: tqdm draws a bar once at 0/total as it starts."""
    return err.split(f"| 0/{total} [")[1:]


# ----------------------------------------------------------------------------- --help

def test_help_says_what_tgate_is_and_how_to_turn_it_off(capsys):
    for args in (["--help"], ["generate", "--help"], ["batch", "--help"]):
        with pytest.raises(SystemExit):
            main(args)
        text = " ".join(capsys.readouterr().out.split())
        assert "TGATE" in text and "cross-attention" in text, args
        assert "on by default" in text.replace("ON by default", "on by default") and "--no-tgate" in text, args
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no-tgate turn TGATE off (it is on by default)" in text and "--emphasis, --no-emphasis" in text


# ----------------------------------------------------------------------------- one bar, one summary

def test_num_images_shows_one_bar_over_the_run_and_sums_it_up(tmp_path, capsys):
    rc, out, err = run("generate", PROMPT, "--num-images", 3, "--batch-size", 2, "--steps", 2, "--seed", 0,
                       "--out", tmp_path / "o/", capsys=capsys)
    assert rc == 0, err
    assert len(bars(err, 3 * 2)) == 1 and "| 6/6 [" in err  # 3 images x 2 steps, one bar
    assert bars(err, 2) == []  # no bar per call (the library's own are off)
    assert "done: 3 images in " in out and "2 pipeline calls: text " in out and "image-steps/s" in out
    text = read_png_text(tmp_path / "o" / "00002.png")["parameters"]
    assert ", RNG: CPU, " in text  # each image's noise comes from its own CPU generator


# ----------------------------------------------------------------------------- --compare

def test_compare_labels_its_panels(tmp_path, capsys):
    rc, out, err = run("generate", PROMPT, "--compare", "--steps", 2, "--seed", 0, "--out", tmp_path / "c.png",
                       capsys=capsys)
    assert rc == 0, err
    assert len(bars(err, (2 + 2 * 2) * 2)) == 1  # the saved pair and two timed pairs, under one bar
    image = np.asarray(Image.open(tmp_path / "c.png").convert("L")).astype(int)
    strip = image.shape[0] - 64
    assert image.shape[1] == 3 * 64 and strip > 0
    labels = [image[:strip, k * 64:(k + 1) * 64] for k in range(3)]
    assert all(label.max() == 255 and label.min() == 0 for label in labels)  # white text on black
    assert not np.array_equal(labels[0], labels[1]) and not np.array_equal(labels[1], labels[2])
    assert json.loads(read_png_text(tmp_path / "c.png")["mini_tgate"])["height"] == 64 + strip


def test_label_panels_draws_each_name_within_its_panel():
    picture = np.full((64, 3 * 64, 3), 128, np.uint8)
    out = compare.label_panels(picture, compare.LABELS)
    strip = out.shape[0] - 64
    assert np.array_equal(out[strip:], picture) and out.shape[1:] == picture.shape[1:]
    panels = [out[:strip, k * 64:(k + 1) * 64] for k in range(3)]
    assert all(p.max() == 255 and (p[:, -1] == 0).all() for p in panels)  # no text runs into the next panel
    big = compare.label_panels(np.zeros((1024, 3 * 1024, 3), np.uint8), compare.LABELS)
    assert big.shape[0] - 1024 == 4 * strip  # drawn larger on a larger image


def test_without_pillow_compare_says_its_panels_are_unlabelled(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(compare, "has_pillow", lambda: False)
    monkeypatch.setattr(generate, "has_pillow", lambda: False)
    rc, out, err = run("generate", PROMPT, "--compare", "--steps", 1, "--seed", 0, "--out", tmp_path / "c.png",
                       capsys=capsys)
    assert rc == 0, err
    assert err.startswith("note: Pillow is not installed, so --compare's panels are not labelled")
    assert np.asarray(Image.open(tmp_path / "c.png")).shape == (64, 3 * 64, 3)


def test_speedup_is_said_plainly_and_noise_is_flagged():
    line, noisy = compare.speedup([3.0, 3.05], [2.1, 2.12])
    assert line.startswith("TGATE: 1.43x faster (2.10 s vs 3.00 s of denoising; the best of 2 timed runs")
    assert noisy is None
    line, noisy = compare.speedup([0.05, 0.051], [0.064, 0.0641])
    assert line.startswith("TGATE: 1.28x slower (64 ms vs 50 ms")
    _, noisy = compare.speedup([3.0, 3.6], [2.0, 2.01])
    assert noisy.startswith("the timed runs were too noisy to trust the speed-up: without the gate 3.00 s, "
                            "3.60 s (20% apart); with it 2.00 s, 2.01 s (0% apart), more than 10% apart")
    assert "\n" not in noisy


def test_compare_warns_when_its_timed_runs_were_noisy(tmp_path, capsys, monkeypatch):
    """The denoising times of the timed runs, set: the saved pair's, then (no gate, TGATE) twice."""
    times = iter([1.0, 1.0, 3.0, 2.0, 3.6, 2.01])
    make = generate.Images.make

    def timed_make(self, tgate, batch):
        out = make(self, tgate, batch)
        out.timings["denoise"] = next(times)
        return out

    monkeypatch.setattr(generate.Images, "make", timed_make)
    rc, out, err = run("generate", PROMPT, "--compare", "--steps", 1, "--seed", 0, "--out", tmp_path / "c.png",
                       capsys=capsys)
    assert rc == 0, err
    assert "\nTGATE: 1.50x faster (2.00 s vs 3.00 s of denoising; the best of 2 timed runs of each" in out
    warning = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1 and "too noisy to trust the speed-up" in warning[0] and "3.60 s (20% apart)" in warning[0]


def test_print_compare_quiet_when_the_runs_agree(capsys):
    def out(seconds):
        return SimpleNamespace(timings={"text": 0.1, "denoise": seconds, "decode": 0.2})

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning
        generate.print_compare([(out(3.0), out(2.0)), (out(3.1), out(2.05))], 25)
    assert "TGATE: 1.50x faster (2.00 s vs 3.00 s" in capsys.readouterr().out


# ----------------------------------------------------------------------------- emphasis

def test_emphasis_is_for_sd_and_sdxl():
    other = SimpleNamespace(extra_call_args=("max_sequence_length",))  # PixArt-like: no emphasis
    assert emphasis_option(SimpleNamespace(emphasis=None), other) == {}  # the default: ignored
    assert emphasis_option(SimpleNamespace(emphasis=False), other) == {}
    with pytest.raises(ValueError, match="^--emphasis: SimpleNamespace has no A1111 prompt emphasis"):
        emphasis_option(SimpleNamespace(emphasis=True), other)


def test_no_emphasis_is_recorded_as_a1111_does(tmp_path, capsys):
    rc, _, err = run("generate", "a (red) circle on a blue background", "--no-emphasis", "--steps", 1,
                     "--out", tmp_path / "a.png", capsys=capsys)
    assert rc == 0, err
    assert ", Emphasis: None, " in read_png_text(tmp_path / "a.png")["parameters"]


def test_emphasis_on_by_default_for_sd(tmp_path, capsys, monkeypatch):
    from mini_tgate import load_pipeline
    pipe = load_pipeline(DEFAULT)
    if not takes_emphasis(pipe):
        pytest.skip("the pipeline has no emphasis= yet")
    seen = []
    call = type(pipe).__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("emphasis"))
        return call(self, *args, **kwargs)

    monkeypatch.setattr(type(pipe), "__call__", spy)
    for flag, want in ((), True), (("--no-emphasis",), False), (("--emphasis",), True):
        rc, _, err = run("generate", "a (red:1.2) circle", *flag, "--steps", 1, "--out", tmp_path / "e/",
                         capsys=capsys)
        assert rc == 0 and seen[-1] is want, err
    params = [read_png_text(p)["parameters"] for p in sorted((tmp_path / "e").iterdir())]
    assert ["Emphasis: None" in p for p in params] == [False, True, False]  # A1111 writes it when not "Original"


# ----------------------------------------------------------------------------- A1111's LoRA hash

def test_lora_hash_is_a1111s_addnet_hash(tmp_path):
    import torch
    tensors = {"a.lora_down.weight": torch.ones(2, 3), "a.lora_up.weight": torch.zeros(3, 2)}
    save_file(tensors, tmp_path / "x.safetensors", metadata={"ss_output_name": "x"})
    data = (tmp_path / "x.safetensors").read_bytes()
    want = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    assert lora_hash(tmp_path / "x.safetensors") == want
    save_file(tensors, tmp_path / "y.safetensors", metadata={"ss_output_name": "other name"})
    assert lora_hash(tmp_path / "y.safetensors") == want  # the metadata is not hashed
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "only.safetensors").write_bytes(data)
    assert lora_hash(tmp_path / "folder") == want  # a folder's one file, as --lora picks it
    save_file(tensors, tmp_path / "z.safetensors", metadata={"sshs_model_hash": "f" * 64})
    assert lora_hash(tmp_path / "z.safetensors") == "f" * 12  # A1111 takes kohya's hash from the metadata first
