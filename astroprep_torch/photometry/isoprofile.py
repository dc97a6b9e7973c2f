"""Profile measurements over an object's isophotal pixels, as SExtractor 2.25's ``examineiso``
(``analyse.c``) makes them: the isophotal areas ``ISO0..ISO7`` and ``FWHM_IMAGE``.

Both take the objects' pixels as flat lists -- ``values`` (P,) the background-subtracted measurement
image at each pixel (SExtractor's ``PLIST(value)``, float32), ``px, py`` (P,) their column and row,
``row`` (P,) int64 the object (0..n-1) each belongs to -- and reduce them per object with
``index_add`` (no loop over objects or pixels).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

#: number of isophotal levels (SExtractor's NISO)
NISO = 8


def isophotal_levels(peak: Tensor, thresh: Tensor, nlevels: int = NISO) -> Tensor:
    """(N, nlevels) float32 levels ``thresh * (peak / thresh)^(i / nlevels)`` (0 where the peak or the
    threshold is not positive), with SExtractor's float/double rounding."""
    pk, th = peak.to(torch.float32), thresh.to(torch.float32)
    ratio = (pk / torch.where(th != 0, th, torch.ones_like(th))).double()
    expo = torch.arange(nlevels, dtype=torch.float64, device=peak.device) / nlevels
    lev = (th.double()[:, None] * ratio[:, None].clamp(min=0) ** expo).to(torch.float32)
    ok = (pk > 0) & (th > 0)
    return torch.where(ok[:, None], lev, torch.zeros_like(lev))


def isophotal_areas(values: Tensor, row: Tensor, n: int, peak: Tensor, thresh: Tensor,
                    nlevels: int = NISO) -> Tensor:
    """``ISO0..ISO7`` (N, nlevels) int64: per object the pixels above each level of
    :func:`isophotal_levels` (``peak`` = FLUX_MAX, ``thresh`` = the object's analysis threshold,
    THRESHOLD).  As SExtractor, a pixel counts at level i only if it is above levels 0..i."""
    lev = isophotal_levels(peak, thresh, nlevels)
    above = values.to(torch.float32)[:, None] > lev.index_select(0, row)
    above = torch.cumprod(above.to(torch.int64), dim=1)
    out = torch.zeros((n, nlevels), dtype=torch.int64, device=values.device)
    return out.index_add_(0, row, above)


def _segment_sums(row: Tensor, n: int, *cols: Tensor) -> list[Tensor]:
    stack = torch.stack(cols, dim=1)
    return list(torch.zeros((n, len(cols)), dtype=stack.dtype, device=stack.device).index_add_(0, row, stack).unbind(1))


def fwhm_image(values: Tensor, px: Tensor, py: Tensor, row: Tensor, n: int, *, x: Tensor, y: Tensor, a: Tensor,
               b: Tensor, peak: Tensor, thresh: Tensor, saturation: Optional[Tensor] = None) -> Tensor:
    """``FWHM_IMAGE`` (N,) float32, SExtractor's "FWHM assuming a gaussian core": a weighted (weights
    ``pix^2``) straight-line fit of ``log(pix)`` against ``r^2`` (``r`` from the barycentre ``x, y``,
    0-based) over the object's pixels above ``max(peak / 5, thresh)`` and below ``saturation``
    (SATUR_LEVEL minus the local background, per object; None: no limit); the slope is bounded so
    that the FWHM stays below ``1.6651 sqrt(13 a b)``, and ``1 / (4 FWHM)`` is subtracted (its
    undersampling correction).  0 where no level is positive or the fit is singular."""
    t0 = torch.maximum((peak.to(torch.float32) / 5.0), thresh.to(torch.float32))
    pix = values.double()
    lim = t0.double().index_select(0, row)
    use = pix > lim
    if saturation is not None:
        use &= pix < saturation.double().index_select(0, row)
    use &= (t0 > 0).index_select(0, row)
    dx = px.double() - x.double().index_select(0, row)
    dy = py.double() - y.double().index_select(0, row)
    d2 = dx * dx + dy * dy
    w = torch.where(use, pix * pix, torch.zeros_like(pix))
    lp = torch.log(torch.where(use, pix, torch.ones_like(pix)))
    s, sx, sxx, sy, sxy = _segment_sums(row, n, w, d2 * w, d2 * d2 * w, lp * w, lp * d2 * w)
    d = s * sxx - sx * sx
    ok = (d.abs() > 0) & (t0 > 0)
    slope = -(s * sxy - sx * sy) / torch.where(ok, d, torch.ones_like(d))
    bmax = (1.0 / (13.0 * a.to(torch.float32) * b.to(torch.float32))).double()  # float, as SExtractor
    slope = torch.where(slope < bmax, bmax, slope)
    fwhm = (1.6651 / torch.sqrt(slope)).to(torch.float32)
    fwhm = torch.where(fwhm > 0, fwhm - 1.0 / (4.0 * fwhm), fwhm)
    return torch.where(ok, fwhm, torch.zeros_like(fwhm))


__all__ = ["NISO", "isophotal_levels", "isophotal_areas", "fwhm_image"]
