"""Background estimation and removal (paper section 2.2.2).

``Background2D`` cuts the frame into boxes, estimates a sigma-clipped background level and rms in
every box (all boxes at once), replaces boxes without enough good pixels by values from their
neighbours, median-filters the coarse mesh and interpolates it back to full resolution.

Two flavours, chosen with ``method``:

``method="photutils"`` (default)
    photutils 3.0 ``Background2D`` semantics: astropy ``SigmaClip(sigma, maxiters)`` (centre =
    median, spread = population std, the clipped set shrinks cumulatively and the final set is every
    good pixel inside the last bounds, as astropy's fast C path), then an estimator ``"median"``,
    ``"mean"``, ``"sextractor"`` (2.5 median - 1.5 mean, the median when |mean - median| / std >= 0.3,
    the mean when std = 0, as photutils' ``SExtractorBackground``), ``"mmm"`` (3 median - 2 mean) or
    ``"mode"`` (``median_factor`` * median - ``mean_factor`` * mean, the paper's eq. 4). RMS:
    ``"std"`` or ``"mad_std"``. Invalid boxes are filled by inverse-distance weighting of the 10
    nearest valid boxes (photutils' ``ShepardIDWInterpolator``, searched within 4 boxes), the mesh is
    median-filtered with NaN padding at its border (``scipy.ndimage.generic_filter(nanmedian,
    mode='constant', cval=nan)``) and ``interpolation="bicubic"`` is photutils' cubic-spline zoom
    (``scipy.ndimage.zoom(order=3, mode='reflect', grid_mode=True)`` clipped to the mesh range).

``method="sextractor"``
    SExtractor / sep ``back.c``: per box a mean and std, one 2-sigma cut, a histogram of
    ``int(step * npix + 1)`` (at most 4096) levels over mean +- 5 sigma, then on the histogram up to
    100 iterations of 3-sigma clipping around the interpolated histogram median; mode =
    2.5 med - 1.5 mean (the median when |mean - med| / sigma >= 0.3). Boxes with fewer than half
    their pixels good get the average of the nearest valid boxes, the median filter shrinks
    symmetrically at the mesh border, ``filter_threshold`` is BACK_FILTTHRESH, and
    ``interpolation="bicubic"`` is SExtractor's natural cubic spline through the box centres (nodes at
    ``y = (j + 0.5) * bh`` and ``x = (i + 0.5) * bw - 0.5``, with SExtractor's own second-derivative
    recurrence). ``sigma``, ``maxiters``, ``estimator`` and ``rms_estimator`` do not apply.

Edge rule (both flavours, as photutils 3.0 and SExtractor): the mesh has ``ceil(H / bh)`` by
``ceil(W / bw)`` boxes; the last row / column of boxes holds only the pixels that exist (no padding
enters the statistics) and its value sits at the centre of the full-size box, so the interpolation
extrapolates slightly past it. photutils then judges such a partial box with ``exclude_percentile``
against the *full* box area (set ``exclude_percentile=10`` for photutils' default), SExtractor
against half of the *actual* partial-box area. ``min_pixels`` (default 100, the paper's rule) is
applied on top in the photutils flavour: a box is valid when it keeps at least ``min_pixels``
good pixels after clipping.

Masked pixels (``mask`` True), NaN and inf never enter the statistics. ``mask`` may also be a
coarse bad-patch mask (e.g. the quality scorer's output) whose height and width divide the image's:
it is expanded by nearest-neighbour repetition.

Speed. The default photutils flavour estimates the clipped statistics from one fine histogram per
box (``exact=False``): bins of sigma/32 within +-8 sigma of a robust centre (from a sorted
subsample), logarithmic bins beyond, so the 10 clipping iterations cost no pass over the pixels.
For integer-valued images the central bins hold exactly one integer each, so medians and moments
are exact there. ``exact=True`` sorts every box once instead and iterates on prefix sums (exact
order statistics, slower); it is used automatically when the input requires grad, so gradients
flow from ``background`` and ``rms`` to the pixels (clipping decisions held constant). The
SExtractor flavour is always histogram based, as SExtractor itself. Everything after the box
statistics (fill, filter, interpolation) is differentiable; interpolation is a separable linear map
``R_y @ mesh @ R_x^T`` built once per call, with ``R_y`` applied as its banded factor (<= 4 taps per
row after a small dense pre-map), so the full-size step costs O(H W) instead of O(H W ny).
On a shared, oversubscribed CPU run torch with ``OMP_WAIT_POLICY=PASSIVE`` (set before torch is
imported) or one thread: libgomp's default spin-waiting workers otherwise steal the main thread's
core and each parallel region can wait a scheduler time slice, which inflates times super-linearly.

Shapes: ``image`` (B, 1, H, W) float; ``mask`` bool (B or 1, 1, H, W) or a coarse (B or 1, 1, h, w)
patch mask; outputs (B, 1, H, W) in the image's dtype and device. Units are the image's units.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import as_pair, check_batch_nonempty, check_float_dtype, check_image
from ._runtime import adapt_to_load, cpu_workers, map_on_threads, side_by_side, sort_last
from ._runtime import searchsorted as _searchsorted
from ._robust import MAD_TO_STD

__all__ = ["BackgroundResult", "Background2D", "background_2d", "subtract_background"]

ESTIMATORS = ("median", "mean", "sextractor", "mmm", "mode")
RMS_ESTIMATORS = ("std", "mad_std")
INTERPOLATIONS = ("bicubic", "bilinear", "zoom", "spline")
METHODS = ("photutils", "sextractor")

_MAD_TO_STD = MAD_TO_STD  # astropy mad_std constant (one for the package: _robust)
_IDW_NEIGHBOURS = 10  # photutils Background2D._interpolate_grid
_IDW_RADIUS = 4  # boxes searched around an invalid box
# fast histogram: linear bins of 1/32 of the robust sigma over +-8 sigma, logarithmic beyond
_HIST_LIN = 256
_HIST_LOG = 8.0
_HIST_HALF = _HIST_LIN + int(math.ceil(_HIST_LOG * math.log(1.0e8 / _HIST_LIN)))
_SOLVE_BOXES = 1024  # boxes whose histograms are kept and clipped together (~45 kB a box)


class BackgroundResult(NamedTuple):
    """Background and background-rms maps, each (B, 1, H, W), in the image's units."""

    background: Tensor
    rms: Tensor


def _compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


# ------------------------------------------------------------------------------------------------
# argument handling
# ------------------------------------------------------------------------------------------------
def _prepare_mask(mask: Optional[Tensor], image: Tensor) -> Optional[Tensor]:
    """Pixel mask (B, H, W) from a full-resolution or coarse patch mask, or None."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor (True = bad) or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool (True = bad pixel), got {mask.dtype}")
    if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"mask must be shaped (B or 1, 1, h, w), got {tuple(mask.shape)} for image {tuple(image.shape)}")
    H, W = image.shape[-2:]
    h, w = mask.shape[-2:]
    if (h, w) != (H, W):
        if H % h or W % w:
            raise ValueError(
                f"mask shape {tuple(mask.shape)} neither matches the image {tuple(image.shape)} nor is a "
                "coarse patch mask whose height and width divide the image's")
        mask = mask.repeat_interleave(H // h, dim=-2).repeat_interleave(W // w, dim=-1)
    return mask.expand(image.shape[0], 1, H, W)[:, 0]


def _check_odd_pair(value, name):
    pair = as_pair(value, name)
    if pair[0] % 2 == 0 or pair[1] % 2 == 0:
        raise ValueError(f"{name} must be odd along both axes, got {value!r}")
    return pair


# ------------------------------------------------------------------------------------------------
# photutils flavour: sigma-clipped statistics per box
# ------------------------------------------------------------------------------------------------
class _Stats(NamedTuple):
    n: Tensor  # good pixels kept after clipping
    median: Tensor
    mean: Tensor
    std: Tensor
    mad_std: Optional[Tensor]


def _gather(t: Tensor, idx: Tensor) -> Tensor:
    return torch.gather(t, -1, idx.unsqueeze(-1)).squeeze(-1)


def _tiles(xv: Tensor) -> Tensor:
    """(B, cy, bh, nx, bw) -> (B, cy, nx, bh * bw) (a copy)."""
    B, cy, bh, nx, bw = xv.shape
    return xv.permute(0, 1, 3, 2, 4).reshape(B, cy, nx, bh * bw)


def _clip_stats_exact(xv: Tensor, badv: Tensor, sigma: float, maxiters: int, need_mad: bool) -> _Stats:
    """Exact astropy sigma clipping: sort each box once, iterate on prefix sums (differentiable)."""
    v = _tiles(xv)
    bad = _tiles(badv)
    inf = torch.tensor(float("inf"), dtype=v.dtype, device=v.device)
    vs = torch.sort(torch.where(bad, inf, v), dim=-1).values
    nvalid = (~bad).sum(-1)
    P = vs.shape[-1]
    vs64d = vs.detach().to(torch.float64)
    mid = _gather(vs64d, ((nvalid - 1).clamp(min=0) // 2))
    cen = torch.where(torch.isfinite(mid), mid, torch.zeros_like(mid))
    d = torch.where(torch.isfinite(vs), vs.to(torch.float64) - cen.unsqueeze(-1), torch.zeros((), dtype=torch.float64, device=v.device))
    zero = torch.zeros(d.shape[:-1] + (1,), dtype=d.dtype, device=d.device)
    P1 = torch.cat([zero, torch.cumsum(d, -1)], -1)
    P2 = torch.cat([zero, torch.cumsum(d * d, -1)], -1)

    def stats(ilo, ihi):
        n = (ihi - ilo)
        nf = n.clamp(min=1).to(torch.float64)
        a = (ilo + (n - 1).clamp(min=0) // 2).clamp(max=P - 1)
        b = (ilo + n // 2).clamp(max=P - 1)
        med = 0.5 * (_gather(vs, a).to(torch.float64) + _gather(vs, b).to(torch.float64))
        m1 = (_gather(P1, ihi) - _gather(P1, ilo)) / nf
        var = (_gather(P2, ihi) - _gather(P2, ilo)) / nf - m1 * m1
        std = torch.sqrt(var.clamp(min=1e-300))
        return n, med, m1 + cen, std

    ilo = torch.zeros_like(nvalid)
    ihi = nvalid.clone()
    lo_f = torch.full(cen.shape, -math.inf, dtype=torch.float64, device=v.device)
    hi_f = torch.full(cen.shape, math.inf, dtype=torch.float64, device=v.device)
    active = nvalid > 0
    for _ in range(maxiters):
        n, med, mean, std = stats(ilo, ihi)
        med, std = med.detach(), std.detach()
        lo = med - sigma * std
        hi = med + sigma * std
        lo_f = torch.where(active, lo, lo_f)
        hi_f = torch.where(active, hi, hi_f)
        nlo = torch.maximum(ilo, _searchsorted(vs64d, lo.unsqueeze(-1)).squeeze(-1))
        nhi = torch.minimum(ihi, _searchsorted(vs64d, hi.unsqueeze(-1), right=True).squeeze(-1))
        nnew = (nhi - nlo).clamp(min=0)
        still = active & (nnew != n) & (nnew > 0)
        ilo = torch.where(still, nlo, ilo)
        ihi = torch.where(still, nhi, ihi)
        active = still
    # final set: every good pixel inside the last bounds (astropy's fast path)
    flo = _searchsorted(vs64d, lo_f.unsqueeze(-1)).squeeze(-1).clamp(max=P)
    fhi = _searchsorted(vs64d, hi_f.unsqueeze(-1), right=True).squeeze(-1)
    fhi = torch.minimum(fhi, nvalid).clamp(min=0)
    flo = torch.minimum(flo, fhi)
    n, med, mean, std = stats(flo, fhi)
    mad = None
    if need_mad:
        pos = torch.arange(P, device=v.device)
        inside = (pos >= flo.unsqueeze(-1)) & (pos < fhi.unsqueeze(-1))
        dev = torch.where(inside, (vs - med.to(vs.dtype).unsqueeze(-1)).abs(), inf)
        dev = torch.sort(dev, dim=-1).values
        a = ((n - 1).clamp(min=0) // 2).clamp(max=P - 1)
        b = (n // 2).clamp(max=P - 1)
        mad = 0.5 * (_gather(dev, a).to(torch.float64) + _gather(dev, b).to(torch.float64)) * _MAD_TO_STD
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=v.device)
    empty = n <= 0
    med = torch.where(empty, nan, med)
    mean = torch.where(empty, nan, mean)
    std = torch.where(empty, nan, std)
    if mad is not None:
        mad = torch.where(empty, nan, mad)
    return _Stats(n.to(torch.float64), med, mean, std, mad)


def _hist_edges(device) -> tuple[Tensor, Tensor]:
    """Bin edges and centres in normalised units t (bin width 1 inside +-_HIST_LIN)."""
    g = torch.arange(-_HIST_HALF, _HIST_HALF + 1, dtype=torch.float64, device=device)
    a = g.abs()
    t = torch.where(a <= _HIST_LIN, a, _HIST_LIN * torch.exp((a - _HIST_LIN) / _HIST_LOG))
    edges = torch.copysign(t, g)
    centres = 0.5 * (edges[1:] + edges[:-1])
    return edges, centres


def _hist_bin(t: Tensor) -> Tensor:
    """Float bin index g(t) (not floored): linear inside +-_HIST_LIN, logarithmic outside."""
    if _compiling():
        a = t.abs()
        g = a.clamp(max=_HIST_LIN) + torch.log(a.clamp(min=_HIST_LIN) * (1.0 / _HIST_LIN)) * _HIST_LOG
        return torch.copysign(g, t)
    # eager: same formula with in-place steps (a boolean-mask gather / scatter of the far pixels
    # costs more than the logarithm of every pixel: nonzero() is a slow two-pass scan on CPU)
    a = t.abs()
    g = torch.log(a.clamp(min=_HIST_LIN).mul_(1.0 / _HIST_LIN)).mul_(_HIST_LOG).add_(a.clamp_(max=_HIST_LIN))
    return g.copysign_(t)


# |t| whose bin position is just below the last edge (so no per-pixel clamp of the result is needed)
_HIST_AMAX = _HIST_LIN * math.exp((_HIST_HALF - 1e-3 - _HIST_LIN) / _HIST_LOG)


def _bin_position(t: Tensor) -> Tensor:
    """``g(t) + _HIST_HALF`` clamped to ``[0, 2 _HIST_HALF)`` (eager, no autograd, few passes)."""
    a = t.abs()
    g = a.clamp(_HIST_LIN, _HIST_AMAX).log_()
    # _HIST_LOG * (ln a - ln L) + min(a, L), with the sign of t, shifted by _HIST_HALF
    torch.add(torch.tensor(-_HIST_LOG * math.log(_HIST_LIN), dtype=g.dtype, device=g.device), g, alpha=_HIST_LOG,
              out=g)
    g.add_(a.clamp_(max=_HIST_LIN)).copysign_(t)
    return g.add_(_HIST_HALF)


class _HistGrid(NamedTuple):
    """Per-box histogram frame: bin width ``w`` and origin ``e0`` (data units), quantised flag."""
    w: Tensor  # (B, ny, nx) float64
    e0: Tensor
    quant: Tensor  # bool


def _hist_grid(xv: Tensor, badv: Optional[Tensor]) -> _HistGrid:
    """Robust centre and spread of every box from a strided subsample (about 256 pixels a box).

    ``xv``, ``badv``: (B, ny, bh, nx, bw) views of the padded frame (``badv`` None: no bad pixel). Bins are 1/32 of the 16-84 %
    spread wide, centred on the subsample median; integer or BSCALE-quantised data get one bin per
    quantum instead (values at bin centres).
    """
    B, ny, bh, nx, bw = xv.shape
    dev = xv.device
    f64 = torch.float64
    x = xv.detach()
    k = max(1, int(round(math.sqrt(bh * bw / 256.0))))
    sv = _tiles(x[:, :, ::k, :, ::k])
    if badv is None:  # no bad pixel in the frame
        ss = sort_last(sv)
        nv = torch.full(ss.shape[:-1], ss.shape[-1], dtype=torch.int64, device=dev)
    else:
        sb = _tiles(badv[:, :, ::k, :, ::k])
        inf = torch.tensor(float("inf"), dtype=x.dtype, device=dev)
        ss = sort_last(torch.where(sb, inf, sv))
        nv = (~sb).sum(-1)
    m = ss.shape[-1]

    def q(p):
        i = torch.floor(p * (nv - 1).clamp(min=0).to(f64) + 0.5).long().clamp(0, m - 1)
        return _gather(ss, i).to(f64)

    cen = q(0.5)
    lo16, hi84 = q(0.158655254), q(0.841344746)
    scale = 0.5 * (hi84 - lo16)
    okc = torch.isfinite(cen) & (nv > 0)
    cen = torch.where(okc, cen, torch.zeros_like(cen))
    scale = torch.where(torch.isfinite(scale) & okc, scale, torch.ones_like(scale))
    # quantised data (integers, BSCALE): the smallest positive gap between sorted samples is the
    # quantum if the central gaps are whole multiples of it; then one value per bin, values at bin
    # centres. (Gaps of neighbouring sorted values are exact in the data's precision.)
    dif = ss[..., 1:] - ss[..., :-1]
    if badv is not None:
        dif = torch.where(torch.isfinite(dif), dif, torch.zeros((), dtype=dif.dtype, device=dev))
    qstep = dif.masked_fill(dif <= 0, math.inf).min(-1).values
    qstep = torch.where(torch.isfinite(qstep), qstep, torch.zeros_like(qstep))
    lo16s, hi84s = lo16.to(ss.dtype).unsqueeze(-1), hi84.to(ss.dtype).unsqueeze(-1)
    central = (ss[..., :-1] >= lo16s) & (ss[..., 1:] <= hi84s)
    r = dif / qstep.clamp(min=torch.finfo(ss.dtype).tiny).unsqueeze(-1)
    offgrid = central & ((r - torch.round(r)).abs_() > 0.05)
    quant = ~offgrid.any(-1)  # (a constant sample, qstep = 0, counts as quantised)
    qstep = qstep.to(f64)
    w = (scale * (8.0 / _HIST_LIN)).clamp(min=1e-6 * cen.abs().clamp(min=1e-30))
    w = torch.where(quant, qstep, w)
    w = torch.where(w > 0, w, torch.ones_like(w))
    e0 = torch.where(quant, cen - 0.5 * w, cen)
    return _HistGrid(w, e0, quant)


def _hist_fill(xv: Tensor, badv: Optional[Tensor], w: Tensor, e0: Tensor, out: Tensor, first_box: int) -> None:
    """Accumulate the boxes of ``xv`` (B, cy, bh, nx, bw) into ``out`` (2, n_boxes * (nb + 1)).

    Row 0 counts the pixels of each bin, row 1 sums their position inside the bin ([0, 1)); boxes
    are numbered (b, row, column) over the whole frame, ``first_box`` is that of the block's first
    row in batch element 0. Bad pixels (NaN, inf, masked, padding) go to a dump bin past the last;
    ``badv`` None: the frame has none.
    """
    B, cy, bh, nx, bw = xv.shape
    dev = xv.device
    x = xv.detach()
    nb = 2 * _HIST_HALF
    inv_w = (1.0 / w).to(x.dtype).view(B, cy, 1, nx, 1)
    off = (-e0 / w).to(x.dtype).view(B, cy, 1, nx, 1)
    g = _bin_position(torch.addcmul(off, x, inv_w))  # in [0, nb) (NaN for NaN pixels)
    n_boxes = out.shape[1] // (nb + 1)
    per_b = n_boxes // B
    box = (torch.arange(B, device=dev).view(B, 1, 1) * per_b + first_box
           + torch.arange(cy * nx, device=dev).view(1, cy, nx))
    # int32 bin indices when they fit: the float -> int64 conversion is ~8x slower on CPU;
    # truncation is the floor here (g >= 0)
    itype = torch.int32 if out.shape[1] < 2 ** 31 else torch.int64
    idx = g.to(itype)
    delta = g.sub_(idx).reshape(-1)  # position inside the bin, [0, 1)
    if badv is not None:
        idx.masked_fill_(badv, nb)  # bad pixels (NaN too) -> the box's dump bin past its last one
    idx.add_((box * (nb + 1)).to(itype).view(B, cy, 1, nx, 1))
    idx = idx.reshape(-1)
    ones = torch.ones((), dtype=out.dtype, device=dev).expand(idx.numel())
    # ATen's CPU index_add_ is single-threaded: the two rows (counts, positions) are independent,
    # so they may fill at once
    side_by_side([lambda: out[0].index_add_(0, idx, ones),
                  lambda: out[1].index_add_(0, idx, delta.to(out.dtype))], x)


class _Binned(NamedTuple):
    """Histograms of many boxes, shaped (..., nb), with their prefix sums (float64, a leading 0):
    ``h`` counts, ``sd`` sums of in-bin positions, ``P0``/``P1``/``P2`` cumulative count, sum and
    sum of squares of the bins' pixels in bin units; ``quant`` (..., 1): one value per bin
    (quantised data); ``lin`` and ``gedge`` (nb,): linear-zone flag and lower edge index of each bin."""

    h: Tensor
    sd: Tensor
    P0: Tensor
    P1: Tensor
    P2: Tensor
    quant: Tensor
    lin: Tensor
    gedge: Tensor


def _hist_to_value(gv: Tensor) -> Tensor:
    """Inverse of :func:`_hist_bin`: normalised value at float bin index ``gv``."""
    a = gv.abs()
    return torch.copysign(torch.where(a <= _HIST_LIN, a, _HIST_LIN * torch.exp((a - _HIST_LIN) / _HIST_LOG)), gv)


def _binned(h: Tensor, sd: Tensor, quant: Tensor) -> _Binned:
    """Prefix sums of the bins' moments: exact first moment in the linear zone (unit-width bins),
    second moment with the uniform-bin (Sheppard) term for continuous data; bin centres in the log
    zone. (h, sd stay in the caller's float32 buffer: counts are exact, sd / h is a position in
    [0, 1); per-bin terms in the buffer's precision, everything summed across bins in float64.)"""
    dev = h.device
    f64 = torch.float64
    _, centres = _hist_edges(dev)
    gedge = torch.arange(-_HIST_HALF, _HIST_HALF, dtype=f64, device=dev)
    lin = (gedge >= -_HIST_LIN) & (gedge + 1 <= _HIST_LIN)
    qz = quant.unsqueeze(-1)
    gc = torch.where(lin, gedge, centres).to(h.dtype)  # bin origin (linear zone) or centre (log zone)
    lw = lin.to(h.dtype)
    P0 = F.pad(torch.cumsum(h, -1, dtype=f64), (1, 0))
    P1 = F.pad(torch.cumsum(torch.addcmul(h * gc, sd, lw), -1, dtype=f64), (1, 0))
    tm = torch.addcmul(gc, sd / h.clamp(min=1.0), lw)  # mean position of each bin's pixels
    tm = (h * tm).mul_(tm)
    if _compiling() or bool(quant.any()):
        tm.add_(torch.where(lin & ~qz, h / 12.0, torch.zeros((), dtype=h.dtype, device=dev)))
    else:
        tm.addcmul_(h, lw, value=1.0 / 12.0)
    P2 = F.pad(torch.cumsum(tm, -1, dtype=f64), (1, 0))
    return _Binned(h, sd, P0, P1, P2, qz, lin, gedge)


# The helpers below take values of shape (B, cy, nx, k): k bounds or quantiles of every box at once
# (one operation for both ends of a window: the cost here is per operation).
def _bin_model(hb: _Binned, j: Tensor):
    """Bin j of each box: count, mean position, slope of a linear density matching it, point mass?"""
    hj = torch.gather(hb.h, -1, j)
    mj = (torch.gather(hb.sd, -1, j) / hj.clamp(min=1.0)).clamp(0.0, 1.0)
    slope = (12.0 * (mj - 0.5)).clamp(-2.0, 2.0)
    pt = (hb.quant & hb.lin[j]) | (hj <= 1.0)
    return hj, mj, slope, pt


def _locate(v: Tensor) -> tuple[Tensor, Tensor]:
    """Bin index and position inside the bin of normalised values ``v``."""
    gv = _hist_bin(v.clamp(-1e300, 1e300))
    gv = gv.clamp(-_HIST_HALF, _HIST_HALF - 1e-9)
    fl = torch.floor(gv)
    return (fl + _HIST_HALF).long(), gv - fl


def _cum(hb: _Binned, v: Tensor, inclusive: Tensor):
    """Count, sum and sum of squares (bin units) of the pixels below v (up to v if inclusive)."""
    j, pos = _locate(v)
    hj, mj, a, pt = _bin_model(hb, j)
    p = pos.clamp(0.0, 1.0)
    fp = torch.where(inclusive, pos >= mj, pos > mj)
    fh = torch.where(pt, fp.to(torch.float64), p + 0.5 * a * (p * p - p)) * hj
    c = _hist_to_value(hb.gedge[j] + torch.where(pt, mj, p * 0.5))
    return (torch.gather(hb.P0, -1, j) + fh, torch.gather(hb.P1, -1, j) + fh * c,
            torch.gather(hb.P2, -1, j) + fh * c * c)


def _window(hb: _Binned, lo: Tensor, hi: Tensor):
    """Count, sum, sum of squares of the pixels in (lo, hi], and the count below lo."""
    ends = torch.tensor([False, True], device=lo.device)  # lower bound exclusive, upper inclusive
    c0, c1, c2 = _cum(hb, torch.stack([lo, hi], -1), ends)
    a0 = c0[..., 0]
    return (c0[..., 1] - a0).clamp(min=0.0), c1[..., 1] - c1[..., 0], c2[..., 1] - c2[..., 0], a0


def _value_at(hb: _Binned, qpos: Tensor) -> Tensor:
    """Normalised value at cumulative count ``qpos`` (inverting the bins' linear densities)."""
    nb = hb.h.shape[-1]
    j = (_searchsorted(hb.P0, qpos, right=True) - 1).clamp(0, nb - 1)
    hj, mj, a, pt = _bin_model(hb, j)
    f = ((qpos - torch.gather(hb.P0, -1, j)) / hj.clamp(min=1e-300)).clamp(0.0, 1.0)
    b = 1.0 - 0.5 * a
    pos = 2.0 * f / (b + torch.sqrt((b * b + 2.0 * a * f).clamp(min=0.0))).clamp(min=1e-12)
    pos = torch.where(pt, mj, pos.clamp(0.0, 1.0))
    return _hist_to_value(hb.gedge[j] + pos)


def _hist_median(hb: _Binned, n: Tensor, below: Tensor) -> Tensor:
    """Median of the ``n`` pixels above the first ``below`` ones."""
    q1 = below + torch.floor((n - 1.0).clamp(min=0.0) / 2.0) + 0.5
    q2 = torch.minimum(below + torch.floor(n / 2.0) + 0.5, below + n - 0.5).clamp(min=q1)
    v = _value_at(hb, torch.stack([q1, q2], -1))
    return 0.5 * (v[..., 0] + v[..., 1])


def _moments(n: Tensor, s1: Tensor, s2: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and population std from a count, sum and sum of squares."""
    nn_ = n.clamp(min=1e-300)
    mean = s1 / nn_
    var = (s2 / nn_ - mean * mean).clamp(min=0.0)
    return mean, torch.sqrt(var)


def _clip_bounds(hb: _Binned, sigma: float, maxiters: int) -> tuple[Tensor, Tensor]:
    """astropy's iterations (median +- sigma std of the kept set, the set shrinking cumulatively):
    each box's last bounds, in bin units (+-inf for an empty box)."""
    shape = hb.h.shape[:-1]
    lo_c = torch.full(shape, -math.inf, dtype=torch.float64, device=hb.h.device)
    hi_c = torch.full(shape, math.inf, dtype=torch.float64, device=hb.h.device)
    lo_f, hi_f = lo_c.clone(), hi_c.clone()
    n, m1, m2, below = _window(hb, lo_c, hi_c)
    active = n > 0.5
    for it in range(maxiters):
        med = _hist_median(hb, n, below)
        _, std = _moments(n, m1, m2)
        lo = med - sigma * std
        hi = med + sigma * std
        lo_f = torch.where(active, lo, lo_f)
        hi_f = torch.where(active, hi, hi_f)
        nlo = torch.maximum(lo_c, lo)
        nhi = torch.minimum(hi_c, hi)
        n2, t1, t2, b2 = _window(hb, nlo, nhi)
        still = active & ((n2 - n).abs() >= 0.5) & (n2 > 0.5)
        lo_c = torch.where(still, nlo, lo_c)
        hi_c = torch.where(still, nhi, hi_c)
        n = torch.where(still, n2, n)
        m1 = torch.where(still, t1, m1)
        m2 = torch.where(still, t2, m2)
        below = torch.where(still, b2, below)
        active = still
        if not _compiling() and it % 3 == 2 and not bool(active.any()):
            break
    return lo_f, hi_f


def _hist_mad(hb: _Binned, med_t: Tensor, n: Tensor, lo_f: Tensor, hi_f: Tensor) -> Tensor:
    """Median absolute deviation (bin units) of the final set: the radius r with half of it inside
    med +- r (bisection on the histogram)."""
    lo_r = torch.zeros_like(med_t)
    hi_r = (hi_f - lo_f).nan_to_num(2.0 * _HIST_LIN, posinf=1e12).clamp(min=1.0, max=1e12)
    half = 0.5 * n
    for _ in range(48):
        r = 0.5 * (lo_r + hi_r)
        c = _window(hb, torch.maximum(med_t - r, lo_f), torch.minimum(med_t + r, hi_f))[0]
        up = c >= half
        hi_r = torch.where(up, r, hi_r)
        lo_r = torch.where(up, lo_r, r)
    return 0.5 * (lo_r + hi_r)


def _clip_stats_hist(h: Tensor, sd: Tensor, grid: _HistGrid, sigma: float, maxiters: int, need_mad: bool) -> _Stats:
    """astropy sigma clipping estimated from one fine histogram per box (no gradient).

    ``h``, ``sd``: (..., nb) bin counts and sums of in-bin positions from :func:`_hist_fill`;
    ``grid``: the boxes' bin frames (same leading shape). Bins are sigma/32 wide within +-8 sigma of
    a robust centre (median and 16-84 % spread of a sorted subsample), logarithmic beyond. Each bin
    keeps its count and the mean of the pixel positions inside it, so moments of whole bins are
    exact, a bin holding a single value (integer or quantised data, lone pixels) is a point mass at
    that value, and other bins are modelled with a linear density matching their mean position when
    a clipping bound or the median falls inside them.
    """
    w, e0 = grid.w, grid.e0
    hb = _binned(h, sd, grid.quant)
    lo_f, hi_f = _clip_bounds(hb, sigma, maxiters)
    n, m1, m2, below = _window(hb, lo_f, hi_f)
    med_t = _hist_median(hb, n, below)
    mean_t, std_t = _moments(n, m1, m2)
    mad = _hist_mad(hb, med_t, n, lo_f, hi_f) * w * _MAD_TO_STD if need_mad else None
    nan = torch.tensor(float("nan"), dtype=torch.float64, device=h.device)
    empty = n <= 0.5
    med = torch.where(empty, nan, e0 + med_t * w)
    mean = torch.where(empty, nan, e0 + mean_t * w)
    std = torch.where(empty, nan, std_t * w)
    if mad is not None:
        mad = torch.where(empty, nan, mad)
    return _Stats(torch.round(n), med, mean, std, mad)


def _estimate(st: _Stats, estimator: str, rms_estimator: str, median_factor: float, mean_factor: float):
    med, mean, std = st.median, st.mean, st.std
    if estimator == "median":
        bkg = med
    elif estimator == "mean":
        bkg = mean
    elif estimator == "sextractor":
        mode = 2.5 * med - 1.5 * mean
        skew = (mean - med).abs() >= 0.3 * std
        bkg = torch.where(std == 0, mean, torch.where(skew, med, mode))
    elif estimator == "mmm":
        bkg = 3.0 * med - 2.0 * mean
    else:  # mode
        bkg = median_factor * med - mean_factor * mean
    rms = std if rms_estimator == "std" else st.mad_std
    return bkg, rms


# ------------------------------------------------------------------------------------------------
# SExtractor flavour: back.c box statistics
# ------------------------------------------------------------------------------------------------
_SEX_NSIGMA = 5.0
_SEX_AMIN = 4.0
_SEX_MAXLEVELS = 4096
_SEX_STEP = math.sqrt(2.0 / math.pi) * _SEX_NSIGMA / _SEX_AMIN


class _SexLevels(NamedTuple):
    """back.c's per-box histogram frame, each (B, cy, nx): ``valid`` (at least half the box area
    good), ``mean`` of the 2-sigma-cut pixels (float32), ``nlev`` levels of ``qscale`` starting at
    ``qzero`` (float32), and ``cste`` = 0.499999 - qzero / qscale (float32)."""

    valid: Tensor
    mean: Tensor
    nlev: Tensor
    qscale: Tensor
    qzero: Tensor
    cste: Tensor


def _sex_backstat(x: Tensor, good: Tensor, area: Tensor) -> _SexLevels:
    """backstat: mean and sigma, one 2-sigma cut, mean and sigma again; then the histogram frame."""
    B, cy, bh, nx, bw = x.shape
    dev = x.device
    f64 = torch.float64
    dims = (2, 4)
    x64 = torch.where(good, x, torch.zeros((), dtype=x.dtype, device=dev)).to(f64)
    npix = good.sum(dims)
    s1 = x64.sum(dims)
    s2 = (x64 * x64).sum(dims)
    valid = npix.to(torch.float32) >= (area.to(torch.float32) * 0.5)
    nf = npix.clamp(min=1).to(f64)
    mean = s1 / nf
    var = s2 / nf - mean * mean
    sig = torch.where(var > 0, torch.sqrt(var.clamp(min=0)), torch.zeros_like(var))
    lcut = (mean - 2.0 * sig).to(torch.float32).view(B, cy, 1, nx, 1)
    hcut = (mean + 2.0 * sig).to(torch.float32).view(B, cy, 1, nx, 1)
    inc = good & (x <= hcut) & (x >= lcut)
    x64 = torch.where(inc, x64, torch.zeros((), dtype=f64, device=dev))
    npix2 = inc.sum(dims)
    nf2 = npix2.clamp(min=1).to(f64)
    mean2 = x64.sum(dims) / nf2
    var2 = (x64 * x64).sum(dims) / nf2 - mean2 * mean2
    del x64
    sig2 = torch.where(var2 > 0, torch.sqrt(var2.clamp(min=0)), torch.zeros_like(var2))
    nlev = torch.floor(_SEX_STEP * npix2.to(f64) + 1.0).clamp(max=_SEX_MAXLEVELS).long()
    qscale = torch.where(sig2 > 0, 2 * _SEX_NSIGMA * sig2 / nlev.to(f64), torch.ones_like(sig2)).to(torch.float32)
    qzero = (mean2 - _SEX_NSIGMA * sig2).to(torch.float32)
    cste = (0.499999 - (qzero / qscale).to(f64)).to(torch.float32)
    return _SexLevels(valid, mean2.to(torch.float32), nlev, qscale, qzero, cste)


def _sex_histogram(x: Tensor, good: Tensor, lv: _SexLevels) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """backhisto: every box's histogram ``h`` (B, cy, nx, L) and the prefix sums of its count, level
    and level^2 (B, cy, nx, L + 1; a leading 0), float64."""
    B, cy, bh, nx, bw = x.shape
    dev = x.device
    f64 = torch.float64
    L = _SEX_MAXLEVELS
    T = B * cy * nx
    v = x / lv.qscale.view(B, cy, 1, nx, 1) + lv.cste.view(B, cy, 1, nx, 1)
    binf = torch.trunc(v)
    inh = good & (binf >= 0) & (binf < lv.nlev.view(B, cy, 1, nx, 1).to(torch.float32))
    base = (torch.arange(T, device=dev, dtype=torch.int64) * (L + 1)).view(B, cy, 1, nx, 1)
    # level k goes to column k + 1, pixels outside the histogram to column 0 (then zeroed), so the
    # prefix sums come out with their leading zero without a concatenation
    idx = torch.where(inh, binf.clamp(0, L - 1).to(torch.int64) + 1, torch.zeros((), dtype=torch.int64, device=dev)) + base
    del v, binf, inh
    hist = torch.zeros(T * (L + 1), dtype=f64, device=dev)
    hist.scatter_add_(0, idx.reshape(-1), torch.ones((), dtype=f64, device=dev).expand(idx.numel()))
    del idx
    hv = hist.view(B, cy, nx, L + 1)
    hv[..., 0] = 0.0
    levp = torch.arange(-1, L, dtype=f64, device=dev).clamp_(min=0.0)  # [0, 0, 1, ..., L - 1]
    return hv[..., 1:], torch.cumsum(hv, -1), torch.cumsum(hv * levp, -1), torch.cumsum(hv * (levp * levp), -1)


def _sex_backguess(lv: _SexLevels, h: Tensor, P0: Tensor, P1: Tensor, P2: Tensor, maxiter: int):
    """backguess: iterative 3-sigma clipping on the histograms. Returns (mean, median, sigma) in
    levels, each (B, cy, nx) float64."""
    f64 = torch.float64
    L = _SEX_MAXLEVELS
    nlm1 = (lv.nlev - 1)
    lc = torch.zeros_like(lv.nlev)
    hc = nlm1.clone()
    sg = 10.0 * nlm1.to(f64)
    sg1 = torch.ones_like(sg)
    mea = lv.mean.to(f64)
    med = lv.mean.to(f64)
    live = lv.valid.clone()
    for it in range(maxiter):
        cond = live & (sg >= 0.1) & ((sg / sg1 - 1.0).abs() > 1e-4)
        N = hc - lc + 1
        hcp = hc.clamp(min=-1) + 1
        S = torch.where(N > 0, _gather(P0, hcp.clamp(0, L)) - _gather(P0, lc.clamp(0, L)), torch.zeros_like(sg))
        p0l = _gather(P0, lc.clamp(0, L))
        T0 = S + 2.0 * p0l
        # a = #{k in [lc, hc] : P0[k] + P0[k+1] < T0} (the two-pointer walk of back.c, in closed form)
        j = _searchsorted(P0, (0.5 * T0).unsqueeze(-1)).squeeze(-1)
        jm = (j - 1).clamp(min=0)
        Dm = _gather(P0, jm) + _gather(P0, (jm + 1).clamp(max=L))
        kstar = torch.where((j >= 1) & (Dm >= T0), j - 1, j)
        a = torch.where(S > 0, (kstar - lc).clamp(min=0), torch.zeros_like(lc))
        a = torch.minimum(a, (N - 1).clamp(min=0))
        hilow = torch.where(N > 0, lc + a, lc)
        hihigh = torch.where(N > 0, lc + a - 1, hc)
        lowsum = _gather(P0, hilow.clamp(0, L)) - p0l
        highsum = S - lowsum
        hl = _gather(h, hilow.clamp(0, L - 1))
        hh = _gather(h, hihigh.clamp(0, L - 1))
        den = 2.0 * torch.maximum(hl, hh)
        den = torch.where(den > 0, den, torch.ones_like(den))
        nmed = torch.where(hihigh >= 0, hihigh.to(f64) + 0.5 + (highsum - lowsum) / den, torch.zeros_like(sg))
        m1 = torch.where(N > 0, _gather(P1, hcp.clamp(0, L)) - _gather(P1, lc.clamp(0, L)), torch.zeros_like(sg))
        m2 = torch.where(N > 0, _gather(P2, hcp.clamp(0, L)) - _gather(P2, lc.clamp(0, L)), torch.zeros_like(sg))
        Ss = S.clamp(min=1.0)
        nmea = torch.where(S > 0, m1 / Ss, torch.zeros_like(sg))
        nsig = torch.where(S > 0, m2 / Ss - nmea * nmea, torch.zeros_like(sg))
        nsig = torch.where(nsig > 0, torch.sqrt(nsig.clamp(min=0)), torch.zeros_like(nsig))
        lo_t = nmed - 3.0 * nsig
        hi_t = nmed + 3.0 * nsig
        nlc = torch.where(lo_t > 0, torch.floor(lo_t + 0.5), torch.zeros_like(lo_t)).long()
        nhc = torch.where(hi_t < nlm1.to(f64), torch.where(hi_t > 0, torch.floor(hi_t + 0.5), torch.ceil(hi_t - 0.5)),
                          nlm1.to(f64)).long()
        sg1 = torch.where(cond, sg, sg1)
        sg = torch.where(cond, nsig, sg)
        mea = torch.where(cond, nmea, mea)
        med = torch.where(cond, nmed, med)
        lc = torch.where(cond, nlc, lc)
        hc = torch.where(cond, nhc, hc)
        live = cond
        if not _compiling() and it % 8 == 7 and not bool(live.any()):
            break
    return mea, med, sg


def _sextractor_stats(xv: Tensor, badv: Tensor, area: Tensor, maxiter: int = 100):
    """SExtractor backstat + backhisto + backguess for a block of boxes.

    Returns (mode, sigma, valid), each (B, cy, nx); computed without gradient.
    """
    x = xv.detach().to(torch.float32)
    good = ~badv
    lv = _sex_backstat(x, good, area)
    mea, med, sg = _sex_backguess(lv, *_sex_histogram(x, good, lv), maxiter)
    qs = lv.qscale.to(torch.float64)
    qz = lv.qzero.to(torch.float64)
    mode = torch.where((mea - med).abs() < 0.3 * sg.abs(), qz + (2.5 * med - 1.5 * mea) * qs, qz + med * qs)
    mode = torch.where(sg.abs() > 0, mode, qz + mea * qs)
    sigma = sg * qs
    return mode.to(torch.float32), sigma.to(torch.float32), lv.valid


# ------------------------------------------------------------------------------------------------
# mesh filling and filtering
# ------------------------------------------------------------------------------------------------
def _window_offsets(radius: int, device):
    r = torch.arange(-radius, radius + 1, device=device)
    dy, dx = torch.meshgrid(r, r, indexing="ij")
    dy, dx = dy.reshape(-1), dx.reshape(-1)
    d2 = (dy * dy + dx * dx).to(torch.float64)
    keep = d2 > 0
    dy, dx, d2 = dy[keep], dx[keep], d2[keep]
    order = torch.argsort(d2 * 1e4 + (dy + radius) * 100 + (dx + radius))  # by distance, then row, column
    return dy[order], dx[order], d2[order]


def _neighbourhood(mesh: Tensor, radius: int, fill: float) -> Tensor:
    """(B, C, ny, nx) -> (B, C, (2r+1)^2, ny, nx) windows with ``fill`` outside the mesh."""
    B, C, ny, nx = mesh.shape
    k = 2 * radius + 1
    p = F.pad(mesh, (radius, radius, radius, radius), value=fill)
    u = F.unfold(p.reshape(B * C, 1, ny + 2 * radius, nx + 2 * radius), k)
    return u.view(B, C, k * k, ny, nx)


def _fill_invalid(mesh: Tensor, valid: Tensor, rule: str) -> Tensor:
    """Replace invalid boxes of ``mesh`` (B, C, ny, nx) from valid neighbours.

    rule "idw": inverse-distance weights over the 10 nearest valid boxes (photutils);
    rule "nearest": mean of the equidistant nearest valid boxes (SExtractor's filterback).
    Neighbours are searched within _IDW_RADIUS boxes, repeated until all boxes are filled (a
    box with no valid box anywhere takes the median of all valid boxes, or NaN if none).
    """
    if not _compiling() and bool(valid.all()):
        return mesh
    B, C, ny, nx = mesh.shape
    dev, dt = mesh.device, mesh.dtype
    radius = min(_IDW_RADIUS, max(ny, nx))
    k = 2 * radius + 1
    dy, dx, d2 = _window_offsets(radius, dev)
    lin = (dy + radius) * k + (dx + radius)
    dist = torch.sqrt(d2).to(dt)
    vmask = valid.unsqueeze(1).expand(B, C, ny, nx)
    cur = torch.where(vmask, mesh, torch.zeros((), dtype=dt, device=dev))
    ok = vmask
    n_pass = max(1, math.ceil(max(ny, nx) / max(radius, 1)))
    for _ in range(n_pass):
        vals = _neighbourhood(cur, radius, 0.0)[:, :, lin]
        okn = _neighbourhood(ok.to(dt), radius, 0.0)[:, :, lin] > 0.5
        if rule == "idw":
            rank = torch.cumsum(okn.to(torch.int32), dim=2)
            sel = okn & (rank <= _IDW_NEIGHBOURS)
            wgt = torch.where(sel, 1.0 / dist.view(1, 1, -1, 1, 1), torch.zeros((), dtype=dt, device=dev))
        else:
            big = torch.full((), float("inf"), dtype=dt, device=dev)
            dd = torch.where(okn, dist.view(1, 1, -1, 1, 1), big)
            dmin = dd.min(dim=2, keepdim=True).values
            sel = okn & (dd <= dmin * (1 + 1e-9))
            wgt = sel.to(dt)
        wsum = wgt.sum(2)
        est = (wgt * vals).sum(2) / wsum.clamp(min=1e-30)
        newok = ok | (wsum > 0)
        cur = torch.where(ok, cur, torch.where(wsum > 0, est, cur))
        ok = newok
        if not _compiling() and bool(ok.all()):
            break
    if not _compiling() and bool(ok.all()):
        return cur
    nan = torch.full((), float("nan"), dtype=dt, device=dev)
    gmed = torch.nanmedian(torch.where(vmask, mesh, nan).flatten(2), dim=2).values
    return torch.where(ok, cur, gmed.view(B, C, 1, 1))


def _nanmedian_window(win: Tensor) -> Tensor:
    """Median over dim 2 ignoring NaN; even counts average the two middle values (numpy)."""
    n = (~torch.isnan(win)).sum(2, keepdim=True)
    s = torch.sort(torch.nan_to_num(win, nan=float("inf")), dim=2).values
    a = ((n - 1).clamp(min=0) // 2)
    b = (n // 2).clamp(max=win.shape[2] - 1)
    med = 0.5 * (torch.gather(s, 2, a) + torch.gather(s, 2, b))
    return torch.where(n > 0, med, torch.full((), float("nan"), dtype=win.dtype, device=win.device)).squeeze(2)


def _median_filter_mesh(mesh: Tensor, size, threshold: Optional[float], edge: str) -> Tensor:
    """Median filter the (B, 2, ny, nx) mesh [background, rms].

    edge "nan": windows clipped at the mesh border, NaN padding ignored (photutils).
    edge "shrink": the window shrinks symmetrically at the border (SExtractor).
    With ``threshold`` a box is replaced only where |median - value| of the background >= threshold
    (SExtractor BACK_FILTTHRESH); background and rms are replaced together.
    """
    fh, fw = size
    if fh == 1 and fw == 1:
        return mesh
    B, C, ny, nx = mesh.shape
    dev = mesh.device
    ry, rx = fh // 2, fw // 2
    r = max(ry, rx)
    win = _neighbourhood(mesh, r, float("nan"))  # (B, C, k*k, ny, nx)
    k = 2 * r + 1
    oy = torch.arange(-r, r + 1, device=dev).view(k, 1).expand(k, k).reshape(-1)
    ox = torch.arange(-r, r + 1, device=dev).view(1, k).expand(k, k).reshape(-1)
    keep = (oy.abs() <= ry) & (ox.abs() <= rx)
    win = win[:, :, keep]
    oy, ox = oy[keep], ox[keep]
    if edge == "shrink":
        py = torch.arange(ny, device=dev)
        px = torch.arange(nx, device=dev)
        hy = torch.minimum(torch.minimum(py, ny - 1 - py), torch.tensor(ry, device=dev))
        hx = torch.minimum(torch.minimum(px, nx - 1 - px), torch.tensor(rx, device=dev))
        inside = (oy.abs().view(-1, 1, 1) <= hy.view(1, -1, 1)) & (ox.abs().view(-1, 1, 1) <= hx.view(1, 1, -1))
        win = torch.where(inside.unsqueeze(0).unsqueeze(0), win, torch.full((), float("nan"), dtype=win.dtype, device=dev))
    med = _nanmedian_window(win)
    if threshold is None:
        return med
    change = (med[:, :1] - mesh[:, :1]).abs() >= threshold
    return torch.where(change, med, mesh)


# ------------------------------------------------------------------------------------------------
# interpolation back to full resolution: separable linear maps
# ------------------------------------------------------------------------------------------------
def _reflect_index(k: Tensor, n: int) -> Tensor:
    k = torch.remainder(k, 2 * n)
    return torch.where(k >= n, 2 * n - 1 - k, k)


def _bspline3(t: Tensor) -> Tensor:
    a = t.abs()
    return torch.where(a < 1, 2.0 / 3.0 - a * a + 0.5 * a ** 3, torch.where(a < 2, (2 - a) ** 3 / 6.0, torch.zeros_like(a)))


def _zoom_matrix(n: int, box: int, n_out: int, order: int, device, prefilter: bool = True) -> Tensor:
    """(n_out, n) matrix of scipy.ndimage.zoom(grid_mode=True, mode='reflect') by ``box``.

    ``prefilter=False`` (order 3): the B-spline taps only, to be applied to spline coefficients.
    """
    f64 = torch.float64
    o = torch.arange(n_out, dtype=f64, device=device)
    xin = (o + 0.5) / box - 0.5
    if n == 1:
        return torch.ones(n_out, 1, dtype=f64, device=device)
    i0 = torch.floor(xin)
    R = torch.zeros(n_out, n, dtype=f64, device=device)
    if order == 1:
        f = xin - i0
        for k, wk in ((i0, 1 - f), (i0 + 1, f)):
            R.index_put_((torch.arange(n_out, device=device), _reflect_index(k.long(), n)), wk, accumulate=True)
        return R
    for s in (-1, 0, 1, 2):
        k = i0 + s
        R.index_put_((torch.arange(n_out, device=device), _reflect_index(k.long(), n)), _bspline3(xin - k), accumulate=True)
    if not prefilter:
        return R
    # spline prefilter: samples = A @ coefficients with half-sample symmetric boundaries
    A = torch.zeros(n, n, dtype=f64, device=device)
    idx = torch.arange(n, device=device)
    for s, wv in ((-1, 1.0 / 6.0), (0, 4.0 / 6.0), (1, 1.0 / 6.0)):
        A.index_put_((idx, _reflect_index(idx + s, n)), torch.full((n,), wv, dtype=f64, device=device), accumulate=True)
    return R @ torch.linalg.inv(A)


def _sextractor_d2(n: int, device) -> Tensor:
    """(n, n) linear map from node values to back.c's stored second-derivative terms.

    back.c runs the natural-spline tridiagonal recurrence and divides by 6 inside the back
    substitution (so each stored term is built from the already divided next one); reproduced as is.
    """
    f64 = torch.float64
    out = torch.zeros(n, n, dtype=f64, device=device)
    if n < 3:
        return out
    m = torch.eye(n, dtype=f64, device=device)
    u = torch.zeros(n, n, dtype=f64, device=device)
    coef = [0.0] * n
    for y in range(1, n - 1):
        temp = -1.0 / (coef[y - 1] + 4.0)
        coef[y] = temp
        u[y] = temp * (u[y - 1] - 6.0 * (m[y + 1] + m[y - 1] - 2.0 * m[y]))
    for y in range(n - 2, 0, -1):
        out[y] = (coef[y] * out[y + 1] + u[y]) / 6.0
    return out


def _spline_matrix(n: int, box: int, n_out: int, half_pixel: bool, device) -> Tensor:
    """(n_out, n) matrix of SExtractor's natural-spline interpolation through box centres."""
    f64 = torch.float64
    if n == 1:
        return torch.ones(n_out, 1, dtype=f64, device=device)
    p = torch.arange(n_out, dtype=f64, device=device)
    t = ((p + 0.5) if half_pixel else p) / box - 0.5
    lo = torch.floor(t).clamp(0, n - 2)
    d = t - lo
    c = 1 - d
    lo = lo.long()
    D = _sextractor_d2(n, device)
    eye = torch.eye(n, dtype=f64, device=device)
    return (c.unsqueeze(1) * eye[lo] + d.unsqueeze(1) * eye[lo + 1]
            + (c ** 3 - c).unsqueeze(1) * D[lo] + (d ** 3 - d).unsqueeze(1) * D[lo + 1])


def _local_factors(kind: str, n: int, box: int, n_out: int, half_pixel: bool, device):
    """Factor an axis' interpolation matrix as R = L @ M, L (n_out, K) banded (<= 4 taps), M (K, n).

    zoom: L = the cubic B-spline taps, M = the inverse spline prefilter; bilinear: L = R, M = I;
    spline: M stacks [node value, stored second-derivative term] per node (K = 2n, interleaved), so
    a row uses the 4 consecutive entries of its two nodes.
    """
    f64 = torch.float64
    if kind == "spline":
        if n == 1:
            return torch.ones(n_out, 1, dtype=f64, device=device), torch.ones(1, 1, dtype=f64, device=device)
        p = torch.arange(n_out, dtype=f64, device=device)
        t = ((p + 0.5) if half_pixel else p) / box - 0.5
        lo = torch.floor(t).clamp(0, n - 2)
        d = t - lo
        c = 1 - d
        lo = lo.long()
        M = torch.stack([torch.eye(n, dtype=f64, device=device), _sextractor_d2(n, device)], 1).reshape(2 * n, n)
        L = torch.zeros(n_out, 2 * n, dtype=f64, device=device)
        rows = torch.arange(n_out, device=device)
        for off, wv in ((0, c), (1, c ** 3 - c), (2, d), (3, d ** 3 - d)):
            L[rows, 2 * lo + off] = wv
        return L, M
    order = 3 if kind == "zoom" else 1
    if order == 1 or n == 1:
        return _zoom_matrix(n, box, n_out, order, device), torch.eye(n, dtype=f64, device=device)
    A = torch.zeros(n, n, dtype=f64, device=device)
    idx = torch.arange(n, device=device)
    for s_, wv in ((-1, 1.0 / 6.0), (0, 4.0 / 6.0), (1, 1.0 / 6.0)):
        A.index_put_((idx, _reflect_index(idx + s_, n)), torch.full((n,), wv, dtype=f64, device=device), accumulate=True)
    return _zoom_matrix(n, box, n_out, order, device, prefilter=False), torch.linalg.inv(A)


def _band_apply(L: Tensor, T: Tensor, clamp: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """``L @ T`` along dim -2 for a banded (n_out, K) ``L`` whose window start never decreases.

    Rows sharing a window are one small matmul each: O(n_out * W * taps) instead of the dense
    O(n_out * W * K) product (the dense product was the largest single cost at 4096^2).
    ``clamp``: optional (lo, hi), each broadcastable to ``T.shape[:-2]``: the result is clamped to
    them (block by block while it is in cache, without autograd).
    """
    n_out, K = L.shape
    nz = L != 0
    first = torch.where(nz.any(1), nz.float().argmax(1), torch.zeros((), dtype=torch.long, device=L.device))
    last = K - 1 - nz.flip(1).float().argmax(1)
    width = int((last - first).max().item()) + 1
    width = max(1, min(K, width))
    start = first.clamp(max=K - width)
    if bool((start[1:] < start[:-1]).any()) or bool((last > start + width - 1).any()):
        return _clamp_lead(torch.matmul(L.to(T.dtype), T), clamp)
    taps = torch.gather(L, 1, start.view(-1, 1) + torch.arange(width, device=L.device).view(1, -1)).to(T.dtype)
    starts, counts = torch.unique_consecutive(start, return_counts=True)
    lead = T.shape[:-2]
    out = torch.empty(lead + (n_out, T.shape[-1]), dtype=T.dtype, device=T.device)
    if torch.is_grad_enabled() and (T.requires_grad or taps.requires_grad):
        h0 = 0
        for s_, c_ in zip(starts.tolist(), counts.tolist()):
            out[..., h0:h0 + c_, :] = torch.matmul(taps[h0:h0 + c_], T[..., s_:s_ + width, :])
            h0 += c_
        return _clamp_lead(out, clamp)
    # no autograd: write each block straight into the output (contiguous 2-D slices, no copies)
    T2 = T.reshape((-1,) + T.shape[-2:])
    o2 = out.view((-1,) + out.shape[-2:])
    if clamp is not None:
        lo_l = clamp[0].expand(lead).reshape(-1).tolist()
        hi_l = clamp[1].expand(lead).reshape(-1).tolist()
    # runs of consecutive blocks with the same row count whose windows advance by one row are one
    # batched product each (a few calls instead of one per block: tiny-K products are call-bound)
    runs = []
    s_l, c_l = starts.tolist(), counts.tolist()
    h0 = 0
    for s_, c_ in zip(s_l, c_l):
        if runs and runs[-1][2] == c_ and runs[-1][0] + runs[-1][3] == s_:
            runs[-1][3] += 1
        else:
            runs.append([s_, h0, c_, 1])  # first window start, first row, rows per block, blocks
        h0 += c_
    for s_, h_, c_, m_ in runs:
        tp = taps[h_:h_ + m_ * c_].view(m_, c_, width)
        for i in range(T2.shape[0]):
            win = T2[i].unfold(0, width, 1)[s_:s_ + m_].transpose(1, 2)  # (m, width, W) view
            blk = o2[i, h_:h_ + m_ * c_]
            torch.bmm(tp, win, out=blk.view(m_, c_, -1))
            if clamp is not None:
                blk.clamp_(lo_l[i], hi_l[i])
    return out


def _clamp_lead(out: Tensor, clamp: Optional[tuple[Tensor, Tensor]]) -> Tensor:
    if clamp is None:
        return out
    lo, hi = (c.reshape(c.shape + (1, 1)) for c in clamp)
    return torch.maximum(torch.minimum(out, hi), lo)


def _interpolate_mesh(mesh: Tensor, kind: str, bh: int, bw: int, H: int, W: int,
                      clamp: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """(B, C, ny, nx) mesh -> (B, C, H, W) maps, ``R_y @ mesh @ R_x^T`` with a banded R_y,
    optionally clamped to ``clamp = (lo, hi)``, each (B, C)."""
    B, C, ny, nx = mesh.shape
    dev, dt = mesh.device, mesh.dtype
    if _compiling():
        Ry, Rx = _interp_matrices(kind, ny, nx, bh, bw, H, W, dev, dt)
        return _clamp_lead(torch.matmul(Ry, torch.matmul(mesh, Rx.transpose(0, 1))), clamp)
    Ly, My = _local_factors(kind, ny, bh, H, False, dev)
    Lx, Mx = _local_factors(kind, nx, bw, W, True, dev)
    Rx = Lx @ Mx
    T = torch.matmul(My, torch.matmul(mesh.to(torch.float64), Rx.transpose(0, 1))).to(dt)  # (B, C, K, W)
    return _band_apply(Ly, T, clamp)


def _interp_matrices(kind: str, ny: int, nx: int, bh: int, bw: int, H: int, W: int, device, dtype):
    if kind == "spline":
        Ry = _spline_matrix(ny, bh, H, False, device)
        Rx = _spline_matrix(nx, bw, W, True, device)
    else:
        order = 3 if kind == "zoom" else 1
        Ry = _zoom_matrix(ny, bh, H, order, device)
        Rx = _zoom_matrix(nx, bw, W, order, device)
    return Ry.to(dtype), Rx.to(dtype)


# ------------------------------------------------------------------------------------------------
# functional core
# ------------------------------------------------------------------------------------------------
@adapt_to_load
def background_2d(
    image: Tensor,
    mask: Optional[Tensor] = None,
    *,
    box_size=64,
    filter_size=3,
    sigma: float = 3.0,
    maxiters: int = 10,
    estimator: str = "sextractor",
    rms_estimator: str = "std",
    min_pixels: int = 100,
    interpolation: str = "bicubic",
    filter_threshold: Optional[float] = None,
    method: str = "photutils",
    exclude_percentile: Optional[float] = None,
    median_factor: float = 3.0,
    mean_factor: float = 2.0,
    exact: Optional[bool] = None,
    filter_edge: Optional[str] = None,
    chunk_pixels: int = 1 << 20,
    mesh_out: Optional[dict] = None,
) -> BackgroundResult:
    """Background and background-rms maps of ``image`` (B, 1, H, W).

    ``mesh_out``: a dict that receives ``"mesh"``, the filled and filtered ``(B, 2, ny, nx)`` mesh of
    [background, rms] box values the maps interpolate (SExtractor's global background RMS is the
    median of its rms boxes: :func:`global_rms`).

    Args:
        image: (B, 1, H, W) float tensor, any H and W.
        mask: bool, True = bad, (B or 1, 1, H, W) or a coarse patch mask (B or 1, 1, h, w) with h | H
            and w | W.
        box_size: box (tile) size, int or (h, w) pair, in pixels.
        filter_size: odd median-filter size over the mesh, in boxes (1 = no filtering).
        sigma, maxiters: sigma clipping (photutils flavour).
        estimator: "median", "mean", "sextractor", "mmm" or "mode" (``median_factor`` * median -
            ``mean_factor`` * mean).
        rms_estimator: "std" or "mad_std".
        min_pixels: boxes with fewer good pixels left after clipping are filled from neighbours.
        interpolation: "bicubic" (the flavour's cubic: photutils' spline zoom, or SExtractor's
            natural spline), "bilinear", or explicitly "zoom" / "spline".
        filter_threshold: filter only boxes whose median-filtered background differs from their own
            value by at least this much (SExtractor's BACK_FILTTHRESH); None filters all.
        method: "photutils" or "sextractor" (see the module docstring).
        exclude_percentile: photutils' rule: a box is invalid when more than this percentage of the
            full box area is masked or clipped. None (default) applies only ``min_pixels``.
        exact: photutils flavour only: exact order statistics by sorting (default: when the image
            requires grad) instead of the fast histogram estimate.
        filter_edge: how the mesh median filter treats the mesh border: "nan" (photutils: the window
            is cut by the border, an even count averages the two middle values) or "shrink"
            (SExtractor: the window shrinks symmetrically, unbiased on gradients). None: the
            flavour's own rule.
        chunk_pixels: rows of boxes are processed in blocks of about this many pixels (memory).

    Returns:
        ``BackgroundResult(background, rms)``, each (B, 1, H, W), image dtype and device.
        An image element without a single valid box (every pixel masked or NaN, or fewer than
        ``min_pixels`` pixels in all: an image smaller than a box) raises ``ValueError`` naming it,
        instead of returning NaN maps.
    """
    _check_args(image, estimator, rms_estimator, interpolation, method, sigma, maxiters, exclude_percentile)
    bh, bw = as_pair(box_size, "box_size")
    fsize = _check_odd_pair(filter_size, "filter_size")
    pmask = _prepare_mask(mask, image)
    if method == "photutils" and exact is None:
        exact = bool(image.requires_grad and torch.is_grad_enabled())
    boxes = _cut_boxes(image, pmask, bh, bw, chunk_pixels, may_skip_bad=method == "photutils" and not exact)
    if method == "sextractor":
        bkg_m, rms_m, valid = _sextractor_mesh(boxes)
        fill_rule, edge = "nearest", "shrink"
        kind = {"bicubic": "spline", "bilinear": "bilinear"}.get(interpolation, interpolation)
    else:
        st = _photutils_stats(boxes, float(sigma), int(maxiters), rms_estimator == "mad_std", exact)
        bkg_m, rms_m = _estimate(st, estimator, rms_estimator, median_factor, mean_factor)
        valid = (st.n >= min_pixels) & torch.isfinite(bkg_m) & torch.isfinite(rms_m)
        if exclude_percentile is not None:
            valid = valid & (st.n > (1.0 - exclude_percentile / 100.0) * bh * bw)
        bkg_m, rms_m = bkg_m.to(image.dtype), rms_m.to(image.dtype)
        fill_rule, edge = "idw", "nan"
        kind = {"bicubic": "zoom", "bilinear": "bilinear"}.get(interpolation, interpolation)
    _check_some_box_valid(valid, boxes.H, boxes.W, bh, bw, min_pixels)
    if filter_edge is not None:
        if filter_edge not in ("nan", "shrink"):
            raise ValueError(f"filter_edge must be None, 'nan' or 'shrink', got {filter_edge!r}")
        edge = filter_edge
    mesh = _fill_invalid(torch.stack([bkg_m, rms_m], 1), valid, fill_rule)  # (B, 2, ny, nx)
    mesh = _median_filter_mesh(mesh, fsize, filter_threshold, edge)
    if mesh_out is not None:
        mesh_out["mesh"] = mesh
    # photutils clips the cubic zoom to the mesh range
    clamp = (mesh.flatten(2).min(2).values, mesh.flatten(2).max(2).values) if kind == "zoom" else None
    out = _interpolate_mesh(mesh, kind, bh, bw, boxes.H, boxes.W, clamp)  # (B, 2, H, W)
    return BackgroundResult(out[:, 0:1], out[:, 1:2])


def _check_args(image: Tensor, estimator: str, rms_estimator: str, interpolation: str, method: str,
                sigma: float, maxiters: int, exclude_percentile: Optional[float]) -> None:
    """Raise naming the first argument of :func:`background_2d` that is out of its range."""
    check_image(image, "image", channels=1)
    check_float_dtype(image, "image")
    check_batch_nonempty(image, "image")
    for name, value, allowed in (("estimator", estimator, ESTIMATORS), ("rms_estimator", rms_estimator, RMS_ESTIMATORS),
                                 ("interpolation", interpolation, INTERPOLATIONS), ("method", method, METHODS)):
        if value not in allowed:
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    if not (sigma > 0):
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    if int(maxiters) < 1:
        raise ValueError(f"maxiters must be >= 1, got {maxiters!r}")
    if exclude_percentile is not None and not (0 <= exclude_percentile <= 100):
        raise ValueError(f"exclude_percentile must be within [0, 100], got {exclude_percentile!r}")


class _Boxes(NamedTuple):
    """The frame cut into ``ny`` x ``nx`` boxes of ``bh`` x ``bw``: pixels ``x`` (B, ny bh, nx bw), padded
    with NaN past the image's ``H`` x ``W``; ``bad`` the same shape, True for masked, NaN, inf and
    padding (None: the frame has no bad pixel); rows of boxes go in blocks of ``rows_per_chunk``."""

    x: Tensor
    bad: Optional[Tensor]
    H: int
    W: int
    bh: int
    bw: int
    ny: int
    nx: int
    rows_per_chunk: int

    def rows(self, r0: int, r1: int) -> tuple[Tensor, Tensor]:
        """Box rows ``r0:r1`` of the pixels and the bad map as (B, r1 - r0, bh, nx, bw) views."""
        B, bh, bw, nx = self.x.shape[0], self.bh, self.bw, self.nx
        return (self.x[:, r0 * bh:r1 * bh].reshape(B, r1 - r0, bh, nx, bw),
                self.bad[:, r0 * bh:r1 * bh].reshape(B, r1 - r0, bh, nx, bw))


def _cut_boxes(image: Tensor, pmask: Optional[Tensor], bh: int, bw: int, chunk_pixels: int,
               may_skip_bad: bool) -> _Boxes:
    """Pad the frame to whole boxes and find its bad pixels (skipped when ``may_skip_bad`` and the frame
    has no mask and only finite pixels)."""
    B, _, H, W = image.shape
    ny, nx = -(-H // bh), -(-W // bw)
    x = image[:, 0]
    with torch.no_grad():
        # no mask and a finite sum: every pixel is finite (one fast reduction instead of a full-size
        # comparison); the histogram path then skips bad-pixel handling altogether
        clean = may_skip_bad and pmask is None and not _compiling() and bool(torch.isfinite(x.sum()))
        # masked, NaN or inf: x - x is 0 exactly for finite x and NaN otherwise (two passes instead
        # of the five of ~isfinite)
        bad = None if clean else (x - x) != 0
    if pmask is not None:
        bad = bad | pmask
    ph, pw = ny * bh - H, nx * bw - W
    if ph or pw:
        x = F.pad(x, (0, pw, 0, ph), value=float("nan"))
        bad = torch.zeros(x.shape[0], H, W, dtype=torch.bool, device=x.device) if bad is None else bad
        bad = F.pad(bad.to(torch.uint8), (0, pw, 0, ph), value=1).bool()
    rows_per_chunk = max(1, int(chunk_pixels) // max(1, B * bh * nx * bw))
    return _Boxes(x, bad, H, W, bh, bw, ny, nx, rows_per_chunk)


def _sextractor_mesh(boxes: _Boxes) -> tuple[Tensor, Tensor, Tensor]:
    """SExtractor's mode, sigma and validity of every box, each (B, ny, nx), in blocks of box rows."""
    ny, nx, H, W, bh, bw = boxes.ny, boxes.nx, boxes.H, boxes.W, boxes.bh, boxes.bw
    dev = boxes.x.device
    # its per-box histograms hold up to 4096 levels: smaller blocks keep the memory bounded
    rows_per_chunk = max(1, boxes.rows_per_chunk // 4)
    area_y = torch.full((ny,), bh, device=dev)
    area_y[-1] = H - (ny - 1) * bh
    area_x = torch.full((nx,), bw, device=dev)
    area_x[-1] = W - (nx - 1) * bw
    area = area_y.view(ny, 1) * area_x.view(1, nx)
    parts = [_sextractor_stats(*boxes.rows(r0, min(ny, r0 + rows_per_chunk)), area[r0:r0 + rows_per_chunk])
             for r0 in range(0, ny, rows_per_chunk)]
    bkg, rms, valid = (torch.cat([p[i] for p in parts], 1) for i in range(3))
    return bkg.to(boxes.x.dtype), rms.to(boxes.x.dtype), valid


def _photutils_stats(boxes: _Boxes, sigma: float, maxiters: int, need_mad: bool, exact: bool) -> _Stats:
    """Sigma-clipped statistics of every box, (B, ny, nx) each: exact (sorting) or from histograms."""
    if exact:
        ny, rpc = boxes.ny, boxes.rows_per_chunk
        parts = [_clip_stats_exact(*boxes.rows(r0, min(ny, r0 + rpc)), sigma, maxiters, need_mad)
                 for r0 in range(0, ny, rpc)]
    else:
        parts = _hist_stats(boxes, sigma, maxiters, need_mad)
    return _Stats(*[torch.cat([getattr(p, f) for p in parts], 1) if parts[0]._asdict()[f] is not None else None
                    for f in _Stats._fields])


def _row_group(boxes: _Boxes, workers: int) -> int:
    """Box rows clipped together: about ``_SOLVE_BOXES`` boxes, whole blocks of rows; with several
    ``workers``, at least two groups per worker."""
    ny, rpc = boxes.ny, boxes.rows_per_chunk
    group = max(1, _SOLVE_BOXES // max(1, boxes.x.shape[0] * boxes.nx) // rpc) * rpc
    group = min(group, ny)
    if workers > 1:
        n_groups = max(math.ceil(ny / group), 2 * workers)
        group = math.ceil(math.ceil(ny / n_groups) / rpc) * rpc
    return group


def _hist_stats(boxes: _Boxes, sigma: float, maxiters: int, need_mad: bool) -> list[_Stats]:
    """Histogram estimate of the clipped statistics, one :class:`_Stats` per group of box rows.

    1) every box's bin frame from a subsample; then, group by group of box rows, 2) the histograms,
    block by block of rows (cache-sized per-pixel temporaries), into one reused buffer per thread,
    and 3) the clipping, on many boxes at a time (its cost is per operation, not per box). Groups
    are independent until the mesh is assembled: on a CPU with several threads they run on the
    threads at once, one intra-op thread each (the histogram scatter, ``index_add_``, is
    single-threaded in ATen)."""
    x, B, ny, nx, bh, bw, rpc = boxes.x, boxes.x.shape[0], boxes.ny, boxes.nx, boxes.bh, boxes.bw, boxes.rows_per_chunk
    any_bad = boxes.bad is not None and (_compiling() or bool(boxes.bad.any()))
    grid_bad = boxes.bad.reshape(B, ny, bh, nx, bw) if any_bad else None
    grid = _hist_grid(x.reshape(B, ny, bh, nx, bw), grid_bad)
    nb = 2 * _HIST_HALF
    workers = cpu_workers(x)
    workers = workers if ny > rpc else 1
    group = _row_group(boxes, workers)

    def clip_group(g0: int, buf: Tensor) -> _Stats:
        g1 = min(ny, g0 + group)
        hist = buf[:, :B * (g1 - g0) * nx * (nb + 1)]
        hist.zero_()
        for r0 in range(g0, g1, rpc):
            r1 = min(g1, r0 + rpc)
            bv = grid_bad[:, r0:r1] if any_bad else None
            _hist_fill(x[:, r0 * bh:r1 * bh].reshape(B, r1 - r0, bh, nx, bw), bv, grid.w[:, r0:r1],
                       grid.e0[:, r0:r1], hist, (r0 - g0) * nx)
        hist = hist.view(2, B, g1 - g0, nx, nb + 1)[..., :nb]
        g = _HistGrid(*(t[:, g0:g1] for t in grid))
        return _clip_stats_hist(hist[0], hist[1], g, sigma, maxiters, need_mad)

    def new_buf() -> Tensor:
        return torch.empty(2, B * group * nx * (nb + 1), dtype=x.dtype, device=x.device)

    return map_on_threads(clip_group, list(range(0, ny, group)), workers=workers, state=new_buf,
                          name="astroprep-background")


def _check_some_box_valid(valid: Tensor, H: int, W: int, bh: int, bw: int, min_pixels: int) -> None:
    """Raise naming the image elements where no box is valid (one host sync; skipped when compiling)."""
    if _compiling():
        return
    empty = ~valid.flatten(1).any(1)
    if not bool(empty.any()):
        return
    which = torch.nonzero(empty).flatten().tolist()
    why = (f"the image ({H}x{W} pixels) has fewer than min_pixels={min_pixels} pixels"
           if H * W < min_pixels else
           f"every box of {bh}x{bw} pixels has fewer than min_pixels={min_pixels} usable pixels "
           "(masked, NaN or infinite pixels do not count, nor does the part of a box beyond the image)")
    raise ValueError(f"image element(s) {which}: no background box is usable: {why}")

def global_rms(mesh: Tensor) -> Tensor:
    """SExtractor's global background RMS (``backsig``, the "RMS" it prints and thresholds against
    when no weight map is given) per image, ``(B,)``: the median of the filtered rms boxes of
    ``mesh`` (``background_2d(..., mesh_out=d)["mesh"]``), the mean of the two middle values for an
    even count; ignoring boxes <= 0 when the median is not positive (SExtractor's fallback: 1)."""
    r = mesh[:, 1].flatten(1).double()
    out = []
    for row in r:  # one value per image (B is small)
        med = torch.quantile(row, 0.5)
        if med <= 0:
            pos = row[row > 0]
            med = torch.quantile(pos, 0.5) if pos.numel() else torch.ones((), dtype=r.dtype, device=r.device)
        out.append(med)
    return torch.stack(out).to(mesh.dtype)


def subtract_background(image: Tensor, mask: Optional[Tensor] = None, **kwargs) -> Tensor:
    """``image - background_2d(image, mask, **kwargs).background`` (B, 1, H, W)."""
    return image - background_2d(image, mask, **kwargs).background


class Background2D(nn.Module):
    """2-D background and rms maps (see the module docstring for the two flavours).

    ``Background2D(box_size=64, filter_size=3, sigma=3.0, maxiters=10, estimator="sextractor",
    rms_estimator="std", min_pixels=100, interpolation="bicubic", filter_threshold=None,
    method="photutils", exclude_percentile=None, median_factor=3.0, mean_factor=2.0, exact=None)``

    ``forward(image (B, 1, H, W), mask=None) -> BackgroundResult(background, rms)``.
    """

    def __init__(self, box_size=64, filter_size=3, sigma: float = 3.0, maxiters: int = 10,
                 estimator: str = "sextractor", rms_estimator: str = "std", min_pixels: int = 100,
                 interpolation: str = "bicubic", filter_threshold: Optional[float] = None,
                 method: str = "photutils", exclude_percentile: Optional[float] = None,
                 median_factor: float = 3.0, mean_factor: float = 2.0, exact: Optional[bool] = None,
                 filter_edge: Optional[str] = None, chunk_pixels: int = 1 << 20):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if rms_estimator not in RMS_ESTIMATORS:
            raise ValueError(f"rms_estimator must be one of {RMS_ESTIMATORS}, got {rms_estimator!r}")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.box_size = tuple(as_pair(box_size, "box_size"))
        self.filter_size = tuple(_check_odd_pair(filter_size, "filter_size"))
        self.sigma = float(sigma)
        self.maxiters = int(maxiters)
        self.estimator = estimator
        self.rms_estimator = rms_estimator
        self.min_pixels = int(min_pixels)
        self.interpolation = interpolation
        self.filter_threshold = filter_threshold
        self.method = method
        self.exclude_percentile = exclude_percentile
        self.median_factor = float(median_factor)
        self.mean_factor = float(mean_factor)
        self.exact = exact
        self.filter_edge = filter_edge
        self.chunk_pixels = int(chunk_pixels)

    def forward(self, image: Tensor, mask: Optional[Tensor] = None) -> BackgroundResult:
        return background_2d(
            image, mask, box_size=self.box_size, filter_size=self.filter_size, sigma=self.sigma,
            maxiters=self.maxiters, estimator=self.estimator, rms_estimator=self.rms_estimator,
            min_pixels=self.min_pixels, interpolation=self.interpolation,
            filter_threshold=self.filter_threshold, method=self.method,
            exclude_percentile=self.exclude_percentile, median_factor=self.median_factor,
            mean_factor=self.mean_factor, exact=self.exact, filter_edge=self.filter_edge,
            chunk_pixels=self.chunk_pixels)

    def extra_repr(self) -> str:
        return (f"box_size={self.box_size}, filter_size={self.filter_size}, method={self.method!r}, "
                f"estimator={self.estimator!r}, rms_estimator={self.rms_estimator!r}, "
                f"interpolation={self.interpolation!r}")
