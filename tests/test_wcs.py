"""TanWCS against astropy.wcs on real TAN / TAN-SIP / TPV headers, errors, batching, gradients."""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import pytest
import torch

from conftest import gradcheck, shared_file

pytest.importorskip("astropy.wcs")
from astropy.io import fits  # noqa: E402
from astropy.wcs import WCS  # noqa: E402

from astroprep_torch.wcs import TanWCS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::astropy.wcs.FITSFixedWarning",
                                        "ignore::astropy.io.fits.verify.VerifyWarning")

# (id, path under shared/data, hdu or None for a text header, image shape (H, W) or None for NAXIS)
REAL = [
    ("1904-66_TAN", "astropy_wcs_hdrs/1904-66_TAN.hdr", None, None),
    ("irac_sip", "astropy_wcs_hdrs/irac_sip.hdr", None, None),
    ("j94f05bgq_flt", "astropy_wcs_hdrs/j94f05bgq_flt.fits", 1, (2048, 4096)),
    ("header_newlines", "astropy_wcs_hdrs/header_newlines.fits", 0, (4096, 2048)),
    ("sip", "astropy_wcs_hdrs/sip.fits", 0, (256, 256)),
    ("sip2", "astropy_wcs_hdrs/sip2.fits", 0, (256, 256)),
    ("sip-broken", "astropy_wcs_hdrs/sip-broken.hdr", None, (2051, 4096)),
    ("siponly", "astropy_wcs_hdrs/siponly.hdr", None, None),
    ("tpvonly", "astropy_wcs_hdrs/tpvonly.hdr", None, None),
    ("m13", "astropy_images/m13.fits", 0, None),
    ("m13_rot30.head", "swarp_refs/m13_rot30.head", None, None),
    ("decam_tan.head", "swarp_refs/decam_OBS04a_tan.head", None, None),
    ("decam04a_tpv", "sfft_decam_decorr/input_data__DEC-OBS04a.mini.fits", 0, None),
    ("decam18e_tpv", "sfft_decam_decorr/input_data__DEC-OBS18e.mini.fits", 0, None),
]


def load_header(rel, hdu):
    path = shared_file(*rel.split("/"))
    if hdu is None:
        text = path.read_bytes().decode("latin-1")
        return fits.Header.fromstring(text, sep="\n" if "\n" in text[:81] else "")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with fits.open(path) as hl:
            return hl[hdu].header.copy()


def image_grid(header, shape, n=21):
    if shape is None:
        shape = (int(header["NAXIS2"]), int(header["NAXIS1"]))
    H, W = shape
    X, Y = np.meshgrid(np.linspace(-0.5, W - 0.5, n), np.linspace(-0.5, H - 0.5, n))
    return X.ravel(), Y.ravel()


def sky_err(ra, dec, ra_t, dec_t):
    dra = (np.asarray(ra) - ra_t + 180.0) % 360.0 - 180.0
    return max(np.abs(dra * np.cos(np.radians(dec_t))).max(), np.abs(np.asarray(dec) - dec_t).max())


def truth_w2p(aw, ra, dec):
    return aw.all_world2pix(ra, dec, 0, tolerance=1e-12, maxiter=200, quiet=True)


@pytest.mark.peer
@pytest.mark.parametrize("case", REAL, ids=[c[0] for c in REAL])
def test_parity_float64(case):
    _, rel, hdu, shape = case
    header = load_header(rel, hdu)
    aw = WCS(header)
    x, y = image_grid(header, shape)
    ra_t, dec_t = aw.all_pix2world(x, y, 0)
    w = TanWCS.from_header(header)
    ra, dec = w.pixel_to_world(torch.tensor(x), torch.tensor(y))
    assert ra.dtype == torch.float64 and ra.shape == (x.size,)
    assert sky_err(ra.numpy(), dec.numpy(), ra_t, dec_t) <= 1e-9
    xt, yt = truth_w2p(aw, ra_t, dec_t)
    px, py = w.world_to_pixel(torch.tensor(ra_t), torch.tensor(dec_t))
    assert np.abs(px.numpy() - xt).max() <= 1e-6 and np.abs(py.numpy() - yt).max() <= 1e-6
    assert np.abs(px.numpy() - x).max() <= 1e-6 and np.abs(py.numpy() - y).max() <= 1e-6


F32 = [c for c in REAL if c[0] in ("irac_sip", "j94f05bgq_flt", "siponly", "tpvonly", "m13", "decam04a_tpv")]


@pytest.mark.peer
@pytest.mark.parametrize("case", F32, ids=[c[0] for c in F32])
def test_parity_float32(case):
    """float32: world->pixel on float32 world coordinates (astropy run in float64 on the same values)
    and pixel->pixel to a shifted, rotated WCS, both <= 5e-3 px; pixel->world limited by float32 ra."""
    _, rel, hdu, shape = case
    header = load_header(rel, hdu)
    aw = WCS(header)
    x, y = image_grid(header, shape)
    ra_t, dec_t = aw.all_pix2world(x, y, 0)
    w32 = TanWCS.from_header(header, dtype=torch.float32)
    ra32, dec32 = ra_t.astype(np.float32), dec_t.astype(np.float32)
    xt, yt = truth_w2p(aw, ra32.astype(np.float64), dec32.astype(np.float64))
    px, py = w32.world_to_pixel(torch.tensor(ra32), torch.tensor(dec32))
    assert px.dtype == torch.float32
    assert max(np.abs(px.double().numpy() - xt).max(), np.abs(py.double().numpy() - yt).max()) <= 5e-3
    ra, dec = w32.pixel_to_world(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    assert sky_err(ra.double().numpy(), dec.double().numpy(), ra_t, dec_t) <= 2e-5  # ~ulp(ra)
    # pixel -> pixel onto a second WCS: CRVAL moved by 10% of the field, CD rotated by 5 deg
    h2 = header.copy()
    scale = math.sqrt(abs(np.linalg.det(aw.pixel_scale_matrix)))
    shift = 0.1 * max(x.max(), y.max()) * scale
    h2["CRVAL1"] += shift / math.cos(math.radians(h2["CRVAL2"]))
    h2["CRVAL2"] -= math.copysign(0.5 * shift, h2["CRVAL2"])
    h2.remove("LATPOLE", ignore_missing=True)
    cd = aw.pixel_scale_matrix
    c, s = math.cos(math.radians(5)), math.sin(math.radians(5))
    cd = np.array([[c, -s], [s, c]]) @ cd
    for k in [k for k in h2 if k.startswith(("PC", "CDELT", "CROTA"))]:
        del h2[k]
    for i in range(2):
        for j in range(2):
            h2[f"CD{i + 1}_{j + 1}"] = cd[i, j]
    aw2 = WCS(h2)
    x2t, y2t = truth_w2p(aw2, ra_t, dec_t)
    t32 = TanWCS.from_header(h2, dtype=torch.float32)
    qx, qy = w32.pixel_to_pixel(t32, torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.float32))
    assert max(np.abs(qx.double().numpy() - x2t).max(), np.abs(qy.double().numpy() - y2t).max()) <= 5e-3
    # and in float64 the same route is exact
    q64 = TanWCS.from_header(header).pixel_to_pixel(TanWCS.from_header(h2), torch.tensor(x), torch.tensor(y))
    assert max(np.abs(q64[0].numpy() - x2t).max(), np.abs(q64[1].numpy() - y2t).max()) <= 1e-6


def _hdr(**kw):
    h = fits.Header()
    h["NAXIS"], h["NAXIS1"], h["NAXIS2"] = 2, 100, 80
    for k, v in kw.items():
        h[k] = v
    return h


BASE = dict(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=10.0, CRVAL2=20.0, CRPIX1=50.0, CRPIX2=40.0,
            CD1_1=-1e-3, CD1_2=2e-4, CD2_1=1e-4, CD2_2=1e-3)


@pytest.mark.parametrize("extra", [dict(LONPOLE=170.0), dict(CRVAL2=90.0), dict(CRVAL2=-89.99, LONPOLE=0.0),
                                   dict(CRVAL1=359.98), dict(CRVAL1=0.01), dict(PC1_1=0.5, PC2_2=2.0, CDELT1=-1e-3,
                                                                                  CDELT2=1e-3),
                                   dict(CDELT1=-1e-3, CDELT2=1e-3, CROTA2=30.0, CD1_1=None)],
                         ids=["lonpole170", "pole", "south", "ra_wrap_hi", "ra_wrap_lo", "pc", "crota"])
def test_special_geometry_vs_astropy(extra):
    kw = dict(BASE)
    kw.update(extra)
    if kw.get("CD1_1") is None:
        for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2"):
            kw.pop(k)
    h = _hdr(**kw)
    aw = WCS(h)
    x, y = image_grid(h, None, n=11)
    ra_t, dec_t = aw.all_pix2world(x, y, 0)
    w = TanWCS.from_header(h)
    ra, dec = w.pixel_to_world(torch.tensor(x), torch.tensor(y))
    assert sky_err(ra.numpy(), dec.numpy(), ra_t, dec_t) <= 1e-9
    assert ((ra >= 0) & (ra < 360)).all()
    px, py = w.world_to_pixel(torch.tensor(ra_t), torch.tensor(dec_t))
    assert np.abs(px.numpy() - x).max() <= 1e-6 and np.abs(py.numpy() - y).max() <= 1e-6


def test_far_side_is_nan():
    w = TanWCS.from_header(_hdr(**BASE))
    x, y = w.world_to_pixel(torch.tensor([190.0, 10.0]), torch.tensor([-20.0, 20.0]))
    assert torch.isnan(x[0]) and torch.isfinite(x[1])


UNSUPPORTED = [
    ("astropy_wcs_hdrs/1904-66_SIN.hdr", None, "SIN"),
    ("astropy_wcs_hdrs/1904-66_ZPN.hdr", None, "ZPN"),
    ("astropy_wcs_hdrs/1904-66_CAR.hdr", None, "CAR"),
    ("astropy_wcs_hdrs/zpn-hole.hdr", None, "ZPN"),
    ("astropy_wcs_hdrs/2wcses.hdr", None, "ZPN"),
    ("astropy_wcs_hdrs/dist_lookup.fits.gz", 1, "lookup-table"),
    ("astropy_wcs_hdrs/dss.14.29.56-62.41.05.fits.gz", 0, "DSS"),
]


@pytest.mark.parametrize("case", UNSUPPORTED, ids=[c[0].split("/")[1] for c in UNSUPPORTED])
def test_unsupported_headers_raise(case):
    rel, hdu, word = case
    header = load_header(rel, hdu)
    with pytest.raises(ValueError, match=word) as info:
        TanWCS.from_header(header)
    assert "TAN, TAN-SIP and TPV" in str(info.value)


@pytest.mark.parametrize("kw, word", [
    (dict(CD1_1=None), "missing linear"),
    (dict(CD1_1=1e-3, CD1_2=1e-3, CD2_1=1e-3, CD2_2=1e-3), "singular"),
    (dict(CTYPE1="LINEAR", CTYPE2="LINEAR"), "not celestial"),
    (dict(CTYPE1="DEC--TAN", CTYPE2="RA---TAN"), "swapped"),
    (dict(CTYPE1="RA---TPV", CTYPE2="DEC--TPV"), "TPV linear terms"),
    (dict(CTYPE1="RA---TAN-SIP", CTYPE2="DEC--TAN-SIP", A_ORDER=2, A_2_0=1e-5), "A_ORDER without B_ORDER"),
])
def test_bad_headers_raise(kw, word):
    base = dict(BASE)
    if kw.get("CD1_1", 0) is None:
        for k in ("CD1_1", "CD1_2", "CD2_1", "CD2_2"):
            base.pop(k)
        kw = {}
    base.update(kw)
    with pytest.raises(ValueError, match=word):
        TanWCS.from_header(_hdr(**base))
    with pytest.raises(TypeError):
        TanWCS.from_header(42)


def test_three_axis_header_uses_celestial_part():
    h = _hdr(**BASE)
    h["NAXIS"], h["NAXIS3"], h["WCSAXES"] = 3, 5, 3
    h["CTYPE3"], h["CRVAL3"], h["CDELT3"], h["CRPIX3"] = "FREQ", 1.4e9, 1e6, 1.0
    aw = WCS(h).celestial
    w = TanWCS.from_header(h)
    x, y = image_grid(h, None, n=5)
    ra_t, dec_t = aw.all_pix2world(x, y, 0)
    ra, dec = w.pixel_to_world(torch.tensor(x), torch.tensor(y))
    assert sky_err(ra.numpy(), dec.numpy(), ra_t, dec_t) <= 1e-9


ROUND_TRIP = [c for c in REAL if c[0] in ("irac_sip", "j94f05bgq_flt", "tpvonly", "m13", "decam04a_tpv", "sip2")]


@pytest.mark.parametrize("case", ROUND_TRIP, ids=[c[0] for c in ROUND_TRIP])
def test_to_header_round_trip_through_astropy(case):
    _, rel, hdu, shape = case
    header = load_header(rel, hdu)
    w = TanWCS.from_header(header)
    out = w.to_header()
    assert out["CRPIX1"] == pytest.approx(WCS(header).wcs.crpix[0], abs=1e-12)  # 1-based again
    aw, aw2 = WCS(header), WCS(out)
    x, y = image_grid(header, shape, n=9)
    ra_t, dec_t = aw.all_pix2world(x, y, 0)
    ra2, dec2 = aw2.all_pix2world(x, y, 0)
    assert sky_err(ra2, dec2, ra_t, dec_t) <= 1e-10
    if w.has_sip_inverse:
        assert aw2.sip.ap is not None
    w2 = TanWCS.from_header(out)
    for name, buf in w.named_buffers():
        assert torch.equal(buf, dict(w2.named_buffers())[name]), name
    w3 = TanWCS.from_header(aw)  # an astropy WCS is accepted too
    ra3, _ = w3.pixel_to_world(torch.tensor(x), torch.tensor(y))
    assert sky_err(ra3.numpy(), dec_t, ra_t, dec_t) <= 1e-9


def test_batch_mixed_kinds_select_stack():
    hs = [load_header(*REAL[i][1:3]) for i in (0, 1, 8, 12)]  # TAN, SIP, TPV (tpvonly), TPV (DECam)
    singles = [TanWCS.from_header(h) for h in hs]
    batch = TanWCS.from_header(hs)
    assert len(batch) == 4 and [m["kind"] for m in batch.meta] == ["TAN", "SIP", "TPV", "TPV"]
    g = torch.stack([torch.linspace(0, 150, 7), torch.linspace(10, 180, 7)])
    x = g[0].expand(4, 7).contiguous().double()
    y = g[1].expand(4, 7).contiguous().double()
    ra, dec = batch.pixel_to_world(x, y)
    assert ra.shape == (4, 7)
    for b, s in enumerate(singles):
        r1, d1 = s.pixel_to_world(x[b], y[b])
        assert torch.allclose(ra[b], r1, atol=1e-12, rtol=0) and torch.allclose(dec[b], d1, atol=1e-12, rtol=0)
        px, py = s.world_to_pixel(r1, d1)
        assert (px - x[b]).abs().max() < 1e-7
    px, py = batch.world_to_pixel(ra, dec)
    assert (px - x).abs().max() < 1e-7 and (py - y).abs().max() < 1e-7
    small = copy.deepcopy(batch)
    small.cpu_chunk = 8  # CPU chunking (2 points per chunk here) gives identical results
    assert torch.equal(small.pixel_to_world(x, y)[0], ra) and torch.equal(small.world_to_pixel(ra, dec)[0], px)
    assert torch.equal(small.pixel_to_pixel(batch, x, y)[0], batch.pixel_to_pixel(batch, x, y)[0])
    # shapes: (N,) points broadcast to every WCS; (B, H, W) grids
    r_all, _ = batch.pixel_to_world(g[0].double(), g[1].double())
    assert r_all.shape == (4, 7) and torch.allclose(r_all, ra)
    r_grid, _ = batch.pixel_to_world(x.reshape(4, 7, 1).expand(4, 7, 3), y.reshape(4, 7, 1).expand(4, 7, 3))
    assert r_grid.shape == (4, 7, 3) and torch.allclose(r_grid[..., 2], ra)
    with pytest.raises(ValueError, match="batch"):
        batch.pixel_to_world(torch.zeros(3, 7, dtype=torch.float64), torch.zeros(3, 7, dtype=torch.float64))
    # select / getitem / stack
    sub = batch[[2, 0]]
    assert len(sub) == 2 and sub.meta[0]["kind"] == "TPV"
    assert torch.allclose(sub.pixel_to_world(x[[2, 0]], y[[2, 0]])[0], ra[[2, 0]])
    one = batch[1]
    assert len(one) == 1 and torch.allclose(one.pixel_to_world(x[1], y[1])[0], ra[1])
    re = TanWCS.stack([batch[3], batch[1], batch[0]])
    assert torch.allclose(re.pixel_to_world(x[[3, 1, 0]], y[[3, 1, 0]])[0], ra[[3, 1, 0]], atol=1e-12, rtol=0)
    assert re.to_header(1)["A_ORDER"] == hs[1]["A_ORDER"]
    with pytest.raises(IndexError):
        batch[7]


def test_dtype_device_follow_inputs(device):
    w = TanWCS.from_header(load_header(*REAL[1][1:3]), device=device)
    for dt in (torch.float32, torch.float64):
        x = torch.tensor([[10.0, 200.0]], dtype=dt, device=device)
        ra, dec = w.pixel_to_world(x, x)
        assert ra.dtype == dt and ra.device.type == torch.device(device).type
        px, _ = w.world_to_pixel(ra, dec)
        assert px.dtype == dt
    w32 = copy.deepcopy(w).to(torch.float32)  # nn.Module.to works in place
    assert w.crval.dtype == torch.float64 and w32.crval.dtype == torch.float32 and w32.crval_lo.abs().max() > 0
    h32 = w32.to_header()  # must not convert the module in place
    s32 = TanWCS.stack([w32, w32])
    assert w32.crval.dtype == torch.float32 and s32.crval.dtype == torch.float32 and len(s32) == 2
    assert h32["CRVAL1"] == pytest.approx(w.to_header()["CRVAL1"], abs=1e-13)  # float32 residual kept
    w64 = copy.deepcopy(w32).to(torch.float64)
    assert (w64.crval - w.crval).abs().max() < 1e-13  # the float32 residual is folded back
    assert (w32.crval.double() - w.crval).abs().max() > 1e-9  # (float32 alone would lose it)  # the float32 residual is folded back exactly


def test_jacobian_and_pixel_area():
    h = load_header(*REAL[8][1:3])  # TPV
    w = TanWCS.from_header(h)
    x = torch.tensor([100.0, 1500.0, 2000.0], dtype=torch.float64)
    y = torch.tensor([100.0, 3000.0, 4000.0], dtype=torch.float64)
    J = w.jacobian(x, y)
    assert J.shape == (3, 2, 2)
    xr, yr = x.clone().requires_grad_(True), y.clone().requires_grad_(True)
    P = w._p(torch.float64, "cpu")
    xi, eta, _ = w._pix2int(P, xr[None], yr[None])
    gx = torch.autograd.grad(xi.sum(), (xr, yr))
    assert torch.allclose(J[:, 0, 0], gx[0]) and torch.allclose(J[:, 0, 1], gx[1])
    # solid angle vs finite differences of astropy's world coordinates
    aw = WCS(h)
    area = w.pixel_area(x, y).numpy()
    e = 0.5
    for i in range(3):
        px = np.array([x[i] - e, x[i] + e, x[i], x[i]])
        py = np.array([y[i], y[i], y[i] - e, y[i] + e])
        ra, dec = aw.all_pix2world(px, py, 0)
        c = math.cos(math.radians(dec.mean()))
        dx = np.array([(ra[1] - ra[0]) * c, dec[1] - dec[0]])
        dy = np.array([(ra[3] - ra[2]) * c, dec[3] - dec[2]])
        assert area[i] == pytest.approx(abs(dx[0] * dy[1] - dx[1] * dy[0]), rel=1e-5)
    assert torch.allclose(w.pixel_scale(), torch.linalg.det(w.cd).abs().sqrt())


def test_gradcheck_sip_and_tpv():
    for i in (1, 12):  # irac SIP, DECam TPV
        w = TanWCS.from_header(load_header(*REAL[i][1:3]))
        x = torch.tensor([[3.0, 120.0, 250.0]], dtype=torch.float64)
        y = torch.tensor([[7.0, 90.0, 200.0]], dtype=torch.float64)
        ra, dec = w.pixel_to_world(x, y)
        assert gradcheck(lambda a, b: w.pixel_to_world(a, b), x, y)
        assert gradcheck(lambda a, b: w.world_to_pixel(a, b), ra, dec, eps=1e-7, atol=1e-4)

        # parameters, through unit-less offsets t: p = p0 + t * (1e-3 |p0| + 1e-6)
        names = ["cd", "crval", "crpix", "pv", "sip_a"]
        p0 = [getattr(w, n).detach().clone() for n in names]

        def with_params(*ts):
            v = w.select(0)
            for n, p, t in zip(names, p0, ts):
                setattr(v, n, p + t * (1e-3 * p.abs() + 1e-6))
            return v

        zeros = [torch.zeros_like(p) for p in p0]
        assert gradcheck(lambda *ts: with_params(*ts).pixel_to_world(x, y), *zeros)
        assert gradcheck(lambda *ts: with_params(*ts).world_to_pixel(ra, dec), *zeros, atol=1e-4)


def test_torch_compile_traces_without_graph_breaks():
    """fullgraph tracing with the eager backend (no C++ compile; the inductor variant is marked slow)."""
    import torch._dynamo

    torch._dynamo.reset()
    w = TanWCS.from_header(load_header(*REAL[1][1:3]))  # SIP order 2: quick to trace
    x = torch.rand(1, 50, dtype=torch.float64) * 255
    y = torch.rand(1, 50, dtype=torch.float64) * 255
    ra, dec = w.pixel_to_world(x, y)
    f = torch.compile(lambda a, b: w.world_to_pixel(*w.pixel_to_world(a, b)), fullgraph=True, backend="eager")
    px, py = f(x, y)
    assert (px - x).abs().max() < 1e-7
    torch._dynamo.reset()


@pytest.mark.slow
def test_torch_compile_inductor(compile_fn):
    w = TanWCS.from_header(load_header(*REAL[1][1:3]))
    x = torch.rand(1, 64, dtype=torch.float64) * 255
    f = compile_fn(lambda a, b: w.world_to_pixel(*w.pixel_to_world(a, b)))
    px, py = f(x, x)
    assert (px - x).abs().max() < 1e-7
