"""A run's directory as an object: where each of its files lives, whether the run finished, and what it was built on
by content (`inputs.json`: the digests of its base, its data and each source adapter). The directory name is made
from method, target, fraction and seed and never parsed back; the settings are read from the run's config.json."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np

from .data import domain_digest
from .files import atomic_write, file_sha256
from .peft import PEFT_CONFIG, PEFT_WEIGHTS, is_peft_directory
from .settings import RunConfig, UsageError
from .weights import base_fingerprint, is_whole

OUTPUTS = ("config.json", "inputs.json", "log.jsonl", "best.safetensors", "test_scores.npz", "results.json")


def adapter_digest(path: str | Path) -> str:
    """A source adapter by content: the sha256 of its file, or of a PEFT directory's config and weights."""
    path = Path(path)
    if is_peft_directory(path):
        return hashlib.sha256("".join(file_sha256(path / name) for name in (PEFT_CONFIG, PEFT_WEIGHTS))
                              .encode()).hexdigest()
    return file_sha256(path)


def source_inputs(sources: list[tuple[str | None, Path]]) -> list[dict]:
    """Each source adapter (domain, path) by content; a missing one has the digest "missing"."""
    return [{"domain": domain, "path": str(Path(path).absolute()),
             "sha256": adapter_digest(path) if Path(path).exists() else "missing"} for domain, path in sources]


def inputs_of(model_dir: str | Path, domain_dir: str | Path, sources: list[tuple[str | None, Path]]) -> dict:
    """What a run is built on, by content: the base's fingerprint, the target domain's digest and each source
    adapter's (domain, path, sha256), in the order of its streams."""
    return {"base": base_fingerprint(model_dir), "data": domain_digest(domain_dir), "sources": source_inputs(sources)}


def input_changes(recorded: dict, current: dict) -> list[str]:
    """How the files a run was built on differ from those it would be built on now (the parts `current` has), one
    phrase each."""
    out = []
    if "base" in current and recorded.get("base") != current["base"]:
        out.append(f"the base model's weights (fingerprint {recorded.get('base')} then, {current['base']} now)")
    if "data" in current and recorded.get("data") != current["data"]:
        out.append("the target's processed data (its files have other content)")
    then, now = recorded.get("sources", []), current["sources"]
    if [s["domain"] for s in then] != [s["domain"] for s in now]:
        out.append(f"the sources ({', '.join(str(s['domain']) for s in then)} then, "
                   f"{', '.join(str(s['domain']) for s in now)} now)")
    else:
        out += [f"source {b['domain'] or b['path']} ({b['path']}, sha256 {a['sha256'][:12]} then, {b['sha256'][:12]} "
                "now)" for a, b in zip(then, now) if a["sha256"] != b["sha256"]]
    return out


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
        working directory), its name read from its config.json."""
        path = Path(path)
        if path.is_symlink():  # a link to a run (e.g. "latest"): the run is where it points
            path = path.resolve()
        if not (path / "config.json").is_file():
            raise UsageError(f"{path} is not a run directory (no config.json); a run is <out>/<target>/<name>, "
                             "written by xcross-train")
        config = read_config(path / "config.json")
        run_dir = replace(cls.of(config), out=path.parent.parent)
        if run_dir.path.name != path.name:
            raise UsageError(f"{path} holds the run {run_dir.name} of {config.target}: its directory was renamed")
        return run_dir

    @classmethod
    def finished_runs(cls, out: str | Path, target: str, damaged: bool = False) -> list[RunDir]:
        """Every finished run of `target` under `out`, ordered by name; with `damaged`, also those with results
        whose other files are missing or unreadable (to name them)."""
        root = Path(out) / target
        if not root.is_dir():
            return []
        runs = [cls.load(p) for p in sorted(root.iterdir()) if (p / "results.json").is_file()]
        return [r for r in runs if damaged or r.finished()]

    @property
    def name(self) -> str:
        """`<method>`, with `-f<fraction>` below 1 and `-s<seed>` for seeds other than 0."""
        name = self.method if self.fraction == 1.0 else f"{self.method}-f{self.fraction:g}"
        return name if self.seed == 0 else f"{name}-s{self.seed}"

    @property
    def path(self) -> Path:
        return self.out / self.target / self.name

    def file(self, name: str) -> Path:
        """One of `OUTPUTS`, or another file of the run (ckpt/, inspect/, partial scores)."""
        return self.path / name

    @property
    def best(self) -> Path:
        return self.path / "best.safetensors"

    def started(self) -> bool:
        """Whether anything of a run is here (a finished or an interrupted one)."""
        return self.path.is_dir() and any(p.name != ".lock" for p in self.path.iterdir())

    def finished(self) -> bool:
        """Whether every file the run's method needs is present and readable: its config, inputs and results, its
        weights, and its test scores when it was tested."""
        return not self.damaged(stop_at_first=True)

    def damaged(self, stop_at_first: bool = False) -> list[Path]:
        """The files a finished run needs that are missing or cannot be read whole: config, inputs and results,
        the weights, and the test scores when it was tested."""
        out = []

        def scores() -> None:
            try:
                tested = self.results().get("test") is not None
            except Exception:  # noqa: BLE001 - results.json itself is damaged: judge the scores by themselves
                tested = self.file("test_scores.npz").exists()
            if tested:
                with np.load(self.file("test_scores.npz")) as z:
                    z["scores"], z["user_ids"]

        def weights() -> None:
            if not is_whole(self.best):
                raise ValueError("incomplete")

        for name, read in (("results.json", self.results), ("config.json", self.config), ("inputs.json", self.inputs),
                           ("best.safetensors", weights), ("test_scores.npz", scores)):
            try:
                read()
            except Exception:  # noqa: BLE001 - missing, damaged (JSON, zip), or of an older version
                out.append(self.file(name))
                if stop_at_first:
                    break
        return out

    def config(self) -> RunConfig:
        return read_config(self.file("config.json"))

    def results(self) -> dict:
        return _read_json(self.file("results.json"))

    def inputs(self) -> dict:
        path = self.file("inputs.json")
        if not path.is_file() and self.file("config.json").is_file():
            raise UsageError(f"{self.path} was written by an earlier version of xcross (no inputs.json: the files it "
                             "was built on are unknown); bring it up to date by training it again: xcross-train "
                             f"--config {self.file('config.json')} --replace")
        return _read_json(path)

    def write_json(self, name: str, data) -> None:
        atomic_write(self.file(name), json.dumps(data, indent=2) + "\n")

    def check_inputs(self, current: dict, command: str) -> None:
        """Refuse a run whose base, data or sources changed since it was trained, naming what changed and the
        command that brings it up to date (`command`: what is refused, for the message)."""
        if changed := input_changes(self.inputs(), current):
            raise UsageError(f"{command}: {self.path} was built on files that have changed since: {'; '.join(changed)};"
                             f" bring it up to date with xcross-train --config {self.file('config.json')}")

    def clear(self) -> None:
        """Remove the run as a whole (its outputs, checkpoints, inspection), for a run that replaces it."""
        if self.path.is_dir():
            for child in self.path.iterdir():
                if child.name == ".lock":
                    continue
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()

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


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise
    except (ValueError, UnicodeDecodeError) as err:
        raise UsageError(f"{path} is damaged ({err}); delete the run directory to train it again, or restore the "
                         "file") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is damaged (not a JSON object)")
    return data


def read_config(path: Path, where: str | None = None) -> RunConfig:
    """A run's config.json as its settings, with its runs directory where the run now is (it may have moved since
    it was trained, its settings recording the old place)."""
    config = RunConfig.from_dict(_read_json(path), where=where or str(path))
    run = RunDir.of(config)
    if path.name == "config.json" and path.parent.name == run.name and path.parent.parent.name == config.target:
        config = replace(config, out=str(path.absolute().parent.parent.parent))
    return config
