"""The embedded demo world: users with latent interests shop in several domains, each with its own product vocabulary.
Written as raw CSVs (with the latent interests in side files) and imported through the same pipeline as real data."""

from __future__ import annotations

import sys

if __name__ == "__main__" and not __package__:
    # Run by path, sys.path starts at data_prep/ rather than the repository root: the `data_prep.` imports can fail.
    sys.exit("error: run the generator as a module: xcross-prepare synthetic --help (python -m data_prep.synthetic)")

import argparse
import csv
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from data_prep.outputs import replace_refusal
from data_prep.pipeline import DataError, PrepConfig, add_pipeline_arguments, config_from_args, run_cli
from data_prep.tabular import import_csv
from xcross.files import remove_stale_temporaries, replace_path

DOMAINS = ("toys", "tools", "electronics", "sports")

# The tables every title is drawn from, shipped beside this module: the product vocabulary of each interest in each
# domain, and each domain's brands, descriptors and listing templates.
_TABLES = json.loads(Path(__file__).with_name("synthetic_vocabulary.json").read_text(encoding="utf-8"))
# VOCABULARY[interest][domain] = (products, phrases). A product reads "noun: spec | spec"; phrases say what a listing
# is for. Each interest speaks a different vocabulary in each domain, so what links a camper's saw in tools to their
# binoculars in toys is meaning, not shared words.
VOCABULARY: dict[str, dict[str, tuple[list[str], list[str]]]] = {
    interest: {domain: (shelf["products"], shelf["phrases"]) for domain, shelf in by_domain.items()}
    for interest, by_domain in _TABLES["vocabulary"].items()
}
INTERESTS = tuple(VOCABULARY)
# Brands and descriptors belong to a domain, not an interest: they say nothing about what a shopper cares for.
BRANDS = {domain: tuple(names) for domain, names in _TABLES["brands"].items()}
DESCRIPTORS = {domain: tuple(words) for domain, words in _TABLES["descriptors"].items()}
# Each domain's listing styles, as Amazon sellers in that category tend to write them.
TEMPLATES = {domain: tuple(styles) for domain, styles in _TABLES["templates"].items()}
_ID_CHARS = np.array(list("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
_EPOCH = 1451606400  # 2016-01-01, where the world's clock starts


def products(interest: str, domain: str) -> list[tuple[str, list[str]]]:
    """(noun, specs) of each product an interest has in a domain."""
    parsed = []
    for entry in VOCABULARY[interest][domain][0]:
        noun, specs = entry.split(": ")
        parsed.append((noun, specs.split(" | ")))
    return parsed


@dataclass(frozen=True)
class WorldConfig:
    """The demo world's size and behaviour; written to raw/world.json next to the raw files."""

    users_per_domain: int = 1500  # about this many users are active in each domain
    items_per_interest: int = 30  # items of each interest in each domain (10 interests: 300 items a domain)
    domains: tuple[str, ...] = DOMAINS
    interests: tuple[str, ...] = INTERESTS
    min_length: int = 6  # items a user buys in a domain they are active in, before 5-core
    max_length: int = 20
    noise: float = 0.15  # chance that a purchase ignores the user's interests
    stickiness: float = 0.7  # chance that a purchase stays with the previous purchase's interest
    zipf: float = 1.0  # exponent of popularity within an interest's items
    interest_zipf: float = 0.8  # exponent of how many users hold each interest
    seed: int = 0

    def __post_init__(self):
        unknown = [d for d in self.domains if d not in DOMAINS] + [i for i in self.interests if i not in VOCABULARY]
        if unknown:
            raise DataError(f"unknown domains or interests {unknown}; choose from {DOMAINS} and {INTERESTS}")
        if not self.domains or not self.interests:
            raise DataError("the world needs at least one domain and one interest")
        if not 1 <= self.min_length <= self.max_length:
            raise DataError(f"need 1 <= --min-length <= --max-length (got {self.min_length}, {self.max_length})")
        if self.users_per_domain < 1 or self.items_per_interest < 1 or self.seed < 0:
            raise DataError("--users-per-domain and --items-per-interest must be positive, --seed non-negative")
        if not (0 <= self.noise <= 1 and 0 <= self.stickiness <= 1):
            raise DataError("--noise and --stickiness are probabilities in [0, 1]")


@dataclass
class Item:
    item_id: str
    title: str
    interest: str
    weight: float  # popularity within its interest and domain


@dataclass
class User:
    user_id: str
    interests: list[str]
    weights: np.ndarray  # how much of their shopping each interest takes
    domains: list[str]


def random_ids(rng: np.random.Generator, count: int, prefix: str, length: int, taken: set[str]) -> list[str]:
    """Amazon-looking ids (ASINs start with B0, reviewer ids with A), unique among `taken`."""
    ids = []
    while len(ids) < count:
        candidate = prefix + "".join(_ID_CHARS[rng.integers(len(_ID_CHARS), size=length)])
        if candidate not in taken:
            taken.add(candidate)
            ids.append(candidate)
    return ids


def make_catalog(rng: np.random.Generator, domain: str, world: WorldConfig, taken: set[str]) -> list[Item]:
    """Items of every interest in one domain, each title unique, with Zipf popularity inside its interest."""
    items, titles = [], set()
    brands, descriptors, templates = BRANDS[domain], DESCRIPTORS[domain], TEMPLATES[domain]
    for interest in world.interests:
        shelf, phrases = products(interest, domain), VOCABULARY[interest][domain][1]
        # Popularity ranks are shuffled so neither the noun order nor the id order says which item sells most.
        ranks = rng.permutation(world.items_per_interest) + 1
        for j in range(world.items_per_interest):
            noun, specs = shelf[j % len(shelf)]
            for _ in range(100):
                title = templates[int(rng.integers(len(templates)))].format(
                    brand=brands[int(rng.integers(len(brands)))],
                    descriptor=descriptors[int(rng.integers(len(descriptors)))],
                    noun=noun,
                    spec=specs[int(rng.integers(len(specs)))],
                    phrase=phrases[int(rng.integers(len(phrases)))],
                    age=(3, 4, 5, 6, 8)[int(rng.integers(5))],
                )
                if title not in titles:
                    break
            else:  # a catalogue larger than the vocabulary's combinations: number the variants
                title = f"{title} (Model {j + 1})"
            titles.add(title)
            items.append(Item("", title, interest, 1.0 / ranks[j] ** world.zipf))
    for item, item_id in zip(items, random_ids(rng, len(items), "B0", 8, taken)):
        item.item_id = item_id
    return items


def make_users(rng: np.random.Generator, world: WorldConfig) -> list[User]:
    """Users with one to three interests, each active in several domains with those same interests."""
    n_domains = len(world.domains)
    fewest = min(2, n_domains)
    mean_active = (fewest + n_domains) / 2
    count = math.ceil(world.users_per_domain * n_domains / mean_active)
    # Some hobbies are commoner than others: interests draw shoppers with Zipf weights in a seeded order.
    appeal = 1.0 / (rng.permutation(len(world.interests)) + 1.0) ** world.interest_zipf
    users = []
    for user_id in random_ids(rng, count, "A", 13, set()):
        k = min(len(world.interests), 1 + int(np.searchsorted([0.35, 0.75], rng.random())))  # 1, 2, 3: 35/40/25%
        picks, left = [], appeal.copy()
        for _ in range(k):
            picks.append(draw(rng, left))
            left[picks[-1]] = 0.0
        active = rng.permutation(n_domains)[: int(rng.integers(fewest, n_domains + 1))]
        users.append(User(
            user_id=user_id,
            interests=[world.interests[i] for i in picks],
            weights=rng.dirichlet(np.full(k, 2.0)),
            domains=[world.domains[d] for d in sorted(active.tolist())],
        ))
    return users


def draw(rng: np.random.Generator, weights: np.ndarray) -> int:
    """An index drawn with probability proportional to `weights` (non-negative, positive sum)."""
    cumulative = np.cumsum(weights)
    return min(int(np.searchsorted(cumulative, rng.random() * cumulative[-1], side="right")), len(weights) - 1)


def shop(rng: np.random.Generator, user: User, catalog: list[Item], world: WorldConfig) -> list[Item]:
    """One user's purchases in one domain, oldest first: interest by interest with stickiness, Zipf popularity
    within an interest, and some noise; an item is bought at most once."""
    length = int(rng.integers(world.min_length, world.max_length + 1))
    length = min(length, len(catalog))
    by_interest = {i: np.array([k for k, item in enumerate(catalog) if item.interest == i]) for i in user.interests}
    popularity = np.array([item.weight for item in catalog])
    bought = np.zeros(len(catalog), dtype=bool)
    current = user.interests[draw(rng, user.weights)]
    purchases = []
    for step in range(length):
        if step > 0 and rng.random() > world.stickiness:
            current = user.interests[draw(rng, user.weights)]
        pool = by_interest[current]
        weights = popularity[pool] * ~bought[pool]
        if rng.random() < world.noise or weights.sum() == 0:  # off-interest: the domain's bestsellers, like anyone
            pool = np.arange(len(catalog))
            weights = popularity * ~bought
        choice = int(pool[draw(rng, weights)])
        bought[choice] = True
        purchases.append(catalog[choice])
    return purchases


def write_csv(path: Path, header: tuple[str, ...], rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def write_raw_world(root: Path, world: WorldConfig) -> None:
    """Write `root/raw/`: per domain interactions.csv, items.csv and item_interests.csv; users.csv; world.json."""
    rng = np.random.default_rng(world.seed)
    taken: set[str] = set()
    catalogs = {domain: make_catalog(rng, domain, world, taken) for domain in world.domains}
    users = make_users(rng, world)
    interactions = {domain: [] for domain in world.domains}
    for user in tqdm(users, desc="synthetic users", unit="user", disable=None, leave=False):
        baskets = {domain: shop(rng, user, catalogs[domain], world) for domain in user.domains}
        # One clock per user, purchases about nine days apart, the domains interleaved at random.
        slots = np.concatenate([np.full(len(basket), d) for d, basket in enumerate(baskets.values())])
        slots = slots[rng.permutation(len(slots))]
        times = _EPOCH + rng.uniform(0, 3 * 365 * 86400) + np.cumsum(rng.exponential(9 * 86400, size=len(slots)))
        for d, (domain, basket) in enumerate(baskets.items()):
            for item, time in zip(basket, times[slots == d].tolist()):
                interactions[domain].append((user.user_id, item.item_id, int(time)))

    raw = root / "raw"
    for domain in world.domains:
        # Logs arrive in time order, not grouped by user, as real exports do.
        rows = sorted(interactions[domain], key=lambda row: row[2])
        write_csv(raw / domain / "interactions.csv", ("user_id", "item_id", "timestamp"), rows)
        catalog = sorted(catalogs[domain], key=lambda item: item.item_id)  # no grouping by interest in the raw files
        write_csv(raw / domain / "items.csv", ("item_id", "title"), ((i.item_id, i.title) for i in catalog))
        write_csv(raw / domain / "item_interests.csv", ("item_id", "interest"),
                  ((i.item_id, i.interest) for i in catalog))
    write_csv(raw / "users.csv", ("user_id", "interests", "domains"),
              ((u.user_id, ";".join(u.interests), ";".join(u.domains)) for u in users))
    with open(raw / "world.json", "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(asdict(world), sort_keys=True, indent=2) + "\n")


def generate_world(
    out_dir: str | Path = "data/demo", world: WorldConfig = WorldConfig(), prep: PrepConfig | None = None
) -> dict[str, dict]:
    """Generate the demo world into `out_dir` (raw files under raw/, one processed folder per domain) and return
    each domain's meta dict. `prep` defaults to the pipeline's defaults with the world's seed.

    >>> metas = generate_world("data/demo")  # doctest: +SKIP
    >>> metas["tools"]["counts"]["users"]  # doctest: +SKIP
    """
    out_dir = Path(out_dir).absolute()
    prep = prep or PrepConfig(seed=world.seed)
    # Each entry replaced deletes what was there: only a world's raw/ (its world.json) or a domain an import wrote.
    markers = [("raw", "world.json", "users_per_domain")] + [(d, "meta.json", "format_version") for d in world.domains]
    for entry, marker, key in markers:
        if refusal := replace_refusal(out_dir / entry, marker, key):
            raise DataError(refusal)
        remove_stale_temporaries(out_dir / entry)
    remove_stale_temporaries(out_dir)
    # Built whole beside the destination, then moved in entry by entry (what else `out_dir` holds stays), so a crash
    # never leaves half a world that a later run would take for a finished one.
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")  # a name remove_stale_temporaries knows
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write_raw_world(tmp, world)
        metas = {}
        for domain in world.domains:
            raw = tmp / "raw" / domain
            metas[domain] = import_csv(raw / "interactions.csv", raw / "items.csv", domain=domain, out_dir=tmp,
                                       config=prep)
        out_dir.mkdir(exist_ok=True)
        for entry in ["raw", *world.domains]:
            replace_path(tmp / entry, out_dir / entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return metas


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    defaults = WorldConfig()
    parser = argparse.ArgumentParser(prog=prog or "python -m data_prep.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/demo"), help="world directory (default data/demo)")
    parser.add_argument("--users-per-domain", type=int, default=defaults.users_per_domain)
    parser.add_argument("--items-per-interest", type=int, default=defaults.items_per_interest,
                        help="items of each interest in each domain")
    parser.add_argument("--domains", default=",".join(defaults.domains),
                        help="comma-separated, from " + ",".join(DOMAINS))
    parser.add_argument("--interests", default=",".join(defaults.interests), help="comma-separated")
    parser.add_argument("--min-length", type=int, default=defaults.min_length, help="purchases per active domain")
    parser.add_argument("--max-length", type=int, default=defaults.max_length)
    parser.add_argument("--noise", type=float, default=defaults.noise)
    parser.add_argument("--stickiness", type=float, default=defaults.stickiness)
    parser.add_argument("--zipf", type=float, default=defaults.zipf, help="popularity skew within an interest")
    parser.add_argument("--interest-zipf", type=float, default=defaults.interest_zipf,
                        help="skew of how many users hold each interest")
    add_pipeline_arguments(parser)  # its --seed seeds the world and the candidates alike
    args = parser.parse_args(argv)

    def job():
        world = WorldConfig(
            users_per_domain=args.users_per_domain, items_per_interest=args.items_per_interest,
            domains=tuple(d.strip() for d in args.domains.split(",") if d.strip()),
            interests=tuple(i.strip() for i in args.interests.split(",") if i.strip()),
            min_length=args.min_length, max_length=args.max_length, noise=args.noise, stickiness=args.stickiness,
            zipf=args.zipf, interest_zipf=args.interest_zipf, seed=args.seed,
        )
        metas = generate_world(args.out, world, config_from_args(args))
        return [(meta, args.out) for meta in metas.values()]

    return run_cli(job)


if __name__ == "__main__":
    sys.exit(main())
