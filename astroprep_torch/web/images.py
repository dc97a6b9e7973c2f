"""PNG thumbnails of triplets and sequence stamps, written at ingest (vectorised scaling, PIL encode)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import Tensor


def to_uint8(stamps: Tensor, lo_q: float = 0.01, hi_q: float = 0.995) -> np.ndarray:
    """Scale each stamp of ``stamps`` (N, C, H, W) to uint8 between its own quantiles (NaN -> black)."""
    x = stamps.detach().to(torch.float32).cpu()
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w)
    finite = torch.isfinite(flat)
    filled = torch.where(finite, flat, torch.zeros_like(flat))
    if flat.shape[0] == 0:
        return np.zeros((n, c, h, w), np.uint8)
    q = torch.nanquantile(torch.where(finite, flat, torch.full_like(flat, float("nan"))),
                          torch.tensor([lo_q, hi_q]), dim=1)  # (2, N*C)
    q = torch.nan_to_num(q, nan=0.0)
    lo, hi = q[0][:, None], q[1][:, None]
    span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
    y = ((filled - lo) / span).clamp(0, 1) * 255
    y = torch.where(finite, y, torch.zeros_like(y))
    return y.round().to(torch.uint8).reshape(n, c, h, w).numpy()


def side_by_side(u8: np.ndarray, gap: int = 2) -> np.ndarray:
    """(N, C, H, W) uint8 -> (N, H, C*W + (C-1)*gap) panels, channels left to right, grey gaps."""
    n, c, h, w = u8.shape
    out = np.full((n, h, c * w + (c - 1) * gap), 96, np.uint8)
    for k in range(c):  # a loop over the 2-3 channels, not over stamps
        out[:, :, k * (w + gap): k * (w + gap) + w] = u8[:, k]
    return out


def write_pngs(panels: np.ndarray, paths: list[Path]) -> None:
    """Write each (H, W) uint8 panel to its path (folders made)."""
    from PIL import Image

    if len(paths) != panels.shape[0]:
        raise ValueError(f"{panels.shape[0]} panels for {len(paths)} paths")
    for folder in {p.parent for p in paths}:
        folder.mkdir(parents=True, exist_ok=True)
    for panel, p in zip(panels, paths):
        Image.fromarray(panel).save(p, optimize=False, compress_level=1)
