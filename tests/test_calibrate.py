"""CCD calibration (astroprep_torch.calibrate) against numpy / ccdproc and the simulator's truth."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from astropy.io import fits

from astroprep_torch import calibrate as C
from astroprep_torch import sim


# ----------------------------------------------------------------------------------------------
# sections and overscan
# ----------------------------------------------------------------------------------------------
def test_parse_section_converts_fits_one_based_inclusive():
    s = C.parse_section("[1025:1056,1:2048]", (2048, 1056))
    assert s.cols == (1024, 1056) and s.rows == (0, 2048) and s.shape == (2048, 32)
    assert C.format_section(s) == "[1025:1056,1:2048]"
    assert C.parse_section("[*,10:20]", (30, 40)).cols == (0, 40)


@pytest.mark.parametrize("bad", ["1:10,1:10", "[0:10,1:10]", "[1:50,1:10]", "[10:1,1:10]", None])
def test_parse_section_rejects_bad_text(bad):
    with pytest.raises(ValueError, match="section|range|x\\)|y\\)"):
        C.parse_section(bad, (20, 20))


def test_overscan_without_trim_is_refused():
    with pytest.raises(ValueError, match="trim"):
        C.frame_sections({"BIASSEC": "[9:10,1:8]"}, (8, 10))


def test_subtract_overscan_per_row_median():
    g = torch.Generator().manual_seed(0)
    rows = torch.arange(8, dtype=torch.float64)[:, None] * 10
    img = rows + torch.randn(8, 12, generator=g, dtype=torch.float64)
    osec, tsec = C.frame_sections(None, (8, 12), overscan="[9:12,1:8]", trim="[1:8,1:8]")
    out = C.subtract_overscan(img, osec, tsec)
    expect = img.numpy()[:, :8] - np.median(img.numpy()[:, 8:], axis=1, keepdims=True)
    assert out.shape == (8, 8)
    np.testing.assert_allclose(out.numpy(), expect, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# combination
# ----------------------------------------------------------------------------------------------
def test_combine_median_matches_numpy_even_count_and_masks():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 5, 7, generator=g, dtype=torch.float64)
    mask = torch.zeros_like(x, dtype=torch.bool)
    mask[0, 0, 0] = mask[1, 0, 0] = True
    mask[:, 1, 1] = True  # rejected everywhere
    c = C.combine_frames(x, mask, method="median")
    ma = np.ma.masked_array(x.numpy(), mask.numpy())
    expect = np.ma.median(ma, axis=0).filled(0.0)
    np.testing.assert_allclose(c.image.numpy(), expect, atol=1e-12)
    assert bool(c.mask[1, 1]) and int(c.mask.sum()) == 1 and int(c.n_used[0, 0]) == 4


def test_combine_sigma_clipped_mean_rejects_outlier():
    # with n frames one outlier lies at most sqrt(n - 1) std from the mean: 20 frames let a 3-sigma clip see it
    x = torch.ones(20, 4, 4, dtype=torch.float64) + 0.01 * torch.arange(20, dtype=torch.float64)[:, None, None]
    x[3, 2, 2] = 1000.0
    c = C.combine_frames(x, method="mean", sigma_clip=True)
    assert abs(float(c.image[2, 2]) - float(c.image[0, 0])) < 0.01
    assert int(c.n_used[2, 2]) == 19 and float(c.uncertainty[0, 0]) > 0


def test_combine_rejects_bad_arguments():
    with pytest.raises(ValueError, match="stack"):
        C.combine_frames(torch.zeros(4, 4))
    with pytest.raises(ValueError, match="method"):
        C.combine_frames(torch.zeros(3, 4, 4), method="mode")


# ----------------------------------------------------------------------------------------------
# saturation and bleed trails
# ----------------------------------------------------------------------------------------------
def test_saturation_mask_finds_cores_bleed_columns_and_grows():
    img = torch.zeros(1, 1, 40, 20)
    img[0, 0, 18:22, 9] = 100.0  # saturated core
    img[0, 0, 5:18, 9] = 70.0  # bleed above (>= 0.5 level), joined
    img[0, 0, 30, 9] = 70.0  # bright but not joined: not a trail
    m = C.saturation_mask(img, 100.0, grow=0, bleed_axis=0)
    assert bool(m[0, 0, 5:22, 9].all()) and not bool(m[0, 0, 30, 9]) and int(m.sum()) == 17
    g = C.saturation_mask(img, 100.0, grow=1, bleed_axis=0)
    assert bool(g[0, 0, 4, 8]) and bool(g[0, 0, 22, 10]) and not bool(g[0, 0, 24, 9])
    assert not C.saturation_mask(img, None).any() and not C.saturation_mask(img, float("nan")).any()
    two = C.saturation_mask(img.expand(2, 1, 40, 20), torch.tensor([100.0, 0.0]), grow=0)
    assert two[0].any() and not two[1].any()


def test_saturation_mask_module_keeps_mask_and_returns_saturation_alone():
    img = torch.zeros(1, 1, 10, 10)
    img[0, 0, 5, 5] = 10.0
    base = torch.zeros(1, 1, 10, 10, dtype=torch.bool)
    base[0, 0, 0, 0] = True
    out = C.SaturationMask(level=5.0, grow=0)(img, base)
    assert bool(out.mask[0, 0, 0, 0]) and bool(out.mask[0, 0, 5, 5]) and not bool(out.saturated[0, 0, 0, 0])
    off = C.SaturationMask(level=None)(img, base)
    assert torch.equal(off.mask, base) and not off.saturated.any()


def test_header_saturation_reads_levels():
    lv = C.header_saturation([fits.Header({"SATURATE": 5.0}), fits.Header()])
    assert float(lv[0]) == 5.0 and bool(torch.isnan(lv[1]))


# ----------------------------------------------------------------------------------------------
# a simulated night: masters, calibrated frames, bad pixels, header, command
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def raw_night(tmp_path_factory):
    folder = tmp_path_factory.mktemp("raw")
    cam = sim.make_camera((96, 128), overscan=16, hot_fraction=2e-3, seed=3)
    cal = sim.simulate_calibration_frames(cam, n_bias=5, n_dark=4, n_flat=5, seed=4)
    paths = {k: [] for k in ("bias", "dark", "flat")}
    for kind, frames in cal.items():
        for i, fr in enumerate(frames):
            p = folder / f"{kind}{i}.fits"
            sim.write_raw(p, fr)
            paths[kind].append(str(p))
    frame = sim.simulate_frame((96, 128), n_stars=60, mag_range=(9.0, 16.0), saturation=None, seed=5)
    # one star far above full well: a saturated core with a bleed trail
    frame.noiseless[0, 0] += sim.render_stars((96, 128), torch.tensor([60.3]), torch.tensor([50.6]), torch.tensor([3e6]))
    raw = sim.simulate_raw(frame, cam, halo_fraction=0.02, seed=6)
    sim.write_raw(folder / "science.fits", raw)
    paths["science"] = [str(folder / "science.fits")]
    return {"folder": folder, "paths": paths, "camera": cam, "raw": raw}


def test_masters_and_frames_match_ccdproc(raw_night):
    pytest.importorskip("ccdproc", reason="ccdproc (dev extra) is the reference for CCD calibration")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
    from calibrate_ccdproc import compare, ours, peer

    for method, clip in (("median", False), ("mean", True)):
        d = compare(ours(raw_night["paths"], method, clip), peer(raw_night["paths"], method, clip))
        assert max(d.values()) < 1e-5, (method, d)


def test_calibrated_frame_within_noise_of_truth(raw_night, tmp_path):
    from omegaconf import OmegaConf

    p = raw_night["paths"]
    cfg = OmegaConf.create({"bias": p["bias"], "dark": p["dark"], "flat": p["flat"], "input": p["science"],
                            "output": str(tmp_path), "calibrate": {}})
    out = C.calibrate_from_config(cfg)
    img, hdr = fits.getdata(out[0]), fits.getheader(out[0])
    var = fits.getdata(tmp_path / "science.var.fits")
    raw = raw_night["raw"]
    assert img.shape == (96, 128)
    good = np.isfinite(var) & ~raw.saturated[0, 0].numpy()
    chi = ((img - raw.truth[0, 0].numpy()) / np.sqrt(var))[good]
    assert abs(chi.mean()) < 0.1 and 0.9 < chi.std() < 1.15
    # hot pixels of the camera are found from the master dark, filled from their neighbours, variance inf
    hot = raw_night["camera"].hot.numpy()
    assert hot.any() and np.isfinite(img).all() and np.isinf(var[hot]).all()
    assert np.abs(img[hot] - raw.truth[0, 0].numpy()[hot]).max() < 0.5 * raw.truth[0, 0].numpy()[hot].max()
    for key in ("BIASCORR", "DARKCORR", "FLATCORR", "OVERSCAN", "TRIM", "SATURATE"):
        assert key in hdr, key
    assert "BIASSEC" not in hdr and hdr["DATASEC"] == "[1:128,1:96]"
    assert any("flat corrected" in h for h in hdr["HISTORY"])
    # every truly saturated pixel is caught by the calibrated SATURATE level and its bleed rule
    sat = C.saturation_mask(torch.from_numpy(np.nan_to_num(img).astype(np.float32))[None, None], hdr["SATURATE"], grow=0)
    assert raw.saturated.any() and not bool((raw.saturated & ~sat).any())
    for k in ("bias", "dark", "flat"):
        assert (tmp_path / f"master_{k}.fits").is_file()


def test_combine_files_is_the_same_in_small_row_blocks(raw_night):
    files = [C.RawFile(p) for p in raw_night["paths"]["bias"]]
    big = C.combine_files(files, memory_mb=512)
    small = C.combine_files(files, memory_mb=0.01)  # one row at a time
    assert torch.equal(big.image, small.image)


def test_combine_files_float32_matches_float64_and_closes_files(raw_night, tmp_path):
    from astropy.io import fits as afits

    files = [C.RawFile(p) for p in raw_night["paths"]["flat"]]
    f32 = C.combine_files(files, sigma_clip=True, method="mean", memory_mb=0.05)
    assert f32.image.dtype == torch.float32 and all(f._hdul is None and f._fh is None for f in files)  # closed after the combination
    f64 = C.combine_files(files, sigma_clip=True, method="mean", dtype=torch.float64)
    rel = ((f32.image.double() - f64.image).abs().max() / f64.image.abs().max()).item()
    assert 0 < rel < 1e-6 or rel == 0.0
    # uint16 on disk (int16 + BZERO) is read exactly in float32; a BLANK value becomes NaN
    data = np.array([[0, 1, 65535], [40000, 2, 3]], dtype=np.uint16)
    path = tmp_path / "u16.fits"
    afits.PrimaryHDU(data).writeto(path)
    f = C.RawFile(path)
    out = f.read()
    assert out.dtype == np.float32 and np.array_equal(out, data.astype(np.float32))
    f.close()
    hdu = afits.PrimaryHDU(np.array([[5, -7], [9, 3]], dtype=np.int32))
    hdu.header["BLANK"] = -7
    hdu.writeto(tmp_path / "blank.fits")
    got = C.RawFile(tmp_path / "blank.fits").read()
    assert got.dtype == np.float64 and np.isnan(got[0, 1]) and got[1, 0] == 9


def test_ccd_calibration_module_batches_frames(raw_night):
    p = raw_night["paths"]
    bias = C.master_bias(p["bias"])
    flat = C.master_flat(p["flat"], bias)
    raw = torch.from_numpy(fits.getdata(p["science"][0]).astype(np.float32))[None, None].repeat(2, 1, 1, 1)
    cal = C.CCDCalibration(bias, None, flat, overscan="[129:144,1:96]", trim="[1:128,1:96]", gain=1.5, read_noise=10.0)
    res = cal(raw, exptime=18.0, saturation=60000.0)
    assert res.image.shape == (2, 1, 96, 128) and torch.equal(res.image[0], res.image[1])
    assert res.variance.min() > 0 and res.saturated.any()


def test_dark_needs_exposure_times(raw_night):
    bias = C.master_bias(raw_night["paths"]["bias"])
    dark = C.master_dark(raw_night["paths"]["dark"], bias)
    with pytest.raises(ValueError, match="exptime"):
        C.calibrate_frames(torch.zeros(1, 1, 96, 128), bias=bias, dark=dark)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        C.master_bias([str(tmp_path / "nope.fits")])


def test_cli_calibrate(raw_night, tmp_path):
    from astroprep_torch.cli import main

    p, folder = raw_night["paths"], raw_night["folder"]
    rc = main(["calibrate", f"bias={folder}/bias*.fits", f"flat={folder}/flat*.fits",
               f"input={p['science'][0]}", f"output={tmp_path}", "calibrate.write_variance=false"])
    assert rc == 0 and (tmp_path / "science.cal.fits").is_file() and not (tmp_path / "science.var.fits").exists()
    hdr = fits.getheader(tmp_path / "science.cal.fits")
    assert "FLATCORR" in hdr and "DARKCORR" not in hdr


def test_grow_union_spreads_only_the_second_mask():
    a = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    a[0, 0, 0, 0] = True
    b = torch.zeros(1, 1, 12, 12, dtype=torch.bool)
    b[0, 0, 6, 6] = True
    out = C.GrowUnion(radius=2)(a, b)
    assert bool(out[0, 0, 0, 0]) and not bool(out[0, 0, 1, 1])  # a is not grown
    assert int(out[0, 0, 4:9, 4:9].sum()) == 25 and int(out.sum()) == 26
    assert torch.equal(C.GrowUnion(2)(a, None), a)


def test_fill_bad_pixels_uses_good_neighbours_only():
    img = torch.arange(49.0).reshape(1, 1, 7, 7)
    bad = torch.zeros(1, 1, 7, 7, dtype=torch.bool)
    bad[0, 0, 3, 3] = True
    img[0, 0, 3, 3] = 1e6
    out = C.fill_bad_pixels(img, bad, size=3)
    assert float(out[0, 0, 3, 3]) == pytest.approx(24.0) and torch.equal(out[~bad], img[~bad])


@pytest.mark.parametrize("shape", [(1, 1, 37, 53), (2, 1, 5, 3), (1, 1, 1, 9)])
def test_grow_mask_is_a_square_dilation(shape):
    """grow_mask (separable running counts) equals the brute-force square dilation at every radius."""
    g = torch.Generator().manual_seed(1)
    m = torch.rand(shape, generator=g) > 0.9
    m.view(-1)[0] = True
    H, W = shape[-2:]
    for r in (0, 1, 3, 10, 60):
        ref = torch.zeros_like(m)
        for y in range(H):
            for x in range(W):
                ref[..., y, x] = m[..., max(0, y - r):y + r + 1, max(0, x - r):x + r + 1].flatten(-2).any(-1)
        assert torch.equal(C.grow_mask(m, r), ref), r
