"""Tests of astroprep_torch.detect: filtering, labelling, deblending, cleaning and SExtractor parity."""

import math
import subprocess

import numpy as np
import pytest
import torch

from conftest import require_binary, shared_file

from astroprep_torch.detect import (
    FLAG_BLENDED,
    FLAG_TRUNCATED,
    Catalog,
    SourceExtractor,
    connected_components,
    default_kernel,
    detect_sources,
    filter_image,
    label_image,
)


@pytest.fixture(autouse=True, scope="module")
def two_threads():
    """These tests run on two intra-op threads; the previous setting is restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


SEP_GLOBAL_RMS = 65.4617  # the global background RMS SExtractor 2.25 prints for sep/image.fits


def _gauss_field(shape=(64, 64), stars=((20.0, 30.0, 5000.0),), sigma=1.5, noise=5.0, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    H, W = shape
    yy, xx = torch.meshgrid(torch.arange(H, dtype=dtype), torch.arange(W, dtype=dtype), indexing="ij")
    img = torch.zeros(H, W, dtype=dtype)
    for x, y, f in stars:
        img += f / (2 * math.pi * sigma**2) * torch.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * sigma**2))
    img += noise * torch.randn(H, W, generator=g, dtype=dtype)
    return img[None, None]


# ---------------------------------------------------------------------------------------------
# building blocks
# ---------------------------------------------------------------------------------------------
def test_filter_matches_conv2d(dtype):
    img = torch.randn(2, 1, 33, 40, dtype=dtype)
    k = default_kernel(dtype)
    ref = torch.nn.functional.conv2d(img, k.view(1, 1, 3, 3), padding=1)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(filter_image(img), ref, atol=tol, rtol=tol)
    # non-separable kernel goes through conv2d, normalised by the sum of |values|
    kk = torch.tensor([[0.0, 1.0, 0.0], [1.0, -4.0, 1.0], [0.0, 1.0, 0.0]], dtype=dtype)
    ref2 = torch.nn.functional.conv2d(img, (kk / 8).view(1, 1, 3, 3), padding=1)
    torch.testing.assert_close(filter_image(img, kk), ref2)
    assert filter_image(img, None) is img
    assert float(default_kernel().sum()) == pytest.approx(1.0)


def test_filter_gradcheck():
    from conftest import gradcheck

    img = torch.randn(1, 1, 6, 7, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda t: filter_image(t), img)


def test_filter_compiles(compile_fn):
    img = torch.randn(1, 1, 32, 32)
    f = compile_fn(lambda t: filter_image(t, "default"))
    torch.testing.assert_close(f(img), filter_image(img), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("connectivity", [8, 4])
def test_label_image_matches_scipy(connectivity):
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(3)
    binary = rng.random((3, 1, 70, 90)) < 0.45
    ours = label_image(torch.from_numpy(binary), connectivity=connectivity).numpy()
    struct = np.ones((3, 3)) if connectivity == 8 else None
    for b in range(3):
        ref, n = ndimage.label(binary[b, 0], structure=struct)
        assert ours[b, 0].max() == n
        # same partition (labels are both in raster order of first pixel)
        np.testing.assert_array_equal(ours[b, 0], ref)


def test_connected_components_long_path():
    # a serpentine path is the worst case for label propagation; pointer jumping keeps it short
    n = 20001
    u = torch.arange(n - 1)
    v = u + 1
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    root = connected_components(n, perm[u], perm[v])
    assert torch.all(root == int(perm.min()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_level_roots_equal_components_of_the_level_graph(seed):
    """The deblender's per-level components (one union-find fed level by level, each pixel edge hooked
    once) equal the connected components of the (pixel, level) node graph with every edge replicated
    on each level both ends reach -- the graph it replaces, 10-30x larger for a saturated star."""
    from astroprep_torch.detect import _level_roots, _pixel_edges

    g = torch.Generator().manual_seed(seed)
    H = W = 48
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    img = torch.zeros(H, W, dtype=torch.float64)
    for _ in range(6):  # nested peaks: many levels per pixel, components that split and merge
        x0, y0, s = (torch.rand(3, generator=g, dtype=torch.float64) * torch.tensor([W, H, 6.0])).tolist()
        img += 30 * torch.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * (s + 1.0) ** 2))
    img[20, :] += 25.0  # a long thin ridge (a bleed trail): deep hooking chains
    idx = torch.nonzero((img > 1.0).reshape(-1)).squeeze(1)
    L = torch.clamp((img.reshape(-1)[idx] / 2.0).long(), 0, 31)
    u, v = _pixel_edges(idx, idx % W, idx // W, H, W)
    c = torch.minimum(L[u], L[v])
    keep = c > 0
    u, v, c = u[keep], v[keep], c[keep]
    off = torch.cumsum(L, 0) - L
    n_nodes = int(L.sum())
    e_rep = torch.repeat_interleave(torch.arange(u.numel()), c)
    e_lev = torch.arange(e_rep.numel()) - (torch.cumsum(c, 0) - c)[e_rep]
    want = connected_components(n_nodes, off[u][e_rep] + e_lev, off[v][e_rep] + e_lev)
    got = _level_roots(L, off, n_nodes, u, v, c)
    assert n_nodes > 10 * idx.numel() // 2 and torch.equal(got, want)


def _nested_levels(seed, H=48, W=48):
    """Pixels of a field of nested peaks and a ridge, their level counts ``L``, filtered values and edges."""
    from astroprep_torch.detect import _pixel_edges

    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    img = torch.zeros(H, W, dtype=torch.float64)
    for _ in range(6):
        x0, y0, s = (torch.rand(3, generator=g, dtype=torch.float64) * torch.tensor([W, H, 6.0])).tolist()
        img += 30 * torch.exp(-((xx - x0) ** 2 + (yy - y0) ** 2) / (2 * (s + 1.0) ** 2))
    img[20, :] += 25.0
    idx = torch.nonzero((img > 1.0).reshape(-1)).squeeze(1)
    f = img.reshape(-1)[idx]
    L = torch.clamp((f / 2.0).long(), 0, 31)
    u, v = _pixel_edges(idx, idx % W, idx // W, H, W)
    c = torch.minimum(L[u], L[v])
    keep = c > 0
    return L, f, u[keep], v[keep], c[keep]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grow_levels_equals_the_node_graph_components(seed):
    """The per-level components grown from the top level down (no (pixel, level) nodes) are those of
    the node labelling: same smallest pixels, levels, areas, parents, each pixel's top component, and
    fluxes equal up to the summation order."""
    from astroprep_torch.detect import _level_roots, _unique_roots
    from astroprep_torch.detect.deblend import _grow_levels

    L, f, u, v, c = _nested_levels(seed)
    off = torch.cumsum(L, 0) - L
    n_nodes = int(L.sum())
    node_pix = torch.repeat_interleave(torch.arange(L.numel()), L)
    node_lev = torch.arange(n_nodes) - off[node_pix] + 1
    comp_ids, node_comp = _unique_roots(_level_roots(L, off, n_nodes, u, v, c))
    want_pix, want_lev = node_pix[comp_ids], node_lev[comp_ids]
    want_par = torch.where(want_lev > 1, node_comp[(off[want_pix] + want_lev - 2).clamp_min(0)], -1)
    top = torch.where(L > 0, node_comp[(off + L - 1).clamp_min(0)], -1)
    lv = _grow_levels(L, f, u, v, c)
    order = torch.argsort(lv.root * 32 + lv.lev)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel())
    assert torch.equal(lv.root[order], want_pix) and torch.equal(lv.lev[order], want_lev)
    assert torch.equal(lv.area[order], torch.bincount(node_comp, minlength=comp_ids.numel()))
    assert torch.equal(torch.where(lv.par[order] >= 0, rank[lv.par[order].clamp_min(0)], -1), want_par)
    assert torch.equal(torch.where(lv.leaf >= 0, rank[lv.leaf.clamp_min(0)], -1), top)
    assert torch.allclose(lv.flux[order], torch.zeros(comp_ids.numel(), dtype=f.dtype).index_add_(0, node_comp, f[node_pix]),
                          rtol=1e-13, atol=0)
    assert int(torch.bincount(want_par[want_par >= 0]).max()) >= 2  # the tree branches
    assert comp_ids.numel() < n_nodes // 5


def test_deblending_identical_with_the_pixel_order_fluxes(monkeypatch):
    """The branch significance taken from the node-order (pixel-order) fluxes everywhere, the fallback
    of ``_significant``, gives the very same detection: both paths number the components alike."""
    import astroprep_torch.detect.deblend as deblend

    stars = [(10.0 + 9 * i, 12.0 + 5 * (i % 3) + 0.3 * i, 3000.0 + 700 * i) for i in range(6)]
    stars += [(20.0, 45.0, 9000.0), (24.0, 47.0, 2500.0), (40.0, 50.0, 6000.0), (43.0, 49.5, 5800.0)]
    img = _gauss_field(stars=stars, sigma=1.8, dtype=torch.float32)
    want = detect_sources(img, 5.0, thresh=2.0)
    real = deblend._significant
    calls = []

    def exact_always(flux, area, comp_t, need, valid, exact_flux, positive):
        calls.append(1)
        return real(flux, area, comp_t, need, valid, exact_flux, False)

    monkeypatch.setattr(deblend, "_significant", exact_always)
    got = detect_sources(img, 5.0, thresh=2.0)
    assert calls and int(want["blended"].sum()) >= 3
    for k in ("segmentation", "pixel_row", "blended", "mx", "my", "cflux", "label"):
        assert torch.equal(got[k], want[k]), k


def test_significance_falls_back_to_the_pixel_order_sum_near_the_cut():
    """A flux summed in another order decides ``flux - t area > need`` only when no summation order
    could change the decision; near the cut the pixel-order sum decides."""
    from astroprep_torch.detect.deblend import _significant

    flux = torch.tensor([10.0, 10.0], dtype=torch.float64)
    area, t = torch.tensor([3, 3]), torch.tensor([1.0, 1.0], dtype=torch.float64)
    valid = torch.tensor([True, True])
    calls = []

    def exact():
        calls.append(1)
        return torch.tensor([10.0, 10.0 - 2 ** -48], dtype=torch.float64)

    far = _significant(flux, area, t, torch.tensor([6.0, 8.0], dtype=torch.float64), valid, exact, True)
    assert far.tolist() == [True, False] and not calls
    near = _significant(flux, area, t, torch.tensor([6.0, 7.0 - 2 ** -49], dtype=torch.float64), valid, exact, True)
    assert calls and near.tolist() == [True, False]
    neg = _significant(flux, area, t, torch.tensor([6.0, 8.0], dtype=torch.float64), valid, exact, False)
    assert len(calls) == 2 and neg.tolist() == [True, False]


# ---------------------------------------------------------------------------------------------
# detection behaviour on synthetic frames
# ---------------------------------------------------------------------------------------------
def test_detects_isolated_stars_and_minarea(device):
    stars = ((15.0, 15.0, 4000.0), (45.0, 20.0, 6000.0), (30.0, 48.0, 3000.0))
    img = _gauss_field(stars=stars).to(device)
    cat = SourceExtractor(thresh=3.0)(img, 5.0)
    assert len(cat) == 3
    assert cat.segmentation.shape == img.shape and cat.segmentation.dtype == torch.int64
    xy = torch.stack([cat.x, cat.y], 1).cpu()
    for x, y, _ in stars:
        assert torch.min(torch.hypot(xy[:, 0] - x, xy[:, 1] - y)) < 0.1
    # minarea larger than any object: nothing
    assert len(SourceExtractor(thresh=3.0, minarea=10_000)(img, 5.0)) == 0


def test_deblends_close_pair():
    stars = ((28.0, 32.0, 20000.0), (35.0, 32.0, 12000.0))
    img = _gauss_field(stars=stars, sigma=1.6)
    blended = SourceExtractor(thresh=3.0, deblend_cont=0.005)(img, 5.0)
    assert len(blended) == 2
    assert torch.all(blended.flags & FLAG_BLENDED)
    assert torch.allclose(torch.sort(blended.x).values, torch.tensor([28.0, 35.0], dtype=blended.x.dtype), atol=0.3)
    # every pixel of the parent footprint is given to one of the branches
    one = SourceExtractor(thresh=3.0, deblend_cont=1.0)(img, 5.0)
    assert len(one) == 1 and not bool(one.flags[0] & FLAG_BLENDED)
    assert torch.equal(blended.segmentation > 0, one.segmentation > 0)
    # a faint companion holding less than deblend_cont of the flux is not split off
    assert len(SourceExtractor(thresh=3.0, deblend_cont=0.6)(img, 5.0)) == 1


def test_clean_removes_wing_detection():
    # a bright star with an asymmetric noise bump in its wings: CLEAN merges the bump back
    img = _gauss_field(stars=((32.0, 32.0, 2e5),), sigma=1.5, noise=1.0)
    yy, xx = torch.meshgrid(torch.arange(64.0, dtype=img.dtype), torch.arange(64.0, dtype=img.dtype), indexing="ij")
    img = img + 8.0 * torch.exp(-((xx - 43) ** 2 + (yy - 32) ** 2) / 2.0)
    kept = SourceExtractor(thresh=3.0, clean=False)(img, 1.0)
    cleaned = SourceExtractor(thresh=3.0, clean=True)(img, 1.0)
    assert len(kept) == 2 and len(cleaned) == 1
    # the cleaned object's pixels join its master in the segmentation (as SExtractor's check image)
    assert torch.equal(cleaned.segmentation > 0, kept.segmentation > 0)


def test_batch_equals_single_and_border_flag():
    a = _gauss_field(stars=((1.0, 30.0, 5000.0), (30.0, 30.0, 5000.0)), seed=1)
    b = _gauss_field(stars=((40.0, 10.0, 8000.0),), seed=2)
    se = SourceExtractor(thresh=3.0)
    both = se(torch.cat([a, b]), torch.tensor([5.0, 5.0]))
    ca, cb = se(a, 5.0), se(b, 5.0)
    assert len(both) == len(ca) + len(cb)
    torch.testing.assert_close(both.select(0).x, ca.x)
    torch.testing.assert_close(both.select(1).y, cb.y)
    assert both.segmentation[1].max() == len(cb)
    edge = ca.x < 3
    assert torch.all((ca.flags[edge] & FLAG_TRUNCATED) > 0)
    assert torch.all((ca.flags[~edge] & FLAG_TRUNCATED) == 0)


def test_mask_and_nan_pixels_are_not_detected():
    img = _gauss_field(stars=((20.0, 20.0, 5000.0), (45.0, 45.0, 5000.0)))
    mask = torch.zeros_like(img, dtype=torch.bool)
    mask[..., 40:51, 40:51] = True
    cat = SourceExtractor(thresh=3.0)(img, 5.0, mask)
    assert len(cat) == 1 and abs(float(cat.x[0]) - 20) < 0.2
    img2 = img.clone()
    img2[..., 45, 45] = float("nan")
    seg = detect_sources(img2, 5.0, thresh=3.0)["segmentation"]
    assert seg[0, 0, 45, 45] == 0


def test_rms_map_threshold():
    img = _gauss_field(stars=((20.0, 20.0, 3000.0), (45.0, 45.0, 3000.0)))
    rms = torch.full_like(img, 5.0)
    rms[..., :, 32:] = 500.0  # right half is very noisy: the second star falls below threshold
    cat = SourceExtractor(thresh=3.0)(img, rms)
    assert len(cat) == 1 and abs(float(cat.x[0]) - 20) < 0.2


def test_bad_arguments():
    se = SourceExtractor()
    with pytest.raises(ValueError, match="image"):
        se(torch.zeros(8, 8), 1.0)
    with pytest.raises(ValueError, match="rms"):
        se(torch.zeros(1, 1, 8, 8), torch.ones(1, 1, 4, 4))
    with pytest.raises(TypeError, match="mask"):
        se(torch.zeros(1, 1, 8, 8), 1.0, torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError, match="filter_kernel"):
        SourceExtractor(filter_kernel="gauss")(torch.zeros(1, 1, 8, 8), 1.0)
    with pytest.raises(ValueError, match="deblend_cont"):
        SourceExtractor(deblend_cont=2.0)


def test_catalog_table_io(tmp_path):
    img = _gauss_field(stars=((20.0, 20.0, 5000.0), (45.0, 40.0, 5000.0)))
    cat = SourceExtractor(thresh=3.0)(img, 5.0)
    t = cat.to_table()
    for name in ("NUMBER", "X_IMAGE", "Y_IMAGE", "FLUX_APER", "FLUX_AUTO", "KRON_RADIUS", "FLAGS", "BATCH_INDEX"):
        assert name in t.colnames
    np.testing.assert_allclose(t["X_IMAGE"], cat.x.numpy() + 1)
    from astropy.table import Table

    t.write(tmp_path / "c.ecsv")
    t.write(tmp_path / "c.fits")
    for p in ("c.ecsv", "c.fits"):
        back = Table.read(tmp_path / p)
        np.testing.assert_allclose(back["Y_IMAGE"], t["Y_IMAGE"])
    sub = cat[cat.flux_iso > 0]
    assert isinstance(sub, Catalog) and len(sub) == len(cat)


def test_hydra_config_builds():
    from pathlib import Path

    import yaml

    cfg = yaml.safe_load((Path(__file__).parents[1] / "configs" / "detect" / "default.yaml").read_text())
    assert cfg.pop("_target_") == "astroprep_torch.detect.SourceExtractor"
    se = SourceExtractor(**cfg)
    assert se.deblend_nthresh == 32 and se.thresh == 1.5


# ---------------------------------------------------------------------------------------------
# parity with SExtractor on real data
# ---------------------------------------------------------------------------------------------
def _read_f32(path):
    from astropy.io import fits

    return fits.getdata(path).astype(np.float32)


def _match(x, y, sx, sy):
    d2 = (x[:, None] - sx[None]) ** 2 + (y[:, None] - sy[None]) ** 2
    return d2.argmin(1), np.sqrt(d2.min(1)), np.sqrt(d2.min(0))


def test_sep_image_parity_with_sextractor():
    """sep/image.fits vs SExtractor's image.cat (default.sex), with SExtractor's own background.

    SExtractor without weight map thresholds the filtered image at DETECT_THRESH x its global RMS
    (65.4617, printed by source-extractor 2.25 on this frame), so we pass that scalar.
    """
    from astropy.io import ascii

    im = _read_f32(shared_file("sep", "image.fits"))
    bk = _read_f32(shared_file("sep", "back.fits"))
    ref = ascii.read(str(shared_file("sep", "image.cat")), format="sextractor")
    se = SourceExtractor(
        thresh=1.5, minarea=5, deblend_nthresh=32, deblend_cont=1.0, clean=True, clean_param=1.0,
        phot_apertures=(10.0,), kron_fact=2.5, min_radius=0.0, saturation=50000.0,
        mask_type="none", flux_fracs=(0.1, 0.5, 0.6),
    )
    cat = se(torch.from_numpy(im - bk)[None, None], SEP_GLOBAL_RMS, background=torch.from_numpy(bk)[None, None])
    x, y = cat.x.numpy() + 1, cat.y.numpy() + 1
    sx, sy = np.asarray(ref["X_IMAGE"]), np.asarray(ref["Y_IMAGE"])
    j, d_ours, d_ref = _match(x, y, sx, sy)
    assert len(cat) == len(ref) == 65
    assert np.all(d_ours < 1) and np.all(d_ref < 1)  # every object matched, no extra detection
    assert np.mean(np.hypot(x - sx[j], y - sy[j]) < 0.01) >= 0.95
    assert np.mean(cat.flags.numpy() == np.asarray(ref["FLAGS"])[j]) >= 0.95
    xw, yw = cat.xwin.numpy() + 1, cat.ywin.numpy() + 1
    assert np.mean(np.hypot(xw - np.asarray(ref["XWIN_IMAGE"])[j], yw - np.asarray(ref["YWIN_IMAGE"])[j]) < 0.01) >= 0.95
    fa = cat.flux_aper.numpy().reshape(len(cat), -1)[:, 0]
    assert np.mean(np.abs(fa / np.asarray(ref["FLUX_APER"])[j] - 1) < 1e-3) >= 0.95
    good = np.asarray(ref["FLUX_AUTO"])[j] != 0
    assert np.mean(np.abs(cat.flux_auto.numpy()[good] / np.asarray(ref["FLUX_AUTO"])[j][good] - 1) < 1e-2) >= 0.95
    assert np.mean(np.abs(cat.kron_radius.numpy()[good] / np.asarray(ref["KRON_RADIUS"])[j][good] - 1) < 1e-2) >= 0.95


M13_SEX = """CATALOG_NAME {cat}
CATALOG_TYPE ASCII_HEAD
PARAMETERS_NAME {param}
DETECT_TYPE CCD
DETECT_MINAREA 5
DETECT_THRESH 1.5
ANALYSIS_THRESH 1.5
FILTER Y
FILTER_NAME {conv}
DEBLEND_NTHRESH 32
DEBLEND_MINCONT 0.005
CLEAN Y
CLEAN_PARAM 1.0
MASK_TYPE NONE
PHOT_APERTURES 10
PHOT_AUTOPARAMS 2.5,3.5
SATUR_LEVEL 50000
GAIN 0.0
BACK_SIZE 64
BACK_FILTERSIZE 3
CHECKIMAGE_TYPE BACKGROUND,SEGMENTATION
CHECKIMAGE_NAME {back},{seg}
VERBOSE_TYPE FULL
"""


def test_m13_crowded_parity_with_source_extractor(tmp_path):
    """Crowded DSS field: Debian source-extractor run here, same settings, its background as input.

    Measured: 289 vs 288 objects, 99.3% / 99.7% matched within 1 px, 100% of positions within 0.01 px.
    Explained differences: CLEAN is order-dependent in SExtractor (objects enter its clean stack in
    scan order) and our CLEAN is order-free, which flips one or two borderline victims; the faint
    pixels of a deblended family are given to branches by a *random* draw in SExtractor
    (``gatherup``), by the most probable branch here, so AUTO/Kron of deblended objects differ at
    the % level (unblended objects agree to 1%).
    """
    from astropy.io import ascii, fits

    exe = require_binary("source-extractor")
    src = shared_file("astropy_images", "m13.fits")
    (tmp_path / "default.conv").write_text("CONV NORM\n1 2 1\n2 4 2\n1 2 1\n")
    # flag 16 depends on the measurements asked for: ask for those our Catalog holds
    (tmp_path / "m.param").write_text(
        "NUMBER\nX_IMAGE\nY_IMAGE\nXWIN_IMAGE\nYWIN_IMAGE\nFLUX_APER(1)\nFLUX_AUTO\nKRON_RADIUS\nFLUX_RADIUS\nFLAGS\n"
    )
    (tmp_path / "m.sex").write_text(
        M13_SEX.format(cat="m.cat", param="m.param", conv="default.conv", back="back.fits", seg="seg.fits")
    )
    out = subprocess.run([exe, str(src), "-c", "m.sex"], cwd=tmp_path, capture_output=True, text=True, check=True)
    line = [ln for ln in out.stderr.splitlines() if "RMS:" in ln][-1]
    rms = float(line.split("RMS:")[1].split("/")[0])
    ref = ascii.read(str(tmp_path / "m.cat"), format="sextractor")
    im = fits.getdata(src).astype(np.float32)
    bk = fits.getdata(tmp_path / "back.fits").astype(np.float32)
    se = SourceExtractor(thresh=1.5, minarea=5, deblend_cont=0.005, kron_fact=2.5, min_radius=3.5, mask_type="none")
    cat = se(torch.from_numpy(im - bk)[None, None], rms)
    seg_ref = fits.getdata(tmp_path / "seg.fits")
    assert np.array_equal(cat.segmentation[0, 0].numpy() > 0, seg_ref > 0)  # same detected pixels
    x, y = cat.x.numpy() + 1, cat.y.numpy() + 1
    sx, sy = np.asarray(ref["X_IMAGE"]), np.asarray(ref["Y_IMAGE"])
    j, d_ours, d_ref = _match(x, y, sx, sy)
    assert np.mean(d_ours < 1) >= 0.98 and np.mean(d_ref < 1) >= 0.98
    m = d_ours < 1
    jm = j[m]
    assert np.mean(np.hypot(x[m] - sx[jm], y[m] - sy[jm]) < 0.01) >= 0.90
    fa = cat.flux_aper.numpy().reshape(len(cat), -1)[m, 0]
    assert np.mean(np.abs(fa / np.asarray(ref["FLUX_APER"])[jm] - 1) < 1e-3) >= 0.90
    assert np.mean(cat.flags.numpy()[m] == np.asarray(ref["FLAGS"])[jm]) >= 0.90
    unbl = (np.asarray(ref["FLAGS"])[jm] & FLAG_BLENDED) == 0
    fauto = cat.flux_auto.numpy()[m]
    assert np.mean(np.abs(fauto[unbl] / np.asarray(ref["FLUX_AUTO"])[jm][unbl] - 1) < 1e-2) >= 0.90
    kr = cat.kron_radius.numpy()[m]
    assert np.mean(np.abs(kr[unbl] / np.asarray(ref["KRON_RADIUS"])[jm][unbl] - 1) < 1e-2) >= 0.90


def test_simulated_gwac_frame_end_to_end_vs_source_extractor(tmp_path):
    """Issue #4's simulated-frame criteria on a 1024^2 GWAC-like frame (1250 stars, the 4096^2 density).

    source-extractor runs with its built-in defaults plus MASK_TYPE CORRECT and PHOT_AUTOPARAMS 2.5,3.5
    and its own background; we detect and measure on its -BACKGROUND check image with its global RMS
    (the same pixels). For SExtractor objects with FLAGS == 0 and FLUX_AUTO/FLUXERR_AUTO > 20 (an
    unmatched one fails): >= 98% with |dmag_auto| < 0.01, >= 99% with X/Y_IMAGE and XWIN/YWIN within
    0.01 px; completeness (stars with expected S/N >= 20) and purity (detections with S/N_auto >= 20)
    against the simulator's truth (1 px) within 0.5 percentage points of SExtractor's.
    Full-size evidence: experiments/detect_sim_fidelity.py -> experiments/results/detect_sim_fidelity.md.
    """
    import re

    from astropy.io import fits
    from astropy.table import Table
    from scipy.spatial import cKDTree

    from astroprep_torch.sim import simulate_frame

    exe = require_binary("source-extractor", "sex")
    fr = simulate_frame((1024, 1024), n_stars=1250, seed=1)
    fits.writeto(tmp_path / "sim.fits", fr.image[0, 0].numpy().astype(np.float32))
    (tmp_path / "p.param").write_text("NUMBER\nX_IMAGE\nY_IMAGE\nXWIN_IMAGE\nYWIN_IMAGE\nFLUX_APER\nFLUX_AUTO\n"
                                      "FLUXERR_AUTO\nKRON_RADIUS\nFLUX_RADIUS\nFLAGS\n")
    (tmp_path / "default.conv").write_text("CONV NORM\n1 2 1\n2 4 2\n1 2 1\n")
    cmd = [exe, "sim.fits", "-c", "/dev/null", "-PARAMETERS_NAME", "p.param", "-CATALOG_NAME", "cat.fits",
           "-CATALOG_TYPE", "FITS_1.0", "-FILTER_NAME", "default.conv", "-MASK_TYPE", "CORRECT",
           "-PHOT_AUTOPARAMS", "2.5,3.5", "-CHECKIMAGE_TYPE", "-BACKGROUND,BACKGROUND",
           "-CHECKIMAGE_NAME", "sub.fits,back.fits", "-VERBOSE_TYPE", "NORMAL"]
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, check=True)
    rms = float(re.search(r"RMS:\s*([0-9.eE+-]+)", out.stderr).group(1))
    ref = Table.read(tmp_path / "cat.fits")
    sub = fits.getdata(tmp_path / "sub.fits").astype(np.float32)
    back = fits.getdata(tmp_path / "back.fits").astype(np.float32)
    se = SourceExtractor(thresh=1.5, minarea=5, deblend_nthresh=32, deblend_cont=0.005, clean_param=1.0,
                         phot_apertures=(5.0,), kron_fact=2.5, min_radius=3.5, saturation=50000.0,
                         mask_type="correct")
    cat = se(torch.from_numpy(sub)[None, None], rms, background=torch.from_numpy(back)[None, None])

    sx, sy = np.asarray(ref["X_IMAGE"], float) - 1, np.asarray(ref["Y_IMAGE"], float) - 1
    ox, oy = cat.x.double().numpy(), cat.y.double().numpy()
    d, j = cKDTree(np.c_[ox, oy]).query(np.c_[sx, sy])
    _, i = cKDTree(np.c_[sx, sy]).query(np.c_[ox, oy])
    matched = (d <= 1.0) & (i[j] == np.arange(len(sx)))  # mutual nearest neighbours within 1 px
    fa, fe = np.asarray(ref["FLUX_AUTO"], float), np.asarray(ref["FLUXERR_AUTO"], float)
    snr = fa / np.where(fe > 0, fe, np.inf)
    sample = (np.asarray(ref["FLAGS"]) == 0) & (snr > 20)
    assert sample.sum() > 250 and matched.mean() > 0.99
    jm = j[sample & matched]
    n = sample.sum()  # unmatched sample objects count as failures
    dmag = np.abs(2.5 * np.log10(cat.flux_auto.double().numpy()[jm] / fa[sample & matched]))
    dpos = np.hypot(ox[jm] - sx[sample & matched], oy[jm] - sy[sample & matched])
    dwin = np.hypot(cat.xwin.double().numpy()[jm] + 1 - np.asarray(ref["XWIN_IMAGE"])[sample & matched],
                    cat.ywin.double().numpy()[jm] + 1 - np.asarray(ref["YWIN_IMAGE"])[sample & matched])
    assert (dmag < 0.01).sum() / n >= 0.98, np.sort(dmag)[-10:]
    assert (dpos < 0.01).sum() / n >= 0.99, np.sort(dpos)[-10:]
    assert (dwin < 0.01).sum() / n >= 0.99, np.sort(dwin)[-10:]

    # completeness and purity against the simulator's truth, ours vs SExtractor's
    tx, ty = fr.catalog["x"].double().numpy(), fr.catalog["y"].double().numpy()
    tf = fr.catalog["flux"].double().numpy()
    on = (tx >= -0.5) & (ty >= -0.5) & (tx <= 1023.5) & (ty <= 1023.5)
    tx, ty, tf = tx[on], ty[on], tf[on]
    sigma = float(fr.header["FWHM"]) / 2.3548
    bright = tf / np.sqrt(tf / float(fr.header["GAIN"]) + 4 * np.pi * sigma**2 * rms**2) >= 20
    truth = cKDTree(np.c_[tx, ty])
    o_snr = cat.flux_auto.double().numpy() / np.where(cat.fluxerr_auto.double().numpy() > 0,
                                                      cat.fluxerr_auto.double().numpy(), np.inf)

    def scores(x, y, s):
        comp = cKDTree(np.c_[x, y]).query(np.c_[tx, ty])[0][bright] <= 1.0
        pur = truth.query(np.c_[x, y])[0][s >= 20] <= 1.0
        return 100 * comp.mean(), 100 * pur.mean()

    c_sx, p_sx = scores(sx, sy, snr)
    c_o, p_o = scores(ox, oy, o_snr)
    assert c_sx > 90 and p_sx > 90  # the truth match itself is meaningful
    assert abs(c_o - c_sx) <= 0.5 and abs(p_o - p_sx) <= 0.5, (c_o, c_sx, p_o, p_sx)


# -- #20: bad noise values, unmasked NaN pixels --------------------------------------------------
def test_bad_rms_values_raise_naming_rms():
    img = _gauss_field(dtype=torch.float32)
    se = SourceExtractor()
    for rms in (0.0, -5.0, float("nan"), torch.tensor([0.0])):
        with pytest.raises(ValueError, match="rms must be positive and finite"):
            se(img, rms)
    with pytest.raises(TypeError, match="rms must be the background noise.*got None"):
        se(img, None)
    with pytest.raises(ValueError, match="rms map has no positive finite value"):
        se(img, torch.full_like(img, -5.0))


def test_rms_map_with_zero_or_nan_patch_masks_it():
    img = _gauss_field(stars=((20.0, 30.0, 5000.0), (50.0, 10.0, 5000.0)), dtype=torch.float32)
    rms = torch.full_like(img, 5.0)
    rms[..., :, 40:] = 0.0  # e.g. outside a footprint
    rms[..., 0:5, 0:5] = float("nan")
    cat = SourceExtractor()(img, rms)
    x = cat.columns["x"]
    assert len(x) == 1 and abs(float(x[0]) - 20.0) < 0.5  # the star on the zero-rms side is not detected


def test_unmasked_nan_pixels_do_not_spoil_photometry():
    stars = tuple((float(x), float(y), 8000.0) for x, y in ((12, 12), (40, 14), (25, 40), (50, 50), (10, 52)))
    img = _gauss_field(stars=stars, dtype=torch.float32)
    img[..., 13, 12] = float("nan")  # next to a star's centre, not masked
    img[..., 30, 30] = float("nan")
    cat = SourceExtractor()(img, 5.0)
    assert len(cat.columns["x"]) == 5
    for k in ("flux_auto", "flux_aper", "flux_iso", "x", "y"):
        assert torch.isfinite(cat.columns[k]).all(), k

def test_saturated_mask_sets_flag_4():
    """A saturation / bleed-trail mask (calibrate.saturation_mask) flags the objects touching it."""
    from astroprep_torch.detect import SourceExtractor
    from astroprep_torch import sim

    f = sim.simulate_frame((96, 96), n_stars=12, mag_range=(11.0, 14.0), sky=0.0, sky_gradient=(0, 0),
                           saturation=None, seed=2)
    sat = torch.zeros_like(f.mask)
    c = f.catalog
    inside = (c["x"] > 8) & (c["x"] < 88) & (c["y"] > 8) & (c["y"] < 88)
    i = int(torch.argmax(torch.where(inside, c["flux"], torch.zeros_like(c["flux"]))))
    x, y = int(c["x"][i].round()), int(c["y"][i].round())
    sat[0, 0, y, x] = True  # the brightest star's peak
    cat = SourceExtractor()(f.image, 10.0 / 1.5)
    flagged = SourceExtractor()(f.image, 10.0 / 1.5, saturated=sat)
    assert len(cat) == len(flagged) and int(((cat.columns["flags"] & 4) > 0).sum()) == 0
    assert int(((flagged.columns["flags"] & 4) > 0).sum()) == 1


@pytest.mark.parametrize("bump_y, reblanked_rows", [(43.0, [44]), (21.0, [])])
def test_clean_pastes_back_the_rows_scan_c_has_blanked(bump_y, reblanked_rows):
    """SExtractor's CLEAN pastes a removed object's pixels back while the scan reads the row after the
    later detection's last row Y: rows < Y stay (``unblanked``), row Y is blanked again (``reblanked``)."""
    img = _gauss_field(stars=((32.0, 32.0, 2e5),), sigma=1.5, noise=1.0)
    yy, xx = torch.meshgrid(torch.arange(64.0, dtype=img.dtype), torch.arange(64.0, dtype=img.dtype), indexing="ij")
    img = img + 8.0 * torch.exp(-((xx - 32) ** 2 + (yy - bump_y) ** 2) / 2.0)
    kept = detect_sources(img, 1.0, thresh=3.0, clean=False)
    det = detect_sources(img, 1.0, thresh=3.0)
    assert len(kept["label"]) == 2 and len(det["label"]) == 1
    bump = kept["pixels"][kept["pixel_row"] == (1 if bump_y > 32 else 0)]
    both = torch.cat([det["unblanked"], det["reblanked"]]).sort().values
    assert torch.equal(both, bump)
    assert sorted(set((det["reblanked"] // 64).tolist())) == reblanked_rows
    assert int((det["unblanked"] // 64).max()) < (44 if reblanked_rows else 64)


def test_lutz_order_key_follows_the_scan_pixel_list():
    """Pixels left of the previous row's first column start a new list the older one is appended to."""
    from astroprep_torch.detect.analyse import lutz_order_key

    pts = [(2, 0), (3, 0), (1, 1), (2, 1), (3, 1), (4, 1), (0, 2), (1, 2), (2, 2)]  # (x, y), raster order
    x = torch.tensor([p[0] for p in pts])
    y = torch.tensor([p[1] for p in pts])
    key = lutz_order_key(x, y, torch.zeros_like(x), 3, 5)
    order = [pts[i] for i in torch.argsort(key).tolist()]
    # scan.c's list: (0,2) + [(1,1) + [(2,0),(3,0)] + (2,1),(3,1),(4,1)] + (1,2),(2,2)
    assert order == [(0, 2), (1, 1), (2, 0), (3, 0), (2, 1), (3, 1), (4, 1), (1, 2), (2, 2)]

def test_components_on_host_equal_the_edge_graph_labelling():
    """scipy's labelling of the detected pixels (dense detections on CPU) numbers the components as
    the union-find over the 8-neighbour edges does, with pixels of two images never joined (objects
    at the bottom row of one image and the top row of the next)."""
    from astroprep_torch.detect._index import _unique_roots
    from astroprep_torch.detect.labels import _components_on_host, _pixel_edges, connected_components

    g = torch.Generator().manual_seed(4)
    B, H, W = 2, 37, 41
    m = torch.rand(B, H, W, generator=g) < 0.45
    m[0, -1, :] = True
    m[1, 0, :] = True
    idx = m.reshape(-1).nonzero().squeeze(1)
    rem = idx % (H * W)
    u, v = _pixel_edges(idx, rem % W, rem // W, H, W)
    _, ref = _unique_roots(connected_components(idx.numel(), u, v))
    got = _components_on_host(idx, H, W)
    assert int(ref.max()) > 20 and torch.equal(got, ref)
