"""Tests of astroprep_torch.cutouts: extraction, triplets, normalisations, alert readers, simulation."""

from __future__ import annotations

import gzip
import io

import numpy as np
import pytest
import torch

from astroprep_torch import cutouts as C
from conftest import gradcheck, shared_file


def _frames(B=2, C_=1, H=40, W=50, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return torch.randn(B, C_, H, W, generator=g, dtype=dtype).to(device)


# ------------------------------------------------------------------------------- extract
def test_extract_matches_numpy_slicing(device, dtype):
    img = _frames(2, 2, 40, 50, dtype, device)
    xy = torch.tensor([[10.2, 20.7], [25.5, 5.0], [49.0, 39.0], [0.4, 0.6], [30.0, 18.49]], dtype=dtype, device=device)
    bi = torch.tensor([0, 1, 1, 0, 1], device=device)
    out = C.extract(img, xy, 7, bi)
    assert out.stamps.shape == (5, 2, 7, 7) and out.mask.shape == (5, 2, 7, 7)
    assert out.stamps.dtype == dtype and out.stamps.device.type == device
    a = img.cpu().numpy()
    pad = np.pad(a, ((0, 0), (0, 0), (10, 10), (10, 10)), constant_values=np.nan)
    for i, ((x, y), b) in enumerate(zip(xy.cpu().numpy(), bi.cpu().numpy())):
        x0, y0 = int(np.floor(x + 0.5)) - 3, int(np.floor(y + 0.5)) - 3
        ref = pad[b, :, y0 + 10: y0 + 17, x0 + 10: x0 + 17]
        inside = np.isfinite(ref)
        np.testing.assert_array_equal(out.mask[i].cpu().numpy(), ~inside)
        np.testing.assert_array_equal(out.stamps[i].cpu().numpy()[inside], ref[inside])
        assert (out.stamps[i].cpu().numpy()[~inside] == 0).all()
    # the source pixel is the centre of an odd stamp
    assert out.stamps[0, 0, 3, 3] == img[0, 0, 21, 10]


def test_extract_even_size_mask_and_errors():
    img = _frames(1, 1, 20, 20)
    bad = torch.zeros_like(img, dtype=torch.bool)
    bad[0, 0, 10, 10] = True
    out = C.extract(img, torch.tensor([[10.0, 10.0]]), (4, 6), mask=bad)
    assert out.stamps.shape == (1, 1, 4, 6)
    assert out.stamps[0, 0, 2, 3] == img[0, 0, 10, 10]  # pixel s // 2 holds the source
    assert out.mask[0, 0, 2, 3] and out.mask.sum() == 1
    with pytest.raises(ValueError, match="xy"):
        C.extract(img, torch.zeros(3), 5)
    with pytest.raises(ValueError, match="batch_index"):
        C.extract(_frames(2), torch.zeros(1, 2), 5)
    with pytest.raises(ValueError, match="batch_index"):
        C.extract(_frames(2), torch.zeros(1, 2), 5, torch.tensor([2]))
    with pytest.raises(ValueError, match="images"):
        C.extract(torch.zeros(5, 5), torch.zeros(1, 2), 3)


def test_extract_bilinear_integer_positions_and_gradcheck():
    img = _frames(1, 1, 16, 16, torch.float64)
    xy = torch.tensor([[7.0, 8.0], [3.0, 12.0]], dtype=torch.float64)
    near = C.extract(img, xy, 5)
    bil = C.extract(img, xy, 5, mode="bilinear")
    torch.testing.assert_close(bil.stamps, near.stamps)
    # half-pixel position = mean of the neighbours
    half = C.extract(img, torch.tensor([[7.5, 8.0]], dtype=torch.float64), 1, mode="bilinear").stamps[0, 0, 0, 0]
    torch.testing.assert_close(half, (img[0, 0, 8, 7] + img[0, 0, 8, 8]) / 2)
    bad = torch.zeros_like(img, dtype=torch.bool)
    bad[0, 0, 8, 8] = True
    mk = C.extract(img, torch.tensor([[7.5, 8.0], [6.0, 8.0], [0.2, 3.0]], dtype=torch.float64), 1,
                   mode="bilinear", mask=bad).mask[:, 0, 0, 0]
    assert mk.tolist() == [True, False, False]  # a bad neighbour with weight > 0 flags the pixel
    edge = C.extract(img, torch.tensor([[0.0, 0.0]], dtype=torch.float64), 3, mode="bilinear")
    assert edge.mask[0, 0, 0].all() and not edge.mask[0, 0, 1:, 1:].any() and (edge.stamps[0, 0, 0] == 0).all()
    small = img[:, :, :6, :6].clone()
    assert gradcheck(lambda im, p: C.extract(im, p, 3, mode="bilinear").stamps, small,
                     torch.tensor([[2.3, 2.6]], dtype=torch.float64))


def test_extract_compiles(compile_fn):
    img = _frames(1, 1, 30, 30)
    xy = torch.tensor([[5.0, 6.0], [20.2, 28.9]])
    f = compile_fn(lambda im, p: C.extract(im, p, 9).stamps)
    torch.testing.assert_close(f(img, xy), C.extract(img, xy, 9).stamps)


def test_make_triplets_order_and_nan_fill():
    sci, ref, diff = (torch.full((1, 1, 30, 30), v) for v in (1.0, 2.0, 3.0))
    t = C.make_triplets(sci, ref, diff, torch.tensor([[15.0, 15.0], [1.0, 1.0]]), 7)
    assert t.stamps.shape == (2, 3, 7, 7)
    assert torch.equal(t.stamps[0, :, 3, 3], torch.tensor([1.0, 2.0, 3.0]))
    assert torch.isnan(t.stamps[1, :, 0, 0]).all() and t.mask[1, :, 0, 0].all()
    with pytest.raises(ValueError, match="same shape|share one shape"):
        C.make_triplets(sci, ref, torch.zeros(1, 1, 5, 5), torch.zeros(1, 2), 3)


# ------------------------------------------------------------------------------- normalisations
def _keras_normalize(a):
    """keras.utils.normalize(a, axis=-1, order=2) in numpy (the d6_m7 rule)."""
    l2 = np.atleast_1d(np.linalg.norm(a, 2, -1))
    l2[l2 == 0] = 1
    return a / np.expand_dims(l2, -1)


def test_braai_normalize_matches_keras_rule_and_pads(dtype):
    g = np.random.default_rng(1)
    a = g.normal(100, 10, (2, 3, 51, 60)).astype(np.float64)
    a[0, 1, 4, 5] = np.nan
    a[1, 2, 7] = 0.0  # an all-zero row keeps zeros
    x = torch.from_numpy(a).to(dtype)
    out = C.braai_normalize(x)
    assert out.shape == (2, 3, 63, 63)
    ref = _keras_normalize(np.nan_to_num(a))
    np.testing.assert_allclose(out[:, :, :51, :60].double().numpy(), ref, rtol=1e-6 if dtype == torch.float32 else 1e-12)
    assert (out[:, :, 51:] == 1e-9).all() and (out[:, :, :, 60:] == 1e-9).all()
    img = C.braai_normalize(x, per="image")
    flat = np.nan_to_num(a).reshape(2, 3, -1)
    np.testing.assert_allclose(img[:, :, :51, :60].double().numpy(),
                               (flat / np.linalg.norm(flat, axis=-1, keepdims=True)).reshape(a.shape), rtol=1e-5)
    with pytest.raises(ValueError, match="at most"):
        C.braai_normalize(torch.zeros(1, 3, 64, 63))


def test_l2_normalize_float32_overflow_rule():
    """A row holding ZTF's -3.4e38 blank sentinel has an infinite float32 norm -> all zeros (as ZTF)."""
    a = np.ones((1, 1, 4, 5), dtype=np.float32)
    a[0, 0, 2, 1] = -3.4028234663852886e38
    with np.errstate(over="ignore", invalid="ignore"):
        ref = _keras_normalize(a)  # numpy float32 overflow, as the production code
    for dt in (torch.float32, torch.float64):
        out = C.l2_normalize(torch.from_numpy(a).to(dt))
        np.testing.assert_allclose(out.double().numpy(), ref.astype(np.float64), atol=1e-7)
    assert (out[0, 0, 2] == 0).all()


def test_zscale_asinh_against_astropy():
    from astropy.visualization import AsinhStretch, ZScaleInterval

    g = np.random.default_rng(3)
    a = g.normal(200, 15, (3, 2, 40, 40))
    a[0, 0, 20, 20] = 5e4
    a[1, 1, :5] = np.nan
    x = torch.from_numpy(a)
    vmin, vmax = C.zscale_interval(x)  # astroprep_torch.stretch.zscale per plane
    for i in range(3):
        for c in range(2):
            lo, hi = ZScaleInterval().get_limits(a[i, c])
            # 15-count noise: agree to 0.05 counts (the rejection-growing window may differ by a pixel)
            assert abs(float(vmin[i, c]) - lo) < 0.05 and abs(float(vmax[i, c]) - hi) < 0.05
    out = C.zscale_asinh(x)
    assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()
    lo, hi = float(vmin[2, 0]), float(vmax[2, 0])
    ref = AsinhStretch(a=0.1)(np.clip((a[2, 0] - lo) / (hi - lo), 0, 1))
    np.testing.assert_allclose(out[2, 0].numpy(), ref, atol=1e-10)


def test_robust_standardize_against_numpy():
    g = np.random.default_rng(4)
    a = g.normal(50, 3, (2, 3, 21, 21))
    a[0, 0, 0, :4] = np.nan
    out = C.robust_standardize(torch.from_numpy(a))
    v = a[0, 0][np.isfinite(a[0, 0])]
    med = np.median(v)
    mad = 1.482602218505602 * np.median(np.abs(v - med))
    np.testing.assert_allclose(out[0, 0].numpy()[np.isfinite(a[0, 0])], (v - med) / mad, rtol=1e-10)
    assert (out[0, 0, 0, :4] == 0).all()
    assert torch.isfinite(C.robust_standardize(torch.zeros(1, 1, 5, 5))).all()  # zero MAD -> no NaN


def test_normalisation_modules():
    x = torch.randn(2, 3, 63, 63) * 10 + 100
    assert C.BraaiNormalize()(x).shape == (2, 3, 63, 63)
    assert C.ZScaleAsinh()(x).max() <= 1
    torch.testing.assert_close(C.RobustStandardize()(x), C.robust_standardize(x))
    torch.testing.assert_close(C.L2Normalize()(x).flatten(2).norm(dim=-1), torch.ones(2, 3))


# ------------------------------------------------------------------------------- readers
def test_read_ztf_alerts_avro(shared_data):
    from astropy.io import fits
    import fastavro

    path = shared_file("ztf_avro_alerts", "1661382530015060001.avro")
    b = C.read_ztf_alerts(path)
    assert len(b) == 1 and b.triplets.shape == (1, 3, 63, 63) and b.triplets.dtype == torch.float32
    with open(path, "rb") as f:
        rec = next(iter(fastavro.reader(f)))
    for j, key in enumerate(("cutoutScience", "cutoutTemplate", "cutoutDifference")):
        with fits.open(io.BytesIO(gzip.decompress(rec[key]["stampData"]))) as h:
            np.testing.assert_array_equal(b.triplets[0, j].numpy(), h[0].data.astype(np.float32))
    assert int(b.candid[0]) == rec["candid"]
    assert float(b.rb[0]) == pytest.approx(rec["candidate"]["rb"])
    assert float(b.drb[0]) == pytest.approx(rec["candidate"]["drb"])
    assert b.drbversion == ["d6_m7"]
    assert float(b.fields["magpsf"][0]) == pytest.approx(rec["candidate"]["magpsf"])
    assert b.fields["isdiffpos"] == [rec["candidate"]["isdiffpos"]]


def test_read_ztf_alerts_folder_parquet_json(shared_data):
    b = C.read_ztf_alerts(shared_data / "ztf_avro_alerts")
    assert len(b) == 22 and torch.isfinite(b.drb).sum() == 3
    assert (b.cutout_shape <= 63).all()
    # near chip edges and in early (2016-2017, JPEG) packets stamps are smaller than 63x63: NaN-padded
    small = (b.cutout_shape < 63).any(1)
    assert int(small.sum()) == 9
    for t, (h, w) in zip(b.triplets[small], b.cutout_shape[small].tolist()):
        assert torch.isnan(t[:, h:]).all() and torch.isnan(t[:, :, w:]).all()
    p = C.read_ztf_alerts(shared_file("fink_ztf_alerts", "alerts.parquet"))
    assert len(p) == 51 and torch.isfinite(p.drb).all() and p.triplets.shape == (51, 3, 63, 63)
    j = C.read_ztf_alerts(shared_file("braai", "714287740515015072.json"))
    assert int(j.candid[0]) == 714287740515015072 and j.object_id == ["ZTF18acrkaks"]
    with pytest.raises(ValueError, match="unknown alert file type"):
        C.read_ztf_alerts(shared_file("ztf_avro_alerts", "SOURCES.txt"))


def test_read_fits_folder_ceres_layout(tmp_path):
    from astropy.io import fits

    g = np.random.default_rng(0)
    for sub, n in (("valid", 2), ("invalid", 3)):
        (tmp_path / sub).mkdir()
        for i in range(n):
            fits.PrimaryHDU(g.normal(size=(200, 200)).astype(np.float32)).writeto(tmp_path / sub / f"{sub}{i}.fits")
    fc = C.read_fits_folder(tmp_path)
    assert fc.images.shape == (5, 1, 200, 200) and fc.labels.tolist() == [0, 0, 0, 1, 1]
    fc2 = C.read_fits_folder(tmp_path, size=63)
    assert fc2.images.shape == (5, 1, 63, 63)
    torch.testing.assert_close(fc2.images[0, 0], fc.images[0, 0, 68:131, 68:131])
    csv = tmp_path / "labels.csv"
    csv.write_text("filename,label\nvalid/valid0.fits,valid\ninvalid/invalid1.fits,invalid\n")
    fc3 = C.read_fits_folder(tmp_path, csv)
    assert fc3.labels.tolist() == [1, 0]
    with pytest.raises(FileNotFoundError):
        C.read_fits_folder(tmp_path / "nope")


# ------------------------------------------------------------------------------- simulation
def test_simulate_triplets_labels_and_signatures():
    s = C.simulate_triplets(280, size=33, seed=5)
    assert s.triplets.shape == (280, 3, 33, 33) and s.labels.shape == (280,)
    assert torch.equal(s.labels, (s.kind < 2).long())
    assert set(s.kind.tolist()) == set(range(len(C.SIM_KINDS)))
    again = C.simulate_triplets(280, size=33, seed=5)
    torch.testing.assert_close(s.triplets, again.triplets, equal_nan=True)
    c = 16
    d = s.triplets[:, 2]
    centre = d[:, c - 1: c + 2, c - 1: c + 2].mean((-1, -2))
    sky_sigma = torch.nan_to_num(d, nan=0.0)[:, :4, :].std((-1, -2))
    tr = s.kind == 0
    assert (centre[tr] > sky_sigma[tr]).float().mean() > 0.9  # transients: positive central residual
    edge = s.kind == 6
    assert torch.isnan(s.triplets[edge][:, 0]).flatten(1).any(1).all()  # chip edge -> NaN science
    assert not torch.isnan(s.triplets[~edge]).any()
