"""Command line: `python -m mini_tgate macs ...` (and `generate`, `info`)."""

from __future__ import annotations

import argparse
import json
import sys

from .macs import count_macs
from .tgate import TGate


def add_gate_options(p: argparse.ArgumentParser, defaults: TGate | None = TGate()) -> None:
    d = defaults or TGate()
    p.add_argument("--gate-step", type=int, default=d.gate_step if defaults else None,
                   help=f"TGATE gate step m (default {d.gate_step})")
    p.add_argument("--sp-interval", type=int, default=d.sp_interval, help="self-attention interval before the gate")
    p.add_argument("--fi-interval", type=int, default=d.fi_interval, help="self-attention interval after the gate")
    p.add_argument("--warm-up", type=int, default=d.warm_up, help="steps whose self-attention is always computed")


def gate_from(args) -> TGate | None:
    if args.gate_step is None or getattr(args, "no_tgate", False):
        return None
    return TGate(args.gate_step, args.sp_interval, args.fi_interval, args.warm_up)


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mini_tgate")
    sub = parser.add_subparsers(dest="command", required=True)
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
    try:
        args.run(args)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
