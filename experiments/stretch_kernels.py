"""The CPU choices behind the backend variants of ``stretch`` and ``quality`` (issue 23): each
variant against the plain torch op it replaces, same data, same script, alternated, medians.

    python experiments/stretch_kernels.py             # 2048^2 float32, torch's default threads
    python experiments/stretch_kernels.py --size 1024 --reps 9
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import git_rev, machine, write_result  # noqa: E402

from astroprep_torch import quality  # noqa: E402
from astroprep_torch import stretch as st  # noqa: E402


def alternated(fa, fb, reps: int) -> tuple[float, float]:
    """Median seconds of ``fa()`` and ``fb()``, run alternately after one warm-up each."""
    fa(), fb()
    ta, tb = [], []
    for _ in range(reps):
        for f, out in ((fa, ta), (fb, tb)):
            t0 = time.perf_counter()
            f()
            out.append(time.perf_counter() - t0)
    return statistics.median(ta), statistics.median(tb)


def cases(n: int):
    """(name, ours, the torch op it replaces) on fresh copies of one ``n x n`` frame."""
    x = torch.rand(n * n)
    z = torch.randn(n * n) * 30
    img = torch.rand(1, 1, n, n)
    for kind, a in (("power", 0.7), ("log", 1000.0), ("asinh", 0.1), ("sinh", 1 / 3)):
        p = st._StretchParams(a, True)
        yield (f"{kind} stretch: numpy kernel vs in-place torch kernel",
               lambda p=p, kind=kind: st.numpy_inplace_(x.clone(), st._numpy_stretch(kind, p), min_numel=st._NUMPY_MIN),
               lambda p=p, kind=kind: st._STRETCH_KERNELS[kind]["inplace"](x.clone(), p))
    yield ("sqrt stretch: 1 / rsqrt vs torch.sqrt", lambda: x.clone().rsqrt_().reciprocal_(), lambda: x.clone().sqrt_())
    yield ("asinh stretch, clipped: log form vs torch.asinh",
           lambda: st._STRETCH_KERNELS["asinh"]["inplace"](x.clone(), st._StretchParams(0.1, True)),
           lambda: x.clone().div_(0.1).asinh_().div_(2.998))
    yield ("bad map: (x - x) != 0 vs ~isfinite", lambda: (x - x) != 0, lambda: ~torch.isfinite(x))
    yield ("signed_asinh (numpy log1p) vs torch.asinh", lambda: st.signed_asinh(z), lambda: torch.asinh(z))
    yield ("quality block max vs max_pool2d (k=4)", lambda: quality._block_max(img, 4), lambda: F.max_pool2d(img, 4))
    yield ("quality block mean vs avg_pool2d (k=2)", lambda: quality._block_mean(img, 2), lambda: F.avg_pool2d(img, 2))
    yield ("quality 3x3 maxima (shifted views) vs max_pool2d", lambda: quality._max3x3(img), lambda: F.max_pool2d(img, 3, 1, 1))
    frame = img * 50 + 1000
    scorer = quality.QualityScorer.pretrained()
    yield ("cost, not a replacement: the PSF check of adapted scorers (star_stats) vs the autoencoder's patch errors",
           lambda: quality.star_stats(frame), lambda: scorer.patch_errors(frame))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=15)
    args = ap.parse_args()
    lines = ["# Backend variants of stretch / quality against the torch ops they replace\n",
             f"machine: {machine()}; git {git_rev()}  ",
             f"command: `python experiments/stretch_kernels.py {' '.join(sys.argv[1:])}`  ",
             f"data: one {args.size}x{args.size} float32 frame (uniform in [0, 1]; N(0, 30) for asinh); median of "
             f"{args.reps} alternated runs; ratio > 1: the variant is faster\n",
             "| variant vs replaced op | variant [ms] | replaced [ms] | ratio |", "| --- | ---: | ---: | ---: |"]
    with torch.no_grad():
        for name, ours, ref in cases(args.size):
            ta, tb = alternated(ours, ref, args.reps)
            lines.append(f"| {name} | {1e3 * ta:.2f} | {1e3 * tb:.2f} | {tb / ta:.2f}x |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    write_result("stretch_kernels", text)


if __name__ == "__main__":
    main()
