"""Linking movers across a simulated night: completeness, purity, false tracklets, rate/PA errors, time.

Two levels, at 1"/px and at GWAC's 11.7"/px, 5 frames 5-10 min apart, 100 movers per field with rates
log-uniform over 0.1-30"/min:

* catalog level, full size (4096^2, 20,000 stars): ``sim.simulate_night(render=False)`` gives the
  truth and ``sim.simulate_detections`` a detection catalog from it (every source with measured
  S/N >= 5: all stationary stars, the movers as trails with realistic position, magnitude and
  shape scatter, transients, hot pixels at fixed detector pixels, 100 spurious detections per frame);
* image level, smaller field (2048^2, 5,000 stars: the same star density): frames rendered by
  ``simulate_night``, background by ``background_2d``, detection by ``SourceExtractor`` on each
  frame (no template: the linker drops what is stationary; saturated detections, FLAGS 4, are
  dropped), shapes to the sky with the frame's WCS.

Findable: an object with at least ``min_detections`` detections (S/N >= 5) that lie farther than the
linker's stationarity tolerance from all its other detections, i.e. it moves more than the position
tolerance between any two of its exposures (slow movers at 11.7"/px do not: they cannot be told from
stars within a night). The looser count (motion between first and last detection above the tolerance)
is reported too. Correctly linked: a tracklet whose detections all belong to that object.

Usage: python experiments/moving_linking.py [--fields 3] [--quick]
Writes experiments/results/moving_linking.md.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import git_rev, machine, write_result  # noqa: E402

from astroprep_torch import sim  # noqa: E402
from astroprep_torch.moving import link_tracklets, shape_on_sky  # noqa: E402

MIN_DET = 3
#: Linker settings per pixel scale (arcsec/px): the tolerance floor ~ 0.2-0.5 px of astrometric noise.
LINKER = {1.0: dict(tolerance_floor=0.5), 11.7: dict(tolerance_floor=2.0)}
DECADES = [(0.1, 1.0), (1.0, 10.0), (10.0, 30.0)]
COLUMNS = ("mag", "pos_err", "a", "b", "theta", "exptime", "x", "y")


def _tol(si, sj, floor, n_sigma=4.0):
    """The linker's pair tolerance (arcsec) for per-axis errors ``si, sj``."""
    lo = floor / (n_sigma * math.sqrt(2.0))
    return max(floor, n_sigma * math.hypot(max(si, lo), max(sj, lo)))


def findable(d: dict, n_movers: int, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """(strict, loose) findability per mover (see the module docstring)."""
    obj, exp = d["object"].numpy(), d["exposure"].numpy()
    xyz = np.stack([np.cos(np.radians(d["dec"].numpy())) * np.cos(np.radians(d["ra"].numpy())),
                    np.cos(np.radians(d["dec"].numpy())) * np.sin(np.radians(d["ra"].numpy())),
                    np.sin(np.radians(d["dec"].numpy()))], 1)
    err = d["pos_err"].numpy()
    strict = np.zeros(n_movers, bool)
    loose = np.zeros(n_movers, bool)
    for m in range(n_movers):
        idx = np.nonzero(obj == m)[0]
        if np.unique(exp[idx]).size < MIN_DET:
            continue
        sep = np.degrees(np.linalg.norm(xyz[idx, None] - xyz[None, idx], axis=-1)) * 3600.0
        tol = np.array([[_tol(err[i], err[j], floor) for j in idx] for i in idx])
        other = exp[idx, None] != exp[None, idx]
        alone = ~((sep <= tol) & other).any(1)
        strict[m] = np.unique(exp[idx][alone]).size >= MIN_DET  # pieces of a split trail count once
        first, last = np.argmin(d["mjd"].numpy()[idx]), np.argmax(d["mjd"].numpy()[idx])
        loose[m] = sep[first, last] > tol[first, last]
    return strict, loose


def score(d: dict, tr, movers: dict, floor: float) -> dict:
    """Completeness, purity, false tracklets and rate/PA errors of one field."""
    n_movers = movers["rate"].numel()
    obj, lab = d["object"].numpy(), tr.labels.numpy()
    strict, loose = findable(d, n_movers, floor)
    correct = np.zeros(n_movers, bool)
    rate_err, pa_err, n_pure = [], [], 0
    for k in range(len(tr)):
        o = np.unique(obj[lab == k])
        if o.size == 1 and o[0] >= 0:
            n_pure += 1
            m = int(o[0])
            correct[m] = True
            rate_err.append(abs(float(tr.rate[k]) / float(movers["rate"][m]) - 1.0))
            pa_err.append(abs((float(tr.pa[k]) - float(movers["pa"][m]) + 180.0) % 360.0 - 180.0))
    rate = movers["rate"].numpy()
    out = {"n_det": int(obj.size), "n_tracklets": len(tr), "pure": n_pure, "false": len(tr) - n_pure,
           "findable": int(strict.sum()), "found": int((correct & strict).sum()),
           "findable_loose": int(loose.sum()), "found_loose": int((correct & loose).sum()),
           "linked_not_findable": int((correct & ~strict).sum()), "rate_err": rate_err, "pa_err": pa_err,
           "stationary": int(tr.stationary.sum())}
    for lo, hi in DECADES:
        sel = strict & (rate >= lo) & (rate <= hi)
        out[f"findable_{lo:g}"] = int(sel.sum())
        out[f"found_{lo:g}"] = int((correct & sel).sum())
    return out


def link(d: dict, scale: float):
    return link_tracklets(d["ra"], d["dec"], d["mjd"], **{k: d[k] for k in COLUMNS}, min_detections=MIN_DET,
                          **LINKER[scale])


def catalog_field(scale: float, seed: int, shape, n_stars: int) -> tuple[dict, dict]:
    t0 = time.perf_counter()
    night = sim.simulate_night(shape, n_stars=n_stars, pixel_scale=scale, n_movers=100, seed=seed, render=False)
    t1 = time.perf_counter()
    d = sim.simulate_detections(night, n_spurious=100, seed=seed + 1000)
    t2 = time.perf_counter()
    tr = link(d, scale)
    t3 = time.perf_counter()
    times = [t3 - t2]
    for _ in range(2):
        t = time.perf_counter()
        link(d, scale)
        times.append(time.perf_counter() - t)
    res = score(d, tr, night.movers, LINKER[scale]["tolerance_floor"])
    res.update(t_truth=t1 - t0, t_catalog=t2 - t1, t_link=statistics.median(times),
               t_stationary=tr.timings["stationary"], t_pairs=tr.timings["link"])
    return res, d


def detect_frames(night, scale: float) -> dict:
    """SourceExtractor on every frame (background_2d), S/N >= 5, positions and shapes on the sky."""
    from astroprep_torch.background import background_2d
    from astroprep_torch.detect import SourceExtractor

    cols = {k: [] for k in ("ra", "dec", "mjd", "mag", "pos_err", "a", "b", "theta", "exptime", "x", "y",
                            "exposure", "snr")}
    for k, f in enumerate(night.frames):
        bg = background_2d(f.image, f.mask)
        se = SourceExtractor(thresh=3.0, minarea=5, saturation=float(f.header["SATURATE"]))
        cat = se(f.image - bg.background, bg.rms, background=bg.background)
        snr = cat.flux_auto / cat.fluxerr_auto.clamp(min=1e-12)
        # Saturated detections (FLAGS 4: bright stars, their deblended pieces) have no usable centroid.
        keep = (snr >= 5.0) & (cat.flux_auto > 0) & ((cat.flags.long() & 4) == 0)
        x, y = cat.x[keep].double(), cat.y[keep].double()
        wcs = f.wcs
        ra, dec = wcs.pixel_to_world(x, y)
        a, b, pa = shape_on_sky(wcs, x, y, cat.a[keep], cat.b[keep], cat.theta[keep])
        n = x.numel()
        err = torch.sqrt(torch.maximum(cat.errx2[keep], cat.erry2[keep]).double()) * scale
        for name, v in (("ra", ra), ("dec", dec), ("mjd", torch.full((n,), float(night.mjd[k]), dtype=torch.float64)),
                        ("mag", 25.0 - 2.5 * torch.log10(cat.flux_auto[keep].double())), ("pos_err", err),
                        ("a", a), ("b", b), ("theta", pa), ("exptime", torch.full((n,), night.exptime)),
                        ("x", x), ("y", y), ("exposure", torch.full((n,), k)), ("snr", snr[keep].double())):
            cols[name].append(v.reshape(-1).double() if name != "exposure" else v)
    return {k: torch.cat(v) for k, v in cols.items()}


def match_truth(d: dict, night) -> torch.Tensor:
    """Object id of each detection: the nearest mover whose mid-exposure position lies within 1.5 px
    + half its trail and that is not 1.5 mag fainter than the detection (a star blended with the
    trail is not the mover; the pieces of a trail split by deblending all are)."""
    obj = torch.full((d["x"].numel(),), -1, dtype=torch.long)
    mv = night.movers
    for k in range(len(night.frames)):
        sel = torch.nonzero(d["exposure"] == k).flatten()
        dist = torch.hypot(d["x"][sel, None] - mv["x"][None, :, k], d["y"][sel, None] - mv["y"][None, :, k])
        ok = (dist <= (1.5 + 0.5 * mv["trail"][:, k])[None, :]) & (d["mag"][sel, None] >= mv["mag"][None, :] - 1.5)
        dist = torch.where(ok, dist, torch.full_like(dist, float("inf")))
        best, j = dist.min(1)
        found = torch.isfinite(best)
        obj[sel[found]] = j[found]
    return obj


def image_field(scale: float, seed: int, shape, n_stars: int) -> dict:
    t0 = time.perf_counter()
    night = sim.simulate_night(shape, n_stars=n_stars, pixel_scale=scale, n_movers=100, seed=seed)
    t1 = time.perf_counter()
    d = detect_frames(night, scale)
    t2 = time.perf_counter()
    d["object"] = match_truth(d, night)
    tr = link(d, scale)
    t3 = time.perf_counter()
    res = score(d, tr, night.movers, LINKER[scale]["tolerance_floor"])
    res.update(t_truth=t1 - t0, t_catalog=t2 - t1, t_link=t3 - t2, t_stationary=tr.timings["stationary"],
               t_pairs=tr.timings["link"])
    return res


def summarise(rows: list[dict]) -> dict:
    tot = {k: sum(r[k] for r in rows) for k in rows[0] if not isinstance(rows[0][k], list)}
    tot["rate_err"] = [v for r in rows for v in r["rate_err"]]
    tot["pa_err"] = [v for r in rows for v in r["pa_err"]]
    tot["fields"] = len(rows)
    for k in ("t_truth", "t_catalog", "t_link", "t_stationary", "t_pairs"):
        tot[k] = statistics.median(r[k] for r in rows)
    return tot


def pct(a: int, b: int) -> str:
    return f"{100.0 * a / b:.1f}% ({a}/{b})" if b else "n/a (0)"


def table(title: str, results: dict) -> list[str]:
    lines = [f"### {title}", "",
             "| scale | fields | detections/field | findable | completeness | " +
             " | ".join(f"{lo:g}-{hi:g}\"/min" for lo, hi in DECADES) +
             " | loose findable: completeness | purity | false/field | median rate err | median PA err | "
             "linked, not findable | t truth (s) | t catalog (s) | t link (s) | of which stationary / linking (s) |",
             "|---" * (18) + "|"]
    for scale, t in results.items():
        dec = " | ".join(pct(t[f"found_{lo:g}"], t[f"findable_{lo:g}"]) for lo, _ in DECADES)
        rate = 100 * statistics.median(t["rate_err"]) if t["rate_err"] else float("nan")
        pa = statistics.median(t["pa_err"]) if t["pa_err"] else float("nan")
        lines.append(
            f"| {scale}\"/px | {t['fields']} | {t['n_det'] / t['fields']:.0f} | {t['findable']} | "
            f"{pct(t['found'], t['findable'])} | {dec} | {pct(t['found_loose'], t['findable_loose'])} | "
            f"{pct(t['pure'], t['n_tracklets'])} | {t['false'] / t['fields']:.2f} | {rate:.2f}% | {pa:.2f} deg | "
            f"{t['linked_not_findable']} | {t['t_truth']:.2f} | {t['t_catalog']:.2f} | {t['t_link']:.2f} | "
            f"{t['t_stationary']:.2f} / {t['t_pairs']:.2f} |")
    return lines + [""]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fields", type=int, default=3, help="catalog-level fields per pixel scale")
    ap.add_argument("--image-fields", type=int, default=2, help="image-level fields per pixel scale")
    ap.add_argument("--quick", action="store_true", help="small fields (a smoke run, not the evidence)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    big, small = ((1024, 1024), 1250), ((512, 512), 312)
    if not args.quick:
        big, small = ((4096, 4096), 20000), ((2048, 2048), 5000)
    cat_res, img_res, speed = {}, {}, []
    for scale in (1.0, 11.7):
        rows = []
        for i in range(args.fields):
            r, d = catalog_field(scale, 100 + i, *big)
            rows.append(r)
            print(f"catalog {scale}\"/px field {i}: {r['found']}/{r['findable']} found, {r['false']} false, "
                  f"{r['n_det']} detections, link {r['t_link']:.2f} s", flush=True)
            if scale == 1.0:
                speed.append((r["n_det"], r["t_link"]))
        cat_res[scale] = summarise(rows)
        rows = []
        for i in range(args.image_fields):
            r = image_field(scale, 200 + i, *small)
            rows.append(r)
            print(f"image {scale}\"/px field {i}: {r['found']}/{r['findable']} found, {r['false']} false, "
                  f"{r['n_det']} detections", flush=True)
        img_res[scale] = summarise(rows)
    lines = ["# Moving-object linking on simulated nights", "", machine() + " (shared machine: times are noisy)",
             f"git {git_rev()}; command: `python experiments/moving_linking.py"
             f"{' --quick' if args.quick else ''} --fields {args.fields} --image-fields {args.image_fields}`", "",
             __doc__.split("Usage:")[0].split("\n", 1)[1].strip(), "",
             f"Linker: `link_tracklets(..., min_detections={MIN_DET})` with the defaults of "
             "configs/moving/default.yaml except `tolerance_floor` = 0.5\" at 1\"/px and 2\" at 11.7\"/px; "
             "positional errors, magnitudes, shapes (a, b, theta on the sky), exposure time and native "
             "pixel positions are passed.", "",
             f"Linking speed at 1\"/px: {', '.join(f'{n} detections in {t:.2f} s' for n, t in speed)} (5 exposures; "
             f"each the median of 3 runs; median {statistics.median(t for _, t in speed):.2f} s).", ""]
    lines += table(f"Catalog level: {big[0][0]}x{big[0][1]} px, {big[1]} stars", cat_res)
    lines += table(f"Image level: {small[0][0]}x{small[0][1]} px, {small[1]} stars, SourceExtractor per frame",
                   img_res)
    lines += ["t truth: simulate_night (images rendered at image level only); t catalog: simulate_detections or "
              "background + SourceExtractor on 5 frames; t link: link_tracklets. Rate error relative, PA error "
              "absolute, over correctly linked objects."]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        write_result("moving_linking", text)


if __name__ == "__main__":
    main()
