"""Step 5, cleaning as SExtractor's ``clean.c``.

A brighter object (filtered flux) with a Moffat-like profile ``amp (1 + alpha r^2)^(-clean_param)``
fitted to its isophotal area removes a fainter one within ``CLEAN_ZONE = 10 (a_1 + a_2)`` whose
``minarea``-th brightest pixel above threshold lies below the profile. An object is removed when an
object that is itself kept removes it (brightness order, a fixed point over all pairs at once). The
removed object's pixels join the object that removed it, as SExtractor's ``mergeobject`` does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._index import _g
from .analyse import Analysis, _segment_max

CLEAN_ZONE = 10.0  # SExtractor: neighbours considered within CLEAN_ZONE * (a1 + a2)


def _cells_to_visit(cx, cy, bidx, radius, cell, ncx, ncy):
    """Every (object, grid cell within its radius) pair: ``(object, cell key)``."""
    n = cx.numel()
    device = cx.device
    rcell = torch.ceil(radius / cell).long()
    span = 2 * rcell + 1
    nvis = span * span
    q = torch.repeat_interleave(torch.arange(n, device=device), nvis)
    qoff = torch.cumsum(nvis, 0) - nvis
    t = torch.arange(q.numel(), device=device) - _g(qoff, q)
    qy = _g(cy, q) + t // _g(span, q) - _g(rcell, q)
    qx = _g(cx, q) + t % _g(span, q) - _g(rcell, q)
    okc = (qy >= 0) & (qy < ncy) & (qx >= 0) & (qx < ncx)
    q, qy, qx = _g(q, okc), _g(qy, okc), _g(qx, okc)
    return q, (_g(bidx, q) * ncy + qy) * ncx + qx


def _neighbour_pairs(bidx, mx, my, radius, H, W):
    """All ordered pairs (i, j), i != j, same image, with |r_i - r_j| < radius[i] (grid hashing)."""
    device = mx.device
    n = mx.numel()
    if n < 2:
        e = torch.zeros(0, dtype=torch.int64, device=device)
        return e, e
    cell = float(max(8.0, float(torch.quantile(radius.float(), 0.5))))
    ncx = int(W // cell) + 2
    ncy = int(H // cell) + 2
    cx = (mx / cell).floor().long().clamp(0, ncx - 1)
    cy = (my / cell).floor().long().clamp(0, ncy - 1)
    key = (bidx * ncy + cy) * ncx + cx
    order = torch.argsort(key)
    skey = _g(key, order)
    q, qkey = _cells_to_visit(cx, cy, bidx, radius, cell, ncx, ncy)
    lo = torch.searchsorted(skey, qkey)
    cnt = torch.searchsorted(skey, qkey, right=True) - lo
    i = torch.repeat_interleave(q, cnt)
    coff = torch.cumsum(cnt, 0) - cnt
    jj = torch.arange(i.numel(), device=device) - torch.repeat_interleave(coff, cnt)
    j = order[torch.repeat_interleave(lo, cnt) + jj]
    d2 = (_g(mx, i) - _g(mx, j)) ** 2 + (_g(my, i) - _g(my, j)) ** 2
    keep = (i != j) & (d2 < _g(radius, i) ** 2)
    return _g(i, keep), _g(j, keep)


def _eating_pairs(bidx, an: Analysis, thresh_obj, mthresh, clean_param, H, W):
    """``(i, j, model)``: brighter object ``i`` whose profile at ``j``'s centre, ``model``, exceeds
    ``j``'s ``mthresh`` (``i`` would remove ``j`` if ``i`` survives)."""
    a = an.a
    # d < CLEAN_ZONE (a_i + a_j) implies d < 2 CLEAN_ZONE max(a_i, a_j): search each object's own
    # radius 2 CLEAN_ZONE a_i and use every found pair in both orientations
    i0, j0 = _neighbour_pairs(bidx, an.mx, an.my, 2 * CLEAN_ZONE * a, H, W)
    i, j = torch.cat([i0, j0]), torch.cat([j0, i0])
    dx = an.mx[i] - an.mx[j]
    dy = an.my[i] - an.my[j]
    rlim = CLEAN_ZONE * (_g(a, i) + _g(a, j))
    fi, fj = an.fdflux[i], an.fdflux[j]
    # i eats j when i is brighter (ties: the later object in SExtractor's order, here the larger index)
    brighter = (fi > fj) | ((fi == fj) & (i > j))
    keep = (dx * dx + dy * dy <= rlim * rlim) & brighter
    i, j, dx, dy = _g(i, keep), _g(j, keep), _g(dx, keep), _g(dy, keep)
    unit = math.pi * a * an.b
    amp = an.fdflux / (2 * unit * an.abcor)
    alpha = (torch.pow((amp / thresh_obj).clamp_min(0), 1.0 / clean_param) - 1) * unit / an.fdnpix
    val = 1 + _g(alpha, i) * (an.cxx[i] * dx * dx + an.cyy[i] * dy * dy + an.cxy[i] * dx * dy)
    model = torch.where(val < 1e10, _g(amp, i) * torch.pow(val.clamp_min(1e-300), -clean_param), torch.zeros_like(val))
    eats = (val > 1.0) & (model.float() > _g(mthresh, j).float())
    return _g(i, eats), _g(j, eats), _g(model, eats)


def _clean(bidx, an: Analysis, thresh_obj, mthresh, clean_param, H, W, arrival=None):
    """Return (survives (n,) bool, master (n,) index of the object that removed each one, or itself).

    ``arrival`` (n,) int64, the order in which SExtractor hands the objects to ``clean.c`` (None: the
    remover is the surviving one whose profile is highest at the removed object's centre): a removed
    object's remover is then SExtractor's, the first surviving one already in its CLEAN list when the
    object arrives (``clean.c`` scans that list in order and stops at the first that removes the
    newcomer), else the first later arrival that removes it."""
    n = bidx.numel()
    device = bidx.device
    ar = torch.arange(n, device=device)
    if n < 2:
        return torch.ones(n, dtype=torch.bool, device=device), ar
    i, j, model = _eating_pairs(bidx, an, thresh_obj, mthresh, clean_param, H, W)
    alive = torch.ones(n, dtype=torch.bool, device=device)
    # fixed point of "removed iff eaten by a surviving brighter object" (a DAG by brightness)
    for _ in range(64):
        eaten = torch.zeros(n, dtype=torch.bool, device=device)
        eaten[j[_g(alive, i)]] = True
        new_alive = ~eaten
        if torch.equal(new_alive, alive):
            break
        alive = new_alive
    master = ar.clone()
    live = _g(alive, i)
    if bool(live.any()):
        if arrival is None:  # the surviving eater with the largest model value at the victim's centre
            mm = _segment_max(_g(model, live), _g(j, live), n)
            win = live & (model == _g(mm, j))
            master.scatter_reduce_(0, _g(j, win), _g(i, win), reduce="amin", include_self=False)
        else:  # the first earlier surviving eater, else the first later one
            ai, aj = _g(arrival, i), _g(arrival, j)
            key = torch.where(ai < aj, ai, ai + n)
            best = torch.full((n,), 2 * n, dtype=torch.int64, device=device)
            best.scatter_reduce_(0, _g(j, live), _g(key, live), reduce="amin", include_self=True)
            win = live & (key == _g(best, j))
            master.scatter_reduce_(0, _g(j, win), _g(i, win), reduce="amin", include_self=False)
    return alive, master


def _follow_masters(master: Tensor) -> Tensor:
    """Follow chains of removers to a survivor (pointer jumping, at most 64 rounds)."""
    for _ in range(64):
        nxt = _g(master, master)
        if torch.equal(nxt, master):
            break
        master = nxt
    return master
