"""Step 2, the threshold: the noise (rms) argument, the threshold map and the detected pixels.

A pixel is detected when its *filtered* value exceeds ``thresh * rms`` where ``rms`` is the
*unfiltered* background rms (a map, or one value per image: SExtractor without weight maps uses one
global value, the background-mesh median it prints as ``RMS``). Masked pixels are never detected
(their value is set to 0 before filtering). On CPU without autograd and with a small separable
kernel, filtering and thresholding run strip by strip of rows with reused buffers (the same float
operations, but no frame-sized filtered image, threshold map, boolean map or index temporaries),
each strip compacted at once to its detected pixels.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .._checks import all_finite, bad_pixels
from ._index import _host
from .filter import _filter_threshold_strips, _strip_kernel, filter_image


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
    """Check the noise ``rms`` of :func:`~astroprep_torch.detect.detect_sources` and return the mask to use.

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


def _undetectable(image: Tensor, mask: Optional[Tensor]) -> Optional[Tensor]:
    """Pixels never detected (masked or not finite), or None; one cheap reduction tells whether any
    NaN/inf needs zeroing (no full-frame ``isfinite`` pass on a clean frame)."""
    if mask is None and bool(torch.isfinite(image.sum())):
        return None
    if mask is not None and all_finite(image):
        return mask.expand(image.shape)  # read only: no copy
    return bad_pixels(image, mask)


def _detected_pixels(image: Tensor, noise: Tensor, thresh: float, filter_kernel, bad: Optional[Tensor], dense: bool):
    """Filter and threshold: ``(idx, f, filtered)``, the sorted linear indices (over B*H*W) of the
    detected pixels, their filtered values, and the filtered image (None on the strip path, taken on
    CPU when ``dense`` is False and the kernel is small and separable)."""
    B, _, H, W = image.shape
    factors = _strip_kernel(filter_kernel, image.dtype, image.device) if not dense and _host(image) else None
    if factors is not None:
        idx, f = _filter_threshold_strips(image, noise.expand(B, 1, H, W), thresh, factors, bad)
        return idx, f, None
    img = image if bad is None else torch.where(bad, torch.zeros_like(image), image)
    filt = filter_image(img, filter_kernel)
    det = filt > (thresh * noise).expand(B, 1, H, W)
    if bad is not None:
        det &= ~bad
    idx = det.reshape(-1).nonzero().squeeze(1)
    return idx, filt.reshape(-1).index_select(0, idx), filt
