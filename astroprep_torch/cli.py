"""Command line: ``astroprep <command> [hydra overrides]``.

Commands (each a Hydra app over the project's ``configs/``; any ``key=value`` override works and
``-m`` runs a multirun sweep):

* ``astroprep run`` -- the default pipeline (the paper's GWAC graph) on an embedded simulated
  two-epoch field, or on real FITS files with ``input=... reference=... output=...``.
* ``astroprep simulate`` -- write a simulated GWAC-like epoch pair as FITS files with WCS.
* ``astroprep calibrate`` -- CCD calibration of raw frames (``bias=... dark=... flat=... input=... output=...``).
* ``astroprep train-quality`` -- train the image-quality autoencoder.
* ``astroprep train-classifier`` -- train an alert classifier.
* ``astroprep night`` -- a night of frames of one field: the per-frame graph, then moving objects
  linked across the night, MPC 80-column and ADES reports, sequences and CERES cutouts per object.
* ``astroprep simulate-night`` -- write a simulated night (frames + movers' truth) as FITS files.
* ``astroprep background | extract | reproject | subtract`` -- drop-in presets for the classic tools
  on FITS files (SExtractor check images, SExtractor catalog, SWarp/reproject, HOTPANTS).
* ``astroprep serve | user | ingest | export-labels`` -- the validation web application (extra ``web``).
* ``astroprep astrometry input=... catalog=... output=...`` -- WCS solutions against a reference
  catalog (SCAMP): ``<frame>.head`` and ``<frame>.fits`` per frame.
* ``astroprep stack input=... output=... combine=median [reference=...]`` -- co-add (SWarp):
  ``coadd.fits``, ``coadd.weight.fits``, ``coadd.exposure.fits``.

``astroprep --help`` lists them; ``astroprep run --help`` shows Hydra's help with the config.

Exit status: 0 when every frame was processed (or skipped as finished), 1 when some frames failed
(how many is printed; each with its reason in the summary and the manifest), 2 when the run could
not start or had to stop (bad input such as a missing reference, a full output disk): a message,
no traceback.
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
    "background": ("tool_background", "run_background"),
    "extract": ("tool_extract", "run_extract"),
    "reproject": ("tool_reproject", "run_reproject"),
    "subtract": ("tool_subtract", "run_subtract"),
    "night": ("night", "run_night"),
    "simulate-night": ("simulate_night", "run_simulate_night"),
    "serve": ("serve", "run_serve"),
    "user": ("user", "run_user"),
    "ingest": ("ingest", "run_ingest"),
    "export-labels": ("export_labels", "run_export_labels"),
    "astrometry": ("astrometry", "run_astrometry"),
    "stack": ("stack", "run_stack"),
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
        "background": "SExtractor-like BACKGROUND / BACKGROUND_RMS maps of FITS files (sex=<file.sex>)",
        "extract": "SExtractor-like catalogs of FITS files (sex=<file.sex>: SExtractor's own files)",
        "reproject": "reproject FITS files onto a target header (SWarp: swarp=<file.swarp> head=<target.head>)",
        "subtract": "image subtraction of FITS pairs (HOTPANTS; hotpants=\"<flags>\": its command line)",
        "night": "a night of frames -> moving objects, MPC/ADES reports, sequences, cutouts",
        "simulate-night": "write a simulated night of one field (frames + movers' truth) as FITS",
        "serve": "the validation web application (db=sqlite:///astroprep.db host= port=)",
        "user": "create or update a web user (name= role=viewer|validator|admin password= db=)",
        "ingest": "load a night/run output folder into the web database (run= night= db=)",
        "export-labels": "people's labels as a training set (db= output=)",
        "astrometry": "solve frames' WCS (TAN-SIP/TPV) against a reference catalog (SCAMP)",
        "stack": "co-add frames onto one grid: median/mean/weighted/clipped (SWarp)",
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
    from ._checks import RunError

    target = getattr(_runners, fn_name)
    results: list = []  # what each run (each job of a multirun) returned, or its RunError

    @hydra.main(version_base="1.3", config_path=str(config_dir()), config_name=config_name)
    def _app(cfg: DictConfig):
        try:
            results.append(target(cfg))
        except RunError as exc:  # a message says it all: no traceback
            print(f"astroprep {command}: error: {exc}", file=sys.stderr)
            results.append(exc)

    os.environ["ASTROPREP_COMMAND"] = command
    old = sys.argv
    sys.argv = [old[0] if old else "astroprep"] + argv[1:]
    try:
        _app()
    finally:
        sys.argv = old
    return exit_status(command, results)


def exit_status(command: str, results: list) -> int:
    """0 when every run succeeded; 2 when one stopped on a :class:`RunError`; 1 when frames failed
    (their count is printed: the summary above lists each with its reason)."""
    from ._checks import RunError

    if any(isinstance(r, RunError) for r in results):
        return 2
    summaries = [r for r in results if isinstance(r, dict) and "failed" in r and "processed" in r]
    failed = sum(len(s["failed"]) for s in summaries)
    if failed:
        tried = sum(len(s["failed"]) + s["processed"] for s in summaries)
        print(f"astroprep {command}: {failed} of {tried} frame(s) failed (reasons above and in the manifest)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
