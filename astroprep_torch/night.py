"""``astroprep night``: a night of frames of one field -> moving objects, reports, sequences.

Steps (each timed into ``night.json``):

1. **times** -- every input's header is read (:func:`~astroprep_torch.obstime.observation_time`);
   a frame without a usable time is reported (``status: failed`` with the keywords looked for) and
   skipped; the others are put in time order.
2. **template** -- ``reference=<fits>`` is used as given. Without it the night builds its own
   template: every frame is reprojected (WCS) onto the grid of the sharpest frame (header ``FWHM``)
   and the per-pixel median of the stack is written to ``template.fits`` (a mover is at a different
   place in most frames, so the median keeps the stars and drops the movers).
3. **per-frame graph** -- :func:`~astroprep_torch.pipeline.run_from_config` over the frames with
   that reference, exactly as ``astroprep run`` (products, manifest, resume, bad frames reported).
4. **detections** -- ``detections=difference``: the candidates detected on each difference image;
   ``detections=science``: each frame's own catalog (stars included: the linker drops what is
   stationary); ``auto`` (default): difference with a reference, science without one (measured:
   :func:`detection_source`). The template still gives the difference stamps of the sequences. Pixel positions become RA/Dec with the WCS of their grid; S/N below
   ``min_snr`` is dropped; magnitudes use the header zeropoint (``MAGZP``, ``ZP``, ``ZEROPNT``,
   ``MAGZERO``) or ``zeropoint``.
5. **linking** -- :func:`astroprep_torch.moving.link_tracklets` with ``cfg.linking``.
6. **outputs** -- ``tracklets.ecsv`` (one row per linked detection), ``report.obs80.txt``,
   ``report.ades.psv``, ``sequences/<trksub>.gif|.pt``, ``cutouts/<trksub>_<k>.fits`` and
   ``night.json``, as ``NIGHT_CONTRACT`` (the layout ``astroprep ingest`` reads) says. ``x, y`` in
   ``tracklets.ecsv`` are 0-based pixels of the frame's aligned/difference products (the
   reference grid), where the sequences and cutouts are cut. The ``obs80`` column holds the exact
   80-column line, but astropy's ECSV reader strips its leading blanks: ``line.rjust(80)``
   restores it (the station code ends every line).
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

log = logging.getLogger(__name__)

__all__ = ["run_night", "frame_times", "night_template", "read_detections", "link_night", "tracklet_rows",
           "write_night_outputs", "write_simulated_night", "score_tracklets"]

_ZP_KEYS = ("MAGZP", "ZP", "ZEROPNT", "MAGZERO", "PHOTZP")


# --------------------------------------------------------------------------------------------
# 1. times
# --------------------------------------------------------------------------------------------
def frame_times(paths) -> tuple:
    """(good, failed): good = [{name, path, mjd, exptime, start_mjd, source, header}] in time order;
    failed = [{name, path, mjd: None, exptime: None, status: 'failed', reason}]."""
    from astropy.io import fits

    from .data import frame_name
    from .obstime import observation_time

    good, failed = [], []
    for p in paths:
        name = frame_name(p)
        try:
            header = _image_header(fits, p)
            t = observation_time(header, name=str(p))
        except Exception as exc:  # unreadable file or no time: reported, never fatal
            failed.append({"name": name, "path": str(p), "mjd": None, "exptime": None, "status": "failed",
                           "reason": f"{type(exc).__name__}: {exc}"})
            continue
        good.append({"name": name, "path": str(p), "mjd": t.mjd, "exptime": t.exptime, "start_mjd": t.start_mjd,
                     "source": t.source, "header": header})
    good.sort(key=lambda f: f["mjd"])
    return good, failed


def _image_header(fits, path):
    with fits.open(path, memmap=False) as hdul:
        hdu = next((h for h in hdul if getattr(h, "data", None) is not None and h.data.ndim >= 2), None)
        if hdu is None:
            raise ValueError(f"{path} holds no image")
        header = hdu.header.copy()
        if hdu is not hdul[0]:  # observatories often keep the times in the primary header
            for k, v in hdul[0].header.items():
                if k not in header and k not in ("SIMPLE", "BITPIX", "NAXIS", "EXTEND", "COMMENT", "HISTORY", ""):
                    header[k] = v
    return header


# --------------------------------------------------------------------------------------------
# 2. template
# --------------------------------------------------------------------------------------------
def night_template(frames: list, out_path: Path, *, interpolation: str = "bilinear") -> Path:
    """Median co-add of the frames (:func:`astroprep_torch.stack.stack_files`, memory-bounded) on the
    grid of the sharpest one (header FWHM / SEEING; the middle frame in time when none says):
    ``out_path`` (FITS with that frame's WCS)."""
    from .io import read_fits, write_fits
    from .stack import StackError, stack_files

    if not frames:
        raise ValueError("night_template: no frames")

    def fwhm(f):
        v = f["header"].get("FWHM", f["header"].get("SEEING"))
        return float(v) if v is not None else math.inf

    mid = frames[len(frames) // 2]
    grid = min(frames, key=fwhm) if any(math.isfinite(fwhm(f)) for f in frames) else mid
    g = read_fits(grid["path"])
    if g.wcs is None:
        raise ValueError(f"a night template needs a celestial WCS in every frame; {grid['path']} has none "
                         f"(pass reference=<fits> instead)")
    try:
        res, _ = stack_files([f["path"] for f in frames], reference=grid["path"], combine="median",
                             interpolation=interpolation)
    except StackError as exc:
        raise ValueError(f"a night template needs a celestial WCS on the same field in every frame: {exc}") from exc
    header = g.header.copy()
    for k in ("DATE-OBS", "MJD-OBS", "DATE-AVG", "MJD-AVG", "TIME-OBS", "UT", "UTC-OBS", "UTCSTART"):
        header.remove(k, ignore_missing=True, remove_all=True)
    header["NCOMBINE"] = (len(frames), "frames in the median template")
    write_fits(out_path, torch.nan_to_num(res.image, nan=0.0), header=header, overwrite=True)
    return Path(out_path)


# --------------------------------------------------------------------------------------------
# 4. detections
# --------------------------------------------------------------------------------------------
def _pixel_scale(w) -> float:
    from astropy.wcs.utils import proj_plane_pixel_scales

    return float(np.mean(proj_plane_pixel_scales(w.celestial)) * 3600.0)


class _PixelToWorld:
    """An astropy WCS seen as ``pixel_to_world(x, y) -> (ra, dec)`` tensors in degrees (0-based
    pixels), as :func:`astroprep_torch.moving.shape_on_sky` takes it."""

    def __init__(self, wcs):
        self.wcs = wcs

    def pixel_to_world(self, x, y):
        ra, dec = self.wcs.all_pix2world(np.asarray(x, float), np.asarray(y, float), 0)
        return torch.as_tensor(np.asarray(ra, float)), torch.as_tensor(np.asarray(dec, float))


def _shapes_on_sky(wcs, x, y, a, b, theta) -> tuple:
    """SExtractor A/B_IMAGE (px), THETA_IMAGE -> a, b (arcsec) and the major axis' PA (deg N->E)."""
    from .moving import shape_on_sky

    if not len(x):
        return np.zeros(0), np.zeros(0), np.zeros(0)
    sa, sb, pa = shape_on_sky(_PixelToWorld(wcs), x, y, a, b, np.nan_to_num(theta))
    return sa.numpy(), sb.numpy(), pa.numpy()


def _zeropoint(header, default: Optional[float]) -> float:
    for k in _ZP_KEYS:
        if header.get(k) is not None:
            return float(header[k])
    return float(default) if default is not None else 25.0


def read_detections(table, wcs, frame: dict, exposure: int, *, zeropoint: Optional[float] = None,
                    min_snr: float = 5.0, max_peak_ratio: Optional[float] = None, drop_flags: int = 4) -> dict:
    """A frame's catalog (SExtractor column names, 1-based pixels) -> flat numpy columns with sky
    positions (``wcs``: astropy WCS of the catalog's grid), the frame's time and the detector pixel
    (``xd, yd``: on the frame's own grid, from its header WCS). Detections below ``min_snr``, with
    any of the SExtractor ``FLAGS`` bits in ``drop_flags`` (default 4, saturated: bright stars
    deblend into pieces that seem to move) and, when ``max_peak_ratio`` is given, sharper than a
    PSF (``FLUX_MAX / FLUX_AUTO`` above it: cosmic rays and hot pixels) are dropped."""
    n = len(table)
    col = lambda k: np.asarray(table[k], dtype=np.float64) if k in table.colnames else np.full(n, np.nan)  # noqa: E731
    x, y = col("XWIN_IMAGE") - 1, col("YWIN_IMAGE") - 1
    bad = ~(np.isfinite(x) & np.isfinite(y))
    x, y = np.where(bad, col("X_IMAGE") - 1, x), np.where(bad, col("Y_IMAGE") - 1, y)
    flux, ferr = col("FLUX_AUTO"), col("FLUXERR_AUTO")
    snr = np.where(ferr > 0, flux / np.where(ferr > 0, ferr, 1.0), np.nan)
    keep = np.isfinite(x) & np.isfinite(y) & (flux > 0) & (snr >= min_snr)
    if drop_flags and "FLAGS" in table.colnames:
        keep &= (np.asarray(table["FLAGS"]).astype(np.int64) & int(drop_flags)) == 0
    if max_peak_ratio is not None:
        keep &= ~(col("FLUX_MAX") / np.where(flux > 0, flux, np.inf) > max_peak_ratio)
    scale = _pixel_scale(wcs)
    zp = _zeropoint(frame["header"], zeropoint)
    x, y, flux, ferr, snr = x[keep], y[keep], flux[keep], ferr[keep], snr[keep]
    a, b, theta = col("A_IMAGE")[keep], col("B_IMAGE")[keep], col("THETA_IMAGE")[keep]
    a_sky, b_sky, pa_sky = _shapes_on_sky(wcs, x, y, np.nan_to_num(a), np.nan_to_num(b), theta)
    ra, dec = wcs.all_pix2world(x, y, 0) if len(x) else (np.zeros(0), np.zeros(0))
    perr = np.sqrt(np.clip((col("ERRX2_IMAGE") + col("ERRY2_IMAGE"))[keep] / 2, 0, None)) * scale
    return {
        "frame": np.full(len(x), frame["name"], dtype=object), "exposure": np.full(len(x), exposure, dtype=np.int64),
        "mjd": np.full(len(x), frame["mjd"]), "exptime": np.full(len(x), float(frame.get("exptime") or 0.0)), "ra": np.asarray(ra, float), "dec": np.asarray(dec, float), "x": x, "y": y,
        "mag": zp - 2.5 * np.log10(flux), "mag_err": 2.5 / math.log(10) * ferr / flux, "snr": snr,
        "e": 1.0 - np.where(a > 0, b / np.where(a > 0, a, 1.0), 1.0), "fwhm": 2.0 * col("FLUX_RADIUS")[keep] * scale,
        "theta": theta, "a": a_sky, "b": b_sky, "pa_trail": pa_sky, "pos_err": np.where(np.isfinite(perr), perr, 0.0),
        **_detector_xy(frame["header"], ra, dec),
    }


def _detector_xy(header, ra, dec) -> dict:
    """0-based pixels of ``ra, dec`` on the frame's own detector grid (NaN without a WCS)."""
    from astropy.wcs import WCS

    try:
        xd, yd = WCS(header).celestial.all_world2pix(ra, dec, 0) if len(ra) else (np.zeros(0), np.zeros(0))
    except Exception:
        xd = yd = np.full(len(ra), np.nan)
    return {"xd": np.asarray(xd, float), "yd": np.asarray(yd, float)}


def star_peak_ratio(table, min_snr: float = 20.0) -> float:
    """Median ``FLUX_MAX / FLUX_AUTO`` of a frame's bright, round, unflagged sources (its PSF's
    sharpness; NaN when the catalog has none)."""
    if not len(table) or "FLUX_MAX" not in table.colnames:
        return float("nan")
    flux, ferr = np.asarray(table["FLUX_AUTO"], float), np.asarray(table["FLUXERR_AUTO"], float)
    e = 1 - np.asarray(table["B_IMAGE"], float) / np.maximum(np.asarray(table["A_IMAGE"], float), 1e-9)
    ok = (flux > 0) & (ferr > 0) & (flux / np.where(ferr > 0, ferr, 1) >= min_snr) & (e < 0.3)
    if "FLAGS" in table.colnames:
        ok &= np.asarray(table["FLAGS"]) == 0
    return float(np.median(np.asarray(table["FLUX_MAX"], float)[ok] / flux[ok])) if ok.sum() >= 5 else float("nan")


def _concat(parts: list) -> dict:
    keys = ["frame", "exposure", "mjd", "exptime", "ra", "dec", "x", "y", "mag", "mag_err", "snr", "e", "fwhm", "theta", "a", "b",
            "pa_trail", "pos_err", "xd", "yd"]
    if not parts:
        return {k: np.zeros(0, dtype=object if k == "frame" else np.float64) for k in keys}
    return {k: np.concatenate([p[k] for p in parts]) for k in keys}


# --------------------------------------------------------------------------------------------
# 5. linking
# --------------------------------------------------------------------------------------------
def link_night(det: dict, linking: dict):
    """``link_tracklets`` on the night's detections (trail shapes, exposure times, positional errors
    and native detector pixels, where a hot pixel stays while the sky moves), with the keyword
    arguments of ``configs/moving`` (``_target_`` ignored)."""
    from .moving import link_tracklets

    def t(k):
        return torch.as_tensor(np.asarray(det[k], dtype=np.float64))

    extra = {"exptime": t("exptime")}
    if len(det["xd"]) and np.isfinite(det["xd"]).all():
        extra.update(x=t("xd"), y=t("yd"))
    kwargs = {k: v for k, v in dict(linking).items() if k != "_target_"}
    return link_tracklets(t("ra"), t("dec"), t("mjd"), mag=t("mag"), pos_err=t("pos_err"), a=t("a"), b=t("b"),
                          theta=t("pa_trail"), exposure=torch.as_tensor(np.asarray(det["exposure"], dtype=np.int64)),
                          **extra, **kwargs)


def tracklet_rows(det: dict, tracklets, *, prefix: str = "AP", grid_xy=None):
    """(table, index): ``tracklets.ecsv`` as an astropy Table, one row per linked detection, tracklets
    in order, detections in time order (see NIGHT_CONTRACT; ``obs80`` is added by
    :func:`write_night_outputs`), and the rows' indices into ``det``."""
    from astropy.table import Table

    labels = tracklets.labels.cpu().numpy()
    idx = np.flatnonzero(labels >= 0)
    idx = idx[np.lexsort((np.asarray(det["mjd"])[idx], labels[idx]))]
    k = labels[idx]
    if len(tracklets) and len(prefix) + len(str(len(tracklets))) > 7:
        raise ValueError(f"trksub_prefix {prefix!r} leaves too few characters for {len(tracklets)} tracklets (obs80: 7)")
    width = 7 - len(prefix)
    per = lambda name: getattr(tracklets, name).detach().cpu().numpy().astype(np.float64)[k]  # noqa: E731
    x = grid_xy[0][idx] if grid_xy is not None else np.asarray(det["x"])[idx]
    y = grid_xy[1][idx] if grid_xy is not None else np.asarray(det["y"])[idx]
    t = Table({
        "trksub": np.array([f"{prefix}{j + 1:0{width}d}" for j in k], dtype="U7"), "tracklet": k.astype(np.int64),
        "frame": np.array([str(f) for f in np.asarray(det["frame"])[idx]], dtype=str),
        "exposure": np.asarray(det["exposure"])[idx].astype(np.int64), "mjd": np.asarray(det["mjd"], np.float64)[idx],
        "ra": np.asarray(det["ra"])[idx], "dec": np.asarray(det["dec"])[idx], "x": x, "y": y,
        **{c: np.asarray(det[c], np.float64)[idx] for c in ("mag", "mag_err", "snr", "e", "fwhm", "theta")},
        "rate": per("rate"), "pa": per("pa"), "rms": per("rms"),
    })
    for c, u in (("ra", "deg"), ("dec", "deg"), ("fwhm", "arcsec"), ("theta", "deg"), ("rate", "arcsec/min"),
                 ("pa", "deg"), ("rms", "arcsec"), ("mjd", "d")):
        t[c].unit = u
    return t, idx


# --------------------------------------------------------------------------------------------
# 6. outputs
# --------------------------------------------------------------------------------------------
def _observations(rows, frames_by_name: dict, meta: dict):
    """The report observations of the linked detections (reports' column names)."""
    from astropy.table import Table

    exp = np.array([frames_by_name[f]["exptime"] for f in rows["frame"]], dtype=np.float64)
    seeing = np.array([frames_by_name[f].get("seeing", np.nan) for f in rows["frame"]], dtype=np.float64)
    rms = np.maximum(np.asarray(rows["rms"], np.float64), float(meta.get("rms_floor", 0.1)))
    return Table({"trkSub": rows["trksub"], "mjd": rows["mjd"], "ra": rows["ra"], "dec": rows["dec"],
                  "mag": np.round(np.asarray(rows["mag"], np.float64), 2), "band": [meta.get("band", "R")] * len(rows),
                  "rmsRA": rms, "rmsDec": rms, "logSNR": np.log10(np.clip(np.asarray(rows["snr"], np.float64), 1e-3, None)),
                  "seeing": seeing, "exp": exp})


def _stamps_on_grid(out_dir: Path, rows, size: int):
    """Science and difference stamps (len(rows), 1, size, size) cut from each frame's aligned and
    difference products (one read per frame; one gather per frame)."""
    from .io import read_fits
    from .sequences import sequence_stamps

    n = len(rows)
    sci = torch.full((n, 1, size, size), float("nan"))
    dif = torch.full((n, 1, size, size), float("nan"))
    frames = np.asarray(rows["frame"])
    for name in dict.fromkeys(frames.tolist()):
        sel = np.flatnonzero(frames == name)
        a, d = out_dir / f"{name}.aligned.fits", out_dir / f"{name}.diff.fits"
        if not (a.exists() and d.exists()):
            log.warning("night: %s has no aligned/difference products; its stamps stay NaN", name)
            continue
        xy = torch.as_tensor(np.stack([np.asarray(rows["x"])[sel], np.asarray(rows["y"])[sel]], 1))
        st = sequence_stamps(read_fits(a).data, read_fits(d).data, xy, torch.zeros(len(sel), dtype=torch.long), size)
        sci[torch.as_tensor(sel)], dif[torch.as_tensor(sel)] = st.science, st.difference
    return sci, dif


def write_night_outputs(out_dir: Path, rows, frames_by_name: dict, report_meta: dict, seq_cfg: dict) -> dict:
    """tracklets.ecsv (with obs80), the reports, sequences/ and cutouts/; returns step timings."""
    from . import reports
    from .sequences import CERES_SIZE, SequenceStamps, write_ceres_cutouts, write_sequence

    timings = {}
    t0 = time.perf_counter()
    obs = _observations(rows, frames_by_name, report_meta)
    rows["obs80"] = np.array(reports.format_obs80(obs, report_meta), dtype="U80") if len(rows) else np.zeros(0, "U80")
    # astropy's ECSV writer strips leading blanks unless told not to (its reader always strips
    # them: ``line.rjust(80)`` restores an obs80 line, whose last column is never blank)
    rows.write(out_dir / "tracklets.ecsv", format="ascii.ecsv", overwrite=True, strip_whitespace=False)
    reports.write_obs80(out_dir / "report.obs80.txt", obs, report_meta)
    reports.write_ades_psv(out_dir / "report.ades.psv", obs, report_meta)
    timings["reports"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    size = int(seq_cfg.get("size", 64))
    big = max(CERES_SIZE, size)
    sci, dif = _stamps_on_grid(out_dir, rows, big) if len(rows) else (None, None)
    lo = big // 2 - size // 2
    for trk in dict.fromkeys(np.asarray(rows["trksub"]).tolist()):
        sel = np.flatnonzero(np.asarray(rows["trksub"]) == trk)
        ts = torch.as_tensor(sel)
        crop = SequenceStamps(sci[ts, :, lo:lo + size, lo:lo + size], dif[ts, :, lo:lo + size, lo:lo + size], None)
        names = [str(f) for f in np.asarray(rows["frame"])[sel]]
        write_sequence(out_dir / "sequences", trk, crop, np.asarray(rows["mjd"])[sel], names,
                       zoom=int(seq_cfg.get("zoom", 3)), duration_ms=int(seq_cfg.get("duration_ms", 500)))
        c0 = big // 2 - CERES_SIZE // 2
        write_ceres_cutouts(out_dir / "cutouts", trk, sci[ts, :, c0:c0 + CERES_SIZE, c0:c0 + CERES_SIZE],
                            difference=dif[ts, :, c0:c0 + CERES_SIZE, c0:c0 + CERES_SIZE], frames=names,
                            mjd=np.asarray(rows["mjd"])[sel], ra=np.asarray(rows["ra"])[sel], dec=np.asarray(rows["dec"])[sel])
    timings["sequences"] = time.perf_counter() - t0
    return timings


# --------------------------------------------------------------------------------------------
# the command
# --------------------------------------------------------------------------------------------
def _calibrate_night(cfg, paths: list, out_dir: Path) -> tuple:
    """The raw frames (and reference) calibrated into ``<output>/calibrated/``, and the config that
    points at them (bias/dark/flat cleared: the per-frame graph must not calibrate them again)."""
    from omegaconf import OmegaConf

    from .pipeline import _calibrate_inputs

    paths, reference = _calibrate_inputs(cfg, paths, cfg.get("reference"), out_dir / "calibrated")
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.bias = cfg.dark = cfg.flat = None
    cfg.reference = reference
    return paths, cfg


def _solve_night(cfg, paths: list, out_dir: Path) -> tuple:
    """The frames' WCS solved against ``astrometry.catalog`` into ``<output>/solved/`` (see
    :mod:`astroprep_torch.pipeline.astrometry_step`), and the config that points at them (the
    catalog cleared: the per-frame graph must not solve them again)."""
    from omegaconf import OmegaConf

    from .pipeline import solve_inputs

    paths = solve_inputs(cfg, paths, out_dir / "solved", cfg.get("reference"))
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    cfg.astrometry.catalog = None
    return paths, cfg


def _run_graph(cfg, frames: list, reference: Path, out_dir: Path) -> dict:
    """The per-frame graph over ``frames`` with ``reference`` (``astroprep run``'s machinery);
    returns the manifest rows by frame name."""
    from omegaconf import OmegaConf

    from .pipeline import read_manifest, run_from_config

    lst = out_dir / "night_inputs.txt"
    lst.write_text("".join(f"{Path(f['path']).resolve()}\n" for f in frames))
    sub = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    for k in ("linking", "report", "sequence", "template", "detections", "min_snr", "zeropoint", "trksub_prefix"):
        sub.pop(k, None)
    sub.input, sub.reference, sub.output, sub.needs_reference = str(lst), str(reference), str(out_dir), True
    sub.quicklook = bool(cfg.get("quicklook", False))
    run_from_config(sub)
    return read_manifest(out_dir)


def _catalog_and_wcs(out_dir: Path, frame: dict, source: str, grid_header):
    from astropy.table import Table
    from astropy.wcs import WCS

    suffix = "candidates" if source == "difference" else "cat"
    table = Table.read(out_dir / f"{frame['name']}.{suffix}.ecsv", format="ascii.ecsv")
    header = grid_header if source == "difference" else frame["header"]
    return table, WCS(header).celestial


def _collect(out_dir: Path, frames: list, manifest: dict, cfg, grid_header) -> tuple:
    """Detections of every processed frame; frames the graph failed on are marked failed."""
    source = detection_source(cfg, grid_header)
    parts, ok = [], []
    for f in frames:
        row = manifest.get(f["name"])
        if row is None or row["status"] != "ok":
            f["status"], f["reason"] = "failed", (row or {}).get("reason") or "the per-frame graph did not process it"
            continue
        table, wcs = _catalog_and_wcs(out_dir, f, source, grid_header)
        f["status"], f["reason"] = "ok", None
        stars, swcs = _catalog_and_wcs(out_dir, f, "science", grid_header)
        ratio = star_peak_ratio(stars) * float(cfg.get("max_sharpness") or np.nan)
        parts.append(read_detections(table, wcs, f, len(ok), zeropoint=cfg.get("zeropoint"),
                                     min_snr=float(cfg.get("min_snr", 5.0)),
                                     max_peak_ratio=ratio if np.isfinite(ratio) else None,
                                     drop_flags=int(cfg.get("drop_flags") or 0)))
        f["seeing"] = _seeing(stars, swcs)
        ok.append(f)
    det = _concat(parts)
    finite = np.isfinite(det["ra"]) & np.isfinite(det["dec"])  # pixels the WCS cannot map are not linked
    det = {k: v[finite] for k, v in det.items()}
    return det, ok


def detection_source(cfg, grid_header=None) -> str:
    """``detections``: ``difference``, ``science``, or ``auto``: the difference images against a given
    reference, each frame's own catalog without one. On simulated nights (experiments/results/
    night_template.md) the frames' own catalogs found as many movers as the differences against the
    night's median template at 1"/px and more at 11.7"/px, where slow movers stay within the PSF
    all night and the median template subtracts them."""
    source = str(cfg.get("detections", "auto"))
    if source not in ("auto", "difference", "science"):
        raise ValueError(f"detections must be 'auto', 'difference' or 'science', got {source!r}")
    if source != "auto":
        return source
    return "difference" if cfg.get("reference") else "science"


def _seeing(stars, wcs) -> float:
    """Median FWHM (arcsec, 2 x FLUX_RADIUS) of a frame's bright sources."""
    if not len(stars) or "FLUX_RADIUS" not in stars.colnames:
        return float("nan")
    snr = np.asarray(stars["FLUX_AUTO"], float) / np.maximum(np.asarray(stars["FLUXERR_AUTO"], float), 1e-30)
    r = np.asarray(stars["FLUX_RADIUS"], float)[snr >= 20]
    return float(2 * np.median(r) * _pixel_scale(wcs)) if len(r) else float("nan")


def _grid_xy(det: dict, grid_header):
    """Pixel positions (0-based) of the detections on the reference grid (the products' grid)."""
    from astropy.wcs import WCS

    if not len(det["ra"]):
        return np.zeros(0), np.zeros(0)
    x, y = WCS(grid_header).celestial.all_world2pix(det["ra"], det["dec"], 0)
    return np.asarray(x, float), np.asarray(y, float)


def _night_json(out_dir: Path, frames: list, reference, template: str, tracklets, n_linked: int, meta: dict,
                timings: dict, message: Optional[str], detections: Optional[str] = None) -> dict:
    doc = {"kind": "night", "version": 1,
           "frames": [{"name": f["name"], "path": f["path"], "mjd": f.get("mjd"), "exptime": f.get("exptime"),
                       "status": f.get("status", "failed"), "reason": f.get("reason")} for f in frames],
           "reference": str(reference) if reference is not None else None, "template": template,
           "n_tracklets": int(len(tracklets)) if tracklets is not None else 0, "n_linked": int(n_linked),
           "observatory": {"code": str(meta.get("station", "")), "name": meta.get("observatory_name")},
           "report": meta,
           "timings": {k: round(float(v), 3) for k, v in timings.items()}}
    if message:
        doc["message"] = message
    if detections:
        doc["detections"] = detections
    (out_dir / "night.json").write_text(json.dumps(doc, indent=2))
    return doc


def _reference(cfg, good: list, out_dir: Path) -> tuple:
    """(reference path, template kind): the given reference, or the night's median template."""
    ref = cfg.get("reference")
    if ref:
        if not Path(str(ref)).is_file():
            raise FileNotFoundError(f"reference: {ref} does not exist")
        return Path(str(ref)), "reference"
    return night_template(good, out_dir / "template.fits"), "night"


def run_night(cfg) -> dict:
    """What ``astroprep night`` does (see the module docstring and ``configs/night.yaml``)."""
    from astropy.io import fits

    from .data import resolve_inputs

    if not cfg.get("input"):
        raise ValueError("astroprep night needs input=<frames: glob, folder or list file>")
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    timings, t_all = {}, time.perf_counter()
    t0 = time.perf_counter()
    paths = resolve_inputs(cfg.input)
    if any(cfg.get(k) for k in ("bias", "dark", "flat")):  # raw frames: CCD calibration first, as astroprep run
        paths, cfg = _calibrate_night(cfg, paths, out_dir)
        timings["calibrate"] = time.perf_counter() - t0
        t0 = time.perf_counter()
    if (cfg.get("astrometry") or {}).get("catalog"):  # frames' WCS solved first: the template is built through them
        paths, cfg = _solve_night(cfg, paths, out_dir)
        timings["astrometry"] = time.perf_counter() - t0
        t0 = time.perf_counter()
    good, failed = frame_times(paths)
    timings["times"] = time.perf_counter() - t0
    for f in failed:
        print(f"[astroprep night] skipped {f['path']}: {f['reason']}")
    from omegaconf import OmegaConf

    meta = OmegaConf.to_container(cfg.report, resolve=True)
    min_det = int(cfg.linking.get("min_detections", 3))
    if not good:
        _night_json(out_dir, failed, None, "none", None, 0, meta, timings, "no frame with a usable time")
        raise ValueError("astroprep night: no input frame has a usable observation time: "
                         + "; ".join(f["reason"] for f in failed))
    t0 = time.perf_counter()
    reference, template = _reference(cfg, good, out_dir)
    timings["template"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    manifest = _run_graph(cfg, good, reference, out_dir)
    timings["pipeline"] = time.perf_counter() - t0
    grid_header = fits.getheader(reference)
    det, ok = _collect(out_dir, good, manifest, cfg, grid_header)
    source = detection_source(cfg, grid_header)
    t0 = time.perf_counter()
    message = None
    if len(ok) < min_det:
        message = f"{len(ok)} usable frame(s), fewer than linking.min_detections = {min_det}: nothing to link"
        print(f"[astroprep night] {message}")
    tracklets = link_night(det, OmegaConf.to_container(cfg.linking, resolve=True))
    timings["linking"] = time.perf_counter() - t0
    rows, _ = tracklet_rows(det, tracklets, prefix=str(cfg.get("trksub_prefix", "AP")), grid_xy=_grid_xy(det, grid_header))
    timings.update(write_night_outputs(out_dir, rows, {f["name"]: f for f in ok}, meta, dict(cfg.get("sequence") or {})))
    timings["total"] = time.perf_counter() - t_all
    doc = _night_json(out_dir, good + failed, reference, template, tracklets, len(rows), meta, timings, message,
                      detections=source)
    print(f"[astroprep night] {len(ok)} frames linked ({len(failed) + len(good) - len(ok)} skipped), "
          f"{len(det['ra'])} detections, {len(tracklets)} tracklets, {len(rows)} linked detections -> {out_dir}")
    return doc


# --------------------------------------------------------------------------------------------
# astroprep simulate-night
# --------------------------------------------------------------------------------------------
def write_simulated_night(night, out_dir) -> dict:
    """Write a :class:`~astroprep_torch.sim.SimNight` as FITS frames (``frame<k>.fits``) and its
    movers' truth (``movers.truth.ecsv``: one row per mover and frame)."""
    from astropy.table import Table

    from .io import write_fits

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, f in enumerate(night.frames):
        paths.append(write_fits(out_dir / f"frame{k:02d}.fits", f.image, header=f.header, overwrite=True))
    m = night.movers
    n_obj, n_fr = m["ra"].shape
    cols = {"object": np.repeat(np.arange(n_obj), n_fr), "frame": np.tile([p.stem for p in paths], n_obj)}
    for k in ("ra", "dec", "x", "y", "mjd", "trail", "snr", "in_frame"):
        if k in m:
            cols[k] = m[k].detach().cpu().numpy().reshape(-1)
    for k in ("rate", "pa", "mag"):
        cols[k] = np.repeat(m[k].detach().cpu().numpy(), n_fr)
    truth = out_dir / "movers.truth.ecsv"
    Table(cols).write(truth, overwrite=True)
    return {"frames": [str(p) for p in paths], "truth": str(truth)}


def score_tracklets(rows, truth, *, match_arcsec: float = 2.0, min_detections: int = 3, min_snr: float = 5.0,
                    min_motion_arcsec: float = 0.0) -> dict:
    """Linked detections (``tracklets.ecsv`` rows) against a simulated night's truth
    (``movers.truth.ecsv``): completeness = correctly linked / findable movers (at least
    ``min_detections`` frames in the field with S/N >= ``min_snr``, and moving at least
    ``min_motion_arcsec`` on the sky between the first and last of them); purity = tracklets whose
    detections all match one mover; false tracklets; median relative rate error and PA error."""
    from astropy.coordinates import SkyCoord
    import astropy.units as u

    truth_obj = np.full(len(rows), -1)
    for fr in set(np.asarray(rows["frame"]).tolist()):
        r = np.flatnonzero(np.asarray(rows["frame"]) == fr)
        t = np.flatnonzero(np.asarray(truth["frame"]) == fr)
        if not len(t):
            continue
        c = SkyCoord(np.asarray(rows["ra"])[r] * u.deg, np.asarray(rows["dec"])[r] * u.deg)
        ct = SkyCoord(np.asarray(truth["ra"])[t] * u.deg, np.asarray(truth["dec"])[t] * u.deg)
        j, d, _ = c.match_to_catalog_sky(ct)
        truth_obj[r] = np.where(d.arcsec < match_arcsec, np.asarray(truth["object"])[t][j], -1)
    ok = np.asarray(truth["in_frame"], bool) & (np.asarray(truth["snr"], float) >= min_snr)
    counts = np.bincount(np.asarray(truth["object"])[ok], minlength=int(np.max(truth["object"])) + 1)
    findable = set(np.flatnonzero(counts >= min_detections).tolist())
    if min_motion_arcsec > 0:
        findable = {o for o in findable if _motion_arcsec(truth, ok, o) >= min_motion_arcsec}
    found, pure, rate_err, pa_err, n_trk = set(), 0, [], [], 0
    rate_true = {int(o): float(r) for o, r in zip(truth["object"], truth["rate"])}
    pa_true = {int(o): float(p) for o, p in zip(truth["object"], truth["pa"])}
    for k in set(np.asarray(rows["tracklet"]).tolist()):
        n_trk += 1
        sel = np.asarray(rows["tracklet"]) == k
        objs = set(truth_obj[sel].tolist())
        if len(objs) == 1 and -1 not in objs:
            pure += 1
            o = objs.pop()
            found.add(o)
            rate_err.append(abs(float(np.asarray(rows["rate"])[sel][0]) / rate_true[o] - 1))
            pa_err.append(abs((float(np.asarray(rows["pa"])[sel][0]) - pa_true[o] + 180) % 360 - 180))
    return {"findable": len(findable), "found": len(found & findable), "completeness": len(found & findable) / max(len(findable), 1),
            "tracklets": n_trk, "pure": pure, "purity": pure / max(n_trk, 1), "false_tracklets": n_trk - pure,
            "median_rate_error": float(np.median(rate_err)) if rate_err else float("nan"),
            "median_pa_error_deg": float(np.median(pa_err)) if pa_err else float("nan"),
            "missed": sorted(findable - found), "found_ids": sorted(found & findable), "findable_ids": sorted(findable)}


def _motion_arcsec(truth, ok, obj: int) -> float:
    from astropy.coordinates import SkyCoord

    sel = ok & (np.asarray(truth["object"]) == obj)
    ra, dec = np.asarray(truth["ra"], float)[sel], np.asarray(truth["dec"], float)[sel]
    if not len(ra):
        return 0.0
    return float(SkyCoord(ra[0], dec[0], unit="deg").separation(SkyCoord(ra[-1], dec[-1], unit="deg")).arcsec)
