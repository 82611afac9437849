"""Counting the denoiser's multiply-accumulates (MACs) over a whole generation, TGATE included.

The project's own denoiser (the UNet, or PixArt's transformer) is built on the meta device (no
memory, no arithmetic) and run through the TGATE plan step by step, exactly as the pipeline runs
it: what the gate skips is simply never called. Forward hooks count:

- `denoiser_macs` (also `unet_macs` for a UNet): every Linear and Conv2d MAC, the convention of
  Calflops and of the paper's Tables 2 and 3 (attention-score and attention-value products inside
  scaled-dot-product attention are not counted there); SVD's Conv3d counted the same way (output
  elements x input channels / groups x kernel volume);
- `unet_macs_with_attention` / `denoiser_macs_with_attention`: the same plus those two products
  (2 * B * heads * T * S * head_dim for each attention computed).

Only the denoiser is counted (the text encoders and the VAE run once per image, as in the paper).
PixArt's caption projection runs at every step, after the gate too, and is counted there.
SVD's UNet runs on (batch, frames, 8, h, w) latents, one image token per video and 3 added time
ids; with CFG the batch is doubled before the gate, one branch runs after it (as for the others).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .core.attention import Attention
from .core.bounds import (MACS_MAX_BATCH, MACS_MAX_FRAMES, MACS_MAX_SIDE, MACS_MAX_STEPS, MACS_MAX_TEXT_LEN, int_in,
                          is_number)
from .core.config import PRESETS, UNetConfig
from .core.tgate import REUSE, DeepCache, TGate, check_gate_types, plan
from .core.unet import UNet2DConditionModel
from .core.weights import read_json
from .pixart.config import PixArtTransformerConfig
from .pixart.transformer import PixArtTransformer2DModel
from .svd.config import UNetSpatioTemporalConfig
from .svd.unet import UNetSpatioTemporalConditionModel



PIXART_CLASSES = ("PixArtTransformer2DModel", "Transformer2DModel")  # Alpha's config names the latter
CONFIGS = {**dict.fromkeys(PIXART_CLASSES, PixArtTransformerConfig),  # by `_class_name`; otherwise UNetConfig
           "UNetSpatioTemporalConditionModel": UNetSpatioTemporalConfig}
MODELS = {UNetConfig: UNet2DConditionModel, PixArtTransformerConfig: PixArtTransformer2DModel,
          UNetSpatioTemporalConfig: UNetSpatioTemporalConditionModel}  # each config's denoiser


def denoiser_config(arch: str | dict | UNetConfig | PixArtTransformerConfig | UNetSpatioTemporalConfig):
    """A bundled preset name (sd15, sd21, sdxl, lcm-sdxl, pixart-alpha, pixart-sigma, svd-xt), a path
    to a UNet, PixArt transformer or SVD UNet config.json, or a config; its `_class_name` says which."""
    if isinstance(arch, tuple(MODELS)):
        arch.check()  # a config built in code is bounded as one read from a file
        return arch
    if isinstance(arch, dict):
        return CONFIGS.get(str(arch.get("_class_name")), UNetConfig).from_dict(arch)  # str: a list is no key
    path = PRESETS / f"{arch}.json"
    if not path.is_file():
        path = Path(arch)
        if path.is_dir():
            path = path / "config.json"
    if not path.is_file():
        names = sorted(p.stem for p in PRESETS.glob("*.json"))
        raise ValueError(f"--arch {arch!r}: neither a preset ({', '.join(names)}) nor a UNet, PixArt "
                         "transformer or SVD UNet config.json")
    return denoiser_config(read_json(path))  # bounded read; a broken file is named in the error


def check_count_args(steps, guidance_scale, batch_size, text_len, tgate, deepcache, frames=None) -> None:
    """count_macs' checks of its arguments (height and width wait for the config: see image_size)."""
    if not int_in(steps, 1, MACS_MAX_STEPS):
        raise ValueError(f"steps must be an integer from 1 to {MACS_MAX_STEPS}, got {steps!r}")
    if not is_number(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if not int_in(batch_size, 1, MACS_MAX_BATCH):
        raise ValueError(f"batch_size must be an integer from 1 to {MACS_MAX_BATCH}, got {batch_size!r}")
    if not (text_len is None or int_in(text_len, 1, MACS_MAX_TEXT_LEN)):
        raise ValueError(f"text_len must be an integer from 1 to {MACS_MAX_TEXT_LEN}, got {text_len!r}")
    if not (frames is None or int_in(frames, 1, MACS_MAX_FRAMES)):
        raise ValueError(f"frames must be an integer from 1 to {MACS_MAX_FRAMES}, got {frames!r}")
    check_gate_types(tgate, deepcache)


def image_size(cfg, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width), the config's sample size where None (SVD's: an int, [h, w] or None),
    checked against the denoiser."""
    size = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else [cfg.sample_size] * 2
    if None in size and None in (height, width):
        raise ValueError("height and width must be given: this config has no sample_size")
    height = size[0] * 8 if height is None else height
    width = size[1] * 8 if width is None else width
    for name, value in (("height", height), ("width", width)):
        if not (int_in(value, 8, MACS_MAX_SIDE) and value % 8 == 0):
            raise ValueError(f"{name} must be a multiple of 8 from 8 to {MACS_MAX_SIDE}, got {value!r}")
        if isinstance(cfg, PixArtTransformerConfig) and value // 8 % cfg.patch_size:
            raise ValueError(f"{name} must be a multiple of {8 * cfg.patch_size} for this transformer, got {value}")
    return height, width


def attach_counters(unet: nn.Module) -> dict:
    """Forward hooks on every Linear, Conv2d, Conv3d and Attention of `unet` that add up, in the dict
    returned, its Linear/Conv MACs ("linear_conv") and its attention products ("attention")."""
    counts = {"linear_conv": 0, "attention": 0}

    def count_layer(module, inputs, out):
        if isinstance(module, nn.Linear):
            counts["linear_conv"] += out.numel() * module.in_features
        else:  # Conv2d, Conv3d: each output element takes in_channels/groups x the kernel's volume
            counts["linear_conv"] += out.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)

    def count_attention(module, inputs, out):
        if module.gate != REUSE:
            x = inputs[0]
            s = inputs[1].shape[1] if len(inputs) > 1 and inputs[1] is not None else x.shape[1]
            counts["attention"] += 2 * x.shape[0] * x.shape[1] * s * module.to_q.out_features

    for m in unet.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv3d)):
            m.register_forward_hook(count_layer)
        elif isinstance(m, Attention):
            m.register_forward_hook(count_attention)
    return counts


def denoiser_inputs(cfg, b: int, height: int, width: int, text_len: int, frames: int = 1) -> tuple[tuple, dict]:
    """(args, kwargs) of one call of the denoiser `cfg` describes on a batch of b (empty tensors);
    `frames`: the frames of each of SVD's videos."""
    latents = torch.empty(b, cfg.in_channels, height // 8, width // 8)
    if isinstance(cfg, UNetSpatioTemporalConfig):  # image tokens; fps, motion bucket, noise augmentation
        time_ids = torch.empty(b, cfg.projection_class_embeddings_input_dim // cfg.addition_time_embed_dim)
        text = torch.empty(b, text_len, cfg.per_block(cfg.cross_attention_dim)[0])
        return (latents[:, None].expand(-1, frames, -1, -1, -1), torch.empty(b), text, time_ids), {}
    if isinstance(cfg, PixArtTransformerConfig):
        conditions = {"resolution": torch.empty(b, 2), "aspect_ratio": torch.empty(b, 1)}
        text = torch.empty(b, text_len, cfg.caption_channels or cfg.cross_attention_dim)
        return (latents, text, torch.empty(b)), {"added_cond_kwargs": conditions if cfg.additional_conditions else None}
    kw = {}
    if cfg.addition_embed_type == "text_time":
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        kw["added_cond_kwargs"] = {"text_embeds": torch.empty(b, pooled), "time_ids": torch.empty(b, 6)}
    if cfg.time_cond_proj_dim:
        kw["timestep_cond"] = torch.empty(b, cfg.time_cond_proj_dim)
    return (latents, torch.empty(b), torch.empty(b, text_len, cfg.per_block(cfg.cross_attention_dim)[0])), kw


def count_macs(arch="sd15", height: int | None = None, width: int | None = None, steps: int = 25,
               guidance_scale: float = 7.5, tgate: TGate | None = None, batch_size: int = 1,
               text_len: int | None = None, deepcache: DeepCache | None = None, frames: int | None = None) -> dict:
    """MACs of the denoiser over one generation of `batch_size` images, or videos of `frames` frames
    for SVD (default: the config's num_frames); see the module docstring.
    With `deepcache` (SD/SDXL UNets only) the shallow steps count what they run: the shallow branch.
    `text_len`: tokens of text per prompt; default 77 (CLIP) for a UNet, for PixArt the pipelines'
    max_sequence_length: 120 for Alpha (micro-conditions on), 300 for Sigma; SVD: 1 image token."""
    check_count_args(steps, guidance_scale, batch_size, text_len, tgate, deepcache, frames)
    cfg = denoiser_config(arch)
    pixart, svd = isinstance(cfg, PixArtTransformerConfig), isinstance(cfg, UNetSpatioTemporalConfig)
    if pixart and deepcache is not None:
        raise ValueError("DeepCache splits a UNet; a PixArt transformer has no shallow branch")
    if svd and deepcache is not None:
        raise ValueError("DeepCache is not implemented for SVD's spatio-temporal UNet")
    if frames is not None and not svd:
        raise ValueError("frames: only a video UNet (SVD) has frames")
    frames = (cfg.num_frames if frames is None else frames) if svd else 1
    if text_len is None:
        text_len = (120 if cfg.additional_conditions else 300) if pixart else 1 if svd else 77
    height, width = image_size(cfg, height, width)
    # CFG doubles the batch, unless the model folds guidance into an embedding (LCM)
    use_cfg = guidance_scale > 1 and (pixart or svd or cfg.time_cond_proj_dim is None)
    with torch.device("meta"):
        unet = MODELS[type(cfg)](cfg)
    if deepcache is not None:
        unet.deep_split(deepcache.branch)  # a branch this UNet has, or a ValueError
    counts = attach_counters(unet)

    def run(step):  # the MACs of one denoiser call under this step's gate
        unet.set_gate(step)
        args, kwargs = denoiser_inputs(cfg, batch_size * (2 if step.cfg else 1), height, width, text_len, frames)
        before = dict(counts)
        unet(*args, **kwargs)
        return {k: counts[k] - before[k] for k in counts}

    # Steps with the same plan cost the same: each distinct one is run once (meta device), in order
    # (so a shallow step's kept feature and a reused attention's cache exist when they are read).
    per_plan, per_step = {}, []
    with torch.device("meta"):
        for step in plan(tgate, steps, use_cfg, deepcache):
            if step not in per_plan:
                per_plan[step] = run(step)
            per_step.append(per_plan[step])
    total = {k: sum(s[k] for s in per_step) for k in counts}
    result = {"denoiser": type(unet).__name__, "denoiser_macs": total["linear_conv"],
              "denoiser_macs_with_attention": total["linear_conv"] + total["attention"],
              "per_step": [s["linear_conv"] for s in per_step], "height": height, "width": width,
              "steps": steps, "text_len": text_len, "cfg": use_cfg, "tgate": None if tgate is None else vars(tgate),
              "deepcache": None if deepcache is None else vars(deepcache)}
    if svd:
        result["frames"] = frames
    if not pixart:  # the names of the UNet-only first version, kept
        result.update(unet_macs=result["denoiser_macs"], unet_macs_with_attention=result["denoiser_macs_with_attention"])
    return result
