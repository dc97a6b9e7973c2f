"""``astroprep run``: :func:`run_from_config` builds the graph and the frame writer from the Hydra
config, picks or reads the reference, runs prediction over the frames and writes the run's summary
(``metrics.json``); :func:`adapt_quality`, :func:`pick_reference` and :func:`read_reference` are its
steps that stand on their own."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import OmegaConf

from .. import data as data_mod
from .. import viz
from .._checks import InputError, frame_problem
from .._runtime import retain_freed_memory
from ..calibrate import calibrate_from_config
from ..io import read_fits
from ..quality import QualityScorer
from ..sim import write_simulated_pair
from .astrometry_step import astrometry_requested, solve_inputs
from .graph import Pipeline
from .manifest import OutputDiskFull, _append_jsonl, read_manifest
from .predict import PreprocessModule
from .writer import FrameWriter, _write_mode

log = logging.getLogger("astroprep_torch.pipeline")

def pick_reference(paths: Sequence, scorer=None) -> Path:
    """Choose a reference among frames: the best quality score, then the smallest FWHM (header
    ``FWHM``/``SEEING`` when present)."""
    best, best_key = None, None
    for p in paths:
        try:
            f = read_fits(p)
        except Exception:
            continue
        q = float(scorer(f.data, f.mask).score[0]) if scorer is not None else 0.0
        fwhm = float(f.header.get("FWHM", f.header.get("SEEING", 0.0)) or 0.0)
        key = (q, fwhm)
        if best_key is None or key < best_key:
            best, best_key = Path(p), key
    if best is None:
        raise FileNotFoundError("pick_reference: none of the inputs could be read")
    return best


def read_reference(path):
    """Read and check a run's reference frame; any problem is an :class:`InputError` naming it."""
    try:
        ref = read_fits(path)
    except (OSError, ValueError) as exc:
        raise InputError(f"reference {path}: {exc}") from None
    problem = frame_problem(ref.data, ref.mask)
    if problem:
        raise InputError(f"reference {path}: {problem}")
    return ref


class RunInputs(NamedTuple):
    """What a run processes: the frame paths, the reference's path (None: picked among the frames)
    and, for the embedded simulated field, the injected transients (None otherwise)."""

    paths: list
    reference_path: Optional[str]
    truth: Optional[dict] = None


def run_from_config(cfg) -> dict:
    """What ``astroprep run`` does: see the package docstring and ``configs/config.yaml``.

    Steps: prepare the output folder and the process (:func:`_start_run`); the inputs (the
    simulated field, raw frames calibrated first: :func:`_run_inputs`; with ``astrometry.catalog``,
    their WCS solved: :mod:`.astrometry_step`); the graph, its quality
    thresholds adapted to the night; the reference (:func:`_choose_reference`); prediction with the
    frame writer (:func:`_predict`); the summary (``metrics.json``, printed).
    """
    out_dir = _start_run(cfg)
    inputs = _run_inputs(cfg, out_dir)
    if astrometry_requested(cfg):  # astrometry.catalog=<table>: each frame's WCS solved before alignment
        inputs = inputs._replace(paths=solve_inputs(cfg, inputs.paths, out_dir / "solved", inputs.reference_path))
    pipeline: Pipeline = instantiate(cfg.pipeline)
    adapt_quality(pipeline, list(inputs.paths) + ([inputs.reference_path] if inputs.reference_path else []),
                  cfg.get("quality_adapt", "auto"), int(cfg.get("quality_adapt_frames", 16)))
    paths, ref = _choose_reference(cfg, inputs.paths, inputs.reference_path)
    ref_var = data_mod.read_variance(ref.path, ref.data.shape) if ref is not None else None  # <stem>.var.fits
    try:
        all_names = data_mod.frame_names(paths)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    writer = _frame_writer(cfg, out_dir, ref)
    dm = _data_module(cfg, paths, all_names, writer)
    module = PreprocessModule(pipeline, reference=ref.data if ref is not None else None,
                              reference_mask=ref.mask if ref is not None else None,
                              reference_header=ref.header if ref is not None else None,
                              reference_variance=ref_var, compile=bool(cfg.get("compile", False)),
                              compile_options=dict(cfg.get("compile_options") or {}))
    trainer = instantiate(cfg.trainer, callbacks=[writer])
    rows, wall, n_todo = _predict(trainer, module, dm, writer, out_dir)
    summary = summarize(rows, wall, n_todo, len(set(all_names)))
    if inputs.truth is not None:
        summary.update(_truth_summary(rows, out_dir, inputs.truth))
    if trainer.global_rank != 0:
        return summary
    _finish_summary(cfg, summary, out_dir, rows, ref, trainer.world_size)
    print(format_summary(summary, pipeline))
    return summary


def _start_run(cfg) -> Path:
    """Create the output folder, save the resolved config in it, and set the process up (freed
    memory kept for the next frame, the torch thread count): returns the folder."""
    out_dir = Path(cfg.output)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    if cfg.get("retain_memory", True):
        retain_freed_memory()  # frame after frame reuses the same pages (see its docstring)
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    return out_dir


def _run_inputs(cfg, out_dir: Path) -> RunInputs:
    """The frames to process: ``input=`` resolved (files, folders, globs, list files), or the
    embedded simulated field when it is null; raw frames calibrated first when bias/dark/flat are
    given. No frame at all is an :class:`InputError`."""
    truth = None
    inputs, reference_path = cfg.get("input"), cfg.get("reference")
    if inputs is None:  # the embedded demo: a simulated GWAC-like two-epoch field
        inputs, reference_path, truth = _simulated_inputs(cfg, out_dir / "inputs")
    try:
        paths = data_mod.resolve_inputs(inputs)
    except OSError as exc:
        raise InputError(str(exc)) from None
    if not paths:
        raise InputError(f"input: no FITS files in {inputs}")
    if any(cfg.get(k) for k in ("bias", "dark", "flat")):  # raw frames: CCD calibration first
        paths, reference_path = _calibrate_inputs(cfg, paths, reference_path, out_dir / "calibrated")
    return RunInputs(paths, reference_path, truth)


def _simulated_inputs(cfg, folder: Path) -> tuple:
    """Simulate the two-epoch field of ``cfg.sim`` into ``folder``: ``([science path], reference
    path, injected transients)``."""
    t0 = time.perf_counter()
    pair = instantiate(cfg.sim)
    paths = write_simulated_pair(pair, folder)
    print(f"[astroprep] simulated a {pair.science.shape[0]}x{pair.science.shape[1]} two-epoch field "
          f"({time.perf_counter() - t0:.1f} s) -> {folder}")
    return [str(paths["science"])], str(paths["reference"]), pair.transients


def _choose_reference(cfg, paths: Sequence, reference_path) -> tuple:
    """``(frames to process, reference frame or None)``: with ``needs_reference`` the given
    reference (or the best frame, :func:`pick_reference`) is read and checked, and left out of the
    frames (unless it is the only one)."""
    if not cfg.get("needs_reference", True):
        return paths, None
    if reference_path is None:
        reference_path = pick_reference(paths)
        print(f"[astroprep] picked the reference: {reference_path}")
    ref = read_reference(reference_path)
    paths = [p for p in paths if Path(p).resolve() != Path(reference_path).resolve()] or paths
    return paths, ref


def _frame_writer(cfg, out_dir: Path, ref) -> FrameWriter:
    """The run's :class:`FrameWriter` (products, writing mode and flushing from the config)."""
    products = {k: tuple(v) for k, v in cfg.products.items()} if cfg.get("products") else None
    return FrameWriter(out_dir, products=products, reference_header=ref.header if ref is not None else None,
                       asynchronous=_write_mode(cfg.get("async_write", True)),
                       flush_to_disk=bool(cfg.get("flush_outputs", True)))


def _data_module(cfg, paths: Sequence, names: Sequence, writer: FrameWriter):
    """The frames' :class:`~astroprep_torch.data.FitsFrameDataModule` (frames finished by an
    earlier run are skipped when ``resume``)."""
    return data_mod.FitsFrameDataModule(paths, names=names, batch_size=cfg.data.batch_size,
                                        num_workers=cfg.data.num_workers, prefetch_factor=cfg.data.prefetch_factor,
                                        pin_memory=cfg.data.pin_memory,
                                        skip=writer.finished if cfg.get("resume", True) else None,
                                        multiprocessing_context=cfg.data.get("multiprocessing_context"))


def _predict(trainer, module, dm, writer: FrameWriter, out_dir: Path) -> tuple:
    """Run ``trainer.predict``; returns ``(manifest rows of this run's frames, wall seconds, frames
    to do)``. A full output disk stops the run with an :class:`OutputDiskFull` saying how far it got."""
    t0 = time.perf_counter()
    dm.setup("predict")
    n_todo = len(dm.dataset)
    try:
        trainer.predict(module, datamodule=dm, return_predictions=False)
    except OutputDiskFull as exc:  # stop at once: every later frame would fail the same way
        raise OutputDiskFull(f"{exc}; stopped after {sum(r['status'] == 'ok' for r in writer.rows)} frame(s) "
                             f"written of {n_todo}: free space in {out_dir} and rerun (finished frames are skipped)") from None
    trainer.strategy.barrier()  # every rank has written its frames and manifest rows
    wall = time.perf_counter() - t0
    if trainer.world_size > 1:
        todo = set(dm.dataset.names)
        rows = [r for n, r in read_manifest(out_dir).items() if n in todo]
    else:
        rows = writer.rows
    return rows, wall, n_todo


def _finish_summary(cfg, summary: dict, out_dir: Path, rows, ref, world_size: int) -> None:
    """Complete the summary (quick-look figure, world size, Hydra overrides) and write it to
    ``metrics.json`` (and, in a multirun, a row of ``<sweep dir>/sweep.jsonl``)."""
    if cfg.get("quicklook", True) and ref is not None:
        summary["quicklook"] = _quicklook(out_dir, rows, ref)
    summary["world_size"] = world_size
    job = _hydra_job()
    summary.update(job)
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2))
    if job.get("sweep_dir"):  # a multirun: one row per run in <sweep dir>/sweep.jsonl, to compare them
        _append_jsonl(Path(job["sweep_dir"]) / "sweep.jsonl", [dict(summary, output=str(out_dir))])


def adapt_quality(pipeline: Pipeline, paths: Sequence, mode="auto", max_frames: int = 16) -> Optional[float]:
    """Adapt the graph's quality scorer to the instrument from the night's own frames (up to
    ``max_frames``, evenly spaced; at least 3), see :meth:`QualityScorer.adapt`.

    ``mode``: ``"auto"`` adapts the shipped model (``QualityScorer.pretrained()``) unless it is already
    adapted; ``True`` always; ``False`` never. Returns the new threshold, or None when nothing changed.
    """
    stage = pipeline.stages.get("quality")
    scorer = getattr(stage, "module", None)
    if mode in (False, "false", None) or stage is None or not stage.enabled or not isinstance(scorer, QualityScorer):
        return None
    if mode == "auto" and (scorer.baseline is not None or not scorer.scope):
        return None
    picked = [paths[int(i)] for i in torch.linspace(0, len(paths) - 1, min(len(paths), max_frames)).round().long().unique()]
    frames = []
    for p in picked:
        try:
            f = read_fits(p)
            frames.append((f.data, f.mask))
        except Exception as exc:  # an unreadable frame is reported later by the data module
            log.warning("quality adaptation: skipped %s (%s)", p, exc)
    if len(frames) < 3:
        print(f"[astroprep] quality: {len(frames)} frame(s), too few to adapt the thresholds (>= 3); "
              f"the shipped model's threshold stays ({scorer.scope})")
        return None
    t0 = time.perf_counter()
    thr = scorer.adapt([d for d, _ in frames], mask=None)
    print(f"[astroprep] quality: thresholds adapted to this instrument from {len(frames)} frames "
          f"({time.perf_counter() - t0:.1f} s; patch error ratio > {thr:.2f} is bad)")
    return thr


def _calibrate_inputs(cfg, paths, reference_path, folder: Path):
    """Calibrate the raw inputs (and the reference) with the night's bias/dark/flat frames."""
    raw = list(paths) + ([Path(reference_path)] if reference_path is not None else [])
    t0 = time.perf_counter()
    out = calibrate_from_config(cfg, inputs=[str(p) for p in raw], output=folder)
    print(f"[astroprep] calibrated {len(out)} raw frame(s) ({time.perf_counter() - t0:.1f} s) -> {folder}")
    return out[: len(paths)], (str(out[-1]) if reference_path is not None else None)


def _hydra_job() -> dict:
    """The command-line overrides of this Hydra run (and, in a multirun, the job number and sweep folder)."""
    try:
        if not HydraConfig.initialized():
            return {}
        hc = HydraConfig.get()
        info = {"overrides": list(hc.overrides.task)}
        if hc.mode == RunMode.MULTIRUN:
            info.update(job=int(hc.job.num), sweep_dir=str(hc.sweep.dir))
        return info
    except Exception:  # not run by Hydra (e.g. composed in a script)
        return {}


def summarize(rows: Sequence[dict], wall: float, n_todo: int, n_inputs: int) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    stages: dict[str, list] = {}
    for r in ok:
        for k, v in r.get("timings", {}).items():
            stages.setdefault(k, []).append(v)
    return {
        "inputs": n_inputs, "skipped_finished": n_inputs - n_todo, "processed": len(ok),
        "failed": [{"name": r["name"], "reason": r["reason"]} for r in rows if r["status"] != "ok"],
        "wall_seconds": wall,
        "stage_seconds": {k: sum(v) / len(v) for k, v in stages.items()},
    }


def _truth_summary(rows, out_dir: Path, truth: dict) -> dict:
    """Transients recovered among the candidates of the first processed frame (the demo's check)."""
    from astropy.table import Table  # a second's import, only for the embedded demo's truth

    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return {}
    name = ok[0]["name"]
    res = {}
    cand = out_dir / f"{name}.candidates.ecsv"
    if cand.exists():
        t = Table.read(cand, format="ascii.ecsv")
        res["candidates"] = len(t)
        if len(t) and "X_IMAGE" in t.colnames:
            x = torch.as_tensor(t["X_IMAGE"].data - 1.0)
            y = torch.as_tensor(t["Y_IMAGE"].data - 1.0)
            d = torch.cdist(torch.stack([truth["x_ref"].cpu(), truth["y_ref"].cpu()], 1).double(), torch.stack([x, y], 1).double())
            res["transients_injected"] = int(truth["x_ref"].numel())
            res["transients_recovered"] = int((d.min(dim=1).values < 2.0).sum()) if d.numel() else 0
    cat = out_dir / f"{name}.cat.ecsv"
    if cat.exists():
        res["catalog_sources"] = len(Table.read(cat, format="ascii.ecsv"))
    return res


def _quicklook(out_dir: Path, rows, ref) -> Optional[str]:
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    name = ok[0]["name"]
    diff = out_dir / f"{name}.diff.fits"
    if not diff.exists():
        return None
    try:
        d = read_fits(diff).data
        aligned = out_dir / f"{name}.aligned.fits"
        sci = read_fits(aligned).data if aligned.exists() else read_fits(ok[0]["path"]).data
        png = out_dir / f"{name}.quicklook.png"
        viz.plot_triplet(sci if sci.shape == d.shape else d, ref.data, d, path=png,
                         titles=("science (aligned, background removed)", "reference", "difference"))
        return str(png)
    except Exception as exc:  # a figure must never fail the run
        log.warning("quick-look figure failed: %s", exc)
        return None


def format_summary(summary: dict, pipeline: Optional[Pipeline] = None) -> str:
    lines = ["", "astroprep run summary", "---------------------"]
    lines.append(f"inputs {summary['inputs']}, processed {summary['processed']}, "
                 f"skipped (already finished) {summary['skipped_finished']}, failed {len(summary['failed'])}")
    for f in summary["failed"]:
        lines.append(f"  failed: {f['name']}: {f['reason']}")
    if summary["stage_seconds"]:
        lines.append("per-stage time per batch (s):")
        for k, v in summary["stage_seconds"].items():
            lines.append(f"  {k:<24}{v:8.3f}")
        lines.append(f"  {'total (stages)':<24}{sum(summary['stage_seconds'].values()):8.3f}")
    lines.append(f"wall time {summary['wall_seconds']:.2f} s")
    for k in ("catalog_sources", "candidates", "transients_injected", "transients_recovered", "quicklook"):
        if k in summary:
            lines.append(f"{k.replace('_', ' ')}: {summary[k]}")
    return "\n".join(lines)
