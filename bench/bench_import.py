"""Benchmark the Amazon importer on a generated 1M-review file in the 2023 format: wall time and peak memory.
Usage: python bench/bench_import.py [--reviews 1000000] [--gzip]; writes bench/results/import.json."""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for xcross when run by path from a checkout
TARGET_SECONDS = 60.0
TARGET_RSS_MB = 1536.0
WORDS = (
    "great quality works perfectly my kids love this product arrived quickly would buy again the size is smaller "
    "than expected easy to assemble sturdy and well made not worth the price broke after a week five stars good "
    "value for money color matches the picture instructions were unclear fits well recommend it to anyone"
).split()


def texts(rng, count: int, low: int, high: int) -> list[str]:
    return [" ".join(rng.choice(WORDS, size=int(rng.integers(low, high)))) for _ in range(count)]


def write_files(directory: Path, reviews: int, users: int, items: int, compress: bool) -> tuple[Path, Path]:
    """A reviews file and its metadata in the 2023 layout, deterministic; users and items with Zipf-like activity,
    so 5-core filtering keeps a realistic share."""
    import numpy as np

    rng = np.random.default_rng(0)
    suffix = ".jsonl.gz" if compress else ".jsonl"
    opener = (lambda p: gzip.open(p, "wt", encoding="utf-8", compresslevel=1)) if compress else (
        lambda p: open(p, "w", encoding="utf-8"))
    asins = [f"B0{n:08X}" for n in rng.choice(16**8, size=items, replace=False)]
    user_ids = [f"AE{n:026X}" for n in rng.integers(0, 2**62, size=users)]
    bodies, heads = texts(rng, 4096, 10, 80), texts(rng, 1024, 2, 6)

    def zipf_draws(n: int, size: int, exponent: float):
        weights = 1.0 / np.arange(1, n + 1) ** exponent
        return rng.permutation(n)[np.searchsorted(np.cumsum(weights / weights.sum()), rng.random(size))]

    who = zipf_draws(users, reviews, 0.7)
    what = zipf_draws(items, reviews, 0.8)
    when = rng.integers(1_420_000_000_000, 1_690_000_000_000, size=reviews)
    stars = rng.integers(1, 6, size=reviews)
    pick_body = rng.integers(len(bodies), size=reviews)
    pick_head = rng.integers(len(heads), size=reviews)
    reviews_path = directory / f"Bench_Category{suffix}"
    with opener(reviews_path) as f:
        for n in range(reviews):
            asin = asins[what[n]]
            f.write(json.dumps({
                "rating": float(stars[n]), "title": heads[pick_head[n]], "text": bodies[pick_body[n]], "images": [],
                "asin": asin, "parent_asin": asin, "user_id": user_ids[who[n]], "timestamp": int(when[n]),
                "helpful_vote": int(n % 7), "verified_purchase": bool(n % 3),
            }) + "\n")
    meta_path = directory / f"meta_Bench_Category{suffix}"
    with opener(meta_path) as f:
        for n, asin in enumerate(asins):
            f.write(json.dumps({
                "main_category": "Bench", "title": heads[n % len(heads)].title() + f" Model {n}",
                "average_rating": 4.2, "rating_number": 10, "features": [bodies[n % len(bodies)]],
                "description": [], "price": None, "images": [], "videos": [], "store": "BenchStore",
                "categories": ["Bench"], "details": {}, "parent_asin": asin, "bought_together": None,
            }) + "\n")
    return reviews_path, meta_path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reviews", type=int, default=1_000_000)
    parser.add_argument("--users", type=int, default=200_000)
    parser.add_argument("--items", type=int, default=50_000)
    parser.add_argument("--gzip", action="store_true", help="write .jsonl.gz files, as downloaded")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "results" / "import.json")
    parser.add_argument("--write-to", type=Path, help=argparse.SUPPRESS)  # the generating child's job
    args = parser.parse_args()
    if args.write_to:
        write_files(args.write_to, args.reviews, args.users, args.items, args.gzip)
        return 0

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        # The files are written by a child of their own: a child's peak RSS starts from its parent's at fork, so
        # this process stays small and the importer's figure is its own.
        subprocess.run([sys.executable, __file__, "--write-to", str(tmp), "--reviews", str(args.reviews),
                        "--users", str(args.users), "--items", str(args.items)] + ["--gzip"] * args.gzip, check=True)
        suffix = ".jsonl.gz" if args.gzip else ".jsonl"
        reviews, meta = tmp / f"Bench_Category{suffix}", tmp / f"meta_Bench_Category{suffix}"
        print(f"generated {reviews.stat().st_size / 2**20:.0f} MiB of reviews, {meta.stat().st_size / 2**20:.0f} MiB "
              f"of metadata in {time.perf_counter() - start:.1f} s")
        command = [sys.executable, "-m", "data_prep.amazon", "--reviews", str(reviews), "--meta", str(meta),
                   "--domain", "bench", "--out", str(tmp / "out")]
        log = tmp / "importer.log"
        start = time.perf_counter()
        with open(log, "w") as out:
            importer = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
            # wait4 gives this child's own rusage (what RUSAGE_CHILDREN would merge with the generator's);
            # ru_maxrss is in KiB on Linux.
            _, status, usage = os.wait4(importer.pid, 0)
            importer.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - start
        output = log.read_text()
        if importer.returncode != 0:
            print(output)
            return 1
        peak_mb = usage.ru_maxrss / 1024
        counts = json.loads((tmp / "out" / "bench" / "meta.json").read_text())["counts"]
        sizes = {"reviews_bytes": reviews.stat().st_size, "meta_bytes": meta.stat().st_size}

    print(output.strip())
    rows = [("wall time", f"{seconds:.1f} s", f"<= {TARGET_SECONDS:.0f} s", seconds <= TARGET_SECONDS),
            ("peak RSS", f"{peak_mb:.0f} MiB", f"<= {TARGET_RSS_MB:.0f} MiB", peak_mb <= TARGET_RSS_MB)]
    print(f"\n{'measure':<10} {'value':>10} {'target':>12}  ok")
    for name, value, target, ok in rows:
        print(f"{name:<10} {value:>10} {target:>12}  {'yes' if ok else 'NO'}")

    results = {
        "benchmark": "import a generated Amazon-2023-format category with data_prep.amazon",
        "reviews": args.reviews, "users": args.users, "items": args.items, "gzip": args.gzip, **sizes,
        "wall_seconds": round(seconds, 2), "peak_rss_mib": round(peak_mb, 1),
        "target_seconds": TARGET_SECONDS, "target_rss_mib": TARGET_RSS_MB,
        "meets_targets": seconds <= TARGET_SECONDS and peak_mb <= TARGET_RSS_MB,
        "output_counts": counts,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
                    "processor": platform.processor() or platform.machine()},
    }
    # Imported only now: xcross loads torch, and a child's peak RSS would start from this process's.
    from xcross.files import atomic_write
    atomic_write(args.results, json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"\nwrote {args.results}")
    return 0 if results["meets_targets"] else 1


if __name__ == "__main__":
    sys.exit(main())
