"""``astroprep extract sex=<file.sex>`` against Debian's source-extractor on m13, object by object.

Runs source-extractor 2.25 and ours with the SAME .sex / .param / .conv (tests/test_classic.py's
``SEX``, ``PARAM``, ``CONV``, plus a SEGMENTATION check image) on ``../shared/data/astropy_images/
m13.fits`` and reports, over every matched object (blended and flagged ones included) and over the
S/N > 20, FLAGS = 0 subset, the fractions with |dMAG_AUTO| < 0.01 and X/Y, XWIN/YWIN within 0.01 px.

SExtractor's deblending gives the pixels below the branches' split to a branch drawn at random
(``refine.c: gatherup``, glibc ``rand()`` with its default seed, in the order of the scan's pixel
lists).  To measure what that alone does, source-extractor is run again with ``rand()`` replaced
(``LD_PRELOAD`` of a 64-bit LCG, two seeds): SExtractor against itself gives the floor any
reimplementation without glibc's generator and lutz's pixel-list order meets.  Ours reproduces that draw
(``astroprep_torch.detect.gatherup_random``: glibc's stream, SExtractor's draw and branch order).  Each disagreement is
classed: sensitive to the draw (SExtractor's own value moves beyond the tolerance under a reseed),
deblended branch, or plain object; the segmentations are compared as connected groups of
overlapping objects (identical, same objects with other boundaries, other splits / CLEAN merges).

    PYTHONPATH=$PWD python experiments/classic_m13_parity.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from _common import SHARED_DATA, machine, write_result  # noqa: E402

RAND_C = r"""
#include <stdlib.h>
#include <stdint.h>
static uint64_t s; static int init;
int rand(void) {
  if (!init) { const char *e = getenv("RESEED"); s = e ? strtoull(e, 0, 10) : 2; init = 1; }
  s = s * 6364136223846793005ULL + 1442695040888963407ULL;
  return (int)((s >> 33) & 0x7fffffff);
}
"""
TOL = 0.01


def _config(d: Path) -> Path:
    from test_classic import CONV, PARAM, SEX

    (d / "my.sex").write_text(SEX)
    (d / "my.param").write_text(PARAM)
    (d / "my.conv").write_text(CONV)
    return d / "my.sex"


def _run_sextractor(exe: str, cfg: Path, img: Path, out: Path, seed=None, preload=None):
    out.mkdir(parents=True, exist_ok=True)
    for f in ("my.sex", "my.param", "my.conv"):
        shutil.copy(cfg.parent / f, out / f)
    env = None
    if seed is not None:
        import os

        env = dict(os.environ, LD_PRELOAD=str(preload), RESEED=str(seed))
    subprocess.run([exe, str(img), "-c", "my.sex"], cwd=out, check=True, capture_output=True, env=env)
    from astropy.table import Table

    return Table.read(out / "cat.fits")


def _preload(d: Path):
    """A shared library replacing ``rand()`` (None without a C compiler)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    (d / "rand.c").write_text(RAND_C)
    subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(d / "rand.so"), str(d / "rand.c")], check=True)
    return d / "rand.so"


def _ours(cfg: Path, img: Path, out: Path):
    from astropy.table import Table

    from astroprep_torch import classic

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classic.run_extract(img, cfg, out)
    return Table.read(out / "cat.fits")


def _col(t, name) -> np.ndarray:
    return np.asarray(t[name], dtype=float)


def match(ref, t):
    """Mutual nearest neighbours within 1 px: ``(m_ref, j, m_ours)``, ``j`` the row of ``t`` nearest
    to each row of ``ref``."""
    from scipy.spatial import cKDTree

    sx, sy, ox, oy = _col(ref, "X_IMAGE"), _col(ref, "Y_IMAGE"), _col(t, "X_IMAGE"), _col(t, "Y_IMAGE")
    d, j = cKDTree(np.c_[ox, oy]).query(np.c_[sx, sy])
    d2, i = cKDTree(np.c_[sx, sy]).query(np.c_[ox, oy])
    m_ref = (d <= 1.0) & (i[j] == np.arange(len(sx)))
    m_ours = (d2 <= 1.0) & (j[i] == np.arange(len(ox)))
    return m_ref, j, m_ours


def differences(ref, t):
    """Per row of ``ref``: matched, |dMAG_AUTO|, X/Y and XWIN/YWIN distances (inf when unmatched)."""
    m, j, m_ours = match(ref, t)
    out = {k: np.full(len(ref), np.inf) for k in ("dmag", "xy", "xywin")}
    jm = j[m]
    out["dmag"][m] = np.abs(_col(t, "MAG_AUTO")[jm] - _col(ref, "MAG_AUTO")[m])
    out["xy"][m] = np.hypot(_col(t, "X_IMAGE")[jm] - _col(ref, "X_IMAGE")[m], _col(t, "Y_IMAGE")[jm] - _col(ref, "Y_IMAGE")[m])
    out["xywin"][m] = np.hypot(_col(t, "XWIN_IMAGE")[jm] - _col(ref, "XWIN_IMAGE")[m],
                               _col(t, "YWIN_IMAGE")[jm] - _col(ref, "YWIN_IMAGE")[m])
    out["matched"], out["matched_ours"] = m, m_ours
    return out


def summary(ref, diff, sel=None) -> dict:
    """The issue's numbers over the matched objects of ``sel`` (all when None)."""
    m = diff["matched"] if sel is None else diff["matched"] & sel
    n = max(int(m.sum()), 1)
    return {"n": int(m.sum()), "matched_ref": float(diff["matched"].mean()), "matched_ours": float(diff["matched_ours"].mean()),
            "dmag": float((diff["dmag"][m] < TOL).sum() / n), "xy": float((diff["xy"][m] < TOL).sum() / n),
            "xywin": float((diff["xywin"][m] < TOL).sum() / n)}


def sn20(ref) -> np.ndarray:
    fa, fe = _col(ref, "FLUX_AUTO"), _col(ref, "FLUXERR_AUTO")
    return (np.asarray(ref["FLAGS"]) == 0) & (fa > 20 * np.where(fe > 0, fe, np.inf))


def bad(diff) -> np.ndarray:
    return (diff["dmag"] >= TOL) | (diff["xywin"] >= TOL)


def classes(ref, diff, sensitive) -> dict:
    """Counts of the objects of ``ref`` that are unmatched or fail a tolerance, by cause."""
    blended = (np.asarray(ref["FLAGS"]) & 2) > 0
    b = bad(diff) & diff["matched"]
    return {"unmatched (SExtractor rows)": int((~diff["matched"]).sum()),
            "unmatched, deblended branch in SExtractor": int((~diff["matched"] & blended).sum()),
            "fail, SExtractor itself moves under a reseed of rand()": int((b & sensitive).sum()),
            "fail, deblended branch, stable under reseed": int((b & ~sensitive & blended).sum()),
            "fail, not deblended, stable under reseed": int((b & ~sensitive & ~blended).sum())}


def segment_groups(seg_ref: np.ndarray, seg_ours: np.ndarray) -> dict:
    """Connected groups of overlapping objects of the two segmentations, by kind (counts)."""
    import scipy.sparse as sp
    from scipy.sparse.csgraph import connected_components

    on = (seg_ref > 0) | (seg_ours > 0)
    pairs, cnt = np.unique(np.c_[seg_ref[on], seg_ours[on]], axis=0, return_counts=True)
    ns, no = int(seg_ref.max()) + 1, int(seg_ours.max()) + 1
    g = sp.coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1] + ns)), shape=(ns + no, ns + no))
    _, lab = connected_components(g, directed=False)
    area_s, area_o = np.bincount(seg_ref.ravel(), minlength=ns), np.bincount(seg_ours.ravel(), minlength=no)
    kinds = {"identical objects (same pixels)": 0, "same objects, other pixel boundaries": 0,
             "other splits / CLEAN merges": 0, "sky in one, object in the other (pixels)": int(cnt[(pairs == 0).any(1)].sum())}
    for c in np.unique(lab[pairs[(pairs > 0).all(1)][:, 0]]):
        s = [a for a in np.unique(pairs[:, 0]) if a > 0 and lab[a] == c]
        o = [b for b in np.unique(pairs[:, 1]) if b > 0 and lab[b + ns] == c]
        if len(s) != len(o):
            kinds["other splits / CLEAN merges"] += len(s)
        elif len(s) == 1 and area_s[s[0]] == area_o[o[0]] == cnt[(pairs[:, 0] == s[0]) & (pairs[:, 1] == o[0])].sum():
            kinds["identical objects (same pixels)"] += 1
        else:
            kinds["same objects, other pixel boundaries"] += len(s)
    return kinds


def _fmt(d: dict) -> str:
    return " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in d.values())


def _tables(rows: dict, cls: dict, groups: dict) -> str:
    head = "| comparison | subset | n | matched ref | matched other | dMAG_AUTO<0.01 | X/Y<0.01 px | XWIN<0.01 px |\n|---|---|---|---|---|---|---|---|\n"
    body = "".join(f"| {a} | {b} | {_fmt(v)} |\n" for (a, b), v in rows.items())
    c = "| class | objects |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in cls.items())
    g = ("| segmentation group (SExtractor objects; SEGMENTATION check images) | count |\n|---|---|\n"
         + "".join(f"| {k} | {v} |\n" for k, v in groups.items()))
    return head + body + "\n" + c + "\n" + g


def frame_report(name: str, image: np.ndarray, exe: str) -> str:
    """Run both tools (and SExtractor reseeded) on ``image``; the tables for the results file."""
    from astropy.io import fits

    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        cfg = _config(d)
        img = d / "img.fits"
        fits.writeto(img, image.astype(np.float32))
        ref = _run_sextractor(exe, cfg, img, d / "sex")
        ours = _ours(cfg, img, d / "ours")
        so = _preload(d)
        reseeded = [] if so is None else [_run_sextractor(exe, cfg, img, d / f"sex{s}", s, so) for s in (2, 3)]
        groups = segment_groups(fits.getdata(d / "sex" / "seg.fits").astype(np.int64),
                                fits.getdata(d / "ours" / "seg.fits").astype(np.int64))
    diff = differences(ref, ours)
    rdiffs = [differences(ref, r) for r in reseeded]
    sensitive = np.zeros(len(ref), bool)
    for r in rdiffs:
        sensitive |= bad(r) | ~r["matched"]
    rows = {("ours vs SExtractor", "all matched"): summary(ref, diff),
            ("ours vs SExtractor", "S/N>20, FLAGS=0"): summary(ref, diff, sn20(ref)),
            ("ours vs SExtractor", "not deblended (FLAGS&2=0)"): summary(ref, diff, (np.asarray(ref["FLAGS"]) & 2) == 0),
            ("ours vs SExtractor", "stable under a reseed of rand()"): summary(ref, diff, ~sensitive)}
    for s, r in zip((2, 3), rdiffs):
        rows[(f"SExtractor reseeded ({s}) vs SExtractor", "all matched")] = summary(ref, r)
    cls = classes(ref, diff, sensitive)
    cls["objects of ours unmatched"] = int((~diff["matched_ours"]).sum())
    return f"## {name}\n\n" + _tables(rows, cls, groups)


def main() -> None:
    from astropy.io import fits

    from astroprep_torch.sim import simulate_frame

    exe = shutil.which("source-extractor") or shutil.which("sex")
    if exe is None:
        raise SystemExit("source-extractor is not installed")
    m13 = fits.getdata(SHARED_DATA / "astropy_images" / "m13.fits").astype(np.float32)
    gwac = simulate_frame((1024, 1024), n_stars=1250, seed=1).image[0, 0].numpy()  # as tests/test_classic.py
    text = "\n".join([frame_report("m13 (astropy_images/m13.fits, 300x300)", m13, exe),
                      frame_report("simulated GWAC-like frame (1024^2, 1250 stars, seed 1)", gwac, exe)])
    print(text)
    write_result("classic_m13_parity", f"# classic_m13_parity: astroprep extract sex= vs source-extractor 2.25\n\n"
                 f"{machine()} (shared machine)\n\nCommand: `PYTHONPATH=$PWD python experiments/classic_m13_parity.py`\n\n"
                 f"{text}\n{__doc__}")


if __name__ == "__main__":
    main()
