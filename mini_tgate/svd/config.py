"""Configurations of the Stable Video Diffusion models, read from their config.json (one section each)."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.bounds import MAX_BLOCKS, MAX_INT, MAX_LAYERS
from ..core.config import ConfigError, Size, _FromDict, check_scaling_factor, unet_size, vae_size

GROUPS = 32  # every group norm of SVD's UNet and VAE has 32 groups (fixed in diffusers' classes)

# ----------------------------------------------------------------------------- the temporal VAE


@dataclass
class TemporalVAEConfig(_FromDict):
    """diffusers' AutoencoderKLTemporalDecoder (vae/config.json of SVD); the defaults are SVD's.

    Its group norms have 32 groups and the encoder's mid block has attention, fixed in the class
    rather than in the config; the decoder mirrors the encoder's levels, with temporal layers."""

    component = "vae"

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    latent_channels: int = 4
    sample_size: int = 768  # unused by the model: the size it was trained at
    scaling_factor: float = 0.18215  # the pipeline decodes latents * (1 / scaling_factor)
    force_upcast: bool = True  # run in float32 even when the pipeline runs in float16

    def check(self):
        if any(t != "DownEncoderBlock2D" for t in self.down_block_types):
            raise ConfigError(f"vae down_block_types={list(self.down_block_types)}: "
                              "only DownEncoderBlock2D is supported")
        self.require("block_out_channels", each=True)
        if not len(self.block_out_channels) == len(self.down_block_types) <= MAX_BLOCKS:
            raise ConfigError(f"vae block_out_channels and down_block_types: expected as many levels, "
                              f"at most {MAX_BLOCKS}")
        for name in ("in_channels", "out_channels", "latent_channels", "sample_size"):
            self.require(name)
        self.require("layers_per_block", high=MAX_LAYERS)
        for channels in self.block_out_channels:
            if channels % GROUPS:
                raise ConfigError(f"vae block_out_channels {channels} is not divisible by the 32 norm groups")
        check_scaling_factor(self.scaling_factor)
        self.check_size(vae_size(self, video=True))


# ----------------------------------------------------------------------------- the spatio-temporal UNet

SVD_DOWN_BLOCKS = ("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal")
SVD_UP_BLOCKS = ("CrossAttnUpBlockSpatioTemporal", "UpBlockSpatioTemporal")


@dataclass
class UNetSpatioTemporalConfig(_FromDict):
    """diffusers' UNetSpatioTemporalConditionModel (unet/config.json of SVD); the defaults are
    SVD-XT's. Group norms (32 groups), norm epsilons, the mid block and the Linear projections
    are fixed in diffusers' classes, not in the config; the per-block settings are an int for
    every block or a list of one per block."""

    component = "unet"

    sample_size: int | list | None = 96  # unused by the model: the latent size it was trained at
    in_channels: int = 8  # the noisy latents and the conditioning image's latents, concatenated
    out_channels: int = 4
    down_block_types: tuple = ("CrossAttnDownBlockSpatioTemporal",) * 3 + ("DownBlockSpatioTemporal",)
    up_block_types: tuple = ("UpBlockSpatioTemporal",) + ("CrossAttnUpBlockSpatioTemporal",) * 3
    block_out_channels: tuple = (320, 640, 1280, 1280)
    addition_time_embed_dim: int = 256  # sinusoidal width of each added time id (fps, motion bucket, noise aug)
    projection_class_embeddings_input_dim: int = 768  # added time ids x addition_time_embed_dim
    layers_per_block: int | list = 2
    cross_attention_dim: int | list = 1024  # width of the CLIP image embedding
    transformer_layers_per_block: int | list = 1
    num_attention_heads: int | list = (5, 10, 20, 20)
    num_frames: int = 25  # unused by the model: the frames it was trained on (the pipeline's default)

    def per_block(self, value) -> list:
        """An int-or-list setting as one value per down block."""
        return list(value) if isinstance(value, (list, tuple)) else [value] * len(self.down_block_types)

    def check(self):
        for kinds, known in ((self.down_block_types, SVD_DOWN_BLOCKS), (self.up_block_types, SVD_UP_BLOCKS)):
            for t in kinds:
                if t not in known:
                    raise ConfigError(f"unet block type {t!r} is not supported (expected one of {', '.join(known)})")
        self.require("block_out_channels", each=True)
        n = len(self.block_out_channels)
        if not 1 <= n <= MAX_BLOCKS or n != len(self.down_block_types) or n != len(self.up_block_types):
            raise ConfigError(f"unet block_out_channels, down_block_types and up_block_types must list as many "
                              f"blocks, 1 to {MAX_BLOCKS}")
        for name in ("in_channels", "out_channels", "addition_time_embed_dim",
                     "projection_class_embeddings_input_dim", "num_frames"):
            self.require(name)
        if self.sample_size is not None:
            self.require("sample_size", each=True)
        for name, high in (("layers_per_block", MAX_LAYERS), ("transformer_layers_per_block", MAX_LAYERS),
                           ("cross_attention_dim", MAX_INT), ("num_attention_heads", MAX_INT)):
            self.require(name, high=high, each=True)
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and len(value) != n:
                raise ConfigError(f"unet {name} lists {len(value)} values for {n} blocks")
        if self.projection_class_embeddings_input_dim % self.addition_time_embed_dim:
            raise ConfigError(f"unet projection_class_embeddings_input_dim={self.projection_class_embeddings_input_dim}"
                              f" is not a whole number of added time ids of {self.addition_time_embed_dim}")
        # levels with attention: cross-attention down blocks, their up blocks, the mid block (the last level)
        attention = {i for i, t in enumerate(self.down_block_types) if t.startswith("CrossAttn")}
        attention |= {n - 1 - i for i, t in enumerate(self.up_block_types) if t.startswith("CrossAttn")} | {n - 1}
        for i, (channels, heads) in enumerate(zip(self.block_out_channels, self.per_block(self.num_attention_heads))):
            if channels % GROUPS:
                raise ConfigError(f"unet block_out_channels {channels} is not divisible by the 32 norm groups")
            if i in attention and channels % heads:
                raise ConfigError(f"unet block {i}: {channels} channels do not split into {heads} attention heads")
        self.check_size(unet_size(self, video=True))


# ----------------------------------------------------------------------------- CLIP vision


@dataclass
class CLIPVisionConfig(_FromDict):
    """transformers' CLIPVisionConfig (image_encoder/config.json of SVD, OpenCLIP's ViT-H/14:
    image_size 224, patch_size 14, hidden_size 1280, 32 layers of 16 heads, projection_dim 1024,
    gelu); the defaults are transformers' (OpenAI's ViT-B/32)."""

    component = "image encoder"

    image_size: int = 224  # the one input side (position embeddings: (image_size // patch_size)^2 + 1)
    patch_size: int = 32  # a patch of patch_size^2 pixels is one token
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    projection_dim: int = 512  # width of image_embeds (visual_projection)
    hidden_act: str = "quick_gelu"  # OpenAI's CLIP: quick_gelu; OpenCLIP (SVD): gelu
    layer_norm_eps: float = 1e-5
    num_channels: int = 3

    def check(self):
        for name in ("image_size", "hidden_size", "intermediate_size", "num_attention_heads", "projection_dim",
                     "num_channels"):
            self.require(name)
        self.require("patch_size", high=self.image_size)
        self.require("num_hidden_layers", high=MAX_LAYERS)
        if self.layer_norm_eps < 0:
            raise ConfigError(f"image encoder layer_norm_eps={self.layer_norm_eps} must not be negative")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"image encoder hidden_act={self.hidden_act!r} is not supported")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"image encoder hidden_size={self.hidden_size} must be divisible by "
                              f"num_attention_heads={self.num_attention_heads}")
        h, patches = self.hidden_size, (self.image_size // self.patch_size) ** 2
        self.check_size(Size((self.num_channels * self.patch_size ** 2 + patches + 1 + self.projection_dim) * h
                             + self.num_hidden_layers * (4 * h * h + 2 * h * self.intermediate_size),
                             layers=self.num_hidden_layers))
