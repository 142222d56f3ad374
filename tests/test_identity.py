"""Run identity and trustworthy evidence: one declared table of settings, presets that never replace a given value,
runs known by the content of what they were built on, scores keyed by what they scored, one run per directory,
checks before work, and a run directory of the earlier format read correctly or refused."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

import evaluate as evaluate_cli
import train as train_cli
from tests.pipeline_fixtures import REPO, common_flags, copy_runs, interrupt_when, run_cli, tiny_module, train_runs
from xcross.cli.common import config_from_args
from xcross.cli.train import build_parser
from xcross.methods import METHODS, TRAINED_METHODS
from xcross.settings import (PRESETS, REMOVED, ROLES, SETTINGS, TABLE, RunConfig, UsageError, help_text, preset_table,
                             problems)

TARGET = "toys"
SMALL = dict(max_train_users=8, max_eval_users=8, batch_size=4, epochs=1, history_len=3, title_tokens=8,
             train_candidates=4, checkpoint_every=1)

_one_thread, setup = tiny_module("identity")


def leaves(obj, prefix: str = "") -> list[str]:
    """Every leaf of a (nested) dataclass by its dotted path."""
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        out += leaves(value, f"{prefix}{f.name}.") if dataclasses.is_dataclass(value) else [prefix + f.name]
    return out


def one_line_error(proc) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def files_of(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()
            and p.name != ".lock"}


# -- one declared table ------------------------------------------------------------------------------------------


def test_the_table_declares_every_setting_of_a_run_once():
    assert [s.path for s in SETTINGS] == list(TABLE)  # no path twice
    assert sorted(TABLE) == sorted(leaves(RunConfig()))  # exactly RunConfig's leaves
    assert all(s.role in ROLES for s in SETTINGS)
    flags = [s.option for s in SETTINGS if s.option]
    assert len(flags) == len(set(flags))
    for preset in PRESETS.values():  # a preset names settings of the table, with values its checks accept
        assert set(preset) <= set(TABLE)
        config = RunConfig().with_values(preset)
        assert problems(config) == []
    assert not set(REMOVED) & set(TABLE)
    assert set(RunConfig().to_dict()) - {"given", "from_preset"} == {p.split(".")[0] for p in TABLE} - {"given"}
    assert {s.path: s.choices for s in SETTINGS}["method"] == TRAINED_METHODS == tuple(
        name for name, m in METHODS.items() if m.trains)


def test_the_flags_and_their_help_come_from_the_table():
    parser = build_parser()
    options = {a.dest: a for a in parser._actions}
    for setting in SETTINGS:
        if setting.option is None:
            continue
        action = options[setting.path]
        assert setting.option in action.option_strings
        if setting.kind is not bool:
            assert action.help == help_text(setting)
            for name, values in PRESETS.items():  # every preset's value shown, read from PRESETS
                if setting.path in values:
                    assert f"{name} {values[setting.path]:g}" in action.help if isinstance(
                        values[setting.path], float) else f"{name} {values[setting.path]}" in action.help


def test_the_readme_preset_table_is_the_declared_one():
    assert preset_table() in (REPO / "README.md").read_text(encoding="utf-8")


# -- presets fill only what nobody gave ----------------------------------------------------------------------------


def test_a_given_value_is_never_replaced_by_the_preset(tmp_path):
    """lr 5e-4 and history 10 are the dataclass defaults: given in a file, they are kept under the cpu preset (which
    would set 1e-3 and 5), while what the file leaves out is the preset's."""
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"train": {"lr": 0.0005}, "data": {"history_len": 10}}))
    args = build_parser().parse_args(["--config", str(file), "--preset", "cpu"])
    config = config_from_args(args)
    assert config.train.lr == 0.0005 and config.data.history_len == 10
    assert config.data.title_tokens == PRESETS["cpu"]["data.title_tokens"]
    record = config.to_dict()
    assert {"train.lr", "data.history_len"} <= set(record["given"])
    assert "train.lr" not in record["from_preset"] and "data.title_tokens" in record["from_preset"]
    # a flag equal to the default is given too
    args = build_parser().parse_args(["--preset", "cpu", "--batch-size", "8", "--lr", "0.0005"])
    assert config_from_args(args).train.lr == 0.0005
    # and a config.json reads back as the same settings
    assert RunConfig.from_dict(json.loads(json.dumps(record))) == config


@pytest.mark.parametrize("settings, message", [
    ({"train": {"epochs": True}}, "--epochs must be a whole number >= 1 (got True)"),
    ({"sources": "tools,sports"}, "--sources must be a list of strings (got \"tools,sports\")"),
    ({"out": 5}, "--out must be a string (got 5)"),
    ({"data": None}, "data must be an object of settings, got null"),
    ({"model": {"lora": 5}}, "model.lora must be an object of settings, got 5"),
])
def test_a_value_of_the_wrong_type_is_refused_by_name(settings, message):
    try:
        config = RunConfig.from_dict(settings)
        found = "; ".join(problems(config))
    except UsageError as err:
        found = str(err)
    assert message in found


def test_a_config_json_whose_preset_was_edited_is_refused():
    args = build_parser().parse_args(["--preset", "study-cpu"])
    record = config_from_args(args).to_dict()
    RunConfig.from_dict(record)  # as written: fine
    with pytest.raises(UsageError, match="came from preset gpu, which gives 10: the file was edited"):
        RunConfig.from_dict({**record, "preset": "gpu"})


# -- runs of the tiny world ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(setup):
    return train_runs(setup, target=TARGET, **SMALL)


def test_evaluate_scores_every_row_on_the_users_and_candidates_asked(trained, tmp_path):
    out, flags = copy_runs(trained, tmp_path)
    proc = run_cli("evaluate.py", [*flags, "--max-eval-users", "4", "--num-candidates", "5"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((out / TARGET / "comparison.json").read_text())
    assert {r["method"] for r in rows} >= {"popularity", "source:sports", "source:tools", "lora", "xcross"}
    assert {(r["users"], r["candidates"]) for r in rows} == {(4, 5)} and len({r["scored"] for r in rows}) == 1
    assert "4 users, 5 candidates each" in proc.stdout
    # the runs' own stored scores (8 users, 20 candidates) are untouched
    assert np.load(out / TARGET / "lora" / "test_scores.npz")["scores"].shape == (8, 20)


def test_a_retrained_source_is_noticed_by_every_command(trained, tmp_path, setup):
    out, flags = copy_runs(trained, tmp_path)
    xcross = out / TARGET / "xcross"
    before = json.loads((xcross / "inputs.json").read_text())
    # retrain the sports source in place (another lr): a whole new run replacing the old one
    source_flags = [*flags, "--target", "sports", "--method", "lora", "--lr", "0.02"]
    refused = run_cli("train.py", source_flags)
    assert "holds a run trained otherwise (train.lr: 0.001 there, 0.02 here)" in one_line_error(refused)
    assert run_cli("train.py", [*source_flags, "--replace", "--no-test"]).returncode == 0
    users = tmp_path / "users.jsonl"
    users.write_text(json.dumps({"history": ["a", "b"], "candidates": ["c", "d"]}) + "\n")
    for proc in (run_cli("-m", ["xcross.cli.rank", "--run", str(xcross), "--input", str(users), "--output",
                                str(tmp_path / "ranked.jsonl")]),
                 run_cli("evaluate.py", [*flags, "--methods", "xcross"]),
                 run_cli("-m", ["xcross.cli.inspect", "--run", str(xcross)])):
        line = one_line_error(proc)
        assert "have changed since: source sports" in line and f"xcross-train --config {xcross}/config.json" in line
    assert not (tmp_path / "ranked.jsonl").exists()
    # X-Cross asks for sources trained as itself (lr 0.001): the sports run is another run now, named as such
    line = one_line_error(run_cli("train.py", [*flags, "--method", "xcross"]))
    assert f"{out}/sports/lora holds a run trained otherwise (train.lr: 0.02 there, 0.001 here)" in line
    # a sports source of the same settings whose adapter holds other weights (as one retrained on another machine
    # does): the command that trains brings the X-Cross run up to date, saying why
    shutil.rmtree(out / "sports" / "lora")
    shutil.copytree(trained["out"] / "sports" / "lora", out / "sports" / "lora")
    shutil.copy(trained["out"] / "tools" / "lora" / "best.safetensors", out / "sports" / "lora" / "best.safetensors")
    again = run_cli("train.py", [*flags, "--method", "xcross"])
    assert again.returncode == 0, again.stdout + again.stderr
    assert "was built on files that have changed since (source sports" in again.stdout
    after = json.loads((xcross / "inputs.json").read_text())
    assert after["sources"][0]["sha256"] != before["sources"][0]["sha256"]
    assert after["sources"][1]["sha256"] == before["sources"][1]["sha256"]  # tools: the same file, moved
    assert run_cli("evaluate.py", [*flags, "--methods", "xcross"]).returncode == 0


def test_resume_over_a_changed_source_is_refused(trained, tmp_path):
    out, flags = copy_runs(trained, tmp_path)
    xcross = out / TARGET / "xcross"
    shutil.rmtree(xcross)
    stopped = interrupt_when([sys.executable, "train.py", *flags, "--method", "xcross"],
                             (xcross / "ckpt" / "LATEST").is_file)
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    source = out / "sports" / "lora" / "best.safetensors"
    source.write_bytes(source.read_bytes() + b" ")  # another file now: its sha256 changed
    line = one_line_error(run_cli("train.py", [*flags, "--method", "xcross", "--resume"]))
    assert "holds an interrupted run built on files that have changed since (source sports" in line


def test_one_run_per_directory(trained, tmp_path):
    """The README's example of changing one setting, aimed at a finished run's directory: refused, nothing in it
    touched; --replace replaces it as a whole (no checkpoint of the old run left)."""
    out, flags = copy_runs(trained, tmp_path)
    run = out / TARGET / "lora"
    kept = files_of(run)
    proc = run_cli("train.py", ["--config", str(run / "config.json"), "--lr", "0.0003", "--quiet"])
    line = one_line_error(proc)
    assert "holds a run trained otherwise (train.lr: 0.001 there, 0.0003 here)" in line
    assert "another --out" in line and "--replace" in line
    assert files_of(run) == kept
    # the same settings again: kept, not trained into
    same = run_cli("train.py", ["--config", str(run / "config.json"), "--quiet"])
    assert same.returncode == 0 and "has finished with these settings" in same.stdout, same.stdout + same.stderr
    assert files_of(run) == kept
    replaced = run_cli("train.py", ["--config", str(run / "config.json"), "--lr", "0.0003", "--quiet", "--replace"])
    assert replaced.returncode == 0, replaced.stdout + replaced.stderr
    assert json.loads((run / "config.json").read_text())["train"]["lr"] == 0.0003
    old_steps = {p for p in kept if p.startswith("ckpt/step-")}
    new_steps = {str(p.relative_to(run)) for p in run.rglob("ckpt/step-*/*")}
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps))  # one run's log, not two interleaved
    weights = {p for p in new_steps & old_steps if p.endswith("trained.safetensors")}
    assert weights and all(files_of(run)[p] != kept[p] for p in weights)  # every checkpoint is the new run's


def test_an_interrupted_run_is_continued_only_when_asked(trained, tmp_path, setup):
    out = tmp_path / "runs"
    flags = common_flags(setup["world"], setup["model"], out, target=TARGET, method="lora",
                         **{**SMALL, "max_train_users": 24})
    run = out / TARGET / "lora"
    stopped = interrupt_when([sys.executable, "train.py", *flags], (run / "ckpt" / "LATEST").is_file)
    assert stopped.returncode == 130, stopped.stderr
    assert "continue it with --resume, or start it over with --replace" in one_line_error(run_cli("train.py", flags))
    assert run_cli("train.py", [*flags, "--resume"]).returncode == 0


def test_a_run_missing_a_file_it_needs_is_not_finished(trained, tmp_path):
    out, flags = copy_runs(trained, tmp_path)
    run = out / TARGET / "lora"
    (run / "best.safetensors").unlink()
    proc = run_cli("train.py", [*flags, "--method", "lora", "--resume"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "a file it needs is missing or damaged (best.safetensors): training it again" in proc.stdout
    assert (run / "best.safetensors").is_file()


def test_the_study_and_the_curve_check_their_inputs_before_training(setup, tmp_path, capsys):
    out = tmp_path / "runs"
    flags = common_flags(setup["world"], setup["model"], out, target=TARGET, **SMALL)
    for extra, message in ((["--fractions", "0.5,0.5,1"], "--fractions names a fraction twice"),
                           (["--reference", "lora@0.3"], "--reference 'lora@0.3' is not part of the study"),
                           (["--seeds", "0,0"], "--seeds must be distinct")):
        line = one_line_error(run_cli("-m", ["xcross.cli.study", *flags, *extra]))
        assert message in line
    assert evaluate_cli.main([*flags, "--curve", "--methods", "lora"]) == 2
    assert "--methods chooses the rows of a comparison" in capsys.readouterr().err
    assert evaluate_cli.main([*flags, "--curve", "--fractions", "0.5,0.5"]) == 2
    assert not out.exists()  # nothing trained, nothing written


# -- a run directory of the earlier format -----------------------------------------------------------------------


def written_by_the_earlier_version(run: Path) -> dict:
    """Rewrite a run directory as the release before run identity wrote it: config.json without "given" and
    "from_preset" but with the three options since removed at their defaults, no inputs.json, test scores
    without their identity."""
    config = json.loads((run / "config.json").read_text())
    for key in ("given", "from_preset"):
        config.pop(key)
    config["model"]["xcross"].update({"bound": None, "mix_at": "block"})
    config["train"]["schedule"] = "linear"
    (run / "config.json").write_text(json.dumps(config, indent=2))
    (run / "inputs.json").unlink()
    with np.load(run / "test_scores.npz") as z:
        np.savez(run / "test_scores.npz", scores=z["scores"], labels=z["labels"], user_ids=z["user_ids"])
    return config


def test_a_run_directory_of_the_earlier_format_is_read_or_refused(trained, tmp_path, capsys):
    out, flags = copy_runs(trained, tmp_path)
    run = out / TARGET / "lora"
    now = json.loads((run / "config.json").read_text())
    old = written_by_the_earlier_version(run)
    # its settings read correctly: every value the same
    read = RunConfig.from_dict(old).to_dict()
    assert {k: v for k, v in read.items() if k not in ("given", "from_preset")} == \
        {k: v for k, v in now.items() if k not in ("given", "from_preset")}
    # what needs the files it was built on is refused, saying how to bring it up to date
    assert evaluate_cli.main([*flags, "--methods", "lora"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "written by an earlier version of xcross (no inputs.json" in err
    assert f"xcross-train --config {run}/config.json --replace" in err
    # ... and that command does
    assert train_cli.main(["--config", str(run / "config.json"), "--replace", "--quiet"]) == 0
    assert evaluate_cli.main([*flags, "--methods", "lora"]) == 0
    # an option since removed, at another value than it defaulted to, is refused by name
    with pytest.raises(UsageError, match="model.xcross.mix_at = \"sublayer\" is an option this version removed"):
        RunConfig.from_dict({**old, "model": {**old["model"], "xcross": {**old["model"]["xcross"],
                                                                          "mix_at": "sublayer"}}})


def test_a_setting_added_later_keeps_the_identity_of_the_runs_recorded_before_it(trained, tmp_path, capsys):
    """`data.source_train_users` came after runs were recorded: a config.json without it is the same run (kept,
    not trained again); given, it is part of X-Cross's identity (it picks the sources) and of no LoRA run's."""
    out, flags = copy_runs(trained, tmp_path)
    for run in (out / TARGET).iterdir():
        config = json.loads((run / "config.json").read_text())
        del config["data"]["source_train_users"]
        (run / "config.json").write_text(json.dumps(config, indent=2))
    before = {m: files_of(out / TARGET / m) for m in ("lora", "xcross")}
    for method, extra in (("lora", []), ("xcross", []), ("lora", ["--source-train-users", "5"])):
        assert train_cli.main([*flags, "--method", method, *extra]) == 0
        assert files_of(out / TARGET / method) == before[method], (method, extra)
    capsys.readouterr()
    assert train_cli.main([*flags, "--method", "xcross", "--source-train-users", "5"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.source_train_users: None there, 5 here" in err, err
    assert files_of(out / TARGET / "xcross") == before["xcross"]


def test_more_target_users_on_the_same_source_adapters(trained, tmp_path, capsys):
    """--max-train-users changes the target's users; with --source-train-users at the sources' own count, X-Cross
    is built on the very source adapters trained before (reused, not trained again) and trains on more users."""
    out, flags = copy_runs(trained, tmp_path)
    sources = {d: (out / d / "lora" / "best.safetensors").read_bytes() for d in ("sports", "tools")}
    args = [*flags, "--method", "xcross", "--max-train-users", "12", "--source-train-users", "8"]
    assert train_cli.main([*args, "--replace"]) == 0
    said = capsys.readouterr().out
    assert "source sports: reusing" in said and "source tools: reusing" in said and "training a LoRA" not in said
    assert {d: (out / d / "lora" / "best.safetensors").read_bytes() for d in sources} == sources
    inputs = json.loads((out / TARGET / "xcross" / "inputs.json").read_text())
    assert [s["sha256"] for s in inputs["sources"]] == [hashlib.sha256(sources[d]).hexdigest()
                                                        for d in ("sports", "tools")]
    results = json.loads((out / TARGET / "xcross" / "results.json").read_text())
    assert results["training"]["train_examples"] == 12  # one example per user (the tiny world has 100 users)
    before = json.loads((trained["out"] / TARGET / "xcross" / "results.json").read_text())
    assert before["training"]["train_examples"] == 8
