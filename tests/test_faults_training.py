"""Faults and bad requests around training: every out-of-range flag stops before any work with one line and exit
code 2; resume refuses changed settings, skips damaged checkpoints and never logs a step twice; two processes
cannot train into one run directory; SIGTERM stops cleanly with exit code 143."""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train as train_cli
from tests.pipeline_fixtures import (
    REPO, cli_env, common_flags, interrupt_when, max_abs_diff, read_jsonl, run_cli, tensors, tiny_module,
)
from xcross.data import CandidateSampler, PromptBuilder, load_domain
from xcross.files import atomic_write
from xcross.lora import LoRAConfig
from xcross.methods import build_model, trained_tensors
from xcross.rundir import RunDir
from xcross.settings import differences
from xcross.settings import RunConfig
from xcross.tokenizer import Tokenizer
from xcross.training import TrainConfig, fit
from xcross.weights import load_decoder

TARGET = "toys"
SMALL = dict(target=TARGET, method="lora", max_train_users=96, max_examples_per_user=1, max_eval_users=8,
             batch_size=4, epochs=2, history_len=3, title_tokens=8, train_candidates=4, checkpoint_every=1)


_one_thread, setup = tiny_module("faults")


# Each flag, a value a user might type, and what the one-line message must name.
BAD_FLAGS = [
    ("--num-candidates", "1", "--num-candidates must be a whole number >= 2"),
    ("--eval-batch-size", "-4", "--eval-batch-size must be a whole number >= 1"),
    ("--epochs", "0", "--epochs must be a whole number >= 1"),
    ("--max-steps", "0", "--max-steps must be a whole number >= 1"),
    ("--batch-size", "-1", "--batch-size must be a whole number >= 1"),
    ("--batch-size", "0", "--batch-size must be a whole number >= 1"),
    ("--lr", "-1", "--lr must be in (0, 1000], got -1.0"),
    ("--lr", "nan", "--lr must be in (0, 1000], got nan"),
    ("--lr", "1e39", "--lr must be in (0, 1000], got 1e+39"),
    ("--integrator-lr", "0", "--integrator-lr must be in (0, 1000]"),
    ("--history-len", "0", "--history-len must be a whole number >= 1"),
    ("--max-train-users", "0", "--max-train-users must be a whole number >= 1"),
    ("--max-eval-users", "0", "--max-eval-users must be a whole number >= 1"),
    ("--title-tokens", "0", "--title-tokens must be a whole number >= 1"),
    ("--train-candidates", "1", "--train-candidates must be a whole number >= 2"),
    ("--checkpoint-every", "0", "--checkpoint-every must be a whole number >= 1"),
    ("--log-every", "0", "--log-every must be a whole number >= 1"),
    ("--rank", "0", "--rank must be a whole number >= 1"),
    ("--dropout", "1.5", "--dropout must be in [0, 1), got 1.5"),
    ("--seed", "-1", "--seed must be a whole number >= 0"),
    ("--device", "tpu", "--device must be auto, cpu, cuda or cuda:N"),
    ("--beta", "nan", "--beta must be in (-inf, inf], got nan"),
    ("--sources", "tools,tools", "--sources names a domain twice"),
    ("--warmup", "-0.1", "--warmup is a fraction of the steps in [0, 1)"),
]


@pytest.mark.parametrize("flag, value, message", BAD_FLAGS, ids=[f"{f}={v}" for f, v, _ in BAD_FLAGS])
def test_out_of_range_flags_stop_before_any_work(setup, tmp_path, capsys, flag, value, message):
    out = tmp_path / "runs"
    method = "merge" if flag == "--sources" else "lora"
    code = train_cli.main([*common_flags(setup["world"], setup["model"], out, **{**SMALL, "method": method}),
                           flag, value])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not out.exists()  # nothing was written


def _interrupted_run(setup, out: Path, signum=signal.SIGINT, **extra):
    flags = common_flags(setup["world"], setup["model"], out, **{**SMALL, **extra})
    run_dir = out / TARGET / "lora"
    stopped = interrupt_when([sys.executable, "train.py", *flags], (run_dir / "ckpt" / "LATEST").is_file,
                             signum=signum)
    return flags, run_dir, stopped


def test_sigterm_stops_cleanly_with_exit_code_143(setup, tmp_path):
    _, run_dir, stopped = _interrupted_run(setup, tmp_path / "runs", signal.SIGTERM)
    assert stopped.returncode == 143, stopped.stderr
    assert "interrupted: stopped at step" in stopped.stderr and (run_dir / "ckpt").is_dir()


def test_resume_refuses_changed_settings_and_names_them(setup, tmp_path):
    flags, run_dir, stopped = _interrupted_run(setup, tmp_path / "runs")
    assert stopped.returncode == 130, stopped.stderr
    for changed, named in ((["--lr", "0.05"], "train.lr: 0.001 there, 0.05 here"),
                           (["--batch-size", "16"], "train.batch_size: 4 there, 16 here")):
        proc = run_cli("train.py", [*flags, "--resume", *changed])
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert "was started with other settings" in proc.stderr and named in proc.stderr
    assert not (run_dir / "results.json").exists()
    (run_dir / "config.json").unlink()  # what the checkpoints were trained with is now unknown
    proc = run_cli("train.py", [*flags, "--resume"])
    assert proc.returncode == 2 and "has checkpoints but no config.json" in proc.stderr, proc.stdout + proc.stderr


def test_a_directory_spelled_relative_or_absolute_is_the_same_setting(tmp_path, monkeypatch):
    """Where the data and the base are is no part of a run's identity: their content is (inputs.json), so a run
    trained with one spelling of a directory, or on a copy of its data elsewhere, is the run asked for."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    relative = RunConfig(out="runs", target=TARGET, method="lora").with_values({"data.data_dir": "data"})
    absolute = relative.with_values({"data.data_dir": str(tmp_path / "data")})
    other = relative.with_values({"data.data_dir": str(tmp_path / "elsewhere")})
    assert differences(relative, absolute) == []  # what the study passed a run trained with the other spelling
    assert differences(relative, other) == []  # another directory: its content decides (tests/test_identity.py)


def test_two_processes_cannot_train_into_one_run_directory(setup, tmp_path):
    out = tmp_path / "runs"
    config = RunConfig(target=TARGET, method="lora", out=str(out))
    with RunDir.of(config).lock():  # a training in progress
        proc = run_cli("train.py", common_flags(setup["world"], setup["model"], out, **SMALL))
    assert proc.returncode == 2 and "is training into" in proc.stderr, proc.stdout + proc.stderr
    assert not (out / TARGET / "lora" / "log.jsonl").exists()


def test_resume_falls_back_past_damaged_checkpoints_and_logs_each_step_once(setup, tmp_path):
    """LATEST naming a step that is not there, and a newer checkpoint truncated by a kill: resume takes the newest
    intact checkpoint, ends where an uninterrupted run ends, and log.jsonl holds every step once."""
    domain = load_domain(setup["world"] / TARGET)
    builder = PromptBuilder(Tokenizer.from_dir(setup["model"]), domain.items, title_tokens=8, history_len=3)
    train = [e for e in domain.train if len(e.history) >= 2][:24]
    config = TrainConfig(epochs=1, batch_size=4, lr=1e-3, train_candidates=4, checkpoint_every=2, log_every=1,
                         eval_batch_size=8, seed=3)

    def trained(run_dir, resume):
        torch.manual_seed(0)
        model = build_model(load_decoder(setup["model"]), "lora", lora=LoRAConfig(rank=4, alpha=8, dropout=0.0))
        fit(model, train, domain.valid[:8], builder, CandidateSampler(domain), config, run_dir,
            save_best=lambda path: None, resume=resume, progress=False)
        return trained_tensors(model)

    want = trained(tmp_path / "straight", False)
    damaged = tmp_path / "damaged"
    shutil.copytree(tmp_path / "straight", damaged)
    ckpt = damaged / "ckpt"
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000004", "step-00000006"]
    state = ckpt / "step-00000006" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # killed while writing
    (ckpt / "LATEST").write_text("step-00000009\n")  # names a checkpoint that was never completed
    got = trained(damaged, True)
    assert all(torch.equal(got[k], want[k]) for k in want)
    steps = [r["step"] for r in read_jsonl(damaged / "log.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


@pytest.mark.parametrize("damage, message", [
    ("truncate", "cannot load the base model in"),
    ("nan", "has non-finite weights"),
    ("config", "cannot load the base model in"),
    ("tokenizer", "has no tokenizer.json"),
])
def test_a_damaged_base_model_is_a_one_line_error(setup, tmp_path, capsys, damage, message):
    model = tmp_path / "model"
    shutil.copytree(setup["model"], model)
    weights = model / "model.safetensors"
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif damage == "nan":
        from safetensors.torch import load_file, save_file
        state = load_file(weights)
        key = sorted(state)[0]
        state[key] = torch.full_like(state[key], float("nan"))
        save_file(state, weights)
    elif damage == "tokenizer":
        (model / "tokenizer.json").unlink()
    else:
        (model / "config.json").write_text("{not json")
    code = train_cli.main(common_flags(setup["world"], model, tmp_path / "runs", **SMALL))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_an_adapter_of_another_base_with_the_same_shapes_is_refused(setup, tmp_path):
    """Two bases of identical shapes (here: the tiny model and a copy with other weights) differ in their
    fingerprint: an adapter trained on one is refused on the other, naming it."""
    from safetensors.torch import load_file, save_file
    from xcross.methods import save_adapter
    other = tmp_path / "other"
    shutil.copytree(setup["model"], other)
    state = load_file(other / "model.safetensors")
    save_file({k: v + 0.01 for k, v in state.items()}, other / "model.safetensors")
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(build_model(load_decoder(setup["model"]), "lora", lora=LoRAConfig(rank=2)), adapter)
    build_model(load_decoder(setup["model"]), "source", [adapter])  # its own base: fine
    with pytest.raises(ValueError, match="trained on another base model.*fingerprint"):
        build_model(load_decoder(other), "source", [adapter])


def test_sigkill_at_random_points_then_resume_ends_like_an_uninterrupted_run(setup, tmp_path):
    """SIGKILL (no handler runs) at seeded random moments, checkpoint writes included; each time `--resume` goes on
    from what was left, and the finished run equals an uninterrupted one, its log holding every step once."""
    small = {**SMALL, "max_train_users": 32, "epochs": 1}  # 8 steps, a checkpoint after every one
    reference = run_cli("train.py", common_flags(setup["world"], setup["model"], tmp_path / "reference", **small))
    assert reference.returncode == 0, reference.stderr
    flags = common_flags(setup["world"], setup["model"], tmp_path / "killed", **small)
    run_dir = tmp_path / "killed" / TARGET / "lora"
    rnd = random.Random(0)
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "train.py", *flags, "--resume"], cwd=REPO, env=cli_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        start = time.monotonic()
        while not (run_dir / "ckpt").is_dir() and time.monotonic() - start < 120:  # past start-up
            time.sleep(0.05)
        time.sleep(rnd.uniform(0.0, 3.0))
        proc.kill()
        proc.wait()
    finished = run_cli("train.py", [*flags, "--resume"])
    assert finished.returncode == 0, finished.stdout + finished.stderr
    assert max_abs_diff(tensors(run_dir / "best.safetensors"),
                        tensors(tmp_path / "reference" / TARGET / "lora" / "best.safetensors")) <= 1e-6
    steps = [r["step"] for r in read_jsonl(run_dir / "log.jsonl") if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 8
    assert not list(run_dir.rglob("*.tmp")) and not list((run_dir / "ckpt").glob(".*"))  # no partial file left


def test_written_files_get_the_mode_a_plain_open_gives(tmp_path):
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    atomic_write(tmp_path / "atomic.txt", "x")
    assert (tmp_path / "atomic.txt").stat().st_mode == plain.stat().st_mode


def test_a_damaged_trained_run_is_a_one_line_error_when_evaluated(setup, tmp_path, capsys):
    import evaluate as evaluate_cli
    out = tmp_path / "runs"
    flags = common_flags(setup["world"], setup["model"], out, **{**SMALL, "max_train_users": 8, "epochs": 1})
    assert run_cli("train.py", flags).returncode == 0
    best = out / TARGET / "lora" / "best.safetensors"
    best.write_bytes(best.read_bytes()[:100])
    (out / TARGET / "lora" / "test_scores.npz").unlink()  # so that the saved weights must be read
    code = evaluate_cli.main([*flags, "--methods", "lora"])
    err = capsys.readouterr().err
    assert code == 2 and f"{best} cannot be read" in err and err.count("\n") == 1, err
