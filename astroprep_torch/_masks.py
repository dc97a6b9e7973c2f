"""Bool mask operations shared by the stages (True = bad): :func:`grow_mask`, a square dilation."""

from __future__ import annotations

import torch
from torch import Tensor


def grow_mask(mask: Tensor, radius: int) -> Tensor:
    """``mask (B, 1, H, W)`` dilated by a square of half size ``radius`` pixels."""
    if radius <= 0 or not bool(mask.any()):
        return mask
    # a square's dilation is separable (rows, then columns), and a window holds a masked pixel when
    # its count, a difference of running sums, is positive: a few passes whatever the radius
    return _window_any(_window_any(mask, int(radius), -2), int(radius), -1)


def _window_any(mask: Tensor, r: int, dim: int) -> Tensor:
    """True where the window ``[i - r, i + r]`` along ``dim`` holds a True of ``mask``."""
    n = mask.shape[dim]
    r = min(r, n)
    c = torch.cumsum(mask, dim, dtype=torch.int32)  # c[i] = count of mask[:i + 1]
    last = c.narrow(dim, n - 1, 1)
    shape = list(last.shape)
    shape[dim] = r
    hi = torch.cat([c.narrow(dim, r, n - r), last.expand(shape)], dim)  # count of mask[:min(i + r, n - 1) + 1]
    lo = torch.cat([torch.zeros_like(c.narrow(dim, 0, min(r + 1, n))), c.narrow(dim, 0, n - r - 1)], dim) \
        if r + 1 < n else torch.zeros_like(c)  # count of mask[:max(i - r, 0)]
    return hi > lo
