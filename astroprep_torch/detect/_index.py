"""Index helpers of the detection stage: gathers, CPU sorts and forest roots."""

from __future__ import annotations

import torch
from torch import Tensor


def _g(t: Tensor, i) -> Tensor:
    """``t[i]``; a 1-D integer index goes through ``index_select``, several times faster on CPU than
    advanced indexing (same result, same gradient), and so does a 1-D bool mask as long as ``t``
    (through :func:`_nonzero`); anything else is plain indexing."""
    if isinstance(i, Tensor) and i.dim() == 1 and isinstance(t, Tensor) and t.dim() >= 1:
        if i.dtype in (torch.int64, torch.int32):
            return t.index_select(0, i)
        if i.dtype == torch.bool and i.shape[0] == t.shape[0]:
            return t.index_select(0, _nonzero(i))
    return t[i]


def _host(t: Tensor) -> bool:
    """Whether a numpy-backed kernel may replace the ATen one (CPU, no autograd, not compiling)."""
    return t.device.type == "cpu" and not (t.requires_grad and torch.is_grad_enabled()) \
        and not torch.compiler.is_compiling()


def _nonzero(mask: Tensor) -> Tensor:
    """``mask.nonzero().squeeze(1)`` of a 1-D bool tensor (int64 indices, ascending); on CPU through
    numpy's ``flatnonzero``, several times faster than ATen's ``nonzero`` there."""
    if _host(mask):
        import numpy as np

        return torch.from_numpy(np.flatnonzero(mask.detach().numpy()))
    return mask.nonzero().squeeze(1)


def _argsort(t: Tensor, *, descending: bool = False) -> Tensor:
    """Stable ``argsort`` of a 1-D tensor; on CPU through numpy (same order: both are stable sorts),
    several times faster than ATen's for the nearly sorted integer keys used here."""
    if _host(t) and t.dim() == 1:
        import numpy as np

        a = t.detach().numpy()
        if descending:
            a = -a
        return torch.from_numpy(np.argsort(a, kind="stable"))
    return torch.argsort(t, descending=descending, stable=True)


def _unique_roots(root: Tensor):
    """``torch.unique(root, return_inverse=True)`` for a forest ``root`` with ``root[i] <= i`` and
    ``root[root[i]] == root[i]`` (the output of :func:`~.labels.connected_components`): the roots are the
    nodes with ``root[i] == i``, already sorted, so a cumulative sum replaces the sort."""
    n = root.numel()
    is_root = root == torch.arange(n, device=root.device)
    rank = torch.cumsum(is_root, 0) - 1
    return is_root.nonzero().squeeze(1), _g(rank, root)
