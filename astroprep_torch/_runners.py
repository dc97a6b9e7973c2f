"""What each ``astroprep`` command does with its resolved Hydra config (see :mod:`astroprep_torch.cli`)."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def run_simulate(cfg: DictConfig) -> dict:
    from hydra.utils import instantiate

    from .sim import write_simulated_pair

    t0 = time.perf_counter()
    pair = instantiate(cfg.sim)
    t_sim = time.perf_counter() - t0
    paths = write_simulated_pair(pair, Path(cfg.output))
    h, w = pair.science.shape
    print(f"simulated a {h}x{w} epoch pair in {t_sim:.2f} s: "
          f"{int((pair.reference.catalog['kind'] == 0).sum())} stars, "
          f"{pair.transients['x'].numel()} transients, {pair.moving['x'].numel()} moving objects")
    for k, p in paths.items():
        print(f"  {k:<17} {p}")
    return {k: str(v) for k, v in paths.items()}


def run_calibrate(cfg: DictConfig) -> list:
    from .calibrate import calibrate_from_config

    t0 = time.perf_counter()
    paths = calibrate_from_config(cfg)
    print(f"calibrated {len(paths)} frame(s) in {time.perf_counter() - t0:.1f} s -> {cfg.output}")
    return [str(p) for p in paths]


def run_pipeline(cfg: DictConfig):
    from .pipeline import run_from_config

    return run_from_config(cfg)


def run_extract(cfg: DictConfig):
    """``astroprep extract``: with ``sex=<file.sex>`` SExtractor's own configuration files
    (:mod:`astroprep_torch.classic`), else the extract preset of the pipeline."""
    if cfg.get("sex"):
        from .classic import run_from_hydra

        return run_from_hydra(cfg, "extract")
    return run_pipeline(cfg)


def run_background(cfg: DictConfig):
    """``astroprep background``: with ``sex=<file.sex>`` its BACK_* keys (:mod:`astroprep_torch.classic`),
    else the background preset of the pipeline."""
    if cfg.get("sex"):
        from .classic import run_from_hydra

        return run_from_hydra(cfg, "background")
    return run_pipeline(cfg)


def run_subtract(cfg: DictConfig):
    """``astroprep subtract``: with ``hotpants="<flags>"`` a HOTPANTS command line's fit
    (:mod:`astroprep_torch.classic`), else the subtract preset of the pipeline."""
    if cfg.get("hotpants"):
        from .classic import run_subtract_from_hydra

        return run_subtract_from_hydra(cfg)
    return run_pipeline(cfg)


def run_reproject(cfg: DictConfig):
    """``astroprep reproject``: with ``swarp=<file.swarp>`` / ``head=<target.head>`` SWarp's keys and
    target grid (:mod:`astroprep_torch.classic`), else the reproject preset of the pipeline."""
    if cfg.get("swarp") or cfg.get("head"):
        from .classic import run_reproject_from_hydra

        return run_reproject_from_hydra(cfg)
    return run_pipeline(cfg)


def run_train_quality(cfg: DictConfig):
    from .quality import train_from_config

    return train_from_config(cfg)


def run_train_classifier(cfg: DictConfig):
    from .classify import train_from_config

    return train_from_config(cfg)


def run_night(cfg: DictConfig):
    from .night import run_night as _run

    return _run(cfg)


def run_simulate_night(cfg: DictConfig) -> dict:
    from hydra.utils import instantiate

    from .night import write_simulated_night

    t0 = time.perf_counter()
    night = instantiate(cfg.night)
    paths = write_simulated_night(night, Path(cfg.output))
    print(f"simulated a night of {len(night.frames)} frames ({time.perf_counter() - t0:.1f} s), "
          f"{night.movers['rate'].numel()} movers -> {cfg.output}")
    return paths

def run_serve(cfg: DictConfig):
    from .web.commands import serve

    return serve(cfg)


def run_user(cfg: DictConfig):
    from .web.commands import user

    return user(cfg)


def run_ingest(cfg: DictConfig):
    from .web.commands import ingest

    return ingest(cfg)


def run_export_labels(cfg: DictConfig):
    from .web.commands import export

    return export(cfg)


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)




def _frame_epoch(header):
    """Julian year of a frame from MJD-OBS or DATE-OBS (None when neither is there)."""
    from astropy.time import Time

    try:
        if header.get("MJD-OBS") is not None:
            return float(Time(float(header["MJD-OBS"]), format="mjd").jyear)
        if header.get("DATE-OBS"):
            return float(Time(str(header["DATE-OBS"])).jyear)
    except ValueError:
        return None
    return None


def _input_paths(cfg: DictConfig) -> list:
    """The FITS files named by ``input=`` (files, folders, globs, list files), at least one."""
    from .data import resolve_inputs

    paths = resolve_inputs(cfg.input)
    if not paths:
        raise FileNotFoundError(f"input: no FITS files in {cfg.input}")
    return paths


def run_astrometry(cfg: DictConfig) -> dict:
    """``astroprep astrometry``: solve each frame against ``catalog``; write ``<frame>.head`` and ``<frame>.fits``."""
    import json

    import torch
    from hydra.utils import instantiate

    from . import data as data_mod
    from .astrometry import AstrometryError, load_catalog, solve_image, solved_header, write_head
    from .io import read_fits, write_fits

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    paths = _input_paths(cfg)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    background, extractor = instantiate(cfg.background), instantiate(cfg.detect, _convert_="all")
    options = OmegaConf.to_container(cfg.astrometry, resolve=True)
    summary = {}
    for p in paths:
        name = data_mod.frame_name(p)
        t0 = time.perf_counter()
        frame = read_fits(p)
        if frame.wcs is None and cfg.get("pointing") is None:
            raise ValueError(f"{p}: no supported WCS in the header; give pointing=[ra,dec] and pixel_scale=")
        start = dict(wcs=frame.wcs) if cfg.get("pointing") is None else dict(
            pointing=tuple(cfg.pointing), pixel_scale=float(cfg.pixel_scale))
        ref = load_catalog(cfg.catalog, epoch=_frame_epoch(frame.header))
        try:
            res = solve_image(frame.data, ref, mask=frame.mask, background=background, extractor=extractor,
                              max_detections=int(cfg.max_detections), **start, **options)
        except AstrometryError as exc:
            print(f"[astroprep] {name}: FAILED: {exc}")
            summary[name] = {"ok": False, "error": str(exc)}
            continue
        write_head(out / f"{name}.head", res.header)
        write_fits(out / f"{name}.fits", frame.data, header=solved_header(frame.header, res), overwrite=True)
        summary[name] = {"ok": True, "n_matches": res.n_matches, "rms_arcsec": res.rms_arcsec, "rms_px": res.rms_px,
                         "seconds": time.perf_counter() - t0}
        print(f"[astroprep] {name}: {res.n_matches} stars, rms {res.rms_arcsec:.3f} arcsec ({res.rms_px:.3f} px) "
              f"-> {out / (name + '.head')}")
    (out / "astrometry.json").write_text(json.dumps(summary, indent=2))
    return summary


def run_stack(cfg: DictConfig) -> dict:
    """``astroprep stack``: co-add the input frames; write coadd.fits, coadd.weight.fits, coadd.exposure.fits."""
    import torch

    from .stack import build_template

    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    paths = _input_paths(cfg)
    options = OmegaConf.to_container(cfg.stack, resolve=True)
    if cfg.get("combine"):
        options["combine"] = str(cfg.combine)
    weights = list(cfg.weights) if cfg.get("weights") else None
    t0 = time.perf_counter()
    written = build_template(paths, cfg.output, reference=cfg.get("reference"), weights=weights, **options)
    print(f"[astroprep] stacked {len(paths)} frames ({options['combine']}) in {time.perf_counter() - t0:.1f} s "
          f"-> {written['coadd']}")
    return {k: str(v) for k, v in written.items()}

__all__ = ["run_simulate", "run_pipeline", "run_train_quality", "run_train_classifier",
           "run_night", "run_simulate_night", "run_serve", "run_user", "run_ingest", "run_export_labels",
           "run_astrometry", "run_stack", "run_extract", "run_background", "run_subtract", "run_reproject", "run_calibrate"]
