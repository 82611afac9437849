"""The arguments of one pipeline call, checked and completed, before anything is encoded or allocated.

diffusers' `check_inputs`, in one place: `check_call` goes through the arguments top to bottom
(the helpers below it each take one group, in the order it calls them), and that order is the
order in which errors are reported: a call with several mistakes hears of the first. Where
diffusers refuses the same input, the same exception type is raised. What the call reads of the
pipeline (its models, scheduler, offload device and progress options) is read here, once: a part
swapped by another thread mid-call changes nothing.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .bounds import MAX_IMAGES_PER_CALL, MAX_SIDE, int_in, is_int, is_number
from .clip import CLIPTextModel
from .image import read_image
from .schedulers import Scheduler
from .tgate import DeepCache, TGate, check_gate_types
from .vae import AutoencoderKL

# the tensors a step callback may read and replace (diffusers' `_callback_tensor_inputs`); SDXL adds
# its pooled embeddings and time ids. With CFG on they are diffusers' [negative, prompt] batch (LoopState)
CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")
SDXL_CALLBACK_INPUTS = ("add_text_embeds", "add_time_ids")


@dataclass
class Call:
    """One call's arguments, checked and with their defaults; and what the call reads of the pipeline."""
    # the text: the prompts, or their embeddings (then prompts is None)
    prompts: list[str] | None
    negatives: list[str] | None  # one per prompt, or None
    prompt_embeds: torch.Tensor | None  # (prompts, tokens, D)
    negative_prompt_embeds: torch.Tensor | None
    clip_skip: int | None
    conditioning: dict  # the family's own arguments (extra_call_args: SDXL's, PixArt's)
    # the images
    num_images_per_prompt: int
    batch: int  # B = prompts x num_images_per_prompt
    height: int  # the size the denoiser works at (PixArt may bin it) ...
    width: int
    output_size: tuple[int, int] | None  # ... and the size returned where it differs
    shape: tuple[int, int, int, int]  # of the latents: (B, C, height / f, width / f)
    latents: torch.Tensor | None  # the initial noise, if given
    pixels: torch.Tensor | None  # img2img's image(s): (1 or B, 3, H, W) in [0, 1]
    generator: torch.Generator | list | None  # one, or one per image
    output_type: str
    # the denoising
    scheduler: Scheduler  # this call's own copy: timesteps set (img2img: its begin index too)
    guidance_scale: float
    guidance_rescale: float
    eta: float
    tgate: TGate | None
    deepcache: DeepCache | None
    callback: Callable | None  # callback_on_step_end
    callback_inputs: list[str]  # the tensors it sees, of CALLBACK_TENSOR_INPUTS
    # what the call reads of the pipeline, once
    denoiser: torch.nn.Module
    vae: AutoencoderKL
    offload: torch.device | None  # model CPU offload's device, or None
    device: torch.device
    dtype: torch.dtype
    bar_config: dict  # the progress bar's tqdm options
    static_caches: bool  # caches in static buffers (compiled with CUDA graphs; runtime.make_static_caches)


def check_call(pipe, conditioning: dict, prompt, negative_prompt, num_inference_steps, guidance_scale, height,
               width, num_images_per_prompt, generator, latents, tgate, output_type, deepcache, guidance_rescale,
               eta, progress, prompt_embeds, negative_prompt_embeds, clip_skip, timesteps, sigmas,
               callback_on_step_end, callback_on_step_end_tensor_inputs, image, strength) -> Call:
    """The arguments of `pipe(...)` (DiffusionPipeline.__call__'s, by the same names; `conditioning`
    holds the rest) checked in this order and completed; this call's scheduler copy made and set."""
    for key in conditioning:  # the family's own arguments (SDXL's, PixArt's) are the only extras allowed
        if key not in pipe.extra_call_args:
            raise TypeError(f"{type(pipe).__name__}.__call__() got an unexpected keyword argument {key!r}")
    # Everything another thread could change is read once, here: a swap mid-call changes nothing.
    denoiser, vae, offload, f = pipe.denoiser, pipe.vae, pipe.offload_device, pipe.vae_scale_factor
    bar_config = {**pipe.progress_bar_config, **({} if progress is None else {"disable": not progress})}
    scheduler = copy.deepcopy(pipe.scheduler)  # its timesteps and step state belong to this call
    device, dtype = offload or pipe.device, next(denoiser.parameters()).dtype
    guidance_scale = pipe.default_guidance_scale if guidance_scale is None else guidance_scale
    num_inference_steps = pipe.default_steps if num_inference_steps is None else num_inference_steps
    # the size: img2img's is the image's; otherwise the denoiser's trained size unless given
    pixels = None
    if image is not None:
        pixels, strength = check_image(pipe, image, strength, height, width, latents)
        height, width = pixels.shape[2:]
    elif strength is not None:
        raise ValueError("strength is for img2img: give image= too")
    height = denoiser.config.sample_size * f if height is None else height  # 0 is an error, not the default
    width = denoiser.config.sample_size * f if width is None else width
    # the prompts as lists; one negative prompt serves every prompt
    if (prompt is None) == (prompt_embeds is None):
        raise ValueError("prompt must be given, or prompt_embeds instead: exactly one of them")
    prompts = None if prompt is None else as_list(prompt, "prompt")
    negatives = None if negative_prompt is None else as_list(negative_prompt, "negative_prompt")
    if prompt_embeds is not None:
        check_embeds(prompt_embeds, "prompt_embeds", 3)
    n_prompts = len(prompts) if prompts is not None else prompt_embeds.shape[0]
    if negatives is not None and len(negatives) == 1 and n_prompts > 1:
        negatives = negatives * n_prompts
    # the numbers, the counts, then the objects given
    check_numbers(f, height, width, num_inference_steps, guidance_scale, guidance_rescale, eta, num_images_per_prompt)
    height, width, n, steps = int(height), int(width), int(num_images_per_prompt), int(num_inference_steps)
    batch = n_prompts * n
    if negatives is not None and prompts is not None and len(negatives) != len(prompts):
        raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
    if output_type not in ("np", "latent", "pil", "pt"):
        raise ValueError(f"output_type must be 'np', 'pt', 'latent' or 'pil', got {output_type!r}")
    if batch > MAX_IMAGES_PER_CALL:
        raise ValueError(f"prompts x num_images_per_prompt must be at most {MAX_IMAGES_PER_CALL} images per call "
                         f"(call again for more), got {batch}")
    callback_inputs = list(callback_on_step_end_tensor_inputs or ())
    check_objects(pipe, denoiser, batch, generator, latents, tgate, deepcache, clip_skip, callback_on_step_end,
                  callback_inputs)
    # embeddings given: their shapes, then the family's own rules (SDXL's pooled, PixArt's masks)
    check_text_embeddings(n_prompts, prompt_embeds, negative_prompt_embeds, pipe.text_width)
    pipe.check_embeddings(n_prompts, prompt_embeds, negative_prompt_embeds, conditioning)
    if pixels is not None and pixels.shape[0] not in (1, batch):
        raise ValueError(f"{pixels.shape[0]} images for {batch} outputs (prompts x num_images_per_prompt); "
                         "give one image for all, or one per output")
    # the size the denoiser works at, and the size of the images returned (PixArt's binning)
    height, width, output_size = pipe.working_size(height, width, conditioning)
    set_schedule(scheduler, steps, timesteps, sigmas, None if pixels is None else strength, device)
    shape = (batch, denoiser.config.in_channels, height // f, width // f)
    if latents is not None and tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    if latents is not None and not torch.isfinite(latents).all():
        raise FloatingPointError("the latents you passed contain NaN or inf")
    return Call(prompts, negatives, prompt_embeds, negative_prompt_embeds, clip_skip, conditioning, n, batch,
                height, width, output_size, shape, latents, pixels, generator, output_type, scheduler,
                guidance_scale, guidance_rescale, eta, tgate, deepcache, callback_on_step_end, callback_inputs,
                denoiser, vae, offload, device, dtype, bar_config, pipe.static_caches)


# diffusers' loading arguments that change nothing here, with the values that keep it so (None:
# any value). Safetensors are the only weights read; there is no safety checker nor feature
# extractor to leave out; loading is already low on CPU memory (the weights are read into the
# models built on the meta device).
HARMLESS_LOADING_ARGS = {"use_safetensors": None, "low_cpu_mem_usage": None, "requires_safety_checker": None,
                         "safety_checker": (None,), "feature_extractor": (None,)}


def check_loading_args(where: str, kwargs: dict) -> None:
    """The extra keyword arguments of a from_pretrained / from_single_file / load_pipeline: only
    diffusers' harmless ones (HARMLESS_LOADING_ARGS), anything else a TypeError naming it."""
    for key, value in kwargs.items():
        if key not in HARMLESS_LOADING_ARGS:
            raise TypeError(f"{where}() got an unexpected keyword argument {key!r} (of diffusers' loading "
                            f"arguments, only {', '.join(HARMLESS_LOADING_ARGS)} are accepted, and change nothing)")
        allowed = HARMLESS_LOADING_ARGS[key]
        if allowed is not None and value not in allowed:
            raise TypeError(f"{where}(): {key}={value!r} is not supported; there is no {key} here (pass {key}=None)")


def check_image(pipe, image, strength, height, width, latents) -> tuple[torch.Tensor, float]:
    """img2img's arguments: the image read as (N, 3, H, W) in [0, 1] (image.py), and the strength."""
    if pipe.default_strength is None:
        raise ValueError(f"{type(pipe).__name__} has no img2img (image=); diffusers has none for it either")
    strength = pipe.default_strength if strength is None else strength
    if not is_number(strength) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1] (the share of the steps run), got {strength!r}")
    if latents is not None:
        raise ValueError("give image= or latents=, not both (img2img makes its latents from the image)")
    pixels = read_image(image, MAX_SIDE)
    f, (h, w) = pipe.vae_scale_factor, pixels.shape[2:]
    if h % f or w % f or not h or not w:
        raise ValueError(f"the image is {w}x{h} pixels; img2img needs a width and height that are positive "
                         f"multiples of {f} (crop or resize it)")
    if (height is not None and height != h) or (width is not None and width != w):
        raise ValueError(f"img2img takes height and width from the image ({h}x{w}), got {height}x{width}")
    return pixels, strength


def as_list(x, name: str) -> list[str]:
    if isinstance(x, str):
        return [x]
    if isinstance(x, (list, tuple)) and x and all(isinstance(p, str) for p in x):
        return list(x)
    raise ValueError(f"{name} must be a string or a non-empty list of strings, got {x!r}")


def check_embeds(x, name: str, ndim: int):
    if not isinstance(x, torch.Tensor) or x.ndim != ndim or not x.is_floating_point():
        shape = "(batch, tokens, features)" if ndim == 3 else "(batch, features)"
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a floating-point tensor {shape}, got {got}")


def check_numbers(f: int, height, width, steps, guidance_scale, guidance_rescale, eta, num_images_per_prompt):
    """The size (positive multiples of the VAE's factor f, bounded), the steps, the guidance, eta
    and the images per prompt."""
    if not (is_int(height) and is_int(width)) or height % f or width % f or height < f or width < f:
        raise ValueError(f"height and width must be positive multiples of {f}, got {height!r}x{width!r}")
    if max(height, width) > MAX_SIDE:
        raise ValueError(f"height and width must be at most {MAX_SIDE} pixels (SDXL is trained at 1024, "
                         f"SD at 512-768), got {height}x{width}")
    if not is_int(steps) or steps < 1:
        raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
    if not is_number(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number, got {guidance_scale!r}")
    if not is_number(guidance_rescale) or not 0 <= guidance_rescale <= 1:
        raise ValueError(f"guidance_rescale must be a number in [0, 1], got {guidance_rescale!r}")
    if not is_number(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta!r}")
    if not is_int(num_images_per_prompt) or num_images_per_prompt < 1:
        raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}")


def check_objects(pipe, denoiser, batch: int, generator, latents, tgate, deepcache, clip_skip, callback,
                  callback_inputs: list):
    """The generators (one, or one per image), the latents' type, the gates and what the models
    support (DeepCache's split, clip_skip), the step callback and the tensors it may see."""
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
    check_gate_types(tgate, deepcache)
    if deepcache is not None and not hasattr(denoiser, "deep_split"):
        raise ValueError(f"DeepCache splits a UNet; the {type(denoiser).__name__} of "
                         f"{type(pipe).__name__} has no shallow branch")
    if deepcache is not None:
        denoiser.deep_split(deepcache.branch)  # a branch this UNet has, or a ValueError
    if clip_skip is not None:
        if not isinstance(pipe.text_encoder, CLIPTextModel):
            raise ValueError(f"clip_skip applies to CLIP text encoders; {type(pipe).__name__} has none")
        layers = pipe.text_encoder.config.num_hidden_layers
        if not int_in(clip_skip, 0, layers - 1):
            raise ValueError(f"clip_skip must be None or an integer in [0, {layers - 1}], got {clip_skip!r}")
    if callback is not None and not callable(callback):
        raise TypeError("callback_on_step_end must be callable")
    allowed = CALLBACK_TENSOR_INPUTS + pipe.extra_callback_inputs
    unknown = [k for k in callback_inputs if k not in allowed]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs may name {', '.join(allowed)}; "
                         f"got {', '.join(map(repr, unknown))}")


def check_text_embeddings(n_prompts: int, prompt_embeds, negative_prompt_embeds, width: int):
    """Given text embeddings: the width the denoiser reads, one row per prompt, both of one shape."""
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


def set_schedule(scheduler: Scheduler, num_inference_steps: int, timesteps, sigmas, strength, device) -> None:
    """This call's schedule, on its own scheduler copy; custom lists are checked by the scheduler.
    img2img (strength given) runs the last int(N * strength) of the N steps, as diffusers."""
    custom = {k: v for k, v in (("timesteps", timesteps), ("sigmas", sigmas)) if v is not None}
    scheduler.set_timesteps(None if custom else num_inference_steps, device=device, **custom)
    if strength is None:
        return
    steps = len(scheduler.timesteps) if custom else num_inference_steps
    begin = (steps - min(int(steps * strength), steps)) * scheduler.order  # Heun: two entries a step
    if begin >= len(scheduler.timesteps):
        raise ValueError(f"strength={strength} of num_inference_steps={steps} runs int({steps} * {strength}) "
                         "= 0 steps; give more steps or a higher strength")
    scheduler.set_begin_index(begin)
