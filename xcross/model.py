"""The decoder: Gemma 3 text and Llama/Qwen2 families, with module names equal to the HF checkpoint keys.

Every block runs on `(n, B, T, d)` activations: n parallel streams (one per LoRA adapter, n = 1 for a plain model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import FULL, SLIDING, Gemma3Config, LlamaConfig, DecoderConfig

try:  # FlexAttention (torch >= 2.5): block-sparse masks, used for packed batches on CUDA
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # pragma: no cover - older torch: SDPA with dense masks only
    BlockMask = create_block_mask = flex_attention = None

PAD_SEGMENT = -1


class RMSNorm(nn.Module):
    """RMSNorm in fp32. Gemma stores `w` and multiplies by `(1 + w)` before casting; Llama casts, then `w *`."""

    def __init__(self, dim: int, eps: float, unit_offset: bool):
        super().__init__()
        self.eps = eps
        self.unit_offset = unit_offset
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (h * (1.0 + self.weight.float())).type_as(x)
        return self.weight * h.type_as(x)


def rope_inv_freq(config: DecoderConfig, layer_type: str, device=None) -> Tensor:
    """Inverse RoPE frequencies for one layer type, with the "linear" and "llama3" scalings of the reference."""
    dim = config.head_dim
    base = config.rope_base(layer_type)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = config.rope_scaling_for(layer_type)
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    # llama3: keep high frequencies, divide low ones by `factor`, interpolate smoothly in between.
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def rope_tables(config: DecoderConfig, layer_type: str, position_ids: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos/sin for rotate-half RoPE at the given positions: `(B, 1, T, head_dim)` each, computed in fp32."""
    inv_freq = rope_inv_freq(config, layer_type, position_ids.device)
    freqs = position_ids[..., None].float() * inv_freq  # (B, T, head_dim / 2)
    emb = torch.cat((freqs, freqs), dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


@dataclass
class AttentionInputs:
    """What attention needs besides the activations, built once per forward for every layer type.

    `rope[t]` is `(cos, sin)` of shape `(B, 1, T, head_dim)`; `masks[t]` is a boolean `(n·B, 1, T, T_k)` mask
    (True = may attend), a FlexAttention `BlockMask` over the n·B rows, or None for plain causal attention.
    """

    rope: dict[str, tuple[Tensor, Tensor]]
    masks: dict[str, "Tensor | BlockMask | None"]


_compiled_flex = None


def _flex(q: Tensor, k: Tensor, v: Tensor, block_mask, scale: float, gqa: bool) -> Tensor:
    """FlexAttention, compiled on CUDA (the eager version materialises scores and is only a reference)."""
    global _compiled_flex
    if q.is_cuda:
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention, dynamic=False)
        return _compiled_flex(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    return flex_attention(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)


def packed_block_masks(segment_ids: Tensor, position_ids: Tensor, n_streams: int, layer_types: set[str],
                       window: int | None) -> dict:
    """FlexAttention block masks of a packed batch (the rule of `xcross.data.packed_mask`, the window measured in
    position ids), one per layer type, over the n·B stream rows. Padding rows attend to nothing (FlexAttention
    returns zeros there, where SDPA would return NaN)."""
    B, T = segment_ids.shape

    def packed(b, h, q, k):
        b = b % B  # row b of stream m is example b mod B
        seg_q, seg_k = segment_ids[b, q], segment_ids[b, k]
        return (k <= q) & ((seg_k == 0) | (seg_k == seg_q)) & (seg_k != PAD_SEGMENT) & (seg_q != PAD_SEGMENT)

    def sliding(b, h, q, k):
        return packed(b, h, q, k) & (position_ids[b % B, q] - position_ids[b % B, k] < window)

    rules = {FULL: packed, SLIDING: sliding}
    return {t: create_block_mask(rules[t], n_streams * B, None, T, T, device=segment_ids.device) for t in layer_types}


class KVCache:
    """Preallocated keys/values for greedy generation (one stream); `length` tokens are filled."""

    def __init__(self, config: DecoderConfig, batch: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        self.keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.length = 0
        self.max_len = max_len

    def update(self, layer_idx: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} tokens > max_len {self.max_len}")
        self.keys[layer_idx][:, :, self.length : end] = k
        self.values[layer_idx][:, :, self.length : end] = v
        return self.keys[layer_idx][:, :, :end], self.values[layer_idx][:, :, :end]


_SDPA_HAS_GQA = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 5)


class Attention(nn.Module):
    def __init__(self, config: DecoderConfig, layer_idx: int):
        super().__init__()
        d, hd = config.hidden_size, config.head_dim
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = hd
        self.scale = config.attention_scale
        qkv_bias = config.attention_bias if isinstance(config, Gemma3Config) else config.qkv_bias
        o_bias = config.attention_bias if isinstance(config, Gemma3Config) else config.o_bias
        self.q_proj = nn.Linear(d, self.num_heads * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(d, self.num_kv_heads * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(d, self.num_kv_heads * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(self.num_heads * hd, d, bias=o_bias)
        if isinstance(config, Gemma3Config):
            self.q_norm = RMSNorm(hd, config.rms_norm_eps, unit_offset=True)
            self.k_norm = RMSNorm(hd, config.rms_norm_eps, unit_offset=True)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None, cache: KVCache | None = None):
        n, B, T, _ = x.shape
        q = self.q_proj(x).view(n, B, T, self.num_heads, self.head_dim).transpose(2, 3)  # (n, B, H, T, hd)
        k = self.k_proj(x).view(n, B, T, self.num_kv_heads, self.head_dim).transpose(2, 3)
        v = self.v_proj(x).view(n, B, T, self.num_kv_heads, self.head_dim).transpose(2, 3)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope  # (B, 1, T, hd) broadcasts over streams and heads
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        q, k, v = q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1)  # (n·B, heads, T, hd)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if BlockMask is not None and isinstance(mask, BlockMask):
            out = _flex(q, k, v, mask, self.scale, self.num_kv_heads != self.num_heads)
        else:
            gqa = {}
            if self.num_kv_heads != self.num_heads:
                if _SDPA_HAS_GQA:  # shares each key/value head across its query heads without copying
                    gqa = {"enable_gqa": True}
                else:
                    groups = self.num_heads // self.num_kv_heads
                    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.scale,
                                                 **gqa)
        out = out.view(n, B, self.num_heads, T, self.head_dim).transpose(2, 3).reshape(n, B, T, -1)
        return self.o_proj(out)


_ACTIVATIONS = {
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "silu": F.silu,
}


class MLP(nn.Module):
    """Gated MLP: GeGLU (tanh) for Gemma, SwiGLU for Llama."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        d, f = config.hidden_size, config.intermediate_size
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = nn.Linear(d, f, bias=bias)
        self.up_proj = nn.Linear(d, f, bias=bias)
        self.down_proj = nn.Linear(f, d, bias=bias)
        name = config.hidden_activation if isinstance(config, Gemma3Config) else config.hidden_act
        if name not in _ACTIVATIONS:
            raise ValueError(f"activation {name!r} is not supported ({sorted(_ACTIVATIONS)})")
        self.act = _ACTIVATIONS[name]

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class GemmaBlock(nn.Module):
    """Gemma 3 block: every sub-layer is normalised before and after ("sandwich" norms)."""

    def __init__(self, config: Gemma3Config, layer_idx: int):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.layer_type = config.layer_types[layer_idx]
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(d, eps, unit_offset=True)
        self.post_attention_layernorm = RMSNorm(d, eps, unit_offset=True)
        self.pre_feedforward_layernorm = RMSNorm(d, eps, unit_offset=True)
        self.post_feedforward_layernorm = RMSNorm(d, eps, unit_offset=True)

    def forward(self, x: Tensor, rope, mask, cache: KVCache | None = None) -> Tensor:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rope, mask, cache))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class LlamaBlock(nn.Module):
    """Llama/Qwen2 block: pre-norm attention and MLP (`post_attention_layernorm` is the MLP's input norm)."""

    def __init__(self, config: LlamaConfig, layer_idx: int):
        super().__init__()
        d, eps = config.hidden_size, config.rms_norm_eps
        self.layer_type = config.layer_types[layer_idx]
        self.self_attn = Attention(config, layer_idx)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(d, eps, unit_offset=False)
        self.post_attention_layernorm = RMSNorm(d, eps, unit_offset=False)

    def forward(self, x: Tensor, rope, mask, cache: KVCache | None = None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """The `model.*` part of the checkpoint: embeddings, blocks, final norm."""

    def __init__(self, config: DecoderConfig):
        super().__init__()
        gemma = isinstance(config, Gemma3Config)
        block = GemmaBlock if gemma else LlamaBlock
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, unit_offset=gemma)


@dataclass
class DecoderOutput:
    hidden_states: Tensor  # (B, T, d) after the final norm, or (n, B, T, d) for several streams
    logits: Tensor | None  # (B, K, vocab) at the positions asked for


class Decoder(nn.Module):
    """A causal LM whose parameter names are the HF keys (`model.layers.3.self_attn.q_proj.weight`).

    `forward` takes token ids, an optional boolean mask (`(B, T)` key padding or `(B, T, T)` allowed pairs) and
    explicit position ids, and returns final hidden states plus logits only where `logits_at` asks for them.
    """

    def __init__(self, config: DecoderConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = None if config.tie_word_embeddings else nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    # -- pieces the X-Cross model reuses -------------------------------------------------------------------------

    def embed(self, input_ids: Tensor) -> Tensor:
        x = self.model.embed_tokens(input_ids)
        if isinstance(self.config, Gemma3Config):
            # The reference multiplies by sqrt(d) rounded to the activation dtype; so do we, to match in bf16.
            x = x * torch.tensor(self.config.hidden_size**0.5).to(x.dtype)
        return x

    def attention_inputs(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        n_streams: int = 1,
        cache: KVCache | None = None,
        segment_ids: Tensor | None = None,
    ) -> AttentionInputs:
        """RoPE tables and masks for every layer type, built once per batch (vectorised).

        With `segment_ids` (a packed batch: 0 = shared prefix, k = candidate k, -1 = padding) the masks are
        FlexAttention block masks, which skip the blocks no query of a candidate may see; otherwise dense."""
        B, T = input_ids.shape
        device = input_ids.device
        past = cache.length if cache is not None else 0
        q_idx = torch.arange(past, past + T, device=device)
        if position_ids is None:
            position_ids = q_idx.expand(B, T)
        dtype = self.model.embed_tokens.weight.dtype
        layer_types = set(self.config.layer_types)
        rope = {t: rope_tables(self.config, t, position_ids, dtype) for t in layer_types}

        window = self.config.sliding_window
        if segment_ids is not None:
            if flex_attention is None:
                raise RuntimeError("FlexAttention needs torch >= 2.5; pass the dense mask instead of segment ids")
            if past:
                raise ValueError("packed (segment) masks cannot be combined with a KV cache")
            return AttentionInputs(rope, packed_block_masks(segment_ids, position_ids, n_streams, layer_types, window))
        needs_window = SLIDING in layer_types and window is not None and past + T > window
        if attention_mask is None and past == 0 and not needs_window:
            return AttentionInputs(rope, {t: None for t in layer_types})

        k_idx = torch.arange(past + T, device=device)
        if attention_mask is not None and attention_mask.dim() == 3:
            if past:
                raise ValueError("a (B, T, T) attention mask cannot be combined with a KV cache")
            allowed = attention_mask.bool()
        else:
            allowed = (k_idx[None, :] <= q_idx[:, None]).expand(B, T, past + T)
            if attention_mask is not None:  # (B, T_k) key padding
                allowed = allowed & attention_mask.bool()[:, None, :]
        masks = {FULL: allowed}
        if SLIDING in layer_types:
            # The window is measured in position ids, so packed candidates see the same keys as unpacked ones.
            k_pos = position_ids if past == 0 else k_idx.expand(B, past + T)
            masks[SLIDING] = allowed & (position_ids[:, :, None] - k_pos[:, None, :] < window)
        out = {}
        for t in layer_types:
            m = masks[t]
            if m.shape[1] == m.shape[2]:
                # Padding rows attend to themselves so that no softmax row is empty (which would give NaN).
                m = m | torch.eye(T, dtype=torch.bool, device=device)
            out[t] = m[:, None].repeat(n_streams, 1, 1, 1)  # (n·B, 1, T, T_k)
        return AttentionInputs(rope, out)

    def blocks(self, x: Tensor, inputs: AttentionInputs, cache: KVCache | None = None) -> Tensor:
        """Run all blocks on `(n, B, T, d)` streams (n = 1 for the plain LM) and the final norm."""
        for block in self.model.layers:
            x = block(x, inputs.rope[block.layer_type], inputs.masks[block.layer_type], cache)
        return self.model.norm(x)

    def logits(self, hidden: Tensor) -> Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = hidden @ weight.T
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    # -- the plain causal LM -------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        logits_at: Tensor | slice | None = None,
        cache: KVCache | None = None,
    ) -> DecoderOutput:
        """`logits_at`: None (no logits), a slice of positions, or a `(B, K)` tensor of indices."""
        inputs = self.attention_inputs(input_ids, attention_mask, position_ids, 1, cache)
        x = self.embed(input_ids)[None]  # (1, B, T, d)
        hidden = self.blocks(x, inputs, cache=cache)[0]
        if cache is not None:
            cache.length += input_ids.shape[1]
        logits = None
        if isinstance(logits_at, slice):
            logits = self.logits(hidden[:, logits_at])
        elif logits_at is not None:
            picked = torch.gather(hidden, 1, logits_at[..., None].expand(-1, -1, hidden.shape[-1]))
            logits = self.logits(picked)
        return DecoderOutput(hidden, logits)

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int = 20, eos_token_id: int | None = None) -> Tensor:
        """Greedy decoding with a KV cache; `input_ids` is `(B, T)` without padding. Returns the new tokens."""
        B, T = input_ids.shape
        param = self.model.embed_tokens.weight
        cache = KVCache(self.config, B, T + max_new_tokens, param.device, param.dtype)
        out = self(input_ids, logits_at=slice(-1, None), cache=cache)
        new = []
        done = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
        for _ in range(max_new_tokens):
            token = out.logits[:, -1].argmax(-1)  # (B,)
            new.append(token)
            if eos_token_id is not None:
                done |= token == eos_token_id
                if bool(done.all()):
                    break
            out = self(token[:, None], logits_at=slice(-1, None), cache=cache)
        return torch.stack(new, dim=1)
