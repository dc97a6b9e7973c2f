"""The segmentation as ``measure`` reads it: a dense label map or the detector's pixel lists.

:class:`SegmentPixels` is what :class:`astroprep_torch.detect.SourceExtractor` hands to
:func:`~astroprep_torch.photometry.measure`: the labelled pixels of every object and the pixels above
the detection threshold, so that no frame-sized segmentation, filtered image or blank map is made.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor


class SegmentPixels(NamedTuple):
    """A segmentation of a ``(B, 1, H, W)`` batch as pixel lists (as ``detect.detect_sources`` returns).

    Flat pixel indices run over ``B * H * W`` (``b * H * W + y * W + x``); objects are ordered by
    ``(batch_index, label)``.

    Attributes:
        pixels: ``(Q,)`` int64 sorted flat indices of the labelled (object) pixels.
        pixel_row: ``(Q,)`` int64 object row of each of ``pixels``.
        batch_index: ``(N,)`` int64 frame of each object.
        label: ``(N,)`` int64 label of each object (1..n per frame, as in the dense map).
        pixel_filtered: ``(Q,)`` the detection-filtered image at ``pixels`` (barycentres and second
            moments are taken on it, as SExtractor does).
        detected: ``(P,)`` int64 sorted flat indices of every pixel above the detection threshold in
            the filtered image (the neighbour pixels SExtractor's MASK_TYPE blanks).
        unblanked: ``(U,)`` int64 flat indices of detected pixels that are never blanked (None: none):
            SExtractor pastes the pixels of objects removed by CLEAN back into the image, so they count
            as ordinary pixels in every other object's apertures.
    """

    pixels: Tensor
    pixel_row: Tensor
    batch_index: Tensor
    label: Tensor
    pixel_filtered: Tensor
    detected: Tensor
    unblanked: Optional[Tensor] = None

    def dense(self, shape) -> Tensor:
        """The ``(B, 1, H, W)`` int64 label map of ``shape`` (0 = no object)."""
        seg = torch.zeros(int(torch.Size(shape).numel()), dtype=torch.long, device=self.pixels.device)
        seg.index_put_((self.pixels,), self.label.index_select(0, self.pixel_row))
        return seg.view(tuple(shape))


class _ObjectPixels(NamedTuple):
    """Every object's pixels (flat indices ``pidx`` with the object row ``inv`` of each), the objects'
    ``bidx``/``label``, the filtered values ``fv`` (float64) at the pixels, their columns ``px`` and rows
    ``py``, and the dense label map ``seg`` (None for :class:`SegmentPixels` input)."""

    pidx: Tensor
    inv: Tensor
    bidx: Tensor
    label: Tensor
    fv: Tensor
    px: Tensor
    py: Tensor
    seg: Optional[Tensor]

    @property
    def n(self) -> int:
        return self.bidx.numel()


def _object_pixels(segmentation, filtered: Optional[Tensor], H: int, W: int) -> _ObjectPixels:
    """The objects and their pixels from a dense ``(B, 1, H, W)`` label map (with the ``filtered``
    image) or a :class:`SegmentPixels`."""
    if isinstance(segmentation, SegmentPixels):
        seg = None
        pidx, inv = segmentation.pixels, segmentation.pixel_row
        bidx, label = segmentation.batch_index, segmentation.label
        fv = segmentation.pixel_filtered.double()
    else:
        seg = segmentation.long()
        segf = seg.reshape(-1)
        pidx = torch.nonzero(segf > 0).flatten()
        lmax = int(segf.max()) if segf.numel() else 0
        key = (pidx // (H * W)) * (lmax + 1) + segf.index_select(0, pidx)
        uniq, inv = torch.unique(key, return_inverse=True)
        bidx = uniq // (lmax + 1)
        label = uniq % (lmax + 1)
        fv = filtered.reshape(-1).index_select(0, pidx).double()  # moment weights: the filtered (detection) image
    rem = pidx % (H * W)
    py = rem // W
    px = rem % W
    return _ObjectPixels(pidx, inv, bidx, label, fv, px, py, seg)


def _segment_sum(val: Tensor, inv: Tensor, n: int) -> Tensor:
    """Per-object sums of the pixel values ``val`` (object row ``inv`` of each pixel)."""
    return torch.zeros(n, dtype=val.dtype, device=val.device).index_add(0, inv, val)
