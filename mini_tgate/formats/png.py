"""PNG files with the standard library (zlib, struct) and numpy: no Pillow needed at run time.

The package writes PNGs and reads back only their text chunks (`info`); it has no pixel decoder
(reading arbitrary images is Pillow's job, when it is installed). A PNG file is an 8-byte
signature followed by chunks, each
    length (4 bytes, big-endian) | type (4 ASCII letters) | data (length bytes) | CRC-32 of type+data.
The chunks written here, in file order:
    IHDR  width, height (uint32), bit depth (8), color type (0 gray, 2 RGB, 4 gray+alpha,
          6 RGBA), compression 0, filter method 0, interlace 0
    tEXt  keyword \\0 text, both Latin-1          (zTXt: keyword \\0 0 zlib(text); read, not written)
    iTXt  keyword \\0 compressed? method \\0 language \\0 translated keyword \\0 text in UTF-8
    IDAT  zlib stream of the rows, each prefixed by a filter-type byte; every row here uses
          filter 2 (Up): each byte minus the byte above it, mod 256 (spec section 9)
    IEND  empty; the end of the file
An animated PNG (`encode_apng`) adds acTL (frame count, plays) after IHDR, an fcTL (frame control:
size, offset, delay) before each frame, and stores frame 0 as IDAT (what a viewer without APNG
support shows), later frames as fdAT (a sequence number, then IDAT's data); the readers here skip
all three. Spec: https://www.w3.org/TR/png/, https://wiki.mozilla.org/APNG_Specification.
Generation parameters are stored as text chunks: `parameters` in the AUTOMATIC1111 convention
(read by most SD tools) and `mini_tgate`, the same as JSON.
Reading trusts nothing in the file: see the bounds (MAX_PNG_TEXT ...) in the reading section.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import stat
import struct
import uuid
import zlib
from fractions import Fraction
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

from ..core.bounds import MAX_APNG_FRAMES, MAX_PNG_CHUNKS, MAX_PNG_TEXT, MAX_PNG_TOTAL_TEXT, is_number
from ..version import __version__

SIGNATURE = b"\x89PNG\r\n\x1a\n"
CHANNELS = {0: 1, 4: 2, 2: 3, 6: 4}  # color type -> channels
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


def _image_data(image: np.ndarray) -> bytes:
    """IDAT's data for a uint8 (H, W, C) image: the rows, Up-filtered, zlib-compressed."""
    h, w, c = image.shape
    rows = image.reshape(h, w * c)
    up = rows.copy()
    up[1:] -= rows[:-1]  # the Up filter (type 2) on every row: each byte minus the byte above, mod 256
    return zlib.compress(np.hstack([np.full((h, 1), 2, np.uint8), up]).tobytes())


def _header(image: np.ndarray) -> bytes:
    h, w, c = image.shape
    return SIGNATURE + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0))


def _text_chunks(text: dict[str, str] | None) -> bytes:
    return b"".join(_text_chunk(k, v) for k, v in (text or {}).items())


def encode_png(image, text: dict[str, str] | None = None) -> bytes:
    """The bytes of a PNG file holding `image` (see `to_uint8`) and the text entries."""
    image = to_uint8(image)
    return _header(image) + _text_chunks(text) + _chunk(b"IDAT", _image_data(image)) + _chunk(b"IEND", b"")


def apng_delay(fps) -> tuple[int, int]:
    """The frame delay 1/fps seconds as APNG's (delay_num, delay_den), both 1..65535: exact where
    it can be (fps 7 -> (1, 7), 29.97 -> (100, 2997)), else the nearest such fraction."""
    if not is_number(fps) or not 1 / 65535 <= float(fps) <= 65535:
        raise ValueError(f"fps must be a finite number from 1/65535 to 65535 (an APNG frame delay is "
                         f"num/den seconds, both 16-bit), got {fps!r}")
    fps = float(fps)  # a fraction with den <= 65535 and value <= 1 has num <= 65535 too
    d = Fraction(1 / fps).limit_denominator(65535) if fps >= 1 else 1 / Fraction(fps).limit_denominator(65535)
    return d.numerator, d.denominator


def encode_apng(frames, fps, text: dict[str, str] | None = None) -> bytes:
    """The bytes of an animated PNG of `frames`, (F, H, W, C) float in [0, 1] or uint8 (see
    `to_uint8`; C is 3 for a video), shown `fps` frames a second, looping forever, with the
    text entries. Frame 0 is the image that viewers without APNG support show."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[3] not in CHANNELS.values() or 0 in frames.shape[1:]:
        raise ValueError(f"expected frames of shape (F, H, W, C) with C in 1-4, got {frames.shape}")
    if not 1 <= len(frames) <= MAX_APNG_FRAMES:
        raise ValueError(f"an APNG holds 1 to {MAX_APNG_FRAMES:,} frames, got {len(frames):,}")
    num, den = apng_delay(fps)
    first = to_uint8(frames[0])  # the dtype is checked here, before any frame is compressed
    _, h, w, _ = frames.shape
    out, seq = [_header(first), _chunk(b"acTL", struct.pack(">II", len(frames), 0)), _text_chunks(text)], 0
    for i, frame in enumerate(frames):  # fcTL and fdAT chunks share one sequence, from 0
        # sequence, width, height, x and y offset, delay num/den, dispose_op 0 (none), blend_op 0 (source)
        out.append(_chunk(b"fcTL", struct.pack(">IIIIIHHBB", seq, w, h, 0, 0, num, den, 0, 0)))
        data = _image_data(first if i == 0 else to_uint8(frame))
        out.append(_chunk(b"IDAT", data) if i == 0 else _chunk(b"fdAT", struct.pack(">I", seq + 1) + data))
        seq += 1 if i == 0 else 2
    return b"".join(out) + _chunk(b"IEND", b"")


def save_png(path, image, text: dict[str, str] | None = None, *, overwrite: bool = True) -> None:
    """Write `image` (float in [0, 1] or uint8; (H, W, 3) as the pipeline's output_type "np"
    gives one image) with text chunks to `path`, atomically: the file is written next to the
    target under a temporary name and moved into place, so `path` is either the old file (or
    none) or the complete new one. The parent directory must exist (it is not created).

    overwrite=False: FileExistsError if `path` exists, even if another process created it a moment
    ago, and nothing is replaced: the complete file is hard-linked to `path`, which fails if the
    name is taken (where the file system has no hard links, `path` is created exclusively and
    written in place). Two runs numbering files in one folder can claim names this way."""
    _write_file(Path(path), encode_png(image, text), overwrite)  # every ValueError before the disk is touched


def save_apng(path, frames, fps, text: dict[str, str] | None = None, *, overwrite: bool = False) -> None:
    """Write `frames` as an animated PNG (see `encode_apng`) to `path`, as `save_png` writes a PNG
    (atomically; overwrite=False, the default here: FileExistsError if `path` exists)."""
    _write_file(Path(path), encode_apng(frames, fps, text), overwrite)


def _write_file(path: Path, data: bytes, overwrite: bool) -> None:
    """`data` to `path` atomically, as `save_png` describes."""
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
        if overwrite:
            os.replace(tmp, path)
        else:
            _link_new(tmp, path, data)
    except FileExistsError as e:
        raise FileExistsError(f"cannot write {str(path)!r}: the file exists (not overwritten)") from e
    except OSError as e:
        raise type(e)(f"cannot write {str(path)!r}: {e.strerror or e}") from e
    finally:
        tmp.unlink(missing_ok=True)


def _link_new(tmp: Path, path: Path, data: bytes) -> None:
    """Give the complete file `tmp` the new name `path`; FileExistsError if `path` exists."""
    try:
        os.link(tmp, path)  # atomic, and never replaces an existing name
        return
    except FileExistsError:
        raise
    except (OSError, AttributeError) as e:  # no hard links on this file system (FAT, some network mounts)
        if isinstance(e, OSError) and e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS):
            raise
    with open(path, "xb") as f:
        try:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        except BaseException:
            f.close()
            path.unlink()  # ours, half-written: no broken image under a name another run would skip
            raise


# ----------------------------------------------------------------------------- reading
# Only the text chunks are read, never the image data: the file may come from anywhere, so every
# read is bounded. The reader walks the chunks one by one, reading a chunk's data only for IHDR
# and text and seeking over the rest (IDAT, unknown chunks); the bounds below are far above what
# any SD tool writes (A1111's longest `parameters` are a few KiB) and far below a memory problem
# (core/bounds.py: MAX_PNG_*).



def _open_regular(path):
    """An open binary file for `path`, refused unless it is a regular file: reading a FIFO would
    wait forever for a writer, /dev/zero or /dev/urandom never end, a directory cannot be read.
    Checked before opening (a device is not even opened) and again on the open file, which was
    opened non-blocking so that a FIFO swapped in between cannot hang the open itself."""
    what = lambda mode: ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
                         else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                         else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    try:
        mode = os.stat(path).st_mode
        if not stat.S_ISREG(mode):
            raise ValueError(f"{str(path)!r} is {what(mode)}, not a PNG file")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise type(e)(f"cannot read {str(path)!r}: {e.strerror or e}") from e
    f = os.fdopen(fd, "rb")
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        f.close()
        raise ValueError(f"{str(path)!r} is {what(mode)}, not a PNG file")
    return f


def _read_chunks(path, wanted: tuple[bytes, ...]):
    """(IHDR fields, [(type, data), ...] of the `wanted` chunk types in file order, file size).

    Checks the signature first, then each chunk's length and type; the CRC of every chunk read.
    Other chunks are seeked over (their data is never read), the file's end is checked against
    the size, so a truncated file is found without reading it."""
    with _open_regular(path) as f:
        size = os.fstat(f.fileno()).st_size
        if f.read(len(SIGNATURE)) != SIGNATURE:
            raise ValueError(f"{str(path)!r} is not a PNG file")
        pos, chunks, header, text_bytes = len(SIGNATURE), [], None, 0
        for index in range(MAX_PNG_CHUNKS):
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{str(path)!r} is truncated (no IEND chunk)")
            (length,), kind = struct.unpack(">I", head[:4]), head[4:]
            if not kind.isalpha() or length > 2**31 - 1:  # the spec's chunk types and length limit
                raise ValueError(f"{str(path)!r} is corrupt (chunk {index} has type {kind!r} and length {length})")
            if pos + 12 + length > size:
                raise ValueError(f"{str(path)!r} is truncated (in a {kind!r} chunk)")
            if index == 0 and (kind != b"IHDR" or length != 13):
                raise ValueError(f"{str(path)!r} has no valid IHDR chunk")
            if (kind == b"IHDR" and index == 0) or kind == b"IEND" or kind in wanted:
                if kind in (b"tEXt", b"zTXt", b"iTXt"):
                    text_bytes += length
                    if length > 2 * MAX_PNG_TEXT or text_bytes > 2 * MAX_PNG_TOTAL_TEXT:  # compressed text: about 1:1 at worst
                        raise ValueError(f"{str(path)!r} has more text than this reader accepts "
                                         f"({MAX_PNG_TEXT >> 20} MiB a value, {MAX_PNG_TOTAL_TEXT >> 20} MiB in all)")
                data, crc = f.read(length), f.read(4)
                if struct.unpack(">I", crc)[0] != zlib.crc32(kind + data):
                    raise ValueError(f"{str(path)!r} is corrupt (CRC mismatch in a {kind!r} chunk)")
                if kind == b"IHDR":
                    # width, height, bit depth, color type, compression, filter, interlace
                    header = struct.unpack(">IIBBBBB", data)
                elif kind == b"IEND":
                    return header, chunks, size
                else:
                    chunks.append((kind, data))
            else:
                f.seek(length + 4, os.SEEK_CUR)
            pos += 12 + length
    raise ValueError(f"{str(path)!r} has more than {MAX_PNG_CHUNKS:,} chunks (this reader's limit)")


def _inflate(data: bytes, path, key: str) -> bytes:
    """zlib data of a text value, refused past MAX_PNG_TEXT bytes (a few MiB of zeros inflate to GiBs)."""
    z = zlib.decompressobj()
    try:
        out = z.decompress(data, MAX_PNG_TEXT + 1)
    except zlib.error as e:
        raise ValueError(f"{str(path)!r} has a malformed text chunk {key!r}: {e}") from None
    if len(out) > MAX_PNG_TEXT:
        raise ValueError(f"{str(path)!r}: the text {key!r} inflates to more than {MAX_PNG_TEXT >> 20} MiB "
                         f"(this reader's limit for one value)")
    if not z.eof:
        raise ValueError(f"{str(path)!r} has a malformed text chunk {key!r}: incomplete zlib data")
    return out


def _text(path, chunks) -> dict[str, str]:
    text, total = {}, 0
    for kind, body in chunks:
        key, sep, rest = body.partition(b"\0")
        key = key.decode("latin-1")
        fields = rest[2:].split(b"\0", 2) if kind == b"iTXt" else None  # language, translated keyword, text
        if not sep or (kind == b"zTXt" and not rest) or (fields is not None and (len(rest) < 2 or len(fields) < 3)):
            raise ValueError(f"{str(path)!r} has a malformed {kind.decode()} chunk {key!r}")
        if kind == b"tEXt":
            value = rest
        elif kind == b"zTXt":  # compression method (0) then zlib data
            value = _inflate(rest[1:], path, key)
        else:  # iTXt: compressed flag, method, then the fields
            value = _inflate(fields[2], path, key) if rest[0] else fields[2]
        if len(value) > MAX_PNG_TEXT or (total := total + len(value)) > MAX_PNG_TOTAL_TEXT:
            raise ValueError(f"{str(path)!r} has more text than this reader accepts "
                             f"({MAX_PNG_TEXT >> 20} MiB a value, {MAX_PNG_TOTAL_TEXT >> 20} MiB in all)")
        try:
            text[key] = value.decode("utf-8" if kind == b"iTXt" else "latin-1")
        except UnicodeDecodeError as e:
            raise ValueError(f"{str(path)!r} has a malformed iTXt chunk {key!r}: {e}") from None
    return text


def read_png_text(path) -> dict[str, str]:
    """The text entries (tEXt, zTXt, iTXt compressed or not) of any PNG file, without reading
    its image data. ValueError for a file that is not a readable PNG or holds more text than
    MAX_PNG_TEXT a value / MAX_PNG_TOTAL_TEXT in all; a later entry with the same key wins."""
    _, chunks, _ = _read_chunks(path, (b"tEXt", b"zTXt", b"iTXt"))
    return _text(path, chunks)


# ----------------------------------------------------------------------------- parameters

SAMPLER_NAMES = {"DDIMScheduler": "DDIM", "EulerDiscreteScheduler": "Euler",  # AUTOMATIC1111's names
                 "EulerAncestralDiscreteScheduler": "Euler a", "DPMSolverMultistepScheduler": "DPM++ 2M",
                 "LCMScheduler": "LCM"}


def _quote(value) -> str:  # AUTOMATIC1111 quotes a value that would break its "Key: value, ..." line
    value = str(value)
    return json.dumps(value, ensure_ascii=False) if any(ch in value for ch in ",:\n") else value


def _lora_hashes(hashes) -> str | None:
    """A1111's "Lora hashes" value, "name1: hash1, name2: hash2" (quoted as a whole by _quote):
    each name without ":" and "," (A1111 removes them, so its reader can split the value)."""
    if not hashes:
        return None
    if isinstance(hashes, str):
        return hashes
    return ", ".join(f"{str(name).translate(NO_SEPARATORS)}: {h}" for name, h in hashes.items())


NO_SEPARATORS = str.maketrans("", "", ":,")


def _emphasis(emphasis, prompt, negative) -> str | None:
    """A1111's "Emphasis": its mode's name when not the default "Original", and only when a
    prompt uses "(" or "[" (sd_hijack_clip: its reader takes "Original" for such a prompt
    without the field)."""
    name = ("Original" if emphasis else "None") if isinstance(emphasis, bool) else emphasis
    used = any(ch in (text or "") for text in (prompt, negative) for ch in "([")
    return name if name not in (None, "Original") and used else None


def _short_model_name(model: str) -> str:
    """"org/repo" and relative names as given; an absolute local path (POSIX or Windows) by its
    last component, so a PNG does not carry the user's folder layout."""
    for path in (PurePosixPath(model), PureWindowsPath(model)):
        if path.is_absolute() or path.drive:
            return path.name or model
    return model


def format_parameters(params: dict) -> dict[str, str]:
    """The text chunks describing how one image was made, for `save_png(path, image, text=...)`.

    `params` keys (any may be missing; extra keys are kept in the JSON):
      prompt, negative_prompt, seed, steps, guidance_scale,
      scheduler       the scheduler's class name, e.g. "DPMSolverMultistepScheduler"
      sampler         A1111's sampler name ("DPM++ 2M", "Euler a"); default: from `scheduler`
      schedule_type   A1111's "Schedule type" ("Karras", "Automatic", ...)
      tgate           a TGate, a dict of gate_step, sp_interval, fi_interval, warm_up, or None
      deepcache       a DeepCache, a dict of interval, branch, or None
      strength        img2img's strength (A1111's "Denoising strength")
      model           a short name ("tiny-shapes", "org/repo"); an absolute path keeps its last part
      model_hash      A1111's short hash (10 hex digits), model_revision: the hub commit
      batch_size, batch_pos   written (A1111's "Batch size", "Batch pos") when batch_size > 1
      rng             A1111's "RNG", the noise's source: "CPU" (a torch.Generator on the CPU, as the
                      CLI draws it), written unless A1111's default "GPU"
      lora_hashes     {name: A1111's short LoRA hash (hub.lora_hash)}: A1111's "Lora hashes"
      emphasis        A1111's prompt emphasis: "Original" (or True: applied; not written, A1111's
                      default) or "None" (or False: the text taken literally), written as A1111 does
                      only when the prompt or negative prompt holds "(" or "["
      width, height   the size of the saved image (of the grid, for a grid)
      dtype           a torch.dtype or its name; version: default this package's
    Returns {"parameters": AUTOMATIC1111's text, "mini_tgate": the same as JSON}. The last line of
    `parameters` is "Key: value, Key: value, ..." in A1111's order, our keys after theirs; each
    TGATE (and DeepCache) number is a key of its own ("TGATE gate step: 10, ..."), so readers that split the
    line at every "," and ":" (sd-parsers does) keep every value whole."""
    p = dict(params)
    p.setdefault("version", __version__)
    for key in ("tgate", "deepcache"):
        if dataclasses.is_dataclass(p.get(key)):
            p[key] = dataclasses.asdict(p[key])
    if p.get("dtype") is not None:
        p["dtype"] = str(p["dtype"]).removeprefix("torch.")
    if p.get("model") is not None:
        p["model"] = _short_model_name(str(p["model"]))
    batch = p.get("batch_size") is not None and p["batch_size"] > 1
    fields = {  # "prompt\nNegative prompt: ...\nSteps: 25, Sampler: DDIM, CFG scale: 7.5, Seed: 0, ..."
        "Steps": p.get("steps"),
        "Sampler": p.get("sampler") or SAMPLER_NAMES.get(p.get("scheduler"), p.get("scheduler")),
        "Schedule type": p.get("schedule_type"),
        "CFG scale": p.get("guidance_scale"),
        "Seed": p.get("seed"),
        "Size": f"{p['width']}x{p['height']}" if p.get("width") and p.get("height") else None,
        "Model hash": p.get("model_hash"),
        "Model": p.get("model"),
        "Batch size": p["batch_size"] if batch else None,
        "Batch pos": p.get("batch_pos") if batch else None,
        "Denoising strength": p.get("strength"),
        "RNG": p.get("rng") if p.get("rng") != "GPU" else None,  # A1111 writes its source unless the default GPU
        "Lora hashes": _lora_hashes(p.get("lora_hashes")),
        "Emphasis": _emphasis(p.get("emphasis"), p.get("prompt"), p.get("negative_prompt")),
        **{f"TGATE {k.replace('_', ' ')}": v for k, v in (p.get("tgate") or {}).items()},
        **{f"DeepCache {k}": v for k, v in (p.get("deepcache") or {}).items()},
        "Model revision": p.get("model_revision"),
        "Dtype": p.get("dtype"),
        "Version": f"mini_tgate {p['version']}",
    }
    lines = [p.get("prompt") or ""]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields.items() if v is not None))
    return {"parameters": "\n".join(lines), "mini_tgate": json.dumps(p, ensure_ascii=False, default=str)}


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # C0 and C1 controls but tab and newline


def _printable(text: str, newlines: bool = True) -> str:
    """`text` safe for a terminal: control characters (ESC starts the sequences that move the
    cursor, clear the screen, retitle the window) shown escaped as \\x1b; newlines kept, or
    escaped too for a single-line field."""
    text = CONTROL.sub(lambda m: f"\\x{ord(m[0]):02x}", text)
    return text if newlines else text.replace("\n", "\\n")


def describe(path) -> str:
    """A human-readable summary of a PNG file: size, pixel format, and its stored parameters.
    Everything that came from the file is shown with its control characters escaped."""
    (w, h, depth, color, _, _, interlace), chunks, size = _read_chunks(path, (b"tEXt", b"zTXt", b"iTXt"))
    lines = [(f"{_printable(str(path), newlines=False)}: {w}x{h} (width x height), "
              f"{COLOR_NAMES.get(color, f'color type {color}')}, {depth}-bit{', interlaced' if interlace else ''}, "
              f"{size:,} bytes")]
    text = _text(path, chunks)
    params_lines = []
    try:
        params = json.loads(text.get("mini_tgate", "{}"))
        for key, value in params.items() if isinstance(params, dict) else ():
            if key == "tgate" and isinstance(value, dict):
                value = ", ".join(f"{k}={v}" for k, v in value.items())
            elif key == "tgate":  # null: plain sampling; anything else is no gate's record
                value = ("none (plain sampling)" if value is None
                         else f"{json.dumps(value)[:40]} (invalid: no gate's record)")
            params_lines.append(f"  {key}: {value}")
    except (ValueError, RecursionError):  # not JSON, or nested too deep to be ours: shown as it is below
        params_lines = []
    if params_lines:
        text.pop("mini_tgate")
        text.pop("parameters", None)  # the same as the JSON, in AUTOMATIC1111's format
        lines += [_printable(line).replace("\n", "\n    ") for line in params_lines]
    for key, value in text.items():
        lines.append(f"  {_printable(key, newlines=False)}: " + _printable(value).replace("\n", "\n    "))
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
