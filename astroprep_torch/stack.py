"""Co-addition of frames onto one grid (SWarp's job): mean, weighted mean, median, clipped mean.

:func:`stack` resamples every frame through :func:`astroprep_torch.align.reproject` (the frames'
:class:`~astroprep_torch.wcs.TanWCS` to the target's) and combines them pixel by pixel:

* ``"mean"``: plain mean of the frames covering a pixel;
* ``"weighted"``: inverse-variance weighted mean ``sum(w v) / sum(w)`` (SWarp's ``WEIGHTED``);
* ``"median"``: median (mean of the two middle values for an even count; SWarp's ``MEDIAN``);
* ``"clipped"``: weighted mean after rejecting values more than ``clip_sigma`` noise sigmas
  (``1 / sqrt(w)``) from the median, then from the mean of the survivors (``clip_iters`` passes).

Weights: ``weights`` are inverse-variance maps (or one number per frame); without them each frame
gets ``1 / sigma^2`` from a robust (MAD) estimate of its pixel noise. The weight map is resampled
with the same kernel as the image (a weight per output pixel; the correlation that interpolation
introduces between neighbouring output pixels is ignored, as SWarp does). Output weight =
inverse variance of the co-add: ``sum(w)`` for the weighted mean, ``n^2 / sum(1 / w)`` for the
mean, ``(2 / pi)`` times the mean's for the median, the weighted mean's over the kept values for
``clipped``. The exposure map is the sum of the contributing frames' exposure times (1 each unless
given), ``count`` the number of contributing frames.

Masks: True = bad. An output pixel takes a frame only where the frame's resampled footprint is
complete (no bad or outside input pixel under the kernel: :attr:`ReprojectResult.mask`).

Optional per-frame matching before combination: ``background`` (``"constant"``: subtract each
frame's sigma-clipped median; or one offset per frame) and ``flux_scale`` (one factor per frame,
applied after the background; the weights are divided by its square).

Surface brightness: frames are interpolated, not flux-conserved (``conserve_flux=False``, SWarp's
``FSCALASTRO_TYPE NONE``): on a grid of equal pixel area the values are the same either way.

Memory: the output grid is processed in bands of ``chunk_rows`` rows; for each band only the
rectangle of every frame that maps into it is read (a slice of a tensor, or a section read
of a FITS file in :func:`stack_files`), so memory grows with the band, not with the number of
frames times their size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from .align import reproject
from .wcs import TanWCS
from ._robust import mad_std

__all__ = ["COMBINES", "BACKGROUNDS", "FLUX_SCALES", "StackResult", "StackError", "FrameMatch", "stack", "stack_files",
           "coadd_grid", "Stack", "build_template", "write_stack", "read_grid", "combine_values", "match_flux_scales"]

COMBINES = ("mean", "weighted", "median", "clipped")
BACKGROUNDS = (None, "constant", "2d", "match")
FLUX_SCALES = (None, "header", "auto")
_D2R = math.pi / 180.0


class StackError(ValueError):
    """Frames that cannot be stacked together (different fields, no overlap with the grid)."""


class StackResult(NamedTuple):
    """Co-add ``image`` (1, 1, H, W) (NaN where no frame contributes), ``weight`` (inverse variance,
    0 there), ``exposure`` (sum of exposure times), ``count`` (frames per pixel, int32) and
    ``flux_scale`` (N,) float64, the factor applied to each frame (1 where none was)."""

    image: Tensor
    weight: Tensor
    exposure: Tensor
    count: Tensor
    flux_scale: Optional[Tensor] = None


# ----------------------------------------------------------------------------------------------
# Frame sources: the rectangle of each frame that one band of the output needs
# ----------------------------------------------------------------------------------------------
@dataclass
class _Frame:
    """One input frame: its WCS (one element), shape, exposure, and a reader of rectangles."""

    wcs: TanWCS
    shape: tuple
    exposure: float
    name: str
    reader: object  # callable (y0, y1, x0, x1) -> (image (1,1,h,w), mask or None, weight (1,1,h,w) or None)
    weight_scalar: Optional[float] = None
    offset: float = 0.0
    scale: float = 1.0
    background: Optional["_BackgroundMap"] = None  # a 2-D background subtracted before ``offset``
    saturation: Optional[float] = None  # raw level above which stars are not used for flux scaling


def _tensor_reader(image: Tensor, mask: Optional[Tensor], weight: Optional[Tensor]):
    def read(y0, y1, x0, x1):
        cut = lambda t: None if t is None else t[None, None, y0:y1, x0:x1]
        return cut(image), cut(mask), cut(weight)
    return read


def robust_sigma(values: Tensor) -> Tensor:
    """MAD_TO_STD x the median absolute deviation of the finite values (a 0-d tensor)."""
    v = values[torch.isfinite(values)].reshape(-1)
    if v.numel() > 1 << 22:  # a regular subsample is plenty for a noise level
        v = v[:: v.numel() // (1 << 22) + 1]
    return mad_std(v)


def _clipped_median(values: Tensor, sigma: float = 3.0, iters: int = 5) -> float:
    v = values[torch.isfinite(values)].reshape(-1).to(torch.float64)
    if v.numel() > 1 << 22:
        v = v[:: v.numel() // (1 << 22) + 1]
    for _ in range(iters):
        med = v.median()
        s = mad_std(v, center=med)
        v = v[(v - med).abs() <= sigma * s.clamp_min(1e-30)]
    return float(v.median())


# ----------------------------------------------------------------------------------------------
# Output grid
# ----------------------------------------------------------------------------------------------
def _edge_points(shape, n: int = 16) -> tuple[Tensor, Tensor]:
    h, w = shape
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    xs = torch.cat([t * (w - 1), t * (w - 1), torch.zeros(n, dtype=torch.float64),
                    torch.full((n,), w - 1.0, dtype=torch.float64)])
    ys = torch.cat([torch.zeros(n, dtype=torch.float64), torch.full((n,), h - 1.0, dtype=torch.float64),
                    t * (h - 1), t * (h - 1)])
    return xs, ys


def _unit(ra: Tensor, dec: Tensor) -> Tensor:
    r, d = ra * _D2R, dec * _D2R
    return torch.stack([d.cos() * r.cos(), d.cos() * r.sin(), d.sin()], -1)


def _check_one_field(frames: Sequence[_Frame]) -> None:
    """StackError naming the frames when they fall into groups that do not overlap each other."""
    n = len(frames)
    centres = []
    for f in frames:
        ra, dec = f.wcs.pixel_to_world(torch.tensor([(f.shape[1] - 1) / 2.0], dtype=torch.float64),
                                       torch.tensor([(f.shape[0] - 1) / 2.0], dtype=torch.float64))
        centres.append((float(ra.reshape(-1)[0]), float(dec.reshape(-1)[0])))
    radius = [0.5 * math.hypot(*f.shape) * float(f.wcs.pixel_scale()[0]) for f in frames]  # deg
    u = _unit(torch.tensor([c[0] for c in centres], dtype=torch.float64),
              torch.tensor([c[1] for c in centres], dtype=torch.float64))
    sep = torch.rad2deg(torch.acos((u @ u.T).clamp(-1, 1)))
    r = torch.tensor(radius, dtype=torch.float64)
    linked = sep < (r[:, None] + r[None, :])
    group = torch.zeros(n, dtype=torch.long) - 1
    g = 0
    for i in range(n):  # connected components over at most a few hundred frames
        if group[i] >= 0:
            continue
        todo = [i]
        while todo:
            j = todo.pop()
            if group[j] >= 0:
                continue
            group[j] = g
            todo.extend(int(k) for k in linked[j].nonzero().reshape(-1) if group[k] < 0)
        g += 1
    if g > 1:
        parts = []
        for k in range(g):
            names = [frames[i].name for i in range(n) if group[i] == k]
            c = centres[int((group == k).nonzero()[0])]
            parts.append(f"[{', '.join(names[:4])}{' ...' if len(names) > 4 else ''}] near "
                         f"RA {c[0]:.4f} Dec {c[1]:+.4f}")
        raise StackError(f"frames of different fields in one stack: {g} groups that do not overlap: "
                         + "; ".join(parts) + " (stack each field separately, or give reference=)")


def coadd_grid(wcs_list: Sequence[TanWCS], shapes: Sequence, pixel_scale: Optional[float] = None):
    """A north-up TAN grid (``TanWCS``, (H, W)) covering every frame, as SWarp's default output:
    centred between the frames' extremes, the frames' median pixel scale unless ``pixel_scale``
    (arcsec/px) is given."""
    us, scales = [], []
    for w, s in zip(wcs_list, shapes):
        ex, ey = _edge_points(s)
        ra, dec = w.pixel_to_world(ex, ey)
        us.append(_unit(ra.reshape(-1), dec.reshape(-1)))
        scales.append(float(w.pixel_scale()[0]))
    allu = torch.cat(us)
    c = allu.mean(0)
    c = c / c.norm()
    ra0 = float(torch.rad2deg(torch.atan2(c[1], c[0]))) % 360.0
    dec0 = float(torch.rad2deg(torch.asin(c[2])))
    scale = (pixel_scale / 3600.0) if pixel_scale else float(np.median(scales))
    probe = TanWCS([0.0, 0.0], [[-scale, 0.0], [0.0, scale]], [ra0, dec0], 180.0)
    ra, dec = _sky(allu)
    px, py = probe.world_to_pixel(ra, dec)
    x0, x1, y0, y1 = float(px.min()), float(px.max()), float(py.min()), float(py.max())
    # re-centre on the middle of the extremes (SWarp's CENTER_TYPE ALL)
    mid_ra, mid_dec = probe.pixel_to_world(torch.tensor([(x0 + x1) / 2], dtype=torch.float64),
                                           torch.tensor([(y0 + y1) / 2], dtype=torch.float64))
    W = int(math.ceil(x1 - x0)) + 1
    H = int(math.ceil(y1 - y0)) + 1
    meta = [dict(kind="TAN", ctype=("RA--", "DEC-"), radesys="ICRS", equinox=2000.0, shape=(H, W))]
    grid = TanWCS([(W - 1) / 2.0, (H - 1) / 2.0], [[-scale, 0.0], [0.0, scale]],
                  [float(mid_ra.reshape(-1)[0]), float(mid_dec.reshape(-1)[0])], 180.0, meta=meta)
    return grid, (H, W)


def _sky(u: Tensor):
    return torch.rad2deg(torch.atan2(u[:, 1], u[:, 0])) % 360.0, torch.rad2deg(torch.asin(u[:, 2].clamp(-1, 1)))


# ----------------------------------------------------------------------------------------------
# Per-band resampling and combination
# ----------------------------------------------------------------------------------------------
def _shifted(wcs: TanWCS, dx: float, dy: float) -> TanWCS:
    """The same WCS for a sub-array whose pixel (0, 0) is pixel (dx, dy) of the original."""
    out = wcs.select(0)
    out.crpix = out.crpix - torch.tensor([[dx, dy]], dtype=out.crpix.dtype, device=out.crpix.device)
    return out


def _source_box(frame: _Frame, band_wcs: TanWCS, rows: int, width: int, margin: int = 4):
    """Rectangle ``(y0, y1, x0, x1)`` of the frame that the band needs, or None when disjoint."""
    n = 33
    t = torch.linspace(0, 1, n, dtype=torch.float64)
    bx = torch.cat([t * (width - 1), t * (width - 1), torch.zeros(n, dtype=torch.float64),
                    torch.full((n,), width - 1.0, dtype=torch.float64)])
    by = torch.cat([torch.zeros(n, dtype=torch.float64), torch.full((n,), rows - 1.0, dtype=torch.float64),
                    t * (rows - 1), t * (rows - 1)])
    sx, sy = band_wcs.pixel_to_pixel(frame.wcs, bx, by)
    ok = torch.isfinite(sx) & torch.isfinite(sy)
    if not bool(ok.any()):
        return None
    h, w = frame.shape
    # a frame wholly inside the band has no boundary point on it: the box spans the band's image
    x0 = max(0, int(math.floor(float(sx[ok].min()))) - margin)
    x1 = min(w, int(math.ceil(float(sx[ok].max()))) + margin + 1)
    y0 = max(0, int(math.floor(float(sy[ok].min()))) - margin)
    y1 = min(h, int(math.ceil(float(sy[ok].max()))) + margin + 1)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return None
    return y0, y1, x0, x1


def _safe_step(grid_step: Optional[int], rows: int, width: int) -> Optional[int]:
    """A grid step near ``grid_step`` for which neither ``rows - 1`` nor ``width - 1`` is a multiple:
    ``align.reproject`` with ``grid_step`` fails on such output shapes (it indexes one node too far)."""
    if grid_step is None:
        return None
    for s in (grid_step, grid_step - 1, grid_step + 1, grid_step - 2, grid_step + 2, grid_step + 3):
        if s >= 2 and (rows - 1) % s and (width - 1) % s:
            return s
    return None


def _resample_band(frames, band_wcs, rows, width, interpolation, grid_step):
    """Values, validity and weights (N, rows, width) of every frame on one output band."""
    grid_step = _safe_step(grid_step, rows, width)
    vals, valid, wts, expo = [], [], [], []
    for f in frames:
        box = _source_box(f, band_wcs, rows, width)
        if box is None:
            continue
        y0, y1, x0, x1 = box
        img, msk, wgt = f.reader(y0, y1, x0, x1)
        src = _shifted(f.wcs, x0, y0)
        if f.background is not None:
            img = img - f.background.rows(y0, y1, x0, x1).to(img.dtype)
        img = (img - f.offset) * f.scale if (f.offset != 0.0 or f.scale != 1.0) else img
        bad = ~torch.isfinite(img) if msk is None else (msk | ~torch.isfinite(img))
        if wgt is not None:
            bad = bad | ~(wgt > 0)
        res = reproject(img, src, band_wcs, (rows, width), mask=bad, interpolation=interpolation, grid_step=grid_step)
        ok = ~res.mask[:, 0]
        v = torch.where(ok, res.image[:, 0], torch.zeros_like(res.image[:, 0]))
        if wgt is not None:
            rw = reproject(torch.where(bad, torch.zeros_like(wgt), wgt), src, band_wcs, (rows, width),
                           interpolation="bilinear", grid_step=grid_step).image[:, 0]
            rw = torch.nan_to_num(rw, nan=0.0).clamp_min(0.0) / (f.scale * f.scale)
            ok = ok & (rw > 0)
        else:
            rw = torch.full_like(v, f.weight_scalar / (f.scale * f.scale))
        vals.append(v)
        valid.append(ok)
        wts.append(torch.where(ok, rw, torch.zeros_like(rw)))
        expo.append(f.exposure)
    if not vals:
        return None
    return torch.cat(vals), torch.cat(valid), torch.cat(wts), torch.tensor(expo, dtype=vals[0].dtype)


def _median(vals: Tensor, valid: Tensor) -> Tensor:
    """Median over axis 0 of the valid values (mean of the two middle ones for an even count)."""
    n = valid.sum(0)
    s = torch.where(valid, vals, torch.full_like(vals, math.inf)).sort(0).values
    lo = ((n - 1).clamp_min(0) // 2).unsqueeze(0)
    hi = (n // 2).clamp_max(vals.shape[0] - 1).unsqueeze(0)
    m = 0.5 * (s.gather(0, lo) + s.gather(0, hi))[0]
    return torch.where(n > 0, m, torch.full_like(m, math.nan))


def _clip(vals, valid, wts, clip_sigma, clip_iters):
    """Validity after rejecting values more than ``clip_sigma`` noise sigmas from the centre."""
    keep = valid
    centre = _median(vals, valid)
    sigma = torch.where(wts > 0, wts.clamp_min(1e-30).rsqrt(), torch.full_like(wts, math.inf))
    for _ in range(clip_iters):
        new = valid & ((vals - centre).abs() <= clip_sigma * sigma)
        new = torch.where(new.any(0, keepdim=True), new, valid)  # never reject every value of a pixel
        keep = new
        wsum = (wts * keep).sum(0)
        centre = torch.where(wsum > 0, (wts * keep * vals).sum(0) / wsum.clamp_min(1e-30), centre)
    return keep


def combine_values(vals: Tensor, valid: Tensor, wts: Tensor, combine: str, *, clip_sigma: float = 3.0,
                   clip_iters: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    """Combine (N, ...) values of N frames: (image, inverse-variance weight, kept mask (N, ...))."""
    n = valid.sum(0)
    if combine == "clipped":
        valid = _clip(vals, valid, wts, clip_sigma, clip_iters)
        combine = "weighted"
    vz = torch.where(valid, vals, torch.zeros_like(vals))
    wz = torch.where(valid, wts, torch.zeros_like(wts))
    if combine == "weighted":
        wsum = wz.sum(0)
        image = vz.mul(wz).sum(0) / torch.where(wsum > 0, wsum, torch.ones_like(wsum))
        weight = wsum
    else:
        inv = torch.where(valid, 1.0 / wz.clamp_min(1e-30), torch.zeros_like(wz)).sum(0)
        n = valid.sum(0)
        weight = torch.where(n > 0, n.to(vals.dtype) ** 2 / inv.clamp_min(1e-30), torch.zeros_like(inv))
        if combine == "mean":
            image = vz.sum(0) / n.clamp_min(1).to(vals.dtype)
        else:
            image = _median(vals, valid)
            weight = weight * (2.0 / math.pi)
    n = valid.sum(0)
    image = torch.where(n > 0, image, torch.full_like(image, math.nan))
    return image, torch.where(n > 0, weight, torch.zeros_like(weight)), valid


def _stack_frames(frames: Sequence[_Frame], target: TanWCS, shape_out, *, combine, interpolation, chunk_rows,
                  grid_step, clip_sigma, clip_iters, dtype, check_overlap: bool = True) -> StackResult:
    if combine not in COMBINES:
        raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
    H, W = int(shape_out[0]), int(shape_out[1])
    if chunk_rows is None:  # ~64 MB per (frames x rows x W) float32 array
        chunk_rows = max(8, min(H, (16 << 20) // max(1, len(frames) * W)))
    out = torch.full((1, 1, H, W), math.nan, dtype=dtype)
    weight = torch.zeros((1, 1, H, W), dtype=dtype)
    exposure = torch.zeros((1, 1, H, W), dtype=dtype)
    count = torch.zeros((1, 1, H, W), dtype=torch.int32)
    for r0 in range(0, H, chunk_rows):
        r1 = min(H, r0 + chunk_rows)
        band = _shifted(target, 0.0, float(r0))
        got = _resample_band(frames, band, r1 - r0, W, interpolation, grid_step)
        if got is None:
            continue
        vals, valid, wts, expo = got
        image, wsum, kept = combine_values(vals, valid, wts, combine, clip_sigma=clip_sigma, clip_iters=clip_iters)
        out[0, 0, r0:r1] = image
        weight[0, 0, r0:r1] = wsum
        exposure[0, 0, r0:r1] = (kept.to(dtype) * expo.to(dtype).reshape(-1, 1, 1)).sum(0)
        count[0, 0, r0:r1] = kept.sum(0).to(torch.int32)
    return StackResult(out, weight, exposure, count, torch.tensor([f.scale for f in frames], dtype=torch.float64))


# ----------------------------------------------------------------------------------------------
# Per-frame matching: 2-D background, automatic flux scale
# ----------------------------------------------------------------------------------------------
class _BackgroundMap(NamedTuple):
    """A frame's 2-D background as its coarse mesh and the separable interpolation rows
    (``background.background_2d`` with ``method="sextractor"``, SWarp's own background code:
    natural cubic spline through the box centres), so any rectangle is evaluated exactly without
    keeping a frame-sized map."""

    mesh: Tensor  # (ny, nx) float64
    ry: Tensor  # (H, ny)
    rx: Tensor  # (W, nx)

    def rows(self, y0: int, y1: int, x0: int, x1: int) -> Tensor:
        return (self.ry[y0:y1] @ self.mesh @ self.rx[x0:x1].T)[None, None]

    def level(self) -> float:
        """Median of the box values (mean of the two middle ones for an even count)."""
        return float(torch.quantile(self.mesh.reshape(-1), 0.5))


class FrameMatch(NamedTuple):
    """Automatic flux scale of one frame: ``scale`` (multiplies the frame), the number of stars
    used and the robust scatter (1.4826 MAD) of their flux ratios."""

    scale: float
    n_stars: int
    scatter: float


def _full_frame(f: _Frame) -> tuple[Tensor, Tensor]:
    """The whole frame (1, 1, H, W) (detached, in its floating dtype) and its bad-pixel mask."""
    img, msk, wgt = f.reader(0, f.shape[0], 0, f.shape[1])
    img = img.detach() if img.is_floating_point() else img.detach().float()
    bad = ~torch.isfinite(img) if msk is None else (msk | ~torch.isfinite(img))
    if wgt is not None:
        bad = bad | ~(wgt > 0)
    return torch.where(bad, torch.zeros_like(img), img), bad


def _measure_background(img: Tensor, bad: Tensor, box: int, cache: dict):
    """(``_BackgroundMap``, full background map, global rms) of one frame."""
    from .background import _interp_matrices, background_2d, global_rms

    mesh_out: dict = {}
    bkg = background_2d(img, bad, box_size=box, method="sextractor", mesh_out=mesh_out)
    mesh = mesh_out["mesh"].to(torch.float64)
    H, W = img.shape[-2:]
    key = (H, W, box, mesh.device)
    if key not in cache:  # frames of one shape share the interpolation rows
        cache[key] = _interp_matrices("spline", mesh.shape[-2], mesh.shape[-1], box, box, H, W, mesh.device,
                                      torch.float64)
    ry, rx = cache[key]
    return _BackgroundMap(mesh[0, 0], ry, rx), bkg.background, float(global_rms(mesh)[0])


def _bright_stars(sub: Tensor, bad: Tensor, rms: float, saturation: Optional[float], bkg: Tensor,
                  max_stars: int = 400) -> tuple[Tensor, Tensor, float]:
    """Positions (x, y) of the brightest isolated, unsaturated, unflagged stars (S/N > 50 in
    FLUX_AUTO) of a background-subtracted frame, and an aperture radius (4 half-light radii, at
    least 3 px) for their photometry. ``saturation``: the raw level (``sub + bkg``) of saturation."""
    from .detect import SourceExtractor

    cat = SourceExtractor(thresh=5.0, minarea=5, saturation=saturation)(sub.float(), rms, bad, background=bkg.float())
    snr = cat["flux_auto"] / cat["fluxerr_auto"].clamp_min(1e-30)
    ok = (cat["flags"] == 0) & (snr > 50) & torch.isfinite(snr)
    idx = ok.nonzero().reshape(-1)
    idx = idx[snr[idx].argsort(descending=True)[:max_stars]]
    radius = 4.0 * float(cat["flux_radius"][idx].median()) if idx.numel() else 3.0
    return cat["x"][idx].double(), cat["y"][idx].double(), max(3.0, radius)


def _aperture_fluxes(img: Tensor, bad: Tensor, x: Tensor, y: Tensor, r: float, rms: float) -> tuple[Tensor, Tensor]:
    """Fluxes in circles of radius ``r`` at (x, y) and whether each is usable (inside the frame,
    no bad pixel in the aperture, S/N > 20)."""
    from .photometry import sum_circle

    H, W = img.shape[-2:]
    inside = torch.isfinite(x) & torch.isfinite(y) & (x > r + 1) & (y > r + 1) & (x < W - r - 2) & (y < H - r - 2)
    flux = torch.full_like(x, math.nan)
    ok = torch.zeros_like(inside)
    if bool(inside.any()):
        xi, yi = x[inside], y[inside]
        f, e, flag = sum_circle(img, xi, yi, r, var=rms * rms)
        nbad, _, _ = sum_circle(bad.to(img.dtype), xi, yi, r + 1.0)
        flux[inside] = f
        ok[inside] = (flag == 0) & (nbad == 0) & (f > 20 * e)
    return flux, ok


def match_flux_scales(images: Tensor, wcs: TanWCS, *, masks: Optional[Tensor] = None, box: int = 64,
                      aperture: Optional[float] = None, min_stars: int = 5, saturation: Optional[float] = None,
                      names: Optional[Sequence[str]] = None) -> list[FrameMatch]:
    """Relative flux scale of each of ``images`` (N, 1, H, W) against the first: what
    ``stack(..., flux_scale="auto")`` applies (see :func:`_match_flux_scales` for the method)."""
    n, _, h, w = images.shape
    names = list(names) if names is not None else [f"frame {i}" for i in range(n)]
    frames = [_Frame(wcs.select(i), (h, w), 1.0, names[i],
                     _tensor_reader(images[i, 0], None if masks is None else masks[i, 0], None), saturation=saturation)
              for i in range(n)]
    return _match_flux_scales(frames, box=box, aperture=aperture, min_stars=min_stars)


def _match_flux_scales(frames: Sequence[_Frame], *, box: int = 64, aperture: Optional[float] = None,
                       min_stars: int = 5, backgrounds: Optional[list] = None) -> list[FrameMatch]:
    """Relative flux scale of every frame against the first (SCAMP's relative zero points, as FLXSCALE):
    bright isolated unsaturated stars detected in the first frame (``detect.SourceExtractor``) are
    measured at their sky positions, mapped through each frame's WCS, with ``photometry.sum_circle``
    on each frame's 2-D-background-subtracted pixels; the scale is the median of ``flux_first /
    flux_frame`` over the stars usable in both. Assumes the WCS are right to a fraction of the
    aperture and the PSFs alike enough that the aperture (default 4 half-light radii) holds the same
    fraction of the light. Frames are read one at a time. A :class:`StackError` names a frame with
    fewer than ``min_stars`` usable stars in common with the first."""
    cache: dict = {}
    out, ref_flux, ra, dec, radius = [], None, None, None, None
    for i, f in enumerate(frames):
        img, bad = _full_frame(f)
        bmap, bkg, rms = _measure_background(img, bad, box, cache)
        if backgrounds is not None:
            backgrounds.append(bmap)
        sub = img - bkg
        if i == 0:
            x, y, r_auto = _bright_stars(sub, bad, rms, f.saturation, bkg)
            radius = float(aperture) if aperture else r_auto
            ra, dec = f.wcs.pixel_to_world(x, y)
            ra, dec = ra.reshape(-1), dec.reshape(-1)
        px, py = f.wcs.world_to_pixel(ra, dec)
        flux, ok = _aperture_fluxes(sub, bad, px.reshape(-1).to(sub.dtype), py.reshape(-1).to(sub.dtype), radius, rms)
        if i == 0:
            ref_flux, ref_ok = flux, ok
        both = ok & ref_ok
        if i == 0 and int(both.sum()) < min_stars:
            raise StackError(f"flux_scale=auto: {f.name} (the flux reference) has {int(both.sum())} bright isolated "
                             f"unsaturated stars (need {min_stars}): give flux_scale factors (or FLXSCALE) instead")
        if int(both.sum()) < min_stars:
            raise StackError(f"flux_scale=auto: {f.name} has {int(both.sum())} usable stars in common with "
                             f"{frames[0].name} (need {min_stars}): give flux_scale factors (or FLXSCALE) instead")
        ratio = (ref_flux[both] / flux[both]).to(torch.float64)
        med = ratio.median()
        out.append(FrameMatch(float(med), int(both.sum()), float(mad_std(ratio, center=med))))
    return out


def _match_frames(frames: list, background, flux_scale, box: int = 64, aperture: Optional[float] = None) -> list:
    """Apply ``background`` in ("2d", "match") and ``flux_scale="auto"`` to the frames (in place)."""
    two_d = isinstance(background, str) and background in ("2d", "match")
    if not two_d and flux_scale != "auto":
        return frames
    backgrounds: list = []
    if flux_scale == "auto":
        for f, m in zip(frames, _match_flux_scales(frames, box=box, aperture=aperture, backgrounds=backgrounds)):
            f.scale = m.scale
    else:
        cache: dict = {}
        for f in frames:
            img, bad = _full_frame(f)
            backgrounds.append(_measure_background(img, bad, box, cache)[0])
    if two_d:
        for f, b in zip(frames, backgrounds):
            f.background = b
            f.offset = 0.0
        if background == "match":  # back to the first frame's level (in its scaled units)
            level = backgrounds[0].level() * frames[0].scale
            for f in frames:
                f.offset = -level / f.scale
    return frames


def _check_on_grid(frames: Sequence[_Frame], target: TanWCS, shape_out) -> None:
    off = [f.name for f in frames if _source_box(f, target, int(shape_out[0]), int(shape_out[1])) is None]
    if off:
        raise StackError(f"{len(off)} of {len(frames)} frames do not overlap the output grid: "
                         f"{', '.join(off[:6])}{' ...' if len(off) > 6 else ''}")


def _prepare_frames(frames: list, background, flux_scale, names_for_errors: str) -> list:
    n = len(frames)
    if background is not None and not isinstance(background, str):
        off = [float(v) for v in (background.tolist() if isinstance(background, Tensor) else background)]
        if len(off) != n:
            raise ValueError(f"background: {len(off)} offsets for {n} {names_for_errors}")
        for f, o in zip(frames, off):
            f.offset = o
    elif background not in BACKGROUNDS:
        raise ValueError(f"background must be one of {BACKGROUNDS} or one offset per frame, got {background!r}")
    if isinstance(flux_scale, str):
        if flux_scale not in FLUX_SCALES:
            raise ValueError(f"flux_scale must be one of {FLUX_SCALES} or one factor per frame, got {flux_scale!r}")
    elif flux_scale is not None:
        sc = [float(v) for v in (flux_scale.tolist() if isinstance(flux_scale, Tensor) else flux_scale)]
        if len(sc) != n or not all(math.isfinite(v) and v > 0 for v in sc):
            raise ValueError(f"flux_scale: need {n} positive factors, got {sc[:8]}")
        for f, v in zip(frames, sc):
            f.scale = v
    return frames


def stack(
    images: Tensor, wcs: TanWCS, target_wcs: Optional[TanWCS] = None, shape_out=None, *,
    masks: Optional[Tensor] = None, weights: Union[Tensor, Sequence[float], None] = None,
    exposure: Optional[Sequence[float]] = None, combine: str = "weighted", interpolation: str = "bilinear",
    background=None, flux_scale=None, clip_sigma: float = 3.0, clip_iters: int = 3,
    chunk_rows: Optional[int] = None, grid_step: Optional[int] = 16, names: Optional[Sequence[str]] = None,
    background_box: int = 64, flux_aperture: Optional[float] = None, saturation: Optional[float] = None,
) -> StackResult:
    """Co-add ``images`` (N, 1, H, W) with their batched ``wcs`` onto ``target_wcs`` / ``shape_out``.

    Without a target, :func:`coadd_grid` makes a north-up TAN grid covering every frame (and a
    :class:`StackError` names the frames when they belong to fields that do not overlap).
    ``weights``: inverse-variance maps (N, 1, H, W) or one number per frame (default: ``1 / sigma^2``
    from the frame's MAD). ``exposure``: per-frame exposure times for the exposure map (default 1).
    ``background``: None, ``"constant"``, ``"2d"`` (subtract each frame's ``background_2d`` map,
    boxes of ``background_box`` px), ``"match"`` (the same, then add back the first frame's median
    level) or (N,) offsets; ``flux_scale``: None, (N,) factors or ``"auto"`` (:func:`match_flux_scales`
    against the first frame, ``flux_aperture`` radius px or automatic; stars brighter than
    ``saturation`` (raw level) are not used); the factors applied are ``StackResult.flux_scale``.
    ``interpolation`` and ``grid_step`` as in :func:`~astroprep_torch.align.reproject`;
    ``chunk_rows`` output rows per band (None: ~64 MB per frames-by-band array). Differentiable
    with respect to ``images`` (mean, weighted and clipped through the kept values, median through
    the selected ones).
    """
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 1:
        raise ValueError(f"images must be a (N, 1, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__}")
    n, _, h, w = images.shape
    if len(wcs) != n:
        raise ValueError(f"wcs holds {len(wcs)} WCS for {n} images")
    if masks is not None and masks.shape != images.shape:
        raise ValueError(f"masks shape {tuple(masks.shape)} != images shape {tuple(images.shape)}")
    names = list(names) if names is not None else [f"frame {i}" for i in range(n)]
    wmaps = weights if isinstance(weights, Tensor) and weights.dim() == 4 else None
    if wmaps is not None and wmaps.shape != images.shape:
        raise ValueError(f"weights shape {tuple(wmaps.shape)} != images shape {tuple(images.shape)}")
    frames = []
    for i in range(n):
        img = images[i, 0]
        m = masks[i, 0] if masks is not None else None
        scalar = None
        if wmaps is None:
            if weights is not None:
                scalar = float(weights[i])
            else:
                good = img.detach() if m is None else img.detach()[~m]
                scalar = 1.0 / max(float(robust_sigma(good)) ** 2, 1e-30)
        off = _clipped_median(img.detach() if m is None else img.detach()[~m]) if background == "constant" else 0.0
        frames.append(_Frame(wcs.select(i), (h, w), float(exposure[i]) if exposure is not None else 1.0, names[i],
                             _tensor_reader(img, m, wmaps[i, 0] if wmaps is not None else None), scalar, off))
        frames[-1].saturation = saturation
    if flux_scale == "header":
        raise ValueError("flux_scale='header' reads FLXSCALE from FITS headers: use stack_files, or give factors")
    frames = _prepare_frames(frames, background, flux_scale, "images")
    match = dict(background=background, flux_scale=flux_scale, box=background_box, aperture=flux_aperture)
    return _run(frames, target_wcs, shape_out, match=match, combine=combine, interpolation=interpolation,
                chunk_rows=chunk_rows, grid_step=grid_step, clip_sigma=clip_sigma, clip_iters=clip_iters,
                dtype=images.dtype)


def _run(frames, target_wcs, shape_out, match: Optional[dict] = None, **kw) -> StackResult:
    if not frames:
        raise ValueError("stack needs at least one frame")
    if target_wcs is None:
        _check_one_field(frames)
        target_wcs, shape_out = coadd_grid([f.wcs for f in frames], [f.shape for f in frames])
    elif shape_out is None:
        shape_out = target_wcs.meta[0].get("shape")
        if shape_out is None:
            raise ValueError("shape_out is needed: the target WCS has no NAXIS1/NAXIS2")
    _check_on_grid(frames, target_wcs, shape_out)
    if match:
        _match_frames(frames, **match)
    res = _stack_frames(frames, target_wcs.select(0), shape_out, **kw)
    return res


class Stack(nn.Module):
    """Thin module over :func:`stack`: ``forward(images, wcs, target_wcs=None, shape_out=None,
    masks=None, weights=None, exposure=None) -> StackResult``."""

    def __init__(self, combine: str = "weighted", interpolation: str = "bilinear", background=None,
                 clip_sigma: float = 3.0, clip_iters: int = 3, chunk_rows: Optional[int] = None,
                 grid_step: Optional[int] = 16, background_box: int = 64, flux_aperture: Optional[float] = None):
        super().__init__()
        if combine not in COMBINES:
            raise ValueError(f"combine must be one of {COMBINES}, got {combine!r}")
        self.options = dict(combine=combine, interpolation=interpolation, background=background,
                            clip_sigma=clip_sigma, clip_iters=clip_iters, chunk_rows=chunk_rows, grid_step=grid_step,
                            background_box=background_box, flux_aperture=flux_aperture)

    def forward(self, images: Tensor, wcs: TanWCS, target_wcs: Optional[TanWCS] = None, shape_out=None,
                masks: Optional[Tensor] = None, weights=None, exposure=None, flux_scale=None) -> StackResult:
        return stack(images, wcs, target_wcs, shape_out, masks=masks, weights=weights, exposure=exposure,
                     flux_scale=flux_scale, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.options.items())


# ----------------------------------------------------------------------------------------------
# FITS files (read by sections: each band reads only the rows it needs)
# ----------------------------------------------------------------------------------------------
def read_grid(path) -> tuple[TanWCS, tuple]:
    """Target grid from a FITS file (its first image HDU's header) or an ASCII ``.head`` file; the
    header must give NAXIS1/NAXIS2."""
    from astropy.io import fits

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"reference: file not found: {path}")
    if path.suffix.lower() in (".head", ".hdr", ".txt"):
        text = path.read_bytes().decode("latin-1")
        header = fits.Header.fromstring(text, sep="\n" if "\n" in text[:81] else "")
    else:
        with fits.open(path) as hl:
            hdu = next((h for h in hl if h.header.get("NAXIS", 0) >= 2), hl[0])
            header = hdu.header.copy()
    if "NAXIS1" not in header or "NAXIS2" not in header:
        raise ValueError(f"reference {path}: no NAXIS1/NAXIS2, cannot tell the output grid's size")
    header["NAXIS"] = 2
    wcs = TanWCS.from_header(header)
    return wcs, (int(header["NAXIS2"]), int(header["NAXIS1"]))


def _image_hdu(hl, path):
    hdu = next((h for h in hl if h.header.get("NAXIS", 0) == 2 and h.header.get("NAXIS1", 0) > 0
                and h.is_image), None)
    if hdu is None:
        raise ValueError(f"{path}: no 2-D image HDU")
    return hdu


def _fits_frame(path: Path, weight_path, stack_ctx, header_suffix: Optional[str] = ".head") -> _Frame:
    """A frame read by sections (``hdu.section``: only the requested rows come from the file).

    A ``<frame><header_suffix>`` file beside it (e.g. the ``.head`` of ``astroprep astrometry`` or
    SCAMP) overrides the header's keys, as SWarp's ``HEADER_SUFFIX`` does."""
    from astropy.io import fits

    hl = stack_ctx.enter_context(fits.open(path, memmap=False))
    hdu = _image_hdu(hl, path)
    header = hdu.header
    head = path.with_suffix(header_suffix) if header_suffix else None
    if head is not None and head.is_file() and head != path:
        header = header.copy()
        text = head.read_bytes().decode("latin-1")
        extra = fits.Header.fromstring(text, sep="\n" if "\n" in text[:81] else "")
        if any(k.startswith(("CTYPE", "CD", "PC", "CRPIX")) for k in extra):  # a new WCS replaces the old one
            for k in [k for k in header if k.split("_")[0] in ("A", "B", "AP", "BP") or k.startswith(("PV1_", "PV2_"))]:
                del header[k]
        for card in extra.cards:
            if card.keyword not in ("HISTORY", "COMMENT", ""):
                header[card.keyword] = card.value
    shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    try:
        wcs = TanWCS.from_header(header)
    except ValueError as exc:
        raise ValueError(f"{path}: cannot stack without a supported WCS: {exc}") from None
    whdu = None
    if weight_path is not None:
        whdu = _image_hdu(stack_ctx.enter_context(fits.open(weight_path, memmap=False)), weight_path)
        wshape = (int(whdu.header["NAXIS2"]), int(whdu.header["NAXIS1"]))
        if wshape != shape:
            raise ValueError(f"weight map {weight_path} shape {wshape} != {path} shape {shape}")

    def read(y0, y1, x0, x1):
        img = torch.from_numpy(np.asarray(hdu.section[y0:y1, x0:x1], dtype=np.float32).copy())[None, None]
        wgt = None if whdu is None else torch.from_numpy(
            np.asarray(whdu.section[y0:y1, x0:x1], dtype=np.float32).copy())[None, None]
        return img, ~torch.isfinite(img), wgt

    saturation = header.get("SATURATE")
    return _Frame(wcs, shape, float(header.get("EXPTIME", 1.0) or 1.0), path.name, read,
                  None, 0.0, float(header.get("FLXSCALE", 1.0) or 1.0),
                  saturation=float(saturation) if isinstance(saturation, (int, float)) and saturation > 0 else None)


def stack_files(paths: Sequence, *, reference=None, weights: Optional[Sequence] = None, combine: str = "weighted",
                interpolation: str = "bilinear", background=None, flux_scale=None, clip_sigma: float = 3.0,
                clip_iters: int = 3, chunk_rows: Optional[int] = None, grid_step: Optional[int] = 16,
                header_suffix: Optional[str] = ".head", background_box: int = 64,
                flux_aperture: Optional[float] = None) -> tuple:
    """Co-add FITS frames (see :func:`stack`); returns ``(StackResult, target TanWCS)``.

    ``reference``: a FITS file or ``.head`` giving the output grid (default :func:`coadd_grid`).
    ``weights``: one inverse-variance weight map per frame (SWarp's ``MAP_WEIGHT`` with
    ``RESCALE_WEIGHTS N``); default ``1 / sigma^2`` per frame from the MAD of a subsample. Exposure
    times come from ``EXPTIME`` (1 when absent). ``flux_scale="header"`` uses each frame's ``FLXSCALE`` (as SWarp; 1 when absent);
    ``flux_scale="auto"`` measures it against the first frame (:func:`match_flux_scales`, stars above
    the header's ``SATURATE`` left out; one frame read at a time). ``background``: as in :func:`stack`.
    Frames are read by sections: every band of ``chunk_rows`` output rows reads only what it needs.
    A ``<frame>.head`` beside a frame overrides its header (``header_suffix``; None: ignore them).
    This is also the template builder for a night without a reference: ``stack_files(frames,
    combine="median")`` then :func:`write_stack`.
    """
    import contextlib

    paths = [Path(p) for p in paths]
    if not paths:
        raise ValueError("stack_files: no input frames")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"stack: input frame(s) not found: {', '.join(missing[:6])}")
    if weights is not None and len(weights) != len(paths):
        raise ValueError(f"weights: {len(weights)} weight maps for {len(paths)} frames")
    target, shape = read_grid(reference) if reference is not None else (None, None)
    with contextlib.ExitStack() as ctx:
        frames = [_fits_frame(p, weights[i] if weights is not None else None, ctx, header_suffix)
                  for i, p in enumerate(paths)]
        for f in frames:  # noise and level from every 4th row (read in strips of 256 rows)
            sub = torch.cat([f.reader(r, min(r + 256, f.shape[0]), 0, f.shape[1])[0][0, 0, ::4, ::4]
                             for r in range(0, f.shape[0], 256)]) if (weights is None or background == "constant") \
                else None
            if weights is None:
                f.weight_scalar = 1.0 / max(float(robust_sigma(sub)) ** 2, 1e-30)
            if background == "constant":
                f.offset = _clipped_median(sub)
            if flux_scale != "header":
                f.scale = 1.0
        frames = _prepare_frames(frames, background, None if flux_scale in (None, "header") else flux_scale, "frames")
        if target is None:
            _check_one_field(frames)
            target, shape = coadd_grid([f.wcs for f in frames], [f.shape for f in frames])
        match = dict(background=background, flux_scale=flux_scale, box=background_box, aperture=flux_aperture)
        res = _run(frames, target, shape, match=match, combine=combine, interpolation=interpolation,
                   chunk_rows=chunk_rows, grid_step=grid_step, clip_sigma=clip_sigma, clip_iters=clip_iters,
                   dtype=torch.float32)
    return res, target


def write_stack(out_dir, result: StackResult, target: TanWCS, *, combine: str, names: Sequence[str] = (),
                background=None, flux_scale=None) -> dict:
    """Write ``coadd.fits``, ``coadd.weight.fits`` and ``coadd.exposure.fits`` (with the grid's WCS);
    the header lists the frames (``IMCMBnnn``), the flux scale applied to each (``FLXSCnnn``) and,
    when given as strings, the ``background`` and ``flux_scale`` modes (``BACKMTCH``, ``FLXSCTYP``)."""
    from astropy.io import fits

    from .io import write_fits

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h = fits.Header()
    h["COMBINET"] = (combine.upper(), "astroprep stack COMBINE_TYPE")
    h["NCOMBINE"] = (len(names), "frames in the stack")
    for i, n in enumerate(names[:999]):
        h[f"IMCMB{i + 1:03d}"] = str(n)[:68]
    if result.flux_scale is not None:
        for i, v in enumerate(result.flux_scale.tolist()[:999]):
            h[f"FLXSC{i + 1:03d}"] = (float(f"{v:.7g}"), f"flux scale applied to frame {i + 1}")
    for key, mode in (("BACKMTCH", background), ("FLXSCTYP", flux_scale)):
        if isinstance(mode, str):
            h[key] = (mode, "astroprep stack per-frame " + ("background" if key == "BACKMTCH" else "flux scale"))
    paths = {"coadd": out / "coadd.fits", "weight": out / "coadd.weight.fits", "exposure": out / "coadd.exposure.fits"}
    write_fits(paths["coadd"], result.image, header=h, wcs=target, overwrite=True)
    write_fits(paths["weight"], result.weight, header=h, wcs=target, overwrite=True)
    write_fits(paths["exposure"], result.exposure, header=h, wcs=target, overwrite=True)
    return paths


def build_template(paths: Sequence, output, *, combine: str = "median", reference=None, weights=None,
                   **options) -> dict:
    """A deep template from a night's frames (for ``astroprep night`` without a reference): stacks
    ``paths`` with :func:`stack_files` and writes the three co-add files into ``output``; returns
    their paths (``coadd``, ``weight``, ``exposure``)."""
    res, target = stack_files(paths, reference=reference, weights=weights, combine=combine, **options)
    return write_stack(output, res, target, combine=combine, names=[Path(p).name for p in paths],
                       background=options.get("background"), flux_scale=options.get("flux_scale"))
