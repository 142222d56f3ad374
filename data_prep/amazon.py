"""Import a domain from the Amazon review releases of 2014 (metadata as Python literals), 2018 and 2023, .gz or plain.
Usage: xcross-prepare amazon (python -m data_prep.amazon) --reviews F --meta F --domain NAME --out DIR [--format Y]"""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    # Run by path, sys.path starts at data_prep/ rather than the repository root: the `data_prep.` imports can fail.
    sys.exit("error: run this importer as a module: xcross-prepare amazon --help (python -m data_prep.amazon)")

import ast
import json
from dataclasses import dataclass
from pathlib import Path

from data_prep.pipeline import (
    DataError,
    importer_parser,
    PrepConfig,
    RawDomain,
    Tally,
    add_pipeline_arguments,
    config_from_args,
    describe_source,
    prepare_destination,
    prepare_domain,
    read_lines,
    require_different_files,
    require_files,
    require_records,
    run_cli,
    string_field,
    time_field,
)


@dataclass(frozen=True)
class Release:
    """Where one release keeps the fields the pipeline needs."""

    user: str
    item: str
    time: str
    meta_item: str
    literal: bool  # records may be Python literals (single quotes), parsed with ast.literal_eval


RELEASES = {
    # 2014: reviews are JSON, metadata lines are Python dict literals.
    "2014": Release(user="reviewerID", item="asin", time="unixReviewTime", meta_item="asin", literal=True),
    "2018": Release(user="reviewerID", item="asin", time="unixReviewTime", meta_item="asin", literal=False),
    # 2023: parent_asin groups an item's variants and is the id the metadata uses; timestamps are in ms.
    "2023": Release(user="user_id", item="parent_asin", time="timestamp", meta_item="parent_asin", literal=False),
}


# A reviewer's id, by its name in each release: every review has one, and no metadata record of any release does.
REVIEWER_FIELDS = frozenset({"reviewerID", "user_id"})
# The first records of a file that tell a reviews file from a metadata file: enough that one stray record does not
# decide, few enough to read before the long read of a category's files.
ROLE_SAMPLE = 100


def parse_record(text: str, literal: bool) -> tuple[dict | None, str | None]:
    """(a dict, None) from a JSON line (or a Python literal line where allowed); (None, why) for anything else.

    A line nested deeper than the parsers recurse ("[" * 100000) is malformed like any other: json and ast raise
    RecursionError (or, in ast's parser, MemoryError) for it, which must not end the import.
    """
    not_object = "not a JSON object" + " or Python literal" * literal
    try:
        record = json.loads(text)
    except RecursionError:  # over a thousand levels deep: ast refuses 200 nested brackets, so trying it is futile
        return None, "nested too deeply to parse"
    except ValueError:
        if not literal:
            return None, not_object
        try:
            record = ast.literal_eval(text)
        except (RecursionError, MemoryError):
            return None, "nested too deeply to parse"
        except (ValueError, TypeError, SyntaxError):
            return None, not_object
    return (record, None) if isinstance(record, dict) else (None, not_object)


def first_line(path: Path, what: str) -> str:
    """The first non-blank line of a file; an empty file is an error that names it."""
    for _, text in read_lines(path, Tally(), progress=False):
        if text.strip():
            return text
    raise DataError(f"{path}: the {what} file is empty")


def detect_release(reviews: Path, meta: Path) -> str:
    """The release from the first records: 2023 names its fields user_id/parent_asin; 2014 metadata is no JSON."""
    review, _ = parse_record(first_line(reviews, "reviews"), literal=True)
    if review is not None and "parent_asin" in review:
        return "2023"
    if review is not None and "reviewerID" in review:
        return "2018" if parse_record(first_line(meta, "metadata"), literal=False)[0] is not None else "2014"
    raise DataError(f"cannot tell the release of {reviews} from its first record; pass --format 2014, 2018 or 2023")


def first_records(path: Path) -> list[dict]:
    """The records (JSON or Python literals) among the first ROLE_SAMPLE non-blank lines of a file; lines that do not
    parse are left out."""
    records, lines = [], 0
    for _, text in read_lines(path, Tally(), progress=False):
        if not text.strip():
            continue
        record, _ = parse_record(text, literal=True)
        if record is not None:
            records.append(record)
        lines += 1
        if lines == ROLE_SAMPLE:
            break
    return records


def check_roles(reviews: Path, meta: Path) -> None:
    """Refuse a reviews file given as --meta (a 2023 review has a parent_asin and a title: every item would be titled
    by a review) and a metadata file given as --reviews, told apart by the first ROLE_SAMPLE records of each.

    --meta is a reviews file when every one of those records that parses names a reviewer (a field in
    REVIEWER_FIELDS); --reviews is a metadata file when none of them names a reviewer and some have a title. A file
    with no record that parses decides nothing, and a stray record of the other kind is read like any other.
    """
    meta_sample, review_sample = first_records(meta), first_records(reviews)
    reviewers = sorted({field for record in meta_sample for field in REVIEWER_FIELDS & record.keys()})
    meta_holds_reviews = bool(meta_sample) and all(REVIEWER_FIELDS & record.keys() for record in meta_sample)
    titled = sum("title" in record for record in review_sample)
    reviews_hold_items = titled > 0 and not any(REVIEWER_FIELDS & record.keys() for record in review_sample)
    if meta_holds_reviews and reviews_hold_items:
        raise DataError(f"the inputs look swapped: --reviews {reviews} holds item metadata and --meta {meta} holds "
                        f"reviews (each names a reviewer in {' or '.join(map(repr, reviewers))}); "
                        f"pass --reviews {meta} --meta {reviews}")
    if meta_holds_reviews:
        raise DataError(f"{meta}: given as --meta, it looks like a reviews file, not item metadata: each of its first "
                        f"{len(meta_sample)} records names a reviewer ({' or '.join(map(repr, reviewers))}), which "
                        "no metadata record does; pass the category's metadata file as --meta")
    if reviews_hold_items:
        raise DataError(f"{reviews}: given as --reviews, it looks like an item metadata file, not reviews: none of its "
                        f"first {len(review_sample)} records names a reviewer and {titled} have a title; pass the "
                        "category's reviews file as --reviews")


def read_reviews(path: Path, release: Release, raw: RawDomain) -> None:
    tally = raw.tally
    for lineno, text in read_lines(path, tally):
        if not text.strip():
            continue
        raw.interaction_records += 1
        where = f"{path.name}:{lineno}"
        record, why = parse_record(text, release.literal)
        if record is None:
            tally.problem("malformed_lines", where, why)
            continue
        user = string_field(record, release.user, tally, where)
        if user is None:
            continue
        item = string_field(record, release.item, tally, where)
        if item is None:
            continue
        time = time_field(record, release.time, tally, where)
        if time is None:
            continue
        raw.add_interaction(user, item, time)


def read_metadata(path: Path, release: Release, raw: RawDomain) -> None:
    tally = raw.tally
    for lineno, text in read_lines(path, tally):
        if not text.strip():
            continue
        raw.item_records += 1
        where = f"{path.name}:{lineno}"
        record, why = parse_record(text, release.literal)
        if record is None:
            tally.problem("malformed_lines", where, why)
            continue
        item = string_field(record, release.meta_item, tally, where)
        if item is not None:
            raw.add_item(item, record.get("title"), where)


def import_amazon(
    reviews: str | Path,
    meta: str | Path,
    *,
    domain: str,
    out_dir: str | Path,
    release: str = "auto",
    config: PrepConfig = PrepConfig(),
) -> dict:
    """Import one Amazon category (a reviews file and its metadata file) into `<out_dir>/<domain>/`; return its meta.

    >>> import_amazon("Toys_and_Games.jsonl.gz", "meta_Toys_and_Games.jsonl.gz",
    ...               domain="toys", out_dir="data/amazon23")  # doctest: +SKIP
    """
    reviews, meta, out_dir = Path(reviews), Path(meta), Path(out_dir)
    require_files(reviews, meta)
    require_different_files(("--reviews", reviews), ("--meta", meta))
    prepare_destination(out_dir, domain, (reviews, meta))
    check_roles(reviews, meta)
    if release == "auto":
        release = detect_release(reviews, meta)
    if release not in RELEASES:
        raise DataError(f"unknown release {release!r}; use auto, 2014, 2018 or 2023")
    fields = RELEASES[release]
    raw = RawDomain(Tally(config.strict))
    # Reviews first: then only the titles of items someone reviewed are kept from a metadata file of millions.
    read_reviews(reviews, fields, raw)
    read_metadata(meta, fields, raw)
    require_records(raw, reviews, meta)
    sources = [describe_source(reviews, "reviews", out_dir), describe_source(meta, "meta", out_dir)]
    return prepare_domain(
        raw, domain=domain, out_dir=out_dir, config=config, source_format=f"amazon-{release}", sources=sources,
        interactions_name=reviews.name,
    )


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    parser = importer_parser(prog or "python -m data_prep.amazon", __doc__.splitlines()[0], {
        "reviews": "reviews file (.json, .jsonl, optionally .gz)", "meta": "metadata file of the same category"})
    parser.add_argument("--format", default="auto", choices=["auto", *RELEASES], help="release of the files")
    add_pipeline_arguments(parser)
    args = parser.parse_args(argv)

    def job():
        meta = import_amazon(args.reviews, args.meta, domain=args.domain, out_dir=args.out, release=args.format,
                             config=config_from_args(args))
        return [(meta, args.out)]

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
