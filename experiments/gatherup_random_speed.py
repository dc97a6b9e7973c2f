"""Cost of reproducing SExtractor's random ``gatherup`` (astroprep_torch.detect.gatherup_random).

On simulated GWAC-like 2048^2 frames (2500 and 5000 stars, the sky subtracted, one global rms, as
experiments/detect_speed.py) times ``detect_sources`` with ``gatherup="sextractor"`` (the default: the
draws, the branches' list order, the lutz pixel lists) against ``gatherup="probable"`` (most probable
branch) and against the detection of git revision ``--baseline`` (before this work), alternated, one
thread, medians; also the number of gatherup draws and of split detections.

    PYTHONPATH=$PWD python experiments/gatherup_random_speed.py [--baseline 97caa4a] [--reps 7]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from _common import machine, write_result  # noqa: E402
from astroprep_torch.detect import detect_sources  # noqa: E402
from astroprep_torch.detect import gatherup_random as gr  # noqa: E402
from astroprep_torch.sim import simulate_frame  # noqa: E402
from detect_speed import _baseline_package  # noqa: E402

KW = dict(thresh=1.5, minarea=5, deblend_cont=0.005, dense=False)


def _count_draws(img, rms) -> int:
    n = [0]
    orig = gr._draws

    def counting(b, k, p):
        n[0] += int((p > 1e-31).sum())
        return orig(b, k, p)

    gr._draws = counting
    try:
        detect_sources(img, rms, **KW)
    finally:
        gr._draws = orig
    return n[0]


def _alternated(fns: dict, reps: int) -> dict:
    times = {k: [] for k in fns}
    for f in fns.values():
        f()  # warm-up
    for _ in range(reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t)
    return {k: float(np.median(v)) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline", default="97caa4a")
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = _baseline_package(args.baseline, Path(tempfile.mkdtemp(prefix="gatherup_speed_")))
    rows = []
    for n_stars in (2500, 5000):
        fr = simulate_frame((2048, 2048), n_stars=n_stars, seed=1)
        img = fr.image - fr.background
        rms = float(fr.variance.sqrt().median())
        t = _alternated({
            "sextractor": lambda: detect_sources(img, rms, gatherup="sextractor", **KW),
            "probable": lambda: detect_sources(img, rms, gatherup="probable", **KW),
            "baseline": lambda: base.detect_sources(img, rms, **KW),
        }, args.reps)
        det = detect_sources(img, rms, **KW)
        rows.append((n_stars, int(det["label"].numel()), int(det["blended"].sum()), _count_draws(img, rms), t))
        print(rows[-1])
    text = (f"# gatherup_random_speed: cost of SExtractor's random gatherup\n\n{machine()}\n\n"
            f"Command: `PYTHONPATH=$PWD python experiments/gatherup_random_speed.py --baseline {args.baseline} "
            f"--reps {args.reps}`\n\n"
            "2048^2 simulated GWAC-like frames, `detect_sources` (filter, threshold, labels, deblend, clean; "
            "dense=False), one thread, wall-clock medians of alternated runs on a shared machine.\n\n"
            "| stars | objects | deblended branches | gatherup draws | sextractor (s) | probable (s) | "
            f"baseline {args.baseline} (s) | sextractor / baseline |\n|---|---|---|---|---|---|---|---|\n")
    for n_stars, nobj, nbl, nd, t in rows:
        text += (f"| {n_stars} | {nobj} | {nbl} | {nd} | {t['sextractor']:.3f} | {t['probable']:.3f} | "
                 f"{t['baseline']:.3f} | {t['sextractor'] / t['baseline']:.2f} |\n")
    print(text)
    write_result("gatherup_random_speed", text)


if __name__ == "__main__":
    main()
