"""Per-object analysis (SExtractor's ``analyse``), the ``mthresh`` used by cleaning, and the
isophotal measurements on a fixed segmentation (used when ``photometry`` is absent).

The moments and ellipse maths are :mod:`astroprep_torch._moments` (shared with photometry).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._moments import central_moments, ellipse, segment_max, segment_min, segment_moments, segment_sum
from ._index import _argsort, _g

# the segment reductions under the names the detection steps use
_segment_sum = segment_sum
_segment_max = segment_max
_segment_min = segment_min


class Analysis(NamedTuple):
    """SExtractor/sep ``analyse`` of each segment on the filtered (``fd*``) and unfiltered values."""

    mx: Tensor  #: barycentre x (0-based), or the given centre
    my: Tensor
    x2: Tensor  #: second moments after the singular-case correction
    y2: Tensor
    xy: Tensor
    a: Tensor
    b: Tensor
    cxx: Tensor
    cyy: Tensor
    cxy: Tensor
    abcor: Tensor  #: SExtractor's correction of the ellipse area for the threshold (<= 1)
    fdflux: Tensor  #: filtered flux
    fdnpix: Tensor  #: pixel count (float64)
    fdpeak: Tensor  #: filtered peak
    dpeak: Tensor  #: unfiltered peak
    dnpix: Tensor  #: unfiltered pixels above the threshold (ISOAREA)
    x2raw: Tensor  #: second moments before the correction
    y2raw: Tensor
    xyraw: Tensor

    def take(self, index: Tensor) -> "Analysis":
        """The rows ``index`` of every field."""
        return Analysis(*(_g(t, index) for t in self))


def _abcor(seg, n, v, thresh_obj, dpeak, ab):
    """``(dnpix, abcor)``: unfiltered pixels above the threshold and SExtractor's area correction
    from the pixel counts above the threshold and above half-way to the peak."""
    dt = torch.float64
    thresh2 = (thresh_obj + dpeak) / 2
    dnpix = segment_sum((v > _g(thresh_obj, seg)).to(dt), seg, n)
    area2 = segment_sum((v > _g(thresh2, seg)).to(dt), seg, n)
    darea = area2 - dnpix
    t1t2 = thresh_obj / thresh2
    abcor = torch.where(darea < 0, darea, torch.full_like(darea, -1.0)) / (
        2 * math.pi * torch.log(torch.where(t1t2 < 1, t1t2, torch.full_like(t1t2, 0.99)).clamp_min(1e-300)) * ab
    )
    abcor = torch.where((t1t2 > 0) & (ab > 0), abcor.clamp(max=1.0), torch.ones_like(abcor))
    return dnpix, abcor


def _analyse(seg, n, x, y, f, v, thresh_obj, centre=None) -> Analysis:
    """SExtractor/sep ``analyse``: filtered-flux weighted moments, ellipse, ``abcor`` per segment.

    ``seg`` (P,) segment of each pixel, ``x, y`` float64 coordinates, ``f`` filtered and ``v``
    unfiltered values (float64), ``thresh_obj`` (n,) the segment's threshold. ``centre`` (mx, my)
    replaces the barycentre (SExtractor's "robust" analysis of deblended objects).
    """
    m = segment_moments(seg, n, x, y, f)  # about the per-object origin (xmin, ymin), as SExtractor
    c = central_moments(m, centre)
    e = ellipse(c.x2, c.y2, c.xy)
    dpeak = segment_max(v, seg, n)
    dnpix, abcor = _abcor(seg, n, v, thresh_obj, dpeak, e.a * e.b)
    return Analysis(
        mx=c.x + m.x0, my=c.y + m.y0, x2=e.x2, y2=e.y2, xy=e.xy, a=e.a, b=e.b, cxx=e.cxx, cyy=e.cyy, cxy=e.cxy,
        abcor=abcor, fdflux=m.flux, fdnpix=torch.bincount(seg, minlength=n).to(torch.float64),
        fdpeak=segment_max(f, seg, n), dpeak=dpeak, dnpix=dnpix, x2raw=c.x2, y2raw=c.y2, xyraw=c.xy,
    )


def _row_starts(group: Tensor, y: Tensor, x: Tensor):
    """Per pixel, the first column of its group on the row below (y - 1; -1 on the group's first row
    and where the group has no pixel there). One slot per (group, row) between the group's first and
    last rows: scatters, no sort."""
    ng = int(group.max()) + 1
    big = torch.iinfo(torch.int64).max
    ymin = torch.full((ng,), big, dtype=torch.int64, device=y.device).scatter_reduce_(0, group, y, reduce="amin")
    ymax = torch.full((ng,), -1, dtype=torch.int64, device=y.device).scatter_reduce_(0, group, y, reduce="amax")
    height = (ymax - ymin + 1).clamp_min(0)
    start = torch.cumsum(height, 0) - height
    slot = _g(start, group) + y - _g(ymin, group)
    xmin = torch.full((int(height.sum()),), -1, dtype=torch.int64, device=x.device)
    xmin.scatter_reduce_(0, slot, x, reduce="amin", include_self=False)
    first_row = y == _g(ymin, group)
    return torch.where(first_row, -1, _g(xmin, (slot - 1).clamp_min(0)))


def lutz_order_key(x: Tensor, y: Tensor, group: Tensor, H: int, W: int) -> Tensor:
    """A sort key (int64, per pixel, within its group) that puts the pixels of each ``group`` in the
    order of the pixel list SExtractor's scan (``lutz``) builds, for objects with one run per row.

    Scanning row ``y``, the run's pixels left of the previous row's first column start a new list to
    which the object's list so far is appended, then the rest of the row: the list is the left
    overhangs from the last row down, then the first row, then the rest of each row upwards (each part
    left to right). ``x, y`` int64 coordinates, ``group`` int64 object of each pixel."""
    if x.numel() == 0:
        return x.clone()
    xprev = _row_starts(group, y, x)
    overhang = (xprev >= 0) & (x < xprev)
    ykey = torch.where(overhang, H - y, H + 1 + y)
    return ykey * (W + 1) + x


def _mthresh(values: Tensor, seg: Tensor, n: int, minarea: int, last: Optional[Tensor] = None,
             order_key: Optional[Tensor] = None) -> Tensor:
    """SExtractor's ``mthresh``: the ``minarea``-th largest ``f - t`` of an object, as its heap computes it.

    ``values`` must be in raster order (or ``order_key`` gives each object's pixel order, e.g.
    :func:`lutz_order_key`); ``last`` marks pixels that go after the others (pixels a
    deblended branch gathered from its parent, appended to its list by SExtractor's ``gatherup``). SExtractor fills a heap
    with the first ``minarea`` values, spends the next pixel on sorting the heap (that value is never
    compared) and then keeps the ``minarea`` largest of the rest; an object of exactly ``minarea``
    pixels returns its first value. We reproduce that, so that cleaning decisions match.
    """
    P = values.numel()
    # pixels gathered by the deblender come after the branch's own pixels in SExtractor's list
    major = seg if last is None else seg * 2 + last.long()
    if order_key is None or P == 0:
        order = _argsort(major)
    else:
        order = _argsort(major * (int(order_key.max()) + 1) + order_key)
    seg_s = _g(seg, order)
    counts = torch.bincount(seg_s, minlength=n)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(P, device=values.device) - _g(start, seg_s)
    skip = (rank == minarea) & (_g(counts, seg_s) > minarea)
    keep = ~skip
    kth = _kth_largest(_g(values, order)[keep], _g(seg_s, keep), n, minarea)
    first = torch.zeros(n, dtype=values.dtype, device=values.device)
    first[seg_s[rank == 0]] = _g(values, order)[rank == 0]
    out = torch.where(counts == minarea, first, kth)
    return torch.where(counts < minarea, torch.zeros_like(out), out)


def _kth_largest(values: Tensor, seg: Tensor, n: int, k: int) -> Tensor:
    """Per segment, the ``k``-th largest value (0 where a segment has fewer than ``k`` values).

    ``k`` rounds of "segment maximum, then remove one pixel holding it" (O(k P), no sort; the same
    value as sorting, ties counted with multiplicity)."""
    P = values.numel()
    counts = torch.bincount(seg, minlength=n)
    out = torch.zeros(n, dtype=values.dtype, device=values.device)
    if P == 0 or k < 1:
        return out
    if k > 8:  # many rounds: one sort is cheaper
        order = _argsort(values, descending=True)
        seg_o = _g(seg, order)
        order2 = _argsort(seg_o)  # grouped by segment, descending values inside
        val_s = _g(_g(values, order), order2)
        start = torch.cumsum(counts, 0) - counts
        has = counts >= k
        out[has] = _g(val_s, _g(start, has) + (k - 1))
        return out
    v = values.clone()
    ar = torch.arange(P, device=values.device)
    for _ in range(k):
        m = segment_max(v, seg, n)
        at = (v == _g(m, seg)).nonzero().squeeze(1)
        first = torch.full((n,), P, dtype=torch.int64, device=values.device)
        first.scatter_reduce_(0, _g(seg, at), _g(ar, at), reduce="amin", include_self=True)
        hit = first < P
        v.index_fill_(0, _g(first, hit.nonzero().squeeze(1)), -math.inf)
    has = counts >= k
    return torch.where(has, m, out)


def _overrides(an: Analysis, blended: Tensor, ate: Tensor) -> dict:
    """What SExtractor fixes before the final segmentation exists (NaN = measure on the segmentation).

    ``x, y``: barycentre of deblended objects (their branch core) and of objects that swallowed
    CLEANed neighbours (their own pixels); ``x2, y2, xy, npix``: moments (before the singularity
    correction) and ISOAREA of the latter, from their own pixels.
    """
    nan = torch.full_like(an.mx, math.nan)
    keep_c = blended | ate
    return dict(
        x=torch.where(keep_c, an.mx, nan), y=torch.where(keep_c, an.my, nan),
        x2=torch.where(ate, an.x2raw, nan), y2=torch.where(ate, an.y2raw, nan),
        xy=torch.where(ate, an.xyraw, nan), npix=torch.where(ate, an.dnpix, nan),
    )


def _object_index(seg: Tensor, pix: Tensor) -> Tensor:
    """Row index (ordered by batch index, label) of the labelled pixels ``pix`` of ``seg``."""
    B, _, H, W = seg.shape
    segf = seg.reshape(-1)
    lab = _g(segf, pix)
    bb = pix // (H * W)
    nper = torch.zeros(B, dtype=torch.int64, device=seg.device).scatter_reduce_(0, bb, lab, reduce="amax")
    start = torch.cumsum(nper, 0) - nper
    return _g(start, bb) + lab - 1


def isophotal_moments(image: Tensor, segmentation: Tensor, filtered: Optional[Tensor] = None) -> dict:
    """Minimal isophotal measurements on a fixed segmentation (used when photometry.py is absent).

    Barycentre ``x, y`` (0-based), second moments ``x2, y2, xy``, ``a, b, theta`` (degrees,
    SExtractor's rule: 45 when ``x2 == y2``), ``npix``, ``peak`` and ``flux_iso`` over each label's
    pixels. Moments are weighted by the ``filtered`` detection image when given (SExtractor 2.x
    computes X_IMAGE so: checked on sep's image.cat), else by ``image``; ``flux_iso``/``peak`` use
    ``image``. Objects are ordered by (batch index, label). Differentiable w.r.t. ``image``.
    """
    B, _, H, W = image.shape
    segf = segmentation.reshape(-1)
    idx = (segf > 0).nonzero().squeeze(1)
    lab = _g(segf, idx)
    bb = idx // (H * W)
    nper = torch.zeros(B, dtype=torch.int64, device=image.device).scatter_reduce_(0, bb, lab, reduce="amax")
    o = _g(torch.cumsum(nper, 0) - nper, bb) + lab - 1
    n = int(nper.sum())
    v = image.reshape(-1).index_select(0, idx).to(torch.float64)
    wgt = v if filtered is None else filtered.reshape(-1).index_select(0, idx).to(torch.float64)
    rem = idx % (H * W)
    m = segment_moments(o, n, (rem % W).double(), (rem // W).double(), wgt)
    c = central_moments(m)
    e = ellipse(c.x2, c.y2, c.xy)
    dt = image.dtype
    return dict(
        x=(c.x + m.x0).to(dt), y=(c.y + m.y0).to(dt), x2=e.x2.to(dt), y2=e.y2.to(dt), xy=e.xy.to(dt),
        a=e.a.to(dt), b=e.b.to(dt), theta=torch.rad2deg(e.theta).to(dt),
        npix=torch.bincount(o, minlength=n), peak=segment_max(v, o, n).to(dt), flux_iso=segment_sum(v, o, n).to(dt),
    )
