"""n streams in lockstep (one batched pass, adapters applied with one batched product) against n sequential
single-stream passes, on the Gemma 3 270M shapes.

    python bench/bench_streams.py [--device cpu|cuda] [--dtype bfloat16] [--streams 3] [--batch 4 --seq 512]

Both sides compute the same n sets of hidden states (zero-initialised integrators leave the streams unmixed; the
check is printed). Targets: lockstep no slower on CPU, <= 0.8x the time on a GPU.
"""

from __future__ import annotations

import torch

from common import device_parser, machine, random_decoder, time_side_by_side, write_result
from xcross.lora import LoRAConfig, lora_layers
from xcross.xcross import XCrossModel


def main() -> None:
    parser = device_parser(__doc__)
    parser.add_argument("--streams", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    args = parser.parse_args()
    dtype, n = getattr(torch, args.dtype), args.streams
    lora = LoRAConfig(dropout=0.0)
    lockstep = XCrossModel(random_decoder(args.device, dtype), n, lora).eval()
    singles = [XCrossModel(random_decoder(args.device, dtype), 1, lora).eval() for _ in range(n)]
    with torch.no_grad():
        for name, layer in lora_layers(lockstep.decoder).items():
            layer.lora_B.normal_(0, 0.01)
            for m, single in enumerate(singles):
                lora_layers(single.decoder)[name].lora_A.copy_(layer.lora_A[m : m + 1])
                lora_layers(single.decoder)[name].lora_B.copy_(layer.lora_B[m : m + 1])
    ids = torch.randint(3, 262_000, (args.batch, args.seq), device=args.device)

    @torch.no_grad()
    def run_lockstep():
        return lockstep.streams(ids).hidden

    integrators = lockstep.integrators

    @torch.no_grad()
    def run_lockstep_unmixed():  # the same lockstep pass without the integrators: the cost of mixing, separately
        lockstep.integrators = None
        try:
            return lockstep.streams(ids).hidden
        finally:
            lockstep.integrators = integrators

    @torch.no_grad()
    def run_sequential():
        return torch.cat([s.streams(ids).hidden for s in singles])

    diff = (run_lockstep().float() - run_sequential().float()).abs().max().item()
    times = time_side_by_side({"lockstep": run_lockstep, "lockstep_unmixed": run_lockstep_unmixed,
                               "sequential": run_sequential}, args.repeats, args.device)
    ratio = times["lockstep"] / times["sequential"]
    unmixed = times["lockstep_unmixed"] / times["sequential"]
    result = {"benchmark": f"{n} streams in lockstep vs {n} sequential passes", "device": args.device,
              "dtype": args.dtype, "batch": args.batch, "seq": args.seq, "streams": n, "seconds": times,
              "time_ratio": ratio, "time_ratio_without_integrators": unmixed, "max_hidden_diff": diff, "machine": machine(args.device)}
    print(f"lockstep {times['lockstep']:.3f}s  sequential {times['sequential']:.3f}s  -> lockstep/sequential "
          f"{ratio:.2f}x (target <= 1.0 on CPU, <= 0.8 on GPU); max |hidden difference| {diff:.2e}")
    print(f"without the integrators: lockstep {times['lockstep_unmixed']:.3f}s -> {unmixed:.2f}x sequential")
    print(f"wrote {write_result('streams-' + args.device.split(':')[0], result)}")


if __name__ == "__main__":
    main()
