"""Greedy k-center coreset selection (the paper's Alg. 1) on a random projection, exact and fast.

The textbook loop costs one pass over all N points per selected centre; up to PLAIN_MAX points those passes
stay in the CPU cache and the loop is fast. Above, :func:`lazy_greedy` computes the very same selection while
skipping most of the distances (see below).

Exact greedy still costs N x (ratio N) distance evaluations: quadratic in the data. A large product (800
images, 819k features) took 38 minutes for the selection alone. :func:`cell_coreset` makes it about linear
and stays close to the exact selection: the points are split into k-means cells of the (projected) feature
space and the greedy loop runs in each cell on its own, all cells lowering one shared coverage radius
together, so a cell holding rare, spread-out features gets as many centres as it needs and a dense cell
few. Greedy over independent pieces is the exact greedy selection wherever a point's nearest centre lies
in its own cell; only near cell borders does it choose a little more than needed (measured on screw x 800,
819k features: coverage radius 15.3 vs 14.55 exact; 63 s on 2 cores for the model's and the 5 calibration
folds' selections, against 38 min for one exact selection; docs/scaling.md). With the exchange of
centres between cells (``centroids=``), each cell also hears of its neighbours' centres and checks a point
against them before making it a centre, which brings the radius to within 0.3 % of the exact selection's
(14.59 vs 14.55) for about twice the selection time.
The cells' loops need only the shared radius from each other, so they can run anywhere (:class:`CellGroup`,
the ``runner`` of :func:`cell_coreset`; :mod:`patchcore.distributed` runs them on Ray workers).
:func:`lazy_greedy` computes the exact selection itself in about linear time: the same cells, but each is
brought up to date against the new centres only when it may hold the farthest point (screw x 800: 42 s on
one core instead of 38 min, the same points); it is sequential, so it runs where the features are.
:func:`shard_coresets` instead splits by whole images: each shard's coreset is selected on its own and the
bank is their union, whose radius is the largest shard radius, but each shard spends budget on what every
shard has (radius 19.9 on screw x 800; ``shard_by="images"``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import faiss
import numpy as np
import torch

Progress = Callable[[int, int], None]

# Up to this many points the plain loop's pass over them stays in the CPU cache and beats the pruning
# (measured: 25.6k x 128 points at 10 %: plain 1.7 s, pruned 2.7 s; at 51k: plain 15 s, pruned 8 s).
PLAIN_MAX = 40_000


def random_projection(features: torch.Tensor, dim: int = 128, seed: int = 0, chunk: int = 65536) -> torch.Tensor:
    """Project (N, D) features to (N, dim) with a seeded Gaussian matrix (Johnson-Lindenstrauss).

    Features no wider than ``dim`` are returned as float32 unchanged. Done in chunks so float16 banks are
    never copied whole to float32.
    """
    n, d = features.shape
    if d <= dim:
        return features.float()
    g = torch.Generator().manual_seed(seed)
    proj = torch.randn(d, dim, generator=g) / dim ** 0.5
    return torch.cat([features[i:i + chunk].float() @ proj for i in range(0, n, chunk)])


def greedy_coreset(z: torch.Tensor, n: int, seed: int = 0, progress: Progress | None = None,
                   method: str = "auto", initial: torch.Tensor | None = None,
                   return_radius: bool = False) -> torch.Tensor | tuple[torch.Tensor, float]:
    """Indices of ``n`` points of ``z`` (N, d) chosen by greedy k-center, starting from a seeded random point.

    Each step adds the point farthest from the current selection. ``method``: "plain" (the textbook loop),
    "lazy" (:func:`lazy_greedy`, the same selection computed lazily in k-means cells) or "auto" (plain up to
    PLAIN_MAX points, where its passes stay in the CPU cache, lazy above); all give the same selection.
    ``initial``: each point's distance to centres chosen before, elsewhere (a fitted bank that new points
    join); the selection then continues from them instead of starting at a random point.
    ``return_radius``: also return the selection radius, the distance of the last centre chosen from those
    chosen before it (and from ``initial``'s): every point lies at most that far from the selection.
    """
    z = z.float().contiguous()
    N = len(z)
    if not 1 <= n <= N:
        raise ValueError(f"coreset size must be between 1 and {N}, got {n}")
    if method not in ("auto", "plain", "lazy"):
        raise ValueError(f"method must be auto, plain or lazy, got {method!r}")
    if initial is not None:
        _check_initial(initial, N)
    if method == "plain" or (method == "auto" and N <= PLAIN_MAX):
        return _plain_greedy(z, n, _seeded_start(N, seed), progress, initial, return_radius)
    return lazy_greedy(z, n, seed, progress, initial=initial, return_radius=return_radius)


def _check_initial(initial: torch.Tensor, n: int) -> None:
    if initial.shape != (n,):
        raise ValueError(f"initial must hold one distance per point ({n}), got shape {tuple(initial.shape)}")


def _seeded_start(n: int, seed: int) -> int:
    """The greedy loop's first centre among ``n`` points, drawn by ``seed``."""
    return int(torch.randint(n, (1,), generator=torch.Generator().manual_seed(seed)))


def _plain_greedy(z: torch.Tensor, n: int, start: int, progress: Progress | None,
                  initial: torch.Tensor | None = None,
                  return_radius: bool = False) -> torch.Tensor | tuple[torch.Tensor, float]:
    """The textbook loop, one pass over all points per selected centre: one :class:`_Cell` run to n centres."""
    loop = _Cell(z, start, initial)
    step = max(1, n // 100)
    while len(loop.chosen) < n:
        loop.run(float("-inf"), limit=min(n, len(loop.chosen) + step))
        if progress is not None:
            progress(len(loop.chosen), n)
    picks = torch.tensor(loop.chosen, dtype=torch.long)
    return (picks, float(loop.dist[-1])) if return_radius else picks


def cover(z: torch.Tensor, radius: float, initial: torch.Tensor) -> torch.Tensor:
    """Indices of the points of ``z`` (N, d) that join a selection made elsewhere (``initial``: each point's
    distance to it) by the greedy rule continued until no point lies farther than ``radius`` from the
    selection: the farthest point first, as many as that takes (none if all lie within ``radius``). The exact
    continued selection: the plain loop up to PLAIN_MAX points, :func:`lazy_greedy` above."""
    z = z.float().contiguous()
    _check_initial(initial, len(z))
    if not len(z) or float(initial.max()) <= radius:
        return torch.zeros(0, dtype=torch.long)
    if len(z) > PLAIN_MAX:
        return lazy_greedy(z, len(z), initial=initial, until=radius)
    loop = _Cell(z, 0, initial)
    loop.run(radius)
    return torch.tensor(loop.chosen, dtype=torch.long)


def coreset_size(n: int, ratio: float) -> int:
    """How many of ``n`` features a coreset of ``ratio`` keeps (at least one; all from ratio 1 on)."""
    return n if ratio >= 1.0 else max(1, int(n * ratio))


def select(features: torch.Tensor, ratio: float, dim: int = 128, seed: int = 0,
           progress: Progress | None = None) -> torch.Tensor:
    """Indices of the greedy coreset of ``ratio`` of ``features`` (N, D), selected on their seeded random
    projection to ``dim``: the paper's selection of one memory bank."""
    n_keep = coreset_size(len(features), ratio)
    if n_keep >= len(features):
        return torch.arange(len(features))
    return greedy_coreset(random_projection(features, dim, seed), n_keep, seed=seed, progress=progress)


def shard_coresets(shards: Sequence[torch.Tensor], ratio: float, dim: int = 128, seed: int = 0,
                   n_jobs: int | None = None, progress: Progress | None = None) -> list[torch.Tensor]:
    """:func:`select` on each shard of features on its own (shard i seeded ``seed + i``, so one shard is
    exactly :func:`select`): each shard's indices into that shard. Runs ``n_jobs`` shards at a time (default:
    one per CPU), each on one thread, since the loop's small steps do not gain from more."""
    jobs = max(1, min(len(shards), n_jobs or os.cpu_count() or 1))
    done = [0]

    def one(i: int) -> torch.Tensor:
        out = select(shards[i], ratio, dim, seed=seed + i)
        done[0] += 1
        if progress is not None:
            progress(done[0], len(shards))
        return out

    if jobs == 1:
        return [one(i) for i in range(len(shards))]
    threads, omp = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    try:
        with ThreadPoolExecutor(jobs) as pool:
            return list(pool.map(one, range(len(shards))))
    finally:
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(omp)


def kmeans_cells(z: torch.Tensor, n_cells: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The k-means cell (0 .. n_cells - 1) of each point of ``z`` (N, d), trained on a seeded sample, and
    the cells' centroids (n_cells, d). Each point lies in its nearest centroid's cell."""
    x = np.ascontiguousarray(z.numpy(), dtype=np.float32)
    if n_cells <= 1:
        return np.zeros(len(x), dtype=np.int64), x.mean(0, keepdims=True)
    km = faiss.Kmeans(x.shape[1], int(n_cells), niter=20, seed=seed, max_points_per_centroid=256, verbose=False)
    km.train(x)
    return km.index.search(x, 1)[1][:, 0].astype(np.int64), km.centroids.copy()


class _Heard:
    """The centres of other cells that one cell has heard of (only those that may reach its points), in the
    order heard, and for each of the cell's points how many rounds of them it has been checked against.

    A cell checks a point against them only when the point is about to become a centre, i.e. lies farther
    than the radius from the cell's own centres: most points never get that far, so this costs a fraction of
    telling every point of every cell about every centre (screw, 320 images, 5 % steps: 5.6 s instead of
    44 s; docs/scaling.md, section 4)."""

    BATCH = 256  # points checked at once: one matrix product instead of many small ones

    def __init__(self, n_points: int, dim: int) -> None:
        self.c, self.sq, self.reach = torch.empty(0, dim), torch.empty(0), torch.empty(0)
        self.n = 0
        self.starts = [0]  # starts[r]: the first centre heard in round r
        self.seen = torch.zeros(n_points, dtype=torch.long)  # point i has been checked against rounds < seen[i]

    def add(self, c: torch.Tensor, reach: torch.Tensor) -> None:
        """Hear centres ``c`` (m, d), each no nearer than ``reach`` to any point of the cell; ends a round."""
        m = self.n + len(c)
        if m > len(self.c):  # grow by doubling: the centres heard add up to a few times the cell's centres
            cap = max(m, 2 * len(self.c), 256)
            for name in ("c", "sq", "reach"):
                old = getattr(self, name)
                new = old.new_empty((cap, *old.shape[1:]))
                new[:self.n] = old[:self.n]
                setattr(self, name, new)
        self.c[self.n:m] = c
        self.sq[self.n:m] = (c * c).sum(1)
        self.reach[self.n:m] = reach
        self.n = m
        self.starts.append(m)

    def stale(self, i: int) -> bool:
        return self.starts[int(self.seen[i])] < self.n

    def check(self, cell: _Cell, radius: float) -> None:
        """Lower the distances of the cell's farthest unchecked points (those beyond ``radius``, the next
        one among them) by the centres heard since each was last checked."""
        r2 = radius * radius if radius >= 0 else -1.0
        todo = torch.nonzero((cell.mind > r2) & (self.seen < len(self.starts) - 1))[:, 0]
        if not bool((todo == cell.next).any()):  # rounding can leave the next point a hair inside radius
            todo = torch.cat([todo, torch.tensor([cell.next])])
        if len(todo) > self.BATCH:
            todo = todo[torch.topk(cell.mind[todo], self.BATCH).indices]
        start = self.starts[int(self.seen[todo].min())]
        self.seen[todo] = len(self.starts) - 1
        mind = cell.mind[todo]
        near = start + torch.nonzero(self.reach[start:self.n].square() < float(mind.max()))[:, 0]
        if len(near):
            c = self.c.index_select(0, near)
            d2 = torch.addmm(self.sq.index_select(0, near)[None], cell.z[todo], c.T, alpha=-2.0)
            cell.mind[todo] = torch.minimum(mind, d2.add_(cell.sq[todo][:, None]).amin(1))
        cell.next = int(cell.mind.argmax())
        cell.next_dist = math.sqrt(max(float(cell.mind[cell.next]), 0.0))


class _Cell:
    """The plain greedy loop over points ``z``, starting at ``start``, resumable, recording each centre's
    distance to the centres chosen before it (the coverage radius just before it was added)."""

    def __init__(self, z: torch.Tensor, start: int, initial: torch.Tensor | None = None) -> None:
        self.z = z.contiguous()
        self.sq = (self.z * self.z).sum(1)
        self.buf = torch.empty(len(z))
        if initial is None:
            self.mind = torch.full((len(z),), float("inf"))
            self.next, self.next_dist = start, float("inf")
        else:  # continuing a selection made elsewhere: the farthest point from it comes first
            self.mind = initial.float().square()
            self.next = int(self.mind.argmax())
            self.next_dist = float(initial[self.next])
        self.chosen: list[int] = []
        self.dist: list[float] = []
        self.heard: _Heard | None = None  # other cells' centres, when the cells exchange them

    def run(self, radius: float, limit: int | None = None) -> None:
        """Add centres until no point lies farther than ``radius`` from them (and from the other cells'
        centres heard of), or ``limit`` (default: every point) are chosen."""
        limit = len(self.z) if limit is None else min(limit, len(self.z))
        while (self.next_dist > radius or not self.chosen) and len(self.chosen) < limit:
            if self.heard is not None and self.chosen and self.heard.stale(self.next):
                self.heard.check(self, radius)  # it may lie near another cell's centre: not a centre then
                continue
            pos = self.next
            self.chosen.append(pos)
            self.dist.append(self.next_dist)
            # |x|^2 - 2 x.c in one pass; the minimum then takes |c|^2 (a scalar) into account
            torch.addmv(self.sq, self.z, self.z[pos], alpha=-2.0, out=self.buf)
            torch.minimum(self.mind, self.buf.add_(self.sq[pos]), out=self.mind)
            self.mind[pos] = float("-inf")  # rounding can leave a centre a hair away from itself
            self.next = int(self.mind.argmax())
            self.next_dist = math.sqrt(max(float(self.mind[self.next]), 0.0))


class CellGroup:
    """Cells whose greedy loops one worker runs (``n_jobs`` threads, one torch thread each): what
    :func:`cell_coreset` runs here, and what each Ray worker runs for :mod:`patchcore.distributed`. With
    ``exchange`` the cells also hear of the other cells' centres (:meth:`hear`)."""

    def __init__(self, cells: Sequence[tuple[torch.Tensor, int] | tuple[torch.Tensor, int, torch.Tensor | None]],
                 n_jobs: int | None = 1, exchange: bool = False) -> None:
        self.cells = [_Cell(*cell) for cell in cells]  # (points, start[, initial distances])
        self.jobs = max(1, min(len(self.cells), n_jobs or os.cpu_count() or 1))
        self.told = [0] * len(self.cells)
        if exchange:
            for c in self.cells:
                c.heard = _Heard(len(c.z), c.z.shape[1])

    def lower(self, radius: float) -> tuple[int, float]:
        """Run every cell down to ``radius``; returns the centres chosen in all, and the largest distance
        of a point to its cell's centres (0 once only duplicate points are left)."""
        todo = [c for c in self.cells if c.next_dist > radius or not c.chosen]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            if self.jobs == 1 or len(todo) < 2:
                for c in todo:
                    c.run(radius)
            else:
                with ThreadPoolExecutor(self.jobs) as pool:
                    list(pool.map(lambda c: c.run(radius), todo))
        finally:
            torch.set_num_threads(threads)
        return sum(len(c.chosen) for c in self.cells), max((c.next_dist for c in self.cells), default=0.0)

    def fresh(self) -> list[torch.Tensor]:
        """Each cell's centres (points, not indices) chosen since the previous call."""
        out = []
        for i, c in enumerate(self.cells):
            out.append(c.z[torch.tensor(c.chosen[self.told[i]:], dtype=torch.long)])
            self.told[i] = len(c.chosen)
        return out

    def hear(self, centres: torch.Tensor, reach: torch.Tensor) -> None:
        """Other cells' new ``centres`` (m, d); ``reach`` (m, cells) bounds each one's distance to each cell's
        points from below. A cell keeps those that may come nearer to a point than its largest gap."""
        for i, c in enumerate(self.cells):
            near = torch.nonzero(reach[:, i] < c.next_dist)[:, 0]
            c.heard.add(centres.index_select(0, near), reach[near, i])

    def picks(self) -> list[tuple[list[int], list[float]]]:
        """Each cell's centres (indices into the cell) and their selection distances, in choice order."""
        return [(list(c.chosen), list(c.dist)) for c in self.cells]


# Where cell_coreset's cells run: ``runner(cells, exchange)`` (each cell's points and first centre) returns an
# object with CellGroup's ``lower``, ``fresh``, ``hear`` and ``picks`` over those cells, in their order
# (patchcore.distributed: Ray workers).
CellRunner = Callable[[list[tuple[torch.Tensor, int]], bool], CellGroup]

# With the exchange, the shared radius falls by 2 % a step (instead of 5 %): cells choosing in the same step
# do not hear of each other's centres, so smaller steps spend less budget twice (screw, 320 images, 40
# cells: radius 14.61 with 5 % steps, 14.57 with 2 %, 14.55 with 1 %; exact 14.54).
EXCHANGE_STEP = 0.98


def _cell_members(labels: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """The cell ids of ``labels`` and each cell's point indices, in increasing order (one sort, not a pass
    over all labels per cell)."""
    order = np.argsort(labels, kind="stable")
    ids, starts = np.unique(labels[order], return_index=True)
    return ids, np.split(order, starts[1:])


def _cell_geometry(cells: Sequence[torch.Tensor], centroids: np.ndarray
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The cells' centroids (one row per cell), their distances to each other and :func:`_extents`: what
    :func:`_reach` bounds a centre's distance to a cell with."""
    mu = torch.from_numpy(np.asarray(centroids, dtype=np.float32))
    gap = torch.cdist(mu, mu).clamp_min(1e-12)
    return mu, gap, _extents(cells, mu, gap)


def _extents(cells: Sequence[torch.Tensor], mu: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
    """(cells, cells): how far each cell's points reach towards each other cell's centroid, as the largest
    projection of a point of cell a on the unit vector from centroid a to centroid b (``gap``: the
    centroids' distances)."""
    out = torch.empty(len(mu), len(mu))
    for a, z in enumerate(cells):
        proj = z @ mu.T  # p . mu_b for every point p of cell a and every centroid b
        out[a] = ((proj - proj[:, a:a + 1]) / gap[a]).amax(0)
    return out


def _reach(c: torch.Tensor, owner: torch.Tensor, mu: torch.Tensor, gap: torch.Tensor,
           extent: torch.Tensor) -> torch.Tensor:
    """(m, cells): a lower bound on the distance from centre c (of cell ``owner``) to any point of each cell a.
    With u the unit vector from centroid a to c's centroid b, every point p of a has u.p <= extent[a, b], so
    |c - p| >= u.c - extent[a, b]. (The bisector of the two centroids, which a k-means cell never crosses,
    would give a weaker bound: its offset instead of the cell's own extent.) Infinite for c's own cell."""
    cm = c @ mu.T  # c . mu_a
    reach = (cm.gather(1, owner[:, None]) - cm) / gap[owner] - extent.T[owner]
    reach[torch.arange(len(c)), owner] = float("inf")
    return reach


def cell_coreset(z: torch.Tensor, n: int, labels: np.ndarray, seed: int = 0, n_jobs: int | None = None,
                 progress: Progress | None = None, runner: CellRunner | None = None,
                 centroids: np.ndarray | None = None, initial: torch.Tensor | None = None,
                 return_radius: bool = False) -> torch.Tensor | tuple[torch.Tensor, float]:
    """Indices of ``n`` points of ``z`` (N, d) chosen by greedy k-center inside each cell of ``labels``
    (see the module): every cell runs its loop down to a shared radius, which is lowered in small steps
    until the cells hold ``n`` centres between them; the ``n`` centres chosen farthest from the others of
    their cell are kept (the order a single greedy loop over independent cells would choose them in).

    With the cells' k-means ``centroids`` (row c: the centroid of label c; each point in its nearest
    centroid's cell) the cells exchange centres: after every step each cell hears of the other cells' new
    centres that may reach it, and a point about to become a centre is checked against them first. Then
    budget is no longer spent twice near cell borders, and the coverage radius comes within a few tenths of
    a percent of the exact greedy selection's (screw x 800: 14.59 against 14.55 exact and 15.29 without;
    docs/scaling.md) for about twice the selection time.

    Cells run here, ``n_jobs`` at a time (threads), or where ``runner`` puts them (the selection is the
    same). Deterministic for a seed. ``initial``: as for :func:`greedy_coreset`, each point's distance to
    centres chosen before (a fitted bank that new points join; here, not with ``runner``). ``return_radius``:
    also return the selection distance of the last centre kept: about the distance within which the cells'
    centres cover every point (exactly so when no centre is cut off at the end)."""
    z = z.float().contiguous()
    if not 1 <= n <= len(z):
        raise ValueError(f"coreset size must be between 1 and {len(z)}, got {n}")
    ids, parts = _cell_members(labels)
    members = [torch.from_numpy(m) for m in parts]
    if len(members) > n:
        raise ValueError(f"{len(members)} cells cannot share {n} centres: use fewer cells")
    exchange = centroids is not None and len(members) > 1
    if initial is not None and (runner is not None or initial.shape != (len(z),)):
        raise ValueError("initial takes one distance per point, and the cells run here")
    cells = [(z.index_select(0, m), _seeded_start(len(m), seed + i)) for i, m in enumerate(members)]
    if initial is not None:
        cells = [(c, start, initial.index_select(0, m)) for (c, start), m in zip(cells, members)]
    group = CellGroup(cells, n_jobs, exchange) if runner is None else runner(cells, exchange)
    del cells
    if exchange:
        mu, gap_mu, extent = _cell_geometry([z.index_select(0, m) for m in members], np.asarray(centroids)[ids])

    def share() -> None:
        fresh = group.fresh()
        c = torch.cat(fresh)
        owner = torch.repeat_interleave(torch.arange(len(fresh)), torch.tensor([len(f) for f in fresh]))
        group.hear(c, _reach(c, owner, mu, gap_mu, extent))

    total, gap = group.lower(float("inf"))  # each cell's first centre; the radius starts at the largest gap
    radius, before = gap, None
    while total < n and gap > 0.0:  # else only duplicates are left
        if exchange:
            share()
            # 2 % steps; then, from half the goal on, steps aimed at 70 % of what is left, estimated from the
            # last step's growth: a step's overshoot past n is selection work thrown away
            f = EXCHANGE_STEP
            if before is not None and total >= 0.5 * n and total > before[1]:
                growth = max(1.0, math.log(total / before[1]) / math.log(before[0] / radius))
                f = min(0.999, max(EXCHANGE_STEP, (total / (total + 0.7 * (n - total))) ** (1.0 / growth)))
            before = (radius, total)
            radius *= f
        else:
            # 5 % steps, then 1 % near the goal: each step's overshoot is selection work thrown away
            radius *= 0.95 if total < 0.9 * n else 0.99
        total, gap = group.lower(radius)
        if progress is not None:
            progress(min(total, n), n)
    if total < n:  # only duplicates left: they all become centres
        group.lower(-1.0)
    picks = group.picks()
    idx = torch.cat([m[torch.tensor(chosen, dtype=torch.long)] for (chosen, _), m in zip(picks, members)])
    dist = torch.tensor([d for _, ds in picks for d in ds], dtype=torch.float64)
    keep = torch.argsort(-dist, stable=True)[:n]
    return (idx[keep], float(dist[keep[-1]])) if return_radius else idx[keep]


# Points per cell of the lazy exact selection: smaller cells skip more distances but cost more k-means and
# bookkeeping (screw x 800, 819k points: 256 cells 50 s, 512 cells 41 s, 1,024 cells 48 s).
LAZY_CELL = 1600


def lazy_greedy(z: torch.Tensor, n: int, seed: int = 0, progress: Progress | None = None,
                cell_size: int = LAZY_CELL, initial: torch.Tensor | None = None,
                return_radius: bool = False, until: float | None = None) -> torch.Tensor | tuple[torch.Tensor, float]:
    """Indices of ``n`` points of ``z`` (N, d) chosen by exact greedy k-center from the seeded start that
    :func:`greedy_coreset` uses: the same selection (up to float ties), computed lazily.

    The points are split into k-means cells of about ``cell_size`` points. Each cell keeps an upper bound of
    its points' distances to the selection (distances only fall), and each new centre is noted, with a lower
    bound on its distance to the cell (:func:`_reach`, and the cell's bounding ball), in every cell it might
    reach. The next centre is found in the cell with the largest bound: that cell is first brought up to date
    against the centres noted for it since its last update, in one matrix product, skipping those whose bound
    is now too far to matter; if it still holds the largest bound, its farthest point is the farthest point of
    all. Most cells are updated rarely, in large batches, against few centres: on screw x 800 (819k points,
    82k centres) it computes 8 % of the distances of the plain loop, in 42 s instead of 38 min, one core.
    ``initial``, ``return_radius``: as for :func:`greedy_coreset`. ``until``: stop early, before the first
    centre that would lie no farther than this from the others (:func:`cover`).
    """
    z = z.float().contiguous()
    N = len(z)
    if not 1 <= n <= N:
        raise ValueError(f"coreset size must be between 1 and {N}, got {n}")
    start = _seeded_start(N, seed)
    labels, centroids = kmeans_cells(z, max(1, min(n, N // max(1, int(cell_size)))), seed)
    ids, members = _cell_members(labels)
    K = len(members)
    zn = z.numpy()
    pts = [np.ascontiguousarray(zn[m]) for m in members]
    sq = [(p * p).sum(1) for p in pts]
    mu, gap_mu, extent = _cell_geometry([torch.from_numpy(p) for p in pts], np.asarray(centroids)[ids])
    mu_np, gap_np, reach_ext = mu.numpy(), gap_mu.numpy(), np.ascontiguousarray(extent.T.numpy())
    musq = (mu_np * mu_np).sum(1)
    ball = np.array([np.sqrt(((p - m) ** 2).sum(1).max()) for p, m in zip(pts, mu_np)], dtype=np.float32)
    cell_of, where = np.empty(N, dtype=np.int64), np.empty(N, dtype=np.int64)
    for a, m in enumerate(members):
        cell_of[m], where[m] = a, np.arange(len(m))
    if initial is None:
        mind = [np.full(len(m), np.inf, dtype=np.float32) for m in members]
        bound = np.full(K, np.inf, dtype=np.float32)  # each cell's largest distance to the selection, or more
    else:
        before = initial.float().numpy()
        mind = [np.ascontiguousarray(before[m]) for m in members]
        bound = np.array([d.max() for d in mind], dtype=np.float32)
    noted: list[list[int]] = [[] for _ in range(K)]  # centres that might reach the cell since its update
    noted_lb: list[list[float]] = [[] for _ in range(K)]
    # Stopping at ``until``, few of the n may be chosen: room grows as they are (doubling), not for all n.
    room = n if until is None else min(n, 4096)
    centres = np.empty((room, zn.shape[1]), dtype=np.float32)
    csq = np.empty(room, dtype=np.float32)
    chosen = np.empty(room, dtype=np.int64)
    step = max(1, n // 100)

    def add(i: int, point: int) -> None:
        nonlocal centres, csq, chosen
        if i == len(chosen):
            more = min(n, 2 * len(chosen)) - len(chosen)
            centres = np.concatenate([centres, np.empty((more, centres.shape[1]), dtype=np.float32)])
            csq = np.concatenate([csq, np.empty(more, dtype=np.float32)])
            chosen = np.concatenate([chosen, np.empty(more, dtype=np.int64)])
        a = int(cell_of[point])
        c = zn[point]
        centres[i], csq[i], chosen[i] = c, c @ c, point
        cm = mu_np @ c
        half = (cm[a] - cm) / gap_np[a] - reach_ext[a]  # _reach's bound, in numpy: it runs once per centre
        lb = np.maximum(half, np.sqrt(np.maximum(musq - 2.0 * cm + csq[i], 0.0)) - ball)
        lb[a] = -1.0  # its own cell always
        mind[a][where[point]] = -np.inf  # never chosen twice (a duplicate point is still at distance 0)
        for b in np.flatnonzero(lb < bound):
            noted[b].append(i)
            noted_lb[b].append(float(lb[b]))

    first, radius = 0, math.inf
    if initial is None:
        add(0, start)
        first = 1
    for i in range(first, n):
        while True:
            a = int(bound.argmax())
            if not noted[a]:
                break
            m = np.asarray(noted[a])[np.asarray(noted_lb[a]) < bound[a]]
            noted[a], noted_lb[a] = [], []
            if len(m):
                d2 = (sq[a][:, None] + csq[m][None, :] - 2.0 * (pts[a] @ centres[m].T)).min(1)
                np.minimum(mind[a], np.sqrt(np.maximum(d2, 0.0)), out=mind[a])
            bound[a] = mind[a].max()
        if until is not None and bound[a] <= until:
            chosen = chosen[:i]
            break
        radius = float(bound[a])  # up to date once nothing is noted for the cell: the new centre's distance
        add(i, int(members[a][int(mind[a].argmax())]))
        if progress is not None and ((i + 1) % step == 0 or i + 1 == n):
            progress(i + 1, n)
    picks = torch.from_numpy(chosen)
    return (picks, radius) if return_radius else picks


def coverage_radius(z: torch.Tensor, chosen: torch.Tensor) -> float:
    """The largest distance from any point to its nearest chosen point: what the greedy step minimises."""
    index = faiss.IndexFlatL2(z.shape[1])
    index.add(np.ascontiguousarray(z[chosen].numpy(), dtype=np.float32))
    dist, _ = index.search(np.ascontiguousarray(z.numpy(), dtype=np.float32), 1)
    return float(np.sqrt(max(float(dist.max()), 0.0)))


# Most features selected exactly in one piece; above that, k-means cells of about a quarter of it (8,192
# features) are selected together. Chosen on screw x 800 (docs/scaling.md): 8k cells fit in 152 s with image
# AUROC 0.947 (exact 0.946); 16k cells cover a little better (radius 15.17 vs 15.29) but took 241 s.
SHARD_FEATURES = 32768
SHARD_BY = ("features", "images")


@dataclass(frozen=True)
class CoresetSampler:
    """How the memory bank is selected from the patch features: the expert and research settings of the
    coreset, handed to :class:`patchcore.PatchCore` as ``sampler=`` (how much is kept is ``coreset_ratio``).

    projection_dim: width of the seeded random projection the greedy selection runs on.
    shard_features: most patch features selected exactly, in one piece. Exact greedy selection costs time
        quadratic in the features; above this the selection is split (``shard_by``), which keeps fit time
        about linear in the number of images (docs/scaling.md). None: always one exact selection.
    shard_by: how a larger selection is split. ``"features"`` (default): into k-means cells of the feature
        space of about ``shard_features / 4`` features, whose greedy loops lower one shared coverage radius
        together (:func:`cell_coreset`; close to the exact selection). ``"images"``: into shards of whole
        images inside the calibration folds, each selecting ``coreset_ratio`` of its own features; only the
        shards' coresets need to travel between machines, but it covers less well.
    cell_exchange: with ``shard_by="features"``, the cells of the model's bank hear of each other's centres:
        coverage radius within 0.3 % of the exact selection's instead of 5 %, for about twice the selection's
        time (docs/scaling.md, section 4); the calibration folds' banks are selected without it. Off by
        default: it did not raise the AUROCs (screw's image AUROC was 0.008 lower with seed 0).
    exact_bank: the model's own bank is the exact greedy selection even when the selection is split (the
        calibration folds' banks still use ``shard_by``), computed by :func:`lazy_greedy` on one core of the
        machine that selects, in about 5x the time of the cells (screw x 800: 42 s against 8.5 s).
    """

    projection_dim: int = 128
    shard_features: int | None = SHARD_FEATURES
    shard_by: str = "features"
    cell_exchange: bool = False
    exact_bank: bool = False

    def check(self) -> None:
        """Raise ValueError for settings that cannot work together."""
        if int(self.projection_dim) < 1:
            raise ValueError("projection_dim must be at least 1")
        if self.shard_features is not None and int(self.shard_features) < 1:
            raise ValueError(f"shard_features must be at least 1 (or None), got {self.shard_features}")
        if self.shard_by not in SHARD_BY:
            raise ValueError(f"shard_by must be one of {', '.join(SHARD_BY)}, got {self.shard_by!r}")
        if self.exact_bank and (self.shard_by != "features" or self.cell_exchange):
            raise ValueError("exact_bank selects the model's bank from every feature in one place: it goes "
                             "with shard_by='features' and without cell_exchange")

    def split(self, n_features: int) -> bool:
        """Whether a selection from ``n_features`` features is split (see ``shard_features``)."""
        return self.shard_features is not None and n_features > int(self.shard_features)

    def n_cells(self, n_features: int, n_keep: int) -> int:
        """k-means cells for a selection of ``n_keep`` from ``n_features`` features (1: not split)."""
        if not self.split(n_features):
            return 1
        return max(1, min(n_keep, -(-n_features // max(1, int(self.shard_features) // 4))))

    def run(self, x: torch.Tensor, n_keep: int, seed: int = 0, *, model_bank: bool = False,
            n_jobs: int | None = None, progress: Progress | None = None, runner: CellRunner | None = None,
            return_radius: bool = False) -> torch.Tensor | tuple[torch.Tensor, float]:
        """Indices of the ``n_keep`` coreset features of ``x`` (N, D): the exact greedy selection up to
        ``shard_features`` features, greedy selection in k-means cells above. ``model_bank``: this is the
        model's own bank (not a calibration fold's), which ``cell_exchange`` and ``exact_bank`` apply to.
        ``return_radius``: also return the selection radius (:func:`greedy_coreset`; 0 when all are kept)."""
        if n_keep >= len(x):
            return (torch.arange(len(x)), 0.0) if return_radius else torch.arange(len(x))
        return self.select(random_projection(x, self.projection_dim, seed), n_keep, seed, model_bank=model_bank,
                           n_jobs=n_jobs, progress=progress, runner=runner, return_radius=return_radius)

    def select(self, z: torch.Tensor, n_keep: int, seed: int = 0, *, model_bank: bool = False,
               n_jobs: int | None = None, progress: Progress | None = None, runner: CellRunner | None = None,
               initial: torch.Tensor | None = None,
               return_radius: bool = False) -> torch.Tensor | tuple[torch.Tensor, float]:
        """:meth:`run` on features already projected (``z``, N x ``projection_dim``), ``n_keep`` < N.
        ``initial``: each point's distance to centres chosen before (a fitted bank that new points join:
        :meth:`patchcore.fitting.FitPlan.grow`); every way of selecting continues from it."""
        cells = self.n_cells(len(z), n_keep)
        if cells == 1:
            return greedy_coreset(z, n_keep, seed=seed, progress=progress, initial=initial,
                                  return_radius=return_radius)
        if self.exact_bank and model_bank:
            return lazy_greedy(z, n_keep, seed, progress, initial=initial, return_radius=return_radius)
        labels, centroids = kmeans_cells(z, cells, seed)
        return cell_coreset(z, n_keep, labels, seed, n_jobs, progress, runner,
                            centroids if self.cell_exchange and model_bank else None, initial=initial,
                            return_radius=return_radius)


