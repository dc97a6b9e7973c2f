"""Where do the 5-sigma peaks on a difference without transients come from? (issue 19, item 1)

The default pipeline (configs: gwac) on simulated TAN-SIP pairs without transients or moving objects
(shift (3.3, -2.7) px, rotation 0.05 deg, as ``subtract_resampled_noise.py`` part B): every positive
5-sigma peak of difference / difference_rms (5x5 local maxima, same pixels as part B: away from the
frame edges, masks and saturated stars) is attributed to the nearest reference star (within 5 px)
with that star's peak height and its distance to the frame edge. Also per star class: the largest
|z| within 3 px of each unsaturated star. Run once with the pipeline's bilinear alignment and once
with ``lanczos3`` (whose blur depends much less on the sub-pixel phase).

Run:  python experiments/subtract_false_peaks.py [--size 1024] [--seeds 7 8]
Writes experiments/results/subtract_false_peaks.md.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import astroprep_torch as ap  # noqa: F401  (first: sets OpenMP's wait policy before torch loads)
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_rev, machine, robust_std, write_result  # noqa: E402
from subtract_resampled_noise import ROOT, good_pixels  # noqa: E402


def run_pipeline(size: int, seed: int, interpolation: str, overrides=()):
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("config", overrides=["output=/tmp/unused",
                                           f"pipeline.stages.align.module.interpolation={interpolation}", *overrides])
    pipe = instantiate(cfg.pipeline)
    pair = ap.sim.simulate_pair((size, size), n_stars=int(1300 * (size / 1024) ** 2), shift=(3.3, -2.7),
                                rotation=0.05, sip=True, n_transients=0, n_moving=0, seed=seed)
    sci, ref = pair.science, pair.reference
    batch = {"science": sci.image, "science_mask": sci.mask, "science_wcs": sci.wcs,
             "reference": ref.image, "reference_mask": ref.mask, "reference_wcs": ref.wcs}
    with torch.no_grad():
        out = pipe(batch)
    return pair, out


def attribute(pair, out, size: int):
    """(stats, peak rows, per-star rows) of one pipeline run."""
    z = (out["difference"] / out["difference_rms"])[0, 0].double()
    keep = good_pixels(pair, out["aligned_mask"]) & torch.isfinite(z)
    zpos = torch.where(keep, z, torch.zeros_like(z))
    peaks = ((zpos > 5) & (zpos == F.max_pool2d(zpos[None, None], 5, 1, 2)[0, 0])).nonzero().tolist()
    rc = pair.reference.catalog
    rx, ry, rpk = rc["x"].double(), rc["y"].double(), rc["peak"].double()
    rows = []
    for y, x in peaks:
        d = ((rx - x) ** 2 + (ry - y) ** 2).sqrt()
        j = int(d.argmin())
        near = float(d[j]) < 5
        edge = min(float(rx[j]), float(ry[j]), size - 1 - float(rx[j]), size - 1 - float(ry[j])) if near else \
            min(x, y, size - 1 - x, size - 1 - y)
        rows.append((x, y, float(z[y, x]), float(rpk[j]) if near else float("nan"), edge))
    bad = out["aligned_mask"][0, 0] | out["reference_saturated"][0, 0]
    stars = []
    for x, y, pk in zip(rx.tolist(), ry.tolist(), rpk.tolist()):
        xi, yi = int(round(x)), int(round(y))
        if 3 <= xi < size - 3 and 3 <= yi < size - 3 and not bool(bad[yi - 3:yi + 4, xi - 3:xi + 4].any()):
            stars.append((pk, float(z[yi - 3:yi + 4, xi - 3:xi + 4].nan_to_num(0).abs().max()),
                          min(x, y, size - 1 - x, size - 1 - y)))
    zk = z[keep].numpy()
    unmasked = ~out["difference_mask"][0, 0] & torch.isfinite(z)
    stats = {"pixels": zk.size, "robust std": robust_std(zk), "peaks": len(rows),
             "unmasked |z|>5": int(((z.abs() > 5) & unmasked).sum()), "candidates": len(out["candidates"]),
             "expected": zk.size * 0.5 * math.erfc(5 / math.sqrt(2))}
    return stats, rows, np.array(stars)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--seeds", type=int, nargs="+", default=[7, 8])
    p.add_argument("--interpolations", nargs="+", default=["bilinear", "lanczos3"])
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides, e.g. the difference mask "
                   "before issue 19: pipeline.stages.difference_mask.reads.b='reference_saturated?'")
    args = p.parse_args()
    lines = ["# 5-sigma peaks on differences without transients: what they are (issue 19, item 1)", "",
             f"Command: `python experiments/subtract_false_peaks.py --size {args.size} --seeds "
             f"{' '.join(map(str, args.seeds))}{' --override ' + ' '.join(args.override) if args.override else ''}`; git {git_rev()}; {machine()} (machine shared with other jobs).", "",
             "Default pipeline (configs gwac), simulated TAN-SIP pairs without transients, shift (3.3, -2.7) px, "
             "rotation 0.05 deg; alignment interpolation as given.", "",
             "## Peaks", "", "| interpolation | seed | robust std | 5-sigma peaks | Gaussian expectation (pixels) | "
             "peaks (x, y, z, nearest star's peak ADU, its edge distance px) | pixels with abs z > 5 outside difference_mask "
             "(whole frame) | candidates |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    star_lines = ["", "## Largest |z| within 3 px of each unsaturated star", "",
                  "| interpolation | star peak (ADU) | edge distance | stars | median max abs z | fraction > 5 |",
                  "| --- | --- | --- | --- | --- | --- |"]
    for interp in args.interpolations:
        all_stars = []
        for seed in args.seeds:
            pair, out = run_pipeline(args.size, seed, interp, args.override)
            stats, rows, stars = attribute(pair, out, args.size)
            all_stars.append(stars)
            desc = "; ".join(f"({x}, {y}, {zz:.1f}, {pk:.0f}, {e:.0f})" for x, y, zz, pk, e in rows) or "-"
            lines.append(f"| {interp} | {seed} | {stats['robust std']:.3f} | {stats['peaks']} | {stats['expected']:.2f} | {desc} | "
                         f"{stats['unmasked |z|>5']} | {stats['candidates']} |")
            print(lines[-1], flush=True)
        s = np.concatenate(all_stars)
        for lo, hi in ((0, 3000), (3000, 10000), (10000, math.inf)):
            for elo, ehi, en in ((0, 64, "< 64"), (64, math.inf, ">= 64")):
                m = (s[:, 0] >= lo) & (s[:, 0] < hi) & (s[:, 2] >= elo) & (s[:, 2] < ehi)
                if m.any():
                    star_lines.append(f"| {interp} | {lo:g}-{hi:g} | {en} | {int(m.sum())} | {np.median(s[m, 1]):.2f} | "
                                      f"{(s[m, 1] > 5).mean():.3f} |")
    text = "\n".join(lines + star_lines) + "\n"
    print(text)
    write_result("subtract_false_peaks" + ("_override" if args.override else ""), text)


if __name__ == "__main__":
    main()
