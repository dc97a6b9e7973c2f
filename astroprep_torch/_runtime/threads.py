"""Threads: intra-op (OpenMP) thread caps, serial sections, named pools of Python threads, and the
two ways a stage spreads independent work over them (:func:`map_on_threads`, :func:`side_by_side`).

Stages never set torch's thread counts nor make threads themselves: they call these."""

from __future__ import annotations

import contextlib
import functools
import os
import threading
from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import Tensor

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


def cpu_workers(t: Tensor) -> int:
    """How many Python threads may work on ``t`` at once: torch's intra-op thread count for a CPU
    tensor, 1 on other devices and while ``torch.compile`` traces (its graphs stay one thread)."""
    if t.device.type != "cpu" or torch.compiler.is_compiling():
        return 1
    return torch.get_num_threads()


def map_on_threads(fn: Callable[[Any, Any], Any], items: Sequence, *, workers: int,
                   state: Callable[[], Any], name: str = "astroprep", intraop: int = 1) -> list:
    """``[fn(item, s) for item in items]``, where ``s`` is a per-thread state made by ``state()``
    (e.g. a reusable buffer) the first time a thread needs one.

    ``workers`` > 1: the items run on the pool ``name``, each thread taking the next item, under the
    caller's autograd / inference modes with ``intraop`` intra-op threads each. ``workers`` <= 1: in
    order, in this thread, with one state (traceable by ``torch.compile``)."""
    if workers <= 1:
        return [fn(item, s) for s in [state()] for item in items]
    local = threading.local()

    def job(item):
        s = getattr(local, "state", None)
        if s is None:
            s = local.state = state()
        return fn(item, s)

    return list(thread_pool(workers, name=name).map(with_caller_modes(job, threads=intraop), items))


def side_by_side(calls: Iterable[Callable[[], Any]], t: Tensor) -> list:
    """Results of independent ``calls`` (no arguments; kernels that release the GIL, e.g. ATen's
    single-threaded ``index_add_``): when :func:`cpu_workers` of ``t`` is above 1 the first runs in
    this thread while the others run on the shared pool, under the caller's modes; else one after
    the other, in order."""
    calls = list(calls)
    workers = cpu_workers(t)
    if workers <= 1 or len(calls) < 2:
        return [c() for c in calls]
    pool = thread_pool(workers)
    jobs = [pool.submit(with_caller_modes(c)) for c in calls[1:]]
    first = calls[0]()
    return [first] + [j.result() for j in jobs]


def adapt_to_load(fn):
    """Decorator for a stage (a function or ``forward`` whose first tensor argument is the image): on
    the CPU it runs with the intra-op threads :func:`~astroprep_torch._runtime.load.threads_now`
    allows (fewer than torch's count while other processes hold cores), the caller's count restored
    on exit. Off the CPU, while ``torch.compile`` traces, or with ``ASTROPREP_ADAPT_THREADS=0``,
    ``fn`` runs as is."""
    from .load import threads_now

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if torch.compiler.is_compiling():
            return fn(*args, **kwargs)
        image = next((a for a in args if isinstance(a, Tensor)), None)
        if image is None or image.device.type != "cpu":
            return fn(*args, **kwargs)
        n = torch.get_num_threads()
        k = threads_now(n)
        if k >= n:
            return fn(*args, **kwargs)
        torch.set_num_threads(k)
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(n)

    run.adapts_to_load = True
    return run
