"""Command line.

    python -m mini_tgate generate "a photo of a cat" --model stable-diffusion-v1-5/stable-diffusion-v1-5
    python -m mini_tgate generate "a red circle on a blue background" --compare   # without and with TGATE
    python -m mini_tgate info out/00000.png                      # how an image was made
    python -m mini_tgate macs --arch sdxl --gate-step 10         # the MACs the gate saves, no weights

`generate` with no --model runs the embedded tiny model trained on coloured shapes
(weights/tiny-shapes, 64x64; weights/README.md), in seconds. `examples/sample.py` is `generate`
with a default prompt. Bad input ends with one line `error: ...` on stderr and a non-zero exit
code, never a traceback.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import secrets
import sys
import time
import warnings
from pathlib import Path

import torch

from ..core.bounds import CLI_MAX_BATCH_SIZE, CLI_MAX_IMAGES, CLI_MAX_SIDE, CLI_MAX_STEPS, SEED_RANGE
from ..core.config import ConfigError
from ..core.image import read_image
from ..core.schedulers import SCHEDULER_NAMES, a1111_names, scheduler_by_name
from ..core.tgate import DeepCache, TGate
from ..core.weights import CheckpointError, is_repo_id
from ..formats.hub import model_hash
from ..formats.png import describe, format_parameters, image_grid, save_png, side_by_side, to_uint8
from ..loading import load_pipeline
from ..macs import count_macs
from . import batch
from .batch import EXTRA_NETWORK, untagged

DEFAULT_MODEL = Path(__file__).resolve().parents[2] / "weights" / "tiny-shapes"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEVICES = ("cpu", "cuda")  # what the pipeline is built and tested for (mps, xpu: not here)
ERRORS = (CheckpointError, ConfigError, ValueError, OSError, FloatingPointError, TypeError, ImportError)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error here; the usage is in --help
        self.exit(2, f"error: {message} (see --help)\n")


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


# ----------------------------------------------------------------------------- generate: options

def add_generate_options(p: argparse.ArgumentParser, prompt: str | None = None,
                         model: str | os.PathLike = DEFAULT_MODEL, prompt_argument: bool = True) -> None:
    """The options of `generate`; examples/sample.py passes a default prompt and model, `batch`
    prompt_argument=False (its prompts come from a file).
    An option added here works in `batch` too when its effect is in check_options,
    load_from_options or call_options."""
    if prompt_argument and prompt is None:
        p.add_argument("prompt", nargs="+", help="one or more prompts (quote each one)")
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
    p.add_argument("--no-tgate", action="store_true", help="plain sampling, no gate")
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


# ----------------------------------------------------------------------------- output files

def output_files(out: str, n: int, overwrite: bool = False) -> tuple[Path, list[Path] | None, Path | None]:
    """Where n images go: (folder, files, grid). A folder (a name ending in "/", an existing
    folder, or a name with no suffix) gets numbered files, picked as each is written (files None);
    a .png file gets the image, or with several images NAME-0.png, NAME-1.png, ... and the grid
    in NAME.png. Nothing is created here, but every named file that exists is an error unless
    `overwrite`: the run fails before generating instead of after."""
    path = Path(out)
    if out.endswith(("/", os.sep)) or path.is_dir() or not path.suffix:
        return path, None, None
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: images are written as PNG; name a .png file, or a folder ending in /")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {str(path.parent)!r} does not exist")
    files, grid = ([path], None) if n == 1 else ([path.with_name(f"{path.stem}-{i}.png") for i in range(n)], path)
    for f in files + [grid] * (grid is not None):
        if f.is_dir():
            raise IsADirectoryError(f"--out {out}: {str(f)!r} is a folder")
        if f.exists() and not overwrite:
            raise FileExistsError(f"--out {out}: {str(f)!r} exists; pass --overwrite to replace it, or name another file")
    return path.parent, files, grid


def check_writable(folder: Path) -> None:
    """Fail before the (slow) generation when the images could not be written."""
    existing = folder
    while not existing.exists():  # the folder may not exist yet: its nearest existing ancestor
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise PermissionError(f"cannot write into {str(folder)!r}: {str(existing)!r} is not a writable folder")


def next_number(folder: Path) -> int:
    """One past the highest number a PNG's name starts with in `folder` (all its leading digits:
    "123456.png" -> 123457, "00007-cat.png" -> 8), 0 in an empty folder."""
    numbers = [int(m[0]) for f in folder.glob("[0-9]*.png") if (m := re.match(r"\d+", f.name))]
    return max(numbers, default=-1) + 1


def save_numbered(folder: Path, image, text: dict, first: int) -> tuple[Path, int]:
    """Save into `folder` as NNNNN.png, the first free number from `first` on: each number is
    claimed by creating its file exclusively, so two runs writing into one folder at the same
    time never write the same file. Returns the path and the next number to try."""
    n = first
    while True:  # ends: each failed try is a file that exists, and a folder holds finitely many
        path = folder / f"{n:05d}.png"
        try:
            save_png(path, image, text, overwrite=False)  # fails if the name is taken, even just now
            return path, n + 1
        except FileExistsError:
            n += 1


# ----------------------------------------------------------------------------- generate

def si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def phases(out, steps: int) -> str:
    t = out.timings
    return (f"text {t['text']:.2f} s, denoise {t['denoise']:.2f} s ({steps / t['denoise']:.1f} steps/s), "
            f"decode {t['decode']:.2f} s")


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


def check_size(name: str, value: int | None) -> None:
    if value is not None and not (8 <= value <= CLI_MAX_SIDE and value % 8 == 0):
        raise ValueError(f"--{name} {value}: must be a multiple of 8 from 8 to {CLI_MAX_SIDE} "
                         f"(the VAE works on 8x8 pixel blocks; {CLI_MAX_SIDE} is 4x SDXL's trained size)")


def pick_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICES:
        raise ValueError(f"--device {name}: supported devices are cpu, cuda and cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available here")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def check_options(args) -> None:
    """The checks of generate's options that do not depend on the prompts (shared with `batch`)."""
    if not 1 <= args.steps <= CLI_MAX_STEPS:
        raise ValueError(f"--steps {args.steps}: must be from 1 to {CLI_MAX_STEPS} (the training timesteps of SD models)")
    check_size("height", args.height)
    check_size("width", args.width)
    if args.guidance_scale is not None and not math.isfinite(args.guidance_scale):
        raise ValueError(f"--guidance-scale must be a finite number, got {args.guidance_scale}")
    if not 1 <= args.batch_size <= CLI_MAX_BATCH_SIZE:
        raise ValueError(f"--batch-size {args.batch_size}: must be from 1 to {CLI_MAX_BATCH_SIZE}")
    if args.scheduler is not None and args.scheduler.strip().lower() not in {n.lower() for n in SCHEDULER_NAMES}:
        raise ValueError(f"--scheduler {args.scheduler!r}: not one of {', '.join(SCHEDULER_NAMES)}")
    deepcache_from(args)  # its range here; the branch's upper bound is the UNet's, checked by the call
    for path, _ in loras_from(args):  # a typo is found before the model loads, not minutes after
        if not Path(path).expanduser().exists() and not is_repo_id(path):
            raise ValueError(f"--lora {path}: no such file or folder (and not a hub repo id 'org/name')")
    if args.lora_dir is not None and not Path(args.lora_dir).is_dir():
        raise ValueError(f"--lora-dir {args.lora_dir}: no such folder")


def loras_from(args) -> list[tuple[str, float]]:
    """--lora PATH[:SCALE] values as (path, scale). A last ':' followed by a number is the scale;
    any other ':' belongs to the path."""
    loras = []
    for value in getattr(args, "lora", None) or []:
        path, colon, scale = value.rpartition(":")
        try:
            number = float(scale) if colon and path else None
        except ValueError:
            number = None
        if number is not None and not math.isfinite(number):
            raise ValueError(f"--lora {value}: the scale must be a finite number")
        loras.append((value, 1.0) if number is None else (path, number))
    return loras


def prompt_tags(prompt: str) -> list[tuple[str, float]]:
    """The LoRAs that A1111's extra-network tags in a prompt name, as (NAME, MULTIPLIER) in order.
    Only prompts are read, as in A1111 (`parse_extra_network_prompts` reads the prompts alone): a
    tag in a negative prompt is text like any other. The tags are A1111's
    (modules/extra_networks.py): `<KIND:ARGS>` with KIND a word and ARGS anything but '>' split at
    ':', so NAME may hold spaces and dots, not ':'; only KIND "lora" with one or two ARGS is taken. A NAME tagged twice is merged twice, both
    times at its last tag's multiplier, as A1111 does (its load_networks keeps one object per
    name, whose multiplier the last tag sets, and lists it once per tag)."""
    tags = []
    for m in EXTRA_NETWORK.finditer(prompt):
        kind, args = m[1], m[2].split(":")
        if kind != "lora":
            raise ValueError(f"{m[0]}: <{kind}:...> extra networks are not supported, only <lora:NAME[:MULTIPLIER]>")
        if len(args) > 2:
            raise ValueError(f"{m[0]}: separate text encoder and UNet multipliers are not supported; "
                             "write <lora:NAME> or <lora:NAME:MULTIPLIER>")
        try:
            scale = float(args[1]) if len(args) == 2 else 1.0
        except ValueError:
            raise ValueError(f"{m[0]}: the multiplier {args[1]!r} is not a number") from None
        if not math.isfinite(scale):
            raise ValueError(f"{m[0]}: the multiplier must be a finite number")
        tags.append((args[0], scale))
    last = dict(tags)
    return [(name, last[name]) for name, _ in tags]


def tag_loras(prompts: list[str], lora_dir: str | None, where) -> list[tuple[str, float]]:
    """The LoRA files (DIR/NAME.safetensors, multiplier) that the tags of the prompts name; every
    prompt must name the same ones in the same order (one model state a run; the order of the
    merges decides the last bits). `where(i)` names prompt i in messages."""
    def shown(tags):
        return " ".join(f"<lora:{name}:{scale:g}>" for name, scale in tags) or "none"

    first = prompt_tags(prompts[0])
    for i, prompt in enumerate(prompts[1:], 1):
        if (tags := prompt_tags(prompt)) != first:
            raise ValueError(f"{where(i)} names other LoRAs than {where(0)} ({shown(tags)}, not {shown(first)}): "
                             "the weights are merged once a run, so every prompt must name the same; run them apart")
    loras = []
    for name, scale in first:
        tag = f"<lora:{name}>"
        if lora_dir is None:
            raise ValueError(f"{tag}: LoRA tags need --lora-dir, the folder of their NAME.safetensors files")
        if not name.strip() or Path(name).is_absolute() or ".." in Path(name).parts:
            raise ValueError(f"{tag}: a tag names a file in --lora-dir (no absolute path, no '..')")
        path = Path(lora_dir) / f"{name}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"{tag}: no file {str(path)!r}")
        loras.append((str(path), scale))
    return loras


def load_from_options(args, device: torch.device, dtype: torch.dtype, tagged: list[tuple[str, float]] = ()):
    """The pipeline generate's options ask for (shared with `batch`), with the LoRAs of the
    prompts' tags merged after --lora's."""
    pipe = load_pipeline(args.model, device=device, dtype=dtype, variant=args.variant, revision=args.revision,
                         prediction_type=args.prediction_type)
    for path, scale in loras_from(args) + list(tagged):
        pipe.load_lora_weights(path, scale=scale)
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
                **({} if deepcache is None else {"deepcache": deepcache}))


def image_option(args, per_line: bool = False) -> torch.Tensor | None:
    """--image, read (and --strength checked) before the model loads: the pixels or None.
    per_line: batch's prompt file gives images too (--strength is theirs then)."""
    if args.strength is not None and not 0 < args.strength <= 1:
        raise ValueError(f"--strength {args.strength}: must be in (0, 1] (the share of --steps run)")
    if args.image is None:
        if args.strength is not None and not per_line:
            raise ValueError("--strength is for img2img: give --image too")
        return None
    pixels = read_image(args.image, CLI_MAX_SIDE)
    h, w = pixels.shape[2:]
    if h % 8 or w % 8:
        raise ValueError(f"the image is {w}x{h} pixels; img2img needs a width and height that are multiples of 8 "
                         "(crop or resize it)")
    for name, value in (("height", args.height), ("width", args.width)):
        if value is not None and value != {"height": h, "width": w}[name]:
            raise ValueError(f"--{name} {value}: img2img makes images of the --image's size ({w}x{h}); drop --{name}")
    return pixels


def generate_command(args) -> None:
    start = time.perf_counter()
    # Everything the arguments alone decide is checked here, before the model (minutes for SDXL) loads.
    gate = gate_from(args)
    if args.compare and gate is None:
        raise ValueError("--compare runs without and with the gate: drop --no-tgate")
    check_text(args.prompt, "prompt")
    check_text(args.negative or [], "negative prompt")
    if args.negative and len(args.negative) not in (1, len(args.prompt)):
        raise ValueError(f"{len(args.negative)} negative prompts for {len(args.prompt)} prompts "
                         "(give one for all prompts, or one per prompt)")
    check_options(args)
    tagged = tag_loras(args.prompt, args.lora_dir, lambda k: f"prompt {k + 1}")
    init_image = image_option(args)  # img2img's starting image (not `image`: the loop below names its outputs so)
    n_images = len(args.prompt) * args.num_images
    if not 1 <= args.num_images or n_images > CLI_MAX_IMAGES:
        raise ValueError(f"--num-images {args.num_images}: from 1 to {CLI_MAX_IMAGES // len(args.prompt)} "
                         f"for {len(args.prompt)} prompt(s) ({CLI_MAX_IMAGES} images a run at most)")
    if args.seed != -1 and not 0 <= args.seed <= SEED_RANGE - n_images:
        raise ValueError(f"--seed {args.seed}: must be -1 (random) or from 0 to 2**63 - {n_images} "
                         f"(image i gets seed + i)")
    device = pick_device(args.device)
    dtype = DTYPES[args.dtype or ("float16" if device.type == "cuda" else "float32")]
    folder, files, grid_file = output_files(args.out, n_images, args.overwrite)
    check_writable(folder)
    seed = secrets.randbelow(2**32) if args.seed == -1 else args.seed  # A1111's -1: random
    print(f"seed {seed}" + (f" (images get {seed} to {seed + n_images - 1})" if n_images > 1 else "")
          + (": random; rerun with --seed to get the same" if args.seed == -1 else ""))

    pipe = load_from_options(args, device, dtype, tagged)
    load_time = time.perf_counter() - start
    print(f"loaded {args.model} ({type(pipe).__name__}, {type(pipe.scheduler).__name__}) on {device} "
          f"in {str(dtype).removeprefix('torch.')}: {load_time:.1f} s")
    # A1111's short model hash: the SHA-256 of the UNet's weights (free for hub downloads, whose
    # file names are their SHA-256; about 2 s per GB read otherwise), once per run.
    info = pipe.model_info
    model = dict(model=info["name"], model_hash=model_hash(info["folder"], args.variant),
                 model_revision=info.get("revision"))
    if loras := loras_from(args) + tagged:  # kept in the PNG's JSON
        model["loras"] = [{"lora": path, "scale": scale} for path, scale in loras]
    sampler, schedule_type = a1111_names(pipe.scheduler)

    options = call_options(args, pipe)
    if init_image is not None:  # img2img: the image's size; the pipeline's default strength unless given
        options.update(image=init_image, height=init_image.shape[2], width=init_image.shape[3],
                       **({} if args.strength is None else {"strength": args.strength}))
    height, width, guidance = options["height"], options["width"], options["guidance_scale"]
    # Image i: prompt i // num_images, seed + i, its own generator: any image comes out the same
    # when made alone with `--seed <its seed> --num-images 1` (exactly so with --batch-size 1).
    prompts = [args.prompt[i // args.num_images] for i in range(n_images)]
    negatives = None if not args.negative else [args.negative[min(i // args.num_images, len(args.negative) - 1)]
                                                for i in range(n_images)]

    def run(tgate, batch):  # the PNGs keep the LoRA tags; the text encoder reads the text without them (A1111)
        return pipe([untagged(prompts[i]) for i in batch],
                    negative_prompt=None if negatives is None else [negatives[i] for i in batch],
                    **options, generator=[torch.Generator(device="cpu").manual_seed(seed + i) for i in batch],
                    tgate=tgate, progress=True)

    number = None
    grid, grid_params, timed = [], None, None
    for first in range(0, n_images, args.batch_size):
        batch = range(first, min(first + args.batch_size, n_images))
        if args.compare:
            plain, out = run(None, batch), run(gate, batch)
            images = [side_by_side(a, b) for a, b in zip(plain.images, out.images)]  # [no gate | TGATE | |diff|]
            if timed is None:  # the first pair warmed both paths up (caches, kernels): time a second pair
                timed = run(None, batch), run(gate, batch)
                out = timed[1]
        else:
            out = run(gate, batch)
            images = list(out.images)
        if number is None and files is None:  # the first images: now the folder is needed
            folder.mkdir(parents=True, exist_ok=True)
            number = next_number(folder)
        for i, image in zip(batch, images):
            p = dict(prompt=prompts[i], seed=seed + i, batch_size=len(batch), batch_pos=i - first, steps=args.steps,
                     guidance_scale=guidance, scheduler=type(pipe.scheduler).__name__, sampler=sampler,
                     schedule_type=schedule_type, tgate=gate, **model, width=image.shape[1],
                     height=image.shape[0], dtype=dtype)
            if negatives is not None:
                p["negative_prompt"] = negatives[i]
            if "deepcache" in options:
                p["deepcache"] = options["deepcache"]
            if init_image is not None:  # the file's name only, never a local path
                p.update(image=Path(args.image).name, strength=args.strength or pipe.default_strength)
            if args.compare:
                p["layout"] = "no gate | TGATE | difference"
            if files is None:
                path, number = save_numbered(folder, image, format_parameters(p), number)
            else:  # checked above; a file created since is still not replaced
                save_png(path := files[i], image, format_parameters(p), overwrite=args.overwrite)
            print(f"saved {path}")
            if grid_file is not None:
                grid.append(to_uint8(image))
                grid_params = grid_params or p  # the first image's, with the grid's own size
    if grid_file is not None:
        image = image_grid(grid)
        p = {**grid_params, "width": image.shape[1], "height": image.shape[0], "grid": n_images}
        save_png(grid_file, image, format_parameters(p), overwrite=args.overwrite)
        print(f"saved {grid_file} (all {n_images} images)")

    steps = len(out.steps)  # the steps run: img2img runs the last int(--steps * strength)
    if timed is not None:
        plain, out = timed
        print(f"no gate: {phases(plain, steps)}")
        print(f"TGATE:   {phases(out, steps)} "
              f"({plain.timings['denoise'] / out.timings['denoise']:.2f}x the denoising speed; "
              f"timed on a second run of the first batch, after a warm-up run of both)")
    print(f"done in {time.perf_counter() - start:.1f} s: load {load_time:.2f} s, last batch: {phases(out, steps)}")
    height, width, _ = pipe.working_size(height, width, {})  # the size denoised (PixArt bins it)
    base = count_macs(pipe.denoiser.config, height, width, steps, guidance, None)["denoiser_macs"]
    name = "UNet" if hasattr(pipe, "unet") else "transformer"
    deepcache = deepcache_from(args)
    if gate is None and deepcache is None:
        print(f"{name}: {si(base)} MACs per image (no gate)")
    else:
        gated = count_macs(pipe.denoiser.config, height, width, steps, guidance, gate, deepcache=deepcache)["denoiser_macs"]
        what = [] if gate is None else [f"TGATE (gate step {gate.gate_step}, sp_interval {gate.sp_interval}, "
                                        f"fi_interval {gate.fi_interval}, warm-up {gate.warm_up})"]
        what += [] if deepcache is None else [f"DeepCache (interval {deepcache.interval}, branch {deepcache.branch})"]
        print(f"{' + '.join(what)}: {name} {si(gated)} MACs per image instead of {si(base)}, {1 - gated / base:.1%} fewer")


# ----------------------------------------------------------------------------- batch

# generate's options that do not decide an image's pixels (or are recorded another way), left out
# of the options a batch folder's records carry and a rerun must repeat
NOT_PIXELS = {"command", "run", "prompts", "out", "overwrite", "compare", "compare_tgate", "device", "no_tgate",
              "gate_step", "sp_interval", "fi_interval", "warm_up"}


def batch_command(args) -> None:
    """`batch`: a prompt file to a folder of PNGs and manifest.jsonl, on one process or under
    torchrun (mini_tgate/batch.py tells how). Errors before the images are made are the same on
    every rank: rank 0 says them, the others exit quietly."""
    rank, world = batch.distributed()
    try:
        job, pending, device, dtype, threads, tagged, init_image = prepare_batch(args, rank, world)
    except ERRORS:
        if rank != 0:
            sys.exit(1)
        raise
    already = len(job.images) - sum(len(job.batches[k]) for k in pending)
    stats = {"images": [0] * world, "busy": [0.0] * world, "wall": 0.0}
    if pending:  # else there is nothing to load the model for
        start = time.perf_counter()
        if threads is not None:
            torch.set_num_threads(threads)
        pipe = load_from_options(args, device, dtype, tagged)
        call = call_options(args, pipe)
        if init_image is not None:  # lines with their own image replace it (batch.make_batch)
            call.update(image=init_image, height=init_image.shape[2], width=init_image.shape[3])
        info = pipe.model_info
        hash_ = batch.broadcast(model_hash(info["folder"], args.variant) if rank == 0 else None, world)
        sampler, schedule_type = a1111_names(pipe.scheduler)
        deepcache = {"deepcache": call["deepcache"]} if "deepcache" in call else {}  # both folders run it
        loras = [{"lora": path, "scale": scale} for path, scale in loras_from(args) + tagged]
        png_params = dict(steps=args.steps, guidance_scale=call["guidance_scale"], sampler=sampler,
                          scheduler=type(pipe.scheduler).__name__, schedule_type=schedule_type, model=info["name"],
                          model_hash=hash_, model_revision=info.get("revision"), dtype=dtype, **deepcache,
                          **({"loras": loras} if loras else {}),
                          **({"image": Path(args.image).name} if args.image else {}))  # the name, never a path

        @functools.cache
        def macs(gate, height, width, steps):
            return count_macs(pipe.denoiser.config, height, width, steps, call["guidance_scale"], gate,
                              **deepcache)["denoiser_macs"]
        if rank == 0:
            print(f"loaded {args.model} ({type(pipe).__name__}) on {device} in {str(dtype).removeprefix('torch.')}: "
                  f"{time.perf_counter() - start:.1f} s; {len(job.images)} images, {already} there already, "
                  f"{len(pending)} batches of up to {job.batch_size} to make on {world} process(es)", file=sys.stderr)
        checker = batch.shapes_checker([untagged(image.prompt) for image in job.images]) if args.compare_tgate else None
        stats = batch.run_batches(job, pipe, pending, call, png_params, rank, world, checker, macs,
                                  batch.Progress(len(job.images), already) if rank == 0 else None)
    if rank == 0:
        job.merge()
        print(batch.summary(job, stats, already))
    if world > 1:
        batch.dist.destroy_process_group()


def prepare_batch(args, rank: int, world: int):
    """Everything checked before loading: the options, the prompt file, the folder; rank 0 plans
    the job (which batches are still to do) and tells the others."""
    gate = gate_from(args)
    if args.compare:
        raise ValueError("--compare is generate's: batch takes --compare-tgate (two folders, and their difference)")
    if args.compare_tgate and gate is None:
        raise ValueError("--compare-tgate runs without and with the gate: drop --no-tgate")
    if args.overwrite:
        raise ValueError("batch never replaces an image: a rerun skips those made already; to start afresh, "
                         "choose another --out")
    check_options(args)
    check_text(args.negative or [], "negative prompt")
    if args.negative and len(args.negative) > 1:
        raise ValueError("batch takes one --negative, for every prompt without its own (a .jsonl prompt file "
                         "gives each line its own \"negative\")")
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise ValueError(f"--threads {args.threads}: must be from 1 to 1024")
    device = pick_device(args.device)
    if world > 1 and device.type == "cuda":  # one GPU a process, by its rank on this machine
        if device.index is not None:
            raise ValueError(f"--device {args.device}: under torchrun each process takes the GPU of its "
                             "LOCAL_RANK; pass --device cuda")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    dtype = DTYPES[args.dtype or ("float16" if device.type == "cuda" else "float32")]
    threads = (args.threads or 1) if device.type == "cpu" else None
    out = Path(args.out)
    if out.suffix.lower() == ".png" or out.is_file():
        raise ValueError(f"--out {args.out}: batch writes into a folder (PNGs named by id, and manifest.jsonl); name one")
    check_writable(out)
    lines = batch.read_prompts(args.prompts)
    init_image = image_option(args, per_line=any(line.image is not None for line in lines))
    negative = args.negative[0] if args.negative else None
    tagged = tag_loras([line.prompt for line in lines], args.lora_dir,
                       lambda k: f"{Path(args.prompts).name} line {lines[k].number}")
    if world > len(lines):
        raise ValueError(f"{world} processes for {len(lines)} prompt(s): start at most {len(lines)}")
    folders = ({"": (out, gate)} if not args.compare_tgate
               else {"no-tgate": (out / "no-tgate", None), "tgate": (out / "tgate", gate)})
    model = Path(args.model).resolve() if Path(args.model).exists() else args.model  # a local folder, wherever called from
    # options added since batch was written are left out when unset, so older jobs keep their options
    options = {k: v for k, v in vars(args).items()
               if k not in NOT_PIXELS and not (k in ("image", "strength", "lora_dir") and v is None)}
    if args.image:  # the file, wherever called from, and its bytes: a file changed under a finished job is refused
        options.update(image=str(Path(args.image).resolve()), image_sha256=batch.file_sha256(args.image))
    if args.lora_dir:  # the tags are in the prompts, which each record holds; the folder they name, wherever called from
        options.update(lora_dir=str(Path(args.lora_dir).resolve()))
    options.update(model=str(model), device=device.type, threads=threads)

    def job(seed):
        return batch.Job(batch.job_images(lines, args.num_images, seed, negative, args.strength), folders,
                         {**options, "seed": seed}, args.batch_size)

    def plan():  # rank 0; an error is sent to every rank, as its message
        try:
            seed = batch.resolve_seed([folder for folder, _ in folders.values()], args.seed)
            planned = job(seed)
            size = None if init_image is None else (init_image.shape[3], init_image.shape[2])
            batch.check_img2img(planned, args.steps, size, args.height, args.width)
            return seed, planned.plan()
        except ERRORS as e:
            return one_line(e), None

    seed, pending = batch.broadcast(plan() if rank == 0 else None, world)
    if pending is None:
        raise ValueError(seed)
    return job(seed), pending, device, dtype, threads, tagged, init_image


# ----------------------------------------------------------------------------- info, macs

def info_command(args) -> None:
    print(describe(args.path))


def macs_command(args) -> None:
    result = count_macs(args.arch, args.height, args.width, args.steps, args.guidance_scale, gate_from(args),
                        deepcache=deepcache_from(args))
    if args.json:
        print(json.dumps(result))
        return
    base = count_macs(args.arch, args.height, args.width, args.steps, args.guidance_scale, None)
    macs, plain = result["denoiser_macs"], base["denoiser_macs"]
    print(f"{result['denoiser']} MACs, {args.arch} {result['height']}x{result['width']}, {args.steps} steps, "
          f"{'CFG' if result['cfg'] else 'no CFG'}, {result['text_len']} text tokens")
    print(f"  Linear+Conv (the paper's convention): {macs / 1e12:.3f}T"
          f"  (no gate: {plain / 1e12:.3f}T, saving {1 - macs / plain:.1%})")
    print(f"  with attention products:              {result['denoiser_macs_with_attention'] / 1e12:.3f}T")


def one_line(e: BaseException) -> str:
    return " ".join(str(e).splitlines()) or type(e).__name__


def run(command, args) -> int:
    """Run a command: bad input ends as `error: ...` on stderr and exit code 1, not a traceback."""
    with warnings.catch_warnings():  # warnings on one line too
        warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)
        try:
            command(args)
        except ERRORS as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 1
        except torch.OutOfMemoryError as e:
            first = str(e).strip().split("\n")[0]
            print(f"error: out of memory on {getattr(args, 'device', None) or 'this device'}: {first} "
                  "(try a smaller --height/--width, --batch-size or --dtype float16)", file=sys.stderr)
            return 1
        except RuntimeError as e:  # torch's errors: a failed compile, a kernel missing for a dtype, ...
            first = str(e).strip().split("\n")[0]
            if type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                print(f"error: --compile failed: {first} (compiling for the CPU needs a working C++ compiler: "
                      "install g++ or clang, or set CXX; or rerun without --compile)", file=sys.stderr)
            else:
                print(f"error: {type(e).__name__}: {first}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
    return 0


def main(argv=None) -> int:
    parser = Parser(prog="python -m mini_tgate", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="text to image (default model: weights/tiny-shapes, trained on coloured shapes)")
    add_generate_options(p)
    p.set_defaults(run=generate_command)

    p = sub.add_parser("batch", help="a file of prompts to a folder of PNGs, on one process or many (torchrun)")
    p.add_argument("prompts", metavar="PROMPTS",
                   help="a text file, one prompt a line, or a .jsonl file of {\"prompt\", \"negative\", \"seed\", "
                        "\"id\", \"image\", \"strength\"}")
    add_generate_options(p, prompt_argument=False)
    p.add_argument("--threads", type=int,
                   help="CPU threads per process (default 1; the images depend on it, bit for bit: for more "
                        "cores, start more processes with torchrun)")
    p.add_argument("--compare-tgate", action="store_true",
                   help="the same images without and with the gate, into OUT/no-tgate and OUT/tgate")
    p.set_defaults(run=batch_command)

    p = sub.add_parser("info", help="what a PNG holds: size and the parameters it was generated with")
    p.add_argument("path")
    p.set_defaults(run=info_command)

    p = sub.add_parser("macs", help="count the denoiser's MACs over a generation (no weights needed)")
    p.add_argument("--arch", default="sd15", help="sd15, sd21, sdxl, lcm-sdxl, pixart-alpha, pixart-sigma, "
                   "or a UNet / PixArt transformer config.json")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    add_gate_options(p, defaults=None)
    add_deepcache_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=macs_command)

    args = parser.parse_args(argv)
    return run(args.run, args)


if __name__ == "__main__":
    sys.exit(main())
