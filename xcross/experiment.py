"""Runs as the CLIs make them: a whole run from one `RunConfig` (source adapters trained or reused, the method
trained, selected on validation and tested), and the test scores of every method for comparison tables."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

from .data import CandidateSampler, Domain, Example, PromptBuilder, load_domain
from .distributed import barrier, dist_info, init_distributed
from .files import file_sha256
from .methods import ADAPTER_FORMAT, CHECKPOINT_FORMAT, build_model, check_adapter, load_trained
from .methods import parameter_report, read_adapter, save_adapter, trained_tensors
from .rundir import NOT_IDENTITY, RESUMABLE_CHANGES, SOURCE_IDENTITY, RunDir, differences
from .settings import (TRAINED_METHODS, RunConfig, UsageError, available_domains, resolve, resolve_device,
                       resolve_dtype, validate)
from .tokenizer import Tokenizer
from .training import EvalResult, evaluate, fit, select_users
from .weights import load_decoder, load_tensors, save_tensors
from .xcross import XCrossModel

SOURCE_METHODS = ("xcross", "ensemble", "merge")  # the methods built on source adapters
PARTIAL_SCORES = "test_scores.partial.npz"  # in a run directory: an interrupted test evaluation's scores so far


def prepare(config: RunConfig) -> RunConfig:
    """The preset applied and every field checked against the data: what `run` runs."""
    config = resolve(config)
    if config.method not in TRAINED_METHODS:
        raise UsageError(f"method {config.method!r} is not trained; evaluate popularity and source:<d> with "
                         "xcross-evaluate")
    return validate(config, available_domains(config.data.data_dir))


def device_of(config: RunConfig) -> tuple[str, torch.dtype]:
    device = resolve_device(config.model.device)
    info = init_distributed(device)
    if device == "cuda" and info.world > 1:
        device = f"cuda:{info.local_rank}"
        torch.cuda.set_device(device)
    return device, resolve_dtype(config.model.dtype, device)


def load_base(config: RunConfig, device: str, dtype: torch.dtype):
    """The base decoder of a prepared config; a missing, truncated or corrupt checkpoint, or weights that are not
    finite, is a usage error naming the directory."""
    try:
        decoder = load_decoder(config.model.model_dir, device, dtype)
    except Exception as err:  # noqa: BLE001 - OSError, ValueError, safetensors' own error on a damaged file
        raise UsageError(f"cannot load the base model in {config.model.model_dir}: {type(err).__name__}: {err}") \
            from err
    for name, p in decoder.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise UsageError(f"the base model in {config.model.model_dir} has non-finite weights ({name}); "
                             "convert or download it again")
    return decoder


def run(config: RunConfig, resume: bool = False, progress: bool = True, test: bool = True) -> dict:
    """A whole `xcross-train` run: the preset and checks (`prepare`), the missing source adapters trained (LoRA +
    head on each source domain), then the method trained and tested on the target (`test=False`: selected on
    validation only). Returns the results."""
    config = prepare(config)
    device, dtype = device_of(config)
    decoder = load_base(config, device, dtype)
    adapters = ensure_sources(config, decoder, resume, progress) if config.method in SOURCE_METHODS else []
    return train_method(config, decoder, adapters, resume, progress, test)


def finished_results(config: RunConfig) -> dict | None:
    """The results of `config`'s run if it has finished, None if not; a finished run in its directory that was
    trained otherwise is refused, naming the differences."""
    run_dir = RunDir.of(config)
    if not run_dir.finished():
        return None
    if diff := _trained_otherwise(run_dir, config):
        raise UsageError(f"{run_dir.path} holds a run trained otherwise ({'; '.join(diff)}); use another --out or "
                         "delete it")
    return run_dir.results()


def finished_as_asked(config: RunConfig, test: bool = True) -> dict | None:
    """The results of `config`'s run if it finished with these settings (and was tested, where `test` asks for
    it): what `--resume` keeps instead of loading the model to select and test again. None otherwise, where
    resuming checks the settings and names what differs."""
    run_dir = RunDir.of(config)
    if not run_dir.finished() or _trained_otherwise(run_dir, config):
        return None
    results = run_dir.results()
    return results if results.get("test") is not None or not test else None


def _trained_otherwise(run_dir: RunDir, config: RunConfig) -> list[str]:
    """The settings in which a finished run differs from `config`, leaving out those that change nothing it trained."""
    return differences(run_dir.config(), config, ignore=(*NOT_IDENTITY, "model.model_dir"))


# -- data selection --------------------------------------------------------------------------------------------------


def train_examples(domain: Domain, config: RunConfig) -> list[Example]:
    examples, cap = domain.train, config.data.max_examples_per_user
    if cap:
        # The pipeline writes each user's examples oldest first: keep the most recent ones.
        by_user: dict[str, list[Example]] = {}
        for e in examples:
            by_user.setdefault(e.user_id, []).append(e)
        examples = [e for rows in by_user.values() for e in rows[-cap:]]
    return select_users(examples, config.fraction, config.data.max_train_users, config.train.seed)


def eval_examples(domain: Domain, split: str, config: RunConfig) -> list[Example]:
    """Validation/test examples of a user subsample seeded by `data.eval_seed` (never by the training seed, so runs
    of every seed are evaluated on the same users), with C of the stored candidates (target kept)."""
    examples, data = getattr(domain, split), config.data
    cap = data.max_valid_users if split == "valid" and data.max_valid_users else data.max_eval_users
    if cap and len(examples) > cap:
        order = np.random.default_rng([data.eval_seed, 4]).permutation(len(examples))
        examples = [examples[i] for i in sorted(order[:cap])]
    stored = len(examples[0].candidates)
    if data.num_candidates > stored:
        raise UsageError(f"--num-candidates {data.num_candidates} > the {stored} candidates stored in the data; "
                         "re-run the import with a larger --num-candidates")
    if data.num_candidates < stored:
        cut = []
        for e in examples:
            negatives = [c for c in e.candidates if c != e.target][: data.num_candidates - 1]
            cut.append(Example(e.user_id, e.history, e.target,
                               [c for c in e.candidates if c == e.target or c in negatives]))
        examples = cut
    return examples


def prompt_builder(config: RunConfig, domain: Domain) -> PromptBuilder:
    return PromptBuilder(Tokenizer.from_dir(config.model.model_dir), domain.items, config.data.title_tokens,
                         config.data.history_len)


# -- source adapters -------------------------------------------------------------------------------------------------


def source_config(config: RunConfig, source: str) -> RunConfig:
    """The LoRA run on `source` whose adapter `config` builds on: same base, LoRA settings, data and seed."""
    return replace(config, target=source, method="lora", fraction=1.0, sources=())


def ensure_sources(config: RunConfig, decoder, resume: bool = False, progress: bool = True) -> list[Path]:
    """The source adapters of `config`: a finished source run is reused when it agrees on base, LoRA settings,
    data and seed; a missing one is trained (without its test split)."""
    paths = []
    for source in config.sources:
        wanted = source_config(config, source)
        run_dir = RunDir.of(wanted)
        if run_dir.finished():
            if diff := differences(run_dir.config(), wanted, only=SOURCE_IDENTITY):
                raise UsageError(f"the source adapter in {run_dir.path} was trained otherwise ({'; '.join(diff)}); "
                                 "match the flags, use another --out, or delete it to retrain")
            tensors, _, meta = read_adapter(run_dir.best)
            try:
                check_adapter(str(run_dir.best), tensors, meta, decoder, config.model.lora)
            except ValueError as err:
                raise UsageError(f"{err}; delete {run_dir.path} to retrain it") from err
            if dist_info().main:
                print(f"source {source}: reusing {run_dir.best}")
        elif not config.train_sources:
            raise UsageError(f"source adapter {run_dir.best} is missing and --no-train-sources is set; train it "
                             f"with `xcross-train --target {source} --method lora` or drop --no-train-sources")
        else:
            if dist_info().main:
                print(f"source {source}: training a LoRA adapter + head on {source}")
            train_method(wanted, decoder, [], resume, progress, test=False)
        paths.append(run_dir.best)
    return paths


# -- one method ------------------------------------------------------------------------------------------------------


def model_for(config: RunConfig, decoder, adapters: list[Path]) -> XCrossModel:
    model = config.model
    return build_model(decoder, config.method, adapters, model.lora, model.xcross, head_init=model.head_init)


def save_trained(model: XCrossModel, path: Path, config: RunConfig, adapters: list[Path]) -> None:
    """A LoRA run's weights are an adapter file (usable as a source); other methods save their trained tensors
    with what rebuilds the model (method, source adapters) as metadata."""
    if config.method == "lora":
        save_adapter(model, path, {"domain": config.target})
        return
    save_tensors(path, trained_tensors(model), {
        "format": CHECKPOINT_FORMAT, "method": config.method, "adapters": [str(Path(p).absolute()) for p in adapters],
        "lora": model.lora.to_dict() if model.lora else None, "xcross": asdict(config.model.xcross),
        "domain": config.target,
    })


def train_method(config: RunConfig, decoder, adapters: list[Path], resume: bool = False, progress: bool = True,
                 test: bool = True) -> dict:
    """Train one method of a prepared config on its target (from the given source adapters), select it on
    validation and test it; write config.json, best.safetensors, log.jsonl, test_scores.npz and results.json into
    its run directory. `test=False` skips the test split (source adapters are a means to an end). The run
    directory is locked meanwhile; a resumed run must be asked for with the settings it was started with."""
    run_dir = RunDir.of(config)
    if not dist_info().main:
        return _train_method(config, decoder, adapters, resume, progress, test)
    with run_dir.lock():
        if resume and (run_dir.path / "ckpt").is_dir():
            if not run_dir.file("config.json").is_file():
                raise UsageError(f"--resume: {run_dir.path} has checkpoints but no config.json, so its settings "
                                 "cannot be checked; put config.json back, or start it over without --resume")
            if diff := differences(run_dir.config(), config, ignore=RESUMABLE_CHANGES):
                raise UsageError(f"--resume: {run_dir.path} was started with other settings ({'; '.join(diff)}); "
                                 "resume with the same flags, or start it over without --resume")
        return _train_method(config, decoder, adapters, resume, progress, test)


def _train_method(config: RunConfig, decoder, adapters: list[Path], resume: bool, progress: bool,
                  test: bool) -> dict:
    start = time.perf_counter()
    device = str(decoder.model.embed_tokens.weight.device)
    info = dist_info()
    domain = load_domain(Path(config.data.data_dir) / config.target)
    builder = prompt_builder(config, domain)
    train = train_examples(domain, config)
    valid = eval_examples(domain, "valid", config)
    test_examples = eval_examples(domain, "test", config)
    # torch seeds itself randomly per process: without this every run, and every torchrun rank, would start from
    # its own LoRA A and head initialisation.
    torch.manual_seed(config.train.seed)
    model = model_for(config, decoder, adapters)
    compiled = config.model.compile == "on" or (config.model.compile == "auto" and device.startswith("cuda"))
    if compiled:
        model.compile_regions()
    report = parameter_report(model, config.model.lora)
    run_dir = RunDir.of(config)
    if info.main:
        run_dir.write_json("config.json", config.to_dict())
        print(f"{config.method} on {config.target}: {len(train)} training examples from "
              f"{len({e.user_id for e in train})} users, {len(valid)} validation / {len(test_examples)} test users; "
              f"trainable parameters {report['trainable']:,} (a target LoRA + head: "
              f"{report['target_lora_equivalent'] or 0:,}); device {device}, "
              f"{str(decoder.model.embed_tokens.weight.dtype).removeprefix('torch.')}"
              + (", torch.compile" if compiled else ""))

    summary = fit(model, train, valid, builder, CandidateSampler(domain), config.train, run_dir.path,
                  lambda path: save_trained(model, path, config, adapters), resume, device, progress)
    load_trained(model, load_tensors(run_dir.best, device)[0])
    result, test_seconds, earlier = None, 0.0, summary["resumed_seconds"]
    if test:
        test_start = time.perf_counter()
        result = evaluate(model, test_examples, builder, config.train.eval_batch_size, device, desc="test",
                          progress=progress, partial=run_dir.file(PARTIAL_SCORES),
                          weights=file_sha256(run_dir.best))
        test_seconds = result.seconds  # with an interrupted test's earlier share
        earlier += test_seconds - (time.perf_counter() - test_start)
    results = {
        "method": config.method, "target": config.target, "sources": list(config.sources) if adapters else [],
        "fraction": config.fraction, "seed": config.train.seed,
        "test": result.metrics(seed=config.train.seed) if result else None,
        "parameters": report, "training": summary, "test_users": len(test_examples) if result else 0,
        # this invocation's wall time and what the invocations it resumed spent (up to their last checkpoint or
        # saved test batch)
        "seconds": time.perf_counter() - start + earlier, "test_seconds": test_seconds, "completed": True,
    }
    if info.main:
        if result is not None:
            result.save(run_dir.file("test_scores.npz"))
        run_dir.write_json("results.json", results)
    barrier()
    return results


# -- test scores of every method, for comparisons --------------------------------------------------------------------


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


def evaluate_popularity(config: RunConfig) -> tuple[EvalResult, dict]:
    domain = load_domain(Path(config.data.data_dir) / config.target)
    return popularity_scores(domain, eval_examples(domain, "test", config)), {"trainable": 0, "train_examples": 0}


def evaluate_source(config: RunConfig, source: str, progress: bool = True,
                    partial: Path | None = None) -> tuple[EvalResult, dict]:
    """A source adapter and its head, zero-shot on the target's test users (resumable with `partial`, see
    `evaluate`)."""
    path = RunDir.of(source_config(config, source)).best
    if not path.is_file():
        raise UsageError(f"source:{source}: no adapter at {path}; train it with `xcross-train --target {source} "
                         "--method lora`")
    device, dtype = device_of(config)
    domain = load_domain(Path(config.data.data_dir) / config.target)
    model = build_model(load_base(config, device, dtype), "source", [path])
    result = evaluate(model, eval_examples(domain, "test", config), prompt_builder(config, domain),
                      config.train.eval_batch_size, device, desc=f"source:{source}", progress=progress,
                      partial=partial, weights=file_sha256(path))
    return result, {"trainable": 0, "train_examples": 0}


def model_from_run(run_dir: RunDir, decoder) -> XCrossModel:
    """The trained model of a finished run of any method, rebuilt on `decoder` from its config.json, its
    best.safetensors and the source adapters that names (each checked against the base)."""
    if not run_dir.best.is_file():
        raise UsageError(f"{run_dir.path} has no best.safetensors: not a finished run")
    try:
        best, meta = load_tensors(run_dir.best, str(decoder.model.embed_tokens.weight.device))
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: safetensors' own error types too
        raise UsageError(f"{run_dir.best} cannot be read ({type(err).__name__}: {err}); retrain the run") from err
    if meta.get("format") == ADAPTER_FORMAT:  # a LoRA run: its adapter and head, as a source is used
        return build_model(decoder, "source", [run_dir.best])
    adapters = [Path(p) for p in meta.get("adapters", [])]
    if missing := [str(p) for p in adapters if not p.exists()]:
        raise UsageError(f"{run_dir.path} was built on source adapters that are missing: {', '.join(missing)}")
    try:
        model = model_for(run_dir.config(), decoder, adapters)
    except ValueError as err:
        raise UsageError(f"{run_dir.path}: {err}") from err
    load_trained(model, best)
    return model


def evaluate_run(config: RunConfig, run_dir: RunDir, progress: bool = True) -> tuple[EvalResult, dict]:
    """A finished run's test scores under `config`'s evaluation settings: its stored scores where the settings
    are the run's own, else its saved weights re-scored (and stored, when the settings are its own but it was
    trained without its test split)."""
    results, saved = run_dir.results(), run_dir.config()
    described = {"trainable": results["parameters"]["trainable"],
                 "train_examples": results["training"]["train_examples"]}
    same = not differences(saved, config, only=("data.max_eval_users", "data.eval_seed", "data.num_candidates",
                                                 "data.history_len", "data.title_tokens", "data.data_dir"))
    stored = run_dir.file("test_scores.npz")
    if stored.is_file() and same:
        return EvalResult.load(stored), described
    device, dtype = device_of(config)
    domain = load_domain(Path(config.data.data_dir) / config.target)
    model = model_from_run(run_dir, load_base(config, device, dtype))
    builder = PromptBuilder(Tokenizer.from_dir(config.model.model_dir), domain.items, saved.data.title_tokens,
                            saved.data.history_len)
    result = evaluate(model, eval_examples(domain, "test", config), builder, config.train.eval_batch_size, device,
                      desc=run_dir.name, progress=progress, partial=run_dir.file(PARTIAL_SCORES) if same else None,
                      weights=file_sha256(run_dir.best))
    if same and dist_info().main:  # a run trained without its test split (a source adapter): scored once
        result.save(stored)
    return result, described
