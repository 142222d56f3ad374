"""Compare methods on a target's test users: saved runs, popularity and zero-shot source adapters, in one table
with 95% bootstrap intervals (CSV + JSON beside it); `--curve` trains and plots the data-efficiency curve."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from ..experiment import evaluate_popularity, evaluate_run, evaluate_source, prepare, run, source_config
from ..files import atomic_write
from ..reporting import comparison_rows, format_table, plot_curve, scored_on, write_rows
from ..rundir import RunDir
from ..runtime import keep_freed_memory
from ..settings import RunConfig, UsageError
from ..errors import run_command
from .common import add_run_arguments, config_from_args, prepare_or_bootstrap

CURVE_FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(parser, with_method=False)
    parser.add_argument("--methods", "--method", dest="methods", default=None,
                        help="comma-separated: popularity, source:<domain>, or a run name under <out>/<target>/ "
                             "(xcross, lora, merge, ensemble, head, lora-f0.25, ...); default: popularity, every "
                             "source adapter found and every finished run")
    parser.add_argument("--curve", action="store_true",
                        help="train (or reuse) LoRA and X-Cross at each --fractions and write curve.csv/json/png")
    parser.add_argument("--fractions", default=",".join(f"{f:g}" for f in CURVE_FRACTIONS),
                        help="fractions of target training users for --curve")
    return parser


def default_methods(config: RunConfig) -> list[str]:
    methods = ["popularity"]
    methods += [f"source:{s}" for s in config.sources if RunDir.of(source_config(config, s)).finished()]
    return methods + [r.name for r in RunDir.finished_runs(config.out, config.target)]


def evaluate_named(config: RunConfig, name: str, progress: bool):
    """Test scores of one method named on the command line: popularity, source:<domain>, or a run's name."""
    if name == "popularity":
        return evaluate_popularity(config)
    if name.startswith("source:"):
        return evaluate_source(config, name.split(":", 1)[1], progress)
    runs = {r.name: r for r in RunDir.finished_runs(config.out, config.target, damaged=True)}
    damaged = [p for p in runs[name].damaged() if p.name != "test_scores.npz"] if name in runs else []
    if damaged:  # (scores that cannot be read are scored again)
        runs[name].inputs()  # a run of the earlier format: refused, saying how to bring it up to date
        raise UsageError(f"{damaged[0]} cannot be read ({runs[name].path} is damaged); train it again: "
                         f"xcross-train --config {runs[name].file('config.json')} --replace")
    if name not in runs:
        raise UsageError(f"no finished run named {name!r} in {Path(config.out) / config.target} (finished: "
                         f"{', '.join(runs) or 'none'}); train it with `xcross-train --target {config.target} "
                         "--method <method>`, or name popularity / source:<domain>")
    return evaluate_run(config, runs[name], progress)


def trained_row(config: RunConfig, method: str, fraction: float, resume: bool, progress: bool) -> dict:
    """The test row of `method` trained on `fraction` of the target users: reused if its run finished (and was
    trained as asked), else trained."""
    wanted = prepare(replace(config, method=method, fraction=fraction))
    run_dir = RunDir.of(wanted)
    results = run(wanted, resume=resume, progress=progress)
    result, described = evaluate_run(config, run_dir, progress)
    row = comparison_rows({method: (result, described)}, config.train.seed)[0]
    print(f"fraction {fraction:g} {method}: hit@1 {row['hit@1']['mean']:.3f} "
          f"[{row['hit@1']['low']:.3f}, {row['hit@1']['high']:.3f}]")
    return {**row, "fraction": fraction, "run": run_dir.name, "seconds": results["seconds"]}


def curve(config: RunConfig, fractions: list[float], resume: bool, progress: bool) -> list[dict]:
    """LoRA and X-Cross at every fraction, then the baselines on the same test users: popularity, each source
    zero-shot, and merge (the sources' averaged adapters with a head trained on all target users)."""
    rows = [trained_row(config, method, f, resume, progress) for f in fractions for method in ("lora", "xcross")]
    names = ["popularity", *[f"source:{s}" for s in config.sources]]
    baselines = comparison_rows({m: evaluate_named(config, m, progress) for m in names}, config.train.seed)
    baselines.append(trained_row(config, "merge", 1.0, resume, progress))
    rows += [{**r, "baseline": True} for r in baselines]
    if len({r["scored"] for r in rows}) > 1:  # every row is scored under `config`: a difference is a bug
        raise RuntimeError("the curve's rows were scored on different users or candidates")
    return rows


def parse_fractions(text: str) -> list[float]:
    try:
        fractions = [float(f) for f in text.split(",")]
    except ValueError:
        raise UsageError(f"--fractions takes comma-separated numbers in (0, 1], got {text!r}") from None
    if bad := [f for f in fractions if not 0 < f <= 1]:
        raise UsageError(f"--fractions must lie in (0, 1], got {bad}")
    if len(set(fractions)) != len(fractions):
        raise UsageError(f"--fractions names a fraction twice ({text}): each is one run per method and seed")
    return fractions


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    args = build_parser().parse_args(argv)
    return run_command(lambda: _main(args), interrupted="stopped; run the same command again (a run's test scoring continues where it stopped)")


def _main(args: argparse.Namespace) -> int:
    config = config_from_args(args, method="lora")  # a method without sources: the check needs one
    config = prepare_or_bootstrap(config)
    target_dir = Path(config.out) / config.target
    if args.curve and args.methods:
        raise UsageError("--methods chooses the rows of a comparison; --curve trains and plots LoRA and X-Cross "
                         "at each --fractions with the baselines: give one of them")
    if args.curve:
        rows = curve(config, parse_fractions(args.fractions), args.resume, not args.quiet)
        write_rows(rows, target_dir / "curve")
        if plot_curve(rows, target_dir / "curve.png", config.target):
            print(f"wrote {target_dir / 'curve.png'}")
        else:
            print("matplotlib is not installed: no curve.png (pip install matplotlib)")
        print(format_table([{**r, "method": f"{r['method']} f={r.get('fraction', '-')}"} for r in rows]))
        return 0
    methods = args.methods.split(",") if args.methods else default_methods(config)
    if not args.methods and methods == ["popularity"]:
        print(f"no finished runs or source adapters under {target_dir.parent} for {config.target}: the table has "
              "popularity only (train some with xcross-train, or point --out at your runs)")
    entries = {m: evaluate_named(config, m, not args.quiet) for m in methods}
    rows = comparison_rows(entries, config.train.seed)
    print(f"test results on {config.target} ({scored_on(rows)}; mean [95% bootstrap interval]):")
    print(format_table(rows))
    write_rows(rows, target_dir / "comparison")
    atomic_write(target_dir / "comparison_config.json", json.dumps(config.to_dict(), indent=2) + "\n")
    print(f"wrote {target_dir / 'comparison.csv'} and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
