"""Moving objects across a night: linking detections from several exposures into tracklets.

Input: flat 1-D tensors of detections from many exposures (RA, Dec in degrees, MJD UTC of mid-exposure,
optionally magnitudes, positional errors, trail shapes, exposure ids). Output: a :class:`Tracklets`
with one label per detection (tracklet id or -1) and, per tracklet, the rate (arcsec/min), position
angle (deg, North through East), residual rms (arcsec), mean magnitude and number of detections.

Algorithm (all steps vectorised over detections; Python loops run over exposures or exposure pairs):

1. **Stationary sources.** Every detection is matched with the detections of the other exposures
   within its tolerance (below). A detection with matches in ``stationary_matches`` or more other
   exposures is stationary (a star, a galaxy, a transient at a fixed position) and is not linked.
   With native detector pixels ``x, y``, a detection at the same pixel (``pixel_tol``) in as many
   other exposures is a detector artefact (hot pixel) and is not linked either.
2. **Seed pairs.** For pairs of exposures at most ``(E - 1) // (min_detections - 1)`` apart in time
   order (any ``min_detections`` of ``E`` exposures include two that close), the detections within
   ``rate_max * dt`` of each other (neighbours by hashing unit vectors on a 3-D grid, so RA wrap and
   the poles need no care) whose implied rate lies in ``[rate_min, rate_max]``, whose magnitudes
   agree within ``mag_tol`` and whose trails (if given) lie along the pair's motion and are not
   much shorter than ``rate * exptime``.
3. **Prediction.** Each seed pair predicts, by linear motion in the tangent plane at its first
   detection, a position in every other exposure; the nearest detection within the propagated
   tolerance joins. The members are fitted by weighted least squares (position linear in time,
   in a gnomonic tangent plane around the members' mean direction, batched over candidates), the
   worst outlier beyond ``n_sigma`` is dropped until all fit, then the fitted line collects the
   nearest detection in every exposure again and is refitted.
4. **Conflicts.** Candidates with fewer than ``min_detections`` members, too slow to have moved more
   than their tolerance over their time span, or with rates outside the limits are dropped; identical
   member sets merge; overlapping candidates are resolved greedily by score (more detections first,
   then lower chi-square) in rounds of tensor operations: a candidate is accepted when it scores best
   among all candidates sharing any of its detections. Detections left over are linked once more.

Tolerance of a detection pair ``i, j``: ``max(tolerance_floor, n_sigma * sqrt(err_i^2 + err_j^2))``
arcsec, with ``err`` the 1-sigma positional error per axis (``pos_err``; 0 when not given, so the
floor alone applies).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

__all__ = ["TrackletLinker", "Tracklets", "link_tracklets", "radec_to_xyz", "shape_on_sky", "tangent_plane"]

ARCSEC = math.pi / (180.0 * 3600.0)


@dataclass
class Tracklets:
    """Linked tracklets.

    Attributes:
        labels: ``(N,)`` int64, the tracklet of each input detection or -1.
        stationary: ``(N,)`` bool, detections judged stationary (not linked).
        n: ``(K,)`` int64 detections per tracklet.
        rate: ``(K,)`` arcsec/min; ``pa``: ``(K,)`` deg, North through East, at ``mjd``.
        rms: ``(K,)`` arcsec, rms of the 2-D residuals from the fitted linear motion.
        mag: ``(K,)`` mean magnitude of the members (NaN without magnitudes).
        mjd: ``(K,)`` mean time of the members; ``ra, dec``: ``(K,)`` fitted position at ``mjd``.
        ra_rate, dec_rate: ``(K,)`` arcsec/min, ``dRA/dt cos(Dec)`` and ``dDec/dt``.
        params: the linking parameters; timings: seconds per step (prepare, stationary, link).
    """

    labels: Tensor
    stationary: Tensor
    n: Tensor
    rate: Tensor
    pa: Tensor
    rms: Tensor
    mag: Tensor
    mjd: Tensor
    ra: Tensor
    dec: Tensor
    ra_rate: Tensor
    dec_rate: Tensor
    params: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.n.numel())

    def members(self, k: int) -> Tensor:
        """Indices of the detections of tracklet ``k``."""
        return torch.nonzero(self.labels == int(k)).flatten()

    def to_table(self):
        """One row per tracklet: ``tracklet, n, rate, pa, rms, mag, mjd, ra, dec, ra_rate, dec_rate``."""
        from astropy.table import Table

        cols = {"tracklet": torch.arange(len(self))}
        for name in ("n", "rate", "pa", "rms", "mag", "mjd", "ra", "dec", "ra_rate", "dec_rate"):
            cols[name] = getattr(self, name)
        t = Table({k: v.detach().cpu().numpy() for k, v in cols.items()})
        units = {"rate": "arcsec/min", "pa": "deg", "rms": "arcsec", "ra": "deg", "dec": "deg", "mag": "mag",
                 "ra_rate": "arcsec/min", "dec_rate": "arcsec/min", "mjd": "d"}
        for k, u in units.items():
            t[k].unit = u
        return t


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------
def radec_to_xyz(ra: Tensor, dec: Tensor) -> Tensor:
    """Unit vectors ``(..., 3)`` from RA, Dec in degrees."""
    a, d = torch.deg2rad(ra), torch.deg2rad(dec)
    return torch.stack([torch.cos(d) * torch.cos(a), torch.cos(d) * torch.sin(a), torch.sin(d)], -1)


def _xyz_to_radec(u: Tensor) -> tuple[Tensor, Tensor]:
    ra = torch.rad2deg(torch.atan2(u[..., 1], u[..., 0])) % 360.0
    dec = torch.rad2deg(torch.asin((u[..., 2] / u.norm(dim=-1)).clamp(-1.0, 1.0)))
    return ra, dec


def _basis(centre: Tensor) -> tuple[Tensor, Tensor]:
    """East and North unit vectors ``(..., 3)`` of the tangent plane at unit vectors ``centre``."""
    a = torch.atan2(centre[..., 1], centre[..., 0])
    d = torch.asin(centre[..., 2].clamp(-1.0, 1.0))
    east = torch.stack([-torch.sin(a), torch.cos(a), torch.zeros_like(a)], -1)
    north = torch.stack([-torch.sin(d) * torch.cos(a), -torch.sin(d) * torch.sin(a), torch.cos(d)], -1)
    return east, north


def tangent_plane(u: Tensor, centre: Tensor) -> tuple[Tensor, Tensor]:
    """Gnomonic (xi, eta) in radians of unit vectors ``u`` around unit vectors ``centre`` (broadcast)."""
    east, north = _basis(centre)
    w = (u * centre).sum(-1)
    return (u * east).sum(-1) / w, (u * north).sum(-1) / w


def _from_tangent(xi: Tensor, eta: Tensor, centre: Tensor) -> Tensor:
    east, north = _basis(centre)
    u = centre + xi[..., None] * east + eta[..., None] * north
    return u / u.norm(dim=-1, keepdim=True)


def _grid_pairs(q: Tensor, r: Tensor, radius: float) -> tuple[Tensor, Tensor]:
    """All pairs ``(i, j)`` with ``|q_i - r_j| <= radius`` (Euclidean; for unit vectors a chord).

    The larger set is hashed on a cubic grid of cell ``2 * radius``; a ball of that radius lies in
    the 2 x 2 x 2 block of cells nearest to its centre, so each point of the smaller set looks up
    8 cells by binary search over the occupied cells.
    """
    empty = torch.zeros(0, dtype=torch.long, device=q.device)
    if q.shape[0] == 0 or r.shape[0] == 0:
        return empty, empty
    if q.shape[0] > r.shape[0]:
        rj, qi = _grid_pairs(r, q, radius)
        return qi, rj
    lo = torch.minimum(q.amin(0), r.amin(0))
    span = float((torch.maximum(q.amax(0), r.amax(0)) - lo).max())
    cell = max(2.0 * float(radius), span / (1 << 20), 1e-300)
    k = int(span / cell) + 4

    def key(c):
        return (c[..., 0] * k + c[..., 1]) * k + c[..., 2]

    kr, order = torch.sort(key(torch.floor((r - lo) / cell).long() + 1))
    ku, cu = torch.unique_consecutive(kr, return_counts=True)
    su = torch.cumsum(cu, 0) - cu
    base = torch.floor((q - lo) / cell - 0.5).long() + 1
    d = torch.arange(2, device=q.device)
    offs = torch.stack(torch.meshgrid(d, d, d, indexing="ij"), -1).reshape(-1, 3)
    keys = key(base[:, None, :] + offs[None, :, :]).reshape(-1)  # (Nq * 8,)
    pos = torch.searchsorted(ku, keys).clamp(max=ku.numel() - 1)
    found = ku[pos] == keys
    cnt = torch.where(found, cu[pos], torch.zeros_like(pos))
    lo_idx = su[pos]
    qi = torch.repeat_interleave(torch.arange(q.shape[0], device=q.device).repeat_interleave(8), cnt)
    first = torch.repeat_interleave(lo_idx - (torch.cumsum(cnt, 0) - cnt), cnt)
    rj = order[torch.arange(qi.numel(), device=q.device) + first]
    ok = ((q[qi] - r[rj]) ** 2).sum(-1) <= radius * radius
    return qi[ok], rj[ok]


def _nearest(q: Tensor, tol: Tensor, r: Tensor) -> tuple[Tensor, Tensor]:
    """For each query unit vector, the index of the nearest ``r`` within ``tol`` (radians) or -1, and its distance."""
    nq = q.shape[0]
    out = torch.full((nq,), -1, dtype=torch.long, device=q.device)
    dist = torch.full((nq,), float("inf"), dtype=q.dtype, device=q.device)
    if nq == 0 or r.shape[0] == 0:
        return out, dist
    qi, rj = _grid_pairs(q, r, float(tol.max()))
    d = (q[qi] - r[rj]).norm(dim=-1)
    ok = d <= tol[qi]
    qi, rj, d = qi[ok], rj[ok], d[ok]
    dist.scatter_reduce_(0, qi, d, "amin")
    best = d <= dist[qi]
    out[qi[best]] = rj[best]
    return out, dist


# --------------------------------------------------------------------------------------------
# Input
# --------------------------------------------------------------------------------------------
def _column(x, name: str, n: int, device, *, allow_nan: bool = True, scalar_ok: bool = False) -> Optional[Tensor]:
    if x is None:
        return None
    t = torch.as_tensor(x, device=device).to(torch.float64)
    if scalar_ok and t.ndim == 0:
        t = t.expand(n)
    if t.ndim != 1 or t.shape[0] != n:
        raise ValueError(f"{name} must be a 1-D tensor of {n} values (one per detection), got shape {tuple(t.shape)}")
    if not allow_nan and not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise ValueError(f"{name} has {bad} non-finite values (NaN or inf); drop or fill those detections first")
    return t


def _exposure_ids(t_min: Tensor, exposure, device) -> Tensor:
    """Exposure index per detection: given ids relabelled 0.. in time order, or times split at gaps > 1 s."""
    if exposure is not None:
        e = torch.as_tensor(exposure, device=device)
        if e.shape != t_min.shape or e.is_floating_point():
            raise ValueError(f"exposure must be an integer tensor of shape {tuple(t_min.shape)}, got "
                             f"{e.dtype} {tuple(e.shape)}")
        uniq, inv = torch.unique(e, return_inverse=True)
        first = torch.full((uniq.numel(),), float("inf"), dtype=t_min.dtype, device=device)
        first.scatter_reduce_(0, inv, t_min, "amin")
        rank = torch.empty_like(inv[: uniq.numel()])
        rank[torch.argsort(first)] = torch.arange(uniq.numel(), device=device)
        return rank[inv]
    order = torch.argsort(t_min)
    ts = t_min[order]
    new = torch.cat([torch.zeros(1, dtype=torch.long, device=device), (torch.diff(ts) > 1.0 / 60.0).long()])
    out = torch.empty_like(order)
    out[order] = torch.cumsum(new, 0)
    return out


def _trail_columns(cols: dict, n: int, dev, p: dict) -> dict:
    """Trail orientation (deg mod 180, NaN if not elongated), measured length and its slack (arcsec)."""
    nan = torch.full((n,), float("nan"), dtype=torch.float64, device=dev)
    out = {"trail": nan, "tlen": nan, "tslack": nan, "exptime": nan}
    a, b, theta = cols.get("a"), cols.get("b"), cols.get("theta")
    if a is None and b is None and theta is None:
        return out
    if a is None or b is None:
        raise ValueError("a and b (trail semi-axes, arcsec) must be given together")
    a_t, b_t = _column(a, "a", n, dev), _column(b, "b", n, dev)
    if theta is not None:
        th = _column(theta, "theta", n, dev)
        out["trail"] = torch.where(a_t >= p["trail_elongation"] * b_t, th % 180.0, nan)
    # A segment of length L smeared by a PSF of rms b has rms a = sqrt(b^2 + L^2 / 12) along it.
    out["tlen"] = torch.sqrt(torch.clamp(12.0 * (a_t**2 - b_t**2), min=0.0))
    if cols.get("exptime") is not None:
        out["tslack"] = 3.0 * b_t  # a and b of faint sources scatter by ~1/snr
        out["exptime"] = _column(cols["exptime"], "exptime", n, dev, allow_nan=False, scalar_ok=True)
    return out


def _prepare(ra, dec, mjd, cols: dict, p: dict) -> dict:
    """Validate the columns and derive unit vectors, times (minutes), exposure ids and errors."""
    ra_t = torch.as_tensor(ra)
    dev = ra_t.device
    if ra_t.ndim != 1:
        raise ValueError(f"ra must be a 1-D tensor (one value per detection), got shape {tuple(ra_t.shape)}")
    n = ra_t.shape[0]
    ra_t = _column(ra, "ra", n, dev, allow_nan=False)
    dec_t = _column(dec, "dec", n, dev, allow_nan=False)
    t = _column(mjd, "mjd", n, dev, allow_nan=False)
    if ((dec_t < -90) | (dec_t > 90)).any():
        raise ValueError("dec must lie in [-90, 90] degrees")
    t_min = (t - (t.min() if n else 0.0)) * 1440.0
    err = _column(cols.get("pos_err"), "pos_err", n, dev, allow_nan=False, scalar_ok=True)
    if err is not None and (err < 0).any():
        raise ValueError("pos_err must be >= 0 (arcsec)")
    err = torch.zeros(n, dtype=torch.float64, device=dev) if err is None else err
    trail = _trail_columns(cols, n, dev, p)
    # A trail's centroid moves along it when its faint ends drop below the isophote (trails only:
    # the a, b of round sources scatter too much to measure a length).
    # The stationarity and "has moved" tests keep the plain errors (``sig0``).
    tlen = torch.where(torch.isfinite(trail["trail"]), trail["tlen"], torch.zeros_like(trail["tlen"]))
    floor = p["tolerance_floor"] / (p["n_sigma"] * math.sqrt(2.0))
    sig0 = torch.clamp(err, min=floor)
    sig = torch.clamp(torch.sqrt(err**2 + torch.nan_to_num(p["trail_err_frac"] * tlen) ** 2), min=floor)
    m = _column(cols.get("mag"), "mag", n, dev)
    m = torch.full((n,), float("nan"), dtype=torch.float64, device=dev) if m is None else m
    pix = None
    if cols.get("x") is not None or cols.get("y") is not None:
        if cols.get("x") is None or cols.get("y") is None:
            raise ValueError("x and y (detector pixels) must be given together")
        x, y = _column(cols["x"], "x", n, dev, allow_nan=False), _column(cols["y"], "y", n, dev, allow_nan=False)
        pix = torch.stack([x, y, torch.zeros_like(x)], -1)
    e = _exposure_ids(t_min, cols.get("exposure"), dev)
    n_exp = int(e.max()) + 1 if n else 0
    texp = torch.zeros(n_exp, dtype=torch.float64, device=dev).index_add_(0, e, t_min)
    texp = texp / torch.bincount(e, minlength=n_exp).clamp(min=1).to(texp.dtype)
    return {"xyz": radec_to_xyz(ra_t, dec_t), "t": t_min, "t0": t.min() if n else 0.0, "exp": e,
            "texp": texp, "mag": m, "sig": sig, "sig0": sig0, "pix": pix, "n": n, "n_exp": n_exp, **trail}


# --------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------
def _pair_tol(sig_i: Tensor, sig_j: Tensor, p: dict) -> Tensor:
    """Matching tolerance in arcsec of two detections with per-axis errors ``sig`` (arcsec)."""
    return torch.clamp(p["n_sigma"] * torch.sqrt(sig_i**2 + sig_j**2), min=p["tolerance_floor"])


def find_stationary(D: dict, p: dict) -> Tensor:
    """Detections with a match (within the pair tolerance) in ``stationary_matches`` or more other exposures."""
    n = D["n"]
    if n == 0:
        return torch.zeros(0, dtype=torch.bool)
    rmax = float(_pair_tol(D["sig0"].max(), D["sig0"].max(), p)) * ARCSEC
    i, j = _grid_pairs(D["xyz"], D["xyz"], rmax)
    keep = D["exp"][i] != D["exp"][j]
    i, j = i[keep], j[keep]
    d = (D["xyz"][i] - D["xyz"][j]).norm(dim=-1) / ARCSEC
    ok = d <= _pair_tol(D["sig0"][i], D["sig0"][j], p)
    stationary = _count_other_exposures(D, i[ok], j[ok]) >= p["stationary_matches"]
    if D["pix"] is not None:  # detector artefacts: the same pixel in other exposures
        rest = torch.nonzero(~stationary).flatten()
        i, j = _grid_pairs(D["pix"][rest], D["pix"], p["pixel_tol"])
        i = rest[i]
        keep = D["exp"][i] != D["exp"][j]
        stationary |= _count_other_exposures(D, i[keep], j[keep]) >= p["stationary_matches"]
    return stationary


def _count_other_exposures(D: dict, i: Tensor, j: Tensor) -> Tensor:
    """Number of distinct exposures among the matches ``j`` of each detection ``i``."""
    code = torch.unique(i * D["n_exp"] + D["exp"][j])
    return torch.bincount(code // D["n_exp"], minlength=D["n"])


def _angle_diff180(a: Tensor, b: Tensor) -> Tensor:
    d = (a - b) % 180.0
    return torch.minimum(d, 180.0 - d)


def _trail_length_bad(D: dict, idx: Tensor, rate: Tensor, p: dict) -> Tensor:
    """Trail much shorter than ``rate`` (arcsec/min) x exposure time (False if unknown): a round
    detection cannot be a fast mover. (Longer than expected is allowed: blends, galaxies.)"""
    expect = rate * D["exptime"][idx] / 60.0
    return D["tlen"][idx] < (1.0 - p["trail_length_tol"]) * expect - D["tslack"][idx]


def _seed_pairs(D: dict, active: Tensor, p: dict) -> tuple[Tensor, Tensor]:
    """Detection pairs from two exposures whose separation, magnitudes and trails allow one mover."""
    e, xyz = D["exp"], D["xyz"]
    idx = [torch.nonzero(active & (e == k)).flatten() for k in range(D["n_exp"])]
    tol_max = float(_pair_tol(D["sig"].max(), D["sig"].max(), p))
    out_i, out_j = [], []
    # Any min_detections exposures of a tracklet include two at most this many exposures apart.
    max_step = max(1, (D["n_exp"] - 1) // (p["min_detections"] - 1))
    for a in range(D["n_exp"]):
        for b in range(a + 1, min(a + max_step, D["n_exp"] - 1) + 1):
            dt = float(D["texp"][b] - D["texp"][a])
            if p["max_gap"] is not None and dt > p["max_gap"]:
                continue
            radius = (p["rate_max"] * dt + tol_max) * ARCSEC
            qi, rj = _grid_pairs(xyz[idx[a]], xyz[idx[b]], radius)
            i, j = idx[a][qi], idx[b][rj]
            sep = (xyz[i] - xyz[j]).norm(dim=-1) / ARCSEC
            dtij = D["t"][j] - D["t"][i]
            tol = _pair_tol(D["sig"][i], D["sig"][j], p)
            ok = (sep >= p["rate_min"] * dtij - tol) & (sep <= p["rate_max"] * dtij + tol) & (sep > tol)
            dm = (D["mag"][i] - D["mag"][j]).abs()
            ok &= ~(dm > p["mag_tol"])
            xi, eta = tangent_plane(xyz[j], xyz[i])
            pa = torch.rad2deg(torch.atan2(xi, eta)) % 180.0
            for k in (i, j):
                ok &= ~(_angle_diff180(D["trail"][k], pa) > p["trail_angle_tol"])
                ok &= ~_trail_length_bad(D, k, sep / dtij, p)
            out_i.append(i[ok])
            out_j.append(j[ok])
    if not out_i:
        z = torch.zeros(0, dtype=torch.long, device=xyz.device)
        return z, z
    return torch.cat(out_i), torch.cat(out_j)


def _nearest_in(D: dict, active: Tensor, c: int, pred: Tensor, tol_arcsec: Tensor) -> Tensor:
    """Index of the active detection of exposure ``c`` nearest to each ``pred`` within its tolerance, or -1."""
    ref = torch.nonzero(active & (D["exp"] == c)).flatten()
    near, _ = _nearest(pred, tol_arcsec * ARCSEC, D["xyz"][ref])
    if ref.numel() == 0:
        return near
    return torch.where(near >= 0, ref[near.clamp(min=0)], near)


def _predict_from_pairs(D: dict, active: Tensor, i: Tensor, j: Tensor, p: dict) -> Tensor:
    """Members ``(C, E)`` of the candidates seeded by pairs ``(i, j)``: the nearest detection to the
    linear prediction in every other exposure, within the propagated tolerance."""
    xyz, e = D["xyz"], D["exp"]
    members = torch.full((i.numel(), D["n_exp"]), -1, dtype=torch.long, device=xyz.device)
    ar = torch.arange(i.numel(), device=xyz.device)
    members[ar, e[i]] = i
    members[ar, e[j]] = j
    xi_j, eta_j = tangent_plane(xyz[j], xyz[i])
    dt = D["t"][j] - D["t"][i]
    sig = torch.maximum(D["sig"][i], D["sig"][j])
    for c in range(D["n_exp"]):
        todo = (e[i] != c) & (e[j] != c)
        lam = (D["texp"][c] - D["t"][i]) / dt
        pred = _from_tangent(lam * xi_j, lam * eta_j, xyz[i])
        tol = torch.clamp(p["n_sigma"] * sig * torch.sqrt((1 - lam) ** 2 + lam**2 + 1), min=p["tolerance_floor"])
        members[todo, c] = _nearest_in(D, active, c, pred[todo], tol[todo])
    return members


def _fit(D: dict, members: Tensor) -> dict:
    """Weighted least-squares linear motion of each candidate's members, in the tangent plane at
    their mean direction. Returns the centre, mean time, position and velocity (rad, rad/min) and
    the per-member residuals in arcsec (``inf`` where a member is missing)."""
    valid = members >= 0
    idx = members.clamp(min=0)
    u = D["xyz"][idx]  # (C, E, 3)
    w = valid.to(u.dtype) / D["sig"][idx] ** 2
    centre = (u * valid[..., None]).sum(1)
    centre = centre / centre.norm(dim=-1, keepdim=True).clamp(min=1e-300)
    xi, eta = tangent_plane(u, centre[:, None, :])
    t = D["t"][idx]
    W = w.sum(1).clamp(min=1e-300)
    tm = (w * t).sum(1) / W
    dt = torch.where(valid, t - tm[:, None], torch.zeros_like(t))
    stt = (w * dt**2).sum(1).clamp(min=1e-300)
    xi0, eta0 = (w * xi).sum(1) / W, (w * eta).sum(1) / W
    xi, eta = torch.where(valid, xi, xi0[:, None]), torch.where(valid, eta, eta0[:, None])
    vxi = (w * dt * (xi - xi0[:, None])).sum(1) / stt
    veta = (w * dt * (eta - eta0[:, None])).sum(1) / stt
    rx = xi - xi0[:, None] - vxi[:, None] * dt
    ry = eta - eta0[:, None] - veta[:, None] * dt
    res = torch.sqrt(rx**2 + ry**2) / ARCSEC
    res = torch.where(valid, res, torch.full_like(res, float("inf")))
    n = valid.sum(1)
    span = torch.where(valid, t, torch.full_like(t, -float("inf"))).amax(1) - \
        torch.where(valid, t, torch.full_like(t, float("inf"))).amin(1)
    return {"centre": centre, "tm": tm, "xi0": xi0, "eta0": eta0, "vxi": vxi, "veta": veta, "res": res,
            "n": n, "span": span, "stt": stt, "W": W}


def _member_badness(D: dict, members: Tensor, fit: dict, p: dict) -> Tensor:
    """Per member: normalised residual, ``inf`` when its magnitude or trail disagrees (-1 if missing)."""
    valid = members >= 0
    idx = members.clamp(min=0)
    sig = D["sig"][idx]
    z = fit["res"] / sig
    mag = torch.where(valid, D["mag"][idx], torch.full_like(sig, float("nan")))
    med = torch.nanmedian(mag, dim=1).values
    bad = (mag - med[:, None]).abs() > p["mag_tol"]
    pa = torch.rad2deg(torch.atan2(fit["vxi"], fit["veta"])) % 180.0
    bad |= _angle_diff180(D["trail"][idx], pa[:, None]) > p["trail_angle_tol"]
    rate = torch.hypot(fit["vxi"], fit["veta"]) / ARCSEC
    bad |= _trail_length_bad(D, idx, rate[:, None], p)
    z = torch.where(bad, torch.full_like(z, float("inf")), z)
    return torch.where(valid, z, torch.full_like(z, -1.0))


def _reject_outliers(D: dict, members: Tensor, p: dict) -> tuple[Tensor, dict]:
    """Drop each candidate's worst member while it lies beyond ``n_sigma`` (one per candidate per round)."""
    for _ in range(max(D["n_exp"] - 1, 1)):
        fit = _fit(D, members)
        z = _member_badness(D, members, fit, p)
        worst = z.argmax(1)
        drop = z.gather(1, worst[:, None]).squeeze(1) > p["n_sigma"]
        if not bool(drop.any()):
            return members, fit
        ar = torch.arange(members.shape[0], device=members.device)
        members = members.clone()
        members[ar[drop], worst[drop]] = -1
    return members, _fit(D, members)


def _collect_along_fit(D: dict, active: Tensor, members: Tensor, fit: dict, p: dict) -> Tensor:
    """Re-select, in every exposure, the detection nearest to the fitted line within its tolerance."""
    valid = members >= 0
    sig = torch.where(valid, D["sig"][members.clamp(min=0)], torch.zeros_like(fit["res"]))
    sbar = (sig.sum(1) / valid.sum(1).clamp(min=1)).clamp(min=1e-12)
    out = members.clone()
    for c in range(D["n_exp"]):
        dt = D["texp"][c] - fit["tm"]
        pred = _from_tangent(fit["xi0"] + fit["vxi"] * dt, fit["eta0"] + fit["veta"] * dt, fit["centre"])
        lever = 1.0 / valid.sum(1).clamp(min=1) + fit["W"] * dt**2 / fit["stt"] / valid.sum(1).clamp(min=1)
        tol = torch.clamp(p["n_sigma"] * sbar * torch.sqrt(1.0 + lever), min=p["tolerance_floor"])
        out[:, c] = _nearest_in(D, active, c, pred, tol)
    return out


def _valid_candidates(D: dict, members: Tensor, fit: dict, p: dict) -> Tensor:
    """Enough members, rate within the limits, and moved more than the tolerance over the span."""
    rate = torch.hypot(fit["vxi"], fit["veta"]) / ARCSEC
    valid = members >= 0
    sig = torch.where(valid, D["sig0"][members.clamp(min=0)], torch.zeros_like(fit["res"]))
    sbar = sig.amax(1)
    moved = rate * fit["span"] > _pair_tol(sbar, sbar, p)
    return (fit["n"] >= p["min_detections"]) & (rate >= p["rate_min"]) & (rate <= p["rate_max"]) & moved


def _greedy(members: Tensor, score: Tensor, n_det: int) -> Tensor:
    """Accept candidates greedily by ``score`` so that no detection is used twice (tensor rounds).

    A candidate is accepted in a round when it has the best rank among the live candidates sharing
    any of its detections; candidates touching an accepted detection die. This gives the same result
    as accepting candidates one by one in score order.
    """
    c = members.shape[0]
    dev = members.device
    rank = torch.empty(c, dtype=torch.long, device=dev)
    rank[torch.argsort(score, descending=True, stable=True)] = torch.arange(c, 0, -1, device=dev)
    valid = members >= 0
    idx = members.clamp(min=0)
    alive = torch.ones(c, dtype=torch.bool, device=dev)
    accepted = torch.zeros(c, dtype=torch.bool, device=dev)
    taken = torch.zeros(n_det, dtype=torch.bool, device=dev)
    while bool(alive.any()):
        r = torch.where(alive, rank, torch.zeros_like(rank))[:, None].expand_as(members)
        best = torch.zeros(n_det, dtype=torch.long, device=dev)
        best.scatter_reduce_(0, idx[valid], r[valid], "amax")
        win = alive & ((best[idx] == r) | ~valid).all(1)
        accepted |= win
        taken[idx[valid & win[:, None]]] = True
        alive &= ~win & ~(taken[idx] & valid).any(1)
    return accepted


def _link_pass(D: dict, active: Tensor, p: dict) -> Tensor:
    """One linking pass over the ``active`` detections; returns the accepted members ``(K, E)``."""
    empty = torch.zeros((0, D["n_exp"]), dtype=torch.long, device=D["xyz"].device)
    i, j = _seed_pairs(D, active, p)
    if i.numel() == 0:
        return empty
    members = _predict_from_pairs(D, active, i, j, p)
    members = torch.unique(members[(members >= 0).sum(1) >= p["min_detections"]], dim=0)
    members, fit = _reject_outliers(D, members, p)
    keep = fit["n"] >= p["min_detections"]
    members = _collect_along_fit(D, active, members[keep], {k: v[keep] for k, v in fit.items()}, p)
    members = torch.unique(members, dim=0)
    members, fit = _reject_outliers(D, members, p)
    ok = _valid_candidates(D, members, fit, p)
    members = members[ok]
    if members.shape[0] == 0:
        return empty
    members = torch.unique(members, dim=0)
    fit = _fit(D, members)
    sig = torch.where(members >= 0, D["sig"][members.clamp(min=0)], torch.ones_like(fit["res"]))
    z2 = torch.where(members >= 0, (fit["res"] / sig) ** 2, torch.zeros_like(sig)).sum(1)
    # More detections first, then a better fit; ties (pairs fit exactly) go to the slower motion
    # and the more consistent magnitudes.
    rate = torch.hypot(fit["vxi"], fit["veta"]) / ARCSEC
    mag = torch.where(members >= 0, D["mag"][members.clamp(min=0)], torch.full_like(sig, float("nan")))
    spread = torch.nan_to_num(mag.nanquantile(1.0, dim=1) - mag.nanquantile(0.0, dim=1))
    score = fit["n"].to(z2.dtype) * 1e6 - z2 / (2.0 * fit["n"] - 4.0).clamp(min=1.0) \
        - 1e-3 * rate / p["rate_max"] - 1e-3 * spread
    return members[_greedy(members, score, D["n"])]


def _empty_tracklets(n: int, stationary: Tensor, device, p: dict) -> Tracklets:
    f = torch.zeros(0, dtype=torch.float64, device=device)
    return Tracklets(labels=torch.full((n,), -1, dtype=torch.long, device=device), stationary=stationary,
                     n=torch.zeros(0, dtype=torch.long, device=device), rate=f, pa=f, rms=f, mag=f, mjd=f,
                     ra=f, dec=f, ra_rate=f, dec_rate=f, params=dict(p))


def _summarise(D: dict, members: Tensor, stationary: Tensor, p: dict) -> Tracklets:
    """Labels and per-tracklet quantities of the accepted ``members`` (ordered by mean time)."""
    dev = D["xyz"].device
    if members.shape[0] == 0:
        return _empty_tracklets(D["n"], stationary, dev, p)
    fit = _fit(D, members)
    order = torch.argsort(fit["tm"], stable=True)
    members, fit = members[order], {k: v[order] for k, v in fit.items()}
    valid = members >= 0
    labels = torch.full((D["n"],), -1, dtype=torch.long, device=dev)
    k = torch.arange(members.shape[0], device=dev)[:, None].expand_as(members)
    labels[members[valid]] = k[valid]
    n = fit["n"]
    rms = torch.sqrt(torch.where(valid, fit["res"] ** 2, torch.zeros_like(fit["res"])).sum(1) / n)
    mag = torch.where(valid, D["mag"][members.clamp(min=0)], torch.full_like(fit["res"], float("nan")))
    ra, dec = _xyz_to_radec(_from_tangent(fit["xi0"], fit["eta0"], fit["centre"]))
    ra_rate, dec_rate = fit["vxi"] / ARCSEC, fit["veta"] / ARCSEC
    t0 = D["t0"]
    return Tracklets(
        labels=labels, stationary=stationary, n=n, rate=torch.hypot(ra_rate, dec_rate),
        pa=torch.rad2deg(torch.atan2(ra_rate, dec_rate)) % 360.0, rms=rms, mag=torch.nanmean(mag, 1),
        mjd=t0 + fit["tm"] / 1440.0, ra=ra, dec=dec, ra_rate=ra_rate, dec_rate=dec_rate, params=dict(p),
    )


def shape_on_sky(wcs, x, y, a, b, theta) -> tuple[Tensor, Tensor, Tensor]:
    """Pixel shapes to the sky: SExtractor ``A/B_IMAGE`` (px) and ``THETA_IMAGE`` (deg, counter-
    clockwise from +x) at 0-based ``(x, y)`` -> ``a, b`` in arcsec and the major axis' position angle
    (deg, North through East, modulo 180), through ``wcs`` (a ``TanWCS`` or anything with
    ``pixel_to_world(x, y) -> (ra, dec)`` in degrees). Exact for any projection and distortion: the
    unit steps along both axes are mapped to the sky at each position."""
    x, y, a, b, t = (torch.as_tensor(v, dtype=torch.float64) for v in (x, y, a, b, theta))
    t = torch.deg2rad(t)
    c, s = torch.cos(t), torch.sin(t)
    u0 = radec_to_xyz(*wcs.pixel_to_world(x, y))
    ua = radec_to_xyz(*wcs.pixel_to_world(x + c, y + s))
    ub = radec_to_xyz(*wcs.pixel_to_world(x - s, y + c))
    xa, ea = tangent_plane(ua, u0)
    xb, eb = tangent_plane(ub, u0)
    pa = torch.rad2deg(torch.atan2(xa, ea)) % 180.0
    return a * torch.hypot(xa, ea) / ARCSEC, b * torch.hypot(xb, eb) / ARCSEC, pa


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------
DEFAULTS = dict(min_detections=3, rate_min=0.05, rate_max=60.0, tolerance_floor=2.0, n_sigma=4.0, mag_tol=1.0,
                trail_elongation=2.0, trail_angle_tol=20.0, trail_length_tol=0.5, trail_err_frac=0.1, stationary_matches=1,
                pixel_tol=0.3, max_gap=None, n_passes=2)


def link_tracklets(
    ra,
    dec,
    mjd,
    *,
    mag=None,
    pos_err=None,
    a=None,
    b=None,
    theta=None,
    exptime=None,
    x=None,
    y=None,
    exposure=None,
    min_detections: int = 3,
    rate_min: float = 0.05,
    rate_max: float = 60.0,
    tolerance_floor: float = 2.0,
    n_sigma: float = 4.0,
    mag_tol: float = 1.0,
    trail_elongation: float = 2.0,
    trail_angle_tol: float = 20.0,
    trail_length_tol: float = 0.5,
    trail_err_frac: float = 0.1,
    stationary_matches: int = 1,
    pixel_tol: float = 0.3,
    max_gap: Optional[float] = None,
    n_passes: int = 2,
) -> Tracklets:
    """Link detections from several exposures into tracklets of linear motion on the sky.

    Args:
        ra, dec: ``(N,)`` degrees (ICRS); mjd: ``(N,)`` MJD (UTC) of mid-exposure. NaN is an error.
        mag: ``(N,)`` magnitudes (NaN: unknown); members of a tracklet agree within ``mag_tol``.
        pos_err: ``(N,)`` or scalar, 1-sigma positional error per axis in arcsec.
        a, b, theta: shape: rms semi-axes in arcsec (SExtractor A/B_WORLD x 3600) and the major axis'
            position angle on the sky (deg, North through East; convert THETA_IMAGE with the frame's
            WCS first). Detections with ``a >= trail_elongation * b`` must lie along the motion
            within ``trail_angle_tol`` degrees.
        exptime: exposure time in s (scalar or ``(N,)``); with ``a, b`` the trail length
            ``sqrt(12 (a^2 - b^2))`` must be at least ``(1 - trail_length_tol) * rate * exptime - 3 b``
            (round artefacts cannot be fast movers). The positional error of a trail (elongated as
            above) of measured length ``L`` grows to ``sqrt(pos_err^2 + (trail_err_frac * L)^2)``.
        x, y: detector pixels (native, not resampled): a detection at the same pixel (within
            ``pixel_tol``) in ``stationary_matches`` other exposures is a detector artefact.
        exposure: ``(N,)`` int exposure ids; default: detections whose times differ by < 1 s.
        min_detections: detections per tracklet (>= 2); fewer exposures give an empty result.
        rate_min, rate_max: rate limits in arcsec/min.
        tolerance_floor: smallest matching tolerance in arcsec; ``n_sigma``: tolerance in sigmas.
        stationary_matches: a detection matched in this many other exposures is stationary.
        max_gap: longest time between the two detections of a seed pair (minutes; None: any).
        n_passes: linking passes (later passes link what earlier ones left).

    Returns:
        :class:`Tracklets`, ordered by mean time; each detection in at most one tracklet.
    """
    p = dict(min_detections=int(min_detections), rate_min=float(rate_min), rate_max=float(rate_max),
             tolerance_floor=float(tolerance_floor), n_sigma=float(n_sigma), mag_tol=float(mag_tol),
             trail_elongation=float(trail_elongation), trail_angle_tol=float(trail_angle_tol),
             trail_length_tol=float(trail_length_tol), trail_err_frac=float(trail_err_frac),
             stationary_matches=int(stationary_matches),
             pixel_tol=float(pixel_tol), max_gap=max_gap, n_passes=int(n_passes))
    _check_params(p)
    cols = dict(mag=mag, pos_err=pos_err, a=a, b=b, theta=theta, exptime=exptime, x=x, y=y, exposure=exposure)
    t0 = time.perf_counter()
    D = _prepare(ra, dec, mjd, cols, p)
    dev = D["xyz"].device
    if D["n"] == 0:
        return _empty_tracklets(0, torch.zeros(0, dtype=torch.bool, device=dev), dev, p)
    t1 = time.perf_counter()
    stationary = find_stationary(D, p)
    timings = {"prepare": t1 - t0, "stationary": time.perf_counter() - t1}
    if D["n_exp"] < p["min_detections"]:
        out = _empty_tracklets(D["n"], stationary, dev, p)
        out.timings = timings
        return out
    t2 = time.perf_counter()
    active = ~stationary
    found = []
    for _ in range(p["n_passes"]):
        members = _link_pass(D, active, p)
        if members.shape[0] == 0:
            break
        found.append(members)
        active[members[members >= 0]] = False
    members = torch.cat(found) if found else torch.zeros((0, D["n_exp"]), dtype=torch.long, device=dev)
    out = _summarise(D, members, stationary, p)
    timings["link"] = time.perf_counter() - t2
    out.timings = timings
    return out


def _check_params(p: dict) -> None:
    if p["min_detections"] < 2:
        raise ValueError(f"min_detections must be >= 2, got {p['min_detections']}")
    if not 0.0 <= p["rate_min"] < p["rate_max"]:
        raise ValueError(f"need 0 <= rate_min < rate_max (arcsec/min), got {p['rate_min']}, {p['rate_max']}")
    if p["tolerance_floor"] <= 0 or p["n_sigma"] <= 0:
        raise ValueError("tolerance_floor and n_sigma must be > 0")
    if p["stationary_matches"] < 1 or p["n_passes"] < 1:
        raise ValueError("stationary_matches and n_passes must be >= 1")


class TrackletLinker(nn.Module):
    """Module form of :func:`link_tracklets`: holds the linking parameters (Hydra-instantiable)."""

    def __init__(self, **params):
        super().__init__()
        unknown = set(params) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"TrackletLinker: unknown parameters {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        self.params = {**DEFAULTS, **params}
        _check_params({**self.params, "min_detections": int(self.params["min_detections"])})

    def forward(self, ra, dec, mjd, **columns) -> Tracklets:
        return link_tracklets(ra, dec, mjd, **columns, **self.params)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.items())
