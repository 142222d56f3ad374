"""The learning-rate schedule of `fit`, against values worked out by hand."""

import pytest

from tests.tiny import tiny_decoder
from xcross.lora import LoRAConfig
from xcross.training import TrainConfig, make_optimizer
from xcross.xcross import XCrossModel

# 10 steps, warm-up 0.2 -> 2 steps: lr factor (s + 1) / 2 for s < 2, then linear: (10 - s) / 8.
BY_HAND = [0.5, 1.0, 1.0, 7 / 8, 6 / 8, 5 / 8, 4 / 8, 3 / 8, 2 / 8, 1 / 8]


def test_schedule_by_hand():
    model = XCrossModel(tiny_decoder(0), 2, LoRAConfig(rank=2))
    model.set_trainable({"integrators", "head"})
    config = TrainConfig(lr=1e-3, integrator_lr=1e-4, warmup=0.2)
    optimizer, scheduler = make_optimizer(model, config, total_steps=10)
    seen = []
    for _ in range(10):
        seen.append({g["name"]: g["lr"] for g in optimizer.param_groups})
        optimizer.step()
        scheduler.step()
    for step, (lrs, factor) in enumerate(zip(seen, BY_HAND)):
        assert lrs["head"] == pytest.approx(1e-3 * factor, rel=1e-9), step
        assert lrs["integrators"] == pytest.approx(1e-4 * factor, rel=1e-9), step

