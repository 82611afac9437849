"""Stable Video Diffusion: one image to a short video, on the core's call and denoising loop.

Reimplements diffusers' `StableVideoDiffusionPipeline` (pipelines/stable_video_diffusion/
pipeline_stable_video_diffusion.py) and, with a `TGate`, the `tgate` package's `TgateSVDLoader`.
What SVD brings to the core's call (core/pipeline.py: check, encode, initial latents, plan,
denoise, decode):

    image ─ preprocess_image ─ CLIP vision ─> one image token (B, 1, D), the context of every cross-attention
    image + noise_aug_strength * noise ─ VAE encoder, mode, unscaled ─> image latents, one copy per frame
    (fps - 1, motion_bucket_id, noise_aug_strength) ─> added time ids, embedded as SDXL embeds its sizes
    noise (B, F, 4, H/f, W/f) ─> [ UNet([latents, image latents]) + per-frame CFG ─ Euler ] x steps ─> VAE decode

The generator draws the noise augmentation first, then the initial noise. Classifier-free guidance
(CFG, when max_guidance_scale > 1; or min_guidance_scale, where diffusers crashes) conditions the
unconditional branch on zeros (image token and image latents) and mixes per frame, with a scale
from min_guidance_scale (first frame) linearly to max_guidance_scale (last frame). With a TGate the plan is the core's plan(), but after the gate
the conditional branch runs alone (`gated_branch`), tgate's choice for SVD; text to image keeps the
unconditional one. DeepCache has no SVD form (neither package has one): refused.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.bounds import MAX_IMAGES_PER_CALL, MAX_SIDE, is_int, is_number
from ..core.image import read_image
from ..core.inputs import Call, check_numbers, check_objects, set_schedule
from ..core.pipeline import DiffusionPipeline, PipelineOutput, half_hint
from ..core.runtime import on_device
from ..core.schedulers import Scheduler, randn_tensor
from ..core.weights import CheckpointError, read_json
from ..formats.save import SaveMixin
from .clip_vision import CLIP_MEAN, CLIP_STD, CLIPVisionModelWithProjection, preprocess_image
from .unet import UNetSpatioTemporalConditionModel
from .vae import AutoencoderKLTemporalDecoder


class StableVideoDiffusionPipeline(SaveMixin, DiffusionPipeline):
    """Image to video: SVD (14 frames) and SVD-XT (25). Parts: unet, vae (temporal decoder),
    image_encoder (CLIP vision), scheduler (Euler, continuous timesteps); the feature extractor's
    mean and std."""

    model_index_names = ("StableVideoDiffusionPipeline",)
    default_steps = 25  # diffusers' SVD default
    vae_class = AutoencoderKLTemporalDecoder
    gated_branch = "cond"  # TgateSVDLoader: after the gate the image branch runs alone

    def __init__(self, unet: UNetSpatioTemporalConditionModel, vae: AutoencoderKLTemporalDecoder,
                 image_encoder: CLIPVisionModelWithProjection, scheduler: Scheduler, image_mean=CLIP_MEAN,
                 image_std=CLIP_STD):
        super().__init__(vae, None, None, scheduler)  # no text encoder, no tokenizer
        self.unet, self.image_encoder = unet, image_encoder
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)  # CLIP's input normalisation

    @classmethod
    def load_components(cls, folder: Path, index: dict, kw: dict) -> dict:
        path = folder / "feature_extractor" / "preprocessor_config.json"  # CLIPImageProcessor's: mean, std
        extractor = read_json(path)
        mean, std = extractor.get("image_mean", CLIP_MEAN), extractor.get("image_std", CLIP_STD)
        if not all(isinstance(v, list) and len(v) == 3 and all(map(is_number, v)) for v in (mean, std)) or 0 in std:
            raise CheckpointError(f"{path}: image_mean and image_std must be lists of 3 numbers (std not 0)")
        return dict(unet=UNetSpatioTemporalConditionModel.from_pretrained(folder, subfolder="unet", **kw),
                    image_encoder=CLIPVisionModelWithProjection.from_pretrained(folder, subfolder="image_encoder", **kw),
                    image_mean=mean, image_std=std)

    @property
    def denoiser(self) -> torch.nn.Module:
        return self.unet

    def text_encoders(self) -> list:
        """The encoders of the conditioning (moved with the rest): the image encoder."""
        return [self.image_encoder]

    def __call__(self, image, height: int | None = 576, width: int | None = 1024, num_frames: int | None = None,
                 num_inference_steps: int = 25, min_guidance_scale: float = 1.0, max_guidance_scale: float = 3.0,
                 fps: int = 7, motion_bucket_id: int = 127, noise_aug_strength: float = 0.02,
                 decode_chunk_size: int | None = None, generator=None, latents: torch.Tensor | None = None,
                 tgate=None, output_type: str = "np", deepcache=None, progress: bool | None = None,
                 sigmas: list | None = None, callback_on_step_end=None,
                 callback_on_step_end_tensor_inputs=("latents",), return_dict: bool = True) -> PipelineOutput:
        """A video of `image` (a PIL image, uint8 array (H, W, 3), float tensor (1, 3, H, W) in [0, 1],
        or a file; an array or tensor of N images makes N videos). Its `.frames` (`.images`) are
        (N, F, H, W, 3) in [0, 1] for "np", (N, F, 3, H, W) for "pt", the latents for "latent".
        height/width None: the UNet's sample_size times the VAE's factor; num_frames None: the
        UNet's; decode_chunk_size None: all frames of a video at once. The rest as in the core's call;
        return_dict=False returns the frames alone (diffusers' SVD: not a tuple)."""
        c = check_video_call(self, **{k: v for k, v in locals().items() if k not in ("self", "return_dict")})
        out = self.generate(c)
        return out if return_dict else out.frames

    def encode(self, c: Call) -> tuple[dict, dict | None]:
        """The UNet's conditioning (diffusers' _encode_image, _encode_vae_image, _get_add_time_ids):
        the CLIP image token, the noise-augmented image's latents (the generator's first draw) for
        every frame, the added time ids; with CFG, the unconditional branch's zeros too."""
        a, encoder = c.conditioning, c.conditioning["image_encoder"]
        with on_device([encoder], c.offload):  # resized on the CPU as diffusers resizes, to 224 (SVD's image_size)
            pixel_values = preprocess_image(2 * a["image"] - 1, encoder.config.image_size, self.image_mean,
                                            self.image_std)
            embeds = encoder(pixel_values.to(c.device)).image_embeds[:, None].to(c.dtype)  # (B, 1, D)
        x = (2 * a["pixels"] - 1).to(c.device)  # the VAE's view: [-1, 1] at height x width
        x = x + a["noise_aug_strength"] * randn_tensor(x.shape, c.generator, c.device, x.dtype)
        with on_device([c.vae], c.offload):
            z = c.vae.encode(x).mode().to(c.dtype)  # no scaling factor: SVD was trained so
        z = z[:, None].repeat(1, a["num_frames"], 1, 1, 1)  # (B, F, 4, h, w)
        ids = torch.tensor([[a["fps"] - 1, a["motion_bucket_id"], a["noise_aug_strength"]]], dtype=c.dtype)
        cond = {"encoder_hidden_states": embeds, "added_time_ids": ids.repeat(c.batch, 1).to(c.device), "concat": z}
        if not a["cfg"]:
            return cond, None
        return cond, {**cond, "encoder_hidden_states": torch.zeros_like(embeds), "concat": torch.zeros_like(z)}

    def decode_latents(self, c: Call, latents: torch.Tensor):
        """diffusers' decode_latents and postprocess_video: decode_chunk_size frames at a time, each
        chunk one video to the temporal decoder (chunks run on across the videos of a batch)."""
        vae, n = c.vae, c.conditioning["decode_chunk_size"]
        z = vae.unscale_latents(latents.flatten(0, 1))  # (B*F, 4, h, w)
        frames = torch.cat([vae.decode(z[i:i + n], len(z[i:i + n])) for i in range(0, len(z), n)])
        video = frames.reshape(*latents.shape[:2], *frames.shape[1:]).float()  # (B, F, 3, H, W)
        if not torch.isfinite(video).all():
            raise FloatingPointError("the decoded video contains NaN or inf: the VAE's weights produce them"
                                     + half_hint(vae.dtype))
        video = (video / 2 + 0.5).clamp(0, 1)
        if c.output_type == "pt":
            return video
        video = video.cpu().permute(0, 1, 3, 4, 2).numpy()  # (B, F, H, W, 3)
        if c.output_type == "pil":
            from PIL import Image  # optional: only for output_type="pil"
            return [[Image.fromarray((f * 255).round().astype("uint8")) for f in v] for v in video]
        return video


def check_video_call(pipe: StableVideoDiffusionPipeline, image, height, width, num_frames, num_inference_steps,
                     min_guidance_scale, max_guidance_scale, fps, motion_bucket_id, noise_aug_strength,
                     decode_chunk_size, generator, latents, tgate, output_type, deepcache, progress, sigmas,
                     callback_on_step_end, callback_on_step_end_tensor_inputs) -> Call:
    """SVD's arguments checked in this order (with core/inputs.py's checks where they are the
    same) and completed into the core's Call; what the call reads of the pipeline, read once."""
    unet, vae, encoder, offload, f = pipe.unet, pipe.vae, pipe.image_encoder, pipe.offload_device, pipe.vae_scale_factor
    bar_config = {**pipe.progress_bar_config, **({} if progress is None else {"disable": not progress})}
    scheduler, device, dtype = copy.deepcopy(pipe.scheduler), offload or pipe.device, next(unet.parameters()).dtype
    pixels = numpy_layout(read_image(image, MAX_SIDE))  # (B, 3, h, w) in [0, 1]
    side = unet.config.sample_size * f if is_int(unet.config.sample_size) else None  # the trained size
    height, width = side if height is None else height, side if width is None else width
    num_frames = unet.config.num_frames if num_frames is None else num_frames
    decode_chunk_size = num_frames if decode_chunk_size is None else decode_chunk_size
    for name, x in (("num_frames", num_frames), ("decode_chunk_size", decode_chunk_size)):
        if not is_int(x) or x < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {x!r}")
    for name, x in (("min_guidance_scale", min_guidance_scale), ("max_guidance_scale", max_guidance_scale),
                    ("fps", fps), ("motion_bucket_id", motion_bucket_id), ("noise_aug_strength", noise_aug_strength)):
        if not is_number(x):
            raise ValueError(f"{name} must be a finite number, got {x!r}")
    check_numbers(f, height, width, num_inference_steps, max_guidance_scale, 0.0, 0.0, 1)
    batch, frames = len(pixels), int(num_frames)
    if batch * frames > MAX_IMAGES_PER_CALL:
        raise ValueError(f"videos x num_frames must be at most {MAX_IMAGES_PER_CALL} frames per call, got "
                         f"{batch} x {frames}")
    if output_type not in ("np", "pt", "latent", "pil"):
        raise ValueError(f"output_type must be 'np', 'pt', 'latent' or 'pil', got {output_type!r}")
    callback_inputs = list(callback_on_step_end_tensor_inputs or ())
    if any(k != "latents" for k in callback_inputs):  # diffusers' SVD shows its step callback nothing else
        raise ValueError(f"callback_on_step_end_tensor_inputs may name 'latents' only, got {callback_inputs}")
    check_objects(pipe, unet, batch, generator, latents, tgate, deepcache, None, callback_on_step_end, callback_inputs)
    ids = unet.config.projection_class_embeddings_input_dim // unet.config.addition_time_embed_dim
    if ids != 3:  # diffusers' ValueError too
        raise ValueError(f"the UNet embeds {ids} added time ids; SVD gives 3 (fps, motion bucket, noise augmentation)")
    set_schedule(scheduler, int(num_inference_steps), None, sigmas, None, device)
    shape = (batch, frames, unet.config.in_channels // 2, height // f, width // f)
    if latents is not None and tuple(latents.shape) != shape:
        raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
    if latents is not None and not torch.isfinite(latents).all():
        raise FloatingPointError("the latents you passed contain NaN or inf")
    # the guidance of each frame, (B, F, 1, 1, 1): min_guidance_scale at the first, max_guidance_scale at the
    # last; CFG when one of them is > 1 (diffusers: max_guidance_scale > 1, and a crash if only min is)
    guidance = torch.linspace(min_guidance_scale, max_guidance_scale, frames)[None].to(device, dtype)
    guidance = guidance.repeat(batch, 1)[..., None, None, None]
    conditioning = dict(image=pixels, pixels=numpy_layout(fit(image, pixels, height, width)), image_encoder=encoder,
                        num_frames=frames, fps=fps, motion_bucket_id=motion_bucket_id,
                        noise_aug_strength=noise_aug_strength, decode_chunk_size=int(decode_chunk_size),
                        cfg=max(min_guidance_scale, max_guidance_scale) > 1)
    return Call(prompts=None, negatives=None, prompt_embeds=None, negative_prompt_embeds=None, clip_skip=None,
                conditioning=conditioning, num_images_per_prompt=1, batch=batch, height=height, width=width,
                output_size=None, shape=shape, latents=latents, pixels=None, generator=generator,
                output_type=output_type, scheduler=scheduler, guidance_scale=guidance, guidance_rescale=0.0, eta=0.0,
                tgate=tgate, deepcache=deepcache, callback=callback_on_step_end, callback_inputs=callback_inputs,
                denoiser=unet, vae=vae, offload=offload, device=device, dtype=dtype, bar_config=bar_config,
                static_caches=pipe.static_caches)


def fit(image, pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The image at height x width for the VAE, resized as diffusers' VideoProcessor resizes: float
    values as a tensor, with torch's nearest-neighbour interpolate; the rest (PIL images, files,
    uint8) as PIL images, with Pillow's Lanczos filter. CLIP sees the image as it came."""
    if tuple(pixels.shape[2:]) == (height, width):
        return pixels
    if getattr(image, "dtype", np.uint8) not in (np.uint8, torch.uint8):
        return F.interpolate(pixels, size=(height, width))
    from PIL import Image  # uint8 values: v / 255 * 255 rounds back to v

    resized = [np.asarray(Image.fromarray(p.permute(1, 2, 0).mul(255).round().byte().numpy()).resize(
        (width, height), Image.Resampling.LANCZOS)) for p in pixels]
    return torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255


def numpy_layout(x: torch.Tensor) -> torch.Tensor:
    """Images (N, C, H, W) laid out as diffusers lays them out: a fresh (N, H, W, C) array, permuted.
    CPU kernels round the last bit differently on other strides (a size-1 axis's too), so every
    kind of image would give other last bits."""
    return x.permute(0, 2, 3, 1).clone(memory_format=torch.contiguous_format).permute(0, 3, 1, 2)
