"""The alignment stage of a graph: :class:`AlignToReference` brings frames onto the reference grid
(WCS reprojection, or star matching when a WCS is missing) with their masks, extra maps and
variance."""

from __future__ import annotations

import warnings
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from .. import align
from ..align import AlignmentError, transform_scale_rotation

class AlignedFrames(NamedTuple):
    """Output of :class:`AlignToReference`: frames on the reference grid.

    ``image`` ``(B, 1, H, W)`` (0 where not covered), ``extra`` the other maps aligned with it
    (``(B, C, H, W)`` or None), ``mask`` bool (True where not fully covered or bad), ``footprint``
    in [0, 1], ``method`` (``"wcs"`` or ``"stars"``) and ``variance``: the input variance propagated
    through the interpolation weights (``sum_i w_i^2 var_i``; 0 where not covered) or None.
    """

    image: Tensor
    extra: Optional[Tensor]
    mask: Tensor
    footprint: Tensor
    method: str
    variance: Optional[Tensor] = None


class AlignToReference(nn.Module):
    """Bring frames onto the reference grid: WCS reprojection, or star matching without a WCS.

    Args:
        method: ``"auto"`` (WCS when both WCS are given, else stars), ``"wcs"`` or ``"stars"``.
        interpolation: resampling kernel (``"bilinear"``, ``"bicubic"``, ``"lanczos3"``, ``"nearest"``).
        grid_step: WCS mapping evaluated every ``grid_step`` pixels and interpolated (None: exact).
        transform: ``"similarity"`` or ``"affine"`` for star matching.
        fused: WCS reprojection through ``torch.compile``-fused resampling kernels
            (``align.reproject(fused=True)``; set by ``PreprocessModule(compile=True)``).
        min_inlier_fraction, scale_range, max_rotation: plausibility bounds of a star-matching
            registration: the fraction of the matched sources that supports it, its scale and its
            rotation (degrees). A registration outside them raises ``AlignmentError`` (a frame of
            another field, or chance matches) instead of producing a wrong alignment.

    ``forward(image, reference, mask=None, reference_mask=None, src_wcs=None, dst_wcs=None,
    extra=None, variance=None) -> AlignedFrames``: ``extra`` ``(B, C, H, W)`` maps go along,
    resampled as images; ``variance`` ``(B, 1, H, W)`` is propagated through the interpolation
    weights (use it for noise maps: an rms map resampled as an image overstates the noise).
    Without a reference WCS every frame is registered by star matching: said once (a warning).
    """

    def __init__(self, method: str = "auto", interpolation: str = "bilinear", grid_step: Optional[int] = 32,
                 transform: str = "similarity", fused: bool = False, min_inlier_fraction: float = 0.1,
                 scale_range: Sequence[float] = (0.9, 1.1), max_rotation: float = 180.0):
        super().__init__()
        if method not in ("auto", "wcs", "stars"):
            raise ValueError(f"method must be 'auto', 'wcs' or 'stars', got {method!r}")
        self.method, self.interpolation, self.grid_step, self.transform = method, interpolation, grid_step, transform
        self.fused = bool(fused)
        lo, hi = (float(v) for v in scale_range)
        if not 0 < lo <= 1 <= hi:
            raise ValueError(f"scale_range must be (low <= 1, high >= 1) with low > 0, got {scale_range!r}")
        self.min_inlier_fraction, self.scale_range, self.max_rotation = float(min_inlier_fraction), (lo, hi), float(max_rotation)
        self._said_stars = False

    def _check_plausible(self, r) -> None:
        """Raise ``AlignmentError`` for a star-matching registration outside the bounds."""
        for b in range(r.matrix.shape[0]):
            scale, rot = transform_scale_rotation(r.matrix[b])
            if not self.scale_range[0] <= scale <= self.scale_range[1] or abs(rot) > self.max_rotation:
                raise AlignmentError(
                    f"frame {b}: implausible registration (scale {scale:.3f} outside {self.scale_range} or rotation "
                    f"{rot:.1f} deg beyond {self.max_rotation:g}; {int(r.n_inliers[b])} star pairs): a frame of "
                    "another field? (AlignToReference scale_range / max_rotation)")

    def _say_stars(self, dst_wcs) -> None:
        if self.method == "auto" and not self._said_stars:
            self._said_stars = True
            warnings.warn(f"AlignToReference: {'the reference has no WCS' if dst_wcs is None else 'a frame has no WCS'}"
                          ": frames are registered by star matching (said once)", stacklevel=3)

    def forward(self, image: Tensor, reference: Tensor, mask: Optional[Tensor] = None,
                reference_mask: Optional[Tensor] = None, src_wcs=None, dst_wcs=None,
                extra: Optional[Tensor] = None, variance: Optional[Tensor] = None) -> AlignedFrames:
        c = image.shape[1]
        # Bad pixels become NaN, which spreads to every output pixel whose kernel touches them (as in
        # reproject); that is exact for masking and much cheaper than renormalised masked sampling.
        # The frame (marked) and the extra maps are written into one new stack: one frame-sized
        # allocation, not two.
        if mask is None and extra is None:
            stack = image
        else:
            ce = 0 if extra is None else extra.shape[1]
            stack = image.new_empty((image.shape[0], c + ce, *image.shape[-2:]))
            stack[:, :c] = image
            if mask is not None:
                stack[:, :c].masked_fill_(mask.expand_as(image), float("nan"))
            if extra is not None:
                stack[:, c:] = extra
        use_wcs = self.method == "wcs" or (self.method == "auto" and src_wcs is not None and dst_wcs is not None)
        if use_wcs:
            if src_wcs is None or dst_wcs is None:
                raise ValueError("AlignToReference(method='wcs') needs src_wcs and dst_wcs")
            r = align.reproject(stack, src_wcs, dst_wcs, tuple(reference.shape[-2:]), None,
                                interpolation=self.interpolation, grid_step=self.grid_step, fused=self.fused,
                                variance=variance)
            out, footprint, method, var_out = r.image, r.footprint, "wcs", r.variance
        else:
            self._say_stars(dst_wcs)
            r = align.register(image, reference, mask, reference_mask, transform=self.transform,
                               interpolation=self.interpolation, min_inlier_fraction=self.min_inlier_fraction)
            self._check_plausible(r)
            out, footprint, method = r.image, r.footprint, "stars"
            var_out = None if variance is None else align.warp_variance(variance, r.matrix, reference.shape[-2:],
                                                                        out[:, :c], interpolation=self.interpolation)
            if extra is not None:  # align's warp (closed-form 2x2 inverse: no batched LAPACK call)
                warped, _ = align.warp_affine(extra, r.matrix.to(extra.dtype), tuple(reference.shape[-2:]))
                out = torch.cat([out, warped], dim=1)
        if method == "wcs":
            # reproject's footprint is 0 wherever any channel is not finite (those pixels hold NaN)
            # and 1 elsewhere: the footprint alone marks the bad pixels, and the NaNs become 0 in place
            # (the output is reproject's own new tensor)
            bad = footprint < 0.999
            out.nan_to_num_(nan=0.0)
        else:
            bad = ~torch.isfinite(out[:, :c]).all(dim=1, keepdim=True) | (footprint < 0.999)
            out = torch.nan_to_num(out, nan=0.0)
        if reference_mask is not None:
            bad = bad | reference_mask
        if var_out is not None:
            var_out = var_out[:, :c].nan_to_num(nan=0.0)
        return AlignedFrames(out[:, :c], out[:, c:] if extra is not None else None, bad, footprint, method, var_out)
