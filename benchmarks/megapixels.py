"""Time per megapixel and peak memory of scoring one large image (batch 1), against the bare network.

One bank is fitted once at 1 megapixel (bottle's good images, upscaled to 1024 x 1024, scored at their native
pixels: ``image_size=(1024, 1024)``); then, for each size (0.25, 1, 4, 16 megapixels, square, made by
upscaling a bottle test image), a fresh process loads that bank with a network input of that size (so every
image pixel is a network pixel) and times ``predict([image])`` and the bare network forward of the whole
input in one pass (``FeatureExtractor``, no tiles, no search), reporting the median of ``--repeats`` runs and
the process's peak resident memory after the predictions (before the bare forward). Sizes above
``tile_size`` squared go through the network in tiles (default 1024: 4 and 16 MP are tiled).

    python benchmarks/megapixels.py -o out/megapixels          # prints a table, writes results.json

Time it with nothing else running; the table gives the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import add_data_argument, mvtec  # noqa: E402

SIZES = {"0.25": 512, "1": 1024, "4": 2048, "16": 4096}


def upscaled(path: Path, side: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB").resize((side, side), Image.BICUBIC))


def fit_bank(data: Path, out: Path, n: int) -> Path:
    from patchcore import PatchCore

    good = sorted((mvtec(data) / "bottle" / "train" / "good").iterdir())[::10][:n]
    model = PatchCore(image_size=(1024, 1024), calibration_folds=0, device="cpu")
    model.fit([upscaled(p, 1024) for p in good])
    return model.save(out / "bank_1mp.safetensors", overwrite=True)


def peak_mb() -> float:
    """This process's peak resident memory (VmHWM: unlike getrusage's ru_maxrss it does not start from the
    parent's size at fork)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def one(model_path: Path, data: Path, side: int, repeats: int, tile: int | None) -> dict:
    """Runs in its own process: score one side x side image; time the predict and the bare network."""
    import torch

    from patchcore import PatchCore

    base = PatchCore.load(model_path, device="cpu")
    model = PatchCore(image_size=(side, side), tile_size=tile, device="cpu",
                      calibration_folds=0).set_geometry(None, base.preprocessing.channels)
    model.set_state(base.memory_bank_, base.fingerprint_, base.fit_info_, None, {})
    img = upscaled(sorted((mvtec(data) / "bottle" / "test" / "broken_large").iterdir())[0], side)
    rss0 = peak_mb()
    model.predict([img])  # warm-up: the network, the bank's search, the resize weights
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        model.predict([img])
        times.append(time.perf_counter() - t)
    peak = peak_mb()
    net = model.network()
    x = torch.from_numpy(model.preprocessing([img]))
    with torch.inference_mode():
        net(x)
        bare = []
        for _ in range(repeats):
            t = time.perf_counter()
            net(x)
            bare.append(time.perf_counter() - t)
    return {"megapixels": side * side / 1e6, "side": side, "tiles": len(model.preprocessing.tiles(net.cell())),
            "predict_s": float(np.median(times)), "bare_forward_s": float(np.median(bare)),
            "peak_rss_mb": peak, "rss_after_load_mb": rss0,
            "peak_rss_with_bare_forward_mb": peak_mb(),
            "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-o", "--output", type=Path, required=True)
    ap.add_argument("--sizes", default="0.25,1,4,16", help="megapixels, among " + ", ".join(SIZES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tile-size", type=int, default=1024, help="0: one pass whatever the size")
    ap.add_argument("--fit-images", type=int, default=10)
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    add_data_argument(ap)
    args = ap.parse_args()
    tile = args.tile_size or None
    if args.one is not None:
        print(json.dumps(one(args.output / "bank_1mp.safetensors", args.data, args.one, args.repeats, tile)))
        return
    args.output.mkdir(parents=True, exist_ok=True)
    if not (args.output / "bank_1mp.safetensors").is_file():
        fit_bank(args.data, args.output, args.fit_images)
    rows = []
    for mp in args.sizes.split(","):
        cmd = [sys.executable, __file__, "-o", str(args.output), "--one", str(SIZES[mp]), "--repeats",
               str(args.repeats), "--tile-size", str(args.tile_size), "--data", str(args.data)]
        load = os.getloadavg()[0]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            rows.append({"megapixels": float(mp), "error": (res.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            rows.append({**json.loads(res.stdout.strip().splitlines()[-1]), "loadavg_1min": load})
        print(json.dumps(rows[-1]), flush=True)
    (args.output / "results.json").write_text(json.dumps(rows, indent=2))
    print("\n| megapixels | tiles | predict s | s per MP | bare forward s | predict / bare | peak MB after load "
          "| peak MB scoring | peak MB, bare forward too | load |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['megapixels']} | failed: {r['error']} |")
            continue
        print(f"| {r['megapixels']:.2f} | {r['tiles']} | {r['predict_s']:.2f} | {r['predict_s'] / r['megapixels']:.2f} "
              f"| {r['bare_forward_s']:.2f} | {r['predict_s'] / r['bare_forward_s']:.2f} "
              f"| {r['rss_after_load_mb']:.0f} | {r['peak_rss_mb']:.0f} | {r['peak_rss_with_bare_forward_mb']:.0f} "
              f"| {r['loadavg_1min']:.2f} |")


if __name__ == "__main__":
    main()
