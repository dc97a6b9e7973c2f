"""Step 4, deblending exactly as SExtractor's ``deblend.c``, vectorised over objects and pixels.

``deblend_nthresh`` sub-thresholds ``t_k = t0 (peak/t0)^(k/N)`` lie between the detection threshold
``t0`` and the object's filtered peak; at each level the object's pixels above ``t_k`` split into
8-connected branches of at least ``min(minarea, 3)`` pixels (SExtractor's ``MAXDEBAREA``); walking the
tree from the top, a node splits when more than one of its children holds
``sum(f - t_k) > deblend_cont * sum(f)`` of the object. Only objects with at least two local maxima
can split; for those the components of every level come from one union-find fed from the top level
down (a level's components grow from those of the level above and the pixels entering it: the cost
is the pixels', edges' and components', not that of the ``(pixel, level)`` nodes, 6-20x more for
saturated stars and halos), and the tree walk is a loop over the levels (vectorised over every
component of every object). Pixels below the split go to a branch by SExtractor's ``gatherup`` rule:
drawn at random exactly as SExtractor draws (:mod:`.gatherup_random`, when a scan order is given), or
the most probable branch (deterministic).
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ._index import _argsort, _g, _nonzero, _unique_roots
from .analyse import _analyse, _segment_sum
from .gatherup_random import branch_list_key, gather_random

MAXDEBAREA = 3  # SExtractor: minimum area of a deblending branch is min(minarea, MAXDEBAREA)


class DeblendResult(NamedTuple):
    """Objects after deblending (``centre`` and ``gathered`` are None when nothing split)."""

    obj: Tensor  #: (P,) object of each pixel: unsplit objects keep their id, branches come after n_obj
    n: int  #: number of object ids
    blended: Tensor  #: (n,) bool: a deblended branch
    centre: Optional[tuple]  #: (mx, my) (n,) core barycentre of each branch (NaN for the others)
    gathered: Optional[Tensor]  #: (P,) bool: pixel given to its branch by ``gatherup``
    #: (n,) int64 order of the branches of one detection in SExtractor's list (``parcelout``), 0 for others
    list_key: Optional[Tensor] = None


def _find_roots(parent: Tensor, x: Tensor) -> Tensor:
    """The roots of the nodes ``x`` in the forest ``parent`` (gathers only; ``parent`` unchanged).
    Each step follows only the entries not yet at a root (most are after one or two)."""
    r = _g(parent, x)
    pos, cur = None, r
    while True:
        nxt = _g(parent, cur)
        moved = _nonzero(nxt != cur)
        if moved.numel() == 0:
            return r
        pos = moved if pos is None else _g(pos, moved)
        cur = _g(nxt, moved)
        r.index_copy_(0, pos, cur)


def _hook_level(parent: Tensor, u_: Tensor, v_: Tensor) -> bool:
    """Union the edges ``(u_, v_)`` in the pixel forest ``parent`` (in place); whether any hooked."""
    hooked = False
    while u_.numel():  # the edges of higher levels are all closed
        pu, pv = _find_roots(parent, u_), _find_roots(parent, v_)
        parent.index_copy_(0, u_, pu)  # path compression of the queried pixels (roots unchanged)
        parent.index_copy_(0, v_, pv)
        open_ = _nonzero(pu != pv)
        if open_.numel() == 0:
            break
        u_, v_, pu, pv = _g(u_, open_), _g(v_, open_), _g(pu, open_), _g(pv, open_)
        hi = torch.maximum(pu, pv)
        parent.scatter_reduce_(0, hi, torch.minimum(pu, pv), reduce="amin")
        hooked = True
        # the hooked roots may form long chains (a bleed trail's pixels hook one onto the next);
        # chains consist of hooked roots only, so pointer doubling over them alone flattens them
        # (over those not yet pointing at a root: the roots do not move meanwhile)
        while hi.numel():
            gp = _g(parent, _g(parent, hi))
            below = _nonzero(gp != _g(parent, hi))
            hi = _g(hi, below)
            parent.index_copy_(0, hi, _g(gp, below))
    return hooked


def _count_at_or_above(levels: Tensor, nl: int) -> list:
    """``out[k]`` = how many entries of ``levels`` are >= k, for k = 0..nl+1."""
    return torch.flip(torch.cumsum(torch.flip(torch.bincount(levels, minlength=nl + 2), [0]), 0), [0]).tolist()


def _level_roots(L: Tensor, off: Tensor, n_nodes: int, eu: Tensor, ev: Tensor, c: Tensor) -> Tensor:
    """Connected components of every deblending level at once: per node (pixel ``p``, level ``k`` for
    ``k = 1..L[p]``, node id ``off[p] + k - 1``) the smallest node id of its level-``k`` component.

    The levels are nested (a level-``k`` component is a union of level-``k+1`` ones), so one union-find
    over the pixels, fed from the highest level down with the edges ``(eu, ev)`` whose lower end first
    reaches each level (``c`` = the level count both ends reach), hooks every edge once: the cost is
    the pixels' and edges', not the nodes' (pixels x levels, ~20x more for a saturated star).  Gives
    :func:`~.labels.connected_components` on the node graph exactly (roots are the smallest pixel of
    the component, whose node at level ``k`` is the smallest node)."""
    dev = L.device
    root = torch.empty(n_nodes, dtype=torch.int64, device=dev)
    if n_nodes == 0:
        return root
    nl = int(L.max())
    small = torch.int16 if nl < 32767 else torch.int64  # numpy sorts 16-bit keys by radix sort
    porder = _argsort(L.to(small), descending=True)  # pixels above level k: a prefix
    n_ge = _count_at_or_above(L, nl)
    eorder = _argsort(c.to(small), descending=True)
    eu, ev = _g(eu, eorder), _g(ev, eorder)
    e_ge = _count_at_or_above(c, nl)
    parent = torch.arange(L.numel(), device=dev)
    off_p = _g(off, porder)  # node offsets of the pixels in level order (prefix slices below)
    for k in range(nl, 0, -1):
        act = porder[: n_ge[k]]
        # edges joining at this level
        if _hook_level(parent, eu[e_ge[k + 1]: e_ge[k]], ev[e_ge[k + 1]: e_ge[k]]):
            top = _find_roots(parent, act)
            parent.index_copy_(0, act, top)  # compressed: only pixels above this level ever moved
        else:
            top = _g(parent, act)  # already compressed at the level above
        root.index_copy_(0, off_p[: n_ge[k]] + (k - 1), _g(off, top) + (k - 1))
    return root


# ----------------------------------------------------------------------------------------------
# the steps of _deblend
# ----------------------------------------------------------------------------------------------
class _Candidates(NamedTuple):
    """The pixels of the objects that may split, and the levels each exceeds."""

    pidx: Tensor  #: global pixel ids
    loc: Tensor  #: (P,) candidate-local id of every pixel (-1 for the others)
    po: Tensor  #: object of each candidate pixel
    pf: Tensor  #: filtered value
    L: Tensor  #: number of sub-levels it exceeds (0..nthresh-1)
    tk_obj: Tensor  #: (n_obj, nthresh-1) sub-thresholds of every object


def _sub_thresholds(t0_obj: Tensor, peak_obj: Tensor, nthresh: int) -> Tensor:
    """(n_obj, nthresh-1) ``t_k = t0 (peak/t0)^(k/N)``, rounded to float as SExtractor stores them."""
    ks = torch.arange(1, nthresh, device=t0_obj.device, dtype=torch.float64)
    tk = t0_obj[:, None] * torch.pow((peak_obj / t0_obj).clamp_min(1.0)[:, None], ks[None, :] / nthresh)
    tk = torch.where((peak_obj > 0)[:, None], tk, t0_obj[:, None].expand_as(tk))
    return tk.float().double()  # SExtractor stores the sub-thresholds as float (PIXTYPE)


def _candidate_pixels(obj, f, cand_pix, t0_obj, peak_obj, nthresh) -> _Candidates:
    """Number of sub-levels each candidate pixel exceeds: the closed form, then corrected against the
    exact (float-rounded) thresholds, so that memory stays O(pixels), not O(pixels x levels)."""
    device = obj.device
    pidx = cand_pix.nonzero().squeeze(1)
    npc = pidx.numel()
    loc = torch.full((obj.numel(),), -1, dtype=torch.int64, device=device)
    loc[pidx] = torch.arange(npc, device=device)
    po, pf = _g(obj, pidx), _g(f, pidx)
    tk_obj = _sub_thresholds(t0_obj, peak_obj, nthresh)
    nl = nthresh - 1
    lr = torch.log((peak_obj / t0_obj).clamp_min(1.0 + 1e-12))
    q = nthresh * torch.log((pf / _g(t0_obj, po)).clamp_min(1e-300)) / _g(lr, po)
    L = (torch.ceil(q) - 1).clamp(0, nl).long()
    tflat = tk_obj.reshape(-1)
    base = po * nl
    up = (L < nl) & (pf > tflat[base + L.clamp(max=nl - 1)])
    L = L + up.long()
    down = (L >= 1) & ~(pf > tflat[base + (L - 1).clamp(min=0)])
    L = L - down.long()
    return _Candidates(pidx, loc, po, pf, L, tk_obj)


class _LevelTree(NamedTuple):
    """The components of every level (the pixels of an object above one sub-threshold, 8-connected)
    and their place in the tree, ordered by (smallest pixel, level) as the node-graph labelling numbers
    them (:func:`_level_roots`)."""

    leaf: Tensor  #: (npc,) component at each candidate pixel's highest level (-1 below level 1)
    comp_lev: Tensor  #: level of each component (1..nthresh-1)
    comp_obj: Tensor  #: object of each component
    comp_t: Tensor  #: its sub-threshold
    valid: Tensor  #: at least min(minarea, MAXDEBAREA) pixels
    sig: Tensor  #: valid and holding more than deblend_cont of the object's flux above its threshold
    par: Tensor  #: parent component (n_comp + object id at level 1)


class _Levels(NamedTuple):
    """The components of every level as :func:`_grow_levels` finds them, from the top level down."""

    root: Tensor  #: smallest candidate pixel of each component
    lev: Tensor  #: its level
    area: Tensor  #: its pixel count
    flux: Tensor  #: sum of its pixels' filtered values, added child by child (not in pixel order)
    par: Tensor  #: the component one level below that holds it (-1 at level 1)
    leaf: Tensor  #: (npc,) component at each pixel's highest level (-1 below level 1)


def _grow_levels(L: Tensor, pf: Tensor, eu: Tensor, ev: Tensor, c: Tensor) -> _Levels:
    """The components of every level from one union-find fed from the highest level down, the edges
    ``(eu, ev)`` hooked at the level ``c`` both ends first reach (as :func:`_level_roots`).

    A level's components are the roots reached from the components of the level above and from the
    pixels entering at that level (``L == k``); their areas and fluxes add up from those. The cost is
    the pixels', edges' and components', never the nodes' (pixels x levels, ~6-20x more)."""
    dev, nl = L.device, int(L.max())
    i64 = dict(dtype=torch.int64, device=dev)
    small = torch.int16 if nl < 32767 else torch.int64  # numpy sorts 16-bit keys by radix sort
    porder = _argsort(L.to(small), descending=True)  # the pixels entering at level k: a slice
    n_ge = _count_at_or_above(L, nl)
    eorder = _argsort(c.to(small), descending=True)
    eu, ev = _g(eu, eorder), _g(ev, eorder)
    e_ge = _count_at_or_above(c, nl)
    parent = torch.arange(L.numel(), device=dev)
    slot = torch.empty_like(parent)  # scratch: the component of each root of the current level
    roots, area, flux = torch.empty(0, **i64), torch.empty(0, **i64), torch.empty(0, dtype=pf.dtype, device=dev)
    leaf = torch.full_like(parent, -1)
    out, base = [], 0
    for k in range(nl, 0, -1):
        _hook_level(parent, eu[e_ge[k + 1]: e_ge[k]], ev[e_ge[k + 1]: e_ge[k]])
        new = porder[n_ge[k + 1]: n_ge[k]]
        x = torch.cat([roots, new])
        rx = _find_roots(parent, x)
        parent.index_copy_(0, x, rx)  # roots and new pixels point at their root: short paths
        roots = x[rx == x]
        nk, n_old = roots.numel(), x.numel() - new.numel()
        slot.index_copy_(0, roots, torch.arange(nk, **i64))
        cid = _g(slot, rx)
        if out:
            out[-1][4] = cid[:n_old] + base  # the parents of the level above
        leaf.index_copy_(0, new, cid[n_old:] + base)
        area = torch.zeros(nk, **i64).index_add_(0, cid, torch.cat([area, torch.ones_like(new)]))
        flux = torch.zeros(nk, dtype=pf.dtype, device=dev).index_add_(0, cid, torch.cat([flux, _g(pf, new)]))
        out.append([roots, torch.full_like(roots, k), area, flux, torch.full_like(roots, -1)])
        base += nk
    return _Levels(*(torch.cat([o[i] for o in out]) for i in range(5)), leaf)


def _node_fluxes(cd: _Candidates, eu: Tensor, ev: Tensor, c: Tensor) -> Tensor:
    """The components' fluxes summed node by node in node order (pixel-major), by labelling every
    (pixel, level) node (:func:`_level_roots`): the reference summation order, O(nodes)."""
    L = cd.L
    off = torch.cumsum(L, 0) - L
    n_nodes = int(L.sum())
    node_pix = torch.repeat_interleave(torch.arange(L.numel(), device=L.device), L)
    comp_ids, node_comp = _unique_roots(_level_roots(L, off, n_nodes, eu, ev, c))
    return _segment_sum(_g(cd.pf, node_pix), node_comp, comp_ids.numel())


def _significant(flux: Tensor, area: Tensor, comp_t: Tensor, need: Tensor, valid: Tensor, exact_flux,
                 positive: bool) -> Tensor:
    """``valid & (flux - t area > need)`` with ``flux`` summed in pixel order (``exact_flux()``, costly).

    ``flux`` summed in another order differs from it by at most ``2 (n - 1) u`` of the sum (``n``
    ``positive`` terms, ``u = 2^-53``); the decision is taken from ``flux -+ n 2^-50 flux`` (a monotone
    expression) when both ends agree, else from the pixel-order sum: the same decision either way."""
    a = area.to(flux.dtype)
    if not positive:
        return valid & (exact_flux() - comp_t * a > need)
    tol = a * 2.0 ** -50 * flux
    lo = valid & (flux - tol - comp_t * a > need)
    hi = valid & (flux + tol - comp_t * a > need)
    if torch.equal(lo, hi):
        return hi
    return valid & (exact_flux() - comp_t * a > need)


def _level_edges(cd: _Candidates, u: Tensor, v: Tensor, n_pix: int):
    """The pixel edges ``(u, v)`` whose ends both reach sub-level 1, in candidate-local ids, and ``c``
    the number of sub-levels both ends reach (a small integer type), in edge order. Edges join pixels
    of one object, so those of objects that may not split drop out with their level 0; the levels are
    gathered from a frame-pixel table of the smallest integer type (less memory traffic per edge)."""
    nl = int(cd.L.max()) if cd.L.numel() else 0
    small = torch.int8 if nl < 127 else (torch.int16 if nl < 32767 else torch.int64)
    lev = torch.zeros(n_pix, dtype=small, device=cd.L.device).index_copy_(0, cd.pidx, cd.L.to(small))
    c = torch.minimum(_g(lev, u), _g(lev, v))
    keep = _nonzero(c > 0)
    return _g(cd.loc, _g(u, keep)), _g(cd.loc, _g(v, keep)), _g(c, keep)


def _level_tree(cd: _Candidates, u, v, cand_pix, fdflux_obj, *, mincont, minarea) -> _LevelTree:
    """Label every level (:func:`_grow_levels`) and describe its components."""
    L = cd.L
    eu, ev, c = _level_edges(cd, u, v, cand_pix.numel())
    if not bool((L > 0).any()):
        e = torch.empty(0, dtype=torch.int64, device=L.device)
        return _LevelTree(torch.full_like(L, -1), e, e, cd.pf[:0], e.bool(), e.bool(), e)
    lv = _grow_levels(L, cd.pf, eu, ev, c)
    order = _argsort(lv.root * (int(L.max()) + 1) + lv.lev)  # by (smallest pixel, level)
    n_comp = order.numel()
    rank = torch.empty_like(order).index_copy_(0, order, torch.arange(n_comp, device=L.device))
    comp_lev, comp_pix = _g(lv.lev, order), _g(lv.root, order)
    comp_obj = _g(cd.po, comp_pix)
    comp_t = cd.tk_obj[comp_obj, comp_lev - 1]
    area = _g(lv.area, order)
    # SExtractor's deblending lutz keeps branches of at least min(minarea, MAXDEBAREA = 3) pixels
    valid = area >= min(minarea, MAXDEBAREA)
    sig = _significant(_g(lv.flux, order), area, comp_t, _g(fdflux_obj * mincont, comp_obj), valid,
                       lambda: _node_fluxes(cd, eu, ev, c), bool((cd.pf > 0).all()))
    # parent of a level-k component: the component holding its pixels at level k-1 (k >= 2), the
    # object itself at k = 1 (parents are indexed n_comp + object id)
    par = _g(lv.par, order)
    par = torch.where(par >= 0, _g(rank, par.clamp_min(0)), n_comp + comp_obj)
    leaf = torch.where(lv.leaf >= 0, _g(rank, lv.leaf.clamp_min(0)), -1)
    return _LevelTree(leaf, comp_lev, comp_obj, comp_t, valid, sig, par)


def _walk_tree(tree: _LevelTree, n_obj: int, nthresh: int):
    """SExtractor's walk from the top level down: ``(selected (n_comp,), ok (n_comp + n_obj,))``, the
    branches kept and whether each node (components, then objects) stays whole."""
    device = tree.par.device
    n_comp = tree.comp_lev.numel()
    ok = torch.ones(n_comp + n_obj, dtype=torch.bool, device=device)
    selected = torch.zeros(n_comp, dtype=torch.bool, device=device)
    for k in range(nthresh - 1, 0, -1):  # children at level k, parents at level k-1
        ch = ((tree.comp_lev == k) & tree.valid).nonzero().squeeze(1)
        if ch.numel() == 0:
            continue
        pa = _g(tree.par, ch)
        m = torch.zeros(n_comp + n_obj, dtype=torch.int64, device=device).index_add_(0, pa, _g(tree.sig, ch).long())
        allok = torch.ones(n_comp + n_obj, dtype=torch.int64, device=device).scatter_reduce_(
            0, pa, _g(ok, ch).long(), reduce="amin"
        )
        ok &= allok.bool()
        split = m > 1
        selected[ch] |= _g(ok, ch) & _g(tree.sig, ch) & _g(split, pa)
        ok &= ~split
    return selected, ok


def _branch_amplitudes(an, t_det: Tensor) -> Tensor:
    """``gatherup`` amplitude of each branch: ``t0 exp(npix / (2 pi abcor a b))``, at most 4 x its peak."""
    ab2 = 2 * math.pi * an.abcor * an.a * an.b
    dist = an.fdnpix / ab2
    amp = torch.where(dist < 70.0, t_det * torch.exp(dist.clamp(max=70.0)), 4.0 * an.fdpeak)
    return torch.minimum(amp, 4.0 * an.fdpeak)


def _free_pixel_rows(fp: Tensor, po: Tensor, son_obj: Tensor, n_obj: int):
    """The free pixels ordered by the number of branches of their object, most first (stable), so
    that the pixels with more than ``j`` branches are a prefix: ``(rows, base, n_gt, order)`` with
    ``rows`` the order (into ``fp``), ``base`` the place of each one's first branch in ``order`` (the
    branches grouped by object, ascending ids) and ``n_gt[j]`` the number with more than ``j``."""
    order = _argsort(son_obj)
    cnt = torch.bincount(son_obj, minlength=n_obj)
    start = torch.cumsum(cnt, 0) - cnt
    fobj = _g(po, fp)
    k = _g(cnt, fobj)
    rows = _argsort(k, descending=True)
    n_gt = _count_at_or_above(k, int(k.max()))[1:]
    return rows, _g(start, _g(fobj, rows)), n_gt[:-1], order


def _gather_free(fp, po, son_obj, n_obj, gx, gy, an, amp) -> Tensor:
    """SExtractor's ``gatherup`` for the free pixels ``fp`` of split objects: the branch of largest
    probability ``amp exp(-d)`` (``d`` the ellipse distance / abcor); the closest branch in that metric
    when every probability vanishes; the highest branch id among equals. Branch ``j`` of every pixel's
    object is one dense column over the pixels that have it (a prefix, :func:`_free_pixel_rows`), its
    running maximum, sum and minimum taken branch after branch (the order of a per-pixel loop)."""
    rows, base, n_gt, order = _free_pixel_rows(fp, po, son_obj, n_obj)
    px, py = _g(gx, _g(fp, rows)), _g(gy, _g(fp, rows))
    npp = fp.numel()
    pmax = torch.full((npp,), -math.inf, dtype=px.dtype, device=px.device)
    psum, dmin = torch.zeros_like(pmax), torch.full_like(pmax, math.inf)
    cols = []
    for j, n in enumerate(n_gt):
        son = _g(order, base[:n] + j)
        dx = px[:n] - _g(an.mx, son)
        dy = py[:n] - _g(an.my, son)
        d = 0.5 * (_g(an.cxx, son) * dx * dx + _g(an.cyy, son) * dy * dy + _g(an.cxy, son) * dx * dy)
        d = d / _g(an.abcor, son)
        prob = torch.where(d < 70.0, _g(amp, son) * torch.exp(-d.clamp(max=70.0)), torch.zeros_like(d))
        torch.maximum(pmax[:n], prob, out=pmax[:n])
        psum[:n] += prob
        torch.minimum(dmin[:n], d, out=dmin[:n])
        cols.append((son, prob, d))
    use_p = psum > 1e-31
    best = torch.full((npp,), -1, dtype=torch.int64, device=px.device)
    for (son, prob, d), n in zip(cols, n_gt):
        win = torch.where(use_p[:n], prob == pmax[:n], d == dmin[:n])
        best[:n] = torch.where(win, son, best[:n])  # a later (higher) branch wins a tie
    return torch.empty_like(best).index_copy_(0, rows, best)


def _unsplit(obj: Tensor, n_obj: int) -> DeblendResult:
    return DeblendResult(obj, n_obj, torch.zeros(n_obj, dtype=torch.bool, device=obj.device), None, None)


def _core_pixels(tree: _LevelTree, sel: Tensor):
    """The pixels of the selected components ``sel`` (disjoint: no selected component holds another)
    and the index in ``sel`` of each: ``(core_pix, core_son)``, by pixel. A pixel belongs to the
    selected component among the ancestors of its highest-level component, found level by level."""
    device = sel.device
    n_comp = tree.comp_lev.numel()
    anc = torch.full((n_comp,), -1, dtype=torch.int64, device=device)
    anc[sel] = torch.arange(sel.numel(), device=device)
    by_lev = _argsort(tree.comp_lev)
    ends = torch.cumsum(torch.bincount(tree.comp_lev), 0).tolist()
    for k in range(2, len(ends)):
        cs = by_lev[ends[k - 1]: ends[k]]
        a = _g(anc, cs)
        anc[cs] = torch.where(a >= 0, a, _g(anc, _g(tree.par, cs)))
    son = torch.where(tree.leaf >= 0, _g(anc, tree.leaf.clamp_min(0)), -1)
    core_pix = (son >= 0).nonzero().squeeze(1)
    return core_pix, _g(son, core_pix)


def _split_objects(obj, n_obj, cd: _Candidates, tree: _LevelTree, sel, split_obj, x, y, val, t0_obj,
                   scan=None) -> DeblendResult:
    """Give every pixel of a split object to a branch: its core pixels (nodes of the selected
    component) directly, the others by :func:`_gather_free`."""
    device = obj.device
    npc, n_sel = cd.pidx.numel(), sel.numel()
    core_pix, core_son = _core_pixels(tree, sel)  # candidate-local pixel ids, branch
    son_obj = _g(tree.comp_obj, sel)
    gx, gy, gval = _g(x, cd.pidx), _g(y, cd.pidx), _g(val, cd.pidx)
    an = _analyse(core_son, n_sel, _g(gx, core_pix), _g(gy, core_pix), _g(cd.pf, core_pix), _g(gval, core_pix),
                  _g(tree.comp_t, sel))
    # gatherup amplitudes (thresholds reset to the detection threshold first)
    amp = _branch_amplitudes(an, _g(t0_obj, son_obj))
    son_key = _g(branch_list_key(tree.comp_lev, tree.comp_obj, tree.par, tree.leaf, gx, gy), sel)
    assign = torch.full((npc,), -1, dtype=torch.int64, device=device)
    assign[core_pix] = core_son
    fp = ((assign < 0) & _g(split_obj, cd.po)).nonzero().squeeze(1)
    if fp.numel():
        assign[fp] = _gather_free(fp, cd.po, son_obj, n_obj, gx, gy, an, amp) if scan is None \
            else gather_random(fp, cd, son_key, son_obj, n_obj, gx, gy, an, amp, scan)
    new_obj = obj.clone()
    moved = _g(split_obj, cd.po)
    new_obj[_g(cd.pidx, moved)] = n_obj + _g(assign, moved)
    blended = torch.cat([torch.zeros(n_obj, dtype=torch.bool, device=device),
                         torch.ones(n_sel, dtype=torch.bool, device=device)])
    nan = torch.full((n_obj,), math.nan, dtype=torch.float64, device=device)
    gathered = torch.zeros(obj.numel(), dtype=torch.bool, device=device)
    gathered[_g(cd.pidx, fp)] = True
    list_key = torch.cat([torch.zeros(n_obj, dtype=torch.int64, device=device), son_key])
    return DeblendResult(new_obj, n_obj + n_sel, blended, (torch.cat([nan, an.mx]), torch.cat([nan, an.my])), gathered,
                         list_key)


def _deblend(obj, n_obj, u, v, x, y, f, val, t0_obj, peak_obj, fdflux_obj, *, nthresh, mincont, minarea,
             candidates, scan=None) -> DeblendResult:
    """Deblend the ``candidates`` (n_obj,) bool objects: see the module docstring.

    ``obj`` (P,) object of each pixel; ``u, v`` 8-neighbour pixel edges; ``x, y`` float64 coordinates,
    ``f``/``val`` filtered/unfiltered values; per object the threshold ``t0_obj``, filtered peak and
    flux. Output objects keep the ids of unsplit objects; split objects are replaced by their
    branches, appended after ``n_obj`` (the caller renumbers).
    """
    cand_pix = _g(candidates, obj)
    if nthresh < 2 or mincont >= 1.0 or not bool(cand_pix.any()):
        return _unsplit(obj, n_obj)
    cd = _candidate_pixels(obj, f, cand_pix, t0_obj, peak_obj, nthresh)
    tree = _level_tree(cd, u, v, cand_pix, fdflux_obj, mincont=mincont, minarea=minarea)
    selected, ok = _walk_tree(tree, n_obj, nthresh)
    split_obj = ~ok[tree.comp_lev.numel():] & candidates
    if not bool(split_obj.any()):
        return _unsplit(obj, n_obj)
    sel = (selected & _g(split_obj, tree.comp_obj)).nonzero().squeeze(1)
    return _split_objects(obj, n_obj, cd, tree, sel, split_obj, x, y, val, t0_obj, scan)
