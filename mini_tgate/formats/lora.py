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

Several LoRAs add up once set_adapters names them (loading one makes it the only active one, as
in diffusers), each with its own scale (at most MAX_LORA_SCALE either way: bounds.py);
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
import warnings
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


@dataclass
class Adapter:
    """A loaded LoRA: its checked halves, kept so that it can be merged again at other weights."""
    source: str
    layers: list[LoraLayer]
    weights: dict[str, float]  # model name -> its weight there (load_lora_weights' scale, then set_adapters')
    fused: set[str]            # the models fuse_lora fused it into
    active: bool = True

    def factor(self, model: str, call_scale: float) -> float:
        """What its delta in `model` is multiplied by: fused, its weight (as PEFT's merge, active or
        not); else, while active, its weight x the call's cross_attention_kwargs scale."""
        if model in self.fused:
            return self.weights[model]
        return self.weights[model] * call_scale if self.active else 0.0


@dataclass
class LoraState:
    adapters: dict[str, Adapter]  # in load order
    active: list[str]             # get_active_adapters(), in set_adapters' order
    call_scale: float = 1.0       # the scale the unfused adapters are merged at (the last call's)

    def snapshot(self) -> LoraState:
        copies = {n: Adapter(a.source, a.layers, dict(a.weights), set(a.fused), a.active)
                  for n, a in self.adapters.items()}
        return LoraState(copies, list(self.active), self.call_scale)


def lora_state(pipe) -> LoraState:
    """The pipeline's LoRA bookkeeping: `lora_state` (the adapters), `lora_adapters` (name ->
    (source, scale), public) and `lora_originals` ((model, path) -> (weak reference to the model,
    the weight before any LoRA, on the CPU))."""
    vars(pipe).setdefault("lora_adapters", {})
    vars(pipe).setdefault("lora_originals", {})
    return vars(pipe).setdefault("lora_state", LoraState({}, []))


def publish(pipe, state: LoraState) -> None:
    """pipe.lora_adapters from the state: name -> (source, weight), the weight a dict by model
    where set_adapters gave the models different ones."""
    pipe.lora_adapters.clear()
    for name, a in state.adapters.items():
        weights = set(a.weights.values())
        pipe.lora_adapters[name] = (a.source, weights.pop() if len(weights) == 1 else dict(a.weights))


def refuse_replaced(pipe) -> None:
    """Merging again needs the models the originals were taken from: refused once one was replaced."""
    models = lora_models(pipe)
    originals = pipe.lora_originals
    replaced = sorted({name for (name, _), (model, _) in originals.items() if model() is not models.get(name)})
    if replaced:
        raise ValueError(f"pipe.{replaced[0]} was replaced after a LoRA was loaded ({', '.join(pipe.lora_adapters)}); "
                         "unload_lora_weights() before loading another")


def remerge(pipe, state: LoraState, keys, error=ValueError) -> None:
    """Each weight of `keys` ((model, path)) computed again from its original: W0 + the sum over the
    adapters, in load order, of factor * alpha / rank * up @ down, in float32, cast to the weight's
    dtype once. The same state gives the same bits: nothing drifts however often it runs."""
    terms: dict[tuple[str, str], list] = {}
    for name, a in state.adapters.items():
        for layer in a.layers:
            terms.setdefault((layer.model, layer.path), []).append((name, a, layer))
    for key, found in terms.items():
        # as PEFT runs a layer holding a fused adapter: its weight only, the unfused adapters skipped
        fused = any(key[0] in a.fused for _, a, _ in found)
        terms[key] = [(name, a.factor(key[0], state.call_scale) if key[0] in a.fused or not fused else 0.0, layer)
                      for name, a, layer in found]
    with torch.no_grad():
        for key in keys:
            model, original = pipe.lora_originals[key]
            weight = model().get_submodule(key[1]).weight
            merged = original.float().to(weight.device)
            for _, factor, layer in terms.get(key, []):
                if factor:
                    delta = layer.up.flatten(1) @ layer.down.flatten(1)  # (out, in * kh * kw), float32
                    merged = merged + (factor * layer.alpha / layer.down.shape[0]) * delta.view(weight.shape).to(
                        weight.device)
            new = merged.to(weight.dtype)
            if not torch.isfinite(new).all():
                how = ", ".join(f"{n} x {f:g} (alpha {layer.alpha:g})" for n, f, layer in terms.get(key, []) if f)
                raise error(f"{key[0]}.{key[1]}: merged with {how}, the weight is no longer finite in {weight.dtype}")
            weight.copy_(new)


def change(pipe, edit, keys=None, error=ValueError) -> None:
    """Apply `edit(state)` and merge the weights again (`keys`, default every LoRA-touched weight);
    if a merged weight is not finite, the state before and its weights come back, bit for bit.
    Weights no adapter touches any more are back to their originals and forgotten."""
    state = lora_state(pipe)
    before = state.snapshot()
    edit(state)
    keys = list(pipe.lora_originals) if keys is None else keys
    try:
        remerge(pipe, state, keys, error)
    except BaseException:
        vars(pipe)["lora_state"] = before
        remerge(pipe, before, keys)
        forget_untouched(pipe, before)
        raise
    forget_untouched(pipe, state)
    publish(pipe, state)


def forget_untouched(pipe, state: LoraState) -> None:
    touched = {(layer.model, layer.path) for a in state.adapters.values() for layer in a.layers}
    for key in [k for k in pipe.lora_originals if k not in touched]:
        del pipe.lora_originals[key]


def fuse(pipe, lora: LoraFile, scale: float = 1.0, adapter_name: str | None = None) -> str:
    """Merge a LoRA into the pipeline's weights at `scale`, the one active adapter (as diffusers:
    those loaded before stay loaded, inactive, until set_adapters names them); returns its name.
    Everything is checked before the first weight changes; a merged weight that is not finite (a
    scale or alpha too large for the weight's dtype) undoes the layers merged before it. Refused
    while a model a loaded LoRA was merged into has been replaced (pipe.unet = other):
    unfuse_all first. The caller holds the pipeline's call lock."""
    if not scale_ok(scale):
        raise ValueError(f"{lora.name}: scale must be {SCALES}, got {scale!r:.40}")
    state = lora_state(pipe)
    if adapter_name is None:
        adapter_name = f"default_{len(state.adapters)}"  # diffusers' names
        while adapter_name in state.adapters:
            adapter_name += "_"
    if not isinstance(adapter_name, str) or adapter_name in state.adapters:
        raise ValueError(f"adapter_name {adapter_name!r} is already loaded (loaded: {', '.join(state.adapters)}); "
                         "choose another name or unload_lora_weights() first")
    refuse_replaced(pipe)
    models = lora_models(pipe)
    layers = lora_layers(lora, models)
    keys = list(dict.fromkeys((layer.model, layer.path) for layer in layers))
    for name, path in keys:
        if (name, path) not in pipe.lora_originals:
            weight = models[name].get_submodule(path).weight
            pipe.lora_originals[(name, path)] = (weakref.ref(models[name]), weight.detach().to("cpu", copy=True))
    adapter = Adapter(lora.name, layers, {name: float(scale) for name in {layer.model for layer in layers}}, set())

    def add(state):  # as diffusers: the adapter loaded last is the active one, until set_adapters
        for a in state.adapters.values():
            a.active = False
        state.adapters[adapter_name] = adapter
        state.active = [adapter_name]

    # every LoRA-touched weight merged again (the adapters loaded before become inactive), or only
    # the new adapter's layers when it is the first
    change(pipe, add, None if state.active else keys, error=lambda message: CheckpointError(f"{lora.name}: {message}"))
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
    vars(pipe).pop("lora_state", None)


def unload(pipe) -> None:
    """diffusers' unload_lora_weights: what fuse_lora fused stays in the weights (as diffusers
    keeps a fused LoRA after unloading), the rest of every LoRA goes; with nothing fused, every
    weight is back to its original bit for bit (unfuse_all)."""
    state = vars(pipe).get("lora_state")
    if state is None or not any(a.fused for a in state.adapters.values()):
        return unfuse_all(pipe)
    refuse_replaced(pipe)

    def keep_fused(state):
        for a in state.adapters.values():
            a.active = False  # unfused parts contribute nothing; fused ones stay

    change(pipe, keep_fused)
    pipe.lora_originals.clear()  # the fused weights are the weights now
    pipe.lora_adapters.clear()
    del vars(pipe)["lora_state"]


def call_scale(pipe, cross_attention_kwargs) -> None:
    """diffusers' cross_attention_kwargs={"scale": s} of one call: the unfused adapters merged at
    weight x s (all models, text encoders too, as diffusers' lora_scale), fused ones unchanged. The
    weights keep that merge after the call; the next call merges again only if its scale differs.
    Checked here, before anything is encoded. The caller holds the pipeline's call lock."""
    if cross_attention_kwargs is None:
        scale = 1.0
    elif not isinstance(cross_attention_kwargs, dict):
        raise TypeError(f"cross_attention_kwargs must be a dict, got {type(cross_attention_kwargs).__name__}")
    elif set(cross_attention_kwargs) - {"scale"}:
        raise ValueError(f"cross_attention_kwargs: only 'scale' (the LoRA scale) is supported, got "
                         f"{some(sorted(map(repr, set(cross_attention_kwargs) - {'scale'})))}")
    else:
        scale = cross_attention_kwargs.get("scale", 1.0)
        if not scale_ok(scale):
            raise ValueError(f"cross_attention_kwargs['scale'] must be {SCALES}, got {scale!r:.40}")
    state = vars(pipe).get("lora_state")
    if state is None or float(scale) == state.call_scale:
        return
    refuse_replaced(pipe)
    change(pipe, lambda state: setattr(state, "call_scale", float(scale)))


# ----------------------------------------------------------------------------- diffusers' adapter methods

def adapter_names(state: LoraState, names, what: str = "adapter_names") -> list[str]:
    """One name or a list of them, each loaded, none twice."""
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"{what} must be an adapter name or a list of them, got {type(names).__name__}")
    unknown = [n for n in names if n not in state.adapters]
    if unknown:
        loaded = ", ".join(state.adapters) or "none"
        raise ValueError(f"{what}: {some(map(repr, unknown))} not loaded (loaded: {loaded})")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} names an adapter twice: {list(names)}")
    return list(names)


def model_weights(adapter: Adapter, weight, name: str) -> dict[str, float]:
    """set_adapters' weight of one adapter by model: one number for all its models, or diffusers'
    dict by part ({"unet": 0.5, "text_encoder": 1.0}; a part not named gets 1.0)."""
    if weight is None:
        weight = 1.0
    if not isinstance(weight, dict):
        weight = {model: weight for model in adapter.weights}
    unknown = set(weight) - set(adapter.weights)
    if unknown:
        raise ValueError(f"adapter_weights of {name!r}: {some(sorted(map(repr, unknown)))} is not a part it adapts "
                         f"(it adapts {', '.join(adapter.weights)})")
    for model, w in weight.items():
        if isinstance(w, (dict, list)):
            raise ValueError(f"adapter_weights of {name!r}: per-block weights ({model}: {type(w).__name__}) are not "
                             "supported, only one number per part")
        if not scale_ok(w):
            raise ValueError(f"adapter_weights of {name!r}: {model}'s weight must be {SCALES}, got {w!r:.40}")
    return {model: float(weight.get(model, 1.0)) for model in adapter.weights}


def set_adapters(pipe, names, adapter_weights=None) -> None:
    """diffusers' set_adapters: exactly these adapters active, at these weights (default 1.0; one
    number for all, one per adapter, or a dict by part); the others stay loaded, inactive. The
    weights are merged again from the originals (exact: no drift)."""
    state = lora_state(pipe)
    names = adapter_names(state, names)
    weights = adapter_weights if isinstance(adapter_weights, (list, tuple)) else [adapter_weights] * len(names)
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} adapter_weights for {len(names)} adapters: give one per adapter")
    new = {n: model_weights(state.adapters[n], w, n) for n, w in zip(names, weights)}
    refuse_replaced(pipe)

    def edit(state):
        for name, a in state.adapters.items():
            a.active = name in new
            a.weights = new.get(name, a.weights)
        state.active = names

    change(pipe, edit)


def delete_adapters(pipe, names) -> None:
    """diffusers' delete_adapters: these adapters leave the weights and are forgotten; a weight no
    adapter touches any more is its original again, bit for bit."""
    state = lora_state(pipe)
    names = adapter_names(state, names)
    refuse_replaced(pipe)

    def edit(state):
        for name in names:
            del state.adapters[name]
        state.active = [n for n in state.active if n not in names]

    change(pipe, edit)


def fuse_parts(pipe, components, lora_scale: float, names, fuse_it: bool) -> None:
    """fuse_lora / unfuse_lora on `components` (default: every part a LoRA adapts)."""
    state = lora_state(pipe)
    models = sorted({layer.model for a in state.adapters.values() for layer in a.layers})
    if components is None:
        components = models
    if isinstance(components, str) or not all(isinstance(c, str) for c in components):
        raise TypeError("components must be a list of part names, e.g. ['unet', 'text_encoder']")
    unknown = [c for c in components if c not in lora_models(pipe)]
    if unknown:
        raise ValueError(f"components: {some(map(repr, unknown))} is not a part of this pipeline "
                         f"({', '.join(lora_models(pipe))})")
    if not scale_ok(lora_scale):
        raise ValueError(f"lora_scale must be {SCALES}, got {lora_scale!r:.40}")
    names = list(state.active) if names is None else adapter_names(state, names)
    refuse_replaced(pipe)

    fused = sorted({f"{n} ({m})" for n in names for m in set(components) & state.adapters[n].fused})
    if fuse_it and fused:
        warnings.warn(f"{', '.join(fused)} already fused: left as they are; unfuse_lora() first to fuse again",
                      stacklevel=4)

    def edit(state):
        for model in components:
            for name, a in state.adapters.items():
                if not fuse_it:
                    a.fused.discard(model)
                elif model in a.weights and not fused:
                    # diffusers (PEFT's scale_layer) scales every active adapter of the part, fused
                    # or not, and unfuse_lora keeps that scale: so here
                    a.weights[model] *= float(lora_scale) if a.active else 1.0
                    if name in names:
                        a.fused.add(model)

    change(pipe, edit)


class LoraMixin:
    """diffusers' LoRA methods of a pipeline (which holds the models and `exclusive_call`).

    LoRAs are merged into the weights here (see the module's docstring); each method below merges
    them again from the saved originals and the LoRA halves, so its result is exact (the weights
    equal a fresh load at the same weights, bit for bit) and the UNet runs as fast as without one."""

    def load_lora_weights(self, path_or_repo_id, weight_name: str | None = None, scale: float = 1.0,
                          adapter_name: str | None = None, local_files_only: bool = False, cache_dir=None,
                          revision: str | None = None) -> str:
        """Merge a LoRA (a .safetensors file, a folder or hub repo id holding one, or a dict of
        tensors; diffusers/PEFT or kohya format) into the weights at weight `scale`, as diffusers'
        load_lora_weights (with set_adapters' weight given at once): the LoRA loaded last is the
        active one; set_adapters([...]) makes several add up. Returns the adapter name. The file
        is read first; the weights change under the call lock, never under a running generation.
        See this module's docstring."""
        lora_file = read_lora(path_or_repo_id, weight_name, local_files_only, cache_dir, revision)
        with self.exclusive_call():
            return fuse(self, lora_file, scale, adapter_name)

    def unload_lora_weights(self) -> None:
        """Every LoRA forgotten and every weight back to its original, bit for bit; a LoRA fused
        with fuse_lora stays in the weights (diffusers' fuse_lora + unload_lora_weights)."""
        with self.exclusive_call():
            unload(self)

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """diffusers' set_adapters: these adapters active at these weights, the others inactive."""
        with self.exclusive_call():
            set_adapters(self, adapter_names, adapter_weights)

    def get_active_adapters(self) -> list[str]:
        """The active adapters' names, as set_adapters last named them (else in load order)."""
        return list(getattr(self, "lora_state", LoraState({}, [])).active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        """Part name -> the adapters loaded into it (diffusers' get_list_adapters)."""
        listed: dict[str, list[str]] = {}
        for name, a in getattr(self, "lora_state", LoraState({}, [])).adapters.items():
            for model in a.weights:
                listed.setdefault(model, []).append(name)
        return listed

    def delete_adapters(self, adapter_names) -> None:
        """These adapters out of the weights and forgotten."""
        with self.exclusive_call():
            delete_adapters(self, adapter_names)

    def fuse_lora(self, components=None, lora_scale: float = 1.0, safe_fusing: bool = False,
                  adapter_names=None) -> None:
        """diffusers' fuse_lora: the adapters (default: the active ones) fixed into the weights of
        `components` (default: every part they adapt). As in diffusers, lora_scale multiplies the
        weight of every active adapter of those parts, and that stays after unfuse_lora (until
        set_adapters). A fused adapter ignores set_adapters' activity and a call's
        cross_attention_kwargs scale until unfuse_lora(); unload_lora_weights() then keeps it in the
        weights. safe_fusing is accepted: every merge here is checked for NaN and inf."""
        with self.exclusive_call():
            fuse_parts(self, components, lora_scale, adapter_names, fuse_it=True)

    def unfuse_lora(self, components=None) -> None:
        """Undo fuse_lora: the adapters follow their activity and the call's scale again (at the
        weights fuse_lora's lora_scale left them, as in diffusers)."""
        with self.exclusive_call():
            fuse_parts(self, components, 1.0, list(lora_state(self).adapters), fuse_it=False)
