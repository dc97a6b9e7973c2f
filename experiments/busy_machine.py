"""Stage and whole-frame times on a quiet machine and with another process spinning on one core,
before and after the thread policy of ``astroprep_torch._runtime.load`` (issue 19, item 4).

Goal: with one core taken by someone else, no stage slower than 1.3x its own one-thread time.

One child process per (size, stages | pipeline) measures, alternated within the same process,
every combination of
* load: ``quiet`` (the spinner process stopped, SIGSTOP) or ``loaded`` (it spins on a core, SIGCONT;
  ``--spinners N``: N such processes, e.g. 3 on 2 cores for an oversubscribed machine);
* mode: ``1 thread`` (``torch.set_num_threads(1)``, the reference), ``fixed`` (torch's thread count
  whatever the load: ``ASTROPREP_ADAPT_THREADS=0``, the behaviour before the policy) and ``adaptive``
  (the policy: fewer intra-op threads while other processes hold cores; the default now).
Each repetition switches the spinner, waits ``--settle`` seconds (the policy measures others' load
over that window), then times one call per mode in a rotating order; cells are medians over
``--repeat`` repetitions, with the 1-minute load average and the policy's thread choice noted.
Stages: Background2D, Reproject (bilinear), ImageSubtraction, SourceExtractor on a simulated pair;
the pipeline is the Table 2 graph of ``experiments/pipeline_table2.py`` (gwac config, 2 graph
workers, freed memory retained) on a simulated SIP pair.

OMP_WAIT_POLICY is left to the package (``import astroprep_torch`` sets PASSIVE before torch loads);
the old spinning default is in the previous report (git history of experiments/results/busy_machine.md).

Run (on a quiet machine: nothing else running):
    PYTHONPATH=$PWD python experiments/busy_machine.py --sizes 2048 4096 --pipeline-sizes 2048 4096 --repeat 5
Writes experiments/results/busy_machine.md.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STAGES = ("Background2D", "Reproject", "ImageSubtraction", "SourceExtractor")
MODES = ("1 thread", "fixed", "adaptive")
LOADS = ("quiet", "loaded")


def stage_calls(size: int) -> dict:
    import astroprep_torch as ap

    pair = ap.sim.simulate_pair((size, size), n_stars=int(3000 * (size / 2048) ** 2), shift=(3.3, -2.7), seed=0)
    sci, ref = pair.science, pair.reference
    bkg = ap.background.Background2D(box_size=64, filter_size=3)
    b_sci, b_ref = bkg(sci.image, sci.mask), bkg(ref.image, ref.mask)
    s_sub, r_sub = sci.image - b_sci.background, ref.image - b_ref.background
    rep = ap.align.Reproject(ref.shape)
    aligned = rep(s_sub, sci.wcs, ref.wcs, mask=sci.mask)
    sub = ap.subtract.ImageSubtraction()
    det = ap.detect.SourceExtractor()
    return {
        "Background2D": lambda: bkg(sci.image, sci.mask),
        "Reproject": lambda: rep(s_sub, sci.wcs, ref.wcs, mask=sci.mask),
        "ImageSubtraction": lambda: sub(aligned.image.nan_to_num(0.0), r_sub, science_mask=aligned.mask),
        "SourceExtractor": lambda: det(s_sub, b_sci.rms, sci.mask),
    }


def pipeline_call(size: int) -> dict:
    import torch

    sys.path.insert(0, str(HERE))
    from pipeline_table2 import build_pipeline, fresh, warm_up

    from astroprep_torch import retain_freed_memory, sim
    from astroprep_torch.wcs import TanWCS

    retain_freed_memory()
    shape = (4136, 4096) if size == 4096 else (size, size)
    n_stars = int(20000 * shape[0] * shape[1] / (4136 * 4096))
    pair = sim.simulate_pair(shape, n_stars=n_stars, sip=True, shift=(3.3, -2.7), rotation=0.05, seed=1)
    sci, ref = pair.science, pair.reference
    batch = {"science": sci.image, "science_mask": sci.mask, "science_wcs": TanWCS.from_header(sci.header),
             "reference": ref.image, "reference_mask": ref.mask, "reference_wcs": TanWCS.from_header(ref.header)}
    pipe = build_pipeline()
    with torch.no_grad():
        warm_up(pipe, batch, 3)
    return {f"pipeline {shape[0]}x{shape[1]}": lambda: pipe(fresh(batch))}


def set_mode(mode: str, threads: int) -> None:
    import torch

    torch.set_num_threads(1 if mode == "1 thread" else threads)
    os.environ["ASTROPREP_ADAPT_THREADS"] = "1" if mode == "adaptive" else "0"


def settle(spins: list, load: str, seconds: float) -> None:
    """Switch the spinners and restart the policy's measurement window, then wait ``seconds``."""
    from astroprep_torch._runtime import load as policy

    for spin in spins:
        os.kill(spin.pid, signal.SIGCONT if load == "loaded" else signal.SIGSTOP)
    with policy._MONITOR.lock:
        policy._MONITOR.last = policy.sample()
    time.sleep(seconds)


def timed(call, mode: str, threads: int) -> tuple:
    """(seconds, 1-minute load average, intra-op threads the policy chose) of one call."""
    import torch

    from astroprep_torch._runtime import threads_now

    set_mode(mode, threads)
    t0 = time.perf_counter()
    call()
    dt = time.perf_counter() - t0
    chosen = threads_now(torch.get_num_threads()) if mode == "adaptive" else torch.get_num_threads()
    return dt, os.getloadavg()[0], chosen


def child(kind: str, size: int, repeat: int, settle_s: float, spinners: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import astroprep_torch  # noqa: F401  (first: it sets OMP_WAIT_POLICY=PASSIVE before torch loads)
    import torch

    threads = torch.get_num_threads()
    calls = stage_calls(size) if kind == "stages" else pipeline_call(size)
    spins = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(spinners)]
    out = {"threads": threads, "policy": os.environ.get("OMP_WAIT_POLICY", "unset"), "cells": {}}
    try:
        with torch.no_grad():
            for name, call in calls.items():
                for mode in MODES:  # warm-up
                    set_mode(mode, threads)
                    call()
                log = {(load, mode): [] for load in LOADS for mode in MODES}
                for r in range(repeat):
                    for load in (LOADS if r % 2 == 0 else LOADS[::-1]):
                        settle(spins, load, settle_s)
                        for mode in MODES[r % 3:] + MODES[:r % 3]:
                            log[(load, mode)].append(timed(call, mode, threads))
                out["cells"][name] = {f"{load}|{mode}": v for (load, mode), v in log.items()}
    finally:
        for spin in spins:
            os.kill(spin.pid, signal.SIGCONT)
            spin.kill()
            spin.wait()
    return out


def run_child(kind: str, size: int, repeat: int, settle_s: float, spinners: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    cmd = [sys.executable, __file__, "--child", kind, "--sizes", str(size), "--repeat", str(repeat),
           "--settle", str(settle_s), "--spinners", str(spinners)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{kind} at {size}: {res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def med(cell, i=0):
    return statistics.median(v[i] for v in cell)


def table(results: dict) -> list:
    head = ("| stage | " + " | ".join(f"{load} {mode}" for load in LOADS for mode in MODES) +
            " | before: loaded fixed / quiet 1 thread | after: loaded adaptive / quiet 1 thread "
            "| loaded adaptive / loaded 1 thread | load average (1 min) |")
    lines = [head, "|" + " --- |" * (len(LOADS) * len(MODES) + 5)]
    for name, cells in results.items():
        def cell(load, mode):
            c = cells[f"{load}|{mode}"]
            t = med(c)
            return f"{t:.3f} ({'/'.join(str(k) for k in sorted({v[2] for v in c}))})" if mode == "adaptive" else f"{t:.3f}"
        one_q, one_l = med(cells["quiet|1 thread"]), med(cells["loaded|1 thread"])
        loads = [v[1] for c in cells.values() for v in c]
        lines.append(f"| {name} | " + " | ".join(cell(load, mode) for load in LOADS for mode in MODES) +
                     f" | {med(cells['loaded|fixed']) / one_q:.2f} | {med(cells['loaded|adaptive']) / one_q:.2f} | "
                     f"{med(cells['loaded|adaptive']) / one_l:.2f} | {min(loads):.1f}-{max(loads):.1f} |")
    return lines


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096], help="stage frames, square")
    p.add_argument("--pipeline-sizes", type=int, nargs="*", default=[2048],
                   help="Table 2 graph frames (4096 means the GWAC 4136x4096 frame)")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--settle", type=float, default=0.6, help="seconds after each switch of the spinner")
    p.add_argument("--spinners", type=int, default=1, help="processes spinning while loaded (1: one core taken)")
    p.add_argument("--child", choices=("stages", "pipeline"))
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.sizes[0], args.repeat, args.settle, args.spinners)))
        return
    sys.path.insert(0, str(HERE))
    from _common import git_rev, machine, write_result

    load0 = os.getloadavg()[0]
    results, seen = {}, {}
    for kind, sizes in (("stages", args.sizes), ("pipeline", args.pipeline_sizes)):
        for size in sizes:
            r = run_child(kind, size, args.repeat, args.settle, args.spinners)
            seen[f"{kind} {size}"] = f"{r['policy']}, {r['threads']} threads"
            results.update({(f"{name} {size}^2" if kind == "stages" else name): c for name, c in r["cells"].items()})
            print("\n".join(table({k: v for k, v in results.items()})), flush=True)
    cmd = (f"python experiments/busy_machine.py --sizes {' '.join(map(str, args.sizes))} --pipeline-sizes "
           f"{' '.join(map(str, args.pipeline_sizes))} --repeat {args.repeat}"
           + (f" --spinners {args.spinners}" if args.spinners != 1 else ""))
    lines = ["# Stage and Table 2 times on a quiet vs a loaded machine, before vs after the thread policy (issue 19, item 4)",
             "", f"Command: `PYTHONPATH=$PWD {cmd}`; git {git_rev()}; {machine()} (load average {load0:.2f} at the "
             f"start). Seconds, median of {args.repeat} alternated calls per cell; `adaptive` cells add the intra-op "
             "thread counts the policy chose. quiet: the spinners stopped; loaded: "
             f"{args.spinners} extra process(es) spinning, each on a core. fixed = before (torch's thread count whatever the load, `ASTROPREP_ADAPT_THREADS=0`); "
             "adaptive = after (the default: `astroprep_torch._runtime.load`).", "",
             "Goal: loaded / quiet 1 thread <= 1.3 for every stage.", ""] + table(results) + [
             "", "OpenMP wait policy and thread count seen by each child: " +
             "; ".join(f"{k}: {v}" for k, v in seen.items()), ""]
    text = "\n".join(lines)
    print(text)
    write_result("busy_machine", text)


if __name__ == "__main__":
    main()
