"""Per-object stamps: the flattened frame, stamp gathering with SExtractor's neighbour masking, noise
maps read at pixels, and the grouping of objects by the stamp size they need.

Aperture-like quantities are computed on per-object square (or, for large ellipses, rectangular)
stamps gathered as an ``(n, rows, columns)`` batch, each stamp just large enough for its aperture
(side ``floor(2 reach) + 2``, origin ``floor(c - reach) + 1``).  Objects are grouped by stamp side
(a Python loop over size buckets and memory chunks, never over objects).  Stamp rows are gathered as
contiguous runs (``index_select`` on a strided view, much cheaper than an element-wise gather;
element-wise fallback near the buffer ends and under autograd); CORRECT mirror pixels are gathered
only for stamps that hold a blanked pixel.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .._checks import check_image, check_mask



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


def _reach(r: Tensor) -> Tensor:
    """Stamp reach (float64): ``r`` plus a rounding margin, so that a pixel beyond the reach is
    strictly outside ``r`` whatever the float32 rounding of the offsets."""
    r = torch.nan_to_num(r.double(), nan=1.0, posinf=1.0e4).clamp(min=0.0, max=4000.0)
    return r * (1.0 + 1e-5) + 1e-4


def _side(reach: Tensor) -> Tensor:
    """Stamp side holding the pixel centres in ``(c - reach, c + reach)`` from ``floor(c - reach) + 1``
    (at most ``2 reach + 1`` of them)."""
    return torch.floor(2.0 * reach).long() + 2



def _chunks(idx: Tensor, per_obj: int, max_elems: int):
    n = max(1, max_elems // max(per_obj, 1))
    for i in range(0, idx.numel(), n):
        yield idx[i : i + n]


class _Objects(NamedTuple):
    """The objects the stamp stages measure (one row each): frame ``bi``, ``label`` (-1: none, for the
    standalone helpers), float64 centre ``x, y`` (0-based) and, for elliptical apertures, the isophotal
    ellipse: semi-axes ``a, b`` and ``cxx, cyy, cxy``."""

    bi: Tensor
    label: Tensor
    x: Tensor
    y: Tensor
    a: Optional[Tensor] = None
    b: Optional[Tensor] = None
    cxx: Optional[Tensor] = None
    cyy: Optional[Tensor] = None
    cxy: Optional[Tensor] = None

    def rows(self, sel) -> "_Objects":
        """The objects ``sel`` (an index tensor or a slice)."""
        return _Objects(*(None if v is None else v[sel] for v in self))


class _Stamps(NamedTuple):
    """A batch of ``n`` stamps of ``rows x columns`` pixels: ``pix`` the image values (garbage off the
    frame), ``valid`` on the frame, ``masked`` blanked neighbour pixels, ``dx``/``dy`` pixel-centre
    offsets from the object's centre (expanded views), ``ix`` ``(n, 1, columns)`` / ``iy`` ``(n, rows,
    1)`` frame columns and rows, the origin ``x0, y0``, ``flat`` the flat frame indices (autograd path
    only, else None) and ``var`` the variance (None unless asked for)."""

    pix: Tensor
    valid: Tensor
    masked: Tensor
    dx: Tensor
    dy: Tensor
    ix: Tensor
    iy: Tensor
    x0: Tensor
    y0: Tensor
    flat: Optional[Tensor]
    var: Optional[Tensor]


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
        ``reach`` of ``c`` in x and y.  Returns the :class:`_Stamps` (dx/dy are pixel-centre offsets
        from (cx, cy)).  With ``sy`` and ``reach_y``, rectangular stamps of
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
        if self.blank is not None:
            bs = self._runs(self.bseg, rbase, x0, s, bad)[0] if fast else self.bseg[flat]
            masked = (bs >= 0) & (bs != label.to(bs.dtype)[:, None, None]) & valid
        else:
            masked = torch.zeros_like(valid)
        var = self._var_at(b, iy, ix, iyr, x0, valid) if want_var else None
        return _Stamps(pix, valid, masked, dx, dy, ix, iy, x0, y0, flat, var)

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
        (much cheaper than an element-wise gather).  Values at off-image positions (runs that wrap to the
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
            # row-run gathers as for the image (cheaper than the element-wise gather); the
            # off-frame pixels (garbage from the neighbouring row) are zeroed: every caller weights
            # them by 0, and 0 * a non-finite garbage value would not be 0
            rbase = bb[:, None] * (H * W) + iyr.clamp(0, H - 1) * W
            g = self._runs(v.reshape(-1), rbase, x0, ix.shape[-1])[0].masked_fill_(~valid, 0.0)
        else:
            g = v[bb[:, None, None], 0, iy.clamp(0, self.H - 1), ix.clamp(0, self.W - 1)]
        return (g * g if self.var_is_rms else g).expand(shape)

    def corrected(self, st: _Stamps, b: Tensor, label: Tensor, cx: Tensor, cy: Tensor) -> Tensor:
        """Pixel values with blanked neighbours replaced as SExtractor's MASK_TYPE (CORRECT: the pixel
        symmetric about (int)(2*c + 0.49999) - x if it is usable, else 0; BLANK: 0)."""
        pix, masked = st.pix, st.masked
        if self.blank is None or self.mask_type == "none":
            return torch.where(st.valid, pix, torch.zeros_like(pix))
        zero = torch.zeros_like(pix)
        base = torch.where(st.valid & ~masked, pix, zero)
        if self.mask_type == "blank":
            return base
        # CORRECT: mirrored pixels only for the stamps that hold a blanked pixel
        nmask = masked.flatten(1).sum(1)
        sel = torch.nonzero(nmask).flatten()
        if sel.numel() == 0:
            return base
        cxm, cym = _MirrorCentre.of(cx), _MirrorCentre.of(cy)
        if not self.img.requires_grad and 5 * int(nmask.sum()) <= sel.numel() * masked[0].numel():
            return self._mirror_at_masked(st, base, b, label, cxm, cym)  # few blanked pixels (large stamps)
        return self._mirror_stamps(st, base, sel, b, label, cxm, cym)

    def _mirror_stamps(self, st: _Stamps, base: Tensor, sel: Tensor, b, label, cxm, cym) -> Tensor:
        """``base`` with the blanked pixels of stamps ``sel`` replaced by their mirror pixels (about
        ``cxm / 2, cym / 2``; 0 where that one is off the frame or blanked too), gathered as whole
        mirrored stamps."""
        H, W = self.H, self.W
        s = base.shape[-1]
        b, label, x0, cxm, cym = b[sel], label[sel], st.x0[sel], cxm.rows(sel), cym.rows(sel)
        x2 = cxm.mirror(st.ix[sel])  # (m, 1, s)
        y2 = cym.mirror(st.iy[sel])  # (m, s, 1)
        ok = ((x2 >= 0) & (x2 < W)) & ((y2 >= 0) & (y2 < H))
        # mirrored stamp: row y2 = cym - iy, columns cxm - x0 - j (descending) = reversed run
        rbase2 = b[:, None] * (H * W) + y2[:, :, 0].clamp(0, H - 1) * W
        if not self.img.requires_grad:
            c2 = cxm.m - x0 - (s - 1)
            mpix, bad = self._runs(self.img, rbase2, c2, s)
            mpix = mpix.flip(-1)
            bs = self._runs(self.bseg, rbase2, c2, s, bad)[0].flip(-1)
            # column -1 of the run read as column 0 (SExtractor's truncation toward zero): the value
            # of the next stamp column, whose mirror column is 0
            if bool(((cxm.m + 1 - x0 < s) & cxm.frac).any()):  # column cxm + 1 in a stamp: near the left edge
                edge = (cxm.m[:, None, None] - st.ix[sel] == -1) & (x2 == 0)
                mpix = torch.where(edge, torch.cat([mpix[..., :1], mpix[..., :-1]], -1), mpix)
                bs = torch.where(edge, torch.cat([bs[..., :1], bs[..., :-1]], -1), bs)
        else:
            flat2 = b[:, None, None] * (H * W) + y2.clamp(0, H - 1) * W + x2.clamp(0, W - 1)
            mpix = self.img[flat2]
            bs = self.bseg[flat2]
        mblank = (bs >= 0) & (bs != label.to(bs.dtype)[:, None, None])
        rep = torch.where(ok & ~mblank, mpix, torch.zeros_like(mpix))
        if sel.numel() == base.shape[0]:
            return torch.where(st.masked, rep, base)
        # row copies (index_put with a row index is an element-wise scatter on CPU: much slower)
        return base.index_copy(0, sel, torch.where(st.masked[sel], rep, base[sel]))

    def _mirror_at_masked(self, st: _Stamps, base: Tensor, b, label, cxm, cym) -> Tensor:
        """As :meth:`_mirror_stamps` (the same values), gathering only the mirror pixels of the blanked
        pixels: cheaper where they are a small part of the stamps."""
        oi, yy, xx = torch.nonzero(st.masked, as_tuple=True)
        vals = self.mirror_values(b.index_select(0, oi), label.index_select(0, oi), cxm.rows(oi), cym.rows(oi),
                                  st.ix[oi, 0, xx], st.iy[oi, yy, 0])
        return base.index_put_((oi, yy, xx), vals)

    def mirror_values(self, b: Tensor, label: Tensor, cxm: "_MirrorCentre", cym: "_MirrorCentre", ix: Tensor,
                      iy: Tensor) -> Tensor:
        """CORRECT's value for the blanked pixels ``(ix, iy)`` of image ``b`` (flat lists, one entry per
        pixel, with its object's ``label`` and mirror centres ``cxm, cym``, one row per pixel): the pixel
        symmetric about the centre (:class:`_MirrorCentre`), 0 where that one is off the frame or blanked too."""
        H, W = self.H, self.W
        x2 = cxm.mirror(ix)
        y2 = cym.mirror(iy)
        ok = ((x2 >= 0) & (x2 < W)) & ((y2 >= 0) & (y2 < H))
        flat2 = b * (H * W) + y2.clamp(0, H - 1) * W + x2.clamp(0, W - 1)
        mpix = self.img.reshape(-1).index_select(0, flat2)
        bs = self.bseg.index_select(0, flat2)
        mblank = (bs >= 0) & (bs != label.to(bs.dtype))
        return torch.where(ok & ~mblank, mpix, torch.zeros_like(mpix))


class _MirrorCentre(NamedTuple):
    """SExtractor's CORRECT mirror about a centre ``c`` (MASK_TYPE CORRECT in photom.c / winpos.c): the
    pixel ``i`` is replaced by ``(int)(2 c + 0.49999 - i)``, a truncation toward zero, so that a mirror
    coordinate in ``(-1, 0)`` reads pixel 0 (as a usable pixel) rather than falling off the frame.
    ``m = trunc(2 c + 0.49999)`` and ``frac`` (True where ``2 c + 0.49999`` is not an integer) per object."""

    m: Tensor
    frac: Tensor

    @staticmethod
    def of(c: Tensor) -> "_MirrorCentre":
        a = 2.0 * c.double() + 0.49999
        t = torch.trunc(a)
        return _MirrorCentre(t.long(), a != t)

    def rows(self, sel) -> "_MirrorCentre":
        return _MirrorCentre(self.m[sel], self.frac[sel])

    def mirror(self, i: Tensor) -> Tensor:
        """Mirror coordinates of the pixel coordinates ``i`` (per-object leading dimension)."""
        shape = (-1,) + (1,) * (i.dim() - 1)
        i2 = self.m.view(shape) - i
        return torch.where((i2 == -1) & self.frac.view(shape), torch.zeros_like(i2), i2)


def _wbuf(bufs: dict, name: str, shape, dtype, device) -> Tensor:
    """The work buffer ``name`` of ``bufs`` viewed as ``shape`` (made, or remade larger, on demand)."""
    n = math.prod(shape)
    b = bufs.get(name)
    if b is None or b.numel() < n or b.dtype != dtype or b.device != torch.device(device):
        b = bufs[name] = torch.empty(max(n, 1024), dtype=dtype, device=device)
    return b[:n].view(shape)


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


def _geo(bi, x, y, dtype, a=None, b=None, theta_deg=None) -> _Objects:
    x = torch.as_tensor(x, device=bi.device).reshape(-1).double()
    y = torch.as_tensor(y, device=bi.device).reshape(-1).double()
    if a is None:
        return _Objects(bi, torch.full_like(bi, -1), x, y)
    a = torch.as_tensor(a, device=bi.device).double().reshape(-1).expand(x.shape)
    b = torch.as_tensor(b, device=bi.device).double().reshape(-1).expand(x.shape)
    t = torch.deg2rad(torch.as_tensor(theta_deg, device=bi.device).double().reshape(-1).expand(x.shape))
    c, s_ = torch.cos(t), torch.sin(t)
    return _Objects(bi, torch.full_like(bi, -1), x, y, a, b, c * c / a ** 2 + s_ * s_ / b ** 2,
                    s_ * s_ / a ** 2 + c * c / b ** 2, 2 * c * s_ * (1 / a ** 2 - 1 / b ** 2))

