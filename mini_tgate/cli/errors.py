"""How the command line fails: bad input ends as one line `error: ...` on stderr and a non-zero
exit code, never a traceback; warnings are one line too."""

from __future__ import annotations

import argparse
import sys
import warnings

import torch

from ..core.config import ConfigError
from ..core.weights import CheckpointError

# what bad input raises, from the options to the files read: shown as one line
ERRORS = (CheckpointError, ConfigError, ValueError, OSError, FloatingPointError, TypeError, ImportError)


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other error here; the usage is in --help
        self.exit(2, f"error: {message} (see --help)\n")


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
