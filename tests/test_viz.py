"""Quick-look figures render headless to PNGs of the expected size (issue 7)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from astroprep_torch import viz
from astroprep_torch.stretch import Normalize, Stretch, ZScale


@pytest.fixture(scope="module")
def frames():
    from astroprep_torch import sim

    pair = sim.simulate_pair((160, 200), n_stars=150, seed=4, n_transients=3)
    return pair


def _png_ok(path, figsize, dpi):
    from PIL import Image

    assert path.exists() and path.stat().st_size > 5000, path
    with Image.open(path) as im:
        assert im.size == (round(figsize[0] * dpi), round(figsize[1] * dpi)), (path, im.size)
        arr = np.asarray(im.convert("L"), dtype=float)
    assert arr.std() > 5, f"{path} looks blank"


def _check(fig, path, figsize, dpi=100):
    from matplotlib.figure import Figure

    assert isinstance(fig, Figure)
    _png_ok(path, figsize, dpi)


def test_show_image_pixels_and_wcs(frames, tmp_path):
    sci = frames.science
    p = tmp_path / "image.png"
    fig = viz.show_image(sci.image, mask=sci.mask, path=p, title="simulated frame")
    _check(fig, p, (6.4, 5.6))
    axis = fig.axes[0]
    assert axis.get_xlabel() == "x [pixel]" and axis.get_ylabel() == "y [pixel]"
    p = tmp_path / "image_wcs.png"
    fig = viz.show_image(sci.image[0, 0].numpy(), header=sci.header, path=p, dpi=80)
    _check(fig, p, (6.4, 5.6), 80)
    assert "Right ascension" in fig.axes[0].coords[0].get_axislabel()


def test_show_image_with_tanwcs(frames, tmp_path):
    wcs_mod = pytest.importorskip("astroprep_torch.wcs")
    tan = wcs_mod.TanWCS.from_header(frames.science.header)
    p = tmp_path / "image_tanwcs.png"
    fig = viz.show_image(frames.science.image, wcs=tan, path=p)
    _check(fig, p, (6.4, 5.6))


def test_plot_catalog_from_dict_and_object(frames, tmp_path):
    cat = frames.science.catalog
    n = cat["x"].shape[0]
    catalog = {"x": cat["x"], "y": cat["y"], "a": torch.full((n,), 1.5), "b": torch.full((n,), 1.0),
               "theta": torch.linspace(-90, 90, n), "batch_index": torch.zeros(n, dtype=torch.long)}
    p = tmp_path / "catalog.png"
    fig = viz.plot_catalog(frames.science.image, catalog, path=p)
    _check(fig, p, (6.4, 5.6))
    assert len(fig.axes[0].patches) == n

    class Cat:  # attribute access, no batch_index, radians (sep)
        pass

    c = Cat()
    for k, v in catalog.items():
        setattr(c, k, v)
    del c.batch_index
    c.theta = torch.deg2rad(catalog["theta"])
    fig = viz.plot_catalog(frames.science.image, c, theta_units="rad", header=frames.science.header)
    assert len(fig.axes[0].patches) == n
    with pytest.raises(KeyError, match="theta"):
        viz.plot_catalog(frames.science.image, {"x": cat["x"], "y": cat["y"], "a": cat["x"], "b": cat["x"]})


def test_plot_triplet(frames, tmp_path):
    sci, ref = frames.science.image, frames.reference.image
    p = tmp_path / "triplet.png"
    fig = viz.plot_triplet(sci, ref, sci - ref, path=p)
    _check(fig, p, (15.0, 4.8))
    assert [a.get_title() for a in fig.axes[::2]][:3] == ["science", "reference", "difference"]


def test_plot_background(frames, tmp_path):
    f = frames.science
    p = tmp_path / "background.png"
    fig = viz.plot_background(f.background, f.variance.sqrt(), image=f.image, path=p)
    _check(fig, p, (15.0, 4.6))
    with pytest.raises(ValueError, match="same shape"):
        viz.plot_background(f.background, f.variance[..., :10, :].sqrt())
    # a BackgroundResult straight from the background stage
    from astroprep_torch.background import background_2d

    p2 = tmp_path / "background_result.png"
    _check(viz.plot_background(background_2d(f.image, box_size=32), path=p2), p2, (10.0, 4.6))
    with pytest.raises(TypeError, match="rms is required"):
        viz.plot_background(f.background)


def test_plot_quality(frames, tmp_path):
    img = frames.science.image
    err = torch.rand(1, 1, 5, 8, generator=torch.Generator().manual_seed(0)) * 0.01 + 1e-3
    err[0, 0, 1, 2] = 0.5
    err[0, 0, 4, 7] = 0.3
    p = tmp_path / "quality.png"
    fig = viz.plot_quality(img, err, threshold=0.1, path=p)
    _check(fig, p, (12.0, 5.2))
    assert len(fig.axes[0].patches) == 2 and "2 of 40" in fig.axes[0].get_title()


def test_plot_histograms(frames, tmp_path):
    img = frames.science.image
    p = tmp_path / "hist.png"
    fig = viz.plot_histograms(img, transform=Normalize(ZScale(), Stretch("asinh")), path=p)
    _check(fig, p, (11.0, 4.4))
    fig = viz.plot_histograms(img, Normalize()(img))
    assert fig.axes[1].get_xlabel() == "transformed value"


def test_bad_plane_shapes():
    with pytest.raises(ValueError, match="image"):
        viz.show_image(np.zeros(5))
    with pytest.raises(IndexError, match="index"):
        viz.show_image(torch.zeros(1, 1, 4, 4), index=3)
