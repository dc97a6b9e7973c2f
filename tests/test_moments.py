"""Tests of astroprep_torch._moments: per-segment moments and SExtractor's ellipse parameters."""

import math

import numpy as np
import pytest
import torch

from astroprep_torch._moments import (
    SINGULAR_ADD,
    central_moments,
    ellipse,
    segment_max,
    segment_min,
    segment_moments,
    segment_sum,
)


def _two_segments():
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 50, (400,), generator=g).double()
    y = torch.randint(0, 50, (400,), generator=g).double()
    seg = (torch.arange(400) % 2).long()
    w = torch.rand(400, generator=g, dtype=torch.float64) + 0.1
    return seg, x, y, w


def test_segment_reductions():
    seg = torch.tensor([0, 1, 0, 2])
    v = torch.tensor([1.0, 5.0, 3.0, -2.0])
    assert segment_sum(v, seg, 4).tolist() == [4.0, 5.0, -2.0, 0.0]
    assert segment_max(v, seg, 4).tolist() == [3.0, 5.0, -2.0, -math.inf]
    assert segment_min(v, seg, 4).tolist() == [1.0, 5.0, -2.0, math.inf]


def test_moments_match_numpy_weighted_covariance():
    seg, x, y, w = _two_segments()
    m = segment_moments(seg, 2, x, y, w)
    c = central_moments(m)
    for s in range(2):
        k = (seg == s).numpy()
        xs, ys, ws = x.numpy()[k], y.numpy()[k], w.numpy()[k]
        cov = np.cov(np.stack([xs, ys]), aweights=ws, bias=True)
        assert float(c.x[s] + m.x0[s]) == pytest.approx(np.average(xs, weights=ws), rel=1e-12)
        assert float(c.y[s] + m.y0[s]) == pytest.approx(np.average(ys, weights=ws), rel=1e-12)
        np.testing.assert_allclose([float(c.x2[s]), float(c.y2[s]), float(c.xy[s])],
                                   [cov[0, 0], cov[1, 1], cov[0, 1]], rtol=1e-10)


def test_moments_about_a_given_centre():
    seg, x, y, w = _two_segments()
    m = segment_moments(seg, 2, x, y, w)
    cx, cy = torch.tensor([10.0, 30.5], dtype=torch.float64), torch.tensor([20.0, 7.25], dtype=torch.float64)
    c = central_moments(m, centre=(cx, cy))
    for s in range(2):
        k = seg == s
        dx, dy, ws = x[k] - cx[s], y[k] - cy[s], w[k]
        assert float(c.x2[s]) == pytest.approx(float((ws * dx * dx).sum() / ws.sum()), rel=1e-10)
        assert float(c.xy[s]) == pytest.approx(float((ws * dx * dy).sum() / ws.sum()), rel=1e-10)
        assert float(c.x[s] + m.x0[s]) == float(cx[s])


def test_zero_flux_segment_is_guarded_or_not():
    seg = torch.tensor([0, 0, 1])
    x = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    w = torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64)
    assert torch.isfinite(segment_moments(seg, 2, x, x, w).mx).all()
    assert torch.isnan(segment_moments(seg, 2, x, x, w, guard_zero=False).mx[0])


def test_ellipse_of_a_rotated_gaussian():
    a0, b0, th = 3.0, 1.5, math.radians(30.0)
    c, s = math.cos(th), math.sin(th)
    x2 = torch.tensor([a0**2 * c * c + b0**2 * s * s], dtype=torch.float64)
    y2 = torch.tensor([a0**2 * s * s + b0**2 * c * c], dtype=torch.float64)
    xy = torch.tensor([(a0**2 - b0**2) * s * c], dtype=torch.float64)
    e = ellipse(x2, y2, xy)
    assert not bool(e.singular[0])
    assert float(e.a[0]) == pytest.approx(a0) and float(e.b[0]) == pytest.approx(b0)
    assert float(e.theta[0]) == pytest.approx(th)
    # the ellipse x^T C x = 1 with cxx, cyy, cxy passes through (a cos th, a sin th) scaled by 1/a
    px, py = c, s  # unit vector along the major axis: cxx px^2 + cyy py^2 + cxy px py = 1/a^2
    val = float(e.cxx[0] * px * px + e.cyy[0] * py * py + e.cxy[0] * px * py)
    assert val == pytest.approx(1 / a0**2)


def test_singular_ellipse_gets_a_pixel_variance():
    # a single pixel: all moments 0 -> x2 = y2 = 1/12, round, theta = pi/4 (SExtractor's rule for x2 == y2)
    z = torch.zeros(1, dtype=torch.float64)
    e = ellipse(z, z, z)
    assert bool(e.singular[0]) and float(e.x2[0]) == SINGULAR_ADD and float(e.y2[0]) == SINGULAR_ADD
    assert float(e.a[0]) == pytest.approx(math.sqrt(SINGULAR_ADD)) and float(e.a[0]) == float(e.b[0])
    assert float(e.theta[0]) == pytest.approx(math.pi / 4)


def test_moments_are_differentiable_in_the_weights():
    seg, x, y, w = _two_segments()
    w = w.clone().requires_grad_(True)
    c = central_moments(segment_moments(seg, 2, x, y, w))
    e = ellipse(c.x2, c.y2, c.xy)
    (e.a.sum() + c.x.sum()).backward()
    assert w.grad is not None and torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0


def test_ellipse_gradcheck_in_the_weights():
    seg, x, y, w = _two_segments()
    seg, x, y = seg[:30], x[:30], y[:30]

    def axes(ww):
        c = central_moments(segment_moments(seg, 2, x, y, ww))
        e = ellipse(c.x2, c.y2, c.xy)
        return torch.stack([e.a, e.b, c.x])

    assert torch.autograd.gradcheck(axes, (w[:30].clone().requires_grad_(True),))
