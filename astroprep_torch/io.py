"""FITS <-> tensors (astropy.io.fits underneath).

* :func:`read_fits` reads one 2-D image HDU into a ``(1, 1, H, W)`` tensor with a bool mask
  (True where the pixel is NaN, infinite or equals the integer ``BLANK`` value), its header and its
  :class:`~astroprep_torch.wcs.TanWCS` (``None`` when the header has no celestial WCS; when it has one
  we do not support, e.g. SIN or a lookup-table distortion, the image is still read, ``wcs`` is
  ``None`` and a warning names the file and the reason).
* :func:`read_fits_batch` stacks same-shape frames into ``(B, 1, H, W)`` with a batched ``TanWCS``.
* :func:`write_fits` writes one image atomically (temporary file in the same folder, then
  ``os.replace``), with the WCS keys of a ``TanWCS`` (FITS 1-based ``CRPIX``).

Integer images are scaled here, not by astropy: the raw values are read with
``do_not_scale_image_data=True`` so that ``BLANK`` is detected on the raw integers, then
``BSCALE * raw + BZERO`` is computed in float64 (so uint16 stored as int16 + ``BZERO = 32768`` and
big-endian data come out right), then cast to ``dtype``. Tile-compressed HDUs (``CompImageHDU``) are
decompressed by astropy. The returned header is the file's own (it may still hold ``BZERO``/``BSCALE``
describing the raw integers; :func:`write_fits` drops such structural keys).
"""

from __future__ import annotations

import os
import re
import socket
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = ["FitsImage", "read_fits", "read_fits_batch", "write_fits"]

PathLike = Union[str, os.PathLike]

# Keywords describing the data layout or the WCS; dropped from a user header before writing.
_STRUCTURAL = ("SIMPLE", "BITPIX", "EXTEND", "XTENSION", "PCOUNT", "GCOUNT", "BZERO", "BSCALE", "BLANK",
               "CHECKSUM", "DATASUM", "ZIMAGE", "ZBITPIX", "ZCMPTYPE", "ZTENSION", "ZPCOUNT", "ZGCOUNT",
               "ZQUANTIZ", "ZDITHER0", "ZSIMPLE", "ZEXTEND", "ZBLANK", "ZSCALE", "ZZERO", "THEAP", "TFIELDS",
               "END")
_WCS_PREFIXES = ("CTYPE", "CRPIX", "CRVAL", "CDELT", "CROTA", "CUNIT", "CD1_", "CD2_", "PC1_", "PC2_", "PV1_",
                 "PV2_", "A_", "B_", "AP_", "BP_", "LONPOLE", "LATPOLE", "WCSAXES", "RADESYS", "RADECSYS",
                 "EQUINOX", "PC00", "CPDIS", "D2IM", "DP1", "DP2", "CPERR")


@dataclass
class FitsImage:
    """An image read from FITS.

    ``data`` (B, 1, H, W) float tensor (B = 1 for :func:`read_fits`); ``mask`` bool, same shape,
    True = bad (NaN, inf or BLANK); ``header`` the astropy ``Header`` (a list of them for a batch);
    ``wcs`` a :class:`~astroprep_torch.wcs.TanWCS` with B elements, or ``None``; ``path`` the file(s).
    """

    data: Tensor
    mask: Tensor
    header: object
    wcs: Optional[object]
    path: object = None


def _fits():
    from astropy.io import fits

    return fits


def _image_shape(hdu) -> Optional[tuple]:
    """Data shape (numpy order) of an image HDU from its header, or None if not an image with data."""
    fits = _fits()
    if not isinstance(hdu, (fits.PrimaryHDU, fits.ImageHDU, fits.CompImageHDU)) or isinstance(hdu, fits.GroupsHDU):
        return None
    h = hdu.header
    n = int(h.get("NAXIS", 0) or 0)
    if n == 0:
        return None
    shape = tuple(int(h.get(f"NAXIS{i}", 0) or 0) for i in range(n, 0, -1))
    if any(s == 0 for s in shape):
        return None
    return shape


def _is_2d(shape) -> bool:
    """2-D, or N-D whose extra (leading numpy) axes all have length 1."""
    return shape is not None and len(shape) >= 2 and all(s == 1 for s in shape[:-2])


def _describe(hdul) -> str:
    parts = []
    for i, h in enumerate(hdul):
        parts.append(f"{i}:{type(h).__name__}{_image_shape(h) or ''}")
    return ", ".join(parts)


def _split_warnings(caught) -> list:
    """Re-emit recorded warnings except astropy's truncation notice, whose texts are returned."""
    truncated = []
    for w in caught:
        if "truncated" in str(w.message).lower():
            truncated.append(str(w.message))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return truncated


def _check_read_args(path, hdu, dtype) -> Path:
    """Argument checks of :func:`read_fits`; returns ``path`` as a ``Path`` to an existing file."""
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch dtype, got {dtype!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a FITS file name (str or os.PathLike), got {type(path).__name__}")
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"FITS file not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"expected a FITS file, got a directory: {path}")
    if hdu is not None and not isinstance(hdu, (int, str)) or isinstance(hdu, bool):
        raise TypeError(f"hdu must be an HDU index (int), an EXTNAME (str) or None (the first image HDU), got {hdu!r}")
    return path


def _open_hdu_list(path: Path) -> tuple:
    """``(hdul, truncation warnings)``: the whole HDU list read (raw integers, not scaled); a file
    that is not FITS or is corrupt raises ``OSError`` naming it."""
    fits = _fits()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(path, memmap=False, do_not_scale_image_data=True)
        except PermissionError as exc:
            raise PermissionError(exc.errno, f"cannot read FITS file {path}: permission denied", str(path)) from None
        except Exception as exc:  # astropy raises OSError / ValueError / TypeError on garbage
            raise OSError(f"cannot read FITS file {path}: corrupt or not FITS ({exc})") from exc
        try:
            hdul.readall()
        except Exception as exc:
            hdul.close()
            raise OSError(f"cannot read FITS file {path}: corrupt or truncated HDU list ({exc})") from exc
    return hdul, _split_warnings(caught)


def _hdu_index(hdul, hdu, path: Path) -> int:
    """Index of the HDU asked for (``None``: the first with 2-D image data); ``ValueError`` listing
    the HDUs when there is none."""
    if hdu is not None:
        try:
            index = hdul.index_of(hdu)
            if not -len(hdul) <= index < len(hdul):
                raise IndexError(index)
        except (KeyError, IndexError) as exc:
            raise ValueError(f"{path}: HDU {hdu!r} not found (HDUs: {_describe(hdul)})") from exc
        return index
    index = next((i for i, h in enumerate(hdul) if _is_2d(_image_shape(h))), None)
    if index is None:
        any_image = [i for i, h in enumerate(hdul) if _image_shape(h) is not None]
        if any_image:
            i = any_image[0]
            raise ValueError(f"{path}: no 2-D image HDU; HDU {i} data of shape {_image_shape(hdul[i])} is not 2-D "
                             f"(HDUs: {_describe(hdul)})")
        raise ValueError(f"{path}: no HDU with image data (HDUs: {_describe(hdul)})")
    return index


def _read_hdu_data(h, index: int, path: Path, truncated: list) -> np.ndarray:
    """The HDU's raw data, read in full now (while the file can be named); a non-2-D shape raises
    ``ValueError``, a truncated or corrupt file ``OSError``."""
    shape = _image_shape(h)
    if shape is None:
        raise ValueError(f"{path}: HDU {index} ({type(h).__name__}) holds no image data")
    if not _is_2d(shape):
        raise ValueError(f"{path}: HDU {index} data of shape {shape} is not 2-D (only extra axes of length 1 "
                         "can be squeezed)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            raw = h.data
            if raw is not None:
                raw = np.array(raw)  # force a full read now, while we can name the file
        except Exception as exc:
            reason = "truncated" if truncated else "corrupt"
            raise OSError(f"cannot read data of HDU {index} in {path}: file {reason} ({exc})") from exc
    truncated = truncated + _split_warnings(caught)
    if truncated:
        raise OSError(f"{path}: file is truncated (HDU {index}): {truncated[0]}")
    if raw is None or raw.size != int(np.prod(shape)):
        raise OSError(f"{path}: HDU {index} data is missing or truncated (expected shape {shape})")
    return raw


def read_fits(path: PathLike, hdu: Union[int, str, None] = None, dtype: torch.dtype = torch.float32,
              device=None) -> FitsImage:
    """Read a 2-D FITS image into tensors.

    Args:
        path: FITS file (``.fits``, ``.fit``, ``.fits.gz``, ...).
        hdu: HDU index or EXTNAME; ``None`` picks the first HDU with 2-D image data (a cube whose
            extra axes have length 1 is squeezed to 2-D, with a warning).
        dtype: floating dtype of ``data``.
        device: device of the tensors (and of the WCS).

    Returns:
        :class:`FitsImage` with ``data`` (1, 1, H, W), ``mask`` (1, 1, H, W) bool (True = NaN/inf/BLANK),
        ``header`` and ``wcs`` (float64 :class:`~astroprep_torch.wcs.TanWCS` or ``None``).

    Raises:
        FileNotFoundError: missing file. OSError: truncated or corrupt file. ValueError: no image HDU,
        or data that is not 2-D. Each message names the file (and the HDU).
    """
    path = _check_read_args(path, hdu, dtype)
    hdul, truncated = _open_hdu_list(path)
    try:
        index = _hdu_index(hdul, hdu, path)
        raw = _read_hdu_data(hdul[index], index, path, truncated)
        header = hdul[index].header.copy()
    finally:
        hdul.close()

    if raw.ndim != 2:
        warnings.warn(f"{path}: HDU {index} data of shape {raw.shape} squeezed to 2-D", stacklevel=2)
        raw = raw.reshape(raw.shape[-2:])
    arr, blank = _scaled(raw, header, path, index)
    data = torch.from_numpy(np.ascontiguousarray(arr)).to(dtype=dtype, device=device)
    mask = ~torch.isfinite(data)
    if blank is not None:
        mask |= torch.from_numpy(blank).to(device)
    wcs = _wcs_or_none(header, path, index, device)
    return FitsImage(data=data[None, None], mask=mask[None, None], header=header, wcs=wcs, path=str(path))


def _scaled(raw: np.ndarray, header, path, index) -> tuple:
    """(physical values = raw * BSCALE + BZERO in native byte order, BLANK pixels or None)."""
    raw = raw.astype(raw.dtype.newbyteorder("="), copy=False)
    blank = None
    bscale = float(header.get("BSCALE", 1.0))
    bzero = float(header.get("BZERO", 0.0))
    if raw.dtype.kind in "iu":
        blank_value = header.get("BLANK")
        if blank_value is not None:
            blank = raw == int(blank_value)
        arr = raw.astype(np.float64)
        if bscale != 1.0 or bzero != 0.0:
            arr = arr * bscale + bzero
    elif raw.dtype.kind == "f":
        arr = raw
        if bscale != 1.0 or bzero != 0.0:
            arr = raw.astype(np.float64) * bscale + bzero
    else:
        raise ValueError(f"{path}: HDU {index} has unsupported data type {raw.dtype}")
    return arr, blank


def _wcs_or_none(header, path, index, device):
    from .wcs import TanWCS

    if not any(k in header for k in ("CTYPE1", "CTYPE2")):
        return None
    try:
        return TanWCS.from_header(header, device=device)
    except ValueError as exc:
        warnings.warn(f"{path} (HDU {index}): WCS not loaded, wcs=None: {exc}", stacklevel=3)
        return None


def read_fits_batch(paths: Sequence[PathLike], hdu: Union[int, str, None] = None,
                    dtype: torch.dtype = torch.float32, device=None) -> FitsImage:
    """Read several same-shape frames into a batch: ``data``/``mask`` (B, 1, H, W), ``header`` a list,
    ``wcs`` a batched ``TanWCS`` (``None``, with a warning, unless every frame has a supported WCS).

    Raises ``ValueError`` naming the first file whose shape differs from the first file's.
    """
    paths = list(paths)
    if not paths:
        raise ValueError("read_fits_batch needs at least one path")
    frames = []
    for p in paths:
        f = read_fits(p, hdu=hdu, dtype=dtype, device=device)
        if frames and f.data.shape != frames[0].data.shape:
            raise ValueError(f"{p}: image shape {tuple(f.data.shape[-2:])} differs from {tuple(frames[0].data.shape[-2:])} "
                             f"of {paths[0]}; read_fits_batch stacks same-shape frames only")
        frames.append(f)
    wcs = None
    have = [f.wcs is not None for f in frames]
    if all(have):
        from .wcs import TanWCS

        wcs = TanWCS.stack([f.wcs for f in frames])
    elif any(have):
        missing = [str(paths[i]) for i, h in enumerate(have) if not h]
        warnings.warn(f"no supported WCS in {', '.join(missing)}: batch wcs=None", stacklevel=2)
    return FitsImage(data=torch.cat([f.data for f in frames]), mask=torch.cat([f.mask for f in frames]),
                     header=[f.header for f in frames], wcs=wcs, path=[str(p) for p in paths])


def _clean_header(header, drop_wcs: bool):
    fits = _fits()
    if header is None:
        out = fits.Header()
    elif isinstance(header, fits.Header):
        out = header.copy()
    else:
        out = fits.Header()
        for k, v in dict(header).items():
            out[k] = v
    for key in list(out.keys()):
        up = key.upper()
        if up in _STRUCTURAL or up.startswith("NAXIS") or (up.startswith("Z") and up[1:5] in ("NAXI", "TILE", "NAME", "VAL")):
            out.remove(key, ignore_missing=True, remove_all=True)
        elif drop_wcs and up.startswith(_WCS_PREFIXES):
            out.remove(key, ignore_missing=True, remove_all=True)
    return out


def flush_to_disk(path: PathLike) -> None:
    """Wait until ``path``'s data are on disk (``fdatasync``), then drop its pages from the page cache.

    For outputs that are written once and not read back soon. Before a rename it makes the rename
    atomic across a crash too (no empty file under the final name). Dropping the pages lets the
    next files reuse them: the kernel otherwise takes fresh pages for every file written, and on
    virtual machines a fresh page costs more than the copy itself (the host maps it in on first touch;
    measured in ``experiments/results/pipeline_write_cost.md``). Skips what the platform lacks.
    """
    fd = os.open(str(path), os.O_RDONLY)
    try:
        (os.fdatasync if hasattr(os, "fdatasync") else os.fsync)(fd)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


_HOST = re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"
# ".<file name>.<host>.<pid>.<random>.tmp<suffix>": a file being written, renamed onto its name when done
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9_-]+)\.(?P<pid>\d+)\.[A-Za-z0-9_]+\.tmp(\.[A-Za-z0-9]+)*$")


def current_umask() -> int:
    """The process's file mode creation mask (read from ``/proc/self/status`` where Linux has it,
    so that no other thread ever sees a changed umask; elsewhere set and restored at once)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temporary_path(path, suffix: str = "") -> Path:
    """A new, unused path beside ``path`` to write before renaming onto it (atomic replacement):
    ``.<name>.<host>.<pid>.<random>.tmp<suffix>``, so that :func:`remove_stale_temporaries` can tell
    the leftovers of a writer killed mid-write from files still being written.

    Its mode is that of any file the user creates (``0666`` less the umask: ``0644`` under umask
    022), not the private ``0600`` of :func:`tempfile.mkstemp`, so that the product renamed from
    it is readable by whoever may read the folder's other files."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_HOST}.{os.getpid()}.", suffix=".tmp" + suffix)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
    finally:
        os.close(fd)
    return Path(tmp)


def remove_stale_temporaries(folder) -> list[Path]:
    """Remove the temporary files (:func:`temporary_path`) that writers killed mid-write (SIGKILL, a
    crash) left in ``folder``: those of this host whose process is gone. Another host's (several
    machines writing to one shared folder) and a live process's are kept. Returns the removed paths."""
    removed: list[Path] = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(".*.tmp*"):
        m = _TEMPORARY.match(p.name)
        if m is None or m["host"] != _HOST:
            continue
        try:
            os.kill(int(m["pid"]), 0)
            continue  # the process lives
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # another user's live process
        try:
            p.unlink()
            removed.append(p)
        except FileNotFoundError:
            pass
    return removed


def _image_array(data, path: Path) -> np.ndarray:
    """``data`` as a 2-D numpy array FITS can hold: tensors detached and on the CPU, leading axes of
    length 1 dropped, bool as uint8, float16 as float32."""
    if isinstance(data, Tensor):
        arr = data.detach().cpu().numpy()
    else:
        arr = np.asarray(data)
    if arr.ndim > 2:
        if any(s != 1 for s in arr.shape[:-2]):
            raise ValueError(f"write_fits writes one image: data must be (H, W), (1, H, W) or (1, 1, H, W), "
                             f"got shape {arr.shape} (for {path})")
        arr = arr.reshape(arr.shape[-2:])
    if arr.ndim != 2 or arr.size == 0:
        raise ValueError(f"write_fits needs 2-D image data, got shape {arr.shape} (for {path})")
    if arr.dtype.kind not in "biuf":
        raise TypeError(f"write_fits writes real images (float, integer or bool data), got dtype {arr.dtype} "
                        f"(for {path}); write e.g. the real and imaginary parts as two files")
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8)
    elif arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    return arr


def _write_atomically(hdu, path: Path, output_verify: str, flush: bool) -> None:
    """Write ``hdu`` to a temporary file beside ``path`` and rename it (removed on any failure)."""
    suffix = ".gz" if path.name.lower().endswith(".gz") else ""
    tmp = temporary_path(path, ".fits" + suffix)
    try:
        hdu.writeto(tmp, overwrite=True, output_verify=output_verify)
        if flush:
            flush_to_disk(tmp)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_fits(path: PathLike, data, header=None, wcs=None, overwrite: bool = False, *, index: int = 0,
               flush: bool = False) -> Path:
    """Write one image to a FITS primary HDU, atomically.

    Args:
        path: output file (a ``.gz`` suffix compresses). Its folder must exist.
        data: tensor or array shaped (H, W), (1, H, W) or (1, 1, H, W); float32/float64 are written as
            such, bool as uint8, integers as is. Tensors are detached and moved to the CPU.
        header: optional astropy ``Header`` or dict to copy (layout keys such as BITPIX, NAXISn, BZERO,
            BSCALE, BLANK are dropped; astropy writes its own).
        wcs: optional :class:`~astroprep_torch.wcs.TanWCS`; element ``index`` replaces any WCS keys of
            ``header`` (CRPIX written 1-based).
        overwrite: replace an existing file; otherwise ``FileExistsError``.
        flush: before the rename, wait until the data are on disk and drop them from the page cache
            (:func:`flush_to_disk`; what the pipeline's writer does).

    The file is first written to a temporary file in the same folder and then renamed, so a failure
    never leaves a half-written ``path``.
    """
    fits = _fits()
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"cannot write {path}: folder {folder} does not exist")
    arr = _image_array(data, path)
    hdr = _clean_header(header, drop_wcs=wcs is not None)
    if wcs is not None:
        from .wcs import TanWCS

        if not isinstance(wcs, TanWCS):
            raise TypeError(f"wcs must be a TanWCS or None, got {type(wcs).__name__}")
        hdr.update(wcs.to_header(index))
    if arr.dtype.itemsize > 1 and arr.dtype.byteorder != ">":
        # FITS is big-endian: one converting copy, instead of astropy's in-place swap and swap back.
        arr = arr.astype(arr.dtype.newbyteorder(">"))
    hdu = fits.PrimaryHDU(data=np.ascontiguousarray(arr), header=hdr)
    _write_atomically(hdu, path, "fix+warn" if header is not None else "exception", flush)
    return path
