"""Stage times on a quiet machine and with one extra process spinning on a core, old vs new
OpenMP default (issue 19, item 4).

Variants, each in a fresh subprocess with its own environment:
* ``old``: ``OMP_WAIT_POLICY`` unset and torch imported before astroprep_torch (so the package
  cannot set it): OpenMP's default, idle workers spin.
* ``new``: ``OMP_WAIT_POLICY`` unset, astroprep_torch imported first: it sets ``PASSIVE``.
* ``1 thread``: ``torch.set_num_threads(1)`` (the reference the goal is stated against: with one core
  taken by someone else, no stage slower than 1.3x its own one-thread time).
Stages at ``--size`` (2048): ImageSubtraction, Background2D, Reproject (bilinear, default grid),
SourceExtractor, on a simulated pair; the median of ``--repeat`` calls after a warm-up. "Loaded" runs
a second Python process spinning on a core for the whole measurement.

Run:  python experiments/busy_machine.py [--size 2048] [--repeat 5]
Writes experiments/results/busy_machine.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VARIANTS = {"old (spinning)": ("torch_first", None), "new (PASSIVE)": ("package_first", None),
            "1 thread": ("package_first", 1)}
STAGES = ("ImageSubtraction", "Background2D", "Reproject", "SourceExtractor")


def child(size: int, repeat: int, order: str, threads) -> dict:
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")  # what the OpenMP runtime will read
    sys.path.insert(0, str(ROOT))
    if order == "torch_first":
        import torch  # noqa: F401  (before the package: the old behaviour)
    import astroprep_torch as ap
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    pair = ap.sim.simulate_pair((size, size), n_stars=int(3000 * (size / 2048) ** 2), shift=(3.3, -2.7), seed=0)
    sci, ref = pair.science, pair.reference
    bkg = ap.background.Background2D(box_size=64, filter_size=3)
    b_sci, b_ref = bkg(sci.image, sci.mask), bkg(ref.image, ref.mask)
    s_sub, r_sub = sci.image - b_sci.background, ref.image - b_ref.background
    rep = ap.align.Reproject(ref.shape)
    aligned = rep(s_sub, sci.wcs, ref.wcs, mask=sci.mask)
    sub = ap.subtract.ImageSubtraction()
    det = ap.detect.SourceExtractor()
    calls = {
        "ImageSubtraction": lambda: sub(aligned.image.nan_to_num(0.0), r_sub, science_mask=aligned.mask),
        "Background2D": lambda: bkg(sci.image, sci.mask),
        "Reproject": lambda: rep(s_sub, sci.wcs, ref.wcs, mask=sci.mask),
        "SourceExtractor": lambda: det(s_sub, b_sci.rms, sci.mask),
    }
    out = {"threads": torch.get_num_threads(),
           "policy": policy if order == "torch_first" else os.environ.get("OMP_WAIT_POLICY", "unset")}
    with torch.no_grad():
        for name in STAGES:
            calls[name]()
            ts = []
            for _ in range(repeat):
                t0 = time.perf_counter()
                calls[name]()
                ts.append(time.perf_counter() - t0)
            out[name] = sorted(ts)[len(ts) // 2]
    return out


def run_variant(order: str, threads, size: int, repeat: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    cmd = [sys.executable, __file__, "--child", order, "--size", str(size), "--repeat", str(repeat)]
    if threads:
        cmd += ["--threads", str(threads)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def spinner() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--child", choices=("torch_first", "package_first"))
    p.add_argument("--threads", type=int)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.size, args.repeat, args.child, args.threads)))
        return
    results = {}
    for load in ("quiet", "loaded"):
        for name, (order, threads) in VARIANTS.items():
            spin = spinner() if load == "loaded" else None
            try:
                results[(load, name)] = run_variant(order, threads, args.size, args.repeat)
            finally:
                if spin is not None:
                    spin.kill()
                    spin.wait()
    sys.path.insert(0, str(HERE))
    from _common import git_rev, machine, write_result

    head = "| stage | " + " | ".join(f"{load} {name}" for load in ("quiet", "loaded") for name in VARIANTS) + \
        " | loaded new / 1 thread (goal <= 1.3) | loaded old / 1 thread |"
    lines = ["# Stage times on a quiet vs a loaded machine (issue 19, item 4)", "",
             f"Command: `python experiments/busy_machine.py --size {args.size} --repeat {args.repeat}`; git {git_rev()}; "
             f"{machine()}. Loaded: one extra process spinning on a core. Seconds, median of {args.repeat} calls.",
             "Each variant runs in a fresh subprocess (old: torch imported first, OMP_WAIT_POLICY unset; new: "
             "astroprep_torch first, which sets PASSIVE; 1 thread: new with torch.set_num_threads(1)).", "",
             head, "|" + " --- |" * (len(VARIANTS) * 2 + 3)]
    for stage in STAGES:
        vals = [results[(load, name)][stage] for load in ("quiet", "loaded") for name in VARIANTS]
        one = results[("quiet", "1 thread")][stage]
        lines.append(f"| {stage} | " + " | ".join(f"{v:.3f}" for v in vals) +
                     f" | {results[('loaded', 'new (PASSIVE)')][stage] / one:.2f} | "
                     f"{results[('loaded', 'old (spinning)')][stage] / one:.2f} |")
    policies = {f"{load} {name}": f"{r['policy']}, {r['threads']} threads" for (load, name), r in results.items()}
    lines += ["", "Environment seen by each child: " + "; ".join(f"{k}: {v}" for k, v in policies.items()), ""]
    text = "\n".join(lines)
    print(text)
    write_result("busy_machine", text)


if __name__ == "__main__":
    main()
