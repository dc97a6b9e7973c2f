"""The stage graph: :class:`Stage` (one module, what it reads from and writes to the batch dictionary)
and :class:`Pipeline` (named stages run in order, or several at once on threads when their inputs
are ready). Hydra builds a graph from ``configs/pipeline/*.yaml`` (``_target_:
astroprep_torch.pipeline.Pipeline`` over ``astroprep_torch.pipeline.Stage`` nodes)."""

from __future__ import annotations

import time
from collections import OrderedDict
from concurrent.futures import FIRST_COMPLETED, wait
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from torch import Tensor

from .._runtime import thread_pool, with_caller_modes

Reads = Union[Mapping[str, str], Sequence[str]]
Writes = Union[Mapping[str, str], Sequence[str], str]


class Stage(nn.Module):
    """One node of the graph: call ``module`` with inputs read from the batch, store its outputs.

    Args:
        module: the stage (an ``nn.Module`` or any callable).
        reads: ``{argument name: batch key}`` (a list means argument name = key). A key ending in
            ``?`` is optional: the argument is left out when the key is missing or None.
        writes: where the result goes: a key (the whole result), a list of keys (a tuple result,
            in order) or ``{field: key}`` (fields of a NamedTuple/dataclass/dict result).
        enabled: ``False`` skips the stage (handy from the command line:
            ``pipeline.stages.quality.enabled=false``).
        compile: ``False`` keeps the stage eager when the graph is compiled
            (``PreprocessModule(compile=True)``, ``astroprep run compile=true``): for stages whose
            shapes depend on the data (detection, catalogs), where compilation would recompile on
            every frame. ``None`` (default) follows the graph's setting.
        after: names of earlier stages this one also waits for when stages run at once
            (``Pipeline(workers > 1)``), beyond what the reads and writes require: an ordering
            hint, e.g. to keep light work off the cores while a stage that uses all of them runs.
    """

    def __init__(self, module, reads: Reads = (), writes: Writes = (), enabled: bool = True,
                 compile: Optional[bool] = None, after: Sequence[str] = ()):
        super().__init__()
        self.module = module
        self.compile = compile
        self.after = [after] if isinstance(after, str) else list(after)
        self.reads = {k: k for k in reads} if not isinstance(reads, Mapping) else dict(reads)
        if isinstance(writes, str):
            self.writes: Union[str, list, dict] = writes
        elif isinstance(writes, Mapping):
            self.writes = dict(writes)
        else:
            self.writes = list(writes)
        self.enabled = bool(enabled)

    def inputs(self, batch: Mapping[str, Any]) -> dict:
        kwargs = {}
        for arg, key in self.reads.items():
            optional = key.endswith("?")
            key = key.rstrip("?")
            if key not in batch or batch[key] is None:
                if optional:
                    continue
                raise KeyError(f"stage needs batch key {key!r} for argument {arg!r}; the batch has {sorted(batch)}")
            kwargs[arg] = batch[key]
        return kwargs

    def forward(self, batch: dict) -> dict:
        out = self.module(**self.inputs(batch))
        if isinstance(self.writes, str):
            if self.writes:
                batch[self.writes] = out
        elif isinstance(self.writes, list):
            if self.writes:
                values = list(out) if isinstance(out, (tuple, list)) else [out]
                if len(values) < len(self.writes):
                    raise ValueError(f"stage returned {len(values)} values, but writes lists {len(self.writes)} keys")
                for key, value in zip(self.writes, values):
                    batch[key] = value
        else:
            for field, key in self.writes.items():
                if isinstance(out, Mapping):
                    batch[key] = out[field]
                else:
                    batch[key] = getattr(out, field)
        return batch


class Pipeline(nn.Module):
    """Named stages run in order over a batch dictionary.

    Args:
        stages: ``{name: Stage}`` in running order (a list of ``(name, Stage)`` works too).
        timed: record each stage's wall time (seconds) in ``self.timings`` on every call, and the
            whole call's in ``self.wall``.
        workers: stages that may run at the same time, in threads (1: one after the other).  The
            dependencies come from what the stages read and write: a stage waits for every earlier
            stage that writes a key it reads, or that reads or writes a key it writes, so the
            results equal the sequential run's.  On a CPU, stages made of many small operations
            (detection, photometry) leave cores idle; the science-frame catalog, for one, can then
            be made while the difference image is.  Stage timings overlap in this mode, and a stage
            started beside ``k`` others runs ``1 / (k + 1)`` of the caller's intra-op threads.  The
            GWAC graph's config uses 2 (measurements: ``experiments/results/pipeline_throughput_graph_workers.md``).

    ``forward(batch) -> batch``: the same dictionary with every stage's outputs added.
    ``skip=`` (a set of names) skips stages for one call.
    """

    def __init__(self, stages: Union[Mapping[str, Stage], Sequence], timed: bool = True, workers: int = 1):
        super().__init__()
        items = list(stages.items() if isinstance(stages, Mapping) else stages)
        names = [str(k) for k, _ in items]
        if len(set(names)) != len(names):
            raise ValueError(f"stage names must be unique, got {names}")
        for j, (name, st) in enumerate(items):
            if not isinstance(st, Stage):
                raise TypeError(f"stage {name!r} must be a pipeline.Stage, got {type(st).__name__}")
            for other in st.after:
                if other not in names[:j]:
                    raise ValueError(f"stage {name!r}: after={other!r} must name an earlier stage, one of {names[:j]}")
        # A ModuleList (not a ModuleDict) so that any name works, "double" or "to" included.
        self.names = names
        self._stages = nn.ModuleList([st for _, st in items])
        self.timed = timed
        if int(workers) < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = int(workers)
        self.timings: dict[str, float] = {}
        self.wall = 0.0

    @property
    def stages(self) -> "OrderedDict[str, Stage]":
        """``{name: Stage}`` in running order."""
        return OrderedDict(zip(self.names, self._stages))

    def forward(self, batch: dict, skip: Sequence[str] = ()) -> dict:
        batch = dict(batch)
        self.timings = {}
        t_start = time.perf_counter()
        todo = [(name, st) for name, st in self.stages.items() if st.enabled and name not in skip]
        if self.workers > 1 and len(todo) > 1 and not torch.compiler.is_compiling():
            self._run_concurrent(batch, todo)
        else:
            for name, stage in todo:
                self._run_stage(name, stage, batch)
        self.wall = time.perf_counter() - t_start
        return batch

    def _run_stage(self, name: str, stage: "Stage", batch: dict) -> None:
        if self.timed:
            _sync(batch)
            t0 = time.perf_counter()
        try:
            stage(batch)
        except Exception as exc:
            raise PipelineError(f"stage {name!r} failed: {type(exc).__name__}: {exc}") from exc
        if self.timed:
            _sync(batch)
            self.timings[name] = time.perf_counter() - t0

    @staticmethod
    def dependencies(todo: Sequence) -> list:
        """For ``[(name, Stage), ...]`` in running order: the set of earlier positions each stage
        must wait for (it reads what they write, or writes what they read or write, or names them
        in ``after``, which :class:`Pipeline` checks names earlier stages; a disabled or skipped one
        is not waited for)."""
        rw = []
        for _, st in todo:
            reads = {k.rstrip("?") for k in st.reads.values()}
            w = st.writes
            if isinstance(w, str):
                writes = {w} if w else set()
            else:
                writes = set(w.values() if isinstance(w, dict) else w)
            rw.append((reads, writes))
        deps = []
        pos = {name: i for i, (name, _) in enumerate(todo)}
        for j, (rj, wj) in enumerate(rw):
            d = {i for i in range(j) if (rj & rw[i][1]) or (wj & (rw[i][0] | rw[i][1]))}
            d |= {pos[name] for name in todo[j][1].after if name in pos}
            deps.append(d)
        return deps

    def _run_concurrent(self, batch: dict, todo: Sequence) -> None:
        """Run ``todo`` on ``self.workers`` threads, each stage once its dependencies are done (the
        earliest ready stage first).  The first failure stops new stages and is raised once the
        running ones are done.  Autograd / inference mode of the caller carry over to the threads,
        and its intra-op thread count, shared among the stages running at once."""
        deps = self.dependencies(todo)
        done: set = set()
        running: dict = {}
        started: set = set()
        # the stages' own pool: a stage may wait on _runtime.thread_pool's jobs from one of these threads
        pool = thread_pool(self.workers, name="astroprep-stage")
        # Each stage runs under the caller's autograd / inference modes. Its intra-op thread count is
        # the caller's, divided among the stages running when it starts: a stage started beside k
        # others gets n // (k + 1) threads (at least 1), so concurrent stages share the cores
        # instead of oversubscribing them.
        n_threads = torch.get_num_threads()

        def run(i: int):
            return self._run_stage(todo[i][0], todo[i][1], batch)

        error = None
        while len(done) < len(todo):
            if error is None:
                for i in range(len(todo)):
                    if i not in started and deps[i] <= done and len(running) < self.workers:
                        started.add(i)
                        share = max(1, n_threads // (len(running) + 1))
                        running[pool.submit(with_caller_modes(run, threads=share), i)] = i
            if not running:
                break
            finished, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in finished:
                i = running.pop(fut)
                exc = fut.exception()
                if exc is not None and error is None:
                    error = exc
                done.add(i)
        if error is not None:
            raise error

    def describe(self) -> str:
        """One line per stage: ``name: reads -> writes`` (the graph as text)."""
        lines = []
        for name, st in self.stages.items():
            w = st.writes if isinstance(st.writes, str) else (list(st.writes.values()) if isinstance(st.writes, dict) else st.writes)
            state = "" if st.enabled else "  (disabled)"
            lines.append(f"{name}: {sorted(set(k.rstrip('?') for k in st.reads.values()))} -> {w}{state}")
        return "\n".join(lines)


class PipelineError(RuntimeError):
    """A stage failed; the message names it."""


def _sync(batch: Mapping) -> None:
    if torch.cuda.is_available():
        for v in batch.values():
            if isinstance(v, Tensor) and v.is_cuda:
                torch.cuda.synchronize(v.device)
                return
