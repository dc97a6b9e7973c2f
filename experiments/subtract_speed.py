"""Speed and memory of ImageSubtraction at 2048^2 and 4096^2 (issue 6), vs sfft's numpy backend.

Same configuration as the issue's HOTPANTS figures: 3 Gaussians (sigma 0.7/1.5/3.0, degrees 6/4/2),
kernel half width 8, spatial order 2, background order 1, 10x10 stamps (half width 15). Input:
a simulated GWAC-like aligned pair (astroprep_torch.sim, FWHM 2.5 vs 3.0 px).

Each measurement runs in a fresh subprocess so that its peak RSS (``resource.getrusage``
``ru_maxrss``) is its own; the baseline RSS after loading torch and the inputs is reported too.
Times are medians of ``--reps`` runs after one warm-up. Accuracy costs of the shortcuts (FFT tiles
with a per-tile kernel instead of the exact spatially varying convolution; float32 instead of
float64) are measured at 2048^2 against the exact float64 result.

    python experiments/subtract_speed.py                # writes experiments/results/subtract_speed.md
    python experiments/subtract_speed.py --sizes 2048   # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch is imported (workers inherit it)

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import hotpants_exe, hotpants_options, run_hotpants  # noqa: E402
CACHE = Path(os.environ.get("SUBTRACT_SPEED_CACHE", "/tmp/astroprep_subtract_speed"))
CONFIG = dict(kernel_half_width=8, gaussians=((0.7, 6), (1.5, 4), (3.0, 2)), spatial_order=2, background_order=1,
              stamp_grid=(10, 10), stamp_half_width=15, gain=1.5, read_noise=10.0, saturation=60000.0)
HOTPANTS = {2048: (3.3, None), 4096: (10.5, 723.0)}
SFFT_ISSUE = "sfft numpy backend per the issue: 37 s and 10.6 GB at 2048^2"  # issue 6: seconds, MB (single-threaded, this machine)


NOTES = """
## Notes

- Seventh build session (2026-11-23): HOTPANTS v5.1.11 built here (README, Development) and run by
  this script on the same pairs: at 4096^2 it took 10.56 s of CPU (the issue quoted 10.5 s) and
  733 MB, against our 0.94 s (11.3x less CPU; goal 10x) and 1204 MB peak RSS (~0.68 GB of it is
  torch and the loaded pair). Command: `SFFT_PATH=DIR python experiments/subtract_speed.py --threads 1`.
- Session of 2026-11-23 (second build session): rows marked "(before)" run the module as it was at
  the start of the session (`--before FILE`), in the same run, same machine, same load. At 4096^2,
  1 thread: CPU 1.75 s -> 1.14 s, peak RSS 1390 -> 1206 MB (goal <= 1.5 GB: met; ~0.68 GB of it is
  torch + the loaded pair), 9.2x less CPU than HOTPANTS' 10.5 s (goal 10x: not quite); 2048^2:
  1.01 s -> 0.49 s. (Earlier runs of this script the same day gave 1.58-1.73 s before and
  1.14-1.16 s after: the load moves CPU times by ~10%.) What changed for speed: (1) the global normal matrix is assembled from its
  Kronecker structure, G[(a,s),(b,t)] = sum_r N_r[a,b] s_r[s] s_r[t] (R C^2 S^2 instead of R C M^2
  operations per rejection iteration, ~1 GFlop -> 10 MFlop); (2) candidate stamps beyond the first
  of each cell are built only when a rejection reaches them (usually none: 100 instead of 300
  stamp systems); (3) the stamp search reduces the frame to 8x8 block maxima in one max_pool2d pass
  and ranks them per cell with one sort (no per-cell top-k over all pixels; no candidate is lost:
  two pixels of a block are within the isolation radius); (4) the design matrices are kept in the
  images' float32 (as computed) and upcast to float64 32 stamps at a time for the normal equations;
  the stamp system is freed before the frame-sized passes; the background is added in place
  (baddbmm of its separable factors); each frame's sky statistics are computed once. These are
  exact reorganisations. One behaviour change (fidelity, not speed): the merit clip of the stamp
  rejection starts from the median/MAD, so a single spoiled stamp among few is rejected (kernel sum
  at 4096^2 0.9994 -> 0.9995; a rejected stamp's replacement is then built, hence the extra ~50 MB).
- Where the time goes now at 4096^2 (1 thread, process CPU time per stage, steady state, total
  1.02 s): tiled FFTs 0.39 s (image 0.2, variance 0.2), fit (normal equations of 100 stamps, solve,
  rejection) 0.16 s, stamp systems (basis convolution of the cutouts) 0.12 s, stamp search 0.10 s,
  bad-pixel masks 0.09 s, Poisson variances 0.03 s, the rest (direction, difference, variance,
  stamp statistics) ~0.13 s. No tile size was cheaper than 128 px (table); about 1 s is where
  this algorithm lands on one core of this CPU.
- Shortcuts and their cost (table above, 2048^2, vs the exact spatially varying float64 result;
  numbers of the second session's run: the seventh session's run, with the later defaults of the
  module, gave max 0.57 sigma, rms 0.004 sigma and 0.37% of the variance for the 128 px tiles):
  (1) per-tile kernel, 128 px FFT tiles (kernel at the tile centre; the kernel sum is exact
  everywhere): max 0.38 sigma, rms 0.003 sigma change of the difference, 0.15% of the variance;
  256 px tiles cost 1.2 sigma max for no CPU gain; 64 px tiles 0.15 sigma for ~20% more CPU.
  (2) float32 images and FFTs: no visible change on top of the tiling. (3) A coarser tile for the
  variance alone (`variance_tile_size=256`) doubles the variance error (0.27%) and was not faster in
  CPU time at 4096^2 (0.28 vs 0.20 s per pass, 1 thread), so the default keeps 128.
  (4) Stamp normal matrices stay float64 (needed for the conditioning of the Gaussian basis).
- 2 threads (`python experiments/subtract_speed.py --sizes 4096 --threads 2 --no-sfft --no-accuracy
  --before FILE --out ...`, 2026-11-23 04:11 UTC, load average ~4, before the merit-clip change):
  4096^2 wall 2.60 s, CPU 1.34 s, peak 1157 MB (before: wall 3.43 s, CPU 1.66 s, 1400 MB). With ~4 other jobs on the 2 cores a
  second thread only adds waiting; the 1-thread CPU time is the fair figure here.
- sfft (1.7.3, numpy backend, Customized packet, same half width 8, kernel order 2, background
  order 1, no masking) runs only at 1024^2 here (its numpy backend needs ~10.6 GB at 2048^2; this
  machine has 23 GB shared by several jobs). It is installed into a side directory
  (`pip install --target DIR sfft numba pyfftw fastremap`, ~3 min), not into the project venv;
  pass `SFFT_PATH=DIR`.
"""


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def make_pair(size: int):
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / f"pair_{size}.npz"
    if not path.exists():
        import torch

        from astroprep_torch.sim import simulate_pair

        n_stars = int(20000 * (size / 4096) ** 2 * 2)
        p = simulate_pair((size, size), n_stars=n_stars, shift=(0.0, 0.0), fwhm=(2.5, 3.0), n_transients=50,
                          n_moving=0, seed=size)
        np.savez(path, sci=p.science.image[0, 0].numpy(), ref=p.reference.image[0, 0].numpy(),
                 sci_mask=p.science.mask[0, 0].numpy(), ref_mask=p.reference.mask[0, 0].numpy())
        del p, torch
    return path


def worker(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    if args.before:  # an earlier version of the module, for a before/after comparison in one run
        import importlib.util

        spec = importlib.util.spec_from_file_location("astroprep_torch._subtract_before", args.before)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        ImageSubtraction = mod.ImageSubtraction
    else:
        from astroprep_torch.subtract import ImageSubtraction

    d = np.load(make_pair(args.size))
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    sci = torch.from_numpy(d["sci"]).to(dtype)[None, None]
    ref = torch.from_numpy(d["ref"]).to(dtype)[None, None]
    sm = torch.from_numpy(d["sci_mask"])[None, None]
    rm = torch.from_numpy(d["ref_mask"])[None, None]
    tile = None if args.tile == 0 else args.tile
    extra = {} if args.before else dict(variance_tile_size=args.vtile or None)
    sub = ImageSubtraction(**CONFIG, tile_size=tile, **extra)
    base = rss_mb()
    times, cpu = [], []
    res = None
    for i in range(args.reps + 1):
        res = None  # the peak is that of one subtraction, not of one plus the previous result
        t0, c0 = time.perf_counter(), time.process_time()
        with torch.no_grad():
            res = sub(sci, ref, sm, rm)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out = dict(times=times[1:], median=float(np.median(times[1:])), cpu=float(np.median(cpu[1:])),
               peak_mb=rss_mb(), base_mb=base,
               kernel_sum=float(res.kernel_sum[0]), n_stamps=int(res.stamp_stats.used.sum()))
    if args.save:
        np.savez(args.save, diff=res.difference[0, 0].double().numpy(), var=res.variance[0, 0].double().numpy())
    return out


def sfft_worker(args) -> dict:
    """sfft numpy backend (Customized packet, same kernel half width / orders), if installed."""
    extra = os.environ.get("SFFT_PATH")
    if extra:
        sys.path.insert(0, extra)
    from astropy.io import fits
    from sfft.CustomizedPacket import Customized_Packet

    d = np.load(make_pair(args.size))
    tmp = CACHE / f"sfft_{args.size}"
    tmp.mkdir(exist_ok=True)
    files = {}
    for name, arr in (("ref", d["ref"]), ("sci", d["sci"])):
        files[name] = str(tmp / f"{name}.fits")
        fits.writeto(files[name], arr.astype(np.float64), overwrite=True)
        # masked versions: sfft wants images with non-stamp pixels zeroed; use the whole image
        files["m" + name] = files[name]
    base = rss_mb()
    times, cpu = [], []
    for i in range(args.reps + 1):
        t0, c0 = time.perf_counter(), time.process_time()
        Customized_Packet.CP(FITS_REF=files["ref"], FITS_SCI=files["sci"], FITS_mREF=files["mref"],
                             FITS_mSCI=files["msci"], ForceConv="REF", GKerHW=8,
                             FITS_DIFF=str(tmp / "diff.fits"), KerPolyOrder=2, BGPolyOrder=1, ConstPhotRatio=True,
                             BACKEND_4SUBTRACT="Numpy", NUM_CPU_THREADS_4SUBTRACT=args.threads, VERBOSE_LEVEL=0)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return dict(times=times[1:], median=float(np.median(times[1:])), cpu=float(np.median(cpu[1:])),
                peak_mb=rss_mb(), base_mb=base)


def hotpants_run(exe: str, size: int, reps: int) -> dict:
    """HOTPANTS (one thread) on the same pair with the same configuration, ``reps`` runs: median wall
    time, median CPU time (user + sys) and the largest peak RSS of its runs. GNU time reports the
    tool's own CPU time and peak RSS (a child forked from this process would count this process's
    RSS before its exec in ru_maxrss)."""
    from astropy.io import fits

    gnu_time = shutil.which("time") or "/usr/bin/time"
    if not os.access(gnu_time, os.X_OK):
        return dict(error="GNU time not found (Debian package `time`)")
    d = np.load(make_pair(size))
    paths = {}
    for key in ("sci", "ref"):
        paths[key] = CACHE / f"hotpants_{key}_{size}.fits"
        if not paths[key].exists():
            fits.writeto(paths[key], d[key].astype(np.float32), overwrite=True)
    lower = 0.5 * float(min(np.median(d["sci"]), np.median(d["ref"])))
    c = CONFIG
    opts = hotpants_options(c["gaussians"], c["kernel_half_width"], c["spatial_order"], c["background_order"],
                            c["stamp_grid"], c["stamp_half_width"], (c["gain"],) * 2, (c["read_noise"],) * 2,
                            c["saturation"], lower)
    stats = CACHE / "hotpants.time"
    walls, cpus, peaks = [], [], []
    for _ in range(max(1, reps)):
        try:
            walls.append(run_hotpants(exe, paths["sci"], paths["ref"], CACHE / f"hotpants_diff_{size}.fits", opts,
                                      prefix=[gnu_time, "-o", str(stats), "-f", "%U %S %M"]))
        except subprocess.CalledProcessError as exc:
            return dict(error=f"hotpants exited with {exc.returncode}: {' '.join(opts)}")
        user, sys_, kb = stats.read_text().split()[-3:]
        cpus.append(float(user) + float(sys_))
        peaks.append(float(kb) / 1024.0)
    return dict(median=float(np.median(walls)), cpu=float(np.median(cpus)), peak_mb=float(max(peaks)),
                cmd=" ".join(opts))


def run(cmd_args: list[str], timeout=1800) -> dict:
    cmd = [sys.executable, __file__] + cmd_args
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        return dict(error=out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc={out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def accuracy(size: int, threads: int) -> list[str]:
    """Shortcut costs vs the exact float64 convolution, in units of the difference's sigma."""
    lines = []
    ref_file = CACHE / f"exact64_{size}.npz"
    r = run(["--worker", "--size", str(size), "--tile", "0", "--dtype", "float64", "--reps", "0",
             "--threads", str(threads), "--save", str(ref_file)])
    if "error" in r:
        return [f"exact reference failed: {r['error']}"]
    exact = np.load(ref_file)
    sig = np.sqrt(exact["var"])
    e = 16
    for tile, vtile, dtype in ((128, 128, "float64"), (128, 128, "float32"), (128, 256, "float32"),
                               (256, 256, "float32"), (64, 64, "float32")):
        f = CACHE / f"t{tile}_{vtile}_{dtype}_{size}.npz"
        rr = run(["--worker", "--size", str(size), "--tile", str(tile), "--vtile", str(vtile), "--dtype", dtype,
                  "--reps", "1", "--threads", str(threads), "--save", str(f)])
        if "error" in rr:
            lines.append(f"| {tile} | {vtile} | {dtype} | failed: {rr['error']} | | | |")
            continue
        got = np.load(f)
        dz = ((got["diff"] - exact["diff"]) / sig)[e:-e, e:-e]
        dv = (got["var"] / exact["var"] - 1)[e:-e, e:-e]
        lines.append(f"| {tile} | {vtile} | {dtype} | {np.abs(dz).max():.2e} | {np.sqrt(np.mean(dz ** 2)):.2e} | "
                     f"{np.abs(dv).max():.2e} | {rr['cpu']:.2f} |")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--sfft", action="store_true")
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096])
    ap.add_argument("--sfft-max", type=int, default=1024,
                    help="largest size given to sfft (its numpy backend needs ~10.6 GB at 2048^2; this shared "
                         "machine has 23 GB for ~9 jobs)")
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--vtile", type=int, default=0, help="FFT tile size of the variance pass (0: same as --tile)")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--save", default="")
    ap.add_argument("--before", default="", help="path of an earlier subtract.py: adds its rows (same run)")
    ap.add_argument("--no-sfft", action="store_true")
    ap.add_argument("--no-accuracy", action="store_true")
    ap.add_argument("--no-hotpants", action="store_true", help="quote the issue's HOTPANTS times instead of running it")
    ap.add_argument("--out", default=str(HERE / "results" / "subtract_speed.md"))
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.sfft:
        print(json.dumps(sfft_worker(args)))
        return

    import torch

    load = os.getloadavg()
    lines = ["# ImageSubtraction speed and memory (issue 6)", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
             f"{args.threads} threads (`torch.set_num_threads`); load average at start {load[0]:.1f}/{load[1]:.1f}/"
             f"{load[2]:.1f}, at the end: see below (the machine is shared: wall times are inflated by other jobs; "
             "the process CPU time (user+sys of all threads, `time.process_time`) is the best proxy for the wall "
             "time on a quiet machine with 1 thread and is what the ratios use).", "",
             f"Configuration: {CONFIG}; FFT tiles of 128 px (the default: 112 output px + 2r halo) for the image "
             "and the variance, float32.",
             "Input: simulated aligned GWAC-like pair (FWHM 2.5 vs 3.0 px). Medians of "
             f"{args.reps} runs after a warm-up, each size in a fresh subprocess; peak = ru_maxrss of that process, "
             "base = its RSS after importing torch and loading the pair.", "",
             "| size | ours wall median (s) | runs (s) | ours CPU (s) | peak RSS (MB) | base RSS (MB) | ours - base (MB) "
             "| kernel sum | stamps | HOTPANTS (1 thread; CPU time, peak RSS) | ratio HOTPANTS / ours CPU | sfft numpy wall (s) "
             "| sfft CPU (s) | sfft peak (MB) | ratio sfft/ours CPU |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    hp_exe = None if args.no_hotpants else hotpants_exe()
    hp_cmd = None
    jobs = [(size, "") for size in args.sizes]
    if args.before:
        jobs += [(size, args.before) for size in args.sizes if size >= 2048]
    for size, before in jobs:
        make_pair(size)
        r = run(["--worker", "--size", str(size), "--tile", "128", "--dtype", "float32", "--reps", str(args.reps),
                 "--threads", str(args.threads)] + (["--before", before] if before else []))
        if "error" in r:
            lines.append(f"| {size} | failed: {r['error']} |")
            continue
        hp_t, hp_m = HOTPANTS.get(size, (None, None))
        hp = (f"{hp_t} s (issue)" + (f", {hp_m:.0f} MB" if hp_m else "")) if hp_t else "n/a"
        if hp_exe and not before:
            h = hotpants_run(hp_exe, size, args.reps)
            if "error" in h:
                print(h["error"], flush=True)
            else:
                hp_t, hp_cmd = h["cpu"], h["cmd"]
                hp = f"CPU {h['cpu']:.2f} s, wall {h['median']:.2f} s, {h['peak_mb']:.0f} MB"
        s = dict(error="skipped") if args.no_sfft or before or size > args.sfft_max else run(
            ["--sfft", "--size", str(size), "--reps", "1", "--threads", str(args.threads)])
        sfft_t = f"{s['median']:.2f}" if "median" in s else f"n/a ({s['error'][:60]})"
        sfft_m = f"{s['peak_mb']:.0f}" if "median" in s else ""
        ratio = f"{hp_t / r['cpu']:.1f}x" if hp_t else "n/a"
        sfft_c = f"{s['cpu']:.2f}" if "median" in s else ""
        sratio = f"{s['cpu'] / r['cpu']:.1f}x" if "median" in s else ""
        label = f"{size} (before)" if before else str(size)
        lines.append(f"| {label} | {r['median']:.2f} | {', '.join(f'{t:.2f}' for t in r['times'])} | {r['cpu']:.2f} | "
                     f"{r['peak_mb']:.0f} | "
                     f"{r['base_mb']:.0f} | {r['peak_mb'] - r['base_mb']:.0f} | {r['kernel_sum']:.4f} | {r['n_stamps']} | "
                     f"{hp} | {ratio} | "
                     f"{sfft_t} | {sfft_c} | {sfft_m} | {sratio} |")
        print(lines[-1], flush=True)
    lines += ["", SFFT_ISSUE + " (not rerun at 2048^2 here: see --sfft-max)."]
    if hp_cmd:
        lines += ["", f"HOTPANTS v5.1.11 (`{hp_exe}`, built as README's Development section says), run in this script "
                  f"on the same pair, {args.reps} runs per size (medians; peak = the largest maximum resident set size GNU time reports for its runs): "
                  f"`hotpants -inim sci -tmplim ref -outim diff {hp_cmd}`."]
    elif not args.no_hotpants:
        lines += ["", "HOTPANTS: no `hotpants` on PATH or in $HOTPANTS; the times quoted by the issue (this machine)."]
    if not args.no_accuracy:
        lines += ["", "## Accuracy cost of the shortcuts (2048^2)", "",
                  "Against the exact spatially varying convolution in float64 (`tile_size=None`: one full-frame FFT "
                  "per spatial term, per pair of terms for the variance). dz = difference change / sigma of the "
                  "difference; dv = relative change of the variance. Outer 16 px excluded. CPU = process CPU time "
                  "of that configuration (one run after a warm-up, same threads).", "",
                  "| image tile | variance tile | dtype | max abs dz | rms dz | max abs dv | CPU (s) |",
                  "|---|---|---|---|---|---|---|"]
        lines += accuracy(2048, args.threads)
    end = os.getloadavg()
    lines += ["", f"Load average at the end: {end[0]:.1f}/{end[1]:.1f}/{end[2]:.1f}."]
    text = "\n".join(lines) + "\n" + NOTES
    out = Path(args.out)
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
