"""python -m mini_tgate: the command line (mini_tgate/cli)."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
