"""Can the good images alone choose the scale? A probe with synthetic small defects (a negative result).

For each candidate setting, fits ``PatchCore(calibration_folds=0, **PARAMS)`` on ``--fit`` good images, then
scores ``--held`` other good images as they are and with one synthetic defect each, twice (a thin dark or
bright line, 1-3 px wide and 2-8 % of the image diagonal long; a small ellipse of 0.05-0.4 % of the image),
drawn in native image pixels at 1-2 image standard deviations of contrast. Prints, per candidate, the
image AUROC of clean against defective, and ``region``: the largest map value inside each synthetic defect
against the largest map value of the clean images (the image AUROC such a defect would give where a good
image's own worst patch is the competition). A criterion that chooses the scale should rank the
candidates as the real defects do (docs/benchmarks.md, section 21):

    python benchmarks/synthetic_scale.py '[{}, {"image_size": 432}, {"scale": 1.0}]'
    python benchmarks/synthetic_scale.py '[{}, {"image_size": 256}, {"image_size": 384}]' --category screw
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _data import DATA  # noqa: E402


def synthetic_defect(img: np.ndarray, rng: np.random.Generator, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """``img`` (H x W x 3, uint8) with one small defect of ``kind`` ("line" or "blob"), and its mask."""
    h, w = img.shape[:2]
    margin = int(0.1 * min(h, w))
    cy, cx = rng.integers(margin, h - margin), rng.integers(margin, w - margin)
    mask = np.zeros((h, w), np.float32)
    if kind == "line":
        length, angle = rng.uniform(0.02, 0.08) * np.hypot(h, w), rng.uniform(0, np.pi)
        t = np.linspace(-length / 2, length / 2, int(length) * 2)
        mask[np.clip((cy + t * np.sin(angle)).astype(int), 0, h - 1),
             np.clip((cx + t * np.cos(angle)).astype(int), 0, w - 1)] = 1
        width = int(rng.integers(1, 4))
        if width > 1:
            mask = ndimage.binary_dilation(mask > 0, iterations=width - 1).astype(np.float32)
    else:
        r, e = np.sqrt(rng.uniform(0.0005, 0.004) * h * w / np.pi), rng.uniform(0.5, 2.0)
        yy, xx = np.ogrid[:h, :w]
        mask = (((yy - cy) / (r * np.sqrt(e))) ** 2 + ((xx - cx) / (r / np.sqrt(e))) ** 2 <= 1).astype(np.float32)
    mask = ndimage.gaussian_filter(mask, 0.7)
    out = img.astype(np.float32)
    delta = rng.choice([-1.0, 1.0]) * rng.uniform(1.0, 2.0) * out.std()
    return np.clip(out + mask[..., None] * delta, 0, 255).astype(np.uint8), mask > 0.2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("candidates", help="JSON list of PatchCore keyword arguments, one per candidate")
    ap.add_argument("--category", default="kolektor", help="kolektor (KolektorSDD), bottle or screw")
    ap.add_argument("--fit", type=int, default=40)
    ap.add_argument("--held", type=int, default=20)
    args = ap.parse_args()

    from patchcore import PatchCore
    from patchcore.datasets import read_mvtec
    from patchcore.metrics import image_auroc

    root = DATA / "ksdd" / "kolektor" if args.category == "kolektor" else DATA / "mvtec_ad" / args.category
    goods = list(read_mvtec(root).train)
    order = np.random.default_rng(0).permutation(len(goods))
    fit = [goods[i] for i in order[:args.fit]]
    held = [np.asarray(Image.open(goods[i]).convert("RGB")) for i in order[args.fit:args.fit + args.held]]
    rng = np.random.default_rng(1)
    drawn = [synthetic_defect(im, rng, kind) for im in held for kind in ("line", "blob")]
    defects, masks = [d for d, _ in drawn], [m for _, m in drawn]
    kinds = np.array(["line", "blob"] * len(held))

    def auroc(good: np.ndarray, bad: np.ndarray) -> float:
        return image_auroc(np.r_[np.zeros(len(good)), np.ones(len(bad))], np.r_[good, bad])

    for params in json.loads(args.candidates):
        t0 = time.perf_counter()
        model = PatchCore(**{**params, "calibration_folds": 0}).fit(fit)
        clean, bad = model.predict(held), model.predict(defects)
        clean_max = np.array([p.anomaly_map.max() for p in clean])
        region = np.array([p.anomaly_map[m].max() for p, m in zip(bad, masks)])
        print(json.dumps({
            "category": args.category, "params": params, "input": list(model.preprocessing.input_size),
            "image_auroc": auroc(np.array([p.score for p in clean]), np.array([p.score for p in bad])),
            "region": auroc(clean_max, region), "region_line": auroc(clean_max, region[kinds == "line"]),
            "region_blob": auroc(clean_max, region[kinds == "blob"]),
            "seconds": round(time.perf_counter() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
