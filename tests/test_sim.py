import math

import numpy as np
import pytest
import torch
from astropy.wcs import WCS

from astroprep_torch import sim


def test_frame_shapes_and_truth():
    f = sim.simulate_frame((128, 160), n_stars=50, seed=3)
    assert f.image.shape == (1, 1, 128, 160)
    assert f.image.dtype == torch.float32
    for name in ("background", "noiseless", "variance"):
        assert getattr(f, name).shape == f.image.shape
    assert f.mask.dtype == torch.bool and f.defect_mask.dtype == torch.bool
    assert f.catalog["x"].shape == (50,)
    # Noise matches the variance model: (image - noiseless) / sqrt(var) ~ N(0, 1).
    z = (f.image - f.noiseless) / f.variance.sqrt()
    z = z[~f.mask]
    assert abs(z.mean().item()) < 0.05
    assert abs(z.std().item() - 1.0) < 0.05


def test_seeded_and_dtype():
    a = sim.simulate_frame((64, 64), n_stars=20, seed=7)
    b = sim.simulate_frame((64, 64), n_stars=20, seed=7)
    c = sim.simulate_frame((64, 64), n_stars=20, seed=8)
    assert torch.equal(a.image, b.image)
    assert not torch.equal(a.image, c.image)
    d = sim.simulate_frame((64, 64), n_stars=20, seed=7, dtype=torch.float64)
    assert d.image.dtype == torch.float64


@pytest.mark.parametrize("psf", ["gaussian", "moffat"])
def test_render_flux_and_centroid(psf):
    x = torch.tensor([20.3, 40.75], dtype=torch.float64)
    y = torch.tensor([30.6, 12.2], dtype=torch.float64)
    flux = torch.tensor([1000.0, 500.0], dtype=torch.float64)
    img = sim.render_stars((64, 64), x[:1], y[:1], flux[:1], fwhm=2.5, psf=psf)
    assert img.sum().item() == pytest.approx(1000.0, rel=1e-9)
    yy, xx = torch.meshgrid(torch.arange(64.0, dtype=torch.float64), torch.arange(64.0, dtype=torch.float64), indexing="ij")
    cx = (img * xx).sum() / img.sum()
    cy = (img * yy).sum() / img.sum()
    # Moffat wings are truncated at the stamp edge (0.5% of the flux for beta=2.5), which moves the
    # centroid by a few thousandths of a pixel; the Gaussian is exact.
    tol = 2e-4 if psf == "gaussian" else 5e-3
    assert cx.item() == pytest.approx(20.3, abs=tol)
    assert cy.item() == pytest.approx(30.6, abs=tol)


def test_gaussian_fwhm():
    img = sim.render_stars((41, 41), torch.tensor([20.0], dtype=torch.float64), torch.tensor([20.0], dtype=torch.float64),
                           torch.tensor([1.0], dtype=torch.float64), fwhm=3.0)
    yy, xx = torch.meshgrid(torch.arange(41.0, dtype=torch.float64), torch.arange(41.0, dtype=torch.float64), indexing="ij")
    var = (img * (xx - 20) ** 2).sum()
    # Pixel integration adds 1/12 px^2 to the variance of the continuous Gaussian.
    sigma = math.sqrt(var.item() - 1.0 / 12.0)
    assert 2.3548 * sigma == pytest.approx(3.0, rel=1e-3)


def test_pair_geometry_matches_wcs():
    p = sim.simulate_pair((256, 256), n_stars=100, shift=(4.5, -2.25), rotation=1.0, n_transients=5, n_moving=2, sip=True, seed=1)
    ref, sci = p.reference, p.science
    wr, ws = WCS(ref.header), WCS(sci.header)
    stars = ref.catalog["kind"] == 0
    ra, dec = wr.all_pix2world(ref.catalog["x"][stars].double().numpy(), ref.catalog["y"][stars].double().numpy(), 0)
    xs, ys = ws.all_world2pix(ra, dec, 0, tolerance=1e-10)
    sstars = sci.catalog["kind"] == 0
    np.testing.assert_allclose(xs, sci.catalog["x"][sstars].double().numpy(), atol=1e-3)
    np.testing.assert_allclose(ys, sci.catalog["y"][sstars].double().numpy(), atol=1e-3)
    # Transients appear only in the science catalog.
    assert int((sci.catalog["kind"] == 1).sum()) == 5 and int((ref.catalog["kind"] == 1).sum()) == 0
    assert p.transients["x"].shape == (5,)
    # Different seeing per epoch.
    assert ref.header["FWHM"] == 2.5 and sci.header["FWHM"] == 3.0


@pytest.mark.parametrize("defect", sim.DEFECTS)
def test_defects_change_the_frame(defect):
    good = sim.simulate_frame((128, 128), n_stars=60, seed=5)
    bad = sim.simulate_frame((128, 128), n_stars=60, seed=5, defects={defect: 0.5})
    assert bad.defect_mask.any()
    diff = (bad.noiseless - good.noiseless).abs()
    assert diff[bad.defect_mask].mean() > 5 * diff[~bad.defect_mask].mean().nan_to_num(0.0) or not (~bad.defect_mask).any() or defect == "defocus"


def test_bad_arguments():
    with pytest.raises(ValueError, match="shape"):
        sim.simulate_frame((4,), n_stars=1)
    with pytest.raises(ValueError, match="unknown defect"):
        sim.simulate_frame((64, 64), n_stars=1, defects=["rain"])
    with pytest.raises(ValueError, match="amplitude"):
        sim.simulate_frame((64, 64), n_stars=1, defects={"clouds": 2.0})
    with pytest.raises(ValueError, match="psf"):
        sim.render_stars((8, 8), torch.zeros(1), torch.zeros(1), torch.ones(1), psf="airy")


def test_saturation_masked():
    f = sim.simulate_frame((128, 128), n_stars=30, mag_range=(6.0, 8.0), saturation=20000.0, seed=2)
    assert f.mask.any()
    assert f.image.max().item() <= 20000.0


def test_sip_inverse_is_consistent():
    """AP/BP invert A/B (tools that use the header's inverse get the right pixels)."""
    import numpy as np

    h = sim.make_header((512, 512), sip=True)
    w = WCS(h)
    pix = np.array([[0.0, 0.0], [100.0, 400.0], [511.0, 511.0], [256.0, 10.0]])
    back = w.sip.foc2pix(w.sip.pix2foc(pix, 0), 0)
    np.testing.assert_allclose(back, pix, atol=5e-3)  # a 4th-order fit of the inverse


# ----------------------------------------------------------------------------------------------
# simulate_night
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scale", [1.0, 11.7])
def test_night_headers_times_and_truth(scale):
    from astropy.time import Time

    n = sim.simulate_night((256, 256), n_frames=5, n_stars=100, n_movers=8, pixel_scale=scale, exptime=30.0, seed=2)
    assert len(n.frames) == 5 and n.mjd.shape == (5,)
    gaps = torch.diff(n.mjd) * 1440.0
    assert bool(((gaps >= 5.0) & (gaps <= 10.0)).all())
    for k, f in enumerate(n.frames):
        h = f.header
        assert "T" in h["DATE-OBS"] and h["EXPTIME"] == 30.0
        assert Time(h["DATE-OBS"], scale="utc").mjd == pytest.approx(h["MJD-OBS"], abs=1e-8)
        assert h["MJD-OBS"] + 15.0 / 86400.0 == pytest.approx(float(n.mjd[k]), abs=1e-9)
        # Truth pixel positions follow each frame's own (jittered) WCS.
        x, y = WCS(h).all_world2pix(n.movers["ra"][:, k].numpy(), n.movers["dec"][:, k].numpy(), 0)
        np.testing.assert_allclose(x, n.movers["x"][:, k].numpy(), atol=1e-6)
        np.testing.assert_allclose(y, n.movers["y"][:, k].numpy(), atol=1e-6)
        assert int((f.catalog["kind"] == 2).sum()) == 8
    # Pointing jitter and changing seeing.
    assert len({f.header["CRPIX1"] for f in n.frames}) == 5
    assert len({f.header["FWHM"] for f in n.frames}) == 5
    # Trail length = rate x exposure time, in pixels.
    np.testing.assert_allclose(n.movers["trail"][:, 0].numpy(), (n.movers["rate"] * 0.5 / scale).numpy(), rtol=1e-3)


def test_night_motion_matches_rate_and_pa():
    from astropy import units as u
    from astropy.coordinates import SkyCoord

    n = sim.simulate_night((256, 256), n_stars=50, n_movers=30, pixel_scale=1.0, seed=5, dec=70.0)
    r = n.movers
    assert bool(((r["rate"] >= 0.1) & (r["rate"] <= 30.0)).all())
    c0 = SkyCoord(r["ra"][:, 0].numpy() * u.deg, r["dec"][:, 0].numpy() * u.deg)
    c1 = SkyCoord(r["ra"][:, -1].numpy() * u.deg, r["dec"][:, -1].numpy() * u.deg)
    dt = float(n.mjd[-1] - n.mjd[0]) * 1440.0
    np.testing.assert_allclose(c0.separation(c1).arcsec / dt, r["rate"].numpy(), rtol=1e-6)


def test_night_trail_flux_and_seed():
    a = sim.simulate_night((128, 128), n_stars=0, n_movers=1, n_transients=0, n_cosmics=0, n_hot_pixels=0,
                           pixel_scale=1.0, rate_range=(2.0, 2.0), mover_mag_range=(15.0, 15.0), seed=1)
    f = a.frames[0]
    source = (f.noiseless - f.background).sum().item()
    assert source == pytest.approx(a.movers["flux"][0].item(), rel=1e-3)
    # The trail is elongated along its motion: second moments differ.
    img = (f.noiseless - f.background)[0, 0].double()
    yy, xx = torch.meshgrid(torch.arange(128.0, dtype=torch.float64), torch.arange(128.0, dtype=torch.float64), indexing="ij")
    cx, cy = (img * xx).sum() / img.sum(), (img * yy).sum() / img.sum()
    assert cx.item() == pytest.approx(a.movers["x"][0, 0].item(), abs=0.05)
    assert cy.item() == pytest.approx(a.movers["y"][0, 0].item(), abs=0.05)
    b = sim.simulate_night((128, 128), n_stars=20, n_movers=3, seed=1)
    c = sim.simulate_night((128, 128), n_stars=20, n_movers=3, seed=1)
    assert torch.equal(b.frames[2].image, c.frames[2].image)


def test_night_detections_catalog():
    n = sim.simulate_night((256, 256), n_stars=100, n_movers=10, pixel_scale=1.0, seed=3)
    d = sim.simulate_detections(n, n_spurious=5, seed=1)
    keys = {"ra", "dec", "mjd", "mag", "snr", "pos_err", "a", "b", "theta", "x", "y", "exposure", "object"}
    assert keys <= set(d) and len({v.shape[0] for v in d.values()}) == 1
    assert bool((d["snr"] > 0).all()) and bool((d["pos_err"] > 0).all())
    assert int((d["object"] == -4).sum()) == 25


def test_night_without_images_has_the_same_truth():
    a = sim.simulate_night((128, 128), n_stars=30, n_movers=4, seed=9)
    b = sim.simulate_night((128, 128), n_stars=30, n_movers=4, seed=9, render=False)
    assert b.frames == [] and len(b.headers) == 5
    for key in ("x", "y", "ra", "dec", "snr", "trail"):
        assert torch.equal(a.movers[key], b.movers[key])
    assert torch.equal(a.stars["x"], b.stars["x"])
    assert a.headers[3]["CRPIX1"] == b.headers[3]["CRPIX1"] and a.headers[3]["FWHM"] == b.headers[3]["FWHM"]

# ------------------------------------------------------------------------------------------------
# raw-frame effects (issue 26)
# ------------------------------------------------------------------------------------------------
def test_camera_patterns_and_raw_frame_layout():
    cam = sim.make_camera((64, 80), overscan=16, vignetting=0.4, n_dust=2, seed=1)
    assert cam.bias.shape == (64, 96) and cam.flat.shape == (64, 80) and cam.dark.shape == (64, 80)
    assert abs(float(cam.flat.mean()) - 1.0) < 1e-9
    assert float(cam.flat[32, 40]) > float(cam.flat[0, 0]) * 1.3  # vignetted corners
    r = sim.expose(cam, torch.full((64, 80), 100.0), 10.0, seed=2)
    assert r.raw.shape == (1, 1, 64, 96) and float(r.raw.min()) >= 0
    assert r.header["BIASSEC"] == "[81:96,1:64]" and r.header["TRIMSEC"] == "[1:80,1:64]"
    assert torch.equal(r.raw, r.raw.round())  # an ADC gives integers
    # the overscan carries the bias level (and row pattern) only
    over = r.raw[0, 0, :, 80:] - cam.bias[:, 80:].float()
    assert abs(float(over.mean())) < 1.0 and float(over.std()) < 2 * cam.read_noise / cam.gain


def test_bleed_trails_and_saturation_truth():
    cam = sim.make_camera((64, 64), full_well=1000.0, seed=0)
    sig = torch.zeros(64, 64)
    sig[30:32, 20] = 5000.0  # 2 pixels far above the well of ~667 ADU
    r = sim.expose(cam, sig, 0.0, seed=1)
    col = r.saturated[0, 0, :, 20]
    assert int(col.sum()) > 2 and bool(col[30]) and not r.saturated[0, 0, :, 40].any()
    bled, trail = sim.bleed_columns(torch.tensor([[0.0], [3000.0], [0.0], [0.0], [0.0]]), 1000.0)
    assert bool(trail[1, 0]) and int(trail.sum()) == 3 and float(bled.max()) == 1000.0


def test_simulate_raw_and_calibration_frames():
    f = sim.simulate_frame((48, 56), n_stars=20, saturation=None, seed=4)
    cam = sim.make_camera((48, 56), full_well=3000.0, seed=5)  # a shallow well: the bright stars saturate
    r = sim.simulate_raw(f, cam, halo_fraction=0.05, seed=6)
    assert r.saturated.any()
    assert r.truth.shape == (1, 1, 48, 56) and float(r.truth.sum()) > float(f.noiseless.sum()) + 1.0  # halos
    assert "CRPIX1" in r.header and r.header["EXPTIME"] == f.header["EXPTIME"]
    cal = sim.simulate_calibration_frames(cam, n_bias=2, n_dark=3, n_flat=2, dark_exptime=30.0, seed=1)
    assert [len(cal[k]) for k in ("bias", "dark", "flat")] == [2, 3, 2]
    assert cal["dark"][0].header["EXPTIME"] == 30.0 and cal["flat"][0].header["IMAGETYP"] == "flat"
    # a bias frame: the bias pattern plus read noise
    d = cal["bias"][0].raw[0, 0] - cam.bias.float()
    assert abs(float(d.mean())) < 0.5
