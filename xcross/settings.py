"""One configuration object per run, nested by concern (data, model with LoRA and X-Cross, training), resolved
from a preset and validated once, before any work; saved as the run's `config.json` and read back from it."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from .lora import DEFAULT_TARGETS, LoRAConfig
from .runlog import LOGGERS
from .methods import HEAD_INITS
from .training import SCHEDULES, TrainConfig
from .xcross import MIX_POINTS, XCrossConfig

DEFAULT_DATA_DIR = "data/demo"
COMPILE_CHOICES = ("auto", "on", "off")
DTYPES = ("auto", "float32", "bfloat16", "float16")
TRAINED_METHODS = ("xcross", "ensemble", "lora", "merge", "head")


def default_model_dir() -> Path:
    """Where the converted default base lives: `$XCROSS_MODEL_DIR`, else `~/.cache/xcross/models/gemma-3-270m`
    (written by `xcross-prepare gemma`)."""
    env = os.environ.get("XCROSS_MODEL_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xcross" / "models" / "gemma-3-270m"


class UsageError(Exception):
    """A request that cannot run as given; the CLIs print it on one line and exit with code 2."""


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = DEFAULT_DATA_DIR
    history_len: int = 10  # history titles in a prompt, newest kept
    title_tokens: int = 24  # token budget of one title
    num_candidates: int = 20  # per validation/test user, the target included
    max_train_users: int | None = None  # seeded subsample of the target's training users, before the fraction
    max_examples_per_user: int | None = None  # most recent training examples kept per user
    max_eval_users: int | None = None  # seeded subsample of validation and test users
    max_valid_users: int | None = None  # fewer validation users than test users (default: max_eval_users)
    eval_seed: int = 0  # seeds that subsample; the training seed never changes which users are evaluated


@dataclass(frozen=True)
class ModelConfig:
    model_dir: str | None = None  # None: the converted Gemma 3 270M at default_model_dir()
    lora: LoRAConfig = LoRAConfig()
    xcross: XCrossConfig = XCrossConfig()
    head_init: str = "sources"  # X-Cross, ensemble and merge heads: the sources' mean, or "fresh"
    compile: str = "auto"  # torch.compile blocks and integrators: "auto" (with CUDA), "on", "off"
    device: str = "auto"
    dtype: str = "auto"


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs. Its identity (method, target, fraction, seed = `train.seed`, sources) names its
    directory (`RunDir`); the rest says how it is computed."""

    target: str = "tools"
    method: str = "xcross"
    sources: tuple[str, ...] = ()  # empty: every other domain of the data directory
    fraction: float = 1.0  # seeded fraction of the target's training users
    out: str = "runs"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "auto"  # "auto" (gpu with CUDA, else cpu), a name of PRESETS, or "none"
    preset_reason: str = ""  # filled when the preset is applied
    train_sources: bool = True  # train missing source adapters (else fail)

    def to_dict(self) -> dict:
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RunConfig:
        return _from_dict(cls, d, "")

    def get(self, path: str):
        value = self
        for part in path.split("."):
            value = getattr(value, part)
        return value

    def with_values(self, values: dict) -> RunConfig:
        """A copy with dotted paths set, e.g. `{"model.lora.rank": 4, "train.lr": 1e-3}`."""
        out = self
        for path, value in values.items():
            out = _set(out, path.split("."), value)
        return out


def _to_dict(obj) -> dict:
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = _to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _from_dict(cls, d: dict, where: str):
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise UsageError(f"unknown configuration key(s) {', '.join(where + k for k in unknown)}")
    values = {}
    for name, value in d.items():
        default = getattr(cls(), name)
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = _from_dict(type(default), value, f"{where}{name}.")
        elif isinstance(default, tuple) and isinstance(value, list):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def _set(obj, parts: list[str], value):
    if len(parts) == 1:
        if isinstance(getattr(obj, parts[0]), tuple) and isinstance(value, list):
            value = tuple(value)
        return replace(obj, **{parts[0]: value})
    return replace(obj, **{parts[0]: _set(getattr(obj, parts[0]), parts[1:], value)})


# -- presets ---------------------------------------------------------------------------------------------------------

# Sized from measured throughput: on 2 CPU cores in bf16 one packed training example of 5 history titles and 8
# candidates takes ~0.5 s per stream, so the whole demo run fits in 20 minutes.
PRESETS = {
    "cpu": {"data.history_len": 5, "data.title_tokens": 16, "data.max_train_users": 160,
            "data.max_examples_per_user": 1, "data.max_eval_users": 64, "model.lora.dropout": 0.0,
            "train.batch_size": 8, "train.epochs": 1, "train.lr": 1e-3, "train.train_candidates": 8,
            "train.checkpoint_every": 5, "train.log_every": 2, "train.eval_batch_size": 8},
    "gpu": {"data.history_len": 10, "data.title_tokens": 24, "data.max_eval_users": 2000, "train.batch_size": 32,
            "train.epochs": 1, "train.train_candidates": 8, "train.checkpoint_every": 200, "train.log_every": 20,
            "train.eval_batch_size": 32},
    # The study preset for a 2-core CPU: the 384 test users a decision needs at least, 64 validation users (one
    # validation per run: one epoch), 400 target training users. Its measured cost is in the README ("The study").
    "study-cpu": {"data.history_len": 5, "data.title_tokens": 16, "data.max_train_users": 400,
                  "data.max_examples_per_user": 1, "data.max_eval_users": 384, "data.max_valid_users": 64,
                  "model.lora.dropout": 0.0, "train.batch_size": 8, "train.epochs": 1, "train.lr": 1e-3,
                  "train.train_candidates": 8, "train.checkpoint_every": 5, "train.log_every": 5,
                  "train.eval_batch_size": 16},
    "full": {"data.history_len": 10, "data.title_tokens": 24, "train.batch_size": 32, "train.epochs": 1,
             "train.train_candidates": 8},
}


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu")
    if name != "cpu" and not name.startswith("cuda"):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N (got {name!r})")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        # bf16 matmuls are native (and ~2x faster than fp32) on CPUs with AMX/AVX512-BF16; elsewhere stay fp32.
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    if name not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)} (got {name})")
    return getattr(torch, name)


def resolve(config: RunConfig, explicit: dict | None = None) -> RunConfig:
    """Apply the preset to every field still at its default (auto: "gpu" with CUDA, else "cpu"), then the
    explicitly given dotted values (`explicit`, e.g. command-line flags). A resolved config is left as it is."""
    if config.preset_reason:
        return config.with_values(explicit or {})
    preset = config.preset
    if preset == "auto":
        preset = "gpu" if resolve_device(config.model.device).startswith("cuda") else "cpu"
        reason = ("a CUDA device is available" if preset == "gpu" else
                  f"no CUDA device ({os.cpu_count()} CPU cores): a subsample sized to finish the demo in ~20 min")
    else:
        reason = "chosen explicitly"
    if preset != "none" and preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose from auto, none, {', '.join(PRESETS)}")
    default = RunConfig()
    values = {k: v for k, v in PRESETS.get(preset, {}).items() if config.get(k) == default.get(k)}
    return replace(config.with_values(values), preset=preset, preset_reason=reason).with_values(explicit or {})


# -- validation, in one place ----------------------------------------------------------------------------------------


def flag(path: str) -> str:
    """The command-line flag of a dotted configuration path."""
    name = {"model.lora.targets": "lora-targets", "train.seed": "seed"}.get(path, path.rsplit(".", 1)[-1])
    return "--" + name.replace("_", "-")


_AT_LEAST = {1: ("data.history_len", "data.title_tokens", "data.max_train_users", "data.max_examples_per_user",
                 "data.max_eval_users", "data.max_valid_users", "model.lora.rank", "train.epochs", "train.max_steps", "train.batch_size",
                 "train.eval_every", "train.checkpoint_every", "train.log_every", "train.eval_batch_size",
                 "train.grad_accum", "train.patience"),
             2: ("data.num_candidates", "train.train_candidates"),
             0: ("train.seed", "data.eval_seed")}
_OPTIONAL = {"data.max_train_users", "data.max_examples_per_user", "data.max_eval_users", "data.max_valid_users",
             "train.max_steps", "train.patience",
             "train.eval_every"}  # None: no limit / every epoch
_CHOICES = {"method": TRAINED_METHODS, "model.xcross.mix_at": MIX_POINTS, "model.head_init": HEAD_INITS,
            "train.schedule": SCHEDULES, "model.compile": COMPILE_CHOICES, "model.dtype": DTYPES}


def _problems(config: RunConfig) -> list[str]:
    out = []
    for least, paths in _AT_LEAST.items():
        for path in paths:
            value = config.get(path)
            if value is None and path in _OPTIONAL:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                out.append(f"{flag(path)} must be a whole number >= {least} (got {value!r})")
    for path, allowed in _CHOICES.items():
        if config.get(path) not in allowed:
            out.append(f"{flag(path)} must be one of {', '.join(allowed)} (got {config.get(path)!r})")

    def number(path: str, low: float, high: float = math.inf, low_open=True, high_open=False):
        value = config.get(path)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
            (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not ok:
            span = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            out.append(f"{flag(path)} must be in {span}, got {value!r}")

    number("fraction", 0, 1)
    number("train.lr", 0, 1e3)
    number("train.integrator_lr", 0, 1e3)
    number("train.weight_decay", 0, low_open=False)
    if not (isinstance(config.train.warmup, (int, float)) and 0 <= config.train.warmup < 1):
        out.append(f"--warmup is a fraction of the steps in [0, 1), got {config.train.warmup!r}")
    number("train.grad_clip", 0)
    number("model.lora.alpha", 0)
    number("model.lora.dropout", 0, 1, low_open=False, high_open=True)
    number("model.xcross.beta", -math.inf)
    number("model.xcross.gamma", -math.inf)
    bound = config.model.xcross.bound
    if bound is not None and not (isinstance(bound, (int, float)) and math.isfinite(bound) and bound > 0):
        out.append(f"--bound must be positive (got {bound!r}); omit it for unbounded coefficients")
    unknown = sorted(set(config.model.lora.targets) - set(DEFAULT_TARGETS))
    if unknown or not config.model.lora.targets:
        out.append(f"--lora-targets must be a non-empty subset of {', '.join(DEFAULT_TARGETS)} (got {unknown})")
    if unknown := sorted(set(config.train.loggers) - set(LOGGERS)):
        out.append(f"--logger must be among {', '.join(LOGGERS)} (got {', '.join(unknown)})")
    if len(set(config.sources)) != len(config.sources):
        out.append(f"--sources names a domain twice ({','.join(config.sources)}): each source is one stream")
    return out


def validate(config: RunConfig, domains: list[str]) -> RunConfig:
    """Check every field and the domains; return the config with its sources filled in. Raises UsageError naming
    the flag to change."""
    problems = _problems(config)
    if problems:
        raise UsageError("; ".join(problems))
    if config.target not in domains:
        raise UsageError(f"unknown target domain {config.target!r}; available in {config.data.data_dir}: "
                         f"{', '.join(domains) or 'none'}")
    sources = config.sources or tuple(d for d in domains if d != config.target)
    if unknown := [s for s in sources if s not in domains]:
        raise UsageError(f"unknown source domain(s) {unknown}; available in {config.data.data_dir}: "
                         f"{', '.join(domains)}")
    if config.target in sources:
        raise UsageError(f"the target {config.target!r} is also a source; X-Cross transfers from other domains")
    if config.method in ("xcross", "ensemble") and len(sources) < 2:
        raise UsageError(f"method {config.method} mixes several source streams but has {len(sources)} source "
                         f"({','.join(sources) or 'none'}); with one source use --method merge (its adapter + a "
                         "trained head), or evaluate it zero-shot with xcross-evaluate --methods source:<domain>")
    if "tensorboard" in config.train.loggers and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--logger tensorboard needs the tensorboard package: pip install tensorboard (or "
                         "this project's [tensorboard] extra)")
    stored = _stored_candidates(Path(config.data.data_dir) / config.target)
    if config.data.num_candidates > stored:
        raise UsageError(f"--num-candidates {config.data.num_candidates} > the {stored} candidates stored in the "
                         "data; re-run the import with a larger --num-candidates")
    if config.method == "merge" and not sources:
        raise UsageError("method merge needs at least one source domain besides the target")
    model_dir = config.model.model_dir or str(default_model_dir())
    if not (Path(model_dir).expanduser() / "config.json").is_file():
        hint = ("convert the default weights with `xcross-prepare gemma` (or data_prep.gemma.convert())"
                if config.model.model_dir is None else "point --model-dir at an HF-layout model directory")
        raise UsageError(f"no model at {model_dir} (no config.json): {hint}")
    if not (Path(model_dir).expanduser() / "tokenizer.json").is_file():
        raise UsageError(f"the model directory {model_dir} has no tokenizer.json; add the tokenizer saved with its "
                         "weights (tokenizer.save_pretrained) or convert the default weights with xcross-prepare gemma")
    return replace(config, sources=tuple(sources), model=replace(config.model, model_dir=str(model_dir)))


def _stored_candidates(domain_dir: Path) -> int:
    with (domain_dir / "test.jsonl").open(encoding="utf-8") as f:
        return len(json.loads(f.readline())["candidates"])


def available_domains(data_dir: str | Path) -> list[str]:
    """Processed domains of a data directory: subdirectories holding a finished import (items.jsonl and
    meta.json); hidden ones (an import's temporaries) never count."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return []
    return sorted(p.name for p in data_dir.iterdir() if not p.name.startswith(".")
                  and (p / "items.jsonl").is_file() and (p / "meta.json").is_file())
