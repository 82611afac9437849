"""Command line.

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
    "generate": ("text to image (default model: weights/tiny-shapes, trained on coloured shapes)",
                 add_generate_options, generate_command),
    "batch": ("a file of prompts to a folder of PNGs, on one process or many (torchrun)",
              add_batch_options, batch_command),
    "info": ("what a PNG holds: size and the parameters it was generated with", add_info_options, info_command),
    "macs": ("count the denoiser's MACs over a generation (no weights needed)", add_macs_options, macs_command),
}


def main(argv=None) -> int:
    parser = Parser(prog="python -m mini_tgate", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (summary, add_options, command) in COMMANDS.items():
        p = sub.add_parser(name, help=summary)
        add_options(p)
        p.set_defaults(run=command)
    args = parser.parse_args(argv)
    return run(args.run, args)


if __name__ == "__main__":
    sys.exit(main())
