"""Checkpoint I/O: find a diffusers-format checkpoint, read its configs and safetensors, load strictly.

A source is a local folder or a hub repo id ("org/name"). A diffusers checkpoint is a folder
with `model_index.json` and one sub-folder per component, each holding `config.json` and
`diffusion_pytorch_model.safetensors` (UNet, VAE) or `model.safetensors` (text encoders),
optionally as a variant (`*.fp16.safetensors`) or in shards listed by
`*.safetensors.index.json`.

Models are built on the meta device (no memory), then each tensor is read from the file,
cast to the requested dtype and device one at a time, and put in place with
`load_state_dict(assign=True)`: weights are never allocated twice. Loading is strict: any
missing, unexpected or mis-shaped key is an error that names the file and the keys, found
from the files' headers before any tensor is read.
Pickle-based files (`.bin`, `.ckpt`, `.pt`, `.pth`) are refused: unpickling runs code.
Files are distrusted: a JSON file must be one object of at most 16 MiB, a shard index may
only name files inside its own folder, and weights must be floating point.

Saving writes the same layout back (`model.save_pretrained(folder)`, `save_pipeline(pipe,
folder)`), under the class names diffusers and transformers use, so that their
`from_pretrained` read the folder too.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, NamedTuple

import torch
from torch import nn

from .bounds import MAX_FILE_BYTES, MAX_HEADER_BYTES, MAX_JSON_BYTES, MAX_TENSORS, some
from .config import CLIPTextConfig, ConfigError


class CheckpointError(Exception):
    """A checkpoint that cannot be found, read or loaded; the message says which file and why."""


# Legacy key names met in real checkpoints, mapped to the current ones at load time (each
# applies only to a key the model does not have, and only if the renamed key is one it has):
# - VAE mid-block attention saved before diffusers 0.14 used `query/key/value/proj_attn`.
LEGACY_RENAMES = [(".query.", ".to_q."), (".key.", ".to_k."), (".value.", ".to_v."),
                  (".proj_attn.", ".to_out.0.")]
# - Text encoders saved before transformers 4.31 carry the `position_ids` buffer (0..76),
#   which is recomputed here rather than stored.
LEGACY_DROPPED = ("text_model.embeddings.position_ids",)
# - transformers 5 saves `CLIPTextModel` without the `text_model.` prefix that real checkpoints
#   (and `CLIPTextModelWithProjection`) have; such keys get the prefix back.
MISSING_PREFIX = "text_model."

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".msgpack", ".h5", ".onnx")
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
COMPONENTS = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


# ----------------------------------------------------------------------------- finding files

CONFIG_FILES = ["config.json", "scheduler_config.json", "vocab.json", "merges.txt", "tokenizer.json",
                "tokenizer_config.json", "special_tokens_map.json", "spiece.model"]


def is_repo_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.\-]+/[\w.\-]+", source)) and not source.startswith((".", "/"))


def weight_patterns(variant: str | None) -> list[str]:
    """The safetensors names of a component's weights, whole or sharded (and the shard index).
    transformers names variant shards `model-00001-of-00002.fp16.safetensors`, diffusers
    `diffusion_pytorch_model.fp16-00001-of-00002.safetensors`; both indexes are
    `<stem>.safetensors.index.fp16.json`. Plain names never match a variant's files."""
    shard = "-?????-of-?????"
    if variant:
        return [n for s in WEIGHT_STEMS for n in (f"{s}.{variant}.safetensors", f"{s}{shard}.{variant}.safetensors",
                                                  f"{s}.{variant}{shard}.safetensors", f"{s}.safetensors.index.{variant}.json")]
    return [n for s in WEIGHT_STEMS for n in (f"{s}.safetensors", f"{s}{shard}.safetensors", f"{s}.safetensors.index.json")]


def hub_patterns(variant: str | None, folders=COMPONENTS, repo_files: list[str] | None = None) -> list[str]:
    """What a pipeline needs from a hub repo: configs, tokenizer files, one variant's safetensors
    of the components it uses (not the safety checker, not single-file or pickle checkpoints).
    `folders` narrows it to some components; "" is the repo's top level (a repo holding one
    model, such as latent-consistency/lcm-sdxl's UNet). With `repo_files` (the repo's file list),
    a component that lacks the variant gets its plain weights instead, as local loading does."""
    from fnmatch import fnmatch

    patterns = ["model_index.json"]
    for c in folders:
        prefix = f"{c}/" if c else ""
        weights = weight_patterns(variant)
        if variant and repo_files is not None:
            in_folder = [f[len(prefix):] for f in repo_files if f.startswith(prefix)]
            if not any(fnmatch(f, w) for f in in_folder for w in weights):
                weights = weight_patterns(None)
        patterns += [prefix + f for f in CONFIG_FILES + weights]
    return patterns


def is_network_error(e: BaseException) -> bool:
    """A connection failure or time-out, as raised by the HTTP client huggingface_hub uses
    (httpx's TransportError, requests' ConnectionError/Timeout) or the standard library."""
    for _ in range(16):  # along the chain of causes (bounded: a chain could loop)
        if e is None:
            return False
        if type(e).__name__ == "OfflineModeIsEnabled":  # HF_HUB_OFFLINE, not the network
            return False
        if isinstance(e, (ConnectionError, TimeoutError)) or any(
                k.__name__ in ("TransportError", "ConnectionError", "Timeout") for k in type(e).__mro__):
            return True
        e = e.__cause__ or e.__context__
    return False


def resolve(source: str | os.PathLike, variant: str | None = None, local_files_only: bool = False,
            cache_dir: str | os.PathLike | None = None, folders=COMPONENTS, revision: str | None = None) -> Path:
    """A local folder as is, or a hub repo id downloaded (or found in the cache) as a folder.

    `revision` (a branch, tag or commit; hub only, ignored for a local folder) picks the
    snapshot; `snapshot_commit(folder)` tells which commit was loaded. Online, with a variant,
    the repo's file list is read first so that components without that variant fetch their
    plain weights (and only those); offline, the cache holds what it holds."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    text = str(source)
    if not is_repo_id(text) or Path(text.split("/")[0]).is_dir():
        # "weights/tiny-shapez" looks like a repo id, but its first part is a folder here.
        raise CheckpointError(f"{source}: no such folder (and not a hub repo id 'org/name')")
    from huggingface_hub import HfApi, constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = (local_files_only or constants.HF_HUB_OFFLINE
               or os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE"))
    unreachable = f"{source}: the hub could not be reached"
    try:
        repo_files = None
        if variant and not offline:
            try:
                repo_files = HfApi().list_repo_files(text, revision=revision)
            except Exception as e:
                if not is_network_error(e):
                    raise
                # as snapshot_download does: no network, so the cache decides
        return Path(snapshot_download(text, allow_patterns=hub_patterns(variant, folders, repo_files),
                                      revision=revision, local_files_only=offline, cache_dir=cache_dir))
    except LocalEntryNotFoundError as e:
        if offline:
            raise CheckpointError(f"{source}: not in the local hub cache and downloading is off "
                                  "(local_files_only or HF_HUB_OFFLINE)") from e
        raise CheckpointError(f"{unreachable} and it is not (completely) in the local hub cache: {e}") from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        if is_network_error(e):
            raise CheckpointError(f"{unreachable}: {e}") from e
        raise CheckpointError(f"{source}: could not be fetched from the hub: {e}") from e
    except Exception as e:
        if is_network_error(e):  # the HTTP client's own exception types
            raise CheckpointError(f"{unreachable}: {e}") from e
        raise


def snapshot_commit(folder: str | os.PathLike) -> str | None:
    """The commit of a hub-cache snapshot (`.../models--org--name/snapshots/<commit>/`, or a
    folder inside one), or None for a plain local folder."""
    for p in (Path(folder), *Path(folder).parents):
        if p.parent.name == "snapshots" and p.parent.parent.name.startswith("models--") \
                and re.fullmatch(r"[0-9a-f]{40}", p.name):
            return p.name
    return None


def read_json(path: Path) -> dict:
    """A JSON file that must hold one object (every config, index and vocabulary does)."""
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    with open(path, "rb") as f:
        data = f.read(MAX_JSON_BYTES + 1)
    if len(data) > MAX_JSON_BYTES:
        raise CheckpointError(f"{path}: larger than {MAX_JSON_BYTES // 2**20} MiB, not a checkpoint's JSON file")
    try:
        value = json.loads(data.decode("utf-8"))
    except ValueError as e:  # not JSON, not UTF-8, or an integer of more than 4,300 digits
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: JSON nested too deeply") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path}: must hold a JSON object {{...}}, not a {type(value).__name__}")
    return value


def read_model_index(folder: Path) -> dict:
    """A pipeline folder's model_index.json: `_class_name` a string, each component a [library, class] pair."""
    path = folder / "model_index.json"
    index = read_json(path)
    if not isinstance(index.get("_class_name"), str):
        raise CheckpointError(f"{path}: _class_name must be the pipeline's class name, "
                              f"got {index.get('_class_name')!r:.60}")
    for key in (*COMPONENTS, "image_encoder", "feature_extractor", "safety_checker"):
        pair = index.get(key, [None, None])
        if not (isinstance(pair, list) and len(pair) == 2 and all(v is None or isinstance(v, str) for v in pair)):
            raise CheckpointError(f"{path}: {key} must be a [library, class] pair such as "
                                  f'["diffusers", "UNet2DConditionModel"], got {pair!r:.60}')
    return index


def shard_names(index: Path) -> list[str]:
    """The shard files a `*.safetensors.index.json` lists: plain names inside its folder."""
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: weight_map must be a non-empty object of tensor name -> file name")
    for name in weight_map.values():
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"{index}: weight_map values must be file names, got {name!r}")
        # Only files inside the component's folder: no absolute paths, no way up with "..".
        # (The files themselves may be symlinks, as the hub cache's snapshots are.)
        if os.path.isabs(name) or ".." in Path(name).parts or "\\" in name:
            raise CheckpointError(f"{index}: weight_map names {name!r}, outside the model folder")
    return sorted(set(weight_map.values()))


def weight_files(folder: Path, variant: str | None = None) -> list[Path]:
    """The safetensors file(s) holding a component's weights: whole, by variant, or sharded."""
    for v in ([variant, None] if variant else [None]):
        for stem in WEIGHT_STEMS:
            single = folder / (f"{stem}.{v}.safetensors" if v else f"{stem}.safetensors")
            index = folder / (f"{stem}.safetensors.index.{v}.json" if v else f"{stem}.safetensors.index.json")
            if single.is_file() or index.is_file():
                if v != variant:
                    warnings.warn(f"{folder}: no {variant!r} variant, loading {single.name}")
                if single.is_file():
                    return [single]
                return [folder / s for s in shard_names(index)]
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{folder}: only pickle-based weights ({', '.join(pickles)}); they are "
                              "refused because unpickling can execute arbitrary code. Convert them to "
                              ".safetensors (e.g. with diffusers: load, then save_pretrained).")
    raise CheckpointError(f"{folder}: no .safetensors weights found")


# ----------------------------------------------------------------------------- reading safetensors
# A safetensors file is 8 bytes (the header's length n, little-endian), n bytes of JSON (name ->
# dtype, shape, data_offsets; optional "__metadata__" of strings), then the tensors' bytes.
# Every tensor is read with plain file reads into a fresh torch allocation: never a memory map of
# the file. So a loaded weight is aligned as any torch allocation is (64 bytes on the CPU)
# whatever its offset in the file, and the same weights give the same bits from any file (CPU
# kernels take different paths on differently aligned data); and a file rewritten after loading
# cannot change a loaded model.

# the safetensors dtypes a checkpoint holds: weights (floating point) and integer buffers
FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
SAFETENSORS_DTYPES = FLOAT_DTYPES | {"I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
                                    "U8": torch.uint8, "BOOL": torch.bool}


class Header(NamedTuple):
    tensors: dict[str, tuple[str, tuple[int, ...], int, int]]  # name -> (dtype, shape, begin, end)
    metadata: dict[str, str]
    data_start: int  # the file offset of data byte 0


def read_header(path: Path, max_bytes: int = MAX_FILE_BYTES, max_tensors: int = MAX_TENSORS,
                what: str = "Stable Diffusion checkpoint") -> Header:
    """The header of a safetensors file, checked against the format's spec before any tensor is
    read: at most `max_bytes` in all (the bounds of any `what`), a header of at most MAX_HEADER_BYTES naming at most
    `max_tensors` tensors, each once, each byte range holding exactly its shape times its
    dtype's size, and the ranges tiling the data (no overlap, no gap, nothing after the last)."""
    def refuse(why: str):
        raise CheckpointError(f"{path}: not a readable safetensors file ({why})")

    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: pickle-based checkpoints are refused because unpickling can execute "
                              "arbitrary code; convert it to .safetensors first")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file" if path.exists() else f"{path}: no such file")
    size = path.stat().st_size
    if size > max_bytes:
        raise CheckpointError(f"{path}: {size / 2**30:.1f} GiB, larger than any {what} "
                              f"(limit {max_bytes / 2**30:g} GiB)")
    with open(path, "rb") as f:
        start = f.read(8)
        n = struct.unpack("<Q", start)[0] if len(start) == 8 else -1
        if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
            refuse(f"header length {n}; a header is 2 bytes to {MAX_HEADER_BYTES // 2**20} MiB and lies inside the file")
        try:
            header = json.loads(f.read(n).decode("utf-8"), object_pairs_hook=lambda pairs: unique(pairs, path))
        except (ValueError, RecursionError) as e:  # ValueError: not UTF-8, not JSON, an integer of 4,300+ digits
            refuse(f"its header is not JSON: {e}")
    if not isinstance(header, dict):
        refuse("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        refuse("its __metadata__ is not an object of strings")
    if len(header) > max_tensors:
        raise CheckpointError(f"{path}: {len(header)} tensors, more than any {what} holds (limit {max_tensors})")
    tensors = {}
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            ok = len(name) <= 1000 and all(type(v) is int and v >= 0 for v in (*shape, begin, end)) and \
                end - begin == math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        except (TypeError, KeyError, ValueError, IndexError):
            ok = False
        if not ok:
            refuse(f"bad header entry for {name!r}: needs a dtype ({', '.join(SAFETENSORS_DTYPES)}), a shape and data_offsets "
                   "that agree")
        tensors[name] = (dtype, shape, begin, end)
    position = 0
    for begin, end, name in sorted((begin, end, name) for name, (_, _, begin, end) in tensors.items()):
        if begin != position:
            refuse(f"tensor {name!r} at bytes {begin}-{end} "
                   f"{'overlaps another' if begin < position else f'leaves a gap from {position}'}")
        position = end
    if position != size - 8 - n:
        refuse(f"its tensors end at data byte {position}, the file's data at {size - 8 - n}: "
               f"{'truncated' if position > size - 8 - n else 'bytes left over'}")
    return Header(tensors, metadata, 8 + n)


def unique(pairs: list, path: Path) -> dict:
    """A JSON object's dict, refusing a name given twice (json.loads would keep the last)."""
    seen = set()
    for name, _ in pairs:
        if name in seen:
            raise CheckpointError(f"{path}: not a readable safetensors file (its header names {name!r} twice)")
        seen.add(name)
    return dict(pairs)


def read_tensor(f: BinaryIO, header: Header, name: str) -> torch.Tensor:
    """One tensor of an open file, read into a fresh allocation (its own storage, on the CPU)."""
    dtype, shape, begin, end = header.tensors[name]
    data = torch.empty(end - begin, dtype=torch.uint8)
    f.seek(header.data_start + begin)
    view, done = memoryview(data.numpy()), 0
    while done < len(view):  # a read returns at most ~2 GiB on Linux
        got = f.readinto(view[done:])
        if not got:
            raise CheckpointError(f"{f.name}: not a readable safetensors file (it ends inside tensor {name!r}; "
                                  "was it changed while being read?)")
        done += got
    return data.view(SAFETENSORS_DTYPES[dtype]).reshape(shape)


# Reading is mostly the page faults of the new memory: a few threads, each with its own file
# handle, read SD-1.5's 1.6 GB UNet 2x faster than one on a 2-core machine.
READ_THREADS = min(4, os.cpu_count() or 1)


def read_tensors(path: Path, header: Header, names: list[str], cast=lambda t: t) -> dict[str, torch.Tensor]:
    """The tensors `names` of a file, in that order, each read into its own allocation and passed
    through `cast` (a dtype or device move) as it is read: memory holds the results and at most
    READ_THREADS tensors in the file's dtype."""
    def read(name: str) -> torch.Tensor:
        with open(path, "rb", buffering=0) as f:
            return cast(read_tensor(f, header, name))

    with ThreadPoolExecutor(READ_THREADS) as pool:
        return dict(zip(names, pool.map(read, names)))


def read_file(path: Path, max_bytes: int, max_tensors: int, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a (small) safetensors file as it is stored, and the header's metadata."""
    header = read_header(path, max_bytes, max_tensors, what)
    return read_tensors(path, header, list(header.tensors)), header.metadata


# ----------------------------------------------------------------------------- loading

def read_headers(files: list[Path]) -> dict[Path, Header]:
    """The header of each file, checked to hold floating-point weights only."""
    headers = {}
    for path in files:
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed by the shard index)")
        headers[path] = read_header(path)
        for k, (kind, *_) in headers[path].tensors.items():  # every model here holds floats only
            if kind not in FLOAT_DTYPES and k not in LEGACY_DROPPED:
                raise CheckpointError(f"{path}: tensor {k} is {str(SAFETENSORS_DTYPES[kind]).removeprefix('torch.')}; "
                                      "model weights must be floating point")
    return headers


def fix_legacy_keys(state: dict, expected: set) -> dict:
    out = {}
    for k, v in state.items():
        if k in LEGACY_DROPPED and k not in expected:
            continue
        if k not in expected and MISSING_PREFIX + k in expected:
            k = MISSING_PREFIX + k
        if k not in expected:
            new = k
            for old, repl in LEGACY_RENAMES:
                new = new.replace(old, repl)
            if new in expected:
                k = new
        out[k] = v
    return out


def check_keys(model: nn.Module, shapes: dict[str, tuple], where: Path) -> None:
    """The names and shapes the files hold are the (meta-device) model's, or a CheckpointError naming them."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = []
    missing = [k for k in expected if k not in shapes]
    unexpected = [k for k in shapes if k not in expected]
    mismatched = [f"{k}: file {shapes[k]} vs model {v}" for k, v in expected.items() if k in shapes and shapes[k] != v]
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                       ("shape mismatches", mismatched)):
        if keys:
            problems.append(f"{len(keys)} {what}: {some(keys)}")
    if problems:
        raise CheckpointError(f"{where} does not match {type(model).__name__}: " + "; ".join(problems))


def load_weights(model: nn.Module, files: list[Path], dtype=None, device="cpu") -> nn.Module:
    """Strictly fill a (meta-device) model with the tensors of `files`, floating ones cast to dtype, each
    moved as it is read. The files' headers are compared with the model first: a file that does not fit
    is refused before any tensor is read."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device)  # a bad device fails here with torch's own error, not as a bad file

    headers = read_headers(files)
    stored = {k: (path, k, shape) for path, header in headers.items() for k, (_, shape, *_) in header.tensors.items()}
    stored = fix_legacy_keys(stored, set(model.state_dict()))  # model key -> (file, its name there, shape)
    where = files[0] if len(files) == 1 else files[0].parent
    check_keys(model, {k: shape for k, (_, _, shape) in stored.items()}, where)
    state = {}
    for path, header in headers.items():
        keys = [k for k, (p, *_) in stored.items() if p == path]
        state.update(zip(keys, read_tensors(path, header, [stored[k][1] for k in keys], cast).values()))
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()


def pick_dtype(dtype: torch.dtype | None, torch_dtype: torch.dtype | None) -> torch.dtype:
    """`dtype=`, or diffusers' name for it, `torch_dtype=`; float32 when neither is given."""
    if dtype is not None and torch_dtype is not None and dtype != torch_dtype:
        raise ValueError(f"dtype={dtype} and torch_dtype={torch_dtype} disagree; give one of them")
    chosen = dtype if dtype is not None else torch_dtype if torch_dtype is not None else torch.float32
    if not isinstance(chosen, torch.dtype) or not chosen.is_floating_point:
        raise ValueError(f"dtype must be a floating-point torch.dtype (e.g. torch.float16), got {chosen!r}")
    return chosen


class PretrainedMixin:
    """`from_pretrained` and `save_pretrained` for the model classes: each sets `config_class`
    and takes a config."""

    config_class: type

    @classmethod
    def from_pretrained(cls, source, subfolder: str | None = None, dtype: torch.dtype | None = None,
                        device="cpu", variant: str | None = None, local_files_only: bool = False,
                        cache_dir=None, revision: str | None = None, torch_dtype: torch.dtype | None = None):
        """The model of a folder or hub repo (only `subfolder`'s files are fetched). dtype
        (diffusers' name, torch_dtype, is an alias) defaults to float32."""
        dtype = pick_dtype(dtype, torch_dtype)
        folder = resolve(source, variant, local_files_only, cache_dir, folders=[subfolder or ""], revision=revision)
        if subfolder:
            folder = folder / subfolder
            if not folder.is_dir():
                raise CheckpointError(f"{folder}: missing component folder")
        try:
            config = cls.config_class.from_dict(read_json(folder / "config.json"))
        except ConfigError as e:
            raise ConfigError(f"{folder / 'config.json'}: {e}") from None
        files = weight_files(folder, variant)
        with torch.device("meta"):
            model = cls.for_files(config, files)
        return load_weights(model, files, dtype, device).after_load(files, dtype, device)

    @classmethod
    def for_files(cls, config, files: list[Path]):
        """The (meta-device) model to fill from `files`; a class whose layout depends on what the
        files hold (T5's embedding names) overrides it."""
        return cls(config)

    def after_load(self, files: list[Path], dtype, device):
        """A last step after the strict load (T5 keeps `wo` in float32 under float16)."""
        return self

    def saved_names(self) -> tuple[str, str]:
        """(class name, weights file name) as diffusers / transformers save this model."""
        if isinstance(self.config, CLIPTextConfig):  # a text encoder: transformers' names
            return ("CLIPTextModelWithProjection" if self.config.with_projection else "CLIPTextModel",
                    "model.safetensors")
        return type(self).__name__, "diffusion_pytorch_model.safetensors"  # UNet2DConditionModel, AutoencoderKL

    def save_pretrained(self, folder) -> None:
        """Write `config.json` and the weights as safetensors, the layout `from_pretrained` reads
        (and diffusers' or transformers' `from_pretrained`), in the model's current dtype."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        name, weights = self.saved_names()
        config = {"_class_name": name, **self.config.to_dict()}
        if weights == "model.safetensors":  # transformers finds the class through these two
            config.update(architectures=[name], model_type="clip_text_model")
        write_json(folder / "config.json", config)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        save_file(state, folder / weights, metadata={"format": "pt"})  # transformers checks "format"


# ----------------------------------------------------------------------------- saving a pipeline

def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
