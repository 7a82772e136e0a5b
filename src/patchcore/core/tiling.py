"""Network inputs larger than one pass, in overlapping tiles stitched into one grid without seams (numpy alone).

A tile is a window of the network input, ``tile`` pixels a side at most, that overlaps its neighbours by two
``margin`` s. Each tile gives only the patches of its interior (the cells at least ``margin`` pixels from a
cut, or at the input's own border), so every patch of the stitched grid was computed with at least
``margin`` pixels of real context around it, as in a tile's centre; together the interiors cover the grid
exactly once. The estimator (fit and predict), the runtime and the export all tile with :func:`plan_tiles`,
and search tile by tile with :class:`Assembled`, so the memory per image stays that of one tile's patch
features whatever the image's size, and the time grows with the pixels scored. An input that fits in one
tile is one tile: the whole input, as without tiling.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Pixels of context each side of a cut (8 cells of the deepest, stride-16 layer). Measured on KolektorSDD at its
# native size (1248 x 496 input, 6 crack images, one bank, tiles of at most 512): tiles against one pass differ
# by at most 1.1e-3 (score, relative) and 6.1e-2 (map, of its range) with 64 px, 1.0e-3 and 1.4e-2 with 96,
# 2.7e-5 and 1.6e-3 with 128 (docs/benchmarks.md, section 16).
TILE_MARGIN = 128


@dataclass(frozen=True)
class Tile:
    """One window of the network input: ``box`` (top, left, height, width) in input pixels; ``keep`` (rows,
    columns) the cells of the whole grid it gives; ``local`` the same cells in its own grid."""

    box: tuple[int, int, int, int]
    keep: tuple[slice, slice]
    local: tuple[slice, slice]


def _spans(length: int, tile: int, margin: int, align: int = 16) -> tuple[int, list[tuple[int, int, int]]]:
    """The window size and (start, keep from, keep to) in pixels of the tiles along one axis: as few windows
    of at most ``tile`` as cover ``length`` with ``margin`` of context at every cut, all of one size (the
    smallest that does it, so little is computed twice), spread evenly; cuts fall midway in the overlaps.
    Starts, sizes and cuts are multiples of ``align`` (the deepest layer's stride), so a tile's patches are
    those of the whole input."""
    if length <= tile:
        return length, [(0, 0, length)]

    def up(x: float) -> int:
        return int(-(-x // align) * align)

    n = 2
    while True:
        t = up((length + 2 * margin * (n - 1)) / n)
        while t <= min(tile, length):
            starts = [k * (length - t) // (n - 1) // align * align for k in range(n)]
            cuts = [(lo + margin + hi - margin) // 2 // align * align
                    for lo, hi in zip(starts[1:], [s + t for s in starts[:-1]])]
            if all(s + margin <= c <= e - margin for s, e, c in zip(starts[1:], [s + t for s in starts[:-1]], cuts)):
                edges = [0] + cuts + [length]
                return t, [(s, edges[k], edges[k + 1]) for k, s in enumerate(starts)]
            t += align
        n += 1


def plan_tiles(input_size: tuple[int, int], tile: int | None, cell: int, margin: int = TILE_MARGIN) -> list[Tile]:
    """The tiles of a network input of ``input_size`` (height, width) for patches ``cell`` pixels apart: one,
    the whole input, when it has no more pixels than a ``tile`` x ``tile`` square (or ``tile`` is None);
    else windows of at most ``tile`` a side. Sizes are multiples of the cell (of the stride, 16)."""
    H, W = (int(x) for x in input_size)
    if tile is None or H * W <= int(tile) ** 2:  # no more pixels than one tile: one pass
        return [Tile((0, 0, H, W), (slice(0, H // cell), slice(0, W // cell)),
                     (slice(0, H // cell), slice(0, W // cell)))]
    out = []
    (th, rows), (tw, cols) = _spans(H, int(tile), margin), _spans(W, int(tile), margin)
    for ys, ylo, yhi in rows:
        for xs, xlo, xhi in cols:
            out.append(Tile((ys, xs, th, tw), (slice(ylo // cell, yhi // cell), slice(xlo // cell, xhi // cell)),
                            (slice((ylo - ys) // cell, (yhi - ys) // cell),
                             slice((xlo - xs) // cell, (xhi - xs) // cell))))
    return out


def crop(x: np.ndarray, tile: Tile) -> np.ndarray:
    """The tile's window of a (..., H, W) input."""
    top, left, h, w = tile.box
    return x[..., top:top + h, left:left + w]


def tile_grid(tiles: list[Tile]) -> tuple[int, int]:
    """(rows, columns) of the whole grid the tiles cover."""
    return max(t.keep[0].stop for t in tiles), max(t.keep[1].stop for t in tiles)


class Assembled:
    """One image's nearest-neighbour distances and indices over the whole grid, gathered tile by tile, and the
    patch (feature and flat index) with the largest distance among the cells ``on_image`` (rows, columns):
    what the image score of Eq. 7 needs, without keeping every patch feature."""

    def __init__(self, grid: tuple[int, int], on_image: tuple[slice, slice]) -> None:
        self.grid = (int(grid[0]), int(grid[1]))
        self.dist = np.zeros(self.grid, dtype=np.float32)
        self.nn = np.zeros(self.grid, dtype=np.int64)
        self.on_image = on_image
        self.best_j = -1
        self.best_dist = -np.inf
        self.best_patch: np.ndarray | None = None

    def add(self, tile: Tile, dist: np.ndarray, nn: np.ndarray, feats: np.ndarray, local_grid: tuple[int, int]
            ) -> None:
        """Take a tile's results: ``dist``, ``nn`` (one per cell of its ``local_grid``, row-major) and the patch
        features ``feats`` (cells x D)."""
        d = np.asarray(dist, dtype=np.float32).reshape(local_grid)
        self.dist[tile.keep] = d[tile.local]
        self.nn[tile.keep] = np.asarray(nn).reshape(local_grid)[tile.local]
        # The tile's candidate for the image score: its kept cells that lie on the image, first maximum in
        # the whole grid's row-major order (the order argmax takes over an untiled grid).
        rows = range(max(tile.keep[0].start, self.on_image[0].start), min(tile.keep[0].stop, self.on_image[0].stop))
        cols = range(max(tile.keep[1].start, self.on_image[1].start), min(tile.keep[1].stop, self.on_image[1].stop))
        if not rows or not cols:
            return
        sub = self.dist[rows.start:rows.stop, cols.start:cols.stop]
        r, c = np.unravel_index(int(np.argmax(sub)), sub.shape)
        gr, gc = rows.start + int(r), cols.start + int(c)
        j = gr * self.grid[1] + gc
        value = float(sub[r, c])
        if value > self.best_dist or (value == self.best_dist and j < self.best_j):
            lr = gr - tile.keep[0].start + tile.local[0].start
            lc = gc - tile.keep[1].start + tile.local[1].start
            self.best_j, self.best_dist = j, value
            self.best_patch = np.array(feats[lr * local_grid[1] + lc])
