"""Astrometry before alignment in ``astroprep run`` (issue #25): a frame whose header WCS is rough.

A simulated GWAC-like pair (11.7"/px, TAN-SIP truth) whose science header is perturbed: pointing off by
3' x 2', rotated by 0.5 deg, scaled by 1% and its SIP removed. Runs of ``astroprep run``'s machinery
(``run_from_config``) on the same files: (a) the exact header, (b) the perturbed header as it is,
(c) the perturbed header with ``astrometry.catalog=<stars through the true WCS>``. Per run: the science
products' WCS against the truth over the frame (truth sky -> product pixel vs the grid pixel; worst
and rms, px), the injected transients recovered among the candidates (within 2 px), the candidates,
and the astrometric residual rms the step writes (``ASTRRMS``, arcsec).

Run: ``python experiments/astrometry_step.py [--size 512]`` (writes experiments/results/astrometry_step.md).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from astropy.io import fits
from astropy.table import Table
from astropy.wcs import WCS
from hydra import compose, initialize_config_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_rev, machine, write_result  # noqa: E402

from astroprep_torch.pipeline import _truth_summary, read_manifest, run_from_config  # noqa: E402
from astroprep_torch.sim import simulate_pair, write_simulated_pair  # noqa: E402

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def perturb(path: Path) -> None:
    """Pointing 3' x 2' off, 0.5 deg rotation, 1% scale, SIP removed."""
    with fits.open(path, mode="update") as hdul:
        h = hdul[0].header
        h["CRVAL1"] += 3 / 60 / math.cos(math.radians(h["CRVAL2"]))
        h["CRVAL2"] += 2 / 60
        c, s = math.cos(math.radians(0.5)), math.sin(math.radians(0.5))
        cd = 1.01 * np.array([[h["CD1_1"], h["CD1_2"]], [h["CD2_1"], h["CD2_2"]]]) @ np.array([[c, -s], [s, c]])
        h["CD1_1"], h["CD1_2"], h["CD2_1"], h["CD2_2"] = cd.ravel()
        for k in [k for k in h if k.split("_")[0] in ("A", "B", "AP", "BP")]:
            del h[k]
        h["CTYPE1"], h["CTYPE2"] = "RA---TAN", "DEC--TAN"


def wcs_error(true: WCS, header, n: int) -> tuple[float, float]:
    yy, xx = np.mgrid[0:n:n // 32, 0:n:n // 32]
    ra, dec = true.all_pix2world(xx.ravel(), yy.ravel(), 0)
    x, y = WCS(header).all_world2pix(ra, dec, 0)
    d = np.hypot(x - xx.ravel(), y - yy.ravel())
    return float(d.max()), float(np.sqrt((d ** 2).mean()))


def run(paths: dict, out: Path, catalog=None) -> float:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=[
            f"input={paths['science']}", f"reference={paths['reference']}", f"output={out}", "quicklook=false",
            "async_write=false", "trainer.enable_progress_bar=false", "data.num_workers=0",
            f"astrometry.catalog={catalog or 'null'}"])
    t0 = time.perf_counter()
    run_from_config(cfg)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--stars", type=int, default=1200)
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        pair = simulate_pair((args.size, args.size), n_stars=args.stars, n_transients=10, n_moving=0, sip=True, seed=11)
        exact = write_simulated_pair(pair, tmp / "exact")
        rough = write_simulated_pair(pair, tmp / "rough")
        true = WCS(fits.getheader(exact["science"]))
        stars = Table.read(exact["science_truth"])
        stars = stars[stars["kind"] == 0]
        ra, dec = true.all_pix2world(stars["x"], stars["y"], 0)
        Table({"ra": ra, "dec": dec, "mag": 25 - 2.5 * np.log10(np.clip(stars["flux"], 1, None))}).write(tmp / "stars.ecsv")
        perturb(rough["science"])
        t = Table.read(exact["transients_truth"])
        truth = {k: torch.as_tensor(np.asarray(t[k])) for k in ("x_ref", "y_ref")}
        for label, paths, catalog in (("exact header", exact, None), ("perturbed header, no astrometry", rough, None),
                                      ("perturbed header, astrometry.catalog=stars", rough, tmp / "stars.ecsv")):
            out = tmp / f"out{len(rows)}"
            secs = run(paths, out, catalog)
            summary = _truth_summary(list(read_manifest(out).values()), out, truth)
            header = fits.getheader(out / "science.bkg.fits")
            worst, rms = wcs_error(true, header, args.size)
            rows.append((label, worst, rms, summary.get("transients_recovered"), summary.get("transients_injected"),
                         summary.get("candidates"), header.get("ASTRRMS"), header.get("ASTRNMAT"), secs))
            print(rows[-1], flush=True)
    lines = [f"# Astrometry before alignment in `astroprep run` ({args.size} x {args.size}, {args.stars} stars)", "",
             f"Command: `python experiments/astrometry_step.py --size {args.size} --stars {args.stars}` (git {git_rev()})",
             "", machine() + " (the machine was shared with other jobs: the seconds are indicative only).", "",
             "Science header perturbed: pointing 3' x 2' off, rotated 0.5 deg, scaled 1%, SIP removed (truth: TAN-SIP, "
             "11.7\"/px). WCS error: the science products' header WCS against the truth over the frame (px).", "",
             "| run | WCS error worst (px) | WCS error rms (px) | transients recovered | candidates | ASTRRMS (arcsec) "
             "| pairs | run seconds |", "|---|---|---|---|---|---|---|---|"]
    for label, worst, rms, rec, inj, cand, astr, nmat, secs in rows:
        astr_s = f"{astr:.3f}" if astr is not None else "-"
        lines.append(f"| {label} | {worst:.3f} | {rms:.3f} | {rec} / {inj} | {cand} | {astr_s} | {nmat or '-'} | {secs:.1f} |")
    path = write_result("astrometry_step", "\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"-> {path}")


if __name__ == "__main__":
    main()
