"""LoRA with n adapters stacked in one layer: stream m of an `(n, B, T, in)` input goes through adapter m; and the
adapter file (one adapter + its scoring head, with the base it was trained on), with the one check that an adapter
fits a base.

The base `weight` (and bias) stay the layer's own parameters, so base checkpoint keys never change.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .weights import load_tensors

ADAPTER_FORMAT = "xcross-adapter/1"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: tuple[str, ...] = DEFAULT_TARGETS

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def from_dict(cls, d: dict) -> "LoRAConfig":
        return cls(rank=int(d["rank"]), alpha=float(d["alpha"]), dropout=float(d.get("dropout", 0.0)),
                   targets=tuple(d["targets"]))


class LoRALinear(nn.Module):
    """`y_m = x_m W^T + b + s · x_m A_m^T B_m^T` for each stream m, with `A: (n, r, in)`, `B: (n, out, r)`."""

    def __init__(self, base: nn.Linear, n: int, config: LoRAConfig):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.bias = base.bias
        # fp32 whatever the base dtype: bf16 parameters would round most AdamW updates away.
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(n, config.rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(n, self.out_features, config.rank, device=device))
        for a in self.lora_A.data:  # as nn.Linear / PEFT initialise A; B = 0 makes the adapter a no-op
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def n(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.merged:
            return y
        n = self.n
        if x.shape[0] != n:
            raise ValueError(f"LoRALinear holds {n} adapters but got {x.shape[0]} streams (shape {tuple(x.shape)})")
        # Adapters are trained in fp32 and applied in the activation dtype.
        a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
        h = self.dropout(x).reshape(n, -1, self.in_features)  # (n, B·T, in)
        delta = torch.bmm(torch.bmm(h, a.transpose(1, 2)), b.transpose(1, 2))  # (n, B·T, out)
        return y + self.scaling * delta.view_as(y)

    def delta_weight(self) -> Tensor:
        """`s · B A` of the single adapter, `(out, in)`."""
        if self.n != 1:
            raise ValueError("merge/unmerge needs exactly one adapter (n = 1)")
        return self.scaling * (self.lora_B[0] @ self.lora_A[0])

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into a new weight tensor; the base weight, which other models may share, is kept."""
        if not self.merged:
            self._base_weight = (self.weight,)  # a tuple, so that it is not registered as a parameter
            self.weight = nn.Parameter(self.weight + self.delta_weight().to(self.weight.dtype), requires_grad=False)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.weight, = self._base_weight
            self.merged = False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, n={self.n}, rank={self.lora_A.shape[1]}"


def add_lora(module: nn.Module, config: LoRAConfig, n: int) -> dict[str, LoRALinear]:
    """Replace every `nn.Linear` whose attribute name is in `config.targets` by a LoRALinear with n adapters."""
    replaced = {}
    for parent_name, parent in list(module.named_modules()):
        for child_name, child in list(parent.named_children()):
            if child_name in config.targets and isinstance(child, nn.Linear):
                layer = LoRALinear(child, n, config)
                setattr(parent, child_name, layer)
                replaced[f"{parent_name}.{child_name}" if parent_name else child_name] = layer
    found = {name.rsplit(".", 1)[-1] for name in replaced}
    if missing := set(config.targets) - found:
        raise ValueError(f"LoRA targets {sorted(missing)} match no linear layer of the model")
    return replaced


def lora_layers(module: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in module.named_modules() if isinstance(m, LoRALinear)}


def adapter_tensors(module: nn.Module, stream: int = 0) -> dict[str, Tensor]:
    """One adapter's tensors: `<layer>.lora_A` `(r, in)` and `<layer>.lora_B` `(out, r)` for every LoRA layer."""
    out = {}
    for name, layer in lora_layers(module).items():
        out[f"{name}.lora_A"] = layer.lora_A[stream]
        out[f"{name}.lora_B"] = layer.lora_B[stream]
    return out


@torch.no_grad()
def set_adapters(module: nn.Module, adapters: list[dict[str, Tensor]]) -> None:
    """Stack n single adapters (as from `adapter_tensors`) into the model's n-adapter LoRA layers."""
    for name, layer in lora_layers(module).items():
        if len(adapters) != layer.n:
            raise ValueError(f"{len(adapters)} adapters given for layers holding {layer.n}")
        layer.lora_A.copy_(torch.stack([a[f"{name}.lora_A"] for a in adapters]))
        layer.lora_B.copy_(torch.stack([a[f"{name}.lora_B"] for a in adapters]))


def average_adapters(adapters: list[dict[str, Tensor]], config: LoRAConfig) -> tuple[dict[str, Tensor], LoRAConfig]:
    """One adapter whose delta is exactly the mean of the given deltas: rank n·r, `[A_1; …; A_n]`, `[B_1 … B_n] / n`.

    Alpha grows by n so that the scaling alpha / rank, and with it every delta, is unchanged.
    """
    n = len(adapters)
    merged = {}
    for key in adapters[0]:
        if key.endswith(".lora_A"):
            merged[key] = torch.cat([a[key] for a in adapters], dim=0)
        else:
            merged[key] = torch.cat([a[key] for a in adapters], dim=1) / n
    return merged, LoRAConfig(rank=config.rank * n, alpha=config.alpha * n, dropout=config.dropout,
                              targets=config.targets)


# -- adapter files ---------------------------------------------------------------------------------------------------


def base_signature(decoder) -> dict:
    """What an adapter must agree on with the base it is loaded onto: the shapes, and the weights' fingerprint
    where the base was loaded from a directory."""
    c = decoder.config
    signature = {"model_type": c.model_type, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
                 "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
                 "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim}
    if getattr(decoder, "fingerprint", None):
        signature["fingerprint"] = decoder.fingerprint
    return signature


def read_adapter_file(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    """(adapter tensors, head tensors, config) of an xcross adapter file (`ADAPTER_FORMAT`); a file that cannot be
    read whole, or holds non-finite values, is refused naming it (ValueError)."""
    try:
        tensors, config = load_tensors(path)
    except FileNotFoundError:
        raise
    except Exception as err:  # noqa: BLE001 - a cut or foreign file: safetensors' own error types too
        raise ValueError(f"{path} cannot be read as an adapter file ({type(err).__name__}: {err})") from None
    if config.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not an xcross adapter file (format {config.get('format')!r})")
    if bad := next((k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())),
                   None):
        raise ValueError(f"{path} has non-finite values in {bad}: train it again")
    adapter = {k: v for k, v in tensors.items() if ".lora_" in k}
    head = {k: v for k, v in tensors.items() if k.startswith("head.")}
    return adapter, head, config


def check_adapter(source: str, tensors: dict[str, Tensor], config: dict, decoder,
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
