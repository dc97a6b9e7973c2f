"""Paper Table 1: source detection (+ measurement) time vs SExtractor and sep, same frames, same background.

Frames: astroprep_torch.sim GWAC-like star fields (FWHM 2.5 px), sizes 2048^2 and 4096^2 (8192^2 with
--big), at two source densities in the paper's ratio 1:2 (10,000 and 20,000 stars per 4096^2).
Background excluded everywhere (as the paper): the true sky is subtracted and one global rms is used.

- ours: ``SourceExtractor`` detection alone (filter, threshold, labels, deblend, clean) and detection +
  ``photometry.measure`` (the full Catalog);
- sep: ``sep.extract(data, 1.5, err=rms)`` + ``sum_circle`` (r=5) + ``kron_radius``/``sum_ellipse``;
- SExtractor: ``source-extractor`` whole run (BACK_TYPE MANUAL, BACK_VALUE 0, THRESH_TYPE ABSOLUTE at
  1.5 rms, same kernel, apertures and AUTO) on the background-subtracted frame written to /tmp.

Timings: medians of ``--reps`` runs after one warm-up, wall clock, ``torch.set_num_threads(--threads)``.
Writes experiments/results/detect_speed.md.   Run: python experiments/detect_speed.py [--big] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import platform
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


def median_time(fn, reps):
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


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
            t_full = float("nan") if args.no_measure else median_time(lambda: se(img, rms), max(1, args.reps - 2))
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
            t_sex, nsex = float("nan"), 0
            if exe:
                fits.writeto(tmp / "img.fits", data, overwrite=True)
                (tmp / "s.sex").write_text(SEX_CONF.format(cat="c.fits", param="p.param", thr=1.5 * rms, conv="default.conv"))
                cmd = [exe, "img.fits", "-c", "s.sex"]
                t_sex = median_time(lambda: subprocess.run(cmd, cwd=tmp, check=True, capture_output=True), args.reps)
                nsex = len(fits.getdata(tmp / "c.fits", 1))
            rows.append((n, n_stars, ndet[0], nsep[0], nsex, t_det, t_full, t_sep, t_sex))
            print(rows[-1], flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    load = os.getloadavg()
    lines = [
        "# Detection speed (paper Table 1)",
        "",
        f"`python experiments/detect_speed.py{' --big' if args.big else ''} --reps {args.reps} --threads {args.threads}`",
        "",
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {args.threads}, load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
        "(shared machine: absolute times are inflated by other jobs, ratios are from the same run).",
        "",
        "Times in seconds (medians). ours det = detection only (filter, labels, deblend, clean); ours full = "
        "detection + photometry.measure (Catalog with ISO, APER, AUTO, WIN, FLUX_RADIUS, flags); "
        "sep = extract + sum_circle + kron_radius + sum_ellipse; SExtractor = whole source-extractor run "
        "(BACK_TYPE MANUAL).",
        "",
        "| size | stars | N ours | N sep | N SExtractor | ours det | ours full | sep | SExtractor | det/sep | full/sep | full/SExtractor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for n, ns, a, b, c, td, tf, ts, tx in rows:
        lines.append(
            f"| {n}² | {ns} | {a} | {b} | {c} | {td:.3f} | {tf:.3f} | {ts:.3f} | {tx:.3f} | "
            f"{td / ts:.2f} | {tf / ts:.2f} | {tf / tx:.2f} |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
