"""The eager default of ``align.Reproject`` vs reproject's ``reproject_interp`` (issue 19, item 3).

``Reproject(shape)`` as a user calls it (eager, no ``torch.compile``, default ``grid_step`` = the
coarse-grid mapping) and with the exact per-pixel mapping (``grid_step=None``, the former default),
float32 and float64, against ``reproject_interp`` (bilinear) on the same TAN-SIP frame at 2048^2,
alternated in rounds; medians. Also the largest difference from the exact mapping's output.

Run:  python experiments/reproject_eager_default.py [--size 2048] [--rounds 5] [--threads 2]
Writes experiments/results/reproject_eager_default.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import git_rev, machine, write_result  # noqa: E402

from astroprep_torch import sim  # noqa: E402
from astroprep_torch.align import Reproject  # noqa: E402
from astroprep_torch.wcs import TanWCS  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from astropy.wcs import WCS
    from reproject import reproject_interp

    n = args.size
    h_ref = sim.make_header((n, n), ra=150.0, dec=30.0, pixel_scale=1.0, sip=True)
    h_sci = sim.make_header((n, n), ra=150.0, dec=30.0, pixel_scale=1.0, rotation=7.0, crpix_offset=(13.3, -8.7), sip=True)
    img32 = sim.simulate_frame((n, n), n_stars=n * n // 400, seed=1).image
    ws, wd = TanWCS.from_header(h_sci), TanWCS.from_header(h_ref)
    arr = img32[0, 0].double().numpy()
    calls = {"reproject_interp (bilinear)": lambda: reproject_interp((arr, WCS(h_sci)), WCS(h_ref), shape_out=(n, n),
                                                                     order="bilinear")}
    outs = {}
    for dt in (torch.float32, torch.float64):
        img = img32.to(dt)
        name = str(dt).replace("torch.", "")
        calls[f"Reproject(shape) default, {name}"] = (lambda img=img: Reproject((n, n))(img, ws, wd))
        calls[f"Reproject(shape, grid_step=None) exact, {name}"] = (lambda img=img: Reproject((n, n), grid_step=None)(img, ws, wd))
    times = {k: [] for k in calls}
    for k, f in calls.items():  # warm-up
        outs[k] = f()
    for _ in range(args.rounds):
        for k, f in calls.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    peer = med["reproject_interp (bilinear)"]
    lines = ["# Eager Reproject default vs reproject_interp (issue 19, item 3)", "",
             f"Command: `python experiments/reproject_eager_default.py --size {n} --rounds {args.rounds} --threads "
             f"{args.threads}`; git {git_rev()}; {machine()} (machine shared with other jobs: ratios from alternated "
             f"rounds, medians). TAN-SIP -> TAN-SIP, rotation 7 deg, {n}^2, eager (no torch.compile).", "",
             "| method | median s | speed-up vs reproject_interp | max abs diff vs exact (same dtype, ADU) |",
             "| --- | ---: | ---: | ---: |"]
    for k, t in med.items():
        diff = ""
        if k.startswith("Reproject(shape) default"):
            exact = outs[k.replace("Reproject(shape) default", "Reproject(shape, grid_step=None) exact")].image
            d = (outs[k].image.double() - exact.double()).abs()
            diff = f"{float(d[torch.isfinite(d)].max()):.3g}"
        lines.append(f"| {k} | {t:.3f} | {peer / t:.1f}x | {diff} |")
    text = "\n".join(lines) + "\n"
    print(text)
    write_result("reproject_eager_default", text)


if __name__ == "__main__":
    main()
