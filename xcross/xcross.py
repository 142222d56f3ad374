"""The X-Cross model: n LoRA streams over one frozen decoder, an integrator after every block, a scoring head.

A plain LoRA model is the n = 1 case of the same class; `build_model` makes every method of DESIGN.md §2.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .data import Batch
from .lora import LoRAConfig, add_lora, adapter_tensors, average_adapters, check_adapter, lora_layers, set_adapters
from .model import Decoder
from .weights import load_decoder, load_tensors, save_tensors

ADAPTER_FORMAT = "xcross-adapter/1"
CHECKPOINT_FORMAT = "xcross-model/1"
METHODS = ("xcross", "lora", "merge", "head", "source")
MIX_POINTS = ("block", "sublayer")
HEAD_INITS = ("sources", "fresh")


@dataclass(frozen=True)
class XCrossConfig:
    beta: float = 1.0  # weight of the "borrow from stream m'" term
    gamma: float = 1.0  # weight of the "move away from stream m'" term
    bound: float | None = None  # optional |z| bound, applied as bound · tanh(z / bound)
    eps: float = 1e-6  # of the parameter-free RMS normalisation of the integrator's input
    # "block": mix after every block, as in the paper; "sublayer": also after every attention sub-layer.
    mix_at: str = "block"

    def __post_init__(self):
        if self.mix_at not in MIX_POINTS:
            raise ValueError(f"mix_at must be one of {MIX_POINTS} (got {self.mix_at!r})")
        if self.bound is not None and not self.bound > 0:
            raise ValueError(f"the coefficient bound must be positive (got {self.bound})")

    def to_dict(self) -> dict:
        return asdict(self)


def rms_normalise(h: Tensor, eps: float) -> Tensor:
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


class Integrator(nn.Module):
    """Mixes n streams after one block (DESIGN.md §1), per token:

    z = W [ρ(h_1); …; ρ(h_n)] + b, with z = (z¹, z²), each n·(n−1) coefficients for the ordered pairs m ≠ m'
    h'_m = h_m + Σ_{m'≠m} β z¹_{m,m'} h_{m'} + γ z²_{m,m'} (h_m − h_{m'})
    """

    def __init__(self, n: int, d: int, config: XCrossConfig, device=None):
        super().__init__()
        self.n, self.d, self.config = n, d, config
        pairs = n * (n - 1)
        self.weight = nn.Parameter(torch.zeros(2 * pairs, n * d, device=device))
        self.bias = nn.Parameter(torch.zeros(2 * pairs, device=device))
        # Flat index of pair (m, m') in an n×n matrix, pairs ordered m-major with m' skipping m.
        offdiag = [m * n + k for m in range(n) for k in range(n) if k != m]
        self.register_buffer("offdiag", torch.tensor(offdiag, device=device), persistent=False)

    def coefficients(self, h: Tensor) -> Tensor:
        """z: `(B, T, 2·n·(n−1))` from the streams `h: (n, B, T, d)`."""
        x = rms_normalise(h, self.config.eps)
        z = torch.einsum("nbtd,knd->btk", x, self.weight.view(-1, self.n, self.d)) + self.bias
        if self.config.bound is not None:
            z = self.config.bound * torch.tanh(z / self.config.bound)
        return z

    def mixing(self, z: Tensor) -> Tensor:
        """The per-token matrix M − I with h' = h + (M − I) h over the stream axis: `(B, T, n, n)`."""
        n, pairs = self.n, self.n * (self.n - 1)
        c1 = z.new_zeros(*z.shape[:-1], n * n).index_copy_(-1, self.offdiag, z[..., :pairs]).unflatten(-1, (n, n))
        c2 = z.new_zeros(*z.shape[:-1], n * n).index_copy_(-1, self.offdiag, z[..., pairs:]).unflatten(-1, (n, n))
        # Σ_{m'} γ z²_{m,m'} (h_m − h_{m'}) = γ (Σ_{m'} z²_{m,m'}) h_m − γ Σ_{m'} z²_{m,m'} h_{m'}
        beta, gamma = self.config.beta, self.config.gamma
        return beta * c1 - gamma * c2 + gamma * torch.diag_embed(c2.sum(-1))

    def forward(self, h: Tensor, stats: list | None = None) -> Tensor:
        z = self.coefficients(h)
        if stats is not None:
            stats.append(z.detach())
        mix = self.mixing(z).to(h.dtype)
        return h + torch.einsum("btmk,kbtd->mbtd", mix, h)  # (n, B, T, d)


class ScoringHead(nn.Module):
    """score = v · tanh(W_p h + b_p) + c, on the pooled hidden state of a candidate's last token."""

    def __init__(self, d: int, device=None):
        super().__init__()
        self.dense = nn.Linear(d, d, device=device)
        self.out = nn.Linear(d, 1, device=device)
        nn.init.zeros_(self.out.weight)  # every candidate starts equal: the loss starts at log C
        nn.init.zeros_(self.out.bias)

    def forward(self, h: Tensor) -> Tensor:
        return self.out(torch.tanh(self.dense(h.float()))).squeeze(-1)


class XCrossModel(nn.Module):
    """n streams (one frozen base + n LoRA adapters) run block by block in lockstep, mixed by integrators.

    Trainable groups: "adapters", "integrators", "stream_weights", "head"; `set_trainable` picks an explicit set.
    """

    def __init__(self, decoder: Decoder, n_streams: int = 1, lora: LoRAConfig | None = None,
                 config: XCrossConfig = XCrossConfig(), attention: str = "auto"):
        super().__init__()
        if attention not in ("auto", "sdpa", "flex"):
            raise ValueError(f"attention must be auto, sdpa or flex (got {attention!r})")
        # "auto": FlexAttention block masks for packed batches on CUDA, SDPA with a dense boolean mask elsewhere.
        self.attention = attention
        if lora is None and n_streams != 1:
            raise ValueError("several streams need LoRA adapters to tell them apart")
        d = decoder.config.hidden_size
        device = decoder.model.embed_tokens.weight.device
        self.decoder = decoder
        self.n_streams = n_streams
        self.lora = lora
        self.config = config
        if lora is not None:
            add_lora(decoder, lora, n_streams)
        n_blocks = decoder.config.num_hidden_layers
        mixing = n_streams > 1
        self.integrators = (
            nn.ModuleList(Integrator(n_streams, d, config, device) for _ in range(n_blocks)) if mixing else None
        )
        self.attention_integrators = (
            nn.ModuleList(Integrator(n_streams, d, config, device) for _ in range(n_blocks))
            if mixing and config.mix_at == "sublayer" else None
        )
        self.stream_weights = nn.Parameter(torch.full((n_streams,), 1.0 / n_streams, device=device))
        self.head = ScoringHead(d, device)
        self.trainable: frozenset[str] = frozenset()
        self.set_trainable({"head"})

    # -- parameters -------------------------------------------------------------------------------------------------

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        groups = {"adapters": [], "integrators": [], "stream_weights": [], "head": []}
        for name, p in self.named_parameters():
            if ".lora_" in name:
                groups["adapters"].append((name, p))
            elif name.startswith(("integrators.", "attention_integrators.")):
                groups["integrators"].append((name, p))
            elif name == "stream_weights":
                if self.n_streams > 1:  # with one stream w only rescales what the head sees
                    groups["stream_weights"].append((name, p))
            elif name.startswith("head."):
                groups["head"].append((name, p))
        return groups

    def set_trainable(self, groups: set[str]) -> None:
        unknown = set(groups) - {"adapters", "integrators", "stream_weights", "head"}
        if unknown:
            raise ValueError(f"unknown parameter groups {sorted(unknown)}")
        self.requires_grad_(False)
        for group in groups:
            for _, p in self.parameter_groups()[group]:
                p.requires_grad_(True)
        self.trainable = frozenset(groups)
        self.train(self.training)

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for g in sorted(self.trainable) for n, p in self.parameter_groups()[g]]

    def train(self, mode: bool = True):
        super().train(mode)
        if "adapters" not in self.trainable:
            # Frozen adapters are fixed functions: no dropout on them.
            for layer in lora_layers(self.decoder).values():
                layer.dropout.eval()
        return self

    def parameter_report(self) -> dict:
        """Trainable parameters by group, next to a target LoRA (one adapter of this rank and targets + head)."""
        groups = self.parameter_groups()
        count = {g: sum(p.numel() for _, p in ps) for g, ps in groups.items()}
        trainable = sum(count[g] for g in self.trainable)
        head = count["head"]
        if self.lora is not None:
            per_adapter = count["adapters"] // self.n_streams
            lora_rank = self.lora.rank
        else:
            per_adapter, lora_rank = None, None
        lora_target = per_adapter + head if per_adapter is not None else None
        return {
            "trainable": trainable,
            "trainable_by_group": {g: count[g] for g in sorted(self.trainable)},
            "target_lora_equivalent": lora_target,
            "ratio_to_target_lora": trainable / lora_target if lora_target else None,
            "lora_rank": lora_rank,
            "frozen": sum(p.numel() for p in self.parameters()) - trainable,
        }

    def compile_regions(self, **options) -> None:
        """`torch.compile` every block's attention and MLP and every integrator in place. Regional compilation:
        small graphs of the same code for every block, instead of one graph of the whole depth; parameter names,
        and so checkpoints, do not change."""
        for block in self.decoder.model.layers:
            block.self_attn.compile(**options)
            block.mlp.compile(**options)
        for integrators in (self.integrators, self.attention_integrators):
            for integrator in integrators or ():
                integrator.compile(**options)

    # -- forward ----------------------------------------------------------------------------------------------------

    def streams(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                stats: dict | None = None, segment_ids: Tensor | None = None) -> Tensor:
        """Final-normed hidden states of every stream, `(n, B, T, d)`; `stats` (if given) collects every
        integrator's coefficients z, under "block" (and "attention" when mixing after sub-layers too)."""
        use_flex = segment_ids is not None and (self.attention == "flex" or
                                                (self.attention == "auto" and input_ids.is_cuda))
        inputs = self.decoder.attention_inputs(input_ids, attention_mask, position_ids, self.n_streams,
                                               segment_ids=segment_ids if use_flex else None)
        x = self.decoder.embed(input_ids)[None].expand(self.n_streams, -1, -1, -1)  # (n, B, T, d)

        def recording(integrators, key):
            if integrators is None or stats is None:
                return integrators
            stats[key] = []
            return [lambda h, i=i: i(h, stats[key]) for i in integrators]

        return self.decoder.blocks(x, inputs, recording(self.integrators, "block"),
                                   attention_mixers=recording(self.attention_integrators, "attention"))

    def pooled(self, batch: Batch, stats: dict | None = None) -> Tensor:
        """h = Σ_m w_m h'_m at every candidate's last token: `(B, C, d)` in fp32."""
        h = self.streams(batch.input_ids, batch.attention_mask, batch.position_ids, stats, batch.segment_ids)
        n, B, _, d = h.shape
        index = batch.last_index[None, :, :, None].expand(n, B, -1, d)
        h_last = torch.gather(h, 2, index).float()  # (n, B, C, d)
        return torch.einsum("n,nbcd->bcd", self.stream_weights.float(), h_last)

    def score(self, batch: Batch, stats: dict | None = None) -> Tensor:
        """One score per candidate: `(B, C)`; `stats` as in `streams`."""
        return self.head(self.pooled(batch, stats))

    @torch.no_grad()
    def coefficient_stats(self, batch: Batch, stats: dict | None = None) -> list[dict]:
        """Per block: mean and max |z¹|, |z²| over the batch's real tokens (for the training log); with mixing
        after sub-layers too, the attention integrator's under "attention". `stats` are the coefficients a
        `score(batch, stats)` call collected (the training step's own forward); without them, a forward computes
        them. Under torchrun the figures cover every process's share of the batch, so every process must call it."""
        if self.integrators is None:
            return []
        if stats is None:
            stats = {}
            self.pooled(batch, stats)
        valid = batch.token_mask()  # (B, T)
        pairs = self.n_streams * (self.n_streams - 1)
        sums, maxes = [], []  # per mixing point: (Σ|z¹|, Σ|z²|, entries of each) and (max |z¹|, max |z²|)
        for z in stats["block"] + stats.get("attention", []):
            z = z[valid].abs().float()
            z1, z2 = z[:, :pairs], z[:, pairs:]
            sums.append(torch.stack([z1.sum(), z2.sum(), z1.new_tensor(z1.numel())]))
            maxes.append(torch.stack([z1.max(), z2.max()]))
        sums, maxes = torch.stack(sums), torch.stack(maxes)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
        rows = [{"z1_mean": s1 / n, "z1_max": m1, "z2_mean": s2 / n, "z2_max": m2}
                for (s1, s2, n), (m1, m2) in zip(sums.tolist(), maxes.tolist())]
        out, attention = rows[:len(stats["block"])], rows[len(stats["block"]):]
        for record, extra in zip(out, attention):
            record["attention"] = extra
        return out

    # -- saving and loading -----------------------------------------------------------------------------------------

    def head_tensors(self) -> dict[str, Tensor]:
        return {f"head.{k}": v for k, v in self.head.state_dict().items()}

    def trained_tensors(self) -> dict[str, Tensor]:
        """What training changed: adapters (as one-stream adapter tensors when n = 1), integrators, w, head."""
        out = {}
        if "adapters" in self.trainable:
            out.update(adapter_tensors(self.decoder, 0))
        out.update({n: p for g in ("integrators", "stream_weights") if g in self.trainable
                    for n, p in self.parameter_groups()[g]})
        out.update(self.head_tensors())
        return out

    def save_adapter(self, path: str | Path, extra: dict | None = None) -> None:
        """Write this n = 1 model's adapter and head as a source-adapter file."""
        if self.n_streams != 1 or self.lora is None:
            raise ValueError("save_adapter needs a one-stream LoRA model")
        tensors = {**adapter_tensors(self.decoder, 0), **self.head_tensors()}
        save_tensors(path, tensors, {"format": ADAPTER_FORMAT, "lora": self.lora.to_dict(),
                                     "base": base_signature(self.decoder), **(extra or {})})

    def load_trained(self, tensors: dict[str, Tensor]) -> None:
        """Load tensors written by `trained_tensors` (strict on their names and shapes)."""
        adapters = {k: v for k, v in tensors.items() if ".lora_" in k}
        if adapters:
            check_adapter(adapters, self.lora, self.decoder, self.lora, "checkpoint")
            set_adapters(self.decoder, [adapters])
        own = dict(self.named_parameters())
        with torch.no_grad():
            for name, t in tensors.items():
                if ".lora_" in name:
                    continue
                if name not in own or own[name].shape != t.shape:
                    raise ValueError(f"checkpoint tensor {name} {tuple(t.shape)} does not fit this model")
                own[name].copy_(t)


def base_signature(decoder: Decoder) -> dict:
    """What an adapter must agree on with the base it is loaded onto."""
    c = decoder.config
    return {"model_type": c.model_type, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "intermediate_size": c.intermediate_size, "num_attention_heads": c.num_attention_heads,
            "num_key_value_heads": c.num_key_value_heads, "head_dim": c.head_dim}


def read_adapter(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Tensor], dict]:
    """(adapter tensors, head tensors, config) of a source-adapter file."""
    tensors, config = load_tensors(path)
    if config.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} is not an xcross adapter file (format {config.get('format')!r})")
    adapter = {k: v for k, v in tensors.items() if ".lora_" in k}
    head = {k: v for k, v in tensors.items() if k.startswith("head.")}
    return adapter, head, config


def _average_heads(heads: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    return {k: torch.stack([h[k] for h in heads]).mean(0) for k in heads[0]}


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
    """One construction path for every method, from a base model directory (or a loaded decoder) and adapter files.

    - "lora": a new target adapter + head (n = 1); "head": frozen base + head; "source": one adapter + its head,
      nothing trainable (zero-shot); "merge": the mean of the sources' deltas as one adapter + a head;
      "xcross": the n source adapters stacked, integrators, w and a head.
    `head_init`: with source adapters the head starts as the mean of the sources' heads ("sources") or as a new
    head that scores every candidate equally ("fresh"); a "lora" or "head" run always starts fresh.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if head_init not in HEAD_INITS:
        raise ValueError(f"head_init must be one of {HEAD_INITS} (got {head_init!r})")
    decoder = base if isinstance(base, Decoder) else load_decoder(base, device, dtype)
    needs = {"lora": (0, 1), "head": (0, 0), "source": (1, 1), "merge": (1, None), "xcross": (1, None)}[method]
    if len(adapters) < needs[0] or (needs[1] is not None and len(adapters) > needs[1]):
        raise ValueError(f"method {method!r} takes {needs[0]}..{needs[1] or 'n'} adapter files, got {len(adapters)}")
    loaded = [read_adapter(p) for p in adapters]
    signature = base_signature(decoder)
    for path, (_, _, cfg) in zip(adapters, loaded):
        if cfg["base"] != signature:
            diff = {k: (cfg["base"].get(k), v) for k, v in signature.items() if cfg["base"].get(k) != v}
            raise ValueError(f"{path} was trained on another base model: (adapter, this base) differ in {diff}")
    if loaded:
        lora = LoRAConfig.from_dict(loaded[0][2]["lora"])
    if method == "head":
        model = XCrossModel(decoder, 1, None, config)
    elif method == "merge":
        merged, merged_cfg = average_adapters([a for a, _, _ in loaded], lora)
        model = XCrossModel(decoder, 1, merged_cfg, config)
        check_adapter(merged, merged_cfg, decoder, merged_cfg, "merged adapters")
        set_adapters(decoder, [merged])
    else:
        n = max(len(loaded), 1)
        model = XCrossModel(decoder, n, lora, config)
        for path, (adapter, _, cfg) in zip(adapters, loaded):
            check_adapter(adapter, LoRAConfig.from_dict(cfg["lora"]), decoder, lora, str(path))
        if loaded:
            set_adapters(decoder, [a for a, _, _ in loaded])
    if loaded and (head_init == "sources" or method == "source"):
        head = _average_heads([h for _, h, _ in loaded])
        model.head.load_state_dict({k.removeprefix("head."): v for k, v in head.items()})
    model.set_trainable({
        "lora": {"adapters", "head"}, "head": {"head"}, "source": set(), "merge": {"head"},
        "xcross": {"integrators", "stream_weights", "head"},
    }[method])
    return model.to(device)
