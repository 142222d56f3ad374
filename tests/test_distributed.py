"""torchrun with two CPU processes (gloo) trains the tiny setup to the single-process result: same global batch,
dropout off, so the trained tensors agree to float rounding and the test metrics are equal; only rank 0 writes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.pipeline_fixtures import (
    common_flags, latest_checkpoint, make_model_dir, make_world, max_abs_diff, read_jsonl, run_cli, tensors,
)

TARGET = "toys"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# 32 users in global batches of 8 (4 a process), two epochs: 8 steps with a validation after each epoch.
DISTRIBUTED = dict(target=TARGET, max_train_users=32, max_eval_users=16, batch_size=8, epochs=2, history_len=3,
                   title_tokens=8, train_candidates=4, dropout=0, lr=1e-3, integrator_lr=1e-2)
# c in `score = v · tanh(W_p h + b_p) + c` shifts every candidate alike, so the listwise loss gives it a zero
# gradient; in float it gets rounding noise, which Adam scales up to lr-sized steps. It changes no ranking and no
# loss, but it walks differently when the sum over the batch is split over two processes: compared on its own.
SHIFT = "head.out.bias"


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("distributed")
    world = make_world(root / "world")
    return {"root": root, "world": world, "model": make_model_dir(root / "model", world)}


def files(out: Path) -> set[str]:
    return {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}


def train_both(setup, method: str) -> tuple[Path, Path, str]:
    """The single-process run and the torchrun run of `method`; returns their run dirs and torchrun's stdout."""
    single_out, multi_out = setup["root"] / f"single-{method}", setup["root"] / f"torchrun-{method}"
    single = run_cli("train.py", common_flags(setup["world"], setup["model"], single_out, method=method,
                                              **DISTRIBUTED))
    assert single.returncode == 0, single.stdout + single.stderr
    if method == "xcross":  # the same source adapters for both: the single run trained them
        for source in ("sports", "tools"):
            shutil.copytree(single_out / source, multi_out / source)
    multi = run_cli("train.py", common_flags(setup["world"], setup["model"], multi_out, method=method,
                                             **DISTRIBUTED), launcher=TORCHRUN, timeout=300)
    assert multi.returncode == 0, multi.stdout + multi.stderr
    assert "Traceback" not in multi.stderr and "rror" not in multi.stderr, multi.stderr
    if method == "xcross":
        assert multi.stdout.count("reusing") == 2  # once per source, from rank 0 only
    return single_out / TARGET / method, multi_out / TARGET / method, multi.stdout


@pytest.mark.parametrize("method", ["lora", "xcross"])
def test_torchrun_matches_a_single_process(setup, method):
    single_dir, multi_dir, stdout = train_both(setup, method)
    assert stdout.count(f"test results on {TARGET}") == 1  # printed by rank 0 only

    # Rank 0 wrote everything, once; each process only adds its own RNG state to every checkpoint.
    single_files = files(single_dir)
    rng_1 = {f.replace("rng-0.pt", "rng-1.pt") for f in single_files if f.endswith("rng-0.pt")}
    assert rng_1 and files(multi_dir) == single_files | rng_1
    single_log, multi_log = read_jsonl(single_dir / "log.jsonl"), read_jsonl(multi_dir / "log.jsonl")
    assert [r["step"] for r in multi_log] == [r["step"] for r in single_log]
    losses = [(a["loss"], b["loss"]) for a, b in zip(single_log, multi_log) if "loss" in a]
    assert len(losses) == 4  # every 2 steps (the cpu preset)
    np.testing.assert_allclose(*zip(*losses), rtol=0, atol=1e-5)
    if method == "xcross":  # the integrators' statistics cover the whole global batch, not rank 0's half of it
        logged = [(a["integrators"], b["integrators"]) for a, b in zip(single_log, multi_log) if "loss" in a]
        for single_layers, multi_layers in logged:
            assert len(multi_layers) == len(single_layers) > 0
            for want, got in zip(single_layers, multi_layers):
                assert got.keys() == want.keys() == {"z1_mean", "z1_max", "z2_mean", "z2_max"}
                for key in want:
                    assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key

    for name in ("best.safetensors", "trained.safetensors"):
        directory = (lambda d: d) if name == "best.safetensors" else latest_checkpoint
        a, b = tensors(directory(single_dir) / name), tensors(directory(multi_dir) / name)
        assert max_abs_diff({k: v for k, v in a.items() if k != SHIFT}, {k: v for k, v in b.items() if k != SHIFT}) \
            <= 1e-5, name
        assert abs(a[SHIFT].item() - b[SHIFT].item()) <= 1e-3 * 8  # at most ~lr per step
    assert latest_checkpoint(single_dir).name == latest_checkpoint(multi_dir).name == "step-00000008"

    # Test scores agree up to the shift c; the metrics are equal as long as no candidate is closer to the true item
    # than twice the scores' disagreement (checked, so that the equality is not luck).
    single_scores, multi_scores = (np.load(d / "test_scores.npz") for d in (single_dir, multi_dir))
    shift = [tensors(d / "best.safetensors")[SHIFT].item() for d in (single_dir, multi_dir)]
    a, b = single_scores["scores"] - shift[0], multi_scores["scores"] - shift[1]
    assert list(single_scores["user_ids"]) == list(multi_scores["user_ids"])
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    true = a[np.arange(len(a)), single_scores["labels"]][:, None]
    others = np.where(np.arange(a.shape[1]) == single_scores["labels"][:, None], np.inf, np.abs(a - true))
    assert others.min() > 2 * np.abs(a - b).max()
    single_results, multi_results = (json.loads((d / "results.json").read_text()) for d in (single_dir, multi_dir))
    assert multi_results["test"] == single_results["test"]
    assert multi_results["training"]["best_step"] == single_results["training"]["best_step"]
    assert multi_results["training"]["examples_seen"] == single_results["training"]["examples_seen"] == 64
