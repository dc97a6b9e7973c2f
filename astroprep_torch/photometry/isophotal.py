"""Isophotal measurements over each object's segmentation pixels: SExtractor's detection filtering,
barycentre and second moments of the filtered image (with the detector's overrides), the ellipse
parameters, ISOAREA, FLUX_ISO, FLUX_MAX and the position errors.  All are ``index_add`` /
``scatter_reduce`` over the segmentation pixels.

As SExtractor (analyse.c), ``X_IMAGE``/``X2_IMAGE``... are moments of the *filtered* (detection-convolved)
image over the object's segmentation pixels, not of the measured image.  For a deblended object the
barycentre is the one of its deblending *branch*, computed before the faint pixels were re-assigned;
second moments are then taken about that point over all the object's pixels.  That branch barycentre is
not recoverable from the final segmentation, so the detector passes it in ``isophotal={"x": ..., "y":
...}``.  Likewise an object that swallowed CLEANed neighbours keeps its own pre-merge moments and ISOAREA
while its fluxes and segmentation include the merged pixels (``isophotal`` x2/y2/xy/npix).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .._moments import CentralMoments, central_moments, ellipse, segment_moments
from .segments import _ObjectPixels, _segment_sum

#: SExtractor's ``default.conv`` (3x3 pyramid, FWHM 2 px), normalised at use.
DEFAULT_CONV = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]])

_OVERRIDES = {"x", "y", "x2", "y2", "xy", "npix"}


def sextractor_filter(image: Tensor, kernel: Union[str, Tensor, None] = "default") -> Tensor:
    """Detection filtering as SExtractor: correlation with the kernel normalised to unit sum, zeros
    outside the image.  ``kernel="default"`` is ``default.conv``; ``None`` returns ``image``."""
    if kernel is None:
        return image
    if isinstance(kernel, str):
        if kernel != "default":
            raise ValueError(f"kernel must be 'default', a 2-D tensor or None, got {kernel!r}")
        kernel = DEFAULT_CONV
    if not isinstance(kernel, Tensor) or kernel.dim() != 2:
        raise ValueError("kernel must be a 2-D tensor")
    k = kernel.to(image.dtype).to(image.device)
    s = k.sum()
    k = k / torch.where(s != 0, s, k.abs().sum())
    kh, kw = k.shape
    return F.conv2d(image, k[None, None], padding=(kh // 2, kw // 2))[..., : image.shape[-2], : image.shape[-1]]



class _Shape(NamedTuple):
    """Isophotal position and shape per object (float64): 0-based barycentre ``x, y``, second moments
    ``x2, y2, xy``, ellipse ``a, b, theta`` (radians) and ``cxx, cyy, cxy``, ``singular`` (the moments
    were widened by 1/12 px^2), the bounding box and ``rv`` (the filtered flux: moment weight sum)."""

    x: Tensor
    y: Tensor
    x2: Tensor
    y2: Tensor
    xy: Tensor
    a: Tensor
    b: Tensor
    theta: Tensor
    cxx: Tensor
    cyy: Tensor
    cxy: Tensor
    singular: Tensor
    xmin: Tensor
    xmax: Tensor
    ymin: Tensor
    ymax: Tensor
    rv: Tensor


def _check_overrides(isophotal: Optional[dict]) -> None:
    if isophotal is not None:
        unknown = set(isophotal) - _OVERRIDES
        if unknown:
            raise ValueError(f"isophotal overrides accept x, y, x2, y2, xy, npix; got {sorted(unknown)}")


def _override(isophotal: Optional[dict], name: str, n: int, device) -> Optional[Tensor]:
    """The per-object override ``isophotal[name]`` as float64 (NaN = compute), or None."""
    if isophotal is None or name not in isophotal or isophotal[name] is None:
        return None
    t_ = torch.as_tensor(isophotal[name], device=device).double().reshape(-1)
    if t_.numel() != n:
        raise ValueError(f"isophotal[{name!r}] must hold {n} values (one per object), got {t_.numel()}")
    return t_


def _bounding_boxes(obj: _ObjectPixels, H: int, W: int):
    """``xmin, ymin, xmax, ymax`` (int64) of every object's pixels."""
    n, inv, dev = obj.n, obj.inv, obj.pidx.device
    xmin = torch.full((n,), W, dtype=torch.long, device=dev).scatter_reduce(0, inv, obj.px, "amin")
    ymin = torch.full((n,), H, dtype=torch.long, device=dev).scatter_reduce(0, inv, obj.py, "amin")
    xmax = torch.full((n,), -1, dtype=torch.long, device=dev).scatter_reduce(0, inv, obj.px, "amax")
    ymax = torch.full((n,), -1, dtype=torch.long, device=dev).scatter_reduce(0, inv, obj.py, "amax")
    return xmin, ymin, xmax, ymax


def _filtered_moments(obj: _ObjectPixels, xmin: Tensor, ymin: Tensor, isophotal: Optional[dict]):
    """Barycentre (relative to the box corner) and second moments of the filtered image over each
    object's pixels, with the detector's overrides.  Returns ``xm, ym, xm2, ym2, xym, rv``."""
    m = segment_moments(obj.inv, obj.n, obj.px.double(), obj.py.double(), obj.fv,
                        origin=(xmin.double(), ymin.double()), guard_zero=False)
    c = central_moments(m)
    dev = obj.fv.device
    ox, oy = _override(isophotal, "x", obj.n, dev), _override(isophotal, "y", obj.n, dev)
    if ox is not None and oy is not None:
        # SExtractor's ANALYSE_ROBUST branch: keep the given barycentre, moments about it
        use = torch.isfinite(ox) & torch.isfinite(oy)
        r = central_moments(m, centre=(ox, oy))
        c = CentralMoments(*(torch.where(use, rv_, cv_) for rv_, cv_ in zip(r, c)))
    moments = [c.x2, c.y2, c.xy]
    for i, name in enumerate(("x2", "y2", "xy")):
        ov = _override(isophotal, name, obj.n, dev)
        if ov is not None:
            moments[i] = torch.where(torch.isfinite(ov), ov, moments[i])
    return c.x, c.y, *moments, m.flux


def _ellipse_from_moments(xm2: Tensor, ym2: Tensor, xym: Tensor):
    """SExtractor's ellipse from second moments (:func:`astroprep_torch._moments.ellipse`), the axes
    and coefficients rounded to float32 as SExtractor stores them.  Returns ``xm2, ym2, singular, a,
    b, theta, cxx, cyy, cxy``."""
    e = ellipse(xm2, ym2, xym)
    a_, b_, cxx, cyy, cxy = (t.float().double() for t in (e.a, e.b, e.cxx, e.cyy, e.cxy))
    return e.x2, e.y2, e.singular, a_, b_, e.theta, cxx, cyy, cxy


def _isophotal_shape(obj: _ObjectPixels, isophotal: Optional[dict], H: int, W: int) -> _Shape:
    """Position, moments and ellipse of every object (SExtractor's preanalyse on the filtered image)."""
    _check_overrides(isophotal)
    xmin, ymin, xmax, ymax = _bounding_boxes(obj, H, W)
    xm, ym, xm2, ym2, xym, rv = _filtered_moments(obj, xmin, ymin, isophotal)
    xm2, ym2, singu, a_, b_, theta, cxx, cyy, cxy = _ellipse_from_moments(xm2, ym2, xym)
    x = xm + xmin.double()
    y = ym + ymin.double()
    return _Shape(x, y, xm2, ym2, xym, a_, b_, theta, cxx, cyy, cxy, singu, xmin, xmax, ymin, ymax, rv)


class _IsoFluxes(NamedTuple):
    """ISOAREA (``npix``), segment pixel count, FLUX_ISO and its error, FLUX_MAX (``peak``)."""

    npix: Tensor
    fdnpix: Tensor
    flux_iso: Tensor
    fluxerr_iso: Tensor
    peak: Tensor


def _isophotal_fluxes(obj: _ObjectPixels, v: Tensor, varp: Tensor, thr: Tensor, gain_v: float,
                      isophotal: Optional[dict]) -> _IsoFluxes:
    """Isophotal measurements on the measurement image: ``v`` the image, ``varp`` the variance and
    ``thr`` the analysis threshold at the objects' pixels."""
    inv, n, pidx = obj.inv, obj.n, obj.pidx
    npix = _segment_sum((v.detach() > thr).long(), inv, n)
    if isophotal is not None and isophotal.get("npix") is not None:
        onp = torch.as_tensor(isophotal["npix"], device=pidx.device).double().reshape(-1)
        npix = torch.where(torch.isfinite(onp), torch.nan_to_num(onp).long(), npix)
    fdnpix = _segment_sum(torch.ones_like(pidx), inv, n)
    flux_iso = _segment_sum(v, inv, n)
    sig_iso = _segment_sum(varp.to(v.dtype), inv, n)
    if gain_v > 0:
        sig_iso = sig_iso + torch.clamp(flux_iso, min=0) / gain_v
    fluxerr_iso = torch.sqrt(sig_iso)
    peak = torch.full((n,), -float("inf"), dtype=v.dtype, device=pidx.device).scatter_reduce(0, inv, v, "amax")
    return _IsoFluxes(npix, fdnpix, flux_iso, fluxerr_iso, peak)


def _position_errors(obj: _ObjectPixels, shape: _Shape, varp: Tensor, gain_v: float):
    """SExtractor's position errors (examineiso): err = backnoise^2 (+ filtered/gain), moments about the
    barycentre.  Returns ``errx2, erry2, errxy`` (float64)."""
    inv, n = obj.inv, obj.n
    err = varp.double()
    if gain_v > 0:
        err = err + torch.clamp(obj.fv, min=0) / gain_v
    ex = obj.px.double() - shape.x.index_select(0, inv)
    ey = obj.py.double() - shape.y.index_select(0, inv)
    flux2 = shape.rv.float().double() ** 2
    emx2 = _segment_sum(err * ex * ex, inv, n) / flux2
    emy2 = _segment_sum(err * ey * ey, inv, n) / flux2
    emxy = _segment_sum(err * ex * ey, inv, n) / flux2
    esum = _segment_sum(err, inv, n) * 0.08333 / flux2
    fix = shape.singular & (emx2 * emy2 - emxy * emxy < esum * esum)
    emx2 = torch.where(fix, emx2 + esum, emx2)
    emy2 = torch.where(fix, emy2 + esum, emy2)
    return emx2, emy2, emxy
