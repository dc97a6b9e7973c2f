"""Measurements for a fixed segmentation, at SExtractor parity, vectorised over objects.

``measure(image, segmentation, rms, ...)`` returns one row per labelled object (ordered by
``(batch_index, label)``) with SExtractor's isophotal, aperture, AUTO (Kron), FLUX_RADIUS and windowed
measurements.  Standalone helpers (``sum_circle``, ``sum_ellipse``, ``kron_radius``,
``windowed_centroid``) work like sep's functions on batched tensors.

Conventions
-----------
* ``image`` is background-subtracted, ``(B, 1, H, W)``; ``segmentation`` ``(B, 1, H, W)`` int labels,
  0 = no object.  Pixel coordinates are 0-based, ``x`` = column, ``y`` = row (SExtractor's
  ``X_IMAGE`` = ``x + 1``).  ``theta`` in degrees, counter-clockwise from +x (SExtractor).
* Noise: ``rms`` a scalar, a ``(B,)`` tensor or a ``(B, 1, H, W)`` map.  SExtractor without a weight
  map uses ONE global noise value (its "RMS" printed at start-up) for every error and threshold;
  pass that scalar for parity.  A map is used per pixel (as SExtractor does with a weight map).

What SExtractor does (source: analyse.c/scan.c/photom.c/growth.c/winpos.c of SExtractor 2.x), and
therefore what this module does -- these are the points where sep differs:
1. ``X_IMAGE``/``X2_IMAGE``... are moments of the *filtered* (detection-convolved) image over the
   object's segmentation pixels (``preanalyse`` uses ``cdvalue``), not of the measured image.  For a
   deblended object (``OBJ_MERGED``) the barycentre is the one of its deblending *branch* (the pixels
   above the split level), computed before the faint pixels were re-assigned; second moments are then
   taken about that point over all the object's pixels.  That branch barycentre is not recoverable
   from the final segmentation, so the detector passes it in ``isophotal={"x": ..., "y": ...}``.
   Likewise an object that swallowed CLEANed neighbours keeps its own pre-merge moments and ISOAREA
   while its fluxes and segmentation include the merged pixels (``isophotal`` x2/y2/xy/npix).
2. ``FLUX_APER``: pixels within ``r - 0.75 < d < r + 0.75`` of the centre are sub-sampled on a 5x5 grid
   (``APER_OVERSAMP``); inner pixels count fully.  ``aper_subpix=5`` reproduces that; ``aper_subpix=0``
   gives the exact circle/pixel overlap instead.
3. ``KRON_RADIUS``: first moment of the (unfiltered) image within the isophotal ellipse scaled by 6
   (``KRON_NSIG = 3*MARGIN_SCALE``), whole pixels, then ``kron_fact * r1/v1`` floored at
   ``min_radius``.  ``FLUX_AUTO`` sums *whole pixels* whose centre lies in the Kron ellipse (no
   sub-pixel overlap: this is the main reason sep's ``sum_ellipse`` disagrees at the percent level).
4. Neighbours (``MASK_TYPE`` CORRECT, SExtractor's default): every pixel above the detection
   threshold in the filtered image that is not the object's own is "blanked": excluded from the Kron
   moment, and in every flux sum replaced by the pixel symmetric about the centre (or 0 when that one
   is blanked too / outside the image).  ``BLANK`` replaces by 0; ``NONE`` does nothing.
5. ``FLUX_RADIUS`` comes from a 64-bin growth curve out to ``6 a`` (5x5 sub-sampling near bin edges)
   interpolated at ``frac * FLUX_AUTO``.  ``XWIN`` iterates a Gaussian-weighted centroid with
   ``sigma = 2 * hl_radius / 2.35`` (``hl_radius`` = the same growth curve at half of FLUX_AUTO,
   floored at 0.5 px), within ``4 sigma``, 11x11 sub-sampling at the window edge, step factor 2,
   at most 16 iterations, stop when the step < 1e-4 px.  Debian's SExtractor 2.25 then reports the
   isophotal position for a part of the objects (crowded ones); the rule is not in the published
   source we could read.  We revert when the window leaves the object's bounding box, which
   reproduces 2.25 on sep's image and ~90-94 % of m13 (``winpos_revert=False`` reproduces older 2.x).
6. Flags: 1 crowded (> 10 % of the Kron area blanked), 2 blended (``blended`` argument, or inferred:
   the object touches another label), 4 saturated (``peak + background >= saturation``), 8 object
   pixels on the image border, 16 an aperture (APER, AUTO, growth curve or window) box clipped by the
   image border (SExtractor's rounding of the box).  32 (isophotal data incomplete) is only raised by
   SExtractor's strip buffering and never here.

Vectorisation: isophotal quantities are ``index_add`` / ``scatter_reduce`` over the segmentation
pixels.  Aperture-like quantities are computed on per-object square stamps gathered as an
``(n, s, s)`` batch, each stamp just large enough for its aperture (side ``floor(2 reach) + 2``,
origin ``floor(c - reach) + 1``); objects are grouped by stamp side (a Python loop over size buckets
and memory chunks, never over objects).  Stamp rows are gathered as contiguous runs (``index_select``
on a strided view, ~8x faster than an element-wise gather; element-wise fallback near the buffer ends
and under autograd); CORRECT mirror pixels are gathered only for stamps that hold a blanked pixel.
Sub-sampling (apertures, window edge) is applied only to the pixels whose sub-samples can straddle
the circle (the band ``r +- (k-1)/(2k) sqrt 2`` instead of SExtractor's ``r +- 0.75``, same values).
The growth curve is built first from the pixels near a generous guess of the largest requested
radius, which makes every bin inside the guess exact; objects whose first crossing lies beyond the
exact bins are recomputed from all pixels, so the result is the full curve's (its 5x5 sub-samples are
binned in float32: a bin edge can move by ~1e-6 px).  The windowed centroid iterates at most 16 times
over the still moving objects of a stamp size together, with the separable Gaussian folded into one
small ``bmm``, the window edge sub-sampled per stamp row (chord ends computed once per sub-row), and
stamps re-gathered only when the stamp origin changes (or the CORRECT mirror centre, for stamps with
blanked pixels); its geometry, edge sub-sampling (chord ends counted in int16) and stamp cache live in
work buffers reused by every iteration, and the last few still-moving objects of every chunk iterate
together.  (On CPU, fresh temporaries of a few MB cost more than the arithmetic on them: their pages
are faulted in anew each time.)  The detector's own calls pass the segmentation as pixel lists
(``_sparse``): no frame-sized segmentation, filtered image or blank map is made, only the int32
label-of-blanked-pixel frame the stamp gathers read.  Fluxes are linear in the pixel values, so
everything is differentiable w.r.t. the image for a fixed segmentation (the discrete choices -- which
pixels, the Kron factor -- are constants).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import check_image, check_mask
from ._runtime import one_intraop_thread, thread_pool, with_caller_modes

__all__ = [
    "measure",
    "Photometry",
    "sum_circle",
    "sum_ellipse",
    "kron_radius",
    "windowed_centroid",
    "sextractor_filter",
    "DEFAULT_CONV",
    "FLAG_CROWDED",
    "FLAG_BLENDED",
    "FLAG_SATURATED",
    "FLAG_TRUNCATED",
    "FLAG_APER_INCOMPLETE",
    "FLAG_ISO_INCOMPLETE",
]

FLAG_CROWDED = 1
FLAG_BLENDED = 2
FLAG_SATURATED = 4
FLAG_TRUNCATED = 8
FLAG_APER_INCOMPLETE = 16
FLAG_ISO_INCOMPLETE = 32

# SExtractor internal constants (define.h, photom.h, growth.h, winpos.h)
APER_OVERSAMP = 5
KRON_NSIG = 6.0  # 3 * MARGIN_SCALE
CROWD_THRESHOLD = 0.1
GROWTH_NSTEP = 64
GROWTH_OVERSAMP = 5
GROWTH_NSIG = 6.0
GROWTH_MINHLRAD = 0.5
WINPOS_NITERMAX = 16
WINPOS_NSIG = 4.0
WINPOS_OVERSAMP = 11
WINPOS_STEPMIN = 1e-4
WINPOS_FAC = 2.0
#: default cap (px) of the windowed centroid's integration radius ``4 sig`` (huge objects only: a
#: saturated star's halo gives ``sig`` ~100 px, i.e. ~1,000^2-pixel windows iterated 16 times)
WINPOS_MAX_RADIUS = 128.0
EXACT_SUBROWS = 64  # sub-rows with exact chords for the "exact" circular overlap (error << 1e-4)

#: SExtractor's ``default.conv`` (3x3 pyramid, FWHM 2 px), normalised at use.
DEFAULT_CONV = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])

_MASK_TYPES = ("correct", "blank", "none")


# ----------------------------------------------------------------------------------------------
# small helpers
# ----------------------------------------------------------------------------------------------
def sextractor_filter(image: Tensor, kernel: Union[str, Tensor, None] = "default") -> Tensor:
    """Detection filtering as SExtractor: correlation with the kernel normalised to unit sum, zeros
    outside the image.  ``kernel="default"`` is ``default.conv``; ``None`` returns ``image``."""
    if kernel is None:
        return image
    if isinstance(kernel, str):
        if kernel != "default":
            raise ValueError(f"kernel must be 'default', a 2-D tensor or None, got {kernel!r}")
        kernel = DEFAULT_CONV
    if not isinstance(kernel, Tensor) or kernel.dim() != 2:
        raise ValueError("kernel must be a 2-D tensor")
    k = kernel.to(image.dtype).to(image.device)
    s = k.sum()
    k = k / torch.where(s != 0, s, k.abs().sum())
    kh, kw = k.shape
    return F.conv2d(image, k[None, None], padding=(kh // 2, kw // 2))[..., : image.shape[-2], : image.shape[-1]]


def _as_map(value, image: Tensor, name: str) -> Optional[Tensor]:
    """Scalar / (B,) / (B,1,H,W) -> tensor broadcastable to image (B,1,H,W) or None."""
    if value is None:
        return None
    if not isinstance(value, Tensor):
        return torch.full((1, 1, 1, 1), float(value), dtype=image.dtype, device=image.device)
    v = value.to(device=image.device, dtype=image.dtype)
    if v.dim() == 0:
        return v.reshape(1, 1, 1, 1)
    if v.dim() == 1 and v.shape[0] == image.shape[0]:
        return v.reshape(-1, 1, 1, 1)
    if v.dim() == 4:
        try:
            torch.broadcast_shapes(v.shape, image.shape)
        except RuntimeError:
            raise ValueError(f"{name} shape {tuple(v.shape)} does not broadcast to image {tuple(image.shape)}") from None
        if v.shape[-2:] != (1, 1) and v.stride(-1) == 0 and v.stride(-2) == 0:
            v = v[..., :1, :1]  # an expanded per-frame constant: keep it (B, 1, 1, 1), no full-size copies
        return v
    raise ValueError(f"{name} must be a scalar, a (B,) tensor or a (B, 1, H, W) map, got shape {tuple(v.shape)}")


def _at_pixels(map_: Tensor, pidx: Tensor, B: int, H: int, W: int) -> Tensor:
    """Values of a broadcastable (B|1, 1, H|1, W|1) map at flat pixel indices over (B, H, W), without
    expanding the map to a frame-sized copy."""
    if map_.numel() == 1:
        return map_.reshape(1).expand(pidx.shape)
    mb, _, mh, mw = map_.shape
    if (mb, mh, mw) == (B, H, W):
        return map_.reshape(-1).index_select(0, pidx)
    b = pidx // (H * W) if mb > 1 else torch.zeros_like(pidx)
    rem = pidx % (H * W)
    y = rem // W if mh > 1 else torch.zeros_like(pidx)
    x = rem % W if mw > 1 else torch.zeros_like(pidx)
    return map_[b, 0, y, x]


def _per_object(value, map_: Optional[Tensor], bidx: Tensor, ix: Tensor, iy: Tensor):
    """Value of a broadcastable map at integer pixel (ix, iy) of batch bidx."""
    B, _, H, W = map_.shape
    if H == 1 and W == 1:
        return map_.reshape(-1)[bidx if B > 1 else torch.zeros_like(bidx)]
    return map_[bidx if B > 1 else torch.zeros_like(bidx), 0, iy.clamp(0, H - 1), ix.clamp(0, W - 1)]


_MIN_BUCKET = 512  # objects; smaller size buckets are merged upwards
_WINPOS_TAIL = 256  # windowed-centroid stragglers below this count per chunk are iterated together


def _size_buckets(half: Tensor) -> list[tuple[Tensor, int]]:
    """Group objects by the stamp side they need: every side up to 48 exactly, then a few geometric
    sizes.  Python loop over buckets only (one device sync for the sizes)."""
    if half.numel() == 0:
        return []
    sizes = list(range(2, 49)) + [54, 60, 68, 76, 86, 96, 108, 121, 136, 152, 171, 192, 215, 242, 271, 304,
                                  342, 384, 431, 483, 542, 609, 683, 767, 861, 966, 1084, 1217, 1366, 1533,
                                  1721, 1932, 2169, 2435, 2733, 3068, 3444, 3866, 4340, 4871, 5468, 6138,
                                  6890, 7734, 8682, 9746, 10940, 12280, 13785, 15474, 17370]
    sz = torch.tensor(sizes, device=half.device)
    which = torch.bucketize(half.clamp(min=2), sz)
    which = which.clamp(max=len(sizes) - 1)
    out = []
    counts = torch.bincount(which, minlength=len(sizes)).tolist()
    order = torch.argsort(which, stable=True)
    # small buckets are merged into the next larger size (a larger stamp serves any smaller need):
    # fewer, fuller batches (per-op overhead) at the cost of <= 4x the area for those few objects
    pend, pend_n, first, last = [], 0, 0, 0
    start = 0
    for w, n in enumerate(counts):
        if not n:
            continue
        idx, size = order[start : start + n], int(sizes[w])
        start += n
        if pend and size > 2 * first:
            out.append((torch.cat(pend), last))
            pend, pend_n = [], 0
        if not pend:
            first = size
        pend.append(idx)
        pend_n += n
        last = size
        if pend_n >= _MIN_BUCKET:
            out.append((torch.cat(pend), size))
            pend, pend_n = [], 0
    if pend:
        out.append((torch.cat(pend), last))
    return out



_RECT_MIN = 64  # stamp side above which elliptical apertures get rectangular stamps


def _rect_buckets(side_x: Tensor, side_y: Tensor) -> list[tuple[Tensor, int, int]]:
    """``(objects, rows, columns)`` stamp groups for apertures whose x and y extents differ: square
    stamps as :func:`_size_buckets` up to ``_RECT_MIN``; above, rows and columns bucketed separately,
    so that an elongated object (a bleed trail: 50 x 2,000 px) costs its bounding box, not the square
    of its length."""
    out = []
    for sel, s in _size_buckets(torch.maximum(side_x, side_y)):
        if s <= _RECT_MIN:
            out.append((sel, s, s))
            continue
        for sx_sel, sx in _size_buckets(side_x[sel]):
            idx = sel[sx_sel]
            for sy_sel, sy in _size_buckets(side_y[idx]):
                out.append((idx[sy_sel], sy, sx))
    return out

_SPLIT_MIN = 2000  # objects per call below which the stamp stages run on one thread


def _split_run(fn, geo: dict, n: int, workers: int):
    """``fn(geo)`` with the per-object tensors of ``geo`` split into ``workers`` interleaved groups,
    each run by its own thread (the calling thread takes the first; the others come from
    :func:`~astroprep_torch._runtime.thread_pool`); outputs (tuples of tensors with one row per object)
    are put back in the objects' order.  One group when ``workers < 2``, on GPU, or for fewer than
    ``_SPLIT_MIN`` objects per call.  Every object depends only on its own rows, so the results equal
    the one-group run's (up to the summation order inside shared stamp batches)."""
    dev = next(iter(geo.values())).device
    k = min(int(workers), n // max(_SPLIT_MIN // 2, 1))
    if k < 2 or dev.type != "cpu":
        return fn(geo)
    from concurrent.futures import wait

    # interleaved groups (object i to group i % k): each gets the same mix of stamp sizes and of
    # frame regions, so the threads finish together (contiguous halves were ~4% slower at 4096^2)
    parts = [{key: v[i::k] for key, v in geo.items()} for i in range(k)]
    run = with_caller_modes(fn, threads=1)  # one intra-op thread per group, as the caller's

    jobs = [thread_pool(k - 1, name="astroprep-groups").submit(run, p) for p in parts[1:]]
    try:
        res = [run(parts[0])]
    finally:
        wait(jobs)  # no group outlives the call, even when the first one failed
    res += [j.result() for j in jobs]
    out = []
    for j in range(len(res[0])):
        first = res[0][j]
        o = first.new_empty((n, *first.shape[1:]))
        for i in range(k):
            o[i::k] = res[i][j]
        out.append(o)
    return tuple(out)


def _chunks(idx: Tensor, per_obj: int, max_elems: int):
    n = max(1, max_elems // max(per_obj, 1))
    for i in range(0, idx.numel(), n):
        yield idx[i : i + n]


class _Frame:
    """Flattened per-frame data plus stamp gathering."""

    def __init__(self, image, seg, var, blankmap, H, W, mask_type, bseg=None, var_is_rms=False):
        self.img = image.reshape(-1)
        self.var = var  # broadcastable map (B?,1,H?,W?)
        self.var_is_rms = var_is_rms  # ``var`` holds the rms: squared where gathered (no frame-sized square)
        # one gather instead of two: label of blanked pixels, -1 where not blanked (given as ``bseg``
        # by the detector's sparse path)
        if bseg is not None:
            self.bseg = bseg
        elif blankmap is None:
            self.bseg = None
        else:
            self.bseg = seg.reshape(-1).to(torch.int32, copy=True).masked_fill_(~blankmap.reshape(-1), -1)
        self.blank = self.bseg  # not None <=> some pixels are blanked
        self.H, self.W = H, W
        self.B = image.shape[0]
        self.mask_type = mask_type

    def stamps(self, b: Tensor, label: Tensor, cx: Tensor, cy: Tensor, s: int, reach: Tensor, want_var=True,
               sy: Optional[int] = None, reach_y: Optional[Tensor] = None):
        """Square stamps of side ``s`` starting at ``floor(c - reach) + 1`` (``reach`` per object, from
        :func:`_reach`; ``s >= _side(reach)``): they hold every pixel whose centre lies within
        ``reach`` of ``c`` in x and y.  Returns dict of (n, s, s) tensors and the stamp origin; dx/dy
        are pixel-centre offsets from (cx, cy).  With ``sy`` and ``reach_y``, rectangular stamps of
        ``sy`` rows and ``s`` columns: ``reach`` then applies to x and ``reach_y`` to y."""
        H, W = self.H, self.W
        dev = self.img.device
        sy = s if sy is None else sy
        x0 = torch.floor(cx - reach).long() + 1
        y0 = torch.floor(cy - (reach if reach_y is None else reach_y)).long() + 1
        ar = torch.arange(s, device=dev)
        ary = ar if sy == s else torch.arange(sy, device=dev)
        ixr = x0[:, None] + ar  # (n, s) columns
        iyr = y0[:, None] + ary  # (n, sy) rows
        ix = ixr[:, None, :]  # (n, 1, s): broadcast views, no (n, s, s) index arrays
        iy = iyr[:, :, None]  # (n, s, 1)
        valid = ((iyr >= 0) & (iyr < H))[:, :, None] & ((ixr >= 0) & (ixr < W))[:, None, :]
        # row starts of each stamp row in the flat buffer (rows are contiguous runs of s pixels)
        rbase = b[:, None] * (H * W) + iyr.clamp(0, H - 1) * W
        fast = not self.img.requires_grad
        if fast:
            flat = None
            pix, bad = self._runs(self.img, rbase, x0, s)
        else:
            flat = b[:, None, None] * (H * W) + iy.clamp(0, H - 1) * W + ix.clamp(0, W - 1)
            pix = self.img[flat]
        dt = pix.dtype
        fx = (cx.double() - x0.double()).to(dt)
        fy = (cy.double() - y0.double()).to(dt)
        arf = ar.to(dt)
        n = x0.shape[0]
        dx = (arf[None, None, :] - fx[:, None, None]).expand(n, sy, s)
        dy = (ary.to(dt)[None, :, None] - fy[:, None, None]).expand(n, sy, s)
        out = {"pix": pix, "valid": valid, "dx": dx, "dy": dy, "flat": flat, "ix": ix, "iy": iy,
               "x0": x0, "y0": y0, "s": s}
        if self.blank is not None:
            bs = self._runs(self.bseg, rbase, x0, s, bad)[0] if fast else self.bseg[flat]
            masked = (bs >= 0) & (bs != label.to(bs.dtype)[:, None, None]) & valid
        else:
            masked = torch.zeros_like(valid)
        out["masked"] = masked
        if want_var:
            out["var"] = self._var_at(b, iy, ix, iyr, x0, valid)
        return out

    def _runs(self, buf: Tensor, rbase: Tensor, c0: Tensor, s: int, bad=None):
        """``buf[rbase[n, i] + c0[n] + j]`` as ``(n, s, s)`` by row-run gathers (:meth:`_rows`); the
        few rows whose run leaves the flat buffer (frame corners) are gathered element-wise with
        clamped columns instead, as the element-wise path does. Columns outside the frame hold
        garbage either way (masked by the callers). Returns the stamps and the bad rows (reusable
        for another buffer with the same geometry)."""
        rstart = rbase + c0[:, None]
        if bad is None:
            oob = (rstart < 0) | (rstart > buf.numel() - s)
            bad = oob.nonzero() if bool(oob.any()) else None
        if bad is None:
            return self._rows(buf, rstart, s), None
        out = self._rows(buf, rstart.clamp(0, buf.numel() - s), s)
        oi, ri = bad[:, 0], bad[:, 1]
        cols = (c0[oi][:, None] + torch.arange(s, device=buf.device)).clamp(0, self.W - 1)
        out[oi, ri] = buf[rbase[oi, ri][:, None] + cols]
        return out, bad

    @staticmethod
    def _rows(buf: Tensor, rstart: Tensor, s: int) -> Tensor:
        """``buf[rstart[n, i] + j]`` as ``(n, s, s)``: index_select of contiguous runs on a strided view
        (~8x faster than an element-wise gather).  Values at off-image positions (runs that wrap to the
        neighbouring row) are garbage and masked by the callers."""
        view = buf.as_strided((buf.numel() - s + 1, s), (1, 1))
        return view.index_select(0, rstart.reshape(-1)).view(rstart.shape[0], rstart.shape[1], s)

    def _var_at(self, b, iy, ix, iyr, x0, valid):
        v = self.var
        B, _, H, W = v.shape
        bb = b if B > 1 else torch.zeros_like(b)
        shape = (ix.shape[0], iy.shape[1], ix.shape[2])
        if H == 1 and W == 1:
            g = v.reshape(-1)[bb][:, None, None]
        elif not v.requires_grad and v.is_contiguous() and v.shape[1] == 1 and (H, W) == (self.H, self.W):
            # row-run gathers as for the image (~8x faster than the element-wise gather); the
            # off-frame pixels (garbage from the neighbouring row) are zeroed: every caller weights
            # them by 0, and 0 * a non-finite garbage value would not be 0
            rbase = bb[:, None] * (H * W) + iyr.clamp(0, H - 1) * W
            g = self._runs(v.reshape(-1), rbase, x0, ix.shape[-1])[0].masked_fill_(~valid, 0.0)
        else:
            g = v[bb[:, None, None], 0, iy.clamp(0, self.H - 1), ix.clamp(0, self.W - 1)]
        return (g * g if self.var_is_rms else g).expand(shape)

    def corrected(self, st: dict, b: Tensor, label: Tensor, cx: Tensor, cy: Tensor) -> Tensor:
        """Pixel values with blanked neighbours replaced as SExtractor's MASK_TYPE (CORRECT: the pixel
        symmetric about (int)(2*c + 0.49999) - x if it is usable, else 0; BLANK: 0)."""
        pix, masked = st["pix"], st["masked"]
        if self.blank is None or self.mask_type == "none":
            return torch.where(st["valid"], pix, torch.zeros_like(pix))
        zero = torch.zeros_like(pix)
        base = torch.where(st["valid"] & ~masked, pix, zero)
        if self.mask_type == "blank":
            return base
        # CORRECT: mirrored pixels only for the stamps that hold a blanked pixel
        sel = torch.nonzero(masked.flatten(1).any(1)).flatten()
        if sel.numel() == 0:
            return base
        H, W = self.H, self.W
        s = pix.shape[-1]
        b, label, x0 = b[sel], label[sel], st["x0"][sel]
        cxm = torch.trunc(2.0 * cx[sel].double() + 0.49999).long()
        cym = torch.trunc(2.0 * cy[sel].double() + 0.49999).long()
        x2 = cxm[:, None, None] - st["ix"][sel]  # (m, 1, s)
        y2 = cym[:, None, None] - st["iy"][sel]  # (m, s, 1)
        ok = ((x2 >= 0) & (x2 < W)) & ((y2 >= 0) & (y2 < H))
        # mirrored stamp: row y2 = cym - iy, columns cxm - x0 - j (descending) = reversed run
        rbase2 = b[:, None] * (H * W) + y2[:, :, 0].clamp(0, H - 1) * W
        if not self.img.requires_grad:
            c2 = cxm - x0 - (s - 1)
            mpix, bad = self._runs(self.img, rbase2, c2, s)
            mpix = mpix.flip(-1)
            bs = self._runs(self.bseg, rbase2, c2, s, bad)[0].flip(-1)
        else:
            flat2 = b[:, None, None] * (H * W) + y2.clamp(0, H - 1) * W + x2.clamp(0, W - 1)
            mpix = self.img[flat2]
            bs = self.bseg[flat2]
        mblank = (bs >= 0) & (bs != label.to(bs.dtype)[:, None, None])
        rep = torch.where(ok & ~mblank, mpix, torch.zeros_like(mpix))
        return base.index_put((sel,), torch.where(masked[sel], rep, base[sel]))


def _wbuf(bufs: dict, name: str, shape, dtype, device) -> Tensor:
    """The work buffer ``name`` of ``bufs`` viewed as ``shape`` (made, or remade larger, on demand)."""
    n = math.prod(shape)
    b = bufs.get(name)
    if b is None or b.numel() < n or b.dtype != dtype or b.device != torch.device(device):
        b = bufs[name] = torch.empty(max(n, 1024), dtype=dtype, device=device)
    return b[:n].view(shape)


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


def _box_flag_round(c: Tensor, lim: Tensor, size: int) -> Tensor:
    """SExtractor ``RINT`` box (AUTO): xmin = RINT(c - lim) < 0 or RINT(c + lim) + 1 > size."""
    return (torch.floor(c - lim + 0.5) < 0) | (torch.floor(c + lim + 0.5) + 1 > size)


def _box_flag_trunc(c: Tensor, r: Tensor, size: int) -> Tensor:
    """SExtractor circular box: xmin = (int)(c - r + 0.499999) < 0 or (int)(c + r + 1.499999) > size."""
    return (torch.trunc(c - r + 0.499999) < 0) | (torch.trunc(c + r + 1.499999) > size)


def _ellipse_extent(cxx, cyy, cxy, k):
    dxl = cxx - cxy * cxy / (4.0 * cyy)
    dyl = cyy - cxy * cxy / (4.0 * cxx)
    dxl = torch.where(dxl > 0, k / torch.sqrt(torch.clamp(dxl, min=1e-30)), torch.zeros_like(dxl))
    dyl = torch.where(dyl > 0, k / torch.sqrt(torch.clamp(dyl, min=1e-30)), torch.zeros_like(dyl))
    return dxl, dyl


def _reach(r: Tensor) -> Tensor:
    """Stamp reach (float64): ``r`` plus a rounding margin, so that a pixel beyond the reach is
    strictly outside ``r`` whatever the float32 rounding of the offsets."""
    r = torch.nan_to_num(r.double(), nan=1.0, posinf=1.0e4).clamp(min=0.0, max=4000.0)
    return r * (1.0 + 1e-5) + 1e-4


def _side(reach: Tensor) -> Tensor:
    """Stamp side holding the pixel centres in ``(c - reach, c + reach)`` from ``floor(c - reach) + 1``
    (at most ``2 reach + 1`` of them)."""
    return torch.floor(2.0 * reach).long() + 2


# ----------------------------------------------------------------------------------------------
# stages on stamps (each works on a set of objects given by index tensor `sel`)
# ----------------------------------------------------------------------------------------------
def _stage_aper(fr: _Frame, o: dict, radii: Sequence[float], subpix: int, max_elems: int, gain):
    N = o["x"].numel()
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
            b, lab, cx, cy = o["bi"][c], o["label"][c], o["x"][c], o["y"][c]
            st = fr.stamps(b, lab, cx, cy, s, reach[c])
            pix = fr.corrected(st, b, lab, cx, cy)
            vmask = st["valid"].to(dt)
            for i, r in enumerate(radii):
                rr = torch.full((c.numel(), 1, 1), float(r), dtype=dt, device=dev)
                fr_ = _circle_fraction(st["dx"], st["dy"], rr, subpix) * vmask
                flux[c, i] = (fr_ * pix).sum((-1, -2))
                var[c, i] = (fr_ * st["var"]).sum((-1, -2))
                area[c, i] = fr_.sum((-1, -2))
    return flux, var, area


def _stage_kron(fr: _Frame, o: dict, kron_fact: float, min_radius: float, autoaper0: float, max_elems: int,
                nsig: float = KRON_NSIG, raw: bool = False):
    """Kron factor (SExtractor computeautoflux step 1).  Returns kronfactor, area, areab."""
    N = o["x"].numel()
    dt = fr.img.dtype
    dev = fr.img.device
    r1 = torch.zeros(N, dtype=torch.float64, device=dev)
    v1 = torch.zeros(N, dtype=torch.float64, device=dev)
    area = torch.zeros(N, dtype=torch.long, device=dev)
    areab = torch.zeros(N, dtype=torch.long, device=dev)
    ell = nsig * torch.sqrt(o["a"] * o["bm"]) > autoaper0 / 2.0
    one = torch.ones_like(o["cxx"])
    cxx = torch.where(ell, o["cxx"], one)
    cyy = torch.where(ell, o["cyy"], one)
    cxy = torch.where(ell, o["cxy"], torch.zeros_like(one))
    dxl, dyl = _ellipse_extent(cxx, cyy, cxy, nsig)
    circ = torch.full_like(dxl, autoaper0 / 2.0)
    dxl = torch.where(ell, dxl, circ)
    dyl = torch.where(ell, dyl, circ)
    klim2 = torch.where(ell, torch.full_like(dxl, nsig ** 2), circ * circ)
    flag = _box_flag_round(o["x"], dxl, fr.W) | _box_flag_round(o["y"], dyl, fr.H)
    rx, ry = _reach(dxl), _reach(dyl)
    for sel, sy, s in _rect_buckets(_side(rx), _side(ry)):
        for c in _chunks(sel, sy * s * 4, max_elems):
            b, lab = o["bi"][c], o["label"][c]
            st = fr.stamps(b, lab, o["x"][c], o["y"][c], s, rx[c], want_var=False, sy=sy, reach_y=ry[c])
            dx, dy = st["dx"], st["dy"]
            r2 = (cxx[c, None, None].to(dt) * dx * dx + cyy[c, None, None].to(dt) * dy * dy
                  + cxy[c, None, None].to(dt) * dx * dy)
            inside = (r2 <= klim2[c, None, None].to(dt)) & st["valid"]
            good = inside & ~st["masked"]
            pix = torch.where(good, st["pix"], torch.zeros_like(st["pix"])).double()
            r1[c] = (torch.sqrt(torch.clamp(r2, min=0)).double() * pix).sum((-1, -2))
            v1[c] = pix.sum((-1, -2))
            area[c] = inside.sum((-1, -2))
            areab[c] = (inside & st["masked"]).sum((-1, -2))
    ok = (r1 > 0) & (v1 > 0)
    if raw:
        return torch.where(ok, r1 / torch.where(ok, v1, torch.ones_like(v1)), torch.zeros_like(r1)), flag
    kf = torch.where(ok, kron_fact * r1 / torch.where(ok, v1, torch.ones_like(v1)), torch.zeros_like(r1))
    kf = torch.clamp(kf, min=min_radius)
    kf = torch.where(ok, kf, torch.full_like(kf, min_radius))
    kf = torch.where(area > 0, kf, torch.zeros_like(kf))
    crowded = (area > 0) & (areab.double() / area.clamp(min=1).double() > CROWD_THRESHOLD)
    return kf, area, crowded, flag


def _stage_auto(fr: _Frame, o: dict, kf: Tensor, autoaper1: float, max_elems: int):
    N = o["x"].numel()
    dt = fr.img.dtype
    dev = fr.img.device
    flux = torch.zeros(N, dtype=dt, device=dev)
    var = torch.zeros(N, dtype=dt, device=dev)
    area = torch.zeros(N, dtype=torch.long, device=dev)
    areab = torch.zeros(N, dtype=torch.long, device=dev)
    ell = kf * torch.sqrt(o["a"] * o["bm"]) > autoaper1 / 2.0
    one = torch.ones_like(o["cxx"])
    cxx = torch.where(ell, o["cxx"], one)
    cyy = torch.where(ell, o["cyy"], one)
    cxy = torch.where(ell, o["cxy"], torch.zeros_like(one))
    dxl, dyl = _ellipse_extent(cxx, cyy, cxy, 1.0)
    dxl = torch.where(ell, dxl * kf, torch.full_like(dxl, autoaper1 / 2.0))
    dyl = torch.where(ell, dyl * kf, torch.full_like(dyl, autoaper1 / 2.0))
    klim2 = torch.where(ell, kf * kf, torch.full_like(kf, (autoaper1 / 2.0) ** 2))
    kf_out = torch.where(ell, kf, torch.zeros_like(kf))
    flag = _box_flag_round(o["x"], dxl, fr.W) | _box_flag_round(o["y"], dyl, fr.H)
    active = torch.nonzero(kf > 0).flatten()  # kf == 0 <=> no usable pixel in step 1
    rx, ry = _reach(dxl), _reach(dyl)
    for sel, sy, s in _rect_buckets(_side(rx[active]), _side(ry[active])):
        sel = active[sel]
        for c in _chunks(sel, sy * s * 4, max_elems):
            b, lab, cx, cy = o["bi"][c], o["label"][c], o["x"][c], o["y"][c]
            st = fr.stamps(b, lab, cx, cy, s, rx[c], sy=sy, reach_y=ry[c])
            dx, dy = st["dx"], st["dy"]
            r2 = (cxx[c, None, None].to(dt) * dx * dx + cyy[c, None, None].to(dt) * dy * dy
                  + cxy[c, None, None].to(dt) * dx * dy)
            inside = (r2 <= klim2[c, None, None].to(dt)) & st["valid"]
            pix = fr.corrected(st, b, lab, cx, cy)
            fi = inside.to(dt)
            flux[c] = (fi * pix).sum((-1, -2))
            var[c] = (fi * st["var"]).sum((-1, -2))
            area[c] = inside.sum((-1, -2))
            areab[c] = (inside & st["masked"]).sum((-1, -2))
    crowded = areab.double() > CROWD_THRESHOLD * area.double()
    return flux, var, kf_out, crowded, flag


def _first_crossing(growth: Tensor, tv: Tensor) -> Tensor:
    """Index of the first growth-curve bin >= tv (the last bin when none: SExtractor stops there)."""
    ge = growth.detach() >= tv.detach()[:, None]
    ge[:, -1] = True
    return torch.argmax(ge.to(torch.uint8), dim=1)


def _growth_curve(fr: _Frame, o: dict, idx: Tensor, rsel: Tensor, step: Tensor, max_elems: int) -> Tensor:
    """Cumulative SExtractor growth curve ``(len(idx), 64)`` of objects ``idx`` from the pixels whose
    centre lies within ``rsel`` (per object): whole pixels binned at their centre radius, pixels
    within 0.75 px of a bin edge sub-sampled 5x5 (float32 sub-samples, bin edges move by ~1e-6 px)."""
    dev = fr.img.device
    n_all = idx.numel()
    growth = torch.zeros(n_all, GROWTH_NSTEP, dtype=torch.float64, device=dev)
    if n_all == 0:
        return growth
    rs = rsel[idx]
    reach = _reach(rs + 1e-3)
    sc = 1.0 / GROWTH_OVERSAMP
    off = 0.5 * (sc - 1.0)
    nb = GROWTH_NSTEP + 1  # one overflow bin per object (dropped), avoids boolean compaction
    sub5 = (torch.arange(GROWTH_OVERSAMP, device=dev, dtype=torch.float64) * sc + off).float()
    wb = {}  # work buffers
    for sel, s in _size_buckets(_side(reach)):
        for cl in _chunks(sel, s * s * 8, max_elems):
            c = idx[cl]
            b, lab, cx, cy = o["bi"][c], o["label"][c], o["x"][c], o["y"][c]
            st = fr.stamps(b, lab, cx, cy, s, reach[cl], want_var=False)
            n_ = c.numel()
            dx32, dy32 = st["dx"], st["dy"]
            r2f = dx32 * dx32 + dy32 * dy32
            rc = rs[cl]
            inside = (r2f < ((rc + 1e-3) ** 2).to(r2f.dtype)[:, None, None]) & st["valid"]
            fl = torch.nonzero(inside.view(-1)).flatten()  # flat (object, row, column) ids
            oi = torch.div(fl, s * s, rounding_mode="floor")
            yy = torch.div(fl - oi * (s * s), s, rounding_mode="floor")
            xx = fl - oi * (s * s) - yy * s
            pix = fr.corrected(st, b, lab, cx, cy).reshape(-1).index_select(0, fl)  # run gathers beat per-pixel ones
            # offsets as in _Frame.stamps (same float ops, no gather from the expanded stamps)
            arf = torch.arange(s, device=dev).to(dx32.dtype)
            fxs = (cx.double() - st["x0"].double()).to(dx32.dtype)
            fys = (cy.double() - st["y0"].double()).to(dx32.dtype)
            pdx = (arf.index_select(0, xx) - fxs.index_select(0, oi)).double()
            pdy = (arf.index_select(0, yy) - fys.index_select(0, oi)).double()
            r2 = pdx * pdx + pdy * pdy
            keep = r2 < (rc ** 2)[oi]
            r = torch.sqrt(r2)
            stp = step[c][oi]
            dens = 1.0 / stp
            d = torch.fmod(r, stp)
            over = ((d < 0.75) | (d > stp - 0.75)) & keep
            whole = (~over) & keep
            p = pix.double()
            jw = torch.floor(r * dens).long().clamp(max=GROWTH_NSTEP)
            g = torch.zeros(n_ * nb, dtype=torch.float64, device=dev)
            g.index_add_(0, oi * nb + jw, torch.where(whole, p, torch.zeros_like(p)))
            ov = torch.nonzero(over).flatten()
            if ov.numel():
                m_ = ov.numel()
                sx = pdx.detach()[ov].float()[None, :] + sub5[:, None]  # (5, m); bin indices only
                sy = pdy.detach()[ov].float()[None, :] + sub5[:, None]
                # (5, 5, m): sub-sample major, in reused buffers (fresh temporaries of this size
                # cost more than the arithmetic here: their pages are faulted in anew each time)
                q = torch.add((sy * sy)[:, None, :], (sx * sx)[None, :, :], out=_wbuf(wb, "q", (5, 5, m_), sx.dtype, dev))
                q = torch.sqrt_(q).mul_(dens.detach()[ov].float()).floor_().clamp_(max=GROWTH_NSTEP)
                fl = _wbuf(wb, "fl", (5, 5, m_), torch.int32, dev).copy_(q)
                fl = fl.add_((oi[ov] * nb).to(torch.int32)).view(GROWTH_OVERSAMP ** 2, m_)
                val = p[ov] * (sc * sc)
                for k in range(GROWTH_OVERSAMP ** 2):  # 25 adds of m values: no expanded copy of val
                    g.index_add_(0, fl[k], val)
            growth[cl] = g.reshape(n_, nb)[:, :GROWTH_NSTEP]
    return torch.cumsum(growth, dim=1)


def _stage_growth(fr: _Frame, o: dict, flux_auto: Tensor, fracs: Sequence[float], autoaper0: float,
                  max_elems: int):
    """SExtractor growth curve (64 bins out to 6a) -> flux radii at ``fracs`` and hl_radius."""
    N = o["x"].numel()
    dev = fr.img.device
    rlim = GROWTH_NSIG * o["a"].double()
    rlim = torch.where(rlim < autoaper0, torch.full_like(rlim, autoaper0), rlim)
    rlim = torch.clamp(rlim, min=1e-3)
    raper = rlim + 1.5
    step = rlim / GROWTH_NSTEP
    flag = _box_flag_trunc(o["x"], raper, fr.W) | _box_flag_trunc(o["y"], raper, fr.H)
    # sub-samples lie within 0.5*sqrt(2) of the centre: pixels beyond rlim + 0.71 only feed bins
    # >= GROWTH_NSTEP, which SExtractor drops, so they are skipped (exact); the stamp only needs rcut
    rcut = torch.minimum(raper, rlim + 0.71)
    fa = flux_auto.detach().double()
    # Only the bins up to the first crossing of each fraction matter.  First pass: the pixels within
    # R1 + 0.75 of a guess R1 (a Gaussian profile's radius for the largest fraction, generously
    # scaled); every bin whose outer edge is <= R1 is then exact (a pixel beyond R1 + 0.75 has all its
    # sub-samples beyond R1).  Objects whose first crossing is not among those exact bins are redone
    # over all pixels (second pass), so the result equals the full growth curve.
    fmax = min(max([0.5] + [float(f) for f in fracs]), 0.99)
    r1 = o["a"].double() * (1.25 * math.sqrt(-2.0 * math.log(1.0 - fmax))) + 0.5
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

    def radius_at(tv):
        i = _first_crossing(growth, tv)
        gi = growth.gather(1, i[:, None])[:, 0]
        gp = growth.gather(1, (i - 1).clamp(min=0)[:, None])[:, 0]
        dg = gi - gp
        g0 = growth[:, 0]
        fi = i.double()
        inner = torch.where(dg != 0, fi + (tv - gp) / torch.where(dg != 0, dg, torch.ones_like(dg)), fi)
        first = torch.where(g0 != 0, tv / torch.where(g0 != 0, g0, torch.ones_like(g0)), torch.zeros_like(g0))
        return step * torch.where(i > 0, inner, first)

    fa = flux_auto.double()
    radii = []
    for f in fracs:
        rr = radius_at(f * fa)
        radii.append(torch.minimum(rr, rlim))
    hl = torch.abs(radius_at(0.5 * fa))
    hl = torch.minimum(hl, rlim)
    hl = torch.clamp(hl, min=GROWTH_MINHLRAD)
    fr_ = torch.stack(radii, 1) if radii else torch.zeros(N, 0, dtype=torch.float64, device=dev)
    return fr_, hl, flag


def _stage_winpos(fr: _Frame, o: dict, sig: Tensor, max_elems: int, max_radius: Optional[float] = None):
    """SExtractor's iterative windowed centroid (compute_winpos): Gaussian window of ``sig`` within
    ``4 sig`` (11x11 sub-sampling at the window edge), step factor 2, <= 16 iterations, stop when the
    step < 1e-4 px.  ``max_radius`` (px, None = none) truncates the integration radius ``4 sig`` of
    huge objects (the Gaussian ``sig`` is kept), as SExtractor's window is truncated by its image
    buffer; the objects whose window was truncated are flagged (returned ``flag``, FLAGS 16).  All objects of a stamp size iterate together; the corrected stamps are cached per
    object and re-gathered only when the stamp origin or the CORRECT mirror centre changes.  The
    separable Gaussian is folded into one small ``bmm`` (rows x [gx, gx dx, gx dx^2]) in the image
    dtype; the per-row marginals are then combined in float64."""
    N = o["x"].numel()
    dt = fr.img.dtype
    dev = fr.img.device
    mx = o["x"].double().clone()
    my = o["y"].double().clone()
    sig = sig.double()
    raper = WINPOS_NSIG * sig
    flag = torch.zeros(N, dtype=torch.bool, device=dev)
    if max_radius is not None:
        flag = raper > float(max_radius)
        raper = raper.clamp(max=float(max_radius))
    niter = torch.zeros(N, dtype=torch.long, device=dev)
    wflag = torch.zeros(N, dtype=torch.long, device=dev)
    sc = 1.0 / WINPOS_OVERSAMP
    off = 0.5 * (sc - 1.0)
    ksub = torch.arange(WINPOS_OVERSAMP, device=dev, dtype=dt) * sc + off
    # per-object constants
    rap2_all = (raper * raper).to(dt)
    # sub-samples lie within 5/11 * sqrt(2) = 0.643 px of the pixel centre: pixels nearer than
    # raper - 0.65 count fully, pixels beyond raper + 0.65 not at all (identical to sub-sampling the
    # whole SExtractor ring raper +- 0.75, cheaper)
    dsub = (WINPOS_OVERSAMP - 1) / (2.0 * WINPOS_OVERSAMP) * math.sqrt(2.0) + 0.005
    rint = raper - dsub
    rint2_all = torch.where(rint > 0, rint * rint, torch.zeros_like(rint)).to(dt)
    rring2_all = ((raper + dsub) ** 2).to(dt)
    reach = _reach(raper + dsub)
    inv2s2_all = (1.0 / (2.0 * sig ** 2)).to(dt)
    def iterate(act: Tensor, s: int, tail: int) -> Tensor:
        """Iterate the objects ``act`` on stamps of side ``s`` until they stop; once fewer than
        ``tail`` still move (after 3 iterations), return them instead (per-iteration overhead)."""
        arf = torch.arange(s, device=dev).to(dt)
        n0 = act.numel()
        # work buffers reused by every iteration (fresh frame-chunk-sized temporaries cost more than
        # the arithmetic on this CPU: the allocator returns their pages to the OS and faults them
        # in again); the active objects use the leading rows
        ws = not (fr.img.requires_grad or mx.requires_grad or sig.requires_grad)
        if ws:
            b_r2 = torch.empty(n0, s, s, dtype=dt, device=dev)
            b_in = torch.empty(n0, s, s, dtype=torch.bool, device=dev)
            b_ring = torch.empty(n0, s, s, dtype=torch.bool, device=dev)
            b_loc = torch.empty(n0, s, s, dtype=dt, device=dev)
            b_spare = torch.empty(n0, s, s, dtype=dt, device=dev)  # ping-pong partner of the cache
            zero_t = torch.zeros((), dtype=dt, device=dev)
        bufs = {}

        def buf(name, shape, dtype):
            return _wbuf(bufs, name, shape, dtype, dev)
        cache = torch.zeros(n0, s, s, dtype=dt, device=dev)  # rows aligned with act
        keys = torch.full((act.numel(), 4), -(1 << 40), dtype=torch.long, device=dev)
        hasm = torch.zeros(act.numel(), 1, dtype=torch.long, device=dev)  # stamp holds blanked pixels
        it = 0
        while act.numel():
            if act.numel() < tail and it >= 3:
                return act  # a few stragglers: iterated later with those of every other chunk
            it += 1
            cxm, cym = mx.index_select(0, act), my.index_select(0, act)
            rap = raper.index_select(0, act)
            flag.index_copy_(0, act, flag.index_select(0, act) | _box_flag_trunc(cxm, rap, fr.W) | _box_flag_trunc(cym, rap, fr.H))
            rch = reach.index_select(0, act)
            x0 = torch.floor(cxm - rch).long() + 1  # as in _Frame.stamps
            y0 = torch.floor(cym - rch).long() + 1
            # the CORRECT mirror centre only matters for stamps with blanked pixels
            mkey = torch.stack([torch.trunc(2.0 * cxm + 0.49999).long(),
                                torch.trunc(2.0 * cym + 0.49999).long()], 1)
            key = torch.cat([torch.stack([x0, y0], 1), mkey * hasm], 1)
            chg = torch.nonzero((key != keys).any(1)).flatten()
            if chg.numel():
                gi = act[chg]
                b, lab = o["bi"][gi], o["label"][gi]
                st = fr.stamps(b, lab, mx[gi], my[gi], s, rch[chg], want_var=False)
                cache[chg] = fr.corrected(st, b, lab, mx[gi], my[gi])
                hm = st["masked"].flatten(1).any(1).long()[:, None]
                hasm[chg] = hm
                keys[chg] = torch.cat([key[chg, :2], mkey[chg] * hm], 1)
            fx = (cxm - x0.double()).to(dt)
            fy = (cym - y0.double()).to(dt)
            dxr = arf[None, :] - fx[:, None]  # (n, s) column offsets
            dyr = arf[None, :] - fy[:, None]  # (n, s) row offsets
            dx2, dy2 = dxr * dxr, dyr * dyr
            n_a = act.numel()
            if ws:
                r2 = torch.add(dy2[:, :, None], dx2[:, None, :], out=b_r2[:n_a])
                inner = torch.lt(r2, rring2_all.index_select(0, act)[:, None, None], out=b_in[:n_a])
                ring = torch.gt(r2, rint2_all.index_select(0, act)[:, None, None], out=b_ring[:n_a]).logical_and_(inner)
                loc = torch.where(inner, cache, zero_t, out=b_loc[:n_a])
            else:
                r2 = dy2[:, :, None] + dx2[:, None, :]
                inner = r2 < rring2_all.index_select(0, act)[:, None, None]
                ring = inner & (r2 > rint2_all.index_select(0, act)[:, None, None])
                loc = torch.where(inner, cache, torch.zeros_like(cache))
            fl = torch.nonzero(ring.view(-1)).flatten()  # flat (object, row, column) ids
            if fl.numel():
                # 11x11 sub-sampling only on the window's edge pixels.  Per stamp row and
                # sub-row k the chord |x| < w_k holds the sub-columns g (g = 11 j + m over the
                # whole row) with lo_k <= g <= hi_k (none when w_k = 0); a pixel counts the ones
                # in [11 j, 11 j + 10].
                x0s = (off - fx)[:, None, None]  # offset of sub-column g = 0
                # the chord ends are small integers: count in int16 (int32 for huge stamps), whose
                # min/max/sum kernels run several times faster than float32's on CPU; same counts
                it_ = torch.int16 if s * WINPOS_OVERSAMP < 30000 else torch.int32
                K = WINPOS_OVERSAMP
                rowi = fl // s  # object * s + row
                if ws:  # the same float operations, in place in reused buffers
                    yk = torch.add(dyr[:, :, None], ksub, out=buf("yk", (n_a, s, K), dt))  # (n, s, 11)
                    w = torch.mul(yk, yk, out=buf("w", (n_a, s, K), dt))
                    torch.sub(rap2_all.index_select(0, act)[:, None, None], w, out=w).clamp_(min=0).sqrt_()
                    lhf = buf("lhf", (n_a, s, 2, K), dt)
                    lo_, hi_ = lhf[:, :, 0], lhf[:, :, 1]
                    torch.neg(w, out=lo_).sub_(x0s).mul_(K).floor_().add_(1)
                    torch.sub(w, x0s, out=hi_).mul_(K).ceil_().sub_(1)
                    lohi = buf("lhi", (n_a, s, 2, K), it_).copy_(lhf)
                    lohi = torch.index_select(lohi.view(n_a * s, 2, K), 0, rowi,
                                              out=buf("lhg", (rowi.numel(), 2, K), it_))
                    g0 = ((fl - rowi * s) * K).to(it_)[:, None]
                    c1 = torch.minimum(lohi[:, 1], g0 + (K - 1), out=buf("c1", (rowi.numel(), K), it_))
                    c2 = torch.maximum(lohi[:, 0], g0, out=buf("c2", (rowi.numel(), K), it_))
                    cnt = c1.sub_(c2).add_(1).clamp_(min=0).sum(-1, dtype=it_)
                else:
                    yk = dyr[:, :, None] + ksub  # (n, s, 11)
                    w = torch.sqrt(torch.clamp(rap2_all.index_select(0, act)[:, None, None] - yk * yk, min=0))
                    lohi = torch.stack([torch.floor((-w - x0s) * K) + 1, torch.ceil((w - x0s) * K) - 1], 2).to(it_)
                    lohi = lohi.reshape(n_a * s, 2, K).index_select(0, rowi)
                    g0 = ((fl - rowi * s) * K).to(it_)[:, None]
                    cnt = (torch.minimum(lohi[:, 1], g0 + (K - 1)) - torch.maximum(lohi[:, 0], g0)
                           + 1).clamp_(min=0).sum(-1, dtype=it_)
                vals = cache.reshape(-1)[fl] * (cnt.to(dt) * (sc * sc))
                if ws:
                    loc.view(-1).index_put_((fl,), vals)
                else:
                    loc = loc.reshape(-1).index_put((fl,), vals).view(loc.shape)
            # separable Gaussian: exp(-dy^2 k) exp(-dx^2 k), clamped (no denormals; loc = 0 there)
            inv2s2 = inv2s2_all.index_select(0, act)[:, None]
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
            wflag.index_copy_(0, act, (~ok).long() * 4 + ((m2x < 0) | (m2y < 0)).long() * 2
                          + (m2x * m2y - m2xy * m2xy < 0).long())
            mx.index_copy_(0, act, cxm + dxp * WINPOS_FAC)
            my.index_copy_(0, act, cym + dyp * WINPOS_FAC)
            niter.index_add_(0, act, torch.ones_like(act))
            moving = ok & (dxp * dxp + dyp * dyp >= WINPOS_STEPMIN ** 2) & (niter.index_select(0, act) < WINPOS_NITERMAX)
            if not bool(moving.all()):
                keep = torch.nonzero(moving).flatten()
                act = act[keep]
                if ws:
                    cache, b_spare = torch.index_select(cache, 0, keep, out=b_spare[:keep.numel()]), cache
                else:
                    cache = cache[keep]
                keys = keys[keep]
                hasm = hasm[keep]
        return act

    rest = []
    for sel, s in _size_buckets(_side(reach)):
        for c in _chunks(sel, s * s * 6, max_elems):
            left = iterate(c, s, _WINPOS_TAIL)
            if left.numel():
                rest.append(left)
    if rest:
        # the stragglers of every bucket and chunk together, grouped again by the stamp side they need
        # (a larger stamp only adds pixels outside the window, whose weight is 0; one stamp of the
        # largest side for all of them would make a few huge objects cost every straggler that side)
        left = torch.cat(rest)
        for sel, s in _size_buckets(_side(reach.index_select(0, left))):
            for c in _chunks(left[sel], s * s * 6, max_elems):
                iterate(c, s, 0)
    return mx, my, flag, niter, wflag


# ----------------------------------------------------------------------------------------------
# standalone helpers (sep-like API on batched tensors)
# ----------------------------------------------------------------------------------------------
def _helper_frame(image, mask, var, x, batch_index):
    check_image(image, "image", channels=1)
    mask = check_mask(mask, image)
    B, _, H, W = image.shape
    x = torch.as_tensor(x, device=image.device).reshape(-1)
    n = x.numel()
    if batch_index is None:
        if B != 1:
            raise ValueError("batch_index is required when the image batch has more than one frame")
        bi = torch.zeros(n, dtype=torch.long, device=image.device)
    else:
        bi = torch.as_tensor(batch_index, device=image.device).long().reshape(-1)
        if bi.numel() != n:
            raise ValueError(f"batch_index must hold one value per position ({n}), got {bi.numel()}")
    varmap = _as_map(var if var is not None else 0.0, image, "var")
    seg = torch.zeros(B, 1, H, W, dtype=torch.long, device=image.device)
    return _Frame(image, seg, varmap, mask, H, W, "blank"), bi, n


def _geo(bi, x, y, dtype, a=None, b=None, theta_deg=None):
    x = torch.as_tensor(x, device=bi.device).reshape(-1).double()
    y = torch.as_tensor(y, device=bi.device).reshape(-1).double()
    g = {"bi": bi, "label": torch.full_like(bi, -1), "x": x, "y": y}
    if a is not None:
        a = torch.as_tensor(a, device=bi.device).double().reshape(-1).expand(x.shape)
        b = torch.as_tensor(b, device=bi.device).double().reshape(-1).expand(x.shape)
        t = torch.deg2rad(torch.as_tensor(theta_deg, device=bi.device).double().reshape(-1).expand(x.shape))
        c, s_ = torch.cos(t), torch.sin(t)
        g.update(a=a, bm=b, cxx=c * c / a ** 2 + s_ * s_ / b ** 2, cyy=s_ * s_ / a ** 2 + c * c / b ** 2,
                 cxy=2 * c * s_ * (1 / a ** 2 - 1 / b ** 2))
    return g


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
    rr = torch.full_like(g["x"], float(r))
    flag = (_box_flag_trunc(g["x"], rr, fr.W) | _box_flag_trunc(g["y"], rr, fr.H)).long() * FLAG_APER_INCOMPLETE
    return f[:, 0], torch.sqrt(v[:, 0]), flag


def sum_ellipse(image: Tensor, x, y, a, b, theta, r=1.0, *, var=None, mask: Optional[Tensor] = None,
                batch_index=None, max_elems: int = 1 << 22):
    """Flux of the whole pixels whose centre lies in the ellipse ``(a r, b r, theta)`` (theta in degrees,
    counter-clockwise from +x): SExtractor's FLUX_AUTO integration rule.  ``r`` scalar or per object.
    Returns ``(flux, fluxerr, flag)``."""
    fr, bi, n = _helper_frame(image, mask, var, x, batch_index)
    g = _geo(bi, x, y, image.dtype, a, b, theta)
    kf = torch.as_tensor(r, device=bi.device).double().reshape(-1).expand(g["x"].shape).clone()
    f, v, _, _, flag = _stage_auto(fr, g, kf, 0.0, max_elems)
    return f, torch.sqrt(v), flag.long() * FLAG_APER_INCOMPLETE


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


def windowed_centroid(image: Tensor, x, y, sig, *, mask: Optional[Tensor] = None, batch_index=None,
                      max_elems: int = 1 << 22):
    """SExtractor's XWIN/YWIN iteration from 0-based ``(x, y)`` with Gaussian ``sig`` (scalar or per
    object; SExtractor uses ``2 * flux_radius(0.5) / 2.35``).  Returns ``(xwin, ywin, niter, flag)``."""
    fr, bi, n = _helper_frame(image, mask, None, x, batch_index)
    g = _geo(bi, x, y, image.dtype)
    s_ = torch.as_tensor(sig, device=bi.device).double().reshape(-1).expand(g["x"].shape)
    xw, yw, flag, niter, _ = _stage_winpos(fr, g, s_, max_elems)
    return xw.to(image.dtype), yw.to(image.dtype), niter, flag.long() * FLAG_APER_INCOMPLETE


# ----------------------------------------------------------------------------------------------
# main entry
# ----------------------------------------------------------------------------------------------
def measure(image: Tensor, segmentation: Tensor, rms=None, **kwargs) -> dict[str, Tensor]:
    """SExtractor measurements for every object of a fixed segmentation (see :func:`_measure` for the
    arguments and outputs).

    On CPU the work is many small stamp operations; OpenMP fork/join on them costs more than it gains
    (measured on the 2-core CI box: 9x the CPU time with 2 threads), so the call runs with one intra-op
    thread and restores the previous setting on exit; the stamp stages instead split the objects over
    ``torch.get_num_threads()`` Python threads (torch ops release the GIL), one group each.
    """
    cpu = image.device.type == "cpu"
    with one_intraop_thread(cpu) as nthreads:
        if cpu and nthreads > 1:
            kwargs.setdefault("workers", nthreads)
        return _measure(image, segmentation, rms, **kwargs)


def _measure(
    image: Tensor,
    segmentation: Tensor,
    rms=None,
    *,
    var=None,
    filtered: Optional[Tensor] = None,
    filter_kernel: Union[str, Tensor, None] = "default",
    thresh=None,
    detect_thresh=None,
    thresh_nsigma: float = 1.5,
    phot_apertures: Sequence[float] = (10.0,),
    kron_fact: float = 2.5,
    min_radius: float = 3.5,
    autoapers: Sequence[float] = (0.0, 0.0),
    flux_fracs: Sequence[float] = (0.5,),
    gain: Optional[float] = None,
    mask: Optional[Tensor] = None,
    mask_type: str = "correct",
    saturation: Optional[float] = None,
    background=None,
    isophotal: Optional[dict] = None,
    blended: Optional[Tensor] = None,
    aper_subpix: int = APER_OVERSAMP,
    winpos_revert: bool = True,
    winpos_max_radius: Optional[float] = WINPOS_MAX_RADIUS,
    max_elems: int = 1 << 22,
    workers: int = 1,
    _sparse: Optional[dict] = None,
) -> dict[str, Tensor]:
    """SExtractor measurements for every object of a fixed segmentation.

    Args:
        image: background-subtracted ``(B, 1, H, W)`` float image (measurement = detection image).
        segmentation: ``(B, 1, H, W)`` integer labels (0 = background), e.g. SExtractor's SEGMENTATION
            check image or :class:`astroprep_torch.detect.SourceExtractor`'s map.
        rms: noise (ADU): scalar, ``(B,)`` or ``(B, 1, H, W)``; or give ``var`` (variance) instead.
            SExtractor without weight map = one global scalar (its printed background RMS).
        filtered: the detection-filtered image (SExtractor's FILTERED check image); computed with
            ``filter_kernel`` when None.  Barycentres and second moments use it (as SExtractor).
        thresh: analysis threshold in ADU (scalar or map) for ``npix`` (ISOAREA_IMAGE);
            default ``thresh_nsigma * rms`` (1.5 rms), made only at the pixels where it is used.
            ``detect_thresh``: detection threshold in ADU (scalar or map) on
            ``filtered`` that defines the blanked neighbour pixels; default ``thresh``.
        phot_apertures: aperture *diameters* in pixels (SExtractor's PHOT_APERTURES).
        kron_fact, min_radius: PHOT_AUTOPARAMS.  autoapers: PHOT_AUTOAPERS (diameters).
        flux_fracs: PHOT_FLUXFRAC, for ``flux_radius_fracs``.
        gain: e-/ADU (None or 0: no Poisson term, as SExtractor's GAIN 0).
        mask: bool ``(B,1,H,W)``, True = bad pixel: treated as blanked (like a zero-weight pixel).
        mask_type: "correct" (SExtractor's default), "blank" or "none" (MASK_TYPE).
        saturation, background: SATUR_LEVEL and the background map/scalar for flag 4.
        isophotal: optional per-object overrides (NaN = compute) of what SExtractor fixes before the
            final segmentation exists: ``x``, ``y`` (0-based) of deblended objects (SExtractor keeps the
            deblending-branch barycentre; second moments are then taken about it over all pixels);
            ``x2``, ``y2``, ``xy`` and ``npix`` of objects that swallowed CLEANed neighbours
            (SExtractor merges the pixels and fluxes but keeps the master's moments and ISOAREA).
        blended: optional bool per object for flag 2 (default: inferred from touching labels).
        aper_subpix: 5 = SExtractor's sub-sampling of FLUX_APER; 0 = exact circular overlap.
        winpos_revert: as SExtractor 2.25, report the isophotal position as ``xwin, ywin`` when the
            windowed centroid wanders outside the object's bounding box (older SExtractor: False).
        winpos_max_radius: cap (px) of the windowed centroid's integration radius ``4 sig``; ``None``
            = no cap (SExtractor's window is only truncated by its image buffer).  Only objects with a
            half-light radius above ``1.18 * winpos_max_radius / 4`` (37.6 px by default: saturated
            stars, their halos, large galaxies) are affected; they get FLAGS 16, as SExtractor flags a
            truncated window.  The cap bounds their cost: a window is iterated up to 16 times.
        max_elems: memory bound (elements per stamp chunk).
        workers: CPU threads for the stamp stages (objects split into this many interleaved groups,
            each measured by its own thread with one intra-op thread; used for >= 2,000 objects and
            no autograd). :func:`measure` passes ``torch.get_num_threads()``.

    Returns:
        dict of flat tensors, one row per object ordered by ``(batch_index, label)``: ``batch_index``,
        ``label``, ``x``, ``y`` (0-based), ``x2, y2, xy, a, b, theta, cxx, cyy, cxy, errx2, erry2,
        errxy``, ``npix`` (ISOAREA), ``fdnpix`` (segment pixels), ``peak`` (FLUX_MAX), ``flux_iso``,
        ``fluxerr_iso``, ``flux_aper``/``fluxerr_aper``/``area_aper`` ``(N, n_apertures)``,
        ``kron_radius``, ``flux_auto``, ``fluxerr_auto``, ``flux_radius`` (half light),
        ``flux_radius_fracs`` ``(N, len(flux_fracs))``, ``xwin``, ``ywin``, ``flags``.
    """
    check_image(image, "image", channels=1)
    if _sparse is not None:
        # the detector's own output (astroprep_torch.detect): the segmentation as pixel lists, the
        # filtered values at its pixels and the detected pixels (the blanking map); no frame-sized
        # segmentation, filtered image or blank map is needed
        segmentation = None
    elif not isinstance(segmentation, Tensor) or segmentation.shape != image.shape:
        raise ValueError(f"segmentation must be a tensor shaped like image {tuple(image.shape)}, got "
                         f"{getattr(segmentation, 'shape', type(segmentation))}")
    if segmentation is not None and (segmentation.is_floating_point() or segmentation.dtype == torch.bool):
        raise TypeError(f"segmentation must hold integer labels, got dtype {segmentation.dtype}")
    if mask_type not in _MASK_TYPES:
        raise ValueError(f"mask_type must be one of {_MASK_TYPES}, got {mask_type!r}")
    mask = check_mask(mask, image)
    if rms is None and var is None:
        raise ValueError("give the noise as rms= (scalar, (B,) or map) or var=")
    # noise maps stay as given (an rms map is squared only where it is gathered: no frame-sized
    # variance, rms or threshold copies)
    var_is_rms = var is None
    noise = _as_map(var, image, "var") if var is not None else _as_map(rms, image, "rms")
    threshmap = _as_map(thresh, image, "thresh") if thresh is not None else None  # None: nsigma rms

    def nsigma_thresh(n_):  # the default threshold from noise values (rms or variance)
        return thresh_nsigma * (n_ if var_is_rms else torch.sqrt(n_))

    def thresh_at(idx):
        if threshmap is not None:
            return _at_pixels(threshmap, idx, B, H, W)
        return nsigma_thresh(_at_pixels(noise, idx, B, H, W))
    if _sparse is not None:
        filtered = None
    elif filtered is None:
        filtered = sextractor_filter(image, filter_kernel)
    elif filtered.shape != image.shape:
        raise ValueError(f"filtered must be shaped like image {tuple(image.shape)}, got {tuple(filtered.shape)}")
    gain_v = float(gain) if gain else 0.0

    B, _, H, W = image.shape
    dev = image.device
    dt = image.dtype
    # ---------------- objects and their pixels -------------------------------------------------
    if _sparse is not None:
        seg = None
        pidx, inv = _sparse["pixels"], _sparse["pixel_row"]
        bidx, label = _sparse["batch_index"], _sparse["label"]
        N = bidx.numel()
        fv = _sparse["pixel_filtered"].double()
    else:
        seg = segmentation.long()
        segf = seg.reshape(-1)
        pidx = torch.nonzero(segf > 0).flatten()
        lmax = int(segf.max()) if segf.numel() else 0
        key = (pidx // (H * W)) * (lmax + 1) + segf.index_select(0, pidx)
        uniq, inv = torch.unique(key, return_inverse=True)
        N = uniq.numel()
        bidx = uniq // (lmax + 1)
        label = uniq % (lmax + 1)
        fv = filtered.reshape(-1).index_select(0, pidx).double()  # moment weights: the filtered (detection) image
    rem = pidx % (H * W)
    py = rem // W
    px = rem % W
    v = image.reshape(-1).index_select(0, pidx)
    def _ssum(val):
        return torch.zeros(N, dtype=val.dtype, device=dev).index_add(0, inv, val)

    xmin = torch.full((N,), W, dtype=torch.long, device=dev).scatter_reduce(0, inv, px, "amin")
    ymin = torch.full((N,), H, dtype=torch.long, device=dev).scatter_reduce(0, inv, py, "amin")
    xmax = torch.full((N,), -1, dtype=torch.long, device=dev).scatter_reduce(0, inv, px, "amax")
    ymax = torch.full((N,), -1, dtype=torch.long, device=dev).scatter_reduce(0, inv, py, "amax")
    xr = (px - xmin.index_select(0, inv)).double()
    yr = (py - ymin.index_select(0, inv)).double()
    rv = _ssum(fv)
    xm = _ssum(fv * xr) / rv
    ym = _ssum(fv * yr) / rv
    mx2s, my2s, mxys = _ssum(fv * xr * xr) / rv, _ssum(fv * yr * yr) / rv, _ssum(fv * xr * yr) / rv
    xm2 = mx2s - xm * xm
    ym2 = my2s - ym * ym
    xym = mxys - xm * ym
    if isophotal is not None:
        def _ov(name):
            if name not in isophotal or isophotal[name] is None:
                return None
            t_ = torch.as_tensor(isophotal[name], device=dev).double().reshape(-1)
            if t_.numel() != N:
                raise ValueError(f"isophotal[{name!r}] must hold {N} values (one per object), got {t_.numel()}")
            return t_
        unknown = set(isophotal) - {"x", "y", "x2", "y2", "xy", "npix"}
        if unknown:
            raise ValueError(f"isophotal overrides accept x, y, x2, y2, xy, npix; got {sorted(unknown)}")
        ox, oy = _ov("x"), _ov("y")
        if ox is not None and oy is not None:
            # SExtractor's ANALYSE_ROBUST branch: keep the given barycentre, moments about it
            use = torch.isfinite(ox) & torch.isfinite(oy)
            xn = ox - xmin.double()
            yn = oy - ymin.double()
            xm2 = torch.where(use, mx2s + xn * xn - 2 * xm * xn, xm2)
            ym2 = torch.where(use, my2s + yn * yn - 2 * ym * yn, ym2)
            xym = torch.where(use, mxys + xn * yn - xm * yn - xn * ym, xym)
            xm = torch.where(use, xn, xm)
            ym = torch.where(use, yn, ym)
        for name_, ref in (("x2", "xm2"), ("y2", "ym2"), ("xy", "xym")):
            ov = _ov(name_)
            if ov is not None:
                use = torch.isfinite(ov)
                if ref == "xm2":
                    xm2 = torch.where(use, ov, xm2)
                elif ref == "ym2":
                    ym2 = torch.where(use, ov, ym2)
                else:
                    xym = torch.where(use, ov, xym)
    temp2 = xm2 * ym2 - xym * xym
    singu = temp2 < 0.00694
    xm2 = torch.where(singu, xm2 + 0.0833333, xm2)
    ym2 = torch.where(singu, ym2 + 0.0833333, ym2)
    temp2 = xm2 * ym2 - xym * xym
    dxy = xm2 - ym2
    theta = torch.where(dxy.abs() > 0, torch.atan2(2.0 * xym, dxy) / 2.0, torch.full_like(dxy, math.pi / 4))
    tq = torch.sqrt(0.25 * dxy * dxy + xym * xym)
    pm = 0.5 * (xm2 + ym2)
    a_ = torch.sqrt(torch.clamp(pm + tq, min=0)).float().double()
    b_ = torch.sqrt(torch.clamp(pm - tq, min=0)).float().double()
    cxx = (ym2 / temp2).float().double()
    cyy = (xm2 / temp2).float().double()
    cxy = (-2 * xym / temp2).float().double()
    x = xm + xmin.double()
    y = ym + ymin.double()

    # isophotal measurements on the measurement image
    varp = _at_pixels(noise, pidx, B, H, W)
    if var_is_rms:
        varp = varp * varp
    thr = thresh_at(pidx)
    npix = _ssum((v.detach() > thr).long())
    if isophotal is not None and isophotal.get("npix") is not None:
        onp = torch.as_tensor(isophotal["npix"], device=dev).double().reshape(-1)
        npix = torch.where(torch.isfinite(onp), torch.nan_to_num(onp).long(), npix)
    fdnpix = _ssum(torch.ones_like(pidx))
    flux_iso = _ssum(v)
    sig_iso = _ssum(varp.to(v.dtype))
    if gain_v > 0:
        sig_iso = sig_iso + torch.clamp(flux_iso, min=0) / gain_v
    fluxerr_iso = torch.sqrt(sig_iso)
    peak = torch.full((N,), -float("inf"), dtype=v.dtype, device=dev).scatter_reduce(0, inv, v, "amax")
    # position errors (examineiso): err = backnoise^2 (+ filtered/gain), moments about the barycentre
    err = varp.double()
    if gain_v > 0:
        err = err + torch.clamp(fv, min=0) / gain_v
    ex = px.double() - x.index_select(0, inv)
    ey = py.double() - y.index_select(0, inv)
    flux2 = rv.float().double() ** 2
    emx2 = _ssum(err * ex * ex) / flux2
    emy2 = _ssum(err * ey * ey) / flux2
    emxy = _ssum(err * ex * ey) / flux2
    esum = _ssum(err) * 0.08333 / flux2
    fix = singu & (emx2 * emy2 - emxy * emxy < esum * esum)
    emx2 = torch.where(fix, emx2 + esum, emx2)
    emy2 = torch.where(fix, emy2 + esum, emy2)

    # flags from the segmentation
    border = (px == 0) | (px == W - 1) | (py == 0) | (py == H - 1)
    flags = torch.zeros(N, dtype=torch.long, device=dev)
    flags |= torch.zeros(N, dtype=torch.long, device=dev).scatter_reduce(0, inv, border.long(), "amax") * FLAG_TRUNCATED
    if blended is None:
        sp = F.pad(seg.float(), (1, 1, 1, 1)).long()
        touch = torch.zeros_like(seg, dtype=torch.bool)
        for oy in (-1, 0, 1):
            for ox in (-1, 0, 1):
                if ox == 0 and oy == 0:
                    continue
                nb = sp[..., 1 + oy : 1 + oy + H, 1 + ox : 1 + ox + W]
                touch |= (nb > 0) & (nb != seg)
        bl = torch.zeros(N, dtype=torch.long, device=dev).scatter_reduce(
            0, inv, touch.reshape(-1).index_select(0, pidx).long(), "amax").bool()
    else:
        bl = torch.as_tensor(blended, device=dev).reshape(-1).bool()
        if bl.numel() != N:
            raise ValueError(f"blended must hold {N} values (one per object), got {bl.numel()}")
    flags |= bl.long() * FLAG_BLENDED
    if saturation is not None:
        bkgmap = _as_map(background if background is not None else 0.0, image, "background")
        ixr = torch.floor(x + 0.5).long()
        iyr = torch.floor(y + 0.5).long()
        bk = _per_object(None, bkgmap.detach(), bidx, ixr, iyr).double()
        flags |= ((peak.detach().double() + bk) >= saturation).long() * FLAG_SATURATED

    # ---------------- stamp-based photometry ----------------------------------------------------
    blank = None
    bseg = None
    if _sparse is not None:
        if mask_type != "none" or mask is not None:
            # label of blanked pixels, -1 elsewhere (as _Frame builds it), from the pixel lists
            bseg = torch.full((B * H * W,), -1, dtype=torch.int32, device=dev)
            if mask_type != "none":
                bseg.index_fill_(0, _sparse["detected"], 0)
            if mask is not None:
                bseg.masked_fill_(mask.reshape(-1), 0)
            bseg.index_put_((pidx,), label.to(torch.int32).index_select(0, inv))
    else:
        if mask_type != "none":
            if detect_thresh is not None:
                dthreshmap = _as_map(detect_thresh, image, "detect_thresh")
            elif threshmap is not None:
                dthreshmap = threshmap
            else:
                dthreshmap = nsigma_thresh(noise)
            det = filtered.detach() > dthreshmap
            blank = det
        if mask is not None:
            blank = mask if blank is None else (blank | mask)
    fr = _Frame(image, seg, noise, blank, H, W, mask_type if mask_type != "none" else "correct", bseg=bseg,
                var_is_rms=var_is_rms)
    if mask_type == "none" and mask is not None:
        fr.mask_type = "blank"  # bad pixels only: contribute nothing
    geo = {"bi": bidx, "label": label, "x": x, "y": y, "a": a_, "bm": b_, "cxx": cxx, "cyy": cyy, "cxy": cxy}

    radii = [float(d) / 2.0 for d in phot_apertures]
    fracs = (0.5,) + tuple(float(f) for f in flux_fracs)

    def chain(g: dict):
        """The stamp stages for the objects of ``g`` (aper, Kron, AUTO, growth curve, windowed
        centroid: each object depends only on its own earlier results)."""
        fa, va, ara = _stage_aper(fr, g, radii, aper_subpix, max_elems, gain_v)
        kf, _, crowd1, kflag = _stage_kron(fr, g, kron_fact, min_radius, float(autoapers[0]), max_elems)
        fauto, vauto, kf2, crowd2, aflag2 = _stage_auto(fr, g, kf, float(autoapers[1]), max_elems)
        frad, hl, gflag = _stage_growth(fr, g, fauto, fracs, float(autoapers[0]), max_elems)
        xw, yw, wflag, w_niter, w_flags = _stage_winpos(fr, g, hl * 2.0 / 2.35, max_elems, winpos_max_radius)
        return (fa, va, ara, kf, crowd1, kflag, fauto, vauto, kf2, crowd2, aflag2, frad, gflag,
                xw, yw, wflag, w_niter, w_flags)

    grad = image.requires_grad or any(isinstance(t_, Tensor) and t_.requires_grad for t_ in (var, rms))
    (fa, va, ara, kf, crowd1, kflag, fauto, vauto, kf2, crowd2, aflag2, frad, gflag,
     xw, yw, wflag, w_niter, w_flags) = _split_run(chain, geo, N, workers if not grad else 1)

    aflag = torch.zeros(N, dtype=torch.bool, device=dev)
    for r in radii:
        rr = torch.full_like(x, r)
        aflag |= _box_flag_trunc(x, rr, W) | _box_flag_trunc(y, rr, H)
    if gain_v > 0:
        va = va + torch.clamp(fa, min=0) / gain_v
        vauto = vauto + torch.clamp(fauto, min=0) / gain_v
    kron = torch.where(fauto > 0, kf2.to(dt), torch.zeros_like(fauto))
    aflag |= kflag | (aflag2 & (kf > 0))
    aflag |= gflag
    # SExtractor 2.25 keeps the isophotal position when the windowed one leaves the object's box
    # (observed on sep's image.cat: older 2.x releases did not revert)
    out_box = (xw < xmin) | (xw > xmax) | (yw < ymin) | (yw > ymax)
    if winpos_revert:
        xw = torch.where(out_box, x, xw)
        yw = torch.where(out_box, y, yw)
    aflag |= wflag
    flags |= aflag.long() * FLAG_APER_INCOMPLETE
    flags |= (crowd1 | crowd2).long() * FLAG_CROWDED

    out = {
        "batch_index": bidx,
        "label": label,
        "x": x.to(dt),
        "y": y.to(dt),
        "x2": xm2.to(dt),
        "y2": ym2.to(dt),
        "xy": xym.to(dt),
        "a": a_.to(dt),
        "b": b_.to(dt),
        "theta": torch.rad2deg(theta).to(dt),
        "cxx": cxx.to(dt),
        "cyy": cyy.to(dt),
        "cxy": cxy.to(dt),
        "errx2": emx2.to(dt),
        "erry2": emy2.to(dt),
        "errxy": emxy.to(dt),
        "npix": npix,
        "fdnpix": fdnpix,
        "peak": peak,
        "flux_iso": flux_iso,
        "fluxerr_iso": fluxerr_iso,
        "flux_aper": fa,
        "fluxerr_aper": torch.sqrt(torch.clamp(va, min=0)),
        "area_aper": ara,
        "kron_radius": kron,
        "flux_auto": fauto,
        "fluxerr_auto": torch.sqrt(torch.clamp(vauto, min=0)),
        "flux_radius": frad[:, 0].to(dt),
        "flux_radius_fracs": frad[:, 1:].to(dt),
        "xwin": xw.to(dt),
        "ywin": yw.to(dt),
        "flags": flags,
        "winpos_niter": w_niter,
        "win_flags": w_flags,
    }
    return out


class Photometry(nn.Module):
    """``nn.Module`` wrapper of :func:`measure` holding SExtractor's photometry settings (plain values,
    Hydra-friendly).  ``forward(image, segmentation, rms, **per_call)`` returns the dict of
    :func:`measure`; per-call keyword arguments (``filtered``, ``thresh``, ``detect_thresh``, ``mask``,
    ``background``, ``isophotal``, ``blended``, ``var``) are passed through."""

    def __init__(self, phot_apertures: Sequence[float] = (10.0,), kron_fact: float = 2.5,
                 min_radius: float = 3.5, autoapers: Sequence[float] = (0.0, 0.0),
                 flux_fracs: Sequence[float] = (0.5,), gain: Optional[float] = None,
                 mask_type: str = "correct", saturation: Optional[float] = None,
                 filter_kernel: Optional[str] = "default", aper_subpix: int = APER_OVERSAMP,
                 winpos_revert: bool = True, winpos_max_radius: Optional[float] = WINPOS_MAX_RADIUS):
        super().__init__()
        if mask_type not in _MASK_TYPES:
            raise ValueError(f"mask_type must be one of {_MASK_TYPES}, got {mask_type!r}")
        self.kw = dict(phot_apertures=tuple(float(a) for a in phot_apertures), kron_fact=float(kron_fact),
                       min_radius=float(min_radius), autoapers=tuple(float(a) for a in autoapers),
                       flux_fracs=tuple(float(f) for f in flux_fracs), gain=gain, mask_type=mask_type,
                       saturation=saturation, filter_kernel=filter_kernel, aper_subpix=int(aper_subpix),
                       winpos_revert=bool(winpos_revert),
                       winpos_max_radius=None if winpos_max_radius is None else float(winpos_max_radius))

    def forward(self, image: Tensor, segmentation: Tensor, rms=None, **kwargs) -> dict[str, Tensor]:
        return measure(image, segmentation, rms, **{**self.kw, **kwargs})

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.kw.items())


measure.__doc__ = (measure.__doc__ or "") + "\n" + (_measure.__doc__ or "")
