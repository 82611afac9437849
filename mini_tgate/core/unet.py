"""The denoising UNet of Stable Diffusion 1.x / 2.x / SDXL / LCM.

Reimplements diffusers' `UNet2DConditionModel` (diffusers/models/unets/unet_2d_condition.py,
unet_2d_blocks.py, resnet.py, transformers/transformer_2d.py, attention.py) for the block
types these models use. Module names equal the checkpoint's keys, so a diffusers
`unet/diffusion_pytorch_model.safetensors` loads with a strict `load_state_dict`.

    sample (B, 4, h, w) ─ conv_in ─ down blocks ─ mid block ─ up blocks ─ norm, SiLU, conv_out ─> (B, 4, h, w)
                                         └──── skip connections ────┘
    every ResnetBlock2D adds the embedding of (timestep [+ LCM guidance] [+ SDXL pooled text, sizes])
    every Transformer2DModel runs self-attention, cross-attention to the text, and a GEGLU MLP

With DeepCache (tgate.DeepCache, set per step by set_gate) a step may run only the shallow branch:
conv_in, the outermost layers of the down and up paths, conv_out, on the deep feature that the
last full step kept (see forward).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention, attention_modules, clear_gate, keep, rows, set_gate
from .bounds import int_in
from .config import UNetConfig
from .tgate import CACHE, COMPUTE, REUSE, StepPlan
from .weights import PretrainedMixin


def timestep_embedding(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), as diffusers' `get_timestep_embedding`."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t[:, None].float() * freqs[None]                   # (B, half)
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """Linear, SiLU, Linear; LCM adds a projection of its guidance-scale embedding first."""

    def __init__(self, in_dim: int, dim: int, cond_dim: int | None = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False) if cond_dim else None

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        if cond is not None:
            x = x + self.cond_proj(cond)
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, groups: int, eps: float,
                 output_scale_factor: float = 1.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer blocks' MLP: a projection with its activation (`GEGLU` in the UNet, PixArt
    passes its GELU-tanh one), then Linear back to `dim`."""

    def __init__(self, dim: int, mult: int = 4, projection=GEGLU):
        super().__init__()
        # keys net.0.proj and net.2 (net.1 is a dropout in diffusers, no weights)
        self.net = nn.ModuleList([projection(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, dim_head, upcast=upcast)  # self-attention
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, dim_head, context_dim, upcast=upcast)  # cross-attention
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """GroupNorm, project in, transformer blocks over the h*w tokens, project out, residual.

    SD-1 projects with 1x1 convolutions, SD-2 and SDXL with Linear layers (`use_linear_projection`);
    the two differ in whether the projection happens before or after flattening to tokens.
    """

    def __init__(self, channels: int, heads: int, layers: int, context_dim: int, groups: int,
                 linear: bool, upcast: bool):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(channels, heads, channels // heads, context_dim, upcast) for _ in range(layers)])
        self.proj_out = nn.Linear(channels, channels) if linear else nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, tokens, C)
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = block(h, context)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W), as diffusers lays it out
        if not self.linear:
            h = self.proj_out(h)
        return h + x


class Downsample2D(nn.Module):
    def __init__(self, ch: int, padding: int):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)) if self.padding == 0 else x)


class Upsample2D(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNetBlock(nn.Module):
    """A down or up block of resnets, each followed by a Transformer2DModel in the CrossAttn*
    variants, then a resampler; `skip_channels` (up blocks) lists the skip concatenated to each
    resnet's input."""

    def __init__(self, in_chs: list[int], out_ch: int, temb_dim: int, cfg: UNetConfig, attn: dict | None,
                 transformer_layers: list[int]):
        super().__init__()
        g, eps = cfg.norm_num_groups, cfg.norm_eps
        self.resnets = nn.ModuleList([ResnetBlock2D(c, out_ch, temb_dim, g, eps) for c in in_chs])
        if attn is not None:
            self.attentions = nn.ModuleList([Transformer2DModel(out_ch, layers=n, **attn) for n in transformer_layers])
        else:
            self.attentions = None


class DownBlock(UNetBlock):
    def __init__(self, in_ch, out_ch, temb_dim, cfg, attn, transformer_layers, layers, downsample):
        super().__init__([in_ch] + [out_ch] * (layers - 1), out_ch, temb_dim, cfg, attn, transformer_layers)
        self.downsamplers = nn.ModuleList([Downsample2D(out_ch, cfg.downsample_padding)]) if downsample else None

    def forward(self, h, temb, context, stop: int | None = None):
        """stop: run only the first `stop` layers, no downsampler (a DeepCache shallow step)."""
        skips = []
        for i in range(len(self.resnets) if stop is None else stop):
            h = self.resnets[i](h, temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
            skips.append(h)
        if self.downsamplers is not None and stop is None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class UpBlock(UNetBlock):
    def __init__(self, prev_ch, out_ch, skip_chs, temb_dim, cfg, attn, transformer_layers, upsample):
        in_chs = [(prev_ch if i == 0 else out_ch) + s for i, s in enumerate(skip_chs)]
        super().__init__(in_chs, out_ch, temb_dim, cfg, attn, transformer_layers)
        self.upsamplers = nn.ModuleList([Upsample2D(out_ch)]) if upsample else None

    def forward(self, h, skips, temb, context, upsample_size, first: int = 0, stop: int | None = None):
        """Layers first..stop-1 (DeepCache splits a block in two), the upsampler after the last one."""
        stop = len(self.resnets) if stop is None else stop
        for i in range(first, stop):
            h = self.resnets[i](torch.cat([h, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                h = self.attentions[i](h, context)
        if self.upsamplers is not None and stop == len(self.resnets):
            h = self.upsamplers[0](h, upsample_size)
        return h


class MidBlock(nn.Module):
    """resnet, then (transformer, resnet) pairs: diffusers' UNetMidBlock2DCrossAttn."""

    def __init__(self, ch, temb_dim, cfg: UNetConfig, attn: dict, transformer_layers: int):
        super().__init__()
        g, eps, s = cfg.norm_num_groups, cfg.norm_eps, cfg.mid_block_scale_factor
        self.attentions = nn.ModuleList([Transformer2DModel(ch, layers=transformer_layers, **attn)])
        self.resnets = nn.ModuleList([ResnetBlock2D(ch, ch, temb_dim, g, eps, s) for _ in range(2)])

    def forward(self, h, temb, context):
        h = self.resnets[0](h, temb)
        return self.resnets[1](self.attentions[0](h, context), temb)


class UNet2DConditionModel(PretrainedMixin, nn.Module):
    config_class = UNetConfig
    repeated_blocks = (BasicTransformerBlock, ResnetBlock2D)  # what compile(regional=True) compiles

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        ch, heads = list(cfg.block_out_channels), cfg.heads()
        n = len(ch)
        context_dims = cfg.per_block(cfg.cross_attention_dim)
        layers = cfg.per_block(cfg.layers_per_block)
        tlayers = cfg.per_block(cfg.transformer_layers_per_block)

        def attn(i):  # Transformer2DModel settings of block i
            return dict(heads=heads[i], context_dim=context_dims[i], groups=cfg.norm_num_groups,
                        linear=cfg.use_linear_projection, upcast=cfg.upcast_attention)

        def per_layer(v, count):  # transformer depth per resnet: int or a list per layer
            return list(v) if isinstance(v, (list, tuple)) else [v] * count

        temb_dim = ch[0] * 4
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], cfg.conv_in_kernel, padding=cfg.conv_in_kernel // 2)
        self.time_embedding = TimestepEmbedding(ch[0], temb_dim, cfg.time_cond_proj_dim)
        if cfg.addition_embed_type == "text_time":  # SDXL: pooled text + 6 size/crop ids
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_dim)

        self.down_blocks = nn.ModuleList()
        skip_chs = [ch[0]]  # channels of every skip tensor, in the order they are produced
        for i, kind in enumerate(cfg.down_block_types):
            in_ch, final = ch[max(i - 1, 0)], i == n - 1
            a = attn(i) if kind.startswith("CrossAttn") else None
            self.down_blocks.append(DownBlock(in_ch, ch[i], temb_dim, cfg, a, per_layer(tlayers[i], layers[i]),
                                              layers[i], downsample=not final))
            skip_chs += [ch[i]] * (layers[i] + (0 if final else 1))

        self.mid_block = None
        if cfg.mid_block_type is not None:
            self.mid_block = MidBlock(ch[-1], temb_dim, cfg, attn(n - 1), tlayers[-1])

        self.up_blocks = nn.ModuleList()
        rev_tlayers = cfg.reverse_transformer_layers_per_block or tlayers[::-1]
        for i, kind in enumerate(cfg.up_block_types):
            j = n - 1 - i  # the matching down block
            count = layers[j] + 1
            skips, skip_chs = skip_chs[-count:][::-1], skip_chs[:-count]
            a = attn(j) if kind.startswith("CrossAttn") else None
            self.up_blocks.append(UpBlock(ch[min(j + 1, n - 1)], ch[j], skips, temb_dim, cfg, a,
                                          per_layer(rev_tlayers[i], count), upsample=i < n - 1))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, cfg.conv_out_kernel, padding=cfg.conv_out_kernel // 2)
        # DeepCache's state, set by set_gate (see forward); cache: the deep feature kept (static: attention.keep)
        self.deep, self.branch, self.cache, self.static = COMPUTE, None, None, False
        self.deep_layers: dict[int, list[Attention]] = {}  # per branch, the self-attention layers in the deep part
        self.attention_layers = attention_modules(self)  # what set_gate sets, found once

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor,
                added_cond_kwargs: dict | None = None, timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        cfg = self.config
        B = sample.shape[0]
        # Compiled, give the timestep as a tensor (the scheduler's): a Python number is a
        # constant baked into the graph, so every step would compile a new one.
        t = torch.as_tensor(timestep, device=sample.device)
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t.reshape(B)

        # the embedding every resnet adds: timestep (+ LCM guidance) (+ SDXL pooled text and sizes)
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(t_emb.to(sample.dtype), timestep_cond)  # (B, temb_dim)
        if cfg.addition_embed_type == "text_time":
            text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
            time_embeds = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim,
                                             cfg.flip_sin_to_cos, cfg.freq_shift).reshape(B, -1)
            emb = emb + self.add_embedding(torch.cat([text_embeds, time_embeds], dim=-1).to(emb.dtype))

        if cfg.center_input_sample:
            sample = 2 * sample - 1.0
        # DeepCache (set_gate) splits the UNet at down block `block`, layer `layer`: the deep part is
        # the down path from there on, the mid block, and the up path back to the same layer of up
        # block `block`, where the feature it hands on is taken. A shallow step (deep == REUSE)
        # skips the deep part and takes that feature as the last full step kept it (self.cache).
        block, layer = self.deep_split(self.branch) if self.branch is not None else (None, None)
        shallow = self.deep == REUSE
        h = self.conv_in(sample)
        skips = [h]
        for i, down in enumerate(self.down_blocks):
            if shallow and i == block:  # the block's first `layer` layers, whose outputs are skips
                skips += down(h, emb, encoder_hidden_states, stop=layer)[1]
                break
            h, s = down(h, emb, encoder_hidden_states)
            skips += s
        if self.mid_block is not None and not shallow:
            h = self.mid_block(h, emb, encoder_hidden_states)
        for i, up in enumerate(self.up_blocks):
            level, first = len(self.up_blocks) - 1 - i, 0  # level: the down block whose skips it takes
            if shallow and level > block:
                continue
            if level == block:
                first = len(up.resnets) - 1 - layer  # its layers before `first` are deep
                if shallow:
                    h = rows(self.cache, B)
                else:
                    h = up(h, skips, emb, encoder_hidden_states, None, stop=first)
                    if self.deep == CACHE:
                        self.cache = keep(self, h)
            n_skips = len(up.resnets) - first
            block_skips, skips = skips[-n_skips:], skips[:-n_skips]
            size = skips[-1].shape[2:] if skips else None  # upsample to the next skip's size
            h = up(h, block_skips, emb, encoder_hidden_states, size, first=first)
        return self.conv_out(F.silu(self.conv_norm_out(h)))

    # ----------------------------------------------------------------------------- TGATE, DeepCache

    def deep_split(self, branch: int) -> tuple[int, int]:
        """DeepCache's branch as (block, layer): the deep part begins at layer `layer` of down block
        `block` (0 is the outermost). A layer past the block's last (DeepCache numbers up to 3 in
        every block) splits where the last one would: DeepCache computes the same image there."""
        n = len(self.down_blocks)
        if not int_in(branch, 0, 3 * n - 1):
            raise ValueError(f"DeepCache branch must be an integer from 0 to {3 * n - 1} for this UNet "
                             f"({n} blocks, 3 branches each), got {branch!r}")
        block = branch // 3
        return block, min(branch % 3, len(self.down_blocks[block].resnets))

    def deep_self_attention(self, branch: int) -> list[Attention]:
        """The self-attention layers in the deep part for this branch: all but the shallow branch's."""
        block, layer = self.deep_split(branch)
        up = self.up_blocks[len(self.up_blocks) - 1 - block]
        shallow = [*self.down_blocks[:block], *self.up_blocks[len(self.up_blocks) - block:]]
        for blk, layers in ((self.down_blocks[block], slice(None, layer)),
                            (up, slice(len(up.resnets) - 1 - layer, None))):
            shallow += blk.attentions[layers] if blk.attentions is not None else []
        shallow_ids = {id(m) for part in shallow for m in part.modules()}
        return [m for m in self.attention_layers if id(m) not in shallow_ids and not m.is_cross]

    def set_gate(self, step: StepPlan) -> None:
        """Tell every attention layer what to do at this step (tgate.plan gives the steps), and,
        with DeepCache, whether the deep part runs (its self-attention layers follow deep_self_attn)."""
        self.deep, self.branch = step.deep, step.branch
        set_gate(self, step)  # attention.set_gate: cross- and self-attention layers as the plan says
        if step.branch is not None and step.deep_self_attn != step.self_attn:
            if step.branch not in self.deep_layers:  # found once per branch: set_gate runs every step
                self.deep_layers[step.branch] = self.deep_self_attention(step.branch)
            for m in self.deep_layers[step.branch]:
                m.gate = step.deep_self_attn

    def clear_gate(self) -> None:
        """Back to plain computation, caches freed: called when a generation ends."""
        self.deep, self.branch = COMPUTE, None
        self.cache = self.cache.zero_() if self.static else None
        clear_gate(self)  # attention.clear_gate: every attention layer computes, its cache freed
