"""Prototype, not the library's selection: coreset cells that hear of their neighbours' centres.

The cells of :func:`patchcore.coreset.cell_coreset` each cover their own points only, so near a cell border
budget is spent on points a neighbouring cell's centre already covers (coverage radius +4-5 % against the
exact greedy selection). Here, after every step of the shared radius, each new centre is also applied to
the other cells whose k-means (Voronoi) region it may reach within the radius (the distance from the centre
to the bisector of the two cells' centroids bounds its distance to any point of the other cell), and only to
their points still farther than ``frac`` x the radius from their centres (``frac`` 0: to all of them).
Prints the coverage radius and the single-thread time per setting. The product is fit_scaling.py's screw
images at 256 px (320 images: 327,680 features, exact greedy radius 14.54 in docs/scaling.md):

    python benchmarks/cells_exchange.py --images 320 --cells 40 --frac none 0.9 0.8 0
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fit_scaling import product  # noqa: E402

from patchcore import PatchCore  # noqa: E402
from patchcore.coreset import _Cell, _seeded_start, coreset_size, coverage_radius, random_projection  # noqa: E402
from patchcore.images import as_items  # noqa: E402


def select(z: torch.Tensor, n: int, n_cells: int, frac: float | None) -> tuple[torch.Tensor, dict]:
    """cell_coreset's shared-radius loop (one thread), with the neighbour exchange unless ``frac`` is None."""
    x = z.numpy()
    km = faiss.Kmeans(x.shape[1], n_cells, niter=20, seed=0, max_points_per_centroid=256, verbose=False)
    km.train(x)  # as patchcore.coreset.cell_labels trains it
    labels = km.index.search(x, 1)[1][:, 0]
    mu = torch.from_numpy(km.centroids.copy())
    mu2, gap = (mu * mu).sum(1), torch.cdist(mu, mu)
    members = [torch.from_numpy(np.flatnonzero(labels == c)) for c in range(n_cells)]
    cells = [_Cell(z.index_select(0, m), _seeded_start(len(m), i)) for i, m in enumerate(members)]
    sent, work = [0] * n_cells, {"own": 0, "exchange": 0}

    def exchange(radius: float) -> None:
        news, owners = [], []
        for b, cb in enumerate(cells):
            new = cb.chosen[sent[b]:]
            sent[b] = len(cb.chosen)
            if new:
                news.append(cb.z[torch.tensor(new)])
                owners.append(torch.full((len(new),), b))
        if not news:
            return
        c, own = torch.cat(news), torch.cat(owners)
        d2 = (c * c).sum(1, keepdim=True) - 2 * c @ mu.T + mu2[None]  # |c - mu_A|^2 for every cell A
        bound = (d2 - d2.gather(1, own[:, None])) / (2 * gap[own].clamp_min(1e-9))  # distance to A's region
        bound[torch.arange(len(c)), own] = float("inf")
        near = bound < radius
        for a in torch.nonzero(near.any(0))[:, 0].tolist():
            ca, cs = cells[a], c[near[:, a]]
            act = torch.nonzero(ca.mind > (frac * radius) ** 2)[:, 0]
            if len(act):
                dd = ca.sq[act][:, None] - 2 * ca.z[act] @ cs.T + (cs * cs).sum(1)[None]
                work["exchange"] += len(act) * len(cs)
                ca.mind[act] = torch.minimum(ca.mind[act], dd.min(1).values)
                ca.next = int(ca.mind.argmax())
                ca.next_dist = math.sqrt(max(float(ca.mind[ca.next]), 0.0))

    def lower(radius: float) -> int:
        for cell in cells:
            if cell.next_dist > radius or not cell.chosen:
                before = len(cell.chosen)
                cell.run(radius)
                work["own"] += len(cell.z) * (len(cell.chosen) - before)
        if frac is not None:
            exchange(radius)
        return sum(len(cell.chosen) for cell in cells)

    total = lower(float("inf"))
    radius = max(cell.next_dist for cell in cells)
    while total < n and any(cell.next_dist > 0 for cell in cells):
        radius *= 0.95 if total < 0.9 * n else 0.99
        total = lower(radius)
    idx = torch.cat([m[torch.tensor(cell.chosen)] for cell, m in zip(cells, members)])
    dist = torch.tensor([d for cell in cells for d in cell.dist], dtype=torch.float64)
    return idx[torch.argsort(-dist, stable=True)[:n]], {"centres_chosen": total, **work}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--cells", type=int, default=40)
    ap.add_argument("--frac", nargs="+", default=["none", "0.9", "0.8", "0"], help="'none': no exchange")
    args = ap.parse_args()
    torch.set_num_threads(1)
    model = PatchCore(device="cpu", image_size=256)
    model.skipped_ = []
    feats, _ = model._extract(as_items(product("screw", args.images)), False, None)
    z = random_projection(feats.reshape(-1, feats.shape[-1]), model.projection_dim, model.seed).float().contiguous()
    n = coreset_size(len(z), model.coreset_ratio)
    for f in args.frac:
        frac = None if f == "none" else float(f)
        t = time.perf_counter()
        chosen, info = select(z, n, args.cells, frac)
        print(json.dumps({"features": len(z), "cells": args.cells, "exchange_frac": frac,
                          "seconds": round(time.perf_counter() - t, 1), "radius": round(coverage_radius(z, chosen), 3),
                          **info}), flush=True)


if __name__ == "__main__":
    main()
