"""The study command on a tiny model and world: it trains every run of an arrangement for two seeds, reports paired
differences and verdicts, and an interrupted study continued by the same command gives the same report."""

from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from tests.pipeline_fixtures import common_flags, interrupt_when, run_cli, tiny_setup
from xcross import experiment
from xcross.experiment import evaluate_run, finished_results
from xcross.rundir import RunDir
from xcross.settings import RunConfig, UsageError
from xcross.study import Study, _crossing, _strict_json, build_report, collect, data_efficiency, format_markdown

TINY_STUDY = dict(target="toys", sources="sports,tools", max_train_users=16, max_examples_per_user=1,
                  max_eval_users=16, max_valid_users=8, batch_size=4, epochs=1, history_len=3, title_tokens=8,
                  train_candidates=4, checkpoint_every=1, log_every=1, fractions="0.5,1", seeds="0,1")
VERDICTS = {"holds", "does not hold", "undecided at this size"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    return tiny_setup(tmp_path_factory, "study")


def study_args(setup, out):
    return ["-m", "xcross.cli.study", *common_flags(setup["world"], setup["model"], out, **TINY_STUDY)]


@pytest.fixture(scope="module")
def straight(setup):
    out = setup["root"] / "straight"
    proc = run_cli("-m", study_args(setup, out)[1:], timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def test_study_report(straight):
    study = straight / "toys" / "study"
    report = json.loads((study / "report.json").read_text())
    labels = [r["method"] for r in report["rows"]]
    assert labels == ["popularity", "source:sports", "source:tools", "lora@1", "xcross@1", "lora@0.5", "xcross@0.5",
                      "merge", "ensemble"]
    for row in report["rows"]:
        assert row["users"] == 16 and row["seeds"] == (1 if row["method"] == "popularity" else 2)
        assert len(row["hit@1_per_seed"]) == row["seeds"]
        assert row["hit@1"]["mean"] == pytest.approx(sum(row["hit@1_per_seed"]) / row["seeds"], abs=1e-9)
    assert {p["method"] for p in report["paired"]} == set(labels) - {"lora@1"}
    assert all(-1 <= p["hit@1"]["low"] <= p["hit@1"]["diff"] <= p["hit@1"]["high"] <= 1 for p in report["paired"])
    assert [c["verdict"] in VERDICTS for c in report["claims"]] == [True, True]  # no 0.1/0.25: no data claim

    def hit1(run: str):  # per-user Hit@1 by hand, a tie at the top shared
        saved = np.load(straight / "toys" / run / "test_scores.npz")
        scores, labels = saved["scores"], saved["labels"]
        true = scores[np.arange(len(labels)), labels]
        return (true >= scores.max(1)) / (scores == true[:, None]).sum(1)

    assert [p["fraction"] for p in report["same_fraction"]] == [0.5, 1.0]
    for p in report["same_fraction"]:
        runs = {m: [f"{m}{'' if p['fraction'] == 1 else '-f0.5'}{s}" for s in ("", "-s1")] for m in ("xcross", "lora")}
        want = np.mean([hit1(r) for r in runs["xcross"]], 0) - np.mean([hit1(r) for r in runs["lora"]], 0)
        assert p["hit@1"]["diff"] == pytest.approx(want.mean(), abs=1e-9)
        assert p["hit@1"]["low"] <= p["hit@1"]["diff"] <= p["hit@1"]["high"]
    assert "X-Cross against LoRA trained on the same fraction" in (study / "report.md").read_text()
    assert (study / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Claims" in (study / "report.md").read_text()
    # every seed trained into a directory of its own, sources included
    for name in ("lora", "lora-s1", "xcross-f0.5", "xcross-f0.5-s1", "ensemble-s1"):
        assert (straight / "toys" / name / "results.json").is_file(), name
    assert (straight / "sports" / "lora-s1" / "best.safetensors").is_file()


def test_interrupted_study_resumes_to_the_same_report(setup, straight):
    out = setup["root"] / "interrupted"
    running = out / "toys" / "ensemble" / "ckpt" / "LATEST"  # the 4th run of seed 0, mid-training
    stopped = interrupt_when([sys.executable, *study_args(setup, out)], running.is_file, timeout=600)
    assert stopped.returncode == 130, stopped.stdout + stopped.stderr
    assert not (out / "toys" / "ensemble" / "results.json").exists()
    # both seeds: the reference of seed 1 has not been trained, so there is nothing to compare with
    early = run_cli("-m", [*study_args(setup, out)[1:], "--report-only"], timeout=300)
    assert early.returncode == 2 and "the reference lora@1 has not finished yet" in early.stderr, early.stderr
    # seed 0 alone: lora@1, xcross@1 and merge finished; the report covers them and trains nothing
    partial = run_cli("-m", [*study_args(setup, out)[1:], "--report-only", "--seeds", "0"], timeout=300)
    assert partial.returncode == 0, partial.stdout + partial.stderr
    assert not (out / "toys" / "ensemble" / "results.json").exists()
    report = json.loads((out / "toys" / "study" / "report.json").read_text())
    assert report["missing"] == ["lora@0.5", "xcross@0.5", "ensemble"]
    assert [r["method"] for r in report["rows"]] == ["popularity", "source:sports", "source:tools", "lora@1",
                                                     "xcross@1", "merge"]
    full = {r["method"]: r for r in json.loads((straight / "toys" / "study" / "report.json").read_text())["rows"]}
    for row in report["rows"]:  # the same scores as seed 0 of the uninterrupted study
        assert row["hit@1_per_seed"] == full[row["method"]]["hit@1_per_seed"][:1], row["method"]
    match, beats = report["claims"]
    assert match["verdict"] in VERDICTS and beats == {"claim": beats["claim"], "evidence": {},
                                                      "verdict": "not yet measured", "missing": ["ensemble"]}
    assert "**Partial report**: not finished yet: lora@0.5, xcross@0.5, ensemble" in \
        (out / "toys" / "study" / "report.md").read_text()
    resumed = run_cli("-m", study_args(setup, out)[1:], timeout=900)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed from" in resumed.stdout and "study: training lora@1 (seed 0)" not in resumed.stdout  # finished: skipped
    got = json.loads((out / "toys" / "study" / "report.json").read_text())
    want = json.loads((straight / "toys" / "study" / "report.json").read_text())
    assert got == want


def test_sources_left_at_their_default_are_the_other_domains_in_the_report(straight):
    """A study whose sources are left out (every other domain) reports them, and compares X-Cross with each source's
    zero-shot in the baselines claim, as when they are named: the same report as the straight study's."""
    named = RunDir.load(straight / "toys" / "xcross").config()  # the study's base: seed 0, every target user
    assert named.sources == ("sports", "tools")
    study = Study(replace(named, sources=()), fractions=(0.5, 1.0), seeds=(0, 1))
    results, missing, records = collect(study, progress=False, finished_only=True)
    report = json.loads(json.dumps(_strict_json(build_report(study, results, missing, records))))
    assert report["sources"] == ["sports", "tools"]
    beats = report["claims"][1]["evidence"]
    assert {"xcross@1 - source:sports", "xcross@1 - source:tools"} <= beats.keys()
    assert report == json.loads((straight / "toys" / "study" / "report.json").read_text())


def test_a_study_run_again_with_other_evaluation_settings_rescores_or_refuses(setup, straight, tmp_path):
    """Over a finished study, other candidates or test users are scored anew (a new report that says what it was
    scored on, never the old one again); another evaluation seed changes the users the runs selected on, so it is
    refused before anything is scored."""
    out = tmp_path / "copy"
    shutil.copytree(straight, out)
    before = json.loads((out / "toys" / "study" / "report.json").read_text())
    assert before["candidates"] == 20 and before["test_users"] == 16
    proc = run_cli("-m", [*study_args(setup, out)[1:], "--num-candidates", "10", "--max-eval-users", "12"],
                   timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "study: training" not in proc.stdout  # every run is reused, and scored again
    after = json.loads((out / "toys" / "study" / "report.json").read_text())
    assert after["candidates"] == 10 and after["test_users"] == 12 and after["scored"] != before["scored"]
    assert all(r["users"] == 12 for r in after["rows"])
    assert "12 test users of toys (drawn with eval seed 0), 10 candidates each" in \
        (out / "toys" / "study" / "report.md").read_text()
    # popularity and the zero-shots were scored again too: their evidence says so
    for name in ("popularity", "source-sports-s0", "source-tools-s1"):
        scored = json.loads((out / "toys" / "study" / "evidence" / f"{name}.json").read_text())["evaluation"]
        assert (scored["users"], scored["candidates"], scored["scored"]) == (12, 10, after["scored"])
    refused = run_cli("-m", [*study_args(setup, out)[1:], "--eval-seed", "1"], timeout=300)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1, refused.stderr
    assert "holds a run trained otherwise" in refused.stderr and "validation users" in refused.stderr


def _flags_without_data(setup, out: Path) -> list[str]:
    """The straight study's flags with the data, the base model and the runs all elsewhere (nowhere)."""
    flags = common_flags(setup["world"], setup["model"], out, **TINY_STUDY)
    for flag, gone in (("--data-dir", "no-data"), ("--model-dir", "no-model")):
        flags[flags.index(flag) + 1] = str(out.parent / gone)
    return flags


def test_the_report_rebuilt_from_the_evidence_alone_equals_the_one_written_with_the_runs(setup, straight, tmp_path):
    written = straight / "toys" / "study"
    committed = tmp_path / "docs" / "study" / "toys"
    committed.mkdir(parents=True)
    shutil.copytree(written / "evidence", committed / "evidence")
    assert len(list((committed / "evidence").glob("*.json"))) == 1 + 2 * 2 + 2 * 6  # popularity, zero-shots, runs
    proc = run_cli("-m", ["xcross.cli.study", *_flags_without_data(setup, tmp_path / "runs"), "--report-only",
                          "--study-dir", str(committed)], timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists() and not (tmp_path / "no-data").exists()
    for name in ("report.json", "report.md"):
        assert (committed / name).read_text() == (written / name).read_text(), name
    # an evidence file edited by hand is refused by name, not silently scored over
    (committed / "evidence" / "merge-s1.json").write_text("{")
    refused = run_cli("-m", ["xcross.cli.study", *_flags_without_data(setup, tmp_path / "runs"), "--report-only",
                             "--study-dir", str(committed)], timeout=300)
    assert refused.returncode == 2 and "merge-s1.json is damaged" in refused.stderr, refused.stderr


def test_a_study_continued_from_its_evidence_trains_only_what_it_does_not_hold(setup, straight, tmp_path):
    """Another machine: an empty runs directory, the committed evidence without one run (ensemble, seed 1). Only
    that run is trained (with the two source adapters of its seed it needs), and the report is the same."""
    committed = tmp_path / "study"
    shutil.copytree(straight / "toys" / "study" / "evidence", committed / "evidence")
    (committed / "evidence" / "ensemble-s1.json").unlink()
    proc = run_cli("-m", [*study_args(setup, tmp_path / "runs")[1:], "--study-dir", str(committed)], timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trained = [line for line in proc.stdout.splitlines() if line.startswith("study: training")]
    assert len(trained) == 1 and trained[0].startswith("study: training ensemble (seed 1)"), trained
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["sports", "tools", "toys"]
    assert sorted(p.name for p in (tmp_path / "runs" / "toys").iterdir()) == ["ensemble-s1"]
    got = json.loads((committed / "report.json").read_text())
    want = json.loads((straight / "toys" / "study" / "report.json").read_text())
    rows = {r["method"]: r for r in got["rows"]}
    for row in want["rows"]:  # what the evidence held is read back exactly; seed 0 of ensemble too
        if row["method"] == "ensemble":
            assert rows["ensemble"]["hit@1_per_seed"][0] == row["hit@1_per_seed"][0]
        else:
            assert rows[row["method"]] == row
    # seed 1's sources were trained again here: the report says that its ensemble is built on other adapter
    # files than the ones scored zero-shot (tiny numeric differences make other bytes)
    ensemble = json.loads((committed / "evidence" / "ensemble-s1.json").read_text())["inputs"]["sources"]
    same = all(s["sha256"] == json.loads((committed / "evidence" / f"source-{s['domain']}-s1.json").read_text())
               ["weights"] for s in ensemble)
    assert got["provenance"]["seeds"] == {"0": {"runs_built_on_the_zero_shot_adapters": True},
                                          "1": {"runs_built_on_the_zero_shot_adapters": same}}


def test_crossing_by_hand():
    fractions = [0.1, 0.25, 1.0]
    # halfway between 0.1 and 0.25 in log fraction: sqrt(0.1 * 0.25)
    assert _crossing(fractions, [0.2, 0.4, 0.5], 0.3) == pytest.approx(math.sqrt(0.025))
    assert _crossing(fractions, [0.2, 0.4, 0.5], 0.1) == 0.1  # already above at the smallest fraction
    assert _crossing(fractions, [0.2, 0.4, 0.5], 0.6) == math.inf  # never reached


def test_data_efficiency_beyond_the_measured_range():
    """X-Cross at 25% hits the users LoRA on 100% misses: in most resamples LoRA's curve never gets there, so the
    interval's upper end is "more than 1", written as such, and report.json stays strict JSON."""
    hits = np.zeros(40)
    lora_all, xcross = hits.copy(), hits.copy()
    lora_all[:18], xcross[18:38] = 1, 1  # LoRA@1 0.45 < X-Cross@0.25 0.5; the same users never hit both
    per_user = {"lora@0.25": {"hit@1": hits}, "lora@1": {"hit@1": lora_all}, "xcross@0.25": {"hit@1": xcross}}
    e = data_efficiency(Study(RunConfig(), fractions=(0.25, 1.0)), per_user, 0.25, bootstrap=400)
    # By hand: LoRA@0.25 is 0, so where LoRA@1's mean m reaches X-Cross's t the crossing is 0.25 * 4^(t/m).
    draws = []
    for idx in np.random.default_rng(0).integers(0, 40, size=(400, 40)):
        t, m = xcross[idx].mean(), lora_all[idx].mean()
        draws.append(0.25 * 4 ** (t / m) if m >= t else math.inf)
    draws.sort()
    assert e["lora_fraction_needed"] == math.inf and e["high"] == math.inf
    assert e["never_reached_share"] == pytest.approx(np.mean(np.isinf(draws)))
    assert e["low"] == pytest.approx(draws[math.ceil(0.025 * 400) - 1]) and 0.25 < e["low"] < 1
    claim = {"claim": "data", "verdict": "holds", "evidence": {"0.25": e}}
    report = {"sources": ["a"], "target": "b", "test_users": 40, "seeds": [0], "rows": [], "reference": "lora@1",
              "paired": [], "parameters": None, "claims": [claim], "fractions": [0.25, 1.0]}
    line = next(line for line in format_markdown(report).splitlines() if "LoRA needs" in line)
    assert "LoRA needs > 1 [" in line and line.split("[")[1].split("]")[0].endswith("> 1") and "nan" not in line

    def refuse(constant):
        raise ValueError(constant)

    text = json.dumps(_strict_json(report), allow_nan=False)
    assert json.loads(text, parse_constant=refuse)["claims"][0]["evidence"]["0.25"]["high"] is None


def test_a_source_adapter_is_the_lora_run_of_the_arrangement_that_targets_its_domain(straight, monkeypatch):
    source = RunDir.load(straight / "sports" / "lora").config()  # trained as a source of the toys arrangement
    assert source.sources == () and source.method == "lora"
    as_lora = replace(source, sources=("toys", "tools"))  # the `lora` run of the arrangement toys,tools -> sports
    results = finished_results(as_lora)
    assert results is not None and results["completed"] and results["test"] is None  # reused, tested when compared
    run_dir = RunDir.load(straight / "sports" / "lora")
    assert not run_dir.file("test_scores.npz").exists()
    scored, _ = evaluate_run(as_lora, run_dir, progress=False)
    assert scored.scores.shape == (16, as_lora.data.num_candidates)
    monkeypatch.setattr(experiment, "model_from_run", None)  # scored once: the second time is read back
    again, _ = evaluate_run(as_lora, run_dir, progress=False)
    assert (again.scores == scored.scores).all() and again.user_ids == scored.user_ids
    xcross = RunDir.load(straight / "toys" / "xcross").config()
    with pytest.raises(UsageError, match="holds a run trained otherwise .*sources"):  # X-Cross does read them
        finished_results(replace(xcross, sources=("tools", "sports")))


def test_a_study_of_some_methods_on_more_target_users(setup, straight, tmp_path):
    """The larger run of an arrangement: LoRA, X-Cross and ensemble only, on more target users than the study's,
    built on the study's own source adapters (--source-train-users): only those three are trained, the sources are
    reused, and the baselines claim is judged against the baselines that were run."""
    out = tmp_path / "runs"
    for domain in ("sports", "tools"):
        shutil.copytree(straight / domain / "lora", out / domain / "lora")
    larger = {**TINY_STUDY, "fractions": "1", "seeds": "0", "max_train_users": 24, "source_train_users": 16}
    refused = run_cli("-m", ["xcross.cli.study", *common_flags(setup["world"], setup["model"], out, **larger),
                             "--methods", "lora,merge"])
    assert refused.returncode == 2 and "include xcross" in refused.stderr, refused.stderr
    proc = run_cli("-m", ["xcross.cli.study", *common_flags(setup["world"], setup["model"], out, **larger),
                          "--methods", "lora,xcross,ensemble"], timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trained = [line.split(" (")[0] for line in proc.stdout.splitlines() if line.startswith("study: training")]
    assert trained == ["study: training lora@1", "study: training xcross@1", "study: training ensemble"]
    assert "training a LoRA adapter" not in proc.stdout and proc.stdout.count(": reusing") >= 2
    report = json.loads((out / "toys" / "study" / "report.json").read_text())
    assert [r["method"] for r in report["rows"]] == ["popularity", "source:sports", "source:tools", "lora@1",
                                                      "xcross@1", "ensemble"]
    before = {r["method"]: r for r in json.loads((straight / "toys" / "study" / "report.json").read_text())["rows"]}
    for row in report["rows"][:3]:  # the same adapters on the same users: the straight study's seed 0
        assert row["hit@1_per_seed"][0] == before[row["method"]]["hit@1_per_seed"][0], row["method"]
    match, baselines = report["claims"]
    assert match["claim"].startswith("X-Cross matches a LoRA") and "(ensemble, each source zero-shot)" in \
        baselines["claim"]
    assert set(baselines["evidence"]) == {"xcross@1 - ensemble", "xcross@1 - source:sports",
                                          "xcross@1 - source:tools"}
    for run, users in (("xcross", 24), ("lora", 24)):
        assert json.loads((out / "toys" / run / "results.json").read_text())["training"]["train_examples"] == users
