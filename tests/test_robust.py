"""Tests of astroprep_torch._robust: the MAD -> sigma constant and mad_std against astropy."""

import numpy as np
import pytest
import torch

from astroprep_torch._robust import MAD_TO_STD, mad_std


def test_constant_is_astropys():
    from astropy.stats import mad_std as astropy_mad_std

    a = np.array([-1.0, 0.0, 1.0])  # MAD 1
    assert astropy_mad_std(a) == pytest.approx(MAD_TO_STD, rel=1e-15)


@pytest.mark.parametrize("dim", [None, -1, 0])
def test_mad_std_matches_astropy_on_odd_counts(dim):
    from astropy.stats import mad_std as astropy_mad_std

    g = np.random.default_rng(2)
    a = g.normal(5.0, 3.0, (7, 9))  # odd counts along every axis: torch's and numpy's medians agree
    got = mad_std(torch.from_numpy(a), dim=dim)
    ref = astropy_mad_std(a, axis=dim)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-12)


def test_mad_std_ignore_nan_and_keepdim():
    from astropy.stats import mad_std as astropy_mad_std

    g = np.random.default_rng(3)
    a = g.normal(0.0, 2.0, (4, 12))
    a[:, :1] = np.nan  # 11 finite values per row
    x = torch.from_numpy(a)
    got = mad_std(x, dim=-1, keepdim=True, ignore_nan=True)
    assert got.shape == (4, 1)
    np.testing.assert_allclose(got[:, 0].numpy(), astropy_mad_std(a, axis=-1, ignore_nan=True), rtol=1e-12)
    assert torch.isnan(mad_std(x, dim=-1)).all()  # without ignore_nan a NaN propagates


def test_mad_std_with_given_center_equals_default():
    x = torch.randn(5, 31, dtype=torch.float64)
    med = x.median(dim=-1, keepdim=True).values
    assert torch.equal(mad_std(x, dim=-1, center=med), mad_std(x, dim=-1))
    assert mad_std(x, keepdim=True).shape == (1, 1)
