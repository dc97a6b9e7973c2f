"""Refactoring guard (issue #23): detection outputs of this tree against git revision REV, bit for bit.

The same inputs go through ``SourceExtractor`` / ``detect_sources`` / ``isophotal_moments`` of this
tree and of REV (a ``git archive`` copy imported as ``astroprep_torch_baseline``, as
``detect_speed.py --baseline`` does), then every output column is compared with ``torch.equal``
(NaNs equal to NaNs). Inputs: a 512^2 simulated star field (``astroprep_torch.sim``; global rms and rms
map, a mask, saturation with the background, a 5x5 separable kernel, no CLEAN, a batch of two), sep's
``image.fits`` (real; background by ``Background2D(method="sextractor")``) and two frames with large
saturated stars and bleed trails (``detect_large_objects.sim_frames``: ``sim sat`` and ``sim diff``).
Also the robust-scale and zscale sites that moved to ``_robust`` / ``stretch``: cutouts'
``robust_standardize``, ``zscale_interval``, ``zscale_asinh``, classify's ``robust_standardize_fast``
and ``AstroAugment(noise=...)`` and calibrate's ``combine_frames`` / ``bad_pixel_map``.
Writes experiments/results/detect_bitwise.md.

Run: python experiments/detect_bitwise.py --baseline REV
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import importlib
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from _common import SHARED_DATA, git_rev, machine, write_result  # noqa: E402

SAT = 60000.0


def _inputs() -> dict:
    """The fixed inputs (made once, with this tree)."""
    from astropy.io import fits
    from astropy.utils.exceptions import AstropyWarning

    from astroprep_torch.background import Background2D
    from astroprep_torch.sim import simulate_frame
    from detect_large_objects import sim_frames

    fr = simulate_frame((512, 512), n_stars=600, seed=3, saturation=SAT)
    mask = torch.zeros(1, 1, 512, 512, dtype=torch.bool)
    mask[..., 100:110, 200:260] = True
    inp = {"sim": ((fr.image - fr.background).float(), fr.variance.sqrt().float(), fr.background.float(), mask)}
    path = SHARED_DATA / "sep" / "image.fits"
    if path.exists():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            x = torch.from_numpy(fits.getdata(path).astype(np.float32))[None, None]
        res = Background2D(box_size=64, filter_size=3, method="sextractor")(x)
        inp["sep"] = (x - res.background, float(res.rms.median()))
    for name, arr, rms in sim_frames(512, 30.0):
        if name in ("sim sat", "sim diff"):
            inp[name.replace(" ", "_")] = (torch.from_numpy(arr)[None, None], rms)
    g = np.random.default_rng(3)
    a = g.normal(200, 15, (4, 3, 40, 40))
    a[0, 0, 20, 20] = 5e4
    a[1, 1, :5] = np.nan
    a[2, 2] = 7.0
    inp["stamps"] = torch.from_numpy(a)
    inp["stack"] = torch.from_numpy(g.normal(100, 5, (7, 30, 30)).astype(np.float32))
    inp["hot"] = torch.from_numpy((g.random((30, 30)) > 0.97) * 80.0).float()
    return inp


def _cat(c) -> dict:
    return {**c.columns, "segmentation": c.segmentation}


def _flat(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update({f"{k}.{k2}": v2 for k2, v2 in v.items()})
        elif v is not None:
            out[k] = v
    return out


def _detection(pkg: str, inp: dict) -> dict:
    det = importlib.import_module(f"{pkg}.detect")
    se, ds = det.SourceExtractor, det.detect_sources
    img, rmap, bkg, mask = inp["sim"]
    rms = float(rmap.median())
    k5 = torch.outer(torch.tensor([1.0, 3, 5, 3, 1]), torch.tensor([1.0, 2, 3, 2, 1]))
    out = {
        "sim SourceExtractor(saturation, background)": _cat(se(saturation=SAT)(img, rms, background=bkg)),
        "sim SourceExtractor(rms map, mask)": _cat(se()(img, rmap, mask)),
        "sim detect_sources(rms map, mask)": _flat(ds(img, rmap, mask)),
        "sim detect_sources(dense=False)": _flat(ds(img, rms, dense=False)),
        "sim detect_sources(5x5 kernel)": _flat(ds(img, rms, filter_kernel=k5)),
        "sim detect_sources(no clean, nthresh 16)": _flat(ds(img, rms, clean=False, deblend_nthresh=16)),
        "sim batch of 2": _cat(se()(torch.cat([img, img.flip(-1)]), torch.tensor([rms, rms * 1.1]))),
    }
    if "sep" in inp:
        sub, g = inp["sep"]
        d = ds(sub, g)
        out["sep SourceExtractor"] = _cat(se()(sub, g))
        out["sep detect_sources"] = _flat(d)
        out["sep isophotal_moments(filtered)"] = det.isophotal_moments(sub, d["segmentation"], d["filtered"])
        out["sep isophotal_moments"] = det.isophotal_moments(sub, d["segmentation"])
    for key in ("sim_sat", "sim_diff"):
        t, r = inp[key]
        out[f"{key} SourceExtractor(saturation)"] = _cat(se(saturation=SAT - 1000)(t, r))
        out[f"{key} detect_sources"] = _flat(ds(t, r))
    return out


def _robust_sites(pkg: str, inp: dict) -> dict:
    C = importlib.import_module(f"{pkg}.cutouts")
    K = importlib.import_module(f"{pkg}.classify")
    CA = importlib.import_module(f"{pkg}.calibrate")
    x, st = inp["stamps"], inp["stack"]
    m = torch.zeros_like(st, dtype=torch.bool)
    m[2, :4] = True
    cb, cb2 = CA.combine_frames(st, m), CA.combine_frames(st, sigma_clip=True)
    dark = CA.Master(kind="dark", image=st[0] + inp["hot"], uncertainty=torch.ones(30, 30),
                     mask=torch.zeros(30, 30, dtype=torch.bool))
    return {
        "cutouts": {"robust_standardize": C.robust_standardize(x), "robust_standardize f32": C.robust_standardize(x.float()),
                    "zscale_interval": torch.stack(C.zscale_interval(x)),
                    "zscale_interval f32": torch.stack(C.zscale_interval(x.float())),
                    "zscale_asinh": C.zscale_asinh(x.float())},
        "classify": {"robust_standardize_fast": K.robust_standardize_fast(x.float()),
                     "AstroAugment(noise=0.5)": K.AstroAugment(noise=0.5)(x.float(),
                                                                         generator=torch.Generator().manual_seed(1))},
        "calibrate": {"combine_frames": torch.stack([cb.image, cb.uncertainty]), "combine_frames clip": cb2.uncertainty,
                      "bad_pixel_map": CA.bad_pixel_map(dark=dark)},
    }


def _same(a, b) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        return torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(a.nan_to_num(0.0), b.nan_to_num(0.0))
    return torch.equal(a, b)


def _compare(new: dict, old: dict) -> tuple[list, int]:
    rows, ncol = [], 0
    for case, cols in new.items():
        missing = sorted(set(cols) ^ set(old[case]))
        diff = []
        for c in sorted(set(cols) & set(old[case])):
            ncol += 1
            if not _same(cols[c], old[case][c]):
                a, b = cols[c].double(), old[case][c].double()
                err = float((a - b).abs().nan_to_num(0).max()) if a.shape == b.shape else float("nan")
                diff.append(f"{c} (max abs diff {err:.3g})")
        n = next((int(v.shape[0]) for k, v in cols.items() if k in ("batch_index", "x")), "")
        rows.append(f"| {case} | {n} | {len(cols)} | {', '.join(diff) or 'none'} | {', '.join(missing) or '-'} |")
    return rows, ncol


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", required=True, help="git revision to compare with")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from detect_speed import _baseline_package

    _baseline_package(args.baseline, Path(tempfile.mkdtemp()))
    inp = _inputs()
    new = {**_detection("astroprep_torch", inp), **_robust_sites("astroprep_torch", inp)}
    old = {**_detection("astroprep_torch_baseline", inp), **_robust_sites("astroprep_torch_baseline", inp)}
    rows, ncol = _compare(new, old)
    text = "\n".join([
        f"# Detection outputs: this tree ({git_rev()}) vs {args.baseline}, bit for bit",
        "", machine(), "", f"Command: `python experiments/detect_bitwise.py --baseline {args.baseline}`", "",
        f"{ncol} columns compared with torch.equal (NaN == NaN).", "",
        "| case | rows | columns | differing columns | only in one |", "|---|---|---|---|---|", *rows, "",
        "Expected against revisions before the one-MAD-constant change (issue #23): classify's",
        "``AstroAugment`` noise scale used 1.4826 and now uses ``_robust.MAD_TO_STD`` = 1.482602218505602",
        "(astropy's), a relative change of 1.5e-6 of the added noise; nothing else may differ.", "",
    ])
    print(text)
    print("wrote", write_result("detect_bitwise", text))


if __name__ == "__main__":
    main()
