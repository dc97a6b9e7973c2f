"""Robust scale: the one MAD -> Gaussian sigma constant and :func:`mad_std` (astropy's ``mad_std``).

Every stage that turns a median absolute deviation into a Gaussian-equivalent standard deviation
uses :data:`MAD_TO_STD` (``1 / Phi^-1(3/4)``, the value astropy's ``mad_std`` uses) so that no two
sites disagree in the sixth digit.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["MAD_TO_STD", "mad_std"]

#: 1 / Phi^-1(3/4): sigma of a Gaussian = MAD_TO_STD * its median absolute deviation (astropy's value).
MAD_TO_STD = 1.482602218505602


def _median(x: Tensor, dim: Optional[int], keepdim: bool, ignore_nan: bool) -> Tensor:
    """torch's (lower) median over ``dim`` (all elements when None), NaN-ignoring if asked."""
    fn = torch.nanmedian if ignore_nan else torch.median
    if dim is None:
        m = fn(x)
        return m.reshape((1,) * x.dim()) if keepdim else m
    return fn(x, dim=dim, keepdim=keepdim).values


def mad_std(x: Tensor, dim: Optional[int] = None, *, keepdim: bool = False, ignore_nan: bool = False,
            center: Optional[Tensor] = None) -> Tensor:
    """``MAD_TO_STD * median(|x - median(x)|)`` over ``dim`` (every element when None).

    Medians are torch's: the lower of the two middle values for an even count (numpy averages
    them). ``ignore_nan`` skips NaNs (an all-NaN slice gives NaN); otherwise a NaN propagates.
    ``center``: the median of ``x`` over ``dim`` with ``keepdim=True`` when the caller already has it.
    """
    if center is None:
        center = _median(x, dim, True, ignore_nan)
    return _median((x - center).abs(), dim, keepdim, ignore_nan) * MAD_TO_STD
