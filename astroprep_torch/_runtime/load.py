"""How many intra-op threads a stage should use now: fewer when other processes hold the cores.

With more runnable threads than free cores, every OpenMP parallel region waits for its slowest
thread, and a thread that shares a core with another process runs only part of the time: a stage
on two threads with one of two cores taken ran up to 1.5x slower than on one thread
(``experiments/busy_machine.py``). So a stage asks :func:`threads_now` before it runs: the cores in
this process's affinity set minus the cores other processes kept busy since the last check.

Others' load is measured without waiting: the busy time of this process's CPUs in ``/proc/stat``
(user, nice, system, irq, softirq, steal) between two checks, minus this process's own CPU time
(``os.times``) over the same wall time. A check reads two small files, at most once per
``ASTROPREP_LOAD_INTERVAL`` seconds (default 0.5; the decision is held in between). Set
``ASTROPREP_ADAPT_THREADS=0`` to keep torch's thread count whatever the load (e.g. for timings).
Where ``/proc/stat`` cannot be read (not Linux), nothing changes.

Assumed: this process's other work (its DataLoader workers, the pipeline's writer process) counts as
"other processes". Results of some stages differ in the last bits between one and several threads
(reduction order: ImageSubtraction's do, Background2D's are bitwise the same), so with the policy on, a run's outputs may differ at that level with the load;
``ASTROPREP_ADAPT_THREADS=0`` makes them depend on torch's thread count only.
"""

from __future__ import annotations

import os
import threading
import time
from typing import NamedTuple, Optional

_FIRST_WINDOW = 0.02  # seconds the very first check waits to have an interval to measure


class CpuSample(NamedTuple):
    """Busy seconds of this process's CPUs (all processes), this process's CPU seconds, wall seconds."""

    busy: float
    own: float
    wall: float


def _cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return set(range(os.cpu_count() or 1))


def parse_proc_stat(text: str, cpus: set[int]) -> Optional[float]:
    """Busy jiffies (user + nice + system + irq + softirq + steal) of the CPUs ``cpus`` in the text of
    ``/proc/stat``; None when none of them is listed."""
    busy, seen = 0, False
    for line in text.splitlines():
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *fields = line.split()
        if not name[3:].isdigit() or int(name[3:]) not in cpus:
            continue
        v = [int(f) for f in fields[:8]] + [0] * max(0, 8 - len(fields))
        busy += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        seen = True
    return busy if seen else None


def sample(cpus: Optional[set[int]] = None) -> Optional[CpuSample]:
    """A :class:`CpuSample` now, or None where ``/proc/stat`` cannot be read."""
    try:
        with open("/proc/stat") as f:
            text = f.read()
    except OSError:
        return None
    jiffies = parse_proc_stat(text, _cpus() if cpus is None else cpus)
    if jiffies is None:
        return None
    t = os.times()
    return CpuSample(jiffies / os.sysconf("SC_CLK_TCK"), t.user + t.system, time.monotonic())


def others_busy(before: CpuSample, after: CpuSample) -> float:
    """Cores that other processes kept busy on average between two samples (>= 0)."""
    wall = after.wall - before.wall
    if wall <= 0:
        return 0.0
    return max(0.0, ((after.busy - before.busy) - (after.own - before.own)) / wall)


def threads_for_load(threads: int, cores: int, busy_elsewhere: float) -> int:
    """Intra-op threads for a stage configured with ``threads`` on ``cores`` cores of which other
    processes keep ``busy_elsewhere`` busy: the free cores rounded to the nearest whole core, at
    least 1, at most ``threads``."""
    free = int(cores - busy_elsewhere + 0.5)
    return max(1, min(int(threads), free))


class _Monitor:
    """The last sample and decision, shared by every thread of the process."""

    def __init__(self):
        self.lock = threading.Lock()
        self.last: Optional[CpuSample] = None
        self.busy = 0.0
        self.pid = os.getpid()

    def busy_elsewhere(self, interval: float) -> Optional[float]:
        with self.lock:
            if self.pid != os.getpid():  # forked: the parent's sample says nothing of this process
                self.last, self.pid = None, os.getpid()
            now = time.monotonic()
            if self.last is not None and now - self.last.wall < interval:
                return self.busy
            first = self.last is None
            if first:
                self.last = sample()
                if self.last is None:
                    return None
                time.sleep(_FIRST_WINDOW)
            cur = sample()
            if cur is None:
                return None
            self.busy = others_busy(self.last, cur)
            self.last = cur
            return self.busy


_MONITOR = _Monitor()


def adaptive() -> bool:
    """Whether stages adapt their thread count to the load (``ASTROPREP_ADAPT_THREADS`` not 0)."""
    return os.environ.get("ASTROPREP_ADAPT_THREADS", "1") != "0"


def threads_now(threads: int) -> int:
    """The intra-op threads a stage configured with ``threads`` should use now (``threads`` when
    adapting is off, on one thread, or where the load cannot be read)."""
    if threads <= 1 or not adaptive():
        return threads
    busy = _MONITOR.busy_elsewhere(float(os.environ.get("ASTROPREP_LOAD_INTERVAL", "0.5")))
    if busy is None:
        return threads
    return threads_for_load(threads, len(_cpus()), busy)
