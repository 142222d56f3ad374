"""Shared-prefix packing against C separate sequences: tokens processed, time and the scores themselves.

    python bench/bench_packing.py [--device cpu|cuda] [--dtype bfloat16] [--history 10 --candidates 20]

One example = a history of `--history` titles and `--candidates` candidate titles (title lengths drawn from
8..24 tokens, as product titles under the 24-token budget), scored by a one-stream LoRA model with the Gemma 3
270M shapes. Targets: >= 4x fewer tokens and >= 3x faster on CPU.
"""

from __future__ import annotations

import random

import torch

from common import device_parser, machine, random_decoder, time_side_by_side, write_result
from xcross.data import collate, collate_unpacked, pack
from xcross.lora import LoRAConfig
from xcross.xcross import XCrossModel


def example(rnd: random.Random, history: int, candidates: int):
    title = lambda: [rnd.randrange(3, 262_000) for _ in range(rnd.randint(8, 24))]  # noqa: E731
    prefix = [2] + [t for _ in range(history) for t in title() + [107]] + [rnd.randrange(3, 262_000)] * 6
    return prefix, [title() + [107] for _ in range(candidates)]


def main() -> None:
    parser = device_parser(__doc__)
    parser.add_argument("--history", type=int, default=10)
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--examples", type=int, default=4, help="examples per batch")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    model = XCrossModel(random_decoder(args.device, dtype), 1, LoRAConfig(dropout=0.0)).eval()
    torch.nn.init.normal_(model.head.out.weight, std=0.05)  # zero-initialised: every score would be 0
    rnd = random.Random(0)
    examples = [example(rnd, args.history, args.candidates) for _ in range(args.examples)]
    packed = collate([pack(p, c) for p, c in examples], pad_id=0).to(args.device)
    unpacked = [collate_unpacked(p, c, pad_id=0).to(args.device) for p, c in examples]

    @torch.no_grad()
    def run_packed():
        return model.score(packed)

    @torch.no_grad()
    def run_unpacked():
        return torch.stack([model.score(b).reshape(-1) for b in unpacked])

    diff = (run_packed().float() - run_unpacked().float()).abs().max().item()
    times = time_side_by_side({"packed": run_packed, "unpacked": run_unpacked}, args.repeats, args.device)
    tokens = {"packed": packed.num_tokens, "unpacked": sum(b.num_tokens for b in unpacked)}
    result = {
        "benchmark": "shared-prefix packing vs separate sequences", "device": args.device, "dtype": args.dtype,
        "history_titles": args.history, "candidates": args.candidates, "examples": args.examples,
        "tokens": tokens, "token_ratio": tokens["unpacked"] / tokens["packed"],
        "seconds": times, "speedup": times["unpacked"] / times["packed"], "max_score_diff": diff,
        "machine": machine(args.device),
    }
    print(f"tokens: packed {tokens['packed']:,}  unpacked {tokens['unpacked']:,}  -> {result['token_ratio']:.1f}x "
          "fewer (target >= 4x)")
    print(f"time:   packed {times['packed']:.3f}s  unpacked {times['unpacked']:.3f}s  -> {result['speedup']:.1f}x "
          "faster (target >= 3x on CPU)")
    print(f"max |score difference| {diff:.2e} ({args.dtype})")
    print(f"wrote {write_result('packing-' + args.device.split(':')[0], result)}")


if __name__ == "__main__":
    main()
