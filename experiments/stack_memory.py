"""Memory and time of stacking full-size frames: ``stack_files`` on N frames of 4096 x 4096 (float32).

Frames: Gaussian noise around a sky of 1000 ADU, TAN 1"/px, dithered by up to 20 px (the content
does not change the cost). The stack runs in a child process; its peak resident memory (ru_maxrss)
and wall time are reported for each combine type. Output bands: ``chunk_rows=None`` (automatic,
about 64 MB per frames-by-band array).

Run: ``python experiments/stack_memory.py --frames 50`` (writes experiments/results/stack_memory.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from _common import git_rev, machine, write_result  # noqa: E402

CHILD = """
import json, resource, sys, time, torch
torch.set_num_threads(2)
from astroprep_torch.stack import stack_files
paths = sys.argv[2:]
t0 = time.perf_counter()
res, _ = stack_files(paths, combine=sys.argv[1])
t = time.perf_counter() - t0
print(json.dumps({"seconds": t, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "shape": list(res.image.shape), "finite": float(torch.isfinite(res.image).float().mean())}))
"""


def write_frames(folder: Path, n: int, size: int):
    from astropy.io import fits

    from astroprep_torch.sim import make_header

    g = np.random.default_rng(0)
    paths = []
    for i in range(n):
        off = g.uniform(-20, 20, 2) if i else np.zeros(2)
        h = make_header((size, size), pixel_scale=1.0, crpix_offset=(float(off[0]), float(off[1])))
        data = (1000 + 10 * g.standard_normal((size, size), dtype=np.float32)).astype(np.float32)
        p = folder / f"big{i:02d}.fits"
        fits.PrimaryHDU(data, header=h).writeto(p)
        paths.append(str(p))
    return paths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--combine", nargs="+", default=["median", "weighted"])
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        paths = write_frames(Path(tmp), args.frames, args.size)
        for combine in args.combine:
            out = subprocess.run([sys.executable, "-c", CHILD, combine, *paths], capture_output=True, text=True,
                                 cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE",
                                                "PATH": "/usr/bin:/bin"})
            if out.returncode:
                print(out.stderr[-3000:])
                raise SystemExit(1)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((combine, r))
            print(combine, r, flush=True)
    lines = ["# Stacking full-size frames: memory and time", "",
             f"Machine: {machine()} (24 GB shared with other jobs). Commit {git_rev()}.",
             f"Command: `python experiments/stack_memory.py --frames {args.frames} --size {args.size}`", "",
             f"{args.frames} frames of {args.size}x{args.size} float32 ({args.frames * args.size ** 2 * 4 / 2**30:.1f} GiB "
             "of pixels) stacked by `stack_files` with automatic bands; peak resident memory of the process.", "",
             "| combine | output | peak RSS (MB) | wall (s) |", "|---|---|---|---|"]
    for c, r in rows:
        lines.append(f"| {c} | {r['shape'][-2]}x{r['shape'][-1]} | {r['maxrss_mb']:.0f} | {r['seconds']:.1f} |")
    path = write_result("stack_memory", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
