"""Train X-Cross (or a baseline) on a target domain: source adapters are trained or reused, the method is trained
on the target, model-selected on validation and tested. `python train.py --help`; also under torchrun."""

from __future__ import annotations

import argparse
import os
import sys

import torch

from xcross.experiment import PRESETS, RunSpec, UsageError, apply_preset, format_table, prepare_inputs, run
from xcross.experiment import comparison_rows
from xcross.runtime import keep_freed_memory
from xcross.training import EvalResult, TrainingDiverged

# Flags that default to the preset's value when not given: (spec field, type, help).
SPEC_FLAGS = {
    "history_len": (int, "history titles in a prompt, newest kept (cpu preset 5, gpu 10)"),
    "title_tokens": (int, "token budget of one title (cpu preset 16, gpu 24)"),
    "num_candidates": (int, "candidates per validation/test user, the target included (default 20)"),
    "max_train_users": (int, "seeded subsample of target training users, before --fraction (cpu preset 160)"),
    "max_examples_per_user": (int, "most recent training examples per user (cpu preset 1)"),
    "max_eval_users": (int, "seeded subsample of validation/test users (cpu preset 64, gpu 2000)"),
    "rank": (int, "LoRA rank (default 8)"),
    "alpha": (float, "LoRA alpha (default 16)"),
    "dropout": (float, "LoRA dropout (default 0.05; cpu preset 0)"),
    "beta": (float, "integrator weight of the borrow term (default 1)"),
    "gamma": (float, "integrator weight of the difference term (default 1)"),
    "bound": (float, "bound |z| of the integrator coefficients by bound*tanh(z/bound) (default none)"),
    "mix_at": (str, "where the integrators mix: block (after every block, the paper; default) or sublayer "
                    "(also after every attention sub-layer)"),
    "head_init": (str, "X-Cross/merge head at the start: sources (mean of the source heads; default) or fresh"),
    "compile": (str, "torch.compile attention, MLP and integrators: auto (on with CUDA; default), on, off"),
}
TRAIN_FLAGS = {
    "epochs": (int, "passes over the training examples (default 1)"),
    "max_steps": (int, "stop after this many optimizer steps"),
    "batch_size": (int, "examples per optimizer step over all processes (cpu preset 8, gpu 32)"),
    "lr": (float, "learning rate of adapters, head and stream weights (default 5e-4; cpu preset 1e-3)"),
    "integrator_lr": (float, "learning rate of the integrators (default 1e-4)"),
    "weight_decay": (float, "AdamW weight decay (default 0)"),
    "warmup": (float, "fraction of the steps warming the learning rates up linearly (default 0.1)"),
    "schedule": (str, "after the warm-up: linear (decay to zero; default) or constant"),
    "train_candidates": (int, "candidates per training example (default 8)"),
    "eval_every": (int, "validate every N steps (default: every epoch)"),
    "checkpoint_every": (int, "checkpoint every N steps"),
    "eval_batch_size": (int, "users per evaluation batch"),
    "log_every": (int, "log loss and integrator statistics every N steps"),
    "seed": (int, "seed of every random choice (default 0)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Without --data-dir the embedded demo world (data/demo) is generated on first use; without "
               "--model-dir Gemma 3 270M is converted from its PyPI GGUF. Presets: " + ", ".join(PRESETS) + ".")
    parser.add_argument("--target", default="tools", help="target domain (default tools)")
    parser.add_argument("--sources", default=None, help="comma-separated source domains (default: all others)")
    parser.add_argument("--method", default="xcross", choices=["xcross", "lora", "merge", "head"])
    parser.add_argument("--fraction", type=float, default=1.0, help="seeded fraction of target training users")
    parser.add_argument("--data-dir", default="data/demo", help="processed data (default: the demo world)")
    parser.add_argument("--model-dir", default=None, help="HF-layout base model (default: Gemma 3 270M)")
    parser.add_argument("--out", default="runs", help="runs directory (default runs/)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where supported), float32, bfloat16")
    parser.add_argument("--preset", default="auto", help="auto (gpu with CUDA, else cpu), " + ", ".join(PRESETS))
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of each run")
    parser.add_argument("--no-train-sources", dest="train_sources", action="store_false",
                        help="fail instead of training missing source adapters")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    for name, (kind, text) in {**SPEC_FLAGS, **TRAIN_FLAGS}.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text)
    return parser


def spec_from_args(args: argparse.Namespace) -> RunSpec:
    base = RunSpec(target=args.target, method=args.method, fraction=args.fraction, data_dir=args.data_dir,
                   model_dir=args.model_dir, out=args.out, device=args.device, dtype=args.dtype,
                   preset=args.preset, train_sources=args.train_sources,
                   sources=args.sources.split(",") if args.sources else [])
    overrides = {k: getattr(args, k) for k in SPEC_FLAGS if getattr(args, k) is not None}
    train = {k: getattr(args, k) for k in TRAIN_FLAGS if getattr(args, k) is not None}
    return apply_preset(base, overrides, train)


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    try:
        return _main(argv)
    finally:  # last: rank 0 still needs the group while it prints
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        spec = prepare_inputs(spec_from_args(args))
        if int(os.environ.get("RANK", 0)) == 0:  # the process group does not exist yet
            print(f"preset {spec.preset}: {spec.preset_reason}")
        results = run(spec, resume=args.resume, progress=not args.quiet)
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: training diverged: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print(f"\ninterrupted: {err or 'stopped; rerun with --resume to continue'}", file=sys.stderr)
        return 130
    from xcross.training import dist_info
    if dist_info().main:
        run_dir = spec.run_dir
        rows = comparison_rows({spec.method: (EvalResult.load(run_dir / "test_scores.npz"), {
            "trainable": results["parameters"]["trainable"],
            "train_examples": results["training"]["train_examples"]})}, seed=spec.train.seed)
        print(f"\ntest results on {spec.target} ({results['test_users']} users, "
              f"{spec.num_candidates} candidates each; 95% bootstrap intervals):")
        print(format_table(rows))
        print(f"\nwrote {run_dir}/results.json, config.json, best.safetensors ({results['seconds']:.0f} s in all)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
