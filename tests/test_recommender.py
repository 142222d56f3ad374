"""Using a trained run: Recommender.from_run of every method reproduces the scores evaluation stored for it, and
scores a user's many candidates in bounded sequences with the same scores; xcross-rank's output does too (malformed
lines counted, --strict refusing), it never writes over its input, reads what a user's editor writes, stops cleanly
and finds a run's data from anywhere; and xcross-inspect plots what a run has."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.pipeline_fixtures import (REPO, cli_env, common_flags, interrupt_when, make_model_dir, make_world,
                                     one_thread_fixture, read_jsonl, world_titles)
from xcross.cli import inspect as inspect_cli
from xcross.cli import rank as rank_cli
from xcross.cli import train as train_cli
from xcross.data import collate_unpacked, load_domain
from xcross.experiment import eval_examples
from xcross.inspection import inspect_run
from xcross.recommender import TOKENS_PER_SEQUENCE, Recommender
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


def many_titles(setup, count: int) -> list[str]:
    """`count` distinct titles: the world's, then the same with a number appended."""
    titles = world_titles(setup["world"])
    return [t if k == 0 else f"{t} {k}" for k in range(-(-count // len(titles))) for t in titles][:count]


def test_many_candidates_are_scored_in_bounded_sequences(setup):
    """300 candidates behind one history go in sequences of at most `max_candidates` (each within
    TOKENS_PER_SEQUENCE tokens) with the scores of one sequence holding them all, and of each candidate alone after
    the history (the brute-force reference); users with few and many candidates mix in one call."""
    rec = Recommender.from_run(run_dir(setup, "xcross"))
    titles = many_titles(setup, 300)
    users = [(titles[:5], titles), (titles[10:12], titles[:7]), (titles[20:26], titles[::-1])]
    assert 7 < rec.max_candidates < 300
    assert rec.builder.max_length(rec.max_candidates) <= TOKENS_PER_SEQUENCE < rec.builder.max_length(300)

    def scores_and_longest(max_candidates: int) -> tuple[list[np.ndarray], int, int]:
        rec.max_candidates = max_candidates
        batches = [batch for _, batch in rec.packed_batches(users)]
        scores = [np.array(row) for row in rec.score_batch(users)]
        return scores, max(b.input_ids.shape[1] for b in batches), max(b.last_index.shape[1] for b in batches)

    default = rec.max_candidates
    chunked, longest, most = scores_and_longest(default)
    assert longest <= TOKENS_PER_SEQUENCE and most == default
    small, longest_small, most_small = scores_and_longest(64)  # 4 × 64 + 44 for the long users: 11 sequences
    assert most_small == 64 and longest_small < longest
    whole, longest_whole, most_whole = scores_and_longest(10**6)  # the former packing: a user is one sequence
    assert most_whole == 300 and longest_whole > TOKENS_PER_SEQUENCE

    with torch.no_grad():
        prefix, candidates = rec.builder.prefix_of_titles(users[0][0]), rec.builder.candidates_of_titles(titles)
        alone = rec.model.score(collate_unpacked(prefix, candidates, rec.builder.tokenizer.pad_id)).reshape(-1)
    np.testing.assert_allclose(whole[0], alone.numpy(), atol=1e-5, rtol=0)
    for user, (_, cands) in enumerate(users):
        assert len(chunked[user]) == len(small[user]) == len(cands)
        np.testing.assert_allclose(chunked[user], whole[user], atol=1e-5, rtol=0)
        np.testing.assert_allclose(small[user], whole[user], atol=1e-5, rtol=0)
    # `rank` of one user: every candidate back once, best first, with its score (alone in its batches: other
    # padding, so equal up to rounding).
    rec.max_candidates = default
    ranked = dict(rec.rank(*users[0]))
    assert list(ranked.values()) == sorted(ranked.values(), reverse=True) and sorted(ranked) == sorted(titles)
    np.testing.assert_allclose([ranked[t] for t in titles], chunked[0], atol=1e-5, rtol=0)


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


def users_file(setup, path: Path, users: int = 1, candidates: int = 20) -> Path:
    """`users` lines of titles (a history of 3, `candidates` candidates), the ranking input of the tests below."""
    titles = many_titles(setup, candidates + 3)
    path.write_text("".join(json.dumps({"user_id": f"u{u}", "history": titles[:3], "candidates": titles[3:]}) + "\n"
                            for u in range(users)))
    return path


def error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    return lines[0]


def test_rank_never_writes_over_its_input(setup, tmp_path, capsys, monkeypatch):
    """--output naming the input by any spelling, a hard link or a symlink, or naming a directory, is refused
    before the model is loaded; the input is left as it was."""
    source = users_file(setup, tmp_path / "users.jsonl")
    before = source.read_bytes()
    os.link(source, tmp_path / "hard.jsonl")
    (tmp_path / "soft.jsonl").symlink_to(source)
    (tmp_path / "out").mkdir()

    def no_model(*args, **kwargs):
        pytest.fail("the model was loaded for a request that is refused")  # not an Exception: run_command passes it

    monkeypatch.setattr(Recommender, "from_run", no_model)
    monkeypatch.chdir(tmp_path)
    run = str(run_dir(setup, "lora"))
    for output in (str(source), "users.jsonl", "./users.jsonl", f"../{tmp_path.name}/users.jsonl", "hard.jsonl",
                   "soft.jsonl", str(tmp_path / "soft.jsonl")):
        assert rank_cli.main(["--run", run, "--input", "users.jsonl", "--output", output, "--quiet"]) == 2, output
        assert f"--output {Path(output)} is the input users.jsonl;" in error_line(capsys.readouterr().err)
        assert source.read_bytes() == before
    for output in ("out", str(tmp_path / "out"), "out/"):
        assert rank_cli.main(["--run", run, "--input", str(source), "--output", output, "--quiet"]) == 2
        assert "is a directory; name the file to write" in error_line(capsys.readouterr().err)
        assert list((tmp_path / "out").iterdir()) == []
    assert rank_cli.main(["--run", run, "--input", str(tmp_path / "out"), "--output", "o.jsonl", "--quiet"]) == 2
    assert "a directory, not a file" in error_line(capsys.readouterr().err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.jsonl", "out", "soft.jsonl", "users.jsonl"]


def strict_json(text: str):
    """JSON as the standard has it: NaN and Infinity refused (Python's json accepts them)."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")
    return json.loads(text, parse_constant=refuse)


def test_rank_reads_what_editors_write_and_names_what_it_cannot(setup, tmp_path, capsys, monkeypatch):
    """A byte order mark before the first user is skipped; a line with a byte that is not UTF-8, a user_id that
    is NaN or infinite, or a title with a lone surrogate escape is a malformed line like any other, named, and the
    output is strict JSON. A model that scores NaN stops the command with one line and writes nothing."""
    domain, users, stored = stored_test_users(setup, "lora")
    e = users[0]
    history, candidates = [domain.items[i] for i in e.history], [domain.items[c] for c in e.candidates]
    good = json.dumps({"user_id": "first", "history": history, "candidates": candidates}).encode()
    bad_byte = json.dumps({"history": history, "candidates": candidates}).encode().replace(b'["', b'["\xff', 1)
    lines = [b"\xef\xbb\xbf" + good, bad_byte,
             b'{"user_id": NaN, "history": ["a"], "candidates": ["b"]}',
             b'{"user_id": -Infinity, "history": ["a"], "candidates": ["b"]}',
             b'{"user_id": 1e400, "history": ["a"], "candidates": ["b"]}',
             b'{"history": ["\\ud800 lonely"], "candidates": ["b"]}',
             json.dumps({"user_id": 2.5, "history": history, "candidates": candidates}).encode()]
    source = tmp_path / "users.jsonl"
    source.write_bytes(b"\r\n".join(lines) + b"\r\n")  # as an editor on Windows saves it
    output = tmp_path / "ranked.jsonl"
    args = ["--run", str(run_dir(setup, "lora")), "--input", str(source), "--output", str(output), "--quiet"]
    assert rank_cli.main(args) == 0
    captured = capsys.readouterr()
    assert f"ranked 2 users of {source}" in captured.out
    column = bad_byte.index(b"\xff") + 1
    for why in ("skipped 5 malformed line(s)", f"line 2: not UTF-8 text (byte 0xff at column {column})",
                "line 3: 'user_id' must be a string, an integer or a finite number", "line 4: 'user_id' must be",
                "line 5: 'user_id' must be",
                "line 6: 'history' has a string that is not Unicode text (a lone surrogate escape)"):
        assert why in captured.err
    rows = [strict_json(line) for line in output.read_text(encoding="utf-8").splitlines()]
    assert [(r["line"], r["user_id"]) for r in rows] == [(1, "first"), (7, 2.5)]
    for row in rows:
        assert [r["score"] for r in row["ranked"]] == sorted(stored[0].tolist(), reverse=True)

    assert rank_cli.main([*args, "--strict"]) == 2
    assert f"{source} line 2: not UTF-8 text" in error_line(capsys.readouterr().err)

    monkeypatch.setattr(Recommender, "score_batch", lambda self, users: [[float("nan")] * len(c) for _, c in users])
    output.unlink()
    assert rank_cli.main(args) == 1
    assert f"scored a candidate of {source} line 1 NaN or infinite" in error_line(capsys.readouterr().err)
    assert not output.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["users.jsonl"]


def rank_command(setup, source: Path, output: Path, method: str = "lora") -> list[str]:
    return [sys.executable, "-m", "xcross.cli.rank", "--run", str(run_dir(setup, method)), "--input", str(source),
            "--output", str(output), "--quiet"]


@pytest.mark.skipif(os.geteuid() == 0 and shutil.which("setpriv") is None,
                    reason="running as root without setpriv to drop CAP_DAC_OVERRIDE")
def test_rank_an_unreadable_input(setup, tmp_path):
    source = users_file(setup, tmp_path / "users.jsonl")
    source.chmod(0)
    as_user = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    proc = subprocess.run([*as_user, *rank_command(setup, source, tmp_path / "out.jsonl")], cwd=REPO, env=cli_env(),
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert error_line(proc.stderr) == f"error: {source}: Permission denied (choose a path you may use, or change its " \
                                      "permissions)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["users.jsonl"]


def temporaries(output: Path) -> list[Path]:
    """atomic_write's temporaries beside `output`: `.NAME.tmp-PID-RANDOM.tmp`."""
    return sorted(output.parent.glob(f".{output.name}.tmp-*"))


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_rank_stops_cleanly_when_interrupted(setup, tmp_path, signum):
    """Ctrl-C or SIGTERM while ranking: exit 128 + the signal, one line, the output untouched and no temporary
    beside it."""
    source = users_file(setup, tmp_path / "users.jsonl", users=2000, candidates=100)  # far from done when stopped
    output = tmp_path / "ranked.jsonl"
    output.write_text("an earlier ranking\n")
    stopped = interrupt_when(rank_command(setup, source, output), lambda: bool(temporaries(output)), signum=signum)
    assert stopped.returncode == 128 + signum, stopped.stderr
    lines = [line for line in stopped.stderr.splitlines() if line.strip()]
    assert lines == [f"interrupted: stopped before the ranking was complete; {output} was left as it was"], \
        stopped.stderr
    assert output.read_text() == "an earlier ranking\n" and temporaries(output) == []


def test_rank_removes_what_a_killed_run_left(setup, tmp_path):
    """SIGKILL runs no cleanup: the killed run's temporary stays beside the output until the next run removes it."""
    source = users_file(setup, tmp_path / "users.jsonl", users=2000, candidates=100)
    output = tmp_path / "ranked.jsonl"
    killed = interrupt_when(rank_command(setup, source, output), lambda: bool(temporaries(output)),
                            signum=signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL
    assert len(temporaries(output)) == 1 and not output.exists()
    small = users_file(setup, tmp_path / "one.jsonl")
    assert rank_cli.main(["--run", str(run_dir(setup, "lora")), "--input", str(small), "--output", str(output),
                          "--quiet"]) == 0
    assert temporaries(output) == [] and [r["user_id"] for r in read_jsonl(output)] == ["u0"]


def test_rank_ids_from_another_directory(setup, tmp_path, capsys, monkeypatch):
    """--ids from any working directory: a run records its data directory as an absolute path. One whose
    config.json holds a relative path (as earlier versions wrote) is refused with a line asking for --data-dir,
    even where that relative path happens to exist, rather than resolved against a guess."""
    _, users, stored = stored_test_users(setup, "lora")
    e = users[0]
    (tmp_path / "users.jsonl").write_text(json.dumps({"history": e.history, "candidates": e.candidates}) + "\n")
    monkeypatch.chdir(tmp_path)
    args = ["--input", "users.jsonl", "--output", "ranked.jsonl", "--ids", "--quiet"]
    assert rank_cli.main(["--run", str(run_dir(setup, "lora")), *args]) == 0
    (row,) = read_jsonl(tmp_path / "ranked.jsonl")
    np.testing.assert_allclose([{r["item_id"]: r["score"] for r in row["ranked"]}[c] for c in e.candidates],
                               stored[0], atol=1e-5, rtol=0)

    copy = copy_run_onto(setup, "lora", tmp_path, setup["model"])
    config = json.loads((copy / "config.json").read_text())
    config["data"]["data_dir"] = "world"
    (copy / "config.json").write_text(json.dumps(config))
    shutil.copytree(setup["world"] / TARGET, tmp_path / "world" / TARGET)  # a "world" here, not known to be its
    capsys.readouterr()
    assert rank_cli.main(["--run", str(copy), *args]) == 2
    assert error_line(capsys.readouterr().err) == (
        f"error: --ids: {copy} names its data directory by the relative path 'world', and the directory it was "
        "trained from is not recorded; pass --data-dir")
    assert rank_cli.main(["--run", str(copy), *args, "--data-dir", str(setup["world"])]) == 0


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
