"""Batched gnomonic (TAN) world coordinate systems on tensors, with SIP or TPV distortion.

:class:`TanWCS` holds ``B`` celestial WCS, one per batch element, as tensors (buffers), and maps
0-based pixel coordinates ``(x, y)`` (x = column, y = row) to world coordinates ``(ra, dec)`` in
degrees and back. Supported: ``TAN`` (FITS WCS Paper II), ``TAN-SIP`` (Shupak et al. 2005: A/B
forward polynomials applied to ``(u, v) = pixel - CRPIX`` *before* the CD matrix, AP/BP only an
approximate inverse) and ``TPV`` (the SCAMP/SWarp polynomial, applied *after* the CD matrix to the
intermediate world coordinates in degrees; ``PV1_*`` gives xi, ``PV2_*`` gives eta with the roles of
xi and eta swapped; terms 3, 11, 23, 39 are odd powers of ``r = sqrt(xi^2 + eta^2)``).

Conventions followed (where peers differ, we follow astropy.wcs / wcslib, the parity reference):

* FITS ``CRPIX`` is 1-based; it is stored 0-based in :attr:`TanWCS.crpix` and converted back by
  :meth:`TanWCS.to_header`.
* The linear part is ``PCi_j * CDELTi`` when any ``PCi_j`` is present, else ``CDi_j``, else
  ``CDELTi`` with ``CROTA2`` (wcslib precedence).
* ``LONPOLE`` defaults to 180 deg, or 0 deg when ``CRVAL2 = 90`` (Paper II, zenithal).
* Missing TPV coefficients are 0 (as wcslib; a TPV header must give ``PV1_1``/``PV2_1``).
* A ``-TAN`` header with ``PVi_j``, ``j >= 5`` is read as TPV and SIP keys are ignored; a
  ``-TAN-SIP`` header with such PV keys keeps SIP and ignores PV; a ``-TPV`` header ignores SIP
  (astropy's ``_fix_pre2012_scamp_tpv`` / ``_fix_scamp``).
* World coordinates are wrapped to ``0 <= ra < 360``.

Precision: computations run in the dtype of the inputs, with numerically stable formulas relative
to the tangent point (``ra - CRVAL1`` and ``dec - CRVAL2`` are formed first, ``1 - cos`` as
``2 sin^2``). In float32, CRVAL is kept as a float32 value plus a float32 residual
(:attr:`crval_lo`), so that offsets from the tangent point keep ~1e-7 relative precision. Absolute
float32 world coordinates are nevertheless limited by their own representation (``ulp(200 deg)``
= 1.5e-5 deg, i.e. 0.2 px at 0.26"/px): to map pixels of one frame onto another in float32 use
:meth:`TanWCS.pixel_to_pixel`, which never forms absolute world coordinates.

``world_to_pixel`` inverts the TAN projection analytically and then solves the full forward
distortion by Newton iterations (a fixed number, no host synchronisation; AP/BP, when present, only
give the starting point). Gradients flow through the last Newton step with the Jacobian held fixed
(implicit-function theorem), so they are exact at convergence.

Not supported (``ValueError`` naming what is supported): other projections (SIN, ZPN, CAR, ...),
lookup-table distortions (``CPDIS``/``DPj``/``D2IM``), DSS plate solutions (``AMDX``), non-celestial
or swapped axes, missing linear part, a singular linear part.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Mapping
from typing import Optional, Sequence

import numpy as np
import torch
from torch import Tensor, nn

__all__ = ["TanWCS", "SUPPORTED_PROJECTIONS"]

SUPPORTED_PROJECTIONS = "TAN, TAN-SIP and TPV"
_D2R = math.pi / 180.0
_R2D = 180.0 / math.pi

# TPV term index -> ("m", p, q) monomial xi^p eta^q, or ("r", n, 0) for r^n.
_TPV_TERMS: list[tuple[str, int, int]] = []
for _d in range(8):
    for _q in range(_d + 1):
        _TPV_TERMS.append(("m", _d - _q, _q))
    if _d % 2 == 1:
        _TPV_TERMS.append(("r", _d, 0))
assert len(_TPV_TERMS) == 40 and _TPV_TERMS[3] == ("r", 1, 0) and _TPV_TERMS[39] == ("r", 7, 0)
_TPV_R_INDEX = {1: 3, 3: 11, 5: 23, 7: 39}

_SIP_KEY = re.compile(r"^(A|B|AP|BP)_(\d+)_(\d+)$")
_PV_KEY = re.compile(r"^PV([12])_(\d+)$")


# ----------------------------------------------------------------------------------------------
# Header parsing
# ----------------------------------------------------------------------------------------------
def _as_dict(header) -> dict:
    """Upper-cased ``{key: value}`` of a Header, dict-like, header string or astropy WCS."""
    try:
        from astropy.io import fits
        from astropy.wcs import WCS
    except ImportError:  # pragma: no cover - astropy is a dependency
        fits = WCS = None
    if WCS is not None and isinstance(header, WCS):
        w = header
        if getattr(w, "cpdis1", None) is not None or getattr(w, "cpdis2", None) is not None or \
                getattr(w, "det2im1", None) is not None or getattr(w, "det2im2", None) is not None:
            raise ValueError("lookup-table distortion (CPDIS/D2IM) is not supported: TanWCS supports "
                             f"{SUPPORTED_PROJECTIONS}")
        h = w.to_header(relax=True)
        if w.pixel_shape is not None:
            h["NAXIS"] = 2
            h["NAXIS1"], h["NAXIS2"] = int(w.pixel_shape[0]), int(w.pixel_shape[1])
        header = h
    if isinstance(header, (str, bytes)):
        if fits is None:  # pragma: no cover
            raise TypeError("parsing a header string needs astropy")
        text = header.decode("latin-1") if isinstance(header, bytes) else header
        header = fits.Header.fromstring(text, sep="\n" if "\n" in text[:81] else "")
    if fits is not None and isinstance(header, fits.Header):
        out = {}
        for card in header.cards:
            key = card.keyword.upper()
            if key in ("COMMENT", "HISTORY", "") or key in out:
                continue
            try:
                out[key] = card.value
            except Exception:  # unparsable card (e.g. DSS 'SKEW'): irrelevant to the WCS unless used
                out[key] = None
        return out
    if isinstance(header, Mapping):
        return {str(k).upper(): v for k, v in header.items()}
    raise TypeError(f"header must be an astropy Header, a dict-like, a header string or an astropy WCS, "
                    f"got {type(header).__name__}")


def _num(h: dict, key: str, default=None) -> Optional[float]:
    v = h.get(key, default)
    if v is None:
        return None
    try:
        return float(v)
    except (TypeError, ValueError):
        raise ValueError(f"header keyword {key}={v!r} is not a number") from None


def _reject_unsupported_kinds(h: dict, name: str) -> None:
    """Lookup tables and DSS plate solutions are refused first: their CTYPE may look like TAN."""
    lookup = [k for k in h if k.startswith(("CPDIS", "D2IMDIS", "D2IMEXT", "CQDIS", "DP1", "DP2",
                                             "DQ1", "DQ2", "D2IM1", "D2IM2", "NPOLEXT"))]
    if lookup:
        raise ValueError(f"{name}: lookup-table distortion ({', '.join(sorted(lookup)[:3])} ...) is not "
                         f"supported: TanWCS supports {SUPPORTED_PROJECTIONS}")
    if "AMDX1" in h or "PLTRAH" in h:
        raise ValueError(f"{name}: DSS plate solution (PLTRAH/AMDXn) is not supported: TanWCS supports "
                         f"{SUPPORTED_PROJECTIONS}")


def _celestial_axes(h: dict, name: str) -> tuple[str, str, str]:
    """``(CTYPE1, CTYPE2, projection)`` after checking that axes 1 and 2 are longitude and latitude
    in degrees with one supported projection, not coupled to other axes."""
    naxis = int(_num(h, "WCSAXES", None) or _num(h, "NAXIS", 2) or 2)
    naxis = max(naxis, 2)
    ctypes = [str(h.get(f"CTYPE{i}", "")).strip().upper() for i in range(1, naxis + 1)]
    if not ctypes[0] and not ctypes[1]:
        raise ValueError(f"{name}: no celestial WCS (CTYPE1/CTYPE2 missing): TanWCS supports "
                         f"{SUPPORTED_PROJECTIONS}")
    c1, c2 = ctypes[0], ctypes[1]
    lon_ok = len(c1) >= 8 and (c1[:4] == "RA--" or c1[1:4] == "LON")
    lat_ok = len(c2) >= 8 and (c2[:4] == "DEC-" or c2[1:4] == "LAT")
    if not (lon_ok and lat_ok):
        if (c1[:4] == "DEC-" or c1[1:4] == "LAT") and (c2[:4] == "RA--" or c2[1:4] == "LON"):
            raise ValueError(f"{name}: swapped celestial axes (CTYPE1={c1!r}, CTYPE2={c2!r}) are not "
                             f"supported: axis 1 must be longitude and axis 2 latitude ({SUPPORTED_PROJECTIONS})")
        raise ValueError(f"{name}: axes 1 and 2 are not celestial (CTYPE1={c1!r}, CTYPE2={c2!r}): "
                         f"TanWCS supports {SUPPORTED_PROJECTIONS} celestial axes 1 (lon) and 2 (lat)")
    proj1, proj2 = c1[5:], c2[5:]
    if proj1 != proj2:
        raise ValueError(f"{name}: CTYPE1={c1!r} and CTYPE2={c2!r} use different projections")
    if proj1 not in ("TAN", "TAN-SIP", "TPV"):
        raise ValueError(f"{name}: unsupported projection {proj1!r} (CTYPE1={c1!r}): TanWCS supports "
                         f"{SUPPORTED_PROJECTIONS}")
    for k in ("CUNIT1", "CUNIT2"):
        unit = str(h.get(k, "deg")).strip().lower()
        if unit not in ("deg", "degree", "degrees", ""):
            raise ValueError(f"{name}: {k}={unit!r} is not supported (degrees only)")
    # Coupling between the celestial and other axes.
    for i in (1, 2):
        for j in range(3, naxis + 1):
            for key in (f"PC{i}_{j}", f"PC{j}_{i}", f"CD{i}_{j}", f"CD{j}_{i}"):
                if _num(h, key, 0.0) != 0.0:
                    raise ValueError(f"{name}: {key} couples the celestial axes to axis {j}; not supported")
    return c1, c2, proj1


def _linear_part(h: dict, name: str) -> np.ndarray:
    """The invertible 2x2 CD matrix (degrees per pixel) from PCi_j * CDELTi, CDi_j or CDELTi + CROTA2."""
    has_pc = any(k in h for k in ("PC1_1", "PC1_2", "PC2_1", "PC2_2"))
    has_cd = any(k in h for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2"))
    if has_pc:
        cdelt = [_num(h, "CDELT1", 1.0), _num(h, "CDELT2", 1.0)]
        pc = np.array([[_num(h, "PC1_1", 1.0), _num(h, "PC1_2", 0.0)],
                       [_num(h, "PC2_1", 0.0), _num(h, "PC2_2", 1.0)]])
        cd = pc * np.array(cdelt)[:, None]
    elif has_cd:
        cd = np.array([[_num(h, "CD1_1", 0.0), _num(h, "CD1_2", 0.0)],
                       [_num(h, "CD2_1", 0.0), _num(h, "CD2_2", 0.0)]])
    elif "CDELT1" in h and "CDELT2" in h:
        c1d, c2d = _num(h, "CDELT1"), _num(h, "CDELT2")
        rho = math.radians(_num(h, "CROTA2", None) or _num(h, "CROTA1", 0.0) or 0.0)
        cd = np.array([[c1d * math.cos(rho), -c2d * math.sin(rho)],
                       [c1d * math.sin(rho), c2d * math.cos(rho)]])
    else:
        raise ValueError(f"{name}: missing linear transformation (no CDi_j, PCi_j or CDELTi keywords): "
                         f"TanWCS needs one of them ({SUPPORTED_PROJECTIONS})")
    det = float(np.linalg.det(cd))
    if not np.all(np.isfinite(cd)) or abs(det) <= 1e-30 * max(1e-300, float(np.abs(cd).max()) ** 2) or det == 0.0:
        raise ValueError(f"{name}: singular linear transformation (CD matrix {cd.tolist()}, det={det:g}); "
                         f"TanWCS supports {SUPPORTED_PROJECTIONS} with an invertible CD (or PC*CDELT) matrix")
    return cd


def _reference_point(h: dict, name: str) -> tuple[list, list]:
    """``(crpix, crval)``: the 0-based reference pixel and its (lon, lat) in degrees."""
    crpix = [_num(h, "CRPIX1", 0.0) - 1.0, _num(h, "CRPIX2", 0.0) - 1.0]
    crval = [_num(h, "CRVAL1", 0.0), _num(h, "CRVAL2", 0.0)]
    if not all(map(math.isfinite, crpix + crval)) or abs(crval[1]) > 90.0:
        raise ValueError(f"{name}: invalid CRPIX/CRVAL ({crpix}, {crval})")
    return crpix, crval


def _pv_keywords(h: dict) -> dict[tuple[int, int], float]:
    """``{(i, j): PVi_j}`` of the header."""
    pvs: dict[tuple[int, int], float] = {}
    for k, v in h.items():
        m = _PV_KEY.match(k)
        if m:
            pvs[(int(m.group(1)), int(m.group(2)))] = float(v)
    return pvs


def _distortion_kind(proj: str, pvs: dict, h: dict, name: str) -> tuple[str, dict]:
    """``("TAN" | "SIP" | "TPV", pvs)`` as astropy.wcs reads the header: SCAMP PV with CTYPE -TAN is
    TPV, SIP keys without '-SIP' are applied, SCAMP PV next to SIP is dropped."""
    has_sip_keys = "A_ORDER" in h or "B_ORDER" in h
    kind = {"TAN": "TAN", "TAN-SIP": "SIP", "TPV": "TPV"}[proj]
    if kind == "TAN" and any(j >= 5 for (_, j) in pvs):
        kind = "TPV"  # pre-2012 SCAMP header (astropy: _fix_pre2012_scamp_tpv), SIP ignored
        if has_sip_keys:
            warnings.warn(f"{name}: SCAMP PV distortion with CTYPE -TAN: read as TPV, SIP keys ignored "
                          "(as astropy.wcs)", stacklevel=4)
    elif kind == "TAN" and has_sip_keys and _num(h, "A_ORDER", 0) > 1:
        warnings.warn(f"{name}: SIP coefficients present but CTYPE lacks '-SIP'; applying SIP as "
                      "astropy.wcs does", stacklevel=4)
        kind = "SIP"
    if kind == "SIP" and any(j >= 5 for (_, j) in pvs):
        pvs = {}  # SCAMP PV next to SIP: SIP is kept, PV dropped (astropy.wcs _fix_scamp)
    return kind, pvs


def _native_lonpole(kind: str, pvs: dict, h: dict, crval: list, name: str) -> float:
    """LONPOLE (default 0 at the pole, else 180); TAN/SIP refuse a non-default native reference point."""
    lonpole = _num(h, "LONPOLE", None)
    if kind in ("TAN", "SIP"):
        if lonpole is None:
            lonpole = _num(h, "PV1_3", None)
        phi0, theta0 = pvs.get((1, 1), 0.0), pvs.get((1, 2), 90.0)
        if phi0 != 0.0 or theta0 != 90.0:
            raise ValueError(f"{name}: non-default native reference point PV1_1/PV1_2 ({phi0}, {theta0}) "
                             "is not supported for TAN")
    if lonpole is None:
        lonpole = 0.0 if crval[1] >= 90.0 else 180.0
    return float(lonpole)


def _sip_coefficients(h: dict, name: str) -> Optional[dict]:
    """``{"A", "B", "AP", "BP": (order+1, order+1) arrays or None}``; None when both orders are <= 1
    (no distortion: plain TAN)."""
    a_order = int(_num(h, "A_ORDER", 0) or 0)
    b_order = int(_num(h, "B_ORDER", 0) or 0)
    if "A_ORDER" in h and "B_ORDER" not in h:
        raise ValueError(f"{name}: A_ORDER without B_ORDER (broken SIP distortion)")
    if "B_ORDER" in h and "A_ORDER" not in h:
        raise ValueError(f"{name}: B_ORDER without A_ORDER (broken SIP distortion)")
    if not (a_order > 1 or b_order > 1):
        return None
    sip = {}
    for p in ("A", "B", "AP", "BP"):
        order = int(_num(h, f"{p}_ORDER", 0) or 0)
        if p in ("AP", "BP") and order < 1:
            sip[p] = None
            continue
        arr = np.zeros((order + 1, order + 1))
        for i in range(order + 1):
            for j in range(order + 1 - i):
                arr[i, j] = _num(h, f"{p}_{i}_{j}", 0.0)
        sip[p] = arr
    if (sip["AP"] is None) != (sip["BP"] is None):
        sip["AP"] = sip["BP"] = None
    return sip


def _tpv_coefficients(pvs: dict, name: str) -> np.ndarray:
    """(2, K+1) TPV coefficients ``pv[i-1, j] = PVi_j`` (missing ones 0, as wcslib)."""
    kmax = max([j for (_, j) in pvs] + [2])
    if kmax > 39:
        raise ValueError(f"{name}: TPV term PVi_{kmax} beyond 39 is not defined")
    pv = np.zeros((2, kmax + 1))
    for (i, j), v in pvs.items():
        pv[i - 1, j] = v
    lin = np.array([[pv[0, 1], pv[0, 2]], [pv[1, 2], pv[1, 1]]])
    if abs(np.linalg.det(lin)) == 0.0:
        raise ValueError(f"{name}: TPV linear terms (PV1_1, PV1_2, PV2_1, PV2_2) are singular; missing "
                         "PV coefficients are 0 as in wcslib")
    return pv


def _parse_header(header, name: str = "header") -> dict:
    """The celestial WCS of ``header`` as a dict: ``kind`` ("TAN", "SIP", "TPV"), ``crpix`` (0-based),
    ``crval``, ``cd``, ``lonpole``, ``sip``, ``pv``, ``ctype``, ``radesys``, ``equinox``, ``shape`` (H, W)
    or None. Raises ``ValueError`` naming ``name`` for anything TanWCS does not support."""
    h = _as_dict(header)
    _reject_unsupported_kinds(h, name)
    c1, c2, proj = _celestial_axes(h, name)
    cd = _linear_part(h, name)
    crpix, crval = _reference_point(h, name)
    kind, pvs = _distortion_kind(proj, _pv_keywords(h), h, name)
    lonpole = _native_lonpole(kind, pvs, h, crval, name)
    sip = _sip_coefficients(h, name) if kind == "SIP" else None
    if kind == "SIP" and sip is None:
        kind = "TAN"
    pv = _tpv_coefficients(pvs, name) if kind == "TPV" else None
    shape = None
    if "NAXIS1" in h and "NAXIS2" in h and int(h.get("NAXIS", 2) or 0) >= 2:
        shape = (int(h["NAXIS2"]), int(h["NAXIS1"]))
    radesys = h.get("RADESYS", h.get("RADECSYS"))
    equinox = h.get("EQUINOX", h.get("EPOCH"))
    return dict(kind=kind, crpix=crpix, crval=crval, cd=cd, lonpole=lonpole, sip=sip, pv=pv,
                ctype=(c1[:4], c2[:4]), radesys=str(radesys).strip() if radesys is not None else None,
                equinox=float(equinox) if isinstance(equinox, (int, float)) else None, shape=shape)


# ----------------------------------------------------------------------------------------------
# Polynomial helpers (Horner, with first derivatives)
# ----------------------------------------------------------------------------------------------
def _poly2(C: Tensor, u: Tensor, v: Tensor, deriv: bool):
    """Evaluate ``sum_{p,q} C[:, p, q] u^p v^q`` (and d/du, d/dv). ``C`` (B, n, n), ``u``, ``v`` (B?, M)."""
    n = C.shape[-1]
    g = gu = gv = None
    for p in range(n - 1, -1, -1):
        qmax = n - 1 - p
        f = C[:, p, qmax].unsqueeze(-1)
        fd = torch.zeros_like(f) if deriv else None
        for q in range(qmax - 1, -1, -1):
            if deriv:
                fd = fd * v + f
            f = f * v + C[:, p, q].unsqueeze(-1)
        if g is None:
            g = f
            if deriv:
                gu = torch.zeros_like(f)
                gv = fd
        else:
            if deriv:
                gu = gu * u + g
                gv = gv * u + fd
            g = g * u + f
    return g, gu, gv


def _tpv_placement(K: int):
    """0/1 matrices (K, n*n) placing TPV monomial coefficients into xi/eta power matrices, and r indices."""
    deg = max([_TPV_TERMS[k][1] + _TPV_TERMS[k][2] if _TPV_TERMS[k][0] == "m" else _TPV_TERMS[k][1]
               for k in range(K)] + [1])
    n = deg + 1
    e1 = np.zeros((K, n * n))
    e2 = np.zeros((K, n * n))
    r_terms = []
    for k in range(K):
        kind, p, q = _TPV_TERMS[k]
        if kind == "m":
            e1[k, p * n + q] = 1.0  # PV1: xi^p eta^q
            e2[k, q * n + p] = 1.0  # PV2: eta^p xi^q -> xi power q, eta power p
        else:
            r_terms.append((k, p))
    return n, e1, e2, r_terms


# ----------------------------------------------------------------------------------------------
# The module
# ----------------------------------------------------------------------------------------------
class TanWCS(nn.Module):
    """A batch of ``B`` TAN / TAN-SIP / TPV celestial WCS as tensors.

    Buffers (``B`` first; follow ``.to(device, dtype)``):

    * ``crpix`` (B, 2): reference pixel, **0-based** ``(x, y)``.
    * ``cd`` (B, 2, 2): linear transformation in deg/px.
    * ``crval`` (B, 2): ``(ra, dec)`` of the tangent point in deg; ``crval_lo`` (B, 2) holds the
      residual lost when the module is cast to float32 (kept up to date by ``.to()``).
    * ``lonpole`` (B,): native longitude of the celestial pole, deg.
    * ``sip_a``, ``sip_b`` (B, n, n): SIP A/B, ``[p, q]`` multiplies ``u^p v^q``; zero-padded to
      the largest order in the batch. ``sip_ap``, ``sip_bp`` likewise (zeros where absent).
    * ``pv`` (B, 2, K): TPV coefficients ``PV1_k`` and ``PV2_k`` (identity for non-TPV elements).

    Use :meth:`from_header` to build one, or pass tensors/arrays directly: ``crpix`` (B, 2) 0-based,
    ``cd`` (B, 2, 2), ``crval`` (B, 2), ``lonpole`` (B,) (default 180, or 0 at ``dec0 = 90``),
    optional ``sip_a``/``sip_b``/``sip_ap``/``sip_bp`` (B, n, n) and ``pv`` (B, 2, K). ``n_iter`` sets the Newton iterations of
    :meth:`world_to_pixel` (plus one final differentiable step). It is a fixed count (no data-dependent
    stopping, so no host synchronisation and ``torch.compile(fullgraph=True)`` traces it): on every real
    header we test, 2 steps already reach the float64 floor (< 1e-8 px); the default 4 leaves margin
    for stronger distortions.
    """

    def __init__(self, crpix, cd, crval, lonpole=None, *, sip_a=None, sip_b=None, sip_ap=None, sip_bp=None,
                 pv=None, meta: Optional[list] = None, n_iter: int = 4, dtype=torch.float64, device=None):
        super().__init__()
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64) if not isinstance(a, Tensor) else a,
                                      dtype=dtype, device=device).clone()
        c64_src = crval
        crpix, cd, crval = t(crpix), t(cd), t(crval)
        if crpix.dim() == 1:
            crpix, cd, crval = crpix[None], cd[None], crval[None]
        B = crpix.shape[0]
        if crpix.shape != (B, 2) or cd.shape != (B, 2, 2) or crval.shape != (B, 2):
            raise ValueError(f"crpix, cd, crval must be shaped (B, 2), (B, 2, 2), (B, 2); got "
                             f"{tuple(crpix.shape)}, {tuple(cd.shape)}, {tuple(crval.shape)}")
        if lonpole is None:
            lonpole = torch.where(crval[:, 1] >= 90, torch.zeros_like(crval[:, 1]),
                                  torch.full_like(crval[:, 1], 180.0))
        lonpole = t(lonpole).reshape(B)
        self.register_buffer("crpix", crpix)
        self.register_buffer("cd", cd)
        self.register_buffer("crval", crval)
        crval_lo = torch.zeros_like(crval)
        if dtype != torch.float64:  # keep what the cast to a narrower dtype dropped
            c64 = torch.as_tensor(np.asarray(c64_src, dtype=np.float64) if not isinstance(c64_src, Tensor)
                                  else c64_src, dtype=torch.float64, device=device).reshape(crval.shape)
            crval_lo = (c64 - crval.to(torch.float64)).to(dtype)
        self.register_buffer("crval_lo", crval_lo)
        self.register_buffer("lonpole", lonpole)
        self.has_sip = sip_a is not None or sip_b is not None
        self.has_sip_inverse = sip_ap is not None and sip_bp is not None
        self.has_tpv = pv is not None
        z = torch.zeros(B, 1, 1, dtype=dtype, device=device)
        self.register_buffer("sip_a", t(sip_a) if sip_a is not None else z.clone())
        self.register_buffer("sip_b", t(sip_b) if sip_b is not None else z.clone())
        self.register_buffer("sip_ap", t(sip_ap) if sip_ap is not None else z.clone())
        self.register_buffer("sip_bp", t(sip_bp) if sip_bp is not None else z.clone())
        if pv is None:
            pv = torch.zeros(B, 2, 3, dtype=dtype, device=device)
            pv[:, :, 1] = 1.0
        self.register_buffer("pv", t(pv))
        K = self.pv.shape[-1]
        n, e1, e2, r_terms = _tpv_placement(K)
        self._tpv_n, self._tpv_r = n, r_terms
        self.register_buffer("_tpv_e1", torch.as_tensor(e1, dtype=dtype, device=device), persistent=False)
        self.register_buffer("_tpv_e2", torch.as_tensor(e2, dtype=dtype, device=device), persistent=False)
        if meta is None:
            kind = "TPV" if self.has_tpv else ("SIP" if self.has_sip else "TAN")
            meta = [dict(kind=kind, ctype=("RA--", "DEC-"), radesys=None, equinox=None, shape=None)
                    for _ in range(B)]
        if len(meta) != B:
            raise ValueError(f"meta must have one entry per batch element ({B}), got {len(meta)}")
        self.meta = [dict(m) for m in meta]
        self.n_iter = int(n_iter)

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def from_header(cls, header, *, dtype=torch.float64, device=None, n_iter: int = 4) -> "TanWCS":
        """Build from one header or a list of headers (astropy ``Header``, dict-like, header string or
        astropy ``WCS``). Raises ``ValueError`` for anything but TAN, TAN-SIP and TPV."""
        try:
            from astropy.io import fits
            single = isinstance(header, (Mapping, str, bytes, fits.Header)) or type(header).__name__ == "WCS"
        except ImportError:  # pragma: no cover
            single = isinstance(header, (Mapping, str, bytes))
        headers = [header] if single else list(header)
        if not headers:
            raise ValueError("from_header needs at least one header")
        parsed = [_parse_header(h, name=f"header {i}" if len(headers) > 1 else "header")
                  for i, h in enumerate(headers)]
        return cls._from_parsed(parsed, dtype=dtype, device=device, n_iter=n_iter)

    @classmethod
    def _from_parsed(cls, parsed: list, *, dtype, device, n_iter) -> "TanWCS":
        B = len(parsed)
        crpix = np.array([p["crpix"] for p in parsed])
        cd = np.array([p["cd"] for p in parsed])
        crval = np.array([p["crval"] for p in parsed])
        lonpole = np.array([p["lonpole"] for p in parsed])
        kw = {}
        sips = [p["sip"] for p in parsed]
        if any(s is not None for s in sips):
            n = max(s[k].shape[0] for s in sips if s is not None for k in ("A", "B"))
            arrs = {k: np.zeros((B, n, n)) for k in ("A", "B")}
            ni = max([s[k].shape[0] for s in sips if s is not None and s["AP"] is not None for k in ("AP", "BP")]
                     + [0])
            for k in ("AP", "BP"):
                arrs[k] = np.zeros((B, max(ni, 1), max(ni, 1)))
            for b, s in enumerate(sips):
                if s is None:
                    continue
                for k in ("A", "B", "AP", "BP"):
                    if s[k] is not None:
                        m = s[k].shape[0]
                        arrs[k][b, :m, :m] = s[k]
            kw.update(sip_a=arrs["A"], sip_b=arrs["B"])
            if ni > 0:
                kw.update(sip_ap=arrs["AP"], sip_bp=arrs["BP"])
        pvs = [p["pv"] for p in parsed]
        if any(v is not None for v in pvs):
            K = max(v.shape[1] for v in pvs if v is not None)
            arr = np.zeros((B, 2, K))
            for b, v in enumerate(pvs):
                if v is None:
                    arr[b, :, 1] = 1.0
                else:
                    arr[b, :, : v.shape[1]] = v
            kw["pv"] = arr
        meta = []
        for p in parsed:
            m = dict(kind=p["kind"], ctype=p["ctype"], radesys=p["radesys"], equinox=p["equinox"], shape=p["shape"])
            if p["sip"] is not None:
                m["sip_order"] = (p["sip"]["A"].shape[0] - 1, p["sip"]["B"].shape[0] - 1)
                m["sip_inv_order"] = None if p["sip"]["AP"] is None else (
                    p["sip"]["AP"].shape[0] - 1, p["sip"]["BP"].shape[0] - 1)
            if p["pv"] is not None:
                m["tpv_nterms"] = p["pv"].shape[1]
            meta.append(m)
        w = cls(crpix, cd, crval, lonpole, meta=meta, n_iter=n_iter, dtype=torch.float64, device=device, **kw)
        return w.to(dtype=dtype)

    def _apply(self, fn, recurse=True):
        # Keep the float32 residual of CRVAL when casting float64 -> float32, fold it back on upcast.
        before = self.crval
        lo_before = self.crval_lo
        out = super()._apply(fn, recurse)
        after = self.crval
        if before.dtype == torch.float64 and after.dtype != torch.float64 and after.is_floating_point():
            self.crval_lo = (before.to(after.device) - after.to(torch.float64)).to(after.dtype)
        elif before.dtype != torch.float64 and after.dtype == torch.float64:
            self.crval = after + lo_before.to(device=after.device, dtype=torch.float64)
            self.crval_lo = torch.zeros_like(self.crval)
        return out

    # -- batch handling ------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.crpix.shape[0]

    def select(self, idx) -> "TanWCS":
        """A new ``TanWCS`` holding the batch elements ``idx`` (int, slice, list or index tensor)."""
        B = len(self)
        if isinstance(idx, int):
            if not -B <= idx < B:
                raise IndexError(f"index {idx} out of range for a TanWCS batch of {B}")
            ids = [idx % B]
        elif isinstance(idx, slice):
            ids = list(range(B))[idx]
        else:
            ids = [int(i) for i in (idx.tolist() if isinstance(idx, Tensor) else idx)]
            for i in ids:
                if not -B <= i < B:
                    raise IndexError(f"index {i} out of range for a TanWCS batch of {B}")
            ids = [i % B for i in ids]
        if not ids:
            raise IndexError("empty selection from a TanWCS")
        sel = torch.as_tensor(ids, device=self.crpix.device)
        new = TanWCS.__new__(TanWCS)
        nn.Module.__init__(new)
        for name, buf in self._buffers.items():
            if name.startswith("_tpv"):
                new.register_buffer(name, buf, persistent=False)
            else:
                new.register_buffer(name, buf.index_select(0, sel))
        for attr in ("has_sip", "has_sip_inverse", "has_tpv", "_tpv_n", "_tpv_r", "n_iter"):
            setattr(new, attr, getattr(self, attr))
        new.meta = [dict(self.meta[i]) for i in ids]
        return new

    def __getitem__(self, idx) -> "TanWCS":
        return self.select(idx)

    @classmethod
    def stack(cls, items: Sequence["TanWCS"]) -> "TanWCS":
        """Concatenate several ``TanWCS`` along the batch (distortion arrays are zero-padded)."""
        items = list(items)
        if not items:
            raise ValueError("stack needs at least one TanWCS")
        ref = items[0]
        dtype, device = ref.crpix.dtype, ref.crpix.device
        parsed = []
        for w in items:
            if not isinstance(w, TanWCS):
                raise TypeError(f"stack takes TanWCS objects, got {type(w).__name__}")
            parsed.extend(w._element(b) for b in range(len(w)))
        out = cls._from_parsed(parsed, dtype=torch.float64, device=None, n_iter=ref.n_iter)
        return out.to(device=device, dtype=dtype)

    cat = stack

    def extra_repr(self) -> str:
        kinds = [m["kind"] for m in self.meta]
        return f"B={len(self)}, kinds={kinds}, dtype={self.crpix.dtype}, n_iter={self.n_iter}"

    # -- parameter and input preparation -------------------------------------------------------
    def _prep_inputs(self, a, b, names, B: Optional[int] = None):
        if not isinstance(a, Tensor):
            a = torch.as_tensor(a, dtype=self.crpix.dtype if not isinstance(b, Tensor) else b.dtype,
                                device=self.crpix.device if not isinstance(b, Tensor) else b.device)
        if not isinstance(b, Tensor):
            b = torch.as_tensor(b, dtype=a.dtype, device=a.device)
        if not (a.is_floating_point() and b.is_floating_point()):
            raise TypeError(f"{names[0]} and {names[1]} must be floating tensors, got {a.dtype} and {b.dtype}")
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = torch.broadcast_tensors(a.to(dtype), b.to(dtype))
        B = len(self) if B is None else B
        shape = tuple(a.shape)
        if a.dim() <= 1:
            a2, b2 = a.reshape(1, -1), b.reshape(1, -1)
            out_shape = shape if B == 1 else (B,) + shape
        else:
            if shape[0] not in (1, B):
                raise ValueError(f"{names[0]}/{names[1]} of shape {shape}: the leading (batch) axis must be 1 or "
                                 f"the number of WCS ({B})")
            a2, b2 = a.reshape(shape[0], -1), b.reshape(shape[0], -1)
            out_shape = (max(shape[0], B),) + shape[1:]
        return a2, b2, out_shape

    def _p(self, dtype, device):
        """Parameters cast to the compute dtype/device, plus derived per-element constants."""
        cast = lambda t: t.to(dtype=dtype, device=device)
        P = {k: cast(getattr(self, k)) for k in ("crpix", "cd", "lonpole", "sip_a", "sip_b", "sip_ap", "sip_bp", "pv")}
        crval = self.crval
        if dtype == torch.float64:
            hi = cast(crval) + (cast(self.crval_lo) if crval.dtype != torch.float64 else 0.0)
            lo = torch.zeros_like(hi)
        else:
            hi = crval.to(dtype=dtype, device=device)
            if crval.dtype == torch.float64:
                lo = (crval - hi.to(torch.float64)).to(dtype=dtype, device=device)
            else:
                lo = cast(self.crval_lo)
        P["crval_hi"], P["crval_lo"] = hi, lo
        # trig of the tangent point and of LONPOLE-180 in float64 when the parameters allow it
        wide = torch.float64  # (B,) values only: cheap even where float64 is slow
        dec0 = crval[:, 1].to(wide) + (self.crval_lo[:, 1].to(wide) if crval.dtype != torch.float64 else 0.0)
        psi = self.lonpole.to(wide) - 180.0
        P["s0"] = torch.sin(dec0 * _D2R).to(dtype=dtype, device=device)
        P["c0"] = torch.cos(dec0 * _D2R).to(dtype=dtype, device=device)
        P["cpsi"] = torch.cos(psi * _D2R).to(dtype=dtype, device=device)
        P["spsi"] = torch.sin(psi * _D2R).to(dtype=dtype, device=device)
        return P

    # -- forward model pieces --------------------------------------------------------------------
    def _tpv(self, P, xi, eta, deriv: bool):
        B = P["pv"].shape[0]
        n = self._tpv_n
        e1, e2 = self._tpv_e1.to(xi), self._tpv_e2.to(xi)
        # The identity part (PV1_1 xi, PV2_1 eta ~ 1) is split off and added last, so that Horner's
        # rounding acts on the small distortion only (matters in float32 far from the tangent point).
        eye = torch.zeros(n * n, dtype=xi.dtype, device=xi.device)
        eye1, eye2 = eye.clone(), eye.clone()
        eye1[n] = 1.0  # xi^1 eta^0
        eye2[1] = 1.0  # xi^0 eta^1
        C1 = (P["pv"][:, 0, :] @ e1 - eye1).reshape(B, n, n)
        C2 = (P["pv"][:, 1, :] @ e2 - eye2).reshape(B, n, n)
        t1, t1x, t1y = _poly2(C1, xi, eta, deriv)
        t2, t2x, t2y = _poly2(C2, xi, eta, deriv)
        t1, t2 = xi + t1, eta + t2
        if deriv:
            t1x, t2y = t1x + 1, t2y + 1
        if self._tpv_r:
            r2 = xi * xi + eta * eta
            pos = r2 > 0
            r = torch.where(pos, torch.sqrt(torch.where(pos, r2, torch.ones_like(r2))), torch.zeros_like(r2))
            if deriv:
                rinv = torch.where(pos, 1.0 / torch.where(pos, r, torch.ones_like(r)), torch.zeros_like(r))
                cx, cy = xi * rinv, eta * rinv
            for k, power in self._tpv_r:
                c1 = P["pv"][:, 0, k].unsqueeze(-1)
                c2 = P["pv"][:, 1, k].unsqueeze(-1)
                rn = r ** power
                t1 = t1 + c1 * rn
                t2 = t2 + c2 * rn
                if deriv:
                    dr = power * r ** (power - 1)
                    t1x, t1y = t1x + c1 * dr * cx, t1y + c1 * dr * cy
                    t2x, t2y = t2x + c2 * dr * cx, t2y + c2 * dr * cy
        return t1, t2, (t1x, t1y, t2x, t2y)

    def _pix2int(self, P, x, y, deriv: bool = False):
        """Pixel (0-based) -> intermediate world coordinates (xi, eta) in deg; optional Jacobian."""
        u = x - P["crpix"][:, 0:1]
        v = y - P["crpix"][:, 1:2]
        if self.has_sip:
            A, Au, Av = _poly2(P["sip_a"], u, v, deriv)
            Bv, Bu, Bvv = _poly2(P["sip_b"], u, v, deriv)
            u2, v2 = u + A, v + Bv
        else:
            u2, v2 = u, v
        cd = P["cd"]
        c00, c01, c10, c11 = (cd[:, i, j].unsqueeze(-1) for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
        xi = c00 * u2 + c01 * v2
        eta = c10 * u2 + c11 * v2
        J = None
        if deriv:
            if self.has_sip:
                s00, s01, s10, s11 = 1 + Au, Av, Bu, 1 + Bvv
            else:
                one, zero = torch.ones_like(u), torch.zeros_like(u)
                s00, s01, s10, s11 = one, zero, zero, one
            j00 = c00 * s00 + c01 * s10
            j01 = c00 * s01 + c01 * s11
            j10 = c10 * s00 + c11 * s10
            j11 = c10 * s01 + c11 * s11
            J = (j00, j01, j10, j11)
        if self.has_tpv:
            xi, eta, T = self._tpv(P, xi, eta, deriv)
            if deriv:
                t00, t01, t10, t11 = T
                j00, j01, j10, j11 = J
                J = (t00 * j00 + t01 * j10, t00 * j01 + t01 * j11, t10 * j00 + t11 * j10, t10 * j01 + t11 * j11)
        return xi, eta, J

    def _int2pix(self, P, X, Y):
        """Intermediate world coordinates (deg) -> pixel (0-based): linear inverse, then Newton."""
        X0, Y0 = X, Y
        if self.has_tpv:
            pv = P["pv"]
            l00, l01 = pv[:, 0, 1].unsqueeze(-1), pv[:, 0, 2].unsqueeze(-1)
            l10, l11 = pv[:, 1, 2].unsqueeze(-1), pv[:, 1, 1].unsqueeze(-1)
            rx, ry = X - pv[:, 0, 0].unsqueeze(-1), Y - pv[:, 1, 0].unsqueeze(-1)
            det = l00 * l11 - l01 * l10
            X0, Y0 = (l11 * rx - l01 * ry) / det, (l00 * ry - l10 * rx) / det
        cd = P["cd"]
        c00, c01, c10, c11 = (cd[:, i, j].unsqueeze(-1) for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
        det = c00 * c11 - c01 * c10
        U = (c11 * X0 - c01 * Y0) / det
        V = (c00 * Y0 - c10 * X0) / det
        cx, cy = P["crpix"][:, 0:1], P["crpix"][:, 1:2]
        if not (self.has_sip or self.has_tpv):
            return U + cx, V + cy
        u, v = U, V
        if self.has_sip and self.has_sip_inverse:
            AP, _, _ = _poly2(P["sip_ap"], U, V, False)
            BP, _, _ = _poly2(P["sip_bp"], U, V, False)
            u, v = U + AP, V + BP
        x, y = u + cx, v + cy
        with torch.no_grad():
            x, y = x.detach(), y.detach()
            Xd, Yd = X.detach(), Y.detach()
            for _ in range(self.n_iter):
                x, y = self._newton_step(P, x, y, Xd, Yd, detach_params=True)
        return self._newton_step(P, x, y, X, Y, detach_params=False)

    def _newton_step(self, P, x, y, X, Y, detach_params: bool):
        xi, eta, J = self._pix2int(P, x, y, deriv=True)
        j00, j01, j10, j11 = (j.detach() for j in J)
        rx, ry = xi - X, eta - Y
        det = j00 * j11 - j01 * j10
        dx = (j11 * rx - j01 * ry) / det
        dy = (j00 * ry - j10 * rx) / det
        return x - dx, y - dy

    @staticmethod
    def _project(P, X, Y):
        """Intermediate (deg) -> (ra, dec) deg, stable relative to the tangent point."""
        cpsi, spsi = P["cpsi"].unsqueeze(-1), P["spsi"].unsqueeze(-1)
        x = (X * cpsi + Y * spsi) * _D2R
        y = (Y * cpsi - X * spsi) * _D2R
        s0, c0 = P["s0"].unsqueeze(-1), P["c0"].unsqueeze(-1)
        Pp = c0 - y * s0
        dra = torch.atan2(x, Pp)
        Q = torch.sqrt(x * x + Pp * Pp)
        pos = Pp > 0
        QmP = torch.where(pos, x * x / torch.where(pos, Q + Pp, torch.ones_like(Q)), Q - Pp)
        ddec = torch.atan2(y - QmP * s0, 1 + QmP * c0)
        hi, lo = P["crval_hi"], P["crval_lo"]
        ra = hi[:, 0:1] + (lo[:, 0:1] + dra * _R2D)
        ra = torch.remainder(ra, 360.0)
        ra = torch.where(ra >= 360.0, ra - 360.0, ra)
        dec = hi[:, 1:2] + (lo[:, 1:2] + ddec * _R2D)
        return ra, dec

    @staticmethod
    def _deproject(P, ra, dec):
        """(ra, dec) deg -> intermediate (deg); NaN on the far hemisphere."""
        hi, lo = P["crval_hi"], P["crval_lo"]
        a0, d0 = hi[:, 0:1], hi[:, 1:2]
        d = ra - a0
        dra = torch.where(d > 180, (ra - 360.0) - a0, torch.where(d < -180, ra - (a0 - 360.0), d)) - lo[:, 0:1]
        ddec = (dec - d0) - lo[:, 1:2]
        a = dra * _D2R
        cd_ = torch.cos(dec * _D2R)
        sh = torch.sin(0.5 * a)
        h = 2 * sh * sh
        s0, c0 = P["s0"].unsqueeze(-1), P["c0"].unsqueeze(-1)
        dd = ddec * _D2R
        D = torch.cos(dd) - cd_ * c0 * h
        ok = D > 0
        Ds = torch.where(ok, D, torch.ones_like(D))
        x = cd_ * torch.sin(a) / Ds * _R2D
        y = (torch.sin(dd) + cd_ * s0 * h) / Ds * _R2D
        nan = torch.full_like(x, float("nan"))
        x, y = torch.where(ok, x, nan), torch.where(ok, y, nan)
        cpsi, spsi = P["cpsi"].unsqueeze(-1), P["spsi"].unsqueeze(-1)
        return x * cpsi - y * spsi, x * spsi + y * cpsi

    #: On CPU, points are processed in chunks of about this many elements: each of the ~100
    #: element-wise ops then works on cache-sized temporaries instead of frame-sized ones.
    cpu_chunk: int = 1 << 16

    def _chunked(self, fn, a: Tensor, b: Tensor):
        rows = max(a.shape[0], len(self))
        step = max(1, self.cpu_chunk // rows)
        if a.device.type != "cpu" or a.shape[1] <= step:
            return fn(a, b)
        outs = [fn(ca, cb) for ca, cb in zip(a.split(step, dim=1), b.split(step, dim=1))]
        return torch.cat([o[0] for o in outs], 1), torch.cat([o[1] for o in outs], 1)

    # -- public API ------------------------------------------------------------------------------
    def pixel_to_world(self, x, y) -> tuple[Tensor, Tensor]:
        """0-based pixel ``(x, y)`` -> ``(ra, dec)`` in degrees (``0 <= ra < 360``).

        ``x``, ``y``: tensors shaped (B, ...) with batch element ``b`` using WCS ``b`` (a leading 1
        broadcasts), or 1-D (N,) points mapped by every WCS (result (B, N); (N,) when B == 1).
        Output dtype/device follow the inputs.
        """
        x2, y2, shape = self._prep_inputs(x, y, ("x", "y"))
        P = self._p(x2.dtype, x2.device)

        def run(xc, yc):
            X, Y, _ = self._pix2int(P, xc, yc)
            return self._project(P, X, Y)

        ra, dec = self._chunked(run, x2, y2)
        return ra.reshape(shape), dec.reshape(shape)

    def world_to_pixel(self, ra, dec) -> tuple[Tensor, Tensor]:
        """``(ra, dec)`` degrees -> 0-based pixel ``(x, y)``, exact (Newton on the forward model).

        Shapes as :meth:`pixel_to_world`. Points on the far side of the tangent plane give NaN.
        """
        a, d, shape = self._prep_inputs(ra, dec, ("ra", "dec"))
        P = self._p(a.dtype, a.device)

        def run(ac, dc):
            X, Y = self._deproject(P, ac, dc)
            return self._int2pix(P, X, Y)

        x, y = self._chunked(run, a, d)
        return x.reshape(shape), y.reshape(shape)

    def forward(self, x, y) -> tuple[Tensor, Tensor]:
        """Same as :meth:`pixel_to_world`."""
        return self.pixel_to_world(x, y)

    def _frame(self, dtype=torch.float64):
        """(B, 3, 3) float64 matrices whose columns are the celestial unit vectors of the tangent
        plane axes (xi, eta) and of the tangent point."""
        crval = self.crval.to(torch.float64) + (self.crval_lo.to(torch.float64)
                                                  if self.crval.dtype != torch.float64 else 0.0)
        a0, d0 = crval[:, 0] * _D2R, crval[:, 1] * _D2R
        psi = (self.lonpole.to(torch.float64) - 180.0) * _D2R
        ca, sa, cdl, sdl = torch.cos(a0), torch.sin(a0), torch.cos(d0), torch.sin(d0)
        ez = torch.stack([cdl * ca, cdl * sa, sdl], -1)
        ex = torch.stack([-sa, ca, torch.zeros_like(sa)], -1)
        ey = torch.stack([-sdl * ca, -sdl * sa, cdl], -1)
        cp, sp = torch.cos(psi)[:, None], torch.sin(psi)[:, None]
        e1 = cp * ex - sp * ey
        e2 = sp * ex + cp * ey
        return torch.stack([e1, e2, ez], -1)

    def pixel_to_pixel(self, target: "TanWCS", x, y) -> tuple[Tensor, Tensor]:
        """Map 0-based pixels of this WCS to 0-based pixels of ``target`` (what reprojection needs).

        Goes from this tangent plane to the target's through a rotation computed in float64, never
        forming absolute (ra, dec): float32 inputs keep ~1e-7 relative precision of the offsets
        (absolute float32 world coordinates are limited to ~1e-5 deg). Batches broadcast (B or 1).
        """
        if not isinstance(target, TanWCS):
            raise TypeError(f"target must be a TanWCS, got {type(target).__name__}")
        Bs, Bt = len(self), len(target)
        if Bs != Bt and 1 not in (Bs, Bt):
            raise ValueError(f"batch sizes of the two WCS differ ({Bs} and {Bt})")
        x2, y2, shape = self._prep_inputs(x, y, ("x", "y"), B=max(Bs, Bt))
        P = self._p(x2.dtype, x2.device)
        R = target._frame().to(x2.device).transpose(-1, -2) @ self._frame().to(x2.device)
        Rm = (R - torch.eye(3, dtype=R.dtype, device=R.device)).to(x2.dtype)
        r = lambda i, j: Rm[:, i, j].unsqueeze(-1)
        Pt = target._p(x2.dtype, x2.device)

        def run(xc, yc):
            X, Y, _ = self._pix2int(P, xc, yc)
            n0, n1 = X * _D2R, Y * _D2R
            m0 = n0 + (r(0, 0) * n0 + r(0, 1) * n1 + r(0, 2))
            m1 = n1 + (r(1, 0) * n0 + r(1, 1) * n1 + r(1, 2))
            m2 = 1 + (r(2, 0) * n0 + r(2, 1) * n1 + r(2, 2))
            ok = m2 > 0
            m2s = torch.where(ok, m2, torch.ones_like(m2))
            nan = torch.full_like(m0, float("nan"))
            X2 = torch.where(ok, m0 / m2s * _R2D, nan)
            Y2 = torch.where(ok, m1 / m2s * _R2D, nan)
            return target._int2pix(Pt, X2, Y2)

        xt, yt = self._chunked(run, x2, y2)
        out_shape = shape
        return xt.reshape(out_shape), yt.reshape(out_shape)

    def jacobian(self, x, y) -> Tensor:
        """d(xi, eta)/d(x, y) of the intermediate (tangent-plane) coordinates, deg/px, shaped
        (..., 2, 2) with ``[..., 0, 1] = d xi / d y``. Includes SIP/TPV distortion."""
        x2, y2, shape = self._prep_inputs(x, y, ("x", "y"))
        P = self._p(x2.dtype, x2.device)
        _, _, J = self._pix2int(P, x2, y2, deriv=True)
        J = torch.stack([torch.stack([J[0], J[1]], -1), torch.stack([J[2], J[3]], -1)], -2)
        return J.reshape(tuple(shape) + (2, 2))

    def pixel_area(self, x, y) -> Tensor:
        """Solid angle of the pixel at ``(x, y)`` in deg^2 (distortion and TAN projection included):
        ``|det J| / (1 + R^2)^{3/2}`` with ``R`` the tangent-plane radius in radians."""
        x2, y2, shape = self._prep_inputs(x, y, ("x", "y"))
        P = self._p(x2.dtype, x2.device)
        X, Y, J = self._pix2int(P, x2, y2, deriv=True)
        det = (J[0] * J[3] - J[1] * J[2]).abs()
        R2 = (X * X + Y * Y) * (_D2R * _D2R)
        return (det / (1 + R2) ** 1.5).reshape(shape)

    def pixel_scale(self) -> Tensor:
        """(B,) nominal pixel scale ``sqrt(|det CD|)`` in deg/px (distortion ignored)."""
        return torch.linalg.det(self.cd).abs().sqrt()

    def _element(self, b: int) -> dict:
        """Batch element ``b`` as the float64 numpy dict that ``_from_parsed`` takes (no mutation)."""
        get = lambda t: t[b].detach().to(device="cpu", dtype=torch.float64)
        crval = get(self.crval) + (get(self.crval_lo) if self.crval.dtype != torch.float64 else 0.0)
        m = self.meta[b]
        p = dict(kind=m["kind"], crpix=get(self.crpix).tolist(), crval=crval.tolist(), cd=get(self.cd).numpy(),
                 lonpole=float(get(self.lonpole)), ctype=m["ctype"], radesys=m["radesys"], equinox=m["equinox"],
                 shape=m["shape"], sip=None, pv=None)
        if m["kind"] == "SIP" and self.has_sip:
            oa, ob = m.get("sip_order", (self.sip_a.shape[-1] - 1,) * 2)
            sip = {"A": get(self.sip_a)[: oa + 1, : oa + 1].numpy(), "B": get(self.sip_b)[: ob + 1, : ob + 1].numpy(),
                   "AP": None, "BP": None}
            inv = m.get("sip_inv_order")
            if inv is not None and self.has_sip_inverse:
                sip["AP"] = get(self.sip_ap)[: inv[0] + 1, : inv[0] + 1].numpy()
                sip["BP"] = get(self.sip_bp)[: inv[1] + 1, : inv[1] + 1].numpy()
            p["sip"] = sip
        if m["kind"] == "TPV" and self.has_tpv:
            p["pv"] = get(self.pv)[:, : m.get("tpv_nterms", self.pv.shape[-1])].numpy()
        return p

    def to_header(self, index: int = 0):
        """astropy ``Header`` with the WCS of batch element ``index`` (FITS 1-based CRPIX; SIP or TPV
        keys included), readable by astropy.wcs and by :meth:`from_header`."""
        from astropy.io import fits

        B = len(self)
        if not -B <= index < B:
            raise IndexError(f"index {index} out of range for a TanWCS batch of {B}")
        b = index % B
        m = self.meta[b]
        p = self._element(b)
        h = fits.Header()
        h["WCSAXES"] = 2
        proj = {"TAN": "TAN", "SIP": "TAN-SIP", "TPV": "TPV"}[m["kind"]]
        lon, lat = m["ctype"]
        h["CTYPE1"] = f"{lon}-{proj}"
        h["CTYPE2"] = f"{lat}-{proj}"
        h["CUNIT1"], h["CUNIT2"] = "deg", "deg"
        h["CRPIX1"] = p["crpix"][0] + 1.0
        h["CRPIX2"] = p["crpix"][1] + 1.0
        h["CRVAL1"] = p["crval"][0]
        h["CRVAL2"] = p["crval"][1]
        for i in range(2):
            for j in range(2):
                h[f"CD{i + 1}_{j + 1}"] = float(p["cd"][i, j])
        h["LONPOLE"] = p["lonpole"]
        if m.get("radesys"):
            h["RADESYS"] = m["radesys"]
        if m.get("equinox") is not None:
            h["EQUINOX"] = m["equinox"]
        if p["sip"] is not None:
            for key in ("A", "B", "AP", "BP"):
                arr = p["sip"][key]
                if arr is None:
                    continue
                order = arr.shape[0] - 1
                h[f"{key}_ORDER"] = int(order)
                for i in range(order + 1):
                    for j in range(order + 1 - i):
                        if arr[i, j] != 0.0:
                            h[f"{key}_{i}_{j}"] = float(arr[i, j])
        if p["pv"] is not None:
            for i in range(2):
                for k in range(p["pv"].shape[1]):
                    h[f"PV{i + 1}_{k}"] = float(p["pv"][i, k])
        return h
