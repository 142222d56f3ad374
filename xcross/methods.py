"""Every method as an `XCrossModel`, and the files they live in: source-adapter files, trained-weight checkpoints,
the one check that an adapter fits a base, and the trainable-parameter report."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from .lora import LoRAConfig, LoRALinear, adapter_tensors, average_adapters, set_adapters
from .model import Decoder
from .weights import load_decoder, load_tensors, save_tensors
from .xcross import XCrossConfig, XCrossModel

ADAPTER_FORMAT = "xcross-adapter/1"
CHECKPOINT_FORMAT = "xcross-model/1"
METHODS = ("xcross", "lora", "merge", "ensemble", "head", "source")
HEAD_INITS = ("sources", "fresh")
# Method -> (fewest, most) source adapters, and the parameter groups it trains.
ADAPTERS_TAKEN = {"lora": (0, 0), "head": (0, 0), "source": (1, 1), "merge": (1, None), "ensemble": (1, None),
                  "xcross": (1, None)}
TRAINED_GROUPS = {"lora": {"adapters", "head"}, "head": {"head"}, "source": set(), "merge": {"head"},
                  "ensemble": {"stream_weights", "head"}, "xcross": {"integrators", "stream_weights", "head"}}


# -- adapters and their base -----------------------------------------------------------------------------------------


def base_signature(decoder: Decoder) -> dict:
    """What an adapter must agree on with the base it is loaded onto: the shapes, and the weights' fingerprint
    where the base was loaded from a directory."""
    c = decoder.config
    signature = {"model_type": c.model_type, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
                 "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
                 "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim}
    if getattr(decoder, "fingerprint", None):
        signature["fingerprint"] = decoder.fingerprint
    return signature


def is_peft_directory(path: str | Path) -> bool:
    """Whether `path` is a PEFT LoRA directory (it holds adapter_config.json) rather than an adapter file."""
    return (Path(path) / "adapter_config.json").is_file()


def read_adapter(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    """(adapter tensors, head tensors, config) of a source-adapter file, or of a PEFT LoRA directory
    (`xcross.peft.read_peft_adapter`: its head tensors are empty unless xcross exported it)."""
    if is_peft_directory(path):
        from .peft import read_peft_adapter  # deferred: xcross.peft builds on this module
        return read_peft_adapter(path)
    if Path(path).is_dir():
        raise ValueError(f"{path} is a directory but not a PEFT adapter (no adapter_config.json); an xcross adapter "
                         "is a .safetensors file")
    tensors, config = load_tensors(path)
    if config.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not an xcross adapter file (format {config.get('format')!r})")
    adapter = {k: v for k, v in tensors.items() if ".lora_" in k}
    head = {k: v for k, v in tensors.items() if k.startswith("head.")}
    return adapter, head, config


def check_adapter(source: str, tensors: dict[str, Tensor], config: dict, decoder: Decoder,
                  expected: LoRAConfig | None = None) -> None:
    """The one compatibility check of an adapter (`config`: its file's metadata) against a base decoder and, if
    given, the LoRA settings a run asks for. Fails with a message naming what differs."""
    if config.get("base") is not None:  # keys both sides record (an in-memory base has no fingerprint)
        signature = base_signature(decoder)
        diff = {k: (config["base"][k], v) for k, v in signature.items()
                if k in config["base"] and config["base"][k] != v}
        if diff:
            raise ValueError(f"{source} was trained on another base model: (adapter, this base) differ in {diff}")
    lora = LoRAConfig.from_dict(config["lora"])
    if expected is not None:
        for key in ("rank", "alpha", "targets"):
            have, want = getattr(lora, key), getattr(expected, key)
            if (set(have) != set(want)) if key == "targets" else have != want:
                raise ValueError(f"{source}: adapter {key} {have} != expected {key} {want}")
    linears = {name: m for name, m in decoder.named_modules()
               if isinstance(m, (nn.Linear, LoRALinear)) and name.rsplit(".", 1)[-1] in lora.targets}
    want = {f"{n}.lora_{p}" for n in linears for p in "AB"}
    got = {k for k in tensors if ".lora_" in k}
    if want != got:
        missing, extra = sorted(want - got), sorted(got - want)
        raise ValueError(f"{source}: adapter layers differ from the model: missing {missing[:3]}, extra {extra[:3]}")
    for name, layer in linears.items():
        for part, shape in (("A", (lora.rank, layer.in_features)), ("B", (layer.out_features, lora.rank))):
            t = tensors[f"{name}.lora_{part}"]
            if tuple(t.shape) != shape:
                raise ValueError(f"{source}: {name}.lora_{part} has shape {tuple(t.shape)} but the model needs "
                                 f"{shape} (was the adapter trained on another base model?)")


# -- building every method -------------------------------------------------------------------------------------------


def build_model(
    base: str | Path | Decoder,
    method: str = "xcross",
    adapters: list[str | Path] = (),
    lora: LoRAConfig = LoRAConfig(),
    config: XCrossConfig = XCrossConfig(),
    device="cpu",
    dtype: torch.dtype = torch.float32,
    head_init: str = "sources",
) -> XCrossModel:
    """One construction path for every method, from a base model directory (or a loaded decoder, left unchanged)
    and source-adapter files.

    - "lora": a new target adapter + head (n = 1); "head": frozen base + head; "source": one adapter + its head,
      nothing trainable (zero-shot); "merge": the mean of the sources' deltas as one adapter + a head;
      "ensemble": the n source streams unmixed (z ≡ 0), w and a head; "xcross": the n streams, integrators, w, head.
    `head_init`: with source adapters the head starts as the mean of the sources' heads ("sources") or as a new
    head that scores every candidate equally ("fresh"); a "lora" or "head" run always starts fresh. Sources without
    a head (a PEFT adapter) are left out of the mean; with none, the head starts fresh.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {HEAD_INITS} (got {head_init!r})")
    fewest, most = ADAPTERS_TAKEN[method]
    if len(adapters) < fewest or (most is not None and len(adapters) > most):
        raise ValueError(f"method {method!r} takes {fewest}..{most or 'n'} adapter files, got {len(adapters)}")
    decoder = base if isinstance(base, Decoder) else load_decoder(base, device, dtype)
    loaded = [read_adapter(p) for p in adapters]
    for path, (tensors, _, meta) in zip(adapters, loaded):
        check_adapter(str(path), tensors, meta, decoder, LoRAConfig.from_dict(loaded[0][2]["lora"]))
    if loaded:
        lora = LoRAConfig.from_dict(loaded[0][2]["lora"])
    if method == "head":
        model = XCrossModel(decoder, 1, None, config)
    elif method == "merge":
        merged, merged_lora = average_adapters([a for a, _, _ in loaded], lora)
        model = XCrossModel(decoder, 1, merged_lora, config)
        set_adapters(model.decoder, [merged])
    else:
        model = XCrossModel(decoder, max(len(loaded), 1), lora, config, integrate=method != "ensemble")
        if loaded:
            set_adapters(model.decoder, [a for a, _, _ in loaded])
    heads = [h for _, h, _ in loaded if h]  # a PEFT adapter brings no head: the mean is over those that do
    if heads and (head_init == "sources" or method == "source"):
        mean = {k.removeprefix("head."): torch.stack([h[k] for h in heads]).mean(0) for k in heads[0]}
        model.head.load_state_dict(mean)
    model.set_trainable(TRAINED_GROUPS[method])
    return model.to(device)


# -- trained weights -------------------------------------------------------------------------------------------------


def head_tensors(model: XCrossModel) -> dict[str, Tensor]:
    return {f"head.{k}": v for k, v in model.head.state_dict().items()}


def trained_tensors(model: XCrossModel) -> dict[str, Tensor]:
    """What training changed: adapters (as one-stream adapter tensors when n = 1), integrators, w, head."""
    out = {}
    if "adapters" in model.trainable:
        out.update(adapter_tensors(model.decoder, 0))
    groups = model.parameter_groups()
    out.update({n: p for g in ("integrators", "stream_weights") if g in model.trainable for n, p in groups[g]})
    out.update(head_tensors(model))
    return out


def save_adapter(model: XCrossModel, path: str | Path, extra: dict | None = None) -> None:
    """Write a one-stream LoRA model's adapter and head as a source-adapter file."""
    if model.n_streams != 1 or model.lora is None:
        raise ValueError("save_adapter needs a one-stream LoRA model")
    tensors = {**adapter_tensors(model.decoder, 0), **head_tensors(model)}
    save_tensors(path, tensors, {"format": ADAPTER_FORMAT, "lora": model.lora.to_dict(),
                                 "base": base_signature(model.decoder), **(extra or {})})


def load_trained(model: XCrossModel, tensors: dict[str, Tensor]) -> None:
    """Load tensors written by `trained_tensors` (strict on their names and shapes)."""
    adapters = {k: v for k, v in tensors.items() if ".lora_" in k}
    if adapters:
        check_adapter("checkpoint", adapters, {"lora": model.lora.to_dict()}, model.decoder)
        set_adapters(model.decoder, [adapters])
    own = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            if ".lora_" in name:
                continue
            if name not in own or own[name].shape != t.shape:
                raise ValueError(f"checkpoint tensor {name} {tuple(t.shape)} does not fit this model")
            own[name].copy_(t)


# -- parameter counts ------------------------------------------------------------------------------------------------


def parameter_report(model: XCrossModel, target_lora: LoRAConfig | None = None) -> dict:
    """Trainable parameters by group, next to a target LoRA + head: one adapter of `target_lora` (default: the
    model's own rank and targets; for "merge" pass the sources' config, since its adapter holds all n of them)."""
    target_lora = target_lora or model.lora
    groups = model.parameter_groups()
    count = {g: sum(p.numel() for _, p in ps) for g, ps in groups.items()}
    trainable = sum(count[g] for g in model.trainable)
    lora_target = None
    if target_lora is not None:
        layers = {n: m for n, m in model.decoder.named_modules()
                  if n.rsplit(".", 1)[-1] in target_lora.targets and isinstance(m, (nn.Linear, LoRALinear))}
        adapter = sum(target_lora.rank * (m.in_features + m.out_features) for m in layers.values())
        lora_target = adapter + count["head"]
    return {
        "trainable": trainable,
        "trainable_by_group": {g: count[g] for g in sorted(model.trainable)},
        "target_lora_equivalent": lora_target,
        "ratio_to_target_lora": trainable / lora_target if lora_target else None,
        "lora_rank": target_lora.rank if target_lora else None,
        "frozen": sum(p.numel() for p in model.parameters()) - trainable,
    }
