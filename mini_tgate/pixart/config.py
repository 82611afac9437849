"""Configurations of the PixArt transformer and the T5 encoder, read from their config.json."""

from __future__ import annotations

from dataclasses import dataclass

from ..core.bounds import MAX_LAYERS, is_int, is_number
from ..core.config import ConfigError, Size, _FromDict


@dataclass
class PixArtTransformerConfig(_FromDict):
    """diffusers' PixArtTransformer2DModel (transformer/config.json of PixArt-Alpha and -Sigma).

    PixArt-Alpha checkpoints name the class `Transformer2DModel` (diffusers' older generic class)
    and carry its extra keys (`only_cross_attention`, `double_self_attention`, `num_vector_embeds`,
    `use_linear_projection`); at their defaults they change nothing here, other values are refused.
    Two settings are derived when the config leaves them null, as diffusers derives them:
    `use_additional_conditions` is on exactly when sample_size == 128, and `interpolation_scale`
    is max(sample_size // 64, 1). See `additional_conditions` and `pos_interpolation`.
    """

    component = "transformer"

    num_attention_heads: int = 16
    attention_head_dim: int = 72  # per-head width (no quirk here: it is the width)
    in_channels: int = 4
    out_channels: int | None = 8  # 8: noise and variance (learned sigma); None: in_channels
    num_layers: int = 28
    dropout: float = 0.0  # training only
    norm_num_groups: int = 32  # unused by this architecture, kept for the key
    cross_attention_dim: int | None = 1152  # width of the text tokens seen by cross-attention
    attention_bias: bool = True  # biases on to_q / to_k / to_v
    sample_size: int = 128  # latent size the model was trained at (1024 px / 8)
    patch_size: int = 2
    activation_fn: str = "gelu-approximate"
    num_embeds_ada_norm: int | None = 1000
    upcast_attention: bool = False
    norm_type: str = "ada_norm_single"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    interpolation_scale: float | None = None  # position-embedding scale; None: derived (above)
    use_additional_conditions: bool | None = None  # resolution / aspect-ratio micro-conditions
    caption_channels: int | None = None  # text encoder width (T5-XXL: 4096); None: no projection
    attention_type: str | None = "default"
    only_cross_attention: bool = False     # Transformer2DModel keys (PixArt-Alpha configs)
    double_self_attention: bool = False
    num_vector_embeds: int | None = None
    use_linear_projection: bool = False    # deprecated in diffusers, no effect on PixArt

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def additional_conditions(self) -> bool:
        if self.use_additional_conditions is None:
            return self.sample_size == 128
        return bool(self.use_additional_conditions)

    @property
    def pos_interpolation(self) -> float:
        if self.interpolation_scale is None:
            return max(self.sample_size // 64, 1)
        return self.interpolation_scale

    def check(self):
        expected = {"norm_type": "ada_norm_single", "activation_fn": "gelu-approximate",
                    "attention_type": "default", "only_cross_attention": False,
                    "double_self_attention": False, "num_vector_embeds": None}
        for name, value in expected.items():
            if getattr(self, name) != value:
                raise ConfigError(f"transformer config {name}={getattr(self, name)!r} is not supported "
                                  f"(PixArt uses {value!r})")
        for name in ("num_attention_heads", "attention_head_dim", "in_channels", "num_layers",
                     "sample_size", "patch_size", "num_embeds_ada_norm"):
            value = getattr(self, name)
            if not (is_int(value) and value >= 1):
                raise ConfigError(f"transformer config {name} must be a positive integer, got {value!r}")
        self.require("num_layers", high=MAX_LAYERS)
        if self.sample_size < self.patch_size:
            raise ConfigError(f"transformer config sample_size={self.sample_size} is smaller than "
                              f"patch_size={self.patch_size}")
        if self.cross_attention_dim is None:
            raise ConfigError("transformer config cross_attention_dim=None (no text conditioning) is not supported")
        if self.caption_channels is not None and self.cross_attention_dim != self.inner_dim:
            raise ConfigError(f"transformer config cross_attention_dim={self.cross_attention_dim} must equal "
                              f"num_attention_heads * attention_head_dim = {self.inner_dim} when "
                              "caption_channels projects the text to that width")
        if self.inner_dim % 4:  # the 2-D sin/cos embedding splits the width in halves of sin/cos pairs
            raise ConfigError(f"transformer width {self.inner_dim} (heads * head_dim) must be a multiple of 4")
        if self.additional_conditions and self.inner_dim % 3:  # timestep + resolution (2/3) + aspect ratio (1/3)
            raise ConfigError(f"transformer width {self.inner_dim} must be a multiple of 3 with "
                              "use_additional_conditions (resolution and aspect-ratio embeddings)")
        if not (is_number(self.pos_interpolation) and self.pos_interpolation > 0):
            raise ConfigError(f"transformer config interpolation_scale must be positive, got {self.interpolation_scale!r}")
        d, p, n = self.inner_dim, self.patch_size, self.num_layers
        tokens, size = (self.sample_size // p) ** 2, Size()
        size.add((self.in_channels + (self.out_channels or self.in_channels)) * p * p * d, tokens)  # patches in and out
        size.add(256 * d + 7 * d * d + ((self.caption_channels or 0) + d) * d)  # timestep, adaLN, caption projection
        block = 14 * d * d + 2 * d * self.cross_attention_dim  # attention, cross-attention, MLP (x4)
        size.add(n * block, tokens, layers=n, attention=2 * n * tokens ** 2 * d)
        self.check_size(size)


@dataclass
class T5Config(_FromDict):
    """transformers' T5Config (text_encoder/config.json of PixArt: T5-v1.1-XXL's encoder).

    Defaults are T5-v1.1-XXL's. Only the encoder of T5 v1.1 (and mT5, the same architecture) is
    built: `feed_forward_proj` must be "gated-gelu" (v1.0's "relu" feed-forward has other
    weights, `wi` instead of `wi_0`/`wi_1`). Decoder and training keys (num_decoder_layers,
    dropout_rate, ...) are ignored.
    """

    component = "text encoder"

    vocab_size: int = 32128  # the embedding's rows (32000 pieces + 100 <extra_id_N> + padding)
    d_model: int = 4096  # width of the residual stream
    d_kv: int = 64  # per-head width (heads * d_kv need not equal d_model)
    d_ff: int = 10240  # feed-forward width
    num_layers: int = 24
    num_heads: int = 64
    relative_attention_num_buckets: int = 32  # relative-position buckets (half per direction)
    relative_attention_max_distance: int = 128  # distances from here on share the last bucket
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    model_type: str = "t5"
    architectures: list | None = None

    def check(self):
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_heads", "relative_attention_max_distance"):
            self.require(name)
        self.require("num_layers", high=MAX_LAYERS)
        self.require("relative_attention_num_buckets", low=4)  # 2 directions, each exact + log-spaced
        exact = self.relative_attention_num_buckets // 4  # distances below this get a bucket each
        if self.relative_attention_max_distance <= exact:
            raise ConfigError(f"text encoder relative_attention_max_distance={self.relative_attention_max_distance} "
                              f"must exceed relative_attention_num_buckets // 4 = {exact}")
        if self.layer_norm_epsilon < 0:
            raise ConfigError(f"text encoder layer_norm_epsilon={self.layer_norm_epsilon} must not be negative")
        if self.feed_forward_proj != "gated-gelu":
            raise ConfigError(f"text encoder feed_forward_proj={self.feed_forward_proj!r} is not supported "
                              "(T5 v1.1, PixArt's text encoder, uses 'gated-gelu')")
        inner = self.num_heads * self.d_kv
        self.check_size(Size(self.vocab_size * self.d_model + self.num_layers * (4 * self.d_model * inner
                                                                               + 3 * self.d_model * self.d_ff),
                             layers=self.num_layers))
        if self.model_type not in ("t5", "mt5"):
            raise ConfigError(f"text encoder model_type={self.model_type!r} is not supported "
                              "(T5 v1.1 encoders: 't5' or 'mt5')")
