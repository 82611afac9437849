"""Generate an image from a prompt, with TGATE: the project's main command.

    python examples/sample.py                # the embedded random-weight model: noise, in seconds
    python examples/sample.py "a photo of an astronaut riding a horse on the moon" \
        --model stable-diffusion-v1-5/stable-diffusion-v1-5         # real weights (downloaded once)
    python examples/sample.py --compare      # the same seed without and with TGATE, side by side

The options are those of `python -m mini_tgate generate` (see --help), with a default prompt
and, as the default model, weights/tiny-random of this checkout (see weights/README.md).
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from mini_tgate.__main__ import Parser, add_generate_options, generate_command, run  # noqa: E402

PROMPT = "a photo of an astronaut riding a horse on the moon"

if __name__ == "__main__":
    parser = Parser(prog="python examples/sample.py", description=__doc__,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    add_generate_options(parser, prompt=PROMPT, model=ROOT / "weights" / "tiny-random")
    sys.exit(run(generate_command, parser.parse_args()))
