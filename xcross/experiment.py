"""Experiments as the CLIs run them: a resolved `RunSpec`, source adapters trained or reused, one run per method,
comparison tables and the data-efficiency curve. `train.py` and `evaluate.py` only parse flags into these calls."""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch

from .data import Domain, Example, PromptBuilder, load_domain
from .lora import DEFAULT_TARGETS, LoRAConfig
from .metrics import METRICS, per_user_metrics, summarise
from .tokenizer import Tokenizer
from .training import SCHEDULES, EvalResult, TrainConfig, dist_info, evaluate, fit, init_distributed, select_users
from .weights import atomic_write_text, load_decoder, load_tensors
from .xcross import (ADAPTER_FORMAT, CHECKPOINT_FORMAT, HEAD_INITS, MIX_POINTS, XCrossConfig, XCrossModel,
                     base_signature, build_model)

TRAINED_METHODS = ("xcross", "lora", "merge", "head")
DEFAULT_DATA_DIR = Path("data/demo")
CURVE_FRACTIONS = (0.05, 0.1, 0.25, 0.5, 1.0)
COMPILE_CHOICES = ("auto", "on", "off")


class UsageError(Exception):
    """A request that cannot run as given; the CLIs print it on one line and exit with code 2."""


@dataclass
class RunSpec:
    """Everything a run needs, after presets and flags are resolved; saved as the run's `config.json`."""

    target: str = "tools"
    method: str = "xcross"
    sources: list[str] = field(default_factory=list)  # default: every other domain of the data dir
    data_dir: str = str(DEFAULT_DATA_DIR)
    model_dir: str | None = None  # default: the converted Gemma 3 270M
    out: str = "runs"
    fraction: float = 1.0
    history_len: int = 10
    title_tokens: int = 24
    num_candidates: int = 20
    max_train_users: int | None = None  # seeded subsample of the target's training users, before --fraction
    max_examples_per_user: int | None = None  # most recent training examples kept per user
    max_eval_users: int | None = None  # seeded subsample of validation and test users
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    beta: float = 1.0
    gamma: float = 1.0
    bound: float | None = None
    mix_at: str = "block"  # "block" (the paper) or "sublayer" (also after every attention sub-layer)
    head_init: str = "sources"  # X-Cross and merge heads: the sources' mean, or "fresh"
    compile: str = "auto"  # torch.compile the blocks and integrators: "auto" (with CUDA), "on", "off"
    train: TrainConfig = field(default_factory=TrainConfig)
    device: str = "auto"
    dtype: str = "auto"
    preset: str = "auto"
    preset_reason: str = ""
    train_sources: bool = True

    @property
    def lora(self) -> LoRAConfig:
        return LoRAConfig(self.rank, self.alpha, self.dropout, tuple(self.targets))

    @property
    def xcross(self) -> XCrossConfig:
        return XCrossConfig(self.beta, self.gamma, self.bound, mix_at=self.mix_at)

    @property
    def run_dir(self) -> Path:
        name = self.method if self.fraction == 1.0 else f"{self.method}-f{self.fraction:g}"
        return Path(self.out) / self.target / name

    def to_dict(self) -> dict:
        d = asdict(self)
        d["train"] = self.train.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunSpec:
        d = dict(d)
        d["train"] = TrainConfig(**d.get("train", {}))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# -- presets ---------------------------------------------------------------------------------------------------------

# Sized from measured throughput (README, "CPU preset"): on 2 CPU cores in bf16 one packed training example of
# 5 history titles and 8 candidates takes ~0.5 s per stream, so the whole demo run fits in 20 minutes.
PRESETS = {
    "cpu": dict(history_len=5, title_tokens=16, max_train_users=160, max_examples_per_user=1, max_eval_users=64,
                train=dict(batch_size=8, epochs=1, lr=1e-3, train_candidates=8, eval_every=None, checkpoint_every=5,
                           log_every=2, eval_batch_size=8), dropout=0.0),
    "gpu": dict(history_len=10, title_tokens=24, max_train_users=None, max_examples_per_user=None,
                max_eval_users=2000, train=dict(batch_size=32, epochs=1, train_candidates=8, eval_every=None,
                                                checkpoint_every=200, log_every=20, eval_batch_size=32)),
    "full": dict(history_len=10, title_tokens=24, max_train_users=None, max_examples_per_user=None,
                 max_eval_users=None, train=dict(batch_size=32, epochs=1, train_candidates=8)),
}


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for, but torch sees no CUDA device; use --device cpu")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
        # bf16 matmuls are native (and ~2x faster than fp32) on CPUs with AMX/AVX512-BF16; elsewhere stay fp32.
        return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32
    if name not in ("float32", "bfloat16", "float16"):
        raise UsageError(f"--dtype must be auto, float32, bfloat16 or float16 (got {name})")
    return getattr(torch, name)


def apply_preset(spec: RunSpec, overrides: dict, train_overrides: dict) -> RunSpec:
    """Fill `spec` from the preset (auto: "gpu" with CUDA, else "cpu"), then apply the user's explicit flags."""
    device = resolve_device(spec.device)
    preset = spec.preset
    if preset == "auto":
        preset = "gpu" if device.startswith("cuda") else "cpu"
        reason = ("a CUDA device is available" if preset == "gpu" else
                  f"no CUDA device ({os.cpu_count()} CPU cores): a subsample sized to finish the demo in ~20 min")
    else:
        reason = "chosen with --preset"
    if preset not in PRESETS:
        raise UsageError(f"unknown preset {preset!r}; choose from auto, {', '.join(PRESETS)}")
    values = dict(PRESETS[preset])
    train = {**TrainConfig().to_dict(), **values.pop("train", {}), **train_overrides}
    values.update(overrides)
    spec = replace(spec, **values, train=TrainConfig(**train), preset=preset, preset_reason=reason)
    return spec


# -- validation of requests ------------------------------------------------------------------------------------------


def available_domains(data_dir: Path) -> list[str]:
    return sorted(p.name for p in data_dir.iterdir() if (p / "items.jsonl").is_file()) if data_dir.is_dir() else []


def prepare_inputs(spec: RunSpec) -> RunSpec:
    """Generate the demo world and convert the default weights if they are missing; check the request.

    Under torchrun the process group is joined first, so that only rank 0 generates and converts."""
    init_distributed(resolve_device(spec.device))
    data_dir = Path(spec.data_dir)
    if not available_domains(data_dir):
        if data_dir.resolve() != DEFAULT_DATA_DIR.resolve():
            raise UsageError(f"no processed domains in {data_dir}; build them with `python -m data_prep.csv` / "
                             "`python -m data_prep.amazon`, or omit --data-dir to use the demo world")
        if dist_info().main:
            from data_prep.synthetic import generate_world
            print(f"generating the demo world into {data_dir} ...")
            generate_world(data_dir)
        _barrier_if_distributed()
    domains = available_domains(data_dir)
    if spec.target not in domains:
        raise UsageError(f"unknown target domain {spec.target!r}; available in {data_dir}: {', '.join(domains)}")
    sources = spec.sources or [d for d in domains if d != spec.target]
    unknown = [s for s in sources if s not in domains]
    if unknown:
        raise UsageError(f"unknown source domain(s) {unknown}; available in {data_dir}: {', '.join(domains)}")
    if spec.target in sources:
        raise UsageError(f"the target {spec.target!r} is also a source; X-Cross transfers from other domains")
    if not 0 < spec.fraction <= 1:
        raise UsageError(f"--fraction must be in (0, 1], got {spec.fraction}")
    choices = {"--mix-at": (spec.mix_at, MIX_POINTS), "--head-init": (spec.head_init, HEAD_INITS),
               "--schedule": (spec.train.schedule, SCHEDULES), "--compile": (spec.compile, COMPILE_CHOICES)}
    for flag, (value, allowed) in choices.items():
        if value not in allowed:
            raise UsageError(f"{flag} must be one of {', '.join(allowed)} (got {value!r})")
    if not 0 <= spec.train.warmup < 1:
        raise UsageError(f"--warmup is a fraction of the steps in [0, 1), got {spec.train.warmup}")
    if spec.bound is not None and not spec.bound > 0:
        raise UsageError(f"--bound must be positive (got {spec.bound}); omit it for unbounded coefficients")
    if spec.method in ("xcross", "merge") and not sources:
        raise UsageError(f"method {spec.method} needs at least one source domain besides the target")
    model_dir = spec.model_dir
    if model_dir is None:
        from data_prep.gemma import ConversionError, convert, default_model_dir
        model_dir = default_model_dir()
        if not (model_dir / "conversion.json").is_file():
            if dist_info().main:
                try:
                    convert(model_dir)
                except ConversionError as err:
                    raise UsageError(str(err)) from err
            _barrier_if_distributed()
    elif not (Path(model_dir) / "config.json").is_file():
        raise UsageError(f"--model-dir {model_dir} has no config.json; point it at an HF-layout model directory")
    return replace(spec, sources=sources, model_dir=str(model_dir))


def _barrier_if_distributed() -> None:
    if dist_info().world > 1:
        torch.distributed.barrier()


# -- data selection --------------------------------------------------------------------------------------------------


def train_examples(domain: Domain, spec: RunSpec) -> list[Example]:
    examples = domain.train
    if spec.max_examples_per_user:
        # The pipeline writes each user's examples oldest first: keep the most recent ones.
        by_user: dict[str, list[Example]] = {}
        for e in examples:
            by_user.setdefault(e.user_id, []).append(e)
        examples = [e for rows in by_user.values() for e in rows[-spec.max_examples_per_user:]]
    return select_users(examples, spec.fraction, spec.max_train_users, spec.train.seed)


def eval_examples(domain: Domain, split: str, spec: RunSpec) -> list[Example]:
    """Validation/test examples of a seeded user subsample, with C of the stored candidates (target kept)."""
    examples = getattr(domain, split)
    if spec.max_eval_users and len(examples) > spec.max_eval_users:
        order = np.random.default_rng([spec.train.seed, 4]).permutation(len(examples))
        examples = [examples[i] for i in sorted(order[: spec.max_eval_users])]
    stored = len(examples[0].candidates)
    if spec.num_candidates > stored:
        raise UsageError(f"--num-candidates {spec.num_candidates} > the {stored} candidates stored in the data; "
                         "re-run data_prep with a larger --num-candidates")
    if spec.num_candidates < stored:
        cut = []
        for e in examples:
            negatives = [c for c in e.candidates if c != e.target][: spec.num_candidates - 1]
            cands = [c for c in e.candidates if c == e.target or c in negatives]
            cut.append(Example(e.user_id, e.history, e.target, cands))
        examples = cut
    return examples


# -- runs ------------------------------------------------------------------------------------------------------------


def source_adapter_path(spec: RunSpec, source: str) -> Path:
    return Path(spec.out) / source / "lora" / "best.safetensors"


def _adapter_matches(path: Path, spec: RunSpec, decoder) -> str | None:
    """None if the adapter at `path` fits this run, else what differs."""
    _, config = load_tensors(path)
    if config.get("format") != ADAPTER_FORMAT:
        return f"{path} is not an adapter file"
    want = spec.lora.to_dict()
    have = config["lora"]
    for key in ("rank", "alpha", "targets"):
        if have[key] != want[key]:
            return f"{path} has {key}={have[key]} but this run asks for {key}={want[key]}"
    if config["base"] != base_signature(decoder):
        return f"{path} was trained on another base model"
    return None


def ensure_sources(spec: RunSpec, decoder, resume: bool = False, progress: bool = True) -> list[Path]:
    """The source adapters of `spec`, training (LoRA + head on each source domain) the ones not yet finished."""
    paths = []
    for source in spec.sources:
        path = source_adapter_path(spec, source)
        if (path.parent / "results.json").is_file():
            if problem := _adapter_matches(path, spec, decoder):
                raise UsageError(f"{problem}; delete {path.parent} to retrain it, or match the flags")
            if dist_info().main:
                print(f"source {source}: reusing {path}")
        elif not spec.train_sources:
            raise UsageError(f"source adapter {path} is missing and --no-train-sources is set; train it with "
                             f"`python train.py --target {source} --method lora` or drop --no-train-sources")
        else:
            if dist_info().main:
                print(f"source {source}: training a LoRA adapter + head on {source}")
            source_spec = replace(spec, target=source, method="lora", fraction=1.0, sources=[])
            run(source_spec, decoder=decoder, resume=resume, progress=progress, test=False)
        paths.append(path)
    return paths


def build_for(spec: RunSpec, decoder, adapters: list[Path]) -> XCrossModel:
    return build_model(decoder, spec.method, adapters, spec.lora, spec.xcross, head_init=spec.head_init)


def _fresh_decoder(spec: RunSpec, device: str, dtype: torch.dtype):
    return load_decoder(spec.model_dir, device, dtype)


def run(spec: RunSpec, decoder=None, resume: bool = False, progress: bool = True, test: bool = True) -> dict:
    """Train (for trained methods) and test one method on `spec.target`; write config.json, best.safetensors,
    log.jsonl, test_scores.npz and results.json into `spec.run_dir`; return the results.

    `test=False` skips the test split (source adapters are a means to an end; evaluate.py can test them later)."""
    device = resolve_device(spec.device)
    info = init_distributed(device)
    if device == "cuda" and info.world > 1:
        device = f"cuda:{info.local_rank}"
        torch.cuda.set_device(device)
    dtype = resolve_dtype(spec.dtype, device)
    if spec.method not in TRAINED_METHODS:
        raise UsageError(f"method {spec.method!r} is not trained; use evaluate.py for popularity and source:<d>")
    start = time.perf_counter()
    if decoder is None:
        decoder = _fresh_decoder(spec, device, dtype)
    adapters = ensure_sources(spec, decoder, resume, progress) if spec.method in ("xcross", "merge") else []
    # Source training wrapped LoRA layers around the shared decoder's linears; start again from clean weights.
    decoder = _unwrapped(decoder, spec, device, dtype)

    tokenizer = Tokenizer.from_dir(spec.model_dir)
    domain = load_domain(Path(spec.data_dir) / spec.target)
    builder = PromptBuilder(tokenizer, domain.items, spec.title_tokens, spec.history_len)
    train = train_examples(domain, spec)
    valid = eval_examples(domain, "valid", spec)
    test_examples = eval_examples(domain, "test", spec)
    # torch seeds itself randomly per process: without this every run, and every torchrun rank, would start from
    # its own LoRA A and head initialisation.
    torch.manual_seed(spec.train.seed)
    model = build_for(spec, decoder, adapters)
    compiled = spec.compile == "on" or (spec.compile == "auto" and device.startswith("cuda"))
    if compiled:
        model.compile_regions()
    report = model.parameter_report()
    run_dir = spec.run_dir
    if info.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / "config.json", json.dumps(spec.to_dict(), indent=2) + "\n")
        print(f"{spec.method} on {spec.target}: {len(train)} training examples from "
              f"{len({e.user_id for e in train})} users, {len(valid)} validation / {len(test_examples)} test users; "
              f"trainable parameters {report['trainable']:,} (a target LoRA + head: "
              f"{report['target_lora_equivalent'] or 0:,}); device {device}, {str(dtype).removeprefix('torch.')}"
              + (", torch.compile" if compiled else ""))

    def save_best(path: Path) -> None:
        save_trained(model, path, spec, adapters)

    summary = fit(model, train, valid, builder, list(domain.items), spec.train, run_dir, save_best, resume,
                  device, progress)
    best, _ = load_tensors(run_dir / "best.safetensors", device)
    model.load_trained({k: v for k, v in best.items()})
    result, test_seconds = None, 0.0
    if test:
        test_start = time.perf_counter()
        result = evaluate(model, test_examples, builder, spec.train.eval_batch_size, device, desc="test",
                          progress=progress)
        test_seconds = time.perf_counter() - test_start
    results = {
        "method": spec.method, "target": spec.target, "sources": spec.sources if adapters else [],
        "fraction": spec.fraction, "test": result.metrics(seed=spec.train.seed) if result else None,
        "parameters": report, "training": summary, "test_users": len(test_examples) if result else 0,
        "seconds": time.perf_counter() - start, "test_seconds": test_seconds, "completed": True,
    }
    if info.main:
        if result is not None:
            result.save(run_dir / "test_scores.npz")
        atomic_write_text(run_dir / "results.json", json.dumps(results, indent=2) + "\n")
    _barrier_if_distributed()
    return results


def _unwrapped(decoder, spec: RunSpec, device, dtype):
    """The decoder without LoRA layers: reload it if a previous model on it replaced its linears."""
    from .lora import lora_layers
    return _fresh_decoder(spec, device, dtype) if lora_layers(decoder) else decoder


def save_trained(model: XCrossModel, path: Path, spec: RunSpec, adapters: list[Path]) -> None:
    """A LoRA run's weights are an adapter file (usable as a source); other methods save their trained tensors
    with what rebuilds the model (method, source adapters) as metadata."""
    if spec.method == "lora":
        model.save_adapter(path, {"domain": spec.target})
        return
    from .weights import save_tensors
    save_tensors(path, model.trained_tensors(), {
        "format": CHECKPOINT_FORMAT, "method": spec.method, "adapters": [str(p) for p in adapters],
        "lora": model.lora.to_dict() if model.lora else None, "xcross": spec.xcross.to_dict(),
        "base": base_signature(model.decoder), "domain": spec.target,
    })


# -- training-free methods and comparison tables ---------------------------------------------------------------------


def popularity_scores(domain: Domain, examples: list[Example]) -> EvalResult:
    """Score candidates by how many training users interacted with them (ties broken in expectation)."""
    users_of: dict[str, set] = {}
    for e in domain.train:
        for item in (*e.history, e.target):
            users_of.setdefault(item, set()).add(e.user_id)
    counts = Counter({item: len(users) for item, users in users_of.items()})
    scores = np.array([[counts.get(c, 0) for c in e.candidates] for e in examples], dtype=np.float32)
    labels = np.array([e.candidates.index(e.target) for e in examples])
    return EvalResult(scores, labels, [e.user_id for e in examples])


def evaluate_method(spec: RunSpec, method: str, progress: bool = True) -> tuple[EvalResult, dict]:
    """Test scores and a description (trainable parameters, training examples) for one method name:
    "popularity", "source:<domain>" or a trained method whose run directory exists."""
    domain = load_domain(Path(spec.data_dir) / spec.target)
    test = eval_examples(domain, "test", spec)
    if method == "popularity":
        return popularity_scores(domain, test), {"trainable": 0, "train_examples": 0}
    device = resolve_device(spec.device)
    dtype = resolve_dtype(spec.dtype, device)
    tokenizer = Tokenizer.from_dir(spec.model_dir)
    builder = PromptBuilder(tokenizer, domain.items, spec.title_tokens, spec.history_len)
    if method.startswith("source:"):
        source = method.split(":", 1)[1]
        path = source_adapter_path(spec, source)
        if not path.is_file():
            raise UsageError(f"{method}: no adapter at {path}; train it with `python train.py --target {source} "
                             "--method lora`")
        model = build_model(load_decoder(spec.model_dir, device, dtype), "source", [path])
        result = evaluate(model, test, builder, spec.train.eval_batch_size, device, desc=method, progress=progress)
        return result, {"trainable": 0, "train_examples": 0}
    run_dir = Path(spec.out) / spec.target / method
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise UsageError(f"no finished run in {run_dir}; train it with `python train.py --target {spec.target} "
                         f"--method {method.split('-f')[0]}`")
    results = json.loads(results_path.read_text())
    run_spec = RunSpec.from_dict(json.loads((run_dir / "config.json").read_text()))
    described = {"trainable": results["parameters"]["trainable"],
                 "train_examples": results["training"]["train_examples"]}
    scores_path = run_dir / "test_scores.npz"
    same_eval = all(getattr(run_spec, k) == getattr(spec, k) for k in
                    ("max_eval_users", "num_candidates", "history_len", "title_tokens", "data_dir"))
    if scores_path.is_file() and same_eval:
        return EvalResult.load(scores_path), described
    # Re-score the saved weights under this comparison's evaluation settings.
    best, config = load_tensors(run_dir / "best.safetensors", device)
    adapters = [Path(p) for p in config.get("adapters", [])]
    decoder = load_decoder(spec.model_dir, device, dtype)
    if config.get("format") == ADAPTER_FORMAT:
        model = build_model(decoder, "source", [run_dir / "best.safetensors"])
    else:
        model = build_for(run_spec, decoder, adapters)
        model.load_trained(best)
    builder = PromptBuilder(tokenizer, domain.items, run_spec.title_tokens, run_spec.history_len)
    return evaluate(model, test, builder, spec.train.eval_batch_size, device, desc=method, progress=progress), \
        described


def comparison_rows(entries: dict[str, tuple[EvalResult, dict]], seed: int = 0) -> list[dict]:
    rows = []
    for name, (result, described) in entries.items():
        metrics = result.metrics(seed=seed)
        rows.append({"method": name, **{k: metrics[k] for k in METRICS}, "users": len(result.labels), **described})
    return rows


def format_table(rows: list[dict]) -> str:
    """A fixed-width table: each metric as mean [95% interval]."""
    header = f"{'method':<22}" + "".join(f"{m:>22}" for m in METRICS) + f"{'trainable':>12}{'train ex.':>10}"
    lines = [header, "-" * len(header)]
    for r in rows:
        cells = "".join(f"{r[m]['mean']:>8.3f} [{r[m]['low']:.3f},{r[m]['high']:.3f}]" for m in METRICS)
        lines.append(f"{r['method']:<22}{cells}{r['trainable']:>12,}{r['train_examples']:>10,}")
    return "\n".join(lines)


def write_rows(rows: list[dict], stem: Path) -> None:
    """`<stem>.json` and `<stem>.csv` (mean, low, high per metric), written atomically."""
    atomic_write_text(stem.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
    columns = ["method", *[f"{m}_{part}" for m in METRICS for part in ("mean", "low", "high")],
               "users", "trainable", "train_examples"]
    extra = sorted({k for r in rows for k in r} - set(columns) - set(METRICS))
    lines = [",".join(columns + extra)]
    for r in rows:
        flat = {**r, **{f"{m}_{p}": r[m][p] for m in METRICS for p in ("mean", "low", "high")}}
        lines.append(",".join(_csv_cell(flat.get(c, "")) for c in columns + extra))
    atomic_write_text(stem.with_suffix(".csv"), "\n".join(lines) + "\n")


def _csv_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6f}"
    text = str(value)
    return f'"{text}"' if "," in text else text


def plot_curve(rows: list[dict], path: Path, target: str) -> bool:
    """Hit@1 (with 95% intervals) against the fraction of target training users; False if matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7.5, 4))
    for method in sorted({r["method"] for r in rows if not r.get("baseline")}):  # baselines: lines, below
        pts = sorted((r["fraction"], r["hit@1"]) for r in rows if r["method"] == method)
        x = [p[0] for p in pts]
        y = [p[1]["mean"] for p in pts]
        ax.plot(x, y, marker="o", label=method)
        ax.fill_between(x, [p[1]["low"] for p in pts], [p[1]["high"] for p in pts], alpha=0.2)
    styles = ["--", ":", "-.", (0, (5, 1)), (0, (1, 3))]
    for i, r in enumerate(r for r in rows if r.get("baseline")):  # in the legend: labels of close lines collide
        ax.axhline(r["hit@1"]["mean"], linestyle=styles[i % len(styles)], linewidth=1.2, color=f"C{i + 2}",
                   label=f"{r['method']} (all users)" if r.get("trainable") else r["method"])
    fractions = sorted({r["fraction"] for r in rows if not r.get("baseline")})
    ax.set_xscale("log")
    ax.set_xticks(fractions, [f"{f:g}" for f in fractions])
    ax.minorticks_off()
    ax.set_xlabel("fraction of target training users")
    ax.set_ylabel("test Hit@1 (95% CI)")
    ax.set_title(f"data efficiency on {target}")
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
    return True
