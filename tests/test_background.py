"""Background2D: parity with photutils Background2D, SExtractor's check images and sep; masks, edges,
gradients, torch.compile."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from conftest import gradcheck, shared_file

from astroprep_torch.background import Background2D, BackgroundResult, background_2d, subtract_background

pytestmark = pytest.mark.filterwarnings("ignore::astropy.utils.exceptions.AstropyUserWarning",
                                        "ignore::astropy.io.fits.verify.VerifyWarning")

TOL_PHOTUTILS = 0.02  # max |delta| / global rms, whole frame, edges included (issue 3)


def _frame(n=300, m=None, seed=0, sky=100.0, noise=3.0, n_stars=60):
    """Gaussian stars on a sloped, rippled sky with Gaussian noise (float32 numpy)."""
    m = n if m is None else m
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:n, 0:m]
    img = sky + 0.05 * x + 0.03 * y + 5 * np.sin(x / 60.0) + rng.normal(0, noise, (n, m))
    for _ in range(n_stars):
        cx, cy = rng.uniform(0, m), rng.uniform(0, n)
        f = rng.lognormal(6, 1.2)
        img += f / (2 * np.pi * 4) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / 8.0)
    return img.astype(np.float32)


def _t(a):
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]


def _photutils(img, box, estimator="sextractor", rms="std", mask=None, exclude_percentile=95.0, order=3):
    pb = pytest.importorskip("photutils.background")
    from astropy.stats import SigmaClip

    est = {"median": pb.MedianBackground, "mean": pb.MeanBackground, "sextractor": pb.SExtractorBackground,
           "mmm": pb.MMMBackground}[estimator]()
    rms_est = pb.StdBackgroundRMS() if rms == "std" else pb.MADStdBackgroundRMS()
    kw = {}
    if order != 3:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            kw["interpolator"] = pb.BkgZoomInterpolator(order=order)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = pb.Background2D(img, box, mask=mask, filter_size=3, sigma_clip=SigmaClip(sigma=3, maxiters=10),
                            bkg_estimator=est, bkg_rms_estimator=rms_est, exclude_percentile=exclude_percentile, **kw)
        return b.background, b.background_rms, float(b.background_rms_median)


def _delta(ours: BackgroundResult, ref_bkg, ref_rms, grms):
    db = np.abs(ours.background[0, 0].numpy() - ref_bkg).max() / grms
    dr = np.abs(ours.rms[0, 0].numpy() - ref_rms).max() / grms
    return db, dr


# ------------------------------------------------------------------------------------------------
# photutils parity
# ------------------------------------------------------------------------------------------------
@pytest.mark.peer
@pytest.mark.parametrize("estimator", ["median", "mean", "sextractor", "mmm"])
@pytest.mark.parametrize("shape,box", [((300, 300), 64), ((257, 229), (50, 40))])
def test_photutils_parity_simulated(estimator, shape, box):
    img = _frame(*shape, seed=shape[1])
    bkg, rms, grms = _photutils(img, box, estimator)
    ours = background_2d(_t(img), box_size=box, estimator=estimator, min_pixels=0, exclude_percentile=95.0)
    db, dr = _delta(ours, bkg, rms, grms)
    assert db <= TOL_PHOTUTILS and dr <= TOL_PHOTUTILS, (db, dr)


@pytest.mark.peer
@pytest.mark.parametrize("estimator", ["median", "sextractor"])
def test_photutils_parity_exact_mode(estimator):
    img = _frame(300, 300, seed=3)
    bkg, rms, grms = _photutils(img, 64, estimator)
    ours = background_2d(_t(img), box_size=64, estimator=estimator, min_pixels=0, exclude_percentile=95.0, exact=True)
    db, dr = _delta(ours, bkg, rms, grms)
    assert db <= 1e-3 and dr <= 1e-3, (db, dr)


@pytest.mark.peer
@pytest.mark.parametrize("estimator", ["median", "mean", "sextractor", "mmm"])
@pytest.mark.parametrize("name,box,ep", [("sep/image.fits", 64, 10.0), ("astropy_images/m13.fits", 64, 50.0),
                                         ("astropy_images/m13.fits", 50, 50.0)])
def test_photutils_parity_real(estimator, name, box, ep):
    from astropy.io import fits

    img = fits.getdata(shared_file(*name.split("/"))).astype(np.float32)
    bkg, rms, grms = _photutils(img, box, estimator, exclude_percentile=ep)
    ours = background_2d(_t(img), box_size=box, estimator=estimator, min_pixels=0, exclude_percentile=ep)
    db, dr = _delta(ours, bkg, rms, grms)
    assert db <= TOL_PHOTUTILS and dr <= TOL_PHOTUTILS, (db, dr)


@pytest.mark.peer
def test_photutils_parity_mad_std_and_bilinear():
    img = _frame(256, 256, seed=5)
    bkg, rms, grms = _photutils(img, 64, "median", rms="mad_std")
    ours = background_2d(_t(img), box_size=64, estimator="median", rms_estimator="mad_std", min_pixels=0,
                         exclude_percentile=95.0)
    db, dr = _delta(ours, bkg, rms, grms)
    assert db <= TOL_PHOTUTILS and dr <= TOL_PHOTUTILS, (db, dr)
    bkg, rms, grms = _photutils(img, 64, "median", order=1)
    ours = background_2d(_t(img), box_size=64, estimator="median", min_pixels=0, exclude_percentile=95.0,
                         interpolation="bilinear")
    db, dr = _delta(ours, bkg, rms, grms)
    assert db <= TOL_PHOTUTILS and dr <= TOL_PHOTUTILS, (db, dr)


@pytest.mark.peer
def test_photutils_parity_with_mask_and_nan():
    img = _frame(256, 256, seed=7)
    mask = np.zeros(img.shape, bool)
    mask[40:90, 100:180] = True
    img[200:203, :] = np.nan
    bkg, rms, grms = _photutils(img, 64, "sextractor", mask=mask, exclude_percentile=50.0)
    ours = background_2d(_t(img), torch.from_numpy(mask)[None, None], box_size=64, min_pixels=0, exclude_percentile=50.0)
    db, dr = _delta(ours, bkg, rms, grms)
    assert db <= TOL_PHOTUTILS and dr <= TOL_PHOTUTILS, (db, dr)


# ------------------------------------------------------------------------------------------------
# SExtractor / sep parity (method="sextractor")
# ------------------------------------------------------------------------------------------------
@pytest.mark.peer
def test_sextractor_check_images():
    from astropy.io import fits

    img = fits.getdata(shared_file("sep", "image.fits")).astype(np.float32)
    back = fits.getdata(shared_file("sep", "back.fits")).astype(np.float64)
    rms = fits.getdata(shared_file("sep", "rms.fits")).astype(np.float64)
    r = Background2D(box_size=64, filter_size=3, method="sextractor")(_t(img))
    grms = np.median(rms)
    for ours, ref in ((r.background, back), (r.rms, rms)):
        d = np.abs(ours[0, 0].numpy() - ref) / grms
        assert np.median(d) <= 0.01 and d.max() <= 0.05, (np.median(d), d.max())


@pytest.mark.peer
@pytest.mark.parametrize("shape,box,filt", [((300, 300), 64, 3), ((257, 229), (50, 40), 3), ((200, 333), 32, 5)])
def test_sextractor_vs_sep(shape, box, filt):
    sep = pytest.importorskip("sep")
    img = _frame(*shape, seed=11)
    mask = np.zeros(img.shape, bool)
    mask[20:60, 30:90] = True
    bh, bw = (box, box) if isinstance(box, int) else box
    sb = sep.Background(img, mask=mask, bw=bw, bh=bh, fw=filt, fh=filt)
    r = background_2d(_t(img), torch.from_numpy(mask)[None, None], box_size=box, filter_size=filt, method="sextractor")
    g = sb.globalrms
    db = np.abs(r.background[0, 0].numpy() - sb.back()) / g
    dr = np.abs(r.rms[0, 0].numpy() - sb.rms()) / g
    assert np.median(db) <= 0.01 and db.max() <= 0.05, (np.median(db), db.max())
    assert np.median(dr) <= 0.01 and dr.max() <= 0.05, (np.median(dr), dr.max())


# ------------------------------------------------------------------------------------------------
# simulator truth, masks, batches, dtypes, errors
# ------------------------------------------------------------------------------------------------
@pytest.mark.peer
def test_truth_error_no_worse_than_sep():
    """GWAC-like density (~1.2e-3 stars / px), gradient + ripple: rms error vs the true sky."""
    sep = pytest.importorskip("sep")
    sim = pytest.importorskip("astroprep_torch.sim")
    errs = {"sextractor": [], "photutils_stats": [], "sep": []}
    for seed in range(2):
        f = sim.simulate_frame((512, 512), n_stars=320, sky=1000.0, sky_gradient=(0.2, -0.1), sky_ripple=0.03,
                               seed=seed)
        img = f.image[0, 0].numpy().astype(np.float32)
        truth = f.background[0, 0].numpy()
        rms_err = lambda b: float(np.sqrt(np.mean((np.asarray(b, np.float64) - truth) ** 2)))  # noqa: E731
        errs["sextractor"].append(rms_err(background_2d(f.image.float(), method="sextractor").background[0, 0]))
        errs["photutils_stats"].append(rms_err(background_2d(f.image.float(), filter_edge="shrink",
                                                             interpolation="spline").background[0, 0]))
        errs["sep"].append(rms_err(sep.Background(img, bw=64, bh=64, fw=3, fh=3).back()))
    mean = {k: np.mean(v) for k, v in errs.items()}
    assert mean["sextractor"] <= mean["sep"] * (1 + 1e-4), mean
    assert mean["photutils_stats"] <= mean["sep"] * 1.02, mean


def test_masked_box_is_filled_and_mask_excluded():
    img = _frame(256, 256, seed=2)
    x = _t(img)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[..., :64, :64] = True  # a whole box
    poisoned = x.clone()
    poisoned[mask] = 1e6
    r = background_2d(poisoned, mask)
    ref = background_2d(x)
    assert torch.isfinite(r.background).all() and torch.isfinite(r.rms).all()
    # the masked box is filled from its neighbours: no trace of the poisoned values
    assert (r.background - ref.background).abs().max() < 5.0
    # a coarse bad-patch mask (quality scorer output) is expanded to pixels
    coarse = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    coarse[..., 0, 0] = True
    r2 = background_2d(poisoned, coarse)
    torch.testing.assert_close(r2.background, r.background)


def test_min_pixels_and_nan_frame_border():
    img = _frame(256, 256, seed=4)
    img[:, :70] = np.nan  # a NaN border wider than a box
    r = background_2d(_t(img), box_size=64, min_pixels=100)
    assert torch.isfinite(r.background).all()
    good = _frame(256, 256, seed=4)
    ref = background_2d(_t(good), box_size=64)
    assert (r.background - ref.background)[..., 70:].abs().max() < 3.0


def test_batch_dtype_device_follow_input(device):
    a, b = _frame(200, 180, seed=1), _frame(200, 180, seed=2)
    x = torch.cat([_t(a), _t(b)]).to(device)
    r = background_2d(x, box_size=50)
    assert r.background.shape == x.shape and r.rms.shape == x.shape and r.background.device == x.device
    r1 = background_2d(x[1:], box_size=50)
    torch.testing.assert_close(r.background[1:], r1.background)
    r64 = background_2d(x.double(), box_size=50)
    assert r64.background.dtype == torch.float64
    torch.testing.assert_close(r64.background.float(), r.background, atol=1e-2, rtol=0)


def test_subtract_background_and_module():
    x = _t(_frame(128, 128, seed=9))
    m = Background2D(box_size=32)
    out = subtract_background(x, box_size=32)
    torch.testing.assert_close(out, x - m(x).background)
    assert "box_size=(32, 32)" in repr(m)


@pytest.mark.parametrize("kwargs,err", [
    (dict(estimator="nope"), ValueError), (dict(rms_estimator="x"), ValueError),
    (dict(interpolation="x"), ValueError), (dict(method="x"), ValueError), (dict(filter_size=2), ValueError),
    (dict(box_size=0), ValueError),
])
def test_bad_arguments(kwargs, err):
    with pytest.raises(err):
        background_2d(torch.zeros(1, 1, 64, 64), **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="image"):
        background_2d(torch.zeros(64, 64))
    with pytest.raises(TypeError, match="mask"):
        background_2d(torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match="mask"):
        background_2d(torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 5, 5, dtype=torch.bool))


# ------------------------------------------------------------------------------------------------
# gradients and torch.compile
# ------------------------------------------------------------------------------------------------
def test_gradcheck_background_and_rms():
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(1, 1, 18, 15, generator=g, dtype=torch.float64) * 2 + 10)
    x[0, 0, 5, 5] += 40.0  # an outlier that is clipped

    def f(img):
        r = background_2d(img, box_size=(6, 5), filter_size=3, min_pixels=10, estimator="sextractor")
        return r.background, r.rms

    assert gradcheck(f, x, fast_mode=True)
    xr = x.clone().requires_grad_(True)
    bkg, rms = f(xr)
    (bkg.sum() + rms.sum()).backward()
    assert xr.grad[0, 0, 5, 5].abs() < 1e-12  # clipped pixel gets no gradient
    assert torch.isfinite(xr.grad).all() and xr.grad.abs().sum() > 0


def _compile_check(method, backend):
    x = _t(_frame(64, 64, seed=1, n_stars=3))
    m = Background2D(box_size=32, filter_size=3, min_pixels=10, maxiters=3, method=method)
    ref = m(x)
    import torch._dynamo

    torch._dynamo.reset()
    try:
        out = torch.compile(m, fullgraph=True, backend=backend)(x)
    finally:
        torch._dynamo.reset()
    torch.testing.assert_close(out.background, ref.background, atol=1e-3, rtol=1e-5)
    torch.testing.assert_close(out.rms, ref.rms, atol=1e-3, rtol=1e-5)


def test_compile_fullgraph_no_graph_breaks():
    """fullgraph capture of forward (dynamo, eager backend: no inductor codegen in the CI budget)."""
    _compile_check("photutils", "eager")


@pytest.mark.slow
@pytest.mark.parametrize("method", ["photutils", "sextractor"])
def test_compile_inductor_matches_eager(method):
    _compile_check(method, "inductor")


def test_inference_mode_and_threads_match():
    """Under torch.inference_mode (Lightning predict) and with one or two threads the result is the same."""
    img = _t(_frame(300, 300, seed=11))
    ref = background_2d(img, box_size=64)
    with torch.inference_mode():
        inf = background_2d(img, box_size=64)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = background_2d(img, box_size=64)
    finally:
        torch.set_num_threads(n)
    for r in (inf, one):
        assert torch.equal(r.background, ref.background) and torch.equal(r.rms, ref.rms)


@pytest.mark.parametrize("masked", [False, True])
def test_box_row_groups_on_threads_match_one_thread(masked):
    """With two threads the groups of box rows are made on both at once (one histogram buffer each):
    every box gets the statistics of the one-thread run, bit for bit, with or without bad pixels,
    and under inference mode."""
    img = _t(_frame(520, 384, seed=5))
    mask = None
    if masked:
        img[..., 3, 7] = float("nan")
        mask = torch.zeros(img.shape, dtype=torch.bool)
        mask[..., 100:230, 40:200] = True
    kw = dict(box_size=32, chunk_pixels=32 * 384)  # one row of boxes a block: 17 rows -> many groups
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = background_2d(img, mask, **kw)
        torch.set_num_threads(2)
        two = background_2d(img, mask, **kw)
        with torch.inference_mode():
            inf = background_2d(img, mask, **kw)
    finally:
        torch.set_num_threads(n)
    assert torch.isfinite(one.background).all()
    for r in (two, inf):
        assert torch.equal(r.background, one.background) and torch.equal(r.rms, one.rms)


# -- #20: bad values at the entry ---------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused_naming_the_argument(dtype):
    with pytest.raises(TypeError, match=r"image must be float32 or float64, got torch\.b?float16"):
        Background2D(box_size=32)(_t(_frame(64, 64)).to(dtype))


def test_empty_batch_small_image_and_all_masked_raise():
    bg = Background2D(box_size=32)
    x = _t(_frame(64, 64))
    with pytest.raises(ValueError, match="image is an empty batch"):
        bg(x[:0])
    with pytest.raises(ValueError, match=r"element\(s\) \[0\]: no background box is usable: the image \(1x1 pixels\)"):
        bg(x[..., :1, :1])
    with pytest.raises(ValueError, match=r"element\(s\) \[1\]: no background box is usable: every box"):
        bg(torch.cat([x, x]), torch.tensor([False, True]).view(2, 1, 1, 1).expand(2, 1, 64, 64))
    with pytest.raises(ValueError, match="no background box is usable"):
        bg(x * float("nan"))
    small = bg(x[..., :20, :20])  # smaller than a box, but 400 good pixels: a background
    assert torch.isfinite(small.background).all()
