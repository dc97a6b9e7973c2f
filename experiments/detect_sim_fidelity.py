"""End-to-end detection + measurement fidelity on a simulated GWAC-like frame vs Debian source-extractor.

Issue #4, "Simulated GWAC-like 4096^2 frames (~20,000 stars) against source-extractor (its defaults,
MASK_TYPE CORRECT, PHOT_AUTOPARAMS 2.5,3.5)": for unflagged objects with S/N > 20, >= 98% with
|dmag_auto| < 0.01 and >= 99% with position d < 0.01 px; completeness and purity against the truth
within 0.5% of SExtractor's.

Frame: ``astroprep_torch.sim.simulate_frame((N, N), n_stars=20000 (N/4096)^2)`` with its GWAC-like
defaults (Gaussian PSF FWHM 2.5 px, sky 1000 ADU with a gradient, gain 1.5 e-/ADU, read noise 10 e-,
clipped at 60000 ADU), written as float32 FITS.

SExtractor: its built-in defaults (DETECT_THRESH 1.5, DETECT_MINAREA 5, default.conv, DEBLEND_NTHRESH
32, DEBLEND_MINCONT 0.005, CLEAN_PARAM 1.0, BACK_SIZE 64, BACK_FILTERSIZE 3, SATUR_LEVEL 50000,
GAIN 0, PHOT_APERTURES 5) with MASK_TYPE CORRECT and PHOT_AUTOPARAMS 2.5,3.5 given explicitly.

Same background for both tools: SExtractor estimates its own background (BACK_TYPE AUTO, the
"defaults" the issue asks for) and writes the -BACKGROUND and BACKGROUND check images; ours gets
the -BACKGROUND image (exactly the pixels SExtractor detects and measures on) and the global
background RMS SExtractor prints (without a weight map SExtractor thresholds and computes errors with
that one scalar). This isolates detection + measurement from background estimation (which has its
own parity issue). BACK_TYPE MANUAL with the true sky would also isolate it but would not be
SExtractor's defaults and would leave the threshold rms to be guessed.

Matching: ours <-> SExtractor by mutual nearest neighbour within 1 px. Both tools <-> truth: a
detection is *true* when a simulated star lies within ``--truth-radius`` (1 px; FWHM 2.5) of it;
a star is *found* when a detection lies within that radius. Completeness is over stars whose
expected S/N is >= 20 (S/N_true = F / sqrt(F/g + 4 pi sigma^2 rms^2), optimal Gaussian aperture)
and also over all stars; purity over detections with SExtractor-style S/N_auto = FLUX_AUTO /
FLUXERR_AUTO >= 20 and over all detections.

Run:  python experiments/detect_sim_fidelity.py [--size 4096] [--stars N] [--seed 1]
      -> experiments/results/detect_sim_fidelity.md  (detect_sim_fidelity_<size>.md for other sizes)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import machine, write_result  # noqa: E402

from astroprep_torch.detect import SourceExtractor  # noqa: E402
from astroprep_torch.sim import simulate_frame  # noqa: E402

PARAMS = ("NUMBER X_IMAGE Y_IMAGE XWIN_IMAGE YWIN_IMAGE FLUX_APER FLUXERR_APER FLUX_AUTO FLUXERR_AUTO "
          "KRON_RADIUS FLUX_RADIUS FLAGS ISOAREA_IMAGE FLUX_ISO FLUX_MAX").split()

# the issue's SExtractor settings for this test (everything else: source-extractor's built-in defaults)
SEX_CONFIG = {"MASK_TYPE": "CORRECT", "PHOT_AUTOPARAMS": "2.5,3.5"}
SEX_DEFAULTS = dict(thresh=1.5, minarea=5, deblend_nthresh=32, deblend_cont=0.005, clean_param=1.0,
                    aperture=5.0, saturation=50000.0)


def run_sextractor(image_path: Path, workdir: Path, extra: dict | None = None) -> dict:
    """source-extractor with its defaults + SEX_CONFIG; returns catalogue, check images, RMS, time."""
    from astropy.io import fits
    from astropy.table import Table

    exe = shutil.which("source-extractor") or shutil.which("sex")
    if exe is None:
        raise RuntimeError("source-extractor is not installed")
    (workdir / "p.param").write_text("\n".join(PARAMS) + "\n")
    (workdir / "default.conv").write_text("CONV NORM\n1 2 1\n2 4 2\n1 2 1\n")
    cfg = {"PARAMETERS_NAME": "p.param", "CATALOG_NAME": "cat.fits", "CATALOG_TYPE": "FITS_1.0",
           "FILTER_NAME": "default.conv", "STARNNW_NAME": "/usr/share/source-extractor/default.nnw",
           "CHECKIMAGE_TYPE": "-BACKGROUND,BACKGROUND,SEGMENTATION",
           "CHECKIMAGE_NAME": "sub.fits,back.fits,seg.fits", "VERBOSE_TYPE": "NORMAL",
           **SEX_CONFIG, **(extra or {})}
    cmd = [exe, str(image_path), "-c", "/dev/null"]
    for k, v in cfg.items():
        cmd += [f"-{k}", str(v)]
    c0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    c1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    version = re.search(r"Source Extractor\s+([0-9.]+)", proc.stderr)
    cat = Table.read(workdir / "cat.fits")
    cat.sort("NUMBER")
    return {
        "cat": cat,
        "rms": float(re.search(r"RMS:\s*([0-9.eE+-]+)", proc.stderr).group(1)),
        "sub": fits.getdata(workdir / "sub.fits").astype(np.float32),
        "back": fits.getdata(workdir / "back.fits").astype(np.float32),
        "seg": fits.getdata(workdir / "seg.fits").astype(np.int64),
        "wall": wall, "cpu": (c1.ru_utime + c1.ru_stime) - (c0.ru_utime + c0.ru_stime),
        "version": version.group(1) if version else "?", "cmd": " ".join([image_path.name] + cmd[2:]),
    }


def run_ours(sx: dict):
    """SourceExtractor with SExtractor's defaults on SExtractor's -BACKGROUND image and global RMS."""
    d = SEX_DEFAULTS
    se = SourceExtractor(thresh=d["thresh"], minarea=d["minarea"], deblend_nthresh=d["deblend_nthresh"],
                         deblend_cont=d["deblend_cont"], clean=True, clean_param=d["clean_param"],
                         phot_apertures=(d["aperture"],), kron_fact=2.5, min_radius=3.5,
                         saturation=d["saturation"], gain=None, mask_type="correct")
    img = torch.from_numpy(sx["sub"])[None, None]
    back = torch.from_numpy(sx["back"])[None, None]
    c0 = time.process_time()
    t0 = time.perf_counter()
    cat = se(img, sx["rms"], background=back)
    return cat, time.perf_counter() - t0, time.process_time() - c0


def mutual_match(x1, y1, x2, y2, radius):
    """Index into set 2 for each of set 1 (-1 = none): mutual nearest neighbours within ``radius``."""
    from scipy.spatial import cKDTree

    m = np.full(len(x1), -1, np.int64)
    if len(x1) == 0 or len(x2) == 0:
        return m
    d12, j = cKDTree(np.c_[x2, y2]).query(np.c_[x1, y1])
    _, i = cKDTree(np.c_[x1, y1]).query(np.c_[x2, y2])
    ok = (d12 <= radius) & (i[j] == np.arange(len(x1)))
    m[ok] = j[ok]
    return m


def near_any(x1, y1, x2, y2, radius):
    """True where a point of set 2 lies within ``radius`` of the point of set 1."""
    from scipy.spatial import cKDTree

    if len(x2) == 0:
        return np.zeros(len(x1), bool)
    d, _ = cKDTree(np.c_[x2, y2]).query(np.c_[x1, y1])
    return d <= radius


def compare(ours, sx: dict) -> dict:
    """Per-object agreement of ours with SExtractor (sample: SExtractor objects)."""
    ref = sx["cat"]
    sx_x, sx_y = np.asarray(ref["X_IMAGE"], float) - 1, np.asarray(ref["Y_IMAGE"], float) - 1
    ox, oy = ours.x.double().numpy(), ours.y.double().numpy()
    j = mutual_match(sx_x, sx_y, ox, oy, 1.0)
    m = j >= 0
    jj = np.where(m, j, 0)
    flags = np.asarray(ref["FLAGS"])
    fa_ref, fae_ref = np.asarray(ref["FLUX_AUTO"], float), np.asarray(ref["FLUXERR_AUTO"], float)
    snr = np.where(fae_ref > 0, fa_ref / np.where(fae_ref > 0, fae_ref, 1), 0)
    sel = (flags == 0) & (snr > 20)
    nan = np.full(len(ref), np.nan)

    def take(t):
        a = t.double().numpy()
        a = a.reshape(len(a), -1)[:, 0]
        return np.where(m, a[jj], nan)

    fa = take(ours.flux_auto)
    with np.errstate(invalid="ignore", divide="ignore"):
        dmag = np.abs(-2.5 * np.log10(fa / fa_ref))
        dpos = np.hypot(take(ours.x) + 1 - ref["X_IMAGE"], take(ours.y) + 1 - ref["Y_IMAGE"])
        dwin = np.hypot(take(ours.xwin) + 1 - ref["XWIN_IMAGE"], take(ours.ywin) + 1 - ref["YWIN_IMAGE"])
        fap_ref = np.asarray(ref["FLUX_APER"], float).reshape(len(ref), -1)[:, 0]
        daper = np.abs(take(ours.flux_aper) / fap_ref - 1)
        dkron = np.abs(take(ours.kron_radius) / np.asarray(ref["KRON_RADIUS"], float) - 1)
    oflags = np.where(m, ours.flags.numpy()[jj], -1)

    def frac(ok, keep):
        ok = np.where(np.isnan(ok.astype(float)), False, ok)
        return float(np.mean(ok[keep])) if keep.any() else float("nan"), int(keep.sum())

    out = {"n_sx": len(ref), "n_ours": len(ours.x), "n_matched": int(m.sum()),
           "ours_matched": int(len(set(j[m].tolist()))), "sel": sel, "m": m, "j": j, "snr": snr,
           "dmag": dmag, "dpos": dpos, "dwin": dwin, "daper": daper, "oflags": oflags, "flags": flags}
    rows = []
    for name, keep in (("unflagged, S/N > 20 (the issue's sample)", sel), ("all SExtractor objects", np.ones(len(ref), bool)),
                       ("FLAGS == 0, all S/N", flags == 0), ("S/N > 20, any flags", snr > 20)):
        rows.append((name, frac(m, keep), frac(dmag < 0.01, keep), frac(dmag < 0.04, keep), frac(dpos < 0.01, keep),
                     frac(dwin < 0.01, keep), frac(daper < 1e-3, keep), frac(dkron < 1e-2, keep),
                     frac(oflags == flags, keep)))
    out["rows"] = rows
    return out


def truth_scores(x, y, snr_auto, tx, ty, tsnr, radius):
    """(completeness S/N_true>=20, completeness all, purity S/N_auto>=20, purity all) in %, and the n."""
    found = near_any(tx, ty, x, y, radius)
    true_det = near_any(x, y, tx, ty, radius)
    bright = tsnr >= 20
    good = snr_auto >= 20
    return (100 * found[bright].mean(), 100 * found.mean(), 100 * true_det[good].mean(), 100 * true_det.mean(),
            int(bright.sum()), len(tx), int(good.sum()), len(x))


def sextractor_self_check(tmp: Path, sx: dict) -> tuple[dict, int]:
    """SExtractor against itself: its -BACKGROUND image as is and left-right mirrored (positions mapped
    back), both with BACK_TYPE MANUAL 0 and an ABSOLUTE threshold of 1.5 x the first run's RMS
    (SExtractor's own background is not mirror-symmetric: up to 0.35 ADU here, so it is frozen).

    Mirroring changes the order in which SExtractor meets objects, hence its pseudo-random draws in
    ``gatherup`` (faint pixels of a deblended family go to a branch drawn at random with the branch
    probabilities, libc ``rand()``) and its scan-order-dependent CLEAN. The spread of this comparison
    is SExtractor's own arbitrariness. Returns (compare() of mirrored vs direct, n objects).
    """
    from astropy.io import fits

    W = sx["sub"].shape[1]
    thr = 1.5 * sx["rms"]
    extra = {"BACK_TYPE": "MANUAL", "BACK_VALUE": 0.0, "THRESH_TYPE": "ABSOLUTE", "DETECT_THRESH": thr,
             "ANALYSIS_THRESH": thr}
    runs = []
    for name, img in (("direct", sx["sub"]), ("mirror", sx["sub"][:, ::-1])):
        d = tmp / name
        d.mkdir(exist_ok=True)
        fits.writeto(d / "img.fits", np.ascontiguousarray(img), overwrite=True)
        runs.append(run_sextractor(d / "img.fits", d, extra))
    c = runs[1]["cat"]

    def col(name, flip=False):
        a = np.asarray(c[name], float)
        a = a.reshape(len(a), -1)[:, 0]
        return torch.from_numpy((W - a) if flip else a - 1)  # 1-based mirrored -> 0-based original

    mirrored = SimpleNamespace(
        x=col("X_IMAGE", True), y=col("Y_IMAGE"), xwin=col("XWIN_IMAGE", True), ywin=col("YWIN_IMAGE"),
        flux_aper=col("FLUX_APER") + 1, flux_auto=col("FLUX_AUTO") + 1, kron_radius=col("KRON_RADIUS") + 1,
        flags=torch.from_numpy(np.asarray(c["FLAGS"], np.int64)))
    return compare(mirrored, runs[0]), len(c)


def evaluate(size, n_stars, seed, psf, radius, keep=None, self_check=False) -> dict:
    """Simulate, run both tools, compare; returns the numbers (see ``report``)."""
    from astropy.io import fits

    fr = simulate_frame((size, size), n_stars=n_stars, seed=seed, psf=psf)
    tmp = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="detect_sim_"))
    tmp.mkdir(parents=True, exist_ok=True)
    image = fr.image[0, 0].numpy().astype(np.float32)
    fits.writeto(tmp / "sim.fits", image, overwrite=True)
    sx = run_sextractor(tmp / "sim.fits", tmp)
    ours, t_ours, c_ours = run_ours(sx)
    res = compare(ours, sx)
    # truth (stars whose centre falls on the frame)
    tx, ty = fr.catalog["x"].double().numpy(), fr.catalog["y"].double().numpy()
    tf = fr.catalog["flux"].double().numpy()
    inside = (tx >= -0.5) & (ty >= -0.5) & (tx <= size - 0.5) & (ty <= size - 0.5)
    tx, ty, tf = tx[inside], ty[inside], tf[inside]
    gain = float(fr.header["GAIN"])
    sigma = float(fr.header["FWHM"]) / 2.3548
    tsnr = tf / np.sqrt(tf / gain + 4 * np.pi * sigma**2 * sx["rms"] ** 2)
    ref = sx["cat"]
    o_fa, o_fe = ours.flux_auto.double().numpy(), ours.fluxerr_auto.double().numpy()
    o_snr = np.where(o_fe > 0, o_fa / np.where(o_fe > 0, o_fe, 1), 0)
    ts_sx = truth_scores(np.asarray(ref["X_IMAGE"]) - 1, np.asarray(ref["Y_IMAGE"]) - 1, res["snr"], tx, ty, tsnr,
                         radius)
    ts_o = truth_scores(ours.x.double().numpy(), ours.y.double().numpy(), o_snr, tx, ty, tsnr, radius)
    out = dict(size=size, n_stars=n_stars, seed=seed, psf=psf, radius=radius, sx=sx, res=res, ts_sx=ts_sx,
               ts_o=ts_o, t_ours=t_ours, c_ours=c_ours, n_inside=int(inside.sum()))
    if self_check:
        out["self"], out["self_n"] = sextractor_self_check(tmp, sx)
    np.savez(tmp / "diag.npz", **{k: v for k, v in res.items() if isinstance(v, np.ndarray)})
    if not keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def criteria(ev) -> list[tuple[str, float, str, bool]]:
    """(criterion, measured, goal, pass) for the issue's five criteria."""
    rows = ev["res"]["rows"][0]
    f_mag, f_pos, f_win = rows[2][0], rows[4][0], rows[5][0]
    dc = ev["ts_o"][0] - ev["ts_sx"][0]
    dp = ev["ts_o"][2] - ev["ts_sx"][2]
    return [
        ("|dmag_auto| < 0.01 (unflagged, S/N>20)", 100 * f_mag, ">= 98%", f_mag >= 0.98),
        ("X/Y_IMAGE d < 0.01 px (unflagged, S/N>20)", 100 * f_pos, ">= 99%", f_pos >= 0.99),
        ("XWIN/YWIN d < 0.01 px (unflagged, S/N>20)", 100 * f_win, ">= 99%", f_win >= 0.99),
        ("completeness (S/N_true >= 20), ours - SExtractor (pt)", dc, "within 0.5 pt", abs(dc) <= 0.5),
        ("purity (S/N_auto >= 20), ours - SExtractor (pt)", dp, "within 0.5 pt", abs(dp) <= 0.5),
    ]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--stars", type=int, default=None, help="default 20000 (size/4096)^2")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3],
                    help="frames to run; the first is reported in full, all in the summary")
    ap.add_argument("--moffat", action="store_true", help="also a Moffat-PSF frame (beta 2.5) with the first seed")
    ap.add_argument("--no-self-check", action="store_true", help="skip SExtractor on the mirrored first frame")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--truth-radius", type=float, default=1.0)
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep", default=None, help="directory to keep the first frame's SExtractor files in")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n_stars = args.stars or int(round(20000 * (args.size / 4096) ** 2))
    up0 = os.getloadavg()
    runs = []
    for k, seed in enumerate(args.seeds):
        runs.append(evaluate(args.size, n_stars, seed, "gaussian", args.truth_radius, args.keep if k == 0 else None,
                             self_check=(k == 0 and not args.no_self_check)))
        print("seed", seed, [f"{c[1]:.2f}" for c in criteria(runs[-1])], flush=True)
    if args.moffat:
        runs.append(evaluate(args.size, n_stars, args.seeds[0], "moffat", args.truth_radius))
    up1 = os.getloadavg()
    ev = runs[0]
    sx, res = ev["sx"], ev["res"]
    r = args.truth_radius
    cmd = (f"python experiments/detect_sim_fidelity.py --size {args.size} --stars {n_stars} --seeds "
           + " ".join(map(str, args.seeds)) + (" --moffat" if args.moffat else "")
           + (" --no-self-check" if args.no_self_check else ""))
    lines = [
        f"# Detection + measurement fidelity on simulated GWAC-like {args.size}^2 frames vs source-extractor",
        "",
        f"Command: `{cmd}`",
        "",
        machine() + f"; load average (1 min) at start {up0[0]:.2f}, at end {up1[0]:.2f}",
        "",
        f"source-extractor {sx['version']} (Debian): `source-extractor {sx['cmd']}`",
        "(`-c /dev/null`: every other setting is source-extractor's built-in default: DETECT_THRESH 1.5, "
        "DETECT_MINAREA 5, DEBLEND_NTHRESH 32, DEBLEND_MINCONT 0.005, CLEAN_PARAM 1.0, BACK_SIZE 64, "
        "BACK_FILTERSIZE 3, SATUR_LEVEL 50000, GAIN 0, PHOT_APERTURES 5.)",
        "",
        f"Frames: `simulate_frame(({args.size}, {args.size}), n_stars={n_stars}, seed=s)` (FWHM 2.5 px Gaussian, "
        "sky 1000 ADU + gradient, gain 1.5, read noise 10 e-, clipped at 60000 ADU).",
        "",
        "Same background for both tools: SExtractor estimates its own (BACK_TYPE AUTO, its defaults); ours "
        "runs on SExtractor's -BACKGROUND check image with the global RMS SExtractor prints (without a weight "
        "map SExtractor thresholds and computes errors with that one scalar), SATUR_LEVEL 50000 compared with "
        "image + SExtractor's BACKGROUND, MASK_TYPE CORRECT, PHOT_APERTURES 5, PHOT_AUTOPARAMS 2.5,3.5, "
        "GAIN 0. This isolates detection + measurement from background estimation (its own parity is in "
        "background_parity.md); BACK_TYPE MANUAL with the true sky would not be SExtractor's defaults.",
        "",
        "Definitions. Ours <-> SExtractor: mutual nearest neighbours within 1 px. The issue's sample: "
        "SExtractor objects with FLAGS == 0 and FLUX_AUTO/FLUXERR_AUTO > 20; an unmatched one counts as a "
        "failure; position d = hypot(dX, dY). Truth: a star is found when a detection lies within "
        f"{r} px of it (FWHM 2.5 px), a detection is true when a star lies within {r} px of it. "
        "Completeness over stars with expected S/N_true = F / sqrt(F/gain + 4 pi sigma^2 RMS^2) >= 20 "
        "(optimal Gaussian aperture) and over all stars; purity over detections with "
        "FLUX_AUTO/FLUXERR_AUTO >= 20 and over all detections.",
        "",
        "## Summary: the issue's criteria on every frame",
        "",
        "| frame | sample n | dmag_auto<0.01 (>= 98%) | X/Y_IMAGE<0.01 px (>= 99%) | XWIN<0.01 px (>= 99%) | "
        "completeness ours - SX (+-0.5 pt) | purity ours - SX (+-0.5 pt) | all pass |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in runs:
        c = criteria(e)
        lines.append(f"| seed {e['seed']} {e['psf']} | {int(e['res']['sel'].sum())} | {c[0][1]:.2f}% | {c[1][1]:.2f}% | "
                     f"{c[2][1]:.2f}% | {c[3][1]:+.2f} | {c[4][1]:+.2f} | {'yes' if all(x[3] for x in c) else 'NO'} |")
    lines += [
        "",
        f"## Seed {ev['seed']} in detail",
        "",
        f"{ev['n_inside']} stars inside the frame; SExtractor's global background RMS {sx['rms']:.4f} ADU. "
        f"Objects: SExtractor {res['n_sx']}, ours {res['n_ours']}, mutual nearest within 1 px: {res['n_matched']}.",
        "",
        "| criterion | measured | goal | pass |",
        "| --- | --- | --- | --- |",
    ]
    for name, v, goal, ok in criteria(ev):
        lines.append(f"| {name} | {v:.2f}{'' if 'pt' in name else '%'} | {goal} | {'yes' if ok else 'NO'} |")
    hdr = ("| sample | matched 1 px | dmag_auto<0.01 | dmag_auto<0.04 | X/Y_IMAGE<0.01 px | XWIN<0.01 px | "
           "FLUX_APER 0.1% | KRON_RADIUS 1% | FLAGS equal |")
    lines += ["", "Agreement of ours with SExtractor (% of SExtractor objects):", "", hdr,
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in res["rows"]:
        lines.append(f"| {row[0]} (n={row[1][1]}) | " + " | ".join(f"{100 * v[0]:.2f}" for v in row[1:]) + " |")
    if "self" in ev:
        lines += ["", "SExtractor against itself: SExtractor on the left-right mirrored -BACKGROUND image (positions "
                  "mapped back) vs SExtractor on the same image unmirrored, both BACK_TYPE MANUAL 0 and an ABSOLUTE "
                  "threshold of 1.5 x RMS (its own background is not mirror-symmetric, up to 0.35 ADU, so it is "
                  "frozen), same columns and samples. Mirroring changes the order SExtractor meets objects, hence "
                  "its pseudo-random `gatherup` draws (libc `rand()`) for the faint pixels of deblended families "
                  "and its scan-order CLEAN: what differs here is SExtractor's own arbitrariness, the floor for a "
                  f"deterministic re-implementation on deblended objects ({ev['self_n']} objects mirrored).", "",
                  hdr, "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for row in ev["self"]["rows"]:
            lines.append(f"| {row[0]} (n={row[1][1]}) | " + " | ".join(f"{100 * v[0]:.2f}" for v in row[1:]) + " |")
        sf = ev["self"]
        sbl = (sf["flags"] & 2) > 0
        lines += ["", f"Deblended (FLAGS & 2) objects: SExtractor mirrored vs direct agree to 0.01 mag for "
                  f"{100 * np.mean(sf['dmag'][sbl] < 0.01):.1f}% (ours vs SExtractor: "
                  f"{100 * np.mean(res['dmag'][(res['flags'] & 2) > 0] < 0.01):.1f}%); FLAGS differ on "
                  f"{int(((sf['oflags'] != sf['flags']) & sf['m']).sum())} objects (ours vs SExtractor: "
                  f"{int(((res['oflags'] != res['flags']) & res['m']).sum())})."]
    lines += ["", f"Against the simulator's truth (match radius {r} px):", "",
              "| tool | completeness S/N_true>=20 | completeness all | purity S/N_auto>=20 | purity all |",
              "| --- | --- | --- | --- | --- |"]
    for tool, ts in (("SExtractor", ev["ts_sx"]), ("ours", ev["ts_o"])):
        lines.append(f"| {tool} | {ts[0]:.2f}% ({ts[4]} stars) | {ts[1]:.2f}% ({ts[5]}) | {ts[2]:.2f}% ({ts[6]} det.) | "
                     f"{ts[3]:.2f}% ({ts[7]}) |")
    sel, fl, m = res["sel"], res["flags"], res["m"]
    bad = sel & ~(res["dmag"] < 0.01)
    badp = sel & ~(res["dpos"] < 0.01)
    badall = ~(res["dmag"] < 0.01)
    u, cnt = np.unique(fl[badall], return_counts=True)
    bl = (fl & 2) > 0
    lines += ["", "Where ours and SExtractor differ:", "",
              f"- issue sample: |dmag_auto| >= 0.01 on {int(bad.sum())} objects ({int((bad & ~m).sum())} unmatched), "
              f"position >= 0.01 px on {int(badp.sum())}.",
              f"- all objects: |dmag_auto| >= 0.01 on {int(badall.sum())}, by SExtractor FLAGS: "
              + ", ".join(f"{int(a)}: {int(b)}" for a, b in zip(u, cnt))
              + f"; deblended (FLAGS & 2) objects agree to 0.01 mag for {100 * np.mean(res['dmag'][bl] < 0.01):.1f}%, "
              f"the others for {100 * np.mean(res['dmag'][~bl] < 0.01):.2f}%.",
              f"- FLAGS differ on {int(((res['oflags'] != fl) & m).sum())} matched objects; most frequent "
              "(SExtractor -> ours): " + ", ".join(f"{a}->{b}: {c}" for (a, b), c in _pairs(fl[m], res['oflags'][m])),
              "", "## Time (one run, this machine, seed " + str(ev["seed"]) + ")", "",
              f"- SExtractor whole run incl. background and 3 check images: {sx['wall']:.2f} s wall, {sx['cpu']:.2f} s CPU",
              f"- ours SourceExtractor (detection + measurement, background given): {ev['t_ours']:.2f} s wall, "
              f"{ev['c_ours']:.2f} s CPU", ""]
    text = "\n".join(lines) + "\n"
    print(text)
    out = args.out or ("detect_sim_fidelity" if args.size == 4096 else f"detect_sim_fidelity_{args.size}")
    print("wrote", write_result(out, text))


def _pairs(a, b, k=6):
    d = a != b
    u, c = np.unique(np.c_[a[d], b[d]], axis=0, return_counts=True) if d.any() else (np.zeros((0, 2)), np.zeros(0))
    o = np.argsort(-c)[:k]
    return [((int(u[i, 0]), int(u[i, 1])), int(c[i])) for i in o]


if __name__ == "__main__":
    main()
