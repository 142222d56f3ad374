"""PEFT LoRA adapter directories in and out: one is read as an xcross source adapter, and any one-stream xcross
adapter is written as one that `peft.PeftModel.from_pretrained` loads, with the xcross scoring head beside it.

PEFT's format is read and written with safetensors and json only; `peft` itself is a test reference, never imported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from .files import atomic_directory
from .lora import DEFAULT_TARGETS, LoRAConfig, adapter_tensors, base_signature, read_adapter_file
from .weights import load_tensors, read_safetensors, save_tensors
from .xcross import XCrossModel, head_tensors

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
# The scoring head of an exported adapter, beside PEFT's files: keys `dense.weight` (d, d), `dense.bias` (d,),
# `out.weight` (1, d), `out.bias` (1,), all fp32; its JSON metadata (under "config") has HEAD_FORMAT, the formula,
# the adapter's LoRA settings and the base signature.
HEAD_FILE = "xcross_head.safetensors"
HEAD_FORMAT = "xcross-head/1"
SCORE_FORMULA = ("score = out.weight @ tanh(dense.weight @ h + dense.bias) + out.bias, h: the final-normed hidden "
                 "state (transformers' hidden_states[-1]) at a candidate's last token")
PEFT_FORMAT = "peft-lora"  # the "format" of the config `read_peft_adapter` returns
KEY_PREFIX = "base_model.model."  # PEFT's prefix of the wrapped model's module names

# PEFT settings under which an adapter is no longer plain LoRA (`y = W x + s B A x` on the listed linears); each
# must hold its plain value (None, False, or empty when absent), else the adapter is refused by name.
NOT_PLAIN = ("use_dora", "rank_pattern", "alpha_pattern", "modules_to_save", "layers_to_transform", "fan_in_fan_out",
             "lora_bias", "use_qalora", "trainable_token_indices", "target_parameters", "layer_replication",
             "megatron_config", "alora_invocation_tokens", "use_bdlora", "arrow_config", "monteclora_config",
             "kasa_config", "velora_config")
# Initialisations that also rewrite the base weights (W - s B A): the adapter belongs to that rewritten base.
# PEFT's `save_pretrained(path_initial_model_for_weight_conversion=...)` turns such an adapter into plain LoRA.
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


def is_peft_directory(path: str | Path) -> bool:
    """Whether `path` is a PEFT LoRA directory (it holds adapter_config.json) rather than an adapter file."""
    return (Path(path) / PEFT_CONFIG).is_file()


def _is_plain(value) -> bool:
    return value is None or value is False or (isinstance(value, (list, tuple, dict, str)) and not value)


def base_name(model_dir: str | Path) -> str | None:
    """The name a base model directory records for itself: `_name_or_path` of its config.json (transformers 4
    wrote it; 5 does not), or None."""
    path = Path(model_dir).expanduser() / "config.json"
    name = json.loads(path.read_text()).get("_name_or_path") if path.is_file() else None
    return name or None


def check_peft_config(path: str | Path, config: dict) -> None:
    """Refuse, naming the setting, a PEFT adapter config that is not plain LoRA on xcross's target linears."""
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path}: peft_type {config.get('peft_type')!r} is not supported; xcross reads LORA adapters")
    refused = [f"{k}={config[k]!r}" for k in NOT_PLAIN if not _is_plain(config.get(k))]
    if config.get("bias", "none") != "none":
        refused.append(f"bias={config['bias']!r}")
    init = config.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
        refused.append(f"init_lora_weights={init!r} (it rewrites the base weights; re-save the adapter with "
                       "path_initial_model_for_weight_conversion to make it plain LoRA)")
    targets = config.get("target_modules")
    if isinstance(targets, (list, tuple)) and (outside := sorted(set(targets) - set(DEFAULT_TARGETS))):
        refused.append(f"target_modules {outside} (xcross adapts only {', '.join(DEFAULT_TARGETS)})")
    if refused:
        raise ValueError(f"{path}: PEFT settings xcross does not support: {'; '.join(refused)}")


def read_peft_adapter(path: str | Path, model_dir: str | Path | None = None
                      ) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    """(adapter tensors, head tensors, config) of a PEFT LoRA directory, as `methods.read_adapter` gives them.

    The adapter's targets are the linears its weights are for (any subset of q/k/v/o/gate/up/down_proj). rsLoRA's
    scaling alpha / sqrt(r) becomes alpha' = alpha · sqrt(r), so that xcross's alpha' / r is the same. A PEFT
    adapter has no scoring head: the head tensors are empty, unless the directory was written by `export_peft`
    (its `xcross_head.safetensors`, whose base signature then goes into the config for `check_adapter`). With
    `model_dir`, PEFT's `base_model_name_or_path` must equal, as a string, the name that directory records
    (`base_name`), where both have one; shapes are checked against a decoder by `lora.check_adapter`.
    """
    path = Path(path)
    config_path, weights_path = path / PEFT_CONFIG, path / PEFT_WEIGHTS
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not a PEFT adapter directory: no {PEFT_CONFIG}")
    if not weights_path.is_file():
        found = ", ".join(sorted(p.name for p in path.iterdir()))
        raise FileNotFoundError(f"{path} has no {PEFT_WEIGHTS} (found: {found}); xcross reads only safetensors: "
                                "re-save the adapter with save_pretrained(..., safe_serialization=True)")
    peft = json.loads(config_path.read_text())
    check_peft_config(path, peft)
    name = peft.get("base_model_name_or_path") or None
    if model_dir is not None and name is not None and (own := base_name(model_dir)) is not None and own != name:
        raise ValueError(f"{path} is an adapter for base {name!r} (base_model_name_or_path in {PEFT_CONFIG}), but "
                         f"{model_dir} is {own!r} (_name_or_path in its config.json)")

    raw, _ = read_safetensors(weights_path, dtype=torch.float32)
    adapter, unexpected = {}, []
    for key, tensor in raw.items():
        module, _, part = key.removeprefix(KEY_PREFIX).rpartition(".lora_")
        if not key.startswith(KEY_PREFIX) or part not in ("A.weight", "B.weight") or \
                module.rsplit(".", 1)[-1] not in DEFAULT_TARGETS:
            unexpected.append(key)
            continue
        adapter[f"{module}.lora_{part[0]}"] = tensor
    if unexpected or not adapter:
        raise ValueError(f"{weights_path}: tensors that are not LoRA A/B weights of {', '.join(DEFAULT_TARGETS)}: "
                         f"{sorted(unexpected)[:3] or 'none at all'}")
    rank = int(peft["r"])
    if ranks := sorted({t.shape[0] for k, t in adapter.items() if k.endswith("lora_A")} - {rank}):
        raise ValueError(f"{weights_path}: lora_A of rank {ranks} but {PEFT_CONFIG} says r = {rank}")
    used = {k.rsplit(".", 2)[-2] for k in adapter}
    alpha = float(peft["lora_alpha"])
    rslora = bool(peft.get("use_rslora", False))
    lora = LoRAConfig(rank=rank, alpha=alpha * math.sqrt(rank) if rslora else alpha,
                      dropout=float(peft.get("lora_dropout") or 0.0),
                      targets=tuple(t for t in DEFAULT_TARGETS if t in used))

    head, extra = {}, {"base": None}
    if (path / HEAD_FILE).is_file():
        tensors, meta = load_tensors(path / HEAD_FILE)
        head = {f"head.{k}": v for k, v in tensors.items()}
        extra = {k: v for k, v in meta.items() if k not in ("format", "score", "lora")}
        extra.setdefault("base", None)
    source = {"path": str(path), "base_model_name_or_path": name, "r": rank, "lora_alpha": peft["lora_alpha"],
              "use_rslora": rslora, "target_modules": peft.get("target_modules"), "task_type": peft.get("task_type")}
    return adapter, head, {"format": PEFT_FORMAT, "lora": lora.to_dict(), **extra, "peft": source}


def export_peft(adapter: str | Path | XCrossModel, out_dir: str | Path,
                base_model_name_or_path: str | None = None) -> Path:
    """Write an xcross adapter as a PEFT LoRA directory: adapter_config.json, adapter_model.safetensors and the
    scoring head as `xcross_head.safetensors` (see HEAD_FILE), all at once (the directory appears complete).

    `adapter`: an adapter file (a source's, a LoRA run's best.safetensors, or anything `read_adapter` reads), or a
    one-stream LoRA `XCrossModel` (e.g. `build_model(..., "merge", ...)`). `base_model_name_or_path` is recorded for
    PEFT's `AutoPeftModel` (the HF id or path of the base); PEFT's scaling alpha / r equals xcross's.
    """
    if isinstance(adapter, XCrossModel):
        if adapter.n_streams != 1 or adapter.lora is None:
            raise ValueError(f"PEFT holds one LoRA adapter; this model has {adapter.n_streams} stream(s) and "
                             f"{'no' if adapter.lora is None else 'LoRA'} adapters: export a one-stream LoRA model")
        tensors, head, lora = adapter_tensors(adapter.decoder, 0), head_tensors(adapter), adapter.lora
        extra = {"base": base_signature(adapter.decoder)}
    else:
        tensors, head, config = read_peft_adapter(adapter) if is_peft_directory(adapter) else read_adapter_file(adapter)
        lora = LoRAConfig.from_dict(config["lora"])
        extra = {k: v for k, v in config.items() if k not in ("format", "lora", "peft")}
    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir / PEFT_CONFIG).is_file() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} exists and is not a PEFT adapter directory; it would be replaced")
    alpha = int(lora.alpha) if float(lora.alpha).is_integer() else lora.alpha
    peft = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
        "r": lora.rank, "lora_alpha": alpha, "target_modules": sorted(lora.targets), "lora_dropout": lora.dropout,
        "bias": "none", "use_rslora": False, "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "init_lora_weights": True, "inference_mode": True,
    }
    weights = {f"{KEY_PREFIX}{k}.weight": v.detach().float().contiguous().cpu() for k, v in tensors.items()}
    with atomic_directory(out_dir) as tmp:
        (tmp / PEFT_CONFIG).write_text(json.dumps(peft, indent=2) + "\n")
        save_file(weights, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})
        if head:
            save_tensors(tmp / HEAD_FILE, {k.removeprefix("head."): v.float() for k, v in head.items()},
                         {"format": HEAD_FORMAT, "score": SCORE_FORMULA, "lora": lora.to_dict(), **extra})
    return out_dir

