"""Frames for pipeline mode: unique output names per run, batches of mixed shapes (#20)."""

import pytest
import torch

from astroprep_torch.data import FitsFrameDataset, collate_frames, frame_names


def test_frame_names_unique_by_relative_path(tmp_path):
    paths = [tmp_path / "collide" / "a.fits", tmp_path / "collide2" / "a.fits", tmp_path / "collide" / "b.fits",
             tmp_path / "deep" / "x" / "a.fits.gz"]
    assert frame_names(paths) == ["collide__a", "collide2__a", "b", "deep__x__a"]
    assert frame_names([tmp_path / "n1" / "a.fits", tmp_path / "n2" / "b.fits"]) == ["a", "b"]  # plain when unique


def test_frame_names_refuse_one_frame_in_two_files(tmp_path):
    with pytest.raises(ValueError, match=r"a\.fits.* and .*a\.fits\.gz would both be frame 'collide__a'"):
        frame_names([tmp_path / "collide" / "a.fits", tmp_path / "collide" / "a.fits.gz", tmp_path / "collide2" / "a.fits"])


def test_dataset_items_carry_the_unique_names(tmp_path):
    ds = FitsFrameDataset([tmp_path / "c" / "a.fits", tmp_path / "c2" / "a.fits"], skip=lambda n: n == "c2__a")
    assert ds.names == ["c__a"] and ds[0]["name"] == "c__a" and ds[0]["error"]  # missing file: reported


def _item(name, shape, error=""):
    return {"name": name, "path": name, "error": error, "header": "", "image": torch.ones(1, *shape),
            "mask": torch.zeros(1, *shape, dtype=torch.bool)}


def test_odd_shaped_frame_is_reported_not_fatal():
    batch = collate_frames([_item("tiny", (1, 1)), _item("a", (32, 32)), _item("b", (32, 32))])
    assert batch["image"].shape == (3, 1, 32, 32)
    assert "image shape (1, 1) differs from (32, 32)" in batch["error"][0] and "batch_size=1" in batch["error"][0]
    assert batch["error"][1:] == ["", ""] and bool(batch["mask"][0].all())
    # a tie keeps the larger frame: a 1x1 file never pushes a real frame out of its batch
    tie = collate_frames([_item("tiny", (1, 1)), _item("a", (32, 32))])
    assert tie["image"].shape == (2, 1, 32, 32) and tie["error"][0] and not tie["error"][1]


def test_variance_map_beside_a_frame_is_read_and_batched(tmp_path):
    """Issue 26: a frame's per-pixel variance ``<stem>.var.fits`` (calibrated ``<stem>.cal.fits`` too)
    rides with its item; a batch mixing frames with and without one gets NaN (the graph's model) for
    the others; a map of another shape is the frame's error, naming the file."""
    from astroprep_torch.data import read_variance, variance_path
    from astroprep_torch.io import write_fits

    img = torch.randn(1, 1, 32, 32) * 5 + 100
    for name in ("a.cal.fits", "b.fits", "c.fits"):
        write_fits(tmp_path / name, img)
    var = torch.full((1, 1, 32, 32), 25.0)
    var[..., 0, 0] = float("inf")  # a bad pixel's: unknown, NaN
    write_fits(tmp_path / "a.var.fits", var)
    write_fits(tmp_path / "c.var.fits", torch.ones(1, 1, 16, 16))
    assert variance_path(tmp_path / "a.cal.fits") == tmp_path / "a.var.fits"
    assert variance_path(tmp_path / "b.fits") is None and variance_path(tmp_path / "a.var.fits") is None
    v = read_variance(tmp_path / "a.cal.fits", (32, 32))
    assert v.shape == (1, 1, 32, 32) and torch.isnan(v[..., 0, 0]).all() and float(v[..., 1, 1]) == 25.0
    ds = FitsFrameDataset([tmp_path / "a.cal.fits", tmp_path / "b.fits", tmp_path / "c.fits"])
    assert "variance" in ds[0] and "variance" not in ds[1]
    assert "variance map" in ds[2]["error"] and "c.var.fits" in ds[2]["error"]
    batch = collate_frames([ds[0], ds[1]])
    assert batch["variance"].shape == (2, 1, 32, 32) and float(batch["variance"][0, 0, 1, 1]) == 25.0
    assert bool(torch.isnan(batch["variance"][1]).all())
    assert "variance" not in collate_frames([ds[1]])  # no map anywhere: no key, the graph as before


def test_folder_of_calibrated_frames_expands_to_the_frames_only(tmp_path):
    """A folder (or pattern) written by calibration holds frames, their variance maps and the masters:
    only the frames are inputs; a variance map or master named on its own is still taken, and a
    ``master_*.fits`` that is not a master is a frame."""
    from astroprep_torch.calibrate import Master
    from astroprep_torch.data import resolve_inputs
    from astroprep_torch.io import write_fits

    img = torch.ones(1, 1, 16, 16)
    for name in ("a.cal.fits", "a.var.fits", "b.fits", "b.var.fits", "lonely.var.fits", "master_m31.fits"):
        write_fits(tmp_path / name, img)
    Master("bias", img[0, 0], img[0, 0], img[0, 0] > 2).write(tmp_path / "master_bias.fits")
    names = lambda ps: sorted(p.name for p in ps)  # noqa: E731
    frames = ["a.cal.fits", "b.fits", "lonely.var.fits", "master_m31.fits"]
    assert names(resolve_inputs(tmp_path)) == frames
    assert names(resolve_inputs(str(tmp_path / "*.fits"))) == frames
    assert names(resolve_inputs([tmp_path / "a.var.fits", tmp_path / "master_bias.fits"])) == ["a.var.fits", "master_bias.fits"]
