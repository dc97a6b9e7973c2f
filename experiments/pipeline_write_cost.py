"""What writing a product costs the CPU: buffered writes into fresh page-cache pages, against the
flush that ``FrameWriter`` does (``astroprep_torch.io.flush_to_disk``: fdatasync, then drop the pages).

Usage:
    python experiments/pipeline_write_cost.py                 # 40 files of 16 MB per mode, 2 rounds

Each mode writes ``--files`` new files of one 2048^2 float32 image (16.8 MB, FITS-sized) in a
temporary folder on the disk the outputs go to (``--dir``, default: the system temp folder), then
deletes them (untimed) and pauses a few seconds. Modes, alternated over ``--rounds`` (``rewrite`` once,
last):

- ``plain``: ``write()`` into new files, the kernel writes them back later (what astropy's
  ``writeto`` does);
- ``flush``: the same write, then ``fdatasync`` and ``posix_fadvise(DONTNEED)`` (``flush_to_disk``);
- ``write_fits``: ``astroprep_torch.io.write_fits`` without and with ``flush=True`` (FITS header,
  big-endian copy, atomic rename included);
- ``rewrite``: overwrite the pages of existing files in place (no new page-cache pages: the floor).

Per mode: median wall ms per file and process CPU seconds per file (user + system). On virtual
machines a fresh page costs a host fault on first touch; ``flush`` lets the kernel reuse the pages
it just dropped. Writes experiments/results/pipeline_write_cost.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, write_result  # noqa: E402


def run_mode(mode: str, folder: Path, n: int, data: np.ndarray) -> tuple[float, float]:
    from astroprep_torch.io import flush_to_disk, write_fits

    folder.mkdir(parents=True, exist_ok=True)
    if mode == "rewrite":  # files exist first (untimed), then their pages are overwritten
        for i in range(n):
            (folder / f"f{i}.bin").write_bytes(data.tobytes())
    wall = []
    c0 = time.process_time()
    for i in range(n):
        path = folder / f"f{i}.{'fits' if mode.startswith('write_fits') else 'bin'}"
        t0 = time.perf_counter()
        if mode == "write_fits":
            write_fits(path, data)
        elif mode == "write_fits+flush":
            write_fits(path, data, flush=True)
        else:
            with open(path, "r+b" if mode == "rewrite" else "wb") as fh:
                fh.write(data.astype(">f4").data)
            if mode == "flush":
                flush_to_disk(path)
        wall.append(time.perf_counter() - t0)
    cpu = (time.process_time() - c0) / n
    shutil.rmtree(folder)
    return statistics.median(wall), cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--files", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--name", default="pipeline_write_cost")
    args = ap.parse_args()
    data = np.random.default_rng(0).normal(size=(2048, 2048)).astype(np.float32)
    modes = ["plain", "flush", "write_fits", "write_fits+flush", "rewrite"]
    res: dict[str, list] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(dir=args.dir) as d:
        # rewrite runs once, last: deleting its files frees 0.7 GB of cached pages, which a plain
        # write right after would reuse (cheap), hiding the cost of fresh pages
        plan = [(r, m) for r in range(args.rounds) for m in modes[:-1]] + [(0, "rewrite")]
        for r, m in plan:
            res[m].append(run_mode(m, Path(d) / m, args.files, data))
            print(f"round {r} {m}: {res[m][-1][0] * 1e3:.1f} ms per file, {res[m][-1][1] * 1e3:.1f} ms CPU", flush=True)
            time.sleep(3)
        where = os.path.dirname(d)
    command = "python experiments/pipeline_write_cost.py " + " ".join(sys.argv[1:])
    lines = [f"# CPU cost of writing a product ({args.files} new files of 16.8 MB per mode and round)", "",
             f"Command: `{command}`", "", machine() + f". Folder: {where}.", "",
             "| mode | wall ms per file (median; rounds) | CPU ms per file (user + system; rounds) |", "|---|---|---|"]
    for m in modes:
        lines.append(f"| {m} | " + ", ".join(f"{w * 1e3:.1f}" for w, _ in res[m]) + " | "
                     + ", ".join(f"{c * 1e3:.1f}" for _, c in res[m]) + " |")
    lines += ["", "plain: write() into new files; flush: the same, then astroprep_torch.io.flush_to_disk "
              "(fdatasync + posix_fadvise DONTNEED), as FrameWriter does before each rename; write_fits: "
              "with flush=False / True; rewrite (once, last): overwriting existing pages in place (no fresh "
              "pages). A plain write right after cached files were deleted reuses their pages and is cheap "
              "too: what costs is a fresh page, not the copy."]
    print(write_result(args.name, "\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
