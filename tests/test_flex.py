"""FlexAttention block masks (the CUDA path for packed batches) against SDPA with the dense boolean mask.

On CPU FlexAttention runs eagerly and forward only: the same function, so equality here checks the mask rule
(its backward is FlexAttention's own)."""

import random

import pytest
import torch

from tests.tiny import tiny_decoder
from xcross.data import collate, pack
from xcross.lora import LoRAConfig
from xcross.model import flex_attention
from xcross.xcross import XCrossModel

pytestmark = pytest.mark.skipif(flex_attention is None, reason="FlexAttention needs torch >= 2.5")


def test_flex_block_masks_equal_dense_masks():
    torch.manual_seed(0)
    rnd = random.Random(0)
    model = XCrossModel(tiny_decoder(0), 2, LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:  # the stacked LoRA tensors: make the adapters matter
                p.normal_(0, 0.2)
        for integ in model.integrators:
            integ.weight.normal_(0, 0.05)
        model.head.out.weight.normal_(0, 0.5)
    examples = []
    for _ in range(3):  # prefixes longer than the window of 8, candidates of different lengths, padding
        prefix = [rnd.randrange(1, 100) for _ in range(rnd.randint(3, 30))]
        examples.append(pack(prefix, [[rnd.randrange(1, 100) for _ in range(rnd.randint(1, 9))] for _ in range(4)]))
    batch = collate(examples, pad_id=0)
    results = {}
    for backend in ("sdpa", "flex"):
        model.attention = backend
        with torch.no_grad():
            results[backend] = model.score(batch)
    assert batch.input_ids.shape[1] > 8 and (batch.segment_ids == -1).any(), "window and padding must be exercised"
    torch.testing.assert_close(results["flex"], results["sdpa"], atol=1e-5, rtol=0)
