"""The command line against careless input, second pass (issue 24): img2img's strength checked
before loading, a broken --image named, a note before a run far beyond the model's trained size,
an invalid gate record shown as such by `info`."""

import json

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from mini_tgate.cli import generate, main
from mini_tgate.formats.png import save_png

DEFAULT = ROOT / "weights" / "tiny-shapes"  # 64x64
pytestmark = pytest.mark.usefixtures("one_thread")


def run(*args, capsys):
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def black(path, side):
    Image.new("RGB", (side, side)).save(path)
    return path


def test_a_strength_that_runs_no_step_is_refused_before_loading(tmp_path, capsys):
    image = black(tmp_path / "in.png", 64)
    rc, out, err = run("generate", "a cat", "--image", image, "--strength", 0.1, "--steps", 4,
                       "--model", "no/such/folder/here", capsys=capsys)
    assert rc == 1 and err.count("\n") == 1
    assert "--strength 0.1 of --steps 4 runs int(4 * 0.1) = 0 steps" in err, err


def test_a_truncated_image_is_named(tmp_path, capsys):
    image = tmp_path / "cut.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(image)
    image.write_bytes(image.read_bytes()[:2000])
    rc, out, err = run("generate", "a cat", "--image", image, "--model", "no/such/folder/here", capsys=capsys)
    assert rc == 1 and err.startswith("error: ") and err.count("\n") == 1
    assert str(image) in err and "truncated" in err, err


@pytest.mark.parametrize("side, note", [(128, False), (512, True)])
def test_a_note_before_a_run_far_beyond_the_trained_size(tmp_path, capsys, monkeypatch, side, note):
    """A 512x512 --image on the 64x64 model is 64x its pixels: said before anything runs."""
    def stop(*args):
        raise ValueError("stopped before generating")

    monkeypatch.setattr(generate, "make_batch", stop)
    image = black(tmp_path / "in.png", side)
    rc, out, err = run("generate", "a cat", "--image", image, "--steps", 2, "--model", DEFAULT,
                       "--out", tmp_path / "out.png", capsys=capsys)
    assert rc == 1 and err.endswith("error: stopped before generating\n")
    if note:
        line = err.splitlines()[0]
        assert line.startswith("note: 512x512 is 64x the pixels of the 64x64 the model was trained at"), err
        assert "MACs" in line and "GiB" in line and "Ctrl-C" in line
    else:
        assert "note:" not in err


def test_info_shows_an_invalid_gate_record_as_invalid(tmp_path, capsys):
    path = tmp_path / "odd.png"
    save_png(path, np.zeros((8, 8, 3), np.uint8), {"mini_tgate": json.dumps({"prompt": "a cat", "tgate": 5})})
    rc, out, err = run("info", path, capsys=capsys)
    assert rc == 0 and "  tgate: 5 (invalid" in out and "plain sampling" not in out, out
