"""Astrometric calibration: match a frame's detections to a reference catalog and fit its WCS.

SCAMP's job for one frame, in torch (float64 throughout):

1. **Reference catalog** (:func:`load_catalog`): any table with right ascension, declination and a
   magnitude (FITS, ECSV, CSV, Parquet through ``astropy.table.Table.read``, or a Table/dict);
   columns are found by their common names (``ra``/``RA_ICRS``/``RAJ2000``/``ALPHA_J2000``...,
   ``phot_g_mean_mag``/``Gmag``/``mag``...). Proper motions (``pmra`` = mu_alpha* cos(dec) and
   ``pmdec`` in mas/yr, Gaia's convention) move the stars from the catalog epoch (``ref_epoch``
   column or ``catalog_epoch``) to the frame's epoch (Julian years) when both are known.
2. **Coarse match** (:func:`solve_astrometry`): the catalog is projected through the starting WCS
   (the header's, or :func:`pointing_wcs` from a pointing and a pixel scale only) and the brightest
   stars of both lists are matched by triangle invariants with :func:`astroprep_torch.align.match_sources`
   (astroalign's method: any rotation, scale and shift, so a header off by a few arcmin, a degree
   and a few % is fine; from a pointing only, both parities are tried).
3. **Fit**: the sky positions of the matched stars are projected onto the tangent plane at CRVAL
   (standard coordinates xi, eta) and fitted by a polynomial in the pixel offsets from CRPIX, by
   linear least squares with iterated sigma clipping. The tangent point is re-centred on the fitted
   constant term (so the polynomial has none). The polynomial is written as TAN-SIP (``A``/``B`` of
   the requested order, with an ``AP``/``BP`` inverse fitted on a grid) or TPV (``PV1_*``/``PV2_*``
   of the same degree on the intermediate coordinates of the linear part; radial terms 0).
4. **Refine**: all catalog stars are projected through the fitted WCS and paired with detections by
   mutual nearest neighbours within a radius that shrinks with the residual rms; the fit is
   repeated (a few rounds).
5. **Sanity checks** (an :class:`AstrometryError` rather than a wrong solution): at least
   ``min_matches`` pairs, at least ``min_fraction`` of the detections that could have a partner,
   more pairs than chance coincidences at that radius would give, a pixel scale within
   ``max_scale_change`` of the starting one and a residual rms below ``max_rms_px``.

The result (:class:`AstrometryResult`) holds the :class:`~astroprep_torch.wcs.TanWCS`, its FITS
header (with SCAMP's ``ASTRRMS1``/``ASTRRMS2`` residual rms in degrees), the matched pairs, their
residuals in arcsec and the rms. :func:`write_head` writes a SCAMP-style ASCII ``.head`` file.

Matching is combinatorial and runs eagerly (data-dependent sizes); every step is a batched tensor
operation (no Python loop over stars). Not differentiable (it is a fit, not a layer).
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ._runtime import one_intraop_thread
from .align import AlignmentError, match_sources
from .wcs import TanWCS

__all__ = ["AstrometryError", "ReferenceCatalog", "AstrometryResult", "load_catalog", "pointing_wcs", "detect_stars",
           "solve_image", "solved_header",
           "solve_astrometry", "AstrometrySolver", "write_head", "fit_wcs", "match_nearest"]

_F64 = torch.float64

RA_NAMES = ("ra", "ra_icrs", "raj2000", "ra_j2000", "_raj2000", "alpha_j2000", "alphawin_j2000", "x_world",
            "radeg", "ra_deg", "ra2000")
DEC_NAMES = ("dec", "de", "dec_icrs", "de_icrs", "dej2000", "decj2000", "dec_j2000", "_dej2000", "delta_j2000",
             "deltawin_j2000", "y_world", "decdeg", "dec_deg", "dec2000")
MAG_NAMES = ("mag", "phot_g_mean_mag", "gmag", "g_mag", "rmag", "r_mag", "imag", "i_mag", "vmag", "v_mag",
             "bmag", "jmag", "mag_auto", "mag_best", "magnitude", "phot_bp_mean_mag", "phot_rp_mean_mag")
PMRA_NAMES = ("pmra", "pm_ra", "pmra_cosdec", "pmrade", "pmalpha")
PMDEC_NAMES = ("pmdec", "pm_dec", "pmde", "pmdelta")
EPOCH_NAMES = ("ref_epoch", "epoch", "refepoch")


class AstrometryError(ValueError):
    """The astrometric solution failed (too few or implausible pairs): no WCS is returned."""


# ----------------------------------------------------------------------------------------------
# Reference catalog
# ----------------------------------------------------------------------------------------------
@dataclass
class ReferenceCatalog:
    """Reference stars as float64 tensors: ``ra``, ``dec`` (deg, at the frame epoch) and ``mag``."""

    ra: Tensor
    dec: Tensor
    mag: Tensor

    def __len__(self) -> int:
        return int(self.ra.shape[0])


def _find_column(colnames: Sequence[str], candidates: Sequence[str], given: Optional[str]) -> Optional[str]:
    if given is not None:
        return given if given in colnames else None
    lower = {c.lower(): c for c in colnames}
    for name in candidates:
        if name in lower:
            return lower[name]
    return None


def _as_table(source):
    from astropy.table import Table

    if isinstance(source, Table):
        return source, "table"
    if isinstance(source, dict):
        return Table({k: np.asarray(v.detach().cpu() if isinstance(v, Tensor) else v) for k, v in source.items()}), \
            "dict"
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"catalog: file not found: {path}")
    fmt = {".csv": "ascii.csv", ".ecsv": "ascii.ecsv", ".parquet": "parquet", ".pq": "parquet"}.get(
        path.suffix.lower())
    try:
        if fmt == "parquet":  # pyarrow directly: astropy's reader also wants pandas
            import pyarrow.parquet as pq

            pt = pq.read_table(path)
            return Table({n: c.to_numpy() for n, c in zip(pt.column_names, pt.columns)}), str(path)
        return (Table.read(path, format=fmt) if fmt else Table.read(path)), str(path)
    except Exception as exc:
        raise ValueError(f"catalog: cannot read {path} as a table (FITS, ECSV, CSV or Parquet): {exc}") from exc


def load_catalog(source, *, epoch: Optional[float] = None, catalog_epoch: Optional[float] = None,
                 ra: Optional[str] = None, dec: Optional[str] = None, mag: Optional[str] = None) -> ReferenceCatalog:
    """Reference stars from a table file (FITS, ECSV, CSV, Parquet), an astropy Table or a dict.

    Columns are found by their common names (``RA_NAMES``, ``DEC_NAMES``, ``MAG_NAMES``, case-
    insensitive) unless given. RA/Dec are degrees; rows with a non-finite RA, Dec or magnitude are
    dropped. A missing magnitude column gives all stars magnitude 0 (matching then ignores
    brightness). With ``epoch`` (Julian year of the frame) and proper-motion columns, positions are
    moved from ``catalog_epoch`` (or a ``ref_epoch`` column; Gaia DR3's 2016.0 when neither) to
    ``epoch``; missing proper motions count as 0.

    Raises:
        FileNotFoundError, ValueError naming the file and the columns it has when RA/Dec are missing.
    """
    table, name = _as_table(source)
    cols = list(table.colnames)
    c_ra, c_dec = _find_column(cols, RA_NAMES, ra), _find_column(cols, DEC_NAMES, dec)
    if c_ra is None or c_dec is None:
        missing = " and ".join(n for n, c in (("RA", c_ra), ("Dec", c_dec)) if c is None)
        raise ValueError(f"catalog {name}: no {missing} column (looked for {ra or RA_NAMES[:6]} / "
                         f"{dec or DEC_NAMES[:6]}, case-insensitive); its columns are {cols[:20]}")
    c_mag = _find_column(cols, MAG_NAMES, mag)
    if mag is not None and c_mag is None:
        raise ValueError(f"catalog {name}: magnitude column {mag!r} not found; its columns are {cols[:20]}")
    get = lambda c: np.ma.filled(np.ma.asarray(table[c], dtype=np.float64), np.nan)
    a, d = get(c_ra), get(c_dec)
    m = get(c_mag) if c_mag is not None else np.zeros_like(a)
    c_pmra, c_pmdec = _find_column(cols, PMRA_NAMES, None), _find_column(cols, PMDEC_NAMES, None)
    if epoch is not None and (c_pmra is not None or c_pmdec is not None):
        c_ep = _find_column(cols, EPOCH_NAMES, None)
        t0 = get(c_ep) if c_ep is not None else np.full_like(a, 2016.0 if catalog_epoch is None else catalog_epoch)
        if catalog_epoch is not None:
            t0 = np.full_like(a, catalog_epoch)
        pmra = np.nan_to_num(get(c_pmra)) if c_pmra is not None else 0.0
        pmdec = np.nan_to_num(get(c_pmdec)) if c_pmdec is not None else 0.0
        a, d = _apply_proper_motion(a, d, pmra, pmdec, float(epoch) - t0)
    good = np.isfinite(a) & np.isfinite(d) & np.isfinite(m) & (np.abs(d) <= 90)
    t = lambda v: torch.as_tensor(np.ascontiguousarray(v[good]), dtype=_F64)
    return ReferenceCatalog(t(np.mod(a, 360.0)), t(d), t(m))


def _apply_proper_motion(ra, dec, pmra, pmdec, dt_years):
    """Linear space motion on the sphere: ``pmra`` (mu_alpha* = mu_alpha cos dec) and ``pmdec`` in mas/yr."""
    r, dd = np.radians(ra), np.radians(dec)
    p = np.stack([np.cos(dd) * np.cos(r), np.cos(dd) * np.sin(r), np.sin(dd)])
    east = np.stack([-np.sin(r), np.cos(r), np.zeros_like(r)])
    north = np.stack([-np.sin(dd) * np.cos(r), -np.sin(dd) * np.sin(r), np.cos(dd)])
    k = np.radians(1.0 / 3.6e6) * dt_years
    q = p + east * (pmra * k) + north * (pmdec * k)
    q = q / np.linalg.norm(q, axis=0)
    return np.degrees(np.arctan2(q[1], q[0])) % 360.0, np.degrees(np.arcsin(np.clip(q[2], -1, 1)))


# ----------------------------------------------------------------------------------------------
# Starting WCS and catalog selection
# ----------------------------------------------------------------------------------------------
def pointing_wcs(ra: float, dec: float, pixel_scale: float, shape, *, rotation: float = 0.0,
                 parity: int = -1) -> TanWCS:
    """A TAN WCS centred on the frame from a pointing (deg) and a pixel scale (arcsec/px) only.

    ``parity=-1``: east to the left (RA decreases with x), the usual sky view; ``+1`` mirrored.
    ``rotation`` (deg) is the position angle of the y axis.
    """
    h, w = int(shape[0]), int(shape[1])
    s, t = pixel_scale / 3600.0, math.radians(rotation)
    cd = np.array([[parity * s * math.cos(t), s * math.sin(t)], [-parity * s * math.sin(t), s * math.cos(t)]])
    meta = [dict(kind="TAN", ctype=("RA--", "DEC-"), radesys="ICRS", equinox=2000.0, shape=(h, w))]
    return TanWCS([(w - 1) / 2.0, (h - 1) / 2.0], cd, [ra % 360.0, dec], 180.0 if dec < 90 else 0.0, meta=meta)


def _standard(ra: Tensor, dec: Tensor, crval: Tensor) -> tuple[Tensor, Tensor]:
    """Gnomonic standard coordinates (xi, eta) in deg about ``crval`` (NaN beyond 90 deg)."""
    w = TanWCS([0.0, 0.0], np.eye(2), crval.tolist(), 180.0)
    return w.world_to_pixel(ra, dec)


def _unproject(xi: Tensor, eta: Tensor, crval: Tensor) -> tuple[Tensor, Tensor]:
    w = TanWCS([0.0, 0.0], np.eye(2), crval.tolist(), 180.0)
    return w.pixel_to_world(xi, eta)


def _project_catalog(wcs: TanWCS, cat: ReferenceCatalog, shape, margin: float):
    """Catalog rows inside the frame grown by ``margin`` px, and their pixel positions (n, 2)."""
    h, w = shape
    x, y = wcs.world_to_pixel(cat.ra, cat.dec)
    x, y = x.reshape(-1), y.reshape(-1)
    inside = torch.isfinite(x) & torch.isfinite(y) & (x > -0.5 - margin) & (x < w - 0.5 + margin) & \
        (y > -0.5 - margin) & (y < h - 0.5 + margin)
    idx = inside.nonzero().squeeze(1)
    return idx, torch.stack([x[idx], y[idx]], 1)


# ----------------------------------------------------------------------------------------------
# Nearest-neighbour pairing within a radius (row buckets + sorted x: no dense distance matrix)
# ----------------------------------------------------------------------------------------------
def match_nearest(a: Tensor, b: Tensor, radius: float) -> Tensor:
    """Mutual nearest neighbours between points ``a`` (N, 2) and ``b`` (M, 2) closer than ``radius``.

    Returns (K, 2) long pairs ``(i_a, i_b)``. Points of ``b`` are bucketed in rows of height
    ``radius`` and sorted by x within a row, so each point of ``a`` looks at 3 short x-ranges.
    """
    if a.shape[0] == 0 or b.shape[0] == 0:
        return torch.zeros(0, 2, dtype=torch.long, device=a.device)
    r = float(radius)
    lo_xy = torch.minimum(a.amin(0), b.amin(0))
    span = float(torch.maximum(a[:, 0].amax(), b[:, 0].amax()) - lo_xy[0]) + 4 * r + 1
    row_b = torch.floor((b[:, 1] - lo_xy[1]) / r)
    key_b = row_b * span + (b[:, 0] - lo_xy[0])
    key_b, order = key_b.sort()
    row_a = torch.floor((a[:, 1] - lo_xy[1]) / r)
    ia_l, jb_l = [], []
    for dr in (-1.0, 0.0, 1.0):
        base = (row_a + dr) * span + (a[:, 0] - lo_xy[0])
        lo = torch.searchsorted(key_b, base - r)
        hi = torch.searchsorted(key_b, base + r, right=True)
        cnt = hi - lo
        ia = torch.repeat_interleave(torch.arange(a.shape[0], device=a.device), cnt)
        start = torch.repeat_interleave(lo - (cnt.cumsum(0) - cnt), cnt)
        ia_l.append(ia)
        jb_l.append(order[start + torch.arange(ia.shape[0], device=a.device)])
    ia, jb = torch.cat(ia_l), torch.cat(jb_l)
    d2 = (a[ia] - b[jb]).pow(2).sum(-1)
    keep = d2 < r * r
    ia, jb, d2 = ia[keep], jb[keep], d2[keep]
    best_a = torch.full((a.shape[0],), math.inf, dtype=d2.dtype, device=a.device).scatter_reduce(
        0, ia, d2, "amin")
    best_b = torch.full((b.shape[0],), math.inf, dtype=d2.dtype, device=a.device).scatter_reduce(
        0, jb, d2, "amin")
    mutual = (d2 == best_a[ia]) & (d2 == best_b[jb])
    ia, jb = ia[mutual], jb[mutual]
    first = torch.ones_like(ia, dtype=torch.bool)  # exact ties: one pair per point
    if ia.numel() > 1:
        ia_s, perm = ia.sort(stable=True)
        dup = torch.zeros_like(first)
        dup[1:] = ia_s[1:] == ia_s[:-1]
        first[perm[dup]] = False
    return torch.stack([ia[first], jb[first]], 1)


# ----------------------------------------------------------------------------------------------
# Polynomial fit: (pixel offsets) -> standard coordinates, robust least squares
# ----------------------------------------------------------------------------------------------
def _exponents(order: int) -> list[tuple[int, int]]:
    return [(p, d - p) for d in range(order + 1) for p in range(d, -1, -1)]


def _design(u: Tensor, v: Tensor, order: int) -> Tensor:
    """Monomials ``u^p v^q``, ``p + q <= order`` (n, K), in the order of :func:`_exponents`."""
    pu = [torch.ones_like(u)]
    pv = [torch.ones_like(v)]
    for _ in range(order):
        pu.append(pu[-1] * u)
        pv.append(pv[-1] * v)
    return torch.stack([pu[p] * pv[q] for p, q in _exponents(order)], 1)


def _lstsq(D: Tensor, t: Tensor, w: Tensor) -> Tensor:
    """Weighted least squares ``D c = t`` (t (n, 2)); weight 0 leaves a row out.

    Normal equations with Jacobi (column) scaling, solved in float64: the monomials are of pixel
    offsets normalised to [-1, 1], so the scaled Gram matrix stays well conditioned up to order 7."""
    Dw = D * w.unsqueeze(1)
    G = Dw.T @ D
    d = G.diagonal().clamp_min(1e-300).rsqrt()
    c = torch.linalg.solve(G * d[:, None] * d[None, :], (Dw.T @ t) * d[:, None])
    return c * d[:, None]


def _robust_poly(u: Tensor, v: Tensor, target: Tensor, order: int, clip: float, max_iter: int = 10,
                 sigma: Optional[Tensor] = None, keep: Optional[Tensor] = None):
    """Iterated sigma-clipped polynomial fit; returns (coeffs (K, 2), keep mask (n,), residuals (n, 2)).

    ``sigma`` (n,): relative position errors; pairs are weighted by ``1 / sigma^2`` and clipped on
    their residual divided by ``sigma``. ``keep``: the starting inlier mask (default all)."""
    D = _design(u, v, order)
    w = torch.ones_like(u) if sigma is None else 1.0 / sigma.clamp_min(1e-12) ** 2
    if keep is None:
        keep = torch.ones(u.shape[0], dtype=torch.bool, device=u.device)
    for _ in range(max_iter):
        c = _lstsq(D, target, w * keep)
        res = D @ c - target
        r2 = res.pow(2).sum(1) * w
        s2 = r2[keep].median() / (2 * math.log(2))  # per-axis variance from the chi^2_2 median
        new = r2 <= (clip * clip) * s2.clamp_min(1e-30)
        if bool((new == keep).all()) or int(new.sum()) < D.shape[1] + 2:
            break
        keep = new
    return c, keep, res


@dataclass
class _Fit:
    wcs: TanWCS
    keep: Tensor
    residuals: Tensor  # (n, 2) arcsec on the tangent plane, model - catalog


def fit_wcs(x: Tensor, y: Tensor, ra: Tensor, dec: Tensor, *, crval, crpix, shape, order: int = 3,
            distortion: str = "sip", clip: float = 3.5, max_iter: int = 10, sigma: Optional[Tensor] = None) -> _Fit:
    """Fit a TAN-SIP (or TPV) WCS to pairs of 0-based pixels and sky positions (deg), float64.

    ``crpix`` (0-based) stays fixed; ``crval`` is the starting tangent point, re-centred twice on the
    fitted constant term. ``order`` 1 gives plain TAN. Iterated ``clip``-sigma clipping of the 2-D
    residuals. ``sigma`` (n,): optional position errors (px) weighting the pairs. Returns the WCS,
    the inlier mask and the residuals (arcsec) of every pair.
    """
    x, y, ra, dec = (torch.as_tensor(t, dtype=_F64).reshape(-1) for t in (x, y, ra, dec))
    crval = torch.as_tensor(crval, dtype=_F64).reshape(2).clone()
    cx, cy = float(crpix[0]), float(crpix[1])
    s = max(float(shape[0]), float(shape[1])) / 2.0
    u, v = (x - cx) / s, (y - cy) / s
    keep = None
    for _ in range(3):
        xi, eta = _standard(ra, dec, crval)
        c, keep, res = _robust_poly(u, v, torch.stack([xi.reshape(-1), eta.reshape(-1)], 1), order, clip, max_iter,
                                    None if sigma is None else torch.as_tensor(sigma, dtype=_F64).reshape(-1), keep)
        ra0, dec0 = _unproject(c[0, 0:1], c[0, 1:2], crval)
        crval = torch.cat([ra0.reshape(1), dec0.reshape(1)])
    scale = torch.tensor([float(s ** (p + q)) for p, q in _exponents(order)], dtype=_F64)
    coef = c / scale.unsqueeze(1)  # per pixel^(p+q)
    header = _poly_header(coef, order, crval, (cx, cy), shape, distortion)
    return _Fit(TanWCS.from_header(header), keep, res * 3600.0)


def _poly_header(coef: Tensor, order: int, crval: Tensor, crpix, shape, distortion: str):
    """FITS header of the fitted polynomial (coef (K, 2): xi, eta per monomial of pixel offsets)."""
    from astropy.io import fits

    exps = _exponents(order)
    lin = {e: coef[k] for k, e in enumerate(exps)}
    cd = torch.stack([lin[(1, 0)], lin[(0, 1)]], 1)  # columns: d/du, d/dv -> [[xi_u, xi_v], [eta_u, eta_v]]
    h = fits.Header()
    h["NAXIS"], h["NAXIS1"], h["NAXIS2"] = 2, int(shape[1]), int(shape[0])
    proj = "TAN" if order < 2 else {"sip": "TAN-SIP", "tpv": "TPV"}[distortion]
    h["CTYPE1"], h["CTYPE2"] = f"RA---{proj}", f"DEC--{proj}"
    h["CRPIX1"], h["CRPIX2"] = crpix[0] + 1.0, crpix[1] + 1.0
    h["CRVAL1"], h["CRVAL2"] = float(crval[0]) % 360.0, float(crval[1])
    for i in range(2):
        for j in range(2):
            h[f"CD{i + 1}_{j + 1}"] = float(cd[i, j])
    h["LONPOLE"] = 180.0
    h["RADESYS"], h["EQUINOX"] = "ICRS", 2000.0
    if order >= 2 and distortion == "sip":
        _sip_keys(h, coef, exps, cd, order, crpix, shape)
    elif order >= 2:
        _tpv_keys(h, coef, exps, cd, order, shape)
    return h


def _sip_keys(h, coef, exps, cd, order, crpix, shape):
    """SIP A/B = CD^-1 (higher-order coefficients), and an AP/BP inverse of order + 1 on a grid."""
    cdinv = torch.linalg.inv(cd)
    A = torch.zeros(order + 1, order + 1, dtype=_F64)
    B = torch.zeros_like(A)
    for k, (p, q) in enumerate(exps):
        if p + q >= 2:
            ab = cdinv @ coef[k]
            A[p, q], B[p, q] = ab[0], ab[1]
    h["A_ORDER"], h["B_ORDER"] = order, order
    for p, q in exps:
        if p + q >= 2:
            h[f"A_{p}_{q}"], h[f"B_{p}_{q}"] = float(A[p, q]), float(B[p, q])
    H, W = shape
    gy, gx = torch.meshgrid(torch.linspace(-0.5, H - 0.5, 40, dtype=_F64),
                            torch.linspace(-0.5, W - 0.5, 40, dtype=_F64), indexing="ij")
    uu, vv = gx.reshape(-1) - crpix[0], gy.reshape(-1) - crpix[1]
    D = _design(uu, vv, order)
    a_idx = [(p, q) for p, q in exps]
    Ua = uu + D @ torch.stack([A[p, q] for p, q in a_idx])
    Va = vv + D @ torch.stack([B[p, q] for p, q in a_idx])
    inv = order + 1
    s = max(H, W) / 2.0
    Dinv = _design(Ua / s, Va / s, inv)
    c = _lstsq(Dinv, torch.stack([uu - Ua, vv - Va], 1), torch.ones_like(uu))
    iexps = _exponents(inv)
    h["AP_ORDER"], h["BP_ORDER"] = inv, inv
    for k, (p, q) in enumerate(iexps):
        f = s ** (p + q)
        h[f"AP_{p}_{q}"], h[f"BP_{p}_{q}"] = float(c[k, 0] / f), float(c[k, 1] / f)


def _tpv_keys(h, coef, exps, cd, order, shape):
    """TPV: the same polynomial re-expressed in the intermediate coordinates (X, Y) = CD (u, v)."""
    from .wcs import _TPV_TERMS

    # exact re-expansion: sample the fitted polynomial on (order + 3)^2 points of the frame's size and
    # solve for the coefficients of X^p Y^q (normalised by the half size S in degrees, then rescaled)
    S = max(shape) / 2.0 * float(torch.linalg.det(cd).abs().sqrt())
    g = torch.linspace(-1.0, 1.0, order + 3, dtype=_F64)
    Xn, Yn = (t.reshape(-1) for t in torch.meshgrid(g, g, indexing="ij"))
    uv = torch.linalg.solve(cd, torch.stack([Xn * S, Yn * S]))
    vals = _design(uv[0], uv[1], order) @ coef  # (m, 2): xi, eta at those points
    c = torch.linalg.lstsq(_design(Xn, Yn, order), vals).solution
    c = c / torch.tensor([S ** (p + q) for p, q in exps], dtype=_F64).unsqueeze(1)
    K = max(k for k, (kind, p, q) in enumerate(_TPV_TERMS) if (p + q if kind == "m" else p) <= order) + 1
    pv = torch.zeros(2, K, dtype=_F64)
    index = {(p, q): k for k, (p, q) in enumerate(exps)}
    for k in range(K):
        kind, p, q = _TPV_TERMS[k]
        if kind == "m":
            pv[0, k] = c[index[(p, q)], 0]  # PV1_k: xi^p eta^q -> X^p Y^q
            pv[1, k] = c[index[(q, p)], 1]  # PV2_k: eta^p xi^q -> X^q Y^p
    pv[:, 0] = 0.0  # the constant is absorbed by the re-centred CRVAL
    for i in range(2):
        for k in range(K):
            h[f"PV{i + 1}_{k}"] = float(pv[i, k])


# ----------------------------------------------------------------------------------------------
# The solver
# ----------------------------------------------------------------------------------------------
@dataclass
class AstrometryResult:
    """A solved frame.

    Attributes:
        wcs: the fitted :class:`~astroprep_torch.wcs.TanWCS` (float64, one element).
        header: its astropy ``Header`` with ``ASTRRMS1``/``ASTRRMS2`` (SCAMP: residual rms in deg),
            ``ASTRNMAT`` (pairs used) and HISTORY lines.
        pairs: (K, 2) long, ``(detection index, catalog row)`` of the pairs kept by the clipping.
        residuals: (K, 2) float64 arcsec, fitted minus catalog position on the tangent plane
            (east, north).
        rms: (2,) arcsec rms of the residuals per axis; ``rms_arcsec`` the 2-D rms (float).
        rms_px: the 2-D rms in pixels; ``n_candidates``: pairs before clipping.
    """

    wcs: TanWCS
    header: object
    pairs: Tensor
    residuals: Tensor
    rms: Tensor
    rms_arcsec: float
    rms_px: float
    n_candidates: int

    @property
    def n_matches(self) -> int:
        return int(self.pairs.shape[0])


def _coarse_match(det_xy, det_flux, cat_xy, cat_mag, tol, min_matches):
    """Similarity (2, 3) mapping catalog pixels (through the starting WCS) onto detections.

    Tries 40 then 80 control points, at ``tol`` then ``2 tol`` (distortion the start lacks)."""
    last = None
    for t in (tol, 2 * tol):
        for ncp in (40, 80):
            try:
                res = match_sources(cat_xy, det_xy, src_flux=10 ** (-0.4 * (cat_mag - cat_mag.min())),
                                    dst_flux=det_flux, transform="similarity", pixel_tol=t, max_control_points=ncp,
                                    retries=(ncp * 2,), min_matches=max(3, min(min_matches, 6)))
                return res.matrix
            except AlignmentError as exc:
                last = exc
    raise last


def _wcs_through(start: TanWCS, matrix: Tensor) -> TanWCS:
    """The starting WCS composed with a pixel similarity ``p_true = M p_start`` (linear TAN only).

    CRPIX stays; CRVAL moves to the sky position the composed WCS gives it (the linear part is
    exact at first order; the fits that follow absorb the rest)."""
    m = matrix.to(_F64)
    A, t = m[:, :2], m[:, 2]
    crpix = start.crpix[0].to(_F64)
    p_start = torch.linalg.solve(A, crpix - t)
    ra, dec = start.pixel_to_world(p_start[0:1], p_start[1:2])
    cd = start.cd[0].to(_F64) @ torch.linalg.inv(A)
    p = start._element(0)
    return TanWCS(crpix, cd, [float(ra.reshape(-1)[0]), float(dec.reshape(-1)[0])], 180.0,
                  meta=[dict(kind="TAN", ctype=p["ctype"], radesys=p["radesys"], equinox=p["equinox"],
                             shape=p["shape"])])


def _check(n, n_possible, n_chance, scale_ratio, rms_px, *, min_matches, min_fraction, max_scale_change,
           max_rms_px):
    problems = []
    if n < min_matches:
        problems.append(f"only {n} star pairs (< min_matches={min_matches})")
    if n_possible > 0 and n / n_possible < min_fraction:
        problems.append(f"only {n} of {n_possible} stars paired ({n / n_possible:.1%} < min_fraction="
                        f"{min_fraction:.0%})")
    if n < 5 * n_chance:
        problems.append(f"{n} pairs is not above chance ({n_chance:.1f} coincidences expected)")
    if abs(scale_ratio - 1) > max_scale_change:
        problems.append(f"pixel scale changed by {scale_ratio - 1:+.1%} from the starting WCS (> "
                        f"{max_scale_change:.0%})")
    if not math.isfinite(rms_px) or rms_px > max_rms_px:
        problems.append(f"residual rms {rms_px:.3g} px (> max_rms_px={max_rms_px})")
    if problems:
        raise AstrometryError("astrometric solution rejected: " + "; ".join(problems))


def _pair_round(wcs, cat, det_xy, shape, radius, matrix: Optional[Tensor] = None):
    idx, cxy = _project_catalog(wcs, cat, shape, margin=radius + (0.25 * max(shape) if matrix is not None else 0))
    if matrix is not None:
        cxy = cxy @ matrix[:, :2].T.to(cxy) + matrix[:, 2].to(cxy)
    pairs = match_nearest(det_xy, cxy, radius)
    return torch.stack([pairs[:, 0], idx[pairs[:, 1]]], 1), idx.numel()


def _residual_stats(wcs: TanWCS, det_xy, cat, pairs):
    ra, dec = wcs.pixel_to_world(det_xy[pairs[:, 0], 0], det_xy[pairs[:, 0], 1])
    crval = wcs.crval[0].to(_F64)
    xm, ym = _standard(ra.reshape(-1), dec.reshape(-1), crval)
    xc, yc = _standard(cat.ra[pairs[:, 1]], cat.dec[pairs[:, 1]], crval)
    res = torch.stack([xm - xc, ym - yc], 1).reshape(-1, 2) * 3600.0
    rms = res.pow(2).mean(0).sqrt()
    return res, rms


def _one_thread(fn):
    """Run ``fn`` with one intra-op thread: many small ops, where OpenMP fork/join costs more than it gains."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        with one_intraop_thread(not torch.compiler.is_compiling()):
            return fn(*args, **kwargs)
    return run


@_one_thread
def solve_astrometry(
    x: Tensor, y: Tensor, flux: Optional[Tensor], catalog, *, shape, wcs: Optional[TanWCS] = None,
    pointing: Optional[Sequence[float]] = None, pixel_scale: Optional[float] = None, order: int = 3,
    distortion: str = "sip", epoch: Optional[float] = None, match_tol: float = 5.0,
    max_radius: float = 10.0, clip: float = 3.5, rounds: int = 3, min_matches: int = 10,
    min_fraction: float = 0.1, max_scale_change: float = 0.1, max_rms_px: float = 1.0,
    max_detections: int = 20000, errors: Optional[Tensor] = None,
) -> AstrometryResult:
    """Solve one frame's WCS from its detections and a reference catalog (see the module docstring).

    Args:
        x, y: (N,) 0-based pixel positions of the detections; ``flux`` (N,) their brightness (None:
            all equal; then the first ``max_detections`` are used).
        catalog: a :class:`ReferenceCatalog`, or anything :func:`load_catalog` reads (``epoch``, the
            frame's Julian year, applies proper motions).
        shape: ``(H, W)`` of the frame.
        wcs: the starting WCS (the header's; distortion in it is ignored by the coarse match), or
        pointing, pixel_scale: ``(ra, dec)`` deg and arcsec/px when there is no WCS (any rotation,
            both parities tried).
        order: polynomial order (1 = TAN, 2-5 SIP or TPV); lowered, with a warning, when there are
            fewer than 3 pairs per coefficient.
        distortion: ``"sip"`` or ``"tpv"``.
        match_tol: pixel tolerance of the coarse (triangle) match; ``max_radius``: largest pairing
            radius (px) of the refinement rounds; ``clip``: sigma clipping threshold.
        min_matches, min_fraction, max_scale_change, max_rms_px: acceptance checks.
        errors: optional (N,) centroid errors (px) of the detections: the fit weights pairs by
            ``1 / errors^2`` (default: all equal).

    Raises:
        AstrometryError: no consistent match, or a solution failing the checks (the message says which).
        ValueError: bad arguments (named).
    """
    if distortion not in ("sip", "tpv"):
        raise ValueError(f"distortion must be 'sip' or 'tpv', got {distortion!r}")
    if not 1 <= int(order) <= 7 or (distortion == "sip" and order > 5):
        raise ValueError(f"order must be 1-5 for SIP (1-7 for TPV), got {order}")
    h, w = int(shape[0]), int(shape[1])
    cat = catalog if isinstance(catalog, ReferenceCatalog) else load_catalog(catalog, epoch=epoch)
    det_xy = torch.stack([torch.as_tensor(x, dtype=_F64).reshape(-1), torch.as_tensor(y, dtype=_F64).reshape(-1)], 1)
    det_flux = torch.ones(det_xy.shape[0], dtype=_F64) if flux is None else \
        torch.as_tensor(flux, dtype=_F64).reshape(-1)
    if det_flux.shape[0] != det_xy.shape[0]:
        raise ValueError(f"flux has {det_flux.shape[0]} rows for {det_xy.shape[0]} detections")
    good = torch.isfinite(det_xy).all(1) & torch.isfinite(det_flux)
    keep_idx = good.nonzero().squeeze(1)
    if keep_idx.numel() > max_detections:
        keep_idx = keep_idx[det_flux[keep_idx].topk(max_detections).indices]
    det_xy, det_flux = det_xy[keep_idx], det_flux[keep_idx]
    det_err = None if errors is None else torch.as_tensor(errors, dtype=_F64).reshape(-1)[keep_idx]
    if det_xy.shape[0] < min_matches:
        raise AstrometryError(f"too few detections ({det_xy.shape[0]} < min_matches={min_matches}) to solve")
    starts = _starting_wcs(wcs, pointing, pixel_scale, (h, w))
    errors = []
    for start in starts:
        try:
            res = _solve_from(start, det_xy, det_flux, det_err, cat, (h, w), order, distortion, match_tol,
                              max_radius, clip, rounds, min_matches, min_fraction, max_scale_change, max_rms_px)
            res.pairs = torch.stack([keep_idx[res.pairs[:, 0]], res.pairs[:, 1]], 1)
            return res
        except AstrometryError as exc:
            errors.append(str(exc))
    raise AstrometryError(errors[0] if len(errors) == 1 else " | ".join(f"parity {p}: {e}" for p, e in
                                                                         zip((-1, 1), errors)))


def _starting_wcs(wcs, pointing, pixel_scale, shape) -> list[TanWCS]:
    if wcs is not None:
        if not isinstance(wcs, TanWCS):
            wcs = TanWCS.from_header(wcs)
        return [wcs.select(0).to(torch.float64)]  # its distortion (if any) guides the first pairing
    if pointing is None or pixel_scale is None:
        raise ValueError("give a starting wcs, or pointing=(ra, dec) and pixel_scale (arcsec/px)")
    ra, dec = (float(v) for v in pointing)
    return [pointing_wcs(ra, dec, float(pixel_scale), shape, parity=p) for p in (-1, 1)]


def _solve_from(start, det_xy, det_flux, det_err, cat, shape, order, distortion, match_tol, max_radius, clip, rounds,
                min_matches, min_fraction, max_scale_change, max_rms_px) -> AstrometryResult:
    h, w = shape
    margin = 0.25 * max(h, w)
    idx, cxy = _project_catalog(start, cat, shape, margin=margin)
    if idx.numel() < 3:
        raise AstrometryError(f"no overlap with the catalog: {idx.numel()} of {len(cat)} catalog stars fall on "
                              f"the frame (CRVAL {start.crval[0].tolist()}) or near it")
    inner = ((cxy[:, 0] > -0.5) & (cxy[:, 0] < w - 0.5) & (cxy[:, 1] > -0.5) & (cxy[:, 1] < h - 0.5))
    use = inner.nonzero().squeeze(1) if int(inner.sum()) >= 10 else torch.arange(idx.numel())
    try:
        matrix = _coarse_match(det_xy, det_flux, cxy[use], cat.mag[idx[use]], match_tol, min_matches)
    except AlignmentError as exc:
        raise AstrometryError(f"no consistent star pattern between the {det_xy.shape[0]} detections and the "
                              f"{idx.numel()} catalog stars near the frame: {exc}") from None
    current = _wcs_through(start, matrix)  # linear part only
    crval0, crpix = current.crval[0].clone(), current.crpix[0].tolist()
    distorted = start.has_sip or start.has_tpv
    radius, fit, n_pairs, n_possible = max_radius, None, 0, 0
    for r in range(rounds + 1):
        if r == 0 and distorted:  # the start's distortion, corrected by the similarity
            pairs, n_cat_near = _pair_round(start, cat, det_xy, shape, radius, matrix)
        else:
            pairs, n_cat_near = _pair_round(current, cat, det_xy, shape, radius)
        n_pairs = pairs.shape[0]
        k_order = order if (r > 0 or distorted) else min(order, 1)
        n_coef = (k_order + 1) * (k_order + 2) // 2
        while k_order > 1 and n_pairs < 3 * n_coef:
            k_order -= 1
            n_coef = (k_order + 1) * (k_order + 2) // 2
        if r == rounds and k_order < order:
            warnings.warn(f"astrometry: {n_pairs} pairs are too few for order {order}; fitted order {k_order}",
                          stacklevel=3)
        if n_pairs < max(min_matches, n_coef + 2):
            break
        fit = fit_wcs(det_xy[pairs[:, 0], 0], det_xy[pairs[:, 0], 1], cat.ra[pairs[:, 1]], cat.dec[pairs[:, 1]],
                      crval=crval0, crpix=crpix, shape=shape, order=k_order, distortion=distortion, clip=clip,
                      sigma=None if det_err is None else det_err[pairs[:, 0]])
        current = fit.wcs
        px = float(current.pixel_scale()[0]) * 3600.0
        rms_px = float(fit.residuals[fit.keep].pow(2).sum(1).mean().sqrt()) / px
        radius = float(min(max_radius, max(1.0, 5.0 * rms_px)))
        n_possible = min(det_xy.shape[0], n_cat_near)
    if fit is None:
        raise AstrometryError(f"too few star pairs ({n_pairs}) after the coarse match (need >= {min_matches})")
    pairs = pairs[fit.keep]
    res, rms = _residual_stats(current, det_xy, cat, pairs)
    px = float(current.pixel_scale()[0]) * 3600.0
    rms2 = float(res.pow(2).sum(1).mean().sqrt())
    n_chance = det_xy.shape[0] * n_cat_near / float(h * w) * math.pi * radius ** 2
    scale_ratio = float(current.pixel_scale()[0] / start.pixel_scale()[0])
    _check(pairs.shape[0], n_possible, n_chance, scale_ratio, rms2 / px, min_matches=min_matches,
           min_fraction=min_fraction, max_scale_change=max_scale_change, max_rms_px=max_rms_px)
    header = current.to_header()
    header["ASTRRMS1"] = (float(rms[0]) / 3600.0, "astrometric residual rms, axis 1 (deg)")
    header["ASTRRMS2"] = (float(rms[1]) / 3600.0, "astrometric residual rms, axis 2 (deg)")
    header["ASTRNMAT"] = (int(pairs.shape[0]), "reference stars used in the astrometric fit")
    header.add_history(f"astroprep astrometry: {current.meta[0]['kind']} order {order}, {pairs.shape[0]} stars, "
                       f"rms {rms2:.4f} arcsec ({rms2 / px:.4f} px)")
    return AstrometryResult(current, header, pairs, res, rms, rms2, rms2 / px, n_pairs)


def write_head(path, header) -> Path:
    """Write ``header`` as a SCAMP-style ASCII ``.head`` file: 80-character cards, one per line, END.

    TPV is written as SCAMP does (``CTYPE = RA---TAN`` with ``PVi_j``), which SWarp, astropy and
    :class:`~astroprep_torch.wcs.TanWCS` all read as TPV; SIP keeps ``-TAN-SIP``. Layout keys
    (``NAXIS*``, ``SIMPLE``, ``BITPIX``) are left out, as SCAMP does.
    """
    from astropy.io import fits

    h = fits.Header()
    for card in header.cards:
        if card.keyword in ("SIMPLE", "BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "EXTEND", "END"):
            continue
        h.append(card)
    if str(h.get("CTYPE1", "")).endswith("-TPV"):
        h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"
    text = "\n".join(str(c).ljust(80)[:80] if c.keyword not in ("HISTORY", "COMMENT") else str(c)
                     for c in h.cards)
    path = Path(path)
    path.write_text(text + ("\n" if text else "") + "END".ljust(80) + "\n")
    return path


class AstrometrySolver(nn.Module):
    """Thin module over :func:`solve_astrometry` holding the options and the reference catalog.

    ``forward(x, y, flux, wcs, shape, batch_index=None)`` solves each frame of a flat detection
    list (rows of frame ``b`` have ``batch_index == b``; ``wcs`` a batched ``TanWCS``) and returns a
    list of :class:`AstrometryResult`, one per frame (an :class:`AstrometryError` for a frame
    propagates unless ``skip_failures``, which puts ``None`` there instead).
    """

    def __init__(self, catalog, order: int = 3, distortion: str = "sip", epoch: Optional[float] = None,
                 match_tol: float = 5.0, max_radius: float = 10.0, clip: float = 3.5, rounds: int = 3,
                 min_matches: int = 10, min_fraction: float = 0.1, max_scale_change: float = 0.1,
                 max_rms_px: float = 1.0, skip_failures: bool = False):
        super().__init__()
        self.catalog = catalog if isinstance(catalog, ReferenceCatalog) else load_catalog(catalog, epoch=epoch)
        self.options = dict(order=order, distortion=distortion, match_tol=match_tol, max_radius=max_radius,
                            clip=clip, rounds=rounds, min_matches=min_matches, min_fraction=min_fraction,
                            max_scale_change=max_scale_change, max_rms_px=max_rms_px)
        self.skip_failures = skip_failures

    def forward(self, x: Tensor, y: Tensor, flux: Optional[Tensor], wcs: TanWCS, shape,
                batch_index: Optional[Tensor] = None) -> list:
        n = len(wcs)
        bi = torch.zeros_like(x, dtype=torch.long) if batch_index is None else batch_index
        out = []
        for b in range(n):  # one fit per frame: the sizes differ
            rows = (bi == b).nonzero().squeeze(1)
            try:
                out.append(solve_astrometry(x[rows], y[rows], None if flux is None else flux[rows], self.catalog,
                                            shape=shape, wcs=wcs.select(b), **self.options))
            except AstrometryError:
                if not self.skip_failures:
                    raise
                out.append(None)
        return out

    def extra_repr(self) -> str:
        return f"catalog={len(self.catalog)} stars, " + ", ".join(f"{k}={v}" for k, v in self.options.items())


def detect_stars(image: Tensor, mask: Optional[Tensor] = None, *, background=None, extractor=None,
                 thresh: float = 5.0) -> tuple[Tensor, Tensor, Tensor]:
    """``(x, y, flux)`` of the clean detections of one frame (1, 1, H, W): background subtracted
    (``Background2D`` by default), then ``SourceExtractor`` (``thresh`` sigma by default); sources
    flagged saturated, truncated or corrupted (SExtractor flags >= 4) are left out."""
    from .background import Background2D
    from .detect import SourceExtractor

    background = background if background is not None else Background2D()
    extractor = extractor if extractor is not None else SourceExtractor(thresh=thresh)
    bkg = background(image, mask)
    cat = extractor(image - bkg.background, bkg.rms, mask)
    flags = cat["flags"] if "flags" in cat else torch.zeros(len(cat), dtype=torch.long)
    ok = flags < 4
    flux = cat["flux_auto"] if "flux_auto" in cat else cat["flux_iso"]
    return cat["x"][ok], cat["y"][ok], flux[ok]


def solve_image(image: Tensor, catalog, *, mask: Optional[Tensor] = None, wcs: Optional[TanWCS] = None,
                background=None, extractor=None, thresh: float = 5.0, max_detections: int = 5000,
                **options) -> AstrometryResult:
    """Detect the stars of one frame (:func:`detect_stars`) and solve its WCS (:func:`solve_astrometry`
    with ``options``): the pipeline stage "astrometry before alignment"."""
    x, y, flux = detect_stars(image, mask, background=background, extractor=extractor, thresh=thresh)
    return solve_astrometry(x, y, flux, catalog, shape=tuple(image.shape[-2:]), wcs=wcs,
                            max_detections=max_detections, **options)


def solved_header(header, result: AstrometryResult):
    """A copy of the frame's ``header`` with its WCS (and any SIP / PV keys) replaced by the solution,
    plus ``ASTRRMS1``/``ASTRRMS2``, ``ASTRNMAT`` and the HISTORY lines."""
    out = header.copy()
    for k in [k for k in out if k.split("_")[0] in ("A", "B", "AP", "BP") or k.startswith(("PV1_", "PV2_", "PC1_",
                                                                                          "PC2_", "CDELT", "CROTA"))]:
        del out[k]
    for card in result.header.cards:
        if card.keyword not in ("HISTORY", "COMMENT", ""):
            out[card.keyword] = (card.value, card.comment)
    for line in result.header["HISTORY"]:
        out.add_history(line)
    return out
