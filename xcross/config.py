"""Model configurations for the supported decoder families, read from an HF-style `config.json`.

One dataclass per family; every architectural quirk is a named field so that the model code never guesses.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SLIDING = "sliding_attention"
FULL = "full_attention"


@dataclass(frozen=True)
class LlamaConfig:
    """Llama 2/3.x and Qwen2: pre-norm blocks, SwiGLU MLP, `w * x` RMSNorm, one RoPE base."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    rope_scaling: dict | None = None  # {"rope_type": "llama3" | "linear", ...}
    qkv_bias: bool = False  # Qwen2 has q/k/v bias but no o bias
    o_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    model_type: str = "llama"
    family: str = field(default="llama", init=False)

    # Llama scales queries by head_dim ** -0.5; Gemma 3 names its own scalar.
    @property
    def attention_scale(self) -> float:
        return self.head_dim**-0.5

    def rope_base(self, layer_type: str) -> float:
        return self.rope_theta

    def rope_scaling_for(self, layer_type: str) -> dict | None:
        return self.rope_scaling

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Gemma3Config:
    """Gemma 3 text: sandwich norms, `(1 + w)` RMSNorm, q/k norms, GeGLU, scaled embeddings, local/global layers."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float  # base of the global (full-attention) layers
    rope_local_base_freq: float  # base of the sliding-window layers
    sliding_window: int
    layer_types: tuple[str, ...]
    query_pre_attn_scalar: float
    max_position_embeddings: int
    rope_scaling: dict | None = None  # applies to the global layers only, as in the reference
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    final_logit_softcapping: float | None = None
    attn_logit_softcapping: float | None = None
    tie_word_embeddings: bool = True
    bos_token_id: int | None = 2
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = 0
    model_type: str = "gemma3_text"
    family: str = field(default="gemma3", init=False)

    @property
    def attention_scale(self) -> float:
        return self.query_pre_attn_scalar**-0.5

    def rope_base(self, layer_type: str) -> float:
        return self.rope_local_base_freq if layer_type == SLIDING else self.rope_theta

    def rope_scaling_for(self, layer_type: str) -> dict | None:
        return None if layer_type == SLIDING else self.rope_scaling

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The architecture of a decoder (one dataclass per family); a run's model settings are settings.ModelConfig.
DecoderConfig = LlamaConfig | Gemma3Config

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class ConfigError(ValueError):
    """A config.json this package cannot build a model from; the message says what to change."""


def _rope_fields(raw: dict) -> tuple[float | None, float | None, dict | None]:
    """(global base, local base, scaling) from either the transformers 4.x or the 5.x (`rope_parameters`) layout."""
    theta = raw.get("rope_theta")
    local = raw.get("rope_local_base_freq")
    scaling = raw.get("rope_scaling")
    params = raw.get("rope_parameters")
    if isinstance(params, dict):
        if FULL in params or SLIDING in params:  # per layer type (Gemma 3 in transformers 5)
            full, sliding = params.get(FULL) or {}, params.get(SLIDING) or {}
            theta = full.get("rope_theta", theta)
            local = sliding.get("rope_theta", local)
            scaling = full if full.get("rope_type", "default") != "default" else scaling
        else:
            theta = params.get("rope_theta", theta)
            scaling = params if params.get("rope_type", "default") != "default" else scaling
    if scaling is not None:
        scaling = dict(scaling)
        rope_type = scaling.get("rope_type", scaling.get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"rope scaling type {rope_type!r} is not supported (supported: {SUPPORTED_ROPE_TYPES})")
        scaling["rope_type"] = rope_type
        if rope_type == "default":
            scaling = None
    return theta, local, scaling


def _require(raw: dict, *names: str) -> None:
    missing = [n for n in names if raw.get(n) is None]
    if missing:
        raise ConfigError(f"config.json lacks required field(s) {missing}")


def config_from_dict(raw: dict) -> DecoderConfig:
    """Build the family's config from a parsed HF `config.json` (text configs nested under `text_config` too)."""
    if "text_config" in raw and "hidden_size" not in raw:
        raw = {**raw["text_config"], "architectures": raw.get("architectures")}
    model_type = raw.get("model_type", "")
    theta, local, scaling = _rope_fields(raw)
    common = dict(
        vocab_size=raw.get("vocab_size"),
        hidden_size=raw.get("hidden_size"),
        intermediate_size=raw.get("intermediate_size"),
        num_hidden_layers=raw.get("num_hidden_layers"),
        num_attention_heads=raw.get("num_attention_heads"),
    )
    _require(raw, *common)
    common["num_key_value_heads"] = raw.get("num_key_value_heads") or common["num_attention_heads"]
    common["head_dim"] = raw.get("head_dim") or common["hidden_size"] // common["num_attention_heads"]
    common["max_position_embeddings"] = raw.get("max_position_embeddings", 8192)
    tokens = {k: raw.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
    n_layers = common["num_hidden_layers"]

    if model_type in ("gemma3_text", "gemma3"):
        _require(raw, "query_pre_attn_scalar", "sliding_window")
        if raw.get("attn_logit_softcapping") is not None:
            raise ConfigError("attn_logit_softcapping is set; SDPA attention cannot apply it (Gemma 3 never sets it)")
        layer_types = raw.get("layer_types")
        if layer_types is None:
            pattern = raw.get("sliding_window_pattern") or raw.get("_sliding_window_pattern")
            if pattern is None:
                raise ConfigError("Gemma 3 config needs `layer_types` or `sliding_window_pattern`")
            layer_types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]
        cfg = Gemma3Config(
            **common,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=theta if theta is not None else 1_000_000.0,
            rope_local_base_freq=local if local is not None else 10_000.0,
            rope_scaling=scaling,
            sliding_window=raw["sliding_window"],
            layer_types=tuple(layer_types),
            query_pre_attn_scalar=raw["query_pre_attn_scalar"],
            hidden_activation=raw.get("hidden_activation") or raw.get("hidden_act") or "gelu_pytorch_tanh",
            attention_bias=bool(raw.get("attention_bias", False)),
            final_logit_softcapping=raw.get("final_logit_softcapping"),
            tie_word_embeddings=raw.get("tie_word_embeddings", True),
            model_type="gemma3_text",
            **{k: v for k, v in tokens.items() if v is not None},
        )
    elif model_type in ("llama", "qwen2", "mistral"):
        is_qwen2 = model_type == "qwen2"
        window = raw.get("sliding_window")
        layer_types = raw.get("layer_types")
        if is_qwen2 and layer_types is None:
            # Qwen2 slides only from layer `max_window_layers` on, and only when asked to.
            use = raw.get("use_sliding_window", False)
            first = raw.get("max_window_layers", n_layers)
            layer_types = [SLIDING if use and i >= first else FULL for i in range(n_layers)]
        if layer_types is None:
            layer_types = [SLIDING if window else FULL] * n_layers
        bias = bool(raw.get("attention_bias", False))
        cfg = LlamaConfig(
            **common,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=theta if theta is not None else 10_000.0,
            rope_scaling=scaling,
            qkv_bias=True if is_qwen2 else bias,
            o_bias=False if is_qwen2 else bias,
            mlp_bias=bool(raw.get("mlp_bias", False)),
            hidden_act=raw.get("hidden_act", "silu"),
            tie_word_embeddings=raw.get("tie_word_embeddings", False),
            layer_types=tuple(layer_types),
            sliding_window=window if SLIDING in layer_types else None,
            model_type=model_type,
            **tokens,
        )
    else:
        raise ConfigError(
            f"model_type {model_type!r} is not supported; xcross builds gemma3_text, llama, mistral and qwen2 decoders"
        )
    if len(cfg.layer_types) != n_layers or not set(cfg.layer_types) <= {SLIDING, FULL}:
        raise ConfigError(f"layer_types must list {n_layers} entries of {SLIDING!r}/{FULL!r}, got {cfg.layer_types}")
    if common["num_attention_heads"] % common["num_key_value_heads"]:
        raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
    return cfg


def load_config(model_dir: str | Path) -> DecoderConfig:
    """Read `<model_dir>/config.json` into the matching family config."""
    path = Path(model_dir).expanduser() / "config.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: a model directory needs config.json, *.safetensors and tokenizer.json "
            "(for the default Gemma 3 270M run `xcross-prepare gemma`)"
        )
    return config_from_dict(json.loads(path.read_text()))
