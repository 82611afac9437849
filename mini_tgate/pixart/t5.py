"""T5 v1.1's encoder: PixArt's text encoder, which turns a prompt's token ids into the (N, L,
4096) embeddings the transformer cross-attends to.

Reimplements transformers' `T5EncoderModel` (transformers/models/t5/modeling_t5.py), the encoder
half of Google's T5 v1.1 ("Exploring the Limits of Transfer Learning", Raffel et al.; v1.1:
gated-GELU feed-forward, no dropout, untied head). PixArt-Alpha and -Sigma use T5-v1.1-XXL
(24 layers, d_model 4096, 64 heads of 64, d_ff 10240). Compared to a CLIP/GPT block:

- The norm is RMSNorm: x / sqrt(mean(x^2) + eps) * weight, no mean subtracted, no bias, the
  mean of squares always taken in float32.
- Linear layers have no bias. Attention scores are q @ k^T with *no* 1/sqrt(d) scaling (T5's
  initialisation folds it into the weights).
- There is no position embedding. Instead every attention score gets a learned bias per head
  that depends on the relative distance key - query, bucketed: distances below
  num_buckets/4 get one bucket each, longer ones share log-spaced buckets up to max_distance,
  separately for keys before and after the query. Only layer 0 owns the bias table
  (`relative_attention_bias`); the bias it computes is reused by every layer.
- Padding is an attention mask on the keys: padded keys get the most negative float.
- The feed-forward is gated: wo(gelu_tanh(wi_0 x) * wi_1 x).

Module names follow the checkpoints' keys (`encoder.block.0.layer.0.SelfAttention.q.weight`,
`encoder.block.0.layer.1.DenseReluDense.wi_0.weight`, `encoder.final_layer_norm.weight`,
`shared.weight`), so weights load with a plain strict `load_state_dict`.

Half precision follows transformers exactly: in float16 the feed-forward output projection `wo`
stays in float32 (T5-XXL's activations overflow float16 there), which makes the residual stream
float32 from the first feed-forward on, and hidden states still in float16 are clamped to its
finite range. In bfloat16 every weight is bfloat16.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.weights import PretrainedMixin, read_header, read_tensors, write_json
from .config import T5Config

# The input embedding is stored as `shared.weight` (the table shared with the decoder),
# `encoder.embed_tokens.weight` (the encoder's view of it), or both, depending on how the
# checkpoint was saved. The model holds one table under whichever names the file has.
EMBEDDING_KEYS = ("shared.weight", "encoder.embed_tokens.weight")


@dataclass
class T5EncoderOutput:
    last_hidden_state: torch.Tensor  # (N, L, d_model) after final_layer_norm


def preprocess_prompt(prompt: str) -> str:
    """What diffusers' PixArt pipelines do to a prompt before tokenizing when their caption
    cleaner is not used (`clean_caption=False`, or bs4/ftfy not installed): lower case, outer
    whitespace stripped. The optional caption cleaning (HTML, URLs, ftfy) is not done here."""
    return prompt.lower().strip()


class RMSNorm(nn.Module):
    """transformers' T5LayerNorm."""

    def __init__(self, d: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)  # float32 even for half inputs
        x = x * torch.rsqrt(variance + self.eps)  # float32 (type promotion)
        if self.weight.dtype in (torch.float16, torch.bfloat16):
            x = x.to(self.weight.dtype)
        return self.weight * x


def relative_position_bucket(relative: torch.Tensor, num_buckets: int, max_distance: int) -> torch.Tensor:
    """Bucket of each relative distance (key - query), bidirectional as in T5's encoder: the
    upper half of the buckets is for keys after the query. In each half, distances 0 ..
    exact-1 get their own bucket, longer ones a log-spaced bucket, max_distance and beyond the last."""
    half = num_buckets // 2
    bucket = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    # clamp(min=1) only avoids log(0) for the distances that take the exact branch anyway
    log_bucket = exact + (torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
                          * (half - exact)).long()
    log_bucket = log_bucket.clamp(max=half - 1)
    return bucket + torch.where(distance < exact, distance, log_bucket)


class SelfAttention(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        self.heads, self.d_kv = config.num_heads, config.d_kv
        inner = config.num_heads * config.d_kv
        self.q = nn.Linear(config.d_model, inner, bias=False)
        self.k = nn.Linear(config.d_model, inner, bias=False)
        self.v = nn.Linear(config.d_model, inner, bias=False)
        self.o = nn.Linear(inner, config.d_model, bias=False)
        self.num_buckets = config.relative_attention_num_buckets
        self.max_distance = config.relative_attention_max_distance
        if has_relative_bias:  # layer 0 only
            self.relative_attention_bias = nn.Embedding(self.num_buckets, config.num_heads)

    def position_bias(self, L: int) -> torch.Tensor:
        """(1, heads, L, L): the learned bias of each head for each (query, key) pair."""
        positions = torch.arange(L, device=self.relative_attention_bias.weight.device)
        relative = positions[None, :] - positions[:, None]  # (L, L): key - query
        buckets = relative_position_bucket(relative, self.num_buckets, self.max_distance)
        return self.relative_attention_bias(buckets).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        N, L, _ = x.shape
        q, k, v = (proj(x).view(N, L, self.heads, self.d_kv).transpose(1, 2)  # (N, heads, L, d_kv)
                   for proj in (self.q, self.k, self.v))
        # bias (N or 1, heads, L, L) holds the relative position bias and the padding mask. The
        # fused call computes, with no 1/sqrt(d_kv) scaling:
        #   att = (q @ k.transpose(-2, -1) + bias).softmax(-1)     # (N, heads, L, L)
        #   y = att @ v
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)  # (N, heads, L, d_kv)
        return self.o(y.transpose(1, 2).reshape(N, L, self.heads * self.d_kv))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU's tanh approximation (transformers' "gelu_new"), written out so that in half
    precision every step rounds as transformers' does: F.gelu(x, approximate="tanh") computes
    the same formula in float32 and rounds once, which differs by a rounding in bfloat16."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GatedGeluFeedForward(nn.Module):
    """transformers' T5DenseGatedActDense with gelu_new (GELU's tanh approximation)."""

    def __init__(self, config: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = gelu_tanh(self.wi_0(x)) * self.wi_1(x)  # (N, L, d_ff)
        return self.wo(h.to(self.wo.weight.dtype))  # float32 in float16 models (see the top)


def clamp_float16(x: torch.Tensor) -> torch.Tensor:
    """transformers' guard against float16 overflow: clamp to the finite range (1000 inside it
    once anything overflowed). A no-op for other dtypes."""
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(torch.float16).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return x.clamp(-limit, limit)


class AttentionLayer(nn.Module):  # layer.0 of a block
    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        self.SelfAttention = SelfAttention(config, has_relative_bias)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)


class FeedForwardLayer(nn.Module):  # layer.1 of a block
    def __init__(self, config: T5Config):
        super().__init__()
        self.DenseReluDense = GatedGeluFeedForward(config)
        self.layer_norm = RMSNorm(config.d_model, config.layer_norm_epsilon)


class Block(nn.Module):
    def __init__(self, config: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([AttentionLayer(config, has_relative_bias), FeedForwardLayer(config)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        attn, ff = self.layer
        x = clamp_float16(x + attn.SelfAttention(attn.layer_norm(x), bias))
        return clamp_float16(x + ff.DenseReluDense(ff.layer_norm(x)))


class T5EncoderModel(PretrainedMixin, nn.Module):
    """transformers' T5EncoderModel. `embedding_keys`: the names the input embedding has in the
    checkpoint (see EMBEDDING_KEYS); `from_pretrained` picks them from the file."""

    config_class = T5Config

    def __init__(self, config: T5Config, embedding_keys: tuple[str, ...] = ("shared.weight",)):
        super().__init__()
        if not embedding_keys or not set(embedding_keys) <= set(EMBEDDING_KEYS):
            raise ValueError(f"embedding_keys must be some of {EMBEDDING_KEYS}, got {embedding_keys!r}")
        self.config = config
        embedding = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = nn.ModuleDict(dict(
            block=nn.ModuleList(Block(config, has_relative_bias=i == 0) for i in range(config.num_layers)),
            final_layer_norm=RMSNorm(config.d_model, config.layer_norm_epsilon),
        ))
        # One table; registered under both names when the file stores both (state_dict then
        # lists it twice, load_state_dict fills it twice with the same values).
        if "shared.weight" in embedding_keys:
            self.shared = embedding
        if "encoder.embed_tokens.weight" in embedding_keys:
            self.encoder["embed_tokens"] = embedding

    @property
    def embedding(self) -> nn.Embedding:
        """The input embedding, whichever names it is registered under."""
        return self.encoder["embed_tokens"] if "embed_tokens" in self.encoder else self.shared

    @classmethod
    def for_files(cls, config: T5Config, files: list[Path]):
        """The embedding is registered under whichever of EMBEDDING_KEYS the checkpoint holds
        (read from the files' headers only), so the strict load finds every key it expects."""
        stored = set()
        for f in files:
            if f.is_file():  # a missing shard is reported by load_weights
                stored.update(k for k in read_header(f).tensors if k in EMBEDDING_KEYS)
        return cls(config, tuple(k for k in EMBEDDING_KEYS if k in stored) or ("shared.weight",))

    def after_load(self, files: list[Path], dtype, device):
        """In float16 every `wo` is read again from the file in float32, as transformers keeps it."""
        if dtype == torch.float16:
            for path in files:
                header = read_header(path)
                names = [k for k in header.tensors if k.endswith(".DenseReluDense.wo.weight")]
                for k, w in read_tensors(path, header, names, lambda t: t.float().to(device)).items():
                    self.get_submodule(k.removesuffix(".weight")).weight = nn.Parameter(w, requires_grad=False)
        return self

    def save_pretrained(self, folder) -> None:
        """Write `config.json` and `model.safetensors` as transformers saves a T5EncoderModel
        (the embedding once, as `shared.weight`), in the model's current dtype."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        write_json(folder / "config.json", {**self.config.to_dict(), "architectures": ["T5EncoderModel"],
                                            "is_gated_act": True, "dense_act_fn": "gelu_new"})
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items() if k not in EMBEDDING_KEYS}
        state["shared.weight"] = self.embedding.weight.detach().contiguous()
        save_file(state, folder / "model.safetensors", metadata={"format": "pt"})  # transformers checks "format"

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> T5EncoderOutput:
        """input_ids: (N, L) LongTensor; attention_mask: (N, L), 1 for tokens, 0 for padding."""
        N, L = input_ids.shape
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; "
                             f"input_ids have {tuple(input_ids.shape)}")
        x = self.embedding(input_ids)  # (N, L, d_model)
        blocks = self.encoder.block
        bias = blocks[0].layer[0].SelfAttention.position_bias(L)  # (1, heads, L, L), shared by all layers
        if attention_mask is not None:  # padded keys: the most negative number instead of the bias
            keep = attention_mask.bool()[:, None, None, :]  # (N, 1, 1, L)
            bias = torch.where(keep, bias, torch.finfo(x.dtype).min)  # (N, heads, L, L)
        bias = bias.to(x.dtype)
        for block in blocks:
            x = block(x, bias)
        return T5EncoderOutput(last_hidden_state=self.encoder.final_layer_norm(x))
