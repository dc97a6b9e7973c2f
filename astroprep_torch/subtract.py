"""Image subtraction: Alard–Lupton / HOTPANTS kernel fit and spatially varying convolution.

Paper section 2.2.4 (Cao, Jia et al. 2025) follows HOTPANTS (Becker 2015; Alard & Lupton 1998;
Alard 2000): the image with the sharper PSF is convolved with a kernel

    K(u, v; x, y) = sum_n a_n(x, y) K_n(u, v),   K_n = exp(-(u^2 + v^2) / (2 sigma^2)) u^i v^j   (eqs. 8-9)

so that it matches the other one up to a smooth differential background ``B(x, y)`` (eq. 10),
and the difference is formed. What this module does, step by step:

* **Basis** (:func:`kernel_basis`), HOTPANTS' convention (``alard.c: kernel_vector``): for each
  Gaussian ``(sigma, degree)`` and each ``i + j <= degree`` (``i`` = power of ``u`` = x offset, the
  outer loop), the 1-D factors ``g(u) u^i`` and ``g(v) v^j`` are each normalised to unit sum when
  both ``i`` and ``j`` are even; every even-even basis after the first then has the first one
  subtracted. So the first basis sums to 1 and every other basis sums to 0: the kernel sum (the
  photometric ratio) is the coefficient of the first basis alone. ``delta_basis=True`` replaces
  this by the ``(2r+1)^2`` delta functions normalised the same way (central delta, then
  ``delta(u, v) - delta(0, 0)``).
* **Spatial variation**, as HOTPANTS: the first coefficient is a constant (constant kernel sum)
  and every other coefficient is a polynomial in ``xf = (x - W/2) / (W/2)``,
  ``yf = (y - H/2) / (H/2)`` of total degree ``spatial_order`` (terms ``xf^i yf^j``, ``i`` outer);
  the differential background is a polynomial of total degree ``background_order`` in the same
  coordinates, evaluated per pixel.
* **Stamps**: the frame is cut into a ``stamp_grid = (rows, columns)`` grid; in each cell the
  brightest isolated local maxima of the template (peak above ``stamp_threshold`` robust sigma of the
  stamp region over its median, as HOTPANTS' per-region statistics, so a sky gradient does not raise
  the threshold; the
  highest pixel within ``stamp_half_width // 2``) whose whole footprint (``stamp_half_width +
  kernel_half_width``) is free of masked, saturated and non-finite pixels in *both* images (tested
  on 8-px blocks, so conservatively) are candidates, best first (``stars_per_cell`` of them). The
  search touches the frame once (maxima of small blocks, ``F.max_pool2d``) and then works on the
  block maxima only (one sort ranks them per cell). Each cell contributes one star at a time, as
  HOTPANTS' substamps; ``stamp_positions`` overrides the
  selection (HOTPANTS ``-ssf``). ``stamp_layout="hotpants"`` follows HOTPANTS' geometry
  (``main.c``, ``functions.c: getPsfCenters/checkPsfCenter``): each cell's stamp region is
  ``min(H/rows, W/cols) - (2r+1)`` pixels (odd) from the cell origin, so stars in the ~kernel-wide
  gaps between stamps are not used, and the ``+-stamp_half_width`` box must avoid a frame border of
  ``stamp_half_width + kernel_half_width`` (centre at least ``2 stamp_half_width + r`` from the
  edges). With it and HOTPANTS' ``-ft 20`` (``stamp_threshold=20``) our selection picks exactly
  HOTPANTS' substamps on the DECam test pair; the default ``"grid"`` layout tiles the frame and
  keeps stars that HOTPANTS skips (better on small frames, different background samples).
* **Fit**: for the first candidate of every cell (the others only when a rejection reaches them)
  the cutout of the image to convolve is convolved with every basis
  (separably: Gaussian factors along x then y, each pass one banded matrix product) giving a
  design matrix (after removing each image's median sky, for conditioning); per-stamp normal matrices
  are expanded by the spatial polynomials into one weighted least-squares system (weights
  ``1 / (var_target + var_convolved)``), solved in float64 with ``torch.linalg.solve``. The
  expansion uses its Kronecker structure (``G[(a,s),(b,t)] = sum_r N_r[a,b] s_r s_r^T``), so a
  rejection iteration costs ``R C^2 S^2`` instead of ``R C M^2`` operations.
  Bad stamps are then rejected as HOTPANTS does: first stamps whose individually fitted kernel
  sum is a ``clip_sigma`` outlier (both sides), then, iteratively (``max_iterations``), stamps whose
  figure of merit ``<r^2 / var>`` (HOTPANTS' ``-fom v``) exceeds the sigma-clipped mean by
  ``clip_sigma`` standard deviations (HOTPANTS ``-ks``; one-sided; the mean and std come from a
  ``stat_sigma`` clip, HOTPANTS ``-ssig``, 3 by default, which starts from the median and MAD so that a
  single spoiled stamp among few cannot hide by inflating the std); a rejected stamp is replaced by its cell's next
  candidate. This loop stops on a data-dependent condition (one host sync per iteration).
* **Template-noise correction** (``debias=True``, the default; ``False`` reproduces HOTPANTS): the
  design columns ``A (x) K_n`` carry the noise of ``A``, and least squares then attenuates the
  kernel's sharp components (errors in variables): the convolved stars come out too broad and
  every constant star leaves a positive residual peak (+0.07..+0.13 sigma on average on simulated
  GWAC pairs at 2048^2-4096^2, more on smaller frames whose stamp stars are fainter). After the
  rejection loop the final system is solved with the expected noise part of the normal matrix,
  ``sum_p w(p) sum_q K_n(q) K_m(q) V(p - q)`` per stamp, removed. The variance ``V`` is the
  variance model (``gain``, ``read_noise`` or ``*_var``) rescaled by the noise actually measured in
  the image, and the noise's pixel-to-pixel correlation (resampled or stacked frames) measured too
  (:func:`_noise_model`: clipped statistics of pixel differences at lags of 1-2 and 5 pixels), so
  a wrong gain neither over- nor under-corrects and noise-free data get no correction. Directions of
  the solution that the data barely determine (noise-metric eigenvalue ``mu < 2``) are corrected
  only partly (:func:`_debiased_solve`), which keeps the corrected system well conditioned
  instead of amplifying noise; with no more active stamps than spatial terms the plain fit is
  kept. ``experiments/subtract_sim_fidelity.py`` measures the effect.
* **Direction** (``convolve="auto"``): the FWHM of the candidate stars is measured in both images
  (second moments); the image with the smaller FWHM is convolved (HOTPANTS tries both and keeps
  the better figure of merit; for a pure PSF-width mismatch both rules agree).
* **Apply**: the kernel is evaluated at the centre of square tiles (``tile_size`` = FFT size,
  default 128, i.e. ``128 - 2r`` output pixels per tile) and every tile is convolved by FFT with
  its own kernel, all tiles in one batched ``rfft2``. The kernel sum is the same in every tile
  (constant first coefficient, zero-sum others), so fluxes are exact; only the PSF shape is held
  constant across a tile (HOTPANTS does the same per ``-kcs`` region). With ``spatial_order=0``
  this is exact. ``tile_size=None`` gives the exact spatially varying convolution as
  ``sum_p P_p(x, y) (I (x) K_p)`` with one full-frame FFT per spatial term (slower; used to
  measure the tiling error in ``experiments/subtract_speed.py``). The variance is convolved by
  ``K^2`` on the same tiles unless ``variance_tile_size`` says otherwise (256 px tiles were measured
  slower in CPU time at 4096^2 and double the variance error, so the default keeps 128). Outside the
  frame the image is
  extended by replicating edge pixels, so the outer ``kernel_half_width`` pixels are approximate.
  Non-finite pixels of the image to convolve (or of its variance) are zeroed for the FFTs; the
  difference, model and variance are NaN within ``kernel_half_width`` of them (unknown there).
* **Difference**: always science minus template after matching, so a new source in the science
  frame is positive: ``science - (template (x) K) - B`` or ``(science (x) K) + B - template``.
  ``normalize="science"`` (HOTPANTS ``-n i``) expresses it in science-frame counts (divides by
  the kernel sum when the science frame was convolved); ``"template"`` in template counts.
* **Noise**: variance images (given, or ``max(image, 0) / gain + (read_noise / gain)^2`` in ADU
  with ``read_noise`` in electrons, HOTPANTS' model) are propagated as ``var_target +
  var_convolved (x) K^2`` (HOTPANTS' default, pixel covariance ignored). With
  ``variance_convolution="local"`` a *given* variance map of the convolved image is taken as
  constant over each kernel footprint: ``var_convolved * sum K^2`` with the tile's kernel, one pass
  instead of a tiled FFT. That is exact for a map constant over the kernel and, for a map that
  varies on scales ``L`` much larger than the kernel (a background RMS^2 map interpolated from
  meshes, as the pipeline passes), off by about ``sigma_K^2 / L^2`` relative (second order: at
  most 8e-6 on the 4096^2 Table 2 frame; ``tests/test_subtract.py`` checks < 1e-3 on a map that
  varies over ~60 px). A map with stars in it (Poisson variance) needs ``"fft"``; the variance
  made here when none is given is always convolved by FFT.

Host synchronisations (data-dependent Python control flow, isolated on purpose): the check that
every pair has at least one stamp star, the choice of copy-free paths (same direction for the whole
batch, all pixels finite) and two per stamp-rejection iteration (the stop test, and whether a
replacement candidate's stamp system must be built). ``torch.compile`` therefore
graph-breaks there; the pieces in between (basis convolution, solve, tiled FFT) are plain tensor code.

Images are ``(B, 1, H, W)``; pixel coordinates 0-based, ``x`` = column, ``y`` = row; kernels are
arrays ``K[v + r, u + r]`` applied as a true convolution ``(I (x) K)(x, y) = sum K(u, v) I(x-u, y-v)``.
Everything is in torch, batched, on the inputs' device and dtype, and differentiable w.r.t. both
images (stamp positions are chosen without gradient).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._checks import (all_finite, as_pair, bad_pixels, check_batch_nonempty, check_float_dtype, check_image,
                      check_mask, check_same_shape)
from ._masks import grow_mask
from ._runtime import adapt_to_load
from ._robust import mad_std

__all__ = [
    "KernelBasis",
    "StampStats",
    "SubtractionResult",
    "ImageSubtraction",
    "kernel_basis",
    "poisson_variance",
    "spatial_terms",
    "apply_kernel",
    "image_subtraction",
]

Pair = Union[float, Sequence[float], None]


# ----------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------
class StampStats(NamedTuple):
    """Per-stamp statistics (flat, one row per grid cell that had a candidate), as HOTPANTS' log.

    ``residual_mean`` / ``residual_std`` are the mean and standard deviation of
    ``(target - model) / sigma`` over the stamp; ``merit`` is ``<r^2 / var>`` (HOTPANTS ``-fom v``);
    ``kernel_sum`` the kernel sum of the stamp fitted alone; ``used`` whether the stamp is in the
    final solution.
    """

    batch_index: Tensor
    x: Tensor
    y: Tensor
    used: Tensor
    merit: Tensor
    residual_mean: Tensor
    residual_std: Tensor
    kernel_sum: Tensor


class SubtractionResult(NamedTuple):
    """Output of :class:`ImageSubtraction`.

    difference: (B, 1, H, W) science minus matched template (see ``normalize``).
    convolved: (B, 1, H, W) the convolved image plus the differential background (the model of
        the other image, in the convolved image's own units after matching).
    variance: (B, 1, H, W) variance of ``difference``.
    kernel_sum: (B,) kernel sum (photometric ratio target / convolved).
    kernel_coefficients: (B, M) the solution vector: first-basis coefficient, then for each other
        basis its ``(spatial_order+1)(spatial_order+2)/2`` spatial terms, then the background terms.
    stamp_stats: :class:`StampStats`.
    convolved_science: (B,) bool, True where the science frame was the one convolved.
    """

    difference: Tensor
    convolved: Tensor
    variance: Tensor
    kernel_sum: Tensor
    kernel_coefficients: Tensor
    stamp_stats: StampStats
    convolved_science: Optional[Tensor] = None


# ----------------------------------------------------------------------------------------------
# Basis
# ----------------------------------------------------------------------------------------------
class KernelBasis(NamedTuple):
    """Kernel basis: ``kernels`` (N, k, k) true-convolution kernels ``K[v + r, u + r]``.

    For the Gaussian basis the separable description is kept: ``gaussians`` ((sigma, degree), ...),
    ``pairs`` the (gaussian index, i, j) of each basis, ``scale`` (N,) the normalisation of the
    product ``g(u) u^i g(v) v^j`` and ``minus_first`` (N,) bool, True where the first basis is
    subtracted. ``delta`` is True for the delta-function basis.
    """

    kernels: Tensor
    half_width: int
    gaussians: tuple
    pairs: tuple
    scale: Tensor
    minus_first: Tensor
    delta: bool


def kernel_basis(
    half_width: int,
    gaussians: Sequence[Sequence[float]] = ((0.7, 6), (1.5, 4), (3.0, 2)),
    *,
    delta: bool = False,
    dtype: torch.dtype = torch.float64,
    device=None,
) -> KernelBasis:
    """HOTPANTS-normalised Gaussian x polynomial basis (or delta-function basis).

    ``gaussians`` is a sequence of ``(sigma, degree)`` (sigma in pixels). Returns a
    :class:`KernelBasis` with ``N = sum (d+1)(d+2)/2`` kernels (``(2 half_width + 1)^2`` for the
    delta basis). The first kernel sums to 1, all others to 0.
    """
    r = int(half_width)
    if r < 1:
        raise ValueError(f"kernel_half_width must be >= 1, got {half_width}")
    k = 2 * r + 1
    u = torch.arange(-r, r + 1, dtype=torch.float64)
    if delta:
        n = k * k
        kernels = torch.zeros(n, k, k, dtype=torch.float64)
        centre = r * k + r
        order = [centre] + [i for i in range(n) if i != centre]
        for idx, flat in enumerate(order):
            kernels[idx].view(-1)[flat] = 1.0
            if idx > 0:
                kernels[idx, r, r] = -1.0
        return KernelBasis(kernels.to(device=device, dtype=dtype), r, (), (), torch.ones(n, dtype=dtype, device=device),
                           torch.zeros(n, dtype=torch.bool, device=device), True)
    gaussians = tuple((float(s), int(d)) for s, d in gaussians)
    if not gaussians or any(s <= 0 or d < 0 for s, d in gaussians):
        raise ValueError(f"gaussians must be a non-empty sequence of (sigma > 0, degree >= 0), got {gaussians!r}")
    kernels, pairs, scale, minus = [], [], [], []
    k0 = None
    for gi, (sigma, deg) in enumerate(gaussians):
        g = torch.exp(-u * u / (2.0 * sigma * sigma))
        for i in range(deg + 1):
            for j in range(deg - i + 1):
                fx, fy = g * u ** i, g * u ** j
                even = i % 2 == 0 and j % 2 == 0
                c = 1.0 / float(fx.sum() * fy.sum()) if even else 1.0
                kern = c * torch.outer(fy, fx)
                sub = even and k0 is not None
                if sub:
                    kern = kern - k0
                if k0 is None:
                    k0 = kern.clone()
                kernels.append(kern)
                pairs.append((gi, i, j))
                scale.append(c)
                minus.append(sub)
    return KernelBasis(
        torch.stack(kernels).to(device=device, dtype=dtype), r, gaussians, tuple(pairs),
        torch.tensor(scale, dtype=dtype, device=device), torch.tensor(minus, dtype=torch.bool, device=device), False,
    )


def _basis_to(basis: KernelBasis, ref: Tensor) -> KernelBasis:
    if basis.kernels.dtype == ref.dtype and basis.kernels.device == ref.device:
        return basis
    return basis._replace(kernels=basis.kernels.to(ref), scale=basis.scale.to(ref), minus_first=basis.minus_first.to(ref.device))


def _convolve_stamps(cutouts: Tensor, basis: KernelBasis) -> Tensor:
    """Valid convolution of cutouts (S, L, L) with every basis -> (S, N, L - 2r, L - 2r)."""
    r = basis.half_width
    k = 2 * r + 1
    s, length, _ = cutouts.shape
    inner = length - 2 * r
    if basis.delta:
        # True convolution with delta(u, v) picks I(x - u, y - v): unfold and flip the offsets.
        patches = F.unfold(cutouts[:, None], k)  # (S, k*k, inner*inner), offset index = (dy, dx) of I
        patches = patches.flip(1).view(s, k * k, inner, inner)
        centre = r * k + r
        order = [centre] + [i for i in range(k * k) if i != centre]
        out = patches[:, order]
        return torch.cat([out[:, :1], out[:, 1:] - out[:, :1]], 1)
    u = torch.arange(-r, r + 1, dtype=cutouts.dtype, device=cutouts.device)
    # Banded (Toeplitz) matrices turn both 1-D passes into single large matrix products:
    # band[a, l, p] = f_p(l - a - r)... i.e. out[a] = sum_l in[l] f_p(a + r - l) (true convolution).
    lpos = torch.arange(length, device=cutouts.device)
    apos = torch.arange(inner, device=cutouts.device)
    off = (apos[:, None] + r - lpos[None, :])  # (inner, L): u = a + r - l, valid when |u| <= r
    inband = off.abs() <= r
    per_gauss = []
    for sigma, deg in basis.gaussians:
        g = torch.exp(-u * u / (2.0 * sigma * sigma))
        filt = torch.stack([g * u ** p for p in range(deg + 1)], 1)  # (k, deg+1) at u = -r..r
        band = torch.where(inband[..., None], filt[(off + r).clamp(0, 2 * r)], 0)  # (inner, L, d)
        d = deg + 1
        # x pass: xs[s, l, b, i] = sum_m C[s, l, m] band[b, m, i]
        xs = cutouts.reshape(s * length, length) @ band.permute(1, 0, 2).reshape(length, inner * d)
        xs = xs.view(s, length, inner * d).permute(1, 0, 2).reshape(length, s * inner * d)
        # y pass: ys[j, a, (s, b, i)] = sum_l band[a, l, j] xs[l, (s, b, i)]
        ys = band.permute(2, 0, 1).reshape(d * inner, length) @ xs
        ys = ys.view(d, inner, s, inner, d)  # [j, a, s, b, i]
        sel = [ys[j, :, :, :, i] for gi, i, j in basis.pairs if basis.gaussians[gi] == (sigma, deg)]
        per_gauss.append(torch.stack(sel, 0))  # (Ng, a, S, b)
    out = torch.cat(per_gauss, 0).permute(2, 0, 1, 3)  # (S, N, a, b), one copy
    out = out * basis.scale.view(1, -1, 1, 1)
    return torch.where(basis.minus_first.view(1, -1, 1, 1), out - out[:, :1], out)


# ----------------------------------------------------------------------------------------------
# Spatial polynomials, variance, kernel application
# ----------------------------------------------------------------------------------------------
def spatial_terms(x: Tensor, y: Tensor, order: int, shape: tuple[int, int]) -> Tensor:
    """HOTPANTS spatial polynomial terms ``xf^i yf^j`` (i outer, i + j <= order), last axis.

    ``xf = (x - W/2) / (W/2)``, ``yf = (y - H/2) / (H/2)``; x, y in 0-based pixels.
    """
    h, w = shape
    xf = (x - 0.5 * w) / (0.5 * w)
    yf = (y - 0.5 * h) / (0.5 * h)
    terms = []
    for i in range(order + 1):
        for j in range(order - i + 1):
            terms.append(xf ** i * yf ** j)
    return torch.stack(terms, -1)


def _n_terms(order: int) -> int:
    return (order + 1) * (order + 2) // 2


def poisson_variance(image: Tensor, gain: float = 1.0, read_noise: float = 0.0) -> Tensor:
    """Variance in ADU^2 of an image in ADU: ``max(image, 0) / gain + (read_noise / gain)^2``.

    ``read_noise`` is in electrons, ``gain`` in e-/ADU (HOTPANTS' noise model, ``-ig/-ir``).
    """
    v = image.clamp(min=0)
    if torch.is_grad_enabled() and image.requires_grad:
        return v / gain + (read_noise / gain) ** 2
    return v.div_(gain).add_((read_noise / gain) ** 2)  # one frame-sized buffer


def _split_coefficients(theta: Tensor, n_basis: int, spatial_order: int):
    """theta (B, M) -> (a0 (B,), spatial (B, N-1, S), background (B, Nbg))."""
    ns = _n_terms(spatial_order)
    a0 = theta[:, 0]
    sp = theta[:, 1:1 + (n_basis - 1) * ns].reshape(theta.shape[0], n_basis - 1, ns)
    bg = theta[:, 1 + (n_basis - 1) * ns:]
    return a0, sp, bg


def _term_kernels(theta: Tensor, basis: KernelBasis, spatial_order: int) -> Tensor:
    """Kernels K_p (B, S, k, k) with K(x, y) = sum_p P_p(x, y) K_p."""
    kern = basis.kernels.to(theta)
    a0, sp, _ = _split_coefficients(theta, kern.shape[0], spatial_order)
    kp = torch.einsum("bns,nvu->bsvu", sp, kern[1:])
    first = a0[:, None, None] * kern[0]
    return torch.cat([kp[:, :1] + first[:, None], kp[:, 1:]], 1)


def _pad_replicate(x: Tensor, left: int, right: int, top: int, bottom: int) -> Tensor:
    """``F.pad(x, (left, right, top, bottom), mode="replicate")``, the same values; without autograd
    as one copy of the frame plus edge fills (ATen's replication-pad kernel is several times slower
    than a copy on CPU)."""
    if x.requires_grad and torch.is_grad_enabled():
        return F.pad(x, (left, right, top, bottom), mode="replicate")
    h, w = x.shape[-2:]
    xp = x.new_empty((*x.shape[:-2], h + top + bottom, w + left + right))
    xp[..., top:top + h, left:left + w] = x
    if left:
        xp[..., top:top + h, :left] = x[..., :, :1]
    if right:
        xp[..., top:top + h, left + w:] = x[..., :, w - 1:]
    if top:
        xp[..., :top, :] = xp[..., top:top + 1, :]
    if bottom:
        xp[..., top + h:, :] = xp[..., top + h - 1:top + h, :]
    return xp


def _fft_tiles(x: Tensor, kernels: Tensor, tile: tuple[int, int], r: int, max_tiles: int = 48) -> Tensor:
    """Convolve x (B, C, H, W) by per-tile kernels (B, C, ty, tx, k, k) or broadcastable.

    Tiles of ``th x tw`` output pixels (FFT size ``th + 2r``); edges replicated. Rows of tiles are
    processed in chunks of about ``max_tiles`` tiles, so the spectra never exceed a few MB per
    tile row (peak memory ~ input + output + one chunk).
    """
    b, c, h, w = x.shape
    th, tw = tile
    ty, tx = -(-h // th), -(-w // tw)
    # one padded copy: edges replicated by r (and over the round-up to whole tiles, cropped later)
    xp = _pad_replicate(x, r, r + tx * tw - w, r, r + ty * th - h)
    ph, pw = th + 2 * r, tw + 2 * r
    bo, co = torch.broadcast_shapes((b, c), tuple(kernels.shape[:2]))
    out = x.new_empty(bo, co, ty * th, tx * tw)
    out_tiles = out.view(bo, co, ty, th, tx, tw)  # tile rows written in place: one strided copy each
    per_row = kernels.shape[2] > 1
    step = max(1, max_tiles // tx)
    kspec_all = None if per_row else torch.fft.rfft2(kernels, s=(ph, pw))
    for r0 in range(0, ty, step):
        r1 = min(ty, r0 + step)
        tiles = xp[:, :, r0 * th:r1 * th + 2 * r].unfold(2, ph, th).unfold(3, pw, tw)  # (B, C, n, tx, ph, pw)
        spec = torch.fft.rfft2(tiles)
        kspec = torch.fft.rfft2(kernels[:, :, r0:r1], s=(ph, pw)) if per_row else kspec_all
        grad = torch.is_grad_enabled() and (spec.requires_grad or kspec.requires_grad)
        if grad or torch.broadcast_shapes(spec.shape, kspec.shape) != spec.shape:
            spec = spec * kspec
        else:
            spec.mul_(kspec)  # no autograd: save one spectrum-sized buffer
        o = torch.fft.irfft2(spec, s=(ph, pw))[..., 2 * r:, 2 * r:]
        del spec
        out_tiles[:, :, r0:r1].copy_(o.permute(0, 1, 2, 4, 3, 5))
    return out[..., :h, :w]


def apply_kernel(
    image: Tensor,
    theta: Tensor,
    basis: KernelBasis,
    spatial_order: int,
    variance: Optional[Tensor] = None,
    tile_size: Optional[int] = 128,
    variance_tile_size: Optional[int] = None,
    variance_convolution: str = "fft",
) -> tuple[Tensor, Optional[Tensor]]:
    """Convolve ``image`` (B, 1, H, W) with the spatially varying kernel of ``theta`` (B, M).

    Returns ``(image (x) K, variance (x) K^2)`` (the second None when ``variance`` is None). With
    ``tile_size`` (an FFT size > 2r) the kernel is evaluated at each tile centre; with ``None`` the
    convolution is exact (one full-frame FFT per spatial term, and per pair of terms for the
    variance). ``variance_tile_size`` (default: ``tile_size``) is the FFT tile size of the variance
    pass (K^2 held constant over those tiles). ``variance_convolution="local"``: ``variance * sum K^2``
    with the kernel of each variance tile (or of each pixel, ``tile_size=None``) instead of the
    convolution, for maps that vary slowly over a kernel width (see the module docstring).
    The background is not added here.
    """
    if variance_convolution not in ("fft", "local"):
        raise ValueError(f"variance_convolution must be 'fft' or 'local', got {variance_convolution!r}")
    b, _, h, w = image.shape
    r = basis.half_width
    kp = _term_kernels(theta, basis, spatial_order)  # (B, S, k, k)
    ns = kp.shape[1]
    if tile_size is None:
        yy = torch.arange(h, dtype=image.dtype, device=image.device)[:, None].expand(h, w)
        xx = torch.arange(w, dtype=image.dtype, device=image.device)[None, :].expand(h, w)
        terms = spatial_terms(xx, yy, spatial_order, (h, w)).permute(2, 0, 1)  # (S, H, W)
        full = (h, w)
        conv = _fft_tiles(image, kp[:, :, None, None], full, r)  # (B, S, H, W)
        out = (conv * terms).sum(1, keepdim=True)
        vout = None
        if variance is not None and variance_convolution == "local":
            gram = torch.einsum("bpvu,bqvu->bpq", kp, kp)  # <K_p, K_q>: sum K^2 = terms^T gram terms
            vout = variance * torch.einsum("phw,bpq,qhw->bhw", terms, gram, terms)[:, None]
        elif variance is not None:
            idx = [(p, q) for p in range(ns) for q in range(p, ns)]
            kk = torch.stack([kp[:, p] * kp[:, q] * (1.0 if p == q else 2.0) for p, q in idx], 1)
            tt = torch.stack([terms[p] * terms[q] for p, q in idx], 0)
            vconv = _fft_tiles(variance, kk[:, :, None, None], full, r)
            vout = (vconv * tt).sum(1, keepdim=True)
        return out, vout
    th, kern = _tile_kernels(kp, tile_size, r, spatial_order, (h, w))
    if variance is None:
        return _fft_tiles(image, kern, (th, th), r), None
    vtile = tile_size if variance_tile_size is None else variance_tile_size
    vth, vkern = (th, kern) if vtile == tile_size else _tile_kernels(kp, vtile, r, spatial_order, (h, w))
    if variance_convolution == "local":
        return _fft_tiles(image, kern, (th, th), r), _scale_tiles(variance, vkern.square().sum((-1, -2)), vth)
    if torch.is_grad_enabled() and (image.requires_grad or variance.requires_grad or kern.requires_grad):
        if vth == th:
            both = torch.cat([image, variance], 1)
            out = _fft_tiles(both, torch.cat([kern, kern * kern], 1), (th, th), r)
            return out[:, :1], out[:, 1:]
        return _fft_tiles(image, kern, (th, th), r), _fft_tiles(variance, vkern * vkern, (vth, vth), r)
    # no autograd: two separate passes avoid a 2-frame concatenated copy
    return _fft_tiles(image, kern, (th, th), r), _fft_tiles(variance, vkern * vkern, (vth, vth), r)


def _tile_kernels(kp: Tensor, tile_size: int, r: int, spatial_order: int, shape) -> tuple[int, Tensor]:
    """Kernels at the centres of tiles of FFT size ``tile_size`` -> (output tile side, (B, 1, ty, tx, k, k))."""
    h, w = shape
    fft_size = int(tile_size)
    if fft_size <= 2 * r:
        raise ValueError(f"tile_size must exceed 2 * kernel_half_width = {2 * r}, got {tile_size}")
    th = tw = fft_size - 2 * r
    if spatial_order == 0:
        return th, kp[:, 0][:, None, None, None]  # (B, 1, 1, 1, k, k)
    ty, tx = -(-h // th), -(-w // tw)
    cy = torch.arange(ty, dtype=kp.dtype, device=kp.device) * th + 0.5 * (th - 1)
    cx = torch.arange(tx, dtype=kp.dtype, device=kp.device) * tw + 0.5 * (tw - 1)
    cy = cy.clamp(max=h - 1)
    cx = cx.clamp(max=w - 1)
    terms = spatial_terms(cx[None, :].expand(ty, tx), cy[:, None].expand(ty, tx), spatial_order, (h, w))
    return th, torch.einsum("yxs,bsvu->byxvu", terms, kp)[:, None]  # (B, 1, ty, tx, k, k)


def _scale_tiles(x: Tensor, factors: Tensor, th: int) -> Tensor:
    """``x`` (B, 1, H, W) times a per-tile factor ``(B, 1, ty, tx)`` (or (B, 1, 1, 1)) on tiles of
    ``th x th`` pixels (the last ones cropped): one pass, one new frame-sized tensor."""
    b, c, h, w = x.shape
    if factors.shape[-2:] == (1, 1):
        return x * factors.to(x.dtype)
    f = factors.to(x.dtype).repeat_interleave(th, -1)[..., :w]  # (B, 1, ty, W)
    if x.requires_grad or f.requires_grad:
        return x * f.repeat_interleave(th, -2)[..., :h, :]
    out = torch.empty_like(x)
    for i in range(f.shape[-2]):  # one tile row at a time, its factors broadcast over the rows
        rows = slice(i * th, min(h, (i + 1) * th))
        torch.mul(x[..., rows, :], f[..., i:i + 1, :], out=out[..., rows, :])
    return out


def _background(theta: Tensor, n_basis: int, spatial_order: int, background_order: int, shape, ref: Tensor,
                factors: bool = False):
    """Differential background (B, 1, H, W) from the solution vector (``factors``: (Y (B, H, n), X (B, n, W))
    with background = Y @ X, so it can be added in place without a frame-sized buffer)."""
    h, w = shape
    _, _, bg = _split_coefficients(theta, n_basis, spatial_order)
    xf = (torch.arange(w, dtype=ref.dtype, device=ref.device) - 0.5 * w) / (0.5 * w)
    yf = (torch.arange(h, dtype=ref.dtype, device=ref.device) - 0.5 * h) / (0.5 * h)
    n = background_order + 1
    cmat = torch.zeros(theta.shape[0], n, n, dtype=ref.dtype, device=ref.device)  # [b, j (y power), i (x power)]
    k = 0
    for i in range(n):
        for j in range(n - i):
            cmat[:, j, i] = bg[:, k].to(ref.dtype)
            k += 1
    ypow = yf[:, None] ** torch.arange(n, device=ref.device)  # (H, n)
    xpow = xf[:, None] ** torch.arange(n, device=ref.device)  # (W, n)
    if factors:
        return ypow.expand(theta.shape[0], h, n), cmat @ xpow.T
    return (ypow @ cmat @ xpow.T)[:, None]


# ----------------------------------------------------------------------------------------------
# Stamps
# ----------------------------------------------------------------------------------------------
def _robust_sky(image: Tensor) -> tuple[Tensor, Tensor]:
    """Median and 1.4826 MAD per batch element (subsampled), (B,) each."""
    b, _, h, w = image.shape
    step = max(1, int(math.sqrt(h * w / 250000)))
    v = image[:, 0, ::step, ::step].reshape(b, -1)
    v = torch.where(torch.isfinite(v), v, torch.nan)
    med = v.nanmedian(1).values
    mad = mad_std(v, 1, ignore_nan=True, center=med[:, None])
    return med, mad.clamp(min=torch.finfo(image.dtype).tiny)


_CLIP_K = 2.0  # the clipped mean of a chi-square(1) variable below k^2 is this fraction of its mean
_CLIP_KEPT = 1.0 - 2.0 * _CLIP_K * math.exp(-0.5 * _CLIP_K ** 2) / math.sqrt(2.0 * math.pi) / math.erf(_CLIP_K / math.sqrt(2.0))


def _clipped_ratio(ratio: Tensor, start: Optional[Tensor] = None, iters: int = 6) -> Tensor:
    """Robust mean of ``d^2 / (V1 + V2)`` per row of ``ratio`` (B, n): from ``start`` (default: the
    median over 0.4549, the median of chi-square(1)), the mean within 2 sigma over its Gaussian
    value (0.7737), ``iters`` times. Stars lift a plain median by the fraction of pixels they touch
    (~7% at GWAC density), this clipped mean ~3%."""
    ok = torch.isfinite(ratio)
    if start is None:
        start = (torch.where(ok, ratio, torch.nan).nanmedian(1).values / 0.45494).nan_to_num(0.0)
    scale = start
    ratio = torch.where(ok, ratio, math.inf)
    for _ in range(iters):
        m = ratio < (_CLIP_K ** 2) * scale[:, None]
        scale = torch.where(m, ratio, 0.0).sum(1) / m.sum(1).clamp(min=1) / _CLIP_KEPT
    return scale


_NOISE_SEGMENT = 256  # pixels of a row over which _noise_model takes the sky gradient as constant


def _sky_pixels(image: Tensor, var: Tensor, nsig: float = 1.0, bin_size: int = 4) -> Tensor:
    """Bool (B, 1, H, W): True on pixels away from sources. A source is where the image binned
    ``bin_size`` x ``bin_size`` exceeds its median by ``nsig`` (robust) sigma over the binned
    variance model, dilated by one bin: a selection on averages, so the noise of the kept pixels is
    hardly truncated."""
    b, _, h, w = image.shape
    k = max(1, min(bin_size, h, w))
    binned = F.avg_pool2d(image.double(), k, k, ceil_mode=True)
    vb = F.avg_pool2d(var.double(), k, k, ceil_mode=True)
    z = (binned - binned.flatten(1).nanmedian(1).values.view(-1, 1, 1, 1)) / vb.clamp(min=1e-300).sqrt()
    zmed = z.flatten(1).nanmedian(1).values.view(-1, 1, 1, 1)
    zsig = mad_std(z.flatten(1), 1, ignore_nan=True, center=zmed.flatten(1)).view(-1, 1, 1, 1)
    src = F.max_pool2d((z - zmed > nsig * zsig).to(image.dtype), 3, 1, 1) > 0
    return ~src.repeat_interleave(k, 2).repeat_interleave(k, 3)[..., :h, :w]


def _lag_ratio(img_rows: dict, var_rows: dict, dx: int, dy: int, start: Optional[Tensor] = None) -> Tensor:
    """(B,) clipped mean of ``d^2 / (V1 + V2)`` over pixel pairs ``(dx, dy)`` apart (rows from
    :func:`_noise_model`: ``img_rows[dy]`` are the sampled rows shifted down by ``dy``)."""
    b = img_rows[0].shape[0]
    a0, v0, a1, v1 = img_rows[0], var_rows[0], img_rows[dy], var_rows[dy]
    if dx > 0:
        a0, v0, a1, v1 = a0[..., :-dx], v0[..., :-dx], a1[..., dx:], v1[..., dx:]
    elif dx < 0:
        a0, v0, a1, v1 = a0[..., -dx:], v0[..., -dx:], a1[..., :dx], v1[..., :dx]
    vs = v0 + v1
    d = a1 - a0
    # a sky gradient adds (gradient . lag) to every difference: remove the median of each row
    # segment of _NOISE_SEGMENT pixels (the gradient is about constant over one; the noise's
    # median over that many differences moves E[d^2] by < 1%, alike at every lag)
    n_seg = max(1, d.shape[-1] // _NOISE_SEGMENT)
    cut = n_seg * (d.shape[-1] // n_seg)
    seg = d[..., :cut].reshape(b, d.shape[1], n_seg, -1)
    d = (seg - seg.nanmedian(-1, keepdim=True).values).reshape(b, d.shape[1], cut)
    vs = vs[..., :cut]
    r = d.square_().div_(vs.clamp(min=1e-300))
    r = torch.where(vs > 0, r, torch.nan)  # (NaN > 0 is False: left-out pairs too)
    return _clipped_ratio(r.reshape(b, -1), start, iters=6 if start is None else 4)



def _noise_model(image: Tensor, var: Tensor, max_lag: int = 2, ref_lag: int = 5,
                 min_rho: float = 0.05, samples: int = 60000, sky: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Measured noise of each frame relative to its variance model, for ``debias``.

    Returns ``(scale, rho)``: ``scale`` (B,) float64 = measured / modelled pixel variance, and
    ``rho`` (B, 2 max_lag + 1, 2 max_lag + 1) the pixel-noise correlation at lags ``|dx|, |dy| <=
    max_lag`` (1 at the centre). Differences ``d`` of pixels a lag apart cancel the sky, and
    their median over each row segment its gradients; ``E[d^2] = (V1 + V2)(1 - rho(lag))`` for noise
    of variance ``V`` with correlation
    ``rho``. At ``ref_lag`` pixels (rows and columns; no correlation left there from resampling or
    stacking kernels) this gives ``scale``: a wrong ``gain`` (0.67 for gain 1.5 given as 1), a
    sky-subtracted frame whose Poisson term is missing, noise-free data (0). At the short lags it
    gives ``rho = 1 - D(lag) / D(ref_lag)``, non-zero for resampled or stacked frames (bilinear
    resampling: up to 0.5 at one pixel); ``|rho| < min_rho`` is set to 0 (stars lift long-lag
    differences a little more than short ones). About ``samples`` pixel pairs per lag, from an
    evenly spaced subsample of rows read once. ``sky`` (bool, like ``image``): only pairs of
    pixels both True there are used (:func:`_sky_pixels`; in crowded fields the stars otherwise
    lift both the scale and the correlations).
    """
    b, _, h, w = image.shape
    dev = image.device
    m = int(max_lag)
    nr = max(1, min(h - ref_lag, samples // max(w, 1) + 1))
    rows = torch.linspace(0, h - 1 - ref_lag, nr, device=dev).round().long().unique()
    offs = sorted(set(range(m + 1)) | {ref_lag})
    img_rows = {dy: image[:, 0].index_select(1, rows + dy).double() for dy in offs}
    var_rows = {dy: var[:, 0].index_select(1, rows + dy).double() for dy in offs}
    if sky is not None:  # pairs with a non-sky pixel get a NaN variance: left out of the statistics
        var_rows = {dy: torch.where(sky[:, 0].index_select(1, rows + dy), v, torch.nan) for dy, v in var_rows.items()}

    ratio_at = partial(_lag_ratio, img_rows, var_rows)

    d_x = ratio_at(ref_lag, 0)
    d_ref = 0.5 * (d_x + ratio_at(0, ref_lag, d_x))
    rho = torch.zeros(b, 2 * m + 1, 2 * m + 1, dtype=torch.float64, device=dev)
    rho[:, m, m] = 1.0
    for dy in range(0, m + 1):
        for dx in range(-m, m + 1):
            if dy == 0 and dx <= 0:
                continue
            r = 1.0 - ratio_at(dx, dy, d_ref) / d_ref.clamp(min=1e-300)
            r = torch.where((r.abs() >= min_rho) & (d_ref > 0), r.clamp(-1.0, 1.0), 0.0)
            rho[:, m + dy, m + dx] = r
            rho[:, m - dy, m - dx] = r
    return d_ref, rho


_NOISE_FREE = 1e-6  # measured / modelled noise variance below this: a noise-free frame, nothing to calibrate


def _default_variance(image: Tensor, gain: float, read_noise: float, calibrate: bool) -> Tensor:
    """The variance model of a frame given without one (see :class:`ImageSubtraction`, ``calibrate_noise``).

    ``poisson_variance`` (HOTPANTS' model). With ``calibrate``: a frame whose sky was removed
    (median below 3 robust sigma, so the model has no sky term) gets the measured sky variance
    (MAD^2) added, and the model is then scaled by the frame's measured pixel noise over the model
    (:func:`_noise_model` at a 5-pixel lag, where resampling leaves no correlation; clipped, so the
    stars hardly count): a resampled frame, whose pixels are averages of several, has less noise
    per pixel than its Poisson model says. Noise-free frames (nothing measured) keep the model.
    """
    var = poisson_variance(image, gain, read_noise)
    if not calibrate:
        return var
    with torch.no_grad():
        med, mad = _robust_sky(image.detach())
        floor = torch.where(med < 3 * mad, mad.square(), torch.zeros_like(mad)).view(-1, 1, 1, 1)
        model = var + floor
        scale = _noise_model(image.detach(), model, max_lag=0, sky=_sky_pixels(image.detach(), model))[0]
        scale = torch.where(torch.isfinite(scale) & (scale > _NOISE_FREE), scale, torch.ones_like(scale))
    return (var + floor) * scale.to(var.dtype).view(-1, 1, 1, 1)


def _correlated_noise_factor(kernel: Tensor, rho: Tensor) -> Tensor:
    """``Var(K (x) n) / (sum K^2 Var n)`` for noise ``n`` with pixel correlation ``rho`` (B, 2m+1, 2m+1):
    ``sum_lag rho(lag) A_K(lag) / A_K(0)`` with ``A_K`` the kernel's autocorrelation (B,). Resampled
    noise (correlated at 1-2 px) convolved by a smooth kernel keeps more variance than its
    per-pixel variance times ``sum K^2``: ignoring it understates the difference's noise."""
    b, k, _ = kernel.shape
    m = (rho.shape[-1] - 1) // 2
    kk = kernel.double().reshape(1, b, k, k)
    ac = F.conv2d(F.pad(kk, (m, m, m, m)), kk.reshape(b, 1, k, k), groups=b)[0]  # (B, 2m+1, 2m+1)
    return (rho.to(ac) * ac).sum((-1, -2)) / ac[:, m, m].clamp(min=1e-300)


def _stamp_cells(h: int, w: int, grid: tuple[int, int], r: int, layout: str):
    """Stamp regions of a ``grid = (rows, columns)`` layout: (origins_y, origins_x, size_y, size_x).

    ``"grid"``: the cells tile the frame (``ceil(H / rows)`` x ``ceil(W / columns)``).
    ``"hotpants"``: HOTPANTS' stamps (``main.c``): square regions of ``min(H / rows, W / columns) -
    (2r + 1)`` pixels (made odd) starting at ``floor(k H / rows)``, so neighbouring stamps are separated
    by about a kernel width and a star between two stamps is not used.
    """
    ny, nx = grid
    if layout == "grid":
        sh, sw = -(-h // ny), -(-w // nx)
        return [c * sh for c in range(ny)], [c * sw for c in range(nx)], sh, sw
    fw = min(h // ny, w // nx) - (2 * r + 1)
    fw -= 1 if fw % 2 == 0 else 0
    fw = max(fw, 1)
    return [c * h // ny for c in range(ny)], [c * w // nx for c in range(nx)], fw, fw


def _cell_sky(image: Tensor, bad: Tensor, oy, ox, sh: int, sw: int, samples: int = 2048) -> tuple[Tensor, Tensor]:
    """Median and 1.4826 MAD of every stamp region, (B, R) each (R = cells, row-major), from a strided
    subsample of about ``samples`` pixels a region, bad and non-finite pixels left out (a region with
    none left gets NaN). Per region, as HOTPANTS' stamp statistics: a sky gradient across the frame
    would inflate one frame-wide noise estimate and raise the stamp-star threshold everywhere."""
    b, _, h, w = image.shape
    dev = image.device
    step = max(1, int(math.sqrt(sh * sw / samples)))
    rows = torch.tensor(oy, device=dev)[:, None] + torch.arange(0, sh, step, device=dev)  # (ny, ns)
    cols = torch.tensor(ox, device=dev)[:, None] + torch.arange(0, sw, step, device=dev)  # (nx, ms)
    ri, ci = rows.clamp(max=h - 1)[:, :, None, None], cols.clamp(max=w - 1)[None, None]
    v = image[:, 0][:, ri, ci]  # (B, ny, ns, nx, ms)
    out = bad[:, 0][:, ri, ci] | ~torch.isfinite(v) | (rows >= h)[:, :, None, None] | (cols >= w)[None, None]
    v = torch.where(out, torch.nan, v).permute(0, 1, 3, 2, 4).reshape(b, len(oy) * len(ox), -1)
    med = v.nanmedian(-1).values
    mad = mad_std(v, -1, ignore_nan=True, center=med[..., None])
    return med, mad.clamp(min=torch.finfo(image.dtype).tiny)


def _find_candidates(det: Tensor, bad: Tensor, grid: tuple[int, int], half: int, iso: int, threshold: float,
                     per_cell: int, block: int = 8, pool: int = 32, border: Optional[int] = None,
                     layout: str = "grid", r: int = 0):
    """Candidate stamp centres: (y, x, valid) each (B, R, K), R = cells, K = per_cell, best first.

    A pixel qualifies when it is above ``sky + threshold sigma`` (the median and robust sigma of its
    stamp region, :func:`_cell_sky`), no bad pixel lies within ``half``
    (tested on ``block``-pixel blocks, so conservatively by up to ``block - 1`` more pixels), it lies
    at least ``border`` (default ``half``) from the frame edges, inside a stamp region of ``layout``
    (:func:`_stamp_cells`), and it is the maximum within ``+-iso`` (isolation).

    Work on few pixels: the frame is reduced to the maxima of ``bs x bs`` blocks, ``bs = min(8,
    iso + 1)`` (two pixels of one block are within ``iso`` of each other, so only a block maximum can
    be an isolated maximum: no candidate is lost); the tests run on the block maxima, which are
    ranked per cell by one sort, and only the ``pool`` brightest of each cell get the ``+-iso``
    local-maximum test.
    """
    b, _, h, w = det.shape
    dev = det.device
    border = half if border is None else int(border)
    # near-bad map on blocks: any bad pixel in a block, dilated by ceil(half / block) blocks
    hb, wb = -(-h // block), -(-w // block)
    bp = torch.zeros(b, hb * block, wb * block, dtype=torch.bool, device=dev)
    bp[:, :h, :w] = bad[:, 0]
    coarse = bp.view(b, hb, block, wb, block).any(4).any(2)
    del bp
    nb = -(-half // block)
    coarse = grow_mask(coarse[:, None], nb)[:, 0]
    # maxima of bs x bs blocks, with their flat positions (one pass over the frame)
    bs = max(1, min(8, iso + 1))
    d2 = det[:, :1]
    if h % bs or w % bs:
        d2 = F.pad(d2, (0, -w % bs, 0, -h % bs), value=-torch.inf)
    val, flat = F.max_pool2d(d2, bs, bs, return_indices=True)  # (B, 1, H/bs, W/bs)
    del d2
    wp = w + (-w % bs)
    y, x = (flat // wp).clamp(max=h - 1), (flat % wp).clamp(max=w - 1)  # padding blocks are -inf anyway
    y, x, val = y.reshape(b, -1), x.reshape(b, -1), val.reshape(b, -1)
    ny, nx = grid
    oy, ox, sh, sw = _stamp_cells(h, w, grid, r, layout)
    oyt = torch.tensor(oy, device=dev)
    oxt = torch.tensor(ox, device=dev)
    cy = (torch.searchsorted(oyt, y.contiguous(), right=True) - 1).clamp(0, ny - 1)
    cx = (torch.searchsorted(oxt, x.contiguous(), right=True) - 1).clamp(0, nx - 1)
    csky, csig = _cell_sky(det, bad, oy, ox, sh, sw)
    thr = (csky + threshold * csig).gather(1, cy * nx + cx)  # NaN (never passes) in an all-bad region
    ok = torch.isfinite(val) & (val > thr)
    ok &= (y >= border) & (y < h - border) & (x >= border) & (x < w - border)
    ok &= ~coarse.reshape(b, -1).gather(1, (y // block) * wb + x // block)
    ok &= (y - oyt[cy] < sh) & (x - oxt[cx] < sw)
    # rank per cell: sort by value (descending), then stably by cell id; invalid ones go last
    nr = ny * nx
    cid = torch.where(ok, torch.arange(b, device=dev).view(-1, 1) * nr + cy * nx + cx, b * nr).reshape(-1)
    order = torch.sort(torch.where(ok, val, -torch.inf).reshape(-1), descending=True, stable=True).indices
    order = order[torch.sort(cid[order], stable=True).indices]
    cs = cid[order]
    counts = torch.bincount(cs, minlength=b * nr + 1)
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(cs.numel(), device=dev) - start[cs]
    keep = (rank < pool) & (cs < b * nr)
    slot = torch.where(keep, cs * pool + rank, b * nr * pool)  # the last slot collects the rest
    pv = val.new_full((b * nr * pool + 1,), -torch.inf).scatter_(0, slot, torch.where(keep, val.reshape(-1)[order], -torch.inf))
    py = y.new_full((b * nr * pool + 1,), h // 2).scatter_(0, slot, torch.where(keep, y.reshape(-1)[order], h // 2))
    px = x.new_full((b * nr * pool + 1,), w // 2).scatter_(0, slot, torch.where(keep, x.reshape(-1)[order], w // 2))
    val, y, x = pv[:-1].view(b, nr, pool), py[:-1].view(b, nr, pool), px[:-1].view(b, nr, pool)
    finite = torch.isfinite(val)
    # local maximum within +-iso (bad pixels count as -inf); iso <= half so the cutout is inside
    win = _cut(det, y, x, iso).flatten(-2)
    win = torch.where(_cut(bad, y, x, iso).flatten(-2), -torch.inf, win)
    is_max = finite & (win.amax(-1) <= val)
    key = torch.where(is_max, val, torch.full_like(val, -torch.inf))
    kv, order = key.topk(min(per_cell, key.shape[-1]), dim=-1)
    valid = torch.isfinite(kv)
    y = torch.where(valid, y.gather(-1, order), torch.full_like(order, h // 2))
    x = torch.where(valid, x.gather(-1, order), torch.full_like(order, w // 2))
    return y, x, valid


def _cut(image: Tensor, y: Tensor, x: Tensor, half: int) -> Tensor:
    """Cutouts (B, R, K, 2h+1, 2h+1) of image (B, 1, H, W) around integer centres (B, R, K)."""
    b = image.shape[0]
    o = torch.arange(-half, half + 1, device=image.device)
    rows = y[..., None, None] + o[:, None]
    cols = x[..., None, None] + o[None, :]
    bi = torch.arange(b, device=image.device).view(b, 1, 1, 1, 1)
    return image[:, 0][bi, rows, cols]


def _fwhm(cut: Tensor, sky: Tensor) -> Tensor:
    """Half-maximum-area FWHM ``2 sqrt(A / pi)`` of cutouts (..., L, L) centred on stars -> (...).

    ``A`` counts the pixels above half the (sky-subtracted) central peak; unlike second moments it
    is insensitive to noise in the wings.
    """
    length = cut.shape[-1]
    c = length // 2
    v = cut - sky
    peak = v[..., c - 1:c + 2, c - 1:c + 2].amax((-1, -2))
    area = (v > 0.5 * peak[..., None, None]).sum((-1, -2)).to(cut.dtype)
    return 2.0 * (area / math.pi).sqrt()


def _sigma_clip(values: Tensor, keep: Tensor, nsig: float, iters: int = 10,
                robust_start: bool = False) -> tuple[Tensor, Tensor]:
    """Masked iterative sigma-clipped mean and std along the last axis -> (..,) each.

    ``robust_start``: the first cut is about the median with the 1.4826 MAD scale (when > 0).
    Started from the plain mean and std, one outlier among n values can never be more than
    (n-1)/sqrt(n) std away (2.67 for the 9 stamps of a 3x3 grid, so a 3-sigma clip keeps any
    outlier). The following iterations use the mean and std of the kept values, as HOTPANTS.
    """
    m = keep.clone()
    if robust_start:
        v = torch.where(keep, values, torch.nan)
        med = v.nanmedian(-1).values
        mad = mad_std(v, -1, ignore_nan=True, center=med[..., None])
        start = keep & ((values - med[..., None]).abs() <= nsig * mad[..., None])
        m = torch.where((mad > 0)[..., None], start, keep)
    mean = std = None
    for _ in range(iters):
        n = m.sum(-1).clamp(min=1)
        mean = torch.where(m, values, 0).sum(-1) / n
        var = torch.where(m, (values - mean[..., None]) ** 2, 0).sum(-1) / (n - 1).clamp(min=1)
        std = var.sqrt()
        m = keep & ((values - mean[..., None]).abs() <= nsig * std[..., None] + 1e-30)
    return mean, std


def _solve(mat: Tensor, rhs: Tensor) -> Tensor:
    """Solve symmetric positive (semi)definite systems (..., M, M).

    Jacobi-scaled (unit diagonal) with a 1e-12 ridge, so that columns of very different scales
    (kernel terms ~ counts, background terms ~ 1) stay well conditioned.
    """
    diag = mat.diagonal(dim1=-2, dim2=-1)
    d = diag.abs().clamp(min=1e-300).rsqrt()
    scaled = mat * d[..., :, None] * d[..., None, :]
    eye = torch.eye(mat.shape[-1], dtype=mat.dtype, device=mat.device)
    sol = torch.linalg.solve(scaled + 1e-12 * eye, (rhs * d).unsqueeze(-1)).squeeze(-1)
    return sol * d


def _debiased_solve(g: Tensor, gn: Tensor, rhs: Tensor, mu0: float = 2.0) -> Tensor:
    """Solve ``(G - Gn) theta = rhs`` where ``Gn`` (PSD) is the expected noise part of ``G``,
    shrinking the correction where the data do not determine the solution.

    In the metric of the noise (``Gn = L L^T``) the normal matrix has eigenvalues ``mu >= 1`` in
    expectation (1 = noise only). Full errors-in-variables correction maps ``mu -> mu - 1``: fine
    where the signal dominates, but it divides by ~0 (and flips signs) in directions that hold
    mostly noise, which turns the correction into noise amplification. Here ``mu -> mu - 1`` for
    ``mu >= mu0`` and ``mu (1 - 1 / mu0)`` below (continuous at ``mu0``), so no direction of the
    solution is amplified by more than ``mu0 / (mu0 - 1)`` (2x for the default) and the corrected
    system stays positive definite. The cap trades bias for noise: on simulated GWAC pairs
    (1024^2) the constant-star residual the fit leaves is +0.05 sigma with ``mu0 = 2``, +0.02 with
    1.25 and +0.06 with 3; on the SFFT DECam stacks (16 stamps, correlated noise) the difference's
    robust std is +6%, +13% and +4% above the plain fit's. Columns without
    noise (background terms) keep their ``mu`` ~ infinity and are untouched. One symmetric
    eigen-decomposition of the (M, M) system per frame.
    """
    diag = g.diagonal(dim1=-2, dim2=-1).abs().clamp(min=1e-300)
    d = diag.rsqrt()
    gs = g * d[..., :, None] * d[..., None, :]
    gns = gn * d[..., :, None] * d[..., None, :]
    eye = torch.eye(g.shape[-1], dtype=g.dtype, device=g.device)
    chol, info = torch.linalg.cholesky_ex(gns + 1e-9 * eye)
    if bool((info > 0).any()):  # one host sync; only when the noise model is not a covariance
        # (e.g. correlations measured on a frame with structure left): its nearest PSD matrix
        lam, q = torch.linalg.eigh(0.5 * (gns + gns.transpose(-1, -2)))
        gns = (q * lam.clamp(min=0.0).unsqueeze(-2)) @ q.transpose(-1, -2)
        chol = torch.linalg.cholesky(0.5 * (gns + gns.transpose(-1, -2)) + 1e-9 * eye)
    a = torch.linalg.solve_triangular(chol, gs, upper=False)
    a = torch.linalg.solve_triangular(chol, a.transpose(-1, -2), upper=False)  # L^-1 G L^-T
    mu, vec = torch.linalg.eigh(0.5 * (a + a.transpose(-1, -2)))
    f = torch.where(mu >= mu0, mu - 1.0, mu * (1.0 - 1.0 / mu0))
    # corrected G = L V f V^T L^T, formed explicitly and solved like the plain system (unit
    # diagonal + the same ridge): directions without data (too few stamps for the spatial terms)
    # then get the plain solve's treatment instead of a division by ~0
    lv = chol @ vec
    corrected = (lv * f.unsqueeze(-2)) @ lv.transpose(-1, -2)
    corrected = 0.5 * (corrected + corrected.transpose(-1, -2))
    sol = torch.linalg.solve(corrected + 1e-12 * eye, (rhs * d).unsqueeze(-1)).squeeze(-1)
    return sol * d


# ----------------------------------------------------------------------------------------------
# Functional core
# ----------------------------------------------------------------------------------------------
def _pair(value: Pair, name: str):
    if value is None:
        return (None, None)
    if isinstance(value, (int, float)):
        return (float(value), float(value))
    v = tuple(float(a) for a in value)
    if len(v) != 2:
        raise ValueError(f"{name} must be a number or a (science, template) pair, got {value!r}")
    return v


class _Stamps(NamedTuple):
    y: Tensor  # (B, R, K)
    x: Tensor
    valid: Tensor
    design: Tensor  # (B, R, K, C, P) C = N + Nbg, in the images' dtype
    target: Tensor  # (B, R, K, P)
    weight: Tensor  # (B, R, K, P)
    var_t: Tensor
    var_a: Tensor
    spatial: Tensor  # (B, R, K, S)
    var_a_ext: Optional[Tensor] = None  # (B, R, K, L, L) variance of the image to convolve, L = 2(half + r) + 1


def _noise_normal(st: _Stamps, kernels: Tensor, n_bg: int, rho: Optional[Tensor] = None) -> Tensor:
    """Expected contribution of the convolved image's own noise to the normal matrices.

    The design columns are ``A (x) K_n`` with ``A`` noisy; for pixel noise of variance ``V`` and
    correlation ``rho`` their weighted products have expectation
    ``sum_p w(p) sum_q sum_d K_n(q) K_m(q + d) V(p - q) rho(d)`` on top of the noise-free value
    (``rho`` = delta for white noise: ``sum_p w(p) sum_q K_n(q) K_m(q) V(p - q)``). Left in, this
    term shrinks the fitted kernel toward a smoother one (errors-in-variables attenuation: peaks of
    the convolved stars too low). ``rho``: (B, L, L) from :func:`_noise_model` or None (white).
    Returns (B, R, K, C, C) with zeros in the background rows/columns.
    """
    b, nr, kc, p = st.weight.shape
    ln = st.var_a_ext.shape[-1]
    side = math.isqrt(p)
    n, k, _ = kernels.shape
    s = b * nr * kc
    # (S, k, k): sum_p w(p) V(p - q) at K[q], a "valid" cross-correlation of each stamp's extended
    # variance with its weights, by FFT (a grouped conv2d with 31x31 kernels is ~8x slower on CPU)
    nf = 1 << (ln - 1).bit_length()  # >= ln: the lags 0..k-1 read no wrapped-around pixels
    vf = torch.fft.rfft2(st.var_a_ext.reshape(s, ln, ln), s=(nf, nf))
    wf = torch.fft.rfft2(st.weight.reshape(s, side, side), s=(nf, nf))
    cq = torch.fft.irfft2(vf * wf.conj(), s=(nf, nf))[:, :k, :k].flip(-1, -2)
    kk = kernels.to(cq.dtype).reshape(n, k * k)
    if rho is None:
        corr = (kk[None] * cq.reshape(s, 1, k * k)) @ kk.T  # (S, N, N)
    else:
        lr = rho.shape[-1]
        # K_m smoothed by the (symmetric) noise correlation: sum_d rho(d) K_m(q + d), per frame
        kr = F.conv2d(kernels.to(cq.dtype).repeat(b, 1, 1).reshape(1, b * n, k, k),
                      rho.to(cq.dtype).repeat_interleave(n, 0).unsqueeze(1), padding=lr // 2, groups=b * n)
        kr = kr.reshape(b, 1, n, k * k)
        corr = (kk[None] * cq.reshape(s, 1, k * k)).reshape(b, nr * kc, n, k * k) @ kr.transpose(-1, -2)
        corr = 0.5 * (corr + corr.transpose(-1, -2))
        corr = corr.reshape(s, n, n)
    out = corr.new_zeros(s, n + n_bg, n + n_bg)
    out[:, :n, :n] = corr
    return out.view(b, nr, kc, n + n_bg, n + n_bg)


def _build_stamps(conv_img, target, var_conv, var_target, y, x, valid, basis, spatial_order, background_order, shape,
                  half, fit_dtype, ped_a, ped_t):
    r = basis.half_width
    b, nr, kc = y.shape
    cut_a = _cut(conv_img, y, x, half + r) - ped_a.view(-1, 1, 1, 1, 1)
    p = (2 * half + 1) ** 2
    design_k = _convolve_stamps(cut_a.reshape(-1, cut_a.shape[-2], cut_a.shape[-1]), basis)
    design_k = design_k.reshape(b, nr, kc, -1, p)
    o = torch.arange(-half, half + 1, device=y.device)
    py = (y[..., None, None] + o[:, None]).to(conv_img.dtype).expand(b, nr, kc, 2 * half + 1, 2 * half + 1)
    px = (x[..., None, None] + o[None, :]).to(conv_img.dtype).expand(b, nr, kc, 2 * half + 1, 2 * half + 1)
    bgt = spatial_terms(px, py, background_order, shape).reshape(b, nr, kc, p, -1).movedim(-1, -2)
    design = torch.cat([design_k, bgt], 3)  # image dtype (as computed); upcast to fit_dtype where used
    t = (_cut(target, y, x, half) - ped_t.view(-1, 1, 1, 1, 1)).reshape(b, nr, kc, p).to(fit_dtype)
    vt = _cut(var_target, y, x, half).reshape(b, nr, kc, p).to(fit_dtype)
    va = _cut(var_conv, y, x, half).reshape(b, nr, kc, p).to(fit_dtype)
    wgt = (1.0 / (vt + va).clamp(min=1e-30)) * valid[..., None].to(fit_dtype)
    sp = spatial_terms(x.to(fit_dtype), y.to(fit_dtype), spatial_order, shape)
    va_ext = _cut(var_conv, y, x, half + r).to(fit_dtype)
    return _Stamps(y, x, valid, design, t, wgt, vt, va, sp, va_ext)


def _normal_equations(st: _Stamps, chunk: int = 32) -> tuple[Tensor, Tensor]:
    """Per-stamp weighted normal matrices (B, R, K, C, C) and right-hand sides (B, R, K, C) in the
    fit dtype, upcasting the design ``chunk`` stamps at a time (no design-sized float64 copy)."""
    b, nr, kc, c, p = st.design.shape
    design = st.design.reshape(-1, c, p)
    wgt = st.weight.reshape(-1, 1, p)
    tgt = st.target.reshape(-1, p, 1)
    fd = st.target.dtype
    normal = tgt.new_empty(design.shape[0], c, c)
    rhs = tgt.new_empty(design.shape[0], c)
    for i in range(0, design.shape[0], chunk):
        d = design[i:i + chunk].to(fd)
        dw = d * wgt[i:i + chunk]
        normal[i:i + chunk] = dw @ d.transpose(-1, -2)
        rhs[i:i + chunk] = (dw @ tgt[i:i + chunk]).squeeze(-1)
    return normal.view(b, nr, kc, c, c), rhs.view(b, nr, kc, c)


def _expand(sp: Tensor, n_basis: int, n_bg: int) -> Tensor:
    """Per-stamp map E (.., C, M) from the global solution to compact per-stamp coefficients."""
    lead = sp.shape[:-1]
    ns = sp.shape[-1]
    m = 1 + (n_basis - 1) * ns + n_bg
    c = n_basis + n_bg
    e = sp.new_zeros(*lead, c, m)
    e[..., 0, 0] = 1.0
    eye = torch.eye(n_basis - 1, dtype=sp.dtype, device=sp.device)
    blk = (eye[:, :, None] * sp[..., None, None, :]).reshape(*lead, n_basis - 1, (n_basis - 1) * ns)
    e[..., 1:n_basis, 1:1 + (n_basis - 1) * ns] = blk
    e[..., n_basis:, 1 + (n_basis - 1) * ns:] = torch.eye(n_bg, dtype=sp.dtype, device=sp.device)
    return e


def _cat_stamps(a: _Stamps, b: _Stamps) -> _Stamps:
    """Concatenate two stamp systems along the candidate axis (dim 2)."""
    return _Stamps(*[torch.cat([u, v], 2) for u, v in zip(a, b)])


def _stamp_systems(part: _Stamps, *, n_basis: int, n_bg: int, kernels: Optional[tuple[Tensor, Tensor]]):
    """Per-stamp pieces of the fit: normal matrices and right-hand sides, the individually fitted
    kernel sums (constant kernel + constant background, HOTPANTS check_stamps), the spatial
    expansion ``u`` (B, R, K, C, S) and the expected noise part of the normal matrices (empty
    without ``kernels``)."""
    c = part.design.shape[3]
    normal, rhs = _normal_equations(part)
    noise = _noise_normal(part, kernels[0], n_bg, kernels[1]) if kernels is not None else normal[..., :0, :0]
    sub = list(range(n_basis + 1))
    ksum = _solve(normal[..., sub, :][..., sub], rhs[..., sub])[..., 0]
    ns_ = part.spatial.shape[-1]
    u = part.spatial.new_zeros(*part.spatial.shape[:3], c, ns_)
    u[..., 1:n_basis, :] = part.spatial[..., None, :]
    u[..., 0, 0] = 1.0
    u[..., n_basis:, 0] = 1.0
    return normal, rhs, ksum, u, noise


def _stamp_merit(st: _Stamps, beta: Tensor, pc: Tensor, k2: Tensor) -> Tensor:
    """(B, R) figure of merit ``<r^2 / var>`` of the selected stamps (HOTPANTS ``-fom v``) for the
    per-stamp coefficients ``beta`` (B, R, C); ``k2`` (B,) ~ ``sum K^2`` scales the convolved image's variance."""
    b, nr = pc.shape
    ar_b = torch.arange(b, device=pc.device)[:, None]
    ar_r = torch.arange(nr, device=pc.device)[None, :]
    d = st.design[ar_b, ar_r, pc].to(st.target.dtype)
    model = (beta[..., None, :] @ d).squeeze(-2)
    resid = st.target[ar_b, ar_r, pc] - model
    var = st.var_t[ar_b, ar_r, pc] + k2.view(-1, 1, 1) * st.var_a[ar_b, ar_r, pc]
    return (resid ** 2 / var.clamp(min=1e-30)).mean(-1)


def _fit(st: _Stamps, n_basis: int, n_bg: int, clip_sigma: float, max_iterations: int, k0sq: float,
         kernels: Optional[tuple[Tensor, Tensor]] = None, valid: Optional[Tensor] = None, build=None,
         stat_sigma: float = 3.0):
    """Weighted least squares with HOTPANTS' stamp rejection.

    ``st`` holds the stamp systems of the first candidates of every cell (candidate axis of any
    length); ``valid`` (B, R, K) flags all K candidates and ``build(k0, k1)`` returns the systems of
    candidates ``k0:k1``: they are built only when a rejection reaches them (one host sync). Returns
    theta (B, M), the final selection (act, pc), the per-stamp kernel sums, the merits and ``st``.
    """
    b, nr, built, c, p = st.design.shape
    avail = st.valid if valid is None else valid
    kc = avail.shape[2]

    systems = partial(_stamp_systems, n_basis=n_basis, n_bg=n_bg, kernels=kernels)

    normal, rhs, ksum_ind, u_all, noise_all = systems(st)
    ptr = torch.zeros(b, nr, dtype=torch.long, device=st.design.device)
    ar_b = torch.arange(b, device=ptr.device)[:, None]
    ar_r = torch.arange(nr, device=ptr.device)[None, :]

    def ensure():
        nonlocal st, normal, rhs, ksum_ind, u_all, noise_all, built
        need = min(int(ptr.max()), kc - 1) + 1  # host sync
        if need > built and build is not None:
            part = build(built, need)
            n2, r2, k2, u2, z2 = systems(part)
            st = _cat_stamps(st, part)
            normal, rhs = torch.cat([normal, n2], 2), torch.cat([rhs, r2], 2)
            ksum_ind, u_all = torch.cat([ksum_ind, k2], 2), torch.cat([u_all, u2], 2)
            noise_all = torch.cat([noise_all, z2], 2)
            built = need

    def active():
        ok = ptr < kc
        pc = ptr.clamp(max=min(kc, built) - 1)
        return ok & avail[ar_b, ar_r, pc] & (ptr < built), pc

    act, pc = active()
    ks = ksum_ind[ar_b, ar_r, pc]
    kmean, kstd = _sigma_clip(ks, act, stat_sigma)
    bad = act & ((ks - kmean[:, None]).abs() > clip_sigma * kstd[:, None])
    ptr = ptr + bad.long()
    ensure()
    # The global system is G = sum_stamps E^T N E with E = blockdiag(1, I (x) s^T, I): assembled in
    # the (C, S) "every compact coefficient times every spatial term" space as
    # G[(a, s), (b, t)] = sum_r N_r[a, b] u_r[a, s] u_r[b, t] (R C^2 S^2 operations instead of R C M^2),
    # then the M used (a, s) pairs are picked (``idx``).
    ns = st.spatial.shape[-1]
    idx = torch.tensor([0] + [a * ns + t for a in range(1, n_basis) for t in range(ns)]
                       + [(n_basis + k) * ns for k in range(n_bg)], device=st.design.device)
    def assemble(per_stamp: Tensor, u: Tensor) -> Tensor:  # (B, R, C, C) -> global (B, M, M)
        return torch.einsum("zrac,zras,zrct->zasct", per_stamp, u, u).reshape(b, c * ns, c * ns)[:, idx][:, :, idx]

    theta = g = hvec = u = None
    merit = None
    n_iter = max(1, int(max_iterations))
    for it in range(n_iter + 1):  # the extra pass only re-solves after a last rejection
        act, pc = active()
        u = u_all[ar_b, ar_r, pc]  # (B, R, C, S)
        nm = normal[ar_b, ar_r, pc] * act.to(normal.dtype)[..., None, None]
        rv = rhs[ar_b, ar_r, pc] * act.to(normal.dtype)[..., None]
        g = assemble(nm, u)
        hvec = torch.einsum("zra,zras->zas", rv, u).reshape(b, c * ns)[:, idx]
        theta = _solve(g, hvec)
        full = theta.new_zeros(b, c * ns).index_copy_(1, idx, theta).view(b, 1, c, ns)
        merit = _stamp_merit(st, (u * full).sum(-1), pc, theta[:, 0] ** 2 * k0sq)
        if it == n_iter:
            break
        # robust start: a stamp with a transient or a bad pixel has a merit >> 1 and must not hide
        # itself by inflating the std (the kernel-sum clip above stays HOTPANTS' plain one: the
        # individual kernel sums of faint stamps scatter with heavy tails)
        mmean, mstd = _sigma_clip(merit, act, stat_sigma, robust_start=True)
        reject = act & ((merit - mmean[:, None]) > clip_sigma * mstd[:, None])
        if not bool(reject.any()):  # data-dependent stop (one host sync): HOTPANTS' check_again loop
            break
        ptr = ptr + reject.long()
        ensure()
    act, pc = active()  # the selection the last (g, hvec, u) were assembled for: nothing moved since
    if kernels is not None:  # errors-in-variables correction of the final system only (see _debiased_solve)
        gn = assemble(noise_all[ar_b, ar_r, pc] * act.to(normal.dtype)[..., None, None], u)
        # only where the stamps over-determine the spatial terms: with no more stamps than terms the
        # data cannot tell noise from signal in whole directions and the plain fit is kept
        enough = (act.sum(1) > ns).view(-1, 1)
        theta = torch.where(enough, _debiased_solve(g, gn, hvec), theta)
    return theta, act, pc, ksum_ind, merit, st


def _check_subtraction_inputs(science, template, science_var, template_var, science_mask, template_mask):
    """Entry checks of :func:`image_subtraction`: shapes, dtypes, masks, variance shapes and signs.
    Returns the checked masks ``(smask, tmask)``."""
    check_image(science, "science", channels=1)
    check_image(template, "template", channels=1)
    check_same_shape(science, template, "science", "template")
    smask = check_mask(science_mask, science, "science_mask")
    tmask = check_mask(template_mask, template, "template_mask")
    check_float_dtype(science, "science")
    check_float_dtype(template, "template")
    check_batch_nonempty(science, "science")
    for var, name, like, m in ((science_var, "science_var", science, smask), (template_var, "template_var", template, tmask)):
        if var is None:
            continue
        check_image(var, name, channels=1)
        check_same_shape(like, var, name.split("_")[0], name)
        check_float_dtype(var, name)
        neg = var < 0
        if m is not None:
            neg = neg & ~m
        if bool(neg.any()):
            raise ValueError(f"{name} has {int(neg.sum())} negative value(s) outside the mask: a variance is >= 0 "
                             "(pass a variance map in ADU^2, or mask those pixels)")
    return smask, tmask


def _no_stamp_reason(science, template, smask, tmask, bad, which) -> str:
    """Why no stamp star was found, in words (the error path only)."""
    i = which[0]
    if bool(bad[i].all()):
        return "every pixel is masked, NaN, infinite, saturated or below lower_limit (an empty frame, or no overlap)"
    for img, m, name in ((science, smask, "science"), (template, tmask, "template")):
        nf = ~torch.isfinite(img[i])
        if m is not None:
            nf &= ~m[i]
        n = int(nf.sum())
        if n:
            return (f"{name} has {n} NaN or infinite pixel(s) ({100 * n / nf.numel():.2g}%) outside its mask, and "
                    "stamps touching a bad pixel are not used: mask or repair them")
    return (f"{100 * float(bad[i].float().mean()):.3g}% of the pixels are bad; lower stamp_threshold, check "
            "saturation/masks, or pass stamp_positions")


def _variances(science, template, science_var, template_var, gain, read_noise, calibrate: bool):
    """The given variance maps, or :func:`_default_variance` for those not given."""
    g_s, g_t = _pair(gain, "gain")
    rn_s, rn_t = _pair(read_noise, "read_noise")
    if science_var is None:
        science_var = _default_variance(science, g_s, rn_s, calibrate)
    if template_var is None:
        template_var = _default_variance(template, g_t, rn_t, calibrate)
    return science_var, template_var


def _check_subtraction_options(stat_sigma, convolve, normalize, stamp_layout, variance_convolution, spatial_order,
                               background_order) -> None:
    """Entry checks of :func:`image_subtraction`'s option values."""
    if not stat_sigma > 0:
        raise ValueError(f"stat_sigma must be positive, got {stat_sigma!r}")
    if convolve not in ("auto", "template", "science"):
        raise ValueError(f"convolve must be 'auto', 'template' or 'science', got {convolve!r}")
    if normalize not in ("science", "template"):
        raise ValueError(f"normalize must be 'science' or 'template', got {normalize!r}")
    if stamp_layout not in ("hotpants", "grid"):
        raise ValueError(f"stamp_layout must be 'hotpants' or 'grid', got {stamp_layout!r}")
    if variance_convolution not in ("fft", "local"):
        raise ValueError(f"variance_convolution must be 'fft' or 'local', got {variance_convolution!r}")
    if spatial_order < 0 or background_order < 0:
        raise ValueError("spatial_order and background_order must be >= 0")


def _bad_stamp_pixels(science, template, smask, tmask, science_var, template_var, given_s: bool, given_t: bool,
                      saturation: tuple, lower_limit: tuple) -> Tensor:
    """Pixels no stamp may touch: masked | non-finite (image or given variance) | saturated | below the
    lower limit, in either image (``|=`` in place: few passes)."""
    sat_s, sat_t = saturation
    lo_s, lo_t = lower_limit
    bad_s = bad_pixels(science, smask)
    bad_t = bad_pixels(template, tmask)
    if given_s:
        if not all_finite(science_var):
            bad_s |= ~torch.isfinite(science_var)
    if given_t:
        if not all_finite(template_var):
            bad_t |= ~torch.isfinite(template_var)
    if sat_s is not None:
        bad_s |= science >= sat_s
    if sat_t is not None:
        bad_t |= template >= sat_t
    if lo_s is not None:
        bad_s |= science <= lo_s
    if lo_t is not None:
        bad_t |= template <= lo_t
    return bad_s.logical_or_(bad_t)


def _given_stamp_positions(stamp_positions, b: int, h: int, w: int, lim: int, device):
    """Stamp centres the caller gave (HOTPANTS ``-ssf``) as the candidates' ``(y, x, valid)``
    (B, R, 1); those closer than ``lim`` to an edge are invalid (and parked at the frame centre)."""
    pos = torch.as_tensor(stamp_positions, device=device).round().long()
    if pos.dim() == 2:
        pos = pos.expand(b, -1, -1)
    if pos.dim() != 3 or pos.shape[0] != b or pos.shape[-1] != 2:
        raise ValueError(f"stamp_positions must be shaped (R, 2) or (B, R, 2) of (x, y), got {tuple(pos.shape)}")
    x, y = pos[..., 0:1], pos[..., 1:2]
    valid = (x >= lim) & (x < w - lim) & (y >= lim) & (y < h - lim)
    x = torch.where(valid, x, torch.full_like(x, w // 2))
    y = torch.where(valid, y, torch.full_like(y, h // 2))
    return y, x, valid


def _convolve_science(convolve: str, science, template, y, x, valid, half: int, sky_s, sky_t) -> Tensor:
    """(B,) bool: True where the science frame is the one to convolve (``"auto"``: the sharper of
    the two by the median FWHM of the stamp candidates)."""
    if convolve != "auto":
        return torch.full((science.shape[0],), convolve == "science", dtype=torch.bool, device=science.device)
    f_t = _fwhm(_cut(template.detach(), y, x, half), sky_t[0].view(-1, 1, 1, 1, 1))
    f_s = _fwhm(_cut(science.detach(), y, x, half), sky_s[0].view(-1, 1, 1, 1, 1))
    nan = torch.full_like(f_t, torch.nan)
    ft = torch.where(valid, f_t, nan).flatten(1).nanmedian(1).values
    fs = torch.where(valid, f_s, nan).flatten(1).nanmedian(1).values
    return fs < ft


class _Candidates(NamedTuple):
    """Stamp candidates (B, R, K) and the direction of the convolution."""

    y: Tensor
    x: Tensor
    valid: Tensor
    conv_sci: Tensor  # (B,) bool: convolve the science frame
    sky_s: tuple  # (median, robust sigma) of the science frame
    sky_t: tuple  # the same for the template


@torch.no_grad()
def _stamp_candidates(science, template, smask, tmask, science_var, template_var, given: tuple, saturation: tuple,
                      lower_limit: tuple, stamp_positions, grid, half: int, r: int, stamp_threshold: float,
                      stars_per_cell: int, stamp_layout: str, convolve: str) -> _Candidates:
    """Choose the stamp candidates (without gradient) and which image to convolve; raise when a
    batch element has no usable stamp star (one host sync: refuse rather than return a garbage fit)."""
    b, _, h, w = science.shape
    bad = _bad_stamp_pixels(science, template, smask, tmask, science_var, template_var, given[0], given[1],
                            saturation, lower_limit)
    sky_t = _robust_sky(template.detach())  # (median, robust sigma) of each frame, computed once
    sky_s = _robust_sky(science.detach())
    if stamp_positions is None:
        # HOTPANTS flags a frame border of half + r and wants the whole +-half box clear of it
        border = 2 * half + r if stamp_layout == "hotpants" else half + r
        y, x, valid = _find_candidates(template.detach(), bad, grid, half + r, max(2, half // 2), stamp_threshold,
                                       stars_per_cell, border=border, layout=stamp_layout, r=r)
    else:
        y, x, valid = _given_stamp_positions(stamp_positions, b, h, w, half + r, science.device)
    n_found = valid[..., 0].sum(1)
    if bool((n_found == 0).any()):
        which = torch.nonzero(n_found == 0).flatten().tolist()
        raise ValueError(f"no usable stamp star in batch element(s) {which}: "
                         f"{_no_stamp_reason(science, template, smask, tmask, bad, which)}")
    conv_sci = _convolve_science(convolve, science, template, y, x, valid, half, sky_s, sky_t)
    return _Candidates(y, x, valid, conv_sci, sky_s, sky_t)


class _Oriented(NamedTuple):
    """The pair ordered for the fit: the image to convolve and the target, with their variances."""

    conv_img: Tensor  # non-finite pixels zeroed (they would spread through the FFTs)
    target: Tensor
    var_conv: Tensor  # non-finite values zeroed
    var_target: Tensor
    ped_a: Tensor  # (B, 1, 1, 1) median sky of the image to convolve
    ped_t: Tensor  # (B, 1, 1, 1) median sky of the target
    conv_bad: Optional[Tensor] = None  # bool (B, 1, H, W): the zeroed pixels (None: all were finite)


def _orient(conv_sci: Tensor, science, template, science_var, template_var, sky_s, sky_t) -> _Oriented:
    """Order the pair by ``conv_sci`` (no copies when the whole batch goes one way)."""
    sel = conv_sci.view(-1, 1, 1, 1)
    if bool(conv_sci.all()) or not bool(conv_sci.any()):  # same direction for the whole batch: no copies
        flip = bool(conv_sci[0])
        conv_img, target = (science, template) if flip else (template, science)
        var_conv, var_target = (science_var, template_var) if flip else (template_var, science_var)
    else:
        conv_img = torch.where(sel, science, template)
        target = torch.where(sel, template, science)
        var_conv = torch.where(sel, science_var, template_var)
        var_target = torch.where(sel, template_var, science_var)
    # Non-finite pixels would spread through the FFTs: zero them in the image to convolve (they are
    # excluded from the stamps already).
    conv_bad = None
    conv_img_c, var_conv_c = conv_img, var_conv
    if not all_finite(conv_img):
        conv_bad = ~torch.isfinite(conv_img.detach())
        conv_img_c = torch.nan_to_num(conv_img, 0.0, 0.0, 0.0)
    if not all_finite(var_conv):
        bad_v = ~torch.isfinite(var_conv.detach())
        conv_bad = bad_v if conv_bad is None else conv_bad | bad_v
        var_conv_c = torch.nan_to_num(var_conv, 0.0, 0.0, 0.0)
    # Remove each image's median sky before building the stamp system (conditioning: a large
    # pedestal makes the first basis column nearly collinear with the background's constant term);
    # the constant background coefficient is corrected afterwards, so the model is unchanged.
    ped_a = torch.where(conv_sci, sky_s[0], sky_t[0]).view(-1, 1, 1, 1)  # non-finite values were ignored
    ped_t = torch.where(conv_sci, sky_t[0], sky_s[0]).view(-1, 1, 1, 1)
    return _Oriented(conv_img_c, target, var_conv_c, var_target, ped_a, ped_t, conv_bad)


def _noise_models(pair: _Oriented, debias: bool, calibrate_noise: bool):
    """``(noise, measured)``: the convolved image's noise in units of its variance model and its
    pixel correlation (``debias``; correlation None when white), and the same measured on its sky
    pixels (``calibrate_noise``); None where not asked for."""
    img, var = pair.conv_img.detach(), pair.var_conv.detach()
    noise = _noise_model(img, var) if debias else None
    measured = _noise_model(img, var, sky=_sky_pixels(img, var)) if calibrate_noise else None
    if noise is not None and bool((noise[1].abs().sum((-1, -2)) == 1).all()):  # white noise: the cheaper form
        noise = (noise[0], None)
    return noise, measured


class SubtractionContext(NamedTuple):
    """What :func:`image_subtraction` returns with ``return_context=True``: the stamp systems of
    the first candidates (``st``) and the pair as ordered for the fit (for ``fit_gradient``)."""

    st: _Stamps
    sel: Tensor
    conv_sci: Tensor
    conv_img: Tensor
    var_conv: Tensor
    target: Tensor
    var_target: Tensor
    basis: KernelBasis
    n_basis: int
    n_bg: int
    shape: tuple
    dtype: torch.dtype
    fit_dtype: torch.dtype
    b: int
    ped_a: Tensor
    ped_t: Tensor


def _given_coefficients(coefficients: Tensor, st: _Stamps, b: int, m: int, n_basis: int, fit_dtype):
    """The fit's outputs for caller-given coefficients: theta (B, M), the first candidates as the
    selection (act, pc) and their individually fitted kernel sums."""
    theta = coefficients.to(fit_dtype)
    if theta.dim() == 1:
        theta = theta.expand(b, -1)
    if theta.shape != (b, m):
        raise ValueError(f"coefficients must have {m} entries (or shape ({b}, {m})), got {tuple(coefficients.shape)}")
    act = st.valid[:, :, 0]
    pc = torch.zeros_like(act, dtype=torch.long)
    sub = list(range(n_basis + 1))
    normal, rhs = _normal_equations(st)
    normal, rhs = normal[..., sub, :][..., sub], rhs[..., sub]
    ksum_ind = _solve(normal, rhs)[..., 0]
    return theta, act, pc, ksum_ind


def _restore_pedestal(theta: Tensor, pair: _Oriented, i0: int) -> Tensor:
    """Undo the pedestal removal of the stamp system:
    ``target - ped_t = K (x) (A - ped_a) + bg'``  ->  ``bg0 += ped_t - ksum ped_a`` (``bg0`` = theta[i0])."""
    corr = pair.ped_t.view(-1).to(theta) - theta[:, 0] * pair.ped_a.view(-1).to(theta)
    return torch.cat([theta[:, :i0], theta[:, i0:i0 + 1] + corr[:, None], theta[:, i0 + 1:]], 1)


def _candidate_stamps(k0: int, k1: int, *, pair: _Oriented, cand: _Candidates, basis: KernelBasis,
                      spatial_order: int, background_order: int, half: int, fit_dtype, noise, weighting: str) -> _Stamps:
    """Stamp systems of candidates ``k0:k1`` of every cell (``noise``: the convolved image's
    measured noise scale, for the debiasing; ``weighting="none"``: unit weights)."""
    y, x, valid = cand.y[..., k0:k1], cand.x[..., k0:k1], cand.valid[..., k0:k1]
    part = _build_stamps(pair.conv_img, pair.target, pair.var_conv, pair.var_target, y, x, valid, basis, spatial_order,
                         background_order, tuple(pair.target.shape[-2:]), half, fit_dtype, pair.ped_a, pair.ped_t)
    if noise is not None:
        part = part._replace(var_a_ext=part.var_a_ext * noise[0].view(-1, 1, 1, 1, 1).to(fit_dtype))
    if weighting == "none":
        part = part._replace(weight=part.valid[..., None].to(fit_dtype).expand_as(part.weight).contiguous())
    return part


@torch.no_grad()
def _kernel_square_sum(theta_c: Tensor, basis: KernelBasis, spatial_order: int) -> Tensor:
    """(B,) ``sum K^2`` of the kernel's constant term."""
    return (_term_kernels(theta_c, basis, spatial_order)[:, 0] ** 2).sum((-1, -2))


def _solve_coefficients(st: _Stamps, build, valid: Tensor, pair: _Oriented, basis: KernelBasis, noise,
                        coefficients: Optional[Tensor], spatial_order: int, n_bg: int, clip_sigma: float,
                        max_iterations: int, stat_sigma: float, fit_dtype):
    """The kernel solution: fitted with stamp rejection (:func:`_fit`) and the pedestal restored,
    or the caller's ``coefficients``. Returns ``(theta, theta_fit, act, pc, ksum_ind, st)``:
    ``theta_fit`` is the pedestal-free solution the stamp statistics use."""
    n_basis = basis.kernels.shape[0]
    ns = _n_terms(spatial_order)
    if coefficients is not None:
        theta, act, pc, ksum_ind = _given_coefficients(coefficients, st, st.design.shape[0],
                                                       1 + (n_basis - 1) * ns + n_bg, n_basis, fit_dtype)
        return theta, theta, act, pc, ksum_ind, st
    k0sq = float((basis.kernels[0].double() ** 2).sum())
    theta, act, pc, ksum_ind, _, st = _fit(st, n_basis, n_bg, clip_sigma, max_iterations, k0sq,
                                           (basis.kernels, noise[1]) if noise is not None else None, valid=valid,
                                           build=build, stat_sigma=stat_sigma)
    return _restore_pedestal(theta, pair, 1 + (n_basis - 1) * ns), theta, act, pc, ksum_ind, st


def _difference(pair: _Oriented, conv: Tensor, var_k: Tensor, theta_c: Tensor, conv_sci: Tensor, normalize: str,
                n_basis: int, spatial_order: int, background_order: int, like: Tensor, r: int):
    """``(difference, model, variance)`` from the convolved image ``conv`` and its variance ``var_k``
    (NaN within ``r`` px of a non-finite pixel of the convolved image: :func:`_mark_unknown`).

    difference = sign (model - target) * scale with sign = +1 when the science frame was convolved;
    normalisation: "science" -> science counts, "template" -> template counts.
    """
    h, w = like.shape[-2:]
    bg_y, bg_x = _background(theta_c, n_basis, spatial_order, background_order, (h, w), like, factors=True)
    ksum = theta_c[:, 0]
    scale_down = conv_sci if normalize == "science" else ~conv_sci
    scale = torch.where(scale_down, 1.0 / ksum, torch.ones_like(ksum))
    factor = (torch.where(conv_sci, 1.0, -1.0).to(ksum) * scale).view(-1, 1, 1, 1)
    vfactor = (scale ** 2).view(-1, 1, 1, 1)
    if torch.is_grad_enabled():
        model = conv + (bg_y @ bg_x)[:, None]
        diff = (model - pair.target) * factor
        variance = (pair.var_target + var_k) * vfactor
    else:  # in place: two frame-sized buffers fewer
        model = conv
        model[:, 0].baddbmm_(bg_y, bg_x)
        diff = torch.sub(model, pair.target).mul_(factor)
        variance = var_k.add_(pair.var_target).mul_(vfactor)
    if pair.conv_bad is not None:
        return _mark_unknown(pair.conv_bad, (diff, model, variance), r)
    return diff, model, variance


def _mark_unknown(conv_bad: Tensor, maps: tuple, r: int) -> tuple:
    """NaN in ``maps`` wherever the kernel (half width ``r``) reached a non-finite pixel of the
    convolved image or its variance: those pixels were zeroed for the FFTs, so the convolution,
    and the difference, are unknown there (a residual of -K x the true value otherwise)."""
    reach = grow_mask(conv_bad, r)
    if torch.is_grad_enabled():
        return tuple(torch.where(reach, torch.full_like(m, float("nan")), m) for m in maps)
    return tuple(m.masked_fill_(reach, float("nan")) for m in maps)


def _convolve_pair(pair: _Oriented, theta_c, basis, spatial_order, tile_size, variance_tile_size, var_mode: str,
                   measured) -> tuple[Tensor, Tensor]:
    """The image to convolve and its variance through the fitted kernel; with ``measured`` (the
    convolved image's calibrated noise correlation) the variance is scaled for correlated noise."""
    conv, var_k = apply_kernel(pair.conv_img, theta_c, basis, spatial_order, pair.var_conv, tile_size,
                               None if tile_size is None else variance_tile_size, var_mode)
    if measured is not None:  # correlated (resampled) noise through the kernel
        with torch.no_grad():
            corr = _correlated_noise_factor(_term_kernels(theta_c, basis, spatial_order)[:, 0], measured[1])
            corr = torch.where(measured[0] > _NOISE_FREE, corr, torch.ones_like(corr))  # nothing measured
        var_k = var_k * corr.to(var_k.dtype).view(-1, 1, 1, 1)
    return conv, var_k


@adapt_to_load
def image_subtraction(
    science: Tensor,
    template: Tensor,
    science_mask: Optional[Tensor] = None,
    template_mask: Optional[Tensor] = None,
    science_var: Optional[Tensor] = None,
    template_var: Optional[Tensor] = None,
    *,
    kernel_half_width: int = 10,
    gaussians: Sequence[Sequence[float]] = ((0.7, 6), (1.5, 4), (3.0, 2)),
    spatial_order: int = 2,
    background_order: int = 1,
    stamp_grid=(10, 10),
    stamp_half_width: int = 15,
    clip_sigma: float = 3.0,
    max_iterations: int = 5,
    convolve: str = "auto",
    normalize: str = "science",
    delta_basis: bool = False,
    gain: Pair = 1.0,
    read_noise: Pair = 0.0,
    saturation: Pair = None,
    lower_limit: Pair = None,
    stamp_threshold: float = 10.0,
    stars_per_cell: int = 3,
    tile_size: Optional[int] = 128,
    variance_tile_size: Optional[int] = None,
    variance_convolution: str = "fft",
    weighting: str = "variance",
    stamp_layout: str = "grid",
    debias: bool = True,
    calibrate_noise: bool = True,
    stat_sigma: float = 3.0,
    stamp_positions: Optional[Tensor] = None,
    coefficients: Optional[Tensor] = None,
    basis: Optional[KernelBasis] = None,
    return_context: bool = False,
) -> SubtractionResult:
    """Functional core of :class:`ImageSubtraction` (see the module docstring for the method).

    science, template: (B, 1, H, W) aligned frames in ADU. masks: bool, True = bad. ``*_var``:
    variance images in ADU^2 (default: :func:`poisson_variance` with ``gain`` e-/ADU and
    ``read_noise`` e-; each of ``gain``, ``read_noise``, ``saturation``, ``lower_limit`` is a number or
    a ``(science, template)`` pair). Pixels ``>= saturation`` or ``<= lower_limit`` are excluded
    from stamps. ``coefficients`` (M,) or (B, M): skip the least-squares fit and use these (the
    learnable path; ``convolve`` must then not be ``"auto"`` or is resolved per call).
    ``return_context=True`` returns a :class:`SubtractionContext` (the stamp systems) instead.
    """
    smask, tmask = _check_subtraction_inputs(science, template, science_var, template_var, science_mask,
                                             template_mask)
    _check_subtraction_options(stat_sigma, convolve, normalize, stamp_layout, variance_convolution, spatial_order,
                               background_order)
    half, r = int(stamp_half_width), int(kernel_half_width)
    b, _, h, w = science.shape
    if min(h, w) < 2 * (half + r) + 1:
        raise ValueError(f"images {h}x{w} are smaller than one stamp (2 * (stamp_half_width + kernel_half_width) + 1)")
    dtype, fit_dtype = science.dtype, torch.float64
    if basis is None:
        basis = kernel_basis(r, gaussians, delta=delta_basis, dtype=dtype, device=science.device)
    basis = _basis_to(basis, science)
    n_basis = basis.kernels.shape[0]
    n_bg = _n_terms(background_order)
    given_s, given_t = science_var is not None, template_var is not None
    science_var, template_var = _variances(science, template, science_var, template_var, gain, read_noise,
                                           calibrate_noise)
    cand = _stamp_candidates(science, template, smask, tmask, science_var, template_var, (given_s, given_t),
                             _pair(saturation, "saturation"), _pair(lower_limit, "lower_limit"), stamp_positions,
                             as_pair(stamp_grid, "stamp_grid"), half, r, stamp_threshold, stars_per_cell, stamp_layout, convolve)
    valid, conv_sci = cand.valid, cand.conv_sci
    pair = _orient(conv_sci, science, template, science_var, template_var, cand.sky_s, cand.sky_t)
    # debias: the noise of the image to convolve, as measured, in units of its variance model;
    # calibrate_noise: the pixel-noise correlation of the convolved image, on its sky pixels
    noise, measured = _noise_models(pair, debias and coefficients is None, calibrate_noise)

    build = partial(_candidate_stamps, pair=pair, cand=cand, basis=basis, spatial_order=spatial_order,
                    background_order=background_order, half=half, fit_dtype=fit_dtype, noise=noise,
                    weighting=weighting)  # build(k0, k1): stamp systems of candidates k0:k1 of every cell
    # Only the first candidate of every cell is built now; replacements when a rejection needs them.
    st = build(0, 1)
    if return_context:
        return SubtractionContext(st, conv_sci.view(-1, 1, 1, 1), conv_sci, pair.conv_img, pair.var_conv, pair.target,
                                  pair.var_target, basis, n_basis, n_bg, (h, w), dtype, fit_dtype, b, pair.ped_a,
                                  pair.ped_t)
    theta, theta_fit, act, pc, ksum_ind, st = _solve_coefficients(
        st, build, valid, pair, basis, noise, coefficients, spatial_order, n_bg, clip_sigma, max_iterations,
        stat_sigma, fit_dtype)
    theta_c = theta.to(dtype)
    stats = _stamp_stats_simple(st, theta_fit, act, pc, ksum_ind, n_basis, n_bg,
                                _kernel_square_sum(theta_c, basis, spatial_order).to(fit_dtype))
    del st  # the stamp system (~90 MB at 10x10x3 stamps) is not needed for the frame-sized passes
    # "local" applies to a variance map the caller gave for the convolved image; the Poisson
    # variance made here follows the stars and is always convolved
    given_conv = (given_s or not bool(conv_sci.any())) and (given_t or bool(conv_sci.all()))
    conv, var_k = _convolve_pair(pair, theta_c, basis, spatial_order, tile_size, variance_tile_size,
                                 variance_convolution if given_conv else "fft", measured)
    diff, model, variance = _difference(pair, conv, var_k, theta_c, conv_sci, normalize, n_basis, spatial_order,
                                        background_order, science, r)
    return SubtractionResult(diff, model, variance, theta_c[:, 0], theta_c, stats, conv_sci)


def _stamp_stats_simple(st: _Stamps, theta, act, pc, ksum_ind, n_basis, n_bg, k2) -> StampStats:
    b, nr = act.shape
    ar_b = torch.arange(b, device=act.device)[:, None]
    ar_r = torch.arange(nr, device=act.device)[None, :]
    e = _expand(st.spatial[ar_b, ar_r, pc], n_basis, n_bg)
    beta = (e @ theta[:, None, :, None]).squeeze(-1)
    model = (beta[..., None, :] @ st.design[ar_b, ar_r, pc].to(beta.dtype)).squeeze(-2)
    resid = st.target[ar_b, ar_r, pc] - model
    var = st.var_t[ar_b, ar_r, pc] + k2.view(-1, 1, 1) * st.var_a[ar_b, ar_r, pc]
    z = resid / var.clamp(min=1e-30).sqrt()
    present = st.valid[ar_b, ar_r, pc]
    return StampStats(
        batch_index=ar_b.expand(b, nr)[present],
        x=st.x[ar_b, ar_r, pc][present],
        y=st.y[ar_b, ar_r, pc][present],
        used=act[present],
        merit=(z ** 2).mean(-1)[present],
        residual_mean=z.mean(-1)[present],
        residual_std=z.std(-1)[present],
        kernel_sum=ksum_ind[ar_b, ar_r, pc][present],
    )


# ----------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------
def _as_gaussians(gaussians) -> tuple:
    try:
        out = tuple((float(s), int(d)) for s, d in gaussians)
    except (TypeError, ValueError):
        raise ValueError(f"gaussians must be a sequence of (sigma, degree) pairs, got {gaussians!r}") from None
    return out


def _plain(value):
    """Hydra/OmegaConf lists -> tuples of floats (or the value unchanged)."""
    if value is None or isinstance(value, (int, float)):
        return value
    return tuple(float(v) for v in value)


class ImageSubtraction(nn.Module):
    """Alard–Lupton / HOTPANTS image subtraction of aligned ``(B, 1, H, W)`` pairs.

    Args (the issue's contract first):
        kernel_half_width: kernel half width ``r`` in pixels (kernel ``2r+1`` square; HOTPANTS ``-r``).
        gaussians: ``((sigma, degree), ...)`` of the Gaussian x polynomial basis (HOTPANTS ``-ng``).
        spatial_order: total degree of the coefficients' spatial polynomials (HOTPANTS ``-ko``).
        background_order: total degree of the differential background (HOTPANTS ``-bgo``).
        stamp_grid: ``(rows, columns)`` of stamp cells (HOTPANTS ``-nsy``, ``-nsx``).
        stamp_half_width: half width of the fitted stamp area (HOTPANTS ``-rss``).
        clip_sigma: rejection threshold for bad stamps (HOTPANTS ``-ks``).
        max_iterations: iterations of the stamp rejection loop.
        convolve: ``"auto"`` (convolve the image with the smaller FWHM), ``"template"``, ``"science"``.
        normalize: ``"science"`` (HOTPANTS ``-n i``) or ``"template"`` (``-n t``) flux units.
    Keyword-only extras:
        learnable: hold the solution vector as an ``nn.Parameter`` (fitted by :meth:`fit_gradient`,
            or trained end-to-end) instead of solving least squares in every ``forward``.
        delta_basis: use the delta-function basis instead of the Gaussians.
        gain, read_noise, saturation, lower_limit: noise model (e-/ADU, e-) and bad-pixel limits,
            numbers or ``(science, template)`` pairs (HOTPANTS ``-ig/-tg``, ``-ir/-tr``, ``-iu/-tu``,
            ``-il/-tl``).
        stamp_threshold: stars must peak this many robust sigma above the median sky of their stamp
            region (both measured in the region, as HOTPANTS -ft).
        stars_per_cell: candidates kept per cell (replacements for rejected stamps).
        tile_size: FFT tile size for the spatially varying convolution (None = exact, slower).
        variance_tile_size: FFT tile size of the variance convolution by K^2 (None = ``tile_size``;
            256 changes the variance by < 0.3% but is not faster: ``experiments/results/subtract_speed.md``).
        variance_convolution: ``"fft"`` (``var (x) K^2``, HOTPANTS) or ``"local"`` (``var * sum K^2``
            per tile: for given variance maps that vary slowly over a kernel width, such as
            background RMS^2 maps; one pass instead of a tiled FFT; see the module docstring).
        weighting: ``"variance"`` (inverse-variance weighted least squares) or ``"none"`` (HOTPANTS).
        calibrate_noise: ``True`` (default): the returned variance is calibrated on the data. A frame
            given without a variance map gets ``poisson_variance`` (plus the measured sky variance
            when its sky was removed: median below 3 robust sigma) scaled by its pixel noise as
            measured on the sky (clipped differences of pixels 5 px apart), so a resampled frame,
            with less noise per pixel than its Poisson model, is not over-weighted; and the
            convolved image's variance is multiplied by ``sum_lag rho(lag) A_K(lag) / A_K(0)`` with
            ``rho`` its measured pixel-noise correlation (resampled frames: 1-2 px) and ``A_K`` the
            kernel's autocorrelation. Assumes the noise is stationary in shape (one correlation
            per frame) and the sky pixels dominate the measurement. ``False``: HOTPANTS' noise image.
        stamp_layout: ``"hotpants"`` (stamp regions one kernel width smaller than the grid cells, and
            the stamp box at least ``stamp_half_width + kernel_half_width`` from the frame edges, as
            HOTPANTS) or ``"grid"`` (cells tile the frame; the box plus kernel inside the frame).
        debias: remove the expected contribution of the convolved image's own noise from the final
            normal equations (errors-in-variables correction, noise level measured from the image;
            without it the fitted kernel is too smooth and constant stars leave positive residuals of
            0.07-0.13 sigma on simulated GWAC pairs). ``True`` (default); ``False`` reproduces HOTPANTS.
        stat_sigma: clip of the iterative statistics (mean and std of the stamps' kernel sums and
            figures of merit) that ``clip_sigma`` then rejects against (HOTPANTS ``-ssig``, 3).
    """

    def __init__(
        self,
        kernel_half_width: int = 10,
        gaussians=((0.7, 6), (1.5, 4), (3.0, 2)),
        spatial_order: int = 2,
        background_order: int = 1,
        stamp_grid=(10, 10),
        stamp_half_width: int = 15,
        clip_sigma: float = 3.0,
        max_iterations: int = 5,
        convolve: str = "auto",
        normalize: str = "science",
        *,
        learnable: bool = False,
        delta_basis: bool = False,
        gain=1.0,
        read_noise=0.0,
        saturation=None,
        lower_limit=None,
        stamp_threshold: float = 10.0,
        stars_per_cell: int = 3,
        tile_size: Optional[int] = 128,
        variance_tile_size: Optional[int] = None,
        variance_convolution: str = "fft",
        weighting: str = "variance",
        stamp_layout: str = "grid",
        debias: bool = True,
        calibrate_noise: bool = True,
        stat_sigma: float = 3.0,
    ):
        super().__init__()
        _check_subtraction_options(stat_sigma, convolve, normalize, stamp_layout, variance_convolution,
                                   int(spatial_order), int(background_order))
        self.kernel_half_width = int(kernel_half_width)
        self.gaussians = _as_gaussians(gaussians)
        self.spatial_order = int(spatial_order)
        self.background_order = int(background_order)
        self.stamp_grid = as_pair(stamp_grid if isinstance(stamp_grid, int) else tuple(stamp_grid), "stamp_grid")
        self.stamp_half_width = int(stamp_half_width)
        self.clip_sigma = float(clip_sigma)
        self.max_iterations = int(max_iterations)
        self.convolve = convolve
        self.normalize = normalize
        self.learnable = bool(learnable)
        self.delta_basis = bool(delta_basis)
        self.gain, self.read_noise = _plain(gain), _plain(read_noise)
        self.saturation, self.lower_limit = _plain(saturation), _plain(lower_limit)
        self.stamp_threshold = float(stamp_threshold)
        self.stars_per_cell = int(stars_per_cell)
        self.tile_size = None if tile_size is None else int(tile_size)
        self.variance_tile_size = None if variance_tile_size is None else int(variance_tile_size)
        self.variance_convolution = variance_convolution
        self.weighting = weighting
        self.stamp_layout = stamp_layout
        self.debias = bool(debias)
        self.calibrate_noise = bool(calibrate_noise)
        self.stat_sigma = float(stat_sigma)
        basis = kernel_basis(self.kernel_half_width, self.gaussians, delta=self.delta_basis)
        self.n_basis = basis.kernels.shape[0]
        self.n_coefficients = 1 + (self.n_basis - 1) * _n_terms(self.spatial_order) + _n_terms(self.background_order)
        if self.learnable:
            init = torch.zeros(self.n_coefficients)
            init[0] = 1.0
            self.kernel_coefficients = nn.Parameter(init)
        else:
            self.register_parameter("kernel_coefficients", None)

    def extra_repr(self) -> str:
        return (f"kernel_half_width={self.kernel_half_width}, gaussians={self.gaussians}, spatial_order={self.spatial_order}, "
                f"background_order={self.background_order}, stamp_grid={self.stamp_grid}, convolve={self.convolve!r}, "
                f"learnable={self.learnable}, delta_basis={self.delta_basis}")

    def _kwargs(self) -> dict:
        return dict(
            kernel_half_width=self.kernel_half_width, gaussians=self.gaussians, spatial_order=self.spatial_order,
            background_order=self.background_order, stamp_grid=self.stamp_grid, stamp_half_width=self.stamp_half_width,
            clip_sigma=self.clip_sigma, max_iterations=self.max_iterations, convolve=self.convolve,
            normalize=self.normalize, delta_basis=self.delta_basis, gain=self.gain, read_noise=self.read_noise,
            saturation=self.saturation, lower_limit=self.lower_limit, stamp_threshold=self.stamp_threshold,
            stars_per_cell=self.stars_per_cell, tile_size=self.tile_size,
            variance_tile_size=self.variance_tile_size, variance_convolution=self.variance_convolution,
            weighting=self.weighting,
            stamp_layout=self.stamp_layout, debias=self.debias, calibrate_noise=self.calibrate_noise, stat_sigma=self.stat_sigma,
        )

    def forward(
        self,
        science: Tensor,
        template: Tensor,
        science_mask: Optional[Tensor] = None,
        template_mask: Optional[Tensor] = None,
        science_var: Optional[Tensor] = None,
        template_var: Optional[Tensor] = None,
        stamp_positions: Optional[Tensor] = None,
    ) -> SubtractionResult:
        """Subtract ``template`` from ``science`` (both (B, 1, H, W), aligned, ADU).

        ``stamp_positions`` (R, 2) or (B, R, 2) of 0-based (x, y): use these stamp centres instead of
        the automatic selection (HOTPANTS ``-ssf``).
        """
        return image_subtraction(
            science, template, science_mask, template_mask, science_var, template_var,
            stamp_positions=stamp_positions, coefficients=self.kernel_coefficients if self.learnable else None,
            **self._kwargs(),
        )

    def fit_gradient(
        self,
        science: Tensor,
        template: Tensor,
        science_mask: Optional[Tensor] = None,
        template_mask: Optional[Tensor] = None,
        science_var: Optional[Tensor] = None,
        template_var: Optional[Tensor] = None,
        *,
        steps: int = 50,
        loss: str = "cauchy",
        scale: float = 2.0,
    ) -> Tensor:
        """Fit the learnable coefficients by gradient descent (L-BFGS) on a robust stamp loss.

        PyTorchDIA-style: the residuals ``r / sigma`` of every valid stamp (first candidate of each
        cell, all batch elements share one kernel) enter ``log(1 + (z / scale)^2)`` (``"cauchy"``)
        or ``z^2`` (``"gaussian"``). Variables are pre-scaled by the design's column norms so the
        problem is well conditioned. Returns the final loss.
        """
        if not self.learnable:
            raise RuntimeError("fit_gradient needs ImageSubtraction(learnable=True)")
        if loss not in ("cauchy", "gaussian"):
            raise ValueError(f"loss must be 'cauchy' or 'gaussian', got {loss!r}")
        ctx = image_subtraction(science.detach(), template.detach(), science_mask, template_mask,
                                None if science_var is None else science_var.detach(),
                                None if template_var is None else template_var.detach(),
                                return_context=True, **self._kwargs())
        st = ctx.st
        n_basis, n_bg = ctx.n_basis, ctx.n_bg
        valid = st.valid[:, :, 0]
        e = _expand(st.spatial[:, :, 0], n_basis, n_bg)  # (B, R, C, M)
        design = e.transpose(-1, -2) @ st.design[:, :, 0].to(e.dtype)  # (B, R, M, P)
        sigma = (st.var_t[:, :, 0] + 0.05 * st.var_a[:, :, 0]).sqrt()
        design = design[valid]  # (S, M, P)
        target, sigma = st.target[:, :, 0][valid], sigma[valid]
        norm = (design / sigma[:, None]).pow(2).sum((0, 2)).sqrt().clamp(min=1e-30)
        dev = self.kernel_coefficients
        phi = (dev.detach().to(torch.float64) * norm).clone().requires_grad_(True)
        opt = torch.optim.LBFGS([phi], lr=1.0, max_iter=int(steps), line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            theta = phi / norm
            model = torch.einsum("m,smp->sp", theta, design)
            z = (target - model) / sigma
            val = torch.log1p((z / scale) ** 2).mean() if loss == "cauchy" else (z ** 2).mean()
            val.backward()
            return val

        final = opt.step(closure)
        with torch.no_grad():
            theta = (phi / norm).detach()
            i0 = 1 + (n_basis - 1) * _n_terms(self.spatial_order)
            # undo the pedestal removal of the stamp system (one solution for the whole batch)
            theta[i0] += (ctx.ped_t.double() - theta[0] * ctx.ped_a.double()).mean()
            self.kernel_coefficients.copy_(theta.to(dev))
        return final.detach()
