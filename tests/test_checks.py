import pytest
import torch

from astroprep_torch._checks import as_pair, check_image, check_mask


def test_check_image_names_argument():
    with pytest.raises(ValueError, match="science"):
        check_image(torch.zeros(4, 4), "science")
    with pytest.raises(TypeError, match="floating"):
        check_image(torch.zeros(1, 1, 4, 4, dtype=torch.int32))
    assert check_image(torch.zeros(2, 1, 4, 4)).shape == (2, 1, 4, 4)


def test_check_mask():
    img = torch.zeros(2, 1, 4, 4)
    with pytest.raises(TypeError, match="torch.bool"):
        check_mask(torch.zeros(2, 1, 4, 4), img)
    with pytest.raises(ValueError, match="broadcast"):
        check_mask(torch.zeros(3, 1, 4, 4, dtype=torch.bool), img)
    assert check_mask(torch.zeros(1, 1, 4, 4, dtype=torch.bool), img).shape == img.shape


def test_as_pair():
    assert as_pair(64, "box_size") == (64, 64)
    assert as_pair((32, 48), "box_size") == (32, 48)
    with pytest.raises(ValueError, match="box_size"):
        as_pair((0, 3), "box_size")


def test_all_finite_and_bad_pixels():
    from astroprep_torch._checks import all_finite, bad_pixels

    x = torch.ones(1, 1, 8, 9)
    assert all_finite(x) and all_finite(torch.arange(5))
    big = torch.full((1, 1, 8, 9), 3e38)  # every value finite, the sum overflows: elementwise fallback
    assert all_finite(big)
    m = torch.zeros(1, 1, 8, 9, dtype=torch.bool)
    m[0, 0, 1, 2] = True
    b = bad_pixels(x, m)
    assert b.dtype == torch.bool and int(b.sum()) == 1 and b.data_ptr() != m.data_ptr()  # a copy
    b |= True
    assert int(m.sum()) == 1  # the caller's mask is untouched
    for v in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[0, 0, 3, 4] = v
        assert not all_finite(y)
        b = bad_pixels(y, m)
        assert bool(b[0, 0, 3, 4]) and bool(b[0, 0, 1, 2]) and int(b.sum()) == 2
    assert int(bad_pixels(x).sum()) == 0 and int(bad_pixels(x, m[0, 0]).sum()) == 1  # broadcast mask


def test_frame_problem_says_what_is_wrong():
    from astroprep_torch._checks import frame_problem

    img = torch.randn(1, 1, 32, 32)
    assert frame_problem(img) == ""
    assert frame_problem(img[..., :1, :1]) == "frame too small: 1x1 pixels (at least 16x16 needed)"
    assert frame_problem(img * float("nan")).startswith("empty frame: every pixel is NaN")
    assert frame_problem(img, torch.ones_like(img, dtype=torch.bool)).startswith("empty frame: every pixel is NaN")
    assert frame_problem(torch.zeros(1, 1, 32, 32)) == "empty frame: every usable pixel equals 0"


def test_dtype_batch_wcs_checks_name_the_argument():
    from astroprep_torch._checks import check_batch_nonempty, check_float_dtype, check_wcs

    with pytest.raises(TypeError, match=r"science must be float32 or float64, got torch\.bfloat16"):
        check_float_dtype(torch.ones(1, dtype=torch.bfloat16), "science")
    with pytest.raises(ValueError, match="image is an empty batch"):
        check_batch_nonempty(torch.ones(0, 1, 4, 4), "image")
    with pytest.raises(TypeError, match="src_wcs must be a WCS"):
        check_wcs(None, "src_wcs")
