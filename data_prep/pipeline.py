"""The processing pipeline every importer feeds: raw interactions and titles in, a processed domain directory out
(what xcross.data reads): it counts dropped records, k-core filters, splits leave-one-out with seeded candidates."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html
import json
import math
import re
import zlib
from array import array
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from tqdm import tqdm

from data_prep.outputs import replace_refusal
from xcross.data import TooFewItems, sample_candidates
from xcross.errors import UsageError, run_command
from xcross.files import atomic_directory, file_sha256, remove_stale_temporaries

FORMAT_VERSION = 1

# Bad input. Each is counted and its record skipped; under --strict the first one is an error.
PROBLEMS = (
    "malformed_lines",  # a line that does not parse as a record of its format
    "missing_fields",  # a required field absent, null or empty
    "wrong_types",  # a field of the wrong type, e.g. a timestamp that is not a number
    "invalid_utf8",  # a line that is not valid UTF-8
    "truncated_gz",  # a .gz stream that ends early or is corrupt; the records before the damage are kept
    "empty_titles",  # an item whose title is absent or empty once cleaned; the item is dropped
    "html_titles",  # a title carrying HTML tags or entities; cleaned and kept
    "duplicate_items",  # a further record of an item; the first is kept
    "unknown_items",  # an interaction with an item that has no item record
    "duplicate_interactions",  # the same user and item again; the earliest is kept
)
# Records removed by design: counted, never an error.
FILTERS = (
    "interactions_of_untitled_items",  # interactions with an item dropped for its empty title
    "items_without_interactions",  # item records nobody interacted with
    "kcore_users",
    "kcore_items",
    "kcore_interactions",
)

# A real tag has a name right after "<" or "</"; "Size < 5 and > 3 mm" holds none.
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9]*(?:\s[^<>]*)?/?>")
# Entities end with ";": html.unescape alone also expands legacy names without one ("Sticky &notes").
_ENTITY = re.compile(r"&(?:#[0-9]+|#[xX][0-9a-fA-F]+|[A-Za-z][A-Za-z0-9]*);")
# A plain decimal number: float() also takes "1000_0", "nan" and non-ASCII digits.
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
TIME_HINT = "timestamps must be numbers, Unix time in seconds or milliseconds"
_DOMAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class DataError(UsageError):
    """Bad input or an impossible request; the CLIs print it on one line and exit with code 2."""


@dataclass(frozen=True)
class PrepConfig:
    """Parameters of the pipeline, recorded in each domain's meta.json."""

    k_core: int = 5  # every user and item keeps at least this many interactions
    num_candidates: int = 20  # C: the target plus C - 1 negatives for each validation and test example
    max_train_per_user: int | None = 20  # the most recent training examples kept per user; None keeps all
    max_history: int = 50  # the most recent history items stored in a row
    seed: int = 0
    strict: bool = False  # any bad input is an error instead of a counted drop

    def __post_init__(self):
        # A user needs a validation and a test target plus one history item.
        if self.k_core < 3:
            raise DataError(f"--k-core must be at least 3 (got {self.k_core}): leave-one-out needs 3 items a user")
        if self.num_candidates < 2:
            raise DataError(f"--num-candidates must be at least 2 (got {self.num_candidates})")
        if self.max_train_per_user is not None and self.max_train_per_user < 1:
            raise DataError(f"--max-train-per-user must be positive (got {self.max_train_per_user})")
        if self.max_history < 1:
            raise DataError(f"--max-history must be positive (got {self.max_history})")
        if self.seed < 0:
            raise DataError(f"--seed must be non-negative (got {self.seed})")


class Tally:
    """Counts of dropped records by kind; under strict, the first bad record raises."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.counts: Counter[str] = Counter()
        self.by_file: Counter[tuple[str, str]] = Counter()  # (kind, file name) -> count
        self.examples: dict[tuple[str, str], str] = {}  # (kind, file name) -> where and what its first record was

    def problem(self, kind: str, where: str, detail: str, count: int = 1) -> None:
        assert kind in PROBLEMS, kind
        self.counts[kind] += count
        key = (kind, where.partition(":")[0])
        self.by_file[key] += count
        self.examples.setdefault(key, f"{where}: {detail}")
        if self.strict:
            raise DataError(f"{where}: {detail} [{kind}]; fix the input or drop --strict to skip and count such records")

    def drop(self, kind: str, count: int = 1) -> None:
        assert kind in FILTERS, kind
        self.counts[kind] += count

    def summary(self) -> str:
        return ", ".join(f"{kind}={n}" for kind, n in sorted(self.counts.items()) if n) or "nothing"

    def commonest_example(self, file: str) -> str:
        """The first record of the commonest problem in `file`, to name a cause rather than a symptom."""
        keys = [key for key in self.examples if key[1] == file]
        return self.examples[max(keys, key=self.by_file.__getitem__)] if keys else "none"


# ---------------------------------------------------------------------------------------------------------------
# Reading


def require_files(*paths: Path) -> None:
    for path in paths:
        if not Path(path).is_file():
            raise DataError(f"input file not found: {path}; check the path")


def require_different_files(first: tuple[str, Path], second: tuple[str, Path]) -> None:
    """Refuse one file given as both inputs, each a (flag, path) pair, however it is named (another spelling, a hard
    link, a symlink): read as both kinds, its records would pass for the other kind's, a review's title for an
    item's."""
    (first_flag, first_path), (second_flag, second_path) = first, second
    if Path(first_path).samefile(second_path):
        raise DataError(f"{first_flag} {first_path} and {second_flag} {second_path} are the same file; "
                        f"give {second_flag} its own file")


def read_lines(path: Path, tally: Tally, progress: bool = True, header: bool = False) -> Iterator[tuple[int, str]]:
    """Yield (line number, text) from a plain or gzipped file, streamed; gzip is detected by its magic bytes.

    A line that is not UTF-8 is skipped and counted, except a `header` line, which is an error: skipped, the first
    data row would be taken for the header. A UTF-16 file is an error. A damaged gzip stream ends the file (the
    lines before it count).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as raw, tqdm(
        total=size, unit="B", unit_scale=True, desc=path.name, disable=None if progress else True, leave=False
    ) as bar:
        is_gzip = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream = gzip.GzipFile(fileobj=raw, mode="rb") if is_gzip else raw
        lineno = 0
        try:
            for lineno, line in enumerate(stream, 1):
                if lineno % 16384 == 0:
                    bar.update(raw.tell() - bar.n)
                if lineno == 1 and (line.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in line):
                    raise DataError(f"{path}: the file is UTF-16 (or binary), not UTF-8 text; save it as UTF-8")
                try:
                    text = line.decode("utf-8")
                except UnicodeDecodeError as err:
                    if lineno == 1 and header:
                        raise DataError(f"{path}:1: the header is not valid UTF-8 (byte {err.start}); "
                                        "save the file as UTF-8") from None
                    tally.problem("invalid_utf8", f"{path.name}:{lineno}", f"invalid UTF-8 at byte {err.start}")
                    continue
                if lineno == 1 and text.startswith("\ufeff"):  # a byte-order mark from spreadsheet exports
                    text = text[1:]
                yield lineno, text
        except (EOFError, gzip.BadGzipFile, zlib.error) as err:
            tally.problem("truncated_gz", f"{path.name}:{lineno + 1}", f"gzip stream is truncated or corrupt ({err})")
        bar.update(size - bar.n)


def parse_timestamp(value: object) -> float | None:
    """A finite number, or a string holding one; None for anything else (booleans included)."""
    if isinstance(value, bool):
        return None
    try:
        if isinstance(value, (int, float)):
            number = float(value)
        elif isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            number = float(value.strip())
        else:
            return None
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def clean_title(raw: str) -> tuple[str, bool]:
    """Return the title without HTML tags and entities, whitespace normalised, and whether it carried HTML.

    The raw text's tags are stripped first, then its entities decoded once: what an entity spells ("&lt;b&gt;") is
    the seller's literal text and stays. A "<" or "&" that starts no tag or entity is text too.
    """
    text = _TAG.sub(" ", raw) if "<" in raw else raw
    if "&" in text:
        text = _ENTITY.sub(lambda entity: html.unescape(entity.group()), text)
    return " ".join(text.split()), text != raw


class RawDomain:
    """A domain's raw records: interactions as compact parallel arrays, then titles for the items they name.

    Interactions must be added before items: an item record nobody interacted with is counted and discarded at once,
    so the full metadata of a large category never sits in memory.
    """

    def __init__(self, tally: Tally):
        self.tally = tally
        self.user_index: dict[str, int] = {}  # id -> dense int, in order of first appearance
        self.item_index: dict[str, int] = {}
        self.users = array("i")
        self.items = array("i")
        self.times = array("d")  # float64 holds integer Unix times (even in ms) exactly
        self.titles: dict[int, str] = {}
        self.untitled: set[int] = set()
        self.interaction_records = 0  # lines or rows read, bad ones included
        self.item_records = 0

    def add_interaction(self, user: str, item: str, time: float) -> None:
        u = self.user_index.get(user)
        if u is None:
            u = self.user_index[user] = len(self.user_index)
        i = self.item_index.get(item)
        if i is None:
            i = self.item_index[item] = len(self.item_index)
        self.users.append(u)
        self.items.append(i)
        self.times.append(time)

    def add_item(self, item: str, title: object, where: str) -> None:
        index = self.item_index.get(item)
        if index is None:
            self.tally.drop("items_without_interactions")
            return
        if index in self.titles or index in self.untitled:
            self.tally.problem("duplicate_items", where, f"a further record of item {item!r}")
            return
        if title is not None and not isinstance(title, str):
            self.tally.problem("wrong_types", where, f"the title of {item!r} is a {type(title).__name__}, not a string")
            self.untitled.add(index)
            return
        cleaned, had_html = clean_title(title or "")
        if not cleaned:  # counted as empty alone, even when it was all markup: one reason per record
            self.tally.problem("empty_titles", where, f"item {item!r} has no title")
            self.untitled.add(index)
            return
        if had_html:
            self.tally.problem("html_titles", where, f"the title of {item!r} carries HTML: {title[:80]!r}")
        self.titles[index] = cleaned


def string_field(record: dict, key: str, tally: Tally, where: str) -> str | None:
    """The stripped string under `key`, or None after counting why it is unusable."""
    value = record.get(key)
    if isinstance(value, str):
        value = value.strip()
    if value is None or value == "":
        tally.problem("missing_fields", where, f"no {key!r}")
        return None
    if not isinstance(value, str):
        tally.problem("wrong_types", where, f"{key!r} is a {type(value).__name__}, not a string")
        return None
    return value


def time_field(record: dict, key: str, tally: Tally, where: str) -> float | None:
    value = record.get(key)
    if value is None or value == "":
        tally.problem("missing_fields", where, f"no {key!r}")
        return None
    time = parse_timestamp(value)
    if time is None:
        tally.problem("wrong_types", where, f"{key!r} is not a number: {str(value)[:40]!r} ({TIME_HINT})")
    return time


def require_records(raw: RawDomain, interactions: Path, items: Path) -> None:
    """Name an input that held no records at all, rather than reporting an empty result of the other one."""
    for path, count, what in ((interactions, raw.interaction_records, "interaction"),
                              (items, raw.item_records, "item")):
        if count == 0:
            raise DataError(f"{path}: the file holds no {what} records")


def describe_source(path: Path, role: str, out_dir: Path) -> dict:
    """Path (relative to the output when inside it, so a generated world is relocatable), size and sha256."""
    path = Path(path).resolve()
    out_dir = Path(out_dir).resolve()
    shown = path.relative_to(out_dir).as_posix() if path.is_relative_to(out_dir) else str(path)
    return {"role": role, "path": shown, "size": path.stat().st_size, "sha256": file_sha256(path)}


# ---------------------------------------------------------------------------------------------------------------
# Filtering and splitting


def kcore_mask(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Which interactions survive k-core filtering, iterated to a fixed point: dropping a user can sink an item."""
    keep = np.ones(len(users), dtype=bool)
    while True:
        user_counts = np.bincount(users[keep], minlength=int(users.max(initial=-1)) + 1)
        item_counts = np.bincount(items[keep], minlength=int(items.max(initial=-1)) + 1)
        kept = keep & (user_counts[users] >= k) & (item_counts[items] >= k)
        if kept.sum() == keep.sum():
            return keep
        keep = kept


def domain_rng(seed: int, domain: str) -> np.random.Generator:
    """One generator per (seed, domain), independent of Python's salted hash() and of the order domains are built."""
    salt = int.from_bytes(hashlib.sha256(domain.encode()).digest()[:8], "little")
    return np.random.default_rng([seed, salt])


def dumps(row: dict) -> str:
    return json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"


def prepare_domain(
    raw: RawDomain,
    *,
    domain: str,
    out_dir: Path,
    config: PrepConfig,
    source_format: str,
    sources: list[dict],
    interactions_name: str,
) -> dict:
    """Filter, split and write `raw` to `<out_dir>/<domain>/`; return the meta dict written there as meta.json."""
    tally = raw.tally
    if len(raw.users) == 0:  # every record was bad: its commonest fault is the cause, not the k-core
        raise DataError(
            f"{interactions_name}: none of its {raw.interaction_records} records is a usable interaction (dropped "
            f"{tally.summary()}); e.g. {tally.commonest_example(interactions_name)}")
    users = np.frombuffer(raw.users, dtype=np.int32)
    items = np.frombuffer(raw.items, dtype=np.int32)
    times = np.frombuffer(raw.times, dtype=np.float64)
    user_names = list(raw.user_index)
    item_names = list(raw.item_index)

    # Interactions whose item has no usable record.
    status = np.zeros(len(item_names), dtype=np.int8)  # 0: no record, 1: titled, 2: record without a title
    status[list(raw.titles)] = 1
    status[list(raw.untitled)] = 2
    item_status = status[items]
    unknown = item_status == 0
    if unknown.any():
        example = item_names[int(items[np.argmax(unknown)])]
        tally.problem(
            "unknown_items", interactions_name,
            f"{int(unknown.sum())} interactions with items that have no item record, e.g. {example!r}",
            count=int(unknown.sum()),
        )
    tally.drop("interactions_of_untitled_items", int((item_status == 2).sum()))
    keep = item_status == 1
    if not keep.any():
        raise DataError(
            f"no interactions left in {domain!r}: none of its {len(items)} interactions names a titled item "
            f"({int(unknown.sum())} name no item record, {int((item_status == 2).sum())} an untitled item); check "
            "that both files are of the same domain")
    users, items, times = users[keep], items[keep], times[keep]

    # Chronological per user; lexsort is stable, so equal timestamps keep their input order.
    order = np.lexsort((times, users))
    users, items = users[order], items[order]

    # A repeated (user, item) keeps its earliest occurrence: a sequence never holds an item twice, so no target
    # appears in its own history and negatives can be any item outside the sequence.
    pair = users.astype(np.int64) * len(item_names) + items
    _, first = np.unique(pair, return_index=True)
    first.sort()
    if len(first) < len(pair):
        duplicate = int(np.setdiff1d(np.arange(len(pair)), first)[0])
        tally.problem(
            "duplicate_interactions", interactions_name,
            f"{len(pair) - len(first)} repeated user-item interactions, e.g. user {user_names[users[duplicate]]!r} "
            f"and item {item_names[items[duplicate]]!r}",
            count=len(pair) - len(first),
        )
    users, items = users[first], items[first]

    survive = kcore_mask(users, items, config.k_core)
    tally.drop("kcore_interactions", int((~survive).sum()))
    tally.drop("kcore_users", len(np.unique(users)) - len(np.unique(users[survive])))
    tally.drop("kcore_items", len(np.unique(items)) - len(np.unique(items[survive])))
    users, items = users[survive], items[survive]
    if len(users) == 0:
        raise DataError(
            f"no interactions left in {domain!r} after {config.k_core}-core filtering (read "
            f"{raw.interaction_records} interaction records; dropped {tally.summary()}); supply more data or lower "
            "--k-core"
        )

    # Item ids are renumbered in sorted order, so candidate draws do not depend on the input's order.
    kept_items = np.unique(items)
    kept_names = sorted(item_names[i] for i in kept_items.tolist())
    position = {name: p for p, name in enumerate(kept_names)}
    renumber = np.full(len(item_names), -1, dtype=np.int64)
    renumber[kept_items] = [position[item_names[i]] for i in kept_items.tolist()]
    items = renumber[items]

    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    spans = {int(users[s]): (int(s), int(e)) for s, e in zip(starts, np.r_[starts[1:], len(users)])}
    user_order = sorted(spans, key=user_names.__getitem__)

    rng = domain_rng(config.seed, domain)
    counts = {"train_examples": 0, "valid_examples": 0, "test_examples": 0}
    h, c = config.max_history, config.num_candidates
    if refusal := replace_refusal(Path(out_dir) / domain, "meta.json", "format_version"):  # changed while we read
        raise DataError(refusal)
    with atomic_directory(Path(out_dir) / domain) as tmp, \
            open(tmp / "train.jsonl", "w", encoding="utf-8", newline="\n") as train, \
            open(tmp / "valid.jsonl", "w", encoding="utf-8", newline="\n") as valid, \
            open(tmp / "test.jsonl", "w", encoding="utf-8", newline="\n") as test:
        for u in tqdm(user_order, desc=f"{domain}: splits", unit="user", disable=None, leave=False):
            start, end = spans[u]
            sequence = items[start:end]
            names = [kept_names[i] for i in sequence.tolist()]
            user, n = user_names[u], len(names)
            first_train = 1 if config.max_train_per_user is None else max(1, n - 2 - config.max_train_per_user)
            for i in range(first_train, n - 2):
                train.write(dumps({"user_id": user, "history": names[max(0, i - h):i], "target": names[i]}))
            counts["train_examples"] += max(0, n - 2 - first_train)
            for split, t in ((valid, n - 2), (test, n - 1)):
                try:
                    candidates = sample_candidates(rng, len(kept_names), sequence, int(sequence[t]), c)
                except TooFewItems as err:
                    raise DataError(str(err)) from None
                split.write(dumps({
                    "user_id": user, "history": names[max(0, t - h):t], "target": names[t],
                    "candidates": [kept_names[j] for j in candidates],
                }))
            counts["valid_examples"] += 1
            counts["test_examples"] += 1

        with open(tmp / "items.jsonl", "w", encoding="utf-8", newline="\n") as f:
            for name in kept_names:
                f.write(dumps({"item_id": name, "title": raw.titles[raw.item_index[name]]}))

        meta = {
            "format_version": FORMAT_VERSION,
            "domain": domain,
            "source_format": source_format,
            "counts": {"users": len(spans), "items": len(kept_names), "interactions": len(users), **counts},
            "records_read": {"interactions": raw.interaction_records, "items": raw.item_records},
            "dropped": {kind: tally.counts[kind] for kind in PROBLEMS + FILTERS},
            "parameters": asdict(config),
            "seed": config.seed,
            "sources": sources,
        }
        with open(tmp / "meta.json", "w", encoding="utf-8", newline="\n") as f:
            f.write(json.dumps(meta, sort_keys=True, indent=2, ensure_ascii=False) + "\n")
    return meta


# ---------------------------------------------------------------------------------------------------------------
# Output


def check_domain_name(domain: str) -> str:
    if not _DOMAIN_NAME.fullmatch(domain):
        raise DataError(f"domain name {domain!r} is not a plain directory name; use letters, digits, '_', '-', '.'")
    return domain


def prepare_destination(out_dir: Path, domain: str, inputs: tuple[Path, ...]) -> Path:
    """Check, before any input is read, that `<out_dir>/<domain>` may be written and replaced, and clear what killed
    imports left beside it; return it. A replace deletes the old directory, so it must be one an import wrote."""
    check_domain_name(domain)
    dest = Path(out_dir) / domain
    if refusal := replace_refusal(dest, "meta.json", "format_version", inputs):
        raise DataError(refusal)
    remove_stale_temporaries(dest)
    return dest


# ---------------------------------------------------------------------------------------------------------------
# Command lines


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = PrepConfig()
    group = parser.add_argument_group("pipeline")
    group.add_argument("--k-core", type=int, default=defaults.k_core, help="minimum interactions per user and item")
    group.add_argument("--num-candidates", type=int, default=defaults.num_candidates,
                       help="C: candidates per validation/test example, the target included")
    group.add_argument("--max-train-per-user", type=int, default=defaults.max_train_per_user,
                       help="most recent training examples kept per user; 0 keeps all")
    group.add_argument("--max-history", type=int, default=defaults.max_history,
                       help="most recent history items stored per row")
    group.add_argument("--seed", type=int, default=defaults.seed)
    group.add_argument("--strict", action="store_true", help="treat any bad input record as an error")


def config_from_args(args: argparse.Namespace) -> PrepConfig:
    return PrepConfig(
        k_core=args.k_core,
        num_candidates=args.num_candidates,
        max_train_per_user=args.max_train_per_user or None,
        max_history=args.max_history,
        seed=args.seed,
        strict=args.strict,
    )


def format_report(meta: dict, out_dir: Path | str) -> str:
    counts = meta["counts"]
    dropped = ", ".join(f"{kind}={n}" for kind, n in meta["dropped"].items() if n) or "nothing"
    return (
        f"{meta['domain']}: {counts['users']} users, {counts['items']} items, {counts['interactions']} interactions; "
        f"{counts['train_examples']} train / {counts['valid_examples']} valid / {counts['test_examples']} test "
        f"examples -> {Path(out_dir) / meta['domain']}\n  dropped or cleaned: {dropped}"
    )


def importer_parser(prog: str, description: str, inputs: dict[str, str]) -> argparse.ArgumentParser:
    """The command line of an importer: its input files (flag -> help), --domain and --out; the caller adds its
    own flags, then `add_pipeline_arguments`."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for name, text in inputs.items():
        parser.add_argument(f"--{name}", type=Path, required=True, help=text)
    parser.add_argument("--domain", required=True, help="name of the output folder, e.g. toys")
    parser.add_argument("--out", type=Path, required=True, help="data directory; the domain goes to OUT/DOMAIN")
    return parser


def run_cli(job: Callable[[], list[tuple[dict, Path]]]) -> int:
    """Run an import, print its report and return the exit code: 0, or a failure's one line and code as every
    command gives them (`xcross.errors.run_command`: 2 for bad input, 1 for a fault of the machine)."""

    def imported() -> int:
        for meta, out_dir in job():
            print(format_report(meta, out_dir))
        return 0

    return run_command(imported)
