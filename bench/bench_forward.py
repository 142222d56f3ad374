"""Forward throughput of our decoder against transformers on the same converted Gemma 3 270M weights (CPU).

    python bench/bench_forward.py [--batch 8 --seq 256 --dtypes float32 bfloat16 --repeats 3]

Both models run the same token ids through every block and the final norm; ours computes no vocabulary logits
(the recommender never needs them), transformers is asked for the last position's logits only
(`logits_to_keep=1`), so both skip the 262k-way head. Prints tokens/s and the ratio; writes bench/results/forward.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.gemma import convert  # noqa: E402
from xcross.files import atomic_write  # noqa: E402
from xcross.weights import load_decoder  # noqa: E402


def _time_pair(a, b, repeats: int) -> tuple[float, float]:
    """Median seconds of `a` and `b`, run alternately so that both see the same machine load."""
    a(), b()  # warm-up
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((a, times_a), (b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times_a), statistics.median(times_b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=None, help="converted model (default: convert the GGUF)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "forward.json")
    args = parser.parse_args()

    import transformers

    model_dir = args.model_dir or convert()
    ids = torch.randint(3, 262_000, (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    tokens = args.batch * args.seq
    rows = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        ours = load_decoder(model_dir, dtype=dtype)
        ref = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation="sdpa")
        ref.eval()
        with torch.no_grad():
            t_ours, t_ref = _time_pair(lambda: ours(ids),
                                       lambda: ref(input_ids=ids, logits_to_keep=1, use_cache=False), args.repeats)
        row = {"dtype": name, "ours_tokens_per_s": tokens / t_ours, "transformers_tokens_per_s": tokens / t_ref,
               "ratio": t_ref / t_ours}
        rows.append(row)
        print(f"{name:9s} ours {row['ours_tokens_per_s']:8.0f} tok/s   transformers {row['transformers_tokens_per_s']:8.0f}"
              f" tok/s   ratio {row['ratio']:.2f}x (target >= 1.0x)")
        del ours, ref
    result = {
        "benchmark": "decoder forward, ours vs transformers, same weights",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "batch": args.batch, "seq": args.seq, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "rows": rows,
    }
    atomic_write(args.out, json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
