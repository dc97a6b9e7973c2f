"""Small internal tensor helpers shared by stages (not public API)."""

from __future__ import annotations

import torch
from torch import Tensor

# Below this many values a CPU searchsorted runs faster on one thread: ATen parallelises it with a
# tiny grain, and waking the OpenMP workers (passive wait policy) costs milliseconds for
# microseconds of work.
_SERIAL_SEARCH = 1 << 16


def searchsorted(sorted_sequence: Tensor, values: Tensor, *, right: bool = False) -> Tensor:
    """``torch.searchsorted`` that runs single-threaded on CPU for small queries (same result)."""
    if (sorted_sequence.device.type != "cpu" or values.numel() > _SERIAL_SEARCH or torch.compiler.is_compiling()
            or torch.get_num_threads() == 1):
        return torch.searchsorted(sorted_sequence, values, right=right)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.searchsorted(sorted_sequence, values, right=right)
    finally:
        torch.set_num_threads(n)
