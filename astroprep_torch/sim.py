"""Seeded star-field simulator: the data source for tests, benchmarks and the demo.

It makes frames with a known truth: star positions and fluxes, the noiseless sky, the variance,
the area touched by each defect, and each frame's exact WCS. Everything but the WCS projection of
the truth catalog runs in torch on the requested device.

Model of one frame (all in ADU)::

    image = Poisson(gain * (sky + stars + defects)) / gain + Normal(0, read_noise / gain)

then clipped at ``saturation`` (saturated pixels are flagged in ``mask``).

* Stars: magnitudes follow a power law ``dN/dm ~ 10**(alpha * m)`` between ``mag_range``; flux
  ``F = 10**(-0.4 * (m - zeropoint))``. PSFs are integrated over pixels: a Gaussian exactly (a
  product of error-function differences, separable), a Moffat by 5x5 sub-pixel sampling. Each
  PSF stamp is normalised to unit sum, so the truth ``flux`` is the total flux in the image.
* Sky: a level plus a linear gradient (``sky_gradient`` = fractional change across the frame in x
  and y) plus an optional smooth large-scale ripple (``sky_ripple``).
* Defects (what the quality scorer must catch), each with an amplitude in [0, 1]:
  ``"moonlight"`` (a strong exponential glow from one side), ``"clouds"`` (smooth patches that
  dim stars and add scattered light), ``"shutter"`` (a shadow band where the exposure is short),
  ``"defocus"`` (a broad, ring-like PSF over the whole frame), ``"trail"`` (a bright satellite
  streak). ``SimFrame.defect_mask`` marks the pixels a defect changes markedly: where it changes
  the sky level or the throughput by more than 10%, within 3 widths of a trail, and the whole frame
  when defocused.
* WCS: TAN with the GWAC plate scale (11.7"/px) by default, optionally with SIP distortion.
  Epoch pairs share the sky; the second frame's WCS is shifted by ``shift`` pixels and rotated by
  ``rotation`` degrees around the frame centre.

Pixel coordinates are 0-based (x = column, y = row). The FITS headers use FITS' 1-based CRPIX.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import numpy as np
import torch
from astropy.io import fits
from astropy.wcs import WCS
from torch import Tensor

__all__ = [
    "SimFrame",
    "SimPair",
    "GWAC_SHAPE",
    "DEFECTS",
    "make_header",
    "render_stars",
    "simulate_frame",
    "simulate_pair",
    "SimNight",
    "simulate_night",
    "simulate_detections",
    "simulate_dithers",
    "Camera",
    "RawFrame",
    "make_camera",
    "expose",
    "bleed_columns",
    "add_halos",
    "simulate_raw",
    "simulate_calibration_frames",
    "write_raw",
    "write_simulated_pair",
]

#: GWAC detector size as (H, W) = (rows, columns).
GWAC_SHAPE = (4136, 4096)
#: Defect names understood by ``simulate_frame(defects=...)``.
DEFECTS = ("moonlight", "clouds", "shutter", "defocus", "trail")

DefectSpec = Union[None, Sequence[str], Mapping[str, float], Sequence[tuple]]


@dataclass
class SimFrame:
    """One simulated frame and its truth.

    Attributes:
        image: noisy frame ``(1, 1, H, W)`` in ADU.
        background: true sky (including defect light) ``(1, 1, H, W)``.
        noiseless: ``background`` plus stars ``(1, 1, H, W)``, before clipping at saturation.
        variance: per-pixel noise variance in ADU^2 ``(1, 1, H, W)``.
        mask: bool ``(1, 1, H, W)``, True at saturated pixels.
        defect_mask: bool ``(1, 1, H, W)``, True where a defect changes the frame markedly.
        catalog: dict of 1-D tensors ``x, y`` (0-based pixels), ``flux`` (ADU), ``mag``,
            ``ra, dec`` (degrees), ``peak`` (ADU above sky), ``kind`` (0 star, 1 transient,
            2 moving object).
        header: FITS header with the frame's WCS, GAIN, SATURATE, RDNOISE, FWHM, EXPTIME.
        fwhm: PSF FWHM in pixels.
        gain: electrons per ADU.
    """

    image: Tensor
    background: Tensor
    noiseless: Tensor
    variance: Tensor
    mask: Tensor
    defect_mask: Tensor
    catalog: dict
    header: fits.Header
    fwhm: float
    gain: float
    defects: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.image.shape[-2:])  # type: ignore[return-value]

    @property
    def wcs(self):
        """The frame's exact WCS as a ``TanWCS`` (built from ``header`` on first use)."""
        cached = getattr(self, "_wcs", None)
        if cached is None:
            from .wcs import TanWCS

            cached = TanWCS.from_header(self.header).to(device=self.image.device)
            object.__setattr__(self, "_wcs", cached)
        return cached


@dataclass
class SimPair:
    """An epoch pair of the same field: ``reference`` and ``science`` frames.

    ``transients`` holds the truth of sources present only in the science frame (``x, y`` in science
    pixels, ``x_ref, y_ref`` in reference pixels, ``flux``, ``mag``); ``moving`` holds objects that
    move between epochs (``x_ref, y_ref`` in the reference frame, ``x, y`` in the science frame).
    """

    reference: SimFrame
    science: SimFrame
    transients: dict
    moving: dict


# --------------------------------------------------------------------------------------------
# WCS
# --------------------------------------------------------------------------------------------
def make_header(
    shape: tuple[int, int],
    *,
    ra: float = 150.0,
    dec: float = 30.0,
    pixel_scale: float = 11.7,
    rotation: float = 0.0,
    crpix_offset: tuple[float, float] = (0.0, 0.0),
    sip: Union[bool, float] = False,
) -> fits.Header:
    """A FITS header with a TAN (or TAN-SIP) WCS for a frame of ``shape = (H, W)``.

    ``pixel_scale`` in arcsec/px; ``rotation`` in degrees (position angle of the y axis, counter-
    clockwise); ``crpix_offset = (dx, dy)`` shifts the reference pixel, so a star at pixel ``(x, y)``
    of an unshifted frame lies at ``(x + dx, y + dy)``. ``sip`` adds a quadratic+cubic SIP
    distortion whose size at the frame corner is about ``sip`` pixels (``True`` means 2 px), with
    its AP/BP inverse fitted by astropy.
    """
    h, w = shape
    hdr = fits.Header()
    hdr["NAXIS"] = 2
    hdr["NAXIS1"] = w
    hdr["NAXIS2"] = h
    hdr["CTYPE1"] = "RA---TAN"
    hdr["CTYPE2"] = "DEC--TAN"
    hdr["CUNIT1"] = "deg"
    hdr["CUNIT2"] = "deg"
    # FITS is 1-based: the centre of a W-pixel axis is at (W + 1) / 2.
    hdr["CRPIX1"] = (w + 1) / 2.0 + crpix_offset[0]
    hdr["CRPIX2"] = (h + 1) / 2.0 + crpix_offset[1]
    hdr["CRVAL1"] = ra
    hdr["CRVAL2"] = dec
    s = pixel_scale / 3600.0
    t = math.radians(rotation)
    # East to the left (RA decreases with x), north up, then rotated.
    hdr["CD1_1"] = -s * math.cos(t)
    hdr["CD1_2"] = s * math.sin(t)
    hdr["CD2_1"] = s * math.sin(t)
    hdr["CD2_2"] = s * math.cos(t)
    hdr["RADESYS"] = "ICRS"
    hdr["EQUINOX"] = 2000.0
    if sip:
        size = 2.0 if sip is True else float(sip)
        r = 0.5 * math.hypot(h, w)
        hdr["CTYPE1"] = "RA---TAN-SIP"
        hdr["CTYPE2"] = "DEC--TAN-SIP"
        hdr["A_ORDER"] = 3
        hdr["B_ORDER"] = 3
        # Quadratic terms give ~size/2 px at the corner, cubic (radial) terms another ~size/2.
        q = 0.5 * size / r**2
        c = 0.5 * size / r**3
        hdr["A_2_0"] = q * 0.6
        hdr["A_1_1"] = -q * 0.3
        hdr["A_0_2"] = q * 0.2
        hdr["B_2_0"] = q * 0.25
        hdr["B_1_1"] = q * 0.4
        hdr["B_0_2"] = -q * 0.5
        hdr["A_3_0"] = c
        hdr["A_1_2"] = c
        hdr["B_2_1"] = c
        hdr["B_0_3"] = c
        _add_sip_inverse(hdr, shape)
    return hdr


def _add_sip_inverse(hdr: fits.Header, shape: tuple[int, int], order: int = 4) -> None:
    """Fit the AP/BP inverse polynomials of a SIP header by least squares on a pixel grid.

    SIP: with pixel offsets ``u = x - (CRPIX1 - 1)``, ``v = y - (CRPIX2 - 1)`` (0-based ``x, y``), the
    focal-plane offsets are ``U = u + A(u, v)``, ``V = v + B(u, v)``; the inverse maps back,
    ``u = U + AP(U, V)``, ``v = V + BP(U, V)``.
    """
    h, w = shape
    ys, xs = np.mgrid[0 : h : max(h // 40, 1), 0 : w : max(w // 40, 1)]
    u = xs.ravel().astype(float) - (hdr["CRPIX1"] - 1.0)
    v = ys.ravel().astype(float) - (hdr["CRPIX2"] - 1.0)

    def poly(prefix: str, n: int) -> np.ndarray:
        out = np.zeros_like(u)
        for i in range(n + 1):
            for j in range(n + 1 - i):
                out += float(hdr.get(f"{prefix}_{i}_{j}", 0.0)) * u**i * v**j
        return out

    fu = u + poly("A", int(hdr["A_ORDER"]))
    fv = v + poly("B", int(hdr["B_ORDER"]))
    terms = [(i, j) for i in range(order + 1) for j in range(order + 1 - i)]
    design = np.stack([fu**i * fv**j for i, j in terms], 1)
    ap = np.linalg.lstsq(design, u - fu, rcond=None)[0]
    bp = np.linalg.lstsq(design, v - fv, rcond=None)[0]
    hdr["AP_ORDER"] = order
    hdr["BP_ORDER"] = order
    for (i, j), a, b in zip(terms, ap, bp):
        hdr[f"AP_{i}_{j}"] = float(a)
        hdr[f"BP_{i}_{j}"] = float(b)


# --------------------------------------------------------------------------------------------
# PSF rendering
# --------------------------------------------------------------------------------------------
def _gaussian_profiles(center: Tensor, sigma: float, radius: int) -> tuple[Tensor, Tensor]:
    """Pixel-integrated 1-D Gaussian profiles around ``center`` (N,) -> (start (N,), prof (N, 2r+1))."""
    start = torch.round(center).long() - radius
    offs = torch.arange(2 * radius + 1, device=center.device, dtype=center.dtype)
    pix = start.to(center.dtype)[:, None] + offs[None, :]
    scale = 1.0 / (math.sqrt(2.0) * sigma)
    lo = (pix - 0.5 - center[:, None]) * scale
    hi = (pix + 0.5 - center[:, None]) * scale
    prof = 0.5 * (torch.erf(hi) - torch.erf(lo))
    return start, prof


def _moffat_stamps(x: Tensor, y: Tensor, fwhm: float, beta: float, radius: int, sub: int = 5):
    """Moffat stamps (N, s, s) integrated by ``sub`` x ``sub`` sampling, normalised to unit sum."""
    alpha = fwhm / (2.0 * math.sqrt(2.0 ** (1.0 / beta) - 1.0))
    s = 2 * radius + 1
    x0 = torch.round(x).long() - radius
    y0 = torch.round(y).long() - radius
    o = (torch.arange(sub, device=x.device, dtype=x.dtype) + 0.5) / sub - 0.5
    grid = torch.arange(s, device=x.device, dtype=x.dtype)
    fine = (grid[:, None] + o[None, :]).reshape(-1)  # (s*sub,)
    dx = x0.to(x.dtype)[:, None] + fine[None, :] - x[:, None]  # (N, s*sub)
    dy = y0.to(x.dtype)[:, None] + fine[None, :] - y[:, None]
    r2 = dy[:, :, None] ** 2 + dx[:, None, :] ** 2
    prof = (1.0 + r2 / alpha**2) ** (-beta)
    prof = prof.reshape(-1, s, sub, s, sub).sum(dim=(2, 4))
    prof = prof / prof.sum(dim=(1, 2), keepdim=True)
    return x0, y0, prof


def render_stars(
    shape: tuple[int, int],
    x: Tensor,
    y: Tensor,
    flux: Tensor,
    *,
    fwhm: float = 2.5,
    psf: str = "gaussian",
    beta: float = 2.5,
    out: Optional[Tensor] = None,
    chunk: int = 8192,
) -> Tensor:
    """Add pixel-integrated PSFs of total ``flux`` at 0-based ``(x, y)`` to an ``(H, W)`` image.

    ``psf`` is ``"gaussian"`` (exact pixel integral) or ``"moffat"`` (``beta``; 5x5 sub-pixel
    sampling) or ``"donut"`` (a defocused annulus: a Gaussian ring of radius ``fwhm``). Stamps are
    truncated at the frame edge; their flux outside the frame is lost, as on a detector.
    """
    h, w = shape
    if out is None:
        out = torch.zeros(h * w, device=x.device, dtype=flux.dtype)
    else:
        out = out.reshape(-1)
    if x.numel() == 0:
        return out.reshape(h, w)
    sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    for i in range(0, x.numel(), chunk):
        xs, ys, fs = x[i : i + chunk], y[i : i + chunk], flux[i : i + chunk]
        if psf == "gaussian":
            radius = int(math.ceil(5.0 * sigma))
            x0, px = _gaussian_profiles(xs, sigma, radius)
            y0, py = _gaussian_profiles(ys, sigma, radius)
            stamps = py[:, :, None] * px[:, None, :]
            stamps = stamps / stamps.sum(dim=(1, 2), keepdim=True)
        elif psf == "moffat":
            radius = int(math.ceil(3.0 * fwhm + 4))
            x0, y0, stamps = _moffat_stamps(xs, ys, fwhm, beta, radius)
        elif psf == "donut":
            radius = int(math.ceil(2.0 * fwhm + 4))
            x0, y0, stamps = _donut_stamps(xs, ys, fwhm, radius)
        else:
            raise ValueError(f"psf must be 'gaussian', 'moffat' or 'donut', got {psf!r}")
        s = stamps.shape[-1]
        offs = torch.arange(s, device=x.device)
        cols = x0[:, None] + offs[None, :]  # (N, s)
        rows = y0[:, None] + offs[None, :]
        valid = ((rows >= 0) & (rows < h))[:, :, None] & ((cols >= 0) & (cols < w))[:, None, :]
        idx = rows[:, :, None] * w + cols[:, None, :]
        vals = stamps * fs[:, None, None].to(stamps.dtype)
        out.index_put_((idx[valid],), vals[valid].to(out.dtype), accumulate=True)
    return out.reshape(h, w)


def _donut_stamps(x: Tensor, y: Tensor, radius_px: float, radius: int, sub: int = 3):
    s = 2 * radius + 1
    x0 = torch.round(x).long() - radius
    y0 = torch.round(y).long() - radius
    o = (torch.arange(sub, device=x.device, dtype=x.dtype) + 0.5) / sub - 0.5
    grid = torch.arange(s, device=x.device, dtype=x.dtype)
    fine = (grid[:, None] + o[None, :]).reshape(-1)
    dx = x0.to(x.dtype)[:, None] + fine[None, :] - x[:, None]
    dy = y0.to(x.dtype)[:, None] + fine[None, :] - y[:, None]
    r = torch.sqrt(dy[:, :, None] ** 2 + dx[:, None, :] ** 2)
    prof = torch.exp(-0.5 * ((r - radius_px) / (0.35 * radius_px)) ** 2)
    prof = prof.reshape(-1, s, sub, s, sub).sum(dim=(2, 4))
    return x0, y0, prof / prof.sum(dim=(1, 2), keepdim=True)


# --------------------------------------------------------------------------------------------
# Sky and defects
# --------------------------------------------------------------------------------------------
def _coords(shape, device, dtype):
    h, w = shape
    yy = torch.linspace(-1.0, 1.0, h, device=device, dtype=dtype)[:, None]
    xx = torch.linspace(-1.0, 1.0, w, device=device, dtype=dtype)[None, :]
    return yy, xx


def _sky(shape, sky, gradient, ripple, gen, device, dtype) -> Tensor:
    yy, xx = _coords(shape, device, dtype)
    gx, gy = gradient
    bg = sky * (1.0 + 0.5 * gx * xx + 0.5 * gy * yy)
    if ripple:
        ph = torch.rand(2, generator=gen).tolist()
        bg = bg + sky * ripple * torch.sin(2 * math.pi * (0.6 * xx + ph[0])) * torch.cos(2 * math.pi * (0.4 * yy + ph[1]))
    return bg.expand(shape).clone()


def _smooth_field(shape, n_blobs, scale, gen, device, dtype) -> Tensor:
    """Sum of random Gaussian blobs of size ``scale`` (fraction of the frame), values in ~[0, 1]."""
    yy, xx = _coords(shape, device, dtype)
    field_ = torch.zeros(shape, device=device, dtype=dtype)
    params = torch.rand(n_blobs, 4, generator=gen, dtype=torch.float64)
    for cx, cy, s, a in params.tolist():
        cx, cy = 2 * cx - 1, 2 * cy - 1
        sig = scale * (0.5 + s)
        field_ += (0.5 + 0.5 * a) * torch.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * sig**2))
    return field_.clamp(max=1.0)


def _parse_defects(defects: DefectSpec) -> dict[str, float]:
    if defects is None:
        return {}
    if isinstance(defects, Mapping):
        items = dict(defects)
    else:
        items = {}
        for d in defects:
            if isinstance(d, str):
                items[d] = 0.5
            else:
                name, amp = d
                items[name] = float(amp)
    for name, amp in items.items():
        if name not in DEFECTS:
            raise ValueError(f"defects: unknown defect {name!r}; choose from {DEFECTS}")
        if not 0.0 <= float(amp) <= 1.0:
            raise ValueError(f"defects: amplitude of {name!r} must lie in [0, 1], got {amp}")
    return {k: float(v) for k, v in items.items()}


# --------------------------------------------------------------------------------------------
# Frames
# --------------------------------------------------------------------------------------------
def _draw_catalog(n_stars, shape, mag_range, alpha, zeropoint, gen, margin=-8.0):
    h, w = shape
    u = torch.rand(n_stars, generator=gen, dtype=torch.float64)
    m0, m1 = mag_range
    # Inverse CDF of dN/dm ~ 10**(alpha m) on [m0, m1].
    a0, a1 = 10 ** (alpha * m0), 10 ** (alpha * m1)
    mag = torch.log10(a0 + u * (a1 - a0)) / alpha
    x = torch.rand(n_stars, generator=gen, dtype=torch.float64) * (w - 1 - 2 * margin) + margin
    y = torch.rand(n_stars, generator=gen, dtype=torch.float64) * (h - 1 - 2 * margin) + margin
    flux = 10 ** (-0.4 * (mag - zeropoint))
    return x, y, mag, flux


def _sky_defects(defects: dict, shape, sky: float, bg: Tensor, defect_mask: Tensor, gen: torch.Generator,
                 device, work) -> tuple[Tensor, Tensor, Tensor]:
    """Moonlight (a glow from one side), clouds (smooth extinction plus scattered light) and a
    shutter shadow, in that order (each draws from ``gen``). Returns ``(background with their light,
    the stars' multiplicative throughput, defect_mask where the frame changes markedly)``."""
    star_gain = torch.ones(shape, dtype=work, device=device)
    yy, xx = _coords(shape, device, work)
    if "moonlight" in defects:
        amp = defects["moonlight"]
        side = torch.randint(0, 4, (1,), generator=gen).item()
        t = [xx, -xx, yy, -yy][side].expand(shape)
        glow = sky * (0.5 + 4.5 * amp) * torch.exp(2.5 * (t - 1.0))
        bg = bg + glow
        defect_mask |= glow > 0.1 * sky
    if "clouds" in defects:
        amp = defects["clouds"]
        cloud = _smooth_field(shape, 4, 0.18, gen, device, work)
        ext = 1.0 - (0.3 + 0.65 * amp) * cloud
        star_gain = star_gain * ext
        bg = bg + sky * (0.3 + 1.5 * amp) * cloud
        defect_mask |= (cloud * (0.3 + 1.5 * amp) > 0.1) | (cloud * (0.3 + 0.65 * amp) > 0.1)
    if "shutter" in defects:
        amp = defects["shutter"]
        side = torch.randint(0, 4, (1,), generator=gen).item()
        t = [xx, -xx, yy, -yy][side].expand(shape)
        edge = 1.0 - 2.0 * (0.25 + 0.3 * amp)  # shadow covers 25-55% of the frame
        shade = torch.sigmoid((t - edge) * 40.0)
        throughput = 1.0 - (0.5 + 0.45 * amp) * shade
        star_gain = star_gain * throughput
        bg = bg * throughput
        defect_mask |= (1.0 - throughput) > 0.1
    return bg, star_gain, defect_mask


def _satellite_trail(amp: float, shape, sky: float, gen: torch.Generator, device, work) -> tuple[Tensor, Tensor]:
    """A straight satellite trail through the frame's middle 60%: ``(light, mask)``."""
    h, w = shape
    p = torch.rand(3, generator=gen, dtype=torch.float64).tolist()
    ang = math.pi * p[0]
    cx, cy = (p[1] * 0.6 + 0.2) * (w - 1), (p[2] * 0.6 + 0.2) * (h - 1)
    X = torch.arange(w, device=device, dtype=work)[None, :]
    Y = torch.arange(h, device=device, dtype=work)[:, None]
    d = (X - cx) * math.sin(ang) - (Y - cy) * math.cos(ang)
    width = 1.0 + 2.0 * amp
    trail = sky * (0.3 + 3.0 * amp) * torch.exp(-0.5 * (d / width) ** 2)
    return trail, d.abs() < 3 * width + 2


def _observe(noiseless: Tensor, gain: float, read_noise: float, saturation: Optional[float], gen: torch.Generator,
             device, work) -> tuple[Tensor, Tensor, Tensor]:
    """Noise (Poisson in electrons plus Gaussian read noise in electrons, back to ADU) and
    saturation: ``(image, variance, saturated mask)``."""
    shape = noiseless.shape
    electrons = torch.poisson((noiseless * gain).clamp(min=0).to(torch.float32), generator=_device_gen(gen, device))
    noise = torch.randn(shape, generator=_device_gen(gen, device), device=device, dtype=torch.float32) * read_noise
    image = (electrons.to(work) + noise.to(work)) / gain
    variance = noiseless.clamp(min=0) / gain + (read_noise / gain) ** 2
    mask = torch.zeros(shape, dtype=torch.bool, device=device)
    if saturation is not None:
        mask = image >= saturation
        image = image.clamp(max=saturation)
    return image, variance, mask


def _frame_header(header: fits.Header, gain: float, read_noise: float, saturation: Optional[float], fwhm: float,
                  sky: float) -> fits.Header:
    """A copy of ``header`` with the frame's GAIN, RDNOISE, SATURATE, FWHM, SKYLEVEL and EXPTIME."""
    header = header.copy()
    header["GAIN"] = (gain, "e-/ADU")
    header["RDNOISE"] = (read_noise, "read noise, e-")
    header["SATURATE"] = (float(saturation) if saturation is not None else 0.0, "ADU")
    header["FWHM"] = (fwhm, "PSF FWHM, pixels")
    header["SKYLEVEL"] = (sky, "mean sky, ADU")
    header["EXPTIME"] = 18.0
    return header


def _make_frame(
    shape,
    header: fits.Header,
    x: Tensor,
    y: Tensor,
    flux: Tensor,
    mag: Tensor,
    kind: Tensor,
    ra: Tensor,
    dec: Tensor,
    *,
    fwhm: float,
    psf: str,
    beta: float,
    sky: float,
    sky_gradient,
    sky_ripple: float,
    gain: float,
    read_noise: float,
    saturation: Optional[float],
    defects: dict,
    gen: torch.Generator,
    device,
    dtype,
    extra: Optional[Tensor] = None,
) -> SimFrame:
    """Render one frame; ``extra`` (H, W), if given, is source light (e.g. trails) added before noise."""
    h, w = shape
    work = torch.float32 if dtype == torch.float32 else torch.float64
    bg = _sky(shape, sky, sky_gradient, sky_ripple, gen, "cpu", work).to(device)
    defect_mask = torch.zeros(shape, dtype=torch.bool, device=device)
    fl = flux.to(device=device, dtype=work)
    xs, ys = x.to(device=device, dtype=work), y.to(device=device, dtype=work)
    psf_kind, psf_fwhm = psf, fwhm
    if "defocus" in defects:
        psf_kind, psf_fwhm = "donut", fwhm * (1.5 + 4.0 * defects["defocus"])
        defect_mask[:] = True
    bg, star_gain, defect_mask = _sky_defects(defects, shape, sky, bg, defect_mask, gen, device, work)
    img = render_stars(shape, xs, ys, fl, fwhm=psf_fwhm, psf=psf_kind, beta=beta)
    if extra is not None:
        img = img + extra.to(device=device, dtype=img.dtype)
    stars = img * star_gain
    if "trail" in defects:
        trail, trail_mask = _satellite_trail(defects["trail"], shape, sky, gen, device, work)
        stars = stars + trail
        defect_mask |= trail_mask
    noiseless = bg + stars
    image, variance, mask = _observe(noiseless, gain, read_noise, saturation, gen, device, work)
    sigma = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    peak = fl * star_gain[ys.round().long().clamp(0, h - 1), xs.round().long().clamp(0, w - 1)] / (2 * math.pi * sigma**2)
    catalog = {
        "x": xs.to(dtype), "y": ys.to(dtype), "flux": fl.to(dtype), "mag": mag.to(device=device, dtype=dtype),
        "ra": ra.to(device=device, dtype=torch.float64), "dec": dec.to(device=device, dtype=torch.float64),
        "peak": peak.to(dtype), "kind": kind.to(device),
    }

    def b(t):
        return t.reshape(1, 1, h, w).to(dtype)

    return SimFrame(
        image=b(image), background=b(bg), noiseless=b(noiseless), variance=b(variance),
        mask=mask.reshape(1, 1, h, w), defect_mask=defect_mask.reshape(1, 1, h, w),
        catalog=catalog, header=_frame_header(header, gain, read_noise, saturation, fwhm, sky), fwhm=fwhm, gain=gain,
        defects=dict(defects),
    )


def _device_gen(gen: torch.Generator, device) -> torch.Generator:
    device = torch.device(device)
    if device.type == "cpu":
        return gen
    g = torch.Generator(device=device)
    g.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen).item()))
    return g


def _check_shape(shape) -> tuple[int, int]:
    try:
        h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be a pair (H, W) of ints, got {shape!r}") from None
    if h < 8 or w < 8:
        raise ValueError(f"shape must be at least (8, 8), got {shape!r}")
    return h, w


def _sky_positions(header: fits.Header, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    ra, dec = WCS(header).all_pix2world(x.numpy(), y.numpy(), 0)
    return torch.from_numpy(np.asarray(ra, dtype=np.float64)), torch.from_numpy(np.asarray(dec, dtype=np.float64))


def _pixel_positions(header: fits.Header, ra: Tensor, dec: Tensor) -> tuple[Tensor, Tensor]:
    x, y = WCS(header).all_world2pix(ra.numpy(), dec.numpy(), 0, tolerance=1e-10, maxiter=50)
    return torch.from_numpy(np.asarray(x, dtype=np.float64)), torch.from_numpy(np.asarray(y, dtype=np.float64))


def simulate_frame(
    shape: tuple[int, int] = GWAC_SHAPE,
    *,
    n_stars: int = 20000,
    fwhm: float = 2.5,
    psf: str = "gaussian",
    beta: float = 2.5,
    mag_range: tuple[float, float] = (8.0, 17.5),
    alpha: float = 0.35,
    zeropoint: float = 25.0,
    sky: float = 1000.0,
    sky_gradient: tuple[float, float] = (0.1, -0.05),
    sky_ripple: float = 0.0,
    gain: float = 1.5,
    read_noise: float = 10.0,
    saturation: Optional[float] = 60000.0,
    defects: DefectSpec = None,
    ra: float = 150.0,
    dec: float = 30.0,
    pixel_scale: float = 11.7,
    rotation: float = 0.0,
    sip: Union[bool, float] = False,
    seed: int = 0,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> SimFrame:
    """Simulate one GWAC-like frame with ``n_stars`` stars (see the module docstring for the model).

    Args:
        shape: ``(H, W)`` in pixels (GWAC: 4136 x 4096).
        n_stars: number of stars drawn from the magnitude power law.
        fwhm: PSF FWHM in pixels.
        psf: ``"gaussian"`` or ``"moffat"`` (with ``beta``).
        mag_range, alpha, zeropoint: magnitude range, power-law slope and zero point (flux 1 ADU).
        sky: mean sky level in ADU; ``sky_gradient``: fractional change across the frame (x, y);
            ``sky_ripple``: amplitude of a smooth large-scale variation, as a fraction of ``sky``.
        gain: electrons per ADU; ``read_noise`` in electrons; ``saturation`` in ADU (None: none).
        defects: names, ``{name: amplitude}`` or ``[(name, amplitude)]`` with amplitudes in [0, 1].
        ra, dec, pixel_scale, rotation, sip: the WCS (see :func:`make_header`).
        seed: seeds every random draw (same seed, same frame).
        device, dtype: where and in which float type the frame is made.
    """
    shape = _check_shape(shape)
    gen = torch.Generator().manual_seed(int(seed))
    header = make_header(shape, ra=ra, dec=dec, pixel_scale=pixel_scale, rotation=rotation, sip=sip)
    x, y, mag, flux = _draw_catalog(int(n_stars), shape, mag_range, alpha, zeropoint, gen)
    ra_t, dec_t = _sky_positions(header, x, y)
    kind = torch.zeros(x.numel(), dtype=torch.int8)
    return _make_frame(
        shape, header, x, y, flux, mag, kind, ra_t, dec_t, fwhm=fwhm, psf=psf, beta=beta, sky=sky,
        sky_gradient=sky_gradient, sky_ripple=sky_ripple, gain=gain, read_noise=read_noise,
        saturation=saturation, defects=_parse_defects(defects), gen=gen,
        device=torch.device(device) if device is not None else torch.device("cpu"), dtype=dtype,
    )


def simulate_pair(
    shape: tuple[int, int] = GWAC_SHAPE,
    *,
    n_stars: int = 20000,
    fwhm: tuple[float, float] = (2.5, 3.0),
    psf: str = "gaussian",
    beta: float = 2.5,
    mag_range: tuple[float, float] = (8.0, 17.5),
    alpha: float = 0.35,
    zeropoint: float = 25.0,
    sky: tuple[float, float] = (1000.0, 1200.0),
    sky_gradient: tuple[tuple[float, float], tuple[float, float]] = ((0.1, -0.05), (-0.05, 0.1)),
    gain: float = 1.5,
    read_noise: float = 10.0,
    saturation: Optional[float] = 60000.0,
    shift: tuple[float, float] = (3.3, -2.7),
    rotation: float = 0.0,
    n_transients: int = 20,
    transient_mag_range: tuple[float, float] = (11.0, 14.5),
    n_moving: int = 5,
    moving_speed: tuple[float, float] = (5.0, 30.0),
    defects: tuple[DefectSpec, DefectSpec] = (None, None),
    sip: Union[bool, float] = False,
    ra: float = 150.0,
    dec: float = 30.0,
    pixel_scale: float = 11.7,
    seed: int = 0,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> SimPair:
    """Simulate a reference and a science epoch of the same field.

    The science frame's WCS has its reference pixel moved by ``shift = (dx, dy)`` pixels and is
    rotated by ``rotation`` degrees, so a star at reference pixel ``p`` lies near ``R p + shift`` in
    the science frame. ``fwhm``, ``sky`` and ``sky_gradient`` are per epoch ``(reference, science)``.
    ``n_transients`` point sources appear only in the science frame, at random positions inside the
    frame (away from the edges) with magnitudes in ``transient_mag_range``; ``n_moving`` objects move
    by ``moving_speed`` pixels between the epochs (present in both).
    """
    shape = _check_shape(shape)
    h, w = shape
    gen = torch.Generator().manual_seed(int(seed))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    hdr_ref = make_header(shape, ra=ra, dec=dec, pixel_scale=pixel_scale, sip=sip)
    hdr_sci = make_header(shape, ra=ra, dec=dec, pixel_scale=pixel_scale, rotation=rotation,
                          crpix_offset=tuple(shift), sip=sip)
    # Stars cover a slightly larger area so that both frames are filled after the offset.
    margin = -(abs(shift[0]) + abs(shift[1]) + 8.0 + 0.5 * abs(math.radians(rotation)) * max(h, w))
    x, y, mag, flux = _draw_catalog(int(n_stars), shape, mag_range, alpha, zeropoint, gen, margin=margin)
    ra_s, dec_s = _sky_positions(hdr_ref, x, y)
    kind = torch.zeros(x.numel(), dtype=torch.int8)

    # Transients: only in the science frame.
    nt = int(n_transients)
    edge = 24.0
    tx = torch.rand(nt, generator=gen, dtype=torch.float64) * (w - 1 - 2 * edge) + edge
    ty = torch.rand(nt, generator=gen, dtype=torch.float64) * (h - 1 - 2 * edge) + edge
    tm = transient_mag_range[0] + torch.rand(nt, generator=gen, dtype=torch.float64) * (transient_mag_range[1] - transient_mag_range[0])
    tf = 10 ** (-0.4 * (tm - zeropoint))
    t_ra, t_dec = _sky_positions(hdr_sci, tx, ty)
    tx_ref, ty_ref = _pixel_positions(hdr_ref, t_ra, t_dec)

    # Moving objects: reference position, then a displacement in pixels.
    nm = int(n_moving)
    mx = torch.rand(nm, generator=gen, dtype=torch.float64) * (w - 1 - 2 * 60) + 60
    my = torch.rand(nm, generator=gen, dtype=torch.float64) * (h - 1 - 2 * 60) + 60
    speed = moving_speed[0] + torch.rand(nm, generator=gen, dtype=torch.float64) * (moving_speed[1] - moving_speed[0])
    ang = torch.rand(nm, generator=gen, dtype=torch.float64) * 2 * math.pi
    mmag = transient_mag_range[0] + torch.rand(nm, generator=gen, dtype=torch.float64) * (transient_mag_range[1] - transient_mag_range[0])
    mflux = 10 ** (-0.4 * (mmag - zeropoint))
    m_ra0, m_dec0 = _sky_positions(hdr_ref, mx, my)
    mx1_ref, my1_ref = mx + speed * torch.cos(ang), my + speed * torch.sin(ang)
    m_ra1, m_dec1 = _sky_positions(hdr_ref, mx1_ref, my1_ref)
    mx_sci, my_sci = _pixel_positions(hdr_sci, m_ra1, m_dec1)

    xs_sci, ys_sci = _pixel_positions(hdr_sci, ra_s, dec_s)
    common = dict(psf=psf, beta=beta, gain=gain, read_noise=read_noise, saturation=saturation, gen=gen, device=dev, dtype=dtype, sky_ripple=0.0)
    ref = _make_frame(
        shape, hdr_ref,
        torch.cat([x, mx]), torch.cat([y, my]), torch.cat([flux, mflux]), torch.cat([mag, mmag]),
        torch.cat([kind, torch.full((nm,), 2, dtype=torch.int8)]),
        torch.cat([ra_s, m_ra0]), torch.cat([dec_s, m_dec0]),
        fwhm=fwhm[0], sky=sky[0], sky_gradient=sky_gradient[0], defects=_parse_defects(defects[0]), **common,
    )
    sci = _make_frame(
        shape, hdr_sci,
        torch.cat([xs_sci, tx, mx_sci]), torch.cat([ys_sci, ty, my_sci]),
        torch.cat([flux, tf, mflux]), torch.cat([mag, tm, mmag]),
        torch.cat([kind, torch.ones(nt, dtype=torch.int8), torch.full((nm,), 2, dtype=torch.int8)]),
        torch.cat([ra_s, t_ra, m_ra1]), torch.cat([dec_s, t_dec, m_dec1]),
        fwhm=fwhm[1], sky=sky[1], sky_gradient=sky_gradient[1], defects=_parse_defects(defects[1]), **common,
    )
    f = dict(device=dev, dtype=torch.float64)
    transients = {"x": tx.to(**f), "y": ty.to(**f), "x_ref": tx_ref.to(**f), "y_ref": ty_ref.to(**f),
                  "flux": tf.to(**f), "mag": tm.to(**f), "ra": t_ra.to(**f), "dec": t_dec.to(**f)}
    moving = {"x_ref": mx.to(**f), "y_ref": my.to(**f), "x": mx_sci.to(**f), "y": my_sci.to(**f),
              "flux": mflux.to(**f), "mag": mmag.to(**f)}
    return SimPair(reference=ref, science=sci, transients=transients, moving=moving)


# --------------------------------------------------------------------------------------------
# A night of one field: moving objects
# --------------------------------------------------------------------------------------------
@dataclass
class SimNight:
    """A simulated night of one field (:func:`simulate_night`) and its truth.

    Attributes:
        frames: the ``SimFrame`` of each exposure in time order. Each header has ``DATE-OBS`` (UTC
            start, ISO with time), ``MJD-OBS`` (start), ``EXPTIME`` (s), ``TIMESYS = 'UTC'`` and the
            frame's exact WCS; each frame catalog lists stars (kind 0), transients (1) and movers (2).
            Empty when the night was made with ``render=False``.
        headers: each exposure's FITS header (the frames' headers when rendered); ``shape``: (H, W).
        mjd: ``(F,)`` float64, mid-exposure MJD (UTC) of each frame.
        movers: per object ``(M,)``: ``rate`` (arcsec/min), ``pa`` (deg, N through E, at the night's
            reference time ``mjd_ref``), ``mag``, ``flux`` (ADU); per object and frame ``(M, F)``:
            ``ra, dec`` (deg), ``x, y`` (0-based pixels of that frame), ``mjd`` (mid-exposure),
            ``trail`` (trail length, px), ``snr`` (expected S/N of the trailed source),
            ``in_frame`` (bool).
        stars: ``ra, dec, mag, flux`` ``(S,)`` and ``x, y`` ``(S, F)``.
        transients: ``ra, dec, mag, flux`` ``(T,)``; ``present, x, y`` ``(T, F)``.
        cosmics: ``frame, x, y`` per affected pixel; ``hot_pixels``: ``x, y`` (same in all frames).
        pixel_scale: arcsec/px; ``exptime``: s; ``mjd_ref``: the time at which ``pa`` is defined.
    """

    frames: list
    headers: list
    shape: tuple
    mjd: Tensor
    movers: dict
    stars: dict
    transients: dict
    cosmics: dict
    hot_pixels: dict
    pixel_scale: float
    exptime: float
    mjd_ref: float


def _offset_along(ra: Tensor, dec: Tensor, pa_deg: Tensor, dist_arcsec: Tensor) -> tuple[Tensor, Tensor]:
    """Move ``(ra, dec)`` along the great circle leaving at ``pa_deg`` by ``dist_arcsec`` (may be < 0)."""
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    d = dist_arcsec.numpy()
    pa = pa_deg.numpy() + np.where(d < 0, 180.0, 0.0)
    c = SkyCoord(ra.numpy() * u.deg, dec.numpy() * u.deg).directional_offset_by(pa * u.deg, np.abs(d) * u.arcsec)
    return (torch.from_numpy(np.asarray(c.ra.deg, dtype=np.float64)),
            torch.from_numpy(np.asarray(c.dec.deg, dtype=np.float64)))


def _trail_image(shape, x0: Tensor, y0: Tensor, x1: Tensor, y1: Tensor, flux: Tensor, fwhm: float,
                 step: float = 0.25) -> Tensor:
    """PSFs integrated along the segments ``(x0, y0) -> (x1, y1)``: ``ceil(length / step)`` samples each."""
    length = torch.hypot(x1 - x0, y1 - y0)
    k = torch.clamp(torch.ceil(length / step), min=1).long()
    obj = torch.repeat_interleave(torch.arange(k.numel()), k)
    start = torch.cumsum(k, 0) - k
    j = torch.arange(int(k.sum())) - start[obj]
    f = (j.to(x0.dtype) + 0.5) / k[obj].to(x0.dtype)
    xs = x0[obj] + f * (x1 - x0)[obj]
    ys = y0[obj] + f * (y1 - y0)[obj]
    return render_stars(shape, xs, ys, flux[obj] / k[obj].to(flux.dtype), fwhm=fwhm)


def _trail_snr(flux: Tensor, trail_px: Tensor, fwhm: float, sky: float, gain: float, read_noise: float) -> Tensor:
    """S/N of a trailed Gaussian source with an optimal filter.

    Noise-equivalent area ``2 sqrt(pi) s (2 sqrt(pi) s + L)`` (``s`` = PSF sigma, ``L`` = trail
    length): ``4 pi s^2`` for a point source, ``L`` times the 1-D area across a long trail.
    """
    s = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    nea = 2.0 * math.sqrt(math.pi) * s * (2.0 * math.sqrt(math.pi) * s + trail_px)
    var = sky / gain + (read_noise / gain) ** 2
    return flux / torch.sqrt(flux / gain + nea * var)


def _point_limit_mag(snr: float, fwhm: float, sky: float, gain: float, read_noise: float, zeropoint: float) -> float:
    """Magnitude at which an untrailed source has S/N = ``snr`` (solves the quadratic in flux)."""
    s = fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    b = 4.0 * math.pi * s * s * (sky / gain + (read_noise / gain) ** 2)
    flux = 0.5 * (snr * snr / gain + math.sqrt((snr * snr / gain) ** 2 + 4.0 * snr * snr * b))
    return zeropoint - 2.5 * math.log10(flux)


def _night_times(n_frames, cadence, exptime, mjd_start, gen) -> Tensor:
    """Start MJDs: gaps uniform in ``cadence`` (minutes) between successive starts."""
    lo, hi = cadence
    gaps = lo + torch.rand(max(n_frames - 1, 0), generator=gen, dtype=torch.float64) * (hi - lo)
    return mjd_start + torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(gaps, 0)]) / 1440.0


def _draw_movers(n, shape, header, rate_range, mag_range, half_span_min, pixel_scale, gen) -> dict:
    """Movers at the reference time: log-uniform rates, uniform PA and magnitude, kept in the field."""
    h, w = shape
    lr = torch.log(torch.tensor(rate_range, dtype=torch.float64))
    rate = torch.exp(lr[0] + torch.rand(n, generator=gen, dtype=torch.float64) * (lr[1] - lr[0]))
    pa = torch.rand(n, generator=gen, dtype=torch.float64) * 360.0
    mag = mag_range[0] + torch.rand(n, generator=gen, dtype=torch.float64) * (mag_range[1] - mag_range[0])
    margin = (rate * half_span_min / pixel_scale + 30.0).clamp(max=0.45 * min(h, w))
    x = margin + torch.rand(n, generator=gen, dtype=torch.float64) * (w - 1 - 2 * margin)
    y = margin + torch.rand(n, generator=gen, dtype=torch.float64) * (h - 1 - 2 * margin)
    ra, dec = _sky_positions(header, x, y)
    return {"rate": rate, "pa": pa, "mag": mag, "ra0": ra, "dec0": dec}


def _time_header(header: fits.Header, mjd_start: float, exptime: float) -> None:
    from astropy.time import Time

    header["DATE-OBS"] = (Time(mjd_start, format="mjd", scale="utc").isot, "UTC start of exposure")
    header["MJD-OBS"] = (mjd_start, "MJD (UTC) start of exposure")
    header["TIMESYS"] = "UTC"
    header["EXPTIME"] = (exptime, "s")


def _cosmics_and_hot(shape, n_cosmics, hot, gen, sky_noise):
    """Cosmic-ray hits (short random-walk tracks of 1-4 pixels) for one frame: ``x, y, value``."""
    h, w = shape
    n = int(n_cosmics)
    length = torch.randint(1, 5, (n,), generator=gen)
    x0 = torch.randint(0, w, (n,), generator=gen)
    y0 = torch.randint(0, h, (n,), generator=gen)
    hit = torch.repeat_interleave(torch.arange(n), length)
    step = torch.randint(-1, 2, (hit.numel(), 2), generator=gen)
    first = torch.cumsum(length, 0) - length
    step[first] = 0
    walk = torch.cumsum(step, 0)
    walk = walk - torch.repeat_interleave(walk[first], length, dim=0)
    x = (x0[hit] + walk[:, 0]).clamp(0, w - 1)
    y = (y0[hit] + walk[:, 1]).clamp(0, h - 1)
    amp = sky_noise * (20.0 + 200.0 * torch.rand(hit.numel(), generator=gen, dtype=torch.float64))
    return {"x": torch.cat([x, hot["x"]]), "y": torch.cat([y, hot["y"]]),
            "value": torch.cat([amp, hot["value"]]), "n_cosmic": hit.numel()}


def _mover_tracks(movers: dict, mid: Tensor, mjd_ref: float, exptime: float) -> dict:
    """Sky positions ``(M, F)`` of each mover at mid-exposure, exposure start and exposure end."""
    m, f = movers["rate"].numel(), mid.numel()
    dt = ((mid - mjd_ref) * 1440.0)[None, :].expand(m, f)
    out = {}
    for name, shift in (("", 0.0), ("_start", -exptime / 120.0), ("_end", exptime / 120.0)):
        d = (dt + shift) * movers["rate"][:, None]
        ra, dec = _offset_along(movers["ra0"].repeat_interleave(f), movers["dec0"].repeat_interleave(f),
                                movers["pa"].repeat_interleave(f), d.reshape(-1))
        out["ra" + name], out["dec" + name] = ra.reshape(m, f), dec.reshape(m, f)
    return out


def _draw_transients(n, shape, header, mag_range, n_frames, gen) -> dict:
    h, w = shape
    x = 20.0 + torch.rand(n, generator=gen, dtype=torch.float64) * (w - 41)
    y = 20.0 + torch.rand(n, generator=gen, dtype=torch.float64) * (h - 41)
    ra, dec = _sky_positions(header, x, y)
    mag = mag_range[0] + torch.rand(n, generator=gen, dtype=torch.float64) * (mag_range[1] - mag_range[0])
    first = torch.randint(0, n_frames, (n,), generator=gen)
    last = first + (torch.rand(n, generator=gen) * (n_frames - first)).long()
    f = torch.arange(n_frames)[None, :]
    return {"ra": ra, "dec": dec, "mag": mag, "present": (f >= first[:, None]) & (f <= last[:, None])}


def _mover_pixels(hdr, tracks: dict, k: int) -> tuple:
    """Movers' pixel positions in frame ``k``: mid-exposure, exposure start and end."""
    mx, my = _pixel_positions(hdr, tracks["ra"][:, k], tracks["dec"][:, k])
    x0, y0 = _pixel_positions(hdr, tracks["ra_start"][:, k], tracks["dec_start"][:, k])
    x1, y1 = _pixel_positions(hdr, tracks["ra_end"][:, k], tracks["dec_end"][:, k])
    return mx, my, x0, y0, x1, y1


def _detector_header(hdr: fits.Header, p: dict, fwhm_k: float) -> None:
    hdr["GAIN"] = (p["gain"], "e-/ADU")
    hdr["RDNOISE"] = (p["read_noise"], "read noise, e-")
    hdr["SATURATE"] = (float(p["saturation"]) if p["saturation"] is not None else 0.0, "ADU")
    hdr["SKYLEVEL"] = (p["sky"], "mean sky, ADU")
    hdr["EXPTIME"] = (p["exptime"], "s")
    hdr["FWHM"] = (fwhm_k, "PSF FWHM, pixels")


def _night_frame(k, shape, hdr, stars, trans, movers, tracks, fwhm_k, p, gen, device, dtype) -> tuple:
    """Render exposure ``k`` of a night; returns the frame and the movers' pixel truth for it."""
    w = shape[1]
    sx, sy = _pixel_positions(hdr, stars["ra"], stars["dec"])
    on = trans["present"][:, k]
    tx, ty = _pixel_positions(hdr, trans["ra"][on], trans["dec"][on])
    mx, my, x0, y0, x1, y1 = _mover_pixels(hdr, tracks, k)
    extra = _trail_image(shape, x0, y0, x1, y1, movers["flux"], fwhm_k)
    n_s, n_t = sx.numel(), tx.numel()
    kind = torch.cat([torch.zeros(n_s, dtype=torch.int8), torch.ones(n_t, dtype=torch.int8)])
    frame = _make_frame(
        shape, hdr, torch.cat([sx, tx]), torch.cat([sy, ty]), torch.cat([stars["flux"], trans["flux"][on]]),
        torch.cat([stars["mag"], trans["mag"][on]]), kind, torch.cat([stars["ra"], trans["ra"][on]]),
        torch.cat([stars["dec"], trans["dec"][on]]), fwhm=fwhm_k, psf="gaussian", beta=2.5, sky=p["sky"],
        sky_gradient=(0.0, 0.0), sky_ripple=0.0, gain=p["gain"], read_noise=p["read_noise"],
        saturation=p["saturation"], defects={}, gen=gen, device=device, dtype=dtype, extra=extra,
    )
    _detector_header(frame.header, p, fwhm_k)
    hits = _cosmics_and_hot(shape, p["n_cosmics"], p["hot"], gen, math.sqrt(p["sky"] / p["gain"]))
    img = frame.image.view(-1)
    img.index_put_(((hits["y"] * w + hits["x"]).to(device),), hits["value"].to(device=device, dtype=img.dtype),
                   accumulate=True)
    if p["saturation"] is not None:
        frame.mask |= frame.image >= p["saturation"]
        frame.image.clamp_(max=p["saturation"])
    trail = torch.hypot(x1 - x0, y1 - y0)
    nm = mx.numel()
    cat = frame.catalog
    new = {"x": mx, "y": my, "flux": movers["flux"], "mag": movers["mag"], "ra": tracks["ra"][:, k],
           "dec": tracks["dec"][:, k], "peak": torch.full((nm,), float("nan")),
           "kind": torch.full((nm,), 2, dtype=torch.int8)}
    for key, v in new.items():
        cat[key] = torch.cat([cat[key], v.to(device=cat[key].device, dtype=cat[key].dtype)])
    cosmic = {"x": hits["x"][: hits["n_cosmic"]], "y": hits["y"][: hits["n_cosmic"]]}
    return frame, (mx, my, trail), cosmic


def simulate_night(
    shape: tuple[int, int] = (2048, 2048),
    *,
    n_frames: int = 5,
    cadence: tuple[float, float] = (5.0, 10.0),
    exptime: float = 30.0,
    mjd_start: float = 60400.75,
    n_stars: int = 5000,
    mag_range: tuple[float, float] = (8.0, 17.5),
    alpha: float = 0.35,
    zeropoint: float = 25.0,
    fwhm: float = 2.5,
    seeing_jitter: float = 0.15,
    pixel_scale: float = 11.7,
    ra: float = 150.0,
    dec: float = 30.0,
    jitter: float = 3.0,
    n_movers: int = 100,
    rate_range: tuple[float, float] = (0.1, 30.0),
    mover_mag_range: Optional[tuple[float, float]] = None,
    n_transients: int = 10,
    n_cosmics: int = 20,
    n_hot_pixels: int = 20,
    sky: float = 1000.0,
    gain: float = 1.5,
    read_noise: float = 10.0,
    saturation: Optional[float] = 60000.0,
    render: bool = True,
    seed: int = 0,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> SimNight:
    """Simulate ``n_frames`` exposures of one field over a night, with stars, movers and artefacts.

    Successive exposure starts are ``cadence`` minutes apart (uniform in the range); each frame's
    pointing is offset by up to ``jitter`` pixels (uniform, both axes) and its seeing FWHM is
    ``fwhm * (1 + seeing_jitter * N(0, 1))`` (clipped to 0.7-1.5 ``fwhm``). Movers follow great
    circles at constant angular rate (log-uniform in ``rate_range``, arcsec/min; uniform position
    angle), placed so that they stay in the field where the frame allows it, and are trailed by
    ``rate * exptime``: the PSF is integrated along the segment travelled during the exposure.
    ``mover_mag_range`` defaults to 4 mag brighter than to 0.2 mag fainter than the S/N = 5 limit
    of an untrailed source. Transients stay at one position in a contiguous run of frames; cosmic
    rays hit each frame; hot pixels sit at the same detector pixels in all frames. The other
    arguments are those of :func:`simulate_frame`. Same ``seed``, same night. ``render=False``
    makes the headers and the truth only (``frames`` empty): the same truth, no images.
    """
    shape = _check_shape(shape)
    h, w = shape
    gen = torch.Generator().manual_seed(int(seed))
    dev = torch.device(device) if device is not None else torch.device("cpu")
    ref = make_header(shape, ra=ra, dec=dec, pixel_scale=pixel_scale)
    sx, sy, smag, sflux = _draw_catalog(int(n_stars), shape, mag_range, alpha, zeropoint, gen, margin=-(2 * jitter + 8))
    sra, sdec = _sky_positions(ref, sx, sy)
    stars = {"ra": sra, "dec": sdec, "mag": smag, "flux": sflux}
    start = _night_times(int(n_frames), cadence, exptime, mjd_start, gen)
    mid = start + exptime / 2.0 / 86400.0
    mjd_ref = float(mid.mean())
    fw = (fwhm * (1 + seeing_jitter * torch.randn(int(n_frames), generator=gen, dtype=torch.float64))).clamp(0.7 * fwhm, 1.5 * fwhm)
    lim = _point_limit_mag(5.0, fwhm, sky, gain, read_noise, zeropoint)
    mmr = tuple(mover_mag_range) if mover_mag_range is not None else (lim - 4.0, lim + 0.2)
    half = float((mid[-1] - mid[0]) * 720.0) + exptime / 120.0
    movers = _draw_movers(int(n_movers), shape, ref, rate_range, mmr, half, pixel_scale, gen)
    movers["flux"] = 10 ** (-0.4 * (movers["mag"] - zeropoint))
    trans = _draw_transients(int(n_transients), shape, ref, (lim - 3.0, lim - 0.5), int(n_frames), gen)
    trans["flux"] = 10 ** (-0.4 * (trans["mag"] - zeropoint))
    tracks = _mover_tracks(movers, mid, mjd_ref, exptime)
    hot = {"x": torch.randint(0, w, (int(n_hot_pixels),), generator=gen),
           "y": torch.randint(0, h, (int(n_hot_pixels),), generator=gen)}
    hot["value"] = math.sqrt(sky / gain) * (10.0 + 100.0 * torch.rand(int(n_hot_pixels), generator=gen, dtype=torch.float64))
    p = dict(sky=sky, gain=gain, read_noise=read_noise, saturation=saturation, exptime=float(exptime),
             n_cosmics=n_cosmics, hot=hot)
    frames, headers, pix = [], [], []
    cosmics = {"frame": [torch.zeros(0, dtype=torch.long)], "x": [torch.zeros(0, dtype=torch.long)],
               "y": [torch.zeros(0, dtype=torch.long)]}
    offsets = (torch.rand(int(n_frames), 2, generator=gen, dtype=torch.float64) * 2 - 1) * jitter
    for k in range(int(n_frames)):
        hdr = make_header(shape, ra=ra, dec=dec, pixel_scale=pixel_scale, crpix_offset=tuple(offsets[k].tolist()))
        _time_header(hdr, float(start[k]), float(exptime))
        if render:
            frame, mxy, cos = _night_frame(k, shape, hdr, stars, trans, movers, tracks, float(fw[k]), p, gen, dev, dtype)
            frames.append(frame)
            hdr = frame.header
            cosmics["frame"].append(torch.full((cos["x"].numel(),), k))
            cosmics["x"].append(cos["x"])
            cosmics["y"].append(cos["y"])
        else:
            _detector_header(hdr, p, float(fw[k]))
            mx, my, x0, y0, x1, y1 = _mover_pixels(hdr, tracks, k)
            mxy = (mx, my, torch.hypot(x1 - x0, y1 - y0))
        headers.append(hdr)
        pix.append(mxy)
    return _night_truth(shape, frames, headers, pix, cosmics, stars, trans, movers, tracks, mid, fw, p, pixel_scale,
                        mjd_ref)


def _night_truth(shape, frames, headers, pix, cosmics, stars, trans, movers, tracks, mid, fw, p, pixel_scale,
                 mjd_ref) -> SimNight:
    """Collect the truth tables of :func:`simulate_night` (per object and frame, ``(M, F)``)."""
    h, w = shape
    mx = torch.stack([q[0] for q in pix], 1)
    my = torch.stack([q[1] for q in pix], 1)
    trail = torch.stack([q[2] for q in pix], 1)
    snr = torch.stack([_trail_snr(movers["flux"], trail[:, k], float(fw[k]), p["sky"], p["gain"], p["read_noise"])
                       for k in range(mid.numel())], 1)
    in_frame = (mx >= 0) & (mx <= w - 1) & (my >= 0) & (my <= h - 1)
    m = mx.shape[0]
    mv = {"rate": movers["rate"], "pa": movers["pa"], "mag": movers["mag"], "flux": movers["flux"],
          "ra": tracks["ra"], "dec": tracks["dec"], "x": mx, "y": my, "mjd": mid[None, :].expand(m, -1).clone(),
          "trail": trail, "snr": torch.where(in_frame, snr, torch.zeros_like(snr)), "in_frame": in_frame}
    st = dict(stars)
    xy = [_pixel_positions(hdr, stars["ra"], stars["dec"]) for hdr in headers]
    st["x"], st["y"] = torch.stack([q[0] for q in xy], 1), torch.stack([q[1] for q in xy], 1)
    tr = dict(trans)
    xy = [_pixel_positions(hdr, trans["ra"], trans["dec"]) for hdr in headers]
    tr["x"], tr["y"] = torch.stack([q[0] for q in xy], 1), torch.stack([q[1] for q in xy], 1)
    cos = {k: torch.cat(v) for k, v in cosmics.items()}
    hot = {"x": p["hot"]["x"], "y": p["hot"]["y"]}
    return SimNight(frames=frames, headers=headers, shape=(h, w), mjd=mid, movers=mv, stars=st, transients=tr, cosmics=cos, hot_pixels=hot,
                    pixel_scale=float(pixel_scale), exptime=p["exptime"], mjd_ref=mjd_ref)


def simulate_detections(
    night: SimNight,
    *,
    snr_min: float = 5.0,
    n_spurious: int = 100,
    astrometric_floor: float = 0.05,
    seed: int = 0,
) -> dict:
    """A detection catalog of a simulated night, drawn from its truth (no image processing).

    Every source with a measured S/N (true S/N plus a unit normal draw) of at least ``snr_min`` is
    detected: stars and transients as points, movers as trails. Positions scatter with the 1-sigma
    error per axis ``sqrt(s^2 + L^2 / 24) / snr + astrometric_floor`` pixels (``s`` = PSF sigma,
    ``L`` = trail length), magnitudes with ``1.0857 / snr``. Hot pixels give a detection in every
    frame at their detector pixel; ``n_spurious`` random detections per frame (S/N 5-7, cosmic rays
    and noise peaks) are added. Returns flat tensors ``ra, dec, mjd, mag, snr, pos_err`` (arcsec),
    ``a, b`` (rms semi-axes, arcsec, relative scatter ``1 / snr``), ``theta`` (deg, North through
    East), ``exptime`` (s), ``x, y`` (frame pixels), ``exposure`` and
    ``object`` (mover index; -1 star, -2 transient, -3 hot pixel, -4 spurious).
    """
    gen = torch.Generator().manual_seed(int(seed))
    parts = [_frame_detections(night, k, snr_min, n_spurious, astrometric_floor, gen) for k in range(len(night.headers))]
    return {key: torch.cat([q[key] for q in parts]) for key in parts[0]}


def _source_snr(flux: Tensor, fwhm: float, p: dict) -> Tensor:
    return _trail_snr(flux, torch.zeros_like(flux), fwhm, p["sky"], p["gain"], p["read_noise"])


def _measured_theta(pa: Tensor, trail: Tensor, s: float, gen) -> Tensor:
    """Major-axis PA (deg mod 180): the motion PA +- 5 deg for trails longer than 2 PSF sigma, random otherwise."""
    n = pa.numel()
    along = (pa + torch.randn(n, generator=gen, dtype=torch.float64) * 5.0) % 180.0
    return torch.where(trail > 2.0 * s, along, torch.rand(n, generator=gen, dtype=torch.float64) * 180.0)


def _frame_detections(night: SimNight, k: int, snr_min, n_spurious, floor, gen) -> dict:
    hdr = night.headers[k]
    h, w = night.shape
    fw = float(hdr["FWHM"])
    s = fw / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    p = {"sky": float(hdr["SKYLEVEL"]), "gain": float(hdr["GAIN"]), "read_noise": float(hdr["RDNOISE"])}
    st, tr, mv = night.stars, night.transients, night.movers
    on = tr["present"][:, k]
    hot_x, hot_y = night.hot_pixels["x"].double(), night.hot_pixels["y"].double()
    n_sp = int(n_spurious)
    sp_x = torch.rand(n_sp, generator=gen, dtype=torch.float64) * (w - 1)
    sp_y = torch.rand(n_sp, generator=gen, dtype=torch.float64) * (h - 1)
    x = torch.cat([st["x"][:, k], tr["x"][on, k], mv["x"][:, k], hot_x, sp_x])
    y = torch.cat([st["y"][:, k], tr["y"][on, k], mv["y"][:, k], hot_y, sp_y])
    snr = torch.cat([_source_snr(st["flux"], fw, p), _source_snr(tr["flux"][on], fw, p), mv["snr"][:, k],
                     5.0 + 2.0 * torch.rand(hot_x.numel() + n_sp, generator=gen, dtype=torch.float64)])
    mag0 = torch.cat([st["mag"], tr["mag"][on], mv["mag"],
                      torch.full((hot_x.numel() + n_sp,), float(mv["mag"].max()) if mv["mag"].numel() else 20.0)])
    mag0[mag0.numel() - (hot_x.numel() + n_sp):] -= torch.rand(hot_x.numel() + n_sp, generator=gen, dtype=torch.float64) * 2
    obj = torch.cat([torch.full((st["x"].shape[0],), -1), torch.full((int(on.sum()),), -2),
                     torch.arange(mv["x"].shape[0]), torch.full((hot_x.numel(),), -3), torch.full((n_sp,), -4)])
    trail = torch.cat([torch.zeros(st["x"].shape[0] + int(on.sum())), mv["trail"][:, k], torch.zeros(hot_x.numel() + n_sp)]).double()
    measured = snr + torch.randn(snr.numel(), generator=gen, dtype=torch.float64)
    n_real = snr.numel() - (hot_x.numel() + n_sp)
    measured[n_real:] = snr_min  # artefacts are always detected
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    keep = (measured >= snr_min) & inside
    x, y, snr, mag0, obj, trail = x[keep], y[keep], snr[keep], mag0[keep], obj[keep], trail[keep]
    err = torch.sqrt(s * s + trail**2 / 24.0) / snr + floor
    scatter = torch.where(obj == -3, torch.zeros_like(err), err)  # a hot pixel is always at its pixel
    x = x + torch.randn(x.numel(), generator=gen, dtype=torch.float64) * scatter
    y = y + torch.randn(y.numel(), generator=gen, dtype=torch.float64) * scatter
    ra, dec = _sky_positions(hdr, x, y)
    scale = night.pixel_scale
    pa = torch.where(obj >= 0, mv["pa"][obj.clamp(min=0)] if mv["pa"].numel() else torch.zeros_like(x), torch.zeros_like(x))
    n = x.numel()
    return {"ra": ra, "dec": dec, "mjd": torch.full((n,), float(night.mjd[k]), dtype=torch.float64),
            "mag": mag0 + torch.randn(n, generator=gen, dtype=torch.float64) * 1.0857 / snr, "snr": snr,
            "pos_err": err * scale,
            "a": torch.sqrt(s * s + trail**2 / 12.0) * scale * (1 + torch.randn(n, generator=gen, dtype=torch.float64) / snr),
            "b": s * scale * (1 + torch.randn(n, generator=gen, dtype=torch.float64) / snr),
            "exptime": torch.full((n,), night.exptime, dtype=torch.float64),
            "theta": _measured_theta(pa, trail, s, gen),
            "x": x, "y": y, "exposure": torch.full((n,), k, dtype=torch.long), "object": obj}


def simulate_dithers(
    n_frames: int = 5,
    shape: tuple[int, int] = (512, 512),
    *,
    n_stars: int = 1000,
    dither: float = 10.0,
    fwhm: float = 2.5,
    mag_range: tuple[float, float] = (12.0, 20.0),
    zeropoint: float = 25.0,
    sky: float = 1000.0,
    noise: float = 10.0,
    ra: float = 150.0,
    dec: float = 30.0,
    pixel_scale: float = 1.0,
    sip: Union[bool, float] = False,
    cosmic_rays: int = 0,
    mover_speed: float = 0.0,
    integer_dither: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> list[SimFrame]:
    """``n_frames`` dithered exposures of one star field (what a stack or an astrometric fit needs).

    Frame ``i`` points ``dither`` pixels (uniform random in x and y, frame 0 undithered) away
    from the field centre; every frame has a flat sky ``sky`` and Gaussian noise of constant
    ``noise`` ADU (``variance`` is ``noise**2``), so the expected noise of a stack is known. The
    truth ``catalog`` of each frame holds every star (``ra, dec, mag, flux`` and its ``x, y``).
    ``cosmic_rays`` single hot pixels (+20 to +200 ``noise``) per frame are flagged in
    ``defect_mask``; with ``mover_speed > 0`` one bright object moves by that many pixels per
    frame along x (``kind`` 2 in the catalog).
    """
    shape = _check_shape(shape)
    h, w = shape
    gen = torch.Generator().manual_seed(int(seed))
    base = make_header(shape, ra=ra, dec=dec, pixel_scale=pixel_scale, sip=sip)
    m = 2.0 * dither + 8.0
    x0 = torch.rand(n_stars, generator=gen, dtype=torch.float64) * (w + 2 * m) - m
    y0 = torch.rand(n_stars, generator=gen, dtype=torch.float64) * (h + 2 * m) - m
    mag = mag_range[0] + torch.rand(n_stars, generator=gen, dtype=torch.float64) * (mag_range[1] - mag_range[0])
    s_ra, s_dec = _sky_positions(base, x0, y0)
    frames = []
    for i in range(int(n_frames)):
        off = (torch.rand(2, generator=gen, dtype=torch.float64) * 2 - 1) * dither if i else torch.zeros(2)
        off = off.round() if integer_dither else off
        hdr = make_header(shape, ra=ra, dec=dec, pixel_scale=pixel_scale, sip=sip,
                          crpix_offset=(float(off[0]), float(off[1])))
        hdr["EXPTIME"] = 1.0
        x, y = _pixel_positions(hdr, s_ra, s_dec)
        flux = 10 ** (-0.4 * (mag - zeropoint))
        kind = torch.zeros(n_stars, dtype=torch.int8)
        if mover_speed > 0:
            x, y, flux, kind = (torch.cat([x, torch.tensor([w * 0.3 + i * mover_speed], dtype=torch.float64)]),
                                torch.cat([y, torch.tensor([h * 0.5], dtype=torch.float64)]),
                                torch.cat([flux, torch.tensor([10 ** (-0.4 * (mag_range[0] + 1 - zeropoint))])]),
                                torch.cat([kind, torch.tensor([2], dtype=torch.int8)]))
        stars = render_stars(shape, x.float(), y.float(), flux.float(), fwhm=fwhm).to(torch.float64)
        noiseless = stars + sky
        image = noiseless + noise * torch.randn(shape, generator=gen, dtype=torch.float64)
        cr = torch.zeros(shape, dtype=torch.bool)
        if cosmic_rays:
            iy = torch.randint(0, h, (cosmic_rays,), generator=gen)
            ix = torch.randint(0, w, (cosmic_rays,), generator=gen)
            image[iy, ix] += noise * (20 + 180 * torch.rand(cosmic_rays, generator=gen, dtype=torch.float64))
            cr[iy, ix] = True
        ra_i, dec_i = (torch.cat([s_ra, _sky_positions(hdr, x[-1:], y[-1:])[0]]),
                       torch.cat([s_dec, _sky_positions(hdr, x[-1:], y[-1:])[1]])) if mover_speed > 0 else (s_ra, s_dec)
        mags = torch.cat([mag, torch.tensor([mag_range[0] + 1.0], dtype=torch.float64)]) if mover_speed > 0 else mag
        t = lambda a: a.to(dtype)[None, None]
        frames.append(SimFrame(
            image=t(image), background=t(torch.full(shape, sky, dtype=torch.float64)), noiseless=t(noiseless),
            variance=t(torch.full(shape, noise ** 2, dtype=torch.float64)), mask=torch.zeros(1, 1, h, w, dtype=torch.bool),
            defect_mask=cr[None, None], header=hdr, fwhm=fwhm, gain=1.0,
            catalog={"x": x, "y": y, "flux": flux, "mag": mags, "ra": ra_i, "dec": dec_i, "kind": kind}))
    return frames


# --------------------------------------------------------------------------------------------
# Raw-frame effects (a CCD camera): bias, overscan, dark current, flat field, saturation and bleed
# --------------------------------------------------------------------------------------------
@dataclass
class Camera:
    """A simulated CCD: fixed patterns of one detector (see :func:`make_camera`).

    ``bias`` (H, W + overscan) ADU: level + column pattern + a row pattern that the overscan
    shares; ``dark`` (H, W) dark current in e-/s (with hot pixels); ``flat`` (H, W) relative
    response (vignetting x dust donuts x pixel-to-pixel), mean 1 (so > 1 at the centre); ``overscan``:
    columns appended at the right; ``gain`` e-/ADU, ``read_noise`` e-, ``full_well`` e- (charge above
    it bleeds along the columns), ``saturation`` the ADC's top value in raw ADU.
    """

    bias: Tensor
    dark: Tensor
    flat: Tensor
    overscan: int
    gain: float
    read_noise: float
    full_well: float
    saturation: float
    hot: Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.flat.shape)  # type: ignore[return-value]

    @property
    def saturate_level(self) -> float:
        """The raw level written as ``SATURATE``: where the first pixel reaches full well (less 5 read
        noise sigmas) or the ADC's top value, whichever is lower."""
        well = float(self.bias.min()) + self.full_well / self.gain - 5.0 * self.read_noise / self.gain
        return min(self.saturation, well)


@dataclass
class RawFrame:
    """A raw frame ``raw (1, 1, H, W + overscan)`` in ADU with its header (BIASSEC, DATASEC, TRIMSEC,
    GAIN, RDNOISE, SATURATE, EXPTIME, IMAGETYP) and truth: ``truth`` (1, 1, H, W) the ideal noiseless
    frame in calibrated ADU (what calibration should recover), ``variance`` (1, 1, H, W) the noise
    variance of that frame after calibration with perfect masters, ``saturated`` (1, 1, H, W) bool the
    pixels at full well or the ADC limit (cores and bleed trails)."""

    raw: Tensor
    header: fits.Header
    truth: Tensor
    variance: Tensor
    saturated: Tensor


def _flat_pattern(shape, vignetting, n_dust, dust_depth, prnu, gen, dtype) -> Tensor:
    h, w = shape
    yy, xx = _coords(shape, "cpu", dtype)
    r2 = (xx * w / max(h, w)) ** 2 + (yy * h / max(h, w)) ** 2
    flat = 1.0 - vignetting * r2 / 2.0  # cos^4-like fall-off: 1 - vignetting at the corners
    if n_dust:
        p = torch.rand(int(n_dust), 4, generator=gen, dtype=torch.float64).tolist()
        Y = torch.arange(h, dtype=dtype)[:, None]
        X = torch.arange(w, dtype=dtype)[None, :]
        for cx, cy, rad, dep in p:
            rad = 6.0 + 18.0 * rad  # donut radius in pixels (out-of-focus dust on a window)
            d = torch.sqrt((X - cx * (w - 1)) ** 2 + (Y - cy * (h - 1)) ** 2)
            ring = torch.exp(-0.5 * ((d - 0.7 * rad) / (0.25 * rad)) ** 2)
            flat = flat * (1.0 - dust_depth * (0.5 + dep) * ring)
    flat = flat * (1.0 + prnu * torch.randn(shape, generator=gen, dtype=dtype))
    return flat / flat.mean()  # mean 1, as a normalised master flat: truth and calibrated frames agree


def make_camera(shape: tuple[int, int], *, overscan: int = 32, bias_level: float = 1000.0,
                bias_row_amplitude: float = 4.0, bias_column_amplitude: float = 3.0,
                dark_current: float = 0.05, hot_fraction: float = 2e-4, hot_current: float = 50.0,
                vignetting: float = 0.35, n_dust: int = 4, dust_depth: float = 0.08, prnu: float = 0.005,
                gain: float = 1.5, read_noise: float = 10.0, full_well: float = 90000.0,
                saturation: float = 65535.0, seed: int = 0) -> Camera:
    """A simulated CCD of science area ``shape = (H, W)`` (see :class:`Camera`).

    Bias: ``bias_level`` + a smooth row pattern (shared with the overscan, so the overscan removes it)
    of ``bias_row_amplitude`` ADU + a fixed column pattern (``bias_column_amplitude`` ADU; the master
    bias removes it). Dark: ``dark_current`` e-/s with a fraction ``hot_fraction`` of hot pixels at
    ``hot_current`` e-/s. Flat: ``1 - vignetting`` at the corners, ``n_dust`` dust donuts of depth
    ~``dust_depth``, pixel-to-pixel response of rms ``prnu``.
    """
    h, w = _check_shape(shape)
    gen = torch.Generator().manual_seed(int(seed))
    f64 = torch.float64
    rows = torch.linspace(0, 1, h, dtype=f64)
    ph = torch.rand(2, generator=gen, dtype=f64).tolist()
    row_pat = bias_row_amplitude * torch.sin(2 * math.pi * (1.5 * rows + ph[0]))
    col_pat = bias_column_amplitude * torch.randn(w + overscan, generator=gen, dtype=f64)
    col_pat[w:] = 0.0  # the overscan carries the level and the row pattern only
    bias = bias_level + row_pat[:, None] + col_pat[None, :]
    hot = torch.rand(h, w, generator=gen, dtype=f64) < hot_fraction
    dark = torch.full((h, w), float(dark_current), dtype=f64).masked_fill(hot, float(hot_current))
    flat = _flat_pattern((h, w), vignetting, n_dust, dust_depth, prnu, gen, f64)
    return Camera(bias=bias, dark=dark, flat=flat, overscan=int(overscan), gain=float(gain),
                  read_noise=float(read_noise), full_well=float(full_well), saturation=float(saturation), hot=hot)


def bleed_columns(electrons: Tensor, full_well: float) -> tuple[Tensor, Tensor]:
    """Spill charge above ``full_well`` along the columns of ``electrons (H, W)``.

    Per column, the excess charge fills ``excess / full_well`` more pixels to full well, half above
    and half below the column's saturated run (two saturated stars in one column make one trail).
    Returns the bled frame and the mask of pixels at full well (cores and trails).
    """
    h, w = electrons.shape
    over = electrons > full_well
    if not bool(over.any()):
        return electrons, over
    excess = (electrons - full_well).clamp(min=0).sum(0)  # (W,)
    rows = torch.arange(h, device=electrons.device)[:, None]
    top = torch.where(over, rows, h).amin(0)
    bottom = torch.where(over, rows, -1).amax(0)
    half = torch.ceil(excess / full_well / 2.0).long()
    trail = (rows >= (top - half)[None, :]) & (rows <= (bottom + half)[None, :]) & over.any(0)[None, :]
    return torch.where(trail, torch.full_like(electrons, full_well), electrons), trail


def add_halos(signal: Tensor, x: Tensor, y: Tensor, flux: Tensor, *, fraction: float = 0.02,
              fwhm: float = 20.0, min_flux: float = 0.0) -> Tensor:
    """Add a broad Gaussian halo (``fraction`` of the flux, FWHM ``fwhm`` px) around stars brighter
    than ``min_flux`` to ``signal (H, W)`` (scattered light around bright stars)."""
    keep = flux > min_flux
    if not bool(keep.any()) or fraction <= 0:
        return signal
    return render_stars(tuple(signal.shape), x[keep], y[keep], flux[keep] * fraction, fwhm=fwhm,
                        out=signal.clone(), chunk=64)


def _raw_header(camera: Camera, exptime: float, kind: str, base: Optional[fits.Header] = None) -> fits.Header:
    h, w = camera.shape
    hdr = base.copy() if base is not None else fits.Header()
    hdr["IMAGETYP"] = kind
    hdr["EXPTIME"] = (float(exptime), "s")
    hdr["GAIN"] = (camera.gain, "e-/ADU")
    hdr["RDNOISE"] = (camera.read_noise, "read noise, e-")
    hdr["SATURATE"] = (round(camera.saturate_level, 1), "saturation (full well or ADC), raw ADU")
    hdr["BIASSEC"] = f"[{w + 1}:{w + camera.overscan},1:{h}]"
    hdr["DATASEC"] = f"[1:{w},1:{h}]"
    hdr["TRIMSEC"] = f"[1:{w},1:{h}]"
    return hdr


def expose(camera: Camera, signal: Optional[Tensor], exptime: float, *, seed: int = 0, kind: str = "object",
           header: Optional[fits.Header] = None) -> RawFrame:
    """Read out ``signal (H, W)`` (ideal ADU, before the flat; None = a bias) through ``camera``.

    raw = ADC(bias + [Poisson(gain * flat * signal + dark * exptime), bled at full well] / gain + read
    noise), clipped at the ADC's ``saturation`` and rounded; the overscan columns carry the bias and
    read noise only.
    """
    h, w = camera.shape
    gen = torch.Generator().manual_seed(int(seed))
    f64 = torch.float64
    sig = torch.zeros(h, w, dtype=f64) if signal is None else signal.detach().reshape(h, w).to("cpu", f64)
    expected = camera.gain * camera.flat * sig.clamp(min=0) + camera.dark * float(exptime)
    electrons = torch.poisson(expected, generator=gen)
    electrons, at_well = bleed_columns(electrons, camera.full_well)
    adu = torch.zeros(h, w + camera.overscan, dtype=f64)
    adu[:, :w] = electrons / camera.gain
    adu = adu + camera.bias + torch.randn(adu.shape, generator=gen, dtype=f64) * (camera.read_noise / camera.gain)
    raw = adu.round().clamp(0.0, camera.saturation)
    saturated = at_well | (raw[:, :w] >= camera.saturation)
    var = (camera.gain * camera.flat * sig.clamp(min=0) + camera.dark * float(exptime)) / camera.gain**2
    var = (var + (camera.read_noise / camera.gain) ** 2) / camera.flat**2
    b = lambda t: t.reshape(1, 1, *t.shape)  # noqa: E731
    return RawFrame(raw=b(raw).float(), header=_raw_header(camera, exptime, kind, header), truth=b(sig).float(),
                    variance=b(var).float(), saturated=b(saturated))


def simulate_raw(frame: SimFrame, camera: Optional[Camera] = None, *, exptime: Optional[float] = None,
                 halo_fraction: float = 0.0, halo_fwhm: float = 20.0, halo_min_flux: Optional[float] = None,
                 seed: int = 0) -> RawFrame:
    """The raw frame a ``camera`` records of the scene of ``frame`` (its noiseless sky and stars).

    ``halo_fraction`` > 0 adds halos around stars brighter than ``halo_min_flux`` (ADU; default: the
    flux whose peak in this frame reaches the camera's full well; give the same value to the frames of
    one field so that its stars keep their halos from frame to frame). Halos belong to the scene:
    ``truth`` includes them. The frame's WCS and keywords are kept (its
    science area starts at raw pixel (0, 0), so CRPIX is unchanged). ``camera`` defaults to
    :func:`make_camera` of the frame's shape with the frame's gain.
    """
    camera = camera if camera is not None else make_camera(frame.shape, gain=frame.gain, seed=seed + 1)
    exptime = float(frame.header.get("EXPTIME", 18.0) if exptime is None else exptime)
    signal = frame.noiseless[0, 0].detach().to("cpu", torch.float64)
    if halo_fraction > 0:
        c = frame.catalog
        if halo_min_flux is None:
            sigma = frame.fwhm / (2.0 * math.sqrt(2.0 * math.log(2.0)))
            halo_min_flux = camera.full_well / camera.gain * 2 * math.pi * sigma**2
        signal = add_halos(signal, c["x"].double().cpu(), c["y"].double().cpu(), c["flux"].double().cpu(),
                           fraction=halo_fraction, fwhm=halo_fwhm, min_flux=float(halo_min_flux))
    base = frame.header.copy()
    for k in ("SATURATE", "GAIN", "RDNOISE"):
        base.remove(k, ignore_missing=True)
    return expose(camera, signal, exptime, seed=seed, header=base)


def simulate_calibration_frames(camera: Camera, *, n_bias: int = 5, n_dark: int = 5, dark_exptime: float = 60.0,
                                n_flat: int = 5, flat_level: float = 20000.0, flat_exptime: float = 5.0,
                                flat_gradient: float = 0.0, seed: int = 0) -> dict:
    """Bias, dark and flat frames of ``camera``: ``{"bias": [RawFrame], "dark": [...], "flat": [...]}``.

    Flats see a uniform illumination of ``flat_level`` ADU (dome; ``flat_gradient`` adds a linear
    twilight gradient across x, as a fraction), each at a slightly different level (+-10%).
    """
    h, w = camera.shape
    gen = torch.Generator().manual_seed(int(seed) + 7919)
    out: dict = {"bias": [], "dark": [], "flat": []}
    for i in range(int(n_bias)):
        out["bias"].append(expose(camera, None, 0.0, seed=seed * 1000 + i, kind="bias"))
    for i in range(int(n_dark)):
        out["dark"].append(expose(camera, None, dark_exptime, seed=seed * 1000 + 100 + i, kind="dark"))
    xx = torch.linspace(-0.5, 0.5, w, dtype=torch.float64)[None, :]
    for i in range(int(n_flat)):
        level = flat_level * (0.9 + 0.2 * float(torch.rand(1, generator=gen, dtype=torch.float64)))
        illum = (level * (1.0 + flat_gradient * xx)).expand(h, w)
        out["flat"].append(expose(camera, illum, flat_exptime, seed=seed * 1000 + 200 + i, kind="flat"))
    return out


def write_raw(path, frame: RawFrame) -> None:
    """Write a :class:`RawFrame` as a float32 FITS file (raw ADU, integer values) with its header."""
    fits.PrimaryHDU(frame.raw[0, 0].cpu().numpy(), header=frame.header).writeto(path, overwrite=True)


def _write_frame(path, frame, overwrite: bool = True) -> None:
    from .io import write_fits

    write_fits(path, frame.image, header=frame.header, overwrite=overwrite)


def _truth_table(catalog: dict):
    from astropy.table import Table  # a second's import: only when truth catalogs are written

    t = Table({k: v.detach().cpu().numpy() for k, v in catalog.items()})
    t.meta["comment"] = ["x, y: 0-based pixel coordinates (x = column, y = row)"]
    return t


def write_simulated_pair(pair: SimPair, outdir) -> dict:
    """Write a :class:`SimPair` as FITS frames plus ECSV truth catalogs into ``outdir`` (created);
    returns ``{"reference", "science", "reference_truth", "science_truth", "transients_truth": path}``."""
    from pathlib import Path

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = {
        "reference": outdir / "reference.fits",
        "science": outdir / "science.fits",
        "reference_truth": outdir / "reference.truth.ecsv",
        "science_truth": outdir / "science.truth.ecsv",
        "transients_truth": outdir / "transients.truth.ecsv",
    }
    _write_frame(paths["reference"], pair.reference)
    _write_frame(paths["science"], pair.science)
    _truth_table(pair.reference.catalog).write(paths["reference_truth"], overwrite=True)
    _truth_table(pair.science.catalog).write(paths["science_truth"], overwrite=True)
    _truth_table(pair.transients).write(paths["transients_truth"], overwrite=True)
    return paths
