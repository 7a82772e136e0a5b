"""The composable two-step coreset ("greedy k-center on each shard, then over the union") against the cells.

A product of N good screw images (fit_scaling.py's flips and quarter turns) is extracted once at 256 px and
projected as the model projects it; then shards of whole images each select ``frac`` of their features
(greedy in k-means cells of the model's size), the union is selected down to the model's 10 % the same way,
and the coverage radius over all features is printed next to the cells' selection of the whole product (the
default fit's). docs/scaling.md, section 2:

    python benchmarks/composable_coreset.py --images 800 --shard-images 128 --frac 0.3
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from patchcore import PatchCore
from patchcore.coreset import (
    cell_coreset,
    coreset_size,
    coverage_radius,
    greedy_coreset,
    kmeans_cells,
    random_projection,
)

from _data import add_data_argument
from fit_scaling import product


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=800)
    ap.add_argument("--shard-images", type=int, default=128)
    ap.add_argument("--frac", type=float, nargs="+", default=[0.3])
    add_data_argument(ap)
    args = ap.parse_args()

    model = PatchCore(device="cpu", image_size=256)
    feats, _ = model.extract(product("screw", args.images, args.data))
    n_img, h, w, d = feats.shape
    flat = feats.reshape(-1, d)
    z = random_projection(flat, model.sampler.projection_dim, model.seed)
    n = coreset_size(len(z), model.coreset_ratio)

    t = time.perf_counter()
    cells = model.sampler.run(flat, n, model.seed, model_bank=True, n_jobs=model.n_jobs)
    print(json.dumps({"selection": "cells (the default fit)", "features": len(z), "bank": n,
                      "seconds": round(time.perf_counter() - t, 1), "radius": round(coverage_radius(z, cells), 3)}),
          flush=True)
    cell = int(model.sampler.shard_features) // 4  # the model's cell size

    def in_cells(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
        cells = max(1, -(-len(x) // cell))
        if cells == 1:
            return greedy_coreset(x, k, seed=seed)
        return cell_coreset(x, k, kmeans_cells(x, cells, seed)[0], seed)

    for frac in args.frac:
        t = time.perf_counter()
        picks = []
        for start in range(0, n_img, args.shard_images):
            rows = torch.arange(start * h * w, min(n_img, start + args.shard_images) * h * w)
            picks.append(rows[in_cells(z[rows], coreset_size(len(rows), frac), start)])
        union = torch.cat(picks)
        t1 = time.perf_counter()
        chosen = union[in_cells(z[union], n, 0)]
        t2 = time.perf_counter()
        print(json.dumps({"selection": "two steps", "shard_images": args.shard_images, "frac": frac,
                          "union": len(union), "bank": len(chosen), "step1_s": round(t1 - t, 1),
                          "step2_s": round(t2 - t1, 1), "step1_radius": round(coverage_radius(z, union), 3),
                          "radius": round(coverage_radius(z, chosen), 3)}), flush=True)


if __name__ == "__main__":
    main()
