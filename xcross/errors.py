"""How a command fails, in one place: every console command runs its work through `run_command`, which turns any
failure into one line on stderr and an exit code (2: the request, its input or its output cannot be used; 1: a fault
of the machine, such as a full disk, or of the program), and SIGTERM into the same clean stop as Ctrl-C. With
XCROSS_DEBUG=1 the traceback is shown as well."""

from __future__ import annotations

import errno
import os
import signal
import sys
import traceback
from typing import Callable

# The system's errors that say the machine, not the request, is at fault.
MACHINE_FAULTS = {errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG, errno.ENOMEM}
FIXES = {errno.ENOSPC: "free some space and run it again", errno.EDQUOT: "free some space and run it again",
         errno.EACCES: "choose a path you may use, or change its permissions",
         errno.EPERM: "choose a path you may use, or change its permissions",
         errno.EROFS: "choose a path on a writable file system",
         errno.ENOENT: "check the path", errno.EISDIR: "name a file, not a directory",
         errno.ENOTDIR: "a part of the path is a file, not a directory", errno.ELOOP: "the path is a symlink loop"}


class UsageError(Exception):
    """A request that cannot run as given (a flag, an input, an output): one line that says what to do, exit 2."""


class Failed(Exception):
    """Work that cannot finish for a reason of its own (e.g. training diverged): one line, exit 1."""

    prefix = ""


class Terminated(KeyboardInterrupt):
    """SIGTERM (or SIGINT) raised where the work is, so that it stops as Ctrl-C does: temporaries removed by the code
    that made them, a one-line message, exit 128 + the signal's number."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum = int(signum)


def debugging() -> bool:
    return os.environ.get("XCROSS_DEBUG", "") not in ("", "0")


def describe(err: BaseException) -> tuple[str, int]:
    """(the one line, the exit code) of a failure."""
    if isinstance(err, UsageError):
        return str(err), 2
    if isinstance(err, Failed):
        return err.prefix + str(err), 1
    if isinstance(err, OSError):
        where = " -> ".join(str(f) for f in (err.filename, err.filename2) if f is not None)
        what = err.strerror or str(err)
        fix = FIXES.get(err.errno)
        line = f"{where}: {what}" if where else what
        return line + (f" ({fix})" if fix else ""), 1 if err.errno in MACHINE_FAULTS else 2
    if isinstance(err, UnicodeDecodeError):
        return f"an input is not UTF-8 text ({err})", 2
    if isinstance(err, RecursionError):
        return "an input is nested too deeply to read", 2
    if isinstance(err, MemoryError):
        return "out of memory (ask for less: fewer users per batch, fewer candidates, a smaller model)", 1
    return (f"{type(err).__name__}: {err} (an internal error; XCROSS_DEBUG=1 shows where, please report it)", 1)


def run_command(job: Callable[[], int], interrupted: str | None = None) -> int:
    """`job()`'s exit code, or the failure's (`describe`) after printing its one line. An interruption (Ctrl-C,
    SIGTERM) exits with 128 + the signal's number, saying `interrupted` (default: what the work said)."""

    def terminate(signum, frame):
        raise Terminated(signum)

    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, terminate)
    except ValueError:  # not the main thread
        pass
    try:
        return job()
    except KeyboardInterrupt as err:
        if debugging():
            traceback.print_exc()
        message = interrupted or str(err) or "stopped; rerun with --resume to continue"
        print(f"\ninterrupted: {message}", file=sys.stderr)
        return 128 + getattr(err, "signum", signal.SIGINT)
    except Exception as err:  # noqa: BLE001 - the one place every failure is turned into one line
        if debugging():
            traceback.print_exc()
        line, code = describe(err)
        print("error: " + " ".join(line.split("\n")), file=sys.stderr)
        return code
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
