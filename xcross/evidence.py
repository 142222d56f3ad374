"""A study's evidence: one small JSON file per scored method and seed, holding each test user's outcome and the
identity that makes it comparable (the run's settings, the content of its weights and of what it was built on, what
was scored, and where). A report is rebuilt from these files alone, and a study continued on another machine adds
to them without training again what they hold."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .files import atomic_write
from .settings import TRAINING, RunConfig, UsageError, settings_of
from .training import EvalResult

FORMAT = "xcross-evidence/1"


def outcome(result: EvalResult) -> dict[str, list[int]]:
    """Each user's true item against its candidates: how many scored above it and how many tied with it. Every
    metric of `metrics.per_user_metrics` is a function of these two numbers (ties broken in expectation)."""
    scores = np.asarray(result.scores, dtype=np.float64)
    true = scores[np.arange(len(scores)), result.labels][:, None]
    return {"above": (scores > true).sum(1).tolist(), "tied": ((scores == true).sum(1) - 1).tolist()}


def scores_of(above: list[int], tied: list[int], candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """Scores with the given outcome (true item first; `above` candidates over it, `tied` level with it, the rest
    below): they give exactly the metrics of the scores they were read from."""
    scores = np.full((len(above), candidates), -1.0, dtype=np.float32)
    for i, (a, t) in enumerate(zip(above, tied)):
        scores[i, 0] = 0.0
        scores[i, 1:1 + a] = 1.0
        scores[i, 1 + a:1 + a + t] = 0.0
    return scores, np.zeros(len(above), dtype=int)


def _jsonable(value):
    return json.loads(json.dumps(value, default=list))


@dataclass
class Evidence:
    label: str  # the study's name of the method: popularity, source:<d>, lora@0.5, xcross@1, merge, ensemble
    seed: int | None  # the training seed (None: popularity, which has none)
    record: dict  # what the file holds

    @property
    def scored(self) -> str:
        return self.record["evaluation"]["scored"]

    def result(self) -> EvalResult:
        """The scores as an EvalResult whose metrics are the run's own, with its evaluation identity."""
        users = self.record["users"]
        scores, labels = scores_of(users["above"], users["tied"], self.record["evaluation"]["candidates"])
        return EvalResult(scores, labels, users["ids"], identity=self.record["evaluation"])

    def holds(self, config: RunConfig | None, evaluation: dict) -> bool:
        """Whether this is the evidence of a run of `config` (None: popularity or a source zero-shot, whose source
        run's settings are recorded instead) scored as `evaluation` asks (its "scored" digest, or, without the data
        to compute one, the evaluation settings)."""
        if config is not None and self.record.get("settings") != _jsonable(settings_of(config, (TRAINING,))):
            return False
        own = self.record["evaluation"]
        return all(own.get(k) == v for k, v in evaluation.items())


def file_name(label: str, seed: int | None) -> str:
    """`xcross@0.5-s1.json`, `source-toys-s0.json`, `popularity.json`: the label with ':' spelled '-'."""
    stem = re.sub(r"[^A-Za-z0-9@._-]", "-", label)
    return f"{stem}.json" if seed is None else f"{stem}-s{seed}.json"


def read(directory: Path, label: str, seed: int | None) -> Evidence | None:
    """The evidence of `label` and `seed` in `directory`, None if there is none; a damaged or foreign file is
    refused by name (it would otherwise be scored again over the committed evidence)."""
    path = Path(directory) / file_name(label, seed)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        ok = record.get("format") == FORMAT and record["label"] == label and record.get("seed") == seed
        users = record["users"]
        ok = ok and len(users["ids"]) == len(users["above"]) == len(users["tied"]) == record["evaluation"]["users"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is damaged ({type(err).__name__}: {err}); restore it (git checkout) or delete it "
                         "to score that run again") from None
    if not ok:
        raise UsageError(f"{path} is not the evidence of {label} (seed {seed}) in {FORMAT}; restore or delete it")
    return Evidence(label, seed, record)


def write(directory: Path, label: str, seed: int | None, result: EvalResult, run: dict) -> Evidence:
    """Write the evidence of one scored method: `run` holds its settings, inputs, weights digest, parameters,
    timings and machine (what `study` knows of it); the users' outcomes and evaluation identity come from
    `result`."""
    record = {"format": FORMAT, "label": label, "seed": seed, **_jsonable(run),
              "evaluation": _jsonable(result.identity),
              "users": {"ids": list(result.user_ids), **outcome(result)}}
    atomic_write(Path(directory) / file_name(label, seed), _text(record))
    return Evidence(label, seed, record)


def _text(record: dict) -> str:
    """The record as indented JSON, each per-user list on one line (a file of a few kB that diffs readably)."""
    head = json.dumps({k: v for k, v in record.items() if k != "users"}, indent=1)
    users = ",\n".join(f'  "{k}": {json.dumps(v, separators=(",", ":"))}' for k, v in record["users"].items())
    return head[:-2] + ',\n "users": {\n' + users + "\n }\n}\n"
