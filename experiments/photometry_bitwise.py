"""Bitwise check of ``photometry.measure`` / ``detect.SourceExtractor`` outputs across a refactor.

Runs a fixed set of inputs (a simulated field, sep's ``image.fits`` with its rms map, a simulated frame
with saturated stars, bleed trails and edge residuals from ``experiments/detect_large_objects.py``, the
standalone helpers, the autograd path and the multi-threaded object split) and saves every output
tensor to ``<dir>/<case>.pt``.  ``--compare REF_DIR`` then checks ``torch.equal`` (NaN-aware) on every
column against an earlier run.

Run: python experiments/photometry_bitwise.py --out /tmp/phot_ref
     python experiments/photometry_bitwise.py --out /tmp/phot_new --compare /tmp/phot_ref
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from _common import SHARED_DATA  # noqa: E402

from astroprep_torch import photometry as P  # noqa: E402
from astroprep_torch.detect import SourceExtractor, detect_sources  # noqa: E402
from astroprep_torch.sim import simulate_frame  # noqa: E402


def _sim(n, n_stars, seed):
    fr = simulate_frame((n, n), n_stars=n_stars, seed=seed, saturation=None)
    img = (fr.image - fr.background).contiguous()
    return img, float(fr.variance.sqrt().median()), fr.variance.sqrt()


def _extract(img, rms, **kw):
    cat = SourceExtractor(thresh=1.5, minarea=5, deblend_cont=0.005, phot_apertures=(6.0, 10.0), **kw)(img, rms)
    return dict(cat.columns)


def case_sim(out):
    img, rms, rmsmap = _sim(512, 1500, 3)
    res = {f"sx.{k}": v for k, v in _extract(img, rms).items()}
    det = detect_sources(img, rms, thresh=1.5, minarea=5)
    seg = det["segmentation"]
    kw = dict(phot_apertures=(6.0, 10.0), flux_fracs=(0.5, 0.9), gain=1.5, saturation=3000.0, background=100.0)
    res.update({f"dense.{k}": v for k, v in P.measure(img, seg, rms, **kw).items()})
    mask = torch.zeros_like(img, dtype=torch.bool)
    mask[..., 100:110, 200:230] = True
    res.update({f"varmap_blank.{k}": v for k, v in P.measure(img, seg, var=rmsmap ** 2, mask=mask,
                                                              mask_type="blank", **kw).items()})
    res.update({f"none_exact.{k}": v for k, v in P.measure(img, seg, rmsmap, mask=mask, mask_type="none",
                                                            aper_subpix=0, winpos_revert=False,
                                                            winpos_max_radius=None).items()})
    torch.save(res, out / "sim.pt")


def case_sep(out):
    from astropy.io import fits

    d = SHARED_DATA / "sep"
    data = fits.getdata(d / "image.fits").astype(np.float32)
    back = fits.getdata(d / "back.fits").astype(np.float32)
    rms = torch.from_numpy(fits.getdata(d / "rms.fits").astype(np.float32))[None, None]
    img = torch.from_numpy(data - back)[None, None].contiguous()
    res = {f"sx.{k}": v for k, v in _extract(img, rms, saturation=50000.0).items()}
    det = detect_sources(img, rms, thresh=1.5, minarea=5)
    res.update({f"dense.{k}": v for k, v in P.measure(img, det["segmentation"], rms, saturation=500.0,
                                                       background=torch.from_numpy(back)[None, None]).items()})
    x, y = res["dense.x"], res["dense.y"]
    a, b, th = res["dense.a"], res["dense.b"], res["dense.theta"]
    for name, val in [("sum_circle", P.sum_circle(img, x, y, 5.0, var=rms ** 2)),
                      ("sum_circle0", P.sum_circle(img, x, y, 3.0, subpix=0)),
                      ("sum_ellipse", P.sum_ellipse(img, x, y, a, b, th, 2.5, var=1.0)),
                      ("kron_radius", P.kron_radius(img, x, y, a, b, th, 6.0)),
                      ("windowed_centroid", P.windowed_centroid(img, x, y, 1.5))]:
        for i, t in enumerate(val):
            res[f"{name}.{i}"] = t
    torch.save(res, out / "sep.pt")


def case_large(out):
    from detect_large_objects import sim_frames

    frames = {name: (data, rms) for name, data, rms in sim_frames(1024, 300.0)}
    for key in ("sim sat+edges", "sim diff"):
        data, rms = frames[key]
        img = torch.from_numpy(data)[None, None]
        res = _extract(img, rms, saturation=60000.0)
        torch.save(res, out / f"large_{key.split()[1].replace('+', '_')}.pt")


def case_grad_and_split(out):
    img, rms, _ = _sim(128, 60, 5)
    det = detect_sources(img, rms, thresh=1.5, minarea=5)
    x = img.clone().requires_grad_(True)
    m = P.measure(x, det["segmentation"], rms, phot_apertures=(5.0,))
    (m["flux_auto"].sum() + m["flux_aper"].sum() + m["xwin"].sum()).backward()
    res = {f"grad.{k}": v.detach() for k, v in m.items()}
    res["grad.image_grad"] = x.grad
    img, rms, _ = _sim(1024, 5000, 9)
    det = detect_sources(img, rms, thresh=1.5, minarea=5)
    res.update({f"split.{k}": v for k, v in P._measure(img, det["segmentation"], rms, workers=2).items()})
    torch.save(res, out / "grad_split.pt")


def _equal(a, b):
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point():
        return bool(torch.equal(torch.nan_to_num(a, nan=1.2345e-7), torch.nan_to_num(b, nan=1.2345e-7))
                    and torch.equal(torch.isnan(a), torch.isnan(b)))
    return torch.equal(a, b)


def compare(new: Path, ref: Path) -> int:
    bad = 0
    for f in sorted(ref.glob("*.pt")):
        r, n = torch.load(f), torch.load(new / f.name)
        diff = sorted(k for k in r if k not in n or not _equal(r[k], n[k]))
        extra = sorted(set(n) - set(r))
        print(f"{f.name}: {len(r)} columns, {len(diff)} differ{': ' + ', '.join(diff) if diff else ''}"
              f"{'; new columns ' + ', '.join(extra) if extra else ''}")
        bad += len(diff)
    return bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for case in (case_sim, case_sep, case_large, case_grad_and_split):
        case(out)
        print("done", case.__name__, flush=True)
    if args.compare:
        sys.exit(1 if compare(out, Path(args.compare)) else 0)


if __name__ == "__main__":
    main()
