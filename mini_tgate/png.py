"""PNG files with the standard library (zlib, struct) and numpy: no Pillow needed at run time.

A PNG file is an 8-byte signature followed by chunks, each
    length (4 bytes, big-endian) | type (4 ASCII letters) | data (length bytes) | CRC-32 of type+data.
The chunks used here, in file order:
    IHDR  width, height (uint32), bit depth (8), color type (0 gray, 2 RGB, 4 gray+alpha,
          6 RGBA), compression 0, filter method 0, interlace 0
    tEXt  keyword \\0 text, both Latin-1          (zTXt: keyword \\0 0 zlib(text))
    iTXt  keyword \\0 compressed? method \\0 language \\0 translated keyword \\0 text in UTF-8
    IDAT  zlib stream of the rows, each prefixed by a filter-type byte (0 None, 1 Sub, 2 Up,
          3 Average, 4 Paeth): the byte stored is the pixel byte minus a prediction from the
          pixel to the left, the one above, or both, mod 256 (spec: w3.org/TR/png, section 9)
    IEND  empty; the end of the file
Spec: https://www.w3.org/TR/png/. Generation parameters are stored as text chunks: `parameters`
in the AUTOMATIC1111 convention (read by most SD tools) and `mini_tgate`, the same as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import uuid
import zlib
from pathlib import Path

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}  # color type -> channels (8-bit only)
COLOR_NAMES = {0: "gray", 2: "RGB", 3: "palette", 4: "gray+alpha", 6: "RGBA"}


# ----------------------------------------------------------------------------- writing

def to_uint8(image) -> np.ndarray:
    """(H, W), (H, W, 1|2|3|4) float in [0, 1] or uint8 -> uint8 (H, W, C).

    Floats are converted as diffusers' `VaeImageProcessor.numpy_to_pil` does,
    `(image * 255).round().astype("uint8")` (numpy rounds halves to even); values outside
    [0, 1] (and NaN) are clipped first, where diffusers' cast would wrap around."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in CHANNELS.values() or 0 in image.shape:
        hint = " (save a batch one image at a time, or combine it with image_grid)" if image.ndim == 4 else ""
        raise ValueError(f"expected an image of shape (H, W), (H, W, 1|2|3|4), got {image.shape}{hint}")
    if image.dtype.kind == "f":
        return (np.clip(np.nan_to_num(image), 0, 1) * 255).round().astype(np.uint8)
    if image.dtype != np.uint8:
        raise ValueError(f"expected a float image in [0, 1] or uint8, got dtype {image.dtype}")
    return image


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _text_chunk(key: str, value: str) -> bytes:
    try:
        k = key.encode("latin-1")
    except UnicodeEncodeError:
        k = b""
    if not 1 <= len(k) <= 79 or b"\0" in k or k != k.strip():
        raise ValueError(f"PNG text keyword must be 1-79 Latin-1 characters without spaces at the ends: {key!r}")
    if "\0" in value:
        raise ValueError(f"PNG text for {key!r} cannot contain a NUL character")
    try:
        return _chunk(b"tEXt", k + b"\0" + value.encode("latin-1"))
    except UnicodeEncodeError:  # not Latin-1: iTXt, uncompressed, no language tag, no translated keyword
        return _chunk(b"iTXt", k + b"\0\0\0\0\0" + value.encode("utf-8"))


def encode_png(image, text: dict[str, str] | None = None) -> bytes:
    """The bytes of a PNG file holding `image` (see `to_uint8`) and the text entries."""
    image = to_uint8(image)
    h, w, c = image.shape
    color = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    rows = image.reshape(h, w * c)
    up = rows.copy()
    up[1:] -= rows[:-1]  # the Up filter (type 2) on every row: each byte minus the byte above, mod 256
    raw = np.hstack([np.full((h, 1), 2, np.uint8), up])
    return (SIGNATURE
            + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
            + b"".join(_text_chunk(k, v) for k, v in (text or {}).items())
            + _chunk(b"IDAT", zlib.compress(raw.tobytes()))
            + _chunk(b"IEND", b""))


def save_png(path, image, text: dict[str, str] | None = None) -> None:
    """Write `image` (float in [0, 1] or uint8; (H, W, 3) as the pipeline's output_type "np"
    gives one image) with text chunks to `path`, atomically: the file is written next to the
    target under a temporary name and renamed into place, so `path` is either the old file or
    the complete new one. The parent directory must exist (it is not created)."""
    path = Path(path)
    data = encode_png(image, text)  # every ValueError happens here, before the disk is touched
    parent = path.parent
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: directory {str(parent)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"cannot write {str(path)!r}: it is a directory")
    tmp = parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "xb") as f:  # "x": create, never overwrite; permissions follow the umask
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise type(e)(f"cannot write {str(path)!r}: {e.strerror or e}") from e
        raise


# ----------------------------------------------------------------------------- reading

def _read_chunks(path) -> list[tuple[bytes, bytes]]:
    """[(type, data), ...] up to IEND, checking the signature, the lengths and the CRCs."""
    data = Path(path).read_bytes()
    if not data.startswith(SIGNATURE):
        raise ValueError(f"{str(path)!r} is not a PNG file")
    chunks, pos = [], len(SIGNATURE)
    while True:
        if pos + 12 > len(data):
            raise ValueError(f"{str(path)!r} is truncated (no IEND chunk)")
        (length,), kind = struct.unpack(">I", data[pos:pos + 4]), data[pos + 4:pos + 8]
        body, crc = data[pos + 8:pos + 8 + length], data[pos + 8 + length:pos + 12 + length]
        if len(crc) < 4:
            raise ValueError(f"{str(path)!r} is truncated (in a {kind!r} chunk)")
        if struct.unpack(">I", crc)[0] != zlib.crc32(kind + body):
            raise ValueError(f"{str(path)!r} is corrupt (CRC mismatch in a {kind!r} chunk)")
        chunks.append((kind, body))
        pos += 12 + length
        if kind == b"IEND":
            return chunks


def _header(chunks) -> tuple[int, int, int, int, int]:
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise ValueError("PNG file without a valid IHDR chunk")
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    return width, height, depth, color, interlace


def read_png_text(path) -> dict[str, str]:
    """The text entries (tEXt, zTXt, iTXt compressed or not) of any PNG file."""
    text, chunks = {}, _read_chunks(path)
    try:
        for kind, body in chunks:
            if kind == b"tEXt":
                key, value = body.split(b"\0", 1)
                text[key.decode("latin-1")] = value.decode("latin-1")
            elif kind == b"zTXt":
                key, value = body.split(b"\0", 1)  # value: compression method (0) then zlib data
                text[key.decode("latin-1")] = zlib.decompress(value[1:]).decode("latin-1")
            elif kind == b"iTXt":
                key, rest = body.split(b"\0", 1)
                compressed, rest = rest[0], rest[2:]  # flag, method
                _language, _translated, value = rest.split(b"\0", 2)
                text[key.decode("latin-1")] = (zlib.decompress(value) if compressed else value).decode("utf-8")
    except (zlib.error, ValueError, IndexError) as e:  # no "\0" separator, bad zlib data, bad UTF-8
        raise ValueError(f"{str(path)!r} has a malformed text chunk: {e}") from e
    return text


def read_png(path) -> np.ndarray:
    """The pixels of an 8-bit gray / gray+alpha / RGB / RGBA non-interlaced PNG, uint8 (H, W, C)."""
    chunks = _read_chunks(path)
    w, h, depth, color, interlace = _header(chunks)
    if depth != 8 or color not in CHANNELS or interlace:
        raise ValueError(f"{str(path)!r}: only 8-bit gray/RGB/RGBA non-interlaced PNGs are supported "
                         f"(bit depth {depth}, color type {color}, interlace {interlace})")
    c = CHANNELS[color]
    try:
        raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    except zlib.error as e:
        raise ValueError(f"{str(path)!r} has corrupt image data: {e}") from e
    if len(raw) != h * (w * c + 1):
        raise ValueError(f"{str(path)!r} has {len(raw)} bytes of image data, expected {h * (w * c + 1)}")
    rows = np.frombuffer(raw, np.uint8).reshape(h, w * c + 1)
    out = np.zeros((h, w * c), np.uint8)
    prev = np.zeros(w * c, np.uint8)  # the row above the first one
    for y in range(h):
        ftype, line = rows[y, 0], rows[y, 1:]
        if ftype == 0:    # None
            out[y] = line
        elif ftype == 1:  # Sub: + the byte one pixel to the left, i.e. a running sum along each channel
            out[y] = line.reshape(w, c).cumsum(axis=0, dtype=np.uint8).reshape(-1)
        elif ftype == 2:  # Up: + the byte above
            out[y] = line + prev
        elif ftype in (3, 4):  # Average, Paeth: depend on the decoded left byte, so byte by byte
            cur, up = bytearray(line.tobytes()), prev.tobytes()
            for x in range(w * c):
                a = cur[x - c] if x >= c else 0       # left
                b = up[x]                             # above
                if ftype == 3:
                    cur[x] = (cur[x] + ((a + b) >> 1)) & 255
                    continue
                d = up[x - c] if x >= c else 0        # above-left
                pa, pb, pd = abs(b - d), abs(a - d), abs(a + b - 2 * d)  # distances of a, b, d to a + b - d
                cur[x] = (cur[x] + (a if pa <= pb and pa <= pd else b if pb <= pd else d)) & 255
            out[y] = np.frombuffer(cur, np.uint8)
        else:
            raise ValueError(f"{str(path)!r}: unknown filter type {ftype} in row {y}")
        prev = out[y]
    return out.reshape(h, w, c)


# ----------------------------------------------------------------------------- parameters

SAMPLER_NAMES = {"DDIMScheduler": "DDIM", "EulerDiscreteScheduler": "Euler",
                 "DPMSolverMultistepScheduler": "DPM++ 2M", "LCMScheduler": "LCM"}  # AUTOMATIC1111's names


def _version() -> str:
    try:
        from . import __version__
        return __version__
    except ImportError:  # no __version__ in __init__.py, or this file loaded on its own
        from importlib.metadata import PackageNotFoundError, version
        try:
            return version("mini_tgate")
        except PackageNotFoundError:
            return "unknown"


def _quote(value) -> str:  # AUTOMATIC1111 quotes a value that would break its "Key: value, ..." line
    value = str(value)
    return json.dumps(value, ensure_ascii=False) if any(ch in value for ch in ",:\n") else value


def format_parameters(params: dict) -> dict[str, str]:
    """The text chunks describing how one image was made, for `save_png(path, image, text=...)`.

    `params` keys (any may be missing; extra keys are kept in the JSON): prompt, negative_prompt,
    seed, steps, guidance_scale, scheduler (class name), tgate (a TGate, a dict of gate_step,
    sp_interval, fi_interval, warm_up, or None for plain sampling), model, width, height, dtype
    (a torch.dtype or its name), version (default: this package's). Returns
    {"parameters": AUTOMATIC1111's text, "mini_tgate": the same as JSON}."""
    p = dict(params)
    p.setdefault("version", _version())
    if dataclasses.is_dataclass(p.get("tgate")):
        p["tgate"] = dataclasses.asdict(p["tgate"])
    if p.get("dtype") is not None:
        p["dtype"] = str(p["dtype"]).removeprefix("torch.")
    gate = p.get("tgate")
    fields = {  # "prompt\nNegative prompt: ...\nSteps: 25, Sampler: DDIM, CFG scale: 7.5, Seed: 0, ..."
        "Steps": p.get("steps"),
        "Sampler": SAMPLER_NAMES.get(p.get("scheduler"), p.get("scheduler")),
        "CFG scale": p.get("guidance_scale"),
        "Seed": p.get("seed"),
        "Size": f"{p['width']}x{p['height']}" if p.get("width") and p.get("height") else None,
        "Model": p.get("model"),
        "TGATE": ", ".join(f"{k}={v}" for k, v in gate.items()) if gate else None,
        "Dtype": p.get("dtype"),
        "Version": f"mini_tgate {p['version']}",
    }
    lines = [p.get("prompt") or ""]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None))
    return {"parameters": "\n".join(lines), "mini_tgate": json.dumps(p, ensure_ascii=False, default=str)}


def describe(path) -> str:
    """A human-readable summary of a PNG file: size, pixel format, and its stored parameters."""
    chunks = _read_chunks(path)
    w, h, depth, color, interlace = _header(chunks)
    lines = [(f"{path}: {w}x{h} (width x height), {COLOR_NAMES.get(color, f'color type {color}')}, "
              f"{depth}-bit{', interlaced' if interlace else ''}, {os.path.getsize(path):,} bytes")]
    text = read_png_text(path)
    try:
        params = json.loads(text.get("mini_tgate", "{}"))
    except ValueError:
        params = None  # not ours after all: shown as it is below
    if isinstance(params, dict) and params:
        text.pop("mini_tgate")
        text.pop("parameters", None)  # the same as the JSON, in AUTOMATIC1111's format
        for key, value in params.items():
            if key == "tgate":
                value = (", ".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict)
                         else "none (plain sampling)")
            lines.append(f"  {key}: {value}")
    for key, value in text.items():
        lines.append(f"  {key}: " + value.replace("\n", "\n    "))
    if len(lines) == 1:
        lines.append("  (no text chunks)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- layouts

def image_grid(images, cols: int | None = None) -> np.ndarray:
    """(N, H, W, C) -> one (rows*H, cols*W, C) image, row by row; roughly square by default,
    empty cells black."""
    images = np.asarray(images)
    if images.ndim != 4 or len(images) == 0:
        raise ValueError(f"expected images of shape (N, H, W, C), got {images.shape}")
    n, h, w, c = images.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = -(-n // cols)
    grid = np.zeros((rows * cols, h, w, c), images.dtype)
    grid[:n] = images
    return grid.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def side_by_side(a, b, diff: bool = True) -> np.ndarray:
    """[a | b | |a - b|] as float32 in [0, 1] (uint8 inputs are divided by 255). The difference
    panel is gray, the largest channel difference per pixel scaled so the largest one is white
    (all black when a == b)."""
    a, b = np.asarray(a), np.asarray(b)
    a, b = (x.astype(np.float32) / (255 if x.dtype == np.uint8 else 1) for x in (a, b))
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"expected two images of the same shape (H, W, C), got {a.shape} and {b.shape}")
    panels = [a, b]
    if diff:
        d = np.abs(a - b).max(axis=-1, keepdims=True)
        panels.append(np.broadcast_to(d / d.max() if d.max() > 0 else d, a.shape))
    return np.concatenate(panels, axis=1)
