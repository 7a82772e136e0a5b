"""Accuracy of one setting on one category, with the patch distances kept for looking at afterwards.

Fits ``PatchCore(calibration_folds=0, **PARAMS)`` on the category's good images (no threshold: this is about
ranking, and the cross-fit would triple the time on a bank that does not prune), scores every test image,
and prints image AUROC (Eq. 7, as the library scores), pixel AUROC and AUPRO by ``patchcore evaluate``'s
protocol, plus the image AUROC the largest value of the smoothed map would give. Appends the row to
``OUT/results.jsonl`` and keeps each test image's grid of patch distances in ``OUT/TAG.npz`` (with labels and
both image scores), so image-score variants and combinations can be tried without scoring again.

    python benchmarks/probe_settings.py default '{}'
    python benchmarks/probe_settings.py lite2 '{"backbone": "efficientnet_lite2"}'
    python benchmarks/probe_settings.py s432 '{"image_size": 432}'
    python benchmarks/probe_settings.py n5 '{}' --neighbourhood 5      # docs/benchmarks.md, section 18

``--neighbourhood`` replaces the paper's 3 x 3 local aggregation (an experiment, not a setting of the model).
Time columns are not figures unless the machine was otherwise idle.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import DATA  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("tag")
    ap.add_argument("params", nargs="?", default="{}", help="PatchCore keyword arguments as JSON")
    ap.add_argument("--category", type=Path, default=DATA / "ksdd" / "kolektor")
    ap.add_argument("--neighbourhood", type=int, default=3)
    ap.add_argument("-o", "--output", type=Path, default=Path("out/probe"))
    args = ap.parse_args()

    import patchcore.features as features
    from patchcore import PatchCore
    from patchcore.core.scoring import score_patches
    from patchcore.datasets import load_mask, read_mvtec
    from patchcore.evaluate import compute_metrics
    from patchcore.metrics import image_auroc

    if args.neighbourhood != 3:
        aggregate = features.aggregate_neighbourhood
        features.aggregate_neighbourhood = lambda fmap, size=3: aggregate(fmap, args.neighbourhood)
    params = json.loads(args.params)
    if isinstance(params.get("image_size"), list):
        params["image_size"] = tuple(params["image_size"])
    ds = read_mvtec(args.category)
    model = PatchCore(**{**params, "calibration_folds": 0})
    t0 = time.perf_counter()
    model.fit(list(ds.train))
    t1 = time.perf_counter()
    labels = np.array([s.label for s in ds.test])
    feats, sizes = model.extract([s.path for s in ds.test])
    n, h, w, d = feats.shape
    flat = feats.reshape(-1, d).float().numpy()
    bank = model.memory()
    dist, nn = bank.nearest(flat, n_jobs=2)
    support, hw = bank.support_of(model.num_neighbors), h * w
    scored = [score_patches(dist[i * hw:(i + 1) * hw], nn[i * hw:(i + 1) * hw], flat[i * hw:(i + 1) * hw],
                            bank.bank, support, int(model.num_neighbors), (h, w), model.preprocessing,
                            float(model.sigma), tuple(sizes[i])) for i in range(n)]
    t2 = time.perf_counter()
    scores = np.array([s for s, _ in scored])
    maps = [m for _, m in scored]
    masks = [load_mask(s.mask, m.shape[::-1]) if s.mask is not None else None for s, m in zip(ds.test, maps)]
    met = compute_metrics(labels, scores, masks, maps)
    map_max = np.array([m.max() for m in maps])
    row = {"tag": args.tag, "category": args.category.name, "params": params, "neighbourhood": args.neighbourhood,
           "input": list(model.preprocessing.input_size), "grid": [h, w], "bank": int(len(bank)),
           "fit_s": round(t1 - t0, 1), "score_s": round(t2 - t1, 1), "image_auroc": met["image_auroc"],
           "pixel_auroc": met["pixel_auroc"], "aupro": met["aupro"], "map_max_auroc": image_auroc(labels, map_max)}
    print(json.dumps(row))
    args.output.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(args.output / f"{args.tag}.npz", grids=dist.reshape(n, h, w), scores=scores,
                        labels=labels, map_max=map_max)
    with open(args.output / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
