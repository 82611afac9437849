"""The LoRAs a run merges: --lora PATH[:SCALE] values, and A1111's prompt tags <lora:NAME> and
<lora:NAME:MULTIPLIER>, which name files in --lora-dir. Shared by `generate` and `batch`."""

from __future__ import annotations

import re
from pathlib import Path

from ..formats.hub import lora_hash
from ..formats.lora import SCALES, scale_ok

EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111's prompt tag <lora:NAME:MULTIPLIER> (prompt_tags)


def loras_from(args) -> list[tuple[str, float]]:
    """--lora PATH[:SCALE] values as (path, scale). A last ':' followed by a number is the scale;
    any other ':' belongs to the path."""
    loras = []
    for value in getattr(args, "lora", None) or []:
        path, colon, scale = value.rpartition(":")
        try:
            number = float(scale) if colon and path else None
        except ValueError:
            number = None
        if number is not None and not scale_ok(number):
            raise ValueError(f"--lora {value}: the scale must be {SCALES}")
        loras.append((value, 1.0) if number is None else (path, number))
    return loras


def untagged(text: str) -> str:
    """A prompt as the text encoder reads it: without its <lora:...> tags, as A1111 removes them."""
    return EXTRA_NETWORK.sub("", text)


def prompt_tags(prompt: str) -> list[tuple[str, float]]:
    """The LoRAs that A1111's extra-network tags in a prompt name, as (NAME, MULTIPLIER) in order.
    Only prompts are read, as in A1111 (`parse_extra_network_prompts` reads the prompts alone): a
    tag in a negative prompt is text like any other. The tags are A1111's
    (modules/extra_networks.py): `<KIND:ARGS>` with KIND a word and ARGS anything but '>' split at
    ':', so NAME may hold spaces and dots, not ':'; only KIND "lora" with one or two ARGS is taken.
    A NAME tagged twice is merged twice, both times at its last tag's multiplier, as A1111 does
    (its load_networks keeps one object per name, whose multiplier the last tag sets, and lists it
    once per tag)."""
    tags = []
    for m in EXTRA_NETWORK.finditer(prompt):
        kind, args = m[1], m[2].split(":")
        if kind != "lora":
            raise ValueError(f"{m[0]}: <{kind}:...> extra networks are not supported, only <lora:NAME[:MULTIPLIER]>")
        if len(args) > 2:
            raise ValueError(f"{m[0]}: separate text encoder and UNet multipliers are not supported; "
                             "write <lora:NAME> or <lora:NAME:MULTIPLIER>")
        try:
            scale = float(args[1]) if len(args) == 2 else 1.0
        except ValueError:
            raise ValueError(f"{m[0]}: the multiplier {args[1]!r} is not a number") from None
        if not scale_ok(scale):
            raise ValueError(f"{m[0]}: the multiplier must be {SCALES}")
        tags.append((args[0], scale))
    last = dict(tags)
    return [(name, last[name]) for name, _ in tags]


def tag_loras(prompts: list[str], lora_dir: str | None, where) -> list[tuple[str, float]]:
    """The LoRA files (DIR/NAME.safetensors, multiplier) that the tags of the prompts name; every
    prompt must name the same ones in the same order (one model state a run; the order of the
    merges decides the last bits). `where(i)` names prompt i in messages."""
    def shown(tags):
        return " ".join(f"<lora:{name}:{scale:g}>" for name, scale in tags) or "none"

    first = prompt_tags(prompts[0])
    for i, prompt in enumerate(prompts[1:], 1):
        if (tags := prompt_tags(prompt)) != first:
            raise ValueError(f"{where(i)} names other LoRAs than {where(0)} ({shown(tags)}, not {shown(first)}): "
                             "the weights are merged once a run, so every prompt must name the same; run them apart")
    loras = []
    for name, scale in first:
        tag = f"<lora:{name}>"
        if lora_dir is None:
            raise ValueError(f"{tag}: LoRA tags need --lora-dir, the folder of their NAME.safetensors files")
        if not name.strip() or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{tag}: a tag names a file in --lora-dir (no absolute path, no '..')")
        path = Path(lora_dir) / f"{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{tag}: no file {str(path)!r}")
        loras.append((str(path), scale))
    return loras


def lora_hashes(args, tagged: list[tuple[str, float]]) -> dict[str, str]:
    """A1111's "Lora hashes" of a run: {name: short hash (hub.lora_hash)} of every LoRA merged, each
    named as A1111 names it, by the NAME of its prompt tag (the file's path in --lora-dir without
    ".safetensors"), or for --lora by its file's (or folder's, repo's) stem; a name given twice is
    listed once, as A1111's dict of them keeps it."""
    named = [(Path(path).stem if Path(path).suffix == ".safetensors" else Path(path).name, path)
             for path, _ in loras_from(args)]
    for path, _ in tagged:  # DIR/NAME.safetensors, made by tag_loras
        named.append((str(Path(path).relative_to(Path(args.lora_dir))).removesuffix(".safetensors"), path))
    return {name: lora_hash(path) for name, path in named}
