"""The jobs of the `batch` command (cli/batch.py): a file of prompts to a folder of PNGs, on one
process or on many.

    python -m mini_tgate batch prompts.txt --out images/ --steps 25 --batch-size 4
    torchrun --nproc-per-node 2 -m mini_tgate batch prompts.txt --out images/ --steps 25 --batch-size 4

The prompt file holds one prompt a line, or (a name ending in .jsonl) one JSON object a line:
{"prompt": ..., "negative": ..., "seed": ..., "id": ..., "image": ..., "strength": ...}, all but the
prompt optional. Image j of prompt k (of --num-images per prompt) is image i = k * num_images + j
of the job; it is named by its id (the line's id, or k as 00000) and seeded with its line's
seed + j, or the base --seed + i, from its own generator.

img2img: --image PATH starts every line from that image (read once), or a line's "image" (a path,
relative to the prompt file's folder) starts that line from its own; lines without one use
--image, and without --image either every line has one or none does. A batch is one pipeline
call, so the images of a batch must share a size and a strength. Every line's image is checked
up front from its header (Pillow reads no pixels: about 20 us a file, 20 s for a million lines)
and read when its batch runs. The records hold each image's SHA-256, so a file changed under
finished images is refused like a changed prompt; --image's is part of the options.

Why the files do not depend on the number of processes. A batch is not a sum of independent
images at the level of bits: matrix kernels pick their blocking and reduction order by the
tensors' shapes, so an image denoised beside three others can differ in the last float bit from
the same image alone, and a rounding to 8 bits can then flip. So the job is cut into batches
once, --batch-size consecutive images each, the same batches for any number of processes; the
batch, never the image, is the unit handed to a process (batch k of those still to do goes to
rank k mod world size). On the CPU the number of threads of a process also changes how
reductions split, so --threads is part of the options (default 1: one process a core, and more
processes for more cores); on a GPU each process has its own device.

Why a crash loses nothing and a rerun duplicates nothing. A PNG is written under a temporary
name and renamed (png.save_png); only then is its record appended (and fsynced) to this
process's own part file, `.manifest-XXXXXXXX.jsonl`. An image is done when its PNG and its
record are both there; a rerun plans again from the files, remakes the batches that are not
done (a PNG already there is kept, not rewritten), and at the end rank 0 merges every record
into `manifest.jsonl` (one line per image, in the job's order; written to a temporary name and
renamed) and deletes the parts and the temporary files of killed writers. Every record holds the
options that decide the pixels; a rerun with other options is refused, naming them. One job at a
time writes into a folder (folder_lock), and only regular files are opened there (open_regular): a
FIFO would hang the run. Records are read one at a time, so memory is flat in their number.

Processes talk through torch.distributed (launched by torchrun: gloo on the CPU, NCCL for CUDA
tensors); rank 0 plans and tells the others, all count their images after each round of batches
(one all_reduce) so that rank 0 shows the whole job's progress, and the totals end in a summary.
"""

from __future__ import annotations

import array
import codecs
import collections
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import itertools
import json
import math
import os
import re
import socket
import stat
import sys
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..core.bounds import (BATCH_MAX_IMAGES, BATCH_MAX_LOCK_TEXT, BATCH_MAX_MANIFEST, BATCH_MAX_PATH,
                           BATCH_MAX_PROMPT_CHARS, BATCH_MAX_PROMPT_FILE, BATCH_MAX_RECORD, CLI_MAX_SIDE, SEED_RANGE,
                           int_in, is_int, is_number)
from ..core.image import read_image, upright_size
from ..core.tgate import TGate
from ..formats.hub import file_sha256
from ..formats.png import format_parameters, read_png_text, save_png, to_uint8
from .loras import untagged
from .options import check_runs_a_step, random_seed

try:
    import fcntl
except ImportError:  # Windows: folder_lock warns instead
    fcntl = None

ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")  # a file name: no "/", no leading "." (ours: temp and parts)
JSONL_KEYS = ("prompt", "negative", "seed", "id", "image", "strength")
MANIFEST = "manifest.jsonl"
LOCK, LOCKED = ".batch.lock", "mini_tgate batch: "  # the lock file of a folder in use, and how its line starts
PART = re.compile(r"\.manifest-[0-9a-f]{8}\.jsonl")
GRADES = ("color", "background", "shape", "all")  # the shapes checker's, in the summary


@dataclass(frozen=True)
class Line:
    """One prompt of the prompt file."""
    number: int              # its line number in the file (1-based), for messages
    prompt: str
    negative: str | None = None
    seed: int | None = None  # None: the job's base seed + the image's index
    id: str | None = None    # None: the prompt's index, as 00000
    image: str | None = None  # img2img: the image file (resolved), None: --image or text to image
    strength: float | None = None  # None: --strength, else the pipeline's


@dataclass(frozen=True)
class Image:
    """One image of the job."""
    id: str                  # the file is ID.png
    prompt: str
    negative: str | None
    seed: int
    line: int
    image: str | None = None     # img2img: the line's image file; None: --image (in the call's options) or none
    strength: float | None = None  # img2img: the line's or --strength; None: the pipeline's


# ----------------------------------------------------------------------------- the prompt file

def read_prompts(path) -> list[Line]:
    """The prompts of a text file (one a line; blank lines skipped) or, for a name ending in
    .jsonl, of a JSON-lines file. ValueError naming the line for anything malformed."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise type(e)(f"cannot read the prompt file {str(path)!r}: {e.strerror or e}") from e
    if not stat.S_ISREG(mode):  # a FIFO or a device could block or never end
        raise ValueError(f"the prompt file {str(path)!r} is not a regular file")
    with open(path, "rb") as f:
        data = f.read(BATCH_MAX_PROMPT_FILE + 1)
    if len(data) > BATCH_MAX_PROMPT_FILE:
        raise ValueError(f"the prompt file {str(path)!r} is larger than {BATCH_MAX_PROMPT_FILE >> 20} MiB "
                         f"(this command's limit); split it")
    data = data.removeprefix(codecs.BOM_UTF8)  # Notepad's byte-order mark: not part of the first prompt
    jsonl = path.suffix.lower() == ".jsonl"
    folder = path.resolve().parent  # a line's image path is relative to the prompt file
    lines = []
    for number, raw in enumerate(data.split(b"\n"), 1):
        where = f"{path.name} line {number}"
        try:
            text = raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})") from None
        if not text.strip():
            continue
        line = parse_jsonl(text, number, where) if jsonl else Line(number, text.strip())
        if line.image is not None:
            line = dataclasses.replace(line, image=str(folder / line.image))
        for what, value in (("prompt", line.prompt), ("negative prompt", line.negative or "")):
            if len(value) > BATCH_MAX_PROMPT_CHARS:
                raise ValueError(f"{where}: the {what} has {len(value)} characters, more than {BATCH_MAX_PROMPT_CHARS}")
            if "\0" in value:
                raise ValueError(f"{where}: the {what} holds a NUL character")
        lines.append(line)
        if len(lines) > BATCH_MAX_IMAGES:
            raise ValueError(f"{path.name}: more than {BATCH_MAX_IMAGES:,} prompts (this command's limit); split the file")
    if not lines:
        raise ValueError(f"the prompt file {str(path)!r} holds no prompt (it is empty or blank)")
    return lines


def parse_jsonl(text: str, number: int, where: str) -> Line:
    try:
        entry = json.loads(text)
    except (ValueError, RecursionError) as e:
        raise ValueError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a JSON object such as {{\"prompt\": \"a cat\"}}, got {type(entry).__name__}")
    unknown = set(entry) - set(JSONL_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(map(repr, unknown)))}; "
                         f"allowed: {', '.join(JSONL_KEYS)}")
    if not isinstance(entry.get("prompt"), str):
        raise ValueError(f"{where}: \"prompt\" must be given, as a string")
    negative, seed, id = entry.get("negative"), entry.get("seed"), entry.get("id")
    image, strength = entry.get("image"), entry.get("strength")
    if negative is not None and not isinstance(negative, str):
        raise ValueError(f"{where}: \"negative\" must be a string")
    if seed is not None and not int_in(seed, 0, SEED_RANGE - 1):
        raise ValueError(f"{where}: \"seed\" must be an integer from 0 to 2**63 - 1, got {seed!r}")
    if id is not None and (not isinstance(id, str) or not ID.fullmatch(id)):
        raise ValueError(f"{where}: \"id\" must be 1-100 letters, digits, '_', '-' or '.', not starting "
                         f"with '.', '_' or '-' (it names the file), got {id!r}")
    if image is not None and (not isinstance(image, str) or not 0 < len(image) <= BATCH_MAX_PATH or "\0" in image):
        raise ValueError(f"{where}: \"image\" must be a file path (1 to {BATCH_MAX_PATH} characters), got {image!r:.100}")
    if strength is not None and not (is_number(strength) and 0 < strength <= 1):
        raise ValueError(f"{where}: \"strength\" must be a number in (0, 1], got {strength!r}")
    return Line(number, entry["prompt"], negative, seed, id, image, strength)


def job_images(lines: list[Line], num_images: int, base_seed: int, negative: str | None = None,
               strength: float | None = None) -> list[Image]:
    """The job's images, in order: num_images per line. `negative` and `strength` are for lines
    without their own."""
    total = len(lines) * num_images
    if not 1 <= num_images or total > BATCH_MAX_IMAGES:
        raise ValueError(f"--num-images {num_images}: from 1 to {BATCH_MAX_IMAGES // len(lines):,} for "
                         f"{len(lines):,} prompts ({BATCH_MAX_IMAGES:,} images a job at most)")
    if not 0 <= base_seed <= SEED_RANGE - total:
        raise ValueError(f"--seed {base_seed}: must be -1 (random) or from 0 to 2**63 - {total} (image i gets seed + i)")
    images, taken = [], {}
    for k, line in enumerate(lines):
        for j in range(num_images):
            i = k * num_images + j
            if line.seed is not None and line.seed + j >= SEED_RANGE:
                raise ValueError(f"line {line.number}: seed {line.seed} + {j} is past 2**63 - 1")
            name = (line.id or f"{k:05d}") + (f"-{j}" if num_images > 1 else "")
            if name.lower() in taken:  # case-insensitive: "A.png" and "a.png" are one file on some systems
                raise ValueError(f"line {line.number}: image id {name!r} is also line {taken[name.lower()]}'s; "
                                 "ids name the files and must be unique")
            taken[name.lower()] = line.number
            seed = base_seed + i if line.seed is None else line.seed + j
            images.append(Image(name, line.prompt, line.negative if line.negative is not None else negative, seed,
                                line.number, line.image, line.strength if line.strength is not None else strength))
    return images


# ----------------------------------------------------------------------------- processes

def distributed() -> tuple[int, int]:
    """(rank, world size). Under torchrun (WORLD_SIZE is set) the process group is started:
    gloo for CPU tensors, NCCL for CUDA ones where there is CUDA. Launched plainly: (0, 1)."""
    if "WORLD_SIZE" not in os.environ:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


def broadcast(value, world: int):
    """Rank 0's `value` on every rank."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def total(values: list[float], world: int) -> torch.Tensor:
    """Each rank's values summed over the ranks (float64 on the CPU)."""
    t = torch.tensor(values, dtype=torch.float64)
    if world > 1:
        dist.all_reduce(t)
    return t


# ----------------------------------------------------------------------------- one job a folder

@contextlib.contextmanager
def folder_lock(folder: Path):
    """Hold `folder` for one job (rank 0 takes it for all the ranks of a torchrun job): an exclusive
    flock of OUT/.batch.lock until the job ends, or a one-line refusal naming the process that holds
    it (pid, host, start time: the file's line). The kernel drops the lock with its process, so a
    killed run never blocks the next; the file is removed, still locked, at the end, so a run that
    locked it meanwhile finds it gone and takes the new one. A folder made here and left empty goes too."""
    if fcntl is None:  # Windows
        warnings.warn(f"this system has no flock: nothing stops a second job writing into {str(folder)!r} at once")
        yield
        return
    made = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    while True:
        fd = open_regular(path, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, BATCH_MAX_LOCK_TEXT, 0).decode(errors="replace").removeprefix(LOCKED).split("\n")[0]
            os.close(fd)
            raise ValueError(f"{str(folder)!r} is in use by another batch job ({holder or 'starting'}); one job at a "
                             "time writes into a folder: wait for it to end, or choose another --out")
        if os.path.lexists(path) and os.path.samestat(os.fstat(fd), os.lstat(path)):
            break
        os.close(fd)  # removed by the job that held it, after this run opened it
    if os.pread(fd, len(LOCKED), 0) not in (b"", LOCKED.encode()):
        os.close(fd)
        raise ValueError(f"{str(path)!r} is in the way of batch's lock file and is not one; move it away")
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{LOCKED}pid {os.getpid()} on {socket.gethostname()}, started "
                     f"{time.strftime('%Y-%m-%d %H:%M:%S %z')}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        if made:
            with contextlib.suppress(OSError):  # not empty: the job's files
                folder.rmdir()


# ----------------------------------------------------------------------------- records

def open_regular(path: Path, flags: int = os.O_RDONLY) -> int:
    """A file descriptor of `path`, a file of an output folder, which must be a regular file (or,
    with O_CREAT, be made one): a FIFO there would block a reader forever, a device never end. Checked
    before opening (a device is not even opened) and on the open file, which is opened without
    following a symbolic link and non-blocking, so that a FIFO swapped in between cannot hang it."""
    def refuse(mode):
        kind = {stat.S_IFIFO: "a FIFO", stat.S_IFDIR: "a folder", stat.S_IFLNK: "a symbolic link",
                stat.S_IFSOCK: "a socket"}.get(stat.S_IFMT(mode), "a device")
        raise ValueError(f"{str(path)!r} is {kind}, not a regular file: batch never opens one there (it could "
                         "block forever); move it away, or choose another --out")
    if os.path.lexists(path) and not stat.S_ISREG(mode := os.lstat(path).st_mode):
        refuse(mode)
    fd = os.open(path, flags | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0), 0o644)
    if not stat.S_ISREG(mode := os.fstat(fd).st_mode):
        os.close(fd)
        refuse(mode)
    return fd


def records_at(path: Path):
    """(offset, record) for each JSON line of a manifest or part file, read one at a time. A last
    line without its newline is a write that a crash cut short, and is dropped; any other line that
    is not a JSON object is an error."""
    with os.fdopen(open_regular(path), "rb") as f:
        if os.fstat(f.fileno()).st_size > BATCH_MAX_MANIFEST:
            raise ValueError(f"{str(path)!r} is larger than {BATCH_MAX_MANIFEST >> 30} GiB: not a manifest of this "
                             "command")
        offset = 0
        for number, raw in enumerate(iter(lambda: f.readline(BATCH_MAX_RECORD + 1), b""), 1):
            if not raw.endswith(b"\n"):
                if len(raw) > BATCH_MAX_RECORD:
                    raise ValueError(f"{str(path)!r} line {number} is longer than {BATCH_MAX_RECORD >> 20} MiB")
                return  # cut short
            try:
                record = json.loads(raw)
            except (ValueError, RecursionError):
                record = None
            if not isinstance(record, dict) or not isinstance(record.get("id"), str):
                raise ValueError(f"{str(path)!r} line {number} is not a record of this command; "
                                 "move the file away or choose another --out")
            yield offset, record
            offset += len(raw)


def read_records(path: Path):
    """The records of a manifest or part file, one at a time (records_at)."""
    return (record for _, record in records_at(path))


def record_files(folder: Path) -> list[Path]:
    """A folder's manifest (when there) and part files, in the order their records count: a later
    record of an id wins."""
    parts = sorted(p for p in folder.glob(".manifest-*.jsonl") if PART.fullmatch(p.name)) if folder.is_dir() else []
    return [folder / MANIFEST] * os.path.lexists(folder / MANIFEST) + parts


def folder_records(folder: Path):
    """The records of a folder's manifest and part files, one at a time."""
    return (record for path in record_files(folder) for record in read_records(path))


def options_hash(options: dict) -> str:
    return hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()[:16]


def describe_options(old: dict, new: dict) -> str:
    keys = sorted(set(old) | set(new), key=str)
    return ", ".join(f"--{k.replace('_', '-')} {old.get(k)!r} (now {new.get(k)!r})" for k in keys
                     if old.get(k) != new.get(k))


# ----------------------------------------------------------------------------- the job

@dataclass
class Job:
    """The images, where they go, and everything that decides their pixels.

    folders: {name: (folder, gate)}: one folder, or with compare_tgate "no-tgate" and "tgate".
    options: the options that decide the pixels (JSON values), the gate aside: a folder's
    records carry these with its own "tgate"."""
    images: list[Image]
    folders: dict[str, tuple[Path, TGate | None]]
    options: dict
    batch_size: int

    @functools.cached_property
    def batches(self) -> list[list[Image]]:
        b = self.batch_size
        return [self.images[k:k + b] for k in range(0, len(self.images), b)]

    def folder_options(self, name: str) -> dict:
        gate = self.folders[name][1]
        options = {**self.options, "tgate": None if gate is None else dataclasses.asdict(gate)}
        return json.loads(json.dumps(options, sort_keys=True, default=str))  # as read back from a manifest

    @functools.cached_property
    def positions(self) -> dict[str, int]:
        """{id: index} of the job's images: a record names its image by id."""
        return {image.id: i for i, image in enumerate(self.images)}

    def plan(self) -> list[int]:
        """The indices of the batches still to do: those with an image whose PNG or record is
        missing in some folder. Refuses a folder whose images were made with other options or
        other prompts, and a file at an image's name that is not that image. The records are
        read one at a time, never held: each is checked as read."""
        done, digest = [True] * len(self.batches), functools.cache(file_sha256)
        for name, (folder, _) in self.folders.items():
            options, recorded = self.folder_options(name), bytearray(len(self.images))
            for record in folder_records(folder):
                i = self.positions.get(record["id"])
                if i is not None:
                    self.check_record(record, self.images[i], folder, options, digest)
                    recorded[i] = 1
            for i, image in enumerate(self.images):
                path, k = folder / f"{image.id}.png", i // self.batch_size
                if not path.exists() and not path.is_symlink():
                    done[k] = False
                    continue
                self.check_existing(path, image, options)
                done[k] = done[k] and recorded[i]
        return [k for k, d in enumerate(done) if not d]

    @staticmethod
    def check_record(record: dict, image: Image, folder: Path, options: dict, digest) -> None:
        """A record of one of the job's images must be of these options, this prompt and seed, and this image file."""
        path = folder / f"{image.id}.png"
        if record.get("options") != options:
            raise ValueError(f"{str(folder)!r} holds images made with other options: "
                             f"{describe_options(record.get('options') or {}, options)}; rerun "
                             "with the same options, or choose another --out")
        if (record.get("prompt"), record.get("negative_prompt"), record.get("seed"), record.get("image"),
                record.get("strength")) != (image.prompt, image.negative, image.seed, image.image, image.strength):
            raise ValueError(f"line {image.line} of the prompt file changed since {str(path)!r} "
                             f"was made (it was {record.get('prompt')!r}, seed {record.get('seed')}"
                             + (f", image {record['image']!r}" if record.get("image") else "")
                             + "); restore the file, or choose another --out")
        if image.image is not None and record.get("image_sha256") != digest(image.image):
            raise ValueError(f"the image file {image.image!r} of line {image.line} changed since "
                             f"{str(path)!r} was made from it; restore it, or choose another --out")

    @staticmethod
    def check_existing(path: Path, image: Image, options: dict) -> None:
        """A file at an image's name must be that image, complete: it is kept, never replaced."""
        try:
            params = json.loads(read_png_text(path).get("mini_tgate", "null"))
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{str(path)!r} is in the way of an image of this job and is not a readable "
                             f"PNG ({e}); move it away and rerun") from None
        if not isinstance(params, dict) or params.get("batch_options") != options_hash(options) or \
                (params.get("prompt"), params.get("negative_prompt"), params.get("seed")) != \
                (image.prompt, image.negative, image.seed):
            raise ValueError(f"{str(path)!r} is in the way of an image of this job and was not made by it "
                             "(other options, prompt or seed); move it away, or choose another --out")

    def merge(self) -> None:
        """Rank 0, after every rank is done: each folder's records into manifest.jsonl, one line
        an image (the job's images in order, then any other images the folder held before),
        written under a temporary name and renamed; then the parts and stale temporary PNGs go.
        Memory is flat in the records: a first pass notes where each image's last record lies (a
        later record of an id wins), the second copies those lines one at a time. Ids not of the
        job (lines since dropped from the prompt file: few) are kept in a dict, in the order first seen."""
        for name, (folder, _) in self.folders.items():
            files = record_files(folder)
            file_of = array.array("q", [-1]) * len(self.images)  # where each image's last record lies: file,
            offset_of, others = array.array("q", file_of), {}  # offset; others: {id: (file, offset)}
            for n, path in enumerate(files):
                for offset, record in records_at(path):
                    i = self.positions.get(record["id"])
                    if i is None:
                        others[record["id"]] = n, offset
                    else:
                        file_of[i], offset_of[i] = n, offset
            tmp = folder / f".{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                with contextlib.ExitStack() as stack, open(tmp, "xb") as out:
                    readers = [stack.enter_context(os.fdopen(open_regular(path), "rb")) for path in files]
                    for n, offset in itertools.chain(zip(file_of, offset_of), others.values()):
                        if n >= 0:
                            readers[n].seek(offset)
                            out.write(readers[n].readline(BATCH_MAX_RECORD + 1))
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(tmp, folder / MANIFEST)
            finally:
                tmp.unlink(missing_ok=True)
            for part in files:
                if part.name != MANIFEST:
                    part.unlink(missing_ok=True)
            names = {f".{image.id}.png" for image in self.images}
            for tmp in folder.glob(".*.png.*.tmp"):  # save_png's temporary names, left by a killed writer
                if tmp.name.rsplit(".", 2)[0] in names:
                    tmp.unlink(missing_ok=True)


def image_size(path: str, where: str) -> tuple[int, int]:
    """(width, height) of an image file that img2img can take, from its header (no pixels decoded)."""
    try:
        from PIL import Image as PILImage
    except ImportError:
        raise ImportError(f"{where}: reading image files needs Pillow (pip install pillow)") from None
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):  # a FIFO or a device could block or never end
            raise ValueError(f"{where}: the image file {path!r} is not a regular file")
        with PILImage.open(path) as im:
            w, h = upright_size(im)  # after its EXIF orientation, as it will be read
    except (OSError, PILImage.DecompressionBombError) as e:  # UnidentifiedImageError is an OSError
        raise ValueError(f"{where}: cannot read the image file {path!r}: {getattr(e, 'strerror', None) or e}") from None
    if max(w, h) > CLI_MAX_SIDE or w % 8 or h % 8:
        raise ValueError(f"{where}: the image {path!r} is {w}x{h} pixels; img2img needs a width and height that "
                         f"are multiples of 8, up to {CLI_MAX_SIDE}")
    return w, h


def check_img2img(job: Job, steps: int, size: tuple[int, int] | None, height: int | None = None,
                  width: int | None = None) -> None:
    """Before anything loads: every line's image file readable and of a size img2img takes (its
    header only), all lines img2img or none, each strength running a step, and the images of one
    batch (one pipeline call) of one size and strength. `size`: --image's (width, height), or None."""
    sizes = {None: size}
    for image in job.images:
        where = f"line {image.line}"
        if image.image not in sizes:
            w, h = sizes[image.image] = image_size(image.image, where)
            for name, want, got in (("height", height, h), ("width", width, w)):
                if want is not None and want != got:
                    raise ValueError(f"--{name} {want}: {where}'s image is {w}x{h} and img2img makes images of "
                                     f"its image's size; drop --{name}")
        if size is None and (image.image is None) != (job.images[0].image is None):
            has, lacks = (job.images[0], image) if image.image is None else (image, job.images[0])
            raise ValueError(f"line {has.line} has an \"image\" and line {lacks.line} has none: give every line "
                             "one (or --image, for those without), or none")
        if sizes[image.image] is None and image.strength is not None:
            raise ValueError(f"{where}: \"strength\" is for img2img: give the line an \"image\" too, or --image")
        check_runs_a_step(image.strength, steps, f"{where}: strength")
    if sizes[job.images[0].image] is None:
        return  # text to image
    for batch in job.batches:
        kinds = {(sizes[image.image], image.strength): image for image in batch}
        if len(kinds) > 1:
            (a, first), (b, other) = list(kinds.items())[:2]
            raise ValueError(f"lines {first.line} ({'x'.join(map(str, a[0]))}, strength {a[1] or 'default'}) and "
                             f"{other.line} ({'x'.join(map(str, b[0]))}, strength {b[1] or 'default'}) fall in one "
                             f"batch of --batch-size {job.batch_size}, one pipeline call: its images must share a "
                             "size and a strength (order the lines so, or use --batch-size 1)")


def resolve_seed(folders: list[Path], seed: int) -> int:
    """The job's base seed: `seed`, or for -1 (random) the one a previous run into these folders
    drew (read from their records), else a new random one."""
    if seed != -1:
        return seed
    for folder in folders:
        for record in folder_records(folder):
            recorded = (record.get("options") or {}).get("seed")
            if is_int(recorded):
                return recorded
    return random_seed()


def shapes_checker(prompts: list[str]):
    """examples/shapes.py's `check(image, prompt)` when every prompt is one of its prompts and the
    file is there (a source checkout), else None. It grades images of the tiny shapes model."""
    path = Path(__file__).resolve().parents[2] / "examples" / "shapes.py"
    if not path.is_file():
        return None
    spec = importlib.util.spec_from_file_location("mini_tgate_examples_shapes", path)
    shapes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shapes)
    ok = all((m := shapes.PROMPT.fullmatch(p.strip())) and m[1] in shapes.COLORS and m[3] in shapes.COLORS
             and m[2] in shapes.SHAPES for p in prompts)
    return shapes.check if ok else None


# ----------------------------------------------------------------------------- running

def run_batches(job: Job, pipe, pending: list[int], call_options: dict, png_params: dict, rank: int = 0,
                world: int = 1, checker=None, macs=None, progress=None) -> dict:
    """Make this rank's share of the pending batches (pending[rank::world]), writing each PNG and
    then its record. Ranks go in rounds of one batch each and count their images together after
    each round. `macs(gate, height, width, steps)`: the denoiser's MACs per image, for the records.
    Returns per-rank {"images": [...], "busy": [...]} and the wall time."""
    folders = {name: folder for name, (folder, _) in job.folders.items()}
    for folder in folders.values():
        folder.mkdir(parents=True, exist_ok=True)
    parts = {name: open(folder / f".manifest-{uuid.uuid4().hex[:8]}.jsonl", "a", encoding="utf-8")
             for name, folder in folders.items()}
    batches, made, busy, start = job.batches, 0, 0.0, time.perf_counter()
    try:
        for round in range(math.ceil(len(pending) / world)):
            k = round * world + rank
            if k < len(pending):
                t0 = time.perf_counter()
                made += make_batch(job, pipe, batches[pending[k]], call_options, png_params, parts, rank,
                                   checker, macs)
                busy += time.perf_counter() - t0
            done = total([made], world)
            if progress is not None:
                progress(int(done.sum()), time.perf_counter() - start)
    finally:
        for f in parts.values():
            f.close()
    per_rank = torch.zeros(2, world, dtype=torch.float64)
    per_rank[:, rank] = torch.tensor([made, busy])
    per_rank = total(per_rank.tolist(), world)
    return {"images": per_rank[0].long().tolist(), "busy": per_rank[1].tolist(),
            "wall": time.perf_counter() - start}


def make_batch(job: Job, pipe, batch: list[Image], call_options: dict, png_params: dict, parts: dict,
               rank: int, checker, macs) -> int:
    """One batch in every folder (the same seeds): PNGs first, then the records. Returns its image count."""
    prompts = [untagged(image.prompt) for image in batch]  # the records and PNGs keep the tags
    negatives = None if all(image.negative is None for image in batch) else [image.negative or "" for image in batch]
    call, digests = batch_call(batch, call_options)
    made = {}
    for name, (folder, gate) in job.folders.items():
        out = pipe(prompts, negative_prompt=negatives, tgate=gate, **call, progress=False,  # the job's bar: Progress
                   generator=[torch.Generator(device="cpu").manual_seed(image.seed) for image in batch])
        steps = len(out.steps)  # img2img runs the last int(steps * strength)
        made[name] = [to_uint8(image) for image in out.images], out.timings
    img2img = "image" in call
    for name, (folder, gate) in job.folders.items():
        images, timings = made[name]
        options = job.folder_options(name)
        records = []
        for pos, (image, pixels) in enumerate(zip(batch, images)):
            params = dict(png_params, prompt=image.prompt, seed=image.seed, batch_size=len(batch), batch_pos=pos,
                          tgate=gate, width=pixels.shape[1], height=pixels.shape[0], id=image.id,
                          batch_options=options_hash(options))
            if image.negative is not None:
                params["negative_prompt"] = image.negative
            if img2img:  # the file's name only, never a local path (--image's is in png_params)
                params["strength"] = image.strength or pipe.default_strength
                if image.image:
                    params["image"] = Path(image.image).name
            text = format_parameters(params)
            try:
                save_png(folder / f"{image.id}.png", pixels, text, overwrite=False)
            except FileExistsError:
                pass  # there already, checked to be this image when the job was planned
            record = dict(id=image.id, file=f"{image.id}.png", line=image.line, prompt=image.prompt,
                          negative_prompt=image.negative, seed=image.seed, parameters=json.loads(text["mini_tgate"]),
                          options=options, rank=rank,
                          seconds={k: v / len(batch) for k, v in timings.items()},
                          denoiser_macs=macs and macs(gate, call["height"], call["width"], steps),
                          denoiser_macs_no_gate=macs and macs(None, call["height"], call["width"], steps))
            if image.image:  # what a rerun checks the line's file against
                record.update(image=image.image, image_sha256=digests[image.image])
            if image.strength is not None:
                record["strength"] = image.strength
            if "tgate" in made and name == "tgate":  # --compare-tgate: the same image without the gate
                plain = made["no-tgate"][0][pos]
                record["mean_abs_diff_to_no_tgate"] = float(np.abs(pixels.astype(np.int16) - plain).mean())
            if checker is not None:
                record["adherence"] = checker(pixels, prompts[pos])
            records.append(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        f = parts[name]
        f.write("".join(records))
        f.flush()
        os.fsync(f.fileno())
    return len(batch)


def batch_call(batch: list[Image], call_options: dict) -> tuple[dict, dict[str, str]]:
    """The pipeline call's options for one batch, img2img from the lines' own image files (read
    now; others: --image's pixels) and strength, and the SHA-256 of each file read."""
    call, digests = dict(call_options), {}
    if any(image.image for image in batch):
        paths = dict.fromkeys(image.image for image in batch if image.image)
        digests, read = {p: file_sha256(p) for p in paths}, {p: read_image(p, CLI_MAX_SIDE) for p in paths}
        pixels = [read[image.image] if image.image else call["image"] for image in batch]
        if len({x.shape for x in pixels}) > 1:
            raise ValueError(f"the image files of lines {batch[0].line} to {batch[-1].line} changed size since the "
                             "job was checked; rerun to check them again")
        pixels = torch.cat(pixels)
        call.update(image=pixels, height=pixels.shape[2], width=pixels.shape[3])
    if batch[0].strength is not None:  # one for the batch (check_img2img)
        call["strength"] = batch[0].strength
    return call, digests


class Progress:
    """One line for the whole job on stderr, on rank 0: redrawn in place on a terminal, else
    printed every 10 s and at the end."""

    def __init__(self, total: int, already: int, stream=sys.stderr):
        self.total, self.already, self.stream, self.last = total, already, stream, -math.inf
        self.tty = stream.isatty()

    def __call__(self, made: int, seconds: float) -> None:
        done, end = self.already + made, self.already + made >= self.total
        if not (self.tty or end or seconds - self.last >= 10):
            return
        self.last = seconds
        rate = made / seconds if seconds > 0 else 0.0
        eta = f"ETA {(self.total - done) / rate:.0f} s" if rate > 0 and not end else f"{seconds:.0f} s"
        width = 30
        bar = "#" * (width * done // self.total) + "." * (width - width * done // self.total)
        line = f"[{bar}] {done}/{self.total} images ({done / self.total:.0%}), {rate:.2f} images/s, {eta}"
        print(("\r" if self.tty else "") + line, end="\n" if end or not self.tty else "", file=self.stream, flush=True)


def summary(job: Job, stats: dict, already: int) -> str:
    """The closing lines, after the merge: images, throughput (the whole job's and each rank's),
    denoiser MACs, and with --compare-tgate the difference the gate makes (and the shapes
    checker's grades of both folders)."""
    made, wall = sum(stats["images"]), stats["wall"]
    lines = [f"done: {len(job.images)} images ({made} made now, {already} there already)"
             + (f" in {wall:.1f} s: {made / wall:.2f} images/s" if made and wall else "")
             + (" (each made without and with the gate)" if len(job.folders) > 1 else "")]
    if made:
        lines += [f"  rank {rank}: {n} images in {busy:.1f} s busy" + (f", {n / busy:.2f} images/s" if n else "")
                  for rank, (n, busy) in enumerate(zip(stats["images"], stats["busy"]))]
    totals = {name: folder_totals(job, name) for name in job.folders}
    for name, (folder, gate) in job.folders.items():
        first = totals[name][0]
        if gate is None or first is None:
            continue
        macs, base = first["denoiser_macs"], first["denoiser_macs_no_gate"]
        lines.append(f"denoiser MACs per image: {macs / 1e9:.3f} G with TGATE (gate step {gate.gate_step}, "
                     f"sp_interval {gate.sp_interval}, fi_interval {gate.fi_interval}, warm-up {gate.warm_up}), "
                     f"{base / 1e9:.3f} G without: {1 - macs / base:.1%} fewer")
    gated = totals.get("tgate", (None, collections.Counter()))[1]
    if gated["diffs"]:
        lines.append(f"mean absolute pixel difference, TGATE vs no gate: {gated['diff'] / gated['diffs']:.2f} (0-255)")
    for name, (_, sums) in totals.items():
        if sums["graded"]:
            lines.append(f"shapes checker, {name or 'images'}: " + ", ".join(
                f"{k} {sums[k] / sums['graded']:.1%}" for k in GRADES))
    lines += [f"manifest: {job.folders[name][0] / MANIFEST}" for name in job.folders]
    return "\n".join(lines)


def folder_totals(job: Job, name: str) -> tuple[dict | None, collections.Counter]:
    """What the summary says of one folder, from its merged records read one at a time: the first
    record of the job's images, and sums and counts of the differences to the no-gate images and
    of the checker's grades."""
    first, sums = None, collections.Counter()
    for record in read_records(job.folders[name][0] / MANIFEST):
        if record["id"] not in job.positions:
            continue
        first = first or record
        if "mean_abs_diff_to_no_tgate" in record:
            sums.update(diff=record["mean_abs_diff_to_no_tgate"], diffs=1)
        if "adherence" in record:
            sums.update(graded=1, **{k: record["adherence"][k] for k in GRADES})
    return first, sums
