"""Drop-in for SExtractor's own configuration: ``.sex`` / ``.param`` / ``.conv`` files onto the stages.

``astroprep extract input=<fits> sex=<file.sex> output=<dir>`` and ``astroprep background input=<fits>
sex=<file.sex>`` read a SExtractor configuration file and run :class:`~astroprep_torch.background.
Background2D` (SExtractor's back.c flavour) and :class:`~astroprep_torch.detect.SourceExtractor` with
SExtractor's semantics:

* ``key value [value,...]  # comment`` lines; keys the file leaves out take SExtractor 2.25's defaults
  (:data:`SEX_DEFAULTS`); file names (``PARAMETERS_NAME``, ``FILTER_NAME``, ``WEIGHT_IMAGE``) resolve
  as SExtractor resolves them (relative to the working directory), then beside the ``.sex`` file.
* Without a weight map (``WEIGHT_TYPE NONE``) SExtractor thresholds against ONE global background RMS
  (the median of its filtered rms meshes, the "RMS" it prints), and every error uses it; that scalar
  is passed to ``SourceExtractor`` (:func:`astroprep_torch.background.global_rms`).  ``WEIGHT_TYPE
  BACKGROUND`` / ``MAP_RMS`` / ``MAP_VAR`` pass a per-pixel rms map instead.
* ``SATUR_KEY`` / ``GAIN_KEY`` header values take precedence over ``SATUR_LEVEL`` / ``GAIN``, as in
  SExtractor.
* The catalog holds the ``.param`` columns we measure under SExtractor's names, written as
  ``CATALOG_TYPE`` asks (``FITS_1.0``, ``FITS_LDAC``, ``ASCII_HEAD``, ``ASCII``) under
  ``CATALOG_NAME`` in the output folder, and always as ECSV beside it.  ``CHECKIMAGE_TYPE``:
  BACKGROUND, BACKGROUND_RMS, MINIBACKGROUND, MINIBACK_RMS, -BACKGROUND, FILTERED, OBJECTS, -OBJECTS,
  SEGMENTATION.  Beyond the core columns (:data:`PARAM_COLUMNS` ...), :mod:`astroprep_torch.classic_params`
  makes CLASS_STAR, ISO0..7, FWHM_IMAGE, MU_MAX, FLUX_BEST, the error and world ellipses, ... when asked.
* Keys and parameters we do not implement are listed in ONE warning (keys that only matter for a
  parameter that was not requested, and those that do not change the outputs -- memory, verbosity,
  XML -- are not).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .classic_params import EXTRA_PARAMS, ColumnContext, _mag, _magerr, extra_column, resolve_file, unimplemented_extra

PathLike = Union[str, Path]

#: SExtractor 2.25 defaults of the keys this module reads (``sex -dd``).
SEX_DEFAULTS = {
    "CATALOG_NAME": "test.cat", "CATALOG_TYPE": "ASCII_HEAD", "PARAMETERS_NAME": "default.param",
    "DETECT_TYPE": "CCD", "DETECT_MINAREA": "5", "THRESH_TYPE": "RELATIVE", "DETECT_THRESH": "1.5",
    "ANALYSIS_THRESH": "1.5", "FILTER": "Y", "FILTER_NAME": "default.conv", "DEBLEND_NTHRESH": "32",
    "DEBLEND_MINCONT": "0.005", "CLEAN": "Y", "CLEAN_PARAM": "1.0", "MASK_TYPE": "CORRECT",
    "WEIGHT_TYPE": "NONE", "WEIGHT_IMAGE": "weight.fits", "WEIGHT_THRESH": "", "PHOT_APERTURES": "5",
    "PHOT_AUTOPARAMS": "2.5,3.5", "PHOT_AUTOAPERS": "0.0,0.0", "PHOT_FLUXFRAC": "0.5",
    "SATUR_LEVEL": "50000.0", "SATUR_KEY": "SATURATE", "MAG_ZEROPOINT": "0.0", "GAIN": "0.0",
    "GAIN_KEY": "GAIN", "BACK_TYPE": "AUTO", "BACK_VALUE": "0.0", "BACK_SIZE": "64",
    "BACK_FILTERSIZE": "3", "BACK_FILTTHRESH": "0.0", "BACKPHOTO_TYPE": "GLOBAL",
    "CHECKIMAGE_TYPE": "NONE", "CHECKIMAGE_NAME": "check.fits",
    "SEEING_FWHM": "1.2", "STARNNW_NAME": "default.nnw", "PIXEL_SCALE": "1.0",
}
#: keys that do not change the outputs (memory, verbosity, XML, threads)
NO_EFFECT = {"MEMORY_OBJSTACK", "MEMORY_PIXSTACK", "MEMORY_BUFSIZE", "VERBOSE_TYPE", "WRITE_XML", "XML_NAME",
             "XSL_URL", "NTHREADS", "HEADER_SUFFIX", "FITS_UNSIGNED", "CHECKIMAGE_NAME"}
#: keys that only matter for some catalog parameters (warned about only when those are requested)
ONLY_FOR = {
    "PHOT_PETROPARAMS": ("PETRO",), "SEEING_FWHM": ("CLASS_STAR",), "STARNNW_NAME": ("CLASS_STAR",),
    "PIXEL_SCALE": ("CLASS_STAR", "_WORLD", "_SKY", "_J2000", "_B1950"), "MAG_GAMMA": ("PHOTO",),
    "PSF_NAME": ("_PSF", "PSF"), "PSF_NMAX": ("_PSF",), "PATTERN_TYPE": ("_PATTERN",),
    "SOM_NAME": ("_SOM",), "ASSOC_NAME": ("ASSOC",), "ASSOC_DATA": ("ASSOC",), "ASSOC_PARAMS": ("ASSOC",),
    "ASSOC_RADIUS": ("ASSOC",), "ASSOC_TYPE": ("ASSOC",), "ASSOCSELEC_TYPE": ("ASSOC",),
    "INTERP_MAXXLAG": ("WEIGHT",), "INTERP_MAXYLAG": ("WEIGHT",), "INTERP_TYPE": ("WEIGHT",),
    "FLAG_IMAGE": ("IMAFLAGS",), "FLAG_TYPE": ("IMAFLAGS",),
}

#: .param name -> (Catalog column, 1-based pixel coordinate)
PARAM_COLUMNS = {
    "NUMBER": ("number", False), "X_IMAGE": ("x", True), "Y_IMAGE": ("y", True),
    "XWIN_IMAGE": ("xwin", True), "YWIN_IMAGE": ("ywin", True), "X2_IMAGE": ("x2", False),
    "Y2_IMAGE": ("y2", False), "XY_IMAGE": ("xy", False), "ERRX2_IMAGE": ("errx2", False),
    "ERRY2_IMAGE": ("erry2", False), "ERRXY_IMAGE": ("errxy", False), "A_IMAGE": ("a", False),
    "B_IMAGE": ("b", False), "THETA_IMAGE": ("theta", False), "CXX_IMAGE": ("cxx", False),
    "CYY_IMAGE": ("cyy", False), "CXY_IMAGE": ("cxy", False), "ISOAREA_IMAGE": ("npix", False),
    "FLUX_MAX": ("peak", False), "FLUX_ISO": ("flux_iso", False), "FLUXERR_ISO": ("fluxerr_iso", False),
    "FLUX_APER": ("flux_aper", False), "FLUXERR_APER": ("fluxerr_aper", False),
    "KRON_RADIUS": ("kron_radius", False), "FLUX_AUTO": ("flux_auto", False),
    "FLUXERR_AUTO": ("fluxerr_auto", False), "FLUX_RADIUS": ("flux_radius_fracs", False),
    "THRESHOLD": ("thresh", False), "FLAGS": ("flags", False), "XMIN_IMAGE": ("xmin", True),
    "XMAX_IMAGE": ("xmax", True), "YMIN_IMAGE": ("ymin", True), "YMAX_IMAGE": ("ymax", True),
    "XPEAK_IMAGE": ("xpeak", True), "YPEAK_IMAGE": ("ypeak", True),
}
#: magnitudes: name -> (flux column, flux error column)
MAG_COLUMNS = {"MAG_APER": "flux_aper", "MAG_AUTO": "flux_auto", "MAG_ISO": "flux_iso"}
MAGERR_COLUMNS = {"MAGERR_APER": ("flux_aper", "fluxerr_aper"), "MAGERR_AUTO": ("flux_auto", "fluxerr_auto"),
                  "MAGERR_ISO": ("flux_iso", "fluxerr_iso")}
DERIVED = {"ELONGATION", "ELLIPTICITY", "BACKGROUND", "X_WORLD", "Y_WORLD", "ALPHA_J2000", "DELTA_J2000",
           "ALPHA_SKY", "DELTA_SKY", "XWIN_WORLD", "YWIN_WORLD", "ALPHAWIN_J2000", "DELTAWIN_J2000"}
CHECK_TYPES = {"NONE", "BACKGROUND", "BACKGROUND_RMS", "MINIBACKGROUND", "MINIBACK_RMS", "-BACKGROUND",
               "FILTERED", "OBJECTS", "-OBJECTS", "SEGMENTATION"}


# ------------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------------
def parse_sex(path: PathLike) -> dict[str, str]:
    """``KEY value # comment`` lines of a SExtractor configuration file -> ``{KEY: "value"}`` (the value
    text with its commas, whitespace around commas removed).  Raises ``FileNotFoundError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SExtractor configuration file not found: {path}")
    out = {}
    for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split(None, 1)
        key = parts[0].upper()
        val = parts[1].strip() if len(parts) > 1 else ""
        out[key] = ",".join(v.strip() for v in val.split(","))
    return out


def read_param(path: PathLike) -> list[tuple[str, int]]:
    """A ``.param`` file -> ``[(NAME, n)]``: one name a line, ``NAME(n)`` for the first n elements of a
    vector (``n`` = 0 when not given; ``NAME(n,m)``, e.g. ``VIGNET(35,35)``: n*m); comments (``#``) and
    blank lines skipped."""
    out = []
    for line in Path(path).read_text(errors="replace").splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name = ("".join(line.split()) if "(" in line else line.split()[0]).upper()
        n = 0
        if "(" in name:
            name, _, rest = name.partition("(")
            try:
                n = math.prod(int(v) for v in rest.rstrip(")").split(","))
            except ValueError as e:
                raise ValueError(f"{path}: bad parameter {line!r} (expected NAME, NAME(n) or NAME(n,m))") from e
        out.append((name, n))
    if not out:
        raise ValueError(f"{path}: no catalog parameters")
    return out


def read_conv(path: PathLike) -> tuple[torch.Tensor, bool]:
    """A SExtractor ``.conv`` filter -> (kernel (h, w) float64, normalised?).  ``CONV NORM`` /
    ``CONV NONORM`` header, then rows of numbers; other comment lines (``#``) skipped."""
    rows, norm = [], True
    for line in Path(path).read_text(errors="replace").splitlines():
        s = line.split("#", 1)[0].strip()
        if not s:
            continue
        if s.upper().startswith("CONV"):
            norm = "NONORM" not in s.upper()
            continue
        rows.append([float(v) for v in s.split()])
    if not rows or len({len(r) for r in rows}) != 1:
        raise ValueError(f"{path}: expected a rectangular filter (rows of numbers after 'CONV NORM')")
    return torch.tensor(rows, dtype=torch.float64), norm


def _floats(text: str, key: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v != ""]
    except ValueError as e:
        raise ValueError(f"SExtractor key {key}: expected number(s), got {text!r}") from e


def _yes(text: str) -> bool:
    return text.strip().upper().startswith("Y")


@dataclass
class SexConfig:
    """A resolved SExtractor configuration (the ``.sex`` keys with SExtractor's defaults filled in)."""

    keys: dict
    path: Optional[Path] = None
    params: list = field(default_factory=list)
    kernel: Optional[torch.Tensor] = None
    unimplemented: list = field(default_factory=list)

    def get(self, key: str) -> str:
        return self.keys.get(key, SEX_DEFAULTS.get(key, ""))

    def floats(self, key: str) -> list[float]:
        return _floats(self.get(key), key)


def load_sex(path: Optional[PathLike], overrides: Optional[dict] = None, *, need_params: bool = True) -> SexConfig:
    """Read a ``.sex`` file (``None``: SExtractor's defaults only) plus ``overrides`` (``{KEY: value}``,
    as SExtractor's ``-KEY value`` command-line options), its ``.param`` and ``.conv`` files."""
    sp = Path(path) if path is not None else None
    keys = parse_sex(sp) if sp is not None else {}
    for k, v in (overrides or {}).items():
        keys[str(k).upper()] = ",".join(s.strip() for s in str(v).split(","))
    cfg = SexConfig(keys=keys, path=sp)
    if need_params:
        cfg.params = read_param(resolve_file(cfg.get("PARAMETERS_NAME"), sp, "PARAMETERS_NAME"))
    if _yes(cfg.get("FILTER")):
        name = cfg.get("FILTER_NAME")
        try:
            kernel, norm = read_conv(resolve_file(name, sp, "FILTER_NAME"))
        except FileNotFoundError:
            if "FILTER_NAME" in keys:
                raise
            kernel, norm = None, True  # the default.conv SExtractor ships: ours built in
        cfg.kernel = kernel if kernel is not None else "default"
        if not norm:
            cfg.unimplemented.append("FILTER_NAME (CONV NONORM: the filter is normalised)")
    cfg.unimplemented += _unimplemented(cfg)
    return cfg


def _unimplemented(cfg: SexConfig) -> list[str]:
    """Keys and values we do not reproduce (for the one warning)."""
    out = []
    names = [n for n, _ in cfg.params]
    for k, v in cfg.keys.items():
        if k in SEX_DEFAULTS or k in NO_EFFECT:
            continue
        if k in ONLY_FOR and not any(any(t in n for t in ONLY_FOR[k]) for n in names):
            continue
        out.append(k)
    checks = {
        "DETECT_TYPE": ("CCD",), "BACKPHOTO_TYPE": ("GLOBAL",), "BACK_TYPE": ("AUTO", "MANUAL"),
        "THRESH_TYPE": ("RELATIVE", "ABSOLUTE"), "MASK_TYPE": ("NONE", "BLANK", "CORRECT"),
        "WEIGHT_TYPE": ("NONE", "BACKGROUND", "MAP_RMS", "MAP_VAR", "MAP_WEIGHT"),
        "CATALOG_TYPE": ("NONE", "ASCII", "ASCII_HEAD", "FITS_1.0", "FITS_LDAC"),
    }
    for k, ok in checks.items():
        if cfg.get(k).upper().split(",")[0] not in ok:
            out.append(f"{k} {cfg.get(k)}")
    if cfg.get("ANALYSIS_THRESH") != cfg.get("DETECT_THRESH"):
        out.append("ANALYSIS_THRESH (different from DETECT_THRESH: DETECT_THRESH is used)")
    if len(cfg.floats("DETECT_THRESH")) > 1:
        out.append("DETECT_THRESH <mag/arcsec2>,<ZP> (surface-brightness form)")
    for t in cfg.get("CHECKIMAGE_TYPE").upper().split(","):
        if t and t not in CHECK_TYPES:
            out.append(f"CHECKIMAGE_TYPE {t}")
    for n in names:
        if (n not in PARAM_COLUMNS and n not in MAG_COLUMNS and n not in MAGERR_COLUMNS and n not in DERIVED
                and n not in EXTRA_PARAMS):
            out.append(f"parameter {n}")
    return out + unimplemented_extra(cfg, names)


# ------------------------------------------------------------------------------------------------
# the stages, configured from the keys
# ------------------------------------------------------------------------------------------------
def background_kwargs(cfg: SexConfig) -> dict:
    """``background_2d`` keyword arguments for BACK_SIZE, BACK_FILTERSIZE, BACK_FILTTHRESH (SExtractor
    gives ``<width>,<height>``; ours ``(height, width)``)."""
    size = [int(v) for v in cfg.floats("BACK_SIZE")]
    fsize = [int(v) for v in cfg.floats("BACK_FILTERSIZE")]
    box = size[0] if len(size) == 1 else (size[1], size[0])
    filt = fsize[0] if len(fsize) == 1 else (fsize[1], fsize[0])
    return dict(box_size=box, filter_size=filt, filter_threshold=float(cfg.floats("BACK_FILTTHRESH")[0]),
                method="sextractor", interpolation="bicubic")


def header_value(header, key_name: str, default: float) -> float:
    """SExtractor's ``*_KEY`` rule: the header keyword's value when present, else ``default``."""
    if header is not None and key_name and key_name in header:
        try:
            return float(header[key_name])
        except (TypeError, ValueError):
            pass
    return float(default)


def source_extractor(cfg: SexConfig, header=None, rms_scale: float = 1.0):
    """:class:`~astroprep_torch.detect.SourceExtractor` for the keys (thresholds in units of the rms the
    caller passes; ``rms_scale`` converts an ABSOLUTE threshold into those units)."""
    from .detect import SourceExtractor

    thr = cfg.floats("DETECT_THRESH")[0]
    if cfg.get("THRESH_TYPE").upper() == "ABSOLUTE":
        thr = thr / rms_scale
    kron = cfg.floats("PHOT_AUTOPARAMS")
    nfrac = max([n for name, n in cfg.params if name == "FLUX_RADIUS"] + [1])
    fracs = cfg.floats("PHOT_FLUXFRAC")
    fracs = (fracs + [fracs[-1]] * nfrac)[: max(nfrac, len(fracs))]
    return SourceExtractor(
        thresh=thr, minarea=int(cfg.floats("DETECT_MINAREA")[0]), filter_kernel=cfg.kernel,
        deblend_nthresh=int(cfg.floats("DEBLEND_NTHRESH")[0]), deblend_cont=cfg.floats("DEBLEND_MINCONT")[0],
        clean=_yes(cfg.get("CLEAN")), clean_param=cfg.floats("CLEAN_PARAM")[0],
        phot_apertures=tuple(cfg.floats("PHOT_APERTURES")), kron_fact=kron[0],
        min_radius=kron[1] if len(kron) > 1 else 3.5,
        saturation=header_value(header, cfg.get("SATUR_KEY"), cfg.floats("SATUR_LEVEL")[0]),
        gain=header_value(header, cfg.get("GAIN_KEY"), cfg.floats("GAIN")[0]) or None,
        mask_type=cfg.get("MASK_TYPE").lower(), flux_fracs=tuple(fracs),
        autoapers=tuple((cfg.floats("PHOT_AUTOAPERS") + [0.0, 0.0])[:2]),
    )


def _noise(cfg: SexConfig, image: torch.Tensor, rms_map: torch.Tensor, backsig: torch.Tensor, sp: Optional[Path]):
    """(noise passed to SourceExtractor, mask or None) for WEIGHT_TYPE: the global RMS scalar (NONE),
    the background rms map (BACKGROUND) or a map from WEIGHT_IMAGE (MAP_RMS / MAP_VAR / MAP_WEIGHT, the
    latter scaled so that its median rms is the global RMS, as SExtractor rescales relative weights)."""
    wtype = cfg.get("WEIGHT_TYPE").upper().split(",")[0]
    if wtype == "NONE":
        return float(backsig[0]), None
    if wtype == "BACKGROUND":
        return rms_map, None
    from astropy.io import fits

    wpath = resolve_file(cfg.get("WEIGHT_IMAGE").split(",")[0], sp, "WEIGHT_IMAGE")
    w = torch.from_numpy(np.asarray(fits.getdata(wpath), dtype=np.float32))[None, None]
    if w.shape != image.shape:
        raise ValueError(f"WEIGHT_IMAGE {wpath}: shape {tuple(w.shape[-2:])} != image {tuple(image.shape[-2:])}")
    if wtype == "MAP_RMS":
        rms = w
    elif wtype == "MAP_VAR":
        rms = w.clamp(min=0).sqrt()
    else:  # MAP_WEIGHT: relative weights
        rms = torch.where(w > 0, w.clamp(min=1e-30).rsqrt(), torch.full_like(w, float("inf")))
        fin = rms[torch.isfinite(rms)]
        rms = rms * (float(backsig[0]) / float(fin.median())) if fin.numel() else rms
    thr = cfg.get("WEIGHT_THRESH")
    bad = ~torch.isfinite(rms) | (rms <= 0)
    if thr:
        t = float(thr.split(",")[0])
        bad |= (w < t) if wtype == "MAP_WEIGHT" else (w > t)
    return torch.where(bad, torch.ones_like(rms), rms), bad


def extract(cfg: SexConfig, image: torch.Tensor, header=None, mask: Optional[torch.Tensor] = None) -> dict:
    """SExtractor's run on ``image`` (1, 1, H, W): returns ``catalog`` (a ``Catalog``), ``background``,
    ``rms`` (maps), ``mesh`` (the filtered mesh), ``backsig`` (the global RMS, (1,)), ``sub`` (image -
    background), ``noise`` (what the thresholds used)."""
    from .background import background_2d, global_rms

    mesh = {}
    res = background_2d(image, mask, mesh_out=mesh, **background_kwargs(cfg))
    bkg = res.background
    if cfg.get("BACK_TYPE").upper() == "MANUAL":  # SExtractor still measures the rms meshes
        bkg = torch.full_like(bkg, cfg.floats("BACK_VALUE")[0])
    backsig = global_rms(mesh["mesh"])
    noise, wbad = _noise(cfg, image, res.rms, backsig, cfg.path)
    if wbad is not None:
        mask = wbad if mask is None else (mask | wbad)
    sub = image - bkg
    se = source_extractor(cfg, header, rms_scale=float(backsig[0]))
    cat = se(sub, noise, mask, background=bkg)
    return {"catalog": cat, "background": bkg, "rms": res.rms, "mesh": mesh["mesh"], "backsig": backsig,
            "sub": sub, "noise": noise, "extractor": se}


# ------------------------------------------------------------------------------------------------
# catalogs
# ------------------------------------------------------------------------------------------------
def _column(cols: dict, name: str, zp: float, bkg: np.ndarray, wcs):
    """One catalog column (numpy) for a .param name, or None when not implemented."""
    if name in PARAM_COLUMNS:
        key, one = PARAM_COLUMNS[name]
        if key not in cols:
            return None
        return cols[key] + 1 if one else cols[key]
    if name in MAG_COLUMNS:
        return _mag(cols[MAG_COLUMNS[name]], zp)
    if name in MAGERR_COLUMNS:
        f, e = MAGERR_COLUMNS[name]
        return _magerr(cols[f], cols[e])
    if name in ("ELONGATION", "ELLIPTICITY"):
        q = cols["b"] / np.where(cols["a"] > 0, cols["a"], 1.0)
        return 1.0 / np.where(q > 0, q, 1.0) if name == "ELONGATION" else 1.0 - q
    if name == "BACKGROUND":
        iy = np.clip(np.round(cols["y"]).astype(int), 0, bkg.shape[0] - 1)
        ix = np.clip(np.round(cols["x"]).astype(int), 0, bkg.shape[1] - 1)
        return bkg[iy, ix]
    if wcs is not None and name in DERIVED:
        win = "WIN" in name
        x, y = (cols["xwin"], cols["ywin"]) if win else (cols["x"], cols["y"])
        sky = wcs.all_pix2world(np.stack([x, y], 1), 0)
        return sky[:, 0] if name.startswith(("X", "ALPHA")) else sky[:, 1]
    return None


def catalog_table(cfg: SexConfig, result: dict, header=None):
    """The ``.param`` columns (SExtractor names, order, vector lengths) as an astropy Table."""
    from astropy.table import Table

    cat = result["catalog"]
    cols = {k: v.detach().cpu().numpy() for k, v in cat.columns.items()}
    cols["flux_radius_fracs"] = cols.get("flux_radius_fracs", cols["flux_radius"][:, None])
    wcs = None
    if header is not None and any(n in DERIVED and "_" in n and not n.startswith(("ELL", "ELO")) for n, _ in cfg.params):
        from astropy.wcs import WCS

        wcs = WCS(header).celestial if WCS(header).has_celestial else None
    zp = cfg.floats("MAG_ZEROPOINT")[0]
    bkg = result["background"][0, 0].detach().cpu().numpy()
    t = Table()
    ctx = ColumnContext(cfg, result, cols, header)
    skipped = []
    for name, n in cfg.params:
        a = _column(cols, name, zp, bkg, wcs)
        if a is None and name in EXTRA_PARAMS:
            a = extra_column(name, ctx)
        if a is None:
            skipped.append(name)
            continue
        if a.ndim == 2:
            a = a[:, : max(n, 1)]
            if n <= 1:
                a = a[:, 0]
        t[name] = a
    t.meta["comments"] = [f"SExtractor-compatible catalog from astroprep_torch ({cfg.path or 'defaults'})"]
    made = [s for s in skipped if not any(s in u for u in cfg.unimplemented)]
    if made:  # implemented, but not for this frame (no celestial WCS, ...)
        warnings.warn(f"catalog parameters not written for this frame (no celestial WCS?): {', '.join(made)}",
                      UserWarning, stacklevel=2)
    return t


def _ascii(t, path: Path, head: bool) -> None:
    lines, col = [], 1
    if head:
        for name in t.colnames:
            lines.append(f"# {col:3d} {name:<22s}")
            col += t[name].shape[1] if t[name].ndim == 2 else 1
    fmts = []
    for name in t.colnames:
        a = t[name]
        fmts.append("{:10d}" if a.dtype.kind in "iu" else "{:15.7g}")
    for i in range(len(t)):
        row = []
        for name, f in zip(t.colnames, fmts):
            v = t[name][i]
            row += [f.format(x) for x in (np.atleast_1d(v))]
        lines.append(" ".join(row))
    path.write_text("\n".join(lines) + "\n")


def _fits_table(t, path: Path, ldac: bool, header=None) -> None:
    from astropy.io import fits

    hdus = [fits.PrimaryHDU()]
    tab = fits.BinTableHDU(t.as_array())
    if ldac:
        hstr = (header.tostring(endcard=True) if header is not None else fits.Header().tostring(endcard=True))
        imhead = fits.BinTableHDU.from_columns([fits.Column(name="Field Header Card", format=f"{len(hstr)}A",
                                                            array=np.array([hstr]))])
        imhead.header["EXTNAME"] = "LDAC_IMHEAD"
        tab.header["EXTNAME"] = "LDAC_OBJECTS"
        hdus.append(imhead)
    hdus.append(tab)
    fits.HDUList(hdus).writeto(path, overwrite=True)


def write_catalog(cfg: SexConfig, t, out_dir: Path, header=None, name: Optional[str] = None) -> list[Path]:
    """Write the table as CATALOG_TYPE under CATALOG_NAME in ``out_dir``, and as ECSV beside it."""
    ctype = cfg.get("CATALOG_TYPE").upper()
    path = out_dir / (name or Path(cfg.get("CATALOG_NAME")).name)
    written = []
    if ctype in ("FITS_1.0", "FITS_LDAC"):
        _fits_table(t, path, ctype == "FITS_LDAC", header)
        written.append(path)
    elif ctype in ("ASCII", "ASCII_HEAD"):
        _ascii(t, path, ctype == "ASCII_HEAD")
        written.append(path)
    ecsv = path.with_suffix(".ecsv") if path.suffix != ".ecsv" else path.with_name(path.name + ".ecsv")
    t.write(ecsv, format="ascii.ecsv", overwrite=True)
    return written + [ecsv]


def check_images(cfg: SexConfig, result: dict, image: torch.Tensor) -> dict[str, np.ndarray]:
    """``{CHECKIMAGE_TYPE: array}`` for the types we make (SExtractor's meanings)."""
    from .detect import filter_image

    out = {}
    types = [t for t in cfg.get("CHECKIMAGE_TYPE").upper().split(",") if t and t != "NONE"]
    for t in types:
        if t == "BACKGROUND":
            a = result["background"]
        elif t == "BACKGROUND_RMS":
            a = result["rms"]
        elif t == "MINIBACKGROUND":
            a = result["mesh"][:, :1]
        elif t == "MINIBACK_RMS":
            a = result["mesh"][:, 1:]
        elif t == "-BACKGROUND":
            a = result["sub"]
        elif t == "FILTERED":
            a = filter_image(result["sub"], cfg.kernel)
        elif t in ("SEGMENTATION", "OBJECTS", "-OBJECTS"):
            seg = result["catalog"].segmentation
            if t == "SEGMENTATION":
                a = seg.to(torch.int32)
            else:
                keep = (seg > 0) if t == "OBJECTS" else (seg == 0)
                a = torch.where(keep, result["sub"], torch.zeros_like(result["sub"]))
        else:
            continue
        out[t] = a[0, 0].detach().cpu().numpy()
    return out


def write_check_images(cfg: SexConfig, images: dict, out_dir: Path, header=None) -> list[Path]:
    """Each check image under its CHECKIMAGE_NAME (in the order of CHECKIMAGE_TYPE) in ``out_dir``."""
    from astropy.io import fits

    types = [t for t in cfg.get("CHECKIMAGE_TYPE").upper().split(",") if t and t != "NONE"]
    names = [n for n in cfg.get("CHECKIMAGE_NAME").split(",") if n]
    written = []
    for i, t in enumerate(types):
        if t not in images:
            continue
        name = Path(names[i]).name if i < len(names) else f"check_{t.lstrip('-').lower()}.fits"
        hdr = header.copy() if header is not None and not t.startswith("MINI") else None
        if hdr is not None:
            for k in ("BITPIX", "NAXIS", "NAXIS1", "NAXIS2", "BZERO", "BSCALE", "BLANK", "EXTEND", "SIMPLE"):
                hdr.remove(k, ignore_missing=True, remove_all=True)
        fits.PrimaryHDU(images[t], header=hdr).writeto(out_dir / name, overwrite=True)
        written.append(out_dir / name)
    return written


# ------------------------------------------------------------------------------------------------
# the pipeline's extract preset: SExtractor's noise semantics
# ------------------------------------------------------------------------------------------------
_BACKGROUND_SETTINGS = ("box_size", "filter_size", "sigma", "maxiters", "estimator", "rms_estimator", "min_pixels",
                        "interpolation", "filter_threshold", "method", "exclude_percentile", "median_factor",
                        "mean_factor", "exact", "filter_edge", "chunk_pixels")


class BackgroundWithGlobalRMS(torch.nn.Module):
    """A :class:`~astroprep_torch.background.Background2D` that also returns SExtractor's global
    background RMS per image (``global_rms``, ``(B,)``: the median of the filtered rms meshes), what
    SExtractor thresholds against -- and computes every error with -- when no weight map is given.
    ``forward(image, mask=None) -> (background, rms, global_rms)`` (a named tuple)."""

    def __init__(self, background):
        super().__init__()
        self.background = background

    def forward(self, image: torch.Tensor, mask: Optional[torch.Tensor] = None):
        from collections import namedtuple

        from .background import background_2d, global_rms

        mesh = {}
        kw = {k: getattr(self.background, k) for k in _BACKGROUND_SETTINGS if hasattr(self.background, k)}
        res = background_2d(image, mask, mesh_out=mesh, **kw)
        out = namedtuple("BackgroundGlobal", ["background", "rms", "global_rms"])
        return out(res.background, res.rms, global_rms(mesh["mesh"]))


# ------------------------------------------------------------------------------------------------
# HOTPANTS command lines
# ------------------------------------------------------------------------------------------------
#: HOTPANTS 5.1.11 defaults (``defaults.h`` / ``vargs.c``) as ImageSubtraction keywords
HOTPANTS_DEFAULTS = dict(
    kernel_half_width=10, gaussians=((0.7, 6), (1.5, 4), (3.0, 2)), spatial_order=2, background_order=1,
    stamp_grid=(10, 10), stamp_half_width=15, clip_sigma=2.0, stat_sigma=3.0, stamp_threshold=20.0,
    normalize="template", convolve="auto", gain=(1.0, 1.0), read_noise=(0.0, 0.0), saturation=(25000.0, 25000.0),
    lower_limit=(0.0, 0.0), stars_per_cell=3, weighting="none", stamp_layout="hotpants", debias=False,
    calibrate_noise=False,  # HOTPANTS' noise image: the Poisson model of the inputs, not measured
)
#: flag -> (ImageSubtraction keyword, number of values); pair keywords take (science, template)
_HP_SCALAR = {"-r": ("kernel_half_width", int), "-rss": ("stamp_half_width", int), "-ko": ("spatial_order", int),
              "-bgo": ("background_order", int), "-ks": ("clip_sigma", float), "-ssig": ("stat_sigma", float),
              "-ft": ("stamp_threshold", float), "-nss": ("stars_per_cell", int)}
_HP_PAIR = {"-ig": ("gain", 0), "-tg": ("gain", 1), "-ir": ("read_noise", 0), "-tr": ("read_noise", 1),
            "-iu": ("saturation", 0), "-tu": ("saturation", 1), "-il": ("lower_limit", 0), "-tl": ("lower_limit", 1)}
_HP_FILES = {"-inim": "science", "-tmplim": "template", "-outim": "difference", "-oci": "convolved", "-oni": "noise",
             "-savexy": "stamps", "-ini": "science_noise", "-tni": "template_noise", "-imi": "science_mask",
             "-tmi": "template_mask", "-omi": "mask", "-ond": "sigma", "-ssf": "stamp_file"}
#: flags that do not change the outputs here: verbosity; -kcs (the kernel is evaluated per 128-px FFT tile,
#: not per -kcs step: exact for -ko 0)
_HP_NO_EFFECT = {"-v": 1, "-kcs": 1}
#: flags onto :class:`~astroprep_torch.hotpants.HotpantsOptions`: flag -> (attribute, index or None, type)
_HP_OPTIONS = {"-ip": ("pedestal", 0, float), "-tp": ("pedestal", 1, float), "-iuk": ("kernel_saturation", 0, float),
               "-tuk": ("kernel_saturation", 1, float), "-fi": ("fill", None, float), "-fin": ("fill_noise", None, float),
               "-kfm": ("kernel_fraction", None, float), "-mins": ("mask_spread", None, float),
               "-mous": ("mask_output", None, lambda v: float(v) >= 0), "-afssc": ("find_more_stamps", None, lambda v: int(v) != 0),
               "-sft": ("scale_threshold", None, float), "-nft": ("min_stamp_fraction", None, float),
               "-obs": ("short", 1, float), "-obz": ("short", 2, float), "-nbs": ("noise_short", 1, float),
               "-nbz": ("noise_short", 2, float), "-nrx": ("regions", 0, int), "-nry": ("regions", 1, int)}
#: value-less flags onto HotpantsOptions
_HP_SWITCHES = {"-convvar": ("convolve_variance", None), "-okn": ("rescale_ok", None), "-nc": ("no_clobber", None),
                "-sht": ("short", 0), "-nsht": ("noise_short", 0)}
_HP_LAYERS = {"-cim": ("convolved",), "-ndm": ("sigma",), "-nim": ("noise",), "-allm": ("convolved", "sigma", "noise")}
#: flags we do not implement -> their number of values (-pca: 1 + its count of files)
_HP_ARITY = {"-sconv": 0, "-gd": 4, "-rf": 1, "-rkw": 2, "-cmp": 1, "-fom": 1, "-ki": 1, "-oki": 1, "-hki": 0,
             "-ef": 1, "-sum": 0}
#: ``-c`` and ``-n`` values: HOTPANTS reads their first letter only (``strncmp(.., 1)``, case-sensitive)
_HP_CONVOLVE = {"t": "template", "i": "science", "b": "auto"}
_HP_NORMALIZE = {"t": "template", "i": "science", "u": "unconvolved"}


def _hp_letter(flag: str, value: str, table: dict) -> str:
    if not value or value[0] not in table:
        raise ValueError(f"HOTPANTS flag {flag} {value!r}: expected one of {', '.join(repr(k) for k in table)} "
                         "(its first letter is read, as HOTPANTS does)")
    return table[value[0]]


def _hp_check(kw: dict) -> None:
    """HOTPANTS' own refusals (vargs.c) for the values we map."""
    if kw["kernel_half_width"] <= 0:
        raise ValueError(f"HOTPANTS flag -r {kw['kernel_half_width']}: cannot be negative (or zero)")
    if kw["stamp_half_width"] < kw["kernel_half_width"]:
        raise ValueError(f"HOTPANTS flags -rss {kw['stamp_half_width']} < -r {kw['kernel_half_width']}: conflicting requests")
    for flag, key in (("-ko", "spatial_order"), ("-bgo", "background_order"), ("-ks", "clip_sigma"),
                      ("-ft", "stamp_threshold"), ("-nss", "stars_per_cell")):
        if kw[key] < 0:
            raise ValueError(f"HOTPANTS flag {flag} {kw[key]}: cannot be negative")
    for j, who in ((0, "i"), (1, "t")):
        if kw["saturation"][j] <= 0 or kw["gain"][j] <= 0 or kw["read_noise"][j] < 0:
            raise ValueError(f"HOTPANTS flags -{who}u / -{who}g / -{who}r: the saturation level and gain must be "
                             "positive, the read noise not negative")
        if kw["saturation"][j] < kw["lower_limit"][j]:
            raise ValueError(f"HOTPANTS flag -{who}u ({kw['saturation'][j]}) cannot be smaller than -{who}l "
                             f"({kw['lower_limit'][j]})")


def _hp_unconvolved(kw: dict, unsupported: list) -> None:
    """``-n u``: the difference stays in the flux units of the image that is not convolved."""
    if kw["normalize"] != "unconvolved":
        return
    if kw["convolve"] == "auto":
        unsupported.append("-n u with -c b (the convolved image is chosen per fit): normalised to the template "
                           "(-n t) instead; give -c t or -c i")
        kw["normalize"] = "template"
    else:
        kw["normalize"] = "template" if kw["convolve"] == "science" else "science"


def _hp_tokens(flags: Union[str, list]) -> list[str]:
    import shlex

    tok = shlex.split(flags) if isinstance(flags, str) else [str(t) for t in flags]
    return tok[1:] if tok and not tok[0].startswith("-") else tok  # the program name


def _hp_take(tok: list, i: int, n: int) -> list:
    vals = tok[i + 1: i + 1 + n]
    if len(vals) < n:
        raise ValueError(f"HOTPANTS flag {tok[i]} needs {n} value(s)")
    return vals


def _hp_fit_flag(f: str, tok: list, i: int, kw: dict, grid: list) -> int:
    """A flag of the kernel fit into ``kw`` / ``grid``; returns how many values it took (-1: not one)."""
    if f in _HP_SCALAR:
        key, typ = _HP_SCALAR[f]
        kw[key] = typ(_hp_take(tok, i, 1)[0])
    elif f in _HP_PAIR:
        key, j = _HP_PAIR[f]
        kw[key][j] = float(_hp_take(tok, i, 1)[0])
    elif f in ("-nsx", "-nsy"):
        grid[1 if f == "-nsx" else 0] = int(_hp_take(tok, i, 1)[0])
    elif f == "-ng":
        n = int(tok[i + 1]) if i + 1 < len(tok) and tok[i + 1].lstrip("-").isdigit() else -1
        if n < 1:
            raise ValueError("HOTPANTS flag -ng needs: ngauss degree0 sigma0 ... degreeN sigmaN")
        vals = _hp_take(tok, i, 1 + 2 * n)[1:]
        kw["gaussians"] = tuple((float(vals[2 * k + 1]), int(vals[2 * k])) for k in range(n))
        return 1 + 2 * n
    elif f in ("-c", "-n"):
        v = _hp_take(tok, i, 1)[0]
        kw["convolve" if f == "-c" else "normalize"] = _hp_letter(f, v, _HP_CONVOLVE if f == "-c" else _HP_NORMALIZE)
    else:
        return -1
    return 1


def _hp_option_flag(f: str, tok: list, i: int, opts, files: dict, unsupported: list) -> int:
    """A flag outside the fit into ``opts`` / ``files`` / ``unsupported``; returns how many values it
    took (-1: not a HOTPANTS v5.1.11 flag)."""
    if f in _HP_FILES:
        files[_HP_FILES[f]] = _hp_take(tok, i, 1)[0]
        return 1
    if f in _HP_OPTIONS:
        attr, j, typ = _HP_OPTIONS[f]
        v = typ(_hp_take(tok, i, 1)[0])
        if j is None:
            setattr(opts, attr, v)
        else:
            getattr(opts, attr)[j] = v
        return 1
    if f in _HP_SWITCHES:
        attr, j = _HP_SWITCHES[f]
        setattr(opts, attr, True) if j is None else getattr(opts, attr).__setitem__(j, True)
        return 0
    if f in _HP_LAYERS:
        opts.layers.extend(x for x in _HP_LAYERS[f] if x not in opts.layers)
        return 0
    if f in _HP_NO_EFFECT:
        return len(_hp_take(tok, i, _HP_NO_EFFECT[f]))
    n = _HP_ARITY.get(f, -1)
    if f == "-pca":
        n = 1 + int(_hp_take(tok, i, 1)[0])
    if n < 0:
        return -1
    vals = _hp_take(tok, i, n)
    if not (f == "-fom" and vals[0][:1] == "v"):
        unsupported.append(" ".join([f] + vals))
    return n


def parse_hotpants_command(flags: Union[str, list]):
    """A HOTPANTS command line (flags only, or the whole command) -> :class:`~astroprep_torch.hotpants.HotpantsCommand`.
    Flags are case-insensitive, as HOTPANTS' ``strcasecmp``. ``-nsx``/``-nsy`` give ``stamp_grid``
    (rows = ``-nsy``), ``-ng n d0 s0 ...`` the Gaussians, ``-c t|i|b`` which image is convolved (``b``:
    both tried, ``"auto"``), ``-n t|i|u`` the flux normalisation (``u``: the unconvolved image's)."""
    from .hotpants import HotpantsCommand, HotpantsOptions

    tok = _hp_tokens(flags)
    kw = {k: (list(v) if isinstance(v, tuple) and k != "gaussians" else v) for k, v in HOTPANTS_DEFAULTS.items()}
    files, unsupported, grid = {}, [], list(HOTPANTS_DEFAULTS["stamp_grid"])
    opts = HotpantsOptions(command=" ".join(["hotpants"] + tok))
    i = 0
    while i < len(tok):
        f = tok[i].lower()
        n = _hp_fit_flag(f, tok, i, kw, grid)
        if n < 0:
            n = _hp_option_flag(f, tok, i, opts, files, unsupported)
        if n < 0:
            raise ValueError(f"unknown HOTPANTS flag {tok[i]!r} in {flags!r}")
        i += 1 + n
    kw["stamp_grid"] = tuple(grid)
    for k in ("gain", "read_noise", "saturation", "lower_limit"):
        kw[k] = tuple(kw[k])
    if opts.regions == [1, 1]:  # -sconv only matters with several regions
        unsupported[:] = [u for u in unsupported if u != "-sconv"]
    if "stamp_file" in files and opts.find_more_stamps:
        unsupported.append("-afssc 1 with -ssf (stamps are taken at the -ssf positions only; give -afssc 0)")
    _hp_unconvolved(kw, unsupported)
    _hp_check(kw)
    return HotpantsCommand(kw, files, unsupported, opts)


def parse_hotpants(flags: Union[str, list]) -> tuple[dict, dict, list]:
    """A HOTPANTS command line -> (ImageSubtraction keywords with HOTPANTS' defaults for what it leaves
    out, ``{role: file}`` of its file flags, flags not implemented): :func:`parse_hotpants_command`
    without the options that act outside the fit."""
    cmd = parse_hotpants_command(flags)
    return cmd.kw, cmd.files, cmd.unsupported


def read_stamp_file(path: PathLike) -> torch.Tensor:
    """HOTPANTS ``-ssf``: ``x y`` lines (1-based, other lines skipped) -> (R, 2) 0-based (x, y)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"HOTPANTS -ssf stamp file not found: {p}")
    xy = []
    for line in p.read_text(errors="replace").splitlines():
        parts = line.split()
        try:
            xy.append((float(parts[0]) - 1, float(parts[1]) - 1))
        except (ValueError, IndexError):
            continue
    if not xy:
        raise ValueError(f"HOTPANTS -ssf {p}: no 'x y' lines")
    return torch.tensor(xy)


def _hp_fit(kw: dict, inp, opts, positions):
    """ImageSubtraction on the HOTPANTS inputs; when fewer than ``-nft`` of the stamp cells got a star,
    once more with the threshold scaled by ``-sft`` (HOTPANTS' retry)."""
    from .subtract import ImageSubtraction

    def fit(threshold):
        return ImageSubtraction(**dict(kw, stamp_threshold=threshold))(
            inp.science, inp.template, inp.stamp_mask, inp.stamp_mask, inp.science_var, inp.template_var,
            stamp_positions=positions)

    retry = positions is None and opts.scale_threshold < 1
    try:
        res = fit(kw["stamp_threshold"])
    except ValueError as e:  # no stamp star at all: fewer than -nft of the cells
        if not retry or "no usable stamp star" not in str(e):
            raise
        return fit(kw["stamp_threshold"] * opts.scale_threshold)
    cells = kw["stamp_grid"][0] * kw["stamp_grid"][1]
    if retry and len(res.stamp_stats.x) / cells < opts.min_stamp_fraction:
        res = fit(kw["stamp_threshold"] * opts.scale_threshold)
    return res


def run_subtract(science: PathLike, reference: PathLike, flags: str, output: PathLike) -> dict:
    """``astroprep subtract input=<fits> reference=<fits> hotpants="<flags>"``: HOTPANTS' fit with its
    flags and defaults on an aligned pair, and HOTPANTS' products (:mod:`astroprep_torch.hotpants`):
    the difference (``-outim`` name or ``<frame>.diff.fits``, bad pixels ``-fi``), ``-oni``, ``-oci``,
    ``-ond``, ``-omi``, the ``-cim``/``-ndm``/``-nim`` layers, ``-savexy``."""
    from . import hotpants as hp

    cmd = parse_hotpants_command(flags)
    opts, files = cmd.options, cmd.files
    if cmd.unsupported:
        warnings.warn("HOTPANTS flags not implemented, ignored: " + "; ".join(cmd.unsupported), UserWarning, stacklevel=2)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    inp = hp.read_inputs(science, reference, cmd.kw, opts, files, _read)
    positions = read_stamp_file(files["stamp_file"]) if "stamp_file" in files else None
    shape = tuple(inp.science.shape[-2:])
    nrx, nry = opts.regions
    fitted, empty = [], []  # (Region, result, products) of each region, fitted independently as HOTPANTS does
    for reg in hp.regions(shape, cmd.kw, nrx, nry):
        part = hp.crop(inp, reg) if nrx * nry > 1 else inp
        pos = None if positions is None else positions - torch.tensor([[reg.bx0, reg.by0]], dtype=positions.dtype)
        try:
            res = _hp_fit(hp.fit_keywords(cmd.kw, opts, (shape[0] // nry, shape[1] // nrx)), part, opts, pos)
        except ValueError as e:  # HOTPANTS skips a region without stamps: its pixels keep the fill values
            if nrx * nry == 1 or "no usable stamp star" not in str(e):
                raise
            empty.append(reg)
            continue
        fitted.append((reg, res, hp.products(part, res, cmd.kw, opts)))
    if not fitted:
        raise ValueError(f"HOTPANTS regions -nrx {nrx} -nry {nry}: no usable stamp star in any region")
    if empty:
        warnings.warn(f"HOTPANTS: no usable stamp star in {len(empty)} of {nrx * nry} regions ("
                      + ", ".join(f"[{g.x0 + 1}:{g.x1 + 1},{g.y0 + 1}:{g.y1 + 1}]" for g in empty)
                      + "): their pixels hold the fill value (-fi) and are flagged, as HOTPANTS leaves them", UserWarning, stacklevel=2)
    prod = fitted[0][2] if len(fitted) == 1 and not empty else hp.paste([(f[0], f[2]) for f in fitted], shape, opts)
    stem = Path(science).name.split(".")[0]
    names = {"science": str(science), "template": str(reference), "difference": files.get("difference", f"{stem}.diff.fits")}
    hdr = hp.header_keys(inp.header, fitted, cmd.kw, opts, names)
    written = hp.write_products(prod, hdr, files, out, names["difference"], opts)
    res = fitted[0][1]
    if "stamps" in files:
        written["stamps"] = hp.write_savexy([f[1].stamp_stats for f in fitted], out / Path(files["stamps"]).name,
                                            cmd.kw["stamp_half_width"], [(f[0].bx0, f[0].by0) for f in fitted])[0]
    ksum = float(res.kernel_sum[0])
    print(f"{science} - {reference}: kernel sum {ksum:.6f} ({len(fitted)} region(s)), "
          f"{int(res.stamp_stats.used.sum())} stamps -> " + ", ".join(written.values()))
    return {"paths": written, "kernel_sum": ksum, "result": res, "products": prod,
            "kernel_sums": [float(f[1].kernel_sum[0]) for f in fitted]}


# ------------------------------------------------------------------------------------------------
# SWarp: single-frame resampling onto a target .head
# ------------------------------------------------------------------------------------------------
from .swarp import SWARP_DEFAULTS  # noqa: E402  (SWarp 2.41 defaults of the keys we read)

_SWARP_RESAMPLING = {"NEAREST": "nearest", "BILINEAR": "bilinear", "LANCZOS3": "lanczos3"}
#: keys that do not change the resampled frame or its weights: output bookkeeping, memory, threads; the
#: grid keys (CELESTIAL_TYPE ... IMAGE_SIZE) which the target .head overrides; the combination's own keys
#: (one frame); GAIN / SATLEV keys (output header values and multi-frame weighting only)
_SWARP_NO_EFFECT = {"VERBOSE_TYPE", "WRITE_XML", "XML_NAME", "XSL_URL", "NTHREADS", "MEM_MAX", "VMEM_MAX", "VMEM_DIR",
                    "COMBINE_BUFSIZE", "DELETE_TMPFILES", "RESAMPLE", "RESAMPLE_DIR", "COPY_KEYWORDS",
                    "WRITE_FILEINFO", "HEADER_ONLY", "HEADEROUT_NAME", "HEADER_NAME", "TILE_COMPRESS", "CELESTIAL_TYPE",
                    "PROJECTION_TYPE", "PROJECTION_ERR", "CENTER_TYPE", "PIXELSCALE_TYPE", "IMAGE_SIZE", "CENTER",
                    "PIXEL_SCALE", "CLIP_AMPFRAC", "CLIP_SIGMA", "CLIP_WRITELOG", "CLIP_LOGNAME", "GAIN_KEYWORD",
                    "GAIN_DEFAULT", "SATLEV_KEYWORD", "SATLEV_DEFAULT", "NNODES", "NODE_INDEX", "NOPENFILES_MAX",
                    "BACK_FILTTHRESH"}


def read_head(path: PathLike):
    """A SWarp target ``.head`` (FITS header cards, one a line) -> astropy ``Header``."""
    from astropy.io import fits

    hdr = fits.Header()
    for ln in Path(path).read_text(errors="replace").splitlines():
        key = ln[:8].strip().upper()
        if not key or key == "END" or ln[8:10] != "= ":
            continue
        raw = ln[10:].strip()
        if raw.startswith("'"):
            hdr[key] = raw[1:].split("'", 1)[0].rstrip()
            continue
        raw = raw.split("/", 1)[0].strip()
        if raw in ("T", "F"):
            hdr[key] = raw == "T"
            continue
        try:
            hdr[key] = int(raw)
        except ValueError:
            try:
                hdr[key] = float(raw.replace("D", "E"))
            except ValueError as e:
                raise ValueError(f"{path}: cannot read the value of {key} ({raw!r})") from e
    if "NAXIS1" not in hdr or "NAXIS2" not in hdr:
        raise ValueError(f"{path}: a SWarp target header needs NAXIS1 and NAXIS2")
    return hdr


def _swarp_keys(swarp: Optional[PathLike], overrides: Optional[dict]) -> tuple[dict, list]:
    """SWarp's defaults, the ``.swarp`` file's keys and the overrides; the keys not implemented."""
    from .swarp import unimplemented

    keys = dict(SWARP_DEFAULTS)
    given = parse_sex(swarp) if swarp else {}
    given.update({str(k).upper(): str(v) for k, v in (overrides or {}).items()})
    keys.update(given)
    unimpl = unimplemented(given, keys, _SWARP_NO_EFFECT)
    rt = keys["RESAMPLING_TYPE"].split(",")[0].upper()
    if rt not in _SWARP_RESAMPLING:
        unimpl.append(f"RESAMPLING_TYPE {rt} (LANCZOS3 used)")
    return keys, unimpl


def _swarp_prepare(keys: dict, input_path, image, header, mask):
    """The frame after SWarp's background subtraction, its input variance (or None) and global rms."""
    from . import swarp as sw

    bkg, rms, grms = sw.background(keys, image, mask)
    if _yes(keys["SUBTRACT_BACK"]):
        manual = keys["BACK_TYPE"].split(",")[0].strip().upper() == "MANUAL"
        image = image - (float(keys["BACK_DEFAULT"].split(",")[0]) if manual else bkg)
    return image, sw.input_variance(keys, Path(input_path), image, rms, grms), grms


def run_reproject(input_path: PathLike, swarp: Optional[PathLike], head: PathLike, output: PathLike,
                  overrides: Optional[dict] = None) -> dict:
    """``astroprep reproject input=<fits> swarp=<file.swarp> head=<target.head>``: one frame resampled
    onto the ``.head`` grid with SWarp's keys (:mod:`astroprep_torch.swarp`: RESAMPLING_TYPE,
    FSCALASTRO_TYPE NONE/FIXED/VARIABLE, FSCALE_KEYWORD/FSCALE_DEFAULT, SUBTRACT_BACK with BACK_TYPE,
    BACK_SIZE/BACK_FILTERSIZE, WEIGHT_TYPE and the output weight map, COMBINE: single-frame only); the
    input's SIP distortion is honoured (SWarp ignores SIP), which the output header's HISTORY says."""
    from astropy.io import fits

    from . import swarp as sw
    from .align import Reproject
    from .wcs import TanWCS

    keys, unimpl = _swarp_keys(swarp, overrides)
    rt = keys["RESAMPLING_TYPE"].split(",")[0].upper()
    fs = keys["FSCALASTRO_TYPE"].upper()
    if unimpl:
        warnings.warn(f"SWarp configuration {swarp}: not implemented, ignored: " + "; ".join(unimpl), UserWarning, stacklevel=2)
    image, header, mask = _read(input_path)
    image, var_in, grms = _swarp_prepare(keys, input_path, image.double(), header, mask)
    fscale = sw.flux_scale(keys, header)
    target = read_head(head)
    shape = (int(target["NAXIS2"]), int(target["NAXIS1"]))
    src, dst = TanWCS.from_header(header), TanWCS.from_header(target)
    reproject = Reproject(shape, interpolation=_SWARP_RESAMPLING.get(rt, "lanczos3"), conserve_flux=(fs == "VARIABLE"))
    res = reproject(image, src, dst, mask)
    var_out = None
    if var_in is not None:  # SWarp keeps the image through bad-weight pixels; see swarp.resample_variance
        var_out, touched = sw.resample_variance(var_in, header, dst, reproject, rt)
    factor = fscale * (_fixed_flux_factor(src, dst, tuple(image.shape[-2:])) if fs == "FIXED" else 1.0)
    out = res.image[:, :1] * factor
    if fs == "VARIABLE":  # the weights follow the per-pixel Jacobian the image was scaled by
        factor = factor * (dst.pixel_area(*_grid(shape)) / src.pixel_area(*dst.pixel_to_pixel(src, *_grid(shape)))).view(1, 1, *shape)
    cov = (res.footprint > 0) & sw.covered(src, dst, tuple(image.shape[-2:]), shape, rt)
    good = cov if var_in is None else cov & ~touched
    weight = sw.output_weight(var_out, good, grms, factor)
    out = torch.where(cov, torch.nan_to_num(out), torch.zeros_like(out))
    if _yes(keys["BLANK_BADPIXELS"]):
        out = torch.where(weight > 0, out, torch.zeros_like(out))
    hdr = target.copy()
    hdr["HISTORY"] = "astroprep_torch reproject (SWarp drop-in): input SIP/TPV distortion honoured"
    hdr["HISTORY"] = f"RESAMPLING_TYPE {rt} FSCALASTRO_TYPE {fs} SUBTRACT_BACK {keys['SUBTRACT_BACK']}"
    hdr["FLXSCALE"] = (fscale, "flux scale applied (FSCALE_KEYWORD)")
    o = Path(output)
    o.mkdir(parents=True, exist_ok=True)
    single = not _yes(keys["COMBINE"])
    name = (Path(input_path).name.split(".")[0] + keys["RESAMPLE_SUFFIX"]) if single else Path(keys["IMAGEOUT_NAME"]).name
    wname = (Path(name).name.replace(".fits", ".weight.fits")) if single else Path(keys["WEIGHTOUT_NAME"]).name
    fits.PrimaryHDU(out[0, 0].float().numpy(), header=hdr).writeto(o / name, overwrite=True)
    fits.PrimaryHDU(weight[0, 0].float().numpy(), header=hdr).writeto(o / wname, overwrite=True)
    print(f"{input_path} -> {o / name} ({shape[1]}x{shape[0]}, {rt}, FSCALASTRO_TYPE {fs})")
    return {"image": str(o / name), "weight": str(o / wname)}


def _grid(shape) -> tuple[torch.Tensor, torch.Tensor]:
    yy, xx = torch.meshgrid(torch.arange(shape[0], dtype=torch.float64), torch.arange(shape[1], dtype=torch.float64),
                            indexing="ij")
    return xx.reshape(1, -1), yy.reshape(1, -1)


def _fixed_flux_factor(src, dst, in_shape) -> float:
    """SWarp's FSCALASTRO_TYPE FIXED: output / input pixel area at the input frame's centre (SIP/TPV
    distortion included)."""
    xc = torch.tensor([[(in_shape[1] - 1) / 2]], dtype=torch.float64)
    yc = torch.tensor([[(in_shape[0] - 1) / 2]], dtype=torch.float64)
    xo, yo = src.pixel_to_pixel(dst, xc, yc)
    return float(dst.pixel_area(xo, yo).reshape(-1)[0] / src.pixel_area(xc, yc).reshape(-1)[0])


def run_reproject_from_hydra(cfg) -> dict:
    """The runner of ``astroprep reproject input=<fits> swarp=<file.swarp> head=<target.head>``."""
    head = cfg.get("head")
    if not head:
        raise ValueError("astroprep reproject swarp=...: give head=<target .head file> (SWarp's output grid)")
    over = dict(cfg.get("swarp_keys") or {})
    return {p: run_reproject(p, cfg.get("swarp"), head, cfg.output, over) for p in _inputs(cfg.get("input"))}


# ------------------------------------------------------------------------------------------------
# commands
# ------------------------------------------------------------------------------------------------
def _read(path: PathLike):
    """The first 2-D image HDU of ``path`` as SExtractor reads it: ``BSCALE * raw + BZERO`` in float32
    (astropy's scaling; :func:`astroprep_torch.io.read_fits` scales in float64, which differs from
    SExtractor's values by up to an ulp of the scaled value), non-finite pixels masked."""
    from astropy.io import fits

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input FITS file not found: {path}")
    with fits.open(path) as hdul:
        for hdu in hdul:
            if hdu.data is not None and hdu.data.ndim == 2:
                data = np.asarray(hdu.data, dtype=np.float32)
                header = hdu.header.copy()
                break
        else:
            raise ValueError(f"{path}: no 2-D image HDU")
    image = torch.from_numpy(np.ascontiguousarray(data))[None, None]
    bad = ~torch.isfinite(image)
    if bool(bad.any()):
        image = torch.where(bad, torch.zeros_like(image), image)
        return image, header, bad
    return image, header, None


def warn_unimplemented(cfg: SexConfig) -> None:
    if cfg.unimplemented:
        warnings.warn(f"SExtractor configuration {cfg.path or '(defaults)'}: not implemented, ignored: "
                      + "; ".join(cfg.unimplemented), UserWarning, stacklevel=2)


def run_extract(input_path: PathLike, sex: Optional[PathLike], output: PathLike, overrides: Optional[dict] = None,
                catalog_name: Optional[str] = None) -> dict:
    """``astroprep extract input=<fits> sex=<file.sex> output=<dir>``: SExtractor's catalog and check
    images of one frame, from SExtractor's configuration files.  Returns the written paths."""
    cfg = load_sex(sex, overrides)
    warn_unimplemented(cfg)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    image, header, mask = _read(input_path)
    res = extract(cfg, image, header, mask)
    t = catalog_table(cfg, res, header)
    paths = write_catalog(cfg, t, out, header, catalog_name)
    paths += write_check_images(cfg, check_images(cfg, res, image), out, header)
    print(f"{input_path}: {len(t)} objects (global background RMS {float(res['backsig'][0]):.6g}) -> "
          + ", ".join(str(p) for p in paths))
    return {"catalog": [str(p) for p in paths], "n": len(t), "backsig": float(res["backsig"][0])}


def run_background(input_path: PathLike, sex: Optional[PathLike], output: PathLike,
                   overrides: Optional[dict] = None) -> dict:
    """``astroprep background input=<fits> sex=<file.sex>``: SExtractor's BACKGROUND and BACKGROUND_RMS
    maps (``<frame>.bkg.fits``, ``<frame>.rms.fits``) with the file's BACK_* keys."""
    from astropy.io import fits

    from .background import background_2d, global_rms

    cfg = load_sex(sex, overrides, need_params=False)
    cfg.unimplemented = [u for u in cfg.unimplemented if not u.startswith(("parameter", "CHECKIMAGE"))]
    warn_unimplemented(cfg)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    image, header, mask = _read(input_path)
    mesh = {}
    res = background_2d(image, mask, mesh_out=mesh, **background_kwargs(cfg))
    bkg = res.background
    if cfg.get("BACK_TYPE").upper() == "MANUAL":
        bkg = torch.full_like(bkg, cfg.floats("BACK_VALUE")[0])
    stem = Path(input_path).name.split(".")[0]
    paths = []
    for suffix, a in (("bkg", bkg), ("rms", res.rms)):
        p = out / f"{stem}.{suffix}.fits"
        fits.PrimaryHDU(a[0, 0].detach().cpu().numpy()).writeto(p, overwrite=True)
        paths.append(str(p))
    backsig = float(global_rms(mesh["mesh"])[0])
    print(f"{input_path}: background and rms maps (global RMS {backsig:.6g}) -> " + ", ".join(paths))
    return {"paths": paths, "backsig": backsig}


def _inputs(value) -> list[str]:
    from .data import resolve_inputs

    if value is None:
        raise ValueError("input=<fits> is required with sex=<file.sex>")
    return [str(p) for p in resolve_inputs(value)]


def run_subtract_from_hydra(cfg) -> dict:
    """The runner of ``astroprep subtract input=<fits> reference=<fits> hotpants="<flags>"`` (``-inim`` /
    ``-tmplim`` in the flags stand in for a missing input / reference)."""
    _, files, _ = parse_hotpants(cfg.hotpants)
    sci = cfg.get("input") or files.get("science")
    ref = cfg.get("reference") or files.get("template")
    if not sci or not ref:
        raise ValueError("astroprep subtract hotpants=...: give input=<science fits> and reference=<template fits> "
                         "(or -inim / -tmplim in the flags)")
    sci = sci if isinstance(sci, str) else list(sci)[0]
    return run_subtract(sci, ref, cfg.hotpants, cfg.output)


def run_from_hydra(cfg, command: str) -> dict:
    """The runner of ``astroprep extract|background ... sex=<file.sex>`` (``sex_keys={KEY: value}``
    overrides keys, as SExtractor's ``-KEY value``)."""
    over = dict(cfg.get("sex_keys") or {})
    paths = _inputs(cfg.get("input"))
    out = {}
    for p in paths:
        if command == "extract":
            name = None if len(paths) == 1 else f"{Path(p).name.split('.')[0]}.{Path(load_sex(cfg.sex, over).get('CATALOG_NAME')).name}"
            out[p] = run_extract(p, cfg.sex, cfg.output, over, catalog_name=name)
        else:
            out[p] = run_background(p, cfg.sex, cfg.output, over)
    return out


__all__ = ["run_reproject", "read_head", "SWARP_DEFAULTS", "HOTPANTS_DEFAULTS", "parse_hotpants", "run_subtract", "SEX_DEFAULTS", "parse_sex", "read_param", "read_conv", "load_sex", "SexConfig", "extract",
           "catalog_table", "write_catalog", "check_images", "run_extract", "run_background", "source_extractor",
           "background_kwargs"]
