"""A run's directory as an object: where each of its files lives, and its identity (method, target, fraction,
seed, sources). The directory name is made from the identity and never parsed back; the identity is read from the
run's own config.json."""

from __future__ import annotations

import fcntl
import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from .files import atomic_write
from .settings import RunConfig, UsageError

# Paths of a configuration that say how a run is evaluated or executed, not what it trains: a finished run is
# reused whatever they are (evaluation re-scores it under the comparison's own settings).
NOT_IDENTITY = ("out", "preset", "preset_reason", "train_sources", "model.device", "model.compile",
                "data.max_eval_users", "data.num_candidates", "data.eval_seed", "train.eval_batch_size",
                "train.loggers")
# What may change when an interrupted run is resumed: where and how it executes, never what it computes.
RESUMABLE_CHANGES = ("out", "preset", "preset_reason", "train_sources", "model.device", "model.compile",
                     "train.loggers")
# What a method does not read: a LoRA run on a target uses no source, so the sources it was listed with are not part
# of what it is (an arrangement's source adapter on `toys` is also the `lora` run of the arrangement targeting toys).
UNUSED_BY = {"lora": ("sources",)}
# What a source adapter is a product of: a finished source run is reused by any run that agrees on these.
SOURCE_IDENTITY = ("model.model_dir", "model.lora", "data", "train.seed")


# Paths compared by the directory they name, so `data/amazon` run from /work and `/work/data/amazon` agree.
PATH_KEYS = ("data.data_dir", "model.model_dir")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def differences(saved: RunConfig, wanted: RunConfig, only: tuple[str, ...] | None = None,
                ignore: tuple[str, ...] = NOT_IDENTITY) -> list[str]:
    """Dotted paths (with both values) where two configurations differ, within `only` and outside `ignore` and
    what the saved run's method does not read (`UNUSED_BY`)."""
    a, b = _flatten(saved.to_dict()), _flatten(wanted.to_dict())
    ignore = (*ignore, *UNUSED_BY.get(saved.method, ()))

    def within(key: str, paths) -> bool:
        return any(key == p or key.startswith(p + ".") for p in paths)

    def same(k: str) -> bool:
        x, y = a.get(k), b.get(k)
        if k in PATH_KEYS and isinstance(x, str) and isinstance(y, str):
            return Path(x).expanduser().resolve() == Path(y).expanduser().resolve()
        return x == y

    keys = [k for k in sorted(set(a) | set(b)) if (only is None or within(k, only)) and not within(k, ignore)]
    return [f"{k}: {a.get(k)!r} there, {b.get(k)!r} here" for k in keys if not same(k)]


@dataclass(frozen=True)
class RunDir:
    out: Path
    target: str
    method: str
    fraction: float = 1.0
    seed: int = 0

    @classmethod
    def of(cls, config: RunConfig) -> RunDir:
        return cls(Path(config.out), config.target, config.method, config.fraction, config.train.seed)

    @classmethod
    def load(cls, path: str | Path) -> RunDir:
        """The run in `path` (wherever it now lives: also moved, or written with a `--out` relative to another
        working directory), its identity read from its config.json."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} is not a run directory (no config.json); a run is <out>/<target>/<name>, "
                             "written by xcross-train")
        config = RunConfig.from_dict(json.loads((path / "config.json").read_text()))
        run_dir = replace(cls.of(config), out=path.parent.parent)
        if run_dir.path.name != path.name:
            raise UsageError(f"{path} holds the run {run_dir.name} of {config.target}: its directory was renamed")
        return run_dir

    @classmethod
    def finished_runs(cls, out: str | Path, target: str) -> list[RunDir]:
        """Every finished run of `target` under `out`, ordered by name."""
        root = Path(out) / target
        if not root.is_dir():
            return []
        dirs = [p for p in sorted(root.iterdir()) if (p / "config.json").is_file() and (p / "results.json").is_file()]
        return [cls.load(p) for p in dirs]

    @property
    def name(self) -> str:
        """`<method>`, with `-f<fraction>` below 1 and `-s<seed>` for seeds other than 0."""
        name = self.method if self.fraction == 1.0 else f"{self.method}-f{self.fraction:g}"
        return name if self.seed == 0 else f"{name}-s{self.seed}"

    @property
    def path(self) -> Path:
        return self.out / self.target / self.name

    def file(self, name: str) -> Path:
        """config.json, results.json, best.safetensors, log.jsonl, test_scores.npz."""
        return self.path / name

    @property
    def best(self) -> Path:
        return self.path / "best.safetensors"

    def finished(self) -> bool:
        return self.file("results.json").is_file()

    def config(self) -> RunConfig:
        return RunConfig.from_dict(json.loads(self.file("config.json").read_text()))

    def results(self) -> dict:
        return json.loads(self.file("results.json").read_text())

    def write_json(self, name: str, data) -> None:
        atomic_write(self.file(name), json.dumps(data, indent=2) + "\n")

    @contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the run directory for one process: a second training into it fails at once instead of
        interleaving its files with the first one's. The lock goes with the process, however it ends."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                raise UsageError(f"another process (pid {f.read().strip() or '?'}) is training into {self.path}; "
                                 "wait for it, or use another --out") from None
            f.truncate(0)
            f.write(str(os.getpid()))
            f.flush()
            yield
