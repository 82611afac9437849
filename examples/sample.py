"""Generate an image from a prompt, with TGATE: the project's main command.

    python examples/sample.py                # the embedded tiny model: a red circle on blue, in seconds
    python examples/sample.py "a yellow triangle on a black background" --compare   # without | with TGATE
    python examples/sample.py "a photo of an astronaut riding a horse on the moon" \
        --model stable-diffusion-v1-5/stable-diffusion-v1-5         # real weights (downloaded once)

The options are those of `python -m mini_tgate generate` (see --help), with a default prompt
and, as the default model, weights/tiny-shapes of this checkout: a 64x64 text-to-image model
trained from scratch on coloured shapes by examples/train_tiny.py (see weights/README.md). It
knows 8 colours (red, green, blue, yellow, cyan, magenta, white, black) and 3 shapes (circle,
square, triangle), in prompts like "a COLOUR SHAPE on a COLOUR background".

Each run draws a random seed (printed; --seed N for a fixed one) and writes the next free
number of out/: out/00000.png the first time, out/00001.png the second, ...; no file is
replaced (--out NAME.png names one, refused if it exists unless --overwrite).
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from mini_tgate.cli import Parser, add_generate_options, generate_command, run  # noqa: E402

PROMPT = "a red circle on a blue background"

if __name__ == "__main__":
    parser = Parser(prog="python examples/sample.py", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generate_options(parser, prompt=PROMPT, model=ROOT / "weights" / "tiny-shapes")
    sys.exit(run(generate_command, parser.parse_args()))
