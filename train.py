"""`python train.py ...` from a clone: the same command as the installed `xcross-train` (xcross/cli/train.py)."""

import sys

from xcross.cli.train import build_parser, main  # noqa: F401  (build_parser: for tests and --help tooling)

if __name__ == "__main__":
    sys.exit(main())
