"""Circular apertures (SExtractor's FLUX_APER) and the standalone ``sum_circle`` / ``sum_ellipse``.

SExtractor sub-samples the pixels within ``r - 0.75 < d < r + 0.75`` of the centre on a 5x5 grid
(``APER_OVERSAMP``); inner pixels count fully.  ``subpix=5`` reproduces that; ``subpix=0`` gives the
exact circle/pixel overlap instead.  Sub-sampling is applied only to the pixels whose sub-samples can
straddle the circle (the band ``r +- (k-1)/(2k) sqrt 2`` instead of SExtractor's ``r +- 0.75``, same
values).  ``sum_ellipse`` integrates whole pixels whose centre lies in the ellipse, as FLUX_AUTO.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
from torch import Tensor

from .flags import FLAG_APER_INCOMPLETE, _box_flag_trunc
from .kron import _stage_auto
from .stamps import _chunks, _Frame, _geo, _helper_frame, _Objects, _reach, _side, _size_buckets

APER_OVERSAMP = 5
EXACT_SUBROWS = 64  # sub-rows with exact chords for the "exact" circular overlap (error << 1e-4)


def _circle_fraction(dx: Tensor, dy: Tensor, r: Tensor, subpix: int) -> Tensor:
    """Fraction of each pixel (centre offset dx, dy; (n, s, s)) inside the circle of radius r (per
    object, (n, 1, 1)).  ``subpix >= 1``: SExtractor's sub-sampling (pixels within r +- 0.75 sampled on a
    subpix x subpix grid, strict ``<``, inner pixels 1); ``subpix == 0``: exact overlap (exact chords on
    EXACT_SUBROWS sub-rows).  Only the pixels of the edge ring are sub-sampled (gathered, computed,
    scattered back)."""
    r = r.expand(dx.shape[0], 1, 1)
    d2 = dx * dx + dy * dy
    # only pixels whose sub-samples can straddle the circle are sub-sampled: with subpix >= 1 the
    # sub-samples lie within (subpix - 1) / (2 subpix) * sqrt(2) (< 0.75) of the pixel centre, so
    # pixels nearer than r minus that count fully and farther than r plus that not at all (the
    # same values as sub-sampling SExtractor's whole r +- 0.75 ring)
    band = 0.75 if subpix == 0 else (subpix - 1) / (2.0 * subpix) * math.sqrt(2.0) + 0.005
    rint = r - band
    rint2 = torch.where(rint > 0, rint * rint, torch.zeros_like(rint))
    rext2 = (r + band) ** 2
    frac = (d2 <= rint2).to(d2.dtype)
    ring = (d2 > rint2) & (d2 < rext2)
    oi, yy, xx = torch.nonzero(ring, as_tuple=True)
    if oi.numel() == 0:
        return frac
    rdx, rdy = dx[oi, yy, xx], dy[oi, yy, xx]
    rr2 = (r * r)[oi, 0, 0]
    if subpix == 0:
        k = EXACT_SUBROWS
        t = (torch.arange(k, device=dx.device, dtype=dx.dtype) + 0.5) / k - 0.5
        yk = rdy[:, None] + t
        w = torch.sqrt(torch.clamp(rr2[:, None] - yk * yk, min=0.0))
        lo = torch.maximum(rdx[:, None] - 0.5, -w)
        hi = torch.minimum(rdx[:, None] + 0.5, w)
        val = torch.clamp(hi - lo, min=0.0).mean(-1)
    else:
        scale = 1.0 / subpix
        off = 0.5 * (scale - 1.0)
        kk = torch.arange(subpix, device=dx.device, dtype=dx.dtype)
        yk = rdy[:, None] + off + kk * scale
        R2 = rr2[:, None] - yk * yk
        w = torch.sqrt(torch.clamp(R2, min=0.0))
        a = (rdx + off)[:, None]
        lo = torch.floor((-w - a) / scale) + 1
        hi = torch.ceil((w - a) / scale) - 1
        cnt = torch.clamp(torch.clamp(hi, max=subpix - 1) - torch.clamp(lo, min=0) + 1, min=0)
        cnt = torch.where(R2 > 0, cnt, torch.zeros_like(cnt))
        val = cnt.sum(-1) * (scale * scale)
    return frac.index_put((oi, yy, xx), val)


def _stage_aper(fr: _Frame, o: _Objects, radii: Sequence[float], subpix: int, max_elems: int, gain):
    N = o.x.numel()
    dt = fr.img.dtype
    dev = fr.img.device
    nap = len(radii)
    flux = torch.zeros(N, nap, dtype=dt, device=dev)
    var = torch.zeros(N, nap, dtype=dt, device=dev)
    area = torch.zeros(N, nap, dtype=dt, device=dev)
    if N == 0 or nap == 0:
        return flux, var, area
    rmax = max(radii)
    reach = _reach(torch.full((N,), rmax + 0.75, device=dev))
    per = 5 if subpix else EXACT_SUBROWS
    for sel, s in _size_buckets(_side(reach)):
        for c in _chunks(sel, s * s * per, max_elems):
            b, lab, cx, cy = o.bi[c], o.label[c], o.x[c], o.y[c]
            st = fr.stamps(b, lab, cx, cy, s, reach[c])
            pix = fr.corrected(st, b, lab, cx, cy)
            vmask = st.valid.to(dt)
            for i, r in enumerate(radii):
                rr = torch.full((c.numel(), 1, 1), float(r), dtype=dt, device=dev)
                fr_ = _circle_fraction(st.dx, st.dy, rr, subpix) * vmask
                flux[c, i] = (fr_ * pix).sum((-1, -2))
                var[c, i] = (fr_ * st.var).sum((-1, -2))
                area[c, i] = fr_.sum((-1, -2))
    return flux, var, area


def sum_circle(image: Tensor, x, y, r: float, *, var=None, mask: Optional[Tensor] = None, batch_index=None,
               subpix: int = APER_OVERSAMP, max_elems: int = 1 << 22):
    """Flux in circles of radius ``r`` (pixels) at 0-based ``(x, y)``, as SExtractor's FLUX_APER
    (``subpix=5``) or with the exact overlap (``subpix=0``).  ``mask`` pixels count as 0.

    Returns ``(flux, fluxerr, flag)``; ``fluxerr`` from ``var`` (scalar or map, ADU^2); flag = 16 when
    the aperture box is clipped by the image border.  Batched with ``batch_index`` (torchvision style).
    """
    fr, bi, n = _helper_frame(image, mask, var, x, batch_index)
    g = _geo(bi, x, y, image.dtype)
    f, v, _ = _stage_aper(fr, g, [float(r)], subpix, max_elems, 0.0)
    rr = torch.full_like(g.x, float(r))
    flag = (_box_flag_trunc(g.x, rr, fr.W) | _box_flag_trunc(g.y, rr, fr.H)).long() * FLAG_APER_INCOMPLETE
    return f[:, 0], torch.sqrt(v[:, 0]), flag


def sum_ellipse(image: Tensor, x, y, a, b, theta, r=1.0, *, var=None, mask: Optional[Tensor] = None,
                batch_index=None, max_elems: int = 1 << 22):
    """Flux of the whole pixels whose centre lies in the ellipse ``(a r, b r, theta)`` (theta in degrees,
    counter-clockwise from +x): SExtractor's FLUX_AUTO integration rule.  ``r`` scalar or per object.
    Returns ``(flux, fluxerr, flag)``."""
    fr, bi, n = _helper_frame(image, mask, var, x, batch_index)
    g = _geo(bi, x, y, image.dtype, a, b, theta)
    kf = torch.as_tensor(r, device=bi.device).double().reshape(-1).expand(g.x.shape).clone()
    f, v, _, _, flag = _stage_auto(fr, g, kf, 0.0, max_elems)
    return f, torch.sqrt(v), flag.long() * FLAG_APER_INCOMPLETE

