"""Tests for astroprep_torch.align: reprojection (vs reproject, SWarp), matching/registration (vs
astroalign), refinement, gradients."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import gradcheck, require_binary, shared_file  # noqa: F401

from astroprep_torch.align import (
    AlignmentError,
    Reproject,
    ReprojectResult,
    apply_transform,
    find_peaks,
    fit_transform,
    match_sources,
    pixel_to_pixel,
    refine,
    register,
    reproject,
    sample_image,
)

wcs_mod = pytest.importorskip("astroprep_torch.wcs")
TanWCS = wcs_mod.TanWCS


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def tan_header(shape, *, crpix_offset=(0.0, 0.0), rotation=0.0, scale=1.0, sip=False, ra=150.0, dec=30.0,
               pixscale_arcsec=1.0):
    """A TAN (optionally TAN-SIP) header; SIP gives ~2 px at the corners of a 128 px frame."""
    from astropy.io import fits

    h, w = shape
    s = pixscale_arcsec / 3600.0 * scale
    th = math.radians(rotation)
    hdr = fits.Header()
    hdr["NAXIS"] = 2
    hdr["NAXIS1"], hdr["NAXIS2"] = w, h
    hdr["CTYPE1"], hdr["CTYPE2"] = ("RA---TAN-SIP", "DEC--TAN-SIP") if sip else ("RA---TAN", "DEC--TAN")
    hdr["CRPIX1"] = (w + 1) / 2 + crpix_offset[0]
    hdr["CRPIX2"] = (h + 1) / 2 + crpix_offset[1]
    hdr["CRVAL1"], hdr["CRVAL2"] = ra, dec
    hdr["CD1_1"], hdr["CD1_2"] = -s * math.cos(th), s * math.sin(th)
    hdr["CD2_1"], hdr["CD2_2"] = s * math.sin(th), s * math.cos(th)
    if sip:
        n = max(h, w) / 2
        hdr["A_ORDER"] = hdr["B_ORDER"] = 3
        hdr["A_2_0"], hdr["A_1_1"], hdr["A_0_2"] = 1.2 / n**2, -0.6 / n**2, 0.4 / n**2
        hdr["B_2_0"], hdr["B_1_1"], hdr["B_0_2"] = 0.5 / n**2, 0.8 / n**2, -1.0 / n**2
        hdr["A_3_0"] = hdr["B_0_3"] = 0.5 / n**3
    return hdr


def star_field(shape, n=40, fwhm=3.0, seed=0, sky=100.0, dtype=torch.float64, border=8, plane=True):
    g = torch.Generator().manual_seed(seed)
    h, w = shape
    x = torch.rand(n, generator=g, dtype=torch.float64) * (w - 2 * border) + border
    y = torch.rand(n, generator=g, dtype=torch.float64) * (h - 2 * border) + border
    f = 200 + 5000 * torch.rand(n, generator=g, dtype=torch.float64) ** 3
    s = fwhm / 2.3548
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    img = torch.full((h, w), sky, dtype=torch.float64)
    if plane:
        img = img + 0.02 * xx + 0.01 * yy
    for i in range(n):
        img += f[i] / (2 * math.pi * s * s) * torch.exp(-((xx - x[i]) ** 2 + (yy - y[i]) ** 2) / (2 * s * s))
    return img[None, None].to(dtype), torch.stack([x, y], 1), f


def interior(mask2d, margin):
    m = np.zeros_like(mask2d, dtype=bool)
    m[margin:-margin, margin:-margin] = True
    return m & mask2d


# ---------------------------------------------------------------------------------------------
# sampling and the half-pixel trap
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interp,tol", [("nearest", 0.35), ("bilinear", 0.08), ("bicubic", 0.025),
                                        ("lanczos3", 0.007)])
def test_subpixel_shift_samples_the_right_place(interp, tol, device):
    """Sampling at p + d reproduces the analytic star shifted by -d (a half-pixel slip in the
    normalised grid_sample coordinates would give errors of ~0.3 of the peak)."""
    s, h = 1.7, 48
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float64, device=device),
                            torch.arange(h, dtype=torch.float64, device=device), indexing="ij")

    def star(x, y):
        return torch.exp(-((x - 24.2) ** 2 + (y - 23.6) ** 2) / (2 * s * s))

    img = star(xx, yy)[None, None]
    dx, dy = 0.3, -0.45
    out, fp = sample_image(img, (xx + dx)[None], (yy + dy)[None], interp)
    assert (fp[0, 0, 5:-5, 5:-5] == 1).all()
    err = (out[0, 0] - star(xx + dx, yy + dy))[5:-5, 5:-5].abs().max().item()
    assert err < tol, err
    if interp == "bilinear":  # bilinear reproduces linear functions: the centroid moves exactly
        c0 = (img[0, 0] * xx).sum() / img.sum()
        o = torch.nan_to_num(out[0, 0])
        assert abs(((o * xx).sum() / o.sum() - c0).item() + dx) < 1e-6


def test_known_subpixel_shift_matches_reproject_and_truth():
    from astropy.wcs import WCS
    from reproject import reproject_interp

    shape = (40, 40)
    img, xy, _ = star_field(shape, n=1, fwhm=3.0, seed=2)
    h_src = tan_header(shape)
    h_dst = tan_header(shape, crpix_offset=(0.25, 0.0))  # dst pixel x <-> src pixel x - 0.25
    out = reproject(img, TanWCS.from_header(h_src), TanWCS.from_header(h_dst), shape)
    ref, fp = reproject_interp((img[0, 0].numpy(), WCS(h_src)), WCS(h_dst), shape_out=shape, order="bilinear")
    good = fp > 0
    np.testing.assert_allclose(out.image[0, 0].numpy()[good], ref[good], rtol=1e-6)
    np.testing.assert_array_equal(out.footprint[0, 0].numpy(), fp)
    # pure shift by +0.25 px in x: the star's flux-weighted centroid moves by +0.25
    a0 = img[0, 0] - img[0, 0].median()
    a1 = out.image[0, 0] - out.image[0, 0].nanmedian()
    xx = torch.arange(40, dtype=torch.float64)
    c0 = (a0.clamp_min(0).sum(0) * xx).sum() / a0.clamp_min(0).sum()
    a1 = torch.nan_to_num(a1).clamp_min(0)
    c1 = (a1.sum(0) * xx).sum() / a1.sum()
    assert abs((c1 - c0).item() - 0.25) < 0.02


# ---------------------------------------------------------------------------------------------
# reprojection vs reproject_interp (bilinear)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sip", [False, True], ids=["TAN", "TAN-SIP"])
def test_reproject_matches_reproject_interp(sip, device):
    from astropy.wcs import WCS
    from reproject import reproject_interp

    shape = (96, 112)
    img, _, _ = star_field(shape, n=30, seed=3)
    h_src = tan_header(shape, crpix_offset=(3.3, -2.7), rotation=11.0, sip=sip)
    h_dst = tan_header((90, 100), scale=1.1, sip=sip)
    src_w, dst_w = TanWCS.from_header(h_src).to(device), TanWCS.from_header(h_dst).to(device)
    ours = Reproject((90, 100), grid_step=None)(img.to(device), src_w, dst_w)  # the exact mapping
    assert isinstance(ours, ReprojectResult)
    ref, fp = reproject_interp((img[0, 0].numpy(), WCS(h_src)), WCS(h_dst), shape_out=(90, 100), order="bilinear")
    o = ours.image[0, 0].cpu().numpy()
    np.testing.assert_array_equal(ours.footprint[0, 0].cpu().numpy(), fp)
    good = interior(fp > 0, 2)
    rel = np.abs(o[good] - ref[good]) / np.abs(ref[good])
    assert rel.max() < 1e-4, rel.max()
    assert np.isnan(o[fp == 0]).all()


def test_reproject_ref_gal2equ_stored_output():
    """reproject's stored galactic CAR -> equatorial TAN result. CAR is outside TanWCS' scope, so
    the source WCS goes through a tiny astropy adapter: this checks sampling and footprint."""
    from astropy.coordinates import SkyCoord
    from astropy.io import fits
    from astropy.wcs import WCS
    import astropy.units as u

    src = fits.open(shared_file("reproject_ref", "galactic_2d.fits"))[0]
    ref = fits.open(shared_file("reproject_ref", "ref_test_reproject_celestial_2d_gal2equ.fits"))

    class AstropyAdapter:
        def __init__(self, w):
            self.w = w

        def __len__(self):
            return 1

        def pixel_to_world(self, x, y):
            c = self.w.pixel_to_world(x[0].numpy(), y[0].numpy()).icrs
            return torch.tensor(c.ra.deg)[None], torch.tensor(c.dec.deg)[None]

        def world_to_pixel(self, ra, dec):
            c = SkyCoord(ra[0].numpy() * u.deg, dec[0].numpy() * u.deg, frame="icrs")
            px, py = self.w.world_to_pixel(c)
            return torch.tensor(px)[None], torch.tensor(py)[None]

    img = torch.tensor(src.data.astype(np.float64))[None, None]
    dst = TanWCS.from_header(ref[0].header)
    out = reproject(img, AstropyAdapter(WCS(src.header)), AstropyAdapter(WCS(ref[0].header)), ref[0].data.shape)
    np.testing.assert_array_equal(out.footprint[0, 0].numpy(), ref[1].data)
    good = ref[1].data > 0
    rel = np.abs(out.image[0, 0].numpy()[good] - ref[0].data[good]) / np.abs(ref[0].data[good])
    assert rel.max() < 1e-4, rel.max()
    # TAN -> TAN on the stored TAN output, all through TanWCS, vs reproject_interp
    from reproject import reproject_interp

    cut = fits.open(shared_file("reproject_ref", "ref_test_small_cutout.fits"))[0]
    tan_data = np.nan_to_num(ref[0].data.astype(np.float64))
    tan_img = torch.tensor(tan_data)[None, None]
    ours = reproject(tan_img, dst, TanWCS.from_header(cut.header), cut.data.shape)
    theirs, fp = reproject_interp((tan_data, WCS(ref[0].header)), WCS(cut.header),
                                  shape_out=cut.data.shape, order="bilinear")
    np.testing.assert_array_equal(ours.footprint[0, 0].numpy(), fp)
    g = fp > 0
    np.testing.assert_allclose(ours.image[0, 0].numpy()[g], theirs[g], rtol=1e-4)


def test_reproject_simulated_pair_batch():
    from astropy.wcs import WCS
    from reproject import reproject_interp

    sim = pytest.importorskip("astroprep_torch.sim")
    pair = sim.simulate_pair((96, 96), n_stars=60, shift=(4.2, -3.1), rotation=5.0, n_transients=0, n_moving=0,
                             sip=True, pixel_scale=1.0, seed=4, dtype=torch.float64)
    frames = torch.cat([pair.science.image, pair.reference.image])
    src = TanWCS.from_header([pair.science.header, pair.reference.header])
    dst = TanWCS.from_header(pair.reference.header)
    out = reproject(frames, src, dst, (96, 96))
    for b, hdr in enumerate([pair.science.header, pair.reference.header]):
        ref, fp = reproject_interp((frames[b, 0].numpy(), WCS(hdr)), WCS(pair.reference.header), shape_out=(96, 96),
                                   order="bilinear")
        np.testing.assert_array_equal(out.footprint[b, 0].numpy(), fp)
        g = interior(fp > 0, 2)
        rel = np.abs(out.image[b, 0].numpy()[g] - ref[g]) / np.abs(ref[g])
        assert rel.max() < 1e-4, (b, rel.max())


def test_grid_step_error_is_small():
    shape = (160, 160)
    src = TanWCS.from_header(tan_header(shape, crpix_offset=(7.5, -3.0), rotation=20.0, sip=True))
    dst = TanWCS.from_header(tan_header(shape, scale=1.2, sip=True))
    x0, y0 = pixel_to_pixel(src, dst, shape)
    x1, y1 = pixel_to_pixel(src, dst, shape, grid_step=16)
    err = torch.maximum((x0 - x1).abs(), (y0 - y1).abs()).max().item()
    assert err < 1e-3, err


def test_conserve_flux_and_surface_brightness():
    shape = (64, 64)
    img, _, _ = star_field(shape, n=3, fwhm=3.0, seed=5, sky=0.0, border=20, plane=False)
    src = TanWCS.from_header(tan_header(shape))
    dst = TanWCS.from_header(tan_header((52, 52), scale=1.25, rotation=30.0))
    sb = reproject(img, src, dst, (52, 52), interpolation="lanczos3")
    fl = reproject(img, src, dst, (52, 52), interpolation="lanczos3", conserve_flux=True)
    total = img.sum().item()
    assert abs(torch.nansum(fl.image).item() / total - 1) < 2e-3
    # surface brightness: total scales with the target pixel area ratio
    assert abs(torch.nansum(sb.image).item() * 1.25**2 / total - 1) < 2e-3
    np.testing.assert_allclose((fl.image / sb.image)[sb.footprint > 0].numpy(), 1.5625, rtol=1e-6)


def test_mask_carried_through_and_nan_outside():
    shape = (32, 32)
    img, _, _ = star_field(shape, n=4, seed=6)
    mask = torch.zeros_like(img, dtype=torch.bool)
    mask[..., 16, 16] = True
    img_bad = img.clone()
    img_bad[..., 16, 16] = 1e9
    w = TanWCS.from_header(tan_header(shape))
    wd = TanWCS.from_header(tan_header(shape, crpix_offset=(5.5, 0.0)))
    out = reproject(img_bad, w, wd, shape, mask=mask)
    clean = reproject(img, w, wd, shape)
    assert out.mask.dtype == torch.bool
    assert out.mask[0, 0, 16, 21:23].all()  # output pixels whose kernel touched the bad pixel
    assert (out.footprint >= 0).all() and (out.footprint <= 1).all()
    assert (out.footprint[0, 0, 2:-2, 8:14] == 1).all()  # far from the bad pixel: exactly 1
    assert out.image[torch.isfinite(out.image)].max() < 1e6  # the bad value did not leak
    ok = ~out.mask & (clean.footprint > 0)
    torch.testing.assert_close(out.image[ok], clean.image[ok])
    assert torch.isnan(out.image[0, 0, :, :5]).all() and (out.footprint[0, 0, :, :5] == 0).all()
    # NaN input without a mask spreads like reproject's: footprint 0 there
    img_nan = img.clone()
    img_nan[..., 10, 10] = float("nan")
    out2 = reproject(img_nan, w, w, shape)
    assert out2.footprint[0, 0, 10, 10] == 0 and out2.footprint[0, 0, 12, 12] == 1


def test_bad_arguments_raise():
    w = TanWCS.from_header(tan_header((8, 8)))
    with pytest.raises(ValueError, match="interpolation"):
        Reproject((8, 8), interpolation="cubic-spline")
    with pytest.raises(ValueError, match="image"):
        reproject(torch.zeros(8, 8), w, w, (8, 8))
    with pytest.raises(ValueError, match="src_wcs"):
        reproject(torch.zeros(3, 1, 8, 8), TanWCS.from_header([tan_header((8, 8))] * 2), w, (8, 8))
    with pytest.raises(ValueError, match="grid_step"):
        Reproject((8, 8), grid_step=0)


# ---------------------------------------------------------------------------------------------
# reprojection vs SWarp
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", [("m13.fits", "m13_rot30.fits", "lanczos3"),
                                  ("decam_OBS04a_mini.fits", "decam_OBS04a_tan.fits", "bilinear")],
                         ids=["m13-rot30-LANCZOS3", "decam-TPV-BILINEAR"])
def test_reproject_matches_swarp(case):
    """SWarp ran with FSCALASTRO_TYPE NONE (surface brightness): compare with conserve_flux=False."""
    from astropy.io import fits

    src_f, out_f, interp = case
    s = fits.open(shared_file("swarp_refs", src_f))[0]
    o = fits.open(shared_file("swarp_refs", out_f))[0]
    weight = fits.getdata(shared_file("swarp_refs", out_f.replace(".fits", ".weight.fits")))
    img = torch.tensor(s.data.astype(np.float64))[None, None]
    out = Reproject(o.data.shape, interpolation=interp, grid_step=8)(
        img, TanWCS.from_header(s.header), TanWCS.from_header(o.header))
    ours = out.image[0, 0].numpy()
    ref = o.data.astype(np.float64)
    good = interior((weight > 0) & (out.footprint[0, 0].numpy() == 1) & (ref != 0), 5)
    rel = np.abs(ours[good] - ref[good]) / np.abs(ref[good])
    assert good.sum() > 0.5 * good.size
    assert np.median(rel) <= 1e-3, np.median(rel)


# ---------------------------------------------------------------------------------------------
# matching and registration vs astroalign
# ---------------------------------------------------------------------------------------------


def _synthetic_lists(n, rot, scale, shift, seed, size=2048.0, noise=0.02, outliers=0.2):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g, dtype=torch.float64) * size
    flux = torch.rand(n, generator=g, dtype=torch.float64) ** -1.5
    th = math.radians(rot)
    m = torch.tensor([[scale * math.cos(th), -scale * math.sin(th), shift[0]],
                      [scale * math.sin(th), scale * math.cos(th), shift[1]]], dtype=torch.float64)
    dst = apply_transform(m, xy) + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)
    k = int(outliers * n)
    dst[:k] = torch.rand(k, 2, generator=g, dtype=torch.float64) * size  # 20% outliers
    dflux = flux.clone()
    dflux[:k] = torch.rand(k, generator=g, dtype=torch.float64) ** -1.5
    perm = torch.randperm(n, generator=g)
    return xy, flux, dst[perm], dflux[perm], m, k


CASES = [(10, 30.0, 1.0, (0.5, 0.7)), (40, 180.0, 1.1, (500.0, -350.0)), (200, -95.0, 0.9, (120.0, 40.0)),
         (2000, 45.0, 1.05, (-20.5, 300.0))]


@pytest.mark.peer
def test_match_sources_vs_astroalign():
    aa = pytest.importorskip("astroalign")
    ours_ok = aa_ok = 0
    for i, (n, rot, scale, shift) in enumerate(CASES):
        xy, flux, dst, dflux, m, k = _synthetic_lists(n, rot, scale, shift, seed=i)
        try:
            res = match_sources(xy, dst, src_flux=flux, dst_flux=dflux)
            good = xy[k:]
            err = (apply_transform(res.matrix, good) - apply_transform(m, good)).norm(dim=-1).pow(2).mean().sqrt()
            ok = err.item() <= 0.01 or (n <= 10 and err.item() <= 0.05)  # 8 noisy pairs: 0.02/sqrt(8)
            ours_ok += ok
            assert res.pairs.shape == (int(res.n_inliers), 2)
        except AlignmentError:
            pass
        try:
            # astroalign sorts by nothing when given coordinates: give it the brightest first
            order_s, order_d = flux.argsort(descending=True), dflux.argsort(descending=True)
            t, _ = aa.find_transform(xy[order_s].numpy(), dst[order_d].numpy())
            good = xy[k:].numpy()
            pred = good @ t.params[:2, :2].T + t.params[:2, 2]
            aa_ok += np.sqrt(((pred - apply_transform(m, xy[k:]).numpy()) ** 2).sum(1).mean()) <= 0.05
        except Exception:
            pass
    assert ours_ok >= aa_ok
    assert ours_ok == len(CASES)


def test_match_too_few_or_inconsistent_raises():
    with pytest.raises(AlignmentError):
        match_sources(torch.rand(2, 2, dtype=torch.float64), torch.rand(5, 2, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)
    a = torch.rand(30, 2, generator=g, dtype=torch.float64) * 1000
    b = torch.rand(30, 2, generator=g, dtype=torch.float64) * 1000  # unrelated lists
    with pytest.raises(AlignmentError):
        match_sources(a, b, pixel_tol=0.5, min_matches=8)
    with pytest.raises(ValueError, match="src_xy"):
        match_sources(torch.rand(5, 3), torch.rand(5, 2))


@pytest.mark.parametrize("kind", ["similarity", "affine"])
def test_fit_transform_exact(kind):
    g = torch.Generator().manual_seed(1)
    src = torch.rand(20, 2, generator=g, dtype=torch.float64) * 100
    m = torch.tensor([[0.9, -0.2, 5.0], [0.2, 0.9, -3.0]], dtype=torch.float64)
    if kind == "affine":
        m[0, 1] = -0.25
    est = fit_transform(src, apply_transform(m, src), kind)
    torch.testing.assert_close(est, m)


def _sim_pair(shape, shift, rotation, seed, n_stars=400):
    sim = pytest.importorskip("astroprep_torch.sim")
    return sim.simulate_pair(shape, n_stars=n_stars, shift=shift, rotation=rotation, n_transients=0, n_moving=0,
                             fwhm=(3.0, 3.0), seed=seed, mag_range=(9.0, 16.0))


def _truth_error(matrix, pair, shape):
    cs, cr = pair.science.catalog, pair.reference.catalog
    sxy = torch.stack([cs["x"], cs["y"]], 1).double()
    rxy = torch.stack([cr["x"], cr["y"]], 1).double()
    h, w = shape
    inside = (sxy[:, 0] > 0) & (sxy[:, 0] < w) & (sxy[:, 1] > 0) & (sxy[:, 1] < h)
    return (apply_transform(matrix.double(), sxy[inside]) - rxy[inside]).norm(dim=-1).pow(2).mean().sqrt().item()


@pytest.mark.peer
def test_register_simulated_pair_vs_astroalign():
    aa = pytest.importorskip("astroalign")
    shape = (384, 384)
    pair = _sim_pair(shape, (7.3, -4.6), 25.0, seed=11)
    out = register(pair.science.image, pair.reference.image)
    err = _truth_error(out.matrix[0], pair, shape)
    assert err <= 0.01, err
    assert out.image.shape == pair.reference.image.shape and out.footprint.shape == (1, 1, *shape)
    fp = out.footprint[0, 0]
    assert torch.isnan(out.image[0, 0][fp < 0.999]).all() and torch.isfinite(out.image[0, 0][fp >= 0.999]).all()
    t, _ = aa.find_transform(pair.science.image[0, 0].numpy(), pair.reference.image[0, 0].numpy())
    aa_err = _truth_error(torch.tensor(t.params[:2]), pair, shape)
    assert err <= max(0.01, 1.5 * aa_err)
    # the warped science frame lines up with the reference: a small residual after subtraction
    diff = (out.image - pair.reference.image)[0, 0][fp >= 0.999]
    diff0 = (pair.science.image - pair.reference.image)[0, 0]
    assert diff.std() < 0.5 * diff0.std()


def test_register_warp_direction_and_kornia_convention():
    img, xy, _ = star_field((64, 64), n=1, fwhm=3.0, seed=3, sky=0.0, border=25)
    m = torch.tensor([[[1.0, 0.0, 2.5], [0.0, 1.0, -1.25]]], dtype=torch.float64)
    from astroprep_torch.align import warp_affine

    warped, fp = warp_affine(img, m, (64, 64))
    pk = find_peaks(torch.nan_to_num(warped), fwhm=3.0, threshold=3.0)
    assert abs(pk.x[0].item() - (xy[0, 0].item() + 2.5)) < 0.05
    assert abs(pk.y[0].item() - (xy[0, 1].item() - 1.25)) < 0.05


@pytest.mark.parametrize("interp", ["nearest", "bilinear", "bicubic"])
def test_warp_affine_matches_kornia(interp):
    from astroprep_torch.align import warp_affine

    img, _, _ = star_field((50, 60), n=8, seed=4, dtype=torch.float32)
    m = torch.tensor([[[0.95, -0.3, 4.2], [0.31, 0.96, -3.7]]])
    a, fa = warp_affine(img, m, (55, 58), interpolation=interp)
    b, fb = warp_affine(img, m, (55, 58), interpolation=interp, backend="kornia")
    torch.testing.assert_close(fa, fb)
    torch.testing.assert_close(a, b, equal_nan=True, rtol=1e-4, atol=2e-2)


def test_register_raises_on_noise():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1, 1, 128, 128, generator=g)
    b = torch.randn(1, 1, 128, 128, generator=g)
    with pytest.raises(AlignmentError):
        register(a, b, threshold=50.0)


def test_find_peaks_positions():
    img, xy, flux = star_field((128, 128), n=25, fwhm=3.0, seed=8)
    pk = find_peaks(img, fwhm=3.0, threshold=5.0)
    d = torch.cdist(torch.stack([pk.x, pk.y], 1), xy)
    near = d.min(0).values
    sep = torch.cdist(xy, xy) + 1e9 * torch.eye(xy.shape[0], dtype=xy.dtype)
    bright = (flux > 1000) & (sep.min(1).values > 8)  # isolated bright stars (blends pull centroids)
    assert bright.sum() >= 4
    assert (near[bright] < 0.05).all(), near[bright]
    pk2 = find_peaks(img, fwhm=3.0, threshold=5.0, binning=2)
    d2 = torch.cdist(torch.stack([pk2.x, pk2.y], 1), xy).min(0).values
    assert (d2[bright] < 0.05).all(), d2[bright]


# ---------------------------------------------------------------------------------------------
# refinement and gradients
# ---------------------------------------------------------------------------------------------


def test_refine_affine_recovers_shift():
    shape = (96, 96)
    ref, xy, _ = star_field(shape, n=40, fwhm=3.0, seed=9)
    yy, xx = torch.meshgrid(torch.arange(96.0, dtype=torch.float64), torch.arange(96.0, dtype=torch.float64),
                            indexing="ij")
    # image = reference shifted: image(p) = ref(p - d) -> matrix image->ref is a shift by -d
    d = (0.6, -0.4)
    img, _ = sample_image(ref, (xx - d[0])[None], (yy - d[1])[None], "lanczos3")
    img = torch.nan_to_num(img, nan=100.0)
    start = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], dtype=torch.float64)
    res = refine(img, ref, start, steps=15, smooth_sigma=0.8)
    truth = torch.tensor([[1.0, 0.0, -d[0]], [0.0, 1.0, -d[1]]], dtype=torch.float64)
    pts = xy[(xy > 10).all(1) & (xy < 86).all(1)]
    err = (apply_transform(res.matrix[0].double(), pts) - apply_transform(truth, pts)).norm(dim=-1).max().item()
    assert err < 0.03, (err, res.matrix)


def test_refine_wcs_crpix():
    shape = (96, 96)
    ref, _, _ = star_field(shape, n=40, fwhm=3.0, seed=10)
    h_ref = tan_header(shape)
    true_hdr = tan_header(shape, crpix_offset=(0.7, -0.5))
    img = reproject(ref, TanWCS.from_header(h_ref), TanWCS.from_header(true_hdr), shape, interpolation="lanczos3").image
    img = torch.nan_to_num(img, nan=100.0)
    # start from the unshifted (wrong) WCS for the image and recover CRPIX
    res = refine(img, ref, src_wcs=TanWCS.from_header(h_ref), dst_wcs=TanWCS.from_header(h_ref), steps=15,
                 smooth_sigma=0.8)
    true_crpix = TanWCS.from_header(true_hdr).crpix
    assert res.wcs is not None
    assert (res.wcs.crpix - true_crpix).abs().max().item() < 0.03, (res.wcs.crpix, true_crpix)


@pytest.mark.parametrize("interp", ["bilinear", "lanczos3"])
def test_gradcheck_sample_image(interp):
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 1, 6, 7, generator=g, dtype=torch.float64)
    x = (torch.rand(1, 3, 3, generator=g, dtype=torch.float64) * 4 + 1).round() + 0.37
    y = (torch.rand(1, 3, 3, generator=g, dtype=torch.float64) * 3 + 1).round() + 0.61
    assert gradcheck(lambda a, b, c: sample_image(a, b, c, interp)[0], img, x, y)


def test_reproject_differentiable_wrt_image(device):
    img = torch.rand(1, 1, 16, 16, dtype=torch.float64, device=device, requires_grad=True)
    w = TanWCS.from_header(tan_header((16, 16))).to(device)
    wd = TanWCS.from_header(tan_header((16, 16), crpix_offset=(0.3, 0.2), rotation=3.0)).to(device)
    out = reproject(img, w, wd, (16, 16), interpolation="lanczos3", grid_step=4)
    torch.nansum(out.image).backward()
    assert img.grad is not None and torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0


def test_chunking_and_grid_step_agree():
    img, _, _ = star_field((64, 80), n=10, seed=12, dtype=torch.float32)
    w = TanWCS.from_header(tan_header((64, 80), sip=True))
    wd = TanWCS.from_header(tan_header((60, 70), rotation=10.0, crpix_offset=(1.5, 2.0), sip=True))
    a = reproject(img, w, wd, (60, 70), interpolation="lanczos3")
    b = reproject(img, w, wd, (60, 70), interpolation="lanczos3", chunk_rows=7)
    c = reproject(img, w, wd, (60, 70), interpolation="lanczos3", chunk_rows=7, grid_step=8)
    assert a.image.dtype == torch.float32
    torch.testing.assert_close(a.image, b.image, equal_nan=True, rtol=0, atol=0)
    torch.testing.assert_close(a.footprint, c.footprint)
    # grid_step=8 on this strongly distorted small frame moves positions by < 1e-3 px
    torch.testing.assert_close(a.image, c.image, equal_nan=True, rtol=1e-3, atol=0.1)


@pytest.mark.parametrize("interp", ["nearest", "bilinear", "bicubic"])
def test_grid_sample_path_matches_mapping_then_sampling(interp):
    """reproject's banded grid_sample path = pixel_to_pixel (same grid_step) + sample_image, with a
    mask, a batch of two WCSs, chunks that split node intervals, and pixels outside the frame."""
    from astroprep_torch.align import pixel_to_pixel, sample_image

    img, _, _ = star_field((64, 80), n=10, seed=13, dtype=torch.float32)
    img = torch.cat([img, 2 * img + 1], 0)
    mask = torch.zeros_like(img, dtype=torch.bool)
    mask[0, 0, 30, 40] = mask[1, 0, 10:12, 5] = True
    w = TanWCS.from_header([tan_header((64, 80), sip=True), tan_header((64, 80), rotation=3.0, sip=True)])
    wd = TanWCS.from_header(tan_header((60, 70), rotation=10.0, crpix_offset=(1.5, 2.0), sip=True))
    r = reproject(img, w, wd, (60, 70), mask, interpolation=interp, chunk_rows=13, grid_step=8)
    x, y = pixel_to_pixel(w, wd, (60, 70), grid_step=8)
    v, fp = sample_image(img, x, y, interp, mask=mask)
    assert bool((fp == 0).any()) and bool((fp == 1).any())
    torch.testing.assert_close(r.footprint, fp, rtol=0, atol=1e-6)
    torch.testing.assert_close(r.image, v, equal_nan=True, rtol=1e-5, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("interp", ["nearest", "bilinear", "bicubic", "lanczos3"])
def test_fused_matches_eager(interp):
    img, _, _ = star_field((64, 64), n=10, seed=13, dtype=torch.float32)
    mask = torch.zeros_like(img, dtype=torch.bool)
    mask[..., 30, 30] = True
    w = TanWCS.from_header(tan_header((64, 64), sip=True))
    wd = TanWCS.from_header(tan_header((64, 64), rotation=10.0, crpix_offset=(1.5, 2.0), sip=True))
    for m in (None, mask):
        a = reproject(img, w, wd, (64, 64), m, interpolation=interp, grid_step=8, chunk_rows=16)
        b = reproject(img, w, wd, (64, 64), m, interpolation=interp, grid_step=8, chunk_rows=16, fused=True)
        torch.testing.assert_close(a.footprint, b.footprint, atol=1e-5, rtol=0)
        torch.testing.assert_close(a.image, b.image, equal_nan=True, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("name,cls", [("default", "Reproject"), ("stars", "Register")])
def test_hydra_config_instantiates(name, cls):
    pytest.importorskip("hydra")
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    import astroprep_torch.align as align

    root = Path(__file__).resolve().parent.parent
    cfg = OmegaConf.load(root / "configs" / "align" / f"{name}.yaml")
    mod = instantiate(cfg)
    assert isinstance(mod, getattr(align, cls))


# -- #20: bad values at the entry, one WCS shared by a batch --------------------------------------
def test_reproject_bad_dtype_and_wcs_arguments():
    from astropy.io import fits

    hdr = fits.Header(tan_header((32, 32)))
    w = TanWCS.from_header(hdr)
    img = torch.ones(1, 1, 32, 32)
    with pytest.raises(TypeError, match=r"image must be float32 or float64, got torch\.float16"):
        Reproject((32, 32))(img.half(), w, w)
    with pytest.raises(TypeError, match="src_wcs must be a WCS"):
        Reproject((32, 32))(img, None, w)
    with pytest.raises(TypeError, match="dst_wcs must be a WCS"):
        reproject(img, w, "header", (32, 32))


@pytest.mark.parametrize("grid_step", [None, 8])
def test_reproject_batch_with_one_shared_wcs(grid_step):
    from astropy.io import fits

    src = TanWCS.from_header(fits.Header(tan_header((48, 48), crpix_offset=(1.3, -0.7), rotation=3.0)))
    dst = TanWCS.from_header(fits.Header(tan_header((48, 48))))
    a, b = star_field((48, 48), seed=1, dtype=torch.float32)[0], star_field((48, 48), seed=2, dtype=torch.float32)[0]
    both = Reproject((48, 48), grid_step=grid_step)(torch.cat([a, b]), src, dst)
    for i, one in enumerate((a, b)):
        single = Reproject((48, 48), grid_step=grid_step)(one, src, dst)
        torch.testing.assert_close(both.image[i : i + 1], single.image, equal_nan=True)
        torch.testing.assert_close(both.footprint[i : i + 1], single.footprint)

# ---------------------------------------------------------------------------------------------
# variance propagation through resampling (issue 19, item 1)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("interp", ["bilinear", "bicubic", "lanczos3"])
@pytest.mark.parametrize("conserve_flux", [False, True])
def test_reproject_propagates_variance_through_the_kernel_weights(interp, conserve_flux):
    """var_out = sum w_i^2 var_i: the propagated variance matches the empirical variance of resampled
    white noise (rotated, sub-pixel shifted, slightly rescaled grid), where resampling the variance
    as an image overstates it."""
    shape = (64, 64)
    g = torch.Generator().manual_seed(0)
    w = TanWCS.from_header(tan_header(shape))
    wd = TanWCS.from_header(tan_header(shape, crpix_offset=(0.37, -0.61), rotation=7.0, scale=1.03))
    var = torch.full((1, 1, *shape), 4.0, dtype=torch.float64)
    var[..., :, 32:] = 9.0  # two levels: the weights are applied per source pixel
    noise = torch.randn((1, 300, *shape), generator=g, dtype=torch.float64) * var.sqrt()  # 300 channels
    out = reproject(noise, w, wd, shape, interpolation=interp, conserve_flux=conserve_flux,
                    variance=var.expand_as(noise).contiguous())
    emp = out.image.var(1)[0]
    prop = out.variance[0, 0]
    inner = (slice(8, -8), slice(8, 26))  # the 4.0 half, away from the edge and the step
    ratio = (emp[inner] / prop[inner]).mean()
    assert float(ratio) == pytest.approx(1.0, abs=0.03)
    # the propagated variance is below the input's (interpolation averages), which an image-like
    # resampling of the variance map would not show
    assert float(prop[inner].mean()) < 0.9 * 4.0 * \
        (1.03 ** 4 if conserve_flux else 1.0)
    naive = reproject(var, w, wd, shape, interpolation=interp, conserve_flux=conserve_flux).image[0, 0]
    assert float((emp[inner] / naive[inner]).mean()) < 0.9
    assert torch.isnan(out.variance[torch.isnan(out.image)]).all()


@pytest.mark.parametrize("grid_step", [None, 8])
def test_reproject_variance_of_the_first_channels_only(grid_step):
    """A variance of fewer channels than the image (a frame with extra maps along, as
    AlignToReference's ``extra=``) covers its first channels: it used to fail with a shape error."""
    shape = (32, 32)
    w = TanWCS.from_header(tan_header(shape))
    wd = TanWCS.from_header(tan_header(shape, crpix_offset=(0.3, -0.4), rotation=2.0))
    g = torch.Generator().manual_seed(3)
    img = torch.randn((1, 1, *shape), generator=g, dtype=torch.float64)
    var = torch.rand((1, 1, *shape), generator=g, dtype=torch.float64) + 0.5
    one = reproject(img, w, wd, shape, variance=var, grid_step=grid_step)
    two = reproject(torch.cat([img, 3 * img], 1), w, wd, shape, variance=var, grid_step=grid_step)
    assert two.variance.shape == (1, 1, *shape)
    torch.testing.assert_close(two.variance, one.variance, equal_nan=True)


def test_reproject_variance_with_mask_renormalises():
    shape = (32, 32)
    w = TanWCS.from_header(tan_header(shape))
    wd = TanWCS.from_header(tan_header(shape, crpix_offset=(0.5, 0.0)))
    img = torch.zeros((1, 1, *shape), dtype=torch.float64)
    var = torch.ones_like(img)
    mask = torch.zeros_like(img, dtype=torch.bool)
    mask[..., 16, 16] = True
    out = reproject(img, w, wd, shape, mask=mask, interpolation="bilinear", variance=var)
    # half-pixel shift in x: weights (1/2, 1/2) -> 1/2; next to the bad pixel one good weight 1/2,
    # renormalised to 1 -> variance 1
    v = out.variance[0, 0]
    assert float(v[8, 10]) == pytest.approx(0.5, abs=1e-6)
    bad_row = v[16][torch.isfinite(v[16])]
    assert torch.isclose(bad_row, torch.tensor(1.0, dtype=torch.float64)).any()
    with pytest.raises(ValueError, match="variance"):
        reproject(img, w, wd, shape, variance=var[..., :8])


def test_reproject_default_is_the_coarse_grid_mapping():
    """Issue 19 item 3: the eager default is the fast coarse-grid mapping (the pipeline's), the exact
    per-pixel mapping an option."""
    assert Reproject((8, 8)).grid_step == 32
    import inspect

    assert inspect.signature(reproject).parameters["grid_step"].default == 32


def test_match_shuffled_lists_without_fluxes_and_refuses_weak_transforms():
    """Issue 19 item 2: 400 shuffled points, no fluxes, 20% outliers, rotation 123 deg, scale 1.05:
    solved whatever the list order; two unrelated lists raise AlignmentError instead of a transform."""
    rng = np.random.default_rng(3)
    n = 400
    src = rng.uniform(0, 2048, (n, 2))
    th = math.radians(123.0)
    a = 1.05 * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    dst = src @ a.T + np.array([40.0, -25.0])
    dst[:80] = rng.uniform(0, 2048, (80, 2)) @ a.T
    for seed in range(2):
        p = np.random.default_rng(seed).permutation(n)
        res = match_sources(torch.from_numpy(src[p]), torch.from_numpy(dst[np.random.default_rng(seed + 7).permutation(n)]))
        m = res.matrix.numpy()
        err = np.abs(src[80:] @ m[:, :2].T + m[:, 2] - dst[80:]).max()
        assert err < 0.01 and int(res.n_inliers) >= 300
    other = rng.uniform(0, 2048, (n, 2))
    with pytest.raises(AlignmentError, match="support|matches|consistent|triangles"):
        match_sources(torch.from_numpy(src), torch.from_numpy(other))


@pytest.mark.slow
def test_align_to_reference_refuses_another_field_and_propagates_variance():
    """Issue 19 items 1-2: star matching of a frame against a reference of another field fails with
    AlignmentError (plausibility bounds); a good registration carries the variance through
    the squared weights; a reference without WCS is announced once."""
    import warnings

    from astroprep_torch import sim
    from astroprep_torch.pipeline import AlignToReference

    pair = sim.simulate_pair((256, 256), n_stars=200, shift=(3.3, -2.7), sip=False, seed=0)
    other = sim.simulate_pair((256, 256), n_stars=200, shift=(0.0, 0.0), sip=False, seed=5)
    sci = torch.cat([pair.science.image, pair.science.image])  # a batch of 2 star-matched frames
    var = torch.full_like(sci, 100.0)
    mod = AlignToReference()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        r = mod(sci, pair.reference.image, variance=var, extra=var.sqrt())
        mod(sci[:1], pair.reference.image)
    assert sum("star matching" in str(w.message) for w in rec) == 1
    assert r.method == "stars" and r.variance is not None and r.extra.shape == sci.shape
    inner = r.variance[:, :, 20:-20, 20:-20]
    assert float(inner.max()) <= 100.0 + 1e-3 and float(inner.mean()) < 90.0  # averaged by interpolation
    with pytest.raises(AlignmentError):
        AlignToReference()(pair.science.image, other.reference.image)


@pytest.mark.parametrize("shape", [(33, 33), (65, 97), (81, 100), (2, 40)])
@pytest.mark.parametrize("step", [16, 32])
def test_grid_mapping_edges_when_the_size_is_a_multiple_of_the_step(shape, step):
    """The coarse-grid mapping needs a node beyond the last row/column also when (H - 1) or (W - 1)
    is a multiple of the step (it used to index past its grid there)."""
    src = TanWCS.from_header(tan_header((128, 128), sip=True))
    dst = TanWCS.from_header(tan_header((128, 128), crpix_offset=(2.3, -1.7), rotation=0.3))
    bx, by = pixel_to_pixel(src, dst, shape, grid_step=step)
    ex, ey = pixel_to_pixel(src, dst, shape, grid_step=None)
    assert bx.shape == ex.shape and torch.hypot(bx - ex, by - ey).max() < 2e-3  # 1e-3 checked at cell centres
