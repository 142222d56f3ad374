"""Guards for the directories the importers and the converter replace: refuse to replace what this project did not
write, and clear the temporaries that killed runs of them left beside their destination."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable


def replace_refusal(dest: Path, marker: str, key: str, inputs: Iterable[Path] = ()) -> str | None:
    """Why `dest` must not be built and renamed into place, or None when it may.

    A replace deletes what is at `dest`, so `dest` must be absent, an empty directory, or a directory this project
    wrote: one holding `marker`, a JSON object with `key` (meta.json for a domain, conversion.json for a model).
    No input may lie inside `dest`, and the nearest existing parent must be a writable directory: both are found
    here, before any input is read, rather than after an import's work.
    """
    dest = Path(dest).absolute()
    parent = dest.parent
    while not parent.exists() and not parent.is_symlink():
        parent = parent.parent
    if not parent.is_dir():
        return f"{parent} is not a directory, so {dest} cannot be written; choose another output directory"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"{parent} is not writable, so {dest} cannot be written; choose another output directory"
    if dest.is_symlink():
        return f"{dest} is a symbolic link; refusing to replace it: remove it or choose another output"
    if not dest.exists():
        return None
    if not dest.is_dir():
        return f"{dest} exists and is not a directory; refusing to replace it: remove it or choose another output"
    for path in inputs:
        if Path(path).resolve().is_relative_to(dest.resolve()):
            return (f"the input {path} lies inside {dest}, which this run would replace; "
                    "move the input or choose another output")
    if any(dest.iterdir()) and not _is_marker(dest / marker, key):
        return (f"{dest} exists and is not a directory this project wrote (no {marker}); refusing to replace it: "
                "remove it or choose another output")
    return None


def _is_marker(path: Path, key: str) -> bool:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and key in record
