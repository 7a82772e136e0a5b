"""What follows the nearest-neighbour search, in numpy alone: the image score (the paper's Eq. 7) and the map.

The one home of the scoring after the network: the estimator (:class:`patchcore.PatchCore`), the torch-free
runtime and both of its paths call :func:`score_patches`. The map is the grid of patch distances upsampled
bilinearly (``align_corners=False``) to the network input and smoothed with a Gaussian as
``scipy.ndimage.gaussian_filter`` does it (mode "reflect", truncate 4), both as small matrix products built
once per size, then put back onto the image by :meth:`patchcore.core.geometry.Preprocessing.to_image`.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

from .geometry import Preprocessing, linear_weights
from .tiling import Assembled, Tile

Support = Callable[[int], np.ndarray]
"""support(m) -> N_b(m) of Eq. 7: bank feature m first, then its b - 1 nearest other bank features."""


def support_order(index: int, found: np.ndarray) -> np.ndarray:
    """N_b(m*) from the b nearest bank features of m* = ``index``: m* first, then the others in order.
    With exact duplicates in the bank the search may not list m* itself; it is put first all the same."""
    if index not in found:
        return np.concatenate([[index], found[:-1]])
    return np.concatenate([[index], found[found != index]])


def eq7_weight(dist_to_support: np.ndarray) -> float:
    """The weight of the paper's Eq. 7 from the distances of m_test* to N_b(m*), m* first:
    1 - exp(d_0) / sum_j exp(d_j), computed as a stable softmax in float64."""
    d = np.asarray(dist_to_support, dtype=np.float64)
    e = np.exp(d - d.max())
    return float(1.0 - e[0] / e.sum())


def image_score(bank: np.ndarray, patch: np.ndarray, patch_score: float, nn_index: int, support: Support | None,
                num_neighbors: int) -> float:
    """The image score of Eq. 7: s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * s*.

    ``patch`` is m_test* (the test patch with the largest score s*), ``nn_index`` its nearest bank feature m*;
    N_b(m*) (``support(m*)``) are the b nearest bank features of m*, m* itself included (so the fraction is at
    most 1). When m* sits in a dense part of the bank the weight is about 1 - 1/b; when m* is itself a rare
    nominal feature (its neighbours are far away) the weight approaches 1, so such patches are scored higher,
    relatively. With b = 1 the weight would always be 0, so b = 1 (or no support) means "no reweighting".
    """
    if num_neighbors <= 1 or support is None:
        return float(patch_score)
    nb = bank[support(int(nn_index))]
    dist = np.linalg.norm(nb.astype(np.float64) - patch.astype(np.float64), axis=1)
    return eq7_weight(dist) * float(patch_score)


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
    ly, lx = linear_weights(grid[0], size[0], False), linear_weights(grid[1], size[1], False)
    if sigma > 0:
        ly = gaussian_matrix(size[0], float(sigma)) @ ly
        lx = gaussian_matrix(size[1], float(sigma)) @ lx
    return ly, np.ascontiguousarray(lx.T)


def score_map(patch_scores: np.ndarray, size: tuple[int, int], sigma: float) -> np.ndarray:
    """The (h, w) grid of patch distances upsampled bilinearly to ``size`` and smoothed (sigma in pixels)."""
    left, right = _upsample_matrices(tuple(patch_scores.shape), tuple(size), float(sigma))
    return (left @ patch_scores.astype(np.float32) @ right).astype(np.float32)


def score_assembled(acc: Assembled, bank: np.ndarray, support: Support | None, num_neighbors: int,
                    preprocessing: Preprocessing, sigma: float, image_size: tuple[int, int]
                    ) -> tuple[float, np.ndarray]:
    """One image's (score, anomaly map at ``image_size``) from its assembled grid of distances: Eq. 7 on the
    patch with the largest distance among those on the image (not on a mirrored margin, see
    :meth:`Preprocessing.cells`), and the smoothed map put back onto the image."""
    j = acc.best_j
    score = image_score(bank, acc.best_patch, acc.best_dist, int(acc.nn.flat[j]), support, num_neighbors)
    amap = score_map(acc.dist, preprocessing.input_size, sigma)
    return score, preprocessing.to_image(amap, image_size)


def score_patches(dist: np.ndarray, nn: np.ndarray, patches: np.ndarray, bank: np.ndarray, support: Support | None,
                  num_neighbors: int, grid: tuple[int, int], preprocessing: Preprocessing, sigma: float,
                  image_size: tuple[int, int]) -> tuple[float, np.ndarray]:
    """:func:`score_assembled` for a whole grid at once: ``dist`` and ``nn`` (h * w each, row-major over
    ``grid``) and the patch features ``patches`` (h * w, D)."""
    h, w = grid
    whole = (slice(0, h), slice(0, w))
    acc = Assembled(grid, preprocessing.cells(grid, image_size))
    acc.add(Tile((0, 0, 0, 0), whole, whole), dist, nn, patches, grid)
    return score_assembled(acc, bank, support, num_neighbors, preprocessing, sigma, image_size)
