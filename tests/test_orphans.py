"""Helpers die with the run that started them (astroprep_torch._orphans), races at start-up included."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from astroprep_torch import _orphans

pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")

CHILD = """
import os, sys, time
from astroprep_torch._orphans import die_with_parent
parent = os.getppid()
print(os.getpid(), flush=True)
time.sleep(float(sys.argv[1]))
die_with_parent(parent)
time.sleep(60)
"""

PARENT = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
print(child.stdout.readline().strip(), flush=True)
time.sleep(60)
"""


def _start(delay: float):
    """A parent process and its child; the child asks to die with the parent after ``delay`` s."""
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    parent = subprocess.Popen([sys.executable, "-c", PARENT, CHILD, str(delay)], stdout=subprocess.PIPE, text=True,
                              env=env)
    return parent, int(parent.stdout.readline())


def _wait_dead(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not _orphans._alive(pid):
            return True
        time.sleep(0.05)
    return False


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_child_dies_with_its_killed_parent():
    parent, child = _start(0.0)
    try:
        time.sleep(0.5)  # the child has asked by now
        parent.kill()
        parent.wait()
        assert _wait_dead(child, 10)
    finally:
        _kill(child)


def test_parent_killed_before_the_request_and_not_yet_reaped_still_ends_the_child():
    """The race of a killed run: the parent dies while its child is still starting, and nobody has
    reaped it yet (a zombie still answers ``kill(pid, 0)``); the child must not live on."""
    parent, child = _start(1.5)
    try:
        parent.kill()  # not reaped until the child has asked
        assert _wait_dead(child, 10), "the child outlived its parent (a zombie taken for alive)"
    finally:
        parent.wait()
        _kill(child)


def test_alive_says_no_for_a_zombie_and_a_missing_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _orphans._alive(p.pid):
        time.sleep(0.02)
    assert not _orphans._alive(p.pid)  # exited, not reaped: a zombie
    p.wait()
    assert not _orphans._alive(p.pid)
    assert _orphans._alive(os.getpid())
