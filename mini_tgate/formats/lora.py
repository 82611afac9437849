"""LoRA: low-rank weight deltas merged into a pipeline's weights, and taken out again exactly.

A LoRA (Hu et al. 2021, arXiv 2106.09685) holds, for some Linear and Conv2d layers of the UNet
(or PixArt's transformer) and the text encoder(s), two small tensors: `down` (rank, in[, kh, kw])
and `up` (out, rank[, 1, 1]). The layer's weight becomes

    W' = W + scale * alpha / rank * up @ down        (convolutions: down flattened over in, kh, kw)

Here the delta is merged into W once, at load time (diffusers' `load_lora_weights` followed by
`fuse_lora`): the UNet runs exactly as before, so TGATE, torch.compile and speed are untouched.
Each touched weight's original is first copied to the CPU in its own dtype; unloading copies
the originals back, bit for bit. The delta is computed in float32 and cast to the weight's dtype.

The formats met in the wild, all resolved here to (model, module path, down, up, alpha):

- diffusers / PEFT: `unet.<module>.lora_A.weight` (down) and `.lora_B.weight` (up), likewise
  under `text_encoder.`, `text_encoder_2.` and (PixArt) `transformer.`; alpha comes from the LoraConfig diffusers writes
  into the file's metadata (`lora_adapter_metadata`: `unet.lora_alpha`, `unet.alpha_pattern`),
  and is the rank (a factor of 1) when there is none.
- diffusers before PEFT: `<module>.lora.down.weight` / `.lora.up.weight`, text encoders'
  `<module>.lora_linear_layer.down.weight`, and attention processors'
  `<attention>.processor.to_q_lora.down.weight` (`to_out_lora` is `to_out.0`; in a text encoder
  `to_q_lora` is `q_proj`, `to_out_lora` is `out_proj`).
- kohya / A1111: `lora_unet_<module>.lora_down.weight`, `.lora_up.weight` and `.alpha`, where
  <module> is the module path with every `.` written `_`; `lora_te_` for the text encoder, SDXL's
  `lora_te1_` / `lora_te2_` for its two. kohya trains SD 1.x on diffusers' UNet, so those names
  are diffusers' paths; it trains SDXL on the original (LDM/sgm) UNet, whose paths
  (`input_blocks.4.1.transformer_blocks.0.attn1.to_q`) ldm_unet_name derives from ours.

Several LoRAs add up, each with its own scale (at most MAX_LORA_SCALE either way: bounds.py);
`pipe.lora_adapters` lists them (name -> (source, scale)) and `pipe.lora_originals` holds the
saved weights, each with (a weak reference to) the model it came from, both kept by fuse /
unfuse_all.

Every name is resolved against `dict(model.named_modules())`, the model's own truth (its module
names equal diffusers' and transformers'). A key that resolves to nothing is an error that names
it, never skipped: a LoRA half applied gives wrong images without a word.
"""

from __future__ import annotations

import json
import math
import os
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..core.bounds import MAX_LORA_BYTES, MAX_LORA_METADATA_BYTES, MAX_LORA_SCALE, MAX_LORA_TENSORS, is_number, some
from ..core.weights import PICKLE_SUFFIXES, CheckpointError, is_network_error, is_repo_id, read_file

DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # what diffusers' save_lora_weights writes

# The models a LoRA may touch, by the prefix its keys carry.
DIFFUSERS_PREFIXES = {"unet.": "unet", "transformer.": "transformer", "text_encoder.": "text_encoder",
                      "text_encoder_2.": "text_encoder_2"}
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
# How each format names the two halves (and kohya the alpha) after the module's name.
ROLE_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up",                       # PEFT
                 ".lora.down.weight": "down", ".lora.up.weight": "up",                   # diffusers, old
                 ".lora_linear_layer.down.weight": "down", ".lora_linear_layer.up.weight": "up",
                 ".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}  # kohya
# Old attention-processor LoRAs: `<attn>[.processor].to_q_lora.down.weight`; the layer it adapts
# is named differently in the UNet (to_q, to_out.0) and in CLIP (q_proj, out_proj).
PROCESSOR_KEY = re.compile(r"(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
PROCESSOR_TARGETS = {"to_q": ("to_q", "q_proj"), "to_k": ("to_k", "k_proj"), "to_v": ("to_v", "v_proj"),
                     "to_out": ("to_out.0", "out_proj")}

# diffusers' UNet names -> the original LDM UNet's, for kohya's SDXL LoRAs. Inside a ResnetBlock2D:
RESNET_LDM = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
              "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
# Outside the blocks (LDM's `out` is Sequential(norm, SiLU, conv)):
TOP_LDM = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
           "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
           "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


@dataclass
class LoraLayer:
    model: str           # "unet", "text_encoder", ...
    path: str            # the module's name in that model, e.g. "down_blocks.0.attentions.0.proj_in"
    down: torch.Tensor   # (rank, in[, kh, kw])
    up: torch.Tensor     # (out, rank[, 1, 1])
    alpha: float         # the delta is scaled by alpha / rank


@dataclass
class LoraFile:
    name: str                             # what to call it in messages: the file (or repo) it came from
    tensors: dict[str, torch.Tensor]
    metadata: dict | None                 # diffusers' lora_adapter_metadata (LoraConfig per model), if any


# ----------------------------------------------------------------------------- reading

def read_lora(source, weight_name: str | None = None, local_files_only: bool = False, cache_dir=None,
              revision: str | None = None) -> LoraFile:
    """The tensors of a LoRA: a .safetensors file, a folder holding one (`weight_name`, else
    diffusers' `pytorch_lora_weights.safetensors`, else its only .safetensors file), a hub repo
    id (the file `weight_name` of it, default `pytorch_lora_weights.safetensors`), or a dict of
    tensors already in memory. Pickle files are refused: unpickling runs code."""
    if isinstance(source, dict):
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) and v.layout == torch.strided and not v.is_meta
                   for k, v in source.items()):
            raise TypeError("a LoRA state dict must map names (str) to dense tensors holding data")
        return LoraFile("the given state dict", dict(source), None)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError("a LoRA must be a file, folder or hub repo id (or a dict of tensors), "
                        f"got {type(source).__name__}")
    if weight_name is not None and (not isinstance(weight_name, str) or not weight_name or os.path.isabs(weight_name)
                                    or ".." in Path(weight_name).parts):
        raise ValueError(f"weight_name must be a file name inside the folder or repo, got {weight_name!r}")
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / weight_name if weight_name else pick_file(path)
    elif not path.exists():
        if not is_repo_id(str(source)) or Path(str(source).split("/")[0]).is_dir():
            raise CheckpointError(f"{source}: no such LoRA file or folder (and not a hub repo id 'org/name')")
        path = download(str(source), weight_name or DEFAULT_WEIGHT_NAME, local_files_only, cache_dir, revision)
    return LoraFile(str(source) if not weight_name else f"{source}/{weight_name}", *read_safetensors(path))


def pick_file(folder: Path) -> Path:
    if (folder / DEFAULT_WEIGHT_NAME).is_file():
        return folder / DEFAULT_WEIGHT_NAME
    found = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")
    if len(found) == 1:
        return found[0]
    if found:
        raise CheckpointError(f"{folder}: {len(found)} .safetensors files ({', '.join(p.name for p in found[:5])}); "
                              "say which LoRA with weight_name")
    raise CheckpointError(f"{folder}: no .safetensors LoRA file in it")


def download(repo_id: str, weight_name: str, local_files_only: bool, cache_dir, revision) -> Path:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(repo_id, weight_name, revision=revision, cache_dir=cache_dir,
                                    local_files_only=local_files_only))
    except LocalEntryNotFoundError as e:
        raise CheckpointError(f"{repo_id}: {weight_name} is not in the local hub cache and could not be "
                              f"downloaded ({e})") from e
    except Exception as e:
        if is_network_error(e) or isinstance(e, (HfHubHTTPError, OSError, ValueError)):
            raise CheckpointError(f"{repo_id}: {weight_name} could not be fetched from the hub (weight_name= "
                                  f"names another file of the repo): {e}") from e
        raise


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: pickle-based LoRA files are refused because unpickling can execute "
                              "arbitrary code; use the .safetensors version")
    tensors, header = read_file(path, MAX_LORA_BYTES, MAX_LORA_TENSORS, "LoRA")
    metadata = None
    if "lora_adapter_metadata" in header:
        if len(header["lora_adapter_metadata"]) > MAX_LORA_METADATA_BYTES:
            raise CheckpointError(f"{path}: its lora_adapter_metadata is {len(header['lora_adapter_metadata'])} "
                                  f"characters, over the {MAX_LORA_METADATA_BYTES} a LoRA's config takes")
        try:
            metadata = json.loads(header["lora_adapter_metadata"])
        except (json.JSONDecodeError, RecursionError) as e:
            raise CheckpointError(f"{path}: its lora_adapter_metadata is not valid JSON ({e})") from None
        if not isinstance(metadata, dict):
            raise CheckpointError(f"{path}: its lora_adapter_metadata must be a JSON object")
    return tensors, metadata


# ----------------------------------------------------------------------------- resolving names

def ldm_unet_name(path: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str | None:
    """The original LDM UNet's name of one of our (diffusers') UNet module paths, or None.

    LDM numbers the encoder as one list, `input_blocks`: conv_in first, then per resolution
    `layers_per_block` entries [resnet, attention], then a downsampler entry (none after the
    last); the decoder as `output_blocks`, `layers_per_block + 1` entries per resolution, the last
    one also holding the upsampler (after the attention, if the block has one); the middle as
    `middle_block` [resnet, attention, resnet]."""
    if path in TOP_LDM:
        return TOP_LDM[path]
    n = layers_per_block
    m = re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)(?:\.(.+))?", path)
    mid = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.+))?", path)
    if m:
        side, block, kind, layer, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        first = 1 if side == "down" else 0  # input_blocks.0 is conv_in
        if kind in ("downsamplers", "upsamplers"):
            index = first + block * (n + 1) + n
            where = "0.op" if side == "down" else ("2" if block in up_blocks_with_attention else "1") + ".conv"
            return f"{'input' if side == 'down' else 'output'}_blocks.{index}.{where}" if rest == "conv" else None
        index = first + block * (n + 1) + layer
        prefix = f"{'input' if side == 'down' else 'output'}_blocks.{index}.{0 if kind == 'resnets' else 1}"
    elif mid:
        kind, layer, rest = mid.group(1), int(mid.group(2)), mid.group(3)
        prefix = f"middle_block.{1 if kind == 'attentions' else 2 * layer}"
    else:
        return None
    if rest is None:
        return prefix
    if kind == "resnets":
        head, _, tail = rest.partition(".")
        rest = RESNET_LDM.get(head, head) + (f".{tail}" if tail else "")
    return f"{prefix}.{rest}"  # inside a transformer, LDM's names are diffusers' (attn1.to_q, ff.net.2...)


def kohya_names(model_name: str, model: nn.Module, layers: dict[str, nn.Module]) -> dict[str, str | None]:
    """kohya's flattened name -> module path, for every layer a LoRA can adapt. kohya writes the
    path with `_` for `.`; for the UNet both diffusers' path and the LDM one are accepted. A
    flattened name two paths share maps to None (ambiguous: refused if a LoRA uses it)."""
    table: dict[str, str | None] = {}

    def add(flat: str, path: str):
        table[flat] = path if table.get(flat, path) == path else None

    up_with_attention = {int(p.split(".")[1]) for p in layers if re.match(r"up_blocks\.\d+\.attentions\.", p)}
    for path in layers:
        add(path.replace(".", "_"), path)
        if model_name == "unet":
            ldm = ldm_unet_name(path, model.config.layers_per_block, up_with_attention)
            if ldm is not None:
                add(ldm.replace(".", "_"), path)
    return table


def parse_key(key: str) -> tuple[str, str, bool, list[str]] | None:
    """(model name, role, kohya?, names) of a LoRA key, or None if its prefix or suffix is unknown.
    `names`: for kohya, the one flattened name; otherwise the module paths it may mean (an old
    attention processor's `to_q_lora` is `to_q` in a UNet, `q_proj` in CLIP)."""
    for prefixes, kohya in ((KOHYA_PREFIXES, True), (DIFFUSERS_PREFIXES, False)):
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            continue
        rest = key[len(prefix):]
        if not kohya and (m := PROCESSOR_KEY.fullmatch(rest)):
            attention, proj, role = m.groups()
            return prefixes[prefix], role, False, [f"{attention}.{name}" for name in PROCESSOR_TARGETS[proj]]
        suffix = next((s for s in ROLE_SUFFIXES if rest.endswith(s) and len(rest) > len(s)), None)
        if suffix is None:
            return None
        return prefixes[prefix], ROLE_SUFFIXES[suffix], kohya, [rest[:-len(suffix)]]
    return None


class LayerIndex:
    """The layers of one model a LoRA can adapt (Linear, Conv2d): by path, and by kohya's names."""

    def __init__(self, model_name: str, model: nn.Module):
        self.layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
        self.kohya = kohya_names(model_name, model, self.layers)

    def find(self, names: list[str], kohya: bool) -> str | None:
        if kohya:
            return self.kohya.get(names[0])
        # transformers 5 names CLIPTextModel's layers without the `text_model.` files may have
        return next((p for name in names for p in (name, "text_model." + name) if p in self.layers), None)


def lora_layers(lora: LoraFile, models: dict[str, nn.Module]) -> list[LoraLayer]:
    """Every layer the LoRA adapts, checked: names resolved, both halves present, shapes fitting
    the layer, rank at most the layer's dimensions, values finite."""
    groups: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    unknown, absent = [], set()
    indexes: dict[str, LayerIndex] = {}
    for key, tensor in lora.tensors.items():
        parsed = parse_key(key)
        if parsed is None:
            unknown.append(key)
            continue
        model_name, role, kohya, names = parsed
        if model_name not in models:
            absent.add(model_name)
            continue
        if model_name not in indexes:
            indexes[model_name] = LayerIndex(model_name, models[model_name])
        path = indexes[model_name].find(names, kohya)
        if path is None:
            unknown.append(key)
            continue
        group = groups.setdefault((model_name, path), {})
        if role in group:
            raise CheckpointError(f"{lora.name}: {model_name}.{path} has its LoRA {role} weight twice "
                                  f"(again as {key})")
        group[role] = tensor
    if absent:
        raise CheckpointError(f"{lora.name}: has LoRA weights for {', '.join(sorted(absent))}, which this "
                              f"pipeline does not have (it has {', '.join(models)})")
    if unknown:
        raise CheckpointError(f"{lora.name}: {len(unknown)} keys match no layer of the pipeline: "
                              f"{some(unknown)} (LoRA formats read: diffusers/PEFT, kohya/A1111)")
    if not groups:
        raise CheckpointError(f"{lora.name}: holds no LoRA weights")
    return [checked_layer(lora, model_name, path, indexes[model_name].layers[path].weight, group)
            for (model_name, path), group in groups.items()]


def peft_alpha(metadata: dict | None, model_name: str, path: str, rank: int, where: str) -> float:
    """alpha as PEFT reads it from diffusers' saved LoraConfig: alpha_pattern's entry for the
    layer (its full name or a dotted suffix of it), else lora_alpha; use_rslora makes the factor
    alpha / sqrt(rank), returned here as the alpha that gives it. No config: alpha = rank."""
    if not metadata:
        return float(rank)
    get = lambda field, default: metadata.get(f"{model_name}.{field}", default)  # noqa: E731
    if get("use_dora", False):
        raise CheckpointError(f"{where}: DoRA LoRAs (use_dora) are not supported")
    patterns = get("alpha_pattern", {}) or {}
    if not isinstance(patterns, dict):
        raise CheckpointError(f"{where}: alpha_pattern must map layer names to alphas, got a {type(patterns).__name__}")
    # PEFT reads each pattern as a regular expression matched at a dotted boundary; diffusers
    # writes plain layer names, matched here as such. A file's regular expression is refused, not
    # run: one can be made to take exponential time.
    for p in patterns:
        if re.search(r"[\\^$*+?{}\[\]|()]", p):
            raise CheckpointError(f"{where}: alpha_pattern {p!r}: regular expressions are not supported, "
                                  "only layer names")
    alpha = next((a for p, a in patterns.items() if path == p or path.endswith("." + p)), get("lora_alpha", rank))
    if not is_number(alpha):
        raise CheckpointError(f"{where}: alpha must be a finite number, got {alpha!r}")
    if get("use_rslora", False):
        alpha = alpha * math.sqrt(rank)  # PEFT's rsLoRA factor alpha / sqrt(rank) = (alpha * sqrt(rank)) / rank
    return alpha


def checked_layer(lora: LoraFile, model_name: str, path: str, weight: torch.Tensor, group: dict) -> LoraLayer:
    where = f"{lora.name}: {model_name}.{path}"
    if "down" not in group or "up" not in group:
        missing = "down (lora_A / lora_down)" if "down" not in group else "up (lora_B / lora_up)"
        raise CheckpointError(f"{where} has no LoRA {missing} weight")
    for role in ("down", "up"):
        if not group[role].is_floating_point():
            raise CheckpointError(f"{where}: the LoRA {role} weight is {group[role].dtype}, not floating point")
    # float32, as the delta is computed (float8 has no isfinite; float64 may not fit)
    down, up = group["down"].float(), group["up"].float()
    for t, role in ((down, "down"), (up, "up")):
        if not torch.isfinite(t).all():
            raise CheckpointError(f"{where}: the LoRA {role} weight contains NaN or inf (in float32)")
    rank = down.shape[0] if down.ndim else 0
    out, kernel = weight.shape[0], tuple(weight.shape[1:])  # (in,) or (in, kh, kw)
    if tuple(down.shape) != (rank, *kernel) or tuple(up.shape) != (out, rank) + (1,) * (weight.ndim - 2):
        ones = ", 1, 1" if weight.ndim == 4 else ""
        expected = f"down (rank, {', '.join(map(str, kernel))}) and up ({out}, rank{ones})"
        raise CheckpointError(f"{where}: LoRA down {tuple(down.shape)} and up {tuple(up.shape)} do not fit the "
                              f"layer's weight {tuple(weight.shape)} (expected {expected})")
    if not 1 <= rank <= min(out, math.prod(kernel)):
        raise CheckpointError(f"{where}: rank {rank} must be between 1 and the layer's smaller dimension "
                              f"{min(out, math.prod(kernel))}; this is not a low-rank adapter")
    alpha = group.get("alpha")
    if alpha is None:
        alpha = peft_alpha(lora.metadata, model_name, path, rank, where)
    elif alpha.numel() != 1 or not math.isfinite(alpha.item()):
        raise CheckpointError(f"{where}: alpha must be one finite number, got a tensor of shape {tuple(alpha.shape)}"
                              + (f" holding {alpha.item()}" if alpha.numel() == 1 else ""))
    else:
        alpha = alpha.item()
    return LoraLayer(model_name, path, down, up, float(alpha))


# ----------------------------------------------------------------------------- merging

SCALES = f"a finite number from -{MAX_LORA_SCALE} to {MAX_LORA_SCALE}"  # what scale_ok takes


def scale_ok(scale) -> bool:
    """A LoRA scale the merge takes (core/bounds.py's MAX_LORA_SCALE says why it is bounded)."""
    return is_number(scale) and abs(scale) <= MAX_LORA_SCALE


def lora_models(pipe) -> dict[str, nn.Module]:
    return {name: getattr(pipe, name) for name in ("unet", "transformer", "text_encoder", "text_encoder_2")
            if isinstance(getattr(pipe, name, None), nn.Module)}


def fuse(pipe, lora: LoraFile, scale: float = 1.0, adapter_name: str | None = None) -> str:
    """Merge a LoRA into the pipeline's weights; returns its adapter name. Everything is checked
    before the first weight changes; a merged weight that is not finite (a scale or alpha too
    large for the weight's dtype) undoes the layers merged before it. Refused while a model a
    loaded LoRA was merged into has been replaced (pipe.unet = other): unfuse_all first. The
    caller holds the pipeline's call lock."""
    if not scale_ok(scale):
        raise ValueError(f"{lora.name}: scale must be {SCALES}, got {scale!r:.40}")
    scale = float(scale)
    adapters = vars(pipe).setdefault("lora_adapters", {})    # name -> (source, scale), in load order
    originals = vars(pipe).setdefault("lora_originals", {})  # (model, path) -> (model, weight before any LoRA)
    if adapter_name is None:
        adapter_name = f"default_{len(adapters)}"  # diffusers' names
        while adapter_name in adapters:
            adapter_name += "_"
    if not isinstance(adapter_name, str) or adapter_name in adapters:
        raise ValueError(f"adapter_name {adapter_name!r} is already loaded (loaded: {', '.join(adapters)}); "
                         "choose another name or unload_lora_weights() first")
    models = lora_models(pipe)
    replaced = sorted({name for (name, _), (model, _) in originals.items() if model() is not models.get(name)})
    if replaced:
        raise ValueError(f"pipe.{replaced[0]} was replaced after a LoRA was loaded ({', '.join(adapters)}); "
                         "unload_lora_weights() before loading another")
    layers = lora_layers(lora, models)
    modules = {name: dict(model.named_modules()) for name, model in models.items()}
    merged = []  # ((model, path), weight, its value before this LoRA on the CPU): to undo on failure
    try:
        with torch.no_grad():
            for layer in layers:
                weight = modules[layer.model][layer.path].weight
                rank = layer.down.shape[0]
                delta = layer.up.flatten(1) @ layer.down.flatten(1)  # (out, in * kh * kw), float32
                delta = (scale * layer.alpha / rank) * delta.view(weight.shape).to(weight.device)
                new = (weight.float() + delta).to(weight.dtype)
                if not torch.isfinite(new).all():
                    raise CheckpointError(f"{lora.name}: {layer.model}.{layer.path}: merged with scale {scale} and alpha "
                                          f"{layer.alpha}, the weight is no longer finite in {weight.dtype}")
                merged.append(((layer.model, layer.path), weight, weight.detach().to("cpu", copy=True)))
                weight.copy_(new)
    except BaseException:
        with torch.no_grad():
            for _, weight, before in merged:
                weight.copy_(before)
        raise
    for (name, path), _, before in merged:
        originals.setdefault((name, path), (weakref.ref(models[name]), before))
    adapters[adapter_name] = (lora.name, scale)
    return adapter_name


def unfuse_all(pipe) -> None:
    """Every LoRA-touched weight back to its original, bit for bit (into the weight's current
    device and dtype, so after pipe.to(...) it equals the original moved the same way), in the
    model it was taken from. A model replaced since (pipe.unet = other) gets its weights back if
    something still holds it; the model put in its place never had a LoRA merged here and is left
    as it is, whatever layers it has. The caller holds the pipeline's call lock."""
    originals = vars(pipe).get("lora_originals", {})
    with torch.no_grad():
        for (_, path), (model, original) in originals.items():
            if (model := model()) is not None:  # None: a replaced model, since freed
                model.get_submodule(path).weight.copy_(original)
    originals.clear()
    vars(pipe).get("lora_adapters", {}).clear()


class LoraMixin:
    """diffusers' LoRA methods of a pipeline (which holds the models and `exclusive_call`)."""

    def load_lora_weights(self, path_or_repo_id, weight_name: str | None = None, scale: float = 1.0,
                          adapter_name: str | None = None, local_files_only: bool = False, cache_dir=None,
                          revision: str | None = None) -> str:
        """Merge a LoRA (a .safetensors file, a folder or hub repo id holding one, or a dict of
        tensors; diffusers/PEFT or kohya format) into the weights, scaled by `scale`: diffusers'
        load_lora_weights + fuse_lora. Several LoRAs add up. Returns the adapter name. The file is
        read first; the weights change under the call lock, never under a running generation.
        See this module's docstring."""
        lora_file = read_lora(path_or_repo_id, weight_name, local_files_only, cache_dir, revision)
        with self.exclusive_call():
            return fuse(self, lora_file, scale, adapter_name)

    def unload_lora_weights(self) -> None:
        """Every weight a LoRA changed back to its original, bit for bit."""
        with self.exclusive_call():
            unfuse_all(self)
