"""Single-file checkpoints: one `.safetensors` in the original LDM layout (A1111, ComfyUI, CivitAI).

Stable Diffusion was released as one file holding the whole `LatentDiffusion` model of the
CompVis/Stability code, and most fine-tunes are still shared that way. Its keys name the
original modules:

    model.diffusion_model.*            the UNet (openaimodel.UNetModel: input_blocks, middle_block, output_blocks)
    first_stage_model.*                the VAE (encoder.down.i.block.j, decoder.up.i..., mid.attn_1)
    cond_stage_model.transformer.*     SD-1: OpenAI CLIP ViT-L/14, already in transformers' names
    cond_stage_model.model.*           SD-2: OpenCLIP ViT-H/14 (resblocks, fused in_proj attention)
    conditioner.embedders.0.transformer.*   SDXL: CLIP ViT-L/14 (transformers' names)
    conditioner.embedders.1.model.*         SDXL: OpenCLIP ViT-bigG/14 (with text_projection)

This file is the one renaming table of the project: `rename_table` says, for every tensor the
diffusers-layout models need, which key of the file it comes from and how it is reshaped
(a third of a fused q/k/v projection, a transposed projection, a 1x1 convolution read as a
linear layer). The models are then built on the meta device and filled strictly, as
checkpoint.py fills them from a diffusers folder. The block arithmetic was learned by reading
diffusers' `single_file_utils.py` (convert_ldm_unet_checkpoint and friends).

What the file cannot say comes from presets (mini_tgate/presets/*.json for the UNets, the
constants below for the rest, all as the reference diffusers repos configure them) or, as with
diffusers' `from_single_file(config=...)`, from a local diffusers folder given as `config`.

Keys ignored on purpose (anything else the table does not use is an error naming it):
- `model_ema.*`: the training-time EMA copy; A1111 and diffusers also run `model.diffusion_model`
  (released files put the EMA weights there already);
- the noise-schedule buffers (`betas`, `alphas_cumprod`, ..., SDXL's `denoiser.sigmas`): the
  scheduler is rebuilt from its config;
- `position_ids` (0..76, recomputed) and OpenCLIP's `logit_scale` (contrastive training only);
- SD-2 only: the last OpenCLIP block and `text_projection`. SD-2 conditions on the penultimate
  layer's output (followed by the final layer norm), so diffusers' SD-2 text encoder is the
  OpenCLIP tower without its last block, and its pooled projection is never used.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ..core.bounds import PREDICTION_TYPES, some
from ..core.clip import CLIPTextModel
from ..core.config import PRESETS, CLIPTextConfig, UNetConfig, VAEConfig
from ..core.schedulers import scheduler_from_config
from ..core.tokenizer import CLIPTokenizer
from ..core.unet import UNet2DConditionModel
from ..core.vae import AutoencoderKL
from ..core.weights import (FLOAT_DTYPES, PICKLE_SUFFIXES, CheckpointError, pick_dtype, read_header, read_json,
                            read_tensors)

CLIP_VOCABULARY = Path(__file__).resolve().parent.parent / "clip"  # package data

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_CLIP = "cond_stage_model.transformer."
SD2_OPENCLIP = "cond_stage_model.model."
SDXL_CLIP = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP = "conditioner.embedders.1.model."

# the noise schedule as buffers: LatentDiffusion's (SD 1/2) and sgm's DiscreteDenoiser's (SDXL)
SCHEDULE_BUFFERS = {"betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                    "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                    "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                    "posterior_mean_coef1", "posterior_mean_coef2", "logvar", "denoiser.sigmas"}


# ----------------------------------------------------------------------------- presets

# The text encoders. CLIP's heads are always 64 wide; OpenAI's CLIP uses quick_gelu, OpenCLIP gelu.
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
OPENCLIP_H_SD2 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,  # 24 minus the last
                      num_attention_heads=16, projection_dim=512, hidden_act="gelu")
OPENCLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                     projection_dim=1280, hidden_act="gelu", architectures=["CLIPTextModelWithProjection"])

# SD's noise schedule. SD-1.5 ships PNDM (not implemented here; DDIM on the same schedule, as
# scheduler_from_config would pick), SD-2.1 DDIM, SDXL Euler: each with its repo's settings.
SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                   steps_offset=1, timestep_spacing="leading")
DDIM = dict(_class_name="DDIMScheduler", clip_sample=False, set_alpha_to_one=False, **SD_SCHEDULE)
EULER = dict(_class_name="EulerDiscreteScheduler", interpolation_type="linear", use_karras_sigmas=False,
             **SD_SCHEDULE)

# kind -> (UNet preset, VAE scaling factor, text encoder configs, scheduler, default prediction type).
# SD-2: the released single files are mostly the 768 px v-prediction models (2.0-v, 2.1), as
# diffusers also assumes; the 512 px "base" ones are epsilon: pass prediction_type="epsilon" and
# the default size becomes 512 px.
KINDS = {
    "sd1": ("sd15", 0.18215, [CLIP_L], DDIM, "epsilon"),
    "sd2": ("sd21", 0.18215, [OPENCLIP_H_SD2], DDIM, "v_prediction"),
    "sdxl": ("sdxl", 0.13025, [CLIP_L, OPENCLIP_BIGG], EULER, "epsilon"),
}


# ----------------------------------------------------------------------------- reading the file

def is_single_file(source) -> bool:
    """A path to one checkpoint file (existing, or named like one: a missing `model.safetensors`
    is "no such file", a `.ckpt` is refused as pickle) rather than a folder or hub repo id."""
    path = Path(source).expanduser()
    return path.is_file() or (not path.is_dir() and path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES))


def pipeline_name(path: str | os.PathLike) -> str:
    """The pipeline class a file's kind of checkpoint needs, from its header alone."""
    path = Path(path).expanduser()
    kind = detect_kind(read_header(path).tensors, path)
    return "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline"


def detect_kind(keys, name="the state dict") -> str:
    """sd1, sd2 or sdxl, from the text encoders the file holds (the UNets differ in shapes only).
    Errors say `name` and a few of the keys."""
    keys = set(keys)
    held = some(sorted(keys), 3)
    if not any(k.startswith(UNET) for k in keys) or not any(k.startswith(VAE) for k in keys):
        raise CheckpointError(f"{name}: not a Stable Diffusion checkpoint in the LDM layout: no keys under "
                              f"'{UNET}' (UNet) and '{VAE}' (VAE); it holds {held}")
    if any(k.startswith(SDXL_OPENCLIP) for k in keys) and any(k.startswith(SDXL_CLIP) for k in keys):
        return "sdxl"
    if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
        raise CheckpointError(f"{name}: an SDXL refiner checkpoint (one OpenCLIP text encoder); only SD 1.x, SD 2.x "
                              "and SDXL base single files are supported")
    if any(k.startswith(SD2_OPENCLIP) for k in keys):
        return "sd2"
    if any(k.startswith(SD1_CLIP) for k in keys):
        return "sd1"
    other = ", ".join(sorted(k for k in keys if not k.startswith((UNET, VAE)))[:3])
    raise CheckpointError(f"{name}: a single-file checkpoint without a known text encoder (expected "
                          f"'{SD1_CLIP}', '{SD2_OPENCLIP}' or '{SDXL_CLIP}' + '{SDXL_OPENCLIP}' keys; "
                          f"it has {other or 'only UNet and VAE keys'})")


# ----------------------------------------------------------------------------- the renaming table
# Each rule turns the key of one tensor of the file (prefix removed) into its diffusers name, or
# None when no rule applies (the caller then reports the key as unknown).

RESNET = [("in_layers.0.", "norm1."), ("in_layers.2.", "conv1."), ("emb_layers.1.", "time_emb_proj."),
          ("out_layers.0.", "norm2."), ("out_layers.3.", "conv2."), ("skip_connection.", "conv_shortcut.")]


def unet_name(key: str, layers_per_block: int) -> str | None:
    """openaimodel.UNetModel -> UNet2DConditionModel.

    input_blocks.0 is conv_in. Then each down level has `layers_per_block` (resnet[, attention])
    entries followed, except at the last level, by one downsampler entry: input block i >= 1 is
    entry (i-1) % (L+1) of level (i-1) // (L+1). Output blocks: L+1 entries per level, each a
    resnet [, attention] [, upsampler] (the last entry of a level but the last carries it).
    Inside attention blocks (SpatialTransformer) the names are already diffusers'."""
    fixed = {"time_embed.0.": "time_embedding.linear_1.", "time_embed.2.": "time_embedding.linear_2.",
             "label_emb.0.0.": "add_embedding.linear_1.", "label_emb.0.2.": "add_embedding.linear_2.",  # SDXL
             "input_blocks.0.0.": "conv_in.", "out.0.": "conv_norm_out.", "out.2.": "conv_out."}
    for old, new in fixed.items():
        if key.startswith(old):
            return new + key[len(old):]
    # input and output blocks are sequences of layers (input_blocks.i.0 the resnet, .1 the
    # attention, ...); the middle block is one sequence: resnet, attention, resnet
    m = re.fullmatch(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)\.(.+)|middle_block\.(\d+)\.(.+)", key)
    if not m:
        return None
    part, i, sub, rest = (m[1], int(m[2]), int(m[3]), m[4]) if m[1] else ("middle_block", int(m[5]), 0, m[6])
    resnet = rest
    for old, new in RESNET:
        if rest.startswith(old):
            resnet = new + rest[len(old):]
    if part == "middle_block":
        return {0: f"mid_block.resnets.0.{resnet}", 1: f"mid_block.attentions.0.{rest}",
                2: f"mid_block.resnets.1.{resnet}"}.get(i)
    per_level = layers_per_block + 1
    if part == "input_blocks":
        level, j = divmod(i - 1, per_level)
        if j == layers_per_block:  # the downsampler: input_blocks.i.0.op
            return f"down_blocks.{level}.downsamplers.0.conv.{rest[3:]}" if rest.startswith("op.") else None
        return f"down_blocks.{level}.resnets.{j}.{resnet}" if sub == 0 else f"down_blocks.{level}.attentions.{j}.{rest}"
    level, j = divmod(i, per_level)
    if sub == 0:
        return f"up_blocks.{level}.resnets.{j}.{resnet}"
    if rest.startswith("conv."):  # output_blocks.i.1.conv (no attention at this level) or .2.conv
        return f"up_blocks.{level}.upsamplers.0.{rest}"
    return f"up_blocks.{level}.attentions.{j}.{rest}" if sub == 1 else None


VAE_ATTENTION = {"norm.": "group_norm.", "q.": "to_q.", "k.": "to_k.", "v.": "to_v.", "proj_out.": "to_out.0."}


def vae_name(key: str, levels: int) -> str | None:
    """The LDM autoencoder -> AutoencoderKL. The decoder counts its levels from the bottom
    (up.0 is the last to run), diffusers from the top: up.i is up_blocks.(levels-1-i)."""
    key = key.replace("nin_shortcut.", "conv_shortcut.")
    for old, new in (("encoder.norm_out.", "encoder.conv_norm_out."), ("decoder.norm_out.", "decoder.conv_norm_out.")):
        if key.startswith(old):
            return new + key[len(old):]
    if re.fullmatch(r"(encoder|decoder)\.(conv_in|conv_out)\.\w+|(post_)?quant_conv\.\w+", key):
        return key
    m = re.fullmatch(r"(encoder|decoder)\.(down|up)\.(\d+)\.(block\.(\d+)|downsample|upsample)\.(.+)", key)
    if m and (m[1], m[2]) in (("encoder", "down"), ("decoder", "up")):
        level = int(m[3]) if m[2] == "down" else levels - 1 - int(m[3])
        where = f"{m[1]}.{m[2]}_blocks.{level}"
        if m[5] is not None:
            return f"{where}.resnets.{m[5]}.{m[6]}"
        return f"{where}.{m[4]}rs.0.{m[6]}"  # downsamplers / upsamplers
    m = re.fullmatch(r"(encoder|decoder)\.mid\.(block_1|block_2|attn_1)\.(.+)", key)
    if not m:
        return None
    if m[2] != "attn_1":
        return f"{m[1]}.mid_block.resnets.{int(m[2][-1]) - 1}.{m[3]}"
    for old, new in VAE_ATTENTION.items():
        if m[3].startswith(old):
            return f"{m[1]}.mid_block.attentions.0.{new}{m[3][len(old):]}"
    return None


OPENCLIP_BLOCK = {"ln_1.": "layer_norm1.", "ln_2.": "layer_norm2.", "mlp.c_fc.": "mlp.fc1.",
                  "mlp.c_proj.": "mlp.fc2.", "attn.out_proj.": "self_attn.out_proj."}


def openclip_names(key: str) -> list[tuple[str, str]] | None:
    """OpenCLIP's text tower -> CLIPTextModel: [(diffusers name, how)]. Its attention keeps q, k
    and v in one (3*width, width) `in_proj` (nn.MultiheadAttention): one key gives three tensors.
    `text_projection` is applied as x @ P, a Linear weight is P transposed."""
    fixed = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
             "positional_embedding": "text_model.embeddings.position_embedding.weight",
             "ln_final.weight": "text_model.final_layer_norm.weight",
             "ln_final.bias": "text_model.final_layer_norm.bias"}
    if key in fixed:
        return [(fixed[key], "")]
    if key == "text_projection":
        return [("text_projection.weight", "T")]
    m = re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)", key)
    if not m:
        return None
    layer, rest = f"text_model.encoder.layers.{m[1]}.", m[2]
    if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
        what = rest.rsplit("_", 1)[1]
        return [(f"{layer}self_attn.{p}_proj.{what}", p) for p in "qkv"]
    for old, new in OPENCLIP_BLOCK.items():
        if rest.startswith(old):
            return [(layer + new + rest[len(old):], "")]
    return None


def ignored_keys(keys, kind: str) -> set[str]:
    """The keys of the file left out on purpose (see the module docstring)."""
    ignored = {k for k in keys if k.startswith("model_ema.") or k in SCHEDULE_BUFFERS
               or k.endswith((".position_ids", ".logit_scale"))}
    if kind == "sd2":  # the block after the penultimate layer, and the unused pooled projection
        blocks = f"{SD2_OPENCLIP}transformer.resblocks."
        last = max((int(m[1]) for k in keys if (m := re.match(rf"{re.escape(blocks)}(\d+)\.", k))), default=None)
        ignored |= {k for k in keys if k.startswith(f"{blocks}{last}.")} | {f"{SD2_OPENCLIP}text_projection"}
    return ignored


def unet_layers_per_block(keys) -> int:
    """The UNet's resnets per down level, from where its first downsampler sits (input block
    L+1; with a single level, no downsampler: the input blocks after conv_in)."""
    down = [int(m[1]) for k in keys if (m := re.fullmatch(rf"{UNET}input_blocks\.(\d+)\.0\.op\.weight", k))]
    blocks = [int(m[1]) for k in keys if (m := re.match(rf"{UNET}input_blocks\.(\d+)\.", k))]
    return min(down) - 1 if down else max(blocks, default=0)


def rename_table(keys, kind: str, name="the state dict") -> dict[tuple[str, str], tuple[str, str]]:
    """(component, diffusers name) -> (key in the file, how to reshape it), for every tensor the
    pipeline's models take. Keys it cannot place raise a CheckpointError naming a few of them."""
    layers_per_block = unet_layers_per_block(keys)
    vae_levels = 1 + max((int(m[1]) for k in keys if (m := re.match(rf"{VAE}decoder\.up\.(\d+)\.", k))), default=-1)
    clip = {"sd1": SD1_CLIP, "sdxl": SDXL_CLIP}.get(kind)  # OpenAI's CLIP, in transformers' names already
    openclip = {"sd2": SD2_OPENCLIP, "sdxl": SDXL_OPENCLIP}.get(kind)
    openclip_encoder = "text_encoder_2" if kind == "sdxl" else "text_encoder"
    ignored = ignored_keys(keys, kind)
    table, unknown = {}, []
    for key in keys:
        if key in ignored:
            continue
        names = None
        if key.startswith(UNET):
            new = unet_name(key[len(UNET):], layers_per_block)
            names = new and [("unet", new, "")]
        elif key.startswith(VAE):
            new = vae_name(key[len(VAE):], vae_levels)
            # the mid-block attention's q/k/v/proj_out are 1x1 convolutions in the LDM VAE
            names = new and [("vae", new, "1x1" if ".attentions.0.to_" in new and new.endswith(".weight") else "")]
        elif clip and key.startswith(clip):
            rest = key[len(clip):]  # very old files lack the text_model. level
            names = [("text_encoder", rest if rest.startswith("text_model.") else "text_model." + rest, "")]
        elif openclip and key.startswith(openclip):
            found = openclip_names(key[len(openclip):])
            names = found and [(openclip_encoder, new, how) for new, how in found]
        if not names:
            unknown.append(key)
            continue
        for component, new, how in names:
            if (component, new) in table:  # e.g. a CLIP key with and without `text_model.`
                raise CheckpointError(f"{name}: {table[component, new][0]} and {key} are both the {component}'s {new}")
            table[(component, new)] = (key, how)
    if unknown:
        raise CheckpointError(f"{name}: {len(unknown)} keys of the {kind} checkpoint match no part of the pipeline: "
                              f"{some(unknown)}")
    return table


def reshape(t: torch.Tensor, how: str, key: str) -> torch.Tensor:
    if how in ("q", "k", "v"):  # a third of the fused in_proj (q, k, v stacked along dim 0)
        if t.ndim == 0 or t.shape[0] % 3:
            raise CheckpointError(f"{key}: shape {tuple(t.shape)} is not a fused q/k/v projection (3 x width first)")
        return t.chunk(3, dim=0)["qkv".index(how)].clone()
    if how == "T":
        if t.ndim != 2:
            raise CheckpointError(f"{key}: shape {tuple(t.shape)} is not a projection matrix (2 dimensions)")
        return t.T.contiguous()
    if how == "1x1" and t.ndim == 4:  # (out, in, 1, 1) convolution as a (out, in) linear weight
        return t[:, :, 0, 0].contiguous()
    return t


def convert(state: dict[str, torch.Tensor]) -> tuple[str, dict[str, dict]]:
    """(kind, {component: diffusers state dict}) of an LDM state dict held in memory (or on the
    meta device); `load_single_file` does the same reading one tensor at a time."""
    kind = detect_kind(state)
    parts: dict[str, dict] = {}
    for (component, new), (key, how) in rename_table(state, kind).items():
        parts.setdefault(component, {})[new] = reshape(state[key], how, key)
    return kind, parts


# ----------------------------------------------------------------------------- loading

def build(model_class, config, state: dict, keys: dict[str, str], path: Path, component: str):
    """A model of `config` on the meta device, once `state` (diffusers names; meta tensors will
    do: only shapes are compared) names exactly its tensors with their shapes. Errors name the
    file's key of a tensor (`keys`: diffusers name -> key) and then the diffusers name."""
    with torch.device("meta"):
        model = model_class(config)
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {keys[k]} ({k})" for k in state if k not in expected]
    problems += [f"{keys[k]} ({k}): file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        raise CheckpointError(f"{path}: its {component} does not fit the {component} config "
                              f"({len(problems)} problems: {some(problems)})")
    return model


def folder_configs(folder: Path, kind: str) -> dict:
    """The component configs of a local diffusers folder (diffusers' `config=`)."""
    if not folder.is_dir():
        raise CheckpointError(f"config={str(folder)!r}: not a local diffusers folder")
    configs = {"unet": read_json(folder / "unet" / "config.json"), "vae": read_json(folder / "vae" / "config.json"),
               "scheduler": read_json(folder / "scheduler" / "scheduler_config.json"),
               "text_encoder": read_json(folder / "text_encoder" / "config.json")}
    if kind == "sdxl":
        configs["text_encoder_2"] = read_json(folder / "text_encoder_2" / "config.json")
    index = folder / "model_index.json"
    configs["force_zeros_for_empty_prompt"] = read_json(index).get("force_zeros_for_empty_prompt", True) \
        if index.is_file() else True
    return configs


def preset_configs(kind: str, prediction_type: str) -> dict:
    """The component configs of the real models of a kind (see KINDS)."""
    unet_preset, scaling, encoders, scheduler, _ = KINDS[kind]
    unet = read_json(PRESETS / f"{unet_preset}.json")
    if kind == "sd2" and prediction_type == "epsilon":
        unet["sample_size"] = 64  # the 512 px SD-2 base models
    size = unet["sample_size"] * 8
    configs = {"unet": unet, "vae": dict(sample_size=size, scaling_factor=scaling),
               "scheduler": dict(scheduler, prediction_type=prediction_type), "force_zeros_for_empty_prompt": True}
    for name, encoder in zip(["text_encoder", "text_encoder_2"], encoders):
        configs[name] = dict(encoder)
    return configs


def tokenizer(folder: Path | None, subfolder: str, pad_token: str) -> CLIPTokenizer:
    if folder is not None and (folder / subfolder).is_dir():
        return CLIPTokenizer.from_pretrained(folder, subfolder=subfolder)
    if not (CLIP_VOCABULARY / "vocab.json").is_file():
        raise CheckpointError(f"{CLIP_VOCABULARY}: CLIP's vocabulary (vocab.json, merges.txt) is missing; "
                              "pass config= a diffusers folder with a tokenizer")
    return CLIPTokenizer.from_files(CLIP_VOCABULARY / "vocab.json", CLIP_VOCABULARY / "merges.txt", pad_token=pad_token)


def read_single_file(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None,
                     prediction_type: str | None = None, config: str | os.PathLike | None = None,
                     torch_dtype: torch.dtype | None = None, accept: tuple[str, ...] | None = None
                     ) -> tuple[str, dict]:
    """What a model_index.json would give for one LDM-layout `.safetensors` file (SD 1.x, SD 2.x or
    SDXL base): the pipeline's class name and its components, loaded.

    `prediction_type` ("epsilon", "v_prediction") overrides what the checkpoint kind implies
    (SD-2: v_prediction and 768 px; the others: epsilon), since the file cannot tell. `config`: a
    local diffusers folder whose unet/vae/text encoder/scheduler configs (and tokenizers) are
    used instead of the presets, as in diffusers' `from_single_file(config=...)`. `accept`: the
    class names a caller can build; a file of another kind is refused before a tensor is read."""
    dtype = pick_dtype(dtype, torch_dtype)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r}: expected one of {', '.join(PREDICTION_TYPES)}")
    path = Path(path).expanduser()
    header = read_header(path)
    shapes = {name: shape for name, (_, shape, _, _) in header.tensors.items()}
    kind = detect_kind(shapes, path)
    conv_in = shapes.get(f"{UNET}input_blocks.0.0.weight", ())  # other shapes than (out, in, 3, 3): refused later
    if len(conv_in) == 4 and conv_in[1] != 4:  # the latents (4) plus a masked image and mask (9) or an input image (8)
        raise CheckpointError(f"{path}: its UNet takes {conv_in[1]} input channels (an inpainting or instruct-pix2pix "
                              "model); only text-to-image models (4 channels) are supported")
    class_name = "StableDiffusionXLPipeline" if kind == "sdxl" else "StableDiffusionPipeline"
    if accept is not None and class_name not in accept:
        raise CheckpointError(f"{path}: a {class_name} checkpoint ({kind}), not a {accept[0]} one; "
                              f"use {class_name}.from_pretrained or load_pipeline")
    folder = None if config is None else Path(config).expanduser()
    configs = folder_configs(folder, kind) if folder else preset_configs(kind, prediction_type or KINDS[kind][4])
    if prediction_type is not None:  # the argument wins over a config folder's scheduler too
        configs["scheduler"]["prediction_type"] = prediction_type
    unet_config = UNetConfig.from_dict(configs["unet"])
    if unet_layers_per_block(shapes) != unet_config.layers_per_block:
        source = "config=" if folder else f"the {kind} preset"
        raise CheckpointError(f"{path}: its UNet has {unet_layers_per_block(shapes)} layers per block, the unet "
                              f"config {unet_config.layers_per_block} ({source})")
    table = rename_table(shapes, kind, path)
    # every dtype and shape checked against the models, built on the meta device, before a tensor is read
    meta: dict[str, dict] = {}
    keys: dict[str, dict] = {}  # component -> diffusers name -> the file's key, for errors
    for (component, new), (key, how) in table.items():
        if header.tensors[key][0] not in FLOAT_DTYPES:
            raise CheckpointError(f"{path}: tensor {key} is {header.tensors[key][0]}; model weights must be floating point")
        meta.setdefault(component, {})[new] = reshape(torch.empty(shapes[key], device="meta"), how, f"{path}: {key}")
        keys.setdefault(component, {})[new] = key
    classes = {"unet": (UNet2DConditionModel, unet_config), "vae": (AutoencoderKL, VAEConfig.from_dict(configs["vae"]))}
    classes |= {name: (CLIPTextModel, CLIPTextConfig.from_dict(configs[name]))
                for name in ("text_encoder", "text_encoder_2") if name in configs}
    models = {name: build(model_class, config, meta.pop(name, {}), keys.get(name, {}), path, name)
              for name, (model_class, config) in classes.items()}

    # each fused q/k/v tensor is read once; cast as read, so memory holds the weights in `dtype`
    read = read_tensors(path, header, list(dict.fromkeys(key for key, _ in table.values())),
                        lambda t: t.to(dtype) if t.is_floating_point() else t)
    states: dict[str, dict] = {}
    for (component, new), (key, how) in table.items():
        states.setdefault(component, {})[new] = reshape(read[key], how, key).to(device)
    del read
    for name, model in models.items():
        model.load_state_dict(states.pop(name, {}), strict=True, assign=True)
        model.requires_grad_(False).eval()
    unet, vae, encoders = models.pop("unet"), models.pop("vae"), models
    if vae.needs_upcast:
        vae.float()
    parts = dict(unet=unet, vae=vae, scheduler=scheduler_from_config(configs["scheduler"]),
                 text_encoder=encoders["text_encoder"])
    if kind == "sdxl":
        parts.update(tokenizer=tokenizer(folder, "tokenizer", "<|endoftext|>"), text_encoder_2=encoders["text_encoder_2"],
                     tokenizer_2=tokenizer(folder, "tokenizer_2", "!"),
                     force_zeros_for_empty_prompt=configs["force_zeros_for_empty_prompt"])
    else:  # SD-2's tokenizer pads with "!", as OpenCLIP's
        parts.update(tokenizer=tokenizer(folder, "tokenizer", "!" if kind == "sd2" else "<|endoftext|>"))
    return class_name, parts
