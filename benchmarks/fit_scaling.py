"""How fit time and memory grow with the number of good images, and what Ray's workers add.

A product of N good images is made from a shared category by the 8 flips and quarter turns of its training images
(screw lies at any angle anyway, so these are plausible parts). Each fit runs in its own process, so its peak
memory is its own. Prints a table and one JSON line per measurement (for docs/scaling.md):

    python benchmarks/fit_scaling.py --sizes 200 400 800 1600                  # default fit (k-means cells)
    python benchmarks/fit_scaling.py --sizes 800 --exchange                    # cells that exchange centres
    python benchmarks/fit_scaling.py --sizes 800 --exact-bank                  # the model's bank exact (lazy)
    python benchmarks/fit_scaling.py --sizes 800 --shard-by images             # shards of whole images (Ray's)
    python benchmarks/fit_scaling.py --sizes 200 400 --exact                   # the exact greedy, for comparison
    python benchmarks/fit_scaling.py --ray-predict 64 --ray-fit-many           # Ray: 1 vs 2 workers
    python benchmarks/fit_scaling.py --ray-fit 400                             # fit --ray of one product

The AUROCs of a product are measured on the category's real test set.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _data import DATA, add_data_argument, mvtec


def product(category: str, n: int, data: Path = DATA) -> np.ndarray:
    """n good images of ``category`` (under ``data``/mvtec_ad): its training images, then their flips and
    quarter turns."""
    from patchcore.core.imagefiles import read_image
    from patchcore.datasets import read_mvtec

    base = [read_image(f) for f in read_mvtec(mvtec(data) / category).train]
    out = []
    for k in range(n):
        t, a = divmod(k, len(base))
        a = np.rot90(base[a], t % 4)
        out.append(np.ascontiguousarray(a[:, ::-1] if (t // 4) % 2 else a))
    return np.stack(out)


def fit_once(category: str, n: int, exact: bool, evaluate: bool, shard_by: str = "features",
             shard_features: int | None = None, exchange: bool = False, image_size: int | None = None,
             exact_bank: bool = False, data: Path = DATA) -> dict:
    """One fit of an n-image product (in this process): times, bank, peak memory, and optionally AUROCs."""
    from patchcore import PatchCore
    from patchcore.coreset import CoresetSampler, random_projection

    imgs = product(category, n, data)
    given = {"shard_features": None} if exact else {} if shard_features is None else {"shard_features": shard_features}
    sampler = CoresetSampler(shard_by=shard_by, cell_exchange=exchange, exact_bank=exact_bank, **given)
    model = PatchCore(device="cpu", image_size=image_size, sampler=sampler)
    t0 = time.perf_counter()
    model.fit(imgs)
    wall = time.perf_counter() - t0
    info = model.fit_info_
    row = {"category": category, "images": n, "image_size": model.preprocessing.resize[0], "exact": exact,
           "shard_by": shard_by, "exchange": exchange, "exact_bank": exact_bank,
           "shard_features": model.sampler.shard_features, "features": info["n_features"],
           "shards": info["shards"], "bank": info["bank_size"], "extract_s": round(info["extract_seconds"], 1),
           "coreset_s": round(info["coreset_seconds"], 1),
           "calibration_s": round(info.get("calibration_seconds", 0.0), 1), "fit_s": round(wall, 1),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)}
    if evaluate:
        import torch

        from patchcore.datasets import load_mask, read_mvtec
        from patchcore.evaluate import compute_metrics

        # Coverage radius on the projection the coreset was selected on (all features of the product).
        feats, _ = model.extract(imgs)
        flat = feats.reshape(-1, feats.shape[-1])
        z = random_projection(flat, model.sampler.projection_dim, model.seed)
        bank_z = random_projection(torch.from_numpy(model.memory_bank_), model.sampler.projection_dim, model.seed)
        row["radius"] = round(_radius(z, bank_z), 4)
        ds = read_mvtec(mvtec(data) / category)
        preds = model.predict([s.path for s in ds.test])
        maps = [p.anomaly_map for p in preds]
        masks = [None if s.mask is None else load_mask(s.mask, size=(m.shape[1], m.shape[0]))
                 for s, m in zip(ds.test, maps)]
        m = compute_metrics([s.label for s in ds.test], [p.score for p in preds], masks, maps)
        row.update(image_auroc=round(m["image_auroc"], 4), pixel_auroc=round(m["pixel_auroc"], 4),
                   aupro=round(m["aupro"], 4))
    return row


def _radius(z, bank_z) -> float:
    """Largest distance of any projected feature to the projected bank (exact, cell-pruned search)."""
    from patchcore.core.search import CellSearch, default_cells

    cs = CellSearch(np.ascontiguousarray(bank_z.numpy()), default_cells(len(bank_z)))
    return float(max(cs.nearest(np.ascontiguousarray(z[i:i + 200_000].numpy()))[0].max()
                     for i in range(0, len(z), 200_000)))


def ray_predict(n_images: int, workers: list[int], data: Path = DATA) -> list[dict]:
    """Batch scoring of n test images (bottle, repeated) on a local Ray with 1 and 2 workers."""
    from patchcore import PatchCore
    from patchcore.datasets import read_mvtec
    from patchcore.distributed import predict_files

    rows = []
    bottle = read_mvtec(mvtec(data) / "bottle")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = PatchCore(device="cpu").fit(bottle.train)
        path = model.save(tmp / "bottle.safetensors")
        tests = [s.path for s in bottle.test]
        files = [tests[i % len(tests)] for i in range(n_images)]
        names = [f"{i:06d}" for i in range(n_images)]
        for w in workers:
            t0 = time.perf_counter()
            predict_files(path, files, names, tmp / f"out{w}", workers=w, batch_size=8)
            wall = time.perf_counter() - t0
            rows.append({"job": "predict --ray", "images": n_images, "workers": w, "wall_s": round(wall, 1),
                         "images_per_s": round(n_images / wall, 2)})
    return rows


def ray_fit_many(workers: list[int], data: Path = DATA) -> list[dict]:
    """fit-many of bottle and screw on Ray, with 1 and 2 CPUs in the local cluster."""
    rows = []
    for w in workers:
        with tempfile.TemporaryDirectory() as tmp:
            code = (
                "import json,sys,time; from patchcore.distributed import cluster, fit_many\n"
                f"with cluster(num_cpus={w}):\n"
                "    t=time.perf_counter(); r=fit_many(sys.argv[1], sys.argv[2], {'device':'cpu'}, use_ray=True)\n"
                "    print(json.dumps({'wall': time.perf_counter()-t, 'ok': [x['status'] for x in r]}))")
            root = Path(tmp) / "data"
            root.mkdir()
            for c in ("bottle", "screw"):
                (root / c).symlink_to(mvtec(data) / c)
            (Path(tmp) / "models").mkdir()
            out = subprocess.run([sys.executable, "-c", code, str(root), str(Path(tmp) / "models")],
                                 capture_output=True, text=True, check=True)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"job": "fit-many --ray", "products": 2, "workers": w, "wall_s": round(got["wall"], 1),
                         "status": got["ok"]})
    return rows


def ray_fit(category: str, n: int, workers: list[int], shard_by: str, data: Path = DATA) -> list[dict]:
    """``fit --ray`` of an n-image product (written to PNG files) on a local Ray with 1 and 2 CPUs, each in a
    fresh process; the wall time includes Ray's start-up."""
    from PIL import Image

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for k, a in enumerate(product(category, n, data)):
            files.append(Path(tmp) / f"{k:05d}.png")
            Image.fromarray(a).save(files[-1])
        (Path(tmp) / "files.txt").write_text("\n".join(map(str, files)))
        for w in workers:
            code = (
                "import json,sys,time; from patchcore.distributed import cluster, fit_on_ray\n"
                "from patchcore.coreset import CoresetSampler\n"
                "files = open(sys.argv[1]).read().split()\n"
                f"with cluster(num_cpus={w}):\n"
                "    t=time.perf_counter()\n"
                f"    p={{'device': 'cpu', 'sampler': CoresetSampler(shard_by={shard_by!r})}}\n"
                f"    m=fit_on_ray(files, p, workers={w})\n"
                "    i=m.fit_info_; print(json.dumps({'wall': time.perf_counter()-t, 'extract': i['extract_seconds'],"
                " 'coreset': i['coreset_seconds'], 'calibration': i.get('calibration_seconds', 0.0),"
                " 'bank': i['bank_size'], 'threshold': m.threshold_}))")
            out = subprocess.run([sys.executable, "-c", code, str(Path(tmp) / "files.txt")],
                                 capture_output=True, text=True, check=True)
            got = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append({"job": "fit --ray", "category": category, "images": n, "shard_by": shard_by,
                         "workers": w, "wall_s": round(got["wall"], 1), "extract_s": round(got["extract"], 1),
                         "coreset_s": round(got["coreset"], 1), "calibration_s": round(got["calibration"], 1),
                         "bank": got["bank"], "threshold": round(got["threshold"], 4)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--category", default="screw")
    ap.add_argument("--sizes", type=int, nargs="*", default=[])
    ap.add_argument("--exact", action="store_true", help="fit with one exact greedy selection (no shards)")
    ap.add_argument("--shard-by", default="features", choices=["features", "images"],
                    help="how a large selection is split (CoresetSampler's shard_by)")
    ap.add_argument("--shard-features", type=int, default=None,
                    help="CoresetSampler's shard_features (default: its default)")
    ap.add_argument("--exchange", action="store_true",
                    help="cells that exchange centres (CoresetSampler's cell_exchange=True)")
    ap.add_argument("--exact-bank", action="store_true", help="the model's bank by the lazy exact selection")
    ap.add_argument("--image-size", type=int, default=None, help="PatchCore's image_size (default: its default)")
    ap.add_argument("--evaluate", action="store_true", help="also coverage radius and AUROCs on the test set")
    ap.add_argument("--ray-predict", type=int, default=0, metavar="N", help="score N images on Ray, 1 vs 2 workers")
    ap.add_argument("--ray-fit-many", action="store_true", help="fit-many bottle+screw on Ray, 1 vs 2 CPUs")
    ap.add_argument("--ray-fit", type=int, default=0, metavar="N", help="fit --ray of an N-image product, 1 vs 2 CPUs")
    add_data_argument(ap)
    ap.add_argument("--one", nargs=2, metavar=("N", "EXACT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child process: one fit, one JSON line
        print(json.dumps(fit_once(args.category, int(args.one[0]), args.one[1] == "1", args.evaluate,
                                  args.shard_by, args.shard_features, args.exchange, args.image_size,
                                  args.exact_bank, args.data)), flush=True)
        return
    rows = []
    for n in args.sizes:
        cmd = [sys.executable, __file__, "--category", args.category, "--one", str(n), "1" if args.exact else "0",
               "--shard-by", args.shard_by, "--data", str(args.data)]
        cmd += [] if args.shard_features is None else ["--shard-features", str(args.shard_features)]
        cmd += ["--evaluate"] if args.evaluate else []
        cmd += ["--exact-bank"] if args.exact_bank else []
        cmd += (["--exchange"] if args.exchange else []) + ([] if args.image_size is None else
                                                            ["--image-size", str(args.image_size)])
        out = subprocess.run(cmd, capture_output=True, text=True,
                             check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    if args.ray_predict:
        for r in ray_predict(args.ray_predict, [1, 2], args.data):
            print(json.dumps(r), flush=True)
    if args.ray_fit:
        for r in ray_fit(args.category, args.ray_fit, [1, 2], args.shard_by, args.data):
            print(json.dumps(r), flush=True)
    if args.ray_fit_many:
        for r in ray_fit_many([1, 2], args.data):
            print(json.dumps(r), flush=True)
    if rows:
        cols = [k for k in rows[0] if k not in ("category",)]
        print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
        for r in rows:
            print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
