"""The memory bank as the estimator searches it: exact nearest neighbours with faiss and the cell search.

What is done with the distances (Eq. 7, the map) is :mod:`patchcore.core.scoring`'s, shared with the runtime.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import faiss
import numpy as np

from .core.scoring import support_order
from .core.search import CellSearch, default_cells


class MemoryBank:
    """Exact L2 nearest-neighbour search over the bank: faiss IndexFlatL2 for k neighbours, and the cell-pruned
    exact search of :mod:`patchcore.core.search` for the one nearest neighbour of every patch."""

    def __init__(self, bank: np.ndarray, cells: int | None = None) -> None:
        self.bank = np.ascontiguousarray(bank, dtype=np.float32)
        self.index = faiss.IndexFlatL2(self.bank.shape[1])
        self.index.add(self.bank)
        # Even a one-cell bank searches with CellSearch: it computes each winner's distance directly, so a
        # patch's distance does not depend on which other images shared its batch (a BLAS product's
        # rounding does), and a pool of workers writes the same maps as one process. Built on the first
        # search, not here: a bank made only for Eq. 7's neighbours (an update's calibration) never needs it.
        self._n_cells = cells
        self._cells: CellSearch | None = None
        self._cells_lock = threading.Lock()
        self._support: dict[tuple[int, int], np.ndarray] = {}

    def cells(self) -> CellSearch:
        """The cell-pruned search over this bank (one cell for a small bank: then it is brute force)."""
        found = self._cells
        if found is None:
            with self._cells_lock:  # scorer threads may search a fresh bank at once: build it once
                if self._cells is None:
                    self._cells = CellSearch(self.bank, self._n_cells or default_cells(len(self.bank)))
                found = self._cells
        return found

    def __len__(self) -> int:
        return self.bank.shape[0]

    def search(self, queries: np.ndarray, k: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Euclidean distances (not squared) and indices of the k nearest bank features, shape (Q, k)."""
        d2, idx = self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
        return np.sqrt(np.maximum(d2, 0.0)), idx

    def nearest(self, queries: np.ndarray, n_jobs: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Distance and index of each query's nearest bank feature, shape (Q,): the same answer as
        ``search(queries, 1)`` (up to float rounding), comparing each query with a fraction of the bank.
        ``n_jobs`` > 1 searches chunks of at least 2,048 queries in that many threads (the search runs BLAS on
        one thread each: see :mod:`patchcore.core.search`), for a batch of images or an update."""
        n = len(queries)
        jobs = max(1, min(int(n_jobs), n // 2048))
        if jobs <= 1:
            d, i, _ = self.cells().nearest(queries)
            return d, i
        chunk = min(16384, -(-n // jobs))  # at most 16,384: the search holds a (chunk x cells) table
        parts = [queries[k:k + chunk] for k in range(0, n, chunk)]
        with ThreadPoolExecutor(jobs) as pool:
            found = list(pool.map(self.cells().nearest, parts))
        return np.concatenate([d for d, _, _ in found]), np.concatenate([i for _, i, _ in found])

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

    def support_of(self, b: int):
        """``support`` with b fixed: the callable :func:`patchcore.core.scoring.image_score` takes."""
        b = min(int(b), len(self))
        return lambda index: self.support(index, b)

    def support_table(self, b: int) -> np.ndarray:
        """(K, b) int64: every bank feature's N_b at once (an export stores it for the runtime)."""
        b = min(int(b), len(self))
        _, nn_idx = self.search(self.bank, b)
        return np.stack([support_order(i, row) for i, row in enumerate(nn_idx)]).astype(np.int64)
