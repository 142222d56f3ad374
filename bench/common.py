"""Shared pieces of the benchmarks: a Gemma 3 270M-shaped decoder (random weights time the same as the real
ones, and need no conversion, so a bare checkout on a GPU machine can run them) and side-by-side timing."""

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

from xcross.config import config_from_dict  # noqa: E402
from xcross.model import Decoder  # noqa: E402
from xcross.runtime import keep_freed_memory  # noqa: E402
from xcross.files import atomic_write  # noqa: E402

ALLOCATOR_TUNED = keep_freed_memory()  # as train.py and evaluate.py do

GEMMA3_270M = {
    "model_type": "gemma3_text", "vocab_size": 262144, "hidden_size": 640, "intermediate_size": 2048,
    "num_hidden_layers": 18, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256,
    "sliding_window": 512, "query_pre_attn_scalar": 256, "max_position_embeddings": 32768,
    "sliding_window_pattern": 6, "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
}
RESULTS = Path(__file__).resolve().parent / "results"


def device_parser(doc: str) -> argparse.ArgumentParser:
    """The flags every model benchmark takes: --device (CUDA when available), --dtype, --repeats."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--repeats", type=int, default=3)
    return parser


def random_decoder(device="cpu", dtype=torch.float32, seed: int = 0) -> Decoder:
    """Gemma 3 270M shapes, random weights, frozen, in eval mode."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = Decoder(config_from_dict(GEMMA3_270M))
    return model.to(dtype).eval().requires_grad_(False)


def sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_side_by_side(fns: dict, repeats: int = 5, device="cpu") -> dict[str, float]:
    """Median seconds of each callable, run in turn so that all see the same machine load."""
    for fn in fns.values():  # warm-up (and compilation)
        fn()
    sync(device)
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def machine(device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "glibc_keep_freed_memory": ALLOCATOR_TUNED}
    if str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name()
    return info


def write_result(name: str, result: dict) -> Path:
    """bench/results/<name>.json, atomically, with the date and machine added."""
    result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **result}
    path = RESULTS / f"{name}.json"
    atomic_write(path, json.dumps(result, indent=2) + "\n")
    return path
