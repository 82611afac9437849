"""CLIP's image encoder and the image preprocessing of Stable Video Diffusion.

SVD conditions its UNet on one CLIP embedding of the input image (OpenCLIP's ViT-H/14 image
tower, `image_encoder/`), in place of SD's prompt embeddings. `CLIPVisionModelWithProjection`
reimplements transformers' class of that name (transformers/models/clip/modeling_clip.py): a
ViT whose pre-norm layers are the text encoder's (core/clip.py) without the causal mask.
`preprocess_image` is what diffusers' StableVideoDiffusionPipeline does before it
(`_encode_image`, `_resize_with_antialiasing`), in plain torch.

Module names follow the checkpoint's keys (`vision_model.embeddings.patch_embedding.weight`,
`vision_model.pre_layrnorm.weight` (sic), `vision_model.encoder.layers.0.self_attn.q_proj.weight`,
..., `visual_projection.weight`); transformers 5 saves this class with the same keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.clip import EncoderLayer
from ..core.weights import PretrainedMixin, read_json, write_json
from .config import CLIPVisionConfig

# OpenAI CLIP's per-channel pixel mean and std (CLIPImageProcessor's defaults, SVD's feature_extractor)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class CLIPVisionOutput:
    image_embeds: torch.Tensor  # (B, projection_dim): visual_projection(post_layernorm(class token)), not normalised
    last_hidden_state: torch.Tensor  # (B, 1 + patches, D): the last layer's output (no post_layernorm)


class Embeddings(nn.Module):
    """Patches as tokens: a learned class token, then one token per patch, plus learned positions."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        d, p = config.hidden_size, config.patch_size
        self.class_embedding = nn.Parameter(torch.randn(d))  # random, as nn.Embedding's weights start
        self.patch_embedding = nn.Conv2d(config.num_channels, d, kernel_size=p, stride=p, bias=False)
        self.position_embedding = nn.Embedding((config.image_size // p) ** 2 + 1, d)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # (B, patches, D), row by row
        cls = self.class_embedding.expand(len(pixel_values), 1, -1)  # (B, 1, D)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, 1 + patches, D)


class CLIPVisionModelWithProjection(PretrainedMixin, nn.Module):
    """transformers' CLIPVisionModelWithProjection: pixel_values -> image_embeds."""

    config_class = CLIPVisionConfig

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.vision_model = nn.ModuleDict(dict(
            embeddings=Embeddings(config),
            pre_layrnorm=nn.LayerNorm(d, eps=config.layer_norm_eps),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(
                EncoderLayer(config, causal=False) for _ in range(config.num_hidden_layers)))),
            post_layernorm=nn.LayerNorm(d, eps=config.layer_norm_eps),
        ))
        self.visual_projection = nn.Linear(d, config.projection_dim, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> CLIPVisionOutput:
        """pixel_values: (B, num_channels, image_size, image_size), normalised (see preprocess_image)."""
        vm, c, size = self.vision_model, self.config.num_channels, self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != (c, size, size):
            raise ValueError(f"pixel_values have shape {tuple(pixel_values.shape)}; this image encoder "
                             f"takes (B, {c}, {size}, {size})")
        x = vm.pre_layrnorm(vm.embeddings(pixel_values.to(self.visual_projection.weight.dtype)))
        for layer in vm.encoder.layers:
            x = layer(x)
        pooled = vm.post_layernorm(x[:, 0])  # (B, D): the class token
        return CLIPVisionOutput(image_embeds=self.visual_projection(pooled), last_hidden_state=x)

    def saved_names(self) -> tuple[str, str]:
        return "CLIPVisionModelWithProjection", "model.safetensors"  # transformers' class and file

    def save_pretrained(self, folder) -> None:
        """The mixin's save (config.json with `architectures`, model.safetensors), with this
        tower's `model_type` (the mixin writes a text encoder's)."""
        super().save_pretrained(folder)
        path = Path(folder) / "config.json"
        write_json(path, {**read_json(path), "model_type": "clip_vision_model"})


# ----------------------------------------------------------------------------- preprocessing

def gaussian_blur(x: torch.Tensor, sigma: float, dim: int) -> torch.Tensor:
    """x (B, C, H, W) blurred along H (dim=-2) or W (dim=-1), as kornia's `gaussian_blur2d` that
    diffusers copies: kernel size 4 sigma made odd (at least 3), reflected borders. The kernel is
    computed on the CPU in x's dtype, as diffusers does, so that its values are the same."""
    k = int(max(4.0 * sigma, 3))
    k += 1 - k % 2
    t = torch.arange(k, dtype=x.dtype) - k // 2
    g = torch.exp(-t.pow(2.0) / (2 * torch.tensor(sigma, dtype=x.dtype).pow(2.0)))
    shape = (1, k) if dim == -1 else (k, 1)
    g = (g / g.sum()).view(1, 1, *shape).expand(x.shape[1], 1, *shape).to(x.device)  # (C, 1, *shape)
    p = (k - 1) // 2
    x = F.pad(x, (p, p, 0, 0) if dim == -1 else (0, 0, p, p), mode="reflect")
    return F.conv2d(x, g, groups=x.shape[1])  # each channel on its own


def resize_with_antialiasing(x: torch.Tensor, size: tuple[int, int] = (224, 224)) -> torch.Tensor:
    """diffusers' `_resize_with_antialiasing` (pipeline_stable_video_diffusion.py): a Gaussian
    blur of sigma (factor - 1) / 2 per axis (skimage's rule; 0.001, no blur, when enlarging), then
    bicubic interpolation with aligned corners. x: (B, C, H, W) -> (B, C, *size)."""
    sigmas = [max((n / m - 1.0) / 2.0, 0.001) for n, m in zip(x.shape[-2:], size)]
    x = gaussian_blur(gaussian_blur(x, sigmas[1], dim=-1), sigmas[0], dim=-2)  # along W, then H
    return F.interpolate(x, size=size, mode="bicubic", align_corners=True)


def preprocess_image(image: torch.Tensor, size: int = 224, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """SVD's `_encode_image` up to the encoder: image (B, 3, H, W) in [-1, 1] (diffusers maps a PIL
    image's [0, 1] there first) -> CLIP pixel_values (B, 3, size, size). diffusers runs this in
    float32 and casts the result to the encoder's dtype."""
    if image.ndim != 4 or image.shape[1] != len(mean) or not image.is_floating_point():
        raise ValueError(f"image: expected a float tensor (B, {len(mean)}, H, W), "
                         f"got {image.dtype} {tuple(image.shape)}")
    x = (resize_with_antialiasing(image, (size, size)) + 1.0) / 2.0  # back to [0, 1]
    mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, -1, 1, 1) for v in (mean, std))
    return (x - mean) / std
