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
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from _data import DATA, add_data_argument, mvtec


def run_one(category: str, params: dict, data: Path = DATA) -> dict:
    """Fit and score one category in this process; return the figures."""
    import resource

    import numpy as np
    import torch

    from patchcore import PatchCore
    from patchcore.datasets import load_mask, read_mvtec
    from patchcore.evaluate import compute_metrics
    from patchcore.metrics import border_peak_share

    ds = read_mvtec(mvtec(data) / category)
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
    maps = [p.anomaly_map for p in preds]
    masks = [None if s.mask is None else load_mask(s.mask, size=(m.shape[1], m.shape[0]))
             for s, m in zip(ds.test, maps)]
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # fit and scoring, before the metrics
    metrics = compute_metrics(labels, [p.score for p in preds], masks, maps)
    info = model.fit_info_
    good = [m for s, m in zip(ds.test, maps) if s.label == 0]
    return {
        "category": category, "n_train": info["n_images"], "bank": info["bank_size"], "dim": info["feature_dim"],
        "fit_s": fit_s, "extract_s": info["extract_seconds"], "coreset_s": info["coreset_seconds"],
        "ms_per_image": 1000 * float(np.median(times)), "ms_per_image_mean": 1000 * float(np.mean(times)),
        "peak_fit_mb": fit_rss, "peak_mb": peak_mb,
        "image_auroc": metrics["image_auroc"], "pixel_auroc": metrics["pixel_auroc"],
        "aupro": metrics["aupro"], "threads": torch.get_num_threads(),
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
    add_data_argument(ap)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one category, print JSON
    args = ap.parse_args()
    params = {k: v for k, v in {"backbone": args.backbone, "coreset_ratio": args.coreset_ratio,
                                "preset": args.preset, "image_size": args.image_size,
                                "storage_dtype": args.storage_dtype}.items() if v is not None}
    params.update(args.params)
    if args.one:
        print(json.dumps(run_one(args.one, params, args.data)))
        return
    from rich.console import Console
    from rich.table import Table

    from patchcore import PatchCore

    shown = PatchCore(**params).get_params()
    shown["sampler"] = dataclasses.asdict(shown["sampler"])  # a frozen dataclass: its fields, for the JSON
    rows = []
    for cat in args.categories:
        cmd = [sys.executable, __file__, "--one", cat, "--params", json.dumps(params), "--data", str(args.data)]
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
