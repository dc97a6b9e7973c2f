"""SExtractor's windowed positions XWIN/YWIN (winpos.c: compute_winpos).

An iterated Gaussian-weighted centroid with ``sigma = 2 * hl_radius / 2.35`` (``hl_radius`` from the
growth curve), within ``4 sigma``, 11x11 sub-sampling at the window edge, step factor 2, at most 16
iterations, stop when the step < 1e-4 px.  SExtractor 2.25 then reports the isophotal position instead
(:func:`revert_winpos`) when the last window's flux is not positive, its second moments are negative or
their determinant is, or the windowed centroid is more than 1 px away in x and in y from the isophotal
one and outside the isophotal ellipse (``cxx dx^2 + cyy dy^2 + cxy dx dy > 1``); ``winpos_revert=False``
reproduces older 2.x releases.

Vectorisation: the still moving objects of a stamp size iterate together, with the separable Gaussian
folded into one small ``bmm``, the window edge sub-sampled per stamp row (chord ends computed once per
sub-row, counted in int16) and stamps re-gathered only when the stamp origin changes (or the CORRECT
mirror centre, for stamps with blanked pixels).  Geometry, edge sub-sampling and the stamp cache live
in work buffers reused by every iteration (on CPU, fresh temporaries of a few MB cost more than the
arithmetic on them: their pages are faulted in anew each time), and the last few still-moving objects
of every chunk iterate together.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._runtime import flat_nonzero
from .flags import FLAG_APER_INCOMPLETE, _box_flag_trunc
from .stamps import _chunks, _Frame, _geo, _helper_frame, _MirrorCentre, _Objects, _reach, _side, _size_buckets, _wbuf

WINPOS_NITERMAX = 16
WINPOS_NSIG = 4.0
WINPOS_OVERSAMP = 11
WINPOS_STEPMIN = 1e-4
WINPOS_FAC = 2.0
#: default cap (px) of the windowed centroid's integration radius ``4 sig`` (huge objects only: a
#: saturated star's halo gives ``sig`` ~100 px, i.e. ~1,000^2-pixel windows iterated 16 times)
WINPOS_MAX_RADIUS = 128.0
_WINPOS_TAIL = 256  # windowed-centroid stragglers below this count per chunk are iterated together


class _WinState(NamedTuple):
    """Per-object state (updated in place: position ``mx, my`` float64, truncation ``flag``, ``niter``,
    SExtractor's ``wflag``) and constants (window radius ``raper``, stamp ``reach``, squared radii of the
    window, of the inner full-pixel disc and of the outer ring edge, ``1 / (2 sig^2)``; image dtype)."""

    mx: Tensor
    my: Tensor
    flag: Tensor
    niter: Tensor
    wflag: Tensor
    raper: Tensor
    reach: Tensor
    rap2: Tensor
    rint2: Tensor
    rring2: Tensor
    inv2s2: Tensor
    ksub: Tensor
    workspace: bool


def _winpos_state(fr: _Frame, o: _Objects, sig: Tensor, max_radius: Optional[float]) -> _WinState:
    """Start positions, window radii (``4 sig``, capped at ``max_radius`` with ``flag``) and constants."""
    N = o.x.numel()
    dt = fr.img.dtype
    dev = fr.img.device
    mx = o.x.double().clone()
    my = o.y.double().clone()
    sig = sig.double()
    raper = WINPOS_NSIG * sig
    flag = torch.zeros(N, dtype=torch.bool, device=dev)
    if max_radius is not None:
        flag = raper > float(max_radius)
        raper = raper.clamp(max=float(max_radius))
    sc = 1.0 / WINPOS_OVERSAMP
    off = 0.5 * (sc - 1.0)
    ksub = torch.arange(WINPOS_OVERSAMP, device=dev, dtype=dt) * sc + off
    # sub-samples lie within 5/11 * sqrt(2) = 0.643 px of the pixel centre: pixels nearer than
    # raper - 0.65 count fully, pixels beyond raper + 0.65 not at all (identical to sub-sampling the
    # whole SExtractor ring raper +- 0.75, cheaper)
    dsub = (WINPOS_OVERSAMP - 1) / (2.0 * WINPOS_OVERSAMP) * math.sqrt(2.0) + 0.005
    rint = raper - dsub
    # work buffers only without autograd (in-place ops)
    ws = not (fr.img.requires_grad or mx.requires_grad or sig.requires_grad)
    return _WinState(
        mx, my, flag, torch.zeros(N, dtype=torch.long, device=dev), torch.zeros(N, dtype=torch.long, device=dev),
        raper, _reach(raper + dsub), (raper * raper).to(dt),
        torch.where(rint > 0, rint * rint, torch.zeros_like(rint)).to(dt), ((raper + dsub) ** 2).to(dt),
        (1.0 / (2.0 * sig ** 2)).to(dt), ksub, ws)


class _WinStamps:
    """The objects of one stamp side being iterated: the corrected stamps cached per object (rows
    aligned with ``act``), the stamp key each was gathered for, and work buffers reused by every
    iteration (fresh frame-chunk-sized temporaries cost more than the arithmetic on CPU: the
    allocator returns their pages to the OS and faults them in again); active objects use the
    leading rows."""

    def __init__(self, n0: int, s: int, dt, dev, workspace: bool):
        self.s, self.dt, self.dev, self.ws = s, dt, dev, workspace
        if workspace:
            self.b_r2 = torch.empty(n0, s, s, dtype=dt, device=dev)
            self.b_in = torch.empty(n0, s, s, dtype=torch.bool, device=dev)
            self.b_ring = torch.empty(n0, s, s, dtype=torch.bool, device=dev)
            self.b_loc = torch.empty(n0, s, s, dtype=dt, device=dev)
            self.b_spare = torch.empty(n0, s, s, dtype=dt, device=dev)  # ping-pong partner of the cache
            self.zero_t = torch.zeros((), dtype=dt, device=dev)
        self.bufs = {}
        self.cache = torch.zeros(n0, s, s, dtype=dt, device=dev)
        self.keys = torch.full((n0, 4), -(1 << 40), dtype=torch.long, device=dev)
        self.hasm = torch.zeros(n0, 1, dtype=torch.long, device=dev)  # stamp holds blanked pixels
        self.masked = torch.zeros(n0, s, s, dtype=torch.bool, device=dev)  # its blanked pixels

    def buf(self, name, shape, dtype):
        return _wbuf(self.bufs, name, shape, dtype, self.dev)

    def refresh(self, fr: _Frame, o: _Objects, st: _WinState, act: Tensor, rch: Tensor, x0: Tensor, y0: Tensor):
        """Re-gather the stamps whose origin changed; where only the CORRECT mirror centre moved (stamps
        with blanked pixels), replace only their blanked pixels (:meth:`_remirror`)."""
        cxm, cym = _MirrorCentre.of(st.mx.index_select(0, act)), _MirrorCentre.of(st.my.index_select(0, act))
        mkey = torch.stack([2 * cxm.m + cxm.frac.long(), 2 * cym.m + cym.frac.long()], 1)  # the mirror maps
        key = torch.cat([torch.stack([x0, y0], 1), mkey * self.hasm], 1)
        diff = key != self.keys
        moved = diff[:, :2].any(1)
        chg = torch.nonzero(moved).flatten()
        if chg.numel():
            gi = act[chg]
            b, lab = o.bi[gi], o.label[gi]
            sp = fr.stamps(b, lab, st.mx[gi], st.my[gi], self.s, rch[chg], want_var=False)
            self.cache[chg] = fr.corrected(sp, b, lab, st.mx[gi], st.my[gi])
            self.masked.index_copy_(0, chg, sp.masked)
            hm = sp.masked.flatten(1).any(1).long()[:, None]
            self.hasm[chg] = hm
            self.keys[chg] = torch.cat([key[chg, :2], mkey[chg] * hm], 1)
        mir = torch.nonzero(diff[:, 2:].any(1) & ~moved).flatten()
        if mir.numel():
            self._remirror(fr, o, act, mir, mkey, x0, y0)
            self.keys[mir] = key[mir]

    def _remirror(self, fr: _Frame, o: _Objects, act: Tensor, mir: Tensor, mkey: Tensor, x0: Tensor, y0: Tensor):
        """The cached stamps ``mir`` (same origin, new mirror centre ``mkey``) with their blanked pixels
        replaced anew as :meth:`_Frame.corrected` does (the other pixels do not depend on the centre)."""
        if fr.blank is None or fr.mask_type != "correct":
            return  # blanked pixels are 0 (BLANK) or kept (NONE) wherever the centre is
        oi, yy, xx = torch.nonzero(self.masked.index_select(0, mir), as_tuple=True)
        rows = mir.index_select(0, oi)
        gi = act.index_select(0, rows)
        kx, ky = mkey[rows, 0], mkey[rows, 1]
        vals = fr.mirror_values(o.bi.index_select(0, gi), o.label.index_select(0, gi),
                                _MirrorCentre(torch.div(kx, 2, rounding_mode="floor"), kx % 2 == 1),
                                _MirrorCentre(torch.div(ky, 2, rounding_mode="floor"), ky % 2 == 1),
                                x0.index_select(0, rows) + xx, y0.index_select(0, rows) + yy)
        self.cache.index_put_((rows, yy, xx), vals)

    def keep(self, keep: Tensor):
        """Drop the objects that stopped (``keep``: the rows still moving)."""
        if self.ws:
            self.cache, self.b_spare = (torch.index_select(self.cache, 0, keep, out=self.b_spare[:keep.numel()]),
                                        self.cache)
        else:
            self.cache = self.cache[keep]
        self.keys = self.keys[keep]
        self.hasm = self.hasm[keep]
        self.masked = self.masked[keep]


def _edge_counts(ws: _WinStamps, fl: Tensor, fx: Tensor, dyr: Tensor, rap2: Tensor, ksub: Tensor) -> Tensor:
    """Number of the 11x11 sub-samples inside the window radius (``rap2``: squared, per object) of each
    window-edge pixel ``fl`` (flat (object, row, column) ids).  Per stamp row and sub-row k the chord
    |x| < w_k holds the sub-columns g (g = 11 j + m over the whole row) with lo_k <= g <= hi_k (none
    when w_k = 0); a pixel counts the ones in [11 j, 11 j + 10]."""
    s, dt = ws.s, ws.dt
    n_a = fx.shape[0]
    K = WINPOS_OVERSAMP
    off = 0.5 * (1.0 / WINPOS_OVERSAMP - 1.0)
    x0s = (off - fx)[:, None, None]  # offset of sub-column g = 0
    # the chord ends are small integers: count in int16 (int32 for huge stamps), whose
    # min/max/sum kernels run several times faster than float32's on CPU; same counts
    it_ = torch.int16 if s * WINPOS_OVERSAMP < 30000 else torch.int32
    rowi = fl // s  # object * s + row
    if ws.ws:  # the same float operations, in place in reused buffers
        yk = torch.add(dyr[:, :, None], ksub, out=ws.buf("yk", (n_a, s, K), dt))  # (n, s, 11)
        w = torch.mul(yk, yk, out=ws.buf("w", (n_a, s, K), dt))
        torch.sub(rap2[:, None, None], w, out=w).clamp_(min=0).sqrt_()
        lhf = ws.buf("lhf", (n_a, s, 2, K), dt)
        lo_, hi_ = lhf[:, :, 0], lhf[:, :, 1]
        torch.neg(w, out=lo_).sub_(x0s).mul_(K).floor_().add_(1)
        torch.sub(w, x0s, out=hi_).mul_(K).ceil_().sub_(1)
        lohi = ws.buf("lhi", (n_a, s, 2, K), it_).copy_(lhf)
        lohi = torch.index_select(lohi.view(n_a * s, 2, K), 0, rowi, out=ws.buf("lhg", (rowi.numel(), 2, K), it_))
        g0 = ((fl - rowi * s) * K).to(it_)[:, None]
        c1 = torch.minimum(lohi[:, 1], g0 + (K - 1), out=ws.buf("c1", (rowi.numel(), K), it_))
        c2 = torch.maximum(lohi[:, 0], g0, out=ws.buf("c2", (rowi.numel(), K), it_))
        return c1.sub_(c2).add_(1).clamp_(min=0).sum(-1, dtype=it_)
    yk = dyr[:, :, None] + ksub  # (n, s, 11)
    w = torch.sqrt(torch.clamp(rap2[:, None, None] - yk * yk, min=0))
    lohi = torch.stack([torch.floor((-w - x0s) * K) + 1, torch.ceil((w - x0s) * K) - 1], 2).to(it_)
    lohi = lohi.reshape(n_a * s, 2, K).index_select(0, rowi)
    g0 = ((fl - rowi * s) * K).to(it_)[:, None]
    return (torch.minimum(lohi[:, 1], g0 + (K - 1)) - torch.maximum(lohi[:, 0], g0) + 1).clamp_(min=0).sum(-1, dtype=it_)


def _window_pixels(ws: _WinStamps, st: _WinState, act: Tensor, fx: Tensor, dyr: Tensor, dx2: Tensor,
                   dy2: Tensor) -> Tensor:
    """The cached stamps of ``act`` inside the window (``(n, s, s)``): pixels within the inner disc
    whole, the ring at the window edge weighted by its 11x11 sub-samples inside the radius, 0 outside."""
    n_a = act.numel()
    cache = ws.cache
    if ws.ws:
        r2 = torch.add(dy2[:, :, None], dx2[:, None, :], out=ws.b_r2[:n_a])
        inner = torch.lt(r2, st.rring2.index_select(0, act)[:, None, None], out=ws.b_in[:n_a])
        ring = torch.gt(r2, st.rint2.index_select(0, act)[:, None, None], out=ws.b_ring[:n_a]).logical_and_(inner)
        loc = torch.where(inner, cache, ws.zero_t, out=ws.b_loc[:n_a])
    else:
        r2 = dy2[:, :, None] + dx2[:, None, :]
        inner = r2 < st.rring2.index_select(0, act)[:, None, None]
        ring = inner & (r2 > st.rint2.index_select(0, act)[:, None, None])
        loc = torch.where(inner, cache, torch.zeros_like(cache))
    fl = flat_nonzero(ring)  # flat (object, row, column) ids
    if fl.numel():
        # 11x11 sub-sampling only on the window's edge pixels
        cnt = _edge_counts(ws, fl, fx, dyr, st.rap2.index_select(0, act), st.ksub)
        sc = 1.0 / WINPOS_OVERSAMP
        vals = cache.reshape(-1)[fl] * (cnt.to(ws.dt) * (sc * sc))
        if ws.ws:
            loc.view(-1).index_put_((fl,), vals)
        else:
            loc = loc.reshape(-1).index_put((fl,), vals).view(loc.shape)
    return loc


def _window_moments(loc: Tensor, dxr: Tensor, dyr: Tensor, dx2: Tensor, dy2: Tensor, inv2s2: Tensor):
    """Gaussian-weighted first and second moments of the window pixels ``loc`` about the current centre.
    Returns the centroid offset ``dxp, dyp``, whether the weight is positive (``ok``) and SExtractor's
    window flags (4: no weight, 2: negative variance, 1: singular)."""
    # separable Gaussian: exp(-dy^2 k) exp(-dx^2 k), clamped (no denormals; loc = 0 there)
    gy = torch.exp(-torch.clamp(dy2 * inv2s2, max=60.0))
    gx = torch.exp(-torch.clamp(dx2 * inv2s2, max=60.0))
    gxd = gx * dxr
    rmat = torch.stack([gx, gxd, gxd * dxr], 2)  # (n, s, 3)
    m = torch.bmm(loc, rmat).double() * gy.double()[:, :, None]  # (n, rows, 3)
    dyv = dyr.double()
    u, v_, w2 = m[:, :, 0], m[:, :, 1], m[:, :, 2]
    tv = u.sum(-1)
    ok = tv > 0
    tvs = torch.where(ok, tv, torch.ones_like(tv))
    uy = u * dyv
    sx1 = v_.sum(-1)
    sy1 = uy.sum(-1)
    sxx = w2.sum(-1)
    syy = (uy * dyv).sum(-1)
    sxy = (v_ * dyv).sum(-1)
    dxp = torch.where(ok, sx1 / tvs, torch.zeros_like(tv))
    dyp = torch.where(ok, sy1 / tvs, torch.zeros_like(tv))
    m2x = sxx / tvs - dxp * dxp
    m2y = syy / tvs - dyp * dyp
    m2xy = sxy / tvs - dxp * dyp
    wflag = (~ok).long() * 4 + ((m2x < 0) | (m2y < 0)).long() * 2 + (m2x * m2y - m2xy * m2xy < 0).long()
    return dxp, dyp, ok, wflag


def _winpos_step(fr: _Frame, o: _Objects, st: _WinState, ws: _WinStamps, act: Tensor) -> Tensor:
    """One iteration of the objects ``act``: move them by ``WINPOS_FAC`` times their windowed centroid
    offset.  Returns which of them still move."""
    dt = ws.dt
    cxm, cym = st.mx.index_select(0, act), st.my.index_select(0, act)
    rap = st.raper.index_select(0, act)
    st.flag.index_copy_(0, act, st.flag.index_select(0, act) | _box_flag_trunc(cxm, rap, fr.W)
                        | _box_flag_trunc(cym, rap, fr.H))
    rch = st.reach.index_select(0, act)
    x0 = torch.floor(cxm - rch).long() + 1  # as in _Frame.stamps
    y0 = torch.floor(cym - rch).long() + 1
    ws.refresh(fr, o, st, act, rch, x0, y0)
    fx = (cxm - x0.double()).to(dt)
    fy = (cym - y0.double()).to(dt)
    arf = torch.arange(ws.s, device=ws.dev).to(dt)
    dxr = arf[None, :] - fx[:, None]  # (n, s) column offsets
    dyr = arf[None, :] - fy[:, None]  # (n, s) row offsets
    dx2, dy2 = dxr * dxr, dyr * dyr
    loc = _window_pixels(ws, st, act, fx, dyr, dx2, dy2)
    dxp, dyp, ok, wflag = _window_moments(loc, dxr, dyr, dx2, dy2, st.inv2s2.index_select(0, act)[:, None])
    st.wflag.index_copy_(0, act, wflag)
    st.mx.index_copy_(0, act, cxm + dxp * WINPOS_FAC)
    st.my.index_copy_(0, act, cym + dyp * WINPOS_FAC)
    st.niter.index_add_(0, act, torch.ones_like(act))
    return ok & (dxp * dxp + dyp * dyp >= WINPOS_STEPMIN ** 2) & (st.niter.index_select(0, act) < WINPOS_NITERMAX)


def _iterate(fr: _Frame, o: _Objects, st: _WinState, act: Tensor, s: int, tail: int) -> Tensor:
    """Iterate the objects ``act`` on stamps of side ``s`` until they stop; once fewer than ``tail``
    still move (after 3 iterations), return them instead (per-iteration overhead)."""
    ws = _WinStamps(act.numel(), s, fr.img.dtype, fr.img.device, st.workspace)
    it = 0
    while act.numel():
        if act.numel() < tail and it >= 3:
            return act  # a few stragglers: iterated later with those of every other chunk
        it += 1
        moving = _winpos_step(fr, o, st, ws, act)
        if not bool(moving.all()):
            keep = torch.nonzero(moving).flatten()
            act = act[keep]
            ws.keep(keep)
    return act


def _stage_winpos(fr: _Frame, o: _Objects, sig: Tensor, max_elems: int, max_radius: Optional[float] = None):
    """SExtractor's iterative windowed centroid (compute_winpos): Gaussian window of ``sig`` within
    ``4 sig`` (11x11 sub-sampling at the window edge), step factor 2, <= 16 iterations, stop when the
    step < 1e-4 px.  ``max_radius`` (px, None = none) truncates the integration radius ``4 sig`` of
    huge objects (the Gaussian ``sig`` is kept), as SExtractor's window is truncated by its image
    buffer; the objects whose window was truncated are flagged (returned ``flag``, FLAGS 16).  All
    objects of a stamp size iterate together; the corrected stamps are cached per object and
    re-gathered only when the stamp origin or the CORRECT mirror centre changes.  The separable
    Gaussian is folded into one small ``bmm`` (rows x [gx, gx dx, gx dx^2]) in the image dtype; the
    per-row marginals are then combined in float64.  Returns ``xwin, ywin, flag, niter, wflag``."""
    st = _winpos_state(fr, o, sig, max_radius)
    rest = []
    for sel, s in _size_buckets(_side(st.reach)):
        for c in _chunks(sel, s * s * 6, max_elems):
            left = _iterate(fr, o, st, c, s, _WINPOS_TAIL)
            if left.numel():
                rest.append(left)
    if rest:
        # the stragglers of every bucket and chunk together, grouped again by the stamp side they need
        # (a larger stamp only adds pixels outside the window, whose weight is 0; one stamp of the
        # largest side for all of them would make a few huge objects cost every straggler that side)
        left = torch.cat(rest)
        for sel, s in _size_buckets(_side(st.reach.index_select(0, left))):
            for c in _chunks(left[sel], s * s * 6, max_elems):
                _iterate(fr, o, st, c, s, 0)
    return st.mx, st.my, st.flag, st.niter, st.wflag


def windowed_centroid(image: Tensor, x, y, sig, *, mask: Optional[Tensor] = None, batch_index=None,
                      max_elems: int = 1 << 22):
    """SExtractor's XWIN/YWIN iteration from 0-based ``(x, y)`` with Gaussian ``sig`` (scalar or per
    object; SExtractor uses ``2 * flux_radius(0.5) / 2.35``).  Returns ``(xwin, ywin, niter, flag)``."""
    fr, bi, n = _helper_frame(image, mask, None, x, batch_index)
    g = _geo(bi, x, y, image.dtype)
    s_ = torch.as_tensor(sig, device=bi.device).double().reshape(-1).expand(g.x.shape)
    xw, yw, flag, niter, _ = _stage_winpos(fr, g, s_, max_elems)
    return xw.to(image.dtype), yw.to(image.dtype), niter, flag.long() * FLAG_APER_INCOMPLETE



def revert_winpos(xw: Tensor, yw: Tensor, shape, win_flags: Tensor):
    """SExtractor 2.25's fallback (winpos.c ``win_flag``): the isophotal position ``shape.x, shape.y``
    where the windowed fit failed (``win_flags`` != 0: flux <= 0, negative moments or determinant) or
    wandered off: ``dx^2 > 1`` and ``dy^2 > 1`` and outside the isophotal ellipse ``shape.cxx..cxy``."""
    dx, dy = (xw - shape.x).double(), (yw - shape.y).double()
    far = (dx * dx > 1.0) & (dy * dy > 1.0) & (shape.cxx * dx * dx + shape.cyy * dy * dy + shape.cxy * dx * dy > 1.0)
    back = far | (win_flags != 0)
    return torch.where(back, shape.x.to(xw.dtype), xw), torch.where(back, shape.y.to(yw.dtype), yw)
