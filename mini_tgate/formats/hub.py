"""A1111's short hashes: of a checkpoint (a single file, or a folder's denoiser weights), and of
a LoRA file (its "Lora hashes")."""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ..core.bounds import MAX_LORA_BYTES, MAX_LORA_TENSORS
from ..core.weights import CheckpointError, is_repo_id, read_header, weight_files


def file_sha256(path, start: int = 0) -> str:
    """The SHA-256 hex digest of a file from byte `start` on, read 1 MiB at a time: memory stays
    flat for 7 GB files."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(start)
        while chunk := f.read(2**20):
            h.update(chunk)
    return h.hexdigest()


def model_hash(source: str | os.PathLike, variant: str | None = None) -> str:
    """A1111's short "Model hash": the first 10 hex digits of the SHA-256 of the checkpoint file.

    For a single file, that file. For a diffusers folder, the denoiser's weights (`unet/`, or
    `transformer/` for PixArt, or the folder itself for a one-model folder; `variant`'s file if
    it has one, as `weight_files` picks it): the file itself
    when whole; when sharded, the SHA-256 of the shards' SHA-256 hex digests, one per line in
    file-name order. A hub-cache file is a symlink to `blobs/<sha256 of the content>`: that
    name is used instead of reading the file again."""
    path = Path(source).expanduser()
    if path.is_dir():
        denoiser = next((path / d for d in ("unet", "transformer") if (path / d).is_dir()), path)
        files = weight_files(denoiser, variant)
    elif path.is_file():
        files = [path]
    else:
        raise CheckpointError(f"{source}: no such file or folder")

    def sha256(f: Path) -> str:
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed by the shard index)")
        blob = Path(os.path.realpath(f)).name
        if f.is_symlink() and re.fullmatch(r"[0-9a-f]{64}", blob):
            return blob
        return file_sha256(f)

    digests = [sha256(f) for f in files]
    if len(digests) == 1:
        return digests[0][:10]
    return hashlib.sha256("".join(d + "\n" for d in digests).encode()).hexdigest()[:10]


def lora_hash(source: str | os.PathLike) -> str:
    """A1111's short hash of a LoRA, as its "Lora hashes" field gives it: the first 12 hex digits
    of the kohya/"addnet" hash (A1111's `hashes.addnet_hash_safetensors`: the SHA-256 of the
    safetensors file after its header, so editing the metadata keeps the hash), or of the
    `sshs_model_hash` its metadata holds, which A1111 takes first (kohya's trainer writes it).
    `source`: a .safetensors file, a folder holding one, or a hub repo id already in the local
    cache (as --lora takes them; `read_lora` picks the same file)."""
    from .lora import DEFAULT_WEIGHT_NAME, download, pick_file

    path = Path(source).expanduser()
    if path.is_dir():
        path = pick_file(path)
    elif not path.exists() and is_repo_id(str(source)):
        path = download(str(source), DEFAULT_WEIGHT_NAME, True, None, None)
    header = read_header(path, MAX_LORA_BYTES, MAX_LORA_TENSORS, "LoRA")
    given = header.metadata.get("sshs_model_hash", "")
    if given:
        return given[:12]
    return file_sha256(path, header.data_start)[:12]
