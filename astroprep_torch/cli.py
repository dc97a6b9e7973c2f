"""Command line: ``astroprep <command> [hydra overrides]``.

Commands (each a Hydra app over the project's ``configs/``; any ``key=value`` override works and
``-m`` runs a multirun sweep):

* ``astroprep run`` -- the default pipeline (the paper's GWAC graph) on an embedded simulated
  two-epoch field, or on real FITS files with ``input=... reference=... output=...``.
* ``astroprep simulate`` -- write a simulated GWAC-like epoch pair as FITS files with WCS.
* ``astroprep calibrate`` -- CCD calibration of raw frames (``bias=... dark=... flat=... input=... output=...``).
* ``astroprep train-quality`` -- train the image-quality autoencoder.
* ``astroprep train-classifier`` -- train an alert classifier.
* ``astroprep background | extract | reproject | subtract`` -- drop-in presets for the classic tools
  on FITS files (SExtractor check images, SExtractor catalog, SWarp/reproject, HOTPANTS).

``astroprep --help`` lists them; ``astroprep run --help`` shows Hydra's help with the config.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: command -> (config name, function name in this module)
COMMANDS = {
    "run": ("config", "run_pipeline"),
    "simulate": ("simulate", "run_simulate"),
    "calibrate": ("calibrate", "run_calibrate"),
    "train-quality": ("train_quality", "run_train_quality"),
    "train-classifier": ("train_classifier", "run_train_classifier"),
    "background": ("tool_background", "run_pipeline"),
    "extract": ("tool_extract", "run_pipeline"),
    "reproject": ("tool_reproject", "run_pipeline"),
    "subtract": ("tool_subtract", "run_pipeline"),
}


def config_dir() -> Path:
    """The project's Hydra config folder (``configs/`` beside the package, or ASTROPREP_CONFIGS)."""
    env = os.environ.get("ASTROPREP_CONFIGS")
    candidates = [Path(env)] if env else []
    here = Path(__file__).resolve().parent
    candidates += [here.parent / "configs", here / "configs"]
    for c in candidates:
        if (c / "config.yaml").is_file():
            return c
    raise FileNotFoundError(
        "astroprep: cannot find the Hydra configs (configs/config.yaml) beside the package; install the "
        "project in editable mode (pip install -e .) or set ASTROPREP_CONFIGS to the configs folder"
    )


def _usage() -> str:
    lines = ["usage: astroprep <command> [key=value ...] [-m]", "", "commands:"]
    doc = {
        "run": "run the preprocessing pipeline (default: embedded simulated GWAC-like field)",
        "simulate": "write a simulated GWAC-like epoch pair as FITS files",
        "calibrate": "CCD calibration: master bias/dark/flat applied to raw frames",
        "train-quality": "train the image-quality autoencoder",
        "train-classifier": "train an alert (real/bogus) classifier",
        "background": "SExtractor-like BACKGROUND / BACKGROUND_RMS maps of FITS files",
        "extract": "SExtractor-like catalogs of FITS files",
        "reproject": "reproject FITS files onto a target header (SWarp / reproject)",
        "subtract": "image subtraction of FITS pairs (HOTPANTS)",
    }
    for k in COMMANDS:
        lines.append(f"  {k:<18}{doc[k]}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Console entry point ``astroprep``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # Lightning's DDP launcher re-runs this program for the other ranks with the Hydra overrides but
    # without the command word: the command travels in the environment.
    inherited = os.environ.get("ASTROPREP_COMMAND")
    if inherited in COMMANDS and (not argv or argv[0] not in COMMANDS) and os.environ.get("LOCAL_RANK", "0") != "0":
        argv = [inherited] + argv
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    command = argv[0]
    if command not in COMMANDS:
        print(f"astroprep: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    config_name, fn_name = COMMANDS[command]

    import hydra
    from omegaconf import DictConfig

    from . import _runners

    target = getattr(_runners, fn_name)

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)
    def _app(cfg: DictConfig):
        return target(cfg)

    os.environ["ASTROPREP_COMMAND"] = command
    old = sys.argv
    sys.argv = [old[0] if old else "astroprep"] + argv[1:]
    try:
        _app()
    finally:
        sys.argv = old
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
