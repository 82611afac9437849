"""The two commands that make no image: `info` (what a PNG holds) and `macs` (the denoiser's MACs
over a generation, counted on the meta device: no weights)."""

from __future__ import annotations

import json

from ..formats.png import describe
from ..macs import count_macs
from .options import add_deepcache_options, add_gate_options, deepcache_from, gate_from


def add_info_options(p) -> None:
    p.add_argument("path")


def info_command(args) -> None:
    print(describe(args.path))


def add_macs_options(p) -> None:
    p.add_argument("--arch", default="sd15", help="sd15, sd21, sdxl, lcm-sdxl, pixart-alpha, pixart-sigma, svd-xt, "
                   "or a UNet / PixArt transformer / SVD UNet config.json")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--frames", type=int, default=None, help="frames of a video (SVD only; default: the config's)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    add_gate_options(p, defaults=None)
    add_deepcache_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def macs_command(args) -> None:
    result = count_macs(args.arch, args.height, args.width, args.steps, args.guidance_scale, gate_from(args),
                        deepcache=deepcache_from(args), frames=args.frames)
    if args.json:
        print(json.dumps(result))
        return
    base = count_macs(args.arch, args.height, args.width, args.steps, args.guidance_scale, None, frames=args.frames)
    macs, plain = result["denoiser_macs"], base["denoiser_macs"]
    frames = f" x {result['frames']} frames" if "frames" in result else ""
    print(f"{result['denoiser']} MACs, {args.arch} {result['height']}x{result['width']}{frames}, {args.steps} steps, "
          f"{'CFG' if result['cfg'] else 'no CFG'}, {result['text_len']} text tokens")
    print(f"  Linear+Conv (the paper's convention): {macs / 1e12:.3f}T"
          f"  (no gate: {plain / 1e12:.3f}T, saving {1 - macs / plain:.1%})")
    print(f"  with attention products:              {result['denoiser_macs_with_attention'] / 1e12:.3f}T")
