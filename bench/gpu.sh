#!/usr/bin/env bash
# Every GPU benchmark on a CUDA machine, from a bare checkout: random weights of the Gemma 3 270M shapes, so
# nothing is downloaded or converted; needs torch with CUDA, transformers and peft (for the reference side).
#   bash bench/gpu.sh            -> bench/results/*-cuda*.json and the printed ratios
set -euo pipefail
cd "$(dirname "$0")/.."
for compile in "" --compile; do  # eager, then torch.compile'd blocks and integrators (train.py's default on CUDA)
  python bench/bench_train_step.py --device cuda --dtype bfloat16 --batch 16 --seq 512 $compile
  python bench/bench_train_step.py --device cuda --dtype bfloat16 --batch 64 --seq 256 $compile
  # >= 32k tokens per step for the MFU target; the LoRA side only (3 streams would need 3x the activations)
  python bench/bench_train_step.py --device cuda --dtype bfloat16 --batch 64 --seq 512 --skip-xcross $compile
done
python bench/bench_packing.py --device cuda --dtype bfloat16
python bench/bench_streams.py --device cuda --dtype bfloat16
