"""Using a trained run: Recommender.from_run of every method reproduces the scores evaluation stored for it,
xcross-rank's output does too (malformed lines counted, --strict refusing), and xcross-inspect plots what a run has."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.pipeline_fixtures import common_flags, make_model_dir, make_world, one_thread_fixture, read_jsonl
from xcross.cli import inspect as inspect_cli
from xcross.cli import rank as rank_cli
from xcross.cli import train as train_cli
from xcross.data import load_domain
from xcross.experiment import eval_examples
from xcross.inspection import inspect_run
from xcross.recommender import Recommender
from xcross.settings import RunConfig, UsageError

TARGET = "toys"
SOURCES = ["sports", "tools"]
METHODS = ("xcross", "lora", "head", "merge", "ensemble")  # xcross first: it trains the two source LoRAs
# As test_pipeline's: every run takes seconds (24 training users in 3 steps; 24 validation and test users).
SMALL = dict(max_train_users=24, max_eval_users=24, batch_size=8, epochs=1, history_len=3, title_tokens=8,
             train_candidates=4)
PNG = b"\x89PNG\r\n\x1a\n"


_one_thread = one_thread_fixture()


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recommender")
    world = make_world(root / "world")
    model = make_model_dir(root / "model", world)
    out = root / "runs"
    for method in METHODS:
        code = train_cli.main(common_flags(world, model, out, target=TARGET, method=method, **SMALL))
        assert code == 0, method
    return {"root": root, "world": world, "model": model, "out": out}


def run_dir(setup, method: str) -> Path:
    return setup["out"] / TARGET / method


def stored_test_users(setup, method: str):
    """The run's test users in test_scores.npz's order (its evaluation subsample), and the stored scores."""
    config = RunConfig.from_dict(json.loads((run_dir(setup, method) / "config.json").read_text()))
    domain = load_domain(setup["world"] / TARGET)
    users = eval_examples(domain, "test", config)
    stored = np.load(run_dir(setup, method) / "test_scores.npz")
    assert [e.user_id for e in users] == [str(u) for u in stored["user_ids"]]
    return domain, users, stored["scores"]


@pytest.mark.parametrize("method", METHODS)
def test_from_run_reproduces_the_stored_test_scores(setup, method):
    """Titles in, evaluation's scores out: the model of each method rebuilt from its run directory alone, fed the
    test users' titles (every stored history item: the recommender keeps the newest history_len itself)."""
    domain, users, stored = stored_test_users(setup, method)
    rec = Recommender.from_run(run_dir(setup, method))
    assert (rec.builder.title_tokens, rec.builder.history_len, rec.batch_size) == (8, 3, 8)
    titles = [([domain.items[i] for i in e.history], [domain.items[c] for c in e.candidates]) for e in users]
    scores = np.array(rec.score_batch(titles))
    np.testing.assert_allclose(scores, stored, atol=1e-5, rtol=0)
    assert np.abs(scores - stored).max() == 0  # same users, same batches: the same computation

    # rank: the same scores, best first; another batch size changes nothing beyond rounding.
    ranked = rec.rank(*titles[0])
    assert [s for _, s in ranked] == sorted(scores[0].tolist(), reverse=True)
    assert sorted(t for t, _ in ranked) == sorted(titles[0][1])
    rec.batch_size = 5
    np.testing.assert_allclose(np.array([[s for _, s in r] for r in rec.rank_batch(titles)]),
                               -np.sort(-stored, axis=1), atol=1e-5, rtol=0)


def copy_run_onto(setup, method: str, tmp_path: Path, model_dir: Path) -> Path:
    """A copy of a finished run under tmp_path whose config.json names another base model directory."""
    copy = tmp_path / "runs" / TARGET / method
    shutil.copytree(run_dir(setup, method), copy, ignore=shutil.ignore_patterns("ckpt"))
    config = json.loads((copy / "config.json").read_text())
    config["out"], config["model"]["model_dir"] = str(tmp_path / "runs"), str(model_dir)
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def test_from_run_refuses_missing_or_foreign_adapters(setup, tmp_path):
    adapter = setup["out"] / SOURCES[0] / "lora" / "best.safetensors"
    aside = adapter.with_name("aside.safetensors")
    adapter.rename(aside)
    try:
        with pytest.raises(UsageError, match=re.escape(f"missing: {adapter}")):
            Recommender.from_run(run_dir(setup, "xcross"))
    finally:
        aside.rename(adapter)

    # The run's config pointed at a base of another width: its source adapters do not fit, and the error names one.
    other = make_model_dir(tmp_path / "other-model", setup["world"], hidden_size=48)
    copy = copy_run_onto(setup, "xcross", tmp_path, other)
    with pytest.raises(UsageError, match=re.escape(f"{adapter} was trained on another base model")):
        Recommender.from_run(copy)
    with pytest.raises(UsageError, match="is not a run directory"):
        Recommender.from_run(tmp_path)


def test_from_run_names_a_damaged_base(setup, tmp_path):
    damaged = tmp_path / "model"
    shutil.copytree(setup["model"], damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as an interrupted copy leaves it
    copy = copy_run_onto(setup, "lora", tmp_path, damaged)
    with pytest.raises(UsageError, match=re.escape(f"cannot load the base model in {damaged}")):
        Recommender.from_run(copy)


# -- xcross-rank -----------------------------------------------------------------------------------------------------


def test_rank_command_reproduces_evaluation_and_counts_bad_lines(setup, tmp_path, capsys):
    """The domain's test users as item ids (the run's own data and target by default), with malformed lines
    among them: every good line ranked with evaluation's scores, every bad one counted and named."""
    domain, users, stored = stored_test_users(setup, "xcross")
    lines = [json.dumps({"user_id": e.user_id, "history": e.history, "candidates": e.candidates}) for e in users]
    bad = {3: "{not json", 7: json.dumps({"history": users[0].history}),
           11: json.dumps({"history": [], "candidates": users[0].candidates}),
           15: json.dumps({"history": ["no-such-item"], "candidates": users[0].candidates})}
    for number in sorted(bad):
        lines.insert(number - 1, bad[number])
    source = tmp_path / "users.jsonl"
    source.write_text("\n".join(lines) + "\n")
    output = tmp_path / "ranked.jsonl"

    args = ["--run", str(run_dir(setup, "xcross")), "--input", str(source), "--output", str(output), "--ids",
            "--quiet"]
    assert rank_cli.main(args) == 0
    captured = capsys.readouterr()
    assert f"ranked {len(users)} users" in captured.out
    assert "skipped 4 malformed line(s)" in captured.err
    for number, why in ((3, "not JSON"), (7, "no 'candidates'"), (11, "'history' must be a non-empty list"),
                        (15, "unknown item id(s) in history: 'no-such-item'")):
        assert f"line {number}: {why}" in captured.err

    rows = read_jsonl(output)
    assert [r["user_id"] for r in rows] == [e.user_id for e in users]
    assert not {r["line"] for r in rows} & set(bad)
    for row, e, want in zip(rows, users, stored):
        scores = {entry["item_id"]: entry["score"] for entry in row["ranked"]}
        assert all(entry["title"] == domain.items[entry["item_id"]] for entry in row["ranked"])
        np.testing.assert_allclose([scores[c] for c in e.candidates], want, atol=1e-5, rtol=0)
        assert [entry["score"] for entry in row["ranked"]] == sorted(want.tolist(), reverse=True)

    # --top-k keeps the best K; --strict stops at the first bad line, naming it, and writes nothing.
    assert rank_cli.main([*args, "--top-k", "3", "--output", str(tmp_path / "top.jsonl")]) == 0
    assert all(len(r["ranked"]) == 3 for r in read_jsonl(tmp_path / "top.jsonl"))
    capsys.readouterr()
    assert rank_cli.main([*args, "--strict", "--output", str(tmp_path / "strict.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{source} line 3: not JSON" in err
    assert not (tmp_path / "strict.jsonl").exists()


def test_rank_command_takes_titles(setup, tmp_path, capsys):
    domain, users, stored = stored_test_users(setup, "lora")
    e = users[0]
    source = tmp_path / "users.jsonl"
    source.write_text(json.dumps({"history": [domain.items[i] for i in e.history],
                                  "candidates": [domain.items[c] for c in e.candidates]}) + "\n")
    args = ["--run", str(run_dir(setup, "lora")), "--input", str(source), "--output", str(tmp_path / "out.jsonl"),
            "--quiet"]
    assert rank_cli.main(args) == 0
    (row,) = read_jsonl(tmp_path / "out.jsonl")
    assert row["user_id"] is None and row["line"] == 1 and "item_id" not in row["ranked"][0]
    assert [r["score"] for r in row["ranked"]] == sorted(stored[0].tolist(), reverse=True)
    assert rank_cli.main([*args, "--domain", TARGET]) == 2
    assert "need --ids" in capsys.readouterr().err


# -- xcross-inspect --------------------------------------------------------------------------------------------------


def test_inspect_xcross_run(setup):
    written = inspect_run(run_dir(setup, "xcross"))
    inspect = run_dir(setup, "xcross") / "inspect"
    names = ["training.png", "coefficients.png", "growth.png", "stream_weights.png", "summary.md"]
    assert written == [inspect / n for n in names]
    for path in written[:-1]:
        assert path.read_bytes()[:8] == PNG, path
    text = written[-1].read_text()
    assert "## Integrator coefficients (best checkpoint, 8 validation users)" in text
    assert ("sports ← tools" in text or "tools ← sports" in text) and "## Stream weights" in text
    assert "Not available" not in text


def test_inspect_says_what_a_lora_run_lacks(setup, capsys):
    assert inspect_cli.main(["--run", str(run_dir(setup, "lora"))]) == 0
    out = capsys.readouterr().out
    assert "integrators: method lora has none" in out and "stream weights: method lora has one stream" in out
    inspect = run_dir(setup, "lora") / "inspect"
    assert sorted(p.name for p in inspect.iterdir()) == ["summary.md", "training.png"]
    assert (inspect / "training.png").read_bytes()[:8] == PNG


def test_inspect_without_matplotlib(setup, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    written = inspect_run(run_dir(setup, "ensemble"), tmp_path / "inspect")
    assert written == [tmp_path / "inspect" / "summary.md"]
    text = written[0].read_text()
    assert "matplotlib is not installed" in text and "integrators: method ensemble has none" in text
    assert "## Stream weights" in text
