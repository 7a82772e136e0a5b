"""Fit and scoring speed, peak memory and accuracy of the core library, one category per process.

    python benchmarks/bench_core.py                       # bottle and screw, default settings
    python benchmarks/bench_core.py --categories bottle --storage-dtype float16 --preset paper

Prints, per category: fit seconds (feature extraction + coreset), coreset seconds, milliseconds per test
image at batch size 1 (reading, features, search, Eq. 7 and the smoothed full-size map), peak resident
memory of the process that fitted and scored (which includes the ~0.5 GB that importing torch costs),
image AUROC, pixel AUROC and AUPRO. Each category runs in a fresh process so peak memory is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("PATCHCORE_DATA", ROOT.parent / "shared" / "data")) / "mvtec_ad"


def run_one(category: str, params: dict) -> dict:
    """Fit and score one category in this process; return the figures."""
    import resource

    import numpy as np
    import torch

    from patchcore import PatchCore
    from patchcore.datasets import load_mask, read_mvtec
    from patchcore.metrics import aupro, border_peak_share, image_auroc, pixel_auroc

    ds = read_mvtec(DATA / category)
    model = PatchCore(**params)
    t0 = time.perf_counter()
    model.fit(ds.train)
    fit_s = time.perf_counter() - t0
    fit_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    model.batch_size = 1
    model.predict([ds.test[0].path])  # warm-up: the first call builds the faiss index
    times, preds = [], []
    for s in ds.test:
        t = time.perf_counter()
        preds.extend(model.predict([s.path]))
        times.append(time.perf_counter() - t)
    labels = [s.label for s in ds.test]
    masks = [load_mask(s.mask) if s.mask else np.zeros(p.anomaly_map.shape, bool) for s, p in zip(ds.test, preds)]
    maps = [p.anomaly_map for p in preds]
    info = model.fit_info_
    good = [m for s, m in zip(ds.test, maps) if s.label == 0]
    return {
        "category": category, "n_train": info["n_images"], "bank": info["bank_size"], "dim": info["feature_dim"],
        "fit_s": fit_s, "extract_s": info["extract_seconds"], "coreset_s": info["coreset_seconds"],
        "ms_per_image": 1000 * float(np.median(times)), "ms_per_image_mean": 1000 * float(np.mean(times)),
        "peak_fit_mb": fit_rss, "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "image_auroc": image_auroc(labels, [p.score for p in preds]), "pixel_auroc": pixel_auroc(masks, maps),
        "aupro": aupro(masks, maps), "threads": torch.get_num_threads(),
        "border_peak": border_peak_share(good),
        "ms_p99": 1000 * float(np.percentile(times, 99)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--categories", nargs="+", default=["bottle", "screw"])
    ap.add_argument("--backbone", default=None)
    ap.add_argument("--coreset-ratio", type=float, default=None)
    ap.add_argument("--preset", default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--storage-dtype", default=None)
    ap.add_argument("--params", type=json.loads, default={},
                    help='any other constructor arguments as JSON, e.g. \'{"border_pad": 0}\'')
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one category, print JSON
    args = ap.parse_args()
    params = {k: v for k, v in {"backbone": args.backbone, "coreset_ratio": args.coreset_ratio,
                                "preset": args.preset, "image_size": args.image_size,
                                "storage_dtype": args.storage_dtype}.items() if v is not None}
    params.update(args.params)
    if args.one:
        print(json.dumps(run_one(args.one, params)))
        return
    from rich.console import Console
    from rich.table import Table

    from patchcore import PatchCore

    shown = PatchCore(**params).get_params()
    rows = []
    for cat in args.categories:
        cmd = [sys.executable, __file__, "--one", cat, "--params", json.dumps(params)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{cat}: failed\n{out.stderr[-2000:]}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    table = Table(title=f"patchcore {shown['backbone']}, coreset {shown['coreset_ratio']}, preset {shown['preset']}, "
                        f"storage {shown['storage_dtype']} - {platform.machine()}, {os.cpu_count()} cores, "
                        f"load avg {os.getloadavg()[0]:.1f}")
    cols = [("category", "{}"), ("n_train", "{}"), ("bank", "{}"), ("fit_s", "{:.1f}"), ("extract_s", "{:.1f}"),
            ("coreset_s", "{:.1f}"), ("ms_per_image", "{:.0f}"), ("peak_fit_mb", "{:.0f}"), ("peak_mb", "{:.0f}"),
            ("ms_p99", "{:.0f}"), ("image_auroc", "{:.4f}"), ("pixel_auroc", "{:.4f}"), ("aupro", "{:.4f}"),
            ("border_peak", "{:.2f}")]
    for name, _ in cols:
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(*[fmt.format(r[name]) for name, fmt in cols])
    Console().print(table)
    if args.json:
        args.json.write_text(json.dumps({"params": shown, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
