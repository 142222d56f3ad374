"""Train X-Cross (or a baseline) on a target domain: source adapters are trained or reused, the method is trained
on the target, model-selected on validation and tested. Also under torchrun."""

from __future__ import annotations

import argparse
import sys

from ..distributed import dist_info
from ..experiment import prepare, run
from ..reporting import comparison_rows, format_table, scored_on
from ..rundir import RunDir
from ..runtime import keep_freed_memory
from ..settings import PRESETS
from ..training import EvalResult
from ..errors import run_command
from .common import add_run_arguments, bootstrap, config_from_args, finish_distributed


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Without --data-dir the embedded demo world (data/demo) is generated on first use; without "
               "--model-dir Gemma 3 270M is converted from its PyPI GGUF. Presets: " + ", ".join(PRESETS) + ".")
    add_run_arguments(parser)
    parser.add_argument("--replace", action="store_true",
                        help="replace the run in the directory as a whole when it was made with other settings (by "
                             "default it is refused: one run per directory; use another --out to keep both)")
    parser.add_argument("--no-test", dest="test", action="store_false",
                        help="train and select on validation only, leaving the test split unread (for choosing "
                             "settings; `xcross-evaluate` with the same flags tests it later)")
    return parser


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    try:
        return _main(argv)
    finally:  # last: rank 0 still needs the group while it prints
        finish_distributed()


def _main(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)

    def job() -> int:
        config = config_from_args(args)
        bootstrap(config)
        config = prepare(config)
        if dist_info().main:
            print(f"preset {config.preset}: {config.preset_reason}")
        run_dir = RunDir.of(config)
        results = run(config, resume=args.resume, progress=not args.quiet, test=args.test, replace_run=args.replace)
        if dist_info().main:
            if args.test:
                scores = EvalResult.load(run_dir.file("test_scores.npz"))
                rows = comparison_rows({config.method: (scores, {
                    "trainable": results["parameters"]["trainable"],
                    "train_examples": results["training"]["train_examples"]})}, seed=config.train.seed)
                print(f"\ntest results on {config.target} ({scored_on(rows)}; 95% bootstrap intervals):")
                print(format_table(rows))
            else:
                training = results["training"]
                valid = next((h["valid"] for h in training["valid_history"] if h["step"] == training["best_step"]),
                             training["best_valid"])
                print(f"\nvalidation of the selected step {training['best_step']} on {config.target} (the test "
                      "split is not read): " + ", ".join(f"{m} {v:.3f}" for m, v in valid.items()))
            if not results.get("kept"):
                print(f"\nwrote {run_dir.path}/results.json, config.json, best.safetensors "
                      f"({results['seconds']:.0f} s in all)")
        return 0

    return run_command(job)


if __name__ == "__main__":
    sys.exit(main())
