"""Text-to-image pipelines for SD 1.x/2.x (and LCM), SDXL and PixArt-Alpha/-Sigma, with TGATE.

Reimplements diffusers' `StableDiffusionPipeline`, `StableDiffusionXLPipeline`,
`PixArtAlphaPipeline` and `PixArtSigmaPipeline` (and the `tgate` package's gated versions of
them) for text-to-image. One call and one denoising loop (`DiffusionPipeline`) serve all four;
the subclasses differ only in the denoiser (UNet or transformer) and how a prompt becomes its
conditioning (`encode_prompt`):

    prompt ─ tokenizer(s) ─ text encoder(s) ─> conditioning ─┐
    noise (B, 4, H/8, W/8) ─> [ denoiser + guidance ─ scheduler step ] x steps ─> VAE decode ─> images

Classifier-free guidance (CFG) runs the denoiser on the doubled batch [unconditional, conditional]
and mixes: eps = eps_u + g * (eps_c - eps_u). With a `TGate`, tgate.plan() decides per step what
the attention layers do and whether the batch is doubled; after the gate step the unconditional
branch runs alone and its prediction is used as it is (the reference's choice).
"""

from __future__ import annotations

import copy
import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .bounds import MAX_IMAGES_PER_CALL, MAX_SIDE
from .clip import CLIPTextModel
from .image import read_image
from .schedulers import DDIMScheduler, Scheduler, randn_tensor, scheduler_from_config
from .tgate import DeepCache, TGate, plan
from .vae import AutoencoderKL
from .weights import CheckpointError, pick_dtype, read_json, resolve, snapshot_commit

# the tensors a step callback may read and replace (diffusers' `_callback_tensor_inputs`)
CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")


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


def is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def check_embeds(x, name: str, ndim: int):
    if not isinstance(x, torch.Tensor) or x.ndim != ndim or not x.is_floating_point():
        shape = "(batch, tokens, features)" if ndim == 3 else "(batch, features)"
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point tensor {shape}, got {got}")


def half_hint(dtype: torch.dtype) -> str:
    """What to try when a run overflows: only half precision has a cheaper cure than new weights."""
    if dtype == torch.float16:
        return "; float16 overflows easily: try dtype=torch.bfloat16 or torch.float32"
    if dtype == torch.bfloat16:
        return "; try dtype=torch.float32"
    return ""


@contextmanager
def on_device(models: list, device):
    """Model CPU offload: the models on `device` for the block, back on the CPU after it.
    device None: leave them where they are."""
    if device is None:
        yield
        return
    for m in models:
        m.to(device)
    try:
        yield
    finally:
        for m in models:
            m.to("cpu")


def as_list(x, name: str) -> list[str]:
    if isinstance(x, str):
        return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(p, str) for p in x):
        return list(x)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {x!r}")


class DiffusionPipeline:
    """What every pipeline here shares: its parts, moving them, compiling, and the one call: check
    the inputs, encode the prompts, draw the noise, run the denoising loop under the TGATE plan,
    decode. Subclasses say which model denoises (`denoiser`) and how prompts become its
    conditioning (`encode_prompt`): StableDiffusionPipeline (UNet, CLIP text), its SDXL subclass
    (two text encoders, size conditioning) and the PixArt pipelines (transformer, T5 text)."""

    model_index_names: tuple[str, ...] = ()  # the model_index.json class names this class loads
    default_guidance_scale = 7.5  # diffusers' defaults: 7.5 for SD, 5.0 for SDXL, 4.5 for PixArt
    default_strength = None  # img2img's (diffusers': 0.8 for SD, 0.3 for SDXL); None: no img2img (PixArt)
    extra_call_args = ()  # keyword arguments of __call__ that only the subclass reads (SDXL's, PixArt's)

    def __init__(self, vae: AutoencoderKL, text_encoder, tokenizer, scheduler: Scheduler):
        self.vae, self.text_encoder, self.tokenizer, self.scheduler = vae, text_encoder, tokenizer, scheduler
        self.model_info: dict = {}       # set by load_pipeline: name, folder, revision of the checkpoint
        self.progress_bar_config = {"disable": True}  # tqdm options; quiet unless asked
        self.offload_device: torch.device | None = None  # see enable_model_cpu_offload
        # The lock of one generation at a time (see exclusive_call), and the thread holding it.
        self.call_lock, self.call_owner = threading.Lock(), None
        self._interrupt = False  # diffusers' early stop, set by a step callback

    @classmethod
    def from_pretrained(cls, source, device="cpu", dtype: torch.dtype | None = None, variant: str | None = None,
                        local_files_only: bool = False, cache_dir=None, revision: str | None = None,
                        torch_dtype: torch.dtype | None = None) -> "DiffusionPipeline":
        """The pipeline of a diffusers folder or hub repo whose model_index.json names this class
        (`load_pipeline` picks the class for you). dtype (diffusers' name, torch_dtype, is an alias)
        defaults to float32; the VAE stays in float32 when its config says force_upcast."""
        dtype = pick_dtype(dtype, torch_dtype)
        folder = resolve(source, variant, local_files_only, cache_dir, revision=revision)
        index = read_json(folder / "model_index.json")
        name = index.get("_class_name")
        if name not in cls.model_index_names:
            raise CheckpointError(f"{source}: a {name} checkpoint, not a {cls.__name__} one; use load_pipeline")
        kw = dict(dtype=dtype, device=device, variant=variant)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", **kw)
        if vae.needs_upcast:
            vae.float()
        scheduler = scheduler_from_config(read_json(folder / "scheduler" / "scheduler_config.json"))
        pipe = cls(vae=vae, scheduler=scheduler, **cls.components(folder, index, kw))
        # where the weights came from (the CLI writes it into PNGs): never an absolute local path
        local = Path(source).expanduser().is_dir()
        pipe.model_info = {"name": folder.name if local else str(source), "folder": folder,
                           "revision": snapshot_commit(folder)}
        return pipe

    @classmethod
    def components(cls, folder: Path, index: dict, kw: dict) -> dict:
        """The models and tokenizers of a diffusers folder besides the VAE and the scheduler."""
        raise NotImplementedError

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    def text_encoders(self) -> list:
        return [self.text_encoder]

    def models(self) -> list:
        return [self.denoiser, self.vae, *self.text_encoders()]

    def to(self, device=None, dtype: torch.dtype | None = None) -> "DiffusionPipeline":
        """Move every model (diffusers' `pipe.to("cuda")`, `pipe.to(torch.float16)`, or both).
        In float16 the VAE stays in float32 when its config says force_upcast, as load_pipeline
        does. Giving a device ends model CPU offload."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device if dtype is None else dtype
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        with self.exclusive_call():  # not under a running generation
            for m in self.models():
                m.to(device=device, dtype=dtype)
            if self.vae.needs_upcast:
                self.vae.float()
            if device is not None:
                self.offload_device = None
        return self

    def enable_model_cpu_offload(self, device="cuda") -> None:
        """Keep the weights on the CPU; each part (text encoders, UNet, VAE) moves to `device` only
        while it runs, then back: the GPU holds one part at a time. Explicit moves in the call,
        not hooks (see on_device)."""
        device = torch.device(device)
        with self.exclusive_call():
            for m in self.models():
                m.to("cpu")
            self.offload_device = device

    def set_progress_bar_config(self, **kwargs) -> None:
        """tqdm options for the denoising loop's bar, as diffusers: disable=False shows it (the
        default here is quiet); a call's `progress=True/False` overrides `disable`."""
        self.progress_bar_config = {"disable": False, **kwargs} if "disable" not in kwargs else dict(kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def compile(self, mode: str | None = None) -> "DiffusionPipeline":
        """torch.compile the hot path in place: the denoiser (fullgraph, channels_last) and the VAE
        decoder. The gate is a Python string per attention module, so a TGATE run compiles one
        graph per distinct (step plan, batch) pair, five for 25 steps of TGate(10, 5, 1, 2) (eight
        with DeepCache(3, 0): full and shallow steps differ), and none again on later calls
        (tests/test_compile.py counts them).

        CUDA-graph modes ("reduce-overhead", "max-autotune") are refused: a replay may overwrite
        the outputs of the previous one, and the attention caches are such outputs."""
        if mode in ("reduce-overhead", "max-autotune"):
            raise ValueError(f"mode={mode!r} uses CUDA graphs, which would overwrite the TGATE caches; "
                             "use None or 'max-autotune-no-cudagraphs'")
        # one graph per (step plan, shape): dynamo's default limit of 8 per function would make a
        # second image size a hard error under fullgraph
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        self.denoiser.to(memory_format=torch.channels_last)
        self.denoiser.compile(fullgraph=True, dynamic=False, mode=mode)
        self.vae.decoder.compile(fullgraph=True, dynamic=False, mode=mode)
        return self

    # ----------------------------------------------------------------------------- prompts

    def check_embeddings(self, n_prompts: int, prompt_embeds, negative_prompt_embeds, conditioning: dict):
        """Given text embeddings: the width the denoiser reads, one row per prompt, both of one shape."""
        if prompt_embeds is None and negative_prompt_embeds is None:
            return
        width = self.text_width
        for name, x in (("prompt_embeds", prompt_embeds), ("negative_prompt_embeds", negative_prompt_embeds)):
            if x is not None:
                check_embeds(x, name, 3)
                if x.shape[0] != n_prompts or x.shape[2] != width:
                    raise ValueError(f"{name} must have shape ({n_prompts}, tokens, {width}) (one row per "
                                     f"prompt, the width of the text the denoiser reads), got {tuple(x.shape)}")
        if prompt_embeds is not None and negative_prompt_embeds is not None \
                and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds "
                             f"{tuple(negative_prompt_embeds.shape)} must have the same shape")

    def working_size(self, height: int, width: int, conditioning: dict) -> tuple[int, int, tuple | None]:
        """The (height, width) the denoiser works at, and the size of the images returned (None:
        the same). SD and SDXL work at the size asked for; PixArt may bin it."""
        return height, width, None

    # ----------------------------------------------------------------------------- generation

    def check_inputs(self, prompts, negatives, steps, guidance_scale, height, width, num_images_per_prompt,
                     output_type, generator=None, latents=None, guidance_rescale=0.0, eta=0.0, batch=None,
                     tgate=None, clip_skip=None, callback=None, callback_inputs=(), deepcache=None):
        """Every argument checked before anything is encoded or allocated."""
        f = self.vae_scale_factor
        if any(isinstance(v, bool) or not isinstance(v, int) for v in (height, width)) \
                or height % f or width % f or height < f or width < f:
            raise ValueError(f"height and width must be positive multiples of {f}, got {height!r}x{width!r}")
        if max(height, width) > MAX_SIDE:
            raise ValueError(f"height and width must be at most {MAX_SIDE} pixels (SDXL is trained at 1024, "
                             f"SD at 512-768), got {height}x{width}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        if not is_number(guidance_scale) or not math.isfinite(guidance_scale):
            raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
        if not is_number(guidance_rescale) or not 0 <= guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
        if not is_number(eta) or not 0 <= eta < math.inf:
            raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")
        if negatives is not None and prompts is not None and len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if output_type not in ("np", "latent", "pil", "pt"):
            raise ValueError(f"output_type must be 'np', 'pt', 'latent' or 'pil', got {output_type!r}")
        if batch is not None and batch > MAX_IMAGES_PER_CALL:
            raise ValueError(f"prompts x num_images_per_prompt must be at most {MAX_IMAGES_PER_CALL} images per call "
                             f"(call again for more), got {batch}")
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch:
                raise ValueError(f"generator is a list of {len(generator)} generators for a batch of {batch} "
                                 "images; give one per image, or a single torch.Generator")
            if not all(isinstance(g, torch.Generator) for g in generator):
                raise TypeError("generator must be a torch.Generator or a list of them")
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}")
        if latents is not None and not isinstance(latents, torch.Tensor):
            raise TypeError(f"latents must be a torch.Tensor (torch.from_numpy converts a numpy array), "
                            f"got {type(latents).__name__}")
        if tgate is not None and not isinstance(tgate, TGate):
            raise TypeError(f"tgate must be a mini_tgate.TGate or None, got {type(tgate).__name__}")
        if deepcache is not None and not isinstance(deepcache, DeepCache):
            raise TypeError(f"deepcache must be a mini_tgate.DeepCache or None, got {type(deepcache).__name__}")
        if deepcache is not None and not hasattr(self.denoiser, "deep_split"):
            raise ValueError(f"DeepCache splits a UNet; the {type(self.denoiser).__name__} of "
                             f"{type(self).__name__} has no shallow branch")
        if deepcache is not None:
            self.denoiser.deep_split(deepcache.branch)  # a branch this UNet has, or a ValueError
        if clip_skip is not None:
            if not isinstance(self.text_encoder, CLIPTextModel):
                raise ValueError(f"clip_skip applies to CLIP text encoders; {type(self).__name__} has none")
            layers = self.text_encoder.config.num_hidden_layers
            if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or not 0 <= clip_skip < layers:
                raise ValueError(f"clip_skip must be None or an integer in [0, {layers - 1}], got {clip_skip!r}")
        if callback is not None and not callable(callback):
            raise TypeError("callback_on_step_end must be callable")
        unknown = [k for k in callback_inputs if k not in CALLBACK_TENSOR_INPUTS]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may name {', '.join(CALLBACK_TENSOR_INPUTS)}; "
                             f"got {', '.join(map(repr, unknown))}")

    @torch.inference_mode()
    def __call__(self, prompt: str | list[str] | None = None, negative_prompt: str | list[str] | None = None,
                 num_inference_steps: int = 25, guidance_scale: float | None = None, height: int | None = None,
                 width: int | None = None, num_images_per_prompt: int = 1, generator=None,
                 latents: torch.Tensor | None = None, tgate: TGate | None = None, output_type: str = "np",
                 deepcache: DeepCache | None = None,
                 guidance_rescale: float = 0.0, eta: float = 0.0, progress: bool | None = None,
                 prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None,
                 clip_skip: int | None = None, timesteps: list | None = None, sigmas: list | None = None,
                 callback_on_step_end=None, callback_on_step_end_tensor_inputs=("latents",),
                 image=None, strength: float | None = None, **conditioning) -> PipelineOutput:
        """Text to images; with `image`, img2img (see image_latents). Thread-safe: concurrent calls
        on one pipeline run one at a time (see exclusive_call), each with its own copy of the scheduler.

        `callback_on_step_end(pipe, i, t, tensors) -> dict` runs after each step with the tensors
        named in `callback_on_step_end_tensor_inputs`; those it returns replace the loop's. Setting
        `pipe._interrupt = True` (diffusers' way) skips the remaining steps and decodes the
        current latents; the flag is reset when the next call starts."""
        for key in conditioning:  # SDXL's extra arguments are the only ones allowed through
            if key not in self.extra_call_args:
                raise TypeError(f"{type(self).__name__}.__call__() got an unexpected keyword argument {key!r}")
        # Everything another thread could change is read once, here: a swap mid-call changes nothing.
        denoiser, vae, offload = self.denoiser, self.vae, self.offload_device
        bar_config = {**self.progress_bar_config, **({} if progress is None else {"disable": not progress})}
        scheduler = copy.deepcopy(self.scheduler)  # its timesteps and step state belong to this call
        device, dtype, f = offload or self.device, next(denoiser.parameters()).dtype, self.vae_scale_factor
        guidance_scale = self.default_guidance_scale if guidance_scale is None else guidance_scale
        if image is not None:  # img2img: the size is the image's
            pixels, strength = self.check_image(image, strength, height, width, latents)
            height, width = pixels.shape[2:]
        elif strength is not None:
            raise ValueError("strength is for img2img: give image= too")
        height = denoiser.config.sample_size * f if height is None else height  # 0 is an error, not the default
        width = denoiser.config.sample_size * f if width is None else width
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("prompt must be given, or prompt_embeds instead: exactly one of them")
        prompts = None if prompt is None else as_list(prompt, "prompt")
        negatives = None if negative_prompt is None else as_list(negative_prompt, "negative_prompt")
        if prompt_embeds is not None:
            check_embeds(prompt_embeds, "prompt_embeds", 3)
        n_prompts = len(prompts) if prompts is not None else prompt_embeds.shape[0]
        if negatives is not None and len(negatives) == 1 and n_prompts > 1:
            negatives = negatives * n_prompts  # one negative prompt for every prompt
        n = num_images_per_prompt
        batch = n_prompts * n if isinstance(n, int) else None
        callback_inputs = list(callback_on_step_end_tensor_inputs or ())
        self.check_inputs(prompts, negatives, num_inference_steps, guidance_scale, height, width, n, output_type,
                          generator, latents, guidance_rescale, eta, batch, tgate, clip_skip, callback_on_step_end,
                          callback_inputs, deepcache)
        self.check_embeddings(n_prompts, prompt_embeds, negative_prompt_embeds, conditioning)
        if image is not None and pixels.shape[0] not in (1, batch):
            raise ValueError(f"{pixels.shape[0]} images for {batch} outputs (prompts x num_images_per_prompt); "
                             "give one image for all, or one per output")
        # the size the denoiser works at, and the size of the images returned (PixArt's binning)
        height, width, output_size = self.working_size(height, width, conditioning)
        # this call's schedule, on its own scheduler copy; custom lists are checked by the scheduler
        custom = {k: v for k, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None}
        scheduler.set_timesteps(None if custom else num_inference_steps, device=device, **custom)
        if image is not None:  # run the last int(N * strength) of the N steps, as diffusers
            steps = len(scheduler.timesteps) if custom else num_inference_steps
            begin = steps - min(int(steps * strength), steps)
            if begin >= len(scheduler.timesteps):
                raise ValueError(f"strength={strength} of num_inference_steps={steps} runs int({steps} * {strength}) "
                                 "= 0 steps; give more steps or a higher strength")
            scheduler.set_begin_index(begin)
        shape = (batch, denoiser.config.in_channels, height // f, width // f)
        if latents is not None and tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        if latents is not None and not torch.isfinite(latents).all():
            raise FloatingPointError("the latents you passed contain NaN or inf")

        with self.exclusive_call():
            # 1. Conditioning. CFG doubles the batch, unless the UNet takes guidance as an embedding (LCM).
            timings, start = {}, time.perf_counter()
            lcm = getattr(denoiser.config, "time_cond_proj_dim", None) is not None  # PixArt has none
            cfg = guidance_scale > 1 and not lcm
            with on_device(self.text_encoders(), offload):
                cond, uncond = self.encode_prompt(prompts, negatives, cfg, height, width, device, prompt_embeds,
                                                  negative_prompt_embeds, clip_skip, **conditioning)
            for what, c, given in (("prompt", cond, prompt_embeds), ("negative prompt", uncond, negative_prompt_embeds)):
                if c is not None and not torch.isfinite(c["encoder_hidden_states"]).all():
                    raise FloatingPointError(f"the text embeddings of the {what} contain NaN or inf: " + (
                        "the embeddings you passed" if given is not None
                        else "the text encoder's weights produce them" + half_hint(dtype)))
            cond = repeat_images(cond, n)
            uncond = repeat_images(uncond, n) if cfg else None
            if lcm:
                w = torch.full((batch,), guidance_scale - 1.0)
                cond["timestep_cond"] = guidance_embedding(w, denoiser.config.time_cond_proj_dim,
                                                           torch.float32).to(device, dtype)
            timings["text"] = time.perf_counter() - start

            # 2. Initial noise, drawn as diffusers draws it; img2img noises the image's latents instead.
            if image is not None:
                with on_device([vae], offload):
                    latents = self.image_latents(pixels, vae, scheduler, batch, generator, device, dtype)
            else:
                if latents is None:
                    latents = randn_tensor(shape, generator, device, dtype)
                latents = latents.to(device, dtype) * scheduler.init_noise_sigma

            # 3. Denoising: each step's attention behaviour, batch and (DeepCache) UNet part come from the plan.
            start = time.perf_counter()
            steps = plan(tgate, len(scheduler.timesteps) - scheduler.begin_index, cfg, deepcache)
            with on_device([denoiser], offload):
                latents, report = self.denoise(
                    denoiser, scheduler, latents, cond, uncond, steps,
                    guidance_scale, guidance_rescale, eta, generator, bar_config, callback_on_step_end,
                    callback_inputs)
            timings["denoise"] = time.perf_counter() - start

            # 4. Decode.
            start = time.perf_counter()
            if output_type == "latent":
                images = latents
            else:
                with on_device([vae], offload):
                    images = self.decode(latents, output_type, vae, output_size)
            timings["decode"] = time.perf_counter() - start
            return PipelineOutput(images, report, timings)

    def check_image(self, image, strength, height, width, latents):
        """img2img's arguments: the image read as (N, 3, H, W) in [0, 1] (image.py), and the strength."""
        if self.default_strength is None:
            raise ValueError(f"{type(self).__name__} has no img2img (image=); diffusers has none for it either")
        strength = self.default_strength if strength is None else strength
        if not is_number(strength) or not 0 < strength <= 1:
            raise ValueError(f"strength must be a number in (0, 1] (the share of the steps run), got {strength!r}")
        if latents is not None:
            raise ValueError("give image= or latents=, not both (img2img makes its latents from the image)")
        pixels = read_image(image, MAX_SIDE)
        f, (h, w) = self.vae_scale_factor, pixels.shape[2:]
        if h % f or w % f or not h or not w:
            raise ValueError(f"the image is {w}x{h} pixels; img2img needs a width and height that are positive "
                             f"multiples of {f} (crop or resize it)")
        if (height is not None and height != h) or (width is not None and width != w):
            raise ValueError(f"img2img takes height and width from the image ({h}x{w}), got {height}x{width}")
        return pixels, strength

    def image_latents(self, pixels, vae, scheduler, batch, generator, device, dtype):
        """img2img's starting point, as diffusers makes it: the image's latents (a sample of the VAE
        posterior, scaled) noised to the first step run, `scheduler.begin_index`. The generator
        draws the posterior sample first, then the noise: the order matters for equality. The
        denoising then runs the remaining steps; the TGATE plan is made over those alone, so its
        caching step m-1 always runs and a gate at or past their number gates nothing."""
        x = (2 * pixels - 1).to(device)  # the VAE takes [-1, 1]
        if isinstance(generator, (list, tuple)) and len(x) < batch:
            x = x.expand(batch, -1, -1, -1)  # one posterior sample per generator
        z = vae.scale_latents(vae.encode(x).sample(generator).float()).to(device, dtype)
        z = z.expand(batch, -1, -1, -1)  # one image for every output
        noise = randn_tensor(z.shape, generator, device, dtype)
        return scheduler.add_noise(z, noise, scheduler.timesteps[scheduler.begin_index:][:1].repeat(batch))

    @contextmanager
    def exclusive_call(self):
        """Hold the call lock. The UNet's attention modules hold the TGATE gate and caches, and
        offloading moves the models: one call at a time may use them. A call from inside a call
        (a step callback calling the pipeline) would clear the caches of the call it interrupts:
        refused rather than deadlocked."""
        if self.call_owner == threading.get_ident():
            raise RuntimeError(f"{type(self).__name__} was called from inside one of its own calls (a step "
                               "callback?); that would overwrite the running call's attention caches")
        with self.call_lock:
            self.call_owner, self._interrupt = threading.get_ident(), False
            try:
                yield
            finally:
                self.call_owner = None

    def denoise(self, denoiser, scheduler, latents, cond: dict, uncond: dict | None, steps: list, guidance_scale,
                guidance_rescale, eta, generator, bar_config: dict, callback, callback_inputs: list):
        """The denoising loop (scheduler timesteps set): the latents at the end, and per step
        what attention did. With CFG (uncond given) steps whose plan says so run the doubled batch."""
        dtype = latents.dtype
        extra = {"eta": eta} if isinstance(scheduler, DDIMScheduler) else {}
        report = []
        bar = progress_bar(len(steps), bar_config)
        try:
            for i, (t, step) in enumerate(zip(scheduler.timesteps[scheduler.begin_index:], steps)):
                denoiser.set_gate(step)
                if step.cfg:
                    x, kw = torch.cat([latents, latents]), batch_cat(uncond, cond)
                else:  # after the gate, CFG is dropped: the unconditional branch alone
                    x, kw = latents, uncond if uncond is not None else cond
                noise = denoiser(scheduler.scale_model_input(x, t), timestep=t, **kw)
                # PixArt predicts the variance too (learned sigma): the noise is the first half
                noise = noise[:, :latents.shape[1]]
                if not torch.isfinite(noise).all():
                    raise FloatingPointError(f"the {type(denoiser).__name__}'s noise prediction at step {i} contains NaN or inf: "
                                             "its weights produce them" + half_hint(dtype))
                if step.cfg:
                    noise_uncond, noise_text = noise.chunk(2)
                    noise = noise_uncond + guidance_scale * (noise_text - noise_uncond)
                    if guidance_rescale > 0:
                        noise = rescale_noise_cfg(noise, noise_text, guidance_rescale)
                    if not torch.isfinite(noise).all():
                        raise FloatingPointError(f"guidance_scale={guidance_scale} and guidance_rescale="
                                                 f"{guidance_rescale} produced NaN or inf at step {i}")
                latents = scheduler.step(noise, t, latents, generator=generator, **extra).prev_sample
                if not torch.isfinite(latents).all():
                    raise FloatingPointError(f"the {type(scheduler).__name__} step {i} produced NaN or inf"
                                             + (f" (eta={eta})" if extra else "") + half_hint(dtype))
                report.append({"step": i, "timestep": float(t), "cross_attn": step.cross_attn,
                               "self_attn": step.self_attn, "batch": x.shape[0], "deep": step.deep})
                if bar is not None:
                    bar.update()
                if callback is not None:  # diffusers' callback_on_step_end; what it returns replaces ours
                    tensors = {"latents": latents, "prompt_embeds": cond["encoder_hidden_states"],
                               "negative_prompt_embeds": None if uncond is None else uncond["encoder_hidden_states"]}
                    out = callback(self, i, t, {k: tensors[k] for k in callback_inputs}) or {}
                    latents = out.get("latents", latents)
                    if "prompt_embeds" in out:
                        cond = {**cond, "encoder_hidden_states": out["prompt_embeds"]}
                    if "negative_prompt_embeds" in out and uncond is not None:
                        uncond = {**uncond, "encoder_hidden_states": out["negative_prompt_embeds"]}
                if self._interrupt:  # diffusers' clean early stop: decode what there is
                    break
        finally:
            denoiser.clear_gate()  # no cache outlives the call
            if bar is not None:
                bar.close()
        return latents, report

    def decode(self, latents: torch.Tensor, output_type: str = "np", vae: AutoencoderKL | None = None,
               size: tuple[int, int] | None = None):
        """Latents -> images in [0, 1]; the VAE runs in its own dtype (float32 when force_upcast).
        size: (height, width) to resize and centre-crop to, before the clamp (PixArt's binning)."""
        vae = vae or self.vae
        image = vae.decode(vae.unscale_latents(latents.to(vae.dtype)))
        if size is not None:
            image = resize_and_crop(image, *size)
        if not torch.isfinite(image).all():
            hint = ("; load the VAE in float32 (its force_upcast)" if vae.dtype == torch.float16
                    else half_hint(vae.dtype))
            raise FloatingPointError("the decoded image contains NaN or inf: the VAE's weights produce them" + hint)
        image = (image / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return image
        image = image.cpu().permute(0, 2, 3, 1).float().numpy()  # (N, H, W, 3)
        if output_type == "pil":
            from PIL import Image  # optional: only for output_type="pil"
            return [Image.fromarray((im * 255).round().astype("uint8")) for im in image]
        return image


def resize_and_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Images (N, C, h, w) scaled (bilinear) to cover height x width, then cropped to it, centred."""
    h, w = image.shape[-2:]
    if (h, w) == (height, width):
        return image
    ratio = max(height / h, width / w)
    image = torch.nn.functional.interpolate(image, size=(int(h * ratio), int(w * ratio)), mode="bilinear",
                                            align_corners=False)
    top, left = (image.shape[-2] - height) // 2, (image.shape[-1] - width) // 2
    return image[..., top:top + height, left:left + width]


def repeat_images(x, n: int):
    """Each prompt's conditioning repeated for its n images: [p0, p0, p1, p1, ...]."""
    if isinstance(x, dict):
        return {k: repeat_images(v, n) for k, v in x.items()}
    return x.repeat_interleave(n, dim=0)


def progress_bar(total: int, config: dict):
    """A tqdm bar over the steps with the pipeline's options (set_progress_bar_config), or None."""
    if config.get("disable", True):
        return None
    from tqdm.auto import tqdm  # comes with huggingface-hub

    return tqdm(total=total, **{"unit": "step", **config})
