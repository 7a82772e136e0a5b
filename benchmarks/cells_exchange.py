"""Coverage radius and time of the cells' selection with and without the exchange of centres between cells.

Without the exchange each k-means cell of :func:`patchcore.coreset.cell_coreset` covers its own points only,
so near a cell border budget is spent on points a neighbouring cell's centre already covers (coverage radius
+4-5 % against the exact greedy selection). With it (``centroids=``;
``PatchCore(sampler=CoresetSampler(cell_exchange=True))``) each cell hears of the others' new centres after
every step of the shared radius and checks a point against them before making it a centre. The radius step
matters, since cells choosing in the same step do not hear of each other: this prints the library's step
(2 %) and 5 % and 1 % steps. The product is fit_scaling.py's screw images at 256 px (320 images: 327,680
features, exact greedy radius 14.54; 800 images: 819,200 features, exact 14.55; docs/scaling.md, section 4):

    python benchmarks/cells_exchange.py --images 320
    python benchmarks/cells_exchange.py --images 800 --steps 0.98
"""

from __future__ import annotations

import argparse
import json
import time

import patchcore.coreset as coreset
from patchcore import PatchCore

from _data import add_data_argument
from fit_scaling import product


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=320)
    ap.add_argument("--steps", type=float, nargs="+", default=[0.95, 0.98, 0.99],
                    help="radius steps of the exchanging cells (the library's: 0.98)")
    add_data_argument(ap)
    args = ap.parse_args()
    model = PatchCore(device="cpu", image_size=256)
    feats, _ = model.extract(product("screw", args.images, args.data))
    flat = feats.reshape(-1, feats.shape[-1])
    z = coreset.random_projection(flat, model.sampler.projection_dim, model.seed).contiguous()
    del flat
    del feats
    n = coreset.coreset_size(len(z), model.coreset_ratio)
    cells = model.sampler.n_cells(len(z), n)
    labels, centroids = coreset.kmeans_cells(z, cells, model.seed)
    library = coreset.EXCHANGE_STEP
    for step in [None, *args.steps]:
        coreset.EXCHANGE_STEP = library if step is None else step
        t = time.perf_counter()
        chosen = coreset.cell_coreset(z, n, labels, model.seed, centroids=None if step is None else centroids)
        print(json.dumps({"features": len(z), "cells": cells, "exchange_step": step,
                          "seconds": round(time.perf_counter() - t, 1),
                          "radius": round(coreset.coverage_radius(z, chosen), 3)}), flush=True)
    coreset.EXCHANGE_STEP = library


if __name__ == "__main__":
    main()
