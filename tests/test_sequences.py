"""Per-object sequences: stamps, animation frames, GIF, the CERES export and its readers."""

import numpy as np
import pytest
import torch
from astropy.io import fits

from astroprep_torch import cutouts, sequences as S


def _frames(F=4, H=96, W=128, seed=0):
    """F noisy frames with one 'mover' (a bright pixel blob) at a known position per frame."""
    g = torch.Generator().manual_seed(seed)
    sci = 100 + 3 * torch.randn(F, 1, H, W, generator=g)
    xy = torch.tensor([[20.0 + 10 * f, 30.0 + 5 * f] for f in range(F)])
    yy, xx = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    for f in range(F):
        sci[f, 0] += 200 * torch.exp(-((xx - xy[f, 0]) ** 2 + (yy - xy[f, 1]) ** 2) / 4)
    diff = sci - 100
    return sci, diff, xy


def test_sequence_stamps_are_centred_and_off_frame_is_nan():
    sci, diff, xy = _frames()
    idx = torch.arange(4)
    st = S.sequence_stamps(sci, diff, xy, idx, size=15)
    assert st.science.shape == st.difference.shape == st.mask.shape == (4, 1, 15, 15)
    c = 7
    for k in range(4):
        peak = torch.nonzero(st.science[k, 0] == st.science[k, 0].max())[0].tolist()
        assert peak == [c, c]
    torch.testing.assert_close(st.difference, st.science - 100)
    edge = S.sequence_stamps(sci, diff, torch.tensor([[1.0, 1.0]]), torch.tensor([2]), size=15)
    assert torch.isnan(edge.science[0, 0, 0, 0]) and edge.mask[0, 0, 0, 0] and not edge.mask[0, 0, 7, 7]
    with pytest.raises(ValueError, match="batch_index"):
        S.sequence_stamps(sci, diff, xy, torch.tensor([0, 1, 2, 9]), size=15)


def test_sequence_frames_share_limits_across_the_sequence():
    sci, diff, xy = _frames()
    st = S.sequence_stamps(sci, diff, xy, torch.arange(4), size=16)
    frames = S.sequence_frames(st.science, st.difference, zoom=2, gap=2)
    assert frames.dtype == torch.uint8 and frames.shape == (4, 32, 2 * (2 * 16 + 2))
    assert (frames[:, :, 32:36] == 128).all()  # the grey separator
    # one interval for the whole sequence: a frame with a brighter sky looks brighter instead of
    # being re-stretched to look like the others (per-frame limits would hide the change)
    bright = st.science.clone()
    bright[1] = bright[1] + 30
    f2 = S.sequence_frames(bright, st.difference, zoom=1)
    assert f2[1, :, :16].float().mean() > f2[0, :, :16].float().mean() + 20


def test_write_gif_and_sequence(tmp_path):
    from PIL import Image

    sci, diff, xy = _frames()
    st = S.sequence_stamps(sci, diff, xy, torch.arange(4), size=16)
    mjd = np.array([58000.3, 58000.1, 58000.4, 58000.2])  # out of order on purpose
    names = ["f3", "f1", "f4", "f2"]
    gif, pt = S.write_sequence(tmp_path, "AP00001", st, mjd, names, zoom=2)
    with Image.open(gif) as im:
        assert im.n_frames == 4 and im.size == (2 * (2 * 16 + 2), 32) and im.info.get("loop") == 0
    d = torch.load(pt)
    assert d["frame"] == ["f1", "f2", "f3", "f4"]
    assert torch.all(d["mjd"][1:] > d["mjd"][:-1]) and d["mjd"].dtype == torch.float64
    assert d["science"].shape == (4, 1, 16, 16) and d["science"].dtype == torch.float32
    torch.testing.assert_close(d["science"][0], st.science[1])  # f1 was the second input
    with pytest.raises(ValueError, match="uint8"):
        S.write_gif(tmp_path / "x.gif", torch.zeros(2, 4, 4))


def test_ceres_export_reads_back_and_trains(tmp_path):
    sci, diff, xy = _frames(F=6, H=240, W=260)
    xy = xy + 60
    st = S.sequence_stamps(sci, diff, xy, torch.arange(6), size=S.CERES_SIZE)
    paths = S.write_ceres_cutouts(tmp_path, "AP00007", st.science, difference=st.difference,
                                  frames=[f"fr{i}" for i in range(6)], mjd=np.arange(6) + 58000.0,
                                  ra=np.linspace(10, 10.01, 6), dec=np.full(6, -5.0))
    assert [p.name for p in paths] == [f"AP00007_{k}.fits" for k in range(6)]
    with fits.open(paths[2]) as h:
        assert h[0].data.shape == (200, 200) and h[0].header["TRKSUB"] == "AP00007"
        assert h[0].header["FRAME"] == "fr2" and h[0].header["LABEL"] == "undefined" and h["DIFF"].data.shape == (200, 200)
        assert h[0].header["MJD"] == 58002.0
    # unlabelled: nothing to train on (an honest error), unless asked for
    with pytest.raises(ValueError, match="no labelled"):
        cutouts.read_ceres_cutouts(tmp_path)
    allc = cutouts.read_ceres_cutouts(tmp_path, include_undefined=True)
    assert allc.images.shape == (6, 1, 200, 200) and (allc.labels == -1).all()
    # people label them (the web app writes LABEL); the readers and train-classifier's data module see them
    for k, p in enumerate(paths):
        fits.setval(p, "LABEL", value="valid" if k % 2 else "invalid")
    fc = cutouts.read_fits_folder(tmp_path)
    assert fc.labels.tolist() == [0, 1, 0, 1, 0, 1] and fc.images.shape == (6, 1, 200, 200)
    from astroprep_torch.classify import CutoutDataModule

    dm = CutoutDataModule(source="fits_folder", root=str(tmp_path), size=63, val_fraction=0.0, test_fraction=0.0)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (1, 63, 63) and set(y.tolist()) <= {0, 1}
