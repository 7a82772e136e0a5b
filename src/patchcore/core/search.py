"""Exact nearest-neighbour search over a memory bank that visits only the cells that can hold the answer.

Brute force compares every patch with every bank feature: for the default bottle model, 1,024 patches x
21,401 features x 152 dims per image, most of the time per image on a CPU. The bank is split into k-means
cells once; each cell keeps its centroid ``c`` and radius ``r`` (its farthest member). A query ``q`` is
first compared with the members of its nearest cell, which gives a distance ``d`` it cannot do worse than;
by the triangle inequality a cell holds a closer member only if ``|q - c| - r < d``, and only those cells
are then visited. The answer is the brute-force answer (up to float rounding and exact ties); measured on
bottle, a query visits about a tenth of the bank.
"""

from __future__ import annotations

import numpy as np

from .threads import one_blas_thread

# Queries a cell is compared with in one block (see CellSearch._scan).
SCAN_ROWS = 1024

# Below this many features brute force is as fast as anything, so the bank stays one cell.
MIN_CLUSTERED = 4096


def default_cells(n: int) -> int:
    """Cells for a bank of n features: ~2 sqrt(n) members each (measured on bottle, docs/benchmarks.md)."""
    return 1 if n < MIN_CLUSTERED else int(round(np.sqrt(n) / 2))


def _radii(points: np.ndarray, centroids: np.ndarray, cell: np.ndarray) -> np.ndarray:
    """Each cell's radius: the distance from its centroid to its farthest member (``cell``: each point's)."""
    spread = np.linalg.norm(points.astype(np.float64) - centroids[cell], axis=1)
    radius = np.zeros(len(centroids))
    np.maximum.at(radius, cell, spread)
    return radius


class CellSearch:
    """Exact 1-nearest-neighbour search over ``bank`` (K, D), pruned by k-means cells (see the module)."""

    def __init__(self, bank: np.ndarray, cells: int | None = None, seed: int = 0) -> None:
        bank = np.ascontiguousarray(bank, dtype=np.float32)
        k, d = bank.shape
        n_cells = max(1, min(default_cells(k) if cells is None else int(cells), k))
        if n_cells > 1:
            import faiss  # only to build; searching is numpy (the torch-free runtime searches with this class)

            km = faiss.Kmeans(d, n_cells, niter=20, seed=seed, max_points_per_centroid=256, verbose=False)
            km.train(bank)
            labels = km.index.search(bank, 1)[1][:, 0]
            centroids = km.centroids.astype(np.float32)
        else:
            labels = np.zeros(k, dtype=np.int64)
            centroids = bank.mean(0, keepdims=True)
        order = np.argsort(labels, kind="stable")
        self.ids = order.astype(np.int64)  # position in the sorted bank -> index in the caller's bank
        self.points = np.ascontiguousarray(bank[order])
        self.sq = (self.points.astype(np.float64) ** 2).sum(1).astype(np.float32)
        counts = np.bincount(labels, minlength=n_cells)
        keep = counts > 0  # k-means can leave a cell empty
        self.starts = np.concatenate([[0], np.cumsum(counts[keep])]).astype(np.int64)
        self.centroids = np.ascontiguousarray(centroids[keep], dtype=np.float64)
        lab_sorted = labels[order]
        remap = np.cumsum(keep) - 1
        self.radius = _radii(self.points, self.centroids, remap[lab_sorted])
        self.max_sq = float(self.sq.max())

    def __len__(self) -> int:
        return len(self.ids)

    def to_arrays(self) -> dict[str, np.ndarray]:
        """The cells as plain arrays (an export stores them; :meth:`from_arrays` reads them back)."""
        return {"cell_order": self.ids, "cell_starts": self.starts, "cell_centroids": self.centroids,
                "cell_radius": self.radius}

    @classmethod
    def from_arrays(cls, bank: np.ndarray, arrays: dict[str, np.ndarray]) -> CellSearch:
        """Rebuild the search over ``bank`` (in its original order) from :meth:`to_arrays`' output."""
        self = cls.__new__(cls)
        self.ids = np.asarray(arrays["cell_order"], dtype=np.int64)
        self.points = np.ascontiguousarray(np.asarray(bank, dtype=np.float32)[self.ids])
        self.sq = (self.points.astype(np.float64) ** 2).sum(1).astype(np.float32)
        self.starts = np.asarray(arrays["cell_starts"], dtype=np.int64)
        self.centroids = np.asarray(arrays["cell_centroids"], dtype=np.float64)
        self.radius = np.asarray(arrays["cell_radius"], dtype=np.float64)
        self.max_sq = float(self.sq.max())
        if self.starts[-1] != len(self.ids) or len(self.starts) != len(self.centroids) + 1:
            raise ValueError("cell arrays do not match the bank")
        return self

    def subset(self, keep: np.ndarray) -> CellSearch:
        """The search over ``bank[keep]`` (answers index that subset), in these cells without k-means again: an
        update's calibration searches the new features less one fold's, once a fold. Each cell's radius is
        recomputed over the members it keeps, so the pruning is as tight as a fresh build's."""
        keep = np.asarray(keep, dtype=bool)
        if keep.shape != (len(self),):
            raise ValueError(f"keep must be a mask over the bank's {len(self)} features, got shape {keep.shape}")
        if not keep.any():
            raise ValueError("keep selects no feature")
        kept = keep[self.ids]  # in the sorted order of the points
        cell_of = np.repeat(np.arange(self.n_cells), np.diff(self.starts))[kept]
        counts = np.bincount(cell_of, minlength=self.n_cells)
        nonempty = counts > 0
        sub = CellSearch.__new__(CellSearch)
        sub.ids = (np.cumsum(keep) - 1)[self.ids[kept]].astype(np.int64)
        sub.points = np.ascontiguousarray(self.points[kept])
        sub.sq = np.ascontiguousarray(self.sq[kept])
        sub.starts = np.concatenate([[0], np.cumsum(counts[nonempty])]).astype(np.int64)
        sub.centroids = np.ascontiguousarray(self.centroids[nonempty])
        sub.radius = _radii(sub.points, sub.centroids, (np.cumsum(nonempty) - 1)[cell_of])
        sub.max_sq = float(sub.sq.max())
        return sub

    @property
    def n_cells(self) -> int:
        return len(self.centroids)

    def _scan(self, cell: int, sel: np.ndarray, q: np.ndarray, qsq: np.ndarray,
              best: np.ndarray, where: np.ndarray) -> None:
        lo, hi = self.starts[cell], self.starts[cell + 1]
        if len(sel) > SCAN_ROWS:  # a (queries x members) block that stays in cache: the passes below are
            for k in range(0, len(sel), SCAN_ROWS):  # memory-bound (a 31k-patch screw batch ran 2.2x slower)
                self._scan(cell, sel[k:k + SCAN_ROWS], q, qsq, best, where)
            return
        # In place, and |q|^2 (the same for a query's every candidate) added to the winners only: the product
        # is cheap at 152 dims, so each extra pass over the (queries x members) block costs about as much as
        # it does (1.8x faster on KolektorSDD, where almost every cell must be visited).
        d2 = q[sel] @ self.points[lo:hi].T
        d2 *= -2.0
        d2 += self.sq[None, lo:hi]
        j = d2.argmin(1)
        v = d2[np.arange(len(sel)), j] + qsq[sel]
        better = v < best[sel]
        best[sel[better]] = v[better]
        where[sel[better]] = lo + j[better]

    def nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        """Distance (not squared) and bank index of each query's nearest feature, and the share of the
        bank's features that were compared (1.0 for brute force)."""
        with one_blas_thread:
            return self._nearest(queries)

    def _nearest(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        q = np.ascontiguousarray(queries, dtype=np.float32)
        n = len(q)
        qsq = (q.astype(np.float64) ** 2).sum(1)
        c = self.centroids
        dqc = np.sqrt(np.maximum(qsq[:, None] - 2.0 * (q.astype(np.float64) @ c.T) + (c ** 2).sum(1)[None], 0.0))
        qsq = qsq.astype(np.float32)
        best = np.full(n, np.inf, dtype=np.float32)
        where = np.zeros(n, dtype=np.int64)
        first = dqc.argmin(1)
        order = np.argsort(first, kind="stable")
        bounds = np.searchsorted(first[order], np.arange(self.n_cells + 1))
        sizes = np.diff(self.starts)
        compared = 0
        for cell in range(self.n_cells):
            sel = order[bounds[cell]:bounds[cell + 1]]
            if len(sel):
                self._scan(cell, sel, q, qsq, best, where)
                compared += len(sel) * sizes[cell]
        # Float32 distances carry rounding of about 1e-6 of |q|^2 + |m|^2; widening the bound by a few times
        # that keeps every cell that could hold a closer member by the computed distances.
        slack = np.sqrt(8e-6 * (qsq.astype(np.float64) + self.max_sq)) + 1e-4 * np.sqrt(np.maximum(best, 0.0))
        need = (dqc - self.radius[None]) < (np.sqrt(np.maximum(best, 0.0)) + slack)[:, None]
        need[np.arange(n), first] = False
        for cell in np.flatnonzero(need.any(0)):
            sel = np.flatnonzero(need[:, cell])
            self._scan(cell, sel, q, qsq, best, where)
            compared += len(sel) * sizes[cell]
        # The expansion |q|^2 - 2 q.m + |m|^2 loses precision when q is close to m; the winners' distances
        # are computed directly.
        dist = np.sqrt(((q - self.points[where]) ** 2).sum(1, dtype=np.float64)).astype(np.float32)
        return dist, self.ids[where], compared / max(n * len(self), 1)
