"""SExtractor's random ``gatherup``: the pixels of a split detection below its branches go to a branch
drawn at random, with glibc's ``rand()`` in the order SExtractor draws.

``refine.c: gatherup`` walks the detection's pixel list; every pixel in no branch gets, per branch
``i`` (in the order the deblender lists them), ``q_i = amp_i exp(-d_i)`` (``d_i`` the ellipse distance
over ``abcor``, ``q_i = 0`` when ``d_i >= 70``) and their running sum ``p_i``; when ``p_last > 1e-31`` it
draws ``u = p_last * rand() / RAND_MAX`` (float arithmetic, ``RAND_MAX`` rounding to 2^31) and takes the
first branch with ``p_i >= u`` (the closest branch otherwise). ``rand()`` is never seeded: its stream
is glibc's ``srand(1)`` one, and it is consumed by nothing else on a frame with a valid WCS centre
(``fitswcs.c`` only draws while looking for a WCS centre that does not map). Detections are deblended
as the scan completes them (``scan.c: sortit``), so the draws follow, per image, the detections'
completion order, then each detection's pixel list (``lutz``) order. The branches are listed (``
parcelout``) from the deepest level up, and within a level in the order of their parents there, then
the order the level's ``lutz`` scan completes them.

We compute the probabilities in float64 (SExtractor: float): they differ by ~1e-7 relative, which
moves a pixel only when its draw falls that close to a boundary between branches.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from ._index import _argsort, _g

__all__ = ["ScanOrder", "glibc_rand", "sextractor_gather", "branch_list_key"]

_LAG_LONG, _LAG_SHORT, _DISCARD = 31, 3, 310
_BLOCK = 4096
RAND_MAX_FLOAT = np.float32(2147483647)  # rounds to 2^31 as SExtractor's float expression does


class ScanOrder(NamedTuple):
    """Per detected pixel: its image in the batch and the order SExtractor's gatherup would reach it
    (completion of its detection, then place in the detection's pixel list), as one int64 key."""

    batch: Tensor
    key: Tensor


@lru_cache(maxsize=1)
def _block_matrix() -> np.ndarray:
    """(BLOCK, 31) uint64 matrix taking 31 consecutive states of the additive generator
    ``r[i] = r[i-3] + r[i-31] (mod 2^32)`` to the next BLOCK states."""
    rows = [np.eye(_LAG_LONG, dtype=np.uint64)[j] for j in range(_LAG_LONG)]
    for j in range(_BLOCK):
        rows.append((rows[-_LAG_SHORT] + rows[-_LAG_LONG]) & np.uint64(0xFFFFFFFF))
    return np.stack(rows[_LAG_LONG:])


def _glibc_initial_state(seed: int = 1) -> np.ndarray:
    """glibc ``srandom_r`` (TYPE_3): 31 words from Park-Miller, then 310 values discarded; returns the
    31 states preceding the first output."""
    r = [seed]
    for _ in range(1, _LAG_LONG):
        r.append((16807 * r[-1]) % 2147483647)
    r += [r[i] for i in range(_LAG_SHORT)]  # r[31..33] = r[0..2]
    for _ in range(_DISCARD):
        r.append((r[-_LAG_SHORT] + r[-_LAG_LONG]) & 0xFFFFFFFF)
    return np.array(r[-_LAG_LONG:], dtype=np.uint64)


_STREAM = np.empty(0, dtype=np.int64)


def glibc_rand(n: int) -> np.ndarray:
    """The first ``n`` values of glibc's ``rand()`` after ``srand(1)`` (the unseeded stream), int64.

    The additive-feedback generator is linear in its last 31 states, so each block of 4096 values is
    one (4096, 31) matrix product mod 2^32 (uint64 arithmetic wraps mod 2^64, a multiple of 2^32)."""
    global _STREAM
    if n < 0:
        raise ValueError(f"glibc_rand: n must be >= 0, got {n}")
    if _STREAM.size < n:
        A = _block_matrix()
        state = _glibc_initial_state() if _STREAM.size == 0 else _STATE[0]
        out = [_STREAM]
        done = _STREAM.size
        while done < n:
            nxt = (A @ state) & np.uint64(0xFFFFFFFF)
            out.append((nxt >> np.uint64(1)).astype(np.int64))
            state = nxt[-_LAG_LONG:]
            done += _BLOCK
        _STATE[0] = state
        _STREAM = np.concatenate(out)
    return _STREAM[:n]


_STATE = [None]


def branch_list_key(comp_lev: Tensor, comp_obj: Tensor, par: Tensor, leaf: Tensor, gx: Tensor,
                    gy: Tensor) -> Tensor:
    """Per component, a key that orders the branches of one detection as ``parcelout`` lists them:
    deepest level first, then within a level by parent's rank there, then by the completion of the
    level's ``lutz`` scan (last row, then last column on it). ``par`` indexes components, ``n_comp +
    object`` at level 1; ``leaf`` the highest-level component of each candidate pixel (-1 none);
    ``gx, gy`` the candidate pixels' coordinates."""
    device = comp_lev.device
    n_comp = comp_lev.numel()
    if n_comp == 0:
        return comp_lev.clone()
    W = int(gx.max()) + 2
    pk = gy.long() * W + gx.long()
    ck = torch.full((n_comp,), -1, dtype=torch.int64, device=device)
    has = leaf >= 0
    ck.scatter_reduce_(0, _g(leaf, has), _g(pk, has), reduce="amax", include_self=True)
    nlev = int(comp_lev.max())
    by_lev = [(comp_lev == k).nonzero().squeeze(1) for k in range(nlev + 1)]
    for k in range(nlev, 1, -1):  # a component ends where the last of its descendants ends
        cs = by_lev[k]
        ck.scatter_reduce_(0, _g(par, cs), _g(ck, cs), reduce="amax", include_self=True)
    rank = torch.zeros(n_comp, dtype=torch.int64, device=device)
    span = int(ck.max()) + 1
    for k in range(1, nlev + 1):
        cs = by_lev[k]
        pkey = _g(comp_obj, cs) if k == 1 else _g(rank, _g(par, cs))
        rank[_g(cs, _argsort(pkey * span + _g(ck, cs)))] = torch.arange(cs.numel(), device=device)
    return (nlev - comp_lev) * (n_comp + 1) + rank


def _son_pairs(fpo: Tensor, son_obj: Tensor, son_key: Tensor, n_obj: int):
    """Every (free pixel, branch of its object) pair, the branches of each pixel contiguous and in
    list order: ``(pair_row, pair_son, first, count)`` (``first``/``count`` per pixel)."""
    device = fpo.device
    order = _argsort(son_obj * (int(son_key.max()) + 1) + son_key)
    cnt = torch.bincount(_g(son_obj, order), minlength=n_obj)
    start = torch.cumsum(cnt, 0) - cnt
    rep = _g(cnt, fpo)
    first = torch.cumsum(rep, 0) - rep
    pair_row = torch.repeat_interleave(torch.arange(fpo.numel(), device=device), rep)
    j = torch.arange(pair_row.numel(), device=device) - _g(first, pair_row)
    return pair_row, _g(order, _g(_g(start, fpo), pair_row) + j), first, rep


def _draws(batch: Tensor, key: Tensor, p_last: Tensor) -> Tensor:
    """SExtractor's ``drand`` for the pixels that draw (``p_last > 1e-31``) in (batch, key) order,
    each image's draws from the start of the glibc stream (one SExtractor run per image)."""
    draw = p_last > 1e-31
    idx = draw.nonzero().squeeze(1)
    u = torch.zeros_like(p_last)
    if idx.numel() == 0:
        return u
    b = _g(batch, idx)
    k = _g(key, idx)
    order = _argsort(b * (int(k.max()) + 1) + k)
    bs = _g(b, order)
    cnt = torch.bincount(bs)
    rank = torch.arange(idx.numel(), device=idx.device) - _g(torch.cumsum(cnt, 0) - cnt, bs)
    r = torch.from_numpy(glibc_rand(int(cnt.max())).astype(np.float32)).to(idx.device)
    pf = _g(p_last, idx).float()
    drand = (_g(pf, order) * _g(r, rank)) / torch.tensor(RAND_MAX_FLOAT, device=idx.device)
    u[_g(idx, order)] = drand.to(u.dtype)
    return u


def _probabilities(x: Tensor, y: Tensor, son: Tensor, an, amp: Tensor):
    """Per (pixel, branch) pair SExtractor's ``dist`` and ``amp exp(-dist)`` (0 from dist >= 70), in
    float with its operation order (the branch moments stored as float, ``mx, my`` as double)."""
    f32 = torch.float32
    dx = (x - _g(an.mx, son)).to(f32)
    dy = (y - _g(an.my, son)).to(f32)
    cxx, cyy, cxy = (_g(t, son).to(f32) for t in (an.cxx, an.cyy, an.cxy))
    e = (cxx * dx * dx + cyy * dy * dy) + cxy * dx * dy
    d = ((0.5 * e.double()) / _g(an.abcor, son).to(f32).double()).to(f32)
    q = torch.where(d < 70.0, _g(amp, son).to(f32) * torch.exp(-d.clamp(max=70.0)), torch.zeros_like(d))
    return d, q


def _running_sums(q: Tensor, j: Tensor) -> Tensor:
    """Per pair, the float running sum ``p`` of ``q`` over the pairs of its row up to its column ``j``
    (the pairs of a row contiguous, by column), added one column at a time as SExtractor's loop does
    (float rounding at each step)."""
    p = q.clone()
    if q.numel() == 0:
        return p
    by_col = _argsort(j)
    ends = torch.cumsum(torch.bincount(j), 0).tolist()
    for c in range(1, len(ends)):
        idx = by_col[ends[c - 1]: ends[c]]
        p[idx] = _g(p, idx - 1) + _g(q, idx)
    return p


def sextractor_gather(fpo: Tensor, order: ScanOrder, son_obj: Tensor, son_key: Tensor, n_obj: int,
                      gx: Tensor, gy: Tensor, an, amp: Tensor) -> Tensor:
    """The branch (index into the branches) SExtractor's ``gatherup`` draws for each free pixel.

    ``fpo`` the object of each free pixel, ``order`` their :class:`ScanOrder`, ``gx, gy`` their
    coordinates; per branch its object ``son_obj``, list key ``son_key`` (:func:`branch_list_key`),
    ``amp`` and the moments ``an`` (``mx, my, cxx, cyy, cxy, abcor``)."""
    npp = fpo.numel()
    pair_row, pair_son, first, cnt = _son_pairs(fpo, son_obj, son_key, n_obj)
    d, q = _probabilities(_g(gx, pair_row), _g(gy, pair_row), pair_son, an, amp)
    j = torch.arange(pair_row.numel(), device=fpo.device) - _g(first, pair_row)
    p = _running_sums(q, j)
    last = first + cnt - 1
    p_last = torch.where(cnt > 0, _g(p, last.clamp_min(0)), torch.zeros(npp, dtype=p.dtype, device=p.device))
    u = _draws(order.batch, order.key, p_last)
    below = torch.zeros(npp, dtype=torch.int64, device=fpo.device).index_add_(0, pair_row, (p < _g(u, pair_row)).long())
    # closest branch (first of the minima in list order): the fallback
    dmin = torch.full((npp,), float("inf"), dtype=d.dtype, device=d.device).scatter_reduce_(0, pair_row, d, "amin")
    jmin = torch.full((npp,), 1 << 40, dtype=torch.int64, device=fpo.device)
    at_min = d == _g(dmin, pair_row)
    jmin.scatter_reduce_(0, _g(pair_row, at_min), _g(j, at_min), "amin")
    pick = torch.where((p_last > 1e-31) & (below < cnt), below, jmin)
    return _g(pair_son, (first + pick).clamp(max=max(pair_son.numel() - 1, 0)))


def gather_random(fp: Tensor, cd, son_key: Tensor, son_obj: Tensor, n_obj: int, gx: Tensor, gy: Tensor, an,
                  amp: Tensor, scan: ScanOrder) -> Tensor:
    """:func:`sextractor_gather` for the free candidate pixels ``fp`` of ``deblend._split_objects``
    (``cd`` its candidates, ``son_key`` / ``son_obj`` the branches' :func:`branch_list_key` and object,
    ``gx, gy`` the candidates' coordinates, ``scan`` the :class:`ScanOrder` of every detected pixel,
    its key the completion of the pixel's detection: the place in the detection's list is added here)."""
    fpo = _g(cd.po, fp)
    # the pixel lists of the detections that draw
    has_free = torch.zeros(n_obj, dtype=torch.bool, device=fp.device)
    has_free[fpo] = True
    mem = _g(has_free, cd.po).nonzero().squeeze(1)
    mx, my = _g(gx, mem).long(), _g(gy, mem).long()
    key = list_order_key(mx, my, _g(cd.po, mem), int(my.max()) + 1, int(mx.max()) + 1)
    rank = torch.full((cd.po.numel(),), -1, dtype=torch.int64, device=fp.device)
    rank[mem] = key
    pid = _g(cd.pidx, fp)
    span = int(rank.max()) + 1
    order = ScanOrder(_g(scan.batch, pid), _g(scan.key, pid) * span + _g(rank, fp))
    return sextractor_gather(fpo, order, son_obj, son_key, n_obj, _g(gx, fp), _g(gy, fp), an, amp)


class _Runs(NamedTuple):
    det: np.ndarray  #: detection of each run
    y: np.ndarray  #: row
    x0: np.ndarray  #: first column
    x1: np.ndarray  #: last column
    of_pixel: np.ndarray  #: run of each input pixel


def _runs(x: np.ndarray, y: np.ndarray, det: np.ndarray) -> _Runs:
    """The runs (horizontal segments) of each detection, ordered by (row, detection, column)."""
    order = np.lexsort((x, det, y))
    xs, ys, ds = x[order], y[order], det[order]
    new = np.ones(xs.size, dtype=bool)
    new[1:] = (ys[1:] != ys[:-1]) | (ds[1:] != ds[:-1]) | (xs[1:] != xs[:-1] + 1)
    run_sorted = np.cumsum(new) - 1
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], xs.size] - 1
    of_pixel = np.empty(x.size, dtype=np.int64)
    of_pixel[order] = run_sorted
    return _Runs(ds[starts], ys[starts], xs[starts], xs[ends], of_pixel)


def _row_links(r: _Runs, prev: np.ndarray, cur: np.ndarray, span: int):
    """The (current run, previous-row run) pairs that touch (8-connected), as index pairs into ``cur``
    and ``prev`` (both slices of runs sorted by detection then column)."""
    pk0 = r.det[prev] * span + r.x0[prev]
    pk1 = r.det[prev] * span + r.x1[prev]
    lo = np.searchsorted(pk1, r.det[cur] * span + r.x0[cur] - 1, side="left")
    hi = np.searchsorted(pk0, r.det[cur] * span + r.x1[cur] + 1, side="right")
    n = np.maximum(hi - lo, 0)
    ci = np.repeat(np.arange(cur.size), n)
    pi = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n) + np.repeat(lo, n)
    return ci, pi


def _components(a: np.ndarray, b: np.ndarray, n: int):
    """Connected components of ``n`` vertices and edges ``(a, b)``: ``(count, label)``, labels
    numbered by smallest vertex (min-label propagation with pointer jumping; the graphs of one row are
    small and shallow)."""
    lab = np.arange(n)
    while a.size:
        m = np.minimum(lab[a], lab[b])
        new = lab.copy()
        np.minimum.at(new, a, m)
        np.minimum.at(new, b, m)
        new = new[new]
        if np.array_equal(new, lab):
            break
        lab = new
    roots, lab = np.unique(lab, return_inverse=True)
    return roots.size, lab


#: groups taller than this (rows) get the one-run-per-row list order (:func:`list_order_key`)
EXACT_LIST_MAX_ROWS = 256


def lutz_list_rank(x: np.ndarray, y: np.ndarray, det: np.ndarray) -> np.ndarray:
    """Per pixel, its place in the pixel list SExtractor's scan (``lutz``) builds for its detection.

    Scanning row ``y``, the partial objects of rows ``<= y`` are rebuilt: each is the concatenation,
    by column, of the lists of the partial objects of rows ``<= y - 1`` it joins (each placed at the
    first column it has on row ``y - 1``, before a pixel of that column) and of its pixels on row ``y``.
    A loop over the rows of the tallest detection, vectorised over the runs of every detection's row."""
    if x.size == 0:
        return np.zeros(0, dtype=np.int64)
    # detections are independent: scan them side by side, each from its first row (fewer, fuller rows)
    _, det = np.unique(det, return_inverse=True)
    ymin = np.full(int(det.max()) + 1, np.iinfo(np.int64).max)
    np.minimum.at(ymin, det, y)
    r = _runs(x, y - ymin[det], det)
    span = int(x.max()) + 3
    nrun = r.y.size
    bounds = np.flatnonzero(np.r_[True, r.y[1:] != r.y[:-1], True])
    # tree: node per (row, partial object); item parents and keys
    node_of_run = np.empty(nrun, dtype=np.int64)
    child_parent, child_key = [], []  # for nodes (old objects): parent node and key
    n_nodes = 0
    prev = np.zeros(0, dtype=np.int64)
    prev_y = None
    for a, b in zip(bounds[:-1], bounds[1:]):
        cur = np.arange(a, b)
        yy = r.y[a]
        if prev_y is not None and prev_y == yy - 1:
            ci, pi = _row_links(r, prev, cur, span)
        else:
            ci = pi = np.zeros(0, dtype=np.int64)
        old_nodes = node_of_run[prev] if prev.size else np.zeros(0, dtype=np.int64)
        uo, inv = np.unique(old_nodes[pi], return_inverse=True)  # old nodes that continue
        ncomp, lab = _components(ci, cur.size + inv, cur.size + uo.size)
        node_of_run[cur] = n_nodes + lab[:cur.size]
        child_parent.append(n_nodes + lab[cur.size:])
        child_key.append((uo, 2 * _node_minx_prev(r, prev, node_of_run, uo)))
        n_nodes += ncomp
        prev, prev_y = cur, yy
    return _list_positions(r, node_of_run, child_parent, child_key, n_nodes, x)


def _node_minx_prev(r: _Runs, prev: np.ndarray, node_of_run: np.ndarray, nodes: np.ndarray) -> np.ndarray:
    """First column, on the previous row, of each of ``nodes`` (nodes of that row)."""
    if nodes.size == 0:
        return np.zeros(0, dtype=np.int64)
    pn = node_of_run[prev]
    pos = np.searchsorted(nodes, pn)
    hit = (pos < nodes.size) & (nodes[np.minimum(pos, nodes.size - 1)] == pn)
    out = np.full(nodes.size, np.iinfo(np.int64).max)
    np.minimum.at(out, pos[hit], r.x0[prev][hit])
    return out


def _list_positions(r: _Runs, node_of_run, child_parent, child_key, n_nodes: int, x: np.ndarray) -> np.ndarray:
    """Place of every pixel in its detection's list from the tree of partial objects: a node's list is
    its items (child nodes at ``2 * first column``, pixels at ``2 x + 1``) by key, each child's list
    in one piece."""
    pix_node = node_of_run[r.of_pixel]
    size = np.bincount(pix_node, minlength=n_nodes).astype(np.int64)
    for par, (uo, _) in zip(child_parent, child_key):  # rows ascending: children are complete
        np.add.at(size, par, size[uo])
    kids = np.concatenate([uo for uo, _ in child_key] + [np.zeros(0, dtype=np.int64)])
    parent = np.concatenate([pix_node] + child_parent)
    key = np.concatenate([2 * x + 1] + [k for _, k in child_key])
    isize = np.concatenate([np.ones(x.size, dtype=np.int64), size[kids]])
    order = np.lexsort((key, parent))
    ps, ss = parent[order], isize[order]
    cs = np.cumsum(ss) - ss
    first = np.r_[True, ps[1:] != ps[:-1]]
    grp_start = np.maximum.accumulate(np.where(first, cs, 0))
    offset = np.empty(parent.size, dtype=np.int64)
    offset[order] = cs - grp_start
    start = np.zeros(n_nodes, dtype=np.int64)
    kid_off = offset[x.size:]
    bounds = np.cumsum([0] + [uo.size for uo, _ in child_key])
    for i in range(len(child_key) - 1, -1, -1):  # rows descending: parents are placed
        uo, a, b = child_key[i][0], bounds[i], bounds[i + 1]
        start[uo] = start[child_parent[i]] + kid_off[a:b]
    return start[pix_node] + offset[: x.size]


def list_order_key(x: Tensor, y: Tensor, group: Tensor, H: int, W: int) -> Tensor:
    """A sort key (int64, per pixel, within its group) for the order of each group's pixel list as
    SExtractor's ``lutz`` builds it: :func:`~.analyse.lutz_order_key` for groups with one run per row,
    :func:`lutz_list_rank` for the others (those with several runs on a row) up to
    :data:`EXACT_LIST_MAX_ROWS` rows tall; taller ones (saturated stars' halos and trails, vignetted
    edges: a few groups holding most of such a frame's pixels, whose exact list costs a loop over
    their rows) keep :func:`~.analyse.lutz_order_key`'s order, so their deblended fragments and CLEAN
    threshold may differ from SExtractor's (the pixels SExtractor hands out at random, a few). Groups are 8-connected
    (a group's rows are those from its first to its last); pixels in raster order per image are
    fastest (any order is sorted first)."""
    from .analyse import _segment_max, _segment_min, lutz_order_key

    key = lutz_order_key(x, y, group, H, W)
    if x.numel() == 0:
        return key
    lin = y * (W + 2) + x
    if not bool((lin[1:] >= lin[:-1]).all()):  # not raster order: sort (stable) by group, then raster
        o = _argsort(group * (H + 1) * (W + 2) + lin)
        x, y, group, lin = _g(x, o), _g(y, o), _g(group, o), _g(lin, o)
    else:
        o = None
    # a pixel starts a run unless the pixel before it is its left neighbour in the same group
    start = torch.ones_like(lin, dtype=torch.bool)
    start[1:] = (lin[1:] != lin[:-1] + 1) | (group[1:] != group[:-1])
    n = int(group.max()) + 1
    runs = torch.zeros(n, dtype=torch.int64, device=x.device).index_add_(0, group, start.long())
    rows = _segment_max(y.double(), group, n) - _segment_min(y.double(), group, n) + 1
    multi = (runs > rows.clamp_min(0).long()) & (rows <= EXACT_LIST_MAX_ROWS)
    if not bool(multi.any()):
        return key
    sel = _g(multi, group).nonzero().squeeze(1)
    rank = torch.from_numpy(lutz_list_rank(_g(x, sel).cpu().numpy(), _g(y, sel).cpu().numpy(),
                                           _g(group, sel).cpu().numpy())).to(key.device)
    if o is not None:
        sel = _g(o, sel)
    key = key.clone()
    key[sel] = rank
    return key
