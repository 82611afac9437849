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
import json
import os
import sys
import time
import warnings
from pathlib import Path

import torch

from .checkpoint import CheckpointError
from .config import ConfigError
from .macs import count_macs
from .pipeline import load_pipeline
from .png import describe, format_parameters, image_grid, save_png, side_by_side
from .schedulers import SCHEDULERS
from .tgate import TGate

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "weights" / "tiny-shapes"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
ERRORS = (CheckpointError, ConfigError, ValueError, OSError, FloatingPointError, TypeError)


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


# ----------------------------------------------------------------------------- generate

def add_generate_options(p: argparse.ArgumentParser, prompt: str | None = None,
                         model: str | os.PathLike = DEFAULT_MODEL) -> None:
    """The options of `generate`; examples/sample.py passes a default prompt and model."""
    if prompt is None:
        p.add_argument("prompt", nargs="+", help="one or more prompts (quote each one)")
    else:
        p.add_argument("prompt", nargs="*", default=[prompt], help=f"one or more prompts (default: {prompt!r})")
    p.add_argument("--negative", action="append", help="negative prompt; repeat it to give one per prompt")
    p.add_argument("--model", default=str(model),
                   help=f"a diffusers folder or a hub repo id (default: weights/{Path(model).name})")
    p.add_argument("--variant", help="read *.VARIANT.safetensors, e.g. fp16")
    p.add_argument("--dtype", choices=DTYPES, help="default: float16 on CUDA, float32 on the CPU")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--steps", type=int, default=25, help="denoising steps (default 25)")
    p.add_argument("--guidance-scale", type=float, help="CFG scale (default: the pipeline's, 7.5 SD, 5 SDXL)")
    p.add_argument("--scheduler", choices=SCHEDULERS, help="default: the checkpoint's")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--height", type=int, help="default: the UNet's sample size x 8")
    p.add_argument("--width", type=int, help="default: the UNet's sample size x 8")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt (default 1)")
    add_gate_options(p)
    p.add_argument("--no-tgate", action="store_true", help="plain sampling, no gate")
    p.add_argument("--compile", action="store_true", help="torch.compile the pipeline's hot path")
    p.add_argument("--compare", action="store_true",
                   help="also run without the gate (same seed); save [no gate | TGATE | difference]")
    p.add_argument("--out", default="out/",
                   help="a .png file, or a folder (created; numbered files). Default: out/")


def output_files(out: str, n: int) -> tuple[list[Path], Path | None]:
    """Where n images go, and where their grid goes (None: no grid). A folder (a name ending in
    "/", an existing folder, or a name with no suffix) gets numbered files 00000.png, 00001.png,
    ... after the highest number already there; a .png file gets the image, or with several
    images NAME-0.png, NAME-1.png, ... and the grid in NAME.png. Nothing is created here."""
    path = Path(out)
    if out.endswith(("/", os.sep)) or path.is_dir() or not path.suffix:
        taken = [int(p.stem[:5]) for p in path.glob("[0-9][0-9][0-9][0-9][0-9]*.png")] if path.is_dir() else []
        first = max(taken, default=-1) + 1
        return [path / f"{first + i:05d}.png" for i in range(n)], None
    if path.suffix.lower() != ".png":
        raise ValueError(f"--out {out}: images are written as PNG; name a .png file, or a folder ending in /")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"--out {out}: the folder {str(path.parent)!r} does not exist")
    if n == 1:
        return [path], None
    return [path.with_name(f"{path.stem}-{i}.png") for i in range(n)], path


def check_writable(folder: Path) -> None:
    """Fail before the (slow) generation when the images could not be written."""
    existing = folder
    while not existing.exists():  # the folder may not exist yet: its nearest existing ancestor
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise PermissionError(f"cannot write into {str(folder)!r}: {str(existing)!r} is not a writable folder")


def si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def phases(out, steps: int) -> str:
    t = out.timings
    return (f"text {t['text']:.2f} s, denoise {t['denoise']:.2f} s ({steps / t['denoise']:.1f} steps/s), "
            f"decode {t['decode']:.2f} s")


def generate_command(args) -> None:
    start = time.perf_counter()
    gate = gate_from(args)  # bad gate parameters fail here, before anything is loaded
    if args.compare and gate is None:
        raise ValueError("--compare runs without and with the gate: drop --no-tgate")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in [0, 2**63), got {args.seed}")
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as e:
        raise ValueError(f"--device {args.device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: CUDA is not available here")
    dtype = DTYPES[args.dtype or ("float16" if device.type == "cuda" else "float32")]
    n_images = len(args.prompt) * args.num_images
    files, grid_file = output_files(args.out, max(n_images, 1))
    check_writable(files[0].parent)

    pipe = load_pipeline(args.model, device=device, dtype=dtype, variant=args.variant)
    if args.scheduler:
        pipe.scheduler = SCHEDULERS[args.scheduler].from_config(pipe.scheduler.config)
    if args.compile:
        if hasattr(pipe, "compile"):
            pipe.compile()
        else:
            warnings.warn("this pipeline has no compile(); running without torch.compile")
    load_time = time.perf_counter() - start
    print(f"loaded {args.model} ({type(pipe).__name__}, {type(pipe.scheduler).__name__}) on {device} "
          f"in {str(dtype).removeprefix('torch.')}: {load_time:.1f} s")

    f = pipe.vae_scale_factor
    height = args.height or pipe.unet.config.sample_size * f
    width = args.width or pipe.unet.config.sample_size * f
    guidance = pipe.default_guidance_scale if args.guidance_scale is None else args.guidance_scale

    def run(tgate):
        return pipe(args.prompt, negative_prompt=args.negative, num_inference_steps=args.steps,
                    guidance_scale=guidance, height=height, width=width, num_images_per_prompt=args.num_images,
                    generator=torch.Generator(device="cpu").manual_seed(args.seed), tgate=tgate, progress=True)

    if args.compare:
        plain, out = run(None), run(gate)
        print(f"no gate: {phases(plain, args.steps)}")
        print(f"TGATE:   {phases(out, args.steps)} "
              f"({plain.timings['denoise'] / out.timings['denoise']:.2f}x the denoising speed)")
        images = [side_by_side(a, b) for a, b in zip(plain.images, out.images)]  # [no gate | TGATE | |diff|]
    else:
        out = run(gate)
        images = list(out.images)

    # Each image with the parameters that made it (prompt i has images i*n .. i*n + n-1).
    params = []
    for i in range(len(images)):
        k = i // args.num_images
        p = dict(prompt=args.prompt[k], seed=args.seed, batch_index=i, steps=args.steps, guidance_scale=guidance,
                 scheduler=type(pipe.scheduler).__name__, tgate=gate, model=args.model, width=width,
                 height=height, dtype=dtype)
        if args.negative:  # one for all prompts, or one per prompt
            p["negative_prompt"] = args.negative[min(k, len(args.negative) - 1)]
        if args.compare:
            p["layout"] = "no gate | TGATE | difference"
        params.append(p)
    files[0].parent.mkdir(parents=True, exist_ok=True)
    for path, image, p in zip(files, images, params):
        save_png(path, image, text=format_parameters(p))
        print(f"saved {path}")
    if grid_file is not None:
        save_png(grid_file, image_grid(images), text=format_parameters({**params[0], "grid": len(images)}))
        print(f"saved {grid_file} (all {len(images)} images)")

    print(f"done in {time.perf_counter() - start:.1f} s: load {load_time:.2f} s, {phases(out, args.steps)}")
    base = count_macs(pipe.unet.config, height, width, args.steps, guidance, None)["unet_macs"]
    if gate is None:
        print(f"UNet: {si(base)} MACs per image (no gate)")
    else:
        gated = count_macs(pipe.unet.config, height, width, args.steps, guidance, gate)["unet_macs"]
        print(f"TGATE (gate step {gate.gate_step}, sp_interval {gate.sp_interval}, fi_interval "
              f"{gate.fi_interval}, warm-up {gate.warm_up}): UNet {si(gated)} MACs per image instead of "
              f"{si(base)}, {1 - gated / base:.1%} fewer")


# ----------------------------------------------------------------------------- info, macs

def info_command(args) -> None:
    print(describe(args.path))


def macs_command(args) -> None:
    result = count_macs(args.arch, args.height, args.width, args.steps, args.guidance_scale, gate_from(args))
    if args.json:
        print(json.dumps(result))
        return
    base = count_macs(args.arch, args.height, args.width, args.steps, args.guidance_scale, None)
    print(f"UNet MACs, {args.arch} {result['height']}x{result['width']}, {args.steps} steps, "
          f"{'CFG' if result['cfg'] else 'no CFG'}")
    print(f"  Linear+Conv (the paper's convention): {result['unet_macs'] / 1e12:.3f}T"
          f"  (no gate: {base['unet_macs'] / 1e12:.3f}T, saving {1 - result['unet_macs'] / base['unet_macs']:.1%})")
    print(f"  with attention products:              {result['unet_macs_with_attention'] / 1e12:.3f}T")


def run(command, args) -> int:
    """Run a command: bad input ends as `error: ...` on stderr and exit code 1, not a traceback."""
    with warnings.catch_warnings():  # warnings on one line too
        warnings.showwarning = lambda message, *_: print(f"warning: {message}", file=sys.stderr)
        try:
            command(args)
        except ERRORS as e:
            print(f"error: {' '.join(str(e).splitlines()) or type(e).__name__}", file=sys.stderr)
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

    p = sub.add_parser("info", help="what a PNG holds: size and the parameters it was generated with")
    p.add_argument("path")
    p.set_defaults(run=info_command)

    p = sub.add_parser("macs", help="count the UNet's MACs over a generation (no weights needed)")
    p.add_argument("--arch", default="sd15", help="sd15, sd21, sdxl, lcm-sdxl, or a UNet config.json")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    add_gate_options(p, defaults=None)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=macs_command)

    args = parser.parse_args(argv)
    return run(args.run, args)


if __name__ == "__main__":
    sys.exit(main())
