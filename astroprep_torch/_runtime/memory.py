"""Process memory: glibc's ``malloc`` keeps freed blocks for the next tensors (``mallopt`` via ctypes)."""

from __future__ import annotations

import contextlib
import os
import threading

_RETAINED = False
_INT_MAX = (1 << 31) - 1
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD, M_MMAP_MAX, M_ARENA_MAX = -1, -2, -3, -4, -8
#: glibc's ceilings of its dynamic thresholds on 64-bit (``DEFAULT_MMAP_THRESHOLD_MAX``, twice that
#: for trimming) and its default ``M_MMAP_MAX``: what a scope restores on exit
_MMAP_THRESHOLD_MAX, _MMAP_MAX_DEFAULT = 32 << 20, 65536
_SCOPE = {"depth": 0, "libc": None}
_SCOPE_LOCK = threading.Lock()


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
        # mallopt takes a C int: a larger value would wrap silently (1 << 36 became 0, "always trim")
        ok = (libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, _INT_MAX) == 1
              and libc.mallopt(M_TOP_PAD, 64 << 20) == 1 and libc.mallopt(M_ARENA_MAX, 1) == 1)
    except (OSError, AttributeError):
        return False
    _RETAINED = bool(ok)
    return _RETAINED


def _libc():
    """glibc through ctypes, or None (another C library or OS, or ``ASTROPREP_RETAIN_MEMORY=0``)."""
    if os.environ.get("ASTROPREP_RETAIN_MEMORY", "1") == "0":
        return None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


@contextlib.contextmanager
def freed_memory_kept():
    """Within the block, memory freed by tensors stays in the process for the next ones, as
    :func:`retain_freed_memory` does for good; on leaving the outermost block the free memory goes
    back to the OS (``malloc_trim``) and ``malloc`` serves large blocks from fresh pages again
    (``M_MMAP_THRESHOLD`` 32 MB and ``M_TRIM_THRESHOLD`` 64 MB: the ceilings glibc's dynamic
    thresholds reach after the first large block is freed).

    For one call that makes and frees many large temporaries (detection and measurement of a frame
    with millions of detected pixels): each would otherwise be mapped anew and its zeroed pages
    faulted in (system time of the same order as the arithmetic). Peak memory is the call's
    (plus fragmentation) and only until the block ends. Nothing changes after
    :func:`retain_freed_memory` (already kept), with ``ASTROPREP_RETAIN_MEMORY=0`` or without glibc.
    Blocks nest and may be entered from several threads (the outermost exit restores)."""
    with _SCOPE_LOCK:
        if _SCOPE["depth"] == 0 and not _RETAINED:
            libc = _libc()
            if libc is not None and libc.mallopt(M_MMAP_MAX, 0) == 1:
                libc.mallopt(M_TRIM_THRESHOLD, _INT_MAX)
                _SCOPE["libc"] = libc
        _SCOPE["depth"] += 1
    try:
        yield
    finally:
        with _SCOPE_LOCK:
            _SCOPE["depth"] -= 1
            libc = _SCOPE["libc"]
            if _SCOPE["depth"] == 0 and libc is not None:
                _SCOPE["libc"] = None
                if not _RETAINED:  # retain_freed_memory() called meanwhile: keep its settings
                    libc.mallopt(M_MMAP_MAX, _MMAP_MAX_DEFAULT)
                    libc.mallopt(M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
                    libc.mallopt(M_TRIM_THRESHOLD, 2 * _MMAP_THRESHOLD_MAX)
                    libc.malloc_trim(0)
