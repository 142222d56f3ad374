"""Ranking one user's many candidates: the peak memory and time of `Recommender.rank` with the candidates cut into
sequences of at most `max_candidates` behind the history (the default) against one sequence holding them all.

    python bench/bench_rank.py [--candidates 20 200 2000] [--dtype bfloat16] [--threads 1] [--model-dir DIR]

The converted Gemma 3 270M (`~/.cache/xcross/models/gemma-3-270m`, or --model-dir; without it a random model of
the same shapes and a word-level tokenizer), a fresh one-stream LoRA and a random scoring head; a history of 10
titles and synthetic product titles of 4 to 12 words, cut to the 24-token budget as a run's are. Every case runs
in a child process of its own, on one thread by default (two on this shared 2-core machine ran up to 20x slower):
its peak RSS (VmHWM, reset once the model is loaded, warmed up and freed memory trimmed) is the ranking's.
All at once is skipped where its dense attention masks alone would pass --skip-gb (8 by default; 2,000 all at
once, ~4.3 GiB, then runs and takes ~5 of the ~7 minutes). Prints a table; writes bench/results/rank.json.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import tokenizers
import torch

from common import machine, random_decoder, write_result
from xcross.data import PromptBuilder
from xcross.lora import LoRAConfig
from xcross.recommender import Recommender
from xcross.settings import default_model_dir
from xcross.tokenizer import Tokenizer
from xcross.weights import load_decoder
from xcross.xcross import XCrossModel

WORDS = ("cordless drill driver kit battery charger steel hammer claw fiberglass handle tape measure foot "
         "stainless kitchen knife chef set wooden puzzle pieces board game family outdoor camping tent person "
         "waterproof sleeping bag lantern rechargeable garden hose nozzle spray pruning shears bypass yoga mat "
         "thick resistance bands dumbbell adjustable pair cotton shirt men women kids large small pack black blue "
         "red green white pro max mini ultra portable wireless bluetooth speaker headphones noise cancelling").split()
HISTORY = 10
TITLE_TOKENS = 24


def titles(count: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    return [" ".join(rnd.choice(WORDS).capitalize() if i == 0 else rnd.choice(WORDS) for i in range(rnd.randint(4, 12)))
            for _ in range(count)]


def word_tokenizer() -> Tokenizer:
    """Whole words as tokens (the fallback without the converted model's tokenizer): <pad> 0, <eos> 1, <bos> 2."""
    vocab = {w: i for i, w in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", *dict.fromkeys(
        w.lower() for w in WORDS + "a shopper bought these products oldest first next they would buy".split())])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.normalizer = tokenizers.normalizers.Lowercase()
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return Tokenizer(backend, bos_id=2, eos_id=1, pad_id=0)


def recommender(model_dir: Path, dtype: torch.dtype, at_once: bool) -> Recommender:
    if (model_dir / "config.json").is_file():
        decoder, tokenizer = load_decoder(model_dir, dtype=dtype).eval().requires_grad_(False), \
            Tokenizer.from_dir(model_dir)
    else:
        decoder, tokenizer = random_decoder(dtype=dtype), word_tokenizer()
    torch.manual_seed(0)  # the same adapter and head in every case's process: their scores are compared
    model = XCrossModel(decoder, 1, LoRAConfig(dropout=0.0))
    torch.nn.init.normal_(model.head.out.weight, std=0.05)  # zero-initialised: every score would be 0
    builder = PromptBuilder(tokenizer, {}, TITLE_TOKENS, HISTORY)
    return Recommender(model, builder, "cpu", batch_size=8, max_candidates=10**9 if at_once else None)


def memory_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE).group(1))


def one_case(model_dir: Path, dtype: torch.dtype, candidates: int, at_once: bool) -> dict:
    """Rank one user with `candidates` candidates in this process; the numbers of the ranking alone."""
    rec = recommender(model_dir, dtype, at_once)
    history, cands = titles(HISTORY, seed=0), titles(candidates, seed=1)
    rec.rank(history, cands[:3])  # warm-up: first-call allocations and kernels
    # What loading and the warm-up freed goes back to the system (common's allocator setting keeps it otherwise),
    # so that the RSS after load is the model's and the peak's growth the ranking's.
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux): the peak from here on
    loaded = memory_kib("VmRSS")
    lengths = [batch.input_ids.shape[1] for _, batch in rec.packed_batches([(history, cands)])]
    start = time.perf_counter()
    scores = rec.score_batch([(history, cands)])[0]
    seconds = time.perf_counter() - start
    return {"candidates": candidates, "mode": "all at once" if at_once else "chunked",
            "max_candidates": min(rec.max_candidates, candidates), "sequences": -(-candidates // rec.max_candidates),
            "passes": len(lengths), "longest_tokens": max(lengths), "seconds": round(seconds, 2),
            "rss_loaded_mib": round(loaded / 1024), "peak_rss_mib": round(memory_kib("VmHWM") / 1024),
            "scores": scores}


def dense_mask_gib(model_dir: Path, candidates: int) -> tuple[int, float]:
    """(tokens, GiB) of one sequence holding every candidate: its dense attention masks, what grows with the square
    of the candidates, at ~13 bytes per (query, key) pair (4.4 GiB of growth measured at 18,924 tokens; the
    sliding-window mask's int64 position differences alone take 8)."""
    tokenizer = Tokenizer.from_dir(model_dir) if (model_dir / "config.json").is_file() else word_tokenizer()
    builder = PromptBuilder(tokenizer, {}, TITLE_TOKENS, HISTORY)
    tokens = len(builder.prefix_of_titles(titles(HISTORY, seed=0))) + sum(
        map(len, builder.candidates_of_titles(titles(candidates, seed=1))))
    return tokens, tokens ** 2 * 13 / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, nargs="+", default=[20, 200, 2000])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each case")
    parser.add_argument("--model-dir", type=Path, default=None, help="default: the converted Gemma 3 270M")
    parser.add_argument("--skip-gb", type=float, default=8.0, help="skip all at once above this estimate (GiB)")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # a child's case: its numbers as one JSON line
    args = parser.parse_args()
    model_dir = (args.model_dir or default_model_dir()).expanduser()
    torch.set_num_threads(args.threads)
    if args.one:
        print(json.dumps(one_case(model_dir, getattr(torch, args.dtype), int(args.one[0]), args.one[1] == "once")))
        return

    real = (model_dir / "config.json").is_file()
    print(f"model: {model_dir if real else 'random Gemma 3 270M shapes, word-level tokenizer (no converted model)'}; "
          f"{args.dtype}, {torch.get_num_threads()} threads")
    rows, skipped = [], []
    for candidates in args.candidates:
        tokens, gib = dense_mask_gib(model_dir, candidates)
        for mode in ("chunked", "once"):
            if mode == "once" and gib > args.skip_gb:
                skipped.append({"candidates": candidates, "tokens": tokens, "estimated_gib": round(gib, 1)})
                print(f"{candidates} all at once: skipped ({tokens:,} tokens in one sequence: its dense masks "
                      f"alone need ~{gib:.1f} GiB > {args.skip_gb:g})")
                continue
            child = subprocess.run([sys.executable, __file__, "--one", str(candidates), mode, "--dtype", args.dtype,
                                    "--threads", str(args.threads), "--model-dir", str(model_dir)],
                                   capture_output=True, text=True, check=True)
            rows.append(json.loads(child.stdout.strip().splitlines()[-1]))
            print(f"{candidates} {rows[-1]['mode']}: {rows[-1]['seconds']} s, peak {rows[-1]['peak_rss_mib']} MiB")
    for candidates in args.candidates:  # the two modes' scores: the same up to rounding
        pair = [r for r in rows if r["candidates"] == candidates]
        if len(pair) == 2:
            diff = max(abs(a - b) for a, b in zip(pair[0]["scores"], pair[1]["scores"]))
            for r in pair:
                r["max_score_diff"] = diff
            print(f"{candidates} candidates, chunked vs all at once: scores differ by at most {diff:.2e} "
                  f"({args.dtype})")
    for r in rows:
        del r["scores"]

    header = "| candidates | mode | sequences × candidates | longest sequence | time | RSS after load | peak RSS | " \
             "growth |"
    print("\n" + header + "\n|" + "---|" * header.count(" | ") + "---|")
    for r in rows:
        print(f"| {r['candidates']:,} | {r['mode']} | {r['sequences']} × ≤ {r['max_candidates']} | "
              f"{r['longest_tokens']:,} tokens | {r['seconds']:.1f} s | {r['rss_loaded_mib']:,} MiB | "
              f"{r['peak_rss_mib']:,} MiB | +{r['peak_rss_mib'] - r['rss_loaded_mib']:,} MiB |")
    for s in skipped:
        print(f"| {s['candidates']:,} | all at once | 1 × {s['candidates']:,} | {s['tokens']:,} tokens | skipped: "
              f"~{s['estimated_gib']:.1f} GiB of masks | | | |")
    result = {"benchmark": "ranking one user's many candidates: chunked vs one sequence", "device": "cpu",
              "dtype": args.dtype, "model": str(model_dir) if real else "random (no converted model)",
              "history_titles": HISTORY, "title_tokens": TITLE_TOKENS, "batch_size": 8, "rows": rows,
              "skipped_all_at_once": skipped, "skip_above_gib": args.skip_gb, "machine": machine("cpu")}
    print(f"wrote {write_result('rank', result)}")


if __name__ == "__main__":
    main()
