"""Anomaly scores from a memory bank: nearest-neighbour patch distances, the paper's Eq. 7, smoothed maps."""

from __future__ import annotations

import faiss
import numpy as np
import torch
from scipy.ndimage import gaussian_filter

from .postprocess import eq7_weight
from .search import CellSearch, default_cells


def support_order(index: int, found: np.ndarray) -> np.ndarray:
    """N_b(m*) from the b nearest bank features of m* = ``index``: m* first, then the others in order.
    With exact duplicates in the bank the search may not list m* itself; it is put first all the same."""
    if index not in found:
        return np.concatenate([[index], found[:-1]])
    return np.concatenate([[index], found[found != index]])


class MemoryBank:
    """Exact L2 nearest-neighbour search over the bank: faiss IndexFlatL2 for k neighbours, and the cell-pruned
    exact search of :mod:`patchcore.search` for the one nearest neighbour of every patch."""

    def __init__(self, bank: np.ndarray, cells: int | None = None) -> None:
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.index = faiss.IndexFlatL2(self.bank.shape[1])
        self.index.add(self.bank)
        # Even a one-cell bank searches with CellSearch: it computes each winner's distance directly, so a
        # patch's distance does not depend on which other images shared its batch (a BLAS product's
        # rounding does), and a pool of workers writes the same maps as one process.
        self._cells = CellSearch(self.bank, cells or default_cells(len(self.bank)))
        self._support: dict[tuple[int, int], np.ndarray] = {}

    def cells(self) -> CellSearch:
        """The cell-pruned search over this bank (one cell for a small bank: then it is brute force)."""
        return self._cells

    def __len__(self) -> int:
        return self.bank.shape[0]

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distances (not squared) and indices of the k nearest bank features, shape (Q, k)."""
        d2, idx = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return np.sqrt(np.maximum(d2, 0.0)), idx

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Distance and index of each query's nearest bank feature, shape (Q,): the same answer as
        ``search(queries, 1)`` (up to float rounding), comparing each query with a fraction of the bank."""
        d, i, _ = self._cells.nearest(queries)
        return d, i

    def support(self, index: int, b: int) -> np.ndarray:
        """N_b of Eq. 7 for bank feature ``index``: itself first, then its b - 1 nearest other bank features.
        Cached: a line scores the same few bank features' neighbourhoods again and again."""
        key = (int(index), int(b))
        found = self._support.get(key)  # a local, so a concurrent clear() cannot lose it
        if found is None:
            _, found = self.search(self.bank[index][None], b)
            found = support_order(index, found[0])
            if len(self._support) > 65536:
                self._support.clear()
            self._support[key] = found
        return found


def reweighted_score(bank: MemoryBank, patch: np.ndarray, patch_score: float, nn_index: int,
                     num_neighbors: int) -> float:
    """The image score of Eq. 7: s = (1 - exp||m_test* - m*|| / sum_{m in N_b(m*)} exp||m_test* - m||) * s*.

    ``patch`` is m_test* (the test patch with the largest score s*), ``nn_index`` its nearest bank feature m*;
    N_b(m*) are the b nearest bank features of m*, m* itself included (so the fraction is at most 1). When m*
    sits in a dense part of the bank the weight is about 1 - 1/b; when m* is itself a rare nominal feature
    (its neighbours are far away) the weight approaches 1, so such patches are scored higher, relatively.
    With b = 1 the weight would always be 0, so b = 1 means "no reweighting": s = s*.
    """
    if num_neighbors <= 1:
        return float(patch_score)
    support = bank.support(nn_index, min(num_neighbors, len(bank)))
    dist = np.linalg.norm(bank.bank[support].astype(np.float64) - patch.astype(np.float64), axis=1)
    return eq7_weight(dist) * float(patch_score)


def smooth(amap: np.ndarray | torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of a score map at network input resolution (sigma 4 px in the paper)."""
    a = amap.numpy() if isinstance(amap, torch.Tensor) else np.asarray(amap)
    if sigma > 0:
        a = gaussian_filter(a.astype(np.float32), sigma=sigma)
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
