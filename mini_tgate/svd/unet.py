"""The spatio-temporal denoising UNet of Stable Video Diffusion (SVD, SVD-XT).

Reimplements diffusers' `UNetSpatioTemporalConditionModel` (diffusers/models/unets/
unet_spatio_temporal_condition.py and unet_3d_blocks.py's *SpatioTemporal blocks; resnet.py's
SpatioTemporalResBlock, TemporalResnetBlock, AlphaBlender; transformers/transformer_temporal.py's
TransformerSpatioTemporalModel; attention.py's TemporalBasicTransformerBlock). Module names equal
the checkpoint's keys, so a diffusers `unet/` folder loads with the strict loader.

It is SD's UNet (core/unet.py, whose pieces it reuses) run on the B*F frames of B videos as a
batch of images, with a temporal twin after every spatial layer that mixes along the frames:

    sample (B, F, 8, h, w) ─ as (B*F, 8, h, w) ─ conv_in ─ down ─ mid ─ up ─ conv_out ─> (B, F, 4, h, w)
    every resnet:       ResnetBlock2D on each frame, then a resnet whose convolutions span 3 neighbouring
                        frames (Conv3d, kernel (3, 1, 1)); out = a * spatial + (1 - a) * temporal, a learned
    every transformer:  per layer, SD's BasicTransformerBlock on each frame's h*w tokens, then a temporal block
                        on each pixel's F tokens (a frame-position embedding added first), blended the same way
    the conditioning:   one CLIP image embedding per video (B, 1, 1024) for every cross-attention; the timestep
                        and 3 added time ids (fps, motion bucket, noise augmentation) embedded as SDXL's sizes

TGATE gates every attention (spatial and temporal, self and cross: 64 in SVD-XT) through the core
Attention; a temporal self-attention (across frames) counts as self-attention, as in tgate's TgateSVDLoader.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attention import attention_modules, clear_gate, set_gate
from ..core.tgate import StepPlan
from ..core.unet import (BasicTransformerBlock, Downsample2D, FeedForward, ResnetBlock2D, TimestepEmbedding,
                         Upsample2D, timestep_embedding)
from ..core.weights import PretrainedMixin
from .config import GROUPS, UNetSpatioTemporalConfig



def to_video(x: torch.Tensor, frames: int) -> torch.Tensor:
    """(B*F, C, H, W) -> (B, C, F, H, W): the frames become Conv3d's depth axis."""
    return x.reshape(-1, frames, *x.shape[1:]).permute(0, 2, 1, 3, 4)


def to_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B*F, C, H, W)."""
    return x.permute(0, 2, 1, 3, 4).flatten(0, 1)


class AlphaBlender(nn.Module):
    """a * spatial + (1 - a) * temporal, a = sigmoid(mix_factor): diffusers' AlphaBlender with its
    "learned_with_images" strategy, as the UNet runs it (no frame is a still image: a is learned)."""

    def __init__(self):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.tensor([0.5]))

    def forward(self, spatial: torch.Tensor, temporal: torch.Tensor) -> torch.Tensor:
        a = torch.sigmoid(self.mix_factor).to(spatial.dtype)
        return a * spatial + (1.0 - a) * temporal


class TemporalResnetBlock(nn.Module):
    """ResnetBlock2D along the frames: each pixel sees itself in the frames before and after
    (zero-padded at a video's ends); same width in and out."""

    def __init__(self, ch: int, temb_dim: int, eps: float):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, ch, eps=eps)  # over (C/32, F, H, W): whole videos
        self.conv1 = nn.Conv3d(ch, ch, (3, 1, 1), padding=(1, 0, 0))
        self.time_emb_proj = nn.Linear(temb_dim, ch)
        self.norm2 = nn.GroupNorm(GROUPS, ch, eps=eps)
        self.conv2 = nn.Conv3d(ch, ch, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:  # x (B, C, F, H, W), temb (B, F, D)
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb)).permute(0, 2, 1)[..., None, None]  # (B, C, F, 1, 1)
        return x + self.conv2(F.silu(self.norm2(h)))


class SpatioTemporalResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, eps: float):
        super().__init__()
        self.spatial_res_block = ResnetBlock2D(in_ch, out_ch, temb_dim, GROUPS, eps)
        self.temporal_res_block = TemporalResnetBlock(out_ch, temb_dim, eps)
        self.time_mixer = AlphaBlender()

    def forward(self, x: torch.Tensor, temb: torch.Tensor, frames: int) -> torch.Tensor:
        x = to_video(self.spatial_res_block(x, temb), frames)        # (B, C, F, H, W)
        t = self.temporal_res_block(x, temb.reshape(-1, frames, temb.shape[-1]))
        return to_frames(self.time_mixer(x, t))                       # (B*F, C, H, W)


class TemporalBasicTransformerBlock(BasicTransformerBlock):
    """SD's transformer block over each pixel's F frames (self-attention across frames, cross-
    attention to the image embedding), after an extra residual MLP `ff_in`."""

    def __init__(self, dim: int, heads: int, context_dim: int):
        super().__init__(dim, heads, dim // heads, context_dim, upcast=False)
        self.norm_in = nn.LayerNorm(dim)
        self.ff_in = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, frames: int) -> torch.Tensor:
        BF, T, C = x.shape  # context: (B*T, S, D), one copy per pixel
        x = x.reshape(-1, frames, T, C).transpose(1, 2).reshape(-1, frames, C)  # (B*T, F, C)
        x = x + self.ff_in(self.norm_in(x))
        x = super().forward(x, context)
        return x.reshape(-1, T, frames, C).transpose(1, 2).reshape(BF, T, C)    # (B*F, T, C)


class FramePositionEmbedding(TimestepEmbedding):
    """The core's timestep MLP with a narrower output: C -> 4C -> C (diffusers' `out_dim`)."""

    def __init__(self, ch: int):
        super().__init__(ch, 4 * ch)
        self.linear_2 = nn.Linear(4 * ch, ch)


class TransformerSpatioTemporalModel(nn.Module):
    """GroupNorm, Linear in, (spatial block, temporal block, blend) per layer, Linear out, residual."""

    def __init__(self, ch: int, heads: int, layers: int, context_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(GROUPS, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(ch, heads, ch // heads, context_dim, upcast=False) for _ in range(layers)])
        self.temporal_transformer_blocks = nn.ModuleList(
            [TemporalBasicTransformerBlock(ch, heads, context_dim) for _ in range(layers)])
        self.time_pos_embed = FramePositionEmbedding(ch)
        self.time_mixer = AlphaBlender()
        self.proj_out = nn.Linear(ch, ch)

    def forward(self, x: torch.Tensor, context: torch.Tensor, frames: int) -> torch.Tensor:
        BF, C, H, W = x.shape  # context: (B*F, S, D)
        B = BF // frames
        # the temporal blocks attend to each video's first-frame context, one copy per pixel
        first = context.reshape(B, frames, *context.shape[1:])[:, 0]                # (B, S, D)
        time_context = first[:, None].expand(B, H * W, *first.shape[1:]).reshape(B * H * W, *first.shape[1:])
        h = self.proj_in(self.norm(x).permute(0, 2, 3, 1).reshape(BF, H * W, C))    # (B*F, H*W, C)
        frame_ids = torch.arange(frames, device=x.device).repeat(B)                  # (B*F,): 0..F-1 per video
        pos = self.time_pos_embed(timestep_embedding(frame_ids, C, True, 0).to(h.dtype))[:, None]  # (B*F, 1, C)
        for spatial, temporal in zip(self.transformer_blocks, self.temporal_transformer_blocks):
            h = spatial(h, context)
            h = self.time_mixer(h, temporal(h + pos, time_context, frames))
        h = self.proj_out(h).reshape(BF, H, W, C).permute(0, 3, 1, 2)               # (B*F, C, H, W)
        return h.contiguous() + x  # contiguous, as diffusers': a channels-last sum would take other conv kernels


class Block(nn.Module):
    """A down or up block: SpatioTemporalResBlocks, each followed by a transformer in the
    CrossAttn* variants (`attn`: its settings, or None), then a resampler."""

    def __init__(self, in_chs: list[int], out_ch: int, temb_dim: int, eps: float, attn: dict | None):
        super().__init__()
        self.resnets = nn.ModuleList([SpatioTemporalResBlock(c, out_ch, temb_dim, eps) for c in in_chs])
        self.attentions = (nn.ModuleList([TransformerSpatioTemporalModel(out_ch, **attn) for _ in in_chs])
                           if attn is not None else None)

    def layer(self, i: int, h, temb, context, frames):
        h = self.resnets[i](h, temb, frames)
        return self.attentions[i](h, context, frames) if self.attentions is not None else h


class DownBlock(Block):
    def __init__(self, in_ch, out_ch, temb_dim, layers, attn, downsample):
        # diffusers fixes the epsilon per class: 1e-6 with cross-attention, 1e-5 without
        super().__init__([in_ch] + [out_ch] * (layers - 1), out_ch, temb_dim, 1e-6 if attn else 1e-5, attn)
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, padding=1)]) if downsample else None

    def forward(self, h, temb, context, frames):
        skips = []
        for i in range(len(self.resnets)):
            h = self.layer(i, h, temb, context, frames)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class UpBlock(Block):
    def __init__(self, prev_ch, out_ch, skip_chs, temb_dim, attn, upsample):
        in_chs = [(prev_ch if i == 0 else out_ch) + s for i, s in enumerate(skip_chs)]
        super().__init__(in_chs, out_ch, temb_dim, 1e-6, attn)  # 1e-6 in both up classes
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, h, skips, temb, context, frames, upsample_size):
        for i in range(len(self.resnets)):
            h = self.layer(i, torch.cat([h, skips.pop()], dim=1), temb, context, frames)
        return self.upsamplers[0](h, upsample_size) if self.upsamplers is not None else h


class MidBlock(nn.Module):
    """resnet, transformer, resnet: diffusers' UNetMidBlockSpatioTemporal."""

    def __init__(self, ch, temb_dim, attn):
        super().__init__()
        self.attentions = nn.ModuleList([TransformerSpatioTemporalModel(ch, **attn)])
        self.resnets = nn.ModuleList([SpatioTemporalResBlock(ch, ch, temb_dim, 1e-5) for _ in range(2)])

    def forward(self, h, temb, context, frames):
        h = self.resnets[0](h, temb, frames)
        return self.resnets[1](self.attentions[0](h, context, frames), temb, frames)


class UNetSpatioTemporalConditionModel(PretrainedMixin, nn.Module):
    config_class = UNetSpatioTemporalConfig
    # what compile(regional=True) compiles: spatial and temporal transformer blocks (a subclass), both resnets
    repeated_blocks = (BasicTransformerBlock, ResnetBlock2D, TemporalResnetBlock)

    def __init__(self, config: UNetSpatioTemporalConfig):
        super().__init__()
        self.config = cfg = config
        ch, n = list(cfg.block_out_channels), len(cfg.block_out_channels)
        heads, context_dims = cfg.per_block(cfg.num_attention_heads), cfg.per_block(cfg.cross_attention_dim)
        layers, tlayers = cfg.per_block(cfg.layers_per_block), cfg.per_block(cfg.transformer_layers_per_block)

        def attn(i, kind="CrossAttn"):  # the transformers' settings at level i; None for a block without
            with_attention = kind.startswith("CrossAttn")
            return dict(heads=heads[i], layers=tlayers[i], context_dim=context_dims[i]) if with_attention else None

        temb_dim = ch[0] * 4
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim)
        self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_dim)
        self.down_blocks = nn.ModuleList(
            [DownBlock(ch[max(i - 1, 0)], ch[i], temb_dim, layers[i], attn(i, kind), downsample=i < n - 1)
             for i, kind in enumerate(cfg.down_block_types)])
        self.mid_block = MidBlock(ch[-1], temb_dim, attn(n - 1))
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.up_block_types):
            j = n - 1 - i  # the matching down block; its last resnet takes the skip of the level above
            skip_chs = [ch[j]] * layers[j] + [ch[max(j - 1, 0)]]
            self.up_blocks.append(UpBlock(ch[min(j + 1, n - 1)], ch[j], skip_chs, temb_dim, attn(j, kind),
                                          upsample=i < n - 1))
        self.conv_norm_out = nn.GroupNorm(GROUPS, ch[0], eps=1e-5)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)
        self.attention_layers = attention_modules(self)  # what set_gate sets, found once

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                added_time_ids: torch.Tensor) -> torch.Tensor:
        """sample (B, F, C, h, w), timestep a number or (B,), encoder_hidden_states (B, S, D) (SVD:
        S = 1, the CLIP image embedding), added_time_ids (B, 3) -> (B, F, out_channels, h, w)."""
        cfg = self.config
        B, frames = sample.shape[:2]
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t.reshape(B)

        # one embedding per video: timestep + the added time ids, as SDXL embeds its sizes
        emb = self.time_embedding(timestep_embedding(t, cfg.block_out_channels[0], True, 0).to(sample.dtype))
        time_embeds = timestep_embedding(added_time_ids.flatten(), cfg.addition_time_embed_dim, True, 0)
        emb = emb + self.add_embedding(time_embeds.reshape(B, -1).to(emb.dtype))        # (B, temb_dim)
        # from here on every frame is an image of the batch, each with its video's conditioning
        emb = emb.repeat_interleave(frames, dim=0)                                       # (B*F, temb_dim)
        context = encoder_hidden_states.repeat_interleave(frames, dim=0)                 # (B*F, S, D)

        h = self.conv_in(sample.flatten(0, 1))                                           # (B*F, C0, h, w)
        skips = [h]
        for down in self.down_blocks:
            h, s = down(h, emb, context, frames)
            skips += s
        h = self.mid_block(h, emb, context, frames)
        for up in self.up_blocks:
            n = len(up.resnets)
            block_skips, skips = skips[-n:], skips[:-n]
            size = skips[-1].shape[2:] if skips else None  # upsample to the next skip's size (odd sizes)
            h = up(h, block_skips, emb, context, frames, size)
        out = self.conv_out(F.silu(self.conv_norm_out(h)))                               # (B*F, out, h, w)
        return out.reshape(B, frames, *out.shape[1:])

    # ----------------------------------------------------------------------------- TGATE

    def set_gate(self, step: StepPlan) -> None:
        """Tell every attention layer what to do at this step (tgate.plan gives the steps)."""
        if step.branch is not None:
            raise ValueError("DeepCache is not implemented for the spatio-temporal UNet")
        set_gate(self, step)  # attention.set_gate: cross- and self-attention layers as the plan says

    def clear_gate(self) -> None:
        """Back to plain computation, caches freed: called when a generation ends."""
        clear_gate(self)
