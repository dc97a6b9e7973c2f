"""`astroprep night` without a deep reference: which way finds the movers? Measured on simulated nights.

Three ways, the same simulated night (5 frames 5-10 min apart, movers with rates log-uniform over
0.1-30"/min, cosmic rays, hot pixels, transients), the whole command each time (per-frame graph,
detections, linking, reports, sequences):

* ``night`` (the default without ``reference=``): the median of the night's frames reprojected onto
  the sharpest one is the template; detections on each difference image;
* ``science``: the same run's own catalog of every frame (no subtraction needed); the linker drops
  what is stationary;
* ``reference``: a deep reference without movers (a simulated frame of the same stars with the noise
  of a 4-frame stack), detections on the difference images: the usual case with a template.

Findable: a mover in the field with expected S/N >= 5 in at least 3 frames (and, in the "moved"
column, moving at least 2 px between the first and last of them). Correctly linked: a tracklet whose
detections all match that mover (within 2" or 1 px); purity: such tracklets / all tracklets.

Usage: python experiments/night_template.py [--size 1024] [--movers 30] [--scales 1.0 11.7]
Writes experiments/results/night_template.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _common import git_rev, machine, write_result  # noqa: E402

from astropy.table import Table  # noqa: E402

from astroprep_torch import night as N  # noqa: E402
from astroprep_torch.io import write_fits  # noqa: E402
from astroprep_torch.sim import simulate_night  # noqa: E402

DECADES = [(0.1, 1.0), (1.0, 10.0), (10.0, 30.0)]


def simulate(work: Path, size: int, movers: int, scale: float, seed: int) -> dict:
    kw = dict(shape=(size, size), n_frames=5, pixel_scale=scale, n_stars=int(5000 * (size / 2048) ** 2),
              n_movers=movers, rate_range=(0.1, 30.0), exptime=30.0, seed=seed)
    paths = N.write_simulated_night(simulate_night(**kw), work / "frames")
    # a deep reference: the same stars, no movers, the noise of a stack of 4 frames (sky / 4, read noise / 2)
    ref = simulate_night(**dict(kw, n_frames=1, n_movers=0, n_transients=0, n_cosmics=0, n_hot_pixels=0,
                                sky=250.0, read_noise=5.0))
    write_fits(work / "reference.fits", ref.frames[0].image, header=ref.frames[0].header, overwrite=True)
    return paths


def run(work: Path, name: str, *overrides) -> tuple:
    from test_night import _night_cfg

    out = work / name
    t0 = time.perf_counter()
    doc = N.run_night(_night_cfg([f"input={work / 'frames'}", f"output={out}", "trainer.enable_progress_bar=false",
                                  "data.num_workers=0", *overrides]))
    return doc, time.perf_counter() - t0, Table.read(out / "tracklets.ecsv")


def decades(score: dict, truth: Table) -> list:
    rate = {int(o): float(r) for o, r in zip(truth["object"], truth["rate"])}
    out = []
    for lo, hi in DECADES:
        f = [o for o in score["findable_ids"] if lo <= rate[o] < hi]
        g = [o for o in score["found_ids"] if lo <= rate[o] < hi]
        out.append(f"{len(g)}/{len(f)}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--movers", type=int, default=30)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 11.7])
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--work", default="/tmp/night_template")
    ap.add_argument("--ways", nargs="+", default=["night", "science", "reference"])
    a = ap.parse_args()
    lines = ["| pixel scale | way | findable | found | completeness | moved >= 2 px: found / findable | per rate decade 0.1-1 / 1-10 / 10-30 \"/min | "
             "tracklets | purity | false | rate err (median) | PA err (median, deg) | time (s) |", "|" + "---|" * 13]
    for scale in a.scales:
        work = Path(a.work) / f"scale{scale}"
        paths = simulate(work, a.size, a.movers, scale, a.seed)
        truth = Table.read(paths["truth"])
        ways = [("night", ("detections=difference",)), ("science", ("detections=science",)),
                ("reference", (f"reference={work / 'reference.fits'}", "detections=difference"))]
        for name, ov in [w for w in ways if w[0] in a.ways]:
            out_name = "night" if name == "science" else name  # science reuses the night run's products
            doc, secs, rows = run(work, out_name, *ov)
            match = max(2.0, scale)  # a detection matches a mover within 2" or 1 px
            s = N.score_tracklets(rows, truth, match_arcsec=match)
            moved = N.score_tracklets(rows, truth, match_arcsec=match, min_motion_arcsec=2.0 * scale)
            steps = ", ".join(f"{k} {v:.1f}" for k, v in doc["timings"].items())
            print(f'{scale}"/px {name}: {json.dumps({k: v for k, v in s.items() if not k.endswith("_ids")})} [{steps}]')
            lines.append(f"| {scale}\"/px | {name} | {s['findable']} | {s['found']} | {s['completeness']:.3f} | "
                         f"{moved['found']}/{moved['findable']} = {moved['completeness']:.3f} | "
                         f"{' / '.join(decades(s, truth))} | {s['tracklets']} | {s['purity']:.3f} | {s['false_tracklets']} | "
                         f"{s['median_rate_error']:.4f} | {s['median_pa_error_deg']:.3f} | {secs:.0f} ({steps}) |")
    text = "\n".join([
        "# `astroprep night` without a deep reference: median-of-the-night template vs science catalogs", "",
        f"Command: `python experiments/night_template.py --size {a.size} --movers {a.movers} --scales "
        f"{' '.join(str(s) for s in a.scales)} --seed {a.seed}` (commit {git_rev()}).",
        f"Machine: {machine()}; shared with other jobs, so the times are indicative only.", "",
        f"Simulated night: {a.size}^2 px, 5 frames 5-10 min apart, 30 s exposures, {a.movers} movers "
        "(0.1-30\"/min log-uniform), stars at the GWAC density, transients, cosmic rays, hot pixels. "
        "Findable = expected S/N >= 5 in >= 3 frames (and, in the 'moved' column, moving >= 2 px between "
        "the first and last of them: slower movers cannot be told from stars within a night). Times: the whole command (template, graph, "
        "linking, reports, sequences); `science` reuses the `night` run's per-frame products.", "",
        *lines, ""])
    print(text)
    print(write_result("night_template", text))


if __name__ == "__main__":
    main()
