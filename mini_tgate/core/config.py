"""Model configurations: small dataclasses read from a checkpoint's `config.json`.

Field names are the checkpoint's own keys, so `Config.from_dict(json.load(f))` is the whole
parser: keys this project does not use (`_class_name`, `_diffusers_version`, training-only
settings) are ignored; values that would change the architecture in a way not implemented
here are rejected by `check()` with a message that names them.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from .bounds import (MAX_BLOCKS, MAX_INT, MAX_LAYERS, MAX_MODEL_LAYERS, MAX_PARAMS, MAX_STEP_MACS,
                     SCALING_FACTOR_BOUND, int_in, is_int, is_number)


# the real models' configs shipped with the package (SD-1.5, SD-2.1, SDXL, LCM-SDXL, PixArt, SVD-XT)
PRESETS = Path(__file__).resolve().parent.parent / "presets"


class ConfigError(ValueError):
    """A config.json that is malformed or asks for an architecture not implemented here."""


TYPE_NAMES = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
              "tuple": "a list", "list": "a list", "dict": "an object", "None": "null"}


def has_type(value, name: str) -> bool:
    """Whether a JSON value fits one alternative of a field's annotation ("int", "list[int]", ...)."""
    name = name.split("[")[0].strip()
    if name == "None":
        return value is None
    if name == "bool":
        return isinstance(value, bool)
    if name in ("int", "float"):  # JSON's 1 is a fine float; true is no number
        kinds = int if name == "int" else (int, float)
        return isinstance(value, kinds) and not isinstance(value, bool)
    if name in ("tuple", "list"):
        return isinstance(value, (list, tuple))
    if name in ("str", "dict"):
        return isinstance(value, {"str": str, "dict": dict}[name])
    return True  # an annotation not checked here


def out_of_range(value) -> bool:
    """An integer past MAX_INT or a float that is not finite, anywhere in a (nested) value."""
    if isinstance(value, (list, tuple)):
        return any(out_of_range(v) for v in value)
    if isinstance(value, float):
        return not math.isfinite(value)
    return is_int(value) and abs(value) > MAX_INT


@dataclass
class Size:
    """What a config implies, estimated from its widths and depths without building anything:
    the parameters of its convolutions and projections (norms and biases left out), its layers
    (resnet, attention and transformer blocks) and the MACs of one call on one input (each
    weight once per position it applies at, plus self-attention's two products)."""

    params: int = 0
    layers: int = 0
    macs: int = 0

    def add(self, params: int, positions: int = 0, layers: int = 0, attention: int = 0) -> None:
        self.params += params
        self.layers += layers
        self.macs += params * positions + attention


def resnet(cin: int, cout: int, temb: int = 0) -> int:
    """ResnetBlock2D's parameters: two 3x3 convolutions, the time projection, a 1x1 shortcut where the width changes."""
    return 9 * cin * cout + 9 * cout * cout + temb * cout + (cin * cout if cin != cout else 0)


def transformer_block(c: int, context: int, ff_in: bool = False) -> int:
    """BasicTransformerBlock's: self-attention, cross-attention, GEGLU feed-forward (x4); SVD's temporal one has two."""
    return 4 * c * c + 2 * c * (c + context) + 12 * c * c * (2 if ff_in else 1)


def short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _FromDict:
    component = ""  # how messages name the config ("unet", "vae", ...); "" for the class name

    @classmethod
    def from_dict(cls, d: dict):
        """The config of a parsed config.json. Each known key's value is checked against the
        field's annotation (a string for `layers_per_block`, 2.0 for an integer, true for a
        number are refused) and bounded (MAX_INT), then `check()` validates the whole."""
        name = cls.component or cls.__name__
        if not isinstance(d, dict):
            raise ConfigError(f"{name} config must be a JSON object, got {type(d).__name__}")
        values = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                continue
            value, kinds = d[f.name], str(f.type).split("|")
            if not any(has_type(value, k) for k in kinds):
                expected = " or ".join(TYPE_NAMES.get(k.split("[")[0].strip(), k.strip()) for k in kinds)
                raise ConfigError(f"{name} config {f.name}={short(value)}: expected {expected}")
            if out_of_range(value):
                raise ConfigError(f"{name} config {f.name}={short(value)}: numbers must be finite and "
                                  f"integers at most {MAX_INT}")
            values[f.name] = value
        cfg = cls(**values)
        cfg.check()
        return cfg

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self) -> None:
        pass

    def check_size(self, size: Size) -> None:
        """The model this config implies is within MAX_PARAMS, MAX_MODEL_LAYERS and MAX_STEP_MACS."""
        for what, value, bound in (("parameters", size.params, MAX_PARAMS), ("layers", size.layers, MAX_MODEL_LAYERS),
                                   ("MACs in one step", size.macs, MAX_STEP_MACS)):
            if value > bound:
                raise ConfigError(f"{self.component or type(self).__name__} config implies {value:.3g} {what}, "
                                  f"more than any real model (limit {bound:.3g})")

    def require(self, field: str, low: int = 1, high: int = MAX_INT, each: bool = False) -> None:
        """`field` is an integer in [low, high] (or, with `each`, an int or a non-empty list of them)."""
        value = getattr(self, field)
        values = list(value) if each and isinstance(value, (list, tuple)) else [value]
        ok = values and all(int_in(v, low, high) for v in values)
        if not ok:
            what = "integers" if each and isinstance(value, (list, tuple)) else "an integer"
            raise ConfigError(f"{self.component or type(self).__name__} config {field}={short(value)}: "
                              f"expected {what} from {low} to {high}")


@dataclass
class CLIPTextConfig(_FromDict):
    """transformers' CLIPTextConfig (text_encoder/config.json)."""

    component = "text encoder"

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    projection_dim: int = 512  # width of text_projection (CLIPTextModelWithProjection only)
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # SD-1: quick_gelu; SD-2 and SDXL's second encoder: gelu
    layer_norm_eps: float = 1e-5
    bos_token_id: int = 49406
    # The pooled output is taken at the EOS token. Checkpoints saved before transformers 4.31
    # carry eos_token_id == 2 (a placeholder); for those the EOS is found as the highest id
    # in the sequence (argmax), which is <|endoftext|> = 49407 in CLIP's vocabulary.
    eos_token_id: int = 49407
    architectures: list | None = None  # ["CLIPTextModel"] or ["CLIPTextModelWithProjection"]

    @property
    def with_projection(self) -> bool:
        return bool(self.architectures) and "CLIPTextModelWithProjection" in self.architectures

    def check(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "projection_dim", "num_attention_heads",
                     "max_position_embeddings"):
            self.require(name)
        self.require("num_hidden_layers", high=MAX_LAYERS)
        if self.layer_norm_eps < 0:
            raise ConfigError(f"text encoder layer_norm_eps={self.layer_norm_eps} must not be negative")
        if self.hidden_act not in ("quick_gelu", "gelu"):
            raise ConfigError(f"text encoder hidden_act={self.hidden_act!r} is not supported")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"text encoder hidden_size={self.hidden_size} must be divisible by "
                              f"num_attention_heads={self.num_attention_heads}")
        h = self.hidden_size
        self.check_size(Size((self.vocab_size + self.max_position_embeddings + self.projection_dim) * h
                             + self.num_hidden_layers * (4 * h * h + 2 * h * self.intermediate_size),
                             layers=self.num_hidden_layers))


@dataclass
class UNetConfig(_FromDict):
    """diffusers' UNet2DConditionModel (unet/config.json), the fields SD 1.x/2.x/SDXL/LCM use.

    The attention_head_dim quirk: early diffusers configs named the number of attention
    *heads* `attention_head_dim` (SD-1.5: attention_head_dim=8 means 8 heads of 40 channels;
    SD-2.1: [5, 10, 20, 20] heads of 64). diffusers kept the name for compatibility and reads
    `num_attention_heads = num_attention_heads or attention_head_dim`; so does `heads()` below.
    The real per-head width is then block channels // heads.
    """

    component = "unet"

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: bool = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    act_fn: str = "silu"
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int | list = 1280
    transformer_layers_per_block: int | list = 1
    reverse_transformer_layers_per_block: list | None = None
    encoder_hid_dim: int | None = None
    encoder_hid_dim_type: str | None = None
    attention_head_dim: int | list = 8
    num_attention_heads: int | list | None = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False  # SD-2 and SDXL: Linear proj_in/out; SD-1: 1x1 Conv
    class_embed_type: str | None = None
    addition_embed_type: str | None = None  # "text_time" for SDXL
    addition_time_embed_dim: int | None = None  # SDXL: 256 per time id
    num_class_embeds: int | None = None
    upcast_attention: bool = False  # compute attention scores in float32 (SD-2.1)
    resnet_time_scale_shift: str = "default"
    time_embedding_type: str = "positional"
    time_embedding_dim: int | None = None
    timestep_post_act: str | None = None
    time_cond_proj_dim: int | None = None  # LCM: width of the guidance-scale embedding
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: int | None = None  # SDXL: text_embeds + 6 time ids
    attention_type: str = "default"
    mid_block_only_cross_attention: bool | None = None
    cross_attention_norm: str | None = None

    def per_block(self, value) -> list:
        """An int-or-list setting as one value per down block."""
        n = len(self.down_block_types)
        return list(value) if isinstance(value, (list, tuple)) else [value] * n

    def heads(self) -> list[int]:
        """Number of attention heads per down block (see the quirk above)."""
        return self.per_block(self.num_attention_heads or self.attention_head_dim)

    def check(self):
        unsupported = {
            "class_embed_type": self.class_embed_type,
            "encoder_hid_dim_type": self.encoder_hid_dim_type,
            "num_class_embeds": self.num_class_embeds,
            "timestep_post_act": self.timestep_post_act,
            "time_embedding_dim": self.time_embedding_dim,
            "cross_attention_norm": self.cross_attention_norm,
        }
        for name, value in unsupported.items():
            if value is not None:
                raise ConfigError(f"unet config {name}={value!r} is not supported")
        if self.addition_embed_type not in (None, "text_time"):
            raise ConfigError(f"unet addition_embed_type={self.addition_embed_type!r} is not supported")
        if self.dual_cross_attention or self.only_cross_attention is True:
            raise ConfigError("unet dual_cross_attention / only_cross_attention are not supported")
        if self.time_embedding_type != "positional" or self.resnet_time_scale_shift != "default":
            raise ConfigError("unet time_embedding_type must be 'positional' and "
                              "resnet_time_scale_shift 'default'")
        if self.attention_type != "default":
            raise ConfigError(f"unet attention_type={self.attention_type!r} is not supported")
        known = {"DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"}
        for t in (*self.down_block_types, *self.up_block_types):
            if t not in known:
                raise ConfigError(f"unet block type {t!r} is not supported")
        if self.mid_block_type not in (None, "UNetMidBlock2DCrossAttn"):
            raise ConfigError(f"unet mid_block_type={self.mid_block_type!r} is not supported")
        self.require("block_out_channels", each=True)
        n = len(self.block_out_channels)
        if not 1 <= len(self.down_block_types) <= MAX_BLOCKS:
            raise ConfigError(f"unet down_block_types: expected 1 to {MAX_BLOCKS} blocks")
        if n != len(self.down_block_types) or n != len(self.up_block_types):
            raise ConfigError("unet block_out_channels, down_block_types and up_block_types differ in length")
        for name in ("sample_size", "in_channels", "out_channels", "norm_num_groups", "cross_attention_dim",
                     "attention_head_dim", "num_attention_heads", "addition_time_embed_dim",
                     "projection_class_embeddings_input_dim", "time_cond_proj_dim"):
            if getattr(self, name) is not None:  # None: the feature is off (or, for heads, the quirk above)
                self.require(name, each=True)
        self.require("layers_per_block", high=MAX_LAYERS)
        self.require("transformer_layers_per_block", high=MAX_LAYERS, each=True)
        for name in ("cross_attention_dim", "attention_head_dim", "num_attention_heads", "transformer_layers_per_block"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)) and len(value) != n:
                raise ConfigError(f"unet {name} lists {len(value)} values for {n} blocks")
        for name in ("conv_in_kernel", "conv_out_kernel"):  # odd: "same" padding keeps the size
            self.require(name, high=31)
            if getattr(self, name) % 2 == 0:
                raise ConfigError(f"unet {name}={getattr(self, name)} must be odd")
        for channels in self.block_out_channels:  # every GroupNorm splits a block's channels into groups
            if channels % self.norm_num_groups:
                raise ConfigError(f"unet block_out_channels {channels} is not divisible by "
                                  f"norm_num_groups={self.norm_num_groups}")
        attention = [i for i, t in enumerate(self.down_block_types) if t.startswith("CrossAttn")]
        if self.mid_block_type:
            attention.append(n - 1)
        for i, (channels, heads) in enumerate(zip(self.block_out_channels, self.heads())):
            if i in attention and channels % heads:
                raise ConfigError(f"unet block {i}: {channels} channels do not split into {heads} attention heads")
        if not (is_number(self.norm_eps) and self.norm_eps > 0):
            raise ConfigError(f"unet config norm_eps={self.norm_eps!r} must be a positive number")
        reverse = self.reverse_transformer_layers_per_block
        if reverse is not None and not (len(reverse) == n and all(
                int_in(v, 1, MAX_LAYERS) or isinstance(v, list) and len(v) == self.layers_per_block + 1
                and all(int_in(x, 1, MAX_LAYERS) for x in v) for v in reverse)):
            raise ConfigError(f"unet reverse_transformer_layers_per_block={short(reverse)}: expected one value per "
                              f"block, each from 1 to {MAX_LAYERS} or a list of one per layer")
        self.check_size(unet_size(self))


@dataclass
class VAEConfig(_FromDict):
    """diffusers' AutoencoderKL (vae/config.json)."""

    component = "vae"

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",) * 4
    up_block_types: tuple = ("UpDecoderBlock2D",) * 4
    block_out_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    act_fn: str = "silu"
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 512
    scaling_factor: float = 0.18215  # SD: 0.18215, SDXL: 0.13025
    shift_factor: float | None = None
    force_upcast: bool = True  # decode in float32 even when the pipeline runs in float16
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def check(self):
        for t in (*self.down_block_types, *self.up_block_types):
            if t not in ("DownEncoderBlock2D", "UpDecoderBlock2D"):
                raise ConfigError(f"vae block type {t!r} is not supported")
        if self.act_fn != "silu":
            raise ConfigError(f"vae act_fn={self.act_fn!r} is not supported")
        self.require("block_out_channels", each=True)
        if len(self.block_out_channels) > MAX_BLOCKS:  # the levels are built from block_out_channels alone
            raise ConfigError(f"vae block_out_channels: expected at most {MAX_BLOCKS} levels")
        for name in ("in_channels", "out_channels", "latent_channels", "norm_num_groups", "sample_size"):
            self.require(name)
        self.require("layers_per_block", high=MAX_LAYERS)
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise ConfigError(f"vae block_out_channels {channels} is not divisible by "
                                  f"norm_num_groups={self.norm_num_groups}")
        check_scaling_factor(self.scaling_factor)
        self.check_size(vae_size(self))


def check_scaling_factor(value) -> None:
    """A VAE's scaling_factor: latents are multiplied by it and divided by it."""
    if not (is_number(value) and 1 / SCALING_FACTOR_BOUND <= abs(value) <= SCALING_FACTOR_BOUND):
        raise ConfigError(f"vae config scaling_factor={value!r} must not be 0, nor of magnitude under "
                          f"{1 / SCALING_FACTOR_BOUND:g} or over {SCALING_FACTOR_BOUND:g} (latents are divided by it)")


def unet_size(cfg, video: bool = False) -> Size:
    """The Size of a UNet2DConditionModel at its sample_size, or with `video` of SVD's spatio-temporal
    UNet on num_frames frames (each resnet and transformer block has a temporal twin)."""
    ch, twin = list(cfg.block_out_channels), 1 + video  # a video UNet's blocks come in pairs
    n, temb = len(ch), 4 * ch[0]
    cross, depth = cfg.per_block(cfg.cross_attention_dim), cfg.per_block(cfg.transformer_layers_per_block)
    layers, up_depth = cfg.per_block(cfg.layers_per_block), getattr(cfg, "reverse_transformer_layers_per_block", None)
    sample = cfg.sample_size if isinstance(cfg.sample_size, (list, tuple)) else [cfg.sample_size or 1] * 2
    frames, size = cfg.num_frames if video else 1, Size()

    def positions(level: int) -> int:
        return frames * math.prod(max(side >> max(level, 0), 1) for side in sample)

    def block(cin: int, c: int, level: int, attention: bool, blocks: int = 1):  # a resnet and maybe a transformer
        p = positions(level)
        size.add(resnet(cin, c, temb) + (6 * c * c + temb * c) * video, p, layers=twin)
        if attention:
            per = transformer_block(c, cross[level]) + transformer_block(c, cross[level], ff_in=True) * video
            size.add(2 * c * c + blocks * per, p, layers=twin * blocks, attention=2 * blocks * p * p // frames * c)

    kernels = (getattr(cfg, "conv_in_kernel", 3) ** 2 * cfg.in_channels
               + getattr(cfg, "conv_out_kernel", 3) ** 2 * cfg.out_channels)
    extra = (cfg.projection_class_embeddings_input_dim or 0) + (getattr(cfg, "time_cond_proj_dim", None) or 0)
    size.add(kernels * ch[0], positions(0))
    size.add((ch[0] + extra) * temb + 2 * temb * temb)
    for i, kind in enumerate(cfg.down_block_types):
        for k in range(layers[i]):
            block(ch[max(i - 1, 0)] if k == 0 else ch[i], ch[i], i, kind.startswith("CrossAttn"), depth[i])
        size.add(9 * ch[i] * ch[i] * (i < n - 1), positions(i + 1))  # downsampling
    if getattr(cfg, "mid_block_type", True):
        block(ch[-1], ch[-1], n - 1, True, depth[-1])
        block(ch[-1], ch[-1], n - 1, False)
    for i, kind in enumerate(cfg.up_block_types):
        j = n - 1 - i  # the matching down block
        skips = [ch[j]] * layers[j] + [ch[max(j - 1, 0)]]
        blocks = up_depth[i] if up_depth else depth[j]
        blocks = blocks if isinstance(blocks, list) else [blocks] * len(skips)
        for k, skip in enumerate(skips):
            cin = (ch[min(j + 1, n - 1)] if k == 0 else ch[j]) + skip
            block(cin, ch[j], j, kind.startswith("CrossAttn"), blocks[k])
        size.add(9 * ch[j] * ch[j] * (i < n - 1), positions(j - 1))  # upsampling
    return size


def vae_size(cfg, video: bool = False) -> Size:
    """The Size of an AutoencoderKL, or with `video` of SVD's temporal decoder (a time-mixing resnet after each
    decoder resnet), without MACs: the VAE runs once per image."""
    ch, n, size = list(cfg.block_out_channels), len(cfg.block_out_channels), Size()
    size.add(9 * (cfg.in_channels + cfg.out_channels) * ch[0] + 27 * cfg.latent_channels * ch[-1])
    for i, c in enumerate(ch):
        for k in range(cfg.layers_per_block):  # the encoder's
            size.add(resnet(ch[max(i - 1, 0)] if k == 0 else c, c), layers=1)
        for k in range(cfg.layers_per_block + 1):  # the decoder's
            size.add(resnet(ch[min(i + 1, n - 1)] if k == 0 else c, c) + 6 * c * c * video, layers=1)
        size.add(18 * c * c)  # down- and upsampling
    size.add(4 * resnet(ch[-1], ch[-1]) + 8 * ch[-1] ** 2, layers=6)  # the two mid blocks: 2 resnets, 1 attention each
    return size
