"""Process-level settings that make CPU training faster; the CLIs and benchmarks call them at start-up."""

from __future__ import annotations

import ctypes
import ctypes.util
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(threshold: int = 1 << 30) -> bool:
    """On glibc, serve tensors up to `threshold` bytes from the heap and keep freed memory for reuse.

    glibc hands every allocation above its mmap threshold (at most 32 MiB by default) fresh pages from the kernel
    and returns them on free, so a tensor of that size costs a page fault per 4 KiB each time it is allocated.
    Training activations of a few streams are exactly that size: on a 2-core CPU three streams in lockstep ran
    1.3x slower than three separate passes until this was set (bench/bench_streams.py). Returns whether it took
    effect (False on other C libraries, where nothing is changed). Process-wide; call it once at start-up.
    """
    if platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                     2 * threshold))
    except (OSError, AttributeError):
        return False
