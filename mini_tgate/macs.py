"""Counting the denoiser's multiply-accumulates (MACs) over a whole generation, TGATE included.

The project's own denoiser (the UNet, or PixArt's transformer) is built on the meta device (no
memory, no arithmetic) and run through the TGATE plan step by step, exactly as the pipeline runs
it: what the gate skips is simply never called. Forward hooks count:

- `denoiser_macs` (also `unet_macs` for a UNet): every Linear and Conv2d MAC, the convention of
  Calflops and of the paper's Tables 2 and 3 (attention-score and attention-value products inside
  scaled-dot-product attention are not counted there);
- `unet_macs_with_attention` / `denoiser_macs_with_attention`: the same plus those two products
  (2 * B * heads * T * S * head_dim for each attention computed).

Only the denoiser is counted (the text encoders and the VAE run once per image, as in the paper).
PixArt's caption projection runs at every step, after the gate too, and is counted there.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from .core.attention import Attention
from .core.bounds import MACS_MAX_BATCH, MACS_MAX_SIDE, MACS_MAX_STEPS, MACS_MAX_TEXT_LEN, int_in, is_number
from .core.config import UNetConfig
from .core.tgate import REUSE, DeepCache, TGate, check_gate_types, plan
from .core.unet import UNet2DConditionModel
from .core.weights import read_json
from .pixart.config import PixArtTransformerConfig
from .pixart.transformer import PixArtTransformer2DModel

PRESETS = Path(__file__).resolve().parent / "presets"


PIXART_CLASSES = ("PixArtTransformer2DModel", "Transformer2DModel")  # Alpha's config names the latter


def denoiser_config(arch: str | dict | UNetConfig | PixArtTransformerConfig):
    """A bundled preset name (sd15, sd21, sdxl, lcm-sdxl, pixart-alpha, pixart-sigma), a path to a
    UNet or PixArt transformer config.json, or a config; the config's `_class_name` says which."""
    if isinstance(arch, (UNetConfig, PixArtTransformerConfig)):
        return arch
    if isinstance(arch, dict):
        is_pixart = arch.get("_class_name") in PIXART_CLASSES
        return (PixArtTransformerConfig if is_pixart else UNetConfig).from_dict(arch)
    path = PRESETS / f"{arch}.json"
    if not path.is_file():
        path = Path(arch)
        if path.is_dir():
            path = path / "config.json"
    if not path.is_file():
        names = sorted(p.stem for p in PRESETS.glob("*.json"))
        raise ValueError(f"--arch {arch!r}: neither a preset ({', '.join(names)}) nor a UNet or PixArt "
                         "transformer config.json")
    return denoiser_config(read_json(path))  # bounded read; a broken file is named in the error


def check_count_args(steps, guidance_scale, batch_size, text_len, tgate, deepcache) -> None:
    """count_macs' checks of its arguments (height and width wait for the config: see image_size)."""
    if not int_in(steps, 1, MACS_MAX_STEPS):
        raise ValueError(f"steps must be an integer from 1 to {MACS_MAX_STEPS}, got {steps!r}")
    if not is_number(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if not int_in(batch_size, 1, MACS_MAX_BATCH):
        raise ValueError(f"batch_size must be an integer from 1 to {MACS_MAX_BATCH}, got {batch_size!r}")
    if not (text_len is None or int_in(text_len, 1, MACS_MAX_TEXT_LEN)):
        raise ValueError(f"text_len must be an integer from 1 to {MACS_MAX_TEXT_LEN}, got {text_len!r}")
    check_gate_types(tgate, deepcache)


def image_size(cfg, height: int | None, width: int | None) -> tuple[int, int]:
    """(height, width), the config's sample size where None, checked against the denoiser."""
    height = cfg.sample_size * 8 if height is None else height
    width = cfg.sample_size * 8 if width is None else width
    for name, value in (("height", height), ("width", width)):
        if not (int_in(value, 8, MACS_MAX_SIDE) and value % 8 == 0):
            raise ValueError(f"{name} must be a multiple of 8 from 8 to {MACS_MAX_SIDE}, got {value!r}")
        if isinstance(cfg, PixArtTransformerConfig) and value // 8 % cfg.patch_size:
            raise ValueError(f"{name} must be a multiple of {8 * cfg.patch_size} for this transformer, got {value}")
    return height, width


def attach_counters(unet: nn.Module) -> dict:
    """Forward hooks on every Linear, Conv2d and Attention of `unet` that add up, in the dict
    returned, its Linear/Conv2d MACs ("linear_conv") and its attention products ("attention")."""
    counts = {"linear_conv": 0, "attention": 0}

    def count_layer(module, inputs, out):
        if isinstance(module, nn.Linear):
            counts["linear_conv"] += out.numel() * module.in_features
        else:
            kh, kw = module.kernel_size
            counts["linear_conv"] += out.numel() * module.in_channels // module.groups * kh * kw

    def count_attention(module, inputs, out):
        if module.gate != REUSE:
            x = inputs[0]
            s = inputs[1].shape[1] if len(inputs) > 1 and inputs[1] is not None else x.shape[1]
            counts["attention"] += 2 * x.shape[0] * x.shape[1] * s * module.to_q.out_features

    for m in unet.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.register_forward_hook(count_layer)
        elif isinstance(m, Attention):
            m.register_forward_hook(count_attention)
    return counts


def denoiser_inputs(cfg, b: int, height: int, width: int, text_len: int) -> tuple[tuple, dict]:
    """(args, kwargs) of one call of the denoiser `cfg` describes on a batch of b (empty tensors)."""
    latents = torch.empty(b, cfg.in_channels, height // 8, width // 8)
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
               text_len: int | None = None, deepcache: DeepCache | None = None) -> dict:
    """MACs of the denoiser over one generation of `batch_size` images (see the module docstring).
    With `deepcache` (UNets only) the shallow steps count what they run: the shallow branch.
    `text_len`: tokens of text per prompt; default 77 (CLIP) for a UNet, and for PixArt the
    pipelines' max_sequence_length: 120 for Alpha (micro-conditions on), 300 for Sigma."""
    check_count_args(steps, guidance_scale, batch_size, text_len, tgate, deepcache)
    cfg = denoiser_config(arch)
    pixart = isinstance(cfg, PixArtTransformerConfig)
    if pixart and deepcache is not None:
        raise ValueError("DeepCache splits a UNet; a PixArt transformer has no shallow branch")
    if text_len is None:
        text_len = (120 if cfg.additional_conditions else 300) if pixart else 77
    height, width = image_size(cfg, height, width)
    # CFG doubles the batch, unless the model folds guidance into an embedding (LCM)
    use_cfg = guidance_scale > 1 and (pixart or cfg.time_cond_proj_dim is None)
    with torch.device("meta"):
        unet = (PixArtTransformer2DModel if pixart else UNet2DConditionModel)(cfg)
    if deepcache is not None:
        unet.deep_split(deepcache.branch)  # a branch this UNet has, or a ValueError
    counts = attach_counters(unet)

    def run(step):  # the MACs of one denoiser call under this step's gate
        unet.set_gate(step)
        args, kwargs = denoiser_inputs(cfg, batch_size * (2 if step.cfg else 1), height, width, text_len)
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
    if not pixart:  # the names of the UNet-only first version, kept
        result.update(unet_macs=result["denoiser_macs"], unet_macs_with_attention=result["denoiser_macs_with_attention"])
    return result
