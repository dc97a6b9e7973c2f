"""Glue modules: the small steps between stages (mask union, map arithmetic, the variance of a
difference, triplet cutouts, a reference computed once per batch), so that a graph's config spells
out the whole flow."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch import Tensor

from .._robust import mad_std
from ..cutouts import make_triplets
from ..detect.filter import _as_kernel

class MaskUnion(nn.Module):
    """``a | b`` for bool masks (either may be None)."""

    def forward(self, a: Optional[Tensor] = None, b: Optional[Tensor] = None) -> Optional[Tensor]:
        if a is None:
            return b
        if b is None:
            return a
        return a | b


class SubtractMap(nn.Module):
    """``image - other`` (e.g. the background)."""

    def forward(self, image: Tensor, other: Tensor) -> Tensor:
        return image - other


class Square(nn.Module):
    """``x ** 2`` (rms -> variance)."""

    def forward(self, x: Tensor) -> Tensor:
        return x * x


class SquareRoot(nn.Module):
    """``sqrt(clamp(x, 0))`` (variance -> rms)."""

    def forward(self, x: Tensor) -> Tensor:
        out = x.clamp(min=0)  # a new tensor: the root is taken in place (one frame-sized buffer, not two)
        return out.sqrt_() if not (out.requires_grad and torch.is_grad_enabled()) else out.sqrt()


class SourceVariance(nn.Module):
    """``rms^2 + max(image, 0) / gain``: the background variance plus the sources' Poisson term.

    ``image`` is background-subtracted (ADU) and ``gain`` in e-/ADU (``None``: the background term
    alone). Without the source term the variance of a difference is too small at star cores and
    every bright star leaves false 5-sigma peaks. A gain below the true one overstates the source
    term (conservative).

    ``variance`` (optional, ADU^2, on the frame's grid, NaN/inf where unknown): a per-pixel variance
    map, e.g. a calibrated frame's (its noise follows 1/flat: vignetting, dust donuts, faster than the
    background meshes), used instead of the model wherever it is finite. ``map_level``:
    ``"measured"`` (default) scales each frame's map to the noise measured in the frame, as
    SExtractor's ``WEIGHT_TYPE MAP_VAR``: by ``mean(rms^2) / mean(variance)`` over its sky pixels
    (``image < 2 rms``: :func:`measured_scale`), so the map gives the pattern and the frame's own scatter (unresolved
    sources, calibration errors) the level; ``"absolute"`` takes it as it is (``MAP_RMS``-like).
    ``map_sources``: the model's source term is added to the map too (the map's own source term is
    the true Poisson noise; the model's, with a gain below the true one, is the margin that covers
    the subtraction's residuals at stars, and without it a map gives more candidates on stars than
    the model does)."""

    def __init__(self, gain: Optional[float] = 1.0, map_level: str = "measured", map_sources: bool = True):
        super().__init__()
        if gain is not None and not gain > 0:
            raise ValueError(f"gain must be positive or None, got {gain!r}")
        if map_level not in ("measured", "absolute"):
            raise ValueError(f"map_level must be 'measured' or 'absolute', got {map_level!r}")
        self.gain = gain
        self.map_level = map_level
        self.map_sources = bool(map_sources)

    def forward(self, rms: Tensor, image: Tensor, variance: Optional[Tensor] = None) -> Tensor:
        var = self.model(rms, image)
        if variance is None:
            return var
        variance = variance.to(var.device, var.dtype)
        known = torch.isfinite(variance)
        if self.map_level == "measured":
            variance = variance * measured_scale(rms, image, variance, known)
        if self.map_sources and self.gain is not None:
            variance = variance + image.clamp(min=0) / float(self.gain)
        return torch.where(known, variance, var)

    def model(self, rms: Tensor, image: Tensor) -> Tensor:
        """The variance model: ``rms^2`` plus the sources' Poisson term."""
        var = rms.square()
        if self.gain is None:
            return var
        return var.add_(image.clamp(min=0), alpha=1.0 / float(self.gain)) if not var.requires_grad else \
            var + image.clamp(min=0) / float(self.gain)


class CorrelatedNoise(nn.Module):
    """The rms for detection on a resampled difference: ``rms`` times ``c >= 1``, the excess noise of
    the *filtered* ``image / rms`` over white noise's.

    Interpolation (bilinear above all) correlates neighbouring pixels: the per-pixel variance
    propagated through the weights is right, but the detection filter averages correlated values,
    so the filtered noise is ``c`` times what white noise of that variance gives and a threshold in
    units of ``rms`` lets many more noise peaks through. ``c`` is the robust (MAD) std of the filtered
    ``image / rms`` (on every ``step``-th pixel, masked and non-finite pixels left out; sources are few)
    over ``sqrt(sum k^2)`` of the normalised kernel ``k``, per frame, floored at 1: on white noise the
    rms is returned unchanged (within the estimate's noise, which the floor absorbs)."""

    def __init__(self, kernel="default", step: int = 4):
        super().__init__()
        if int(step) < 1:
            raise ValueError(f"step must be >= 1, got {step!r}")
        self.kernel, self.step = kernel, int(step)

    def forward(self, image: Tensor, rms: Tensor, mask: Optional[Tensor] = None) -> Tensor:
        k = _as_kernel(self.kernel, torch.float64, image.device)
        if k is None:
            return rms
        zf = _filtered_samples(image.detach(), rms.detach().expand_as(image),
                               None if mask is None else mask.expand_as(image), k, self.step)
        c = mad_std(zf.flatten(1), 1, ignore_nan=True) / k.square().sum().sqrt()
        c = torch.nan_to_num(c, nan=1.0).clamp(min=1.0)
        return rms * c.to(rms.dtype).view(-1, *([1] * (rms.dim() - 1)))


def _filtered_samples(image: Tensor, rms: Tensor, mask: Optional[Tensor], k: Tensor, step: int) -> Tensor:
    """``k`` correlated with ``z = image / rms`` (float64; NaN at masked or non-finite pixels) at every
    ``step``-th valid position of ``(B,1,H,W)`` frames, from shifted strided views: only the sampled
    pixels are read, no frame-sized temporary is made. ``(B,1,h,w)``; NaN where any input is NaN."""
    kh, kw = k.shape
    H, W = image.shape[-2:]
    out = None
    for i in range(kh):
        for j in range(kw):
            view = (..., slice(i, H - kh + 1 + i, step), slice(j, W - kw + 1 + j, step))
            z = image[view].double() / rms[view].double()
            bad = ~torch.isfinite(z) if mask is None else (mask[view] | ~torch.isfinite(z))
            v = z.masked_fill_(bad, float("nan")) * k[i, j]
            out = v if out is None else out + v
    return out


def measured_scale(rms: Tensor, image: Tensor, variance: Tensor, known: Tensor) -> Tensor:
    """Per frame ``(B, 1, 1, 1)``: ``mean(rms^2) / mean(variance)`` over the sky pixels (finite map,
    ``image < 2 rms``), a ratio of means so that a map whose pattern the meshes average over (their
    ``rms^2`` the local mean variance) keeps its level; 1 for a frame without such pixels."""
    sky = (known & (image < 2 * rms)).to(variance.dtype)
    n = sky.sum(dim=(1, 2, 3))
    mean_model = (rms.square() * sky).sum(dim=(1, 2, 3)) / n.clamp(min=1)
    mean_map = (torch.where(known, variance, 0.0) * sky).sum(dim=(1, 2, 3)) / n.clamp(min=1)
    scale = torch.where((n > 0) & (mean_map > 0), mean_model / mean_map.clamp(min=torch.finfo(variance.dtype).tiny), 1.0)
    return scale.view(-1, 1, 1, 1)


class CandidateTriplets(nn.Module):
    """Science / reference / difference cutouts ``(N, 3, size, size)`` at catalog positions."""

    def __init__(self, size: int = 63):
        super().__init__()
        self.size = int(size)

    def forward(self, science: Tensor, reference: Tensor, difference: Tensor, catalog) -> Tensor:
        xy = torch.stack([catalog["x"], catalog["y"]], dim=1)
        return make_triplets(science, reference, difference, xy, size=self.size, batch_index=catalog["batch_index"]).stamps


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: Tensor) -> Tensor:
    """A floating tensor's bit patterns (an integer view; other dtypes as they are): ``torch.equal``
    on them is exact and NaN-safe, where on the floats a single NaN (a blank pixel) makes two
    identical images unequal."""
    if t.is_floating_point() and t.element_size() in _SAME_SIZE_INT:
        return t.view(_SAME_SIZE_INT[t.element_size()])
    return t


class SharedReference(nn.Module):
    """Run ``module`` once on the first batch element and repeat its tensor outputs over the batch.

    The reference is the same for every frame of a batch; this avoids B identical computations
    (its background, for instance). Every tensor argument is sliced to its first element.

    Args:
        module: the stage to run on the reference.
        cache: keep the last result and reuse it while the inputs are the same: a survey run
            processes thousands of frames against one reference, so its products are made once.
            "The same" is checked exactly (``torch.equal`` of the bit patterns against a kept copy
            of the inputs, one pass over them; NaN pixels compare equal to themselves), never by
            identity or a hash, so a changed reference is never missed.
    """

    def __init__(self, module: nn.Module, cache: bool = True):
        super().__init__()
        self.module = module
        self.cache = bool(cache)
        self._kept: Optional[tuple] = None  # (inputs, output)

    def _hit(self, args: dict):
        if self._kept is None:
            return None
        kept, out = self._kept
        if kept.keys() != args.keys():
            return None
        for k, v in args.items():
            w = kept[k]
            if isinstance(v, Tensor) != isinstance(w, Tensor):
                return None
            if isinstance(v, Tensor):
                if (v.shape != w.shape or v.dtype != w.dtype or v.device != w.device
                        or not (v is w or torch.equal(_bits(v), _bits(w)))):
                    return None
            elif v is not w:
                try:
                    if not bool(v == w):
                        return None
                except Exception:  # no plain equality (arrays, WCS objects): not the same
                    return None
        return out

    def forward(self, **kwargs):
        b = next(v.shape[0] for v in kwargs.values() if isinstance(v, Tensor))
        args = {k: (v[:1] if isinstance(v, Tensor) else v) for k, v in kwargs.items()}
        grad = torch.is_grad_enabled() and any(isinstance(v, Tensor) and v.requires_grad for v in args.values())
        out = None if (grad or not self.cache) else self._hit(args)
        if out is None:
            out = self.module(**args)
            if self.cache and not grad:
                self._kept = ({k: (v.detach().clone() if isinstance(v, Tensor) else v) for k, v in args.items()}, out)

        def rep(v):
            return v.expand(b, *v.shape[1:]) if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == 1 else v

        if isinstance(out, tuple) and hasattr(out, "_fields"):
            return type(out)(*[rep(v) for v in out])
        if isinstance(out, tuple):
            return tuple(rep(v) for v in out)
        return rep(out)
