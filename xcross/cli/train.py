"""Train X-Cross (or a baseline) on a target domain: source adapters are trained or reused, the method is trained
on the target, model-selected on validation and tested. Also under torchrun."""

from __future__ import annotations

import argparse
import sys

from ..distributed import dist_info
from ..experiment import prepare, run
from ..reporting import comparison_rows, format_table
from ..rundir import RunDir
from ..runtime import keep_freed_memory
from ..settings import PRESETS
from ..training import EvalResult
from .common import add_run_arguments, bootstrap, config_from_args, finish_distributed, run_command


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Without --data-dir the embedded demo world (data/demo) is generated on first use; without "
               "--model-dir Gemma 3 270M is converted from its PyPI GGUF. Presets: " + ", ".join(PRESETS) + ".")
    add_run_arguments(parser)
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
        results = run(config, resume=args.resume, progress=not args.quiet)
        if dist_info().main:
            run_dir = RunDir.of(config)
            rows = comparison_rows({config.method: (EvalResult.load(run_dir.file("test_scores.npz")), {
                "trainable": results["parameters"]["trainable"],
                "train_examples": results["training"]["train_examples"]})}, seed=config.train.seed)
            print(f"\ntest results on {config.target} ({results['test_users']} users, "
                  f"{config.data.num_candidates} candidates each; 95% bootstrap intervals):")
            print(format_table(rows))
            print(f"\nwrote {run_dir.path}/results.json, config.json, best.safetensors "
                  f"({results['seconds']:.0f} s in all)")
        return 0

    return run_command(job)


if __name__ == "__main__":
    sys.exit(main())
