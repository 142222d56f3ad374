"""Import a domain from the generic pair `interactions.csv` (user_id,item_id,timestamp) + `items.csv` (item_id,title).
Usage: xcross-prepare csv (python -m data_prep.tabular) --interactions F --items F --domain NAME --out DIR [--strict]"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    # Run by path, sys.path starts at data_prep/ rather than the repository root: the `data_prep.` imports can fail.
    sys.exit("error: run this importer as a module: xcross-prepare csv --help (python -m data_prep.tabular)")

import argparse
import csv
from pathlib import Path
from typing import Iterator

from data_prep.pipeline import (
    DataError,
    PrepConfig,
    RawDomain,
    Tally,
    add_pipeline_arguments,
    check_domain_name,
    config_from_args,
    describe_source,
    parse_timestamp,
    prepare_domain,
    read_lines,
    require_files,
    run_cli,
)

INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS = ("item_id", "title")


def csv_rows(path: Path, columns: tuple[str, ...], tally: Tally) -> Iterator[tuple[str, list[str] | None]]:
    """Yield ("file:line", [values of `columns`]) for each non-blank row, None in place of the values of a bad row
    (already counted).

    The header must name every column in `columns` (in any order; extra columns are ignored).
    """
    line = 0

    def texts() -> Iterator[str]:
        # csv.reader pulls lines itself (a quoted title may span lines), so the file's line number is kept here.
        nonlocal line
        for line, text in read_lines(path, tally):
            yield text

    reader = csv.reader(texts(), strict=True)
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise DataError(f"{path}: the file is empty; expected the header {','.join(columns)}") from None
    except csv.Error as err:
        raise DataError(f"{path}: unreadable header ({err}); expected {','.join(columns)}") from None
    missing = [name for name in columns if name not in header]
    if missing:
        raise DataError(f"{path}: the header {','.join(header)!r} lacks {missing}; expected {','.join(columns)}")
    picks = [header.index(name) for name in columns]
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            tally.problem("malformed_lines", f"{path.name}:{line}", f"unparseable CSV ({err})")
            yield f"{path.name}:{line}", None
            continue
        if not row or row == [""]:  # a blank line
            continue
        where = f"{path.name}:{line}"
        if len(row) != len(header):
            tally.problem("malformed_lines", where, f"{len(row)} fields where the header has {len(header)}")
            yield where, None
            continue
        yield where, [row[i].strip() for i in picks]


def read_interactions(path: Path, raw: RawDomain) -> None:
    tally = raw.tally
    for where, values in csv_rows(path, INTERACTION_COLUMNS, tally):
        raw.interaction_records += 1
        if values is None:
            continue
        user, item, stamp = values
        if not user or not item or not stamp:
            tally.problem("missing_fields", where, "an empty user_id, item_id or timestamp")
            continue
        time = parse_timestamp(stamp)
        if time is None:
            tally.problem("wrong_types", where, f"timestamp {stamp[:40]!r} is not a number")
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
    check_domain_name(domain)
    require_files(interactions, items)
    raw = RawDomain(Tally(config.strict))
    read_interactions(interactions, raw)
    read_items(items, raw)
    sources = [describe_source(interactions, "interactions", out_dir), describe_source(items, "items", out_dir)]
    return prepare_domain(
        raw, domain=domain, out_dir=out_dir, config=config, source_format="csv", sources=sources,
        interactions_name=interactions.name,
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog or "python -m data_prep.tabular", description=__doc__.splitlines()[0])
    parser.add_argument("--interactions", type=Path, required=True, help="CSV with user_id,item_id,timestamp")
    parser.add_argument("--items", type=Path, required=True, help="CSV with item_id,title")
    parser.add_argument("--domain", required=True, help="name of the output folder, e.g. toys")
    parser.add_argument("--out", type=Path, required=True, help="data directory; the domain goes to OUT/DOMAIN")
    add_pipeline_arguments(parser)
    args = parser.parse_args(argv)

    def job():
        meta = import_csv(args.interactions, args.items, domain=args.domain, out_dir=args.out,
                          config=config_from_args(args))
        return [(meta, args.out)]

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
