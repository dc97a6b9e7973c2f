"""WCS parity: astroprep_torch.wcs.TanWCS against astropy.wcs on every real TAN / TAN-SIP / TPV header.

For each header a grid spanning the full image area (NAXIS1 x NAXIS2, corners included; the
detector size for headers whose data were stripped) is mapped

* pixel -> world: ours vs ``all_pix2world(origin=0)``, max |d| in degrees (ra * cos(dec) and dec),
* world -> pixel: ours on astropy's world coordinates vs the grid pixels and vs
  ``all_world2pix(origin=0, tolerance=1e-12)``, max |d| in px,

in float64 and float32. float32 rows: ``p2w`` is our float32 pixel->world vs the float64 truth
(limited by float32 itself: ulp(ra)/2 ~ 7.6e-6 deg at ra ~ 200); ``w2p`` takes the truth world
coordinates rounded to float32 and compares with astropy run (in float64) on those same rounded
values; ``p2p`` maps the grid through ``pixel_to_pixel`` to a second WCS (the same header shifted by
10% of the image size and rotated by 5 deg, what reprojection needs) vs astropy's float64 chain.

Run: ``python experiments/wcs_parity.py`` (writes experiments/results/wcs_parity.md).
"""

from __future__ import annotations

import math
import platform
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from astropy.io import fits  # noqa: E402
from astropy.wcs import WCS, FITSFixedWarning  # noqa: E402

from astroprep_torch.wcs import TanWCS  # noqa: E402

warnings.simplefilter("ignore", FITSFixedWarning)
torch.set_num_threads(2)

# (label, path, hdu, image shape (H, W) override when the header's NAXIS is not the image size)
CASES = [
    ("1904-66_TAN.hdr", "astropy_wcs_hdrs/1904-66_TAN.hdr", None, None),
    ("irac_sip.hdr", "astropy_wcs_hdrs/irac_sip.hdr", None, None),
    ("j94f05bgq_flt.fits[1]", "astropy_wcs_hdrs/j94f05bgq_flt.fits", 1, (2048, 4096)),
    ("j94f05bgq_flt.fits[4]", "astropy_wcs_hdrs/j94f05bgq_flt.fits", 4, (2048, 4096)),
    ("header_newlines.fits", "astropy_wcs_hdrs/header_newlines.fits", 0, (4096, 2048)),
    ("sip.fits", "astropy_wcs_hdrs/sip.fits", 0, (256, 256)),
    ("sip2.fits", "astropy_wcs_hdrs/sip2.fits", 0, (256, 256)),
    ("sip-broken.hdr", "astropy_wcs_hdrs/sip-broken.hdr", None, (2051, 4096)),
    ("siponly.hdr", "astropy_wcs_hdrs/siponly.hdr", None, None),
    ("tpvonly.hdr", "astropy_wcs_hdrs/tpvonly.hdr", None, None),
    ("m13.fits", "astropy_images/m13.fits", 0, None),
    ("m13_rot30.head", "swarp_refs/m13_rot30.head", None, None),
    ("decam_OBS04a_tan.head", "swarp_refs/decam_OBS04a_tan.head", None, None),
] + [(p.name.replace("input_data__", ""), f"sfft_decam_decorr/{p.name}", 0, None)
     for p in sorted((DATA / "sfft_decam_decorr").glob("*.mini.fits"))]


def load_header(rel: str, hdu):
    path = DATA / rel
    if hdu is None:
        text = path.read_bytes().decode("latin-1")
        return fits.Header.fromstring(text, sep="\n" if "\n" in text[:81] else "")
    with fits.open(path) as hl:
        return hl[hdu].header.copy()


def grid(shape, n=41):
    H, W = shape
    xs = np.linspace(-0.5, W - 0.5, n)
    ys = np.linspace(-0.5, H - 0.5, n)
    X, Y = np.meshgrid(xs, ys)
    return X.ravel(), Y.ravel()


def sky_sep_deg(ra1, dec1, ra2, dec2):
    dra = (ra1 - ra2 + 180.0) % 360.0 - 180.0
    return np.maximum(np.abs(dra * np.cos(np.radians(dec2))), np.abs(dec1 - dec2))


def perturbed(header, shape):
    """The same header with CRVAL moved by 10% of the image size and the CD matrix rotated by 5 deg."""
    h = header.copy()
    w = WCS(h)
    cd = w.wcs.cd if w.wcs.has_cd() else w.wcs.get_pc() * w.wcs.cdelt[:, None]
    shift = 0.1 * max(shape) * math.sqrt(abs(np.linalg.det(cd)))
    h["CRVAL1"] = h["CRVAL1"] + shift / max(math.cos(math.radians(h["CRVAL2"])), 1e-3)
    h["CRVAL2"] = h["CRVAL2"] - math.copysign(0.5 * shift, h["CRVAL2"])
    h.remove("LATPOLE", ignore_missing=True)
    c, s = math.cos(math.radians(5)), math.sin(math.radians(5))
    cd = np.array([[c, -s], [s, c]]) @ cd
    for k in [k for k in h if k.startswith(("PC", "CDELT", "CROTA"))]:
        del h[k]
    for i in range(2):
        for j in range(2):
            h[f"CD{i + 1}_{j + 1}"] = cd[i, j]
    return h


def measure(label, rel, hdu, shape):
    header = load_header(rel, hdu)
    aw = WCS(header)
    if shape is None:
        shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    x, y = grid(shape)
    ra_t, dec_t = aw.all_pix2world(x, y, 0)
    xw_t, yw_t = aw.all_world2pix(ra_t, dec_t, 0, tolerance=1e-12, maxiter=200, quiet=True)
    ours = TanWCS.from_header(header)
    row = {"header": label, "kind": ours.meta[0]["kind"], "shape": f"{shape[1]}x{shape[0]}"}
    for dt, name in ((torch.float64, "f64"), (torch.float32, "f32")):
        w = ours.to(dt)
        tx, ty = torch.tensor(x, dtype=dt), torch.tensor(y, dtype=dt)
        ra, dec = (a.double().numpy() for a in w.pixel_to_world(tx, ty))
        row[f"{name}_p2w_deg"] = sky_sep_deg(ra, dec, ra_t, dec_t).max()
        if dt == torch.float64:
            px, py = (a.numpy() for a in w.world_to_pixel(torch.tensor(ra_t), torch.tensor(dec_t)))
            row[f"{name}_w2p_px"] = max(np.abs(px - xw_t).max(), np.abs(py - yw_t).max())
            row[f"{name}_rt_px"] = max(np.abs(px - x).max(), np.abs(py - y).max())
        else:
            ra32, dec32 = ra_t.astype(np.float32), dec_t.astype(np.float32)
            xr, yr = aw.all_world2pix(ra32.astype(np.float64), dec32.astype(np.float64), 0,
                                      tolerance=1e-12, maxiter=200, quiet=True)
            px, py = (a.double().numpy() for a in w.world_to_pixel(torch.tensor(ra32), torch.tensor(dec32)))
            row[f"{name}_w2p_px"] = max(np.abs(px - xr).max(), np.abs(py - yr).max())
            rra, rdec = w.pixel_to_world(tx, ty)
            px, py = (a.double().numpy() for a in w.world_to_pixel(rra, rdec))
            row[f"{name}_rt_px"] = max(np.abs(px - x).max(), np.abs(py - y).max())
        # pixel -> pixel to a perturbed target WCS
        h2 = perturbed(header, shape)
        aw2 = WCS(h2)
        x2t, y2t = aw2.all_world2pix(ra_t, dec_t, 0, tolerance=1e-12, maxiter=200, quiet=True)
        tw = TanWCS.from_header(h2).to(dt)
        qx, qy = (a.double().numpy() for a in w.pixel_to_pixel(tw, tx, ty))
        row[f"{name}_p2p_px"] = max(np.abs(qx - x2t).max(), np.abs(qy - y2t).max())
    return row


def speed(label, rel, hdu, n=1 << 20, reps=3):
    """Median seconds for pixel->world and world->pixel of n points, ours (f64, f32) vs astropy."""
    import time

    header = load_header(rel, hdu)
    aw = WCS(header)
    rng = np.random.default_rng(0)
    x, y = rng.uniform(0, 255, n), rng.uniform(0, 255, n)
    ra, dec = aw.all_pix2world(x, y, 0)

    def med(fn):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return float(np.median(ts))

    torch.set_num_threads(1)  # astropy is single-threaded; 2 threads on this shared 2-core box only contend
    out = {"header": label}
    out["astropy_p2w"] = med(lambda: aw.all_pix2world(x, y, 0))
    out["astropy_w2p"] = med(lambda: aw.all_world2pix(ra, dec, 0, tolerance=1e-8, quiet=True))
    for dt, name in ((torch.float64, "f64"), (torch.float32, "f32")):
        w = TanWCS.from_header(header, dtype=dt)
        tx, ty, tr, td = (torch.tensor(a, dtype=dt) for a in (x, y, ra, dec))
        with torch.no_grad():
            out[f"ours_{name}_p2w"] = med(lambda: w.pixel_to_world(tx, ty))
            out[f"ours_{name}_w2p"] = med(lambda: w.world_to_pixel(tr, td))
    torch.set_num_threads(2)
    return out


def main():
    rows = [measure(*c) for c in CASES if (DATA / c[1]).exists()]
    cols = ["header", "kind", "shape", "f64_p2w_deg", "f64_w2p_px", "f64_rt_px", "f64_p2p_px",
            "f32_p2w_deg", "f32_w2p_px", "f32_rt_px", "f32_p2p_px"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(r[c] if isinstance(r[c], str) else f"{r[c]:.2e}" for c in cols) + " |")
    worst = {c: max(r[c] for r in rows) for c in cols[3:]}
    lines.append("| **max** | | | " + " | ".join(f"**{worst[c]:.2e}**" for c in cols[3:]) + " |")
    ok64 = worst["f64_p2w_deg"] <= 1e-9 and worst["f64_w2p_px"] <= 1e-6 and worst["f64_rt_px"] <= 1e-6
    ok32 = worst["f32_w2p_px"] <= 5e-3 and worst["f32_p2p_px"] <= 5e-3
    text = "\n".join([
        "# WCS parity: TanWCS vs astropy.wcs (all_pix2world / all_world2pix, origin 0)",
        "",
        f"torch {torch.__version__}, numpy {np.__version__}, astropy {__import__('astropy').__version__}, "
        f"{platform.processor() or platform.machine()}, 2 threads. Grid 41x41 spanning each image incl. corners.",
        "",
        "Columns: `p2w_deg` max |d(ra cos dec)|, |d dec| vs all_pix2world; `w2p_px` world->pixel vs "
        "all_world2pix (tolerance 1e-12; f32: on float32-rounded world coords, astropy run in float64 on the same "
        "values); `rt_px` our world->pixel of the truth world coords (f64) / our own f32 pixel->world->pixel "
        "round trip (f32) vs the grid; `p2p_px` pixel_to_pixel onto the header shifted by 10% of the image size and rotated 5 deg "
        "vs astropy's float64 chain.",
        "",
        *lines,
        "",
        f"Targets: float64 <= 1e-9 deg and <= 1e-6 px: {'PASS' if ok64 else 'FAIL'}; float32 world->pixel and "
        f"pixel->pixel <= 5e-3 px: {'PASS' if ok32 else 'FAIL'}.",
        "float32 p2w/rt are bounded by float32's own resolution of absolute ra/dec (ulp(ra)/2 up to 1.5e-5 deg "
        "at ra>256), not by the algorithm; use pixel_to_pixel for float32 reprojection.",
    ])
    speed_cases = [c for c in CASES if c[0] in ("irac_sip.hdr", "DEC-OBS04a.mini.fits")]
    sp = [speed(*c[:3]) for c in speed_cases]
    sl = ["| header | astropy p2w | ours f64 p2w | ours f32 p2w | astropy w2p | ours f64 w2p | ours f32 w2p |",
          "|---|---|---|---|---|---|---|"]
    for r in sp:
        sl.append(f"| {r['header']} | {r['astropy_p2w']:.3f} s | {r['ours_f64_p2w']:.3f} s "
                  f"({r['astropy_p2w'] / r['ours_f64_p2w']:.1f}x) | {r['ours_f32_p2w']:.3f} s | {r['astropy_w2p']:.3f} s | "
                  f"{r['ours_f64_w2p']:.3f} s ({r['astropy_w2p'] / r['ours_f64_w2p']:.1f}x) | {r['ours_f32_w2p']:.3f} s |")
    load = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else ["?"]
    text += "\n".join([
        "", "", "## Speed (CPU, 1 thread for both, 2^20 points, median of 3 after a warm-up; ratio = astropy / ours)",
        f"load average {' '.join(load)} (shared machine: absolute times are noisy, ratios less so).",
        "astropy all_world2pix run with tolerance 1e-8 px; ours: 4 Newton steps + 1.", "", *sl])
    print(text)
    out = ROOT / "experiments" / "results" / "wcs_parity.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
