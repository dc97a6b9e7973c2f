"""Background outputs on fixed inputs, saved or checked bitwise (refactoring guard, issue #23).

Simulated 1024^2 (plain, masked + NaN, mad_std with 50x70 boxes, exact, SExtractor mode, padded 1000x990,
a batch of two, integer-valued) and 4096^2 frames, and ../shared/data/sep/image.fits in both modes, each on
2 and 1 threads: background, rms, the filtered mesh and global_rms.

Usage: PYTHONPATH=$PWD ASTROPREP_ADAPT_THREADS=0 python experiments/background_bitwise.py before.pt          (save)
       PYTHONPATH=$PWD ASTROPREP_ADAPT_THREADS=0 python experiments/background_bitwise.py x.pt check before.pt (compare; exit 1 on any difference)
"""
import sys, torch
import astroprep_torch as ap
from astroprep_torch.background import background_2d, global_rms
from astroprep_torch.io import read_fits

def cases():
    for n in (1024, 4096):
        f = ap.sim.simulate_frame((n, n), n_stars=int(3000 * (n / 2048) ** 2), seed=1)
        img = f.image if hasattr(f, "image") else f[0]
        yield f"sim{n}", img, None, {}
        if n == 1024:
            m = torch.zeros_like(img, dtype=torch.bool); m[..., 100:300, 200:260] = True
            img2 = img.clone(); img2[..., 5, 7] = float("nan")
            yield "sim1024_mask_nan", img2, m, {}
            yield "sim1024_mad", img, m, {"rms_estimator": "mad_std", "estimator": "median", "box_size": (50, 70)}
            yield "sim1024_exact", img, None, {"exact": True}
            yield "sim1024_sex", img, m, {"method": "sextractor"}
            yield "sim1000_pad", img[..., :1000, :990].contiguous(), None, {}
            yield "sim1024_b2", torch.cat([img, img * 1.5 + 3]), None, {"filter_threshold": 2.0}
            yield "sim1024_int", torch.round(img), None, {}
    fi = read_fits(str(__import__("pathlib").Path(__file__).resolve().parents[1].parent / "shared" / "data" / "sep" / "image.fits"))
    img = fi.data if hasattr(fi, "data") else fi.image
    yield "sep_sex", img, None, {"method": "sextractor"}
    yield "sep_phot", img, None, {}

res = {}
for threads in (2, 1):
    torch.set_num_threads(threads)
    for name, img, m, kw in cases():
        d = {}
        r = background_2d(img, m, mesh_out=d, **kw)
        res[f"{name}_t{threads}"] = (r.background, r.rms, d["mesh"], global_rms(d["mesh"]))
        print(name, threads, float(r.background.mean()), float(r.rms.mean()), flush=True)
if len(sys.argv) > 2 and sys.argv[2] == "check":
    ref = torch.load(sys.argv[3])
    bad = [k for k in ref if not all(torch.equal(a, b) for a, b in zip(ref[k], res[k]))]
    print("MISMATCH", bad if bad else "none", "of", len(ref))
    sys.exit(1 if bad else 0)
torch.save(res, sys.argv[1])
