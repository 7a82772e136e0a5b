"""Time pixel AUROC and AUPRO on 100 random 256x256 maps (about 6.5 million pixels).

Run from the repository root: PYTHONPATH=src python benchmarks/metrics_speed.py
"""

import time

import numpy as np
from scipy import ndimage

from patchcore.metrics import aupro, pixel_auroc, pixel_f1_max


def main() -> None:
    rng = np.random.default_rng(0)
    # Blobby masks (smoothed noise, thresholded) give many regions of varied size; a few images stay good.
    noise = ndimage.gaussian_filter(rng.standard_normal((100, 256, 256)), sigma=(0, 6, 6))
    masks = noise > 2.5 * noise.std()
    masks[:20] = False
    maps = (masks + rng.standard_normal(masks.shape)).astype(np.float32)
    for name, metric in (("pixel_auroc", pixel_auroc), ("aupro", aupro), ("pixel_f1_max", pixel_f1_max)):
        start = time.perf_counter()
        value = metric(list(masks), list(maps))
        print(f"{name}: {time.perf_counter() - start:.2f} s (value {value})")


if __name__ == "__main__":
    main()
