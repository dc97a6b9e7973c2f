"""What each ``astroprep`` command does with its resolved Hydra config (see :mod:`astroprep_torch.cli`)."""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf


def _write_frame(path: Path, frame, overwrite: bool = True) -> None:
    from .io import write_fits

    write_fits(path, frame.image, header=frame.header, overwrite=overwrite)


def _truth_table(catalog: dict):
    from astropy.table import Table

    t = Table({k: v.detach().cpu().numpy() for k, v in catalog.items()})
    t.meta["comment"] = ["x, y: 0-based pixel coordinates (x = column, y = row)"]
    return t


def write_simulated_pair(pair, outdir: Path) -> dict[str, Path]:
    """Write a :class:`~astroprep_torch.sim.SimPair` as FITS frames plus ECSV truth catalogs."""
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


def run_simulate(cfg: DictConfig) -> dict:
    from hydra.utils import instantiate

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


def run_train_quality(cfg: DictConfig):
    from .quality import train_from_config

    return train_from_config(cfg)


def run_train_classifier(cfg: DictConfig):
    from .classify import train_from_config

    return train_from_config(cfg)


def resolved_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)


__all__ = ["run_simulate", "run_calibrate", "run_pipeline", "run_train_quality", "run_train_classifier", "write_simulated_pair"]
