"""Training-step throughput on the Gemma 3 270M shapes (random weights): our LoRA step against transformers + PEFT
with the same targets and rank, and our X-Cross step (n streams) against our LoRA step.

    python bench/bench_train_step.py [--device cpu|cuda] [--dtype bfloat16] [--batch 8 --seq 256] [--streams 3]
    python bench/bench_train_step.py --device cuda --batch 16 --seq 512 --compile     # on a GPU machine

Every side runs forward + backward + AdamW step on one `(batch, seq)` batch of random tokens with a loss at the
last position: ours through the scoring head (no vocabulary logits), the reference through its LM head at the last
position only (`logits_to_keep=1`). Printed: tokens/s, the ratios, and (on CUDA) model-FLOP utilisation counting
4·N_nonembed FLOPs per token per stream (frozen weights: forward 2N, input gradients 2N; attention and the small
adapter products not counted). The same count is also divided by the FLOP/s of
the model's main GEMM (tokens x 640 -> 2048, the MLP projections) timed in the same run: the share of what this
machine can do on such products, a ceiling for any implementation. Targets: LoRA step
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


def gemm_step(tokens: int, d: int, f: int, dtype, device):
    """One MLP-projection-shaped product, `(tokens, d) @ (d, f)`, and its FLOP count."""
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(tokens, d, generator=g, device=device, dtype=dtype)
    w = torch.randn(f, d, generator=g, device=device, dtype=dtype)
    return (lambda: x @ w.T), 2 * tokens * d * f


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
    parser.add_argument("--skip-xcross", action="store_true", help="no X-Cross side (its n streams need n times "
                        "the activation memory of the LoRA step)")
    args = parser.parse_args()
    device, dtype = args.device, getattr(torch, args.dtype)
    lora = LoRAConfig(dropout=0.0)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 262_000, (args.batch, args.seq), generator=g).to(device)
    labels = torch.randint(0, 2, (args.batch, 1), generator=g).to(device)

    lora_model = XCrossModel(random_decoder(device, dtype), 1, lora)
    lora_model.set_trainable({"adapters", "head"})
    models = {"ours_lora": lora_model}
    if not args.skip_xcross:
        models["ours_xcross"] = XCrossModel(random_decoder(device, dtype), args.streams, lora)
        models["ours_xcross"].set_trainable({"integrators", "stream_weights", "head"})
    for m in models.values():
        m.train()
        if args.compile:
            m.compile_regions()
    fns = {name: ours_step(m, ids, labels) for name, m in models.items()}
    if not args.skip_reference:
        ref_step, _ = reference_step(ids, labels[:, 0], lora, dtype, device)
        fns["transformers_peft_lora"] = ref_step
    tokens = args.batch * args.seq
    gemm, gemm_flops = gemm_step(tokens, GEMMA3_270M["hidden_size"],
                                 GEMMA3_270M["intermediate_size"], dtype, device)
    times = time_side_by_side({**fns, "gemm": gemm}, args.repeats, device)
    gemm_rate = gemm_flops / times.pop("gemm")
    rate = {k: tokens / v for k, v in times.items()}
    nonembed = sum(p.numel() for n, p in lora_model.decoder.named_parameters()
                   if "embed" not in n and ".lora_" not in n)
    flops_per_token = 4 * nonembed
    flop_rate = {k: r * (args.streams if k == "ours_xcross" else 1) * flops_per_token for k, r in rate.items()}
    result = {"benchmark": "training step, Gemma 3 270M shapes", "device": device, "dtype": args.dtype,
              "batch": args.batch, "seq": args.seq, "streams": args.streams, "compile": args.compile,
              "seconds": times, "tokens_per_s": rate,
              "machine": machine(device),
              "flops_per_token_lora": flops_per_token, "gemm_tflops": gemm_rate / 1e12,
              "share_of_gemm_rate": {k: f / gemm_rate for k, f in flop_rate.items()}}
    if "ours_xcross" in times:
        result["xcross_over_lora_time"] = times["ours_xcross"] / times["ours_lora"]
    if "transformers_peft_lora" in times:
        result["lora_speedup_vs_peft"] = times["transformers_peft_lora"] / times["ours_lora"]
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        if peak:
            result["mfu_lora"] = flop_rate["ours_lora"] / (peak * 1e12)
            if "ours_xcross" in flop_rate:
                result["mfu_xcross"] = flop_rate["ours_xcross"] / (peak * 1e12)
    print(f"{'(side)':24s} {'tokens/s':>10s}  share of the {gemm_rate / 1e9:,.0f} GFLOP/s measured on a "
          f"{tokens}x640x2048 GEMM")
    for k, v in rate.items():
        print(f"{k:24s} {v:10,.0f}  {result['share_of_gemm_rate'][k]:.0%}")
    if "lora_speedup_vs_peft" in result:
        print(f"ours LoRA / transformers+PEFT: {result['lora_speedup_vs_peft']:.2f}x (target >= 1.5x CPU, >= 3x GPU)")
    if "xcross_over_lora_time" in result:
        print(f"X-Cross n={args.streams} step / LoRA step: {result['xcross_over_lora_time']:.2f}x (target <= 3.0x)")
    if "mfu_lora" in result:
        xcross = f", X-Cross {result['mfu_xcross']:.1%}" if "mfu_xcross" in result else ""
        print(f"MFU: LoRA {result['mfu_lora']:.1%}{xcross} (target >= 25% for LoRA)")
    name = f"train-step-{device.split(':')[0]}-{args.dtype}-{args.batch}x{args.seq}{'-compile' if args.compile else ''}"
    print(f"wrote {write_result(name, result)}")


if __name__ == "__main__":
    main()
