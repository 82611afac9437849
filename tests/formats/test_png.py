"""mini_tgate/png.py against an independent PNG codec (Pillow, a test dependency only),
diffusers' float -> uint8 conversion, and an A1111 `parameters` reader (sd-parsers, when installed)."""

import json
import os
import re
import struct
import subprocess
import sys
import threading
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest

from mini_tgate.formats import png
from mini_tgate.formats.png import (describe, encode_png, format_parameters, image_grid, read_png_text, save_png,
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


def test_float_out_of_range_is_clipped(tmp_path):
    img = np.array([[[-0.5, 1.5, np.nan]]], np.float32)
    save_png(tmp_path / "a.png", img)
    np.testing.assert_array_equal(pillow_pixels(tmp_path / "a.png"), [[[0, 255, 0]]])


@pytest.mark.parametrize("shape", [(9, 14, 3), (9, 14, 4), (9, 14), (9, 14, 1), (9, 14, 2), (1, 1, 3)])
def test_uint8_roundtrip_with_pillow(tmp_path, shape):
    img = RNG.integers(0, 256, shape, dtype=np.uint8)
    save_png(tmp_path / "a.png", img)
    expected = img.reshape(shape[0], shape[1], -1)
    np.testing.assert_array_equal(pillow_pixels(tmp_path / "a.png"), expected)


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


def test_read_pillow_written(tmp_path):
    img = RNG.integers(0, 256, (40, 33, 3), dtype=np.uint8)
    info = PngInfo()
    info.add_text("plain", "Latin-1 é")                                   # tEXt
    info.add_text("zipped", "compressed Latin-1 " * 20, zip=True)         # zTXt
    info.add_itxt("intl", "猫 🐱", lang="ja", tkey="ねこ")                 # iTXt
    info.add_itxt("intl_zipped", "桜 " * 50, zip=True)                    # iTXt, compressed
    p = tmp_path / "a.png"
    Image.fromarray(img).save(p, pnginfo=info)
    assert {"tEXt", "zTXt", "iTXt"} <= set(chunk_types(p))
    assert read_png_text(p) == {"plain": "Latin-1 é", "zipped": "compressed Latin-1 " * 20,
                                "intl": "猫 🐱", "intl_zipped": "桜 " * 50}


def test_not_png_truncated_corrupt(tmp_path):
    p = tmp_path / "a.png"
    save_png(p, RNG.integers(0, 256, (8, 8, 3), dtype=np.uint8), {"k": "v"})
    good = p.read_bytes()
    bad = tmp_path / "bad.png"
    assert good[37:41] == b"tEXt"
    cases = {"empty": b"", "not png": b"GIF89a not a png", "no chunks": good[:8], "in IHDR": good[:30],
             "in IEND": good[:-1], "no IEND": good[:-12], "in IDAT": good[:-20],
             "flipped bit": good[:42] + bytes([good[42] ^ 1]) + good[43:],         # in the text: CRC mismatch
             "bad type": good[:38] + b"\0" + good[39:],                             # not a letter
             "IHDR not first": good[:8] + good[33:],
             "huge length": good[:33] + b"\xff\xff\xff\xf0" + good[37:]}
    for name, data in cases.items():
        bad.write_bytes(data)
        for reader in (read_png_text, describe):
            with pytest.raises(ValueError, match="not a PNG|truncated|corrupt|IHDR"):
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
    from mini_tgate.formats import png

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
    np.testing.assert_array_equal(pillow_pixels(p), np.full((3, 3, 3), 7))
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
        "Model: stabilityai/stable-diffusion-xl-base-1.0, TGATE gate step: 10, TGATE sp interval: 5, "
        "TGATE fi interval: 1, TGATE warm up: 2, Dtype: float16, Version: mini_tgate 0.1.0")
    assert json.loads(text["mini_tgate"]) == {**PARAMS, "dtype": "float16"}


def test_format_parameters_dataclass_gate_and_no_gate():
    from mini_tgate import TGate
    j = json.loads(format_parameters({**PARAMS, "tgate": TGate(10, 5, 1, 2)})["mini_tgate"])
    assert j["tgate"] == PARAMS["tgate"]
    text = format_parameters({"prompt": "a cat", "tgate": None, "model": "org/repo"})
    assert "TGATE" not in text["parameters"] and "Model: org/repo," in text["parameters"]
    assert json.loads(text["mini_tgate"])["tgate"] is None
    from mini_tgate import DeepCache
    j = json.loads(format_parameters({**PARAMS, "deepcache": DeepCache(3, 1)})["mini_tgate"])
    assert j["deepcache"] == {"interval": 3, "branch": 1}


A1111 = dict(prompt="a cat, oil painting", negative_prompt="blurry, lowres", seed=42, steps=20,
             guidance_scale=7.0, scheduler="DPMSolverMultistepScheduler", sampler="DPM++ 2M",
             schedule_type="Karras", model="/home/someone/models/sd-v1-5", model_hash="6ce0161689",
             model_revision="39593d5650112b4cc580433f6b0435385882d819", batch_size=4, batch_pos=2,
             width=192, height=64, tgate=dict(gate_step=10, sp_interval=5, fi_interval=1, warm_up=2),
             dtype="float32", version="0.2.0")
A1111_FIELDS = {"Steps": "20", "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": "7.0", "Seed": "42",
                "Size": "192x64", "Model hash": "6ce0161689", "Model": "sd-v1-5", "Batch size": "4", "Batch pos": "2",
                "TGATE gate step": "10", "TGATE sp interval": "5", "TGATE fi interval": "1", "TGATE warm up": "2",
                "Model revision": "39593d5650112b4cc580433f6b0435385882d819", "Dtype": "float32",
                "Version": "mini_tgate 0.2.0"}  # A1111's order (theirs, then ours)


def test_parameters_survive_a_naive_a1111_splitter():
    """What an A1111 reader that splits the last line at ", " and then ": " gets back."""
    text = format_parameters(A1111)["parameters"]
    prompt, negative, line = text.split("\n")
    assert prompt == "a cat, oil painting" and negative == "Negative prompt: blurry, lowres"
    pairs = [item.split(": ") for item in line.split(", ")]
    assert all(len(pair) == 2 for pair in pairs), pairs
    assert dict(pairs) == A1111_FIELDS and [k for k, _ in pairs] == list(A1111_FIELDS)
    j = json.loads(format_parameters(A1111)["mini_tgate"])
    assert j == {**A1111, "model": "sd-v1-5"}  # the JSON keeps every key; no absolute path either


@pytest.mark.parametrize("extra,line", [
    ({"batch_size": 1, "batch_pos": 0}, "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.0"),
    ({"sampler": None, "schedule_type": None, "scheduler": "EulerAncestralDiscreteScheduler"},
     "Steps: 20, Sampler: Euler a, CFG scale: 7.0"),
    ({"sampler": None, "scheduler": "MyScheduler"}, "Sampler: MyScheduler, Schedule type: Karras"),
    ({"model": "C:\\models\\sd15\\"}, "Model: sd15, Batch size"),
    ({"model": "org/repo", "tgate": None}, "Model: org/repo, Batch size: 4, Batch pos: 2, Model revision"),
    ({"model": "my:model, v2"}, 'Model: "my:model, v2", Batch'),  # A1111's quoting, as A1111 does
    ({"strength": 0.6, "deepcache": {"interval": 3, "branch": 0}},  # img2img, DeepCache
     "Batch pos: 2, Denoising strength: 0.6, TGATE gate step: 10, TGATE sp interval: 5, TGATE fi interval: 1, "
     "TGATE warm up: 2, DeepCache interval: 3, DeepCache branch: 0, Model revision"),
])
def test_parameters_optional_keys(extra, line):
    text = format_parameters({**A1111, **extra})["parameters"].split("\n")[-1]
    assert line in text
    assert ("Batch" in text) == (extra.get("batch_size", 4) > 1)


def test_parameters_read_by_sd_parsers(tmp_path):
    """sd-parsers (a third-party reader of A1111, ComfyUI, ... PNGs) keeps every value whole."""
    sd_parsers = pytest.importorskip("sd_parsers")
    p = tmp_path / "a.png"
    save_png(p, np.zeros((64, 192, 3), np.uint8), format_parameters(A1111))
    info = sd_parsers.ParserManager().parse(str(p))
    assert info is not None and info.generator == "AUTOMATIC1111"
    (sampler,) = info.samplers
    assert sampler.name == "DPM++ 2M" and sampler.model.name == "sd-v1-5" and sampler.model.hash == "6ce0161689"
    assert [x.value for x in sampler.prompts] == ["a cat, oil painting"]
    assert [x.value for x in sampler.negative_prompts] == ["blurry, lowres"]
    assert sampler.parameters == {"cfg_scale": "7.0", "seed": "42", "steps": "20", "scheduler": "Karras"}
    taken = ("Steps", "Sampler", "Schedule type", "CFG scale", "Seed", "Model", "Model hash")  # into the above
    assert info.metadata == {k: v for k, v in A1111_FIELDS.items() if k not in taken}


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
import sys
sys.modules["PIL"] = None
sys.path.insert(0, {str(Path(__file__).parents[2])!r})
from mini_tgate.formats import png
import numpy as np
png.save_png({str(tmp_path / "a.png")!r}, np.ones((3, 4, 3)) / 2, png.format_parameters({{"prompt": "猫"}}))
print(png.describe({str(tmp_path / "a.png")!r}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "prompt: 猫" in out.stdout  # and no PIL import was attempted (it would have raised)
    np.testing.assert_array_equal(pillow_pixels(tmp_path / "a.png"), np.full((3, 4, 3), 128))


# ----------------------------------------------------------------------------- untrusted files

def raw_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with(*chunks: bytes) -> bytes:
    """A valid 1x1 gray PNG with `chunks` between IHDR and IDAT."""
    return (b"\x89PNG\r\n\x1a\n" + raw_chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)) + b"".join(chunks)
            + raw_chunk(b"IDAT", zlib.compress(b"\0\0")) + raw_chunk(b"IEND", b""))


def peak_memory(fn, *args):
    """(result or exception, the largest Python allocation total while fn ran, in bytes)."""
    tracemalloc.start()
    try:
        result = fn(*args)
    except Exception as e:
        result = e
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return result, peak


@pytest.mark.parametrize("kind", ["zTXt", "iTXt"])
def test_text_bomb_is_refused_without_inflating_it(tmp_path, kind):
    """64 KiB of zlib data that inflate to 64 MiB (the issue's 2 MB file inflated to 2 GB)."""
    zeros = zlib.compress(bytes(64 << 20), 9)
    body = b"parameters\0" + (b"\0" + zeros if kind == "zTXt" else b"\1\0en\0\0" + zeros)
    p = tmp_path / "bomb.png"
    p.write_bytes(png_with(raw_chunk(kind.encode(), body)))
    for reader in (read_png_text, describe):
        error, peak = peak_memory(reader, p)
        assert isinstance(error, ValueError) and "inflates to more than 1 MiB" in str(error)
        assert peak < 4 << 20


def test_text_at_the_limit_is_read_as_pillow_reads_it(tmp_path):
    """1 MiB a value is also Pillow's limit (PngImagePlugin.MAX_TEXT_CHUNK)."""
    from PIL import PngImagePlugin
    assert png.MAX_PNG_TEXT == PngImagePlugin.MAX_TEXT_CHUNK
    info = PngInfo()
    info.add_text("big", "x" * png.MAX_PNG_TEXT, zip=True)
    info.add_itxt("big_utf8", "é" * (png.MAX_PNG_TEXT // 2), zip=True)  # 2 bytes a character in UTF-8
    p = tmp_path / "a.png"
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(p, pnginfo=info)
    with Image.open(p) as im:
        assert read_png_text(p) == im.text == {"big": "x" * png.MAX_PNG_TEXT, "big_utf8": "é" * (png.MAX_PNG_TEXT // 2)}


def test_total_text_is_bounded(tmp_path):
    one_mib = b"\0" + zlib.compress(bytes(png.MAX_PNG_TEXT), 9)
    p = tmp_path / "a.png"
    p.write_bytes(png_with(*(raw_chunk(b"zTXt", b"k%d\0" % i + one_mib) for i in range(8))))
    assert len(read_png_text(p)) == 8  # 8 MiB: the limit
    p.write_bytes(png_with(*(raw_chunk(b"zTXt", b"k%d\0" % i + one_mib) for i in range(9))))
    with pytest.raises(ValueError, match="1 MiB a value, 8 MiB in all"):
        read_png_text(p)
    p.write_bytes(png_with(raw_chunk(b"tEXt", b"k\0" + b"x" * (png.MAX_PNG_TEXT + 1))))  # uncompressed, too
    with pytest.raises(ValueError, match="1 MiB a value"):
        read_png_text(p)


def test_chunk_count_is_bounded(tmp_path, monkeypatch):
    monkeypatch.setattr(png, "MAX_PNG_CHUNKS", 50)
    p = tmp_path / "a.png"
    p.write_bytes(png_with(*[raw_chunk(b"teSt", b"")] * 46))  # + IHDR, IDAT, IEND: 49 chunks
    assert read_png_text(p) == {}
    p.write_bytes(png_with(*[raw_chunk(b"teSt", b"")] * 48))
    with pytest.raises(ValueError, match="more than 50 chunks"):
        read_png_text(p)


def test_image_data_and_large_files_are_not_read(tmp_path):
    """The text after 256 MiB of image data (a sparse file: no disk used), and a 256 MiB file that
    is not a PNG, read with a few KiB of memory: the data is seeked over, the signature read first."""
    p = tmp_path / "big.png"
    size = 256 << 20
    with open(p, "wb") as f:
        head = png_with(raw_chunk(b"tEXt", b"before\0x"))
        f.write(head[:head.index(b"IDAT") - 4])
        f.write(struct.pack(">I", size) + b"IDAT")
        f.seek(size, os.SEEK_CUR)  # zeros, never written; the CRC below is wrong and never checked
        f.write(b"\0\0\0\0" + raw_chunk(b"tEXt", b"after\0y") + raw_chunk(b"IEND", b""))
    text, peak = peak_memory(read_png_text, p)
    assert text == {"before": "x", "after": "y"} and peak < 1 << 20
    s, peak = peak_memory(describe, p)
    assert s.startswith(f"{p}: 1x1 (width x height), gray, 8-bit, {p.stat().st_size:,} bytes") and peak < 1 << 20
    p.write_bytes(b"GIF89a")
    os.truncate(p, size)
    error, peak = peak_memory(read_png_text, p)
    assert isinstance(error, ValueError) and "is not a PNG file" in str(error) and peak < 1 << 20


def within_10_s(fn, *args):
    """fn(*args) or the exception it raised, run in a thread: a test fails rather than hangs."""
    result = []
    thread = threading.Thread(target=lambda: result.append(peak_memory(fn, *args)[0]), daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), f"{fn.__name__}{args} hangs"
    return result[0]


def test_only_regular_files_are_read(tmp_path):
    with pytest.raises(ValueError, match="is a directory, not a PNG file"):
        read_png_text(tmp_path)
    if os.path.exists("/dev/zero"):  # endless: read whole, it filled the memory
        with pytest.raises(ValueError, match="'/dev/zero' is a device, not a PNG file"):
            describe("/dev/zero")
    with pytest.raises(FileNotFoundError, match="cannot read '.*missing.png': No such file"):
        describe(tmp_path / "missing.png")
    if not hasattr(os, "mkfifo"):
        return
    os.mkfifo(tmp_path / "fifo")  # no writer: opening it for reading used to wait forever
    error = within_10_s(describe, tmp_path / "fifo")
    assert isinstance(error, ValueError) and "is a FIFO (named pipe), not a PNG file" in str(error)


def test_fifo_swapped_in_after_the_check_does_not_hang(tmp_path, monkeypatch):
    """The check is repeated on the open file, opened non-blocking (a FIFO opens at once)."""
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    os.mkfifo(tmp_path / "fifo")
    real_stat = os.stat
    monkeypatch.setattr(os, "stat", lambda path, *a, **k: real_stat(__file__))  # "a regular file"
    error = within_10_s(read_png_text, tmp_path / "fifo")
    assert isinstance(error, ValueError) and "is a FIFO" in str(error)


def test_describe_escapes_control_characters(tmp_path):
    """An ESC sequence in a PNG must not reach the terminal (ESC [2J clears it, ESC ]0; retitles it)."""
    evil = "a cat\x1b[2J\x1b]0;pwned\x07\r\x9b31m\tend\nline 2"
    p = tmp_path / "a.png"
    save_png(p, np.zeros((2, 2, 3), np.uint8), {"parameters": evil, "k\x1bey": "v\x08", **format_parameters(
        {"prompt": evil})})
    s = describe(p)
    assert not any(ch in s for ch in "\x1b\x07\r\x9b\x08")
    assert "a cat\\x1b[2J\\x1b]0;pwned\\x07\\x0d\\x9b31m\tend\n    line 2" in s  # the prompt, from the JSON
    p2 = tmp_path / "b.png"
    save_png(p2, np.zeros((2, 2, 3), np.uint8), {"parameters": evil, "k\x1bey": "v\x08"})
    s = describe(p2)
    assert "  parameters: a cat\\x1b[2J\\x1b]0;pwned\\x07\\x0d\\x9b31m\tend\n    line 2" in s
    assert "  k\\x1bey: v\\x08" in s


def test_describe_deeply_nested_json(tmp_path):
    nested = '{"prompt": "x", "a": ' + "[" * 100_000 + "]" * 100_000 + "}"
    p = tmp_path / "a.png"
    save_png(p, np.zeros((2, 2, 3), np.uint8), {"mini_tgate": nested, "parameters": "x\nSteps: 1"})
    s = describe(p)  # json.loads raises RecursionError: not ours, shown as it is
    assert "  mini_tgate: " + nested in s and "  parameters: x\n    Steps: 1" in s


# ----------------------------------------------------------------------------- no-clobber writes

def test_save_png_exclusive_never_replaces(tmp_path):
    p = tmp_path / "a.png"
    save_png(p, np.zeros((2, 2, 3), np.uint8), {"k": "v"}, overwrite=False)
    np.testing.assert_array_equal(pillow_pixels(p), np.zeros((2, 2, 3)))
    with Image.open(p) as im:
        assert im.text == {"k": "v"}
    umask = os.umask(0)
    os.umask(umask)
    assert p.stat().st_mode & 0o777 == 0o666 & ~umask
    old = p.read_bytes()
    with pytest.raises(FileExistsError, match=r"cannot write '.*a\.png': the file exists \(not overwritten\)"):
        save_png(p, np.ones((2, 2, 3), np.uint8), overwrite=False)
    assert p.read_bytes() == old and [x.name for x in tmp_path.iterdir()] == ["a.png"]
    (tmp_path / "link.png").symlink_to(tmp_path / "nowhere.png")  # a dangling link is a name taken, too
    with pytest.raises(FileExistsError):
        save_png(tmp_path / "link.png", np.ones((2, 2, 3), np.uint8), overwrite=False)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.png", "link.png"]


def test_save_png_exclusive_race(tmp_path):
    """Eight writers of one name at once: one wins, the others get FileExistsError, the file is
    the winner's complete image."""
    barrier, results = threading.Barrier(8), [None] * 8

    def write(i):
        barrier.wait()
        try:
            save_png(tmp_path / "a.png", np.full((64, 64, 3), i, np.uint8), overwrite=False)
            results[i] = "won"
        except FileExistsError:
            results[i] = "exists"
    threads = [threading.Thread(target=write, args=(i,)) for i in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert results.count("won") == 1 and results.count("exists") == 7
    np.testing.assert_array_equal(pillow_pixels(tmp_path / "a.png"), np.full((64, 64, 3), results.index("won")))
    assert [x.name for x in tmp_path.iterdir()] == ["a.png"]


def test_save_png_exclusive_without_hard_links(tmp_path, monkeypatch):
    import errno

    def no_link(src, dst):
        raise OSError(errno.EPERM, "Operation not permitted")
    monkeypatch.setattr(os, "link", no_link)
    p = tmp_path / "a.png"
    save_png(p, np.full((3, 3, 3), 9, np.uint8), overwrite=False)
    np.testing.assert_array_equal(pillow_pixels(p), np.full((3, 3, 3), 9))
    with pytest.raises(FileExistsError):
        save_png(p, np.zeros((3, 3, 3), np.uint8), overwrite=False)
    np.testing.assert_array_equal(pillow_pixels(p), np.full((3, 3, 3), 9))
    assert [x.name for x in tmp_path.iterdir()] == ["a.png"]


# ----------------------------------------------------------------------------- animated PNG (APNG)

from mini_tgate.core.bounds import MAX_APNG_FRAMES  # noqa: E402
from mini_tgate.formats.png import apng_delay, encode_apng, save_apng  # noqa: E402


def raw_chunks(data):
    """[(type, data), ...] of a PNG file's bytes or path, every CRC checked."""
    data, pos, out = data if isinstance(data, bytes) else Path(data).read_bytes(), 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        assert struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])[0] == zlib.crc32(kind + body)
        out.append((kind.decode(), body))
        pos += 12 + length
    return out


def pillow_frames(path):
    with Image.open(path) as im:
        info = dict(n_frames=im.n_frames, is_animated=im.is_animated, loop=im.info.get("loop"), text=im.text)
        frames, durations = [], []
        for i in range(im.n_frames):
            im.seek(i)
            frames.append(np.asarray(im.convert("RGB")))
            durations.append(im.info["duration"])
    return np.stack(frames), durations, info


@pytest.mark.parametrize("fps,ms", [(7, 1000 / 7), (25, 40.0)])
def test_apng_read_by_pillow(tmp_path, fps, ms):
    frames = RNG.integers(0, 256, (6, 9, 14, 3), dtype=np.uint8)
    p = tmp_path / "v.png"
    save_apng(p, frames, fps, TEXT)
    got, durations, info = pillow_frames(p)
    np.testing.assert_array_equal(got, frames)
    assert durations == [pytest.approx(ms)] * 6
    assert info == dict(n_frames=6, is_animated=True, loop=0, text=TEXT)
    with Image.open(p) as im:  # frame 0, as a viewer without APNG support shows it, and the text in info
        np.testing.assert_array_equal(np.asarray(im), frames[0])
        assert {k: im.info[k] for k in TEXT} == TEXT
    assert read_png_text(p) == TEXT
    assert p.read_bytes() == encode_apng(frames, fps, TEXT)


def test_apng_chunks_follow_the_spec(tmp_path):
    frames = RNG.integers(0, 256, (3, 4, 5, 3), dtype=np.uint8)
    p = tmp_path / "v.png"
    save_apng(p, frames, 7, {"k": "v"})
    chunks = raw_chunks(p)
    assert [k for k, _ in chunks] == ["IHDR", "acTL", "tEXt", "fcTL", "IDAT", "fcTL", "fdAT", "fcTL", "fdAT", "IEND"]
    assert struct.unpack(">IIBBBBB", chunks[0][1]) == (5, 4, 8, 2, 0, 0, 0)
    assert struct.unpack(">II", chunks[1][1]) == (3, 0)  # 3 frames, loop forever
    fctl = [struct.unpack(">IIIIIHHBB", b) for k, b in chunks if k == "fcTL"]
    assert fctl == [(seq, 5, 4, 0, 0, 1, 7, 0, 0) for seq in (0, 1, 3)]  # full frame, delay 1/7 s, dispose/blend 0
    fdat = [b for k, b in chunks if k == "fdAT"]
    assert [struct.unpack(">I", b[:4])[0] for b in fdat] == [2, 4]
    for i, data in enumerate([chunks[4][1]] + [b[4:] for b in fdat]):  # each frame's zlib data is the PNG's IDAT
        assert [data] == [b for k, b in raw_chunks(encode_png(frames[i])) if k == "IDAT"]


def test_apng_one_frame_and_float_frames(tmp_path):
    frames = RNG.random((1, 7, 8, 3), dtype=np.float32)
    p = tmp_path / "v.png"
    save_apng(p, frames, 25)
    got, durations, info = pillow_frames(p)
    assert info["n_frames"] == 1 and not info["is_animated"] and durations == [40.0]
    np.testing.assert_array_equal(got[0], png.to_uint8(frames[0]))
    assert [k for k, _ in raw_chunks(p)] == ["IHDR", "acTL", "fcTL", "IDAT", "IEND"]
    np.testing.assert_array_equal(pillow_pixels(p), png.to_uint8(frames[0]))


def test_apng_describe_and_bounded_reader(tmp_path):
    p = tmp_path / "v.png"
    save_apng(p, RNG.integers(0, 256, (4, 6, 10, 3), dtype=np.uint8), 7, format_parameters(PARAMS))
    s = describe(p)
    assert s.startswith(f"{p}: 10x6 (width x height), RGB, 8-bit,") and "  seed: 0" in s
    assert json.loads(read_png_text(p)["mini_tgate"])["seed"] == 0


def test_apng_overwrite(tmp_path):
    p = tmp_path / "v.png"
    a, b = np.zeros((2, 3, 3, 3), np.uint8), np.full((2, 3, 3, 3), 200, np.uint8)
    save_apng(p, a, 7)
    old = p.read_bytes()
    with pytest.raises(FileExistsError, match=r"cannot write '.*v\.png': the file exists \(not overwritten\)"):
        save_apng(p, b, 7)  # the default: never replace
    assert p.read_bytes() == old and [x.name for x in tmp_path.iterdir()] == ["v.png"]
    save_apng(p, b, 7, overwrite=True)
    np.testing.assert_array_equal(pillow_frames(p)[0], b)
    with pytest.raises(FileNotFoundError, match="missing"):
        save_apng(tmp_path / "missing" / "v.png", a, 7)


@pytest.mark.parametrize("frames,match", [
    (np.zeros((4, 4, 3), np.uint8), r"shape \(F, H, W, C\).*\(4, 4, 3\)"),
    (np.zeros((2, 4, 4, 5), np.uint8), r"shape \(F, H, W, C\)"),
    (np.zeros((2, 0, 4, 3), np.uint8), r"shape \(F, H, W, C\)"),
    (np.zeros((1, 2, 3, 4, 3), np.uint8), r"shape \(F, H, W, C\)"),
    (np.zeros((0, 4, 4, 3), np.uint8), "1 to 10,000 frames, got 0"),
    (np.zeros((2, 4, 4, 3), np.int32), "dtype int32"),
    (np.zeros((2, 4, 4, 3), bool), "dtype bool"),
])
def test_apng_bad_frames_write_nothing(tmp_path, frames, match):
    with pytest.raises(ValueError, match=match):
        save_apng(tmp_path / "v.png", frames, 7)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fps", [0, -7, float("nan"), float("inf"), True, "7", None, 1e6, 1e-6, 10**400])
def test_apng_bad_fps(tmp_path, fps):
    with pytest.raises(ValueError, match="fps must be a finite number from 1/65535 to 65535"):
        save_apng(tmp_path / "v.png", np.zeros((2, 4, 4, 3), np.uint8), fps)
    assert list(tmp_path.iterdir()) == []


def test_apng_bad_text(tmp_path):
    with pytest.raises(ValueError, match="keyword"):
        save_apng(tmp_path / "v.png", np.zeros((2, 4, 4, 3), np.uint8), 7, {"": "x"})
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fps,delay", [(7, (1, 7)), (25, (1, 25)), (29.97, (100, 2997)), (30000 / 1001, (1001, 30000)),
                                       (np.float32(8), (1, 8)), (0.5, (2, 1)), (1 / 3, (3, 1)), (65535, (1, 65535)),
                                       (1 / 65535, (65535, 1)), (123.456, (125, 15432))])
def test_apng_delay(fps, delay):
    assert apng_delay(fps) == delay
    num, den = apng_delay(fps)
    assert 1 <= num <= 65535 and 1 <= den <= 65535 and num / den == pytest.approx(1 / fps, rel=1e-6)


def test_apng_frame_bound(tmp_path):
    assert MAX_APNG_FRAMES == 10_000
    with pytest.raises(ValueError, match="1 to 10,000 frames, got 10,001"):
        encode_apng(np.zeros((MAX_APNG_FRAMES + 1, 1, 1, 3), np.uint8), 25)
    p = tmp_path / "v.png"  # at the bound: written, and within the reader's chunk bound
    save_apng(p, np.zeros((MAX_APNG_FRAMES, 1, 2, 3), np.uint8), 25, {"k": "v"})
    assert read_png_text(p) == {"k": "v"} and describe(p).startswith(f"{p}: 2x1 (width x height), RGB")
    with Image.open(p) as im:
        assert im.n_frames == MAX_APNG_FRAMES


# ----------------------------------------------------------------------------- RNG, Lora hashes, Emphasis

# A1111's own reader of the last line (modules/infotext_utils.py: re_param_code, unquote) and of
# "Lora hashes" (extensions-builtin/Lora/lora_script.py: split at "," then at the first ":")
A1111_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def a1111_fields(text: str) -> dict:
    def unquote(v):
        return json.loads(v) if len(v) > 1 and v[0] == v[-1] == '"' else v
    return {k: unquote(v) for k, v in A1111_PARAM.findall(text.split("\n")[-1])}


def test_rng_lora_hashes_and_emphasis_as_a1111_writes_them():
    hashes = {"my style.v2": "0123456789ab", "de:tail,er": "ba9876543210"}
    params = {**A1111, "prompt": "a (cat:1.3), [blurry]", "rng": "CPU", "lora_hashes": hashes, "emphasis": "None"}
    text = format_parameters(params)["parameters"]
    # after A1111's fields (RNG), its extra ones (Lora hashes, then Emphasis), before ours
    assert ('Batch pos: 2, RNG: CPU, Lora hashes: "my style.v2: 0123456789ab, detailer: ba9876543210", '
            "Emphasis: None, TGATE gate step: 10") in text
    fields = a1111_fields(text)
    assert fields["RNG"] == "CPU" and fields["Emphasis"] == "None" and fields["TGATE warm up"] == "2"
    pasted = {k.strip(): v.strip() for k, v in (x.split(":", 1) for x in fields["Lora hashes"].split(","))}
    assert pasted == {"my style.v2": "0123456789ab", "detailer": "ba9876543210"}
    assert json.loads(format_parameters(params)["mini_tgate"])["lora_hashes"] == hashes  # kept as given
    # what A1111 leaves out: its default RNG (GPU), its default emphasis, and "Emphasis" for a prompt without brackets
    for extra in ({"rng": "GPU"}, {"emphasis": "Original"}, {"emphasis": True}, {"prompt": "a cat", "emphasis": False},
                  {"lora_hashes": {}}):
        line = format_parameters({**params, **extra})["parameters"].split("\n")[-1]
        left_out = {"rng": "RNG", "emphasis": "Emphasis", "prompt": "Emphasis", "lora_hashes": "Lora hashes"}
        assert f"{left_out[next(iter(extra))]}:" not in line, extra
    assert "Emphasis: None" in format_parameters({**params, "emphasis": False})["parameters"]
    negative_only = {**params, "prompt": "a cat", "negative_prompt": "(blurry)", "emphasis": False}
    assert "Emphasis: None" in format_parameters(negative_only)["parameters"]


def test_new_fields_read_by_sd_parsers(tmp_path):
    sd_parsers = pytest.importorskip("sd_parsers")
    p = tmp_path / "a.png"
    params = {**A1111, "prompt": "a (cat)", "rng": "CPU", "lora_hashes": {"a": "0123456789ab"}, "emphasis": "None"}
    save_png(p, np.zeros((64, 192, 3), np.uint8), format_parameters(params))
    info = sd_parsers.ParserManager().parse(str(p))
    assert info.metadata["RNG"] == "CPU" and info.metadata["Emphasis"] == "None"
    # sd-parsers splits at every ", " and ": ", even inside A1111's quotes: it reads the "Lora hashes"
    # of A1111's own files so; the fields after it stay whole
    assert info.metadata["Version"] == "mini_tgate 0.2.0" and info.metadata["TGATE gate step"] == "10"
