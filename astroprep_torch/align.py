"""Image alignment: WCS reprojection, star-matching registration and differentiable refinement.

Paper section 2.2.3: pixel coordinate mapping through the WCS (target pixel -> sky -> source
pixel, SIP distortion both ways), affine-matrix estimation from matched stars, and resampling.

Three independent tools live here:

* :class:`Reproject` / :func:`reproject` -- resample a batch of frames, each with its own WCS, onto
  one target WCS. The mapping ``target pixel -> (ra, dec) -> source pixel`` goes through
  :class:`astroprep_torch.wcs.TanWCS` (any object with ``pixel_to_world`` / ``world_to_pixel`` on
  tensors works), then the frame is sampled with ``"nearest"``, ``"bilinear"``, ``"bicubic"``
  (``grid_sample``) or ``"lanczos3"`` (SWarp's default kernel, a separable 6x6 gather written here).
* :func:`match_sources` / :func:`register` -- registration without a WCS: triangle-invariant
  asterism matching as astroalign does, a deterministic RANSAC over all triangle matches, then
  iterative least squares on the matched stars; :func:`register` detects peaks (:func:`find_peaks`),
  matches and warps (:func:`warp_affine`, kornia's ``warp_affine`` convention and optional backend).
* :func:`refine` -- gradient-descent refinement of an affine matrix (or of a WCS's CRPIX / CD) that
  minimises the masked squared difference between the warped image and the reference.

Conventions (see the package docstring): images ``(B, C, H, W)``, masks bool with True = bad, pixel
coordinates 0-based with ``x`` = column and ``y`` = row, and the value of pixel ``(x, y)`` sits at
its centre. A 2x3 ``matrix`` maps pixel coordinates of the moving image to those of the reference:
``[x_ref, y_ref] = M[:, :2] @ [x, y] + M[:, 2]``.

Sampling rules (they follow reproject's ``reproject_interp``):

* A target pixel is *inside* when its source position satisfies ``-0.5 <= x <= W - 0.5`` and
  ``-0.5 <= y <= H - 0.5``; positions in the outer half of the border pixels are clamped onto the
  border pixel centres. Outside pixels are NaN with footprint 0.
* ``grid_sample`` is called with ``align_corners=True``, for which the normalised coordinate -1..1
  maps onto the pixel centres 0..W-1: ``u = 2 x / (W - 1) - 1``. (With ``align_corners=False`` the
  same ``u`` would land half a pixel off -- the classic trap; a test checks a known sub-pixel shift.)
* Without a mask, NaNs in the input spread to the output pixels whose kernel touches them (as in
  reproject) and the footprint is 0 there. With a mask, bad pixels (mask True or non-finite) are
  left out and the kernel is renormalised over the good ones; the footprint is then the kernel
  weight that fell on good pixels (clamped to [0, 1]; Lanczos and bicubic have negative lobes) and
  the output mask (``ReprojectResult.mask``) is ``footprint < 1``.
* ``"bicubic"`` is cubic convolution with a = -0.75 (``grid_sample``/OpenCV), ``"lanczos3"`` is
  ``sinc(t) sinc(t/3)`` on 6x6 taps with each 1-D weight set normalised to unit sum (SWarp's
  LANCZOS3; agrees with SWarp 2.41 to ~1e-8 relative on the shared m13 case); border pixels are
  replicated for taps beyond the edge.

Flux: ``conserve_flux=False`` keeps surface brightness (pixel values are interpolated as they are).
That is SWarp with ``FSCALASTRO_TYPE NONE``. ``conserve_flux=True`` multiplies each output pixel by
``|det J|``, the Jacobian determinant of the mapping target pixel -> source pixel (source pixels per
target pixel), so the total flux is kept: SWarp's ``FSCALASTRO_TYPE VARIABLE``. SWarp's default
``FIXED`` applies one such factor, measured at the field centre, to the whole frame.

Speed: the mapping is exact per pixel when ``grid_step=None``. With ``grid_step=s`` (default 32) it is evaluated
exactly on a grid of nodes every ``s`` pixels (plus one node beyond each edge) and interpolated in
between with separable Catmull-Rom cubics (exact for quadratics), as SWarp does with its
oversampled projection grid. For TAN-SIP frames at 4096x4096 and ``s=16`` the error stays below
1e-4 px (``experiments/align_speed.py`` measures it), far under the 1e-3 px budget; the error is
checked at the cell centres and the step halved until it is below 1e-3 px. Rows of the
output are processed in chunks of ``chunk_rows`` so that an 8192x8192 frame fits in memory.
``fused=True`` runs each chunk's coordinate interpolation + gather-based sampling through
``torch.compile`` as one loop (several times faster on CPU; one compilation per interpolation, shape
and dtype, cached on disk). Eager mode uses ``grid_sample`` for nearest/bilinear/bicubic; float32
images then get float32 normalised coordinates (a few 1e-4 px on 4096-px frames), the fused and
Lanczos paths keep the coordinates in ``coord_dtype`` (float64).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import as_pair, check_batch_nonempty, check_float_dtype, check_image, check_mask, check_wcs
from ._runtime import adapt_to_load
from ._robust import MAD_TO_STD, mad_std

__all__ = [
    "AlignmentError",
    "ReprojectResult",
    "Reproject",
    "reproject",
    "pixel_to_pixel",
    "sample_image",
    "lanczos_kernel",
    "MatchResult",
    "match_sources",
    "find_peaks",
    "Peaks",
    "RegisterResult",
    "register",
    "Register",
    "RefineResult",
    "refine",
    "fit_transform",
    "warp_affine",
    "warp_variance",
    "apply_transform",
    "invert_transform",
    "transform_scale_rotation",
]

INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos3")


class AlignmentError(ValueError):
    """Raised when two frames cannot be aligned reliably (too few matches, inconsistent fit)."""


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------


def lanczos_kernel(t: Tensor, a: int = 3) -> Tensor:
    """Lanczos window ``sinc(t) sinc(t / a)`` for ``|t| < a``, 0 elsewhere (``sinc`` normalised)."""
    return torch.where(t.abs() < a, torch.sinc(t) * torch.sinc(t / a), torch.zeros_like(t))


def _inside(x: Tensor, y: Tensor, h: int, w: int) -> Tensor:
    return (x >= -0.5) & (x <= w - 0.5) & (y >= -0.5) & (y <= h - 0.5)


def _grid_sample(img: Tensor, x: Tensor, y: Tensor, mode: str) -> Tensor:
    """``grid_sample`` at pixel positions ``x, y`` (B, h, w), already clamped to the image."""
    h, w = img.shape[-2:]
    # align_corners=True: -1 and +1 are the centres of the first and last pixels.
    gx = x * (2.0 / (w - 1)) - 1.0 if w > 1 else torch.zeros_like(x)
    gy = y * (2.0 / (h - 1)) - 1.0 if h > 1 else torch.zeros_like(y)
    grid = torch.stack([gx, gy], dim=-1).to(img.dtype)
    return F.grid_sample(img, grid, mode=mode, padding_mode="border", align_corners=True)


_PAD = 3  # replicate padding around the image for gather-based kernels (Lanczos3 reaches 3 px)
_BICUBIC_A = -0.75  # PyTorch grid_sample / OpenCV cubic convolution parameter


def _cubic_conv(t: Tensor) -> Tensor:
    t = t.abs()
    a = _BICUBIC_A
    near = ((a + 2) * t - (a + 3)) * t * t + 1
    far = ((a * t - 5 * a) * t + 8 * a) * t - 4 * a
    return torch.where(t <= 1, near, torch.where(t < 2, far, torch.zeros_like(t)))


def _lanczos3_taps(f: Tensor) -> list[Tensor]:
    """Normalised Lanczos3 weights of taps -2..3 at fraction ``f`` in [0, 1) (3 trig calls)."""
    # sin(pi (f - k)) = (-1)^k sin(pi f); sin(pi (f - k) / 3) by angle addition.
    s1 = torch.sin(math.pi * f)
    s3 = torch.sin(math.pi * f / 3)
    c3 = torch.cos(math.pi * f / 3)
    ws = []
    for k in range(-2, 4):
        t = f - k
        num = 3.0 * (-1.0) ** (k % 2) * s1 * (s3 * math.cos(math.pi * k / 3) - c3 * math.sin(math.pi * k / 3))
        den = (math.pi * t) ** 2
        ws.append(torch.where(t.abs() < 1e-9, torch.ones_like(t), num / torch.where(t.abs() < 1e-9, torch.ones_like(t), den)))
    total = ws[0] + ws[1] + ws[2] + ws[3] + ws[4] + ws[5]
    return [wk / total for wk in ws]


def _taps(f: Tensor, interpolation: str) -> tuple[int, list[Tensor]]:
    """First tap offset and the 1-D weights of each tap for fraction ``f``."""
    if interpolation == "bilinear":
        return 0, [1 - f, f]
    if interpolation == "bicubic":
        return -1, [_cubic_conv(f + 1), _cubic_conv(f), _cubic_conv(1 - f), _cubic_conv(2 - f)]
    if interpolation == "lanczos3":
        return -2, _lanczos3_taps(f)
    raise ValueError(interpolation)


def _pad_flat(image: Tensor) -> Tensor:
    """Replicate-pad ``(B, C, H, W)`` by ``_PAD`` and flatten the pixels: ``(B, C, L)``."""
    b, c, h, w = image.shape
    padded = F.pad(image.reshape(b * c, 1, h, w), (_PAD, _PAD, _PAD, _PAD), mode="replicate")
    return padded.reshape(b, c, -1)


def _gather_sample(flat: Tensor, x: Tensor, y: Tensor, w: int, interpolation: str, squared: bool = False) -> Tensor:
    """Separable-kernel sampling by gathers from a padded, flattened image.

    ``flat`` is ``(B, C, L)`` from :func:`_pad_flat`; ``x, y`` are ``(B, n)`` clamped to the image.
    Each value is ``sum_ij wy_i wx_j I[iy + i, ix + j]`` over the kernel's taps; this is the one
    implementation of Lanczos3 and, under ``torch.compile``, a single fused loop for every kernel.
    ``squared=True`` uses the squared weights ``(wy_i wx_j)^2``: the variance of the interpolated
    value of independent pixels whose variances ``flat`` holds.
    """
    b, c, _ = flat.shape
    n = x.shape[1]
    wp = w + 2 * _PAD
    if interpolation == "nearest":
        idx = (torch.round(y).long() + _PAD) * wp + (torch.round(x).long() + _PAD)
        return torch.gather(flat, 2, idx.unsqueeze(1).expand(b, c, n))
    ix, iy = torch.floor(x), torch.floor(y)
    o, wx = _taps(x - ix, interpolation)
    _, wy = _taps(y - iy, interpolation)
    if squared:
        wx, wy = [t * t for t in wx], [t * t for t in wy]
    base = (iy.long() + (_PAD + o)) * wp + (ix.long() + (_PAD + o))
    acc = None
    for ky in range(len(wy)):
        row = None
        for kx in range(len(wx)):
            idx = (base + (ky * wp + kx)).unsqueeze(1).expand(b, c, n)
            term = torch.gather(flat, 2, idx) * wx[kx].to(flat.dtype).unsqueeze(1)
            row = term if row is None else row + term
        term = row * wy[ky].to(flat.dtype).unsqueeze(1)
        acc = term if acc is None else acc + term
    return acc


def _sample_chunk(flat: Tensor, x: Tensor, y: Tensor, h: int, w: int, interpolation: str,
                  n_channels: int, masked: bool) -> tuple[Tensor, Tensor]:
    """Fused chunk sampler: ``flat`` ``(B, C', L)``; ``x, y`` ``(B, n)``. Returns (values, footprint).

    With ``masked``, ``flat`` holds the zero-filled image in its first ``n_channels`` channels and the
    bad-pixel map in the next ``n_channels``.
    """
    inside = _inside(x, y, h, w).unsqueeze(1)
    xc = x.clamp(0, w - 1)
    yc = y.clamp(0, h - 1)
    vals = _gather_sample(flat, xc, yc, w, interpolation)
    return _finish(vals, inside, n_channels, masked)


def _reproject_chunk(nodes_rows: Tensor, j: Tensor, wts: Tensor, flat: Tensor, h: int, w: int,
                     interpolation: str, n_channels: int, masked: bool, jacobian: bool):
    """Coordinate interpolation + sampling (+ flux scaling) of one chunk of rows, fused under compile."""
    m = _interp_axis(nodes_rows, j, wts, 2)  # (B, k, n, W)
    b = m.shape[0]
    vals, fp = _sample_chunk(flat, m[:, 0].reshape(b, -1), m[:, 1].reshape(b, -1), h, w, interpolation,
                             n_channels, masked)
    if jacobian:
        vals = vals * m[:, 2].reshape(b, 1, -1).to(vals.dtype)
    return vals, fp


def _finish(vals: Tensor, inside: Tensor, n_channels: int, masked: bool) -> tuple[Tensor, Tensor]:
    if masked:
        # the second half holds the sampled bad-pixel map: the good weight is 1 - that, exactly 1
        # (footprint 1) wherever no bad pixel enters the kernel
        v, wsum = vals[:, :n_channels], 1 - vals[:, n_channels:]
        ok = inside & (wsum > 1e-6)
        v = v / torch.where(ok, wsum, torch.ones_like(wsum))
        footprint = torch.where(ok, wsum.clamp(0, 1), torch.zeros_like(wsum)).amin(1, keepdim=True)
        return torch.where(footprint > 0, v, torch.full_like(v, float("nan"))), footprint
    # every channel finite <=> the channel sum of 0 * v is 0 (NaN otherwise): two passes instead of
    # isfinite's four plus a reduction
    ok = (torch.mul(vals, 0.0).sum(1, keepdim=True) == 0).logical_and_(inside)
    footprint = ok.to(vals.dtype)
    if vals.requires_grad or torch.compiler.is_compiling():
        return torch.where(ok, vals, torch.full_like(vals, float("nan"))), footprint
    return vals.masked_fill_(~ok, float("nan")), footprint  # the sampler's own new tensor


def _prepare(image: Tensor, mask: Optional[Tensor]) -> tuple[Tensor, bool]:
    """Stack ``[image with bad pixels zeroed, bad-pixel map]`` when a mask is given."""
    if mask is None:
        return image, False
    bad = mask | ~torch.isfinite(image)
    img0 = torch.where(bad, torch.zeros_like(image), image)
    return torch.cat([img0, bad.to(image.dtype)], dim=1), True


def _sample_variance(variance: Tensor, bad: Optional[Tensor], x: Tensor, y: Tensor, interpolation: str,
                     values: Tensor, det: Optional[Tensor] = None) -> Tensor:
    """Variance of the values :func:`sample_image` interpolates at ``x, y`` (B, n) from pixels of
    independent noise: ``sum_i w_i^2 var_i`` with the same kernel weights ``w_i`` (divided by the
    square of the good weight ``sum_good w_i`` where ``bad`` pixels were left out, times ``det^2``
    for flux conservation). NaN wherever ``values`` (B, C, n) is NaN."""
    b, c, h, w = variance.shape
    xc, yc = x.clamp(0, w - 1), y.clamp(0, h - 1)
    var = variance if bad is None else torch.where(bad, torch.zeros_like(variance), variance)
    v = _gather_sample(_pad_flat(var), xc, yc, w, interpolation, squared=True)
    if bad is not None:
        good = 1 - _gather_sample(_pad_flat(bad.to(variance.dtype)), xc, yc, w, interpolation)
        v = v / torch.where(good > 1e-6, good, torch.ones_like(good)).square()
    if det is not None:
        v = v * det.reshape(b, 1, -1).to(v.dtype).square()
    return torch.where(torch.isnan(values), values, v)


def sample_image(
    image: Tensor,
    x: Tensor,
    y: Tensor,
    interpolation: str = "bilinear",
    *,
    mask: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:
    """Sample ``image`` at source pixel positions ``x, y``.

    Args:
        image: ``(B, C, H, W)`` floating.
        x, y: ``(B, h, w)`` 0-based source pixel coordinates (x = column), any floating dtype
            (float64 keeps sub-1e-4 px precision on large frames); batch element b samples image b.
        interpolation: ``"nearest" | "bilinear" | "bicubic"`` (``grid_sample``, ``align_corners=True``;
            bicubic is cubic convolution with a = -0.75) or ``"lanczos3"`` (gather-based).
        mask: optional bool ``(B, C|1, H, W)``, True = bad; bad and non-finite pixels are then left
            out and the kernel renormalised (see the module docstring).

    Returns:
        ``(values, footprint)``: ``(B, C, h, w)`` values (NaN outside the frame or where nothing
        good was sampled) and ``(B, 1, h, w)`` footprint in [0, 1].
    """
    check_image(image, "image")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    b, c, h, w = image.shape
    if x.shape != y.shape or x.dim() != 3 or x.shape[0] != b:
        raise ValueError(f"x and y must both be shaped (B={b}, h, w), got {tuple(x.shape)} and {tuple(y.shape)}")
    mask = check_mask(mask, image, "mask")
    src, masked = _prepare(image, mask)
    inside = _inside(x, y, h, w).unsqueeze(1)
    xc = x.clamp(0, w - 1)
    yc = y.clamp(0, h - 1)
    if interpolation == "lanczos3":
        vals = _gather_sample(_pad_flat(src), xc.reshape(b, -1), yc.reshape(b, -1), w, interpolation)
        vals = vals.reshape(b, src.shape[1], *x.shape[1:])
    else:
        vals = _grid_sample(src, xc, yc, interpolation)
    return _finish(vals, inside, c, masked)


# ---------------------------------------------------------------------------------------------
# Coordinate mapping
# ---------------------------------------------------------------------------------------------


def _batch_len(wcs) -> int:
    try:
        return len(wcs)
    except TypeError:
        return 1


def _map_points(src_wcs, dst_wcs, x: Tensor, y: Tensor, batch: int) -> tuple[Tensor, Tensor]:
    """Target pixels ``x, y`` (1|B, N) -> source pixels (B, N) through the sky. Two single WCSs
    (one shared by the whole batch) map the points once; the result is expanded to the batch."""
    n = max(_batch_len(src_wcs), _batch_len(dst_wcs))
    if hasattr(dst_wcs, "pixel_to_pixel") and type(dst_wcs) is type(src_wcs):
        # TanWCS: tangent plane to tangent plane by a float64 rotation, no absolute (ra, dec).
        if x.shape[0] != n:
            x, y = x.expand(n, -1), y.expand(n, -1)
        sx, sy = dst_wcs.pixel_to_pixel(src_wcs, x, y)
        sx, sy = sx.reshape(n, -1), sy.reshape(n, -1)
    else:
        ra, dec = dst_wcs.pixel_to_world(x, y)
        ra, dec = ra.reshape(-1, ra.shape[-1]), dec.reshape(-1, dec.shape[-1])
        if ra.shape[0] != _batch_len(src_wcs) and ra.shape[0] == 1:
            ra, dec = ra.expand(_batch_len(src_wcs), -1), dec.expand(_batch_len(src_wcs), -1)
        sx, sy = src_wcs.world_to_pixel(ra, dec)
        sx, sy = sx.reshape(-1, sx.shape[-1]), sy.reshape(-1, sy.shape[-1])
    if sx.shape[0] != batch:
        sx, sy = sx.expand(batch, -1), sy.expand(batch, -1)
    return sx, sy


def _catmull_rom(t: Tensor) -> Tensor:
    """Catmull-Rom weights for taps -1, 0, 1, 2 at fraction ``t`` (..., 4); exact for quadratics."""
    t2, t3 = t * t, t * t * t
    return torch.stack(
        [(-t3 + 2 * t2 - t) * 0.5, (3 * t3 - 5 * t2 + 2) * 0.5, (-3 * t3 + 4 * t2 + t) * 0.5, (t3 - t2) * 0.5],
        dim=-1,
    )


def _cubic_weights(pos: Tensor, step: int, dtype) -> tuple[Tensor, Tensor]:
    """Node index (of tap -1, in an array whose node 0 sits at -step) and Catmull-Rom weights."""
    j = torch.div(pos, step, rounding_mode="floor")
    t = (pos - j * step).to(dtype) / step
    return j, _catmull_rom(t)


def _interp_axis(nodes: Tensor, j: Tensor, wts: Tensor, dim: int) -> Tensor:
    """``sum_k nodes[..., j + k, ...] * wts[:, k]`` along ``dim`` (Catmull-Rom between grid nodes)."""
    out = None
    shape = [1] * nodes.dim()
    shape[dim] = j.shape[0]
    for k in range(4):
        term = nodes.index_select(dim, j + k) * wts[:, k].reshape(shape)
        out = term if out is None else out + term
    return out


_COMPILED: dict = {}


def _compiled(fn):
    """``torch.compile(fn)`` once per process (fused C++/Triton loops; see ``Reproject(fused=True)``)."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _COMPILED[fn]


_MAX_GRID_ERROR = 1e-3  # px: a coarse-grid mapping above this (checked at the cell centres) is refined


class _Mapping:
    """Target-pixel -> source-pixel mapping, exact or interpolated from a coarse grid of nodes.

    The grid step is halved (down to 2 px) while the interpolation error at the centres of the
    cells exceeds ``_MAX_GRID_ERROR``: small, strongly distorted frames keep sub-1e-3 px accuracy.
    """

    def __init__(self, src_wcs, dst_wcs, shape_out, batch, *, grid_step, jacobian, device, dtype, fused=False):
        self.src, self.dst = src_wcs, dst_wcs
        self.h, self.w = shape_out
        self.batch = batch
        self.step = grid_step
        self.jacobian = jacobian
        self.device, self.dtype = device, dtype
        self.fused = fused
        if grid_step is not None:
            s = int(grid_step)
            if s < 1:
                raise ValueError(f"grid_step must be a positive int or None, got {grid_step!r}")
            nodes = self._nodes(s)
            while s > 2 and self._grid_error(nodes, s) > _MAX_GRID_ERROR:
                s //= 2  # a strongly distorted frame for this step: refine the grid
                nodes = self._nodes(s)
            self.step = s
            # interpolate along x once for every node row; along y per chunk of rows.
            jx, wx = _cubic_weights(torch.arange(self.w, device=device), s, dtype)
            self.rows = _interp_axis(nodes, jx, wx, dim=3)  # (B, k, ny, W)

    def _nodes(self, s: int) -> Tensor:
        """Exact mapping (and ``|det J|``) on the nodes every ``s`` px, one beyond each edge."""
        # a pixel at p uses nodes p // s .. p // s + 3 (node 0 sits at -s), the last row/column included
        ny = (self.h - 1) // s + 4
        nx = (self.w - 1) // s + 4
        gy = (torch.arange(ny, device=self.device, dtype=self.dtype) - 1) * s
        gx = (torch.arange(nx, device=self.device, dtype=self.dtype) - 1) * s
        yy, xx = torch.meshgrid(gy, gx, indexing="ij")
        xf, yf = xx.reshape(1, -1), yy.reshape(1, -1)
        chans = list(self._exact(xf, yf))
        if self.jacobian:
            chans.append(self._det(xf, yf))
        return torch.stack(chans, 1).reshape(self.batch, len(chans), ny, nx)

    def _grid_error(self, nodes: Tensor, s: int) -> float:
        """Largest interpolation error (px) at the pixels nearest the centres of the grid cells,
        where it peaks (one exact evaluation per cell; one host sync)."""
        ys = torch.arange(min(s // 2, self.h - 1), self.h, s, device=self.device)
        xs = torch.arange(min(s // 2, self.w - 1), self.w, s, device=self.device)
        jy, wy = _cubic_weights(ys, s, self.dtype)
        jx, wx = _cubic_weights(xs, s, self.dtype)
        interp = _interp_axis(_interp_axis(nodes[:, :2], jx, wx, 3), jy, wy, 2)  # (B, 2, ny, nx)
        yy, xx = torch.meshgrid(ys.to(self.dtype), xs.to(self.dtype), indexing="ij")
        ex, ey = self._exact(xx.reshape(1, -1), yy.reshape(1, -1))
        err = torch.hypot(interp[:, 0].reshape(self.batch, -1) - ex, interp[:, 1].reshape(self.batch, -1) - ey)
        return float(err.nan_to_num(0.0).max()) if err.numel() else 0.0

    def _exact(self, x, y):
        return _map_points(self.src, self.dst, x, y, self.batch)

    def _det(self, x, y, h: float = 0.5):
        """``|det d(src)/d(dst)|`` by central differences of the exact mapping (step ``h`` px)."""
        x1, y1 = self._exact(x + h, y)
        x0, y0 = self._exact(x - h, y)
        x3, y3 = self._exact(x, y + h)
        x2, y2 = self._exact(x, y - h)
        dxdx, dydx = (x1 - x0) / (2 * h), (y1 - y0) / (2 * h)
        dxdy, dydy = (x3 - x2) / (2 * h), (y3 - y2) / (2 * h)
        return (dxdx * dydy - dxdy * dydx).abs()

    def rows_map(self, rows: Tensor):
        """Source ``x, y`` (B, n, W) and ``|det J|`` (or None) for the target rows ``rows`` (n,)."""
        n = rows.shape[0]
        if self.step is None:
            ys = rows.to(self.dtype)
            xs = torch.arange(self.w, device=self.device, dtype=self.dtype)
            yy, xx = torch.meshgrid(ys, xs, indexing="ij")
            xf, yf = xx.reshape(1, -1), yy.reshape(1, -1)
            sx, sy = self._exact(xf, yf)
            det = self._det(xf, yf).reshape(self.batch, n, self.w) if self.jacobian else None
            return sx.reshape(self.batch, n, self.w), sy.reshape(self.batch, n, self.w), det
        j, wts = _cubic_weights(rows, self.step, self.dtype)
        interp = _compiled(_interp_axis) if self.fused else _interp_axis
        out = interp(self.rows, j, wts, 2)
        det = out[:, 2] if self.jacobian else None
        return out[:, 0], out[:, 1], det


def pixel_to_pixel(src_wcs, dst_wcs, shape_out, *, grid_step: Optional[int] = None, batch: Optional[int] = None,
                   device=None, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """Source pixel coordinates ``(x, y)``, each ``(B, H_out, W_out)``, of every target pixel.

    ``grid_step`` as in :class:`Reproject` (``None`` = exact for every pixel).
    """
    h, w = as_pair(shape_out, "shape_out")
    b = batch if batch is not None else max(_batch_len(src_wcs), _batch_len(dst_wcs))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    m = _Mapping(src_wcs, dst_wcs, (h, w), b, grid_step=grid_step, jacobian=False, device=dev, dtype=dtype)
    x, y, _ = m.rows_map(torch.arange(h, device=dev))
    return x, y


class ReprojectResult(NamedTuple):
    """Output of :class:`Reproject`.

    Attributes:
        image: ``(B, C, H_out, W_out)`` resampled frames, NaN where the footprint is 0.
        footprint: ``(B, 1, H_out, W_out)`` in [0, 1]: 1 where the target pixel is fully covered by
            good input pixels, 0 outside the frame (see the module docstring for masks).
        variance: ``(B, C, H_out, W_out)`` variance of ``image`` propagated through the interpolation
            weights (``sum_i w_i^2 var_i``) when a ``variance`` map was given, else None.
    """

    image: Tensor
    footprint: Tensor
    variance: Optional[Tensor] = None

    @property
    def mask(self) -> Tensor:
        """Bool ``(B, 1, H_out, W_out)``: True where the output is not fully supported by good pixels."""
        return self.footprint < 1 - 1e-6


def _check_reproject_args(image, mask, src_wcs, dst_wcs, interpolation, variance):
    """:func:`reproject`'s argument checks (each error names the argument); returns the checked mask."""
    check_image(image, "image")
    check_float_dtype(image, "image")  # half precision: 44% of pixels off by > 100 ADU, silently
    check_batch_nonempty(image, "image")
    check_wcs(src_wcs, "src_wcs")
    check_wcs(dst_wcs, "dst_wcs")
    mask = check_mask(mask, image, "mask")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    if variance is not None and (not isinstance(variance, Tensor) or variance.dim() != 4
                                 or variance.shape[0] != image.shape[0] or variance.shape[1] > image.shape[1]
                                 or variance.shape[2:] != image.shape[2:]):
        raise ValueError(f"variance must be a tensor shaped like image {tuple(image.shape)} (or its first "
                         f"channels), got {tuple(variance.shape) if isinstance(variance, Tensor) else type(variance).__name__}")
    b = image.shape[0]
    for name, wcs in (("src_wcs", src_wcs), ("dst_wcs", dst_wcs)):
        if _batch_len(wcs) not in (1, b):
            raise ValueError(f"{name} holds {_batch_len(wcs)} WCS for a batch of {b} images (need 1 or {b})")
    return mask


@adapt_to_load
def reproject(
    image: Tensor,
    src_wcs,
    dst_wcs,
    shape_out,
    mask: Optional[Tensor] = None,
    *,
    interpolation: str = "bilinear",
    conserve_flux: bool = False,
    chunk_rows: Optional[int] = None,
    grid_step: Optional[int] = 32,
    fused: bool = False,
    coord_dtype: torch.dtype = torch.float64,
    variance: Optional[Tensor] = None,
) -> ReprojectResult:
    """Resample ``image`` (one WCS per batch element) onto the grid of ``dst_wcs``.

    Args:
        image: ``(B, C, H, W)`` float32/float64 frames (half precision is refused: convert it);
            ``src_wcs`` holds B WCSs (or one shared by the batch).
        src_wcs, dst_wcs: objects with ``pixel_to_world(x, y)`` / ``world_to_pixel(ra, dec)`` on
            ``(B, N)`` tensors of 0-based pixels and degrees (:class:`~astroprep_torch.wcs.TanWCS`).
            ``dst_wcs`` holds one WCS (or B, one per frame).
        shape_out: ``(H_out, W_out)`` of the target grid.
        mask: optional bool mask, True = bad, broadcastable to ``image``.
        interpolation: ``"nearest" | "bilinear" | "bicubic" | "lanczos3"``.
        conserve_flux: multiply by ``|det J|`` (source pixels per target pixel) to keep total flux.
        chunk_rows: target rows per chunk (``None``: about 2**20 pixels per chunk).
        grid_step: evaluate the WCS mapping every ``grid_step`` pixels and interpolate (Catmull-Rom)
            in between (default 32, the pipeline's: the fast path, exact for quadratic distortion
            and measured below 1e-4 px on TAN-SIP frames); ``None`` evaluates it exactly at every
            pixel (several times slower).
        fused: run the per-chunk kernels (coordinate interpolation, gather-based sampling) through
            ``torch.compile`` so each becomes one fused loop (for Lanczos3 much faster on CPU:
            ``experiments/results/align_speed.md``);
            the first call pays the compilation (cached on disk).
        coord_dtype: dtype of the coordinate computation (float64 recommended).
        variance: optional ``(B, C, H, W)`` variance of ``image`` (pixels with independent noise;
            ``(B, C' < C, H, W)``: of its first ``C'`` channels).
            It is propagated through the same kernel as the image, with squared weights:
            ``var_out = sum_i w_i^2 var_i`` (renormalised as the image where masked pixels were left
            out, times ``|det J|^2`` with ``conserve_flux``). Resampling a variance (or rms) map as
            an image instead overstates the noise of the interpolated pixels (bilinear at a
            half-pixel shift: 4x in variance); the output noise is then correlated between
            neighbouring pixels, which a convolution of the result must account for.

    Returns:
        :class:`ReprojectResult` ``(image, footprint, variance)``.
    """
    mask = _check_reproject_args(image, mask, src_wcs, dst_wcs, interpolation, variance)
    h_out, w_out = as_pair(shape_out, "shape_out")
    b, c, h, w = image.shape
    if chunk_rows is None:
        chunk_rows = max(1, (1 << 20) // max(w_out, 1))
    chunk_rows = min(int(chunk_rows), h_out)
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows}")
    mapping = _Mapping(src_wcs, dst_wcs, (h_out, w_out), b, grid_step=grid_step, jacobian=conserve_flux,
                       device=image.device, dtype=coord_dtype, fused=fused)
    out = image.new_empty((b, c, h_out, w_out))
    footprint = image.new_empty((b, 1, h_out, w_out))
    if not fused and mapping.step is not None and not conserve_flux and interpolation != "lanczos3":
        _reproject_grid_sample(image, mask, mapping, h, w, interpolation, chunk_rows, out, footprint)
        return ReprojectResult(out, footprint, _reproject_variance(variance, image, mask, mapping, interpolation,
                                                                   chunk_rows, out))
    if fused:
        src, masked = _prepare(image, mask)
        flat = _pad_flat(src)
        sampler = _compiled(_sample_chunk)
        fused_chunk = _compiled(_reproject_chunk)
    for r0 in range(0, h_out, chunk_rows):
        r1 = min(h_out, r0 + chunk_rows)
        if fused:  # constant chunk shape (last chunk padded by repeating the last row): one compilation
            rows = torch.arange(r0, r0 + chunk_rows, device=image.device).clamp_(max=h_out - 1)
            if mapping.step is not None:
                j, wts = _cubic_weights(rows, mapping.step, coord_dtype)
                vals, fp = fused_chunk(mapping.rows, j, wts, flat, h, w, interpolation, c, masked, conserve_flux)
            else:
                sx, sy, det = mapping.rows_map(rows)
                vals, fp = sampler(flat, sx.reshape(b, -1), sy.reshape(b, -1), h, w, interpolation, c, masked)
                if conserve_flux:
                    vals = vals * det.reshape(b, 1, -1).to(vals.dtype)
            vals = vals.reshape(b, c, chunk_rows, w_out)[:, :, : r1 - r0]
            fp = fp.reshape(b, 1, chunk_rows, w_out)[:, :, : r1 - r0]
        else:
            sx, sy, det = mapping.rows_map(torch.arange(r0, r1, device=image.device))
            vals, fp = sample_image(image, sx, sy, interpolation, mask=mask)
            if conserve_flux:
                vals = vals * det.unsqueeze(1).to(vals.dtype)
        out[:, :, r0:r1] = vals
        footprint[:, :, r0:r1] = fp
    return ReprojectResult(out, footprint, _reproject_variance(variance, image, mask, mapping, interpolation,
                                                               chunk_rows, out))


def _reproject_variance(variance: Optional[Tensor], image: Tensor, mask: Optional[Tensor], mapping: "_Mapping",
                        interpolation: str, chunk_rows: int, out: Tensor) -> Optional[Tensor]:
    """The variance of :func:`reproject`'s ``out``: :func:`_sample_variance` chunk by chunk."""
    if variance is None:
        return None
    b, c = variance.shape[:2]  # the variance of the first c channels of the image
    h_out, w_out = out.shape[-2:]
    bad = None if mask is None else (mask | ~torch.isfinite(image)).expand_as(image)[:, :c]
    res = variance.new_empty((b, c, h_out, w_out))
    for r0 in range(0, h_out, chunk_rows):
        r1 = min(h_out, r0 + chunk_rows)
        sx, sy, det = mapping.rows_map(torch.arange(r0, r1, device=image.device))
        vals = out[:, :c, r0:r1].reshape(b, c, -1)  # the variance covers the first c channels only
        v = _sample_variance(variance, bad, sx.reshape(b, -1), sy.reshape(b, -1), interpolation, vals, det)
        res[:, :, r0:r1] = v.reshape(b, c, r1 - r0, w_out)
    return res


def _reproject_grid_sample(image: Tensor, mask: Optional[Tensor], mapping: "_Mapping", h: int, w: int,
                           interpolation: str, chunk_rows: int, out: Tensor, footprint: Tensor) -> None:
    """Eager ``grid_sample`` path of :func:`reproject` on an interpolated mapping (fills ``out``).

    Same result as mapping every row to pixel coordinates and calling :func:`sample_image`, with
    fewer passes over memory: the coarse-grid node rows are normalised to ``grid_sample``'s [-1, 1]
    units once (float64), each chunk's rows come from one banded matrix product of the Catmull-Rom
    weights with the few node rows it needs (float64, straight into the interleaved (x, y) layout
    ``grid_sample`` reads), cast once to the image dtype (the precision ``grid_sample`` works at);
    the inside test uses the float64 coordinates, clamping to the frame the cast grid.
    """
    b, c = image.shape[:2]
    h_out, w_out = out.shape[-2:]
    src, masked = _prepare(image, mask)
    nodes = mapping.rows  # (B, k, ny, W_out) float64 source pixel coordinates on node rows
    sx = 2.0 / (w - 1) if w > 1 else 0.0
    sy = 2.0 / (h - 1) if h > 1 else 0.0
    gnodes = torch.stack([nodes[:, 0] * sx - 1.0 if w > 1 else torch.zeros_like(nodes[:, 0]),
                          nodes[:, 1] * sy - 1.0 if h > 1 else torch.zeros_like(nodes[:, 1])], dim=-1)
    gnodes = gnodes.reshape(b, gnodes.shape[1], w_out * 2)
    # inside the frame: -0.5 <= x <= w - 0.5, in normalised units (|g| <= 1 + 1 / (n - 1))
    # (x, y) limits interleaved along a row as the grid is: a contiguous broadcast, not one over pairs
    lim = torch.tensor([1.0 + sx / 2, 1.0 + sy / 2], dtype=gnodes.dtype, device=image.device).repeat(w_out)
    buf64 = gnodes.new_empty(b, chunk_rows, w_out * 2)  # reused: no fresh pages per chunk
    track = gnodes.requires_grad and torch.is_grad_enabled()
    buf = image.new_empty(b, chunk_rows, w_out, 2)
    bbuf = torch.empty(b, chunk_rows, w_out, 2, dtype=torch.bool, device=image.device)
    for r0 in range(0, h_out, chunk_rows):
        r1 = min(h_out, r0 + chunk_rows)
        # rows between the same four node rows share them: one small (rows x 4) @ (4 x 2W) product
        # per node interval (a dense band product would do (rows x ~20) @ (~20 x 2W): 5x the work)
        _, wts = _cubic_weights(torch.arange(r0, r1, device=image.device), mapping.step, gnodes.dtype)
        grid64 = buf64[:, : r1 - r0]
        step = mapping.step
        a = 0
        while a < r1 - r0:
            ja = (r0 + a) // step  # node index of tap -1 (node 0 sits at -step), as _cubic_weights
            e = min(r1 - r0, (ja + 1) * step - r0)
            if track:
                grid64[:, a:e] = torch.matmul(wts[a:e], gnodes[:, ja:ja + 4])
            else:  # straight into the buffer
                torch.matmul(wts[a:e], gnodes[:, ja:ja + 4], out=grid64[:, a:e])
            a = e
        grid = buf[:, : r1 - r0]
        grid.view(b, r1 - r0, w_out * 2).copy_(grid64)
        # the inside test on the float64 coordinates (the float32 grid rounds to ~1e-4 px at 4096 px);
        # grid64 is scratch once copied: |g| in place, and the (x ok, y ok) bool pairs, adjacent in
        # memory, read as one int16 (both true <=> 0x0101) instead of an all(-1) reduction
        ok2 = torch.le(grid64.abs_(), lim, out=bbuf[:, : r1 - r0].view(b, r1 - r0, w_out * 2))
        inside = (ok2.view(torch.int16) == 0x0101).view(b, 1, r1 - r0, w_out) if ok2.is_contiguous() \
            else ok2.view(b, r1 - r0, w_out, 2).all(-1).unsqueeze(1)
        grid.clamp_(-1.0, 1.0)
        vals = F.grid_sample(src, grid, mode=interpolation, padding_mode="border", align_corners=True)
        v, fp = _finish(vals, inside, c, masked)
        out[:, :, r0:r1] = v
        footprint[:, :, r0:r1] = fp


class Reproject(nn.Module):
    """Reproject a batch of frames, each with its own WCS, onto one target WCS grid.

    ``Reproject(shape_out, interpolation="bilinear", conserve_flux=False, chunk_rows=None,
    grid_step=32, fused=False)`` (``grid_step=None``: the exact, slower per-pixel mapping);
    ``forward(image, src_wcs, dst_wcs, mask=None, variance=None) -> ReprojectResult``.
    See :func:`reproject` for the arguments and the module docstring for conventions.
    """

    def __init__(self, shape_out, interpolation: str = "bilinear", conserve_flux: bool = False,
                 chunk_rows: Optional[int] = None, grid_step: Optional[int] = 32, fused: bool = False):
        super().__init__()
        self.shape_out = as_pair(shape_out, "shape_out")
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        if grid_step is not None and int(grid_step) < 1:
            raise ValueError(f"grid_step must be a positive int or None, got {grid_step!r}")
        self.interpolation = interpolation
        self.conserve_flux = bool(conserve_flux)
        self.chunk_rows = chunk_rows
        self.grid_step = grid_step
        self.fused = bool(fused)

    def forward(self, image: Tensor, src_wcs, dst_wcs, mask: Optional[Tensor] = None,
                variance: Optional[Tensor] = None) -> ReprojectResult:
        return reproject(image, src_wcs, dst_wcs, self.shape_out, mask, interpolation=self.interpolation,
                         conserve_flux=self.conserve_flux, chunk_rows=self.chunk_rows, grid_step=self.grid_step,
                         fused=self.fused, variance=variance)

    def extra_repr(self) -> str:
        return (f"shape_out={self.shape_out}, interpolation={self.interpolation!r}, "
                f"conserve_flux={self.conserve_flux}, chunk_rows={self.chunk_rows}, grid_step={self.grid_step}, "
                f"fused={self.fused}")


# ---------------------------------------------------------------------------------------------
# Affine transforms (2x3 matrices acting on 0-based pixel coordinates)
# ---------------------------------------------------------------------------------------------


def apply_transform(matrix: Tensor, xy: Tensor) -> Tensor:
    """Apply ``matrix`` (..., 2, 3) to points ``xy`` (..., N, 2): ``xy @ M[:, :2].T + M[:, 2]``."""
    return xy @ matrix[..., :2].transpose(-1, -2) + matrix[..., 2].unsqueeze(-2)


def transform_scale_rotation(matrix: Tensor) -> tuple[float, float]:
    """Mean scale ``sqrt|det A|`` and rotation (degrees, in (-180, 180]) of a (2, 3) transform."""
    a = matrix[..., :2].double()
    scale = float(torch.linalg.det(a).abs().sqrt())
    rot = math.degrees(math.atan2(float(a[1, 0] - a[0, 1]), float(a[0, 0] + a[1, 1])))
    return scale, rot


def invert_transform(matrix: Tensor) -> Tensor:
    """Inverse of a (..., 2, 3) affine transform.

    The 2x2 inverse in closed form (adjugate / determinant): no LAPACK call, whose batched LU on the
    strided ``[..., :2]`` view failed for batches of 2 on some MKL builds (DLASWP parameter error)."""
    a, b, c, d = matrix[..., 0, 0], matrix[..., 0, 1], matrix[..., 1, 0], matrix[..., 1, 1]
    det = a * d - b * c
    ainv = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], -2) / det[..., None, None]
    t = -(ainv @ matrix[..., 2:])
    return torch.cat([ainv, t], dim=-1)


def fit_transform(src: Tensor, dst: Tensor, kind: str = "similarity", weights: Optional[Tensor] = None) -> Tensor:
    """Least-squares transform mapping ``src`` onto ``dst``; points (..., N, 2), returns (..., 2, 3).

    ``kind="similarity"``: rotation, uniform scale and shift (no reflection), the closed-form
    complex-number solution ``z_dst = a z_src + b``; ``kind="affine"``: full 6-parameter fit.
    ``weights`` (..., N) are optional non-negative weights. Batched over leading dimensions.
    """
    if weights is None:
        weights = torch.ones(src.shape[:-1], dtype=src.dtype, device=src.device)
    wsum = weights.sum(-1, keepdim=True).clamp_min(1e-300)
    ms = (src * weights.unsqueeze(-1)).sum(-2) / wsum
    md = (dst * weights.unsqueeze(-1)).sum(-2) / wsum
    s = src - ms.unsqueeze(-2)
    d = dst - md.unsqueeze(-2)
    if kind == "similarity":
        # a = sum w (d * conj(s)) / sum w |s|^2 with z = x + i y
        den = (weights * (s * s).sum(-1)).sum(-1).clamp_min(1e-300)
        re = (weights * (d[..., 0] * s[..., 0] + d[..., 1] * s[..., 1])).sum(-1) / den
        im = (weights * (d[..., 1] * s[..., 0] - d[..., 0] * s[..., 1])).sum(-1) / den
        a = torch.stack([torch.stack([re, -im], -1), torch.stack([im, re], -1)], -2)
    elif kind == "affine":
        sw = s * weights.unsqueeze(-1)
        sts = sw.transpose(-1, -2) @ s  # (..., 2, 2)
        std = sw.transpose(-1, -2) @ d
        a = torch.linalg.solve(sts, std).transpose(-1, -2)
    else:
        raise ValueError(f"kind must be 'similarity' or 'affine', got {kind!r}")
    t = md - (a @ ms.unsqueeze(-1)).squeeze(-1)
    return torch.cat([a, t.unsqueeze(-1)], dim=-1)


# ---------------------------------------------------------------------------------------------
# Asterism matching (astroalign's algorithm, in torch)
# ---------------------------------------------------------------------------------------------


class MatchResult(NamedTuple):
    """Output of :func:`match_sources`.

    Attributes:
        matrix: ``(2, 3)`` transform mapping source-list pixels onto destination-list pixels.
        pairs: ``(K, 2)`` long, ``pairs[k] = (i_src, i_dst)`` for every inlier pair.
        n_inliers: 0-d long tensor, ``K``.
        rms: 0-d tensor, RMS distance (px) of the inlier pairs after the transform.
    """

    matrix: Tensor
    pairs: Tensor
    n_inliers: Tensor
    rms: Tensor


def _triangles(xy: Tensor, k: int) -> Tensor:
    """All triangles (T, 3) among each point and its ``k - 1`` nearest neighbours, de-duplicated."""
    n = xy.shape[0]
    k = min(k, n)
    d = torch.cdist(xy, xy)
    nn_idx = d.topk(k, dim=1, largest=False).indices  # (n, k), includes the point itself
    combos = torch.combinations(torch.arange(k, device=xy.device), 3)  # (C, 3)
    tri = nn_idx[:, combos].reshape(-1, 3)
    tri = tri.sort(dim=1).values
    tri = torch.unique(tri, dim=0)
    ok = (tri[:, 0] != tri[:, 1]) & (tri[:, 1] != tri[:, 2])
    return tri[ok]


def _invariants(xy: Tensor, tri: Tensor) -> tuple[Tensor, Tensor]:
    """astroalign's triangle invariants ``(L2/L1, L1/L0)`` (sides sorted, L2 longest) and the
    triangle's vertices in a canonical order (by increasing length of the opposite side)."""
    p = xy[tri]  # (T, 3, 2)
    opp = torch.stack([(p[:, 1] - p[:, 2]).norm(dim=-1), (p[:, 2] - p[:, 0]).norm(dim=-1),
                       (p[:, 0] - p[:, 1]).norm(dim=-1)], dim=1)  # side opposite each vertex
    sides, order = opp.sort(dim=1)
    inv = torch.stack([sides[:, 2] / sides[:, 1].clamp_min(1e-12), sides[:, 1] / sides[:, 0].clamp_min(1e-12)], 1)
    return inv, tri.gather(1, order)


def _brightest(xy: Tensor, flux: Optional[Tensor], n: int) -> Tensor:
    """Indices of the ``n`` brightest points; without fluxes the ``n`` most isolated ones (largest
    nearest-neighbour distance, ties by position): a choice that does not depend on the order of
    the list and that a similarity transform (rotation, scale, shift) leaves unchanged."""
    if xy.shape[0] <= n:
        return torch.arange(xy.shape[0], device=xy.device)
    if flux is not None:
        return flux.topk(n).indices
    d = torch.cdist(xy, xy)
    d.fill_diagonal_(float("inf"))
    nn_dist = d.amin(1)
    order = torch.argsort(xy[:, 1], stable=True)
    order = order[torch.argsort(xy[order, 0], stable=True)]  # ties broken by position, not list order
    return order[torch.argsort(nn_dist[order], descending=True, stable=True)[:n]]


def _nearest(a: Tensor, b: Tensor, chunk: int = 4096) -> tuple[Tensor, Tensor]:
    """Nearest neighbour in ``b`` of each point of ``a``: (distance, index); chunked cdist."""
    ds, idx = [], []
    for i in range(0, a.shape[0], chunk):
        d = torch.cdist(a[i:i + chunk], b, compute_mode="use_mm_for_euclid_dist")
        m = d.min(dim=1)
        ds.append(m.values)
        idx.append(m.indices)
    return torch.cat(ds), torch.cat(idx)


def _mutual_pairs(src_t: Tensor, dst: Tensor, tol: float) -> Tensor:
    """(K, 2) pairs (i_src, i_dst) of mutual nearest neighbours closer than ``tol``."""
    d, j = _nearest(src_t, dst)
    i = torch.arange(src_t.shape[0], device=src_t.device)
    keep = d < tol
    i, j, d = i[keep], j[keep], d[keep]
    # one source per destination star: keep the closest (sort by distance, first occurrence wins)
    order = d.argsort()
    i, j = i[order], j[order]
    first = torch.ones_like(j, dtype=torch.bool)
    sj, perm = j.sort(stable=True)
    dup = torch.zeros_like(first)
    dup[1:] = sj[1:] == sj[:-1]
    first[perm[dup]] = False
    return torch.stack([i[first], j[first]], 1)


def _check_match_args(src_xy, dst_xy, transform: str, min_matches: int, weighting: str,
                      min_inlier_fraction: float) -> None:
    """Argument checks of :func:`match_sources` (``AlignmentError`` for fewer than 3 points)."""
    for name, a in (("src_xy", src_xy), ("dst_xy", dst_xy)):
        if not isinstance(a, Tensor) or a.dim() != 2 or a.shape[1] != 2 or not a.is_floating_point():
            raise ValueError(f"{name} must be a floating tensor shaped (N, 2), got "
                             f"{tuple(a.shape) if isinstance(a, Tensor) else type(a).__name__}")
    if transform not in ("similarity", "affine"):
        raise ValueError(f"transform must be 'similarity' or 'affine', got {transform!r}")
    if min_matches < 3:
        raise ValueError(f"min_matches must be >= 3, got {min_matches}")
    if weighting not in ("none", "flux"):
        raise ValueError(f"weighting must be 'none' or 'flux', got {weighting!r}")
    if not 0 <= min_inlier_fraction <= 1:
        raise ValueError(f"min_inlier_fraction must be in [0, 1], got {min_inlier_fraction!r}")
    if src_xy.shape[0] < 3 or dst_xy.shape[0] < 3:
        raise AlignmentError(f"need at least 3 sources in each list to match, got {src_xy.shape[0]} and "
                             f"{dst_xy.shape[0]}")


def match_sources(
    src_xy: Tensor,
    dst_xy: Tensor,
    *,
    src_flux: Optional[Tensor] = None,
    dst_flux: Optional[Tensor] = None,
    transform: str = "similarity",
    max_control_points: int = 50,
    n_neighbors: int = 5,
    invariant_tol: float = 0.1,
    pixel_tol: float = 2.0,
    min_matches: int = 3,
    max_hypotheses: int = 4000,
    max_refine_points: int = 600,
    retries: Sequence[int] = (150,),
    weighting: str = "none",
    min_inlier_fraction: float = 0.1,
) -> MatchResult:
    """Find the transform mapping the source list ``src_xy`` onto ``dst_xy`` (astroalign's method).

    1. Control points: the ``max_control_points`` brightest sources of each list (``*_flux`` given)
       or the first ones (astroalign's ``MAX_CONTROL_POINTS = 50``).
    2. Asterisms: every triangle among each control point and its ``n_neighbors - 1`` nearest
       neighbours, described by the similarity invariants ``(L2/L1, L1/L0)`` of its sorted sides.
    3. Triangles whose invariants are closer than ``invariant_tol`` are candidate matches (a dense
       ``cdist`` on invariants, no KD-tree); each gives a similarity from its 3 vertex pairs.
    4. RANSAC without randomness: every hypothesis (up to ``max_hypotheses``, closest invariants
       first) is scored at once by the number of source control points that land within
       ``pixel_tol`` of a destination control point; the best one seeds
    5. weighted least squares on all sources (the ``max_refine_points`` brightest): nearest
       neighbours within ``pixel_tol`` (one source per destination star), refit, then 3-sigma
       clipping of the residuals and a final fit. With fluxes, pairs are weighted by
       ``1 / (1/f_src^2 + 1/f_dst^2)`` when ``weighting="flux"`` (background-limited centroid
       variance, for peak heights from images; capped at the 80th percentile), else equally
       (``"none"``, astroalign's choice, right when all positions are equally precise). The
       3-sigma clipping is skipped below 20 pairs.

    If that fails, it is retried with each number of control points in ``retries`` (more control
    points find overlaps between frames shifted by a large fraction of their size).

    Without fluxes the control points are the most isolated points of each list (largest
    nearest-neighbour distance): the same whatever the order of the list, and the same stars in
    both lists up to the outliers. A transform is returned only when at least
    ``min_inlier_fraction`` of the shorter list (of the points used in the final fit) supports
    it: a few chance pairs among many points are an error, not an answer.

    Args:
        src_xy, dst_xy: ``(N, 2)`` and ``(M, 2)`` 0-based pixel positions ``(x, y)``.
        src_flux, dst_flux: optional ``(N,)`` / ``(M,)`` brightness used to pick control points.
        transform: ``"similarity"`` (astroalign's) or ``"affine"`` (matching with similarity
            invariants, final least squares with 6 parameters).

    Returns:
        :class:`MatchResult` ``(matrix, pairs, n_inliers, rms)``; ``matrix`` maps src onto dst.

    Raises:
        AlignmentError: fewer than ``min_matches`` (>= 3) consistent pairs, fewer than
            ``min_inlier_fraction`` of the shorter list, or a fit whose inliers do not agree (RMS
            above ``pixel_tol / 2``); the message says what was found.

    The matching itself is combinatorial and runs eagerly (data-dependent sizes); all heavy steps
    are batched tensor operations.
    """
    _check_match_args(src_xy, dst_xy, transform, min_matches, weighting, min_inlier_fraction)
    dtype = torch.float64
    src = src_xy.detach().to(dtype)
    dst = dst_xy.detach().to(dtype)
    sflux = src_flux.detach().to(dtype) if src_flux is not None else None
    dflux = dst_flux.detach().to(dtype) if dst_flux is not None else None
    last_err = None
    for ncp in (max_control_points,) + tuple(r for r in retries if r > max_control_points):
        try:
            res = _match_once(src, dst, sflux, dflux, transform, ncp, n_neighbors, invariant_tol, pixel_tol,
                              min_matches, max_hypotheses, max_refine_points, weighting == "flux",
                              min_inlier_fraction)
            return MatchResult(res.matrix.to(src_xy.dtype), res.pairs, res.n_inliers, res.rms.to(src_xy.dtype))
        except AlignmentError as err:
            last_err = err
        if ncp >= min(src.shape[0], dst.shape[0]):
            break
    raise last_err


def _asterism_transform(cs: Tensor, cd: Tensor, n_neighbors: int, invariant_tol: float, max_hypotheses: int,
                        pixel_tol: float, min_matches: int) -> Tensor:
    """The (2, 3) similarity of the best asterism hypothesis between the control points ``cs`` and
    ``cd`` (steps 2-4 of :func:`match_sources`); ``AlignmentError`` when none matches ``min_matches``."""
    tri_s = _triangles(cs, n_neighbors)
    tri_d = _triangles(cd, n_neighbors)
    if tri_s.shape[0] == 0 or tri_d.shape[0] == 0:
        raise AlignmentError("not enough sources to form triangles")
    inv_s, ord_s = _invariants(cs, tri_s)
    inv_d, ord_d = _invariants(cd, tri_d)
    dist = torch.cdist(inv_s, inv_d)
    cand = (dist < invariant_tol).nonzero()
    if cand.shape[0] == 0:
        raise AlignmentError("no matching triangles between the two source lists (fewer than 3 matches)")
    if cand.shape[0] > max_hypotheses:
        best = dist[cand[:, 0], cand[:, 1]].topk(max_hypotheses, largest=False).indices
        cand = cand[best]
    ps = cs[ord_s[cand[:, 0]]]  # (H, 3, 2)
    pd = cd[ord_d[cand[:, 1]]]
    hyp = fit_transform(ps, pd, "similarity")  # (H, 2, 3)
    # score: source control points landing within pixel_tol of a destination control point
    # hypotheses are scored in chunks, closest invariants first; stop early once one explains a
    # quarter of the control points (astroalign also stops at its first acceptable model).
    order = dist[cand[:, 0], cand[:, 1]].argsort()
    hyp = hyp[order]
    enough = max(min_matches, int(0.25 * min(cs.shape[0], cd.shape[0])))
    best_score, matrix = -1, None
    for i in range(0, hyp.shape[0], 256):
        moved = apply_transform(hyp[i:i + 256], cs.unsqueeze(0))  # (h, n, 2)
        # (h, n, m) distances by matrix products (float64): ~20x fewer passes than differences
        d = torch.cdist(moved, cd.unsqueeze(0).expand(moved.shape[0], -1, -1), compute_mode="use_mm_for_euclid_dist")
        score = (d.amin(-1) < pixel_tol).sum(-1)
        k = int(score.argmax())
        if int(score[k]) > best_score:
            best_score, matrix = int(score[k]), hyp[i + k]
        if best_score >= enough:
            break
    if best_score < min_matches:
        raise AlignmentError(f"best asterism hypothesis matches only {best_score} control points (< {min_matches})")
    return matrix


def _refit_on_pairs(matrix: Tensor, rs: Tensor, rd: Tensor, fs: Optional[Tensor], fd: Optional[Tensor],
                    pixel_tol: float, min_matches: int, transform: str, flux_weights: bool) -> tuple[Tensor, Tensor]:
    """Step 5 of :func:`match_sources`: three rounds of mutual nearest pairs within ``pixel_tol`` and
    a (weighted) least-squares refit, the last with a 3-sigma clip. Returns ``(matrix, pairs)``."""
    pairs = None
    wts = None
    for it in range(3):
        pairs = _mutual_pairs(apply_transform(matrix, rs), rd, pixel_tol)
        if pairs.shape[0] < min_matches:
            break
        a, b = rs[pairs[:, 0]], rd[pairs[:, 1]]
        if flux_weights and fs is not None and fd is not None:
            # background-limited centroid variance ~ 1 / peak^2 in each list: weight each pair by
            # 1 / (1/f_src^2 + 1/f_dst^2), capped at its 80th percentile (bright/saturated stars are
            # limited by systematics, not photon noise)
            wts = 1.0 / (fs[pairs[:, 0]].pow(-2) + fd[pairs[:, 1]].pow(-2))
            wts = wts.clamp_max(wts.quantile(0.8)) if wts.numel() > 1 else wts
            wts = wts / wts.max()
        if it == 2 and pairs.shape[0] >= 20:  # 3-sigma clip of the (weighted) residuals, final fit
            r = (apply_transform(matrix, a) - b).norm(dim=-1)
            chi = r * wts.sqrt() if wts is not None else r
            sig = MAD_TO_STD * chi.median() * 1.5 + 1e-9
            keep = chi < 3 * sig
            if int(keep.sum()) >= min_matches:
                pairs, a, b = pairs[keep], a[keep], b[keep]
                wts = wts[keep] if wts is not None else None
        matrix = fit_transform(a, b, transform if pairs.shape[0] >= 3 else "similarity", weights=wts)
    return matrix, pairs


def _match_once(src, dst, sflux, dflux, transform, ncp, n_neighbors, invariant_tol, pixel_tol, min_matches,
                max_hypotheses, max_refine_points, flux_weights, min_fraction=0.0) -> MatchResult:
    cs = src[_brightest(src, sflux, ncp)]
    cd = dst[_brightest(dst, dflux, ncp)]
    matrix = _asterism_transform(cs, cd, n_neighbors, invariant_tol, max_hypotheses, pixel_tol, min_matches)
    rs_idx = _brightest(src, sflux, max_refine_points)
    rd_idx = _brightest(dst, dflux, max_refine_points * 2)
    rs, rd = src[rs_idx], dst[rd_idx]
    fs = sflux[rs_idx].clamp_min(1e-30) if sflux is not None else None
    fd = dflux[rd_idx].clamp_min(1e-30) if dflux is not None else None
    matrix, pairs = _refit_on_pairs(matrix, rs, rd, fs, fd, pixel_tol, min_matches, transform, flux_weights)
    n = pairs.shape[0]
    if n < min_matches:
        raise AlignmentError(f"only {n} consistent star pairs found (< {min_matches}); cannot align")
    a, b = rs[pairs[:, 0]], rd[pairs[:, 1]]
    rms = (apply_transform(matrix, a) - b).pow(2).sum(-1).mean().sqrt()
    if not bool(torch.isfinite(matrix).all()) or float(rms) > pixel_tol / 2:
        raise AlignmentError(f"inconsistent fit: RMS {float(rms):.3g} px over {n} pairs (> {pixel_tol / 2} px)")
    n_short = min(rs.shape[0], rd.shape[0])
    if n < min_fraction * n_short:
        scale, rot = transform_scale_rotation(matrix)
        raise AlignmentError(f"only {n} of {n_short} sources ({100 * n / n_short:.1f}% < {100 * min_fraction:.0f}%) "
                             f"support the best transform (scale {scale:.3f}, rotation {rot:.1f} deg, RMS "
                             f"{float(rms):.3g} px): no reliable match; are the frames of the same field?")
    pairs = torch.stack([rs_idx[pairs[:, 0]], rd_idx[pairs[:, 1]]], 1)
    return MatchResult(matrix, pairs, torch.tensor(n, device=src.device), rms)


# ---------------------------------------------------------------------------------------------
# Peak finding and registration
# ---------------------------------------------------------------------------------------------


class Peaks(NamedTuple):
    """Local maxima found by :func:`find_peaks` (flat catalog, torchvision ROI style).

    Attributes: ``x``, ``y`` (K,) sub-pixel 0-based positions; ``flux`` (K,) peak height of the
    smoothed, background-subtracted image (a brightness proxy); ``batch_index`` (K,) long.
    """

    x: Tensor
    y: Tensor
    flux: Tensor
    batch_index: Tensor


def _gaussian_1d(sigma: float, dtype, device) -> Tensor:
    r = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-r, r + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def _smooth(image: Tensor, kernel: Tensor) -> Tensor:
    """Separable smoothing by shifted adds (faster than 1-channel conv2d on CPU), zero padding."""
    r = kernel.numel() // 2
    h, w = image.shape[-2:]
    xp = F.pad(image, (r, r, 0, 0))
    out = xp[..., 0:w] * kernel[0]
    for i in range(1, kernel.numel()):
        out.add_(xp[..., i:i + w], alpha=float(kernel[i]))
    yp = F.pad(out, (0, 0, r, r))
    out = yp[..., 0:h, :] * kernel[0]
    for i in range(1, kernel.numel()):
        out.add_(yp[..., i:i + h, :], alpha=float(kernel[i]))
    return out


def _tile_medians(image: Tensor, box: int) -> Tensor:
    """Median of each ``box`` x ``box`` tile (a regular subsample of <= 1024 pixels per tile)."""
    b, c, h, w = image.shape
    ht, wt = max(1, h // box), max(1, w // box)
    bh, bw = h // ht, w // wt
    tiles = image[:, :, : ht * bh, : wt * bw].reshape(b, c, ht, bh, wt, bw)
    sy = max(1, int(math.ceil(bh / 32)))
    sx = max(1, int(math.ceil(bw / 32)))
    tiles = tiles[:, :, :, ::sy, :, ::sx].permute(0, 1, 2, 4, 3, 5).reshape(b, c, ht, wt, -1)
    return tiles.nanmedian(-1).values


def _windowed_centroid(flat: Tensor, bi: Tensor, x0: Tensor, y0: Tensor, bk: Tensor, h: int, w: int,
                       sigma: float, n_iter: int = 3) -> tuple[Tensor, Tensor]:
    """SExtractor-style windowed centroid (XWIN/YWIN) on 7x7 patches of the unbinned frame.

    Iterates ``x <- x + 2 * sum(W I dx) / sum(W I)`` with a Gaussian window ``W`` of ``sigma``
    centred on the current estimate (``I`` background-subtracted), which converges to an almost
    unbiased, near-optimal position for point sources. Sparse: only the patches are read.
    """
    r = 3
    off = torch.arange(-r, r + 1, device=flat.device)
    cx, cy = x0.round().long(), y0.round().long()
    xx = (cx[:, None, None] + off[None, None, :]).expand(-1, 2 * r + 1, -1)
    yy = (cy[:, None, None] + off[None, :, None]).expand(-1, -1, 2 * r + 1)
    inside = (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
    vals = flat[bi[:, None, None], yy.clamp(0, h - 1) * w + xx.clamp(0, w - 1)] - bk[:, None, None]
    vals = torch.where(inside & torch.isfinite(vals), vals, torch.zeros_like(vals))
    xf, yf = xx.to(flat.dtype), yy.to(flat.dtype)
    x, y = x0.clone(), y0.clone()
    for _ in range(n_iter):
        dx = xf - x[:, None, None]
        dy = yf - y[:, None, None]
        wgt = torch.exp(-(dx * dx + dy * dy) / (2 * sigma * sigma)) * vals
        norm = wgt.sum((1, 2))
        ok = norm > 0
        sx = 2 * (wgt * dx).sum((1, 2)) / torch.where(ok, norm, torch.ones_like(norm))
        sy = 2 * (wgt * dy).sum((1, 2)) / torch.where(ok, norm, torch.ones_like(norm))
        x = torch.where(ok, x + sx.clamp(-1, 1), x)
        y = torch.where(ok, y + sy.clamp(-1, 1), y)
    return x, y


def _local_maxima(smf: Tensor, cand: Tensor, h: int, w: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(bi, yi, xi, value)`` of the candidates (bool ``(B, 1, H, W)``) that are the maximum of their
    3x3 neighbourhood in the smoothed frame ``smf`` (B, H*W)."""
    bi, _, yi, xi = cand.nonzero(as_tuple=True)
    base = yi * w + xi
    c = smf[bi, base]
    is_max = torch.ones_like(c, dtype=torch.bool)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy == 0 and dx == 0:
                continue
            nb = smf[bi, (yi + dy).clamp(0, h - 1) * w + (xi + dx).clamp(0, w - 1)]
            # strict on one side so a plateau of two equal pixels still gives one peak
            is_max &= (c > nb) if (dy, dx) < (0, 0) else (c >= nb)
    return bi[is_max], yi[is_max], xi[is_max], c[is_max]


def _log_parabola_offsets(smf: Tensor, bi, yi, xi, c, bk, h: int, w: int) -> tuple[Tensor, Tensor]:
    """Sub-pixel ``(dx, dy)`` in [-0.5, 0.5] of each peak: a 3-point Gaussian (log-parabola) fit per
    axis on the smoothed frame above its background ``bk``."""
    tiny = torch.finfo(smf.dtype).tiny

    def val(dy, dx):
        return (smf[bi, (yi + dy).clamp(0, h - 1) * w + (xi + dx).clamp(0, w - 1)] - bk).clamp_min(tiny).log()

    lc = (c - bk).clamp_min(tiny).log()
    l_, r_, d_, u_ = val(0, -1), val(0, 1), val(-1, 0), val(1, 0)
    denx = l_ - 2 * lc + r_
    deny = d_ - 2 * lc + u_
    dx = torch.where(denx < 0, 0.5 * (l_ - r_) / denx.clamp_max(-tiny), torch.zeros_like(c)).clamp(-0.5, 0.5)
    dy = torch.where(deny < 0, 0.5 * (d_ - u_) / deny.clamp_max(-tiny), torch.zeros_like(c)).clamp(-0.5, 0.5)
    return dx, dy


def find_peaks(
    image: Tensor,
    mask: Optional[Tensor] = None,
    *,
    fwhm: float = 3.0,
    threshold: float = 5.0,
    box_size: int = 64,
    border: int = 3,
    max_peaks: Optional[int] = None,
    binning: int = 1,
    _centroid: bool = True,
) -> Peaks:
    """Fast point-source finder: background, Gaussian matched filter, thresholded local maxima.

    The background is the median of ``box_size`` tiles, bilinearly interpolated; the image is
    smoothed with a Gaussian of the given ``fwhm`` (px, truncated at 2 sigma); candidates are
    smoothed pixels above background + ``threshold`` x the smoothed noise (robust rms of the raw
    image times the kernel's noise gain), and peaks are candidates that are the maximum of their
    3x3 neighbourhood (tested only at candidates, so the cost is a few passes over the frame).
    Positions start from a 3-point Gaussian (log-parabola) fit on the smoothed image and are then
    refined by a SExtractor-style windowed centroid (Gaussian window of sigma = fwhm / 2.35, on the
    background-subtracted unsmoothed frame), nearly unbiased and near-optimal for point sources.
    NaN pixels never become peaks.

    Args:
        image: ``(B, 1, H, W)``; mask: optional bool, True = bad (no peak at or next to bad pixels).
        max_peaks: keep only the brightest ``max_peaks`` per image.
        binning: detect on the ``binning`` x ``binning`` block-averaged frame (``fwhm`` is given in
            unbinned pixels), then re-centre each peak on the brightest unbinned pixel of its block
            and fit the sub-pixel position there on the unbinned, background-subtracted frame. About
            ``binning**2`` times fewer passes over memory; use it for well-sampled PSFs
            (``fwhm >= 2 * binning``) when only the brighter stars matter (registration).
    """
    check_image(image, "image", channels=1)
    mask = check_mask(mask, image, "mask")
    if binning > 1:
        return _find_peaks_binned(image, mask, fwhm=fwhm, threshold=threshold, box_size=box_size,
                                  border=border, max_peaks=max_peaks, binning=int(binning))
    b, _, h, w = image.shape
    img = image
    if mask is not None:
        img = torch.where(mask, torch.full_like(image, float("nan")), image)
    med = _tile_medians(img, box_size)
    bkg = F.interpolate(med, size=(h, w), mode="bilinear", align_corners=False)
    flat_img, flat_bkg = img.reshape(b, -1), bkg.reshape(b, -1)
    step = max(1, (h * w) // 200_000) | 1
    resid = flat_img[:, ::step] - flat_bkg[:, ::step]
    rms = mad_std(resid, -1, ignore_nan=True)  # (B,)
    kern = _gaussian_1d(fwhm / 2.3548, image.dtype, image.device)
    gain = float((kern ** 2).sum())  # noise gain of the separable filter: sqrt(gain**2) per axis pair
    sm = _smooth(img, kern)
    thr = bkg + (threshold * rms * gain).reshape(b, 1, 1, 1)
    cand = sm > thr
    if border > 0:
        cand[..., :border, :] = False
        cand[..., -border:, :] = False
        cand[..., :border] = False
        cand[..., -border:] = False
    smf = sm.reshape(b, -1)
    bi, yi, xi, c = _local_maxima(smf, cand, h, w)
    bk = bkg.reshape(b, -1)[bi, yi * w + xi]
    dx, dy = _log_parabola_offsets(smf, bi, yi, xi, c, bk, h, w)
    x = xi.to(image.dtype) + dx
    y = yi.to(image.dtype) + dy
    flux = c - bk
    if max_peaks is not None:
        sel = _top_per_image(flux, bi, b, max_peaks)
        x, y, flux, bi, bk = x[sel], y[sel], flux[sel], bi[sel], bk[sel]
    if _centroid:
        x, y = _windowed_centroid(img.reshape(b, -1), bi, x, y, bk, h, w, fwhm / 2.3548)
    return Peaks(x, y, flux, bi)


def _top_per_image(flux: Tensor, bi: Tensor, b: int, k: int) -> Tensor:
    keep = []
    for i in range(b):  # per-image top-k (data-dependent sizes)
        idx = (bi == i).nonzero().squeeze(1)
        if idx.numel() > k:
            idx = idx[flux[idx].topk(k).indices]
        keep.append(idx)
    return torch.cat(keep)


def _find_peaks_binned(image, mask, *, fwhm, threshold, box_size, border, max_peaks, binning) -> Peaks:
    b, _, h, w = image.shape
    img = image if mask is None else torch.where(mask, torch.full_like(image, float("nan")), image)
    hb, wb = h // binning, w // binning
    binned = F.avg_pool2d(img[..., : hb * binning, : wb * binning], binning)
    # the block average of white noise has rms / binning: the threshold is relative to the binned rms
    pk = find_peaks(binned, None, fwhm=fwhm / binning, threshold=threshold, box_size=max(4, box_size // binning),
                    border=max(1, border // binning + 1), max_peaks=max_peaks, binning=1, _centroid=False)
    med = _tile_medians(binned, max(4, box_size // binning))
    bkb = F.interpolate(med, size=(hb, wb), mode="bilinear", align_corners=False).reshape(b, -1)
    xb, yb, bi = pk.x.round().long(), pk.y.round().long(), pk.batch_index
    bk = bkb[bi, yb * wb + xb]
    flat = img.reshape(b, -1)
    # brightest unbinned pixel of the block
    best, bx, by = None, None, None
    for dy in range(binning):
        for dx in range(binning):
            xx, yy = xb * binning + dx, yb * binning + dy
            v = flat[bi, yy * w + xx]
            if best is None:
                best, bx, by = v, xx, yy
            else:
                upd = v > best
                best = torch.where(upd, v, best)
                bx, by = torch.where(upd, xx, bx), torch.where(upd, yy, by)
    tiny = torch.finfo(image.dtype).tiny

    def val(dy, dx):
        v = flat[bi, (by + dy).clamp(0, h - 1) * w + (bx + dx).clamp(0, w - 1)] - bk
        return v.clamp_min(tiny).log()

    lc = (best - bk).clamp_min(tiny).log()
    l_, r_, d_, u_ = val(0, -1), val(0, 1), val(-1, 0), val(1, 0)
    denx, deny = l_ - 2 * lc + r_, d_ - 2 * lc + u_
    ddx = torch.where(denx < 0, 0.5 * (l_ - r_) / denx.clamp_max(-tiny), torch.zeros_like(lc)).clamp(-0.5, 0.5)
    ddy = torch.where(deny < 0, 0.5 * (d_ - u_) / deny.clamp_max(-tiny), torch.zeros_like(lc)).clamp(-0.5, 0.5)
    x = bx.to(image.dtype) + ddx
    y = by.to(image.dtype) + ddy
    x, y = _windowed_centroid(flat, bi, x, y, bk, h, w, fwhm / 2.3548)
    flux = pk.flux
    ok = torch.isfinite(x) & torch.isfinite(y) & (best > bk)
    return Peaks(x[ok], y[ok], flux[ok], bi[ok])


class RegisterResult(NamedTuple):
    """Output of :func:`register`.

    Attributes:
        image: ``(B, C, H_ref, W_ref)`` frames warped onto the reference grid, NaN where the
            footprint is below 0.999 (pixels that reach outside the frame).
        footprint: ``(B, 1, H_ref, W_ref)`` fraction of each output pixel covered by the frame.
        matrix: ``(B, 2, 3)`` transform mapping image pixels onto reference pixels.
        n_inliers: ``(B,)`` matched star pairs used in the final fit.
        rms: ``(B,)`` RMS residual (px) of those pairs.
    """

    image: Tensor
    footprint: Tensor
    matrix: Tensor
    n_inliers: Tensor
    rms: Tensor


def warp_affine(image: Tensor, matrix: Tensor, shape_out, *, interpolation: str = "bilinear",
                backend: str = "torch") -> tuple[Tensor, Tensor]:
    """Warp ``image`` (B, C, H, W) with ``matrix`` (B, 2, 3) (image pixels -> output pixels).

    Pixel centres sit on integer coordinates (``align_corners=True``), as everywhere here.
    ``backend="kornia"`` calls ``kornia.geometry.transform.warp_affine``; the default ``"torch"``
    builds the same sampling grid directly from the affine coefficients (two broadcast
    multiply-adds instead of ``affine_grid``'s batched matmul) and calls
    ``grid_sample`` with the same settings: both give the same image (tested). Lanczos3 uses
    :func:`sample_image`. Returns ``(warped, footprint)``: the footprint is the bilinear warp of a
    frame of ones (computed in closed form), and warped pixels with footprint < 0.999 are NaN.
    """
    h, w = as_pair(shape_out, "shape_out")
    if backend not in ("torch", "kornia"):
        raise ValueError(f"backend must be 'torch' or 'kornia', got {backend!r}")
    if matrix.dim() == 2:
        matrix = matrix.expand(image.shape[0], 2, 3)
    hs, ws = image.shape[-2:]
    inv = invert_transform(matrix.to(torch.float64))  # output px -> image px
    ys = torch.arange(h, dtype=image.dtype, device=image.device).reshape(1, h, 1)
    xs = torch.arange(w, dtype=image.dtype, device=image.device).reshape(1, 1, w)

    def coeffs(row: int, scale: float, offset: float = 0.0):
        # scale * (inv[row] @ [x, y, 1]) - offset, coefficients folded in float64
        a = (inv[:, row, 0] * scale).to(image.dtype).view(-1, 1, 1)
        b = (inv[:, row, 1] * scale).to(image.dtype).view(-1, 1, 1)
        c = (inv[:, row, 2] * scale - offset).to(image.dtype).view(-1, 1, 1)
        return a, b, c

    def coord(row: int, scale: float = 1.0, offset: float = 0.0, out=None):
        a, b, c = coeffs(row, scale, offset)
        return torch.add(a * xs, b * ys + c, out=out)

    b_ = image.shape[0]
    if interpolation == "lanczos3":
        sx, sy = coord(0), coord(1)
        return sample_image(image, sx.to(torch.float64), sy.to(torch.float64), "lanczos3")
    if backend == "kornia":
        from kornia.geometry.transform import warp_affine as kwarp

        warped = kwarp(image, matrix.to(image.dtype), (h, w), mode=interpolation, padding_mode="zeros",
                       align_corners=True)
    else:
        grid = image.new_empty((b_, h, w, 2))
        coord(0, 2.0 / max(ws - 1, 1), 1.0, out=grid[..., 0])
        coord(1, 2.0 / max(hs - 1, 1), 1.0, out=grid[..., 1])
        warped = F.grid_sample(image, grid, mode=interpolation, padding_mode="zeros", align_corners=True)
        del grid
    # per axis min(x + 1, W - x) clamped to [0, 1] == clamp((W + 1) / 2 - |x - (W - 1) / 2|, 0, 1)
    fx = coord(0, 1.0, (ws - 1) / 2).abs_().neg_().add_((ws + 1) / 2).clamp_(0, 1)
    fy = coord(1, 1.0, (hs - 1) / 2).abs_().neg_().add_((hs + 1) / 2).clamp_(0, 1)
    fp = fx.mul_(fy).unsqueeze(1)
    warped = warped.masked_fill_(fp < 0.999, float("nan"))
    return warped, fp


def warp_variance(variance: Tensor, matrix: Tensor, shape_out, values: Tensor, *,
                  interpolation: str = "bilinear") -> Tensor:
    """Variance of :func:`warp_affine`'s output: ``variance`` (B, C, H, W) of independent pixels
    propagated through the same interpolation weights, squared (``sum_i w_i^2 var_i``). ``values``
    (B, C, H_out, W_out) is the warped image: NaN there gives NaN here."""
    h, w = as_pair(shape_out, "shape_out")
    b, c = variance.shape[:2]
    if matrix.dim() == 2:
        matrix = matrix.expand(b, 2, 3)
    inv = invert_transform(matrix.to(torch.float64))
    ys = torch.arange(h, dtype=torch.float64, device=variance.device).reshape(1, h, 1)
    xs = torch.arange(w, dtype=torch.float64, device=variance.device).reshape(1, 1, w)
    sx = inv[:, 0, 0].view(-1, 1, 1) * xs + inv[:, 0, 1].view(-1, 1, 1) * ys + inv[:, 0, 2].view(-1, 1, 1)
    sy = inv[:, 1, 0].view(-1, 1, 1) * xs + inv[:, 1, 1].view(-1, 1, 1) * ys + inv[:, 1, 2].view(-1, 1, 1)
    v = _sample_variance(variance, None, sx.reshape(b, -1), sy.reshape(b, -1), interpolation,
                         values.reshape(b, c, -1))
    return v.reshape(b, c, h, w)


def register(
    image: Tensor,
    reference: Tensor,
    mask: Optional[Tensor] = None,
    reference_mask: Optional[Tensor] = None,
    *,
    transform: str = "similarity",
    interpolation: str = "bilinear",
    fwhm: float = 3.0,
    threshold: float = 5.0,
    max_sources: int = 1000,
    binning: int = 2,
    detector: Optional[Callable] = None,
    **match_kwargs,
) -> RegisterResult:
    """Register ``image`` onto ``reference`` from their stars (no WCS needed), as astroalign does.

    Detects point sources in both (:func:`find_peaks`, or ``detector(image, mask) -> Peaks``-like
    object with ``x, y, flux, batch_index``), matches them (:func:`match_sources`) and warps the
    image onto the reference grid (:func:`warp_affine`: kornia's ``warp_affine`` convention, the
    grid built directly; ``"lanczos3"`` via :func:`sample_image`).

    Args:
        image: ``(B, 1, H, W)`` frames to align; ``reference``: ``(1 | B, 1, H_ref, W_ref)``.
        transform: ``"similarity"`` or ``"affine"``; other keyword arguments go to
            :func:`match_sources` (``weighting="flux"`` by default here: peak heights measure SNR).
        fwhm, threshold, max_sources, binning: detection settings (:func:`find_peaks`); the
            ``max_sources`` brightest peaks of each frame are matched.

    Raises:
        AlignmentError: when any frame has fewer than 3 consistent matches or an inconsistent fit;
            no image is returned in that case.
    """
    check_image(image, "image", channels=1)
    check_image(reference, "reference", channels=1)
    if reference.shape[0] not in (1, image.shape[0]):
        raise ValueError(f"reference batch must be 1 or {image.shape[0]}, got shape {tuple(reference.shape)}")
    find = detector or (lambda im, m: find_peaks(im, m, fwhm=fwhm, threshold=threshold, max_peaks=max_sources,
                                                 binning=binning))
    pk = find(image, mask)
    pr = find(reference, reference_mask)
    mats, ninl, rmss = [], [], []
    for b in range(image.shape[0]):  # matching has data-dependent sizes: one frame at a time
        sel = pk.batch_index == b
        rb = b if reference.shape[0] > 1 else 0
        rsel = pr.batch_index == rb
        try:
            kw = dict(weighting="flux")
            kw.update(match_kwargs)
            res = match_sources(torch.stack([pk.x[sel], pk.y[sel]], 1), torch.stack([pr.x[rsel], pr.y[rsel]], 1),
                                src_flux=pk.flux[sel], dst_flux=pr.flux[rsel], transform=transform, **kw)
        except AlignmentError as err:
            raise AlignmentError(f"frame {b}: {err}") from None
        mats.append(res.matrix)
        ninl.append(res.n_inliers)
        rmss.append(res.rms)
    matrix = torch.stack(mats).to(image.device)
    warped, fp = warp_affine(image, matrix, reference.shape[-2:], interpolation=interpolation)
    return RegisterResult(warped, fp, matrix, torch.stack(ninl), torch.stack(rmss))


class Register(nn.Module):
    """``nn.Module`` wrapper of :func:`register` (constructor holds the keyword arguments)."""

    def __init__(self, transform: str = "similarity", interpolation: str = "bilinear", fwhm: float = 3.0,
                 threshold: float = 5.0, max_sources: int = 1000, binning: int = 2, max_control_points: int = 50,
                 pixel_tol: float = 2.0, min_matches: int = 3, min_inlier_fraction: float = 0.1):
        super().__init__()
        self.transform, self.interpolation = transform, interpolation
        self.fwhm, self.threshold, self.max_sources, self.binning = fwhm, threshold, max_sources, binning
        self.max_control_points, self.pixel_tol, self.min_matches = max_control_points, pixel_tol, min_matches
        self.min_inlier_fraction = min_inlier_fraction

    def forward(self, image: Tensor, reference: Tensor, mask: Optional[Tensor] = None,
                reference_mask: Optional[Tensor] = None) -> RegisterResult:
        return register(image, reference, mask, reference_mask, transform=self.transform,
                        interpolation=self.interpolation, fwhm=self.fwhm, threshold=self.threshold,
                        max_sources=self.max_sources, binning=self.binning,
                        max_control_points=self.max_control_points,
                        pixel_tol=self.pixel_tol, min_matches=self.min_matches,
                        min_inlier_fraction=self.min_inlier_fraction)


# ---------------------------------------------------------------------------------------------
# Differentiable refinement
# ---------------------------------------------------------------------------------------------


class RefineResult(NamedTuple):
    """Output of :func:`refine`.

    Attributes:
        matrix: ``(B, 2, 3)`` refined transform, image pixels -> reference pixels (affine mode), or
            the correction applied to the WCS mapping in source-pixel space (WCS mode).
        image: ``(B, C, H_ref, W_ref)`` image warped with the refined transform (NaN outside).
        loss: ``(B,)`` final mean squared residual per good pixel (after the photometric fit).
        wcs: the refined source WCS (WCS mode: a copy of ``src_wcs`` with new ``crpix`` and ``cd``),
            else None.
    """

    matrix: Tensor
    image: Tensor
    loss: Tensor
    wcs: object = None


def _residual_loss(warped: Tensor, ref: Tensor, good: Tensor, fit_scale: bool) -> Tensor:
    """Per-frame mean of ``(a * warped + b - ref)^2`` over good pixels, ``a, b`` by least squares."""
    g = good.to(warped.dtype)
    n = g.sum((1, 2, 3)).clamp_min(1)
    w0 = torch.where(good, warped, torch.zeros_like(warped))
    r0 = torch.where(good, ref.expand_as(warped), torch.zeros_like(warped))
    if fit_scale:
        mw, mr = w0.sum((1, 2, 3)) / n, r0.sum((1, 2, 3)) / n
        dw = (w0 - mw.view(-1, 1, 1, 1)) * g
        dr = (r0 - mr.view(-1, 1, 1, 1)) * g
        a = (dw * dr).sum((1, 2, 3)) / (dw * dw).sum((1, 2, 3)).clamp_min(1e-30)
        res = (a.view(-1, 1, 1, 1) * dw - dr) * g
    else:
        res = (w0 - r0) * g
    return (res * res).sum((1, 2, 3)) / n


class _RefineImages(NamedTuple):
    """The pair as :func:`refine` compares it: float64, bad pixels zeroed, smoothed."""

    img: Tensor
    ref: Tensor
    good_src: Tensor  # smoothed good-pixel weight of ``img`` (1 = all good)
    ref_good: Tensor  # bool: finite reference pixels


def _refine_images(image: Tensor, reference: Tensor, mask: Optional[Tensor], smooth_sigma: float) -> _RefineImages:
    work = torch.float64
    img = image.detach().to(work)
    ref = reference.detach().to(work)
    bad = ~torch.isfinite(img) if mask is None else (mask | ~torch.isfinite(img))
    img = torch.where(bad, torch.zeros_like(img), img)
    good_src = (~bad).to(work)
    rbad = ~torch.isfinite(ref)
    ref = torch.where(rbad, torch.zeros_like(ref), ref)
    if smooth_sigma > 0:
        k = _gaussian_1d(smooth_sigma, work, image.device)
        img = _smooth(img, k)
        ref = _smooth(ref, k)
        good_src = _smooth(good_src, k)
    return _RefineImages(img, ref, good_src, ~rbad)


class _RefineStart(NamedTuple):
    """Starting point of :func:`refine`: base source coordinates of every reference pixel, the centre
    of the parametrisation, and the initial linear part and shift (source pixels)."""

    bx: Tensor  # (B, H_ref, W_ref)
    by: Tensor
    centre: Tensor  # (B, 2)
    lin0: Tensor  # (B, 2, 2)
    t0: Tensor  # (B, 2)


def _wcs_start(src_wcs, dst_wcs, image_shape, ref_shape, grid_step: int, dev) -> _RefineStart:
    """WCS mode: source pixels through the WCS pair; identity correction around CRPIX."""
    work = torch.float64
    b, _, h, w = image_shape
    bx, by = pixel_to_pixel(src_wcs, dst_wcs, ref_shape, grid_step=grid_step, batch=b, device=dev, dtype=work)
    centre = src_wcs.crpix.to(work).to(dev).expand(b, 2) if hasattr(src_wcs, "crpix") else \
        torch.tensor([(w - 1) / 2, (h - 1) / 2], dtype=work, device=dev).expand(b, 2)
    lin0 = torch.eye(2, dtype=work, device=dev).expand(b, 2, 2).clone()
    t0 = torch.zeros(b, 2, dtype=work, device=dev)
    return _RefineStart(bx, by, centre, lin0, t0)


def _affine_start(matrix: Optional[Tensor], b: int, ref_shape, dev) -> _RefineStart:
    """Affine mode: reference pixels mapped by the inverse of ``matrix`` (identity when None),
    parametrised around the reference centre."""
    work = torch.float64
    hr, wr = ref_shape
    ys, xs = torch.meshgrid(torch.arange(hr, dtype=work, device=dev), torch.arange(wr, dtype=work, device=dev),
                            indexing="ij")
    centre = torch.tensor([(wr - 1) / 2, (hr - 1) / 2], dtype=work, device=dev).expand(b, 2)
    if matrix is None:
        matrix = torch.eye(2, 3, dtype=work, device=dev).expand(b, 2, 3)
    matrix = matrix.detach().to(work).to(dev)
    if matrix.dim() == 2:
        matrix = matrix.expand(b, 2, 3)
    if matrix.shape != (b, 2, 3):
        raise ValueError(f"matrix must be shaped (2, 3) or (B={b}, 2, 3), got {tuple(matrix.shape)}")
    init = invert_transform(matrix)  # reference px -> image px
    # x_src = A (p - c) + A c + t0  ->  in normalised units around c
    lin0 = init[:, :, :2].clone()
    t0 = (init[:, :, :2] @ centre.unsqueeze(-1)).squeeze(-1) + init[:, :, 2] - centre
    return _RefineStart(xs.expand(b, hr, wr), ys.expand(b, hr, wr), centre, lin0, t0)


class _RefineGeometry(NamedTuple):
    """Normalised coordinates ``(u, v)`` of the base source positions around ``(cx, cy)``, in units of ``scale``."""

    u: Tensor
    v: Tensor
    cx: Tensor
    cy: Tensor
    scale: float


def _refine_source_xy(lin: Tensor, tr: Tensor, g: _RefineGeometry) -> tuple[Tensor, Tensor]:
    """Source pixel coordinates of every reference pixel for the linear part ``lin`` and shift ``tr``."""
    b = lin.shape[0]
    sx = g.cx + g.scale * (lin[:, 0, 0].view(b, 1, 1) * g.u + lin[:, 0, 1].view(b, 1, 1) * g.v
                           + tr[:, 0].view(b, 1, 1))
    sy = g.cy + g.scale * (lin[:, 1, 0].view(b, 1, 1) * g.u + lin[:, 1, 1].view(b, 1, 1) * g.v
                           + tr[:, 1].view(b, 1, 1))
    return sx, sy


def _refine_losses(lin: Tensor, tr: Tensor, g: _RefineGeometry, data: _RefineImages, fit_scale: bool) -> Tensor:
    """(B,) masked residual loss of the frames warped by ``(lin, tr)`` against the reference."""
    h, w = data.img.shape[-2:]
    sx, sy = _refine_source_xy(lin, tr, g)
    inside = _inside(sx, sy, h, w).unsqueeze(1)
    gx = sx * (2.0 / (w - 1)) - 1
    gy = sy * (2.0 / (h - 1)) - 1
    grid = torch.stack([gx, gy], -1)
    warped = F.grid_sample(data.img, grid, mode="bilinear", padding_mode="border", align_corners=True)
    cover = F.grid_sample(data.good_src, grid, mode="bilinear", padding_mode="border", align_corners=True)
    good = inside & (cover.detach() > 0.999) & data.ref_good
    return _residual_loss(warped, data.ref, good, fit_scale)


def _refined_wcs(src_wcs, lin_d: Tensor, tr_d: Tensor, b: int):
    """A copy of ``src_wcs`` with the correction folded in (``CRPIX' = CRPIX + t``, ``CD' = CD A^-1``),
    or None when it has no CRPIX/CD."""
    if not (hasattr(src_wcs, "crpix") and hasattr(src_wcs, "cd")):
        return None
    import copy

    work = torch.float64
    new_wcs = copy.deepcopy(src_wcs)
    crpix = src_wcs.crpix.to(work) + tr_d[: len(src_wcs)] if len(src_wcs) == b else src_wcs.crpix.to(work) + tr_d
    cd = src_wcs.cd.to(work) @ torch.linalg.inv(lin_d)
    new_wcs.crpix = crpix.to(src_wcs.crpix.dtype)
    new_wcs.cd = cd.to(src_wcs.cd.dtype)
    return new_wcs


def refine(
    image: Tensor,
    reference: Tensor,
    matrix: Optional[Tensor] = None,
    mask: Optional[Tensor] = None,
    *,
    src_wcs=None,
    dst_wcs=None,
    steps: int = 30,
    smooth_sigma: float = 1.0,
    fit_scale: bool = True,
    grid_step: int = 16,
) -> RefineResult:
    """Refine an alignment by gradient descent on the masked residual ``warped - reference``.

    Affine mode (default): the 2x3 ``matrix`` (image -> reference pixels; identity when None) is
    the parameter. WCS mode (``src_wcs`` and ``dst_wcs`` given, e.g. :class:`TanWCS`): the frame is
    mapped through the WCS (as :class:`Reproject` does) and an affine correction in source-pixel
    space, ``x_src = CRPIX + A (x_wcs - CRPIX) + t``, is fitted; it is equivalent to
    ``CRPIX' = CRPIX + t`` and ``CD' = CD A^-1`` (exact for TAN; with SIP the polynomial is kept
    relative to the new CRPIX, a first-order correction), returned in ``RefineResult.wcs``.

    The loss is the mean squared residual over good pixels (finite, unmasked, inside the frame)
    after fitting a photometric scale and offset (``fit_scale``), both images smoothed by a
    Gaussian of ``smooth_sigma`` px to widen the basin of convergence; it is minimised by L-BFGS
    (strong-Wolfe line search, ``steps`` iterations) with gradients from autograd through
    ``grid_sample``. The linear part is parametrised around the frame centre in units of the
    half-size so that rotation/scale and shift are equally conditioned. Expect the starting point
    to be within about a PSF FWHM (e.g. from :func:`register` or the WCS).

    Args:
        image: ``(B, 1, H, W)`` frames; reference: ``(1 | B, 1, H_ref, W_ref)``.
        mask: optional bool mask of ``image`` (True = bad).
    """
    check_image(image, "image")
    check_image(reference, "reference")
    mask = check_mask(mask, image, "mask")
    b, c, h, w = image.shape
    hr, wr = reference.shape[-2:]
    dev = image.device
    work = torch.float64
    data = _refine_images(image, reference, mask, smooth_sigma)
    wcs_mode = src_wcs is not None or dst_wcs is not None
    if wcs_mode and (src_wcs is None or dst_wcs is None):
        raise ValueError("WCS mode needs both src_wcs and dst_wcs")
    start = _wcs_start(src_wcs, dst_wcs, image.shape, (hr, wr), grid_step, dev) if wcs_mode else \
        _affine_start(matrix, b, (hr, wr), dev)
    centre = start.centre
    scale = max(h, w, hr, wr) / 2.0
    cx, cy = centre[:, 0].view(b, 1, 1), centre[:, 1].view(b, 1, 1)
    geom = _RefineGeometry((start.bx - cx) / scale, (start.by - cy) / scale, cx, cy, scale)
    lin = start.lin0.clone().requires_grad_(True)
    tr = (start.t0 / scale).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([lin, tr], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = _refine_losses(lin, tr, geom, data, fit_scale).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        final = _refine_losses(lin, tr, geom, data, fit_scale)
        lin_d, tr_d = lin.detach(), tr.detach() * scale
        sx, sy = _refine_source_xy(lin, tr, geom)
        warped, _ = sample_image(image.to(work), sx, sy, "bilinear", mask=mask)
    warped = warped.to(image.dtype)
    # x_src = centre + A (x - centre) + t   (in WCS mode a correction in source-pixel space)
    corr = torch.cat([lin_d, (tr_d + centre - (lin_d @ centre.unsqueeze(-1)).squeeze(-1)).unsqueeze(-1)], -1)
    if wcs_mode:
        return RefineResult(corr.to(image.dtype), warped, final.to(image.dtype), _refined_wcs(src_wcs, lin_d, tr_d, b))
    return RefineResult(invert_transform(corr).to(image.dtype), warped, final.to(image.dtype), None)
