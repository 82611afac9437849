"""Checkpoint I/O: find a diffusers-format checkpoint, read its configs and safetensors, load strictly.

A source is a local folder or a hub repo id ("org/name"). A diffusers checkpoint is a folder
with `model_index.json` and one sub-folder per component, each holding `config.json` and
`diffusion_pytorch_model.safetensors` (UNet, VAE) or `model.safetensors` (text encoders),
optionally as a variant (`*.fp16.safetensors`) or in shards listed by
`*.safetensors.index.json`.

Models are built on the meta device (no memory), then each tensor is read from the file,
cast to the requested dtype and device one at a time, and put in place with
`load_state_dict(assign=True)`: weights are never allocated twice. Loading is strict: any
missing, unexpected or mis-shaped key is an error that names the file and the keys.
Pickle-based files (`.bin`, `.ckpt`, `.pt`, `.pth`) are refused: unpickling runs code.

Saving writes the same layout back (`model.save_pretrained(folder)`, `save_pipeline(pipe,
folder)`), under the class names diffusers and transformers use, so that their
`from_pretrained` read the folder too.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .config import CLIPTextConfig


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
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


# ----------------------------------------------------------------------------- finding files

def is_repo_id(source: str) -> bool:
    return bool(re.fullmatch(r"[\w.\-]+/[\w.\-]+", source)) and not source.startswith((".", "/"))


def hub_patterns(variant: str | None, folders=COMPONENTS) -> list[str]:
    """What a pipeline needs from a hub repo: configs, tokenizer files, one variant's safetensors
    of the components it uses (not the safety checker, not single-file or pickle checkpoints).
    `folders` narrows it to some components; "" is the repo's top level (a repo holding one
    model, such as latent-consistency/lcm-sdxl's UNet)."""
    configs = ["config.json", "scheduler_config.json", "vocab.json", "merges.txt", "tokenizer.json",
               "tokenizer_config.json", "special_tokens_map.json"]
    if variant:
        weights = [f"*.{variant}.safetensors", f"*.safetensors.index.{variant}.json"]
    else:  # `?` keeps `*.fp16.safetensors` shards out: shards end in -NNNNN-of-NNNNN
        weights = [f"{s}.safetensors" for s in WEIGHT_STEMS] + ["*-of-?????.safetensors", "*.safetensors.index.json"]
    return ["model_index.json"] + [f"{c}/{f}" if c else f for c in folders for f in configs + weights]


def resolve(source: str | os.PathLike, variant: str | None = None, local_files_only: bool = False,
            cache_dir: str | os.PathLike | None = None, folders=COMPONENTS) -> Path:
    """A local folder as is, or a hub repo id downloaded (or found in the cache) as a folder."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if not is_repo_id(str(source)):
        raise CheckpointError(f"{source}: no such folder (and not a hub repo id 'org/name')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = local_files_only or os.environ.get("HF_HUB_OFFLINE", "0").upper() in ("1", "ON", "YES", "TRUE")
    try:
        return Path(snapshot_download(str(source), allow_patterns=hub_patterns(variant, folders),
                                      local_files_only=offline, cache_dir=cache_dir))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(f"{source}: not in the local hub cache and downloading is off "
                              "(local_files_only or HF_HUB_OFFLINE)") from e
    except (HfHubHTTPError, OSError, ValueError) as e:
        raise CheckpointError(f"{source}: could not be fetched from the hub: {e}") from e


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e


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
                shards = sorted(set(read_json(index).get("weight_map", {}).values()))
                if not shards:
                    raise CheckpointError(f"{index}: no weight_map")
                return [folder / s for s in shards]
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(f"{folder}: only pickle-based weights ({', '.join(pickles)}); they are "
                              "refused because unpickling can execute arbitrary code. Convert them to "
                              ".safetensors (e.g. with diffusers: load, then save_pretrained).")
    raise CheckpointError(f"{folder}: no .safetensors weights found")


# ----------------------------------------------------------------------------- loading

def read_tensors(files: list[Path], dtype: torch.dtype | None, device) -> dict[str, torch.Tensor]:
    """Every tensor of the files, floating ones cast to dtype, each moved as it is read."""
    from safetensors import safe_open

    state = {}
    for f in files:
        if not f.is_file():
            raise CheckpointError(f"{f}: missing (listed by the shard index)")
        try:
            sf = safe_open(f, framework="pt", device="cpu")  # reads the header, checks it covers the file
        except Exception as e:  # safetensors raises its own error types for truncated/corrupt files
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
        for k in sf.keys():
            t = sf.get_tensor(k)
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            state[k] = t.to(device)  # a bad device fails here with torch's own error, not as a bad file
    return state


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


def load_weights(model: nn.Module, files: list[Path], dtype=None, device="cpu") -> nn.Module:
    """Strictly fill a (meta-device) model with the tensors of `files`."""
    state = read_tensors(files, dtype, device)
    expected = model.state_dict()
    state = fix_legacy_keys(state, set(expected))
    where = files[0] if len(files) == 1 else files[0].parent
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                       ("shape mismatches", mismatched)):
        if keys:
            more = f" (+{len(keys) - 5} more)" if len(keys) > 5 else ""
            problems.append(f"{len(keys)} {what}: {', '.join(keys[:5])}{more}")
    if problems:
        raise CheckpointError(f"{where} does not match {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval()


class PretrainedMixin:
    """`from_pretrained` and `save_pretrained` for the model classes: each sets `config_class`
    and takes a config."""

    config_class: type

    @classmethod
    def from_pretrained(cls, source, subfolder: str | None = None, dtype: torch.dtype | None = torch.float32,
                        device="cpu", variant: str | None = None, local_files_only: bool = False,
                        cache_dir=None):
        folder = resolve(source, variant, local_files_only, cache_dir, folders=[subfolder or ""])
        if subfolder:
            folder = folder / subfolder
            if not folder.is_dir():
                raise CheckpointError(f"{folder}: missing component folder")
        config = cls.config_class.from_dict(read_json(folder / "config.json"))
        with torch.device("meta"):
            model = cls(config)
        return load_weights(model, weight_files(folder, variant), dtype, device)

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


def save_pipeline(pipe, folder) -> None:
    """Write a pipeline as a complete diffusers folder: `model_index.json` naming each
    component's library and class, then one sub-folder per component. diffusers'
    `DiffusionPipeline.from_pretrained(folder)` and `load_pipeline(folder)` both read it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    sdxl = hasattr(pipe, "text_encoder_2")
    index = {"_class_name": type(pipe).__name__,  # StableDiffusionPipeline / StableDiffusionXLPipeline
             "feature_extractor": [None, None], "image_encoder": [None, None]}  # components not saved
    if sdxl:
        index["force_zeros_for_empty_prompt"] = pipe.force_zeros_for_empty_prompt
    else:
        index.update(safety_checker=[None, None], requires_safety_checker=False)
    models = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if sdxl else [])
    for name in models:
        model = getattr(pipe, name)
        model.save_pretrained(folder / name)
        library = "transformers" if name.startswith("text_encoder") else "diffusers"
        index[name] = [library, model.saved_names()[0]]
    for name in ["tokenizer"] + (["tokenizer_2"] if sdxl else []):
        getattr(pipe, name).save_pretrained(folder / name)
        index[name] = ["transformers", "CLIPTokenizer"]
    (folder / "scheduler").mkdir(exist_ok=True)
    config = {k: v for k, v in pipe.scheduler.config.items() if k != "_use_default_values"}
    write_json(folder / "scheduler" / "scheduler_config.json", config)
    index["scheduler"] = ["diffusers", config["_class_name"]]
    write_json(folder / "model_index.json", index)
