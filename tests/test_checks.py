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
