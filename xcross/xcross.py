"""The X-Cross model: n LoRA streams over one frozen decoder, run block by block in lockstep, an integrator after
every block mixing them, and a scoring head on their weighted sum. A plain LoRA model is the n = 1 case."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .data import Batch
from .lora import LoRAConfig, add_lora, lora_layers
from .model import Decoder

GROUPS = ("adapters", "integrators", "stream_weights", "head")


@dataclass(frozen=True)
class XCrossConfig:
    beta: float = 1.0  # weight of the "borrow from stream m'" term
    gamma: float = 1.0  # weight of the "move away from stream m'" term
    eps: float = 1e-6  # of the parameter-free RMS normalisation of the integrator's input


def rms_normalise(h: Tensor, eps: float) -> Tensor:
    h = h.float()
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)


class Integrator(nn.Module):
    """Mixes n streams after one block, per token:

    z = W [ρ(h_1); …; ρ(h_n)] + b, with z = (z¹, z²), each n·(n−1) coefficients for the ordered pairs m ≠ m'
    h'_m = h_m + Σ_{m'≠m} β z¹_{m,m'} h_{m'} + γ z²_{m,m'} (h_m − h_{m'})

    ρ is a parameter-free RMS normalisation: Gemma 3 270M's residual stream grows from an RMS of ~7 after its first
    block to ~1500 after its last, and with raw h as input the coefficients grow with it (training diverged). W and b start at zero: an untrained
    integrator leaves every stream as it is.
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
        return torch.einsum("nbtd,knd->btk", x, self.weight.view(-1, self.n, self.d)) + self.bias

    def mixing(self, z: Tensor) -> Tensor:
        """The per-token matrix M − I with h' = h + (M − I) h over the stream axis: `(B, T, n, n)`."""
        n, pairs = self.n, self.n * (self.n - 1)
        c1 = z.new_zeros(*z.shape[:-1], n * n).index_copy_(-1, self.offdiag, z[..., :pairs]).unflatten(-1, (n, n))
        c2 = z.new_zeros(*z.shape[:-1], n * n).index_copy_(-1, self.offdiag, z[..., pairs:]).unflatten(-1, (n, n))
        # Σ_{m'} γ z²_{m,m'} (h_m − h_{m'}) = γ (Σ_{m'} z²_{m,m'}) h_m − γ Σ_{m'} z²_{m,m'} h_{m'}
        beta, gamma = self.config.beta, self.config.gamma
        return beta * c1 - gamma * c2 + gamma * torch.diag_embed(c2.sum(-1))

    def forward(self, h: Tensor) -> tuple[Tensor, Tensor]:
        """The mixed streams `(n, B, T, d)` and the coefficients z that mixed them."""
        z = self.coefficients(h)
        mix = self.mixing(z).to(h.dtype)
        return h + torch.einsum("btmk,kbtd->mbtd", mix, h), z


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


def head_tensors(model: XCrossModel) -> dict[str, Tensor]:
    """The scoring head's tensors under their checkpoint names (`head.dense.weight`, ...)."""
    return {f"head.{k}": v for k, v in model.head.state_dict().items()}


class Streams(NamedTuple):
    hidden: Tensor  # (n, B, T, d), final-normed
    coefficients: list[Tensor]  # z of every integrator, one (B, T, 2·n·(n−1)) per block; empty without integrators


class Scored(NamedTuple):
    scores: Tensor  # (B, C)
    coefficients: list[Tensor]


class XCrossModel(nn.Module):
    """n streams (one frozen base + n LoRA adapters) run block by block in lockstep, mixed by integrators.

    The decoder given is not changed: the model adds its LoRA layers to a copy of the module tree that shares the
    frozen base weights. `integrate=False` keeps the streams apart (z ≡ 0: the "ensemble" baseline).
    Trainable groups: "adapters", "integrators", "stream_weights", "head"; `set_trainable` picks an explicit set.
    """

    def __init__(self, decoder: Decoder, n_streams: int = 1, lora: LoRAConfig | None = None,
                 config: XCrossConfig = XCrossConfig(), integrate: bool = True):
        super().__init__()
        if lora is None and n_streams != 1:
            raise ValueError("several streams need LoRA adapters to tell them apart")
        shared = {id(t): t for t in (*decoder.parameters(), *decoder.buffers())}
        self.decoder = copy.deepcopy(decoder, memo=shared)
        self.n_streams, self.lora, self.config = n_streams, lora, config
        if lora is not None:
            add_lora(self.decoder, lora, n_streams)
        d, n_blocks = decoder.config.hidden_size, decoder.config.num_hidden_layers
        device = decoder.model.embed_tokens.weight.device
        self.integrators = nn.ModuleList(Integrator(n_streams, d, config, device) for _ in range(n_blocks)) \
            if integrate and n_streams > 1 else None
        self.stream_weights = nn.Parameter(torch.full((n_streams,), 1.0 / n_streams, device=device))
        self.head = ScoringHead(d, device)
        self.trainable: frozenset[str] = frozenset()
        self.set_trainable({"head"})

    # -- the forward pass -------------------------------------------------------------------------------------------

    def streams(self, input_ids: Tensor, attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                segment_ids: Tensor | None = None) -> Streams:
        """Every stream through every block in lockstep, mixed after each block. A packed batch (`segment_ids`) on
        CUDA attends through FlexAttention block masks; elsewhere SDPA takes the dense boolean mask."""
        inputs = self.decoder.attention_inputs(input_ids, attention_mask, position_ids, self.n_streams,
                                               segment_ids=segment_ids if input_ids.is_cuda else None)
        x = self.decoder.embed(input_ids)[None].expand(self.n_streams, -1, -1, -1)  # (n, B, T, d)
        coefficients = []
        for i, block in enumerate(self.decoder.model.layers):
            x = block(x, inputs.rope[block.layer_type], inputs.masks[block.layer_type])
            if self.integrators is not None:
                x, z = self.integrators[i](x)  # h'_m = h_m + Σ_{m'≠m} β z¹ h_{m'} + γ z² (h_m − h_{m'})
                coefficients.append(z)
        return Streams(self.decoder.model.norm(x), coefficients)

    def forward(self, batch: Batch) -> Scored:
        """One score per candidate, from h = Σ_m w_m h'_m at the candidate's last token."""
        h, coefficients = self.streams(batch.input_ids, batch.attention_mask, batch.position_ids, batch.segment_ids)
        n, B, _, d = h.shape
        index = batch.last_index[None, :, :, None].expand(n, B, -1, d)
        h_last = torch.gather(h, 2, index).float()  # (n, B, C, d)
        pooled = torch.einsum("n,nbcd->bcd", self.stream_weights.float(), h_last)
        return Scored(self.head(pooled), coefficients)

    def score(self, batch: Batch) -> Tensor:
        return self(batch).scores  # (B, C)

    # -- what is trained --------------------------------------------------------------------------------------------

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        groups = {g: [] for g in GROUPS}
        for name, p in self.named_parameters():
            if ".lora_" in name:
                groups["adapters"].append((name, p))
            elif name.startswith("integrators."):
                groups["integrators"].append((name, p))
            elif name == "stream_weights":
                if self.n_streams > 1:  # with one stream w only rescales what the head sees
                    groups["stream_weights"].append((name, p))
            elif name.startswith("head."):
                groups["head"].append((name, p))
        return groups

    def set_trainable(self, groups: set[str]) -> None:
        if unknown := set(groups) - set(GROUPS):
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
            for layer in lora_layers(self.decoder).values():  # frozen adapters are fixed functions: no dropout
                layer.dropout.eval()
        return self

    def compile_regions(self, **options) -> None:
        """`torch.compile` every block's attention and MLP and every integrator in place: small graphs of the same
        code for every block instead of one graph of the whole depth; parameter names (and checkpoints) unchanged."""
        for block in self.decoder.model.layers:
            block.self_attn.compile(**options)
            block.mlp.compile(**options)
        for integrator in self.integrators or ():
            integrator.compile(**options)
