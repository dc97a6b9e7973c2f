"""FITS reading/writing: dtypes, scaling, BLANK, byte order, compression, HDU choice, errors, atomic writes."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import torch

from conftest import shared_file

from astropy.io import fits  # noqa: E402
from astropy.wcs import WCS  # noqa: E402

from astroprep_torch.io import FitsImage, read_fits, read_fits_batch, write_fits  # noqa: E402
from astroprep_torch.wcs import TanWCS  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::astropy.wcs.FITSFixedWarning",
                                        "ignore::astropy.io.fits.verify.VerifyWarning")

TAN = dict(CTYPE1="RA---TAN", CTYPE2="DEC--TAN", CRVAL1=150.0, CRVAL2=2.0, CRPIX1=16.5, CRPIX2=12.5,
           CD1_1=-1e-4, CD1_2=0.0, CD2_1=0.0, CD2_2=1e-4)


def test_read_int16_dss_with_wcs(device):
    path = shared_file("astropy_images", "m13.fits")
    img = read_fits(path, device=device)
    assert isinstance(img, FitsImage)
    ref = fits.getdata(path).astype(np.float64)
    assert img.data.shape == (1, 1, 300, 300) and img.data.dtype == torch.float32
    assert img.data.device.type == torch.device(device).type
    assert np.array_equal(img.data[0, 0].cpu().numpy(), ref)
    assert img.mask.dtype == torch.bool and not img.mask.any()
    assert img.header["NAXIS1"] == 300 and isinstance(img.wcs, TanWCS)
    ra, dec = img.wcs.pixel_to_world(torch.tensor([10.0, 250.0], dtype=torch.float64, device=device),
                                     torch.tensor([20.0, 280.0], dtype=torch.float64, device=device))
    ra_t, dec_t = WCS(img.header).all_pix2world([10.0, 250.0], [20.0, 280.0], 0)
    assert np.allclose(ra.cpu().numpy(), ra_t, atol=1e-10, rtol=0)


def test_read_tile_compressed_equals_plain():
    plain = read_fits(shared_file("astropy_images", "m13.fits"), dtype=torch.float64)
    rice = read_fits(shared_file("astropy_images", "m13_rice.fits"), dtype=torch.float64)  # HDU 1 picked
    assert rice.data.dtype == torch.float64
    assert torch.equal(plain.data, rice.data)
    assert rice.wcs is not None


def test_int_scaling_blank_and_uint16(tmp_path):
    # uint16 (stored as int16 + BZERO 32768 by astropy), values above 32767
    u = (np.arange(48 * 40).reshape(40, 48) * 30).astype(np.uint16)
    fits.PrimaryHDU(u).writeto(tmp_path / "u16.fits")
    assert fits.getheader(tmp_path / "u16.fits")["BZERO"] == 32768
    img = read_fits(tmp_path / "u16.fits", dtype=torch.float64)
    assert np.array_equal(img.data[0, 0].numpy(), u.astype(np.float64)) and not img.mask.any()
    # int16 with BSCALE/BZERO and BLANK: blank pixels masked, others scaled
    raw = np.arange(40 * 48, dtype=np.int16).reshape(40, 48) - 500
    raw[3, 4] = -32768
    hdu = fits.PrimaryHDU(raw)
    hdu.header["BSCALE"], hdu.header["BZERO"], hdu.header["BLANK"] = 0.5, 100.0, -32768
    hdu.writeto(tmp_path / "scaled.fits")
    img = read_fits(tmp_path / "scaled.fits", dtype=torch.float64)
    assert img.mask[0, 0, 3, 4] and int(img.mask.sum()) == 1
    good = ~img.mask[0, 0].numpy()
    assert np.array_equal(img.data[0, 0].numpy()[good], (raw * 0.5 + 100.0)[good])
    # compressed int16 with BLANK
    c = fits.CompImageHDU(raw.copy())
    c.header["BLANK"] = -32768
    fits.HDUList([fits.PrimaryHDU(), c]).writeto(tmp_path / "comp.fits")
    img = read_fits(tmp_path / "comp.fits")
    assert img.mask[0, 0, 3, 4] and int(img.mask.sum()) == 1


def test_big_endian_float_nan_inf(tmp_path):
    a = np.linspace(-1, 1, 30 * 20).reshape(20, 30).astype(">f8")
    a[0, 0], a[5, 7] = np.nan, np.inf
    hdr = fits.Header(TAN)
    fits.PrimaryHDU(a, header=hdr).writeto(tmp_path / "be.fits")
    img = read_fits(tmp_path / "be.fits", dtype=torch.float64)
    assert img.data.dtype == torch.float64
    assert img.mask[0, 0, 0, 0] and img.mask[0, 0, 5, 7] and int(img.mask.sum()) == 2
    ok = np.isfinite(a)
    assert np.array_equal(img.data[0, 0].numpy()[ok], a.astype("=f8")[ok])
    f32 = read_fits(tmp_path / "be.fits")
    assert f32.data.dtype == torch.float32 and f32.mask.sum() == 2


def test_hdu_selection_and_errors(tmp_path):
    img = np.ones((8, 9), np.float32)
    table = fits.BinTableHDU.from_columns([fits.Column(name="a", format="E", array=np.arange(3.0))])
    fits.HDUList([fits.PrimaryHDU(), table, fits.ImageHDU(img * 2, name="SCI"), fits.ImageHDU(img * 3, name="ERR")]
                 ).writeto(tmp_path / "multi.fits")
    assert read_fits(tmp_path / "multi.fits").data[0, 0, 0, 0] == 2  # first image HDU
    assert read_fits(tmp_path / "multi.fits", hdu="ERR").data[0, 0, 0, 0] == 3
    assert read_fits(tmp_path / "multi.fits", hdu=3).data[0, 0, 0, 0] == 3
    with pytest.raises(ValueError, match=r"multi\.fits.*HDU 'NOPE' not found"):
        read_fits(tmp_path / "multi.fits", hdu="NOPE")
    with pytest.raises(ValueError, match=r"multi\.fits: HDU 1 .*no image"):
        read_fits(tmp_path / "multi.fits", hdu=1)
    fits.HDUList([fits.PrimaryHDU(), table]).writeto(tmp_path / "table.fits")
    with pytest.raises(ValueError, match=r"table\.fits: no HDU with image data"):
        read_fits(tmp_path / "table.fits")
    # a cube with a length-1 axis is squeezed (with a warning); a real cube is refused
    fits.PrimaryHDU(img[None]).writeto(tmp_path / "cube1.fits")
    with pytest.warns(UserWarning, match="squeezed"):
        assert read_fits(tmp_path / "cube1.fits").data.shape == (1, 1, 8, 9)
    fits.PrimaryHDU(np.ones((3, 8, 9), np.float32)).writeto(tmp_path / "cube3.fits")
    with pytest.raises(ValueError, match=r"cube3\.fits.*not 2-D"):
        read_fits(tmp_path / "cube3.fits")
    with pytest.raises(ValueError, match=r"cube3\.fits: HDU 0 .*not 2-D"):
        read_fits(tmp_path / "cube3.fits", hdu=0)


def test_missing_truncated_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.fits"):
        read_fits(tmp_path / "nothere.fits")
    fits.PrimaryHDU(np.arange(100 * 120, dtype=np.float32).reshape(100, 120)).writeto(tmp_path / "full.fits")
    data = (tmp_path / "full.fits").read_bytes()
    (tmp_path / "trunc.fits").write_bytes(data[: 2880 + 5000])
    (tmp_path / "trunc_header.fits").write_bytes(data[:1000])
    (tmp_path / "garbage.fits").write_bytes(b"this is not a FITS file " * 200)
    (tmp_path / "empty.fits").write_bytes(b"")
    for name in ("trunc.fits", "trunc_header.fits", "garbage.fits", "empty.fits"):
        with pytest.raises(OSError, match=name.replace(".", r"\.")):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                read_fits(tmp_path / name)
    with pytest.raises(OSError, match="truncated"):
        read_fits(tmp_path / "trunc.fits")


def test_unsupported_wcs_reads_image_with_warning(tmp_path):
    hdr = fits.Header(dict(TAN, CTYPE1="RA---SIN", CTYPE2="DEC--SIN"))
    fits.PrimaryHDU(np.zeros((10, 12), np.float32), header=hdr).writeto(tmp_path / "sin.fits")
    with pytest.warns(UserWarning, match=r"sin\.fits.*SIN"):
        img = read_fits(tmp_path / "sin.fits")
    assert img.wcs is None and img.data.shape == (1, 1, 10, 12)
    fits.PrimaryHDU(np.zeros((10, 12), np.float32)).writeto(tmp_path / "nowcs.fits")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert read_fits(tmp_path / "nowcs.fits").wcs is None


def test_write_round_trip_with_wcs(tmp_path):
    src = shared_file("sfft_decam_decorr", "input_data__DEC-OBS04a.mini.fits")
    img = read_fits(src, dtype=torch.float64)
    out = tmp_path / "out.fits"
    write_fits(out, img.data, header=img.header, wcs=img.wcs)
    back = read_fits(out, dtype=torch.float64)
    assert torch.equal(back.data, img.data)
    assert back.header["CRPIX1"] == pytest.approx(img.header["CRPIX1"], abs=1e-12)  # 1-based in the file
    x = np.array([0.0, 128.0, 255.0])
    ra_t, dec_t = WCS(img.header).all_pix2world(x, x, 0)
    ra_w, dec_w = WCS(fits.getheader(out)).all_pix2world(x, x, 0)
    assert np.abs(ra_w - ra_t).max() < 1e-10 and np.abs(dec_w - dec_t).max() < 1e-10
    assert back.header["GAIN"] == img.header["GAIN"]  # other keys copied
    # (H, W) float32 tensor, a TanWCS only (no header), a SIP one
    sip = TanWCS.from_header(WCS(fits.Header.fromstring(shared_file("astropy_wcs_hdrs", "irac_sip.hdr").read_text())))
    write_fits(tmp_path / "plain.fits", torch.ones(5, 7), wcs=sip)
    h = fits.getheader(tmp_path / "plain.fits")
    assert h["BITPIX"] == -32 and h["NAXIS1"] == 7 and h["CTYPE1"] == "RA---TAN-SIP" and "AP_ORDER" in h
    with pytest.raises(ValueError, match="one image"):
        write_fits(tmp_path / "batch.fits", torch.ones(2, 1, 5, 7))


def test_write_refuses_overwrite_and_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "x.fits"
    write_fits(out, np.zeros((4, 4), np.float32))
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match=r"x\.fits.*overwrite=True"):
        write_fits(out, np.ones((4, 4), np.float32))
    assert out.read_bytes() == before
    write_fits(out, np.ones((4, 4), np.float32), overwrite=True)
    assert fits.getdata(out)[0, 0] == 1

    def boom(self, *a, **k):
        with open(a[0], "wb") as fh:  # start writing the temporary file, then fail
            fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(fits.PrimaryHDU, "writeto", boom)
    with pytest.raises(OSError, match="disk full"):
        write_fits(out, np.full((4, 4), 7, np.float32), overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        write_fits(tmp_path / "new.fits", np.full((4, 4), 7, np.float32))
    monkeypatch.undo()
    assert fits.getdata(out)[0, 0] == 1  # old file intact
    assert sorted(os.listdir(tmp_path)) == ["x.fits"]  # no temporary or half-written file left
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_fits(tmp_path / "nodir" / "y.fits", np.zeros((2, 2)))


def test_read_batch(tmp_path):
    paths = [shared_file("sfft_decam_decorr", f"input_data__DEC-OBS{e}.mini.fits") for e in ("04a", "18a", "04c")]
    batch = read_fits_batch(paths)
    assert batch.data.shape == (3, 1, 256, 256) and batch.mask.shape == (3, 1, 256, 256)
    assert len(batch.wcs) == 3 and len(batch.header) == 3
    single = read_fits(paths[1])
    assert torch.equal(batch.data[1:2], single.data)
    ra, dec = batch.wcs.pixel_to_world(torch.zeros(3, 1, dtype=torch.float64), torch.zeros(3, 1, dtype=torch.float64))
    assert torch.allclose(ra[1], single.wcs.pixel_to_world(torch.zeros(1, dtype=torch.float64),
                                                          torch.zeros(1, dtype=torch.float64))[0])
    write_fits(tmp_path / "small.fits", np.zeros((10, 10), np.float32))
    with pytest.raises(ValueError, match=r"small\.fits: image shape \(10, 10\) differs"):
        read_fits_batch([paths[0], tmp_path / "small.fits"])


def _resident_pages(path) -> int:
    """Pages of ``path`` in the page cache (Linux ``mincore`` on a read-only mapping, not touched)."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    size = os.path.getsize(path)
    n = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    vec = np.zeros(n, dtype=np.uint8)
    with open(path, "rb") as fh, mmap.mmap(fh.fileno(), size, prot=mmap.PROT_READ) as m:
        view = np.frombuffer(m, dtype=np.uint8)  # the mapping's address; reads nothing
        rc = libc.mincore(view.ctypes.data, size, vec.ctypes.data)
        del view
    if rc != 0:
        pytest.skip(f"mincore failed (errno {ctypes.get_errno()})")
    return int((vec & 1).sum())


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise (Linux)")
def test_write_fits_flush_leaves_the_page_cache(tmp_path):
    """write_fits(flush=True): same file, on disk before the rename, and its pages dropped from the
    page cache (a plain write leaves them there)."""
    data = np.random.default_rng(0).normal(size=(512, 1024)).astype(np.float32)  # 2 MB
    write_fits(tmp_path / "plain.fits", data)
    write_fits(tmp_path / "flushed.fits", data, flush=True)
    pages = (os.path.getsize(tmp_path / "flushed.fits") + 4095) // 4096
    plain, flushed = _resident_pages(tmp_path / "plain.fits"), _resident_pages(tmp_path / "flushed.fits")
    assert plain > pages // 2, plain  # written pages stay cached
    assert flushed < pages // 10, (flushed, pages)
    assert np.array_equal(fits.getdata(tmp_path / "flushed.fits"), data)  # reading loads the pages again
    assert (tmp_path / "plain.fits").read_bytes() == (tmp_path / "flushed.fits").read_bytes()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary file left


# -- #20: products readable by the team, clear errors -------------------------------------------
@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_respect_the_umask(tmp_path, umask, mode):
    """Products get 0666 less the umask like any file the user writes (mkstemp alone gives 0600)."""
    from astroprep_torch.pipeline import _atomic

    old = os.umask(umask)
    try:
        write_fits(tmp_path / "a.fits", np.ones((4, 4), np.float32))
        write_fits(tmp_path / "a.fits.gz", np.ones((4, 4), np.float32))
        _atomic(tmp_path / "t.pt", lambda p: torch.save(torch.ones(2), p))
    finally:
        os.umask(old)
    for name in ("a.fits", "a.fits.gz", "t.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name


def test_permission_denied_is_reported_as_such(tmp_path, monkeypatch):
    path = tmp_path / "a.fits"
    write_fits(path, np.ones((4, 4), np.float32))

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(fits, "open", denied)
    with pytest.raises(PermissionError, match="permission denied") as info:
        read_fits(path)
    assert "corrupt" not in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file_is_permission_denied(tmp_path):
    path = tmp_path / "a.fits"
    write_fits(path, np.ones((4, 4), np.float32))
    path.chmod(0)
    with pytest.raises(PermissionError, match="permission denied"):
        read_fits(path)


def test_read_fits_bad_hdu_and_path_arguments(tmp_path):
    path = tmp_path / "a.fits"
    write_fits(path, np.ones((4, 4), np.float32))
    with pytest.raises(ValueError, match=r"HDU 5 not found \(HDUs: 0:PrimaryHDU"):
        read_fits(path, hdu=5)
    with pytest.raises(TypeError, match="hdu must be"):
        read_fits(path, hdu=1.5)
    with pytest.raises(TypeError, match="path must be a FITS file name"):
        read_fits(None)


def test_write_fits_refuses_complex_data(tmp_path):
    with pytest.raises(TypeError, match="complex64"):
        write_fits(tmp_path / "c.fits", np.ones((4, 4), np.complex64))
    with pytest.raises(TypeError, match="complex"):
        write_fits(tmp_path / "c.fits", torch.ones(4, 4, dtype=torch.complex64))
    assert not list(tmp_path.iterdir())
