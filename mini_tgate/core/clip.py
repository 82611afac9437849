"""CLIP's text encoder: a causal pre-norm transformer that turns token ids into the prompt
embeddings the UNet attends to.

Reimplements transformers' `CLIPTextModel` and `CLIPTextModelWithProjection`
(transformers/models/clip/modeling_clip.py), the text tower of OpenAI's CLIP
(`clip/model.py`, `CLIP.encode_text`). SD-1.x uses OpenAI's ViT-L/14 text encoder, SD-2.x
OpenCLIP's ViT-H/14 one; SDXL uses ViT-L/14 and, as `text_encoder_2`, OpenCLIP's ViT-bigG/14
with its projection, whose `text_embeds` become SDXL's pooled prompt embedding.

Module names follow the checkpoints' keys (`text_model.encoder.layers.0.self_attn.q_proj.weight`,
..., `text_projection.weight`), so weights load with a plain strict `load_state_dict`. The
model has no buffers: position ids and the causal mask are made in `forward`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import CLIPTextConfig
from .weights import PretrainedMixin


@dataclass
class CLIPTextOutput:
    last_hidden_state: torch.Tensor  # (B, T, D): the last layer's output after final_layer_norm
    pooler_output: torch.Tensor  # (B, D): last_hidden_state at each sequence's EOS token
    hidden_states: tuple[torch.Tensor, ...] | None = None  # embeddings, then each layer's output
    text_embeds: torch.Tensor | None = None  # (B, projection_dim): text_projection(pooler_output)

    def __getitem__(self, i):
        """transformers' indexing of its outputs, as scripts use it (`text_encoder(ids)[0]`): the
        fields set, in transformers' order (CLIPTextModelWithProjection's puts text_embeds first)."""
        order = ((self.text_embeds, self.last_hidden_state, self.hidden_states) if self.text_embeds is not None
                 else (self.last_hidden_state, self.pooler_output, self.hidden_states))
        return tuple(v for v in order if v is not None)[i]


class Attention(nn.Module):
    def __init__(self, config: CLIPTextConfig, causal: bool = True):
        super().__init__()
        d = config.hidden_size
        self.heads, self.causal = config.num_attention_heads, causal  # the image encoder (svd/) has no mask
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = (proj(x).view(B, T, self.heads, D // self.heads).transpose(1, 2)  # (B, heads, T, head_dim)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        # Causal: token t sees tokens 0..t only. The fused call computes
        #   att = q @ k.transpose(-2, -1) / sqrt(head_dim)        # (B, heads, T, T)
        #   att = att.masked_fill(upper triangle above the diagonal, -inf).softmax(-1)  # (causal only)
        #   y = att @ v
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # (B, heads, T, head_dim)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.quick = config.hidden_act == "quick_gelu"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(x)
        # quick_gelu, OpenAI's sigmoid approximation of GELU (SD-1.x); gelu, exact erf GELU (OpenCLIP).
        x = x * torch.sigmoid(1.702 * x) if self.quick else F.gelu(x)
        return self.fc2(x)


class EncoderLayer(nn.Module):
    def __init__(self, config: CLIPTextConfig, causal: bool = True):
        super().__init__()
        self.self_attn = Attention(config, causal)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPTextModel(PretrainedMixin, nn.Module):
    """transformers' CLIPTextModel, or CLIPTextModelWithProjection when `config.with_projection`."""

    config_class = CLIPTextConfig

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.text_model = nn.ModuleDict(dict(
            embeddings=nn.ModuleDict(dict(
                token_embedding=nn.Embedding(config.vocab_size, d),
                position_embedding=nn.Embedding(config.max_position_embeddings, d),
            )),
            encoder=nn.ModuleDict(dict(layers=nn.ModuleList(
                EncoderLayer(config) for _ in range(config.num_hidden_layers)))),
            final_layer_norm=nn.LayerNorm(d, eps=config.layer_norm_eps),
        ))
        self.text_projection = nn.Linear(d, config.projection_dim, bias=False) if config.with_projection else None

    def forward(self, input_ids: torch.Tensor, output_hidden_states: bool = False) -> CLIPTextOutput:
        """input_ids: (B, T) LongTensor, T <= max_position_embeddings, each row holding an EOS."""
        tm = self.text_model
        B, T = input_ids.shape
        if T > self.config.max_position_embeddings:
            raise ValueError(f"input_ids hold {T} tokens; this text encoder has "
                             f"{self.config.max_position_embeddings} positions")
        positions = torch.arange(T, device=input_ids.device)
        x = tm.embeddings.token_embedding(input_ids) + tm.embeddings.position_embedding(positions)  # (B, T, D)
        hidden_states = [x]
        for layer in tm.encoder.layers:
            x = layer(x)
            hidden_states.append(x)
        x = tm.final_layer_norm(x)

        # The pooled output is the final state at the EOS token (the only one that has seen the
        # whole prompt). Configs saved before transformers 4.31 carry eos_token_id == 2, a
        # placeholder: there the EOS is the highest id in the row (49407 in CLIP's vocabulary).
        # Otherwise it is the first position holding eos_token_id (the padding may repeat it).
        if self.config.eos_token_id == 2:
            eos = input_ids.argmax(dim=-1)
        else:
            eos = (input_ids == self.config.eos_token_id).int().argmax(dim=-1)  # argmax: first max
        pooled = x[torch.arange(B, device=x.device), eos]  # (B, D)

        return CLIPTextOutput(
            last_hidden_state=x,
            pooler_output=pooled,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            text_embeds=self.text_projection(pooled) if self.text_projection is not None else None,
        )
