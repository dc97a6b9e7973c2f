"""Bitwise equivalence of a refactoring (issue 23): outputs of subtract, align, wcs, cutouts, io and
sim on fixed inputs, saved from one checkout and compared (torch.equal on the bits) in another.

Fixed inputs: ImageSubtraction on a simulated pair with and without variance maps (and its other
paths), Reproject / AlignToReference / register / refine / find_peaks on a simulated SIP pair,
match_sources on random point sets, _parse_header and TanWCS of every header in shared/data's
astropy_wcs_hdrs, sfft_decam_decorr and swarp_refs, simulate_triplets and simulated frames with a
seed (all defects), extract, read_fits of a few files and write_fits round trips. One intra-op
thread: the simulator's scatter-adds are not bit-reproducible across thread counts.

Run (ONLY=prefix,prefix restricts the cases):
    cd <old checkout> && PYTHONPATH=$PWD python <this file> save /tmp/before.pt
    cd <new checkout> && PYTHONPATH=$PWD python experiments/refactor_equivalence.py compare /tmp/before.pt
"""
import glob
import os
import sys
import tempfile
import warnings
from pathlib import Path

import astroprep_torch  # noqa: F401  (first: OpenMP wait policy)
import numpy as np
import torch
warnings.simplefilter("ignore")
from astropy.io import fits
from astroprep_torch import subtract, align, wcs as W, cutouts, io as aio, sim
from astroprep_torch.pipeline import AlignToReference
torch.manual_seed(0); torch.set_num_threads(1)
out = {}
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import SHARED_DATA  # noqa: E402

D = str(SHARED_DATA)

def rec(x):
    if isinstance(x, torch.Tensor): return x.detach().cpu()
    if isinstance(x, tuple) and hasattr(x, "_fields"): return {"__nt__": type(x).__name__, **{k: rec(getattr(x, k)) for k in x._fields}}
    if isinstance(x, (list, tuple)): return [rec(v) for v in x]
    if isinstance(x, dict): return {str(k): rec(v) for k, v in x.items()}
    if isinstance(x, np.ndarray): return torch.from_numpy(np.ascontiguousarray(x)) if x.dtype != object else repr(x)
    if hasattr(x, "__dataclass_fields__"): return {k: rec(getattr(x, k)) for k in x.__dataclass_fields__}
    if isinstance(x, fits.Header): return x.tostring()
    if isinstance(x, (int, float, str, bool, type(None), np.generic)): return x
    if isinstance(x, W.TanWCS): return {k: rec(v) for k, v in x.state_dict().items()} | {"repr": repr(x)}
    return repr(type(x))

ONLY = [o for o in os.environ.get("ONLY", "").split(",") if o]
def run(name, fn):
    if ONLY and not any(name.startswith(o) for o in ONLY): return
    try: out[name] = rec(fn())
    except Exception as e: out[name] = f"EXC {type(e).__name__}: {e}"

# sim frames
pair = sim.simulate_pair((384, 384), n_stars=1500, seed=3, n_moving=2, n_transients=5)
run("sim_pair", lambda: pair)
run("sim_frame_sip", lambda: sim.simulate_frame((256, 320), n_stars=800, seed=5, sip=True, psf="moffat", defects="all" if False else None))
run("sim_frame_defects", lambda: sim.simulate_frame((256, 256), n_stars=500, seed=7, defects={"moonlight": 0.5, "clouds": 0.3, "shutter": 0.4, "trail": 0.6}))
run("sim_frame_donut", lambda: sim.simulate_frame((200, 240), n_stars=300, seed=8, psf="moffat", sky_ripple=5.0, saturation=None, defects={"defocus": 0.5}))
# subtraction
s, t = pair.science, pair.reference
sci, tmp = s.image, t.image
tmp_a = align.reproject(tmp, W.TanWCS.from_header(t.header), W.TanWCS.from_header(s.header), sci.shape[-2:]).image
tmp_a = torch.nan_to_num(tmp_a, nan=1000.0)
run("sub_novar", lambda: subtract.image_subtraction(sci, tmp_a, gain=1.5, read_noise=10.0))
run("sub_var", lambda: subtract.image_subtraction(sci, tmp_a, science_var=s.variance, template_var=t.variance, stamp_grid=(4, 4)))
run("sub_module", lambda: subtract.ImageSubtraction(stamp_grid=6, stamp_layout="hotpants", spatial_order=1, debias=False)(sci, tmp_a))
run("sub_variants", lambda: subtract.image_subtraction(sci, tmp_a, convolve="science", normalize="template", tile_size=None, weighting="none", calibrate_noise=False, stamp_positions=torch.tensor([[100., 100.], [200., 250.], [300., 120.]])))
def _ctx():
    c = subtract.image_subtraction(sci, tmp_a, return_context=True)
    c = c._asdict() if hasattr(c, "_asdict") else c
    return {k: v for k, v in c.items() if k != "basis"}
run("sub_ctx", _ctx)
def coeffs():
    r = subtract.image_subtraction(sci, tmp_a)
    return subtract.image_subtraction(sci, tmp_a, coefficients=r.kernel_coefficients[0].double(), convolve="template")
run("sub_coeffs", coeffs)
b2 = torch.cat([sci, tmp_a]); b2t = torch.cat([tmp_a, sci])
run("sub_batch", lambda: subtract.image_subtraction(b2, b2t, stamp_grid=(5, 5), saturation=50000., lower_limit=0.0))
sub_nan = tmp_a.clone(); sub_nan[..., 50:60, 70:90] = float("nan")
run("sub_nan", lambda: subtract.image_subtraction(sci, sub_nan))
def ggrad():
    m = subtract.ImageSubtraction(stamp_grid=4, learnable=True, convolve="template"); torch.manual_seed(0)
    loss = m.fit_gradient(sci, tmp_a, steps=5)
    return loss, m.kernel_coefficients.detach().clone(), m(sci, tmp_a)
run("sub_ggrad", ggrad)
# align
sp = sim.simulate_pair((320, 320), n_stars=1200, seed=11, sip=True, rotation=0.5, n_transients=0, n_moving=0)
ws, wr = W.TanWCS.from_header(sp.science.header), W.TanWCS.from_header(sp.reference.header)
for interp in ("bilinear", "bicubic", "lanczos3", "nearest"):
    run(f"reproj_{interp}", lambda: align.reproject(sp.science.image, ws, wr, (320, 320), sp.science.mask, interpolation=interp, variance=sp.science.variance))
    run(f"reproj_flux_{interp}", lambda: align.reproject(sp.science.image, ws, wr, (300, 330), interpolation=interp, conserve_flux=True, grid_step=None, chunk_rows=64, variance=sp.science.variance))
run("Reproject", lambda: align.Reproject((320, 320))(sp.science.image, ws, wr))
run("atr_wcs", lambda: AlignToReference()(sp.science.image, sp.reference.image, sp.science.mask, src_wcs=ws, dst_wcs=wr, variance=sp.science.variance, extra=sp.science.variance.sqrt()))
run("atr_stars", lambda: AlignToReference(method="stars")(sp.science.image, sp.reference.image, variance=sp.science.variance))
run("register", lambda: align.register(sp.science.image, sp.reference.image))
run("refine", lambda: align.refine(sp.science.image, sp.reference.image))
run("refine_wcs", lambda: align.refine(sp.science.image, sp.reference.image, src_wcs=ws, dst_wcs=wr, fit_scale=False, steps=10))
run("find_peaks", lambda: align.find_peaks(sp.science.image))
run("find_peaks2", lambda: align.find_peaks(torch.cat([sp.science.image, sp.reference.image]), fwhm=2.0, threshold=3.0, max_peaks=50, box_size=32))
g = torch.Generator().manual_seed(1)
for i, (n, outl, rot, sc, fl) in enumerate([(50, 0.0, 10., 1.0, True), (200, 0.2, 123., 1.05, False), (400, 0.1, -40., 0.95, False), (30, 0.3, 170., 1.0, True), (8, 0.0, 5., 1.0, False)]):
    src = torch.rand(n, 2, generator=g, dtype=torch.float64) * 1000
    th = np.radians(rot)
    R = torch.tensor([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]) * sc
    dst = src @ R.T + torch.tensor([30., -20.])
    k = int(outl * n); dst[:k] = torch.rand(k, 2, generator=g, dtype=torch.float64) * 1000
    perm = torch.randperm(n, generator=g); dst = dst[perm]
    flux = torch.rand(n, generator=g, dtype=torch.float64) * 100 + 1
    kw = dict(src_flux=flux, dst_flux=flux[perm]) if fl else {}
    run(f"match_{i}", lambda: align.match_sources(src, dst, **kw))
    run(f"match_aff_{i}", lambda: align.match_sources(src.float(), dst.float(), transform="affine", **kw))
# wcs
hdrs = []
for p in sorted(glob.glob(f"{D}/astropy_wcs_hdrs/*")) + sorted(glob.glob(f"{D}/sfft_decam_decorr/*.fits")) + sorted(glob.glob(f"{D}/swarp_refs/*.head")) + [f"{D}/astropy_images/m13.fits"]:
    if p.endswith((".hdr", ".head")):
        text = open(p, "rb").read().decode("latin-1")
        hdrs.append((p, fits.Header.fromstring(text, sep="\n" if "\n" in text[:81] else "")))
    elif p.endswith((".fits", ".fits.gz")):
        try:
            with fits.open(p) as hl:
                for i, h in enumerate(hl): hdrs.append((f"{p}[{i}]", h.header.copy()))
        except Exception as e: print("skip", p, e)
for p, h in hdrs:
    run(f"parse:{p}", lambda: W._parse_header(h))
    run(f"tanwcs:{p}", lambda: W.TanWCS.from_header(h))
print("headers", len(hdrs))
# cutouts
run("triplets", lambda: cutouts.simulate_triplets(40, seed=4))
run("triplets2", lambda: cutouts.simulate_triplets(17, size=31, seed=9, real_fraction=0.2, dtype=torch.float64))
imgs = torch.randn(3, 2, 100, 120, generator=g)
xy = torch.rand(7, 2, generator=g) * torch.tensor([140., 120.]) - 10
bi = torch.tensor([0, 1, 2, 0, 1, 2, 0])
run("extract", lambda: cutouts.extract(imgs, xy, 15, bi))
run("extract2", lambda: cutouts.extract(imgs, xy.round(), (9, 13), bi))
run("extract_bil", lambda: cutouts.extract(imgs, xy, 15, bi, mode="bilinear", mask=imgs > 1.5, fill_value=-3.0))
run("extract_bil2", lambda: cutouts.extract(imgs[:1], xy[:4], (7, 10), mode="bilinear"))
run("extract_mask", lambda: cutouts.extract(imgs, xy, 15, bi, mask=imgs[:, :1] > 1.0, fill_value=float("nan")))
run("extract_bad", lambda: cutouts.extract(imgs, xy, 15, bi[:3]))
run("extract3", lambda: cutouts.extract(imgs[:1], xy[:3], 21))
run("make_triplets", lambda: cutouts.make_triplets(imgs[:, :1], imgs[:, 1:], imgs[:, :1] - imgs[:, 1:], xy[:3], size=11))
# io
for p in [f"{D}/astropy_images/m13.fits", f"{D}/astropy_images/m13_rice.fits", f"{D}/astropy_wcs_hdrs/j94f05bgq_flt.fits", f"{D}/astropy_wcs_hdrs/sip.fits", f"{D}/hotpants_decam/hotpants_diff.fits", f"{D}/astropy_wcs_hdrs/dss.14.29.56-62.41.05.fits.gz"] + sorted(glob.glob(f"{D}/sfft_decam_decorr/*.fits"))[:2]:
    run(f"read:{p}", lambda: aio.read_fits(p))
    run(f"read64:{p}", lambda: aio.read_fits(p, hdu=None, dtype=torch.float64))
run("read_hdu1", lambda: aio.read_fits(f"{D}/astropy_wcs_hdrs/j94f05bgq_flt.fits", hdu=1))
run("read_bad", lambda: aio.read_fits(f"{D}/astropy_wcs_hdrs/j94f05bgq_flt.fits", hdu=7))
run("read_bad2", lambda: aio.read_fits(f"{D}/astropy_wcs_hdrs/j94f05bgq_flt.fits", hdu="NOPE"))
td = tempfile.mkdtemp()
def write_read(name, data, **kw):
    p = os.path.join(td, name); aio.write_fits(p, data, **kw)
    with fits.open(p) as hl: return [(h.header.tostring(), None if h.data is None else torch.from_numpy(np.asarray(h.data).astype(np.float64))) for h in hl]
hdr = sp.science.header
run("write1", lambda: write_read("a.fits", sp.science.image, header=hdr))
run("write2", lambda: write_read("b.fits", sp.science.image[0, 0].numpy(), wcs=ws))
run("write3", lambda: write_read("c.fits", sp.science.mask, header=hdr))
run("write4", lambda: write_read("d.fits", torch.cat([sp.science.image, sp.reference.image]), header=hdr))
run("write5", lambda: write_read("e.fits", sp.science.image.double(), header=hdr, overwrite=True, index=0))
run("write_exists", lambda: (write_read("f.fits", sp.science.image), write_read("f.fits", sp.science.image)))
path = sys.argv[2]
if sys.argv[1] == "save":
    torch.save(out, path); print("saved", len(out))
else:
    ref = torch.load(path, weights_only=False)
    def eq(a, b, where):
        if isinstance(a, torch.Tensor):
            if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape: return [where]
            if a.is_floating_point():
                ok = torch.equal(a.view(-1).contiguous().view(torch.int64 if a.dtype == torch.float64 else torch.int32 if a.dtype == torch.float32 else torch.int16), b.view(-1).contiguous().view(torch.int64 if b.dtype == torch.float64 else torch.int32 if b.dtype == torch.float32 else torch.int16)) if a.dtype in (torch.float64, torch.float32, torch.float16) else torch.equal(a, b)
            else: ok = torch.equal(a, b)
            return [] if ok else [where]
        if isinstance(a, dict):
            if not isinstance(b, dict) or a.keys() != b.keys(): return [where + " keys"]
            return sum((eq(a[k], b[k], where + "." + k) for k in a), [])
        if isinstance(a, list):
            if not isinstance(b, list) or len(a) != len(b): return [where + " len"]
            return sum((eq(x, y, f"{where}[{i}]") for i, (x, y) in enumerate(zip(a, b))), [])
        if isinstance(a, float) and isinstance(b, float) and np.isnan(a) and np.isnan(b): return []
        if isinstance(a, str) and a.startswith("EXC") and isinstance(b, str):
            return [] if a.split(":")[0] == b.split(":")[0] else [where + f" {a} vs {b}"]
        return [] if a == b else [where + f" {str(a)[:80]} vs {str(b)[:80]}"]
    bad = []
    for k in ref:
        if ONLY and not any(k.startswith(o) for o in ONLY): continue
        bad += eq(ref[k], out.get(k, "MISSING"), k)
    print("compared", len(ref), "mismatches", len(bad)); [print(" ", b) for b in bad[:40]]
    exc = [k for k, v in ref.items() if isinstance(v, str) and v.startswith("EXC")]
    print("exceptions in baseline:", [(k, ref[k][:100]) for k in exc])
    if len(sys.argv) > 3:
        for k in sys.argv[3:]:
            a, b = ref[k.split(".")[0]], out[k.split(".")[0]]
            for f in k.split(".")[1:]: a, b = a[f], b[f]
            d = (a.double() - b.double()).abs(); print(k, "maxdiff", float(d.nan_to_num(0).max()), float(a.double().abs().nan_to_num(0).max()))
