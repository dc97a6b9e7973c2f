"""Child processes die with the process that started them.

A run killed with ``kill -9`` cannot stop its helpers (the writer process, the fork server of the
frame readers, the readers): each of them asks the kernel for a signal when its parent dies
(Linux ``prctl(PR_SET_PDEATHSIG)``) with :func:`die_with_parent`. When they are gone, Python's
resource tracker sees its last user leave and unlinks the named semaphores they shared, so
nothing stays in ``/dev/shm`` either; :func:`resource_tracker_in_own_session` keeps the tracker
out of the run's process group, so that this holds for a kill of the whole group too.

Importing this module in a fork server's preload (see :func:`astroprep_torch.data._worker_context`)
arms the fork server itself: it is the only place where the module's import does anything.

The kernel sends the signal when the *thread* that started the child ends; every helper here is
started from the thread that runs the pipeline.
"""

from __future__ import annotations

import os
import signal
import sys

_PR_SET_PDEATHSIG = 1
FORKSERVER_PARENT = "ASTROPREP_FORKSERVER_PARENT"  # the process a fork server must not outlive


def die_with_parent(parent_pid: int | None = None, sig: int = signal.SIGKILL) -> bool:
    """Ask for ``sig`` when this process's parent dies (Linux; elsewhere a no-op returning False).

    With ``parent_pid``, a parent already gone before the request (the race at start-up) ends this
    process at once: gone means this process was handed to another parent, or ``parent_pid`` has
    exited, a killed parent that nobody has reaped yet (a zombie) included. ``parent_pid`` need not
    be the direct parent (a reader forked by a fork server checks the run's own process).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent_pid is not None and os.getppid() != parent_pid and not _alive(parent_pid):
        os.kill(os.getpid(), sig)
    return True


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs: an exited process waiting to be reaped (state Z or X) does not."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        state = None
    if state is not None:
        return state not in (b"Z", b"X")
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reader_init(main_pid: int, worker_id: int) -> None:
    """``worker_init_fn`` of the frame readers (DataLoader workers): die with the parent."""
    die_with_parent(main_pid)


def resource_tracker_in_own_session() -> None:
    """Start this process's multiprocessing resource tracker (if it is not running yet) in a session
    of its own, so that a kill of the run's whole process group (``kill -9 -PGID``) does not take
    it along: it outlives the run's processes, sees the last of them go, and unlinks the named
    semaphores they shared (``/dev/shm/sem.mp-*``), then exits. Call it before the first process
    or queue of a run is created; elsewhere than on Linux, or if the tracker runs already, nothing
    changes."""
    if not sys.platform.startswith("linux"):
        return
    import subprocess
    from multiprocessing import resource_tracker, util

    def spawn(path, args, passfds):
        p = subprocess.Popen(args, executable=path, pass_fds=tuple(passfds), close_fds=True, start_new_session=True)
        # the multiprocessing module owns the tracker's pid (as with its own spawn): this Popen
        # must neither poll nor reap it, nor warn that it still runs when it is collected
        p.returncode = 0
        return p.pid

    original = util.spawnv_passfds
    util.spawnv_passfds = spawn
    try:
        resource_tracker.ensure_running()
    except Exception:  # a Python whose tracker starts otherwise: keep its default
        pass
    finally:
        util.spawnv_passfds = original


def _in_forkserver_preload() -> bool:
    f = sys._getframe()
    while f is not None:
        if f.f_code.co_name == "main" and f.f_globals.get("__name__") == "multiprocessing.forkserver":
            return True
        f = f.f_back
    return False


def _forkserver_parent() -> int | None:
    pid = os.environ.get(FORKSERVER_PARENT, "")
    return int(pid) if pid.isdigit() else None


if _in_forkserver_preload():  # imported by a fork server's preload: it dies with its parent
    die_with_parent(_forkserver_parent())
