"""Look inside a trained run: plots of the integrators' coefficients per block and stream pair, their growth over
training, the stream weights, the loss and validation curves (<run>/inspect/*.png), and a summary.md of them."""

from __future__ import annotations

import argparse
import sys

from ..errors import run_command
from ..inspection import inspect_run
from ..settings import UsageError


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every method gets training.png and summary.md; the coefficient heatmap and growth plot need\n"
               "integrators (xcross), the stream-weight bars several streams (xcross, ensemble). The summary says\n"
               "what a run does not have. The plots need matplotlib (pip install \"xcross-rec[plot]\").")
    parser.add_argument("--run", metavar="DIR", required=True, help="a run directory, e.g. runs/tools/xcross")
    parser.add_argument("--out", metavar="DIR", default=None, help="where to write (default <run>/inspect/)")
    parser.add_argument("--users", metavar="N", type=int, default=8,
                        help="validation users the coefficient heatmap is measured on (default 8)")
    parser.add_argument("--device", default="cpu", help="for the heatmap's forward pass: cpu (default), auto, cuda")
    parser.add_argument("--data-dir", metavar="DIR", default=None,
                        help="the processed data of the run's target, for the heatmap's validation users (default: "
                             "the run's own data directory)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _main(args), interrupted="stopped; nothing of the inspection was kept half-written")


def _main(args: argparse.Namespace) -> int:
    if args.users < 1:
        raise UsageError(f"--users must be a whole number >= 1 (got {args.users})")
    written = inspect_run(args.run, args.out, args.users, args.device, args.data_dir)
    summary = written[-1].read_text(encoding="utf-8")
    print(summary)
    for line in summary.splitlines():  # what could not be drawn, also where a script reads errors
        if line.startswith("- coefficient heatmap:"):
            print(f"warning: {line[2:]}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
