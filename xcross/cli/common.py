"""What the training and evaluation commands share: their flags (each a dotted path of `RunConfig`), the
configuration built from them, and the bootstrapping of the embedded defaults (demo world, converted weights)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..distributed import barrier, dist_info, init_distributed
from ..settings import (DEFAULT_DATA_DIR, PRESETS, TRAINED_METHODS, RunConfig, UsageError, available_domains,
                        default_model_dir, resolve, resolve_device)

# flag name -> (dotted config path, type, help); flags not given leave the preset's (or the default) value.
FLAGS = {
    "history_len": ("data.history_len", int, "history titles in a prompt, newest kept (cpu preset 5, gpu 10)"),
    "title_tokens": ("data.title_tokens", int, "token budget of one title (cpu preset 16, gpu 24)"),
    "num_candidates": ("data.num_candidates", int, "candidates per validation/test user, the target included "
                                                   "(default 20)"),
    "max_train_users": ("data.max_train_users", int, "seeded subsample of target training users, before --fraction "
                                                     "(cpu preset 160)"),
    "max_examples_per_user": ("data.max_examples_per_user", int, "most recent training examples per user "
                                                                 "(cpu preset 1)"),
    "max_eval_users": ("data.max_eval_users", int, "seeded subsample of validation/test users (cpu preset 64, "
                                                   "gpu 2000)"),
    "max_valid_users": ("data.max_valid_users", int, "fewer validation users than test users (default: "
                                                     "--max-eval-users; study-cpu preset 128)"),
    "eval_seed": ("data.eval_seed", int, "seed of that subsample; --seed never changes it (default 0)"),
    "rank": ("model.lora.rank", int, "LoRA rank (default 8)"),
    "alpha": ("model.lora.alpha", float, "LoRA alpha (default 16)"),
    "dropout": ("model.lora.dropout", float, "LoRA dropout (default 0.05; cpu preset 0)"),
    "beta": ("model.xcross.beta", float, "integrator weight of the borrow term (default 1)"),
    "gamma": ("model.xcross.gamma", float, "integrator weight of the difference term (default 1)"),
    "bound": ("model.xcross.bound", float, "bound |z| of the integrator coefficients by bound*tanh(z/bound) "
                                           "(default none)"),
    "mix_at": ("model.xcross.mix_at", str, "where the integrators mix: block (after every block, the paper; "
                                           "default) or sublayer (also after every attention sub-layer)"),
    "head_init": ("model.head_init", str, "X-Cross/ensemble/merge head at the start: sources (mean of the source "
                                          "heads; default) or fresh"),
    "compile": ("model.compile", str, "torch.compile attention, MLP and integrators: auto (on with CUDA; "
                                      "default), on, off"),
    "epochs": ("train.epochs", int, "passes over the training examples (default 1)"),
    "max_steps": ("train.max_steps", int, "stop after this many optimizer steps"),
    "batch_size": ("train.batch_size", int, "examples per optimizer step over all processes (cpu preset 8, "
                                            "gpu 32)"),
    "lr": ("train.lr", float, "learning rate of adapters, head and stream weights (default 5e-4; cpu preset 1e-3)"),
    "integrator_lr": ("train.integrator_lr", float, "learning rate of the integrators (default 1e-4)"),
    "weight_decay": ("train.weight_decay", float, "AdamW weight decay (default 0)"),
    "warmup": ("train.warmup", float, "fraction of the steps warming the learning rates up linearly (default 0.1)"),
    "schedule": ("train.schedule", str, "after the warm-up: linear (decay to zero; default) or constant"),
    "train_candidates": ("train.train_candidates", int, "candidates per training example (default 8)"),
    "eval_every": ("train.eval_every", int, "validate every N steps (default: every epoch)"),
    "checkpoint_every": ("train.checkpoint_every", int, "checkpoint every N steps"),
    "eval_batch_size": ("train.eval_batch_size", int, "users per evaluation batch"),
    "log_every": ("train.log_every", int, "log loss and integrator statistics every N steps"),
    "seed": ("train.seed", int, "training seed: initialisation, user fraction, negatives, order (default 0)"),
}


def add_run_arguments(parser: argparse.ArgumentParser, with_method: bool = True) -> None:
    parser.add_argument("--target", default="tools", help="target domain (default tools)")
    parser.add_argument("--sources", default=None, help="comma-separated source domains (default: all others)")
    if with_method:
        parser.add_argument("--method", default="xcross", choices=TRAINED_METHODS,
                            help="what to train (default xcross)")
    parser.add_argument("--fraction", type=float, default=1.0, help="seeded fraction of target training users")
    parser.add_argument("--data-dir", default=DEFAULT_DATA_DIR, help="processed data (default: the demo world, "
                                                                     "generated on first use)")
    parser.add_argument("--model-dir", default=None, help="HF-layout base model (default: Gemma 3 270M, converted "
                                                          "on first use)")
    parser.add_argument("--out", default="runs", help="runs directory (default runs/)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bf16 where supported), float32, bfloat16")
    parser.add_argument("--preset", default="auto", help="auto (gpu with CUDA, else cpu), none, " + ", ".join(PRESETS))
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of each run")
    parser.add_argument("--no-train-sources", dest="train_sources", action="store_false",
                        help="fail instead of training missing source adapters")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    for name, (_, kind, text) in FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text)


def config_from_args(args: argparse.Namespace, method: str | None = None) -> RunConfig:
    """The resolved configuration: the preset first, then every flag given."""
    base = RunConfig(target=args.target, method=method or args.method, fraction=args.fraction, out=args.out,
                     sources=tuple(s for s in args.sources.split(",") if s) if args.sources else (),
                     preset=args.preset, train_sources=args.train_sources)
    base = base.with_values({"data.data_dir": args.data_dir, "model.model_dir": args.model_dir,
                             "model.device": args.device, "model.dtype": args.dtype})
    explicit = {path: getattr(args, name) for name, (path, _, _) in FLAGS.items() if getattr(args, name) is not None}
    return resolve(base, explicit)


def bootstrap(config: RunConfig) -> None:
    """Generate the demo world and convert the default weights where the config asks for them and they are
    missing. Under torchrun the process group is joined first, so that only rank 0 writes them."""
    init_distributed(resolve_device(config.model.device))
    data_dir = Path(config.data.data_dir)
    if not available_domains(data_dir):
        if data_dir.resolve() != Path(DEFAULT_DATA_DIR).resolve():
            raise UsageError(f"no processed domains in {data_dir}; build them with `xcross-prepare csv` / "
                             "`xcross-prepare amazon`, or omit --data-dir to use the demo world")
        if dist_info().main:
            from data_prep.synthetic import generate_world
            print(f"generating the demo world into {data_dir} ...")
            generate_world(data_dir)
        barrier()
    if config.model.model_dir is None and not (default_model_dir() / "conversion.json").is_file():
        if dist_info().main:
            from data_prep.gemma import ConversionError, convert
            try:
                convert(default_model_dir())
            except ConversionError as err:
                raise UsageError(str(err)) from err
        barrier()


def finish_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
