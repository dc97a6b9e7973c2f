"""Photometry parity: astroprep_torch.photometry.measure vs Debian source-extractor (and sep).

Photometry is isolated from detection: SExtractor is run first (with SEGMENTATION, FILTERED,
-BACKGROUND and BACKGROUND check images); its segmentation, filtered image and background-subtracted
image are fed to ``measure`` and every catalogue column is compared object by object (NUMBER = label).
sep (``sep.extract`` on the same background-subtracted image with SExtractor's global rms, then
``sum_circle``, ``kron_radius``/``sum_ellipse``, ``flux_radius``, ``winpos`` as in sep's docs) is matched
to SExtractor within 1 px for comparison.

Frames: ``sep/image.fits`` (its own default.sex: MASK_TYPE NONE), ``astropy_images/m13.fits``
(crowded; SExtractor's built-in defaults: MASK_TYPE CORRECT, PHOT_AUTOPARAMS 2.5,3.5) and a simulated
GWAC-like 2048^2 frame (astroprep_torch.sim, same defaults).

Two quantities SExtractor fixes before the final segmentation exists are passed from its catalogue
(the detector supplies them in the pipeline): the barycentre of deblended objects (FLAGS & 2: the
deblending-branch barycentre) and the moments/ISOAREA of objects that swallowed CLEANed neighbours.
Those objects are counted separately in the table.  FLAGS 2 (deblended) is passed too (a deblended
object need not touch a sibling).

SExtractor is run a second time with ``CLEAN N`` (the same deblending): its objects without a
counterpart in the first catalogue are the ones CLEAN swallowed, whose pixels SExtractor pastes back
into the image (:func:`clean_blanking` -> ``measure(unblanked=, always_blanked=)``), and its map restores
the object the first run's SEGMENTATION check image loses to a renumbering collision
(:func:`repair_lost_objects`).  The objects still disagreeing are listed by cause.  The rules were
found with a debug build of SExtractor 2.25 dumping its image's blanked pixels at each object's
measurement (on m13 our blanked set then equals its own, pixel for pixel, for every object measured
after the scan's end).

Run:  python experiments/photometry_parity.py [--quick]   -> experiments/results/photometry_parity.md
      python experiments/photometry_parity.py --speed-only [--size 4096 --stars 20000]
                                                          -> experiments/results/photometry_speed.md
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from astropy.io import fits
from astropy.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA, machine, timeit, write_result  # noqa: E402

from astroprep_torch.photometry import MeshBackground, measure  # noqa: E402

PARAMS = """NUMBER X_IMAGE Y_IMAGE XWIN_IMAGE YWIN_IMAGE X2_IMAGE Y2_IMAGE XY_IMAGE ERRX2_IMAGE ERRY2_IMAGE
ERRXY_IMAGE A_IMAGE B_IMAGE THETA_IMAGE FLUX_APER FLUXERR_APER KRON_RADIUS FLUX_AUTO FLUXERR_AUTO
FLUX_RADIUS FLAGS FLUX_ISO FLUXERR_ISO ISOAREA_IMAGE FLUX_MAX""".split()

# column: (our key, tolerance, relative?)
COLUMNS = [
    ("X_IMAGE", "x", 0.01, False), ("Y_IMAGE", "y", 0.01, False),
    ("XWIN_IMAGE", "xwin", 0.01, False), ("YWIN_IMAGE", "ywin", 0.01, False),
    ("X2_IMAGE", "x2", 1e-3, True), ("A_IMAGE", "a", 1e-3, True), ("THETA_IMAGE", "theta", 0.1, False),
    ("ERRX2_IMAGE", "errx2", 1e-3, True),
    ("ISOAREA_IMAGE", "npix", 0, False), ("FLUX_ISO", "flux_iso", 1e-4, True), ("FLUX_MAX", "peak", 1e-4, True),
    ("FLUX_APER", "flux_aper", 1e-3, True), ("FLUXERR_APER", "fluxerr_aper", 1e-3, True),
    ("KRON_RADIUS", "kron_radius", 1e-2, True), ("FLUX_AUTO", "flux_auto", 1e-2, True),
    ("FLUXERR_AUTO", "fluxerr_auto", 1e-2, True), ("FLUX_RADIUS", "flux_radius", 1e-2, True),
    ("FLAGS", "flags", 0, False), ("MAG_AUTO", "flux_auto", 0.01, False),
]


def run_sextractor(image: Path, workdir: Path, config: dict) -> dict:
    """Run Debian source-extractor; return catalogue, check images and the global background rms."""
    exe = shutil.which("source-extractor") or shutil.which("sex")
    if exe is None:
        raise RuntimeError("source-extractor is not installed")
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "p.param").write_text("\n".join(PARAMS) + "\n")
    conv = workdir / "default.conv"
    conv.write_text("CONV NORM\n1 2 1\n2 4 2\n1 2 1\n")
    cfg = {"PARAMETERS_NAME": "p.param", "CATALOG_NAME": "cat.fits", "CATALOG_TYPE": "FITS_1.0",
           "FILTER_NAME": str(conv), "CHECKIMAGE_TYPE": "SEGMENTATION,FILTERED,-BACKGROUND,BACKGROUND,MINIBACKGROUND",
           "CHECKIMAGE_NAME": "seg.fits,filt.fits,sub.fits,back.fits,mini.fits", "VERBOSE_TYPE": "NORMAL",
           "STARNNW_NAME": "/usr/share/source-extractor/default.nnw", "PHOT_FLUXFRAC": "0.5"}
    cfg.update(config)
    cmd = [exe, str(image)]
    if "c" in cfg:
        cmd += ["-c", str(cfg.pop("c"))]
    for k, v in cfg.items():
        cmd += [f"-{k}", str(v)]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(proc.stderr[-2000:])
    m = re.search(r"RMS:\s*([0-9.eE+-]+)", proc.stderr)
    cat = Table.read(workdir / "cat.fits")
    cat.sort("NUMBER")
    return {
        "cat": cat, "rms": float(m.group(1)),
        "seg": fits.getdata(workdir / "seg.fits").astype(np.int64),
        "filt": fits.getdata(workdir / "filt.fits").astype(np.float32),
        "sub": fits.getdata(workdir / "sub.fits").astype(np.float32),
        "back": fits.getdata(workdir / "back.fits").astype(np.float32),
        "mesh": fits.getdata(workdir / "mini.fits").astype(np.float32), "back_size": _back_size(cfg, cmd),
    }


def _back_size(cfg: dict, cmd: list) -> tuple[int, int]:
    """BACK_SIZE (rows, columns) of a run: the command line's, else its -c file's, else 64."""
    text = str(cfg.get("BACK_SIZE", ""))
    if not text and "-c" in cmd:
        m = re.search(r"^BACK_SIZE\s+([0-9,]+)", Path(cmd[cmd.index("-c") + 1]).read_text(), re.M)
        text = m.group(1) if m else ""
    v = [int(t) for t in text.split(",") if t] or [64]
    return (v[-1], v[0])  # BACK_SIZE w[,h]


def clean_blanking(sx: dict, noclean: dict, detect_thresh: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """SExtractor's blanking of the pixels of objects that CLEAN merged into others (``unblanked``,
    ``always_blanked`` maps for ``measure``), from a second run with ``CLEAN N`` (same deblending) whose
    objects without a counterpart at the same position in the CLEAN Y catalogue are the swallowed ones.

    A swallowed object's pixels are pasted back into the image when the CLEAN happens, i.e. while the
    scan completes the later of the two detections (8-connected components of the filtered image above
    the detection threshold), at line ``ymax + 1`` of that detection: rows above ``ymax - 1`` are blanked
    by then and stay unblanked; the rest (row ``ymax``) is blanked by the scan afterwards, for every object.
    Returns (unblanked, always_blanked, victim NUMBERs of the CLEAN N run)."""
    from scipy import ndimage

    cat, cat_n = sx["cat"], noclean["cat"]
    xy = np.stack([np.asarray(cat["X_IMAGE"]), np.asarray(cat["Y_IMAGE"])], 1)
    xy_n = np.stack([np.asarray(cat_n["X_IMAGE"]), np.asarray(cat_n["Y_IMAGE"])], 1)
    d = np.abs(xy_n[:, None, :] - xy[None, :, :]).max(-1).min(1)
    victims = np.asarray(cat_n["NUMBER"])[d > 1e-3]
    seg, seg_n = sx["seg"], noclean["seg"]
    comp, _ = ndimage.label(noclean["filt"] > detect_thresh, structure=np.ones((3, 3)))
    comp_ymax = ndimage.maximum(np.arange(comp.shape[0])[:, None] + 0 * comp, comp, np.arange(comp.max() + 1))
    comp_ymax = np.asarray(comp_ymax, int)
    rows = np.arange(seg.shape[0])[:, None] + 0 * seg
    victim_pix = np.isin(seg_n, victims) & (seg > 0)
    # the master of each victim pixel: its label in the CLEAN Y map; the master's component: that of
    # the master's own pixels (those not swallowed)
    master_comp = np.zeros(seg.max() + 1, int)
    own = (seg > 0) & ~victim_pix
    master_comp[seg[own]] = comp[own]
    ytrig = np.maximum(comp_ymax[comp], comp_ymax[master_comp[seg]])
    always = victim_pix & (rows >= ytrig)
    return victim_pix & ~always, always, victims


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a))[None, None]


def repair_lost_objects(sx: dict, noclean: dict) -> tuple[int, int]:
    """Restore the objects SExtractor's SEGMENTATION check image lost; returns (objects restored, pixels
    relabelled) and records in ``sx["disputed"]`` the NUMBERs whose pixels the two runs' maps label
    differently.

    At ``endobject`` each object's pixels are renumbered, within its bounding box, from its detection
    number to its catalogue NUMBER (analyse.c), and CLEAN relabels a swallowed object's pixels within its
    box (clean.c ``mergeobject``); a pixel already carrying a NUMBER equal to the number being replaced
    changes hands (m13: NUMBER 274, 656 px, lands in 275).  A lost object's pixels are those of the same
    object (same position) in the ``CLEAN N`` run's map.  Other disagreements between the maps (a pixel
    or two, either map may be the wrong one) are left as they are and only recorded."""
    cat, cat_n, seg = sx["cat"], noclean["cat"], sx["seg"]
    lost = int((~np.isin(np.asarray(cat["NUMBER"]), seg)).sum())
    xy = np.stack([np.asarray(cat["X_IMAGE"]), np.asarray(cat["Y_IMAGE"])], 1)
    xy_n = np.stack([np.asarray(cat_n["X_IMAGE"]), np.asarray(cat_n["Y_IMAGE"])], 1)
    d = np.abs(xy_n[:, None, :] - xy[None, :, :]).max(-1)  # (n_noclean, n): a few hundred to thousands
    kept = d.min(1) < 1e-3
    to_clean = np.zeros(int(max(noclean["seg"].max(), np.asarray(cat_n["NUMBER"]).max())) + 1, np.int64)
    to_clean[np.asarray(cat_n["NUMBER"])[kept]] = np.asarray(cat["NUMBER"])[d.argmin(1)[kept]]
    target = to_clean[noclean["seg"]]
    differ = (target > 0) & (seg > 0) & (target != seg)
    fix = differ & ~np.isin(target, seg)  # the pixels of objects absent from the map
    seg[fix] = target[fix]
    rest = differ & ~fix
    sx["disputed"] = set(np.unique(seg[rest]).tolist()) | set(np.unique(target[rest]).tolist())
    return lost - int((~np.isin(np.asarray(cat["NUMBER"]), seg)).sum()), int(fix.sum())


def measure_like_sextractor(sx: dict, config: dict, *, detect_thresh=1.5, analysis_thresh=1.5,
                            overrides=True, noclean: dict | None = None,
                            drop: tuple = ()) -> tuple[dict, np.ndarray, np.ndarray]:
    """Run measure() on SExtractor's segmentation with SExtractor's settings; returns (result,
    merged-by-CLEAN mask, blended mask).  With ``noclean`` (the same run with ``CLEAN N``), the pixels of
    the objects CLEAN swallowed are blanked as SExtractor leaves them (:func:`clean_blanking`) and lost
    objects are restored in the map (:func:`repair_lost_objects`)."""
    rms = sx["rms"]
    aper = [float(v) for v in str(config.get("PHOT_APERTURES", "5")).split(",")]
    auto = [float(v) for v in str(config.get("PHOT_AUTOPARAMS", "2.5,3.5")).split(",")]
    kw = dict(filtered=_t(sx["filt"]), thresh=analysis_thresh * rms, detect_thresh=detect_thresh * rms,
              phot_apertures=aper, kron_fact=auto[0], min_radius=auto[1],
              mask_type=str(config.get("MASK_TYPE", "CORRECT")).lower(),
              saturation=float(config.get("SATUR_LEVEL", 50000.0)),
              background=(MeshBackground(_t(sx["mesh"]), sx["back_size"])  # flag 4: SExtractor's mesh
                          if "mesh" not in drop else _t(sx["back"])))
    sx["repaired"], sx["relabelled"] = 0, 0
    if noclean is not None:
        sx["repaired"], sx["relabelled"] = repair_lost_objects(sx, noclean)
        unblanked, always, victims = clean_blanking(sx, noclean, detect_thresh * rms)
        kw.update(unblanked=_t(unblanked), always_blanked=_t(always))
        sx["victims"] = len(victims)
    for k in drop:  # the ablation: a rule's input left out
        kw.pop(k, None)
    img, seg = _t(sx["sub"]), _t(sx["seg"])
    first = measure(img, seg, rms, **kw)
    labels = first["label"].numpy()
    # SExtractor's segmentation map can lose an object when its renumbering collides: keep the
    # catalogue rows whose NUMBER is present in the map (counted in the report)
    present = np.isin(np.asarray(sx["cat"]["NUMBER"]), labels)
    cat = sx["cat"] = sx["cat"][present]
    sx["missing"] = int((~present).sum())
    if not (labels == np.asarray(cat["NUMBER"])).all():
        raise RuntimeError("segmentation labels do not match the catalogue NUMBERs")
    merged = first["npix"].numpy() > np.asarray(cat["ISOAREA_IMAGE"])
    blended = (np.asarray(cat["FLAGS"]) & 2) > 0
    if not overrides:
        return first, merged, blended
    if "blended" not in drop:
        kw["blended"] = torch.from_numpy(blended)  # FLAGS 2 of deblended objects: the detector's
    nan = np.full(len(cat), np.nan)
    iso = {}
    for key, col, off, sel in [("x", "X_IMAGE", 1, merged | blended), ("y", "Y_IMAGE", 1, merged | blended),
                               ("x2", "X2_IMAGE", 0, merged), ("y2", "Y2_IMAGE", 0, merged),
                               ("xy", "XY_IMAGE", 0, merged), ("npix", "ISOAREA_IMAGE", 0, merged)]:
        iso[key] = torch.from_numpy(np.where(sel, np.asarray(cat[col], float) - off, nan))
    return measure(img, seg, rms, isophotal=iso, **kw), merged, blended


def agrees(res: dict, cat: Table, col: str, key: str, tol: float, rel: bool) -> np.ndarray:
    """Per object: whether our ``key`` is within ``tol`` of SExtractor's ``col``.  ``MAG_AUTO``: |Δmag|
    of FLUX_AUTO below ``tol`` (both fluxes non-positive: SExtractor's 99 on both sides)."""
    ref = np.asarray(cat[col if col != "MAG_AUTO" else "FLUX_AUTO"], float)
    ours = res[key].detach().double().numpy()
    if col in ("X_IMAGE", "Y_IMAGE", "XWIN_IMAGE", "YWIN_IMAGE"):
        ours = ours + 1.0
    if ref.ndim == 2:
        ref = ref[:, 0]
    if ours.ndim == 2:
        ours = ours[:, 0]
    if col == "MAG_AUTO":
        pos = (ours > 0) & (ref > 0)
        dmag = np.abs(2.5 * np.log10(np.where(pos, ours, 1.0) / np.where(pos, ref, 1.0)))
        return np.where(pos, dmag < tol, (ours <= 0) & (ref <= 0))
    d = np.abs(ours - ref)
    if rel:
        d = np.where(ref != 0, d / np.abs(np.where(ref != 0, ref, 1)), d)
    return d <= tol


def compare(res: dict, cat: Table, exclude: dict | None = None) -> dict[str, tuple[float, int]]:
    """Per column: (% of objects within tolerance, n compared)."""
    out = {}
    exclude = exclude or {}
    for col, key, tol, rel in COLUMNS:
        ok = agrees(res, cat, col, key, tol, rel)
        keep = ~exclude.get(col, np.zeros(len(ok), bool))
        out[col] = (100.0 * float(np.mean(ok[keep])) if keep.any() else float("nan"), int(keep.sum()))
    return out


# columns whose disagreements are listed object by object, with their cause where it is known
_TARGET = ("XWIN_IMAGE", "YWIN_IMAGE", "KRON_RADIUS", "FLUX_AUTO", "MAG_AUTO", "FLUX_RADIUS", "FLAGS")


def _early_measured(cat: Table, seg: np.ndarray) -> np.ndarray:
    """Objects SExtractor measures before it blanks the frame's last row: when the whole frame fits its
    strip buffer (MEMORY_BUFSIZE 1024 lines), objects whose CLEAN margin reaches row 0 (clean.c: ``ycmin =
    ymin - margin``) are measured when the scan reaches the frame's end, one row before the last row's
    detected pixels are blanked; it matters where their Kron search ellipse (6 A) reaches that row."""
    H = seg.shape[0]
    lab = np.asarray(cat["NUMBER"])
    ys = np.arange(H)[:, None] + 0 * seg
    ymin = np.full(lab.max() + 1, H)
    ymax = np.zeros(lab.max() + 1, int)
    np.minimum.at(ymin, seg[seg > 0], ys[seg > 0])
    np.maximum.at(ymax, seg[seg > 0], ys[seg > 0])
    x2, y2, xy = (np.asarray(cat[c], float) for c in ("X2_IMAGE", "Y2_IMAGE", "XY_IMAGE"))
    det = x2 * y2 - xy * xy
    cxx, cyy, cxy = y2 / det, x2 / det, -2 * xy / det
    hh1 = cyy - cxy * cxy / (4.0 * cxx)
    hh1 = np.where(hh1 > 0, 1 / np.sqrt(3 * np.where(hh1 > 0, hh1, 1)), 0.0)
    hh2 = ymax[lab] - ymin[lab] + 1.0
    margin = np.floor(np.maximum(hh1, hh2) * 2.0 + 4.0 + 0.49999)
    reach = np.asarray(cat["Y_IMAGE"]) - 1 + 6 * np.asarray(cat["A_IMAGE"])
    return (H <= 1024) & (ymin[lab] - margin <= 0) & (reach >= H - 1.5)


def remaining(res: dict, cat: Table, seg: np.ndarray, disputed=()) -> list[tuple[int, str, str]]:
    """The objects disagreeing in a :data:`_TARGET` column: (NUMBER, columns, cause)."""
    cols = {c: (k, t, r) for c, k, t, r in COLUMNS}
    bad = {c: ~agrees(res, cat, c, *cols[c]) for c in _TARGET}
    early = _early_measured(cat, seg)
    disputed = np.isin(np.asarray(cat["NUMBER"]), list(disputed))
    fl_ours, fl_ref = res["flags"].numpy(), np.asarray(cat["FLAGS"])
    out = []
    for i in np.nonzero(np.any(list(bad.values()), axis=0))[0]:  # the few disagreeing objects
        which = [c for c in _TARGET if bad[c][i]]
        if which == ["FLAGS"] and (fl_ours[i] ^ fl_ref[i]) == 8 and fl_ref[i] & 2:
            cause = "FLAGS 8 of a deblended object (detector side: its deblending branch, not its gathered pixels)"
        elif disputed[i]:
            cause = ("SExtractor's CLEAN Y and CLEAN N segmentation maps label a pixel of it differently "
                     "(renumbering collision in the check image; measured on the CLEAN Y map)")
        elif early[i]:
            cause = "measured before SExtractor blanks the frame's last row (its detected pixels unblanked)"
        else:
            cause = "not diagnosed"
        out.append((int(cat["NUMBER"][i]), ", ".join(which), cause))
    return out


def sep_like_sextractor(sx: dict, config: dict) -> tuple[dict, np.ndarray]:
    """sep on the same background-subtracted image and global rms, sep-docs recipe; matched to the
    SExtractor catalogue within 1 px.  Returns (columns keyed like ours, matched index or -1)."""
    import sep

    data = np.ascontiguousarray(sx["sub"].astype(np.float64))
    rms = sx["rms"]
    aper = [float(v) for v in str(config.get("PHOT_APERTURES", "5")).split(",")]
    auto = [float(v) for v in str(config.get("PHOT_AUTOPARAMS", "2.5,3.5")).split(",")]
    kern = np.array([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]])
    objs = sep.extract(data, 1.5, err=rms, minarea=int(config.get("DETECT_MINAREA", 5)), filter_kernel=kern,
                       deblend_nthresh=32, deblend_cont=float(config.get("DEBLEND_MINCONT", 0.005)),
                       clean=True, clean_param=1.0)
    x, y, a, b, th = objs["x"], objs["y"], objs["a"], objs["b"], objs["theta"]
    fa, fae, _ = sep.sum_circle(data, x, y, aper[0] / 2.0, err=rms, subpix=5)
    kr, _ = sep.kron_radius(data, x, y, a, b, th, 6.0)
    kf = np.maximum(auto[0] * kr, auto[1])
    fu, fue, _ = sep.sum_ellipse(data, x, y, a, b, th, kf, err=rms, subpix=1)
    fr, _ = sep.flux_radius(data, x, y, 6.0 * a, 0.5, normflux=fu, subpix=5)
    xw, yw, _ = sep.winpos(data, x, y, 2.0 / 2.35 * fr)
    cat = sx["cat"]
    cx, cy = np.asarray(cat["X_IMAGE"]) - 1, np.asarray(cat["Y_IMAGE"]) - 1
    d2 = (cx[:, None] - x[None]) ** 2 + (cy[:, None] - y[None]) ** 2
    j = np.argmin(d2, axis=1)
    ok = d2[np.arange(len(cx)), j] < 1.0
    idx = np.where(ok, j, -1)
    cols = {"x": x, "y": y, "xwin": xw, "ywin": yw, "x2": objs["x2"], "a": a, "theta": np.degrees(th),
            "errx2": objs["errx2"], "npix": objs["npix"], "flux_iso": objs["flux"], "peak": objs["peak"],
            "flux_aper": fa, "fluxerr_aper": fae, "kron_radius": kf, "flux_auto": fu, "fluxerr_auto": fue,
            "flux_radius": fr, "flags": objs["flag"].astype(np.int64)}
    res = {}
    for k, v in cols.items():
        v = np.asarray(v, float)
        res[k] = torch.from_numpy(np.where(idx >= 0, v[np.clip(idx, 0, None)], np.nan))
    return res, idx


def _remaining_lines(res: dict, cat: Table, seg: np.ndarray, disputed=()) -> list[str]:
    rest = remaining(res, cat, seg, disputed)
    if not rest:
        return [f"\nEvery object agrees in {', '.join(_TARGET)}."]
    out = [f"\nObjects disagreeing in {', '.join(_TARGET)} ({len(rest)}), by cause:\n",
           "| cause | objects | NUMBER: columns |", "| --- | --- | --- |"]
    for cause in sorted({c for *_, c in rest}):
        objs = [f"{num}: {cols}" for num, cols, c in rest if c == cause]
        out.append(f"| {cause} | {len(objs)} | {'; '.join(objs)} |")
    return out


def _plain_mirror(self, i):
    """The mirror coordinate without SExtractor's truncation toward zero (for the ablation only)."""
    return self.m.view((-1,) + (1,) * (i.dim() - 1)) - i


def ablation_lines(sx: dict, noclean: dict, config: dict) -> list[str]:
    """The measurement rules switched off one at a time: % of objects agreeing per column."""
    from astroprep_torch.photometry import kron, stamps

    cols = ("XWIN_IMAGE", "YWIN_IMAGE", "KRON_RADIUS", "MAG_AUTO", "FLUX_RADIUS", "FLAGS")
    variants = [("every rule", ()), ("without always_blanked (CLEANed rows blanked late)", ("always_blanked",)),
                ("without unblanked / always_blanked (CLEAN paste-back)", ("unblanked", "always_blanked")),
                ("without the border mirror truncation", "mirror"),
                ("without the float32 Kron centre", "float"),
                ("with the BACKGROUND map, not the mesh, for FLAGS 4", ("mesh",)),
                ("without FLAGS 2 from the detector", ("blended",))]
    out = ["\nAblation (each rule left out in turn; % of the objects agreeing, and how many disagree):\n",
           "| rules | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    real, real_fc = stamps._MirrorCentre.mirror, kron._float_centres
    for label, drop in variants:
        sx2 = dict(sx, seg=sx["seg"].copy(), cat=sx["cat"].copy())
        if drop == "mirror":
            stamps._MirrorCentre.mirror, drop = _plain_mirror, ()
        if drop == "float":
            kron._float_centres, drop = (lambda o: o), ()
        try:
            res, _, _ = measure_like_sextractor(sx2, config, noclean=noclean, drop=drop)
        finally:
            stamps._MirrorCentre.mirror, kron._float_centres = real, real_fc
        ok = compare(res, sx2["cat"])
        out.append(f"| {label} | " + " | ".join(f"{ok[c][0]:.1f} ({round((100 - ok[c][0]) * ok[c][1] / 100)})"
                                               for c in cols) + " |")
    return out


def parity_frame(name: str, image: Path, config: dict, workdir: Path, lines: list[str], timing: bool,
                 ablation: bool = False):
    sx = run_sextractor(image, workdir, config)
    noclean = run_sextractor(image, workdir.with_name(workdir.name + "_noclean"), dict(config, CLEAN="N"))
    res, merged, blended = measure_like_sextractor(sx, config, noclean=noclean)
    n = len(sx["cat"])
    excl_xy = {c: merged | blended for c in ("X_IMAGE", "Y_IMAGE")}
    for c in ("X2_IMAGE", "A_IMAGE", "THETA_IMAGE", "ISOAREA_IMAGE"):
        excl_xy[c] = merged
    excl_xy["ERRX2_IMAGE"] = merged
    ours = compare(res, sx["cat"], excl_xy)
    sres, idx = sep_like_sextractor(sx, config)
    sep_cols = compare(sres, sx["cat"], {c: idx < 0 for c, *_ in COLUMNS})
    lines.append(f"\n### {name}: {n} SExtractor objects ({sx['missing']} absent from its segmentation map, "
                 f"{sx['repaired']} restored there ({sx['relabelled']} px) from the CLEAN N map, "
                 f"{sx['victims']} swallowed by CLEAN, {int(merged.sum())} with more pixels than ISOAREA (CLEAN "
                 f"masters), {int(blended.sum())} deblended; sep matched {int((idx >= 0).sum())} "
                 f"within 1 px)\n")
    lines.append(f"SExtractor config: {config}\n")
    lines.append("| column | tolerance | ours vs SExtractor (% objects, n) | sep vs SExtractor (% matched, n) |")
    lines.append("| --- | --- | --- | --- |")
    for col, key, tol, rel in COLUMNS:
        tol_s = f"{tol:g}{' rel' if rel else (' px' if 'IMAGE' in col and col[0] in 'XY' else '')}"
        tol_s = "0.01 mag" if col == "MAG_AUTO" else tol_s
        o, s = ours[col], sep_cols[col]
        lines.append(f"| {col} | {tol_s} | {o[0]:.1f} ({o[1]}) | {s[0]:.1f} ({s[1]}) |")
    lines.append("\nX/Y_IMAGE of deblended objects and the moments/ISOAREA/ERRX2 of CLEAN masters are "
                 "SExtractor-supplied (see module docstring), so they are left out of those rows; FLAGS 2 "
                 "(deblended) is the detector's too (passed as ``blended``).")
    lines += _remaining_lines(res, sx["cat"], sx["seg"], sx.get("disputed", ()))
    if ablation:
        lines += ablation_lines(sx, noclean, config)
    if timing:
        img, seg = _t(sx["sub"]), _t(sx["seg"])
        kw = dict(filtered=_t(sx["filt"]), mask_type=str(config.get("MASK_TYPE", "CORRECT")).lower())
        t = timeit(lambda: measure(img, seg, sx["rms"], **kw), repeat=3, warmup=1)
        lines.append(f"\nmeasure() time on this frame: {t:.3f} s (median of 3), {n} objects")
    print("\n".join(lines[-len(COLUMNS) - 12:]))
    return ours, sep_cols


def speed(lines: list[str], size: int = 4096, n_stars: int = 20000, repeat: int = 3):
    """measure() vs sep's aperture/Kron/AUTO/FLUX_RADIUS/winpos calls on a simulated frame with a
    segmentation from a plain threshold + 8-connected labelling (photometry only; detection excluded)."""
    import sep
    from scipy import ndimage

    from astroprep_torch.photometry import sextractor_filter
    from astroprep_torch.sim import simulate_frame

    fr = simulate_frame((size, size), n_stars=n_stars, seed=2)
    image = (fr.image - fr.background).contiguous()
    rms = float(fr.variance.sqrt().mean())
    filt = sextractor_filter(image)
    lab, nlab = ndimage.label((filt[0, 0] > 1.5 * rms).numpy(), structure=np.ones((3, 3)))
    counts = np.bincount(lab.ravel())
    keep = counts >= 5
    keep[0] = False
    remap = np.zeros(len(counts), np.int64)
    remap[keep] = np.arange(1, keep.sum() + 1)
    seg = torch.from_numpy(remap[lab])[None, None]
    nobj = int(keep.sum())
    kw = dict(filtered=filt, phot_apertures=(10.0,), mask_type="correct")
    res = measure(image, seg, rms, **kw)
    t_ours = timeit(lambda: measure(image, seg, rms, **kw), repeat=repeat, warmup=1)
    kw_none = dict(kw, mask_type="none")
    t_none = timeit(lambda: measure(image, seg, rms, **kw_none), repeat=repeat, warmup=1)
    data = image[0, 0].double().numpy()
    x, y = res["x"].double().numpy(), res["y"].double().numpy()
    a, b = res["a"].double().numpy(), res["b"].double().numpy()
    th = np.radians(res["theta"].double().numpy())

    def sep_phot():
        f, fe, _ = sep.sum_circle(data, x, y, 5.0, err=rms, subpix=5)
        kr, _ = sep.kron_radius(data, x, y, a, b, th, 6.0)
        kf = np.maximum(2.5 * kr, 3.5)
        fu, fue, _ = sep.sum_ellipse(data, x, y, a, b, th, kf, err=rms, subpix=1)
        r, _ = sep.flux_radius(data, x, y, 6.0 * a, 0.5, normflux=fu, subpix=5)
        sep.winpos(data, x, y, 2.0 / 2.35 * r)

    t_sep = timeit(sep_phot, repeat=repeat, warmup=1)
    lines += [f"\n### Speed: photometry of {nobj} objects on a simulated {size}x{size} frame\n",
              "| what | median time (s) | ratio to sep |", "| --- | --- | --- |",
              f"| ours: measure() (isophotal + APER + Kron/AUTO + FLUX_RADIUS + XWIN, MASK_TYPE CORRECT) | "
              f"{t_ours:.3f} | {t_ours / t_sep:.2f} |",
              f"| ours: measure(), MASK_TYPE NONE | {t_none:.3f} | {t_none / t_sep:.2f} |",
              f"| sep: sum_circle + kron_radius + sum_ellipse + flux_radius + winpos (no masking, no "
              f"isophotal part) | {t_sep:.3f} | 1.00 |",
              f"\n{machine()}; medians of {repeat} after 1 warm-up."]
    print("\n".join(lines[-8:]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the simulated 2048^2 frame")
    ap.add_argument("--speed-only", action="store_true", help="only the 4096^2 speed comparison")
    ap.add_argument("--size", type=int, default=4096)
    ap.add_argument("--stars", type=int, default=20000)
    args = ap.parse_args()
    if args.speed_only:
        torch.set_num_threads(int(os.environ.get("ASTROPREP_THREADS", "2")))
        lines = ["# Photometry speed", "", machine()]
        speed(lines, args.size, args.stars)
        write_result("photometry_speed", "\n".join(lines) + "\n")
        return
    torch.set_num_threads(int(os.environ.get("ASTROPREP_THREADS", "2")))
    lines = ["# Photometry parity vs SExtractor (source-extractor 2.25.0) and sep", "",
             machine(), "", "Command: `python experiments/photometry_parity.py`", ""]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        sep_dir = SHARED_DATA / "sep"
        cfg_sep = {"c": str(sep_dir / "default.sex"), "MASK_TYPE": "NONE", "PHOT_APERTURES": "10",
                   "PHOT_AUTOPARAMS": "2.5,0.0", "DEBLEND_MINCONT": 1.0}
        parity_frame("sep/image.fits (default.sex)", sep_dir / "image.fits", cfg_sep, tmp / "sep", lines, True)
        cfg_d = {"MASK_TYPE": "CORRECT", "PHOT_APERTURES": "5", "PHOT_AUTOPARAMS": "2.5,3.5",
                 "DETECT_MINAREA": 5, "DEBLEND_MINCONT": 0.005, "SATUR_LEVEL": 50000.0}
        m13 = SHARED_DATA / "astropy_images" / "m13.fits"
        m13f = tmp / "m13f.fits"
        fits.writeto(m13f, fits.getdata(m13).astype(np.float32), overwrite=True)
        parity_frame("astropy_images/m13.fits (SExtractor defaults)", m13f, cfg_d, tmp / "m13", lines, True,
                     ablation=True)
        if not args.quick:
            from astroprep_torch.sim import simulate_frame

            fr = simulate_frame((2048, 2048), n_stars=5000, seed=1)
            simf = tmp / "sim.fits"
            fits.writeto(simf, fr.image[0, 0].numpy(), overwrite=True)
            cfg_s = dict(cfg_d, SATUR_LEVEL=60000.0)
            parity_frame("simulated 2048x2048, 5000 stars (SExtractor defaults)", simf, cfg_s, tmp / "sim",
                         lines, True, ablation=True)
    path = write_result("photometry_parity", "\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
