"""FlexAttention block masks (the CUDA path for packed batches) against SDPA with the dense boolean mask, at the level
where the two differ: the masks `Decoder.attention_inputs` builds from a packed batch's segment ids or from its dense
mask, run through the same blocks of n = 2 LoRA streams.

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


def _streams(model: XCrossModel, batch, block_masks: bool) -> torch.Tensor:
    """The model's streams through every block with FlexAttention block masks (`block_masks`) or the dense mask."""
    decoder = model.decoder
    inputs = decoder.attention_inputs(batch.input_ids, batch.attention_mask, batch.position_ids, model.n_streams,
                                      segment_ids=batch.segment_ids if block_masks else None)
    x = decoder.embed(batch.input_ids)[None].expand(model.n_streams, -1, -1, -1)
    return decoder.blocks(x, inputs)


def _model() -> XCrossModel:
    torch.manual_seed(0)
    model = XCrossModel(tiny_decoder(0), 2, LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:  # the stacked LoRA tensors: make the adapters matter
                p.normal_(0, 0.2)
    return model


def _examples(seed: int, prefixes=(3, 30)) -> list:
    """Prefixes longer than the window of 8, candidates of different lengths."""
    rnd = random.Random(seed)
    return [pack([rnd.randrange(1, 100) for _ in range(rnd.randint(*prefixes))],
                 [[rnd.randrange(1, 100) for _ in range(rnd.randint(1, 9))] for _ in range(4)]) for _ in range(3)]


def _real(batch, hidden: torch.Tensor) -> torch.Tensor:
    """The hidden states of real tokens (padding rows attend to other keys under the two rules)."""
    return hidden[:, batch.segment_ids >= 0]


def test_flex_block_masks_equal_dense_masks():
    model = _model()
    batch = collate(_examples(0), pad_id=0)
    assert batch.input_ids.shape[1] > 8 and (batch.segment_ids == -1).any(), "window and padding must be exercised"
    with torch.no_grad():
        flex, dense = (_real(batch, _streams(model, batch, b)) for b in (True, False))
    torch.testing.assert_close(flex, dense, atol=1e-5, rtol=0)


def test_flex_padding_to_a_length_multiple_changes_no_real_token():
    """CUDA batches are padded to a multiple of 128 tokens: with block masks the extra padding is masked out too."""
    model = _model()
    tight, padded = collate(_examples(1), pad_id=0), collate(_examples(1), pad_id=0, multiple=128)
    assert padded.input_ids.shape[1] > tight.input_ids.shape[1]
    with torch.no_grad():
        want = _real(tight, _streams(model, tight, False))
        got = _real(padded, _streams(model, padded, True))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
