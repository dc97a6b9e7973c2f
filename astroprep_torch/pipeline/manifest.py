"""The run's manifest (one JSON line per frame: ``manifest.rank<r>.jsonl``, each line whole or
absent) and the full-disk condition that stops a run."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path
from typing import Sequence

from .._checks import RunError

class OutputDiskFull(RunError, OSError):
    """The output folder's disk (or quota) is full: the run stops, since every later frame would
    fail the same way."""


def _disk_full(exc: BaseException, folder=None) -> bool:
    """Whether ``exc`` says the disk is full: ENOSPC / EDQUOT anywhere in its chain, or an OSError
    without errno (astropy's "Not enough space on disk") while ``folder``'s disk has < 1 MiB free."""
    e = exc
    while e is not None:
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        e = e.__cause__ or e.__context__
    if isinstance(exc, OSError) and folder is not None:
        try:
            return shutil.disk_usage(folder).free < (1 << 20)
        except OSError:
            return False
    return False


def _append_jsonl(path: Path, rows: Sequence[dict]) -> None:
    """Append ``rows`` as JSON lines, each whole or absent: one ``os.write`` of all the lines on an
    ``O_APPEND`` descriptor, then ``fsync``. A partial line at the end (left by a crash or a full
    disk) is cut off first, so that no row is ever glued onto it; a short write (a full disk) is
    cut off again and raises ``OSError(ENOSPC)``."""
    if not rows:
        return
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        size = _drop_partial_line(fd)
        try:
            n = os.write(fd, data)
            if n != len(data):
                raise OSError(errno.ENOSPC, f"short write: {n} of {len(data)} bytes", str(path))
            os.fsync(fd)
        except OSError:
            os.ftruncate(fd, size)  # no half row left behind
            raise
    finally:
        os.close(fd)


def _drop_partial_line(fd: int) -> int:
    """Cut a file open on ``fd`` back to its last complete line; returns its size then."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
    keep = size - len(tail) + tail.rfind(b"\n") + 1 if b"\n" in tail else 0
    os.ftruncate(fd, keep)
    return keep


def read_manifest(output_dir) -> dict[str, dict]:
    """The merged manifest of a run: ``{frame name: last row}`` over every rank's file. A line cut
    short (an interrupted write, a full disk) is dropped."""
    rows: dict[str, dict] = {}
    for f in sorted(Path(output_dir).glob("manifest.rank*.jsonl")):
        for line in f.read_bytes().decode("utf-8", "replace").splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError:  # a row cut short by an interruption
                continue
            if isinstance(r, dict) and "name" in r:
                rows[r["name"]] = r
    return rows
