"""The CPU plumbing in astroprep_torch._runtime: thread caps, work on pools, and that stage modules
leave threads, ctypes and thread counts to it."""

from __future__ import annotations

import ast
import os
import threading
from pathlib import Path

import pytest
import torch

from astroprep_torch import _runtime
from astroprep_torch._runtime import cpu_workers, map_on_threads, one_intraop_thread, side_by_side

PACKAGE = Path(__file__).resolve().parent.parent / "astroprep_torch"

#: every name the former ``astroprep_torch._ops`` module offered
OPS_NAMES = ("one_intraop_thread", "with_caller_modes", "searchsorted", "serial_on_cpu", "retain_freed_memory",
             "thread_pool", "numpy_applies", "numpy_inplace_", "sort_last")


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


def test_every_former_ops_name_is_exported():
    missing = [name for name in OPS_NAMES + tuple(_runtime.__all__) if not hasattr(_runtime, name)]
    assert not missing


@pytest.mark.parametrize("workers", [1, 2])
def test_map_on_threads_keeps_order_and_one_state_per_thread(workers):
    made = []

    def state():
        made.append(threading.get_ident())
        return {"calls": 0}

    def job(item, s):
        s["calls"] += 1
        return item * item, torch.get_num_threads()

    out = map_on_threads(job, list(range(9)), workers=workers, state=state, name="test-runtime")
    assert [v for v, _ in out] == [i * i for i in range(9)]
    assert len(made) == len(set(made)) <= workers  # a state per thread that ran, never two
    if workers > 1:
        assert {t for _, t in out} == {1}  # one intra-op thread each on the pool


def test_map_on_threads_runs_under_the_callers_inference_mode():
    with torch.inference_mode():
        out = map_on_threads(lambda i, s: torch.is_inference_mode_enabled(), [0, 1, 2], workers=2, state=dict)
    assert out == [True, True, True]


def test_side_by_side_returns_every_result_in_order(two_threads):
    x = torch.zeros(4)
    assert side_by_side([lambda: 1, lambda: 2, lambda: 3], x) == [1, 2, 3]
    a, b = torch.zeros(5), torch.zeros(5)
    idx = torch.tensor([0, 0, 3])
    side_by_side([lambda: a.index_add_(0, idx, torch.ones(3)), lambda: b.index_add_(0, idx, torch.full((3,), 2.0))], x)
    assert a.tolist() == [2, 0, 0, 1, 0] and b.tolist() == [4, 0, 0, 2, 0]


def test_cpu_workers_is_the_thread_count_on_cpu(two_threads):
    assert cpu_workers(torch.zeros(1)) == 2
    with one_intraop_thread():
        assert cpu_workers(torch.zeros(1)) == 1


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def _thread_count_calls(path: Path) -> list[str]:
    return [f"line {node.lineno}" for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Attribute) and node.attr in ("set_num_threads", "get_num_threads")]


@pytest.mark.parametrize("module", ["background"])
def test_stage_module_leaves_threads_to_runtime(module):
    """Stage modules moved to _runtime import no threading / concurrent.futures / ctypes /
    multiprocessing and neither read nor set torch's thread count."""
    path = PACKAGE / f"{module}.py"
    assert not _imports(path) & {"threading", "concurrent", "ctypes", "multiprocessing"}
    assert not _thread_count_calls(path)


# ------------------------------------------------------------------------------------------------
# the thread policy on a busy machine (issue 19, item 4)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("threads, cores, busy, expected", [
    (2, 2, 0.0, 2),  # quiet
    (2, 2, 0.3, 2),  # a little background noise
    (2, 2, 1.0, 1),  # one core taken by someone else
    (2, 2, 6.0, 1),  # oversubscribed: never below one
    (8, 8, 3.0, 5),
    (4, 16, 0.0, 4),  # never more than configured
    (1, 2, 0.0, 1),
])
def test_threads_for_load_uses_the_free_cores(threads, cores, busy, expected):
    from astroprep_torch._runtime import threads_for_load

    assert threads_for_load(threads, cores, busy) == expected


def test_others_load_is_the_busy_time_of_the_cpus_less_our_own():
    from astroprep_torch._runtime.load import CpuSample, others_busy, parse_proc_stat

    stat = ("cpu  10 0 10 100 0 0 0 0 0 0\n"
            "cpu0 1 2 3 100 9 4 5 6 0 0\n"
            "cpu1 100 0 100 5 0 0 0 0 0 0\n"
            "intr 12345\n")
    assert parse_proc_stat(stat, {0}) == 1 + 2 + 3 + 4 + 5 + 6  # user nice system irq softirq steal
    assert parse_proc_stat(stat, {0, 1}) == 21 + 200
    assert parse_proc_stat(stat, {7}) is None
    # 3 busy CPU-seconds in 2 s of wall time, 1 of them ours: others kept 1 core busy
    assert others_busy(CpuSample(10.0, 5.0, 100.0), CpuSample(13.0, 6.0, 102.0)) == pytest.approx(1.0)
    assert others_busy(CpuSample(10.0, 5.0, 100.0), CpuSample(10.5, 6.0, 101.0)) == 0.0


@pytest.fixture
def one_core_taken(monkeypatch):
    from astroprep_torch._runtime import load

    monkeypatch.setattr(load, "_cpus", lambda: {0, 1})
    monkeypatch.setattr(load._MONITOR, "busy_elsewhere", lambda interval: 1.0)
    monkeypatch.delenv("ASTROPREP_ADAPT_THREADS", raising=False)


def test_a_stage_runs_on_the_free_cores_and_restores_the_count(two_threads, one_core_taken, monkeypatch):
    from astroprep_torch._runtime import adapt_to_load

    @adapt_to_load
    def stage(image):
        return torch.get_num_threads(), cpu_workers(image)

    assert stage(torch.zeros(3)) == (1, 1)
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("ASTROPREP_ADAPT_THREADS", "0")
    assert stage(torch.zeros(3)) == (2, 2)


@pytest.mark.parametrize("module, name", [("background", "background_2d"), ("subtract", "image_subtraction"),
                                          ("align", "reproject"), ("detect", "SourceExtractor.forward")])
def test_stages_adapt_their_threads_to_the_load(module, name, two_threads, one_core_taken):
    """The four stages of the busy-machine table run through the policy (1 thread here, where the
    fixture says one of two cores is taken)."""
    import importlib

    obj = importlib.import_module(f"astroprep_torch.{module}")
    for part in name.split("."):
        obj = getattr(obj, part)
    assert getattr(obj, "adapts_to_load", False)


def test_background_runs_on_one_thread_when_a_core_is_taken(two_threads, one_core_taken, monkeypatch):
    from astroprep_torch import background

    seen = []
    real = background._photutils_stats

    def spy(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real(*args, **kwargs)

    monkeypatch.setattr(background, "_photutils_stats", spy)
    img = torch.randn(1, 1, 256, 256) + 100.0
    background.background_2d(img)
    assert seen == [1] and torch.get_num_threads() == 2


class _FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, param, value):
        self.calls.append((param, value))
        return 1

    def malloc_trim(self, pad):
        self.calls.append(("trim", pad))
        return 1


def test_freed_memory_kept_sets_and_restores_only_at_the_outermost_block(monkeypatch):
    from astroprep_torch._runtime import freed_memory_kept, memory

    fake = _FakeLibc()
    monkeypatch.setattr(memory, "_libc", lambda: fake)
    monkeypatch.setattr(memory, "_RETAINED", False)
    with freed_memory_kept():
        assert fake.calls == [(memory.M_MMAP_MAX, 0), (memory.M_TRIM_THRESHOLD, memory._INT_MAX)]
        with freed_memory_kept():
            pass
        assert len(fake.calls) == 2  # the inner block neither sets nor restores
    assert fake.calls[2:] == [(memory.M_MMAP_MAX, 65536), (memory.M_MMAP_THRESHOLD, 32 << 20),
                              (memory.M_TRIM_THRESHOLD, 64 << 20), ("trim", 0)]
    monkeypatch.setattr(memory, "_RETAINED", True)  # retain_freed_memory() in force: nothing to do
    with freed_memory_kept():
        pass
    assert len(fake.calls) == 6 and memory._SCOPE["depth"] == 0


FAULTS_OF_A_SECOND_TENSOR = """
import resource, torch
from astroprep_torch._runtime import freed_memory_kept, memory
if memory._libc() is None or memory._RETAINED:
    print("skip")
    raise SystemExit
def faults_of_second_tensor():
    torch.ones(24 << 20)  # made and freed
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(24 << 20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
outside = faults_of_second_tensor()
with freed_memory_kept():
    inside = faults_of_second_tensor()
print(outside, inside)
"""


def test_freed_memory_kept_reuses_the_pages_of_a_freed_tensor():
    """A 96 MB tensor freed and made again: fresh pages (faults) outside the block, the same inside.
    In a fresh interpreter: the heap that earlier tests leave behind decides where a block lands."""
    import subprocess
    import sys

    env = dict(os.environ, ASTROPREP_RETAIN_MEMORY="1")
    out = subprocess.run([sys.executable, "-c", FAULTS_OF_A_SECOND_TENSOR], capture_output=True, text=True,
                         env=env, cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if out.stdout.strip() == "skip":
        pytest.skip("needs glibc and the default malloc settings")
    outside, inside = map(int, out.stdout.split()[-2:])
    assert outside >= 20 and inside < outside / 4, (outside, inside)


def test_flat_nonzero_equals_torch_nonzero():
    from astroprep_torch._runtime import flat_nonzero

    g = torch.Generator().manual_seed(1)
    m = torch.rand(7, 13, 11, generator=g) < 0.2
    for t in (m, m[2:5], m.transpose(1, 2), m[:0]):  # contiguous, a slice, strided, empty
        got = flat_nonzero(t)
        assert got.dtype == torch.int64 and torch.equal(got, torch.nonzero(t.reshape(-1)).flatten())
