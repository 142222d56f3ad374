"""A trained run as a recommender: any method's model rebuilt from its run directory, ranking a user's candidate
titles after their history with the run's own prompts, packing and scorer, so that its scores are evaluation's."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from .data import Batch, PromptBuilder, collate, pack
from .experiment import load_base, model_from_run
from .rundir import RunDir
from .settings import RunConfig, UsageError, default_model_dir, resolve_device
from .tokenizer import Tokenizer
from .training import length_multiple
from .xcross import XCrossModel

User = tuple[list[str], list[str]]  # (history titles oldest first, candidate titles)

# The longest packed sequence a forward pass gets. A sequence grows with the candidates behind its prefix, and its
# (B, T, T) attention mask and scores with the square of that (docs/PERFORMANCE.md, "Ranking many candidates"); a
# user with more candidates than fit is scored in further sequences behind the same prefix. Shared-prefix packing
# makes each candidate's score independent of the others, so the split changes scores by rounding only.
TOKENS_PER_SEQUENCE = 2048


class Recommender:
    """A trained model with the prompt settings of its run: titles cut to the run's token budget, the history's
    newest `history_len` titles kept, one packed sequence `[history][cand_1]…[cand_C]` per user, or with more than
    `max_candidates` candidates several such sequences of at most that many, each behind the user's history.

        rec = Recommender.from_run("runs/tools/xcross")
        rec.rank(["Cordless Drill 18V", "Drill Bit Set"], ["Claw Hammer", "Tape Measure", "Puzzle 1000 Pieces"])
        # [("Tape Measure", 1.93), ("Claw Hammer", 1.41), ("Puzzle 1000 Pieces", -0.52)], best first
    """

    def __init__(self, model: XCrossModel, builder: PromptBuilder, device="cpu", batch_size: int = 8,
                 config: RunConfig | None = None, max_candidates: int | None = None):
        self.model = model.eval()
        self.builder = builder
        self.device = device
        self.batch_size = batch_size
        self.config = config  # the run's, when built by from_run
        # Candidates per packed sequence: by default as many as fit TOKENS_PER_SEQUENCE with the longest prefix and
        # candidates the title budget allows, so that no sequence is longer whatever the titles (one at least,
        # should a run's history alone fill it).
        longest_candidate = builder.max_length(1) - builder.max_length(0)
        self.max_candidates = max_candidates or max(1, (TOKENS_PER_SEQUENCE - builder.max_length(0))
                                                    // longest_candidate)

    @classmethod
    def from_run(cls, run_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int | None = None) -> Recommender:
        """The model of a finished run of any method (lora, head, merge, ensemble, xcross), on the base it was
        trained on, with its tokenizer and prompt settings. `batch_size` (packed sequences per forward pass: users,
        unless one has more than `max_candidates` candidates) defaults to the run's evaluation batch size: the same
        users in the same order then give bit-identical scores."""
        run = RunDir.load(run_dir)
        config = run.config()
        model_dir = Path(config.model.model_dir or default_model_dir()).expanduser()
        if not (model_dir / "config.json").is_file():
            raise UsageError(f"{run.path} was trained on the base model at {model_dir}, which is missing "
                             "(no config.json there)")
        device = resolve_device(device)
        decoder = load_base(replace(config, model=replace(config.model, model_dir=str(model_dir))), device, dtype)
        try:
            model = model_from_run(run, decoder)
        except ValueError as err:  # an adapter or checkpoint that does not fit the base
            raise UsageError(f"{run.path}: {err}") from err
        builder = PromptBuilder(Tokenizer.from_dir(model_dir), {}, config.data.title_tokens, config.data.history_len)
        return cls(model, builder, device, batch_size or config.train.eval_batch_size, config)

    def rank(self, history: list[str], candidates: list[str]) -> list[tuple[str, float]]:
        """`(title, score)` of every candidate, highest score first (ties keep the candidates' order)."""
        return self.rank_batch([(history, candidates)])[0]

    def rank_batch(self, users: list[User]) -> list[list[tuple[str, float]]]:
        """`rank` for many users at once, `batch_size` packed sequences per forward pass."""
        return [sorted(zip(candidates, scores), key=lambda pair: -pair[1])
                for (_, candidates), scores in zip(users, self.score_batch(users))]

    @torch.no_grad()
    def score_batch(self, users: list[User]) -> list[list[float]]:
        """Each user's candidate scores, in the candidates' order (`packed_batches` says how they are batched)."""
        users = [(list(h), list(c)) for h, c in users]
        out = [[0.0] * len(candidates) for _, candidates in users]
        for slots, batch in self.packed_batches(users):
            scores = self.model.score(batch.to(self.device)).float().cpu()  # (B, C)
            for (user, first), row in zip(slots, scores.tolist()):
                out[user][first:first + len(row)] = row
        return out

    def packed_batches(self, users: list[User]) -> Iterator[tuple[list[tuple[int, int]], Batch]]:
        """The forward passes of `score_batch`: `(slots, batch)`, slot b = (user, index of the first candidate that
        row b scores). Each user's candidates are cut into sequences of at most `max_candidates` behind the user's
        prefix; `batch_size` sequences go in one pass, packed and padded together as evaluation packs them, those
        with different numbers of candidates in separate passes. When no user has more than `max_candidates`, a
        sequence is a user, and the same users in the same order give evaluation's scores bit for bit."""
        if empty := [i for i, (_, c) in enumerate(users) if not len(c)]:
            raise ValueError(f"user {empty[0]} has no candidates (users {empty[:5]} of {len(users)})")
        pad, k = self.builder.tokenizer.pad_id or 0, self.max_candidates

        def sequences() -> Iterator[tuple[int, int, list[int], list[list[int]]]]:
            """(user, first candidate, prefix ids, candidates' ids), tokenised as the passes need them."""
            for user, (history, titles) in enumerate(users):
                prefix, candidates = self.builder.prefix_of_titles(list(history)), \
                    self.builder.candidates_of_titles(list(titles))
                for first in range(0, len(candidates), k):
                    yield user, first, prefix, candidates[first:first + k]

        pending = sequences()
        while window := list(itertools.islice(pending, self.batch_size)):
            for size in dict.fromkeys(len(s[3]) for s in window):
                group = [s for s in window if len(s[3]) == size]
                batch = collate([pack(prefix, candidates) for _, _, prefix, candidates in group], pad,
                                multiple=length_multiple(self.device))
                yield [(user, first) for user, first, _, _ in group], batch
