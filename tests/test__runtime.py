"""The CPU plumbing in astroprep_torch._runtime: thread caps, work on pools, and that stage modules
leave threads, ctypes and thread counts to it."""

from __future__ import annotations

import ast
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
