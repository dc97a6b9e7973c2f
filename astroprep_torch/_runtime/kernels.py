"""CPU fast paths of single ops with the same results as torch's: serial small searches, numpy's
SIMD sort, numpy's ``flatnonzero`` and in-place ufuncs split over the pool's threads. Each falls back to the torch op
off the CPU, under autograd or while ``torch.compile`` traces."""

from __future__ import annotations

import torch
from torch import Tensor

from .threads import one_intraop_thread, thread_pool

# Below this many values a CPU searchsorted runs faster on one thread: ATen parallelises it with a
# tiny grain, and waking the OpenMP workers (passive wait policy) costs more than the work.
_SERIAL_SEARCH = 1 << 16


def searchsorted(sorted_sequence: Tensor, values: Tensor, *, right: bool = False) -> Tensor:
    """``torch.searchsorted`` that runs single-threaded on CPU for small queries (same result)."""
    small = (sorted_sequence.device.type == "cpu" and values.numel() <= _SERIAL_SEARCH
             and not torch.compiler.is_compiling())
    with one_intraop_thread(small):
        return torch.searchsorted(sorted_sequence, values, right=right)


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
    much faster there than ATen's CPU sort for many short rows (timings: experiments/results/runtime.md)."""
    if (t.device.type == "cpu" and not torch.compiler.is_compiling()
            and not (t.requires_grad and torch.is_grad_enabled())):
        import numpy as np

        return torch.from_numpy(np.sort(t.detach().numpy(), axis=-1))
    return torch.sort(t, dim=-1).values


def flat_nonzero(mask: Tensor) -> Tensor:
    """``torch.nonzero(mask.reshape(-1)).flatten()``: the flat (row-major) indices of the True entries
    of a bool tensor, int64, ascending; on CPU through numpy's ``flatnonzero``, several times faster
    than ATen's ``nonzero`` there."""
    if mask.device.type == "cpu" and not torch.compiler.is_compiling():
        import numpy as np

        return torch.from_numpy(np.flatnonzero(mask.detach().numpy()))
    return torch.nonzero(mask.reshape(-1)).flatten()

