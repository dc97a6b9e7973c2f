"""Astrometric calibration: matching to a reference catalog and TAN-SIP / TPV fits."""

import math
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("astropy.wcs")
from astropy.io import fits  # noqa: E402
from astropy.table import Table  # noqa: E402
from astropy.wcs import WCS  # noqa: E402

from astroprep_torch import astrometry as A  # noqa: E402
from astroprep_torch.sim import make_header  # noqa: E402
from astroprep_torch.wcs import TanWCS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::astropy.wcs.FITSFixedWarning",
                                        "ignore::astropy.io.fits.verify.VerifyWarning")
SHAPE = (512, 512)


def make_case(n=1500, seed=0, shape=SHAPE, sip=2.0, noise=0.03, missing=0.2, spurious=0.1):
    """Truth header with SIP, a catalog over a larger area (``missing`` dropped), detections with
    centroid noise and ``spurious`` extra sources, and a perturbed TAN starting header."""
    g = np.random.default_rng(seed)
    h, w = shape
    true = make_header(shape, ra=150.0, dec=30.0, pixel_scale=1.0, sip=sip)
    tw = WCS(true)
    m = int(n * 1.4)
    x, y = g.uniform(-0.2 * w, 1.2 * w, m), g.uniform(-0.2 * h, 1.2 * h, m)
    mag = g.uniform(12, 20, m)
    ra, dec = tw.all_pix2world(x, y, 0)
    keep = g.random(m) > missing
    cat = Table({"RA_ICRS": ra[keep], "DE_ICRS": dec[keep], "Gmag": mag[keep]})
    on = (x > -0.5) & (x < w - 0.5) & (y > -0.5) & (y < h - 0.5)
    dx, dy = x[on] + g.normal(0, noise, on.sum()), y[on] + g.normal(0, noise, on.sum())
    flux = 10 ** (-0.4 * (mag[on] - 25))
    ns = int(spurious * on.sum())
    dx, dy = np.r_[dx, g.uniform(0, w, ns)], np.r_[dy, g.uniform(0, h, ns)]
    flux = np.r_[flux, 10 ** (-0.4 * (g.uniform(12, 20, ns) - 25))]
    start = perturb(true, dra=1.0, ddec=-0.7, rot=0.5, scale=1.01)
    return dict(true=true, cat=cat, x=torch.tensor(dx), y=torch.tensor(dy), flux=torch.tensor(flux), start=start)


def perturb(header, dra=2.0, ddec=1.0, rot=0.5, scale=1.01):
    """SIP removed, pointing moved by (dra, ddec) arcmin, rotated by ``rot`` deg, scaled."""
    p = header.copy()
    for k in list(p.keys()):
        if k.split("_")[0] in ("A", "B", "AP", "BP"):
            del p[k]
    p["CTYPE1"], p["CTYPE2"] = "RA---TAN", "DEC--TAN"
    p["CRVAL1"] += dra / 60 / math.cos(math.radians(p["CRVAL2"]))
    p["CRVAL2"] += ddec / 60
    t = math.radians(rot)
    cd = np.array([[p["CD1_1"], p["CD1_2"]], [p["CD2_1"], p["CD2_2"]]])
    cd = cd @ np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]) * scale
    p["CD1_1"], p["CD1_2"], p["CD2_1"], p["CD2_2"] = cd.ravel()
    return p


def grid_error(true, wcs, shape=SHAPE, n=30):
    h, w = shape
    gx, gy = np.meshgrid(np.linspace(-0.5, w - 0.5, n), np.linspace(-0.5, h - 0.5, n))
    ra, dec = WCS(true).all_pix2world(gx.ravel(), gy.ravel(), 0)
    sx, sy = wcs.world_to_pixel(torch.tensor(ra), torch.tensor(dec))
    return np.hypot(sx.numpy() - gx.ravel(), sy.numpy() - gy.ravel())


@pytest.fixture(scope="module")
def case():
    return make_case()


@pytest.mark.parametrize("distortion", ["sip", "tpv"])
def test_solves_perturbed_header(case, distortion):
    r = A.solve_astrometry(case["x"], case["y"], case["flux"], case["cat"], shape=SHAPE,
                           wcs=TanWCS.from_header(case["start"]), order=3, distortion=distortion)
    err = grid_error(case["true"], r.wcs)
    assert np.sqrt((err ** 2).mean()) < 0.02 and err.max() < 0.05
    assert r.n_matches > 700 and r.rms_px < 0.08
    assert r.residuals.shape == (r.n_matches, 2)
    assert r.header["ASTRRMS1"] * 3600 == pytest.approx(float(r.rms[0]))
    # the header is what astropy reads: same mapping
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        aw = WCS(r.header)
    ra, dec = aw.all_pix2world([10.0, 400.0], [20.0, 300.0], 0)
    tra, tdec = r.wcs.pixel_to_world(torch.tensor([10.0, 400.0]), torch.tensor([20.0, 300.0]))
    assert np.allclose(ra, tra.numpy(), atol=1e-9) and np.allclose(dec, tdec.numpy(), atol=1e-9)


def test_pointing_and_scale_only_any_rotation(case):
    r = A.solve_astrometry(case["x"], case["y"], case["flux"], case["cat"], shape=SHAPE,
                           pointing=(150.01, 29.99), pixel_scale=1.02, order=3)
    err = grid_error(case["true"], r.wcs)
    assert np.sqrt((err ** 2).mean()) < 0.02


def test_module_over_flat_batch(case):
    solver = A.AstrometrySolver(case["cat"], order=3)
    wcs = TanWCS.from_header([case["start"], case["start"]])
    n = case["x"].numel()
    x, y, f = (torch.cat([case[k], case[k]]) for k in ("x", "y", "flux"))
    out = solver(x, y, f, wcs, SHAPE, batch_index=torch.arange(2).repeat_interleave(n))
    assert len(out) == 2 and all(np.sqrt((grid_error(case["true"], r.wcs) ** 2).mean()) < 0.02 for r in out)


def test_match_nearest_mutual():
    a = torch.tensor([[0.0, 0.0], [10.0, 10.0], [10.5, 10.0], [50.0, 50.0]], dtype=torch.float64)
    b = torch.tensor([[0.2, 0.1], [10.4, 10.0], [80.0, 80.0]], dtype=torch.float64)
    pairs = A.match_nearest(a, b, 2.0)
    assert sorted(map(tuple, pairs.tolist())) == [(0, 0), (2, 1)]


def test_catalog_formats_and_proper_motion(tmp_path):
    t = Table({"ra": [10.0, 20.0], "dec": [0.0, 45.0], "phot_g_mean_mag": [12.0, 13.0],
               "pmra": [1000.0, 0.0], "pmdec": [0.0, -3600.0]})
    for ext in ("fits", "ecsv", "csv", "parquet"):
        if ext == "parquet":
            pytest.importorskip("pyarrow")
        t.write(tmp_path / f"c.{ext}", overwrite=True)
        c = A.load_catalog(tmp_path / f"c.{ext}")
        assert len(c) == 2 and c.mag.tolist() == [12.0, 13.0]
    c = A.load_catalog(t, epoch=2026.0)  # 10 years after Gaia DR3's 2016.0
    assert float(c.ra[0] - 10.0) * 3600 == pytest.approx(10.0, rel=1e-6)
    assert float(c.dec[1] - 45.0) * 3600 == pytest.approx(-36.0, rel=1e-6)


def test_write_head_is_scamp_style(case, tmp_path):
    r = A.solve_astrometry(case["x"], case["y"], case["flux"], case["cat"], shape=SHAPE,
                           wcs=TanWCS.from_header(case["start"]), order=2, distortion="tpv")
    path = A.write_head(tmp_path / "f.head", r.header)
    lines = path.read_text().splitlines()
    assert lines[-1].rstrip() == "END" and all(len(line) == 80 for line in lines if not line.startswith("HISTORY"))
    h = fits.Header.fromtextfile(str(path))
    assert h["CTYPE1"] == "RA---TAN" and "PV1_4" in h
    w = TanWCS.from_header(h)
    assert w.has_tpv
    x = torch.tensor([5.0, 300.0])
    assert torch.allclose(torch.stack(w.pixel_to_world(x, x)), torch.stack(r.wcs.pixel_to_world(x, x)), atol=1e-10)


# -- bad input ----------------------------------------------------------------------------------
def test_no_overlap_with_catalog(case):
    cat = case["cat"].copy()
    cat["RA_ICRS"] += 5.0
    with pytest.raises(A.AstrometryError, match="no overlap with the catalog"):
        A.solve_astrometry(case["x"], case["y"], case["flux"], cat, shape=SHAPE, wcs=TanWCS.from_header(case["start"]))


def test_too_few_stars(case):
    with pytest.raises(A.AstrometryError, match="too few detections"):
        A.solve_astrometry(case["x"][:5], case["y"][:5], case["flux"][:5], case["cat"], shape=SHAPE,
                           wcs=TanWCS.from_header(case["start"]))


def test_catalog_without_radec(tmp_path):
    Table({"x": [1.0], "y": [2.0], "mag": [3.0]}).write(tmp_path / "bad.ecsv")
    with pytest.raises(ValueError, match=r"bad.ecsv: no RA and Dec column.*\['x', 'y', 'mag'\]"):
        A.load_catalog(tmp_path / "bad.ecsv")


def test_random_detections_are_rejected(case):
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(800, generator=g, dtype=torch.float64) * 511, torch.rand(800, generator=g, dtype=torch.float64) * 511
    with pytest.raises(A.AstrometryError):
        A.solve_astrometry(x, y, torch.rand(800, generator=g, dtype=torch.float64), case["cat"], shape=SHAPE,
                           wcs=TanWCS.from_header(case["start"]))


def test_cli_writes_head_and_fits(tmp_path):
    from astroprep_torch import cli
    from astroprep_torch.io import write_fits
    from astroprep_torch.sim import simulate_dithers

    f = simulate_dithers(1, (256, 256), n_stars=400, sip=1.0, seed=4, mag_range=(12.0, 18.0))[0]
    c = f.catalog
    Table({"ra": c["ra"].numpy(), "dec": c["dec"].numpy(), "phot_g_mean_mag": c["mag"].numpy()}).write(
        tmp_path / "ref.ecsv")
    write_fits(tmp_path / "frame.fits", f.image, header=perturb(f.header, dra=0.5, ddec=0.3, rot=0.5, scale=1.01))
    out = tmp_path / "out"
    assert cli.main(["astrometry", f"input={tmp_path / 'frame.fits'}", f"catalog={tmp_path / 'ref.ecsv'}",
                     f"output={out}"]) == 0
    with fits.open(out / "frame.fits") as hl:
        h = hl[0].header
        assert h["CTYPE1"] == "RA---TAN-SIP" and 0 < h["ASTRRMS1"] * 3600 < 0.1 and "astrometry" in "\n".join(h["HISTORY"])
    head = fits.Header.fromtextfile(str(out / "frame.head"))
    err = grid_error(f.header, TanWCS.from_header(head), shape=(256, 256))
    assert np.sqrt((err ** 2).mean()) < 0.05
