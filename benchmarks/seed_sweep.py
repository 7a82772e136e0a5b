"""Coreset seeds and image-score variants on cached patch features: how much of a difference is noise.

Screw's image AUROC moves by about 0.01 between coreset draws, as much as many settings change it. This
extracts a category's train and test patch features once per setting (cached under out/feature_cache),
then selects the bank for each seed and scores the test set, so a setting is judged over several draws:

    python benchmarks/seed_sweep.py '{"cat": "screw", "cfg": "s288", "params": {"image_size": 288},
                                      "mode": "cells", "seeds": [0, 1], "variants": ["eq7"], "pixel": true}'

mode: "cells" (the library's default selection), "exact", or "sharded" (shards of whole images); ratios:
coreset ratios; aug: "rot4" / "flip8" adds the quarter turns (and flips) of the training images; variants:
"eq7" (the library's image score), "max" (largest patch distance), "smax" (peak of the smoothed map),
"topK" (mean of the K largest patch distances), "knnK" (largest mean distance to the K nearest bank
features), "knneqK" (that, reweighted by Eq. 7); tta: "rot4" also scores the test images' quarter turns
and reports each variant unturned, averaged over 2 and 4 turns, and at the largest of the 4 (no pixel
metrics then). Rows are appended to out/feature_cache/results.jsonl.
Pixel metrics are computed on maps resized to 256 px, the shared images' size. The data is read from
$PATCHCORE_DATA, else ../shared/data (benchmarks/_data.py).
"""
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from patchcore import PatchCore
from patchcore.bank import MemoryBank
from patchcore.core.geometry import Preprocessing
from patchcore.core.imagefiles import read_image
from patchcore.core.scoring import image_score, score_map
from patchcore.coreset import select, shard_coresets
from patchcore.datasets import load_mask, read_mvtec
from patchcore.metrics import aupro, image_auroc, pixel_auroc

from _data import mvtec

DATA = mvtec()
CACHE = Path("out/feature_cache")


def feats(cat, cfg_name, params, split, aug=None):
    f = CACHE / f"{cat}_{cfg_name}_{split}{'_' + aug if aug else ''}.npy"
    if f.exists():
        return torch.from_numpy(np.load(f))
    ds = read_mvtec(DATA / cat)
    m = PatchCore(**params)
    paths = ds.train if split == "train" else [s.path for s in ds.test]
    imgs = [read_image(p) for p in paths]
    if aug == "rot4":
        imgs = [np.ascontiguousarray(np.rot90(a, k)) for k in range(4) for a in imgs]
    elif aug == "flip8":
        imgs = [np.ascontiguousarray(np.rot90(a[:, ::-1] if fl else a, k))
                for fl in (0, 1) for k in range(4) for a in imgs]
    t = time.perf_counter()
    x, _ = m.extract(imgs)
    print(f"extract {cat} {cfg_name} {split} {aug}: {x.shape} {time.perf_counter()-t:.1f}s", flush=True)
    np.save(f, x.numpy())
    return x


def bank_of(train, ratio, mode, seed=0, n_img=None):
    n, h, w, d = train.shape
    flat = train.reshape(-1, d)
    if ratio >= 1:
        return flat.numpy()
    if mode == "exact":
        idx = select(flat, ratio, 128, seed)
        return flat[idx].numpy()
    if mode == "cells":
        m = PatchCore(coreset_ratio=ratio, seed=seed)
        picks = m.sampler.run(flat, m.fit_plan().n_keep(len(flat)), seed, n_jobs=m.n_jobs)
        return flat.index_select(0, picks).numpy()
    # sharded as the model does (default)
    m = PatchCore(coreset_ratio=ratio, seed=seed)
    shards = m.fit_plan().plan_shards(n, h * w)
    rows = [torch.from_numpy((imgs[:, None] * (h * w) + np.arange(h * w)).ravel()) for imgs, _ in shards]
    parts = [flat.index_select(0, r) for r in rows]
    picks = [r[p] for r, p in zip(rows, shard_coresets(parts, ratio, 128, seed))]
    return flat.index_select(0, torch.cat(picks)).numpy()


def score(bank_np, test, pre: Preprocessing, variants, sigma=4.0, pad_to=256):
    """Image scores per variant and anomaly maps (at ``pad_to`` px) of the test features against the bank;
    the maps as the library makes them for the network input of ``pre``."""
    bank = MemoryBank(bank_np)
    support = bank.support_of(9)
    n, h, w, d = test.shape
    flat = test.reshape(-1, d).numpy()
    dist, nn = bank.nearest(flat)
    dist, nn = dist.reshape(n, h * w), nn.reshape(n, h * w)
    out = {k: [] for k in variants}
    maps = []
    need_knn = any(v.startswith(("knn", "kam")) for v in variants)
    if need_knn:
        dk, _ = bank.search(flat, 5)
        dk = dk.reshape(n, h * w, 5)
    for i in range(n):
        j = int(dist[i].argmax())
        sm = score_map(dist[i].reshape(h, w), pre.input_size, sigma)  # upsampled to the input, smoothed
        maps.append(pre.to_image(sm, (pad_to, pad_to)))
        for v in variants:
            if v == "eq7":
                s = image_score(bank.bank, flat[i * h * w + j], float(dist[i, j]), int(nn[i, j]), support, 9)
            elif v == "max":
                s = float(dist[i, j])
            elif v == "smax":
                s = float(sm.max())
            elif v.startswith("top"):
                k = int(v[3:])
                s = float(np.sort(dist[i])[-k:].mean())
            elif v.startswith("knneq"):
                k = int(v[5:])
                kk = dk[i, :, :k].mean(1)
                jj = int(kk.argmax())
                s = image_score(bank.bank, flat[i * h * w + jj], float(kk[jj]), int(nn[i, jj]), support, 9)
            elif v.startswith("kam"):
                k = int(v[3:])
                s = float(dk[i, j, :k].mean())
            elif v.startswith("knn"):
                k = int(v[3:])
                s = float(dk[i, :, :k].mean(1).max())
            out[v].append(s)
    return out, maps


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0 if sys.argv[1:] in (["-h"], ["--help"]) else 2)
    spec = json.loads(sys.argv[1])
    cat, cfg, params = spec["cat"], spec["cfg"], spec.get("params", {})
    CACHE.mkdir(parents=True, exist_ok=True)
    ds = read_mvtec(DATA / cat)
    labels = [s.label for s in ds.test]
    tr = feats(cat, cfg, params, "train", spec.get("aug"))
    tta = spec.get("tta")  # "rot4": also score the test images' quarter turns and average the image scores
    te = feats(cat, cfg, params, "test", tta)
    pre = PatchCore(**params).preprocessing  # the network input the features were extracted at
    variants = spec.get("variants", ["eq7", "max", "smax", "top10", "knn3"])
    for ratio, seed in [(r, sd) for r in spec.get("ratios", [0.1]) for sd in spec.get("seeds", [0])]:
        t = time.perf_counter()
        b = bank_of(tr, ratio, spec.get("mode", "sharded"), seed)
        tb = time.perf_counter() - t
        t = time.perf_counter()
        out, maps = score(b, te, pre, variants)
        ts = time.perf_counter() - t
        row = {"cat": cat, "cfg": cfg, "aug": spec.get("aug"), "ratio": ratio, "mode": spec.get("mode", "sharded"),
               "bank": len(b), "seed": seed, "bank_s": round(tb, 1), "score_s": round(ts, 1)}
        for v in variants:
            if tta:
                turns = np.array(out[v]).reshape(4, len(labels))
                for key, s in ((v, turns[0]), (v + "_mean2", turns[:2].mean(0)), (v + "_mean4", turns.mean(0)),
                               (v + "_max4", turns.max(0))):
                    row[key] = round(image_auroc(labels, s), 4)
            else:
                row[v] = round(image_auroc(labels, out[v]), 4)
        if spec.get("pixel") and not tta:
            masks = [load_mask(s.mask) if s.mask else np.zeros((256, 256), bool) for s in ds.test]
            row["pixel"] = round(pixel_auroc(masks, maps), 4)
            row["aupro"] = round(aupro(masks, maps), 4)
        print(json.dumps(row), flush=True)
        with open(str(CACHE / "results.jsonl"), "a") as fh:
            fh.write(json.dumps(row) + "\n")
