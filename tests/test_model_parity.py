"""Our decoder against transformers' implementation on tiny random Gemma 3, Llama (llama3 RoPE) and Qwen2 models."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from xcross.weights import load_decoder  # noqa: E402

VOCAB = 97


def _randomise(model, seed=0):
    """Every parameter random (norm weights too), so that a wrong norm convention cannot hide behind zeros/ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def _gemma3(tmp_path):
    cfg = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, sliding_window=6, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"],
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        max_position_embeddings=256, pad_token_id=0,
    )
    return transformers.Gemma3ForCausalLM(cfg)


def _llama(tmp_path):
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    )
    return transformers.LlamaForCausalLM(cfg)


def _qwen2(tmp_path):
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
    )
    return transformers.Qwen2ForCausalLM(cfg)


FAMILIES = {"gemma3": _gemma3, "llama": _llama, "qwen2": _qwen2}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def pair(request, tmp_path_factory):
    """(reference model, our model) holding the same random weights, ours loaded from the saved safetensors."""
    torch.manual_seed(0)
    ref = _randomise(FAMILIES[request.param](None)).float().eval()
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path, safe_serialization=True)
    ours = load_decoder(path, dtype=torch.float32)
    return request.param, ref, ours


def test_causal_logits_match(pair):
    name, ref, ours = pair
    ids = torch.randint(1, VOCAB, (2, 21), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = ours(ids, logits_at=slice(None)).logits
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_logits_at_selected_positions(pair):
    name, ref, ours = pair
    ids = torch.randint(1, VOCAB, (2, 13), generator=torch.Generator().manual_seed(2))
    at = torch.tensor([[0, 12], [5, 7]])
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = ours(ids, logits_at=at).logits
    torch.testing.assert_close(got, torch.stack([want[0, [0, 12]], want[1, [5, 7]]]), atol=1e-4, rtol=0)


def _brute_force_packed_mask(segments, positions, window=None):
    """Allowed (q, k) pairs for a packed row, written as loops: a shared prefix (segment 0) seen causally by all,
    every other segment sees the prefix and itself causally; the window counts position ids."""
    T = len(segments)
    mask = torch.zeros(T, T, dtype=torch.bool)
    for q in range(T):
        for k in range(q + 1):
            if segments[k] == 0 or segments[k] == segments[q]:
                if window is None or positions[q] - positions[k] < window:
                    mask[q, k] = True
    return mask


def test_custom_mask_and_positions_match(pair):
    """A shared-prefix packed sequence: custom boolean mask plus position ids that restart after the prefix."""
    name, ref, ours = pair
    g = torch.Generator().manual_seed(3)
    rows = []
    for prefix, cands in ((9, [4, 3, 5]), (5, [7, 3, 6])):
        seg = [0] * prefix + [s + 1 for s, n in enumerate(cands) for _ in range(n)]
        pos = list(range(prefix)) + [prefix + i for n in cands for i in range(n)]
        rows.append((seg, pos))
    T = len(rows[0][0])
    assert all(len(s) == T for s, _ in rows)
    ids = torch.randint(1, VOCAB, (2, T), generator=g)
    positions = torch.tensor([p for _, p in rows])
    allowed = torch.stack([_brute_force_packed_mask(s, p) for s, p in rows])
    ref_masks = allowed[:, None]
    if name == "gemma3":
        window = ref.config.sliding_window
        sliding = torch.stack([_brute_force_packed_mask(s, p, window) for s, p in rows])[:, None]
        assert not torch.equal(sliding, ref_masks), "the window must cut something for this test to mean anything"
        ref_masks = {"full_attention": ref_masks, "sliding_attention": sliding}
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=ref_masks, position_ids=positions).logits
        got = ours(ids, attention_mask=allowed, position_ids=positions, logits_at=slice(None)).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


def test_padding_mask_matches(pair):
    """A right-padded batch with a (B, T) key-padding mask: valid positions agree with the reference."""
    name, ref, ours = pair
    ids = torch.randint(1, VOCAB, (2, 11), generator=torch.Generator().manual_seed(4))
    pad = torch.ones(2, 11, dtype=torch.long)
    pad[1, 7:] = 0
    with torch.no_grad():
        want = ref(input_ids=ids, attention_mask=pad).logits
        got = ours(ids, attention_mask=pad, logits_at=slice(None)).logits
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got[0], want[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(got[1, :7], want[1, :7], atol=1e-4, rtol=0)


def test_kv_cache_generation_matches_reference(pair):
    name, ref, ours = pair
    ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = ref.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)[:, 5:]
        got = ours.generate(ids, max_new_tokens=12)
    assert torch.equal(got, want)
