"""Patch features: 3x3 neighbourhood mean, bilinear upsampling of the deeper map, reduction only when wide."""

import pytest
import torch
import torch.nn.functional as F

from patchcore.features import aggregate_neighbourhood, crop_border, patch_features


def test_neighbourhood_mean_inside_and_at_borders():
    x = torch.randn(1, 2, 5, 6)
    y = aggregate_neighbourhood(x)
    assert torch.allclose(y[0, :, 2, 3], x[0, :, 1:4, 2:5].mean(dim=(1, 2)), atol=1e-6)
    # corners: the 4 real neighbours and 5 zeros of padding, as in the paper's code
    assert torch.allclose(y[0, :, 0, 0], x[0, :, :2, :2].sum(dim=(1, 2)) / 9, atol=1e-6)


def test_narrow_features_are_concatenated_whole():
    a, b = torch.randn(2, 40, 8, 8), torch.randn(2, 112, 4, 4)
    f = patch_features([a, b], target_dim=1024)
    assert f.shape == (2, 8, 8, 152)
    assert torch.allclose(f[..., :40], aggregate_neighbourhood(a).permute(0, 2, 3, 1), atol=1e-6)
    up = F.interpolate(aggregate_neighbourhood(b), size=(8, 8), mode="bilinear", align_corners=False)
    assert torch.allclose(f[..., 40:], up.permute(0, 2, 3, 1), atol=1e-6)


def test_wide_features_are_pooled_with_equal_weight_per_layer():
    a, b = torch.randn(1, 512, 4, 4), torch.randn(1, 1024, 2, 2)
    f = patch_features([a, b], target_dim=1024)
    assert f.shape == (1, 4, 4, 1024)
    # as in the paper's code: each layer pooled to 1024, then the pair pooled to 1024 -> first half layer 2
    assert torch.allclose(f[0, 1, 1, :512], aggregate_neighbourhood(a)[0, :, 1, 1], atol=1e-5)


def test_crop_border_cuts_exactly_the_cells_of_the_padding():
    fmap = torch.arange(2 * 3 * 36 * 40, dtype=torch.float32).reshape(2, 3, 36, 40)  # 288 x 320 input, stride 8
    out = crop_border(fmap, 16, (288, 320))
    assert out.shape == (2, 3, 32, 36) and torch.equal(out, fmap[..., 2:34, 2:38])
    deep = torch.zeros(1, 5, 18, 20)  # the same input at stride 16: one cell a side
    assert crop_border(deep, 16, (288, 320)).shape == (1, 5, 16, 18)
    assert crop_border(fmap, 0, (288, 320)) is fmap
    with pytest.raises(ValueError, match="whole number of feature cells"):
        crop_border(deep, 8, (288, 320))
