"""SExtractor's FLAGS bits and the rules that set them in photometry.

1 crowded (> 10 % of the Kron area blanked: set by :mod:`.kron`), 2 blended (given by the detector, or
inferred: the object touches another label), 4 saturated (``peak + background >= saturation`` in float32,
the background at the pixel nearest the barycentre: SExtractor takes it bilinearly from its background
mesh, :class:`MeshBackground`, not from the spline-interpolated BACKGROUND map), 8 object
pixels on the image border, 16 an aperture (APER, AUTO, growth curve or window) box clipped by the image
border (SExtractor's rounding of the box).  32 (isophotal data incomplete) is only raised by
SExtractor's strip buffering and never here.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .stamps import _per_object

FLAG_CROWDED = 1
FLAG_BLENDED = 2
FLAG_SATURATED = 4
FLAG_TRUNCATED = 8
FLAG_APER_INCOMPLETE = 16
FLAG_ISO_INCOMPLETE = 32


def _box_flag_round(c: Tensor, lim: Tensor, size: int) -> Tensor:
    """SExtractor ``RINT`` box (AUTO): xmin = RINT(c - lim) < 0 or RINT(c + lim) + 1 > size."""
    return (torch.floor(c - lim + 0.5) < 0) | (torch.floor(c + lim + 0.5) + 1 > size)


def _box_flag_trunc(c: Tensor, r: Tensor, size: int) -> Tensor:
    """SExtractor circular box: xmin = (int)(c - r + 0.499999) < 0 or (int)(c + r + 1.499999) > size."""
    return (torch.trunc(c - r + 0.499999) < 0) | (torch.trunc(c + r + 1.499999) > size)


def _segment_any(hit: Tensor, inv: Tensor, n: int) -> Tensor:
    """Per object (row ``inv`` of each pixel): 1 where any of its pixels has ``hit``, else 0 (long)."""
    return torch.zeros(n, dtype=torch.long, device=hit.device).scatter_reduce(0, inv, hit.long(), "amax")


def _border_flags(px: Tensor, py: Tensor, inv: Tensor, n: int, H: int, W: int) -> Tensor:
    """FLAG_TRUNCATED for the objects with a pixel on the image border."""
    border = (px == 0) | (px == W - 1) | (py == 0) | (py == H - 1)
    return _segment_any(border, inv, n) * FLAG_TRUNCATED


def _touching_labels(seg: Tensor, pidx: Tensor, inv: Tensor, n: int) -> Tensor:
    """Per object: whether one of its pixels has an 8-neighbour with another nonzero label (the blended
    flag inferred from a dense ``(B, 1, H, W)`` segmentation)."""
    H, W = seg.shape[-2:]
    sp = F.pad(seg.float(), (1, 1, 1, 1)).long()
    touch = torch.zeros_like(seg, dtype=torch.bool)
    for oy in (-1, 0, 1):
        for ox in (-1, 0, 1):
            if ox == 0 and oy == 0:
                continue
            nb = sp[..., 1 + oy : 1 + oy + H, 1 + ox : 1 + ox + W]
            touch |= (nb > 0) & (nb != seg)
    return _segment_any(touch.reshape(-1).index_select(0, pidx), inv, n).bool()


def _blended_flags(blended: Optional[Tensor], seg: Tensor, pidx: Tensor, inv: Tensor, n: int) -> Tensor:
    """FLAG_BLENDED from the ``blended`` argument (one bool per object) or inferred from touching labels."""
    if blended is None:
        bl = _touching_labels(seg, pidx, inv, n)
    else:
        bl = torch.as_tensor(blended, device=pidx.device).reshape(-1).bool()
        if bl.numel() != n:
            raise ValueError(f"blended must hold {n} values (one per object), got {bl.numel()}")
    return bl.long() * FLAG_BLENDED


class MeshBackground(NamedTuple):
    """SExtractor's background mesh (its MINIBACKGROUND check image: ``(B|1, 1, ny, nx)``, the filtered
    box values) and the box size ``(BACK_SIZE rows, columns)``, for FLAGS 4: SExtractor adds to the peak
    the mesh bilinearly interpolated at the pixel (back.c ``back()``), which differs from the BACKGROUND
    map by a fraction of an ADU -- enough to flip the flag of a star clipped at the saturation level."""

    mesh: Tensor
    box: tuple[int, int]

    def at(self, bidx: Tensor, ix: Tensor, iy: Tensor) -> Tensor:
        """back.c ``back(field, ix, iy)`` (float64 weights, float32 result) at integer pixels."""
        m = self.mesh.detach()
        ny, nx = m.shape[-2:]
        vals = m.reshape(m.shape[0], ny * nx)[bidx if m.shape[0] > 1 else torch.zeros_like(bidx)].double()
        dx, xl = self._cell(ix.double() / self.box[1] - 0.5, nx)
        dy, yl = self._cell(iy.double() / self.box[0] - 0.5, ny)
        x1 = xl + (1 if nx > 1 else 0)
        y1 = yl + (1 if ny > 1 else 0)

        def g(yy, xx):
            return vals.gather(1, (yy * nx + xx)[:, None])[:, 0]

        b0, b1, b2, b3 = g(yl, xl), g(yl, x1), g(y1, x1), g(y1, xl)
        return ((1 - dy) * ((1 - dx) * b0 + dx * b1) + dy * (dx * b2 + (1 - dx) * b3)).float()

    @staticmethod
    def _cell(d: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Cell index (C truncation, clamped to the mesh as back.c does) and the offset in it."""
        lo = torch.trunc(d)
        off = d - lo
        lo = lo.long()
        off = torch.where(lo < 0, off - 1.0, torch.where(lo >= n - 1, off + 1.0, off))
        return off, lo.clamp(0, max(n - 2, 0))


def _saturated_flags(peak: Tensor, background, bidx: Tensor, x: Tensor, y: Tensor, saturation: float) -> Tensor:
    """FLAG_SATURATED where ``peak`` plus the background at the object's nearest pixel reaches
    ``saturation``, summed in float32 as SExtractor does (``background``: a broadcastable ``(B|1, 1, H|1,
    W|1)`` map or a :class:`MeshBackground`)."""
    ixr = torch.floor(x + 0.5).long()
    iyr = torch.floor(y + 0.5).long()
    if isinstance(background, MeshBackground):
        bk = background.at(bidx, ixr, iyr)
    else:
        bk = _per_object(None, background.detach(), bidx, ixr, iyr).float()
    return ((peak.detach().float() + bk) >= saturation).long() * FLAG_SATURATED


def _aperture_box_flags(x: Tensor, y: Tensor, radii: Sequence[float], H: int, W: int) -> Tensor:
    """Whether the box of any circular aperture of ``radii`` is clipped by the image border."""
    aflag = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for r in radii:
        rr = torch.full_like(x, r)
        aflag |= _box_flag_trunc(x, rr, W) | _box_flag_trunc(y, rr, H)
    return aflag
