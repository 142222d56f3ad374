"""What the training and evaluation commands share: their flags (each a dotted path of `RunConfig`), the
configuration built from them, and the bootstrapping of the embedded defaults (demo world, converted weights)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

import torch

from ..distributed import barrier, dist_info, init_distributed
from ..settings import (DEFAULT_DATA_DIR, PRESETS, TRAINED_METHODS, RunConfig, UsageError, available_domains,
                        default_model_dir, resolve, resolve_device)
from ..training import TrainingDiverged

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
                                                     "--max-eval-users; study-cpu preset 64)"),
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
    "grad_accum": ("train.grad_accum", int, "micro-batches per optimizer step: a step sees batch-size x grad-accum "
                                            "examples, the same update as one batch that large (default 1)"),
    "patience": ("train.patience", int, "stop after N validations without a better one (default: never; the best "
                                        "checkpoint is kept either way)"),
    "lora_targets": ("model.lora.targets", lambda s: tuple(t for t in s.split(",") if t),
                     "comma-separated projections that get adapters (default: all seven, "
                     "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)"),
    "logger": ("train.loggers", lambda s: tuple(t for t in s.split(",") if t),
               "besides log.jsonl: csv (log.csv), tensorboard (tb/ event files; pip install tensorboard), or both "
               "comma-separated"),
}
# The run's own flags: flag name -> dotted path.
RUN_FLAGS = {"target": "target", "method": "method", "fraction": "fraction", "data_dir": "data.data_dir",
             "model_dir": "model.model_dir", "out": "out", "device": "model.device", "dtype": "model.dtype",
             "preset": "preset", "train_sources": "train_sources"}


def add_run_arguments(parser: argparse.ArgumentParser, with_method: bool = True) -> None:
    parser.add_argument("--config", type=Path, default=None,
                        help="a JSON (or TOML) file of settings, nested as a run's config.json (which is one: it "
                             "reproduces its run); flags given on the command line override it")
    parser.add_argument("--target", default=None, help="target domain (default tools)")
    parser.add_argument("--sources", default=None, help="comma-separated source domains (default: all others)")
    if with_method:
        parser.add_argument("--method", default=None, choices=TRAINED_METHODS, help="what to train (default xcross)")
    parser.add_argument("--fraction", type=float, default=None, help="seeded fraction of target training users "
                                                                     "(default 1)")
    parser.add_argument("--data-dir", default=None, help="processed data (default: the demo world data/demo, "
                                                         "generated on first use)")
    parser.add_argument("--model-dir", default=None, help="HF-layout base model (default: Gemma 3 270M, converted "
                                                          "on first use)")
    parser.add_argument("--out", default=None, help="runs directory (default runs/)")
    parser.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default=None, help="auto (bf16 where supported; default), float32, bfloat16")
    parser.add_argument("--preset", default=None, help="auto (gpu with CUDA, else cpu; default), none, "
                                                       + ", ".join(PRESETS))
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint of each run")
    parser.add_argument("--no-train-sources", dest="train_sources", action="store_const", const=False, default=None,
                        help="fail instead of training missing source adapters")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    for name, (_, kind, text) in FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=text)


def read_config_file(path: Path) -> RunConfig:
    """A `--config` file: JSON, or TOML (`.toml`, read with the standard library's tomllib)."""
    try:
        if path.suffix == ".toml":
            import tomllib
            data = tomllib.loads(path.read_text())
        else:
            data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"--config {path}: no such file") from None
    except (ValueError, ImportError) as err:  # JSONDecodeError, TOMLDecodeError; tomllib needs Python >= 3.11
        raise UsageError(f"--config {path} is not valid {'TOML' if path.suffix == '.toml' else 'JSON'}: {err}") \
            from None
    if not isinstance(data, dict):
        raise UsageError(f"--config {path} must hold an object of settings")
    return RunConfig.from_dict(data)


def config_from_args(args: argparse.Namespace, method: str | None = None) -> RunConfig:
    """The resolved configuration: the `--config` file (or the defaults), its preset where it has not been applied
    yet, then every flag given."""
    base = read_config_file(args.config) if args.config else RunConfig()
    explicit = {path: getattr(args, name) for name, path in RUN_FLAGS.items() if getattr(args, name, None) is not None}
    if method is not None:
        explicit["method"] = method
    if args.sources is not None:
        explicit["sources"] = tuple(s for s in args.sources.split(",") if s)
    explicit.update({path: getattr(args, name) for name, (path, _, _) in FLAGS.items()
                     if getattr(args, name) is not None})
    # Where the run executes comes first: the automatic preset depends on the device.
    placed = base.with_values({k: v for k, v in explicit.items() if k in ("preset", "model.device")})
    return resolve(placed, explicit)


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


def run_command(job, interrupted: str | None = None) -> int:
    """A command's exit code: `job()`'s, or 2 for a usage error (one line), 1 for a diverged training, 128 + the
    signal's number for an interruption (SIGINT 130, SIGTERM 143), reported as `interrupted` says (default: what
    the training loop said)."""
    try:
        return job()
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:
        print(f"error: training diverged: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print(f"\ninterrupted: {interrupted or str(err) or 'stopped; rerun with --resume to continue'}",
              file=sys.stderr)
        return 128 + getattr(err, "signum", signal.SIGINT)


def finish_distributed() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
