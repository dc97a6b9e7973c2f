"""The ``.param`` names of ``astroprep extract sex=<file.sex>`` beyond the core set of
:mod:`astroprep_torch.classic`, each with SExtractor 2.25's definition and computed only when the
``.param`` file asks for it (:func:`extra_column`):

* ``CLASS_STAR``: the network of the ``STARNNW_NAME`` file (:mod:`astroprep_torch.photometry.classify`)
  on ``ISO0..ISO7``, ``FLUX_MAX``, the analysis threshold, ``SEEING_FWHM`` and the pixel scale
  (``PIXEL_SCALE``, or the WCS's when 0).  ``SEEING_FWHM 0`` (SExtractor takes
  the FWHM of a PSF model, ``PSF_NAME``) is not implemented: warned about, the column left out.
* ``ISO0..ISO7`` and ``FWHM_IMAGE`` (:mod:`astroprep_torch.photometry.isoprofile`), ``ISOAREAF_IMAGE``
  (the object's pixels above the detection threshold), ``ISOAREA_WORLD`` / ``ISOAREAF_WORLD`` /
  ``FWHM_WORLD`` (times the pixel scale, or the WCS Jacobian at the object when ``PIXEL_SCALE 0``).
* ``MU_MAX`` / ``MU_THRESHOLD``: ``-2.5 log10(FLUX_MAX (THRESHOLD) / pixel area in arcsec^2) +
  MAG_ZEROPOINT`` (99 when not positive).
* ``FLUX_ISOCOR`` / ``FLUXERR_ISOCOR`` / ``MAG_ISOCOR`` / ``MAGERR_ISOCOR`` (``photom.c``'s
  ``computeisocorflux``: the isophotal flux corrected for the wings of a Gaussian profile cut at the
  detection threshold) and ``FLUX_BEST`` / ``FLUXERR_BEST`` / ``MAG_BEST`` / ``MAGERR_BEST``: ISOCOR for
  the objects with FLAGS 1 (crowded: neighbours within the AUTO aperture), AUTO for the others.
* ``ERRA_IMAGE`` / ``ERRB_IMAGE`` / ``ERRTHETA_IMAGE`` / ``ERRCXX_IMAGE`` / ``ERRCYY_IMAGE`` /
  ``ERRCXY_IMAGE``: the position error ellipse from ``ERRX2/ERRY2/ERRXY_IMAGE``; ``POLAR_IMAGE``.
* With a celestial WCS in the header: ``X2/Y2/XY/A/B/THETA/CXX/CYY/CXY_WORLD``, ``THETA_SKY``,
  ``THETA_J2000`` and their ``ERR`` counterparts (``astrom.c``: the moments through SExtractor's local
  Jacobian; ``THETA_J2000`` = ``THETA_SKY``, exact for equinox-2000 / ICRS frames); the brightest
  pixel's ``XPEAK_WORLD`` / ``YPEAK_WORLD`` / ``ALPHAPEAK_SKY`` / ``..._J2000`` (same equinox caveat).

Objects that swallowed CLEANed neighbours: SExtractor takes ``ISO0..7`` and ``FWHM_IMAGE`` (and the
peak that sets their levels) on the object's own pixels before CLEAN merges the neighbours' pixels into
it; so do we, leaving out the pixels the detector reports as CLEANed (``SourceExtractor`` keeps them on
its lazy segmentation as ``cleaned``).  The position errors ``ERRX2/ERRY2/ERRXY_IMAGE`` (a core column,
:func:`astroprep_torch.photometry.measure`) are taken on the merged pixels, so the error ellipses of
those objects differ from SExtractor's.

Pixel scales: with ``PIXEL_SCALE`` > 0 every ``_WORLD`` size and ``MU_*`` use it (as SExtractor); with
``PIXEL_SCALE 0`` the pixel area is ``|det J|`` of SExtractor's local Jacobian (one-pixel forward
differences of the WCS at the object, :func:`wcs_jacobian`) and CLASS_STAR's scale is the WCS's at the
frame centre.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch

ISO_NAMES = tuple(f"ISO{i}" for i in range(8))
#: the names :func:`extra_column` makes
EXTRA_PARAMS = set(ISO_NAMES) | {
    "CLASS_STAR", "FWHM_IMAGE", "FWHM_WORLD", "ISOAREAF_IMAGE", "ISOAREA_WORLD", "ISOAREAF_WORLD", "MU_MAX",
    "MU_THRESHOLD", "FLUX_ISOCOR", "FLUXERR_ISOCOR", "MAG_ISOCOR", "MAGERR_ISOCOR", "FLUX_BEST", "FLUXERR_BEST",
    "MAG_BEST", "MAGERR_BEST", "ERRA_IMAGE", "ERRB_IMAGE", "ERRTHETA_IMAGE", "ERRCXX_IMAGE", "ERRCYY_IMAGE",
    "ERRCXY_IMAGE", "POLAR_IMAGE",
}
_WORLD_SHAPE = ("X2", "Y2", "XY", "A", "B", "THETA", "CXX", "CYY", "CXY")
WORLD_SHAPE_PARAMS = ({f"{p}{k}_WORLD" for p in ("", "ERR") for k in _WORLD_SHAPE}
                      | {f"{p}THETA_{f}" for p in ("", "ERR") for f in ("SKY", "J2000")})
PEAK_WORLD_PARAMS = {"XPEAK_WORLD", "YPEAK_WORLD", "ALPHAPEAK_SKY", "DELTAPEAK_SKY", "ALPHAPEAK_J2000",
                     "DELTAPEAK_J2000"}
EXTRA_PARAMS |= WORLD_SHAPE_PARAMS | PEAK_WORLD_PARAMS | {"XPEAK_IMAGE", "YPEAK_IMAGE"}
#: keys (with SExtractor 2.25's defaults) that these parameters read
EXTRA_DEFAULTS = {"SEEING_FWHM": "1.2", "STARNNW_NAME": "default.nnw", "PIXEL_SCALE": "1.0"}


def resolve_file(name: str, sex_path: Optional[Path], key: str) -> Path:
    """SExtractor's resolution of a file name: as given (relative to the working directory), then
    beside the ``.sex`` file."""
    p = Path(name).expanduser()
    if p.is_file():
        return p
    if sex_path is not None and not p.is_absolute() and (sex_path.parent / p).is_file():
        return sex_path.parent / p
    raise FileNotFoundError(f"{key} {name!r}: no such file in the working directory"
                            + (f" nor beside {sex_path}" if sex_path is not None else ""))


def _mag(flux: np.ndarray, zp: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, zp - 2.5 * np.log10(np.where(flux > 0, flux, 1.0)), 99.0)


def _magerr(flux: np.ndarray, err: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(flux > 0, 1.086 * err / np.where(flux > 0, flux, 1.0), 99.0)


def unimplemented_extra(cfg, names) -> list[str]:
    """What of the requested extra parameters we cannot make (for classic's one warning)."""
    out = []
    if "CLASS_STAR" in names and cfg.floats("SEEING_FWHM")[0] <= 0:
        out.append("SEEING_FWHM 0 (the FWHM of a PSF model): CLASS_STAR not written")
    return out


class ColumnContext:
    """What the extra columns are made from: the configuration, :func:`astroprep_torch.classic.extract`'s
    result, its catalog's columns (numpy) and the frame's header; per-pixel quantities (ISO areas,
    FWHM) are computed once, on first use."""

    def __init__(self, cfg, result: dict, cols: dict, header=None):
        self.cfg, self.result, self.cols, self.header = cfg, result, cols, header
        self._cache: dict = {}

    def cached(self, key, fn):
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def tensor(self, key: str) -> torch.Tensor:
        return self.result["catalog"].columns[key]

    def pixels(self):
        """(values, px, py, row, n): the objects' own pixels of the background-subtracted image."""
        return self.cached("pixels", lambda: object_pixels(self.result["catalog"], self.result["sub"]))

    def wcs(self):
        def make():
            if self.header is None:
                return None
            from astropy.wcs import WCS

            w = WCS(self.header)
            return w.celestial if w.has_celestial else None
        return self.cached("wcs", make)

    def pixscale(self) -> float:
        """arcsec per pixel: PIXEL_SCALE, or when 0 the square root of the WCS's pixel area at the frame
        centre (SExtractor's ``wcs->pixscale``)."""
        ps = self.cfg.floats("PIXEL_SCALE")[0]
        if ps > 0:
            return ps
        w = self.wcs()
        if w is None:
            raise ValueError("PIXEL_SCALE 0 needs a celestial WCS in the frame's header")
        H, W = self.result["sub"].shape[-2:]
        return math.sqrt(float(wcs_pixel_area(w, [(W - 1) / 2.0], [(H - 1) / 2.0])[0])) * 3600.0

    def pixel_area_deg2(self) -> np.ndarray:
        """Per object, the pixel area in deg^2 (PIXEL_SCALE^2, or the WCS Jacobian at the object)."""
        ps = self.cfg.floats("PIXEL_SCALE")[0]
        n = len(self.cols["x"])
        if ps > 0:
            return np.full(n, (ps / 3600.0) ** 2)
        return self.cached("jac", lambda: wcs_pixel_area(self.wcs(), self.cols["x"], self.cols["y"]))


def object_pixels(cat, sub: torch.Tensor, own: bool = True):
    """The catalog's segmentation as pixel lists: ``(values, px, py, row, n)`` with ``values`` the
    (float32) image ``sub`` at every object pixel and ``row`` the catalog row of its object.  ``own``:
    without the pixels of objects that CLEAN merged into others (when the detector says which: SExtractor
    measures ISO0..7 and the FWHM before CLEAN merges them)."""
    B, _, H, W = sub.shape
    seg = cat._segmentation
    if hasattr(seg, "pixels"):
        idx, lab = seg.pixels, seg.labels
        cleaned = getattr(seg, "cleaned", None)
        if own and cleaned is not None and cleaned.numel():
            keep = ~torch.isin(idx, cleaned)
            idx, lab = idx[keep], lab[keep]
    else:
        flat = seg.reshape(-1)
        idx = torch.nonzero(flat > 0).squeeze(1)
        lab = flat.index_select(0, idx)
    b = idx // (H * W)
    rem = idx % (H * W)
    bi, num = cat.columns["batch_index"].long(), cat.columns["number"].long()
    base = max(int(num.max()) if num.numel() else 0, int(lab.max()) if lab.numel() else 0) + 1
    key = bi * base + num
    q = b * base + lab
    row = torch.searchsorted(key, q).clamp(max=max(len(key) - 1, 0))
    if len(key) == 0 or not bool((key.index_select(0, row) == q).all()):  # a catalog subset: its rows only
        keep = (key.index_select(0, row) == q) if len(key) else torch.zeros_like(q, dtype=torch.bool)
        idx, rem, row = idx[keep], rem[keep], row[keep]
    values = sub.reshape(-1).index_select(0, idx).to(torch.float32)
    return values, rem % W, rem // W, row, len(cat)


def wcs_jacobian(wcs, x: np.ndarray, y: np.ndarray):
    """SExtractor's local Jacobian (``wcs_jacobian``) at 0-based (x, y): ``(J, lng, lat)`` with ``J``
    (N, 2, 2), ``J[:, j, i]`` = d world_j / d pixel_i by forward differences over one pixel (deg; the
    longitude difference wrapped to +-180 and times cos(lat)), ``lng`` / ``lat`` the world axes."""
    if wcs is None:
        raise ValueError("PIXEL_SCALE 0 and the _WORLD parameters need a celestial WCS in the frame's header")
    x, y = np.asarray(x, float), np.asarray(y, float)
    pts = np.concatenate([np.c_[x, y], np.c_[x + 1.0, y], np.c_[x, y + 1.0]])
    sky = wcs.all_pix2world(pts, 0).reshape(3, len(x), 2)
    lng, lat = (int(wcs.wcs.lng), int(wcs.wcs.lat)) if wcs.wcs.lng >= 0 else (0, 1)
    d = sky[1:] - sky[0]  # (pixel axis i, N, world axis j)
    d[..., lng] = ((d[..., lng] + 180.0) % 360.0 - 180.0) * np.cos(np.deg2rad(sky[0][:, lat]))
    return np.transpose(d, (1, 2, 0)), lng, lat


def wcs_pixel_area(wcs, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """deg^2 per pixel at 0-based (x, y): ``|det J|`` of :func:`wcs_jacobian` (SExtractor's pixscale2)."""
    j = wcs_jacobian(wcs, x, y)[0]
    return np.abs(j[:, 0, 0] * j[:, 1, 1] - j[:, 0, 1] * j[:, 1, 0])


def _fmod_m90_p90(a: np.ndarray) -> np.ndarray:
    return np.where(a > 0, np.fmod(a + 90.0, 180.0) - 90.0, np.fmod(a - 90.0, 180.0) + 90.0)


def world_shape(mx2: np.ndarray, my2: np.ndarray, mxy: np.ndarray, jacobian, prefix: str = "") -> dict:
    """SExtractor's ``astrom_shapeparam`` / ``astrom_errparam``: second moments (pixel^2) through the
    local Jacobian (its formulas, including the cross term ``lm0 lm1 dxy`` as written there) ->
    ``{prefix}X2/Y2/XY/A/B/CXX/CYY/CXY_WORLD``, ``{prefix}THETA_WORLD`` / ``_SKY`` / ``_J2000`` (deg; J2000 =
    SKY, i.e. an equinox-2000 frame); ``jacobian`` = :func:`wcs_jacobian`'s ``(J, lng, lat)``."""
    jac, lng, lat = jacobian
    lm0, lm1, lm2, lm3 = jac[:, lng, lng], jac[:, lng, lat], jac[:, lat, lng], jac[:, lat, lat]
    dx2, dy2, dxy = (np.asarray(v, np.float64) for v in (mx2, my2, mxy))
    xm2 = lm0 * lm0 * dx2 + lm1 * lm1 * dy2 + lm0 * lm1 * dxy
    ym2 = lm2 * lm2 * dx2 + lm3 * lm3 * dy2 + lm2 * lm3 * dxy
    xym = lm0 * lm2 * dx2 + lm1 * lm3 * dy2 + (lm0 * lm3 + lm1 * lm2) * dxy
    t = xm2 - ym2
    thetaw = _fmod_m90_p90(np.where(t == 0.0, 45.0, np.rad2deg(0.5 * np.arctan2(2.0 * xym, t))))
    thetas = _fmod_m90_p90(np.where(thetaw > 0.0, 90.0, -90.0) - thetaw) if lng < lat else thetaw
    r = np.sqrt(0.25 * t * t + xym * xym)
    pm2 = 0.5 * (xm2 + ym2)
    det = xm2 * ym2 - xym * xym
    small = det < 1e-6
    det, xyc = np.where(small, 1e-6, det), np.where(small, xym * 0.99999, xym)
    with np.errstate(invalid="ignore"):
        out = {"X2": xm2, "Y2": ym2, "XY": xym, "A": np.sqrt(pm2 + r), "B": np.sqrt(pm2 - r), "THETA": thetaw,
               "CXX": ym2 / det, "CYY": xm2 / det, "CXY": -2.0 * xyc / det}
    res = {f"{prefix}{k}_WORLD": v.astype(np.float32) for k, v in out.items()}
    res[f"{prefix}THETA_SKY"] = thetas.astype(np.float32)
    res[f"{prefix}THETA_J2000"] = thetas.astype(np.float32)
    return res


# ------------------------------------------------------------------------------------------------
# the columns
# ------------------------------------------------------------------------------------------------
def iso_areas(ctx: ColumnContext) -> np.ndarray:
    """(N, 8) ISO0..ISO7."""
    from .photometry.isoprofile import isophotal_areas

    def make():
        values, _, _, row, n = ctx.pixels()
        return isophotal_areas(values, row, n, own_peak(ctx), ctx.tensor("thresh")).cpu().numpy()
    return ctx.cached("iso", make)


def peak_pixel(ctx: ColumnContext) -> np.ndarray:
    """(N, 2) 0-based (x, y) of each object's brightest pixel in the detection-filtered image
    (SExtractor's XPEAK/YPEAK: its ``cdvalue`` maximum, the merged neighbours' included)."""
    from .detect import filter_image

    def make():
        cat, sub = ctx.result["catalog"], ctx.result["sub"]
        _, px, py, row, n = object_pixels(cat, sub, own=False)
        B, _, H, W = sub.shape
        filt = filter_image(sub, ctx.cfg.kernel).reshape(-1)
        flat = cat.columns["batch_index"].long().index_select(0, row) * (H * W) + py * W + px
        f = filt.index_select(0, flat)
        best = torch.full((n,), -float("inf"), dtype=f.dtype, device=f.device).scatter_reduce(0, row, f, "amax")
        hit = (f == best.index_select(0, row)).nonzero().squeeze(1)
        first = torch.full((n,), len(f), dtype=torch.int64, device=f.device).scatter_reduce(0, row[hit], hit, "amin")
        return np.c_[px[first].cpu().numpy(), py[first].cpu().numpy()] if n else np.zeros((0, 2), np.int64)
    return ctx.cached("peak_pixel", make)


def own_peak(ctx: ColumnContext) -> torch.Tensor:
    """The peak over an object's own pixels (FLUX_MAX before CLEAN merges neighbours into it)."""
    def make():
        values, _, _, row, n = ctx.pixels()
        out = torch.full((n,), -float("inf"), dtype=values.dtype, device=values.device)
        return out.scatter_reduce(0, row, values, "amax")
    return ctx.cached("own_peak", make)


def _object_background(ctx: ColumnContext) -> torch.Tensor:
    """The background map at SExtractor's ``(int)(x + 0.5), (int)(y + 0.5)`` pixel of each object."""
    bkg = ctx.result["background"]
    H, W = bkg.shape[-2:]
    ix = torch.floor(ctx.tensor("x").double() + 0.5).long().clamp(0, W - 1)
    iy = torch.floor(ctx.tensor("y").double() + 0.5).long().clamp(0, H - 1)
    return bkg[ctx.tensor("batch_index").long(), 0, iy, ix]


def fwhm(ctx: ColumnContext) -> np.ndarray:
    from .photometry.isoprofile import fwhm_image

    def make():
        values, px, py, row, n = ctx.pixels()
        se = ctx.result.get("extractor")
        sat = None if se is None or se.saturation is None else (se.saturation - _object_background(ctx))
        return fwhm_image(values, px, py, row, n, x=ctx.tensor("x"), y=ctx.tensor("y"), a=ctx.tensor("a"),
                          b=ctx.tensor("b"), peak=own_peak(ctx), thresh=ctx.tensor("thresh"),
                          saturation=sat).cpu().numpy()
    return ctx.cached("fwhm", make)


def analysis_threshold(ctx: ColumnContext) -> float:
    """SExtractor's global ``field->thresh`` (ADU): ANALYSIS_THRESH x the global RMS (RELATIVE)."""
    thr = ctx.cfg.floats("ANALYSIS_THRESH")[0]
    if ctx.cfg.get("THRESH_TYPE").upper() == "ABSOLUTE":
        return thr
    return thr * float(ctx.result["backsig"][0])


def class_star(ctx: ColumnContext) -> Optional[np.ndarray]:
    from .photometry.classify import class_star as _class_star

    seeing = ctx.cfg.floats("SEEING_FWHM")[0]
    if seeing <= 0:
        return None
    nnw = resolve_file(ctx.cfg.get("STARNNW_NAME"), ctx.cfg.path, "STARNNW_NAME")
    iso = torch.from_numpy(iso_areas(ctx))
    return _class_star(iso, ctx.tensor("peak").cpu(), analysis_threshold(ctx), seeing, ctx.pixscale(), nnw).numpy()


def isocor(ctx: ColumnContext) -> tuple[np.ndarray, np.ndarray]:
    """(FLUX_ISOCOR, FLUXERR_ISOCOR) in float64, as ``computeisocorflux``."""
    c = ctx.cols
    flux = c["flux_iso"].astype(np.float64)
    var = c["fluxerr_iso"].astype(np.float64) ** 2
    npix = c["fdnpix"].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ati = np.where(flux > 0, npix * c["thresh"].astype(np.float64) / np.where(flux > 0, flux, 1.0), 0.0)
        ati = np.clip(ati, 0.0, 1.0)
        fcor = flux / (1.0 - 0.196099 * ati - 0.751208 * ati * ati)
        sig = var / np.where(flux > 0, flux * flux, 1.0)
        dati = np.where(npix > 0, ati * np.sqrt(sig + 1.0 / np.where(npix > 0, npix, 1.0)), 0.0)
        dati = 0.196099 * dati + 0.751208 * 2 * ati * dati
        ecor = np.where(flux > 0, np.sqrt(sig + dati * dati) * flux, np.sqrt(var))
    return fcor, ecor


def best(ctx: ColumnContext) -> tuple[np.ndarray, np.ndarray]:
    """(FLUX_BEST, FLUXERR_BEST): ISOCOR for crowded objects (FLAGS 1), AUTO for the others."""
    fcor, ecor = isocor(ctx)
    crowded = (ctx.cols["flags"].astype(np.int64) & 1) > 0
    return (np.where(crowded, fcor, ctx.cols["flux_auto"]), np.where(crowded, ecor, ctx.cols["fluxerr_auto"]))


def error_ellipse(ctx: ColumnContext) -> dict:
    """ERRA/ERRB/ERRTHETA/ERRCXX/ERRCYY/ERRCXY_IMAGE from ERRX2/ERRY2/ERRXY_IMAGE (``endobject``)."""
    mx2, my2, mxy = (ctx.cols[k].astype(np.float64) for k in ("errx2", "erry2", "errxy"))
    d = mx2 - my2
    with np.errstate(divide="ignore", invalid="ignore"):
        theta = np.where(np.abs(d) > 0, np.arctan2(2.0 * mxy, d) / 2.0, np.pi / 4.0)
        t = np.sqrt(0.25 * d * d + mxy * mxy)
        m = 0.5 * (mx2 + my2)
        det = mx2 * my2 - mxy * mxy
        out = {"ERRA_IMAGE": np.sqrt(m + t), "ERRB_IMAGE": np.sqrt(np.maximum(m - t, 0.0)),
               "ERRTHETA_IMAGE": np.rad2deg(theta), "ERRCXX_IMAGE": my2 / det, "ERRCYY_IMAGE": mx2 / det,
               "ERRCXY_IMAGE": -2.0 * mxy / det}
    return {k: v.astype(np.float32) for k, v in out.items()}


def _warn_equinox(ctx: ColumnContext) -> None:
    """Our ``*_J2000`` shape / peak columns are the native (SKY) ones: warn for other equinoxes."""
    eq = float(getattr(ctx.wcs().wcs, "equinox", float("nan")))
    names = [n for n, _ in ctx.cfg.params if n.endswith("_J2000") and n in EXTRA_PARAMS]
    if names and math.isfinite(eq) and abs(eq - 2000.0) > 0.003:
        import warnings

        warnings.warn(f"{', '.join(names)}: the frame's equinox is {eq:g}; written in its native frame "
                      "(SExtractor precesses to J2000)", UserWarning, stacklevel=3)


def world_shapes(ctx: ColumnContext) -> dict:
    """The shape and position-error ellipses in world coordinates (:func:`world_shape`)."""
    c = ctx.cols
    ctx.cached("equinox", lambda: _warn_equinox(ctx))
    jac = wcs_jacobian(ctx.wcs(), c["x"], c["y"])
    out = world_shape(c["x2"], c["y2"], c["xy"], jac)
    out.update(world_shape(c["errx2"], c["erry2"], c["errxy"], jac, prefix="ERR"))
    return out


def _mu(ctx: ColumnContext, level: np.ndarray) -> np.ndarray:
    """Surface brightness (mag / arcsec^2) of a level (ADU per pixel)."""
    area = ctx.pixel_area_deg2() * 3600.0 ** 2
    zp = ctx.cfg.floats("MAG_ZEROPOINT")[0]
    lv = level.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(lv > 0, -2.5 * np.log10(np.where(lv > 0, lv, 1.0) / area) + zp, 99.0).astype(np.float32)


def _world_scale(ctx: ColumnContext, power: int) -> np.ndarray:
    """deg (power 1) or deg^2 (power 2) per pixel, per object."""
    a = ctx.pixel_area_deg2()
    return a if power == 2 else np.sqrt(a)


def extra_column(name: str, ctx: ColumnContext) -> Optional[np.ndarray]:
    """One of :data:`EXTRA_PARAMS` (numpy, one row per object), or None when it cannot be made."""

    c, zp = ctx.cols, ctx.cfg.floats("MAG_ZEROPOINT")[0]
    if name in ISO_NAMES:
        return iso_areas(ctx)[:, int(name[3])].astype(np.int32)
    simple = {
        "ISOAREAF_IMAGE": lambda: c["fdnpix"].astype(np.int32),
        "ISOAREA_WORLD": lambda: (c["npix"] * _world_scale(ctx, 2)).astype(np.float32),
        "ISOAREAF_WORLD": lambda: (c["fdnpix"] * _world_scale(ctx, 2)).astype(np.float32),
        "FWHM_IMAGE": lambda: fwhm(ctx),
        "FWHM_WORLD": lambda: (fwhm(ctx) * _world_scale(ctx, 1)).astype(np.float32),
        "MU_MAX": lambda: _mu(ctx, c["peak"]),
        "MU_THRESHOLD": lambda: _mu(ctx, c["thresh"]),
        "CLASS_STAR": lambda: class_star(ctx),
        "FLUX_ISOCOR": lambda: isocor(ctx)[0].astype(np.float32),
        "FLUXERR_ISOCOR": lambda: isocor(ctx)[1].astype(np.float32),
        "MAG_ISOCOR": lambda: _mag(isocor(ctx)[0], zp).astype(np.float32),
        "MAGERR_ISOCOR": lambda: _magerr(*isocor(ctx)).astype(np.float32),
        "FLUX_BEST": lambda: best(ctx)[0].astype(np.float32),
        "FLUXERR_BEST": lambda: best(ctx)[1].astype(np.float32),
        "MAG_BEST": lambda: _mag(best(ctx)[0].astype(np.float64), zp).astype(np.float32),
        "MAGERR_BEST": lambda: _magerr(*(a.astype(np.float64) for a in best(ctx))).astype(np.float32),
    }
    if name in simple:
        return simple[name]()
    if name.startswith("ERR") and name.endswith("_IMAGE"):
        return ctx.cached("errell", lambda: error_ellipse(ctx)).get(name)
    if name in WORLD_SHAPE_PARAMS:
        if ctx.wcs() is None:
            return None
        return ctx.cached("world_shape", lambda: world_shapes(ctx)).get(name)
    if name in ("XPEAK_IMAGE", "YPEAK_IMAGE"):
        return (peak_pixel(ctx)[:, 0 if name[0] == "X" else 1] + 1).astype(np.int32)
    if name in PEAK_WORLD_PARAMS:
        if ctx.wcs() is None:
            return None
        ctx.cached("equinox", lambda: _warn_equinox(ctx))
        sky = ctx.cached("peak_world", lambda: ctx.wcs().all_pix2world(peak_pixel(ctx).astype(float), 0))
        return sky[:, 0 if name.startswith(("X", "ALPHA")) else 1]
    if name == "POLAR_IMAGE":
        a2, b2 = c["a"].astype(np.float64) ** 2, c["b"].astype(np.float64) ** 2
        return ((a2 - b2) / np.where(a2 + b2 > 0, a2 + b2, 1.0)).astype(np.float32)
    return None


__all__ = ["EXTRA_PARAMS", "WORLD_SHAPE_PARAMS", "PEAK_WORLD_PARAMS", "world_shape", "wcs_jacobian", "EXTRA_DEFAULTS", "ColumnContext", "extra_column", "object_pixels", "wcs_pixel_area",
           "unimplemented_extra"]
