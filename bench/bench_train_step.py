"""Training-step throughput on the Gemma 3 270M shapes (random weights): our LoRA step against transformers + PEFT
with the same targets and rank, and our X-Cross step (n streams) against our LoRA step.

    python bench/bench_train_step.py [--device cpu|cuda] [--dtype bfloat16] [--batch 8 --seq 256] [--streams 3]
    python bench/bench_train_step.py --device cuda --batch 16 --seq 512 --compile     # on a GPU machine

Every side runs forward + backward + AdamW step on one `(batch, seq)` batch of random tokens with a loss at the
last position: ours through the scoring head (no vocabulary logits), the reference through its LM head at the last
position only (`logits_to_keep=1`). Printed: tokens/s, the ratios, and (on CUDA) model-FLOP utilisation counting
4·N_nonembed FLOPs per token per stream (frozen weights: forward 2N, input gradients 2N; attention and the small
adapter products not counted, as in the issue's reference figure). Targets (issue 6): LoRA step
>= 1.5x transformers+PEFT on CPU and >= 3x on a GPU; X-Cross n=3 <= 3.0x a LoRA step; >= 25% MFU on an H100.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common import GEMMA3_270M, device_parser, machine, random_decoder, time_side_by_side, write_result
from xcross.data import Batch
from xcross.lora import LoRAConfig
from xcross.xcross import XCrossModel

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense bf16 tensor-core peak, for MFU


def ours_step(model: XCrossModel, ids: torch.Tensor, labels: torch.Tensor):
    params = [p for _, p in model.trainable_parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=ids.is_cuda or None)
    B, T = ids.shape
    # Plain causal rows (no mask: the SDPA causal kernel), one score per row read at the last position.
    batch = Batch(ids, torch.arange(T, device=ids.device).expand(B, T), None, torch.full((B, 1), T - 1,
                                                                                       device=ids.device))

    def step():
        loss = F.binary_cross_entropy_with_logits(model.score(batch), labels.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def reference_step(ids: torch.Tensor, labels: torch.Tensor, lora: LoRAConfig, dtype, device):
    import peft
    import transformers

    cfg = transformers.Gemma3TextConfig(**{k: v for k, v in GEMMA3_270M.items() if k != "model_type"},
                                        attn_implementation="sdpa")
    torch.manual_seed(0)
    model = transformers.Gemma3ForCausalLM(cfg).to(device=device, dtype=dtype)
    model = peft.get_peft_model(model, peft.LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=0.0,
                                                       target_modules=list(lora.targets)))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  fused=ids.is_cuda or None)

    def step():
        logits = model(input_ids=ids, logits_to_keep=1, use_cache=False).logits[:, -1]  # (B, vocab)
        loss = F.cross_entropy(logits.float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model


def main() -> None:
    parser = device_parser(__doc__)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--streams", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile our models (default off)")
    parser.add_argument("--skip-reference", action="store_true", help="no transformers + PEFT side")
    args = parser.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    lora = LoRAConfig(dropout=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 262_000, (args.batch, args.seq), generator=g).to(device)
    labels = torch.randint(0, 2, (args.batch, 1), generator=g).to(device)

    lora_model = XCrossModel(random_decoder(device, dtype), 1, lora)
    lora_model.set_trainable({"adapters", "head"})
    xcross_model = XCrossModel(random_decoder(device, dtype), args.streams, lora)
    xcross_model.set_trainable({"integrators", "stream_weights", "head"})
    for m in (lora_model, xcross_model):
        m.train()
        if args.compile:
            m.decoder.model.layers = torch.compile(m.decoder.model.layers)
    fns = {"ours_lora": ours_step(lora_model, ids, labels), "ours_xcross": ours_step(xcross_model, ids, labels)}
    if not args.skip_reference:
        ref_step, _ = reference_step(ids, labels[:, 0], lora, dtype, device)
        fns["transformers_peft_lora"] = ref_step
    times = time_side_by_side(fns, args.repeats, device)
    tokens = args.batch * args.seq
    rate = {k: tokens / v for k, v in times.items()}
    result = {"benchmark": "training step, Gemma 3 270M shapes", "device": device, "dtype": args.dtype,
              "batch": args.batch, "seq": args.seq, "streams": args.streams, "compile": args.compile,
              "seconds": times, "tokens_per_s": rate,
              "xcross_over_lora_time": times["ours_xcross"] / times["ours_lora"], "machine": machine(device)}
    if "transformers_peft_lora" in times:
        result["lora_speedup_vs_peft"] = times["transformers_peft_lora"] / times["ours_lora"]
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        nonembed = sum(p.numel() for n, p in lora_model.decoder.named_parameters()
                       if "embed" not in n and ".lora_" not in n)
        flops_per_token = 4 * nonembed
        result["flops_per_token_lora"] = flops_per_token
        if peak:
            result["mfu_lora"] = rate["ours_lora"] * flops_per_token / (peak * 1e12)
            result["mfu_xcross"] = rate["ours_xcross"] * args.streams * flops_per_token / (peak * 1e12)
    for k, v in rate.items():
        print(f"{k:24s} {v:10,.0f} tokens/s")
    if "lora_speedup_vs_peft" in result:
        print(f"ours LoRA / transformers+PEFT: {result['lora_speedup_vs_peft']:.2f}x (target >= 1.5x CPU, >= 3x GPU)")
    print(f"X-Cross n={args.streams} step / LoRA step: {result['xcross_over_lora_time']:.2f}x (target <= 3.0x)")
    if "mfu_lora" in result:
        print(f"MFU: LoRA {result['mfu_lora']:.1%}, X-Cross {result['mfu_xcross']:.1%} (target >= 25% for LoRA)")
    name = f"train-step-{device.split(':')[0]}-{args.dtype}-{args.batch}x{args.seq}"
    print(f"wrote {write_result(name, result)}")


if __name__ == "__main__":
    main()
