"""`python evaluate.py ...` from a clone: the same command as the installed `xcross-evaluate`
(xcross/cli/evaluate.py)."""

import sys

from xcross.cli.evaluate import build_parser, main  # noqa: F401

if __name__ == "__main__":
    sys.exit(main())
