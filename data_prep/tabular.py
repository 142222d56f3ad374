"""Import a domain from the generic pair `interactions.csv` (user_id,item_id,timestamp) + `items.csv` (item_id,title).
Usage: xcross-prepare csv (python -m data_prep.tabular) --interactions F --items F --domain NAME --out DIR [--strict]"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    # Run by path, sys.path starts at data_prep/ rather than the repository root: the `data_prep.` imports can fail.
    sys.exit("error: run this importer as a module: xcross-prepare csv --help (python -m data_prep.tabular)")

import csv
from collections import deque
from pathlib import Path
from typing import Iterator

from data_prep.pipeline import (
    DataError,
    importer_parser,
    PrepConfig,
    RawDomain,
    Tally,
    TIME_HINT,
    add_pipeline_arguments,
    config_from_args,
    describe_source,
    parse_timestamp,
    prepare_destination,
    prepare_domain,
    read_lines,
    require_different_files,
    require_files,
    require_records,
    run_cli,
)

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS = ("item_id", "title")
# A quoted title may hold a few line breaks; a quoted field running on for longer is taken for a stray quote.
MAX_RECORD_LINES = 16
# The csv module refuses fields over 131,072 characters; a line is read whole anyway, so a long title is kept.
FIELD_SIZE_LIMIT = 2**31 - 1


def parse_csv_record(lines: list[str]) -> tuple[list[str] | None, str | None]:
    """(the row, None) when `lines` hold one complete CSV record; (None, None) when its quoted field runs on past
    them; (None, why) when it cannot parse."""
    wanted_more = False

    def feed() -> Iterator[str]:
        nonlocal wanted_more
        yield from lines
        wanted_more = True

    try:
        row = next(csv.reader(feed(), strict=True), [])
    except csv.Error as err:
        return None, None if wanted_more else str(err)
    return (None, None) if wanted_more else (row, None)


def csv_records(path: Path, tally: Tally, max_lines: int) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """Yield (first line number, row, None), or (line, None, why) for a record that does not parse; a record may
    span at most `max_lines` lines. A quoted field still open then (a stray quote) is one bad record at the line
    where it opened, and reading resumes on the next line, so the quote swallows nothing after it."""
    lines = iter(read_lines(path, tally, header=True))
    pending: deque[tuple[int, str]] = deque()  # lines taken into a record that failed, to be read again
    while True:
        start = pending.popleft() if pending else next(lines, None)
        if start is None:
            return
        record = [start]
        while True:
            row, why = parse_csv_record([text for _, text in record])
            if row is not None or why is not None:
                break
            if len(record) == max_lines:
                within = "on its line" if max_lines == 1 else f"within {max_lines} lines"
                why = f"a quoted field opened here is not closed {within}: a stray '\"'?"
                break
            following = pending.popleft() if pending else next(lines, None)
            if following is None:
                why = "a quoted field opened here is not closed before the end of the file: a stray '\"'?"
                break
            record.append(following)
        if row is None:
            pending.extendleft(reversed(record[1:]))
        yield record[0][0], row, why


def csv_rows(path: Path, columns: tuple[str, ...], tally: Tally,
             max_lines: int = MAX_RECORD_LINES) -> Iterator[tuple[str, list[str] | None]]:
    """Yield ("file:line", [values of `columns`]) for each non-blank row, None in place of the values of a bad row
    (already counted).

    The header must name every column in `columns` once (in any order; extra columns are ignored, repeated or not).
    """
    csv.field_size_limit(max(csv.field_size_limit(), FIELD_SIZE_LIMIT))
    records = csv_records(path, tally, max_lines)
    first = next(records, None)
    if first is None:
        raise DataError(f"{path}: the file is empty; expected the header {','.join(columns)}")
    _, header, why = first
    if why is not None:
        raise DataError(f"{path}:1: unreadable header ({why}); expected {','.join(columns)}")
    header = [name.strip() for name in header]
    missing = [name for name in columns if name not in header]
    if missing:
        raise DataError(f"{path}: the header {','.join(header)!r} lacks {missing}; expected {','.join(columns)}")
    # Which of two same-named columns holds the values is anyone's guess; reading the first would be a silent pick.
    for name in columns:
        if header.count(name) > 1:
            positions = " and ".join(str(i + 1) for i, other in enumerate(header) if other == name)
            raise DataError(f"{path}: the header {','.join(header)!r} repeats the column {name!r} (columns "
                            f"{positions}); keep one, so that it is clear which holds the values")
    picks = [header.index(name) for name in columns]
    for line, row, why in records:
        where = f"{path.name}:{line}"
        if why is not None:
            tally.problem("malformed_lines", where, f"unparseable CSV ({why})")
            yield where, None
            continue
        if not row or row == [""]:  # a blank line
            continue
        if len(row) != len(header):
            tally.problem("malformed_lines", where, f"{len(row)} fields where the header has {len(header)}")
            yield where, None
            continue
        yield where, [row[i].strip() for i in picks]


def read_interactions(path: Path, raw: RawDomain) -> None:
    tally = raw.tally
    # No id or timestamp holds a line break, so a quoted field that runs past its line is a stray quote.
    for where, values in csv_rows(path, INTERACTION_COLUMNS, tally, max_lines=1):
        raw.interaction_records += 1
        if values is None:
            continue
        user, item, stamp = values
        if not user or not item or not stamp:
            tally.problem("missing_fields", where, "an empty user_id, item_id or timestamp")
            continue
        time = parse_timestamp(stamp)
        if time is None:
            tally.problem("wrong_types", where, f"timestamp {stamp[:40]!r} is not a number ({TIME_HINT})")
            continue
        raw.add_interaction(user, item, time)


def read_items(path: Path, raw: RawDomain) -> None:
    for where, values in csv_rows(path, ITEM_COLUMNS, raw.tally):
        raw.item_records += 1
        if values is None:
            continue
        item, title = values
        if not item:
            raw.tally.problem("missing_fields", where, "an empty item_id")
            continue
        raw.add_item(item, title, where)


def import_csv(
    interactions: str | Path,
    items: str | Path,
    *,
    domain: str,
    out_dir: str | Path,
    config: PrepConfig = PrepConfig(),
) -> dict:
    """Import one domain from the generic CSV pair into `<out_dir>/<domain>/`; return its meta dict.

    >>> meta = import_csv("interactions.csv", "items.csv", domain="toys", out_dir="data/mine")  # doctest: +SKIP
    >>> meta["counts"]["users"]  # doctest: +SKIP
    """
    interactions, items, out_dir = Path(interactions), Path(items), Path(out_dir)
    require_files(interactions, items)
    require_different_files(("--interactions", interactions), ("--items", items))
    prepare_destination(out_dir, domain, (interactions, items))
    raw = RawDomain(Tally(config.strict))
    read_interactions(interactions, raw)
    read_items(items, raw)
    require_records(raw, interactions, items)
    sources = [describe_source(interactions, "interactions", out_dir), describe_source(items, "items", out_dir)]
    return prepare_domain(
        raw, domain=domain, out_dir=out_dir, config=config, source_format="csv", sources=sources,
        interactions_name=interactions.name,
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = importer_parser(prog or "python -m data_prep.tabular", __doc__.splitlines()[0], {
        "interactions": "CSV with user_id,item_id,timestamp", "items": "CSV with item_id,title"})
    add_pipeline_arguments(parser)
    args = parser.parse_args(argv)

    def job():
        meta = import_csv(args.interactions, args.items, domain=args.domain, out_dir=args.out,
                          config=config_from_args(args))
        return [(meta, args.out)]

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
