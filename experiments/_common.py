"""Helpers shared by the experiment scripts: machine description, timing, result files."""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
SHARED_DATA = Path(os.environ.get("ASTROPREP_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def machine() -> str:
    """One line naming the CPU, thread count, torch version and current load."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"CPU: {cpu} ({os.cpu_count()} cores), torch {torch.__version__} with {torch.get_num_threads()} threads, "
            f"load average {load:.2f}")


def timeit(fn, *, repeat: int = 5, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write_result(name: str, text: str) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text(text)
    return path


def git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        return "unknown"


def robust_std(a: np.ndarray) -> float:
    """1.4826 x the median absolute deviation of the finite values of ``a``."""
    a = a[np.isfinite(a)]
    return float(1.4826 * np.median(np.abs(a - np.median(a))))


def hotpants_exe() -> Optional[str]:
    """The HOTPANTS binary (``$HOTPANTS`` or ``hotpants`` on PATH; see the README's Development
    section for building it), or None."""
    exe = os.environ.get("HOTPANTS") or shutil.which("hotpants")
    return exe if exe and os.access(exe, os.X_OK) else None


def hotpants_options(gaussians: Sequence, kernel_half_width: int, spatial_order: int, background_order: int,
                     stamp_grid: Sequence[int], stamp_half_width: int, gain: tuple, read_noise: tuple,
                     saturation: float, lower: float, clip_sigma: Optional[float] = None,
                     normalize: Optional[str] = None) -> list:
    """HOTPANTS options for ImageSubtraction's settings: the Gaussians and degrees (-ng), kernel half
    width (-r), kernel and background orders (-ko, -bgo), stamp grid (-nsx, -nsy; ``stamp_grid`` is
    (rows, columns)), stamp half width (-rss), optionally the rejection (-ks) and normalisation (-n),
    the (image, template) gains and read noises (-ig -tg, -ir -tr), the valid range
    (-il -tl ``lower``, -iu -tu ``saturation``), quiet (-v 0)."""
    ng = [str(len(gaussians))] + [v for sigma, degree in gaussians for v in (str(int(degree)), str(float(sigma)))]
    ny, nx = stamp_grid
    opts = ["-ng", *ng, "-r", str(int(kernel_half_width)), "-ko", str(int(spatial_order)),
            "-bgo", str(int(background_order)), "-nsx", str(int(nx)), "-nsy", str(int(ny)),
            "-rss", str(int(stamp_half_width))]
    if clip_sigma is not None:
        opts += ["-ks", str(float(clip_sigma))]
    if normalize is not None:
        opts += ["-n", "i" if normalize == "science" else "t"]
    return opts + ["-ig", str(gain[0]), "-tg", str(gain[1]), "-ir", str(read_noise[0]), "-tr", str(read_noise[1]),
                   "-iu", str(saturation), "-tu", str(saturation), "-il", f"{lower:.0f}", "-tl", f"{lower:.0f}",
                   "-v", "0"]


def run_hotpants(exe: str, science: Path, template: Path, out: Path, options: Sequence[str], extra: Sequence[str] = (),
                 prefix: Sequence[str] = ()) -> float:
    """Run ``[*prefix, exe, -inim science, -tmplim template, -outim out, *extra, *options]`` in ``out``'s
    folder, its progress lines (printed even at -v 0) into ``hotpants.log`` there; returns the wall time."""
    folder = Path(out).parent
    t0 = time.perf_counter()
    with open(folder / "hotpants.log", "w") as log:
        subprocess.run([*prefix, exe, "-inim", str(science), "-tmplim", str(template), "-outim", str(out), *extra,
                        *options], check=True, cwd=folder, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - t0


#: the SExtractor settings our detection benchmarks run the peer with (keyword -> value, in file order)
SEX_BASE = {
    "CATALOG_NAME": "c.fits", "CATALOG_TYPE": "FITS_1.0", "PARAMETERS_NAME": "p.param", "DETECT_MINAREA": 5,
    "THRESH_TYPE": "ABSOLUTE", "DETECT_THRESH": None, "ANALYSIS_THRESH": None, "FILTER": "Y",
    "FILTER_NAME": "default.conv", "DEBLEND_NTHRESH": 32, "DEBLEND_MINCONT": 0.005, "CLEAN": "Y",
    "CLEAN_PARAM": 1.0, "MASK_TYPE": "CORRECT", "PHOT_APERTURES": 10, "PHOT_AUTOPARAMS": "2.5,3.5",
    "SATUR_LEVEL": "1e9", "GAIN": 0.0, "BACK_TYPE": "MANUAL", "BACK_VALUE": 0.0, "CHECKIMAGE_TYPE": "NONE",
    "VERBOSE_TYPE": "QUIET", "MEMORY_OBJSTACK": 60000, "MEMORY_PIXSTACK": 20000000,
}


def sex_config(thresh: float, **keys) -> str:
    """A ``.sex`` file's text: :data:`SEX_BASE` with DETECT/ANALYSIS_THRESH = ``thresh`` (absolute);
    ``keys`` replace keywords or add them at the end."""
    conf = dict(SEX_BASE, DETECT_THRESH=thresh, ANALYSIS_THRESH=thresh)
    conf.update(keys)
    return "".join(f"{k} {v}\n" for k, v in conf.items())
