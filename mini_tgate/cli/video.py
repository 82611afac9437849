"""`generate` with an image-to-video model (Stable Video Diffusion): --image to an animated PNG
(--out, formats/png.py's save_apng) or to one PNG per frame (--frames-dir).

Which kind of model --model names is read before it loads: a local folder's model_index.json,
a hub repo's from the local hub cache. Where that cannot tell (a hub repo not downloaded yet),
a run with --image and no prompt is taken for a video run, and the loaded pipeline must agree.
Every option is checked before the model loads (check_video), as for images.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.bounds import CLI_MAX_SIDE, MAX_IMAGES_PER_CALL, SEED_RANGE, int_in, is_number
from ..core.image import read_image
from ..core.schedulers import a1111_names
from ..core.tgate import TGate
from ..formats.hub import model_hash
from ..formats.png import format_parameters, save_apng, save_png
from ..formats.single_file import is_single_file
from ..macs import count_macs
from ..svd.pipeline import StableVideoDiffusionPipeline
from .options import (check_size, check_writable, gate_from, load_from_options, next_number, pick_device, pick_dtype,
                      random_seed, si)

VIDEO_OPTIONS = ("frames", "fps", "motion_bucket_id", "noise_aug_strength", "decode_chunk_size",
                 "min_guidance_scale", "max_guidance_scale", "frames_dir")
DEFAULTS = dict(fps=7, motion_bucket_id=127, noise_aug_strength=0.02, min_guidance_scale=1.0, max_guidance_scale=3.0)
FRAME_NAME = re.compile(r"\d{5}\.png")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------- which kind of model

def is_video_model(model: str, revision: str | None = None) -> bool | None:
    """Whether --model names an image-to-video pipeline, from its model_index.json, without
    loading it: True or False, None where that cannot be told yet (a hub repo not in the cache)."""
    if is_single_file(model):
        return False  # single files are SD/SDXL only
    path = Path(model).expanduser()
    index = path / "model_index.json" if path.is_dir() else None
    if index is None:
        try:
            from huggingface_hub import try_to_load_from_cache
            cached = try_to_load_from_cache(str(model), "model_index.json", revision=revision)
        except Exception:  # not a repo id, no huggingface_hub: the loader says what is wrong
            return None
        index = Path(cached) if isinstance(cached, str) else None
    if index is None or not index.is_file():
        return None
    try:
        name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None  # a broken index: the loader's error
    return name in StableVideoDiffusionPipeline.model_index_names


def video_run(args) -> bool:
    """Whether this `generate` run makes a video (before loading; the loaded pipeline is checked too)."""
    video = is_video_model(args.model, args.revision)
    if video is None:
        video = not args.prompt and args.image is not None
    if not video:
        given = [flag(n) for n in VIDEO_OPTIONS if getattr(args, n, None) is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: for image-to-video models (Stable Video Diffusion, with --image "
                             f"and no prompt); not for {args.model}")
        if not args.prompt:
            raise ValueError("the following arguments are required: prompt")
    return video


# ----------------------------------------------------------------------------- the checks

@dataclass(frozen=True)
class VideoInputs:
    gate: TGate | None
    call: dict            # the pipeline call's options the arguments give (image, sizes, frames, ...)
    device: torch.device
    dtype: torch.dtype
    out: Path | None      # the APNG (a file), or a folder to number it in; None with --frames-dir
    frames_dir: Path | None


def check_video(args) -> VideoInputs:
    """Every option of a video run checked, before the model loads: one line each."""
    if args.prompt:
        raise ValueError(f"{args.model} is an image-to-video model: it takes no prompt (the video is made from "
                         "--image); drop the prompt")
    if args.image is None:
        raise ValueError(f"{args.model} is an image-to-video model: give the input image with --image PATH")
    refused = {"--negative": args.negative, "--strength": args.strength, "--lora": args.lora,
               "--lora-dir": args.lora_dir, "--scheduler": args.scheduler, "--compare": args.compare or None,
               "--deepcache-interval": args.deepcache_interval, "--deepcache-branch": args.deepcache_branch,
               "--prediction-type": args.prediction_type, "--emphasis": getattr(args, "emphasis", None) or None}
    for name, value in refused.items():
        if value is not None:
            why = ("DeepCache has no form for SVD (neither DeepCache nor tgate has one)" if "deepcache" in name
                   else "text-to-image only")
            raise ValueError(f"{name}: {why}; not for the image-to-video model {args.model}")
    if args.num_images != 1:
        raise ValueError(f"--num-images {args.num_images}: an image-to-video run makes one video (use --frames)")
    if args.batch_size != 1:
        raise ValueError(f"--batch-size {args.batch_size}: an image-to-video run makes one video (use "
                         "--decode-chunk-size to bound the memory of decoding)")
    gate = gate_from(args)
    if not int_in(args.steps, 1, 1000):
        raise ValueError(f"--steps {args.steps}: must be from 1 to 1000")
    check_size("height", args.height)
    check_size("width", args.width)
    if args.frames is not None and not int_in(args.frames, 1, MAX_IMAGES_PER_CALL):
        raise ValueError(f"--frames {args.frames}: must be from 1 to {MAX_IMAGES_PER_CALL}")
    if args.decode_chunk_size is not None and not int_in(args.decode_chunk_size, 1, MAX_IMAGES_PER_CALL):
        raise ValueError(f"--decode-chunk-size {args.decode_chunk_size}: must be from 1 to {MAX_IMAGES_PER_CALL}")
    fps = DEFAULTS["fps"] if args.fps is None else args.fps
    if not int_in(fps, 1, 65535):
        raise ValueError(f"--fps {fps}: must be from 1 to 65535 (an APNG's frame delay is 1/fps s, 16-bit)")
    motion = DEFAULTS["motion_bucket_id"] if args.motion_bucket_id is None else args.motion_bucket_id
    if not int_in(motion, 0, 1023):
        raise ValueError(f"--motion-bucket-id {motion}: must be from 0 to 1023 (SVD was trained on 0 to 255)")
    noise = DEFAULTS["noise_aug_strength"] if args.noise_aug_strength is None else args.noise_aug_strength
    if not (is_number(noise) and 0 <= noise <= 10):
        raise ValueError(f"--noise-aug-strength {noise}: must be a number from 0 to 10")
    if args.guidance_scale is not None and args.max_guidance_scale is not None:
        raise ValueError("--guidance-scale and --max-guidance-scale are the same option for SVD: give one")
    top = args.max_guidance_scale if args.guidance_scale is None else args.guidance_scale
    name = "--max-guidance-scale" if args.guidance_scale is None else "--guidance-scale"
    top = DEFAULTS["max_guidance_scale"] if top is None else top
    low = DEFAULTS["min_guidance_scale"] if args.min_guidance_scale is None else args.min_guidance_scale
    for n, v in ((name, top), ("--min-guidance-scale", low)):
        if not is_number(v):
            raise ValueError(f"{n} must be a finite number, got {v}")
    if args.seed != -1 and not int_in(args.seed, 0, SEED_RANGE - 1):
        raise ValueError(f"--seed {args.seed}: must be -1 (random) or from 0 to 2**63 - 1")
    read_image(args.image, CLI_MAX_SIDE)  # a missing or unreadable file now, not after loading
    out, frames_dir = output_paths(args)
    device = pick_device(args.device)
    call = dict(image=args.image, height=args.height, width=args.width, num_frames=args.frames,
                num_inference_steps=args.steps, min_guidance_scale=low, max_guidance_scale=top, fps=fps,
                motion_bucket_id=motion, noise_aug_strength=noise, decode_chunk_size=args.decode_chunk_size)
    return VideoInputs(gate, call, device, pick_dtype(args.dtype, device), out, frames_dir)


def output_paths(args) -> tuple[Path | None, Path | None]:
    """(--out's APNG file or folder, --frames-dir), checked: an existing file named is an error
    unless --overwrite; nothing is created here."""
    if args.frames_dir is not None:
        if args.out != "out/":  # --out's default: the APNG or the frames, not both
            raise ValueError("--frames-dir writes the frames instead of the animated PNG: drop --out")
        folder = Path(args.frames_dir)
        if folder.exists() and not folder.is_dir():
            raise NotADirectoryError(f"--frames-dir {args.frames_dir}: not a folder")
        if folder.is_dir() and not args.overwrite:
            taken = sorted(f.name for f in folder.iterdir() if FRAME_NAME.fullmatch(f.name))
            if taken:
                raise FileExistsError(f"--frames-dir {args.frames_dir}: holds {taken[0]} already; pass --overwrite "
                                      "to replace the frames, or name another folder")
        check_writable(folder)
        return None, folder
    path = Path(args.out)
    if args.out.endswith(("/", "\\")) or path.is_dir() or not path.suffix:
        check_writable(path)
        return path, None
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {args.out}: a video is written as an animated PNG; name a .png file, or a folder "
                         "ending in /")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out {args.out}: the folder {str(path.parent)!r} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"--out {args.out}: {str(path)!r} is a folder")
    if path.exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out}: {str(path)!r} exists; pass --overwrite to replace it, or name "
                              "another file")
    check_writable(path.parent)
    return path, None


# ----------------------------------------------------------------------------- the run

def video_command(args, start: float) -> None:
    """A video run: check, seed, load, generate, save, report."""
    inputs = check_video(args)
    seed = random_seed() if args.seed == -1 else args.seed
    print(f"seed {seed}" + (": random; rerun with --seed to get the same" if args.seed == -1 else ""))
    pipe = load_from_options(args, inputs.device, inputs.dtype)
    if not isinstance(pipe, StableVideoDiffusionPipeline):
        raise ValueError(f"{args.model} is a text-to-image model ({type(pipe).__name__}): give a prompt "
                         "(--image then starts img2img)")
    load_time = time.perf_counter() - start
    print(f"loaded {args.model} ({type(pipe).__name__}, {type(pipe.scheduler).__name__}) on {inputs.device} "
          f"in {str(inputs.dtype).removeprefix('torch.')}: {load_time:.1f} s")
    out = pipe(**inputs.call, generator=torch.Generator(device="cpu").manual_seed(seed), tgate=inputs.gate,
               output_type="np", progress=True)
    frames = out.frames[0]  # (F, H, W, 3) in [0, 1]
    params = video_parameters(args, pipe, inputs, seed, frames)
    if inputs.frames_dir is not None:
        inputs.frames_dir.mkdir(parents=True, exist_ok=True)
        for i, frame in enumerate(frames):  # a frame file created since the check is still not replaced
            save_png(inputs.frames_dir / f"{i:05d}.png", frame, format_parameters({**params, "frame": i}),
                     overwrite=args.overwrite)
        print(f"saved {len(frames)} frames in {inputs.frames_dir}/ (00000.png to {len(frames) - 1:05d}.png)")
    else:
        path = save_video(inputs.out, frames, params, args.overwrite)
        print(f"saved {path} ({len(frames)} frames, {params['fps']} fps)")
    t = out.timings
    steps = len(out.steps)
    print(f"done in {time.perf_counter() - start:.1f} s: load {load_time:.2f} s, image {t['text']:.2f} s, "
          f"denoise {t['denoise']:.2f} s ({steps / t['denoise']:.1f} steps/s), decode {t['decode']:.2f} s")
    print_video_macs(pipe, inputs, frames, steps)


def video_parameters(args, pipe, inputs: VideoInputs, seed: int, frames) -> dict:
    """What the APNG (and each frame's PNG) records: format_parameters' keys, and the video's."""
    c, info = inputs.call, pipe.model_info
    sampler, schedule_type = a1111_names(pipe.scheduler)
    return dict(seed=seed, steps=args.steps, guidance_scale=c["max_guidance_scale"], sampler=sampler,
                schedule_type=schedule_type, scheduler=type(pipe.scheduler).__name__, tgate=inputs.gate,
                model=info["name"], model_hash=model_hash(info["folder"], args.variant),
                model_revision=info.get("revision"), width=frames.shape[2], height=frames.shape[1],
                dtype=inputs.dtype, image=Path(args.image).name, frames=len(frames), fps=c["fps"],
                motion_bucket_id=c["motion_bucket_id"], noise_aug_strength=c["noise_aug_strength"],
                min_guidance_scale=c["min_guidance_scale"], max_guidance_scale=c["max_guidance_scale"],
                decode_chunk_size=c["decode_chunk_size"] or len(frames))


def save_video(out: Path, frames, params: dict, overwrite: bool) -> Path:
    """The APNG: at `out` (a .png file), or into the folder `out` as the first free NNNNN.png,
    each number claimed by creating its file exclusively (as images are numbered)."""
    text = format_parameters(params)
    if out.suffix.lower() == ".png" and not out.is_dir():
        save_apng(out, frames, params["fps"], text, overwrite=overwrite)
        return out

    out.mkdir(parents=True, exist_ok=True)
    n = next_number(out)
    while True:
        path = out / f"{n:05d}.png"
        try:
            save_apng(path, frames, params["fps"], text, overwrite=False)
            return path
        except FileExistsError:
            n += 1


def print_video_macs(pipe, inputs: VideoInputs, frames, steps: int) -> None:
    """The UNet's MACs for the video, and with the gate how many fewer."""
    c = inputs.call
    guidance = max(c["min_guidance_scale"], c["max_guidance_scale"])
    size = dict(height=frames.shape[1], width=frames.shape[2])
    base = count_macs(pipe.unet.config, size["height"], size["width"], steps, guidance, None,
                      frames=len(frames))["denoiser_macs"]
    gated = None if inputs.gate is None else count_macs(pipe.unet.config, size["height"], size["width"], steps,
                                                        guidance, inputs.gate, frames=len(frames))["denoiser_macs"]

    if gated is None:
        print(f"UNet: {si(base)} MACs per video (no gate)")
    else:
        print(f"TGATE (gate step {inputs.gate.gate_step}, sp_interval {inputs.gate.sp_interval}, fi_interval "
              f"{inputs.gate.fi_interval}, warm-up {inputs.gate.warm_up}): UNet {si(gated)} MACs per video "
              f"instead of {si(base)}, {1 - gated / base:.1%} fewer")
