"""Step 1, the matched filter: SExtractor's detection kernel, full-frame and strip by strip.

The background-subtracted image is correlated with the kernel (zero padding, as SExtractor's line
convolution treats pixels outside the frame), normalised to unit sum of absolute values as
SExtractor does for ``CONV NORM`` kernels. A small separable kernel (the default 3x3 pyramid is
``outer([1,2,1], [1,2,1]) / 16``) runs as two passes of shifted slices instead of ``conv2d``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .._checks import check_image

#: the default kernel's separable factors (column, row)
_PYRAMID = ([0.25, 0.5, 0.25], [0.25, 0.5, 0.25])


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
        return _separable_filter(image, *_PYRAMID)
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
    h = p[..., :, 0:W] * row[0]
    for j in range(1, kw):
        h.add_(p[..., :, j:j + W], alpha=row[j])
    out = h[..., 0:H, :] * col[0]
    for i in range(1, kh):
        out.add_(h[..., i:i + H, :], alpha=col[i])
    return out


def _strip_kernel(kernel, dtype, device):
    """(column, row) factor lists of a separable detection kernel, ``"none"`` for no filter, or None
    (not separable / not small: the strip path does not apply)."""
    if kernel is None:
        return "none"
    if isinstance(kernel, str) and kernel == "default":
        return _PYRAMID
    k = _as_kernel(kernel, dtype, device)
    if k.shape[0] > 5 or k.shape[1] > 5:
        return None
    sep = _separable(k)
    return None if sep is None else (sep[0].tolist(), sep[1].tolist())


# ----------------------------------------------------------------------------------------------
# strip by strip (CPU, no frame-sized temporaries)
# ----------------------------------------------------------------------------------------------
class _StripBuffers(NamedTuple):
    """Buffers reused by every strip: zero-padded input, row pass, column pass, threshold."""

    pad: Tensor
    h: Tensor
    out: Tensor
    thresh: Tensor


def _strip_buffers(R: int, W: int, ph: int, pw: int, dtype) -> _StripBuffers:
    return _StripBuffers(
        torch.zeros(R + 2 * ph, W + 2 * pw, dtype=dtype), torch.empty(R + 2 * ph, W, dtype=dtype),
        torch.empty(R, W, dtype=dtype), torch.empty(R, W, dtype=dtype),
    )


def _filter_strip(plane: Tensor, bad: Optional[Tensor], r0: int, r1: int, col: list, row: list,
                  buf: _StripBuffers, none: bool) -> Tensor:
    """Filtered rows ``r0:r1`` of the (H, W) ``plane`` (``bad`` pixels as 0): the same float
    operations as :func:`_separable_filter`, into the strip buffers."""
    H, W = plane.shape
    ph, pw = len(col) // 2, len(row) // 2
    n = r1 - r0
    if none and bad is None:
        return plane[r0:r1]
    lo, hi = max(0, r0 - ph), min(H, r1 + ph)
    P = buf.pad[: n + 2 * ph]
    a = lo - (r0 - ph)
    P[:a].zero_()
    inner = P[a:a + hi - lo, pw:pw + W]
    inner.copy_(plane[lo:hi])
    if bad is not None:
        inner.masked_fill_(bad[lo:hi], 0.0)
    P[a + hi - lo:].zero_()
    if none:
        return P[ph:ph + n, pw:pw + W]
    h = buf.h[: n + 2 * ph]
    torch.mul(P[:, 0:W], row[0], out=h)
    for j in range(1, len(row)):
        h.add_(P[:, j:j + W], alpha=row[j])
    o = buf.out[:n]
    torch.mul(h[0:n], col[0], out=o)
    for i in range(1, len(col)):
        o.add_(h[i:i + n], alpha=col[i])
    return o


def _filter_threshold_strips(img: Tensor, noise: Tensor, thresh: float, factors, bad: Optional[Tensor] = None):
    """Detected pixels of a CPU image without frame-sized temporaries: the image is filtered in strips
    of rows (the same float operations as :func:`_separable_filter`, so the same values), each strip
    thresholded at ``thresh * noise`` (the same float product as :func:`~.threshold.detection_threshold`)
    and compacted at once (numpy ``flatnonzero``, faster than ATen's ``nonzero``). ``bad`` pixels enter
    the filter as 0 and are never detected. Returns the sorted linear indices over (B, H, W) and the
    filtered values there."""
    import numpy as np

    B, _, H, W = img.shape
    none = isinstance(factors, str)
    col, row = ([1.0], [1.0]) if none else factors
    R = max(8, min(H, (1 << 17) // max(W, 1)))  # rows per strip: ~0.5 MB of float32
    buf = _strip_buffers(R, W, len(col) // 2, len(row) // 2, img.dtype)
    flat_t = noise.stride(-1) == 0 and noise.stride(-2) == 0
    idx_parts, f_parts = [], []
    for b in range(B):
        nb = noise[b if noise.shape[0] > 1 else 0, 0]
        bb = None if bad is None else bad[b if bad.shape[0] > 1 else 0, 0]
        t_const = (thresh * nb[0, 0]).numpy() if flat_t else None
        for r0 in range(0, H, R):
            r1 = min(H, r0 + R)
            on = _filter_strip(img[b, 0], bb, r0, r1, col, row, buf, none).numpy()
            t = t_const if flat_t else torch.mul(nb[r0:r1], thresh, out=buf.thresh[:r1 - r0]).numpy()
            above = on > t
            if bb is not None:
                above &= ~bb[r0:r1].numpy()
            li = np.flatnonzero(above)
            if li.size:
                f_parts.append(on.reshape(-1)[li])
                idx_parts.append(li + (b * H + r0) * W)
    if not idx_parts:
        return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=img.dtype)
    return torch.from_numpy(np.concatenate(idx_parts)), torch.from_numpy(np.concatenate(f_parts))
