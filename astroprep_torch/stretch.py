"""Grey-scale transforms: display intervals (zscale, percentile, min/max, manual), stretches,
histogram equalisation, normalisation to ``[0, 1]``, ``uint8`` conversion and Lupton RGB composites.

Paper section 2.2.6 (grey-scale transformation function); astropy.visualization and
``skimage.exposure.equalize_hist`` are the references and the tests compare against them.

Shapes and the channel rule
---------------------------
Images are ``(B, C, H, W)`` or ``(C, H, W)`` floating tensors; masks are bool, broadcastable to the
image, ``True`` = bad. Masked and non-finite (NaN/inf) pixels never enter the limits or histograms,
as astropy's ``_process_values`` drops them.

Every interval computes limits **per image**:

* ``per_channel=False`` (intervals' default): one ``(vmin, vmax)`` per batch element over all of its
  channels, the flattened ``(C, H, W)`` array in C order (what astropy does on that array).
  Limits have shape ``(B,)`` (``()`` for a ``(C, H, W)`` input).
* ``per_channel=True`` (the default of :class:`Normalize` and :class:`HistogramEqualization`, the
  transforms used on multi-band network input): one pair per ``(b, c)`` plane, shape ``(B, C)``
  (``(C,)`` for ``(C, H, W)``). For ``C == 1`` both rules give the same numbers.

Everything is batched and device/dtype-agnostic. Under :func:`torch.compile` (``fullgraph=True``;
tests prove it for ``ZScale``, ``Stretch``, ``Normalize`` and ``HistogramEqualization``) the traced
code has no host sync and no data-dependent Python control flow: zscale's rejection loop runs all
``max_iterations`` with per-image ``active`` masks. In eager mode, isolated fast paths (selected by
``torch.compiler.is_compiling()``) take one small host sync (are all pixels finite? which 256-pixel
blocks hold excluded pixels?) and, when no gradient is needed, work in place on one buffer; they
return the same numbers as the traced path (tests compare both). The maths is differentiable where
it is: stretches, normalisation (through the limits too: zscale's limits are a differentiable
function of the sampled pixel values for a fixed rejection pattern), the interpolation of
histogram equalisation, and fully through :class:`HistogramEqualization` with ``smooth=True``.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ._checks import check_image, check_mask
from ._runtime import numpy_applies, numpy_inplace_

__all__ = [
    "Limits",
    "BaseInterval",
    "ZScale",
    "PercentileInterval",
    "MinMaxInterval",
    "ManualInterval",
    "Stretch",
    "STRETCHES",
    "HistogramEqualization",
    "Normalize",
    "zscale",
    "percentile_interval",
    "minmax_interval",
    "apply_stretch",
    "equalize_hist",
    "normalize",
    "to_uint8",
    "lupton_asinh",
    "make_lupton_rgb",
]


class Limits(NamedTuple):
    """Display limits; each of shape ``(B,)`` (per image) or ``(B, C)`` (per channel)."""

    vmin: Tensor
    vmax: Tensor


# --------------------------------------------------------------------------------------------
# shared plumbing
# --------------------------------------------------------------------------------------------


def _work_dtype(x: Tensor) -> torch.dtype:
    """float64 for the small statistics arrays (parity with numpy), except where unsupported."""
    return torch.float32 if x.device.type == "mps" else torch.float64


def _as_groups(image: Tensor, mask: Optional[Tensor], per_channel: bool, name: str = "image"):
    """Flatten ``image`` (and ``mask``) to ``(G, L)`` groups: one per image, or per image and channel.

    Returns ``flat, mflat, out_shape``; ``mflat`` is ``None`` without a mask, ``out_shape`` is the
    shape of the limits.
    """
    check_image(image, name, allow_3d=True)
    mask = check_mask(mask, image)
    squeeze = image.dim() == 3
    x = image.unsqueeze(0) if squeeze else image
    m = None if mask is None else (mask.unsqueeze(0) if squeeze else mask)
    b, c, h, w = x.shape
    groups = (b * c, h * w) if per_channel else (b, c * h * w)
    flat = x.reshape(groups)
    mflat = None if m is None else m.reshape(groups)
    out_shape: tuple[int, ...] = (b, c) if per_channel else (b,)
    if squeeze:
        out_shape = out_shape[1:]
    return flat, mflat, out_shape


def _bad_map(flat: Tensor, mflat: Optional[Tensor]) -> Tensor:
    """Bool map of excluded pixels: masked or non-finite (``x - x`` is NaN exactly for NaN/inf;
    cheaper than ``torch.isfinite`` on CPU: experiments/results/stretch_kernels.md)."""
    bad = (flat - flat) != 0
    return bad if mflat is None else bad | mflat


def _limits_shape(vmin: Tensor, image: Tensor) -> Tensor:
    """Reshape ``(B,)``/``(B, C)`` (or ``()``/``(C,)``) limits to broadcast against ``image``."""
    extra = image.dim() - vmin.dim()
    return vmin.reshape(vmin.shape + (1,) * extra)


class BaseInterval(nn.Module):
    """Base class: ``forward(image, mask=None) -> Limits(vmin, vmax)``.

    Args:
        per_channel: one pair of limits per ``(b, c)`` plane (True) or per batch element over all
            channels (False, default; limits of shape ``(B,)``).
    """

    def __init__(self, per_channel: bool = False):
        super().__init__()
        self.per_channel = bool(per_channel)

    def limits(self, image: Tensor, mask: Optional[Tensor] = None, per_channel: Optional[bool] = None) -> Limits:
        raise NotImplementedError

    def forward(self, image: Tensor, mask: Optional[Tensor] = None) -> Limits:
        return self.limits(image, mask, self.per_channel)

    def get_limits(self, image: Tensor, mask: Optional[Tensor] = None) -> Limits:
        """astropy-style alias of :meth:`forward`."""
        return self.forward(image, mask)

    def apply(self, image: Tensor, mask: Optional[Tensor] = None, clip: bool = True) -> Tensor:
        """``(image - vmin) / (vmax - vmin)``, clipped to ``[0, 1]`` if ``clip`` (astropy's
        ``interval(values)``); 0 where ``vmax == vmin``."""
        vmin, vmax = self.forward(image, mask)
        return _rescale(image, _limits_shape(vmin, image), _limits_shape(vmax, image), clip)


def _rescale(image: Tensor, vmin: Tensor, vmax: Tensor, clip: bool) -> Tensor:
    vmin = vmin.to(image.dtype)
    vmax = vmax.to(image.dtype)
    span = vmax - vmin
    same = span == 0
    scale = 1.0 / torch.where(same, torch.ones_like(span), span)
    if not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and (image.requires_grad or vmin.requires_grad)):
        out = image - vmin  # the one allocation; the rest in place
        out.mul_(scale)
        if bool(same.any()):
            out.masked_fill_(same, 0.0)
        return out.clamp_(0.0, 1.0) if clip else out
    out = (image - vmin) / torch.where(same, torch.ones_like(span), span)
    out = torch.where(same, torch.zeros_like(out), out)
    if clip:
        out = out.clamp(0.0, 1.0)
    return out


# --------------------------------------------------------------------------------------------
# zscale
# --------------------------------------------------------------------------------------------

_BLOCK = 256


def _block_bad_counts(flat: Tensor, mflat: Optional[Tensor]) -> Tensor:
    """Number of excluded pixels (masked or non-finite) in each block of ``_BLOCK`` consecutive
    pixels of each row, ``(G, ceil(L / _BLOCK))`` in ``flat``'s dtype (exact: counts <= 256).

    Under ``torch.compile`` this is one fused elementwise + block-sum pass. In eager mode full-frame
    temporaries are avoided (they dominate on a loaded CPU): block sums (a reduction) flag blocks
    holding a NaN/inf, the mask is counted with a uint8 block sum, and only flagged blocks are
    counted pixel by pixel (a data-dependent gather: eager only).
    """
    g, length = flat.shape
    nb_full = length // _BLOCK
    if torch.compiler.is_compiling():
        bad = torch.nan_to_num(flat - flat, nan=1.0)  # 1 at NaN/inf, 0 elsewhere
        if mflat is not None:
            bad = torch.where(mflat, 1.0, bad)
        parts = []
        if nb_full:
            parts.append(bad.unfold(1, _BLOCK, _BLOCK).sum(-1))
        if length % _BLOCK:
            parts.append(bad[:, nb_full * _BLOCK:].sum(-1, keepdim=True))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def exact(x: Tensor, m: Optional[Tensor]) -> Tensor:
        bad = (x - x) != 0
        if m is not None:
            bad = bad | m
        return bad.sum(-1).to(flat.dtype)

    parts = []
    if nb_full:
        xb = flat.unfold(1, _BLOCK, _BLOCK)
        mb = None if mflat is None else mflat.unfold(1, _BLOCK, _BLOCK)
        counts = (torch.zeros(g, nb_full, dtype=flat.dtype, device=flat.device) if mb is None
                  else mb.view(torch.uint8).sum(-1, dtype=flat.dtype))
        flagged = ~torch.isfinite(xb.sum(-1))
        n_flagged = int(flagged.sum())
        if 8 * n_flagged > flagged.numel():  # NaN/inf everywhere: count every block
            counts = exact(xb, mb)
        elif n_flagged:
            gi, bi = flagged.nonzero(as_tuple=True)
            counts[gi, bi] = exact(xb[gi, bi], None if mb is None else mb[gi, bi])
        parts.append(counts)
    if length % _BLOCK:
        tail = slice(nb_full * _BLOCK, length)
        parts.append(exact(flat[:, tail], None if mflat is None else mflat[:, tail]).unsqueeze(1))
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _nth_good_index(flat: Tensor, mflat: Optional[Tensor], bad_counts: Tensor, targets: Tensor) -> Tensor:
    """Flat index of the ``targets``-th (0-based) good pixel of each row of ``flat`` ``(G, L)``.

    ``bad_counts`` are the per-block counts of :func:`_block_bad_counts`; ``targets`` ``(G, n)``
    lie in ``[0, n_good)``. Only the ``n`` blocks holding a target are read again, so a strided
    sample of a 2048^2 frame touches ~1000 x 256 pixels after the counting pass.
    """
    g, length = flat.shape
    nb = bad_counts.shape[1]
    sizes = torch.full((nb,), float(_BLOCK), dtype=bad_counts.dtype, device=flat.device)
    sizes[-1] = float(length - (nb - 1) * _BLOCK)
    counts = (sizes.unsqueeze(0) - bad_counts).long()  # good pixels per block
    cum = counts.cumsum(-1)
    blk = torch.searchsorted(cum, targets, right=True).clamp(max=nb - 1)
    rank = targets - (cum.gather(1, blk) - counts.gather(1, blk))  # rank inside the block
    out = blk * _BLOCK + rank  # right when the block has no excluded pixel
    need = bad_counts.gather(1, blk) > 0
    if torch.compiler.is_compiling():
        rows = torch.arange(g, device=flat.device).unsqueeze(1).expand_as(blk)
        return torch.where(need, _scan_blocks(flat, mflat, rows, blk, rank), out).clamp(max=length - 1)
    if bool(need.any()):  # eager: scan only the blocks that hold excluded pixels
        gi, ki = need.nonzero(as_tuple=True)
        out[gi, ki] = _scan_blocks(flat, mflat, gi, blk[gi, ki], rank[gi, ki])
    return out.clamp(max=length - 1)


def _scan_blocks(flat: Tensor, mflat: Optional[Tensor], rows: Tensor, blk: Tensor, rank: Tensor) -> Tensor:
    """Index of the ``rank``-th good pixel inside block ``blk`` of row ``rows`` (same shapes)."""
    length = flat.shape[1]
    local = blk.unsqueeze(-1) * _BLOCK + torch.arange(_BLOCK, device=flat.device)  # (..., BLOCK)
    inb = local < length
    gpos = rows.unsqueeze(-1) * length + local.clamp(max=length - 1)
    v = flat.reshape(-1)[gpos]
    good = ((v - v) == 0) & inb
    if mflat is not None:
        good = good & ~mflat.reshape(-1)[gpos]
    inside = good.to(torch.int32).cumsum(-1)
    first = (inside <= rank.unsqueeze(-1)).sum(-1)
    return blk * _BLOCK + first


def _zscale_samples(flat: Tensor, mflat: Optional[Tensor], n_samples: int):
    """astropy's sampling: the good pixels in C order, every ``stride``-th, the first ``n_samples``.

    ``stride = int(max(1, n_good / n_samples))``. Returns ``(samples (G, n), valid (G, n))``.

    Eager fast path: without a mask, one cheap reduction (the row sums) shows whether every pixel
    is finite; if so the sample indices are ``k * stride`` directly and the frame is read only once
    more, at ``n_samples`` pixels. This branch is the one data-dependent Python ``if`` of the module
    (a host sync on a ``(G,)`` bool); under ``torch.compile`` the general path is always traced.
    """
    g, length = flat.shape
    dev = flat.device
    k = torch.arange(n_samples, device=dev).unsqueeze(0)
    if mflat is None and not torch.compiler.is_compiling():
        if bool(torch.isfinite(flat.sum(-1)).all()):
            stride = max(1, length // n_samples)
            idx = (k * stride).clamp(max=length - 1).expand(g, n_samples)
            valid = (k * stride < length).expand(g, n_samples)
            return flat.gather(1, idx), valid
    bad_counts = _block_bad_counts(flat, mflat)
    n_good = length - bad_counts.sum(-1).long()
    stride = torch.div(n_good, n_samples, rounding_mode="floor").clamp(min=1)
    targets = k * stride.unsqueeze(1)  # (G, n)
    valid = targets < n_good.unsqueeze(1)
    targets = torch.minimum(targets, (n_good - 1).clamp(min=0).unsqueeze(1))
    idx = _nth_good_index(flat, mflat, bad_counts, targets)
    return flat.gather(1, idx), valid


def _zscale_from_samples(
    samples: Tensor, valid: Tensor, *, contrast: float, max_reject: float, min_npixels: int, krej: float,
    max_iterations: int,
) -> tuple[Tensor, Tensor]:
    """IRAF zscale on ``(G, n)`` samples (``valid`` marks real samples; they are a prefix).

    Same rule as astropy's ``ZScaleInterval``: sort; fit a line to sorted value vs rank with
    k-sigma rejection (population std of the residuals of the good points), the bad set grown by a
    ``max(1, int(0.01 npix))`` box (numpy ``convolve(..., 'same')`` alignment) each iteration; stop
    when nothing more is rejected or fewer than ``max(min_npixels, int(npix max_reject))`` remain;
    limits ``median -/+ slope/contrast * (distance from the centre rank)``, bounded by the sample
    min/max. Every row runs all ``max_iterations`` with an ``active`` mask instead of ``break``.
    """
    s = _sorted_samples(samples, valid)
    npix_f = s.npix.to(samples.dtype)
    minpix = torch.clamp(torch.floor(npix_f * max_reject), min=float(min_npixels))
    slope, ngood = _fit_with_rejection(s, minpix, krej, max_iterations)
    return _zscale_limits(s, slope, ngood >= minpix, contrast)


class _SortedSamples(NamedTuple):
    """zscale's samples sorted per row: values ``y`` ``(G, n)`` (0 past the real ones), ranks ``x``
    ``(1, n)``, the count ``npix`` ``(G,)`` and ``inside`` ``(G, n)`` marking the real ones."""

    y: Tensor
    x: Tensor
    npix: Tensor
    inside: Tensor


def _sorted_samples(samples: Tensor, valid: Tensor) -> _SortedSamples:
    wdt = samples.dtype
    n = samples.shape[1]
    dev = samples.device
    inf = torch.tensor(float("inf"), dtype=wdt, device=dev)
    y = torch.where(valid, samples, inf).sort(dim=-1).values
    npix = valid.sum(-1)  # (G,) int64
    inside = torch.arange(n, device=dev).unsqueeze(0) < npix.unsqueeze(1)
    y = torch.where(inside, y, torch.zeros_like(y))
    x = torch.arange(n, device=dev, dtype=wdt).unsqueeze(0)
    return _SortedSamples(y, x, npix, inside)


def _grow_bounds(npix: Tensor, n: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """``(lo, hi)`` ``(G, n)``: a rejected sample i marks ``[i - down, i + up]``, the box of
    ``max(1, int(0.01 npix))`` samples in numpy ``convolve(..., 'same')`` alignment; sample j is
    marked when a rejected one lies in ``[lo_j, hi_j)``."""
    ngrow = torch.clamp(torch.floor(npix.to(dtype) * 0.01), min=1.0).long()
    down = torch.div(ngrow - 1, 2, rounding_mode="floor")
    up = ngrow - 1 - down
    j = torch.arange(n, device=npix.device).unsqueeze(0)
    lo = (j - up.unsqueeze(1)).clamp(min=0)
    hi = (j + down.unsqueeze(1) + 1).clamp(max=n)
    return lo, hi


def _line_residuals(s: _SortedSamples, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Weighted least-squares line of ``y`` on ``x`` (weights ``w``): ``(slope (G, 1), residuals
    (G, n), population std of the weighted residuals (G, 1))``."""
    x, y = s.x, s.y
    sw = w.sum(-1, keepdim=True).clamp(min=1.0)
    xm = (w * x).sum(-1, keepdim=True) / sw
    ym = (w * y).sum(-1, keepdim=True) / sw
    dx = x - xm
    sxx = (w * dx * dx).sum(-1, keepdim=True)
    sxy = (w * dx * (y - ym)).sum(-1, keepdim=True)
    b1 = sxy / torch.where(sxx > 0, sxx, torch.ones_like(sxx))
    flat = y - (ym + b1 * dx)
    fm = (w * flat).sum(-1, keepdim=True) / sw
    sd = torch.sqrt((w * (flat - fm) ** 2).sum(-1, keepdim=True) / sw)
    return b1, flat, sd


def _fit_with_rejection(s: _SortedSamples, minpix: Tensor, krej: float, max_iterations: int) -> tuple[Tensor, Tensor]:
    """The k-sigma rejection loop: ``(slope (G,), number of samples kept (G,))``. Every row runs all
    ``max_iterations``; a row stops changing once nothing more is rejected or too few remain."""
    g, n = s.y.shape
    wdt = s.y.dtype
    lo, hi = _grow_bounds(s.npix, n, wdt)
    bad = torch.zeros_like(s.inside)
    ngood = s.npix.to(wdt)
    last = ngood + 1
    active = torch.ones(g, dtype=torch.bool, device=s.y.device)
    slope = torch.zeros(g, dtype=wdt, device=s.y.device)
    for _ in range(max_iterations):
        active = active & ~((ngood >= last) | (ngood < minpix))
        b1, flat, sd = _line_residuals(s, (s.inside & ~bad).to(wdt))
        thr = krej * sd
        rejected = bad | (((flat < -thr) | (flat > thr)) & s.inside)
        csum = torch.nn.functional.pad(rejected.to(torch.int32).cumsum(-1), (1, 0))
        grown = ((csum.gather(1, hi) - csum.gather(1, lo)) > 0) & s.inside
        ng = (s.inside & ~grown).sum(-1).to(wdt)
        bad = torch.where(active.unsqueeze(1), grown, bad)
        slope = torch.where(active, b1.squeeze(1), slope)
        last = torch.where(active, ngood, last)
        ngood = torch.where(active, ng, ngood)
    return slope, ngood


def _zscale_limits(s: _SortedSamples, slope: Tensor, ok: Tensor, contrast: float) -> tuple[Tensor, Tensor]:
    """``median -/+ slope / contrast * (distance from the centre rank)`` within the sample min/max
    where the fit kept enough samples (``ok``), the min/max elsewhere; NaN for empty rows."""
    y, npix = s.y, s.npix
    n = y.shape[1]
    wdt = y.dtype
    last_i = (npix - 1).clamp(min=0)
    vmin = y[:, 0]
    vmax = y.gather(1, last_i.unsqueeze(1)).squeeze(1)
    if contrast > 0:
        slope = slope / contrast
    center = torch.div(npix - 1, 2, rounding_mode="floor")
    mid_lo = y.gather(1, torch.div(last_i, 2, rounding_mode="floor").unsqueeze(1)).squeeze(1)
    mid_hi = y.gather(1, torch.div(npix, 2, rounding_mode="floor").clamp(max=n - 1).unsqueeze(1)).squeeze(1)
    median = 0.5 * (mid_lo + mid_hi)
    zmin = torch.maximum(vmin, median - (center - 1).to(wdt) * slope)
    zmax = torch.minimum(vmax, median + (npix - center).to(wdt) * slope)
    vmin = torch.where(ok, zmin, vmin)
    vmax = torch.where(ok, zmax, vmax)
    empty = npix == 0
    nan = torch.full_like(vmin, float("nan"))
    return torch.where(empty, nan, vmin), torch.where(empty, nan, vmax)


def zscale(
    image: Tensor, mask: Optional[Tensor] = None, *, n_samples: int = 1000, contrast: float = 0.25,
    max_reject: float = 0.5, min_npixels: int = 5, krej: float = 2.5, max_iterations: int = 5,
    per_channel: bool = False,
) -> Limits:
    """IRAF/DS9 zscale limits, as astropy's ``ZScaleInterval().get_limits`` image by image.

    Args:
        image: ``(B, C, H, W)`` or ``(C, H, W)`` floating tensor.
        mask: bool, broadcastable to ``image``, True = bad (excluded, as non-finite pixels are).
        n_samples .. max_iterations: astropy's parameters and defaults.
        per_channel: limits per ``(b, c)`` plane instead of per image (see the module docstring).

    Returns:
        ``Limits(vmin, vmax)`` of shape ``(B,)`` (``(B, C)`` if ``per_channel``), image dtype;
        NaN for an image with no good pixel. Sampling is a strided gather of ``n_samples`` good
        pixels in C order (astropy's rule); the fit runs in float64 on ``n_samples`` values.
    """
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if max_iterations < 0:
        raise ValueError(f"max_iterations must be >= 0, got {max_iterations}")
    flat, mflat, out_shape = _as_groups(image, mask, per_channel)
    samples, valid = _zscale_samples(flat, mflat, int(n_samples))
    vmin, vmax = _zscale_from_samples(
        samples.to(_work_dtype(flat)), valid, contrast=float(contrast), max_reject=float(max_reject),
        min_npixels=int(min_npixels), krej=float(krej), max_iterations=int(max_iterations),
    )
    return Limits(vmin.to(image.dtype).reshape(out_shape), vmax.to(image.dtype).reshape(out_shape))


class ZScale(BaseInterval):
    """IRAF zscale interval (astropy ``ZScaleInterval``), batched: see :func:`zscale`.

    ``ZScale()(image, mask=None) -> Limits(vmin, vmax)``, each ``(B,)`` for ``(B, C, H, W)`` input.
    """

    def __init__(self, n_samples: int = 1000, contrast: float = 0.25, max_reject: float = 0.5,
                 min_npixels: int = 5, krej: float = 2.5, max_iterations: int = 5, per_channel: bool = False):
        super().__init__(per_channel)
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        self.n_samples = int(n_samples)
        self.contrast = float(contrast)
        self.max_reject = float(max_reject)
        self.min_npixels = int(min_npixels)
        self.krej = float(krej)
        self.max_iterations = int(max_iterations)

    def limits(self, image, mask=None, per_channel=None):
        return zscale(image, mask, n_samples=self.n_samples, contrast=self.contrast, max_reject=self.max_reject,
                      min_npixels=self.min_npixels, krej=self.krej, max_iterations=self.max_iterations,
                      per_channel=self.per_channel if per_channel is None else per_channel)

    def extra_repr(self) -> str:
        return (f"n_samples={self.n_samples}, contrast={self.contrast}, max_reject={self.max_reject}, "
                f"min_npixels={self.min_npixels}, krej={self.krej}, max_iterations={self.max_iterations}, "
                f"per_channel={self.per_channel}")


# --------------------------------------------------------------------------------------------
# other intervals
# --------------------------------------------------------------------------------------------


def _masked_minmax(flat: Tensor, mflat: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """Min and max of the good pixels of each row (NaN where none is good)."""
    inf = float("inf")
    if mflat is None:
        lo = torch.nan_to_num(flat, nan=inf, posinf=inf, neginf=inf).amin(-1)
        hi = torch.nan_to_num(flat, nan=-inf, posinf=-inf, neginf=-inf).amax(-1)
    else:
        lo = torch.nan_to_num(flat.masked_fill(mflat, inf), nan=inf, posinf=inf, neginf=inf).amin(-1)
        hi = torch.nan_to_num(flat.masked_fill(mflat, -inf), nan=-inf, posinf=-inf, neginf=-inf).amax(-1)
    empty = torch.isinf(lo) & (lo > 0)
    nan = torch.full_like(lo, float("nan"))
    return torch.where(empty, nan, lo), torch.where(empty, nan, hi)


def minmax_interval(image: Tensor, mask: Optional[Tensor] = None, *, per_channel: bool = False) -> Limits:
    """Minimum and maximum of the good pixels (astropy ``MinMaxInterval``); NaN if none is good."""
    flat, mflat, out_shape = _as_groups(image, mask, per_channel)
    lo, hi = _masked_minmax(flat, mflat)
    return Limits(lo.reshape(out_shape), hi.reshape(out_shape))


def percentile_interval(
    image: Tensor, mask: Optional[Tensor] = None, *, lower: float = 0.0, upper: float = 100.0,
    per_channel: bool = False,
) -> Limits:
    """Percentiles of the good pixels with numpy's default ('linear') interpolation
    (astropy ``AsymmetricPercentileInterval`` without ``n_samples``).

    Rows are sorted with bad pixels moved to the end, so every image keeps its own count of good
    pixels; cost is one sort per image.
    """
    if not (0.0 <= lower <= 100.0 and 0.0 <= upper <= 100.0):
        raise ValueError(f"percentiles must lie in [0, 100], got lower={lower}, upper={upper}")
    flat, mflat, out_shape = _as_groups(image, mask, per_channel)
    bad = _bad_map(flat, mflat)
    inf = torch.tensor(float("inf"), dtype=flat.dtype, device=flat.device)
    ordered = torch.where(bad, inf, flat).sort(dim=-1).values
    n_good = (~bad).sum(-1)
    last = (n_good - 1).clamp(min=0)
    wdt = _work_dtype(flat)
    out = []
    for q in (float(lower), float(upper)):
        pos = last.to(wdt) * (q / 100.0)
        i0 = torch.floor(pos).long().clamp(max=ordered.shape[-1] - 1)
        i1 = torch.minimum(i0 + 1, last)
        frac = (pos - i0.to(wdt)).to(flat.dtype)
        v0 = ordered.gather(1, i0.unsqueeze(1)).squeeze(1)
        v1 = ordered.gather(1, i1.unsqueeze(1)).squeeze(1)
        val = torch.where(frac > 0, v0 + (v1 - v0) * frac, v0)
        val = torch.where(n_good == 0, torch.full_like(val, float("nan")), val)
        out.append(val.reshape(out_shape))
    return Limits(out[0], out[1])


class MinMaxInterval(BaseInterval):
    """Limits at the minimum and maximum good pixel (astropy ``MinMaxInterval``)."""

    def limits(self, image, mask=None, per_channel=None):
        return minmax_interval(image, mask, per_channel=self.per_channel if per_channel is None else per_channel)


class PercentileInterval(BaseInterval):
    """Keep the central ``percentile`` % of good pixels (astropy ``PercentileInterval``).

    ``lower_percentile``/``upper_percentile`` give the asymmetric form
    (astropy ``AsymmetricPercentileInterval``) and override ``percentile``. astropy's random
    ``n_samples`` subsampling is not reproduced (it is not deterministic); all good pixels are used.
    """

    def __init__(self, percentile: float = 99.5, lower_percentile: Optional[float] = None,
                 upper_percentile: Optional[float] = None, per_channel: bool = False):
        super().__init__(per_channel)
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"percentile must lie in [0, 100], got {percentile}")
        lower = (100.0 - percentile) * 0.5
        self.lower = float(lower if lower_percentile is None else lower_percentile)
        self.upper = float(100.0 - lower if upper_percentile is None else upper_percentile)
        self.percentile = float(percentile)

    def limits(self, image, mask=None, per_channel=None):
        return percentile_interval(image, mask, lower=self.lower, upper=self.upper,
                                   per_channel=self.per_channel if per_channel is None else per_channel)

    def extra_repr(self) -> str:
        return f"lower={self.lower}, upper={self.upper}, per_channel={self.per_channel}"


class ManualInterval(BaseInterval):
    """Fixed limits (astropy ``ManualInterval``); a ``None`` limit falls back to the image's
    minimum / maximum good pixel."""

    def __init__(self, vmin: Optional[float] = None, vmax: Optional[float] = None, per_channel: bool = False):
        super().__init__(per_channel)
        self.vmin = None if vmin is None else float(vmin)
        self.vmax = None if vmax is None else float(vmax)

    def limits(self, image, mask=None, per_channel=None):
        per_channel = self.per_channel if per_channel is None else per_channel
        check_image(image, "image", allow_3d=True)
        if self.vmin is not None and self.vmax is not None:
            shape = image.shape[:-3] + ((image.shape[-3],) if per_channel else ())
            return Limits(image.new_full(shape, self.vmin), image.new_full(shape, self.vmax))
        lo, hi = minmax_interval(image, mask, per_channel=per_channel)
        if self.vmin is not None:
            lo = torch.full_like(lo, self.vmin)
        if self.vmax is not None:
            hi = torch.full_like(hi, self.vmax)
        return Limits(lo, hi)

    def extra_repr(self) -> str:
        return f"vmin={self.vmin}, vmax={self.vmax}, per_channel={self.per_channel}"


# --------------------------------------------------------------------------------------------
# stretches: each kind written once, its backend variants registered side by side
# --------------------------------------------------------------------------------------------

#: kind -> default ``a`` (astropy's defaults; ``power`` has none, as astropy's ``PowerStretch``).
STRETCHES = {
    "linear": None, "sqrt": None, "squared": None, "power": None, "log": 1000.0, "asinh": 0.1,
    "sinh": 1.0 / 3.0, "powerdist": 1000.0,
}


class _StretchParams(NamedTuple):
    """What a stretch kernel needs besides the values. ``clip``: the values were clipped to
    ``[0, 1]`` (a kernel may take its ``x >= 0`` branch; the linear stretch clips after)."""

    a: Optional[float]
    clip: bool
    slope: float = 1.0
    intercept: float = 0.0


#: ``{kind: {variant: kernel}}``, filled by :func:`_register_stretch` beside each formula.
#: ``"graph"``: ``kernel(x, p) -> Tensor``, out-of-place torch ops (autograd, ``torch.compile``).
#: ``"inplace"``: ``kernel(y, p) -> Tensor``, eager torch ops on a buffer we own (returns ``y`` or
#: a new tensor). ``"numpy"`` (transcendental kinds only): ``kernel(block, p)``, numpy ufuncs with
#: ``out=block`` on a CPU block (see :func:`_numpy_stretch`).
_STRETCH_KERNELS: dict[str, dict[str, Callable]] = {}


def _register_stretch(kind: str, variant: str):
    """Decorator: register ``fn`` as the ``variant`` kernel of the stretch ``kind``."""
    def register(fn: Callable) -> Callable:
        _STRETCH_KERNELS.setdefault(kind, {})[variant] = fn
        return fn
    return register


@_register_stretch("linear", "graph")
def _linear(x: Tensor, p: _StretchParams) -> Tensor:
    """``slope x + intercept``, clipped after when ``p.clip`` and not the identity."""
    y = x
    if p.slope != 1:
        y = y * p.slope
    if p.intercept != 0:
        y = y + p.intercept
    if p.clip and (p.slope != 1 or p.intercept != 0):
        y = y.clamp(0.0, 1.0)
    return y


@_register_stretch("linear", "inplace")
def _linear_(y: Tensor, p: _StretchParams) -> Tensor:
    if p.slope != 1:
        y.mul_(p.slope)
    if p.intercept != 0:
        y.add_(p.intercept)
    if p.clip and (p.slope != 1 or p.intercept != 0):
        y.clamp_(0.0, 1.0)
    return y


@_register_stretch("sqrt", "graph")
def _sqrt(x: Tensor, p: _StretchParams) -> Tensor:
    return torch.sqrt(x)


@_register_stretch("sqrt", "inplace")
def _sqrt_(y: Tensor, p: _StretchParams) -> Tensor:
    # 1 / rsqrt(x): ATen's rsqrt and reciprocal are SIMD kernels, its sqrt goes through MKL's VML
    # on some CPUs (experiments/results/stretch_kernels.md); <= 2 ulp from sqrt, 0 -> 0, inf -> inf,
    # x < 0 -> NaN
    return y.rsqrt_().reciprocal_()


@_register_stretch("squared", "graph")
def _squared(x: Tensor, p: _StretchParams) -> Tensor:
    return x * x


@_register_stretch("squared", "inplace")
def _squared_(y: Tensor, p: _StretchParams) -> Tensor:
    return y.mul_(y)


@_register_stretch("power", "graph")
def _power(x: Tensor, p: _StretchParams) -> Tensor:
    """``x^a``; for clipped input (``x >= 0``) as ``2^(a log2 x)``, which fuses to SIMD exp2/log2
    when compiled."""
    if p.clip and not x.requires_grad:
        return torch.exp2(torch.log2(x) * p.a)
    return torch.pow(x, p.a)


@_register_stretch("power", "inplace")
def _power_(y: Tensor, p: _StretchParams) -> Tensor:
    return y.pow_(p.a)


@_register_stretch("power", "numpy")
def _power_np(b, p: _StretchParams) -> None:
    np.power(b, p.a, out=b)


@_register_stretch("log", "graph")
def _log(x: Tensor, p: _StretchParams) -> Tensor:
    """``log(a x + 1) / log(a + 1)``."""
    return torch.log(x * p.a + 1.0) / math.log(p.a + 1.0)


@_register_stretch("log", "inplace")
def _log_(y: Tensor, p: _StretchParams) -> Tensor:
    # log2 is ATen's faster CPU kernel; ln 2 folds into the normalisation
    return y.mul_(p.a).add_(1.0).log2_().mul_(1.0 / math.log2(p.a + 1.0))


@_register_stretch("log", "numpy")
def _log_np(b, p: _StretchParams) -> None:
    np.multiply(b, p.a, out=b)
    np.add(b, 1.0, out=b)
    np.log(b, out=b)
    np.multiply(b, 1.0 / math.log(p.a + 1.0), out=b)


@_register_stretch("asinh", "graph")
def _asinh_stretch(x: Tensor, p: _StretchParams) -> Tensor:
    """``asinh(x / a) / asinh(1 / a)``; for clipped input (``x >= 0``) through
    ``asinh(x / a) = ln((x + sqrt(x^2 + a^2)) / a)`` (SIMD log/sqrt when compiled)."""
    a = p.a
    if p.clip:
        return ((torch.log(x + torch.sqrt(x * x + a * a)) - math.log(a)) / math.asinh(1.0 / a)).clamp(0.0, 1.0)
    return torch.asinh(x / a) / math.asinh(1.0 / a)


@_register_stretch("asinh", "inplace")
def _asinh_stretch_(y: Tensor, p: _StretchParams) -> Tensor:
    # torch.asinh is a scalar loop on CPU; asinh(x / a) = ln((x + sqrt(x^2 + a^2)) / a) instead, exact
    # for x >= 0 (with clip: x in [0, 1]); log and sqrt are SIMD-vectorised. ~1 ulp of the output.
    a = p.a
    norm = math.asinh(1.0 / a)
    if p.clip:
        r = torch.addcmul(torch.tensor(a * a, dtype=y.dtype, device=y.device), y, y).rsqrt_()
        torch.addcdiv(y, torch.ones((), dtype=y.dtype, device=y.device), r, out=r).log_()
        return torch.add(torch.tensor(-math.log(a) / norm, dtype=y.dtype, device=y.device), r,
                         alpha=1.0 / norm, out=y).clamp_(0.0, 1.0)
    y.div_(a)
    sign = torch.sign(y)
    t = y.abs_()
    huge = t > 1e18 if y.dtype == torch.float32 else None  # t^2 overflows float32
    r = torch.mul(t, t).add_(1.0).sqrt_()
    y = r.add_(t).log_()
    if huge is not None:
        y = torch.where(huge, torch.log(2.0 * t), y)
    return y.mul_(sign).div_(norm)


@_register_stretch("asinh", "numpy")
def _asinh_stretch_np(b, p: _StretchParams) -> None:
    np.multiply(b, 1.0 / p.a, out=b)
    np.arcsinh(b, out=b)
    np.multiply(b, 1.0 / math.asinh(1.0 / p.a), out=b)


def signed_asinh(z: Tensor) -> Tensor:
    """``asinh(z)`` of any real ``z`` (unnormalised; the feature compression of
    :func:`~astroprep_torch.quality.normalize_frame`) as ``sign(z) log1p(|z| + z^2 / (1 + sqrt(1 + z^2)))``
    in a few vectorised passes, the ``log1p`` through numpy's SIMD ufunc on large CPU tensors
    (``torch.asinh`` is a scalar loop on CPU); the same values as ``torch.asinh`` to float rounding."""
    a = z.abs()
    a2 = a * a
    r = a + a2 / (1.0 + torch.sqrt(a2 + 1.0))
    if not numpy_inplace_(r, _log1p_np):
        r = torch.log1p(r)
    return torch.copysign(r, z)


def _log1p_np(b) -> None:
    np.log1p(b, out=b)


@_register_stretch("sinh", "graph")
def _sinh(x: Tensor, p: _StretchParams) -> Tensor:
    """``sinh(x / a) / sinh(1 / a)`` with ``e^t = 2^(t log2 e)`` (exp2 is SIMD-vectorised on CPU)."""
    e = torch.exp2(x * (math.log2(math.e) / p.a))
    return (e - 1.0 / e) * (0.5 / math.sinh(1.0 / p.a))


@_register_stretch("sinh", "inplace")
def _sinh_(y: Tensor, p: _StretchParams) -> Tensor:
    e = y.mul_(math.log2(math.e) / p.a).exp2_()
    return e.sub_(torch.reciprocal(e)).mul_(0.5 / math.sinh(1.0 / p.a))


@_register_stretch("sinh", "numpy")
def _sinh_np(b, p: _StretchParams) -> None:
    np.multiply(b, 1.0 / p.a, out=b)
    np.sinh(b, out=b)
    np.multiply(b, 1.0 / math.sinh(1.0 / p.a), out=b)


@_register_stretch("powerdist", "graph")
def _powerdist(x: Tensor, p: _StretchParams) -> Tensor:
    """``(a^x - 1) / (a - 1)``."""
    return (torch.pow(torch.as_tensor(p.a, dtype=x.dtype, device=x.device), x) - 1.0) / (p.a - 1.0)


@_register_stretch("powerdist", "inplace")
def _powerdist_(y: Tensor, p: _StretchParams) -> Tensor:
    return torch.pow(torch.as_tensor(p.a, dtype=y.dtype, device=y.device), y).sub_(1.0).div_(p.a - 1.0)


def apply_stretch(
    values: Tensor, kind: str = "linear", a: Optional[float] = None, *, clip: bool = True,
    slope: float = 1.0, intercept: float = 0.0, invalid: Optional[float] = None, _owned: bool = False,
) -> Tensor:
    """Apply one of astropy's stretches elementwise to values normalised to ``[0, 1]``.

    Formulas (astropy's): linear ``slope x + intercept``; sqrt ``sqrt(x)``; squared ``x^2``;
    power ``x^a``; log ``log(a x + 1) / log(a + 1)``; asinh ``asinh(x / a) / asinh(1 / a)``;
    sinh ``sinh(x / a) / sinh(1 / a)``; powerdist ``(a^x - 1) / (a - 1)``.

    ``clip`` (astropy's convention): clip the input to ``[0, 1]`` first; the linear stretch is also
    clipped after. With ``clip=False`` out-of-range input is used as is and may give NaN (sqrt/log/
    fractional power of negatives); ``invalid`` replaces those NaNs for sqrt, log and ``0 < a < 1``
    power, as astropy's ``invalid=`` keyword (ignored when ``clip``).

    Eager calls that need no gradient run the ``"inplace"`` / ``"numpy"`` kernels on one output
    buffer (:func:`_stretch_inplace`); the others the ``"graph"`` kernel. Both give the same
    numbers to float rounding (tests compare them).
    """
    a = _check_stretch(kind, a)
    if not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and values.requires_grad):
        return _stretch_inplace(values, kind, a, clip, slope, intercept, invalid, _owned)
    x = values.clamp(0.0, 1.0) if clip else values
    y = _STRETCH_KERNELS[kind]["graph"](x, _StretchParams(a, clip, slope, intercept))
    if _makes_invalid(kind, a) and not clip and invalid is not None:
        y = torch.where(x < 0, torch.full_like(y, float(invalid)), y)
    return y


def _makes_invalid(kind: str, a: Optional[float]) -> bool:
    return kind in ("sqrt", "log") or (kind == "power" and 0 < a < 1)


# Elements per chunk of the eager stretch (16 MB of float32): few op launches, each over
# cache-resident data.
_CHUNK = 1 << 22


def _stretch_inplace(values: Tensor, kind: str, a: Optional[float], clip: bool, slope: float, intercept: float,
                     invalid: Optional[float], owned: bool = False) -> Tensor:
    """Same maths as :func:`apply_stretch` without autograd (eager, no gradient needed).

    Works in place on one output buffer (no temporaries), in chunks of ``_CHUNK`` values, with the
    kind's ``"inplace"`` kernel, or its ``"numpy"`` kernel over the whole buffer where that applies
    (:func:`_numpy_stretch`). ``owned``: ``values`` is a temporary of the caller and becomes the output.
    """
    neg = values < 0 if (_makes_invalid(kind, a) and not clip and invalid is not None) else None
    if owned and values.is_contiguous():
        y = values
    else:
        y = torch.empty_like(values, memory_format=torch.contiguous_format)
        owned = False
    src = values.reshape(-1)
    dst = y.view(-1)
    p = _StretchParams(a, clip, slope, intercept)
    use_np = _numpy_stretch_applies(kind, dst)
    for start in range(0, dst.numel(), _CHUNK):
        out = dst[start:start + _CHUNK]
        chunk = src[start:start + _CHUNK]
        if clip:
            torch.clamp(chunk, 0.0, 1.0, out=out)
        elif not owned:
            out.copy_(chunk)
        if not use_np:
            _stretch_chunk_(out, kind, p)
    if use_np:
        numpy_inplace_(dst, _numpy_stretch(kind, p), min_numel=_NUMPY_MIN)
    if neg is not None:
        y.masked_fill_(neg, float(invalid))
    return y


def _stretch_chunk_(out: Tensor, kind: str, p: _StretchParams) -> None:
    """Run the kind's ``"inplace"`` kernel on ``out``, leaving the result in ``out``."""
    res = _STRETCH_KERNELS[kind]["inplace"](out, p)
    if res is not out:
        out.copy_(res)


# Transcendental stretches on CPU go through numpy's SIMD float ufuncs (the same ones astropy
# calls), split over torch's thread count, in cache-sized blocks: ATen's CPU log/pow/asinh/sinh are
# MKL VML or scalar loops (sqrt is not: 1/rsqrt is as fast). The measured ratios are in
# experiments/results/stretch_kernels.md.
_NUMPY_MIN = 1 << 16
_NUMPY_BLOCK = 1 << 15


def _numpy_stretch_applies(kind: str, t: Tensor) -> bool:
    """Whether the numpy kernel of ``kind`` runs on ``t`` (one exists and ``t`` is a large CPU tensor)."""
    return "numpy" in _STRETCH_KERNELS[kind] and numpy_applies(t, _NUMPY_MIN)


def _numpy_stretch(kind: str, p: _StretchParams) -> Callable:
    """``run(arr)``: the kind's ``"numpy"`` kernel over a numpy array in ``_NUMPY_BLOCK`` blocks."""
    kernel = _STRETCH_KERNELS[kind]["numpy"]

    def run(arr) -> None:
        with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
            for i in range(0, arr.size, _NUMPY_BLOCK):
                kernel(arr[i:i + _NUMPY_BLOCK], p)
    return run


def _check_stretch(kind: str, a: Optional[float]) -> Optional[float]:
    if kind not in STRETCHES:
        raise ValueError(f"kind must be one of {sorted(STRETCHES)}, got {kind!r}")
    if a is None:
        a = STRETCHES[kind]
        if kind == "power":
            raise ValueError("the 'power' stretch needs an exponent a > 0 (astropy's PowerStretch has no default)")
    if a is not None:
        a = float(a)
        if a <= 0:
            raise ValueError(f"a must be > 0 for the {kind!r} stretch, got {a}")
        if kind == "powerdist" and a == 1:
            raise ValueError("a must not be 1 for the 'powerdist' stretch")
    return a


class Stretch(nn.Module):
    """One of astropy's stretches as a module: ``Stretch("asinh")(x)`` on values in ``[0, 1]``.

    Args:
        kind: "linear", "sqrt", "squared", "power", "log", "asinh", "sinh" or "powerdist".
        a: the stretch parameter; ``None`` takes astropy's default (log 1000, asinh 0.1,
            sinh 1/3, powerdist 1000; ``power`` requires it).
        clip: astropy's ``clip`` (default True): clip input to ``[0, 1]`` first.
        slope, intercept: the linear stretch's parameters (astropy ``LinearStretch``).
        invalid: value for NaNs produced with ``clip=False`` (see :func:`apply_stretch`).
    """

    def __init__(self, kind: str = "linear", a: Optional[float] = None, *, clip: bool = True, slope: float = 1.0,
                 intercept: float = 0.0, invalid: Optional[float] = None):
        super().__init__()
        self.kind = str(kind)
        self.a = _check_stretch(self.kind, a)
        self.clip = bool(clip)
        self.slope = float(slope)
        self.intercept = float(intercept)
        self.invalid = None if invalid is None else float(invalid)

    def forward(self, values: Tensor, clip: Optional[bool] = None, _owned: bool = False) -> Tensor:
        """Stretch ``values`` (any shape); ``clip`` overrides the constructor's. (``_owned``:
        internal, ``values`` is a temporary that may be overwritten.)"""
        if not isinstance(values, Tensor) or not values.is_floating_point():
            raise TypeError("values must be a floating torch.Tensor")
        return apply_stretch(values, self.kind, self.a, clip=self.clip if clip is None else clip,
                             slope=self.slope, intercept=self.intercept, invalid=self.invalid, _owned=_owned)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, a={self.a}, clip={self.clip}"


# --------------------------------------------------------------------------------------------
# histogram equalisation
# --------------------------------------------------------------------------------------------


def equalize_hist(
    image: Tensor, mask: Optional[Tensor] = None, *, nbins: int = 256, smooth: bool = False,
    per_channel: bool = True,
) -> Tensor:
    """Histogram equalisation as ``skimage.exposure.equalize_hist`` (float images), per image.

    Rule (skimage's, for float input): ``nbins`` equal bins spanning the good pixels' min..max
    (widened by +-0.5 if they are equal; the last bin includes the maximum); CDF = cumulative
    counts / total; output = linear interpolation of the CDF at bin centres (``np.interp``,
    clamped to ``[cdf[0], 1]`` outside). Every pixel is mapped, masked ones included, as skimage
    does; non-finite pixels stay non-finite. skimage's ``mask`` selects *good* pixels, ours
    (``True`` = bad) excludes them. skimage bins integer images per integer value; tensors here are
    float, so the float rule always applies.

    ``smooth=True``: a differentiable variant: each pixel splits its count linearly between the
    two nearest bin centres (triangular kernel), so the CDF and output are piecewise-differentiable
    functions of every pixel value (and of the min/max that set the bins). Output differs from the
    hard version by about one bin's share of the CDF.

    Args:
        image: ``(B, C, H, W)`` or ``(C, H, W)``; mask: bool broadcastable, True = bad.
        per_channel: one histogram per ``(b, c)`` plane (default) or per image over all channels.
    Returns:
        Tensor like ``image``, values in ``[0, 1]``.
    """
    if nbins < 2:
        raise ValueError(f"nbins must be >= 2, got {nbins}")
    flat, mflat, _ = _as_groups(image, mask, per_channel)
    if not smooth and not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and image.requires_grad):
        return _equalize_eager(flat, mflat, nbins).reshape(image.shape)
    bad = _bad_map(flat, mflat)
    wdt = _work_dtype(flat) if not smooth else flat.dtype
    lo, width = _hist_bins(flat, mflat, nbins, wdt, detach=not smooth)
    xv = torch.where(bad, lo, flat.to(wdt))
    hist = (_smooth_histogram if smooth else _hard_histogram)(xv, bad, lo, width, nbins)
    cdf = hist.cumsum(-1)
    cdf = cdf / cdf[:, -1:].clamp(min=torch.finfo(wdt).tiny)
    return _interp_cdf(flat.to(wdt), cdf, lo, width).to(image.dtype).reshape(image.shape)


def _hist_bins(flat: Tensor, mflat: Optional[Tensor], nbins: int, wdt: torch.dtype, detach: bool):
    """``(lo, width)`` ``(G, 1)`` of ``nbins`` equal bins over each row's good min..max (widened by
    +-0.5 where they are equal), in ``wdt``; ``detach``: no gradient through the limits."""
    lo, hi = _masked_minmax(flat, mflat)
    if detach:
        lo, hi = lo.detach(), hi.detach()
    lo = lo.to(wdt)
    hi = hi.to(wdt)
    same = hi == lo
    lo = torch.where(same, lo - 0.5, lo).unsqueeze(1)
    hi = torch.where(same, hi + 0.5, hi).unsqueeze(1)
    return lo, (hi - lo) / nbins


def _hard_histogram(xv: Tensor, bad: Tensor, lo: Tensor, width: Tensor, nbins: int) -> Tensor:
    """Counts ``(G, nbins)`` of the good values of ``xv`` (skimage's rule: the last bin includes the maximum)."""
    g = xv.shape[0]
    offsets = (torch.arange(g, device=xv.device) * (nbins + 1)).unsqueeze(1)
    idx = torch.floor((xv.detach() - lo) / width).long().clamp(0, nbins - 1)
    idx = torch.where(bad, torch.full_like(idx, nbins), idx) + offsets
    hist = torch.zeros(g * (nbins + 1), dtype=xv.dtype, device=xv.device)
    hist = hist.scatter_add(0, idx.reshape(-1), torch.ones_like(xv).reshape(-1))
    return hist.view(g, nbins + 1)[:, :nbins]


def _smooth_histogram(xv: Tensor, bad: Tensor, lo: Tensor, width: Tensor, nbins: int) -> Tensor:
    """Differentiable counts ``(G, nbins)``: each good pixel splits its count linearly between the two
    nearest bin *edges*; the count up to edge k+1 is the smooth version of skimage's "pixels in bins
    0..k" at centre k."""
    g = xv.shape[0]
    wdt = xv.dtype
    offsets = (torch.arange(g, device=xv.device) * (nbins + 2)).unsqueeze(1)
    p = ((xv - lo) / width).clamp(0.0, float(nbins))
    i0 = torch.floor(p.detach()).long().clamp(0, nbins - 1)
    f = p - i0.to(wdt)
    good = (~bad).to(wdt)
    i0 = torch.where(bad, torch.full_like(i0, nbins + 1), i0) + offsets
    i1 = torch.where(bad, i0, i0 + 1)
    hist = torch.zeros(g * (nbins + 2), dtype=wdt, device=xv.device)
    hist = hist.scatter_add(0, i0.reshape(-1), ((1.0 - f) * good).reshape(-1))
    hist = hist.scatter_add(0, i1.reshape(-1), (f * good).reshape(-1))
    hist = hist.view(g, nbins + 2)[:, : nbins + 1]
    return torch.cat([hist[:, :2].sum(-1, keepdim=True), hist[:, 2:]], dim=1)


def _interp_cdf(xin: Tensor, cdf: Tensor, lo: Tensor, width: Tensor) -> Tensor:
    """``np.interp`` of ``cdf`` ``(G, nbins)`` at the (uniform) bin centres ``lo + (k + 1/2) width``,
    clamped outside; non-finite values stay as they are."""
    nbins = cdf.shape[1]
    p = ((xin - lo) / width - 0.5).clamp(0.0, nbins - 1.0)
    i0 = torch.floor(p.detach()).long().clamp(0, nbins - 2)
    i0 = torch.where(torch.isfinite(xin), i0, torch.zeros_like(i0))
    f = p - i0.to(xin.dtype)
    c0 = cdf.gather(1, i0)
    c1 = cdf.gather(1, i0 + 1)
    out = c0 + (c1 - c0) * f
    return torch.where(torch.isfinite(xin), out, xin)


def _equalize_eager(flat: Tensor, mflat: Optional[Tensor], nbins: int) -> Tensor:
    """The hard equalisation without autograd/compile: same rule as :func:`equalize_hist`, with
    few full-frame passes (int32 indices, ``bincount`` for the histogram, in-place arithmetic, two
    table lookups for the interpolation). Works in the image dtype."""
    g, length = flat.shape
    dev = flat.device
    clean = mflat is None and bool(torch.isfinite(flat.sum(-1)).all())
    if clean:
        lo, hi = flat.amin(-1), flat.amax(-1)
        bad = None
    else:
        lo, hi = _masked_minmax(flat, mflat)
        bad = _bad_map(flat, mflat)
    same = hi == lo
    lo = torch.where(same, lo - 0.5, lo).unsqueeze(1)
    hi = torch.where(same, hi + 0.5, hi).unsqueeze(1)
    scale = nbins / (hi - lo)
    u = flat - lo
    u.mul_(scale)  # position in bins from the lower edge, >= 0 for good pixels
    rows = torch.arange(g, device=dev, dtype=torch.int32).unsqueeze(1)
    idx = u.clamp(0.0, nbins - 1.0).to(torch.int32)  # truncation == floor here
    idx.add_(rows * (nbins + 1))
    if bad is not None:  # excluded pixels go to each row's extra (dump) bin
        idx = torch.where(bad, rows * (nbins + 1) + nbins, idx)
    hist = torch.bincount(idx.view(-1), minlength=g * (nbins + 1)).view(g, nbins + 1)[:, :nbins]
    cdf = hist.cumsum(-1).to(torch.float64)
    cdf = (cdf / cdf[:, -1:].clamp(min=1.0)).to(flat.dtype)
    # np.interp at the bin centres (u - 0.5 in centre units), clamped outside
    u.sub_(0.5).clamp_(0.0, nbins - 1.0)
    i0 = u.to(torch.int32).clamp_(max=nbins - 2)
    u.sub_(i0)  # fraction in [0, 1]
    i0.add_(rows * (nbins - 1))
    i0 = i0.view(-1).clamp_(0, g * (nbins - 1) - 1)  # NaN pixels: any valid index, fixed below
    base = cdf[:, :-1].reshape(-1)
    step = (cdf[:, 1:] - cdf[:, :-1]).reshape(-1)
    out = step.index_select(0, i0).view(g, length).mul_(u).add_(base.index_select(0, i0).view(g, length))
    if not clean:
        out = torch.where(torch.isfinite(flat), out, flat)
    return out


class HistogramEqualization(nn.Module):
    """Histogram equalisation (``skimage.exposure.equalize_hist``), batched: see :func:`equalize_hist`.

    Args:
        nbins: number of histogram bins (skimage's default 256).
        mask: optional fixed bool mask (True = bad, e.g. a detector defect map) broadcastable to the
            images; OR-ed with the ``mask`` given to ``forward``.
        smooth: use the differentiable (linearly binned) variant.
        per_channel: one histogram per channel (default) or per image.
    """

    def __init__(self, nbins: int = 256, mask: Optional[Tensor] = None, smooth: bool = False, per_channel: bool = True):
        super().__init__()
        if nbins < 2:
            raise ValueError(f"nbins must be >= 2, got {nbins}")
        self.nbins = int(nbins)
        self.smooth = bool(smooth)
        self.per_channel = bool(per_channel)
        if mask is not None and (not isinstance(mask, Tensor) or mask.dtype != torch.bool):
            raise TypeError("mask must be a bool torch.Tensor (True = bad) or None")
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, image: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        if self.mask is not None:
            fixed = check_mask(self.mask, image, "HistogramEqualization.mask")
            mask = fixed if mask is None else (fixed | check_mask(mask, image))
        return equalize_hist(image, mask, nbins=self.nbins, smooth=self.smooth, per_channel=self.per_channel)

    def extra_repr(self) -> str:
        return f"nbins={self.nbins}, smooth={self.smooth}, per_channel={self.per_channel}"


# --------------------------------------------------------------------------------------------
# normalisation for display / networks
# --------------------------------------------------------------------------------------------


def normalize(
    image: Tensor, mask: Optional[Tensor] = None, *, interval: Optional[BaseInterval] = None,
    stretch: Optional[Union[Stretch, str]] = None, clip: bool = True, per_channel: bool = True,
) -> Tensor:
    """Map ``image`` to ``[0, 1]`` as astropy's ``ImageNormalize(interval=, stretch=, clip=)``.

    ``(x - vmin) / (vmax - vmin)`` (0 where ``vmax == vmin``), clipped to ``[0, 1]`` if ``clip``,
    then ``stretch(values, clip=False)``; with ``clip`` the output lies in ``[0, 1]`` for every
    stretch except a linear one with ``slope``/``intercept`` (astropy does not clip after it either).
    Defaults: :class:`ZScale` and a linear stretch. Limits are per channel by default
    (``per_channel=False``: per image over all channels). ``mask`` (True = bad) only excludes
    pixels from the limits; every pixel is mapped.
    """
    interval = ZScale() if interval is None else interval
    if stretch is None:
        stretch = Stretch("linear")
    elif isinstance(stretch, str):
        stretch = Stretch(stretch)
    vmin, vmax = interval.limits(image, mask, per_channel)
    if not torch.compiler.is_compiling() and not (torch.is_grad_enabled() and image.requires_grad):
        return _normalize_eager(image, vmin, vmax, clip, stretch)
    out = _rescale(image, _limits_shape(vmin, image), _limits_shape(vmax, image), clip)
    return stretch(out, clip=False, _owned=True)


def _normalize_eager(image: Tensor, vmin: Tensor, vmax: Tensor, clip: bool, stretch: "Stretch") -> Tensor:
    """Rescale + stretch without autograd, in place on one output buffer (plane by plane, in chunks
    of ``_CHUNK`` values; transcendental stretches through numpy's ufuncs). Eager-only fast path;
    the same arithmetic as :func:`_rescale` followed by the stretch."""
    g = vmin.numel()
    flat = image.reshape(g, -1)
    out = torch.empty(flat.shape, dtype=image.dtype, device=image.device)
    lo = vmin.reshape(-1).to(image.dtype)
    span = vmax.reshape(-1).to(image.dtype) - lo
    same = span == 0
    scale = 1.0 / torch.where(same, torch.ones_like(span), span)
    lo_l, scale_l, same_l = lo.tolist(), scale.tolist(), same.tolist()  # one host sync
    replace = _makes_invalid(stretch.kind, stretch.a) and stretch.invalid is not None and not clip
    use_np = not replace and _numpy_stretch_applies(stretch.kind, out[0])
    # clipped values lie in [0, 1]: the stretch may take its non-negative branch (but a linear
    # stretch is not clipped after, as astropy's ImageNormalize calls it with clip=False)
    p = _StretchParams(stretch.a, clip and stretch.kind != "linear", stretch.slope, stretch.intercept)
    kernel = _numpy_stretch(stretch.kind, p) if use_np else None
    for row in range(g):
        for start in range(0, flat.shape[1], _CHUNK):
            o = out[row, start:start + _CHUNK]
            torch.sub(flat[row, start:start + _CHUNK], lo_l[row], out=o)
            if same_l[row]:
                o.mul_(0.0)
            else:
                o.mul_(scale_l[row])
            if clip:
                o.clamp_(0.0, 1.0)
            if use_np:
                continue
            neg = o < 0 if replace else None
            _stretch_chunk_(o, stretch.kind, p)
            if neg is not None:
                o.masked_fill_(neg, stretch.invalid)
        if use_np:
            numpy_inplace_(out[row], kernel, min_numel=_NUMPY_MIN)
    return out.view(image.shape)


class Normalize(nn.Module):
    """Interval + stretch to ``[0, 1]``: a torchvision/Lightning-style transform on ``(B, C, H, W)``
    or ``(C, H, W)`` (see :func:`normalize`).

    Args:
        interval: an interval module (default :class:`ZScale`).
        stretch: a :class:`Stretch` or its kind (default linear).
        clip: clip to ``[0, 1]`` before stretching (astropy's ``clip``).
        per_channel: limits per channel (default) or per image over all channels; this overrides
            the interval's own ``per_channel``.
    """

    def __init__(self, interval: Optional[BaseInterval] = None, stretch: Optional[Union[Stretch, str]] = None,
                 clip: bool = True, per_channel: bool = True):
        super().__init__()
        self.interval = ZScale() if interval is None else interval
        self.stretch = Stretch("linear") if stretch is None else (Stretch(stretch) if isinstance(stretch, str) else stretch)
        if not isinstance(self.interval, BaseInterval):
            raise TypeError(f"interval must be a BaseInterval (ZScale, PercentileInterval, ...), got {type(interval).__name__}")
        if not isinstance(self.stretch, Stretch):
            raise TypeError(f"stretch must be a Stretch or a stretch kind, got {type(stretch).__name__}")
        self.clip = bool(clip)
        self.per_channel = bool(per_channel)

    def forward(self, image: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        return normalize(image, mask, interval=self.interval, stretch=self.stretch, clip=self.clip,
                         per_channel=self.per_channel)


def to_uint8(image: Tensor, *, rounding: str = "floor") -> Tensor:
    """``[0, 1]`` floats to ``uint8`` in ``[0, 255]``.

    ``rounding="floor"`` truncates ``255 x`` as astropy's RGB code (``(x * 255).astype(uint8)``);
    ``"round"`` rounds to nearest. Values are clipped to ``[0, 1]`` first; NaN maps to 0.
    Not differentiable (integer output).
    """
    if rounding not in ("floor", "round"):
        raise ValueError(f"rounding must be 'floor' or 'round', got {rounding!r}")
    x = torch.nan_to_num(image.detach(), nan=0.0).clamp(0.0, 1.0) * 255.0
    x = torch.floor(x) if rounding == "floor" else torch.round(x)
    return x.to(torch.uint8)


# --------------------------------------------------------------------------------------------
# Lupton et al. (2004) RGB composites
# --------------------------------------------------------------------------------------------


def lupton_asinh(values: Tensor, stretch: float = 5.0, Q: float = 8.0) -> Tensor:
    """astropy's ``LuptonAsinhStretch``: ``asinh(Q x / stretch) * 0.1 / asinh(0.1 Q)`` (no clipping);
    ``Q`` below ``2^-23`` becomes 0.1 and above 1e10 is capped, as astropy."""
    if stretch < 0 or Q < 0:
        raise ValueError(f"stretch and Q must be non-negative, got stretch={stretch}, Q={Q}")
    if abs(Q) < 1.0 / 2**23:
        Q = 0.1
    elif Q > 1e10:
        Q = 1e10
    frac = 0.1
    return torch.asinh(values * (Q / float(stretch))) * (frac / math.asinh(frac * Q))


def _rgb_input(x, name: str) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating torch.Tensor shaped (H, W), (B, H, W) or (B, 1, H, W)")
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"{name} shaped (B, C, H, W) must have C == 1, got {tuple(x.shape)}")
        return x[:, 0]
    if x.dim() not in (2, 3):
        raise ValueError(f"{name} must be shaped (H, W), (B, H, W) or (B, 1, H, W), got {tuple(x.shape)}")
    return x


def make_lupton_rgb(
    image_r: Tensor, image_g: Tensor, image_b: Tensor, *,
    interval: Optional[Union[BaseInterval, Sequence[BaseInterval]]] = None,
    stretch_object: Optional[nn.Module] = None, minimum: Optional[Union[float, Sequence[float]]] = None,
    stretch: float = 5.0, Q: float = 8.0, output_dtype: torch.dtype = torch.uint8,
) -> Tensor:
    """Three-band composite following Lupton et al. (2004), as astropy's ``make_lupton_rgb``.

    Steps (astropy's): subtract each band's ``vmin`` (from ``interval``, default ``vmin = 0``, or
    ``minimum``); intensity ``I = (r + g + b) / 3``; scale every band by ``f(I) / I`` (0 where
    ``I <= 0``) with ``f`` = :func:`lupton_asinh` (or ``stretch_object`` with ``clip=False``);
    clip below at 0; divide by ``max(r, g, b)`` where it exceeds 1; ``uint8`` output truncates
    ``255 x`` as astropy.

    Args:
        image_r, image_g, image_b: same shape ``(H, W)``, ``(B, H, W)`` or ``(B, 1, H, W)``.
        output_dtype: ``torch.uint8`` (default) or a float dtype (values in ``[0, 1]``).
    Returns:
        ``(3, H, W)`` or ``(B, 3, H, W)`` channels-first (astropy returns ``(H, W, 3)``).
    """
    r, g, b = (_rgb_input(x, n) for x, n in ((image_r, "image_r"), (image_g, "image_g"), (image_b, "image_b")))
    if not (r.shape == g.shape == b.shape):
        raise ValueError(f"The image shapes must match. r: {tuple(r.shape)}, g: {tuple(g.shape)} b: {tuple(b.shape)}")
    shifted = []
    for band, iv in zip((r, g, b), _lupton_intervals(interval, minimum)):
        x4 = band.reshape((-1, 1) + band.shape[-2:])
        vmin = iv.limits(x4, None, False).vmin.reshape((-1, 1, 1)).to(band.dtype)
        shifted.append(band.reshape((-1,) + band.shape[-2:]) - vmin)
    rgb = _lupton_scale(torch.stack(shifted, dim=1), stretch_object, stretch, Q)  # (N, 3, H, W)
    rgb = rgb.reshape(r.shape[:-2] + (3,) + r.shape[-2:])
    if output_dtype == torch.uint8:
        return to_uint8(rgb)
    if not output_dtype.is_floating_point:
        raise ValueError(f"output_dtype must be torch.uint8 or a float dtype, got {output_dtype}")
    return rgb.to(output_dtype)


def _lupton_intervals(interval, minimum) -> list:
    """The three bands' intervals: ``interval`` (one or three), else ``minimum`` (one or three values)
    as manual lower limits, else ``vmin = 0``."""
    if interval is None:
        if minimum is not None:
            mins = list(minimum) if isinstance(minimum, (list, tuple)) else [minimum] * 3
            if len(mins) != 3:
                raise ValueError("please provide 1 or 3 values for minimum.")
            interval = [ManualInterval(vmin=m) for m in mins]
        else:
            interval = ManualInterval(vmin=0.0)
    intervals = list(interval) if isinstance(interval, (list, tuple)) else [interval] * 3
    if len(intervals) != 3:
        raise ValueError("please provide 1 or 3 intervals.")
    return intervals


def _lupton_scale(rgb: Tensor, stretch_object: Optional[nn.Module], stretch: float, Q: float) -> Tensor:
    """Scale ``(N, 3, H, W)`` bands by ``f(I) / I`` of their mean ``I`` (0 where ``I <= 0``), clip
    below at 0 and divide by the largest band where it exceeds 1."""
    intensity = (rgb[:, 0:1] + rgb[:, 1:2] + rgb[:, 2:3]) / 3.0
    if stretch_object is None:
        f_i = lupton_asinh(intensity, stretch, Q)
    elif isinstance(stretch_object, Stretch):
        f_i = stretch_object(intensity, clip=False)
    else:
        f_i = stretch_object(intensity)
    positive = intensity > 0
    ratio = torch.where(positive, f_i / torch.where(positive, intensity, torch.ones_like(intensity)),
                        torch.zeros_like(intensity))
    rgb = (rgb * ratio).clamp(min=0.0)
    peak = rgb.amax(dim=1, keepdim=True)
    over = peak > 1.0
    return torch.where(over, rgb / torch.where(over, peak, torch.ones_like(peak)), rgb)
