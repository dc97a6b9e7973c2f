"""Astrometry before alignment: with ``astrometry.catalog=<table>``, ``astroprep run`` and ``astroprep
night`` solve each science frame's WCS against the reference catalog
(:func:`astroprep_torch.astrometry.solve_image`, options from ``configs/astrometry/``) before the graph
runs. Each frame is copied into ``<output>/solved/<frame>.fits`` with its pixels untouched and the
solved WCS in its header (SIP/TPV keys replaced, SCAMP's ``ASTRRMS1``/``ASTRRMS2`` in degrees,
``ASTRNMAT`` and ``ASTRRMS``, the 2-D residual rms in arcsec), so that the graph aligns it through the
solved WCS and its products carry the solution. Off (``catalog: null``) the inputs are used as given.

Assumed: every science frame has a celestial WCS in its header, off by at most a few arcmin in
pointing, a degree in rotation and a few % in scale (what :func:`~astroprep_torch.astrometry.solve_astrometry`
tolerates), and the catalog covers the field. A frame that cannot be solved stops the run with an
:class:`~astroprep_torch._checks.InputError` naming it (``on_failure: error``) or keeps its header's
WCS, with a warning (``on_failure: keep``).
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from astropy.io import fits
from astropy.time import Time
from omegaconf import OmegaConf

from .. import data as data_mod
from .._checks import InputError
from ..astrometry import AstrometryError, AstrometryResult, load_catalog, solve_image, solved_header
from ..io import read_fits
from ..obstime import ObservationTimeError, observation_time

log = logging.getLogger("astroprep_torch.pipeline")

#: Keys of the ``astrometry`` config group that belong to the step, not to ``solve_astrometry``.
STEP_KEYS = ("catalog", "thresh", "max_detections", "on_failure")

#: Per-frame keywords of the solution that reference-grid products carry too (see ``FrameWriter``).
SOLUTION_KEYS = ("ASTRRMS", "ASTRRMS1", "ASTRRMS2", "ASTRNMAT")


class StepOptions(NamedTuple):
    """The step's settings from the ``astrometry`` config group."""

    catalog: str
    thresh: float
    max_detections: int
    on_failure: str
    solver: dict  # keyword arguments of solve_astrometry (order, distortion, match_tol, ...)


def astrometry_requested(cfg) -> bool:
    """Whether the config turns the step on (an ``astrometry`` group with a ``catalog``)."""
    group = cfg.get("astrometry")
    return group is not None and bool(group.get("catalog"))


def step_options(cfg) -> StepOptions:
    """The step's options; a bad ``on_failure`` is an :class:`InputError`."""
    opts = OmegaConf.to_container(cfg.astrometry, resolve=True)
    step = {k: opts.pop(k, None) for k in STEP_KEYS}
    on_failure = str(step["on_failure"] or "error")
    if on_failure not in ("error", "keep"):
        raise InputError(f"astrometry.on_failure must be 'error' or 'keep', got {on_failure!r}")
    return StepOptions(str(step["catalog"]), float(step["thresh"] or 5.0), int(step["max_detections"] or 5000),
                       on_failure, opts)


def solve_inputs(cfg, paths: Sequence, folder: Path, reference=None) -> list:
    """Solve every frame of ``paths`` but the ``reference`` (see the module docstring); returns the
    paths to process: the solved copies in ``folder``, each with its variance map beside it when
    the frame had one (the reference, and with ``on_failure: keep`` a frame that failed, as given)."""
    options = step_options(cfg)
    _check_catalog(options.catalog)
    folder.mkdir(parents=True, exist_ok=True)
    skip = Path(reference).resolve() if reference is not None else None
    catalogs: dict = {}
    out = []
    for path, name in zip(paths, data_mod.frame_names(paths)):
        solved = None if Path(path).resolve() == skip else \
            _solve_frame(Path(path), folder / f"{name}.fits", options, catalogs)
        out.append(solved if solved is not None else path)
    return out


def _check_catalog(source: str) -> None:
    """Read the catalog once up front: a missing file or one without RA/Dec columns is an
    :class:`InputError` naming it, before any frame is solved."""
    try:
        n = len(load_catalog(source))
    except (OSError, ValueError) as exc:
        raise InputError(f"astrometry.catalog: {exc}") from None
    if n == 0:
        raise InputError(f"astrometry.catalog: {source} has no star with a finite RA, Dec and magnitude")


def _catalog_at(source: str, header, catalogs: dict):
    """The catalog at the frame's epoch (proper motions applied; Julian years rounded to 0.01, so the
    frames of a night share one read); at the catalog's own epoch when the header has no time."""
    try:
        epoch = round(float(Time(observation_time(header).mjd, format="mjd").jyear), 2)
    except ObservationTimeError:
        epoch = None
    if epoch not in catalogs:
        catalogs[epoch] = load_catalog(source, epoch=epoch)
    return catalogs[epoch]


def _solve_frame(path: Path, target: Path, options: StepOptions, catalogs: dict) -> Optional[Path]:
    """Solve one frame and write its copy with the solved header to ``target`` (returned); on a
    failure raise or (``on_failure: keep``) warn and return None."""
    frame = read_fits(path)
    try:
        if frame.wcs is None:
            raise AstrometryError("no celestial WCS in its header to start from")
        result = solve_image(frame.data, _catalog_at(options.catalog, frame.header, catalogs), mask=frame.mask,
                             wcs=frame.wcs, thresh=options.thresh, max_detections=options.max_detections,
                             **options.solver)
    except AstrometryError as exc:
        if options.on_failure == "error":
            raise InputError(f"astrometry: {path}: {exc} (catalog {options.catalog}; "
                             "astrometry.on_failure=keep keeps the header's WCS instead)") from None
        log.warning("astrometry: %s: %s; its header's WCS is kept", path, exc)
        print(f"[astroprep] astrometry: {path.name}: FAILED ({exc}); the header's WCS is kept")
        return None
    _write_solved(path, target, result)
    _carry_variance(path, target)
    print(f"[astroprep] astrometry: {path.name}: {result.n_matches} stars, rms {result.rms_arcsec:.3f} arcsec "
          f"({result.rms_px:.3f} px) -> {target}")
    return target


def _carry_variance(path: Path, target: Path) -> None:
    """The frame's variance map (:func:`astroprep_torch.data.variance_path`) goes beside its solved
    copy (a hard link, else a copy): the pixels are the same, so is their variance."""
    var = data_mod.variance_path(path)
    if var is None:
        return
    dest = target.with_name(target.name[: -len(".fits")] + data_mod.VARIANCE_SUFFIX)
    dest.unlink(missing_ok=True)
    try:
        os.link(var, dest)
    except OSError:
        shutil.copyfile(var, dest)


def _write_solved(path: Path, target: Path, result: AstrometryResult) -> None:
    """Copy ``path`` to ``target`` with the solution in the header of its image HDU (the pixels are
    written as stored: no scaling applied or undone)."""
    with fits.open(path, do_not_scale_image_data=True) as hdul:
        hdu = next(h for h in hdul if h.is_image and h.header.get("NAXIS", 0) >= 2)
        header = solved_header(hdu.header, result)
        header["ASTRRMS"] = (float(result.rms_arcsec), "[arcsec] astrometric residual rms (2-D)")
        hdu.header = header
        hdul.writeto(target, overwrite=True, output_verify="silentfix")
