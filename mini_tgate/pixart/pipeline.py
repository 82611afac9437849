"""PixArt-Alpha and PixArt-Sigma: a transformer denoiser on T5 text."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..core.bounds import MAX_SEQUENCE_LENGTH, int_in
from ..core.pipeline import DiffusionPipeline
from ..core.schedulers import Scheduler
from ..core.vae import AutoencoderKL
from ..formats.lora import LoraMixin
from ..formats.save import SaveMixin
from .t5 import T5EncoderModel, preprocess_prompt
from .tokenizer import T5Tokenizer
from .transformer import PixArtTransformer2DModel

# PixArt's aspect-ratio bins (diffusers' ASPECT_RATIO_*_BIN, from the PixArt repositories): the
# (height, width) pairs a model of sample_size s was trained at, in units of s / 2 pixels (64 px
# for the 1024 px models), from the widest to the tallest. Sigma's 2048 px model has its own list.
ASPECT_RATIO_BINS = ((8, 32), (8, 29), (9, 28), (9, 27), (9, 26), (10, 25), (10, 24), (11, 23), (11, 22),
                     (11, 21), (12, 21), (12, 20), (13, 19), (13, 18), (14, 18), (14, 17), (15, 17), (15, 16),
                     (16, 16), (16, 15), (17, 15), (17, 14), (18, 14), (18, 13), (19, 13), (20, 12), (21, 12),
                     (22, 11), (23, 11), (24, 10), (25, 10), (27, 9), (32, 8))
ASPECT_RATIO_BINS_2048 = ((8, 32), (8, 31), (8, 30), (8, 29), (9, 28), (9, 27), (9, 26), (10, 25), (10, 24),
                          (11, 23), (11, 22), (11, 21), (12, 21), (12, 20), (13, 19), (13, 18), (14, 18), (14, 17),
                          (15, 17), (15, 16), (16, 16), (16, 15), (17, 15), (17, 14), (18, 14), (18, 13), (19, 13),
                          (20, 12), (21, 12), (22, 11), (23, 11), (24, 10), (25, 10), (26, 9), (27, 9), (28, 9),
                          (29, 8), (30, 8), (31, 8), (32, 8))


def aspect_ratio_bin(height: int, width: int, bins, unit: int) -> tuple[int, int]:
    """The bin whose ratio, rounded to 2 decimals (diffusers' keys), is nearest height / width;
    the first such bin on a tie."""
    h, w = min(bins, key=lambda hw: abs(round(hw[0] / hw[1], 2) - height / width))
    return h * unit, w * unit


class PixArtAlphaPipeline(LoraMixin, SaveMixin, DiffusionPipeline):
    """PixArt-Alpha: a transformer (DiT) denoiser on T5 text (diffusers' PixArtAlphaPipeline).

    The prompt is lower-cased and stripped (diffusers' caption cleaning with bs4/ftfy is not done),
    tokenized to max_sequence_length tokens and encoded by T5 with its padding mask; the mask goes
    to the transformer's cross-attention. With micro-conditions (Alpha at 1024 px) the working
    resolution and aspect ratio condition the timestep embedding. With use_resolution_binning the
    size asked for is replaced by the nearest trained aspect-ratio bin, and the images are resized
    and centre-cropped back to it. The learned-sigma half of the transformer's output is dropped."""

    model_index_names = ("PixArtAlphaPipeline",)
    default_steps = 20
    default_guidance_scale = 4.5
    max_sequence_length = 120  # Alpha's T5 text length; Sigma's is 300
    bin_tables = {32: ASPECT_RATIO_BINS, 64: ASPECT_RATIO_BINS, 128: ASPECT_RATIO_BINS}  # by sample_size
    extra_call_args = ("max_sequence_length", "use_resolution_binning", "prompt_attention_mask",
                       "negative_prompt_attention_mask")

    def __init__(self, transformer: PixArtTransformer2DModel, vae: AutoencoderKL, text_encoder: T5EncoderModel,
                 tokenizer: T5Tokenizer, scheduler: Scheduler):
        super().__init__(vae, text_encoder, tokenizer, scheduler)
        self.transformer = transformer

    @classmethod
    def load_components(cls, folder: Path, index: dict, kw: dict) -> dict:
        # (Alpha checkpoints name the transformer's class Transformer2DModel)
        return dict(transformer=PixArtTransformer2DModel.from_pretrained(folder, subfolder="transformer", **kw),
                    text_encoder=T5EncoderModel.from_pretrained(folder, subfolder="text_encoder", **kw),
                    tokenizer=T5Tokenizer.from_pretrained(folder, subfolder="tokenizer"))

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.transformer

    @property
    def text_width(self) -> int:
        return self.transformer.config.caption_channels or self.transformer.config.cross_attention_dim

    def working_size(self, height, width, conditioning):
        if not conditioning.pop("use_resolution_binning", True):
            return height, width, None
        sample_size = self.transformer.config.sample_size
        if sample_size not in self.bin_tables:
            raise ValueError(f"use_resolution_binning: no aspect-ratio bins for sample_size {sample_size} "
                             f"(there are for {', '.join(map(str, self.bin_tables))}); pass "
                             "use_resolution_binning=False")
        unit = sample_size * self.vae_scale_factor // 16
        return (*aspect_ratio_bin(height, width, self.bin_tables[sample_size], unit), (height, width))

    def check_embeddings(self, n_prompts, prompt_embeds, negative_prompt_embeds, conditioning):
        """Attention masks come with their embeddings, of their (batch, tokens); max_sequence_length
        is bounded."""
        for embeds, name, mask in ((prompt_embeds, "prompt_embeds", "prompt_attention_mask"),
                                   (negative_prompt_embeds, "negative_prompt_embeds", "negative_prompt_attention_mask")):
            x = conditioning.get(mask)
            if (embeds is None) != (x is None):
                raise ValueError(f"give {mask} with {name} (diffusers' rule), or neither")
            if x is not None and (not isinstance(x, torch.Tensor) or tuple(x.shape) != tuple(embeds.shape[:2])):
                got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
                raise ValueError(f"{mask} must be a tensor of shape {tuple(embeds.shape[:2])} (1 for tokens, "
                                 f"0 for padding), got {got}")
        n = conditioning.get("max_sequence_length", self.max_sequence_length)
        if not int_in(n, 1, MAX_SEQUENCE_LENGTH):
            raise ValueError(f"max_sequence_length must be an integer from 1 to {MAX_SEQUENCE_LENGTH}, got {n!r}")

    def encode_prompt(self, prompts, negatives, cfg, height, width, device, prompt_embeds=None,
                      negative_prompt_embeds=None, clip_skip=None, max_sequence_length=None,
                      prompt_attention_mask=None, negative_prompt_attention_mask=None):
        """Transformer conditioning: T5 states, their padding mask, and (with micro-conditions) the
        working resolution and aspect ratio. Negative prompts are padded to the prompts' length."""
        def embed(texts, length):
            texts = [preprocess_prompt(t) for t in texts]
            for text, dropped in zip(texts, self.tokenizer.dropped_text(texts, length)):
                if dropped:
                    warnings.warn(f"prompt longer than {length} tokens; this part was dropped: {dropped!r}")
            ids, mask = self.tokenizer(texts, max_length=length)
            ids, mask = ids.to(device), mask.to(device)
            return self.text_encoder(ids, attention_mask=mask).last_hidden_state, mask  # (B, L, 4096), (B, L)

        if prompt_embeds is None:
            prompt_embeds, prompt_attention_mask = embed(prompts, max_sequence_length or self.max_sequence_length)
        batch = prompt_embeds.shape[0]
        added = {}
        if self.transformer.config.additional_conditions:
            added = {"added_cond_kwargs": {
                "resolution": torch.tensor([[height, width]]).to(device, self.dtype).repeat(batch, 1),
                "aspect_ratio": torch.tensor([[height / width]]).to(device, self.dtype).repeat(batch, 1)}}

        def conditioning(states, mask):
            return {"encoder_hidden_states": states.to(device, self.dtype),
                    "encoder_attention_mask": mask.to(device), **added}

        cond = conditioning(prompt_embeds, prompt_attention_mask)
        if not cfg:
            return cond, None
        if negative_prompt_embeds is None:
            negative_prompt_embeds, negative_prompt_attention_mask = embed(negatives or [""] * batch,
                                                                           prompt_embeds.shape[1])
        return cond, conditioning(negative_prompt_embeds, negative_prompt_attention_mask)


class PixArtSigmaPipeline(PixArtAlphaPipeline):
    """PixArt-Sigma: Alpha's pipeline with 300 T5 tokens and bins up to 2048 px (its transformer
    has no micro-conditions and its VAE is SDXL's, both read from the checkpoint)."""

    model_index_names = ("PixArtSigmaPipeline",)
    max_sequence_length = 300
    bin_tables = {**PixArtAlphaPipeline.bin_tables, 256: ASPECT_RATIO_BINS_2048}
