"""What follows the nearest-neighbour distances, in numpy alone: Eq. 7's weight and the smoothed map.

The estimator uses :func:`eq7_weight` for its image score; the torch-free runtime uses all of it. The map
functions compute what the estimator's torch/scipy path computes (bilinear upsampling with
``align_corners=False``, then ``scipy.ndimage.gaussian_filter`` with mode "reflect" and truncate 4), as
matrix products, which are fast at these sizes.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .resample import linear_weights


def eq7_weight(dist_to_support: np.ndarray) -> float:
    """The weight of the paper's Eq. 7 from the distances of m_test* to N_b(m*), m* first:
    1 - exp(d_0) / sum_j exp(d_j), computed as a stable softmax in float64."""
    d = np.asarray(dist_to_support, dtype=np.float64)
    e = np.exp(d - d.max())
    return float(1.0 - e[0] / e.sum())


def gaussian_kernel(sigma: float, truncate: float = 4.0) -> np.ndarray:
    """scipy.ndimage.gaussian_filter's 1-D kernel (radius int(truncate * sigma + 0.5)), float64."""
    radius = int(truncate * float(sigma) + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def reflect_index(n: int, r: int) -> np.ndarray:
    """Indices padding an axis of length n by r on each side as scipy's mode="reflect" (d c b a | a b c d)."""
    i = np.mod(np.arange(-r, n + r), 2 * n)
    return np.where(i >= n, 2 * n - 1 - i, i)


@lru_cache(maxsize=16)
def gaussian_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) float32 matrix of a 1-D Gaussian filter with scipy's "reflect" border (d c b a | a b c d)."""
    k = gaussian_kernel(sigma)
    src = reflect_index(n, len(k) // 2)
    m = np.zeros((n, n), dtype=np.float64)
    for i in range(n):
        np.add.at(m[i], src[i:i + len(k)], k)
    return m.astype(np.float32)


@lru_cache(maxsize=16)
def _upsample_matrices(grid: tuple[int, int], size: tuple[int, int], sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """Left and right matrices of upsample-then-smooth: map = L @ grid @ R."""
    ly = linear_weights(grid[0], size[0], antialias=False).astype(np.float32)
    lx = linear_weights(grid[1], size[1], antialias=False).astype(np.float32)
    if sigma > 0:
        ly = gaussian_matrix(size[0], float(sigma)) @ ly
        lx = gaussian_matrix(size[1], float(sigma)) @ lx
    return ly, np.ascontiguousarray(lx.T)


def score_map(patch_scores: np.ndarray, size: tuple[int, int], sigma: float) -> np.ndarray:
    """The (h, w) grid of patch distances upsampled bilinearly to ``size`` and smoothed (sigma in pixels)."""
    left, right = _upsample_matrices(tuple(patch_scores.shape), tuple(size), float(sigma))
    return (left @ patch_scores.astype(np.float32) @ right).astype(np.float32)
