"""The real converted Gemma 3 270M against transformers loading the same GGUF with its own loader."""

import pytest
import torch

from xcross.tokenizer import Tokenizer
from xcross.weights import load_decoder

LONG = " ".join(
    f"Item {i}: a {['red', 'blue', 'green'][i % 3]} {['kettle', 'tent', 'drill', 'puzzle'][i % 4]} for "
    f"{['camping', 'cooking', 'crafts'][i % 3]}." for i in range(90)
)
PROMPTS = [
    "The capital of France is",
    "A shopper bought these products, oldest first:\nLEGO City Fire Truck\nMelissa & Doug Wooden Puzzle\n",
    LONG,  # longer than the 512-token sliding window
]


@pytest.fixture(scope="module")
def ours(gemma_dir):
    return load_decoder(gemma_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def tokenizer(gemma_dir):
    return Tokenizer.from_dir(gemma_dir)


@pytest.mark.parametrize("prompt", PROMPTS, ids=["short", "history", "long"])
def test_logits_match_transformers(prompt, ours, tokenizer, hf_gguf_model):
    ids = torch.tensor([tokenizer.encode(prompt, add_bos=True)])
    if prompt is LONG:
        assert ids.shape[1] > 512, "the long prompt must cross the sliding window"
    with torch.no_grad():
        want = hf_gguf_model(input_ids=ids).logits[0]
        got = ours(ids, logits_at=slice(None)).logits[0]
    assert (got - want).abs().max().item() < 1e-3
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_greedy_continuation_equals_transformers(ours, tokenizer, hf_gguf_model):
    """Token for token, with our KV cache against transformers' `generate`.

    With this Q4_K_M checkpoint both continue "The capital of France is" with " the capital of the country of
    France. It is the largest city ..." (no "Paris" within 20 tokens): a property of the quantised weights,
    which the next test shows do know the answer."""
    ids = torch.tensor([tokenizer.encode("The capital of France is", add_bos=True)])
    with torch.no_grad():
        want = hf_gguf_model.generate(ids, max_new_tokens=20, do_sample=False)[0, ids.shape[1]:]
    got = ours.generate(ids, max_new_tokens=20, eos_token_id=tokenizer.eos_id)[0]
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize("prompt", ["The capital of France is the city of", "Q: What is the capital of France?\nA:"])
def test_greedy_continuation_knows_paris(prompt, ours, tokenizer):
    ids = torch.tensor([tokenizer.encode(prompt, add_bos=True)])
    new = ours.generate(ids, max_new_tokens=20, eos_token_id=tokenizer.eos_id)
    assert "Paris" in tokenizer.decode(new[0].tolist())
