"""SVD's VAE: SD's image encoder, and a decoder that also mixes information across frames.

Reimplements diffusers' `AutoencoderKLTemporalDecoder` and its `TemporalDecoder`
(models/autoencoders/autoencoder_kl_temporal_decoder.py), `MidBlockTemporalDecoder` and
`UpBlockTemporalDecoder` (models/unets/unet_3d_blocks.py), `SpatioTemporalResBlock`,
`TemporalResnetBlock` and `AlphaBlender` (models/resnet.py). The encoder, its posterior and the
2D pieces (resnet, mid-block attention, upsampler) are the core VAE's (mini_tgate/core/vae.py).
Module names equal diffusers' state-dict keys, so a `vae/` folder loads strictly.

Shapes for SVD at 576x1024 (block_out_channels 128, 256, 512, 512), B videos of F frames:
    frames (B*F, 3, 576, 1024) -> encoder -> posterior over (B*F, 4, 72, 128), frame by frame
    latents (B*F, 4, 72, 128) -> decoder -> frames (B*F, 3, 576, 1024), roughly in [-1, 1]
Every block of the decoder runs a 2D resnet on each frame, then a resnet whose convolutions
span 3 neighbouring frames (kernel (3, 1, 1)), and blends the two with a learned weight; one
last (3, 1, 1) convolution follows the output conv. So `decode` needs to know where one video's
frames end: `decode(z, num_frames)`. diffusers' SVD pipeline decodes `decode_chunk_size` frames
at a time, each chunk as one video of that many frames (`1 / scaling_factor * latents` first).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.bounds import is_int
from ..core.config import VAEConfig
from ..core.vae import EPS, AttentionBlock, DiagonalGaussian, Encoder, ResnetBlock, Upsample, check_input
from ..core.weights import PretrainedMixin
from .config import GROUPS, TemporalVAEConfig

TEMPORAL_EPS = 1e-5  # the temporal resnets' norms (the spatial ones: EPS = 1e-6)


def to_video(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(B*F, C, H, W) -> (B, C, F, H, W), a view: frames become Conv3d's depth axis."""
    return x.reshape(-1, num_frames, *x.shape[1:]).permute(0, 2, 1, 3, 4)


def to_frames(x: torch.Tensor) -> torch.Tensor:
    """(B, C, F, H, W) -> (B*F, C, H, W)."""
    return x.permute(0, 2, 1, 3, 4).flatten(0, 1)


class TemporalResnetBlock(nn.Module):
    """norm-silu-conv twice with (3, 1, 1) kernels: each pixel sees itself in the frames before
    and after (zero-padded at a video's ends), plus the input. Same width in and out."""

    def __init__(self, ch: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(GROUPS, ch, eps=TEMPORAL_EPS)
        self.conv1 = nn.Conv3d(ch, ch, (3, 1, 1), padding=(1, 0, 0))
        self.norm2 = nn.GroupNorm(GROUPS, ch, eps=TEMPORAL_EPS)
        self.conv2 = nn.Conv3d(ch, ch, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x):  # (B, C, F, H, W)
        h = self.conv1(F.silu(self.norm1(x)))  # group norms over (C/32, F, H, W): whole videos
        return x + self.conv2(F.silu(self.norm2(h)))


class AlphaBlender(nn.Module):
    """A learned blend of the spatial and the temporal result (diffusers' AlphaBlender with
    merge_strategy "learned" and switch_spatial_to_temporal_mix, as in the VAE):
    a = 1 - sigmoid(mix_factor); out = a * spatial + (1 - a) * temporal."""

    def __init__(self):
        super().__init__()
        self.mix_factor = nn.Parameter(torch.zeros(1))  # diffusers inits 0: an even blend

    def forward(self, spatial, temporal):
        a = 1.0 - torch.sigmoid(self.mix_factor).to(spatial.dtype)  # diffusers' order of operations:
        return a * spatial + (1.0 - a) * temporal  # 1 - (1 - s) is not s to the last bit


class SpatioTemporalResBlock(nn.Module):
    """A 2D resnet on every frame, then a temporal resnet across frames, blended."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.spatial_res_block = ResnetBlock(in_ch, out_ch, GROUPS)
        self.temporal_res_block = TemporalResnetBlock(out_ch)
        self.time_mixer = AlphaBlender()

    def forward(self, x, num_frames: int):  # (B*F, C_in, H, W) -> (B*F, C_out, H, W)
        x = to_video(self.spatial_res_block(x), num_frames)  # (B, C_out, F, H, W)
        return to_frames(self.time_mixer(x, self.temporal_res_block(x)))


class MidBlock(nn.Module):
    """resnet, attention, resnet. diffusers builds `layers` resnets and one attention but runs
    resnets[0], then zip(resnets[1:], attentions): with layers = 1 (the attention is loaded but
    never runs) or layers > 2 (resnets[2:] never run), this does the same. SVD has 2."""

    def __init__(self, ch: int, layers: int):
        super().__init__()
        self.resnets = nn.ModuleList([SpatioTemporalResBlock(ch, ch) for _ in range(layers)])
        self.attentions = nn.ModuleList([AttentionBlock(ch, GROUPS)])  # per frame, one head

    def forward(self, x, num_frames: int):
        x = self.resnets[0](x, num_frames)
        for resnet, attn in zip(self.resnets[1:], self.attentions):
            x = resnet(attn(x), num_frames)
        return x


class UpBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, layers: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            [SpatioTemporalResBlock(in_ch if i == 0 else out_ch, out_ch) for i in range(layers)])
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x, num_frames: int):
        for resnet in self.resnets:
            x = resnet(x, num_frames)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class TemporalDecoder(nn.Module):
    """latents (B*F, latent_channels, h, w) -> frames (B*F, out_channels, h*f, w*f)."""

    def __init__(self, cfg: TemporalVAEConfig):
        super().__init__()
        ch, n = list(reversed(cfg.block_out_channels)), cfg.layers_per_block
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], n)
        ins = [ch[0], *ch[:-1]]  # each level's input width: the mid block's, then the previous's
        self.up_blocks = nn.ModuleList([UpBlock(i, o, n + 1, upsample=k < len(ch) - 1)
                                        for k, (i, o) in enumerate(zip(ins, ch))])
        self.conv_norm_out = nn.GroupNorm(GROUPS, ch[-1], eps=EPS)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)
        self.time_conv_out = nn.Conv3d(cfg.out_channels, cfg.out_channels, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, z, num_frames: int):
        x = self.mid_block(self.conv_in(z), num_frames)  # (B*F, C_last, h, w)
        for block in self.up_blocks:
            x = block(x, num_frames)  # each level but the last doubles h and w
        x = self.conv_out(F.silu(self.conv_norm_out(x)))  # (B*F, 3, H, W)
        return to_frames(self.time_conv_out(to_video(x, num_frames)))  # smoothed across frames


class AutoencoderKLTemporalDecoder(PretrainedMixin, nn.Module):
    """diffusers' AutoencoderKLTemporalDecoder: `encode(frames) -> DiagonalGaussian` (the core's
    posterior: `.mode()`, `.mean`, `.sample(generator)`), `decode(z, num_frames) -> frames`."""

    config_class = TemporalVAEConfig

    def __init__(self, config: TemporalVAEConfig):
        super().__init__()
        self.config = c = config
        # SD's encoder, as diffusers builds it here: 32 norm groups, attention in the mid block
        self.encoder = Encoder(VAEConfig(in_channels=c.in_channels, block_out_channels=c.block_out_channels,
                                         layers_per_block=c.layers_per_block, latent_channels=c.latent_channels,
                                         norm_num_groups=GROUPS, mid_block_add_attention=True))
        self.decoder = TemporalDecoder(config)
        self.quant_conv = nn.Conv2d(2 * c.latent_channels, 2 * c.latent_channels, 1)  # no post_quant_conv

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.conv_in.weight.dtype

    @property
    def needs_upcast(self) -> bool:
        """True in float16 when the config asks for float32 (see core/vae.py): call `vae.float()`."""
        return self.dtype == torch.float16 and self.config.force_upcast

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """frames (N, 3, H, W) in [-1, 1] -> posterior over latents (N, latent_channels, H/f, W/f),
        each frame on its own. SVD conditions on `encode(image).mode()`, unscaled."""
        check_input(x, "image", self.config.in_channels)
        return DiagonalGaussian(self.quant_conv(self.encoder(x.to(self.dtype))))

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """latents (B*F, latent_channels, h, w), unscaled, B videos of num_frames frames each,
        frame after frame -> frames (B*F, out_channels, h*f, w*f), in the VAE's dtype."""
        check_input(z, "latents", self.config.latent_channels)
        if not (is_int(num_frames) and num_frames >= 1 and len(z) % num_frames == 0):
            raise ValueError(f"num_frames must be an integer >= 1 dividing the {len(z)} latents, got {num_frames!r}")
        return self.decoder(z.to(self.dtype), int(num_frames))

    def forward(self, x: torch.Tensor, sample_posterior=False, generator=None, num_frames: int = 1):
        """Reconstruct frames: encode, take the posterior's mode (or a sample), decode."""
        dist = self.encode(x)
        return self.decode(dist.sample(generator) if sample_posterior else dist.mode(), num_frames)

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.config.scaling_factor

    def unscale_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """diffusion latents -> decoder input, as diffusers' SVD pipeline writes it (a float32
        product with 1/s, not a division by s: the last bit can differ)."""
        return 1 / self.config.scaling_factor * latents
