"""Runs as the CLIs make them: a whole run from one `RunConfig` (source adapters trained or reused, the method
trained, selected on validation and tested), one run per directory, and the test scores of every method, each
with the identity of what it scored."""

from __future__ import annotations

import platform
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from .data import CandidateSampler, Domain, Example, PromptBuilder, domain_digest, load_domain
from .distributed import barrier, dist_info, init_distributed
from .files import file_sha256
from .lora import ADAPTER_FORMAT, check_adapter
from .methods import build_model, get_method, load_trained, parameter_report, read_adapter, save_trained
from .rundir import RunDir, input_changes, inputs_of, source_inputs
from .settings import (EVALUATION, TRAINED_METHODS, TRAINING, RunConfig, UsageError, available_domains,
                       differences, resolve, resolve_device, resolve_dtype, validate)
from .tokenizer import Tokenizer
from .training import EvalResult, evaluate, fit, scored_digest, select_users
from .weights import load_decoder, load_tensors
from .xcross import XCrossModel

PARTIAL_SCORES = "test_scores.partial.npz"  # in a run directory: an interrupted test evaluation's scores so far


def prepare(config: RunConfig) -> RunConfig:
    """The preset applied and every field checked against the data: what `run` runs."""
    config = resolve(config)
    if config.method not in TRAINED_METHODS:
        raise UsageError(f"method {config.method!r} is not trained; evaluate popularity and source:<d> with "
                         "xcross-evaluate")
    return validate(config, available_domains(config.data.data_dir))


def place(config: RunConfig) -> tuple[str, torch.dtype]:
    """Join the torchrun process group (when launched by torchrun) and put this process on its device: the
    device and dtype it computes in."""
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


def run(config: RunConfig, resume: bool = False, progress: bool = True, test: bool = True,
        replace_run: bool = False) -> dict:
    """A whole `xcross-train` run: the preset and checks (`prepare`), the missing source adapters trained (LoRA +
    head on each source domain), then the method trained and tested on the target (`test=False`: selected on
    validation only), as `plan` decides for what its directory holds. Returns the results."""
    config = prepare(config)
    decided = plan(config, resume, replace_run, test)  # refused before any work, or nothing to do
    if decided.action == "keep":
        if dist_info().main:
            print(decided.why)
        return {**RunDir.of(config).results(), "kept": True}
    device, dtype = place(config)
    decoder = load_base(config, device, dtype)
    adapters = ensure_sources(config, decoder, resume, progress) if get_method(config.method).reads_sources else []
    return train_method(config, decoder, adapters, resume, progress, test, replace_run)


# -- one run per directory -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """What training `config` into its directory does: "keep" the finished run, "test" a finished run trained
    without its test split, "train" (after clearing what is there when `clear`), or "resume" an interrupted run."""

    action: str
    why: str = ""
    clear: bool = False


def sources_of(config: RunConfig) -> list[tuple[str, Path]]:
    """(domain, adapter file) of each source a run of `config` is built on, in the order of its streams."""
    if not get_method(config.method).reads_sources:
        return []
    return [(s, RunDir.of(source_config(config, s)).best) for s in config.sources]


def current_inputs(config: RunConfig, sources: list[tuple[str | None, Path]] | None = None) -> dict:
    """`rundir.inputs_of` the files a run of `config` would be built on now: its base, its target's data and its
    sources (default `sources_of(config)`)."""
    return inputs_of(config.model.model_dir, Path(config.data.data_dir) / config.target,
                     sources_of(config) if sources is None else sources)


def plan(config: RunConfig, resume: bool = False, replace_run: bool = False, test: bool = True,
         sources: list[tuple[str | None, Path]] | None = None) -> Plan:
    """What its directory holds decides what training a prepared `config` does. Nothing is mixed: a run with other
    settings (training settings; evaluation settings too when it is to be tested) is refused unless `replace_run`;
    a finished run is kept, or trained again when a file it was built on changed (saying why); an interrupted run is
    resumed only when asked and only over unchanged files."""
    run_dir = RunDir.of(config)
    where = run_dir.path
    if replace_run or not run_dir.started():
        return Plan("train", clear=replace_run and run_dir.started())
    if not run_dir.file("config.json").is_file():
        held = "has checkpoints" if run_dir.file("ckpt").is_dir() else "holds files of a run"
        raise UsageError(f"{where} {held} but no config.json, so its settings cannot be checked; start it over with "
                         "--replace, or use another --out")
    finished = run_dir.finished()
    if diff := differences(run_dir.config(), config, (TRAINING, EVALUATION) if test else (TRAINING,)):
        held = "holds a run trained otherwise" if run_dir.file("results.json").is_file() else \
            "was started with other settings"
        raise UsageError(f"{where} {held} ({'; '.join(diff)}); keep both with another --out, or replace it with "
                         "--replace")
    if not finished and run_dir.file("results.json").is_file():
        damaged = [p.name for p in run_dir.damaged()]
        if set(damaged) <= {"results.json", "test_scores.npz"} and run_dir.file("ckpt").is_dir():
            return Plan("resume", f"{where} has finished, but {', '.join(damaged)} cannot be read: rebuilding it from "
                                  "its last checkpoint")
        return Plan("train", f"{where} has finished, but a file it needs is missing or damaged "
                             f"({', '.join(damaged)}): training it again", clear=True)
    if not run_dir.file("inputs.json").is_file():
        run_dir.inputs()  # refuses a directory written by an earlier version, saying how to bring it up to date
    changed = input_changes(run_dir.inputs(), current_inputs(config, sources))
    if finished:
        if changed:
            return Plan("train", f"{where} was built on files that have changed since ({'; '.join(changed)}): "
                                 "training it again", clear=True)
        if test and run_dir.results().get("test") is None:
            return Plan("test", f"{where} was trained without its test split: testing it")
        return Plan("keep", f"{where} has finished with these settings: nothing to resume, its results are kept "
                            "(--replace trains it again)")
    if changed:
        raise UsageError(f"{where} holds an interrupted run built on files that have changed since "
                         f"({'; '.join(changed)}); start it over with --replace")
    if not resume:
        raise UsageError(f"{where} holds an interrupted run with these settings: continue it with --resume, or start "
                         "it over with --replace")
    return Plan("resume")


def finished_results(config: RunConfig) -> dict | None:
    """The results of `config`'s run if it has finished with these settings on the files it would be built on now;
    None if it has not (or must be trained again); a run with other settings in its directory is refused."""
    decided = plan(config, resume=True, test=False)
    return RunDir.of(config).results() if decided.action == "keep" else None


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


def test_identity(config: RunConfig) -> dict:
    """The settings and data behind a test evaluation, beside what `evaluate` records of it."""
    data = config.data
    return {"target": config.target, "data": domain_digest(Path(data.data_dir) / config.target),
            "eval_seed": data.eval_seed, "max_eval_users": data.max_eval_users, "num_candidates": data.num_candidates}


# -- source adapters -------------------------------------------------------------------------------------------------


def source_config(config: RunConfig, source: str) -> RunConfig:
    """The LoRA run on `source` whose adapter `config` builds on: the same settings (those LoRA reads: base, LoRA,
    data, training, seed) on the source domain, on `data.source_train_users` of its users where that is set."""
    wanted = replace(config, target=source, method="lora", fraction=1.0, sources=())
    if config.data.source_train_users is None:
        return wanted
    return wanted.with_values({"data.max_train_users": config.data.source_train_users,
                               "data.source_train_users": None})


def ensure_sources(config: RunConfig, decoder, resume: bool = False, progress: bool = True) -> list[Path]:
    """The source adapters of `config`: a finished source run with the same settings is reused; a missing one, or
    one built on files that changed since, is trained (without its test split)."""
    paths = []
    for source in config.sources:
        wanted = source_config(config, source)
        run_dir = RunDir.of(wanted)
        decided = plan(wanted, resume, test=False)
        if decided.action == "keep":
            try:
                tensors, _, meta = read_adapter(run_dir.best)
                check_adapter(str(run_dir.best), tensors, meta, decoder, config.model.lora)
            except ValueError as err:
                raise UsageError(f"{err}; replace it: xcross-train --config {run_dir.file('config.json')} "
                                 "--replace") from err
            if dist_info().main:
                print(f"source {source}: reusing {run_dir.best}")
        elif not config.train_sources:
            raise UsageError(f"source adapter {run_dir.best} is {decided.why or 'missing'} and --no-train-sources is "
                             f"set; train it with `xcross-train --target {source} --method lora` or drop "
                             "--no-train-sources")
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


def train_method(config: RunConfig, decoder, adapters: list[Path], resume: bool = False, progress: bool = True,
                 test: bool = True, replace_run: bool = False) -> dict:
    """Train one method of a prepared config on its target (from the given source adapters), select it on
    validation and test it; write config.json, inputs.json, best.safetensors, log.jsonl, test_scores.npz and
    results.json into its run directory. `test=False` skips the test split (source adapters are a means to an end).
    What its directory already holds decides what is done (`plan`); the directory is locked meanwhile."""
    run_dir = RunDir.of(config)
    sources = list(zip(config.sources, adapters)) if len(config.sources) == len(adapters) else \
        [(None, p) for p in adapters]
    if not dist_info().main:
        decided = plan(config, resume, replace_run, test, sources)
        barrier()  # the main process clears the directory first
        return _train_method(config, decoder, adapters, sources, decided, progress, test)
    with run_dir.lock():
        decided = plan(config, resume, replace_run, test, sources)
        if decided.why:
            print(decided.why)
        if decided.clear:
            run_dir.clear()
        barrier()
        return _train_method(config, decoder, adapters, sources, decided, progress, test)


def _train_method(config: RunConfig, decoder, adapters: list[Path], sources: list[tuple[str | None, Path]],
                  decided: Plan, progress: bool, test: bool) -> dict:
    run_dir = RunDir.of(config)
    if decided.action == "keep":
        return {**run_dir.results(), "kept": True}
    start = time.perf_counter()
    device = str(decoder.model.embed_tokens.weight.device)
    info = dist_info()
    domain = load_domain(Path(config.data.data_dir) / config.target)
    builder = prompt_builder(config, domain)
    train = train_examples(domain, config)
    valid = eval_examples(domain, "valid", config)
    test_examples = eval_examples(domain, "test", config)
    sampler = CandidateSampler(domain)
    if decided.action != "test" and (fewest := sampler.fewest_negatives(train)) < config.train.train_candidates - 1:
        raise UsageError(f"--train-candidates {config.train.train_candidates} needs "
                         f"{config.train.train_candidates - 1} negatives per training example, but a user of "
                         f"{config.target} leaves only {fewest} items outside their sequence; use at most "
                         f"--train-candidates {fewest + 1}")
    # torch seeds itself randomly per process: without this every run, and every torchrun rank, would start from
    # its own LoRA A and head initialisation.
    torch.manual_seed(config.train.seed)
    model = model_for(config, decoder, adapters)
    compiled = config.model.compile == "on" or (config.model.compile == "auto" and device.startswith("cuda"))
    if compiled:
        model.compile_regions()
    report = parameter_report(model, config.model.lora)
    if info.main and decided.action == "train":
        run_dir.write_json("config.json", config.to_dict())
        run_dir.write_json("inputs.json", current_inputs(config, sources))
    if info.main:
        print(f"{config.method} on {config.target}: {len(train)} training examples from "
              f"{len({e.user_id for e in train})} users, {len(valid)} validation / {len(test_examples)} test users; "
              f"trainable parameters {report['trainable']:,} (a target LoRA + head: "
              f"{report['target_lora_equivalent'] or 0:,}); device {device}, "
              f"{str(decoder.model.embed_tokens.weight.dtype).removeprefix('torch.')}"
              + (", torch.compile" if compiled else ""))

    if decided.action == "test":
        summary = run_dir.results()["training"]
        earlier = run_dir.results()["seconds"]
    else:
        extra = {"domain": config.target, "xcross": asdict(config.model.xcross)}
        summary = fit(model, train, valid, builder, sampler, config.train, run_dir.path,
                      lambda path: save_trained(model, path, config.method, adapters, extra),
                      decided.action == "resume", device, progress)
        earlier = summary["resumed_seconds"]
    load_trained(model, load_tensors(run_dir.best, device)[0])
    result, test_seconds = None, 0.0
    if test:
        test_start = time.perf_counter()
        result = evaluate(model, test_examples, builder, config.train.eval_batch_size, device, desc="test",
                          progress=progress, partial=run_dir.file(PARTIAL_SCORES),
                          weights=file_sha256(run_dir.best))
        result.identity.update(test_identity(config))
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
        "machine": machine(device, decoder),
    }
    if info.main:
        if result is not None:
            result.save(run_dir.file("test_scores.npz"))
        run_dir.write_json("results.json", results)
    barrier()
    return results


def processor() -> str:
    """The CPU's model name where the system tells it (Linux), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str, decoder) -> dict:
    """Where a run computed: what a result from another machine may differ by in floating point."""
    return {"device": device, "processor": processor() if device == "cpu" else torch.cuda.get_device_name(device),
            "dtype": str(decoder.model.embed_tokens.weight.dtype).removeprefix("torch."),
            "torch": torch.__version__, "threads": torch.get_num_threads()}


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
    identity = {"scored": scored_digest(examples), "users": len(examples), "candidates": scores.shape[1],
                "prompts": None, "weights": "popularity of the training split", "base": None, "dtype": None}
    return EvalResult(scores, labels, [e.user_id for e in examples], identity=identity)


def evaluate_popularity(config: RunConfig) -> tuple[EvalResult, dict]:
    domain = load_domain(Path(config.data.data_dir) / config.target)
    result = popularity_scores(domain, eval_examples(domain, "test", config))
    result.identity.update(test_identity(config))
    return result, {"trainable": 0, "train_examples": 0}


def evaluate_source(config: RunConfig, source: str, progress: bool = True,
                    partial: Path | None = None) -> tuple[EvalResult, dict]:
    """A source adapter and its head, zero-shot on the target's test users (resumable with `partial`, see
    `evaluate`)."""
    path = RunDir.of(source_config(config, source)).best
    if not path.is_file():
        raise UsageError(f"source:{source}: no adapter at {path}; train it with `xcross-train --target {source} "
                         "--method lora`")
    device, dtype = place(config)
    domain = load_domain(Path(config.data.data_dir) / config.target)
    try:
        model = build_model(load_base(config, device, dtype), "source", [path])
    except ValueError as err:
        raise UsageError(f"source:{source}: {err}") from None
    result = evaluate(model, eval_examples(domain, "test", config), prompt_builder(config, domain),
                      config.train.eval_batch_size, device, desc=f"source:{source}", progress=progress,
                      partial=partial, weights=file_sha256(path))
    result.identity.update(test_identity(config))
    return result, {"trainable": 0, "train_examples": 0}


def locate_sources(run_dir: RunDir, config: RunConfig) -> list[tuple[str | None, Path]]:
    """(domain, file) of each source adapter a run was built on: the source run beside it in its runs directory
    (also after that directory moved: the same command that trains it would use it), else the file it recorded
    (an imported adapter). Whether each still holds what the run was built on is `RunDir.check_inputs`'s to say."""
    found = []
    for s in run_dir.inputs().get("sources", []):
        beside = RunDir.of(source_config(replace(config, out=str(run_dir.out)), s["domain"])).best \
            if s["domain"] else None
        found.append((s["domain"], beside if beside is not None and beside.exists() else Path(s["path"])))
    return found


def model_from_run(run_dir: RunDir, decoder) -> XCrossModel:
    """The trained model of a finished run of any method, rebuilt on `decoder` from its config.json, its
    best.safetensors and the source adapters it was built on, each checked to be the file it was trained on."""
    if not run_dir.best.is_file():
        raise UsageError(f"{run_dir.path} has no best.safetensors: not a finished run")
    config = run_dir.config()
    sources = locate_sources(run_dir, config)
    if missing := [str(p) for _, p in sources if not p.exists()]:
        raise UsageError(f"{run_dir.path} was built on source adapters that are missing: {', '.join(missing)}; "
                         f"bring it up to date with xcross-train --config {run_dir.file('config.json')}")
    # the base is checked against every adapter's own record of it when the model is built
    run_dir.check_inputs({"sources": source_inputs(sources)}, "using it")
    adapters = [p for _, p in sources]
    try:
        best, meta = load_tensors(run_dir.best, str(decoder.model.embed_tokens.weight.device))
    except Exception as err:  # noqa: BLE001 - a truncated or foreign file: safetensors' own error types too
        raise UsageError(f"{run_dir.best} cannot be read ({type(err).__name__}: {err}); retrain the run") from err
    try:
        if meta.get("format") == ADAPTER_FORMAT:  # a LoRA run: its adapter and head, as a source is used
            return build_model(decoder, "source", [run_dir.best])
        model = model_for(config, decoder, adapters)
        load_trained(model, best)
    except ValueError as err:
        raise UsageError(f"{run_dir.path}: {err}") from err
    return model


def stored_scores(run_dir: RunDir, examples: list[Example]) -> EvalResult | None:
    """The run's stored test scores if they scored exactly `examples` with the run's current weights, else None."""
    stored = run_dir.file("test_scores.npz")
    if not stored.is_file():
        return None
    try:
        result = EvalResult.load(stored)
    except Exception as err:  # noqa: BLE001 - a cut or foreign file (zip, npy or JSON errors)
        print(f"{stored} cannot be read ({type(err).__name__}): scoring the run again")
        return None
    same = result.identity.get("scored") == scored_digest(examples) and \
        result.identity.get("weights") == file_sha256(run_dir.best)
    return result if same else None


def evaluate_run(config: RunConfig, run_dir: RunDir, progress: bool = True) -> tuple[EvalResult, dict]:
    """A finished run's test scores on the test users and candidates of `config` (its evaluation settings): its
    stored scores where they scored exactly those, else its weights scored again with its own prompts (and stored,
    when those are its own test users but it was trained without its test split)."""
    results, saved = run_dir.results(), run_dir.config()
    described = {"trainable": results["parameters"]["trainable"],
                 "train_examples": results["training"]["train_examples"]}
    domain = load_domain(Path(config.data.data_dir) / config.target)
    examples = eval_examples(domain, "test", config)
    run_dir.check_inputs(current_inputs(config, locate_sources(run_dir, saved)), "evaluating it")
    if (kept := stored_scores(run_dir, examples)) is not None:
        return kept, described
    own = not differences(saved, config, (EVALUATION,))
    device, dtype = place(config)
    model = model_from_run(run_dir, load_base(config, device, dtype))
    builder = PromptBuilder(Tokenizer.from_dir(config.model.model_dir), domain.items, saved.data.title_tokens,
                            saved.data.history_len)
    result = evaluate(model, examples, builder, config.train.eval_batch_size, device, desc=run_dir.name,
                      progress=progress, partial=run_dir.file(PARTIAL_SCORES) if own else None,
                      weights=file_sha256(run_dir.best))
    result.identity.update(test_identity(config))
    missing = not run_dir.file("test_scores.npz").is_file() or "test_scores.npz" in [p.name for p in run_dir.damaged()]
    if own and missing and dist_info().main:
        result.save(run_dir.file("test_scores.npz"))  # trained without its test split, or its scores were damaged
    return result, described
