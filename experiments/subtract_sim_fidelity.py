"""Subtraction fidelity on simulated GWAC-like pairs, several seeds (issue 6, simulated criteria).

For each seed: an aligned pair (seeing 2.5 vs 3.0 px FWHM, different sky levels and gradients,
injected transients, GWAC star density), subtracted with the issue's basis at spatial order 2, with
and without ``debias``. Reported: robust std of difference / noise (goal within 10% of 1) over the
frame and at constant stars, mean and median of difference / noise at constant stars (goal within
0.05 sigma), transients above 5 sigma recovered with PSF-fitted flux within 5%, and false 5-sigma
peaks per 10^6 px away from saturated stars and transients (goal < 1).

    python experiments/subtract_sim_fidelity.py [--size 2048] [--seeds 1 2 3 4]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_rev, machine, robust_std, write_result  # noqa: E402

from astroprep_torch import sim  # noqa: E402
from astroprep_torch.subtract import ImageSubtraction  # noqa: E402


def evaluate(pair, debias: bool, edge: int = 16) -> dict:
    ref, sci = pair.reference, pair.science
    h, w = sci.image.shape[-2:]
    sub = ImageSubtraction(gain=1.5, read_noise=10.0, saturation=60000.0, debias=debias)  # issue defaults otherwise
    res = sub(sci.image, ref.image, sci.mask, ref.mask)
    d = res.difference[0, 0].double()
    v = res.variance[0, 0].double()
    z = d / v.sqrt()
    near_sat = F.max_pool2d((sci.mask | ref.mask).float(), 41, 1, 20)[0, 0] > 0
    tx, ty, tf = pair.transients["x"].double(), pair.transients["y"].double(), pair.transients["flux"].double()
    near_tr = torch.zeros(h, w, dtype=torch.bool)
    for x0, y0 in zip(tx.tolist(), ty.tolist()):
        y_lo, y_hi = max(0, int(y0) - 15), min(h, int(y0) + 16)
        x_lo, x_hi = max(0, int(x0) - 15), min(w, int(x0) + 16)
        yy = torch.arange(y_lo, y_hi, dtype=torch.float64)[:, None]
        xx = torch.arange(x_lo, x_hi, dtype=torch.float64)[None, :]
        near_tr[y_lo:y_hi, x_lo:x_hi] |= (xx - x0) ** 2 + (yy - y0) ** 2 < 15 ** 2
    inner = torch.zeros(h, w, dtype=torch.bool)
    inner[edge:-edge, edge:-edge] = True
    out = {"kernel_sum": float(res.kernel_sum[0])}
    out["std_frame"] = robust_std(z[inner & ~near_tr].numpy())
    cat = ref.catalog
    sx, sy = cat["x"].round().long(), cat["y"].round().long()
    ok = (sx >= edge) & (sx < w - edge) & (sy >= edge) & (sy < h - edge)
    sx, sy = sx[ok], sy[ok]
    keep = ~near_sat[sy, sx] & ~near_tr[sy, sx]
    zs = z[sy[keep], sx[keep]].numpy()
    # the science frame's own noise at the star pixels (known here): the part of the star mean that
    # is this realisation's fluctuation (standard error ~1/sqrt(n_stars)), not the subtraction's
    zn = ((sci.image - sci.noiseless)[0, 0].double() / v.sqrt())[sy[keep], sx[keep]].numpy()
    out.update(n_stars=int(keep.sum()), std_stars=robust_std(zs), mean_stars=float(zs.mean()),
               median_stars=float(np.median(zs)), mean_stars_noise=float(zn.mean()),
               mean_stars_model=float(zs.mean() - zn.mean()))
    # transients: PSF-fitted flux (science PSF, 3.0 px FWHM) on the difference
    s = 3.0 / 2.3548
    n_checked = n_ok = 0
    worst = 0.0
    for x0, y0, f0 in zip(tx.tolist(), ty.tolist(), tf.tolist()):
        others = ((tx - x0) ** 2 + (ty - y0) ** 2).sqrt()
        if (others < 20).sum() > 1 or not (edge <= x0 < w - edge and edge <= y0 < h - edge) or near_sat[int(y0), int(x0)]:
            continue
        y_lo, y_hi = max(0, int(y0) - 10), min(h, int(y0) + 11)
        x_lo, x_hi = max(0, int(x0) - 10), min(w, int(x0) + 11)
        yy = torch.arange(y_lo, y_hi, dtype=torch.float64)[:, None]
        xx = torch.arange(x_lo, x_hi, dtype=torch.float64)[None, :]
        psf = torch.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * s * s)) / (2 * math.pi * s * s)
        wgt = psf / v[y_lo:y_hi, x_lo:x_hi]
        flux = float((d[y_lo:y_hi, x_lo:x_hi] * wgt).sum() / (psf * wgt).sum())
        err = float((psf * wgt).sum() ** -0.5)
        if flux / err < 5:
            continue
        n_checked += 1
        rel = abs(flux / f0 - 1.0)
        worst = max(worst, rel)
        n_ok += rel <= 0.05
    out.update(transients_checked=n_checked, transients_within_5pct=n_ok, transient_worst=worst)
    clean = inner & ~near_sat & ~near_tr
    zpos = torch.where(clean, z, torch.zeros_like(z))
    peaks = (zpos > 5) & (zpos == F.max_pool2d(zpos[None, None], 5, 1, 2)[0, 0])
    out["false_per_mpx"] = float(peaks.sum()) / float(clean.sum()) * 1e6
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=2048)
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4])
    args = ap.parse_args()
    n = args.size
    n_stars = int(20000 * (n / 4096) ** 2)  # GWAC density: ~20,000 stars on 4096^2
    rows = []
    for seed in args.seeds:
        pair = sim.simulate_pair((n, n), n_stars=n_stars, shift=(0.0, 0.0), fwhm=(2.5, 3.0),
                                 n_transients=max(20, n_stars // 100), transient_mag_range=(11.0, 13.5),
                                 n_moving=0, seed=seed)
        for debias in (False, True):
            r = evaluate(pair, debias)
            rows.append((seed, debias, r))
            print(seed, debias, {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
    lines = ["# Subtraction on simulated GWAC-like pairs (issue 6, simulated criteria)", "",
             f"`python experiments/subtract_sim_fidelity.py --size {n} --seeds {' '.join(map(str, args.seeds))}` "
             f"(git {git_rev()})", "", machine(), "",
             f"{n}x{n} aligned pairs, {n_stars} stars (GWAC density), FWHM 2.5 (reference) vs 3.0 (science) px, "
             "sky 1000 vs 1200 ADU with different gradients, gain 1.5, read noise 10; ImageSubtraction with the "
             "issue's defaults (3 Gaussians 6/4/2, spatial order 2, background order 1, 10x10 stamps). "
             "z = difference / sqrt(variance); constant stars = reference catalog positions away from "
             "saturation and transients; outer 16 px excluded.", "",
             "Mean z (stars) = science noise + model: the first is the science frame's own noise at "
             "those pixels (this realisation's fluctuation, standard error ~1/sqrt(stars)), the second "
             "what the subtraction adds (the kernel's bias); the simulator's truth splits them.", "",
             "| seed | debias | kernel sum | robust std z (frame) | robust std z (stars) | mean z (stars) | "
             "= science noise | + model | median z (stars) | stars | transients >5 sigma within 5% | "
             "worst transient error | false 5 sigma / Mpx |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for seed, debias, r in rows:
        lines.append(f"| {seed} | {debias} | {r['kernel_sum']:.4f} | {r['std_frame']:.3f} | {r['std_stars']:.3f} | "
                     f"{r['mean_stars']:+.3f} | {r['mean_stars_noise']:+.3f} | {r['mean_stars_model']:+.3f} | "
                     f"{r['median_stars']:+.3f} | {r['n_stars']} | "
                     f"{r['transients_within_5pct']}/{r['transients_checked']} | {r['transient_worst']:.3f} | "
                     f"{r['false_per_mpx']:.2f} |")
    lines += ["", "Goals: robust std within 10% of 1; |mean| at constant stars <= 0.05 sigma; every transient "
              "above 5 sigma within 5% in flux; < 1 false 5-sigma source per 10^6 px. debias=True is the "
              "default; False reproduces HOTPANTS' plain least squares."]
    print(write_result(f"subtract_sim_fidelity_{n}", "\n".join(lines) + "\n"))


if __name__ == "__main__":
    main()
