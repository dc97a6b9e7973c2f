"""A small synthetic ``astroprep night`` output folder, written exactly as the night contract says.

For the web application's tests and speed script (no pipeline run needed): ``night.json``,
``manifest.rank0.jsonl``, per frame ``<frame>.candidates.ecsv`` + ``<frame>.triplets.pt``,
``tracklets.ecsv`` (one row per linked detection, the contract's columns), ``report.obs80.txt``,
``report.ades.psv``, ``sequences/<trksub>.gif`` + ``.pt`` and ``cutouts/<trksub>_<k>.fits``.
Images are Gaussian blobs on noise; nothing here is astrometrically meaningful beyond being
self-consistent (RA/Dec move linearly at each object's rate and PA).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

OBSERVATORY = "X05"


def obs80_line(trksub: str, mjd: float, ra: float, dec: float, mag: float, code: str = OBSERVATORY,
               band: str = "G") -> str:
    """One 80-column MPC optical line (provisional/temporary designation in columns 6-12)."""
    from astropy.coordinates import Angle
    from astropy.time import Time

    t = Time(mjd, format="mjd", scale="utc")
    y, m, d = t.datetime.year, t.datetime.month, t.datetime.day
    frac = mjd - np.floor(mjd)
    date = f"{y:04d} {m:02d} {d + frac:08.5f}"
    ra_s = Angle(ra, "deg").to_string(unit="hourangle", sep=" ", precision=2, pad=True)
    dec_s = Angle(dec, "deg").to_string(unit="deg", sep=" ", precision=1, pad=True, alwayssign=True)
    line = f"     {trksub:<7}  C{date} {ra_s:<12}{dec_s:<12}         {mag:4.1f} {band}      {code}"
    return line[:80].ljust(80)


def _blob(size: int, amp: float, rng: np.random.Generator, sigma: float = 1.8) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    return (amp * np.exp(-(xx**2 + yy**2) / (2 * sigma**2)) + rng.normal(0, 1, (size, size))).astype(np.float32)


def _write_candidates(root: Path, frame: str, n: int, rng: np.random.Generator, size: int = 63,
                      scores: bool = False) -> None:
    from astropy.table import Table

    x = rng.uniform(50, 4000, n)
    y = rng.uniform(50, 4000, n)
    flux = rng.uniform(200, 5000, n)
    t = Table({"NUMBER": np.arange(1, n + 1), "X_IMAGE": x + 1, "Y_IMAGE": y + 1, "FLUX_AUTO": flux,
               "FLUXERR_AUTO": np.sqrt(flux) + 10, "FLAGS": np.zeros(n, int)})
    if scores:
        t["score"] = rng.uniform(0, 1, n)
    t.write(root / f"{frame}.candidates.ecsv", format="ascii.ecsv", overwrite=True)
    amp = torch.from_numpy(rng.uniform(5, 60, (n, 3, 1, 1)).astype(np.float32))
    g = torch.linspace(-(size - 1) / 2, (size - 1) / 2, size)
    blob = torch.exp(-(g[None, :] ** 2 + g[:, None] ** 2) / (2 * 1.8**2))
    trip = amp * blob + torch.from_numpy(rng.normal(0, 1, (n, 3, size, size)).astype(np.float32))
    trip[:, 1] *= torch.from_numpy((rng.uniform(size=n) < 0.5).astype(np.float32))[:, None, None]
    torch.save(trip.contiguous(), root / f"{frame}.triplets.pt")


def _tracklet_rows(n_objects: int, frames: list[dict], rng: np.random.Generator,
                   per_object: int | None = None) -> list[dict]:
    rows = []
    for k in range(n_objects):
        first = int(rng.integers(0, len(frames) - per_object + 1)) if per_object else 0
        seen = frames[first: first + per_object] if per_object else frames
        trk = f"AP{k + 1:05d}"
        ra0, dec0 = rng.uniform(30, 31), rng.uniform(10, 11)
        rate, pa = rng.uniform(0.1, 2.0), rng.uniform(0, 360)  # arcsec/min, deg
        x0, y0, mag = rng.uniform(200, 3800), rng.uniform(200, 3800), rng.uniform(15, 19)
        for fr in seen:
            e = frames.index(fr)
            dt_min = (fr["mjd"] - frames[0]["mjd"]) * 1440
            d = rate * dt_min / 3600
            ra = ra0 + d * np.sin(np.radians(pa)) / np.cos(np.radians(dec0))
            dec = dec0 + d * np.cos(np.radians(pa))
            m = mag + rng.normal(0, 0.05)
            rows.append({"trksub": trk, "tracklet": k, "frame": fr["name"], "exposure": e, "mjd": fr["mjd"],
                         "ra": ra, "dec": dec, "x": x0 - d * 3600 / 13.0 * np.sin(np.radians(pa)),
                         "y": y0 + d * 3600 / 13.0 * np.cos(np.radians(pa)), "mag": m, "mag_err": 0.05,
                         "snr": 20.0, "e": rng.uniform(0, 0.3), "fwhm": rng.uniform(20, 30),
                         "theta": rng.uniform(-90, 90), "rate": rate, "pa": pa, "rms": 0.8,
                         "obs80": obs80_line(trk, fr["mjd"], ra, dec, m)})
    return rows


def _write_sequences(root: Path, trk: str, rows: list[dict], rng: np.random.Generator, size: int = 31) -> None:
    from astropy.io import fits
    from PIL import Image

    n = len(rows)
    sci = torch.from_numpy(np.stack([_blob(size, 40, rng) for _ in range(n)])[:, None])
    diff = torch.from_numpy(np.stack([_blob(size, 30, rng) for _ in range(n)])[:, None])
    (root / "sequences").mkdir(exist_ok=True)
    torch.save({"science": sci, "difference": diff, "mjd": torch.tensor([r["mjd"] for r in rows], dtype=torch.float64),
                "frame": [r["frame"] for r in rows]}, root / "sequences" / f"{trk}.pt")
    u8 = np.concatenate([sci[:, 0].numpy(), diff[:, 0].numpy()], axis=2)
    u8 = np.clip((u8 + 3) / 50 * 255, 0, 255).astype(np.uint8)
    imgs = [Image.fromarray(a) for a in u8]
    imgs[0].save(root / "sequences" / f"{trk}.gif", save_all=True, append_images=imgs[1:], duration=400, loop=0)
    (root / "cutouts").mkdir(exist_ok=True)
    for k, r in enumerate(rows):
        h = fits.Header({"TRKSUB": trk, "FRAME": r["frame"], "MJD": r["mjd"], "RA": r["ra"], "DEC": r["dec"],
                         "LABEL": "undefined"})
        fits.writeto(root / "cutouts" / f"{trk}_{k}.fits", _blob(200, 40, rng, 2.5), h, overwrite=True)


def _write_reports(root: Path, rows: list[dict]) -> None:
    lines = [f"COD {OBSERVATORY}", "ACK astroprep synthetic night"] + [r["obs80"] for r in rows]
    (root / "report.obs80.txt").write_text("\n".join(lines) + "\n")
    psv = ["# version=2022", "# observatory", f"! mpcCode {OBSERVATORY}",
           "trkSub |mode|stn |obsTime                 |ra         |dec        |mag  |band"]
    from astropy.time import Time

    for r in rows:
        t = Time(r["mjd"], format="mjd", scale="utc").isot[:23] + "Z"
        psv.append(f"{r['trksub']}| CCD|{OBSERVATORY} |{t}|{r['ra']:11.6f}|{r['dec']:+11.6f}|{r['mag']:5.2f}|   G")
    (root / "report.ades.psv").write_text("\n".join(psv) + "\n")


def write_synthetic_night(root, *, n_frames: int = 5, n_objects: int = 4, n_candidates: int = 6,
                          seed: int = 0, sequences: bool = True, detections_per_object: int | None = None,
                          scores: bool = False) -> Path:
    """Write a synthetic night output folder under ``root`` following the night contract; returns it.

    Each object is seen on ``detections_per_object`` consecutive frames (all frames when None);
    ``scores`` adds a ``score`` column (uniform random) to the candidate tables."""
    from astropy.table import Table

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    frames = [{"name": f"frame{i:03d}", "path": f"/data/raw/frame{i:03d}.fits", "mjd": 61000.6 + i * 5 / 1440,
               "exptime": 15.0, "status": "ok", "reason": None} for i in range(n_frames)]
    man = []
    for fr in frames:
        _write_candidates(root, fr["name"], n_candidates, rng, scores=scores)
        man.append(json.dumps({"name": fr["name"], "path": fr["path"], "status": "ok", "reason": "",
                               "outputs": [f"{fr['name']}.candidates.ecsv", f"{fr['name']}.triplets.pt"]}))
    (root / "manifest.rank0.jsonl").write_text("\n".join(man) + "\n")
    rows = _tracklet_rows(n_objects, frames, rng, detections_per_object)
    if rows:
        Table(rows=[[r[c] for c in rows[0]] for r in rows], names=list(rows[0])).write(
            root / "tracklets.ecsv", format="ascii.ecsv", overwrite=True)
    if sequences:
        for k in range(n_objects):
            _write_sequences(root, f"AP{k + 1:05d}", [r for r in rows if r["tracklet"] == k], rng)
    _write_reports(root, rows)
    night = {"kind": "night", "version": 1, "frames": frames, "reference": frames[0]["name"], "template": "reference",
             "n_tracklets": n_objects, "n_linked": len(rows), "observatory": {"code": OBSERVATORY, "name": "synthetic", "astCat": "Gaia3",
                                                             "submitter": "A. Tester", "observers": ["A. Tester"],
                                                             "measurers": ["A. Tester"],
                                                             "telescope": {"design": "reflector", "aperture": 0.6,
                                                                           "detector": "CCD"}},
             "timings": {"total": 0.0}}
    (root / "night.json").write_text(json.dumps(night, indent=1))
    return root
