"""Interrupting training and resuming it changes nothing: a real train.py run stopped by SIGINT and rerun with
--resume ends with the same weights and metrics as an uninterrupted run; `fit(resume=True)` in process too."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.pipeline_fixtures import (
    common_flags, interrupt_when, latest_checkpoint, max_abs_diff, read_jsonl, run_cli, tensors,
    tiny_module,
)
from xcross.data import CandidateSampler, PromptBuilder, load_domain
from xcross.lora import LoRAConfig
from xcross.tokenizer import Tokenizer
from xcross.training import TrainConfig, TrainingDiverged, evaluate, fit
from xcross.weights import load_decoder
from xcross.methods import build_model, trained_tensors

TARGET = "toys"
# Dropout on, so that resuming must restore the RNG; a checkpoint after every step, so the run can be stopped
# anywhere. 96 users with one example each in batches of 4, two epochs: 48 steps.
RESUMABLE = dict(method="lora", target=TARGET, max_train_users=96, max_examples_per_user=1, max_eval_users=16,
                 batch_size=4, epochs=2, history_len=3, title_tokens=8, train_candidates=4, dropout=0.1,
                 checkpoint_every=1, lr=1e-3)


_one_thread, setup = tiny_module("resume")


def checkpoint_step(run_dir: Path) -> int:
    """The step of the newest complete checkpoint, 0 if none yet."""
    pointer = run_dir / "ckpt" / "LATEST"
    try:
        return int(pointer.read_text().strip().removeprefix("step-"))
    except (FileNotFoundError, ValueError):
        return 0


def test_interrupted_and_resumed_run_equals_an_uninterrupted_one(setup):
    reference_out, resumed_out = setup["root"] / "reference", setup["root"] / "resumed"
    reference = run_cli("train.py", common_flags(setup["world"], setup["model"], reference_out, **RESUMABLE))
    assert reference.returncode == 0, reference.stdout + reference.stderr
    reference_dir = reference_out / TARGET / "lora"
    total = json.loads((reference_dir / "results.json").read_text())["training"]["steps"]
    assert total == 48

    run_dir = resumed_out / TARGET / "lora"
    flags = common_flags(setup["world"], setup["model"], resumed_out, **RESUMABLE)
    stopped = interrupt_when([sys.executable, "train.py", *flags], lambda: checkpoint_step(run_dir) >= 3)
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert "continue with --resume" in stopped.stderr
    step = checkpoint_step(run_dir)
    assert f"stopped at step {step};" in stopped.stderr
    assert 3 <= step < total, "the run was not stopped mid-training"
    assert not (run_dir / "results.json").exists()

    resumed = run_cli("train.py", [*flags, "--resume"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from {run_dir / 'ckpt' / f'step-{step:08d}'} (step {step}/{total})" in resumed.stdout

    assert max_abs_diff(tensors(run_dir / "best.safetensors"), tensors(reference_dir / "best.safetensors")) <= 1e-6
    final, final_reference = latest_checkpoint(run_dir), latest_checkpoint(reference_dir)
    assert final.name == final_reference.name == f"step-{total:08d}"
    assert max_abs_diff(tensors(final / "trained.safetensors"),
                        tensors(final_reference / "trained.safetensors")) <= 1e-6
    results = json.loads((run_dir / "results.json").read_text())
    results_reference = json.loads((reference_dir / "results.json").read_text())
    assert results["test"] == results_reference["test"]
    for key in ("steps", "examples_seen", "best_step", "best_valid", "valid_history"):
        assert results["training"][key] == results_reference["training"][key], key
    np.testing.assert_array_equal(np.load(run_dir / "test_scores.npz")["scores"],
                                  np.load(reference_dir / "test_scores.npz")["scores"])
    # The log of the stopped run continues: every step's record once, with the same losses.
    losses = {r["step"]: r["loss"] for r in read_jsonl(run_dir / "log.jsonl") if "loss" in r}
    assert losses == {r["step"]: r["loss"] for r in read_jsonl(reference_dir / "log.jsonl") if "loss" in r}


def test_fit_resumes_from_a_checkpoint_exactly(setup, tmp_path):
    """In process: training 6 steps straight through, and resuming at step 4 from that run's own checkpoint,
    end with identical tensors."""
    domain = load_domain(setup["world"] / TARGET)
    tokenizer = Tokenizer.from_dir(setup["model"])
    builder = PromptBuilder(tokenizer, domain.items, title_tokens=8, history_len=3)
    train = [e for e in domain.train if len(e.history) >= 2][:24]
    valid = domain.valid[:8]
    config = TrainConfig(epochs=1, batch_size=4, lr=1e-3, train_candidates=4, checkpoint_every=4, log_every=1,
                         eval_batch_size=8, seed=3)

    def model():
        torch.manual_seed(0)
        return build_model(load_decoder(setup["model"]), "lora", lora=LoRAConfig(rank=4, alpha=8, dropout=0.1))

    def train_model(run_dir, m, resume):
        return fit(m, train, valid, builder, CandidateSampler(domain), config, run_dir,
                   save_best=lambda path: None, resume=resume, progress=False)

    straight = model()
    started = time.perf_counter()
    straight_summary = train_model(tmp_path / "straight", straight, resume=False)
    straight_wall = time.perf_counter() - started
    # Checkpoints are kept two deep: the one of step 4 and the final one of step 6.
    assert sorted(p.name for p in (tmp_path / "straight" / "ckpt").glob("step-*")) == ["step-00000004",
                                                                                        "step-00000006"]
    shutil.copytree(tmp_path / "straight" / "ckpt" / "step-00000004", tmp_path / "resumed" / "ckpt" / "step-00000004")
    (tmp_path / "resumed" / "ckpt" / "LATEST").write_text("step-00000004\n")

    resumed = model()
    torch.manual_seed(123)  # the global RNG state must come from the checkpoint, not from here
    started = time.perf_counter()
    summary = train_model(tmp_path / "resumed", resumed, resume=True)
    resumed_wall = time.perf_counter() - started
    assert summary["steps"] == 6
    # The training time of a resumed run counts the interrupted run's, up to its checkpoint (timed here outside).
    at_step4 = torch.load(tmp_path / "resumed" / "ckpt" / "step-00000004" / "state.pt")["progress"]["seconds"]
    assert 0 < at_step4 < straight_summary["train_seconds"] <= straight_wall
    assert summary["resumed_seconds"] == at_step4
    assert at_step4 < summary["train_seconds"] <= at_step4 + resumed_wall
    want, got = trained_tensors(straight), trained_tensors(resumed)
    assert max_abs_diff(got, want) == 0.0
    assert max_abs_diff(tensors(tmp_path / "resumed" / "ckpt" / "step-00000006" / "trained.safetensors"),
                        tensors(tmp_path / "straight" / "ckpt" / "step-00000006" / "trained.safetensors")) == 0.0
    # Dropout is active, so the comparison above needs the restored RNG: resuming without it ends elsewhere.
    shutil.copytree(tmp_path / "straight" / "ckpt" / "step-00000004", tmp_path / "no_rng" / "ckpt" / "step-00000004")
    (tmp_path / "no_rng" / "ckpt" / "step-00000004" / "rng-0.pt").unlink()
    (tmp_path / "no_rng" / "ckpt" / "LATEST").write_text("step-00000004\n")
    no_rng = model()
    train_model(tmp_path / "no_rng", no_rng, resume=True)
    assert max_abs_diff(trained_tensors(no_rng), want) > 1e-4


def test_non_finite_training_stops_with_the_step_and_updates_nothing(setup, tmp_path):
    """A learning rate of 1e30 overflows the model after its first update: fit must stop at the first non-finite
    loss or gradient, name the step, and leave every trained tensor finite (the bad step is never applied)."""
    domain = load_domain(setup["world"] / TARGET)
    builder = PromptBuilder(Tokenizer.from_dir(setup["model"]), domain.items, title_tokens=8, history_len=3)
    train = [e for e in domain.train if len(e.history) >= 2][:24]
    config = TrainConfig(epochs=1, batch_size=4, lr=1e30, train_candidates=4, log_every=1, seed=3)
    torch.manual_seed(0)
    model = build_model(load_decoder(setup["model"]), "lora", lora=LoRAConfig(rank=4, alpha=8, dropout=0.0))
    with pytest.raises(TrainingDiverged, match=r"non-finite (loss|gradient) at step [1-5] \(epoch 0\)") as err:
        fit(model, train, domain.valid[:8], builder, CandidateSampler(domain), config, tmp_path / "run",
            save_best=lambda path: None, progress=False)
    assert str(tmp_path / "run" / "ckpt") in str(err.value)
    assert all(torch.isfinite(p).all() for _, p in model.trainable_parameters())
    logged = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert logged and all(np.isfinite(r["loss"]) for r in logged)  # only finite steps were logged


def test_an_interrupted_evaluation_continues_to_the_same_scores(setup, tmp_path):
    """`evaluate(partial=...)` saves the scores after every batch: stopped after two of its batches and run again,
    it scores only the remaining batches and returns exactly the scores of an uninterrupted evaluation. Saved
    scores are not reused for other weights, and a damaged file is ignored."""
    domain = load_domain(setup["world"] / TARGET)
    examples = domain.test[:10]
    builder = PromptBuilder(Tokenizer.from_dir(setup["model"]), domain.items, 8, 3)
    torch.manual_seed(0)
    model = build_model(load_decoder(setup["model"]), "lora", [], lora=LoRAConfig(rank=4, alpha=8, dropout=0))
    reference = evaluate(model, examples, builder, batch_size=3, progress=False).scores  # batches of 3, 3, 3, 1
    calls, score = [], model.score
    pause = 0.25  # per scored batch, so that the time spent is known from below

    def stop_at(n):
        def scored(batch):
            calls.append(batch)
            if len(calls) == n:
                raise KeyboardInterrupt
            time.sleep(pause)
            return score(batch)
        return scored

    partial = tmp_path / "scores.partial.npz"
    model.score = stop_at(3)
    started = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        evaluate(model, examples, builder, batch_size=3, progress=False, partial=partial, weights="w0")
    wall = time.perf_counter() - started
    with np.load(partial) as saved:
        assert int(saved["done"]) == 6
    calls.clear()
    model.score = stop_at(0)  # never stops
    started = time.perf_counter()
    resumed = evaluate(model, examples, builder, batch_size=3, progress=False, partial=partial, weights="w0")
    wall += time.perf_counter() - started
    assert len(calls) == 2 and np.array_equal(resumed.scores, reference)
    assert not partial.exists()
    # Its time counts the interrupted call's two batches too: four pauses at least, both calls' wall time at most.
    assert 4 * pause <= resumed.seconds <= wall

    for stale in ("other weights", "damaged"):
        model.score = stop_at(3)
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            evaluate(model, examples, builder, batch_size=3, progress=False, partial=partial, weights="w0")
        if stale == "damaged":
            partial.write_bytes(partial.read_bytes()[:40])
        calls.clear()
        model.score = stop_at(0)
        weights = "w1" if stale == "other weights" else "w0"
        again = evaluate(model, examples, builder, batch_size=3, progress=False, partial=partial, weights=weights)
        assert len(calls) == 4 and np.array_equal(again.scores, reference), stale


def test_resuming_a_finished_run_keeps_it(setup, tmp_path):
    """`--resume` on a run that finished with the same settings changes nothing in it and says so; one that was
    trained with --no-test is tested by a --resume without it (nothing is trained again)."""
    flags = common_flags(setup["world"], setup["model"], tmp_path / "runs", **{**RESUMABLE, "epochs": 1})
    run_dir = tmp_path / "runs" / TARGET / "lora"
    untested = run_cli("train.py", [*flags, "--no-test"])
    assert untested.returncode == 0, untested.stdout + untested.stderr
    assert not (run_dir / "test_scores.npz").exists()
    best = (run_dir / "best.safetensors").read_bytes()
    tested = run_cli("train.py", [*flags, "--resume"])
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert f"test results on {TARGET}" in tested.stdout and (run_dir / "test_scores.npz").is_file()
    assert (run_dir / "best.safetensors").read_bytes() == best
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"}
    again = run_cli("train.py", [*flags, "--resume"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "has finished with these settings: nothing to resume" in again.stdout
    assert f"test results on {TARGET}" in again.stdout and "wrote" not in again.stdout
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and p.name != ".lock"} == files
