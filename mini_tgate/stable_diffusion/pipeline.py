"""Stable Diffusion 1.x/2.x (and LCM) and SDXL: CLIP text encoders and a UNet."""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

from ..core.clip import CLIPTextModel
from ..core.inputs import SDXL_CALLBACK_INPUTS, as_list, check_embeds, check_loading_args
from ..core.pipeline import DiffusionPipeline
from ..core.schedulers import Scheduler
from ..core.tokenizer import CLIPTokenizer
from ..core.unet import UNet2DConditionModel
from ..core.vae import AutoencoderKL
from ..core.weights import CheckpointError, resolve
from ..formats.emphasis import chunk_count, emphasize, warn_literal, weighted_tokens
from ..formats.lora import LoraMixin, call_scale
from ..formats.save import SaveMixin
from ..formats.single_file import is_single_file, read_single_file


class StableDiffusionPipeline(LoraMixin, SaveMixin, DiffusionPipeline):
    """SD 1.x / 2.x text-to-image (and LCM, whose UNet takes guidance as an embedding)."""

    model_index_names = ("StableDiffusionPipeline", "LatentConsistencyModelPipeline")
    also_loads = ("StableDiffusionImg2ImgPipeline", "LatentConsistencyModelImg2ImgPipeline")
    default_strength = 0.8
    extra_call_args = ("emphasis", "cross_attention_kwargs")  # A1111's prompt emphasis; diffusers' LoRA scale

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, scheduler: Scheduler):
        super().__init__(vae, text_encoder, tokenizer, scheduler)
        self.unet = unet

    @classmethod
    def from_pretrained(cls, source, device="cpu", dtype: torch.dtype | None = None, variant: str | None = None,
                        local_files_only: bool = False, cache_dir=None, revision: str | None = None,
                        torch_dtype: torch.dtype | None = None, prediction_type: str | None = None, **kwargs):
        """A diffusers folder or hub repo (DiffusionPipeline.from_pretrained), or one LDM-layout
        `.safetensors` file (from_single_file, with `prediction_type` where the file cannot tell).
        kwargs: diffusers' harmless loading arguments (use_safetensors, safety_checker=None, ...)."""
        if is_single_file(source):
            if variant is not None or revision is not None:
                raise ValueError(f"{source}: variant and revision are for diffusers folders and hub repos, not one file")
            return cls.from_single_file(source, device, dtype, prediction_type, torch_dtype=torch_dtype, **kwargs)
        if prediction_type is not None:
            raise ValueError("prediction_type is for single-file checkpoints; a diffusers folder's scheduler config sets it")
        return super().from_pretrained(source, device, dtype, variant, local_files_only, cache_dir, revision,
                                       torch_dtype, **kwargs)

    @classmethod
    def from_single_file(cls, path, device="cpu", dtype: torch.dtype | None = None, prediction_type: str | None = None,
                         config=None, torch_dtype: torch.dtype | None = None, local_files_only: bool = False,
                         **kwargs):
        """The pipeline of one LDM-layout `.safetensors` file (A1111, ComfyUI) of this class's kind;
        `config`: a diffusers folder or hub repo whose configs and tokenizers replace the presets, as
        in diffusers (None: the presets of the file's kind). See formats/single_file.py. kwargs:
        diffusers' harmless loading arguments (use_safetensors, safety_checker=None, ...)."""
        check_loading_args(f"{cls.__name__}.from_single_file", kwargs)
        config = None if config is None else resolve(config, local_files_only=local_files_only)
        _, parts = read_single_file(path, device, dtype, prediction_type, config, torch_dtype,
                                    cls.model_index_names + cls.also_loads)
        pipe = cls(**parts)
        pipe.model_info = {"name": Path(path).name, "folder": Path(path).expanduser(), "revision": None}
        return pipe

    @classmethod
    def load_components(cls, folder: Path, index: dict, kw: dict) -> dict:
        tokenizer, text_encoder = text_parts(folder, "", kw)
        return dict(unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw),
                    text_encoder=text_encoder, tokenizer=tokenizer)

    @property
    def denoiser(self) -> torch.nn.Module:
        """The model the denoising loop calls: the UNet here, PixArt's transformer there."""
        return self.unet

    def as_tuple(self, out) -> tuple:
        """return_dict=False: diffusers' SD returns (images, has_nsfw_concept), None without a safety checker."""
        return out.images, None

    @property
    def text_width(self) -> int:
        """The features per token of the text conditioning (the UNet's cross_attention_dim)."""
        width = self.unet.config.cross_attention_dim
        return width if isinstance(width, int) else width[0]

    def tokenize(self, tokenizer: CLIPTokenizer, prompts: list[str], device) -> torch.Tensor:
        for prompt, dropped in zip(prompts, tokenizer.dropped_text(prompts)):
            if dropped:
                warnings.warn(f"prompt longer than {tokenizer.model_max_length} tokens; "
                              f"this part was dropped: {dropped!r}")
        return tokenizer(prompts).to(device)

    def encode_prompt(self, prompts: list[str] | None, negatives: list[str] | None, cfg: bool, height: int,
                      width: int, device, prompt_embeds=None, negative_prompt_embeds=None,
                      clip_skip: int | None = None, emphasis: bool = False,
                      cross_attention_kwargs: dict | None = None) -> tuple[dict, dict | None]:
        """UNet conditioning of the prompts and, with CFG, of the negative prompts ("" when none);
        embeddings given are used as they are. clip_skip (diffusers'): the text encoder's state
        clip_skip layers before the last, then its final layer norm; as in diffusers, it applies to
        the prompts only, not to the negative prompts. emphasis: A1111's prompt emphasis
        (formats/emphasis.py); cross_attention_kwargs: {"scale": s}, the LoRAs' scale (diffusers')."""
        batch = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        negatives = (negatives or [""] * batch) if cfg and negative_prompt_embeds is None else None
        chunks = self.prompt_options(emphasis, cross_attention_kwargs, [prompts, negatives], [self.tokenizer])

        def embed(texts, skip=None):
            def state(out):
                if skip is None:
                    return out.last_hidden_state
                return self.text_encoder.text_model.final_layer_norm(out.hidden_states[-(skip + 1)])
            return self.text_states(self.tokenizer, self.text_encoder, texts, device, chunks, state)[0]

        states = embed(prompts, clip_skip) if prompt_embeds is None else prompt_embeds
        cond = {"encoder_hidden_states": states.to(device, self.dtype)}  # (B, 77 x chunks, D)
        if not cfg:
            return cond, None
        if negative_prompt_embeds is None:
            negative_prompt_embeds = same_tokens(embed(negatives), states)
        return cond, {"encoder_hidden_states": negative_prompt_embeds.to(device, self.dtype)}

    def prompt_options(self, emphasis, cross_attention_kwargs, texts: list, tokenizers: list) -> int | None:
        """Checks emphasis and merges the LoRAs at the call's scale (formats/lora.py's call_scale).
        Returns the chunks of 75 tokens each prompt is encoded in with emphasis (the most any of
        `texts` needs), None without (then a text holding emphasis syntax gets a warning)."""
        if not isinstance(emphasis, bool):
            raise TypeError(f"emphasis must be True or False, got {emphasis!r:.40}")
        texts = [t for group in texts if group is not None for t in group]
        chunks = chunk_count(tokenizers, texts) if emphasis else None
        if not emphasis:
            warn_literal(texts)
        call_scale(self, cross_attention_kwargs)
        return chunks

    def text_states(self, tokenizer, encoder, texts: list[str], device, chunks: int | None, state):
        """`state(output)` of the text encoder for the prompts, and its output (with emphasis, of the
        first chunk): the prompts cut to model_max_length tokens (with a warning; chunks None), or
        in `chunks` chunks with A1111's emphasis, their states side by side (B, 77 x chunks, D)."""
        if chunks is None:
            out = encoder(self.tokenize(tokenizer, texts, device), output_hidden_states=True)
            return state(out), out
        ids, weights = weighted_tokens(tokenizer, texts, chunks)
        outs = [encoder(ids[:, i].to(device), output_hidden_states=True) for i in range(chunks)]
        return torch.cat([emphasize(state(out), weights[:, i]) for i, out in enumerate(outs)], dim=1), outs[0]


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    """SDXL: two text encoders, pooled text and image-size conditioning through `time_ids`."""

    model_index_names = ("StableDiffusionXLPipeline",)
    also_loads = ("StableDiffusionXLImg2ImgPipeline",)
    default_guidance_scale = 5.0
    default_strength = 0.3
    extra_call_args = ("prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds",
                       "original_size", "target_size", "crops_coords_top_left", "emphasis", "cross_attention_kwargs")
    extra_callback_inputs = SDXL_CALLBACK_INPUTS

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, text_encoder_2: CLIPTextModel,
                 tokenizer_2: CLIPTokenizer, force_zeros_for_empty_prompt: bool = True):
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @classmethod
    def load_components(cls, folder: Path, index: dict, kw: dict) -> dict:
        tokenizer_2, text_encoder_2 = text_parts(folder, "_2", kw)
        return dict(super().load_components(folder, index, kw), text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                    force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True))

    def check_embeddings(self, n_prompts, prompt_embeds, negative_prompt_embeds, conditioning):
        """Pooled embeddings come with their embeddings, one row per prompt; prompt_2 and
        negative_prompt_2 are one prompt or one per prompt."""
        for embeds, name, pooled in ((prompt_embeds, "prompt_embeds", "pooled_prompt_embeds"),
                                     (negative_prompt_embeds, "negative_prompt_embeds", "negative_pooled_prompt_embeds")):
            x = conditioning.get(pooled)
            if (embeds is None) != (x is None):
                raise ValueError(f"give {pooled} with {name} (diffusers' rule), or neither")
            if x is not None:
                check_embeds(x, pooled, 2)
                if x.shape[0] != n_prompts:
                    raise ValueError(f"{pooled} must have {n_prompts} rows (one per prompt), got {tuple(x.shape)}")
        for name in ("prompt_2", "negative_prompt_2"):
            if conditioning.get(name) is not None and len(as_list(conditioning[name], name)) not in (1, n_prompts):
                raise ValueError(f"{name} must be one prompt or one per prompt ({n_prompts})")

    def text_encoders(self) -> list:
        return [self.text_encoder, self.text_encoder_2]

    def as_tuple(self, out) -> tuple:
        """return_dict=False: diffusers' SDXL returns (images,)."""
        return (out.images,)

    def encode_prompt(self, prompts, negatives, cfg, height, width, device, prompt_embeds=None,
                      negative_prompt_embeds=None, clip_skip=None, prompt_2=None, negative_prompt_2=None,
                      pooled_prompt_embeds=None, negative_pooled_prompt_embeds=None, original_size=None,
                      target_size=None, crops_coords_top_left=(0, 0), emphasis=False, cross_attention_kwargs=None):
        """prompt_2 / negative_prompt_2 go to the second text encoder (default: the same texts).
        clip_skip picks an earlier state than the penultimate one, for the prompts only (diffusers).
        emphasis applies to both text encoders, each rescaled on its own (A1111's SDXL)."""
        def embed(texts, texts_2, skip=0):  # both encoders' penultimate states side by side; pooled from the second
            states, pooled = [], None
            for tokenizer, encoder, t in ((self.tokenizer, self.text_encoder, texts),
                                          (self.tokenizer_2, self.text_encoder_2, texts_2)):
                s, out = self.text_states(tokenizer, encoder, t, device, chunks,
                                          lambda out: out.hidden_states[-(skip + 2)])
                states.append(s)
                pooled = out.text_embeds
            return torch.cat(states, dim=-1), pooled  # (B, 77 x chunks, 768+1280), (B, 1280)

        def second(texts, first):  # prompt_2: one text for all, one per prompt, or the first texts
            texts = first if texts is None else as_list(texts, "prompt_2")
            return texts * len(first) if len(texts) == 1 else texts

        encoded = [prompts, prompt_2 and as_list(prompt_2, "prompt_2")] if prompt_embeds is None else []
        if cfg and negative_prompt_embeds is None:
            encoded += [negatives, negative_prompt_2 and as_list(negative_prompt_2, "negative_prompt_2")]
        chunks = self.prompt_options(emphasis, cross_attention_kwargs, encoded, [self.tokenizer, self.tokenizer_2])
        if prompt_embeds is None:
            prompt_embeds, pooled_prompt_embeds = embed(prompts, second(prompt_2, prompts), clip_skip or 0)
        batch = prompt_embeds.shape[0]
        # time ids: (original size, crop top-left, target size), SDXL's micro-conditioning
        sizes = (*(original_size or (height, width)), *crops_coords_top_left, *(target_size or (height, width)))
        time_ids = torch.tensor([sizes], dtype=self.dtype, device=device).repeat(batch, 1)
        expected = self.unet.config.projection_class_embeddings_input_dim
        got = 6 * self.unet.config.addition_time_embed_dim + self.text_encoder_2.config.projection_dim
        if got != expected:
            raise ValueError(f"the UNet expects {expected} pooled+time features, the text encoder gives {got}")

        def conditioning(states, pooled):
            return {"encoder_hidden_states": states.to(device, self.dtype),
                    "added_cond_kwargs": {"text_embeds": pooled.to(device, self.dtype), "time_ids": time_ids}}

        cond = conditioning(prompt_embeds, pooled_prompt_embeds)
        if not cfg:
            return cond, None
        if negative_prompt_embeds is None:
            if negatives is None and self.force_zeros_for_empty_prompt:
                negative_prompt_embeds = torch.zeros_like(prompt_embeds)
                negative_pooled_prompt_embeds = torch.zeros_like(pooled_prompt_embeds)
            else:
                negatives = negatives or [""] * batch
                negative_prompt_embeds, negative_pooled_prompt_embeds = embed(
                    negatives, second(negative_prompt_2, negatives))
                same_tokens(negative_prompt_embeds, prompt_embeds)
        return cond, conditioning(negative_prompt_embeds, negative_pooled_prompt_embeds)


class Img2ImgMixin:
    """diffusers' img2img classes: the same pipeline, whose call takes (prompt, image, strength)
    first and needs the image (img2img through image=, see DiffusionPipeline.__call__)."""

    def __call__(self, prompt=None, image=None, strength: float | None = None, **kwargs):
        if image is None:
            text_to_image = next(c for c in type(self).__mro__ if not issubclass(c, Img2ImgMixin))
            raise ValueError(f"{type(self).__name__} needs image= (the image to start from); for text to image "
                             f"use {text_to_image.__name__}")
        return super().__call__(prompt, image=image, strength=strength, **kwargs)


class StableDiffusionImg2ImgPipeline(Img2ImgMixin, StableDiffusionPipeline):
    """diffusers' StableDiffusionImg2ImgPipeline (and LCM's): StableDiffusionPipeline with image=
    required. Loads an img2img folder or a text-to-image one, as diffusers does."""

    model_index_names = ("StableDiffusionImg2ImgPipeline", "LatentConsistencyModelImg2ImgPipeline")
    also_loads = StableDiffusionPipeline.model_index_names


class StableDiffusionXLImg2ImgPipeline(Img2ImgMixin, StableDiffusionXLPipeline):
    """diffusers' StableDiffusionXLImg2ImgPipeline on a base model's folder (no refiner's aesthetic
    score, no denoising_start): StableDiffusionXLPipeline with image= required."""

    model_index_names = ("StableDiffusionXLImg2ImgPipeline",)
    also_loads = StableDiffusionXLPipeline.model_index_names


def same_tokens(negative: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
    """The negative prompts' states, checked to have as many tokens as the prompts' (emphasis
    pads every prompt it encodes to the same chunks; embeddings given may have other lengths)."""
    if negative.shape[1] != states.shape[1]:
        raise ValueError(f"the negative prompts give {negative.shape[1]} tokens of conditioning and the prompts "
                         f"{states.shape[1]} (emphasis encodes 77 per chunk of 75 tokens): give both as text, or "
                         "negative_prompt_embeds too")
    return negative


def text_parts(folder: Path, suffix: str, kw: dict) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """A tokenizer and its text encoder (`tokenizer{suffix}/`, `text_encoder{suffix}/`), checked to fit each other."""
    tokenizer = CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer" + suffix)
    encoder = CLIPTextModel.from_pretrained(folder, subfolder="text_encoder" + suffix, **kw)
    positions = encoder.config.max_position_embeddings
    if tokenizer.model_max_length > positions:
        raise CheckpointError(f"{folder / ('tokenizer' + suffix)}: model_max_length {tokenizer.model_max_length} "
                              f"is more than the {positions} positions (max_position_embeddings) of text_encoder{suffix}")
    return tokenizer, encoder
