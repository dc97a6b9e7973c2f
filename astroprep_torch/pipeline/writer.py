"""Writing a run's products: :class:`FrameWriter` (a Lightning prediction writer) writes each frame's
products atomically and a manifest row per frame, in the predict loop, on a thread or in the
writer process (:mod:`.writer_process`), and tells a rerun which frames are finished."""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

import torch
from astropy.io import fits
from torch import Tensor

from .. import io as frame_io  # the module: io.write_fits is looked up at each call (tests replace it)
from ..detect import rows_of_image
from .astrometry_step import SOLUTION_KEYS
from .manifest import OutputDiskFull, _append_jsonl, _disk_full, read_manifest
from .products import DEFAULT_PRODUCTS, _atomic, _compact, _image_header, _per_frame, write_ecsv
from .transfer import _portable, _SharedSlots
from .writer_process import _writer_service, _WriterProcessError

log = logging.getLogger("astroprep_torch.pipeline")

try:
    from lightning.pytorch.callbacks import BasePredictionWriter
except Exception:  # pragma: no cover
    BasePredictionWriter = object  # type: ignore[assignment,misc]

class FrameWriter(BasePredictionWriter):
    """Writes each frame's products atomically and appends a manifest row per frame.

    Products are named ``<frame>.<suffix>.<ext>`` in ``output_dir`` (``DEFAULT_PRODUCTS`` lists what
    each batch key becomes: e.g. ``<frame>.diff.fits``, ``<frame>.candidates.ecsv``,
    ``<frame>.cat.ecsv``, ``<frame>.triplets.pt``). FITS products carry the WCS of their pixel grid
    (the science frame's or the reference's). The manifest (``manifest.rank<r>.jsonl``, merged by
    :func:`read_manifest`) holds one JSON row per frame: name, input path, status (``ok`` /
    ``failed``), reason, outputs, per-stage timings. A frame counts as finished when its row says
    ``ok`` and its outputs exist, so a rerun skips it (:meth:`finished`).

    Args:
        output_dir: where the products and the manifest go.
        products: ``{batch key: (kind, suffix, grid[, rows of])}`` (default :data:`DEFAULT_PRODUCTS`).
        reference_header: FITS header of the reference grid (its WCS goes into reference-grid products).
        asynchronous: write while the next batch computes, so that pipeline mode hides its I/O:
            ``"process"`` in a writer process (one per process, spawned when prediction starts and
            kept for later runs; the product tensors reach it through shared memory), ``True`` / ``"thread"`` on a background thread, ``False`` in
            the predict loop. The process keeps the writing's Python work (FITS headers, catalog
            formatting) off the interpreter lock that the computing thread needs between its tensor
            operations; a thread is cheaper to start (small runs, tests). The loop hands over only
            the product tensors and waits only when ``max_pending`` batches are still being written;
            the queue is drained at the end of ``Trainer.predict`` (:meth:`flush`), so every output
            and manifest row exists when ``predict`` returns.
        max_pending: batches that may wait for the writer (bounds the memory held).
        flush_to_disk: each product is on disk before its rename, and its pages leave the page cache
            (:func:`~astroprep_torch.io.flush_to_disk`): a crash never leaves an empty file under a
            product's name, and a long run does not fill the page cache with outputs nobody reads
            back. On virtual machines this also takes most of the writing's CPU time away (the
            kernel reuses the dropped pages instead of taking fresh ones). ``False`` leaves the
            write-back to the kernel.
    """

    def __init__(self, output_dir, products: Optional[Mapping[str, Sequence]] = None, reference_header=None,
                 asynchronous: Union[bool, str] = True, max_pending: int = 2, flush_to_disk: bool = True):
        super().__init__(write_interval="batch")
        self.output_dir = Path(output_dir)
        self.products = {k: tuple(v) for k, v in (products or DEFAULT_PRODUCTS).items()}
        self.reference_header = reference_header
        if asynchronous not in (True, False, "thread", "process"):
            raise ValueError(f"asynchronous must be True, False, 'thread' or 'process', got {asynchronous!r}")
        self.mode = "loop" if asynchronous is False else ("process" if asynchronous == "process" else "thread")
        self.asynchronous = self.mode != "loop"
        self.max_pending = max(1, int(max_pending))
        self.flush_to_disk = bool(flush_to_disk)
        self.rows: list[dict] = []
        self.write_seconds: list[float] = []  # per frame, measured in the thread that writes
        self._done: Optional[dict[str, dict]] = None
        self._queue = None
        self._thread = None
        self._proc = None  # the writer service (process mode)
        self._wid = 0
        self._outstanding = 0  # batches handed to the writer process, not yet reported written
        self._slots: Optional[_SharedSlots] = None  # shared-memory buffers of the writer process's inputs
        self._error: Optional[BaseException] = None

    # -- resume --------------------------------------------------------------------------------
    def finished(self, name: str) -> bool:
        """True when a previous run finished ``name`` (the manifest is read once, on the first call)."""
        if self._done is None:
            self._done = read_manifest(self.output_dir)
        row = self._done.get(name)
        return bool(row) and row["status"] == "ok" and all((self.output_dir / p).exists() for p in row["outputs"])

    # -- writing -------------------------------------------------------------------------------
    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        rank = getattr(trainer, "global_rank", 0) if trainer is not None else 0
        if not self.asynchronous:
            self.write_prediction(prediction, rank)
            return
        if self.mode == "process":
            self._collect(block=False)
            self._raise_pending_error()
            if self._proc is None:
                self._start_process()
            while self._outstanding >= self.max_pending:  # wait while max_pending batches are queued
                self._collect(block=True, until="rows")
                self._raise_pending_error()
            self._outstanding += 1
            self._proc.jobs.put(("write", self._wid, self._slim(prediction, for_process=True), rank))
            return
        self._raise_pending_error()
        if self._thread is None:
            self._start()
        self._queue.put((self._slim(prediction), rank))  # blocks while max_pending batches wait

    def _slim(self, prediction: dict, for_process: bool = False) -> dict:
        """The prediction with only what the products need (frees the graph's other tensors now).
        For the writer process also: tensors on the CPU, catalogs without their segmentation."""
        outputs = prediction.get("outputs") or {}
        keep = set(self.products) | {v[3] for v in self.products.values() if len(v) > 3}
        outputs = {k: v for k, v in outputs.items() if k in keep}
        if for_process:
            if self._slots is None:
                self._slots = self._proc.take_slots(self.max_pending)
            outputs = {k: _portable(v, self._slots, k) for k, v in outputs.items()}
            self._slots.next_turn()
        return dict(prediction, outputs=outputs)

    # -- the writer process ----------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        gone = frame_io.remove_stale_temporaries(self.output_dir)  # left by an earlier run killed mid-write
        if gone:
            log.info("removed %d temporary files of an interrupted run from %s", len(gone), self.output_dir)
        if self.mode == "process":
            self._start_process()  # the process starts while the first frames compute

    def _start_process(self) -> None:
        if self._proc is not None:
            return
        self._proc = _writer_service(FrameWriter)
        self._wid = self._proc.register()
        header = self.reference_header.tostring() if self.reference_header is not None else None
        self._proc.jobs.put(("config", self._wid, str(self.output_dir), self.products, header, self.max_pending,
                             self.flush_to_disk))

    def _collect(self, block: bool, until: str = "flushed") -> None:
        """Take this writer's reports from the writer process (manifest rows, timings, errors);
        with ``block``, wait until one of kind ``until`` arrived ("rows": a batch written;
        "flushed": everything queued before the flush request is written)."""
        if self._proc is None:
            return
        for kind, payload in self._proc.messages(self._wid, block, until):
            if kind == "rows":
                rows, secs = payload
                self.rows += rows
                self.write_seconds += secs
                self._outstanding -= 1
            elif kind == "error":
                self._outstanding = 0
                if self._error is None:
                    full = payload.startswith(OutputDiskFull.__name__ + ": ")
                    self._error = OutputDiskFull(payload.split(": ", 1)[1]) if full else _WriterProcessError(payload)

    def _start(self) -> None:
        self._queue = queue.Queue(maxsize=self.max_pending)
        self._thread = threading.Thread(target=self._work, name="astroprep-frame-writer", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:  # after a fatal error, drain without writing
                    self.write_prediction(*item)
            except BaseException as exc:  # e.g. the manifest cannot be written: re-raised in the loop
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise_pending_error(self) -> None:
        if self._error is not None:
            exc, self._error = self._error, None
            if isinstance(exc, OutputDiskFull):
                raise exc
            what = str(exc) if isinstance(exc, _WriterProcessError) else f"{type(exc).__name__}: {exc}"
            raise RuntimeError(f"FrameWriter: writing outputs failed: {what}") from exc

    def flush(self) -> None:
        """Wait until every queued batch is written, stop the writer thread, re-raise its error."""
        self._stop()
        self._raise_pending_error()

    def _stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread, self._queue = None, None
        if self._proc is not None:
            if self._proc.alive():
                self._proc.jobs.put(("flush", self._wid))
            self._collect(block=True, until="flushed")
            self._proc.unregister(self._wid)
            if self._slots is not None:
                self._proc.return_slots(self._slots)
            self._proc, self._outstanding, self._slots = None, 0, None

    def on_predict_end(self, trainer, pl_module) -> None:
        self.flush()

    def on_exception(self, trainer, pl_module, exception) -> None:
        # Keep what was computed before the failure (or the interruption): finish the queued writes,
        # without hiding the exception that stopped the run.
        self._stop()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._stop()

    def write_prediction(self, prediction: dict, rank: int = 0) -> list[dict]:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        t_start = time.perf_counter()
        rows = []
        outputs = prediction["outputs"]
        n = len(prediction["names"])
        for i, (name, path) in enumerate(zip(prediction["names"], prediction["paths"])):
            written, reason = [], ""
            try:
                sci_header = fits.Header.fromstring(prediction["headers"][i]) if prediction.get("headers") else None
                for key, (kind, suffix, grid, *rows_of) in self.products.items():
                    if key not in outputs or outputs[key] is None:
                        continue
                    header = _grid_header(grid, self.reference_header, sci_header)
                    catalog = outputs.get(rows_of[0]) if rows_of else None
                    written.append(self._write_one(name, outputs[key], kind, suffix, header, i, n, catalog))
                status = "ok"
            except Exception as exc:
                status, reason = "failed", f"writing outputs: {type(exc).__name__}: {exc}"
                self._remove(written)  # a failed frame leaves no product behind
                written = []
                if _disk_full(exc, self.output_dir):
                    rows.append({"name": name, "path": path, "status": status, "reason": reason, "outputs": [], "rank": rank})
                    self._record(rows, rank, missing_ok=True)
                    raise OutputDiskFull(f"output disk full writing frame {name!r} in {self.output_dir} ({exc})") from exc
            rows.append({"name": name, "path": path, "status": status, "reason": reason, "outputs": written,
                         "timings": prediction.get("timings", {}), "rank": rank})
        if n:
            self.write_seconds += [(time.perf_counter() - t_start) / n] * n
        for name, path, reason in prediction["failed"]:
            rows.append({"name": name, "path": path, "status": "failed", "reason": reason, "outputs": [], "rank": rank})
        self._record(rows, rank)
        return rows

    def _remove(self, files: Sequence[str]) -> None:
        for f in files:
            try:
                (self.output_dir / f).unlink()
            except FileNotFoundError:
                pass

    def _record(self, rows: list, rank: int, missing_ok: bool = False) -> None:
        """Append ``rows`` to the manifest (whole lines or none); with ``missing_ok``, a manifest that
        cannot be written (the disk is full) only logs: the caller is already failing."""
        try:
            _append_jsonl(self.output_dir / f"manifest.rank{rank}.jsonl", rows)
        except OSError as exc:
            if not missing_ok:
                if _disk_full(exc, self.output_dir):
                    for r in rows:
                        self._remove(r["outputs"])  # products without a manifest row would be redone anyway
                    raise OutputDiskFull(f"output disk full writing the manifest in {self.output_dir} ({exc})") from exc
                raise
            log.warning("manifest rows not written: %s", exc)
        self.rows += rows

    def _write_one(self, name, value, kind, suffix, header, i, n, catalog=None) -> str:
        if kind == "fits":
            fname = f"{name}.{suffix}.fits"
            img = _per_frame(value, i, n)
            frame_io.write_fits(self.output_dir / fname, img.detach().float().cpu(), header=_image_header(header), overwrite=True,
                       flush=self.flush_to_disk)
        elif kind == "catalog":
            fname = f"{name}.{suffix}.ecsv"
            table = value.to_table(batch_index=i)
            _atomic(self.output_dir / fname, lambda p: write_ecsv(table, p), self.flush_to_disk)
        elif kind == "tensor":
            fname = f"{name}.{suffix}.pt"
            if catalog is not None:
                t = value[rows_of_image(catalog["batch_index"], i)]  # one row per source of this frame
            else:
                t = _per_frame(value, i, n)[0] if isinstance(value, Tensor) and value.shape[0] == n else value
            _atomic(self.output_dir / fname, lambda p: torch.save(_compact(t), p), self.flush_to_disk)
        else:
            raise ValueError(f"unknown product kind {kind!r}")
        return fname


def _grid_header(grid: str, reference_header, sci_header):
    """The header of a product on ``grid``: the science frame's, or the reference's; a reference-grid
    product of a frame solved by the astrometry step also gets the frame's solution keywords
    (residual rms, pairs: ``astrometry_step.SOLUTION_KEYS``)."""
    if grid != "reference" or reference_header is None:
        return sci_header
    if sci_header is None or "ASTRRMS" not in sci_header:
        return reference_header
    header = reference_header.copy()
    for key in SOLUTION_KEYS:
        if key in sci_header:
            header[key] = (sci_header[key], sci_header.comments[key])
    return header


def _write_mode(value):
    """``async_write`` of the config: true/false, or "thread"/"process"."""
    if isinstance(value, str) and value.lower() in ("thread", "process"):
        return value.lower()
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return bool(value)
