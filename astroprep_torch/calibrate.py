"""CCD calibration: overscan, trim, master bias / dark / flat, bad pixels, saturation and bleed trails.

The algorithms are those of astropy's ``ccdproc`` (the trusted reference; see
``experiments/calibrate_ccdproc.py``), on tensors and streamed over files:

* **Sections** come from the header (``BIASSEC`` for the overscan, ``TRIMSEC`` else ``DATASEC`` for
  the trim) or are given; they are FITS sections ``[x1:x2,y1:y2]`` (1-based, inclusive, x = column)
  and are converted to 0-based slices once, in :func:`parse_section`. ``*`` means a whole axis.
  Reversed (flipped) sections are refused.
* **Overscan**: the median (or mean) of the overscan section along its long axis gives one value per
  row (an overscan strip of columns) or per column (a strip of rows), as ``ccdproc.subtract_overscan``
  with ``overscan_axis=None``; it is subtracted before trimming.
* **Combination** (:func:`combine_frames`): per-pixel median (the mean of the two middle values for an
  even count, as numpy) or mean over frames, after an optional one-pass sigma clip around the
  mean (or median) with the standard deviation (ccdproc's ``combine(sigma_clip=True)``), with masks;
  the uncertainty is ``1.4826 MAD / sqrt(n)`` for the median and ``std / sqrt(n)`` for the mean (n =
  frames kept at the pixel), as ccdproc; a pixel rejected in every frame is masked.
* **Masters**: bias = combination of overscan-subtracted, trimmed bias frames; dark = combination of
  bias-subtracted darks (ADU at the darks' exposure time ``EXPTIME``; scaled by the science exposure
  time on use); flat = combination of bias- (and dark-) subtracted flats each scaled by 1/median
  (twilight or dome flats alike), normalised to mean 1 over its good pixels.
* **Applying** (:func:`calibrate_frames`): ``(raw - overscan - bias - dark * t / t_dark) / flat`` with
  the variance ``max(s, 0) / gain + (read_noise / gain)^2`` of the bias- and dark-subtracted signal
  ``s`` (ADU; gain in e-/ADU, read noise in e-), plus the masters' uncertainties, divided by
  ``flat^2`` (plus the flat's own term). The output stays in ADU (not gain-corrected).
* **Bad pixels** (:func:`bad_pixel_map`): hot pixels of the master dark and the outliers of the
  master bias (above ``k`` robust sigmas from the median), flat pixels below ``flat_low`` or above
  ``flat_high``, and pixels the combination masked. Files written by :func:`calibrate_files` have
  them filled from their neighbours (variance infinite) or set to NaN (``bad_pixel_fill``).
* **Saturation** (:func:`saturation_mask`): pixels at or above the level, their bleed trails (pixels
  above ``bleed_fraction * level`` connected to a saturated pixel along the readout axis) and a
  ``grow`` margin, as HOTPANTS masks ``-iu``/``-tu`` pixels and their neighbours.

Memory: masters are combined from files read in place (each kept open for the whole combination),
a block of rows of every file at a time, read once per block, the block height chosen so the block
and its sorted copies stay under ``memory_mb``: the peak does not grow with the number of frames.
Blocks and masters are float32 (raw integer ADU up to 16 bits are exact in float32; the results agree
with float64 within ~1e-7 relative). The median sorts each pixel's values once, the frames lying
along the last, contiguous axis. Frames are calibrated one at a time from files, or as a batch
``(B, 1, H, W)`` with :class:`CCDCalibration`.

Each calibrated frame's header records what was applied: ``OVERSCAN``, ``TRIM``, ``BIASCORR``,
``DARKCORR``, ``FLATCORR``, ``BPMCORR`` (with HISTORY lines, as IRAF's ccdproc), ``DATASEC`` of the
trimmed frame, ``LTV1``/``LTV2`` and ``CRPIX`` shifted by the trim, and ``SATURATE`` converted to
calibrated units (the lowest level any pixel saturates at, so no saturated pixel is missed).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._masks import grow_mask
from ._robust import MAD_TO_STD, mad_std

__all__ = [
    "Section",
    "parse_section",
    "format_section",
    "frame_sections",
    "overscan_values",
    "subtract_overscan",
    "combine_frames",
    "Combined",
    "Master",
    "RawFile",
    "combine_files",
    "master_bias",
    "master_dark",
    "master_flat",
    "bad_pixel_map",
    "saturation_mask",
    "SaturationMask",
    "SaturationMasks",
    "grow_mask",
    "GrowUnion",
    "calibrate_frames",
    "Calibrated",
    "CCDCalibration",
    "header_value",
    "header_saturation",
    "calibrate_files",
    "fill_bad_pixels",
    "calibrate_from_config",
]

PathLike = Union[str, Path]
MAD_TO_SIGMA = MAD_TO_STD  # one constant for the package (astropy's), see _robust
#: header keywords tried, in order, for the gain (e-/ADU) and the read noise (e-)
GAIN_KEYS = ("GAIN", "EGAIN", "CCDGAIN")
READ_NOISE_KEYS = ("RDNOISE", "READNOIS", "RON", "READNOISE", "RDNOISE1")
SATURATION_KEYS = ("SATURATE", "SATLEVEL", "SATURATN")


# ----------------------------------------------------------------------------------------------
# sections (FITS 1-based inclusive <-> 0-based slices)
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    """A 0-based, end-exclusive rectangle: ``rows = (y0, y1)``, ``cols = (x0, x1)``."""

    rows: tuple
    cols: tuple

    @property
    def slices(self) -> tuple:
        return slice(*self.rows), slice(*self.cols)

    @property
    def shape(self) -> tuple:
        return self.rows[1] - self.rows[0], self.cols[1] - self.cols[0]


_SECTION = re.compile(r"^\s*\[\s*([^,\]]+)\s*,\s*([^,\]]+)\s*\]\s*$")


def _axis_range(text: str, n: int, what: str) -> tuple:
    text = text.strip()
    if text in ("*", ":"):
        return 0, n
    m = re.fullmatch(r"(\d+)\s*:\s*(\d+)", text)
    if not m:
        raise ValueError(f"{what}: expected 'a:b' or '*' in a FITS section, got {text!r}")
    a, b = int(m.group(1)), int(m.group(2))
    if a < 1 or b > n or a > b:
        raise ValueError(f"{what}: range {a}:{b} must satisfy 1 <= a <= b <= {n} (FITS 1-based, not reversed)")
    return a - 1, b


def parse_section(spec: str, shape: Sequence[int], name: str = "section") -> Section:
    """A FITS section ``'[x1:x2,y1:y2]'`` (1-based, inclusive) of a frame of ``shape = (H, W)``."""
    if not isinstance(spec, str) or not _SECTION.match(spec):
        raise ValueError(f"{name}: expected a FITS section like '[1:1024,1:2048]', got {spec!r}")
    xs, ys = _SECTION.match(spec).groups()
    h, w = int(shape[0]), int(shape[1])
    return Section(rows=_axis_range(ys, h, f"{name} (y)"), cols=_axis_range(xs, w, f"{name} (x)"))


def format_section(section: Section) -> str:
    """The FITS (1-based inclusive) text of a 0-based :class:`Section`."""
    return f"[{section.cols[0] + 1}:{section.cols[1]},{section.rows[0] + 1}:{section.rows[1]}]"


def frame_sections(header, shape, *, overscan: Optional[str] = None, trim: Optional[str] = None):
    """``(overscan, trim)`` Sections (or None) from the arguments, else ``BIASSEC`` and ``TRIMSEC``/``DATASEC``.

    An overscan without a trim section is refused: the overscan strip would stay in the frame.
    """
    header = header if header is not None else {}
    o = overscan if overscan is not None else header.get("BIASSEC")
    t = trim if trim is not None else (header.get("TRIMSEC") or header.get("DATASEC"))
    osec = parse_section(o, shape, "overscan (BIASSEC)") if o else None
    tsec = parse_section(t, shape, "trim (TRIMSEC/DATASEC)") if t else None
    if osec is not None and tsec is None:
        raise ValueError("trim: an overscan section is set but no TRIMSEC/DATASEC nor trim section; the overscan "
                         "strip would stay in the calibrated frame (give trim='[x1:x2,y1:y2]')")
    return osec, tsec


# ----------------------------------------------------------------------------------------------
# overscan
# ----------------------------------------------------------------------------------------------
def overscan_axis(section: Section) -> int:
    """ccdproc's rule: a strip wider than tall is a strip of rows (values per column, axis 0)."""
    h, w = section.shape
    return 0 if w > h else 1


def overscan_values(strip: Tensor, axis: int, method: str = "median") -> Tensor:
    """One overscan value per row (``axis=1``: ``(..., n, 1)``) or per column (``axis=0``: ``(..., 1, n)``).

    ``strip`` is the overscan region ``(..., h, w)``; the median averages the two middle values of an
    even count (numpy's median, as ccdproc).
    """
    dim = strip.dim() - 2 + axis
    if method == "median":
        return _median(strip, dim, keepdim=True)
    if method == "mean":
        return strip.mean(dim=dim, keepdim=True)
    raise ValueError(f"overscan method must be 'median' or 'mean', got {method!r}")


def subtract_overscan(image: Tensor, overscan: Section, trim: Optional[Section] = None,
                      method: str = "median") -> Tensor:
    """Subtract the overscan of ``overscan`` from ``image (..., H, W)`` and cut out ``trim`` (if given)."""
    ov = overscan_values(image[(..., *overscan.slices)], overscan_axis(overscan), method)
    out = image.to(torch.promote_types(image.dtype, torch.float32))
    if overscan_axis(overscan) == 1:  # a value per row of the strip
        full = out.new_zeros(out.shape[:-2] + (out.shape[-2], 1))
        full[..., overscan.rows[0]:overscan.rows[1], :] = ov
    else:
        full = out.new_zeros(out.shape[:-2] + (1, out.shape[-1]))
        full[..., :, overscan.cols[0]:overscan.cols[1]] = ov
    out = out - full
    return out[(..., *trim.slices)] if trim is not None else out


def _median(x: Tensor, dim: int, keepdim: bool = False) -> Tensor:
    """numpy's median (mean of the two middle values for an even count) of finite values."""
    n = x.shape[dim]
    lo = torch.kthvalue(x, (n + 1) // 2, dim=dim, keepdim=keepdim).values
    if n % 2:
        return lo
    hi = torch.kthvalue(x, n // 2 + 1, dim=dim, keepdim=keepdim).values
    return 0.5 * (lo + hi)


def _nanmedian_last(x: Tensor) -> Tensor:
    """numpy's nanmedian along the last dim (NaN where every value is NaN), from one sort.

    The frames lie along the last, contiguous dim, so the sort runs over short contiguous rows (much
    faster than ``kthvalue`` over dim 0); the two middle values are exact order statistics, as numpy's.
    """
    s = torch.sort(x, dim=-1).values  # NaN sort last
    m = x.shape[-1]
    if not bool(torch.isnan(s[..., -1]).any()):
        return s[..., (m - 1) // 2] if m % 2 else 0.5 * (s[..., m // 2 - 1] + s[..., m // 2])
    n = (~torch.isnan(s)).sum(-1, keepdim=True)
    lo = (n - 1).clamp(min=0) // 2
    hi = (n // 2).clamp(max=m - 1)
    med = 0.5 * (s.gather(-1, lo) + s.gather(-1, hi))
    return torch.where(n > 0, med, torch.full_like(med, float("nan")))[..., 0]


def _nanmedian0(x: Tensor) -> Tensor:
    """numpy's nanmedian along dim 0 (NaN where every value is NaN)."""
    return _nanmedian_last(x.movedim(0, -1).contiguous())


# ----------------------------------------------------------------------------------------------
# combination
# ----------------------------------------------------------------------------------------------
@dataclass
class Combined:
    """A combined image ``(H, W)``, its uncertainty (standard error), its mask (rejected everywhere)
    and the number of frames kept per pixel."""

    image: Tensor
    uncertainty: Tensor
    mask: Tensor
    n_used: Tensor


def combine_frames(stack: Tensor, mask: Optional[Tensor] = None, *, method: str = "median",
                   sigma_clip: bool = False, clip_low: float = 3.0, clip_high: float = 3.0,
                   clip_center: str = "mean", scale: Optional[Tensor] = None) -> Combined:
    """Combine ``stack (N, ..., H, W)`` over its first axis (see the module docstring).

    ``mask`` (bool, True = bad, same shape) excludes values; ``scale`` (N,) multiplies each frame first.
    """
    if stack.dim() < 3:
        raise ValueError(f"stack: expected (N, ..., H, W) with N frames, got shape {tuple(stack.shape)}")
    if method not in ("median", "mean"):
        raise ValueError(f"method must be 'median' or 'mean', got {method!r}")
    x = stack.to(torch.promote_types(stack.dtype, torch.float32))
    if scale is not None:
        x = x * torch.as_tensor(scale, dtype=x.dtype, device=x.device).reshape((-1,) + (1,) * (x.dim() - 1))
    if mask is not None:
        if mask.shape != stack.shape:
            raise ValueError(f"mask: expected the stack's shape {tuple(stack.shape)}, got {tuple(mask.shape)}")
        x = x.masked_fill(mask, float("nan"))
    x = x.movedim(0, -1).contiguous()  # frames along the last dim: contiguous reductions
    if sigma_clip:
        x = _clip_once(x, clip_low, clip_high, clip_center)
    n = (~torch.isnan(x)).sum(-1)
    if method == "median":
        image = _nanmedian_last(x)
        dev = MAD_TO_SIGMA * _nanmedian_last((x - image[..., None]).abs_())
    else:
        image = torch.nanmean(x, -1)
        dev = torch.sqrt(torch.nanmean((x - image[..., None]) ** 2, -1))
    unc = dev / n.clamp(min=1).to(x.dtype).sqrt()
    bad = n == 0
    return Combined(image=image.nan_to_num(0.0), uncertainty=unc.nan_to_num(0.0), mask=bad, n_used=n)


def _clip_once(x: Tensor, low: float, high: float, center: str) -> Tensor:
    """One pass of sigma clipping along the last dim (astropy ``sigma_clip(maxiters=1)``, ddof 0)."""
    mean = torch.nanmean(x, -1, keepdim=True)
    cen = _nanmedian_last(x)[..., None] if center == "median" else mean
    std = torch.sqrt(torch.nanmean((x - mean) ** 2, -1, keepdim=True))
    out = (x < cen - low * std) | (x > cen + high * std)
    return x.masked_fill(out, float("nan"))


# ----------------------------------------------------------------------------------------------
# raw files, read lazily
# ----------------------------------------------------------------------------------------------
def header_value(header, keys: Sequence[str], given=None, name: str = "value") -> Optional[float]:
    """``given`` when not None, else the first of ``keys`` present in ``header`` (None if none)."""
    if given is not None:
        return float(given)
    for k in keys:
        if header is not None and k in header and header[k] not in (None, ""):
            try:
                return float(header[k])
            except (TypeError, ValueError):
                raise ValueError(f"{name}: header keyword {k}={header[k]!r} is not a number") from None
    return None


class RawFile:
    """A raw frame on disk: its header, sections and exposure time; rows read on demand.

    ``rows(r0, r1)`` returns trimmed rows ``[r0, r1)`` (numpy, float32 for raw integers up to 16 bits,
    overscan subtracted) without reading the rest of the file (plain reads at the data's offset, the
    file held open until :meth:`close`).
    """

    def __init__(self, path: PathLike, *, hdu=None, overscan: Optional[str] = None, trim: Optional[str] = None,
                 overscan_method: str = "median", exptime: Optional[float] = None):
        from astropy.io import fits

        from .io import _image_shape

        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"calibration input: no such file {self.path}")
        with fits.open(self.path, memmap=True) as hdul:
            idx = hdu if hdu is not None else next((i for i, h in enumerate(hdul) if _image_shape(h) and len(_image_shape(h)) == 2), None)
            if idx is None:
                raise ValueError(f"{self.path}: no 2-D image HDU")
            self.hdu = idx
            self.header = hdul[idx].header.copy()
        self.raw_shape = (int(self.header["NAXIS2"]), int(self.header["NAXIS1"]))
        self.overscan, self.trim = frame_sections(self.header, self.raw_shape, overscan=overscan, trim=trim)
        self.overscan_method = overscan_method
        self.exptime = header_value(self.header, ("EXPTIME", "EXPOSURE", "ITIME"), exptime, "exptime")
        self._oscan: Optional[np.ndarray] = None
        self._hdul = None
        self._fh = None

    @property
    def shape(self) -> tuple:
        return self.trim.shape if self.trim is not None else self.raw_shape

    def _hdu(self):
        """The image HDU (header only: the data are read by :meth:`_raw_rows`), the file kept open until
        :meth:`close`, so reading rows block by block does not reopen the file for every block."""
        from astropy.io import fits

        if self._hdul is None:
            # integer raw data (uint16 as int16 + BZERO) is scaled in _read
            self._hdul = fits.open(self.path, memmap=True, do_not_scale_image_data=True)
        return self._hdul[self.hdu]

    def close(self) -> None:
        """Close the file (reopened on the next read)."""
        if self._hdul is not None:
            self._hdul.close()
            self._hdul = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def _raw_rows(self, h, rows: slice, cols: slice) -> np.ndarray:
        """The stored values of ``[rows, cols]`` read from the file (whole rows at the data's offset),
        not memory-mapped: a memory map would keep every page read resident in this process."""
        bitpix = int(h.header["BITPIX"])
        dtype = np.dtype({8: "u1", 16: ">i2", 32: ">i4", 64: ">i8", -32: ">f4", -64: ">f8"}[bitpix])
        r0, r1, _ = rows.indices(self.raw_shape[0])
        w = self.raw_shape[1]
        if self._fh is None:
            self._fh = open(self.path, "rb")
        self._fh.seek(int(self._hdul.fileinfo(self.hdu)["datLoc"]) + r0 * w * dtype.itemsize)
        data = np.fromfile(self._fh, dtype=dtype, count=max(0, r1 - r0) * w).reshape(-1, w)
        return data[:, cols].astype(dtype.newbyteorder("="), copy=False)

    def _read(self, rows: slice, cols: slice) -> np.ndarray:
        """Raw values of ``[rows, cols]`` in ADU: float32 for integers up to 16 bits and float32 files
        (exact), float64 for wider ones; BSCALE/BZERO applied, BLANK as NaN."""
        from astropy.io import fits

        h = self._hdu()
        if isinstance(h, fits.CompImageHDU):
            return self._read_scaled(rows, cols)
        raw = self._raw_rows(h, rows, cols)
        if not np.issubdtype(raw.dtype, np.integer):
            return raw.astype(np.result_type(raw.dtype, np.float32))
        scale, zero = float(h.header.get("BSCALE", 1.0)), float(h.header.get("BZERO", 0.0))
        exact32 = raw.dtype.itemsize <= 2 and scale == 1.0 and zero.is_integer()  # e.g. uint16 as int16 + 32768
        data = raw.astype(np.float32 if exact32 else np.float64)
        if scale != 1.0:
            data *= scale
        if zero != 0.0:
            data += zero
        if "BLANK" in h.header:
            data[raw == int(h.header["BLANK"])] = np.nan
        return data

    def _read_scaled(self, rows: slice, cols: slice):
        from astropy.io import fits

        with fits.open(self.path) as hdul:
            return np.array(hdul[self.hdu].section[rows, cols], dtype=np.float64)

    def _overscan_full(self) -> np.ndarray:
        """The overscan value per raw row (H, 1) or per raw column (1, W), zero outside the strip."""
        if self._oscan is None:
            o = self.overscan
            vals = overscan_values(torch.from_numpy(self._read(*o.slices)), overscan_axis(o), self.overscan_method).numpy()
            h, w = self.raw_shape
            if overscan_axis(o) == 1:
                full = np.zeros((h, 1), vals.dtype)
                full[o.rows[0]:o.rows[1]] = vals
            else:
                full = np.zeros((1, w), vals.dtype)
                full[:, o.cols[0]:o.cols[1]] = vals
            self._oscan = full
        return self._oscan

    def rows(self, r0: int, r1: int) -> np.ndarray:
        y0, x0 = (self.trim.rows[0], self.trim.cols[0]) if self.trim is not None else (0, 0)
        x1 = self.trim.cols[1] if self.trim is not None else self.raw_shape[1]
        data = self._read(slice(y0 + r0, y0 + r1), slice(x0, x1))
        if self.overscan is not None:
            ov = self._overscan_full()
            data = data - (ov[y0 + r0:y0 + r1] if ov.shape[1] == 1 else ov[:, x0:x1])
        return data

    def read(self) -> np.ndarray:
        return self.rows(0, self.shape[0])


# ----------------------------------------------------------------------------------------------
# masters
# ----------------------------------------------------------------------------------------------
@dataclass
class Master:
    """A master calibration frame ``(H, W)`` with its uncertainty, mask, exposure time and provenance."""

    kind: str
    image: Tensor
    uncertainty: Tensor
    mask: Tensor
    exptime: Optional[float] = None
    n_frames: int = 0
    sources: list = field(default_factory=list)
    header: object = None

    def write(self, path: PathLike) -> Path:
        """Write as FITS: primary = image, extensions UNCERT and MASK (uint8)."""
        from astropy.io import fits

        hdr = fits.Header()
        hdr["IMAGETYP"] = (f"master {self.kind}", "astroprep_torch.calibrate")
        hdr["NCOMBINE"] = (self.n_frames, "frames combined")
        if self.exptime is not None:
            hdr["EXPTIME"] = self.exptime
        for s in self.sources[:50]:
            hdr.add_history(f"combined {Path(s).name}")
        hdul = fits.HDUList([fits.PrimaryHDU(self.image.cpu().numpy().astype(np.float32), hdr),
                             fits.ImageHDU(self.uncertainty.cpu().numpy().astype(np.float32), name="UNCERT"),
                             fits.ImageHDU(self.mask.cpu().numpy().astype(np.uint8), name="MASK")])
        path = Path(path)
        hdul.writeto(path, overwrite=True)
        return path

    @classmethod
    def read(cls, path: PathLike, kind: str) -> "Master":
        from astropy.io import fits

        with fits.open(path) as hdul:
            image = torch.from_numpy(np.asarray(hdul[0].data, dtype=np.float64))
            unc = torch.from_numpy(np.asarray(hdul["UNCERT"].data, dtype=np.float64)) if "UNCERT" in hdul else torch.zeros_like(image)
            mask = torch.from_numpy(np.asarray(hdul["MASK"].data).astype(bool)) if "MASK" in hdul else torch.zeros_like(image, dtype=torch.bool)
            hdr = hdul[0].header
        return cls(kind, image, unc, mask, exptime=header_value(hdr, ("EXPTIME",)), n_frames=int(hdr.get("NCOMBINE", 0)),
                   sources=[str(path)], header=hdr)


def _rows_per_block(n_files: int, width: int, memory_mb: float, itemsize: int = 4) -> int:
    # the block, its frames-last copy, the sort's values and int64 indices, the deviations and their sort
    return max(1, int(memory_mb * 2**20 / (n_files * width * itemsize * 9)))


def combine_files(files: Sequence[RawFile], *, method: str = "median", sigma_clip: bool = False,
                  clip_low: float = 3.0, clip_high: float = 3.0, clip_center: str = "mean",
                  subtract=None, scale: Optional[Sequence[float]] = None, memory_mb: float = 512.0,
                  dtype: torch.dtype = torch.float32) -> Combined:
    """Combine raw files block of rows by block of rows (at most ~``memory_mb`` MB at once).

    ``subtract(i, r0, r1)`` returns what to subtract from file ``i``'s rows (e.g. the master bias);
    ``scale`` (per file) multiplies each file after that. Every file stays open (read in place) for
    the whole combination and each block is read once; the results go into preallocated outputs.
    ``dtype`` (float32 by default: raw ADU and calibrated values agree with float64 within ~1e-7
    relative) is that of the block and the outputs.
    """
    if not files:
        raise ValueError("combine_files: no files to combine")
    shape = files[0].shape
    for f in files:
        if f.shape != shape:
            raise ValueError(f"combine_files: {f.path} has trimmed shape {f.shape}, expected {shape} as {files[0].path}")
    h, w = shape
    itemsize = torch.empty((), dtype=dtype).element_size()
    step = _rows_per_block(len(files), w, memory_mb, itemsize)
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    out = Combined(image=torch.empty(h, w, dtype=dtype), uncertainty=torch.empty(h, w, dtype=dtype),
                   mask=torch.empty(h, w, dtype=torch.bool), n_used=torch.empty(h, w, dtype=torch.int64))
    scale_t = None if scale is None else torch.as_tensor(scale, dtype=dtype)
    try:
        for r0 in range(0, h, step):
            r1 = min(h, r0 + step)
            block = np.empty((len(files), r1 - r0, w), np_dtype)
            for i, f in enumerate(files):
                block[i] = f.rows(r0, r1)
                if subtract:
                    block[i] -= subtract(i, r0, r1)
            c = combine_frames(torch.from_numpy(block), method=method, sigma_clip=sigma_clip, clip_low=clip_low,
                               clip_high=clip_high, clip_center=clip_center, scale=scale_t)
            del block
            for k in ("image", "uncertainty", "mask", "n_used"):
                getattr(out, k)[r0:r1] = getattr(c, k)
    finally:
        for f in files:
            f.close()
    return out


def _raw_files(paths, **kw) -> list:
    from .data import resolve_inputs

    paths = resolve_inputs(paths) if isinstance(paths, (str, Path)) else [Path(p) for p in paths]
    if not paths:
        raise FileNotFoundError("calibration input: no FITS files given")
    return [RawFile(p, **kw) for p in paths]


def master_bias(paths, *, method: str = "median", sigma_clip: bool = False, memory_mb: float = 512.0,
                raw_kwargs: Optional[dict] = None, **clip) -> Master:
    """Master bias from bias frames (overscan-subtracted and trimmed first when sections are set)."""
    files = _raw_files(paths, **(raw_kwargs or {}))
    c = combine_files(files, method=method, sigma_clip=sigma_clip, memory_mb=memory_mb, **clip)
    return Master("bias", c.image, c.uncertainty, c.mask, 0.0, len(files), [str(f.path) for f in files])


def master_dark(paths, bias: Optional[Master] = None, *, method: str = "median", sigma_clip: bool = False,
                memory_mb: float = 512.0, raw_kwargs: Optional[dict] = None, **clip) -> Master:
    """Master dark (ADU at the darks' exposure time, which must agree) from bias-subtracted darks."""
    files = _raw_files(paths, **(raw_kwargs or {}))
    times = {f.exptime for f in files}
    if len(times) != 1 or None in times:
        raise ValueError(f"dark: the dark frames must share one exposure time (EXPTIME), got {sorted(map(str, times))}")
    sub = None if bias is None else (lambda i, r0, r1: bias.image[r0:r1].numpy())
    c = combine_files(files, method=method, sigma_clip=sigma_clip, subtract=sub, memory_mb=memory_mb, **clip)
    return Master("dark", c.image, c.uncertainty, c.mask, times.pop(), len(files), [str(f.path) for f in files])


def master_flat(paths, bias: Optional[Master] = None, dark: Optional[Master] = None, *, method: str = "median",
                sigma_clip: bool = False, memory_mb: float = 512.0, raw_kwargs: Optional[dict] = None,
                **clip) -> Master:
    """Master flat (mean 1 over its good pixels) from bias/dark-subtracted flats scaled by 1/median."""
    files = _raw_files(paths, **(raw_kwargs or {}))

    def sub(i, r0, r1):
        out = 0.0 if bias is None else bias.image[r0:r1].numpy()
        if dark is not None:
            out = out + dark.image[r0:r1].numpy() * _dark_scale(files[i].exptime, dark)
        return out

    medians = [float(np.median(f.read() - sub(i, 0, f.shape[0]))) for i, f in enumerate(files)]
    if min(medians) <= 0:
        raise ValueError(f"flat: a flat frame has median <= 0 after bias/dark subtraction ({files[int(np.argmin(medians))].path})")
    c = combine_files(files, method=method, sigma_clip=sigma_clip, subtract=sub, scale=[1.0 / m for m in medians],
                      memory_mb=memory_mb, **clip)
    norm = c.image[~c.mask].mean() if bool((~c.mask).any()) else c.image.new_tensor(1.0)
    return Master("flat", c.image / norm, c.uncertainty / norm, c.mask, None, len(files), [str(f.path) for f in files])


def _dark_scale(exptime: Optional[float], dark: Master) -> float:
    if exptime is None or not dark.exptime:
        raise ValueError("exptime: dark scaling needs the frame's and the darks' exposure times (EXPTIME)")
    return float(exptime) / float(dark.exptime)


def bad_pixel_map(bias: Optional[Master] = None, dark: Optional[Master] = None, flat: Optional[Master] = None, *,
                  hot_sigma: float = 5.0, bias_sigma: float = 10.0, flat_low: float = 0.2,
                  flat_high: float = 2.0) -> Optional[Tensor]:
    """Bad pixels (True) from the masters: see the module docstring. None without masters."""
    bad = None

    def add(m: Tensor):
        nonlocal bad
        bad = m if bad is None else bad | m

    for m, k in ((bias, bias_sigma), (dark, hot_sigma)):
        if m is not None:
            med = m.image.median()
            sig = mad_std(m.image, center=med)
            add(m.mask | ((m.image - med) > k * sig.clamp(min=1e-12)))
    if flat is not None:
        add(flat.mask | (flat.image < flat_low) | (flat.image > flat_high))
    return bad


# ----------------------------------------------------------------------------------------------
# saturation and bleed trails
# ----------------------------------------------------------------------------------------------
def _levels(level, image: Tensor) -> Tensor:
    """Per-image levels (B, 1, 1, 1); a level <= 0, NaN or None means no saturation (inf)."""
    b = image.shape[0]
    if level is None:
        lv = torch.full((b,), float("inf"), dtype=image.dtype, device=image.device)
    else:
        lv = torch.as_tensor(level, dtype=image.dtype, device=image.device).reshape(-1).expand(b).clone()
    lv = torch.where(torch.isfinite(lv) & (lv > 0), lv, torch.full_like(lv, float("inf")))
    return lv.reshape(b, 1, 1, 1)


def saturation_mask(image: Tensor, level, *, grow: int = 2, bleed_axis: Optional[int] = 0,
                    bleed_fraction: float = 0.5) -> Tensor:
    """Saturated pixels of ``image (B, 1, H, W)``, their bleed trails and a ``grow``-pixel margin.

    ``level``: a float or one per image (B,), in the image's units; None, <= 0 or NaN = none.
    ``bleed_axis``: the readout axis along which charge bleeds (0 = along columns, i.e. up and down
    the rows; 1 = along rows; None = no bleed search): pixels at or above ``bleed_fraction * level``
    joined to a saturated pixel along that axis without a gap are masked too. ``grow``: the mask is
    dilated by a square of half size ``grow`` pixels. Returns bool (B, 1, H, W), True = saturated.
    """
    from ._checks import check_image

    check_image(image, "image", channels=1)
    lv = _levels(level, image)
    core = image >= lv
    if bleed_axis is not None:
        if bleed_axis not in (0, 1):
            raise ValueError(f"bleed_axis must be 0 (columns), 1 (rows) or None, got {bleed_axis!r}")
        if bool(core.any()):  # no saturated pixel: no trail to follow
            core = _bleed(core, image >= bleed_fraction * lv, dim=2 + bleed_axis)
    return grow_mask(core, int(grow))


def _bleed(core: Tensor, above: Tensor, dim: int) -> Tensor:
    """Pixels of ``above`` joined to a ``core`` pixel along ``dim`` by a run of ``above`` pixels."""
    def forward(c: Tensor, a: Tensor) -> Tensor:
        n = c.shape[dim]
        idx = torch.arange(n, device=c.device).reshape([-1 if d == dim else 1 for d in range(c.dim())])
        last_gap = torch.cummax(torch.where(~a, idx, torch.full_like(idx, -1)).expand(c.shape), dim).values
        last_core = torch.cummax(torch.where(c, idx, torch.full_like(idx, -1)).expand(c.shape), dim).values
        return a & (last_core > last_gap)

    fwd = forward(core, above)
    bwd = forward(core.flip(dim), above.flip(dim)).flip(dim)
    return core | fwd | bwd


class GrowUnion(nn.Module):
    """``forward(a, b=None) -> a | grow_mask(b, radius)``: e.g. the difference image's mask, the
    template's saturated pixels spread by the convolution kernel (HOTPANTS' output mask) joined to
    the science mask."""

    def __init__(self, radius: int = 10):
        super().__init__()
        self.radius = int(radius)

    def forward(self, a: Tensor, b: Optional[Tensor] = None) -> Tensor:
        return a if b is None else a | grow_mask(b.expand(a.shape), self.radius)


def header_saturation(headers, like: Optional[Tensor] = None) -> Tensor:
    """The saturation level (``SATURATE``, ``SATLEVEL``, ``SATURATN``) of each header as a (B,) tensor;
    NaN where a header has none (no saturation masking for that frame)."""
    vals = []
    for h in headers:
        try:
            v = header_value(h, SATURATION_KEYS)
        except ValueError:
            v = None
        vals.append(float("nan") if v is None else v)
    kw = {"dtype": like.dtype, "device": like.device} if like is not None else {"dtype": torch.float32}
    return torch.tensor(vals, **kw)


class SaturationMasks(NamedTuple):
    """``mask``: the input mask or'ed with ``saturated`` (what later stages should ignore);
    ``saturated``: the saturation and bleed-trail mask alone (for SExtractor's FLAGS bit 4)."""

    mask: Tensor
    saturated: Tensor


class SaturationMask(nn.Module):
    """``forward(image, mask=None, level=None) -> SaturationMasks(mask | saturated, saturated)``.

    ``level`` (per image, e.g. the headers' ``SATURATE``; NaN or <= 0 = none) wins over the
    constructor's ``level``; see :func:`saturation_mask` for ``grow``, ``bleed_axis`` and
    ``bleed_fraction``. ``enabled=False`` returns the mask unchanged and an empty saturation mask.
    """

    def __init__(self, level: Optional[float] = None, grow: int = 2, bleed_axis: Optional[int] = 0,
                 bleed_fraction: float = 0.5, enabled: bool = True):
        super().__init__()
        self.level, self.grow, self.bleed_axis = level, int(grow), bleed_axis
        self.bleed_fraction, self.enabled = float(bleed_fraction), bool(enabled)

    def forward(self, image: Tensor, mask: Optional[Tensor] = None, level=None) -> SaturationMasks:
        base = mask if mask is not None else torch.zeros_like(image, dtype=torch.bool)
        lv = level if level is not None else self.level
        if not self.enabled or lv is None:
            return SaturationMasks(base, torch.zeros_like(base))
        sat = saturation_mask(image, lv, grow=self.grow, bleed_axis=self.bleed_axis,
                              bleed_fraction=self.bleed_fraction)
        return SaturationMasks(base | sat, sat)


# ----------------------------------------------------------------------------------------------
# applying the masters
# ----------------------------------------------------------------------------------------------
@dataclass
class Calibrated:
    """Calibrated frames ``(B, 1, H, W)`` in ADU, their variance (ADU^2), bad-pixel mask, saturation
    mask (computed on the raw values) and the saturation level in calibrated units (B,)."""

    image: Tensor
    variance: Tensor
    mask: Tensor
    saturated: Tensor
    saturation: Tensor


def _as_map(m, like: Tensor) -> Optional[Tensor]:
    if m is None:
        return None
    t = m.image if isinstance(m, Master) else torch.as_tensor(m)
    return t.to(device=like.device, dtype=like.dtype).reshape(1, 1, *t.shape[-2:])


def _unc(m, like: Tensor) -> Optional[Tensor]:
    return _as_map(m.uncertainty, like) if isinstance(m, Master) else None


def calibrate_frames(data: Tensor, *, bias=None, dark=None, flat=None, exptime=None, dark_exptime=None,
                     gain: float = 1.0, read_noise: float = 0.0, bad: Optional[Tensor] = None,
                     raw_offset=None, saturation=None, saturation_kwargs: Optional[dict] = None) -> Calibrated:
    """Calibrate overscan-subtracted, trimmed frames ``data (B, 1, H, W)`` (see the module docstring).

    ``bias``/``dark``/``flat``: :class:`Master` or ``(H, W)`` tensors (a flat is used as given: pass a
    normalised one); ``exptime`` (float or (B,)) and ``dark_exptime`` scale the dark (a Master dark
    carries its own). ``raw_offset`` is what was subtracted from the raw values before (the overscan,
    broadcastable to ``data``) so that ``saturation`` (raw ADU, float or (B,)) applies to the raw
    values; the mask of :func:`saturation_mask` (``saturation_kwargs``) is returned beside the frame.
    """
    from ._checks import check_image

    check_image(data, "data", channels=1)
    x = data.to(torch.promote_types(data.dtype, torch.float32))
    b = x.shape[0]
    zero = x.new_zeros(())
    raw = x + (zero if raw_offset is None else torch.as_tensor(raw_offset, dtype=x.dtype, device=x.device))
    sat = saturation_mask(raw, saturation, **(saturation_kwargs or {}))
    offset = x.new_zeros((1, 1, 1, 1))
    extra_var = x.new_zeros((1, 1, 1, 1))
    if bias is not None:
        offset = offset + _as_map(bias, x)
        if _unc(bias, x) is not None:
            extra_var = extra_var + _unc(bias, x) ** 2
    if dark is not None:
        t_dark = dark.exptime if isinstance(dark, Master) and dark_exptime is None else dark_exptime
        if exptime is None or not t_dark:
            raise ValueError("exptime: subtracting a dark needs the frames' exposure time and the dark's (EXPTIME)")
        s = (torch.as_tensor(exptime, dtype=x.dtype, device=x.device).reshape(-1).expand(b) / float(t_dark)).reshape(b, 1, 1, 1)
        offset = offset + s * _as_map(dark, x)
        if _unc(dark, x) is not None:
            extra_var = extra_var + (s * _unc(dark, x)) ** 2
    signal = x - offset
    var = signal.clamp(min=0) / float(gain) + (float(read_noise) / float(gain)) ** 2 + extra_var
    image = signal
    if flat is not None:
        f = _as_map(flat, x)
        image = signal / f
        var = var / f**2
        if _unc(flat, x) is not None:
            var = var + image**2 * (_unc(flat, x) / f) ** 2
    mask = torch.zeros_like(image, dtype=torch.bool) if bad is None else bad.to(x.device).reshape(1, 1, *bad.shape[-2:]).expand(image.shape).clone()
    level = _calibrated_level(saturation, raw - x, offset, flat, x, mask)
    return Calibrated(image=image, variance=var, mask=mask, saturated=sat, saturation=level)


def _calibrated_level(saturation, raw_offset: Tensor, offset: Tensor, flat, x: Tensor, bad: Tensor) -> Tensor:
    """The lowest calibrated value any good pixel saturates at, per frame (inf: no saturation level)."""
    lv = _levels(saturation, x)
    if not bool(torch.isfinite(lv).any()):
        return lv.reshape(-1)
    cal = (lv - raw_offset - offset).expand(x.shape)
    if flat is not None:
        cal = cal / _as_map(flat, x)
    cal = cal.masked_fill(bad, float("inf"))
    return cal.reshape(x.shape[0], -1).amin(1)


class CCDCalibration(nn.Module):
    """Overscan, trim, bias, dark and flat on batches of raw frames ``(B, 1, H_raw, W_raw)``.

    Holds the masters (:class:`Master` or tensors, trimmed shape), the sections (FITS text, e.g. from
    ``BIASSEC``/``TRIMSEC``), ``gain`` (e-/ADU) and ``read_noise`` (e-) (None: taken per file from the
    header by :func:`calibrate_files`, else 1 and 0) and the bad-pixel map (from the masters by
    default: :func:`bad_pixel_map`). ``forward(raw, exptime=None, saturation=None, **overrides)``
    returns :class:`Calibrated`; ``overrides`` (``gain``, ``read_noise``, ``overscan``, ``trim``) win
    over the module's values for that call.
    """

    def __init__(self, bias=None, dark=None, flat=None, *, overscan: Optional[str] = None, trim: Optional[str] = None,
                 overscan_method: str = "median", gain: Optional[float] = None, read_noise: Optional[float] = None,
                 bad=True, bad_kwargs: Optional[dict] = None, saturation_kwargs: Optional[dict] = None):
        super().__init__()
        self.bias, self.dark, self.flat = bias, dark, flat
        self.overscan, self.trim, self.overscan_method = overscan, trim, overscan_method
        self.gain = None if gain is None else float(gain)
        self.read_noise = None if read_noise is None else float(read_noise)
        if bad is True:
            bad = bad_pixel_map(*(m if isinstance(m, Master) else None for m in (bias, dark, flat)), **(bad_kwargs or {}))
        self.bad = bad if isinstance(bad, Tensor) else None
        self.saturation_kwargs = dict(saturation_kwargs or {})

    def forward(self, raw: Tensor, exptime=None, saturation=None, *, gain: Optional[float] = None,
                read_noise: Optional[float] = None, overscan: Optional[str] = None,
                trim: Optional[str] = None) -> Calibrated:
        from ._checks import check_image

        check_image(raw, "raw", channels=1)
        x = raw.to(torch.promote_types(raw.dtype, torch.float32))
        osec, tsec = frame_sections(None, x.shape[-2:], overscan=overscan or self.overscan, trim=trim or self.trim)
        data = x if osec is None else subtract_overscan(x, osec, None, self.overscan_method)
        if tsec is not None:
            data, x = data[(..., *tsec.slices)], x[(..., *tsec.slices)]
        g = gain if gain is not None else (self.gain if self.gain is not None else 1.0)
        rn = read_noise if read_noise is not None else (self.read_noise if self.read_noise is not None else 0.0)
        return calibrate_frames(data, bias=self.bias, dark=self.dark, flat=self.flat, exptime=exptime,
                                gain=g, read_noise=rn, bad=self.bad, raw_offset=x - data,
                                saturation=saturation, saturation_kwargs=self.saturation_kwargs)


# ----------------------------------------------------------------------------------------------
# files and the command
# ----------------------------------------------------------------------------------------------
def _calibrated_header(header, f: RawFile, cal: CCDCalibration, level: float, names: dict, gain: float,
                       read_noise: float):
    """The raw header with what was applied recorded (see the module docstring)."""
    hdr = header.copy()
    for k in ("BZERO", "BSCALE", "BLANK"):  # the output is float
        hdr.remove(k, ignore_missing=True)
    stamp = "astroprep_torch.calibrate"
    if f.overscan is not None:
        hdr["OVERSCAN"] = (f"{format_section(f.overscan)} {f.overscan_method}", "overscan subtracted")
        hdr.add_history(f"{stamp}: overscan {format_section(f.overscan)} ({f.overscan_method}) subtracted")
    if f.trim is not None:
        y0, x0 = f.trim.rows[0], f.trim.cols[0]
        hdr["TRIM"] = (format_section(f.trim), "trimmed section of the raw frame")
        hdr["LTV1"], hdr["LTV2"] = float(hdr.get("LTV1", 0.0)) - x0, float(hdr.get("LTV2", 0.0)) - y0
        for k, d in (("CRPIX1", x0), ("CRPIX2", y0)):
            if k in hdr:
                hdr[k] = float(hdr[k]) - d
        hdr["DATASEC"] = f"[1:{f.trim.shape[1]},1:{f.trim.shape[0]}]"
        for k in ("BIASSEC", "TRIMSEC"):
            hdr.remove(k, ignore_missing=True)
        hdr.add_history(f"{stamp}: trimmed to {format_section(f.trim)}")
    for key, kind in (("BIASCORR", "bias"), ("DARKCORR", "dark"), ("FLATCORR", "flat")):
        if getattr(cal, kind) is not None:
            hdr[key] = (names.get(kind, "T")[:60], f"master {kind} applied")
            hdr.add_history(f"{stamp}: {kind} corrected with {names.get(kind, 'a master ' + kind)}")
    if cal.bad is not None:
        hdr["BPMCORR"] = (int(cal.bad.sum()), "bad pixels from the masters (filled or NaN)")
    if math.isfinite(level):
        hdr["SATURATE"] = (level, "lowest calibrated saturated level, ADU")
    hdr["GAIN"], hdr["RDNOISE"] = (gain, "e-/ADU"), (read_noise, "read noise, e-")
    hdr["BUNIT"] = "ADU"
    return hdr


def fill_bad_pixels(image: Tensor, bad: Tensor, size: int = 5) -> Tensor:
    """``image (B, 1, H, W)`` with ``bad`` pixels replaced by the mean of the good pixels of the
    ``size`` x ``size`` box around them (IRAF ``fixpix``-like; a box with no good pixel gives 0)."""
    if not bool(bad.any()):
        return image
    good = (~bad).to(image.dtype)
    pad = size // 2
    s = F.avg_pool2d(torch.where(bad, torch.zeros_like(image), image), size, 1, pad, count_include_pad=False)
    n = F.avg_pool2d(good, size, 1, pad, count_include_pad=False)
    return torch.where(bad, s / n.clamp(min=1e-12) * (n > 0), image)


def calibrate_files(paths, output: PathLike, calibration: CCDCalibration, *, raw_kwargs: Optional[dict] = None,
                    saturation: Optional[float] = None, write_variance: bool = True, bad_value="interpolate",
                    names: Optional[dict] = None, suffix: str = ".cal.fits") -> list:
    """Calibrate raw FITS files one at a time into ``output``; returns the written paths.

    Bad pixels (from the masters) are filled from their neighbours (``bad_value="interpolate"``,
    :func:`fill_bad_pixels`; their variance is set to infinity) or written as ``bad_value`` (e.g. NaN,
    which the readers then mask: the subtraction spreads a masked template pixel over the kernel's
    footprint). The variance goes to ``<name>.var.fits`` when ``write_variance``.
    """
    from .io import write_fits

    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for f in _raw_files(paths, **(raw_kwargs or {})):
        raw = torch.from_numpy(f._read(slice(None), slice(None)))[None, None]
        f.close()
        level = header_value(f.header, SATURATION_KEYS, saturation, "saturation")
        gain = calibration.gain if calibration.gain is not None else header_value(f.header, GAIN_KEYS, None, "gain") or 1.0
        rn = (calibration.read_noise if calibration.read_noise is not None
              else header_value(f.header, READ_NOISE_KEYS, None, "read_noise") or 0.0)
        res = calibration(raw, exptime=f.exptime, saturation=level, gain=gain, read_noise=rn,
                          overscan=format_section(f.overscan) if f.overscan is not None else None,
                          trim=format_section(f.trim) if f.trim is not None else None)
        if bad_value == "interpolate":
            image = fill_bad_pixels(res.image, res.mask)
            res.variance = res.variance.masked_fill(res.mask, float("inf"))
        else:
            image = res.image.masked_fill(res.mask, float(bad_value)) if res.mask.any() else res.image
        hdr = _calibrated_header(f.header, f, calibration, float(res.saturation[0]), names or {}, gain, rn)
        stem = f.path.name.split(".fits")[0]
        path = out_dir / f"{stem}{suffix}"
        write_fits(path, image.float(), header=hdr, overwrite=True)
        if write_variance:
            write_fits(out_dir / f"{stem}.var.fits", res.variance.float(), header=hdr, overwrite=True)
        written.append(path)
    return written


def _opt(cfg, key, default=None):
    v = cfg.get(key, default) if hasattr(cfg, "get") else default
    return default if v in (None, "", []) else v


def calibrate_from_config(cfg, inputs=None, output: Optional[PathLike] = None) -> list:
    """Build the masters from ``cfg.bias`` / ``cfg.dark`` / ``cfg.flat`` and calibrate ``inputs``
    (default ``cfg.input``) into ``output`` (default ``cfg.output``); ``cfg.calibrate`` holds the
    options (configs/calibrate/default.yaml). Returns the calibrated paths; masters are written
    beside them (``master_bias.fits`` ...). Used by ``astroprep calibrate``, ``run`` and ``night``.
    """
    c = cfg.get("calibrate") or {}
    out_dir = Path(output if output is not None else cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    raw_kwargs = {"overscan": _opt(c, "overscan"), "trim": _opt(c, "trim"), "overscan_method": _opt(c, "overscan_method", "median")}
    comb = {"method": _opt(c, "method", "median"), "sigma_clip": bool(_opt(c, "sigma_clip", False)),
            "clip_low": float(_opt(c, "clip_low", 3.0)), "clip_high": float(_opt(c, "clip_high", 3.0)),
            "memory_mb": float(_opt(c, "memory_mb", 512.0)), "raw_kwargs": raw_kwargs}
    bias = master_bias(cfg.bias, **comb) if _opt(cfg, "bias") else None
    dark = master_dark(cfg.dark, bias, **comb) if _opt(cfg, "dark") else None
    flat = master_flat(cfg.flat, bias, dark, **comb) if _opt(cfg, "flat") else None
    names = {}
    for m in (bias, dark, flat):
        if m is not None:
            names[m.kind] = m.write(out_dir / f"master_{m.kind}.fits").name
    cal = CCDCalibration(bias, dark, flat, overscan=raw_kwargs["overscan"], trim=raw_kwargs["trim"],
                         overscan_method=raw_kwargs["overscan_method"], gain=_opt(c, "gain"),
                         read_noise=_opt(c, "read_noise"), bad=bool(_opt(c, "bad_pixels", True)),
                         bad_kwargs=dict(_opt(c, "bad_pixel_options", {}) or {}),
                         saturation_kwargs=dict(_opt(c, "saturation_options", {}) or {}))
    inputs = inputs if inputs is not None else cfg.input
    if not inputs:
        raise ValueError("input: no raw science frames to calibrate (input=<files>)")
    return calibrate_files(inputs if isinstance(inputs, (str, Path)) else list(inputs), out_dir, cal,
                           raw_kwargs=raw_kwargs, saturation=_opt(c, "saturation"),
                           write_variance=bool(_opt(c, "write_variance", True)), names=names,
                           bad_value=_opt(c, "bad_pixel_fill", "interpolate"))
