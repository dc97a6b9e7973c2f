"""The writer process: one per parent process (:func:`_writer_service`), shared by every
process-mode :class:`~astroprep_torch.pipeline.FrameWriter`; it writes the products it receives
(see :mod:`.transfer`) and reports manifest rows, timings and errors back."""

from __future__ import annotations

import collections
import itertools
import os
import queue as _q
from typing import Optional

import torch
import torch.multiprocessing as mp
from astropy.io import fits
from torch import Tensor

from .._runtime import retain_freed_memory
from .._orphans import die_with_parent, resource_tracker_in_own_session
from .transfer import _SharedSlots, _unportable

class _WriterProcessError(RuntimeError):
    """An error reported by the writer process (its message names the original exception)."""


class _WriterService:
    """One writer process per parent process, shared by every process-mode :class:`FrameWriter`
    (a Python and torch start costs seconds: paid once, not per run or per ``Trainer.predict``).
    Jobs go in one queue, in order: ``("config", id, ...)``, ``("write", id, prediction, rank)``,
    ``("flush", id)``; reports come back tagged with the writer's id."""

    def __init__(self, writer_cls):
        resource_tracker_in_own_session()  # it cleans up after a killed run (see there)
        ctx = mp.get_context("spawn")  # not fork: the parent's OpenMP threads do not survive a fork
        self.jobs = ctx.Queue()
        self.results = ctx.Queue()
        self.proc = ctx.Process(target=_writer_process, name="astroprep-frame-writer", daemon=True,
                                args=(writer_cls, self.jobs, self.results, os.getpid()))
        self.proc.start()
        self.pid = os.getpid()
        self._ids = itertools.count(1)
        self._inbox: dict = {}  # reports for writers other than the one collecting
        self._slots: list = []  # shared buffers of finished writers, for the next ones

    def take_slots(self, ring: int) -> "_SharedSlots":
        """Shared buffers for a writer: a finished writer's, when one had as many (each writer
        owns its set until :meth:`return_slots`: a set never serves two writers at once)."""
        for i, slots in enumerate(self._slots):
            if slots.ring == ring:
                return self._slots.pop(i)
        return _SharedSlots(ring)

    def return_slots(self, slots: "_SharedSlots") -> None:
        slots.turn = 0
        self._slots = [slots] + self._slots[:1]  # keep two sets at most

    def alive(self) -> bool:
        return self.proc.is_alive()

    def register(self) -> int:
        wid = next(self._ids)
        self._inbox[wid] = []
        return wid

    def unregister(self, wid: int) -> None:
        self._inbox.pop(wid, None)

    def messages(self, wid: int, block: bool, until: str):
        """Reports for writer ``wid``: what is there now; with ``block``, up to the first of kind
        ``until`` (an error report or the process's death also ends the wait)."""
        mine = self._inbox.setdefault(wid, [])
        out = []
        while True:
            while mine:
                kind, payload = mine.pop(0)
                out.append((kind, payload))
                if block and kind in (until, "error"):
                    return out
            try:
                msg = self.results.get(timeout=1.0) if block else self.results.get_nowait()
            except _q.Empty:
                if not block:
                    return out
                if not self.alive():  # died without reporting (killed): say so
                    out.append(("error", f"the writer process exited with code {self.proc.exitcode}"))
                    return out
                continue
            kind, owner, payload = msg
            self._inbox.setdefault(owner, []).append((kind, payload))


_SERVICE: Optional[_WriterService] = None


def _writer_service(writer_cls) -> _WriterService:
    """The writer process of this process (started on first use, again after fork or its death);
    ``writer_cls`` (:class:`~astroprep_torch.pipeline.FrameWriter`) writes in it."""
    global _SERVICE
    if _SERVICE is None or _SERVICE.pid != os.getpid() or not _SERVICE.alive():
        _SERVICE = _WriterService(writer_cls)
    return _SERVICE


def _writer_process(writer_cls, jobs, results, parent_pid: Optional[int] = None) -> None:
    """Body of the writer process: for each job, write in the loop with the writer its ``config``
    job set up and report back; after a writer's fatal error, its later batches are drained
    without writing (as the writer thread does). It dies with its parent (a killed run leaves no
    writer behind)."""
    die_with_parent(parent_pid)
    torch.set_num_threads(1)
    retain_freed_memory()
    writers: dict = {}
    # The last batches' shared buffers stay mapped here: the next frames arrive in the same buffers
    # (see _SharedSlots), which torch's shared-storage cache then finds mapped already.
    held: collections.deque = collections.deque(maxlen=2)
    failed: set = set()
    while True:
        job = jobs.get()
        kind, wid = job[0], job[1]
        if kind == "config":
            _, _, output_dir, products, header, ring, flush = job
            writers[wid] = writer_cls(output_dir, products=products, asynchronous=False, flush_to_disk=flush,
                                       reference_header=fits.Header.fromstring(header) if header is not None else None)
            if held.maxlen < ring:
                held = collections.deque(held, maxlen=ring)
        elif kind == "flush":
            writers.pop(wid, None)
            failed.discard(wid)
            results.put(("flushed", wid, None))
        elif kind == "write":
            if wid in failed or wid not in writers:
                continue
            w = writers[wid]
            try:
                n0 = len(w.write_seconds)
                prediction = dict(job[2], outputs={k: _unportable(v) for k, v in job[2]["outputs"].items()})
                held.append([v for v in prediction["outputs"].values() if isinstance(v, Tensor)])
                rows = w.write_prediction(prediction, *job[3:])
                results.put(("rows", wid, (rows, w.write_seconds[n0:])))
            except BaseException as exc:  # e.g. the manifest cannot be written
                failed.add(wid)
                results.put(("error", wid, f"{type(exc).__name__}: {exc}"))
        del job
