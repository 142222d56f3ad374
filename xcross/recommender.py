"""A trained run as a recommender: any method's model rebuilt from its run directory, ranking a user's candidate
titles after their history with the run's own prompts, packing and scorer, so that its scores are evaluation's."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from .data import PromptBuilder, collate, pack
from .experiment import load_base, model_from_run
from .rundir import RunDir
from .settings import RunConfig, UsageError, default_model_dir, resolve_device
from .tokenizer import Tokenizer
from .training import length_multiple
from .xcross import XCrossModel

User = tuple[list[str], list[str]]  # (history titles oldest first, candidate titles)


class Recommender:
    """A trained model with the prompt settings of its run: titles cut to the run's token budget, the history's
    newest `history_len` titles kept, one packed sequence `[history][cand_1]…[cand_C]` per user.

        rec = Recommender.from_run("runs/tools/xcross")
        rec.rank(["Cordless Drill 18V", "Drill Bit Set"], ["Claw Hammer", "Tape Measure", "Puzzle 1000 Pieces"])
        # [("Tape Measure", 1.93), ("Claw Hammer", 1.41), ("Puzzle 1000 Pieces", -0.52)], best first
    """

    def __init__(self, model: XCrossModel, builder: PromptBuilder, device="cpu", batch_size: int = 8,
                 config: RunConfig | None = None):
        self.model = model.eval()
        self.builder = builder
        self.device = device
        self.batch_size = batch_size
        self.config = config  # the run's, when built by from_run

    @classmethod
    def from_run(cls, run_dir: str | Path, device="cpu", dtype: torch.dtype = torch.float32,
                 batch_size: int | None = None) -> Recommender:
        """The model of a finished run of any method (lora, head, merge, ensemble, xcross), on the base it was
        trained on, with its tokenizer and prompt settings. `batch_size` (users per forward pass) defaults to the
        run's evaluation batch size: the same users in the same order then give bit-identical scores."""
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
        """`rank` for many users at once, `batch_size` users per forward pass."""
        return [sorted(zip(candidates, scores), key=lambda pair: -pair[1])
                for (_, candidates), scores in zip(users, self.score_batch(users))]

    @torch.no_grad()
    def score_batch(self, users: list[User]) -> list[list[float]]:
        """Each user's candidate scores, in the candidates' order. Users of one forward pass are packed and padded
        together as evaluation packs them; users with different numbers of candidates go in separate passes."""
        users = [(list(h), list(c)) for h, c in users]
        if empty := [i for i, (_, c) in enumerate(users) if not c]:
            raise ValueError(f"user {empty[0]} has no candidates (users {empty[:5]} of {len(users)})")
        pad = self.builder.tokenizer.pad_id or 0
        out: list[list[float]] = [[] for _ in users]
        for start in range(0, len(users), self.batch_size):
            chunk = range(start, min(start + self.batch_size, len(users)))
            for size in dict.fromkeys(len(users[i][1]) for i in chunk):
                group = [i for i in chunk if len(users[i][1]) == size]
                packed = [pack(self.builder.prefix_of_titles(users[i][0]),
                               self.builder.candidates_of_titles(users[i][1])) for i in group]
                batch = collate(packed, pad, multiple=length_multiple(self.device)).to(self.device)
                scores = self.model.score(batch).float().cpu()  # (B, C)
                for i, row in zip(group, scores.tolist()):
                    out[i] = row
        return out
