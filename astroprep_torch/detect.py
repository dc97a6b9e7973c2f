"""Source detection at SExtractor parity: filter, threshold, label, deblend, clean -> :class:`Catalog`.

The algorithm follows SExtractor (Bertin & Arnouts 1996) and its library port sep, stage by stage:

1. **Matched filter.** The background-subtracted image is convolved (``conv2d``, zero padding, as
   SExtractor's line convolution treats pixels outside the frame) with the detection kernel,
   normalised to unit sum of absolute values as SExtractor does for ``CONV NORM`` kernels.
   ``filter_kernel="default"`` is SExtractor's ``default.conv`` 3x3 pyramid ``[[1,2,1],[2,4,2],[1,2,1]]``.
2. **Threshold.** A pixel is detected when its *filtered* value exceeds ``thresh * rms`` where ``rms`` is
   the *unfiltered* background rms (a map, or one value per image: SExtractor without weight maps
   uses one global value, the background-mesh median it prints as ``RMS``). Masked pixels are never
   detected (their value is set to 0 before filtering).
   On CPU (no autograd, separable kernel such as the default) steps 1-2 run strip by strip of rows
   with reused buffers: the same float operations, but no frame-sized filtered image, threshold map,
   boolean map or index temporaries (on this 2-core VM a fresh 64 MB temporary costs ~30 ms of page
   faults, several times the arithmetic); each strip is compacted at once to the detected pixels.
3. **8-connected components** on the compacted list of detected pixels only (no full-frame
   iteration): the right-hand neighbour of a pixel can only be the next list entry, the three below
   it are found with one ``searchsorted`` on the sorted linear indices; components
   by hooking roots onto the smallest neighbouring root (``scatter_reduce`` amin) followed by full
   pointer jumping. Each round at least halves the number of distinct roots per component, so a
   4096^2 frame converges in a handful of rounds. Components smaller than ``minarea`` are dropped.
4. **Deblending** exactly as SExtractor's ``deblend.c``: ``deblend_nthresh`` sub-thresholds
   ``t_k = t0 (peak/t0)^(k/N)`` between the detection threshold ``t0`` and the object's filtered
   peak; at each level the object's pixels above ``t_k`` split into 8-connected branches of at least
   ``min(minarea, 3)`` pixels (SExtractor's ``MAXDEBAREA``); walking the tree from the top, a node splits when more than one of its
   children holds ``sum(f - t_k) > deblend_cont * sum(f)`` of the object (``sum(f)`` the filtered
   flux of the whole object). Vectorisation: only objects with at least two local maxima of the
   filtered image and ``2 * minarea`` pixels can split (an upper level set of a function with one
   regional maximum on a connected pixel graph is connected), and for those all levels are
   labelled at once as one graph of ``(pixel, level)`` nodes. The tree walk is a loop over the
   ``deblend_nthresh`` *levels* (vectorised over every node of every object), not over objects.
   Pixels below the split are given to a branch by SExtractor's ``gatherup`` rule: each branch is a
   Gaussian of amplitude ``amp = t0 exp(npix / (2 pi abcor a b))`` (capped at ``4 x`` its filtered
   peak) and shape ``(cxx, cyy, cxy)/abcor``; SExtractor draws the branch at random from these
   probabilities, we take the most probable one (deterministic; the difference only affects
   faint pixels in the overlap).
5. **Cleaning** as SExtractor's ``clean``: a brighter object (filtered flux) with a Moffat-like
   profile ``amp (1 + alpha r^2)^(-clean_param)`` fitted to its isophotal area removes a fainter one
   within ``CLEAN_ZONE = 10 (a_1 + a_2)`` whose ``minarea``-th brightest pixel above threshold lies
   below the profile. An object is removed when an object that is itself kept removes it
   (brightness order, computed as a fixed point over all pairs at once). The removed object's
   pixels are merged into the segmentation label of the object that removed it, as SExtractor's
   ``mergeobject`` does.
6. **Measurements** for the final segmentation come from :func:`astroprep_torch.photometry.measure`
   when that module is present; otherwise the isophotal barycentre, second moments, ``npix``,
   ``peak`` and ``flux_iso`` are computed here (:func:`isophotal_moments`). The detection stage
   owns flags 2 (blended), 4 (saturated), 8 (truncated at the border) and 1 (crowded: more than
   10% of the pixels of the object's Kron ellipse, or of its isophotal footprint grown by one
   pixel when no Kron radius is known, belong to other objects).

``SourceExtractor.forward`` keeps the segmentation sparse (its labelled pixels) and hands the
pixel lists, their filtered values and the detected pixels to ``photometry.measure``; the dense
(B,1,H,W) int64 map (128 MB at 4096^2) is made only when ``Catalog.segmentation`` is read.

What remains a data-dependent Python loop in ``forward``: the number of hooking rounds of the
connected-component labelling (each round is one vectorised pass over the still-open edges and
needs one host synchronisation to test convergence) and the loop over the ``deblend_nthresh``
levels of the deblending tree. Nothing loops over pixels or objects.

Coordinates are 0-based pixel centres (x = column, y = row); :meth:`Catalog.to_table` writes
SExtractor's 1-based ``X_IMAGE``/``Y_IMAGE``.
"""

from __future__ import annotations

import importlib
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import all_finite, bad_pixels, check_image, check_mask
from ._runtime import adapt_to_load, serial_on_cpu

__all__ = [
    "Catalog",
    "SourceExtractor",
    "default_kernel",
    "filter_image",
    "detection_threshold",
    "connected_components",
    "label_image",
    "detect_sources",
    "isophotal_moments",
    "FLAG_CROWDED",
    "FLAG_BLENDED",
    "FLAG_SATURATED",
    "FLAG_TRUNCATED",
    "FLAG_APER_INCOMPLETE",
    "FLAG_ISO_INCOMPLETE",
]

# SExtractor's FLAGS bits, defined once in photometry (which sets most of them).
from .photometry import (  # noqa: E402
    FLAG_APER_INCOMPLETE,
    FLAG_BLENDED,
    FLAG_CROWDED,
    FLAG_ISO_INCOMPLETE,
    FLAG_SATURATED,
    FLAG_TRUNCATED,
)

MAXDEBAREA = 3  # SExtractor: minimum area of a deblending branch is min(minarea, MAXDEBAREA)
CLEAN_ZONE = 10.0  # SExtractor: neighbours considered within CLEAN_ZONE * (a1 + a2)
CROWD_THRESHOLD = 0.1  # SExtractor: fraction of the Kron aperture held by other objects for flag 1



# ----------------------------------------------------------------------------------------------
# filtering and threshold
# ----------------------------------------------------------------------------------------------

def _g(t: Tensor, i) -> Tensor:
    """``t[i]``; a 1-D integer index goes through ``index_select``, several times faster on CPU than
    advanced indexing (same result, same gradient); anything else is plain indexing."""
    if isinstance(i, Tensor) and i.dim() == 1 and i.dtype in (torch.int64, torch.int32) and isinstance(t, Tensor) \
            and t.dim() >= 1:
        return t.index_select(0, i)
    return t[i]

def _host(t: Tensor) -> bool:
    """Whether a numpy-backed kernel may replace the ATen one (CPU, no autograd, not compiling)."""
    return t.device.type == "cpu" and not (t.requires_grad and torch.is_grad_enabled()) \
        and not torch.compiler.is_compiling()


def _argsort(t: Tensor, *, descending: bool = False) -> Tensor:
    """Stable ``argsort`` of a 1-D tensor; on CPU through numpy (same order: both are stable sorts),
    several times faster than ATen's for the nearly sorted integer keys used here."""
    if _host(t) and t.dim() == 1:
        import numpy as np

        a = t.detach().numpy()
        if descending:
            a = -a
        return torch.from_numpy(np.argsort(a, kind="stable"))
    return torch.argsort(t, descending=descending, stable=True)


def _unique_roots(root: Tensor):
    """``torch.unique(root, return_inverse=True)`` for a forest ``root`` with ``root[i] <= i`` and
    ``root[root[i]] == root[i]`` (the output of :func:`connected_components`): the roots are the nodes
    with ``root[i] == i``, already sorted, so a cumulative sum replaces the sort."""
    n = root.numel()
    is_root = root == torch.arange(n, device=root.device)
    rank = torch.cumsum(is_root, 0) - 1
    return is_root.nonzero().squeeze(1), _g(rank, root)


def default_kernel(dtype=torch.float32, device=None) -> Tensor:
    """SExtractor's ``default.conv``: 3x3 pyramid (FWHM 2 px), normalised to unit sum, shape (3, 3)."""
    k = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]], dtype=dtype, device=device)
    return k / k.abs().sum()


def _as_kernel(kernel, dtype, device) -> Optional[Tensor]:
    if kernel is None:
        return None
    if isinstance(kernel, str):
        if kernel != "default":
            raise ValueError(f"filter_kernel must be 'default', a 2-D tensor or None, got {kernel!r}")
        return default_kernel(dtype, device)
    k = torch.as_tensor(kernel, dtype=dtype, device=device)
    if k.dim() != 2 or k.shape[0] % 2 == 0 or k.shape[1] % 2 == 0:
        raise ValueError(f"filter_kernel must be a 2-D tensor with odd sides, got shape {tuple(k.shape)}")
    s = k.abs().sum()
    return k / torch.where(s > 0, s, torch.ones_like(s))


def filter_image(image: Tensor, kernel: Union[str, Tensor, None] = "default") -> Tensor:
    """Convolve ``image`` (B,1,H,W) with the detection kernel (normalised to unit sum of |values|).

    Pixels outside the frame count as 0, as in SExtractor's scan-line convolution. ``None`` returns
    the image unchanged. Differentiable.
    """
    check_image(image, "image", channels=1)
    if kernel is None:
        return image
    if isinstance(kernel, str) and kernel == "default" and not image.requires_grad:
        # the pyramid is outer([1,2,1], [1,2,1]) / 16: two 3-tap passes of shifted slices
        return _separable_filter(image, [0.25, 0.5, 0.25], [0.25, 0.5, 0.25])
    k = _as_kernel(kernel, image.dtype, image.device)
    kh, kw = k.shape
    if kh <= 5 and kw <= 5 and not image.requires_grad and not torch.compiler.is_compiling():
        sep = _separable(k)
        if sep is not None:
            return _separable_filter(image, sep[0].tolist(), sep[1].tolist())
    # SExtractor correlates the mask with the image (no flip); same for symmetric kernels.
    return F.conv2d(image, k.view(1, 1, kh, kw), padding=(kh // 2, kw // 2))


def _separable(k: Tensor):
    """(column, row) factors when ``k`` is rank one (outer product), else None."""
    i = int(torch.argmax(k.abs()))
    r, c = divmod(i, k.shape[1])
    piv = k[r, c]
    if float(piv) == 0:
        return None
    col = k[:, c] / piv
    row = k[r, :]
    if not torch.allclose(torch.outer(col, row), k, rtol=1e-6, atol=1e-12):
        return None
    return col, row


def _separable_filter(image: Tensor, col: list, row: list) -> Tensor:
    """Correlate with ``outer(col, row)`` by shifted slices (few memory passes, zero padding)."""
    kh, kw = len(col), len(row)
    ph, pw = kh // 2, kw // 2
    H, W = image.shape[-2:]
    p = F.pad(image, (pw, pw, ph, ph))
    rv = row
    h = p[..., :, 0:W] * rv[0]
    for j in range(1, kw):
        h.add_(p[..., :, j:j + W], alpha=rv[j])
    cv = col
    out = h[..., 0:H, :] * cv[0]
    for i in range(1, kh):
        out.add_(h[..., i:i + H, :], alpha=cv[i])
    return out


def _strip_kernel(kernel, dtype, device):
    """(column, row) factor lists of a separable detection kernel, ``"none"`` for no filter, or None
    (not separable / not small: the strip path does not apply)."""
    if kernel is None:
        return "none"
    if isinstance(kernel, str) and kernel == "default":
        return [0.25, 0.5, 0.25], [0.25, 0.5, 0.25]
    k = _as_kernel(kernel, dtype, device)
    if k.shape[0] > 5 or k.shape[1] > 5:
        return None
    sep = _separable(k)
    return None if sep is None else (sep[0].tolist(), sep[1].tolist())


def _filter_threshold_strips(img: Tensor, noise: Tensor, thresh: float, factors, bad: Optional[Tensor] = None):
    """Detected pixels of a CPU image without frame-sized temporaries: the image is filtered in strips
    of rows (the same float operations as :func:`_separable_filter`, so the same values), each strip
    thresholded at ``thresh * noise`` (the same float product as :func:`detection_threshold`) and
    compacted at once (numpy ``flatnonzero``, several times faster than ATen's ``nonzero``). ``bad``
    pixels enter the filter as 0 and are never detected. Returns the sorted linear indices over
    (B, H, W) and the filtered values there."""
    import numpy as np

    B, _, H, W = img.shape
    none = isinstance(factors, str)
    col, row = ([1.0], [1.0]) if none else factors
    ph, pw = len(col) // 2, len(row) // 2
    R = max(8, min(H, (1 << 17) // max(W, 1)))  # rows per strip: ~0.5 MB of float32
    dt = img.dtype
    pad = torch.zeros(R + 2 * ph, W + 2 * pw, dtype=dt)
    hbuf = torch.empty(R + 2 * ph, W, dtype=dt)
    obuf = torch.empty(R, W, dtype=dt)
    tbuf = torch.empty(R, W, dtype=dt)
    flat_t = noise.stride(-1) == 0 and noise.stride(-2) == 0
    idx_parts, f_parts = [], []
    for b in range(B):
        nb = noise[b if noise.shape[0] > 1 else 0, 0]
        bb = None if bad is None else bad[b if bad.shape[0] > 1 else 0, 0]
        t_const = (thresh * nb[0, 0]).numpy() if flat_t else None
        for r0 in range(0, H, R):
            r1 = min(H, r0 + R)
            n = r1 - r0
            if none and bb is None:
                o = img[b, 0, r0:r1]
            else:
                lo, hi = max(0, r0 - ph), min(H, r1 + ph)
                P = pad[: n + 2 * ph]
                a = lo - (r0 - ph)
                P[:a].zero_()
                inner = P[a:a + hi - lo, pw:pw + W]
                inner.copy_(img[b, 0, lo:hi])
                if bb is not None:
                    inner.masked_fill_(bb[lo:hi], 0.0)
                P[a + hi - lo:].zero_()
                if none:
                    o = P[ph:ph + n, pw:pw + W]
                else:
                    h = hbuf[: n + 2 * ph]
                    torch.mul(P[:, 0:W], row[0], out=h)
                    for j in range(1, len(row)):
                        h.add_(P[:, j:j + W], alpha=row[j])
                    o = obuf[:n]
                    torch.mul(h[0:n], col[0], out=o)
                    for i in range(1, len(col)):
                        o.add_(h[i:i + n], alpha=col[i])
            on = o.numpy()
            t = t_const if flat_t else torch.mul(nb[r0:r1], thresh, out=tbuf[:n]).numpy()
            above = on > t
            if bb is not None:
                above &= ~bb[r0:r1].numpy()
            li = np.flatnonzero(above)
            if li.size:
                f_parts.append(on.reshape(-1)[li])
                idx_parts.append(li + (b * H + r0) * W)
    if not idx_parts:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=dt)
    return torch.from_numpy(np.concatenate(idx_parts)), torch.from_numpy(np.concatenate(f_parts))


def _noise_map(rms, image: Tensor) -> Tensor:
    """``rms`` as a tensor broadcast to (B,1,H,W) without copying (a view); see :func:`detection_threshold`."""
    return _noise_base(rms, image).expand(image.shape[0], 1, *image.shape[-2:])


def _noise_base(rms, image: Tensor) -> Tensor:
    """``rms`` checked and shaped (B|1, 1, H|1, W|1), not expanded."""
    B, _, H, W = image.shape
    r = torch.as_tensor(rms, dtype=image.dtype, device=image.device)
    if r.dim() == 0:
        r = r.view(1, 1, 1, 1)
    elif r.dim() == 1:
        if r.shape[0] not in (1, B):
            raise ValueError(f"rms given per image must have length 1 or B={B}, got {r.shape[0]}")
        r = r.view(-1, 1, 1, 1)
    elif r.dim() == 4:
        if r.shape[1] != 1 or r.shape[2:] not in ((H, W), (1, 1)) or r.shape[0] not in (1, B):
            raise ValueError(f"rms map must be shaped (B,1,H,W) like image {tuple(image.shape)}, got {tuple(r.shape)}")
    else:
        raise ValueError(f"rms must be a float, a (B,) tensor or a (B,1,H,W) map, got shape {tuple(r.shape)}")
    return r


def check_rms(rms, image: Tensor, mask: Optional[Tensor] = None) -> Optional[Tensor]:
    """Check the noise ``rms`` of :func:`detect_sources` and return the mask to use.

    A number or per-image values must be positive and finite (else ``ValueError`` naming them). A
    map may hold non-positive or NaN values where no source can be measured (outside a footprint):
    those pixels join the mask (returned, a new tensor) and are never detected; a map without a
    single positive finite value outside the mask is refused.
    """
    if rms is None:
        raise TypeError("rms must be the background noise: a positive float, a (B,) tensor or a (B, 1, H, W) map, got None")
    r = _noise_base(rms, image)
    with torch.no_grad():
        bad_r = ~(r > 0) | ~torch.isfinite(r)  # NaN compares False: caught by the first term
        if not bool(bad_r.any()):
            return mask
        if r.shape[-2:] == (1, 1):
            raise ValueError(f"rms must be positive and finite, got {r.flatten().tolist()[:8]}")
        bad = bad_r.expand(image.shape[0], 1, *image.shape[-2:])
        bad = bad | mask if mask is not None else bad.clone()
        if bool(bad.flatten(1).all(1).any()):
            raise ValueError("rms map has no positive finite value outside the mask in image element(s) "
                             f"{torch.nonzero(bad.flatten(1).all(1)).flatten().tolist()}")
    return bad


def detection_threshold(rms, image: Tensor, thresh: float) -> Tensor:
    """``thresh * rms`` broadcast to (B,1,H,W); ``rms`` is a map (B,1,H,W)/(1,1,H,W), a (B,) tensor or a float."""
    B, _, H, W = image.shape
    return (thresh * _noise_base(rms, image)).expand(B, 1, H, W)


# ----------------------------------------------------------------------------------------------
# connected components on a compacted pixel list
# ----------------------------------------------------------------------------------------------
def connected_components(n: int, u: Tensor, v: Tensor) -> Tensor:
    """Connected components of a graph with ``n`` nodes and undirected edges ``(u[i], v[i])``.

    Returns, per node, the smallest node index of its component. Hooking of roots onto the
    smallest neighbouring root (``scatter_reduce`` amin) alternates with full pointer jumping
    (``parent = parent[parent]`` until stable); edges inside a finished component are dropped each
    round. ``parent[i] <= i`` always holds, so no cycle can form.
    """
    device = u.device
    parent = torch.arange(n, device=device, dtype=torch.int64)
    if u.numel() == 0:
        return parent
    # first hook: every node to its smallest neighbour (cheap, removes most work)
    lo = torch.minimum(u, v)
    hi = torch.maximum(u, v)
    parent.scatter_reduce_(0, hi, lo, reduce="amin")
    while True:
        while True:  # pointer jumping to the roots
            gp = _g(parent, parent)
            if torch.equal(gp, parent):
                break
            parent = gp
        pu = _g(parent, u)
        pv = _g(parent, v)
        open_ = pu != pv
        if not bool(open_.any()):
            return parent
        u, v, pu, pv = _g(u, open_), _g(v, open_), _g(pu, open_), _g(pv, open_)
        parent.scatter_reduce_(0, torch.maximum(pu, pv), torch.minimum(pu, pv), reduce="amin")


def _pixel_edges(idx: Tensor, x: Tensor, y: Tensor, H: int, W: int):
    """8-neighbour edges between entries of the sorted linear-index list ``idx`` (forward half).

    The right-hand neighbour of entry ``k`` can only be entry ``k + 1``; the three neighbours in the
    row below, when present, are consecutive entries starting at the first one >= ``idx + W - 1``
    (one ``searchsorted`` instead of three). Edge order differs from a per-offset search, components
    do not."""
    n = idx.numel()
    ar = torch.arange(n, device=idx.device)
    if n == 0:
        return ar, ar
    hor = (_g(idx, ar[1:]) == idx[:-1] + 1) & (x[:-1] + 1 < W)
    u0 = hor.nonzero().squeeze(1)
    us, vs = [u0], [u0 + 1]
    below = y + 1 < H
    t = idx + (W - 1)
    if _host(idx):
        import numpy as np

        p = torch.from_numpy(np.searchsorted(idx.numpy(), t.numpy()))
    else:
        p = torch.searchsorted(idx, t)
    for dx in (-1, 0, 1):
        q = p.clamp(max=n - 1)
        hit = _g(idx, q) == t + (dx + 1)
        e = hit & below
        if dx == -1:
            e &= x > 0
        elif dx == 1:
            e &= x + 1 < W
        k = e.nonzero().squeeze(1)
        us.append(k)
        vs.append(_g(q, k))
        p = p + hit
    return torch.cat(us), torch.cat(vs)


def label_image(binary: Tensor, *, connectivity: int = 8) -> Tensor:
    """Label 8-connected (or 4-connected) True regions of a (B,1,H,W) bool map: int64 labels 1..n per image, 0 = background.

    Labels follow raster order of each region's first pixel, restarting at 1 in every image.
    """
    if binary.dim() != 4 or binary.dtype != torch.bool:
        raise ValueError(f"binary must be a bool tensor shaped (B,1,H,W), got {binary.dtype} {tuple(binary.shape)}")
    B, _, H, W = binary.shape
    idx = binary.reshape(-1).nonzero().squeeze(1)
    rem = idx % (H * W)
    y, x = rem // W, rem % W
    u, v = _pixel_edges(idx, x, y, H, W)
    if connectivity == 4:
        d = _g(idx, v) - _g(idx, u)  # (list neighbours can be diagonal pixel neighbours)
        keep = (d == 1) | (d == W)
        u, v = _g(u, keep), _g(v, keep)
    elif connectivity != 8:
        raise ValueError(f"connectivity must be 4 or 8, got {connectivity}")
    root = connected_components(idx.numel(), u, v)
    is_root = root == torch.arange(idx.numel(), device=idx.device)
    b = idx // (H * W)
    # per-image running number of roots
    ridx = torch.cumsum(is_root.long(), 0)
    first_of_image = torch.searchsorted(idx, torch.arange(B, device=idx.device) * H * W)
    base = torch.zeros(B, dtype=torch.int64, device=idx.device)
    has = first_of_image < idx.numel()
    base[has] = _g(ridx, _g(first_of_image, has)) - _g(is_root, _g(first_of_image, has)).long()
    lab = _g(ridx, root) - _g(base, b)
    out = torch.zeros(B * H * W, dtype=torch.int64, device=binary.device)
    out.scatter_(0, idx, lab)
    return out.view(B, 1, H, W)


# ----------------------------------------------------------------------------------------------
# per-object moments (SExtractor analyse(), on filtered values)
# ----------------------------------------------------------------------------------------------
def _segment_sum(values: Tensor, seg: Tensor, n: int) -> Tensor:
    return torch.zeros(n, dtype=values.dtype, device=values.device).index_add_(0, seg, values)


def _segment_max(values: Tensor, seg: Tensor, n: int) -> Tensor:
    out = torch.full((n,), -math.inf, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, seg, values, reduce="amax", include_self=True)


def _segment_min(values: Tensor, seg: Tensor, n: int, fill=math.inf) -> Tensor:
    out = torch.full((n,), fill, dtype=values.dtype, device=values.device)
    return out.scatter_reduce_(0, seg, values, reduce="amin", include_self=True)


def _analyse(seg, n, x, y, f, v, thresh_obj, centre=None):
    """SExtractor/sep ``analyse``: filtered-flux weighted moments, ellipse, ``abcor`` per segment.

    ``seg`` (P,) segment of each pixel, ``x, y`` float64 coordinates, ``f`` filtered and ``v``
    unfiltered values (float64), ``thresh_obj`` (n,) the segment's threshold. ``centre`` (mx, my)
    replaces the barycentre (SExtractor's "robust" analysis of deblended objects).
    """
    dt = torch.float64
    fdflux = _segment_sum(f, seg, n)
    fdnpix = torch.bincount(seg, minlength=n).to(dt)
    fdpeak = _segment_max(f, seg, n)
    dpeak = _segment_max(v, seg, n)
    # moments about a per-object origin (xmin, ymin) to limit round-off, as SExtractor does
    x0 = _segment_min(x, seg, n)
    y0 = _segment_min(y, seg, n)
    xr, yr = x - _g(x0, seg), y - _g(y0, seg)
    safe = torch.where(fdflux != 0, fdflux, torch.ones_like(fdflux))
    mx = _segment_sum(f * xr, seg, n) / safe
    my = _segment_sum(f * yr, seg, n) / safe
    sxx = _segment_sum(f * xr * xr, seg, n) / safe
    syy = _segment_sum(f * yr * yr, seg, n) / safe
    sxy = _segment_sum(f * xr * yr, seg, n) / safe
    if centre is not None:
        xn, yn = centre[0] - x0, centre[1] - y0
        x2 = sxx + xn * xn - 2 * mx * xn
        y2 = syy + yn * yn - 2 * my * yn
        xy = sxy + xn * yn - mx * yn - xn * my
        mx, my = xn, yn
    else:
        x2 = sxx - mx * mx
        y2 = syy - my * my
        xy = sxy - mx * my
    x2raw, y2raw, xyraw = x2, y2, xy
    det = x2 * y2 - xy * xy
    singular = det < 0.00694
    x2 = torch.where(singular, x2 + 0.0833333, x2)
    y2 = torch.where(singular, y2 + 0.0833333, y2)
    det = x2 * y2 - xy * xy
    d = x2 - y2
    temp = torch.sqrt(0.25 * d * d + xy * xy)
    a = torch.sqrt((0.5 * (x2 + y2) + temp).clamp_min(0))
    b = torch.sqrt((0.5 * (x2 + y2) - temp).clamp_min(0))
    cxx, cyy, cxy = y2 / det, x2 / det, -2 * xy / det
    thresh2 = (thresh_obj + dpeak) / 2
    dnpix = _segment_sum((v > _g(thresh_obj, seg)).to(dt), seg, n)
    area2 = _segment_sum((v > _g(thresh2, seg)).to(dt), seg, n)
    darea = area2 - dnpix
    t1t2 = thresh_obj / thresh2
    ab = a * b
    abcor = torch.where(darea < 0, darea, torch.full_like(darea, -1.0)) / (
        2 * math.pi * torch.log(torch.where(t1t2 < 1, t1t2, torch.full_like(t1t2, 0.99)).clamp_min(1e-300)) * ab
    )
    abcor = torch.where((t1t2 > 0) & (ab > 0), abcor.clamp(max=1.0), torch.ones_like(abcor))
    return dict(
        mx=mx + x0, my=my + y0, x2=x2, y2=y2, xy=xy, a=a, b=b, cxx=cxx, cyy=cyy, cxy=cxy, abcor=abcor,
        fdflux=fdflux, fdnpix=fdnpix, fdpeak=fdpeak, dpeak=dpeak, dnpix=dnpix,
        x2raw=x2raw, y2raw=y2raw, xyraw=xyraw,
    )


def _mthresh(values: Tensor, seg: Tensor, n: int, minarea: int, last: Optional[Tensor] = None) -> Tensor:
    """SExtractor's ``mthresh``: the ``minarea``-th largest ``f - t`` of an object, as its heap computes it.

    ``values`` must be in raster order; ``last`` marks pixels that go after the others (pixels a
    deblended branch gathered from its parent, appended to its list by SExtractor's ``gatherup``). SExtractor fills a heap
    with the first ``minarea`` values, spends the next pixel on sorting the heap (that value is never
    compared) and then keeps the ``minarea`` largest of the rest; an object of exactly ``minarea``
    pixels returns its first value. We reproduce that, so that cleaning decisions match.
    """
    P = values.numel()
    if last is None:
        order = _argsort(seg)
    else:
        # pixels gathered by the deblender come after the branch's own pixels in SExtractor's list
        order = _argsort(seg * 2 + last.long())
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
        m = _segment_max(v, seg, n)
        at = (v == _g(m, seg)).nonzero().squeeze(1)
        first = torch.full((n,), P, dtype=torch.int64, device=values.device)
        first.scatter_reduce_(0, _g(seg, at), _g(ar, at), reduce="amin", include_self=True)
        hit = first < P
        v.index_fill_(0, _g(first, hit.nonzero().squeeze(1)), -math.inf)
    has = counts >= k
    return torch.where(has, m, out)


# ----------------------------------------------------------------------------------------------
# deblending (SExtractor deblend.c), vectorised over objects and pixels
# ----------------------------------------------------------------------------------------------
def _find_roots(parent: Tensor, x: Tensor) -> Tensor:
    """The roots of the nodes ``x`` in the forest ``parent`` (gathers only; ``parent`` unchanged)."""
    r = _g(parent, x)
    while True:
        r2 = _g(parent, r)
        if torch.equal(r2, r):
            return r
        r = r2


def _level_roots(L: Tensor, off: Tensor, n_nodes: int, eu: Tensor, ev: Tensor, c: Tensor) -> Tensor:
    """Connected components of every deblending level at once: per node (pixel ``p``, level ``k`` for
    ``k = 1..L[p]``, node id ``off[p] + k - 1``) the smallest node id of its level-``k`` component.

    The levels are nested (a level-``k`` component is a union of level-``k+1`` ones), so one union-find
    over the pixels, fed from the highest level down with the edges ``(eu, ev)`` whose lower end first
    reaches each level (``c`` = the level count both ends reach), hooks every edge once: the cost is
    the pixels' and edges', not the nodes' (pixels x levels, ~20x more for a saturated star).  Gives
    :func:`connected_components` on the node graph exactly (roots are the smallest pixel of the
    component, whose node at level ``k`` is the smallest node)."""
    dev = L.device
    npc = L.numel()
    root = torch.empty(n_nodes, dtype=torch.int64, device=dev)
    if n_nodes == 0:
        return root
    nl = int(L.max())
    small = torch.int16 if nl < 32767 else torch.int64  # numpy sorts 16-bit keys by radix sort
    porder = _argsort(L.to(small), descending=True)  # pixels above level k: a prefix
    n_ge = torch.flip(torch.cumsum(torch.flip(torch.bincount(L, minlength=nl + 2), [0]), 0), [0]).tolist()
    eorder = _argsort(c.to(small), descending=True)
    eu, ev = _g(eu, eorder), _g(ev, eorder)
    e_ge = torch.flip(torch.cumsum(torch.flip(torch.bincount(c, minlength=nl + 2), [0]), 0), [0]).tolist()
    parent = torch.arange(npc, device=dev)
    off_p = _g(off, porder)  # node offsets of the pixels in level order (prefix slices below)
    for k in range(nl, 0, -1):
        act = porder[: n_ge[k]]
        u_, v_ = eu[e_ge[k + 1] : e_ge[k]], ev[e_ge[k + 1] : e_ge[k]]  # edges joining at this level
        hooked = False
        while u_.numel():  # the edges of higher levels are all closed
            pu, pv = _find_roots(parent, u_), _find_roots(parent, v_)
            open_ = pu != pv
            if not bool(open_.any()):
                break
            u_, v_, pu, pv = _g(u_, open_), _g(v_, open_), _g(pu, open_), _g(pv, open_)
            hi = torch.maximum(pu, pv)
            parent.scatter_reduce_(0, hi, torch.minimum(pu, pv), reduce="amin")
            hooked = True
            # the hooked roots may form long chains (a bleed trail's pixels hook one onto the next);
            # chains consist of hooked roots only, so pointer doubling over them alone flattens them
            while True:
                pa = _g(parent, hi)
                gp = _g(parent, pa)
                if torch.equal(gp, pa):
                    break
                parent.index_copy_(0, hi, gp)
        if hooked:
            top = _find_roots(parent, act)
            parent.index_copy_(0, act, top)  # compressed: only pixels above this level ever moved
        else:
            top = _g(parent, act)  # already compressed at the level above
        root.index_copy_(0, off_p[: n_ge[k]] + (k - 1), _g(off, top) + (k - 1))
    return root


def _deblend(obj, n_obj, u, v, x, y, f, val, t0_obj, peak_obj, fdflux_obj, *, nthresh, mincont, minarea, candidates):
    """Return (new object id per pixel, number of objects, blended flag per object, core centre).

    ``obj`` (P,) object of each pixel; ``u, v`` 8-neighbour pixel edges; ``candidates`` (n_obj,)
    bool objects that may split. Output objects keep the ids of unsplit objects; split objects are
    replaced by their branches, appended after ``n_obj`` (the caller renumbers).
    """
    device = obj.device
    P = obj.numel()
    cand_pix = _g(candidates, obj)
    if nthresh < 2 or mincont >= 1.0 or not bool(cand_pix.any()):
        return obj, n_obj, torch.zeros(n_obj, dtype=torch.bool, device=device), None, None
    pidx = cand_pix.nonzero().squeeze(1)  # candidate pixels (global pixel ids)
    npc = pidx.numel()
    loc = torch.full((P,), -1, dtype=torch.int64, device=device)
    loc[pidx] = torch.arange(npc, device=device)
    po = _g(obj, pidx)
    pf = _g(f, pidx)
    t0 = _g(t0_obj, po)
    ratio = (_g(peak_obj, po) / t0).clamp_min(1.0)
    ks = torch.arange(1, nthresh, device=device, dtype=torch.float64)
    # sub-thresholds of every candidate object: (n_obj, N-1)
    tk_obj = t0_obj[:, None] * torch.pow((peak_obj / t0_obj).clamp_min(1.0)[:, None], ks[None, :] / nthresh)
    tk_obj = torch.where((peak_obj > 0)[:, None], tk_obj, t0_obj[:, None].expand_as(tk_obj))
    tk_obj = tk_obj.float().double()  # SExtractor stores the sub-thresholds as float (PIXTYPE)
    del ratio, t0
    # number of sub-levels each pixel exceeds, from the closed form, then corrected against the
    # exact (float-rounded) thresholds so that memory stays O(pixels), not O(pixels x levels)
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
    # nodes (pixel, level k) for k = 1..L
    off = torch.cumsum(L, 0) - L
    n_nodes = int(L.sum())
    node_pix = torch.repeat_interleave(torch.arange(npc, device=device), L)
    node_lev = torch.arange(n_nodes, device=device) - _g(off, node_pix) + 1
    # edges among candidate pixels, replicated on every level both ends reach
    ce = _g(cand_pix, u)
    eu, ev = _g(loc, _g(u, ce)), _g(loc, _g(v, ce))
    c = torch.minimum(L[eu], L[ev])
    keep = c > 0
    eu, ev, c = _g(eu, keep), _g(ev, keep), _g(c, keep)
    root = _level_roots(L, off, n_nodes, eu, ev, c)
    comp_ids, node_comp = _unique_roots(root)
    n_comp = comp_ids.numel()
    comp_area = torch.bincount(node_comp, minlength=n_comp)
    comp_lev = _g(node_lev, comp_ids)
    comp_pix = _g(node_pix, comp_ids)  # representative (the first) pixel of the component
    comp_obj = _g(po, comp_pix)
    comp_f = _segment_sum(_g(pf, node_pix), node_comp, n_comp)
    comp_t = tk_obj[comp_obj, comp_lev - 1]
    # SExtractor's deblending lutz keeps branches of at least min(minarea, MAXDEBAREA = 3) pixels
    valid = comp_area >= min(minarea, MAXDEBAREA)
    value0 = fdflux_obj * mincont
    sig = valid & (comp_f - comp_t * comp_area.to(comp_f.dtype) > _g(value0, comp_obj))
    # parent of a level-k component: the component holding the same pixel at level k-1 (k >= 2),
    # the object itself at k = 1 (parents are indexed n_comp + object id)
    par = torch.where(
        comp_lev > 1,
        node_comp[(_g(off, comp_pix) + comp_lev - 2).clamp_min(0)],
        n_comp + comp_obj,
    )
    ok = torch.ones(n_comp + n_obj, dtype=torch.bool, device=device)
    selected = torch.zeros(n_comp, dtype=torch.bool, device=device)
    for k in range(nthresh - 1, 0, -1):  # children at level k, parents at level k-1
        ch = ((comp_lev == k) & valid).nonzero().squeeze(1)
        if ch.numel() == 0:
            continue
        pa = _g(par, ch)
        m = torch.zeros(n_comp + n_obj, dtype=torch.int64, device=device).index_add_(0, pa, _g(sig, ch).long())
        allok = torch.ones(n_comp + n_obj, dtype=torch.int64, device=device).scatter_reduce_(
            0, pa, _g(ok, ch).long(), reduce="amin"
        )
        ok &= allok.bool()
        split = m > 1
        selected[ch] |= _g(ok, ch) & _g(sig, ch) & _g(split, pa)
        ok &= ~split
    split_obj = ~ok[n_comp:] & candidates
    if not bool(split_obj.any()):
        return obj, n_obj, torch.zeros(n_obj, dtype=torch.bool, device=device), None, None
    sel = (selected & _g(split_obj, comp_obj)).nonzero().squeeze(1)
    n_sel = sel.numel()
    sel_map = torch.full((n_comp,), -1, dtype=torch.int64, device=device)
    sel_map[sel] = torch.arange(n_sel, device=device)
    # core pixels of each selected branch: nodes whose component is selected
    node_sel = _g(sel_map, node_comp)
    has = node_sel >= 0
    core_pix = _g(node_pix, has)  # candidate-local pixel ids
    core_son = _g(node_sel, has)
    son_obj = _g(comp_obj, sel)
    son_t = _g(comp_t, sel)
    gx, gy = _g(x, pidx), _g(y, pidx)
    gval = _g(val, pidx)
    an = _analyse(core_son, n_sel, _g(gx, core_pix), _g(gy, core_pix), _g(pf, core_pix), _g(gval, core_pix), son_t)
    # gatherup amplitudes (thresholds reset to the detection threshold first)
    t_det = _g(t0_obj, son_obj)
    ab2 = 2 * math.pi * an["abcor"] * an["a"] * an["b"]
    dist = an["fdnpix"] / ab2
    amp = torch.where(dist < 70.0, t_det * torch.exp(dist.clamp(max=70.0)), 4.0 * an["fdpeak"])
    amp = torch.minimum(amp, 4.0 * an["fdpeak"])
    # assign every pixel of a split object
    assign = torch.full((npc,), -1, dtype=torch.int64, device=device)
    assign[core_pix] = core_son
    free = (assign < 0) & _g(split_obj, po)
    fp = free.nonzero().squeeze(1)
    if fp.numel():
        # sons of each split object, contiguous after sorting by object
        order = _argsort(son_obj)
        so_sorted = _g(son_obj, order)
        cnt = torch.bincount(so_sorted, minlength=n_obj)
        start = torch.cumsum(cnt, 0) - cnt
        fo = _g(po, fp)
        rep = _g(cnt, fo)
        pair_pix = torch.repeat_interleave(fp, rep)
        pair_off = torch.cumsum(rep, 0) - rep
        j = torch.arange(pair_pix.numel(), device=device) - torch.repeat_interleave(pair_off, rep)
        pair_son = _g(order, _g(start, _g(po, pair_pix)) + j)
        dx = _g(gx, pair_pix) - an["mx"][pair_son]
        dy = _g(gy, pair_pix) - an["my"][pair_son]
        d = 0.5 * (an["cxx"][pair_son] * dx * dx + an["cyy"][pair_son] * dy * dy + an["cxy"][pair_son] * dx * dy)
        d = d / an["abcor"][pair_son]
        prob = torch.where(d < 70.0, _g(amp, pair_son) * torch.exp(-d.clamp(max=70.0)), torch.zeros_like(d))
        # most probable branch; the closest one (in ellipse metric) when all probabilities vanish
        npp = fp.numel()
        pair_row = torch.repeat_interleave(torch.arange(npp, device=device), rep)
        pmax = _segment_max(prob, pair_row, npp)
        psum = _segment_sum(prob, pair_row, npp)
        dmin = _segment_min(d, pair_row, npp)
        use_p = _g(psum, pair_row) > 1e-31
        win = torch.where(use_p, prob == _g(pmax, pair_row), d == _g(dmin, pair_row))
        best = torch.full((npp,), -1, dtype=torch.int64, device=device)
        best.scatter_reduce_(0, _g(pair_row, win), _g(pair_son, win), reduce="amax", include_self=True)
        assign[fp] = best
    new_obj = obj.clone()
    moved = _g(split_obj, po)
    new_obj[_g(pidx, moved)] = n_obj + _g(assign, moved)
    blended = torch.cat([torch.zeros(n_obj, dtype=torch.bool, device=device), torch.ones(n_sel, dtype=torch.bool, device=device)])
    centre = (
        torch.cat([torch.full((n_obj,), math.nan, dtype=torch.float64, device=device), an["mx"]]),
        torch.cat([torch.full((n_obj,), math.nan, dtype=torch.float64, device=device), an["my"]]),
    )
    gathered = torch.zeros(P, dtype=torch.bool, device=device)
    gathered[_g(pidx, fp)] = True
    return new_obj, n_obj + n_sel, blended, centre, gathered


# ----------------------------------------------------------------------------------------------
# cleaning (SExtractor clean.c)
# ----------------------------------------------------------------------------------------------
def _neighbour_pairs(bidx, mx, my, radius, H, W):
    """All ordered pairs (i, j), i != j, same image, with |r_i - r_j| < radius[i] (grid hashing)."""
    device = mx.device
    n = mx.numel()
    if n < 2:
        e = torch.zeros(0, dtype=torch.int64, device=device)
        return e, e
    cell = float(max(8.0, float(torch.quantile(radius.float(), 0.5)) if n > 0 else 8.0))
    ncx = int(W // cell) + 2
    ncy = int(H // cell) + 2
    cx = (mx / cell).floor().long().clamp(0, ncx - 1)
    cy = (my / cell).floor().long().clamp(0, ncy - 1)
    key = (bidx * ncy + cy) * ncx + cx
    order = torch.argsort(key)
    skey = _g(key, order)
    # cells each object must visit
    rcell = torch.ceil(radius / cell).long()
    span = 2 * rcell + 1
    nvis = span * span
    q = torch.repeat_interleave(torch.arange(n, device=device), nvis)
    qoff = torch.cumsum(nvis, 0) - nvis
    t = torch.arange(q.numel(), device=device) - _g(qoff, q)
    ddy = t // _g(span, q) - _g(rcell, q)
    ddx = t % _g(span, q) - _g(rcell, q)
    qy = _g(cy, q) + ddy
    qx = _g(cx, q) + ddx
    okc = (qy >= 0) & (qy < ncy) & (qx >= 0) & (qx < ncx)
    q, qy, qx = _g(q, okc), _g(qy, okc), _g(qx, okc)
    qkey = (_g(bidx, q) * ncy + qy) * ncx + qx
    lo = torch.searchsorted(skey, qkey)
    hi = torch.searchsorted(skey, qkey, right=True)
    cnt = hi - lo
    i = torch.repeat_interleave(q, cnt)
    coff = torch.cumsum(cnt, 0) - cnt
    jj = torch.arange(i.numel(), device=device) - torch.repeat_interleave(coff, cnt)
    j = order[torch.repeat_interleave(lo, cnt) + jj]
    d2 = (_g(mx, i) - _g(mx, j)) ** 2 + (_g(my, i) - _g(my, j)) ** 2
    keep = (i != j) & (d2 < _g(radius, i) ** 2)
    return _g(i, keep), _g(j, keep)


def _clean(bidx, an, thresh_obj, mthresh, clean_param, H, W):
    """Return (survives (n,) bool, master (n,) index of the object that removed each one, or itself)."""
    n = bidx.numel()
    device = bidx.device
    ar = torch.arange(n, device=device)
    if n < 2:
        return torch.ones(n, dtype=torch.bool, device=device), ar
    a = an["a"]
    # d < CLEAN_ZONE (a_i + a_j) implies d < 2 CLEAN_ZONE max(a_i, a_j): search each object's own
    # radius 2 CLEAN_ZONE a_i and use every found pair in both orientations
    i0, j0 = _neighbour_pairs(bidx, an["mx"], an["my"], 2 * CLEAN_ZONE * a, H, W)
    i, j = torch.cat([i0, j0]), torch.cat([j0, i0])
    dx = an["mx"][i] - an["mx"][j]
    dy = an["my"][i] - an["my"][j]
    rlim = CLEAN_ZONE * (_g(a, i) + _g(a, j))
    fi, fj = an["fdflux"][i], an["fdflux"][j]
    # i eats j when i is brighter (ties: the later object in SExtractor's order, here the larger index)
    brighter = (fi > fj) | ((fi == fj) & (i > j))
    keep = (dx * dx + dy * dy <= rlim * rlim) & brighter
    i, j, dx, dy = _g(i, keep), _g(j, keep), _g(dx, keep), _g(dy, keep)
    unit = math.pi * a * an["b"]
    amp = an["fdflux"] / (2 * unit * an["abcor"])
    alpha = (torch.pow((amp / thresh_obj).clamp_min(0), 1.0 / clean_param) - 1) * unit / an["fdnpix"]
    val = 1 + _g(alpha, i) * (an["cxx"][i] * dx * dx + an["cyy"][i] * dy * dy + an["cxy"][i] * dx * dy)
    model = torch.where(val < 1e10, _g(amp, i) * torch.pow(val.clamp_min(1e-300), -clean_param), torch.zeros_like(val))
    eats = (val > 1.0) & (model.float() > _g(mthresh, j).float())
    i, j, model = _g(i, eats), _g(j, eats), _g(model, eats)
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
        # the surviving eater with the largest model value at the victim's centre
        mm = _segment_max(_g(model, live), _g(j, live), n)
        win = live & (model == _g(mm, j))
        master.scatter_reduce_(0, _g(j, win), _g(i, win), reduce="amin", include_self=False)
    return alive, master


# ----------------------------------------------------------------------------------------------
# the detection stage
# ----------------------------------------------------------------------------------------------
@serial_on_cpu
def detect_sources(
    image: Tensor,
    rms,
    mask: Optional[Tensor] = None,
    *,
    thresh: float = 1.5,
    minarea: int = 5,
    filter_kernel: Union[str, Tensor, None] = "default",
    deblend_nthresh: int = 32,
    deblend_cont: float = 0.005,
    clean: bool = True,
    clean_param: float = 1.0,
    dense: bool = True,
) -> dict:
    """Segment a background-subtracted (B,1,H,W) image. Returns a dict of tensors.

    ``segmentation`` (B,1,H,W) int64 labels 1..n per image (0 = sky), and per object (ordered by
    batch index then label): ``batch_index``, ``label``, ``blended`` (bool), ``thresh`` (detection
    threshold t0), ``xmin, xmax, ymin, ymax`` (int), ``cpeak`` (filtered peak), ``cflux`` (filtered
    flux) and the detection-image moments ``mx, my`` (0-based); ``filtered`` is the filtered image.

    Always present, the sparse form: ``detected`` (P,) sorted linear indices (over B*H*W) of every
    pixel above threshold, ``pixels`` (Q,) the sorted linear indices of the labelled ones, ``pixel_row``
    (Q,) their object (row) index and ``pixel_filtered`` (Q,) their filtered value. ``dense=False``
    leaves out ``segmentation`` and ``filtered`` (None): on CPU the image is then filtered and
    thresholded strip by strip and no frame-sized array is made at all.
    """
    check_image(image, "image", channels=1)
    mask = check_mask(mask, image)
    B, _, H, W = image.shape
    device = image.device
    # one cheap reduction tells whether any NaN/inf needs zeroing (avoids full-frame isfinite passes)
    if mask is None and bool(torch.isfinite(image.sum())):
        bad = None
    elif mask is not None and all_finite(image):
        bad = mask.expand(image.shape)  # read only below: no copy
    else:
        bad = bad_pixels(image, mask)
    noise = _noise_base(rms, image)
    factors = None
    if not dense and _host(image):
        factors = _strip_kernel(filter_kernel, image.dtype, device)
    filt = None
    if factors is not None:
        # CPU: filter, threshold and compact strip by strip (no frame-sized temporaries); bad pixels
        # enter the filter as 0 and are never detected
        idx, f = _filter_threshold_strips(image, noise.expand(B, 1, H, W), thresh, factors, bad)
    else:
        img = image if bad is None else torch.where(bad, torch.zeros_like(image), image)
        filt = filter_image(img, filter_kernel)
        det = filt > (thresh * noise).expand(B, 1, H, W)
        if bad is not None:
            det &= ~bad
        idx = det.reshape(-1).nonzero().squeeze(1)
        f = filt.reshape(-1).index_select(0, idx)
    P = idx.numel()
    HW = H * W
    det_idx = idx
    b = idx // HW
    rem = idx % HW
    yi, xi = rem // W, rem % W
    f = f.double()
    val = image.reshape(-1).index_select(0, idx).double()  # detected pixels are never bad
    if noise.shape[-2:] == (1, 1):  # one threshold per image: no frame-sized copy
        tp = _g((thresh * noise)[:, 0, 0, 0].expand(B), b).double()
    else:
        nz = noise.expand(B, 1, H, W)
        tp = (thresh * nz[b, 0, yi, xi]).double()
    u, v = _pixel_edges(idx, xi, yi, H, W)
    root = connected_components(P, u, v)
    roots, obj = _unique_roots(root)
    n = roots.numel()
    npix = torch.bincount(obj, minlength=n)
    big = npix >= minarea
    # drop small components, renumber
    keep_pix = _g(big, obj)
    newid = torch.cumsum(big.long(), 0) - 1
    if not bool(keep_pix.all()):
        sel = keep_pix.nonzero().squeeze(1)
        remap = torch.full((P,), -1, dtype=torch.int64, device=device)
        remap[sel] = torch.arange(sel.numel(), device=device)
        eok = _g(keep_pix, u) & _g(keep_pix, v)
        u, v = _g(remap, _g(u, eok)), _g(remap, _g(v, eok))
        idx, b, xi, yi, f, val, tp = _g(idx, sel), _g(b, sel), _g(xi, sel), _g(yi, sel), _g(f, sel), _g(val, sel), _g(tp, sel)
        obj = _g(newid, _g(obj, sel))
    n = int(big.sum())
    xd, yd = xi.double(), yi.double()
    t0_obj = _segment_min(tp, obj, n)
    peak_obj = _segment_max(f, obj, n)
    fdflux_obj = _segment_sum(f, obj, n)
    blended = torch.zeros(n, dtype=torch.bool, device=device)
    centre = None
    gathered = None
    if deblend_nthresh > 1 and deblend_cont < 1.0 and n > 0:
        # only objects with >= 2 local maxima of the filtered image can split
        # local maxima among detected 8-neighbours, from the edge list (no full-frame pass)
        not_max = torch.zeros(idx.numel(), dtype=torch.bool, device=device)
        not_max[u[_g(f, u) < _g(f, v)]] = True
        not_max[v[_g(f, v) < _g(f, u)]] = True
        nmax = torch.bincount(obj[~not_max], minlength=n)
        cand = (nmax >= 2) & (torch.bincount(obj, minlength=n) >= 2 * min(minarea, MAXDEBAREA))
        obj, n2, blended, centre, gathered = _deblend(
            obj, n, u, v, xd, yd, f, val, t0_obj, peak_obj, fdflux_obj,
            nthresh=deblend_nthresh, mincont=deblend_cont, minarea=minarea, candidates=cand,
        )
        if n2 != n:
            # objects that were split leave empty ids: compact and carry per-object data along
            present = torch.bincount(obj, minlength=n2) > 0
            t0_full = torch.cat([t0_obj, _segment_min(tp, obj, n2)[n:]])
            newid = torch.cumsum(present.long(), 0) - 1
            obj = _g(newid, obj)
            t0_obj = _g(t0_full, present)
            blended = _g(blended, present)
            centre = (centre[0][present], centre[1][present])
            n = int(present.sum())
    # object order: batch index, then first raster pixel (SExtractor-like numbering per image)
    first = _segment_min(idx.double(), obj, n).long()
    order = _argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=device)
    obj = _g(rank, obj)
    t0_obj, blended = _g(t0_obj, order), _g(blended, order)
    if centre is not None:
        centre = (centre[0][order], centre[1][order])
    bobj = torch.zeros(n, dtype=torch.int64, device=device).scatter_(0, obj, b)
    # analysis of the final objects at the detection threshold ("robust" centre for deblended ones)
    an = _analyse(obj, n, xd, yd, f, val, t0_obj)
    if centre is not None and bool(blended.any()):
        an_r = _analyse(obj, n, xd, yd, f, val, t0_obj, centre=(torch.where(blended, centre[0], an["mx"]), torch.where(blended, centre[1], an["my"])))
        an = an_r
    ate = torch.zeros(n, dtype=torch.bool, device=device)
    if clean and n > 1:
        mthresh = _mthresh(f - tp, obj, n, minarea, gathered)
        alive, master = _clean(bobj, an, t0_obj, mthresh, clean_param, H, W)
        # follow master chains to a survivor
        for _ in range(64):
            nxt = _g(master, master)
            if torch.equal(nxt, master):
                break
            master = nxt
        obj = _g(master, obj)
        ate[master[~alive]] = True
        newid = torch.cumsum(alive.long(), 0) - 1
        obj = _g(newid, obj)
        sel_o = alive.nonzero().squeeze(1)
        t0_obj, blended, bobj, ate = _g(t0_obj, sel_o), _g(blended, sel_o), _g(bobj, sel_o), _g(ate, sel_o)
        an = {k: _g(vv, sel_o) for k, vv in an.items()}
        n = sel_o.numel()
        # merged victims add their pixels (SExtractor mergeobject adds fluxes, keeps the centre)
        an["fdflux"] = _segment_sum(f, obj, n)
        an["fdnpix"] = torch.bincount(obj, minlength=n).to(torch.float64)
    # labels 1..n per image
    counts = torch.bincount(bobj, minlength=B)
    start = torch.cumsum(counts, 0) - counts
    label = torch.arange(n, device=device) - _g(start, bobj) + 1
    seg = None
    if dense:
        seg = torch.zeros(B * HW, dtype=torch.int64, device=device)
        seg.scatter_(0, idx, _g(label, obj))
        seg = seg.view(B, 1, H, W)
    xmin = _segment_min(xd, obj, n).long()
    xmax = _segment_max(xd, obj, n).long()
    ymin = _segment_min(yd, obj, n).long()
    ymax = _segment_max(yd, obj, n).long()
    return dict(
        segmentation=seg,
        detected=det_idx,
        pixels=idx,
        pixel_row=obj,
        pixel_filtered=f,
        batch_index=bobj,
        label=label,
        blended=blended,
        thresh=t0_obj.to(image.dtype),
        xmin=xmin, xmax=xmax, ymin=ymin, ymax=ymax,
        cpeak=_segment_max(f, obj, n).to(image.dtype),
        cflux=an["fdflux"].to(image.dtype),
        mx=an["mx"].to(image.dtype),
        my=an["my"].to(image.dtype),
        isophotal=_overrides(an, blended, ate),
        filtered=filt,
    )


def _overrides(an: dict, blended: Tensor, ate: Tensor) -> dict:
    """What SExtractor fixes before the final segmentation exists (NaN = measure on the segmentation).

    ``x, y``: barycentre of deblended objects (their branch core) and of objects that swallowed
    CLEANed neighbours (their own pixels); ``x2, y2, xy, npix``: moments (before the singularity
    correction) and ISOAREA of the latter, from their own pixels.
    """
    nan = torch.full_like(an["mx"], math.nan)
    keep_c = blended | ate
    return dict(
        x=torch.where(keep_c, an["mx"], nan), y=torch.where(keep_c, an["my"], nan),
        x2=torch.where(ate, an["x2raw"], nan), y2=torch.where(ate, an["y2raw"], nan),
        xy=torch.where(ate, an["xyraw"], nan), npix=torch.where(ate, an["dnpix"], nan),
    )


def isophotal_moments(image: Tensor, segmentation: Tensor, filtered: Optional[Tensor] = None) -> dict:
    """Minimal isophotal measurements on a fixed segmentation (used when photometry.py is absent).

    Barycentre ``x, y`` (0-based), second moments ``x2, y2, xy``, ``a, b, theta`` (degrees),
    ``npix``, ``peak`` and ``flux_iso`` over each label's pixels. Moments are weighted by the
    ``filtered`` detection image when given (SExtractor 2.x computes X_IMAGE so: checked on sep's
    image.cat), else by ``image``; ``flux_iso``/``peak`` use ``image``. Objects are ordered by
    (batch index, label). Differentiable w.r.t. ``image``.
    """
    B, _, H, W = image.shape
    segf = segmentation.reshape(-1)
    idx = (segf > 0).nonzero().squeeze(1)
    lab = _g(segf, idx)
    bb = idx // (H * W)
    nper = torch.zeros(B, dtype=torch.int64, device=image.device).scatter_reduce_(0, bb, lab, reduce="amax")
    start = torch.cumsum(nper, 0) - nper
    o = _g(start, bb) + lab - 1
    n = int(nper.sum())
    v = image.reshape(-1).index_select(0, idx).to(torch.float64)
    wgt = v if filtered is None else filtered.reshape(-1).index_select(0, idx).to(torch.float64)
    rem = idx % (H * W)
    y = (rem // W).double()
    x = (rem % W).double()
    x0 = _segment_min(x, o, n)
    y0 = _segment_min(y, o, n)
    xr, yr = x - _g(x0, o), y - _g(y0, o)
    s = _segment_sum(v, o, n)
    sw = _segment_sum(wgt, o, n)
    sd = torch.where(sw != 0, sw, torch.ones_like(sw))
    mx = _segment_sum(wgt * xr, o, n) / sd
    my = _segment_sum(wgt * yr, o, n) / sd
    x2 = _segment_sum(wgt * xr * xr, o, n) / sd - mx * mx
    y2 = _segment_sum(wgt * yr * yr, o, n) / sd - my * my
    xy = _segment_sum(wgt * xr * yr, o, n) / sd - mx * my
    singular = x2 * y2 - xy * xy < 0.00694
    x2 = torch.where(singular, x2 + 0.0833333, x2)
    y2 = torch.where(singular, y2 + 0.0833333, y2)
    d = x2 - y2
    temp = torch.sqrt(0.25 * d * d + xy * xy)
    a = torch.sqrt((0.5 * (x2 + y2) + temp).clamp_min(0))
    b = torch.sqrt((0.5 * (x2 + y2) - temp).clamp_min(0))
    theta = torch.rad2deg(0.5 * torch.atan2(2 * xy, d))
    dt = image.dtype
    return dict(
        x=(mx + x0).to(dt), y=(my + y0).to(dt), x2=x2.to(dt), y2=y2.to(dt), xy=xy.to(dt),
        a=a.to(dt), b=b.to(dt), theta=theta.to(dt),
        npix=torch.bincount(o, minlength=n), peak=_segment_max(v, o, n).to(dt), flux_iso=s.to(dt),
    )


# ----------------------------------------------------------------------------------------------
# the catalog
# ----------------------------------------------------------------------------------------------
# our column -> (SExtractor column, add 1 for FITS 1-based pixel convention)
SEXTRACTOR_COLUMNS = {
    "number": ("NUMBER", False),
    "batch_index": ("BATCH_INDEX", False),
    "x": ("X_IMAGE", True),
    "y": ("Y_IMAGE", True),
    "xwin": ("XWIN_IMAGE", True),
    "ywin": ("YWIN_IMAGE", True),
    "xpeak": ("XPEAK_IMAGE", True),
    "ypeak": ("YPEAK_IMAGE", True),
    "xmin": ("XMIN_IMAGE", True),
    "xmax": ("XMAX_IMAGE", True),
    "ymin": ("YMIN_IMAGE", True),
    "ymax": ("YMAX_IMAGE", True),
    "x2": ("X2_IMAGE", False),
    "y2": ("Y2_IMAGE", False),
    "xy": ("XY_IMAGE", False),
    "errx2": ("ERRX2_IMAGE", False),
    "erry2": ("ERRY2_IMAGE", False),
    "errxy": ("ERRXY_IMAGE", False),
    "a": ("A_IMAGE", False),
    "b": ("B_IMAGE", False),
    "theta": ("THETA_IMAGE", False),
    "cxx": ("CXX_IMAGE", False),
    "cyy": ("CYY_IMAGE", False),
    "cxy": ("CXY_IMAGE", False),
    "npix": ("ISOAREA_IMAGE", False),
    "peak": ("FLUX_MAX", False),
    "flux_iso": ("FLUX_ISO", False),
    "fluxerr_iso": ("FLUXERR_ISO", False),
    "flux_aper": ("FLUX_APER", False),
    "fluxerr_aper": ("FLUXERR_APER", False),
    "kron_radius": ("KRON_RADIUS", False),
    "flux_auto": ("FLUX_AUTO", False),
    "fluxerr_auto": ("FLUXERR_AUTO", False),
    "flux_radius": ("FLUX_RADIUS", False),
    "thresh": ("THRESHOLD", False),
    "flags": ("FLAGS", False),
}


class _LazySegmentation:
    """A segmentation map kept as its labelled pixels (sorted flat indices over (B, H, W) and their
    labels) and made into the dense (B,1,H,W) int64 map only when asked for: at 4096^2 the dense map
    is 128 MB of int64 that catalogues alone never need."""

    def __init__(self, pixels: Tensor, labels: Tensor, shape):
        self.pixels, self.labels, self.shape = pixels, labels, tuple(shape)
        self._dense = None

    def dense(self) -> Tensor:
        if self._dense is None:
            seg = torch.zeros(math.prod(self.shape), dtype=torch.int64, device=self.pixels.device)
            seg.index_put_((self.pixels,), self.labels)
            self._dense = seg.view(self.shape)
        return self._dense


def rows_of_image(batch_index: Tensor, index: int):
    """The rows whose ``batch_index`` equals ``index``, as an indexer for dimension 0.

    A ``slice`` when those rows are contiguous (the usual case: catalogs are written image by image,
    and a batch of one holds only rows of image 0), so that indexing gives views instead of
    copies; otherwise the boolean row mask.
    """
    hit = batch_index.reshape(-1) == index
    n = int(hit.sum())
    if n == hit.numel():
        return slice(None)
    if n == 0:
        return slice(0, 0)
    first = int(hit.to(torch.uint8).argmax())
    if bool(hit[first:first + n].all()):
        return slice(first, first + n)
    return hit


class Catalog:
    """Sources of a batch of images as flat 1-D tensors (one row per source) plus the segmentation.

    ``columns`` maps names to tensors whose first axis is the source axis (``flux_aper`` is
    (N, n_apertures)); ``batch_index`` (N,) int64 says which image a row belongs to and ``label``
    (N,) its value in ``segmentation`` (B,1,H,W) int64 (1..n per image, 0 = sky). Rows are ordered
    by (batch_index, label). Pixel coordinates are 0-based (x = column, y = row); only
    :meth:`to_table` switches to SExtractor's 1-based ``X_IMAGE`` etc. Columns are reachable as
    attributes (``cat.x``) or items (``cat["x"]``). ``SourceExtractor`` keeps the segmentation as
    its labelled pixels and makes the dense map on first access of ``segmentation``.
    """

    def __init__(self, columns: dict, segmentation):
        if "batch_index" not in columns:
            raise ValueError("columns must hold 'batch_index'")
        n = columns["batch_index"].shape[0]
        for k, v in columns.items():
            if v.shape[0] != n:
                raise ValueError(f"column {k!r} has {v.shape[0]} rows, batch_index has {n}")
        self.columns = dict(columns)
        self._segmentation = segmentation

    @property
    def segmentation(self) -> Tensor:
        """(B,1,H,W) int64 labels (1..n per image, 0 = sky)."""
        seg = self._segmentation
        return seg.dense() if isinstance(seg, _LazySegmentation) else seg

    @segmentation.setter
    def segmentation(self, value) -> None:
        self._segmentation = value

    def __len__(self) -> int:
        return int(self.columns["batch_index"].shape[0])

    def __getattr__(self, name):
        cols = self.__dict__.get("columns")
        if cols is not None and name in cols:
            return cols[name]
        raise AttributeError(name)

    def __getitem__(self, key):
        if isinstance(key, str):
            return self.columns[key]
        return Catalog({k: v[key] for k, v in self.columns.items()}, self._segmentation)

    def __contains__(self, name) -> bool:
        return name in self.columns

    def keys(self):
        return self.columns.keys()

    def __repr__(self) -> str:
        return f"Catalog({len(self)} sources, columns={list(self.columns)})"

    def to(self, *args, **kwargs) -> "Catalog":
        return Catalog({k: v.to(*args, **kwargs) for k, v in self.columns.items()}, self.segmentation.to(*args, **kwargs))

    def select(self, batch_index: int) -> "Catalog":
        """Rows of one image (views, not copies, when its rows are contiguous, as detection writes them)."""
        return self[rows_of_image(self.columns["batch_index"], batch_index)]

    def to_table(self, batch_index: Optional[int] = None):
        """An astropy ``Table`` with SExtractor column names (``X_IMAGE`` etc. 1-based, as SExtractor writes them).

        Columns without a SExtractor name keep their own (upper-cased) name. Writable as ECSV or
        FITS binary table. ``batch_index`` selects one image.
        """
        from astropy.table import Table

        cat = self if batch_index is None else self.select(batch_index)
        t = Table()
        for k, v in cat.columns.items():
            name, one_based = SEXTRACTOR_COLUMNS.get(k, (k.upper(), False))
            a = v.detach().cpu()
            if a.dtype == torch.bool:
                a = a.to(torch.uint8)
            a = a.numpy()
            if one_based:
                a = a + 1
            if a.ndim == 2 and a.shape[1] == 1:
                a = a[:, 0]
            t[name] = a
        return t

    def write(self, path, overwrite: bool = False, **kwargs) -> None:
        """Write :meth:`to_table` (format from the extension: ``.ecsv``, ``.fits``...)."""
        self.to_table().write(str(path), overwrite=overwrite, **kwargs)


def _photometry_module():
    try:
        return importlib.import_module("astroprep_torch.photometry")
    except ImportError:
        return None


class SourceExtractor(nn.Module):
    """SExtractor-style source extraction on background-subtracted images.

    Args:
        thresh: detection threshold in units of the background rms (``DETECT_THRESH``).
        minarea: minimum number of pixels above threshold (``DETECT_MINAREA``).
        filter_kernel: ``"default"`` (SExtractor's default.conv), a 2-D tensor/list, or ``None``.
        deblend_nthresh, deblend_cont: ``DEBLEND_NTHRESH``, ``DEBLEND_MINCONT``.
        clean, clean_param: ``CLEAN``, ``CLEAN_PARAM``.
        phot_apertures: aperture *diameters* in pixels (``PHOT_APERTURES``).
        kron_fact, min_radius: ``PHOT_AUTOPARAMS``.
        saturation: ``SATUR_LEVEL`` in the units of ``image + background`` (flag 4), or ``None``.
        gain: e-/ADU for Poisson terms of the flux errors (``None`` or 0: background noise only).
        winpos_max_radius: cap (px) of the XWIN window radius (``photometry.measure``'s
            ``winpos_max_radius``; ``None`` = SExtractor's uncapped window): bounds the cost of huge
            objects (saturated stars, halos); capped objects get FLAGS 16.

    ``forward(image, rms, mask=None, *, background=None) -> Catalog``: ``image`` (B,1,H,W)
    background-subtracted; ``rms`` the background rms map (B,1,H,W), one value per image (B,) or a
    float; ``mask`` bool (True = bad); ``background`` (optional) is only used to compare raw pixel
    values with ``saturation``; ``saturated`` (optional bool (B,1,H,W)) flags (4) the objects that touch it.
    See the module docstring for the algorithm.

    Noise semantics: SExtractor without a weight map (``WEIGHT_TYPE NONE``, its default) thresholds
    the filtered image at ``thresh`` x ONE global background RMS per image (the median of its rms
    meshes, the "RMS" it prints; :func:`astroprep_torch.background.global_rms`) and uses that value
    for every error: pass that scalar (or ``(B,)`` tensor) to reproduce SExtractor's catalog.  Passing
    an rms MAP instead thresholds every pixel at ``thresh`` x its local rms and uses the map in the
    errors, as SExtractor does with ``WEIGHT_TYPE BACKGROUND`` or ``MAP_RMS``: where the local rms is
    below the global value (sky-dominated regions of a frame with a brighter corner, say) more faint
    pixels pass and more objects are found, and fewer where it is above (near bright stars, whose
    light raises the mesh rms).  ``astroprep extract`` passes the global value (configs/pipeline/
    extract_only.yaml), ``astroprep extract sex=<file.sex>`` follows the file's WEIGHT_TYPE.
    """

    def __init__(
        self,
        thresh: float = 1.5,
        minarea: int = 5,
        filter_kernel="default",
        deblend_nthresh: int = 32,
        deblend_cont: float = 0.005,
        clean: bool = True,
        clean_param: float = 1.0,
        phot_apertures: Sequence[float] = (10.0,),
        kron_fact: float = 2.5,
        min_radius: float = 3.5,
        saturation: Optional[float] = None,
        gain: Optional[float] = None,
        mask_type: str = "correct",
        flux_fracs: Sequence[float] = (0.5,),
        autoapers: Sequence[float] = (0.0, 0.0),
        winpos_max_radius: Optional[float] = 128.0,
    ):
        super().__init__()
        if thresh <= 0:
            raise ValueError(f"thresh must be > 0, got {thresh}")
        if int(minarea) < 1:
            raise ValueError(f"minarea must be >= 1, got {minarea}")
        if int(deblend_nthresh) < 1:
            raise ValueError(f"deblend_nthresh must be >= 1, got {deblend_nthresh}")
        if not 0.0 <= deblend_cont <= 1.0:
            raise ValueError(f"deblend_cont must be in [0, 1], got {deblend_cont}")
        if clean_param <= 0:
            raise ValueError(f"clean_param must be > 0, got {clean_param}")
        self.thresh = float(thresh)
        self.minarea = int(minarea)
        if filter_kernel is not None and not isinstance(filter_kernel, str):
            filter_kernel = torch.as_tensor(filter_kernel, dtype=torch.float64)
        self.filter_kernel = filter_kernel
        self.deblend_nthresh = int(deblend_nthresh)
        self.deblend_cont = float(deblend_cont)
        self.clean = bool(clean)
        self.clean_param = float(clean_param)
        self.phot_apertures = tuple(float(a) for a in (phot_apertures if isinstance(phot_apertures, (list, tuple)) else [phot_apertures]))
        self.kron_fact = float(kron_fact)
        self.min_radius = float(min_radius)
        self.saturation = None if saturation is None else float(saturation)
        self.gain = None if not gain else float(gain)
        if mask_type not in ("correct", "blank", "none"):
            raise ValueError(f"mask_type must be 'correct', 'blank' or 'none', got {mask_type!r}")
        self.mask_type = mask_type
        self.flux_fracs = tuple(float(v) for v in flux_fracs)
        self.autoapers = tuple(float(v) for v in autoapers)
        self.winpos_max_radius = None if winpos_max_radius is None else float(winpos_max_radius)

    def extra_repr(self) -> str:
        return (
            f"thresh={self.thresh}, minarea={self.minarea}, deblend_nthresh={self.deblend_nthresh}, "
            f"deblend_cont={self.deblend_cont}, clean={self.clean}, clean_param={self.clean_param}"
        )

    @adapt_to_load
    def forward(self, image: Tensor, rms, mask: Optional[Tensor] = None, *, background: Optional[Tensor] = None,
                saturated: Optional[Tensor] = None) -> Catalog:
        check_image(image, "image", channels=1)
        mask = check_mask(mask, image)
        mask = check_rms(rms, image, mask)
        if not all_finite(image):  # unmasked NaN/inf pixels are masked here, for photometry too
            mask = bad_pixels(image, mask)
        B, _, H, W = image.shape
        det = detect_sources(
            image, rms, mask,
            thresh=self.thresh, minarea=self.minarea, filter_kernel=self.filter_kernel,
            deblend_nthresh=self.deblend_nthresh, deblend_cont=self.deblend_cont,
            clean=self.clean, clean_param=self.clean_param, dense=False,
        )
        seg = _LazySegmentation(det["pixels"], _g(det["label"], det["pixel_row"]), (B, 1, H, W))
        cols = {"batch_index": det["batch_index"], "number": det["label"]}
        phot = _photometry_module()
        meas = None
        if phot is not None and hasattr(phot, "measure"):
            rms_map = _noise_map(rms, image)  # a view: thresholds are made where they are used
            sparse = {k: det[k] for k in ("pixels", "pixel_row", "pixel_filtered", "detected", "batch_index", "label")}
            meas = phot.measure(
                image, None, rms_map,
                thresh_nsigma=self.thresh,
                phot_apertures=self.phot_apertures, kron_fact=self.kron_fact, min_radius=self.min_radius,
                autoapers=self.autoapers, flux_fracs=self.flux_fracs,
                gain=self.gain, mask=mask, mask_type=self.mask_type,
                saturation=self.saturation, background=background,
                isophotal=det["isophotal"], blended=det["blended"], _sparse=sparse,
                winpos_max_radius=self.winpos_max_radius,
            )
        if meas is None:
            meas = isophotal_moments(image, seg.dense(), filter_image(image, self.filter_kernel))
        for k in ("xmin", "xmax", "ymin", "ymax"):
            cols[k] = det[k]
        cols.update({k: v for k, v in meas.items() if k not in ("batch_index", "label", "flags")})
        cols["thresh"] = det["thresh"]
        flags = torch.zeros(len(det["label"]), dtype=torch.int64, device=image.device)
        if "flags" in meas:
            flags |= meas["flags"].to(torch.int64) & ~FLAG_BLENDED
        flags |= torch.where(det["blended"], FLAG_BLENDED, 0)
        trunc = (det["xmin"] == 0) | (det["ymin"] == 0) | (det["xmax"] == W - 1) | (det["ymax"] == H - 1)
        flags |= torch.where(trunc, FLAG_TRUNCATED, 0)
        if self.saturation is not None:
            pix = det["pixels"]
            raw = image.reshape(-1).index_select(0, pix).double()
            if background is not None:
                bk = torch.as_tensor(background, dtype=image.dtype, device=image.device)
                if bk.dim() == 4:
                    bb = pix // (H * W) if bk.shape[0] > 1 else torch.zeros_like(pix)
                    rem = pix % (H * W)
                    yy = rem // W if bk.shape[2] > 1 else torch.zeros_like(pix)
                    xx = rem % W if bk.shape[3] > 1 else torch.zeros_like(pix)
                    bk = bk[bb, 0, yy, xx]
                raw = (image.reshape(-1).index_select(0, pix) + bk).double()  # the same float sum as image + background
            rmax = _segment_max(raw, det["pixel_row"], len(det["label"]))
            flags |= torch.where(rmax >= self.saturation, FLAG_SATURATED, 0)
        if saturated is not None:  # a saturation / bleed-trail mask (calibrate.saturation_mask): flag 4
            hit = saturated.expand(image.shape).reshape(-1).index_select(0, det["pixels"]).to(image.dtype)
            flags |= torch.where(_segment_max(hit, det["pixel_row"], len(det["label"])) > 0, FLAG_SATURATED, 0)
        cols["flags"] = flags
        return Catalog(cols, seg)


def _object_index(seg: Tensor, pix: Tensor) -> Tensor:
    """Row index (ordered by batch index, label) of the labelled pixels ``pix`` of ``seg``."""
    B, _, H, W = seg.shape
    segf = seg.reshape(-1)
    lab = _g(segf, pix)
    bb = pix // (H * W)
    nper = torch.zeros(B, dtype=torch.int64, device=seg.device).scatter_reduce_(0, bb, lab, reduce="amax")
    start = torch.cumsum(nper, 0) - nper
    return _g(start, bb) + lab - 1
