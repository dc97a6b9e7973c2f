"""Paper Table 1: source detection (+ measurement) time vs SExtractor and sep, same frames, same background.

Frames: astroprep_torch.sim GWAC-like star fields (FWHM 2.5 px), sizes 2048^2 and 4096^2 (8192^2 with
--big, or any list with --sizes), at two source densities in the paper's ratio 1:2 (10,000 and 20,000
stars per 4096^2). Background excluded everywhere (as the paper): the true sky is subtracted and one
global rms is used.

- ours: ``SourceExtractor`` detection alone (``detect_sources(dense=False)``: filter, threshold, labels,
  deblend, clean) and detection + ``photometry.measure`` (the full Catalog);
- sep: ``sep.extract(data, 1.5, err=rms)`` + ``sum_circle`` (r=5) + ``kron_radius``/``sum_ellipse``;
- SExtractor: ``source-extractor`` whole run (BACK_TYPE MANUAL, BACK_VALUE 0, THRESH_TYPE ABSOLUTE at
  1.5 rms, same kernel, apertures and AUTO) on the background-subtracted frame written to /tmp.

Timings: medians of ``--reps`` runs after one warm-up. sep and SExtractor are single-threaded, so the
fair comparison on a shared machine is CPU time (user + system of this process, or of the child for
SExtractor) with ours on ONE thread (``torch.set_num_threads(1)``); ours is also timed (wall) with
``--threads``. ``--baseline REV`` adds ours (1 thread) from git revision REV (``git archive``) for a
before/after in the same run. ``--memory`` runs ours in a fresh subprocess per frame and reports its
peak RSS (``VmHWM``, reset once the input is loaded) above the RSS then, relative to the input's size.
``uptime`` load averages are recorded at the start and the end.
Writes experiments/results/detect_speed.md (``--out``).
Run: python experiments/detect_speed.py [--big | --sizes 8192] [--reps 3] [--baseline HEAD] [--memory]
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
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import sex_config  # noqa: E402
from astroprep_torch.detect import SourceExtractor, detect_sources  # noqa: E402
from astroprep_torch.sim import simulate_frame  # noqa: E402



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


def _threads(n):
    """Context: ``torch.set_num_threads(n)`` inside, restored after."""
    class _T:
        def __enter__(self):
            self.old = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.old)
    return _T()


def _baseline_package(rev: str, tmp: Path):
    """``astroprep_torch`` at git revision ``rev`` imported as ``astroprep_torch_baseline``."""
    import importlib
    import tarfile

    arc = tmp / "base.tar"
    subprocess.run(["git", "archive", "-o", str(arc), rev, "astroprep_torch"], cwd=ROOT, check=True)
    with tarfile.open(arc) as t:
        t.extractall(tmp / "base", filter="data")
    src = tmp / "base" / "astroprep_torch"
    dst = tmp / "base" / "astroprep_torch_baseline"
    src.rename(dst)
    for f in dst.rglob("*.py"):  # sub-packages (detect/) too
        f.write_text(f.read_text().replace("astroprep_torch.", "astroprep_torch_baseline."))
    sys.path.insert(0, str(tmp / "base"))
    return importlib.import_module("astroprep_torch_baseline.detect")


def _rss_child(path: str, rms: float):
    """Subprocess body of --memory: load the frame, run ours once, print the RSS figures (MiB)."""
    torch.set_num_threads(1)
    img = torch.from_numpy(np.load(path))[None, None]
    se = SourceExtractor(thresh=1.5, minarea=5, deblend_cont=0.005, phot_apertures=(10.0,),
                         kron_fact=2.5, min_radius=3.5)
    def status(key):  # MiB, from /proc/self/status
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return float(line.split()[1]) / 1024.0
        return float("nan")

    # ru_maxrss survives exec (it would count the parent's pages at fork): use VmHWM, the peak RSS of
    # this process image, reset to the current RSS once the input is loaded ("5" > clear_refs)
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    before = status("VmRSS")
    t = time.perf_counter()
    cat = se(img, rms)
    dt = time.perf_counter() - t
    peak = status("VmHWM")
    print(f"RSS {before:.1f} {peak:.1f} {img.numel() * img.element_size() / 2**20:.1f} {len(cat)} {dt:.3f}")


def _rss_of(data: np.ndarray, rms: float, tmp: Path):
    np.save(tmp / "frame.npy", data)
    out = subprocess.run([sys.executable, __file__, "--rss-child", str(tmp / "frame.npy"), repr(rms)],
                         capture_output=True, text=True, check=True).stdout
    (tmp / "frame.npy").unlink()
    line = [x for x in out.splitlines() if x.startswith("RSS ")][-1].split()
    return tuple(float(v) for v in line[1:4]) + (int(line[4]),)


def _memory_lines(rows):
    lines = [
        "## Peak memory of ours (detection + measurement, 1 thread, fresh process)",
        "",
        "RSS = resident set size of a fresh process that loaded the frame (torch and the package "
        "imported); peak = its VmHWM during ``SourceExtractor()(image, rms)``, reset once the frame was "
        "loaded.",
        "",
        "| size | stars | N | input (MiB) | RSS with input loaded (MiB) | peak RSS (MiB) | peak - loaded (MiB) | (peak - loaded) / input |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        b, pk, inp, n = r["rss"]
        lines.append(f"| {r['n']}² | {r['stars']} | {n} | {inp:.0f} | {b:.0f} | {pk:.0f} | {pk - b:.0f} | {(pk - b) / inp:.2f} |")
    return lines


def _memory_table(args):
    tmp = Path(tempfile.mkdtemp(prefix="detect_mem_"))
    rows = []
    for n in args.sizes or ([2048, 4096] + ([8192] if args.big else [])):
        for per4k in (10000, 20000):
            n_stars = int(round(per4k * (n / 4096) ** 2))
            fr = simulate_frame((n, n), n_stars=n_stars, seed=1)
            data = (fr.image - fr.background)[0, 0].numpy().astype(np.float32)
            rms = float(fr.variance.sqrt().median())
            del fr
            rows.append({"n": n, "stars": n_stars, "rss": _rss_of(data, rms, tmp)})
            print(rows[-1], flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    cmd_line = " ".join(["python experiments/detect_speed.py"] + sys.argv[1:])
    lines = ["# Detection + measurement memory", "", f"`{cmd_line}`", "", f"- `uptime`: `{_uptime()}`", ""]
    lines += _memory_lines(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--big", action="store_true", help="add 8192^2 frames")
    ap.add_argument("--sizes", type=int, nargs="+", default=None, help="frame sides (default 2048 4096 [8192])")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--baseline", default=None, help="git revision to time as 'before' (ours, 1 thread)")
    ap.add_argument("--memory", action="store_true", help="peak RSS of ours per frame (fresh subprocess)")
    ap.add_argument("--memory-only", action="store_true", help="only the --memory table (no timings)")
    ap.add_argument("--no-measure", action="store_true", help="skip ours detection+measurement")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "detect_speed.md"))
    ap.add_argument("--rss-child", nargs=2, default=None, help=argparse.SUPPRESS)
    return ap.parse_args()


KW = dict(thresh=1.5, minarea=5, deblend_cont=0.005, phot_apertures=(10.0,), kron_fact=2.5, min_radius=3.5)
NAN2 = (float("nan"), float("nan"))


def _time_ours(r: dict, img, rms: float, args, base) -> None:
    """Ours on one thread (detection, detection + measurement, the baseline's) and on ``args.threads``."""
    se = SourceExtractor(**KW)

    def ours_detect():
        r["N ours"] = int(detect_sources(img, rms, thresh=1.5, minarea=5, deblend_cont=0.005,
                                         dense=False)["label"].numel())

    with _threads(1):
        r["det1"] = median_time(ours_detect, args.reps)
        r["full1"] = NAN2 if args.no_measure else median_time(lambda: se(img, rms), args.reps)
        if base is not None:
            bse = base.SourceExtractor(**KW)
            r["base1"] = median_time(lambda: bse(img, rms), args.reps)
    r["detT"] = median_time(ours_detect, args.reps)
    r["fullT"] = NAN2 if args.no_measure else median_time(lambda: se(img, rms), args.reps)


def _time_sep(r: dict, data, rms: float, n: int, reps: int) -> None:
    import sep

    nsep = [0]

    def sep_run():
        o = sep.extract(data, 1.5, err=rms, minarea=5, deblend_cont=0.005)
        sep.sum_circle(data, o["x"], o["y"], 5.0, err=rms)
        kr, _ = sep.kron_radius(data, o["x"], o["y"], o["a"], o["b"], o["theta"], 6.0)
        sep.sum_ellipse(data, o["x"], o["y"], o["a"], o["b"], o["theta"], 2.5 * kr, err=rms, subpix=1)
        nsep[0] = len(o)

    sep.set_extract_pixstack(max(3_000_000, n * n // 8))
    sep.set_sub_object_limit(4096)
    r["sep"] = median_time(sep_run, reps)
    r["N sep"] = nsep[0]


def _time_sextractor(r: dict, data, rms: float, exe, tmp: Path, reps: int) -> None:
    from astropy.io import fits

    r["sex"], r["N sex"] = NAN2, 0
    if exe:
        fits.writeto(tmp / "img.fits", data, overwrite=True)
        (tmp / "s.sex").write_text(sex_config(1.5 * rms))
        cmd = [exe, "img.fits", "-c", "s.sex"]
        r["sex"] = median_time(lambda: subprocess.run(cmd, cwd=tmp, check=True, capture_output=True), reps,
                               children=True)
        r["N sex"] = len(fits.getdata(tmp / "c.fits", 1))
        (tmp / "img.fits").unlink()


def _time_frame(n: int, n_stars: int, args, base, exe, tmp: Path) -> dict:
    """Every tool on one simulated frame of side ``n`` with ``n_stars`` stars."""
    fr = simulate_frame((n, n), n_stars=n_stars, seed=1)
    img = (fr.image - fr.background).contiguous()
    rms = float(fr.variance.sqrt().median())
    del fr
    data = img[0, 0].numpy().astype(np.float32)
    r = {"n": n, "stars": n_stars}
    _time_ours(r, img, rms, args, base)
    if args.memory:
        r["rss"] = _rss_of(data, rms, tmp)
    _time_sep(r, data, rms, n, args.reps)
    _time_sextractor(r, data, rms, exe, tmp, args.reps)
    return r


def _header_lines(args, up_start: str, up_end: str) -> list:
    cmd_line = " ".join(["python experiments/detect_speed.py"] + sys.argv[1:])
    return [
        "# Detection speed (paper Table 1)",
        "",
        f"`{cmd_line}`",
        "",
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}. "
        "sep and SExtractor are single-threaded; ours is timed on 1 thread (CPU time, the fair comparison "
        f"on a shared machine) and on {args.threads} threads (wall). Absolute times are inflated by other "
        "jobs on this shared machine; ratios are from the same run.",
        "",
        f"- `uptime` at the start: `{up_start}`",
        f"- `uptime` at the end: `{up_end}`",
        "",
        "Times in seconds (medians of %d runs after a warm-up). ours det = detection only (filter, "
        "threshold, labels, deblend, clean); ours full = detection + photometry.measure (Catalog with ISO, "
        "APER, AUTO, WIN, FLUX_RADIUS, flags; the dense segmentation map is made on first access of "
        "``Catalog.segmentation``, not timed); sep = extract + sum_circle + kron_radius + sum_ellipse; "
        "SExtractor = whole source-extractor run (BACK_TYPE MANUAL, the frame already background-"
        "subtracted)." % args.reps,
        "",
    ]


def _cpu_lines(rows: list, with_base: bool) -> list:
    hb = " | before full" if with_base else ""
    lines = [
        "## CPU time, ours on 1 thread (user + system; SExtractor: the child process)",
        "",
        f"| size | stars | N ours | N sep | N SExtractor | ours det | ours full{hb} | sep | SExtractor | det/sep | full/sep | full/SExtractor |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if with_base else ""),
    ]
    for r in rows:
        bcol = f" | {r['base1'][1]:.3f}" if with_base else ""
        c = lambda k: r[k][1]  # noqa: E731
        lines.append(
            f"| {r['n']}² | {r['stars']} | {r['N ours']} | {r['N sep']} | {r['N sex']} | {c('det1'):.3f} | {c('full1'):.3f}{bcol} | "
            f"{c('sep'):.3f} | {c('sex'):.3f} | {c('det1') / c('sep'):.2f} | {c('full1') / c('sep'):.2f} | "
            f"**{c('full1') / c('sex'):.2f}** |"
        )
    return lines


def _wall_lines(rows: list, threads: int) -> list:
    lines = [
        "",
        f"## Wall clock (ours on 1 and {threads} threads)",
        "",
        f"| size | stars | ours det (1) | ours full (1) | ours det ({threads}) | ours full ({threads}) | sep | SExtractor | full({threads})/sep | full({threads})/SExtractor |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        w = lambda k: r[k][0]  # noqa: E731
        lines.append(
            f"| {r['n']}² | {r['stars']} | {w('det1'):.3f} | {w('full1'):.3f} | {w('detT'):.3f} | {w('fullT'):.3f} | "
            f"{w('sep'):.3f} | {w('sex'):.3f} | {w('fullT') / w('sep'):.2f} | {w('fullT') / w('sex'):.2f} |"
        )
    return lines


def main():
    args = _args()
    if args.rss_child:
        return _rss_child(args.rss_child[0], float(args.rss_child[1]))
    if args.memory_only:
        return _memory_table(args)
    torch.set_num_threads(args.threads)
    exe = shutil.which("source-extractor")
    tmp = Path(tempfile.mkdtemp(prefix="detect_speed_"))
    base = _baseline_package(args.baseline, tmp) if args.baseline else None
    (tmp / "default.conv").write_text("CONV NORM\n1 2 1\n2 4 2\n1 2 1\n")
    (tmp / "p.param").write_text("X_IMAGE\nY_IMAGE\nFLUX_APER(1)\nFLUX_AUTO\nKRON_RADIUS\nFLAGS\n")
    sizes = args.sizes or ([2048, 4096] + ([8192] if args.big else []))
    up_start = _uptime()
    print("start:", up_start, flush=True)
    rows = []
    for n in sizes:
        for per4k in (10000, 20000):
            rows.append(_time_frame(n, int(round(per4k * (n / 4096) ** 2)), args, base, exe, tmp))
            print(dict(rows[-1]), flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    lines = _header_lines(args, up_start, _uptime()) + _cpu_lines(rows, base is not None) + _wall_lines(rows, args.threads)
    if args.memory:
        lines += [""] + _memory_lines(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
