"""Keep freed host memory in the process instead of returning it to the OS at once.

glibc serves allocations above its mmap threshold (128 KiB at first, raised only by frees of
larger blocks) with fresh mappings and trims the heap's free top, so every step's temporaries
(logits, activations, sampling buffers of a few MB each) are page-faulted and zeroed again on
every step. On a 2-core machine that tripled the cost of sampling a 129k-entry row (3.4 ->
1.2 ms) and slowed prefill by a fifth. Raising both thresholds keeps that memory once
touched. Allocations above 16 MB (a long prefill's scores) still get their own mapping and
go back at once, so the peak stays what it was (keeping those too raised a rank's peak in
the 40k-token prompt test from under 3 GB to 4.4 GB). CPU inference runners get the same
from jemalloc or tcmalloc through LD_PRELOAD; this needs nothing installed. No-op where glibc
is absent.
"""

from __future__ import annotations

import ctypes
import ctypes.util

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)
MMAP_THRESHOLD = 16 << 20  # larger ones (a long prefill's) still get their own mapping
TRIM_THRESHOLD = 128 << 20  # free heap top kept up to this


def _glibc_call(fn: str):
    """glibc's function `fn`, or None where the C library is not glibc (or not found)."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return getattr(ctypes.CDLL(name), fn)
    except (OSError, AttributeError):
        return None


def retain_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds for this process; whether it took effect."""
    mallopt = _glibc_call("mallopt")
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
        bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_free_memory() -> bool:
    """Return the free heap memory to the OS now (glibc malloc_trim), e.g. after weights were
    moved out of the process; whether anything was released."""
    malloc_trim = _glibc_call("malloc_trim")
    return malloc_trim is not None and bool(malloc_trim(0))
