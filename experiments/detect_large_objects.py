"""Detection + measurement time against SExtractor on frames with LARGE objects (issue #26 item 3).

Real frames (``../shared/data``): sep's ``image.fits``, DSS ``m13.fits``, the DECam science / template /
SFFT difference frames of ``sfft_decam_decorr`` and the HOTPANTS pair (+ its difference) of
``hotpants_decam``: background by ``Background2D(method="sextractor")`` (SExtractor's back.c: 64-px
meshes, 3x3 filter), subtracted once; both tools then detect on the same background-subtracted frame
with one global rms (the median of the rms map), as SExtractor without a weight map.

Simulated frames (GWAC-like star fields, ``astroprep_torch.sim``, the true sky subtracted), made large-
object-heavy as a real raw frame is:
- ``sat``: 20 saturated stars (1e7-3e8 ADU) with extended Moffat-like halos, +-1 bleed columns of
  length proportional to the flux, everything clipped at the saturation level (60,000 ADU);
- ``sat+edges``: the same plus a vignetting-like residual of +-``--edge`` ADU at the frame's edges (what a
  64-px background leaves on an uncalibrated frame: huge low-surface-brightness objects);
- ``calib``: the "bias-subtracted and flat-fielded" variant: the stars and halos multiplied by a flat
  with vignetting and a residual at the edges from a mismatched flat (stronger residual, noisier edges);
- ``diff``: the difference of ``sat`` and a second epoch of the same field (new noise, PSF 5% wider,
  saturated stars 3% brighter, bleed trails one row longer): residual halos and bleed trails.

Both tools measure the same quantities: SExtractor's catalog holds X/Y, XWIN/YWIN, FLUX_APER, FLUX_AUTO,
KRON_RADIUS, FLUX_RADIUS and FLAGS (XWIN needs the growth curve), ours is ``SourceExtractor`` (which
always computes them). Timing: CPU time (user + system) of ours on ONE thread and of the
``source-extractor`` child (single-threaded), each the median of ``--reps`` runs after a warm-up, ours and
SExtractor alternated. The machine is shared with other jobs: the ratio, not the seconds, is the result.
``--baseline REV`` also times ours from git revision REV (``git archive``) for a before/after.
Writes experiments/results/detect_large_objects.md.

Run: python experiments/detect_large_objects.py [--size 4096] [--reps 3] [--baseline HEAD~1]
"""

from __future__ import annotations

import argparse
import warnings
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import math
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from astropy.io import fits
from astropy.io.fits.verify import VerifyWarning

warnings.simplefilter("ignore", VerifyWarning)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from _common import SHARED_DATA, git_rev, machine, sex_config, write_result  # noqa: E402

from astroprep_torch.background import Background2D  # noqa: E402
from astroprep_torch.detect import SourceExtractor  # noqa: E402
from astroprep_torch.sim import render_stars, simulate_frame  # noqa: E402

SATURATION = 60000.0
PARAMS = "X_IMAGE\nY_IMAGE\nXWIN_IMAGE\nYWIN_IMAGE\nFLUX_APER(1)\nFLUX_AUTO\nKRON_RADIUS\nFLUX_RADIUS\nFLAGS\n"
CONV = "CONV NORM\n1 2 1\n2 4 2\n1 2 1\n"


# ------------------------------------------------------------------------------------------------
# frames
# ------------------------------------------------------------------------------------------------
def saturated_stars(shape, n, seed, *, flux_scale=1.0, fwhm=3.0, bleed_extra=0):
    """Noiseless image of ``n`` very bright stars (core + halo) and the bleed-column mask."""
    h, w = shape
    rng = np.random.default_rng(seed)
    x = rng.uniform(60, w - 60, n)
    y = rng.uniform(60, h - 60, n)
    flux = 10 ** rng.uniform(7.0, 8.5, n) * flux_scale
    img = render_stars(shape, torch.tensor(x), torch.tensor(y), torch.tensor(flux), fwhm=fwhm).numpy()
    bleed = np.zeros(shape, dtype=bool)
    for xi, yi, fi in zip(x, y, flux):
        r = 150
        y0, y1, x0, x1 = int(max(0, yi - r)), int(min(h, yi + r)), int(max(0, xi - r)), int(min(w, xi + r))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        img[y0:y1, x0:x1] += fi * 2e-4 * (1 + ((xx - xi) ** 2 + (yy - yi) ** 2) / 15.0 ** 2) ** -1.5
        half = int(min(h // 6, fi / 2e5)) + bleed_extra
        c = int(round(xi))
        bleed[max(0, int(yi) - half):min(h, int(yi) + half), c - 1:c + 2] = True
    return img, bleed


def vignetting(shape, amp, lobes=3):
    """A residual that grows towards the frame's edges, alternating in sign around the frame."""
    h, w = shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    u, v = (xx - w / 2) / (w / 2), (yy - h / 2) / (h / 2)
    r = np.hypot(u, v)
    return (amp * np.clip(r - 0.7, 0, None) / 0.7 * np.cos(lobes * np.arctan2(v, u))).astype(np.float32)


def sim_frames(n, edge):
    """The simulated frames as ``(name, background-subtracted image, global rms)``."""
    shape = (n, n)
    n_stars = int(10000 * (n / 4096) ** 2)
    out = []
    epochs = {}
    for ep, (seed, fs, fw, be) in enumerate([(1, 1.0, 3.0, 0), (2, 1.03, 3.15, 1)]):
        fr = simulate_frame(shape, n_stars=n_stars, seed=seed, saturation=None)
        sat, bleed = saturated_stars(shape, 20, 7, flux_scale=fs, fwhm=fw, bleed_extra=be)
        sky = fr.background[0, 0].numpy()
        rms = float(fr.variance.sqrt().median())
        noise = np.random.default_rng(seed + 10).normal(0.0, 1.0, shape).astype(np.float32)
        raw = fr.image[0, 0].numpy() + sat + noise * np.sqrt(np.maximum(sat, 0) / fr.gain)
        raw[bleed] = SATURATION
        raw = np.minimum(raw, SATURATION)
        epochs[ep] = (raw - sky, rms)
        if ep == 0:
            out.append(("sim sat", raw - sky, rms))
            out.append(("sim sat+edges", raw - sky + vignetting(shape, edge), rms))
            flat = 1.0 - 0.35 * np.clip(np.hypot(*np.mgrid[-1:1:n * 1j, -1:1:n * 1j]) - 0.5, 0, None)
            calib = (raw - sky) / flat.astype(np.float32) + vignetting(shape, 1.5 * edge, lobes=5)
            out.append(("sim calib", calib.astype(np.float32), rms / float(np.median(flat))))
    (a, ra), (b, rb) = epochs[1], epochs[0]
    out.append(("sim diff", (a - b).astype(np.float32), math.hypot(ra, rb)))
    return [(k, np.ascontiguousarray(v, dtype=np.float32), r) for k, v, r in out]


def _bkg_sub(data):
    img = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))[None, None]
    res = Background2D(box_size=64, filter_size=3, method="sextractor")(img)
    return (img - res.background)[0, 0].numpy(), float(res.rms.median())


def real_frames():
    """Real frames (background-subtracted) present in ../shared/data."""
    d = SHARED_DATA
    files = [("sep image", d / "sep" / "image.fits"), ("m13", d / "astropy_images" / "m13.fits")]
    sf = d / "sfft_decam_decorr"
    files += [("DECam sci (SFFT)", sf / "input_data__DEC-OBS04a.mini.fits"),
              ("DECam ref (SFFT)", sf / "input_data__DEC-OBS18a.mini.fits"),
              ("DECam SFFT diff", sf / "4check__FinalDifference.fits")]
    hp = d / "hotpants_decam"
    files += [("DECam sci (HOTPANTS)", hp / "input_sci_DEC-OBS04a_plus1000.fits"),
              ("DECam HOTPANTS diff", hp / "hotpants_diff.fits")]
    out = []
    for name, p in files:
        if not p.exists():
            print(f"skip {name}: {p} absent")
            continue
        data = fits.getdata(p).astype(np.float32)
        data = np.nan_to_num(data, nan=0.0)
        sub, rms = _bkg_sub(data)
        out.append((name, sub.astype(np.float32), rms))
    return out


# ------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------
def _cpu(children=False):
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _timed(fn, children=False):
    c = _cpu(children)
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, _cpu(children) - c, out


def _ours(module, data, rms):
    img = torch.from_numpy(data)[None, None]

    def run():
        return len(module(img, rms))
    return run


def time_frame(name, data, rms, reps, tmp, exe, modules):
    """Alternated medians: {label: (wall, cpu, N)} for every module of ``modules`` and SExtractor."""
    fits.writeto(tmp / "img.fits", data, overwrite=True)
    (tmp / "s.sex").write_text(sex_config(1.5 * rms, PHOT_FLUXFRAC=0.5, MEMORY_PIXSTACK=30000000, MEMORY_BUFSIZE=4096))
    cmd = [exe, "img.fits", "-c", "s.sex"]

    def sex():
        subprocess.run(cmd, cwd=tmp, check=True, capture_output=True)
        return len(fits.getdata(tmp / "c.fits", 1))
    runs = {"sex": (sex, True)}
    runs.update({k: (_ours(m, data, rms), False) for k, m in modules.items()})
    res = {k: [] for k in runs}
    for k, (fn, ch) in runs.items():
        fn()  # warm-up
    for _ in range(reps):
        for k, (fn, ch) in runs.items():
            res[k].append(_timed(fn, ch))
    out = {}
    for k, v in res.items():
        out[k] = (float(np.median([a[0] for a in v])), float(np.median([a[1] for a in v])), v[-1][2])
    line = ", ".join(f"{k} {w:.3f}s wall / {c:.3f}s cpu, N={n}" for k, (w, c, n) in out.items())
    print(f"{name}: {line}", flush=True)
    return out


def _baseline_module(rev, tmp):
    import importlib
    import tarfile

    arc = tmp / "base.tar"
    subprocess.run(["git", "archive", "-o", str(arc), rev, "astroprep_torch"], cwd=ROOT, check=True)
    with tarfile.open(arc) as t:
        t.extractall(tmp / "base", filter="data")
    dst = tmp / "base" / "astroprep_torch_baseline"
    (tmp / "base" / "astroprep_torch").rename(dst)
    for f in dst.rglob("*.py"):  # sub-packages (detect/) too
        f.write_text(f.read_text().replace("astroprep_torch.", "astroprep_torch_baseline."))
    sys.path.insert(0, str(tmp / "base"))
    return importlib.import_module("astroprep_torch_baseline.detect")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--edge", type=float, default=300.0, help="edge residual (ADU) of sat+edges")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--baseline", default=None, help="git revision of ours to time as well")
    ap.add_argument("--only", default=None, help="comma-separated frame-name prefixes")
    ap.add_argument("--out", default="detect_large_objects")
    ap.add_argument("--retain-memory", action="store_true",
                    help="keep freed memory in the process as `astroprep run` does (retain_freed_memory)")
    args = ap.parse_args()
    if args.retain_memory:
        from astroprep_torch._runtime import retain_freed_memory

        retain_freed_memory()
    exe = shutil.which("source-extractor") or shutil.which("sex")
    if exe is None:
        sys.exit("source-extractor not found")
    torch.set_num_threads(1)
    tmp = Path(tempfile.mkdtemp(prefix="detect_large_"))
    (tmp / "p.param").write_text(PARAMS)
    (tmp / "default.conv").write_text(CONV)
    kw = dict(thresh=1.5, minarea=5, deblend_cont=0.005, phot_apertures=(10.0,), kron_fact=2.5, min_radius=3.5)
    modules = {"ours": SourceExtractor(**kw)}
    if args.baseline:
        modules["ours@" + args.baseline] = _baseline_module(args.baseline, tmp).SourceExtractor(**kw)
    frames = real_frames() + sim_frames(args.size, args.edge)
    if args.only:
        keep = tuple(s.strip() for s in args.only.split(","))
        frames = [f for f in frames if f[0].startswith(keep)]
    rows = []
    for name, data, rms in frames:
        rows.append((name, data.shape, time_frame(name, data, rms, args.reps, tmp, exe, modules)))
    shutil.rmtree(tmp, ignore_errors=True)

    cmd = " ".join(["python experiments/detect_large_objects.py"] + sys.argv[1:])
    head = "| frame | size | N SExtractor | N ours | SExtractor CPU (s) | ours CPU (s) | **ours / SExtractor** |"
    sep = "|---|---|---|---|---|---|---|"
    if args.baseline:
        head += f" ours@{args.baseline} CPU (s) | ours@{args.baseline} / SExtractor |"
        sep += "---|---|"
    lines = ["# Detection + measurement on frames with large objects vs SExtractor", "",
             f"`{cmd}` (git {git_rev()})", "", f"- {machine()}",
             "- shared machine (other jobs running): compare the ratios, measured in the same script, "
             "alternated, medians of CPU time; ours on one thread, SExtractor single-threaded"
             + ("; freed memory kept in the process (`retain_freed_memory`, as `astroprep run`)" if args.retain_memory
                else ""), "",
             head, sep]
    worst = 0.0
    for name, shape, r in rows:
        s, o = r["sex"], r["ours"]
        ratio = o[1] / s[1]
        worst = max(worst, ratio)
        line = (f"| {name} | {shape[1]}x{shape[0]} | {s[2]} | {o[2]} | {s[1]:.3f} | {o[1]:.3f} | "
                f"**{ratio:.2f}** |")
        if args.baseline:
            b = r["ours@" + args.baseline]
            line += f" {b[1]:.3f} | {b[1] / s[1]:.2f} |"
        lines.append(line)
    lines += ["", f"Worst ratio: **{worst:.2f}x** SExtractor's CPU time.", ""]
    text = "\n".join(lines)
    print(text)
    print("wrote", write_result(args.out, text))


if __name__ == "__main__":
    main()
