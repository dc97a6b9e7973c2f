"""Co-addition: combine types, weights, exposure, masks, chunking, files, bad input, gradients."""

import math

import numpy as np
import pytest
import torch

from astroprep_torch import stack as S
from astroprep_torch.io import write_fits
from astroprep_torch.sim import make_header, simulate_dithers
from astroprep_torch.wcs import TanWCS

pytestmark = pytest.mark.filterwarnings("ignore::astropy.wcs.FITSFixedWarning",
                                        "ignore::astropy.io.fits.verify.VerifyWarning")


@pytest.fixture(scope="module")
def frames():
    return simulate_dithers(5, (96, 96), n_stars=60, dither=4.0, noise=10.0, cosmic_rays=30, mover_speed=6.0, seed=1)


def batch(frames):
    return torch.cat([f.image for f in frames]), TanWCS.stack([TanWCS.from_header(f.header) for f in frames])


def target_of(frames):
    return TanWCS.from_header(frames[0].header), (96, 96)


@pytest.mark.parametrize("combine", S.COMBINES)
def test_combines_recover_the_sky(frames, combine):
    images, wcs = batch(frames)
    tw, shape = target_of(frames)
    r = S.stack(images, wcs, tw, shape, combine=combine)
    truth = frames[0].noiseless[0, 0]
    full = r.count[0, 0] == 5
    assert full.float().mean() > 0.7
    diff = (r.image[0, 0] - truth)[full]
    sky = (truth < 1005)[full]  # flat sky: interpolation error negligible
    expected = 10.0 / math.sqrt(5) * (1.25 if combine == "median" else 1.0)
    d = diff[sky]
    assert float(1.4826 * (d - d.median()).abs().median()) < 1.15 * expected  # robust: the mean keeps cosmic rays
    assert torch.isnan(r.image[0, 0][r.count[0, 0] == 0]).all()
    assert float(r.exposure[0, 0][full].min()) == 5.0


def test_median_and_clipped_remove_cosmic_rays_and_movers(frames):
    images, wcs = batch(frames)
    tw, shape = target_of(frames)
    static = simulate_dithers(5, (96, 96), n_stars=60, dither=4.0, noise=10.0, cosmic_rays=30, seed=1)
    truth = static[0].noiseless[0, 0]  # same draws, without the mover
    cr = frames[0].defect_mask[0, 0]
    mover = torch.zeros_like(cr)
    mover[45:52, 26:32] = True  # the mover's place in frame 0 (x = 0.3 * 96, y = 48)
    assert float((frames[0].noiseless[0, 0] - truth)[mover].max()) > 1000
    mean = S.stack(images, wcs, tw, shape, combine="mean")
    full = (mean.count[0, 0] == 5) & (truth < 1020)  # on the sky: no resampling error of star cores
    for combine in ("median", "clipped"):
        r = S.stack(images, wcs, tw, shape, combine=combine)
        for where in (cr, mover):
            d = (r.image[0, 0] - truth)[where & full].abs()
            assert d.numel() > 5 and float(d.max()) < 40.0, combine
        kept = r.count[0, 0][cr & full]  # the clipped mean drops the cosmic ray, the median counts all
        assert int(kept.max()) == 4 if combine == "clipped" else int(kept.min()) == 5
    assert float((mean.image[0, 0] - truth)[cr & (mean.count[0, 0] == 5) & (truth < 1020)].abs().max()) > 100.0


def test_chunking_is_exact(frames):
    images, wcs = batch(frames)
    tw, shape = target_of(frames)
    a = S.stack(images, wcs, tw, shape, combine="weighted", chunk_rows=7, grid_step=None)
    b = S.stack(images, wcs, tw, shape, combine="weighted", chunk_rows=None, grid_step=None)
    assert torch.allclose(a.image.nan_to_num(), b.image.nan_to_num(), atol=1e-3)
    assert torch.equal(a.count, b.count)


def test_weights_and_masks():
    hdr = make_header((32, 32), pixel_scale=1.0)
    g = torch.Generator().manual_seed(0)
    sig = torch.tensor([1.0, 2.0, 4.0])
    images = 100 + sig.reshape(3, 1, 1, 1) * torch.randn(3, 1, 32, 32, generator=g, dtype=torch.float64)
    wcs = TanWCS.from_header([hdr] * 3)
    tw = TanWCS.from_header(hdr)
    masks = torch.zeros_like(images, dtype=torch.bool)
    masks[1, 0, 10:20, 10:20] = True
    images[1, 0, 10:20, 10:20] = 1e9  # garbage under the mask
    r = S.stack(images, wcs, tw, (32, 32), masks=masks, weights=(1 / sig ** 2).tolist(), combine="weighted")
    assert float(r.image[0, 0].nan_to_num().max()) < 200
    assert torch.allclose(r.weight[0, 0, 0, 0], torch.tensor(1 + 1 / 4 + 1 / 16, dtype=torch.float64))
    assert int(r.count[0, 0, 15, 15]) == 2 and int(r.count[0, 0, 0, 0]) == 3
    wmaps = (1 / sig ** 2).reshape(3, 1, 1, 1).expand(3, 1, 32, 32).clone()
    r2 = S.stack(images, wcs, tw, (32, 32), masks=masks, weights=wmaps, combine="weighted")
    inner = (slice(2, 30), slice(2, 30))
    assert torch.allclose(r.image[0, 0][inner], r2.image[0, 0][inner], atol=1e-9)
    m = S.stack(images, wcs, tw, (32, 32), masks=masks, weights=(1 / sig ** 2).tolist(), combine="mean")
    assert float(m.weight[0, 0, 0, 0]) == pytest.approx(9 / (1 + 4 + 16))


def test_background_and_flux_scale_matching():
    hdr = make_header((24, 24), pixel_scale=1.0)
    base = torch.rand(1, 1, 24, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 50
    images = torch.cat([base + 100, 2 * base + 300])
    wcs = TanWCS.from_header([hdr] * 2)
    r = S.stack(images, wcs, TanWCS.from_header(hdr), (24, 24), combine="mean", background=[100.0, 300.0],
                flux_scale=[1.0, 0.5], weights=[1.0, 1.0])
    assert torch.allclose(r.image[0, 0, 2:-2, 2:-2], base[0, 0, 2:-2, 2:-2], atol=1e-9)


def test_gradcheck_mean_over_images():
    hdr = make_header((6, 6), pixel_scale=1.0)
    hdr2 = make_header((6, 6), pixel_scale=1.0, crpix_offset=(0.3, -0.4))
    wcs = TanWCS.from_header([hdr, hdr2])
    x = torch.rand(2, 1, 6, 6, dtype=torch.float64, requires_grad=True)
    f = lambda im: S.stack(im, wcs, TanWCS.from_header(hdr), (6, 6), combine="weighted", weights=[1.0, 2.0],
                           grid_step=None).image.nan_to_num()
    assert torch.autograd.gradcheck(f, (x,), eps=1e-6, atol=1e-6)


def test_files_reference_head_and_cli(frames, tmp_path):
    paths = []
    for i, f in enumerate(frames[:3]):
        paths.append(write_fits(tmp_path / f"f{i}.fits", f.image, header=f.header))
    head = tmp_path / "grid.head"
    grid = make_header((80, 90), pixel_scale=1.0)
    head.write_text("\n".join(str(c) for c in grid.cards) + "\nEND\n")
    res, tw = S.stack_files(paths, reference=head, combine="median", chunk_rows=13)
    assert res.image.shape == (1, 1, 80, 90)
    images, wcs = batch(frames[:3])
    ref = S.stack(images, wcs, TanWCS.from_header(grid), (80, 90), combine="median")
    assert torch.allclose(res.image.nan_to_num(), ref.image.nan_to_num().float(), atol=0.05)
    from astroprep_torch import cli

    out = tmp_path / "out"
    assert cli.main(["stack", f"input={tmp_path}/f*.fits", f"output={out}", "combine=weighted",
                     f"reference={head}"]) == 0
    from astropy.io import fits

    for name in ("coadd.fits", "coadd.weight.fits", "coadd.exposure.fits"):
        with fits.open(out / name) as hl:
            assert hl[0].data.shape == (80, 90) and hl[0].header["CTYPE1"] == "RA---TAN"
    with fits.open(out / "coadd.exposure.fits") as hl:
        assert hl[0].data.max() == 3.0


# -- bad input ----------------------------------------------------------------------------------
def test_frames_of_different_fields(frames):
    images, _ = batch(frames[:3])
    far = frames[2].header.copy()
    far["CRVAL1"] += 2.0
    wcs = TanWCS.from_header([frames[0].header, frames[1].header, far])
    with pytest.raises(S.StackError, match=r"different fields.*\[frame 0, frame 1\].*\[frame 2\]"):
        S.stack(images, wcs)


def test_frames_off_the_reference_grid(frames):
    images, wcs = batch(frames[:2])
    grid = make_header((50, 50), ra=160.0, pixel_scale=1.0)
    with pytest.raises(S.StackError, match="2 of 2 frames do not overlap the output grid"):
        S.stack(images, wcs, TanWCS.from_header(grid), (50, 50), names=["a.fits", "b.fits"])


def test_bad_arguments(frames):
    images, wcs = batch(frames[:2])
    with pytest.raises(ValueError, match="combine must be one of"):
        S.stack(images, wcs, combine="sum")
    with pytest.raises(ValueError, match="wcs holds 2 WCS for 1 images"):
        S.stack(images[:1], wcs)
    with pytest.raises(ValueError, match="images must be a"):
        S.stack(images[:, 0], wcs)


def test_head_file_beside_a_frame_overrides_its_wcs(frames, tmp_path):
    grid = tmp_path / "grid.head"
    grid.write_text("\n".join(str(c) for c in frames[0].header.cards) + "\nEND\n")
    good, _ = S.stack_files([write_fits(tmp_path / "a.fits", frames[1].image, header=frames[1].header)],
                            reference=grid, combine="mean", weights=None, grid_step=None)
    wrong = frames[1].header.copy()
    wrong["CRVAL1"] += 5 / 3600  # 5 px off; the .head (as astroprep astrometry writes it) fixes it
    p = write_fits(tmp_path / "b.fits", frames[1].image, header=wrong)
    from astroprep_torch.astrometry import write_head

    write_head(tmp_path / "b.head", frames[1].header)
    fixed, _ = S.stack_files([p], reference=grid, combine="mean", grid_step=None)
    assert torch.allclose(fixed.image.nan_to_num(), good.image.nan_to_num())
    ignored, _ = S.stack_files([p], reference=grid, combine="mean", grid_step=None, header_suffix=None)
    assert not torch.allclose(ignored.image.nan_to_num(), good.image.nan_to_num())


def test_band_shapes_on_the_mapping_grid(frames):
    # output bands of 17 rows and a width of 97 (both 1 + a multiple of the 16-px mapping grid)
    images, wcs = batch(frames[:2])
    tw = TanWCS.from_header(frames[0].header)
    r = S.stack(images, wcs, tw, (85, 97), combine="mean", chunk_rows=17, grid_step=16)
    e = S.stack(images, wcs, tw, (85, 97), combine="mean", chunk_rows=17, grid_step=None)
    assert torch.allclose(r.image.nan_to_num(), e.image.nan_to_num(), atol=1e-2)


def test_module_matches_function(frames):
    images, wcs = batch(frames[:3])
    tw, shape = target_of(frames)
    mod = S.Stack(combine="clipped", clip_sigma=4.0)
    assert "clipped" in repr(mod)
    a = mod(images, wcs, tw, shape)
    b = S.stack(images, wcs, tw, shape, combine="clipped", clip_sigma=4.0)
    assert torch.equal(a.image.nan_to_num(), b.image.nan_to_num()) and torch.equal(a.count, b.count)


@pytest.mark.parametrize("combine", ["median", "weighted"])
def test_parity_with_swarp(tmp_path, combine):
    import shutil
    import subprocess

    exe = shutil.which("SWarp") or shutil.which("swarp")
    if exe is None:
        pytest.skip("SWarp (Debian swarp) is not installed")
    from astropy.io import fits

    fr = simulate_dithers(5, (128, 128), n_stars=40, dither=5.0, noise=10.0, seed=7, dtype=torch.float64)
    paths, wpaths = [], []
    for i, f in enumerate(fr):
        sig = 10.0 + 2 * i
        img = f.image[0, 0].numpy() + np.random.default_rng(i).normal(0, 1, (128, 128)) * math.sqrt(sig ** 2 - 100)
        fits.PrimaryHDU(img.astype(np.float32), header=f.header).writeto(tmp_path / f"f{i}.fits")
        fits.PrimaryHDU(np.full((128, 128), 1 / sig ** 2, np.float32), header=f.header).writeto(
            tmp_path / f"f{i}.weight.fits")
        paths.append(tmp_path / f"f{i}.fits")
        wpaths.append(tmp_path / f"f{i}.weight.fits")
    (tmp_path / "sw.head").write_text("\n".join(str(c) for c in fr[0].header.cards) + "\nEND\n")
    subprocess.run([exe, *map(str, paths), "-c", "/dev/null", "-IMAGEOUT_NAME", "sw.fits", "-WEIGHTOUT_NAME",
                    "sw.weight.fits", "-RESAMPLING_TYPE", "BILINEAR", "-SUBTRACT_BACK", "N", "-COMBINE_TYPE",
                    combine.upper(), "-FSCALASTRO_TYPE", "NONE", "-HEADER_SUFFIX", ".head", "-WEIGHT_TYPE",
                    "MAP_WEIGHT", "-WEIGHT_SUFFIX", ".weight.fits", "-RESCALE_WEIGHTS", "N", "-OVERSAMPLING", "1",
                    "-RESAMPLE_DIR", str(tmp_path), "-VERBOSE_TYPE", "QUIET", "-WRITE_XML", "N"],
                   cwd=tmp_path, check=True, capture_output=True)
    sw = fits.getdata(tmp_path / "sw.fits").astype(np.float64)
    ours, _ = S.stack_files(paths, reference=tmp_path / "sw.head", weights=wpaths, combine=combine)
    full = (ours.count[0, 0].numpy() == 5)
    full[:8], full[-8:], full[:, :8], full[:, -8:] = False, False, False, False
    d = np.abs(ours.image[0, 0].double().numpy() - sw)[full]
    assert full.sum() > 5000 and np.median(d) < 1e-3 * 10.0 / math.sqrt(5)


# -- per-frame matching: automatic flux scale, 2-D background ---------------------------------------
TRANSPARENCY = [1.0, 0.7, 1.2, 0.85]


@pytest.fixture(scope="module")
def hazy():
    """Four dithered 256^2 frames of one field with known transparencies (star flux x t_i), sky 1000."""
    fr = simulate_dithers(4, (256, 256), n_stars=300, dither=5.0, noise=10.0, seed=1, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    images = torch.cat([(f.noiseless - 1000) * t + 1000 + 10 * torch.randn(f.noiseless.shape, generator=g,
                                                                          dtype=torch.float64)
                        for f, t in zip(fr, TRANSPARENCY)])
    return fr, images, TanWCS.stack([TanWCS.from_header(f.header) for f in fr])


def test_auto_flux_scale_recovers_transparency(hazy):
    fr, images, wcs = hazy
    tw = TanWCS.from_header(fr[0].header)
    r = S.stack(images, wcs, tw, (256, 256), combine="mean", flux_scale="auto", background="2d")
    truth = torch.tensor([1 / t for t in TRANSPARENCY], dtype=torch.float64)
    assert ((r.flux_scale - truth).abs() / truth).max() < 0.01
    matched = S.match_flux_scales(images, wcs)
    assert [m.scale for m in matched] == r.flux_scale.tolist() and min(m.n_stars for m in matched) >= 20
    assert matched[0] == S.FrameMatch(1.0, matched[0].n_stars, 0.0)
    plain = S.stack(images, wcs, tw, (256, 256), combine="mean", background="2d")
    assert torch.equal(plain.flux_scale, torch.ones(4, dtype=torch.float64))
    # the co-add's stars carry frame 0's flux scale: as bright as a co-add of frames without haze
    clear = S.stack(torch.cat([f.image for f in fr]), wcs, tw, (256, 256), combine="mean", background="2d")
    full = (r.count[0, 0] == 4) & (fr[0].noiseless[0, 0] > 1500)
    ratio = float(r.image[0, 0][full].sum() / clear.image[0, 0][full].sum())
    ratio_plain = float(plain.image[0, 0][full].sum() / clear.image[0, 0][full].sum())
    assert abs(ratio - 1) < 0.01 and abs(ratio_plain - sum(TRANSPARENCY) / 4) < 0.01


def test_auto_flux_scale_files_header_and_cli(hazy, tmp_path):
    fr, images, _ = hazy
    paths = [write_fits(tmp_path / f"h{i}.fits", images[i:i + 1].float(), header=f.header) for i, f in enumerate(fr)]
    from astropy.io import fits

    from astroprep_torch import cli

    out = tmp_path / "out"
    assert cli.main(["stack", f"input={tmp_path}/h*.fits", f"output={out}", "combine=median",
                     "stack.flux_scale=auto", "stack.background=match"]) == 0
    h = fits.getheader(out / "coadd.fits")
    got = [h[f"FLXSC{i + 1:03d}"] for i in range(4)]
    assert np.allclose(got, [1 / t for t in TRANSPARENCY], rtol=0.01)
    assert h["FLXSCTYP"] == "auto" and h["BACKMTCH"] == "match"
    # with FLXSCALE in the headers, flux_scale=header applies the same factors
    for p, v in zip(paths, got):
        fits.setval(p, "FLXSCALE", value=v)
    a, _ = S.stack_files(paths, combine="median", flux_scale="header", background="match")
    b, _ = S.stack_files(paths, combine="median", flux_scale="auto", background="match")
    assert torch.allclose(a.flux_scale, b.flux_scale, rtol=1e-6)
    assert torch.allclose(a.image.nan_to_num(), b.image.nan_to_num(), atol=1e-3)


def test_auto_flux_scale_needs_common_stars(hazy):
    fr, images, wcs = hazy
    blank = images.clone()
    blank[2] = 1000 + 10 * torch.randn(blank[2].shape, generator=torch.Generator().manual_seed(9), dtype=blank.dtype)
    with pytest.raises(S.StackError, match="flux_scale=auto: frame 2 has 0 usable stars in common with frame 0"):
        S.stack(blank, wcs, combine="mean", flux_scale="auto")
    with pytest.raises(S.StackError, match=r"frame 0 \(the flux reference\) has 0 bright isolated"):
        S.stack(blank[[2, 1, 0, 3]], wcs, combine="mean", flux_scale="auto")
    with pytest.raises(ValueError, match="flux_scale must be one of"):
        S.stack(images, wcs, flux_scale="guess")
    with pytest.raises(ValueError, match="background must be one of"):
        S.stack(images, wcs, background="plane")


def sky_frames():
    """Four frames with sky levels 800-1400 ADU and tilted planes of 60-150 ADU across the frame."""
    fr = simulate_dithers(4, (192, 192), n_stars=80, dither=4.0, noise=10.0, seed=3, dtype=torch.float64)
    yy, xx = torch.meshgrid(torch.arange(192.0, dtype=torch.float64), torch.arange(192.0, dtype=torch.float64),
                            indexing="ij")
    levels, tilts = [800.0, 1400.0, 1000.0, 1200.0], [(60, 0), (0, -100), (-80, 80), (150, 40)]
    images = torch.cat([f.image + (lv - 1000) + (tx * xx + ty * yy) / 191
                        for f, lv, (tx, ty) in zip(fr, levels, tilts)])
    return fr, images, TanWCS.stack([TanWCS.from_header(f.header) for f in fr]), levels


def _block_medians(img, keep, block=32):
    h, w = img.shape
    out = []
    for y in range(0, h - block + 1, block):
        for x in range(0, w - block + 1, block):
            v = img[y:y + block, x:x + block][keep[y:y + block, x:x + block]]
            if v.numel() > block * block // 2:
                out.append(float(v.median()))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["2d", "match"])
def test_background_matching_flattens_the_coadd(mode):
    fr, images, wcs, levels = sky_frames()
    tw = TanWCS.from_header(fr[0].header)
    stars = fr[0].noiseless[0, 0] - 1000
    r = S.stack(images, wcs, tw, (192, 192), combine="mean", background=mode, background_box=32)
    raw = S.stack(images, wcs, tw, (192, 192), combine="mean")
    keep = (r.count[0, 0] == 4) & (stars < 1.0)
    sigma_c = 10.0 / 2  # noise of the mean of 4 frames
    flat = _block_medians(r.image[0, 0], keep)
    assert float(flat.std()) < 0.2 * sigma_c and float((flat - flat.median()).abs().max()) < 0.5 * sigma_c
    assert float(_block_medians(raw.image[0, 0], keep).std()) > sigma_c  # the mean of the tilts
    level = levels[0] + 60 / 2 if mode == "match" else 0.0  # frame 0's median sky: its level + half its tilt
    assert abs(float(flat.median()) - level) < 0.3 * sigma_c


def test_background_rows_equal_background_2d():
    from astroprep_torch.background import background_2d

    img = 1000 + 10 * torch.randn(1, 1, 150, 170, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    img = img + torch.linspace(0, 50, 170, dtype=torch.float64)
    bad = torch.zeros_like(img, dtype=torch.bool)
    bmap, full, _ = S._measure_background(img, bad, 32, {})
    assert torch.allclose(bmap.rows(0, 150, 0, 170), full, atol=1e-6)
    assert torch.allclose(bmap.rows(17, 60, 33, 101), background_2d(img, bad, box_size=32, method="sextractor").background[..., 17:60, 33:101],
                          atol=1e-6)


# -- bad input: files ---------------------------------------------------------------------------------
def test_file_errors_name_the_file(frames, tmp_path):
    from astropy.io import fits

    good = write_fits(tmp_path / "good.fits", frames[0].image, header=frames[0].header)
    fits.PrimaryHDU(frames[1].image[0, 0].numpy()).writeto(tmp_path / "nowcs.fits")
    with pytest.raises(ValueError, match=r"nowcs\.fits: cannot stack without a supported WCS"):
        S.stack_files([good, tmp_path / "nowcs.fits"])
    with pytest.raises(FileNotFoundError, match=r"input frame\(s\) not found: .*missing\.fits"):
        S.stack_files([good, tmp_path / "missing.fits"])
    fits.PrimaryHDU(np.ones((50, 60), np.float32)).writeto(tmp_path / "w.fits")
    with pytest.raises(ValueError, match=r"weight map .*w\.fits shape \(50, 60\) != .*good\.fits shape \(96, 96\)"):
        S.stack_files([good], weights=[tmp_path / "w.fits"])
    far = frames[1].header.copy()
    far["CRVAL1"] += 2.0
    other = write_fits(tmp_path / "elsewhere.fits", frames[1].image, header=far)
    with pytest.raises(S.StackError, match=r"different fields.*\[good\.fits\].*\[elsewhere\.fits\]"):
        S.stack_files([good, other])


def test_files_of_different_shapes_stack_by_their_wcs(frames, tmp_path):
    from astropy.io import fits

    big = write_fits(tmp_path / "big.fits", frames[0].image, header=frames[0].header)
    h = frames[0].header.copy()  # the same sky: a 60x70 cut of frame 0 from pixel (10, 20)
    h["CRPIX1"] -= 10
    h["CRPIX2"] -= 20
    fits.PrimaryHDU(frames[0].image[0, 0, 20:80, 10:80].numpy(), header=h).writeto(tmp_path / "cut.fits")
    r, _ = S.stack_files([big, tmp_path / "cut.fits"], reference=big, combine="mean", grid_step=None)
    inner = r.count[0, 0] == 2
    assert int(inner.sum()) > 3000
    assert torch.allclose(r.image[0, 0][inner], frames[0].image[0, 0][inner].float(), atol=1e-3)
