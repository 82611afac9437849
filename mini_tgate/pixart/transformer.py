"""The denoising transformer of PixArt-Alpha and PixArt-Sigma (a DiT conditioned on T5 text).

Reimplements diffusers' `PixArtTransformer2DModel` (diffusers/models/transformers/
pixart_transformer_2d.py, with `BasicTransformerBlock` in its "ada_norm_single" mode from
attention.py, `PatchEmbed` and the 2-D sin/cos position embedding from embeddings.py,
`AdaLayerNormSingle` from normalization.py). Module names equal the checkpoint's keys, so a
diffusers `transformer/diffusion_pytorch_model.safetensors` loads with a strict `load_state_dict`.

    latent (B, 4, H, W) ─ 2x2 patches ─ Linear ─ + 2-D sin/cos position ─> tokens (B, H/2 * W/2, D)
    timestep (+ resolution, aspect ratio) ─ embedding t (B, D) ─ Linear(SiLU(t)) ─> 6 modulations (B, 6, D)
    T5 text (B, L, 4096) ─ caption projection ─> (B, L, D)
    28 blocks:  x += gate_msa * SelfAttn(LayerNorm(x) * (1 + scale_msa) + shift_msa)
                x += CrossAttn(x, text, mask)                       (no norm, no gate)
                x += gate_mlp * MLP(LayerNorm(x) * (1 + scale_mlp) + shift_mlp)
    final: LayerNorm(x) * (1 + scale) + shift (from t itself, before SiLU), Linear, un-patch
        ─> (B, 8, H, W): the noise (first 4 channels) and the variance (learned sigma, last 4)

Every `attn1` (self) and `attn2` (cross) is the project's `Attention`, so TGATE's gate acts on
them exactly as on the UNet's: the cache is the attention output before the block's `gate_msa`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.attention import Attention, attention_modules, clear_gate, set_gate
from ..core.unet import FeedForward, TimestepEmbedding, timestep_embedding
from ..core.weights import PretrainedMixin
from .config import PixArtTransformerConfig


def sincos_2d(dim: int, h: int, w: int, base_size: int, interpolation_scale: float,
              device=None) -> torch.Tensor:
    """The 2-D sin/cos position embedding (h * w, dim) of a grid of h x w patches, as diffusers'
    `get_2d_sincos_pos_embed`: positions are scaled so that the training grid (base_size patches
    a side) spans [0, base_size / interpolation_scale) whatever the grid's size; the first half of
    the channels encodes the column, the second half the row, each as [sin, cos] of
    pos / 10000^(2i / (dim/2)). Positions are float32, the angles float64, the result float32."""
    rows = torch.arange(h, dtype=torch.float32, device=device) / (h / base_size) / interpolation_scale
    cols = torch.arange(w, dtype=torch.float32, device=device) / (w / base_size) / interpolation_scale
    half = dim // 2
    omega = torch.arange(half // 2, dtype=torch.float64, device=device) / (half / 2.0)
    omega = 1.0 / 10000**omega                                          # (dim/4,)

    def embed(pos):  # (h * w,) -> (h * w, dim/2): [sin, cos]
        angles = torch.outer(pos.double(), omega)
        return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)

    col = cols[None, :].expand(h, w).reshape(-1)  # token i = row * w + column, as the patches flatten
    row = rows[:, None].expand(h, w).reshape(-1)
    return torch.cat([embed(col), embed(row)], dim=1).float()


class PatchEmbed(nn.Module):
    """p x p patches of the latent, each projected to D channels (a stride-p convolution)."""

    def __init__(self, cfg: PixArtTransformerConfig):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(cfg.in_channels, cfg.inner_dim, kernel_size=p, stride=p)
        self.base_size = cfg.sample_size // p  # patches a side at the training resolution
        self.interpolation_scale = cfg.pos_interpolation

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        x = self.proj(latent)                   # (B, D, h, w)
        B, D, h, w = x.shape
        # (B, h * w, D), made contiguous: as a transposed view, every residual add would keep its
        # layout, and each Linear reading the residual stream would copy it and add its bias
        # apart from the matmul (slower, and rounded differently from diffusers in half precision)
        x = x.flatten(2).transpose(1, 2).contiguous()
        pos = sincos_2d(D, h, w, self.base_size, self.interpolation_scale, latent.device)
        return (x + pos).to(x.dtype)            # added in float32 even when x is half


class TimestepSizeEmbedding(nn.Module):
    """The timestep's embedding (B, D), plus, with micro-conditions, those of the image resolution
    (height, width: D/3 each) and aspect ratio (D/3), concatenated: diffusers'
    `PixArtAlphaCombinedTimestepSizeEmbeddings`. All use 256-channel sinusoids."""

    def __init__(self, dim: int, micro_conditions: bool):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(256, dim)
        self.micro_conditions = micro_conditions
        if micro_conditions:
            self.resolution_embedder = TimestepEmbedding(256, dim // 3)
            self.aspect_ratio_embedder = TimestepEmbedding(256, dim // 3)

    def forward(self, t: torch.Tensor, resolution, aspect_ratio, dtype: torch.dtype) -> torch.Tensor:
        emb = self.timestep_embedder(timestep_embedding(t, 256, True, 0).to(dtype))
        if not self.micro_conditions:
            return emb
        B = t.shape[0]
        res = self.resolution_embedder(timestep_embedding(resolution.flatten(), 256, True, 0).to(dtype))
        ratio = self.aspect_ratio_embedder(timestep_embedding(aspect_ratio.flatten(), 256, True, 0).to(dtype))
        return emb + torch.cat([res.reshape(B, -1), ratio.reshape(B, -1)], dim=1)


class AdaLayerNormSingle(nn.Module):
    """adaLN-single (PixArt-Alpha paper, section 2.3): one Linear maps the conditioning to the
    six shift/scale/gate vectors every block adds to its own `scale_shift_table`."""

    def __init__(self, dim: int, micro_conditions: bool):
        super().__init__()
        self.emb = TimestepSizeEmbedding(dim, micro_conditions)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, t, resolution, aspect_ratio, dtype):
        embedded = self.emb(t, resolution, aspect_ratio, dtype)   # (B, D)
        return self.linear(F.silu(embedded)), embedded          # (B, 6D), (B, D)


class GELUProjection(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner)

    def forward(self, x):
        return F.gelu(self.proj(x), approximate="tanh")


class CaptionProjection(nn.Module):
    """Text embeddings to the transformer's width: Linear, GELU (tanh), Linear."""

    def __init__(self, in_dim: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.linear_2(F.gelu(self.linear_1(x), approximate="tanh"))


class PixArtBlock(nn.Module):
    """diffusers' BasicTransformerBlock with norm_type "ada_norm_single" (keys norm1, attn1, norm2,
    attn2, ff, scale_shift_table). Note `norm2` is the MLP's norm: cross-attention has none."""

    def __init__(self, cfg: PixArtTransformerConfig):
        super().__init__()
        dim, heads, head_dim = cfg.inner_dim, cfg.num_attention_heads, cfg.attention_head_dim
        affine, eps = cfg.norm_elementwise_affine, cfg.norm_eps
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)
        self.attn1 = Attention(dim, heads, head_dim, upcast=cfg.upcast_attention, bias=cfg.attention_bias)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=affine)
        self.attn2 = Attention(dim, heads, head_dim, cfg.cross_attention_dim, upcast=cfg.upcast_attention,
                               bias=cfg.attention_bias)
        self.ff = FeedForward(dim, projection=GELUProjection)
        self.scale_shift_table = nn.Parameter(torch.zeros(6, dim))  # learned, added to the timestep's

    def forward(self, x, text, text_bias, t6):
        # t6: (B, 6 * D) from adaln_single; each of the six: (B, 1, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + t6.reshape(x.shape[0], 6, -1)).chunk(6, dim=1)
        x = x + gate_msa * self.attn1(self.norm1(x) * (1 + scale_msa) + shift_msa)
        x = x + self.attn2(x, text, mask=text_bias)
        return x + gate_mlp * self.ff(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class PixArtTransformer2DModel(PretrainedMixin, nn.Module):
    config_class = PixArtTransformerConfig
    repeated_blocks = (PixArtBlock,)  # what compile(regional=True) compiles

    def __init__(self, config: PixArtTransformerConfig):
        super().__init__()
        self.config = cfg = config
        dim = cfg.inner_dim
        self.out_channels = cfg.out_channels or cfg.in_channels
        self.pos_embed = PatchEmbed(cfg)
        self.transformer_blocks = nn.ModuleList([PixArtBlock(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.scale_shift_table = nn.Parameter(torch.zeros(2, dim))
        self.proj_out = nn.Linear(dim, cfg.patch_size ** 2 * self.out_channels)
        self.adaln_single = AdaLayerNormSingle(dim, cfg.additional_conditions)
        self.caption_projection = CaptionProjection(cfg.caption_channels, dim) if cfg.caption_channels else None
        self.attention_layers = attention_modules(self)  # what set_gate sets, found once

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor, timestep,
                added_cond_kwargs: dict | None = None,
                encoder_attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_states (B, in_channels, H, W) latents; encoder_hidden_states (B, L, caption_channels)
        text; timestep a number or (B,); added_cond_kwargs {"resolution": (B, 2) height, width in
        pixels, "aspect_ratio": (B, 1)} when the model has micro-conditions; encoder_attention_mask
        (B, L) 1 for tokens, 0 for padding. Returns (B, out_channels, H, W), diffusers' `.sample`."""
        cfg = self.config
        p = cfg.patch_size
        B, _, H, W = hidden_states.shape
        if H % p or W % p:
            raise ValueError(f"latent height and width must be multiples of patch_size={p}, got {H}x{W}")
        resolution = aspect_ratio = None
        if cfg.additional_conditions:
            cond = added_cond_kwargs or {}
            resolution, aspect_ratio = cond.get("resolution"), cond.get("aspect_ratio")
            if (resolution is None or aspect_ratio is None or tuple(resolution.shape) != (B, 2)
                    or tuple(aspect_ratio.shape) != (B, 1)):
                raise ValueError(f"this transformer uses micro-conditions: added_cond_kwargs must hold "
                                 f"'resolution' ({B}, 2) and 'aspect_ratio' ({B}, 1) tensors for a batch of {B}")
        text_bias = None
        if encoder_attention_mask is not None:
            L = encoder_hidden_states.shape[1]
            if encoder_attention_mask.shape != (B, L):
                raise ValueError(f"encoder_attention_mask must have shape (batch, text length) = ({B}, {L}), "
                                 f"got {tuple(encoder_attention_mask.shape)}")
            # 1 keeps a token, 0 hides it: a bias of 0 or -10000 on the scores, (B, 1, 1, L) to
            # broadcast over heads and queries
            text_bias = ((1 - encoder_attention_mask.to(hidden_states.dtype)) * -10000.0)[:, None, None, :]
        # A tensor timestep, as in the UNet, so that a compiled model does not bake it in.
        t = torch.as_tensor(timestep, device=hidden_states.device)
        t = t.reshape(-1).expand(B) if t.numel() == 1 else t.reshape(B)

        x = self.pos_embed(hidden_states)                                  # (B, h * w, D)
        t6, t_emb = self.adaln_single(t, resolution, aspect_ratio, x.dtype)  # (B, 6D), (B, D)
        text = encoder_hidden_states
        if self.caption_projection is not None:
            text = self.caption_projection(text)                           # (B, L, D)
        for block in self.transformer_blocks:
            x = block(x, text, text_bias, t6)

        # final layer: modulated by the timestep embedding itself (no SiLU, unlike the blocks)
        shift, scale = (self.scale_shift_table[None] + t_emb[:, None]).chunk(2, dim=1)
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)          # (B, h * w, p * p * C)
        h, w, C = H // p, W // p, self.out_channels
        x = x.reshape(B, h, w, p, p, C).permute(0, 5, 1, 3, 2, 4)          # (B, C, h, p, w, p)
        return x.reshape(B, C, H, W)

    # ----------------------------------------------------------------------------- TGATE

    # the denoising loop hands each step's plan to every attention layer (attention.py)
    set_gate = set_gate
    clear_gate = clear_gate
