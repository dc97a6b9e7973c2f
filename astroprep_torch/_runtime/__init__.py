"""The private home of the CPU plumbing (not public API): stages use it through single calls or
decorators and never make threads, call ``ctypes`` or set torch's thread counts themselves.

* :mod:`.threads`: intra-op thread caps (:func:`one_intraop_thread`, :func:`serial_on_cpu`), work
  handed to other threads (:func:`with_caller_modes`, :func:`thread_pool`, :func:`map_on_threads`,
  :func:`side_by_side`, :func:`cpu_workers`) and :func:`adapt_to_load`, the decorator that runs a
  stage on fewer threads while other processes hold cores (policy: :mod:`.load`);
* :mod:`.memory`: :func:`retain_freed_memory` and the scoped :func:`freed_memory_kept` (glibc ``mallopt``);
* :mod:`.kernels`: CPU fast paths with torch's results (:func:`searchsorted`, :func:`sort_last`,
  :func:`numpy_inplace_`, :func:`flat_nonzero`).
"""

from __future__ import annotations

from .kernels import flat_nonzero, numpy_applies, numpy_inplace_, searchsorted, sort_last
from .memory import freed_memory_kept, retain_freed_memory
from .load import threads_for_load, threads_now
from .threads import (
    adapt_to_load,
    cpu_workers,
    map_on_threads,
    one_intraop_thread,
    serial_on_cpu,
    side_by_side,
    thread_pool,
    with_caller_modes,
)

__all__ = [
    "adapt_to_load", "cpu_workers", "flat_nonzero", "freed_memory_kept", "map_on_threads", "numpy_applies",
    "numpy_inplace_", "one_intraop_thread",
    "retain_freed_memory", "searchsorted", "serial_on_cpu", "side_by_side", "sort_last", "thread_pool",
    "threads_for_load", "threads_now", "with_caller_modes",
]
