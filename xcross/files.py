"""Writing files and directories so that a reader never sees half of one: build beside the destination under a
temporary name, then rename into place. Every writer of the project goes through these two helpers; `exclusive`
makes the builders of a shared file (the converted weights) take turns; `file_sha256` names a file's content."""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | Path, content: str | bytes | Callable[[Path], None]) -> Path:
    """Write `content` (text, bytes, or a function that writes the file at the path it is given) to a temporary
    file beside `path`, then rename it onto `path`. The file gets the mode a plain `open(path, "w")` would give
    (0666 less the umask), not mkstemp's private 0600: results are read by other users of a shared machine."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)  # what a killed writer of this file left (SIGKILL runs no cleanup)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp-{os.getpid()}-", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp)
    try:
        if isinstance(content, str):
            tmp.write_text(content, encoding="utf-8")
        elif isinstance(content, bytes):
            tmp.write_bytes(content)
        else:
            content(tmp)
        tmp.chmod(0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def exclusive(dest: str | Path) -> Iterator[None]:
    """Hold `dest` for this process while it checks and builds it: a second process waits here, then finds it
    built. The lock is on the folder `dest` is built in (no lock file is left behind), so the builders of its
    siblings take turns too; it goes with the process, however that ends."""
    parent = Path(dest).parent
    parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def replace_path(src: Path, dest: Path) -> None:
    """Move `src` to `dest`, replacing what is there with two renames, so `dest` is never half written."""
    if dest.exists():
        old = dest.with_name(f".{dest.name}.old-{os.getpid()}")
        os.rename(dest, old)
        try:
            os.rename(src, dest)
        except BaseException:
            os.rename(old, dest)  # put the old one back
            raise
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    else:
        os.rename(src, dest)


@contextmanager
def atomic_directory(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside `dest` that replaces `dest` on success; on failure nothing is left
    behind, not even the parent directories this call created."""
    dest = Path(dest)
    created = []
    parent = dest.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    if tmp.exists():  # left by a killed run with the same pid
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for directory in created:  # deepest first
            try:
                directory.rmdir()
            except OSError:
                break
        raise
    replace_path(tmp, dest)


# The temporaries' names: `.NAME.tmp-PID` (atomic_directory's build), `.NAME.tmp-PID-RANDOM.tmp` (atomic_write's)
# and `.NAME.old-PID` (replace_path's previous version, deleted once the new one is in place).
def _temporary_pattern(name: str) -> re.Pattern:
    return re.compile(rf"\.{re.escape(name)}\.(?:tmp|old)-(\d+)(?:-[^/]*\.tmp)?")


def remove_stale_temporaries(dest: Path) -> list[Path]:
    """Delete the temporaries beside `dest` left by runs that were killed (their process is gone); return them.

    Call it before this run creates its own: a temporary with this process's id is then one from an earlier process
    that had the same id. A live process's temporaries are left alone, so a concurrent run is not disturbed.
    """
    dest = Path(dest)
    if not dest.parent.is_dir():
        return []
    pattern = _temporary_pattern(dest.name)
    removed = []
    for path in dest.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if match is None or _alive(int(match.group(1))):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid() or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OverflowError:
        return False
    return True
