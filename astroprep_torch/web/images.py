"""Thumbnails of triplets and sequence stamps.

At ingest the stamps are scaled to uint8 panels (vectorised) and written as ONE ``.u8.npy`` array
per frame / object (creating thousands of small files is what costs time on shared disks); the
server encodes one row of such an array as PNG when a page asks for it (memory-mapped read).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def to_uint8(stamps: Tensor, lo_q: float = 0.01, hi_q: float = 0.995) -> np.ndarray:
    """Scale each stamp of ``stamps`` (N, C, H, W) to uint8 between its own quantiles (NaN -> black).

    The quantiles come from a 1-in-5 pixel sample (a full sort of every stamp is slow)."""
    x = stamps.detach().to(torch.float32).cpu()
    n, c, h, w = x.shape
    if n == 0:
        return np.zeros((n, c, h, w), np.uint8)
    flat = x.reshape(n * c, h * w)
    sub = flat[:, ::5]
    sub = torch.where(torch.isfinite(sub), sub, torch.full_like(sub, float("nan")))
    q = torch.nan_to_num(torch.nanquantile(sub, torch.tensor([lo_q, hi_q]), dim=1), nan=0.0)  # (2, N*C)
    lo, hi = q[0][:, None], q[1][:, None]
    scale = torch.where(hi > lo, 255.0 / (hi - lo), torch.ones_like(hi))
    y = (flat - lo).mul_(scale).add_(0.5).clamp_(0, 255)  # NaN stays NaN, +-inf are clamped
    y = torch.nan_to_num_(y, nan=0.0)
    return y.to(torch.uint8).reshape(n, c, h, w).numpy()


def side_by_side(u8: np.ndarray, gap: int = 2) -> np.ndarray:
    """(N, C, H, W) uint8 -> (N, H, C*W + (C-1)*gap) panels, channels left to right, grey gaps."""
    n, c, h, w = u8.shape
    out = np.full((n, h, c * w + (c - 1) * gap), 96, np.uint8)
    for k in range(c):  # a loop over the 2-3 channels, not over stamps
        out[:, :, k * (w + gap): k * (w + gap) + w] = u8[:, k]
    return out


def write_panels(panels: np.ndarray, path: Path) -> None:
    """Write (N, H, W) uint8 panels as one ``.npy`` file (folder made)."""
    if panels.dtype != np.uint8 or panels.ndim != 3:
        raise ValueError(f"panels must be (N, H, W) uint8, got {panels.shape} {panels.dtype}")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, panels, allow_pickle=False)


def panel_png(path: Path, row: int) -> bytes:
    """PNG bytes of panel ``row`` of a ``.u8.npy`` file (IndexError when out of range)."""
    from PIL import Image
    import io

    arr = np.load(path, mmap_mode="r", allow_pickle=False)
    if arr.dtype != np.uint8 or arr.ndim != 3 or not 0 <= row < arr.shape[0]:
        raise IndexError(f"no panel {row} in {path.name}")
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr[row])).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()
