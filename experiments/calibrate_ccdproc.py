"""CCD calibration against astropy's ccdproc on simulated raw frames with truth (issue 26, item 1).

Same files, same steps on both sides: overscan (BIASSEC, median per row) and trim (TRIMSEC), master
bias (median), master dark (median of bias-subtracted darks), master flat (median of bias- and
scaled-dark-subtracted flats each scaled by 1/median), then the science frames (ccdproc's
``ccd_process`` with ``error=True``). Also the sigma-clipped mean combination (ccdproc
``combine(method='average', sigma_clip=True)``). Reports the largest difference relative to the
largest ccdproc value, the calibrated frame against the simulator's truth (chi = (cal - truth) /
sqrt(variance)), the time of both (medians of alternated rounds) and the peak memory of combining
many raw frames (a child process per measurement: master bias, then every frame calibrated into a file; VmHWM).

    python experiments/calibrate_ccdproc.py                 # 1024^2, 10 bias / 10 dark / 10 flat / 3 frames
    python experiments/calibrate_ccdproc.py --memory-only   # peak RSS: 1 frame of 256^2, 10 and 100 raw 4096^2 frames
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import astroprep_torch  # noqa: E402,F401  (before torch: THP)
import torch  # noqa: E402

from astroprep_torch import calibrate as C  # noqa: E402
from astroprep_torch import sim  # noqa: E402

try:
    from experiments._common import machine, write_result  # noqa: E402
except ImportError:  # run from experiments/
    from _common import machine, write_result  # type: ignore  # noqa: E402


def make_night(folder: Path, size: int, n_cal: int, n_sci: int, seed: int = 0) -> dict:
    """Write raw calibration and science frames of one simulated camera; return paths and truths."""
    cam = sim.make_camera((size, size), seed=seed + 1)
    cal = sim.simulate_calibration_frames(cam, n_bias=n_cal, n_dark=n_cal, n_flat=n_cal, seed=seed + 2)
    paths: dict = {k: [] for k in ("bias", "dark", "flat", "science")}
    for kind, frames in cal.items():
        for i, fr in enumerate(frames):
            p = folder / f"{kind}{i:03d}.fits"
            sim.write_raw(p, fr)
            paths[kind].append(str(p))
    truths = []
    for i in range(n_sci):
        f = sim.simulate_frame((size, size), n_stars=size * size // 400, saturation=None, seed=seed + 10 + i)
        r = sim.simulate_raw(f, cam, halo_fraction=0.01, seed=seed + 20 + i)
        p = folder / f"science{i:03d}.fits"
        sim.write_raw(p, r)
        paths["science"].append(str(p))
        truths.append(r)
    return {"paths": paths, "truths": truths, "camera": cam}


# ----------------------------------------------------------------------------------------------
# the two pipelines
# ----------------------------------------------------------------------------------------------
def ours(paths: dict, method: str = "median", sigma_clip: bool = False) -> dict:
    kw = {"method": method, "sigma_clip": sigma_clip}
    bias = C.master_bias(paths["bias"], **kw)
    dark = C.master_dark(paths["dark"], bias, **kw)
    flat = C.master_flat(paths["flat"], bias, dark, **kw)
    cal = C.CCDCalibration(bias, dark, flat, bad=False)
    frames, variances = [], []
    for p in paths["science"]:
        f = C.RawFile(p)
        raw = torch.from_numpy(f._read(slice(None), slice(None)))[None, None]
        res = cal(raw, exptime=f.exptime, gain=f.header["GAIN"], read_noise=f.header["RDNOISE"],
                  overscan=f.header["BIASSEC"], trim=f.header["TRIMSEC"])
        frames.append(res.image[0, 0].numpy())
        variances.append(res.variance[0, 0].numpy())
    return {"bias": bias.image.numpy(), "dark": dark.image.numpy(), "flat": flat.image.numpy(),
            "science": frames, "variance": variances}


def peer(paths: dict, method: str = "median", sigma_clip: bool = False) -> dict:
    import astropy.units as u
    import ccdproc
    from astropy.nddata import CCDData

    def prep(p):
        ccd = CCDData.read(p, unit="adu")
        ccd = ccdproc.subtract_overscan(ccd, fits_section=ccd.header["BIASSEC"], median=True)
        return ccdproc.trim_image(ccd, fits_section=ccd.header["TRIMSEC"])

    kw = {"method": "average" if method == "mean" else "median", "sigma_clip": sigma_clip,
          "sigma_clip_func": np.ma.mean, "sigma_clip_dev_func": np.ma.std, "mem_limit": 4e9}
    bias = ccdproc.combine([prep(p) for p in paths["bias"]], **kw)
    darks = [ccdproc.subtract_bias(prep(p), bias) for p in paths["dark"]]
    dark = ccdproc.combine(darks, **kw)
    dark.header["EXPTIME"] = darks[0].header["EXPTIME"]
    flats = [ccdproc.subtract_dark(ccdproc.subtract_bias(prep(p), bias), dark, exposure_time="EXPTIME",
                                   exposure_unit=u.s, scale=True) for p in paths["flat"]]
    flat = ccdproc.combine(flats, scale=lambda a: 1.0 / np.ma.median(a), **kw)
    frames, errs = [], []
    for p in paths["science"]:
        ccd = CCDData.read(p, unit="adu")
        out = ccdproc.ccd_process(ccd, oscan=ccd.header["BIASSEC"], trim=ccd.header["TRIMSEC"], error=True,
                                  gain=ccd.header["GAIN"] * u.electron / u.adu,
                                  readnoise=ccd.header["RDNOISE"] * u.electron, master_bias=bias,
                                  dark_frame=dark, master_flat=flat, exposure_key="EXPTIME",
                                  exposure_unit=u.s, dark_scale=True, gain_corrected=False)
        frames.append(np.asarray(out.data) / ccd.header["GAIN"])  # ccd_process ends in electrons when given a gain
        errs.append(np.asarray(out.uncertainty.array))
    fl = np.asarray(flat.data)
    return {"bias": np.asarray(bias.data), "dark": np.asarray(dark.data), "flat": fl / fl.mean(),
            "science": frames, "error": errs}


def rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / np.max(np.abs(b)))


def compare(a: dict, b: dict) -> dict:
    out = {k: rel(a[k], b[k]) for k in ("bias", "dark", "flat")}
    out["science"] = max(rel(x, y) for x, y in zip(a["science"], b["science"]))
    return out


def truth_check(result: dict, night: dict) -> dict:
    """chi = (calibrated - truth) / sqrt(variance) on unsaturated pixels, all frames."""
    chis = []
    for img, var, r in zip(result["science"], result["variance"], night["truths"]):
        ok = ~r.saturated[0, 0].numpy() & ~night["camera"].hot.numpy()
        chis.append(((img - r.truth[0, 0].numpy()) / np.sqrt(var))[ok])
    chi = np.concatenate(chis)
    return {"chi_mean": float(chi.mean()), "chi_std": float(chi.std()),
            "bias_ADU": float(np.mean([np.mean(i - r.truth[0, 0].numpy()) for i, r in zip(result["science"], night["truths"])]))}


def timed(fn, *args, **kw) -> float:
    t0 = time.perf_counter()
    fn(*args, **kw)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# memory: a child process combines N frames and reports its peak RSS
# ----------------------------------------------------------------------------------------------
def write_bias_frames(folder: Path, n: int, size: int, seed: int = 0) -> list:
    """``n`` raw bias frames (uint16 on disk, BZERO 32768) of ``size^2`` plus a 32-column overscan."""
    from astropy.io import fits

    rng = np.random.default_rng(seed)
    pattern = 1000.0 + 3.0 * rng.standard_normal((1, size + 32))
    out = []
    for i in range(n):
        data = np.round(pattern + 6.7 * rng.standard_normal((size, size + 32), dtype=np.float32)).astype(np.uint16)
        hdr = fits.Header({"BIASSEC": f"[{size + 1}:{size + 32},1:{size}]", "TRIMSEC": f"[1:{size},1:{size}]",
                           "EXPTIME": 0.0, "IMAGETYP": "bias"})
        p = folder / f"bias{i:03d}.fits"
        fits.PrimaryHDU(data, hdr).writeto(p, overwrite=True)
        out.append(str(p))
    return out


def child_peak(paths_file: str, memory_mb: float) -> None:
    """Master bias of the N raw frames, then the N frames calibrated with it into files (float32, no
    variance files), as ``astroprep calibrate`` does; prints the peak RSS and the times."""
    paths = json.loads(Path(paths_file).read_text())
    from astroprep_torch import data, io  # noqa: F401  (imported lazily by the calibration: not timed)

    t0 = time.perf_counter()
    m = C.master_bias(paths, memory_mb=memory_mb)
    t_master = time.perf_counter() - t0
    out_dir = Path(paths_file).parent / "calibrated"
    written = C.calibrate_files(paths, out_dir, C.CCDCalibration(m, bad=False), write_variance=False)
    wall = time.perf_counter() - t0
    # VmHWM: this process image's peak (ru_maxrss would carry the parent's peak across fork + exec)
    status = Path("/proc/self/status").read_text() if Path("/proc/self/status").exists() else ""
    hwm = [line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")]
    peak = float(hwm[0]) / 1024.0 if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    out_gb = sum(p.stat().st_size for p in written) / 1e9
    for p in written:
        p.unlink()
    print(json.dumps({"n": len(paths), "shape": list(m.image.shape), "peak_mb": peak, "wall_s": wall,
                      "master_s": t_master, "calibrated": len(written), "out_gb": out_gb}))


def memory_run(folder: Path, n: int, size: int, memory_mb: float = 512.0) -> dict:
    sub = folder / f"mem{size}_{n}"
    sub.mkdir(exist_ok=True)
    paths = write_bias_frames(sub, n, size)
    plist = sub / "paths.json"
    plist.write_text(json.dumps(paths))
    cmd = [sys.executable, __file__, "--child", str(plist), "--memory-mb", str(memory_mb)]
    res = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1])
    res["raw_gb"] = sum(Path(p).stat().st_size for p in paths) / 1e9
    for p in paths:
        Path(p).unlink()
    res["stack_gb"] = n * size * size * 4 / 1e9  # what a stack of the frames in float32 would take
    return res


MEMORY_HEAD = ["| frames | size | raw on disk | calibrated written | peak RSS (VmHWM) | master bias | whole run | "
               "a float32 stack would take |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]


def memory_row(n: int, size: int, r: dict) -> str:
    return (f"| {n} | {size}x{size} (+32) | {r['raw_gb']:.2f} GB | {r['calibrated']} frames, {r['out_gb']:.2f} GB | "
            f"{r['peak_mb']:.0f} MB | {r['master_s']:.1f} s | {r['wall_s']:.1f} s | {r['stack_gb']:.1f} GB |")


def memory_table(args, head: list) -> None:
    lines = head + [""] + MEMORY_HEAD
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmp:
        for spec in args.memory_sizes.split(","):
            size, n = (int(v) for v in spec.split(":"))
            r = memory_run(Path(tmp), n, size, args.memory_mb)
            lines.append(memory_row(n, size, r))
            print(lines[-1], flush=True)
    lines.append(f"\n(each row a fresh child process: master bias of the N raw uint16 frames (BZERO 32768, as "
                 f"cameras write them), combined from the memory-mapped files in row blocks under "
                 f"`memory_mb={args.memory_mb:g}`, then the N frames calibrated one at a time with it by "
                 "`calibrate.calibrate_files` and written as float32 FITS (no variance files; deleted after). "
                 "The peak includes the Python/torch process itself, measured by the 1-frame row.)\n")
    text = "\n".join(lines)
    print(text)
    write_result("calibrate_ccdproc_memory", text)


def main() -> None:
    ap_ = argparse.ArgumentParser()
    ap_.add_argument("--size", type=int, default=1024)
    ap_.add_argument("--n-cal", type=int, default=10)
    ap_.add_argument("--n-sci", type=int, default=3)
    ap_.add_argument("--rounds", type=int, default=3)
    ap_.add_argument("--memory-sizes", default="256:1,4096:10,4096:100")
    ap_.add_argument("--memory-only", action="store_true", help="only the memory table (calibrate_ccdproc_memory.md)")
    ap_.add_argument("--child", default=None)
    ap_.add_argument("--memory-mb", type=float, default=512.0)
    ap_.add_argument("--tmpdir", default=None, help="folder for the memory run's files (default: the system's)")
    args = ap_.parse_args()
    if args.child:
        return child_peak(args.child, args.memory_mb)
    torch.set_num_threads(2)
    lines = ["# CCD calibration vs ccdproc\n", f"machine: {machine()} (shared with other jobs)  ",
             f"command: `python experiments/calibrate_ccdproc.py {' '.join(sys.argv[1:])}`  ",
             f"data: simulated camera {args.size}x{args.size} + 32 overscan columns; {args.n_cal} bias, "
             f"{args.n_cal} dark (60 s), {args.n_cal} flat frames; {args.n_sci} science frames (18 s) with "
             "vignetting, dust donuts, hot pixels, bias row/column patterns, saturated stars with bleed trails and halos\n"]
    if args.memory_only:
        return memory_table(args, lines[:3])
    with tempfile.TemporaryDirectory() as tmp:
        night = make_night(Path(tmp), args.size, args.n_cal, args.n_sci)
        lines.append("| combination | master bias | master dark | master flat | calibrated frames |")
        lines.append("| --- | --- | --- | --- | --- |")
        results = {}
        for method, clip in (("median", False), ("mean", True)):
            a, b = ours(night["paths"], method, clip), peer(night["paths"], method, clip)
            results[(method, clip)] = a
            d = compare(a, b)
            name = "median" if method == "median" else "sigma-clipped mean"
            lines.append(f"| {name} | {d['bias']:.1e} | {d['dark']:.1e} | {d['flat']:.1e} | {d['science']:.1e} |")
        lines.append("\n(max |ours - ccdproc| / max |ccdproc| per product; ccdproc's flat normalised by its mean; "
                     "ccdproc's calibrated frames, in electrons when `ccd_process` is given the gain, divided by the "
                     "gain; its uncertainty map is not compared: ccdproc computes it before the bias is subtracted, "
                     "so its Poisson term counts the bias level, and it leaves out the masters' uncertainties)\n")
        t = truth_check(results[("median", False)], night)
        lines.append(f"calibrated vs truth (median masters, unsaturated and non-hot pixels): chi mean "
                     f"{t['chi_mean']:+.3f}, chi std {t['chi_std']:.3f} (1 = exactly the noise of the frame; "
                     f"the masters' own noise adds a little), mean offset {t['bias_ADU']:+.2f} ADU\n")
        to, tp = [], []
        for _ in range(args.rounds):
            to.append(timed(ours, night["paths"]))
            tp.append(timed(peer, night["paths"]))
        mo, mp = float(np.median(to)), float(np.median(tp))
        lines.append("| whole calibration (masters + frames) | ours | ccdproc | ratio |")
        lines.append("| --- | --- | --- | --- |")
        lines.append(f"| median of {args.rounds} alternated rounds | {mo:.2f} s | {mp:.2f} s | ours takes "
                     f"{mo / mp:.2f}x ccdproc's time |\n")
        lines.append("Memory of 100 raw frames: `calibrate_ccdproc_memory.md` (`--memory-only`).\n")
    text = "\n".join(lines)
    print(text)
    write_result("calibrate_ccdproc", text)


if __name__ == "__main__":
    main()
