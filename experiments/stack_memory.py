"""Memory and time of stacking full-size frames: ``stack_files`` on N frames of 4096 x 4096 (float32).

Frames: Gaussian noise around a sky of 1000 ADU, TAN 1"/px, dithered by up to 20 px (the content
does not change the cost). The stack runs in a child process; its peak resident memory (ru_maxrss)
and wall time are reported for each combine type. Output bands: ``chunk_rows=None`` (automatic,
about 64 MB per frames-by-band array).

``--matching``: frames with stars (one field of ~2,000 stars, whole-pixel dithers, transparencies
0.7-1.2) stacked with ``background="2d", flux_scale="auto"`` (every frame read whole once more for
its background and star fluxes); the section is appended to the results file.

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
options = json.loads(sys.argv[2])
paths = sys.argv[3:]
t0 = time.perf_counter()
res, _ = stack_files(paths, combine=sys.argv[1], **options)
t = time.perf_counter() - t0
print(json.dumps({"seconds": t, "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "shape": list(res.image.shape), "finite": float(torch.isfinite(res.image).float().mean()),
                  "flux_scale": res.flux_scale.tolist()}))
"""


def star_field(size: int, n_stars: int = 2000, seed: int = 1) -> np.ndarray:
    import torch

    from astroprep_torch.sim import render_stars

    g = torch.Generator().manual_seed(seed)
    x, y = torch.rand(n_stars, generator=g) * size, torch.rand(n_stars, generator=g) * size
    flux = 10 ** (-0.4 * (torch.rand(n_stars, generator=g) * 6 + 13 - 25))
    return render_stars((size, size), x, y, flux, fwhm=2.5).reshape(size, size).numpy()


def write_frames(folder: Path, n: int, size: int, stars: bool = False):
    from astropy.io import fits

    from astroprep_torch.sim import make_header

    g = np.random.default_rng(0)
    field = star_field(size) if stars else None
    h0 = make_header((size, size), pixel_scale=1.0)
    paths = []
    for i in range(n):
        off = g.uniform(-20, 20, 2) if i else np.zeros(2)
        off = np.round(off) if stars else off
        h = make_header((size, size), pixel_scale=1.0, crpix_offset=(float(off[0]), float(off[1])))
        data = (1000 + 10 * g.standard_normal((size, size), dtype=np.float32)).astype(np.float32)
        if stars:  # the field moves with CRPIX (whole pixels); transparency 0.7-1.2
            dx, dy = int(round(h["CRPIX1"] - h0["CRPIX1"])), int(round(h["CRPIX2"] - h0["CRPIX2"]))
            data = (data + np.roll(field, (dy, dx), axis=(0, 1))) * (0.7 + 0.5 * (i % 6) / 5)
        p = folder / f"big{i:02d}.fits"
        fits.PrimaryHDU(data, header=h).writeto(p)
        paths.append(str(p))
    return paths


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--frames", type=int, default=50)
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--combine", nargs="+", default=["median", "weighted"])
    ap.add_argument("--matching", action="store_true", help="background=2d, flux_scale=auto on frames with stars")
    args = ap.parse_args()
    options = {"background": "2d", "flux_scale": "auto"} if args.matching else {}
    rows = []
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        paths = write_frames(Path(tmp), args.frames, args.size, stars=args.matching)
        for combine in args.combine:
            out = subprocess.run([sys.executable, "-c", CHILD, combine, json.dumps(options), *paths],
                                 capture_output=True, text=True,
                                 cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE",
                                                "PATH": "/usr/bin:/bin"})
            if out.returncode:
                print(out.stderr[-3000:])
                raise SystemExit(1)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((combine, r))
            print(combine, {k: v for k, v in r.items() if k != "flux_scale"}, flush=True)
    if args.matching:
        return append_matching(args, rows)
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


def append_matching(args, rows):
    """Append the ``--matching`` section to experiments/results/stack_memory.md."""
    truth = np.array([1 / (0.7 + 0.5 * (i % 6) / 5) for i in range(args.frames)]) * 0.7
    lines = ["", "## With per-frame matching: `background=\"2d\"`, `flux_scale=\"auto\"`", "",
             f"Machine: {machine()} (24 GB shared with other jobs). Commit {git_rev()}.",
             f"Command: `python experiments/stack_memory.py --frames {args.frames} --size {args.size} --matching "
             f"--combine {' '.join(args.combine)}`", "",
             f"{args.frames} frames of {args.size}x{args.size} float32 with ~2,000 stars, whole-pixel dithers and "
             "transparencies 0.7-1.2; every frame is also read whole once for its 2-D background and star fluxes.", "",
             "| combine | output | peak RSS (MB) | wall (s) | max rel. error of the flux scales |", "|---|---|---|---|---|"]
    for c, r in rows:
        err = float(np.abs(np.array(r["flux_scale"]) / truth - 1).max())
        lines.append(f"| {c} | {r['shape'][-2]}x{r['shape'][-1]} | {r['maxrss_mb']:.0f} | {r['seconds']:.1f} | "
                     f"{err:.1e} |")
    path = ROOT / "experiments" / "results" / "stack_memory.md"
    path.write_text(path.read_text().rstrip("\n") + "\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"appended to {path}")


if __name__ == "__main__":
    main()
