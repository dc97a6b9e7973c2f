"""SExtractor's random gatherup (astroprep_torch.detect.gatherup_random)."""

from __future__ import annotations

import ctypes
import ctypes.util
import subprocess
import warnings

import numpy as np
import pytest
import torch

from conftest import require_binary

from astroprep_torch.detect import gatherup_random as gr
from astroprep_torch.detect.analyse import lutz_order_key


def _glibc():
    name = ctypes.util.find_library("c")
    if name is None:
        pytest.skip("no C library found by ctypes")
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "gnu_get_libc_version"):
        pytest.skip("the C library is not glibc: its rand() is another generator")
    return libc


def test_glibc_rand_stream_matches_libc_rand():
    libc = _glibc()
    libc.srand(1)
    ref = np.array([libc.rand() for _ in range(10000)], dtype=np.int64)  # across two 4096 blocks
    assert np.array_equal(gr.glibc_rand(5), ref[:5])
    assert np.array_equal(gr.glibc_rand(10000), ref)
    assert gr.glibc_rand(0).size == 0
    with pytest.raises(ValueError, match="n must be >= 0"):
        gr.glibc_rand(-1)


def test_lutz_list_rank_joins_partial_objects_by_their_first_column():
    # a U: the two arms are separate objects until row 2, which joins them: each arm's list goes in
    # at the first column it had on row 1, before the row-2 pixel of that column
    x = np.array([0, 4, 0, 4, 0, 1, 2, 3, 4])
    y = np.array([0, 0, 1, 1, 2, 2, 2, 2, 2])
    rank = gr.lutz_list_rank(x, y, np.zeros(9, dtype=np.int64))
    order = [(int(a), int(b)) for a, b in zip(x[np.argsort(rank)], y[np.argsort(rank)])]
    assert order == [(0, 0), (0, 1), (0, 2), (1, 2), (2, 2), (3, 2), (4, 0), (4, 1), (4, 2)]
    # the overhang: row 1 starts left of row 0, its pixels left of column 2 go first
    x = np.array([2, 3, 0, 1, 2, 3])
    y = np.array([0, 0, 1, 1, 1, 1])
    rank = gr.lutz_list_rank(x, y, np.zeros(6, dtype=np.int64))
    assert rank.tolist() == [2, 3, 0, 1, 4, 5]


def test_lutz_list_rank_is_lutz_order_key_for_one_run_per_row():
    rng = np.random.default_rng(3)
    xs, ys, gs = [], [], []
    for obj in range(30):  # random 8-connected "blobs" with one run per row
        x0, ln = 10, int(rng.integers(1, 9))
        for r in range(int(rng.integers(1, 12))):
            if r:
                new = int(rng.integers(1, 9))  # start within [x0 - new, x0 + ln]: touches the row below
                x0, ln = int(rng.integers(max(x0 - new, 0), x0 + ln + 1)), new
            xs += list(range(x0, x0 + ln))
            ys += [r + 20 * obj] * ln
            gs += [obj] * ln
    x, y, grp = (torch.tensor(v, dtype=torch.int64) for v in (xs, ys, gs))
    rank = torch.from_numpy(gr.lutz_list_rank(x.numpy(), y.numpy(), grp.numpy()))
    key = lutz_order_key(x, y, grp, 600, 60)
    for o in range(30):
        m = grp == o
        assert torch.equal(torch.argsort(rank[m]), torch.argsort(key[m], stable=True))
    assert torch.equal(gr.list_order_key(x, y, grp, 600, 60), key)


def _pair_image():
    rng = np.random.default_rng(5)
    yy, xx = np.mgrid[:96, :96].astype(np.float32)
    img = 800 * np.exp(-((xx - 44) ** 2 + (yy - 47) ** 2) / (2 * 2.2**2)) \
        + 500 * np.exp(-((xx - 51) ** 2 + (yy - 50) ** 2) / (2 * 2.6**2))
    return (img + 100 + rng.normal(0, 3, img.shape)).astype(np.float32)


def _segmentations(tmp_path, ours_name):
    from astropy.io import fits

    from astroprep_torch import classic
    from test_classic import _files

    sex = require_binary("source-extractor", "sex")
    from test_classic import SEX

    cfg = _files(tmp_path, SEX + "CLEAN N\n")
    fits.writeto(cfg.parent / "img.fits", _pair_image(), overwrite=True)
    subprocess.run([sex, "img.fits", "-c", "my.sex"], cwd=cfg.parent, check=True, capture_output=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classic.run_extract(cfg.parent / "img.fits", cfg, tmp_path / ours_name)
    return fits.getdata(cfg.parent / "seg.fits"), fits.getdata(tmp_path / ours_name / "seg.fits")


def _same_partition(a, b) -> bool:
    m = (a > 0) | (b > 0)
    pairs = np.unique(np.c_[a[m], b[m]], axis=0)
    return len(pairs) == len(np.unique(a[m])) == len(np.unique(b[m]))


def test_blended_pair_gathers_free_pixels_as_source_extractor(tmp_path, monkeypatch):
    """Two overlapping stars split by the deblender: every pixel below the split goes to the branch
    SExtractor's rand() draw gives it (same segmentation, CLEAN off)."""
    a, b = _segmentations(tmp_path, "ours")
    assert a.max() == 2 and b.max() == 2
    assert _same_partition(a, b)
    # another random stream moves some of those pixels: the test sees the draw
    monkeypatch.setattr(gr, "glibc_rand", lambda n: np.random.default_rng(7).integers(0, 2**31 - 1, n))
    _, c = _segmentations(tmp_path, "ours_other_stream")
    assert not _same_partition(a, c)


def test_detect_sources_gatherup_modes():
    from astroprep_torch.detect import detect_sources

    img = torch.from_numpy(_pair_image() - 100.0)[None, None]
    a = detect_sources(img, 3.0, gatherup="sextractor")
    b = detect_sources(img, 3.0, gatherup="probable")
    assert a["label"].numel() == b["label"].numel() == 2 and bool(a["blended"].all())
    # same branches, same pixels overall: only the pixels below the split may change hands
    assert torch.equal(a["segmentation"] > 0, b["segmentation"] > 0)
    with pytest.raises(ValueError, match="gatherup must be"):
        detect_sources(img, 3.0, gatherup="random")


def test_list_order_key_exact_up_to_the_row_limit_then_one_run_order(monkeypatch):
    """A U shape (two runs per row) gets lutz's exact list order while it is at most
    EXACT_LIST_MAX_ROWS tall, and lutz_order_key's (one run per row) order beyond: the cost of the
    exact order is a loop over a group's rows."""
    H, W = 12, 6
    pts = [(x, y) for y in range(H) for x in range(W) if x in (0, 1, 4, 5) or y == H - 1]
    x = torch.tensor([p[0] for p in pts])
    y = torch.tensor([p[1] for p in pts])
    g = torch.zeros_like(x)
    exact = torch.from_numpy(gr.lutz_list_rank(x.numpy(), y.numpy(), g.numpy()))
    one_run = lutz_order_key(x, y, g, H, W)
    assert not torch.equal(torch.argsort(exact), torch.argsort(one_run))
    assert torch.equal(torch.argsort(gr.list_order_key(x, y, g, H, W)), torch.argsort(exact))
    monkeypatch.setattr(gr, "EXACT_LIST_MAX_ROWS", H - 1)
    assert torch.equal(gr.list_order_key(x, y, g, H, W), one_run)
