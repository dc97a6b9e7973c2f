"""SExtractor's growth curve (growth.c): FLUX_RADIUS and the half-light radius of the windowed centroid.

A 64-bin cumulative curve out to ``6 a`` (whole pixels binned at their centre radius, pixels within
0.75 px of a bin edge sub-sampled 5x5), interpolated at ``frac * FLUX_AUTO``.  The curve is built first
from the pixels near a generous guess of the largest requested radius, which makes every bin inside the
guess exact; objects whose first crossing lies beyond the exact bins are recomputed from all pixels, so
the result is the full curve's (its 5x5 sub-samples are binned in float32: a bin edge can move by
~1e-6 px).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .._runtime import flat_nonzero
from .flags import _box_flag_trunc
from .stamps import _chunks, _Frame, _Objects, _reach, _side, _size_buckets, _Stamps, _wbuf

GROWTH_NSTEP = 64
GROWTH_OVERSAMP = 5
GROWTH_NSIG = 6.0
GROWTH_MINHLRAD = 0.5


def _first_crossing(growth: Tensor, tv: Tensor) -> Tensor:
    """Index of the first growth-curve bin >= tv (the last bin when none: SExtractor stops there)."""
    ge = growth.detach() >= tv.detach()[:, None]
    ge[:, -1] = True
    return torch.argmax(ge.to(torch.uint8), dim=1)



def _growth_pixels(fr: _Frame, st: _Stamps, o: _Objects, c: Tensor, rc: Tensor, s: int):
    """The stamp pixels of objects ``c`` whose centre lies within ``rc`` (+1e-3): their object row
    ``oi`` in the chunk, corrected value and float64 centre offsets ``pdx, pdy``."""
    b, lab, cx, cy = o.bi[c], o.label[c], o.x[c], o.y[c]
    dx32, dy32 = st.dx, st.dy
    r2f = dx32 * dx32 + dy32 * dy32
    inside = (r2f < ((rc + 1e-3) ** 2).to(r2f.dtype)[:, None, None]) & st.valid
    fl = flat_nonzero(inside)  # flat (object, row, column) ids
    oi = torch.div(fl, s * s, rounding_mode="floor")
    yy = torch.div(fl - oi * (s * s), s, rounding_mode="floor")
    xx = fl - oi * (s * s) - yy * s
    pix = fr.corrected(st, b, lab, cx, cy).reshape(-1).index_select(0, fl)  # run gathers beat per-pixel ones
    # offsets as in _Frame.stamps (same float ops, no gather from the expanded stamps)
    arf = torch.arange(s, device=fl.device).to(dx32.dtype)
    fxs = (cx.double() - st.x0.double()).to(dx32.dtype)
    fys = (cy.double() - st.y0.double()).to(dx32.dtype)
    pdx = (arf.index_select(0, xx) - fxs.index_select(0, oi)).double()
    pdy = (arf.index_select(0, yy) - fys.index_select(0, oi)).double()
    return oi, pix, pdx, pdy


def _bin_subsamples(g: Tensor, p: Tensor, pdx: Tensor, pdy: Tensor, base: Tensor, dens: Tensor, wb: dict):
    """Add the 5x5 sub-samples of the pixels (values ``p``, offsets ``pdx, pdy``) to their growth bins
    (``g[base + bin]``, float32 bin indices at density ``dens`` bins per px)."""
    dev = g.device
    sc = 1.0 / GROWTH_OVERSAMP
    sub5 = (torch.arange(GROWTH_OVERSAMP, device=dev, dtype=torch.float64) * sc + 0.5 * (sc - 1.0)).float()
    m_ = p.numel()
    sx = pdx.detach().float()[None, :] + sub5[:, None]  # (5, m); bin indices only
    sy = pdy.detach().float()[None, :] + sub5[:, None]
    # (5, 5, m): sub-sample major, in reused buffers (fresh temporaries of this size
    # cost more than the arithmetic here: their pages are faulted in anew each time)
    q = torch.add((sy * sy)[:, None, :], (sx * sx)[None, :, :], out=_wbuf(wb, "q", (5, 5, m_), sx.dtype, dev))
    q = torch.sqrt_(q).mul_(dens.detach().float()).floor_().clamp_(max=GROWTH_NSTEP)
    fl = _wbuf(wb, "fl", (5, 5, m_), torch.int32, dev).copy_(q)
    fl = fl.add_(base.to(torch.int32)).view(GROWTH_OVERSAMP ** 2, m_)
    val = p * (sc * sc)
    for k in range(GROWTH_OVERSAMP ** 2):  # 25 adds of m values: no expanded copy of val
        g.index_add_(0, fl[k], val)


def _growth_bins(oi: Tensor, pix: Tensor, pdx: Tensor, pdy: Tensor, rc: Tensor, stp_obj: Tensor, n_: int,
                 wb: dict) -> Tensor:
    """The (not cumulative) growth-curve bins ``(n_, 64)`` of a chunk's objects from their pixels: whole
    pixels at their centre radius, pixels within 0.75 px of a bin edge sub-sampled 5x5."""
    nb = GROWTH_NSTEP + 1  # one overflow bin per object (dropped), avoids boolean compaction
    r2 = pdx * pdx + pdy * pdy
    keep = r2 < (rc ** 2)[oi]
    r = torch.sqrt(r2)
    stp = stp_obj[oi]
    dens = 1.0 / stp
    d = torch.fmod(r, stp)
    over = ((d < 0.75) | (d > stp - 0.75)) & keep
    whole = (~over) & keep
    p = pix.double()
    jw = torch.floor(r * dens).long().clamp(max=GROWTH_NSTEP)
    g = torch.zeros(n_ * nb, dtype=torch.float64, device=pix.device)
    g.index_add_(0, oi * nb + jw, torch.where(whole, p, torch.zeros_like(p)))
    ov = torch.nonzero(over).flatten()
    if ov.numel():
        _bin_subsamples(g, p[ov], pdx[ov], pdy[ov], oi[ov] * nb, dens[ov], wb)
    return g.reshape(n_, nb)[:, :GROWTH_NSTEP]


def _growth_curve(fr: _Frame, o: _Objects, idx: Tensor, rsel: Tensor, step: Tensor, max_elems: int) -> Tensor:
    """Cumulative SExtractor growth curve ``(len(idx), 64)`` of objects ``idx`` from the pixels whose
    centre lies within ``rsel`` (per object): whole pixels binned at their centre radius, pixels
    within 0.75 px of a bin edge sub-sampled 5x5 (float32 sub-samples, bin edges move by ~1e-6 px)."""
    n_all = idx.numel()
    growth = torch.zeros(n_all, GROWTH_NSTEP, dtype=torch.float64, device=fr.img.device)
    if n_all == 0:
        return growth
    rs = rsel[idx]
    reach = _reach(rs + 1e-3)
    wb = {}  # work buffers
    for sel, s in _size_buckets(_side(reach)):
        for cl in _chunks(sel, s * s * 8, max_elems):
            c = idx[cl]
            st = fr.stamps(o.bi[c], o.label[c], o.x[c], o.y[c], s, reach[cl], want_var=False)
            oi, pix, pdx, pdy = _growth_pixels(fr, st, o, c, rs[cl], s)
            growth[cl] = _growth_bins(oi, pix, pdx, pdy, rs[cl], step[c], c.numel(), wb)
    return torch.cumsum(growth, dim=1)


def _radius_at(growth: Tensor, step: Tensor, tv: Tensor) -> Tensor:
    """Radius where the cumulative ``growth`` first reaches ``tv`` (linear within the bin)."""
    i = _first_crossing(growth, tv)
    gi = growth.gather(1, i[:, None])[:, 0]
    gp = growth.gather(1, (i - 1).clamp(min=0)[:, None])[:, 0]
    dg = gi - gp
    g0 = growth[:, 0]
    fi = i.double()
    inner = torch.where(dg != 0, fi + (tv - gp) / torch.where(dg != 0, dg, torch.ones_like(dg)), fi)
    first = torch.where(g0 != 0, tv / torch.where(g0 != 0, g0, torch.ones_like(g0)), torch.zeros_like(g0))
    return step * torch.where(i > 0, inner, first)


def _full_growth(fr: _Frame, o: _Objects, rlim: Tensor, rcut: Tensor, step: Tensor, fa: Tensor,
                 fracs: Sequence[float], max_elems: int) -> Tensor:
    """The growth curve out to ``rcut``, exact up to every object's first crossing of ``fracs`` (and
    1/2) of ``fa``.  First pass: the pixels within R1 + 0.75 of a guess R1 (a Gaussian profile's radius
    for the largest fraction, generously scaled); every bin whose outer edge is <= R1 is then exact (a
    pixel beyond R1 + 0.75 has all its sub-samples beyond R1).  Objects whose first crossing is not
    among those exact bins are redone over all pixels (second pass), so the result equals the full
    growth curve."""
    N = o.x.numel()
    dev = fr.img.device
    fmax = min(max([0.5] + [float(f) for f in fracs]), 0.99)
    r1 = o.a.double() * (1.25 * math.sqrt(-2.0 * math.log(1.0 - fmax))) + 0.5
    rsel = torch.minimum(rcut, r1 + 0.75)
    full = rsel >= rcut
    imax = torch.where(full, torch.full_like(rlim, GROWTH_NSTEP - 1), torch.floor(r1 / step) - 1).long()
    growth = _growth_curve(fr, o, torch.arange(N, device=dev), rsel, step, max_elems)
    crossing = [_first_crossing(growth, f * fa) for f in fracs] + [_first_crossing(growth, 0.5 * fa)]
    redo = torch.zeros(N, dtype=torch.bool, device=dev)
    for i_ in crossing:
        redo |= i_ > imax
    redo = torch.nonzero(redo).flatten()
    if redo.numel():
        growth = growth.index_put((redo,), _growth_curve(fr, o, redo, rcut, step, max_elems))
    return growth


def _stage_growth(fr: _Frame, o: _Objects, flux_auto: Tensor, fracs: Sequence[float], autoaper0: float,
                  max_elems: int):
    """SExtractor growth curve (64 bins out to 6a) -> flux radii at ``fracs`` and hl_radius."""
    N = o.x.numel()
    rlim = GROWTH_NSIG * o.a.double()
    rlim = torch.where(rlim < autoaper0, torch.full_like(rlim, autoaper0), rlim)
    rlim = torch.clamp(rlim, min=1e-3)
    raper = rlim + 1.5
    step = rlim / GROWTH_NSTEP
    flag = _box_flag_trunc(o.x, raper, fr.W) | _box_flag_trunc(o.y, raper, fr.H)
    # sub-samples lie within 0.5*sqrt(2) of the centre: pixels beyond rlim + 0.71 only feed bins
    # >= GROWTH_NSTEP, which SExtractor drops, so they are skipped (exact); the stamp only needs rcut
    rcut = torch.minimum(raper, rlim + 0.71)
    growth = _full_growth(fr, o, rlim, rcut, step, flux_auto.detach().double(), fracs, max_elems)
    fa = flux_auto.double()
    radii = []
    for f in fracs:
        rr = _radius_at(growth, step, f * fa)
        radii.append(torch.minimum(rr, rlim))
    hl = torch.abs(_radius_at(growth, step, 0.5 * fa))
    hl = torch.minimum(hl, rlim)
    hl = torch.clamp(hl, min=GROWTH_MINHLRAD)
    fr_ = torch.stack(radii, 1) if radii else torch.zeros(N, 0, dtype=torch.float64, device=fr.img.device)
    return fr_, hl, flag
