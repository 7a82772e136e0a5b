"""Batch-1 latency on the line, side by side in one run: bare backbone, PyTorch path, ONNX runtime, anomalib.

    python benchmarks/latency.py --model out/bottle_default.safetensors -o out/latency.json \
        [--anomalib-python /tmp/anomalib-venv/bin/python]

Rows (each image scored alone, after 3 warm-up images, over the category's test set):

- ``lite0 forward``: the bare network to ``blocks.4`` on one 256 x 256 input (the issue's yardstick);
- ``pytorch``: ``PatchCore.predict(path)``: reading the file, the network, the exact search, Eq. 7 and the map
  at the image's own size;
- ``runtime (fast)``: the same through ``patchcore.runtime`` on an export of the model (onnxruntime for the
  network, the exact cell search in numpy; no torch); ``runtime (graph)``: the export's single graph;
- ``anomalib``: anomalib 2.7.0's PatchCore with the same backbone, layers, size and coreset ratio
  (benchmarks/anomalib_runner.py in its own environment; its timing excludes reading the file). It runs
  first, since its fit takes long and is not what is timed; ours are timed right after it.

Also measured: the runtime's cold start (a fresh Python: import, load the export, score one image).
Timings are wall clock on whatever else runs on the machine: the load average is recorded with them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from _data import REPO, add_data_argument, mvtec


def pct(ms: list[float]) -> dict[str, float]:
    return {"p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99)),
            "mean_ms": float(np.mean(ms)), "n": len(ms)}


def timed(fn, items, warmup: int = 3) -> list[float]:
    for x in items[:warmup]:
        fn(x)
    out = []
    for x in items:
        t = time.perf_counter()
        fn(x)
        out.append((time.perf_counter() - t) * 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a fitted model file (e.g. bottle, defaults)")
    ap.add_argument("--category", default="bottle")
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--anomalib-python", default=None, help="python of the anomalib environment (optional)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runtime-python", default=None,
                    help="python of a runtime-only install (no torch) for the cold start (default: this one)")
    ap.add_argument("--coreset-ratio", type=float, default=0.1, help="anomalib's, to match the model's")
    add_data_argument(ap)
    args = ap.parse_args()

    import torch

    from patchcore import PatchCore, runtime
    from patchcore.backbones import LayerTaps, load_backbone
    from patchcore.datasets import read_mvtec

    torch.set_num_threads(args.threads)
    cat = mvtec(args.data) / args.category
    files = [s.path for s in read_mvtec(cat).test]
    rows: dict[str, dict] = {}
    load = {"loadavg_start": os.getloadavg()}

    if args.anomalib_python:
        ratio = args.coreset_ratio
        with tempfile.TemporaryDirectory() as tmp:
            npz = Path(tmp) / "anomalib.npz"
            env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
            subprocess.run([args.anomalib_python, str(REPO / "benchmarks" / "anomalib_runner.py"),
                            "--category-dir", str(cat), "--coreset-ratio", str(ratio), "--out", str(npz),
                            "--threads", str(args.threads)], check=True, env=env, capture_output=True)
            res = np.load(npz, allow_pickle=False)
            t = json.loads(str(res["timings_json"])) if "timings_json" in res.files else {}
            rows["anomalib 2.7.0"] = {"p50_ms": t.get("test_ms_per_image_median"),
                                      "p99_ms": t.get("test_ms_per_image_p99"),
                                      "mean_ms": t.get("test_ms_per_image_mean"), "n": len(files),
                                      "note": "excludes reading the file"}

    load["loadavg_ours_start"] = os.getloadavg()
    taps = LayerTaps(load_backbone("efficientnet_lite0"), ("blocks.2", "blocks.4"))
    x = torch.rand(1, 3, 256, 256)
    with torch.inference_mode():
        rows["lite0 forward"] = pct(timed(lambda _: taps(x), list(range(len(files)))))

    model = PatchCore.load(args.model, device="cpu")
    rows["pytorch"] = pct(timed(lambda f: model.predict(f), files))

    with tempfile.TemporaryDirectory() as tmp:
        exp = Path(tmp) / "export"
        meta = model.export(exp, images=files[::10], source=args.model)
        for path in ("fast", "graph"):
            rt = runtime.load(exp, threads=args.threads, path=path)
            rows[f"runtime ({path})"] = pct(timed(lambda f, rt=rt: rt.predict(f), files))
        code = ("import time; t = time.perf_counter(); from patchcore import runtime; "
                f"rt = runtime.load({str(exp)!r}); rt.predict({str(files[0])!r}); "
                "print((time.perf_counter() - t) * 1e3)")
        t0 = time.perf_counter()
        out = subprocess.run([args.runtime_python or sys.executable, "-c", code], capture_output=True, text=True,
                             check=True)
        cold = {"in_process_ms": float(out.stdout.strip()), "with_interpreter_ms": (time.perf_counter() - t0) * 1e3}

    load["loadavg_end"] = os.getloadavg()
    base = rows["lite0 forward"]["p50_ms"]
    for r in rows.values():
        if r.get("p50_ms") is not None:
            r["x_forward"] = r["p50_ms"] / base
    cold["python"] = args.runtime_python or sys.executable
    doc = {"model": str(args.model), "bank": meta["bank_size"], "category": args.category, "rows": rows,
           "runtime_cold_start": cold, "parity_at_export": meta["parity"], **load}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=2))
    print(f"{'row':<18}{'p50 ms':>9}{'p99 ms':>9}{'x fwd':>7}")
    for k, r in rows.items():
        p50, p99 = r.get("p50_ms"), r.get("p99_ms")
        print(f"{k:<18}{p50 or float('nan'):>9.1f}{p99 or float('nan'):>9.1f}{r.get('x_forward', float('nan')):>7.2f}")
    print(f"cold start: {cold['in_process_ms']:.0f} ms in process, {cold['with_interpreter_ms']:.0f} ms with the "
          f"interpreter; load {load['loadavg_start'][0]:.1f} -> {load['loadavg_end'][0]:.1f}")


if __name__ == "__main__":
    main()
