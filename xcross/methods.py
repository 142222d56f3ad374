"""Every method as one record (what it trains, how many source adapters it takes, which settings it reads, what it
saves) and its build function, all as an `XCrossModel`; the files they live in and the trainable-parameter report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .lora import (ADAPTER_FORMAT, LoRAConfig, LoRALinear, adapter_tensors, average_adapters, base_signature,
                   check_adapter, read_adapter_file, set_adapters)
from .model import Decoder
from .peft import is_peft_directory, read_peft_adapter
from .weights import load_decoder, save_tensors
from .xcross import XCrossConfig, XCrossModel, head_tensors

CHECKPOINT_FORMAT = "xcross-model/1"
HEAD_INITS = ("sources", "fresh")
Adapter = tuple[dict[str, Tensor], dict[str, Tensor], dict]  # (adapter tensors, head tensors, file config)


@dataclass(frozen=True)
class Method:
    """What one method is. `build(decoder, adapters, lora, config)` makes its model from the loaded source adapters
    (`read_adapter`'s triples, in the order of the sources)."""

    name: str
    summary: str
    trains: frozenset[str]  # the parameter groups it trains (XCrossModel.GROUPS); empty: evaluated zero-shot
    sources: tuple[int, int | None]  # fewest and most source adapters (None: any number)
    build: Callable[[Decoder, list[Adapter], LoRAConfig, XCrossConfig], XCrossModel]
    # Settings it does not read (dotted paths or their groups): they are no part of what a run of it is, so a LoRA
    # run on toys is also the toys source adapter of every arrangement, whatever their X-Cross settings.
    ignores: tuple[str, ...] = ()
    # "adapter": a source-adapter file (reloaded as method "source" of itself, usable as a source of other runs);
    # "checkpoint": its trained tensors, reloaded by building the method again from its sources
    saves: str = "checkpoint"

    @property
    def trained(self) -> bool:
        return bool(self.trains)

    @property
    def reads_sources(self) -> bool:
        return self.sources != (0, 0)

    @property
    def streams_per_source(self) -> bool:
        """One stream per source adapter (mixed or pooled), rather than one stream."""
        return self.sources[0] >= 2

    def check_sources(self, count: int) -> None:
        fewest, most = self.sources
        if count < fewest or (most is not None and count > most):
            needs = f"{fewest}" if fewest == most else f"{fewest} or more" if most is None else f"{fewest}..{most}"
            raise ValueError(f"method {self.name} takes {needs} source adapter(s), got {count}"
                             + (" (one source has nothing to mix: use merge, or source:<domain> zero-shot)"
                                if self.streams_per_source and count == 1 else ""))


def _lora(decoder, adapters, lora, config) -> XCrossModel:
    return XCrossModel(decoder, 1, lora, config)


def _head(decoder, adapters, lora, config) -> XCrossModel:
    return XCrossModel(decoder, 1, None, config)


def _streams(integrate: bool):
    def build(decoder, adapters, lora, config) -> XCrossModel:
        model = XCrossModel(decoder, len(adapters), lora, config, integrate=integrate)
        set_adapters(model.decoder, [a for a, _, _ in adapters])
        return model
    return build


def _merge(decoder, adapters, lora, config) -> XCrossModel:
    merged, merged_lora = average_adapters([a for a, _, _ in adapters], lora)
    model = XCrossModel(decoder, 1, merged_lora, config)
    set_adapters(model.decoder, [merged])
    return model


_NO_SOURCES = ("sources", "data.source_train_users", "model.xcross", "model.head_init", "train.integrator_lr")
_NO_INTEGRATORS = ("model.xcross", "train.integrator_lr")
METHODS = {m.name: m for m in (
    Method("xcross", "the n source streams mixed block by block by trained integrators; w and a head trained",
           frozenset({"integrators", "stream_weights", "head"}), (2, None), _streams(True)),
    Method("ensemble", "the n source streams unmixed (z = 0): only w and the head trained; what the integrators add",
           frozenset({"stream_weights", "head"}), (2, None), _streams(False), ignores=_NO_INTEGRATORS),
    Method("merge", "the mean of the sources' LoRA deltas as one adapter + a trained head",
           frozenset({"head"}), (1, None), _merge, ignores=_NO_INTEGRATORS),
    Method("lora", "a new LoRA adapter + head trained on the target", frozenset({"adapters", "head"}), (0, 0), _lora,
           ignores=_NO_SOURCES, saves="adapter"),
    Method("head", "the frozen base + a trained head", frozenset({"head"}), (0, 0), _head,
           ignores=(*_NO_SOURCES, "model.lora")),
    Method("source", "one source adapter + its head, zero-shot on the target", frozenset(), (1, 1), _streams(False),
           ignores=_NO_INTEGRATORS),
)}
TRAINED_METHODS = tuple(name for name, m in METHODS.items() if m.trained)


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]


# -- adapters --------------------------------------------------------------------------------------------------------


def read_adapter(path: str | Path) -> Adapter:
    """(adapter tensors, head tensors, config) of a source-adapter file, or of a PEFT LoRA directory
    (`xcross.peft.read_peft_adapter`: its head tensors are empty unless xcross exported it)."""
    if is_peft_directory(path):
        return read_peft_adapter(path)
    if Path(path).is_dir():
        raise ValueError(f"{path} is a directory but not a PEFT adapter (no adapter_config.json); an xcross adapter "
                         "is a .safetensors file")
    return read_adapter_file(path)


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
    """One construction path for every method (`METHODS`), from a base model directory (or a loaded decoder, left
    unchanged) and source-adapter files (or PEFT directories).

    `lora` is the new adapter's settings for "lora"; with source adapters their own settings are used. `head_init`:
    with source adapters the head starts as the mean of the sources' heads ("sources") or as a new head that
    scores every candidate equally ("fresh"); "source" always keeps its adapter's head, "lora" and "head" always
    start fresh. Sources without a head (a PEFT adapter) are left out of the mean; with none, the head starts fresh.
    """
    record = get_method(method)
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {HEAD_INITS} (got {head_init!r})")
    record.check_sources(len(adapters))
    decoder = base if isinstance(base, Decoder) else load_decoder(base, device, dtype)
    loaded = [read_adapter(p) for p in adapters]
    if loaded:
        lora = LoRAConfig.from_dict(loaded[0][2]["lora"])
    for path, (tensors, _, meta) in zip(adapters, loaded):
        check_adapter(str(path), tensors, meta, decoder, lora)
    model = record.build(decoder, loaded, lora, config)
    heads = [h for _, h, _ in loaded if h]  # a PEFT adapter brings no head: the mean is over those that do
    if heads and (head_init == "sources" or method == "source"):
        mean = {k.removeprefix("head."): torch.stack([h[k] for h in heads]).mean(0) for k in heads[0]}
        model.head.load_state_dict(mean)
    model.set_trainable(set(record.trains))
    return model.to(device)


# -- trained weights -------------------------------------------------------------------------------------------------


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


def save_trained(model: XCrossModel, path: Path, method: str, adapters: list[Path], extra: dict) -> None:
    """A method's trained weights as it saves them (`Method.saves`): a LoRA run's as an adapter file (usable as a
    source), the others' trained tensors with what rebuilds the model (method, source adapters) as metadata."""
    if get_method(method).saves == "adapter":
        save_adapter(model, path, extra)
        return
    save_tensors(path, trained_tensors(model), {
        "format": CHECKPOINT_FORMAT, "method": method, "adapters": [str(Path(p).absolute()) for p in adapters],
        "lora": model.lora.to_dict() if model.lora else None, **extra,
    })


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
