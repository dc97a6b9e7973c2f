"""Is the subtraction's noise calibrated once a frame was resampled? (issue 19, item 1)

Part A -- eager ``ImageSubtraction`` without variance maps: simulated pairs (GWAC-like density,
gain 1.5, read noise 10 e-) where the template, and separately the science frame, is resampled onto
the other's grid (``Reproject``, bilinear and lanczos3) with a random sub-pixel shift and a small
random rotation. Statistic: robust std (1.4826 MAD) of difference / sqrt(variance) away from the
edges, the transients and saturated stars; goal 1 +- 0.05. Default (``calibrate_noise=True``) vs
``calibrate_noise=False`` (HOTPANTS' Poisson noise image, what the library returned before), and
with the variance propagated by ``Reproject(variance=...)`` (sum w^2 var) passed as variance maps.

Part B -- the default pipeline (configs/pipeline/gwac.yaml: background rms^2 propagated through the
alignment, subtraction with those variance maps) on a simulated pair without transients:
difference / difference_rms robust std, and the number of pixels beyond 3, 4, 5 sigma on the
negative side (constant-star residuals do not reach it) and of 5-sigma peaks, against the Gaussian
expectation.

Run:  python experiments/subtract_resampled_noise.py [--size 1024] [--cases 4]
Writes experiments/results/subtract_resampled_noise.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import os  # noqa: E402

# ASTROPREP_ROOT: another checkout (e.g. the one before this change) for part B's "before" numbers
ROOT = Path(os.environ.get("ASTROPREP_ROOT", Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import git_rev, machine, robust_std, write_result  # noqa: E402

import astroprep_torch as ap  # noqa: E402
from astroprep_torch.subtract import ImageSubtraction, poisson_variance  # noqa: E402

GAIN, RN = 1.5, 10.0


def good_pixels(pair, extra_bad, edge=24):
    """Pixels away from the edges, the transients (15 px) and saturated stars (20 px)."""
    h, w = pair.reference.image.shape[-2:]
    bad = extra_bad | pair.science.mask | pair.reference.mask
    bad = F.max_pool2d(bad.float(), 41, 1, 20) > 0
    yy = torch.arange(h, dtype=torch.float64)[:, None]
    xx = torch.arange(w, dtype=torch.float64)[None, :]
    near = torch.zeros(h, w, dtype=torch.bool)
    for tx, ty in zip(pair.transients["x"], pair.transients["y"]):
        near |= (xx - float(tx)) ** 2 + (yy - float(ty)) ** 2 < 15 ** 2
    keep = ~bad[0, 0] & ~near
    keep[:edge] = keep[-edge:] = False
    keep[:, :edge] = keep[:, -edge:] = False
    return keep


def part_a(size, cases, rng):
    rows = []
    sub_kw = dict(gain=GAIN, read_noise=RN, saturation=60000.0, spatial_order=1)
    for i in range(cases):
        shift = tuple(float(v) for v in rng.uniform(-3, 3, 2))
        rot = float(rng.uniform(-0.5, 0.5))
        pair = ap.sim.simulate_pair((size, size), n_stars=int(1300 * (size / 1024) ** 2), shift=shift, rotation=rot,
                                    n_moving=0, seed=100 + i)
        sci, ref = pair.science, pair.reference
        for moved in ("science", "template"):
            src, dst = (sci, ref) if moved == "science" else (ref, sci)
            for interp in ("bilinear", "lanczos3"):
                var_src = poisson_variance(src.image, GAIN, RN)
                r = ap.align.Reproject(dst.shape, interpolation=interp)(src.image, src.wcs, dst.wcs, mask=src.mask,
                                                                      variance=var_src)
                moved_img, moved_mask = r.image.nan_to_num(0.0), r.mask
                s_img, t_img = (moved_img, dst.image) if moved == "science" else (dst.image, moved_img)
                s_mask = moved_mask | (dst.mask if moved == "template" else torch.zeros_like(moved_mask))
                t_mask = dst.mask if moved == "science" else moved_mask
                truth_pair = pair if moved == "science" else None
                keep = good_pixels(pair, moved_mask) if truth_pair is not None else good_pixels(pair, moved_mask)
                res = {}
                for label, kw in (("default", {}), ("calibrate_noise=False", {"calibrate_noise": False})):
                    out = ImageSubtraction(**sub_kw, **kw)(s_img, t_img, s_mask, t_mask)
                    z = (out.difference / out.variance.sqrt())[0, 0]
                    res[label] = robust_std(z[keep].double().numpy())
                vmaps = dict(science_var=r.variance.nan_to_num(0.0) if moved == "science" else poisson_variance(dst.image, GAIN, RN),
                             template_var=r.variance.nan_to_num(0.0) if moved == "template" else poisson_variance(dst.image, GAIN, RN))
                out = ImageSubtraction(**sub_kw)(s_img, t_img, s_mask, t_mask, **vmaps)
                z = (out.difference / out.variance.sqrt())[0, 0]
                res["propagated variance maps"] = robust_std(z[keep].double().numpy())
                rows.append((i, moved, interp, shift, rot, res))
                print(rows[-1], flush=True)
    return rows


def part_b(size, seed):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["output=/tmp/unused"])
    pipe = instantiate(cfg.pipeline)
    pair = ap.sim.simulate_pair((size, size), n_stars=int(1300 * (size / 1024) ** 2), shift=(3.3, -2.7), rotation=0.05,
                                sip=True, n_transients=0, n_moving=0, seed=seed)
    sci, ref = pair.science, pair.reference
    batch = {"science": sci.image, "science_mask": sci.mask, "science_wcs": sci.wcs,
             "reference": ref.image, "reference_mask": ref.mask, "reference_wcs": ref.wcs}
    with torch.no_grad():
        out = pipe(batch)
    z = (out["difference"] / out["difference_rms"])[0, 0].double()
    keep = good_pixels(pair, out["aligned_mask"]) & torch.isfinite(z)
    zk = z[keep].numpy()
    n = zk.size
    stats = {"pixels": n, "robust std": robust_std(zk)}
    for k in (3, 4, 5):
        stats[f"< -{k} sigma"] = (int((zk < -k).sum()), n * 0.5 * math.erfc(k / math.sqrt(2)))
    zpos = torch.where(keep, z, torch.zeros_like(z))
    peaks = (zpos > 5) & (zpos == F.max_pool2d(zpos[None, None], 5, 1, 2)[0, 0])
    stats["5-sigma peaks"] = int(peaks.sum())
    stats["kernel_sum"] = float(out["kernel_sum"][0])
    return stats


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--only-b", action="store_true", help="part B only, printed (with ASTROPREP_ROOT: another checkout)")
    args = p.parse_args()
    if args.only_b:
        print(ap.__file__, part_b(args.size, 7))
        return
    rng = np.random.default_rng(args.seed)
    rows = part_a(args.size, args.cases, rng)
    b = part_b(args.size, 7)
    lines = ["# Noise calibration of the subtraction after resampling (issue 19, item 1)", "",
             f"Command: `python experiments/subtract_resampled_noise.py --size {args.size} --cases {args.cases} "
             f"--seed {args.seed}`; git {git_rev()}; {machine()} (machine shared with other jobs).", "",
             f"## A. Robust std of difference / sqrt(variance), {args.size}^2 simulated pairs (goal 1 +- 0.05)", "",
             "| case | resampled | kernel | shift (px) | rotation (deg) | default (calibrate_noise) | "
             "calibrate_noise=False (before) | variance propagated by Reproject |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for i, moved, interp, shift, rot, res in rows:
        lines.append(f"| {i} | {moved} | {interp} | ({shift[0]:.2f}, {shift[1]:.2f}) | {rot:.2f} | "
                     f"{res['default']:.3f} | {res['calibrate_noise=False']:.3f} | {res['propagated variance maps']:.3f} |")
    for label in ("default", "calibrate_noise=False", "propagated variance maps"):
        vals = [r[5][label] for r in rows]
        lines.append(f"\n{label}: range {min(vals):.3f}-{max(vals):.3f}, "
                     f"{sum(abs(v - 1) <= 0.05 for v in vals)}/{len(vals)} within 1 +- 0.05")
    lines += ["", f"## B. Default pipeline (gwac.yaml) on a {args.size}^2 pair without transients (TAN-SIP, shift "
              "(3.3, -2.7), rotation 0.05 deg)", "",
              "| statistic | measured | Gaussian expectation |", "| --- | --- | --- |",
              f"| robust std of difference / difference_rms | {b['robust std']:.3f} | 1 |"]
    for k in (3, 4, 5):
        got, exp = b[f"< -{k} sigma"]
        lines.append(f"| pixels below -{k} sigma | {got} | {exp:.1f} |")
    lines += [f"| 5-sigma peaks (positive, 5x5 local maxima) | {b['5-sigma peaks']} | "
              f"~{b['pixels'] * 0.5 * math.erfc(5 / math.sqrt(2)):.1f} (pixels; fewer as peaks) |",
              f"| kernel sum | {b['kernel_sum']:.4f} | 1 |", ""]
    text = "\n".join(lines)
    print(text)
    write_result("subtract_resampled_noise", text)


if __name__ == "__main__":
    main()
