"""Kron radius and FLUX_AUTO (SExtractor's computeautoflux).

``KRON_RADIUS``: first moment of the (unfiltered) image within the isophotal ellipse scaled by 6
(``KRON_NSIG = 3*MARGIN_SCALE``), whole pixels, then ``kron_fact * r1/v1`` floored at ``min_radius``.
``FLUX_AUTO`` sums *whole pixels* whose centre lies in the Kron ellipse (no sub-pixel overlap: the main
reason sep's ``sum_ellipse`` disagrees at the percent level).  As photom.c, both steps work with the
centre rounded to float32 (``float mx, my``) and the squared Kron factor in float32: a pixel centre on
the ellipse's edge is in or out as SExtractor has it (at x ~ 2,000 px a float32 ulp is 1.2e-4 px).  Neighbours (MASK_TYPE CORRECT) are
excluded from the Kron moment and replaced by their mirror pixel in the flux; an object is crowded
(FLAGS 1) when more than 10 % of its Kron area is blanked.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .flags import FLAG_APER_INCOMPLETE, _box_flag_round
from .stamps import _chunks, _Frame, _geo, _helper_frame, _Objects, _reach, _rect_buckets, _side

KRON_NSIG = 6.0  # 3 * MARGIN_SCALE
CROWD_THRESHOLD = 0.1


def _ellipse_extent(cxx, cyy, cxy, k):
    dxl = cxx - cxy * cxy / (4.0 * cyy)
    dyl = cyy - cxy * cxy / (4.0 * cxx)
    dxl = torch.where(dxl > 0, k / torch.sqrt(torch.clamp(dxl, min=1e-30)), torch.zeros_like(dxl))
    dyl = torch.where(dyl > 0, k / torch.sqrt(torch.clamp(dyl, min=1e-30)), torch.zeros_like(dyl))
    return dxl, dyl


def _aperture_ellipse(o: _Objects, ell: Tensor):
    """``cxx, cyy, cxy`` of the objects' ellipses where ``ell``, of the unit circle elsewhere."""
    one = torch.ones_like(o.cxx)
    cxx = torch.where(ell, o.cxx, one)
    cyy = torch.where(ell, o.cyy, one)
    cxy = torch.where(ell, o.cxy, torch.zeros_like(one))
    return cxx, cyy, cxy


def _ellipse_r2(cxx: Tensor, cyy: Tensor, cxy: Tensor, c: Tensor, dx: Tensor, dy: Tensor, dt) -> Tensor:
    """Elliptical radius squared of the stamp pixel offsets ``dx, dy`` of objects ``c``."""
    return (cxx[c, None, None].to(dt) * dx * dx + cyy[c, None, None].to(dt) * dy * dy
            + cxy[c, None, None].to(dt) * dx * dy)


def _kron_sums(fr: _Frame, o: _Objects, ellipse, klim2: Tensor, rx: Tensor, ry: Tensor, max_elems: int):
    """Per object, over the whole pixels within the scaled ellipse: ``r1 = sum(r I)`` and ``v1 = sum(I)``
    over the unblanked pixels (float64), the pixel count and the blanked pixel count."""
    N = o.x.numel()
    dt = fr.img.dtype
    dev = fr.img.device
    r1 = torch.zeros(N, dtype=torch.float64, device=dev)
    v1 = torch.zeros(N, dtype=torch.float64, device=dev)
    area = torch.zeros(N, dtype=torch.long, device=dev)
    areab = torch.zeros(N, dtype=torch.long, device=dev)
    for sel, sy, s in _rect_buckets(_side(rx), _side(ry)):
        for c in _chunks(sel, sy * s * 4, max_elems):
            b, lab = o.bi[c], o.label[c]
            st = fr.stamps(b, lab, o.x[c], o.y[c], s, rx[c], want_var=False, sy=sy, reach_y=ry[c])
            r2 = _ellipse_r2(*ellipse, c, st.dx, st.dy, dt)
            inside = (r2 <= klim2[c, None, None].to(dt)) & st.valid
            good = inside & ~st.masked
            pix = torch.where(good, st.pix, torch.zeros_like(st.pix)).double()
            r1[c] = (torch.sqrt(torch.clamp(r2, min=0)).double() * pix).sum((-1, -2))
            v1[c] = pix.sum((-1, -2))
            area[c] = inside.sum((-1, -2))
            areab[c] = (inside & st.masked).sum((-1, -2))
    return r1, v1, area, areab


def _float_centres(o: _Objects) -> _Objects:
    """The objects with their centres rounded to float32 (photom.c's ``float mx, my``), kept float64."""
    return o._replace(x=o.x.float().double(), y=o.y.float().double())


def _stage_kron(fr: _Frame, o: _Objects, kron_fact: float, min_radius: float, autoaper0: float, max_elems: int,
                nsig: float = KRON_NSIG, raw: bool = False):
    """Kron factor (SExtractor computeautoflux step 1).  Returns ``kronfactor, area, crowded, flag``
    (``raw``: the first moment ``r1 / v1`` and ``flag``)."""
    o = _float_centres(o)
    ell = nsig * torch.sqrt(o.a * o.b) > autoaper0 / 2.0
    cxx, cyy, cxy = _aperture_ellipse(o, ell)
    dxl, dyl = _ellipse_extent(cxx, cyy, cxy, nsig)
    circ = torch.full_like(dxl, autoaper0 / 2.0)
    dxl = torch.where(ell, dxl, circ)
    dyl = torch.where(ell, dyl, circ)
    klim2 = torch.where(ell, torch.full_like(dxl, nsig ** 2), circ * circ)
    flag = _box_flag_round(o.x, dxl, fr.W) | _box_flag_round(o.y, dyl, fr.H)
    r1, v1, area, areab = _kron_sums(fr, o, (cxx, cyy, cxy), klim2, _reach(dxl), _reach(dyl), max_elems)
    ok = (r1 > 0) & (v1 > 0)
    if raw:
        return torch.where(ok, r1 / torch.where(ok, v1, torch.ones_like(v1)), torch.zeros_like(r1)), flag
    kf = torch.where(ok, kron_fact * r1 / torch.where(ok, v1, torch.ones_like(v1)), torch.zeros_like(r1))
    kf = torch.clamp(kf, min=min_radius)
    kf = torch.where(ok, kf, torch.full_like(kf, min_radius))
    kf = torch.where(area > 0, kf, torch.zeros_like(kf))
    # photom.c: ``(float)areab/area > CROWD_THRESHOLD``, a float32 ratio against the double 0.1 (10 % exactly
    # is crowded: 0.1f > 0.1)
    crowded = (area > 0) & ((areab.float() / area.clamp(min=1).float()).double() > CROWD_THRESHOLD)
    return kf, area, crowded, flag


def _auto_sums(fr: _Frame, o: _Objects, ellipse, klim2: Tensor, rx: Tensor, ry: Tensor, active: Tensor,
               max_elems: int):
    """Per object of ``active``: flux and variance of the whole pixels within the Kron ellipse (blanked
    neighbours corrected), the pixel count and the blanked pixel count."""
    N = o.x.numel()
    dt = fr.img.dtype
    dev = fr.img.device
    flux = torch.zeros(N, dtype=dt, device=dev)
    var = torch.zeros(N, dtype=dt, device=dev)
    area = torch.zeros(N, dtype=torch.long, device=dev)
    areab = torch.zeros(N, dtype=torch.long, device=dev)
    for sel, sy, s in _rect_buckets(_side(rx[active]), _side(ry[active])):
        sel = active[sel]
        for c in _chunks(sel, sy * s * 4, max_elems):
            b, lab, cx, cy = o.bi[c], o.label[c], o.x[c], o.y[c]
            st = fr.stamps(b, lab, cx, cy, s, rx[c], sy=sy, reach_y=ry[c])
            r2 = _ellipse_r2(*ellipse, c, st.dx, st.dy, dt)
            inside = (r2 <= klim2[c, None, None].to(dt)) & st.valid
            pix = fr.corrected(st, b, lab, cx, cy)
            fi = inside.to(dt)
            flux[c] = (fi * pix).sum((-1, -2))
            var[c] = (fi * st.var).sum((-1, -2))
            area[c] = inside.sum((-1, -2))
            areab[c] = (inside & st.masked).sum((-1, -2))
    return flux, var, area, areab


def _stage_auto(fr: _Frame, o: _Objects, kf: Tensor, autoaper1: float, max_elems: int):
    """FLUX_AUTO (SExtractor computeautoflux step 2) in the ellipse scaled by the Kron factor ``kf``.
    Returns ``flux, var, kronfactor, crowded, flag``."""
    o = _float_centres(o)
    ell = kf * torch.sqrt(o.a * o.b) > autoaper1 / 2.0
    cxx, cyy, cxy = _aperture_ellipse(o, ell)
    dxl, dyl = _ellipse_extent(cxx, cyy, cxy, 1.0)
    dxl = torch.where(ell, dxl * kf, torch.full_like(dxl, autoaper1 / 2.0))
    dyl = torch.where(ell, dyl * kf, torch.full_like(dyl, autoaper1 / 2.0))
    kf32 = kf.float()  # SExtractor's float kronfactor, squared in float
    klim2 = torch.where(ell, (kf32 * kf32).to(kf.dtype), torch.full_like(kf, (autoaper1 / 2.0) ** 2))
    kf_out = torch.where(ell, kf, torch.zeros_like(kf))
    flag = _box_flag_round(o.x, dxl, fr.W) | _box_flag_round(o.y, dyl, fr.H)
    active = torch.nonzero(kf > 0).flatten()  # kf == 0 <=> no usable pixel in step 1
    flux, var, area, areab = _auto_sums(fr, o, (cxx, cyy, cxy), klim2, _reach(dxl), _reach(dyl), active,
                                        max_elems)
    crowded = areab.double() > CROWD_THRESHOLD * area.double()
    return flux, var, kf_out, crowded, flag


def kron_radius(image: Tensor, x, y, a, b, theta, r: float = KRON_NSIG, *, mask: Optional[Tensor] = None,
                batch_index=None, max_elems: int = 1 << 22):
    """First moment ``sum(r_i I_i) / sum(I_i)`` (in units of the ellipse ``a, b``) over the whole pixels
    within the ellipse scaled by ``r`` (SExtractor: 6), masked pixels skipped -- multiply by
    ``kron_fact`` (2.5) and floor at ``min_radius`` for SExtractor's KRON_RADIUS.  Returns
    ``(kronrad, flag)``; 0 where the sums are not positive."""
    fr, bi, n = _helper_frame(image, mask, None, x, batch_index)
    g = _geo(bi, x, y, image.dtype, a, b, theta)
    kr, flag = _stage_kron(fr, g, 1.0, 0.0, 0.0, max_elems, nsig=float(r), raw=True)
    return kr.to(image.dtype), flag.long() * FLAG_APER_INCOMPLETE
