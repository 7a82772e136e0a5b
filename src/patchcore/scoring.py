"""Anomaly scores from a memory bank: nearest-neighbour patch distances, the paper's Eq. 7, smoothed maps."""

from __future__ import annotations

import faiss
import numpy as np
import torch
from scipy.ndimage import gaussian_filter


class MemoryBank:
    """Exact L2 nearest-neighbour search over the bank (faiss IndexFlatL2)."""

    def __init__(self, bank: np.ndarray) -> None:
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.index = faiss.IndexFlatL2(self.bank.shape[1])
        self.index.add(self.bank)

    def __len__(self) -> int:
        return self.bank.shape[0]

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distances (not squared) and indices of the k nearest bank features, shape (Q, k)."""
        d2, idx = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return np.sqrt(np.maximum(d2, 0.0)), idx


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
    b = min(num_neighbors, len(bank))
    _, support = bank.search(bank.bank[nn_index][None], b)
    support = support[0]
    if nn_index not in support:  # exact duplicates in the bank: make sure m* itself leads
        support = np.concatenate([[nn_index], support[:-1]])
    else:
        support = np.concatenate([[nn_index], support[support != nn_index]])
    dist = np.linalg.norm(bank.bank[support].astype(np.float64) - patch.astype(np.float64), axis=1)
    # softmax of the distances, computed stably; its first entry is the fraction in Eq. 7
    e = np.exp(dist - dist.max())
    weight = 1.0 - e[0] / e.sum()
    return float(weight * patch_score)


def smooth(amap: np.ndarray | torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian smoothing of a score map at network input resolution (sigma 4 px in the paper)."""
    a = amap.numpy() if isinstance(amap, torch.Tensor) else np.asarray(amap)
    if sigma > 0:
        a = gaussian_filter(a.astype(np.float32), sigma=sigma)
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
