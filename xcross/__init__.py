"""xcross: X-Cross (SIGIR 2025) in pure PyTorch: several domain-specific LoRA language models over one frozen
decoder, mixed block by block by small learned integrators, for sequential recommendation in a new domain."""

from .config import Gemma3Config, LlamaConfig, load_config
from .data import Batch, Domain, Example, PromptBuilder, PromptTemplate, collate, collate_unpacked, load_domain, pack
from .lora import LoRAConfig, LoRALinear
from .metrics import per_user_metrics, rank_metrics
from .model import Decoder
from .runtime import keep_freed_memory
from .tokenizer import Tokenizer
from .training import EvalResult, TrainConfig, evaluate, fit
from .weights import load_decoder
from .xcross import Integrator, ScoringHead, XCrossConfig, XCrossModel, build_model

__all__ = [
    "Batch", "Decoder", "Domain", "EvalResult", "Example", "Gemma3Config", "Integrator", "LlamaConfig", "LoRAConfig",
    "LoRALinear", "PromptBuilder", "PromptTemplate", "ScoringHead", "Tokenizer", "TrainConfig", "XCrossConfig",
    "XCrossModel", "build_model", "collate", "collate_unpacked", "evaluate", "fit", "keep_freed_memory", "load_config",
    "load_decoder", "load_domain", "pack", "per_user_metrics", "rank_metrics",
]
