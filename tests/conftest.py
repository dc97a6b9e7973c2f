"""Shared fixtures: devices, dtypes, real data location, gradcheck and torch.compile helpers."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# Idle OpenMP workers must not spin on a shared 2-core machine (set before torch loads).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as astroprep_torch/__init__.py (huge pages for big tensors)
# Stages keep torch's thread count whatever the machine's load (astroprep_torch._runtime.load), so that the
# thread paths the tests ask for run; tests/test__runtime.py tests the policy itself.
os.environ.setdefault("ASTROPREP_ADAPT_THREADS", "0")

import pytest  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: Real data with reference outputs (read-only); see ../shared/data/README.md.
SHARED_DATA = Path(os.environ.get("ASTROPREP_SHARED_DATA", ROOT.parent / "shared" / "data"))

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True, scope="session")
def _torch_threads():
    """At most 2 intra-op threads for the whole session (set through a fixture, restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    yield
    torch.set_num_threads(before)


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


@pytest.fixture(params=[torch.float32, torch.float64], ids=["float32", "float64"])
def dtype(request):
    return request.param


@pytest.fixture
def shared_data() -> Path:
    """Path to ../shared/data; skips the test when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data folder {SHARED_DATA} is absent")
    return SHARED_DATA


def shared_file(*parts: str) -> Path:
    """Path of one file under ../shared/data, skipping the test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real test data file {path} is absent")
    return path


def require_binary(*names: str) -> str:
    """Path of the first of ``names`` on PATH, or skip with a clear reason (CI installs them)."""
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    pytest.skip(f"none of {names} is installed (Debian packages source-extractor / swarp; .ci/run installs them)")


def gradcheck(fn, *inputs, eps=1e-6, atol=1e-5, rtol=1e-3, **kwargs) -> bool:
    """``torch.autograd.gradcheck`` in float64 on ``inputs`` (cast and set to require grad)."""
    prepared = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            x = x.detach().to(torch.float64).requires_grad_(True)
        prepared.append(x)
    return torch.autograd.gradcheck(fn, tuple(prepared), eps=eps, atol=atol, rtol=rtol, **kwargs)


@pytest.fixture
def compile_fn():
    """``torch.compile`` with ``fullgraph=True`` (no graph breaks allowed), CPU-friendly settings."""
    import torch._dynamo

    torch._dynamo.reset()

    def _compile(module, fullgraph: bool = True, dynamic: bool = False):
        return torch.compile(module, fullgraph=fullgraph, dynamic=dynamic, backend="eager" if os.environ.get("ASTROPREP_COMPILE_EAGER") else "inductor")

    yield _compile
    torch._dynamo.reset()
