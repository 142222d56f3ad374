"""One `fit` loop and one `evaluate` function for every method: listwise training over packed candidates,
resumable checkpoints, model selection on validation, and multi-process data parallelism (torchrun)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import shutil
import signal
import time
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .data import Batch, CandidateSampler, Example, PromptBuilder, collate, pack
from .distributed import all_reduce_grads, barrier, dist_info, reduce
from .errors import Failed, Terminated
from .metrics import per_user_metrics, summarise
from .runlog import RunLog
from .files import atomic_write, replace_path
from .methods import CHECKPOINT_FORMAT, load_trained, trained_tensors
from .weights import load_tensors, save_tensors
from .xcross import XCrossModel

SELECTION_METRIC = "mrr"


@dataclass
class TrainConfig:
    """Everything that decides what a training run computes (saved as the run's resolved config)."""

    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs when reached first)
    batch_size: int = 8  # examples per optimizer step, over all processes
    lr: float = 5e-4  # adapters, head and stream weights
    # Integrators get their own rate: on the demo world 1e-3 wrecked the streams within 20 steps (docs/RESULTS.md).
    integrator_lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.1  # fraction of the steps spent warming up linearly, then a linear decay to zero
    grad_clip: float = 1.0
    train_candidates: int = 8  # candidates per training example (target + fresh negatives every epoch)
    eval_every: int | None = None  # validate every N steps (default: at the end of every epoch)
    checkpoint_every: int = 50
    log_every: int = 10
    eval_batch_size: int = 8
    seed: int = 0
    grad_accum: int = 1  # micro-batches per optimizer step: a step sees batch_size · grad_accum examples
    patience: int | None = None  # stop after this many validations without a better one (None: never)
    loggers: tuple[str, ...] = ()  # besides log.jsonl: "csv" (log.csv), "tensorboard" (tb/)

    def to_dict(self) -> dict:
        return asdict(self)


class TrainingDiverged(Failed, RuntimeError):
    """The loss or a gradient became NaN/inf; the message names the step."""

    prefix = "training diverged: "


# -- data ------------------------------------------------------------------------------------------------------------


def select_users(examples: list[Example], fraction: float = 1.0, max_users: int | None = None,
                 seed: int = 0) -> list[Example]:
    """The examples of a seeded subset of users: first at most `max_users`, then a fraction of those.

    Users are taken in one seeded order, so a smaller fraction's users are a subset of a larger one's."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    users = sorted({e.user_id for e in examples})
    order = np.random.default_rng([seed, 1]).permutation(len(users))
    pool = [users[i] for i in order[: max_users or len(users)]]
    keep = set(pool[: max(1, math.ceil(fraction * len(pool)))])
    return [e for e in examples if e.user_id in keep]


def shown(wanted: bool) -> bool | None:
    """tqdm's `disable` for a progress bar: off unless wanted, and then only on a terminal (in a log file a bar's
    redraws are control characters, not progress)."""
    return None if wanted else True


def epoch_order(n: int, epoch: int, seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 2, epoch]).permutation(n)


def length_multiple(device) -> int:
    """Batches on CUDA are padded to a multiple of FlexAttention's 128-token blocks: a handful of distinct lengths,
    so compiled attention and blocks are not recompiled for every new batch length."""
    return 128 if str(device).startswith("cuda") else 1


def training_batch(examples: list[Example], indices: np.ndarray, epoch: int, builder: PromptBuilder,
                   sampler: CandidateSampler, num_candidates: int, seed: int, pad_id: int, multiple: int = 1):
    """Packed batch of the given examples with negatives drawn for (seed, epoch, example): independent of batching,
    process count and resumption."""
    packed, labels = [], []
    for i in indices:
        ex = examples[i]
        rng = np.random.default_rng([seed, 3, epoch, int(i)])
        cands, label = sampler.sample(ex, num_candidates, rng)
        packed.append(pack(builder.prefix(ex.history), [builder.candidate(c) for c in cands]))
        labels.append(label)
    return collate(packed, pad_id, labels, multiple)


# -- evaluation ------------------------------------------------------------------------------------------------------


def scored_digest(examples: list[Example]) -> str:
    """What an evaluation scores, by content: every user with their true item and candidates, in order. Two scores
    with the same digest ranked the same candidates for the same users, so they compare paired."""
    rows = [(e.user_id, e.target, list(e.candidates)) for e in examples]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


@dataclass
class EvalResult:
    scores: np.ndarray  # (N, C)
    labels: np.ndarray  # (N,)
    user_ids: list[str]
    seconds: float = 0.0  # scoring wall time, earlier interrupted invocations included (not saved with the scores)
    # What was scored and how (`evaluate`'s, plus the caller's settings): "scored" (`scored_digest`), "users",
    # "candidates", "prompts" (history_len, title_tokens), "weights" (the digest of the scored weights), "base", "dtype"
    identity: dict = field(default_factory=dict)

    def metrics(self, bootstrap: int = 1000, seed: int = 0) -> dict:
        return summarise(per_user_metrics(self.scores, self.labels), bootstrap, seed)

    def save(self, path: Path) -> None:
        def write(tmp: Path) -> None:
            with tmp.open("wb") as f:  # a file object: np.savez would append ".npz" to a path
                np.savez(f, scores=self.scores, labels=self.labels, user_ids=np.array(self.user_ids),
                         identity=np.array(json.dumps(self.identity, sort_keys=True)))

        atomic_write(path, write)

    @classmethod
    def load(cls, path: Path) -> EvalResult:
        """Scores saved by `save`; a file from before scores carried their identity loads with an empty one (so it
        matches no evaluation and is scored again)."""
        with np.load(path) as z:
            identity = json.loads(str(z["identity"])) if "identity" in z.files else {}
            return cls(z["scores"], z["labels"], [str(u) for u in z["user_ids"]], identity=identity)


@torch.no_grad()
def evaluate(model: XCrossModel, examples: list[Example], builder: PromptBuilder, batch_size: int = 8,
             device="cpu", desc: str = "evaluate", progress: bool = True, partial: Path | None = None,
             weights: str = "") -> EvalResult:
    """Score every example's stored candidates; in a torchrun group each process scores a shard.

    With `partial` (a single process), the scores so far are saved there after every batch and an interrupted
    evaluation continues from them, giving the scores an uninterrupted one gives. They are only reused for the same
    `weights` (the caller's digest of the model's weights), users, candidates, prompts and batch size; the file is
    removed when the evaluation is done. The result's `seconds` include those an interrupted evaluation spent on the
    scores it saved."""
    started = time.perf_counter()
    info = dist_info()
    was_training = model.training
    model.eval()
    mine = list(range(info.rank, len(examples), info.world))
    scores = np.zeros((len(mine), len(examples[0].candidates)), dtype=np.float32) if mine else np.zeros((0, 0))
    partial = partial if info.world == 1 else None
    prompts = [(builder.prefix(examples[i].history), [builder.candidate(c) for c in examples[i].candidates])
               for i in mine]  # token ids, built once for the packing and the partial scores' key
    key = _evaluation_key([examples[i] for i in mine], prompts, batch_size, weights) if partial else ""
    done, earlier = _load_partial(partial, key, scores) if partial else (0, 0.0)
    pad = builder.tokenizer.pad_id or 0
    bar = tqdm(total=len(mine), initial=done, desc=desc, unit="user", disable=shown(progress and info.main),
               leave=False)
    for start in range(done, len(mine), batch_size):
        chunk = prompts[start:start + batch_size]
        packed = [pack(prefix, candidates) for prefix, candidates in chunk]
        batch = collate(packed, pad, multiple=length_multiple(device)).to(device)
        scores[start:start + len(chunk)] = model.score(batch).float().cpu().numpy()
        if partial:
            _save_partial(partial, key, scores, start + len(chunk), earlier + time.perf_counter() - started)
        bar.update(len(chunk))
    bar.close()
    model.train(was_training)
    if partial:
        partial.unlink(missing_ok=True)
    if info.world > 1:
        gathered = [None] * info.world
        dist.all_gather_object(gathered, (mine, scores))
        full = np.zeros((len(examples), scores.shape[1] if len(scores) else 0), dtype=np.float32)
        for idx, part in gathered:
            if len(idx):
                full = full if full.shape[1] else np.zeros((len(examples), part.shape[1]), dtype=np.float32)
                full[idx] = part
        scores = full
    labels = np.array([e.candidates.index(e.target) for e in examples])
    dtype = next(model.decoder.parameters()).dtype
    identity = {"scored": scored_digest(examples), "users": len(examples), "candidates": scores.shape[1],
                "prompts": {"history_len": builder.history_len, "title_tokens": builder.title_tokens},
                "weights": weights, "base": getattr(model.decoder, "fingerprint", None),
                "dtype": str(dtype).removeprefix("torch.")}
    return EvalResult(scores, labels, [e.user_id for e in examples], earlier + time.perf_counter() - started,
                      identity)


def _evaluation_key(examples: list[Example], prompts: list[tuple[list[int], list[list[int]]]], batch_size: int,
                    weights: str) -> str:
    """What decides an evaluation's scores: the weights, every user's prompt and candidates (`prompts`, as token
    ids), the batches."""
    text = json.dumps([weights, batch_size, [(e.user_id, e.target, prefix, candidates)
                                             for e, (prefix, candidates) in zip(examples, prompts)]])
    return hashlib.sha256(text.encode()).hexdigest()


def _load_partial(path: Path, key: str, scores: np.ndarray) -> tuple[int, float]:
    """How many users an interrupted evaluation with this key scored (their scores copied into `scores`) and the
    seconds it spent on them; (0, 0.0) for no file, another key or an unreadable file."""
    try:
        with np.load(path) as saved:
            if str(saved["key"]) != key or saved["scores"].shape != scores.shape:
                return 0, 0.0
            done = int(saved["done"])
            scores[:done] = saved["scores"][:done]
            return done, float(saved["seconds"]) if "seconds" in saved.files else 0.0
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # none yet, or damaged
        return 0, 0.0


def _save_partial(path: Path, key: str, scores: np.ndarray, done: int, seconds: float) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, key=np.array(key), scores=scores, done=np.array(done), seconds=np.array(seconds))
    atomic_write(path, write)


@torch.no_grad()
def coefficient_stats(batch: Batch, coefficients: list[Tensor]) -> list[dict]:
    """Per block: mean and max |z¹|, |z²| over the batch's real tokens, for the training log. Under torchrun the
    figures cover every process's share of the batch (one reduction), so every process must call it."""
    valid = batch.token_mask()  # (B, T)
    pairs = coefficients[0].shape[-1] // 2
    sums, maxes = [], []  # per block: (Σ|z¹|, Σ|z²|, entries of each) and (max |z¹|, max |z²|)
    for z in coefficients:
        z = z[valid].abs().float()
        z1, z2 = z[:, :pairs], z[:, pairs:]
        sums.append(torch.stack([z1.sum(), z2.sum(), z1.new_tensor(z1.numel())]))
        maxes.append(torch.stack([z1.max(), z2.max()]))
    sums, maxes = reduce(torch.stack(sums)), reduce(torch.stack(maxes), op="max")
    return [{"z1_mean": s1 / n, "z1_max": m1, "z2_mean": s2 / n, "z2_max": m2}
            for (s1, s2, n), (m1, m2) in zip(sums.tolist(), maxes.tolist())]


# -- checkpoints -----------------------------------------------------------------------------------------------------


class Interrupted(Terminated):
    """Training stopped on SIGINT or SIGTERM after saving a checkpoint; `signum` gives the exit code 128 + signum."""


@dataclass
class Progress:
    """Where training stands; saved with every checkpoint."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    examples_seen: int = 0
    best_metric: float = -math.inf
    best_step: int = -1
    since_best: int = 0  # validations since the best one (for early stopping)
    history: list = field(default_factory=list)  # validation results so far
    seconds: float = 0.0  # training wall time up to this checkpoint, over every invocation, validation included
    valid_seconds: float = 0.0  # the part of it spent validating


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpoints:
    """`<run>/ckpt/step-N/` directories written whole under a temporary name and renamed into place; the file
    `LATEST` (replaced atomically) names the newest complete one."""

    def __init__(self, run_dir: Path, keep: int = 2):
        self.root = run_dir / "ckpt"
        self.keep = keep

    def candidates(self) -> list[Path]:
        """Complete checkpoints, newest first. A step directory is renamed into place only once written whole, so
        every one counts; `LATEST` (which a kill can leave naming a missing step) is not trusted."""
        return sorted((p for p in self.root.glob("step-*") if p.is_dir()), reverse=True) if self.root.is_dir() else []

    def resume(self, model: XCrossModel, optimizer, scheduler, device) -> tuple[Path, Progress, dict | None] | None:
        """Load the newest checkpoint that reads back whole, falling back to older ones past a damaged (truncated,
        corrupt) one; None if there is none."""
        for path in self.candidates():
            try:
                return (path, *self.load(path, model, optimizer, scheduler, device))
            except Exception as err:  # noqa: BLE001 - any unreadable file: try the older checkpoint
                if dist_info().main:
                    print(f"checkpoint {path} is damaged ({type(err).__name__}: {err}); trying an older one")
        return None

    def save(self, model: XCrossModel, optimizer, scheduler, progress: Progress, rng: dict) -> None:
        info = dist_info()
        name = f"step-{progress.step:08d}"
        final = self.root / name
        tmp = self.root / f".{name}.tmp"
        if info.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            save_tensors(tmp / "trained.safetensors", trained_tensors(model), {"format": CHECKPOINT_FORMAT})
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "progress": asdict(progress)}, tmp / "state.pt")
        barrier()
        torch.save(rng, tmp / f"rng-{info.rank}.pt")  # every process keeps its own dropout stream
        barrier()
        if info.main:
            replace_path(tmp, final)  # a checkpoint of the same step is replaced, never deleted first
            atomic_write(self.root / "LATEST", name + "\n")
            for old in sorted(p for p in self.root.glob("step-*") if p.is_dir())[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        barrier()

    def load(self, path: Path, model: XCrossModel, optimizer, scheduler, device) -> tuple[Progress, dict | None]:
        tensors, _ = load_tensors(path / "trained.safetensors", device)
        load_trained(model, tensors)
        state = torch.load(path / "state.pt", map_location=device, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng_file = path / f"rng-{dist_info().rank}.pt"
        rng = torch.load(rng_file, weights_only=False) if rng_file.is_file() else None
        return Progress(**state["progress"]), rng


# -- the loop --------------------------------------------------------------------------------------------------------


def make_optimizer(model: XCrossModel, config: TrainConfig, total_steps: int):
    groups = model.parameter_groups()
    param_groups = []
    for name in sorted(model.trainable):
        params = [p for _, p in groups[name]]
        if params:
            lr = config.integrator_lr if name == "integrators" else config.lr
            param_groups.append({"params": params, "lr": lr, "name": name})
    if not param_groups:
        raise ValueError("this model has nothing to train (method 'source' is evaluated zero-shot)")
    optimizer = torch.optim.AdamW(param_groups, weight_decay=config.weight_decay)
    warmup = max(1, int(config.warmup * total_steps))

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


@contextlib.contextmanager
def _graceful_stop():
    """Turn Ctrl-C / SIGTERM into a request the loop honours between steps (after saving a checkpoint)."""
    flag = {"stop": False, "signal": None}

    def handler(signum, frame):
        if flag["stop"]:  # a second Ctrl-C stops at once
            raise Interrupted(signum, "stopped at once by a second signal; continue with --resume (from the last "
                                      "checkpoint)")
        flag["stop"], flag["signal"] = True, signum

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError):  # not the main thread
            previous[sig] = signal.signal(sig, handler)
    try:
        yield flag
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def fit(model: XCrossModel, train: list[Example], valid: list[Example], builder: PromptBuilder, sampler: CandidateSampler,
        config: TrainConfig, run_dir: str | Path, save_best, resume: bool = False, device="cpu",
        progress: bool = True) -> dict:
    """Train `model`'s trainable groups on `train`, validating on `valid`; `save_best(path)` writes the best
    weights. Returns a summary (steps, examples seen, best validation, timings: `train_seconds` is the training's
    wall time, validation included, over this call and the earlier ones it resumed (up to their last checkpoint,
    `resumed_seconds` of it); `valid_seconds` the part of it spent validating)."""
    info = dist_info()
    run_dir = Path(run_dir)
    if not train:
        raise ValueError("no training examples")
    step_size = config.batch_size * config.grad_accum  # examples per optimizer step, over all processes
    if config.batch_size % info.world:
        raise ValueError(f"batch size {config.batch_size} must be a multiple of the process count {info.world}")
    pad = builder.tokenizer.pad_id or 0
    steps_per_epoch = math.ceil(len(train) / step_size)
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)
    optimizer, scheduler = make_optimizer(model, config, total)
    params = [p for _, p in model.trainable_parameters()]
    checkpoints = Checkpoints(run_dir)
    run_log = RunLog(run_dir, config.loggers, info.main)

    state = Progress()
    torch.manual_seed(config.seed + info.rank)
    if resume and (found := checkpoints.resume(model, optimizer, scheduler, device)) is not None:
        latest, state, rng = found
        if rng is not None:
            _set_rng_state(rng)
        if info.main:
            print(f"resumed from {latest} (step {state.step}/{total})")
        run_log.start(state.step)
    else:
        run_log.start(None)
    log = run_log.write

    resumed_seconds, valid_seconds = state.seconds, state.valid_seconds

    def validate() -> None:
        nonlocal valid_seconds
        started = time.perf_counter()
        result = evaluate(model, valid, builder, config.eval_batch_size, device, desc="validate", progress=progress)
        valid_seconds += time.perf_counter() - started
        metrics = result.metrics(bootstrap=0)
        value = metrics[SELECTION_METRIC]["mean"]
        record = {"step": state.step, "valid": {k: v["mean"] for k, v in metrics.items()}}
        state.history.append(record)
        log(record)
        if value > state.best_metric:
            state.best_metric, state.best_step, state.since_best = value, state.step, 0
            if info.main:
                save_best(run_dir / "best.safetensors")
        else:
            state.since_best += 1
        barrier()

    def patience_spent() -> bool:
        return config.patience is not None and state.since_best >= config.patience

    def checkpoint() -> None:
        state.seconds = resumed_seconds + time.perf_counter() - start_time
        state.valid_seconds = valid_seconds
        checkpoints.save(model, optimizer, scheduler, state, _rng_state())

    model.train()
    start_time, start_step = time.perf_counter(), state.step
    bar = tqdm(total=total, initial=state.step, desc="train", unit="step", disable=shown(progress and info.main))
    stopped = False
    with _graceful_stop() as stop:
        while state.step < total:
            order = epoch_order(len(train), state.epoch, config.seed)
            while state.batch_in_epoch < steps_per_epoch and state.step < total:
                if stop["stop"]:
                    stopped = True
                    break
                b = state.batch_in_epoch
                global_idx = order[b * step_size:(b + 1) * step_size]
                logged = (state.step + 1) % config.log_every == 0 or state.step + 1 == total
                loss_value = torch.zeros((), device=device)
                for start in range(0, len(global_idx), config.batch_size):  # micro-batches of one step
                    mine = global_idx[start:start + config.batch_size][info.rank::info.world]
                    batch = training_batch(train, mine, state.epoch, builder, sampler, config.train_candidates,
                                           config.seed, pad, length_multiple(device)).to(device)
                    scores, coefficients = model(batch)
                    # Sum over this process's examples / the step's examples: summed over micro-batches and
                    # processes, the mean loss of the step.
                    loss = F.cross_entropy(scores, batch.labels, reduction="sum") / len(global_idx)
                    loss.backward()
                    loss_value += loss.detach()
                if info.world > 1:
                    all_reduce_grads(params)
                grad_norm = torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                reduce(loss_value)
                if not bool(torch.isfinite(loss_value) & torch.isfinite(grad_norm)):  # the step's one host sync
                    kept = checkpoints.candidates()
                    raise TrainingDiverged(
                        f"non-finite {'loss' if not torch.isfinite(loss_value) else 'gradient'} at step {state.step} "
                        f"(epoch {state.epoch}); nothing was updated. Lower --lr/--integrator-lr; "
                        + (f"the last good checkpoint is {kept[0]}" if kept else
                                                 f"no checkpoint was written yet to {checkpoints.root}"))
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                state.batch_in_epoch += 1
                state.examples_seen += len(global_idx)
                bar.update(1)
                if logged:
                    elapsed = time.perf_counter() - start_time
                    rate = (state.step - start_step) * step_size / max(elapsed, 1e-9)
                    record = {"step": state.step, "epoch": state.epoch, "loss": loss_value.item(),
                              "grad_norm": grad_norm.item(), "lr": scheduler.get_last_lr(),
                              "examples_per_s": rate}
                    if coefficients:  # the step's own coefficients: no second forward
                        record["integrators"] = coefficient_stats(batch, coefficients)
                    log(record)
                    bar.set_postfix(loss=f"{record['loss']:.3f}", ex_s=f"{rate:.1f}")
                if config.eval_every and state.step % config.eval_every == 0:
                    validate()
                if state.step % config.checkpoint_every == 0:
                    checkpoint()
                if patience_spent():
                    break
            if stopped or patience_spent():
                break
            if state.batch_in_epoch >= steps_per_epoch:
                state.epoch += 1
                state.batch_in_epoch = 0
                if not config.eval_every:
                    validate()
        stopped = stopped or stop["stop"]  # asked during the last step or validation: the request still stands
    bar.close()
    if stopped:
        # The signal only set a flag, so no step was cut short: this is exactly the state after the last step.
        checkpoint()
        raise Interrupted(stop["signal"] or signal.SIGINT, f"stopped at step {state.step}; continue with --resume")
    if not state.history or state.history[-1]["step"] != state.step:
        validate()
    checkpoint()
    run_log.close()
    return {"steps": state.step, "epochs_completed": state.epoch, "examples_seen": state.examples_seen,
            "stopped_early": patience_spent(),
            "train_examples": len(train), "best_step": state.best_step,
            "best_valid": {SELECTION_METRIC: state.best_metric}, "valid_history": state.history,
            "train_seconds": state.seconds, "valid_seconds": state.valid_seconds, "resumed_seconds": resumed_seconds}
