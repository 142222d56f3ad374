"""Run the study that decides the paper's claims on one arrangement: sources, LoRA and X-Cross at every fraction,
merge and ensemble, for every seed, evaluated on the same test users; writes report.md/json, curve.png and the
evidence (one small JSON file per scored method and seed) under <out>/<target>/study/ (or --study-dir).
Resumable: run the same command again after an interruption. What the evidence holds is never trained again, so a
study continues on another machine from committed evidence, and --report-only rebuilds the report from it alone."""

from __future__ import annotations

import argparse
import sys

from ..runtime import keep_freed_memory
from ..settings import UsageError
from ..study import FRACTIONS, METHODS, Study, format_markdown, run_study
from ..errors import run_command
from .common import add_run_arguments, bootstrap, config_from_args, finish_distributed
from .evaluate import parse_fractions


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="The study-cpu preset (--preset study-cpu) is sized for a 2-core CPU.")
    add_run_arguments(parser, with_method=False)
    parser.add_argument("--fractions", default=",".join(f"{f:g}" for f in FRACTIONS),
                        help="fractions of target training users for LoRA and X-Cross")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds, one run of each method per "
                                                     "seed (default 0)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help="comma-separated trained methods of the study, xcross among them (default "
                             f"{','.join(METHODS)}); lora and xcross are trained at every fraction")
    parser.add_argument("--reference", default="lora@1", help="the method every other is compared with, paired "
                                                             "(default lora@1: LoRA on every target user)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: write the report from the evidence and the runs finished so far (a study "
                             "still running elsewhere is left alone); claims that need a missing run are 'not yet "
                             "measured'. With evidence for everything it needs neither the data nor the base model")
    parser.add_argument("--study-dir", metavar="DIR", default=None,
                        help="where the report and its evidence are read and written (default <out>/<target>/study; "
                             "e.g. docs/study/<target> to continue a committed study)")
    return parser


def parse_seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(int(s) for s in text.split(","))
    except ValueError:
        raise UsageError(f"--seeds takes comma-separated whole numbers, got {text!r}") from None
    if any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds must be distinct whole numbers >= 0, got {text!r}")
    return seeds


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    args = build_parser().parse_args(argv)

    def job() -> int:
        config = config_from_args(args, method="xcross")
        study = Study(config, tuple(parse_fractions(args.fractions)), parse_seeds(args.seeds), args.reference,
                      args.study_dir, tuple(m.strip() for m in args.methods.split(",")))
        if not args.report_only:
            bootstrap(config)
        report = run_study(study, progress=not args.quiet, report_only=args.report_only)
        print(format_markdown(report))
        print(f"wrote {study.out}/report.md, report.json, curve.png and evidence/ ({len(list(study.evidence.glob('*.json')))} "
              "files)")
        return 0

    try:
        return run_command(job, interrupted="run the same command again to continue the study")
    finally:
        finish_distributed()


if __name__ == "__main__":
    sys.exit(main())
