"""A1111's short model hash of a checkpoint (a single file, or a folder's denoiser weights)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..core.weights import CheckpointError, weight_files


def model_hash(source: str | os.PathLike, variant: str | None = None) -> str:
    """A1111's short "Model hash": the first 10 hex digits of the SHA-256 of the checkpoint file.

    For a single file, that file. For a diffusers folder, the denoiser's weights (`unet/`, or
    `transformer/` for PixArt, or the folder itself for a one-model folder; `variant`'s file if
    it has one, as `weight_files` picks it): the file itself
    when whole; when sharded, the SHA-256 of the shards' SHA-256 hex digests, one per line in
    file-name order. A hub-cache file is a symlink to `blobs/<sha256 of the content>`: that
    name is used instead of reading the file again."""
    import hashlib

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
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(2**20):  # 1 MiB at a time: memory stays flat for 7 GB files
                h.update(chunk)
        return h.hexdigest()

    digests = [sha256(f) for f in files]
    if len(digests) == 1:
        return digests[0][:10]
    return hashlib.sha256("".join(d + "\n" for d in digests).encode()).hexdigest()[:10]
