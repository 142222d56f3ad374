"""One configuration object per run, nested by concern (data, model with LoRA and X-Cross, training), and one table
that declares every setting of it once: its type, flag, help, check and role in a run's identity. Flags, validation,
preset filling and every identity comparison are read from that table."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from .config import ConfigError, load_config
from .errors import UsageError
from .lora import DEFAULT_TARGETS, LoRAConfig
from .methods import HEAD_INITS, TRAINED_METHODS, get_method
from .runlog import LOGGERS
from .training import TrainConfig
from .xcross import XCrossConfig

DEFAULT_DATA_DIR = "data/demo"
COMPILE_CHOICES = ("auto", "on", "off")
DTYPES = ("auto", "float32", "bfloat16", "float16")
LARGEST_SEED = 2**63 - 1  # torch.manual_seed takes a signed 64-bit seed


def default_model_dir() -> Path:
    """Where the converted default base lives: `$XCROSS_MODEL_DIR`, else `~/.cache/xcross/models/gemma-3-270m`
    (written by `xcross-prepare gemma`)."""
    env = os.environ.get("XCROSS_MODEL_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xcross" / "models" / "gemma-3-270m"


@dataclass(frozen=True)
class DataConfig:
    data_dir: str = DEFAULT_DATA_DIR
    history_len: int = 10
    title_tokens: int = 24
    num_candidates: int = 20
    max_train_users: int | None = None
    source_train_users: int | None = None
    max_examples_per_user: int | None = None
    max_eval_users: int | None = None
    max_valid_users: int | None = None
    eval_seed: int = 0


@dataclass(frozen=True)
class ModelConfig:
    """A run's model settings (the decoder's own architecture is `config.DecoderConfig`, read from its directory)."""

    model_dir: str | None = None
    lora: LoRAConfig = LoRAConfig()
    xcross: XCrossConfig = XCrossConfig()
    head_init: str = "sources"
    compile: str = "auto"
    device: str = "auto"
    dtype: str = "auto"


@dataclass(frozen=True)
class RunConfig:
    """Everything one run needs; each field is described in `SETTINGS`. Its directory (`RunDir`) is named by
    method, target, fraction and seed; its identity is the settings of role "training" and the content of the files
    it was built on (`rundir.inputs_of`)."""

    target: str = "tools"
    method: str = "xcross"
    sources: tuple[str, ...] = ()
    fraction: float = 1.0
    out: str = "runs"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "auto"
    preset_reason: str = ""
    train_sources: bool = True
    # None: built field by field in Python, every value given; else the dotted paths given by a file, a flag or
    # `with_values` (the preset fills the others)
    given: tuple[str, ...] | None = None

    def to_dict(self) -> dict:
        """The run's config.json: every setting, which were given, and which the preset filled."""
        out = _to_dict(self)
        out["given"] = sorted(given_paths(self))
        out["from_preset"] = sorted(p for p in PRESETS.get(self.preset, {}) if p not in given_paths(self))
        return out

    @classmethod
    def from_dict(cls, d: dict, where: str = "configuration") -> RunConfig:
        """Settings as a config file holds them: those present are given; the preset fills the rest on `resolve`.
        A config.json written by a run (with its "given" list) reads back as that run's settings."""
        return from_dict(d, where)

    def get(self, path: str):
        value = self
        for part in path.split("."):
            value = getattr(value, part)
        return value

    def with_values(self, values: dict) -> RunConfig:
        """A copy with dotted paths set and counted as given, e.g. `{"model.lora.rank": 4, "train.lr": 1e-3}`."""
        out = self
        for path, value in values.items():
            out = _set(out, path.split("."), value)
        if self.given is None:
            return out
        return replace(out, given=tuple(sorted({*self.given, *values})))


def _to_dict(obj) -> dict:
    out = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.name == "given":
            continue
        if dataclasses.is_dataclass(value):
            value = _to_dict(value)
        elif isinstance(value, tuple):
            value = list(value)
        out[f.name] = value
    return out


def _set(obj, parts: list[str], value):
    if len(parts) == 1:
        if isinstance(value, list):
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
    # validation per run: one epoch), 400 target training users. Its measured cost is in docs/RESULTS.md.
    "study-cpu": {"data.history_len": 5, "data.title_tokens": 16, "data.max_train_users": 400,
                  "data.max_examples_per_user": 1, "data.max_eval_users": 384, "data.max_valid_users": 64,
                  "model.lora.dropout": 0.0, "train.batch_size": 8, "train.epochs": 1, "train.lr": 1e-3,
                  "train.train_candidates": 8, "train.checkpoint_every": 5, "train.log_every": 5,
                  "train.eval_batch_size": 16},
    "full": {"data.history_len": 10, "data.title_tokens": 24, "train.batch_size": 32, "train.epochs": 1,
             "train.train_candidates": 8},
}
PRESET_CHOICES = ("auto", "none", *PRESETS)


def preset_table() -> str:
    """The presets as a markdown table, read from `PRESETS` and the defaults (the README's is this, tested)."""
    chosen = {"cpu": "auto, no CUDA device", "gpu": "auto, CUDA available"}
    columns = (("history titles × title tokens", ("data.history_len", "data.title_tokens"), " × "),
               ("target training users", ("data.max_train_users",), ""),
               ("examples per user", ("data.max_examples_per_user",), ""),
               ("validation / test users", ("data.max_valid_users", "data.max_eval_users"), " / "),
               ("batch", ("train.batch_size",), ""), ("LoRA dropout", ("model.lora.dropout",), ""),
               ("lr (adapters, head) / integrators", ("train.lr", "train.integrator_lr"), " / "))

    def value(preset: dict, path: str):
        v = preset.get(path, RunConfig().get(path))
        if v is None and path == "data.max_valid_users":
            v = preset.get("data.max_eval_users")
        return "all" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    lines = ["| preset | chosen | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 2) + "|"]
    for name, preset in PRESETS.items():
        cells = [sep.join(value(preset, p) for p in paths) for _, paths, sep in columns]
        lines.append(f"| `{name}` | {chosen.get(name, f'`--preset {name}`')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- the table -------------------------------------------------------------------------------------------------------

TRAINING = "training"  # what a run trains and how it selects: another value is another run
EVALUATION = "evaluation"  # which test users and candidates are scored: another value is rescored, never retrained
RESUMABLE = "resumable"  # where and how a run executes: may change when an interrupted run is resumed
NOT_IDENTITY = "not identity"  # where things are (their content is identity: `rundir.inputs_of`) and records
ROLES = (TRAINING, EVALUATION, RESUMABLE, NOT_IDENTITY)


@dataclass(frozen=True)
class Setting:
    path: str  # dotted path in RunConfig
    kind: type  # int, float, str, bool, or tuple (of strings; comma-separated on the command line)
    help: str
    role: str
    low: float | None = None  # numbers: the range, closed unless open_low / open_high
    high: float | None = None
    open_low: bool = False
    open_high: bool = False
    choices: tuple = ()  # the allowed values (of each element, for a tuple)
    optional: bool = False  # None allowed (no limit, every epoch, the default base)
    phrase: str = "must be in"  # how a range is stated in the error
    flag: str | None = ""  # "": "--" + the path's last part; None: set in a config file only
    unset: str = ""  # what the default None (or empty) means, for the help
    # added after runs were recorded: at its default it is no part of a run's identity, so that the runs and the
    # evidence recorded before it existed keep theirs
    added: bool = False

    @property
    def option(self) -> str | None:
        if self.flag is None:
            return None
        return self.flag or "--" + self.path.rsplit(".", 1)[-1].replace("_", "-")

    @property
    def name(self) -> str:
        """How a message names it: its flag, else its path in a config file."""
        return self.option or self.path


SETTINGS = (
    Setting("target", str, "target domain", TRAINING),
    Setting("method", str, "what to train", TRAINING, choices=TRAINED_METHODS),
    Setting("sources", tuple, "comma-separated source domains", TRAINING, unset="every other domain of the data"),
    Setting("fraction", float, "seeded fraction of the target's training users", TRAINING, 0, 1, open_low=True),
    Setting("out", str, "runs directory: a run is <out>/<target>/<method>[-f<fraction>][-s<seed>]", NOT_IDENTITY),
    Setting("data.data_dir", str, "processed data (the demo world data/demo is generated on first use)", NOT_IDENTITY,
            flag="--data-dir"),
    Setting("data.history_len", int, "history titles in a prompt, newest kept", TRAINING, 1),
    Setting("data.title_tokens", int, "token budget of one title", TRAINING, 1),
    Setting("data.num_candidates", int, "candidates per test user, the target included", EVALUATION, 2),
    Setting("data.max_train_users", int, "seeded subsample of the target's training users, before --fraction",
            TRAINING, 1, optional=True, unset="all"),
    Setting("data.source_train_users", int, "seeded subsample of each source's training users for the source "
            "adapters a run builds on, so that --max-train-users changes the target's users alone", TRAINING, 1,
            optional=True, unset="--max-train-users", added=True),
    Setting("data.max_examples_per_user", int, "most recent training examples kept per user", TRAINING, 1,
            optional=True, unset="all"),
    Setting("data.max_eval_users", int, "seeded subsample of test users (and of validation users, unless "
            "--max-valid-users)", EVALUATION, 1, optional=True, unset="all"),
    Setting("data.max_valid_users", int, "seeded subsample of validation users", TRAINING, 1, optional=True,
            unset="--max-eval-users"),
    Setting("data.eval_seed", int, "seed of the validation and test subsamples; --seed never changes them",
            EVALUATION, 0, LARGEST_SEED),
    Setting("model.model_dir", str, "HF-layout base model", NOT_IDENTITY, optional=True,
            unset="Gemma 3 270M, converted on first use", flag="--model-dir"),
    Setting("model.lora.rank", int, "LoRA rank", TRAINING, 1, flag="--rank"),
    Setting("model.lora.alpha", float, "LoRA alpha", TRAINING, 0, open_low=True, flag="--alpha"),
    Setting("model.lora.dropout", float, "LoRA dropout", TRAINING, 0, 1, open_high=True, flag="--dropout"),
    Setting("model.lora.targets", tuple, "comma-separated projections that get adapters", TRAINING,
            choices=DEFAULT_TARGETS, flag="--lora-targets"),
    Setting("model.xcross.beta", float, "integrator weight of the borrow term", TRAINING, -math.inf, math.inf,
            open_low=True),
    Setting("model.xcross.gamma", float, "integrator weight of the difference term", TRAINING, -math.inf, math.inf,
            open_low=True),
    Setting("model.xcross.eps", float, "epsilon of the integrators' input RMS normalisation", TRAINING, 0,
            open_low=True, flag=None),
    Setting("model.head_init", str, "X-Cross/ensemble/merge head at the start: the mean of the source heads, or a "
            "fresh one", TRAINING, choices=HEAD_INITS),
    Setting("model.compile", str, "torch.compile attention, MLP and integrators (auto: with CUDA)", RESUMABLE,
            choices=COMPILE_CHOICES, flag="--compile"),
    Setting("model.device", str, "auto, cpu, cuda or cuda:N", RESUMABLE, flag="--device"),
    Setting("model.dtype", str, "of the base (auto: bf16 where supported)", TRAINING, choices=DTYPES, flag="--dtype"),
    Setting("train.epochs", int, "passes over the training examples", TRAINING, 1),
    Setting("train.max_steps", int, "stop after this many optimizer steps", TRAINING, 1, optional=True,
            unset="no limit"),
    Setting("train.batch_size", int, "examples per optimizer step over all processes", TRAINING, 1),
    Setting("train.lr", float, "learning rate of adapters, head and stream weights", TRAINING, 0, 1e3,
            open_low=True),
    Setting("train.integrator_lr", float, "learning rate of the integrators", TRAINING, 0, 1e3, open_low=True),
    Setting("train.weight_decay", float, "AdamW weight decay", TRAINING, 0, math.inf),
    Setting("train.warmup", float, "fraction of the steps warming the learning rates up linearly (then a linear "
            "decay to zero)", TRAINING, 0, 1, open_high=True, phrase="is a fraction of the steps in"),
    Setting("train.grad_clip", float, "gradient-norm clipping", TRAINING, 0, math.inf, open_low=True),
    Setting("train.train_candidates", int, "candidates per training example (the target + fresh negatives every "
            "epoch)", TRAINING, 2),
    Setting("train.eval_every", int, "validate every N steps", TRAINING, 1, optional=True, unset="every epoch"),
    Setting("train.checkpoint_every", int, "checkpoint every N steps", RESUMABLE, 1),
    Setting("train.log_every", int, "log loss and integrator statistics every N steps", RESUMABLE, 1),
    Setting("train.eval_batch_size", int, "users per evaluation batch", RESUMABLE, 1),
    Setting("train.seed", int, "training seed: initialisation, user fraction, negatives, order", TRAINING, 0,
            LARGEST_SEED, flag="--seed"),
    Setting("train.grad_accum", int, "micro-batches per optimizer step: a step sees batch-size x grad-accum examples",
            TRAINING, 1),
    Setting("train.patience", int, "stop after N validations without a better one", TRAINING, 1, optional=True,
            unset="never; the best checkpoint is kept either way"),
    Setting("train.loggers", tuple, "besides log.jsonl: csv (log.csv), tensorboard (tb/), or both", RESUMABLE,
            choices=LOGGERS, flag="--logger"),
    Setting("preset", str, "what fills the settings nobody gave: auto (gpu with CUDA, else cpu), none, or a "
            "preset", NOT_IDENTITY, choices=PRESET_CHOICES),
    Setting("preset_reason", str, "why the preset was chosen (written when it is applied)", NOT_IDENTITY, flag=None),
    Setting("train_sources", bool, "train missing source adapters (else fail)", RESUMABLE,
            flag="--no-train-sources"),
    Setting("given", tuple, "the settings given by a file, a flag or Python; the preset filled the others",
            NOT_IDENTITY, flag=None, optional=True),
)
TABLE = {s.path: s for s in SETTINGS}
LEAVES = tuple(s.path for s in SETTINGS if s.path != "given")  # the settings a preset or a file may give


# Options an earlier version had and the integrator study rejected (docs/RESULTS.md §1, §3): a config.json that
# holds one at the value that version defaulted to reads as it always meant; any other value is refused.
REMOVED = {"model.xcross.mix_at": "block", "model.xcross.bound": None, "train.schedule": "linear"}
RECORDS = ("given", "from_preset")  # keys of config.json that record how its settings were resolved


def default_of(path: str):
    return RunConfig().get(path)


def help_text(setting: Setting) -> str:
    """The flag's help: the table's text, its default and every preset's value, read from `PRESETS`."""
    default = default_of(setting.path)
    shown = setting.unset if default in (None, ()) and setting.unset else _shown(default)
    presets = [f"{name} {_shown(values[setting.path])}" for name, values in PRESETS.items() if setting.path in values]
    return f"{setting.help} (default {shown}" + (f"; preset {', '.join(presets)}" if presets else "") + ")"


def _shown(value) -> str:
    if isinstance(value, tuple):
        return ",".join(value) or "none"
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def given_paths(config: RunConfig) -> set[str]:
    return set(LEAVES) if config.given is None else set(config.given)


# -- reading a configuration -----------------------------------------------------------------------------------------


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in TABLE:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


GROUPS = ("data", "model", "model.lora", "model.xcross", "train")


def from_dict(d: dict, where: str = "configuration") -> RunConfig:
    """See `RunConfig.from_dict`. Unknown keys, a group that is not an object and a removed option at another
    value than it had are refused, naming the key; the values' types and ranges are checked by `validate`."""
    if not isinstance(d, dict):
        raise UsageError(f"{where} must hold an object of settings, not {type(d).__name__}")
    for group in GROUPS:
        parent, _, name = group.rpartition(".")
        node = d
        for part in parent.split(".") if parent else ():
            node = node.get(part, {}) if isinstance(node, dict) else {}
        if name in node and not isinstance(node[name], dict):
            raise UsageError(f"{where}: {group} must be an object of settings, got {json.dumps(node[name])}")
    flat = _flatten(d)
    for path in [p for p in flat if p in REMOVED]:
        value = flat.pop(path)
        if value != REMOVED[path]:
            raise UsageError(f"{where}: {path} = {json.dumps(value)} is an option this version removed (the integrator "
                             "study rejected it, docs/RESULTS.md); a run made with it cannot be reproduced here: "
                             "retrain it without that setting")
    if unknown := sorted(set(flat) - set(LEAVES) - set(RECORDS)):
        raise UsageError(f"{where}: unknown configuration key(s) {', '.join(unknown)}")
    recorded = flat.pop("given", None)
    flat.pop("from_preset", None)
    if recorded is not None and not (isinstance(recorded, list) and all(p in LEAVES for p in recorded)):
        raise UsageError(f"{where}: \"given\" must list settings by their dotted paths, got {json.dumps(recorded)}")
    given = (set(flat) - {"preset_reason"}) if recorded is None else set(recorded)
    config = RunConfig(given=()).with_values(flat)
    config = replace(config, given=tuple(sorted(given)))
    if recorded is not None:  # a run's config.json: what it says the preset filled must be what the preset gives
        name = config.preset if config.preset in PRESETS else None
        for path, value in (PRESETS.get(name, {}) if name else {}).items():
            if path not in given and path in flat and flat[path] != value:
                raise UsageError(f"{where}: {path} is {json.dumps(flat[path])}, but the file says it came from preset "
                                 f"{name}, which gives {json.dumps(value)}: the file was edited. Add {path} to "
                                 "\"given\" to keep the value, or delete it to take the preset's")
    return config


# -- resolving -------------------------------------------------------------------------------------------------------


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not isinstance(name, str) or (name != "cpu" and not name.startswith("cuda")):
        raise UsageError(f"--device must be auto, cpu, cuda or cuda:N (got {name!r})")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu")
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


def resolve(config: RunConfig) -> RunConfig:
    """Fill every setting nobody gave from the preset (auto: "gpu" with CUDA, else "cpu"); a given value is never
    replaced, whatever it equals. A RunConfig built field by field in Python gives every value itself, so no preset
    has anything to fill: build it with `RunConfig.from_dict` to have one fill what you leave out. A resolved config
    is left as it is."""
    if config.preset_reason:
        return config
    if config.preset not in PRESET_CHOICES:
        raise UsageError(f"unknown preset {config.preset!r}; choose from {', '.join(PRESET_CHOICES)}")
    preset = config.preset
    if config.given is None:
        if preset not in ("auto", "none"):
            raise UsageError(f"preset {preset!r} has nothing to fill in a RunConfig built field by field (every value "
                             "is given); build it with RunConfig.from_dict({...}) to leave settings to the preset")
        preset, reason = "none", "every setting given (a RunConfig built in Python)"
    elif preset == "auto":
        preset = "gpu" if resolve_device(config.model.device).startswith("cuda") else "cpu"
        reason = ("a CUDA device is available" if preset == "gpu" else
                  f"no CUDA device ({os.cpu_count()} CPU cores): a subsample sized to finish the demo in ~20 min")
    else:
        reason = "chosen explicitly"
    given = given_paths(config)
    filled = {k: v for k, v in PRESETS.get(preset, {}).items() if k not in given}
    out = config
    for path, value in filled.items():
        out = _set(out, path.split("."), value)
    return replace(out, preset=preset, preset_reason=reason, given=tuple(sorted(given)))


# -- validation, in one place ----------------------------------------------------------------------------------------


def _problem(setting: Setting, value) -> str | None:
    """What is wrong with one value against its row of the table, or None."""
    name, kind = setting.name, setting.kind
    if value is None:
        return None if setting.optional else f"{name} must be set (got null)"
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int) or value < setting.low or \
                (setting.high is not None and value > setting.high):
            top = f" and <= {setting.high}" if setting.high is not None else ""
            return f"{name} must be a whole number >= {setting.low:g}{top} (got {value!r})"
    elif kind is float:
        low = setting.low if setting.low is not None else -math.inf
        high = setting.high if setting.high is not None else math.inf
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and \
            (value > low if setting.open_low else value >= low) and (value < high if setting.open_high else
                                                                     value <= high)
        if not ok:
            span = f"{'(' if setting.open_low else '['}{low:g}, {high:g}{')' if setting.open_high else ']'}"
            return f"{name} {setting.phrase} {span}, got {value!r}"
    elif kind is bool:
        if not isinstance(value, bool):
            return f"{name} must be true or false (got {value!r})"
    elif kind is str:
        if not isinstance(value, str) or (setting.choices and value not in setting.choices):
            allowed = f"one of {', '.join(setting.choices)}" if setting.choices else "a string"
            return f"{name} must be {allowed} (got {value!r})"
    elif kind is tuple:
        if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
            return f"{name} must be a list of strings (got {json.dumps(value) if not isinstance(value, tuple) else value})"
        if setting.choices and (unknown := sorted(set(value) - set(setting.choices))):
            return f"{name} must be among {', '.join(setting.choices)} (got {', '.join(unknown)})"
    return None


def problems(config: RunConfig) -> list[str]:
    """Every value against its row of the table, then what involves several settings."""
    out = [p for s in SETTINGS if (p := _problem(s, config.get(s.path)))]
    if not out:
        if not config.model.lora.targets:
            out.append(f"--lora-targets must be a non-empty subset of {', '.join(DEFAULT_TARGETS)}")
        if len(set(config.sources)) != len(config.sources):
            out.append(f"--sources names a domain twice ({','.join(config.sources)}): each source is one stream")
        if config.data.data_dir == "" or config.model.model_dir == "" or config.out == "":
            empty = [n for n, v in (("--data-dir", config.data.data_dir), ("--model-dir", config.model.model_dir),
                                    ("--out", config.out)) if v == ""]
            out.append(f"{', '.join(empty)} must name a directory (got an empty path)")
    return out


def validate(config: RunConfig, domains: list[str]) -> RunConfig:
    """Check every setting and the domains; return the config with its sources filled in and its directories
    absolute (so a run, and its config.json as --config, finds them from anywhere). Raises UsageError naming the
    flag to change."""
    if found := problems(config):
        raise UsageError("; ".join(found))
    resolve_device(config.model.device)
    if config.target not in domains:
        raise UsageError(f"unknown target domain {config.target!r}; available in {config.data.data_dir}: "
                         f"{', '.join(domains) or 'none'}")
    record = get_method(config.method)
    sources = config.sources or tuple(d for d in domains if d != config.target)
    if unknown := [s for s in sources if s not in domains]:
        raise UsageError(f"unknown source domain(s) {unknown}; available in {config.data.data_dir}: "
                         f"{', '.join(domains)}")
    if config.target in sources:
        raise UsageError(f"the target {config.target!r} is also a source; X-Cross transfers from other domains")
    if record.streams_per_source and len(sources) < 2:
        raise UsageError(f"method {config.method} mixes several source streams but has {len(sources)} source "
                         f"({','.join(sources) or 'none'}); with one source use --method merge (its adapter + a "
                         "trained head), or evaluate it zero-shot with xcross-evaluate --methods source:<domain>")
    if record.reads_sources and not sources:
        raise UsageError(f"method {config.method} needs at least one source domain besides the target")
    if "tensorboard" in config.train.loggers and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--logger tensorboard needs the tensorboard package: pip install tensorboard (or "
                         "this project's [tensorboard] extra)")
    stored = _stored_candidates(Path(config.data.data_dir) / config.target)
    if config.data.num_candidates > stored:
        raise UsageError(f"--num-candidates {config.data.num_candidates} > the {stored} candidates stored in the "
                         "data; re-run the import with a larger --num-candidates")
    model_dir = Path(config.model.model_dir or default_model_dir()).expanduser()
    if not (model_dir / "config.json").is_file():
        hint = ("convert the default weights with `xcross-prepare gemma` (or data_prep.gemma.convert())"
                if config.model.model_dir is None else "point --model-dir at an HF-layout model directory")
        raise UsageError(f"no model at {model_dir} (no config.json): {hint}")
    if not (model_dir / "tokenizer.json").is_file():
        raise UsageError(f"the model directory {model_dir} has no tokenizer.json; add the tokenizer saved with its "
                         "weights (tokenizer.save_pretrained) or convert the default weights with xcross-prepare gemma")
    try:
        architecture = load_config(model_dir)
    except (ConfigError, ValueError) as err:
        raise UsageError(f"cannot load the base model in {model_dir}: its config.json: {err}") from None
    if config.model.lora.rank > (largest := smallest_adapted_size(architecture, config.model.lora.targets)):
        raise UsageError(f"--rank {config.model.lora.rank} is more than the {largest} features of the smallest layer it "
                         f"adapts ({', '.join(config.model.lora.targets)}) in {model_dir}: a LoRA of that rank is no "
                         f"longer low-rank; use --rank {largest} or less")
    return config.with_values({"sources": tuple(sources), "model.model_dir": str(model_dir.absolute()),
                               "data.data_dir": str(Path(config.data.data_dir).expanduser().absolute()),
                               "out": str(Path(config.out).expanduser().absolute())})


def smallest_adapted_size(architecture, targets: tuple[str, ...]) -> int:
    """The smallest input or output size among the projections LoRA adapts (its largest sensible rank)."""
    d, heads, kv = architecture.hidden_size, architecture.num_attention_heads, architecture.num_key_value_heads
    head, inter = architecture.head_dim, architecture.intermediate_size
    sizes = {"q_proj": (d, heads * head), "k_proj": (d, kv * head), "v_proj": (d, kv * head),
             "o_proj": (heads * head, d), "gate_proj": (d, inter), "up_proj": (d, inter), "down_proj": (inter, d)}
    return min(min(sizes[t]) for t in targets)


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


# -- identity --------------------------------------------------------------------------------------------------------


def settings_of(config: RunConfig, roles: tuple[str, ...]) -> dict:
    """The settings of the given roles that the config's method reads, by dotted path; with TRAINING also the
    validation users it selects on (`data.max_valid_users`, else `data.max_eval_users`, drawn with
    `data.eval_seed`), which the evaluation settings decide for it."""
    ignored = get_method(config.method).ignores
    out = {s.path: config.get(s.path) for s in SETTINGS
           if s.role in roles and not any(s.path == i or s.path.startswith(i + ".") for i in ignored)
           and not (s.added and config.get(s.path) == default_of(s.path))}
    if TRAINING in roles:
        data = config.data
        out["validation users"] = {"count": data.max_valid_users or data.max_eval_users, "eval_seed": data.eval_seed}
    return out


def differences(saved: RunConfig, wanted: RunConfig, roles: tuple[str, ...] = (TRAINING,)) -> list[str]:
    """Where two configurations differ in the settings of `roles` (with both values): empty when `saved`'s run is
    the run `wanted` asks for."""
    a, b = settings_of(saved, roles), settings_of(wanted, roles)
    return [f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
