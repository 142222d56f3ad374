"""Rank candidates for users with a trained run: JSON lines in, one per user
  {"user_id": "u1", "history": [...oldest first], "candidates": [...]}      (user_id optional, echoed)
and one JSON line per user out, in the input's order, candidates best first with their scores. Entries are item
titles, or with --ids item ids of a processed domain (by default the run's own data directory and target)."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from ..data import load_domain
from ..errors import Failed, run_command
from ..files import atomic_write
from ..recommender import Recommender
from ..rundir import RunDir
from ..settings import DTYPES, UsageError
from ..training import shown

SHOWN = 5  # malformed lines named in the final report
# Bytes that are not UTF-8, as the input is read (errors="surrogateescape"): a line holding one is reported as
# malformed like any other, where strict decoding would stop the whole file at it.
UNDECODABLE = re.compile("[\udc80-\udcff]")


class BadLine(ValueError):
    """An input line that cannot be ranked; the message says why."""


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Output lines: {\"line\": N, \"user_id\": ..., \"ranked\": [{\"title\": ..., \"score\": ...}, ...]}\n"
               "(with --ids each entry also has \"item_id\"). Malformed input lines (not UTF-8, not JSON, history\n"
               "or candidates missing or empty, unknown item ids, a user_id that is not a string or a finite\n"
               "number) are not ranked: they are counted and named at the end, or with --strict the first one\n"
               "stops the command (exit 2, nothing written). A user may have any number of candidates: beyond\n"
               "what one packed sequence holds they are scored in several, with the same scores.")
    parser.add_argument("--run", metavar="DIR", required=True, help="a finished run, e.g. runs/tools/xcross")
    parser.add_argument("--input", metavar="FILE", required=True, help="users, one JSON object a line")
    parser.add_argument("--output", metavar="FILE", required=True,
                        help="where the ranked JSON lines go (written atomically; not the input)")
    parser.add_argument("--top-k", metavar="K", type=int, default=None,
                        help="keep only the K best candidates of each user")
    parser.add_argument("--ids", action="store_true", help="entries are item ids of a processed domain, not titles")
    parser.add_argument("--data-dir", metavar="DIR", default=None,
                        help="with --ids: the processed data (default: the run's)")
    parser.add_argument("--domain", metavar="D", default=None,
                        help="with --ids: the domain of the ids (default: the run's target)")
    parser.add_argument("--strict", action="store_true", help="stop at the first malformed line (exit 2)")
    parser.add_argument("--batch-size", metavar="N", type=int, default=None,
                        help="users per forward pass, or packed sequences of a user with many candidates "
                             "(default: the run's evaluation batch size)")
    parser.add_argument("--device", default="cpu", help="cpu (default), auto, cuda, cuda:N")
    parser.add_argument("--dtype", default="float32", choices=[d for d in DTYPES if d != "auto"],
                        help="of the base model (default float32)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def open_input(source: Path):
    """The input's lines as text: a UTF-8 byte order mark skipped, bytes that are not UTF-8 kept as escapes for
    `parse_user` to name."""
    return source.open(encoding="utf-8-sig", errors="surrogateescape")


def unicode_text(text: str) -> bool:
    """False for a string with a lone surrogate (JSON's "\\ud800"), which neither the tokenizer nor the output takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def parse_user(line: str, titles: dict[str, str] | None) -> tuple[object, list[str], list[str], list[str] | None]:
    """(user_id, history titles, candidate titles, candidate ids or None) of one input line, or BadLine."""
    if (byte := UNDECODABLE.search(line)) is not None:
        raise BadLine(f"not UTF-8 text (byte 0x{ord(byte.group()) - 0xDC00:02x} at column {byte.start() + 1})")
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise BadLine(f"not JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(row, dict):
        raise BadLine(f"not a JSON object but {type(row).__name__}")
    entries = {}
    for key in ("history", "candidates"):
        value = row.get(key)
        if value is None:
            raise BadLine(f"no {key!r}")
        if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
            raise BadLine(f"{key!r} must be a non-empty list of strings")
        if not all(map(unicode_text, value)):
            raise BadLine(f"{key!r} has a string that is not Unicode text (a lone surrogate escape)")
        entries[key] = value
    user_id = row.get("user_id")
    # NaN and Infinity are Python's JSON, not JSON: echoed, they would make the output unreadable to other readers.
    if not (user_id is None or isinstance(user_id, (str, int))
            or isinstance(user_id, float) and math.isfinite(user_id)):
        raise BadLine("'user_id' must be a string, an integer or a finite number")
    if isinstance(user_id, str) and not unicode_text(user_id):
        raise BadLine("'user_id' is not Unicode text (a lone surrogate escape)")
    if titles is None:
        return user_id, entries["history"], entries["candidates"], None
    for key, ids in entries.items():
        if unknown := [i for i in ids if i not in titles]:
            raise BadLine(f"unknown item id(s) in {key}: {', '.join(map(repr, unknown[:3]))}"
                          + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""))
    return user_id, [titles[i] for i in entries["history"]], [titles[i] for i in entries["candidates"]], \
        entries["candidates"]


def output_line(number: int, user_id, titles: list[str], scores: list[float], ids: list[str] | None,
                top_k: int | None) -> str:
    order = sorted(range(len(titles)), key=lambda k: -scores[k])[:top_k]  # stable: ties keep the input order
    ranked = [({"item_id": ids[k]} if ids is not None else {}) | {"title": titles[k], "score": scores[k]}
              for k in order]
    return json.dumps({"line": number, "user_id": user_id, "ranked": ranked}, ensure_ascii=False,
                      allow_nan=False) + "\n"


def rank_file(rec: Recommender, source: Path, dest: Path, titles: dict[str, str] | None, top_k: int | None,
              strict: bool, progress: bool) -> tuple[int, list[tuple[int, str]]]:
    """Rank every well-formed line of `source` into `dest`, `rec.batch_size` users at a time. Returns the number of
    users ranked and (line number, reason) of every malformed line."""
    with open_input(source) as f:
        total = sum(1 for line in f if line.strip())
    bad: list[tuple[int, str]] = []
    ranked = 0

    def write(tmp: Path) -> None:
        nonlocal ranked
        pending = []  # (line number, user_id, history, candidates, candidate ids) of the next forward pass
        with open_input(source) as lines, tmp.open("w", encoding="utf-8") as out, \
                tqdm(total=total, desc="rank", unit="user", disable=shown(progress)) as bar:
            for number, line in itertools.chain(enumerate(lines, start=1), [(None, "")]):  # None: the end
                if line.strip():
                    try:
                        pending.append((number, *parse_user(line, titles)))
                    except BadLine as err:
                        if strict:
                            raise UsageError(f"{source} line {number}: {err} (--strict: nothing written)") from None
                        bad.append((number, str(err)))
                        bar.update(1)
                if pending and (len(pending) == rec.batch_size or number is None):
                    scores = rec.score_batch([(history, candidates) for _, _, history, candidates, _ in pending])
                    for (n, user_id, _, candidates, ids), row in zip(pending, scores):
                        if not all(map(math.isfinite, row)):
                            raise Failed(f"the model scored a candidate of {source} line {n} NaN or infinite (its "
                                         f"weights, or a --dtype too narrow for them); nothing written to {dest}")
                        out.write(output_line(n, user_id, candidates, row, ids, top_k))
                    bar.update(len(pending))
                    ranked += len(pending)
                    pending.clear()

    atomic_write(dest, write)
    return ranked, bad


def item_titles(args: argparse.Namespace, run_path: Path) -> dict[str, str] | None:
    """item id -> title of the domain that --ids names (default: the run's data directory and target)."""
    if not args.ids:
        if args.data_dir or args.domain:
            raise UsageError("--data-dir and --domain say where item ids are looked up: they need --ids")
        return None
    config = RunDir.load(run_path).config()
    data_dir = Path(args.data_dir or config.data.data_dir).expanduser()
    if args.data_dir is None and not data_dir.is_absolute():
        # Runs written by earlier versions stored the path as given, relative to a working directory not recorded.
        raise UsageError(f"--ids: {run_path} names its data directory by the relative path {str(data_dir)!r}, "
                         "and the directory it was trained from is not recorded; pass --data-dir")
    domain_dir = data_dir / (args.domain or config.target)
    try:
        return load_domain(domain_dir).items
    except FileNotFoundError as err:
        raise UsageError(f"--ids: {err}") from None


def check_paths(source: Path, dest: Path) -> None:
    """Refuse, before any work, an input that cannot be read, an output that is a directory (found only once the
    ranking is done, otherwise) and one that is the input by any spelling, hard link or symlink (the ranking would
    replace the users it ranks)."""
    if not source.is_file():
        raise UsageError(f"--input {source}: " + ("a directory, not a file" if source.is_dir() else
                                                  "not a regular file" if source.exists() else "no such file"))
    with source.open("rb"):  # not readable: PermissionError, one line through run_command
        pass
    if dest.is_dir():
        raise UsageError(f"--output {dest} is a directory; name the file to write")
    if dest.exists() and dest.samefile(source):
        raise UsageError(f"--output {dest} is the input {source}; write the ranking to another file")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(lambda: _main(args), interrupted=f"stopped before the ranking was complete; {args.output} "
                                                        "was left as it was")


def _main(args: argparse.Namespace) -> int:
    source, dest = Path(args.input), Path(args.output)
    check_paths(source, dest)
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be a whole number >= 1 (got {args.top_k})")
    if args.batch_size is not None and args.batch_size < 1:
        raise UsageError(f"--batch-size must be a whole number >= 1 (got {args.batch_size})")
    titles = item_titles(args, Path(args.run))
    rec = Recommender.from_run(args.run, args.device, getattr(torch, args.dtype), args.batch_size)
    ranked, bad = rank_file(rec, source, dest, titles, args.top_k, args.strict, not args.quiet)
    print(f"ranked {ranked} users of {source} into {dest}")
    if bad:
        named = "; ".join(f"line {n}: {why}" for n, why in bad[:SHOWN])
        more = f"; and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        print(f"skipped {len(bad)} malformed line(s), not ranked: {named}{more}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
