"""Per-segment second moments and ellipse parameters, as SExtractor's ``analyse.c`` computes them.

Written once for detection (the deblender's branch analysis, the final objects, the fallback
isophotal measurements) and photometry (``X2_IMAGE`` .. ``CXY_IMAGE``):

- :func:`segment_moments`: per segment (pixels grouped by an int64 segment id), the weighted
  barycentre and the raw second moments about a per-segment origin (the smallest x and y of its
  pixels), which limits round-off as SExtractor does (float64 throughout);
- :func:`central_moments`: ``x2, y2, xy`` about the barycentre, or about a given centre
  (SExtractor's "robust" analysis of deblended objects keeps the branch's barycentre);
- :func:`ellipse`: SExtractor's singular-case correction (``det < 0.00694`` -> ``x2, y2 += 1/12``,
  a pixel's own variance), then ``a, b, theta`` and ``cxx, cyy, cxy``.

Segment reductions (:func:`segment_sum`, :func:`segment_max`, :func:`segment_min`) live here too.
Everything is differentiable with respect to the weights.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

#: SExtractor: an ellipse is singular (a line, a single pixel) when x2 y2 - xy^2 is below this
SINGULAR_DET = 0.00694
#: ... and then x2 and y2 each get this added (SExtractor's 1/12, the variance of a uniform pixel)
SINGULAR_ADD = 0.0833333


def segment_sum(values: Tensor, seg: Tensor, n: int) -> Tensor:
    """Sum of ``values`` per segment: (n,), 0 for an empty segment."""
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, seg, values)


def segment_max(values: Tensor, seg: Tensor, n: int) -> Tensor:
    """Maximum of ``values`` per segment: (n,), -inf for an empty segment."""
    out = torch.full((n,), -math.inf, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, seg, values, reduce="amax", include_self=True)


def segment_min(values: Tensor, seg: Tensor, n: int, fill=math.inf) -> Tensor:
    """Minimum of ``values`` per segment: (n,), ``fill`` for an empty segment."""
    out = torch.full((n,), fill, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, seg, values, reduce="amin", include_self=True)


class SegmentMoments(NamedTuple):
    """Weighted moments per segment, relative to the segment's origin ``(x0, y0)``."""

    x0: Tensor  #: origin: the smallest x of the segment's pixels
    y0: Tensor  #: origin: the smallest y
    flux: Tensor  #: sum of the weights
    mx: Tensor  #: barycentre x - x0
    my: Tensor  #: barycentre y - y0
    sxx: Tensor  #: weighted mean of (x - x0)^2
    syy: Tensor  #: weighted mean of (y - y0)^2
    sxy: Tensor  #: weighted mean of (x - x0)(y - y0)


def segment_moments(seg: Tensor, n: int, x: Tensor, y: Tensor, w: Tensor, *, origin=None,
                    guard_zero: bool = True) -> SegmentMoments:
    """First and raw second moments of the weights ``w`` per segment.

    ``seg`` (P,) int64 segment id of each pixel (0..n-1), ``x, y, w`` (P,) float64 coordinates and
    weights. ``origin`` (x0, y0) per segment when the caller has it, else the segments' smallest
    coordinates. ``guard_zero`` divides a zero-flux segment's sums by 1 (its moments are 0); without
    it they are inf / NaN.
    """
    if origin is None:
        origin = (segment_min(x, seg, n), segment_min(y, seg, n))
    x0, y0 = origin
    xr, yr = x - x0.index_select(0, seg), y - y0.index_select(0, seg)
    flux = segment_sum(w, seg, n)
    div = torch.where(flux != 0, flux, torch.ones_like(flux)) if guard_zero else flux
    return SegmentMoments(
        x0, y0, flux,
        segment_sum(w * xr, seg, n) / div, segment_sum(w * yr, seg, n) / div,
        segment_sum(w * xr * xr, seg, n) / div, segment_sum(w * yr * yr, seg, n) / div,
        segment_sum(w * xr * yr, seg, n) / div,
    )


class CentralMoments(NamedTuple):
    """Second moments about a centre ``(x, y)`` (relative to the segment origin)."""

    x: Tensor
    y: Tensor
    x2: Tensor
    y2: Tensor
    xy: Tensor


def central_moments(m: SegmentMoments, centre=None) -> CentralMoments:
    """``x2, y2, xy`` about the barycentre, or about ``centre`` (absolute (cx, cy) per segment):
    SExtractor's robust analysis of a deblended object keeps its branch's barycentre."""
    if centre is None:
        return CentralMoments(m.mx, m.my, m.sxx - m.mx * m.mx, m.syy - m.my * m.my, m.sxy - m.mx * m.my)
    xn, yn = centre[0] - m.x0, centre[1] - m.y0
    return CentralMoments(
        xn, yn,
        m.sxx + xn * xn - 2 * m.mx * xn,
        m.syy + yn * yn - 2 * m.my * yn,
        m.sxy + xn * yn - m.mx * yn - xn * m.my,
    )


class Ellipse(NamedTuple):
    """SExtractor's ellipse from second moments (``x2, y2`` after the singular-case correction)."""

    x2: Tensor
    y2: Tensor
    xy: Tensor
    a: Tensor
    b: Tensor
    theta: Tensor  #: radians, SExtractor's rule (pi/4 when x2 == y2)
    cxx: Tensor
    cyy: Tensor
    cxy: Tensor
    singular: Tensor  #: bool: the correction was applied


def ellipse(x2: Tensor, y2: Tensor, xy: Tensor) -> Ellipse:
    """Semi-axes ``a >= b``, position angle ``theta`` and the ellipse coefficients
    (``cxx x^2 + cyy y^2 + cxy x y = 1`` at the isophote) from ``x2, y2, xy``.

    A singular (line-like or one-pixel) object, ``x2 y2 - xy^2 < 0.00694``, first gets 1/12 added to
    ``x2`` and ``y2`` (SExtractor's ``analyse.c``)."""
    singular = x2 * y2 - xy * xy < SINGULAR_DET
    x2 = torch.where(singular, x2 + SINGULAR_ADD, x2)
    y2 = torch.where(singular, y2 + SINGULAR_ADD, y2)
    det = x2 * y2 - xy * xy
    d = x2 - y2
    temp = torch.sqrt(0.25 * d * d + xy * xy)
    a = torch.sqrt((0.5 * (x2 + y2) + temp).clamp_min(0))
    b = torch.sqrt((0.5 * (x2 + y2) - temp).clamp_min(0))
    theta = torch.where(d.abs() > 0, torch.atan2(2.0 * xy, d) / 2.0, torch.full_like(d, math.pi / 4))
    return Ellipse(x2, y2, xy, a, b, theta, y2 / det, x2 / det, -2 * xy / det, singular)
