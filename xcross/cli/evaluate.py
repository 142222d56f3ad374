"""Compare methods on a target's test users: saved runs, popularity and zero-shot source adapters, in one table
with 95% bootstrap intervals (CSV + JSON beside it); `--curve` trains and plots the data-efficiency curve."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from train import SPEC_FLAGS, TRAIN_FLAGS, spec_from_args
from train import build_parser as train_parser
from xcross.experiment import (
    CURVE_FRACTIONS, UsageError, comparison_rows, evaluate_method, format_table, plot_curve, prepare_inputs, run,
    write_rows,
)
from xcross.runtime import keep_freed_memory
from xcross.weights import atomic_write_text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[train_parser()], add_help=False, conflict_handler="resolve")
    parser.add_argument("--methods", default=None,
                        help="comma-separated: popularity, source:<domain>, or a run name under <out>/<target>/ "
                             "(xcross, lora, merge, head, lora-f0.25, ...); default: popularity, every source "
                             "adapter found and every finished run")
    parser.add_argument("--curve", action="store_true",
                        help="train (or reuse) LoRA and X-Cross at each --fractions and write curve.csv/json/png")
    parser.add_argument("--fractions", default=",".join(f"{f:g}" for f in CURVE_FRACTIONS),
                        help="fractions of target training users for --curve")
    return parser


def default_methods(spec) -> list[str]:
    out = Path(spec.out)
    methods = ["popularity"]
    methods += [f"source:{s}" for s in spec.sources if (out / s / "lora" / "results.json").is_file()]
    runs = out / spec.target
    if runs.is_dir():
        methods += sorted(p.name for p in runs.iterdir() if (p / "results.json").is_file())
    return methods


def trained_row(spec, method: str, fraction: float, resume: bool, progress: bool) -> dict:
    """The test row of `method` trained on `fraction` of the target users: reused if its run finished, else trained."""
    run_spec = replace(spec, method=method, fraction=fraction)
    done = run_spec.run_dir / "results.json"
    results = json.loads(done.read_text()) if done.is_file() else run(run_spec, resume=resume, progress=progress)
    name = run_spec.run_dir.name
    result, described = evaluate_method(spec, name, progress)
    row = comparison_rows({method: (result, described)}, spec.train.seed)[0]
    print(f"fraction {fraction:g} {method}: hit@1 {row['hit@1']['mean']:.3f} "
          f"[{row['hit@1']['low']:.3f}, {row['hit@1']['high']:.3f}]")
    return {**row, "fraction": fraction, "run": name, "seconds": results["seconds"]}


def curve(spec, fractions: list[float], resume: bool, progress: bool) -> list[dict]:
    """LoRA and X-Cross at every fraction, then the baselines on the same test users: popularity, each source
    zero-shot, and merge (the sources' averaged adapters with a head trained on all target users)."""
    rows = [trained_row(spec, method, f, resume, progress) for f in fractions for method in ("lora", "xcross")]
    baselines = comparison_rows({m: evaluate_method(spec, m, progress)
                                 for m in ["popularity", *[f"source:{s}" for s in spec.sources]]}, spec.train.seed)
    baselines.append(trained_row(spec, "merge", 1.0, resume, progress))
    return rows + [{**r, "baseline": True} for r in baselines]


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    args = build_parser().parse_args(argv)
    try:
        spec = prepare_inputs(spec_from_args(args))
        target_dir = Path(spec.out) / spec.target
        if args.curve:
            fractions = [float(f) for f in args.fractions.split(",")]
            for f in fractions:
                if not 0 < f <= 1:
                    raise UsageError(f"--fractions must lie in (0, 1], got {f}")
            rows = curve(spec, fractions, args.resume, not args.quiet)
            write_rows(rows, target_dir / "curve")
            if plot_curve(rows, target_dir / "curve.png", spec.target):
                print(f"wrote {target_dir / 'curve.png'}")
            else:
                print("matplotlib is not installed: no curve.png (pip install matplotlib)")
            print(format_table([{**r, "method": f"{r['method']} f={r.get('fraction', '-')}"} for r in rows]))
            return 0
        methods = args.methods.split(",") if args.methods else default_methods(spec)
        entries = {m: evaluate_method(spec, m, not args.quiet) for m in methods}
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    rows = comparison_rows(entries, spec.train.seed)
    print(f"test results on {spec.target} ({rows[0]['users']} users, {spec.num_candidates} candidates each; "
          "mean [95% bootstrap interval]):")
    print(format_table(rows))
    write_rows(rows, target_dir / "comparison")
    atomic_write_text(target_dir / "comparison_config.json", json.dumps(spec.to_dict(), indent=2) + "\n")
    print(f"wrote {target_dir / 'comparison.csv'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
