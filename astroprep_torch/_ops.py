"""Small internal tensor helpers shared by stages (not public API)."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Optional

import torch
from torch import Tensor

# Below this many values a CPU searchsorted runs faster on one thread: ATen parallelises it with a
# tiny grain, and waking the OpenMP workers (passive wait policy) costs milliseconds for
# microseconds of work.
_SERIAL_SEARCH = 1 << 16


_SERIAL_LOCK = threading.Lock()
_SERIAL = {"depth": 0, "saved": 1}  # open serial regions (any thread) and the count the first one saw


@contextlib.contextmanager
def one_intraop_thread(active: bool = True):
    """With ``active``: one intra-op (OpenMP) thread inside, the thread's setting restored on exit.
    Yields the caller's configured thread count (None when not ``active``: nothing is asked of
    torch, so the inactive form traces under ``torch.compile``).

    Stages may run on several threads at once (``Pipeline(workers=2)``), and torch's count is
    partly per thread (OpenMP's ICV) and partly shared (the count a new thread starts from). So
    each region restores, in its own thread, the value that thread had; and every region yields the
    count the first open region saw, not the 1 another thread's region may show meanwhile."""
    if not active:
        yield None
        return
    with _SERIAL_LOCK:
        if _SERIAL["depth"] == 0:
            _SERIAL["saved"] = torch.get_num_threads()
        _SERIAL["depth"] += 1
        n = _SERIAL["saved"]
    mine = torch.get_num_threads()
    if mine != 1:
        torch.set_num_threads(1)
    try:
        yield n
    finally:
        if mine != 1:
            torch.set_num_threads(mine)
        with _SERIAL_LOCK:
            _SERIAL["depth"] -= 1


def with_caller_modes(fn, threads: Optional[int] = None):
    """``fn`` wrapped to run under the autograd and inference modes and the intra-op thread count
    (``threads``, default: the count) of the thread that wraps it (torch keeps them per thread; a
    pool thread would otherwise keep whatever count it last had or started with): for work handed
    to other threads."""
    grad, infer = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
    threads = torch.get_num_threads() if threads is None else int(threads)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        with torch.inference_mode(infer), torch.set_grad_enabled(grad):
            return fn(*args, **kwargs)

    return run


def searchsorted(sorted_sequence: Tensor, values: Tensor, *, right: bool = False) -> Tensor:
    """``torch.searchsorted`` that runs single-threaded on CPU for small queries (same result)."""
    small = (sorted_sequence.device.type == "cpu" and values.numel() <= _SERIAL_SEARCH
             and not torch.compiler.is_compiling())
    with one_intraop_thread(small):
        return torch.searchsorted(sorted_sequence, values, right=right)


def serial_on_cpu(fn):
    """Decorator: run ``fn`` (whose first argument is the image tensor) with one intra-op thread when
    that tensor is on the CPU, restoring the caller's setting on exit.  For stages made of many
    small ops, where OpenMP fork/join costs more than it gains on few cores (such a stage may still
    spread independent work over Python threads itself)."""

    @functools.wraps(fn)
    def run(image, *args, **kwargs):
        cpu = isinstance(image, Tensor) and image.device.type == "cpu" and not torch.compiler.is_compiling()
        with one_intraop_thread(cpu):
            return fn(image, *args, **kwargs)

    return run


_RETAINED = False
_INT_MAX = (1 << 31) - 1


def retain_freed_memory() -> bool:
    """Keep the memory that freed tensors give back inside the process, for the next ones (CPU only).

    glibc's ``malloc`` hands blocks above 32 MB (a 4096^2 float32 frame is 67 MB) straight back to
    the OS on free and maps fresh, zeroed pages for the next block: on the virtual machines this
    project runs on, those page faults cost 0.5-2 ns per byte, more than the arithmetic of most
    stages (a frame-sized temporary: 30-130 ms). This switches ``malloc`` to serving every block
    from its heap and not trimming it (``mallopt``: ``M_MMAP_MAX`` 0, ``M_TRIM_THRESHOLD`` 2 GiB - 1, the
    largest value ``mallopt``'s C ``int`` holds: the heap's free top is returned only beyond that),
    so a pipeline that processes frame after frame reuses the same pages, as a caching allocator
    does on the GPU. Measured on the 4096^2 Table 2 graph: 6-9 s -> 4.2-4.5 s per frame after the
    first. The cost: the process keeps its peak memory (plus fragmentation) until it exits.
    Every thread allocates from the one main heap (``M_ARENA_MAX`` 1): with per-thread arenas,
    memory freed by a stage on one thread is not reused by a stage on another, and concurrent
    stages (``Pipeline(workers=2)``) faulted in fresh pages on every frame (15k faults, 0.7-1.0 s of
    system time per 4096^2 frame; with one arena about 30 and 0.15 s).

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


_POOLS: dict = {}  # name -> (executor, pid that made it, workers)


def thread_pool(workers: int, name: str = "astroprep"):
    """A lazily made pool of ``workers`` threads for kernels that release the GIL (made anew after
    fork, e.g. in a DataLoader worker: threads do not survive it). Each ``name`` is its own pool:
    code running on one pool's threads must not wait on jobs it submits to the same pool."""
    pool, pid, n = _POOLS.get(name, (None, None, 0))
    if pool is None or pid != os.getpid() or n != workers:
        from concurrent.futures import ThreadPoolExecutor

        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)
        _POOLS[name] = (pool, os.getpid(), workers)
    return pool


def numpy_applies(t: Tensor, min_numel: int = 1 << 16) -> bool:
    """Whether :func:`numpy_inplace_` runs on ``t``."""
    return (t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad
            and not torch.compiler.is_compiling() and t.numel() >= min_numel
            and t.dtype in (torch.float32, torch.float64))


def numpy_inplace_(t: Tensor, fn, min_numel: int = 1 << 16) -> bool:
    """Run ``fn(a)`` on numpy views ``a`` of ``t`` (a CPU, contiguous tensor we own, no autograd),
    split across ``torch.get_num_threads()`` threads; ``fn`` must write its result into ``a``
    (numpy ufuncs with ``out=a``; they release the GIL). numpy's float32 transcendental ufuncs
    (SIMD, SVML) are several times faster than ATen's CPU kernels (MKL VML / scalar loops) on
    some CPUs. Returns False, doing nothing, where this path does not apply (other device,
    autograd, compile, too small): the caller then uses torch ops.
    """
    if not numpy_applies(t, min_numel):
        return False
    a = t.detach().numpy().reshape(-1)
    n = torch.get_num_threads()  # the pool background.py shares
    if n == 1:
        fn(a)
        return True
    step = -(-a.size // n)
    parts = [a[i:i + step] for i in range(0, a.size, step)]
    pool = thread_pool(n)
    jobs = [pool.submit(fn, p) for p in parts[1:]]
    fn(parts[0])
    for j in jobs:
        j.result()
    return True


def sort_last(t: Tensor) -> Tensor:
    """``torch.sort(t, -1).values``; on CPU without autograd through numpy's SIMD sort (x86-simd-sort),
    ~20x faster there than ATen's CPU sort for many short rows (a 4096 x 256 float32 block: 1.5 ms
    vs 42 ms on this machine's AVX-512 CPU)."""
    if (t.device.type == "cpu" and not torch.compiler.is_compiling()
            and not (t.requires_grad and torch.is_grad_enabled())):
        import numpy as np

        return torch.from_numpy(np.sort(t.detach().numpy(), axis=-1))
    return torch.sort(t, dim=-1).values
