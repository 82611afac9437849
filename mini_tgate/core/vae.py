"""The Stable Diffusion VAE: an image <-> latent autoencoder with a diagonal Gaussian posterior.

Reimplements diffusers' `AutoencoderKL` (diffusers/models/autoencoders/autoencoder_kl.py) with
its `Encoder`, `Decoder` and `DiagonalGaussianDistribution` (models/autoencoders/vae.py), the
blocks `DownEncoderBlock2D`, `UpDecoderBlock2D`, `UNetMidBlock2D` (models/unets/unet_2d_blocks.py),
`ResnetBlock2D` without a time embedding (models/resnet.py), `Downsample2D`/`Upsample2D`
(models/downsampling.py, upsampling.py) and the VAE's single-head mid-block attention
(models/attention_processor.py). Module names equal diffusers' state-dict keys, so a
checkpoint's `vae/` folder loads with a plain strict `load_state_dict`.

Shapes for SD at 512 px (block_out_channels 128, 256, 512, 512; 4 latent channels):
    image (B, 3, 512, 512) -> encoder -> (B, 8, 64, 64) = mean and log-variance of 4 channels each
    latent (B, 4, 64, 64)  -> decoder -> image (B, 3, 512, 512), roughly in [-1, 1]
Each encoder level but the last halves the resolution, so the factor is 2 ** (levels - 1) = 8.

Scaling is the pipeline's job, not `decode`'s: the diffusion model works on
    latents = (z - shift_factor) * scaling_factor          # `vae.scale_latents(z)`
and the decoder takes
    z = latents / scaling_factor + shift_factor             # `vae.unscale_latents(latents)`
with shift_factor 0 when the config has none (SD, SDXL).

float16 and `force_upcast`: the SDXL VAE overflows in float16 (activations beyond 65504 turn
into inf, then NaN through the group norms); its config says `force_upcast: true`. `decode` and
`encode` simply run in the dtype of the VAE's weights (the input is cast to it). A pipeline
running in float16 checks `vae.needs_upcast` once after loading and, when it is true, calls
`vae.float()` (or loads the VAE with dtype=torch.float32 in the first place): the VAE then
runs in float32 and returns float32 images. diffusers' SDXL pipeline does the same around each
decode (`vae.to(torch.float32)`, then back to float16); keeping the VAE in float32 costs
~160 MB more and avoids casting the weights back and forth. (diffusers' SD-1.x/2.x pipelines
ignore force_upcast and decode in float16.) bfloat16 has float32's range and never needs it.

Memory, as diffusers: `vae.enable_slicing()` encodes/decodes a batch one image at a time, and
`vae.enable_tiling()` decodes large latents in overlapping tiles of the trained size (see
`tiled`), so the activations are those of one 512-pixel tile whatever the image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bounds import is_int, is_number
from .config import VAEConfig
from .weights import PretrainedMixin

EPS = 1e-6  # every group norm of the VAE uses eps 1e-6 (diffusers' resnet_eps for the VAE)


class ResnetBlock(nn.Module):
    """norm-silu-conv twice, plus the input (through a 1x1 conv when the width changes)."""

    def __init__(self, in_ch: int, out_ch: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=EPS)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # (dropout 0 at inference)
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return x + h  # diffusers divides by output_scale_factor, which is 1 in the VAE


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W pixels, with a residual connection.

    diffusers builds it as Attention(heads = channels // attention_head_dim) with
    attention_head_dim = channels, i.e. one head as wide as the block.
    """

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=EPS)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])  # to_out.0; diffusers' to_out.1: dropout

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x.flatten(2)).transpose(1, 2)  # (B, C, H*W) -> (B, H*W, C)
        q, k, v = (lin(h)[:, None] for lin in (self.to_q, self.to_k, self.to_v))  # (B, 1, H*W, C)
        # softmax(q @ k^T / sqrt(C)) @ v, one head of width C:
        #   att = (q @ k.transpose(-2, -1)) * C ** -0.5   # (B, 1, H*W, H*W)
        #   h = att.softmax(dim=-1) @ v                    # (B, 1, H*W, C)
        h = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, H*W, C)
        h = self.to_out[0](h).transpose(1, 2).reshape(B, C, H, W)
        # rescale_output_factor is 1. The head axis above, the flatten before the norm and the
        # order `h + x` follow diffusers' memory layouts (this h is channels-last), so that
        # PyTorch picks the same kernels and float32 results agree to the bit on CPU.
        return h + x


class MidBlock(nn.Module):
    """resnet, attention, resnet at the lowest resolution (no attention if add_attention=False)."""

    def __init__(self, ch: int, groups: int, add_attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, groups), ResnetBlock(ch, ch, groups)])
        self.attentions = nn.ModuleList([AttentionBlock(ch, groups)] if add_attention else [])

    def forward(self, x):
        x = self.resnets[0](x)
        for attn in self.attentions:
            x = attn(x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """Stride-2 3x3 conv with asymmetric zero padding: one column right, one row below."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H, W) -> (B, C, H/2, W/2)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


class DownEncoderBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, n_layers: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n_layers)])
        self.downsamplers = nn.ModuleList([Downsample(out_ch)]) if downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class UpDecoderBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, n_layers: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n_layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    """image (B, 3, H, W) -> (B, 2 * latent_channels, H/f, W/f): mean and log-variance."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = list(cfg.block_out_channels), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        ins = [ch[0], *ch[:-1]]  # each level's input width: conv_in's, then the previous level's
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock(i, o, cfg.layers_per_block, g, downsample=k < len(ch) - 1)
            for k, (i, o) in enumerate(zip(ins, ch))])
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """latent (B, latent_channels, h, w) -> image (B, 3, h*f, w*f). Mirrors the encoder, with
    one more resnet per level (layers_per_block + 1) and upsampling instead of downsampling."""

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g = list(reversed(cfg.block_out_channels)), cfg.norm_num_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        ins = [ch[0], *ch[:-1]]  # each level's input width: the mid block's, then the previous's
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock(i, o, cfg.layers_per_block + 1, g, upsample=k < len(ch) - 1)
            for k, (i, o) in enumerate(zip(ins, ch))])
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class DiagonalGaussian:
    """The encoder's posterior N(mean, std^2) per latent element (diffusers'
    DiagonalGaussianDistribution). `moments` is (B, 2 * latent_channels, h, w)."""

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = moments.chunk(2, dim=1)  # (B, latent_channels, h, w) each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def mode(self) -> torch.Tensor:
        return self.mean

    def sample(self, generator=None) -> torch.Tensor:
        """mean + std * noise, the noise drawn as diffusers' `randn_tensor` draws it: on the
        generator's device (a CPU generator gives the same numbers whatever the model's device),
        in the latents' dtype; a list of generators draws one image's noise from each."""
        shape, device, dtype = self.mean.shape, self.mean.device, self.mean.dtype
        if isinstance(generator, list) and len(generator) > 1:
            noise = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device,
                                           dtype=dtype) for g in generator])
        else:
            g = generator[0] if isinstance(generator, list) else generator
            noise = torch.randn(shape, generator=g, dtype=dtype,
                                device=g.device if g is not None else device)
        return self.mean + self.std * noise.to(device)


def check_input(x, name: str, channels: int) -> None:
    """encode/decode take a float tensor (B, channels, H, W) with no empty axis."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != channels or 0 in x.shape:
        raise ValueError(f"{name} must have shape (batch, {channels}, height, width) with no empty axis, "
                         f"got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def blend_rows(above: torch.Tensor, below: torch.Tensor, extent: int) -> None:
    """Cross-fade, in place, `below`'s first `extent` rows from `above`'s last ones: row y of
    the overlap is above * (1 - y/extent) + below * y/extent (diffusers' blend_v)."""
    extent = min(above.shape[2], below.shape[2], extent)
    if extent > 0:
        w = torch.arange(extent, device=below.device).to(below.dtype)[:, None] / extent  # (extent, 1)
        below[:, :, :extent] = above[:, :, -extent:] * (1 - w) + below[:, :, :extent] * w


def blend_columns(left: torch.Tensor, right: torch.Tensor, extent: int) -> None:
    """The same across columns (diffusers' blend_h)."""
    blend_rows(left.transpose(2, 3), right.transpose(2, 3), extent)


def tiled(fn, x: torch.Tensor, tile: int, step: int, blend: int, keep: int) -> torch.Tensor:
    """fn (a decoder or an encoder) applied to overlapping tiles of x, reassembled.

    Tiles of tile x tile inputs start every `step` inputs, row by row (those at the right and
    bottom edges are smaller). Each output tile is blended with the finished tile above it,
    then with the finished tile to its left, and its top-left keep x keep corner is kept. Only
    two rows of tiles are alive at once (diffusers keeps all of them; the order of the blends,
    and so the result, is the same).
    """
    out_rows, above = [], None
    for i in range(0, x.shape[2], step):
        row = []
        for j in range(0, x.shape[3], step):
            t = fn(x[:, :, i:i + tile, j:j + tile])
            if above is not None:
                blend_rows(above[len(row)], t, blend)
            if row:
                blend_columns(row[-1], t, blend)
            row.append(t)
        out_rows.append(torch.cat([t[:, :, :keep, :keep] for t in row], dim=3))
        above = row
    return torch.cat(out_rows, dim=2)


class AutoencoderKL(PretrainedMixin, nn.Module):
    """diffusers' AutoencoderKL: `encode(image) -> DiagonalGaussian`, `decode(z) -> image`."""

    config_class = VAEConfig

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        n = config.latent_channels
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        # 1x1 convs between the encoder/decoder and the latent space (absent in some checkpoints)
        self.quant_conv = nn.Conv2d(2 * n, 2 * n, 1) if config.use_quant_conv else nn.Identity()
        self.post_quant_conv = nn.Conv2d(n, n, 1) if config.use_post_quant_conv else nn.Identity()
        # Memory switches, diffusers' names (see enable_slicing / enable_tiling). They are
        # configuration, set before calls: each encode/decode reads them once, at its start.
        self.use_slicing = False
        self.use_tiling = False
        # Tile geometry, under the attribute names diffusers users set by hand: a tile is
        # sample_size pixels (the size the VAE was trained at), i.e. sample_size / factor latents,
        # and neighbouring tiles overlap by a quarter of a tile.
        self.tile_sample_min_size = config.sample_size
        self.tile_latent_min_size = config.sample_size // self.factor
        self.tile_overlap_factor = 0.25

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def factor(self) -> int:
        """Pixels per latent along each side: every encoder level but the last halves the size."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def needs_upcast(self) -> bool:
        """True when this VAE is in float16 but its config asks to run in float32 (see the
        module docstring): the pipeline should then call `vae.float()` before decoding."""
        return self.dtype == torch.float16 and self.config.force_upcast

    def enable_slicing(self):
        """Encode and decode a batch one image at a time: activation memory of one image, not of
        the batch. The result is the batch's up to float rounding (PyTorch's CPU kernels may sum
        in another order for another batch size)."""
        self.use_slicing = True

    def disable_slicing(self):
        self.use_slicing = False

    def enable_tiling(self):
        """Decode latents larger than a tile (tile_latent_min_size, 64 for SD at factor 8) in
        overlapping tiles and cross-fade the overlaps, as diffusers' tiled_decode does; encode
        images larger than tile_sample_min_size pixels the same way. The activation memory is
        then that of one tile, whatever the image size. Each tile sees only its own latents (the
        mid-block attention and the group norms work per tile), so the image differs from an
        untiled decode (slightly, with trained weights) exactly as diffusers' does; inputs that
        fit in one tile are not tiled at all."""
        self.tile_plans()  # a tile geometry set by hand is checked now rather than mid-decode
        self.use_tiling = True

    def disable_tiling(self):
        self.use_tiling = False

    def tile_plans(self) -> tuple[tuple, tuple]:
        """diffusers' tile geometry, for decode and for encode: (tile, step, blend, keep) with
        tile and step in input units (latents for decode), blend and keep in output units.

        Tiles start every `step` inputs; each tile's first `blend` output rows and columns are
        cross-faded with its neighbours' last ones, then its first `keep` are kept. That is
        seamless only when a tile's kept part is exactly as long as the step between tiles
        (keep == step * factor for decode); otherwise diffusers returns an image of the wrong
        size with misaligned blends (e.g. sample_size 40 at factor 8), so that is refused here.
        """
        pixels, latents, overlap, f = (self.tile_sample_min_size, self.tile_latent_min_size,
                                       self.tile_overlap_factor, self.factor)
        if not (all(is_int(n) and n >= 1 for n in (pixels, latents))
                and is_number(overlap) and 0 <= overlap < 1):
            raise ValueError(f"VAE tiling needs tile_sample_min_size and tile_latent_min_size integers >= 1 "
                             f"and tile_overlap_factor in [0, 1), got {pixels!r}, {latents!r}, {overlap!r}")
        decode_step, decode_blend = int(latents * (1 - overlap)), int(pixels * overlap)
        encode_step, encode_blend = int(pixels * (1 - overlap)), int(latents * overlap)
        decode = (latents, decode_step, decode_blend, pixels - decode_blend)
        encode = (pixels, encode_step, encode_blend, latents - encode_blend)
        if (pixels != latents * f or decode_step < 1 or decode[3] != decode_step * f
                or encode_step < 1 or encode_step != encode[3] * f):
            raise ValueError(
                f"VAE tiles of {pixels} pixels = {latents} latents with overlap {overlap} do not line up: "
                f"tile_sample_min_size must be tile_latent_min_size * {f}, and the overlap a whole number "
                f"of latents (with overlap 0.25, tile_sample_min_size a multiple of {4 * f})")
        return decode, encode

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """image (B, 3, H, W) in [-1, 1] -> posterior over latents (B, latent_ch, H/f, W/f)."""
        check_input(x, "image", self.config.in_channels)
        slicing, plan = self.use_slicing, self.tile_plans()[1] if self.use_tiling else None  # read once

        def moments(x):  # (B, in_channels, H, W) -> (B, 2 * latent_channels, H/f, W/f)
            return self.quant_conv(self.encoder(x))

        def encode_one(x):
            if plan is not None and max(x.shape[2:]) > plan[0]:
                if x.shape[2] % self.factor or x.shape[3] % self.factor:
                    # edge tiles would encode to fractional latents (diffusers: a wrong size or
                    # a convolution error)
                    raise ValueError(f"tiled encode needs an image height and width that are multiples "
                                     f"of {self.factor}, got {x.shape[2]}x{x.shape[3]}")
                return tiled(moments, x, *plan)
            return moments(x)

        x = x.to(self.dtype)
        return DiagonalGaussian(torch.cat([encode_one(p) for p in (x.split(1) if slicing else [x])]))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """latent (B, latent_channels, h, w), already unscaled (see `unscale_latents`) ->
        image (B, 3, h*f, w*f), roughly in [-1, 1], in the VAE's dtype."""
        check_input(z, "latents", self.config.latent_channels)
        slicing, plan = self.use_slicing, self.tile_plans()[0] if self.use_tiling else None  # read once

        def image(z):  # (B, latent_channels, h, w) -> (B, 3, h*f, w*f)
            return self.decoder(self.post_quant_conv(z))

        def decode_one(z):
            if plan is not None and max(z.shape[2:]) > plan[0]:
                return tiled(image, z, *plan)
            return image(z)

        z = z.to(self.dtype)
        return torch.cat([decode_one(p) for p in (z.split(1) if slicing else [z])])

    def forward(self, x: torch.Tensor, sample_posterior=False, generator=None) -> torch.Tensor:
        """Reconstruct an image: encode, take the posterior's mode (or a sample), decode."""
        dist = self.encode(x)
        return self.decode(dist.sample(generator) if sample_posterior else dist.mode())

    # latents the diffusion model works on <-> latents the decoder takes

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """z from `encode(...).sample()` -> diffusion latents: (z - shift) * scale."""
        if self.config.shift_factor is not None:
            z = z - self.config.shift_factor
        return z * self.config.scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """diffusion latents -> decoder input: latents / scale + shift."""
        z = latents / self.config.scaling_factor
        if self.config.shift_factor is not None:
            z = z + self.config.shift_factor
        return z
