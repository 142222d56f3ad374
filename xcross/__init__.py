"""xcross: X-Cross (SIGIR 2025) in pure PyTorch: several domain-specific LoRA language models over one frozen
decoder, mixed block by block by small learned integrators, for sequential recommendation in a new domain."""

from .config import Gemma3Config, LlamaConfig, load_config
from .data import (Batch, CandidateSampler, Domain, Example, PromptBuilder, PromptTemplate, collate,
                   collate_unpacked, load_domain, pack)
from .lora import LoRAConfig, LoRALinear
from .methods import build_model, load_trained, parameter_report, read_adapter, save_adapter, trained_tensors
from .inspection import inspect_run
from .metrics import paired_difference, per_user_metrics, rank_metrics
from .model import Decoder
from .peft import export_peft, read_peft_adapter
from .recommender import Recommender
from .runtime import keep_freed_memory
from .settings import DataConfig, ModelConfig, RunConfig
from .tokenizer import Tokenizer
from .training import EvalResult, TrainConfig, evaluate, fit
from .weights import load_decoder, load_tensors, save_tensors
from .xcross import Integrator, ScoringHead, XCrossConfig, XCrossModel

__all__ = [
    "Batch", "CandidateSampler", "DataConfig", "Decoder", "Domain", "EvalResult", "Example", "Gemma3Config",
    "Integrator", "LlamaConfig", "LoRAConfig", "LoRALinear", "ModelConfig", "PromptBuilder", "PromptTemplate",
    "Recommender", "RunConfig", "ScoringHead", "Tokenizer", "TrainConfig", "XCrossConfig", "XCrossModel", "build_model", "collate",
    "collate_unpacked", "evaluate", "export_peft", "fit", "inspect_run", "keep_freed_memory", "load_config", "load_decoder", "load_domain",
    "load_tensors", "load_trained", "pack", "paired_difference", "parameter_report", "per_user_metrics", "rank_metrics", "read_adapter", "read_peft_adapter",
    "save_adapter", "save_tensors", "trained_tensors",
]
