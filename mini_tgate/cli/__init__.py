"""Command line: text to image with TGATE.

TGATE (temporal gating of attention, arXiv 2404.02747) is ON by default: after a gate step
(--gate-step, default 10 of 25) cross-attention is no longer computed, its cached output is
reused, and classifier-free guidance runs one branch; before it, self-attention is cached and
reused between steps: fewer MACs and faster denoising (1.5x measured on an SD-1.5-shaped UNet,
docs/measurements.md), nearly the same image. Turn it off with --no-tgate; --compare makes
each image both ways, side by side.

    python -m mini_tgate generate "a photo of a cat" --model stable-diffusion-v1-5/stable-diffusion-v1-5
    python -m mini_tgate generate "a red circle on a blue background" --compare   # without and with TGATE
    python -m mini_tgate generate --model SVD_FOLDER --image in.png --out clip.png   # image to video (APNG)
    python -m mini_tgate info out/00000.png                      # how an image was made
    python -m mini_tgate macs --arch sdxl --gate-step 10         # the MACs the gate saves, no weights

`generate` with no --model runs the embedded tiny model trained on coloured shapes
(weights/tiny-shapes, 64x64; weights/README.md), in seconds. `examples/sample.py` is `generate`
with a default prompt. Bad input ends with one line `error: ...` on stderr and a non-zero exit
code, never a traceback.
"""
# One module a command: generate.py (its image-to-video runs: video.py), batch.py (its job logic: jobs.py), info.py (info and macs);
# what generate and batch share: options.py and loras.py; how every command fails: errors.py.

from __future__ import annotations

import argparse
import sys

from .batch import add_batch_options, batch_command
from .errors import Parser, run
from .generate import generate_command, save_numbered
from .info import add_info_options, add_macs_options, info_command, macs_command
from .loras import prompt_tags
from .options import add_generate_options

__all__ = ["main", "run", "Parser", "add_generate_options", "generate_command", "save_numbered", "prompt_tags"]

# the subcommands: name -> (help, what adds its options, what runs it)
COMMANDS = {
    "generate": ("text to image, with TGATE on by default (--no-tgate: off); default model: weights/tiny-shapes",
                 add_generate_options, generate_command),
    "batch": ("a file of prompts to a folder of PNGs, on one process or many (torchrun)",
              add_batch_options, batch_command),
    "info": ("what a PNG holds: size and the parameters it was generated with", add_info_options, info_command),
    "macs": ("count the denoiser's MACs over a generation (no weights needed)", add_macs_options, macs_command),
}

GATE = ("TGATE is on by default (gate step 10, self-attention intervals 5 before it and 1 after, warm-up 2):\n"
        "from the gate step on, cross-attention is not computed again (its cached output is reused) and\n"
        "classifier-free guidance runs one branch; before it, self-attention is cached and reused between\n"
        "steps. --no-tgate turns it off; --compare makes every image without and with it, side by side.")
DESCRIPTIONS = {
    "generate": "Text to image (img2img with --image; an SVD model: image to video).\n\n" + GATE,
    "batch": "A file of prompts to a folder of PNGs and manifest.jsonl, on one process or many (torchrun).\n\n"
             + GATE.replace("--compare makes every image", "--compare-tgate makes every image")
                   .replace("side by side.", "in two folders."),
}


def main(argv=None) -> int:
    parser = Parser(prog="python -m mini_tgate", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (summary, add_options, command) in COMMANDS.items():
        p = sub.add_parser(name, help=summary, description=DESCRIPTIONS.get(name, summary),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_options(p)
        p.set_defaults(run=command)
    args = parser.parse_args(argv)
    return run(args.run, args)


if __name__ == "__main__":
    sys.exit(main())
