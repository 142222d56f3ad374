"""Tiny random decoders for tests that need a model but not pretrained weights."""

import torch

from xcross.config import config_from_dict
from xcross.model import Decoder

TINY_GEMMA = {
    "model_type": "gemma3_text", "vocab_size": 101, "hidden_size": 32, "intermediate_size": 48,
    "num_hidden_layers": 3, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 16,
    "sliding_window": 8, "query_pre_attn_scalar": 16, "max_position_embeddings": 512,
    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
    "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0,
}


def tiny_decoder(seed: int = 0, **overrides) -> Decoder:
    """A randomly initialised tiny Gemma 3 (norm weights random too), in fp32 and eval mode."""
    torch.manual_seed(seed)
    model = Decoder(config_from_dict({**TINY_GEMMA, **overrides}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.normal_(0, 0.3)
    return model.eval().requires_grad_(False)
