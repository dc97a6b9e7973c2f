"""Stamps and triplets around positions, the normalisations used on them, and alert readers.

Functional core
---------------
``extract(images, xy, size, batch_index=None)``
    Vectorised gather of ``(N, C, s, s)`` stamps centred on ``xy`` (0-based, ``x`` = column,
    ``y`` = row) from a batch of frames ``(B, C, H, W)``, with a bool mask (True = outside the
    frame or bad) of the same shape. No Python loop over sources.
``make_triplets(science, reference, difference, xy, size=63)``
    ``(N, 3, s, s)`` stamps in the ZTF order science, reference (template), difference.

Normalisations (tensor transforms, per cutout and per channel)
--------------------------------------------------------------
``braai_normalize``  NaN -> 0, L2 normalisation as ZTF's braai (``d6_m7``: Keras
                     ``utils.normalize``, i.e. each *row* divided by its L2 norm; ``d6_m9``/Kowalski:
                     the whole cutout divided by its L2 norm), then padding to 63x63 with 1e-9.
``zscale_asinh``     zscale interval -> [0, 1] -> asinh stretch (astropy ``AsinhStretch`` rule).
``robust_standardize``  (x - median) / (1.4826 MAD).

Readers (edges of the library; optional dependencies imported lazily)
---------------------------------------------------------------------
``read_ztf_alerts(paths)``   Avro packets (fastavro), Kowalski/braai JSON, or Fink Parquet files
                             -> :class:`AlertBatch` with raw triplets ``(N, 3, 63, 63)``.
``read_fits_folder(root)``   CERES layout: ``root/valid/*.fits`` and ``root/invalid/*.fits``, a
                             labels CSV, or (flat folder) each file's ``LABEL`` keyword -> :class:`FitsCutouts`.
``read_ceres_cutouts(root)`` the flat layout ``astroprep night`` exports (``cutouts/<trksub>_<k>.fits``,
                             header ``LABEL`` = valid / invalid / undefined).

Simulation
----------
``simulate_triplets(n, size=63, seed=0)``  self-contained Gaussian-PSF triplets of real transients,
asteroids (moving / short trails) and bogus detections (dipoles, cosmic rays, hot pixels,
saturated-star residuals, frame edges), labelled automatically.
"""

from __future__ import annotations

import base64
import gzip
import io as _io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import as_pair, check_image
from ._robust import mad_std
from .stretch import zscale

__all__ = [
    "Cutouts", "extract", "make_triplets", "CutoutExtractor", "TripletExtractor",
    "braai_normalize", "l2_normalize", "zscale_interval", "zscale_asinh", "robust_standardize",
    "BraaiNormalize", "ZScaleAsinh", "RobustStandardize", "L2Normalize",
    "AlertBatch", "read_ztf_alerts", "read_avro_alerts", "read_alert_json", "read_fink_alerts",
    "FitsCutouts", "read_fits_folder", "read_ceres_cutouts", "SimTriplets", "simulate_triplets", "SIM_KINDS",
]

#: float32's largest finite value: ZTF's production pipeline works in float32, where the squared
#: sum of a row holding the -3.4e38 "blank" sentinel (or an inf turned finite) overflows.
_F32_MAX = float(torch.finfo(torch.float32).max)


# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------
class Cutouts(NamedTuple):
    """``stamps`` (N, C, s, s) and ``mask`` (N, C, s, s) bool, True = outside the frame / bad."""

    stamps: Tensor
    mask: Tensor


def _check_xy(xy: Tensor, name: str = "xy") -> Tensor:
    if not isinstance(xy, Tensor):
        xy = torch.as_tensor(xy)
    if xy.dim() != 2 or xy.shape[-1] != 2:
        raise ValueError(f"{name} must be shaped (N, 2) holding (x, y) 0-based pixel positions, got {tuple(xy.shape)}")
    return xy


def _check_batch_index(batch_index, n: int, B: int, device) -> Tensor:
    """``batch_index`` (N,) long in ``[0, B)`` (all 0 when None and there is one frame)."""
    if batch_index is None:
        if B != 1 and n:
            raise ValueError(f"batch_index is required when images holds {B} frames")
        return torch.zeros(n, dtype=torch.long, device=device)
    batch_index = torch.as_tensor(batch_index, device=device).long()
    if batch_index.shape != (n,):
        raise ValueError(f"batch_index must be shaped (N,) = ({n},), got {tuple(batch_index.shape)}")
    if n and (batch_index.min() < 0 or batch_index.max() >= B):
        raise ValueError(f"batch_index values must lie in [0, {B}), got range [{int(batch_index.min())}, {int(batch_index.max())}]")
    return batch_index


def _nearest_stamps(images: Tensor, xy: Tensor, size: tuple, batch_index: Tensor, mask: Optional[Tensor],
                    fill_value: float) -> Cutouts:
    """``mode="nearest"`` of :func:`extract`: the original pixels, one gather."""
    sh, sw = size
    B, C, H, W = images.shape
    n = xy.shape[0]
    x0 = torch.floor(xy[:, 0] + 0.5).long() - sw // 2
    y0 = torch.floor(xy[:, 1] + 0.5).long() - sh // 2
    rows = y0[:, None] + torch.arange(sh, device=images.device)  # (N, sh)
    cols = x0[:, None] + torch.arange(sw, device=images.device)  # (N, sw)
    inside = ((rows >= 0) & (rows < H))[:, :, None] & ((cols >= 0) & (cols < W))[:, None, :]
    r = rows.clamp(0, H - 1)[:, :, None]
    c = cols.clamp(0, W - 1)[:, None, :]
    b = batch_index[:, None, None]
    stamps = images.permute(0, 2, 3, 1)[b, r, c].permute(0, 3, 1, 2)  # (N, C, sh, sw)
    out_mask = ~inside[:, None].expand(n, C, sh, sw)
    if mask is not None:
        out_mask = out_mask | mask.permute(0, 2, 3, 1)[b, r, c].permute(0, 3, 1, 2)
    stamps = torch.where(out_mask & ~inside[:, None], torch.full_like(stamps, fill_value), stamps)
    return Cutouts(stamps.contiguous(), out_mask.contiguous())


def _bilinear_stamps(images: Tensor, xy: Tensor, size: tuple, batch_index: Tensor, mask: Optional[Tensor],
                     fill_value: float) -> Cutouts:
    """``mode="bilinear"`` of :func:`extract`: resampled so that ``xy`` falls on the stamp's centre."""
    sh, sw = size
    B, C, H, W = images.shape
    n = xy.shape[0]
    # bilinear: the four neighbours are gathered like the nearest stamps (no copy of the frames per
    # source) and blended with weights that depend on xy, so gradients reach images and positions.
    dt = images.dtype
    xy = xy.to(dt)
    ox = torch.arange(sw, device=images.device, dtype=dt) - (sw - 1) / 2
    oy = torch.arange(sh, device=images.device, dtype=dt) - (sh - 1) / 2
    px = xy[:, 0, None] + ox[None]  # (N, sw)
    py = xy[:, 1, None] + oy[None]  # (N, sh)
    x0, y0 = torch.floor(px), torch.floor(py)
    wx, wy = px - x0, py - y0
    x0, y0 = x0.long(), y0.long()
    img = images.permute(0, 2, 3, 1)  # (B, H, W, C)
    mimg = mask.permute(0, 2, 3, 1) if mask is not None else None
    b = batch_index[:, None, None]
    stamps = torch.zeros(n, sh, sw, C, dtype=dt, device=images.device)
    bad = torch.zeros(n, sh, sw, C, dtype=torch.bool, device=images.device)
    for dy, wyy in ((0, 1 - wy), (1, wy)):
        for dx, wxx in ((0, 1 - wx), (1, wx)):
            yi, xi = y0 + dy, x0 + dx
            ok = ((yi >= 0) & (yi < H))[:, :, None] & ((xi >= 0) & (xi < W))[:, None, :]
            r, c = yi.clamp(0, H - 1)[:, :, None], xi.clamp(0, W - 1)[:, None, :]
            w = (wyy[:, :, None] * wxx[:, None, :])[..., None]  # (N, sh, sw, 1)
            use = ok[..., None] & (w > 0)
            v = img[b, r, c]
            stamps = stamps + torch.where(use, w * v, torch.zeros_like(v))
            if mimg is not None:
                bad = bad | (use & mimg[b, r, c])
    stamps = stamps.permute(0, 3, 1, 2)
    inside = ((py >= 0) & (py <= H - 1))[:, :, None] & ((px >= 0) & (px <= W - 1))[:, None, :]  # (N, sh, sw)
    out_mask = ~inside[:, None].expand(n, C, sh, sw) | bad.permute(0, 3, 1, 2)
    stamps = torch.where(~inside[:, None], torch.full_like(stamps, fill_value), stamps)
    return Cutouts(stamps.contiguous(), out_mask.contiguous())


def extract(images: Tensor, xy: Tensor, size, batch_index: Optional[Tensor] = None, *,
            mask: Optional[Tensor] = None, mode: str = "nearest", fill_value: float = 0.0) -> Cutouts:
    """Cut ``(N, C, s, s)`` stamps out of ``images`` (B, C, H, W) around ``xy`` (N, 2).

    Coordinates are 0-based pixel centres, ``x`` = column, ``y`` = row.

    * ``mode="nearest"`` (default, ZTF / astropy ``Cutout2D`` rule): the stamp holds the original
      pixels; its first pixel is ``round(x) - sw // 2`` (round half up), so for odd sizes the pixel
      containing the source is the central pixel, for even sizes it is pixel ``s // 2``.
    * ``mode="bilinear"``: the stamp is resampled so that ``xy`` falls exactly on pixel
      ``((sw - 1) / 2, (sh - 1) / 2)``; differentiable with respect to images and positions.

    ``batch_index`` (N,) int says which frame each source lies on (torchvision ROI style;
    default all 0). Pixels outside the frame get ``fill_value`` and ``True`` in the returned mask;
    ``mask`` (bool, broadcastable to ``images``, True = bad) is carried into the stamps' mask.
    Vectorised: one gather, no loop over sources.
    """
    check_image(images, "images")
    xy = _check_xy(xy).to(images.device)
    sh, sw = as_pair(size, "size")
    B, C, H, W = images.shape
    n = xy.shape[0]
    batch_index = _check_batch_index(batch_index, n, B, images.device)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor (True = bad), got {mask.dtype}")
        mask = mask.expand_as(images)
    if mode == "nearest":
        return _nearest_stamps(images, xy, (sh, sw), batch_index, mask, fill_value)
    if mode != "bilinear":
        raise ValueError(f"mode must be 'nearest' or 'bilinear', got {mode!r}")
    return _bilinear_stamps(images, xy, (sh, sw), batch_index, mask, fill_value)


def make_triplets(science: Tensor, reference: Tensor, difference: Tensor, xy: Tensor, size=63,
                  batch_index: Optional[Tensor] = None, *, mask: Optional[Tensor] = None,
                  mode: str = "nearest", fill_value: float = float("nan")) -> Cutouts:
    """``(N, 3, s, s)`` triplets in the ZTF order science, reference (template), difference.

    The three frames are ``(B, 1, H, W)`` on the same pixel grid (reference already aligned).
    Outside the frame the stamps hold ``fill_value`` (NaN by default, as ZTF's cutouts near chip
    edges; braai's normalisation turns NaN into 0) and the mask is True.
    """
    for name, t in (("science", science), ("reference", reference), ("difference", difference)):
        check_image(t, name, channels=1)
    if not (science.shape == reference.shape == difference.shape):
        raise ValueError(f"science, reference and difference must share one shape, got {tuple(science.shape)}, "
                         f"{tuple(reference.shape)}, {tuple(difference.shape)}")
    # one gather per frame, stamps stacked after: no frame-sized (B, 3, H, W) copy of the three
    # frames (at 4096^2 that copy, 200 MB of fresh memory, cost more than the cutouts)
    masks = mask.split(1, dim=1) if mask is not None and mask.dim() == 4 and mask.shape[1] == 3 else [mask] * 3
    parts = [extract(f, xy, size, batch_index, mask=m, mode=mode, fill_value=fill_value)
             for f, m in zip((science, reference, difference), masks)]
    return Cutouts(torch.cat([p.stamps for p in parts], 1), torch.cat([p.mask for p in parts], 1))


class CutoutExtractor(nn.Module):
    """Module form of :func:`extract`: ``forward(images, xy, batch_index=None) -> Cutouts``."""

    def __init__(self, size: int = 63, mode: str = "nearest", fill_value: float = 0.0):
        super().__init__()
        self.size, self.mode, self.fill_value = size, mode, fill_value

    def forward(self, images: Tensor, xy: Tensor, batch_index: Optional[Tensor] = None,
                mask: Optional[Tensor] = None) -> Cutouts:
        return extract(images, xy, self.size, batch_index, mask=mask, mode=self.mode, fill_value=self.fill_value)


class TripletExtractor(nn.Module):
    """Module form of :func:`make_triplets`."""

    def __init__(self, size: int = 63, mode: str = "nearest", fill_value: float = float("nan")):
        super().__init__()
        self.size, self.mode, self.fill_value = size, mode, fill_value

    def forward(self, science: Tensor, reference: Tensor, difference: Tensor, xy: Tensor,
                batch_index: Optional[Tensor] = None) -> Cutouts:
        return make_triplets(science, reference, difference, xy, self.size, batch_index,
                             mode=self.mode, fill_value=self.fill_value)


# --------------------------------------------------------------------------------------------
# normalisations
# --------------------------------------------------------------------------------------------
def l2_normalize(x: Tensor, per: str = "row") -> Tensor:
    """L2 normalisation of each cutout ``x`` (..., H, W) after replacing NaN by 0.

    ``per="row"``: Keras ``utils.normalize(x, axis=-1, order=2)`` as braai ``d6_m7`` was trained
    with: every row is divided by its own L2 norm (a zero norm is replaced by 1).
    ``per="image"``: the whole cutout is divided by its L2 norm (braai ``d6_m9`` / Kowalski).

    The norm is evaluated with float32 range as ZTF's production code does: a row (image) whose
    squared sum exceeds float32's largest value (e.g. holding the -3.4e38 "blank" sentinel of ZTF
    templates, or an inf) gets an infinite norm and so becomes all zeros. This reproduces the stored
    ``drb`` of such alerts; in float64 the result would differ.
    """
    if per not in ("row", "image"):
        raise ValueError(f"per must be 'row' or 'image', got {per!r}")
    x = torch.nan_to_num(x, nan=0.0, posinf=_F32_MAX, neginf=-_F32_MAX)
    dims = (-1,) if per == "row" else (-2, -1)
    sq = (x * x).sum(dim=dims, keepdim=True)
    norm = torch.sqrt(sq)
    norm = torch.where(sq > _F32_MAX, torch.full_like(norm, float("inf")), norm)
    norm = torch.where(norm == 0, torch.ones_like(norm), norm)
    return x / norm


def braai_normalize(triplets: Tensor, *, per: str = "row", size: int = 63, pad_value: float = 1e-9,
                    cutout_shape: Optional[Tensor] = None) -> Tensor:
    """braai's preprocessing of raw triplets ``(N, 3, H, W)`` (H, W <= ``size``) -> ``(N, 3, 63, 63)``.

    NaN -> 0, :func:`l2_normalize` per channel (``per="row"`` for ``d6_m7``), then padding at the
    bottom and right to ``size`` x ``size`` with ``pad_value`` (1e-9, as ZTF/braai ``make_triplet``).
    ``cutout_shape`` (N, 2) int (rows, cols) marks cutouts that were already padded (e.g. by
    :func:`read_ztf_alerts` when a batch mixes sizes): pixels beyond it are excluded from the norm and
    set to ``pad_value``.
    """
    check_image(triplets, "triplets")
    N, C, H, W = triplets.shape
    if H > size or W > size:
        raise ValueError(f"triplets must be at most {size}x{size} (braai's input), got {H}x{W}")
    x = triplets
    valid = None
    if cutout_shape is not None:
        cs = torch.as_tensor(cutout_shape, device=x.device)
        if cs.shape != (N, 2):
            raise ValueError(f"cutout_shape must be shaped (N, 2) = ({N}, 2), got {tuple(cs.shape)}")
        r = torch.arange(H, device=x.device)
        c = torch.arange(W, device=x.device)
        valid = (r[None, :, None] < cs[:, 0, None, None]) & (c[None, None, :] < cs[:, 1, None, None])
        valid = valid[:, None]
        x = torch.where(valid, x, torch.zeros_like(x))
    x = l2_normalize(x, per=per)
    if valid is not None:
        x = torch.where(valid, x, torch.full_like(x, pad_value))
    if H < size or W < size:
        x = F.pad(x, (0, size - W, 0, size - H), mode="constant", value=pad_value)
    return x


def robust_standardize(x: Tensor, *, nan_to: float = 0.0, eps: float = 1e-12) -> Tensor:
    """Per cutout and channel ``(x - median) / (1.4826 * MAD)`` of ``x`` (N, C, H, W), NaN-aware.

    NaNs (masked / off-frame pixels) are ignored in the statistics and set to ``nan_to`` after.
    A zero MAD falls back to the standard deviation, then to 1.
    """
    check_image(x, "x")
    flat = x.flatten(2)
    med = torch.nanmedian(flat, dim=-1, keepdim=True).values
    mad = mad_std(flat, dim=-1, keepdim=True, ignore_nan=True, center=med)
    finite = torch.isfinite(flat)
    cnt = finite.sum(-1, keepdim=True).clamp_min(1)
    mean = torch.where(finite, flat, torch.zeros_like(flat)).sum(-1, keepdim=True) / cnt
    std = torch.sqrt(torch.where(finite, (flat - mean) ** 2, torch.zeros_like(flat)).sum(-1, keepdim=True) / cnt)
    scale = torch.where(mad > eps, mad, torch.where(std > eps, std, torch.ones_like(std)))
    med = torch.nan_to_num(med, nan=0.0)
    out = (flat - med) / scale
    out = torch.where(torch.isfinite(out), out, torch.full_like(out, nan_to))
    return out.view_as(x)


def zscale_interval(x: Tensor, *, n_samples: int = 1000, contrast: float = 0.25, max_reject: float = 0.5,
                    min_npixels: int = 5, krej: float = 2.5, max_iterations: int = 5) -> tuple[Tensor, Tensor]:
    """IRAF/astropy zscale (vmin, vmax) of each cutout and channel of ``x`` (N, C, H, W) -> (N, C) each.

    :func:`astroprep_torch.stretch.zscale` on every (cutout, channel) plane: astropy's
    ``ZScaleInterval`` (regular sample of at most ``n_samples`` finite pixels in C order, iterative
    line fit with ``krej``-sigma rejection grown by 1 % of the sample, slope / ``contrast``).
    """
    check_image(x, "x")
    N, C = x.shape[:2]
    vmin, vmax = zscale(x.reshape(N * C, 1, *x.shape[-2:]), n_samples=n_samples, contrast=contrast,
                        max_reject=max_reject, min_npixels=min_npixels, krej=krej, max_iterations=max_iterations)
    return vmin.reshape(N, C).to(x.dtype), vmax.reshape(N, C).to(x.dtype)


def zscale_asinh(x: Tensor, *, a: float = 0.1, nan_to: float = 0.0, **zscale_kwargs) -> Tensor:
    """zscale interval -> clip to [0, 1] -> asinh stretch ``asinh(v / a) / asinh(1 / a)`` (astropy's
    ``AsinhStretch(a=0.1)``) of ``x`` (N, C, H, W), per cutout and channel. NaN -> ``nan_to``."""
    vmin, vmax = zscale_interval(x, **zscale_kwargs)
    vmin, vmax = vmin[..., None, None], vmax[..., None, None]
    span = torch.where(vmax > vmin, vmax - vmin, torch.ones_like(vmax))
    v = ((x - vmin) / span).clamp(0, 1)
    v = torch.asinh(v / a) / math.asinh(1 / a)
    return torch.where(torch.isfinite(v), v, torch.full_like(v, nan_to))


class L2Normalize(nn.Module):
    """Module form of :func:`l2_normalize` (NaN -> 0, per row or per image)."""

    def __init__(self, per: str = "image"):
        super().__init__()
        self.per = per

    def forward(self, x: Tensor) -> Tensor:
        return l2_normalize(x, per=self.per)


class BraaiNormalize(nn.Module):
    """Module form of :func:`braai_normalize` (``per="row"`` for ``d6_m7``)."""

    def __init__(self, per: str = "row", size: int = 63, pad_value: float = 1e-9):
        super().__init__()
        self.per, self.size, self.pad_value = per, size, pad_value

    def forward(self, x: Tensor, cutout_shape: Optional[Tensor] = None) -> Tensor:
        return braai_normalize(x, per=self.per, size=self.size, pad_value=self.pad_value, cutout_shape=cutout_shape)


class ZScaleAsinh(nn.Module):
    """Module form of :func:`zscale_asinh`: output in [0, 1]."""

    def __init__(self, a: float = 0.1, contrast: float = 0.25, n_samples: int = 1000):
        super().__init__()
        self.a, self.contrast, self.n_samples = a, contrast, n_samples

    def forward(self, x: Tensor) -> Tensor:
        return zscale_asinh(x, a=self.a, contrast=self.contrast, n_samples=self.n_samples)


class RobustStandardize(nn.Module):
    """Module form of :func:`robust_standardize`."""

    def __init__(self, nan_to: float = 0.0):
        super().__init__()
        self.nan_to = nan_to

    def forward(self, x: Tensor) -> Tensor:
        return robust_standardize(x, nan_to=self.nan_to)


# --------------------------------------------------------------------------------------------
# alert readers
# --------------------------------------------------------------------------------------------
@dataclass
class AlertBatch:
    """Alerts as tensors.

    ``triplets`` (N, 3, S, S) float32 raw cutouts in the order science, reference (template),
    difference, NaN kept (S = 63, or the largest size present; smaller cutouts are padded at the
    bottom/right with NaN and ``cutout_shape`` (N, 2) holds their true (rows, cols)).
    ``candid`` (N,) int64; ``rb``, ``drb`` (N,) float32 (NaN where the packet has none);
    ``fields``: every other scalar candidate field as a tensor (numbers, NaN / -1 for missing) or a
    list (strings); ``object_id`` and ``drbversion`` lists of str; ``source`` file of each alert.
    """

    triplets: Tensor
    candid: Tensor
    rb: Tensor
    drb: Tensor
    cutout_shape: Tensor
    object_id: list
    drbversion: list
    fields: dict = field(default_factory=dict)
    source: list = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.candid.shape[0])


def _decode_stamp(data) -> np.ndarray:
    """gzipped (or plain) FITS bytes -> 2-D float32 array (astropy at the I/O edge)."""
    from astropy.io import fits
    import warnings

    raw = bytes(data)
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if raw[:3] == b"\xff\xd8\xff":  # early (2016-2017) test packets carry JPEG previews, not FITS
        from PIL import Image  # Pillow comes with matplotlib

        with Image.open(_io.BytesIO(raw)) as im:
            return np.asarray(im.convert("L"), dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ZTF stamps carry a non-standard SIMPLE card
        with fits.open(_io.BytesIO(raw), memmap=False) as hdul:
            arr = np.asarray(hdul[0].data, dtype=np.float32)
    if arr.ndim != 2:
        raise ValueError(f"a cutout must be a 2-D image, got shape {arr.shape}")
    return arr


def _stamp_bytes(cutout) -> bytes:
    if cutout is None:
        raise ValueError("alert has no cutout")
    data = cutout["stampData"] if isinstance(cutout, dict) else cutout
    if isinstance(data, dict) and "$binary" in data:  # MongoDB extended JSON (Kowalski / braai)
        b = data["$binary"]
        data = base64.b64decode(b["base64"] if isinstance(b, dict) else b)
    elif isinstance(data, str):
        data = base64.b64decode(data)
    return data


def _records_to_batch(records: list, sources: list) -> AlertBatch:
    arrays, shapes = [], []
    for rec in records:
        trip = [_decode_stamp(_stamp_bytes(rec.get(k))) for k in ("cutoutScience", "cutoutTemplate", "cutoutDifference")]
        arrays.append(trip)
        shapes.append([max(a.shape[0] for a in trip), max(a.shape[1] for a in trip)])
    n = len(records)
    S = max([63] + [max(s) for s in shapes])
    out = np.full((n, 3, S, S), np.nan, dtype=np.float32)
    cshape = np.zeros((n, 2), dtype=np.int64)
    for i, trip in enumerate(arrays):
        for j, a in enumerate(trip):
            out[i, j, : a.shape[0], : a.shape[1]] = a
        cshape[i] = [min(a.shape[0] for a in trip), min(a.shape[1] for a in trip)]
    cands = [rec.get("candidate") or {} for rec in records]
    keys: list = []
    for c in cands:
        for k in c:
            if k not in keys:
                keys.append(k)
    fields: dict = {}
    for k in keys:
        vals = [c.get(k) for c in cands]
        present = [v for v in vals if v is not None]
        if present and all(isinstance(v, (bool, np.bool_)) for v in present):
            fields[k] = torch.tensor([bool(v) if v is not None else False for v in vals])
        elif present and all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in present):
            fields[k] = torch.tensor([int(v) if v is not None else -1 for v in vals], dtype=torch.int64)
        elif present and all(isinstance(v, (int, float, np.integer, np.floating)) for v in present):
            fields[k] = torch.tensor([float(v) if v is not None else float("nan") for v in vals], dtype=torch.float64)
        else:
            fields[k] = [None if v is None else str(v) for v in vals]

    def num(key, dtype):
        vals = [c.get(key) for c in cands]
        fill = -1 if dtype == torch.int64 else float("nan")
        return torch.tensor([fill if v is None else v for v in vals], dtype=dtype)

    candid = torch.tensor([int(rec.get("candid") or c.get("candid") or -1) for rec, c in zip(records, cands)], dtype=torch.int64)
    return AlertBatch(
        triplets=torch.from_numpy(out), candid=candid, rb=num("rb", torch.float32), drb=num("drb", torch.float32),
        cutout_shape=torch.from_numpy(cshape), object_id=[str(r.get("objectId")) for r in records],
        drbversion=[c.get("drbversion") for c in cands], fields=fields, source=list(sources),
    )


def read_avro_alerts(paths) -> list:
    """Raw alert records (dicts) from ZTF Avro files (``fastavro``, imported lazily)."""
    try:
        import fastavro
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("reading ZTF Avro alerts needs the optional dependency 'fastavro' "
                          "(pip install fastavro)") from err
    recs, srcs = [], []
    for p in _as_paths(paths):
        with open(p, "rb") as f:
            for rec in fastavro.reader(f):
                recs.append(rec)
                srcs.append(str(p))
    return recs, srcs


def read_alert_json(paths) -> tuple:
    """Raw alert records from Kowalski / braai JSON files (cutouts as extended-JSON ``$binary``)."""
    import json

    recs, srcs = [], []
    for p in _as_paths(paths):
        with open(p) as f:
            obj = json.load(f)
        for rec in obj if isinstance(obj, list) else [obj]:
            recs.append(rec)
            srcs.append(str(p))
    return recs, srcs


def read_fink_alerts(paths) -> tuple:
    """Raw alert records from Fink Parquet files (``pyarrow``, imported lazily)."""
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover
        raise ImportError("reading Parquet alerts needs the optional dependency 'pyarrow' (pip install pyarrow)") from err
    recs, srcs = [], []
    for p in _as_paths(paths):
        cols = pq.read_schema(p).names
        keep = [c for c in ("candid", "objectId", "candidate", "cutoutScience", "cutoutTemplate", "cutoutDifference") if c in cols]
        for rec in pq.read_table(p, columns=keep).to_pylist():
            recs.append(rec)
            srcs.append(str(p))
    return recs, srcs


def _as_paths(paths) -> list:
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        if p.is_dir():
            return sorted(q for q in p.iterdir() if q.suffix in (".avro", ".json", ".parquet"))
        return [p]
    out = []
    for p in paths:
        out += _as_paths(p) if Path(p).is_dir() else [Path(p)]
    return out


def read_ztf_alerts(paths) -> AlertBatch:
    """Read ZTF alert packets into an :class:`AlertBatch` of raw triplets (N, 3, 63, 63).

    ``paths``: one path, a folder, or a list; ``.avro`` files are read with ``fastavro``
    (a packet file may hold several alerts), ``.json`` as Kowalski / braai JSON, ``.parquet`` as
    Fink alert tables (``pyarrow``). The channel order is science, reference (template),
    difference, the values are the raw cutout pixels (NaN kept; normalisation happens in the model).
    """
    recs, srcs = [], []
    for p in _as_paths(paths):
        if p.suffix == ".avro":
            r, s = read_avro_alerts([p])
        elif p.suffix == ".json":
            r, s = read_alert_json([p])
        elif p.suffix == ".parquet":
            r, s = read_fink_alerts([p])
        else:
            raise ValueError(f"unknown alert file type {p.suffix!r} for {p} (expected .avro, .json or .parquet)")
        recs += r
        srcs += s
    if not recs:
        raise ValueError(f"no alerts found in {paths!r}")
    return _records_to_batch(recs, srcs)


# --------------------------------------------------------------------------------------------
# FITS folder (CERES layout)
# --------------------------------------------------------------------------------------------
@dataclass
class FitsCutouts:
    """``images`` (N, 1, H, W) float32, ``labels`` (N,) int64 (1 = valid, 0 = invalid), ``names``."""

    images: Tensor
    labels: Tensor
    names: list


def read_fits_folder(root, labels_csv=None, *, size: Optional[int] = None,
                     positive: Sequence[str] = ("valid", "real", "asteroid", "1", "true")) -> FitsCutouts:
    """Read a folder of FITS cutouts with labels (the CERES layout: 200x200 ``valid``/``invalid``).

    Labels come from ``labels_csv`` (columns ``filename``/``file``/``name`` and ``label``; a label
    is positive when it is in ``positive`` or a non-zero number) or, without a CSV, from the
    sub-folder name (``root/valid/*.fits`` -> 1, ``root/invalid/*.fits`` -> 0) or, in a flat folder
    without sub-folders, from each file's ``LABEL`` keyword (:func:`read_ceres_cutouts`: files still
    labelled 'undefined' are left out). All images must
    share one shape unless ``size`` is given, in which case each is centre-cropped / NaN-padded to
    ``size`` x ``size``.
    """
    from astropy.io import fits
    import csv

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"FITS cutout folder {root} does not exist")
    items = []
    if labels_csv is not None:
        with open(labels_csv, newline="") as f:
            reader = csv.DictReader(f)
            cols = {c.lower(): c for c in reader.fieldnames or []}
            fcol = next((cols[c] for c in ("filename", "file", "name", "path") if c in cols), None)
            lcol = next((cols[c] for c in ("label", "class", "valid", "target") if c in cols), None)
            if fcol is None or lcol is None:
                raise ValueError(f"{labels_csv} needs a file-name column and a label column, got {reader.fieldnames}")
            for row in reader:
                items.append((root / row[fcol], _parse_label(row[lcol], positive)))
    else:
        for sub in sorted(p for p in root.iterdir() if p.is_dir()):
            lab = 1 if sub.name.lower() in positive else 0
            for f in sorted(sub.glob("*.fits*")) + sorted(sub.glob("*.fit")):
                items.append((f, lab))
        if not items and any(root.glob("*.fits")):
            return read_ceres_cutouts(root, size=size, positive=positive)
    if not items:
        raise ValueError(f"no labelled FITS files found under {root}")
    imgs = []
    for path, _ in items:
        with fits.open(path, memmap=False) as hdul:
            hdu = next((h for h in hdul if getattr(h, "data", None) is not None and h.data.ndim >= 2), None)
            if hdu is None:
                raise ValueError(f"{path} holds no image")
            a = np.asarray(hdu.data, dtype=np.float32)
            a = a.reshape(a.shape[-2:]) if a.ndim > 2 else a
        if size is not None:
            a = _crop_pad(a, size)
        imgs.append(a)
    shapes = {a.shape for a in imgs}
    if len(shapes) > 1:
        raise ValueError(f"FITS cutouts have different shapes {sorted(shapes)}; pass size= to crop/pad them")
    return FitsCutouts(torch.from_numpy(np.stack(imgs)[:, None]), torch.tensor([l for _, l in items], dtype=torch.int64),
                       [p.name for p, _ in items])


def read_ceres_cutouts(root, *, size: Optional[int] = None, include_undefined: bool = False,
                       positive: Sequence[str] = ("valid", "real", "asteroid", "1", "true"),
                       negative: Sequence[str] = ("invalid", "bogus", "0", "false")) -> FitsCutouts:
    """Read the flat CERES export of ``astroprep night`` (``root/<trksub>_<k>.fits``, 200x200, header
    ``LABEL``): label 1 for ``positive`` values, 0 for ``negative`` ones; files labelled
    'undefined' (or without LABEL) are left out unless ``include_undefined``, where they get -1.
    ``size`` centre-crops / NaN-pads as :func:`read_fits_folder`."""
    from astropy.io import fits

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"CERES cutout folder {root} does not exist")
    imgs, labels, names = [], [], []
    for path in sorted(root.glob("*.fits")):
        with fits.open(path, memmap=False) as hdul:
            lab = str(hdul[0].header.get("LABEL", "undefined")).strip().lower()
            value = 1 if lab in positive else 0 if lab in negative else -1
            if value < 0 and not include_undefined:
                continue
            a = np.asarray(hdul[0].data, dtype=np.float32)
        imgs.append(_crop_pad(a, size) if size is not None else a)
        labels.append(value)
        names.append(path.name)
    if not imgs:
        raise ValueError(f"no labelled FITS cutouts under {root} (LABEL must be valid/invalid; "
                         f"pass include_undefined=True to read unlabelled ones)")
    shapes = {a.shape for a in imgs}
    if len(shapes) > 1:
        raise ValueError(f"FITS cutouts have different shapes {sorted(shapes)}; pass size= to crop/pad them")
    return FitsCutouts(torch.from_numpy(np.stack(imgs)[:, None]), torch.tensor(labels, dtype=torch.int64), names)


def _parse_label(v: str, positive) -> int:
    s = str(v).strip().lower()
    if s in positive:
        return 1
    try:
        return int(float(s) != 0)
    except ValueError:
        return 0


def _crop_pad(a: np.ndarray, size: int) -> np.ndarray:
    out = np.full((size, size), np.nan, dtype=np.float32)
    h, w = a.shape
    sy, sx = max(0, (h - size) // 2), max(0, (w - size) // 2)
    crop = a[sy: sy + size, sx: sx + size]
    oy, ox = (size - crop.shape[0]) // 2, (size - crop.shape[1]) // 2
    out[oy: oy + crop.shape[0], ox: ox + crop.shape[1]] = crop
    return out


# --------------------------------------------------------------------------------------------
# simulated triplets
# --------------------------------------------------------------------------------------------
#: kind codes of :func:`simulate_triplets`; the first two are real (label 1), the rest bogus.
SIM_KINDS = ("transient", "asteroid", "dipole", "cosmic_ray", "hot_pixel", "saturated", "edge")


class SimTriplets(NamedTuple):
    """``triplets`` (n, 3, s, s) raw counts (sci, ref, diff; NaN off the chip edge), ``labels`` (n,)
    int64 (1 = real: transient or asteroid, 0 = bogus), ``kind`` (n,) index into :data:`SIM_KINDS`."""

    triplets: Tensor
    labels: Tensor
    kind: Tensor


def _gauss(xx, yy, x, y, flux, sigma):
    """Sum of circular Gaussian PSFs, evaluated separably; x, y, flux, sigma (n, K) -> (n, s, s).

    ``xx``/``yy`` are the 2-D pixel-coordinate grids (only their first row / column is used)."""
    ax = xx[0]  # (s,)
    ay = yy[:, 0]
    inv = 1.0 / (2 * sigma ** 2)
    gx = torch.exp(-((ax[None, None] - x[..., None]) ** 2) * inv[..., None])  # (n, K, s)
    gy = torch.exp(-((ay[None, None] - y[..., None]) ** 2) * inv[..., None])
    w = flux / (2 * math.pi * sigma ** 2)
    return torch.einsum("nky,nkx->nyx", gy * w[..., None], gx)


class _Scene(NamedTuple):
    """The drawn parameters shared by the steps of :func:`simulate_triplets` (``(n,)`` tensors)."""

    xx: Tensor  # (s, s) pixel-coordinate grids
    yy: Tensor
    kind: Tensor
    is_real: Tensor
    sky: Tensor
    sig_sci: Tensor  # PSF sigma of the science epoch
    sig_ref: Tensor
    noise_sci: Tensor
    noise_ref: Tensor
    flux: Tensor  # point-source flux of the candidate
    cx: Tensor  # candidate position
    cy: Tensor

    def sel(self, k: int) -> Tensor:
        return (self.kind == k).to(self.sky.dtype)


_TRAIL_STEPS = 9  # points along a trail or a cosmic-ray track


def _uniform_draws(g: torch.Generator, n: int, dt):
    """``U(lo, hi, *shape)``: uniform draws from ``g`` ((n,) by default)."""
    def U(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(*(shape or (n,)), generator=g, dtype=dt)
    return U


def _static_scene(n: int, s: int, g: torch.Generator, U, real_fraction: float, snr_range) -> tuple:
    """Draw the candidates' kinds, sky, PSFs and fluxes, and render what both epochs share (sky,
    0-3 field stars, a host galaxy under half of them). Returns ``(scene, sci, ref)``."""
    dt = torch.float32
    c = (s - 1) / 2
    yy, xx = torch.meshgrid(torch.arange(s, dtype=dt), torch.arange(s, dtype=dt), indexing="ij")
    is_real = torch.rand(n, generator=g, dtype=dt) < real_fraction
    real_kind = (torch.rand(n, generator=g, dtype=dt) < 0.4).long()  # 0 transient, 1 asteroid
    bogus_kind = 2 + torch.randint(0, 5, (n,), generator=g)
    kind = torch.where(is_real, real_kind, bogus_kind)
    sky = U(100, 800)
    sig_sci = U(0.8, 1.8)  # PSF sigma (FWHM 1.9-4.2 px)
    sig_ref = sig_sci * U(0.7, 1.0)  # references are sharper (coadds)
    noise_sci = torch.sqrt(sky)
    noise_ref = noise_sci / 2  # deeper coadd
    # point-source flux for a given S/N in a PSF-weighted aperture: S/N = F / (noise * sqrt(4 pi sigma^2))
    snr = torch.exp(U(math.log(snr_range[0]), math.log(snr_range[1])))
    flux = snr * noise_sci * torch.sqrt(4 * math.pi * sig_sci ** 2)
    # field stars, in both epochs (cancel in the difference)
    K = 3
    nst = torch.randint(0, K + 1, (n,), generator=g)
    on = (torch.arange(K)[None] < nst[:, None]).to(dt)
    sx, sy = U(2, s - 3, n, K), U(2, s - 3, n, K)
    sf = torch.exp(U(math.log(2e3), math.log(2e5), n, K)) * on
    stars_sci = _gauss(xx, yy, sx, sy, sf, sig_sci[:, None].expand(n, K))
    stars_ref = _gauss(xx, yy, sx, sy, sf, sig_ref[:, None].expand(n, K))
    # host galaxy under half of the candidates (transients on hosts; bogus also on hosts)
    has_host = (torch.rand(n, generator=g, dtype=dt) < 0.5).to(dt)
    hx, hy = c + U(-4, 4), c + U(-4, 4)
    hf = torch.exp(U(math.log(5e3), math.log(1e5))) * has_host
    hsig = U(2.5, 6.0)
    host_sci = _gauss(xx, yy, hx[:, None], hy[:, None], hf[:, None], torch.sqrt(hsig ** 2 + sig_sci ** 2)[:, None])
    host_ref = _gauss(xx, yy, hx[:, None], hy[:, None], hf[:, None], torch.sqrt(hsig ** 2 + sig_ref ** 2)[:, None])
    sci = sky[:, None, None] + stars_sci + host_sci
    ref = sky[:, None, None] + stars_ref + host_ref
    cx, cy = c + U(-0.5, 0.5), c + U(-0.5, 0.5)
    scene = _Scene(xx, yy, kind, is_real, sky, sig_sci, sig_ref, noise_sci, noise_ref, flux, cx, cy)
    return scene, sci, ref


def _track(sc: _Scene, length: Tensor, angle: Tensor) -> tuple[Tensor, Tensor]:
    """(n, T) points of a track of ``length`` and ``angle`` centred on the candidate."""
    frac = torch.linspace(-0.5, 0.5, _TRAIL_STEPS, dtype=sc.sky.dtype)[None]
    return (sc.cx[:, None] + frac * (length * torch.cos(angle))[:, None],
            sc.cy[:, None] + frac * (length * torch.sin(angle))[:, None])


def _add_real(sc: _Scene, U, sci: Tensor, diff: Tensor) -> tuple[Tensor, Tensor]:
    """Transients (new point sources) and asteroids (trailed, absent from the reference)."""
    n, T = sc.kind.shape[0], _TRAIL_STEPS
    comp = _gauss(sc.xx, sc.yy, sc.cx[:, None], sc.cy[:, None], (sc.flux * sc.sel(0))[:, None], sc.sig_sci[:, None])
    sci, diff = sci + comp, diff + comp
    L, ang = U(0, 6), U(0, math.pi)
    ax, ay = _track(sc, L, ang)
    comp = _gauss(sc.xx, sc.yy, ax, ay, (sc.flux * sc.sel(1))[:, None].expand(n, T) / T,
                  sc.sig_sci[:, None].expand(n, T))
    return sci + comp, diff + comp


def _add_dipole_and_cosmic_ray(sc: _Scene, U, sci: Tensor, ref: Tensor, diff: Tensor) -> tuple:
    """Dipoles (a star misaligned by 0.3-1.5 px between epochs) and cosmic rays (sharp short
    tracks in the science only). Returns ``(sci, ref, diff)``."""
    n, T = sc.kind.shape[0], _TRAIL_STEPS
    xx, yy, cx, cy = sc.xx, sc.yy, sc.cx, sc.cy
    shift, dang = U(0.3, 1.5), U(0, 2 * math.pi)
    dflux = torch.exp(U(math.log(5e3), math.log(3e5))) * sc.sel(2)
    star_s = _gauss(xx, yy, cx[:, None], cy[:, None], dflux[:, None], sc.sig_sci[:, None])
    star_r = _gauss(xx, yy, cx[:, None], cy[:, None], dflux[:, None], sc.sig_ref[:, None])
    mx_, my_ = cx + shift * torch.cos(dang), cy + shift * torch.sin(dang)
    star_m = _gauss(xx, yy, mx_[:, None], my_[:, None], dflux[:, None], sc.sig_sci[:, None])
    sci, ref, diff = sci + star_s, ref + star_r, diff + star_s - star_m
    Lc, angc = U(0, 4), U(0, math.pi)
    crx, cry = _track(sc, Lc, angc)
    crf = (torch.exp(U(math.log(1.5), math.log(20))) * sc.flux * sc.sel(3))[:, None].expand(n, T) / T
    comp = _gauss(xx, yy, crx, cry, crf, U(0.25, 0.45)[:, None].expand(n, T))
    return sci + comp, ref, diff + comp


def _add_hot_pixel_and_saturated(sc: _Scene, U, sci: Tensor, ref: Tensor, diff: Tensor) -> tuple:
    """Hot pixels (one pixel) and saturated stars (clipped core in the science, unclipped deeper
    reference: a ring / core residual). Returns ``(sci, ref, diff)``."""
    n, s = sc.kind.shape[0], sc.xx.shape[0]
    dt = sc.sky.dtype
    hot = torch.zeros(n, s, s, dtype=dt)
    ic = int(round((s - 1) / 2))
    hot[:, ic, ic] = torch.exp(U(math.log(10), math.log(300))) * sc.noise_sci * sc.sel(4)
    sci, diff = sci + hot, diff + hot
    st = sc.sel(5)
    xx, yy, cx, cy, sky = sc.xx, sc.yy, sc.cx, sc.cy, sc.sky
    bflux = torch.exp(U(math.log(5e5), math.log(5e6))) * st
    b_s = _gauss(xx, yy, cx[:, None], cy[:, None], bflux[:, None], sc.sig_sci[:, None])
    b_r = _gauss(xx, yy, cx[:, None], cy[:, None], bflux[:, None], sc.sig_ref[:, None])
    b_m = _gauss(xx, yy, cx[:, None], cy[:, None], bflux[:, None], (sc.sig_sci * U(0.9, 1.1))[:, None])
    sat = torch.where(st > 0, U(2e4, 6e4), torch.full((n,), float("inf"), dtype=dt))
    sci = torch.minimum(sci + b_s, sat[:, None, None])
    ref = ref + b_r
    diff = diff + torch.minimum(b_s + sky[:, None, None], sat[:, None, None]) - sky[:, None, None] - b_m
    return sci, ref, diff


def _add_noise(sc: _Scene, g: torch.Generator, sci: Tensor, ref: Tensor, diff: Tensor) -> tuple:
    """Poisson-like Gaussian noise in both epochs; the difference carries the noise of both."""
    n, s = sc.kind.shape[0], sc.xx.shape[0]
    dt = sc.sky.dtype
    var_sci = (sci.clamp_min(0) / sc.sky[:, None, None]) * sc.noise_sci[:, None, None] ** 2
    n_sci = torch.sqrt(var_sci) * torch.randn(n, s, s, generator=g, dtype=dt)
    n_ref = sc.noise_ref[:, None, None] * torch.randn(n, s, s, generator=g, dtype=dt)
    return sci + n_sci, ref + n_ref, diff + n_sci - n_ref


def _cut_chip_edge(sc: _Scene, g: torch.Generator, U, sci: Tensor, ref: Tensor, diff: Tensor) -> tuple:
    """``edge`` candidates: the chip edge crosses the stamp (NaN beyond it, a gradient residual
    along it; the reference is cut too half of the time)."""
    n, s = sc.kind.shape[0], sc.xx.shape[0]
    xx, yy = sc.xx, sc.yy
    e = sc.kind == 6
    side = torch.randint(0, 4, (n,), generator=g)
    depth = torch.randint(4, 24, (n,), generator=g)
    coord = torch.stack([xx, s - 1 - xx, yy, s - 1 - yy])[side]  # distance-like coordinate per side
    beyond = (coord < depth[:, None, None]) & e[:, None, None]
    dist = (coord - depth[:, None, None]).clamp_min(0)
    ramp = torch.exp(-dist / U(1, 3)[:, None, None]) * (sc.flux * U(0.5, 3))[:, None, None] / 10
    diff = torch.where(e[:, None, None], diff + ramp, diff)
    nan = torch.tensor(float("nan"), dtype=sc.sky.dtype)
    sci = torch.where(beyond, nan, sci)
    diff = torch.where(beyond, nan, diff)
    ref = torch.where(beyond & (torch.rand(n, 1, 1, generator=g) < 0.5), nan, ref)
    return sci, ref, diff


def simulate_triplets(n: int, size: int = 63, seed: int = 0, *, real_fraction: float = 0.5,
                      snr_range: tuple = (6.0, 60.0), dtype=torch.float32, device=None) -> SimTriplets:
    """Simulate ``n`` labelled alert triplets (science, reference, difference) of ``size`` x ``size``.

    Self-contained (Gaussian PSFs, sky + Poisson-like Gaussian noise), seeded, vectorised over
    the samples. Every stamp has a sky level, 0-3 static field stars and possibly a host galaxy;
    the difference is the science minus the PSF-matched reference (static sources cancel) plus
    the noise of both. The centred candidate is one of :data:`SIM_KINDS`:

    real (label 1): ``transient`` (new point source, on a host galaxy half the time, within 0.5 px
    of the centre); ``asteroid`` (a point source absent from the reference, trailed over 0-6 px).
    bogus (label 0): ``dipole`` (a star misaligned by 0.3-1.5 px between epochs, +/- lobes),
    ``cosmic_ray`` (sharp 1-4 px track in the science only), ``hot_pixel`` (one hot pixel),
    ``saturated`` (a clipped bright star: ring/core residual), ``edge`` (the chip edge crosses the
    stamp: NaN beyond it, a bright gradient residual along it).
    """
    g = torch.Generator(device="cpu").manual_seed(int(seed))
    dt = torch.float32  # float32 is plenty for counts of ~1e6 and twice as fast as float64
    U = _uniform_draws(g, n, dt)
    sc, sci, ref = _static_scene(n, size, g, U, real_fraction, snr_range)
    diff = torch.zeros(n, size, size, dtype=dt)
    # each step draws from ``g`` in turn: the order is part of the seeded result
    sci, diff = _add_real(sc, U, sci, diff)
    sci, ref, diff = _add_dipole_and_cosmic_ray(sc, U, sci, ref, diff)
    sci, ref, diff = _add_hot_pixel_and_saturated(sc, U, sci, ref, diff)
    sci, ref, diff = _add_noise(sc, g, sci, ref, diff)
    sci, ref, diff = _cut_chip_edge(sc, g, U, sci, ref, diff)
    trip = torch.stack([sci, ref, diff], dim=1).to(dtype)
    if device is not None:
        trip = trip.to(device)
    return SimTriplets(trip, sc.is_real.long().to(trip.device), sc.kind.to(trip.device))
