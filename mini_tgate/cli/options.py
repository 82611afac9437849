"""The options `generate` and `batch` share: what they are, their checks (all made before the
model loads), and what they turn into: the gate, DeepCache, the device and dtype, the loaded
pipeline and the keyword arguments of its call."""

from __future__ import annotations

import argparse
import inspect
import os
import re
import secrets
import warnings
from pathlib import Path

import torch

from ..core.bounds import CLI_MAX_BATCH_SIZE, CLI_MAX_SIDE, CLI_MAX_STEPS, int_in, is_number
from ..core.image import read_image
from ..core.runtime import device_count
from ..core.schedulers import SCHEDULER_NAMES, scheduler_by_name
from ..core.tgate import DeepCache, TGate
from ..core.weights import is_repo_id
from ..loading import load_pipeline
from .loras import loras_from

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "weights" / "tiny-shapes"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICES = ("cpu", "cuda")  # what the pipeline is built and tested for (mps, xpu: not here)


# ----------------------------------------------------------------------------- gate and DeepCache (macs too)

def add_gate_options(p: argparse.ArgumentParser, defaults: TGate | None = TGate()) -> None:
    d = defaults or TGate()
    p.add_argument("--gate-step", type=int, default=d.gate_step if defaults else None,
                   help=f"TGATE gate step m (default {d.gate_step})")
    p.add_argument("--sp-interval", type=int, default=d.sp_interval,
                   help=f"self-attention interval before the gate (default {d.sp_interval})")
    p.add_argument("--fi-interval", type=int, default=d.fi_interval,
                   help=f"self-attention interval after the gate (default {d.fi_interval})")
    p.add_argument("--warm-up", type=int, default=d.warm_up,
                   help=f"steps whose self-attention is always computed (default {d.warm_up})")


def gate_from(args) -> TGate | None:
    if args.gate_step is None or getattr(args, "no_tgate", False):
        return None
    return TGate(args.gate_step, args.sp_interval, args.fi_interval, args.warm_up)


def add_deepcache_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--deepcache-interval", type=int,
                   help="DeepCache: run the whole UNet every N steps, its shallow branch in between (default: off)")
    p.add_argument("--deepcache-branch", type=int,
                   help="DeepCache's branch: where the deep part begins, 0 (the cheapest steps) to 3 x blocks - 1 "
                        "(default 0)")


def deepcache_from(args) -> DeepCache | None:
    if args.deepcache_interval is None:
        if args.deepcache_branch is not None:
            raise ValueError("--deepcache-branch needs --deepcache-interval")
        return None
    return DeepCache(args.deepcache_interval, 0 if args.deepcache_branch is None else args.deepcache_branch)


# ----------------------------------------------------------------------------- generate's options

def add_generate_options(p: argparse.ArgumentParser, prompt: str | None = None,
                         model: str | os.PathLike = DEFAULT_MODEL, prompt_argument: bool = True) -> None:
    """The options of `generate`; examples/sample.py passes a default prompt and model, `batch`
    prompt_argument=False (its prompts come from a file).
    An option added here works in `batch` too when its effect is in check_options,
    load_from_options or call_options."""
    if prompt_argument and prompt is None:
        # nargs "*": an image-to-video model (SVD) takes no prompt; check_generate asks for one otherwise
        p.add_argument("prompt", nargs="*", help="one or more prompts (quote each one); none for an "
                       "image-to-video model (Stable Video Diffusion: --image)")
    elif prompt_argument:
        p.add_argument("prompt", nargs="*", default=[prompt], help=f"one or more prompts (default: {prompt!r})")
    p.add_argument("--negative", action="append", help="negative prompt; repeat it to give one per prompt")
    p.add_argument("--model", default=str(model),
                   help=f"a diffusers folder, a hub repo id or one .safetensors file in the A1111/ComfyUI "
                        f"(LDM) layout (default: weights/{Path(model).name})")
    p.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                   help="single files only: what the UNet predicts (default: v_prediction for SD-2, else epsilon)")
    p.add_argument("--revision", help="a hub branch, tag or commit (recorded in the PNG)")
    p.add_argument("--variant", help="read *.VARIANT.safetensors, e.g. fp16")
    p.add_argument("--dtype", choices=DTYPES, help="default: float16 on CUDA, float32 on the CPU")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu)")
    p.add_argument("--steps", type=int, default=25, help=f"denoising steps, 1 to {CLI_MAX_STEPS} (default 25)")
    p.add_argument("--guidance-scale", type=float, help="CFG scale (default: the pipeline's, 7.5 SD, 5 SDXL)")
    p.add_argument("--emphasis", action=argparse.BooleanOptionalAction,
                   help="A1111's prompt emphasis, SD and SDXL: (word) x1.1, ((word)), [word] /1.1, (word:1.3), "
                        "\\( for a literal bracket, BREAK (default: on, as in A1111; --no-emphasis reads the "
                        "brackets as text)")
    p.add_argument("--scheduler", metavar="NAME",
                   help="default: the checkpoint's. Case-insensitive, A1111's names included: "
                        + ", ".join(repr(n) for n in SCHEDULER_NAMES))
    p.add_argument("--seed", type=int, default=-1,
                   help="seed of the first image; image i gets seed + i (default -1: a random seed, printed)")
    p.add_argument("--height", type=int, help=f"a multiple of 8 up to {CLI_MAX_SIDE} (default: the model's sample size x 8)")
    p.add_argument("--width", type=int, help=f"a multiple of 8 up to {CLI_MAX_SIDE} (default: the model's sample size x 8)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    # read and checked by image_option
    p.add_argument("--image", metavar="PATH", help="img2img: start from this image file (read with Pillow); "
                   "the images have its size, a multiple of 8 a side")
    p.add_argument("--strength", type=float, help="img2img: how much of --image is redrawn, in (0, 1]: the "
                   "last int(steps * strength) steps run (default: the pipeline's, 0.8 SD, 0.3 SDXL)")
    p.add_argument("--batch-size", type=int, default=1,
                   help=f"images denoised together, 1 to {CLI_MAX_BATCH_SIZE} (default 1; more is faster on a GPU)")
    add_gate_options(p)
    p.add_argument("--no-tgate", action="store_true", help="turn TGATE off (it is on by default): plain sampling")
    add_deepcache_options(p)
    p.add_argument("--lora", action="append", metavar="PATH[:SCALE]",
                   help="merge a LoRA (a .safetensors file, a folder or hub repo id holding one; diffusers or "
                        "kohya/A1111 format) scaled by SCALE (default 1); repeat it for several")
    p.add_argument("--lora-dir", metavar="DIR",
                   help="the folder of A1111's prompt tags <lora:NAME> and <lora:NAME:MULTIPLIER>: each tag is "
                        "removed from the prompt and DIR/NAME.safetensors merged, as --lora would")
    p.add_argument("--compile", action="store_true", help="torch.compile the pipeline's hot path")
    p.add_argument("--compare", action="store_true",
                   help="also run without the gate (same seed); save [no gate | TGATE | difference]")
    p.add_argument("--out", default="out/",
                   help="a .png file, or a folder (created; numbered files). Default: out/")
    p.add_argument("--overwrite", action="store_true", help="replace existing files named by --out")
    if prompt_argument:  # generate's (and examples/sample.py's), not batch's
        add_video_options(p)


def add_video_options(p: argparse.ArgumentParser) -> None:
    """Stable Video Diffusion's options (cli/video.py): --image is the input, --out an animated PNG.
    All default to None: given to a text-to-image model, each is refused."""
    g = p.add_argument_group("image to video (Stable Video Diffusion; --image is the input, no prompt)")
    g.add_argument("--frames", type=int, help="frames of the video (default: the UNet's, 14 SVD, 25 SVD-XT)")
    g.add_argument("--fps", type=int, help="frames per second: conditions the model and times the APNG (default 7)")
    g.add_argument("--motion-bucket-id", type=int, help="how much motion, 0 to 1023 (default 127)")
    g.add_argument("--noise-aug-strength", type=float,
                   help="noise added to the image before encoding it, >= 0 (default 0.02)")
    g.add_argument("--decode-chunk-size", type=int, help="frames decoded at once (default: all of them)")
    g.add_argument("--min-guidance-scale", type=float, help="CFG scale of the first frame (default 1.0)")
    g.add_argument("--max-guidance-scale", type=float,
                   help="CFG scale of the last frame (default 3.0; --guidance-scale is the same option)")
    g.add_argument("--frames-dir", metavar="DIR",
                   help="write one PNG per frame into DIR (00000.png, ...) instead of the animated PNG --out")


# ----------------------------------------------------------------------------- their checks

def check_options(args) -> None:
    """The checks of generate's options that do not depend on the prompts (shared with `batch`)."""
    if not int_in(args.steps, 1, CLI_MAX_STEPS):
        raise ValueError(f"--steps {args.steps}: must be from 1 to {CLI_MAX_STEPS} (the training timesteps of SD models)")
    check_size("height", args.height)
    check_size("width", args.width)
    if args.guidance_scale is not None and not is_number(args.guidance_scale):
        raise ValueError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    if not int_in(args.batch_size, 1, CLI_MAX_BATCH_SIZE):
        raise ValueError(f"--batch-size {args.batch_size}: must be from 1 to {CLI_MAX_BATCH_SIZE}")
    if args.scheduler is not None and args.scheduler.strip().lower() not in {n.lower() for n in SCHEDULER_NAMES}:
        raise ValueError(f"--scheduler {args.scheduler!r}: not one of {', '.join(SCHEDULER_NAMES)}")
    deepcache_from(args)  # its range here; the branch's upper bound is the UNet's, checked by the call
    for path, _ in loras_from(args):  # a typo is found before the model loads, not minutes after
        if not Path(path).expanduser().exists() and not is_repo_id(path):
            raise ValueError(f"--lora {path}: no such file or folder (and not a hub repo id 'org/name')")
    if args.lora_dir is not None and not Path(args.lora_dir).is_dir():
        raise ValueError(f"--lora-dir {args.lora_dir}: no such folder")


def check_size(name: str, value: int | None) -> None:
    if value is not None and not (int_in(value, 8, CLI_MAX_SIDE) and value % 8 == 0):
        raise ValueError(f"--{name} {value}: must be a multiple of 8 from 8 to {CLI_MAX_SIDE} "
                         f"(the VAE works on 8x8 pixel blocks; {CLI_MAX_SIDE} is 4x SDXL's trained size)")


def check_text(texts: list[str], what: str) -> None:
    """Arguments that were not UTF-8 bytes arrive as lone surrogates ("\\udcff" for the byte 0xff):
    no tokenizer or PNG can hold them, so say so now instead of failing after loading."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            byte = ord(text[e.start]) - 0xDC00 if 0xDC80 <= ord(text[e.start]) <= 0xDCFF else None
            raise ValueError(f"the {what} {text[:e.start]!r}... is not UTF-8 text"
                             + (f" (byte 0x{byte:02x} at character {e.start})" if byte is not None else "")
                             + "; set the terminal's encoding to UTF-8") from None


def image_option(args, per_line: bool = False) -> torch.Tensor | None:
    """--image, read (and --strength checked) before the model loads: the pixels or None.
    per_line: batch's prompt file gives images too (--strength is theirs then)."""
    if args.strength is not None and not 0 < args.strength <= 1:
        raise ValueError(f"--strength {args.strength}: must be in (0, 1] (the share of --steps run)")
    if args.image is None:
        if args.strength is not None and not per_line:
            raise ValueError("--strength is for img2img: give --image too")
        return None
    if not per_line:  # batch checks each line's strength (jobs.check_img2img)
        check_runs_a_step(args.strength, args.steps, "--strength")
    pixels = read_image(args.image, CLI_MAX_SIDE)
    h, w = pixels.shape[2:]
    if h % 8 or w % 8:
        raise ValueError(f"the image is {w}x{h} pixels; img2img needs a width and height that are multiples of 8 "
                         "(crop or resize it)")
    for name, value in (("height", args.height), ("width", args.width)):
        if value is not None and value != {"height": h, "width": w}[name]:
            raise ValueError(f"--{name} {value}: img2img makes images of the --image's size ({w}x{h}); drop --{name}")
    return pixels


def check_runs_a_step(strength: float | None, steps: int, what: str) -> None:
    """img2img runs the last int(steps * strength) steps (diffusers' rule): refuse none, before
    loading (shared with `batch`). `what` names the strength in the message."""
    if strength is not None and int(steps * strength) < 1:
        raise ValueError(f"{what} {strength} of --steps {steps} runs int({steps} * {strength}) = 0 steps; "
                         "give more steps or a higher strength")


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICES:
        raise ValueError(f"--device {name}: supported devices are cpu, cuda and cuda:N")
    count = device_count(device)
    if device.type == "cpu" and device.index not in (None, 0):
        raise ValueError(f"--device {name}: the CPU is one device, cpu (or cpu:0)")
    if count == 0:
        raise ValueError(f"--device {name}: CUDA is not available here")
    if (device.index or 0) >= count:
        raise ValueError(f"--device {name}: this machine has {count} CUDA device(s)")
    return device


def pick_dtype(name: str | None, device: torch.device) -> torch.dtype:
    """--dtype, by default float16 on CUDA and float32 on the CPU."""
    return DTYPES[name or ("float16" if device.type == "cuda" else "float32")]


def check_writable(folder: Path) -> None:
    """Fail before the (slow) generation when the images could not be written."""
    existing = folder
    while not existing.exists():  # the folder may not exist yet: its nearest existing ancestor
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise PermissionError(f"cannot write into {str(folder)!r}: {str(existing)!r} is not a writable folder")


def random_seed() -> int:
    """--seed -1: a random seed, drawn as A1111 draws them, in [0, 2**32)."""
    return secrets.randbelow(2**32)


# ----------------------------------------------------------------------------- what they make

def load_from_options(args, device: torch.device, dtype: torch.dtype, tagged: list[tuple[str, float]] = ()):
    """The pipeline generate's options ask for (shared with `batch`), with the LoRAs of the
    prompts' tags merged after --lora's."""
    pipe = load_pipeline(args.model, device=device, dtype=dtype, variant=args.variant, revision=args.revision,
                         prediction_type=args.prediction_type)
    loras = loras_from(args) + list(tagged)
    names = [pipe.load_lora_weights(path, scale=scale) for path, scale in loras]
    if len(names) > 1:  # every LoRA asked for, each at its scale (loading activates only the last)
        pipe.set_adapters(names, [scale for _, scale in loras])
    if args.scheduler:
        pipe.scheduler = scheduler_by_name(args.scheduler, pipe.scheduler.config)
    if args.compile:
        if hasattr(pipe, "compile"):
            pipe.compile()
        else:
            warnings.warn("this pipeline has no compile(); running without torch.compile")
    return pipe


def call_options(args, pipe) -> dict:
    """The pipeline call's keyword arguments that generate's options set, defaults resolved
    (shared with `batch`); the prompts, generators and gate are the caller's."""
    f = pipe.vae_scale_factor
    deepcache = deepcache_from(args)
    return dict(num_inference_steps=args.steps,
                guidance_scale=pipe.default_guidance_scale if args.guidance_scale is None else args.guidance_scale,
                height=args.height or pipe.denoiser.config.sample_size * f,
                width=args.width or pipe.denoiser.config.sample_size * f,
                **({} if deepcache is None else {"deepcache": deepcache}), **emphasis_option(args, pipe))


def emphasis_option(args, pipe) -> dict:
    """--emphasis/--no-emphasis as the call's `emphasis=`: SD and SDXL take it, on by default
    (A1111's habit); other pipelines have no emphasis: --emphasis given is refused, the default
    ignored (their PNGs record "Emphasis: None" for a prompt with brackets, as A1111 would)."""
    given = getattr(args, "emphasis", None)
    if takes_emphasis(pipe):
        return {"emphasis": given is not False}
    if given:
        raise ValueError(f"--emphasis: {type(pipe).__name__} has no A1111 prompt emphasis (SD and SDXL have it); "
                         "drop --emphasis")
    return {}


def takes_emphasis(pipe) -> bool:
    """Whether the pipeline's call takes `emphasis=` (SD and SDXL)."""
    from ..stable_diffusion.pipeline import StableDiffusionPipeline

    return isinstance(pipe, StableDiffusionPipeline) and (
        "emphasis" in pipe.extra_call_args or "emphasis" in inspect.signature(type(pipe).__call__).parameters)


def note_literal_emphasis(pipe, call: dict, texts) -> None:
    """One line when a prompt has A1111's emphasis brackets and the pipeline has no emphasis (PixArt,
    or a pipeline without the option): they reach the text encoder as text. (With --no-emphasis,
    SD and SDXL say so themselves.)"""
    if "emphasis" not in call and any(ch in (text or "") for text in texts for ch in "(["):
        warnings.warn(f"{type(pipe).__name__} has no A1111 prompt emphasis: brackets in the prompts are read as text")


def emphasis_name(call: dict) -> str:
    """What a PNG records of the call's emphasis, in A1111's names: "Original" (applied) or "None"."""
    return "Original" if call.get("emphasis") else "None"


def with_image(call: dict, image: torch.Tensor | None) -> dict:
    """The call's options, for img2img from `image` (None: text to image): the images have its size."""
    return call if image is None else {**call, "image": image, "height": image.shape[2], "width": image.shape[3]}


def si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def next_number(folder: Path) -> int:
    """One past the highest number a PNG's name starts with in `folder` (all its leading digits:
    "123456.png" -> 123457, "00007-cat.png" -> 8), 0 in an empty folder."""
    numbers = [int(m[0]) for f in folder.glob("[0-9]*.png") if (m := re.match(r"\d+", f.name))]
    return max(numbers, default=-1) + 1
