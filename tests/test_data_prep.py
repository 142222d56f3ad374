"""Tests of the data pipeline and its importers: fixtures written in each raw format, a brute-force reference for
k-core and splits, every kind of bad input, atomic output, determinism, and the real Amazon domains when present."""

from __future__ import annotations

import csv
import gzip
import json
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import asdict
from pathlib import Path

import pytest

from data_prep.amazon import import_amazon
from data_prep.tabular import import_csv
from data_prep.pipeline import FILTERS, PROBLEMS, DataError, PrepConfig

REPO = Path(__file__).resolve().parents[1]
REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "amazon"

# ---------------------------------------------------------------------------------------------------------------
# A hand-checked fixture. With k = 3: u5 (f, a) and u6 (a, b) have too few items, and f (u4, u5) too few users;
# once they go, u4 keeps c, d, e and every remaining count is at least 3, so the fixed point is
#   u1: a b c d   u2: b a c e (b and a tie at t=1: input order)   u3: d a b e   u4: c d e
# with C = 2 the one negative of u1, u2 and u3 is forced: the single item outside their sequence.

ITEMS = [  # (item_id, title); None: the record has no title at all
    ("a", "Alpha Widget"),
    ("b", "Beta &amp; Co <b>Gadget</b>"),  # HTML, cleaned to "Beta & Co Gadget"
    ("c", "  Gamma \t Tool  "),
    ("d", "Delta"),
    ("e", "Epsilon"),
    ("f", "Phi"),
    ("g", None),  # dropped, and with it u6's interaction with g
    ("h", "Eta"),  # nobody interacts with it
]
INTERACTIONS = [  # (user_id, item_id, timestamp) in file order
    ("u1", "a", 1), ("u1", "b", 2), ("u1", "c", 3), ("u1", "d", 4),
    ("u2", "b", 1), ("u2", "a", 1), ("u2", "c", 2), ("u2", "e", 5),
    ("u3", "a", 3), ("u3", "b", 4), ("u3", "d", 2), ("u3", "e", 6),
    ("u4", "c", 1), ("u4", "d", 2), ("u4", "e", 3), ("u4", "f", 4),
    ("u5", "f", 1), ("u5", "a", 2), ("u5", "z", 3),  # z has no item record
    ("u6", "a", 1), ("u6", "g", 2), ("u6", "b", 3),
    ("u1", "a", 9),  # u1 again with a: the earliest (t=1) is kept
]
SEQUENCES = {"u1": list("abcd"), "u2": list("bace"), "u3": list("dabe"), "u4": list("cde")}
SMALL = PrepConfig(k_core=3, num_candidates=2, max_train_per_user=None, max_history=50)
EXPECTED_DROPPED = {
    "html_titles": 1, "empty_titles": 1, "unknown_items": 1, "duplicate_interactions": 1,
    "interactions_of_untitled_items": 1, "items_without_interactions": 1,
    "kcore_users": 2, "kcore_items": 1, "kcore_interactions": 5,
}


def write_csv_pair(directory: Path, interactions=INTERACTIONS, items=ITEMS) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "interactions.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["user_id", "item_id", "timestamp"])
        writer.writerows(interactions)
    with open(directory / "items.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["item_id", "title"])
        writer.writerows((item, title or "") for item, title in items)
    return directory / "interactions.csv", directory / "items.csv"


def amazon_lines(release: str, interactions=INTERACTIONS, items=ITEMS) -> tuple[list[str], list[str]]:
    """The fixture as the lines of a reviews file and a metadata file of one Amazon release."""
    reviews, meta = [], []
    for user, item, time in interactions:
        if release == "2023":
            record = {"rating": 5.0, "title": "Nice", "text": "Works.", "images": [], "asin": item + "-red",
                      "parent_asin": item, "user_id": user, "timestamp": time * 1000, "helpful_vote": 0,
                      "verified_purchase": True}
        else:
            record = {"reviewerID": user, "asin": item, "reviewerName": "Pat", "helpful": [0, 0],
                      "reviewText": "Works.", "overall": 5.0, "summary": "Nice", "unixReviewTime": time,
                      "reviewTime": "01 1, 2014"}
        reviews.append(json.dumps(record))
    for item, title in items:
        key = "parent_asin" if release == "2023" else "asin"
        record = {key: item, "price": 3.17, "categories": [["Toys & Games"]], "related": {"also_bought": ["x"]}}
        if title is not None:
            record["title"] = title
        # 2014 metadata lines are Python literals: single quotes, as repr() writes them.
        meta.append(repr(record) if release == "2014" else json.dumps(record))
    return reviews, meta


def write_amazon(directory: Path, release: str, compress: bool = False, **fixture) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    suffix = ".json.gz" if compress else ".json"
    paths = directory / f"reviews{suffix}", directory / f"meta{suffix}"
    for path, lines in zip(paths, amazon_lines(release, **fixture)):
        data = "".join(line + "\n" for line in lines).encode("utf-8")
        path.write_bytes(gzip.compress(data) if compress else data)
    return paths


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def read_domain(directory: Path) -> dict[str, list[dict]]:
    return {name: read_jsonl(directory / f"{name}.jsonl") for name in ("items", "train", "valid", "test")}


def sequences_of(domain: dict[str, list[dict]]) -> dict[str, list[str]]:
    """Full sequences back from test rows (valid only when max_history covers them)."""
    return {row["user_id"]: row["history"] + [row["target"]] for row in domain["test"]}


def check_splits(domain: dict[str, list[dict]], config: PrepConfig) -> None:
    """Every structural promise of the split files, checked against the full sequences."""
    items = [row["item_id"] for row in domain["items"]]
    assert items == sorted(set(items))
    item_set = set(items)
    sequences = sequences_of(domain)
    assert sorted(sequences) == [row["user_id"] for row in domain["test"]]  # one row per user, sorted by id
    assert item_set == {item for sequence in sequences.values() for item in sequence}
    valid = {row["user_id"]: row for row in domain["valid"]}
    test = {row["user_id"]: row for row in domain["test"]}
    assert set(valid) == set(sequences)
    h = config.max_history
    for user, sequence in sequences.items():
        n = len(sequence)
        assert len(set(sequence)) == n  # duplicates removed
        for row, t in ((valid[user], n - 2), (test[user], n - 1)):
            assert row["target"] == sequence[t]
            assert row["history"] == sequence[max(0, t - h):t]
            assert len(row["candidates"]) == config.num_candidates
            assert row["candidates"].count(row["target"]) == 1
            negatives = set(row["candidates"]) - {row["target"]}
            assert len(negatives) == config.num_candidates - 1
            assert negatives <= item_set and not negatives & set(sequence)
    train = defaultdict(list)
    for row in domain["train"]:
        train[row["user_id"]].append(row)
    for user, sequence in sequences.items():
        n = len(sequence)
        positions = list(range(1, n - 2))
        if config.max_train_per_user is not None:
            positions = positions[-config.max_train_per_user:]
        expected = [(sequence[max(0, i - h):i], sequence[i]) for i in positions]
        assert [(row["history"], row["target"]) for row in train[user]] == expected


def reference_sequences(interactions, titled: set[str], k: int) -> dict[str, list[str]]:
    """Brute force: keep titled items, order each user stably by time, keep first occurrences, then peel users and
    items below k until nothing changes."""
    by_user = defaultdict(list)
    for position, (user, item, time) in enumerate(interactions):
        if item in titled:
            by_user[user].append((float(time), position, item))
    sequences = {}
    for user, events in by_user.items():
        seen, sequence = set(), []
        for _, _, item in sorted(events):
            if item not in seen:
                seen.add(item)
                sequence.append(item)
        sequences[user] = sequence
    while True:
        item_counts = Counter(item for sequence in sequences.values() for item in sequence)
        kept = {u: [i for i in s if item_counts[i] >= k] for u, s in sequences.items() if len(s) >= k}
        kept = {u: s for u, s in kept.items() if s}
        if kept == sequences:
            return sequences
        sequences = kept


def nonzero_drops(meta: dict) -> dict[str, int]:
    return {kind: n for kind, n in meta["dropped"].items() if n}


# ---------------------------------------------------------------------------------------------------------------
# The hand-checked fixture through every format


def test_csv_fixture_by_hand(tmp_path):
    interactions, items = write_csv_pair(tmp_path / "raw")
    meta = import_csv(interactions, items, domain="toys", out_dir=tmp_path / "out", config=SMALL)
    domain = read_domain(tmp_path / "out" / "toys")

    assert meta["counts"] == {"users": 4, "items": 5, "interactions": 15, "train_examples": 3,
                              "valid_examples": 4, "test_examples": 4}
    assert nonzero_drops(meta) == EXPECTED_DROPPED
    assert set(meta["dropped"]) == set(PROBLEMS + FILTERS)
    assert meta["records_read"] == {"interactions": len(INTERACTIONS), "items": len(ITEMS)}
    assert domain["items"] == [{"item_id": "a", "title": "Alpha Widget"}, {"item_id": "b", "title": "Beta & Co Gadget"},
                               {"item_id": "c", "title": "Gamma Tool"}, {"item_id": "d", "title": "Delta"},
                               {"item_id": "e", "title": "Epsilon"}]
    assert sequences_of(domain) == SEQUENCES
    assert [(r["user_id"], r["history"], r["target"]) for r in domain["train"]] == [
        ("u1", ["a"], "b"), ("u2", ["b"], "a"), ("u3", ["d"], "a")]
    assert [(r["user_id"], r["history"], r["target"]) for r in domain["valid"]] == [
        ("u1", ["a", "b"], "c"), ("u2", ["b", "a"], "c"), ("u3", ["d", "a"], "b"), ("u4", ["c"], "d")]
    # C = 2 leaves u1, u2 and u3 exactly one item outside their sequences.
    forced = {"u1": "e", "u2": "d", "u3": "c"}
    for row in domain["valid"] + domain["test"]:
        if row["user_id"] in forced:
            assert sorted(row["candidates"]) == sorted([row["target"], forced[row["user_id"]]])
    check_splits(domain, SMALL)
    assert meta["parameters"] == {"k_core": 3, "num_candidates": 2, "max_train_per_user": None, "max_history": 50,
                                  "seed": 0, "strict": False}
    assert [s["role"] for s in meta["sources"]] == ["interactions", "items"]
    assert meta["sources"][0]["size"] == interactions.stat().st_size and len(meta["sources"][0]["sha256"]) == 64


@pytest.mark.parametrize("release, compress", [("2014", False), ("2014", True), ("2018", False), ("2018", True),
                                               ("2023", False), ("2023", True)])
def test_amazon_releases_match_csv(tmp_path, release, compress):
    """The same records in every release give the same files as the CSV import (candidates included)."""
    write_csv_pair(tmp_path / "csv")
    import_csv(tmp_path / "csv" / "interactions.csv", tmp_path / "csv" / "items.csv", domain="toys",
               out_dir=tmp_path / "from_csv", config=SMALL)
    reviews, meta_file = write_amazon(tmp_path / "raw", release, compress)
    meta = import_amazon(reviews, meta_file, domain="toys", out_dir=tmp_path / "out", config=SMALL)

    assert meta["source_format"] == f"amazon-{release}"  # detected from the first records
    assert nonzero_drops(meta) == EXPECTED_DROPPED
    for name in ("items", "train", "valid", "test"):
        assert (tmp_path / "out" / "toys" / f"{name}.jsonl").read_bytes() == \
            (tmp_path / "from_csv" / "toys" / f"{name}.jsonl").read_bytes()


def test_2014_metadata_is_python_literal(tmp_path):
    reviews, meta_file = write_amazon(tmp_path, "2014")
    first = meta_file.read_text().splitlines()[0]
    assert first.startswith("{'asin': 'a'")  # not JSON
    with pytest.raises(json.JSONDecodeError):
        json.loads(first)
    # Forced to 2018, the same file is unreadable JSON: every metadata line is malformed.
    with pytest.raises(DataError, match="no interactions left"):
        import_amazon(reviews, meta_file, domain="toys", out_dir=tmp_path / "out", release="2018", config=SMALL)


# ---------------------------------------------------------------------------------------------------------------
# Against a brute-force reference


def random_log(seed: int, users: int = 40, items: int = 30) -> list[tuple[str, str, int]]:
    """Interactions with tied timestamps, repeats and a long tail of rare items."""
    rng = random.Random(seed)
    popularity = [1 / (i + 1) ** 0.7 for i in range(items)]
    log = []
    for u in range(users):
        for item in rng.choices(range(items), weights=popularity, k=rng.randint(2, 14)):
            log.append((f"user{u:02d}", f"item{item:02d}", rng.randint(0, 20)))
    rng.shuffle(log)
    return log


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kcore_and_splits_match_reference(tmp_path, seed):
    log = random_log(seed)
    titles = [(f"item{i:02d}", f"Item number {i}") for i in range(30)]
    interactions, items = write_csv_pair(tmp_path / "raw", log, titles)
    config = PrepConfig(k_core=4, num_candidates=5, max_history=1000, max_train_per_user=None, seed=seed)
    meta = import_csv(interactions, items, domain="d", out_dir=tmp_path / "out", config=config)
    domain = read_domain(tmp_path / "out" / "d")

    expected = reference_sequences(log, {item for item, _ in titles}, k=4)
    assert expected, "the fixture should keep someone"
    assert sequences_of(domain) == expected
    item_counts = Counter(item for sequence in expected.values() for item in sequence)
    assert min(len(s) for s in expected.values()) >= 4 and min(item_counts.values()) >= 4  # the k-core property
    assert meta["counts"]["interactions"] == sum(map(len, expected.values()))
    assert meta["counts"]["interactions"] + meta["dropped"]["duplicate_interactions"] + \
        meta["dropped"]["kcore_interactions"] == len(log)
    check_splits(domain, config)


def test_history_and_training_caps(tmp_path):
    log = [(user, f"i{j}", j) for user in ("u", "v0", "v1") for j in range(12)]
    others = [(f"w{k}", f"j{j}", j) for k in range(3) for j in range(3)]  # items outside u's sequence
    titles = [(f"i{j}", f"Item {j}") for j in range(12)] + [(f"j{j}", f"Other {j}") for j in range(3)]
    interactions, items = write_csv_pair(tmp_path / "raw", log + others, titles)
    config = PrepConfig(k_core=3, num_candidates=4, max_history=3, max_train_per_user=4)
    import_csv(interactions, items, domain="d", out_dir=tmp_path / "out", config=config)
    domain = read_domain(tmp_path / "out" / "d")
    rows = [r for r in domain["train"] if r["user_id"] == "u"]
    # The four most recent positions before the validation target (i10), each with at most 3 history items.
    assert [(r["history"], r["target"]) for r in rows] == [
        (["i3", "i4", "i5"], "i6"), (["i4", "i5", "i6"], "i7"), (["i5", "i6", "i7"], "i8"), (["i6", "i7", "i8"], "i9")]
    test = next(r for r in domain["test"] if r["user_id"] == "u")
    assert test["history"] == ["i8", "i9", "i10"] and test["target"] == "i11"


def test_same_seed_same_bytes(tmp_path):
    log = random_log(7)
    interactions, items = write_csv_pair(tmp_path / "raw", log, [(f"item{i:02d}", f"Item {i}") for i in range(30)])
    outputs = []
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        import_csv(interactions, items, domain="d", out_dir=tmp_path / run,
                   config=PrepConfig(k_core=4, num_candidates=5, seed=seed))
        outputs.append({p.name: p.read_bytes() for p in sorted((tmp_path / run / "d").iterdir())})
    assert sorted(outputs[0]) == ["items.jsonl", "meta.json", "test.jsonl", "train.jsonl", "valid.jsonl"]
    assert outputs[0] == outputs[1]
    assert outputs[0]["test.jsonl"] != outputs[2]["test.jsonl"]  # the seed draws the candidates
    assert outputs[0]["train.jsonl"] == outputs[2]["train.jsonl"]


def test_rerun_replaces_output_and_leaves_no_temp(tmp_path):
    interactions, items = write_csv_pair(tmp_path / "raw")
    import_csv(interactions, items, domain="toys", out_dir=tmp_path / "out", config=SMALL)
    (tmp_path / "out" / "toys" / "stale.txt").write_text("old")  # inside a domain an import wrote: replaced
    (tmp_path / "out" / "other").mkdir()
    import_csv(interactions, items, domain="toys", out_dir=tmp_path / "out", config=SMALL)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["other", "toys"]
    assert not (tmp_path / "out" / "toys" / "stale.txt").exists()


def test_too_few_negatives_is_a_clear_error(tmp_path):
    log = [(user, f"i{j}", j) for user in ("u", "v", "w") for j in range(6)]
    interactions, items = write_csv_pair(tmp_path / "raw", log, [(f"i{j}", f"Item {j}") for j in range(6)])
    with pytest.raises(DataError, match="lower --num-candidates"):
        import_csv(interactions, items, domain="d", out_dir=tmp_path / "out", config=PrepConfig(k_core=3))
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------------------------
# Bad input. A clean fixture (the hand-checked one without its defects) passes --strict; each case adds one defect,
# which a lenient import counts exactly once, dropping only that record, and a strict import refuses.

CLEAN_ITEMS = [(item, f"Item {item.upper()}") for item in "abcde"]
CLEAN_INTERACTIONS = [(user, item, t) for user, sequence in SEQUENCES.items() for t, item in enumerate(sequence)]
PADDING = b"".join(b" " * 80 + b"\n" for _ in range(2000))  # blank lines a truncated stream can lose


def write_case(directory: Path, fmt: str, interactions=(), items=(), raw_interactions=b"", raw_items=b"",
               gz_truncated=False) -> tuple[Path, Path]:
    """The clean fixture plus extra records (and raw bytes) in `fmt`: csv, or an Amazon release."""
    interactions, items = CLEAN_INTERACTIONS + list(interactions), CLEAN_ITEMS + list(items)
    if fmt == "csv":
        paths = write_csv_pair(directory, interactions, items)
    else:
        paths = write_amazon(directory, fmt, interactions=interactions, items=items)
    for path, extra in zip(paths, (raw_interactions, raw_items)):
        path.write_bytes(path.read_bytes() + extra)
    if gz_truncated:
        blob = gzip.compress(paths[0].read_bytes() + PADDING)
        paths[0].write_bytes(blob[:-12])  # the end-of-stream marker and trailer are gone
    return paths


def review(**fields) -> bytes:
    return (json.dumps(fields) + "\n").encode()


BAD_INPUTS = {  # id: (kind, format, extras)
    "csv-extra-field": ("malformed_lines", "csv", {"raw_interactions": b"u1,c,5,extra\n"}),
    "csv-broken-quote": ("malformed_lines", "csv", {"raw_interactions": b'u1,"c"x,5\n'}),
    "json-cut-off": ("malformed_lines", "2018", {"raw_interactions": b'{"reviewerID": "u1", "asin": "c",\n'}),
    "json-not-object": ("malformed_lines", "2023", {"raw_items": b"[1, 2, 3]\n"}),
    "literal-broken": ("malformed_lines", "2014", {"raw_items": b"{'asin': 'x', 'title': 'Open\n"}),
    "csv-empty-user": ("missing_fields", "csv", {"interactions": [("", "c", 5)]}),
    "json-no-user": ("missing_fields", "2018", {"raw_interactions": review(asin="c", unixReviewTime=5)}),
    "json-null-time": ("missing_fields", "2023",
                       {"raw_interactions": review(user_id="u1", parent_asin="c", timestamp=None)}),
    "meta-no-id": ("missing_fields", "2014", {"raw_items": b"{'title': 'Orphan'}\n"}),
    "csv-time-not-number": ("wrong_types", "csv", {"interactions": [("u1", "c", "yesterday")]}),
    "json-user-number": ("wrong_types", "2018", {"raw_interactions": review(reviewerID=17, asin="c", unixReviewTime=5)}),
    "json-time-list": ("wrong_types", "2023",
                       {"raw_interactions": review(user_id="u1", parent_asin="c", timestamp=[5])}),
    "json-title-number": ("wrong_types", "2018", {"interactions": [("u1", "z", 8)],
                                                  "raw_items": b'{"asin": "z", "title": 42}\n'}),
    "csv-blank-title": ("empty_titles", "csv", {"interactions": [("u1", "z", 8)], "items": [("z", "   ")]}),
    "json-no-title": ("empty_titles", "2023", {"interactions": [("u1", "z", 8)], "items": [("z", None)]}),
    "html-only-title": ("empty_titles", "2014", {"interactions": [("u1", "z", 8)], "items": [("z", "<br/>&nbsp;")]}),
    "csv-html-title": ("html_titles", "csv", {"interactions": [("u1", "z", 8)], "items": [("z", "Zeta &amp; Sons")]}),
    "json-html-title": ("html_titles", "2018", {"interactions": [("u1", "z", 8)], "items": [("z", "<i>Zeta</i>")]}),
    "csv-unknown-item": ("unknown_items", "csv", {"interactions": [("u2", "q", 9)]}),
    "json-unknown-item": ("unknown_items", "2023", {"interactions": [("u2", "q", 9)]}),
    "csv-duplicate-row": ("duplicate_interactions", "csv", {"interactions": [("u4", "c", 0)]}),
    "json-repeat-purchase": ("duplicate_interactions", "2018", {"interactions": [("u4", "c", 7)]}),
    "csv-duplicate-item": ("duplicate_items", "csv", {"items": [("a", "Item A again")]}),
    "json-duplicate-item": ("duplicate_items", "2014", {"items": [("a", "Item A again")]}),
    "csv-latin1": ("invalid_utf8", "csv", {"raw_items": b"x1,Caf\xe9 Table\n"}),
    "json-invalid-utf8": ("invalid_utf8", "2023", {"raw_interactions": b'{"user_id": "u9", "parent_asin": "\xff\xfe"}\n'}),
    "truncated-gz": ("truncated_gz", "2018", {"gz_truncated": True}),
}


def import_case(directory: Path, fmt: str, config: PrepConfig, **extras) -> dict:
    first, second = write_case(directory / "raw", fmt, **extras)
    importer = import_csv if fmt == "csv" else import_amazon
    return importer(first, second, domain="toys", out_dir=directory / "out", config=config)


@pytest.mark.parametrize("fmt", ["csv", "2014", "2018", "2023"])
def test_clean_fixture_passes_strict(tmp_path, fmt):
    meta = import_case(tmp_path, fmt, PrepConfig(**{**asdict(SMALL), "strict": True}))
    assert nonzero_drops(meta) == {}
    assert sequences_of(read_domain(tmp_path / "out" / "toys")) == SEQUENCES


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_counted_or_refused(tmp_path, case):
    kind, fmt, extras = BAD_INPUTS[case]
    meta = import_case(tmp_path / "lenient", fmt, SMALL, **extras)
    assert {k: n for k, n in meta["dropped"].items() if n and k in PROBLEMS} == {kind: 1}
    assert sequences_of(read_domain(tmp_path / "lenient" / "out" / "toys")) == SEQUENCES  # only the bad record went

    with pytest.raises(DataError, match=re.escape(f"[{kind}]")):
        import_case(tmp_path / "strict", fmt, PrepConfig(**{**asdict(SMALL), "strict": True}), **extras)
    assert not (tmp_path / "strict" / "out").exists()  # nothing written, not even the output directory


def test_csv_header_is_required(tmp_path):
    (tmp_path / "interactions.csv").write_text("user,item,time\nu1,a,1\n")
    (tmp_path / "items.csv").write_text("item_id,title\na,A\n")
    with pytest.raises(DataError, match="lacks"):
        import_csv(tmp_path / "interactions.csv", tmp_path / "items.csv", domain="d", out_dir=tmp_path / "out")


# ---------------------------------------------------------------------------------------------------------------
# Command lines


def run_module(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_cli_reports_counts(tmp_path):
    interactions, items = write_csv_pair(tmp_path / "raw")
    done = run_module("-m", "data_prep.tabular", "--interactions", str(interactions), "--items", str(items),
                      "--domain", "toys", "--out", str(tmp_path / "out"), "--k-core", "3", "--num-candidates", "2")
    assert done.returncode == 0, done.stderr
    assert "toys: 4 users, 5 items, 15 interactions" in done.stdout
    assert "unknown_items=1" in done.stdout and "kcore_users=2" in done.stdout


@pytest.mark.parametrize("module", ["data_prep.tabular", "data_prep.amazon"])
def test_cli_missing_file_exits_2(tmp_path, module):
    names = ("--interactions", "--items") if module == "data_prep.tabular" else ("--reviews", "--meta")
    done = run_module("-m", module, names[0], str(tmp_path / "nope.csv"), names[1], str(tmp_path / "nope2.csv"),
                      "--domain", "toys", "--out", str(tmp_path / "out"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "not found" in done.stderr and "nope.csv" in done.stderr
    assert not (tmp_path / "out").exists()


def test_cli_empty_result_exits_2_and_writes_nothing(tmp_path):
    interactions, items = write_csv_pair(tmp_path / "raw")
    (tmp_path / "out").mkdir()
    done = run_module("-m", "data_prep.tabular", "--interactions", str(interactions), "--items", str(items),
                      "--domain", "toys", "--out", str(tmp_path / "out"))  # 5-core: nobody has 5 items
    assert done.returncode == 2
    assert "no interactions left" in done.stderr and "--k-core" in done.stderr
    assert list((tmp_path / "out").iterdir()) == []


def test_cli_strict_exits_2(tmp_path):
    interactions, items = write_csv_pair(tmp_path / "raw")
    done = run_module("-m", "data_prep.tabular", "--interactions", str(interactions), "--items", str(items),
                      "--domain", "toys", "--out", str(tmp_path / "out"), "--k-core", "3", "--strict")
    assert done.returncode == 2
    assert "items.csv:3:" in done.stderr and "[html_titles]" in done.stderr and "--strict" in done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("script", ["data_prep/tabular.py", "data_prep/amazon.py", "data_prep/synthetic.py"])
def test_running_by_path_says_use_module(script):
    done = run_module(script, "--help")
    assert done.returncode != 0 and "python -m data_prep." in done.stderr


# ---------------------------------------------------------------------------------------------------------------
# The real Amazon domains in ../shared (generic CSV format), when present

REAL_COUNTS = {  # after 5-core; hand-checkable against the brute-force reference below
    "toys": {"users": 19412, "items": 11924, "interactions": 167597, "train_examples": 98012},
    "arts": {"users": 7263, "items": 5901, "interactions": 71448, "train_examples": 46782},
    "office": {"users": 6415, "items": 4485, "interactions": 61202, "train_examples": 39409},
}
REAL_DROPPED = {
    "toys": {"html_titles": 1775},  # already a 5-core: nothing else goes
    "arts": {"duplicate_interactions": 855, "kcore_users": 2314, "kcore_items": 12738, "kcore_interactions": 38568},
    "office": {"duplicate_interactions": 1015, "kcore_users": 3158, "kcore_items": 11295, "kcore_interactions": 35435},
}


@pytest.mark.parametrize("name", list(REAL_COUNTS))
def test_real_domain(tmp_path, name):
    source = REAL_DATA / name
    if not (source / "interactions.csv").is_file():
        pytest.skip(f"real data not present at {source}")
    config = PrepConfig(max_history=10**6)  # full histories, so test rows give back whole sequences
    meta = import_csv(source / "interactions.csv", source / "items.csv", domain=name, out_dir=tmp_path, config=config)
    domain = read_domain(tmp_path / name)

    counts = meta["counts"]
    assert {k: counts[k] for k in REAL_COUNTS[name]} == REAL_COUNTS[name]
    assert counts["valid_examples"] == counts["test_examples"] == counts["users"]
    assert nonzero_drops(meta) == REAL_DROPPED[name]

    with open(source / "interactions.csv", newline="", encoding="utf-8") as f:
        log = [(r["user_id"], r["item_id"], int(r["timestamp"])) for r in csv.DictReader(f)]
    with open(source / "items.csv", newline="", encoding="utf-8") as f:
        titled = {r["item_id"] for r in csv.DictReader(f) if r["title"].strip()}
    expected = reference_sequences(log, titled, k=5)
    assert sequences_of(domain) == expected
    item_counts = Counter(item for sequence in expected.values() for item in sequence)
    assert min(map(len, expected.values())) >= 5 and min(item_counts.values()) >= 5
    check_splits(domain, config)
