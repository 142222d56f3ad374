"""Every console command under faults: an output that cannot be written and an input that cannot be read give one
line, no traceback, the documented exit code and nothing left behind; damaged run files are named (or rebuilt where
the run can rebuild them); mistyped requests are refused before any work, and nothing is generated for them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.pipeline_fixtures import (
    REPO, cli_env, common_flags, copy_runs, interrupt_when, make_model_dir, run_cli, tiny_module, train_runs,
)

TARGET = "toys"
SMALL = dict(target=TARGET, max_train_users=8, max_eval_users=8, batch_size=4, epochs=1, history_len=3,
             title_tokens=8, train_candidates=4, checkpoint_every=1)
# Root writes through permissions: run a command without that capability (as test_faults_import does).
AS_USER = ("setpriv", "--bounding-set", "-dac_override,-dac_read_search") if os.geteuid() == 0 else ()

_one_thread, setup = tiny_module("faults_commands")


@pytest.fixture(scope="module")
def trained(setup):
    return train_runs(setup, **SMALL)


def command(args: list[str], cwd: Path = REPO, as_user: bool = False, timeout: float = 600):
    """`python -m <args>` from `cwd` (the repository on the path), without root's override where asked."""
    env = {**cli_env(), "PYTHONPATH": str(REPO)}
    prefix = AS_USER if as_user else ()
    return subprocess.run([*prefix, sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)


def one_line(proc, code: int = 2) -> str:
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def leftovers(*directories: Path) -> list[Path]:
    """Temporaries left by a write (atomic_write's `.NAME.tmp-PID-*`, atomic_directory's `.NAME.tmp-PID`)."""
    return [p for d in directories if d.exists() for p in d.rglob(".*tmp*")]


needs_setpriv = pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None,
                                   reason="running as root without setpriv to drop CAP_DAC_OVERRIDE")


# -- every command: an output it cannot write, an input it cannot read ---------------------------------------------


@needs_setpriv
def test_every_command_with_an_unwritable_output(setup, trained, tmp_path):
    out, flags = copy_runs(trained, tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    users = tmp_path / "users.jsonl"
    users.write_text(json.dumps({"history": ["a", "b"], "candidates": ["c", "d"]}) + "\n")
    lora, peft = out / TARGET / "lora", tmp_path / "peft"
    assert command(["xcross.cli.peft", "export", str(lora), str(peft)]).returncode == 0
    csv = tmp_path / "csv"
    csv.mkdir()
    (csv / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "".join(
        f"u{u},i{i},{i}\n" for u in range(8) for i in range(6)))
    (csv / "items.csv").write_text("item_id,title\n" + "".join(f"i{i},item {i}\n" for i in range(6)))
    commands = {
        "train": ["xcross.cli.train", *flags, "--method", "lora", "--out", str(locked / "runs")],
        "evaluate": ["xcross.cli.evaluate", *flags, "--methods", "lora"],  # writes comparison.json into the target
        "study": ["xcross.cli.study", *flags, "--sources", "sports,tools", "--fractions", "1", "--report-only",
                  "--study-dir", str(locked / "study")],
        "rank": ["xcross.cli.rank", "--run", str(lora), "--input", str(users), "--output", str(locked / "r.jsonl")],
        "inspect": ["xcross.cli.inspect", "--run", str(lora), "--out", str(locked / "inspect")],
        "peft export": ["xcross.cli.peft", "export", str(lora), str(locked / "peft")],
        "peft import": ["xcross.cli.peft", "import", str(peft), str(locked / "a.safetensors"), "--model-dir",
                        str(setup["model"])],
        "prepare csv": ["xcross.cli.prepare", "csv", "--interactions", str(csv / "interactions.csv"), "--items",
                        str(csv / "items.csv"), "--domain", "d", "--out", str(locked / "data"), "--k-core", "3"],
        "prepare synthetic": ["xcross.cli.prepare", "synthetic", "--out", str(locked / "demo")],
    }
    (out / TARGET).chmod(0o555)
    locked.chmod(0o555)
    try:
        for name, args in commands.items():
            proc = command(args, as_user=True)
            line = one_line(proc)
            assert ("Permission denied" in line or "not writable" in line) and str(tmp_path) in line, (name, line)
    finally:
        locked.chmod(0o755)
        (out / TARGET).chmod(0o755)
    assert list(locked.iterdir()) == [] and leftovers(out, tmp_path) == []


@needs_setpriv
def test_every_command_with_an_unreadable_input(setup, trained, tmp_path):
    out, flags = copy_runs(trained, tmp_path)
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    users = tmp_path / "users.jsonl"
    users.write_text(json.dumps({"history": ["a"], "candidates": ["c"]}) + "\n")
    lora = out / TARGET / "lora"
    peft = tmp_path / "peft"
    assert command(["xcross.cli.peft", "export", str(lora), str(peft)]).returncode == 0
    items = tmp_path / "items.csv"
    items.write_text("item_id,title\ni1,one\n")
    interactions = tmp_path / "interactions.csv"
    interactions.write_text("user_id,item_id,timestamp\nu1,i1,0\n")
    unreadable = [secret, users, lora / "config.json", peft / "adapter_config.json", interactions]
    commands = {
        "train": ["xcross.cli.train", "--config", str(secret)],
        "evaluate": ["xcross.cli.evaluate", "--config", str(secret)],
        "study": ["xcross.cli.study", "--config", str(secret)],
        "rank": ["xcross.cli.rank", "--run", str(lora), "--input", str(users), "--output", str(tmp_path / "r.jsonl")],
        "inspect": ["xcross.cli.inspect", "--run", str(lora)],
        "peft import": ["xcross.cli.peft", "import", str(peft), str(tmp_path / "a.safetensors"), "--model-dir",
                        str(setup["model"])],
        "prepare csv": ["xcross.cli.prepare", "csv", "--interactions", str(interactions), "--items", str(items),
                        "--domain", "d", "--out", str(tmp_path / "data")],
    }
    for path in unreadable:
        path.chmod(0o000)
    try:
        for name, args in commands.items():
            line = one_line(command(args, as_user=True))
            assert "Permission denied" in line and str(tmp_path) in line, (name, line)
    finally:
        for path in unreadable:
            path.chmod(0o644)
    assert not (tmp_path / "r.jsonl").exists() and not (tmp_path / "a.safetensors").exists()
    assert not (tmp_path / "data").exists() and leftovers(out, tmp_path) == []


# -- damaged run files ---------------------------------------------------------------------------------------------


def test_a_torn_last_log_line_is_dropped_on_resume_and_in_inspection(setup, tmp_path):
    out = tmp_path / "runs"
    flags = common_flags(setup["world"], setup["model"], out, **{**SMALL, "method": "lora", "max_train_users": 24,
                                                                   "log_every": 1})
    run = out / TARGET / "lora"
    stopped = interrupt_when([sys.executable, "train.py", *flags], (run / "ckpt" / "LATEST").is_file)
    assert stopped.returncode == 130, stopped.stderr
    with (run / "log.jsonl").open("a") as f:
        f.write('{"step": 99, "loss": 1.2')  # what a kill in the middle of a write leaves
    inspected = command(["xcross.cli.inspect", "--run", str(run)])
    assert inspected.returncode == 0, inspected.stdout + inspected.stderr
    resumed = run_cli("train.py", [*flags, "--resume"])
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "dropped 1 torn line(s)" in resumed.stdout
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert all(r["step"] != 99 for r in records)


def test_damaged_run_files_are_named_or_rebuilt(trained, tmp_path, capsys):
    import evaluate as evaluate_cli
    out, flags = copy_runs(trained, tmp_path)
    run = out / TARGET / "lora"
    results = json.loads((run / "results.json").read_text())
    lora = [*flags, "--method", "lora"]
    # results.json cut: rebuilt from the last checkpoint by the command that trains, with the same test metrics
    (run / "results.json").write_text((run / "results.json").read_text()[:50])
    proc = run_cli("train.py", lora)
    assert proc.returncode == 0 and "results.json cannot be read: rebuilding it from its last checkpoint" in \
        proc.stdout, proc.stdout + proc.stderr
    assert json.loads((run / "results.json").read_text())["test"] == results["test"]
    # test_scores.npz cut: evaluate says so and scores the run again
    scores = run / "test_scores.npz"
    scores.write_bytes(scores.read_bytes()[:200])
    assert evaluate_cli.main([*flags, "--methods", "lora"]) == 0
    assert f"{scores} cannot be read" in capsys.readouterr().out
    # config.json cut: named, with what to do
    (run / "config.json").write_text("{\"target\": ")
    line = one_line(run_cli("train.py", [*lora, "--resume"]))
    assert f"{run}/config.json is damaged" in line
    # best.safetensors cut: inspect names it; a source cut is trained again by the command that needs it
    shutil.copytree(trained["out"] / TARGET / "lora", run, dirs_exist_ok=True)
    (run / "best.safetensors").write_bytes((run / "best.safetensors").read_bytes()[:1000])
    line = one_line(command(["xcross.cli.inspect", "--run", str(run)]))
    assert f"{run}/best.safetensors cannot be read" in line
    source = out / "sports" / "lora" / "best.safetensors"
    source.write_bytes(source.read_bytes()[:1000])
    again = run_cli("train.py", [*flags, "--method", "xcross"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "a file it needs is missing or damaged (best.safetensors): training it again" in again.stdout


# -- mistyped requests ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("extra, message", [
    (["--seed", str(2**70)], "--seed must be a whole number >= 0 and <= 9223372036854775807"),
    (["--rank", "1000000000"], "--rank 1000000000 is more than the"),
    (["--train-candidates", "100"], "--train-candidates 100 needs 99 negatives per training example"),
    (["--out", ""], "--out must name a directory (got an empty path)"),
    (["--model-dir", ""], "--model-dir must name a directory (got an empty path)"),
    (["--sources", ""], None),  # empty: every other domain, as documented
])
def test_mistyped_numbers_and_paths_are_refused_by_name(setup, tmp_path, extra, message):
    out = tmp_path / "runs"
    proc = run_cli("train.py", [*common_flags(setup["world"], setup["model"], out, **SMALL), "--method", "lora",
                                *extra])
    if message is None:
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return
    assert message in one_line(proc)
    assert not (out / TARGET / "lora" / "ckpt").exists()


def test_config_files_by_any_spelling(setup, tmp_path):
    flags = common_flags(setup["world"], setup["model"], tmp_path / "runs", **SMALL)
    (tmp_path / "cfg.TOML").write_text('[train]\nlr = 0.002\n')
    (tmp_path / "dir").mkdir()
    ok = run_cli("train.py", [*flags, "--method", "lora", "--config", str(tmp_path / "cfg.TOML"), "--max-steps", "1"])
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert json.loads((tmp_path / "runs" / TARGET / "lora" / "config.json").read_text())["train"]["lr"] == 0.002
    line = one_line(run_cli("train.py", [*flags, "--config", str(tmp_path / "dir")]))
    assert f"{tmp_path / 'dir'}: Is a directory" in line


def test_a_run_used_through_a_symlink(trained, tmp_path):
    out, _ = copy_runs(trained, tmp_path)
    (tmp_path / "latest").symlink_to(out / TARGET / "lora")
    proc = command(["xcross.cli.inspect", "--run", str(tmp_path / "latest"), "--out", str(tmp_path / "inspect")])
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_source_on_another_base_is_one_line_when_evaluated(setup, trained, tmp_path):
    other = make_model_dir(tmp_path / "other-model", setup["world"], seed=1)
    out, flags = copy_runs(trained, tmp_path)
    flags[flags.index("--model-dir") + 1] = str(other)
    line = one_line(run_cli("evaluate.py", [*flags, "--methods", "source:sports"]))
    assert "source:sports" in line and "was trained on another base model" in line


def test_a_refused_request_generates_nothing_in_the_working_directory(setup, tmp_path):
    """Without --data-dir the demo world is generated on first use: but not for a request that is refused."""
    proc = command(["xcross.cli.train", "--target", "nosuch", "--model-dir", str(setup["model"]), "--quiet"],
                   cwd=tmp_path)
    assert "unknown domain(s) nosuch: the demo world" in one_line(proc)
    proc = command(["xcross.cli.evaluate", "--lr", "-1", "--model-dir", str(setup["model"])], cwd=tmp_path)
    assert "--lr must be in (0, 1000], got -1.0" in one_line(proc)
    assert list(tmp_path.iterdir()) == []


# -- a full disk, outputs that are not directories, what a log file gets ----------------------------------------


def _full_disk(monkeypatch, module) -> None:
    """Every atomic write of `module` fails as a full disk does, after its temporary was created and written."""
    import errno

    from xcross import files

    real = files.atomic_write

    def full(path, content):
        def write(tmp):
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
        return real(path, write)

    monkeypatch.setattr(module, "atomic_write", full)


def test_a_full_disk_is_one_line_exit_1_and_leaves_nothing(trained, tmp_path, monkeypatch, capsys):
    from xcross import training
    from xcross.cli import rank as rank_cli
    out, flags = copy_runs(trained, tmp_path)
    users = tmp_path / "users.jsonl"
    users.write_text(json.dumps({"history": ["a", "b"], "candidates": ["c", "d"]}) + "\n")
    _full_disk(monkeypatch, rank_cli)
    code = rank_cli.main(["--run", str(out / TARGET / "lora"), "--input", str(users), "--output",
                          str(tmp_path / "r.jsonl"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "No space left on device (free some space" in err, err
    assert not (tmp_path / "r.jsonl").exists() and leftovers(tmp_path) == []
    import train as train_cli
    _full_disk(monkeypatch, training)  # the first checkpoint's LATEST file
    code = train_cli.main([*common_flags(trained_world(trained), trained_model(trained), tmp_path / "new", **SMALL),
                           "--method", "lora", "--checkpoint-every", "1"])
    err = capsys.readouterr().err
    assert code == 1 and err.strip().count("\n") == 0 and "No space left on device" in err, err
    assert leftovers(tmp_path / "new") == []


def trained_world(trained) -> str:
    return trained["flags"][trained["flags"].index("--data-dir") + 1]


def trained_model(trained) -> str:
    return trained["flags"][trained["flags"].index("--model-dir") + 1]


def test_an_out_that_is_a_file_or_a_dangling_symlink_is_one_line(setup, tmp_path):
    (tmp_path / "file").write_text("not a directory")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere" / "at-all")
    for out in (tmp_path / "file", tmp_path / "dangling"):
        proc = run_cli("train.py", [*common_flags(setup["world"], setup["model"], out, **SMALL), "--method", "lora"])
        assert str(out) in one_line(proc)
    assert (tmp_path / "file").read_text() == "not a directory"


def test_evaluate_says_when_it_found_no_runs(setup, tmp_path):
    proc = run_cli("evaluate.py", common_flags(setup["world"], setup["model"], tmp_path / "runs", **SMALL))
    assert proc.returncode == 0 and "no finished runs or source adapters under" in proc.stdout, proc.stderr


def test_progress_bars_stay_out_of_a_log_file(setup, tmp_path):
    """A command whose stderr is a file (not a terminal) writes no progress-bar redraws into it."""
    flags = [f for f in common_flags(setup["world"], setup["model"], tmp_path / "runs", **SMALL) if f != "--quiet"]
    proc = run_cli("train.py", [*flags, "--method", "lora"])
    assert proc.returncode == 0, proc.stderr
    assert "\x1b[A" not in proc.stderr and "\r" not in proc.stderr and "it/s" not in proc.stderr
