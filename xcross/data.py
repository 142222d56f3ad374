"""Examples, prompts and shared-prefix packing: one sequence `[prefix][cand_1]…[cand_C]` per example.

A candidate sees the whole history prefix and itself (causally), never another candidate; its position ids
continue from the prefix length, so its score equals that of a separate `[prefix][cand]` sequence.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .files import file_sha256
from .model import PAD_SEGMENT


# -- processed domains -----------------------------------------------------------------------------------------------


@dataclass
class Example:
    user_id: str
    history: list[str]  # item ids, oldest first
    target: str
    candidates: list[str] | None = None  # fixed for valid/test; drawn per epoch for training


@dataclass
class Domain:
    name: str
    items: dict[str, str]  # item id -> title
    train: list[Example]
    valid: list[Example]
    test: list[Example]
    meta: dict = field(default_factory=dict)


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_domain(path: str | Path) -> Domain:
    """Read a processed domain directory (`items.jsonl`, `train/valid/test.jsonl`, `meta.json`)."""
    path = Path(path)
    missing = [n for n in SPLIT_FILES if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{path} is not a processed domain (missing {missing}); build it with xcross-prepare")
    items = {r["item_id"]: r["title"] for r in _read_jsonl(path / "items.jsonl")}
    splits = {}
    for split in ("train", "valid", "test"):
        rows = _read_jsonl(path / f"{split}.jsonl")
        splits[split] = [Example(r["user_id"], r["history"], r["target"], r.get("candidates")) for r in rows]
    meta = json.loads((path / "meta.json").read_text()) if (path / "meta.json").is_file() else {}
    return Domain(path.name, items, splits["train"], splits["valid"], splits["test"], meta)


class TooFewItems(ValueError):
    """A user's known sequence leaves fewer items of the domain than the negatives asked for."""


def sample_candidates(rng: np.random.Generator, num_items: int, exclude: np.ndarray, target: int, c: int) -> list[int]:
    """The one negative sampler, for stored validation/test candidates and training negatives alike: the target
    and `c − 1` item indices drawn uniformly without replacement from outside `exclude` (the user's whole known
    sequence), shuffled."""
    need = c - 1
    pool = num_items - len(exclude)
    if pool < need:
        raise TooFewItems(f"a user has {len(exclude)} of the domain's {num_items} items, leaving {pool} negatives "
                          f"for {need} needed; lower --num-candidates")
    if pool < 4 * need:  # rejection would spin; draw from the explicit complement
        negatives = rng.choice(np.setdiff1d(np.arange(num_items), exclude), size=need, replace=False).tolist()
    else:  # iid draws with rejection of seen and repeated items is uniform sampling without replacement
        excluded = set(exclude.tolist())
        negatives = []
        while len(negatives) < need:
            for item in rng.integers(num_items, size=2 * need).tolist():
                if item not in excluded:
                    excluded.add(item)
                    negatives.append(item)
                    if len(negatives) == need:
                        break
    candidates = negatives + [target]
    return [candidates[j] for j in rng.permutation(c).tolist()]


class CandidateSampler:
    """Training candidates of a domain: the target and negatives from outside everything the processed domain
    knows of the user (every split's histories and targets), so a user's later purchases, their validation and
    test targets included, are never drawn as negatives."""

    def __init__(self, domain: "Domain"):
        self.item_ids = list(domain.items)
        index = {item: i for i, item in enumerate(self.item_ids)}
        known: dict[str, set[int]] = {}
        for e in (*domain.train, *domain.valid, *domain.test):
            known.setdefault(e.user_id, set()).update(index[i] for i in (*e.history, e.target))
        self.index = index
        self.known = {u: np.array(sorted(s), dtype=np.int64) for u, s in known.items()}

    def fewest_negatives(self, examples: list[Example]) -> int:
        """The fewest items outside a user's known sequence among these examples' users: the most negatives every
        one of them can be given."""
        return min(len(self.item_ids) - len(self.known.get(e.user_id, ())) for e in examples) if examples else 0

    def sample(self, example: Example, c: int, rng: np.random.Generator) -> tuple[list[str], int]:
        """(candidates, index of the target among them)."""
        exclude = self.known.get(example.user_id)
        if exclude is None:  # an example from outside the domain's splits: its own sequence is what is known
            exclude = np.array(sorted({self.index[i] for i in (*example.history, example.target)}), dtype=np.int64)
        target = self.index[example.target]
        drawn = sample_candidates(rng, len(self.item_ids), exclude, target, c)
        return [self.item_ids[i] for i in drawn], drawn.index(target)


SPLIT_FILES = ("items.jsonl", "train.jsonl", "valid.jsonl", "test.jsonl")
_digests: dict[tuple, str] = {}  # (path, size, mtime) of every file -> digest: a domain is read once per process


def domain_digest(path: str | Path) -> str:
    """A processed domain by content: sha256 over its items and splits. A run records it, so the same data in another
    directory (or on another machine) gives the same runs, and data changed in place is noticed."""
    files = [Path(path) / name for name in SPLIT_FILES]
    key = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _digests:
        _digests[key] = hashlib.sha256("".join(file_sha256(f) for f in files).encode()).hexdigest()
    return _digests[key]


# -- prompts ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptTemplate:
    """The text around the titles. The prefix is `bos header (title sep)* question`; a candidate is `title end`."""

    header: str = "A shopper bought these products, oldest first:\n"
    sep: str = "\n"
    question: str = "Next they would buy:\n"
    end: str = "\n"


class PromptBuilder:
    """Token ids of prefixes and candidates, each title cut to `title_tokens` and tokenised once per item."""

    def __init__(self, tokenizer, items: dict[str, str], title_tokens: int = 24, history_len: int = 10,
                 template: PromptTemplate = PromptTemplate()):
        self.tokenizer = tokenizer
        self.title_tokens = title_tokens
        self.history_len = history_len
        ids = list(items)
        encoded = tokenizer.encode_batch([items[i] for i in ids])
        self.titles = {i: e[:title_tokens] for i, e in zip(ids, encoded)}
        self.header = [tokenizer.bos_id, *tokenizer.encode(template.header)] if tokenizer.bos_id is not None \
            else tokenizer.encode(template.header)
        self.sep = tokenizer.encode(template.sep)
        self.question = tokenizer.encode(template.question)
        self.end = tokenizer.encode(template.end)

    def prefix(self, history: list[str]) -> list[int]:
        ids = list(self.header)
        for item in history[-self.history_len:]:
            ids += self.titles[item] + self.sep
        return ids + self.question

    def candidate(self, item: str) -> list[int]:
        return self.titles[item] + self.end

    # The same prompts from titles given as text (items outside any processed domain): `prefix_of_titles(texts)`
    # equals `prefix(ids)` and `candidates_of_titles(texts)` equals `[candidate(id) …]` when the texts are the ids'
    # titles.

    def encode_titles(self, texts: list[str]) -> list[list[int]]:
        """Token ids of titles, each cut to `title_tokens` as the domain's own titles are."""
        return [ids[: self.title_tokens] for ids in self.tokenizer.encode_batch(list(texts))]

    def prefix_of_titles(self, texts: list[str]) -> list[int]:
        ids = list(self.header)
        for title in self.encode_titles(texts[-self.history_len:]):
            ids += title + self.sep
        return ids + self.question

    def candidates_of_titles(self, texts: list[str]) -> list[list[int]]:
        return [title + self.end for title in self.encode_titles(texts)]

    def max_length(self, num_candidates: int) -> int:
        """The longest packed sequence this builder can produce: a known bound, from the title budget."""
        title = self.title_tokens
        prefix = len(self.header) + self.history_len * (title + len(self.sep)) + len(self.question)
        return prefix + num_candidates * (title + len(self.end))


# -- packing ---------------------------------------------------------------------------------------------------------


@dataclass
class Packed:
    input_ids: list[int]
    position_ids: list[int]
    segment_ids: list[int]  # 0 = prefix, k = candidate k (1-based)
    last_index: list[int]  # index of every candidate's last token


def pack(prefix: list[int], candidates: list[list[int]]) -> Packed:
    """`[prefix][cand_1]…[cand_C]` with each candidate's positions continuing from the prefix length."""
    if not prefix or any(not c for c in candidates):
        raise ValueError("the prefix and every candidate need at least one token")
    ids, pos, seg, last = list(prefix), list(range(len(prefix))), [0] * len(prefix), []
    for k, cand in enumerate(candidates, start=1):
        ids += cand
        pos += range(len(prefix), len(prefix) + len(cand))
        seg += [k] * len(cand)
        last.append(len(ids) - 1)
    return Packed(ids, pos, seg, last)


@dataclass
class Batch:
    input_ids: Tensor  # (B, T)
    position_ids: Tensor  # (B, T)
    attention_mask: Tensor | None  # (B, T, T) bool allowed pairs, (B, T) key padding, or None: causal, no padding
    last_index: Tensor  # (B, C) where every candidate's score is read
    labels: Tensor | None = None  # (B,) index of the true item among the candidates
    segment_ids: Tensor | None = None  # (B, T) of a packed batch: 0 prefix, k candidate k, -1 padding

    def to(self, device) -> "Batch":
        return Batch(**{f.name: (None if getattr(self, f.name) is None
                                 else getattr(self, f.name).to(device, non_blocking=True)) for f in fields(self)})

    def token_mask(self) -> Tensor:
        """(B, T) True at real (non-padding) tokens."""
        if self.attention_mask is None:
            return torch.ones_like(self.input_ids, dtype=torch.bool)
        if self.attention_mask.dim() == 2:
            return self.attention_mask.bool()
        return self.attention_mask.diagonal(dim1=1, dim2=2)

    @property
    def num_tokens(self) -> int:
        return int(self.token_mask().sum())


def packed_mask(segment_ids: Tensor) -> Tensor:
    """Allowed pairs `(B, T, T)`: causal, and a key is either prefix (segment 0) or in the query's own segment."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    q, k = segment_ids[:, :, None], segment_ids[:, None, :]
    return causal & ((k == 0) | (k == q)) & (k != PAD_SEGMENT) & (q != PAD_SEGMENT)


def collate(packed: list[Packed], pad_id: int, labels: list[int] | None = None, multiple: int = 1) -> Batch:
    """Right-pad packed examples into one batch (its length rounded up to `multiple`) and build its mask once,
    vectorised."""
    B, T = len(packed), -(-max(len(p.input_ids) for p in packed) // multiple) * multiple
    C = len(packed[0].last_index)
    if any(len(p.last_index) != C for p in packed):
        raise ValueError("every example of a batch needs the same number of candidates")
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros(B, T, dtype=torch.long)
    seg = torch.full((B, T), PAD_SEGMENT, dtype=torch.long)
    for b, p in enumerate(packed):
        n = len(p.input_ids)
        ids[b, :n] = torch.tensor(p.input_ids)
        pos[b, :n] = torch.tensor(p.position_ids)
        seg[b, :n] = torch.tensor(p.segment_ids)
    last = torch.tensor([p.last_index for p in packed], dtype=torch.long)
    return Batch(ids, pos, packed_mask(seg), last, None if labels is None else torch.tensor(labels), seg)


def collate_unpacked(prefix: list[int], candidates: list[list[int]], pad_id: int) -> Batch:
    """The reference layout: C separate `[prefix][cand_k]` rows (right-padded), one candidate each."""
    rows = [prefix + c for c in candidates]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    pad = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        pad[i, : len(r)] = 1
    pos = torch.arange(T).expand(len(rows), T)
    last = torch.tensor([[len(r) - 1] for r in rows])
    return Batch(ids, pos, pad, last)
