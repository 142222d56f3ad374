"""A run's training log: `log.jsonl` always (one record per logged step or validation), plus optional sinks that
peers' tools read: `log.csv` (long format: step, name, value) and TensorBoard event files (`tb/`)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from .files import atomic_write

LOGGERS = ("csv", "tensorboard")


def flatten(record: dict, prefix: str = "") -> dict[str, float]:
    """Scalars of a log record under slash-separated names: loss, lr/0, valid/mrr, integrators/3/z1_mean, ..."""
    out = {}
    items = record.items() if isinstance(record, dict) else enumerate(record)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list, tuple)):
            out.update(flatten(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and name != "step":
            out[name] = float(value)
    return out


def read_records(path: Path) -> tuple[list[dict], int]:
    """The records of a log.jsonl and how many of its lines were dropped as torn: a line that is not a whole JSON
    record with a step (what a kill or a full disk in the middle of a write leaves, at its end)."""
    records, torn = [], 0
    if not path.is_file():
        return records, torn
    for line in path.read_bytes().decode("utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            ok = isinstance(record, dict) and isinstance(record.get("step"), int)
        except ValueError:
            ok = False
        if ok:
            records.append(record)
        else:
            torn += 1
    return records, torn


class RunLog:
    def __init__(self, run_dir: Path, loggers: tuple[str, ...] = (), main: bool = True):
        if unknown := set(loggers) - set(LOGGERS):
            raise ValueError(f"unknown logger(s) {sorted(unknown)}; choose from {', '.join(LOGGERS)}")
        self.run_dir, self.loggers, self.main = Path(run_dir), tuple(loggers), main
        self.jsonl, self.csv = self.run_dir / "log.jsonl", self.run_dir / "log.csv"
        self.writer = None

    def start(self, resumed_step: int | None) -> None:
        """A fresh log (`resumed_step` None), or the existing one cut back to the checkpoint's step: what a killed
        run logged after its last checkpoint is logged again by the resumed run, never twice."""
        if not self.main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if resumed_step is None:
            self.jsonl.unlink(missing_ok=True)
            self.csv.unlink(missing_ok=True)
        else:
            if self.jsonl.is_file():
                records, torn = read_records(self.jsonl)
                if torn:
                    print(f"{self.jsonl}: dropped {torn} torn line(s) (what a killed or interrupted write leaves)")
                atomic_write(self.jsonl, "".join(json.dumps(r) + "\n" for r in records if r["step"] <= resumed_step))
            if self.csv.is_file():
                rows = list(csv.reader(self.csv.read_text(errors="replace").splitlines()))
                kept = [r for r in rows[1:] if len(r) == 3 and r[0].isdigit() and int(r[0]) <= resumed_step]
                atomic_write(self.csv, "".join(",".join(r) + "\n" for r in [["step", "name", "value"], *kept]))
        if "csv" in self.loggers and not self.csv.is_file():
            self.csv.write_text("step,name,value\n")
        if "tensorboard" in self.loggers:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise RuntimeError("--logger tensorboard needs the tensorboard package: "
                                   "pip install tensorboard (or the project's [tensorboard] extra)") from err
            self.writer = SummaryWriter(str(self.run_dir / "tb"),
                                        purge_step=None if resumed_step is None else resumed_step + 1)

    def write(self, record: dict) -> None:
        if not self.main:
            return
        with self.jsonl.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = flatten(record)
        if "csv" in self.loggers:
            with self.csv.open("a") as f:
                f.writelines(f"{record['step']},{name},{value!r}\n" for name, value in scalars.items())
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, record["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
