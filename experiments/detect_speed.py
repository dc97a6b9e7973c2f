"""Paper Table 1: source detection (+ measurement) time vs SExtractor and sep, same frames, same background.

Frames: astroprep_torch.sim GWAC-like star fields (FWHM 2.5 px), sizes 2048^2 and 4096^2 (8192^2 with
--big), at two source densities in the paper's ratio 1:2 (10,000 and 20,000 stars per 4096^2).
Background excluded everywhere (as the paper): the true sky is subtracted and one global rms is used.

- ours: ``SourceExtractor`` detection alone (filter, threshold, labels, deblend, clean) and detection +
  ``photometry.measure`` (the full Catalog);
- sep: ``sep.extract(data, 1.5, err=rms)`` + ``sum_circle`` (r=5) + ``kron_radius``/``sum_ellipse``;
- SExtractor: ``source-extractor`` whole run (BACK_TYPE MANUAL, BACK_VALUE 0, THRESH_TYPE ABSOLUTE at
  1.5 rms, same kernel, apertures and AUTO) on the background-subtracted frame written to /tmp.

Timings: medians of ``--reps`` runs after one warm-up, wall clock, ``torch.set_num_threads(--threads)``;
also CPU time (user + system of this process, or of the child for SExtractor), which is less inflated by
other jobs on a shared machine.  ``uptime`` load averages are recorded at the start and the end.
Writes experiments/results/detect_speed.md.   Run: python experiments/detect_speed.py [--big] [--reps 3]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from astroprep_torch import photometry  # noqa: E402
from astroprep_torch.detect import SourceExtractor, detect_sources  # noqa: E402
from astroprep_torch.sim import simulate_frame  # noqa: E402

SEX_CONF = """CATALOG_NAME {cat}
CATALOG_TYPE FITS_1.0
PARAMETERS_NAME {param}
DETECT_MINAREA 5
THRESH_TYPE ABSOLUTE
DETECT_THRESH {thr}
ANALYSIS_THRESH {thr}
FILTER Y
FILTER_NAME {conv}
DEBLEND_NTHRESH 32
DEBLEND_MINCONT 0.005
CLEAN Y
CLEAN_PARAM 1.0
MASK_TYPE CORRECT
PHOT_APERTURES 10
PHOT_AUTOPARAMS 2.5,3.5
SATUR_LEVEL 1e9
GAIN 0.0
BACK_TYPE MANUAL
BACK_VALUE 0.0
CHECKIMAGE_TYPE NONE
VERBOSE_TYPE QUIET
MEMORY_OBJSTACK 60000
MEMORY_PIXSTACK 20000000
"""


def _cpu(children=False):
    r = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def median_time(fn, reps, children=False):
    """(median wall, median CPU) seconds of ``reps`` runs after one warm-up."""
    fn()  # warm-up
    ts, cs = [], []
    for _ in range(reps):
        c = _cpu(children)
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
        cs.append(_cpu(children) - c)
    return float(np.median(ts)), float(np.median(cs))


def _uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", action="store_true", help="add 8192^2 frames")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-measure", action="store_true", help="skip ours detection+measurement")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "detect_speed.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import sep
    from astropy.io import fits

    exe = shutil.which("source-extractor")
    tmp = Path(tempfile.mkdtemp(prefix="detect_speed_"))
    (tmp / "default.conv").write_text("CONV NORM\n1 2 1\n2 4 2\n1 2 1\n")
    (tmp / "p.param").write_text("X_IMAGE\nY_IMAGE\nFLUX_APER(1)\nFLUX_AUTO\nKRON_RADIUS\nFLAGS\n")
    sizes = [2048, 4096] + ([8192] if args.big else [])
    rows = []
    up_start = _uptime()
    print("start:", up_start, flush=True)
    for n in sizes:
        for per4k in (10000, 20000):
            n_stars = int(round(per4k * (n / 4096) ** 2))
            fr = simulate_frame((n, n), n_stars=n_stars, seed=1)
            img = (fr.image - fr.background).contiguous()
            rms = float(fr.variance.sqrt().median())
            data = img[0, 0].numpy().astype(np.float32)
            se = SourceExtractor(thresh=1.5, minarea=5, deblend_cont=0.005, phot_apertures=(10.0,),
                                 kron_fact=2.5, min_radius=3.5)
            ndet = [0]

            def ours_detect():
                ndet[0] = int(detect_sources(img, rms, thresh=1.5, minarea=5, deblend_cont=0.005)["label"].numel())

            t_det = median_time(ours_detect, args.reps)
            t_full = (float("nan"), float("nan")) if args.no_measure else median_time(lambda: se(img, rms), args.reps)
            # photometry.measure alone, on the arguments SourceExtractor passes it for this frame
            t_meas = (float("nan"), float("nan"))
            if not args.no_measure:
                cap, measure = {}, photometry.measure

                def _capture(*a, **k):
                    cap["a"], cap["k"] = a, k
                    return measure(*a, **k)

                photometry.measure = _capture
                try:
                    se(img, rms)
                finally:
                    photometry.measure = measure
                t_meas = median_time(lambda: measure(*cap["a"], **cap["k"]), args.reps)
            nsep = [0]

            def sep_run():
                o = sep.extract(data, 1.5, err=rms, minarea=5, deblend_cont=0.005)
                sep.sum_circle(data, o["x"], o["y"], 5.0, err=rms)
                kr, _ = sep.kron_radius(data, o["x"], o["y"], o["a"], o["b"], o["theta"], 6.0)
                sep.sum_ellipse(data, o["x"], o["y"], o["a"], o["b"], o["theta"], 2.5 * kr, err=rms, subpix=1)
                nsep[0] = len(o)

            sep.set_extract_pixstack(3_000_000)
            sep.set_sub_object_limit(4096)
            t_sep = median_time(sep_run, args.reps)
            t_sex, nsex = (float("nan"), float("nan")), 0
            if exe:
                fits.writeto(tmp / "img.fits", data, overwrite=True)
                (tmp / "s.sex").write_text(SEX_CONF.format(cat="c.fits", param="p.param", thr=1.5 * rms, conv="default.conv"))
                cmd = [exe, "img.fits", "-c", "s.sex"]
                t_sex = median_time(lambda: subprocess.run(cmd, cwd=tmp, check=True, capture_output=True), args.reps,
                                    children=True)
                nsex = len(fits.getdata(tmp / "c.fits", 1))
            rows.append((n, n_stars, ndet[0], nsep[0], nsex, t_det, t_full, t_sep, t_sex, t_meas))
            print(rows[-1], flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    up_end = _uptime()
    lines = [
        "# Detection speed (paper Table 1)",
        "",
        f"`python experiments/detect_speed.py{' --big' if args.big else ''} --reps {args.reps} --threads {args.threads}`",
        "",
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {args.threads} (``photometry.measure`` runs single-threaded; sep and SExtractor are "
        "single-threaded). Shared machine: absolute times are inflated by other jobs, ratios are from the "
        "same run.",
        "",
        f"- `uptime` at the start: `{up_start}`",
        f"- `uptime` at the end: `{up_end}`",
        "",
        "Times in seconds (medians). ours det = detection only (filter, labels, deblend, clean); ours measure = "
        "``photometry.measure`` alone on the arguments SourceExtractor gives it; ours full = "
        "detection + photometry.measure (Catalog with ISO, APER, AUTO, WIN, FLUX_RADIUS, flags); "
        "sep = extract + sum_circle + kron_radius + sum_ellipse; SExtractor = whole source-extractor run "
        "(BACK_TYPE MANUAL).",
        "",
        "Wall clock:",
        "",
        "| size | stars | N ours | N sep | N SExtractor | ours det | ours measure | ours full | sep | SExtractor | det/sep | full/sep | full/SExtractor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, ns, a, b, c, td, tf, ts, tx, tm in rows:
        lines.append(
            f"| {n}² | {ns} | {a} | {b} | {c} | {td[0]:.3f} | {tm[0]:.3f} | {tf[0]:.3f} | {ts[0]:.3f} | {tx[0]:.3f} | "
            f"{td[0] / ts[0]:.2f} | {tf[0] / ts[0]:.2f} | {tf[0] / tx[0]:.2f} |"
        )
    lines += [
        "",
        "CPU time (user + system; SExtractor: the child process):",
        "",
        "| size | stars | ours det | ours measure | ours full | sep | SExtractor | det/sep | full/sep | full/SExtractor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, ns, a, b, c, td, tf, ts, tx, tm in rows:
        lines.append(
            f"| {n}² | {ns} | {td[1]:.3f} | {tm[1]:.3f} | {tf[1]:.3f} | {ts[1]:.3f} | {tx[1]:.3f} | "
            f"{td[1] / ts[1]:.2f} | {tf[1] / ts[1]:.2f} | {tf[1] / tx[1]:.2f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
