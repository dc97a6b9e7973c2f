"""Process memory: glibc's ``malloc`` keeps freed blocks for the next tensors (``mallopt`` via ctypes)."""

from __future__ import annotations

import os

_RETAINED = False
_INT_MAX = (1 << 31) - 1


def retain_freed_memory() -> bool:
    """Keep the memory that freed tensors give back inside the process, for the next ones (CPU only).

    glibc's ``malloc`` hands blocks above 32 MB (a 4096^2 float32 frame is 67 MB) straight back to
    the OS on free and maps fresh, zeroed pages for the next block: on virtual machines those page
    faults can cost more than the arithmetic of most stages. This switches ``malloc`` to serving
    every block from its heap and not trimming it (``mallopt``: ``M_MMAP_MAX`` 0, ``M_TRIM_THRESHOLD`` 2 GiB - 1, the
    largest value ``mallopt``'s C ``int`` holds: the heap's free top is returned only beyond that),
    so a pipeline that processes frame after frame reuses the same pages, as a caching allocator
    does on the GPU (measurements: experiments/results/runtime.md). The cost: the process keeps
    its peak memory (plus fragmentation) until it exits.
    Every thread allocates from the one main heap (``M_ARENA_MAX`` 1): with per-thread arenas,
    memory freed by a stage on one thread is not reused by a stage on another, and concurrent
    stages (``Pipeline(workers=2)``) faulted in fresh pages on every frame.

    Process-wide and one-way (glibc cannot restore its dynamic thresholds); inherited by forked
    DataLoader workers. ``astroprep run`` (and its writer process) calls it unless the config says
    ``retain_memory: false``; ``ASTROPREP_RETAIN_MEMORY=0`` turns it off everywhere. Returns whether
    it applied (False on another C library or OS: nothing changes).
    """
    global _RETAINED
    if _RETAINED:
        return True
    if os.environ.get("ASTROPREP_RETAIN_MEMORY", "1") == "0":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -4, -8
        # mallopt takes a C int: a larger value would wrap silently (1 << 36 became 0, "always trim")
        ok = (libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, _INT_MAX) == 1
              and libc.mallopt(M_TOP_PAD, 64 << 20) == 1 and libc.mallopt(M_ARENA_MAX, 1) == 1)
    except (OSError, AttributeError):
        return False
    _RETAINED = bool(ok)
    return _RETAINED
