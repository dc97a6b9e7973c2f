"""Background2D speed and memory vs photutils Background2D and sep Background (issue 3).

Same frames, same parameters (box 64, 3x3 mesh filter, 3-sigma / 10-iteration clipping, SExtractor
estimator), float32, ratios measured in one run. Writes experiments/results/background_speed.md.

    python experiments/background_speed.py [--sizes 2048 4096] [--repeat 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

# libgomp's default (active) wait makes idle OpenMP workers spin; on this shared, oversubscribed
# 2-core machine a spinning worker steals the main thread's core and every parallel region waits
# a scheduler time slice (ms): that, not the algorithm, made 4096^2 cost ~22x 2048^2. Passive waiting
# must be chosen before torch (libgomp) loads; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages for big CPU tensors (see astroprep_torch/__init__.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, timeit, write_result  # noqa: E402


def frame(n: int, seed: int = 0) -> np.ndarray:
    """Sloped sky + Gaussian noise + hot pixels and a few bright square 'stars' (float32)."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, n, dtype=np.float32)[:, None]
    x = np.linspace(0, 1, n, dtype=np.float32)[None, :]
    img = (1000.0 + 80.0 * x + 40.0 * y + rng.normal(0, 10, (n, n)).astype(np.float32)).astype(np.float32)
    for cy, cx in rng.integers(0, n - 5, (n // 4, 2)):
        img[cy:cy + 4, cx:cx + 4] += rng.uniform(100, 5000)
    return img


def ours(x, method):
    from astroprep_torch.background import background_2d

    r = background_2d(x, box_size=64, filter_size=3, method=method)
    return r.background, r.rms


def run_sep(img):
    import sep

    b = sep.Background(img, bw=64, bh=64, fw=3, fh=3)
    return b.back(), b.rms()


def run_photutils(img):
    from astropy.stats import SigmaClip
    from photutils.background import Background2D, SExtractorBackground

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = Background2D(img, 64, filter_size=3, sigma_clip=SigmaClip(sigma=3, maxiters=10),
                         bkg_estimator=SExtractorBackground())
        return b.background, b.background_rms


_MEM_CHILD = r"""
import json, sys, resource, numpy as np, torch
sys.path.insert(0, {exp!r})
torch.set_num_threads({threads})
from background_speed import frame, ours
n, method = {n}, {method!r}
x = torch.from_numpy(frame(n))[None, None].contiguous()
ours(x[..., :256, :256], method)
def rss():
    for line in open('/proc/self/status'):
        if line.startswith('VmRSS'):
            return int(line.split()[1]) * 1024
base = rss()
open('/proc/self/clear_refs', 'w').write('5')
out = ours(x, method)
peak = max(int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024, base)
print(json.dumps(dict(extra=peak - base, outputs=sum(o.numel() * o.element_size() for o in out), input=x.numel() * 4)))
"""


def peak_extra_memory(n: int, method: str, threads: int) -> dict:
    code = _MEM_CHILD.format(exp=str(Path(__file__).resolve().parent), threads=threads, n=n, method=method)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(res.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--no-photutils", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    lines = ["# Background2D speed (issue 3)", "", machine() + f", OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}", "",
             "Box 64, 3x3 filter, 3-sigma / 10-iteration clipping, SExtractor estimator, float32, one frame,",
             f"median of {args.repeat} runs after a warm-up; sep and photutils are single-threaded. "
             "'ours' = default photutils flavour (histogram statistics); 'ours sex' = method='sextractor'.", "",
             "| size | photutils s | sep s | ours s | ours sex s | photutils/ours | ours/sep | ours sex/sep |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in args.sizes:
        img = frame(n)
        x = torch.from_numpy(img)[None, None]
        t_sep = timeit(lambda: run_sep(img), repeat=args.repeat)
        t_ours = timeit(lambda: ours(x, "photutils"), repeat=args.repeat)
        t_sex = timeit(lambda: ours(x, "sextractor"), repeat=args.repeat)
        t_pu = float("nan") if args.no_photutils else timeit(lambda: run_photutils(img), repeat=max(1, args.repeat - 1))
        row = (f"| {n}² | {t_pu:.3f} | {t_sep:.3f} | {t_ours:.3f} | {t_sex:.3f} | {t_pu / t_ours:.1f}x | "
               f"{t_ours / t_sep:.2f} | {t_sex / t_sep:.2f} |")
        print(row, flush=True)
        lines.append(row)
    # batch throughput at 2048^2
    n = 2048
    xb = torch.from_numpy(np.stack([frame(n, s) for s in range(args.batch)]))[:, None]
    imgs = [xb[i, 0].numpy() for i in range(args.batch)]
    t_b = timeit(lambda: ours(xb, "photutils"), repeat=max(1, args.repeat - 1))
    t_bs = timeit(lambda: [run_sep(im) for im in imgs], repeat=max(1, args.repeat - 1))
    lines += ["", f"Batch B={args.batch} at 2048²: ours {args.batch / t_b:.2f} frames/s, "
              f"sep (loop) {args.batch / t_bs:.2f} frames/s, ratio ours/sep time {t_b / t_bs:.2f}."]
    print(lines[-1], flush=True)
    lines += ["", "| size | method | peak extra memory / input (outputs included) | outputs / input |", "| --- | --- | --- | --- |"]
    for n in args.sizes:
        for method in ("photutils", "sextractor"):
            m = peak_extra_memory(n, method, args.threads)
            row = f"| {n}² | {method} | {m['extra'] / m['input']:.2f} | {m['outputs'] / m['input']:.2f} |"
            print(row, flush=True)
            lines.append(row)
    lines += ["", "Command: `python experiments/background_speed.py " + " ".join(sys.argv[1:]) + "`", ""]
    print(write_result("background_speed", "\n".join(lines)))


if __name__ == "__main__":
    main()
