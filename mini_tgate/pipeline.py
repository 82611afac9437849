"""Text-to-image pipelines for SD 1.x/2.x (and LCM) and SDXL, with TGATE.

Reimplements diffusers' `StableDiffusionPipeline` and `StableDiffusionXLPipeline` (and the
`tgate` package's gated versions of them) for text-to-image:

    prompt ─ tokenizer(s) ─ text encoder(s) ─> conditioning ─┐
    noise (B, 4, H/8, W/8) ─> [ UNet + guidance ─ scheduler step ] x steps ─> VAE decode ─> images

Classifier-free guidance (CFG) runs the UNet on the doubled batch [unconditional, conditional]
and mixes: eps = eps_u + g * (eps_c - eps_u). With a `TGate`, tgate.plan() decides per step what
the attention layers do and whether the batch is doubled; after the gate step the unconditional
branch runs alone and its prediction is used as it is (the reference's choice).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from .checkpoint import CheckpointError, read_json, resolve
from .schedulers import DDIMScheduler, Scheduler, randn_tensor, scheduler_from_config
from .text_encoder import CLIPTextModel
from .tgate import TGate, plan
from .tokenizer import CLIPTokenizer
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL

SD_CLASSES = ("StableDiffusionPipeline", "LatentConsistencyModelPipeline")
SDXL_CLASSES = ("StableDiffusionXLPipeline",)


@dataclass
class PipelineOutput:
    images: np.ndarray | torch.Tensor | list  # (N, H, W, 3) in [0, 1] for "np"; latents for "latent"
    steps: list[dict] = field(default_factory=list)  # the plan it ran: per step, what attention did
    timings: dict = field(default_factory=dict)      # seconds per phase


def batch_cat(a: dict, b: dict) -> dict:
    """Two UNet conditionings (nested dicts of tensors) stacked along the batch: [a, b]."""
    return {k: batch_cat(a[k], b[k]) if isinstance(a[k], dict) else torch.cat([a[k], b[k]]) for k in a}


def rescale_noise_cfg(noise_cfg, noise_text, guidance_rescale):
    """Guidance rescale, Lin et al. 2023 (arXiv 2305.08891) Sec. 3.4: match the std of the text branch."""
    dims = list(range(1, noise_text.ndim))
    rescaled = noise_cfg * (noise_text.std(dim=dims, keepdim=True) / noise_cfg.std(dim=dims, keepdim=True))
    return guidance_rescale * rescaled + (1 - guidance_rescale) * noise_cfg


def guidance_embedding(w: torch.Tensor, dim: int, dtype) -> torch.Tensor:
    """LCM's guidance-scale embedding (diffusers' get_guidance_scale_embedding): sinusoids of 1000 w."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=dtype) * -(math.log(10000.0) / (half - 1)))
    args = (w * 1000.0).to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return torch.nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


def as_list(x, name: str) -> list[str]:
    if isinstance(x, str):
        return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(p, str) for p in x):
        return list(x)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {x!r}")


class StableDiffusionPipeline:
    """SD 1.x / 2.x text-to-image (and LCM, whose UNet takes guidance as an embedding)."""

    default_guidance_scale = 7.5  # diffusers' defaults: 7.5 for SD, 5.0 for SDXL

    def __init__(self, unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel,
                 tokenizer: CLIPTokenizer, scheduler: Scheduler):
        self.unet, self.vae, self.text_encoder, self.tokenizer, self.scheduler = \
            unet, vae, text_encoder, tokenizer, scheduler

    @property
    def device(self) -> torch.device:
        return self.unet.conv_in.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.conv_in.weight.dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def compile(self, mode: str | None = None) -> "StableDiffusionPipeline":
        """torch.compile the hot path in place: the UNet (fullgraph, channels_last) and the VAE
        decoder. The gate is a Python string per attention module, so a TGATE run compiles one
        graph per distinct (step plan, batch) pair, five for 25 steps of TGate(10, 5, 1, 2), and
        none again on later calls (tests/test_compile.py counts them).

        CUDA-graph modes ("reduce-overhead", "max-autotune") are refused: a replay may overwrite
        the outputs of the previous one, and the attention caches are such outputs."""
        if mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"mode={mode!r} uses CUDA graphs, which would overwrite the TGATE caches; "
                             "use None or 'max-autotune-no-cudagraphs'")
        # one graph per (step plan, shape): dynamo's default limit of 8 per function would make a
        # second image size a hard error under fullgraph
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.unet.to(memory_format=torch.channels_last)
        self.unet.compile(fullgraph=True, dynamic=False, mode=mode)
        self.vae.decoder.compile(fullgraph=True, dynamic=False, mode=mode)
        return self

    # ----------------------------------------------------------------------------- prompts

    def tokenize(self, tokenizer: CLIPTokenizer, prompts: list[str]) -> torch.Tensor:
        for prompt, dropped in zip(prompts, tokenizer.dropped_text(prompts)):
            if dropped:
                warnings.warn(f"prompt longer than {tokenizer.model_max_length} tokens; "
                              f"this part was dropped: {dropped!r}")
        return tokenizer(prompts).to(self.device)

    def encode_prompt(self, prompts: list[str], negatives: list[str] | None, cfg: bool,
                      height: int, width: int) -> tuple[dict, dict | None]:
        """UNet conditioning of the prompts and, with CFG, of the negative prompts ("" when none)."""
        def embed(texts):
            return self.text_encoder(self.tokenize(self.tokenizer, texts)).last_hidden_state.to(self.dtype)

        cond = {"encoder_hidden_states": embed(prompts)}  # (B, 77, D)
        uncond = {"encoder_hidden_states": embed(negatives or [""] * len(prompts))} if cfg else None
        return cond, uncond

    # ----------------------------------------------------------------------------- generation

    def check_inputs(self, prompts, negatives, steps, guidance_scale, height, width, num_images_per_prompt,
                     output_type):
        f = self.vae_scale_factor
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (height, width)) \
                or height % f or width % f or height < f or width < f:
            raise ValueError(f"height and width must be positive multiples of {f}, got {height!r}x{width!r}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        if negatives is not None and len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if output_type not in ("np", "latent", "pil", "pt"):
            raise ValueError(f"output_type must be 'np', 'pt', 'latent' or 'pil', got {output_type!r}")

    @torch.inference_mode()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 25, guidance_scale: float | None = None, height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1, generator=None,
                 latents: torch.Tensor | None = None, tgate: TGate | None = None, output_type: str = "np",
                 guidance_rescale: float = 0.0, eta: float = 0.0, progress: bool = False,
                 **conditioning) -> PipelineOutput:
        f = self.vae_scale_factor
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        height = height or self.unet.config.sample_size * f
        width = width or self.unet.config.sample_size * f
        prompts = as_list(prompt, "prompt")
        negatives = None if negative_prompt is None else as_list(negative_prompt, "negative_prompt")
        if negatives is not None and len(negatives) == 1 and len(prompts) > 1:
            negatives = negatives * len(prompts)  # one negative prompt for every prompt
        self.check_inputs(prompts, negatives, num_inference_steps, guidance_scale, height, width,
                          num_images_per_prompt, output_type)
        if tgate is not None and not isinstance(tgate, TGate):
            raise TypeError(f"tgate must be a mini_tgate.TGate or None, got {type(tgate).__name__}")
        timings, start = {}, time.perf_counter()

        # 1. Conditioning. CFG doubles the batch, unless the UNet takes guidance as an embedding (LCM).
        lcm = self.unet.config.time_cond_proj_dim is not None
        cfg = guidance_scale > 1 and not lcm
        cond, uncond = self.encode_prompt(prompts, negatives, cfg, height, width, **conditioning)
        n = num_images_per_prompt
        cond = {k: repeat_images(v, n) for k, v in cond.items()}
        uncond = {k: repeat_images(v, n) for k, v in uncond.items()} if cfg else None
        batch = len(prompts) * n
        if lcm:
            w = torch.full((batch,), guidance_scale - 1.0)
            cond["timestep_cond"] = guidance_embedding(w, self.unet.config.time_cond_proj_dim,
                                                       torch.float32).to(self.device, self.dtype)
        doubled = batch_cat(uncond, cond) if cfg else None
        single = uncond if cfg else cond  # after the gate, CFG is dropped: the unconditional branch alone
        timings["text"] = time.perf_counter() - start

        # 2. Initial noise, drawn as diffusers draws it.
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        shape = (batch, self.unet.config.in_channels, height // f, width // f)
        if latents is None:
            latents = randn_tensor(shape, generator, self.device, self.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(self.device, self.dtype) * self.scheduler.init_noise_sigma

        # 3. Denoising: each step's attention behaviour and batch come from the TGATE plan.
        timesteps = self.scheduler.timesteps
        steps = plan(tgate, len(timesteps), cfg)
        extra = {"eta": eta} if isinstance(self.scheduler, DDIMScheduler) else {}
        report = []
        start = time.perf_counter()
        bar = progress_bar(len(timesteps), progress)
        try:
            for i, (t, step) in enumerate(zip(timesteps, steps)):
                self.unet.set_gate(step)
                x, kw = (torch.cat([latents, latents]), doubled) if step.cfg else (latents, single)
                noise = self.unet(self.scheduler.scale_model_input(x, t), t, **kw)
                if step.cfg:
                    noise_uncond, noise_text = noise.chunk(2)
                    noise = noise_uncond + guidance_scale * (noise_text - noise_uncond)
                    if guidance_rescale > 0:
                        noise = rescale_noise_cfg(noise, noise_text, guidance_rescale)
                latents = self.scheduler.step(noise, t, latents, generator=generator, **extra).prev_sample
                report.append({"step": i, "timestep": float(t), "cross_attn": step.cross_attn,
                               "self_attn": step.self_attn, "batch": x.shape[0]})
                if bar is not None:
                    bar.update()
        finally:
            self.unet.clear_gate()  # no cache outlives the call
            if bar is not None:
                bar.close()
        if not torch.isfinite(latents).all():
            raise FloatingPointError("the latents contain NaN or inf: the UNet overflowed; try "
                                     "dtype=torch.bfloat16 or torch.float32")
        timings["denoise"] = time.perf_counter() - start

        # 4. Decode.
        start = time.perf_counter()
        images = latents if output_type == "latent" else self.decode(latents, output_type)
        timings["decode"] = time.perf_counter() - start
        return PipelineOutput(images, report, timings)

    def decode(self, latents: torch.Tensor, output_type: str = "np"):
        """Latents -> images in [0, 1]; the VAE runs in its own dtype (float32 when force_upcast)."""
        image = self.vae.decode(self.vae.unscale_latents(latents.to(self.vae.dtype)))
        if not torch.isfinite(image).all():
            raise FloatingPointError("the decoded image contains NaN or inf: the VAE overflowed; load "
                                     "the VAE in float32 (its force_upcast) or use dtype=torch.bfloat16")
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        image = image.cpu().permute(0, 2, 3, 1).float().numpy()  # (N, H, W, 3)
        if output_type == "pil":
            from PIL import Image  # optional: only for output_type="pil"
            return [Image.fromarray((im * 255).round().astype("uint8")) for im in image]
        return image


class StableDiffusionXLPipeline(StableDiffusionPipeline):
    """SDXL: two text encoders, pooled text and image-size conditioning through `time_ids`."""

    default_guidance_scale = 5.0

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, text_encoder_2: CLIPTextModel,
                 tokenizer_2: CLIPTokenizer, force_zeros_for_empty_prompt: bool = True):
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    def encode_prompt(self, prompts, negatives, cfg, height, width, original_size=None, target_size=None,
                      crops_coords_top_left=(0, 0)):
        def embed(texts):  # both encoders' penultimate states side by side; pooled from the second
            states, pooled = [], None
            for tokenizer, encoder in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
                out = encoder(self.tokenize(tokenizer, texts), output_hidden_states=True)
                states.append(out.hidden_states[-2])
                pooled = out.text_embeds
            return torch.cat(states, dim=-1).to(self.dtype), pooled.to(self.dtype)  # (B, 77, 768+1280), (B, 1280)

        # time ids: (original size, crop top-left, target size), SDXL's micro-conditioning
        sizes = (*(original_size or (height, width)), *crops_coords_top_left, *(target_size or (height, width)))
        time_ids = torch.tensor([sizes], dtype=self.dtype, device=self.device).repeat(len(prompts), 1)
        expected = self.unet.config.projection_class_embeddings_input_dim
        got = 6 * self.unet.config.addition_time_embed_dim + self.text_encoder_2.config.projection_dim
        if got != expected:
            raise ValueError(f"the UNet expects {expected} pooled+time features, the text encoder gives {got}")

        states, pooled = embed(prompts)
        cond = {"encoder_hidden_states": states, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
        if not cfg:
            return cond, None
        if negatives is None and self.force_zeros_for_empty_prompt:
            neg_states, neg_pooled = torch.zeros_like(states), torch.zeros_like(pooled)
        else:
            neg_states, neg_pooled = embed(negatives or [""] * len(prompts))
        return cond, {"encoder_hidden_states": neg_states,
                      "added_cond_kwargs": {"text_embeds": neg_pooled, "time_ids": time_ids}}


def repeat_images(x, n: int):
    """Each prompt's conditioning repeated for its n images: [p0, p0, p1, p1, ...]."""
    if isinstance(x, dict):
        return {k: repeat_images(v, n) for k, v in x.items()}
    return x.repeat_interleave(n, dim=0)


def progress_bar(total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # comes with huggingface-hub

    return tqdm(total=total, unit="step")


def load_pipeline(source, device="cpu", dtype: torch.dtype = torch.float32, variant: str | None = None,
                  local_files_only: bool = False, cache_dir=None) -> StableDiffusionPipeline:
    """A text-to-image pipeline for a diffusers checkpoint (folder or hub repo id), chosen by
    its model_index.json. The VAE stays in float32 when dtype is float16 and its config says
    force_upcast (the SDXL VAE overflows in float16)."""
    folder = resolve(source, variant, local_files_only, cache_dir)
    index = read_json(folder / "model_index.json")
    name = index.get("_class_name")
    if name not in SD_CLASSES + SDXL_CLASSES:
        raise CheckpointError(f"{folder / 'model_index.json'}: pipeline class {name!r} is not supported "
                              f"(supported: {', '.join(SD_CLASSES + SDXL_CLASSES)})")
    kw = dict(dtype=dtype, device=device, variant=variant)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
    if vae.needs_upcast:
        vae.float()
    parts = dict(
        unet=UNet2DConditionModel.from_pretrained(folder, subfolder="unet", **kw),
        vae=vae,
        text_encoder=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", **kw),
        tokenizer=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
        scheduler=scheduler_from_config(read_json(folder / "scheduler" / "scheduler_config.json")),
    )
    if name in SD_CLASSES:
        return StableDiffusionPipeline(**parts)
    return StableDiffusionXLPipeline(
        **parts,
        text_encoder_2=CLIPTextModel.from_pretrained(folder, subfolder="text_encoder_2", **kw),
        tokenizer_2=CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer_2"),
        force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True))
