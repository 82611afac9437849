"""mini_tgate/png.py against an independent PNG codec (Pillow, a test dependency only) and
diffusers' float -> uint8 conversion."""

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from mini_tgate.png import (describe, encode_png, format_parameters, image_grid, read_png, read_png_text, save_png,
                            side_by_side)

Image = pytest.importorskip("PIL.Image")
PngInfo = pytest.importorskip("PIL.PngImagePlugin").PngInfo

RNG = np.random.default_rng(0)
TEXT = {"parameters": "a café at dusk, «oil painting» ±5°",  # Latin-1: tEXt
        "prompt_ja": "富士山と桜、夕焼け",                      # not Latin-1: iTXt
        "emoji": "a cat 🐱 wearing a hat 🎩\nsecond line"}


def chunk_types(path):
    data, pos, kinds = Path(path).read_bytes(), 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kinds.append(data[pos + 4:pos + 8].decode())
        pos += 12 + length
    return kinds


def pillow_pixels(path):
    with Image.open(path) as im:
        a = np.asarray(im)
    return a[:, :, None] if a.ndim == 2 else a


def test_float_image_matches_diffusers(tmp_path):
    from diffusers.image_processor import VaeImageProcessor
    img = RNG.random((17, 23, 3), dtype=np.float32)
    img[0, :6, 0] = [0, 1, 0.5 / 255, 1.5 / 255, 2.5 / 255, 254.5 / 255]  # ends and halves (numpy rounds to even)
    save_png(tmp_path / "a.png", img)
    expected = np.asarray(VaeImageProcessor.numpy_to_pil(img)[0])
    np.testing.assert_array_equal(pillow_pixels(tmp_path / "a.png"), expected)
    np.testing.assert_array_equal(read_png(tmp_path / "a.png"), expected)


def test_float_out_of_range_is_clipped(tmp_path):
    img = np.array([[[-0.5, 1.5, np.nan]]], np.float32)
    save_png(tmp_path / "a.png", img)
    np.testing.assert_array_equal(read_png(tmp_path / "a.png"), [[[0, 255, 0]]])


@pytest.mark.parametrize("shape", [(9, 14, 3), (9, 14, 4), (9, 14), (9, 14, 1), (9, 14, 2), (1, 1, 3)])
def test_uint8_roundtrip_with_pillow(tmp_path, shape):
    img = RNG.integers(0, 256, shape, dtype=np.uint8)
    save_png(tmp_path / "a.png", img)
    expected = img.reshape(shape[0], shape[1], -1)
    np.testing.assert_array_equal(pillow_pixels(tmp_path / "a.png"), expected)
    np.testing.assert_array_equal(read_png(tmp_path / "a.png"), expected)


def test_text_chunks_read_by_pillow(tmp_path):
    p = tmp_path / "a.png"
    save_png(p, np.zeros((4, 5, 3), np.uint8), TEXT)
    with Image.open(p) as im:
        assert im.text == TEXT
    assert read_png_text(p) == TEXT
    assert chunk_types(p) == ["IHDR", "tEXt", "iTXt", "iTXt", "IDAT", "IEND"]


@pytest.mark.parametrize("key,value", [("", "x"), ("k" * 80, "x"), (" lead", "x"), ("猫", "x"), ("k", "a\0b")])
def test_bad_text_entries_raise(tmp_path, key, value):
    with pytest.raises(ValueError):
        save_png(tmp_path / "a.png", np.zeros((2, 2, 3), np.uint8), {key: value})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L"])
def test_read_pillow_written(tmp_path, mode):
    c = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    smooth = np.linspace(0, 255, 40 * 33 * c).reshape(40, 33, c)          # smooth rows and noisy rows, so
    noise = RNG.integers(0, 256, (40, 33, c))                             # Pillow's adaptive filtering
    img = np.where(np.arange(40)[:, None, None] % 3 == 0, noise, smooth).astype(np.uint8)  # picks several
    info = PngInfo()
    info.add_text("plain", "Latin-1 é")                                   # tEXt
    info.add_text("zipped", "compressed Latin-1 " * 20, zip=True)         # zTXt
    info.add_itxt("intl", "猫 🐱", lang="ja", tkey="ねこ")                 # iTXt
    info.add_itxt("intl_zipped", "桜 " * 50, zip=True)                    # iTXt, compressed
    p = tmp_path / "a.png"
    Image.fromarray(img.squeeze(-1) if c == 1 else img, mode).save(p, pnginfo=info)
    assert {"tEXt", "zTXt", "iTXt"} <= set(chunk_types(p))
    np.testing.assert_array_equal(read_png(p), img)
    assert read_png_text(p) == {"plain": "Latin-1 é", "zipped": "compressed Latin-1 " * 20,
                                "intl": "猫 🐱", "intl_zipped": "桜 " * 50}


def write_filtered_png(path, img):
    """A PNG whose row y uses filter type y % 5, filtered by a direct transcription of the spec."""
    h, w, c = img.shape
    rows, raw = img.reshape(h, w * c).astype(int), bytearray()
    for y in range(h):
        raw.append(y % 5)
        for x in range(w * c):
            a = rows[y, x - c] if x >= c else 0
            b = rows[y - 1, x] if y > 0 else 0
            d = rows[y - 1, x - c] if x >= c and y > 0 else 0
            p = a + b - d
            paeth = a if abs(p - a) <= abs(p - b) and abs(p - a) <= abs(p - d) else b if abs(p - b) <= abs(p - d) else d
            raw.append((rows[y, x] - [0, a, b, (a + b) // 2, paeth][y % 5]) % 256)
    chunk = lambda k, data: struct.pack(">I", len(data)) + k + data + struct.pack(">I", zlib.crc32(k + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, {1: 0, 3: 2, 4: 6}[c], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(bytes(raw)))
                     + chunk(b"IEND", b""))


@pytest.mark.parametrize("c", [1, 3, 4])
def test_read_all_five_filter_types(tmp_path, c):
    img = RNG.integers(0, 256, (15, 11, c), dtype=np.uint8)
    write_filtered_png(tmp_path / "f.png", img)
    np.testing.assert_array_equal(pillow_pixels(tmp_path / "f.png"), img)  # the test's encoder is right
    np.testing.assert_array_equal(read_png(tmp_path / "f.png"), img)


def test_not_png_truncated_corrupt(tmp_path):
    p = tmp_path / "a.png"
    save_png(p, RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8), {"k": "v"})
    good = p.read_bytes()
    bad = tmp_path / "bad.png"
    cases = [b"", b"GIF89a not a png", good[:8], good[:30], good[:-1], good[:-12],  # truncated at several places
             good[:40] + bytes([good[40] ^ 1]) + good[41:]]                      # a flipped bit: CRC mismatch
    for data in cases:
        bad.write_bytes(data)
        for reader in (read_png_text, read_png, describe):
            with pytest.raises(ValueError):
                reader(bad)


def test_missing_parent_and_directory_target(tmp_path):
    img = np.zeros((2, 2, 3), np.uint8)
    with pytest.raises(FileNotFoundError, match="missing"):
        save_png(tmp_path / "missing" / "a.png", img)
    (tmp_path / "d").mkdir()
    with pytest.raises(IsADirectoryError, match="d"):
        save_png(tmp_path / "d", img)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["d"] and list((tmp_path / "d").iterdir()) == []


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_unwritable_directory(tmp_path):
    (tmp_path / "ro").mkdir(mode=0o500)
    try:
        with pytest.raises(PermissionError, match="ro"):
            save_png(tmp_path / "ro" / "a.png", np.zeros((2, 2, 3), np.uint8))
        assert list((tmp_path / "ro").iterdir()) == []
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_open_failure_names_path(tmp_path, monkeypatch):
    """As a failing permission check would (root, running the test above, never sees one)."""
    from mini_tgate import png

    def deny(file, mode):
        raise PermissionError(13, "Permission denied", str(file))
    monkeypatch.setattr(png, "open", deny, raising=False)
    with pytest.raises(PermissionError, match=r"cannot write '.*a\.png': Permission denied"):
        save_png(tmp_path / "a.png", np.zeros((2, 2, 3), np.uint8))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("image", [np.zeros((2, 2, 2, 3)), np.zeros((2, 2, 5)), np.zeros((0, 2, 3)),
                                   np.zeros((2, 2, 3), np.int32), np.zeros((2, 2, 3), bool)])
def test_bad_image_writes_nothing(tmp_path, image):
    with pytest.raises(ValueError):
        save_png(tmp_path / "a.png", image)
    assert list(tmp_path.iterdir()) == []


def test_failure_while_writing_keeps_old_file(tmp_path, monkeypatch):
    p = tmp_path / "a.png"
    save_png(p, np.zeros((2, 2, 3), np.uint8))
    old = p.read_bytes()

    def fail(src, dst):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="a.png.*No space left"):
        save_png(p, np.ones((2, 2, 3), np.uint8))
    assert p.read_bytes() == old and [x.name for x in tmp_path.iterdir()] == ["a.png"]


def test_overwrite_and_permissions(tmp_path):
    p = tmp_path / "a.png"
    save_png(p, np.zeros((2, 2, 3), np.uint8))
    save_png(str(p), np.full((3, 3, 3), 7, np.uint8))
    np.testing.assert_array_equal(read_png(p), np.full((3, 3, 3), 7))
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask  # like open(): not a temporary file's 0o600


def test_encode_png_is_save_png(tmp_path):
    img = RNG.random((5, 6, 3))
    save_png(tmp_path / "a.png", img, {"k": "v"})
    assert (tmp_path / "a.png").read_bytes() == encode_png(img, {"k": "v"})


PARAMS = dict(prompt="an astronaut riding a horse, 富士山", negative_prompt="blurry", seed=0, steps=25,
              guidance_scale=7.5, scheduler="DDIMScheduler",
              tgate=dict(gate_step=10, sp_interval=5, fi_interval=1, warm_up=2),
              model="stabilityai/stable-diffusion-xl-base-1.0", width=1024, height=768, dtype="torch.float16",
              version="0.1.0")


def test_format_parameters():
    text = format_parameters(PARAMS)
    assert text["parameters"] == (
        "an astronaut riding a horse, 富士山\nNegative prompt: blurry\n"
        "Steps: 25, Sampler: DDIM, CFG scale: 7.5, Seed: 0, Size: 1024x768, "
        "Model: stabilityai/stable-diffusion-xl-base-1.0, TGATE: \"gate_step=10, sp_interval=5, fi_interval=1, "
        "warm_up=2\", Dtype: float16, Version: mini_tgate 0.1.0")
    assert json.loads(text["mini_tgate"]) == {**PARAMS, "dtype": "float16"}


def test_format_parameters_dataclass_gate_and_no_gate():
    from mini_tgate import TGate
    j = json.loads(format_parameters({**PARAMS, "tgate": TGate(10, 5, 1, 2)})["mini_tgate"])
    assert j["tgate"] == PARAMS["tgate"]
    text = format_parameters({"prompt": "a cat", "tgate": None, "model": "C:\\models\\sd15"})
    assert "TGATE" not in text["parameters"] and 'Model: "C:\\\\models\\\\sd15"' in text["parameters"]
    assert json.loads(text["mini_tgate"])["tgate"] is None


def test_saved_parameters_and_describe(tmp_path):
    p = tmp_path / "out.png"
    save_png(p, RNG.random((8, 12, 3)), format_parameters(PARAMS))
    with Image.open(p) as im:
        assert im.text == format_parameters(PARAMS)
    s = describe(p)
    assert "12x8" in s and "RGB" in s and "prompt: an astronaut riding a horse, 富士山" in s
    assert "seed: 0" in s and "tgate: gate_step=10, sp_interval=5, fi_interval=1, warm_up=2" in s
    assert "Steps: 25" not in s  # the A1111 line repeats the JSON; shown only when there is no JSON
    # a file with only an AUTOMATIC1111 `parameters` entry and other text (as other tools write it)
    save_png(p, np.zeros((2, 3, 4), np.uint8), {"parameters": "a cat\nSteps: 20, Seed: 1", "Software": "x"})
    s = describe(p)
    assert "3x2" in s and "RGBA" in s and "a cat" in s and "Steps: 20, Seed: 1" in s and "Software: x" in s


def test_image_grid():
    imgs = np.stack([np.full((2, 3, 3), i + 1, np.uint8) for i in range(5)])
    g = image_grid(imgs)
    assert g.shape == (4, 9, 3) and g.dtype == np.uint8
    np.testing.assert_array_equal(g[::2, ::3, 0], [[1, 2, 3], [4, 5, 0]])
    assert image_grid(imgs, cols=5).shape == (2, 15, 3) and image_grid(imgs[:1]).shape == (2, 3, 3)


def test_side_by_side():
    a = RNG.random((4, 5, 3), dtype=np.float32)
    b = a.copy()
    b[1, 2] += [0.1, -0.2, 0.05]
    s = side_by_side(a, b)
    assert s.shape == (4, 15, 3) and s.dtype == np.float32
    np.testing.assert_array_equal(s[:, :5], a)
    np.testing.assert_array_equal(s[:, 5:10], b)
    d = s[:, 10:]
    assert d[1, 2].tolist() == [1, 1, 1] and d.sum() == 3  # the largest difference is white, the rest black
    assert side_by_side(a, a)[:, 10:].max() == 0 and side_by_side(a, b, diff=False).shape == (4, 10, 3)
    u = (a * 255).astype(np.uint8)
    np.testing.assert_allclose(side_by_side(u, u)[:, :5], u / 255, rtol=1e-6)
    with pytest.raises(ValueError):
        side_by_side(a, a[:3])


def test_no_pillow_needed(tmp_path):
    """png.py works with Pillow unimportable (run time needs numpy and the standard library only)."""
    code = f"""
import sys, importlib.util
sys.modules["PIL"] = None
spec = importlib.util.spec_from_file_location("png", {str(Path(__file__).parent.parent / "mini_tgate" / "png.py")!r})
png = importlib.util.module_from_spec(spec); spec.loader.exec_module(png)
import numpy as np
png.save_png({str(tmp_path / "a.png")!r}, np.ones((3, 4, 3)) / 2, png.format_parameters({{"prompt": "猫"}}))
assert png.read_png({str(tmp_path / "a.png")!r}).sum() == 3 * 4 * 3 * 128
print(png.describe({str(tmp_path / "a.png")!r}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "prompt: 猫" in out.stdout  # and no PIL import was attempted (it would have raised)
